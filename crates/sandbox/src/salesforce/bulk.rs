//! Bulk API 2.0 ingest jobs: create, upload CSV (201), `UploadComplete`, asynchronous
//! processing `UploadComplete -> InProgress -> JobComplete`, and result CSVs.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value as Json, json};

use super::api::{AppState, now_text, sf_error};
use super::ids;
use super::ops::{self, Raw, RecordError};
use super::store::{Field, Object};
use crate::shared::Api;

/// Rows written under one hold of the org's write lock, so queries interleave with big jobs.
const ROWS_PER_CHUNK: usize = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Operation {
    Insert,
    Update,
}

impl Operation {
    fn name(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
        }
    }
}

/// One ingest job.
#[derive(Debug)]
pub(crate) struct Job {
    id: String,
    object: Object,
    operation: Operation,
    state: &'static str,
    created: String,
    modstamp: String,
    line_ending: String,
    upload: String,
    processed: u64,
    failed: u64,
    error_message: Option<String>,
    successful_csv: String,
    failed_csv: String,
    unprocessed_csv: String,
    processing_ms: u64,
}

impl Job {
    fn info(&self, state: &AppState, version: &str) -> Json {
        let api_version = version
            .trim_start_matches('v')
            .parse::<f64>()
            .unwrap_or(59.0);
        let mut info = json!({
            "id": self.id,
            "operation": self.operation.name(),
            "object": self.object.name(),
            "createdById": state.org.user_id(),
            "createdDate": self.created,
            "systemModstamp": self.modstamp,
            "state": self.state,
            "concurrencyMode": "Parallel",
            "contentType": "CSV",
            "apiVersion": api_version,
            "jobType": "V2Ingest",
            "contentUrl": format!("services/data/{version}/jobs/ingest/{}/batches", self.id),
            "lineEnding": self.line_ending,
            "columnDelimiter": "COMMA",
            "numberRecordsProcessed": self.processed,
            "numberRecordsFailed": self.failed,
            "retries": 0,
            "totalProcessingTime": self.processing_ms,
            "apiActiveProcessingTime": self.processing_ms,
            "apexProcessingTime": 0,
        });
        if let Some(message) = &self.error_message {
            info["errorMessage"] = json!(message);
        }
        info
    }
}

fn version(params: &HashMap<String, String>) -> String {
    params
        .get("version")
        .cloned()
        .unwrap_or_else(|| "v59.0".into())
}

fn job_not_found() -> Response {
    sf_error(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        "The requested resource does not exist",
    )
}

pub(crate) async fn create_job(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let Ok(request) = serde_json::from_slice::<Json>(&body) else {
        return sf_error(StatusCode::BAD_REQUEST, "JSON_PARSER_ERROR", "invalid JSON");
    };
    let object_name = request
        .get("object")
        .and_then(Json::as_str)
        .unwrap_or_default();
    let Some(object) = Object::parse(object_name) else {
        return sf_error(
            StatusCode::BAD_REQUEST,
            "INVALIDENTITY",
            &format!("Entity '{object_name}' is not supported by the Bulk API"),
        );
    };
    let operation = match request.get("operation").and_then(Json::as_str) {
        Some("insert") => Operation::Insert,
        Some("update") => Operation::Update,
        Some(other) => {
            return sf_error(
                StatusCode::BAD_REQUEST,
                "FEATURENOTENABLED",
                &format!("operation '{other}' is not supported by the sandbox"),
            );
        }
        None => {
            return sf_error(
                StatusCode::BAD_REQUEST,
                "INVALIDJOB",
                "operation is required",
            );
        }
    };
    let delimiter = request
        .get("columnDelimiter")
        .and_then(Json::as_str)
        .unwrap_or("COMMA");
    if delimiter != "COMMA" {
        return sf_error(
            StatusCode::BAD_REQUEST,
            "FEATURENOTENABLED",
            "only COMMA column delimiters are supported by the sandbox",
        );
    }
    let now = now_text();
    let job = Job {
        id: format!("750{}", ids::random_alphanumeric(15)),
        object,
        operation,
        state: "Open",
        created: now.clone(),
        modstamp: now,
        line_ending: request
            .get("lineEnding")
            .and_then(Json::as_str)
            .unwrap_or("LF")
            .to_owned(),
        upload: String::new(),
        processed: 0,
        failed: 0,
        error_message: None,
        successful_csv: String::new(),
        failed_csv: String::new(),
        unprocessed_csv: String::new(),
        processing_ms: 0,
    };
    let info = job.info(&state, &version(&params));
    state.org.jobs().insert(job.id.clone(), job);
    axum::Json(info).into_response()
}

pub(crate) async fn job_info(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
) -> Response {
    let job_id = params.get("job").cloned().unwrap_or_default();
    match state.org.jobs().get(&job_id) {
        Some(job) => axum::Json(job.info(&state, &version(&params))).into_response(),
        None => job_not_found(),
    }
}

pub(crate) async fn delete_job(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
) -> Response {
    let job_id = params.get("job").cloned().unwrap_or_default();
    match state.org.jobs().remove(&job_id) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => job_not_found(),
    }
}

pub(crate) async fn upload(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let job_id = params.get("job").cloned().unwrap_or_default();
    let mut jobs = state.org.jobs();
    let Some(job) = jobs.get_mut(&job_id) else {
        return job_not_found();
    };
    if job.state != "Open" {
        return sf_error(
            StatusCode::CONFLICT,
            "INVALIDJOBSTATE",
            "Job is not in Open state",
        );
    }
    let Ok(text) = std::str::from_utf8(&body) else {
        return sf_error(StatusCode::BAD_REQUEST, "INVALIDBATCH", "CSV must be UTF-8");
    };
    // Several uploads to one job are allowed; later ones repeat the header line.
    if job.upload.is_empty() {
        job.upload.push_str(text);
    } else {
        let rows = text.split_once('\n').map_or("", |(_, rows)| rows);
        if !job.upload.ends_with('\n') {
            job.upload.push('\n');
        }
        job.upload.push_str(rows);
    }
    StatusCode::CREATED.into_response()
}

pub(crate) async fn change_state(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let job_id = params.get("job").cloned().unwrap_or_default();
    let requested = serde_json::from_slice::<Json>(&body)
        .ok()
        .and_then(|body| body.get("state").and_then(Json::as_str).map(str::to_owned));
    let mut jobs = state.org.jobs();
    let Some(job) = jobs.get_mut(&job_id) else {
        return job_not_found();
    };
    match requested.as_deref() {
        Some("UploadComplete") if job.state == "Open" => {
            job.state = "UploadComplete";
            job.modstamp = now_text();
            let worker = state.clone();
            let id = job_id.clone();
            tokio::spawn(async move { process(worker, id).await });
        }
        Some("Aborted") if matches!(job.state, "Open" | "UploadComplete") => {
            job.state = "Aborted";
            job.modstamp = now_text();
        }
        Some(_) => {
            return sf_error(
                StatusCode::BAD_REQUEST,
                "INVALIDJOBSTATE",
                "the job cannot move to that state",
            );
        }
        None => {
            return sf_error(
                StatusCode::BAD_REQUEST,
                "JSON_PARSER_ERROR",
                "state is required",
            );
        }
    }
    axum::Json(job.info(&state, &version(&params))).into_response()
}

fn results(
    state: &AppState,
    params: &HashMap<String, String>,
    pick: fn(&Job) -> &String,
) -> Response {
    let job_id = params.get("job").cloned().unwrap_or_default();
    let jobs = state.org.jobs();
    let Some(job) = jobs.get(&job_id) else {
        return job_not_found();
    };
    if job.state != "JobComplete" && job.state != "Failed" {
        return sf_error(
            StatusCode::BAD_REQUEST,
            "INVALIDJOBSTATE",
            "job results are available once the job is complete",
        );
    }
    ([(header::CONTENT_TYPE, "text/csv")], pick(job).clone()).into_response()
}

pub(crate) async fn successful_results(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
) -> Response {
    results(&state, &params, |job| &job.successful_csv)
}

pub(crate) async fn failed_results(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
) -> Response {
    results(&state, &params, |job| &job.failed_csv)
}

pub(crate) async fn unprocessed_results(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
) -> Response {
    results(&state, &params, |job| &job.unprocessed_csv)
}

fn set_state(state: &AppState, job_id: &str, change: impl FnOnce(&mut Job)) {
    if let Some(job) = state.org.jobs().get_mut(job_id) {
        change(job);
        job.modstamp = now_text();
    }
}

fn csv_text(header: &[String], rows: &[Vec<String>]) -> String {
    let mut writer = csv::WriterBuilder::new()
        .quote_style(csv::QuoteStyle::Always)
        .from_writer(Vec::new());
    let _ = writer.write_record(header);
    for row in rows {
        let _ = writer.write_record(row);
    }
    writer
        .into_inner()
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

async fn process(state: AppState, job_id: String) {
    let started = std::time::Instant::now();
    // Real jobs are queued before they run; a short pause lets pollers see the states move.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (object, operation, upload) = {
        let mut jobs = state.org.jobs();
        let Some(job) = jobs.get_mut(&job_id) else {
            return;
        };
        if job.state != "UploadComplete" {
            return;
        }
        job.state = "InProgress";
        (job.object, job.operation, std::mem::take(&mut job.upload))
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(upload.as_bytes());
    let header: Vec<String> = match reader.headers() {
        Ok(header) => header.iter().map(str::to_owned).collect(),
        Err(error) => {
            set_state(&state, &job_id, |job| {
                job.state = "Failed";
                job.error_message = Some(format!(
                    "InvalidBatch : Failed to parse CSV header: {error}"
                ));
            });
            return;
        }
    };
    let rows: Result<Vec<Vec<String>>, csv::Error> = reader
        .records()
        .map(|record| record.map(|row| row.iter().map(str::to_owned).collect()))
        .collect();
    let rows = match rows {
        Ok(rows) => rows,
        Err(error) => {
            set_state(&state, &job_id, |job| {
                job.state = "Failed";
                job.error_message = Some(format!("InvalidBatch : Failed to parse CSV: {error}"));
            });
            return;
        }
    };
    let person_accounts = state.org.person_accounts();
    let id_column = header
        .iter()
        .position(|name| name.eq_ignore_ascii_case("Id"));
    if operation == Operation::Update && id_column.is_none() {
        set_state(&state, &job_id, |job| {
            job.state = "Failed";
            job.error_message = Some("InvalidBatch : Field name not found : Id".to_owned());
        });
        return;
    }
    for (column, name) in header.iter().enumerate() {
        if Some(column) != id_column && Field::resolve(object, name, person_accounts).is_none() {
            set_state(&state, &job_id, |job| {
                job.state = "Failed";
                job.error_message = Some(format!("InvalidBatch : Field name not found : {name}"));
            });
            return;
        }
    }
    let mut successful = Vec::new();
    let mut failed = Vec::new();
    let columns = Columns {
        header: &header,
        id_column,
        object,
        operation,
        person_accounts,
    };
    for chunk in rows.chunks(ROWS_PER_CHUNK) {
        let written = write_chunk(&state, &columns, chunk, &mut successful, &mut failed);
        state.shared.stats.record_writes(Api::Salesforce, written);
        tokio::task::yield_now().await;
    }
    let mut success_header = vec!["sf__Id".to_owned(), "sf__Created".to_owned()];
    success_header.extend(header.iter().cloned());
    let mut failed_header = vec!["sf__Id".to_owned(), "sf__Error".to_owned()];
    failed_header.extend(header.iter().cloned());
    let successful_csv = csv_text(&success_header, &successful);
    let failed_csv = csv_text(&failed_header, &failed);
    let unprocessed_csv = csv_text(&header, &[]);
    let elapsed = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    set_state(&state, &job_id, |job| {
        job.state = "JobComplete";
        job.processed = (successful.len() + failed.len()) as u64;
        job.failed = failed.len() as u64;
        job.successful_csv = successful_csv;
        job.failed_csv = failed_csv;
        job.unprocessed_csv = unprocessed_csv;
        job.processing_ms = elapsed;
    });
}

/// What every row of a job shares.
struct Columns<'a> {
    header: &'a [String],
    id_column: Option<usize>,
    object: Object,
    operation: Operation,
    person_accounts: bool,
}

/// Writes one chunk of rows under one hold of the write lock; returns the rows written.
fn write_chunk(
    state: &AppState,
    columns: &Columns<'_>,
    chunk: &[Vec<String>],
    successful: &mut Vec<Vec<String>>,
    failed: &mut Vec<Vec<String>>,
) -> u64 {
    let Columns {
        header,
        id_column,
        object,
        operation,
        person_accounts,
    } = *columns;
    let mut data = state.org.write();
    let stamp = data.next_stamp(true);
    let mut written = 0;
    for row in chunk {
        let id = id_column
            .and_then(|column| row.get(column))
            .cloned()
            .unwrap_or_default();
        let pairs = header
            .iter()
            .zip(row)
            .enumerate()
            .filter(|(column, _)| Some(*column) != id_column)
            .map(|(_, (name, cell))| (name.as_str(), Raw::Csv(cell.as_str())));
        let outcome: Result<(u32, bool), RecordError> = match operation {
            Operation::Update => ops::target(&data, Some(object), &id).and_then(|index| {
                let changes = ops::prepare_changes(object, person_accounts, pairs)?;
                if state.shared.faults.lock_row_fails() {
                    return Err(RecordError::lock_row(&id));
                }
                data.apply(index, &changes, stamp);
                Ok((index, false))
            }),
            Operation::Insert => ops::prepare_changes(object, person_accounts, pairs)
                .and_then(|changes| {
                    ops::create(&mut data, person_accounts, object, &changes, stamp)
                })
                .map(|index| (index, true)),
        };
        match outcome {
            Ok((index, created)) => {
                written += 1;
                let mut line = vec![data.id_of(index), created.to_string()];
                line.extend(row.iter().cloned());
                successful.push(line);
            }
            Err(error) => {
                let mut line = vec![
                    if operation == Operation::Update {
                        id
                    } else {
                        String::new()
                    },
                    error.to_bulk(),
                ];
                line.extend(row.iter().cloned());
                failed.push(line);
            }
        }
    }
    written
}
