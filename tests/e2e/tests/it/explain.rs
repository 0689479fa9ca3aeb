//! `Explain` end to end: one person in three audiences with a Contact, taken step by step through
//! the rule (docs/architecture.md, "The rule" and "The safety asymmetry"), and what the evaluator's
//! `Explain` and the writer's `RecordsFor` and `AuditTrail` show after each sync — read through the
//! generated gRPC clients, and once through `optoutctl explain --json` run as a process.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, ensure};
use optout_cli::explain::{Report, SalesforceSide, collect};
use optout_e2e::{Role, Stack, StackConfig};
use optout_proto::{
    evaluator::v1::{Decision, PersonDecision},
    writer::v1::{AuditEntry, SalesforceRecord},
};
use serde_json::Value;

use crate::support::{Records, email, person};

/// The rule texts the evaluator reports (`crates/rule-evaluator/src/rule.rs`).
const RULE_ALL_UNSUBSCRIBED: &str = "unsubscribed in every audience in scope";
const RULE_ANY_SUBSCRIBED: &str = "subscribed in at least one audience in scope";

/// Audit triggers the writer records.
const TRIGGER_MAILCHIMP: &str = "mailchimp";
const TRIGGER_POLL: &str = "salesforce-poll";

/// Both sides of the explanation, through the generated clients (`Decisions.Explain`,
/// `Records.RecordsFor`, `Records.AuditTrail`).
async fn explain(stack: &Stack, email: &str) -> Result<Report> {
    let fleet = stack.fleet().await?;
    let evaluator = fleet.first(Role::Evaluator).context("no evaluator")?;
    let writer = fleet.first(Role::Writer).context("no writer")?;
    Ok(collect(email, evaluator, Some(writer)).await?)
}

fn decision(report: &Report) -> Result<&PersonDecision> {
    report
        .evaluator
        .decision
        .as_ref()
        .with_context(|| format!("Explain of {} carries no decision", report.email))
}

fn salesforce(report: &Report) -> Result<&SalesforceSide> {
    report
        .salesforce
        .as_ref()
        .context("the writer was not asked")
}

/// Status per audience id.
fn statuses(report: &Report) -> BTreeMap<String, String> {
    report
        .evaluator
        .members
        .iter()
        .map(|member| (member.audience_id.clone(), member.status.clone()))
        .collect()
}

/// How many transitions `audience` made from `from` to `to`.
fn transitions(report: &Report, audience: &str, from: &str, to: &str) -> usize {
    report
        .evaluator
        .transitions
        .iter()
        .filter(|transition| {
            transition.audience_id == audience
                && transition.from_status == from
                && transition.to_status == to
        })
        .count()
}

fn contact<'a>(report: &'a Report, id: &str) -> Result<&'a SalesforceRecord> {
    let records = &salesforce(report)?.records;
    ensure!(
        records.len() == 1,
        "RecordsFor should return the one Contact: {records:?}"
    );
    records
        .iter()
        .find(|record| record.object == "Contact" && record.id == id)
        .with_context(|| format!("Contact {id} missing from RecordsFor: {records:?}"))
}

fn audit(report: &Report) -> Result<&[AuditEntry]> {
    Ok(&salesforce(report)?.audit)
}

/// The expected statuses: `unsubscribed` in the audiences at `unsubscribed`, `subscribed` elsewhere.
fn expected_statuses(audiences: &[String], unsubscribed: &[usize]) -> BTreeMap<String, String> {
    audiences
        .iter()
        .enumerate()
        .map(|(index, audience)| {
            let status = if unsubscribed.contains(&index) {
                "unsubscribed"
            } else {
                "subscribed"
            };
            (audience.clone(), status.to_owned())
        })
        .collect()
}

/// Checks one audit entry: a write of `old -> new` to the Contact, for `reason`, by `trigger`.
fn expect_write(
    entry: &AuditEntry,
    contact_id: &str,
    (old, new): (bool, bool),
    reason: &str,
    trigger: &str,
) -> Result<()> {
    ensure!(
        entry.object == "Contact"
            && entry.record_id == contact_id
            && entry.old_value == old
            && entry.new_value == new
            && entry.reason == reason
            && entry.trigger == trigger
            && entry.written_at.is_some(),
        "expected a write {old} -> {new} of Contact {contact_id} for {reason:?} by {trigger}, found {entry:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_each_step_for_a_person_in_three_audiences() -> Result<()> {
    let mut stack = Stack::start(StackConfig {
        audiences: 3,
        ..StackConfig::default()
    })
    .await?;
    let audiences = stack.audiences().to_vec();
    ensure!(
        audiences.len() == 3,
        "three audiences expected: {audiences:?}"
    );
    let address = email("explain");
    let someone = person(&stack, &address, &Records::contact(false)).await?;
    let contact_id = someone.records[0].1.clone();

    // Start: subscribed everywhere, box unchecked, nothing written.
    stack.sync_and_wait().await?;
    let start = explain(&stack, &address).await?;
    ensure!(
        statuses(&start) == expected_statuses(&audiences, &[]),
        "start: {:?}",
        start.evaluator.members
    );
    ensure!(
        start
            .evaluator
            .members
            .iter()
            .all(|member| !member.learned_from.is_empty() && member.last_changed.is_some()),
        "start: every member says when it changed and how it was learned: {:?}",
        start.evaluator.members
    );
    let start_decision = decision(&start)?;
    ensure!(
        start_decision.decision() == Decision::OptIn
            && start_decision.rule == RULE_ANY_SUBSCRIBED
            && start_decision.opt_in_evidence_id == 0,
        "start: {start_decision:?}"
    );
    ensure!(!contact(&start, &contact_id)?.opted_out, "start: unchecked");
    ensure!(
        audit(&start)?.is_empty(),
        "start: nothing written: {:?}",
        audit(&start)?
    );

    // a1) Unsubscribed in one audience of three: still subscribed in two, so the rule says
    // OptIn (no evidence, nothing to uncheck) and the box stays unchecked.
    stack.unsubscribe(&audiences[0], &address).await?;
    stack.sync_and_wait().await?;
    let one = explain(&stack, &address).await?;
    ensure!(
        statuses(&one) == expected_statuses(&audiences, &[0]),
        "a1: {:?}",
        one.evaluator.members
    );
    ensure!(
        transitions(&one, &audiences[0], "subscribed", "unsubscribed") == 1,
        "a1: the unsubscribe transition: {:?}",
        one.evaluator.transitions
    );
    let one_decision = decision(&one)?;
    ensure!(
        one_decision.decision() == Decision::OptIn
            && one_decision.rule == RULE_ANY_SUBSCRIBED
            && one_decision.version == start_decision.version
            && one_decision.opted_out_at.is_none(),
        "a1: the decision does not change while two audiences are subscribed: {one_decision:?} (start {start_decision:?})"
    );
    ensure!(
        !contact(&one, &contact_id)?.opted_out,
        "a1: still unchecked"
    );
    ensure!(
        audit(&one)?.is_empty(),
        "a1: nothing written: {:?}",
        audit(&one)?
    );

    // a2) Unsubscribed in the other two: OptOut, the box is checked, one audit row.
    stack.unsubscribe(&audiences[1], &address).await?;
    stack.unsubscribe(&audiences[2], &address).await?;
    stack.sync_and_wait().await?;
    let all = explain(&stack, &address).await?;
    ensure!(
        statuses(&all) == expected_statuses(&audiences, &[0, 1, 2]),
        "a2: {:?}",
        all.evaluator.members
    );
    for audience in &audiences {
        ensure!(
            transitions(&all, audience, "subscribed", "unsubscribed") == 1,
            "a2: one unsubscribe transition in {audience}: {:?}",
            all.evaluator.transitions
        );
    }
    let opt_out = decision(&all)?;
    ensure!(
        opt_out.decision() == Decision::OptOut
            && opt_out.rule == RULE_ALL_UNSUBSCRIBED
            && opt_out.version > one_decision.version
            && opt_out.opted_out_at.is_some(),
        "a2: {opt_out:?}"
    );
    let checked = contact(&all, &contact_id)?;
    ensure!(
        checked.opted_out
            && checked.fields.get("HasOptedOutOfEmail").map(String::as_str) == Some("true"),
        "a2: the Contact is checked: {checked:?}"
    );
    let writes = audit(&all)?;
    ensure!(writes.len() == 1, "a2: one write: {writes:?}");
    expect_write(
        &writes[0],
        &contact_id,
        (false, true),
        RULE_ALL_UNSUBSCRIBED,
        TRIGGER_MAILCHIMP,
    )?;

    // The same through `optoutctl explain --json`, a real process.
    let mut optoutctl = stack
        .spawn_optoutctl(&["explain", "--json", &address])
        .await?;
    let printed = optoutctl.announcement().clone();
    let exit = optoutctl.wait().await?;
    ensure!(
        exit.success(),
        "optoutctl explain exited with {exit}:\n{}",
        optoutctl.stderr_tail()
    );
    expect_cli_opt_out(&printed, &contact_id, &audiences)?;

    // b) A manual uncheck while unsubscribed everywhere. The live read shows it at once; the
    // next sync's poll re-checks it (opt-outs are level-triggered) with a second audit row, and
    // Mailchimp's side of the story does not move.
    stack
        .edit_record(
            "Contact",
            &contact_id,
            serde_json::json!({ "HasOptedOutOfEmail": false }),
        )
        .await?;
    let unchecked = explain(&stack, &address).await?;
    ensure!(
        !contact(&unchecked, &contact_id)?.opted_out,
        "b: RecordsFor reads the manual uncheck live"
    );
    ensure!(
        audit(&unchecked)?.len() == 1,
        "b: the manual edit is not the writer's: {:?}",
        audit(&unchecked)?
    );
    stack.sync_and_wait().await?;
    let rechecked = explain(&stack, &address).await?;
    ensure!(
        contact(&rechecked, &contact_id)?.opted_out,
        "b: the poll re-checks a manual uncheck while the person is unsubscribed everywhere"
    );
    let after_poll = decision(&rechecked)?;
    ensure!(
        after_poll.decision() == Decision::OptOut && after_poll.version == opt_out.version,
        "b: the decision did not change: {after_poll:?} (before {opt_out:?})"
    );
    ensure!(
        rechecked.evaluator.transitions.len() == all.evaluator.transitions.len(),
        "b: no Mailchimp transition: {:?}",
        rechecked.evaluator.transitions
    );
    let writes = audit(&rechecked)?;
    ensure!(writes.len() == 2, "b: a second write: {writes:?}");
    expect_write(
        &writes[1],
        &contact_id,
        (false, true),
        RULE_ALL_UNSUBSCRIBED,
        TRIGGER_POLL,
    )?;

    // c) Subscribed again through a signup form: opt-in evidence, so the box is unchecked, and
    // the evidence is consumed once written.
    stack.resubscribe(&audiences[1], &address).await?;
    stack.sync_and_wait().await?;
    let back = explain(&stack, &address).await?;
    ensure!(
        statuses(&back) == expected_statuses(&audiences, &[0, 2]),
        "c: {:?}",
        back.evaluator.members
    );
    ensure!(
        transitions(&back, &audiences[1], "unsubscribed", "subscribed") == 1,
        "c: the resubscribe transition: {:?}",
        back.evaluator.transitions
    );
    let opt_in = decision(&back)?;
    ensure!(
        opt_in.decision() == Decision::OptIn
            && opt_in.rule == RULE_ANY_SUBSCRIBED
            && opt_in.version > opt_out.version
            && opt_in.opt_in_evidence_id == 0,
        "c: opt-in, evidence acknowledged: {opt_in:?}"
    );
    ensure!(
        !contact(&back, &contact_id)?.opted_out,
        "c: unchecked on opt-in evidence"
    );
    let writes = audit(&back)?;
    ensure!(writes.len() == 3, "c: a third write: {writes:?}");
    expect_write(
        &writes[2],
        &contact_id,
        (true, false),
        RULE_ANY_SUBSCRIBED,
        TRIGGER_MAILCHIMP,
    )?;

    // d) A new unsubscribe in that audience: unsubscribed everywhere again, re-checked.
    stack.unsubscribe(&audiences[1], &address).await?;
    stack.sync_and_wait().await?;
    let again = explain(&stack, &address).await?;
    ensure!(
        statuses(&again) == expected_statuses(&audiences, &[0, 1, 2]),
        "d: {:?}",
        again.evaluator.members
    );
    ensure!(
        transitions(&again, &audiences[1], "subscribed", "unsubscribed") == 2,
        "d: a second unsubscribe transition in {}: {:?}",
        audiences[1],
        again.evaluator.transitions
    );
    let opt_out_again = decision(&again)?;
    ensure!(
        opt_out_again.decision() == Decision::OptOut
            && opt_out_again.rule == RULE_ALL_UNSUBSCRIBED
            && opt_out_again.version > opt_in.version,
        "d: {opt_out_again:?}"
    );
    ensure!(contact(&again, &contact_id)?.opted_out, "d: checked again");
    let writes = audit(&again)?;
    ensure!(writes.len() == 4, "d: a fourth write: {writes:?}");
    expect_write(
        &writes[3],
        &contact_id,
        (false, true),
        RULE_ALL_UNSUBSCRIBED,
        TRIGGER_MAILCHIMP,
    )?;
    ensure!(
        writes.windows(2).all(|pair| pair[0].id < pair[1].id),
        "the audit trail is oldest first: {writes:?}"
    );
    stack.shutdown().await
}

/// `optoutctl explain --json` after step a2: the same structured facts as the gRPC answers.
fn expect_cli_opt_out(printed: &Value, contact_id: &str, audiences: &[String]) -> Result<()> {
    ensure!(
        printed
            .pointer("/decision/decision")
            .and_then(Value::as_str)
            == Some("opt-out")
            && printed.pointer("/decision/rule").and_then(Value::as_str)
                == Some(RULE_ALL_UNSUBSCRIBED),
        "optoutctl: decision: {printed}"
    );
    let members = printed
        .get("members")
        .and_then(Value::as_array)
        .context("optoutctl: no members")?;
    let member_statuses: BTreeMap<&str, &str> = members
        .iter()
        .filter_map(|member| {
            Some((
                member.get("audience_id")?.as_str()?,
                member.get("status")?.as_str()?,
            ))
        })
        .collect();
    let expected: BTreeMap<&str, &str> = audiences
        .iter()
        .map(|audience| (audience.as_str(), "unsubscribed"))
        .collect();
    ensure!(member_statuses == expected, "optoutctl: members: {printed}");
    let records = printed
        .pointer("/salesforce/records")
        .and_then(Value::as_array)
        .context("optoutctl: no Salesforce records")?;
    ensure!(
        records.len() == 1
            && records[0].get("id").and_then(Value::as_str) == Some(contact_id)
            && records[0].get("opted_out").and_then(Value::as_bool) == Some(true),
        "optoutctl: records: {printed}"
    );
    let writes = printed
        .pointer("/salesforce/audit")
        .and_then(Value::as_array)
        .context("optoutctl: no audit trail")?;
    ensure!(
        writes.len() == 1
            && writes[0].get("record_id").and_then(Value::as_str) == Some(contact_id)
            && writes[0].get("new_value").and_then(Value::as_bool) == Some(true)
            && writes[0].get("trigger").and_then(Value::as_str) == Some(TRIGGER_MAILCHIMP),
        "optoutctl: audit: {printed}"
    );
    Ok(())
}
