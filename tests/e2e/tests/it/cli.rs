//! `optoutctl` itself: `up` announces a working stack, `status` and `sync --wait --json` talk to
//! it with the printed `env`, a refused token is named, and SIGTERM stops everything cleanly.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use optout_cli::children::{ChildSpec, RunningChild, find_binary};
use optout_e2e::target_dir;

async fn optoutctl(env: &[(String, String)], args: &[&str]) -> Result<std::process::Output> {
    let program = find_binary(&target_dir()?, "optoutctl")?;
    tokio::process::Command::new(program)
        .args(args)
        .envs(env.iter().map(|(key, value)| (key, value)))
        .output()
        .await
        .context("running optoutctl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optoutctl_up_runs_a_stack_that_status_and_sync_can_drive() -> Result<()> {
    let dir = target_dir()?;
    let spec = ChildSpec {
        name: "optoutctl-up".to_owned(),
        program: find_binary(&dir, "optoutctl")?,
        args: [
            "up",
            "--seed",
            &fastrand::u64(..).to_string(),
            "--audiences",
            "2",
            "--members",
            "50",
        ]
        .map(str::to_owned)
        .to_vec(),
        env: Vec::new(),
        forward_output: std::env::var("OPTOUT_E2E_LOG").is_ok_and(|value| value == "1"),
        log_file: None,
    };
    let mut up = RunningChild::start(&spec, Duration::from_secs(120)).await?;
    let info = up.announcement().clone();
    for key in [
        "mailchimp_url",
        "salesforce_login_url",
        "stats_url",
        "control_url",
        "admin_token",
        "env",
    ] {
        ensure!(
            info.get(key).is_some(),
            "optoutctl up printed no {key}: {info}"
        );
    }
    let env: Vec<(String, String)> = info["env"]
        .as_str()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect();
    ensure!(env.len() == 4, "env should set four variables: {env:?}");

    let status = optoutctl(&env, &["status"]).await?;
    let table = String::from_utf8_lossy(&status.stdout);
    ensure!(
        status.status.success(),
        "optoutctl status failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    for service in ["fetcher", "rule-evaluator", "salesforce-writer"] {
        ensure!(
            table.contains(service),
            "status table lacks {service}:\n{table}"
        );
    }

    let sync = optoutctl(&env, &["sync", "--wait", "--json", "--timeout", "120"]).await?;
    ensure!(
        sync.status.success(),
        "optoutctl sync failed: {}",
        String::from_utf8_lossy(&sync.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&sync.stdout).context("sync --json output")?;
    ensure!(
        summary["members_read"].as_i64().unwrap_or(0) > 0,
        "the first sync read no members: {summary}"
    );

    let mut wrong_token = env.clone();
    wrong_token.retain(|(key, _)| key != "OPTOUT_ADMIN_TOKEN");
    wrong_token.push(("OPTOUT_ADMIN_TOKEN".to_owned(), "not-the-token".to_owned()));
    let refused = optoutctl(&wrong_token, &["sync"]).await?;
    let message = String::from_utf8_lossy(&refused.stderr);
    ensure!(!refused.status.success(), "a wrong token must fail");
    ensure!(
        message.contains("the admin token was refused by"),
        "unclear error for a wrong token: {message}"
    );

    up.signal(libc::SIGTERM);
    let exit = tokio::time::timeout(Duration::from_secs(30), up.wait())
        .await
        .context("optoutctl up did not stop")??;
    ensure!(
        exit.success(),
        "optoutctl up exited with {exit} after SIGTERM:\n{}",
        up.stderr_tail()
    );

    // `up` keeps its data on purpose; the test does not.
    let field = |key: &str| info[key].as_str().unwrap_or_default().to_owned();
    let topology = optout_amqp::Topology::new("optout", &field("queue_prefix"), 4);
    let amqp_url = std::env::var("OPTOUT_AMQP_URL")
        .unwrap_or_else(|_| optout_cli::up::DEFAULT_AMQP_URL.to_owned());
    let database_url = std::env::var("OPTOUT_DATABASE_URL")
        .unwrap_or_else(|_| optout_cli::up::DEFAULT_DATABASE_URL.to_owned());
    optout_e2e::remove_namespace(
        &amqp_url,
        &database_url,
        &field("database_schema"),
        &topology,
    )
    .await
}
