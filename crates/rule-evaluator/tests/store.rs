//! `store::apply_batch` against the local PostgreSQL, in a schema of its own: a batch that meets a
//! person another writer is creating at the same moment.

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

#[tokio::test]
async fn a_person_created_by_another_writer_meanwhile_is_decided_on_all_its_members()
-> anyhow::Result<()> {
    let schema = format!("t_store_{}", uuid::Uuid::new_v4().simple());
    let pool = store::connect(&SecretString::from(DATABASE_URL), &schema, 4)
        .await
        .context("PostgreSQL must run on 127.0.0.1:5432")?;
    let result = race(&pool).await;
    pool.close().await;
    let mut database = sqlx::PgConnection::connect(DATABASE_URL).await?;
    sqlx::raw_sql(AssertSqlSafe(format!(
        r#"DROP SCHEMA IF EXISTS "{schema}" CASCADE"#
    )))
    .execute(&mut database)
    .await?;
    result
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
