//! The mix's own checkout sessions recorded as the API records them, shared by the load
//! programs of `bench/processor.sh` and `bench/e2e.sh` (`#[path]`-included by each).

use processor::domain::events::CheckoutMode;
use processor::domain::offer::{CheckoutOffer, OfferedPrice};
use shared::samples;

/// Records the own checkout sessions of customers `0..customers` of run `run`
/// ([`samples::mix_offer`]) in the database at `url`; returns how many.
pub(crate) async fn record(url: &str, run: &str, customers: usize, foreign_every: usize) -> usize {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the offers database");
    tokio::spawn(connection);
    let offers: Vec<CheckoutOffer> = (0..customers)
        .filter_map(|k| samples::mix_offer(run, k, foreign_every))
        .map(
            |(session_id, user_id, product, mode, price)| CheckoutOffer {
                session_id,
                user_id,
                product_key: product.to_owned(),
                mode: CheckoutMode::from_stripe(mode).expect("a mode of the mix"),
                price: OfferedPrice::Stripe(price.to_owned()),
            },
        )
        .collect();
    processor::store::offers::record_priced(&client, &offers)
        .await
        .expect("record the offers")
}
