//! Key material made at every start: a throw-away CA, the server certificate it signs for
//! 127.0.0.1 and localhost (simple-salesforce always speaks https), and the RSA key pair of the
//! connected app's JWT bearer flow.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::SalesforceError;

/// PEM texts written to the state directory or handed to the TLS acceptor.
pub(crate) struct Keys {
    pub(crate) ca_pem: String,
    pub(crate) server_chain_pem: String,
    pub(crate) server_key_pem: String,
    pub(crate) jwt_private_pem: String,
    pub(crate) jwt_public_pem: String,
}

fn keys_error(error: rcgen::Error) -> SalesforceError {
    SalesforceError::Keys(error.to_string())
}

/// A CA kept in files, so containers that trust the sandbox survive its restarts.
pub(crate) struct CaFiles<'a> {
    pub(crate) cert: &'a Path,
    pub(crate) key: &'a Path,
}

pub(crate) fn make_keys(
    ca_files: Option<CaFiles<'_>>,
    extra_host: Option<&str>,
) -> Result<Keys, SalesforceError> {
    let existing_ca = match &ca_files {
        Some(files) if files.cert.exists() && files.key.exists() => Some((
            std::fs::read_to_string(files.cert)?,
            std::fs::read_to_string(files.key)?,
        )),
        _ => None,
    };
    let ca_key = match &existing_ca {
        Some((_, key_pem)) => KeyPair::from_pem(key_pem).map_err(keys_error)?,
        None => KeyPair::generate().map_err(keys_error)?,
    };
    let mut ca_params = CertificateParams::default();
    let mut ca_name = DistinguishedName::new();
    ca_name.push(DnType::CommonName, "optout-sandbox test CA");
    ca_params.distinguished_name = ca_name;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // A loaded CA keeps its certificate; signing only needs its key and (identical) name.
    let ca_pem = match existing_ca {
        Some((cert_pem, _)) => cert_pem,
        None => {
            let pem = ca_params.self_signed(&ca_key).map_err(keys_error)?.pem();
            if let Some(files) = &ca_files {
                std::fs::write(files.cert, &pem)?;
                std::fs::write(files.key, ca_key.serialize_pem())?;
            }
            pem
        }
    };
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().map_err(keys_error)?;
    let mut server_params =
        CertificateParams::new(vec!["localhost".to_owned()]).map_err(keys_error)?;
    server_params
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    if let Some(host) = extra_host {
        let san = match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.try_into().map_err(keys_error)?),
        };
        server_params.subject_alt_names.push(san);
    }
    let mut server_name = DistinguishedName::new();
    server_name.push(DnType::CommonName, "localhost");
    server_params.distinguished_name = server_name;
    server_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    // OpenSSL's strict verification (newer Pythons) wants the authority key identifier.
    server_params.use_authority_key_identifier_extension = true;
    let server_cert = server_params
        .signed_by(&server_key, &issuer)
        .map_err(keys_error)?;

    let jwt_key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).map_err(keys_error)?;
    Ok(Keys {
        server_chain_pem: format!("{}{ca_pem}", server_cert.pem()),
        ca_pem,
        server_key_pem: server_key.serialize_pem(),
        jwt_private_pem: jwt_key.serialize_pem(),
        jwt_public_pem: jwt_key.public_key_pem(),
    })
}
