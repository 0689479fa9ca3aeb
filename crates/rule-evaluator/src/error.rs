//! The evaluator's error type.

use std::net::SocketAddr;

/// Errors of the rule-evaluator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The gRPC address could not be bound.
    #[error("failed to bind grpc listener on {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing the startup line to stdout failed.
    #[error("failed to announce the grpc address on stdout")]
    Announce(#[source] std::io::Error),
    /// A database operation failed.
    #[error("database operation failed")]
    Database(#[from] sqlx::Error),
    /// The schema migrations failed.
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// RabbitMQ failed.
    #[error("rabbitmq operation failed")]
    Amqp(#[from] optout_amqp::Error),
    /// The reflection service could not be built.
    #[error("failed to build the grpc reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC server failed.
    #[error("grpc server failed")]
    Grpc(#[from] tonic::transport::Error),
    /// A task panicked or was aborted.
    #[error("background task failed")]
    Task(#[from] tokio::task::JoinError),
    /// Other writers kept creating persons of a batch while it was applied.
    #[error("persons of the batch were created concurrently {attempts} times in a row")]
    Contended {
        /// Attempts made.
        attempts: u32,
    },
}

impl Error {
    /// Whether retrying the same work later may succeed (connection trouble, lock conflicts, deadlocks).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Database(error) => match error {
                sqlx::Error::Database(database_error) => {
                    // 40001 serialization failure, 40P01 deadlock, 55P03 lock not available, 57P01 admin shutdown
                    matches!(
                        database_error.code().as_deref(),
                        Some("40001" | "40P01" | "55P03" | "57P01" | "57P02" | "57P03" | "53300")
                    )
                }
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Protocol(_) => true,
                _ => false,
            },
            Self::Amqp(_) | Self::Contended { .. } => true,
            _ => false,
        }
    }
}

/// Result with the evaluator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
