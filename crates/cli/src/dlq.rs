//! `optoutctl dlq list|replay|purge`: the evaluator's and writer's dead-letter queues through
//! their Admin RPCs, as a table for people or JSON for scripts.

use optout_proto::admin::v1::DeadLetter;
use secrecy::SecretString;
use serde::Serialize;

use crate::{
    Error, Result,
    admin::{FleetEndpoints, Role, ServiceHandle},
    cli::timestamp,
    status::table,
};

/// What to do with the dead letters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DlqAction {
    /// Show them.
    List,
    /// Put them back on their queue.
    Replay,
    /// Drop them.
    Purge,
}

/// A checked `dlq` command line.
#[derive(Clone, Debug)]
pub struct DlqRequest {
    /// What to do.
    pub action: DlqAction,
    /// The services asked, evaluator first.
    pub roles: Vec<Role>,
    /// Message ids to replay.
    pub ids: Vec<String>,
    /// Replay or purge everything.
    pub all: bool,
    /// Most dead letters listed per service.
    pub limit: u32,
}

impl DlqRequest {
    /// Checks the flags: `--service` is `evaluator` or `writer` (default both), `replay` needs
    /// `--id` or `--all`, `purge` needs `--all` (it cannot pick messages), `list` takes neither.
    pub fn new(
        action: DlqAction,
        service: Option<&str>,
        ids: Vec<String>,
        all: bool,
        limit: u32,
    ) -> Result<Self> {
        let roles = match service {
            None => vec![Role::Evaluator, Role::Writer],
            Some(name) => match Role::parse(name) {
                Ok(role @ (Role::Evaluator | Role::Writer)) => vec![role],
                _ => {
                    return Err(Error::Usage(format!(
                        "--service must be evaluator or writer (the services with dead letters), got {name:?}"
                    )));
                }
            },
        };
        let usage = |message: &str| Err(Error::Usage(message.to_owned()));
        match action {
            DlqAction::List if all || !ids.is_empty() => {
                return usage("dlq list takes neither --id nor --all");
            }
            DlqAction::Replay if all != ids.is_empty() => {
                return usage("dlq replay needs either --id ID ... or --all");
            }
            DlqAction::Purge if !ids.is_empty() => {
                return usage(
                    "dlq purge drops every dead letter of a service and cannot pick messages; pass --all",
                );
            }
            DlqAction::Purge if !all => {
                return usage(
                    "dlq purge drops every dead letter of a service; pass --all to confirm",
                );
            }
            _ => {}
        }
        Ok(Self {
            action,
            roles,
            ids,
            all,
            limit,
        })
    }
}

/// One dead letter as printed.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetterView {
    /// The service that reported it.
    pub service: String,
    /// The dead-letter queue.
    pub queue: String,
    /// The message id (what `--id` takes).
    pub message_id: String,
    /// Why it was dead-lettered.
    pub reason: String,
    /// Its original routing key.
    pub routing_key: String,
    /// First failure.
    pub first_failure: String,
    /// Last failure.
    pub last_failure: String,
    /// How often it failed.
    pub failures: u32,
    /// Body size.
    pub body_bytes: u64,
}

impl DeadLetterView {
    fn new(service: &str, letter: DeadLetter) -> Self {
        Self {
            service: service.to_owned(),
            first_failure: timestamp(letter.first_failure.as_ref()),
            last_failure: timestamp(letter.last_failure.as_ref()),
            queue: letter.queue,
            message_id: letter.message_id,
            reason: letter.reason,
            routing_key: letter.routing_key,
            failures: letter.failures,
            body_bytes: letter.body_bytes,
        }
    }
}

/// What one service answered.
#[derive(Clone, Debug, Serialize)]
pub struct DlqResult {
    /// The service.
    pub service: String,
    /// Dead letters listed (`list`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letters: Option<Vec<DeadLetterView>>,
    /// Messages replayed (`replay`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replayed: Option<u32>,
    /// Messages purged (`purge`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purged: Option<u32>,
}

/// Runs `request` against the first address of each service asked (the dead-letter queues are
/// shared by the replicas, so one replica answers for all).
pub async fn run(
    endpoints: &FleetEndpoints,
    token: &SecretString,
    request: &DlqRequest,
) -> Result<Vec<DlqResult>> {
    let mut results = Vec::new();
    for &role in &request.roles {
        let Some(endpoint) = endpoints.of(role).first() else {
            let (flag, env) = match role {
                Role::Writer => ("--writer", "OPTOUT_WRITER_ADDR"),
                _ => ("--evaluator", "OPTOUT_EVALUATOR_ADDR"),
            };
            return Err(Error::MissingEndpoint {
                service: role.name(),
                flag,
                env,
            });
        };
        let handle = ServiceHandle::connect(role.name(), role, endpoint, token).await?;
        let mut result = DlqResult {
            service: handle.name.clone(),
            dead_letters: None,
            replayed: None,
            purged: None,
        };
        match request.action {
            DlqAction::List => {
                let letters = handle.list_dead_letters(request.limit).await?;
                result.dead_letters = Some(
                    letters
                        .into_iter()
                        .map(|letter| DeadLetterView::new(&handle.name, letter))
                        .collect(),
                );
            }
            DlqAction::Replay => {
                let ids = if request.all {
                    Vec::new()
                } else {
                    request.ids.clone()
                };
                result.replayed = Some(handle.replay_dead_letters(ids, request.all).await?);
            }
            DlqAction::Purge => result.purged = Some(handle.purge_dead_letters().await?),
        }
        results.push(result);
    }
    Ok(results)
}

/// The results as readable text: one table of dead letters, or one line per service.
pub fn render(results: &[DlqResult]) -> String {
    let mut out = String::new();
    let letters: Vec<&DeadLetterView> = results
        .iter()
        .filter_map(|result| result.dead_letters.as_ref())
        .flatten()
        .collect();
    let listed = results.iter().any(|result| result.dead_letters.is_some());
    if listed {
        if letters.is_empty() {
            out.push_str("no dead letters\n");
        } else {
            let mut rows = vec![
                [
                    "SERVICE",
                    "QUEUE",
                    "MESSAGE ID",
                    "FAILURES",
                    "LAST FAILURE",
                    "REASON",
                ]
                .map(str::to_owned),
            ];
            for letter in letters {
                rows.push([
                    letter.service.clone(),
                    letter.queue.clone(),
                    letter.message_id.clone(),
                    letter.failures.to_string(),
                    letter.last_failure.clone(),
                    letter.reason.clone(),
                ]);
            }
            out.push_str(&table(&rows));
        }
    }
    for result in results {
        if let Some(replayed) = result.replayed {
            out.push_str(&format!("{}: replayed {replayed}\n", result.service));
        }
        if let Some(purged) = result.purged {
            out.push_str(&format!("{}: purged {purged}\n", result.service));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_needs_ids_or_all_but_not_both() {
        assert!(DlqRequest::new(DlqAction::Replay, None, Vec::new(), false, 0).is_err());
        assert!(DlqRequest::new(DlqAction::Replay, None, vec!["m1".into()], true, 0).is_err());
        assert!(DlqRequest::new(DlqAction::Replay, None, vec!["m1".into()], false, 0).is_ok());
        assert!(DlqRequest::new(DlqAction::Replay, None, Vec::new(), true, 0).is_ok());
    }

    #[test]
    fn purge_demands_all_and_refuses_ids() {
        assert!(DlqRequest::new(DlqAction::Purge, None, Vec::new(), false, 0).is_err());
        assert!(DlqRequest::new(DlqAction::Purge, None, vec!["m1".into()], true, 0).is_err());
        assert!(DlqRequest::new(DlqAction::Purge, Some("writer"), Vec::new(), true, 0).is_ok());
    }

    #[test]
    fn accepts_only_services_with_dead_letters() {
        let request = DlqRequest::new(DlqAction::List, Some("evaluator"), Vec::new(), false, 0);
        assert_eq!(request.ok().map(|r| r.roles), Some(vec![Role::Evaluator]));
        assert!(DlqRequest::new(DlqAction::List, Some("fetcher"), Vec::new(), false, 0).is_err());
    }

    #[test]
    fn renders_an_empty_listing_plainly() {
        let results = vec![DlqResult {
            service: "rule-evaluator".into(),
            dead_letters: Some(Vec::new()),
            replayed: None,
            purged: None,
        }];
        assert_eq!(render(&results), "no dead letters\n");
    }
}
