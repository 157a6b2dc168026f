//! Organisations through the real services: a team plan bought by an organisation's admin (the
//! API against the Stripe-shaped fake), its events published to the broker in shuffled orders
//! with duplicates and consumed by a worker, members named through the admin routes, and every
//! member's access read back through the entitlement API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{Value, json};
use system_tests::api::{ADMIN_TOKEN, SECRET, exp, sign};
use system_tests::scenarios::team_event;
use system_tests::stack::Stack;
use system_tests::stripe_fake::FakeStripe;
use system_tests::unique;

/// The organisation routes and member reads of the [`Stack`].
trait Organizations {
    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value);
    async fn join(&self, org: &str, user: &str, role: &str, version: i64, joined: i64) -> u16;
    async fn leave(&self, org: &str, user: &str, version: i64) -> u16;
    async fn team(&self, user: &str) -> (String, Option<String>);
    async fn may_use_team(&self, user: &str) -> bool;
}

impl Organizations for Stack {
    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.api
            .send(method, path, Some(&format!("Bearer {ADMIN_TOKEN}")), body)
            .await
    }

    /// `PUT` member `user` of `org` at `version`.
    async fn join(&self, org: &str, user: &str, role: &str, version: i64, joined: i64) -> u16 {
        let body = json!({"role": role, "version": version,
                          "joinedAt": chrono::DateTime::from_timestamp(joined, 0).unwrap()});
        let path = format!("/v1/organizations/{org}/members/{user}");
        self.admin(Method::PUT, &path, Some(body)).await.0
    }

    async fn leave(&self, org: &str, user: &str, version: i64) -> u16 {
        let path = format!("/v1/organizations/{org}/members/{user}?version={version}");
        self.admin(Method::DELETE, &path, None).await.0
    }

    /// The status of `user`'s `team` entitlement, and the organisation its best source names.
    async fn team(&self, user: &str) -> (String, Option<String>) {
        let (status, body) = self.api.get("/api/entitlements", user).await;
        assert_eq!(status, 200, "{body}");
        let team = body["entitlements"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["key"] == "team");
        match team {
            None => ("none".into(), None),
            Some(e) => (
                e["status"].as_str().unwrap().to_owned(),
                e["sources"][0]["organizationId"]
                    .as_str()
                    .map(str::to_owned),
            ),
        }
    }

    /// Whether `user` may use `team` now (`GET /api/access/team`).
    async fn may_use_team(&self, user: &str) -> bool {
        let (status, _) = self.api.get("/api/access/team", user).await;
        status == 200
    }
}

/// `event` with its subscription's seats set to `quantity`.
fn with_seats(mut event: Value, quantity: i64) -> Value {
    if let Some(item) = event.pointer_mut("/data/object/items/data/0") {
        item["quantity"] = json!(quantity);
    }
    event
}

/// The events of an organisation's `team` subscription: created with `seats`, paid, then each
/// `(day, seats)` change, then (when `ends`) deleted.
fn team_history(
    org: &str,
    object: &str,
    t0: i64,
    changes: &[(i64, i64)],
    ends: Option<i64>,
) -> Vec<Value> {
    let subject = format!("org:{org}");
    let day = 86_400;
    let first = changes.first().map_or(1, |c| c.1);
    let mut events = vec![
        with_seats(
            team_event(&subject, object, "customer.subscription.created", t0),
            first,
        ),
        team_event(&subject, object, "invoice.paid", t0 + 1),
    ];
    for (at, seats) in changes.iter().skip(1) {
        events.push(with_seats(
            team_event(
                &subject,
                object,
                "customer.subscription.updated",
                t0 + at * day,
            ),
            *seats,
        ));
    }
    if let Some(at) = ends {
        events.push(team_event(
            &subject,
            object,
            "customer.subscription.deleted",
            t0 + at * day,
        ));
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_plan_bought_by_an_organisations_admin_reaches_its_members_within_its_seats() {
    let stack = Stack::start(Some(FakeStripe::start().await)).await;
    let org = unique("acme");
    let [admin, first, second, third] = ["admin", "first", "second", "third"].map(unique);
    let t0 = chrono::Utc::now().timestamp() - 3 * 86_400;
    for (i, (user, role)) in [
        (&admin, "admin"),
        (&first, "member"),
        (&second, "member"),
        (&third, "member"),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(stack.join(&org, user, role, 1, t0 + i as i64).await, 200);
    }

    // Who may buy for it: its admin, or a token that says the caller bills for it.
    let buy = json!({"productKey": "team", "organizationId": org});
    let (status, body) = stack
        .api
        .post("/api/checkout/session", &first, Some(buy.clone()))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    let billing = format!(
        "Bearer {}",
        sign(
            &json!({"sub": first, "exp": exp(600), "org_id": org, "org_role": "billing"}),
            SECRET
        )
    );
    let (status, body) = stack
        .api
        .send(
            Method::POST,
            "/api/checkout/session",
            Some(&billing),
            Some(buy.clone()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = stack
        .api
        .post("/api/checkout/session", &admin, Some(buy))
        .await;
    assert_eq!(status, 200, "{body}");
    let session = stack
        .stripe
        .as_ref()
        .unwrap()
        .requests_to("/v1/checkout/sessions")
        .pop()
        .unwrap();
    assert_eq!(
        session.param("metadata[user_id]"),
        Some(format!("org:{org}").as_str())
    );
    assert_eq!(
        session.param("client_reference_id"),
        Some(format!("org:{org}").as_str())
    );
    let customer = session.param("customer").unwrap().to_owned();
    assert_eq!(
        stack
            .api
            .count(&format!(
                "SELECT count(*) FROM customers WHERE customer_id = '{customer}' AND user_id = 'org:{org}'"
            ))
            .await,
        1,
        "the Stripe customer is the organisation's"
    );

    // Restore and the portal act for it the same way.
    let for_org = json!({"organizationId": org});
    let (status, body) = stack
        .api
        .post("/api/pro/restore", &second, Some(for_org.clone()))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    let (status, body) = stack
        .api
        .post("/api/pro/restore", &admin, Some(for_org.clone()))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entitlement"]["userId"], format!("org:{org}"));
    let (status, body) = stack
        .api
        .post("/api/billing/portal", &admin, Some(for_org))
        .await;
    assert_eq!(status, 200, "{body}");
    let portal = stack
        .stripe
        .as_ref()
        .unwrap()
        .requests_to("/v1/billing_portal/sessions")
        .pop()
        .unwrap();
    assert_eq!(portal.param("customer"), Some(customer.as_str()));

    // The subscription, two seats: the admin and the first member hold them.
    let object = unique("team");
    let history = team_history(&org, &object, t0, &[(0, 2)], None);
    for event in &history {
        stack.publish(event).await;
    }
    stack.wait_all(&history).await;
    assert_eq!(
        stack.team(&admin).await,
        ("active".into(), Some(org.clone()))
    );
    assert_eq!(
        stack.team(&first).await,
        ("active".into(), Some(org.clone()))
    );
    assert_eq!(stack.team(&second).await.0, "none");
    assert!(!stack.may_use_team(&third).await);
    // The organisation's own view, and its message to the app naming its members by seat.
    let (status, view) = stack
        .admin(Method::GET, &format!("/v1/organizations/{org}"), None)
        .await;
    assert_eq!(status, 200, "{view}");
    let seats: Vec<&str> = view["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["userId"].as_str().unwrap())
        .collect();
    assert_eq!(seats, [&admin, &first, &second, &third]);

    // A third seat bought in the portal goes to the next member by join time.
    let more = team_history(&org, &object, t0, &[(0, 2), (1, 3)], None).split_off(2);
    for event in &more {
        stack.publish(event).await;
    }
    stack.wait_all(&more).await;
    assert!(stack.may_use_team(&second).await);
    assert!(!stack.may_use_team(&third).await);

    // A member removed loses it; the seat moves on. A late write of an older version changes
    // nothing.
    assert_eq!(stack.leave(&org, &first, 2).await, 200);
    assert_eq!(stack.team(&first).await.0, "none");
    assert!(stack.may_use_team(&third).await);
    assert_eq!(stack.join(&org, &first, "member", 1, t0 + 1).await, 409);
    assert_eq!(
        stack.leave(&org, &first, 2).await,
        200,
        "the same write again"
    );
    assert!(!stack.may_use_team(&first).await);

    // The subscription's end ends it for all.
    let end = vec![team_event(
        &format!("org:{org}"),
        &object,
        "customer.subscription.deleted",
        t0 + 2 * 86_400,
    )];
    stack.publish(&end[0]).await;
    stack.wait_all(&end).await;
    for user in [&admin, &first, &second, &third] {
        assert!(!stack.may_use_team(user).await, "{user}");
    }
    // The app was told, per organisation, with its members.
    let announced = stack
        .api
        .count(&format!(
            "SELECT count(*) FROM outbox WHERE user_id = 'org:{org}' AND type = 'entitlements.changed'
               AND body->>'organizationId' = '{org}' AND jsonb_array_length(body->'members') >= 1"
        ))
        .await;
    assert!(announced >= 3, "{announced}");
    stack.stop().await;
}

/// One step of an organisation's life: a membership write or a Stripe event.
#[derive(Debug, Clone)]
enum Step {
    Join {
        user: usize,
        version: i64,
        joined: i64,
    },
    Leave {
        user: usize,
        version: i64,
    },
    Event(Value),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_writes_and_payment_events_end_the_same_in_any_order() {
    let stack = Stack::start(Some(FakeStripe::start().await)).await;
    let t0 = chrono::Utc::now().timestamp() - 5 * 86_400;
    for seed in 0..4_u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let org = unique("org");
        let users: Vec<String> = (0..5).map(|i| unique(&format!("m{i}"))).collect();
        // Each user joins at version 1 (a time of their own); some leave at version 2, and one
        // of those rejoins at 3 with a later time.
        let mut steps = Vec::new();
        let mut expected_members: BTreeMap<i64, usize> = BTreeMap::new();
        for (i, _) in users.iter().enumerate() {
            let joined = t0 + rng.random_range(0..1000);
            steps.push(Step::Join {
                user: i,
                version: 1,
                joined,
            });
            match i % 3 {
                0 => steps.push(Step::Leave {
                    user: i,
                    version: 2,
                }),
                1 if i == 1 => {
                    steps.push(Step::Leave {
                        user: i,
                        version: 2,
                    });
                    steps.push(Step::Join {
                        user: i,
                        version: 3,
                        joined: t0 + 5000,
                    });
                    expected_members.insert(t0 + 5000, i);
                }
                _ => {
                    expected_members.insert(joined, i);
                }
            }
        }
        let seats = rng.random_range(1..4_i64);
        let object = unique("team");
        let events = team_history(&org, &object, t0, &[(0, 1), (1, seats)], None);
        steps.extend(events.iter().cloned().map(Step::Event));
        // Duplicates of a third of everything, then any order.
        let copies: Vec<Step> = steps.iter().step_by(3).cloned().collect();
        steps.extend(copies);
        steps.shuffle(&mut rng);
        for step in &steps {
            match step {
                Step::Join {
                    user,
                    version,
                    joined,
                } => {
                    let status = stack
                        .join(&org, &users[*user], "member", *version, *joined)
                        .await;
                    assert!(status == 200 || status == 409, "{status}");
                }
                Step::Leave { user, version } => {
                    let status = stack.leave(&org, &users[*user], *version).await;
                    assert!(status == 200 || status == 409, "{status}");
                }
                Step::Event(event) => stack.publish(event).await,
            }
        }
        stack.wait_all(&events).await;
        // The first `seats` current members by join time hold the plan; nobody else does.
        let holders: Vec<usize> = expected_members
            .values()
            .copied()
            .take(seats as usize)
            .collect();
        for (i, user) in users.iter().enumerate() {
            let expected = holders.contains(&i);
            let got = stack.may_use_team(user).await;
            assert_eq!(
                got, expected,
                "seed {seed}: member {i} ({seats} seats, holders {holders:?})"
            );
        }
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_routes_refuse_bad_input_and_tokens_cannot_speak_as_an_organisation() {
    let stack = Stack::start(Some(FakeStripe::start().await)).await;
    let org = unique("acme");
    let user = unique("u");
    for (path, body) in [
        (
            format!("/v1/organizations/{org}/members/{user}"),
            json!({"version": -1}),
        ),
        (
            format!("/v1/organizations/{org}/members/{user}"),
            json!({"version": 1, "role": "owner"}),
        ),
        (
            format!("/v1/organizations/{org}/members/org:{user}"),
            json!({"version": 1}),
        ),
    ] {
        let (status, body) = stack.admin(Method::PUT, &path, Some(body)).await;
        assert!(status == 422 || status == 400, "{path}: {status} {body}");
    }
    let (status, _) = stack
        .api
        .send(
            Method::PUT,
            &format!("/v1/organizations/{org}/members/{user}"),
            Some("Bearer wrong"),
            Some(json!({"version": 1})),
        )
        .await;
    assert_eq!(status, 401);
    let (status, _) = stack
        .admin(
            Method::DELETE,
            &format!("/v1/organizations/{org}/members/{user}"),
            None,
        )
        .await;
    assert_eq!(status, 400, "a removal names its version");
    assert_eq!(
        stack
            .api
            .count(&format!(
                "SELECT count(*) FROM organization_members WHERE organization_id = '{org}'"
            ))
            .await,
        0,
        "nothing was written"
    );
    // A token whose subject is shaped as an organisation is refused.
    let forged = format!(
        "Bearer {}",
        sign(
            &json!({"sub": format!("org:{org}"), "exp": exp(600)}),
            SECRET
        )
    );
    let (status, _) = stack
        .api
        .send(Method::GET, "/api/entitlements", Some(&forged), None)
        .await;
    assert_eq!(status, 401);
    stack.stop().await;
}
