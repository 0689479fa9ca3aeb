//! gRPC TLS and mutual TLS as the services set them up (`tls::server_config`), checked with a
//! real tonic server and client on loopback: TLS serves callers that trust its CA; mutual TLS
//! serves only callers with a certificate from the client CA.

use std::path::Path;

use anyhow::Result;
use clap::Parser;
use optout_service::{config::GrpcTls, tls};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, Server};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Result<Ca> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let pem = params.self_signed(&key)?.pem();
    Ok(Ca {
        pem,
        issuer: Issuer::new(params, key),
    })
}

/// A certificate and key signed by `ca`, as PEM.
fn leaf(ca: &Ca, name: &str, purpose: ExtendedKeyUsagePurpose) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![name.to_owned()])?;
    params.extended_key_usages = vec![purpose];
    let cert = params.signed_by(&key, &ca.issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    tls: GrpcTls,
}

/// Serves health over TLS configured from files, as a service does; returns the address.
async fn serve(dir: &Path, server_ca: &Ca, client_ca: Option<&Ca>) -> Result<std::net::SocketAddr> {
    let (cert, key) = leaf(server_ca, "localhost", ExtendedKeyUsagePurpose::ServerAuth)?;
    std::fs::write(dir.join("server.pem"), cert)?;
    std::fs::write(dir.join("server.key"), key)?;
    let mut args = vec![
        "service".to_owned(),
        "--grpc-tls-cert".to_owned(),
        dir.join("server.pem").display().to_string(),
        "--grpc-tls-key".to_owned(),
        dir.join("server.key").display().to_string(),
    ];
    if let Some(client_ca) = client_ca {
        std::fs::write(dir.join("clients.pem"), &client_ca.pem)?;
        args.extend([
            "--grpc-tls-client-ca".to_owned(),
            dir.join("clients.pem").display().to_string(),
        ]);
    }
    let settings = Args::try_parse_from(args)?.tls;
    let config = tls::server_config(&settings)?.expect("tls configured");
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let server = Server::builder().tls_config(config)?.add_service(health);
    tokio::spawn(server.serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)));
    Ok(address)
}

/// A health check over TLS trusting `server_ca`, with an optional client identity.
async fn check(
    address: std::net::SocketAddr,
    server_ca: &Ca,
    identity: Option<(String, String)>,
) -> Result<()> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&server_ca.pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://{address}"))?
        .tls_config(tls)?
        .connect()
        .await?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await?;
    Ok(())
}

fn temp_dir(label: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "optout-tls-{label}-{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[tokio::test]
async fn tls_serves_callers_that_trust_its_ca() -> Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = temp_dir("plain")?;
    let server_ca = ca("server CA")?;
    let address = serve(&dir, &server_ca, None).await?;
    check(address, &server_ca, None).await?;
    // A caller trusting another CA refuses the server.
    let stranger = ca("another CA")?;
    assert!(check(address, &stranger, None).await.is_err());
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

#[tokio::test]
async fn mutual_tls_serves_only_callers_with_a_client_certificate_from_its_ca() -> Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = temp_dir("mutual")?;
    let server_ca = ca("server CA")?;
    let client_ca = ca("client CA")?;
    let address = serve(&dir, &server_ca, Some(&client_ca)).await?;
    let client = leaf(&client_ca, "operator", ExtendedKeyUsagePurpose::ClientAuth)?;
    check(address, &server_ca, Some(client)).await?;
    assert!(
        check(address, &server_ca, None).await.is_err(),
        "a caller without a certificate is served"
    );
    let foreign = leaf(
        &ca("other clients")?,
        "intruder",
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    assert!(
        check(address, &server_ca, Some(foreign)).await.is_err(),
        "a certificate from another CA is accepted"
    );
    std::fs::remove_dir_all(dir)?;
    Ok(())
}
