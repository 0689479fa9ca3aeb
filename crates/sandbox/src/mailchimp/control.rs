//! Control endpoints under `/_sandbox` (plain HTTP, no auth): stats, faults, and acting as a
//! Mailchimp member (unsubscribe link, signup form, hard bounce). Not counted as API calls.

use axum::Json;
use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::api::McState;
use super::render::MemberView;
use super::store::{Actor, MemberInput, Status, StoreError, hash_of, member_key};
use super::webhooks::Source;
use crate::shared::FaultSettings;

/// The control router (to be mounted at the root of the Mailchimp port).
pub(crate) fn router(state: McState) -> Router {
    Router::new()
        .route("/_sandbox/stats", get(stats))
        .route("/_sandbox/stats/reset", post(reset_stats))
        .route("/_sandbox/faults", get(get_faults).put(put_faults))
        .route("/_sandbox/mailchimp/members", get(find_members))
        .route("/_sandbox/mailchimp/webhook-deliveries", get(deliveries))
        .route(
            "/_sandbox/mailchimp/lists/{list_id}/members/{email}/{action}",
            post(member_action),
        )
        .with_state(state)
}

async fn stats(State(state): State<McState>) -> Response {
    Json(state.shared.stats.snapshot()).into_response()
}

async fn reset_stats(State(state): State<McState>) -> Response {
    state.shared.stats.reset();
    StatusCode::NO_CONTENT.into_response()
}

async fn get_faults(State(state): State<McState>) -> Response {
    Json(state.shared.faults.settings()).into_response()
}

async fn put_faults(State(state): State<McState>, Json(settings): Json<FaultSettings>) -> Response {
    state.shared.faults.set(settings.clone());
    Json(settings).into_response()
}

async fn deliveries(State(state): State<McState>) -> Response {
    let (delivered, failed_attempts) = state.hub.counters();
    Json(json!({ "delivered": delivered, "failed_attempts": failed_attempts })).into_response()
}

fn query_params(raw: Option<String>) -> Vec<(String, String)> {
    raw.and_then(|query| serde_urlencoded::from_str(&query).ok())
        .unwrap_or_default()
}

fn control_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// `GET /_sandbox/mailchimp/members?email=X`: the member in every audience.
async fn find_members(State(state): State<McState>, RawQuery(raw): RawQuery) -> Response {
    let params = query_params(raw);
    let Some(email) = params
        .iter()
        .find(|(key, _)| key == "email")
        .map(|(_, v)| v.clone())
    else {
        return control_error(StatusCode::BAD_REQUEST, "missing query parameter email");
    };
    let hash = hash_of(&email);
    let mut members = Vec::new();
    for list in &state.account.lists {
        let list = list.read().unwrap_or_else(|p| p.into_inner());
        if let Some(member) = list.get(&hash) {
            members.push(
                serde_json::to_value(MemberView::new(member, &list.id, false))
                    .unwrap_or(Value::Null),
            );
        }
    }
    Json(json!({ "members": members })).into_response()
}

/// `POST /_sandbox/mailchimp/lists/{list_id}/members/{email}/{unsubscribe|resubscribe|bounce}`,
/// acting as the member (webhook source `user`, or `admin` with `?source=admin`).
async fn member_action(
    State(state): State<McState>,
    Path((list_id, email, action)): Path<(String, String, String)>,
    RawQuery(raw): RawQuery,
) -> Response {
    let params = query_params(raw);
    let param = |key: &str| {
        params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let source = match param("source") {
        None => Source::User,
        Some(text) => match Source::parse(&text) {
            Some(source) => source,
            None => {
                return control_error(StatusCode::BAD_REQUEST, "source must be user, admin or api");
            }
        },
    };
    let campaign_id = param("campaign_id").unwrap_or_else(super::webhooks::new_id);
    let (status, extra): (Status, Vec<(&str, String)>) = match action.as_str() {
        "unsubscribe" => (
            Status::Unsubscribed,
            vec![
                ("reason", "manual".to_owned()),
                ("campaign_id", campaign_id),
            ],
        ),
        "resubscribe" => (Status::Subscribed, Vec::new()),
        "bounce" => (
            Status::Cleaned,
            vec![("reason", "hard".to_owned()), ("campaign_id", campaign_id)],
        ),
        other => return control_error(StatusCode::NOT_FOUND, format!("unknown action {other}")),
    };
    let Some(list) = state.account.list(&list_id) else {
        return control_error(StatusCode::NOT_FOUND, format!("no list {list_id}"));
    };
    let Some(hash) = member_key(&email) else {
        return control_error(
            StatusCode::BAD_REQUEST,
            "not an email address or subscriber hash",
        );
    };
    let now = state.account.clock.now();
    let result = {
        let mut list = list.write().unwrap_or_else(|p| p.into_inner());
        match list.update_existing(
            hash,
            &MemberInput::default(),
            Some(status),
            Actor::Member,
            now,
        ) {
            // The signup form adds a member who is not on the list yet.
            Err(StoreError::NotFound) if status == Status::Subscribed && email.contains('@') => {
                let input = MemberInput {
                    email_address: Some(email),
                    status: Some("subscribed".to_owned()),
                    ..MemberInput::default()
                };
                list.create(&input, now)
            }
            other => other,
        }
    };
    match result {
        Ok((member, changes)) => {
            state.hub.emit(&list_id, source, &changes, &extra);
            Json(
                serde_json::to_value(MemberView::new(&member, &list_id, false))
                    .unwrap_or(Value::Null),
            )
            .into_response()
        }
        Err(StoreError::NotFound) => control_error(StatusCode::NOT_FOUND, "no such member"),
        Err(error) => control_error(StatusCode::BAD_REQUEST, format!("{error:?}")),
    }
}
