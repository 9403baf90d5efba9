//! The connector of every backend: plain TCP for `http://` and `h2c://`, TCP then TLS for
//! `https://`.
//!
//! TLS is rustls on the `ring` provider, passed explicitly to each client configuration, so
//! nothing process-wide (a default provider) has to be installed. The server name (SNI, and
//! the name the certificate must be valid for) is the URL's host; an IP address is checked
//! against the certificate's IP addresses and sends no SNI (RFC 6066). Certificates are
//! always verified — there is no switch to turn that off — against the system's roots
//! (rustls-native-certs: the OS store, or `SSL_CERT_FILE` / `SSL_CERT_DIR`), plus
//! `UPSTREAM_CA_FILE`. ALPN offers `h2` and `http/1.1` (only `h2` for a backend with the
//! `h2` option), and hyper-util's client speaks HTTP/2 on a connection whose server picked
//! `h2`.
//!
//! A connection is TCP connect and TLS handshake together, within `CONNECT_TIMEOUT_SECS`.
//! Any failure of either is a connect error to the client (breaker, retry, 502), whose
//! message says what went wrong with the handshake in words ([`TlsFailed`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use rustls::{CertificateError, ClientConfig, RootCertStore};

use crate::config::{BackendConfig, CaFile, PoolConfig};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The rustls client configurations of one pool's `https://` backends: one offering `h2`
/// and `http/1.1`, one offering `h2` only. Built once per pool, shared by its backends.
pub struct TlsConfigs {
    any: Arc<ClientConfig>,
    h2_only: Arc<ClientConfig>,
}

impl TlsConfigs {
    /// Trusting the system's roots and `ca`'s certificates.
    pub fn new(ca: Option<&CaFile>) -> TlsConfigs {
        let mut roots = system_roots().clone();
        if let Some(ca) = ca {
            // Each was checked when the configuration was read.
            let (added, _) = roots.add_parsable_certificates(ca.certs.iter().cloned());
            tracing::debug!(
                path = %ca.path,
                certificates = added,
                "UPSTREAM_CA_FILE trusted for https backends"
            );
        }
        if roots.is_empty() {
            tracing::warn!(
                "no CA certificate to check https backends against: the system has none \
                 (install ca-certificates, or set SSL_CERT_FILE) and UPSTREAM_CA_FILE is unset; \
                 every TLS handshake will fail"
            );
        }
        let config = |alpn: &[&[u8]]| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                // The ring provider supports every default version.
                .expect("ring supports TLS 1.2 and 1.3")
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Arc::new(config)
        };
        TlsConfigs {
            any: config(&[b"h2", b"http/1.1"]),
            h2_only: config(&[b"h2"]),
        }
    }
}

/// The system's root certificates, loaded once per process (only when there is an
/// `https://` backend).
fn system_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::warn!(%error, "could not load some system CA certificates");
        }
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        tracing::debug!(added, ignored, "system CA certificates loaded");
        roots
    })
}

/// One backend's connector (see the module docs); cheap to clone.
#[derive(Clone)]
pub enum Connector {
    Plain(HttpConnector),
    Tls {
        https: HttpsConnector<HttpConnector>,
        /// TCP connect plus TLS handshake.
        timeout: Duration,
    },
}

impl Connector {
    /// For backend `cfg`; `tls` is needed (and used) only for an `https://` one.
    pub fn new(cfg: &BackendConfig, pool: &PoolConfig, tls: Option<&TlsConfigs>) -> Connector {
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(pool.connect_timeout));
        match tls.filter(|_| cfg.url.tls) {
            None => {
                // A URI that is not `http://` fails rather than go out in cleartext.
                tcp.enforce_http(true);
                Connector::Plain(tcp)
            }
            Some(tls) => {
                tcp.enforce_http(false);
                let config = if cfg.http2 { &tls.h2_only } else { &tls.any };
                let resolver = Arc::new(hyper_rustls::DefaultServerNameResolver::default());
                Connector::Tls {
                    // `force_https`: never cleartext to an `https://` backend.
                    https: HttpsConnector::new(tcp, config.clone(), true, resolver),
                    timeout: pool.connect_timeout,
                }
            }
        }
    }
}

type Stream = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;

impl tower_service::Service<Uri> for Connector {
    type Response = Stream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Connector::Plain(tcp) => tcp.poll_ready(cx).map_err(Into::into),
            Connector::Tls { https, .. } => https.poll_ready(cx),
        }
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        match self {
            Connector::Plain(tcp) => {
                let connecting = tcp.call(dst);
                Box::pin(async move { Ok(MaybeHttpsStream::Http(connecting.await?)) })
            }
            Connector::Tls { https, timeout } => {
                let host = dst.host().unwrap_or_default().to_owned();
                let timeout = *timeout;
                let connecting = https.call(dst);
                Box::pin(async move {
                    match tokio::time::timeout(timeout, connecting).await {
                        Ok(Ok(stream)) => Ok(stream),
                        Ok(Err(e)) => Err(match rustls_error(&*e) {
                            Some(tls) => Box::new(TlsFailed::new(&host, tls)) as BoxError,
                            None => e,
                        }),
                        Err(_) => Err(Box::new(TlsFailed {
                            host,
                            reason: format!(
                                "no connection within CONNECT_TIMEOUT_SECS ({}s: TCP connect and TLS handshake)",
                                timeout.as_secs_f64()
                            ),
                        }) as BoxError),
                    }
                })
            }
        }
    }
}

/// The rustls error inside a connector's error: hyper-rustls and tokio-rustls wrap it in
/// `io::Error`s, whose `source` skips the wrapped error, so look inside them too.
fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        return rustls_error(inner);
    }
    e.source().and_then(rustls_error)
}

/// A TLS connection to a backend that could not be set up, and why, in the operator's
/// words: it ends the `upstream connect failed` log line.
#[derive(Debug)]
pub struct TlsFailed {
    host: String,
    reason: String,
}

impl TlsFailed {
    fn new(host: &str, e: &rustls::Error) -> TlsFailed {
        let reason = match e {
            rustls::Error::InvalidCertificate(cert) => match cert {
                CertificateError::UnknownIssuer => "certificate not trusted: not issued by a \
                     system CA or one in UPSTREAM_CA_FILE"
                    .to_owned(),
                CertificateError::NotValidForName => format!("certificate not valid for `{host}`"),
                CertificateError::Expired => "certificate expired".to_owned(),
                CertificateError::NotValidYet => "certificate not valid yet".to_owned(),
                // rustls words these well, with the names or times.
                CertificateError::NotValidForNameContext { .. }
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYetContext { .. } => cert.to_string(),
                other => format!("certificate refused: {other}"),
            },
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
                format!("the backend does not speak TLS here (an http:// backend?): {e}")
            }
            rustls::Error::NoApplicationProtocol => {
                "the backend accepts none of the offered protocols (ALPN: h2, http/1.1)".to_owned()
            }
            other => other.to_string(),
        };
        TlsFailed {
            host: host.to_owned(),
            reason,
        }
    }
}

impl std::fmt::Display for TlsFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TLS to {} failed: {}", self.host, self.reason)
    }
}

impl std::error::Error for TlsFailed {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reason is found under the `io::Error` layers hyper-rustls adds, and worded.
    #[test]
    fn certificate_errors_are_worded() {
        let wrapped = |e: rustls::Error| -> BoxError {
            Box::new(std::io::Error::other(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                e,
            )))
        };
        let said = |e: rustls::Error| {
            let boxed = wrapped(e);
            let tls = rustls_error(&*boxed).expect("found");
            TlsFailed::new("localhost", tls).to_string()
        };
        assert!(said(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer
        ))
        .contains("certificate not trusted"),);
        assert!(said(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName
        ))
        .contains("not valid for `localhost`"));
        assert!(
            said(rustls::Error::InvalidCertificate(CertificateError::Expired)).contains("expired")
        );
        let refused: BoxError =
            Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(rustls_error(&*refused).is_none());
    }
}
