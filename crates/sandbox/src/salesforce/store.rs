//! The emulated org's records, their schema, and the indexes that keep `Email IN (...)` and
//! `SystemModstamp > ...` fast on a million records.

use std::collections::{BTreeSet, HashMap};

use chrono::{TimeZone, Utc};
use serde_json::Value as Json;

use super::ids;

/// The sObject types the sandbox knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Object {
    Contact,
    Lead,
    Account,
}

impl Object {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Object::Contact => "Contact",
            Object::Lead => "Lead",
            Object::Account => "Account",
        }
    }

    pub(crate) fn prefix(self) -> &'static str {
        match self {
            Object::Contact => "003",
            Object::Lead => "00Q",
            Object::Account => "001",
        }
    }

    /// Object names are case-insensitive in SOQL and in URLs.
    pub(crate) fn parse(name: &str) -> Option<Object> {
        [Object::Contact, Object::Lead, Object::Account]
            .into_iter()
            .find(|object| object.name().eq_ignore_ascii_case(name))
    }

    pub(crate) fn from_id(id: &str) -> Option<Object> {
        [Object::Contact, Object::Lead, Object::Account]
            .into_iter()
            .find(|object| id.starts_with(object.prefix()))
    }
}

/// The value types of fields, as far as the sandbox needs to check literals and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FieldKind {
    Id,
    Text,
    Email,
    Boolean,
    DateTime,
}

/// Every field of every object the sandbox serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Field {
    Id,
    IsDeleted,
    CreatedDate,
    LastModifiedDate,
    SystemModstamp,
    FirstName,
    LastName,
    Name,
    Email,
    HasOptedOutOfEmail,
    AccountId,
    IsPersonAccount,
    Company,
    Status,
    IsConverted,
    ConvertedContactId,
    ConvertedAccountId,
    ConvertedDate,
    PersonEmail,
    PersonHasOptedOutOfEmail,
    PersonContactId,
}

const COMMON: &[Field] = &[
    Field::Id,
    Field::IsDeleted,
    Field::CreatedDate,
    Field::LastModifiedDate,
    Field::SystemModstamp,
];
const CONTACT: &[Field] = &[
    Field::FirstName,
    Field::LastName,
    Field::Name,
    Field::Email,
    Field::HasOptedOutOfEmail,
    Field::AccountId,
];
const LEAD: &[Field] = &[
    Field::FirstName,
    Field::LastName,
    Field::Name,
    Field::Email,
    Field::HasOptedOutOfEmail,
    Field::Company,
    Field::Status,
    Field::IsConverted,
    Field::ConvertedContactId,
    Field::ConvertedAccountId,
    Field::ConvertedDate,
];
const ACCOUNT: &[Field] = &[Field::Name];
const CONTACT_PERSON: &[Field] = &[Field::IsPersonAccount];
const ACCOUNT_PERSON: &[Field] = &[
    Field::IsPersonAccount,
    Field::FirstName,
    Field::LastName,
    Field::PersonEmail,
    Field::PersonHasOptedOutOfEmail,
    Field::PersonContactId,
];

impl Field {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Field::Id => "Id",
            Field::IsDeleted => "IsDeleted",
            Field::CreatedDate => "CreatedDate",
            Field::LastModifiedDate => "LastModifiedDate",
            Field::SystemModstamp => "SystemModstamp",
            Field::FirstName => "FirstName",
            Field::LastName => "LastName",
            Field::Name => "Name",
            Field::Email => "Email",
            Field::HasOptedOutOfEmail => "HasOptedOutOfEmail",
            Field::AccountId => "AccountId",
            Field::IsPersonAccount => "IsPersonAccount",
            Field::Company => "Company",
            Field::Status => "Status",
            Field::IsConverted => "IsConverted",
            Field::ConvertedContactId => "ConvertedContactId",
            Field::ConvertedAccountId => "ConvertedAccountId",
            Field::ConvertedDate => "ConvertedDate",
            Field::PersonEmail => "PersonEmail",
            Field::PersonHasOptedOutOfEmail => "PersonHasOptedOutOfEmail",
            Field::PersonContactId => "PersonContactId",
        }
    }

    pub(crate) fn kind(self) -> FieldKind {
        match self {
            Field::Id
            | Field::AccountId
            | Field::ConvertedContactId
            | Field::ConvertedAccountId
            | Field::PersonContactId => FieldKind::Id,
            Field::IsDeleted
            | Field::HasOptedOutOfEmail
            | Field::IsPersonAccount
            | Field::IsConverted
            | Field::PersonHasOptedOutOfEmail => FieldKind::Boolean,
            Field::CreatedDate
            | Field::LastModifiedDate
            | Field::SystemModstamp
            | Field::ConvertedDate => FieldKind::DateTime,
            Field::Email | Field::PersonEmail => FieldKind::Email,
            Field::FirstName | Field::LastName | Field::Name | Field::Company | Field::Status => {
                FieldKind::Text
            }
        }
    }

    /// Whether an API client may write the field on `object`.
    pub(crate) fn updateable(self, object: Object) -> bool {
        match self {
            Field::FirstName
            | Field::LastName
            | Field::Email
            | Field::HasOptedOutOfEmail
            | Field::Company
            | Field::Status
            | Field::PersonEmail
            | Field::PersonHasOptedOutOfEmail => true,
            Field::Name => object == Object::Account,
            _ => false,
        }
    }

    /// The fields of `object` in this org, in describe order.
    pub(crate) fn all(object: Object, person_accounts: bool) -> Vec<Field> {
        let mut fields = COMMON.to_vec();
        match object {
            Object::Contact => {
                fields.extend_from_slice(CONTACT);
                if person_accounts {
                    fields.extend_from_slice(CONTACT_PERSON);
                }
            }
            Object::Lead => fields.extend_from_slice(LEAD),
            Object::Account => {
                fields.extend_from_slice(ACCOUNT);
                if person_accounts {
                    fields.extend_from_slice(ACCOUNT_PERSON);
                }
            }
        }
        fields
    }

    /// Resolves a field name (case-insensitively) on `object`; `None` is Salesforce's `INVALID_FIELD`.
    pub(crate) fn resolve(object: Object, name: &str, person_accounts: bool) -> Option<Field> {
        Field::all(object, person_accounts)
            .into_iter()
            .find(|field| field.name().eq_ignore_ascii_case(name))
    }
}

/// A field value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Str(String),
    /// Milliseconds since the epoch, UTC.
    DateTime(i64),
}

/// Formats a timestamp the way Salesforce writes datetimes in JSON: `2024-01-01T00:00:00.000+0000`.
pub(crate) fn format_datetime(millis: i64) -> String {
    match Utc.timestamp_millis_opt(millis) {
        chrono::LocalResult::Single(at) => at.format("%Y-%m-%dT%H:%M:%S%.3f+0000").to_string(),
        _ => String::new(),
    }
}

impl Value {
    pub(crate) fn to_json(&self) -> Json {
        match self {
            Value::Null => Json::Null,
            Value::Bool(flag) => Json::Bool(*flag),
            Value::Str(text) => Json::String(text.clone()),
            Value::DateTime(millis) => Json::String(format_datetime(*millis)),
        }
    }
}

/// One stored record. Fields the object does not have are simply unused.
#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub(crate) object: Object,
    pub(crate) first_name: String,
    pub(crate) last_name: String,
    /// `Email` of a Contact or Lead, `PersonEmail` of a person account.
    pub(crate) email: Option<String>,
    /// `Company` of a Lead, `Name` of a business account.
    pub(crate) company: Option<String>,
    pub(crate) status: Option<String>,
    /// `HasOptedOutOfEmail`, or `PersonHasOptedOutOfEmail` of a person account.
    pub(crate) opted_out: bool,
    pub(crate) converted: bool,
    pub(crate) converted_date: Option<i64>,
    pub(crate) converted_contact: Option<u32>,
    pub(crate) converted_account: Option<u32>,
    /// A person account, or the hidden person contact of one.
    pub(crate) person_account: bool,
    /// A Contact's `AccountId`, or a person account's `PersonContactId`.
    pub(crate) link: Option<u32>,
    pub(crate) created: i64,
    pub(crate) modified: i64,
    pub(crate) modstamp: i64,
    pub(crate) deleted: bool,
}

impl Record {
    pub(crate) fn new(object: Object, stamp: i64) -> Record {
        Record {
            object,
            first_name: String::new(),
            last_name: String::new(),
            email: None,
            company: None,
            status: None,
            opted_out: false,
            converted: false,
            converted_date: None,
            converted_contact: None,
            converted_account: None,
            person_account: false,
            link: None,
            created: stamp,
            modified: stamp,
            modstamp: stamp,
            deleted: false,
        }
    }
}

fn optional_text(text: &Option<String>) -> Value {
    text.as_ref()
        .map_or(Value::Null, |value| Value::Str(value.clone()))
}

fn non_empty(text: &str) -> Value {
    if text.is_empty() {
        Value::Null
    } else {
        Value::Str(text.to_owned())
    }
}

/// Every record of the org with its indexes.
#[derive(Debug, Default)]
pub(crate) struct OrgData {
    pub(crate) records: Vec<Record>,
    /// Lower-cased email -> records carrying it (Contacts, Leads, person accounts).
    by_email: HashMap<String, Vec<u32>>,
    /// (SystemModstamp, index), for incremental polls.
    by_modstamp: BTreeSet<(i64, u32)>,
    last_stamp: i64,
}

impl OrgData {
    /// A timestamp for a write. `strict` writes get a millisecond no earlier write had, so a
    /// poller that remembers the highest `SystemModstamp` it saw never misses a later write.
    pub(crate) fn next_stamp(&mut self, strict: bool) -> i64 {
        let now = Utc::now().timestamp_millis();
        let floor = if strict {
            self.last_stamp + 1
        } else {
            self.last_stamp
        };
        self.last_stamp = now.max(floor);
        self.last_stamp
    }

    pub(crate) fn id_of(&self, index: u32) -> String {
        let object = self
            .records
            .get(index as usize)
            .map_or(Object::Contact, |record| record.object);
        ids::format_id(object.prefix(), u64::from(index))
    }

    /// Finds a record by id; `None` when the id is malformed, of another object, or unknown.
    pub(crate) fn lookup(&self, object: Option<Object>, id: &str) -> Option<u32> {
        let id_object = Object::from_id(id)?;
        if object.is_some_and(|expected| expected != id_object) {
            return None;
        }
        let index = u32::try_from(ids::parse_id(id_object.prefix(), id)?).ok()?;
        let record = self.records.get(index as usize)?;
        (record.object == id_object).then_some(index)
    }

    pub(crate) fn push(&mut self, record: Record) -> u32 {
        let index = u32::try_from(self.records.len()).unwrap_or(u32::MAX);
        if let Some(email) = &record.email {
            self.by_email
                .entry(email.to_lowercase())
                .or_default()
                .push(index);
        }
        self.by_modstamp.insert((record.modstamp, index));
        self.records.push(record);
        index
    }

    /// Records carrying `email` (any case), of every object.
    pub(crate) fn with_email(&self, email: &str) -> &[u32] {
        self.by_email
            .get(&email.to_lowercase())
            .map_or(&[], Vec::as_slice)
    }

    /// Indexes of records with `SystemModstamp` in the range, in modstamp order.
    pub(crate) fn modstamp_range(&self, range: impl std::ops::RangeBounds<(i64, u32)>) -> Vec<u32> {
        self.by_modstamp
            .range(range)
            .map(|(_, index)| *index)
            .collect()
    }

    pub(crate) fn get(&self, index: u32, field: Field) -> Value {
        let Some(record) = self.records.get(index as usize) else {
            return Value::Null;
        };
        let link_id =
            |link: Option<u32>| link.map_or(Value::Null, |linked| Value::Str(self.id_of(linked)));
        match field {
            Field::Id => Value::Str(self.id_of(index)),
            Field::IsDeleted => Value::Bool(record.deleted),
            Field::CreatedDate => Value::DateTime(record.created),
            Field::LastModifiedDate => Value::DateTime(record.modified),
            Field::SystemModstamp => Value::DateTime(record.modstamp),
            Field::FirstName => non_empty(&record.first_name),
            Field::LastName => non_empty(&record.last_name),
            Field::Name => match (record.object, record.person_account) {
                (Object::Account, false) => optional_text(&record.company),
                _ => Value::Str(
                    format!("{} {}", record.first_name, record.last_name)
                        .trim()
                        .to_owned(),
                ),
            },
            Field::Email | Field::PersonEmail => optional_text(&record.email),
            Field::HasOptedOutOfEmail | Field::PersonHasOptedOutOfEmail => {
                Value::Bool(record.opted_out)
            }
            Field::AccountId | Field::PersonContactId => link_id(record.link),
            Field::IsPersonAccount => Value::Bool(record.person_account),
            Field::Company => optional_text(&record.company),
            Field::Status => optional_text(&record.status),
            Field::IsConverted => Value::Bool(record.converted),
            Field::ConvertedContactId => link_id(record.converted_contact),
            Field::ConvertedAccountId => link_id(record.converted_account),
            Field::ConvertedDate => record.converted_date.map_or(Value::Null, Value::DateTime),
        }
    }

    /// Applies validated changes to one record at `stamp`, keeping the indexes and the person
    /// account / person contact pair in step.
    pub(crate) fn apply(&mut self, index: u32, changes: &[(Field, Value)], stamp: i64) {
        self.apply_one(index, changes, stamp);
        let Some(record) = self.records.get(index as usize) else {
            return;
        };
        if !record.person_account {
            return;
        }
        // A person account and its person contact are one person: mirror the shared fields.
        if let Some(partner) = record.link {
            let mirrored: Vec<(Field, Value)> = changes
                .iter()
                .filter_map(|(field, value)| {
                    let twin = match field {
                        Field::Email | Field::PersonEmail => Field::Email,
                        Field::HasOptedOutOfEmail | Field::PersonHasOptedOutOfEmail => {
                            Field::HasOptedOutOfEmail
                        }
                        Field::FirstName => Field::FirstName,
                        Field::LastName => Field::LastName,
                        _ => return None,
                    };
                    Some((twin, value.clone()))
                })
                .collect();
            self.apply_one(partner, &mirrored, stamp);
        }
    }

    fn apply_one(&mut self, index: u32, changes: &[(Field, Value)], stamp: i64) {
        let Some(record) = self.records.get_mut(index as usize) else {
            return;
        };
        let old_email = record.email.clone();
        let old_stamp = record.modstamp;
        for (field, value) in changes {
            let text = match value {
                Value::Str(text) => Some(text.clone()),
                _ => None,
            };
            match field {
                Field::FirstName => record.first_name = text.unwrap_or_default(),
                Field::LastName => record.last_name = text.unwrap_or_default(),
                Field::Email | Field::PersonEmail => record.email = text,
                Field::Company | Field::Name => record.company = text,
                Field::Status => record.status = text,
                Field::HasOptedOutOfEmail | Field::PersonHasOptedOutOfEmail => {
                    record.opted_out = matches!(value, Value::Bool(true));
                }
                _ => {}
            }
        }
        record.modified = stamp;
        record.modstamp = stamp;
        let new_email = record.email.clone();
        self.by_modstamp.remove(&(old_stamp, index));
        self.by_modstamp.insert((stamp, index));
        if old_email != new_email {
            if let Some(old) = old_email {
                let key = old.to_lowercase();
                if let Some(list) = self.by_email.get_mut(&key) {
                    list.retain(|candidate| *candidate != index);
                    if list.is_empty() {
                        self.by_email.remove(&key);
                    }
                }
            }
            if let Some(new) = new_email {
                self.by_email
                    .entry(new.to_lowercase())
                    .or_default()
                    .push(index);
            }
        }
    }

    /// Marks a record deleted (it stays visible to `queryAll`).
    pub(crate) fn delete(&mut self, index: u32, stamp: i64) {
        let partner = self
            .records
            .get(index as usize)
            .filter(|record| record.person_account)
            .and_then(|r| r.link);
        for target in std::iter::once(index).chain(partner) {
            if let Some(record) = self.records.get_mut(target as usize) {
                record.deleted = true;
            }
            self.apply_one(target, &[], stamp);
        }
    }
}

/// Converts a JSON value written by a client into a field value, or a Salesforce error code
/// and message.
pub(crate) fn value_from_json(field: Field, json: &Json) -> Result<Value, (&'static str, String)> {
    let name = field.name();
    match (field.kind(), json) {
        (_, Json::Null) => Ok(Value::Null),
        (FieldKind::Boolean, Json::Bool(flag)) => Ok(Value::Bool(*flag)),
        (FieldKind::Boolean, Json::String(text)) => parse_bool(text).map(Value::Bool).ok_or((
            "INVALID_TYPE_ON_FIELD_IN_RECORD",
            format!("{name}: value not of required type: {text}"),
        )),
        (FieldKind::Email, Json::String(text)) => check_email(field, text),
        (FieldKind::Text | FieldKind::Id, Json::String(text)) => Ok(Value::Str(text.clone())),
        (_, other) => Err((
            "JSON_PARSER_ERROR",
            format!("Cannot deserialize instance of {name} from {other}"),
        )),
    }
}

/// Converts a Bulk API CSV cell; `None` leaves the field as it is (an empty cell).
pub(crate) fn value_from_csv(
    field: Field,
    cell: &str,
) -> Result<Option<Value>, (&'static str, String)> {
    if cell.is_empty() {
        return Ok(None);
    }
    if cell == "#N/A" {
        return Ok(Some(Value::Null));
    }
    let name = field.name();
    match field.kind() {
        FieldKind::Boolean => parse_bool(cell).map(|flag| Some(Value::Bool(flag))).ok_or((
            "INVALID_FIELD_FOR_INSERT_UPDATE",
            format!("Error converting value to correct data type: {cell} ({name})"),
        )),
        FieldKind::Email => check_email(field, cell).map(Some),
        _ => Ok(Some(Value::Str(cell.to_owned()))),
    }
}

/// Booleans are read case-insensitively (simple-salesforce writes Python's `True`/`False`).
pub(crate) fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

fn check_email(field: Field, text: &str) -> Result<Value, (&'static str, String)> {
    if text.is_empty() {
        return Ok(Value::Null);
    }
    let valid = text.len() <= 80
        && text
            .split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'))
        && !text.contains(char::is_whitespace);
    if valid {
        Ok(Value::Str(text.to_owned()))
    } else {
        Err((
            "INVALID_EMAIL_ADDRESS",
            format!("{}: invalid email address: {text}", field.name()),
        ))
    }
}
