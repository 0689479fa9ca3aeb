//! The writer's own PostgreSQL schema: the audit log and the Salesforce poll watermarks.

use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Executor, Row};

use crate::Result;
use crate::plan::{Change, SfObject};

/// Audit rows per INSERT statement.
const AUDIT_CHUNK: usize = 1000;

/// One audit row to insert.
#[derive(Clone, Debug)]
pub(crate) struct AuditEntry<'a> {
    pub(crate) change: &'a Change,
    pub(crate) trigger: &'static str,
    pub(crate) trace_id: Option<&'a str>,
}

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
        Ok(Self { pool })
    }

    /// Records successful writes.
    /// Takes the entries as they come, so a pass never holds them all at once.
    pub(crate) async fn insert_audit<'a>(
        &self,
        entries: impl IntoIterator<Item = AuditEntry<'a>> + Send,
    ) -> Result<()> {
        let mut entries = entries.into_iter().peekable();
        if entries.peek().is_none() {
            return Ok(());
        }
        // One transaction, so a crash never leaves part of a pass audited (a replay finds those
        // records written and would not audit them again); in chunks, so the statements' buffers
        // stay small whatever the size of the pass.
        let mut transaction = self.pool.begin().await?;
        loop {
            let chunk: Vec<AuditEntry<'a>> = entries.by_ref().take(AUDIT_CHUNK).collect();
            if chunk.is_empty() {
                break;
            }
            let mut emails = Vec::with_capacity(chunk.len());
            let mut objects = Vec::with_capacity(chunk.len());
            let mut record_ids = Vec::with_capacity(chunk.len());
            let mut olds = Vec::with_capacity(chunk.len());
            let mut news = Vec::with_capacity(chunk.len());
            let mut reasons = Vec::with_capacity(chunk.len());
            let mut triggers = Vec::with_capacity(chunk.len());
            let mut trace_ids: Vec<Option<&str>> = Vec::with_capacity(chunk.len());
            for entry in &chunk {
                emails.push(&*entry.change.email);
                objects.push(entry.change.object.name());
                record_ids.push(entry.change.id.as_str());
                olds.push(entry.change.old);
                news.push(entry.change.new);
                reasons.push(&*entry.change.reason);
                triggers.push(entry.trigger);
                trace_ids.push(entry.trace_id);
            }
            sqlx::query(
                "INSERT INTO audit_log (email, object, record_id, old_value, new_value, reason, \"trigger\", trace_id) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bool[], $5::bool[], $6::text[], $7::text[], $8::text[])",
            )
            .bind(emails)
            .bind(objects)
            .bind(record_ids)
            .bind(olds)
            .bind(news)
            .bind(reasons)
            .bind(triggers)
            .bind(trace_ids)
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(())
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
