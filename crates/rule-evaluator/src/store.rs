//! The evaluator's PostgreSQL state: members, their transitions and the decision per email.
//!
//! Replicas share the schema. Every batch runs in one transaction that first locks the existing person rows
//! of all its emails in sorted order, and creates the missing ones, also in sorted order, before it writes
//! anything else; so two replicas handling the same email serialize (and cannot deadlock), and the decision
//! is always computed from the complete, current member set (see [`apply_batch`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, SubsecRound, Utc};
use secrecy::{ExposeSecret, SecretString};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, Row, postgres::PgPoolOptions};

use crate::{
    Result,
    rule::{Decision, MemberStatus, MemberView, Scope, decide},
};

/// Trims and lower-cases an email address: Mailchimp and Salesforce match case-insensitively.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Creates `schema` if missing, opens a pool whose connections all use it, and runs the migrations.
pub async fn connect(
    database_url: &SecretString,
    schema: &str,
    max_connections: u32,
) -> Result<PgPool> {
    if !crate::config::is_identifier(schema) {
        return Err(crate::Error::Config(format!(
            "database schema must match [a-z_][a-z0-9_]*, got {schema:?}"
        )));
    }
    let mut connection = PgConnection::connect(database_url.expose_secret()).await?;
    // Replicas start together: CREATE SCHEMA IF NOT EXISTS can still fail on a concurrent create, so take a
    // transaction-scoped advisory lock around it.
    let mut transaction = connection.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("optout schema {schema}"))
        .execute(&mut *transaction)
        .await?;
    // The schema name was validated as an identifier (Config::validate), so splicing it is safe.
    sqlx::raw_sql(AssertSqlSafe(format!(
        r#"CREATE SCHEMA IF NOT EXISTS "{schema}""#
    )))
    .execute(&mut *transaction)
    .await?;
    transaction.commit().await?;
    connection.close().await?;

    // A batch looks up thousands of emails by key. At the default random_page_cost (4, a disk's
    // seek) the planner prefers a (parallel) scan of the whole persons or members table for that,
    // so every batch costs more as the org grows; these tables are hot in memory, where an index
    // probe costs about as much as a sequential read.
    let search_path = format!(r#"SET search_path TO "{schema}"; SET random_page_cost = 1.1"#);
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .after_connect(move |connection, _metadata| {
            let search_path = search_path.clone();
            Box::pin(async move {
                sqlx::raw_sql(AssertSqlSafe(search_path))
                    .execute(connection)
                    .await?;
                Ok(())
            })
        })
        // A connection's buffers keep the size of the largest statement or result it carried
        // (a batch's upsert, a page of rows: hundreds of KiB), so a pool would hold that much
        // for each connection it ever used at once, more of them the longer a sync ran; shrunk
        // as each goes back to the pool, only the statements running hold them.
        .after_release(|connection, _metadata| {
            Box::pin(async move {
                connection.shrink_buffers();
                Ok(true)
            })
        })
        .connect(database_url.expose_secret())
        .await?;
    // The _sqlx_migrations table lands in our schema through the search path.
    sqlx::migrate!("./migrations").run(&pool).await?;
    Ok(pool)
}

/// One member snapshot, validated and normalised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Normalised email.
    pub email: String,
    /// Mailchimp audience id.
    pub audience_id: String,
    /// Reported status.
    pub status: MemberStatus,
    /// Mailchimp's `last_changed`, truncated to PostgreSQL's microseconds so equal times compare equal.
    pub last_changed: DateTime<Utc>,
    /// `poll`, `webhook` or `api`.
    pub learned_from: &'static str,
    /// Part of an audience's first sync: a new subscribed member is a baseline, not evidence.
    pub first_sync: bool,
}

impl Snapshot {
    /// Truncates `last_changed` to microseconds, the precision PostgreSQL stores.
    pub fn with_stored_precision(mut self) -> Self {
        self.last_changed = self.last_changed.trunc_subsecs(6);
        self
    }
}

/// The state of one email after a batch committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersonState {
    /// Normalised email.
    pub email: String,
    /// Current decision.
    pub decision: Decision,
    /// Whether opt-in evidence waits to be applied.
    pub has_evidence: bool,
}

/// The stored decision of one email.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDecision {
    /// Normalised email.
    pub email: String,
    /// The decision.
    pub decision: Decision,
    /// The rule that produced it.
    pub rule: String,
    /// Moves on every change of decision or evidence; 0 for an unknown email.
    pub version: i64,
    /// Pending opt-in evidence, 0 when none.
    pub opt_in_evidence_id: i64,
    /// For an opt-out: the latest `last_changed` of the email's unsubscribed members.
    pub opted_out_at: Option<DateTime<Utc>>,
}

impl StoredDecision {
    fn unknown(email: String) -> Self {
        Self {
            email,
            decision: Decision::NoChange,
            rule: crate::rule::RULE_NO_MEMBERS.to_owned(),
            version: 0,
            opt_in_evidence_id: 0,
            opted_out_at: None,
        }
    }
}

/// A member row, for Explain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMember {
    /// Audience id.
    pub audience_id: String,
    /// Status as stored.
    pub status: String,
    /// Mailchimp's last_changed.
    pub last_changed: DateTime<Utc>,
    /// Where it was learned.
    pub learned_from: String,
}

/// A transition row, for Explain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredTransition {
    /// Audience id.
    pub audience_id: String,
    /// Previous status, empty when first seen.
    pub from_status: String,
    /// New status.
    pub to_status: String,
    /// Mailchimp's last_changed of the new status.
    pub last_changed: DateTime<Utc>,
    /// When the evaluator recorded it.
    pub seen_at: DateTime<Utc>,
    /// Where it was learned.
    pub learned_from: String,
}

/// A member as held in memory while a batch is applied.
#[derive(Clone, Debug)]
struct MemberRow {
    status: MemberStatus,
    last_changed: DateTime<Utc>,
    learned_from: String,
    baseline: Baseline,
    changed: bool,
}

/// Where a member's first-seen transition is (see the `first_seen_at` migration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Baseline {
    /// In `transitions`.
    Logged,
    /// Not written yet: the unchanged row stands for it, first seen at this time (`None`: by
    /// this transaction).
    Pending(Option<DateTime<Utc>>),
}

/// A person row as held in memory while a batch is applied.
#[derive(Clone, Debug)]
struct PersonRow {
    decision: Decision,
    rule: String,
    version: i64,
    evidence: Option<i64>,
}

/// Attempts of [`apply_batch`] before it gives up on persons being created under it.
const APPLY_ATTEMPTS: u32 = 5;

/// Applies `snapshots` (in order) in one transaction and returns the resulting state of every email they touch.
///
/// Stale snapshots (older `last_changed` than stored) are ignored and an identical one is a no-op, so
/// replays and reordering are harmless.
pub async fn apply_batch(
    pool: &PgPool,
    scope: &Scope,
    snapshots: &[Snapshot],
    hold: &FirstSyncHold<'_>,
) -> Result<AppliedBatch> {
    let emails: Vec<String> = snapshots
        .iter()
        .map(|snapshot| snapshot.email.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if emails.is_empty() {
        return Ok(AppliedBatch::default());
    }
    for attempt in 1..=APPLY_ATTEMPTS {
        if let Some(applied) = try_apply_batch(pool, scope, snapshots, &emails, hold).await? {
            return Ok(applied);
        }
        tracing::debug!(
            attempt,
            "persons of the batch were created concurrently; again"
        );
    }
    Err(crate::Error::Contended {
        attempts: APPLY_ATTEMPTS,
    })
}

/// One attempt of [`apply_batch`] over its distinct, sorted `emails`; `None` (rolled back) when
/// another writer created one of the persons this attempt was about to create.
///
/// Every person is read and locked first, in email order. One that does not exist yet is created
/// at the end with its decision, in email order, rather than as a placeholder that is locked and
/// updated: a first sync creates most of its persons, and that halves their writes. Such a person
/// has no members yet (members are only ever written under their person's row, and persons are
/// never deleted), so its decision depends on this batch alone, unless another writer creates it
/// meanwhile: then the insert finds that row (after waiting for its transaction) and the attempt
/// starts over, now locking the row and reading its members.
async fn try_apply_batch(
    pool: &PgPool,
    scope: &Scope,
    snapshots: &[Snapshot],
    emails: &[String],
    hold: &FirstSyncHold<'_>,
) -> Result<Option<AppliedBatch>> {
    let mut transaction = pool.begin().await?;
    let person_rows = sqlx::query(
        "SELECT email, decision, rule, version, opt_in_evidence_id FROM persons \
         WHERE email = ANY($1) ORDER BY email FOR UPDATE",
    )
    .bind(emails)
    .fetch_all(&mut *transaction)
    .await?;
    let mut persons: BTreeMap<String, PersonRow> = BTreeMap::new();
    for row in person_rows {
        persons.insert(
            row.try_get("email")?,
            PersonRow {
                decision: Decision::from_stored(row.try_get::<&str, _>("decision")?),
                rule: row.try_get("rule")?,
                version: row.try_get("version")?,
                evidence: row.try_get("opt_in_evidence_id")?,
            },
        );
    }

    // Every member of these persons, in every audience: the decision needs all of them. The
    // person locks above already serialize writers of these rows.
    let mut members: BTreeMap<(String, String), MemberRow> = BTreeMap::new();
    if !persons.is_empty() {
        let existing: Vec<&str> = persons.keys().map(String::as_str).collect();
        let member_rows = sqlx::query(
            "SELECT email, audience_id, status, last_changed, learned_from, first_seen_at \
             FROM members WHERE email = ANY($1)",
        )
        .bind(&existing)
        .fetch_all(&mut *transaction)
        .await?;
        for row in member_rows {
            let status_text: String = row.try_get("status")?;
            let Ok(status) = status_text.parse::<MemberStatus>() else {
                tracing::warn!(
                    status = status_text,
                    "ignoring member row with unknown status"
                );
                continue;
            };
            members.insert(
                (row.try_get("email")?, row.try_get("audience_id")?),
                MemberRow {
                    status,
                    last_changed: row.try_get("last_changed")?,
                    learned_from: row.try_get("learned_from")?,
                    baseline: match row.try_get("first_seen_at")? {
                        Some(seen_at) => Baseline::Pending(Some(seen_at)),
                        None => Baseline::Logged,
                    },
                    changed: false,
                },
            );
        }
    }

    // Apply the snapshots in memory, collecting transitions and fresh opt-in evidence.
    let mut transitions = Transitions::default();
    let mut fresh_evidence: BTreeSet<String> = BTreeSet::new();
    for snapshot in snapshots {
        let key = (snapshot.email.clone(), snapshot.audience_id.clone());
        let previous = members.get(&key);
        if let Some(previous) = previous {
            if snapshot.last_changed < previous.last_changed {
                continue; // stale: an older snapshot arriving late, or a replay
            }
            if snapshot.last_changed == previous.last_changed && snapshot.status == previous.status
            {
                continue; // the same snapshot again
            }
        }
        let previous_status = previous.map(|previous| previous.status);
        // Opt-in evidence: Mailchimp set a member back to subscribed, or a subscribed member appeared after its
        // audience's first sync. A first-sync baseline is not evidence.
        if snapshot.status == MemberStatus::Subscribed {
            let resubscribed = match previous_status {
                Some(status) => status != MemberStatus::Subscribed,
                None => !snapshot.first_sync,
            };
            if resubscribed {
                fresh_evidence.insert(snapshot.email.clone());
            }
        }
        // A member first seen is logged by its row alone until the row changes; then its
        // first-seen transition is written ahead of the change's own.
        let baseline = match previous {
            None => Baseline::Pending(None),
            Some(previous) => {
                if let Baseline::Pending(seen_at) = previous.baseline {
                    transitions.push_first_seen(&key, previous, seen_at);
                }
                if previous.status != snapshot.status {
                    transitions.push(snapshot, previous_status);
                }
                Baseline::Logged
            }
        };
        members.insert(
            key,
            MemberRow {
                status: snapshot.status,
                last_changed: snapshot.last_changed,
                learned_from: snapshot.learned_from.to_owned(),
                baseline,
                changed: true,
            },
        );
    }

    // Recompute each person's decision from all its members.
    let mut views: HashMap<&str, Vec<MemberView>> = HashMap::new();
    for ((email, audience_id), member) in &members {
        views.entry(email.as_str()).or_default().push(MemberView {
            audience_id: audience_id.clone(),
            status: member.status,
        });
    }
    let evidence_ids = next_evidence_ids(&mut transaction, fresh_evidence.len()).await?;
    let mut evidence_ids = evidence_ids.into_iter();
    let mut updates = PersonUpdates::default();
    let mut created = PersonUpdates::default();
    let mut states = Vec::with_capacity(emails.len());
    // What a person that does not exist yet starts from.
    let unknown = PersonRow {
        decision: Decision::NoChange,
        rule: crate::rule::RULE_NO_MEMBERS.to_owned(),
        version: 0,
        evidence: None,
    };
    for email in emails {
        let (stored, rows) = match persons.get(email) {
            Some(stored) => (stored, &mut updates),
            None => (&unknown, &mut created),
        };
        let (decision, rule) = decide(
            views.get(email.as_str()).map(Vec::as_slice).unwrap_or(&[]),
            scope,
        );
        let mut evidence = stored.evidence;
        if fresh_evidence.contains(email) {
            evidence = evidence_ids.next().or(evidence);
        }
        // An opt-out supersedes an earlier re-subscribe that was not applied yet.
        if decision == Decision::OptOut {
            evidence = None;
        }
        let moved = decision != stored.decision || evidence != stored.evidence;
        let version = if moved {
            stored.version + 1
        } else {
            stored.version
        };
        if moved || rule != stored.rule || !persons.contains_key(email) {
            rows.push(email, decision, rule, version, evidence);
        }
        states.push(PersonState {
            email: email.clone(),
            decision,
            has_evidence: evidence.is_some(),
        });
    }
    if !created.insert(&mut transaction).await? {
        transaction.rollback().await?;
        return Ok(None);
    }
    write_members(&mut transaction, &members).await?;
    transitions.write(&mut transaction).await?;
    updates.write(&mut transaction).await?;
    let held: Vec<String> = states
        .iter()
        .filter(|state| {
            state.decision == Decision::OptOut && hold.first_sync.contains(state.email.as_str())
        })
        .map(|state| state.email.clone())
        .collect();
    if !hold.first_sync.is_empty() || !hold.pages.is_empty() {
        hold_first_sync_opt_outs(&mut transaction, &held, hold.pages, hold.traceparent).await?;
    }
    transaction.commit().await?;
    Ok(Some(AppliedBatch { states, held }))
}

/// What a batch holds back from a first sync (see `Evaluator::apply`).
#[derive(Debug, Default)]
pub struct FirstSyncHold<'a> {
    /// The emails of the batch's first-sync poll snapshots: their opt-outs are held.
    pub first_sync: HashSet<&'a str>,
    /// The first-sync pages of the batch, counted.
    pub pages: &'a [FirstSyncPage],
    /// The trace a release of the held opt-outs continues.
    pub traceparent: Option<&'a str>,
}

/// A batch applied: the state of every email it touched, and the opt-outs it held.
#[derive(Debug, Default)]
pub struct AppliedBatch {
    /// Every email's resulting state.
    pub states: Vec<PersonState>,
    /// The first-sync opt-outs held rather than published.
    pub held: Vec<String>,
}

async fn write_members(
    connection: &mut PgConnection,
    members: &BTreeMap<(String, String), MemberRow>,
) -> Result<()> {
    let mut emails = Vec::new();
    let mut audiences = Vec::new();
    let mut statuses = Vec::new();
    let mut times = Vec::new();
    let mut sources = Vec::new();
    let mut pending = Vec::new();
    let mut first_seen = Vec::new();
    for ((email, audience_id), member) in members.iter().filter(|(_, member)| member.changed) {
        emails.push(email.as_str());
        audiences.push(audience_id.as_str());
        statuses.push(member.status.as_str());
        times.push(member.last_changed);
        sources.push(member.learned_from.as_str());
        let seen_at = match member.baseline {
            Baseline::Logged => None,
            Baseline::Pending(seen_at) => Some(seen_at),
        };
        pending.push(seen_at.is_some());
        first_seen.push(seen_at.flatten());
    }
    if emails.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO members (email, audience_id, status, last_changed, learned_from, updated_at, first_seen_at) \
         SELECT email, audience_id, status, last_changed, learned_from, now(), \
           CASE WHEN pending THEN coalesce(first_seen_at, now()) END \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::bool[], $7::timestamptz[]) \
           AS u(email, audience_id, status, last_changed, learned_from, pending, first_seen_at) \
         ON CONFLICT (email, audience_id) DO UPDATE SET status = EXCLUDED.status, \
           last_changed = EXCLUDED.last_changed, learned_from = EXCLUDED.learned_from, updated_at = now(), \
           first_seen_at = EXCLUDED.first_seen_at",
    )
    .bind(&emails)
    .bind(&audiences)
    .bind(&statuses)
    .bind(&times)
    .bind(&sources)
    .bind(&pending)
    .bind(&first_seen)
    .execute(connection)
    .await?;
    Ok(())
}

async fn next_evidence_ids(connection: &mut PgConnection, count: usize) -> Result<Vec<i64>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let ids =
        sqlx::query_scalar("SELECT nextval('opt_in_evidence_ids') FROM generate_series(1, $1)")
            .bind(i64::try_from(count).unwrap_or(i64::MAX))
            .fetch_all(connection)
            .await?;
    Ok(ids)
}

/// Transition rows collected during a batch, written with one statement.
#[derive(Default)]
struct Transitions {
    emails: Vec<String>,
    audiences: Vec<String>,
    from: Vec<Option<&'static str>>,
    to: Vec<&'static str>,
    times: Vec<DateTime<Utc>>,
    sources: Vec<String>,
    /// When it was seen; `None`: now.
    seen: Vec<Option<DateTime<Utc>>>,
}

impl Transitions {
    fn push(&mut self, snapshot: &Snapshot, from: Option<MemberStatus>) {
        self.emails.push(snapshot.email.clone());
        self.audiences.push(snapshot.audience_id.clone());
        self.from.push(from.map(MemberStatus::as_str));
        self.to.push(snapshot.status.as_str());
        self.times.push(snapshot.last_changed);
        self.sources.push(snapshot.learned_from.to_owned());
        self.seen.push(None);
    }

    /// The first-seen transition a member's unchanged row stood for.
    fn push_first_seen(
        &mut self,
        (email, audience_id): &(String, String),
        member: &MemberRow,
        seen_at: Option<DateTime<Utc>>,
    ) {
        self.emails.push(email.clone());
        self.audiences.push(audience_id.clone());
        self.from.push(None);
        self.to.push(member.status.as_str());
        self.times.push(member.last_changed);
        self.sources.push(member.learned_from.clone());
        self.seen.push(seen_at);
    }

    async fn write(&self, connection: &mut PgConnection) -> Result<()> {
        if self.emails.is_empty() {
            return Ok(());
        }
        // In email order (keeping each email's own order, so its ids still follow it): the rows
        // then go into the email index page by page instead of all over it.
        sqlx::query(
            "INSERT INTO transitions (email, audience_id, from_status, to_status, last_changed, learned_from, seen_at) \
             SELECT email, audience_id, from_status, to_status, last_changed, learned_from, coalesce(seen_at, now()) \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[], $7::timestamptz[]) \
               WITH ORDINALITY AS u(email, audience_id, from_status, to_status, last_changed, learned_from, seen_at, position) \
             ORDER BY email, position",
        )
        .bind(&self.emails)
        .bind(&self.audiences)
        .bind(&self.from)
        .bind(&self.to)
        .bind(&self.times)
        .bind(&self.sources)
        .bind(&self.seen)
        .execute(connection)
        .await?;
        Ok(())
    }
}

/// Person rows to update at the end of a batch, written with one statement.
#[derive(Default)]
struct PersonUpdates {
    emails: Vec<String>,
    decisions: Vec<&'static str>,
    rules: Vec<&'static str>,
    versions: Vec<i64>,
    evidence: Vec<Option<i64>>,
}

impl PersonUpdates {
    fn push(
        &mut self,
        email: &str,
        decision: Decision,
        rule: &'static str,
        version: i64,
        evidence: Option<i64>,
    ) {
        self.emails.push(email.to_owned());
        self.decisions.push(decision.as_str());
        self.rules.push(rule);
        self.versions.push(version);
        self.evidence.push(evidence);
    }

    /// Creates these persons (emails sorted); false, having created only some, when another
    /// writer created one of them first.
    async fn insert(&self, connection: &mut PgConnection) -> Result<bool> {
        if self.emails.is_empty() {
            return Ok(true);
        }
        let inserted = sqlx::query(
            "INSERT INTO persons (email, decision, rule, version, opt_in_evidence_id) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[]) \
               AS u(email, decision, rule, version, evidence) ORDER BY email \
             ON CONFLICT (email) DO NOTHING",
        )
        .bind(&self.emails)
        .bind(&self.decisions)
        .bind(&self.rules)
        .bind(&self.versions)
        .bind(&self.evidence)
        .execute(connection)
        .await?;
        Ok(inserted.rows_affected() == self.emails.len() as u64)
    }

    async fn write(&self, connection: &mut PgConnection) -> Result<()> {
        if self.emails.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE persons AS p SET decision = u.decision, rule = u.rule, version = u.version, \
               opt_in_evidence_id = u.evidence, updated_at = now() \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[]) \
               AS u(email, decision, rule, version, evidence) \
             WHERE p.email = u.email",
        )
        .bind(&self.emails)
        .bind(&self.decisions)
        .bind(&self.rules)
        .bind(&self.versions)
        .bind(&self.evidence)
        .execute(connection)
        .await?;
        Ok(())
    }
}

/// A first-sync poll page applied: its audience, its run and its number within the run (from 1).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FirstSyncPage {
    /// Mailchimp audience id.
    pub audience_id: String,
    /// The fetcher's run.
    pub run_id: String,
    /// The page's number within the audience's run, from 1.
    pub page: i32,
}

/// A first-sync marker of the fetcher, validated (see `FirstSyncMarker` in `messages.proto`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    /// The run that published it.
    pub run_id: String,
    /// When that run started, if it said.
    pub run_started_at: Option<DateTime<Utc>>,
    /// What it announces.
    pub kind: MarkerKind,
}

/// What a [`Marker`] announces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MarkerKind {
    /// These audiences' first syncs have not completed: hold until they have.
    Announced(Vec<String>),
    /// The run starts the audience's first sync from its first page.
    Started(String),
    /// The run published this many pages of the audience's first sync, all confirmed.
    Done(String, i32),
}

/// Holds the opt-outs a batch of first-sync pages decided and counts its `pages`, in the
/// transaction that commits the batch's state, so that a page is counted exactly when its state is
/// committed and its opt-outs are held. A page of an audience no marker announced yet makes the
/// audience pending (markers may be applied after pages by another replica). An email already
/// held keeps its first time; a page counted before is a no-op.
async fn hold_first_sync_opt_outs(
    transaction: &mut PgConnection,
    emails: &[String],
    pages: &[FirstSyncPage],
    traceparent: Option<&str>,
) -> Result<()> {
    if !emails.is_empty() {
        // Sorted, so replicas holding overlapping emails take the rows in one order.
        let sorted: BTreeSet<&str> = emails.iter().map(String::as_str).collect();
        let sorted: Vec<&str> = sorted.into_iter().collect();
        sqlx::query(
            "INSERT INTO held_opt_outs (email, traceparent) SELECT unnest($1::text[]), $2 \
             ON CONFLICT (email) DO NOTHING",
        )
        .bind(sorted)
        .bind(traceparent)
        .execute(&mut *transaction)
        .await?;
    }
    if !pages.is_empty() {
        let pages: BTreeSet<&FirstSyncPage> = pages.iter().collect();
        let audiences: Vec<&str> = pages.iter().map(|page| page.audience_id.as_str()).collect();
        let runs: Vec<&str> = pages.iter().map(|page| page.run_id.as_str()).collect();
        let numbers: Vec<i32> = pages.iter().map(|page| page.page).collect();
        // A page of a run the row does not know yet claims an announced (run-less) row for its run;
        // a completed audience is never re-opened by a page (only by a `Started` marker).
        sqlx::query(
            "INSERT INTO first_sync_audiences (audience_id, run_id) \
             SELECT DISTINCT ON (audience_id) audience_id, run_id \
             FROM unnest($1::text[], $2::text[]) AS page(audience_id, run_id) ORDER BY audience_id \
             ON CONFLICT (audience_id) DO UPDATE \
             SET run_id = coalesce(first_sync_audiences.run_id, excluded.run_id), touched_at = now() \
             WHERE NOT first_sync_audiences.completed",
        )
        .bind(&audiences)
        .bind(&runs)
        .execute(&mut *transaction)
        .await?;
        sqlx::query(
            "INSERT INTO first_sync_pages (audience_id, run_id, page) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::int4[]) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&audiences)
        .bind(&runs)
        .bind(&numbers)
        .execute(&mut *transaction)
        .await?;
    }
    Ok(())
}

/// Applies first-sync markers in one transaction; each is idempotent, so a redelivery is harmless.
///
/// `Announced` makes its audiences pending without a run, but never re-opens a completed one (another
/// replica's run may just have finished it). `Started` and `Done` follow the run they name unless
/// the row already follows a later-started run: `Started` of a new run re-opens the audience and
/// forgets the old run's page count (a first sync that crashed is paged again from the start), and
/// `Done` sets the number of pages to count.
pub async fn record_first_sync_markers(pool: &PgPool, markers: &[Marker]) -> Result<()> {
    let mut transaction = pool.begin().await?;
    for marker in markers {
        let (audience_id, expected_pages) = match &marker.kind {
            MarkerKind::Announced(audience_ids) => {
                let sorted: BTreeSet<&str> = audience_ids.iter().map(String::as_str).collect();
                let sorted: Vec<&str> = sorted.into_iter().collect();
                sqlx::query(
                    "INSERT INTO first_sync_audiences (audience_id) SELECT unnest($1::text[]) \
                     ON CONFLICT (audience_id) DO UPDATE SET touched_at = now() \
                     WHERE NOT first_sync_audiences.completed",
                )
                .bind(sorted)
                .execute(&mut *transaction)
                .await?;
                continue;
            }
            MarkerKind::Started(audience_id) => (audience_id, None),
            MarkerKind::Done(audience_id, pages) => (audience_id, Some(*pages)),
        };
        sqlx::query(
            "INSERT INTO first_sync_audiences (audience_id, run_id, run_started_at, expected_pages) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (audience_id) DO UPDATE SET \
                 run_id = excluded.run_id, \
                 run_started_at = coalesce(excluded.run_started_at, first_sync_audiences.run_started_at), \
                 expected_pages = CASE WHEN first_sync_audiences.run_id = excluded.run_id \
                     THEN coalesce(excluded.expected_pages, first_sync_audiences.expected_pages) \
                     ELSE excluded.expected_pages END, \
                 completed = first_sync_audiences.completed \
                     AND first_sync_audiences.run_id IS NOT DISTINCT FROM excluded.run_id, \
                 touched_at = now() \
             WHERE first_sync_audiences.run_id IS NOT DISTINCT FROM excluded.run_id \
                OR first_sync_audiences.run_started_at IS NULL \
                OR excluded.run_started_at IS NULL \
                OR excluded.run_started_at >= first_sync_audiences.run_started_at",
        )
        .bind(audience_id)
        .bind(&marker.run_id)
        .bind(marker.run_started_at)
        .bind(expected_pages)
        .execute(&mut *transaction)
        .await?;
    }
    transaction.commit().await?;
    Ok(())
}

/// Marks complete every pending audience whose run has said how many pages it published and had
/// that many of its pages counted, forgets the page rows no longer needed, and returns how many
/// audiences are still pending. A pending audience untouched for `max_hold` is not counted: its
/// fetcher stopped (audience out of scope, replica gone) and the max hold releases its opt-outs.
pub async fn settle_first_sync_audiences(
    pool: &PgPool,
    max_hold: std::time::Duration,
) -> Result<i64> {
    let max_hold_secs = max_hold.as_secs_f64();
    let mut transaction = pool.begin().await?;
    sqlx::query(
        "UPDATE first_sync_audiences a SET completed = true \
         WHERE NOT completed AND run_id IS NOT NULL AND expected_pages IS NOT NULL \
           AND (SELECT count(*) FROM first_sync_pages p \
                WHERE p.audience_id = a.audience_id AND p.run_id = a.run_id \
                  AND p.page BETWEEN 1 AND a.expected_pages) >= a.expected_pages",
    )
    .execute(&mut *transaction)
    .await?;
    // Pages of a completed run (and late redeliveries of them), and pages of other runs once old
    // enough that their run cannot be the one still to come.
    sqlx::query(
        "DELETE FROM first_sync_pages p USING first_sync_audiences a \
         WHERE p.audience_id = a.audience_id \
           AND ((a.completed AND p.run_id = a.run_id) \
                OR (p.run_id IS DISTINCT FROM a.run_id \
                    AND p.seen_at < now() - make_interval(secs => $1)))",
    )
    .bind(max_hold_secs)
    .execute(&mut *transaction)
    .await?;
    let pending = sqlx::query_scalar(
        "SELECT count(*) FROM first_sync_audiences \
         WHERE NOT completed AND touched_at > now() - make_interval(secs => $1)",
    )
    .bind(max_hold_secs)
    .fetch_one(&mut *transaction)
    .await?;
    transaction.commit().await?;
    Ok(pending)
}

/// Deletes up to `limit` held opt-outs that may go (all of them once no first-sync audience is
/// pending, see [`settle_first_sync_audiences`]; otherwise those held longer than `max_hold`) in
/// `transaction`, which the caller commits once they are published, and returns them (see
/// [`Released`]). Rows another replica is releasing are skipped.
pub async fn take_releasable(
    transaction: &mut sqlx::PgConnection,
    max_hold: std::time::Duration,
    limit: usize,
) -> Result<Vec<Released>> {
    // A person whose subscribed member arrived meanwhile needs no write (and one with opt-in
    // evidence is published by the evidence path). The bound on held_at is computed once, so the
    // index on it is used whether an audience is pending or not.
    let released = sqlx::query_as(
        "WITH released AS ( \
             DELETE FROM held_opt_outs WHERE email IN ( \
                 SELECT email FROM held_opt_outs \
                 WHERE held_at < CASE WHEN EXISTS ( \
                         SELECT 1 FROM first_sync_audiences \
                         WHERE NOT completed AND touched_at > now() - make_interval(secs => $1)) \
                     THEN now() - make_interval(secs => $1) ELSE 'infinity' END \
                 ORDER BY held_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
             RETURNING email, traceparent) \
         SELECT released.email, coalesce(persons.decision = 'opt_out', false), released.traceparent \
         FROM released LEFT JOIN persons USING (email)",
    )
    .bind(max_hold.as_secs_f64())
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(transaction)
    .await?;
    Ok(released)
}

/// A held first-sync opt-out taken for release: the email, whether it is still opted out, and
/// the traceparent of the batch that held it.
pub type Released = (String, bool, Option<String>);

/// How many first-sync opt-outs are held.
pub async fn held_count(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM held_opt_outs")
        .fetch_one(pool)
        .await?)
}

/// The stored decisions of `emails` (normalised here), in the order asked; unknown emails read as no change,
/// version 0.
pub async fn decisions(pool: &PgPool, emails: &[String]) -> Result<Vec<StoredDecision>> {
    let normalized: Vec<String> = emails.iter().map(|email| normalize_email(email)).collect();
    let rows = sqlx::query(
        "SELECT p.email, p.decision, p.rule, p.version, p.opt_in_evidence_id, \
                (SELECT max(m.last_changed) FROM members m \
                  WHERE m.email = p.email AND m.status = 'unsubscribed') AS opted_out_at \
         FROM persons p WHERE p.email = ANY($1)",
    )
    .bind(&normalized)
    .fetch_all(pool)
    .await?;
    let mut found: HashMap<String, StoredDecision> = HashMap::with_capacity(rows.len());
    for row in rows {
        let email: String = row.try_get("email")?;
        let decision = Decision::from_stored(row.try_get::<&str, _>("decision")?);
        let opted_out_at = match decision {
            Decision::OptOut => row.try_get::<Option<DateTime<Utc>>, _>("opted_out_at")?,
            Decision::OptIn | Decision::NoChange => None,
        };
        found.insert(
            email.clone(),
            StoredDecision {
                email,
                decision,
                opted_out_at,
                rule: row.try_get("rule")?,
                version: row.try_get("version")?,
                opt_in_evidence_id: row
                    .try_get::<Option<i64>, _>("opt_in_evidence_id")?
                    .unwrap_or(0),
            },
        );
    }
    Ok(normalized
        .into_iter()
        .map(|email| {
            found
                .get(&email)
                .cloned()
                .unwrap_or_else(|| StoredDecision::unknown(email))
        })
        .collect())
}

/// Clears the pending opt-in evidence of `email` if it is still `evidence_id`; true when cleared.
pub async fn ack_opt_in(pool: &PgPool, email: &str, evidence_id: i64) -> Result<bool> {
    if evidence_id == 0 {
        return Ok(false);
    }
    let result = sqlx::query(
        "UPDATE persons SET opt_in_evidence_id = NULL, version = version + 1, updated_at = now() \
         WHERE email = $1 AND opt_in_evidence_id = $2",
    )
    .bind(normalize_email(email))
    .bind(evidence_id)
    .execute(pool)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Everything known about one email: its decision, members and transitions (oldest first, at most `limit`
/// most recent).
pub async fn explain(
    pool: &PgPool,
    email: &str,
    limit: i64,
) -> Result<(StoredDecision, Vec<StoredMember>, Vec<StoredTransition>)> {
    let email = normalize_email(email);
    let decision = decisions(pool, std::slice::from_ref(&email))
        .await?
        .pop()
        .unwrap_or_else(|| StoredDecision::unknown(email.clone()));
    let mut members = Vec::new();
    // First-seen transitions still stood for by their members' unchanged rows.
    let mut first_seen = Vec::new();
    let rows = sqlx::query(
        "SELECT audience_id, status, last_changed, learned_from, first_seen_at FROM members \
         WHERE email = $1 ORDER BY audience_id",
    )
    .bind(&email)
    .fetch_all(pool)
    .await?;
    for row in rows {
        let member = StoredMember {
            audience_id: row.try_get("audience_id")?,
            status: row.try_get("status")?,
            last_changed: row.try_get("last_changed")?,
            learned_from: row.try_get("learned_from")?,
        };
        if let Some(seen_at) = row.try_get("first_seen_at")? {
            first_seen.push(StoredTransition {
                audience_id: member.audience_id.clone(),
                from_status: String::new(),
                to_status: member.status.clone(),
                last_changed: member.last_changed,
                seen_at,
                learned_from: member.learned_from.clone(),
            });
        }
        members.push(member);
    }
    let mut transitions = sqlx::query(
        "SELECT audience_id, from_status, to_status, last_changed, seen_at, learned_from FROM transitions \
         WHERE email = $1 ORDER BY id DESC LIMIT $2",
    )
    .bind(&email)
    .bind(limit)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|row| {
        Ok(StoredTransition {
            audience_id: row.try_get("audience_id")?,
            from_status: row.try_get::<Option<String>, _>("from_status")?.unwrap_or_default(),
            to_status: row.try_get("to_status")?,
            last_changed: row.try_get("last_changed")?,
            seen_at: row.try_get("seen_at")?,
            learned_from: row.try_get("learned_from")?,
        })
    })
    .collect::<Result<Vec<_>>>()?;
    transitions.reverse();
    // Merged by when they were seen (a stable sort keeps the log's own order among equals), then
    // the most recent `limit`.
    transitions.extend(first_seen);
    transitions.sort_by_key(|transition| transition.seen_at);
    let excess = transitions
        .len()
        .saturating_sub(usize::try_from(limit).unwrap_or(0));
    transitions.drain(..excess);
    Ok((decision, members, transitions))
}

/// A poll page of a sync run, applied and its `persons.dirty` published.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RunPage {
    /// The fetcher's run.
    pub run_id: String,
    /// Mailchimp audience id (pages are numbered per audience).
    pub audience_id: String,
    /// The page's number within the audience's run, from 1.
    pub page: i32,
}

/// Counts applied pages towards their runs' ends; a page counted before is ignored.
pub async fn record_run_pages(pool: &PgPool, pages: &[RunPage]) -> Result<()> {
    if pages.is_empty() {
        return Ok(());
    }
    // Sorted, so consumers counting overlapping pages (a redelivery) take the keys in one order.
    let pages: BTreeSet<&RunPage> = pages.iter().collect();
    let runs: Vec<&str> = pages.iter().map(|page| page.run_id.as_str()).collect();
    let audiences: Vec<&str> = pages.iter().map(|page| page.audience_id.as_str()).collect();
    let numbers: Vec<i32> = pages.iter().map(|page| page.page).collect();
    sqlx::query(
        "INSERT INTO sync_run_pages (run_id, audience_id, page) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::int4[]) \
         ON CONFLICT DO NOTHING",
    )
    .bind(&runs)
    .bind(&audiences)
    .bind(&numbers)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records the ends of runs (run id, pages published); a redelivered end is ignored.
pub async fn record_run_ends(pool: &PgPool, ends: &[(String, i32)]) -> Result<()> {
    if ends.is_empty() {
        return Ok(());
    }
    let ends: BTreeMap<&str, i32> = ends
        .iter()
        .map(|(run_id, pages)| (run_id.as_str(), *pages))
        .collect();
    let runs: Vec<&str> = ends.keys().copied().collect();
    let pages: Vec<i32> = ends.values().copied().collect();
    sqlx::query(
        "INSERT INTO sync_runs (run_id, pages) SELECT * FROM unnest($1::text[], $2::int4[]) \
         ON CONFLICT (run_id) DO NOTHING",
    )
    .bind(&runs)
    .bind(&pages)
    .execute(pool)
    .await?;
    Ok(())
}

/// Marks flushed those of `run_ids` whose end is known and whose every page is counted, and
/// forgets their pages; returns them. The caller publishes the flush before it commits, so a run
/// is flushed once: another consumer completing the same run waits on the row, then finds it
/// flushed.
pub async fn take_complete_runs(
    transaction: &mut sqlx::PgConnection,
    run_ids: &[String],
) -> Result<Vec<String>> {
    if run_ids.is_empty() {
        return Ok(Vec::new());
    }
    let complete: Vec<String> = sqlx::query_scalar(
        "UPDATE sync_runs AS run SET flushed = true \
         WHERE run_id = ANY($1) AND NOT flushed \
         AND pages <= (SELECT count(*) FROM sync_run_pages AS page WHERE page.run_id = run.run_id) \
         RETURNING run_id",
    )
    .bind(run_ids)
    .fetch_all(&mut *transaction)
    .await?;
    if !complete.is_empty() {
        sqlx::query("DELETE FROM sync_run_pages WHERE run_id = ANY($1)")
            .bind(&complete)
            .execute(&mut *transaction)
            .await?;
    }
    Ok(complete)
}

/// Forgets runs and pages older than `age`: runs whose end never came (a fetcher that crashed)
/// and ends already flushed. Returns the rows deleted.
pub async fn forget_old_runs(pool: &PgPool, age: std::time::Duration) -> Result<u64> {
    let seconds = age.as_secs_f64();
    let runs =
        sqlx::query("DELETE FROM sync_runs WHERE ended_at < now() - make_interval(secs => $1)")
            .bind(seconds)
            .execute(pool)
            .await?;
    let pages = sqlx::query(
        "DELETE FROM sync_run_pages WHERE applied_at < now() - make_interval(secs => $1)",
    )
    .bind(seconds)
    .execute(pool)
    .await?;
    Ok(runs.rows_affected() + pages.rows_affected())
}
