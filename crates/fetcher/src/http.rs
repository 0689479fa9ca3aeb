//! The fetcher's HTTP port: Mailchimp webhooks and the Memberships API as JSON (for Apex callouts
//! through a Named Credential, which speak HTTP only).
//!
//! | route | auth | |
//! |---|---|---|
//! | `GET /webhooks/mailchimp/{secret}` | secret in the path | Mailchimp's validation ping: 200 |
//! | `POST /webhooks/mailchimp/{secret}` | secret in the path | an event: published (confirmed) before the 200; 400 malformed, 404 wrong secret, 503 retry later |
//! | `GET /api/v1/memberships?email=` | bearer | status in every audience in scope |
//! | `POST /api/v1/unsubscribe` | bearer | `{email, audience_ids?, all?, reason?}` |
//! | `POST /api/v1/optouts` | bearer | `{email, reason?}`: unsubscribe from every audience the address is a member of (the Apex action) |
//! | `POST /api/v1/subscribe` | bearer | `{email, audience_id, merge_fields?, resubscribe?}` |
//! | `POST /api/v1/import` | bearer | `{audience_id, soql, include_opted_out?}` |
//!
//! Secrets and tokens are compared in constant time; a wrong webhook secret answers 404 like an
//! unknown path, so the endpoint does not reveal itself.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, Query, State},
    http::{HeaderMap, StatusCode, header::AUTHORIZATION},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::sync::OnceCell;
use tracing::{Instrument as _, debug, info, warn};

use crate::{
    form::{self, Form},
    http_limits::{self, RateLimit},
    import::{self, ImportRequest},
    memberships::{self, ApiAuth, ApiError, SubscribeRequest, UnsubscribeRequest},
    realtime::Realtime,
    webhook::{self, Handled},
};

/// Mailchimp waits 10 s for an answer; stop earlier and let it retry rather than be cut off.
const WEBHOOK_BUDGET: Duration = Duration::from_secs(8);

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct HttpState {
    realtime: Arc<OnceCell<Realtime>>,
    webhook_secret: Option<Arc<SecretString>>,
    auth: ApiAuth,
}

impl std::fmt::Debug for HttpState {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("HttpState")
            .field("webhooks", &self.webhook_secret.is_some())
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl HttpState {
    /// Handlers over `realtime` (set once the fetcher is connected). Without `webhook_secret` the
    /// webhook routes answer 404; the API accepts a bearer equal to any of `tokens`.
    pub fn new(
        realtime: Arc<OnceCell<Realtime>>,
        webhook_secret: Option<SecretString>,
        tokens: Vec<SecretString>,
    ) -> Self {
        Self {
            realtime,
            webhook_secret: webhook_secret
                .filter(|secret| !secret.expose_secret().is_empty())
                .map(Arc::new),
            auth: ApiAuth::new(tokens),
        }
    }

    fn secret_matches(&self, presented: &str) -> bool {
        self.webhook_secret.as_ref().is_some_and(|secret| {
            presented
                .as_bytes()
                .ct_eq(secret.expose_secret().as_bytes())
                .into()
        })
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(presented) = headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
        else {
            return false;
        };
        self.auth.accepts(presented)
    }

    fn realtime(&self) -> Result<&Realtime, ApiError> {
        self.realtime.get().ok_or(ApiError::Starting)
    }
}

/// Requests per second each route group takes (0: unlimited); see [`http_limits`].
#[derive(Clone, Copy, Debug)]
pub struct RateLimits {
    /// `/webhooks/...`.
    pub webhooks: u32,
    /// `/api/v1/...`.
    pub api: u32,
}

/// The router of the HTTP port.
pub fn router(state: HttpState, limits: RateLimits) -> Router {
    let webhooks = Router::new()
        .route(
            "/webhooks/mailchimp/{secret}",
            get(validate_webhook).post(receive_webhook),
        )
        .layer(DefaultBodyLimit::max(form::MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            RateLimit::new("webhooks", limits.webhooks),
            http_limits::rate_limit,
        ));
    let api = Router::new()
        .route("/api/v1/memberships", get(get_memberships))
        .route("/api/v1/unsubscribe", post(unsubscribe))
        .route("/api/v1/optouts", post(opt_out))
        .route("/api/v1/subscribe", post(subscribe))
        .route("/api/v1/import", post(run_import))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .layer(middleware::from_fn_with_state(
            RateLimit::new("api", limits.api),
            http_limits::rate_limit,
        ));
    // The head bound runs first, for every route and for unknown paths alike.
    webhooks
        .merge(api)
        .with_state(state)
        .layer(middleware::from_fn(http_limits::bound_head))
}

/// Serves `router` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn validate_webhook(State(state): State<HttpState>, Path(secret): Path<String>) -> Response {
    if !state.secret_matches(&secret) {
        return StatusCode::NOT_FOUND.into_response();
    }
    debug!("mailchimp webhook validation ping");
    StatusCode::OK.into_response()
}

async fn receive_webhook(
    State(state): State<HttpState>,
    Path(secret): Path<String>,
    body: Bytes,
) -> Response {
    // The server span of the delivery: without it the publish would be a root of its own, and the
    // trace would not show the webhook request the opt-out came in with. The route template, never
    // the path, names it, since the path holds the secret.
    let span = tracing::info_span!(
        "http.server",
        otel.name = "POST /webhooks/mailchimp/{secret}",
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = "POST",
        http.route = "/webhooks/mailchimp/{secret}",
        http.response.status_code = tracing::field::Empty,
    );
    let response = handle_webhook(&state, &secret, &body)
        .instrument(span.clone())
        .await;
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    response
}

async fn handle_webhook(state: &HttpState, secret: &str, body: &Bytes) -> Response {
    if !state.secret_matches(secret) {
        warn!("webhook with a wrong secret refused");
        return StatusCode::NOT_FOUND.into_response();
    }
    let event = match Form::parse(body)
        .map_err(|error| error.to_string())
        .and_then(|form| webhook::parse_event(&form).map_err(|error| error.to_string()))
    {
        Ok(event) => event,
        Err(reason) => {
            warn!(%reason, "malformed webhook refused");
            return (StatusCode::BAD_REQUEST, reason).into_response();
        }
    };
    let Ok(realtime) = state.realtime() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response();
    };
    match tokio::time::timeout(WEBHOOK_BUDGET, webhook::handle(realtime, event)).await {
        Ok(Ok(Handled::Published(count))) => {
            debug!(count, "webhook published");
            StatusCode::OK.into_response()
        }
        Ok(Ok(Handled::UnknownAudience(_) | Handled::Ignored)) => StatusCode::OK.into_response(),
        Ok(Err(error)) => {
            warn!(error = %error.chain(), "webhook not published; mailchimp will retry");
            (StatusCode::SERVICE_UNAVAILABLE, "retry later").into_response()
        }
        Err(_) => {
            warn!(budget = ?WEBHOOK_BUDGET, "webhook handling ran out of time; mailchimp will retry");
            (StatusCode::SERVICE_UNAVAILABLE, "retry later").into_response()
        }
    }
}

fn api_error(error: &ApiError) -> Response {
    let status = match error {
        ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
        ApiError::UnknownAudience(_) => StatusCode::NOT_FOUND,
        ApiError::Precondition(_) => StatusCode::PRECONDITION_FAILED,
        ApiError::Starting => StatusCode::SERVICE_UNAVAILABLE,
        ApiError::Internal(inner) => {
            warn!(error = %inner.chain(), "api call failed");
            StatusCode::BAD_GATEWAY
        }
    };
    let message = match error {
        ApiError::Internal(inner) => inner.chain(),
        other => other.to_string(),
    };
    (status, Json(json!({ "error": message }))).into_response()
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [("www-authenticate", "Bearer")],
        Json(json!({ "error": optout_service::auth::UNAUTHENTICATED })),
    )
        .into_response()
}

fn respond<T: serde::Serialize>(result: Result<T, ApiError>) -> Response {
    match result {
        Ok(body) => Json(body).into_response(),
        Err(error) => api_error(&error),
    }
}

/// Decodes a JSON body (whatever its content type: Apex callouts often send none).
fn decode<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|error| format!("invalid json body: {error}"))
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
}

#[derive(Debug, Deserialize)]
struct EmailQuery {
    email: String,
}

async fn get_memberships(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Query(query): Query<EmailQuery>,
) -> Response {
    if !state.authorized(&headers) {
        return unauthorized();
    }
    let realtime = match state.realtime() {
        Ok(realtime) => realtime,
        Err(error) => return api_error(&error),
    };
    respond(memberships::get_memberships(realtime, &query.email).await)
}

async fn unsubscribe(State(state): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    if !state.authorized(&headers) {
        return unauthorized();
    }
    let request: UnsubscribeRequest = match decode(&body) {
        Ok(request) => request,
        Err(message) => return bad_request(message),
    };
    let realtime = match state.realtime() {
        Ok(realtime) => realtime,
        Err(error) => return api_error(&error),
    };
    respond(memberships::unsubscribe(realtime, &request).await)
}

#[derive(Debug, Deserialize)]
struct OptOutRequest {
    email: String,
    #[serde(default)]
    reason: String,
}

async fn opt_out(State(state): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    if !state.authorized(&headers) {
        return unauthorized();
    }
    let request: OptOutRequest = match decode(&body) {
        Ok(request) => request,
        Err(message) => return bad_request(message),
    };
    let realtime = match state.realtime() {
        Ok(realtime) => realtime,
        Err(error) => return api_error(&error),
    };
    let reason = if request.reason.is_empty() {
        "salesforce-apex-optout".to_owned()
    } else {
        request.reason
    };
    info!(%reason, "opt-out requested over http");
    respond(
        memberships::unsubscribe(
            realtime,
            &UnsubscribeRequest {
                email: request.email,
                audience_ids: Vec::new(),
                all: true,
                reason,
                // Like the writer's automated opt-out: members only, no new unsubscribed contacts.
                existing_only: true,
            },
        )
        .await,
    )
}

async fn subscribe(State(state): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    if !state.authorized(&headers) {
        return unauthorized();
    }
    let request: SubscribeRequest = match decode(&body) {
        Ok(request) => request,
        Err(message) => return bad_request(message),
    };
    let realtime = match state.realtime() {
        Ok(realtime) => realtime,
        Err(error) => return api_error(&error),
    };
    respond(memberships::subscribe(realtime, &request).await)
}

async fn run_import(State(state): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    if !state.authorized(&headers) {
        return unauthorized();
    }
    let request: ImportRequest = match decode(&body) {
        Ok(request) => request,
        Err(message) => return bad_request(message),
    };
    let realtime = match state.realtime() {
        Ok(realtime) => realtime,
        Err(error) => return api_error(&error),
    };
    respond(import::import(realtime, &request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> HttpState {
        HttpState::new(
            Arc::new(OnceCell::new()),
            Some(SecretString::from("hook-secret")),
            vec![SecretString::from("api"), SecretString::from("admin")],
        )
    }

    #[test]
    fn matches_only_the_exact_webhook_secret() {
        let state = state();
        assert!(state.secret_matches("hook-secret"));
        for wrong in ["", "hook", "hook-secret2", "HOOK-SECRET"] {
            assert!(!state.secret_matches(wrong), "{wrong:?}");
        }
        let without = HttpState::new(Arc::new(OnceCell::new()), None, Vec::new());
        assert!(!without.secret_matches(""));
    }

    #[test]
    fn accepts_either_configured_bearer_token() {
        let state = state();
        let headers = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(AUTHORIZATION, value.parse().expect("ascii"));
            headers
        };
        assert!(state.authorized(&headers("Bearer api")));
        assert!(state.authorized(&headers("Bearer admin")));
        assert!(!state.authorized(&headers("Bearer nope")));
        assert!(!state.authorized(&headers("api")));
        assert!(!state.authorized(&HeaderMap::new()));
    }
}
