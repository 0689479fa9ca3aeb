//! The REST API routes under `/services/data/vNN.N/` with Salesforce's error envelope, the
//! `Sforce-Limit-Info` header, API budget accounting, fault injection and call statistics.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{MatchedPath, OriginalUri, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use serde_json::{Map, Value as Json, json};

use super::auth::{self, AuthConfig};
use super::ops::{self, Raw, RecordError};
use super::soql;
use super::store::{Field, Object, OrgData, format_datetime};
use super::{Cursor, SalesforceOrg, bulk};
use crate::shared::{Api, InjectedFault, Shared};

/// Longest request URI Salesforce serves; longer ones answer 414.
const MAX_URI_BYTES: usize = 16_384;
/// Records per query page unless `Sforce-Query-Options: batchSize=N` asks for fewer.
const PAGE_SIZE: usize = 2_000;
/// Most records in one sObject Collections request.
const MAX_COLLECTION: usize = 200;

/// What every handler needs.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) org: SalesforceOrg,
    pub(crate) shared: Shared,
    pub(crate) auth: Arc<AuthConfig>,
}

/// Salesforce's REST error envelope: a JSON array of `{message, errorCode}`.
pub(crate) fn sf_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!([{ "message": message, "errorCode": code }])),
    )
        .into_response()
}

fn record_error_response(status: StatusCode, error: &RecordError) -> Response {
    let mut body = json!({ "message": error.message, "errorCode": error.status_code });
    if !error.fields.is_empty() {
        body["fields"] = json!(error.fields);
    }
    (status, axum::Json(Json::Array(vec![body]))).into_response()
}

pub(crate) fn router(state: AppState) -> Router {
    let data = Router::new()
        .route("/", get(versions_root))
        .route("/limits", get(limits))
        .route("/limits/", get(limits))
        .route("/query", get(query))
        .route("/query/", get(query))
        .route("/queryAll", get(query_all))
        .route("/queryAll/", get(query_all))
        .route("/query/{locator}", get(query_more))
        .route("/queryAll/{locator}", get(query_more))
        .route("/sobjects/{object}/describe", get(describe))
        .route("/sobjects/{object}/describe/", get(describe))
        .route("/sobjects/{object}", post(create))
        .route("/sobjects/{object}/", post(create))
        .route(
            "/sobjects/{object}/{id}",
            get(read).patch(update).delete(delete),
        )
        .route("/composite/sobjects", patch(collection_update))
        .route("/composite/sobjects/", patch(collection_update))
        .route("/jobs/ingest", post(bulk::create_job))
        .route("/jobs/ingest/", post(bulk::create_job))
        .route(
            "/jobs/ingest/{job}",
            get(bulk::job_info)
                .patch(bulk::change_state)
                .delete(bulk::delete_job),
        )
        .route("/jobs/ingest/{job}/batches", put(bulk::upload))
        .route("/jobs/ingest/{job}/batches/", put(bulk::upload))
        .route(
            "/jobs/ingest/{job}/successfulResults",
            get(bulk::successful_results),
        )
        .route(
            "/jobs/ingest/{job}/successfulResults/",
            get(bulk::successful_results),
        )
        .route(
            "/jobs/ingest/{job}/failedResults",
            get(bulk::failed_results),
        )
        .route(
            "/jobs/ingest/{job}/failedResults/",
            get(bulk::failed_results),
        )
        .route(
            "/jobs/ingest/{job}/unprocessedrecords",
            get(bulk::unprocessed_results),
        )
        .route(
            "/jobs/ingest/{job}/unprocessedrecords/",
            get(bulk::unprocessed_results),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), gate));
    Router::new()
        .nest("/services/data/{version}", data)
        .route("/services/oauth2/token", post(auth::token))
        .fallback(not_found)
        .layer(middleware::from_fn(uri_limit))
        .with_state(state)
}

async fn not_found() -> Response {
    sf_error(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        "The requested resource does not exist",
    )
}

async fn uri_limit(request: Request, next: Next) -> Response {
    let length = request
        .uri()
        .path_and_query()
        .map_or(0, |path| path.as_str().len());
    if length > MAX_URI_BYTES {
        return sf_error(StatusCode::URI_TOO_LONG, "URI_TOO_LONG", "URI Too Long");
    }
    next.run(request).await
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("oauth"))
        .then_some(token.trim())
}

fn valid_version(version: &str) -> bool {
    version
        .strip_prefix('v')
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(major, minor)| {
            !major.is_empty()
                && !minor.is_empty()
                && major
                    .bytes()
                    .chain(minor.bytes())
                    .all(|b| b.is_ascii_digit())
        })
}

/// Authentication, budget, faults and accounting for every data API call.
async fn gate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(String::new, |path| path.as_str().to_owned());
    let label = format!(
        "{} {}",
        request.method(),
        route
            .strip_prefix("/services/data/{version}")
            .unwrap_or(&route)
            .trim_end_matches('/')
    );
    state.shared.stats.record_call(Api::Salesforce, &label);
    let response = gated(&state, request, next).await;
    with_limit_info(&state.org, response)
}

async fn gated(state: &AppState, request: Request, next: Next) -> Response {
    // Inside the nested router the URI lost its prefix; the original one still has the version.
    let original = request
        .extensions()
        .get::<OriginalUri>()
        .map_or_else(|| request.uri().clone(), |uri| uri.0.clone());
    let version = original
        .path()
        .trim_start_matches("/services/data/")
        .split('/')
        .next()
        .unwrap_or_default();
    if !valid_version(version) {
        return not_found().await;
    }
    if !bearer(request.headers()).is_some_and(|token| state.org.token_valid(token)) {
        return sf_error(
            StatusCode::UNAUTHORIZED,
            "INVALID_SESSION_ID",
            "Session expired or invalid",
        );
    }
    let latency = state.shared.faults.latency(Api::Salesforce);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match state.shared.faults.draw(Api::Salesforce) {
        Some(InjectedFault::TooManyRequests) => {
            return sf_error(
                StatusCode::FORBIDDEN,
                "REQUEST_LIMIT_EXCEEDED",
                "TotalRequests Limit exceeded.",
            );
        }
        Some(InjectedFault::Unavailable) => {
            return sf_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "SERVER_UNAVAILABLE",
                "Server temporarily unavailable, please try again later",
            );
        }
        Some(InjectedFault::Timeout(duration)) => {
            tokio::time::sleep(duration).await;
            return sf_error(
                StatusCode::GATEWAY_TIMEOUT,
                "REQUEST_TIMEOUT",
                "Request timed out",
            );
        }
        None => {}
    }
    if !state.org.count_call() {
        return sf_error(
            StatusCode::FORBIDDEN,
            "REQUEST_LIMIT_EXCEEDED",
            "TotalRequests Limit exceeded.",
        );
    }
    next.run(request).await
}

fn with_limit_info(org: &SalesforceOrg, mut response: Response) -> Response {
    let (used, max) = org.api_usage();
    if let Ok(value) = HeaderValue::from_str(&format!("api-usage={used}/{max}")) {
        response.headers_mut().insert("sforce-limit-info", value);
    }
    response
}

async fn versions_root(Path(params): Path<HashMap<String, String>>) -> Response {
    let version = params.get("version").cloned().unwrap_or_default();
    axum::Json(json!({
        "sobjects": format!("/services/data/{version}/sobjects"),
        "query": format!("/services/data/{version}/query"),
        "queryAll": format!("/services/data/{version}/queryAll"),
        "limits": format!("/services/data/{version}/limits"),
        "jobs": format!("/services/data/{version}/jobs"),
    }))
    .into_response()
}

async fn limits(State(state): State<AppState>) -> Response {
    let (used, max) = state.org.api_usage();
    axum::Json(json!({ "DailyApiRequests": { "Max": max, "Remaining": max.saturating_sub(used) } }))
        .into_response()
}

/// One record as the REST API serves it: `attributes` first, then the fields.
pub(crate) fn record_json(
    data: &OrgData,
    index: u32,
    fields: Option<&[Field]>,
    version: &str,
    person_accounts: bool,
) -> Json {
    let Some(record) = data.records.get(index as usize) else {
        return Json::Null;
    };
    let object = record.object;
    let id = data.id_of(index);
    let mut map = Map::new();
    map.insert(
        "attributes".into(),
        json!({ "type": object.name(), "url": format!("/services/data/{version}/sobjects/{}/{id}", object.name()) }),
    );
    let all;
    let fields = match fields {
        Some(fields) => fields,
        None => {
            all = Field::all(object, person_accounts);
            &all
        }
    };
    for field in fields {
        map.insert(field.name().into(), data.get(index, *field).to_json());
    }
    Json::Object(map)
}

fn version_of(params: &HashMap<String, String>) -> String {
    params
        .get("version")
        .cloned()
        .unwrap_or_else(|| "v59.0".into())
}

fn page_size(headers: &HeaderMap) -> usize {
    headers
        .get("sforce-query-options")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            value.split(',').find_map(|option| {
                let (key, size) = option.split_once('=')?;
                key.trim()
                    .eq_ignore_ascii_case("batchSize")
                    .then(|| size.trim().parse::<usize>().ok())?
            })
        })
        .map_or(PAGE_SIZE, |size| size.clamp(200, PAGE_SIZE))
}

fn page_response(
    state: &AppState,
    version: &str,
    cursor_id: Option<&str>,
    cursor: &Cursor,
    offset: usize,
) -> Response {
    let end = (offset + cursor.page_size).min(cursor.rows.len());
    let data = state.org.read();
    let records: Vec<Json> = cursor.rows[offset.min(end)..end]
        .iter()
        .map(|index| {
            record_json(
                &data,
                *index,
                Some(&cursor.fields),
                version,
                state.org.person_accounts(),
            )
        })
        .collect();
    drop(data);
    let done = end >= cursor.rows.len();
    let mut body = json!({ "totalSize": cursor.rows.len(), "done": done, "records": records });
    if let (false, Some(id)) = (done, cursor_id) {
        body["nextRecordsUrl"] = json!(format!("/services/data/{version}/query/{id}-{end}"));
    }
    axum::Json(body).into_response()
}

async fn run_query(
    state: AppState,
    params: HashMap<String, String>,
    query: HashMap<String, String>,
    headers: HeaderMap,
    include_deleted: bool,
) -> Response {
    let version = version_of(&params);
    let Some(text) = query.get("q").cloned() else {
        return sf_error(
            StatusCode::BAD_REQUEST,
            "MALFORMED_QUERY",
            "A query string has to be specified",
        );
    };
    let parsed = match soql::parse(&text, state.org.person_accounts()) {
        Ok(parsed) => parsed,
        Err(error) => return sf_error(StatusCode::BAD_REQUEST, error.code(), error.message()),
    };
    let org = state.org.clone();
    let executed = {
        let parsed = parsed.clone();
        tokio::task::spawn_blocking(move || soql::execute(&org.read(), &parsed, include_deleted))
            .await
    };
    let Ok(rows) = executed else {
        return sf_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "UNKNOWN_EXCEPTION",
            "query failed",
        );
    };
    let cursor = Cursor {
        fields: parsed.fields,
        rows,
        page_size: page_size(&headers),
    };
    if cursor.rows.len() <= cursor.page_size {
        return page_response(&state, &version, None, &cursor, 0);
    }
    let id = state.org.store_cursor(cursor);
    let Some(stored) = state.org.cursor(&id) else {
        return sf_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "UNKNOWN_EXCEPTION",
            "cursor vanished",
        );
    };
    page_response(&state, &version, Some(&id), &stored, 0)
}

async fn query(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    run_query(state, params, query, headers, false).await
}

async fn query_all(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    run_query(state, params, query, headers, true).await
}

async fn query_more(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
) -> Response {
    let version = version_of(&params);
    let locator = params
        .get("locator")
        .map(String::as_str)
        .unwrap_or_default();
    let parsed = locator
        .rsplit_once('-')
        .and_then(|(id, offset)| Some((id, offset.parse::<usize>().ok()?)))
        .and_then(|(id, offset)| Some((id, state.org.cursor(id)?, offset)));
    let Some((id, cursor, offset)) = parsed else {
        return sf_error(
            StatusCode::BAD_REQUEST,
            "INVALID_QUERY_LOCATOR",
            "invalid query locator",
        );
    };
    page_response(&state, &version, Some(id), &cursor, offset)
}

fn object_of(params: &HashMap<String, String>) -> Result<Object, Box<Response>> {
    let name = params.get("object").map(String::as_str).unwrap_or_default();
    Object::parse(name).ok_or_else(|| {
        Box::new(sf_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            &format!(
                "The requested resource does not exist: sObject type '{name}' is not supported"
            ),
        ))
    })
}

async fn describe(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
) -> Response {
    let object = match object_of(&params) {
        Ok(object) => object,
        Err(response) => return *response,
    };
    let fields: Vec<Json> = Field::all(object, state.org.person_accounts())
        .into_iter()
        .map(|field| {
            let kind = match field.kind() {
                super::store::FieldKind::Id => if field == Field::Id { "id" } else { "reference" },
                super::store::FieldKind::Text => "string",
                super::store::FieldKind::Email => "email",
                super::store::FieldKind::Boolean => "boolean",
                super::store::FieldKind::DateTime => "datetime",
            };
            json!({
                "name": field.name(),
                "label": field.name(),
                "type": kind,
                "updateable": field.updateable(object),
                "createable": field.updateable(object),
                "nillable": !matches!(field.kind(), super::store::FieldKind::Boolean) && field != Field::Id,
                "filterable": true,
                "sortable": true,
            })
        })
        .collect();
    axum::Json(json!({
        "name": object.name(),
        "label": object.name(),
        "keyPrefix": object.prefix(),
        "custom": false,
        "queryable": true,
        "updateable": true,
        "createable": true,
        "fields": fields,
    }))
    .into_response()
}

async fn read(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
) -> Response {
    let object = match object_of(&params) {
        Ok(object) => object,
        Err(response) => return *response,
    };
    let id = params.get("id").map(String::as_str).unwrap_or_default();
    let data = state.org.read();
    match data.lookup(Some(object), id) {
        Some(index) if !data.records[index as usize].deleted => axum::Json(record_json(
            &data,
            index,
            None,
            &version_of(&params),
            state.org.person_accounts(),
        ))
        .into_response(),
        _ => sf_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        ),
    }
}

fn parse_json(body: &Bytes) -> Result<Json, Box<Response>> {
    serde_json::from_slice(body).map_err(|error| {
        Box::new(sf_error(
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
            &format!("Unexpected character: {error}"),
        ))
    })
}

/// Field pairs of a JSON record body, skipping `attributes` and the id keys.
fn field_pairs(record: &Map<String, Json>) -> Vec<(&str, Raw<'_>)> {
    record
        .iter()
        .filter(|(key, _)| !matches!(key.as_str(), "attributes" | "id" | "Id"))
        .map(|(key, value)| (key.as_str(), Raw::Json(value)))
        .collect()
}

async fn update(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let object = match object_of(&params) {
        Ok(object) => object,
        Err(response) => return *response,
    };
    let id = params.get("id").map(String::as_str).unwrap_or_default();
    let body = match parse_json(&body) {
        Ok(Json::Object(map)) => map,
        Ok(_) => {
            return sf_error(
                StatusCode::BAD_REQUEST,
                "JSON_PARSER_ERROR",
                "expected a JSON object",
            );
        }
        Err(response) => return *response,
    };
    let mut data = state.org.write();
    let index = match ops::target(&data, Some(object), id) {
        Ok(index) => index,
        Err(error) if error.status_code == "INVALID_CROSS_REFERENCE_KEY" => {
            return sf_error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "The requested resource does not exist",
            );
        }
        Err(error) => return record_error_response(StatusCode::BAD_REQUEST, &error),
    };
    let changes =
        match ops::prepare_changes(object, state.org.person_accounts(), field_pairs(&body)) {
            Ok(changes) => changes,
            Err(error) => return record_error_response(StatusCode::BAD_REQUEST, &error),
        };
    if state.shared.faults.lock_row_fails() {
        return record_error_response(StatusCode::BAD_REQUEST, &RecordError::lock_row(id));
    }
    let stamp = data.next_stamp(true);
    data.apply(index, &changes, stamp);
    drop(data);
    state.shared.stats.record_writes(Api::Salesforce, 1);
    StatusCode::NO_CONTENT.into_response()
}

async fn create(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let object = match object_of(&params) {
        Ok(object) => object,
        Err(response) => return *response,
    };
    let body = match parse_json(&body) {
        Ok(Json::Object(map)) => map,
        Ok(_) => {
            return sf_error(
                StatusCode::BAD_REQUEST,
                "JSON_PARSER_ERROR",
                "expected a JSON object",
            );
        }
        Err(response) => return *response,
    };
    let person_accounts = state.org.person_accounts();
    let changes = match ops::prepare_changes(object, person_accounts, field_pairs(&body)) {
        Ok(changes) => changes,
        Err(error) => return record_error_response(StatusCode::BAD_REQUEST, &error),
    };
    let mut data = state.org.write();
    let stamp = data.next_stamp(true);
    match ops::create(&mut data, person_accounts, object, &changes, stamp) {
        Ok(index) => {
            let id = data.id_of(index);
            drop(data);
            state.shared.stats.record_writes(Api::Salesforce, 1);
            (
                StatusCode::CREATED,
                axum::Json(json!({ "id": id, "success": true, "errors": [] })),
            )
                .into_response()
        }
        Err(error) => record_error_response(StatusCode::BAD_REQUEST, &error),
    }
}

async fn delete(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
) -> Response {
    let object = match object_of(&params) {
        Ok(object) => object,
        Err(response) => return *response,
    };
    let id = params.get("id").map(String::as_str).unwrap_or_default();
    let mut data = state.org.write();
    match data.lookup(Some(object), id) {
        Some(index) if !data.records[index as usize].deleted => {
            let stamp = data.next_stamp(true);
            data.delete(index, stamp);
            drop(data);
            state.shared.stats.record_writes(Api::Salesforce, 1);
            StatusCode::NO_CONTENT.into_response()
        }
        Some(_) => sf_error(
            StatusCode::NOT_FOUND,
            "ENTITY_IS_DELETED",
            "entity is deleted",
        ),
        None => sf_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
        ),
    }
}

/// A record of a collections request, ready to write, or why it cannot be.
type Prepared = Result<(u32, Vec<(Field, super::store::Value)>), RecordError>;

/// `PATCH /composite/sobjects`: up to 200 records of any types, answered 200 with one
/// SaveResult per record in order, honouring `allOrNone`.
async fn collection_update(State(state): State<AppState>, body: Bytes) -> Response {
    let body = match parse_json(&body) {
        Ok(body) => body,
        Err(response) => return *response,
    };
    let all_or_none = body
        .get("allOrNone")
        .and_then(Json::as_bool)
        .unwrap_or(false);
    let Some(records) = body.get("records").and_then(Json::as_array) else {
        return sf_error(
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            "records: required field is missing",
        );
    };
    if records.len() > MAX_COLLECTION {
        return sf_error(
            StatusCode::BAD_REQUEST,
            "EXCEEDED_ID_LIMIT",
            "record limit reached. cannot submit more than 200 records into this call",
        );
    }
    let person_accounts = state.org.person_accounts();
    let mut data = state.org.write();
    let prepared: Vec<Prepared> = records
        .iter()
        .map(|record| {
            let Some(map) = record.as_object() else {
                return Err(RecordError::new(
                    "JSON_PARSER_ERROR",
                    "expected a JSON object",
                ));
            };
            let type_name = map
                .get("attributes")
                .and_then(|attributes| attributes.get("type"))
                .and_then(Json::as_str);
            let Some(object) = type_name.and_then(Object::parse) else {
                return Err(RecordError::new(
                    "INVALID_TYPE",
                    "sObject type is missing or not supported",
                ));
            };
            let id = map
                .get("id")
                .or_else(|| map.get("Id"))
                .and_then(Json::as_str)
                .unwrap_or_default();
            if id.is_empty() {
                return Err(RecordError::new(
                    "MISSING_ARGUMENT",
                    "Id not specified in an update call",
                ));
            }
            let index = ops::target(&data, Some(object), id)?;
            let changes = ops::prepare_changes(object, person_accounts, field_pairs(map))?;
            if state.shared.faults.lock_row_fails() {
                return Err(RecordError::lock_row(id));
            }
            Ok((index, changes))
        })
        .collect();
    let any_failed = prepared.iter().any(Result::is_err);
    let results: Vec<Json> = if all_or_none && any_failed {
        prepared
            .iter()
            .map(|outcome| {
                let error = match outcome {
                    Err(error) => error.clone(),
                    Ok(_) => RecordError::rolled_back(),
                };
                json!({ "success": false, "errors": [error.to_json()] })
            })
            .collect()
    } else {
        let stamp = data.next_stamp(true);
        let mut written = 0;
        let results = prepared
            .iter()
            .map(|outcome| match outcome {
                Ok((index, changes)) => {
                    data.apply(*index, changes, stamp);
                    written += 1;
                    json!({ "id": data.id_of(*index), "success": true, "errors": [] })
                }
                Err(error) => json!({ "success": false, "errors": [error.to_json()] }),
            })
            .collect();
        state.shared.stats.record_writes(Api::Salesforce, written);
        results
    };
    drop(data);
    axum::Json(Json::Array(results)).into_response()
}

/// Formats "now" as Salesforce does, for job metadata.
pub(crate) fn now_text() -> String {
    format_datetime(chrono::Utc::now().timestamp_millis())
}
