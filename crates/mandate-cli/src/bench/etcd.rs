//! etcd's put, measured by the same clients, clock and histograms as Mandate's workloads. The
//! bench starts a 3-node etcd on loopback (TLS for clients and peers, certificates from a
//! throw-away CA, every write fsynced by etcd's WAL as in production) unless given
//! `--etcd-endpoints`. Only `etcdserverpb.KV/Put` is spoken: its two request fields and the
//! response header are declared here rather than generating etcd's whole API.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::Value;
use tokio::process::{Child, Command};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::load::{self, Clock, Progress, Stats, Sweep};
use super::TempDir;
use crate::Failure;

#[derive(Args, Debug, Clone)]
pub struct EtcdArgs {
    /// An etcd cluster to measure (comma-separated host:port); without it the bench starts a
    /// 3-node etcd on loopback.
    #[arg(long, value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// The CA certificate of `--etcd-endpoints` (plain HTTP/2 without it).
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    /// The etcd binary for a cluster the bench starts.
    #[arg(long, default_value = "etcd")]
    etcd_bin: PathBuf,
}

/// First client port of an etcd the bench starts; node i uses BASE+2(i-1) for clients and the
/// next port for peers.
pub const ETCD_PORT: u16 = 32379;
const ETCD_NODES: u16 = 3;
const ETCD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes in every value put, about a grant record's size.
pub const ETCD_VALUE_BYTES: usize = 256;

#[derive(Clone, PartialEq, prost::Message)]
struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ResponseHeader {
    #[prost(uint64, tag = "1")]
    cluster_id: u64,
    #[prost(uint64, tag = "2")]
    member_id: u64,
    #[prost(int64, tag = "3")]
    revision: i64,
    #[prost(uint64, tag = "4")]
    raft_term: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PutResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
}

pub struct Etcd {
    /// Each endpoint and the CA that signed its certificate (plain HTTP/2 without one).
    endpoints: Vec<(String, Option<Vec<u8>>)>,
    processes: Vec<Child>,
    _dir: Option<TempDir>,
}

fn channel(addr: &str, ca: Option<&[u8]>) -> Result<Channel, Failure> {
    let scheme = if ca.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| Failure(format!("etcd endpoint {addr}: {e}")))?
        .tcp_nodelay(true);
    if let Some(ca) = ca {
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
            .map_err(|e| Failure(format!("etcd endpoint {addr}: {e}")))?;
    }
    Ok(endpoint.connect_lazy())
}

async fn put(channel: &Channel, key: Vec<u8>, value: Vec<u8>) -> Result<(), String> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|e| e.to_string())?;
    grpc.unary::<_, PutResponse, _>(
        tonic::Request::new(PutRequest { key, value }),
        PathAndQuery::from_static("/etcdserverpb.KV/Put"),
        tonic_prost::ProstCodec::default(),
    )
    .await
    .map(|_| ())
    .map_err(|e| format!("{}: {}", e.code(), e.message()))
}

impl Etcd {
    pub async fn connect_or_start(args: &EtcdArgs) -> Result<Etcd, Failure> {
        if !args.etcd_endpoints.is_empty() {
            let ca = args
                .etcd_ca
                .as_ref()
                .map(|p| {
                    std::fs::read(p)
                        .map_err(|e| Failure(format!("cannot read {}: {e}", p.display())))
                })
                .transpose()?;
            return Ok(Etcd {
                endpoints: args
                    .etcd_endpoints
                    .iter()
                    .map(|a| (a.clone(), ca.clone()))
                    .collect(),
                processes: Vec::new(),
                _dir: None,
            });
        }
        let dir = TempDir::new("etcd")?;
        let names: Vec<(u64, Vec<String>)> = (1..=u64::from(ETCD_NODES))
            .map(|i| (i, vec!["127.0.0.1".to_owned(), "localhost".to_owned()]))
            .collect();
        let certs = crate::tls::ensure(&dir.0.join("tls"), &names)?;
        let client_port = |i: u16| ETCD_PORT + 2 * (i - 1);
        let peer_url = |i: u16| format!("https://127.0.0.1:{}", client_port(i) + 1);
        let initial: Vec<String> = (1..=ETCD_NODES)
            .map(|i| format!("e{i}={}", peer_url(i)))
            .collect();
        let mut etcd = Etcd {
            endpoints: Vec::new(),
            processes: Vec::new(),
            _dir: None,
        };
        for (i, files) in (1..=ETCD_NODES).zip(&certs) {
            let client_url = format!("https://127.0.0.1:{}", client_port(i));
            let log = std::fs::File::create(dir.0.join(format!("e{i}.log")))?;
            let child = Command::new(&args.etcd_bin)
                .arg(format!("--name=e{i}"))
                .arg(format!("--data-dir={}", dir.0.join(format!("e{i}")).display()))
                .arg(format!("--listen-client-urls={client_url}"))
                .arg(format!("--advertise-client-urls={client_url}"))
                .arg(format!("--listen-peer-urls={}", peer_url(i)))
                .arg(format!("--initial-advertise-peer-urls={}", peer_url(i)))
                .arg(format!("--initial-cluster={}", initial.join(",")))
                .arg("--initial-cluster-state=new")
                .arg("--initial-cluster-token=mandate-bench")
                .arg(format!("--cert-file={}", files.cert.display()))
                .arg(format!("--key-file={}", files.key.display()))
                .arg(format!("--peer-cert-file={}", files.cert.display()))
                .arg(format!("--peer-key-file={}", files.key.display()))
                .arg(format!("--peer-trusted-ca-file={}", files.ca.display()))
                .arg("--peer-client-cert-auth")
                .arg("--logger=zap")
                .arg("--log-level=warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| {
                    Failure(format!(
                        "cannot start {} ({e}); install Debian's etcd-server (scripts/bench-etcd does) or pass --etcd-bin",
                        args.etcd_bin.display()
                    ))
                })?;
            etcd.processes.push(child);
            etcd.endpoints.push((
                format!("127.0.0.1:{}", client_port(i)),
                Some(std::fs::read(&files.ca)?),
            ));
        }
        etcd._dir = Some(dir);
        let deadline = Instant::now() + ETCD_START_TIMEOUT;
        let first = etcd.channel(0)?;
        loop {
            match put(&first, b"mandate-bench/ready".to_vec(), vec![1]).await {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => {
                    etcd.stop().await;
                    return Err(Failure(format!(
                        "etcd did not accept a put within {} s: {e}",
                        ETCD_START_TIMEOUT.as_secs()
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        Ok(etcd)
    }

    /// A new channel (its own HTTP/2 connection) to endpoint `i` mod N.
    fn channel(&self, i: usize) -> Result<Channel, Failure> {
        let (addr, ca) = &self.endpoints[i % self.endpoints.len()];
        channel(addr, ca.as_deref())
    }

    pub async fn stop(mut self) {
        for child in &mut self.processes {
            let _ = child.kill().await;
        }
    }
}

/// One phase of puts: client i talks to endpoint i mod N, each put a new key.
pub async fn phase(etcd: &Etcd, clients: usize, sweep: &Sweep) -> Result<Value, Failure> {
    let clock = Arc::new(Clock::new(sweep));
    let _progress = Progress::start(format!("etcd-put {clients} clients"), clock.clone());
    let run = rand::random::<u32>();
    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        // A channel per client: its own HTTP/2 connection, as each Mandate client has.
        let channel = etcd.channel(i)?;
        let clock = clock.clone();
        tasks.push(tokio::spawn(async move {
            let mut stats = Stats::new();
            let value = vec![b'v'; ETCD_VALUE_BYTES];
            let mut n = 0u64;
            while let Some(measured) = clock.next() {
                n += 1;
                let key = format!("bench/{run:08x}/{i}/{n}").into_bytes();
                let started = Instant::now();
                let result = put(&channel, key, value.clone()).await.map(|()| 1);
                if measured {
                    stats.record(&clock, started, result);
                }
            }
            stats
        }));
    }
    let mut total = Stats::new();
    for t in tasks {
        total.merge(
            t.await
                .map_err(|e| Failure(format!("an etcd client failed: {e}")))?,
        );
    }
    Ok(load::summary("etcd-put", "puts", clients, &clock, &total))
}
