//! The in-memory audiences and their members.
//!
//! Members of a list live in a slab indexed by slot, found by subscriber hash. Two order indexes
//! over the slots make paging a million members cheap: `created` (insertion order, the default
//! sort) and `changed` (ascending `last_changed`). Every edit stamps `last_changed` from a clock
//! that never repeats a value, so an edited member is simply appended to `changed` and its old
//! entry tombstoned; a range of `last_changed` is then a binary search. Entries carry the status
//! so filtered counts and pages are a scan over a compact vector, without touching members.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// MD5 of the lower-cased address: Mailchimp's subscriber hash.
pub(crate) type Hash = [u8; 16];

/// A member's subscription status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Status {
    Subscribed,
    Unsubscribed,
    Cleaned,
    Pending,
    Transactional,
    Archived,
}

impl Status {
    pub(crate) const ALL: [Status; 6] = [
        Status::Subscribed,
        Status::Unsubscribed,
        Status::Cleaned,
        Status::Pending,
        Status::Transactional,
        Status::Archived,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Status::Subscribed => "subscribed",
            Status::Unsubscribed => "unsubscribed",
            Status::Cleaned => "cleaned",
            Status::Pending => "pending",
            Status::Transactional => "transactional",
            Status::Archived => "archived",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Status> {
        Status::ALL
            .into_iter()
            .find(|status| status.as_str() == text)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Trim + lowercase, as Mailchimp does before hashing.
pub(crate) fn normalize(email: &str) -> String {
    email.trim().to_lowercase()
}

/// The subscriber hash of an address.
pub(crate) fn hash_of(email: &str) -> Hash {
    Md5::digest(normalize(email).as_bytes()).into()
}

/// The 10-hex-character id of an address, the same in every audience.
pub(crate) fn unique_email_id_of(email: &str) -> [u8; 5] {
    let digest = Md5::new()
        .chain_update(b"unique_email_id:")
        .chain_update(normalize(email))
        .finalize();
    let mut id = [0; 5];
    id.copy_from_slice(&digest[..5]);
    id
}

/// A path segment naming a member: the subscriber hash, or the address itself.
pub(crate) fn member_key(segment: &str) -> Option<Hash> {
    if segment.contains('@') {
        return Some(hash_of(segment));
    }
    let bytes = hex::decode(segment.trim().to_ascii_lowercase()).ok()?;
    bytes.try_into().ok()
}

/// Whether Mailchimp would take the address: one `@`, a dotted domain, no spaces.
pub(crate) fn looks_valid(email: &str) -> bool {
    let email = email.trim();
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !email.chars().any(char::is_whitespace)
}

/// Hands out microsecond timestamps that never repeat, so `changed` stays sorted by appending.
#[derive(Debug, Default)]
pub(crate) struct Clock {
    last: AtomicI64,
}

impl Clock {
    pub(crate) fn now(&self) -> i64 {
        let wall = chrono::Utc::now().timestamp_micros();
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = wall.max(last + 1);
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(current) => last = current,
            }
        }
    }
}

/// A member's merge fields. `FNAME` and `LNAME` are inline because a map per member would
/// triple the memory of a million-member audience; other tags go to `extra`.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct MergeFields {
    first: Box<str>,
    last: Box<str>,
    extra: Option<Box<Map<String, Value>>>,
}

impl MergeFields {
    pub(crate) fn new(first: &str, last: &str) -> Self {
        Self {
            first: first.into(),
            last: last.into(),
            extra: None,
        }
    }

    /// The value of a tag as text (`""` when unset).
    pub(crate) fn text(&self, tag: &str) -> &str {
        match tag {
            "FNAME" => &self.first,
            "LNAME" => &self.last,
            _ => self
                .extra
                .as_ref()
                .and_then(|extra| extra.get(tag))
                .and_then(Value::as_str)
                .unwrap_or(""),
        }
    }

    /// Sets one tag; true when the value changed.
    pub(crate) fn set(&mut self, tag: &str, value: &Value) -> bool {
        let inline = match tag {
            "FNAME" => Some(&mut self.first),
            "LNAME" => Some(&mut self.last),
            _ => None,
        };
        if let Some(slot) = inline {
            let text = match value {
                Value::String(text) => text.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            let changed = **slot != *text;
            *slot = text.into();
            return changed;
        }
        let extra = self.extra.get_or_insert_with(Box::default);
        if extra.get(tag) == Some(value) {
            return false;
        }
        extra.insert(tag.to_owned(), value.clone());
        true
    }

    /// Every tag with its value, `FNAME` and `LNAME` first.
    pub(crate) fn pairs(&self) -> Vec<(&str, Value)> {
        let mut pairs = vec![
            ("FNAME", Value::String(self.first.to_string())),
            ("LNAME", Value::String(self.last.to_string())),
        ];
        if let Some(extra) = &self.extra {
            pairs.extend(
                extra
                    .iter()
                    .map(|(tag, value)| (tag.as_str(), value.clone())),
            );
        }
        pairs
    }
}

impl Serialize for MergeFields {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let extra = self.extra.as_deref();
        let mut map = serializer.serialize_map(Some(2 + extra.map_or(0, Map::len)))?;
        map.serialize_entry("FNAME", &*self.first)?;
        map.serialize_entry("LNAME", &*self.last)?;
        for (tag, value) in extra.into_iter().flatten() {
            map.serialize_entry(tag, value)?;
        }
        map.end()
    }
}

/// One list member.
#[derive(Clone, Debug)]
pub(crate) struct MemberRecord {
    pub(crate) email: String,
    pub(crate) hash: Hash,
    pub(crate) unique_email_id: [u8; 5],
    pub(crate) web_id: u32,
    pub(crate) status: Status,
    /// The status a member had when archived, which unarchiving restores and which the
    /// compliance rule still sees.
    pub(crate) archived_from: Status,
    pub(crate) email_type: &'static str,
    pub(crate) merge_fields: MergeFields,
    pub(crate) ip_signup: String,
    pub(crate) ip_opt: String,
    /// Microseconds since the epoch; 0 when unset.
    pub(crate) timestamp_signup: i64,
    pub(crate) timestamp_opt: i64,
    pub(crate) last_changed: i64,
    pub(crate) unsubscribe_reason: String,
    pub(crate) source: &'static str,
    pub(crate) language: String,
    pub(crate) vip: bool,
    pub(crate) member_rating: u8,
    pub(crate) tags: Vec<String>,
    changed_pos: u32,
    created_pos: u32,
}

impl MemberRecord {
    /// A member as the generator or an API create makes it, before it is stored.
    pub(crate) fn new(email: String, status: Status, merge_fields: MergeFields) -> Self {
        Self {
            hash: hash_of(&email),
            unique_email_id: unique_email_id_of(&email),
            email,
            web_id: 0,
            status,
            archived_from: status,
            email_type: "html",
            merge_fields,
            ip_signup: String::new(),
            ip_opt: String::new(),
            timestamp_signup: 0,
            timestamp_opt: 0,
            last_changed: 0,
            unsubscribe_reason: String::new(),
            source: "API - Generic",
            language: String::new(),
            vip: false,
            member_rating: 2,
            tags: Vec::new(),
            changed_pos: 0,
            created_pos: 0,
        }
    }

    pub(crate) fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }

    pub(crate) fn unique_email_id_hex(&self) -> String {
        hex::encode(self.unique_email_id)
    }

    /// The status the compliance rule judges: an archived member keeps the one it had.
    fn effective_status(&self) -> Status {
        if self.status == Status::Archived {
            self.archived_from
        } else {
            self.status
        }
    }
}

/// A member change that webhooks report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ChangeKind {
    Subscribe,
    /// `action` is `unsub` or `delete` (archived).
    Unsubscribe {
        action: &'static str,
    },
    Cleaned,
    Profile,
    Upemail {
        old_email: String,
    },
}

/// A change with the member as it is afterwards.
#[derive(Clone, Debug)]
pub(crate) struct Change {
    pub(crate) kind: ChangeKind,
    pub(crate) member: MemberRecord,
}

/// Why a member operation was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StoreError {
    NotFound,
    Compliance(String),
    Forgotten(String),
    Exists(String),
    Invalid {
        detail: String,
        field: Option<&'static str>,
    },
    NotArchivable,
}

/// Fields an API call may set on a member (POST, PUT, PATCH and batch bodies).
#[derive(Clone, Debug, Default, Deserialize)]
pub(crate) struct MemberInput {
    pub(crate) email_address: Option<String>,
    pub(crate) status: Option<String>,
    pub(crate) status_if_new: Option<String>,
    pub(crate) email_type: Option<String>,
    pub(crate) merge_fields: Option<Map<String, Value>>,
    pub(crate) language: Option<String>,
    pub(crate) vip: Option<bool>,
    pub(crate) ip_signup: Option<String>,
    pub(crate) ip_opt: Option<String>,
    pub(crate) tags: Option<Vec<String>>,
}

impl MemberInput {
    fn parse_status(text: Option<&str>, field: &'static str) -> Result<Option<Status>, StoreError> {
        let Some(text) = text else { return Ok(None) };
        match Status::parse(text) {
            Some(Status::Archived) | None => Err(StoreError::Invalid {
                detail: format!(
                    "The resource submitted could not be validated. {field} is not one of subscribed, unsubscribed, cleaned, pending, transactional."
                ),
                field: Some(field),
            }),
            Some(status) => Ok(Some(status)),
        }
    }

    pub(crate) fn status(&self) -> Result<Option<Status>, StoreError> {
        Self::parse_status(self.status.as_deref(), "status")
    }

    pub(crate) fn status_if_new(&self) -> Result<Option<Status>, StoreError> {
        Self::parse_status(self.status_if_new.as_deref(), "status_if_new")
    }

    /// Applies the profile fields; true when something changed.
    fn apply_profile(&self, member: &mut MemberRecord) -> bool {
        let mut changed = false;
        if let Some(merge_fields) = &self.merge_fields {
            for (tag, value) in merge_fields {
                changed |= member.merge_fields.set(tag, value);
            }
        }
        if let Some(email_type) = self.email_type.as_deref() {
            let email_type = if email_type == "text" { "text" } else { "html" };
            changed |= member.email_type != email_type;
            member.email_type = email_type;
        }
        if let Some(language) = &self.language {
            changed |= &member.language != language;
            member.language.clone_from(language);
        }
        if let Some(vip) = self.vip {
            changed |= member.vip != vip;
            member.vip = vip;
        }
        if let Some(ip_signup) = &self.ip_signup {
            member.ip_signup.clone_from(ip_signup);
        }
        if let Some(ip_opt) = &self.ip_opt {
            member.ip_opt.clone_from(ip_opt);
        }
        if let Some(tags) = &self.tags {
            for tag in tags {
                if !member.tags.contains(tag) {
                    member.tags.push(tag.clone());
                    changed = true;
                }
            }
        }
        changed
    }
}

/// Who changed a member, which decides the compliance rule and the unsubscribe reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Actor {
    /// A call through the API: bound by the compliance rule.
    Api,
    /// The member themselves (signup form, unsubscribe link): may resubscribe.
    Member,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    time: i64,
    slot: u32,
    status: Status,
    live: bool,
}

#[derive(Debug, Default)]
struct OrderIndex {
    entries: Vec<Entry>,
    dead: usize,
}

impl OrderIndex {
    fn push(&mut self, time: i64, slot: u32, status: Status) -> u32 {
        self.entries.push(Entry {
            time,
            slot,
            status,
            live: true,
        });
        (self.entries.len() - 1) as u32
    }

    fn kill(&mut self, position: u32) {
        let entry = &mut self.entries[position as usize];
        if entry.live {
            entry.live = false;
            self.dead += 1;
        }
    }

    fn wants_compaction(&self) -> bool {
        self.dead > 4096 && self.dead * 2 > self.entries.len()
    }
}

/// Sort order of a members listing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum SortField {
    /// Insertion order (Mailchimp's default is unspecified; this one is stable under edits).
    #[default]
    Created,
    LastChanged,
    TimestampOpt,
    TimestampSignup,
}

/// Filters and paging of `GET /lists/{id}/members`.
#[derive(Clone, Debug, Default)]
pub(crate) struct MemberQuery {
    pub(crate) status: Option<Status>,
    /// Microseconds: members with `last_changed >= since`.
    pub(crate) since_last_changed: Option<i64>,
    /// Microseconds: members with `last_changed < before`.
    pub(crate) before_last_changed: Option<i64>,
    pub(crate) since_timestamp_opt: Option<i64>,
    pub(crate) before_timestamp_opt: Option<i64>,
    pub(crate) email_type: Option<String>,
    pub(crate) unique_email_id: Option<String>,
    pub(crate) vip_only: bool,
    pub(crate) sort_field: SortField,
    pub(crate) descending: bool,
    pub(crate) offset: usize,
    pub(crate) count: usize,
}

impl MemberQuery {
    fn needs_member(&self) -> bool {
        self.since_timestamp_opt.is_some()
            || self.before_timestamp_opt.is_some()
            || self.email_type.is_some()
            || self.unique_email_id.is_some()
            || self.vip_only
    }

    fn matches_member(&self, member: &MemberRecord) -> bool {
        if let Some(since) = self.since_timestamp_opt
            && member.timestamp_opt < since
        {
            return false;
        }
        if let Some(before) = self.before_timestamp_opt
            && member.timestamp_opt >= before
        {
            return false;
        }
        if let Some(email_type) = &self.email_type
            && member.email_type != email_type
        {
            return false;
        }
        if let Some(unique) = &self.unique_email_id
            && &member.unique_email_id_hex() != unique
        {
            return false;
        }
        !self.vip_only || member.vip
    }
}

/// One audience.
#[derive(Debug)]
pub(crate) struct ListState {
    pub(crate) id: String,
    pub(crate) web_id: u32,
    pub(crate) name: String,
    pub(crate) date_created: i64,
    members: Vec<Option<MemberRecord>>,
    by_hash: HashMap<Hash, u32>,
    changed: OrderIndex,
    created: OrderIndex,
    forgotten: HashSet<Hash>,
    counts: [u64; 6],
    next_web_id: u32,
    pub(crate) last_sub: i64,
    pub(crate) last_unsub: i64,
}

impl ListState {
    pub(crate) fn new(id: String, web_id: u32, name: String, date_created: i64) -> Self {
        Self {
            id,
            web_id,
            name,
            date_created,
            members: Vec::new(),
            by_hash: HashMap::new(),
            changed: OrderIndex::default(),
            created: OrderIndex::default(),
            forgotten: HashSet::new(),
            counts: [0; 6],
            next_web_id: 100_000_000,
            last_sub: 0,
            last_unsub: 0,
        }
    }

    /// Members with each status.
    pub(crate) fn count(&self, status: Status) -> u64 {
        self.counts[status.index()]
    }

    /// Every member, archived ones included.
    pub(crate) fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub(crate) fn reserve(&mut self, additional: usize) {
        self.members.reserve(additional);
        self.by_hash.reserve(additional);
        self.created.entries.reserve(additional);
        self.changed.entries.reserve(additional);
    }

    /// Adds a generated member without events; call [`ListState::finish_load`] afterwards.
    /// A repeated address is skipped (false).
    pub(crate) fn load(&mut self, mut member: MemberRecord) -> bool {
        if self.by_hash.contains_key(&member.hash) {
            return false;
        }
        let slot = self.members.len() as u32;
        self.next_web_id += 1;
        member.web_id = self.next_web_id;
        member.created_pos = self.created.push(member.last_changed, slot, member.status);
        self.counts[member.status.index()] += 1;
        self.track_dates(&member);
        self.by_hash.insert(member.hash, slot);
        self.members.push(Some(member));
        true
    }

    /// Builds the `last_changed` order of loaded members.
    pub(crate) fn finish_load(&mut self) {
        let mut order: Vec<(i64, u32)> = self
            .members
            .iter()
            .enumerate()
            .filter_map(|(slot, member)| member.as_ref().map(|m| (m.last_changed, slot as u32)))
            .collect();
        order.sort_unstable();
        self.changed = OrderIndex::default();
        self.changed.entries.reserve(order.len());
        for (time, slot) in order {
            let Some(member) = self.members[slot as usize].as_mut() else {
                continue;
            };
            member.changed_pos = self.changed.push(time, slot, member.status);
        }
    }

    pub(crate) fn get(&self, hash: &Hash) -> Option<&MemberRecord> {
        let slot = *self.by_hash.get(hash)?;
        self.members[slot as usize].as_ref()
    }

    pub(crate) fn slot_member(&self, slot: u32) -> Option<&MemberRecord> {
        self.members.get(slot as usize).and_then(Option::as_ref)
    }

    /// Scans members whose lower-cased address or full name contains `needle`.
    pub(crate) fn search(&self, needle: &str, limit: usize) -> (u64, Vec<&MemberRecord>) {
        let mut total = 0;
        let mut found = Vec::new();
        for member in self.members.iter().flatten() {
            let name = full_name(member).to_lowercase();
            if member.email.to_lowercase().contains(needle) || name.contains(needle) {
                total += 1;
                if found.len() < limit {
                    found.push(member);
                }
            }
        }
        (total, found)
    }

    /// The members matching `query` on the requested page, and how many match in all.
    pub(crate) fn query(&self, query: &MemberQuery) -> (u64, Vec<u32>) {
        let matches = |entry: &Entry| {
            entry.live
                && query.status.is_none_or(|status| entry.status == status)
                && query
                    .since_last_changed
                    .is_none_or(|since| entry.time >= since)
                && query
                    .before_last_changed
                    .is_none_or(|before| entry.time < before)
                && (!query.needs_member()
                    || self
                        .slot_member(entry.slot)
                        .is_some_and(|m| query.matches_member(m)))
        };
        match query.sort_field {
            SortField::Created | SortField::LastChanged => {
                let index = if query.sort_field == SortField::Created {
                    &self.created
                } else {
                    &self.changed
                };
                let range = if query.sort_field == SortField::LastChanged {
                    // `changed` is sorted by time, so the time window is a binary search.
                    let start = query.since_last_changed.map_or(0, |since| {
                        index.entries.partition_point(|entry| entry.time < since)
                    });
                    let end = query
                        .before_last_changed
                        .map_or(index.entries.len(), |before| {
                            index.entries.partition_point(|entry| entry.time < before)
                        });
                    start..end.max(start)
                } else {
                    0..index.entries.len()
                };
                let window = &index.entries[range];
                let mut total = 0u64;
                let mut page = Vec::with_capacity(query.count.min(1000));
                let mut take = |entry: &Entry| {
                    if matches(entry) {
                        let position = total as usize;
                        if position >= query.offset && page.len() < query.count {
                            page.push(entry.slot);
                        }
                        total += 1;
                    }
                };
                if query.descending {
                    window.iter().rev().for_each(&mut take);
                } else {
                    window.iter().for_each(&mut take);
                }
                (total, page)
            }
            SortField::TimestampOpt | SortField::TimestampSignup => {
                let mut slots: Vec<(i64, u32)> = self
                    .created
                    .entries
                    .iter()
                    .filter(|entry| matches(entry))
                    .filter_map(|entry| {
                        let member = self.slot_member(entry.slot)?;
                        let key = if query.sort_field == SortField::TimestampOpt {
                            member.timestamp_opt
                        } else {
                            member.timestamp_signup
                        };
                        Some((key, entry.slot))
                    })
                    .collect();
                slots.sort_by_key(|&(key, _)| key);
                if query.descending {
                    slots.reverse();
                }
                let total = slots.len() as u64;
                let page = slots
                    .into_iter()
                    .skip(query.offset)
                    .take(query.count)
                    .map(|(_, s)| s)
                    .collect();
                (total, page)
            }
        }
    }

    /// `POST /lists/{id}/members`.
    pub(crate) fn create(
        &mut self,
        input: &MemberInput,
        now: i64,
    ) -> Result<(MemberRecord, Vec<Change>), StoreError> {
        let email = input.email_address.clone().unwrap_or_default();
        validate_email(&email)?;
        let Some(status) = input.status()? else {
            return Err(StoreError::Invalid {
                detail: "The resource submitted could not be validated. For field-specific details, see the 'errors' array.".to_owned(),
                field: Some("status"),
            });
        };
        let hash = hash_of(&email);
        if let Some(existing) = self.get(&hash) {
            if existing.status != Status::Archived {
                return Err(StoreError::Exists(existing.email.clone()));
            }
            return self.update_existing(hash, input, Some(status), Actor::Api, now);
        }
        self.insert_new(email, input, status, now)
    }

    /// `PUT /lists/{id}/members/{hash}`: `status_if_new` only when the member is new.
    pub(crate) fn upsert(
        &mut self,
        hash: Hash,
        input: &MemberInput,
        now: i64,
    ) -> Result<(MemberRecord, Vec<Change>), StoreError> {
        let email = input.email_address.clone().unwrap_or_default();
        validate_email(&email)?;
        if hash_of(&email) != hash {
            return Err(StoreError::Invalid {
                detail: "The email address in the request body does not match the subscriber hash in the URL.".to_owned(),
                field: Some("email_address"),
            });
        }
        let status = input.status()?;
        if self.by_hash.contains_key(&hash) {
            return self.update_existing(hash, input, status, Actor::Api, now);
        }
        let Some(status_if_new) = input.status_if_new()?.or(status) else {
            return Err(StoreError::Invalid {
                detail: "The resource submitted could not be validated. For field-specific details, see the 'errors' array.".to_owned(),
                field: Some("status_if_new"),
            });
        };
        self.insert_new(email, input, status_if_new, now)
    }

    /// `PATCH /lists/{id}/members/{hash}`; a new `email_address` renames the member.
    pub(crate) fn patch(
        &mut self,
        hash: Hash,
        input: &MemberInput,
        now: i64,
    ) -> Result<(MemberRecord, Vec<Change>), StoreError> {
        let Some(existing) = self.get(&hash) else {
            return Err(StoreError::NotFound);
        };
        let status = input.status()?;
        let mut changes = Vec::new();
        let mut hash = hash;
        if let Some(new_email) = input.email_address.as_deref()
            && hash_of(new_email) != hash
        {
            validate_email(new_email)?;
            let new_hash = hash_of(new_email);
            if self.forgotten.contains(&new_hash) {
                return Err(StoreError::Forgotten(new_email.trim().to_owned()));
            }
            if self.by_hash.contains_key(&new_hash) {
                return Err(StoreError::Exists(new_email.trim().to_owned()));
            }
            if status == Some(Status::Subscribed)
                && matches!(
                    existing.effective_status(),
                    Status::Unsubscribed | Status::Cleaned
                )
            {
                return Err(StoreError::Compliance(existing.email.clone()));
            }
            let old_email = existing.email.clone();
            let Some(slot) = self.by_hash.remove(&hash) else {
                return Err(StoreError::NotFound);
            };
            self.by_hash.insert(new_hash, slot);
            if let Some(member) = self.members[slot as usize].as_mut() {
                member.email = new_email.trim().to_owned();
                member.hash = new_hash;
                member.unique_email_id = unique_email_id_of(new_email);
            }
            self.commit(slot, Status::Subscribed, now, false);
            let member = self.members[slot as usize]
                .clone()
                .ok_or(StoreError::NotFound)?;
            changes.push(Change {
                kind: ChangeKind::Upemail { old_email },
                member,
            });
            hash = new_hash;
        }
        let (member, more) = self.update_existing(hash, input, status, Actor::Api, now)?;
        changes.extend(more);
        Ok((member, changes))
    }

    /// Changes a member's status as the member or the API would; profile fields too.
    pub(crate) fn update_existing(
        &mut self,
        hash: Hash,
        input: &MemberInput,
        status: Option<Status>,
        actor: Actor,
        now: i64,
    ) -> Result<(MemberRecord, Vec<Change>), StoreError> {
        let Some(&slot) = self.by_hash.get(&hash) else {
            return Err(StoreError::NotFound);
        };
        let Some(member) = self.members[slot as usize].as_mut() else {
            return Err(StoreError::NotFound);
        };
        let requested = match status {
            Some(status) => Some(status),
            // Writing to an archived member brings it back with the status it had.
            None if member.status == Status::Archived => Some(member.archived_from),
            None => None,
        };
        if requested == Some(Status::Subscribed)
            && actor == Actor::Api
            && matches!(
                member.effective_status(),
                Status::Unsubscribed | Status::Cleaned
            )
        {
            return Err(StoreError::Compliance(member.email.clone()));
        }
        let old_status = member.status;
        let profile_changed = input.apply_profile(member);
        let mut kinds = Vec::new();
        if let Some(requested) = requested
            && requested != old_status
        {
            member.status = requested;
            member.archived_from = requested;
            match requested {
                Status::Subscribed => {
                    member.timestamp_opt = now;
                    member.unsubscribe_reason.clear();
                    kinds.push(ChangeKind::Subscribe);
                }
                Status::Unsubscribed => {
                    member.unsubscribe_reason = match actor {
                        Actor::Api => "N/A (Unsubscribed by an admin)".to_owned(),
                        Actor::Member => "N/A (Unsubscribed by the member)".to_owned(),
                    };
                    kinds.push(ChangeKind::Unsubscribe { action: "unsub" });
                }
                Status::Cleaned => kinds.push(ChangeKind::Cleaned),
                Status::Pending | Status::Transactional | Status::Archived => {}
            }
        } else if profile_changed {
            kinds.push(ChangeKind::Profile);
        }
        let changed = profile_changed || member.status != old_status;
        if changed {
            self.commit(slot, old_status, now, true);
        }
        let member = self.members[slot as usize]
            .clone()
            .ok_or(StoreError::NotFound)?;
        let changes = kinds
            .into_iter()
            .map(|kind| Change {
                kind,
                member: member.clone(),
            })
            .collect();
        Ok((member, changes))
    }

    /// `DELETE /lists/{id}/members/{hash}`: archives.
    pub(crate) fn archive(&mut self, hash: Hash, now: i64) -> Result<Vec<Change>, StoreError> {
        let Some(&slot) = self.by_hash.get(&hash) else {
            return Err(StoreError::NotFound);
        };
        let Some(member) = self.members[slot as usize].as_mut() else {
            return Err(StoreError::NotFound);
        };
        if matches!(
            member.status,
            Status::Cleaned | Status::Pending | Status::Archived
        ) {
            return Err(StoreError::NotArchivable);
        }
        let old_status = member.status;
        member.archived_from = old_status;
        member.status = Status::Archived;
        self.commit(slot, old_status, now, true);
        let member = self.members[slot as usize]
            .clone()
            .ok_or(StoreError::NotFound)?;
        Ok(vec![Change {
            kind: ChangeKind::Unsubscribe { action: "delete" },
            member,
        }])
    }

    /// `POST .../actions/delete-permanent`: the address can never be re-imported.
    pub(crate) fn delete_permanent(&mut self, hash: Hash) -> Result<(), StoreError> {
        let Some(slot) = self.by_hash.remove(&hash) else {
            return Err(StoreError::NotFound);
        };
        let Some(member) = self.members[slot as usize].take() else {
            return Err(StoreError::NotFound);
        };
        self.changed.kill(member.changed_pos);
        self.created.kill(member.created_pos);
        self.counts[member.status.index()] -= 1;
        self.forgotten.insert(hash);
        self.compact_if_needed();
        Ok(())
    }

    fn insert_new(
        &mut self,
        email: String,
        input: &MemberInput,
        status: Status,
        now: i64,
    ) -> Result<(MemberRecord, Vec<Change>), StoreError> {
        let hash = hash_of(&email);
        if self.forgotten.contains(&hash) {
            return Err(StoreError::Forgotten(email.trim().to_owned()));
        }
        let mut member = MemberRecord::new(email.trim().to_owned(), status, MergeFields::default());
        input.apply_profile(&mut member);
        member.last_changed = now;
        if status == Status::Subscribed {
            member.timestamp_opt = now;
        }
        if status == Status::Unsubscribed {
            member.unsubscribe_reason = "N/A (Unsubscribed by an admin)".to_owned();
        }
        let slot = self.members.len() as u32;
        self.next_web_id += 1;
        member.web_id = self.next_web_id;
        member.created_pos = self.created.push(now, slot, status);
        member.changed_pos = self.changed.push(now, slot, status);
        self.counts[status.index()] += 1;
        self.track_dates(&member);
        self.by_hash.insert(hash, slot);
        self.members.push(Some(member.clone()));
        let kind = match status {
            Status::Subscribed => Some(ChangeKind::Subscribe),
            Status::Unsubscribed => Some(ChangeKind::Unsubscribe { action: "unsub" }),
            Status::Cleaned => Some(ChangeKind::Cleaned),
            _ => None,
        };
        let changes = kind
            .map(|kind| Change {
                kind,
                member: member.clone(),
            })
            .into_iter()
            .collect();
        Ok((member, changes))
    }

    /// Stamps `last_changed` and moves the member in the indexes after an edit.
    fn commit(&mut self, slot: u32, old_status: Status, now: i64, count: bool) {
        let Some(member) = self.members[slot as usize].as_mut() else {
            return;
        };
        member.last_changed = now;
        let status = member.status;
        self.changed.kill(member.changed_pos);
        member.changed_pos = self.changed.push(now, slot, status);
        let created = &mut self.created.entries[member.created_pos as usize];
        created.time = now;
        created.status = status;
        if count {
            self.counts[old_status.index()] -= 1;
            self.counts[status.index()] += 1;
        }
        let member = member.clone();
        self.track_dates(&member);
        self.compact_if_needed();
    }

    fn track_dates(&mut self, member: &MemberRecord) {
        match member.status {
            Status::Subscribed => self.last_sub = self.last_sub.max(member.timestamp_opt),
            Status::Unsubscribed => self.last_unsub = self.last_unsub.max(member.last_changed),
            _ => {}
        }
    }

    fn compact_if_needed(&mut self) {
        if self.changed.wants_compaction() {
            let entries = std::mem::take(&mut self.changed.entries);
            self.changed.dead = 0;
            for entry in entries.into_iter().filter(|entry| entry.live) {
                let position = self.changed.push(entry.time, entry.slot, entry.status);
                if let Some(member) = self.members[entry.slot as usize].as_mut() {
                    member.changed_pos = position;
                }
            }
        }
        if self.created.wants_compaction() {
            let entries = std::mem::take(&mut self.created.entries);
            self.created.dead = 0;
            for entry in entries.into_iter().filter(|entry| entry.live) {
                let position = self.created.push(entry.time, entry.slot, entry.status);
                if let Some(member) = self.members[entry.slot as usize].as_mut() {
                    member.created_pos = position;
                }
            }
        }
    }
}

fn validate_email(email: &str) -> Result<(), StoreError> {
    if email.trim().is_empty() {
        return Err(StoreError::Invalid {
            detail: "The resource submitted could not be validated. For field-specific details, see the 'errors' array.".to_owned(),
            field: Some("email_address"),
        });
    }
    if !looks_valid(email) {
        return Err(StoreError::Invalid {
            detail: format!(
                "{} looks fake or invalid, please enter a real email address.",
                email.trim()
            ),
            field: Some("email_address"),
        });
    }
    Ok(())
}

/// `FNAME LNAME`, as Mailchimp's `full_name`.
pub(crate) fn full_name(member: &MemberRecord) -> String {
    let part = |tag: &str| member.merge_fields.text(tag).trim();
    let (first, last) = (part("FNAME"), part("LNAME"));
    match (first.is_empty(), last.is_empty()) {
        (false, false) => format!("{first} {last}"),
        (false, true) => first.to_owned(),
        (true, false) => last.to_owned(),
        (true, true) => String::new(),
    }
}

/// The whole account: its audiences (fixed after generation) and the clock.
#[derive(Debug)]
pub(crate) struct Account {
    pub(crate) lists: Vec<std::sync::RwLock<ListState>>,
    ids: HashMap<String, usize>,
    pub(crate) clock: Clock,
}

impl Account {
    pub(crate) fn new(lists: Vec<ListState>, clock: Clock) -> Self {
        let ids = lists
            .iter()
            .enumerate()
            .map(|(index, list)| (list.id.clone(), index))
            .collect();
        Self {
            lists: lists.into_iter().map(std::sync::RwLock::new).collect(),
            ids,
            clock,
        }
    }

    pub(crate) fn list(&self, id: &str) -> Option<&std::sync::RwLock<ListState>> {
        self.ids.get(id).map(|&index| &self.lists[index])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list_with(members: &[(&str, Status, i64)]) -> ListState {
        let mut list = ListState::new("a1b2c3d4e5".into(), 1, "Test".into(), 0);
        for &(email, status, time) in members {
            let mut member = MemberRecord::new(email.into(), status, MergeFields::default());
            member.last_changed = time;
            list.load(member);
        }
        list.finish_load();
        list
    }

    fn input(email: &str, status: Option<&str>, status_if_new: Option<&str>) -> MemberInput {
        MemberInput {
            email_address: Some(email.into()),
            status: status.map(str::to_owned),
            status_if_new: status_if_new.map(str::to_owned),
            ..MemberInput::default()
        }
    }

    #[test]
    fn refuses_to_resubscribe_an_unsubscribed_member_through_the_api() {
        let mut list = list_with(&[("Ann@Example.com", Status::Unsubscribed, 10)]);
        let hash = hash_of("ann@example.com");
        let refused = list.upsert(
            hash,
            &input("ann@example.com", Some("subscribed"), None),
            20,
        );
        assert_eq!(
            refused.unwrap_err(),
            StoreError::Compliance("Ann@Example.com".into())
        );
        let (member, _) = list
            .upsert(
                hash,
                &input("ann@example.com", None, Some("subscribed")),
                20,
            )
            .expect("status_if_new is ignored for existing members");
        assert_eq!(member.status, Status::Unsubscribed);
        let (member, _) = list
            .upsert(hash, &input("ann@example.com", Some("pending"), None), 30)
            .expect("pending");
        assert_eq!(member.status, Status::Pending);
    }

    #[test]
    fn pages_by_last_changed_with_a_time_window_after_edits() {
        let mut list = list_with(&[
            ("a@x.io", Status::Subscribed, 10),
            ("b@x.io", Status::Subscribed, 20),
            ("c@x.io", Status::Unsubscribed, 30),
        ]);
        list.patch(
            hash_of("a@x.io"),
            &input("a@x.io", Some("unsubscribed"), None),
            40,
        )
        .expect("patch");
        let query = MemberQuery {
            since_last_changed: Some(20),
            sort_field: SortField::LastChanged,
            count: 10,
            ..MemberQuery::default()
        };
        let (total, slots) = list.query(&query);
        let emails: Vec<_> = slots
            .iter()
            .map(|&slot| list.slot_member(slot).expect("member").email.clone())
            .collect();
        assert_eq!(total, 3);
        assert_eq!(emails, ["b@x.io", "c@x.io", "a@x.io"]);
        let unsubscribed = MemberQuery {
            status: Some(Status::Unsubscribed),
            count: 1,
            offset: 1,
            ..MemberQuery::default()
        };
        let (total, slots) = list.query(&unsubscribed);
        assert_eq!(total, 2);
        assert_eq!(list.slot_member(slots[0]).expect("member").email, "c@x.io");
    }

    #[test]
    fn forgets_permanently_deleted_addresses() {
        let mut list = list_with(&[("gone@x.io", Status::Subscribed, 10)]);
        list.delete_permanent(hash_of("gone@x.io")).expect("delete");
        let again = list.upsert(
            hash_of("gone@x.io"),
            &input("gone@x.io", None, Some("subscribed")),
            20,
        );
        assert!(matches!(again, Err(StoreError::Forgotten(_))));
        assert_eq!(list.total(), 0);
    }

    #[test]
    fn archives_only_subscribed_or_unsubscribed_members() {
        let mut list = list_with(&[
            ("a@x.io", Status::Subscribed, 10),
            ("b@x.io", Status::Cleaned, 10),
        ]);
        assert_eq!(
            list.archive(hash_of("b@x.io"), 20).unwrap_err(),
            StoreError::NotArchivable
        );
        list.archive(hash_of("a@x.io"), 20).expect("archive");
        assert_eq!(list.count(Status::Archived), 1);
        assert_eq!(
            list.archive(hash_of("a@x.io"), 30).unwrap_err(),
            StoreError::NotArchivable
        );
    }
}
