//! A registration whose `user.created` Kafka does not acknowledge: it may be stored all the same,
//! so its names stay reserved and nobody else registers them meanwhile.
//!
//! Kept in its own test binary because it stops the shared Kafka: cargo runs test binaries one
//! after another, so no other test sees the broker go away.

mod common;

use common::TestEnv;
use pipeline::app::Role;
use serde_json::{json, Value};

async fn register(base: &str, username: &str, tenant: &str) -> (u16, Value) {
    let body = json!({
        "username": username,
        "email": format!("{username}@example.com"),
        "password": "correct-horse-battery",
        "tenant": tenant,
    });
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/auth/register"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_registration_keeps_its_names_from_strangers() {
    let env = TestEnv::new("regoutage").await;
    let node = env.start(&[Role::Api]).await;
    let base = format!("http://{}", node.api_addr.unwrap());
    // The node's producer is connected before the broker goes away.
    let (s, v) = register(&base, "warm", "warmco").await;
    assert_eq!(s, 201, "{v}");
    let outage = tokio::task::block_in_place(|| common::Outage::begin("kafka"));
    let (s, v) = register(&base, "ann", "annco").await;
    assert_eq!(s, 503, "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("try logging in"), "{v}");
    // Had Kafka stored the event, the account would appear: until the reservation lapses, its
    // tenant, name and address are nobody else's.
    let (s, v) = register(&base, "mallory", "annco").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("tenant_taken")),
        "{v}"
    );
    let (s, v) = register(&base, "ann", "otherco").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("username_taken")),
        "{v}"
    );
    tokio::task::block_in_place(|| outage.end());
    node.stop().await.unwrap();
    env.cleanup().await;
}
