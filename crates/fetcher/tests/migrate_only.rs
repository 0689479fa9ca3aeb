//! `optout-fetcher --migrate-only` with nothing but the database settings.

use std::process::Stdio;

use anyhow::Context as _;
use sqlx::{Connection, Executor, PgConnection, Row};

const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[tokio::test]
async fn migrate_only_creates_the_schema_and_exits_zero_with_only_database_settings()
-> anyhow::Result<()> {
    let prefix = format!("mo_{}", std::process::id());
    let schema = format!("{prefix}_fetcher");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_optout-fetcher"))
        .arg("--migrate-only")
        .env_clear()
        .env("OPTOUT_DATABASE_URL", DATABASE_URL)
        .env("OPTOUT_DATABASE_SCHEMA", &prefix)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run optout-fetcher")?;
    let mut connection = PgConnection::connect(DATABASE_URL)
        .await
        .context("PostgreSQL must be running at 127.0.0.1:5432")?;
    let tables: Vec<String> = sqlx::query(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1",
    )
    .bind(&schema)
    .fetch_all(&mut connection)
    .await?
    .iter()
    .map(|row| row.get::<String, _>(0))
    .collect();
    connection
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE"
        )))
        .await?;
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        tables.iter().any(|table| table == "_sqlx_migrations"),
        "tables in {schema}: {tables:?}"
    );
    assert!(tables.len() > 1, "tables in {schema}: {tables:?}");
    Ok(())
}
