//! The `optout.admin.v1.Admin` service of the fetcher and the bearer-token check in front of it.

use std::sync::Arc;

use optout_proto::admin::v1::{
    AudienceStatus, GetStatusRequest, GetStatusResponse, ListDeadLettersRequest,
    ListDeadLettersResponse, PauseRequest, PauseResponse, PurgeDeadLettersRequest,
    PurgeDeadLettersResponse, ReplayDeadLettersRequest, ReplayDeadLettersResponse, ResumeRequest,
    ResumeResponse, TriggerSyncRequest, TriggerSyncResponse, admin_server::Admin,
};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tokio::sync::OnceCell;
use tonic::{Request, Response, Status, service::Interceptor};
use tracing::warn;

use crate::{
    Error, store,
    sync::{Fetcher, SyncRequest, timestamp},
};

/// Name reported as `service` in `GetStatus`.
pub const SERVICE_NAME: &str = "fetcher";

/// Requires `authorization: Bearer <token>` on every call, compared in constant time.
#[derive(Clone)]
pub struct BearerAuth {
    expected: Arc<SecretString>,
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("BearerAuth([REDACTED])")
    }
}

impl BearerAuth {
    /// Accepts calls that carry `token`.
    pub fn new(token: SecretString) -> Self {
        Self {
            expected: Arc::new(token),
        }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated(optout_service::auth::UNAUTHENTICATED))?;
        let matches: bool = presented
            .as_bytes()
            .ct_eq(self.expected.expose_secret().as_bytes())
            .into();
        if matches {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                optout_service::auth::UNAUTHENTICATED,
            ))
        }
    }
}

/// Serves Admin over a fetcher that may still be starting.
#[derive(Clone, Debug)]
pub struct AdminService {
    fetcher: Arc<OnceCell<Fetcher>>,
}

impl AdminService {
    /// Serves `fetcher` once it is set; until then calls answer `UNAVAILABLE`.
    pub fn new(fetcher: Arc<OnceCell<Fetcher>>) -> Self {
        Self { fetcher }
    }

    fn fetcher(&self) -> Result<&Fetcher, Status> {
        self.fetcher
            .get()
            .ok_or_else(|| Status::unavailable("fetcher is starting"))
    }
}

fn to_status(error: &Error) -> Status {
    match error {
        Error::Paused => Status::failed_precondition("fetcher is paused"),
        Error::ShuttingDown => Status::unavailable("fetcher is shutting down"),
        other => {
            warn!(error = %other.chain(), "admin call failed");
            Status::internal(other.chain())
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_status(
        &self,
        _request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        let fetcher = self.fetcher()?;
        let rows = store::audiences(fetcher.pool())
            .await
            .map_err(|error| to_status(&error))?;
        let scope = &fetcher.settings().audiences;
        let next_sync = if fetcher.is_paused() {
            None
        } else {
            fetcher.next_scheduled().map(timestamp)
        };
        let audiences = rows
            .into_iter()
            .filter(|row| scope.is_empty() || scope.contains(&row.audience_id))
            .map(|row| AudienceStatus {
                audience_id: row.audience_id,
                watermark: row.watermark.map(timestamp),
                last_sync: row.last_sync_finished_at.map(timestamp),
                next_sync,
            })
            .collect();
        let last_run = fetcher.last_run().unwrap_or_default();
        Ok(Response::new(GetStatusResponse {
            service: SERVICE_NAME.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: fetcher.uptime().as_secs(),
            paused: fetcher.is_paused(),
            busy: fetcher.is_busy().await,
            in_flight: 0,
            queues: Vec::new(),
            audiences,
            counters: fetcher.counters().snapshot().into_iter().collect(),
            last_run_id: last_run.run_id,
            last_run_finished: last_run.finished,
            salesforce_api_remaining: -1,
        }))
    }

    async fn pause(
        &self,
        _request: Request<PauseRequest>,
    ) -> Result<Response<PauseResponse>, Status> {
        let fetcher = self.fetcher()?;
        fetcher.pause();
        Ok(Response::new(PauseResponse { paused: true }))
    }

    async fn resume(
        &self,
        _request: Request<ResumeRequest>,
    ) -> Result<Response<ResumeResponse>, Status> {
        let fetcher = self.fetcher()?;
        fetcher.resume();
        Ok(Response::new(ResumeResponse { paused: false }))
    }

    async fn trigger_sync(
        &self,
        request: Request<TriggerSyncRequest>,
    ) -> Result<Response<TriggerSyncResponse>, Status> {
        let fetcher = self.fetcher()?;
        let request = request.into_inner();
        if request.dry_run {
            // Publishing pages would make the evaluator mark people dirty and the writer write for real, so
            // a dry run is the writer's alone: it reports from the decisions the evaluator holds now.
            return Ok(Response::new(TriggerSyncResponse {
                run_id: String::new(),
                dry_run_report: None,
            }));
        }
        let handle = fetcher
            .trigger(SyncRequest {
                audience_ids: request.audience_ids,
                full: request.full,
                dry_run: request.dry_run,
            })
            .await
            .map_err(|error| to_status(&error))?;
        Ok(Response::new(TriggerSyncResponse {
            run_id: handle.run_id,
            dry_run_report: None,
        }))
    }

    async fn list_dead_letters(
        &self,
        _request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        Err(no_dead_letters())
    }

    async fn replay_dead_letters(
        &self,
        _request: Request<ReplayDeadLettersRequest>,
    ) -> Result<Response<ReplayDeadLettersResponse>, Status> {
        Err(no_dead_letters())
    }

    async fn purge_dead_letters(
        &self,
        _request: Request<PurgeDeadLettersRequest>,
    ) -> Result<Response<PurgeDeadLettersResponse>, Status> {
        Err(no_dead_letters())
    }
}

fn no_dead_letters() -> Status {
    Status::unimplemented(
        "the fetcher consumes no queue, so it has no dead letters; ask the rule-evaluator or the salesforce-writer",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_with(header: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = header {
            request
                .metadata_mut()
                .insert("authorization", value.parse().expect("ascii header"));
        }
        request
    }

    #[test]
    fn accepts_the_configured_bearer_token() {
        let mut auth = BearerAuth::new(SecretString::from("s3cret"));
        assert!(auth.call(request_with(Some("Bearer s3cret"))).is_ok());
    }

    #[test]
    fn rejects_a_missing_or_wrong_token_as_unauthenticated() {
        let mut auth = BearerAuth::new(SecretString::from("s3cret"));
        for header in [
            None,
            Some("Bearer nope"),
            Some("s3cret"),
            Some("Bearer s3cret2"),
        ] {
            let status = auth.call(request_with(header)).expect_err("rejected");
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
        }
    }

    #[test]
    fn maps_paused_to_failed_precondition() {
        let status = to_status(&Error::Paused);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(status.message(), "fetcher is paused");
    }
}
