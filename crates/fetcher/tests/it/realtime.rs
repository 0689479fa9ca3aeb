//! The real-time paths against the in-process sandbox, a real RabbitMQ and PostgreSQL: Mailchimp
//! webhooks on the HTTP port, the Memberships API over HTTP JSON and gRPC, and imports.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use optout_fetcher::{Config, SyncRequest};
use optout_mailchimp::MemberStatus;
use optout_proto::memberships::v1::{
    GetMembershipsRequest, SubscribeRequest, UnsubscribeRequest,
    memberships_client::MembershipsClient,
};
use optout_proto::queue::v1::{self as queue, MembersChanged, Source};
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, transport::Channel};

use crate::helpers::{AMQP_URL, DATABASE_URL, TestApp, eventually};

const ADMIN_TOKEN: &str = "realtime-admin-token";
const API_TOKEN: &str = "realtime-api-token";
const SECRET: &str = "webhook-secret-0123456789";

/// The fetcher served in-process on ephemeral ports.
struct Service {
    grpc: SocketAddr,
    http: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<optout_fetcher::Result<()>>,
    web: reqwest::Client,
}

impl Service {
    async fn start(app: &TestApp, extra: &[&str]) -> Result<Self> {
        let grpc_listener = TcpListener::bind("127.0.0.1:0").await?;
        let http_listener = TcpListener::bind("127.0.0.1:0").await?;
        let grpc = grpc_listener.local_addr()?;
        let http = http_listener.local_addr()?;
        let info = app.sandbox.info();
        let public_url = format!("http://{http}");
        let ca_file = info.salesforce_ca_file.display().to_string();
        let mut args: Vec<String> = [
            "optout-fetcher",
            "--mailchimp-api-key",
            &info.mailchimp_api_key,
            "--mailchimp-url",
            &info.mailchimp_url,
            "--sync-interval-secs",
            "0",
            "--amqp-url",
            AMQP_URL,
            "--queue-prefix",
            &app.topology.prefix,
            "--persons-partitions",
            "1",
            "--database-url",
            DATABASE_URL,
            "--database-schema",
            &app.schema_prefix,
            "--admin-token",
            ADMIN_TOKEN,
            "--api-token",
            API_TOKEN,
            "--webhook-secret",
            SECRET,
            "--salesforce-login-url",
            &info.salesforce_login_url,
            "--salesforce-client-id",
            &info.salesforce_client_id,
            "--salesforce-client-secret",
            &info.salesforce_client_secret,
            "--salesforce-ca-file",
            &ca_file,
        ]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect();
        for arg in extra {
            args.push(arg.replace("{public_url}", &public_url));
        }
        let config = Config::try_parse_from(args)?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(optout_fetcher::serve_with_http(
            config,
            grpc_listener,
            http_listener,
            shutdown.clone(),
        ));
        let service = Self {
            grpc,
            http,
            shutdown,
            task,
            web: reqwest::Client::new(),
        };
        // Ready once the API answers something other than 503 (starting).
        eventually(Duration::from_secs(30), "the fetcher to be ready", || {
            let request = service
                .web
                .get(service.url("/api/v1/memberships?email=ready@example.com"))
                .bearer_auth(API_TOKEN)
                .send();
            async move { Ok(request.await?.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE) }
        })
        .await?;
        Ok(service)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    fn webhook_url(&self, secret: &str) -> String {
        self.url(&format!("/webhooks/mailchimp/{secret}"))
    }

    async fn post_webhook(&self, secret: &str, body: &str) -> Result<reqwest::StatusCode> {
        Ok(self
            .web
            .post(self.webhook_url(secret))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_owned())
            .send()
            .await?
            .status())
    }

    async fn api(&self, path: &str, body: Value) -> Result<(reqwest::StatusCode, Value)> {
        let response = self
            .web
            .post(self.url(path))
            .bearer_auth(API_TOKEN)
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }

    async fn grpc(&self, token: &'static str) -> Result<Memberships> {
        let channel = Channel::from_shared(format!("http://{}", self.grpc))?
            .connect()
            .await?;
        Ok(MembershipsClient::with_interceptor(channel, Bearer(token)))
    }

    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("fetcher did not stop")???;
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct Bearer(&'static str);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, tonic::Status> {
        let value = format!("Bearer {}", self.0)
            .parse()
            .map_err(|_| tonic::Status::internal("bad header"))?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

type Memberships =
    MembershipsClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// (audience, email) pairs of members with `status`.
async fn members_with(app: &TestApp, status: MemberStatus) -> Result<Vec<(String, String)>> {
    Ok(app
        .all_members()
        .await?
        .into_iter()
        .filter(|(_, member_status)| *member_status == status)
        .map(|(key, _)| key)
        .collect())
}

async fn status_in(app: &TestApp, audience: &str, email: &str) -> Result<Option<MemberStatus>> {
    match app.client.member(audience, email).await {
        Ok(member) => Ok(Some(member.status)),
        Err(optout_mailchimp::Error::NotFound { .. }) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// Drains members.changed until `wanted` holds for the messages gathered, or the deadline passes.
async fn published_until(
    app: &TestApp,
    what: &str,
    wanted: impl Fn(&[MembersChanged]) -> bool,
) -> Result<Vec<MembersChanged>> {
    let mut messages = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        messages.extend(app.drain_members_changed().await?);
        if wanted(&messages) {
            return Ok(messages);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}; got {messages:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn has_snapshot(
    messages: &[MembersChanged],
    source: Source,
    email: &str,
    status: queue::MemberStatus,
) -> bool {
    messages.iter().any(|message| {
        message.source == source as i32
            && message.members.iter().any(|member| {
                member.email.eq_ignore_ascii_case(email) && member.status == status as i32
            })
    })
}

#[tokio::test]
async fn webhook_endpoint_refuses_wrong_secrets_and_malformed_bodies_and_acknowledges_unknown_audiences()
-> Result<()> {
    let app = TestApp::start(71).await?;
    let service = Service::start(&app, &[]).await?;
    let audience = app.audiences()[0].clone();
    let good = format!(
        "type=unsubscribe&fired_at=2026-01-02+03%3A04%3A05&data%5Baction%5D=unsub&data%5Blist_id%5D={audience}\
         &data%5Bemail%5D=someone%40example.com&data%5Bmerges%5D%5BEMAIL%5D=someone%40example.com"
    );

    // Mailchimp's validation ping.
    let ping = service.web.get(service.webhook_url(SECRET)).send().await?;
    assert_eq!(ping.status(), reqwest::StatusCode::OK);
    // Wrong secrets: 404 for the ping and the delivery, and nothing published.
    let wrong = service
        .web
        .get(service.webhook_url("not-the-secret"))
        .send()
        .await?;
    assert_eq!(wrong.status(), reqwest::StatusCode::NOT_FOUND);
    assert_eq!(
        service
            .post_webhook("webhook-secret-012345678", &good)
            .await?,
        reqwest::StatusCode::NOT_FOUND
    );
    // Malformed: 400, nothing published.
    for body in [
        "",
        "type=unsubscribe&fired_at=2026-01-02+03%3A04%3A05&data%5Bemail%5D=a%40b.c",
        "type=subscribe&fired_at=yesterday&data%5Blist_id%5D=x&data%5Bemail%5D=a%40b.c",
    ] {
        assert_eq!(
            service.post_webhook(SECRET, body).await?,
            reqwest::StatusCode::BAD_REQUEST,
            "{body:?}"
        );
    }
    let oversized = format!("type=profile&data[x]={}", "a".repeat(70 * 1024));
    assert!(
        service
            .post_webhook(SECRET, &oversized)
            .await?
            .is_client_error(),
        "an oversized body is refused"
    );
    // Unknown audience and unknown event types: acknowledged, nothing published.
    let unknown = good.replace(&audience, "ffffffffff");
    assert_eq!(
        service.post_webhook(SECRET, &unknown).await?,
        reqwest::StatusCode::OK
    );
    assert_eq!(
        service
            .post_webhook(
                SECRET,
                &format!(
                    "type=campaign&fired_at=2026-01-02+03%3A04%3A05&data%5Blist_id%5D={audience}"
                )
            )
            .await?,
        reqwest::StatusCode::OK
    );
    assert!(
        app.drain_members_changed().await?.is_empty(),
        "refused or ignored webhooks published something"
    );

    // The good one is published, confirmed before the answer, at fired_at.
    assert_eq!(
        service.post_webhook(SECRET, &good).await?,
        reqwest::StatusCode::OK
    );
    let messages = app.drain_members_changed().await?;
    assert_eq!(messages.len(), 1, "{messages:?}");
    let message = &messages[0];
    assert_eq!(message.source, Source::Webhook as i32);
    assert_eq!(message.audience_id, audience);
    assert!(
        message.first_sync,
        "no sync completed yet: still a first sync"
    );
    assert_eq!(
        message.members[0].status,
        queue::MemberStatus::Unsubscribed as i32
    );
    assert_eq!(
        message.members[0]
            .last_changed
            .as_ref()
            .map(|time| time.seconds),
        Some(chrono::DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z")?.timestamp())
    );
    service.stop().await?;
    app.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn the_public_port_limits_request_rates_and_head_sizes() -> Result<()> {
    let app = TestApp::start(73).await?;
    let service = Service::start(
        &app,
        &["--api-rate-limit", "2", "--webhook-rate-limit", "0"],
    )
    .await?;
    // Start-up spent the API bucket polling for readiness; let it refill (2 per second).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Twenty at once: the burst of 2 goes through and the rest are told when to come back. (However
    // slow the machine, 18 passing would need 9 s of refill while they are in flight.)
    let lookups = (0..20).map(|_| {
        service
            .web
            .get(service.url("/api/v1/memberships?email=rate@example.com"))
            .bearer_auth(API_TOKEN)
            .send()
    });
    let mut passed = 0;
    let mut refused = 0;
    for response in futures::future::join_all(lookups).await {
        let response = response?;
        match response.status() {
            reqwest::StatusCode::OK => passed += 1,
            reqwest::StatusCode::TOO_MANY_REQUESTS => {
                refused += 1;
                let retry_after: u64 = response
                    .headers()
                    .get("retry-after")
                    .context("429 without Retry-After")?
                    .to_str()?
                    .parse()?;
                assert_eq!(retry_after, 1, "a token comes back within the second");
            }
            other => bail!("unexpected {other}"),
        }
    }
    assert!(passed >= 2, "the burst was refused: {passed} passed");
    assert!(refused >= 1, "nothing was limited: {passed} passed");
    // Webhooks have their own bucket (unlimited here): the API's being empty does not stop them.
    let ping = service.web.get(service.webhook_url(SECRET)).send().await?;
    assert_eq!(ping.status(), reqwest::StatusCode::OK);

    // Heads: one oversized header gets 431 before any handler or token check runs.
    let big_header = service
        .web
        .get(service.webhook_url(SECRET))
        .header("x-padding", "p".repeat(20 * 1024))
        .send()
        .await?;
    assert_eq!(
        big_header.status(),
        reqwest::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    let long_uri = service
        .web
        .get(service.url(&format!("/webhooks/mailchimp/{}", "s".repeat(17 * 1024))))
        .send()
        .await?;
    assert_eq!(long_uri.status(), reqwest::StatusCode::URI_TOO_LONG);
    assert!(
        app.drain_members_changed().await?.is_empty(),
        "refused requests published something"
    );
    service.stop().await?;
    app.cleanup().await;
    Ok(())
}

/// An unsubscribe webhook publishes the person's other memberships, read at once, before the
/// unsubscribe: the evaluator must judge "unsubscribed in every audience" on all of them, even
/// before a sync has read the other audiences.
#[tokio::test]
async fn an_unsubscribe_webhook_publishes_the_other_memberships_first() -> Result<()> {
    let app = TestApp::start(74).await?;
    let service = Service::start(&app, &[]).await?;
    let subscribed = members_with(&app, MemberStatus::Subscribed).await?;
    let mut audiences_of: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (audience, email) in &subscribed {
        audiences_of
            .entry(email.to_lowercase())
            .or_default()
            .push(audience.clone());
    }
    let (email, audiences) = audiences_of
        .into_iter()
        .find(|(_, audiences)| audiences.len() >= 2)
        .context("the generator made someone subscribed in two audiences")?;
    let (unsubscribed_in, others) = audiences.split_first().context("two audiences")?;
    let body = format!(
        "type=unsubscribe&fired_at=2026-01-02+03%3A04%3A05&data%5Baction%5D=unsub\
         &data%5Blist_id%5D={unsubscribed_in}&data%5Bemail%5D={}",
        email.replace('@', "%40").replace('+', "%2B")
    );
    assert_eq!(
        service.post_webhook(SECRET, &body).await?,
        reqwest::StatusCode::OK
    );
    let messages = app.drain_members_changed().await?;
    // Confirmed before the answer: everything is on the queue already, the unsubscribe last.
    let (last, before) = messages.split_last().context("messages published")?;
    assert_eq!(&last.audience_id, unsubscribed_in);
    assert_eq!(
        last.members[0].status,
        queue::MemberStatus::Unsubscribed as i32
    );
    for other in others {
        let message = before
            .iter()
            .find(|message| &message.audience_id == other)
            .with_context(|| format!("the membership in {other} was published: {messages:?}"))?;
        assert_eq!(message.source, Source::Webhook as i32);
        assert!(message.members[0].email.eq_ignore_ascii_case(&email));
        assert_eq!(
            message.members[0].status,
            queue::MemberStatus::Subscribed as i32
        );
    }
    service.stop().await?;
    app.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn sandbox_delivered_webhooks_publish_member_changes_after_registration_at_start()
-> Result<()> {
    let app = TestApp::start(72).await?;
    let service = Service::start(&app, &["--webhook-public-url", "{public_url}"]).await?;
    // The first sync completes, so webhook snapshots are no longer first-sync ones.
    let report = app.fetcher().sync_now(SyncRequest::default()).await?;
    ensure!(report.error.is_none(), "{:?}", report.error);
    app.drain_members_changed().await?;
    // Registration at start: every audience gets the hook, sources user and admin, not api.
    let url = service.webhook_url(SECRET);
    for audience in app.audiences() {
        let client = app.client.clone();
        let url = url.clone();
        eventually(Duration::from_secs(20), "webhook registration", || {
            let client = client.clone();
            let audience = audience.clone();
            let url = url.clone();
            async move {
                let hooks = client.webhooks(&audience).await?;
                Ok(hooks.iter().any(|hook| {
                    hook.url == url && hook.sources.user && hook.sources.admin && !hook.sources.api
                }))
            }
        })
        .await?;
    }

    let subscribed = members_with(&app, MemberStatus::Subscribed).await?;
    let (audience, email) = subscribed.first().context("a subscribed member")?.clone();
    let control = app
        .sandbox
        .info()
        .control_url
        .trim_end_matches('/')
        .to_owned();
    let response = service
        .web
        .post(format!(
            "{control}/mailchimp/lists/{audience}/members/{email}/unsubscribe"
        ))
        .send()
        .await?;
    ensure!(response.status().is_success(), "{}", response.status());
    let messages = published_until(&app, "the webhook snapshot", |messages| {
        has_snapshot(
            messages,
            Source::Webhook,
            &email,
            queue::MemberStatus::Unsubscribed,
        )
    })
    .await?;
    let message = messages
        .iter()
        .find(|message| message.source == Source::Webhook as i32)
        .context("webhook message")?;
    assert_eq!(message.audience_id, audience);
    assert!(!message.first_sync);

    // A bounce and a signup-form resubscribe come through too.
    let (audience2, email2) = subscribed
        .get(1)
        .context("a second subscribed member")?
        .clone();
    service
        .web
        .post(format!(
            "{control}/mailchimp/lists/{audience2}/members/{email2}/bounce?source=admin"
        ))
        .send()
        .await?
        .error_for_status()?;
    published_until(&app, "the cleaned snapshot", |messages| {
        has_snapshot(
            messages,
            Source::Webhook,
            &email2,
            queue::MemberStatus::Cleaned,
        )
    })
    .await?;
    service
        .web
        .post(format!(
            "{control}/mailchimp/lists/{audience}/members/{email}/resubscribe"
        ))
        .send()
        .await?
        .error_for_status()?;
    published_until(&app, "the resubscribe snapshot", |messages| {
        has_snapshot(
            messages,
            Source::Webhook,
            &email,
            queue::MemberStatus::Subscribed,
        )
    })
    .await?;
    service.stop().await?;
    app.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn unsubscribe_over_http_and_grpc_leaves_the_members_unsubscribed_in_the_sandbox()
-> Result<()> {
    let app = TestApp::start(73).await?;
    let service = Service::start(&app, &[]).await?;
    // People subscribed in at least two audiences.
    let mut by_email: BTreeMap<String, Vec<(String, MemberStatus)>> = BTreeMap::new();
    for ((audience, email), status) in app.all_members().await? {
        by_email
            .entry(optout_mailchimp::normalize_email(&email))
            .or_default()
            .push((audience, status));
    }
    let mut multi = by_email.iter().filter(|(_, members)| {
        members.len() >= 2
            && members
                .iter()
                .all(|(_, status)| *status == MemberStatus::Subscribed)
    });
    let (http_email, http_members) = multi.next().context("a multi-audience person")?;
    let (grpc_email, grpc_members) = multi.next().context("another multi-audience person")?;

    // Without a token: refused.
    let refused = service
        .web
        .post(service.url("/api/v1/unsubscribe"))
        .json(&json!({"email": http_email, "all": true}))
        .send()
        .await?;
    assert_eq!(refused.status(), reqwest::StatusCode::UNAUTHORIZED);

    // HTTP: every audience in scope.
    let (status, body) = service
        .api(
            "/api/v1/unsubscribe",
            json!({"email": http_email.to_uppercase(), "all": true, "reason": "member component"}),
        )
        .await?;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    let results = body["results"].as_array().context("results")?;
    assert_eq!(results.len(), app.audiences().len(), "{body}");
    for audience in app.audiences() {
        assert_eq!(
            status_in(&app, &audience, http_email).await?,
            Some(MemberStatus::Unsubscribed),
            "{http_email} in {audience}"
        );
    }
    let in_audiences: Vec<&String> = http_members.iter().map(|(audience, _)| audience).collect();
    for result in results {
        let audience = result["audience_id"]
            .as_str()
            .context("audience_id")?
            .to_owned();
        let expected = if in_audiences.contains(&&audience) {
            "subscribed"
        } else {
            "not_member"
        };
        assert_eq!(result["previous_status"], expected, "{result}");
        assert_eq!(result["status"], "unsubscribed", "{result}");
    }
    let messages = app.drain_members_changed().await?;
    assert_eq!(messages.len(), app.audiences().len());
    assert!(messages.iter().all(|message| {
        message.source == Source::Api as i32
            && message
                .members
                .iter()
                .all(|member| member.status == queue::MemberStatus::Unsubscribed as i32)
    }));

    // gRPC: one named audience; the API token and the admin token work, others do not.
    let mut bad = service.grpc("nope").await?;
    let denied = bad
        .unsubscribe(UnsubscribeRequest {
            email: grpc_email.clone(),
            all: true,
            ..UnsubscribeRequest::default()
        })
        .await
        .expect_err("a wrong token is refused");
    assert_eq!(denied.code(), Code::Unauthenticated);
    let mut admin = service.grpc(ADMIN_TOKEN).await?;
    let (target, _) = grpc_members[0].clone();
    let (other, _) = grpc_members[1].clone();
    let response = admin
        .unsubscribe(UnsubscribeRequest {
            email: grpc_email.clone(),
            audience_ids: vec![target.clone()],
            reason: "grpc test".to_owned(),
            ..UnsubscribeRequest::default()
        })
        .await?
        .into_inner();
    assert_eq!(response.results.len(), 1);
    assert_eq!(response.results[0].status, "unsubscribed");
    assert_eq!(
        status_in(&app, &target, grpc_email).await?,
        Some(MemberStatus::Unsubscribed)
    );
    assert_eq!(
        status_in(&app, &other, grpc_email).await?,
        Some(MemberStatus::Subscribed)
    );
    let unknown = admin
        .unsubscribe(UnsubscribeRequest {
            email: grpc_email.clone(),
            audience_ids: vec!["ffffffffff".to_owned()],
            ..UnsubscribeRequest::default()
        })
        .await
        .expect_err("an unknown audience is refused");
    assert_eq!(unknown.code(), Code::NotFound);

    // The Apex action: every audience the person is in, no new contacts elsewhere.
    let (status, body) = service
        .api("/api/v1/optouts", json!({"email": grpc_email}))
        .await?;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    for (audience, _) in grpc_members {
        assert_eq!(
            status_in(&app, audience, grpc_email).await?,
            Some(MemberStatus::Unsubscribed)
        );
    }
    for audience in app.audiences() {
        if !grpc_members
            .iter()
            .any(|(member_audience, _)| *member_audience == audience)
        {
            assert_eq!(
                status_in(&app, &audience, grpc_email).await?,
                None,
                "no new contact in {audience}"
            );
        }
    }

    // GetMemberships reports every audience in scope.
    let memberships = service
        .web
        .get(service.url(&format!("/api/v1/memberships?email={http_email}")))
        .bearer_auth(API_TOKEN)
        .send()
        .await?
        .json::<Value>()
        .await?;
    let listed = memberships["memberships"]
        .as_array()
        .context("memberships")?;
    assert_eq!(listed.len(), app.audiences().len());
    assert!(
        listed
            .iter()
            .all(|membership| membership["status"] == "unsubscribed"),
        "{memberships}"
    );
    service.stop().await?;
    app.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn subscribe_never_sends_subscribed_to_an_unsubscribed_or_cleaned_member() -> Result<()> {
    let app = TestApp::start(74).await?;
    let service = Service::start(&app, &[]).await?;
    let mut client = service.grpc(API_TOKEN).await?;
    let (audience, unsubscribed) = members_with(&app, MemberStatus::Unsubscribed)
        .await?
        .into_iter()
        .next()
        .context("an unsubscribed member")?;
    let (cleaned_audience, cleaned) = members_with(&app, MemberStatus::Cleaned)
        .await?
        .into_iter()
        .next()
        .context("a cleaned member")?;

    // Plain subscribe of existing opted-out members: status kept, merge fields written.
    let response = client
        .subscribe(SubscribeRequest {
            email: unsubscribed.clone(),
            audience_id: audience.clone(),
            merge_fields_json: r#"{"FNAME":"Still"}"#.to_owned(),
            resubscribe: false,
        })
        .await?
        .into_inner();
    assert_eq!(response.status, "unsubscribed");
    assert!(response.status_unchanged && !response.double_opt_in_sent);
    assert_eq!(
        status_in(&app, &audience, &unsubscribed).await?,
        Some(MemberStatus::Unsubscribed)
    );
    let (status, body) = service
        .api(
            "/api/v1/subscribe",
            json!({"email": cleaned, "audience_id": cleaned_audience}),
        )
        .await?;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    assert_eq!(body["status"], "cleaned");
    assert_eq!(
        status_in(&app, &cleaned_audience, &cleaned).await?,
        Some(MemberStatus::Cleaned)
    );

    // An explicit re-subscribe asks for double opt-in.
    let response = client
        .subscribe(SubscribeRequest {
            email: unsubscribed.clone(),
            audience_id: audience.clone(),
            merge_fields_json: String::new(),
            resubscribe: true,
        })
        .await?
        .into_inner();
    assert_eq!(response.status, "pending");
    assert_eq!(response.previous_status, "unsubscribed");
    assert!(response.double_opt_in_sent);
    assert_eq!(
        status_in(&app, &audience, &unsubscribed).await?,
        Some(MemberStatus::Pending)
    );

    // A new address is created subscribed.
    let new_email = format!("new-{}@example.com", app.unique);
    let response = client
        .subscribe(SubscribeRequest {
            email: new_email.clone(),
            audience_id: audience.clone(),
            merge_fields_json: String::new(),
            resubscribe: false,
        })
        .await?
        .into_inner();
    assert_eq!(
        (response.previous_status.as_str(), response.status.as_str()),
        ("not_member", "subscribed")
    );
    assert_eq!(
        status_in(&app, &audience, &new_email).await?,
        Some(MemberStatus::Subscribed)
    );
    let messages = app.drain_members_changed().await?;
    assert!(has_snapshot(
        &messages,
        Source::Api,
        &new_email,
        queue::MemberStatus::Subscribed
    ));
    service.stop().await?;
    app.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn import_keeps_existing_statuses_skips_opted_out_records_and_reports_matching_counts()
-> Result<()> {
    let app = TestApp::start(75).await?;
    let service = Service::start(&app, &[]).await?;
    let audience = app.audiences()[0].clone();
    let members = app.all_members().await?;
    let existing = |status: MemberStatus| -> Result<String> {
        members
            .iter()
            .find(|((member_audience, _), member_status)| {
                *member_audience == audience && **member_status == status
            })
            .map(|((_, email), _)| email.clone())
            .with_context(|| format!("a {status} member in {audience}"))
    };
    let kept = [
        (
            existing(MemberStatus::Unsubscribed)?,
            MemberStatus::Unsubscribed,
        ),
        (existing(MemberStatus::Cleaned)?, MemberStatus::Cleaned),
        (existing(MemberStatus::Archived)?, MemberStatus::Archived),
        (
            existing(MemberStatus::Subscribed)?,
            MemberStatus::Subscribed,
        ),
    ];
    let last_name = format!("Import{}", app.unique);
    let control = app
        .sandbox
        .info()
        .control_url
        .trim_end_matches('/')
        .to_owned();
    let create = |email: String, opted_out: bool| {
        let web = service.web.clone();
        let url = format!("{control}/salesforce/records/Contact");
        let body = json!({"FirstName": "Imp", "LastName": last_name, "Email": email, "HasOptedOutOfEmail": opted_out});
        async move {
            let response = web.post(url).json(&body).send().await?;
            ensure!(
                response.status().is_success(),
                "create contact: {}",
                response.status()
            );
            Ok::<_, anyhow::Error>(())
        }
    };
    for (email, _) in &kept {
        create(email.to_uppercase(), false).await?;
    }
    let new: Vec<String> = (0..5)
        .map(|index| format!("import{index}-{}@example.com", app.unique))
        .collect();
    for email in &new {
        create(email.clone(), false).await?;
    }
    // A duplicate of a new address, and opted-out records (one new, one existing unsubscribed).
    create(new[0].clone(), false).await?;
    let opted_out_new = format!("optedout-{}@example.com", app.unique);
    create(opted_out_new.clone(), true).await?;
    create(kept[0].0.clone(), true).await?;

    let soql = format!(
        "SELECT Id, Email, HasOptedOutOfEmail, FirstName, LastName FROM Contact WHERE LastName = '{last_name}'"
    );
    let (status, report) = service
        .api(
            "/api/v1/import",
            json!({"audience_id": audience, "soql": soql}),
        )
        .await?;
    assert_eq!(status, reqwest::StatusCode::OK, "{report}");
    assert_eq!(report["records_read"], 12, "{report}");
    assert_eq!(report["created"], 5, "{report}");
    assert_eq!(report["unchanged"], 4, "{report}");
    assert_eq!(report["skipped"], 3, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(
        report["skipped_reasons"]["email opt out checked"], 2,
        "{report}"
    );
    assert_eq!(
        report["skipped_reasons"]["duplicate address"], 1,
        "{report}"
    );

    for (email, status) in &kept {
        assert_eq!(
            status_in(&app, &audience, email).await?,
            Some(*status),
            "{email} kept its status"
        );
    }
    for email in &new {
        assert_eq!(
            status_in(&app, &audience, email).await?,
            Some(MemberStatus::Subscribed)
        );
    }
    assert_eq!(
        status_in(&app, &audience, &opted_out_new).await?,
        None,
        "opted-out record skipped"
    );
    let messages = app.drain_members_changed().await?;
    let published: usize = messages.iter().map(|message| message.members.len()).sum();
    assert_eq!(published, 5, "the created members are published");

    // Over gRPC: a second import changes nothing.
    let mut client = service.grpc(API_TOKEN).await?;
    let again = client
        .import(optout_proto::memberships::v1::ImportRequest {
            audience_id: audience.clone(),
            soql: soql.clone(),
            include_opted_out: false,
        })
        .await?
        .into_inner();
    assert_eq!((again.created, again.unchanged, again.skipped), (0, 9, 3));
    service.stop().await?;
    app.cleanup().await;
    Ok(())
}

/// Latency from a member's unsubscribe in the sandbox to the confirmed `MembersChanged` on the
/// queue, over 1,000 webhook unsubscribes (20 at a time). Prints p50 and p99. Bounded; ignored by
/// default because it measures rather than asserts: `cargo test -p optout-fetcher --test it
/// webhook_latency -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn webhook_latency_over_1000_unsubscribes() -> Result<()> {
    use futures::StreamExt;
    use prost::Message as _;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use tokio::time::Instant;

    let app = TestApp::start(76).await?;
    let service = Service::start(&app, &["--webhook-public-url", "{public_url}"]).await?;
    let url = service.webhook_url(SECRET);
    for audience in app.audiences() {
        let client = app.client.clone();
        let url = url.clone();
        eventually(Duration::from_secs(20), "webhook registration", move || {
            let client = client.clone();
            let audience = audience.clone();
            let url = url.clone();
            async move {
                Ok(client
                    .webhooks(&audience)
                    .await?
                    .iter()
                    .any(|hook| hook.url == url))
            }
        })
        .await?;
    }
    let targets: Vec<(String, String)> = members_with(&app, MemberStatus::Subscribed)
        .await?
        .into_iter()
        .take(1000)
        .collect();
    ensure!(
        targets.len() == 1000,
        "only {} subscribed members",
        targets.len()
    );

    let received: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let consumer_channel = app.amqp.create_channel().await?;
    let mut consumer = consumer_channel
        .basic_consume(
            app.topology.members_changed_queue().as_str().into(),
            "latency".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
    let sink = Arc::clone(&received);
    let consuming = tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let now = Instant::now();
            if let Ok(message) = MembersChanged::decode(delivery.data.as_slice()) {
                let mut sink = sink
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for member in message.members {
                    sink.entry(format!(
                        "{}/{}",
                        message.audience_id,
                        member.email.to_lowercase()
                    ))
                    .or_insert(now);
                }
            }
        }
    });

    let control = app
        .sandbox
        .info()
        .control_url
        .trim_end_matches('/')
        .to_owned();
    let web = service.web.clone();
    let sent: Vec<(String, Instant)> = futures::stream::iter(targets)
        .map(|(audience, email)| {
            let web = web.clone();
            let url = format!("{control}/mailchimp/lists/{audience}/members/{email}/unsubscribe");
            async move {
                let start = Instant::now();
                let response = web.post(url).send().await?;
                ensure!(response.status().is_success(), "{}", response.status());
                Ok::<_, anyhow::Error>((format!("{audience}/{}", email.to_lowercase()), start))
            }
        })
        .buffer_unordered(20)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    eventually(Duration::from_secs(60), "every webhook snapshot", || {
        let received = Arc::clone(&received);
        let keys: Vec<String> = sent.iter().map(|(key, _)| key.clone()).collect();
        async move {
            let received = received
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            Ok(keys.iter().all(|key| received.contains_key(key)))
        }
    })
    .await?;
    let received = received
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let mut latencies: Vec<Duration> = sent
        .iter()
        .filter_map(|(key, start)| {
            received
                .get(key)
                .map(|at| at.saturating_duration_since(*start))
        })
        .collect();
    latencies.sort();
    let percentile = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    println!(
        "webhook unsubscribe -> confirmed MembersChanged over {} unsubscribes: p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        percentile(50),
        percentile(99),
        latencies[latencies.len() - 1]
    );
    consuming.abort();
    service.stop().await?;
    app.cleanup().await;
    Ok(())
}

/// `Memberships.GetMemberships` through the generated client: one entry per audience in scope, in
/// audience id order, with Mailchimp's status or `not_member`, whatever case the address is asked in.
#[tokio::test]
async fn get_memberships_over_grpc_lists_every_audience_in_scope() -> Result<()> {
    let app = TestApp::start(78).await?;
    let service = Service::start(&app, &[]).await?;
    let members = app.all_members().await?;
    // A person in some audiences but not all, so both kinds of entry are checked.
    let mut audiences_of: BTreeMap<String, BTreeMap<String, MemberStatus>> = BTreeMap::new();
    for ((audience, email), status) in &members {
        audiences_of
            .entry(email.trim().to_lowercase())
            .or_default()
            .insert(audience.clone(), *status);
    }
    let (email, statuses) = audiences_of
        .iter()
        .find(|(_, statuses)| statuses.len() == 2)
        .context("a person in two of the three audiences")?;
    let mut audiences = app.audiences();
    audiences.sort();
    let expected: Vec<(String, String)> = audiences
        .iter()
        .map(|audience| {
            let status = statuses
                .get(audience)
                .map_or("not_member", |status| status.as_str());
            (audience.clone(), status.to_owned())
        })
        .collect();

    let mut denied = service.grpc("nope").await?;
    let refused = denied
        .get_memberships(GetMembershipsRequest {
            email: email.clone(),
        })
        .await
        .expect_err("a wrong token is refused");
    assert_eq!(refused.code(), Code::Unauthenticated);

    let mut client = service.grpc(API_TOKEN).await?;
    let response = client
        .get_memberships(GetMembershipsRequest {
            email: format!("  {}  ", email.to_uppercase()),
        })
        .await?
        .into_inner();
    assert_eq!(&response.email, email);
    let found: Vec<(String, String)> = response
        .memberships
        .iter()
        .map(|membership| (membership.audience_id.clone(), membership.status.clone()))
        .collect();
    assert_eq!(found, expected);
    assert!(
        response
            .memberships
            .iter()
            .all(|membership| (membership.status == "not_member")
                == membership.last_changed.is_none()),
        "members carry last_changed, absent audiences do not: {:?}",
        response.memberships
    );
    service.stop().await?;
    app.cleanup().await;
    Ok(())
}
