//! TLS for NBD and other clients: trust a CA file or exactly one pinned
//! server certificate (as XenServer's `VDI.get_nbd_info` returns it), and
//! always verify the server name. There is no way to turn verification off
//! here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: {reason}")]
    BadCertificate { what: String, reason: String },
    #[error("'{0}' is not a valid TLS server name")]
    BadName(String),
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Whom to trust.
#[derive(Debug, Clone)]
pub enum Trust {
    /// PEM certificates of certificate authorities.
    CaPem(Vec<u8>),
    /// The PEM certificate the server must present, exactly.
    PinnedPem(Vec<u8>),
}

#[derive(Debug, Clone)]
pub struct TlsOptions {
    pub trust: Trust,
    /// Name the certificate must be valid for (DNS name or IP address).
    pub server_name: String,
    /// The certificate and key presented when the server asks for one
    /// (qemu-nbd with `verify-peer=on`); see [`client_identity`].
    pub client: Option<Arc<CertifiedKey>>,
}

/// ring's suites with AES-128-GCM offered first: bulk data (a disk over
/// NBD) costs both ends noticeably less CPU than with AES-256, and it is
/// the suite TLS 1.3 requires every peer to implement. Every default suite
/// stays offered, so no server is refused.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        use rustls::CipherSuite as C;
        match s.suite() {
            C::TLS13_AES_128_GCM_SHA256 => 0,
            C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 1,
            _ => 2,
        }
    });
    Arc::new(p)
}

/// Parses every certificate in a PEM blob.
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let mut reader = pem;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut reader).collect();
    let certs = certs.map_err(|e| TlsError::BadCertificate {
        what: what.to_string(),
        reason: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::BadCertificate {
            what: what.to_string(),
            reason: "no PEM certificate found".into(),
        });
    }
    Ok(certs)
}

/// A client certificate chain and its private key, from PEM: the chain's
/// first certificate must belong to the key. `cert_what` and `key_what`
/// name the two (e.g. their files) in errors.
pub fn client_identity(
    cert_pem: &[u8],
    cert_what: &str,
    key_pem: &[u8],
    key_what: &str,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = certs_from_pem(cert_pem, cert_what)?;
    let bad_key = |reason: String| TlsError::BadCertificate {
        what: key_what.to_string(),
        reason,
    };
    let mut reader = key_pem;
    let key = rustls_pemfile::private_key(&mut reader)
        .map_err(|e| bad_key(e.to_string()))?
        .ok_or_else(|| bad_key("no PEM private key found (PKCS#8, PKCS#1 or SEC1)".into()))?;
    match CertifiedKey::from_der(certs, key, &provider()) {
        Ok(k) => Ok(Arc::new(k)),
        Err(rustls::Error::InconsistentKeys(_)) => Err(bad_key(format!(
            "it is not the key of the first certificate in {cert_what}"
        ))),
        Err(e) => Err(bad_key(e.to_string())),
    }
}

/// Presents the configured client certificate, if any, and records that
/// the server asked for one: a server that requires a certificate the
/// client does not have closes the connection with an alert that says
/// little, which the caller can then explain.
#[derive(Debug)]
struct ClientCert {
    key: Option<Arc<CertifiedKey>>,
    asked: Arc<AtomicBool>,
}

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.asked.store(true, Ordering::Relaxed);
        self.key.clone()
    }

    fn has_certs(&self) -> bool {
        self.key.is_some()
    }
}

/// What a [`PinVerifier`] accepts as the server's certificate.
#[derive(Debug)]
pub enum Pin {
    /// Exactly this certificate, valid for the server name (NBD: the `cert`
    /// and `subject` of `VDI.get_nbd_info`).
    Certificate(CertificateDer<'static>),
    /// The certificate whose DER has this SHA-256 digest, any name (a host
    /// fingerprint the user gave).
    Sha256([u8; 32]),
    /// Anything (`--insecure`, which warns on every run).
    Any,
}

/// Verifies the server certificate against a pin; handshake signatures are
/// always checked with the provider's algorithms.
#[derive(Debug)]
pub struct PinVerifier {
    pub pin: Pin,
    pub provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mismatch =
            || rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure);
        match &self.pin {
            Pin::Certificate(pinned) => {
                if end_entity.as_ref() != pinned.as_ref() {
                    return Err(mismatch());
                }
                let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|_| {
                    rustls::Error::InvalidCertificate(CertificateError::BadEncoding)
                })?;
                cert.verify_is_valid_for_subject_name(server_name)
                    .map_err(|_| {
                        rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
                    })?;
            }
            Pin::Sha256(want) => {
                let got = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
                if got.as_ref() != want.as_slice() {
                    return Err(mismatch());
                }
            }
            Pin::Any => {}
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A verified client configuration and the name to present.
pub fn client_config(
    opts: &TlsOptions,
) -> Result<(Arc<ClientConfig>, ServerName<'static>), TlsError> {
    client_config_watched(opts).map(|(config, name, _)| (config, name))
}

/// [`client_config`], and a flag that becomes true when the server asks for
/// a client certificate during a handshake with this configuration.
pub fn client_config_watched(
    opts: &TlsOptions,
) -> Result<(Arc<ClientConfig>, ServerName<'static>, Arc<AtomicBool>), TlsError> {
    let name = ServerName::try_from(opts.server_name.clone())
        .map_err(|_| TlsError::BadName(opts.server_name.clone()))?;
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let asked = Arc::new(AtomicBool::new(false));
    let client = Arc::new(ClientCert {
        key: opts.client.clone(),
        asked: asked.clone(),
    });
    let config = match &opts.trust {
        Trust::CaPem(pem) => {
            let mut roots = RootCertStore::empty();
            for c in certs_from_pem(pem, "CA file")? {
                roots.add(c).map_err(|e| TlsError::BadCertificate {
                    what: "CA file".into(),
                    reason: e.to_string(),
                })?;
            }
            builder
                .with_root_certificates(roots)
                .with_client_cert_resolver(client)
        }
        Trust::PinnedPem(pem) => {
            let mut certs = certs_from_pem(pem, "pinned certificate")?;
            if certs.len() != 1 {
                return Err(TlsError::BadCertificate {
                    what: "pinned certificate".into(),
                    reason: format!("expected exactly one certificate, found {}", certs.len()),
                });
            }
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinVerifier {
                    pin: Pin::Certificate(certs.remove(0)),
                    provider,
                }))
                .with_client_cert_resolver(client)
        }
    };
    Ok((Arc::new(config), name, asked))
}

#[cfg(test)]
mod suite_tests {
    #[test]
    fn aes_128_gcm_first_and_no_default_suite_dropped() {
        let ours = super::provider();
        assert_eq!(
            ours.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        let mut a: Vec<_> = ours.cipher_suites.iter().map(|s| s.suite()).collect();
        let mut b: Vec<_> = rustls::crypto::ring::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        a.sort_by_key(|s| u16::from(*s));
        b.sort_by_key(|s| u16::from(*s));
        assert_eq!(a, b);
    }
}
