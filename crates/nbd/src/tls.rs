//! TLS for NBD and other clients: trust a CA file or exactly one pinned
//! server certificate (as XenServer's `VDI.get_nbd_info` returns it), and
//! always verify the server name. There is no way to turn verification off
//! here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: {reason}")]
    BadCertificate { what: String, reason: String },
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("'{0}' is not a valid TLS server name")]
    BadName(String),
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A PEM file (or blob) without what it should hold; `origin` names it
/// (`CA file '/etc/ca.pem'`).
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("cannot read {origin}: {source}")]
    Read {
        origin: String,
        source: std::io::Error,
    },
    #[error("{origin} is not PEM: {reason}")]
    NotPem { origin: String, reason: String },
    #[error("{origin} holds no PEM certificate{}", found_note(.found))]
    NoCertificate {
        origin: String,
        found: Vec<&'static str>,
    },
    #[error("{origin} holds no PEM private key{}", found_note(.found))]
    NoKey {
        origin: String,
        found: Vec<&'static str>,
    },
}

fn found_note(found: &[&str]) -> String {
    format!(" (it holds {})", found.join(", "))
}

fn section_name(kind: SectionKind) -> &'static str {
    match kind {
        SectionKind::Certificate => "a certificate",
        SectionKind::PublicKey => "a public key",
        SectionKind::RsaPrivateKey | SectionKind::PrivateKey | SectionKind::EcPrivateKey => {
            "a private key"
        }
        SectionKind::Crl => "a revocation list",
        SectionKind::Csr => "a certificate request",
        _ => "another PEM section",
    }
}

/// Every known PEM section of `pem`, in order; a malformed one is an error.
/// None at all is an error too: then the file is not PEM.
fn pem_sections(pem: &[u8], origin: &str) -> Result<Vec<(SectionKind, Vec<u8>)>, PemError> {
    let not_pem = |reason: String| PemError::NotPem {
        origin: origin.to_string(),
        reason,
    };
    let sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| not_pem(e.to_string()))?;
    if sections.is_empty() {
        return Err(not_pem(if pem.starts_with(&[0x30]) {
            "it looks like DER; convert it with 'openssl x509 -inform der'".into()
        } else {
            "no '-----BEGIN ...-----' section in it".into()
        }));
    }
    Ok(sections)
}

fn kinds(sections: &[(SectionKind, Vec<u8>)]) -> Vec<&'static str> {
    let mut found: Vec<&'static str> = sections.iter().map(|(k, _)| section_name(*k)).collect();
    found.dedup();
    found
}

/// Every certificate in a PEM blob; `origin` names it in errors. At least
/// one is required.
pub fn parse_certs(pem: &[u8], origin: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let sections = pem_sections(pem, origin)?;
    let certs: Vec<CertificateDer<'static>> = sections
        .iter()
        .filter(|(k, _)| *k == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der.clone()))
        .collect();
    if certs.is_empty() {
        return Err(PemError::NoCertificate {
            origin: origin.to_string(),
            found: kinds(&sections),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM blob.
pub fn parse_private_key(pem: &[u8], origin: &str) -> Result<PrivateKeyDer<'static>, PemError> {
    let sections = pem_sections(pem, origin)?;
    sections
        .iter()
        .find_map(|(k, der)| PrivateKeyDer::from_pem(*k, der.clone()))
        .ok_or_else(|| PemError::NoKey {
            origin: origin.to_string(),
            found: kinds(&sections),
        })
}

/// Reads a PEM file; `what` says what it is for (`CA file`).
pub fn read_pem_file(path: &std::path::Path, what: &str) -> Result<(Vec<u8>, String), PemError> {
    let origin = format!("{what} '{}'", path.display());
    match std::fs::read(path) {
        Ok(bytes) => Ok((bytes, origin)),
        Err(source) => Err(PemError::Read { origin, source }),
    }
}

/// Parses every certificate in a PEM blob (`what` names it in errors).
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    Ok(parse_certs(pem, what)?)
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

/// SHA-256 of a certificate's DER as `openssl x509 -fingerprint -sha256`
/// prints it: uppercase hex pairs joined by `:`.
pub fn fingerprint(der: &[u8]) -> String {
    format_fingerprint(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

/// `AB:CD:...` of a digest.
pub fn format_fingerprint(digest: &[u8]) -> String {
    digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Why a server certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No trusted certificate authority issued it.
    UntrustedIssuer,
    /// Past its notAfter (seconds since the epoch, when known).
    Expired { not_after: Option<u64> },
    /// Before its notBefore (seconds since the epoch, when known).
    NotYetValid { not_before: Option<u64> },
    /// Not valid for the name the client connected to.
    WrongName { expected: String },
    /// A SHA-256 fingerprint was pinned and the certificate has another.
    FingerprintMismatch { expected: String },
    /// A certificate was pinned and the server presented another one
    /// (`pinned` is the pinned one's fingerprint).
    NotPinned { pinned: String },
    /// Anything else the verification reported.
    Other(String),
}

/// A refused server certificate: why, and what the server presented.
/// Carried through rustls as [`CertificateError::Other`]; find it in an
/// error chain with [`refusal_in`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRefused {
    pub refusal: Refusal,
    /// SHA-256 of the presented end-entity certificate, `AB:CD:...`.
    pub fingerprint: String,
    /// DNS names and IP addresses the certificate is valid for.
    pub names: Vec<String>,
    /// The certificate is its own issuer.
    pub self_signed: bool,
}

impl std::error::Error for CertificateRefused {}

impl std::fmt::Display for CertificateRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.refusal {
            Refusal::UntrustedIssuer if self.self_signed => f.write_str(
                "it is self-signed, not issued by a certificate authority this client trusts",
            )?,
            Refusal::UntrustedIssuer => {
                f.write_str("it is not issued by a certificate authority this client trusts")?
            }
            Refusal::Expired { not_after } => match not_after {
                Some(t) => write!(f, "it expired on {}", utc(*t))?,
                None => f.write_str("it has expired")?,
            },
            Refusal::NotYetValid { not_before } => match not_before {
                Some(t) => write!(f, "it is not valid before {}", utc(*t))?,
                None => f.write_str("it is not valid yet")?,
            },
            Refusal::WrongName { expected } => {
                write!(f, "it is for {}, not for '{expected}'", self.names_text())?
            }
            Refusal::FingerprintMismatch { expected } => write!(
                f,
                "it is not the expected certificate (expected SHA-256 fingerprint {expected})"
            )?,
            Refusal::NotPinned { pinned } => write!(
                f,
                "it is not the pinned certificate (pinned SHA-256 fingerprint {pinned})"
            )?,
            Refusal::Other(reason) => write!(f, "{reason}")?,
        }
        write!(f, "; its SHA-256 fingerprint is {}", self.fingerprint)
    }
}

impl CertificateRefused {
    /// The certificate's names for a message: `'a', 'b'`, or that it has none.
    pub fn names_text(&self) -> String {
        if self.names.is_empty() {
            "no name (it has no subjectAltName)".into()
        } else {
            self.names
                .iter()
                .map(|n| format!("'{n}'"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    }

    /// What to do, in NBD client options (`--tls-cert-pin`, `--tls-ca`,
    /// `--tls-name`); never turning verification off.
    pub fn nbd_advice(&self) -> String {
        match &self.refusal {
            Refusal::WrongName { .. } if !self.names.is_empty() => format!(
                "if this is the right server, connect with --tls-name set to one of {}",
                self.names_text()
            ),
            Refusal::WrongName { .. } => {
                "the certificate cannot be checked by name: reissue it with the server's name in subjectAltName".into()
            }
            Refusal::Expired { .. } | Refusal::NotYetValid { .. } => {
                "renew the server's certificate (or check this machine's clock)".into()
            }
            _ => "if that is the server's certificate, trust it with --tls-cert-pin FILE (that certificate, PEM), or give --tls-ca FILE with the certificate authority that issued it".into(),
        }
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` of seconds since the epoch.
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The names a certificate is valid for. webpki lists them only in a
/// name-mismatch error, so ask it about a name no certificate may carry.
fn names_of(cert: &webpki::EndEntityCert<'_>) -> Vec<String> {
    let Ok(probe) = ServerName::try_from("cbtvault-probe.invalid") else {
        return Vec::new();
    };
    match cert.verify_is_valid_for_subject_name(&probe) {
        Err(webpki::Error::CertNotValidForName(context)) => {
            context.presented.iter().map(|n| clean_name(n)).collect()
        }
        _ => Vec::new(),
    }
}

/// `DnsName("a")` -> `a`, `IpAddress(1.2.3.4)` -> `1.2.3.4` (webpki's
/// debug form of a subjectAltName).
fn clean_name(presented: &str) -> String {
    if let Some(n) = presented
        .strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"))
    {
        return n.to_string();
    }
    if let Some(n) = presented
        .strip_prefix("IpAddress(")
        .and_then(|n| n.strip_suffix(')'))
    {
        return n.to_string();
    }
    presented.to_string()
}

/// What the presented certificate says about itself, for a refusal.
fn refused(end_entity: &CertificateDer<'_>, refusal: Refusal) -> CertificateRefused {
    let (names, self_signed) = match webpki::EndEntityCert::try_from(end_entity) {
        Ok(cert) => (names_of(&cert), cert.issuer() == cert.subject()),
        Err(_) => (Vec::new(), false),
    };
    CertificateRefused {
        refusal,
        fingerprint: fingerprint(end_entity.as_ref()),
        names,
        self_signed,
    }
}

/// A rustls refusal of a chain, in plain words.
fn refusal_of(error: &rustls::Error, server_name: &ServerName<'_>) -> Refusal {
    use CertificateError as C;
    let rustls::Error::InvalidCertificate(e) = error else {
        return Refusal::Other(error.to_string());
    };
    match e {
        // A chain to no trusted root; for a self-signed certificate webpki
        // may also report its signature against an unrelated root.
        C::UnknownIssuer
        | C::BadSignature
        | C::UnsupportedSignatureAlgorithmContext { .. }
        | C::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => Refusal::UntrustedIssuer,
        C::Expired => Refusal::Expired { not_after: None },
        C::ExpiredContext { not_after, .. } => Refusal::Expired {
            not_after: Some(not_after.as_secs()),
        },
        C::NotValidYet => Refusal::NotYetValid { not_before: None },
        C::NotValidYetContext { not_before, .. } => Refusal::NotYetValid {
            not_before: Some(not_before.as_secs()),
        },
        C::NotValidForName | C::NotValidForNameContext { .. } => Refusal::WrongName {
            expected: server_name.to_str().into_owned(),
        },
        _ => Refusal::Other(error.to_string()),
    }
}

/// The refusal behind `error`, searching its whole chain (through I/O
/// errors that wrap a rustls error, as tokio-rustls and hyper make them).
pub fn refusal_in<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a CertificateRefused> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(r) = e.downcast_ref::<CertificateRefused>() {
            return Some(r);
        }
        if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) =
            e.downcast_ref::<rustls::Error>()
        {
            if let Some(r) = other.0.downcast_ref::<CertificateRefused>() {
                return Some(r);
            }
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(r) = refusal_in(inner) {
                return Some(r);
            }
        }
        next = e.source();
    }
    None
}

/// Plain words for a TLS failure that is not a refused certificate: the
/// server's alert, or its closing the connection (rustls' own text for
/// that carries a documentation link). `None` when `error` is no such
/// failure.
pub fn failure_text(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(rustls::Error::AlertReceived(alert)) = e.downcast_ref::<rustls::Error>() {
            use rustls::AlertDescription as A;
            return Some(match alert {
                A::CertificateRequired => {
                    "the server requires a client certificate (TLS alert certificate_required)"
                        .into()
                }
                A::HandshakeFailure => "the server refused the TLS handshake (alert handshake_failure; it may require a client certificate)".into(),
                other => format!("the server ended TLS with alert {other:?}"),
            });
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::UnexpectedEof
                && io.to_string().contains("close_notify")
            {
                return Some(
                    "the server closed the TLS connection abruptly (without close_notify)".into(),
                );
            }
            if let Some(text) = io.get_ref().and_then(|inner| failure_text(inner)) {
                return Some(text);
            }
        }
        next = e.source();
    }
    None
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
    let certs = parse_certs(cert_pem, cert_what)?;
    let key = parse_private_key(key_pem, key_what)?;
    let bad_key = |reason: String| TlsError::BadCertificate {
        what: key_what.to_string(),
        reason,
    };
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

/// What a [`Verifier`] pins instead of checking a chain.
#[derive(Debug)]
pub enum Pin {
    /// Exactly this certificate, valid for the server name (NBD: the `cert`
    /// and `subject` of `VDI.get_nbd_info`).
    Certificate(CertificateDer<'static>),
    /// A certificate whose DER has one of these SHA-256 digests, any name
    /// (host fingerprints the user gave: one per pool member).
    Sha256(Vec<[u8; 32]>),
    /// Anything (`--insecure`, which warns on every run).
    Any,
}

#[derive(Debug)]
enum Check {
    /// A chain to these roots, valid now and for the name (webpki).
    Authorities(Arc<WebPkiServerVerifier>),
    Pin(Pin),
    /// No trusted authority at all (an empty system store): every
    /// certificate is refused, still naming what was presented.
    Nothing,
}

/// Verifies the server certificate against trusted authorities or a pin,
/// and turns every refusal into a [`CertificateRefused`] naming the
/// presented certificate; handshake signatures are always checked with
/// the provider's algorithms.
#[derive(Debug)]
pub struct Verifier {
    check: Check,
    provider: Arc<CryptoProvider>,
}

impl Verifier {
    /// Trusts chains to `roots` (none when it is empty).
    pub fn authorities(
        roots: RootCertStore,
        provider: Arc<CryptoProvider>,
    ) -> Result<Verifier, TlsError> {
        if roots.is_empty() {
            return Ok(Verifier {
                check: Check::Nothing,
                provider,
            });
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| TlsError::BadCertificate {
                what: "trusted certificates".into(),
                reason: e.to_string(),
            })?;
        Ok(Verifier {
            check: Check::Authorities(webpki),
            provider,
        })
    }

    /// Trusts what `pin` says.
    pub fn pinned(pin: Pin, provider: Arc<CryptoProvider>) -> Verifier {
        Verifier {
            check: Check::Pin(pin),
            provider,
        }
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let outcome = match &self.check {
            Check::Authorities(webpki) => webpki
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
                .map(|_| ())
                .map_err(|e| refusal_of(&e, server_name)),
            Check::Pin(pin) => check_pin(pin, end_entity, server_name),
            Check::Nothing => Err(Refusal::UntrustedIssuer),
        };
        match outcome {
            Ok(()) => Ok(ServerCertVerified::assertion()),
            Err(refusal) => Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(refused(end_entity, refusal))),
            ))),
        }
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

fn check_pin(
    pin: &Pin,
    end_entity: &CertificateDer<'_>,
    server_name: &ServerName<'_>,
) -> Result<(), Refusal> {
    match pin {
        Pin::Certificate(pinned) => {
            if end_entity.as_ref() != pinned.as_ref() {
                return Err(Refusal::NotPinned {
                    pinned: fingerprint(pinned.as_ref()),
                });
            }
            let cert = webpki::EndEntityCert::try_from(end_entity)
                .map_err(|e| Refusal::Other(format!("the certificate cannot be parsed: {e}")))?;
            cert.verify_is_valid_for_subject_name(server_name)
                .map_err(|_| Refusal::WrongName {
                    expected: server_name.to_str().into_owned(),
                })
        }
        Pin::Sha256(wanted) => {
            let got = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
            if !wanted.iter().any(|w| got.as_ref() == w.as_slice()) {
                return Err(Refusal::FingerprintMismatch {
                    expected: wanted
                        .iter()
                        .map(|w| format_fingerprint(w))
                        .collect::<Vec<_>>()
                        .join(" or "),
                });
            }
            Ok(())
        }
        Pin::Any => Ok(()),
    }
}

/// Trusts chains to the authorities in a PEM blob (`what` names it); a
/// blob without one certificate usable as an authority is an error, never
/// an empty (refuse-all) or system store.
pub fn authorities_from_pem(
    pem: &[u8],
    what: &str,
    provider: Arc<CryptoProvider>,
) -> Result<Verifier, TlsError> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(parse_certs(pem, what)?);
    if added == 0 {
        return Err(TlsError::BadCertificate {
            what: what.into(),
            reason: "no certificate in it can be used as an authority".into(),
        });
    }
    Verifier::authorities(roots, provider)
}

/// A client configuration that verifies servers with `verifier` and
/// presents no certificate (HTTPS clients: XenAPI, S3).
pub fn verified_client(
    verifier: Verifier,
    provider: Arc<CryptoProvider>,
) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
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
            for c in parse_certs(pem, "CA file")? {
                roots.add(c).map_err(|e| TlsError::BadCertificate {
                    what: "CA file".into(),
                    reason: e.to_string(),
                })?;
            }
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Verifier::authorities(roots, provider)?))
                .with_client_cert_resolver(client)
        }
        Trust::PinnedPem(pem) => {
            let mut certs = parse_certs(pem, "pinned certificate")?;
            if certs.len() != 1 {
                return Err(TlsError::BadCertificate {
                    what: "pinned certificate".into(),
                    reason: format!("expected exactly one certificate, found {}", certs.len()),
                });
            }
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Verifier::pinned(
                    Pin::Certificate(certs.remove(0)),
                    provider,
                )))
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

#[cfg(test)]
mod pem_tests {
    use super::*;

    // PEM framing only: the parser does not look inside the DER.
    const CERT: &str = "-----BEGIN CERTIFICATE-----\nAQID\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nBAUG\n-----END PRIVATE KEY-----\n";
    const ORIGIN: &str = "CA file '/etc/x/ca.pem'";

    #[test]
    fn certificates_and_keys_are_found_in_order() {
        let both = format!("comment line\n{CERT}{KEY}{CERT}");
        let certs = parse_certs(both.as_bytes(), ORIGIN).unwrap();
        assert_eq!(certs.len(), 2);
        assert_eq!(certs[0].as_ref(), &[1, 2, 3]);
        let key = parse_private_key(both.as_bytes(), ORIGIN).unwrap();
        assert_eq!(key.secret_der(), &[4, 5, 6]);
    }

    #[test]
    fn file_without_certificate_names_the_file_and_what_it_holds() {
        let e = parse_certs(KEY.as_bytes(), ORIGIN).unwrap_err();
        assert!(matches!(&e, PemError::NoCertificate { found, .. } if found == &["a private key"]));
        assert_eq!(
            e.to_string(),
            "CA file '/etc/x/ca.pem' holds no PEM certificate (it holds a private key)"
        );
    }

    #[test]
    fn garbage_is_not_pem_and_names_the_file() {
        for garbage in [&b"hello\nworld\n"[..], b"", &[0x30, 0x82, 0x01, 0x00]] {
            let e = parse_certs(garbage, ORIGIN).unwrap_err();
            assert!(matches!(e, PemError::NotPem { .. }), "{e}");
            assert!(
                e.to_string()
                    .starts_with("CA file '/etc/x/ca.pem' is not PEM: "),
                "{e}"
            );
        }
        // A section whose body is not base64, and one never closed.
        let broken = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        let open = "-----BEGIN CERTIFICATE-----\nAQID\n";
        for text in [broken, open] {
            let e = parse_certs(text.as_bytes(), ORIGIN).unwrap_err();
            assert!(matches!(e, PemError::NotPem { .. }), "{e}");
            assert!(e.to_string().contains(ORIGIN), "{e}");
        }
    }

    #[test]
    fn key_file_without_key_names_the_file() {
        let e = parse_private_key(CERT.as_bytes(), "TLS key '/k.pem'").unwrap_err();
        assert!(matches!(e, PemError::NoKey { .. }));
        assert_eq!(
            e.to_string(),
            "TLS key '/k.pem' holds no PEM private key (it holds a certificate)"
        );
        let e = parse_private_key(b"junk", "TLS key '/k.pem'").unwrap_err();
        assert!(matches!(e, PemError::NotPem { .. }), "{e}");
    }

    #[test]
    fn unreadable_file_names_the_file() {
        let path = std::path::Path::new("/nonexistent/cbtvault/ca.pem");
        let e = read_pem_file(path, "--tls-ca file").unwrap_err();
        assert!(matches!(e, PemError::Read { .. }));
        assert!(
            e.to_string()
                .starts_with("cannot read --tls-ca file '/nonexistent/cbtvault/ca.pem': "),
            "{e}"
        );
        let e = crate::server::server_config_from_pem_files(path, path).unwrap_err();
        assert!(
            e.to_string().contains("TLS certificate '/nonexistent"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::*;

    #[test]
    fn fingerprints_print_as_openssl_does() {
        assert_eq!(format_fingerprint(&[0x0a, 0xff, 0x00]), "0A:FF:00");
        // SHA-256 of nothing.
        assert!(fingerprint(b"").starts_with("E3:B0:C4:42:98:FC:1C:14:"));
        assert_eq!(fingerprint(b"").len(), 95);
    }

    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(4_102_444_799), "2099-12-31 23:59:59 UTC");
    }

    #[test]
    fn refusals_say_what_happened_and_what_to_do() {
        let r = |refusal, self_signed| CertificateRefused {
            refusal,
            fingerprint: "AB:CD".into(),
            names: vec!["localhost".into(), "127.0.0.1".into()],
            self_signed,
        };
        let s = r(Refusal::UntrustedIssuer, true);
        assert_eq!(
            s.to_string(),
            "it is self-signed, not issued by a certificate authority this client trusts; its SHA-256 fingerprint is AB:CD"
        );
        assert!(s.nbd_advice().contains("--tls-cert-pin FILE"));
        let n = r(
            Refusal::WrongName {
                expected: "nas".into(),
            },
            false,
        );
        assert!(n
            .to_string()
            .starts_with("it is for 'localhost', '127.0.0.1', not for 'nas'"));
        assert!(n.nbd_advice().contains("--tls-name"));
        let e = r(Refusal::Expired { not_after: Some(0) }, false);
        assert!(e.to_string().contains("expired on 1970-01-01"));
        for refused in [s, n, e] {
            assert!(!refused.nbd_advice().contains("insecure"));
        }
    }

    #[test]
    fn refusal_is_found_through_io_and_rustls_errors() {
        let refused = CertificateRefused {
            refusal: Refusal::UntrustedIssuer,
            fingerprint: "AB".into(),
            names: vec![],
            self_signed: false,
        };
        let rustls_error = rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
            Arc::new(refused.clone()),
        )));
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls_error);
        assert_eq!(refusal_in(&io), Some(&refused));
        let other = std::io::Error::new(std::io::ErrorKind::InvalidData, "x");
        assert_eq!(refusal_in(&other), None);
        let alert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
        );
        assert!(failure_text(&alert).unwrap().contains("client certificate"));
    }
}
