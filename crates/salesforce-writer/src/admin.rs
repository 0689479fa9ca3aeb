//! The `optout.admin.v1.Admin` service of the writer.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use optout_proto::admin::v1::admin_server::Admin;
use optout_proto::admin::v1::{
    GetStatusRequest, GetStatusResponse, ListDeadLettersRequest, ListDeadLettersResponse,
    PauseRequest, PauseResponse, PurgeDeadLettersRequest, PurgeDeadLettersResponse, QueueStatus,
    ReplayDeadLettersRequest, ReplayDeadLettersResponse, ResumeRequest, ResumeResponse,
    TriggerSyncRequest, TriggerSyncResponse,
};
use tonic::{Request, Response, Status};

use crate::AppState;

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
        if *state.paused.borrow() {
            return Err(Status::failed_precondition(
                "the writer is paused; resume it first",
            ));
        }
        let request = request.into_inner();
        let run_id = state.start_poll_cycle(request.full, request.dry_run);
        Ok(Response::new(TriggerSyncResponse { run_id }))
    }

    async fn list_dead_letters(
        &self,
        _request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        Err(Status::unimplemented(
            "dead letters are not served by the writer yet",
        ))
    }

    async fn replay_dead_letters(
        &self,
        _request: Request<ReplayDeadLettersRequest>,
    ) -> Result<Response<ReplayDeadLettersResponse>, Status> {
        Err(Status::unimplemented(
            "dead letters are not served by the writer yet",
        ))
    }

    async fn purge_dead_letters(
        &self,
        _request: Request<PurgeDeadLettersRequest>,
    ) -> Result<Response<PurgeDeadLettersResponse>, Status> {
        Err(Status::unimplemented(
            "dead letters are not served by the writer yet",
        ))
    }
}
