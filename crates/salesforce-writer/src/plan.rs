//! The pure half of the writer: which value each Salesforce record must get, which records differ
//! from it, and the SOQL that reads them. No I/O here, so every safety rule is unit tested.
//!
//! The safety asymmetry lives in [`target_for`]: an opt-out always asks for a checked box, an
//! opt-in asks for an unchecked box only when it carries opt-in evidence, anything else asks for
//! nothing. No other function can produce a `false` target.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use optout_proto::evaluator::v1::{Decision, PersonDecision};
use serde_json::Value;

/// Longest URL-encoded SOQL statement sent in one `GET /query?q=`: Salesforce refuses request
/// URIs over 16,384 bytes (414), and the path and host need room too.
pub const MAX_SOQL_LEN: usize = optout_salesforce::soql::DEFAULT_MAX_ENCODED_LEN;

/// The most records one sObject Collections call takes.
pub const COLLECTION_LIMIT: usize = 200;

/// A kind of Salesforce record that carries an Email Opt Out field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SfObject {
    /// `Contact.HasOptedOutOfEmail` (business contacts; person contacts are written via their Account).
    Contact,
    /// `Lead.HasOptedOutOfEmail` (unconverted Leads only).
    Lead,
    /// `Account.PersonHasOptedOutOfEmail` where `IsPersonAccount = true`.
    PersonAccount,
}

impl SfObject {
    /// Every object, in the order the writer handles them.
    pub const ALL: [SfObject; 3] = [SfObject::Contact, SfObject::Lead, SfObject::PersonAccount];

    /// The sObject type name used in API calls.
    pub fn sobject(self) -> &'static str {
        match self {
            SfObject::Contact => "Contact",
            SfObject::Lead => "Lead",
            SfObject::PersonAccount => "Account",
        }
    }

    /// The field holding the email address.
    pub fn email_field(self) -> &'static str {
        match self {
            SfObject::Contact | SfObject::Lead => "Email",
            SfObject::PersonAccount => "PersonEmail",
        }
    }

    /// The Email Opt Out checkbox.
    pub fn opt_out_field(self) -> &'static str {
        match self {
            SfObject::Contact | SfObject::Lead => "HasOptedOutOfEmail",
            SfObject::PersonAccount => "PersonHasOptedOutOfEmail",
        }
    }

    /// The name used in configuration, the audit log and the watermark table.
    pub fn name(self) -> &'static str {
        match self {
            SfObject::Contact => "Contact",
            SfObject::Lead => "Lead",
            SfObject::PersonAccount => "PersonAccount",
        }
    }

    /// The GetStatus counter bumped for each record written.
    pub fn written_counter(self) -> &'static str {
        match self {
            SfObject::Contact => "written_contact",
            SfObject::Lead => "written_lead",
            SfObject::PersonAccount => "written_account",
        }
    }

    /// The `WHERE` conditions (joined by `AND`) that select the records the writer may update.
    fn scope_conditions(self, person_accounts: bool) -> Vec<&'static str> {
        match self {
            // Person contacts are hidden twins of person accounts; Salesforce wants them written
            // through the Account, so they are left out here when the org has person accounts.
            SfObject::Contact if person_accounts => vec!["IsPersonAccount = false"],
            SfObject::Contact => vec![],
            // Salesforce refuses to update converted Leads (CANNOT_UPDATE_CONVERTED_LEAD).
            SfObject::Lead => vec!["IsConverted = false"],
            SfObject::PersonAccount => vec!["IsPersonAccount = true"],
        }
    }
}

impl fmt::Display for SfObject {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

impl FromStr for SfObject {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim().to_ascii_lowercase().as_str() {
            "contact" => Ok(SfObject::Contact),
            "lead" => Ok(SfObject::Lead),
            "personaccount" | "person_account" | "account" => Ok(SfObject::PersonAccount),
            other => Err(format!(
                "unknown object {other:?} (expected Contact, Lead or PersonAccount)"
            )),
        }
    }
}

/// Trims and lower-cases an address, as the evaluator and `optout_mailchimp::normalize_email` do,
/// so addresses from Salesforce and from decisions compare equal.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// The value every Salesforce record of one email must end with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Normalised address; shared with the target's changes.
    pub email: Arc<str>,
    /// `true`: the box must be checked; `false`: it must be unchecked.
    pub opted_out: bool,
    /// The evaluator's rule, recorded in the audit log. Shared: a pass's thousands of targets
    /// name a handful of rules.
    pub rule: Arc<str>,
    /// The decision's version, compared after writing to detect a decision that moved.
    pub version: i64,
    /// Opt-in evidence to acknowledge once the uncheck is written; 0 for opt-outs.
    pub evidence_id: i64,
    /// For an opt-out, when it became effective in Mailchimp: the start of the opt-out latency
    /// and of the oldest-unwritten gauge.
    pub opted_out_at: Option<DateTime<Utc>>,
    /// The trace of the message that carried the email, if one did: the audit row's trace when
    /// the pass has none of its own. Shared by the emails of one message.
    pub trace_id: Option<Arc<str>>,
}

/// The asymmetry: OPT_OUT → checked; OPT_IN with evidence → unchecked; anything else → no target.
pub fn target_for(decision: &PersonDecision) -> Option<Target> {
    target_with(decision, &mut RuleTexts::default())
}

/// [`target_for`], with the rule's text taken from `rules`.
fn target_with(decision: &PersonDecision, rules: &mut RuleTexts) -> Option<Target> {
    let opted_out = match Decision::try_from(decision.decision) {
        Ok(Decision::OptOut) => true,
        // Never uncheck without evidence that Mailchimp set a member back to subscribed.
        Ok(Decision::OptIn) if decision.opt_in_evidence_id != 0 => false,
        _ => return None,
    };
    let opted_out_at = decision
        .opted_out_at
        .as_ref()
        .filter(|_| opted_out)
        .and_then(|time| {
            DateTime::<Utc>::from_timestamp(time.seconds, u32::try_from(time.nanos).unwrap_or(0))
        });
    Some(Target {
        email: normalize_email(&decision.email).into(),
        opted_out,
        rule: rules.get(&decision.rule),
        version: decision.version,
        evidence_id: if opted_out {
            0
        } else {
            decision.opt_in_evidence_id
        },
        opted_out_at,
        trace_id: None,
    })
}

/// One copy of each rule's text, shared by the targets and changes of a pass, which number in
/// the tens of thousands and name a handful of rules.
#[derive(Debug, Default)]
pub struct RuleTexts(HashSet<Arc<str>>);

impl RuleTexts {
    /// The shared copy of `rule`.
    pub fn get(&mut self, rule: &str) -> Arc<str> {
        if let Some(text) = self.0.get(rule) {
            return Arc::clone(text);
        }
        let text: Arc<str> = Arc::from(rule);
        self.0.insert(Arc::clone(&text));
        text
    }
}

/// Targets by normalised email. With `opt_out_only` (the Salesforce poll) opt-ins are ignored:
/// only the dirty path acts on opt-in evidence.
pub fn targets(decisions: &[PersonDecision], opt_out_only: bool) -> BTreeMap<String, Target> {
    targets_with(decisions, opt_out_only, &mut RuleTexts::default())
}

/// [`targets`], with rule texts taken from `rules`, so a pass keeps one copy of each.
pub fn targets_with(
    decisions: &[PersonDecision],
    opt_out_only: bool,
    rules: &mut RuleTexts,
) -> BTreeMap<String, Target> {
    decisions
        .iter()
        .filter_map(|decision| target_with(decision, rules))
        .filter(|target| !opt_out_only || target.opted_out)
        .map(|target| (target.email.to_string(), target))
        .collect()
}

/// One Salesforce record as read before writing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurrentRecord {
    /// Its kind.
    pub object: SfObject,
    /// Salesforce record id.
    pub id: String,
    /// Normalised address.
    pub email: String,
    /// The current Email Opt Out value (`null` reads as unchecked).
    pub opted_out: bool,
}

/// Reads one SOQL row of `object`; `None` when it has no id or address, or is a converted Lead.
pub fn parse_record(object: SfObject, row: &Value) -> Option<CurrentRecord> {
    let id = row.get("Id")?.as_str()?;
    let email = row.get(object.email_field())?.as_str()?;
    // Converted Leads are filtered in SOQL already; this guards against a query that forgot to.
    if row.get("IsConverted").and_then(Value::as_bool) == Some(true) {
        return None;
    }
    let email = normalize_email(email);
    if id.is_empty() || email.is_empty() {
        return None;
    }
    let opted_out = row
        .get(object.opt_out_field())
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Some(CurrentRecord {
        object,
        id: id.to_owned(),
        email,
        opted_out,
    })
}

/// One row of a read statement ([`read_queries`]) as Salesforce returns it, parsed straight
/// from the response rather than through a JSON value: a read brings back hundreds of rows, and
/// as values each is a map of its fields, several times the memory.
#[derive(Debug, serde::Deserialize)]
pub struct RecordRow {
    #[serde(rename = "Id")]
    id: Option<String>,
    /// `Email`, or `PersonEmail` on a Person Account.
    #[serde(rename = "Email", alias = "PersonEmail")]
    email: Option<String>,
    /// The object's Email Opt Out field.
    #[serde(rename = "HasOptedOutOfEmail", alias = "PersonHasOptedOutOfEmail")]
    opted_out: Option<bool>,
    #[serde(rename = "IsConverted")]
    is_converted: Option<bool>,
}

/// Reads one row of a read statement of `object`, as [`parse_record`] reads its JSON value.
pub fn parse_row(object: SfObject, row: RecordRow) -> Option<CurrentRecord> {
    // Converted Leads are filtered in SOQL already; this guards against a query that forgot to.
    if row.is_converted == Some(true) {
        return None;
    }
    let id = row.id?;
    let email = normalize_email(&row.email?);
    if id.is_empty() || email.is_empty() {
        return None;
    }
    Some(CurrentRecord {
        object,
        id,
        email,
        opted_out: row.opted_out.unwrap_or(false),
    })
}

/// One record whose field differs from its target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Its kind.
    pub object: SfObject,
    /// Salesforce record id.
    pub id: String,
    /// Normalised address, shared with its target.
    pub email: Arc<str>,
    /// Value before the write.
    pub old: bool,
    /// Value written.
    pub new: bool,
    /// Why (the evaluator's rule).
    pub reason: Arc<str>,
    /// The version of the decision it was planned from, compared after writing.
    pub version: i64,
    /// For an opt-out, when it became effective in Mailchimp (see [`Target::opted_out_at`]).
    pub opted_out_at: Option<DateTime<Utc>>,
    /// See [`Target::trace_id`].
    pub trace_id: Option<Arc<str>>,
}

/// Records whose value differs from their email's target, each record once, in a stable order.
pub fn diff(targets: &BTreeMap<String, Target>, records: &[CurrentRecord]) -> Vec<Change> {
    diff_by(|email| targets.get(email), records)
}

fn diff_by<'a>(
    target_of: impl Fn(&str) -> Option<&'a Target>,
    records: &[CurrentRecord],
) -> Vec<Change> {
    let mut seen = BTreeSet::new();
    let mut changes = Vec::new();
    for record in records {
        let Some(target) = target_of(&normalize_email(&record.email)) else {
            continue;
        };
        if record.opted_out == target.opted_out || !seen.insert((record.object, record.id.clone()))
        {
            continue;
        }
        changes.push(Change {
            object: record.object,
            id: record.id.clone(),
            email: Arc::clone(&target.email),
            old: record.opted_out,
            new: target.opted_out,
            reason: Arc::clone(&target.rule),
            version: target.version,
            opted_out_at: target.opted_out_at,
            trace_id: target.trace_id.clone(),
        });
    }
    changes.sort_by(|left, right| (left.object, &left.id).cmp(&(right.object, &right.id)));
    changes
}

/// SOQL statements reading the current values of `object` for `emails`, each under
/// [`MAX_SOQL_LEN`].
pub fn read_queries(object: SfObject, emails: &[String], person_accounts: bool) -> Vec<String> {
    let (prefix, suffix) = read_statement_parts(object, person_accounts);
    optout_salesforce::soql::chunk_in_clauses(&prefix, emails, &suffix, MAX_SOQL_LEN)
}

/// What a read statement of `object` holds around its list of emails.
fn read_statement_parts(object: SfObject, person_accounts: bool) -> (String, String) {
    let fields = format!("Id, {}, {}", object.email_field(), object.opt_out_field());
    let mut prefix = format!("SELECT {fields} FROM {} WHERE ", object.sobject());
    let mut suffix = String::new();
    match object {
        // Leads and Person Accounts: scope first, as the documented statements read.
        SfObject::Lead | SfObject::PersonAccount => {
            for condition in object.scope_conditions(person_accounts) {
                prefix.push_str(condition);
                prefix.push_str(" AND ");
            }
        }
        SfObject::Contact => {
            for condition in object.scope_conditions(person_accounts) {
                suffix.push_str(" AND ");
                suffix.push_str(condition);
            }
        }
    }
    prefix.push_str(object.email_field());
    prefix.push_str(" IN ");
    (prefix, suffix)
}

/// One statement reading the records of `object` for its targets' emails.
#[derive(Debug)]
pub struct Read {
    /// The object read.
    pub object: SfObject,
    /// The statement, under [`MAX_SOQL_LEN`].
    pub soql: String,
    /// The targets of the emails it names, by email. Shared with the other objects' reads.
    pub targets: Vec<Arc<Target>>,
}

impl Read {
    /// The records read that differ from their email's target, as [`diff`].
    pub fn diff(&self, records: &[CurrentRecord]) -> Vec<Change> {
        diff_by(
            |email| {
                let index = self
                    .targets
                    .binary_search_by(|target| target.email.as_ref().cmp(email))
                    .ok()?;
                Some(&*self.targets[index])
            },
            records,
        )
    }
}

/// Packs targets into reads of one object as they come, each as full as the URL allows: a pass
/// reads in as few statements as if it had every email at hand, while it holds only the targets
/// of one partly filled statement per object and of the reads under way.
#[derive(Debug)]
pub struct ReadPacker {
    object: SfObject,
    packer: optout_salesforce::soql::InClausePacker,
    targets: Vec<Arc<Target>>,
}

impl ReadPacker {
    /// An empty packer of `object`'s reads.
    pub fn new(object: SfObject, person_accounts: bool) -> Self {
        let (prefix, suffix) = read_statement_parts(object, person_accounts);
        Self {
            object,
            packer: optout_salesforce::soql::InClausePacker::new(&prefix, &suffix, MAX_SOQL_LEN),
            targets: Vec::new(),
        }
    }

    /// Adds `target`; returns the read of the targets before it when its email did not fit.
    pub fn push(&mut self, target: &Arc<Target>) -> Option<Read> {
        let full = self.packer.push(&target.email).map(|soql| self.read(soql));
        self.targets.push(Arc::clone(target));
        full
    }

    /// The read of the targets not handed out yet, if any.
    pub fn finish(&mut self) -> Option<Read> {
        self.packer.finish().map(|soql| self.read(soql))
    }

    /// Targets held, not handed out yet.
    pub fn pending(&self) -> usize {
        self.targets.len()
    }

    fn read(&mut self, soql: String) -> Read {
        let mut targets = std::mem::take(&mut self.targets);
        // By email, for `Read::diff`; a pass hands its emails in sorted already.
        targets.sort_by(|left, right| left.email.cmp(&right.email));
        Read {
            object: self.object,
            soql,
            targets,
        }
    }
}

/// The SOQL statement that reads every record of `object` carrying `email`, with the fields an operator
/// wants to see (`Explain`). Converted Leads are included, flagged by `IsConverted`, since they too carry
/// the address even though the writer never updates them.
pub fn records_query(object: SfObject, email: &str, person_accounts: bool) -> String {
    let mut fields = vec![
        "Id",
        "Name",
        object.email_field(),
        object.opt_out_field(),
        "LastModifiedDate",
        "SystemModstamp",
    ];
    let mut conditions = vec![format!(
        "{} IN {}",
        object.email_field(),
        optout_salesforce::soql::in_list([email])
    )];
    match object {
        SfObject::Lead => fields.push("IsConverted"),
        other => conditions.extend(
            other
                .scope_conditions(person_accounts)
                .into_iter()
                .map(str::to_owned),
        ),
    }
    format!(
        "SELECT {} FROM {} WHERE {}",
        fields.join(", "),
        object.sobject(),
        conditions.join(" AND ")
    )
}

/// A SOQL dateTime literal (unquoted, whole seconds, UTC).
pub fn soql_datetime(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Parses a Salesforce record datetime (`2024-05-01T10:00:00.000+0000`, or RFC 3339).
pub fn parse_sf_datetime(value: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_str(value, "%Y-%m-%dT%H:%M:%S%.f%z")
        .or_else(|_| DateTime::parse_from_rfc3339(value))
        .ok()
        .map(|time| time.with_timezone(&Utc))
}

/// The poll statement: unchecked records of `object` changed after `since` (minus one second,
/// because the literal drops sub-seconds and records committed in the same second must not be
/// missed), oldest first; `since = None` scans everything (a full reconcile).
pub fn poll_query(object: SfObject, since: Option<DateTime<Utc>>, person_accounts: bool) -> String {
    let mut conditions: Vec<String> = Vec::new();
    if object == SfObject::PersonAccount {
        conditions.extend(
            object
                .scope_conditions(person_accounts)
                .into_iter()
                .map(str::to_owned),
        );
    }
    if let Some(since) = since {
        conditions.push(format!(
            "SystemModstamp > {}",
            soql_datetime(since - chrono::Duration::seconds(1))
        ));
    }
    conditions.push(format!("{} = false", object.opt_out_field()));
    if object != SfObject::PersonAccount {
        conditions.extend(
            object
                .scope_conditions(person_accounts)
                .into_iter()
                .map(str::to_owned),
        );
    }
    format!(
        "SELECT Id, {}, {}, SystemModstamp FROM {} WHERE {} ORDER BY SystemModstamp",
        object.email_field(),
        object.opt_out_field(),
        object.sobject(),
        conditions.join(" AND ")
    )
}

/// The Bulk API 2.0 update CSV for `changes` (all of one object).
pub fn bulk_csv(object: SfObject, changes: &[&Change]) -> String {
    let mut csv = bulk_csv_header(object, changes.len());
    for change in changes {
        push_bulk_row(&mut csv, &change.id, change.new);
    }
    csv
}

/// The header line of `object`'s Bulk API 2.0 update CSV, with room for `rows` records.
///
/// Why the room: a job's CSV is one string of every record of the pass (16,534 at the 1M
/// benchmark's first sync), and grown by doubling it would be reallocated a dozen times and
/// end up to twice its size.
pub fn bulk_csv_header(object: SfObject, rows: usize) -> String {
    let header = format!("Id,{}\n", object.opt_out_field());
    let mut csv = String::with_capacity(header.len() + rows * BULK_ROW_BYTES);
    csv.push_str(&header);
    csv
}

/// The longest line [`push_bulk_row`] writes: an 18-character id and `,false\n`.
const BULK_ROW_BYTES: usize = 18 + ",false\n".len();

/// Appends one record's line to a Bulk API 2.0 update CSV.
pub fn push_bulk_row(csv: &mut String, id: &str, new: bool) {
    // Record ids are 15/18 alphanumeric characters: nothing to quote.
    csv.push_str(id);
    csv.push_str(if new { ",true\n" } else { ",false\n" });
}

/// Splits a Bulk API `sf__Error` (`UNABLE_TO_LOCK_ROW:unable to obtain exclusive access:--`) into
/// status code and message.
pub fn parse_bulk_error(error: &str) -> (String, String) {
    let mut parts = error.splitn(2, ':');
    let status_code = parts.next().unwrap_or_default().trim().to_owned();
    let message = parts
        .next()
        .unwrap_or_default()
        .trim_end_matches(":--")
        .trim()
        .to_owned();
    (status_code, message)
}

/// Whether a per-record status code is worth retrying (row locks are transient contention).
pub fn is_retryable_status(status_code: &str) -> bool {
    matches!(
        status_code,
        "UNABLE_TO_LOCK_ROW" | "SERVER_UNAVAILABLE" | "REQUEST_LIMIT_EXCEEDED"
    )
}

/// The status code Salesforce gives when asked to update a converted Lead.
pub const CONVERTED_LEAD: &str = "CANNOT_UPDATE_CONVERTED_LEAD";

/// The W3C trace id inside a `traceparent` value (`00-<trace id>-<span id>-<flags>`).
pub fn trace_id_from_traceparent(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.trim().split('-');
    let _version = parts.next()?;
    let trace_id = parts.next()?;
    (trace_id.len() == 32 && trace_id.bytes().all(|byte| byte.is_ascii_hexdigit()))
        .then(|| trace_id.to_ascii_lowercase())
}
