//! `--migrate-only` on every service binary with nothing but the database settings, as the
//! deployment's migration Job runs them.

use std::process::Stdio;

use anyhow::Context as _;
use sqlx::{Connection, Executor, PgConnection, Row};

const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[tokio::test]
async fn migrate_only_creates_the_schema_and_exits_zero_with_only_database_settings()
-> anyhow::Result<()> {
    let bin_dir = optout_e2e::target_dir()?;
    for (binary, service) in [
        ("optout-fetcher", "fetcher"),
        ("optout-rule-evaluator", "evaluator"),
        ("optout-salesforce-writer", "writer"),
    ] {
        let prefix = format!("mo_{}_{service}", std::process::id());
        let schema = format!("{prefix}_{service}");
        let output = tokio::process::Command::new(bin_dir.join(binary))
            .arg("--migrate-only")
            .env_clear()
            .env("OPTOUT_DATABASE_URL", DATABASE_URL)
            .env("OPTOUT_DATABASE_SCHEMA", &prefix)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("cannot run {binary}"))?;
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
            "{binary} stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            tables.iter().any(|table| table == "_sqlx_migrations"),
            "{binary}: tables in {schema}: {tables:?}"
        );
        assert!(tables.len() > 1, "{binary}: tables in {schema}: {tables:?}");
    }
    Ok(())
}
