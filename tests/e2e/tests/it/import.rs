//! `optoutctl import`: the real binary asks the fetcher to create subscribers from Salesforce
//! records. New addresses become subscribed members; existing members (unsubscribed, cleaned,
//! archived) keep their status; a record with Email Opt Out checked is skipped unless
//! `--include-opted-out`; an address Mailchimp refuses is a failure with its reason.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use optout_e2e::{Stack, StackConfig};
use serde_json::Value;

/// Runs `optoutctl import ... --json` against the stack's fetcher; returns the report (after a
/// successful exit).
async fn optoutctl_import(
    stack: &Stack,
    audience: &str,
    soql: &str,
    extra: &[&str],
) -> Result<Value> {
    let fetcher = stack
        .endpoints()
        .fetcher
        .first()
        .cloned()
        .context("no fetcher")?;
    let mut args = vec![
        "--fetcher",
        &fetcher,
        "--token",
        stack.admin_token(),
        "import",
        "--audience",
        audience,
        "--soql",
        soql,
        "--json",
    ];
    args.extend_from_slice(extra);
    let mut tool = stack.spawn_tool("optoutctl", &args).await?;
    let report = tool.announcement().clone();
    let exit = tokio::time::timeout(Duration::from_secs(60), tool.wait())
        .await
        .context("optoutctl import did not exit")??;
    ensure!(
        exit.success(),
        "optoutctl import exited with {exit}:\n{}",
        tool.stderr_tail()
    );
    Ok(report)
}

fn count(report: &Value, key: &str) -> u64 {
    report[key].as_u64().unwrap_or(u64::MAX)
}

/// The member's status in one audience, `None` when the address is not a member.
async fn status_in(stack: &Stack, audience: &str, email: &str) -> Result<Option<String>> {
    let members = stack.mailchimp_members(email).await?;
    Ok(members
        .iter()
        .find(|member| member["list_id"].as_str() == Some(audience))
        .and_then(|member| member["status"].as_str())
        .map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_creates_new_subscribers_and_never_changes_an_existing_status() -> Result<()> {
    let stack = Stack::start(StackConfig {
        audiences: 2,
        members: 20,
        ..StackConfig::default()
    })
    .await?;
    let audience = stack.audiences()[0].clone();
    // Every address of this test carries the tag, so the query selects exactly these records.
    let tag = format!("imp{:06x}", fastrand::u32(..0x00ff_ffff));
    let address = |label: &str| format!("{label}.{tag}@e2e.example.com");
    let new = [address("new1"), address("new2")];
    let existing = [
        (address("unsub"), "unsubscribed"),
        (address("bounced"), "cleaned"),
        (address("archived"), "archived"),
    ];
    let opted_out = address("optedout");
    // Salesforce takes this address; Mailchimp refuses it (the domain starts with a dot).
    let invalid = format!("bad.{tag}@.e2e.example.com");

    for (email, status) in &existing {
        stack.add_subscriber(&audience, email).await?;
        match *status {
            "unsubscribed" => stack.unsubscribe(&audience, email).await?,
            "cleaned" => stack.bounce(&audience, email).await?,
            _ => {
                stack.mailchimp().archive_member(&audience, email).await?;
                stack.note_mailchimp_change();
            }
        }
        ensure!(
            status_in(&stack, &audience, email).await?.as_deref() == Some(*status),
            "setup: {email} should be {status} in {audience}"
        );
    }
    for email in new.iter().chain(existing.iter().map(|(email, _)| email)) {
        stack.create_contact(email, false).await?;
    }
    stack.create_contact(&opted_out, true).await?;
    stack.create_contact(&invalid, false).await?;

    let soql = format!(
        "SELECT Id, Email, HasOptedOutOfEmail, FirstName, LastName FROM Contact WHERE Email LIKE '%.{tag}@%'"
    );
    let report = optoutctl_import(&stack, &audience, &soql, &[]).await?;
    println!("import report: {report}");
    ensure!(
        count(&report, "records_read") == 7
            && count(&report, "created") == 2
            && count(&report, "unchanged") == 3
            && count(&report, "skipped") == 1
            && count(&report, "failed") == 1,
        "expected 7 read = 2 created + 3 unchanged + 1 skipped + 1 failed: {report}"
    );
    ensure!(
        report["skipped_reasons"]["email opt out checked"].as_u64() == Some(1),
        "the skip should be for the opt-out: {report}"
    );
    let failures = report["failures"].as_array().cloned().unwrap_or_default();
    ensure!(
        failures.len() == 1
            && failures[0]["email"].as_str() == Some(invalid.as_str())
            && failures[0]["reason"]
                .as_str()
                .is_some_and(|reason| reason.matches("looks fake or invalid").count() == 1),
        "the failure should name {invalid} and Mailchimp's reason: {report}"
    );

    for email in &new {
        let status = status_in(&stack, &audience, email).await?;
        ensure!(
            status.as_deref() == Some("subscribed"),
            "{email} should be a new subscriber, is {status:?}"
        );
    }
    for (email, before) in &existing {
        let status = status_in(&stack, &audience, email).await?;
        ensure!(
            status.as_deref() == Some(*before),
            "{email} was {before} and must stay so, is {status:?}"
        );
    }
    for email in [&opted_out, &invalid] {
        let status = status_in(&stack, &audience, email).await?;
        ensure!(status.is_none(), "{email} must not be added, is {status:?}");
    }
    // The other audience was not touched.
    let other = &stack.audiences()[1];
    for email in &new {
        ensure!(
            status_in(&stack, other, email).await?.is_none(),
            "{email} must not reach {other}"
        );
    }

    // Leads, with --include-opted-out: the checked record is imported too.
    let lead_new = address("lead");
    let lead_opted_out = address("leadoptedout");
    stack.create_lead(&lead_new, false).await?;
    stack.create_lead(&lead_opted_out, true).await?;
    let soql =
        format!("SELECT Id, Email, HasOptedOutOfEmail FROM Lead WHERE Email LIKE '%.{tag}@%'");
    let report = optoutctl_import(&stack, &audience, &soql, &["--include-opted-out"]).await?;
    println!("lead import report: {report}");
    ensure!(
        count(&report, "records_read") == 2
            && count(&report, "created") == 2
            && count(&report, "skipped") == 0
            && count(&report, "failed") == 0,
        "expected both Leads created: {report}"
    );
    for email in [&lead_new, &lead_opted_out] {
        let status = status_in(&stack, &audience, email).await?;
        ensure!(
            status.as_deref() == Some("subscribed"),
            "{email} should be subscribed, is {status:?}"
        );
    }

    // A refused token is named as such, with a failing exit code.
    let program = optout_cli::children::find_binary(stack.bin_dir(), "optoutctl")?;
    let fetcher = stack
        .endpoints()
        .fetcher
        .first()
        .cloned()
        .context("no fetcher")?;
    let output = tokio::process::Command::new(program)
        .args(["--fetcher", &fetcher, "--token", "not-the-token", "import"])
        .args(["--audience", &audience, "--soql", &soql])
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(!output.status.success(), "a refused token must fail");
    ensure!(
        stderr.contains("the admin token was refused by fetcher"),
        "unclear error for a refused token: {stderr}"
    );
    stack.shutdown().await
}
