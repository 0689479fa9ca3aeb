//! `optoutctl dlq` against fake evaluator and writer Admin services.

use std::{
    net::SocketAddr,
    process::Output,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use optout_proto::admin::v1::{
    DeadLetter, GetStatusRequest, GetStatusResponse, ListDeadLettersRequest,
    ListDeadLettersResponse, PauseRequest, PauseResponse, PurgeDeadLettersRequest,
    PurgeDeadLettersResponse, ReplayDeadLettersRequest, ReplayDeadLettersResponse, ResumeRequest,
    ResumeResponse, TriggerSyncRequest, TriggerSyncResponse,
    admin_server::{Admin, AdminServer},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    Request, Response, Status,
    transport::{Server, server::TcpIncoming},
};

const TOKEN: &str = "test-token";

/// An Admin service holding dead letters in memory; replays and purges remove them.
#[derive(Clone, Debug)]
struct FakeAdmin {
    queue: &'static str,
    letters: Arc<Mutex<Vec<DeadLetter>>>,
}

impl FakeAdmin {
    fn new(queue: &'static str, ids: &[&str]) -> Self {
        let letters = ids
            .iter()
            .map(|id| DeadLetter {
                queue: queue.to_owned(),
                message_id: (*id).to_owned(),
                reason: format!("bad message {id}"),
                routing_key: "members.changed".to_owned(),
                first_failure: None,
                last_failure: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 0,
                }),
                failures: 3,
                body_bytes: 42,
            })
            .collect();
        Self {
            queue,
            letters: Arc::new(Mutex::new(letters)),
        }
    }

    fn check<T>(request: &Request<T>) -> Result<(), Status> {
        let expected = format!("Bearer {TOKEN}");
        match request.metadata().get("authorization") {
            Some(value) if value.to_str().ok() == Some(expected.as_str()) => Ok(()),
            _ => Err(Status::unauthenticated("bad token")),
        }
    }

    fn letters(&self) -> Result<std::sync::MutexGuard<'_, Vec<DeadLetter>>, Status> {
        self.letters
            .lock()
            .map_err(|_| Status::internal(format!("{} lock poisoned", self.queue)))
    }
}

#[tonic::async_trait]
impl Admin for FakeAdmin {
    async fn get_status(
        &self,
        _: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
    async fn pause(&self, _: Request<PauseRequest>) -> Result<Response<PauseResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
    async fn resume(&self, _: Request<ResumeRequest>) -> Result<Response<ResumeResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
    async fn trigger_sync(
        &self,
        _: Request<TriggerSyncRequest>,
    ) -> Result<Response<TriggerSyncResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        Self::check(&request)?;
        Ok(Response::new(ListDeadLettersResponse {
            dead_letters: self.letters()?.clone(),
        }))
    }
    async fn replay_dead_letters(
        &self,
        request: Request<ReplayDeadLettersRequest>,
    ) -> Result<Response<ReplayDeadLettersResponse>, Status> {
        Self::check(&request)?;
        let request = request.into_inner();
        let mut letters = self.letters()?;
        let before = letters.len();
        letters.retain(|letter| !request.all && !request.message_ids.contains(&letter.message_id));
        let replayed = u32::try_from(before - letters.len()).unwrap_or(u32::MAX);
        Ok(Response::new(ReplayDeadLettersResponse { replayed }))
    }
    async fn purge_dead_letters(
        &self,
        request: Request<PurgeDeadLettersRequest>,
    ) -> Result<Response<PurgeDeadLettersResponse>, Status> {
        Self::check(&request)?;
        let mut letters = self.letters()?;
        let purged = u32::try_from(letters.len()).unwrap_or(u32::MAX);
        letters.clear();
        Ok(Response::new(PurgeDeadLettersResponse { purged }))
    }
}

async fn serve(admin: FakeAdmin, shutdown: CancellationToken) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = Server::builder()
            .add_service(AdminServer::new(admin))
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown.cancelled_owned())
            .await;
    });
    Ok(address)
}

async fn optoutctl(
    evaluator: SocketAddr,
    writer: SocketAddr,
    token: &str,
    args: &[&str],
) -> anyhow::Result<Output> {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_optoutctl"))
        .env_remove("OPTOUT_FETCHER_ADDR")
        .env("OPTOUT_EVALUATOR_ADDR", evaluator.to_string())
        .env("OPTOUT_WRITER_ADDR", writer.to_string())
        .env("OPTOUT_ADMIN_TOKEN", token)
        .arg("dlq")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run optoutctl")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn lists_replays_and_purges_dead_letters_of_both_services() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let evaluator = FakeAdmin::new("members.changed.dlq", &["e1", "e2"]);
    let writer = FakeAdmin::new("persons.dirty.0.dlq", &["w1"]);
    let evaluator_addr = serve(evaluator.clone(), shutdown.clone()).await?;
    let writer_addr = serve(writer.clone(), shutdown.clone()).await?;

    let listed = optoutctl(evaluator_addr, writer_addr, TOKEN, &["list"]).await?;
    assert_eq!(listed.status.code(), Some(0), "{}", stderr(&listed));
    let table = stdout(&listed);
    assert!(table.starts_with("SERVICE"), "{table}");
    for expected in [
        "e1",
        "e2",
        "w1",
        "rule-evaluator",
        "salesforce-writer",
        "bad message e2",
    ] {
        assert!(table.contains(expected), "missing {expected}: {table}");
    }

    let json = optoutctl(
        evaluator_addr,
        writer_addr,
        TOKEN,
        &["list", "--service", "writer", "--json"],
    )
    .await?;
    assert_eq!(json.status.code(), Some(0), "{}", stderr(&json));
    let parsed: serde_json::Value = serde_json::from_str(stdout(&json).trim())?;
    assert_eq!(parsed[0]["service"], "salesforce-writer");
    assert_eq!(parsed[0]["dead_letters"][0]["message_id"], "w1");
    assert_eq!(parsed[0]["dead_letters"][0]["failures"], 3);

    let replayed = optoutctl(
        evaluator_addr,
        writer_addr,
        TOKEN,
        &["replay", "--service", "evaluator", "--id", "e1", "--json"],
    )
    .await?;
    assert_eq!(replayed.status.code(), Some(0), "{}", stderr(&replayed));
    let parsed: serde_json::Value = serde_json::from_str(stdout(&replayed).trim())?;
    assert_eq!(parsed[0]["replayed"], 1);
    assert_eq!(evaluator.letters()?.len(), 1);

    let refused = optoutctl(evaluator_addr, writer_addr, TOKEN, &["purge"]).await?;
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("--all"), "{}", stderr(&refused));

    let purged = optoutctl(evaluator_addr, writer_addr, TOKEN, &["purge", "--all"]).await?;
    assert_eq!(purged.status.code(), Some(0), "{}", stderr(&purged));
    assert_eq!(
        stdout(&purged),
        "rule-evaluator: purged 1\nsalesforce-writer: purged 1\n"
    );
    assert!(evaluator.letters()?.is_empty());
    assert!(writer.letters()?.is_empty());
    shutdown.cancel();
    Ok(())
}

#[tokio::test]
async fn names_the_service_that_refused_the_token() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let evaluator_addr = serve(FakeAdmin::new("q.dlq", &["e1"]), shutdown.clone()).await?;
    let writer_addr = serve(FakeAdmin::new("q.dlq", &["w1"]), shutdown.clone()).await?;
    let output = optoutctl(
        evaluator_addr,
        writer_addr,
        "wrong",
        &["list", "--service", "writer"],
    )
    .await?;
    shutdown.cancel();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("the admin token was refused by salesforce-writer"),
        "{}",
        stderr(&output)
    );
    Ok(())
}

#[tokio::test]
async fn reports_an_unreachable_service_with_its_address() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let evaluator_addr = serve(FakeAdmin::new("q.dlq", &[]), shutdown.clone()).await?;
    // A port nothing listens on.
    let writer_addr = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let output = optoutctl(evaluator_addr, writer_addr, TOKEN, &["list"]).await?;
    shutdown.cancel();
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains(&format!(
            "cannot reach salesforce-writer at http://{writer_addr}"
        )),
        "{message}"
    );
    Ok(())
}
