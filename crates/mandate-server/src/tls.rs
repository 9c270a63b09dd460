//! TLS for both listeners. The client listener proves the node's identity to clients; the
//! peer listener is mutual: a peer must present a certificate signed by the cluster CA, and a
//! node dialling a peer presents its own and checks the peer's against the same CA. One
//! certificate per node serves both roles (server and client authentication).
//!
//! The client listener's handshakes are Mandate's own (tokio-rustls) rather than tonic's,
//! because tonic offers only `h2` by ALPN and the same port serves HTTP/1.1 (the JWKS
//! document, probes, `/metrics`) to clients that offer only `http/1.1`, such as Kubernetes
//! probes and Prometheus.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::config::ConfigError;

/// Most client TLS handshakes in progress at once; further connections wait to be accepted.
pub const CLIENT_HANDSHAKES_MAX: usize = 1024;
/// Longest a client may take to complete its TLS handshake.
pub const CLIENT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// The `[tls]` section of a node's configuration: PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// This node's certificate (with the chain up to the cluster CA, if any).
    pub cert_file: PathBuf,
    /// The certificate's private key.
    pub key_file: PathBuf,
    /// The cluster CA: peers must be signed by it, and nodes check each other against it.
    pub ca_file: PathBuf,
}

/// The loaded certificates of a node.
#[derive(Clone)]
pub struct Tls {
    identity: Identity,
    ca: Certificate,
    client_listener: Arc<rustls::ServerConfig>,
}

fn invalid(key: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { key, message }
}

/// The client listener's TLS: the node's certificate, ALPN `h2` then `http/1.1`.
fn client_listener_config(
    files: &TlsFiles,
    cert: &[u8],
    key: &[u8],
) -> Result<rustls::ServerConfig, ConfigError> {
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            invalid(
                "tls.cert_file",
                format!("{}: {e}", files.cert_file.display()),
            )
        })?;
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| invalid("tls.key_file", format!("{}: {e}", files.key_file.display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| invalid("tls", e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| {
        invalid(
            "tls.key_file",
            format!("does not match the certificate or is unusable: {e}"),
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError::Invalid {
        key,
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
        return Err(ConfigError::Invalid {
            key,
            message: format!("{} is not a PEM file", path.display()),
        });
    }
    Ok(bytes)
}

impl Tls {
    /// Reads the files named in `[tls]`.
    pub fn load(files: &TlsFiles) -> Result<Self, ConfigError> {
        let cert = read("tls.cert_file", &files.cert_file)?;
        let key = read("tls.key_file", &files.key_file)?;
        let ca = read("tls.ca_file", &files.ca_file)?;
        let client_listener = Arc::new(client_listener_config(files, &cert, &key)?);
        Ok(Tls {
            identity: Identity::from_pem(cert, key),
            ca: Certificate::from_pem(ca),
            client_listener,
        })
    }

    /// The client listener's connections after their TLS handshakes: the node proves who it
    /// is; clients authenticate with tokens. A handshake that fails or stalls is dropped
    /// without holding up the others.
    pub fn client_incoming(
        &self,
        listener: TcpListener,
    ) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
        let acceptor = TlsAcceptor::from(self.client_listener.clone());
        let (tx, rx) = mpsc::channel(CLIENT_HANDSHAKES_MAX);
        let handshakes = Arc::new(Semaphore::new(CLIENT_HANDSHAKES_MAX));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = handshakes.clone().acquire_owned().await else {
                    return;
                };
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = tx.closed() => return,
                };
                let tcp = match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a client connection failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                // No Nagle: a response written in several frames must not wait for the
                // client's delayed ACK.
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let timeout = Duration::from_millis(CLIENT_HANDSHAKE_TIMEOUT_MS);
                    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            drop(permit);
                            let _ = tx.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "a client TLS handshake failed"),
                        Err(_) => tracing::debug!("a client TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }

    /// For the peer listener: mutual TLS, the caller must be signed by the cluster CA.
    pub fn peer_listener(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
    }

    /// For connections this node opens to other members (peer and client listeners).
    pub fn dialer(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
    }
}

/// An endpoint for another member's client listener at `addr` (`host:port`), over TLS when
/// this node has certificates.
pub fn member_endpoint(addr: &str, tls: Option<&Tls>) -> Result<Endpoint, tonic::transport::Error> {
    match tls {
        Some(tls) => Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls.dialer()),
        None => Endpoint::from_shared(format!("http://{addr}")),
    }
}
