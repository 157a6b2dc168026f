//! The product registry as the store resolves rows against it: the whole `products` table,
//! kept in memory per database and read again only after it changed.
//!
//! Invariant: every statement that writes `products` bumps `registry_generation` in its
//! transaction (a trigger, `migrations/0008_registry_generation.sql`). A transaction reads that
//! one row ([`GENERATION_SQL`], in a pipeline it sends anyway) and resolves against the
//! registry loaded at that generation or a later one — what reading `products` itself at that
//! moment or later would give. The table is loaded in one statement with the generation, so a
//! loaded registry is never older than its stamp.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio_postgres::Row;

use super::{Db, PRODUCT_COLUMNS, StoreError, product_from_row};
use crate::domain::projection::{RefundPolicy, Registry, SubscriptionPolicy};

/// The generation row; its result is read by [`Stamp::from_rows`].
pub(super) const GENERATION_SQL: &str = "SELECT token, generation FROM registry_generation";

/// Which registry a transaction saw: the database's token and the generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Stamp {
    token: String,
    generation: i64,
}

impl Stamp {
    /// The stamp in the rows of [`GENERATION_SQL`].
    pub(super) fn from_rows(rows: &[Row]) -> Result<Self, StoreError> {
        let row = rows.first().ok_or(StoreError::Corrupt {
            column: "registry_generation",
        })?;
        Ok(Self {
            token: row.try_get(0)?,
            generation: row.try_get(1)?,
        })
    }
}

/// A registry loaded at a generation.
type Loaded = (i64, Arc<Registry>);

/// The registries loaded in this process, by database token.
static LOADED: Mutex<Option<HashMap<String, Loaded>>> = Mutex::new(None);

fn loaded(stamp: &Stamp) -> Option<Arc<Registry>> {
    let held = LOADED.lock().unwrap_or_else(PoisonError::into_inner);
    let (generation, registry) = held.as_ref()?.get(&stamp.token)?;
    (*generation >= stamp.generation).then(|| Arc::clone(registry))
}

fn keep(token: String, generation: i64, registry: &Arc<Registry>) {
    let mut held = LOADED.lock().unwrap_or_else(PoisonError::into_inner);
    let held = held.get_or_insert_with(HashMap::new);
    let newer = held.get(&token).is_none_or(|(kept, _)| *kept < generation);
    if newer {
        held.insert(token, (generation, Arc::clone(registry)));
    }
}

/// The registry at `stamp` or later: the one in memory, or the table read now (one round trip,
/// only after a change).
pub(super) async fn at(db: Db<'_>, stamp: &Stamp) -> Result<Arc<Registry>, StoreError> {
    if let Some(registry) = loaded(stamp) {
        return Ok(registry);
    }
    let rows = db
        .query(
            &format!(
                "SELECT g.token, g.generation, g.refund_policy, g.past_due_grace_seconds,
                        p.key IS NOT NULL AS present, p.*
                   FROM registry_generation g
                   LEFT JOIN (SELECT {PRODUCT_COLUMNS} FROM products) p ON true"
            ),
            &[],
        )
        .await?;
    let loaded_at = Stamp::from_rows(&rows)?;
    let mut products = Vec::with_capacity(rows.len());
    for row in &rows {
        if row.try_get("present")? {
            products.push(product_from_row(row)?);
        }
    }
    let policy = match rows.first() {
        Some(row) => SubscriptionPolicy {
            refund: RefundPolicy::parse(row.try_get("refund_policy")?).ok_or(
                StoreError::Corrupt {
                    column: "refund_policy",
                },
            )?,
            past_due_grace: row.try_get("past_due_grace_seconds")?,
        },
        None => SubscriptionPolicy::default(),
    };
    let registry = Arc::new(Registry::new(products).with_policy(policy));
    keep(loaded_at.token, loaded_at.generation, &registry);
    Ok(registry)
}
