//! Automated opt-out end to end inside one process: the sandbox (Mailchimp and Salesforce), the real
//! fetcher serving the Memberships API, a fake evaluator that knows no decision, and the writer with
//! `--auto-optout`. Checking Email Opt Out on a Contact unsubscribes the person from every audience
//! they are in, and the audit log records it with trigger `salesforce-auto-optout`.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use optout_mailchimp::{MailchimpClient, MailchimpConfig, MemberStatus, MembersQuery};
use optout_proto::evaluator::v1::decisions_server::{Decisions, DecisionsServer};
use optout_proto::evaluator::v1::{
    AckOptInRequest, AckOptInResponse, DecideRequest, DecideResponse, Decision, ExplainRequest,
    ExplainResponse, PersonDecision,
};
use serde_json::{Value, json};
use sqlx::Row;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const TOKEN: &str = "auto-optout-admin-token";

/// Knows no decision: every email is NoChange, so nothing counts as already opted out.
#[derive(Debug, Default)]
struct NoDecisions;

#[tonic::async_trait]
impl Decisions for NoDecisions {
    async fn decide(
        &self,
        request: Request<DecideRequest>,
    ) -> Result<Response<DecideResponse>, Status> {
        let decisions = request
            .into_inner()
            .emails
            .into_iter()
            .map(|email| PersonDecision {
                email: email.trim().to_lowercase(),
                decision: Decision::NoChange as i32,
                version: 1,
                opt_in_evidence_id: 0,
                rule: "fake".to_owned(),
                ..PersonDecision::default()
            })
            .collect();
        Ok(Response::new(DecideResponse { decisions }))
    }

    async fn ack_opt_in(
        &self,
        _request: Request<AckOptInRequest>,
    ) -> Result<Response<AckOptInResponse>, Status> {
        Ok(Response::new(AckOptInResponse { cleared: false }))
    }

    async fn explain(
        &self,
        _request: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

async fn eventually<F, Fut>(what: &str, mut condition: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if condition().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn checking_email_opt_out_on_a_contact_unsubscribes_the_person_from_every_audience()
-> Result<()> {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let sandbox = optout_sandbox::Sandbox::start(optout_sandbox::SandboxConfig {
        seed: 31,
        audiences: 3,
        members: 600,
        ..Default::default()
    })
    .await
    .context("failed to start the sandbox")?;
    let info = sandbox.info().clone();
    let mut mailchimp = MailchimpConfig::new(info.mailchimp_api_key.clone());
    mailchimp.base_url = Some(info.mailchimp_url.clone());
    let client = MailchimpClient::new(mailchimp)?;

    // A person subscribed in two or more audiences.
    let mut memberships: std::collections::BTreeMap<String, Vec<(String, MemberStatus)>> =
        std::collections::BTreeMap::new();
    for audience in &info.audiences {
        let page = client
            .members_page(
                audience,
                &MembersQuery {
                    count: 1000,
                    ..MembersQuery::default()
                },
            )
            .await?;
        for member in page.members {
            memberships
                .entry(member.email_address.trim().to_lowercase())
                .or_default()
                .push((audience.clone(), member.status));
        }
    }
    let (email, member_of) = memberships
        .into_iter()
        .find(|(_, members)| {
            members.len() >= 2
                && members
                    .iter()
                    .all(|(_, status)| *status == MemberStatus::Subscribed)
        })
        .context("a person subscribed in two audiences")?;

    // Fake evaluator, the fetcher, the writer.
    let stop = CancellationToken::new();
    let fake_listener = TcpListener::bind("127.0.0.1:0").await?;
    let fake_address = fake_listener.local_addr()?;
    let fake_stop = stop.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DecisionsServer::new(NoDecisions))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(fake_listener),
                fake_stop.cancelled_owned(),
            ),
    );
    let schema = format!("autoopt_{tag}");
    let prefix = format!("autoopt-{tag}.");
    let fetcher_grpc = TcpListener::bind("127.0.0.1:0").await?;
    let fetcher_http = TcpListener::bind("127.0.0.1:0").await?;
    let fetcher_url = format!("http://{}", fetcher_grpc.local_addr()?);
    let fetcher_config = optout_fetcher::Config::try_parse_from([
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
        &prefix,
        "--database-url",
        DATABASE_URL,
        "--database-schema",
        &schema,
        "--admin-token",
        TOKEN,
    ])?;
    let fetcher = tokio::spawn(optout_fetcher::serve_with_http(
        fetcher_config,
        fetcher_grpc,
        fetcher_http,
        stop.clone(),
    ));
    let ca_file = info.salesforce_ca_file.display().to_string();
    let evaluator_url = format!("http://{fake_address}");
    let writer_config = optout_salesforce_writer::Config::try_parse_from([
        "optout-salesforce-writer",
        "--salesforce-login-url",
        &info.salesforce_login_url,
        "--salesforce-client-id",
        &info.salesforce_client_id,
        "--salesforce-client-secret",
        &info.salesforce_client_secret,
        "--salesforce-ca-file",
        &ca_file,
        "--evaluator-url",
        &evaluator_url,
        "--amqp-url",
        AMQP_URL,
        "--queue-prefix",
        &prefix,
        "--database-url",
        DATABASE_URL,
        "--database-schema",
        &schema,
        "--admin-token",
        TOKEN,
        "--poll-interval-secs",
        "1",
        "--auto-optout",
        "--fetcher-url",
        &fetcher_url,
    ])?;
    let writer = tokio::spawn(optout_salesforce_writer::serve(
        writer_config,
        TcpListener::bind("127.0.0.1:0").await?,
        stop.clone(),
    ));

    // A Contact carrying the address (as a UI user creates it), box unchecked.
    let http = reqwest::Client::new();
    let control = info.control_url.trim_end_matches('/').to_owned();
    let created: Value = http
        .post(format!("{control}/salesforce/records/Contact"))
        .json(&json!({"LastName": "Auto", "Email": email.to_uppercase(), "HasOptedOutOfEmail": false}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let contact_id = created["id"].as_str().context("contact id")?.to_owned();

    // Wait until the automated opt-out watches Contacts (its first cycle sets the watermark to now).
    let database = sqlx::PgPool::connect(DATABASE_URL)
        .await
        .context("PostgreSQL must run at 127.0.0.1:5432")?;
    let writer_schema = format!("{schema}_writer");
    eventually("the automated opt-out watermark", || {
        let database = database.clone();
        let query = format!(
            "SELECT count(*) AS n FROM {writer_schema}.sf_watermarks WHERE object = 'auto-optout:Contact'"
        );
        async move {
            let row = sqlx::query(sqlx::AssertSqlSafe(query)).fetch_one(&database).await;
            Ok(row.is_ok_and(|row| row.try_get::<i64, _>("n").unwrap_or(0) == 1))
        }
    })
    .await?;
    // Salesforce datetimes have millisecond precision and the poll compares whole seconds.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let patched = http
        .patch(format!("{control}/salesforce/records/Contact/{contact_id}"))
        .json(&json!({"HasOptedOutOfEmail": true}))
        .send()
        .await?;
    ensure!(patched.status().is_success(), "patch: {}", patched.status());

    for (audience, _) in &member_of {
        let client = client.clone();
        let email = email.clone();
        let audience = audience.clone();
        eventually("the unsubscribe in every audience", move || {
            let client = client.clone();
            let email = email.clone();
            let audience = audience.clone();
            async move {
                Ok(client.member(&audience, &email).await?.status == MemberStatus::Unsubscribed)
            }
        })
        .await?;
    }
    // Audiences the person was not in got no new contact.
    for audience in &info.audiences {
        if !member_of.iter().any(|(member, _)| member == audience) {
            assert!(
                matches!(
                    client.member(audience, &email).await,
                    Err(optout_mailchimp::Error::NotFound { .. })
                ),
                "no new contact in {audience}"
            );
        }
    }
    let audit = format!(
        "SELECT record_id, reason, \"trigger\" FROM {writer_schema}.audit_log WHERE email = $1"
    );
    // The writer audits each audience once the fetcher's Unsubscribe answered, which is a moment
    // after Mailchimp shows the member unsubscribed.
    eventually("one audit row per audience", || {
        let query = sqlx::query(sqlx::AssertSqlSafe(audit.clone())).bind(email.clone());
        let database = database.clone();
        let wanted = member_of.len();
        async move { Ok(query.fetch_all(&database).await?.len() >= wanted) }
    })
    .await?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(audit))
        .bind(&email)
        .fetch_all(&database)
        .await?;
    assert_eq!(rows.len(), member_of.len(), "one audit row per audience");
    for row in &rows {
        let trigger: String = row.try_get("trigger")?;
        let reason: String = row.try_get("reason")?;
        assert_eq!(trigger, "salesforce-auto-optout");
        assert!(reason.contains(&contact_id), "{reason}");
    }

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), writer).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), fetcher).await;
    let amqp = optout_amqp::connect(AMQP_URL).await?;
    let channel = amqp.create_channel().await?;
    let _ =
        optout_amqp::teardown(&channel, &optout_amqp::Topology::new("optout", &prefix, 4)).await;
    for suffix in ["writer", "fetcher"] {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {schema}_{suffix} CASCADE"
        )))
        .execute(&database)
        .await;
    }
    sandbox.shutdown().await;
    Ok(())
}
