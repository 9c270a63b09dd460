//! `mandate dev`: a local cluster of N nodes, each its own OS process, for development.
//!
//! Node i has id i, listens for clients on 127.0.0.1:BASE+i-1 and for peers on
//! 127.0.0.1:BASE+100+i-1, and keeps its data in DIR/node-i. The first run initialises the
//! cluster and writes DIR/env (MANDATE_ADDR, the root MANDATE_TOKEN and MANDATE_CA_CERT); later
//! runs on the same DIR restart the same cluster with its data and token. Both listeners speak
//! TLS with a throw-away CA and node certificates made in DIR/tls.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use mandate_client::{pb, Client};
use mandate_server::config::{AuditConfig, GrantConfig, PeerConfig, RaftConfig};
use mandate_server::tls::TlsFiles;
use mandate_server::NodeConfig;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::tls::{self, NodeFiles};
use crate::{authz_cli, identity, Failure};
use mandate_server::sealing::Kek;

/// Most nodes `dev` starts (peer ports sit 100 above client ports).
pub const DEV_NODES_MAX: u16 = 99;
/// How long `dev` waits for its nodes to listen.
pub const DEV_START_TIMEOUT_MS: u64 = 30_000;
/// How long a node may take to stop after SIGTERM before it is killed.
pub const DEV_STOP_TIMEOUT_MS: u64 = 10_000;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DevArgs {
    #[command(subcommand)]
    command: Option<DevSub>,
    /// Number of nodes.
    #[arg(long, default_value_t = 1)]
    nodes: u16,
    /// Where the cluster's data, logs, env and pid files live.
    #[arg(long, default_value = ".mandate-dev")]
    data_dir: PathBuf,
    /// First client port; node i listens on BASE+i-1.
    #[arg(long, default_value_t = 7400)]
    port: u16,
}

#[derive(Subcommand, Debug)]
enum DevSub {
    /// Print a user token (JWT) for USER from the local cluster's development issuer.
    UserToken {
        user: String,
        #[arg(long, default_value = ".mandate-dev")]
        data_dir: PathBuf,
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

/// File names inside DIR: the key-encryption key and the development issuer's key.
const KEK_FILE: &str = "kek";
const DEV_ISSUER_KEY_FILE: &str = "dev-issuer.pem";
/// The throw-away CA and node certificates, inside DIR.
const TLS_DIR: &str = "tls";

struct DevNode {
    id: u64,
    child: Child,
}

fn node_config(dir: &Path, id: u64, base: u16, nodes: u16, tls: &NodeFiles) -> NodeConfig {
    let kek_file = Some(dir.join(KEK_FILE));
    let client = |i: u64| format!("127.0.0.1:{}", u64::from(base) + i - 1);
    let peer = |i: u64| format!("127.0.0.1:{}", u64::from(base) + 100 + i - 1);
    NodeConfig {
        node_id: id,
        client_addr: client(id),
        peer_addr: peer(id),
        data_dir: dir.join(format!("node-{id}")),
        peers: (1..=u64::from(nodes))
            .map(|i| PeerConfig {
                id: i,
                peer_addr: peer(i),
                client_addr: client(i),
            })
            .collect(),
        join: None,
        join_token: None,
        kek_file,
        tls: Some(TlsFiles {
            cert_file: tls.cert.clone(),
            key_file: tls.key.clone(),
            ca_file: tls.ca.clone(),
        }),
        insecure: false,
        grants: GrantConfig::default(),
        raft: RaftConfig::default(),
        audit: AuditConfig::default(),
    }
}

/// Creates DIR/kek and DIR/dev-issuer.pem the first time; returns the issuer key.
fn ensure_secrets(dir: &Path) -> Result<ed25519_dalek::SigningKey, Failure> {
    let kek = dir.join(KEK_FILE);
    if !kek.exists() {
        identity::write_private(&kek, &Kek::generate_hex())?;
    }
    let issuer = dir.join(DEV_ISSUER_KEY_FILE);
    if issuer.exists() {
        identity::read_signing_key(&issuer)
    } else {
        identity::write_new_signing_key(&issuer)
    }
}

fn user_token(user: &str, dir: &Path, ttl: &str) -> Result<(), Failure> {
    mandate_core::UserId::parse("USER", user).map_err(|e| Failure(e.to_string()))?;
    let key = identity::read_signing_key(&dir.join(DEV_ISSUER_KEY_FILE)).map_err(|e| {
        Failure(format!(
            "{} (has `mandate dev` run with --data-dir {}?)",
            e.0,
            dir.display()
        ))
    })?;
    println!(
        "{}",
        identity::dev_user_token(&key, user, identity::parse_duration(ttl)?)?
    );
    Ok(())
}

async fn spawn_node(dir: &Path, config: &NodeConfig) -> Result<Child, Failure> {
    let node_dir = &config.data_dir;
    std::fs::create_dir_all(node_dir)?;
    let config_path = node_dir.join("config.toml");
    std::fs::write(&config_path, config.to_toml())?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(node_dir.join("node.log"))?;
    let exe = std::env::current_exe()?;
    // A cluster dropped without `stop` (an error, an interrupted bench) takes its nodes along.
    let child = Command::new(exe)
        .kill_on_drop(true)
        .arg("server")
        .arg("--config")
        .arg(&config_path)
        .env_remove("MANDATE_NODE_ID")
        .env_remove("MANDATE_CLIENT_ADDR")
        .env_remove("MANDATE_PEER_ADDR")
        .env_remove("MANDATE_DATA_DIR")
        .env_remove("MANDATE_PEERS")
        .env_remove("MANDATE_JOIN")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .map_err(|e| Failure(format!("cannot start node {}: {e}", config.node_id)))?;
    let pid = child
        .id()
        .ok_or_else(|| Failure("a node exited at once".into()))?;
    std::fs::write(
        dir.join(format!("node-{}.pid", config.node_id)),
        format!("{pid}\n"),
    )?;
    Ok(child)
}

async fn wait_listening(node: &mut DevNode, addr: &str, deadline: Instant) -> Result<(), Failure> {
    loop {
        // A node that exited (its port taken, its data dir locked by another process) must not
        // be mistaken for whatever else answers on its port.
        if let Ok(Some(status)) = node.child.try_wait() {
            return Err(Failure(format!(
                "node {} exited at start ({status}); see its node.log",
                node.id
            )));
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Failure(format!(
                "node at {addr} did not start listening; see its node.log"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn read_env_token(path: &Path) -> Result<Option<String>, Failure> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text
            .lines()
            .find_map(|l| l.strip_prefix("MANDATE_TOKEN="))
            .map(str::to_owned)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn stop_all(nodes: &mut [DevNode], dir: &Path) {
    for node in nodes.iter() {
        if let Some(pid) = node.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    for node in nodes.iter_mut() {
        let waited = tokio::time::timeout(
            Duration::from_millis(DEV_STOP_TIMEOUT_MS),
            node.child.wait(),
        )
        .await;
        if waited.is_err() {
            eprintln!(
                "node {} did not stop within {DEV_STOP_TIMEOUT_MS} ms; killing it",
                node.id
            );
            let _ = node.child.kill().await;
        }
        let _ = std::fs::remove_file(dir.join(format!("node-{}.pid", node.id)));
    }
}

async fn shutdown_signal() -> Result<(), Failure> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.map_err(Failure::from),
        _ = term.recv() => Ok(()),
    }
}

pub async fn run(args: DevArgs) -> Result<(), Failure> {
    if let Some(DevSub::UserToken {
        user,
        data_dir,
        ttl,
    }) = &args.command
    {
        return user_token(user, data_dir, ttl);
    }
    let mut cluster = LocalCluster::start(&args.data_dir, args.nodes, args.port).await?;
    print!("{}", cluster.env());
    eprintln!(
        "mandate dev: {} node(s) running; data, logs and pid files in {}. Ctrl-C stops them.",
        args.nodes,
        cluster.dir.display()
    );
    let signal = shutdown_signal().await;
    eprintln!("mandate dev: stopping");
    cluster.stop().await;
    signal
}

/// A running local cluster: each node its own process, and what clients need to reach it.
pub struct LocalCluster {
    pub dir: PathBuf,
    configs: Vec<NodeConfig>,
    nodes: Vec<DevNode>,
    pub addrs: Vec<String>,
    pub token: String,
    pub ca_file: PathBuf,
}

impl LocalCluster {
    /// Starts (or restarts, when DIR holds one) a cluster of `nodes` nodes whose client ports
    /// start at `port`, and writes DIR/env.
    pub async fn start(data_dir: &Path, nodes: u16, port: u16) -> Result<Self, Failure> {
        if nodes == 0 || nodes > DEV_NODES_MAX {
            return Err(Failure(format!(
                "--nodes must be between 1 and {DEV_NODES_MAX}"
            )));
        }
        if u32::from(port) + 100 + u32::from(nodes) > u32::from(u16::MAX) {
            return Err(Failure(format!(
                "--port {port} leaves no room for {nodes} nodes"
            )));
        }
        std::fs::create_dir_all(data_dir)?;
        let dir = std::fs::canonicalize(data_dir)?;
        let issuer_key = ensure_secrets(&dir)?;
        let node_names: Vec<(u64, Vec<String>)> = (1..=u64::from(nodes))
            .map(|i| (i, vec!["127.0.0.1".to_owned(), "localhost".to_owned()]))
            .collect();
        let certs = tls::ensure(&dir.join(TLS_DIR), &node_names)?;
        let configs: Vec<NodeConfig> = (1..=u64::from(nodes))
            .zip(&certs)
            .map(|(i, tls)| node_config(&dir, i, port, nodes, tls))
            .collect();
        for config in &configs {
            for addr in [&config.client_addr, &config.peer_addr] {
                std::net::TcpListener::bind(addr.as_str()).map_err(|e| {
                    Failure(format!(
                        "{addr} is not free ({e}); is another cluster running? choose another --port"
                    ))
                })?;
            }
        }
        let mut cluster = LocalCluster {
            addrs: configs.iter().map(|c| c.client_addr.clone()).collect(),
            ca_file: dir.join(TLS_DIR).join("ca.pem"),
            dir,
            configs,
            nodes: Vec::new(),
            token: String::new(),
        };
        for config in &cluster.configs {
            match spawn_node(&cluster.dir, config).await {
                Ok(child) => cluster.nodes.push(DevNode {
                    id: config.node_id,
                    child,
                }),
                Err(e) => {
                    cluster.stop().await;
                    return Err(e);
                }
            }
        }
        let result = bring_up(
            &cluster.dir,
            &cluster.configs,
            &mut cluster.nodes,
            &issuer_key,
            &cluster.ca_file,
        )
        .await;
        match result {
            Ok(token) => cluster.token = token,
            Err(e) => {
                cluster.stop().await;
                return Err(e);
            }
        }
        std::fs::write(cluster.dir.join("env"), cluster.env())?;
        Ok(cluster)
    }

    /// MANDATE_ADDR, MANDATE_TOKEN and MANDATE_CA_CERT lines.
    pub fn env(&self) -> String {
        format!(
            "MANDATE_ADDR={}\nMANDATE_TOKEN={}\nMANDATE_CA_CERT={}\n",
            self.addrs.join(","),
            self.token,
            self.ca_file.display()
        )
    }

    fn node(&mut self, id: u64) -> Result<&mut DevNode, Failure> {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .ok_or_else(|| Failure(format!("there is no running node {id}")))
    }

    /// Each running node's id and process id.
    pub fn pids(&self) -> Vec<(u64, u32)> {
        self.nodes
            .iter()
            .filter_map(|n| Some((n.id, n.child.id()?)))
            .collect()
    }

    /// SIGKILLs node `id` and waits for it to exit.
    pub async fn kill(&mut self, id: u64) -> Result<(), Failure> {
        let node = self.node(id)?;
        node.child.kill().await?;
        self.nodes.retain(|n| n.id != id);
        Ok(())
    }

    /// Starts node `id` again from its own data and waits for it to listen.
    pub async fn restart(&mut self, id: u64) -> Result<(), Failure> {
        if self.node(id).is_ok() {
            return Err(Failure(format!("node {id} is running")));
        }
        let config = self
            .configs
            .iter()
            .find(|c| c.node_id == id)
            .ok_or_else(|| Failure(format!("the cluster has no node {id}")))?
            .clone();
        let child = spawn_node(&self.dir, &config).await?;
        let mut node = DevNode { id, child };
        let deadline = Instant::now() + Duration::from_millis(DEV_START_TIMEOUT_MS);
        wait_listening(&mut node, &config.client_addr, deadline).await?;
        self.nodes.push(node);
        Ok(())
    }

    /// Stops every node (SIGTERM, then SIGKILL after a while).
    pub async fn stop(&mut self) {
        stop_all(&mut self.nodes, &self.dir).await;
        self.nodes.clear();
    }
}

/// Waits for the nodes to listen, then initialises the cluster if this DIR never was.
async fn bring_up(
    dir: &Path,
    configs: &[NodeConfig],
    nodes: &mut [DevNode],
    issuer_key: &ed25519_dalek::SigningKey,
    ca_file: &Path,
) -> Result<String, Failure> {
    let ca = std::fs::read(ca_file)?;
    let deadline = Instant::now() + Duration::from_millis(DEV_START_TIMEOUT_MS);
    for (config, node) in configs.iter().zip(nodes.iter_mut()) {
        wait_listening(node, &config.client_addr, deadline).await?;
        wait_listening(node, &config.peer_addr, deadline).await?;
    }
    if let Some(token) = read_env_token(&dir.join("env"))? {
        return Ok(token);
    }
    let client = Client::with_ca(&[configs[0].client_addr.clone()], None, Some(&ca))?;
    let members: Vec<pb::Member> = configs
        .iter()
        .map(|c| pb::Member {
            id: c.node_id,
            peer_addr: c.peer_addr.clone(),
            client_addr: c.client_addr.clone(),
        })
        .collect();
    let response = client
        .cluster(|mut c| {
            let members = members.clone();
            async move { c.init(pb::InitRequest { members }).await }
        })
        .await?;
    let operator = Client::with_ca(
        &[configs[0].client_addr.clone()],
        Some(&response.root_token),
        Some(&ca),
    )?;
    authz_cli::put_issuer(&operator, authz_cli::dev_issuer(issuer_key)).await?;
    Ok(response.root_token)
}
