//! State both emulators share: call accounting for benchmarks and the fault settings that tests
//! change at run time through the control endpoints.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which emulated API a call or a fault belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// The Mailchimp Marketing API.
    Mailchimp,
    /// The Salesforce REST and Bulk APIs.
    Salesforce,
}

/// Counts of calls served per endpoint and of records written, per API.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    inner: Arc<Mutex<StatsInner>>,
}

#[derive(Debug, Default, Serialize, Clone)]
struct StatsInner {
    calls: BTreeMap<Api, BTreeMap<String, u64>>,
    records_written: BTreeMap<Api, u64>,
    rejected_over_limit: BTreeMap<Api, u64>,
}

/// A point-in-time copy of [`Stats`], as served at `/_sandbox/stats`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct StatsSnapshot {
    /// Calls per endpoint label (`"GET /lists/{id}/members"`), per API.
    pub calls: BTreeMap<Api, BTreeMap<String, u64>>,
    /// Total calls per API.
    pub total_calls: BTreeMap<Api, u64>,
    /// Records (members or sObjects) created or changed through the API, per API.
    pub records_written: BTreeMap<Api, u64>,
    /// Requests refused because the caller had too many in flight (Mailchimp's 10-connection
    /// limit), per API. Also counted in `calls`.
    #[serde(default)]
    pub rejected_over_limit: BTreeMap<Api, u64>,
}

impl Stats {
    /// Counts one call served on `endpoint` (a route label, not the concrete path).
    pub fn record_call(&self, api: Api, endpoint: &str) {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *inner
            .calls
            .entry(api)
            .or_default()
            .entry(endpoint.to_owned())
            .or_default() += 1;
    }

    /// Counts records created or changed by one call.
    pub fn record_writes(&self, api: Api, records: u64) {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *inner.records_written.entry(api).or_default() += records;
    }

    /// Counts one request refused for exceeding the concurrent-connection limit.
    pub fn record_rejected_over_limit(&self, api: Api) {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *inner.rejected_over_limit.entry(api).or_default() += 1;
    }

    /// Copies the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let inner = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let total_calls = inner
            .calls
            .iter()
            .map(|(api, per_endpoint)| (*api, per_endpoint.values().sum()))
            .collect();
        StatsSnapshot {
            calls: inner.calls,
            total_calls,
            records_written: inner.records_written,
            rejected_over_limit: inner.rejected_over_limit,
        }
    }

    /// Sets every counter back to zero.
    pub fn reset(&self) {
        *self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = StatsInner::default();
    }
}

/// Fault settings of one API. Rates are probabilities in `0.0..=1.0` drawn per request.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ApiFaults {
    /// Share of requests answered 429 (Mailchimp "Too Many Requests"; Salesforce answers
    /// `REQUEST_LIMIT_EXCEEDED` 403 instead, which is how Salesforce throttles).
    pub rate_429: f64,
    /// Share of requests answered 503.
    pub rate_503: f64,
    /// Share of requests that hang for `timeout_ms` before answering 504, to exercise client timeouts.
    pub rate_timeout: f64,
    /// How long a "timeout" request hangs.
    pub timeout_ms: u64,
    /// Latency added to every request.
    pub latency_ms: u64,
}

/// Every fault setting, as read and written at `/_sandbox/faults`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct FaultSettings {
    /// Faults of the Mailchimp API.
    pub mailchimp: ApiFaults,
    /// Faults of the Salesforce API.
    pub salesforce: ApiFaults,
    /// Share of records in a Salesforce write that fail with `UNABLE_TO_LOCK_ROW`.
    pub unable_to_lock_row_rate: f64,
    /// Mailchimp's limit of simultaneous connections per API key (10); more are answered 429.
    pub mailchimp_max_connections: Option<usize>,
}

/// What a request should suffer, drawn from the current [`FaultSettings`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectedFault {
    /// Answer 429 (Mailchimp) or `REQUEST_LIMIT_EXCEEDED` (Salesforce).
    TooManyRequests,
    /// Answer 503.
    Unavailable,
    /// Hang for the duration, then answer 504.
    Timeout(Duration),
}

/// Shared, changeable fault settings.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    settings: Arc<RwLock<FaultSettings>>,
}

impl Faults {
    /// Starts from the given settings.
    pub fn new(settings: FaultSettings) -> Self {
        Self {
            settings: Arc::new(RwLock::new(settings)),
        }
    }

    /// The current settings.
    pub fn settings(&self) -> FaultSettings {
        self.settings
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Replaces the settings.
    pub fn set(&self, settings: FaultSettings) {
        *self
            .settings
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = settings;
    }

    /// Latency to add to every request of `api`.
    pub fn latency(&self, api: Api) -> Duration {
        Duration::from_millis(self.api(api).latency_ms)
    }

    /// Draws the fault, if any, that one request of `api` suffers.
    pub fn draw(&self, api: Api) -> Option<InjectedFault> {
        let faults = self.api(api);
        let roll = fastrand::f64();
        if roll < faults.rate_429 {
            return Some(InjectedFault::TooManyRequests);
        }
        if roll < faults.rate_429 + faults.rate_503 {
            return Some(InjectedFault::Unavailable);
        }
        if roll < faults.rate_429 + faults.rate_503 + faults.rate_timeout {
            return Some(InjectedFault::Timeout(Duration::from_millis(
                faults.timeout_ms.max(1),
            )));
        }
        None
    }

    /// Whether one record of a Salesforce write fails with `UNABLE_TO_LOCK_ROW`.
    pub fn lock_row_fails(&self) -> bool {
        fastrand::f64() < self.settings().unable_to_lock_row_rate
    }

    fn api(&self, api: Api) -> ApiFaults {
        let settings = self
            .settings
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match api {
            Api::Mailchimp => settings.mailchimp.clone(),
            Api::Salesforce => settings.salesforce.clone(),
        }
    }
}

/// What both emulators share.
#[derive(Clone, Debug, Default)]
pub struct Shared {
    /// Call accounting.
    pub stats: Stats,
    /// Fault injection.
    pub faults: Faults,
}
