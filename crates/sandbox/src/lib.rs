//! Emulators of the Mailchimp Marketing API and the Salesforce REST API over real HTTP, in memory,
//! with a seeded data generator, fault injection and call accounting.
//!
//! Owners while under construction: `mailchimp/`, `generator.rs`, `main.rs` and this file belong to
//! the Mailchimp half; `salesforce/` to the Salesforce half; `shared.rs` to both.
//!
//! ```no_run
//! # async fn example() -> Result<(), optout_sandbox::SandboxError> {
//! let sandbox = optout_sandbox::Sandbox::start(optout_sandbox::SandboxConfig::default()).await?;
//! println!("{}", sandbox.info().mailchimp_url);
//! sandbox.shutdown().await;
//! # Ok(()) }
//! ```

mod generator;
mod mailchimp;
pub mod salesforce;
pub mod shared;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::mailchimp::api::McState;
use crate::mailchimp::store::{Account, Clock};
use crate::mailchimp::webhooks::WebhookHub;
pub use crate::shared::{FaultSettings, Shared};

/// How a sandbox starts.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// Seed of the data generator: the same seed gives the same data.
    pub seed: u64,
    /// Number of Mailchimp audiences.
    pub audiences: u32,
    /// Number of Mailchimp memberships over all audiences (a person may be in several).
    pub members: u64,
    /// Whether the Salesforce org has Person Accounts enabled.
    pub person_accounts: bool,
    /// Where the Mailchimp emulator (and the control endpoints) listens.
    pub listen_mailchimp: SocketAddr,
    /// Where the Salesforce emulator listens (TLS).
    pub listen_salesforce: SocketAddr,
    /// Faults injected from the start.
    pub faults: FaultSettings,
    /// Fixed credentials and names; random or local ones where unset.
    pub identity: SandboxIdentity,
}

/// Credentials and names fixed in advance, so that containers configured before the sandbox
/// starts (docker-compose, Kubernetes) agree with it. Tests leave them unset: random is safer.
#[derive(Clone, Debug, Default)]
pub struct SandboxIdentity {
    /// Mailchimp API key (`<hex>-<dc>`).
    pub mailchimp_api_key: Option<String>,
    /// Host name in the URLs the sandbox reports and in its certificate (`sandbox` in compose).
    pub public_host: Option<String>,
    /// The Salesforce half's identity.
    pub salesforce: salesforce::EndpointOptions,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            audiences: 2,
            members: 1000,
            person_accounts: false,
            listen_mailchimp: SocketAddr::from(([127, 0, 0, 1], 0)),
            listen_salesforce: SocketAddr::from(([127, 0, 0, 1], 0)),
            faults: FaultSettings::default(),
            identity: SandboxIdentity::default(),
        }
    }
}

/// Where and how to reach a running sandbox; printed by the binary as its first stdout line.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxInfo {
    /// `http://127.0.0.1:P/3.0`.
    pub mailchimp_url: String,
    /// `<hex>-us1`.
    pub mailchimp_api_key: String,
    /// `https://127.0.0.1:Q` (token endpoint host).
    pub salesforce_login_url: String,
    /// `https://127.0.0.1:Q`.
    pub salesforce_instance_url: String,
    /// OAuth client id of the connected app.
    pub salesforce_client_id: String,
    /// OAuth client secret (random per start).
    pub salesforce_client_secret: String,
    /// PEM file of the CA that signed the Salesforce TLS certificate.
    pub salesforce_ca_file: PathBuf,
    /// User of the JWT bearer flow.
    pub salesforce_jwt_username: String,
    /// RSA private key (PEM) the org trusts for the JWT bearer flow.
    pub salesforce_jwt_key_file: PathBuf,
    /// `http://127.0.0.1:P/_sandbox/stats`.
    pub stats_url: String,
    /// `http://127.0.0.1:P/_sandbox`.
    pub control_url: String,
    /// Mailchimp list ids of the generated audiences.
    pub audiences: Vec<String>,
}

/// Why a sandbox failed to start.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A listener could not bind.
    #[error("failed to bind {address}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The state directory (certificates, keys) could not be made.
    #[error("failed to create state directory {path}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The data generator panicked.
    #[error("data generation failed")]
    Generate(#[source] tokio::task::JoinError),
    /// The Salesforce half failed to start.
    #[error("salesforce emulator failed to start")]
    Salesforce(#[from] salesforce::SalesforceError),
}

/// A running sandbox: both emulators and the control endpoints.
#[derive(Debug)]
pub struct Sandbox {
    info: SandboxInfo,
    shared: Shared,
    shutdown: CancellationToken,
    server: JoinHandle<()>,
    state_dir: PathBuf,
}

impl Sandbox {
    /// Generates the data, binds both emulators and serves them in background tasks.
    pub async fn start(config: SandboxConfig) -> Result<Sandbox, SandboxError> {
        let shared = Shared {
            stats: shared::Stats::default(),
            faults: shared::Faults::new(config.faults.clone()),
        };
        let shutdown = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind(config.listen_mailchimp)
            .await
            .map_err(|source| SandboxError::Bind {
                address: config.listen_mailchimp,
                source,
            })?;
        let mailchimp_address = listener.local_addr().map_err(|source| SandboxError::Bind {
            address: config.listen_mailchimp,
            source,
        })?;

        let org = salesforce::SalesforceOrg::new(salesforce::OrgSettings {
            person_accounts: config.person_accounts,
            daily_api_budget: 5_000_000,
        });
        let settings = generator::GeneratorSettings {
            seed: config.seed,
            audiences: config.audiences,
            members: config.members,
            person_accounts: config.person_accounts,
        };
        let generator_org = org.clone();
        // A million members take a couple of seconds of CPU: keep them off the async workers.
        let lists =
            tokio::task::spawn_blocking(move || generator::generate(settings, &generator_org))
                .await
                .map_err(SandboxError::Generate)?;
        let audiences: Vec<String> = lists.iter().map(|list| list.id.clone()).collect();
        let account = Arc::new(Account::new(lists, Clock::default()));

        let state_dir = std::env::temp_dir().join(format!(
            "optout-sandbox-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&state_dir).map_err(|source| SandboxError::StateDir {
            path: state_dir.clone(),
            source,
        })?;
        let mut endpoint_options = config.identity.salesforce.clone();
        endpoint_options.public_host = config.identity.public_host.clone();
        let endpoint = salesforce::start_with_options(
            org.clone(),
            shared.clone(),
            config.listen_salesforce,
            &state_dir,
            &endpoint_options,
            shutdown.child_token(),
        )
        .await?;

        let api_key = config
            .identity
            .mailchimp_api_key
            .clone()
            .unwrap_or_else(|| format!("{:016x}{:016x}-us1", fastrand::u64(..), fastrand::u64(..)));
        let hub = Arc::new(WebhookHub::new(shutdown.child_token()));
        let state = McState::new(account, hub, shared.clone(), api_key.clone());
        let app = mailchimp::api::router(state.clone())
            .merge(mailchimp::control::router(state))
            .nest("/_sandbox/salesforce", salesforce::control_router(org));
        let server_shutdown = shutdown.clone();
        let server = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(server_shutdown.cancelled_owned())
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "mailchimp emulator stopped");
            }
        });

        let base = match &config.identity.public_host {
            Some(host) => format!("http://{host}:{}", mailchimp_address.port()),
            None => format!("http://{mailchimp_address}"),
        };
        let info = SandboxInfo {
            mailchimp_url: format!("{base}/3.0"),
            mailchimp_api_key: api_key,
            salesforce_login_url: endpoint.login_url,
            salesforce_instance_url: endpoint.instance_url,
            salesforce_client_id: endpoint.client_id,
            salesforce_client_secret: endpoint.client_secret,
            salesforce_ca_file: endpoint.ca_file,
            salesforce_jwt_username: endpoint.jwt_username,
            salesforce_jwt_key_file: endpoint.jwt_private_key_file,
            stats_url: format!("{base}/_sandbox/stats"),
            control_url: format!("{base}/_sandbox"),
            audiences,
        };
        tracing::info!(mailchimp = %info.mailchimp_url, salesforce = %info.salesforce_instance_url, "sandbox listening");
        Ok(Sandbox {
            info,
            shared,
            shutdown,
            server,
            state_dir,
        })
    }

    /// Where and how to reach the sandbox.
    pub fn info(&self) -> &SandboxInfo {
        &self.info
    }

    /// Stats and fault settings, for in-process tests.
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Stops serving (waiting briefly for requests in progress) and removes the state directory.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(5), &mut server)
            .await
            .is_err()
        {
            // A request stuck in an injected timeout must not hold shutdown hostage.
            server.abort();
        }
        if let Err(error) = std::fs::remove_dir_all(&self.state_dir) {
            tracing::debug!(%error, "failed to remove sandbox state directory");
        }
    }
}
