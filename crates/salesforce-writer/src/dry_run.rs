//! The report of a dry run: per Salesforce object, how many boxes a sync would check and uncheck, with
//! examples, built from the changes the write path planned but did not make.
//!
//! Semantics: a dry run is the writer's poll cycle with writing switched off. `full` scans every record
//! with the box unchecked (a complete reconcile), otherwise only records changed since the poll
//! watermark; for each, the evaluator's *current* decision says whether it would be checked. Like the real
//! cycle it only ever checks boxes: unchecks happen on the dirty path, on opt-in evidence, never in a
//! reconcile. Nothing is written: not Salesforce, not the audit log, not the watermark.

use std::collections::{BTreeMap, BTreeSet};

use optout_proto::admin::v1::{DryRunChange, DryRunObject, DryRunReport};

use crate::plan::{Change, SfObject};

/// Changes listed per object in the report.
const EXAMPLES: usize = 10;

/// The report for `objects` (every object in scope gets an entry) from `planned` changes, each record
/// counted once even when the scan met its email twice.
pub(crate) fn report(objects: &[SfObject], planned: Vec<Change>, scanned: usize) -> DryRunReport {
    let mut seen = BTreeSet::new();
    let mut by_object: BTreeMap<SfObject, DryRunObject> = objects
        .iter()
        .map(|object| {
            (
                *object,
                DryRunObject {
                    object: object.name().to_owned(),
                    ..DryRunObject::default()
                },
            )
        })
        .collect();
    for change in planned {
        if !seen.insert((change.object, change.id.clone())) {
            continue;
        }
        let entry = by_object
            .entry(change.object)
            .or_insert_with(|| DryRunObject {
                object: change.object.name().to_owned(),
                ..DryRunObject::default()
            });
        if change.new {
            entry.would_check += 1;
        } else {
            entry.would_uncheck += 1;
        }
        if entry.examples.len() < EXAMPLES {
            entry.examples.push(DryRunChange {
                record_id: change.id,
                email: change.email.to_string(),
                old_value: change.old,
                new_value: change.new,
                reason: change.reason.to_string(),
            });
        }
    }
    DryRunReport {
        objects: by_object.into_values().collect(),
        records_scanned: scanned as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(object: SfObject, id: &str, new: bool) -> Change {
        Change {
            object,
            id: id.to_owned(),
            email: format!("{id}@example.com").into(),
            old: !new,
            new,
            reason: std::sync::Arc::from("all unsubscribed"),
            version: 1,
            opted_out_at: None,
            trace_id: None,
        }
    }

    #[test]
    fn counts_each_record_once_and_lists_every_object_in_scope() {
        let planned = vec![
            change(SfObject::Contact, "c1", true),
            change(SfObject::Contact, "c1", true),
            change(SfObject::Contact, "c2", true),
            change(SfObject::Lead, "l1", false),
        ];
        let report = report(&SfObject::ALL, planned, 9);
        let counts: Vec<(String, u64, u64, usize)> = report
            .objects
            .iter()
            .map(|object| {
                (
                    object.object.clone(),
                    object.would_check,
                    object.would_uncheck,
                    object.examples.len(),
                )
            })
            .collect();
        assert_eq!(
            counts,
            [
                ("Contact".to_owned(), 2, 0, 2),
                ("Lead".to_owned(), 0, 1, 1),
                ("PersonAccount".to_owned(), 0, 0, 0)
            ]
        );
        assert_eq!(report.records_scanned, 9);
    }
}
