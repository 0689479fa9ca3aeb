//! The writer's own PostgreSQL schema: the audit log, the Salesforce poll watermarks and the
//! write passes' staged rows (see [`crate::stage`]).

use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Executor, Row};

use crate::Result;
use crate::plan::SfObject;

/// One stored audit row.
#[derive(Clone, Debug)]
pub(crate) struct AuditRow {
    pub(crate) id: i64,
    pub(crate) email: String,
    pub(crate) object: String,
    pub(crate) record_id: String,
    pub(crate) old_value: bool,
    pub(crate) new_value: bool,
    pub(crate) reason: String,
    pub(crate) trigger: String,
    pub(crate) trace_id: Option<String>,
    pub(crate) written_at: DateTime<Utc>,
}

/// Handle on the writer's schema.
#[derive(Clone, Debug)]
pub(crate) struct Store {
    pool: PgPool,
}

impl Store {
    /// Connects, creates the schema if missing, pins `search_path` to it on every pooled
    /// connection, and runs the migrations (sqlx takes an advisory lock, so replicas may race).
    pub(crate) async fn connect(url: &secrecy::SecretString, schema: &str) -> Result<Self> {
        let search_path = format!("SET search_path TO \"{schema}\"");
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .after_connect(move |connection, _meta| {
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
                    sqlx::Connection::shrink_buffers(connection);
                    Ok(true)
                })
            })
            .connect(url.expose_secret())
            .await?;
        let create = format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"");
        if let Err(error) = pool.execute(AssertSqlSafe(create.clone())).await {
            // Two replicas creating the schema at once: one loses with a unique violation; the
            // schema exists either way, so a second attempt settles it.
            tracing::debug!(%error, "create schema raced, retrying");
            pool.execute(AssertSqlSafe(create)).await?;
        }
        sqlx::migrate!("./migrations").run(&pool).await?;
        let store = Self { pool };
        store.remove_stale_passes().await?;
        Ok(store)
    }

    /// The audit rows of `email`, oldest first, at most `limit`.
    pub(crate) async fn audit_trail(&self, email: &str, limit: i64) -> Result<Vec<AuditRow>> {
        let rows = sqlx::query(
            "SELECT id, email, object, record_id, old_value, new_value, reason, \"trigger\", trace_id, written_at \
             FROM audit_log WHERE email = $1 ORDER BY id LIMIT $2",
        )
        .bind(email)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(AuditRow {
                    id: row.try_get("id")?,
                    email: row.try_get("email")?,
                    object: row.try_get("object")?,
                    record_id: row.try_get("record_id")?,
                    old_value: row.try_get("old_value")?,
                    new_value: row.try_get("new_value")?,
                    reason: row.try_get("reason")?,
                    trigger: row.try_get("trigger")?,
                    trace_id: row.try_get("trace_id")?,
                    written_at: row.try_get("written_at")?,
                })
            })
            .collect()
    }

    /// The poll watermark of `object`, if one was stored.
    pub(crate) async fn watermark(&self, object: SfObject) -> Result<Option<DateTime<Utc>>> {
        let row = sqlx::query("SELECT watermark FROM sf_watermarks WHERE object = $1")
            .bind(object.name())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|row| row.try_get("watermark")).transpose()?)
    }

    /// Moves the watermark of `object` forward (never back: a late replica must not rewind it).
    pub(crate) async fn advance_watermark(
        &self,
        object: SfObject,
        watermark: DateTime<Utc>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO sf_watermarks (object, watermark) VALUES ($1, $2) \
             ON CONFLICT (object) DO UPDATE SET watermark = GREATEST(sf_watermarks.watermark, EXCLUDED.watermark)",
        )
        .bind(object.name())
        .bind(watermark)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Cheap liveness probe for health.
    pub(crate) async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// The pool (the writer's schema), for the automated opt-out's own statements.
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes the pool.
    pub(crate) async fn close(&self) {
        self.pool.close().await;
    }
}
