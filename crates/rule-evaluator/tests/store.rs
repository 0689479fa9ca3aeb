//! `store::apply_batch` against the local PostgreSQL, each test in a schema of its own: a batch
//! that meets a person another writer is creating at the same moment, and the history Explain
//! shows of members first seen and changed later.

use std::time::Duration;

use anyhow::Context as _;
use chrono::{TimeZone as _, Utc};
use optout_rule_evaluator::{
    rule::{Decision, MemberStatus, Scope},
    store::{self, FirstSyncHold, Snapshot},
};
use secrecy::SecretString;
use sqlx::{AssertSqlSafe, Connection as _, Row as _};

const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const DEADLINE: Duration = Duration::from_secs(30);

/// Runs `test` on a pool of `connections` in a schema of its own, then drops the schema
/// whatever the outcome.
async fn in_fresh_schema<F, Fut>(connections: u32, test: F) -> anyhow::Result<()>
where
    F: FnOnce(sqlx::PgPool) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let schema = format!("t_store_{}", uuid::Uuid::new_v4().simple());
    let pool = store::connect(&SecretString::from(DATABASE_URL), &schema, connections)
        .await
        .context("PostgreSQL must run on 127.0.0.1:5432")?;
    let result = test(pool.clone()).await;
    pool.close().await;
    let mut database = sqlx::PgConnection::connect(DATABASE_URL).await?;
    sqlx::raw_sql(AssertSqlSafe(format!(
        r#"DROP SCHEMA IF EXISTS "{schema}" CASCADE"#
    )))
    .execute(&mut database)
    .await?;
    result
}

#[tokio::test]
async fn a_person_created_by_another_writer_meanwhile_is_decided_on_all_its_members()
-> anyhow::Result<()> {
    in_fresh_schema(4, |pool| async move { race(&pool).await }).await
}

async fn race(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    // Another writer creates the person with a subscribed member in aud2, not yet committed.
    let mut other = pool.begin().await?;
    let other_xid: i64 = sqlx::query_scalar("SELECT txid_current()")
        .fetch_one(&mut *other)
        .await?;
    sqlx::query(
        "INSERT INTO persons (email, decision, rule, version) \
         VALUES ('x@example.com', 'opt_in', 'any member subscribed', 1)",
    )
    .execute(&mut *other)
    .await?;
    sqlx::query(
        "INSERT INTO members (email, audience_id, status, last_changed, learned_from) \
         VALUES ('x@example.com', 'aud2', 'subscribed', now(), 'webhook')",
    )
    .execute(&mut *other)
    .await?;

    // The batch knows only the unsubscribed member in aud1: alone, that would be an opt-out.
    let snapshot = Snapshot {
        email: "x@example.com".to_owned(),
        audience_id: "aud1".to_owned(),
        status: MemberStatus::Unsubscribed,
        last_changed: Utc
            .timestamp_opt(1_700_000_000, 0)
            .single()
            .context("time")?,
        learned_from: "poll",
        first_sync: false,
    };
    let batch = tokio::spawn({
        let pool = pool.clone();
        async move {
            store::apply_batch(
                &pool,
                &Scope::from_audiences(Vec::<String>::new()),
                &[snapshot],
                &FirstSyncHold::default(),
            )
            .await
        }
    });

    // It finds no such person, decides, and its insert waits for the other writer's transaction.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks \
             WHERE locktype = 'transactionid' AND NOT granted \
               AND transactionid::text::bigint = $1 % 4294967296",
        )
        .bind(other_xid)
        .fetch_one(pool)
        .await?;
        if waiting > 0 {
            break;
        }
        anyhow::ensure!(
            !batch.is_finished(),
            "the batch did not wait for the person being created: {:?}",
            batch.await
        );
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the batch never waited for the other writer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    other.commit().await?;

    // It starts over, now locking the person and reading its aud2 member: subscribed somewhere.
    let applied = tokio::time::timeout(DEADLINE, batch).await???;
    let states: Vec<(String, Decision)> = applied
        .states
        .iter()
        .map(|state| (state.email.clone(), state.decision))
        .collect();
    assert_eq!(states, vec![("x@example.com".to_owned(), Decision::OptIn)]);
    let person = sqlx::query("SELECT decision, version FROM persons WHERE email = 'x@example.com'")
        .fetch_one(pool)
        .await?;
    assert_eq!(person.try_get::<String, _>("decision")?, "opt_in");
    assert_eq!(person.try_get::<i64, _>("version")?, 1, "nothing moved");
    let members: i64 =
        sqlx::query_scalar("SELECT count(*) FROM members WHERE email = 'x@example.com'")
            .fetch_one(pool)
            .await?;
    assert_eq!(members, 2, "both audiences' members are kept");
    Ok(())
}

#[tokio::test]
async fn a_first_seen_member_is_logged_by_its_row_until_it_changes() -> anyhow::Result<()> {
    in_fresh_schema(2, |pool| async move { first_seen_history(&pool).await }).await
}

fn snapshot(
    email: &str,
    audience_id: &str,
    status: MemberStatus,
    seconds: i64,
    learned_from: &'static str,
) -> anyhow::Result<Snapshot> {
    Ok(Snapshot {
        email: email.to_owned(),
        audience_id: audience_id.to_owned(),
        status,
        last_changed: Utc
            .timestamp_opt(1_700_000_000 + seconds, 0)
            .single()
            .context("time")?,
        learned_from,
        first_sync: true,
    })
}

/// `(audience, from, to, learned from, last_changed)` of each transition Explain shows, oldest
/// first, and the seen times apart.
type History = (
    Vec<(String, String, String, String, i64)>,
    Vec<chrono::DateTime<Utc>>,
);

async fn history(pool: &sqlx::PgPool, email: &str, limit: i64) -> anyhow::Result<History> {
    let (_, _, transitions) = store::explain(pool, email, limit).await?;
    Ok((
        transitions
            .iter()
            .map(|transition| {
                (
                    transition.audience_id.clone(),
                    transition.from_status.clone(),
                    transition.to_status.clone(),
                    transition.learned_from.clone(),
                    transition.last_changed.timestamp() - 1_700_000_000,
                )
            })
            .collect(),
        transitions
            .iter()
            .map(|transition| transition.seen_at)
            .collect(),
    ))
}

async fn logged(pool: &sqlx::PgPool, email: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM transitions WHERE email = $1")
            .bind(email)
            .fetch_one(pool)
            .await?,
    )
}

async fn first_seen_history(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    use MemberStatus::{Subscribed, Unsubscribed};
    let scope = &Scope::from_audiences(Vec::<String>::new());
    let apply = |snapshots: Vec<Snapshot>| async move {
        store::apply_batch(pool, scope, &snapshots, &FirstSyncHold::default()).await
    };
    let entry = |audience: &str, from: &str, to: &str, source: &str, seconds: i64| {
        (
            audience.to_owned(),
            from.to_owned(),
            to.to_owned(),
            source.to_owned(),
            seconds,
        )
    };

    // First seen in two audiences: nothing goes to the log, Explain shows both from the rows.
    apply(vec![
        snapshot("a@example.com", "aud1", Subscribed, 0, "poll")?,
        snapshot("a@example.com", "aud2", Unsubscribed, 0, "poll")?,
    ])
    .await?;
    assert_eq!(logged(pool, "a@example.com").await?, 0);
    let (first, first_seen) = history(pool, "a@example.com", 50).await?;
    assert_eq!(
        first,
        [
            entry("aud1", "", "subscribed", "poll", 0),
            entry("aud2", "", "unsubscribed", "poll", 0)
        ]
    );

    // aud1 changes: its first-seen transition is logged as it was shown, then the change.
    tokio::time::sleep(Duration::from_millis(20)).await;
    apply(vec![snapshot(
        "a@example.com",
        "aud1",
        Unsubscribed,
        60,
        "webhook",
    )?])
    .await?;
    assert_eq!(logged(pool, "a@example.com").await?, 2);
    let (changed, changed_seen) = history(pool, "a@example.com", 50).await?;
    let mut expected = first.clone();
    expected.push(entry("aud1", "subscribed", "unsubscribed", "webhook", 60));
    assert_eq!(changed, expected);
    assert_eq!(changed_seen[..2], first_seen[..], "first seen times kept");
    assert!(changed_seen[2] > first_seen[1]);

    // aud2 is seen again with the same status and a newer time: no transition, but the row
    // changes, so the first-seen transition it stood for is logged, unchanged.
    apply(vec![snapshot(
        "a@example.com",
        "aud2",
        Unsubscribed,
        120,
        "poll",
    )?])
    .await?;
    assert_eq!(logged(pool, "a@example.com").await?, 3);
    assert_eq!(history(pool, "a@example.com", 50).await?.0, expected);
    // The most recent ones only, when asked for fewer.
    assert_eq!(
        history(pool, "a@example.com", 2).await?.0,
        expected[1..].to_vec()
    );
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM members WHERE first_seen_at IS NOT NULL")
            .fetch_one(pool)
            .await?;
    assert_eq!(pending, 0);

    // A member first seen and changed within one batch: both are logged, in order.
    apply(vec![
        snapshot("b@example.com", "aud1", Subscribed, 0, "poll")?,
        snapshot("b@example.com", "aud1", Unsubscribed, 30, "webhook")?,
    ])
    .await?;
    assert_eq!(logged(pool, "b@example.com").await?, 2);
    assert_eq!(
        history(pool, "b@example.com", 50).await?.0,
        [
            entry("aud1", "", "subscribed", "poll", 0),
            entry("aud1", "subscribed", "unsubscribed", "webhook", 30)
        ]
    );
    Ok(())
}
