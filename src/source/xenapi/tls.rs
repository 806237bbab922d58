//! TLS for the XenAPI HTTPS endpoint: system roots, a CA file, a pinned
//! SHA-256 certificate fingerprint (as `openssl x509 -fingerprint -sha256`
//! prints it, and as `cbtvault sim` shows), or no verification at all when
//! the user asked for `--insecure` (the command warns on every run).
//! NBD TLS is separate (`nbd::tls`, pinned to get_nbd_info's cert).

use nbd::tls::{CertificateRefused, Pin, Refusal, Verifier};
use rustls::{ClientConfig, RootCertStore};

use super::XenApiError;

/// Whom the XenAPI client trusts.
#[derive(Clone)]
pub enum HttpsTrust {
    /// The operating system's certificate authorities.
    System,
    /// PEM certificates of certificate authorities (`--ca-file`).
    CaPem(Vec<u8>),
    /// Exactly the certificates with these SHA-256 digests of their DER
    /// (`--fingerprint`, once per pool member).
    Fingerprint(Vec<[u8; 32]>),
    /// No verification (`--insecure`).
    Insecure,
}

impl std::fmt::Debug for HttpsTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpsTrust::System => write!(f, "System"),
            HttpsTrust::CaPem(_) => write!(f, "CaPem"),
            HttpsTrust::Fingerprint(d) => {
                let shown: Vec<String> = d.iter().map(|d| format_fingerprint(d)).collect();
                write!(f, "Fingerprint({})", shown.join(", "))
            }
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
    nbd::tls::format_fingerprint(d)
}

/// What to do about a refused host certificate, in this client's options
/// (`--fingerprint`, `--ca-file`); never turning verification off.
pub fn advice(refused: &CertificateRefused) -> String {
    let fp = &refused.fingerprint;
    let check =
        "on the host: openssl x509 -noout -fingerprint -sha256 -in /etc/xensource/xapi-ssl.pem";
    match &refused.refusal {
        Refusal::FingerprintMismatch { .. } => format!(
            "if the host's certificate was replaced on purpose ({check}), trust the new one with --fingerprint {fp}; otherwise something between here and the host presents its own certificate"
        ),
        Refusal::WrongName { .. } => format!(
            "connect to a name the certificate carries, or, if that is the host's certificate ({check}), trust exactly it with --fingerprint {fp}"
        ),
        Refusal::Expired { .. } | Refusal::NotYetValid { .. } => format!(
            "renew the host's certificate (or check this machine's clock); until then, if that is the host's certificate ({check}), trust exactly it with --fingerprint {fp}"
        ),
        _ => format!(
            "if that is the host's certificate ({check}), trust exactly it with --fingerprint {fp}, or give --ca-file FILE with the certificate authority that issued it"
        ),
    }
}

/// A rustls client configuration (ring provider) for the given trust.
pub fn client_config(trust: &HttpsTrust) -> Result<ClientConfig, XenApiError> {
    let provider = nbd::tls::provider();
    let tls = |e: nbd::tls::TlsError| XenApiError::Tls(e.to_string());
    let verifier = match trust {
        HttpsTrust::System => {
            let mut store = RootCertStore::empty();
            let _ignored =
                store.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            // An empty store refuses every certificate, naming it.
            Verifier::authorities(store, provider.clone()).map_err(tls)?
        }
        HttpsTrust::CaPem(pem) => {
            nbd::tls::authorities_from_pem(pem, "CA file", provider.clone()).map_err(tls)?
        }
        HttpsTrust::Fingerprint(d) => Verifier::pinned(Pin::Sha256(d.clone()), provider.clone()),
        HttpsTrust::Insecure => Verifier::pinned(Pin::Any, provider.clone()),
    };
    nbd::tls::verified_client(verifier, provider).map_err(tls)
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
