//! `optoutctl explain` joining a fake evaluator's `Explain` with a fake writer's `Records`.

use std::net::SocketAddr;

use anyhow::Context as _;
use optout_proto::{
    evaluator::v1::{
        AckOptInRequest, AckOptInResponse, DecideRequest, DecideResponse, Decision, ExplainRequest,
        ExplainResponse, MemberState, PersonDecision,
        decisions_server::{Decisions, DecisionsServer},
    },
    writer::v1::{
        AuditEntry, AuditTrailRequest, AuditTrailResponse, RecordsForRequest, RecordsForResponse,
        SalesforceRecord,
        records_server::{Records, RecordsServer},
    },
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    Request, Response, Status,
    transport::{Server, server::TcpIncoming},
};

#[derive(Debug)]
struct FakeEvaluator;

#[tonic::async_trait]
impl Decisions for FakeEvaluator {
    async fn decide(&self, _: Request<DecideRequest>) -> Result<Response<DecideResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
    async fn ack_opt_in(
        &self,
        _: Request<AckOptInRequest>,
    ) -> Result<Response<AckOptInResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
    async fn explain(
        &self,
        request: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        let email = request.into_inner().email;
        Ok(Response::new(ExplainResponse {
            decision: Some(PersonDecision {
                email,
                decision: Decision::OptOut.into(),
                version: 2,
                opt_in_evidence_id: 0,
                rule: "unsubscribed in audience a1".to_owned(),
                // Fields the evaluator may add later do not matter here.
                ..PersonDecision::default()
            }),
            members: vec![MemberState {
                audience_id: "a1".to_owned(),
                status: "unsubscribed".to_owned(),
                last_changed: None,
                learned_from: "poll".to_owned(),
            }],
            transitions: Vec::new(),
        }))
    }
}

#[derive(Debug)]
struct FakeWriter;

#[tonic::async_trait]
impl Records for FakeWriter {
    async fn records_for(
        &self,
        request: Request<RecordsForRequest>,
    ) -> Result<Response<RecordsForResponse>, Status> {
        Ok(Response::new(RecordsForResponse {
            records: vec![SalesforceRecord {
                object: "Lead".to_owned(),
                id: "00Q1".to_owned(),
                email: request.into_inner().email,
                opted_out: true,
                fields: Default::default(),
            }],
        }))
    }
    async fn audit_trail(
        &self,
        request: Request<AuditTrailRequest>,
    ) -> Result<Response<AuditTrailResponse>, Status> {
        Ok(Response::new(AuditTrailResponse {
            entries: vec![AuditEntry {
                id: 1,
                email: request.into_inner().email,
                object: "Lead".to_owned(),
                record_id: "00Q1".to_owned(),
                old_value: false,
                new_value: true,
                reason: "unsubscribed in audience a1".to_owned(),
                trigger: "mailchimp".to_owned(),
                trace_id: String::new(),
                written_at: None,
            }],
        }))
    }
}

async fn start(shutdown: CancellationToken) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let evaluator = TcpListener::bind("127.0.0.1:0").await?;
    let writer = TcpListener::bind("127.0.0.1:0").await?;
    let addresses = (evaluator.local_addr()?, writer.local_addr()?);
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = Server::builder()
            .add_service(DecisionsServer::new(FakeEvaluator))
            .serve_with_incoming_shutdown(TcpIncoming::from(evaluator), stop.cancelled_owned())
            .await;
    });
    tokio::spawn(async move {
        let _ = Server::builder()
            .add_service(RecordsServer::new(FakeWriter))
            .serve_with_incoming_shutdown(TcpIncoming::from(writer), shutdown.cancelled_owned())
            .await;
    });
    Ok(addresses)
}

#[tokio::test]
async fn joins_the_decision_with_salesforce_records_and_writes() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let (evaluator, writer) = start(shutdown.clone()).await?;
    let run = |json: bool| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_optoutctl"));
        command
            .env_remove("OPTOUT_FETCHER_ADDR")
            .env("OPTOUT_EVALUATOR_ADDR", evaluator.to_string())
            .env("OPTOUT_WRITER_ADDR", writer.to_string())
            .env("OPTOUT_ADMIN_TOKEN", "t")
            .args(["explain", "a@example.com"])
            .kill_on_drop(true);
        if json {
            command.arg("--json");
        }
        command.output()
    };
    let text = run(false).await.context("cannot run optoutctl")?;
    let json = run(true).await.context("cannot run optoutctl")?;
    shutdown.cancel();
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert_eq!(
        text.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&text.stderr)
    );
    assert!(
        stdout.contains("a@example.com: opt-out (version 2)"),
        "{stdout}"
    );
    let has_line = |parts: &[&str]| {
        stdout
            .lines()
            .any(|line| parts.iter().all(|part| line.contains(part)))
    };
    assert!(has_line(&["Lead", "00Q1", "opted out"]), "{stdout}");
    assert!(
        has_line(&["00Q1", "false -> true", "mailchimp"]),
        "{stdout}"
    );
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    assert_eq!(parsed["decision"]["decision"], "opt-out");
    assert_eq!(parsed["salesforce"]["records"][0]["id"], "00Q1");
    assert_eq!(parsed["salesforce"]["audit"][0]["new_value"], true);
    Ok(())
}
