//! The OpenAPI 3.1 document of the entitlement API, served at `GET /openapi.json`.
//!
//! Written out as JSON rather than derived: the API is small, and the shapes stay next to each
//! other here. Invariant: the document lists exactly the routes of [`super::routes`] — a test
//! compares both ways, so a route cannot be added or removed without updating this document.

use axum::Json;
use serde_json::{Value, json};

use super::purchases::STATUSES;

/// The document.
#[must_use]
pub fn document() -> Value {
    let bearer = json!([{"bearerAuth": []}]);
    let empty = json!({"type": "string", "maxLength": 0});
    let admin = json!([{"adminToken": []}]);
    let product_key = json!({"name": "key", "in": "path", "required": true,
                             "schema": {"type": "string", "pattern": "^[a-z0-9_-]{1,64}$"}});
    let error = |description: &str| {
        json!({"description": description,
               "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
    };
    let ok = |schema: &str| {
        json!({"description": "OK",
               "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
    };
    let organization_id = json!({"type": "string", "pattern": "^[!-~]{1,196}$"});
    let organization_param = json!({"name": "organizationId", "in": "path", "required": true,
                                    "schema": organization_id});
    let member_param = json!({"name": "userId", "in": "path", "required": true,
        "schema": {"type": "string", "pattern": "^(?!org:)[!-~]{1,200}$"}});
    // The organisation routes.
    let member_path = json!({
        "put": {
            "operationId": "putMember",
            "summary": "Add a member to an organisation, or change their role (ADMIN_API_TOKEN).",
            "description": "Lands only with a `version` above the stored one (a late write never \
                            undoes a newer one); the same write again changes nothing. Seats go \
                            to members by `joinedAt` (now when absent), then user id.",
            "security": admin,
            "parameters": [organization_param.clone(), member_param.clone()],
            "requestBody": {"required": true, "content": {"application/json":
                {"schema": {"$ref": "#/components/schemas/MemberInput"}}}},
            "responses": {
                "200": ok("Member"),
                "400": error("bad_request: a body that is not JSON"),
                "401": error("Missing or wrong admin token"),
                "404": error("Admin API not enabled"),
                "409": error("stale_version: a higher or different version is stored"),
                "413": error("payload_too_large"),
                "422": error("validation_failed (with `field`)"),
            },
        },
        "delete": {
            "operationId": "removeMember",
            "summary": "Remove a member (ADMIN_API_TOKEN); kept as a tombstone at `version`.",
            "security": admin,
            "parameters": [organization_param.clone(), member_param,
                {"name": "version", "in": "query", "required": true,
                 "schema": {"type": "integer", "minimum": 0, "maximum": i64::MAX}}],
            "responses": {
                "200": ok("Member"),
                "400": error("bad_request: version missing or not an integer"),
                "401": error("Missing or wrong admin token"),
                "404": error("Admin API not enabled"),
                "409": error("stale_version"),
                "422": error("validation_failed (with `field`)"),
            },
        },
    });
    let organization_path = json!({"get": {
        "operationId": "getOrganization",
        "summary": "An organisation's members by seat and its own entitlements (ADMIN_API_TOKEN).",
        "security": admin,
        "parameters": [organization_param],
        "responses": {
            "200": ok("Organization"),
            "401": error("Missing or wrong admin token"),
            "404": error("Admin API not enabled"),
            "422": error("validation_failed (organizationId)"),
        },
    }});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Entitlement API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Entitlements, purchases, checkout and billing portal of the \
                            authenticated user (bearer JWT, user = `sub`).",
        },
        "paths": {
            "/api/pro/entitlement": {"get": {
                "operationId": "getProEntitlement",
                "summary": "The caller's `pro` entitlement, with its status at read time.",
                "security": bearer,
                "responses": {"200": ok("ProEntitlement"), "401": error("Missing or invalid token")},
            }},
            "/api/entitlements": {"get": {
                "operationId": "listEntitlements",
                "summary": "All of the caller's entitlements, their organisations' included (each \
                            source held through one names it).",
                "security": bearer,
                "responses": {"200": ok("EntitlementList"), "401": error("Missing or invalid token")},
            }},
            "/api/access/{entitlementKey}": {"get": {
                "operationId": "checkAccess",
                "summary": "Whether the caller may use an entitlement now.",
                "security": bearer,
                "parameters": [{"name": "entitlementKey", "in": "path", "required": true,
                                "schema": {"type": "string"}}],
                "responses": {
                    "200": ok("AccessAllowed"),
                    "401": error("Missing or invalid token"),
                    "403": {"description": "Access refused", "content": {"application/json":
                        {"schema": {"$ref": "#/components/schemas/AccessDenied"}}}},
                },
            }},
            "/v1/entitlements/{userId}": {"get": {
                "operationId": "adminListEntitlements",
                "summary": "Any user's entitlements (operators; ADMIN_API_TOKEN).",
                "security": admin,
                "parameters": [{"name": "userId", "in": "path", "required": true,
                                "schema": {"type": "string", "pattern": "^[!-~]{1,200}$"}}],
                "responses": {
                    "200": ok("EntitlementList"),
                    "400": error("bad_request: not a user id"),
                    "401": error("Missing or wrong admin token"),
                    "404": error("Admin API not enabled"),
                },
            }},
            "/api/purchases": {"get": {
                "operationId": "listPurchases",
                "summary": "The caller's purchases, newest first.",
                "security": bearer,
                "parameters": [
                    // An empty value is the default (`?page=&status=`), as the contract's
                    // example `status=` shows.
                    {"name": "page", "in": "query", "schema": {"default": 1, "anyOf": [
                        {"type": "integer", "minimum": 1, "maximum": 1_000_000_000}, empty]}},
                    {"name": "pageSize", "in": "query", "schema": {"default": 20, "anyOf": [
                        {"type": "integer", "minimum": 1, "maximum": 100}, empty]}},
                    {"name": "status", "in": "query", "schema": {"anyOf": [
                        {"type": "string", "enum": STATUSES}, empty]}},
                ],
                "responses": {
                    "200": ok("PurchasePage"),
                    "400": error("Invalid query parameter"),
                    "401": error("Missing or invalid token"),
                },
            }},
            "/api/purchases/{id}": {"get": {
                "operationId": "getPurchase",
                "summary": "One of the caller's purchases.",
                "security": bearer,
                "parameters": [{"name": "id", "in": "path", "required": true,
                                "schema": {"type": "integer"}}],
                "responses": {
                    "200": ok("Purchase"),
                    "401": error("Missing or invalid token"),
                    "404": error("No such purchase of the caller"),
                },
            }},
            "/api/checkout/session": {"post": {
                "operationId": "createCheckoutSession",
                "summary": "A Stripe Checkout Session for a registered, published product.",
                "security": bearer,
                "description": "With `organizationId`, the session is the organisation's (its \
                                Stripe customer, its entitlements): the token must carry `org_id` \
                                equal to it with `org_role` admin, owner or billing, or the caller \
                                must be one of its admins (`PUT /v1/organizations/…/members/…`).",
                "requestBody": {"required": true, "content": {"application/json": {"schema":
                    {"type": "object", "required": ["productKey"],
                     "properties": {"productKey": {"type": "string"},
                                    "organizationId": organization_id.clone()}}}}},
                "responses": {
                    "200": ok("CheckoutSession"),
                    "400": error("Malformed body"),
                    "401": error("Missing or invalid token"),
                    "403": error("forbidden: the caller may not bill for the organisation"),
                    "404": error("unknown_product"),
                    "409": error("already_entitled"),
                    "413": error("payload_too_large (over API_MAX_BODY_BYTES)"),
                    "422": error("free_product, or validation_failed (organizationId)"),
                    "429": error("rate_limited (10 checkouts a minute per user; Retry-After)"),
                    "502": error("Stripe failed"),
                    "503": error("Checkout not configured, or the per-user limit cannot be counted (Retry-After)"),
                },
            }},
            "/api/checkout/session/{sessionId}": {"get": {
                "operationId": "getCheckoutOutcome",
                "summary": "The success page's answer: the session's outcome and the caller's \
                            entitlements, applied from Stripe when the webhook has not been yet.",
                "description": "Only a session this service created for the caller (or for an \
                                organisation they bill for); any other is a 404. With `wait`, the \
                                answer waits up to that many seconds (at most 10) for the session \
                                to be paid and applied.",
                "security": bearer,
                "parameters": [
                    {"name": "sessionId", "in": "path", "required": true,
                     "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"}},
                    {"name": "wait", "in": "query", "schema": {"anyOf": [
                        {"type": "integer", "minimum": 0, "maximum": 10}, empty]}},
                ],
                "responses": {
                    "200": ok("CheckoutOutcome"),
                    "400": error("bad_request: wait out of range"),
                    "401": error("Missing or invalid token"),
                    "404": error("not_found: no such session of the caller"),
                    "502": error("Stripe failed"),
                    "503": error("Stripe not configured, or Postgres unavailable (Retry-After)"),
                },
            }},
            "/api/billing/portal": {"post": {
                "operationId": "createBillingPortalSession",
                "summary": "A Stripe billing portal URL for the caller's customer, or an \
                            organisation's.",
                "security": bearer,
                "requestBody": {"required": false, "content": {"application/json": {"schema":
                    {"type": "object", "additionalProperties": false,
                     "properties": {"organizationId": organization_id.clone()}}}}},
                "responses": {
                    "200": ok("PortalSession"),
                    "400": error("Malformed body"),
                    "401": error("Missing or invalid token"),
                    "403": error("forbidden: the caller may not bill for the organisation"),
                    "422": error("validation_failed (organizationId)"),
                    "404": error("no_billing_account"),
                    "429": error("rate_limited (10 portal sessions a minute per user; Retry-After)"),
                    "502": error("Stripe failed"),
                    "503": error("Billing portal not configured, or the per-user limit cannot be counted (Retry-After)"),
                },
            }},
            "/api/pro/restore": {"post": {
                "operationId": "restorePurchases",
                "summary": "Re-read the caller's state from Stripe (or an organisation's they bill \
                            for) and re-project it.",
                "security": bearer,
                "requestBody": {"required": false, "content": {"application/json": {"schema":
                    {"type": "object", "additionalProperties": false,
                     "properties": {"organizationId": organization_id.clone()}}}}},
                "responses": {
                    "200": ok("RestoreResult"),
                    "400": error("Malformed body"),
                    "401": error("Missing or invalid token"),
                    "403": error("forbidden: the caller may not bill for the organisation"),
                    "422": error("validation_failed (organizationId)"),
                    "429": error("rate_limited (one restore per 10 s)"),
                    "502": error("Stripe failed, or a list longer than restore reads"),
                    "503": error("unavailable: the rate limit cannot be checked (Redis down); see Retry-After"),
                },
            }},
            "/v1/products/{key}": {
                "put": {
                    "operationId": "putProduct",
                    "summary": "Register or replace a product of the registry (ADMIN_API_TOKEN).",
                    "description": "`amountCents` + `currency` (sold through Checkout `price_data`) or a \
                                    Stripe `priceId`; `mode` `payment` (default) or `subscription` (needs a \
                                    `priceId`); `grants` defaults to `[\"content:{key}\"]`; fees in basis \
                                    points, the creator gets the rest; `status` `published` (default) or \
                                    `unpublished`.",
                    "security": admin,
                    "parameters": [product_key.clone()],
                    "requestBody": {"required": true, "content": {"application/json":
                        {"schema": {"$ref": "#/components/schemas/ProductInput"}}}},
                    "responses": {
                        "200": ok("Product"), "201": ok("Product"),
                        "400": error("bad_request: a body that is not a JSON product"),
                        "401": error("Missing or wrong admin token"),
                        "404": error("Admin API not enabled"),
                        "409": error("configured_product or price_taken"),
                        "422": error("validation_failed (with `field`)"),
                    },
                },
                "get": {
                    "operationId": "getProduct",
                    "summary": "One product of the registry (ADMIN_API_TOKEN).",
                    "security": admin,
                    "parameters": [product_key.clone()],
                    "responses": {"200": ok("Product"), "401": error("Missing or wrong admin token"),
                                  "404": error("unknown_product")},
                },
                "delete": {
                    "operationId": "unpublishProduct",
                    "summary": "Unpublish a product: it can no longer be bought; buyers keep access.",
                    "security": admin,
                    "parameters": [product_key],
                    "responses": {"200": ok("Product"), "401": error("Missing or wrong admin token"),
                                  "404": error("unknown_product"),
                                  "409": error("configured_product")},
                },
            },
            "/v1/organizations/{organizationId}/members/{userId}": member_path,
            "/v1/organizations/{organizationId}": organization_path,
            "/v1/products": {"get": {
                "operationId": "listProducts",
                "summary": "The registry's products in key order (ADMIN_API_TOKEN).",
                "security": admin,
                "parameters": [
                    {"name": "after", "in": "query", "schema": {"type": "string",
                        "pattern": "^[a-z0-9_-]{1,64}$"}},
                    {"name": "limit", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 100}},
                ],
                "responses": {"200": ok("ProductList"), "400": error("Invalid query parameter"),
                              "401": error("Missing or wrong admin token")},
            }},
            "/v1/payments/unmatched": {"get": {
                "operationId": "listUnmatchedPayments",
                "summary": "Paid purchases and live subscriptions that match no registered product \
                            and therefore grant nothing (ADMIN_API_TOKEN).",
                "security": admin,
                "responses": {"200": {"description": "OK", "content": {"application/json": {"schema":
                    {"type": "array", "items": {"$ref": "#/components/schemas/UnmatchedPayment"}}}}},
                              "401": error("Missing or wrong admin token")},
            }},
            "/v1/payments/duplicates": {"get": {
                "operationId": "listDuplicatePayments",
                "summary": "The newest 200 second payments for something the user already owned, \
                            whose money has not come back: each a purchase of its own, to refund \
                            (ADMIN_API_TOKEN).",
                "security": admin,
                "responses": {"200": {"description": "OK", "content": {"application/json": {"schema":
                    {"type": "array", "items": {"allOf": [
                        {"$ref": "#/components/schemas/Purchase"},
                        {"type": "object", "required": ["userId"],
                         "properties": {"userId": {"type": "string"}}}]}}}}},
                              "401": error("Missing or wrong admin token")},
            }},
            "/openapi.json": {"get": {
                "operationId": "openapi",
                "summary": "This document.",
                "security": [],
                "responses": {"200": {"description": "OpenAPI document",
                                      "content": {"application/json": {}}}},
            }},
        },
        "components": {
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "adminToken": {"type": "http", "scheme": "bearer"},
            },
            "schemas": schemas(),
        },
    })
}

fn schemas() -> Value {
    let status = json!({"type": "string",
        "enum": ["active", "past_due", "suspended", "revoked", "expired", "none"]});
    let time = json!({"type": "string", "format": "date-time"});
    let nullable_time = json!({"type": ["string", "null"], "format": "date-time"});
    let nullable_int = json!({"type": ["integer", "null"]});
    let nullable_str = json!({"type": ["string", "null"]});
    json!({
        "Error": {"type": "object", "required": ["error", "message"],
                  "properties": {"error": {"type": "string"}, "message": {"type": "string"},
                                 "field": {"type": "string"}}},
        // `registry::ProductInput::validate`'s rules, each one here: an amount with its currency,
        // or a price, or both; a subscription needs a price. The fees' sum (at most
        // 10000) is the one rule JSON Schema cannot state; the description says it.
        "ProductInput": {"type": "object", "additionalProperties": false,
            "description": "platformFeeBps + organizationFeeBps may not exceed 10000 (422, field organizationFeeBps).",
            "properties": {
                "title": {"type": "string", "maxLength": 200},
                "amountCents": {"type": "integer", "minimum": 0, "maximum": 99_999_999},
                "currency": {"type": "string", "pattern": "^[A-Za-z]{3}$"},
                "priceId": {"type": "string", "pattern": "^price_[A-Za-z0-9_]{1,249}$"},
                "mode": {"type": "string", "enum": ["payment", "subscription"]},
                "grants": {"type": "array", "minItems": 1, "maxItems": 20,
                           "items": {"type": "string", "pattern": "^[!-~]{1,100}$"}},
                "featureLookupKey": {"type": "string", "pattern": "^[!-~]{1,80}$"},
                "creatorId": {"type": "string", "pattern": "^[!-~]{1,200}$"},
                "platformFeeBps": {"type": "integer", "minimum": 0, "maximum": 10000},
                "organizationFeeBps": {"type": "integer", "minimum": 0, "maximum": 10000},
                "status": {"type": "string", "enum": ["published", "unpublished"]}},
            "allOf": [
                {"anyOf": [
                    {"required": ["amountCents", "currency"]},
                    {"required": ["priceId"],
                     "not": {"anyOf": [{"required": ["amountCents"]}, {"required": ["currency"]}]}}]},
                {"anyOf": [
                    {"required": ["priceId"]},
                    {"not": {"required": ["mode"], "properties": {"mode": {"const": "subscription"}}}}]}]},
        "Product": {"type": "object", "required": ["key", "mode", "grants", "status"], "properties": {
            "key": {"type": "string"}, "title": nullable_str, "amountCents": nullable_int,
            "currency": nullable_str, "priceId": nullable_str,
            "mode": {"type": "string", "enum": ["payment", "subscription"]},
            "grants": {"type": "array", "items": {"type": "string"}}, "creatorId": nullable_str,
            "platformFeeBps": {"type": "integer"}, "organizationFeeBps": {"type": "integer"},
            "status": {"type": "string", "enum": ["published", "unpublished"]},
            "retiredPriceIds": {"type": "array", "items": {"type": "string"},
                "description": "Prices it was sold at before priceId; they still resolve to it"},
            "retiredAmounts": {"type": "array", "items": {"type": "object",
                "required": ["amountCents", "currency"], "properties": {
                    "amountCents": {"type": "integer"}, "currency": {"type": "string"}}},
                "description": "Amounts it was sold at before amountCents; they still resolve to it"}}},
        "ProductList": {"type": "object", "required": ["data", "nextAfter"], "properties": {
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/Product"}},
            "nextAfter": nullable_str}},
        "UnmatchedPayment": {"type": "object", "properties": {
            "kind": {"type": "string", "enum": ["purchase", "subscription"]},
            "id": {"type": "string"}, "userId": nullable_str, "customerId": nullable_str,
            "productKey": nullable_str, "priceId": nullable_str, "amountCents": nullable_int,
            "currency": nullable_str, "status": {"type": "string"}}},
        "ProEntitlement": {"type": "object",
            "required": ["userId", "isPro", "status", "source", "expiresAt", "updatedAt"],
            "properties": {
                "userId": {"type": "string"}, "isPro": {"type": "boolean"}, "status": status,
                "source": {"type": ["string", "null"], "enum": ["purchase", "subscription", null]},
                "expiresAt": nullable_time, "updatedAt": nullable_time,
                "sources": {"type": "array", "items": {"$ref": "#/components/schemas/Source"}}}},
        "Source": {"type": "object", "required": ["source", "sourceId", "status", "expiresAt"],
            "description": "One row granting the entitlement, best first; `quantity` is a \
                            subscription's seats.",
            "properties": {
                "source": {"type": "string", "enum": ["purchase", "subscription", "stripe_feature"]},
                "sourceId": {"type": "string"},
                "status": {"type": "string",
                           "enum": ["active", "past_due", "suspended", "revoked", "expired"]},
                "expiresAt": nullable_time, "quantity": {"type": "integer"},
                "organizationId": {"type": "string",
                    "description": "The organisation through which the caller holds this source"}}},
        "CheckoutOutcome": {"type": "object",
            "required": ["sessionId", "productKey", "payer", "status", "granted", "entitlements"],
            "properties": {
                "sessionId": {"type": "string"}, "productKey": {"type": "string"},
                "payer": {"type": "string"},
                "status": {"type": "string", "enum": ["open", "complete", "expired"]},
                "granted": {"type": "boolean"},
                "entitlements": {"type": "array", "items": {"$ref": "#/components/schemas/Entitlement"}}}},
        "MemberInput": {"type": "object", "additionalProperties": false, "required": ["version"],
            "properties": {
                "role": {"type": "string", "enum": ["admin", "member"], "default": "member"},
                "version": {"type": "integer", "minimum": 0, "maximum": i64::MAX},
                "joinedAt": {"type": "string", "format": "date-time"}}},
        "Member": {"type": "object",
            "required": ["organizationId", "userId", "role", "joinedAt", "version", "removed", "seat"],
            "properties": {
                "organizationId": {"type": "string"}, "userId": {"type": "string"},
                "role": {"type": "string", "enum": ["admin", "member"]}, "joinedAt": time,
                "version": {"type": "integer"}, "removed": {"type": "boolean"},
                "seat": {"type": ["integer", "null"],
                         "description": "Place among the members by join time, from 0 (null once removed)"}}},
        "Organization": {"type": "object", "required": ["organizationId", "members", "entitlements"],
            "properties": {
                "organizationId": {"type": "string"},
                "members": {"type": "array", "items": {"$ref": "#/components/schemas/Member"}},
                "entitlements": {"type": "array", "items": {"$ref": "#/components/schemas/Entitlement"}}}},
        "Entitlement": {"type": "object",
            "required": ["key", "status", "active", "source", "expiresAt", "updatedAt"],
            "properties": {
                "key": {"type": "string"}, "status": status, "active": {"type": "boolean"},
                "source": {"type": "string", "enum": ["purchase", "subscription"]},
                "expiresAt": nullable_time, "updatedAt": time,
                "sources": {"type": "array", "items": {"$ref": "#/components/schemas/Source"}}}},
        "EntitlementList": {"type": "object", "required": ["userId", "entitlements"],
            "properties": {"userId": {"type": "string"}, "entitlements":
                {"type": "array", "items": {"$ref": "#/components/schemas/Entitlement"}}}},
        "AccessAllowed": {"type": "object", "required": ["allowed"],
            "properties": {"allowed": {"const": true}}},
        "AccessDenied": {"type": "object", "required": ["allowed", "reason"],
            "properties": {"allowed": {"const": false}, "reason":
                {"type": "string", "enum": ["none", "expired", "revoked", "suspended"]}}},
        "Purchase": {"type": "object", "properties": {
            "id": {"type": "integer"}, "productKey": nullable_str, "title": nullable_str,
            "status": {"type": "string", "enum": STATUSES},
            "amountPaidCents": nullable_int, "currency": nullable_str,
            "platformFeeCents": nullable_int, "organizationFeeCents": nullable_int,
            "creatorPayoutCents": nullable_int, "checkoutSessionId": nullable_str,
            "paymentIntentId": nullable_str, "purchasedAt": nullable_time,
            "refundedAt": nullable_time, "refundAmountCents": {"type": "integer"},
            "refundReason": nullable_str, "createdAt": time,
            "duplicate": {"type": "boolean", "description": "A second payment for something the \
                user already owned when it was paid: a purchase of its own"}}},
        "PurchasePage": {"type": "object", "required": ["data", "pagination"], "properties": {
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/Purchase"}},
            "pagination": {"type": "object",
                "required": ["page", "pageSize", "totalCount", "totalPages"],
                "properties": {"page": {"type": "integer"}, "pageSize": {"type": "integer"},
                               "totalCount": {"type": "integer"}, "totalPages": {"type": "integer"}}}}},
        "CheckoutSession": {"type": "object", "required": ["sessionId", "url", "expiresAt"],
            "properties": {"sessionId": {"type": "string"}, "url": {"type": "string"},
                           "expiresAt": time}},
        "PortalSession": {"type": "object", "required": ["url"],
            "properties": {"url": {"type": "string"}}},
        "RestoreResult": {"type": "object", "required": ["restored", "entitlement"],
            "properties": {"restored": {"type": "boolean"},
                           "entitlement": {"$ref": "#/components/schemas/ProEntitlement"}}},
    })
}

pub(crate) async fn serve_document() -> Json<Value> {
    Json(document())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_document_lists_exactly_the_routes_of_the_router() {
        let doc = document();
        let documented: BTreeSet<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, ops)| {
                ops.as_object()
                    .unwrap()
                    .keys()
                    .map(|m| (m.to_uppercase(), path.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let routed: BTreeSet<(String, String)> = crate::api::routes()
            .iter()
            .map(|r| (r.method.as_str().to_owned(), r.path.to_owned()))
            .collect();
        assert_eq!(documented, routed);
    }

    #[test]
    fn every_schema_reference_resolves() {
        let doc = document();
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for part in text.split("#/components/schemas/").skip(1) {
            let name: String = part.chars().take_while(|c| c.is_alphanumeric()).collect();
            assert!(schemas.contains_key(&name), "{name} is not defined");
        }
    }
}
