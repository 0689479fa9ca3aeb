//! The Memberships API: a person's status in every audience, unsubscribe from some or all audiences
//! at once, and subscribe without ever overriding an opt-out. Served over gRPC
//! (`optout.memberships.v1.Memberships`) and as HTTP JSON (`crate::http`); both call these functions.
//!
//! Every change is applied to Mailchimp first, then the resulting member is published as a
//! `MembersChanged` (source `api`), so Salesforce follows through the pipeline within a second
//! instead of at the next poll.

use std::sync::Arc;

use chrono::Utc;
use futures::{StreamExt, stream};
use optout_mailchimp::{Member, MemberStatus, UpsertMember, normalize_email};
use optout_proto::memberships::v1::{
    self as pb, memberships_server::Memberships as MembershipsRpc,
};
use optout_proto::queue::v1::Source;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::sync::OnceCell;
use tonic::{Request, Response, Status, service::Interceptor};
use tracing::{info, warn};

use crate::{
    Error, Result, import, realtime::Realtime, realtime::member_snapshot, sync::timestamp,
};

/// Status reported for an address that is not in an audience.
pub const NOT_MEMBER: &str = "not_member";
/// Audiences read or written at once (the client also caps connections per key).
const CONCURRENCY: usize = 4;

/// Why a Memberships request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is unusable.
    #[error("{0}")]
    Invalid(String),
    /// The audience does not exist or is out of scope.
    #[error("audience {0} is unknown or not in scope")]
    UnknownAudience(String),
    /// Something this call needs is not configured.
    #[error("{0}")]
    Precondition(String),
    /// The service is starting.
    #[error("the fetcher is starting")]
    Starting,
    /// Mailchimp, the database or the broker failed.
    #[error(transparent)]
    Internal(#[from] Error),
}

impl ApiError {
    /// The gRPC status for this error.
    pub fn to_status(&self) -> Status {
        match self {
            ApiError::Invalid(message) => Status::invalid_argument(message.clone()),
            ApiError::UnknownAudience(_) => Status::not_found(self.to_string()),
            ApiError::Precondition(message) => Status::failed_precondition(message.clone()),
            ApiError::Starting => Status::unavailable(self.to_string()),
            ApiError::Internal(error) => {
                warn!(error = %error.chain(), "memberships call failed");
                Status::internal(error.chain())
            }
        }
    }
}

impl From<optout_mailchimp::Error> for ApiError {
    fn from(error: optout_mailchimp::Error) -> Self {
        ApiError::Internal(Error::Mailchimp(error))
    }
}

/// One audience's membership (HTTP JSON shape too).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// The audience.
    pub audience_id: String,
    /// Mailchimp's status, or [`NOT_MEMBER`].
    pub status: String,
    /// Mailchimp's last_changed, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_changed: Option<chrono::DateTime<Utc>>,
}

/// A person's memberships.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memberships {
    /// Normalised address.
    pub email: String,
    /// One per audience in scope.
    pub memberships: Vec<Membership>,
}

/// `Unsubscribe` request (HTTP JSON shape too).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnsubscribeRequest {
    /// The address.
    pub email: String,
    /// Audiences to leave; empty with `all` means every audience in scope.
    #[serde(default)]
    pub audience_ids: Vec<String>,
    /// Every audience in scope.
    #[serde(default)]
    pub all: bool,
    /// Why, for the logs.
    #[serde(default)]
    pub reason: String,
    /// Leave audiences the address is not in alone (instead of adding it as unsubscribed).
    #[serde(default)]
    pub existing_only: bool,
}

/// One audience's outcome of an unsubscribe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnsubscribeResult {
    /// The audience.
    pub audience_id: String,
    /// Status before ([`NOT_MEMBER`] when the address was added as unsubscribed).
    pub previous_status: String,
    /// Status after; empty when it failed.
    pub status: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// Outcome of an unsubscribe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnsubscribeResponse {
    /// Normalised address.
    pub email: String,
    /// Per audience.
    pub results: Vec<UnsubscribeResult>,
}

/// `Subscribe` request (HTTP JSON shape too).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SubscribeRequest {
    /// The address.
    pub email: String,
    /// The audience.
    pub audience_id: String,
    /// Merge fields (`{"FNAME": "Ada"}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge_fields: Option<serde_json::Value>,
    /// Re-subscribe a member who unsubscribed or was cleaned, by double opt-in (`pending`).
    #[serde(default)]
    pub resubscribe: bool,
}

/// Outcome of a subscribe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeResponse {
    /// Normalised address.
    pub email: String,
    /// The audience.
    pub audience_id: String,
    /// Status before ([`NOT_MEMBER`] for a new member).
    pub previous_status: String,
    /// Status after.
    pub status: String,
    /// A double opt-in confirmation was sent (status `pending`).
    pub double_opt_in_sent: bool,
    /// The member existed and kept its status.
    pub status_unchanged: bool,
}

fn valid_email(email: &str) -> std::result::Result<String, ApiError> {
    let email = normalize_email(email);
    let valid = email.len() <= 254
        && email
            .split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty())
        && !email.chars().any(char::is_whitespace);
    if valid {
        Ok(email)
    } else {
        Err(ApiError::Invalid(
            "email must be an address like name@example.com".to_owned(),
        ))
    }
}

/// The member of `email` in `audience_id`, `None` when not a member.
async fn current(realtime: &Realtime, audience_id: &str, email: &str) -> Result<Option<Member>> {
    match realtime.client().member(audience_id, email).await {
        Ok(member) => Ok(Some(member)),
        Err(optout_mailchimp::Error::NotFound { .. }) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

fn status_name(member: Option<&Member>) -> String {
    member.map_or_else(|| NOT_MEMBER.to_owned(), |member| member.status.to_string())
}

/// The status of `email` in every audience in scope.
pub async fn get_memberships(
    realtime: &Realtime,
    email: &str,
) -> std::result::Result<Memberships, ApiError> {
    let email = valid_email(email)?;
    let audiences = realtime.audiences_in_scope().await?;
    let found: Vec<Result<Membership>> = stream::iter(audiences)
        .map(|audience_id| {
            let email = &email;
            async move {
                let member = current(realtime, &audience_id, email).await?;
                Ok(Membership {
                    status: status_name(member.as_ref()),
                    last_changed: member.and_then(|member| member.last_changed),
                    audience_id,
                })
            }
        })
        .buffered(CONCURRENCY)
        .collect()
        .await;
    let memberships = found.into_iter().collect::<Result<Vec<_>>>()?;
    Ok(Memberships { email, memberships })
}

/// Unsubscribes `email` from the asked audiences at once (`PUT` with `status_if_new` and `status`
/// both `unsubscribed`, so an address not yet in an audience is added as unsubscribed), then
/// publishes the resulting members. A failure in one audience does not stop the others.
pub async fn unsubscribe(
    realtime: &Realtime,
    request: &UnsubscribeRequest,
) -> std::result::Result<UnsubscribeResponse, ApiError> {
    let email = valid_email(&request.email)?;
    let in_scope = realtime.audiences_in_scope().await?;
    let audiences = if request.audience_ids.is_empty() {
        if !request.all {
            return Err(ApiError::Invalid(
                "name audience_ids, or set all to unsubscribe from every audience".to_owned(),
            ));
        }
        in_scope
    } else {
        let mut audiences = Vec::new();
        for audience_id in &request.audience_ids {
            if !in_scope.contains(audience_id) {
                return Err(ApiError::UnknownAudience(audience_id.clone()));
            }
            if !audiences.contains(audience_id) {
                audiences.push(audience_id.clone());
            }
        }
        audiences
    };
    // The memberships left alone go first, so the evaluator judges the whole person (see
    // `publish_other_memberships`).
    let asked: Vec<&str> = audiences.iter().map(String::as_str).collect();
    realtime
        .publish_other_memberships(&asked, &email, Source::Api)
        .await?;
    let results: Vec<UnsubscribeResult> = stream::iter(audiences)
        .map(|audience_id| {
            let email = &email;
            async move {
                match unsubscribe_one(realtime, &audience_id, email, request.existing_only).await {
                    Ok((previous_status, status)) => UnsubscribeResult {
                        audience_id,
                        previous_status,
                        status,
                        error: String::new(),
                    },
                    Err(error) => {
                        warn!(%audience_id, error = %error.chain(), "unsubscribe failed in one audience");
                        UnsubscribeResult {
                            audience_id,
                            previous_status: String::new(),
                            status: String::new(),
                            error: error.chain(),
                        }
                    }
                }
            }
        })
        .buffered(CONCURRENCY)
        .collect()
        .await;
    info!(
        audiences = results.len(),
        failed = results.iter().filter(|result| !result.error.is_empty()).count(),
        reason = %request.reason,
        "unsubscribe applied"
    );
    Ok(UnsubscribeResponse { email, results })
}

async fn unsubscribe_one(
    realtime: &Realtime,
    audience_id: &str,
    email: &str,
    existing_only: bool,
) -> Result<(String, String)> {
    let before = current(realtime, audience_id, email).await?;
    let previous = status_name(before.as_ref());
    let member = match before {
        None if existing_only => return Ok((previous.clone(), previous)),
        // Nothing to change (a cleaned address receives no email either); publishing it again is
        // harmless and keeps the pipeline level-triggered.
        Some(member)
            if matches!(
                member.status,
                MemberStatus::Unsubscribed | MemberStatus::Cleaned
            ) =>
        {
            member
        }
        _ => {
            realtime
                .client()
                .upsert_member(
                    audience_id,
                    &UpsertMember {
                        email_address: email.to_owned(),
                        status_if_new: MemberStatus::Unsubscribed,
                        status: Some(MemberStatus::Unsubscribed),
                        merge_fields: None,
                    },
                )
                .await?
        }
    };
    realtime
        .publish(
            audience_id,
            Source::Api,
            vec![member_snapshot(&member, Utc::now())],
        )
        .await?;
    Ok((previous, member.status.to_string()))
}

/// Subscribes `email` to one audience without ever overriding an opt-out: a new address is added
/// as `subscribed` (`status_if_new`); an existing member keeps its status (only merge fields are
/// written). With `resubscribe`, a member who unsubscribed, was cleaned, is transactional or archived
/// is set to `pending`, which makes Mailchimp send a double opt-in confirmation; `subscribed` is never
/// sent for an existing member.
pub async fn subscribe(
    realtime: &Realtime,
    request: &SubscribeRequest,
) -> std::result::Result<SubscribeResponse, ApiError> {
    let email = valid_email(&request.email)?;
    let audience_id = request.audience_id.trim().to_owned();
    if audience_id.is_empty() {
        return Err(ApiError::Invalid("audience_id is required".to_owned()));
    }
    if let Some(fields) = &request.merge_fields
        && !fields.is_object()
    {
        return Err(ApiError::Invalid(
            "merge_fields must be a JSON object".to_owned(),
        ));
    }
    if !realtime.in_scope(&audience_id).await? {
        return Err(ApiError::UnknownAudience(audience_id));
    }
    let before = current(realtime, &audience_id, &email).await?;
    let previous_status = status_name(before.as_ref());
    let wants_pending = request.resubscribe
        && before.as_ref().is_some_and(|member| {
            !matches!(
                member.status,
                MemberStatus::Subscribed | MemberStatus::Pending
            )
        });
    let status = if wants_pending {
        Some(MemberStatus::Pending)
    } else {
        None
    };
    let archived = before
        .as_ref()
        .is_some_and(|member| member.status == MemberStatus::Archived);
    let member = if archived && status.is_none() {
        // A PUT without status would restore an archived member's old status: not asked for.
        before.clone()
    } else if before.is_some() && status.is_none() && request.merge_fields.is_none() {
        before.clone()
    } else {
        Some(
            realtime
                .client()
                .upsert_member(
                    &audience_id,
                    &UpsertMember {
                        email_address: email.clone(),
                        status_if_new: MemberStatus::Subscribed,
                        status,
                        merge_fields: request.merge_fields.clone(),
                    },
                )
                .await?,
        )
    };
    let Some(member) = member else {
        return Err(ApiError::Internal(Error::Config(
            "member vanished during subscribe".to_owned(),
        )));
    };
    realtime
        .publish(
            &audience_id,
            Source::Api,
            vec![member_snapshot(&member, Utc::now())],
        )
        .await?;
    let status_unchanged = before
        .as_ref()
        .is_some_and(|before| before.status == member.status);
    Ok(SubscribeResponse {
        email,
        audience_id,
        previous_status,
        status: member.status.to_string(),
        double_opt_in_sent: wants_pending && member.status == MemberStatus::Pending,
        status_unchanged,
    })
}

/// `optout.memberships.v1.Memberships` over a fetcher that may still be starting.
#[derive(Clone, Debug)]
pub struct MembershipsService {
    realtime: Arc<OnceCell<Realtime>>,
}

impl MembershipsService {
    /// Serves `realtime` once it is set; until then calls answer `UNAVAILABLE`.
    pub fn new(realtime: Arc<OnceCell<Realtime>>) -> Self {
        Self { realtime }
    }

    fn realtime(&self) -> std::result::Result<&Realtime, Status> {
        self.realtime
            .get()
            .ok_or_else(|| ApiError::Starting.to_status())
    }
}

fn to_pb_time(time: Option<chrono::DateTime<Utc>>) -> Option<prost_types::Timestamp> {
    time.map(timestamp)
}

#[tonic::async_trait]
impl MembershipsRpc for MembershipsService {
    async fn get_memberships(
        &self,
        request: Request<pb::GetMembershipsRequest>,
    ) -> std::result::Result<Response<pb::GetMembershipsResponse>, Status> {
        let realtime = self.realtime()?;
        let found = get_memberships(realtime, &request.into_inner().email)
            .await
            .map_err(|error| error.to_status())?;
        Ok(Response::new(pb::GetMembershipsResponse {
            email: found.email,
            memberships: found
                .memberships
                .into_iter()
                .map(|membership| pb::Membership {
                    audience_id: membership.audience_id,
                    status: membership.status,
                    last_changed: to_pb_time(membership.last_changed),
                })
                .collect(),
        }))
    }

    async fn unsubscribe(
        &self,
        request: Request<pb::UnsubscribeRequest>,
    ) -> std::result::Result<Response<pb::UnsubscribeResponse>, Status> {
        let realtime = self.realtime()?;
        let request = request.into_inner();
        let done = unsubscribe(
            realtime,
            &UnsubscribeRequest {
                email: request.email,
                audience_ids: request.audience_ids,
                all: request.all,
                reason: request.reason,
                existing_only: request.existing_only,
            },
        )
        .await
        .map_err(|error| error.to_status())?;
        Ok(Response::new(pb::UnsubscribeResponse {
            email: done.email,
            results: done
                .results
                .into_iter()
                .map(|result| pb::UnsubscribeResult {
                    audience_id: result.audience_id,
                    previous_status: result.previous_status,
                    status: result.status,
                    error: result.error,
                })
                .collect(),
        }))
    }

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> std::result::Result<Response<pb::SubscribeResponse>, Status> {
        let realtime = self.realtime()?;
        let request = request.into_inner();
        let merge_fields = if request.merge_fields_json.trim().is_empty() {
            None
        } else {
            Some(
                serde_json::from_str(&request.merge_fields_json).map_err(|error| {
                    Status::invalid_argument(format!("merge_fields_json is not JSON: {error}"))
                })?,
            )
        };
        let done = subscribe(
            realtime,
            &SubscribeRequest {
                email: request.email,
                audience_id: request.audience_id,
                merge_fields,
                resubscribe: request.resubscribe,
            },
        )
        .await
        .map_err(|error| error.to_status())?;
        Ok(Response::new(pb::SubscribeResponse {
            email: done.email,
            audience_id: done.audience_id,
            previous_status: done.previous_status,
            status: done.status,
            double_opt_in_sent: done.double_opt_in_sent,
            status_unchanged: done.status_unchanged,
        }))
    }

    async fn import(
        &self,
        request: Request<pb::ImportRequest>,
    ) -> std::result::Result<Response<pb::ImportResponse>, Status> {
        let realtime = self.realtime()?;
        let request = request.into_inner();
        let report = import::import(
            realtime,
            &import::ImportRequest {
                audience_id: request.audience_id,
                soql: request.soql,
                include_opted_out: request.include_opted_out,
            },
        )
        .await
        .map_err(|error| error.to_status())?;
        Ok(Response::new(report.into()))
    }
}

/// Requires `authorization: Bearer <token>` with any of the accepted tokens (the API token and the
/// admin token), compared in constant time.
#[derive(Clone)]
pub struct ApiAuth {
    tokens: Arc<Vec<SecretString>>,
}

impl std::fmt::Debug for ApiAuth {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("ApiAuth([REDACTED])")
    }
}

impl ApiAuth {
    /// Accepts calls carrying any non-empty token of `tokens`.
    pub fn new(tokens: Vec<SecretString>) -> Self {
        Self {
            tokens: Arc::new(
                tokens
                    .into_iter()
                    .filter(|token| !token.expose_secret().is_empty())
                    .collect(),
            ),
        }
    }

    /// Whether `presented` equals one of the tokens; every token is compared.
    pub fn accepts(&self, presented: &str) -> bool {
        self.tokens.iter().fold(false, |matched, token| {
            let equal: bool = presented
                .as_bytes()
                .ct_eq(token.expose_secret().as_bytes())
                .into();
            matched | equal
        })
    }
}

impl Interceptor for ApiAuth {
    fn call(&mut self, request: Request<()>) -> std::result::Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated(optout_service::auth::UNAUTHENTICATED))?;
        if self.accepts(presented) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                optout_service::auth::UNAUTHENTICATED,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_api_or_the_admin_token_only() {
        let auth = ApiAuth::new(vec![
            SecretString::from("api"),
            SecretString::from("admin"),
            SecretString::from(""),
        ]);
        assert!(auth.accepts("api") && auth.accepts("admin"));
        assert!(!auth.accepts("") && !auth.accepts("apix"));
    }

    #[test]
    fn normalises_and_validates_addresses() {
        assert_eq!(
            valid_email("  Ada@Example.COM ").expect("valid"),
            "ada@example.com"
        );
        for bad in ["", "ada", "@x.io", "ada@", "a da@x.io"] {
            assert!(valid_email(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn maps_errors_to_grpc_codes() {
        assert_eq!(
            ApiError::UnknownAudience("x".into()).to_status().code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            ApiError::Precondition("no salesforce".into())
                .to_status()
                .code(),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            ApiError::Invalid("bad".into()).to_status().code(),
            tonic::Code::InvalidArgument
        );
    }
}
