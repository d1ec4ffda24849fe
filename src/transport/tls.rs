//! The one TLS client configuration guestd uses, for REST calls and websockets alike: rustls
//! with the `ring` provider, the webpki roots plus any extra CA the configuration names, and
//! verification always on (there is no switch to turn it off). One function, so the two
//! transports cannot drift apart.

use rustls::pki_types::CertificateDer;
use std::sync::Arc;

/// Why the TLS configuration could not be built.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    /// An extra CA certificate was refused.
    #[error("extra CA certificate refused: {0}")]
    ExtraRoot(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// A client configuration trusting the webpki roots and `extra_roots`.
pub fn client_config(
    extra_roots: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots =
        rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for der in extra_roots {
        roots
            .add(der.clone())
            .map_err(|e| TlsError::ExtraRoot(e.to_string()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError::Config(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_bad_extra_root_is_refused_not_ignored() {
        let bad = rustls::pki_types::CertificateDer::from(vec![1u8, 2, 3]);
        assert!(super::client_config(&[]).is_ok());
        assert!(super::client_config(&[bad]).is_err());
    }
}
