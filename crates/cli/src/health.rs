//! `optoutctl health`: one `grpc.health.v1.Health/Check` of the whole server (service `""`),
//! for container health checks, which have neither the admin token nor the other addresses.

use std::time::Duration;

use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{Error, Result, admin::grpc_url};

/// How long a health check may take in all, connecting included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// Asks the server at `address` for its overall health; `Ok(())` only when it says SERVING.
///
/// Anything else (not serving, unknown, unreachable, no answer within `timeout`) is an error
/// whose message fits on one line.
pub async fn check(address: &str, timeout: Duration) -> Result<()> {
    let endpoint = grpc_url(address);
    let channel = Endpoint::from_shared(endpoint.clone())
        .map_err(|source| Error::InvalidEndpoint {
            service: "health".to_owned(),
            endpoint: endpoint.clone(),
            source,
        })?
        .connect_timeout(timeout)
        .timeout(timeout)
        // The call below connects; its timeout covers both steps.
        .connect_lazy();
    let mut client = HealthClient::new(channel);
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let response = match tokio::time::timeout(timeout, client.check(request)).await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => {
            return Err(Error::NotHealthy {
                endpoint,
                reason: format!("{:?}: {}", status.code(), status.message()),
            });
        }
        Err(_) => {
            return Err(Error::NotHealthy {
                endpoint,
                reason: format!("no answer within {:.1}s", timeout.as_secs_f64()),
            });
        }
    };
    match ServingStatus::try_from(response.status) {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(other) => Err(Error::NotHealthy {
            endpoint,
            reason: format!("status {}", other.as_str_name()),
        }),
        Err(_) => Err(Error::NotHealthy {
            endpoint,
            reason: format!("unknown status {}", response.status),
        }),
    }
}
