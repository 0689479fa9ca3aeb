//! The `/3.0` routes: auth, the per-key connection limit, fault injection, call accounting and
//! the handlers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{MatchedPath, Path, RawQuery, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::problem::Problem;
use super::render::{self, MemberView, Projection, json_response, list_json};
use super::store::{Account, Hash, MemberInput, MemberQuery, SortField, Status, StoreError};
use super::webhooks::{Events, Source, Sources, Webhook, WebhookHub, new_id};
use crate::shared::{Api, InjectedFault, Shared};

/// Mailchimp's documented limit of simultaneous connections per API key.
const DEFAULT_MAX_CONNECTIONS: usize = 10;

/// Everything the Mailchimp handlers share.
#[derive(Clone, Debug)]
pub(crate) struct McState {
    pub(crate) account: Arc<Account>,
    pub(crate) hub: Arc<WebhookHub>,
    pub(crate) shared: Shared,
    pub(crate) api_key: Arc<str>,
    in_flight: Arc<AtomicUsize>,
}

impl McState {
    pub(crate) fn new(
        account: Arc<Account>,
        hub: Arc<WebhookHub>,
        shared: Shared,
        api_key: String,
    ) -> Self {
        Self {
            account,
            hub,
            shared,
            api_key: api_key.into(),
            in_flight: Arc::default(),
        }
    }
}

/// The `/3.0` router.
pub(crate) fn router(state: McState) -> Router {
    let api = Router::new()
        .route("/", get(root))
        .route("/ping", get(ping))
        .route("/lists", get(get_lists))
        .route("/lists/{list_id}", get(get_list).post(batch_subscribe))
        .route(
            "/lists/{list_id}/members",
            get(get_members).post(create_member),
        )
        .route(
            "/lists/{list_id}/members/{subscriber_hash}",
            get(get_member)
                .put(put_member)
                .patch(patch_member)
                .delete(delete_member),
        )
        .route(
            "/lists/{list_id}/members/{subscriber_hash}/actions/delete-permanent",
            post(delete_permanent),
        )
        .route(
            "/lists/{list_id}/webhooks",
            get(get_webhooks).post(create_webhook),
        )
        .route(
            "/lists/{list_id}/webhooks/{webhook_id}",
            get(get_webhook).patch(patch_webhook).delete(delete_webhook),
        )
        .route("/search-members", get(search_members))
        .route_layer(middleware::from_fn_with_state(state.clone(), gate))
        .fallback(not_found)
        .with_state(state);
    Router::new().nest("/3.0", api)
}

async fn not_found(State(state): State<McState>, request: Request) -> Response {
    state
        .shared
        .stats
        .record_call(Api::Mailchimp, &format!("{} (unmatched)", request.method()));
    Problem::not_found().into_response()
}

/// Decrements the in-flight count when the request is answered.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accounting, auth, the connection limit and injected faults, in that order.
async fn gate(
    State(state): State<McState>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let route = matched.as_ref().map_or("", |path| path.as_str());
    let route = route.strip_prefix("/3.0").unwrap_or(route);
    let route = if route.is_empty() { "/" } else { route };
    let label = format!("{} {route}", request.method());
    let stats = &state.shared.stats;
    stats.record_call(Api::Mailchimp, &label);
    if !authorized(&request, &state.api_key) {
        return Problem::new(
            StatusCode::UNAUTHORIZED,
            "API Key Invalid",
            "Your API key may be invalid, or you've attempted to access the wrong datacenter.",
        )
        .into_response();
    }
    let settings = state.shared.faults.settings();
    let limit = settings
        .mailchimp_max_connections
        .unwrap_or(DEFAULT_MAX_CONNECTIONS);
    let in_flight = state.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
    let _guard = InFlight(Arc::clone(&state.in_flight));
    if in_flight > limit {
        stats.record_rejected_over_limit(Api::Mailchimp);
        return Problem::too_many_requests().into_response();
    }
    let latency = state.shared.faults.latency(Api::Mailchimp);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match state.shared.faults.draw(Api::Mailchimp) {
        Some(InjectedFault::TooManyRequests) => {
            return Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "Too Many Requests",
                "You have exceeded the limit of 10 simultaneous connections.",
            )
            .into_response();
        }
        Some(InjectedFault::Unavailable) => {
            return Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Service Unavailable",
                "The service is temporarily unavailable. Please try again later.",
            )
            .into_response();
        }
        Some(InjectedFault::Timeout(duration)) => {
            tokio::time::sleep(duration).await;
            return Problem::new(
                StatusCode::GATEWAY_TIMEOUT,
                "Gateway Timeout",
                "The request timed out.",
            )
            .into_response();
        }
        None => {}
    }
    next.run(request).await
}

/// Basic auth with any user name and the key as password, or `Bearer <key>`.
fn authorized(request: &Request, api_key: &str) -> bool {
    let Some(value) = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let supplied = if let Some(encoded) = value.strip_prefix("Basic ") {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Ok(text) = String::from_utf8(decoded) else {
            return false;
        };
        match text.split_once(':') {
            Some((_, password)) => password.to_owned(),
            None => return false,
        }
    } else if let Some(token) = value.strip_prefix("Bearer ") {
        token.trim().to_owned()
    } else {
        return false;
    };
    // Constant-time enough for an emulator: compare whole strings.
    supplied == api_key
}

fn params(raw: Option<String>) -> Vec<(String, String)> {
    raw.and_then(|query| serde_urlencoded::from_str(&query).ok())
        .unwrap_or_default()
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .rev()
        .find(|(name, _)| name == key)
        .map(|(_, value)| value.as_str())
}

fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, Problem> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Problem::bad_request(
            "We encountered an unspecified JSON parsing error.",
        ));
    }
    serde_json::from_slice(body).map_err(|error| {
        Problem::invalid(
            "The resource submitted could not be validated. For field-specific details, see the 'errors' array.",
        )
        .with_errors(json!([{ "field": "", "message": format!("Schema describes object, {error}") }]))
    })
}

fn store_problem(error: StoreError) -> Problem {
    match error {
        StoreError::NotFound => Problem::not_found(),
        StoreError::Compliance(email) => Problem::compliance(&email),
        StoreError::Forgotten(email) => Problem::forgotten(&email),
        StoreError::Exists(email) => Problem::exists(&email),
        StoreError::Invalid { detail, field } => {
            let problem = Problem::invalid(detail.clone());
            match field {
                Some(field) => problem.with_errors(json!([{ "field": field, "message": detail }])),
                None => problem,
            }
        }
        StoreError::NotArchivable => {
            let mut problem = Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "Method Not Allowed",
                "This list member cannot be removed. Can not archive a contact that is bounced, pending or archived",
            );
            problem.allow = Some("GET, PUT");
            problem
        }
    }
}

fn member_hash(segment: &str) -> Result<Hash, Problem> {
    super::store::member_key(segment).ok_or_else(Problem::not_found)
}

async fn root(State(state): State<McState>) -> Response {
    let total: u64 = state
        .account
        .lists
        .iter()
        .map(|list| list.read().unwrap_or_else(|p| p.into_inner()).total())
        .sum();
    json_response(
        &json!({
            "account_id": "0123456789abcdef01234567",
            "login_id": "123456789",
            "account_name": "Optout Sandbox",
            "email": "owner@example.com",
            "role": "owner",
            "total_subscribers": total,
        }),
        &Projection::default(),
    )
}

async fn ping() -> Response {
    json_response(
        &json!({ "health_status": "Everything's Chimpy!" }),
        &Projection::default(),
    )
}

fn paging(params: &[(String, String)]) -> Result<(usize, usize), Problem> {
    let number = |key: &str, default: usize| match param(params, key) {
        None | Some("") => Ok(default),
        Some(text) => text.parse::<usize>().map_err(|_| {
            Problem::invalid(format!("The value of {key} must be an integer"))
                .with_errors(json!([{ "field": key, "message": "must be an integer" }]))
        }),
    };
    // Mailchimp documents a maximum of 1000; larger counts are clamped.
    Ok((number("count", 10)?.min(1000), number("offset", 0)?))
}

async fn get_lists(State(state): State<McState>, RawQuery(raw): RawQuery) -> Response {
    let params = params(raw);
    let (count, offset) = match paging(&params) {
        Ok(paging) => paging,
        Err(problem) => return problem.into_response(),
    };
    let email_hash = param(&params, "email").map(super::store::hash_of);
    let mut lists = Vec::new();
    for list in &state.account.lists {
        let list = list.read().unwrap_or_else(|p| p.into_inner());
        if email_hash.is_some_and(|hash| list.get(&hash).is_none()) {
            continue;
        }
        lists.push(list_json(&list));
    }
    let total = lists.len();
    let lists: Vec<Value> = lists.into_iter().skip(offset).take(count).collect();
    json_response(
        &json!({
            "lists": lists,
            "total_items": total,
            "constraints": { "may_create": true, "max_instances": 100, "current_total_instances": total },
            "_links": [],
        }),
        &Projection::from_params(&params),
    )
}

async fn get_list(
    State(state): State<McState>,
    Path(list_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let Some(list) = state.account.list(&list_id) else {
        return Problem::not_found().into_response();
    };
    let body = list_json(&list.read().unwrap_or_else(|p| p.into_inner()));
    json_response(&body, &Projection::from_params(&params(raw)))
}

fn time_param(params: &[(String, String)], key: &str) -> Result<Option<i64>, Problem> {
    match param(params, key) {
        None | Some("") => Ok(None),
        Some(text) => render::parse_time(text).map(Some).ok_or_else(|| {
            Problem::invalid(format!(
                "The value of {key} is not a valid ISO 8601 date-time"
            ))
            .with_errors(json!([{ "field": key, "message": "Invalid date-time" }]))
        }),
    }
}

fn member_query(params: &[(String, String)]) -> Result<MemberQuery, Problem> {
    let (count, offset) = paging(params)?;
    let status = match param(params, "status") {
        None | Some("") => None,
        Some(text) => Some(Status::parse(text).ok_or_else(|| {
            Problem::invalid(format!("{text} is not a valid status")).with_errors(
                json!([{ "field": "status", "message": "Value is not one of the enum values" }]),
            )
        })?),
    };
    let sort_field = match param(params, "sort_field") {
        None | Some("") => SortField::Created,
        Some("last_changed") => SortField::LastChanged,
        Some("timestamp_opt") => SortField::TimestampOpt,
        Some("timestamp_signup") => SortField::TimestampSignup,
        Some(other) => {
            return Err(Problem::invalid(format!(
                "{other} is not a valid sort_field"
            )));
        }
    };
    Ok(MemberQuery {
        status,
        since_last_changed: time_param(params, "since_last_changed")?,
        before_last_changed: time_param(params, "before_last_changed")?,
        since_timestamp_opt: time_param(params, "since_timestamp_opt")?,
        before_timestamp_opt: time_param(params, "before_timestamp_opt")?,
        email_type: param(params, "email_type")
            .filter(|t| !t.is_empty())
            .map(str::to_owned),
        unique_email_id: param(params, "unique_email_id")
            .filter(|t| !t.is_empty())
            .map(str::to_owned),
        vip_only: param(params, "vip_only") == Some("true"),
        sort_field,
        descending: param(params, "sort_dir").is_some_and(|dir| dir.eq_ignore_ascii_case("desc")),
        offset,
        count,
    })
}

async fn get_members(
    State(state): State<McState>,
    Path(list_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let params = params(raw);
    let query = match member_query(&params) {
        Ok(query) => query,
        Err(problem) => return problem.into_response(),
    };
    let Some(list) = state.account.list(&list_id) else {
        return Problem::not_found().into_response();
    };
    let list = list.read().unwrap_or_else(|p| p.into_inner());
    let (total, slots) = list.query(&query);
    let members: Vec<MemberView<'_>> = slots
        .iter()
        .filter_map(|&slot| list.slot_member(slot))
        .map(|member| MemberView::new(member, &list.id, false))
        .collect();
    #[derive(serde::Serialize)]
    struct Page<'a> {
        members: Vec<MemberView<'a>>,
        list_id: &'a str,
        total_items: u64,
        #[serde(rename = "_links")]
        links: [Value; 0],
    }
    json_response(
        &Page {
            members,
            list_id: &list.id,
            total_items: total,
            links: [],
        },
        &Projection::from_params(&params),
    )
}

async fn get_member(
    State(state): State<McState>,
    Path((list_id, key)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Response {
    let Some(list) = state.account.list(&list_id) else {
        return Problem::not_found().into_response();
    };
    let hash = match member_hash(&key) {
        Ok(hash) => hash,
        Err(problem) => return problem.into_response(),
    };
    let list = list.read().unwrap_or_else(|p| p.into_inner());
    match list.get(&hash) {
        Some(member) => json_response(
            &MemberView::new(member, &list.id, true),
            &Projection::from_params(&params(raw)),
        ),
        None => Problem::not_found().into_response(),
    }
}

/// Runs a member write under the list's write lock, then answers with the member and queues
/// webhooks.
fn write_member(
    state: &McState,
    list_id: &str,
    body: &Bytes,
    raw: Option<String>,
    operation: impl FnOnce(
        &mut super::store::ListState,
        &MemberInput,
        i64,
    ) -> Result<
        (super::store::MemberRecord, Vec<super::store::Change>),
        StoreError,
    >,
) -> Response {
    let Some(list) = state.account.list(list_id) else {
        return Problem::not_found().into_response();
    };
    let input: MemberInput = match parse_body(body) {
        Ok(input) => input,
        Err(problem) => return problem.into_response(),
    };
    let now = state.account.clock.now();
    let result = {
        let mut list = list.write().unwrap_or_else(|p| p.into_inner());
        operation(&mut list, &input, now)
    };
    match result {
        Ok((member, changes)) => {
            state.shared.stats.record_writes(Api::Mailchimp, 1);
            state.hub.emit(list_id, Source::Api, &changes, &[]);
            json_response(
                &MemberView::new(&member, list_id, true),
                &Projection::from_params(&params(raw)),
            )
        }
        Err(error) => store_problem(error).into_response(),
    }
}

async fn create_member(
    State(state): State<McState>,
    Path(list_id): Path<String>,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> Response {
    write_member(&state, &list_id, &body, raw, |list, input, now| {
        list.create(input, now)
    })
}

async fn put_member(
    State(state): State<McState>,
    Path((list_id, key)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> Response {
    let hash = match member_hash(&key) {
        Ok(hash) => hash,
        Err(problem) => return problem.into_response(),
    };
    write_member(&state, &list_id, &body, raw, |list, input, now| {
        list.upsert(hash, input, now)
    })
}

async fn patch_member(
    State(state): State<McState>,
    Path((list_id, key)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> Response {
    let hash = match member_hash(&key) {
        Ok(hash) => hash,
        Err(problem) => return problem.into_response(),
    };
    write_member(&state, &list_id, &body, raw, |list, input, now| {
        list.patch(hash, input, now)
    })
}

async fn delete_member(
    State(state): State<McState>,
    Path((list_id, key)): Path<(String, String)>,
) -> Response {
    let Some(list) = state.account.list(&list_id) else {
        return Problem::not_found().into_response();
    };
    let hash = match member_hash(&key) {
        Ok(hash) => hash,
        Err(problem) => return problem.into_response(),
    };
    let now = state.account.clock.now();
    let result = list
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .archive(hash, now);
    match result {
        Ok(changes) => {
            state.shared.stats.record_writes(Api::Mailchimp, 1);
            state.hub.emit(&list_id, Source::Api, &changes, &[]);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(error) => store_problem(error).into_response(),
    }
}

async fn delete_permanent(
    State(state): State<McState>,
    Path((list_id, key)): Path<(String, String)>,
) -> Response {
    let Some(list) = state.account.list(&list_id) else {
        return Problem::not_found().into_response();
    };
    let hash = match member_hash(&key) {
        Ok(hash) => hash,
        Err(problem) => return problem.into_response(),
    };
    let result = list
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .delete_permanent(hash);
    match result {
        Ok(()) => {
            state.shared.stats.record_writes(Api::Mailchimp, 1);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(error) => store_problem(error).into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct BatchBody {
    #[serde(default)]
    members: Vec<MemberInput>,
    #[serde(default)]
    update_existing: bool,
}

/// Mailchimp's cap on members per batch subscribe.
const MAX_BATCH: usize = 500;

async fn batch_subscribe(
    State(state): State<McState>,
    Path(list_id): Path<String>,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> Response {
    let Some(list) = state.account.list(&list_id) else {
        return Problem::not_found().into_response();
    };
    let batch: BatchBody = match parse_body(&body) {
        Ok(batch) => batch,
        Err(problem) => return problem.into_response(),
    };
    if batch.members.len() > MAX_BATCH {
        return Problem::invalid(format!(
            "You can only add or update up to {MAX_BATCH} members per request; this one has {}.",
            batch.members.len()
        ))
        .with_errors(json!([{ "field": "members", "message": "too many members" }]))
        .into_response();
    }
    let mut created = Vec::new();
    let mut updated = Vec::new();
    let mut errors = Vec::new();
    let mut changes = Vec::new();
    {
        let mut list = list.write().unwrap_or_else(|p| p.into_inner());
        for item in &batch.members {
            let email = item.email_address.clone().unwrap_or_default();
            let hash = super::store::hash_of(&email);
            let now = state.account.clock.now();
            let exists = list.get(&hash).is_some();
            let result = if exists && !batch.update_existing {
                Err((
                    "ERROR_CONTACT_EXISTS",
                    format!(
                        "{} is already a list member, do you want to update? please provide update_existing:true in the request body",
                        email.trim()
                    ),
                    "",
                ))
            } else if exists {
                item.status()
                    .and_then(|status| {
                        list.update_existing(hash, item, status, super::store::Actor::Api, now)
                    })
                    .map_err(batch_error)
            } else {
                list.create(item, now).map_err(batch_error)
            };
            match result {
                Ok((member, member_changes)) => {
                    changes.extend(member_changes);
                    let view = serde_json::to_value(MemberView::new(&member, &list_id, false))
                        .unwrap_or(Value::Null);
                    if exists {
                        updated.push(view)
                    } else {
                        created.push(view)
                    }
                }
                Err((code, message, field)) => errors.push(json!({
                    "email_address": email,
                    "error": message,
                    "error_code": code,
                    "field": field,
                    "field_message": if field.is_empty() { String::new() } else { message.clone() },
                })),
            }
        }
    }
    let writes = (created.len() + updated.len()) as u64;
    state.shared.stats.record_writes(Api::Mailchimp, writes);
    state.hub.emit(&list_id, Source::Api, &changes, &[]);
    json_response(
        &json!({
            "total_created": created.len(),
            "total_updated": updated.len(),
            "error_count": errors.len(),
            "new_members": created,
            "updated_members": updated,
            "errors": errors,
            "_links": [],
        }),
        &Projection::from_params(&params(raw)),
    )
}

fn batch_error(error: StoreError) -> (&'static str, String, &'static str) {
    let problem = store_problem(error.clone());
    let field = match error {
        StoreError::Invalid { field, .. } => field.unwrap_or(""),
        _ => "",
    };
    let code = if matches!(error, StoreError::Exists(_)) {
        "ERROR_CONTACT_EXISTS"
    } else {
        "ERROR_GENERIC"
    };
    (code, problem.detail, field)
}

async fn search_members(State(state): State<McState>, RawQuery(raw): RawQuery) -> Response {
    let params = params(raw);
    let Some(needle) = param(&params, "query")
        .map(str::trim)
        .filter(|q| !q.is_empty())
    else {
        return Problem::invalid("The query parameter is required.")
            .with_errors(json!([{ "field": "query", "message": "This value is required" }]))
            .into_response();
    };
    let only_list = param(&params, "list_id").filter(|id| !id.is_empty());
    let hash = super::store::hash_of(needle);
    let lowered = needle.to_lowercase();
    let mut exact = Vec::new();
    let mut full = Vec::new();
    let mut full_total = 0;
    for list in &state.account.lists {
        let list = list.read().unwrap_or_else(|p| p.into_inner());
        if only_list.is_some_and(|id| id != list.id) {
            continue;
        }
        if let Some(member) = list.get(&hash) {
            exact.push(
                serde_json::to_value(MemberView::new(member, &list.id, false))
                    .unwrap_or(Value::Null),
            );
        }
        // Mailchimp caps search results at 10 per section.
        let (total, found) = list.search(&lowered, 10usize.saturating_sub(full.len()));
        full_total += total;
        for member in found {
            full.push(
                serde_json::to_value(MemberView::new(member, &list.id, false))
                    .unwrap_or(Value::Null),
            );
        }
    }
    let exact_total = exact.len();
    json_response(
        &json!({
            "exact_matches": { "members": exact, "total_items": exact_total },
            "full_search": { "members": full, "total_items": full_total },
            "_links": [],
        }),
        &Projection::from_params(&params),
    )
}

#[derive(Debug, Deserialize)]
struct WebhookBody {
    url: Option<String>,
    events: Option<Events>,
    sources: Option<Sources>,
}

async fn get_webhooks(State(state): State<McState>, Path(list_id): Path<String>) -> Response {
    if state.account.list(&list_id).is_none() {
        return Problem::not_found().into_response();
    }
    let hooks = state.hub.list(&list_id);
    json_response(
        &json!({ "webhooks": hooks, "list_id": list_id, "total_items": hooks.len(), "_links": [] }),
        &Projection::default(),
    )
}

fn webhook_url_problem() -> Problem {
    Problem::invalid(
        "The resource submitted could not be validated. For field-specific details, see the 'errors' array.",
    )
    .with_errors(json!([{
        "field": "url",
        "message": "We couldn't verify the URL is working. Please double-check and try again.",
    }]))
}

async fn create_webhook(
    State(state): State<McState>,
    Path(list_id): Path<String>,
    body: Bytes,
) -> Response {
    if state.account.list(&list_id).is_none() {
        return Problem::not_found().into_response();
    }
    let request: WebhookBody = match parse_body(&body) {
        Ok(request) => request,
        Err(problem) => return problem.into_response(),
    };
    let Some(url) = request
        .url
        .filter(|url| url.starts_with("http://") || url.starts_with("https://"))
    else {
        return webhook_url_problem().into_response();
    };
    if state.hub.url_taken(&list_id, &url, None) {
        return Problem::invalid("Sorry, you can't use the same webhook URL twice.")
            .into_response();
    }
    // Mailchimp checks the URL with a GET before it registers the webhook.
    if !state.hub.validate(&url).await {
        return webhook_url_problem().into_response();
    }
    let hook = Webhook {
        id: new_id(),
        url,
        events: request.events.unwrap_or_else(Events::all),
        sources: request.sources.unwrap_or_else(Sources::standard),
        list_id: list_id.clone(),
    };
    state.hub.insert(hook.clone());
    json_response(&hook, &Projection::default())
}

async fn get_webhook(
    State(state): State<McState>,
    Path((list_id, id)): Path<(String, String)>,
) -> Response {
    match state.hub.get(&list_id, &id) {
        Some(hook) => json_response(&hook, &Projection::default()),
        None => Problem::not_found().into_response(),
    }
}

async fn patch_webhook(
    State(state): State<McState>,
    Path((list_id, id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Some(mut hook) = state.hub.get(&list_id, &id) else {
        return Problem::not_found().into_response();
    };
    let request: WebhookBody = match parse_body(&body) {
        Ok(request) => request,
        Err(problem) => return problem.into_response(),
    };
    if let Some(url) = request.url
        && url != hook.url
    {
        if state.hub.url_taken(&list_id, &url, Some(&id)) {
            return Problem::invalid("Sorry, you can't use the same webhook URL twice.")
                .into_response();
        }
        if !state.hub.validate(&url).await {
            return webhook_url_problem().into_response();
        }
        hook.url = url;
    }
    if let Some(events) = request.events {
        hook.events = events;
    }
    if let Some(sources) = request.sources {
        hook.sources = sources;
    }
    state.hub.update(hook.clone());
    json_response(&hook, &Projection::default())
}

async fn delete_webhook(
    State(state): State<McState>,
    Path((list_id, id)): Path<(String, String)>,
) -> Response {
    if state.hub.remove(&list_id, &id) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        Problem::not_found().into_response()
    }
}
