//! Control endpoints for tests, mounted under `/_sandbox/salesforce` on the plain-HTTP port:
//! look at records by email, edit and create them as a UI user would, convert Leads, expire
//! tokens, and read or set the API usage counter.

use std::collections::HashMap;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::SalesforceOrg;
use super::ops::{self, Raw};
use super::store::Object;

/// Control endpoints (plain HTTP, mounted by lib.rs under `/_sandbox/salesforce` on the Mailchimp port).
pub fn control_router(org: SalesforceOrg) -> Router {
    Router::new()
        .route("/records", get(records))
        .route("/records/{object}", post(create))
        .route("/records/{object}/{id}", patch(edit))
        .route("/leads/{id}/convert", post(convert))
        .route("/expire-tokens", post(expire_tokens))
        .route("/api-usage", get(api_usage).put(set_api_usage))
        .with_state(org)
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!([{ "message": message, "errorCode": code }])),
    )
        .into_response()
}

async fn records(
    State(org): State<SalesforceOrg>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(email) = query.get("email") else {
        return error(
            StatusCode::BAD_REQUEST,
            "MISSING_ARGUMENT",
            "email is required",
        );
    };
    axum::Json(org.records_with_email(email)).into_response()
}

fn body_object(body: &Bytes) -> Result<serde_json::Map<String, Json>, Box<Response>> {
    match serde_json::from_slice::<Json>(body) {
        Ok(Json::Object(map)) => Ok(map),
        _ => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
            "expected a JSON object",
        ))),
    }
}

fn pairs(map: &serde_json::Map<String, Json>) -> Vec<(&str, Raw<'_>)> {
    map.iter()
        .filter(|(key, _)| !matches!(key.as_str(), "attributes" | "id" | "Id"))
        .map(|(key, value)| (key.as_str(), Raw::Json(value)))
        .collect()
}

async fn edit(
    State(org): State<SalesforceOrg>,
    Path((object, id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Some(object) = Object::parse(&object) else {
        return error(StatusCode::NOT_FOUND, "NOT_FOUND", "unknown object");
    };
    let map = match body_object(&body) {
        Ok(map) => map,
        Err(response) => return *response,
    };
    let changes = match ops::prepare_changes(object, org.person_accounts(), pairs(&map)) {
        Ok(changes) => changes,
        Err(failure) => {
            return error(
                StatusCode::BAD_REQUEST,
                &failure.status_code,
                &failure.message,
            );
        }
    };
    let mut data = org.write();
    let index = match ops::target(&data, Some(object), &id) {
        Ok(index) => index,
        Err(failure) => {
            return error(
                StatusCode::BAD_REQUEST,
                &failure.status_code,
                &failure.message,
            );
        }
    };
    let stamp = data.next_stamp(true);
    data.apply(index, &changes, stamp);
    StatusCode::NO_CONTENT.into_response()
}

async fn create(
    State(org): State<SalesforceOrg>,
    Path(object): Path<String>,
    body: Bytes,
) -> Response {
    let Some(object) = Object::parse(&object) else {
        return error(StatusCode::NOT_FOUND, "NOT_FOUND", "unknown object");
    };
    let map = match body_object(&body) {
        Ok(map) => map,
        Err(response) => return *response,
    };
    let person_accounts = org.person_accounts();
    let changes = match ops::prepare_changes(object, person_accounts, pairs(&map)) {
        Ok(changes) => changes,
        Err(failure) => {
            return error(
                StatusCode::BAD_REQUEST,
                &failure.status_code,
                &failure.message,
            );
        }
    };
    let mut data = org.write();
    let stamp = data.next_stamp(true);
    match ops::create(&mut data, person_accounts, object, &changes, stamp) {
        Ok(index) => (
            StatusCode::CREATED,
            axum::Json(json!({ "id": data.id_of(index), "success": true, "errors": [] })),
        )
            .into_response(),
        Err(failure) => error(
            StatusCode::BAD_REQUEST,
            &failure.status_code,
            &failure.message,
        ),
    }
}

async fn convert(State(org): State<SalesforceOrg>, Path(id): Path<String>) -> Response {
    let mut data = org.write();
    let index = match ops::target(&data, Some(Object::Lead), &id) {
        Ok(index) => index,
        Err(failure) => {
            return error(
                StatusCode::BAD_REQUEST,
                &failure.status_code,
                &failure.message,
            );
        }
    };
    let stamp = data.next_stamp(true);
    let (contact, account) = ops::convert_lead(&mut data, index, stamp);
    axum::Json(json!({ "leadId": data.id_of(index), "contactId": data.id_of(contact), "accountId": data.id_of(account) }))
        .into_response()
}

async fn expire_tokens(State(org): State<SalesforceOrg>) -> Response {
    org.expire_tokens();
    StatusCode::NO_CONTENT.into_response()
}

async fn api_usage(State(org): State<SalesforceOrg>) -> Response {
    let (used, max) = org.api_usage();
    axum::Json(json!({ "used": used, "max": max })).into_response()
}

#[derive(Debug, Deserialize)]
struct UsageChange {
    used: Option<u64>,
    max: Option<u64>,
}

async fn set_api_usage(
    State(org): State<SalesforceOrg>,
    axum::Json(change): axum::Json<UsageChange>,
) -> Response {
    org.set_api_usage(change.used, change.max);
    let (used, max) = org.api_usage();
    axum::Json(json!({ "used": used, "max": max })).into_response()
}
