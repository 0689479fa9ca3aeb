//! The one error type of the command line library: each variant names the service or child
//! process it is about, so an operator knows where to look.

use std::time::Duration;

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `optoutctl`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An endpoint flag or variable is missing.
    #[error("no address for {service}: pass {flag} or set {env}")]
    MissingEndpoint {
        /// Service name.
        service: &'static str,
        /// The command line flag.
        flag: &'static str,
        /// The environment variable.
        env: &'static str,
    },
    /// The admin token is missing.
    #[error("no admin token: pass --token or set OPTOUT_ADMIN_TOKEN")]
    MissingToken,
    /// The admin token cannot be sent as a header.
    #[error("the admin token contains characters that cannot be sent in a header")]
    InvalidToken,
    /// An endpoint is not a valid URL.
    #[error("invalid address {endpoint:?} for {service}")]
    InvalidEndpoint {
        /// Service name.
        service: String,
        /// The address given.
        endpoint: String,
        /// Why it is invalid.
        #[source]
        source: tonic::transport::Error,
    },
    /// The service did not accept a connection.
    #[error("cannot reach {service} at {endpoint}")]
    Unreachable {
        /// Service name.
        service: String,
        /// The address tried.
        endpoint: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The service answered UNAUTHENTICATED.
    #[error("the admin token was refused by {service}")]
    Unauthenticated {
        /// Service name.
        service: String,
    },
    /// Any other failed call.
    #[error("{call} on {service} failed: {code:?}: {message}")]
    Rpc {
        /// Service name.
        service: String,
        /// The RPC.
        call: &'static str,
        /// gRPC status code.
        code: tonic::Code,
        /// gRPC status message.
        message: String,
    },
    /// The command line is inconsistent.
    #[error("{0}")]
    Usage(String),
    /// A health check did not say SERVING.
    #[error("{endpoint} is not healthy: {reason}")]
    NotHealthy {
        /// The address checked.
        endpoint: String,
        /// What it said instead, or why it said nothing (one line).
        reason: String,
    },
    /// An unknown service name on the command line.
    #[error("unknown service {0:?}: expected fetcher, rule-evaluator, salesforce-writer or all")]
    UnknownService(String),
    /// A binary to start is missing.
    #[error(
        "cannot find {program} (looked in {dir}); build it with `cargo build --bins` or set OPTOUT_BIN_DIR"
    )]
    MissingBinary {
        /// The binary's name.
        program: String,
        /// The folder looked in.
        dir: String,
    },
    /// A child process could not be started.
    #[error("failed to start {child}")]
    Spawn {
        /// The child's name.
        child: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A child process did not print its JSON announcement.
    #[error(
        "{child} did not announce itself: {reason}\n--- last lines of its stderr ---\n{stderr_tail}"
    )]
    Announce {
        /// The child's name.
        child: String,
        /// What went wrong.
        reason: String,
        /// The end of its stderr.
        stderr_tail: String,
    },
    /// A child process exited while it should have been running.
    #[error(
        "{child} exited unexpectedly ({status})\n--- last lines of its stderr ---\n{stderr_tail}"
    )]
    ChildExited {
        /// The child's name.
        child: String,
        /// Its exit status.
        status: String,
        /// The end of its stderr.
        stderr_tail: String,
    },
    /// Something did not happen in time.
    #[error("timed out after {:.1}s waiting for {what}", elapsed.as_secs_f64())]
    Timeout {
        /// What was awaited, with the state seen last.
        what: String,
        /// How long it waited.
        elapsed: Duration,
    },
    /// A local input/output error.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// JSON could not be encoded or decoded.
    #[error("{context}")]
    Json {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// Maps a gRPC status from `service` to an error, singling out a refused token.
    pub fn from_status(service: &str, call: &'static str, status: &tonic::Status) -> Self {
        if status.code() == tonic::Code::Unauthenticated {
            return Self::Unauthenticated {
                service: service.to_owned(),
            };
        }
        Self::Rpc {
            service: service.to_owned(),
            call,
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}
