//! Integration tests of the fetcher against the in-process sandbox, a real RabbitMQ and a real PostgreSQL.

mod grpc;
mod helpers;
mod realtime;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use chrono::Utc;
use helpers::{Published, TestApp, count_members, eventually, wait_for_next_second};
use optout_fetcher::{RunStatus, SyncRequest, SyncSettings, store};
use optout_mailchimp::MemberStatus;
use optout_proto::queue::v1::{self as queue, Source, first_sync_marker::Marker};

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
    let published = app.drain_published().await?;
    assert_first_sync_is_framed_by_markers(&published, &app.audiences(), &report.run_id)?;
    let messages: Vec<_> = published
        .into_iter()
        .filter_map(|published| match published {
            Published::Members(message) => Some(message),
            Published::Marker(_) | Published::RunDone(_) => None,
        })
        .collect();
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

/// The run announces every audience before any page; each audience's first sync starts before its
/// first page, numbers its pages 1..N and ends with a done marker counting N after its last page.
fn assert_first_sync_is_framed_by_markers(
    published: &[Published],
    audiences: &[String],
    run_id: &str,
) -> Result<()> {
    let Some(Published::Marker(announcement)) = published.first() else {
        anyhow::bail!("the run did not start with an announcement: {published:?}");
    };
    let Some(Marker::Announced(announced)) = &announcement.marker else {
        anyhow::bail!("the first marker is not an announcement: {announcement:?}");
    };
    let mut announced = announced.audience_ids.clone();
    announced.sort();
    let mut wanted = audiences.to_vec();
    wanted.sort();
    assert_eq!(announced, wanted, "announced audiences");
    for audience in audiences {
        // Positions of this audience's messages after the announcement.
        let mut started = Vec::new();
        let mut done = Vec::new();
        let mut pages = Vec::new();
        for (position, message) in published.iter().enumerate().skip(1) {
            match message {
                Published::Members(page) if &page.audience_id == audience => {
                    assert_eq!(page.run_id, run_id);
                    pages.push((position, page.page));
                }
                Published::Marker(marker) => {
                    assert_eq!(marker.run_id, run_id);
                    assert!(marker.run_started_at.is_some(), "{marker:?}");
                    match &marker.marker {
                        Some(Marker::Started(started_marker))
                            if &started_marker.audience_id == audience =>
                        {
                            started.push(position);
                        }
                        Some(Marker::Done(done_marker)) if &done_marker.audience_id == audience => {
                            done.push((position, done_marker.pages));
                        }
                        Some(Marker::Announced(_)) => {
                            anyhow::bail!("a second announcement in one run: {marker:?}")
                        }
                        _ => {}
                    }
                }
                Published::Members(_) => {}
                Published::RunDone(_) => {}
            }
        }
        assert_eq!(started.len(), 1, "{audience}: one started marker");
        assert_eq!(done.len(), 1, "{audience}: one done marker");
        let (started, (done, counted)) = (started[0], done[0]);
        let numbers: Vec<u32> = pages.iter().map(|(_, page)| *page).collect();
        let expected: Vec<u32> = (1..=u32::try_from(pages.len())?).collect();
        assert_eq!(
            numbers, expected,
            "{audience}: pages numbered 1..N in order"
        );
        assert_eq!(
            counted as usize,
            pages.len(),
            "{audience}: done counts its pages"
        );
        ensure!(!pages.is_empty(), "{audience}: no pages");
        assert!(
            pages
                .iter()
                .all(|(position, _)| started < *position && *position < done),
            "{audience}: pages between started ({started}) and done ({done}): {pages:?}"
        );
    }
    // The run ends, after its last page, by counting every page it published.
    let pages = published
        .iter()
        .filter(|message| matches!(message, Published::Members(_)))
        .count();
    let Some(Published::RunDone(end)) = published.last() else {
        anyhow::bail!("the run did not end with SyncRunDone: {published:?}");
    };
    assert_eq!(end.run_id, run_id);
    assert_eq!(
        end.pages as usize, pages,
        "SyncRunDone counts the run's pages"
    );
    let ends = published
        .iter()
        .filter(|message| matches!(message, Published::RunDone(_)))
        .count();
    assert_eq!(ends, 1, "one SyncRunDone per run");
    Ok(())
}

#[tokio::test]
async fn later_syncs_publish_only_members_changed_since_the_last_one() -> Result<()> {
    let app = TestApp::start(12).await?;
    let fetcher = app.fetcher();
    let first = fetcher.sync_now(SyncRequest::default()).await?;
    assert_eq!(first.status, RunStatus::Succeeded, "{:?}", first.error);
    app.drain_members_changed().await?;

    // Nothing changed: nothing to publish (no first-sync marker either: every first sync is
    // complete), and the watermark still moves.
    let watermark_before = store::audience(&app.pool, &app.audiences()[0])
        .await?
        .and_then(|row| row.watermark);
    wait_for_next_second(Utc::now()).await?;
    let second = fetcher.sync_now(SyncRequest::default()).await?;
    assert_eq!(second.status, RunStatus::Succeeded, "{:?}", second.error);
    assert_eq!(second.members_read, 0);
    let published = app.drain_published().await?;
    assert!(
        published.is_empty(),
        "an unchanged account published pages or markers: {published:?}"
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
    // The first publish is the announcement of the first syncs: it fails before any audience starts.
    assert!(
        report
            .error
            .as_deref()
            .is_some_and(|error| error.contains("announce")),
        "{:?}",
        report.error
    );
    for audience in app.audiences() {
        let row = store::audience(&app.pool, &audience).await?;
        assert!(
            row.is_none_or(|row| row.watermark.is_none() && row.first_sync_completed_at.is_none()),
            "watermark moved without a confirmed publish"
        );
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
    // The stopped first sync starts again from its first page in the new run, and the run
    // announces every audience in scope whose first sync is unfinished, not only its own.
    let published = app.drain_published().await?;
    let markers: Vec<_> = published
        .iter()
        .filter_map(|published| match published {
            Published::Marker(marker) => Some(marker),
            Published::Members(_) | Published::RunDone(_) => None,
        })
        .collect();
    assert!(markers.iter().all(|marker| marker.run_id == report.run_id));
    let mut kinds: Vec<_> = markers.iter().map(|marker| marker.marker.clone()).collect();
    if let Some(Some(Marker::Announced(announcement))) = kinds.first_mut() {
        announcement.audience_ids.sort();
    }
    let mut announced = app.audiences();
    announced.sort();
    let audience = app.audiences()[0].clone();
    let pages = u32::try_from(report.pages_published)?;
    assert_eq!(
        kinds,
        vec![
            Some(Marker::Announced(queue::first_sync_marker::Announced {
                audience_ids: announced
            })),
            Some(Marker::Started(queue::first_sync_marker::Started {
                audience_id: audience.clone()
            })),
            Some(Marker::Done(queue::first_sync_marker::Done {
                audience_id: audience,
                pages
            })),
        ]
    );
    let numbers: Vec<u32> = published
        .iter()
        .filter_map(|published| match published {
            Published::Members(page) => Some(page.page),
            Published::Marker(_) | Published::RunDone(_) => None,
        })
        .collect();
    assert_eq!(numbers, (1..=pages).collect::<Vec<_>>());
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
