//! Typed client for the Salesforce REST API and Bulk API 2.0, as much as opt-out sync needs:
//! OAuth 2.0 (client credentials or JWT bearer) with a cached token refreshed once on
//! `INVALID_SESSION_ID`, SOQL queries following `nextRecordsUrl`, sObject Collections updates,
//! Bulk API 2.0 ingest updates, `Sforce-Limit-Info` tracking, bounded concurrency and jittered
//! retries of transient failures.

mod auth;
mod error;
pub mod soql;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::Stream;
use optout_telemetry::{http, metrics::ApiCalls};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tracing::Instrument as _;

pub use error::{Error, Result};

/// The `api` label of this client's calls in `optout_api_calls_total`.
pub const API: &str = "salesforce";

/// Most records per sObject Collections request.
pub const MAX_COLLECTION_RECORDS: usize = 200;
/// First retry delay; doubles per attempt up to [`MAX_BACKOFF`], with jitter.
const BASE_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a Bulk API job may take before the client gives up waiting.
const BULK_DEADLINE: Duration = Duration::from_secs(30 * 60);
/// Wait before the first status read of a closed bulk job; later waits double up to 5 s.
const BULK_FIRST_POLL: Duration = Duration::from_millis(200);

/// How the client gets its access token.
#[derive(Clone, Debug)]
pub enum Auth {
    /// OAuth 2.0 client-credentials flow of a connected app (runs as its "Run As" user).
    ClientCredentials {
        /// Consumer key.
        client_id: String,
        /// Consumer secret.
        client_secret: SecretString,
    },
    /// OAuth 2.0 JWT bearer flow: an RS256 assertion signed with the app certificate's key.
    JwtBearer {
        /// Consumer key (`iss`).
        client_id: String,
        /// The user to act as (`sub`).
        username: String,
        /// PEM of the RSA private key (PKCS#1 or PKCS#8).
        private_key_pem: SecretString,
        /// `aud`: `https://login.salesforce.com`, `https://test.salesforce.com` or the community URL.
        audience: String,
    },
}

/// Client settings.
#[derive(Clone, Debug)]
pub struct SalesforceConfig {
    /// Where the token endpoint is, e.g. `https://mydomain.my.salesforce.com` or `https://127.0.0.1:PORT`.
    pub login_url: String,
    /// Credentials.
    pub auth: Auth,
    /// API version without the `v`, e.g. `"59.0"`.
    pub api_version: String,
    /// PEM of an extra trusted root certificate (the sandbox's CA).
    pub ca_file: Option<PathBuf>,
    /// Timeout of one HTTP request.
    pub timeout: Duration,
    /// Retries of a retryable failure before giving up.
    pub max_retries: u32,
    /// Most requests in flight at once.
    pub max_connections: usize,
}

impl SalesforceConfig {
    /// Settings with defaults: API 59.0, no extra CA, 30 s timeout, 5 retries, 10 connections.
    pub fn new(login_url: impl Into<String>, auth: Auth) -> Self {
        Self {
            login_url: login_url.into(),
            auth,
            api_version: "59.0".to_owned(),
            ca_file: None,
            timeout: Duration::from_secs(30),
            max_retries: 5,
            max_connections: 10,
        }
    }
}

/// Changes to one record for [`SalesforceClient::update_collection`].
#[derive(Clone, Debug, PartialEq)]
pub struct RecordUpdate {
    /// sObject type, e.g. `Contact`.
    pub object: String,
    /// Record id.
    pub id: String,
    /// Field values to write, e.g. `HasOptedOutOfEmail: true`.
    pub fields: serde_json::Map<String, Value>,
}

/// The outcome of one record of a collections request (Salesforce's SaveResult).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveResult {
    /// The record id; failed results may omit it.
    #[serde(default)]
    pub id: Option<String>,
    /// Whether the record was written.
    pub success: bool,
    /// Why not.
    #[serde(default)]
    pub errors: Vec<RecordError>,
}

/// One per-record error (`statusCode`, not `errorCode`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordError {
    /// e.g. `UNABLE_TO_LOCK_ROW`, `CANNOT_UPDATE_CONVERTED_LEAD`.
    pub status_code: String,
    /// Salesforce's message.
    #[serde(default)]
    pub message: String,
    /// Fields involved.
    #[serde(default)]
    pub fields: Vec<String>,
}

impl RecordError {
    /// Whether writing the record again later may succeed (`UNABLE_TO_LOCK_ROW`).
    pub fn is_retryable(&self) -> bool {
        self.status_code == "UNABLE_TO_LOCK_ROW"
    }
}

/// The org's API usage from the last `Sforce-Limit-Info` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiUsage {
    /// Requests used in the rolling 24 hours.
    pub used: u64,
    /// The allocation.
    pub max: u64,
}

/// Parses `api-usage=N/M` out of a `Sforce-Limit-Info` header value.
pub fn parse_limit_info(header: &str) -> Option<ApiUsage> {
    header.split(';').find_map(|part| {
        let (key, value) = part.trim().split_once('=')?;
        if key.trim() != "api-usage" {
            return None;
        }
        let (used, max) = value.trim().split_once('/')?;
        Some(ApiUsage {
            used: used.trim().parse().ok()?,
            max: max.trim().parse().ok()?,
        })
    })
}

/// Parses a Salesforce datetime as found in records: `2024-05-01T10:00:00.000+0000`.
pub fn parse_datetime(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f%z")
        .or_else(|_| DateTime::parse_from_rfc3339(text))
        .ok()
        .map(|at| at.with_timezone(&Utc))
}

/// The outcome of a Bulk API 2.0 ingest job.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BulkJobResult {
    /// Job id (`750...`).
    pub job_id: String,
    /// Rows of `successfulResults`: `sf__Id`, `sf__Created` and the uploaded columns. Empty
    /// when `rest_succeeded`, since it was not read.
    pub successful: Vec<HashMap<String, String>>,
    /// Rows of `failedResults`: `sf__Id`, `sf__Error` and the uploaded columns.
    pub failed: Vec<HashMap<String, String>>,
    /// Salesforce processed every uploaded row, so each row not in `failed` succeeded and
    /// `successfulResults` was not downloaded.
    pub rest_succeeded: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct QueryPage<T> {
    done: bool,
    #[serde(default)]
    next_records_url: Option<String>,
    records: Vec<T>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobInfo {
    id: String,
    state: String,
    #[serde(default)]
    error_message: Option<String>,
    #[serde(default)]
    number_records_processed: u64,
    #[serde(default)]
    number_records_failed: u64,
}

/// An access token and the instance it is valid for.
struct Session {
    access_token: SecretString,
    instance_url: String,
}

enum Body {
    Empty,
    Json(Value),
    /// Shared, so a retried upload does not copy a Bulk job's whole CSV.
    Csv(bytes::Bytes),
}

struct Inner {
    config: SalesforceConfig,
    http: reqwest::Client,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    usage: Mutex<Option<ApiUsage>>,
    permits: Semaphore,
}

/// A Salesforce API client; cheap to clone, shares its token, limits and connection pool.
#[derive(Clone)]
pub struct SalesforceClient {
    inner: Arc<Inner>,
    api_calls: ApiCalls,
}

impl std::fmt::Debug for SalesforceClient {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SalesforceClient")
            .field("config", &self.inner.config)
            .field("limits", &self.limits())
            .finish_non_exhaustive()
    }
}

fn backoff(attempt: u32) -> Duration {
    let ceiling = BASE_BACKOFF
        .saturating_mul(1u32 << attempt.min(16))
        .min(MAX_BACKOFF);
    // Jitter keeps many clients that failed together from retrying together.
    ceiling.mul_f64(0.5 + fastrand::f64() * 0.5)
}

/// The rows of a Bulk API result CSV (`successfulResults`, `failedResults`) as column-to-value
/// maps; a malformed CSV is a [`Error::Decode`], never a panic (fuzzed in `crates/fuzz-targets`).
pub fn csv_rows(text: &str) -> Result<Vec<HashMap<String, String>>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .map_err(|error| Error::Decode(format!("bulk result csv header: {error}")))?
        .iter()
        .map(str::to_owned)
        .collect();
    reader
        .records()
        .map(|record| {
            let record =
                record.map_err(|error| Error::Decode(format!("bulk result csv: {error}")))?;
            Ok(header
                .iter()
                .cloned()
                .zip(record.iter().map(str::to_owned))
                .collect())
        })
        .collect()
}

impl SalesforceClient {
    /// Builds the client; reads the CA file now so a bad path fails fast. No request is sent.
    pub fn new(config: SalesforceConfig) -> Result<Self> {
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(config.max_connections);
        // The instance URL comes from the token response, on the login host's side of any proxy.
        if optout_telemetry::http::is_loopback_url(&config.login_url) {
            builder = builder.no_proxy();
        }
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|error| {
                Error::Config(format!("cannot read ca file {}: {error}", path.display()))
            })?;
            let certificate = reqwest::Certificate::from_pem(&pem).map_err(|error| {
                Error::Config(format!("invalid ca file {}: {error}", path.display()))
            })?;
            builder = builder.tls_certs_merge([certificate]);
        }
        let http = builder
            .build()
            .map_err(|error| Error::Config(format!("cannot build http client: {error}")))?;
        let permits = Semaphore::new(config.max_connections.max(1));
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                http,
                session: tokio::sync::Mutex::new(None),
                usage: Mutex::new(None),
                permits,
            }),
            api_calls: ApiCalls::default(),
        })
    }

    /// The per-endpoint call counts of this client (and its clones), for a service's metrics registry.
    pub fn api_calls(&self) -> ApiCalls {
        self.api_calls.clone()
    }

    /// Counts this client's calls in `api_calls` (e.g. a family already in a service's registry).
    pub fn with_api_calls(mut self, api_calls: ApiCalls) -> Self {
        self.api_calls = api_calls;
        self
    }

    /// The API usage reported by the last response that carried `Sforce-Limit-Info`.
    pub fn limits(&self) -> Option<ApiUsage> {
        *self
            .inner
            .usage
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs a SOQL query and collects every page (following `nextRecordsUrl`).
    pub async fn query<T: DeserializeOwned>(&self, soql: &str) -> Result<Vec<T>> {
        let mut page: QueryPage<T> = self.query_first(soql).await?;
        let mut records = std::mem::take(&mut page.records);
        while let (false, Some(next)) = (page.done, page.next_records_url.take()) {
            page = self.get_json(&next).await?;
            records.append(&mut page.records);
        }
        Ok(records)
    }

    /// Runs a SOQL query and yields its records page by page (up to 2,000 per page).
    pub fn query_stream<T: DeserializeOwned + Send + 'static>(
        &self,
        soql: String,
    ) -> impl Stream<Item = Result<Vec<T>>> + Send + '_ {
        enum Next {
            First(String),
            More(String),
        }
        futures::stream::try_unfold(Some(Next::First(soql)), move |next| async move {
            let page: QueryPage<T> = match next {
                None => return Ok(None),
                Some(Next::First(soql)) => self.query_first(&soql).await?,
                Some(Next::More(url)) => self.get_json(&url).await?,
            };
            let next = if page.done {
                None
            } else {
                page.next_records_url.map(Next::More)
            };
            Ok(Some((page.records, next)))
        })
    }

    async fn query_first<T: DeserializeOwned>(&self, soql: &str) -> Result<QueryPage<T>> {
        let bytes = self
            .request(Method::GET, "query", &[("q", soql)], &Body::Empty, false)
            .await?;
        serde_json::from_slice(&bytes)
            .map_err(|error| Error::Decode(format!("query page: {error}")))
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let bytes = self
            .request(Method::GET, path, &[], &Body::Empty, false)
            .await?;
        serde_json::from_slice(&bytes).map_err(|error| Error::Decode(format!("{path}: {error}")))
    }

    /// Updates records with sObject Collections (`PATCH /composite/sobjects`, `allOrNone:false`),
    /// 200 per call; returns one SaveResult per record, in input order.
    pub async fn update_collection(&self, records: &[RecordUpdate]) -> Result<Vec<SaveResult>> {
        let mut results = Vec::with_capacity(records.len());
        for chunk in records.chunks(MAX_COLLECTION_RECORDS) {
            let body: Vec<Value> = chunk
                .iter()
                .map(|record| {
                    let mut object = record.fields.clone();
                    object.insert("attributes".into(), json!({ "type": record.object }));
                    object.insert("id".into(), json!(record.id));
                    Value::Object(object)
                })
                .collect();
            let body = Body::Json(json!({ "allOrNone": false, "records": body }));
            let bytes = self
                .request(Method::PATCH, "composite/sobjects", &[], &body, false)
                .await?;
            let chunk_results: Vec<SaveResult> = serde_json::from_slice(&bytes)
                .map_err(|error| Error::Decode(format!("collection save results: {error}")))?;
            if chunk_results.len() != chunk.len() {
                return Err(Error::Decode(format!(
                    "collection update returned {} results for {} records",
                    chunk_results.len(),
                    chunk.len()
                )));
            }
            results.extend(chunk_results);
        }
        Ok(results)
    }

    /// Updates records of `object` with a Bulk API 2.0 ingest job from CSV (`Id` column plus
    /// the fields, `rows` data rows), waits for it to finish, and returns its failed rows, and
    /// its successful rows unless every row was processed (see [`BulkJobResult::rest_succeeded`]).
    /// Each result download is an API call against the daily budget, so a job whose status
    /// says nothing failed costs four calls and one status read per poll.
    pub async fn bulk_update(&self, object: &str, csv: String, rows: u64) -> Result<BulkJobResult> {
        let line_ending = if csv.contains("\r\n") { "CRLF" } else { "LF" };
        let create = Body::Json(json!({
            "object": object,
            "operation": "update",
            "contentType": "CSV",
            "lineEnding": line_ending,
            "columnDelimiter": "COMMA",
        }));
        let bytes = self
            .request(Method::POST, "jobs/ingest", &[], &create, false)
            .await?;
        let job: JobInfo = serde_json::from_slice(&bytes)
            .map_err(|error| Error::Decode(format!("job info: {error}")))?;
        let job_id = job.id;
        self.request(
            Method::PUT,
            &format!("jobs/ingest/{job_id}/batches"),
            &[],
            &Body::Csv(bytes::Bytes::from(csv)),
            false,
        )
        .await?;
        let close = Body::Json(json!({ "state": "UploadComplete" }));
        self.request(
            Method::PATCH,
            &format!("jobs/ingest/{job_id}"),
            &[],
            &close,
            false,
        )
        .await?;
        let deadline = tokio::time::Instant::now() + BULK_DEADLINE;
        // A job is never complete the moment it is closed: polling at once only spends a call.
        let mut interval = BULK_FIRST_POLL;
        let info = loop {
            tokio::time::sleep(interval).await;
            let info: JobInfo = self.get_json(&format!("jobs/ingest/{job_id}")).await?;
            match info.state.as_str() {
                "JobComplete" => break info,
                "Failed" | "Aborted" => {
                    return Err(Error::BulkJob {
                        job_id,
                        state: info.state,
                        message: info.error_message.unwrap_or_default(),
                    });
                }
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::BulkJob {
                        job_id,
                        state: info.state,
                        message: "timed out waiting".into(),
                    });
                }
                _ => interval = (interval * 2).min(Duration::from_secs(5)),
            }
        };
        let rest_succeeded = info.number_records_processed == rows;
        let failed = if info.number_records_failed == 0 && rest_succeeded {
            Vec::new()
        } else {
            self.bulk_results(&job_id, "failedResults").await?
        };
        let successful = if rest_succeeded {
            Vec::new()
        } else {
            self.bulk_results(&job_id, "successfulResults").await?
        };
        Ok(BulkJobResult {
            job_id,
            successful,
            failed,
            rest_succeeded,
        })
    }

    /// The rows of one result CSV of a finished ingest job (`successfulResults`, `failedResults`).
    async fn bulk_results(
        &self,
        job_id: &str,
        which: &str,
    ) -> Result<Vec<HashMap<String, String>>> {
        let csv = self
            .request(
                Method::GET,
                &format!("jobs/ingest/{job_id}/{which}"),
                &[],
                &Body::Empty,
                true,
            )
            .await?;
        csv_rows(&String::from_utf8_lossy(&csv))
    }

    /// Whether the org has Person Accounts: `Account` describes an `IsPersonAccount` field.
    pub async fn has_person_accounts(&self) -> Result<bool> {
        #[derive(Deserialize)]
        struct Describe {
            fields: Vec<DescribeField>,
        }
        #[derive(Deserialize)]
        struct DescribeField {
            name: String,
        }
        let describe: Describe = self.get_json("sobjects/Account/describe").await?;
        Ok(describe
            .fields
            .iter()
            .any(|field| field.name == "IsPersonAccount"))
    }

    /// The cached session, or a new one from the token endpoint.
    async fn session(&self) -> Result<Arc<Session>> {
        let mut cached = self.inner.session.lock().await;
        if let Some(session) = cached.as_ref() {
            return Ok(session.clone());
        }
        let (access_token, instance_url) =
            auth::fetch_token(&self.inner.http, &self.inner.config, &self.api_calls).await?;
        let session = Arc::new(Session {
            access_token,
            instance_url,
        });
        *cached = Some(session.clone());
        Ok(session)
    }

    /// Forgets `stale` unless another task already replaced it.
    async fn invalidate(&self, stale: &Arc<Session>) {
        let mut cached = self.inner.session.lock().await;
        if cached
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, stale))
        {
            *cached = None;
        }
    }

    /// Sends one API request with retries of transient failures and one token refresh on
    /// `INVALID_SESSION_ID`; returns the body of a 2xx answer.
    async fn request(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: &Body,
        accept_csv: bool,
    ) -> Result<Vec<u8>> {
        let mut attempt = 0;
        let mut refreshed = false;
        loop {
            let outcome = match self.session().await {
                Ok(session) => match self
                    .send_once(&session, method.clone(), path, query, body, accept_csv)
                    .await
                {
                    Err(Error::InvalidSession) if !refreshed => {
                        refreshed = true;
                        self.invalidate(&session).await;
                        continue;
                    }
                    other => other,
                },
                Err(error) => Err(error),
            };
            match outcome {
                Err(error) if error.is_retryable() && attempt < self.inner.config.max_retries => {
                    let delay = backoff(attempt);
                    tracing::debug!(%error, attempt, ?delay, path, "retrying salesforce request");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn send_once(
        &self,
        session: &Session,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: &Body,
        accept_csv: bool,
    ) -> Result<Vec<u8>> {
        let url = if path.starts_with('/') {
            format!("{}{path}", session.instance_url)
        } else {
            format!(
                "{}/services/data/v{}/{path}",
                session.instance_url, self.inner.config.api_version
            )
        };
        // The template keeps the endpoint label and span name low-cardinality (no job ids or cursors).
        let relative = match path.strip_prefix("/services/data/") {
            Some(versioned) => versioned.split_once('/').map_or("", |(_, rest)| rest),
            None => path,
        };
        let endpoint = format!("{method} {}", http::path_template(relative));
        let span = http::client_span(method.as_str(), &url, &http::path_template(relative));
        let mut request = self
            .inner
            .http
            .request(method, &url)
            .headers(span.in_scope(http::trace_headers))
            .header(
                AUTHORIZATION,
                format!("Bearer {}", session.access_token.expose_secret()),
            )
            .header(
                ACCEPT,
                if accept_csv {
                    "text/csv"
                } else {
                    "application/json"
                },
            );
        if !query.is_empty() {
            request = request.query(query);
        }
        request = match body {
            Body::Empty => request,
            Body::Json(value) => request.json(value),
            Body::Csv(text) => request.header(CONTENT_TYPE, "text/csv").body(text.clone()),
        };
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(|_| Error::Config("client closed".into()))?;
        let response = match request.send().instrument(span.clone()).await {
            Ok(response) => response,
            Err(error) => {
                http::record_error(
                    &span,
                    if error.is_timeout() {
                        "timeout"
                    } else {
                        "transport"
                    },
                );
                self.api_calls.record(API, &endpoint, "error");
                return Err(Error::Transport(error.without_url()));
            }
        };
        let status = response.status();
        http::record_status(&span, status.as_u16());
        self.api_calls.record(API, &endpoint, status.as_str());
        self.record_limits(response.headers());
        let bytes = response
            .bytes()
            .await
            .map_err(|error| Error::Transport(error.without_url()))?;
        if status.is_success() {
            return Ok(bytes.to_vec());
        }
        let error = Error::from_response(status.as_u16(), &bytes);
        if status != StatusCode::UNAUTHORIZED {
            tracing::debug!(status = status.as_u16(), %error, path, "salesforce request failed");
        }
        Err(error)
    }

    fn record_limits(&self, headers: &HeaderMap) {
        let usage = headers
            .get("sforce-limit-info")
            .and_then(|value| value.to_str().ok())
            .and_then(parse_limit_info);
        if let Some(usage) = usage {
            *self
                .inner
                .usage
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(usage);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_limit_info_with_extra_parts() {
        assert_eq!(
            parse_limit_info("api-usage=18/5000"),
            Some(ApiUsage {
                used: 18,
                max: 5000
            })
        );
        assert_eq!(
            parse_limit_info("api-usage=25/5000; per-app-api-usage=17/250(appName=sample-app)"),
            Some(ApiUsage {
                used: 25,
                max: 5000
            })
        );
        assert_eq!(parse_limit_info("per-app-api-usage=17/250"), None);
    }

    #[test]
    fn parses_record_datetimes() {
        let at = parse_datetime("2024-05-01T10:00:00.000+0000").expect("parses");
        assert_eq!(at.to_rfc3339(), "2024-05-01T10:00:00+00:00");
    }

    #[test]
    fn backoff_grows_and_stays_bounded() {
        assert!(backoff(0) <= BASE_BACKOFF);
        assert!(backoff(30) <= MAX_BACKOFF);
        assert!(backoff(3) >= BASE_BACKOFF * 4);
    }

    #[test]
    fn debug_output_hides_secrets() {
        let config = SalesforceConfig::new(
            "https://127.0.0.1:1",
            Auth::ClientCredentials {
                client_id: "id".into(),
                client_secret: SecretString::from("hunter2"),
            },
        );
        let client = SalesforceClient::new(config).expect("builds");
        assert!(!format!("{client:?}").contains("hunter2"));
    }
}
