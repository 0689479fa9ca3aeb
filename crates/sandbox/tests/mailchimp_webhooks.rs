//! Webhook registration and delivery retries of the Mailchimp emulator, against a local receiver.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use optout_sandbox::{Sandbox, SandboxConfig};

#[derive(Clone, Default)]
struct Received {
    posts: Arc<Mutex<Vec<(String, String)>>>,
    validations: Arc<Mutex<Vec<String>>>,
}

async fn receiver(received: Received) -> anyhow::Result<String> {
    let on_get = {
        let received = received.clone();
        move |headers: HeaderMap| async move {
            let agent = headers
                .get("user-agent")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            received.validations.lock().expect("lock").push(agent);
            StatusCode::OK
        }
    };
    let on_post = move |headers: HeaderMap, body: String| async move {
        let agent = headers
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let mut posts = received.posts.lock().expect("lock");
        posts.push((agent, body));
        // Refuse the first delivery so the emulator has to retry it.
        if posts.len() == 1 {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let app = Router::new().route("/hook", get(on_get).post(on_post));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{address}/hook"))
}

#[tokio::test]
async fn retries_a_refused_webhook_delivery_until_it_is_accepted() -> anyhow::Result<()> {
    let sandbox = Sandbox::start(SandboxConfig {
        members: 50,
        audiences: 1,
        ..SandboxConfig::default()
    })
    .await?;
    let info = sandbox.info().clone();
    let list_id = &info.audiences[0];
    let received = Received::default();
    let url = receiver(received.clone()).await?;
    let http = reqwest::Client::new();
    let auth = |request: reqwest::RequestBuilder| {
        request.basic_auth("user", Some(&info.mailchimp_api_key))
    };

    let hook: serde_json::Value = auth(
        http.post(format!("{}/lists/{list_id}/webhooks", info.mailchimp_url)),
    )
    .json(
        &serde_json::json!({"url": url, "events": {"unsubscribe": true}, "sources": {"api": true}}),
    )
    .send()
    .await?
    .error_for_status()?
    .json()
    .await?;
    assert_eq!(
        hook["events"]["subscribe"], false,
        "events given explicitly are exactly those"
    );
    assert_eq!(
        received.validations.lock().expect("lock").as_slice(),
        ["MailChimp.com WebHook Validator"]
    );

    let page: serde_json::Value =
        auth(http.get(format!("{}/lists/{list_id}/members", info.mailchimp_url)))
            .query(&[("status", "subscribed"), ("count", "1")])
            .send()
            .await?
            .json()
            .await?;
    let member_id = page["members"][0]["id"]
        .as_str()
        .context("a subscribed member")?;
    let email = page["members"][0]["email_address"]
        .as_str()
        .context("email")?;
    auth(http.patch(format!(
        "{}/lists/{list_id}/members/{member_id}",
        info.mailchimp_url
    )))
    .json(&serde_json::json!({"status": "unsubscribed"}))
    .send()
    .await?
    .error_for_status()?;

    let deadline = Instant::now() + Duration::from_secs(15);
    let posts = loop {
        let posts = received.posts.lock().expect("lock").clone();
        if posts.len() >= 2 {
            break posts;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "expected a retried delivery, got {}",
            posts.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(posts[0].1, posts[1].1, "the retry carries the same payload");
    let form: Vec<(String, String)> = serde_urlencoded::from_str(&posts[1].1)?;
    let field = |key: &str| form.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    assert_eq!(posts[1].0, "MailChimp.com");
    assert_eq!(field("type"), Some("unsubscribe"));
    assert_eq!(field("data[action]"), Some("unsub"));
    assert_eq!(field("data[email]"), Some(email));
    assert_eq!(field("data[merges][EMAIL]"), Some(email));
    assert_eq!(field("data[list_id]"), Some(list_id.as_str()));
    sandbox.shutdown().await;
    Ok(())
}
