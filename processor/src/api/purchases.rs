//! The user's purchases: `GET /api/purchases` (paginated, optional status filter) and
//! `GET /api/purchases/{id}`.
//!
//! Invariants: every query is scoped by the token's user id in SQL, so another user's purchase
//! is indistinguishable from a missing one (404); query parameters are validated before any
//! query runs (400 `bad_request`).

use axum::Json;
use axum::extract::{Path, Query, State};
use chrono::{DateTime, Utc};
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

use super::ApiState;
use super::error::ApiError;
use crate::auth::{AdminToken, AuthUser};

/// The purchase statuses of the schema.
pub const STATUSES: [&str; 5] = ["pending", "completed", "refunded", "failed", "disputed"];
/// The largest page.
pub const MAX_PAGE_SIZE: i64 = 100;
const DEFAULT_PAGE_SIZE: i64 = 20;

/// The product key is the one our checkout wrote, else the registry's product sold at the
/// price paid, now or before (its price history); the title is that product's.
const COLUMNS: &str = "id,
    COALESCE(product_key,
             (SELECT h.product_key FROM product_prices h WHERE h.price_id = purchases.price_id)),
    status, amount_paid_cents, currency, platform_fee_cents,
    organization_fee_cents, creator_payout_cents, checkout_session_id, payment_intent_id,
    purchased_at, refunded_at, refund_amount_cents, refund_reason, created_at,
    (SELECT r.title FROM products r
      WHERE r.key = COALESCE(purchases.product_key,
             (SELECT h.product_key FROM product_prices h WHERE h.price_id = purchases.price_id))),
    duplicate";

/// One purchase as the API shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Purchase {
    pub id: i64,
    pub product_key: Option<String>,
    /// The registered product's title.
    pub title: Option<String>,
    pub status: String,
    pub amount_paid_cents: Option<i64>,
    pub currency: Option<String>,
    pub platform_fee_cents: Option<i64>,
    pub organization_fee_cents: Option<i64>,
    pub creator_payout_cents: Option<i64>,
    pub checkout_session_id: Option<String>,
    pub payment_intent_id: Option<String>,
    pub purchased_at: Option<DateTime<Utc>>,
    pub refunded_at: Option<DateTime<Utc>>,
    pub refund_amount_cents: i64,
    pub refund_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    /// A second payment for something the user already owned when it was paid: a purchase
    /// of its own, which an operator may refund.
    pub duplicate: bool,
}

impl TryFrom<&Row> for Purchase {
    type Error = tokio_postgres::Error;

    fn try_from(row: &Row) -> Result<Self, Self::Error> {
        Ok(Self {
            id: row.try_get(0)?,
            product_key: row.try_get(1)?,
            title: row.try_get(15)?,
            status: row.try_get(2)?,
            amount_paid_cents: row.try_get(3)?,
            currency: row.try_get(4)?,
            platform_fee_cents: row.try_get(5)?,
            organization_fee_cents: row.try_get(6)?,
            creator_payout_cents: row.try_get(7)?,
            checkout_session_id: row.try_get(8)?,
            payment_intent_id: row.try_get(9)?,
            purchased_at: row.try_get(10)?,
            refunded_at: row.try_get(11)?,
            refund_amount_cents: row.try_get(12)?,
            refund_reason: row.try_get(13)?,
            created_at: row.try_get(14)?,
            duplicate: row.try_get(16)?,
        })
    }
}

/// The raw query string of `GET /api/purchases`; validated by [`RawListQuery::validate`].
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawListQuery {
    pub page: Option<String>,
    pub page_size: Option<String>,
    pub status: Option<String>,
}

/// A validated listing request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    pub page: i64,
    pub page_size: i64,
    pub status: Option<String>,
}

impl RawListQuery {
    /// `page ≥ 1`, `1 ≤ pageSize ≤ 100`, `status` one of [`STATUSES`] (empty means any).
    ///
    /// # Errors
    /// [`ApiError::BadRequest`] naming the parameter.
    pub fn validate(self) -> Result<ListQuery, ApiError> {
        let number = |name: &str, raw: Option<String>, default: i64, max: i64| {
            let Some(raw) = raw.filter(|r| !r.is_empty()) else {
                return Ok(default);
            };
            match raw.parse::<i64>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(ApiError::BadRequest(format!(
                    "{name} must be an integer between 1 and {max}"
                ))),
            }
        };
        // Bounded so `(page - 1) * pageSize` can never overflow.
        let page = number("page", self.page, 1, 1_000_000_000)?;
        let page_size = number("pageSize", self.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)?;
        let status = match self.status.filter(|s| !s.is_empty()) {
            None => None,
            Some(s) if STATUSES.contains(&s.as_str()) => Some(s),
            Some(_) => {
                return Err(ApiError::BadRequest(format!(
                    "status must be one of {}",
                    STATUSES.join(", ")
                )));
            }
        };
        Ok(ListQuery {
            page,
            page_size,
            status,
        })
    }
}

/// `GET /api/purchases`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PurchasePage {
    pub data: Vec<Purchase>,
    pub pagination: Pagination,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Pagination {
    pub page: i64,
    pub page_size: i64,
    pub total_count: i64,
    pub total_pages: i64,
}

pub(crate) async fn list(
    State(state): State<ApiState>,
    AuthUser(user): AuthUser,
    query: Result<Query<RawListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<PurchasePage>, ApiError> {
    let Query(raw) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let query = raw.validate()?;
    let client = state.pool.get().await.map_err(ApiError::database)?;
    let user = user.as_str();
    let status = query.status.as_deref();
    let filter = format!(
        "user_id = $1 AND ($2::text IS NULL OR status = $2) AND {}",
        crate::store::A_PURCHASE
    );
    let count_sql = format!("SELECT count(*) FROM purchases WHERE {filter}");
    let page_sql = format!(
        "SELECT {COLUMNS} FROM purchases WHERE {filter}
          ORDER BY created_at DESC, id DESC LIMIT $3 OFFSET $4"
    );
    let offset = (query.page - 1) * query.page_size;
    let count_params: [(&(dyn ToSql + Sync), Type); 2] =
        [(&user, Type::TEXT), (&status, Type::TEXT)];
    let page_params: [(&(dyn ToSql + Sync), Type); 4] = [
        (&user, Type::TEXT),
        (&status, Type::TEXT),
        (&query.page_size, Type::INT8),
        (&offset, Type::INT8),
    ];
    // Pipelined: both statements go out together.
    let (count, rows) = tokio::try_join!(
        client.query_typed_one(&count_sql, &count_params),
        client.query_typed(&page_sql, &page_params),
    )
    .map_err(ApiError::database)?;
    let total_count: i64 = count.try_get(0).map_err(ApiError::internal)?;
    let data = rows
        .iter()
        .map(Purchase::try_from)
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::internal)?;
    Ok(Json(PurchasePage {
        data,
        pagination: Pagination {
            page: query.page,
            page_size: query.page_size,
            total_count,
            total_pages: (total_count + query.page_size - 1) / query.page_size,
        },
    }))
}

pub(crate) async fn one(
    State(state): State<ApiState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Purchase>, ApiError> {
    let not_found = || ApiError::NotFound("no such purchase".into());
    // A non-numeric id cannot name a purchase: 404 like any other unknown id.
    let id: i64 = id.parse().map_err(|_| not_found())?;
    let client = state.pool.get().await.map_err(ApiError::database)?;
    let row = client
        .query_typed_opt(
            &format!(
                "SELECT {COLUMNS} FROM purchases WHERE id = $1 AND user_id = $2 AND {}",
                crate::store::A_PURCHASE
            ),
            &[(&id, Type::INT8), (&user.as_str(), Type::TEXT)],
        )
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(not_found)?;
    Ok(Json(Purchase::try_from(&row).map_err(ApiError::internal)?))
}

/// One duplicate payment, as operators see it: whose, and the purchase.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DuplicatePayment {
    pub user_id: String,
    #[serde(flatten)]
    pub purchase: Purchase,
}

/// `GET /v1/payments/duplicates` (admin): the newest 200 second payments for something already
/// owned whose money has not come back (not fully refunded, no dispute lost), to refund.
pub(crate) async fn duplicates(
    State(state): State<ApiState>,
    _admin: AdminToken,
) -> Result<Json<Vec<DuplicatePayment>>, ApiError> {
    let client = state.pool.get().await.map_err(ApiError::database)?;
    let rows = client
        .query_typed(
            &format!(
                "SELECT {COLUMNS}, user_id FROM purchases
                  WHERE duplicate AND status <> 'refunded'
                  ORDER BY purchased_at DESC, id DESC LIMIT 200"
            ),
            &[],
        )
        .await
        .map_err(ApiError::database)?;
    rows.iter()
        .map(|row| {
            Ok(DuplicatePayment {
                user_id: row.try_get(17)?,
                purchase: Purchase::try_from(row)?,
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()
        .map(Json)
        .map_err(ApiError::internal)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn raw(page: Option<&str>, size: Option<&str>, status: Option<&str>) -> RawListQuery {
        RawListQuery {
            page: page.map(Into::into),
            page_size: size.map(Into::into),
            status: status.map(Into::into),
        }
    }

    #[test]
    fn defaults_are_first_page_of_twenty_any_status() {
        assert_eq!(
            raw(None, None, Some("")).validate().unwrap(),
            ListQuery {
                page: 1,
                page_size: 20,
                status: None
            }
        );
    }

    #[test]
    fn out_of_range_or_unknown_parameters_are_bad_requests() {
        for bad in [
            raw(Some("0"), None, None),
            raw(Some("-1"), None, None),
            raw(Some("two"), None, None),
            raw(None, Some("0"), None),
            raw(None, Some("101"), None),
            raw(None, None, Some("paid")),
        ] {
            let err = bad.validate().unwrap_err();
            assert_eq!(err.code(), "bad_request");
        }
        let ok = raw(Some("3"), Some("100"), Some("refunded"))
            .validate()
            .unwrap();
        assert_eq!((ok.page, ok.page_size), (3, 100));
        assert_eq!(ok.status.as_deref(), Some("refunded"));
    }
}
