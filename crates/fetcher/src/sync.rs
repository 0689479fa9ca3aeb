//! The primary sync: pages every in-scope audience's members changed since its watermark, publishes
//! each page as one `MembersChanged` (waiting for the broker's confirm), and moves the watermark only
//! once every page of the audience is confirmed. One run at a time per process; a per-audience lease
//! keeps replicas from paging the same audience at once.
//!
//! A first sync is framed by `FirstSyncMarker`s on the same routing key, so that the evaluator can
//! hold the opt-outs it decides until every first-syncing audience has been read: the run announces
//! the audiences whose first sync has not completed, and each audience's first sync says when it
//! starts and, once every page is confirmed, how many pages it published (numbered from 1).
//!
//! Every run that published a page ends with a `SyncRunDone` counting them, so that the evaluator can
//! tell the writer when the run's last change is in (see `SyncRunDone` in `messages.proto`).

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use futures::{StreamExt, stream};
use lapin::types::FieldTable;
use optout_amqp::{MEMBERS_CHANGED_ROUTING_KEY, Publisher, Topology};
use optout_mailchimp::{MailchimpClient, Member, MemberStatus, MembersQuery};
use optout_proto::queue::v1::{
    self as queue, FirstSyncMarker, MemberSnapshot, MembersChanged, Source, SyncRunDone,
    first_sync_marker,
};
use optout_telemetry::SpanExt as _;
use sqlx::PgPool;
use tokio::sync::{Mutex, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, error, info, info_span, warn};

use crate::{
    Error, Result,
    pager::{Pager, Step},
    store::{self, AudienceLease},
};

/// Only what the evaluator needs: less JSON to move and parse per page.
const MEMBER_FIELDS: &str = "members.email_address,members.status,members.last_changed,total_items";

/// The proto full name carried in the AMQP `type` property.
const MEMBERS_CHANGED_TYPE: &str = "optout.queue.v1.MembersChanged";

/// How the sync behaves.
#[derive(Clone, Debug)]
pub struct SyncSettings {
    /// Audience ids in scope; empty means every audience of the account.
    pub audiences: Vec<String>,
    /// Members per page (1..=1000).
    pub page_size: u32,
    /// Subtracted from the watermark so members changed in the watermark's second are read again.
    pub overlap: Duration,
    /// Audiences paged at once (the Mailchimp client caps the connections itself).
    pub concurrency: usize,
    /// Time between scheduled runs; `None` runs only on demand.
    pub interval: Option<Duration>,
}

impl Default for SyncSettings {
    fn default() -> Self {
        Self {
            audiences: Vec::new(),
            page_size: 1000,
            overlap: Duration::from_secs(5),
            concurrency: 10,
            interval: None,
        }
    }
}

/// What a run is asked to do.
#[derive(Clone, Debug, Default)]
pub struct SyncRequest {
    /// Audiences to sync; empty means every audience in scope.
    pub audience_ids: Vec<String>,
    /// Ignore the watermarks and read every member again.
    pub full: bool,
    /// Accepted for the writer's sake; the fetcher publishes either way.
    pub dry_run: bool,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStatus {
    /// Every audience was paged and its watermark moved (audiences leased elsewhere are skipped).
    Succeeded,
    /// At least one audience failed; its watermark did not move.
    Failed,
    /// Paused or shut down at a page boundary; unfinished audiences kept their watermark.
    Stopped,
}

impl RunStatus {
    /// The value stored in `sync_runs.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }
}

/// The outcome of one run.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// The run id.
    pub run_id: String,
    /// How it ended.
    pub status: RunStatus,
    /// Members read from Mailchimp.
    pub members_read: u64,
    /// Pages published and confirmed.
    pub pages_published: u64,
    /// Audiences whose watermark moved.
    pub audiences_completed: Vec<String>,
    /// Audiences another replica was paging.
    pub audiences_skipped: Vec<String>,
    /// What went wrong, per audience, if anything.
    pub error: Option<String>,
}

/// A run started by [`Fetcher::trigger`].
#[derive(Debug)]
pub struct RunHandle {
    /// The run id.
    pub run_id: String,
    done: watch::Receiver<Option<Arc<RunReport>>>,
}

impl RunHandle {
    /// Waits for the run to end; `None` if its task died without a report.
    pub async fn wait(mut self) -> Option<Arc<RunReport>> {
        match self.done.wait_for(Option::is_some).await {
            Ok(report) => report.clone(),
            Err(_) => None,
        }
    }
}

/// Cumulative counters since start, reported by `GetStatus`.
#[derive(Debug, Default)]
pub struct Counters {
    members_read: AtomicU64,
    pages_published: AtomicU64,
    runs_finished: AtomicU64,
    run_errors: AtomicU64,
    audiences_skipped: AtomicU64,
}

impl Counters {
    /// The counters by their documented names.
    pub fn snapshot(&self) -> BTreeMap<String, i64> {
        let read = |counter: &AtomicU64| {
            i64::try_from(counter.load(Ordering::Relaxed)).unwrap_or(i64::MAX)
        };
        BTreeMap::from([
            ("members_read".to_owned(), read(&self.members_read)),
            ("pages_published".to_owned(), read(&self.pages_published)),
            ("runs_finished".to_owned(), read(&self.runs_finished)),
            ("run_errors".to_owned(), read(&self.run_errors)),
            (
                "audiences_skipped".to_owned(),
                read(&self.audiences_skipped),
            ),
        ])
    }
}

/// Per-run totals, updated by the audiences as they go.
#[derive(Debug, Default)]
struct RunProgress {
    members_read: AtomicU64,
    pages_published: AtomicU64,
}

enum AudienceOutcome {
    Completed,
    Skipped,
    Stopped,
}

#[derive(Clone, Debug)]
struct ActiveRun {
    run_id: String,
    done: watch::Receiver<Option<Arc<RunReport>>>,
}

impl ActiveRun {
    /// Not yet reported, and its task still alive (a panicked task drops the sender).
    fn is_running(&self) -> bool {
        self.done.borrow().is_none() && self.done.has_changed().is_ok()
    }
}

/// The last run started by this process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LastRun {
    /// Its id.
    pub run_id: String,
    /// Whether it has ended.
    pub finished: bool,
}

/// The sync engine: cheap to clone, shared by the scheduler and the Admin service.
#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    client: MailchimpClient,
    amqp: Arc<lapin::Connection>,
    topology: Topology,
    settings: SyncSettings,
    paused: watch::Sender<bool>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    active: Mutex<Option<ActiveRun>>,
    last_run: std::sync::Mutex<Option<LastRun>>,
    next_scheduled: std::sync::Mutex<Option<DateTime<Utc>>>,
    counters: Counters,
    started: Instant,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Fetcher")
            .field("topology", &self.inner.topology)
            .field("settings", &self.inner.settings)
            .field("paused", &*self.inner.paused.borrow())
            .finish_non_exhaustive()
    }
}

impl Fetcher {
    /// A fetcher over ready connections. `shutdown` stops runs at the next page boundary and ends the
    /// scheduler. The topology must already be declared.
    pub fn new(
        pool: PgPool,
        client: MailchimpClient,
        amqp: Arc<lapin::Connection>,
        topology: Topology,
        settings: SyncSettings,
        shutdown: CancellationToken,
    ) -> Self {
        let (paused, _) = watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                pool,
                client,
                amqp,
                topology,
                settings,
                paused,
                shutdown,
                tasks: TaskTracker::new(),
                active: Mutex::new(None),
                last_run: std::sync::Mutex::new(None),
                next_scheduled: std::sync::Mutex::new(None),
                counters: Counters::default(),
                started: Instant::now(),
            }),
        }
    }

    /// The database pool (the service's own schema).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The sync settings.
    pub fn settings(&self) -> &SyncSettings {
        &self.inner.settings
    }

    /// Cumulative counters.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Time since the fetcher was built.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// Whether scheduled and triggered syncs are suspended.
    pub fn is_paused(&self) -> bool {
        *self.inner.paused.borrow()
    }

    /// Suspends syncs; a run under way stops at its next page boundary.
    pub fn pause(&self) {
        self.inner.paused.send_replace(true);
        info!("fetcher paused");
    }

    /// Lets syncs run again.
    pub fn resume(&self) {
        self.inner.paused.send_replace(false);
        info!("fetcher resumed");
    }

    /// Whether a run is under way.
    pub async fn is_busy(&self) -> bool {
        self.inner
            .active
            .lock()
            .await
            .as_ref()
            .is_some_and(ActiveRun::is_running)
    }

    /// The last run this process started.
    pub fn last_run(&self) -> Option<LastRun> {
        lock(&self.inner.last_run).clone()
    }

    /// When the scheduler will next start a run, if scheduled syncs are on.
    pub fn next_scheduled(&self) -> Option<DateTime<Utc>> {
        *lock(&self.inner.next_scheduled)
    }

    /// Starts a run in the background, or returns the run under way.
    pub async fn trigger(&self, request: SyncRequest) -> Result<RunHandle> {
        if self.inner.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        if self.is_paused() {
            return Err(Error::Paused);
        }
        // Held across the insert so that two triggers cannot both start a run.
        let mut active = self.inner.active.lock().await;
        if let Some(run) = active.as_ref().filter(|run| run.is_running()) {
            info!(run_id = %run.run_id, "sync already under way");
            return Ok(RunHandle {
                run_id: run.run_id.clone(),
                done: run.done.clone(),
            });
        }
        let run_id = uuid::Uuid::new_v4().to_string();
        // Mailchimp compares at whole seconds; a whole-second watermark is exactly what was asked for.
        let now = Utc::now();
        let run_start = now.duration_trunc(TimeDelta::seconds(1)).unwrap_or(now);
        store::insert_run(&self.inner.pool, &run_id, run_start).await?;
        let (done_sender, done) = watch::channel(None);
        *active = Some(ActiveRun {
            run_id: run_id.clone(),
            done: done.clone(),
        });
        *lock(&self.inner.last_run) = Some(LastRun {
            run_id: run_id.clone(),
            finished: false,
        });
        drop(active);
        if request.dry_run {
            info!(%run_id, "dry run requested: the fetcher publishes as usual, consumers apply dry-run semantics");
        }
        let fetcher = self.clone();
        // One primary sync run is one trace: a root span, linked to whatever triggered it (an admin RPC,
        // or nothing for the scheduler), so every page, message and write of the run shares its trace id.
        let trigger = optout_telemetry::remote_span_context(&tracing::Span::current().context());
        let span = info_span!(
            parent: None,
            "sync_run",
            otel.name = "sync run",
            %run_id,
            full = request.full
        );
        if let Some(trigger) = trigger {
            span.add_link(trigger);
        }
        let task_run_id = run_id.clone();
        self.inner.tasks.spawn(
            async move {
                let report = fetcher.execute(task_run_id, run_start, request).await;
                fetcher.record_end(&report).await;
                done_sender.send_replace(Some(Arc::new(report)));
            }
            .instrument(span),
        );
        Ok(RunHandle { run_id, done })
    }

    /// Starts a run (or joins the one under way) and waits for its report.
    pub async fn sync_now(&self, request: SyncRequest) -> Result<Arc<RunReport>> {
        let handle = self.trigger(request).await?;
        let run_id = handle.run_id.clone();
        handle.wait().await.ok_or(Error::RunLost { run_id })
    }

    /// Runs scheduled syncs until shutdown; returns at once when syncs run only on demand.
    pub async fn schedule(&self) {
        let Some(interval) = self.inner.settings.interval else {
            return;
        };
        let retry_delay = interval.min(Duration::from_secs(60));
        let mut due = match self.last_successful_run_start().await {
            Ok(Some(started)) => started + to_delta(interval),
            Ok(None) => Utc::now(),
            Err(error) => {
                warn!(error = %error.chain(), "failed to read the last run; syncing now");
                Utc::now()
            }
        };
        let mut paused = self.inner.paused.subscribe();
        loop {
            *lock(&self.inner.next_scheduled) = Some(due);
            let wait = (due - Utc::now()).to_std().unwrap_or_default();
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.inner.shutdown.cancelled() => return,
            }
            // A paused fetcher runs no scheduled syncs; the missed one runs on resume.
            tokio::select! {
                resumed = paused.wait_for(|paused| !paused) => if resumed.is_err() { return },
                () = self.inner.shutdown.cancelled() => return,
            }
            let started = Utc::now();
            let succeeded = match self.trigger(SyncRequest::default()).await {
                Ok(handle) => handle
                    .wait()
                    .await
                    .is_some_and(|report| report.status == RunStatus::Succeeded),
                Err(error) => {
                    warn!(error = %error.chain(), "failed to start scheduled sync");
                    false
                }
            };
            due = if succeeded {
                started + to_delta(interval)
            } else {
                Utc::now() + to_delta(retry_delay)
            };
        }
    }

    /// Waits for the run under way and the scheduler to finish (after shutdown was signalled).
    pub async fn drain(&self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    /// Spawns the scheduler on the fetcher's task tracker.
    pub fn spawn_scheduler(&self) {
        let fetcher = self.clone();
        self.inner
            .tasks
            .spawn(async move { fetcher.schedule().await });
    }

    async fn last_successful_run_start(&self) -> Result<Option<DateTime<Utc>>> {
        let started =
            sqlx::query_scalar("SELECT max(started_at) FROM sync_runs WHERE status = 'succeeded'")
                .fetch_one(&self.inner.pool)
                .await?;
        Ok(started)
    }

    async fn record_end(&self, report: &RunReport) {
        let counters = &self.inner.counters;
        counters.runs_finished.fetch_add(1, Ordering::Relaxed);
        if report.status == RunStatus::Failed {
            counters.run_errors.fetch_add(1, Ordering::Relaxed);
        }
        let stored = store::finish_run(
            &self.inner.pool,
            &report.run_id,
            report.status.as_str(),
            report.members_read,
            report.pages_published,
            report.error.as_deref(),
        )
        .await;
        if let Err(error) = stored {
            error!(run_id = %report.run_id, error = %error.chain(), "failed to record the end of a sync run");
        }
        if let Some(last) = lock(&self.inner.last_run)
            .as_mut()
            .filter(|last| last.run_id == report.run_id)
        {
            last.finished = true;
        }
        match report.status {
            RunStatus::Failed => warn!(
                members_read = report.members_read,
                pages_published = report.pages_published,
                error = report.error.as_deref().unwrap_or_default(),
                "sync run failed"
            ),
            status => info!(
                status = status.as_str(),
                members_read = report.members_read,
                pages_published = report.pages_published,
                audiences = report.audiences_completed.len(),
                skipped = report.audiences_skipped.len(),
                "sync run ended"
            ),
        }
    }

    async fn execute(
        &self,
        run_id: String,
        run_start: DateTime<Utc>,
        request: SyncRequest,
    ) -> RunReport {
        let progress = RunProgress::default();
        let mut report = RunReport {
            run_id: run_id.clone(),
            status: RunStatus::Succeeded,
            members_read: 0,
            pages_published: 0,
            audiences_completed: Vec::new(),
            audiences_skipped: Vec::new(),
            error: None,
        };
        let mut errors = Vec::new();
        match self
            .execute_audiences(&run_id, run_start, &request, &progress)
            .await
        {
            Ok(outcomes) => {
                let mut stopped = false;
                for (audience_id, outcome) in outcomes {
                    match outcome {
                        Ok(AudienceOutcome::Completed) => {
                            report.audiences_completed.push(audience_id)
                        }
                        Ok(AudienceOutcome::Skipped) => report.audiences_skipped.push(audience_id),
                        Ok(AudienceOutcome::Stopped) => stopped = true,
                        Err(error) => {
                            warn!(%audience_id, error = %error.chain(), "audience sync failed; its watermark stays");
                            errors.push(format!("audience {audience_id}: {}", error.chain()));
                        }
                    }
                }
                if stopped {
                    report.status = RunStatus::Stopped;
                }
            }
            Err(error) => errors.push(error),
        }
        if !errors.is_empty() {
            report.status = RunStatus::Failed;
            report.error = Some(errors.join("; "));
        }
        report.members_read = progress.members_read.load(Ordering::Relaxed);
        report.pages_published = progress.pages_published.load(Ordering::Relaxed);
        report
    }

    /// Resolves the audiences and syncs them; an `Err` is a run-level failure as text.
    async fn execute_audiences(
        &self,
        run_id: &str,
        run_start: DateTime<Utc>,
        request: &SyncRequest,
        progress: &RunProgress,
    ) -> std::result::Result<Vec<(String, Result<AudienceOutcome>)>, String> {
        let publisher = Publisher::new(&self.inner.amqp, self.inner.topology.clone())
            .await
            .map_err(|error| {
                format!("failed to open a publisher: {}", Error::from(error).chain())
            })?;
        let lists =
            self.inner.client.lists().await.map_err(|error| {
                format!("failed to list audiences: {}", Error::from(error).chain())
            })?;
        let known: Vec<String> = lists.into_iter().map(|audience| audience.id).collect();
        let (audience_ids, unknown) = select_audiences(
            &known,
            &self.inner.settings.audiences,
            &request.audience_ids,
        );
        let mut outcomes: Vec<(String, Result<AudienceOutcome>)> = unknown
            .into_iter()
            .map(|audience_id| {
                let error = Error::Config(format!(
                    "audience {audience_id} is not in scope or does not exist"
                ));
                (audience_id, Err(error))
            })
            .collect();
        info!(audiences = audience_ids.len(), %run_start, "sync run started");
        // Every audience in scope, not only those of a narrowed run: a person's membership in an
        // audience not yet read is unknown whichever run will read it.
        let (in_scope, _) = select_audiences(&known, &self.inner.settings.audiences, &[]);
        self.announce_first_syncs(&publisher, run_id, run_start, &in_scope)
            .await
            .map_err(|error| {
                format!(
                    "failed to announce the audiences' first syncs: {}",
                    error.chain()
                )
            })?;
        let publisher = &publisher;
        let synced: Vec<_> = stream::iter(audience_ids)
            .map(|audience_id| async move {
                let span = info_span!("sync_audience", %audience_id);
                let outcome = self
                    .sync_audience(
                        run_id,
                        &audience_id,
                        run_start,
                        request.full,
                        publisher,
                        progress,
                    )
                    .instrument(span)
                    .await;
                (audience_id, outcome)
            })
            .buffer_unordered(self.inner.settings.concurrency.max(1))
            .collect()
            .await;
        outcomes.extend(synced);
        // Also after a failed or stopped audience: what was published is complete all the same.
        let pages = progress.pages_published.load(Ordering::Relaxed);
        if pages > 0 {
            let done = SyncRunDone {
                run_id: run_id.to_owned(),
                pages: u32::try_from(pages).unwrap_or(u32::MAX),
            };
            // Only a hint that lets the writer start early: the run's pages are safe without it.
            if let Err(error) = publisher.publish(MEMBERS_CHANGED_ROUTING_KEY, &done).await {
                warn!(error = %Error::from(error).chain(), "failed to publish the end of the run");
            }
        }
        Ok(outcomes)
    }

    /// Tells the evaluator which audiences in scope have not completed their first sync, before any
    /// page of the run: opt-outs decided from first-sync pages are held until each of them has sent
    /// its `Done` marker and every page it counted was applied.
    async fn announce_first_syncs(
        &self,
        publisher: &Publisher,
        run_id: &str,
        run_start: DateTime<Utc>,
        audience_ids: &[String],
    ) -> Result<()> {
        let pending = store::first_sync_pending(&self.inner.pool, audience_ids).await?;
        if pending.is_empty() {
            return Ok(());
        }
        info!(audiences = ?pending, "announcing first syncs");
        let announced = first_sync_marker::Marker::Announced(first_sync_marker::Announced {
            audience_ids: pending,
        });
        publish_marker(publisher, run_id, run_start, announced).await
    }

    async fn sync_audience(
        &self,
        run_id: &str,
        audience_id: &str,
        run_start: DateTime<Utc>,
        full: bool,
        publisher: &Publisher,
        progress: &RunProgress,
    ) -> Result<AudienceOutcome> {
        let Some(mut lease) = AudienceLease::try_acquire(&self.inner.pool, audience_id).await?
        else {
            info!("audience is being synced by another replica; skipping it this run");
            self.inner
                .counters
                .audiences_skipped
                .fetch_add(1, Ordering::Relaxed);
            return Ok(AudienceOutcome::Skipped);
        };
        let outcome = self
            .page_audience(
                &mut lease,
                run_id,
                audience_id,
                run_start,
                full,
                publisher,
                progress,
            )
            .await;
        lease.release().await;
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    async fn page_audience(
        &self,
        lease: &mut AudienceLease,
        run_id: &str,
        audience_id: &str,
        run_start: DateTime<Utc>,
        full: bool,
        publisher: &Publisher,
        progress: &RunProgress,
    ) -> Result<AudienceOutcome> {
        // Read after taking the lease, so a replica's just-finished sync is seen.
        let row = store::start_audience(lease.connection(), audience_id).await?;
        let first_sync = row.first_sync_completed_at.is_none();
        if first_sync {
            let started = first_sync_marker::Marker::Started(first_sync_marker::Started {
                audience_id: audience_id.to_owned(),
            });
            publish_marker(publisher, run_id, run_start, started).await?;
        }
        let mut pages_published: u32 = 0;
        let since = if full {
            None
        } else {
            row.watermark
                .map(|watermark| watermark - to_delta(self.inner.settings.overlap))
        };
        let page_size = self.inner.settings.page_size;
        let mut pager = Pager::new(page_size);
        let mut requests = 0_u64;
        let mut max_requests = None;
        loop {
            if self.should_stop() {
                info!(
                    requests,
                    "sync stopped at a page boundary; the watermark stays"
                );
                return Ok(AudienceOutcome::Stopped);
            }
            let offset = pager.offset();
            let query = MembersQuery {
                count: page_size,
                offset: u32::try_from(offset).unwrap_or(u32::MAX),
                status: None,
                since_last_changed: since,
                before_last_changed: Some(run_start),
                sort_field: Some("last_changed".to_owned()),
                sort_dir: Some("ASC".to_owned()),
                fields: Some(MEMBER_FIELDS.to_owned()),
            };
            // Abandoning a page read is harmless; a publish under way is always awaited.
            let page = tokio::select! {
                page = self.inner.client.members_page(audience_id, &query) => page?,
                () = self.inner.shutdown.cancelled() => return Ok(AudienceOutcome::Stopped),
            };
            requests += 1;
            let limit = *max_requests.get_or_insert_with(|| pager.max_requests(page.total_items));
            if requests > limit {
                return Err(Error::PagingDiverged {
                    audience_id: audience_id.to_owned(),
                    requests,
                });
            }
            let page_len = page.members.len() as u64;
            if !page.members.is_empty() {
                pages_published += 1;
                let message = MembersChanged {
                    audience_id: audience_id.to_owned(),
                    source: Source::Poll as i32,
                    members: page.members.iter().map(snapshot).collect(),
                    first_sync,
                    run_id: run_id.to_owned(),
                    page: pages_published,
                };
                publisher
                    .publish_typed(
                        MEMBERS_CHANGED_ROUTING_KEY,
                        MEMBERS_CHANGED_TYPE,
                        &message,
                        FieldTable::default(),
                    )
                    .await?;
                let counters = &self.inner.counters;
                counters.members_read.fetch_add(page_len, Ordering::Relaxed);
                counters.pages_published.fetch_add(1, Ordering::Relaxed);
                progress.members_read.fetch_add(page_len, Ordering::Relaxed);
                progress.pages_published.fetch_add(1, Ordering::Relaxed);
            }
            match pager.record(offset, page_len, page.total_items) {
                Step::Done => break,
                Step::Next(_) => {}
            }
        }
        if first_sync {
            // Before the first sync is recorded complete: should this fail, the next run announces
            // the audience again and pages it from the start.
            let done = first_sync_marker::Marker::Done(first_sync_marker::Done {
                audience_id: audience_id.to_owned(),
                pages: pages_published,
            });
            publish_marker(publisher, run_id, run_start, done).await?;
        }
        store::complete_audience(lease.connection(), audience_id, run_start).await?;
        info!(requests, %run_start, "audience synced; watermark moved");
        Ok(AudienceOutcome::Completed)
    }

    fn should_stop(&self) -> bool {
        self.is_paused() || self.inner.shutdown.is_cancelled()
    }
}

/// Publishes a `FirstSyncMarker` of the run on `members.changed` and waits for the confirm.
async fn publish_marker(
    publisher: &Publisher,
    run_id: &str,
    run_start: DateTime<Utc>,
    marker: first_sync_marker::Marker,
) -> Result<()> {
    let message = FirstSyncMarker {
        run_id: run_id.to_owned(),
        run_started_at: Some(timestamp(run_start)),
        marker: Some(marker),
    };
    // The AMQP type (`optout.queue.v1.FirstSyncMarker`) is how the evaluator tells it from a page.
    publisher
        .publish(MEMBERS_CHANGED_ROUTING_KEY, &message)
        .await?;
    Ok(())
}

/// Picks the audiences of a run: those of the account (`known`) within the configured `scope` (all
/// when empty), narrowed to `requested` when given. Returns them and the requested ids that are
/// unknown or out of scope.
pub fn select_audiences(
    known: &[String],
    scope: &[String],
    requested: &[String],
) -> (Vec<String>, Vec<String>) {
    let in_scope = |id: &String| scope.is_empty() || scope.contains(id);
    if requested.is_empty() {
        for missing in scope.iter().filter(|id| !known.contains(id)) {
            warn!(audience_id = %missing, "configured audience does not exist in the account");
        }
        return (
            known.iter().filter(|id| in_scope(id)).cloned().collect(),
            Vec::new(),
        );
    }
    let mut selected = Vec::new();
    let mut unknown = Vec::new();
    for id in requested {
        if selected.contains(id) || unknown.contains(id) {
            continue;
        }
        if known.contains(id) && in_scope(id) {
            selected.push(id.clone());
        } else {
            unknown.push(id.clone());
        }
    }
    (selected, unknown)
}

fn snapshot(member: &Member) -> MemberSnapshot {
    MemberSnapshot {
        email: member.email_address.clone(),
        status: status_to_proto(member.status) as i32,
        last_changed: member.last_changed.map(timestamp),
    }
}

/// Maps Mailchimp's status onto the queue enum.
pub fn status_to_proto(status: MemberStatus) -> queue::MemberStatus {
    match status {
        MemberStatus::Subscribed => queue::MemberStatus::Subscribed,
        MemberStatus::Unsubscribed => queue::MemberStatus::Unsubscribed,
        MemberStatus::Cleaned => queue::MemberStatus::Cleaned,
        MemberStatus::Pending => queue::MemberStatus::Pending,
        MemberStatus::Transactional => queue::MemberStatus::Transactional,
        MemberStatus::Archived => queue::MemberStatus::Archived,
    }
}

/// A protobuf timestamp of `time`.
pub fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

fn to_delta(duration: Duration) -> TimeDelta {
    TimeDelta::from_std(duration).unwrap_or(TimeDelta::MAX)
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these small locks leaves consistent data behind.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(values: &[&str]) -> Vec<String> {
        values.iter().map(|value| (*value).to_owned()).collect()
    }

    #[test]
    fn selects_every_known_audience_when_nothing_is_configured() {
        let (selected, unknown) = select_audiences(&ids(&["a", "b"]), &[], &[]);
        assert_eq!(selected, ids(&["a", "b"]));
        assert!(unknown.is_empty());
    }

    #[test]
    fn keeps_only_configured_audiences_in_scope() {
        let (selected, _) = select_audiences(&ids(&["a", "b", "c"]), &ids(&["c", "a", "z"]), &[]);
        assert_eq!(selected, ids(&["a", "c"]));
    }

    #[test]
    fn reports_requested_audiences_that_are_out_of_scope_or_unknown() {
        let (selected, unknown) =
            select_audiences(&ids(&["a", "b"]), &ids(&["a"]), &ids(&["a", "b", "x", "a"]));
        assert_eq!(selected, ids(&["a"]));
        assert_eq!(unknown, ids(&["b", "x"]));
    }

    #[test]
    fn maps_every_mailchimp_status_to_its_queue_status() {
        assert_eq!(
            status_to_proto(MemberStatus::Unsubscribed),
            queue::MemberStatus::Unsubscribed
        );
        assert_eq!(
            status_to_proto(MemberStatus::Archived),
            queue::MemberStatus::Archived
        );
        assert_eq!(
            status_to_proto(MemberStatus::Subscribed),
            queue::MemberStatus::Subscribed
        );
    }
}
