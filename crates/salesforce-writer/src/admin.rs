//! The `optout.admin.v1.Admin` service of the writer.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use optout_amqp::dead_letters;
use optout_proto::admin::v1::admin_server::Admin;
use optout_proto::admin::v1::{
    DeadLetter, GetStatusRequest, GetStatusResponse, ListDeadLettersRequest,
    ListDeadLettersResponse, PauseRequest, PauseResponse, PurgeDeadLettersRequest,
    PurgeDeadLettersResponse, QueueStatus, ReplayDeadLettersRequest, ReplayDeadLettersResponse,
    ResumeRequest, ResumeResponse, TriggerSyncRequest, TriggerSyncResponse,
};
use tonic::{Request, Response, Status};

use crate::AppState;

/// Dead letters listed when the request sets no limit.
const DEFAULT_DEAD_LETTER_LIMIT: usize = 100;

/// Admin RPCs; answer `unavailable` until start-up has connected every dependency.
#[derive(Clone, Debug)]
pub(crate) struct AdminService {
    pub(crate) state: Arc<OnceLock<Arc<AppState>>>,
}

impl AdminService {
    fn state(&self) -> Result<&Arc<AppState>, Status> {
        self.state
            .get()
            .ok_or_else(|| Status::unavailable("salesforce-writer is starting"))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_status(
        &self,
        _request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        let state = self.state()?;
        let writer = &state.writer;
        let mut queues = Vec::new();
        match state.amqp.create_channel().await {
            Ok(channel) => {
                for queue in writer.topology.persons_dirty_queues() {
                    for name in [writer.topology.dead_letter_queue(&queue), queue] {
                        match optout_amqp::queue_depth(&channel, &name).await {
                            Ok((messages, consumers)) => queues.push(QueueStatus {
                                name,
                                messages,
                                consumers,
                            }),
                            Err(error) => {
                                tracing::warn!(%error, queue = %name, "failed to read queue depth")
                            }
                        }
                    }
                }
                drop(channel.close(200, "status read".into()).await);
            }
            Err(error) => tracing::warn!(%error, "failed to open a channel for queue depths"),
        }
        queues.sort_by(|left, right| left.name.cmp(&right.name));
        let (last_run_id, last_run_finished) = state.last_run();
        let salesforce_api_remaining = writer
            .salesforce
            .limits()
            .map(|usage| i64::try_from(usage.max.saturating_sub(usage.used)).unwrap_or(i64::MAX))
            .unwrap_or(-1);
        Ok(Response::new(GetStatusResponse {
            service: "salesforce-writer".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: state.started.elapsed().as_secs(),
            paused: *state.paused.borrow(),
            busy: writer.is_busy(),
            in_flight: state.in_flight.load(Ordering::SeqCst),
            queues,
            audiences: Vec::new(),
            counters: writer.counters.snapshot(),
            last_run_id,
            last_run_finished,
            salesforce_api_remaining,
        }))
    }

    async fn pause(
        &self,
        _request: Request<PauseRequest>,
    ) -> Result<Response<PauseResponse>, Status> {
        let state = self.state()?;
        state.paused.send_replace(true);
        tracing::info!("paused: no deliveries taken, no polling");
        Ok(Response::new(PauseResponse { paused: true }))
    }

    async fn resume(
        &self,
        _request: Request<ResumeRequest>,
    ) -> Result<Response<ResumeResponse>, Status> {
        let state = self.state()?;
        state.paused.send_replace(false);
        tracing::info!("resumed");
        Ok(Response::new(ResumeResponse { paused: false }))
    }

    async fn trigger_sync(
        &self,
        request: Request<TriggerSyncRequest>,
    ) -> Result<Response<TriggerSyncResponse>, Status> {
        let state = self.state()?;
        let request = request.into_inner();
        if request.dry_run {
            // A dry run writes nothing, so it may run while paused; it answers when complete, with the report.
            let (run_id, report) = state
                .dry_run_cycle(request.full)
                .await
                .map_err(|error| Status::unavailable(crate::error_chain(&error)))?;
            return Ok(Response::new(TriggerSyncResponse {
                run_id,
                dry_run_report: Some(report),
            }));
        }
        if *state.paused.borrow() {
            return Err(Status::failed_precondition(
                "the writer is paused; resume it first",
            ));
        }
        let run_id = state.start_poll_cycle(request.full, false);
        Ok(Response::new(TriggerSyncResponse {
            run_id,
            dry_run_report: None,
        }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        let state = self.state()?;
        let limit = match request.into_inner().limit {
            0 => DEFAULT_DEAD_LETTER_LIMIT,
            limit => usize::try_from(limit).unwrap_or(usize::MAX),
        };
        let topology = &state.writer.topology;
        let mut listed = Vec::new();
        for queue in topology.persons_dirty_queues() {
            if listed.len() >= limit {
                break;
            }
            let remaining = limit - listed.len();
            listed.extend(
                dead_letters::list(&state.amqp, topology, &queue, remaining)
                    .await
                    .map_err(dead_letter_status)?,
            );
        }
        Ok(Response::new(ListDeadLettersResponse {
            dead_letters: listed
                .into_iter()
                .map(|dead_letter| DeadLetter {
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
        let state = self.state()?;
        let request = request.into_inner();
        if !request.all && request.message_ids.is_empty() {
            return Err(Status::invalid_argument(
                "name message ids to replay, or set all",
            ));
        }
        let topology = &state.writer.topology;
        let mut replayed = 0;
        // A message id lives in one partition's DLQ; the others simply do not match it.
        for queue in topology.persons_dirty_queues() {
            replayed += dead_letters::replay(
                &state.amqp,
                topology,
                &queue,
                &request.message_ids,
                request.all,
            )
            .await
            .map_err(dead_letter_status)?;
        }
        tracing::info!(replayed, all = request.all, "replayed dead letters");
        Ok(Response::new(ReplayDeadLettersResponse { replayed }))
    }

    async fn purge_dead_letters(
        &self,
        _request: Request<PurgeDeadLettersRequest>,
    ) -> Result<Response<PurgeDeadLettersResponse>, Status> {
        let state = self.state()?;
        let topology = &state.writer.topology;
        let mut purged = 0;
        for queue in topology.persons_dirty_queues() {
            purged += dead_letters::purge(&state.amqp, topology, &queue)
                .await
                .map_err(dead_letter_status)?;
        }
        tracing::info!(purged, "purged dead letters");
        Ok(Response::new(PurgeDeadLettersResponse { purged }))
    }
}

fn dead_letter_status(error: optout_amqp::Error) -> Status {
    Status::unavailable(crate::error_chain(&error))
}

fn timestamp_ms(unix_ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: unix_ms.div_euclid(1000),
        nanos: i32::try_from(unix_ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}
