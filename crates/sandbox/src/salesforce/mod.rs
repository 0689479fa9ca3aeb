//! The Salesforce half of the sandbox: an in-memory org served over TLS with the REST API
//! (OAuth 2.0 token endpoint, SOQL query with paging, sObject CRUD, sObject Collections) and
//! Bulk API 2.0 ingest, plus control endpoints for tests.

mod api;
mod auth;
mod bulk;
mod control;
mod ids;
mod ops;
mod soql;
mod store;
mod tls;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::shared::Shared;
pub use control::control_router;
use store::{Object, OrgData, Record};

/// Settings of the emulated org.
#[derive(Clone, Debug)]
pub struct OrgSettings {
    /// Whether Person Accounts are enabled; without them `IsPersonAccount`, `PersonEmail` and
    /// `PersonHasOptedOutOfEmail` answer `INVALID_FIELD`.
    pub person_accounts: bool,
    /// The rolling daily API request allocation; once used up every call answers 403
    /// `REQUEST_LIMIT_EXCEEDED`.
    pub daily_api_budget: u64,
}

impl Default for OrgSettings {
    fn default() -> Self {
        Self {
            person_accounts: false,
            daily_api_budget: 5_000_000,
        }
    }
}

/// A record the generator (or a control endpoint) puts in the org, as an admin would, without
/// counting as API calls.
#[derive(Clone, Debug)]
pub enum NewRecord {
    /// A Contact.
    Contact {
        /// `Email`.
        email: String,
        /// `FirstName`.
        first_name: String,
        /// `LastName`.
        last_name: String,
        /// `HasOptedOutOfEmail`.
        opted_out: bool,
    },
    /// A Lead.
    Lead {
        /// `Email`.
        email: String,
        /// `FirstName`.
        first_name: String,
        /// `LastName`.
        last_name: String,
        /// `Company`.
        company: String,
        /// `HasOptedOutOfEmail`.
        opted_out: bool,
        /// `IsConverted`: Salesforce refuses updates of converted Leads.
        converted: bool,
    },
    /// A person account with its hidden person contact. In an org without Person Accounts it is
    /// stored as a plain Contact.
    PersonAccount {
        /// `PersonEmail`.
        email: String,
        /// `FirstName`.
        first_name: String,
        /// `LastName`.
        last_name: String,
        /// `PersonHasOptedOutOfEmail`.
        opted_out: bool,
    },
}

/// Errors starting the Salesforce emulator.
#[derive(Debug, thiserror::Error)]
pub enum SalesforceError {
    /// Binding the listener or writing the state files failed.
    #[error("salesforce emulator i/o failed: {0}")]
    Io(#[from] std::io::Error),
    /// Making the TLS certificate or the JWT key failed.
    #[error("failed to make salesforce emulator keys: {0}")]
    Keys(String),
}

/// A query result whose later pages are fetched through `nextRecordsUrl`.
#[derive(Debug)]
pub(crate) struct Cursor {
    pub(crate) fields: Vec<store::Field>,
    pub(crate) rows: Vec<u32>,
    pub(crate) page_size: usize,
}

#[derive(Debug, Default)]
struct Cursors {
    by_id: HashMap<String, Arc<Cursor>>,
    order: VecDeque<String>,
}

/// How many open query cursors the org keeps before forgetting the oldest (Salesforce keeps
/// a bounded number of open locators per user too).
const MAX_CURSORS: usize = 500;

#[derive(Debug)]
struct OrgInner {
    settings: OrgSettings,
    data: RwLock<OrgData>,
    tokens: Mutex<HashSet<String>>,
    api_used: AtomicU64,
    api_budget: AtomicU64,
    cursors: Mutex<Cursors>,
    jobs: Mutex<HashMap<String, bulk::Job>>,
    org_id: String,
    user_id: String,
}

/// The in-memory org; cheap to clone (Arc inside).
#[derive(Clone)]
pub struct SalesforceOrg {
    inner: Arc<OrgInner>,
}

impl std::fmt::Debug for SalesforceOrg {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SalesforceOrg")
            .field("settings", &self.inner.settings)
            .field("records", &self.read().records.len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SalesforceOrg {
    /// An empty org.
    pub fn new(settings: OrgSettings) -> Self {
        let budget = settings.daily_api_budget;
        Self {
            inner: Arc::new(OrgInner {
                settings,
                data: RwLock::new(OrgData::default()),
                tokens: Mutex::new(HashSet::new()),
                api_used: AtomicU64::new(0),
                api_budget: AtomicU64::new(budget),
                cursors: Mutex::new(Cursors::default()),
                jobs: Mutex::new(HashMap::new()),
                org_id: format!("00D{}", ids::random_alphanumeric(15)),
                user_id: format!("005{}", ids::random_alphanumeric(15)),
            }),
        }
    }

    /// Inserts a record and returns its 18-character id (the Account's for a person account).
    pub fn insert(&self, record: NewRecord) -> String {
        let stamp = self.write().next_stamp(false);
        self.insert_stamped(record, stamp)
    }

    /// Inserts a record of the org as it was before the sandbox started: created and last
    /// modified a day ago, as the records of a real org are long before a sync meets them (the
    /// generator's records; a writer's first poll, which looks at recent changes, does not
    /// mistake them for edits).
    pub fn load(&self, record: NewRecord) -> String {
        let a_day_ago = chrono::Utc::now().timestamp_millis() - 86_400_000;
        self.insert_stamped(record, a_day_ago)
    }

    fn insert_stamped(&self, record: NewRecord, stamp: i64) -> String {
        let person_accounts = self.inner.settings.person_accounts;
        let mut data = self.write();
        let index = match record {
            NewRecord::Contact {
                email,
                first_name,
                last_name,
                opted_out,
            } => {
                let mut contact = Record::new(Object::Contact, stamp);
                contact.email = Some(email);
                contact.first_name = first_name;
                contact.last_name = last_name;
                contact.opted_out = opted_out;
                data.push(contact)
            }
            NewRecord::Lead {
                email,
                first_name,
                last_name,
                company,
                opted_out,
                converted,
            } => {
                let mut lead = Record::new(Object::Lead, stamp);
                lead.email = Some(email);
                lead.first_name = first_name;
                lead.last_name = last_name;
                lead.company = Some(company);
                lead.opted_out = opted_out;
                lead.converted = converted;
                lead.converted_date = converted.then_some(stamp);
                lead.status = Some(
                    if converted {
                        "Closed - Converted"
                    } else {
                        "Open - Not Contacted"
                    }
                    .to_owned(),
                );
                data.push(lead)
            }
            NewRecord::PersonAccount {
                email,
                first_name,
                last_name,
                opted_out,
            } if person_accounts => {
                ops::push_person_account(&mut data, email, first_name, last_name, opted_out, stamp)
            }
            NewRecord::PersonAccount {
                email,
                first_name,
                last_name,
                opted_out,
            } => {
                let mut contact = Record::new(Object::Contact, stamp);
                contact.email = Some(email);
                contact.first_name = first_name;
                contact.last_name = last_name;
                contact.opted_out = opted_out;
                data.push(contact)
            }
        };
        data.id_of(index)
    }

    /// Number of records (every object, deleted ones included).
    pub fn len(&self) -> usize {
        self.read().records.len()
    }

    /// Whether the org holds no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every Contact, Lead and Account carrying `email` (any case), with all their fields, as
    /// `GET /_sandbox/salesforce/records?email=` serves them.
    pub fn records_with_email(&self, email: &str) -> Vec<serde_json::Value> {
        let data = self.read();
        data.with_email(email)
            .iter()
            .map(|index| api::record_json(&data, *index, None, "v59.0", self.person_accounts()))
            .collect()
    }

    /// Makes every issued token invalid: the next call with one answers 401 `INVALID_SESSION_ID`.
    pub fn expire_tokens(&self) {
        lock(&self.inner.tokens).clear();
    }

    /// API requests used and the daily budget, as sent in `Sforce-Limit-Info`.
    pub fn api_usage(&self) -> (u64, u64) {
        (
            self.inner.api_used.load(Ordering::SeqCst),
            self.inner.api_budget.load(Ordering::SeqCst),
        )
    }

    /// Changes the API usage counter and/or the budget (for tests of limit handling).
    pub fn set_api_usage(&self, used: Option<u64>, max: Option<u64>) {
        if let Some(used) = used {
            self.inner.api_used.store(used, Ordering::SeqCst);
        }
        if let Some(max) = max {
            self.inner.api_budget.store(max, Ordering::SeqCst);
        }
    }

    pub(crate) fn person_accounts(&self) -> bool {
        self.inner.settings.person_accounts
    }

    pub(crate) fn org_id(&self) -> &str {
        &self.inner.org_id
    }

    pub(crate) fn user_id(&self) -> &str {
        &self.inner.user_id
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, OrgData> {
        self.inner
            .data
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, OrgData> {
        self.inner
            .data
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn issue_token(&self) -> String {
        let token = format!(
            "{}!{}",
            &self.inner.org_id[..15],
            ids::random_alphanumeric(96)
        );
        lock(&self.inner.tokens).insert(token.clone());
        token
    }

    pub(crate) fn token_valid(&self, token: &str) -> bool {
        lock(&self.inner.tokens).contains(token)
    }

    /// Counts one API request; `false` once the daily budget is used up.
    pub(crate) fn count_call(&self) -> bool {
        let budget = self.inner.api_budget.load(Ordering::SeqCst);
        self.inner
            .api_used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                (used < budget).then_some(used + 1)
            })
            .is_ok()
    }

    pub(crate) fn store_cursor(&self, cursor: Cursor) -> String {
        let id = format!("01g{}", ids::random_alphanumeric(15));
        let mut cursors = lock(&self.inner.cursors);
        cursors.by_id.insert(id.clone(), Arc::new(cursor));
        cursors.order.push_back(id.clone());
        while cursors.order.len() > MAX_CURSORS {
            if let Some(oldest) = cursors.order.pop_front() {
                cursors.by_id.remove(&oldest);
            }
        }
        id
    }

    pub(crate) fn cursor(&self, id: &str) -> Option<Arc<Cursor>> {
        lock(&self.inner.cursors).by_id.get(id).cloned()
    }

    pub(crate) fn jobs(&self) -> MutexGuard<'_, HashMap<String, bulk::Job>> {
        lock(&self.inner.jobs)
    }
}

/// What the Salesforce half tells the world once listening.
#[derive(Clone, Debug)]
pub struct SalesforceEndpoint {
    /// `https://127.0.0.1:PORT`, where `/services/oauth2/token` is served.
    pub login_url: String,
    /// `https://127.0.0.1:PORT`, the `instance_url` of issued tokens.
    pub instance_url: String,
    /// PEM of the CA that signed the server certificate.
    pub ca_file: PathBuf,
    /// Consumer key of the connected app.
    pub client_id: String,
    /// Consumer secret of the connected app, random per start.
    pub client_secret: String,
    /// The user the JWT bearer flow may name as `sub`.
    pub jwt_username: String,
    /// RSA private key (PKCS#8 PEM) whose public key the org trusts for the JWT bearer flow.
    pub jwt_private_key_file: PathBuf,
}

/// Binds TLS on `listen` (a certificate for IP 127.0.0.1 and DNS localhost, signed by a CA made at
/// start; the CA PEM is written into `state_dir`), serves until `shutdown` is cancelled.
pub async fn start(
    org: SalesforceOrg,
    shared: Shared,
    listen: SocketAddr,
    state_dir: &Path,
    shutdown: CancellationToken,
) -> Result<SalesforceEndpoint, SalesforceError> {
    start_with_options(
        org,
        shared,
        listen,
        state_dir,
        &EndpointOptions::default(),
        shutdown,
    )
    .await
}

/// Fixed identity of the emulated org, for deployments where the services' configuration is
/// written before the sandbox starts (docker-compose, Kubernetes). Unset parts are random.
#[derive(Clone, Debug, Default)]
pub struct EndpointOptions {
    /// OAuth client id of the connected app.
    pub client_id: Option<String>,
    /// OAuth client secret of the connected app.
    pub client_secret: Option<String>,
    /// Host name clients use (`sandbox` in compose): goes into URLs and the certificate.
    pub public_host: Option<String>,
    /// CA certificate (PEM) to sign with; made and written there, with `ca_key`, when absent.
    pub ca_cert: Option<PathBuf>,
    /// CA private key (PEM).
    pub ca_key: Option<PathBuf>,
}

/// [`start`] with a fixed identity.
pub async fn start_with_options(
    org: SalesforceOrg,
    shared: Shared,
    listen: SocketAddr,
    state_dir: &Path,
    options: &EndpointOptions,
    shutdown: CancellationToken,
) -> Result<SalesforceEndpoint, SalesforceError> {
    // Another part of the process may have installed it already; either way one is in place.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    std::fs::create_dir_all(state_dir)?;
    let ca_files = match (&options.ca_cert, &options.ca_key) {
        (Some(cert), Some(key)) => Some(tls::CaFiles { cert, key }),
        _ => None,
    };
    let keys = tls::make_keys(ca_files, options.public_host.as_deref())?;
    let ca_file = match &options.ca_cert {
        Some(cert) => cert.clone(),
        None => {
            let file = state_dir.join("salesforce-ca.pem");
            std::fs::write(&file, &keys.ca_pem)?;
            file
        }
    };
    let jwt_private_key_file = state_dir.join("salesforce-jwt-key.pem");
    std::fs::write(&jwt_private_key_file, &keys.jwt_private_pem)?;

    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let address = listener.local_addr()?;
    let host = match &options.public_host {
        Some(host) => host.clone(),
        None if address.ip().is_unspecified() => "127.0.0.1".to_owned(),
        None => address.ip().to_string(),
    };
    let base_url = format!("https://{host}:{}", address.port());

    let client_id = options
        .client_id
        .clone()
        .unwrap_or_else(|| format!("3MVG9{}", ids::random_alphanumeric(80)));
    let client_secret = options.client_secret.clone().unwrap_or_else(|| {
        hex::encode((0..32).map(|_| fastrand::u8(..)).collect::<Vec<u8>>()).to_uppercase()
    });
    let jwt_username = "integration@optout-sandbox.example".to_owned();
    let decoding_key = jsonwebtoken::DecodingKey::from_rsa_pem(keys.jwt_public_pem.as_bytes())
        .map_err(|error| SalesforceError::Keys(error.to_string()))?;
    let auth = auth::AuthConfig {
        client_id: client_id.clone(),
        client_secret: client_secret.clone(),
        jwt_username: jwt_username.clone(),
        decoding_key,
        login_url: base_url.clone(),
        instance_url: base_url.clone(),
    };
    let app = api::router(api::AppState {
        org,
        shared,
        auth: Arc::new(auth),
    });

    let tls_config = axum_server::tls_rustls::RustlsConfig::from_pem(
        keys.server_chain_pem.into_bytes(),
        keys.server_key_pem.into_bytes(),
    )
    .await?;
    let handle = axum_server::Handle::new();
    let mut server = axum_server::from_tcp_rustls(listener, tls_config)?.handle(handle.clone());
    // Let long URIs through to the 414 check (Salesforce's limit) instead of the HTTP layers'
    // smaller default header limits answering 431 first.
    server.http_builder().http1().max_buf_size(256 * 1024);
    server
        .http_builder()
        .http2()
        .max_header_list_size(256 * 1024);
    tokio::spawn(async move {
        if let Err(error) = server.serve(app.into_make_service()).await {
            tracing::error!(%error, "salesforce emulator stopped");
        }
    });
    tokio::spawn(async move {
        shutdown.cancelled().await;
        handle.graceful_shutdown(Some(Duration::from_secs(2)));
    });
    Ok(SalesforceEndpoint {
        login_url: base_url.clone(),
        instance_url: base_url,
        ca_file,
        client_id,
        client_secret,
        jwt_username,
        jwt_private_key_file,
    })
}
