//! Handling `members.changed` batches: apply to the store, then announce dirty persons.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::atomic::{AtomicI64, Ordering},
    time::Duration,
};

use chrono::{DateTime, Utc};
use optout_amqp::{Message, Outcome, Publisher, Topology, lapin::types::FieldTable};
use optout_proto::queue::v1::{MemberStatus as ProtoStatus, MembersChanged, PersonsDirty, Source};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use sqlx::PgPool;
use tracing::{debug, warn};

use crate::{
    Result,
    rule::{Decision, MemberStatus, Scope},
    store::{self, PersonState, Snapshot},
};

/// The proto full name of `PersonsDirty`, for the AMQP `type` property.
const PERSONS_DIRTY_TYPE: &str = "optout.queue.v1.PersonsDirty";
/// Emails per `PersonsDirty` message, keeping messages small.
const DIRTY_CHUNK: usize = 500;

/// Cumulative counters reported by `GetStatus`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    messages_processed: AtomicI64,
    decisions_opt_out: AtomicI64,
    decisions_opt_in: AtomicI64,
    decisions_no_change: AtomicI64,
    dirty_published: AtomicI64,
    messages_dead_lettered: AtomicI64,
    /// The same decisions as a Prometheus family, `optout_decisions_total{decision}`.
    pub(crate) decisions: Family<DecisionLabels, Counter>,
}

/// The decision label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DecisionLabels {
    decision: &'static str,
}

impl Counters {
    /// Name and value of every counter.
    pub(crate) fn snapshot(&self) -> HashMap<String, i64> {
        [
            ("messages_processed", &self.messages_processed),
            ("decisions_opt_out", &self.decisions_opt_out),
            ("decisions_opt_in", &self.decisions_opt_in),
            ("decisions_no_change", &self.decisions_no_change),
            ("dirty_published", &self.dirty_published),
            ("messages_dead_lettered", &self.messages_dead_lettered),
        ]
        .into_iter()
        .map(|(name, counter)| (name.to_owned(), counter.load(Ordering::Relaxed)))
        .collect()
    }
}

/// Applies batches of `members.changed` messages.
#[derive(Debug)]
pub(crate) struct Evaluator {
    pub(crate) pool: PgPool,
    pub(crate) publisher: Publisher,
    pub(crate) topology: Topology,
    pub(crate) scope: Scope,
    pub(crate) counters: std::sync::Arc<Counters>,
}

impl Evaluator {
    /// One outcome per message, in order.
    pub(crate) async fn handle(&self, batch: Vec<Message<MembersChanged>>) -> Vec<Outcome> {
        let mut outcomes = vec![Outcome::Ack; batch.len()];
        let mut valid = Vec::with_capacity(batch.len());
        for (index, message) in batch.iter().enumerate() {
            match snapshots_of(&message.body) {
                Ok(snapshots) => valid.push((index, snapshots)),
                Err(reason) => {
                    warn!(
                        message_id = message.message_id,
                        reason, "rejecting members.changed message"
                    );
                    self.counters
                        .messages_dead_lettered
                        .fetch_add(1, Ordering::Relaxed);
                    outcomes[index] = Outcome::DeadLetter(reason);
                }
            }
        }
        if valid.is_empty() {
            return outcomes;
        }
        let all: Vec<Snapshot> = valid
            .iter()
            .flat_map(|(_, snapshots)| snapshots.iter().cloned())
            .collect();
        match self.apply(&all).await {
            Ok(()) => {
                self.counters
                    .messages_processed
                    .fetch_add(valid.len() as i64, Ordering::Relaxed);
            }
            Err(error) if valid.len() > 1 && !error.is_transient() => {
                // One message may be at fault: apply them one by one so only that one is retried.
                warn!(error = %error_chain(&error), "batch failed, applying its messages one by one");
                for (index, snapshots) in &valid {
                    outcomes[*index] = match self.apply(snapshots).await {
                        Ok(()) => {
                            self.counters
                                .messages_processed
                                .fetch_add(1, Ordering::Relaxed);
                            Outcome::Ack
                        }
                        Err(error) => Outcome::Retry(error_chain(&error)),
                    };
                }
            }
            Err(error) => {
                let reason = error_chain(&error);
                warn!(error = reason, "batch failed, requeueing it");
                for (index, _) in &valid {
                    outcomes[*index] = Outcome::Retry(reason.clone());
                }
            }
        }
        outcomes
    }

    /// Commits the snapshots, then publishes `persons.dirty` for every email they touch that is opted out or
    /// carries opt-in evidence. Level-triggered: a redelivery after a crash between commit and publish finds
    /// the same state and publishes again.
    ///
    /// Opt-outs decided from a first sync (poll pages of an audience not yet fully read) are held
    /// instead: audiences are paged independently, so the person's subscribed member in another
    /// audience may not have arrived yet, and checking the box now would invent an opt-out that no
    /// later sync could take back (a first sync is a baseline, never opt-in evidence).
    /// [`Evaluator::release_held`] publishes them once the first sync has gone quiet.
    async fn apply(&self, snapshots: &[Snapshot]) -> Result<()> {
        let states = store::apply_batch(&self.pool, &self.scope, snapshots).await?;
        let first_sync: HashSet<&str> = snapshots
            .iter()
            .filter(|snapshot| snapshot.first_sync && snapshot.learned_from == "poll")
            .map(|snapshot| snapshot.email.as_str())
            .collect();
        let held: Vec<String> = states
            .iter()
            .filter(|state| {
                state.decision == Decision::OptOut && first_sync.contains(state.email.as_str())
            })
            .map(|state| state.email.clone())
            .collect();
        if !first_sync.is_empty() {
            // After the commit above, like the publish below: a crash in between redelivers the
            // batch, which finds the same state and holds (or publishes) again.
            store::hold_first_sync_opt_outs(&self.pool, &held).await?;
        }
        let held: HashSet<String> = held.into_iter().collect();
        for state in &states {
            let (counter, decision) = match state.decision {
                Decision::OptOut => (&self.counters.decisions_opt_out, "opt_out"),
                Decision::OptIn => (&self.counters.decisions_opt_in, "opt_in"),
                Decision::NoChange => (&self.counters.decisions_no_change, "no_change"),
            };
            counter.fetch_add(1, Ordering::Relaxed);
            self.counters
                .decisions
                .get_or_create(&DecisionLabels { decision })
                .inc();
        }
        let published: Vec<PersonState> = states
            .into_iter()
            .filter(|state| !held.contains(&state.email))
            .collect();
        self.publish_dirty(&published).await
    }

    async fn publish_dirty(&self, states: &[PersonState]) -> Result<()> {
        let emails: Vec<String> = states
            .iter()
            .filter(|state| state.decision == Decision::OptOut || state.has_evidence)
            .map(|state| state.email.clone())
            .collect();
        self.publish_emails(&emails).await
    }

    /// Publishes the held first-sync opt-outs once no first-sync page has arrived for `quiet`
    /// (every audience's members are then known), or those held longer than `max_hold` whatever
    /// the first sync is doing; those no longer opted out are dropped without a message. Rows are
    /// deleted in the transaction that publishes them, committed after the broker confirmed, so a
    /// crash in between leaves them held. Returns how many rows went.
    pub(crate) async fn release_held(&self, quiet: Duration, max_hold: Duration) -> Result<usize> {
        let mut transaction = self.pool.begin().await?;
        let released =
            store::take_releasable(&mut transaction, quiet, max_hold, DIRTY_CHUNK * 10).await?;
        if released.is_empty() {
            return Ok(0);
        }
        let emails: Vec<String> = released
            .iter()
            .filter(|(_, opted_out)| *opted_out)
            .map(|(email, _)| email.clone())
            .collect();
        self.publish_emails(&emails).await?;
        transaction.commit().await?;
        debug!(
            released = released.len(),
            published = emails.len(),
            "released held first-sync opt-outs"
        );
        Ok(released.len())
    }

    /// `persons.dirty` for `emails`, each to its partition, in chunks.
    async fn publish_emails(&self, emails: &[String]) -> Result<()> {
        let mut partitions: BTreeMap<u16, Vec<String>> = BTreeMap::new();
        for email in emails {
            partitions
                .entry(self.topology.partition_for(email))
                .or_default()
                .push(email.clone());
        }
        for (partition, emails) in partitions {
            let routing_key = self.topology.persons_dirty_routing_key(partition);
            for chunk in emails.chunks(DIRTY_CHUNK) {
                let message = PersonsDirty {
                    emails: chunk.to_vec(),
                    reason: "members.changed".to_owned(),
                };
                self.publisher
                    .publish_typed(
                        &routing_key,
                        PERSONS_DIRTY_TYPE,
                        &message,
                        FieldTable::default(),
                    )
                    .await?;
                self.counters
                    .dirty_published
                    .fetch_add(chunk.len() as i64, Ordering::Relaxed);
                debug!(partition, emails = chunk.len(), "published persons.dirty");
            }
        }
        Ok(())
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Validates a message and turns it into normalised snapshots; the error is the dead-letter reason.
/// Total over any decoded message (fuzzed in `crates/fuzz-targets`).
pub fn snapshots_of(message: &MembersChanged) -> Result<Vec<Snapshot>, String> {
    let audience_id = message.audience_id.trim();
    if audience_id.is_empty() {
        return Err("members.changed without audience_id".to_owned());
    }
    let learned_from = match Source::try_from(message.source) {
        Ok(Source::Poll) => "poll",
        Ok(Source::Webhook) => "webhook",
        Ok(Source::Api) => "api",
        Ok(Source::Unspecified) | Err(_) => "unknown",
    };
    message
        .members
        .iter()
        .map(|member| {
            let email = store::normalize_email(&member.email);
            if email.is_empty() {
                return Err("member snapshot without email".to_owned());
            }
            let status = match ProtoStatus::try_from(member.status) {
                Ok(ProtoStatus::Subscribed) => MemberStatus::Subscribed,
                Ok(ProtoStatus::Unsubscribed) => MemberStatus::Unsubscribed,
                Ok(ProtoStatus::Cleaned) => MemberStatus::Cleaned,
                Ok(ProtoStatus::Pending) => MemberStatus::Pending,
                Ok(ProtoStatus::Transactional) => MemberStatus::Transactional,
                Ok(ProtoStatus::Archived) => MemberStatus::Archived,
                Ok(ProtoStatus::Deleted) => MemberStatus::Deleted,
                Ok(ProtoStatus::Unspecified) | Err(_) => {
                    return Err(format!(
                        "member snapshot of {email} without a known status ({})",
                        member.status
                    ));
                }
            };
            // A snapshot without last_changed sorts before every stored one: it can create a member, never
            // overwrite a known state.
            let last_changed = member
                .last_changed
                .as_ref()
                .and_then(|time| {
                    DateTime::<Utc>::from_timestamp(
                        time.seconds,
                        u32::try_from(time.nanos).unwrap_or(0),
                    )
                })
                .unwrap_or(DateTime::UNIX_EPOCH);
            Ok(Snapshot {
                email,
                audience_id: audience_id.to_owned(),
                status,
                last_changed,
                learned_from,
                first_sync: message.first_sync,
            }
            .with_stored_precision())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use optout_proto::queue::v1::MemberSnapshot;

    use super::*;

    fn message(members: Vec<MemberSnapshot>) -> MembersChanged {
        MembersChanged {
            audience_id: "aud1".to_owned(),
            source: Source::Webhook as i32,
            members,
            first_sync: false,
            run_id: String::new(),
        }
    }

    fn snapshot(email: &str, status: ProtoStatus) -> MemberSnapshot {
        MemberSnapshot {
            email: email.to_owned(),
            status: status as i32,
            last_changed: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_456_789,
            }),
        }
    }

    #[test]
    fn normalises_emails_and_truncates_times_to_microseconds() {
        let snapshots = snapshots_of(&message(vec![snapshot(
            "  Jane@Example.COM ",
            ProtoStatus::Unsubscribed,
        )]))
        .expect("valid");
        assert_eq!(snapshots[0].email, "jane@example.com");
        assert_eq!(snapshots[0].status, MemberStatus::Unsubscribed);
        assert_eq!(snapshots[0].learned_from, "webhook");
        assert_eq!(
            snapshots[0].last_changed.timestamp_subsec_nanos(),
            123_456_000
        );
    }

    #[test]
    fn rejects_snapshot_without_status() {
        let result = snapshots_of(&message(vec![snapshot(
            "a@x.com",
            ProtoStatus::Unspecified,
        )]));
        assert!(result.is_err());
    }

    #[test]
    fn rejects_message_without_audience() {
        let mut without_audience = message(vec![]);
        without_audience.audience_id = " ".to_owned();
        assert!(snapshots_of(&without_audience).is_err());
    }

    #[test]
    fn rejects_snapshot_without_email() {
        assert!(snapshots_of(&message(vec![snapshot("  ", ProtoStatus::Subscribed)])).is_err());
    }

    #[test]
    fn counters_report_the_names_other_crates_rely_on() {
        let names = Counters::default().snapshot();
        for name in [
            "messages_processed",
            "decisions_opt_out",
            "decisions_opt_in",
            "decisions_no_change",
            "dirty_published",
        ] {
            assert!(names.contains_key(name), "{name}");
        }
    }
}
