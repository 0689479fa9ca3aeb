//! gRPC clients of the services' `Admin` and the evaluator's `Decisions` services, with the
//! bearer token attached to every call and errors that name the service.

use std::{fmt, time::Duration};

use optout_proto::{
    admin::v1::{
        DeadLetter, GetStatusRequest, GetStatusResponse, ListDeadLettersRequest, PauseRequest,
        PurgeDeadLettersRequest, ReplayDeadLettersRequest, ResumeRequest, TriggerSyncRequest,
        TriggerSyncResponse, admin_client::AdminClient,
    },
    evaluator::v1::{ExplainRequest, ExplainResponse, decisions_client::DecisionsClient},
    writer::v1::{
        AuditEntry, AuditTrailRequest, RecordsForRequest, SalesforceRecord,
        records_client::RecordsClient,
    },
};
use secrecy::{ExposeSecret, SecretString};
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

use crate::{Error, Result};

/// The role a process plays in the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// `optout-fetcher`.
    Fetcher,
    /// `optout-rule-evaluator`.
    Evaluator,
    /// `optout-salesforce-writer`.
    Writer,
}

impl Role {
    /// Every role, in pipeline order.
    pub const ALL: [Role; 3] = [Role::Fetcher, Role::Evaluator, Role::Writer];

    /// The service name as the services spell it (`fetcher`, `rule-evaluator`, `salesforce-writer`).
    pub fn name(self) -> &'static str {
        match self {
            Role::Fetcher => "fetcher",
            Role::Evaluator => "rule-evaluator",
            Role::Writer => "salesforce-writer",
        }
    }

    /// The binary that runs this role.
    pub fn binary(self) -> &'static str {
        match self {
            Role::Fetcher => "optout-fetcher",
            Role::Evaluator => "optout-rule-evaluator",
            Role::Writer => "optout-salesforce-writer",
        }
    }

    /// Parses a service name as an operator types it (`evaluator` and `writer` are accepted too).
    pub fn parse(name: &str) -> Result<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "fetcher" | "optout-fetcher" => Ok(Role::Fetcher),
            "rule-evaluator" | "evaluator" | "optout-rule-evaluator" => Ok(Role::Evaluator),
            "salesforce-writer" | "writer" | "optout-salesforce-writer" => Ok(Role::Writer),
            _ => Err(Error::UnknownService(name.to_owned())),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerAuth {
    header: MetadataValue<Ascii>,
}

impl BearerAuth {
    /// Builds the header once; the value is marked sensitive so it is never logged.
    pub fn new(token: &SecretString) -> Result<Self> {
        let mut header: MetadataValue<Ascii> = format!("Bearer {}", token.expose_secret())
            .parse()
            .map_err(|_| Error::InvalidToken)?;
        header.set_sensitive(true);
        Ok(Self { header })
    }
}

impl fmt::Debug for BearerAuth {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("BearerAuth([redacted])")
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.header.clone());
        Ok(request)
    }
}

/// The `Admin` client type with the token attached.
pub type AuthedAdminClient = AdminClient<InterceptedService<Channel, BearerAuth>>;
/// The `Decisions` client type with the token attached.
pub type AuthedDecisionsClient = DecisionsClient<InterceptedService<Channel, BearerAuth>>;

/// The writer's `Records` client type with the token attached.
pub type AuthedRecordsClient = RecordsClient<InterceptedService<Channel, BearerAuth>>;

/// One connected service process.
#[derive(Clone, Debug)]
pub struct ServiceHandle {
    /// Display name, e.g. `rule-evaluator` or `rule-evaluator#2` for a second replica.
    pub name: String,
    /// What it runs.
    pub role: Role,
    /// The address it was reached at.
    pub endpoint: String,
    channel: Channel,
    auth: BearerAuth,
}

/// Turns `127.0.0.1:5000` into `http://127.0.0.1:5000`; keeps URLs as they are.
pub fn grpc_url(address: &str) -> String {
    let address = address.trim();
    if address.starts_with("http://") || address.starts_with("https://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    }
}

impl ServiceHandle {
    /// Connects to `endpoint` (fails fast, within 5 s, when nothing listens there).
    pub async fn connect(
        name: impl Into<String>,
        role: Role,
        endpoint: &str,
        token: &SecretString,
    ) -> Result<Self> {
        let name = name.into();
        let endpoint = grpc_url(endpoint);
        let channel = Endpoint::from_shared(endpoint.clone())
            .map_err(|source| Error::InvalidEndpoint {
                service: name.clone(),
                endpoint: endpoint.clone(),
                source,
            })?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .map_err(|source| Error::Unreachable {
                service: name.clone(),
                endpoint: endpoint.clone(),
                source,
            })?;
        Ok(Self {
            name,
            role,
            endpoint,
            channel,
            auth: BearerAuth::new(token)?,
        })
    }

    /// An `Admin` client on this process.
    pub fn admin(&self) -> AuthedAdminClient {
        AdminClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    /// A `Decisions` client on this process (the evaluator serves it).
    pub fn decisions(&self) -> AuthedDecisionsClient {
        DecisionsClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    /// A `Records` client on this process (the writer serves it).
    pub fn records(&self) -> AuthedRecordsClient {
        RecordsClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    /// `Records.RecordsFor`: what Salesforce holds for `email` now.
    pub async fn records_for(&self, email: &str) -> Result<Vec<SalesforceRecord>> {
        self.records()
            .records_for(RecordsForRequest {
                email: email.to_owned(),
            })
            .await
            .map(|response| response.into_inner().records)
            .map_err(|status| Error::from_status(&self.name, "RecordsFor", &status))
    }

    /// `Records.AuditTrail`: the writer's writes for `email`, oldest first (`limit` 0: default).
    pub async fn audit_trail(&self, email: &str, limit: u32) -> Result<Vec<AuditEntry>> {
        self.records()
            .audit_trail(AuditTrailRequest {
                email: email.to_owned(),
                limit,
            })
            .await
            .map(|response| response.into_inner().entries)
            .map_err(|status| Error::from_status(&self.name, "AuditTrail", &status))
    }

    /// `Admin.GetStatus`.
    pub async fn get_status(&self) -> Result<GetStatusResponse> {
        self.admin()
            .get_status(GetStatusRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| Error::from_status(&self.name, "GetStatus", &status))
    }

    /// Polls `GetStatus` until the service answers (it says UNAVAILABLE while starting), for at
    /// most `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<GetStatusResponse> {
        let started = std::time::Instant::now();
        loop {
            match self.get_status().await {
                Ok(status) => return Ok(status),
                Err(Error::Rpc {
                    code: tonic::Code::Unavailable,
                    message,
                    ..
                }) => {
                    if started.elapsed() >= timeout {
                        return Err(Error::Timeout {
                            what: format!("{} to be ready (last answer: {message})", self.name),
                            elapsed: started.elapsed(),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// `Admin.TriggerSync`.
    pub async fn trigger_sync(&self, request: TriggerSyncRequest) -> Result<TriggerSyncResponse> {
        self.admin()
            .trigger_sync(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| Error::from_status(&self.name, "TriggerSync", &status))
    }

    /// `Admin.Pause`; returns whether the service is paused now.
    pub async fn pause(&self) -> Result<bool> {
        self.admin()
            .pause(PauseRequest {})
            .await
            .map(|response| response.into_inner().paused)
            .map_err(|status| Error::from_status(&self.name, "Pause", &status))
    }

    /// `Admin.Resume`; returns whether the service is still paused.
    pub async fn resume(&self) -> Result<bool> {
        self.admin()
            .resume(ResumeRequest {})
            .await
            .map(|response| response.into_inner().paused)
            .map_err(|status| Error::from_status(&self.name, "Resume", &status))
    }

    /// `Admin.ListDeadLetters`: at most `limit` dead letters (0 lets the service choose).
    pub async fn list_dead_letters(&self, limit: u32) -> Result<Vec<DeadLetter>> {
        self.admin()
            .list_dead_letters(ListDeadLettersRequest { limit })
            .await
            .map(|response| response.into_inner().dead_letters)
            .map_err(|status| Error::from_status(&self.name, "ListDeadLetters", &status))
    }

    /// `Admin.ReplayDeadLetters`: the given message ids, or every dead letter when `all`;
    /// returns how many went back to their queue.
    pub async fn replay_dead_letters(&self, message_ids: Vec<String>, all: bool) -> Result<u32> {
        self.admin()
            .replay_dead_letters(ReplayDeadLettersRequest { message_ids, all })
            .await
            .map(|response| response.into_inner().replayed)
            .map_err(|status| Error::from_status(&self.name, "ReplayDeadLetters", &status))
    }

    /// `Admin.PurgeDeadLetters`: drops every dead letter; returns how many.
    pub async fn purge_dead_letters(&self) -> Result<u32> {
        self.admin()
            .purge_dead_letters(PurgeDeadLettersRequest {})
            .await
            .map(|response| response.into_inner().purged)
            .map_err(|status| Error::from_status(&self.name, "PurgeDeadLetters", &status))
    }

    /// `Decisions.Explain`.
    pub async fn explain(&self, email: &str) -> Result<ExplainResponse> {
        self.decisions()
            .explain(ExplainRequest {
                email: email.to_owned(),
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| Error::from_status(&self.name, "Explain", &status))
    }
}

/// Where the services listen: one address per replica.
#[derive(Clone, Debug, Default)]
pub struct FleetEndpoints {
    /// Fetcher replicas.
    pub fetcher: Vec<String>,
    /// Rule-evaluator replicas.
    pub evaluator: Vec<String>,
    /// Salesforce-writer replicas.
    pub writer: Vec<String>,
}

impl FleetEndpoints {
    /// The addresses of one role.
    pub fn of(&self, role: Role) -> &[String] {
        match role {
            Role::Fetcher => &self.fetcher,
            Role::Evaluator => &self.evaluator,
            Role::Writer => &self.writer,
        }
    }

    /// Fails with the flag and variable to use when a role has no address.
    pub fn require_all(&self) -> Result<()> {
        for role in Role::ALL {
            if self.of(role).is_empty() {
                let (flag, env) = match role {
                    Role::Fetcher => ("--fetcher", "OPTOUT_FETCHER_ADDR"),
                    Role::Evaluator => ("--evaluator", "OPTOUT_EVALUATOR_ADDR"),
                    Role::Writer => ("--writer", "OPTOUT_WRITER_ADDR"),
                };
                return Err(Error::MissingEndpoint {
                    service: role.name(),
                    flag,
                    env,
                });
            }
        }
        Ok(())
    }
}

/// Connected handles to every replica of every service.
#[derive(Clone, Debug, Default)]
pub struct Fleet {
    /// Every process, fetchers first, then evaluators, then writers.
    pub services: Vec<ServiceHandle>,
}

impl Fleet {
    /// Connects to every address (all in parallel); replicas after the first get `#2`, `#3`, ...
    pub async fn connect(endpoints: &FleetEndpoints, token: &SecretString) -> Result<Self> {
        let mut pending = Vec::new();
        for role in Role::ALL {
            for (index, endpoint) in endpoints.of(role).iter().enumerate() {
                let name = if index == 0 {
                    role.name().to_owned()
                } else {
                    format!("{}#{}", role.name(), index + 1)
                };
                pending.push(ServiceHandle::connect(name, role, endpoint, token));
            }
        }
        let services = futures::future::try_join_all(pending).await?;
        Ok(Self { services })
    }

    /// The replicas of one role.
    pub fn of(&self, role: Role) -> impl Iterator<Item = &ServiceHandle> + '_ {
        self.services
            .iter()
            .filter(move |service| service.role == role)
    }

    /// Waits until every process answers `GetStatus`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let pending = self
            .services
            .iter()
            .map(|service| service.wait_ready(timeout));
        futures::future::try_join_all(pending).await.map(drop)
    }

    /// The first replica of one role.
    pub fn first(&self, role: Role) -> Option<&ServiceHandle> {
        self.of(role).next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_service_names_as_operators_type_them() {
        assert_eq!(Role::parse("writer").ok(), Some(Role::Writer));
        assert_eq!(Role::parse("Rule-Evaluator").ok(), Some(Role::Evaluator));
        assert_eq!(Role::parse("optout-fetcher").ok(), Some(Role::Fetcher));
        assert!(matches!(
            Role::parse("mailchimp"),
            Err(Error::UnknownService(_))
        ));
    }

    #[test]
    fn adds_a_scheme_to_bare_addresses_only() {
        assert_eq!(grpc_url("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(grpc_url("https://example.com"), "https://example.com");
    }

    #[test]
    fn never_shows_the_token_in_debug_output() {
        let auth = BearerAuth::new(&SecretString::from("s3cret")).ok();
        assert!(!format!("{auth:?}").contains("s3cret"));
    }

    #[test]
    fn maps_unauthenticated_to_a_refused_token() {
        let error = Error::from_status(
            "fetcher",
            "GetStatus",
            &Status::unauthenticated("bad token"),
        );
        assert_eq!(error.to_string(), "the admin token was refused by fetcher");
    }
}
