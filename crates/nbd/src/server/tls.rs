//! The server's TLS configuration, from a PEM certificate chain and key.
//! Clients are not asked for certificates (xapi-nbd does not either).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::tls::{parse_certs, parse_private_key, read_pem_file, TlsError};

/// A rustls server configuration (ring provider, TLS 1.2 and 1.3).
pub fn server_config_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config(
        parse_certs(cert_pem, "server certificate")?,
        parse_private_key(key_pem, "server private key")?,
    )
}

/// [`server_config_from_pem`] of two files; errors name the file.
pub fn server_config_from_pem_files(
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (cert_pem, cert_origin) = read_pem_file(cert, "TLS certificate")?;
    let (key_pem, key_origin) = read_pem_file(key, "TLS key")?;
    server_config(
        parse_certs(&cert_pem, &cert_origin)?,
        parse_private_key(&key_pem, &key_origin)?,
    )
}

fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}
