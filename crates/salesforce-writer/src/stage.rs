//! A write pass's working set in PostgreSQL (`pass_emails`, `pass_changes`): the emails handed
//! in, the records to change and how each write ended. A pass reads them back a page at a time,
//! so what it holds in memory stays a few pages whatever the size of the burst it writes, while
//! it still writes the whole burst in one Bulk job per object.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::Result;
use crate::plan::{Change, SfObject};
use crate::store::Store;

/// Most bytes of bound values in one statement (estimated). sqlx grows a connection's write
/// buffer to the largest message it sends: with statements of 2,000 emails those buffers held
/// 1.7 MB at the writer's heap peak. Small statements were first needed for time: sqlx 0.9.0 left Nagle's algorithm on, and a
/// message that left in two writes had its second part held until PostgreSQL acknowledged the
/// first, 40 ms later (a statement of 250 staged changes took 44 ms, the same rows in statements
/// of 40 took 4 ms in all); 0.9.1 sets `TCP_NODELAY` again.
const STATEMENT_BYTES: usize = 12 * 1024;

/// What PostgreSQL's binary array encoding adds to each value: its length.
const VALUE_OVERHEAD: usize = 4;

/// Where the first page starts: every email, object name and record id sorts after it (they
/// are never empty). A plain lower bound, unlike an optional one, lets PostgreSQL read each page
/// as one range of the index.
const FIRST: &str = "";

/// Staged rows older than this belong to a pass whose process died before it ended (a live
/// pass lasts seconds, a Bulk job minutes); the next writer to start removes them.
const STALE_AFTER_SECS: i64 = 3600;

/// One write pass's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PassId(i64);

/// How the write of one staged change ended, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Outcome<'a> {
    /// `written`, `converted`, `retry` or `failed`; `None` while unsettled.
    pub(crate) outcome: Option<&'a str>,
    pub(crate) status_code: Option<&'a str>,
    pub(crate) message: Option<&'a str>,
}

/// One staged change with how its write ended.
#[derive(Clone, Debug)]
pub(crate) struct StagedChange {
    pub(crate) change: Change,
    pub(crate) outcome: Option<String>,
    pub(crate) status_code: Option<String>,
    pub(crate) message: Option<String>,
}

/// Which staged changes a page holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Which {
    /// Every change.
    All,
    /// Changes no write has settled yet.
    Unsettled,
    /// Changes unsettled or still failing transiently: the ones to retry.
    Retry,
    /// Changes written.
    Written,
    /// Changes not written, whatever the reason.
    NotWritten,
}

impl Which {
    fn condition(self) -> &'static str {
        match self {
            Which::All => "TRUE",
            Which::Unsettled => "outcome IS NULL",
            Which::Retry => "(outcome IS NULL OR outcome = 'retry')",
            Which::Written => "outcome = 'written'",
            Which::NotWritten => "outcome IS DISTINCT FROM 'written'",
        }
    }
}

impl Store {
    /// Removes the rows of passes whose process died before ending them.
    pub(crate) async fn remove_stale_passes(&self) -> Result<()> {
        for statement in [
            "DELETE FROM pass_emails WHERE staged_at < now() - make_interval(secs => $1)",
            "DELETE FROM pass_changes WHERE staged_at < now() - make_interval(secs => $1)",
        ] {
            sqlx::query(statement)
                .bind(STALE_AFTER_SECS as f64)
                .execute(self.pool())
                .await?;
        }
        Ok(())
    }

    /// A new pass, unique among every replica.
    pub(crate) async fn begin_pass(&self) -> Result<PassId> {
        let id: i64 = sqlx::query_scalar("SELECT nextval('write_pass_ids')")
            .fetch_one(self.pool())
            .await?;
        Ok(PassId(id))
    }

    /// Removes the rows of `passes` (a pass and the batches merged into it), in one statement
    /// per table.
    pub(crate) async fn end_passes(&self, passes: &[PassId]) -> Result<()> {
        let passes: Vec<i64> = passes.iter().map(|pass| pass.0).collect();
        for statement in [
            "DELETE FROM pass_emails WHERE pass = ANY($1)",
            "DELETE FROM pass_changes WHERE pass = ANY($1)",
        ] {
            sqlx::query(statement)
                .bind(&passes)
                .execute(self.pool())
                .await?;
        }
        Ok(())
    }

    /// Adds `emails` (normalised) to the pass, each with the trace id of the message that
    /// carried it (`trace_ids`, in the same order); an email already staged keeps its first trace.
    pub(crate) async fn stage_emails(
        &self,
        pass: PassId,
        emails: &[(&str, Option<&str>)],
    ) -> Result<()> {
        let size = |(email, trace_id): &(&str, Option<&str>)| {
            email.len() + trace_id.map_or(0, str::len) + 2 * VALUE_OVERHEAD
        };
        for chunk in sized_chunks(emails, size) {
            let (emails, trace_ids): (Vec<&str>, Vec<Option<&str>>) = chunk.iter().copied().unzip();
            sqlx::query(
                "INSERT INTO pass_emails (pass, email, trace_id) \
                 SELECT $1, * FROM UNNEST($2::text[], $3::text[]) ON CONFLICT DO NOTHING",
            )
            .bind(pass.0)
            .bind(emails)
            .bind(trace_ids)
            .execute(self.pool())
            .await?;
        }
        Ok(())
    }

    /// Stages the emails of `batches` (staged apart as they came) in `pass`: an email in several
    /// keeps the trace of the first batch that holds it. The batches' own rows stay until ended.
    pub(crate) async fn merge_batches(&self, pass: PassId, batches: &[PassId]) -> Result<()> {
        let batches: Vec<i64> = batches.iter().map(|batch| batch.0).collect();
        sqlx::query(
            "INSERT INTO pass_emails (pass, email, trace_id) \
             SELECT $1, email, trace_id FROM pass_emails WHERE pass = ANY($2) \
             ORDER BY array_position($2, pass) ON CONFLICT DO NOTHING",
        )
        .bind(pass.0)
        .bind(batches)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Up to `limit` staged emails after `after`, in order, each with its trace id.
    pub(crate) async fn staged_emails(
        &self,
        pass: PassId,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Option<Arc<str>>)>> {
        let rows = sqlx::query(
            "SELECT email, trace_id FROM pass_emails \
             WHERE pass = $1 AND email > $2 ORDER BY email LIMIT $3",
        )
        .bind(pass.0)
        .bind(after.unwrap_or(FIRST))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await?;
        // One message's emails share its trace id: keep one copy of it per page.
        let mut last: Option<Arc<str>> = None;
        rows.iter()
            .map(|row| {
                let email: String = row.try_get("email")?;
                let trace_id: Option<String> = row.try_get("trace_id")?;
                let trace_id = trace_id.map(|id| match &last {
                    Some(shared) if **shared == *id => Arc::clone(shared),
                    _ => {
                        let shared: Arc<str> = Arc::from(id);
                        last = Some(Arc::clone(&shared));
                        shared
                    }
                });
                Ok((email, trace_id))
            })
            .collect()
    }

    /// Stages the records to change; a record staged already is kept as it was.
    pub(crate) async fn stage_changes(&self, pass: PassId, changes: &[Change]) -> Result<()> {
        let size = |change: &Change| {
            change.object.name().len()
                + change.id.len()
                + change.email.len()
                + change.reason.len()
                + change.trace_id.as_deref().map_or(0, str::len)
                + 2 * size_of::<bool>()
                + size_of::<i64>()
                + size_of::<i64>()
                + 9 * VALUE_OVERHEAD
        };
        for chunk in sized_chunks(changes, size) {
            let mut objects = Vec::with_capacity(chunk.len());
            let mut record_ids = Vec::with_capacity(chunk.len());
            let mut emails = Vec::with_capacity(chunk.len());
            let mut olds = Vec::with_capacity(chunk.len());
            let mut news = Vec::with_capacity(chunk.len());
            let mut reasons = Vec::with_capacity(chunk.len());
            let mut versions = Vec::with_capacity(chunk.len());
            let mut opted_out_ats = Vec::with_capacity(chunk.len());
            let mut trace_ids: Vec<Option<&str>> = Vec::with_capacity(chunk.len());
            for change in chunk {
                objects.push(change.object.name());
                record_ids.push(change.id.as_str());
                emails.push(&*change.email);
                olds.push(change.old);
                news.push(change.new);
                reasons.push(&*change.reason);
                versions.push(change.version);
                opted_out_ats.push(change.opted_out_at);
                trace_ids.push(change.trace_id.as_deref());
            }
            sqlx::query(
                "INSERT INTO pass_changes (pass, object, record_id, email, old_value, new_value, \
                 reason, version, opted_out_at, trace_id) \
                 SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::bool[], \
                 $6::bool[], $7::text[], $8::int8[], $9::timestamptz[], $10::text[]) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(pass.0)
            .bind(objects)
            .bind(record_ids)
            .bind(emails)
            .bind(olds)
            .bind(news)
            .bind(reasons)
            .bind(versions)
            .bind(opted_out_ats)
            .bind(trace_ids)
            .execute(self.pool())
            .await?;
        }
        Ok(())
    }

    /// The number of staged changes of each object that has any.
    pub(crate) async fn staged_counts(&self, pass: PassId) -> Result<Vec<(SfObject, usize)>> {
        let rows = sqlx::query(
            "SELECT object, count(*) AS changes FROM pass_changes WHERE pass = $1 \
             GROUP BY object ORDER BY object",
        )
        .bind(pass.0)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                let changes: i64 = row.try_get("changes")?;
                Ok((
                    object_of(row)?,
                    usize::try_from(changes).unwrap_or_default(),
                ))
            })
            .collect()
    }

    /// When the oldest opt-out among the staged changes became effective in Mailchimp.
    pub(crate) async fn oldest_opt_out(&self, pass: PassId) -> Result<Option<DateTime<Utc>>> {
        Ok(
            sqlx::query_scalar("SELECT min(opted_out_at) FROM pass_changes WHERE pass = $1")
                .bind(pass.0)
                .fetch_one(self.pool())
                .await?,
        )
    }

    /// Up to `limit` staged changes of `which` after `after` (object, record id), in that order.
    pub(crate) async fn staged_changes(
        &self,
        pass: PassId,
        which: Which,
        after: Option<(SfObject, &str)>,
        limit: usize,
    ) -> Result<Vec<StagedChange>> {
        let statement = format!(
            "SELECT object, record_id, email, old_value, new_value, reason, version, opted_out_at, \
             trace_id, outcome, status_code, message FROM pass_changes \
             WHERE pass = $1 AND (pass, object, record_id) > ($1, $2, $3) AND {} \
             ORDER BY object, record_id LIMIT $4",
            which.condition()
        );
        let (object, record_id) = after.map_or((FIRST, FIRST), |(object, id)| (object.name(), id));
        let rows = sqlx::query(sqlx::AssertSqlSafe(statement))
            .bind(pass.0)
            .bind(object)
            .bind(record_id)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(staged_change).collect()
    }

    /// Up to `limit` record ids of `object` after `after` with their new value, in order: the
    /// rows of a Bulk job's CSV.
    pub(crate) async fn bulk_rows(
        &self,
        pass: PassId,
        object: SfObject,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, bool)>> {
        let rows = sqlx::query(
            "SELECT record_id, new_value FROM pass_changes \
             WHERE pass = $1 AND object = $2 AND record_id > $3 \
             ORDER BY record_id LIMIT $4",
        )
        .bind(pass.0)
        .bind(object.name())
        .bind(after.unwrap_or(FIRST))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("record_id")?, row.try_get("new_value")?)))
            .collect()
    }

    /// Records how the writes of the records `settled` (object, record id) ended.
    pub(crate) async fn settle(
        &self,
        pass: PassId,
        settled: &[(SfObject, &str, Outcome<'_>)],
    ) -> Result<()> {
        let size = |(object, id, outcome): &(SfObject, &str, Outcome<'_>)| {
            object.name().len()
                + id.len()
                + outcome.outcome.map_or(0, str::len)
                + outcome.status_code.map_or(0, str::len)
                + outcome.message.map_or(0, str::len)
                + 5 * VALUE_OVERHEAD
        };
        for chunk in sized_chunks(settled, size) {
            let objects: Vec<&str> = chunk.iter().map(|(object, _, _)| object.name()).collect();
            let record_ids: Vec<&str> = chunk.iter().map(|(_, id, _)| *id).collect();
            let outcomes: Vec<Option<&str>> = chunk
                .iter()
                .map(|(_, _, outcome)| outcome.outcome)
                .collect();
            let status_codes: Vec<Option<&str>> = chunk
                .iter()
                .map(|(_, _, outcome)| outcome.status_code)
                .collect();
            let messages: Vec<Option<&str>> = chunk
                .iter()
                .map(|(_, _, outcome)| outcome.message)
                .collect();
            sqlx::query(
                "UPDATE pass_changes AS staged SET outcome = settled.outcome, \
                 status_code = settled.status_code, message = settled.message \
                 FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) \
                 AS settled (object, record_id, outcome, status_code, message) \
                 WHERE staged.pass = $1 AND staged.object = settled.object \
                 AND staged.record_id = settled.record_id",
            )
            .bind(pass.0)
            .bind(objects)
            .bind(record_ids)
            .bind(outcomes)
            .bind(status_codes)
            .bind(messages)
            .execute(self.pool())
            .await?;
        }
        Ok(())
    }

    /// Marks every unsettled change of `object` written (a Bulk job processed every record and
    /// listed only the failures).
    pub(crate) async fn settle_rest_written(&self, pass: PassId, object: SfObject) -> Result<()> {
        sqlx::query(
            "UPDATE pass_changes SET outcome = 'written' \
             WHERE pass = $1 AND object = $2 AND outcome IS NULL",
        )
        .bind(pass.0)
        .bind(object.name())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Audits every written change of the pass, in one statement (all or none). `trace_id` is
    /// the pass's trace; a change's own message trace stands in when it is `None`.
    pub(crate) async fn audit_written(
        &self,
        pass: PassId,
        trigger: &str,
        trace_id: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_log (email, object, record_id, old_value, new_value, reason, \"trigger\", trace_id) \
             SELECT email, object, record_id, old_value, new_value, reason, $2, COALESCE($3, trace_id) \
             FROM pass_changes WHERE pass = $1 AND outcome = 'written' ORDER BY object, record_id",
        )
        .bind(pass.0)
        .bind(trigger)
        .bind(trace_id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Up to `limit` written emails after `after`, in order, each with the decision version its
    /// changes were planned from (every change of an email comes from one decision).
    pub(crate) async fn written_emails(
        &self,
        pass: PassId,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT email, max(version) AS version FROM pass_changes \
             WHERE pass = $1 AND email > $2 AND outcome = 'written' \
             GROUP BY email ORDER BY email LIMIT $3",
        )
        .bind(pass.0)
        .bind(after.unwrap_or(FIRST))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("email")?, row.try_get("version")?)))
            .collect()
    }
}

/// Splits `items` into runs whose estimated encoded `size` stays within [`STATEMENT_BYTES`],
/// in order; an item larger than that is a run of its own.
fn sized_chunks<'a, T>(
    items: &'a [T],
    size: impl Fn(&T) -> usize + 'a,
) -> impl Iterator<Item = &'a [T]> + 'a {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut end = 0;
        while let Some(item) = rest.get(end) {
            bytes += size(item);
            if end > 0 && bytes > STATEMENT_BYTES {
                break;
            }
            end += 1;
        }
        let (chunk, tail) = rest.split_at(end);
        rest = tail;
        Some(chunk)
    })
}

fn object_of(row: &PgRow) -> Result<SfObject> {
    let name: String = row.try_get("object")?;
    name.parse()
        .map_err(|error: String| crate::Error::Database(sqlx::Error::Decode(error.into())))
}

fn staged_change(row: &PgRow) -> Result<StagedChange> {
    let email: String = row.try_get("email")?;
    let reason: String = row.try_get("reason")?;
    let trace_id: Option<String> = row.try_get("trace_id")?;
    Ok(StagedChange {
        change: Change {
            object: object_of(row)?,
            id: row.try_get("record_id")?,
            email: email.into(),
            old: row.try_get("old_value")?,
            new: row.try_get("new_value")?,
            reason: reason.into(),
            version: row.try_get("version")?,
            opted_out_at: row.try_get("opted_out_at")?,
            trace_id: trace_id.map(Arc::from),
        },
        outcome: row.try_get("outcome")?,
        status_code: row.try_get("status_code")?,
        message: row.try_get("message")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sized_chunks_keep_every_item_in_order_within_the_budget() {
        let sizes: Vec<usize> = (0..500).map(|index| 50 + index % 400).collect();
        let chunks: Vec<&[usize]> = sized_chunks(&sizes, |size| *size).collect();
        assert!(chunks.len() > 1);
        assert_eq!(chunks.concat(), sizes);
        for chunk in &chunks {
            assert!(chunk.iter().sum::<usize>() <= STATEMENT_BYTES, "{chunk:?}");
        }
        // Each chunk but the last is full: one more item would not have fitted.
        for pair in chunks.windows(2) {
            assert!(pair[0].iter().sum::<usize>() + pair[1][0] > STATEMENT_BYTES);
        }
        // An item over the budget goes alone rather than never.
        let huge = [10, STATEMENT_BYTES * 2, 10];
        let chunks: Vec<&[usize]> = sized_chunks(&huge, |size| *size).collect();
        assert_eq!(chunks, [&[10][..], &[STATEMENT_BYTES * 2], &[10]]);
        assert_eq!(sized_chunks(&[] as &[usize], |size| *size).count(), 0);
    }
}
