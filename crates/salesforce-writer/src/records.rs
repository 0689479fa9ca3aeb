//! The `optout.writer.v1.Records` service: the Salesforce records that carry an address, read live, and the
//! audit trail of every write the writer made for it. `optoutctl explain` joins this with the evaluator's
//! `Explain`, so one command shows the whole story of a person.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use optout_proto::writer::v1::records_server::Records;
use optout_proto::writer::v1::{
    AuditEntry, AuditTrailRequest, AuditTrailResponse, RecordsForRequest, RecordsForResponse,
    SalesforceRecord,
};
use serde_json::Value;
use tonic::{Request, Response, Status};

use crate::AppState;
use crate::plan;

/// Audit rows returned when the request sets no limit.
const DEFAULT_AUDIT_LIMIT: u32 = 500;

/// Answers `unavailable` until start-up has connected every dependency.
#[derive(Clone, Debug)]
pub(crate) struct RecordsService {
    pub(crate) state: Arc<OnceLock<Arc<AppState>>>,
}

impl RecordsService {
    fn state(&self) -> Result<&Arc<AppState>, Status> {
        self.state
            .get()
            .ok_or_else(|| Status::unavailable("salesforce-writer is starting"))
    }
}

fn email_of(request: &str) -> Result<String, Status> {
    let email = plan::normalize_email(request);
    if email.is_empty() {
        return Err(Status::invalid_argument("email must not be empty"));
    }
    Ok(email)
}

/// A JSON scalar as an operator reads it (`true`, `0031...`, `2026-11-26T...`).
fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[tonic::async_trait]
impl Records for RecordsService {
    async fn records_for(
        &self,
        request: Request<RecordsForRequest>,
    ) -> Result<Response<RecordsForResponse>, Status> {
        let state = self.state()?;
        let email = email_of(&request.into_inner().email)?;
        let writer = &state.writer;
        let mut records = Vec::new();
        for object in &writer.objects {
            let soql = plan::records_query(*object, &email, writer.person_accounts);
            let rows: Vec<Value> = writer
                .salesforce
                .query(&soql)
                .await
                .map_err(|error| Status::unavailable(crate::error_chain(&error)))?;
            for row in rows {
                let Some(fields) = row.as_object() else {
                    continue;
                };
                let fields: HashMap<String, String> = fields
                    .iter()
                    .filter(|(name, _)| name.as_str() != "attributes")
                    .map(|(name, value)| (name.clone(), text(value)))
                    .collect();
                records.push(SalesforceRecord {
                    object: object.name().to_owned(),
                    id: fields.get("Id").cloned().unwrap_or_default(),
                    email: plan::normalize_email(
                        fields
                            .get(object.email_field())
                            .map(String::as_str)
                            .unwrap_or_default(),
                    ),
                    opted_out: fields.get(object.opt_out_field()).map(String::as_str)
                        == Some("true"),
                    fields,
                });
            }
        }
        Ok(Response::new(RecordsForResponse { records }))
    }

    async fn audit_trail(
        &self,
        request: Request<AuditTrailRequest>,
    ) -> Result<Response<AuditTrailResponse>, Status> {
        let state = self.state()?;
        let request = request.into_inner();
        let email = email_of(&request.email)?;
        let limit = match request.limit {
            0 => DEFAULT_AUDIT_LIMIT,
            limit => limit,
        };
        let rows = state
            .writer
            .store
            .audit_trail(&email, i64::from(limit))
            .await
            .map_err(|error| Status::unavailable(crate::error_chain(&error)))?;
        Ok(Response::new(AuditTrailResponse {
            entries: rows
                .into_iter()
                .map(|row| AuditEntry {
                    id: row.id,
                    email: row.email,
                    object: row.object,
                    record_id: row.record_id,
                    old_value: row.old_value,
                    new_value: row.new_value,
                    reason: row.reason,
                    trigger: row.trigger,
                    trace_id: row.trace_id.unwrap_or_default(),
                    written_at: Some(prost_types::Timestamp {
                        seconds: row.written_at.timestamp(),
                        nanos: i32::try_from(row.written_at.timestamp_subsec_nanos()).unwrap_or(0),
                    }),
                })
                .collect(),
        }))
    }
}
