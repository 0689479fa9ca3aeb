//! The gRPC services: `optout.evaluator.v1.Decisions`, `optout.admin.v1.Admin`, and the bearer-token check in
//! front of both.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use chrono::{DateTime, Utc};
use optout_amqp::{Topology, dead_letters, lapin::Connection, queue_depth};
use optout_proto::{
    admin::v1::{
        self as admin, GetStatusRequest, GetStatusResponse, ListDeadLettersRequest,
        ListDeadLettersResponse, PauseRequest, PauseResponse, PurgeDeadLettersRequest,
        PurgeDeadLettersResponse, QueueStatus, ReplayDeadLettersRequest, ReplayDeadLettersResponse,
        ResumeRequest, ResumeResponse, TriggerSyncRequest, TriggerSyncResponse,
        admin_server::Admin,
    },
    evaluator::v1::{
        self as evaluator, AckOptInRequest, AckOptInResponse, DecideRequest, DecideResponse,
        ExplainRequest, ExplainResponse, MemberState, PersonDecision, decisions_server::Decisions,
    },
};
use sqlx::PgPool;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::{
    Error,
    evaluate::Counters,
    rule::Decision,
    store::{self, StoredDecision},
};

/// Name reported as `service` in `GetStatus`.
pub const SERVICE_NAME: &str = "rule-evaluator";
/// Most emails one Decide call may ask about.
const MAX_DECIDE_EMAILS: usize = 10_000;
/// Transitions returned by Explain.
const EXPLAIN_TRANSITIONS: i64 = 200;
/// Dead letters listed when the request sets no limit.
const DEFAULT_DEAD_LETTER_LIMIT: usize = 100;

/// Requires `authorization: Bearer <token>` on every call, compared in constant time.
pub use optout_service::RequireBearer as BearerAuth;

/// What the services need once the dependencies are connected.
#[derive(Debug)]
pub(crate) struct Ready {
    pub(crate) pool: PgPool,
    pub(crate) connection: Arc<Connection>,
    pub(crate) topology: Topology,
}

/// State shared by the consumer and the gRPC services.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) started: Instant,
    pub(crate) counters: Arc<Counters>,
    pub(crate) paused: watch::Sender<bool>,
    pub(crate) in_flight: Arc<AtomicU64>,
    pub(crate) ready: OnceLock<Ready>,
}

impl Shared {
    pub(crate) fn new() -> Self {
        Self {
            started: Instant::now(),
            counters: Arc::default(),
            paused: watch::Sender::new(false),
            in_flight: Arc::default(),
            ready: OnceLock::new(),
        }
    }

    fn ready(&self) -> Result<&Ready, Status> {
        self.ready
            .get()
            .ok_or_else(|| Status::unavailable("rule-evaluator is starting"))
    }
}

/// An error with its sources, for one log line or status message.
pub(crate) fn error_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn internal(error: &Error) -> Status {
    let text = error_text(error);
    warn!(error = text, "grpc call failed");
    if error.is_transient() {
        Status::unavailable(text)
    } else {
        Status::internal(text)
    }
}

fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

fn timestamp_ms(unix_ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: unix_ms.div_euclid(1000),
        nanos: i32::try_from(unix_ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

fn proto_decision(decision: Decision) -> evaluator::Decision {
    match decision {
        Decision::OptOut => evaluator::Decision::OptOut,
        Decision::OptIn => evaluator::Decision::OptIn,
        Decision::NoChange => evaluator::Decision::NoChange,
    }
}

fn person_decision(stored: StoredDecision) -> PersonDecision {
    PersonDecision {
        email: stored.email,
        decision: proto_decision(stored.decision) as i32,
        version: stored.version,
        opt_in_evidence_id: stored.opt_in_evidence_id,
        rule: stored.rule,
        opted_out_at: stored.opted_out_at.map(timestamp),
    }
}

/// `optout.evaluator.v1.Decisions`.
#[derive(Clone, Debug)]
pub(crate) struct DecisionsService {
    shared: Arc<Shared>,
}

impl DecisionsService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[tonic::async_trait]
impl Decisions for DecisionsService {
    async fn decide(
        &self,
        request: Request<DecideRequest>,
    ) -> Result<Response<DecideResponse>, Status> {
        let ready = self.shared.ready()?;
        let emails = request.into_inner().emails;
        if emails.len() > MAX_DECIDE_EMAILS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_DECIDE_EMAILS} emails per call, got {}",
                emails.len()
            )));
        }
        let decisions = store::decisions(&ready.pool, &emails)
            .await
            .map_err(|error| internal(&error))?;
        Ok(Response::new(DecideResponse {
            decisions: decisions.into_iter().map(person_decision).collect(),
        }))
    }

    async fn ack_opt_in(
        &self,
        request: Request<AckOptInRequest>,
    ) -> Result<Response<AckOptInResponse>, Status> {
        let ready = self.shared.ready()?;
        let request = request.into_inner();
        let cleared = store::ack_opt_in(&ready.pool, &request.email, request.opt_in_evidence_id)
            .await
            .map_err(|error| internal(&error))?;
        Ok(Response::new(AckOptInResponse { cleared }))
    }

    async fn explain(
        &self,
        request: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        let ready = self.shared.ready()?;
        let email = request.into_inner().email;
        if email.trim().is_empty() {
            return Err(Status::invalid_argument("email must not be empty"));
        }
        let (decision, members, transitions) =
            store::explain(&ready.pool, &email, EXPLAIN_TRANSITIONS)
                .await
                .map_err(|error| internal(&error))?;
        Ok(Response::new(ExplainResponse {
            decision: Some(person_decision(decision)),
            members: members
                .into_iter()
                .map(|member| MemberState {
                    audience_id: member.audience_id,
                    status: member.status,
                    last_changed: Some(timestamp(member.last_changed)),
                    learned_from: member.learned_from,
                })
                .collect(),
            transitions: transitions
                .into_iter()
                .map(|transition| evaluator::Transition {
                    audience_id: transition.audience_id,
                    from_status: transition.from_status,
                    to_status: transition.to_status,
                    last_changed: Some(timestamp(transition.last_changed)),
                    seen_at: Some(timestamp(transition.seen_at)),
                    learned_from: transition.learned_from,
                })
                .collect(),
        }))
    }
}

/// `optout.admin.v1.Admin`.
#[derive(Clone, Debug)]
pub(crate) struct AdminService {
    shared: Arc<Shared>,
}

impl AdminService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

async fn queue_statuses(ready: &Ready) -> Vec<QueueStatus> {
    let queue = ready.topology.members_changed_queue();
    let dead_letter_queue = ready.topology.dead_letter_queue(&queue);
    let mut statuses = Vec::new();
    for name in [queue, dead_letter_queue] {
        // A passive declare of a missing queue closes its channel, so each gets its own.
        let depth = match ready.connection.create_channel().await {
            Ok(channel) => {
                let depth = queue_depth(&channel, &name).await;
                let _ = channel.close(200, "status read".into()).await;
                depth
            }
            Err(source) => Err(optout_amqp::Error::Amqp {
                operation: "channel.open",
                target: name.clone(),
                source,
            }),
        };
        match depth {
            Ok((messages, consumers)) => statuses.push(QueueStatus {
                name,
                messages,
                consumers,
            }),
            Err(error) => warn!(%error, queue = name, "failed to read queue depth"),
        }
    }
    statuses
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_status(
        &self,
        _request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        let queues = match self.shared.ready.get() {
            Some(ready) => queue_statuses(ready).await,
            None => Vec::new(),
        };
        // Held first-sync opt-outs are work still to do: a sync is not over until they went out.
        let held = match self.shared.ready.get() {
            Some(ready) => store::held_count(&ready.pool)
                .await
                .unwrap_or_else(|error| {
                    warn!(%error, "failed to count held opt-outs");
                    0
                }),
            None => 0,
        };
        let mut counters = self.shared.counters.snapshot();
        counters.insert("held_first_sync_opt_outs".to_owned(), held);
        Ok(Response::new(GetStatusResponse {
            service: SERVICE_NAME.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: self.shared.started.elapsed().as_secs(),
            paused: *self.shared.paused.borrow(),
            busy: held > 0,
            in_flight: self.shared.in_flight.load(Ordering::SeqCst),
            queues,
            audiences: Vec::new(),
            counters,
            last_run_id: String::new(),
            last_run_finished: false,
            salesforce_api_remaining: -1,
        }))
    }

    async fn pause(
        &self,
        _request: Request<PauseRequest>,
    ) -> Result<Response<PauseResponse>, Status> {
        self.shared.paused.send_replace(true);
        Ok(Response::new(PauseResponse { paused: true }))
    }

    async fn resume(
        &self,
        _request: Request<ResumeRequest>,
    ) -> Result<Response<ResumeResponse>, Status> {
        self.shared.paused.send_replace(false);
        Ok(Response::new(ResumeResponse { paused: false }))
    }

    async fn trigger_sync(
        &self,
        _request: Request<TriggerSyncRequest>,
    ) -> Result<Response<TriggerSyncResponse>, Status> {
        // The evaluator runs no syncs of its own; an empty run id says so without failing `optoutctl sync`.
        Ok(Response::new(TriggerSyncResponse {
            run_id: String::new(),
            dry_run_report: None,
        }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        let ready = self.shared.ready()?;
        let limit = match request.into_inner().limit {
            0 => DEFAULT_DEAD_LETTER_LIMIT,
            limit => usize::try_from(limit).unwrap_or(usize::MAX),
        };
        let queue = ready.topology.members_changed_queue();
        let listed = dead_letters::list(&ready.connection, &ready.topology, &queue, limit)
            .await
            .map_err(|error| internal(&Error::from(error)))?;
        Ok(Response::new(ListDeadLettersResponse {
            dead_letters: listed
                .into_iter()
                .map(|dead_letter| admin::DeadLetter {
                    queue: dead_letter.queue,
                    message_id: dead_letter.message_id,
                    reason: dead_letter.reason,
                    routing_key: dead_letter.routing_key,
                    first_failure: dead_letter.first_failure_ms.map(timestamp_ms),
                    last_failure: dead_letter.last_failure_ms.map(timestamp_ms),
                    failures: dead_letter.failures,
                    body_bytes: dead_letter.body_bytes,
                })
                .collect(),
        }))
    }

    async fn replay_dead_letters(
        &self,
        request: Request<ReplayDeadLettersRequest>,
    ) -> Result<Response<ReplayDeadLettersResponse>, Status> {
        let ready = self.shared.ready()?;
        let request = request.into_inner();
        let queue = ready.topology.members_changed_queue();
        let replayed = dead_letters::replay(
            &ready.connection,
            &ready.topology,
            &queue,
            &request.message_ids,
            request.all,
        )
        .await
        .map_err(|error| internal(&Error::from(error)))?;
        Ok(Response::new(ReplayDeadLettersResponse { replayed }))
    }

    async fn purge_dead_letters(
        &self,
        _request: Request<PurgeDeadLettersRequest>,
    ) -> Result<Response<PurgeDeadLettersResponse>, Status> {
        let ready = self.shared.ready()?;
        let queue = ready.topology.members_changed_queue();
        let purged = dead_letters::purge(&ready.connection, &ready.topology, &queue)
            .await
            .map_err(|error| internal(&Error::from(error)))?;
        Ok(Response::new(PurgeDeadLettersResponse { purged }))
    }
}
