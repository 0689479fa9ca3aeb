//! Wires the real-time paths into the service: the HTTP server, the Memberships gRPC service, the
//! [`Realtime`] context once the dependencies are connected, and the optional webhook registration.

use std::sync::Arc;

use optout_mailchimp::MailchimpClient;
use optout_proto::memberships::v1::memberships_server::MembershipsServer;
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use tokio::{net::TcpListener, sync::OnceCell, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tracing::{info, warn};

use crate::{
    Config, Error, Result,
    http::{self, HttpState},
    memberships::{ApiAuth, MembershipsService},
    realtime::Realtime,
    webhook,
};

/// The slot the HTTP and gRPC handlers read the context from; empty while starting.
pub type RealtimeSlot = Arc<OnceCell<Realtime>>;

/// Binds `config.realtime.http_listen`.
pub async fn bind_http(config: &Config) -> Result<TcpListener> {
    let addr = config.realtime.http_listen;
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}

fn tokens(config: &Config) -> Vec<SecretString> {
    let mut tokens = vec![config.admin_token.clone()];
    tokens.extend(config.realtime.api_token.clone());
    tokens
}

/// The Memberships gRPC service behind the API bearer tokens.
pub fn memberships_server(
    config: &Config,
    slot: &RealtimeSlot,
) -> InterceptedService<MembershipsServer<MembershipsService>, ApiAuth> {
    MembershipsServer::with_interceptor(
        MembershipsService::new(Arc::clone(slot)),
        ApiAuth::new(tokens(config)),
    )
}

/// Serves HTTP on `listener` until `stop`.
pub fn spawn_http(
    config: &Config,
    listener: TcpListener,
    slot: &RealtimeSlot,
    stop: CancellationToken,
) -> JoinHandle<std::io::Result<()>> {
    let state = HttpState::new(
        Arc::clone(slot),
        config.realtime.webhook_secret.clone(),
        tokens(config),
    );
    let limits = http::RateLimits {
        webhooks: config.realtime.webhook_rate_limit,
        api: config.realtime.api_rate_limit,
    };
    tokio::spawn(http::serve(listener, http::router(state, limits), stop))
}

/// Builds the context once the dependencies answer, fills the slot, and registers the webhook in
/// the background when a public URL is configured.
pub fn start(
    config: &Config,
    slot: &RealtimeSlot,
    client: MailchimpClient,
    pool: PgPool,
    amqp: Arc<lapin::Connection>,
    shutdown: CancellationToken,
) -> Result<()> {
    let salesforce = config
        .realtime
        .salesforce_config()
        .map(optout_salesforce::SalesforceClient::new)
        .transpose()?;
    let realtime = Realtime::new(
        client,
        salesforce,
        pool,
        amqp,
        crate::topology(config),
        crate::settings(config).audiences,
    );
    // Set exactly once, right here.
    let _ = slot.set(realtime.clone());
    if let (Some(base), Some(secret)) = (
        config.realtime.webhook_public_url.clone(),
        config.realtime.webhook_secret.clone(),
    ) {
        let url = webhook::webhook_url(&base, secret.expose_secret());
        tokio::spawn(async move {
            tokio::select! {
                registered = webhook::register(&realtime, &url) => match registered {
                    Ok(audiences) => info!(registered = audiences.len(), "mailchimp webhooks in place"),
                    Err(error) => warn!(error = %error.chain(), "mailchimp webhook registration failed"),
                },
                () = shutdown.cancelled() => {}
            }
        });
    }
    Ok(())
}

/// Stops the HTTP server and waits for it.
pub async fn stop_http(stop: CancellationToken, server: JoinHandle<std::io::Result<()>>) {
    stop.cancel();
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => warn!(%error, "http server ended with an error"),
        Err(error) => warn!(%error, "http server task ended abnormally"),
    }
}
