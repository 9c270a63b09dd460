//! `mandate server`: run one node from a config file, flags and `MANDATE_*` variables
//! (flags and variables override the file).

use mandate_server::tls::TlsFiles;
use std::path::PathBuf;

use clap::Args;
use mandate_server::audit_sink::{SinkConfig, SinkKind};
use mandate_server::config::{AuditConfig, GrantConfig, PeerConfig, RaftConfig};
use mandate_server::NodeConfig;

use crate::Failure;

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// Node configuration file (TOML).
    #[arg(long, env = "MANDATE_CONFIG")]
    config: Option<PathBuf>,
    /// This node's id (≥ 1).
    #[arg(long, env = "MANDATE_NODE_ID")]
    node_id: Option<u64>,
    /// Client listen address, host:port.
    #[arg(long, env = "MANDATE_CLIENT_ADDR")]
    client_addr: Option<String>,
    /// Peer (raft) listen address, host:port.
    #[arg(long, env = "MANDATE_PEER_ADDR")]
    peer_addr: Option<String>,
    /// Data directory.
    #[arg(long, env = "MANDATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// An initial member, as ID=PEER_ADDR/CLIENT_ADDR (repeatable; MANDATE_PEERS is comma-separated).
    #[arg(long = "peer", env = "MANDATE_PEERS", value_delimiter = ',')]
    peers: Vec<String>,
    /// Ask the member at this client address to add this node as a learner.
    #[arg(long, env = "MANDATE_JOIN")]
    join: Option<String>,
    /// Build a snapshot after this many log entries since the last one.
    #[arg(long, env = "MANDATE_SNAPSHOT_LOGS_SINCE_LAST")]
    snapshot_logs_since_last: Option<u64>,
    /// Log entries kept after a snapshot for lagging followers.
    #[arg(long, env = "MANDATE_LOGS_KEPT_AFTER_SNAPSHOT")]
    logs_kept_after_snapshot: Option<u64>,
    /// File holding the key-encryption key (64 hex digits); or give MANDATE_KEK itself.
    #[arg(long, env = "MANDATE_KEK_FILE")]
    kek_file: Option<PathBuf>,
    /// This node's TLS certificate (PEM); with --tls-key and --tls-ca ([tls] in the file).
    #[arg(long, env = "MANDATE_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "MANDATE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): peers must present certificates it signed.
    #[arg(long, env = "MANDATE_TLS_CA", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Serve and dial in plaintext, without TLS (local experiments only; logged loudly).
    #[arg(long, env = "MANDATE_INSECURE", conflicts_with = "tls_cert")]
    insecure: bool,
    /// Most audit records retained (the leader's setting decides).
    #[arg(long, env = "MANDATE_AUDIT_RETAIN_RECORDS")]
    audit_retain_records: Option<u64>,
    /// Audit records older than this many seconds are dropped (0 = no age limit).
    #[arg(long, env = "MANDATE_AUDIT_RETAIN_AGE_S")]
    audit_retain_age_s: Option<u64>,
    /// Seconds between signed checkpoints of the audit trail (the leader's setting decides).
    #[arg(long, env = "MANDATE_AUDIT_CHECKPOINT_INTERVAL_S")]
    audit_checkpoint_interval_s: Option<u64>,
    /// Name secret paths in audit records by their HMAC only.
    #[arg(long, env = "MANDATE_AUDIT_HASH_SECRET_PATHS")]
    audit_hash_secret_paths: Option<bool>,
    /// Also copy the audit trail to this file as JSON lines (a sink named "file").
    #[arg(long, env = "MANDATE_AUDIT_FILE")]
    audit_file: Option<PathBuf>,
    /// Rotate the --audit-file sink at this size.
    #[arg(long, env = "MANDATE_AUDIT_FILE_MAX_BYTES", requires = "audit_file")]
    audit_file_max_bytes: Option<u64>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(
        long,
        env = "MANDATE_LOG",
        default_value = "info,openraft=warn,sled=warn"
    )]
    log: String,
}

fn parse_peer(spec: &str) -> Result<PeerConfig, Failure> {
    let bad = || {
        Failure(format!(
            "--peer {spec:?}: expected ID=PEER_ADDR/CLIENT_ADDR"
        ))
    };
    let (id, addrs) = spec.split_once('=').ok_or_else(bad)?;
    let (peer_addr, client_addr) = addrs.split_once('/').ok_or_else(bad)?;
    Ok(PeerConfig {
        id: id.parse().map_err(|_| bad())?,
        peer_addr: peer_addr.to_owned(),
        client_addr: client_addr.to_owned(),
    })
}

fn build_config(args: ServerArgs) -> Result<NodeConfig, Failure> {
    let mut config = match &args.config {
        Some(path) => NodeConfig::load(path).map_err(|e| Failure(e.to_string()))?,
        None => {
            let missing = |flag: &str| {
                Failure(format!(
                    "--{flag} is required when no --config file is given"
                ))
            };
            NodeConfig {
                node_id: args.node_id.ok_or_else(|| missing("node-id"))?,
                client_addr: args
                    .client_addr
                    .clone()
                    .ok_or_else(|| missing("client-addr"))?,
                peer_addr: args.peer_addr.clone().ok_or_else(|| missing("peer-addr"))?,
                data_dir: args.data_dir.clone().ok_or_else(|| missing("data-dir"))?,
                peers: vec![],
                join: None,
                join_token: None,
                kek_file: None,
                tls: None,
                insecure: false,
                grants: GrantConfig::default(),
                raft: RaftConfig::default(),
                audit: AuditConfig::default(),
            }
        }
    };
    if let Some(v) = args.node_id {
        config.node_id = v;
    }
    if let Some(path) = args.audit_file {
        let mut sink = SinkConfig {
            name: "file".into(),
            kind: SinkKind::File,
            path: Some(path),
            max_bytes: 100 * 1024 * 1024,
            keep: 10,
        };
        if let Some(max) = args.audit_file_max_bytes {
            sink.max_bytes = max;
        }
        config.audit.sinks.retain(|s| s.name != "file");
        config.audit.sinks.push(sink);
    }
    if let Some(v) = args.audit_hash_secret_paths {
        config.audit.hash_secret_paths = v;
    }
    if let Some(v) = args.audit_checkpoint_interval_s {
        config.audit.checkpoint_interval_s = v;
    }
    if let Some(v) = args.audit_retain_records {
        config.audit.retain_records = v;
    }
    if let Some(v) = args.audit_retain_age_s {
        config.audit.retain_age_s = v;
    }
    if let Some(v) = args.client_addr {
        config.client_addr = v;
    }
    if let Some(v) = args.peer_addr {
        config.peer_addr = v;
    }
    if let Some(v) = args.data_dir {
        config.data_dir = v;
    }
    if !args.peers.is_empty() {
        config.peers = args
            .peers
            .iter()
            .map(|p| parse_peer(p))
            .collect::<Result<_, _>>()?;
    }
    if args.join.is_some() {
        config.join = args.join;
    }
    if args.kek_file.is_some() {
        config.kek_file = args.kek_file;
    }
    if let (Some(cert_file), Some(key_file), Some(ca_file)) =
        (args.tls_cert, args.tls_key, args.tls_ca)
    {
        config.tls = Some(TlsFiles {
            cert_file,
            key_file,
            ca_file,
        });
        config.insecure = false;
    }
    if args.insecure {
        config.insecure = true;
        config.tls = None;
    }
    if let Some(v) = args.snapshot_logs_since_last {
        config.raft.snapshot_logs_since_last = v;
    }
    if let Some(v) = args.logs_kept_after_snapshot {
        config.raft.logs_kept_after_snapshot = v;
    }
    config.validate().map_err(|e| Failure(e.to_string()))?;
    Ok(config)
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

pub async fn run(args: ServerArgs) -> Result<(), Failure> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .map_err(|e| Failure(format!("--log {:?}: {e}", args.log)))?;
    // Colour only on a terminal: log files and `docker logs` get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .init();
    let config = build_config(args)?;
    mandate_server::run(config, shutdown_signal())
        .await
        .map_err(|e| Failure(e.to_string()))
}
