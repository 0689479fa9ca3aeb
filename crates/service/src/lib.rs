//! What every optout-sync service shares, so the fetcher, the rule-evaluator and the salesforce-writer
//! behave alike for operators: layered configuration with one exit code for bad settings
//! ([`config`]), the bearer token on admin calls ([`auth`]), SIGTERM handling with a bounded drain
//! ([`signal`]), health reporting ([`health`]) and optional TLS on the gRPC port ([`tls`]).

pub mod auth;
pub mod config;
pub mod health;
pub mod runtime;
pub mod signal;
pub mod tls;

pub use auth::{AttachBearer, RequireBearer};
pub use config::{ConfigError, EXIT_CONFIG, EXIT_FAILURE, GrpcTls};

/// Errors of this crate outside configuration loading.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A certificate or key file could not be read.
    #[error("failed to read {setting} file {path}")]
    ReadFile {
        /// The setting that named the file.
        setting: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A bearer token cannot be sent as a gRPC header.
    #[error("the bearer token must be printable ASCII")]
    InvalidToken,
    /// tonic refused the TLS configuration.
    #[error("invalid grpc tls configuration")]
    Tls(#[source] tonic::transport::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
