//! `optoutctl explain EMAIL`: the evaluator's view (members per audience, transitions, decision and
//! rule) joined with the writer's (the Salesforce records carrying the address now, and what the
//! writer wrote to them) in one report.

use std::{collections::BTreeMap, fmt::Write as _};

use optout_proto::{
    evaluator::v1::ExplainResponse,
    writer::v1::{AuditEntry, SalesforceRecord},
};

use crate::{
    Result,
    admin::ServiceHandle,
    cli::{explain_json, render_explain, timestamp},
    status::table,
};

/// What the writer knows about an email.
#[derive(Clone, Debug, Default)]
pub struct SalesforceSide {
    /// The records carrying the address, read live.
    pub records: Vec<SalesforceRecord>,
    /// The writer's writes, oldest first.
    pub audit: Vec<AuditEntry>,
}

/// Both sides of one email.
#[derive(Clone, Debug)]
pub struct Report {
    /// The address asked about.
    pub email: String,
    /// The evaluator's explanation.
    pub evaluator: ExplainResponse,
    /// The writer's records and audit trail; `None` when no writer address was given.
    pub salesforce: Option<SalesforceSide>,
}

/// Asks the evaluator and (when given) the writer at once.
pub async fn collect(
    email: &str,
    evaluator: &ServiceHandle,
    writer: Option<&ServiceHandle>,
) -> Result<Report> {
    let salesforce = async {
        match writer {
            Some(writer) => {
                let (records, audit) =
                    tokio::try_join!(writer.records_for(email), writer.audit_trail(email, 0))?;
                Ok(Some(SalesforceSide { records, audit }))
            }
            None => Ok(None),
        }
    };
    let (evaluator, salesforce) = tokio::try_join!(evaluator.explain(email), salesforce)?;
    Ok(Report {
        email: email.to_owned(),
        evaluator,
        salesforce,
    })
}

fn checkbox(value: bool) -> &'static str {
    if value { "opted out" } else { "not opted out" }
}

/// The report as readable text: the evaluator's part, then Salesforce's records and the writes.
pub fn render(report: &Report) -> String {
    let mut out = render_explain(&report.email, &report.evaluator);
    let Some(salesforce) = &report.salesforce else {
        out.push_str(
            "salesforce: not asked (pass --writer or set OPTOUT_WRITER_ADDR to include it)\n",
        );
        return out;
    };
    let _ = writeln!(out, "salesforce records:");
    if salesforce.records.is_empty() {
        let _ = writeln!(out, "  (none)");
    } else {
        let mut rows = vec![["  OBJECT", "ID", "EMAIL OPT OUT"].map(str::to_owned)];
        for record in &salesforce.records {
            rows.push([
                format!("  {}", record.object),
                record.id.clone(),
                checkbox(record.opted_out).to_owned(),
            ]);
        }
        out.push_str(&table(&rows));
    }
    let _ = writeln!(out, "writes:");
    if salesforce.audit.is_empty() {
        let _ = writeln!(out, "  (none)");
    } else {
        let mut rows =
            vec![["  WRITTEN", "OBJECT", "ID", "CHANGE", "TRIGGER", "REASON"].map(str::to_owned)];
        for entry in &salesforce.audit {
            rows.push([
                format!("  {}", timestamp(entry.written_at.as_ref())),
                entry.object.clone(),
                entry.record_id.clone(),
                format!("{} -> {}", entry.old_value, entry.new_value),
                entry.trigger.clone(),
                entry.reason.clone(),
            ]);
        }
        out.push_str(&table(&rows));
    }
    out
}

/// The report as one JSON object: the evaluator's fields plus `salesforce` (`null` when not asked).
pub fn to_json(report: &Report) -> serde_json::Value {
    let mut value = explain_json(&report.evaluator);
    let salesforce = report.salesforce.as_ref().map(|side| {
        serde_json::json!({
            "records": side.records.iter().map(|record| serde_json::json!({
                "object": record.object,
                "id": record.id,
                "email": record.email,
                "opted_out": record.opted_out,
                "fields": record.fields.iter().collect::<BTreeMap<_, _>>(),
            })).collect::<Vec<_>>(),
            "audit": side.audit.iter().map(|entry| serde_json::json!({
                "id": entry.id,
                "object": entry.object,
                "record_id": entry.record_id,
                "old_value": entry.old_value,
                "new_value": entry.new_value,
                "reason": entry.reason,
                "trigger": entry.trigger,
                "trace_id": entry.trace_id,
                "written_at": timestamp(entry.written_at.as_ref()),
            })).collect::<Vec<_>>(),
        })
    });
    if let Some(object) = value.as_object_mut() {
        object.insert("email".to_owned(), serde_json::json!(report.email));
        object.insert("salesforce".to_owned(), salesforce.unwrap_or_default());
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(salesforce: Option<SalesforceSide>) -> Report {
        Report {
            email: "a@example.com".to_owned(),
            evaluator: ExplainResponse::default(),
            salesforce,
        }
    }

    #[test]
    fn joins_records_and_writes_under_the_evaluator_part() {
        let side = SalesforceSide {
            records: vec![SalesforceRecord {
                object: "Contact".to_owned(),
                id: "003A".to_owned(),
                email: "a@example.com".to_owned(),
                opted_out: true,
                fields: Default::default(),
            }],
            audit: vec![AuditEntry {
                object: "Contact".to_owned(),
                record_id: "003A".to_owned(),
                old_value: false,
                new_value: true,
                reason: "unsubscribed in every audience".to_owned(),
                trigger: "mailchimp".to_owned(),
                ..AuditEntry::default()
            }],
        };
        let text = render(&report(Some(side)));
        assert!(text.starts_with("a@example.com: no decision"), "{text}");
        assert!(text.contains("Contact  003A  opted out"), "{text}");
        assert!(
            text.contains("false -> true  mailchimp  unsubscribed in every audience"),
            "{text}"
        );
    }

    #[test]
    fn says_when_the_writer_was_not_asked() {
        let report = report(None);
        assert!(render(&report).contains("salesforce: not asked"));
        assert_eq!(to_json(&report)["salesforce"], serde_json::Value::Null);
    }
}
