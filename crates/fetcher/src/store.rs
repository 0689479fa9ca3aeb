//! PostgreSQL state: the fetcher's own schema, audience watermarks, run history and the per-audience
//! lease (a session advisory lock) that keeps two replicas from paging one audience at once.

use chrono::{DateTime, Utc};
use sqlx::{
    AssertSqlSafe, Connection, Executor, PgConnection, PgPool, Postgres, Row, pool::PoolConnection,
    postgres::PgPoolOptions,
};
use tracing::warn;

use crate::{Result, config::is_identifier};

/// Opens a pool whose connections all use `schema` (created if missing) and applies the migrations.
pub async fn connect(url: &str, schema: &str, max_connections: u32) -> Result<PgPool> {
    if !is_identifier(schema) {
        return Err(crate::Error::Config(format!(
            "invalid database schema {schema:?}"
        )));
    }
    create_schema(url, schema).await?;
    let search_path = format!("SET search_path TO {schema}");
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .after_connect(move |connection, _metadata| {
            let statement = search_path.clone();
            Box::pin(async move {
                connection.execute(AssertSqlSafe(statement)).await?;
                Ok(())
            })
        })
        // A connection's buffers keep the size of the largest statement or result it carried
        // (a batch's upsert, a page of rows: hundreds of KiB), so a pool would hold that much
        // for each connection it ever used at once, more of them the longer a sync ran; shrunk
        // as each goes back to the pool, only the statements running hold them.
        .after_release(|connection, _metadata| {
            Box::pin(async move {
                connection.shrink_buffers();
                Ok(true)
            })
        })
        .connect(url)
        .await?;
    sqlx::migrate!("./migrations").run(&pool).await?;
    Ok(pool)
}

/// Creates `schema` under a transaction-scoped advisory lock: `CREATE SCHEMA IF NOT EXISTS` from two
/// replicas at once can still fail on the catalog's unique index.
async fn create_schema(url: &str, schema: &str) -> Result<()> {
    let mut connection = PgConnection::connect(url).await?;
    let mut transaction = connection.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('optout-schema:' || $1))")
        .bind(schema)
        .execute(&mut *transaction)
        .await?;
    transaction
        .execute(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}"
        )))
        .await?;
    transaction.commit().await?;
    connection.close().await?;
    Ok(())
}

/// An audience's stored sync progress.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AudienceRow {
    /// The Mailchimp list id.
    pub audience_id: String,
    /// Start of the last run that published every page of the audience.
    pub watermark: Option<DateTime<Utc>>,
    /// When the first complete sync finished.
    pub first_sync_completed_at: Option<DateTime<Utc>>,
    /// When the latest sync of the audience started paging.
    pub last_sync_started_at: Option<DateTime<Utc>>,
    /// When the latest complete sync of the audience finished.
    pub last_sync_finished_at: Option<DateTime<Utc>>,
}

fn audience_from_row(row: &sqlx::postgres::PgRow) -> Result<AudienceRow> {
    Ok(AudienceRow {
        audience_id: row.try_get("audience_id")?,
        watermark: row.try_get("watermark")?,
        first_sync_completed_at: row.try_get("first_sync_completed_at")?,
        last_sync_started_at: row.try_get("last_sync_started_at")?,
        last_sync_finished_at: row.try_get("last_sync_finished_at")?,
    })
}

/// Every audience the fetcher has started syncing.
pub async fn audiences(pool: &PgPool) -> Result<Vec<AudienceRow>> {
    let rows = sqlx::query(
        "SELECT audience_id, watermark, first_sync_completed_at, last_sync_started_at, last_sync_finished_at \
         FROM audience_watermarks ORDER BY audience_id",
    )
    .fetch_all(pool)
    .await?;
    rows.iter().map(audience_from_row).collect()
}

/// One audience's progress, `None` before its first sync started.
pub async fn audience(pool: &PgPool, audience_id: &str) -> Result<Option<AudienceRow>> {
    let row = sqlx::query(
        "SELECT audience_id, watermark, first_sync_completed_at, last_sync_started_at, last_sync_finished_at \
         FROM audience_watermarks WHERE audience_id = $1",
    )
    .bind(audience_id)
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(audience_from_row).transpose()
}

/// Those of `audience_ids` whose first sync has not completed (never started, or started and not
/// finished), in the order given.
pub(crate) async fn first_sync_pending(
    pool: &PgPool,
    audience_ids: &[String],
) -> Result<Vec<String>> {
    let completed: Vec<String> = sqlx::query_scalar(
        "SELECT audience_id FROM audience_watermarks \
         WHERE audience_id = ANY($1) AND first_sync_completed_at IS NOT NULL",
    )
    .bind(audience_ids)
    .fetch_all(pool)
    .await?;
    Ok(audience_ids
        .iter()
        .filter(|audience_id| !completed.contains(audience_id))
        .cloned()
        .collect())
}

/// Records that paging of `audience_id` starts now and returns its progress as of now.
pub(crate) async fn start_audience(
    connection: &mut PgConnection,
    audience_id: &str,
) -> Result<AudienceRow> {
    let row = sqlx::query(
        "INSERT INTO audience_watermarks (audience_id, last_sync_started_at) VALUES ($1, now()) \
         ON CONFLICT (audience_id) DO UPDATE SET last_sync_started_at = now() \
         RETURNING audience_id, watermark, first_sync_completed_at, last_sync_started_at, last_sync_finished_at",
    )
    .bind(audience_id)
    .fetch_one(&mut *connection)
    .await?;
    audience_from_row(&row)
}

/// Moves the watermark once every page up to `run_start` is confirmed, in one statement. Never moves
/// it back: a replica's newer run may have finished the audience meanwhile, and both are complete.
pub(crate) async fn complete_audience(
    connection: &mut PgConnection,
    audience_id: &str,
    run_start: DateTime<Utc>,
) -> Result<()> {
    sqlx::query(
        "UPDATE audience_watermarks SET \
           watermark = GREATEST(COALESCE(watermark, $2), $2), \
           first_sync_completed_at = COALESCE(first_sync_completed_at, now()), \
           last_sync_finished_at = now() \
         WHERE audience_id = $1",
    )
    .bind(audience_id)
    .bind(run_start)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// A run's final record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRow {
    /// The run id.
    pub run_id: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended, `None` while running (or if the process died).
    pub finished_at: Option<DateTime<Utc>>,
    /// `running`, `succeeded`, `failed` or `stopped`.
    pub status: String,
    /// Members read from Mailchimp.
    pub members_read: i64,
    /// Pages published and confirmed.
    pub pages_published: i64,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

pub(crate) async fn insert_run(
    pool: &PgPool,
    run_id: &str,
    started_at: DateTime<Utc>,
) -> Result<()> {
    sqlx::query("INSERT INTO sync_runs (run_id, started_at, status) VALUES ($1, $2, 'running')")
        .bind(run_id)
        .bind(started_at)
        .execute(pool)
        .await?;
    Ok(())
}

pub(crate) async fn finish_run(
    pool: &PgPool,
    run_id: &str,
    status: &str,
    members_read: u64,
    pages_published: u64,
    error: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "UPDATE sync_runs SET finished_at = now(), status = $2, members_read = $3, pages_published = $4, error = $5 \
         WHERE run_id = $1",
    )
    .bind(run_id)
    .bind(status)
    .bind(i64::try_from(members_read).unwrap_or(i64::MAX))
    .bind(i64::try_from(pages_published).unwrap_or(i64::MAX))
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// One run's record, `None` if unknown.
pub async fn run(pool: &PgPool, run_id: &str) -> Result<Option<RunRow>> {
    let row = sqlx::query(
        "SELECT run_id, started_at, finished_at, status, members_read, pages_published, error \
         FROM sync_runs WHERE run_id = $1",
    )
    .bind(run_id)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(RunRow {
        run_id: row.try_get("run_id")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        status: row.try_get("status")?,
        members_read: row.try_get("members_read")?,
        pages_published: row.try_get("pages_published")?,
        error: row.try_get("error")?,
    }))
}

/// A session advisory lock on one audience, held on a dedicated pooled connection for as long as
/// the audience is paged. Advisory locks are database-wide, so the key carries the schema
/// (`current_schema()`, set by the pool's search path): replicas of one deployment share it, while
/// deployments or test stacks in other schemas never block each other. If it is dropped without [`AudienceLease::release`] (an error path, a
/// cancelled task), the connection is closed instead of returned, which releases the lock.
#[derive(Debug)]
pub(crate) struct AudienceLease {
    connection: Option<PoolConnection<Postgres>>,
    audience_id: String,
}

impl AudienceLease {
    /// Tries to take the lease; `None` when another session holds it.
    pub(crate) async fn try_acquire(pool: &PgPool, audience_id: &str) -> Result<Option<Self>> {
        let mut connection = pool.acquire().await?;
        let acquired: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_lock(hashtext('fetcher:' || current_schema() || ':' || $1))",
        )
        .bind(audience_id)
        .fetch_one(&mut *connection)
        .await?;
        Ok(acquired.then(|| Self {
            connection: Some(connection),
            audience_id: audience_id.to_owned(),
        }))
    }

    /// The connection holding the lock, for the audience's own statements.
    pub(crate) fn connection(&mut self) -> &mut PgConnection {
        // Only `release` and `drop` take the connection out, and both consume the lease.
        self.connection
            .as_deref_mut()
            .expect("lease connection present until release")
    }

    /// Unlocks and returns the connection to the pool.
    pub(crate) async fn release(mut self) {
        let Some(mut connection) = self.connection.take() else {
            return;
        };
        let unlocked = sqlx::query_scalar::<_, bool>(
            "SELECT pg_advisory_unlock(hashtext('fetcher:' || current_schema() || ':' || $1))",
        )
        .bind(&self.audience_id)
        .fetch_one(&mut *connection)
        .await;
        if !matches!(unlocked, Ok(true)) {
            warn!(audience_id = %self.audience_id, "failed to unlock audience lease; closing its connection");
            connection.close_on_drop();
        }
    }
}

impl Drop for AudienceLease {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.as_mut() {
            connection.close_on_drop();
        }
    }
}
