//! Record writes shared by the REST API, Bulk API jobs and the control endpoints: validation
//! with Salesforce's per-record error codes, creation, and the person account pair.

use serde_json::{Value as Json, json};

use super::store::{self, Field, Object, OrgData, Record, Value};

/// A per-record failure, as in SaveResults (`statusCode`) and Bulk `sf__Error`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RecordError {
    pub(crate) status_code: String,
    pub(crate) message: String,
    pub(crate) fields: Vec<String>,
}

impl RecordError {
    pub(crate) fn new(status_code: &str, message: impl Into<String>) -> RecordError {
        RecordError {
            status_code: status_code.to_owned(),
            message: message.into(),
            fields: Vec::new(),
        }
    }

    pub(crate) fn with_fields(mut self, fields: Vec<String>) -> RecordError {
        self.fields = fields;
        self
    }

    pub(crate) fn to_json(&self) -> Json {
        json!({ "statusCode": self.status_code, "message": self.message, "fields": self.fields })
    }

    /// The `sf__Error` column of Bulk API failed results.
    pub(crate) fn to_bulk(&self) -> String {
        format!(
            "{}:{}:{}--",
            self.status_code,
            self.message,
            self.fields.join(";")
        )
    }

    pub(crate) fn lock_row(id: &str) -> RecordError {
        RecordError::new(
            "UNABLE_TO_LOCK_ROW",
            format!("unable to obtain exclusive access to this record or 1 records: {id}"),
        )
    }

    pub(crate) fn rolled_back() -> RecordError {
        RecordError::new(
            "ALL_OR_NONE_OPERATION_ROLLED_BACK",
            "Record rolled back because not all records were valid and the request was using AllOrNone header",
        )
    }
}

/// A value as a client sent it: JSON from REST, a cell from Bulk CSV.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Raw<'a> {
    Json(&'a Json),
    Csv(&'a str),
}

/// Resolves and type-checks field writes on `object`; empty CSV cells are dropped.
pub(crate) fn prepare_changes<'a>(
    object: Object,
    person_accounts: bool,
    pairs: impl IntoIterator<Item = (&'a str, Raw<'a>)>,
) -> Result<Vec<(Field, Value)>, RecordError> {
    let mut changes = Vec::new();
    for (name, raw) in pairs {
        let Some(field) = Field::resolve(object, name, person_accounts) else {
            return Err(RecordError::new(
                "INVALID_FIELD",
                format!(
                    "No such column '{name}' on sobject of type {}",
                    object.name()
                ),
            )
            .with_fields(vec![name.to_owned()]));
        };
        if !field.updateable(object) {
            return Err(RecordError::new(
                "INVALID_FIELD_FOR_INSERT_UPDATE",
                format!(
                    "Unable to create/update fields: {}. Please check the security settings of this field and verify that it is read/write for your profile or permission set.",
                    field.name()
                ),
            )
            .with_fields(vec![field.name().to_owned()]));
        }
        let converted = match raw {
            Raw::Json(value) => store::value_from_json(field, value).map(Some),
            Raw::Csv(cell) => store::value_from_csv(field, cell),
        };
        match converted {
            Ok(Some(value)) => changes.push((field, value)),
            Ok(None) => {}
            Err((code, message)) => {
                return Err(
                    RecordError::new(code, message).with_fields(vec![field.name().to_owned()])
                );
            }
        }
    }
    Ok(changes)
}

/// Finds the record an update names, refusing what Salesforce refuses before any field check.
pub(crate) fn target(data: &OrgData, object: Option<Object>, id: &str) -> Result<u32, RecordError> {
    let Some(id_object) = Object::from_id(id) else {
        return Err(
            RecordError::new("MALFORMED_ID", format!("malformed id {id}"))
                .with_fields(vec!["Id".into()]),
        );
    };
    if object.is_some_and(|expected| expected != id_object) || !(id.len() == 15 || id.len() == 18) {
        let name = object.unwrap_or(id_object).name();
        return Err(RecordError::new(
            "MALFORMED_ID",
            format!("{name} ID: id value of incorrect type: {id}"),
        )
        .with_fields(vec!["Id".into()]));
    }
    let Some(index) = data.lookup(Some(id_object), id) else {
        return Err(RecordError::new(
            "INVALID_CROSS_REFERENCE_KEY",
            "invalid cross reference id",
        ));
    };
    let record = &data.records[index as usize];
    if record.deleted {
        return Err(RecordError::new("ENTITY_IS_DELETED", "entity is deleted"));
    }
    if record.object == Object::Lead && record.converted {
        return Err(RecordError::new(
            "CANNOT_UPDATE_CONVERTED_LEAD",
            "cannot reference converted lead",
        ));
    }
    Ok(index)
}

/// Pushes a person account and its hidden person contact; returns the Account's index.
pub(crate) fn push_person_account(
    data: &mut OrgData,
    email: String,
    first_name: String,
    last_name: String,
    opted_out: bool,
    stamp: i64,
) -> u32 {
    let mut account = Record::new(Object::Account, stamp);
    account.person_account = true;
    account.email = Some(email);
    account.first_name = first_name;
    account.last_name = last_name;
    account.opted_out = opted_out;
    let mut contact = account.clone();
    contact.object = Object::Contact;
    let account_index = data.push(account);
    let contact_index = data.push(contact);
    data.records[account_index as usize].link = Some(contact_index);
    data.records[contact_index as usize].link = Some(account_index);
    account_index
}

/// Creates a record of `object` from validated fields, checking required fields.
pub(crate) fn create(
    data: &mut OrgData,
    person_accounts: bool,
    object: Object,
    changes: &[(Field, Value)],
    stamp: i64,
) -> Result<u32, RecordError> {
    let has = |field: Field| {
        changes
            .iter()
            .any(|(candidate, value)| *candidate == field && *value != Value::Null)
    };
    let missing = |fields: &[&str]| {
        RecordError::new(
            "REQUIRED_FIELD_MISSING",
            format!("Required fields are missing: [{}]", fields.join(", ")),
        )
        .with_fields(fields.iter().map(|field| (*field).to_owned()).collect())
    };
    let person = object == Object::Account
        && person_accounts
        && (has(Field::LastName) || has(Field::PersonEmail));
    match object {
        Object::Contact if !has(Field::LastName) => return Err(missing(&["LastName"])),
        Object::Lead if !has(Field::LastName) || !has(Field::Company) => {
            let mut fields = Vec::new();
            if !has(Field::LastName) {
                fields.push("LastName");
            }
            if !has(Field::Company) {
                fields.push("Company");
            }
            return Err(missing(&fields));
        }
        Object::Account if person && !has(Field::LastName) => return Err(missing(&["LastName"])),
        Object::Account if !person && !has(Field::Name) => return Err(missing(&["Name"])),
        _ => {}
    }
    let index = if person {
        push_person_account(
            data,
            String::new(),
            String::new(),
            String::new(),
            false,
            stamp,
        )
    } else {
        let mut record = Record::new(object, stamp);
        if object == Object::Lead {
            record.status = Some("Open - Not Contacted".to_owned());
        }
        data.push(record)
    };
    data.apply(index, changes, stamp);
    // The empty email pushed with a fresh person account must not stay indexed.
    if person && !has(Field::PersonEmail) {
        data.apply(index, &[(Field::PersonEmail, Value::Null)], stamp);
    }
    Ok(index)
}

/// Converts a Lead as a user would: a business Account and a Contact take over the person.
pub(crate) fn convert_lead(data: &mut OrgData, lead_index: u32, stamp: i64) -> (u32, u32) {
    let lead = data.records[lead_index as usize].clone();
    let mut account = Record::new(Object::Account, stamp);
    account.company = Some(
        lead.company
            .clone()
            .unwrap_or_else(|| lead.last_name.clone()),
    );
    let account_index = data.push(account);
    let mut contact = Record::new(Object::Contact, stamp);
    contact.email = lead.email.clone();
    contact.first_name = lead.first_name.clone();
    contact.last_name = lead.last_name.clone();
    contact.opted_out = lead.opted_out;
    contact.link = Some(account_index);
    let contact_index = data.push(contact);
    data.apply(
        lead_index,
        &[(Field::Status, Value::Str("Closed - Converted".to_owned()))],
        stamp,
    );
    let converted = &mut data.records[lead_index as usize];
    converted.converted = true;
    converted.converted_date = Some(stamp);
    converted.converted_contact = Some(contact_index);
    converted.converted_account = Some(account_index);
    (contact_index, account_index)
}
