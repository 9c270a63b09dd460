//! `mandate health [--ready]`: asks a node's HTTP side for `/healthz` (the process serves) or
//! `/readyz` (it knows a leader and has applied its log), over TLS when a CA is given. For
//! container health checks and scripts: exit status 0 when the answer is 200.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::{Connection, Failure};

/// Longest the check waits to connect and for the answer.
pub const HEALTH_TIMEOUT_MS: u64 = 3_000;
/// Most bytes of the answer read.
pub const HEALTH_RESPONSE_BYTES_MAX: u64 = 64 * 1024;

#[derive(Args, Debug)]
pub struct HealthArgs {
    /// Ask for readiness (`/readyz`) rather than liveness (`/healthz`).
    #[arg(long)]
    ready: bool,
    #[command(flatten)]
    connection: Connection,
}

fn tls_config(ca_pem: &[u8]) -> Result<rustls::ClientConfig, Failure> {
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(ca_pem) {
        let der = der.map_err(|e| Failure(format!("the CA certificate: {e}")))?;
        roots
            .add(der)
            .map_err(|e| Failure(format!("the CA certificate: {e}")))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Failure(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn get<S: Read + Write>(stream: &mut S, addr: &str, path: &str) -> Result<String, Failure> {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    // A server may close without TLS close_notify after `Connection: close`.
    match Read::by_ref(stream)
        .take(HEALTH_RESPONSE_BYTES_MAX)
        .read_to_end(&mut raw)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e.into()),
    }
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

pub fn run(args: HealthArgs) -> Result<(), Failure> {
    let addr = crate::parse_addrs(&args.connection.addr)
        .into_iter()
        .next()
        .ok_or_else(|| Failure("no node address given (--addr or MANDATE_ADDR)".into()))?;
    let path = if args.ready { "/readyz" } else { "/healthz" };
    let timeout = Duration::from_millis(HEALTH_TIMEOUT_MS);
    let socket = std::net::ToSocketAddrs::to_socket_addrs(addr.as_str())
        .map_err(|e| Failure(format!("{addr}: {e}")))?
        .next()
        .ok_or_else(|| Failure(format!("{addr} resolves to no address")))?;
    let tcp = TcpStream::connect_timeout(&socket, timeout)
        .map_err(|e| Failure(format!("{addr}: {e}")))?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    let response = match &args.connection.ca_cert {
        Some(ca) => {
            let pem = std::fs::read(ca)
                .map_err(|e| Failure(format!("cannot read {}: {e}", ca.display())))?;
            let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
            let name = ServerName::try_from(host.to_owned())
                .map_err(|e| Failure(format!("{host}: {e}")))?;
            let tls = rustls::ClientConnection::new(Arc::new(tls_config(&pem)?), name)
                .map_err(|e| Failure(e.to_string()))?;
            get(&mut rustls::StreamOwned::new(tls, tcp), &addr, path)
        }
        None => get(&mut { tcp }, &addr, path),
    }
    .map_err(|e| Failure(format!("{addr}{path}: {}", e.0)))?;
    let status = response.lines().next().unwrap_or_default();
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .trim();
    if status.split(' ').nth(1) == Some("200") {
        println!("{body}");
        Ok(())
    } else {
        Err(Failure(format!("{addr}{path}: {status} {body}")))
    }
}
