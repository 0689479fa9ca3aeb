//! Integration tests of the fetcher against the in-process sandbox, a real RabbitMQ and a real PostgreSQL.

mod grpc;
mod helpers;
mod realtime;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chrono::Utc;
use helpers::{TestApp, count_members, eventually, wait_for_next_second};
use optout_fetcher::{RunStatus, SyncRequest, SyncSettings, store};
use optout_mailchimp::MemberStatus;
use optout_proto::queue::v1::{self as queue, Source};

#[tokio::test]
async fn first_sync_publishes_every_member_exactly_once_per_audience() -> Result<()> {
    let app = TestApp::start(11).await?;
    let fetcher = app.fetcher();
    let expected = app.all_members().await?;
    ensure!(
        expected.len() > 2000,
        "sandbox generated only {} members",
        expected.len()
    );

    let report = fetcher.sync_now(SyncRequest::default()).await?;
    assert_eq!(report.status, RunStatus::Succeeded, "{:?}", report.error);
    let messages = app.drain_members_changed().await?;
    let counts = count_members(&messages);

    let duplicates: Vec<_> = counts.iter().filter(|(_, count)| **count != 1).collect();
    assert!(
        duplicates.is_empty(),
        "members published more than once: {duplicates:?}"
    );
    let published: Vec<_> = counts.keys().cloned().collect();
    let wanted: Vec<_> = expected.keys().cloned().collect();
    assert_eq!(
        published, wanted,
        "published members differ from Mailchimp's"
    );
    assert_eq!(report.members_read, expected.len() as u64);
    assert_eq!(report.pages_published, messages.len() as u64);
    for message in &messages {
        assert_eq!(message.source, Source::Poll as i32);
        assert!(message.first_sync, "a first sync page must say so");
        assert_eq!(message.run_id, report.run_id);
        assert!(message.members.len() <= 300);
    }
    // Statuses come through as Mailchimp reported them.
    let unsubscribed = messages
        .iter()
        .flat_map(|message| message.members.iter())
        .filter(|member| member.status == queue::MemberStatus::Unsubscribed as i32)
        .count();
    let expected_unsubscribed = expected
        .values()
        .filter(|status| **status == MemberStatus::Unsubscribed)
        .count();
    assert_eq!(unsubscribed, expected_unsubscribed);

    for audience in app.audiences() {
        let row = store::audience(&app.pool, &audience)
            .await?
            .context("audience row")?;
        assert!(
            row.watermark.is_some() && row.first_sync_completed_at.is_some(),
            "{row:?}"
        );
    }
    let run = store::run(&app.pool, &report.run_id)
        .await?
        .context("run row")?;
    assert_eq!(run.status, "succeeded");
    assert_eq!(run.members_read, expected.len() as i64);
    app.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn later_syncs_publish_only_members_changed_since_the_last_one() -> Result<()> {
    let app = TestApp::start(12).await?;
    let fetcher = app.fetcher();
    let first = fetcher.sync_now(SyncRequest::default()).await?;
    assert_eq!(first.status, RunStatus::Succeeded, "{:?}", first.error);
    app.drain_members_changed().await?;

    // Nothing changed: nothing to publish, and the watermark still moves.
    let watermark_before = store::audience(&app.pool, &app.audiences()[0])
        .await?
        .and_then(|row| row.watermark);
    wait_for_next_second(Utc::now()).await?;
    let second = fetcher.sync_now(SyncRequest::default()).await?;
    assert_eq!(second.status, RunStatus::Succeeded, "{:?}", second.error);
    assert_eq!(second.members_read, 0);
    assert!(
        app.drain_members_changed().await?.is_empty(),
        "an unchanged account published pages"
    );
    let watermark_after = store::audience(&app.pool, &app.audiences()[0])
        .await?
        .and_then(|row| row.watermark);
    assert!(
        watermark_after > watermark_before,
        "{watermark_before:?} -> {watermark_after:?}"
    );

    // Unsubscribe some subscribed members: three through the sandbox (as the member would), two
    // through the API.
    let members = app.all_members().await?;
    let subscribed: Vec<(String, String)> = members
        .iter()
        .filter(|(_, status)| **status == MemberStatus::Subscribed)
        .map(|(key, _)| key.clone())
        .step_by(97)
        .take(5)
        .collect();
    ensure!(subscribed.len() == 5, "not enough subscribed members");
    let http = reqwest::Client::new();
    for (audience, email) in &subscribed[..3] {
        let url = format!(
            "{}/mailchimp/lists/{audience}/members/{email}/unsubscribe",
            app.sandbox.info().control_url.trim_end_matches('/'),
        );
        let response = http.post(url).send().await?;
        ensure!(
            response.status().is_success(),
            "control endpoint answered {}",
            response.status()
        );
    }
    for (audience, email) in &subscribed[3..] {
        app.client
            .update_member_status(audience, email, MemberStatus::Unsubscribed)
            .await?;
    }
    wait_for_next_second(Utc::now()).await?;

    let third = fetcher.sync_now(SyncRequest::default()).await?;
    assert_eq!(third.status, RunStatus::Succeeded, "{:?}", third.error);
    let messages = app.drain_members_changed().await?;
    let counts = count_members(&messages);
    let published: Vec<_> = counts.keys().cloned().collect();
    let mut wanted = subscribed.clone();
    wanted.sort();
    assert_eq!(published, wanted);
    assert!(counts.values().all(|count| *count == 1), "{counts:?}");
    for message in &messages {
        assert!(
            !message.first_sync,
            "after a completed first sync, pages are not first-sync pages"
        );
        for member in &message.members {
            assert_eq!(member.status, queue::MemberStatus::Unsubscribed as i32);
            assert!(member.last_changed.is_some());
        }
    }

    // A full sync re-reads everyone, still not as a first sync.
    let full = fetcher
        .sync_now(SyncRequest {
            full: true,
            ..SyncRequest::default()
        })
        .await?;
    assert_eq!(full.status, RunStatus::Succeeded, "{:?}", full.error);
    let messages = app.drain_members_changed().await?;
    assert_eq!(count_members(&messages).len(), members.len());
    assert!(messages.iter().all(|message| !message.first_sync));
    app.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn watermark_stays_when_publishing_fails() -> Result<()> {
    let app = TestApp::start(13).await?;
    // An exchange nobody declared: the broker closes the channel on the first publish.
    let mut missing = app.topology.clone();
    missing.exchange = format!("optout-missing-{}", app.unique);
    let broken = app.fetcher_with(missing, app.settings());
    let report = broken.sync_now(SyncRequest::default()).await?;
    assert_eq!(report.status, RunStatus::Failed);
    assert_eq!(report.pages_published, 0);
    for audience in app.audiences() {
        let row = store::audience(&app.pool, &audience)
            .await?
            .context("audience row")?;
        assert_eq!(
            row.watermark, None,
            "watermark moved without a confirmed publish"
        );
        assert_eq!(row.first_sync_completed_at, None);
    }
    let run = store::run(&app.pool, &report.run_id)
        .await?
        .context("run row")?;
    assert_eq!(run.status, "failed");
    assert!(run.error.as_deref().is_some_and(|error| !error.is_empty()));
    let counters = broken.counters().snapshot();
    assert_eq!(counters["run_errors"], 1);
    assert_eq!(counters["runs_finished"], 1);

    // The next run, with a working broker, re-reads everything as a first sync.
    let expected = app.all_members().await?;
    let report = app.fetcher().sync_now(SyncRequest::default()).await?;
    assert_eq!(report.status, RunStatus::Succeeded, "{:?}", report.error);
    let messages = app.drain_members_changed().await?;
    assert_eq!(count_members(&messages).len(), expected.len());
    assert!(messages.iter().all(|message| message.first_sync));
    app.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn skips_an_audience_whose_lease_another_replica_holds() -> Result<()> {
    let app = TestApp::start(14).await?;
    let audiences = app.audiences();
    let held = audiences[0].clone();
    let mut other_replica = app.pool.acquire().await?;
    let locked: bool = sqlx::query_scalar(
        "SELECT pg_try_advisory_lock(hashtext('fetcher:' || current_schema() || ':' || $1))",
    )
    .bind(&held)
    .fetch_one(&mut *other_replica)
    .await?;
    ensure!(locked, "could not take the lease");

    let report = app.fetcher().sync_now(SyncRequest::default()).await?;
    assert_eq!(report.status, RunStatus::Succeeded, "{:?}", report.error);
    assert_eq!(report.audiences_skipped, vec![held.clone()]);
    let messages = app.drain_members_changed().await?;
    assert!(messages.iter().all(|message| message.audience_id != held));
    assert_eq!(
        store::audience(&app.pool, &held)
            .await?
            .and_then(|row| row.watermark),
        None
    );
    assert!(
        store::audience(&app.pool, &audiences[1])
            .await?
            .and_then(|row| row.watermark)
            .is_some()
    );
    drop(other_replica);
    app.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn paused_fetcher_refuses_runs_and_a_run_stops_at_a_page_boundary() -> Result<()> {
    let app = TestApp::start(15).await?;
    // One audience at a time, small pages: the run is still paging when the pause lands.
    let settings = SyncSettings {
        page_size: 10,
        concurrency: 1,
        ..SyncSettings::default()
    };
    let fetcher = app.fetcher_with(app.topology.clone(), settings);
    let handle = fetcher.trigger(SyncRequest::default()).await?;
    let run_id = handle.run_id.clone();
    // A second trigger joins the run under way.
    assert_eq!(
        fetcher.trigger(SyncRequest::default()).await?.run_id,
        run_id
    );
    eventually(
        Duration::from_secs(20),
        "the first published page",
        || async { Ok(fetcher.counters().snapshot()["pages_published"] > 0) },
    )
    .await?;
    fetcher.pause();
    let report = handle.wait().await.context("run report")?;
    assert_eq!(report.status, RunStatus::Stopped, "{:?}", report.error);
    assert!(matches!(
        fetcher.trigger(SyncRequest::default()).await,
        Err(optout_fetcher::Error::Paused)
    ));
    for audience in app.audiences() {
        let row = store::audience(&app.pool, &audience).await?;
        assert!(
            row.is_none_or(|row| row.watermark.is_none()),
            "an unfinished audience moved its watermark"
        );
    }
    let published = app.drain_members_changed().await?;
    assert_eq!(published.len() as u64, report.pages_published);
    fetcher.resume();
    let report = fetcher
        .sync_now(SyncRequest {
            audience_ids: vec![app.audiences()[0].clone()],
            ..SyncRequest::default()
        })
        .await?;
    assert_eq!(report.status, RunStatus::Succeeded, "{:?}", report.error);
    assert_eq!(report.audiences_completed, vec![app.audiences()[0].clone()]);
    app.cleanup().await;
    Ok(())
}

#[tokio::test]
async fn members_changed_during_a_run_are_never_skipped() -> Result<()> {
    let app = TestApp::start(16).await?;
    let audience = app.audiences()[0].clone();
    // Small pages, one audience: the run takes many requests while members leave the listing.
    let settings = SyncSettings {
        page_size: 20,
        concurrency: 1,
        ..SyncSettings::default()
    };
    let fetcher = app.fetcher_with(app.topology.clone(), settings);
    let ordered: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(app.client.members(
        &audience,
        optout_mailchimp::MembersQuery {
            count: 1000,
            sort_field: Some("last_changed".to_owned()),
            sort_dir: Some("ASC".to_owned()),
            ..optout_mailchimp::MembersQuery::default()
        },
    ))
    .await?
    .into_iter()
    .flat_map(|page| page.members)
    .collect();
    let all: std::collections::BTreeSet<String> = ordered
        .iter()
        .map(|member| member.email_address.clone())
        .collect();

    let handle = fetcher
        .trigger(SyncRequest {
            audience_ids: vec![audience.clone()],
            ..SyncRequest::default()
        })
        .await?;
    // Change the earliest members first: they are in the already-read prefix, the case that
    // shifts unread members below the next offset.
    let mut changed = std::collections::BTreeSet::new();
    for member in ordered
        .iter()
        .filter(|member| member.status == MemberStatus::Subscribed)
    {
        if !fetcher.is_busy().await {
            break;
        }
        app.client
            .update_member_status(&audience, &member.email_address, MemberStatus::Unsubscribed)
            .await?;
        changed.insert(member.email_address.clone());
    }
    let report = handle.wait().await.context("run report")?;
    assert_eq!(report.status, RunStatus::Succeeded, "{:?}", report.error);
    ensure!(
        !changed.is_empty(),
        "the run ended before any member changed"
    );
    let published: std::collections::BTreeSet<String> = app
        .drain_members_changed()
        .await?
        .into_iter()
        .flat_map(|message| message.members.into_iter().map(|member| member.email))
        .collect();
    let skipped: Vec<_> = all
        .iter()
        .filter(|email| !changed.contains(*email) && !published.contains(*email))
        .collect();
    assert!(
        skipped.is_empty(),
        "{} unchanged members were skipped: {skipped:?}",
        skipped.len()
    );

    // The members that changed during the run are read by the next one, with their new status.
    wait_for_next_second(Utc::now()).await?;
    let next = fetcher
        .sync_now(SyncRequest {
            audience_ids: vec![audience.clone()],
            ..SyncRequest::default()
        })
        .await?;
    assert_eq!(next.status, RunStatus::Succeeded, "{:?}", next.error);
    let unsubscribed: std::collections::BTreeSet<String> = app
        .drain_members_changed()
        .await?
        .into_iter()
        .flat_map(|message| message.members.into_iter())
        .filter(|member| member.status == queue::MemberStatus::Unsubscribed as i32)
        .map(|member| member.email)
        .collect();
    let missing: Vec<_> = changed.difference(&unsubscribed).collect();
    assert!(
        missing.is_empty(),
        "opt-outs made during the run were lost: {missing:?}"
    );
    app.cleanup().await;
    Ok(())
}
