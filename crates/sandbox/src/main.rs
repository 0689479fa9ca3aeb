//! `optout-sandbox`: runs both emulators, prints a [`SandboxInfo`] JSON line as the first line of
//! stdout, and serves until SIGTERM or SIGINT. Logs go to stderr.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use optout_sandbox::salesforce::EndpointOptions;
use optout_sandbox::shared::{ApiFaults, FaultSettings};
use optout_sandbox::{Sandbox, SandboxConfig, SandboxIdentity, SandboxInfo};

/// In-memory Mailchimp and Salesforce emulators with seeded data.
#[derive(Debug, Parser)]
#[command(name = "optout-sandbox", version)]
struct Args {
    /// Seed of the data generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Number of Mailchimp audiences.
    #[arg(long, default_value_t = 2)]
    audiences: u32,
    /// Number of memberships over all audiences.
    #[arg(long, default_value_t = 1000)]
    members: u64,
    /// Enable Person Accounts in the Salesforce org.
    #[arg(long)]
    person_accounts: bool,
    /// Address of the Mailchimp emulator and the control endpoints.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen_mailchimp: SocketAddr,
    /// Address of the Salesforce emulator (TLS).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen_salesforce: SocketAddr,
    /// Share of Mailchimp requests answered 429.
    #[arg(long, default_value_t = 0.0)]
    mailchimp_429_rate: f64,
    /// Share of Mailchimp requests answered 503.
    #[arg(long, default_value_t = 0.0)]
    mailchimp_503_rate: f64,
    /// Share of Mailchimp requests that hang for --mailchimp-timeout-ms, then answer 504.
    #[arg(long, default_value_t = 0.0)]
    mailchimp_timeout_rate: f64,
    /// How long a Mailchimp "timeout" hangs.
    #[arg(long, default_value_t = 130_000)]
    mailchimp_timeout_ms: u64,
    /// Latency added to every Mailchimp request.
    #[arg(long, default_value_t = 0)]
    mailchimp_latency_ms: u64,
    /// Concurrent Mailchimp requests allowed per API key before 429.
    #[arg(long, default_value_t = 10)]
    mailchimp_max_connections: usize,
    /// Share of Salesforce requests answered REQUEST_LIMIT_EXCEEDED.
    #[arg(long, default_value_t = 0.0)]
    salesforce_429_rate: f64,
    /// Share of Salesforce requests answered 503.
    #[arg(long, default_value_t = 0.0)]
    salesforce_503_rate: f64,
    /// Share of Salesforce requests that hang for --salesforce-timeout-ms, then answer 504.
    #[arg(long, default_value_t = 0.0)]
    salesforce_timeout_rate: f64,
    /// How long a Salesforce "timeout" hangs.
    #[arg(long, default_value_t = 130_000)]
    salesforce_timeout_ms: u64,
    /// Latency added to every Salesforce request.
    #[arg(long, default_value_t = 0)]
    salesforce_latency_ms: u64,
    /// Share of records in Salesforce writes that fail with UNABLE_TO_LOCK_ROW.
    #[arg(long, default_value_t = 0.0)]
    unable_to_lock_row_rate: f64,
    /// Fixed Mailchimp API key (random when unset); the services read the same variable.
    #[arg(long, env = "OPTOUT_MAILCHIMP_API_KEY", hide_env_values = true)]
    mailchimp_api_key: Option<String>,
    /// Fixed OAuth client id of the Salesforce connected app (random when unset).
    #[arg(long, env = "OPTOUT_SALESFORCE_CLIENT_ID")]
    salesforce_client_id: Option<String>,
    /// Fixed OAuth client secret of the Salesforce connected app (random when unset).
    #[arg(long, env = "OPTOUT_SALESFORCE_CLIENT_SECRET", hide_env_values = true)]
    salesforce_client_secret: Option<String>,
    /// Host name that clients use to reach the sandbox, for its URLs and TLS certificate.
    #[arg(long)]
    public_host: Option<String>,
    /// CA certificate (PEM) signing the Salesforce TLS certificate; created when absent.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// CA private key (PEM); created with --ca-cert when absent.
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
}

impl Args {
    fn config(&self) -> SandboxConfig {
        SandboxConfig {
            seed: self.seed,
            audiences: self.audiences,
            members: self.members,
            person_accounts: self.person_accounts,
            listen_mailchimp: self.listen_mailchimp,
            listen_salesforce: self.listen_salesforce,
            faults: FaultSettings {
                mailchimp: ApiFaults {
                    rate_429: self.mailchimp_429_rate,
                    rate_503: self.mailchimp_503_rate,
                    rate_timeout: self.mailchimp_timeout_rate,
                    timeout_ms: self.mailchimp_timeout_ms,
                    latency_ms: self.mailchimp_latency_ms,
                },
                salesforce: ApiFaults {
                    rate_429: self.salesforce_429_rate,
                    rate_503: self.salesforce_503_rate,
                    rate_timeout: self.salesforce_timeout_rate,
                    timeout_ms: self.salesforce_timeout_ms,
                    latency_ms: self.salesforce_latency_ms,
                },
                unable_to_lock_row_rate: self.unable_to_lock_row_rate,
                mailchimp_max_connections: Some(self.mailchimp_max_connections),
            },
            identity: SandboxIdentity {
                mailchimp_api_key: self.mailchimp_api_key.clone(),
                public_host: self.public_host.clone(),
                salesforce: EndpointOptions {
                    client_id: self.salesforce_client_id.clone(),
                    client_secret: self.salesforce_client_secret.clone(),
                    public_host: None,
                    ca_cert: self.ca_cert.clone(),
                    ca_key: self.ca_key.clone(),
                },
            },
        }
    }
}

fn print_info(info: &SandboxInfo) -> anyhow::Result<()> {
    let line = serde_json::to_string(info).context("failed to serialize sandbox info")?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").context("failed to write sandbox info")?;
    stdout.flush().context("failed to flush stdout")?;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("failed to listen for SIGTERM")?;
    tokio::select! {
        _ = terminate.recv() => Ok("SIGTERM"),
        interrupted = tokio::signal::ctrl_c() => {
            interrupted.context("failed to listen for SIGINT")?;
            Ok("SIGINT")
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let sandbox = Sandbox::start(args.config())
        .await
        .context("failed to start the sandbox")?;
    print_info(sandbox.info())?;
    let signal = wait_for_signal().await?;
    tracing::info!(signal, "shutting down");
    sandbox.shutdown().await;
    Ok(())
}
