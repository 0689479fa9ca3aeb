//! `grpc.health.v1` reporting: one status for `""` and every named service, switched together.

use tonic_health::{ServingStatus, server::HealthReporter};

/// Sets `status` for the server as a whole (`""`) and for each of `services`.
pub async fn set_all(health: &HealthReporter, services: &[&str], status: ServingStatus) {
    health.set_service_status("", status).await;
    for service in services {
        health.set_service_status(*service, status).await;
    }
}
