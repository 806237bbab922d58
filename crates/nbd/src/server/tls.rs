//! The server's TLS configuration, from a PEM certificate chain and key.
//! Clients are not asked for certificates (xapi-nbd does not either).

use std::sync::Arc;

use crate::tls::{certs_from_pem, TlsError};

/// A rustls server configuration (ring provider, TLS 1.2 and 1.3).
pub fn server_config_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = certs_from_pem(cert_pem, "server certificate")?;
    let bad_key = |reason: String| TlsError::BadCertificate {
        what: "server private key".into(),
        reason,
    };
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| bad_key(e.to_string()))?
        .ok_or_else(|| bad_key("no PEM private key found".into()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}
