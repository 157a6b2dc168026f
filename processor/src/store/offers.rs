//! What a session charges, known without asking Stripe ([`crate::domain::offer`]):
//! `checkout_offers`, what each Checkout Session this service created charges (recorded by the
//! API once Stripe answered the creation), and `payment_link_prices`, the price each Payment
//! Link sells (learned by the worker from the first of its sessions it read).

use tokio_postgres::GenericClient;
use tokio_postgres::types::Type;

use super::StoreError;
use crate::domain::events::CheckoutMode;
use crate::domain::offer::{CheckoutOffer, LinkPrice, OfferedPrice};

/// Records `offer`; a session already recorded (a double click answered with the same
/// session) keeps its first row.
///
/// # Errors
/// The database's error.
pub async fn record(db: &impl GenericClient, offer: &CheckoutOffer) -> Result<(), StoreError> {
    let (price_id, amount, currency) = match &offer.price {
        OfferedPrice::Stripe(price) => (Some(price.as_str()), None, None),
        OfferedPrice::Amount {
            amount_cents,
            currency,
        } => (None, Some(*amount_cents), Some(currency.as_str())),
    };
    db.execute(
        "INSERT INTO checkout_offers
             (session_id, user_id, product_key, mode, price_id, amount_cents, currency)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (session_id) DO NOTHING",
        &[
            &offer.session_id,
            &offer.user_id,
            &offer.product_key,
            &offer.mode.as_str(),
            &price_id,
            &amount,
            &currency,
        ],
    )
    .await?;
    Ok(())
}

/// Records every offer of `offers` sold at a Stripe price, in one statement (the benchmarks
/// record their mix's checkouts so, as the API would have one by one); returns how many.
///
/// # Errors
/// The database's error.
pub async fn record_priced(
    db: &impl GenericClient,
    offers: &[CheckoutOffer],
) -> Result<usize, StoreError> {
    let (mut ids, mut users, mut products, mut modes, mut prices) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for offer in offers {
        if let OfferedPrice::Stripe(price) = &offer.price {
            ids.push(offer.session_id.as_str());
            users.push(offer.user_id.as_str());
            products.push(offer.product_key.as_str());
            modes.push(offer.mode.as_str());
            prices.push(price.as_str());
        }
    }
    db.execute(
        "INSERT INTO checkout_offers (session_id, user_id, product_key, mode, price_id)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
         ON CONFLICT (session_id) DO NOTHING",
        &[&ids, &users, &products, &modes, &prices],
    )
    .await?;
    Ok(ids.len())
}

/// The recorded offers among `session_ids`, in no particular order.
///
/// # Errors
/// The database's error; [`StoreError::Corrupt`] for a row no offer can be read from.
pub async fn find(
    db: &impl GenericClient,
    session_ids: &[&str],
) -> Result<Vec<CheckoutOffer>, StoreError> {
    if session_ids.is_empty() {
        return Ok(Vec::new());
    }
    // One round trip (typed, unprepared): this runs on every batch with a session.
    let rows = db
        .query_typed(
            "SELECT session_id, user_id, product_key, mode, price_id, amount_cents, currency
               FROM checkout_offers WHERE session_id = ANY($1)",
            &[(&session_ids, Type::TEXT_ARRAY)],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let mode = CheckoutMode::from_stripe(row.try_get("mode")?)
                .ok_or(StoreError::Corrupt { column: "mode" })?;
            let price = match (
                row.try_get::<_, Option<String>>("price_id")?,
                row.try_get::<_, Option<i64>>("amount_cents")?,
                row.try_get::<_, Option<String>>("currency")?,
            ) {
                (Some(price), _, _) => OfferedPrice::Stripe(price),
                (None, Some(amount_cents), Some(currency)) => OfferedPrice::Amount {
                    amount_cents,
                    currency,
                },
                _ => return Err(StoreError::Corrupt { column: "price_id" }),
            };
            Ok(CheckoutOffer {
                session_id: row.try_get("session_id")?,
                user_id: row.try_get("user_id")?,
                product_key: row.try_get("product_key")?,
                mode,
                price,
            })
        })
        .collect()
}

/// The learned prices of `links`.
///
/// # Errors
/// The database's error.
pub async fn find_link_prices(
    db: &impl GenericClient,
    links: &[&str],
) -> Result<Vec<LinkPrice>, StoreError> {
    if links.is_empty() {
        return Ok(Vec::new());
    }
    let rows = db
        .query_typed(
            "SELECT payment_link, price_id FROM payment_link_prices WHERE payment_link = ANY($1)",
            &[(&links, Type::TEXT_ARRAY)],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(LinkPrice {
                payment_link: row.try_get(0)?,
                price_id: row.try_get(1)?,
            })
        })
        .collect()
}

/// Keeps what was learned about a Payment Link's price (the first reading stays).
///
/// # Errors
/// The database's error.
pub async fn learn_link_price(db: &impl GenericClient, link: &LinkPrice) -> Result<(), StoreError> {
    db.execute(
        "INSERT INTO payment_link_prices (payment_link, price_id) VALUES ($1, $2)
         ON CONFLICT (payment_link) DO NOTHING",
        &[&link.payment_link, &link.price_id],
    )
    .await?;
    Ok(())
}

/// Which of `payments` (payment intent or charge ids) this service already holds tied to a
/// purchase or an invoice: their disputes need no lookup of what they paid.
///
/// # Errors
/// [`StoreError::Db`] when the query fails.
pub async fn tied_payments(
    db: &impl GenericClient,
    payments: &[&str],
) -> Result<std::collections::HashSet<String>, StoreError> {
    if payments.is_empty() {
        return Ok(std::collections::HashSet::new());
    }
    let rows = db
        .query(
            "SELECT p.id FROM unnest($1::text[]) AS p(id)
              WHERE EXISTS (SELECT 1 FROM purchases
                             WHERE (payment_intent_id = p.id OR charge_id = p.id)
                               AND (checkout_session_id IS NOT NULL OR invoice_id IS NOT NULL
                                    OR product_key IS NOT NULL))",
            &[&payments],
        )
        .await?;
    rows.iter()
        .map(|r| r.try_get(0).map_err(StoreError::from))
        .collect()
}
