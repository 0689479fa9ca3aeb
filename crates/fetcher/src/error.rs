//! The fetcher's error type.

/// What can go wrong in the fetcher.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A PostgreSQL query or connection failed.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// The schema migrations could not be applied.
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A Mailchimp API call failed (after the client's own retries).
    #[error("mailchimp request failed")]
    Mailchimp(#[from] optout_mailchimp::Error),
    /// A Salesforce call failed (imports).
    #[error("salesforce request failed")]
    Salesforce(#[from] optout_salesforce::Error),
    /// The HTTP server (webhooks, Memberships API) failed.
    #[error("http server failed")]
    Http(#[source] std::io::Error),
    /// RabbitMQ refused a declare or a publish.
    #[error("rabbitmq error")]
    Amqp(#[from] optout_amqp::Error),
    /// The gRPC listener could not be bound.
    #[error("failed to bind grpc listener on {addr}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server stopped with an error.
    #[error("grpc server failed")]
    Grpc(#[from] tonic::transport::Error),
    /// The reflection service could not be built from the descriptor sets.
    #[error("failed to build grpc reflection")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// Writing the listening announcement to stdout failed.
    #[error("failed to announce the grpc address on stdout")]
    Announce(#[source] std::io::Error),
    /// The RabbitMQ connection failed after start-up (the process exits to be restarted).
    #[error("the rabbitmq connection was lost")]
    AmqpConnectionLost,
    /// Syncs cannot start while the fetcher is paused.
    #[error("fetcher is paused")]
    Paused,
    /// The fetcher is shutting down and takes no new runs.
    #[error("fetcher is shutting down")]
    ShuttingDown,
    /// A sync run's task ended without reporting (it panicked).
    #[error("sync run {run_id} ended without a report")]
    RunLost {
        /// The run.
        run_id: String,
    },
    /// An audience's listing kept shifting and paging did not finish.
    #[error("paging audience {audience_id} did not converge after {requests} requests")]
    PagingDiverged {
        /// The audience paged.
        audience_id: String,
        /// Requests made before giving up.
        requests: u64,
    },
}

/// Result with the fetcher's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The message with every cause, for logs and the run record (`a: b: c`).
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}
