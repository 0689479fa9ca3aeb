//! Runs `baseline.py` (the official Python clients, record by record) against a sandbox of its
//! own generated from the same seed, and counts its calls with the sandbox's stats.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use optout_cli::{
    children::RunningChild,
    up::{SandboxOptions, sandbox_spec},
};
use serde::Serialize;
use serde_json::Value;

use crate::stats::{Stats, calls_between};

/// What the baseline did and cost.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BaselineReport {
    /// Generated memberships.
    pub members: u64,
    /// Latency the sandbox added to every API call, ms.
    pub latency_ms: u64,
    /// Wall time measured by the script itself (interpreter start-up excluded), ms.
    pub wall_ms: u64,
    /// Of which paging Mailchimp, ms.
    pub mailchimp_ms: u64,
    /// Members it read.
    pub members_read: u64,
    /// People it found unsubscribed everywhere.
    pub optout_emails: u64,
    /// Records it updated.
    pub records_updated: u64,
    /// Mailchimp calls it made.
    pub mailchimp_calls: u64,
    /// Salesforce calls it made.
    pub salesforce_calls: u64,
    /// Salesforce calls per endpoint.
    pub salesforce_by_endpoint: BTreeMap<String, u64>,
}

/// Where the baseline's pieces are.
#[derive(Clone, Debug)]
pub struct BaselineSetup {
    /// The Python interpreter (the project venv's, with both clients installed).
    pub python: PathBuf,
    /// `baseline.py`.
    pub script: PathBuf,
    /// The folder of `optout-sandbox`.
    pub bin_dir: PathBuf,
    /// Longest run allowed.
    pub timeout: Duration,
    /// Latency the sandbox adds to every Mailchimp and Salesforce call, ms.
    pub latency_ms: u64,
}

/// Runs the baseline on a fresh sandbox of `members` memberships.
pub async fn run(
    setup: &BaselineSetup,
    seed: u64,
    audiences: u32,
    members: u64,
) -> Result<BaselineReport> {
    ensure!(
        setup.python.is_file(),
        "{} is missing: create the venv with `python3 -m venv .venv && .venv/bin/pip install -r tests/conformance/requirements.txt`, or pass --python",
        setup.python.display()
    );
    let options = SandboxOptions {
        seed,
        audiences,
        members,
        person_accounts: false,
    };
    let mut sandbox = RunningChild::start(
        &sandbox_spec(&options, &setup.bin_dir, false)?,
        Duration::from_secs(120),
    )
    .await
    .context("starting the baseline's sandbox")?;
    let result = run_on(setup, sandbox.announcement(), members).await;
    drop(sandbox.terminate(Duration::from_secs(10)).await);
    result
}

async fn run_on(setup: &BaselineSetup, info: &Value, members: u64) -> Result<BaselineReport> {
    let stats_url = info
        .get("stats_url")
        .and_then(Value::as_str)
        .context("the sandbox announced no stats_url")?;
    let info_file = std::env::temp_dir().join(format!(
        "optout-bench-baseline-{}.json",
        optout_cli::up::random_hex(6)
    ));
    std::fs::write(&info_file, serde_json::to_vec(info)?)
        .with_context(|| format!("writing {}", info_file.display()))?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    if setup.latency_ms > 0 {
        let faults_url = stats_url.replace("/_sandbox/stats", "/_sandbox/faults");
        http.put(&faults_url)
            .json(&crate::phases::latency_faults(setup.latency_ms))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| format!("setting the baseline sandbox's latency at {faults_url}"))?;
    }
    let before = Stats::read(&http, stats_url).await?;
    let started = Instant::now();
    let output = run_script(setup, &info_file).await;
    drop(std::fs::remove_file(&info_file));
    let output = output?;
    let process = started.elapsed();
    let after = Stats::read(&http, stats_url).await?;
    let line = output
        .lines()
        .rev()
        .find(|line| line.trim_start().starts_with('{'))
        .context("baseline.py printed no JSON line")?;
    let printed: Value = serde_json::from_str(line).context("baseline.py output")?;
    let number = |key: &str| printed.get(key).and_then(Value::as_f64).unwrap_or(0.0);
    let salesforce_by_endpoint = calls_between(&before, &after, "salesforce");
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let report = BaselineReport {
        members,
        latency_ms: setup.latency_ms,
        wall_ms: (number("elapsed_s") * 1000.0) as u64,
        mailchimp_ms: (number("mailchimp_s") * 1000.0) as u64,
        members_read: number("members_read") as u64,
        optout_emails: number("optout_emails") as u64,
        records_updated: number("records_updated") as u64,
        mailchimp_calls: calls_between(&before, &after, "mailchimp").values().sum(),
        salesforce_calls: salesforce_by_endpoint.values().sum(),
        salesforce_by_endpoint,
    };
    ensure!(
        report.wall_ms <= u64::try_from(process.as_millis()).unwrap_or(u64::MAX),
        "baseline.py reported more time than its process took"
    );
    Ok(report)
}

async fn run_script(setup: &BaselineSetup, info_file: &Path) -> Result<String> {
    let loopback = "127.0.0.1,localhost,::1";
    let child = tokio::process::Command::new(&setup.python)
        .arg(&setup.script)
        .arg(info_file)
        // The sandbox is on loopback; a proxy set for package registries must not see it.
        .env("NO_PROXY", loopback)
        .env("no_proxy", loopback)
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", setup.python.display()))?;
    let output = tokio::time::timeout(setup.timeout, child.wait_with_output())
        .await
        .with_context(|| format!("baseline.py did not finish within {:?}", setup.timeout))??;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success(),
        "baseline.py failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(stdout)
}
