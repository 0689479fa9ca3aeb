//! `optoutctl status`: every service's `GetStatus` as a table or as JSON.

use std::{collections::BTreeMap, fmt::Write as _};

use optout_proto::admin::v1::GetStatusResponse;
use secrecy::SecretString;
use serde::Serialize;

use crate::admin::{FleetEndpoints, Role, ServiceHandle};

/// One queue as a service reports it.
#[derive(Clone, Debug, Serialize)]
pub struct QueueView {
    /// Queue name.
    pub name: String,
    /// Ready messages.
    pub messages: u64,
    /// Consumers attached.
    pub consumers: u32,
}

/// The status of one process, or why it could not be had.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceStatusView {
    /// Process name.
    pub service: String,
    /// Where it was asked.
    pub endpoint: String,
    /// Whether it answered.
    pub up: bool,
    /// Why it did not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its version.
    pub version: String,
    /// Seconds since start.
    pub uptime_seconds: u64,
    /// Paused by an operator.
    pub paused: bool,
    /// A run or poll cycle is under way.
    pub busy: bool,
    /// Work taken but not finished.
    pub in_flight: u64,
    /// The queues it sees.
    pub queues: Vec<QueueView>,
    /// Its counters.
    pub counters: BTreeMap<String, i64>,
    /// Last run started.
    pub last_run_id: String,
    /// Whether it finished.
    pub last_run_finished: bool,
    /// Remaining daily Salesforce calls, -1 when unknown.
    pub salesforce_api_remaining: i64,
}

impl ServiceStatusView {
    fn down(service: String, endpoint: String, error: String) -> Self {
        Self {
            service,
            endpoint,
            up: false,
            error: Some(error),
            version: String::new(),
            uptime_seconds: 0,
            paused: false,
            busy: false,
            in_flight: 0,
            queues: Vec::new(),
            counters: BTreeMap::new(),
            last_run_id: String::new(),
            last_run_finished: false,
            salesforce_api_remaining: -1,
        }
    }

    fn from_response(service: String, endpoint: String, status: GetStatusResponse) -> Self {
        Self {
            service,
            endpoint,
            up: true,
            error: None,
            version: status.version,
            uptime_seconds: status.uptime_seconds,
            paused: status.paused,
            busy: status.busy,
            in_flight: status.in_flight,
            queues: status
                .queues
                .into_iter()
                .map(|queue| QueueView {
                    name: queue.name,
                    messages: queue.messages,
                    consumers: queue.consumers,
                })
                .collect(),
            counters: status.counters.into_iter().collect(),
            last_run_id: status.last_run_id,
            last_run_finished: status.last_run_finished,
            salesforce_api_remaining: status.salesforce_api_remaining,
        }
    }
}

/// Asks every process for its status; a process that cannot be reached is reported as down.
pub async fn collect(endpoints: &FleetEndpoints, token: &SecretString) -> Vec<ServiceStatusView> {
    let mut pending = Vec::new();
    for role in Role::ALL {
        for (index, endpoint) in endpoints.of(role).iter().enumerate() {
            let name = if index == 0 {
                role.name().to_owned()
            } else {
                format!("{}#{}", role.name(), index + 1)
            };
            pending.push(async move {
                let answer = match ServiceHandle::connect(name.clone(), role, endpoint, token).await
                {
                    Ok(handle) => handle.get_status().await,
                    Err(error) => Err(error),
                };
                match answer {
                    Ok(status) => ServiceStatusView::from_response(name, endpoint.clone(), status),
                    Err(error) => {
                        ServiceStatusView::down(name, endpoint.clone(), error_chain(&error))
                    }
                }
            });
        }
    }
    futures::future::join_all(pending).await
}

/// An error with its causes, `a: b: c`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

/// Counters worth a column, per service.
const KEY_COUNTERS: &[&str] = &[
    "members_read",
    "runs_finished",
    "messages_processed",
    "decisions_opt_out",
    "decisions_opt_in",
    "dirty_published",
    "written_contact",
    "written_lead",
    "written_account",
    "write_failures",
];

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

/// Lays rows out in left-aligned columns two spaces apart, the first row being the header.
pub(crate) fn table<R: AsRef<[String]>>(rows: &[R]) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (index, cell) in row.as_ref().iter().enumerate() {
            if widths.len() <= index {
                widths.push(0);
            }
            widths[index] = widths[index].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line = row
            .as_ref()
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ");
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// Renders the statuses as a plain-text table plus queue depths.
pub fn render(views: &[ServiceStatusView]) -> String {
    let mut rows = vec![[
        "SERVICE".to_owned(),
        "UP".to_owned(),
        "PAUSED".to_owned(),
        "BUSY".to_owned(),
        "IN FLIGHT".to_owned(),
        "LAST RUN".to_owned(),
        "COUNTERS".to_owned(),
    ]];
    for view in views {
        if !view.up {
            rows.push([
                view.service.clone(),
                "no".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                "-".to_owned(),
                view.error.clone().unwrap_or_default(),
            ]);
            continue;
        }
        let counters = KEY_COUNTERS
            .iter()
            .filter_map(|key| {
                view.counters
                    .get(*key)
                    .map(|value| format!("{key}={value}"))
            })
            .collect::<Vec<_>>()
            .join(" ");
        let last_run = if view.last_run_id.is_empty() {
            "-".to_owned()
        } else {
            format!(
                "{} ({})",
                view.last_run_id,
                if view.last_run_finished {
                    "done"
                } else {
                    "running"
                }
            )
        };
        rows.push([
            view.service.clone(),
            "yes".to_owned(),
            yes_no(view.paused).to_owned(),
            yes_no(view.busy).to_owned(),
            view.in_flight.to_string(),
            last_run,
            counters,
        ]);
    }
    let mut out = table(&rows);
    let mut queues: BTreeMap<&str, &QueueView> = BTreeMap::new();
    for view in views {
        for queue in &view.queues {
            queues.entry(queue.name.as_str()).or_insert(queue);
        }
    }
    if !queues.is_empty() {
        let width = queues
            .keys()
            .map(|name| name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let _ = writeln!(out, "\n{:<width$}  MESSAGES  CONSUMERS", "QUEUE");
        for queue in queues.values() {
            let _ = writeln!(
                out,
                "{:<width$}  {:>8}  {:>9}",
                queue.name, queue.messages, queue.consumers
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_down_services_with_their_error_and_queues_once() {
        let mut up =
            ServiceStatusView::down("fetcher".to_owned(), "http://a".to_owned(), String::new());
        up.up = true;
        up.error = None;
        up.counters.insert("members_read".to_owned(), 12);
        up.queues.push(QueueView {
            name: "p.members.changed".to_owned(),
            messages: 4,
            consumers: 1,
        });
        let mut evaluator = up.clone();
        evaluator.service = "rule-evaluator".to_owned();
        let down = ServiceStatusView::down(
            "salesforce-writer".to_owned(),
            "http://b".to_owned(),
            "refused".to_owned(),
        );
        let table = render(&[up, evaluator, down]);
        assert!(table.contains("members_read=12"), "{table}");
        assert!(table.contains("salesforce-writer  no"), "{table}");
        assert!(table.contains("refused"), "{table}");
        assert_eq!(table.matches("p.members.changed").count(), 1, "{table}");
    }
}
