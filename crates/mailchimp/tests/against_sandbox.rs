//! The client against the sandbox's Mailchimp emulator, in process, over real HTTP.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use futures::TryStreamExt;
use optout_mailchimp::{
    BatchMember, BatchSubscribe, Error, MailchimpClient, MailchimpConfig, MemberStatus,
    MembersQuery, UpsertMember,
};
use optout_sandbox::shared::{Api, ApiFaults, FaultSettings};
use optout_sandbox::{Sandbox, SandboxConfig};

async fn sandbox(members: u64, audiences: u32) -> anyhow::Result<Sandbox> {
    let config = SandboxConfig {
        seed: 11,
        audiences,
        members,
        ..SandboxConfig::default()
    };
    Sandbox::start(config)
        .await
        .context("failed to start the sandbox")
}

fn client(sandbox: &Sandbox) -> anyhow::Result<MailchimpClient> {
    client_with_retries(sandbox, 5)
}

fn client_with_retries(sandbox: &Sandbox, max_retries: u32) -> anyhow::Result<MailchimpClient> {
    let info = sandbox.info();
    let mut config = MailchimpConfig::new(info.mailchimp_api_key.clone());
    config.base_url = Some(info.mailchimp_url.clone());
    config.max_retries = max_retries;
    config.timeout = Duration::from_secs(10);
    Ok(MailchimpClient::new(config)?)
}

/// The first member of `list_id` with `status`.
async fn first_with_status(
    client: &MailchimpClient,
    list_id: &str,
    status: MemberStatus,
) -> anyhow::Result<String> {
    let query = MembersQuery {
        count: 1,
        status: Some(status),
        ..MembersQuery::default()
    };
    let page = client.members_page(list_id, &query).await?;
    let member = page
        .members
        .into_iter()
        .next()
        .context("no member with that status")?;
    Ok(member.email_address)
}

#[tokio::test]
async fn pages_a_full_audience_through_the_stream() -> anyhow::Result<()> {
    let sandbox = sandbox(2500, 2).await?;
    let client = client(&sandbox)?;
    let audiences = client.lists().await?;
    assert_eq!(audiences.len(), 2);
    for audience in &audiences {
        let query = MembersQuery {
            count: 400,
            ..MembersQuery::default()
        };
        let pages: Vec<_> = client.members(&audience.id, query).try_collect().await?;
        let total = pages.first().map_or(0, |page| page.total_items);
        let ids: HashSet<String> = pages
            .iter()
            .flat_map(|page| page.members.iter().map(|m| m.id.clone()))
            .collect();
        assert!(pages.len() > 1, "expected several pages");
        assert_eq!(ids.len() as u64, total, "every member exactly once");
        assert!(
            pages
                .iter()
                .flat_map(|p| &p.members)
                .all(|m| m.list_id == audience.id && m.last_changed.is_some())
        );
        let subscribed = pages
            .iter()
            .flat_map(|page| &page.members)
            .filter(|member| member.status == MemberStatus::Subscribed)
            .count() as u64;
        assert_eq!(subscribed, audience.member_count);
    }
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn filters_members_changed_since_a_time() -> anyhow::Result<()> {
    let sandbox = sandbox(500, 1).await?;
    let client = client(&sandbox)?;
    let list_id = sandbox.info().audiences[0].clone();
    let email = first_with_status(&client, &list_id, MemberStatus::Subscribed).await?;
    let before_edit = Utc::now() - chrono::Duration::seconds(2);
    let updated = client
        .update_member_status(&list_id, &email, MemberStatus::Unsubscribed)
        .await?;
    assert_eq!(updated.status, MemberStatus::Unsubscribed);
    assert!(updated.last_changed.context("last_changed")? >= before_edit);
    let query = MembersQuery {
        since_last_changed: Some(before_edit),
        sort_field: Some("last_changed".to_owned()),
        sort_dir: Some("ASC".to_owned()),
        ..MembersQuery::default()
    };
    let page = client.members_page(&list_id, &query).await?;
    assert_eq!(page.total_items, 1);
    assert_eq!(page.members[0].email_address, email);
    let before = MembersQuery {
        before_last_changed: Some(before_edit),
        status: Some(MemberStatus::Unsubscribed),
        fields: Some("members.email_address,members.status,total_items".to_owned()),
        count: 1000,
        ..MembersQuery::default()
    };
    let page = client.members_page(&list_id, &before).await?;
    assert!(
        page.members
            .iter()
            .all(|member| member.email_address != email)
    );
    assert!(
        page.members.iter().all(|member| member.id.is_empty()),
        "projection applied"
    );
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn put_with_status_if_new_leaves_an_unsubscribed_member_unsubscribed() -> anyhow::Result<()> {
    let sandbox = sandbox(500, 1).await?;
    let client = client(&sandbox)?;
    let list_id = sandbox.info().audiences[0].clone();
    let email = first_with_status(&client, &list_id, MemberStatus::Unsubscribed).await?;
    let request = UpsertMember {
        email_address: email.to_uppercase(),
        status_if_new: MemberStatus::Subscribed,
        status: None,
        merge_fields: None,
    };
    let member = client.upsert_member(&list_id, &request).await?;
    assert_eq!(member.status, MemberStatus::Unsubscribed);
    let new_member = UpsertMember {
        email_address: "brand.new@example.com".to_owned(),
        status_if_new: MemberStatus::Unsubscribed,
        status: Some(MemberStatus::Unsubscribed),
        merge_fields: Some(serde_json::json!({"FNAME": "Brand"})),
    };
    let created = client.upsert_member(&list_id, &new_member).await?;
    assert_eq!(created.status, MemberStatus::Unsubscribed);
    assert_eq!(created.merge_fields["FNAME"], "Brand");
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn rejects_resubscribing_a_member_in_compliance_state() -> anyhow::Result<()> {
    let sandbox = sandbox(500, 1).await?;
    let client = client(&sandbox)?;
    let list_id = sandbox.info().audiences[0].clone();
    let email = first_with_status(&client, &list_id, MemberStatus::Unsubscribed).await?;
    let error = client
        .update_member_status(&list_id, &email, MemberStatus::Subscribed)
        .await
        .expect_err("compliance state must be refused");
    assert!(matches!(error, Error::ComplianceState { .. }), "{error:?}");
    assert!(!error.is_retryable());
    let pending = client
        .update_member_status(&list_id, &email, MemberStatus::Pending)
        .await?;
    assert_eq!(pending.status, MemberStatus::Pending);
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn reports_unknown_members_and_lists_as_not_found() -> anyhow::Result<()> {
    let sandbox = sandbox(100, 1).await?;
    let client = client(&sandbox)?;
    let list_id = sandbox.info().audiences[0].clone();
    let error = client
        .member(&list_id, "nobody@example.com")
        .await
        .expect_err("404");
    assert!(matches!(error, Error::NotFound { .. }), "{error:?}");
    let error = client
        .member("0000000000", "nobody@example.com")
        .await
        .expect_err("404");
    assert!(matches!(error, Error::NotFound { .. }), "{error:?}");
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn archives_and_batch_subscribes_with_per_member_errors() -> anyhow::Result<()> {
    let sandbox = sandbox(200, 1).await?;
    let client = client(&sandbox)?;
    let list_id = sandbox.info().audiences[0].clone();
    let existing = first_with_status(&client, &list_id, MemberStatus::Subscribed).await?;
    let request = BatchSubscribe {
        members: vec![
            BatchMember {
                email_address: existing.clone(),
                status: MemberStatus::Subscribed,
                merge_fields: None,
            },
            BatchMember {
                email_address: "batch.one@example.com".into(),
                status: MemberStatus::Subscribed,
                merge_fields: None,
            },
            BatchMember {
                email_address: "not-an-email".into(),
                status: MemberStatus::Subscribed,
                merge_fields: None,
            },
        ],
        update_existing: false,
    };
    let answer = client.batch_subscribe(&list_id, &request).await?;
    assert_eq!(answer.total_created, 1);
    assert_eq!(answer.error_count, 2);
    assert_eq!(answer.errors[0].error_code, "ERROR_CONTACT_EXISTS");
    assert_eq!(answer.errors[1].error_code, "ERROR_GENERIC");
    client
        .archive_member(&list_id, "batch.one@example.com")
        .await?;
    let archived = client.member(&list_id, "batch.one@example.com").await?;
    assert_eq!(archived.status, MemberStatus::Archived);
    let error = client
        .archive_member(&list_id, "batch.one@example.com")
        .await
        .expect_err("405");
    assert!(matches!(error, Error::Api { status: 405, .. }), "{error:?}");
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn retries_through_injected_429_and_503() -> anyhow::Result<()> {
    let sandbox = sandbox(300, 1).await?;
    // Ten retries make a spurious failure (0.3^11) practically impossible.
    let client = client_with_retries(&sandbox, 10)?;
    let list_id = sandbox.info().audiences[0].clone();
    sandbox.shared().faults.set(FaultSettings {
        mailchimp: ApiFaults {
            rate_429: 0.15,
            rate_503: 0.15,
            ..ApiFaults::default()
        },
        ..FaultSettings::default()
    });
    sandbox.shared().stats.reset();
    let logical_requests = 30;
    for _ in 0..logical_requests {
        let page = client
            .members_page(
                &list_id,
                &MembersQuery {
                    count: 5,
                    ..MembersQuery::default()
                },
            )
            .await?;
        assert_eq!(page.members.len(), 5);
    }
    let stats = sandbox.shared().stats.snapshot();
    let calls = stats.total_calls.get(&Api::Mailchimp).copied().unwrap_or(0);
    assert!(
        calls > logical_requests,
        "expected retries: {calls} calls for {logical_requests} requests"
    );
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn never_exceeds_ten_concurrent_connections() -> anyhow::Result<()> {
    let sandbox = sandbox(300, 1).await?;
    // No retries: a 429 from the connection limit would reach the caller.
    let client = client_with_retries(&sandbox, 0)?;
    let list_id = sandbox.info().audiences[0].clone();
    let email = first_with_status(&client, &list_id, MemberStatus::Subscribed).await?;
    sandbox.shared().faults.set(FaultSettings {
        mailchimp: ApiFaults {
            latency_ms: 50,
            ..ApiFaults::default()
        },
        ..FaultSettings::default()
    });
    let requests = (0..40).map(|_| client.member(&list_id, &email));
    let answers = futures::future::join_all(requests).await;
    for answer in answers {
        answer.context("a request failed")?;
    }
    let stats = sandbox.shared().stats.snapshot();
    assert_eq!(
        stats
            .rejected_over_limit
            .get(&Api::Mailchimp)
            .copied()
            .unwrap_or(0),
        0
    );
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn answers_a_burst_over_the_connection_limit_with_429() -> anyhow::Result<()> {
    let sandbox = sandbox(100, 1).await?;
    let info = sandbox.info().clone();
    sandbox.shared().faults.set(FaultSettings {
        mailchimp: ApiFaults {
            latency_ms: 300,
            ..ApiFaults::default()
        },
        ..FaultSettings::default()
    });
    let http = reqwest::Client::new();
    let url = format!("{}/lists", info.mailchimp_url);
    let requests = (0..15).map(|_| {
        http.get(&url)
            .basic_auth("user", Some(&info.mailchimp_api_key))
            .send()
    });
    let answers = futures::future::join_all(requests).await;
    let mut too_many = 0;
    for answer in answers {
        let response = answer?;
        if response.status() == reqwest::StatusCode::TOO_MANY_REQUESTS {
            too_many += 1;
            let body: serde_json::Value = response.json().await?;
            assert_eq!(body["title"], "Too Many Requests");
        }
    }
    assert!(
        too_many >= 5,
        "expected at least 5 of 15 refused, got {too_many}"
    );
    let stats = sandbox.shared().stats.snapshot();
    assert_eq!(
        stats
            .rejected_over_limit
            .get(&Api::Mailchimp)
            .copied()
            .unwrap_or(0),
        too_many
    );
    sandbox.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn reads_twenty_thousand_members_across_three_audiences() -> anyhow::Result<()> {
    let sandbox = sandbox(20_000, 3).await?;
    let client = client(&sandbox)?;
    let mut read = 0u64;
    for audience in client.lists().await? {
        let pages: Vec<_> = client
            .members(&audience.id, MembersQuery::default())
            .try_collect()
            .await?;
        read += pages
            .iter()
            .map(|page| page.members.len() as u64)
            .sum::<u64>();
    }
    assert_eq!(read, 20_000);
    sandbox.shutdown().await;
    Ok(())
}

/// Run by hand: `cargo test -p optout-mailchimp --release --test against_sandbox -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "reads one million members; run by hand to measure"]
async fn reads_one_million_members_in_full() -> anyhow::Result<()> {
    let started = Instant::now();
    let sandbox = sandbox(1_000_000, 3).await?;
    let generated = started.elapsed();
    let client = client(&sandbox)?;
    let reading = Instant::now();
    let mut read = 0u64;
    for audience in client.lists().await? {
        let pages: Vec<_> = client
            .members(&audience.id, MembersQuery::default())
            .try_collect()
            .await?;
        read += pages
            .iter()
            .map(|page| page.members.len() as u64)
            .sum::<u64>();
    }
    println!(
        "generated in {generated:?}, read {read} members in {:?}",
        reading.elapsed()
    );
    assert_eq!(read, 1_000_000);
    sandbox.shutdown().await;
    Ok(())
}
