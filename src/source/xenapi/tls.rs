//! TLS for the XenAPI HTTPS endpoint: system roots, a CA file, a pinned
//! SHA-256 certificate fingerprint (as `openssl x509 -fingerprint -sha256`
//! prints it, and as `cbtvault sim` shows), or no verification at all when
//! the user asked for `--insecure` (the command warns on every run).
//! NBD TLS is separate (`nbd::tls`, pinned to get_nbd_info's cert).

use std::sync::Arc;

use nbd::tls::{Pin, PinVerifier};
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use super::XenApiError;

/// Whom the XenAPI client trusts.
#[derive(Clone)]
pub enum HttpsTrust {
    /// The operating system's certificate authorities.
    System,
    /// PEM certificates of certificate authorities (`--ca-file`).
    CaPem(Vec<u8>),
    /// Exactly the certificate with this SHA-256 digest of its DER.
    Fingerprint([u8; 32]),
    /// No verification (`--insecure`).
    Insecure,
}

impl std::fmt::Debug for HttpsTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpsTrust::System => write!(f, "System"),
            HttpsTrust::CaPem(_) => write!(f, "CaPem"),
            HttpsTrust::Fingerprint(d) => write!(f, "Fingerprint({})", format_fingerprint(d)),
            HttpsTrust::Insecure => write!(f, "Insecure"),
        }
    }
}

/// Parses `AB:CD:...` or plain hex (64 digits), case-insensitive, with an
/// optional `sha256:` / `SHA256=` prefix.
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], XenApiError> {
    let t = text.trim();
    let t = [
        "sha256:",
        "sha256=",
        "SHA256:",
        "SHA256=",
        "sha256 Fingerprint=",
    ]
    .iter()
    .find_map(|p| t.strip_prefix(p))
    .unwrap_or(t);
    let digits: String = t.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(&digits).map_err(|_| {
        XenApiError::Invalid(format!(
            "fingerprint '{text}' is not a SHA-256 digest in hex (AB:CD:... or 64 hex digits)"
        ))
    })?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        XenApiError::Invalid(format!(
            "fingerprint '{text}' has {} bytes; SHA-256 has 32",
            b.len()
        ))
    })
}

pub fn format_fingerprint(d: &[u8]) -> String {
    d.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A rustls client configuration (ring provider) for the given trust.
pub fn client_config(trust: &HttpsTrust) -> Result<ClientConfig, XenApiError> {
    let provider = nbd::tls::provider();
    let tls = |e: rustls::Error| XenApiError::Tls(e.to_string());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls)?;
    let roots = |certs: Vec<CertificateDer<'static>>, what: &str| {
        let mut store = RootCertStore::empty();
        let (added, _ignored) = store.add_parsable_certificates(certs);
        if added == 0 {
            return Err(XenApiError::Tls(format!("{what}: no usable certificate")));
        }
        Ok(store)
    };
    Ok(match trust {
        HttpsTrust::System => {
            let found = rustls_native_certs::load_native_certs();
            let store = roots(found.certs, "system certificate store")?;
            builder.with_root_certificates(store).with_no_client_auth()
        }
        HttpsTrust::CaPem(pem) => {
            let certs = nbd::tls::certs_from_pem(pem, "CA file")
                .map_err(|e| XenApiError::Tls(e.to_string()))?;
            builder
                .with_root_certificates(roots(certs, "CA file")?)
                .with_no_client_auth()
        }
        HttpsTrust::Fingerprint(d) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin: Pin::Sha256(*d),
                provider,
            }))
            .with_no_client_auth(),
        HttpsTrust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin: Pin::Any,
                provider,
            }))
            .with_no_client_auth(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints() {
        let colon = (0..32)
            .map(|i| format!("{i:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let d = parse_fingerprint(&colon).unwrap();
        assert_eq!(d[31], 31);
        assert_eq!(
            parse_fingerprint(&format!("sha256:{}", hex::encode(d))).unwrap(),
            d
        );
        assert_eq!(format_fingerprint(&d).to_ascii_lowercase(), colon);
        assert!(parse_fingerprint("AB:CD").is_err());
        assert!(parse_fingerprint("zz").is_err());
    }
}
