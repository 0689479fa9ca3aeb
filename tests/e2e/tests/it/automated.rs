//! Automated opt-out (`OPTOUT_AUTO_OPTOUT`): checking Email Opt Out in Salesforce unsubscribes the
//! person in every audience in scope through the fetcher's Memberships API, with an audit entry per
//! audience; the pipeline then checks the person's other records. Off by default.

use std::collections::BTreeSet;

use anyhow::{Context as _, Result, ensure};
use optout_e2e::{Role, Stack, StackConfig};
use serde_json::json;

use crate::support::{self, expect_record};

const TRIGGER: &str = "salesforce-auto-optout";

/// A person subscribed in every audience with an unchecked Contact and Lead; the Contact's box is
/// checked in Salesforce, then a sync runs (fetcher run + the writer's poll cycle). Returns the
/// email, the Contact id and the Lead id.
async fn check_the_box(stack: &mut Stack) -> Result<(String, String, String)> {
    let email = support::email("auto");
    for audience in stack.audiences() {
        stack.add_subscriber(audience, &email).await?;
    }
    let contact = stack.create_contact(&email, false).await?;
    let lead = stack.create_lead(&email, false).await?;
    stack.sync_and_wait().await?;
    for audience in stack.audiences() {
        ensure!(
            status_in(stack, audience, &email).await?.as_deref() == Some("subscribed"),
            "setup: {email} should be subscribed in {audience}"
        );
    }
    stack
        .edit_record("Contact", &contact, json!({ "HasOptedOutOfEmail": true }))
        .await?;
    let summary = stack.sync_and_wait().await?;
    println!("sync after checking the box:\n{summary}");
    Ok((email, contact, lead))
}

async fn status_in(stack: &Stack, audience: &str, email: &str) -> Result<Option<String>> {
    let members = stack.mailchimp_members(email).await?;
    Ok(members
        .iter()
        .find(|member| member["list_id"].as_str() == Some(audience))
        .and_then(|member| member["status"].as_str())
        .map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checking_the_box_unsubscribes_in_every_audience_in_scope() -> Result<()> {
    let mut stack = Stack::start(StackConfig {
        audiences: 3,
        members: 30,
        auto_optout: true,
        ..StackConfig::default()
    })
    .await?;
    let (email, contact, lead) = check_the_box(&mut stack).await?;

    let audiences: BTreeSet<String> = stack.audiences().iter().cloned().collect();
    ensure!(audiences.len() == 3, "three audiences: {audiences:?}");
    for audience in &audiences {
        let status = status_in(&stack, audience, &email).await?;
        ensure!(
            status.as_deref() == Some("unsubscribed"),
            "{email} should be unsubscribed in {audience}, is {status:?}\n{}",
            support::explain(&stack, &email).await
        );
    }

    let fleet = stack.fleet().await?;
    let writer = fleet.first(Role::Writer).context("no writer")?;
    let trail = writer.audit_trail(&email, 0).await?;
    let automated: Vec<_> = trail
        .iter()
        .filter(|entry| entry.trigger == TRIGGER)
        .collect();
    let unsubscribed_from: BTreeSet<String> = automated
        .iter()
        .map(|entry| entry.record_id.clone())
        .collect();
    ensure!(
        automated.len() == 3 && unsubscribed_from == audiences,
        "one {TRIGGER} audit entry per audience expected, got {automated:#?}"
    );
    for entry in &automated {
        ensure!(
            entry.object == "MailchimpMember"
                && !entry.old_value
                && entry.new_value
                && entry.reason.contains(&contact),
            "audit entry should name the Contact {contact}: {entry:?}"
        );
    }
    // Unsubscribed everywhere, so the pipeline checks the person's Lead as well.
    expect_record(&stack, &email, &lead, true, "the Lead follows the opt-out").await?;
    ensure!(
        trail
            .iter()
            .any(|entry| entry.record_id == lead && entry.new_value && entry.trigger != TRIGGER),
        "the Lead's write should be audited by the pipeline: {trail:#?}"
    );
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_flag_checking_the_box_leaves_mailchimp_alone() -> Result<()> {
    let mut stack = Stack::start(StackConfig {
        audiences: 3,
        members: 30,
        ..StackConfig::default()
    })
    .await?;
    let (email, contact, lead) = check_the_box(&mut stack).await?;
    for audience in stack.audiences() {
        let status = status_in(&stack, audience, &email).await?;
        ensure!(
            status.as_deref() == Some("subscribed"),
            "without --auto-optout {email} must stay subscribed in {audience}, is {status:?}"
        );
    }
    expect_record(&stack, &email, &contact, true, "the checked Contact stays").await?;
    expect_record(&stack, &email, &lead, false, "nothing checks the Lead").await?;
    let fleet = stack.fleet().await?;
    let writer = fleet.first(Role::Writer).context("no writer")?;
    let trail = writer.audit_trail(&email, 0).await?;
    ensure!(trail.is_empty(), "nothing should be written: {trail:#?}");
    stack.shutdown().await
}
