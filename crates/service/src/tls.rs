//! Optional TLS on the gRPC port, from PEM certificate and key files (rustls with the aws-lc provider, the
//! one reqwest and sqlx use too), and optional mutual TLS: with a client CA, callers must present a
//! certificate it signed.

use std::path::Path;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::{Error, Result, config::GrpcTls};

/// The server TLS configuration, or `None` when no certificate is configured.
pub fn server_config(settings: &GrpcTls) -> Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&settings.grpc_tls_cert, &settings.grpc_tls_key) else {
        return Ok(None);
    };
    // rustls needs a process-wide provider once both ring and aws-lc may be compiled in; losing the race
    // to another installer is fine, any installed provider works.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cert_pem = read(cert, "OPTOUT_GRPC_TLS_CERT")?;
    let key_pem = read(key, "OPTOUT_GRPC_TLS_KEY")?;
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
    if let Some(client_ca) = &settings.grpc_tls_client_ca {
        let ca_pem = read(client_ca, "OPTOUT_GRPC_TLS_CLIENT_CA")?;
        tls = tls.client_ca_root(Certificate::from_pem(ca_pem));
    }
    Ok(Some(tls))
}

fn read(path: &Path, setting: &'static str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::ReadFile {
        setting,
        path: path.display().to_string(),
        source,
    })
}
