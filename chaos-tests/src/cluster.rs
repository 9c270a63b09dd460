//! A Mandate cluster of containers on a private Docker network, and the nemeses that act on it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use mandate_client::Client;

/// Longest a node may take to answer its health check after it starts.
pub const NODE_START_TIMEOUT: Duration = Duration::from_secs(60);

/// The `mandate` binary of this build: `MANDATE_BIN`, or `target/<profile>/mandate` beside the
/// test executable (`target/<profile>/deps/...`).
pub fn mandate_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MANDATE_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps");
    let binary = profile_dir.join("mandate");
    assert!(
        binary.exists(),
        "no mandate binary at {} (cargo build -p mandate-cli, or set MANDATE_BIN)",
        binary.display()
    );
    binary
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Runs a command that must succeed; its stdout.
fn run(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> String {
    let program = program.as_ref();
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program:?}: {e}"));
    assert!(
        out.status.success(),
        "{program:?} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn try_run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// N nodes, each a container named `<prefix>-<i>` with host name `mandate-<i>`, its client port
/// published on 127.0.0.1.
pub struct Cluster {
    pub nodes: usize,
    /// Client addresses on the host, one per node (index 0 is node 1).
    pub addrs: Vec<String>,
    pub token: String,
    pub ca_pem: Vec<u8>,
    ca_file: PathBuf,
    prefix: String,
    network: String,
    image: String,
    mandate: PathBuf,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Builds the image, makes throw-away certificates and a KEK, starts `nodes` containers
    /// (client ports `base_port..`), waits for them and initialises the cluster.
    pub fn start(name: &str, nodes: usize, base_port: u16) -> Self {
        let mandate = mandate_binary();
        let tag = format!("{name}-{}", std::process::id());
        let image = format!("mandate-chaos:{tag}");
        run(
            deploy_dir().join("build-local-image.sh"),
            &[mandate.to_str().expect("utf-8 path"), &image],
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let tls = dir.path().join("tls");
        let node_args: Vec<String> = (1..=nodes)
            .map(|i| format!("{i}=mandate-{i},127.0.0.1"))
            .collect();
        let mut init = vec!["tls", "init", "--dir", tls.to_str().expect("utf-8")];
        for n in &node_args {
            init.extend(["--node", n.as_str()]);
        }
        run(&mandate, &init);
        std::fs::write(tls.join("kek"), random_hex(32)).expect("write the KEK");
        // Throw-away material in a private temp dir: readable by the image's user (uid 10001).
        for entry in std::fs::read_dir(&tls).expect("tls dir").flatten() {
            set_mode(&entry.path(), 0o644);
        }
        set_mode(&tls, 0o755);
        let network = format!("mandate-chaos-{tag}");
        run("docker", &["network", "create", &network]);
        let mut cluster = Cluster {
            nodes,
            addrs: (0..nodes)
                .map(|i| format!("127.0.0.1:{}", usize::from(base_port) + i))
                .collect(),
            token: String::new(),
            ca_pem: std::fs::read(tls.join("ca.pem")).expect("ca"),
            ca_file: tls.join("ca.pem"),
            prefix: format!("mandate-chaos-{tag}"),
            network,
            image,
            mandate,
            _dir: dir,
        };
        let peers: Vec<String> = (1..=nodes)
            .map(|i| format!("{i}=mandate-{i}:7500/mandate-{i}:7400"))
            .collect();
        let peers = peers.join(",");
        for i in 1..=nodes {
            cluster.create(i, &tls, &peers);
        }
        for i in 1..=nodes {
            cluster.wait_alive(i);
        }
        let init = run(
            &cluster.mandate,
            &[
                "cluster",
                "init",
                "--addr",
                &cluster.addrs[0],
                "--ca-cert",
                cluster.ca_file.to_str().expect("utf-8"),
                "--json",
            ],
        );
        let init: serde_json::Value = serde_json::from_str(&init).expect("init json");
        cluster.token = init["root_token"].as_str().expect("root token").to_owned();
        cluster
    }

    fn container(&self, node: usize) -> String {
        format!("{}-{node}", self.prefix)
    }

    fn create(&self, node: usize, tls: &Path, peers: &str) {
        let env = [
            format!("MANDATE_NODE_ID={node}"),
            format!("MANDATE_CLIENT_ADDR=mandate-{node}:7400"),
            format!("MANDATE_PEER_ADDR=mandate-{node}:7500"),
            "MANDATE_DATA_DIR=/var/lib/mandate".to_owned(),
            format!("MANDATE_PEERS={peers}"),
            format!("MANDATE_TLS_CERT=/etc/mandate/tls/node-{node}.pem"),
            format!("MANDATE_TLS_KEY=/etc/mandate/tls/node-{node}-key.pem"),
            "MANDATE_TLS_CA=/etc/mandate/tls/ca.pem".to_owned(),
            "MANDATE_KEK_FILE=/etc/mandate/tls/kek".to_owned(),
        ];
        let port = format!("127.0.0.1:{}:7400", self.port(node));
        let volume = format!("{}:/etc/mandate/tls:ro", tls.display());
        let name = self.container(node);
        let hostname = format!("mandate-{node}");
        let mut args = vec![
            "run",
            "-d",
            "--name",
            &name,
            "--hostname",
            &hostname,
            "--network",
            &self.network,
            "--network-alias",
            &hostname,
            "-p",
            &port,
            "-v",
            &volume,
        ];
        for e in &env {
            args.extend(["-e", e.as_str()]);
        }
        args.extend([self.image.as_str(), "server"]);
        run("docker", &args);
    }

    fn port(&self, node: usize) -> &str {
        self.addrs[node - 1]
            .rsplit_once(':')
            .map(|(_, p)| p)
            .expect("host:port")
    }

    /// Waits until node `node` answers its liveness check.
    pub fn wait_alive(&self, node: usize) {
        let deadline = Instant::now() + NODE_START_TIMEOUT;
        loop {
            let out = Command::new(&self.mandate)
                .args(["health", "--addr", &self.addrs[node - 1], "--ca-cert"])
                .arg(&self.ca_file)
                .output()
                .expect("mandate health");
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {node} did not come up: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.logs(node)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The node's log so far.
    pub fn logs(&self, node: usize) -> String {
        let out = try_run("docker", &["logs", &self.container(node)]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// A client of every node (it fails over among them).
    pub fn client(&self) -> Client {
        self.client_of(&self.addrs)
    }

    /// A client of the given client addresses only.
    pub fn client_of(&self, addrs: &[String]) -> Client {
        Client::with_ca(addrs, Some(&self.token), Some(&self.ca_pem)).expect("client")
    }

    /// The current leader's node id, asked of every node.
    pub fn leader(&self) -> Option<usize> {
        self.leader_seen_by(&(1..=self.nodes).collect::<Vec<_>>())
    }

    /// The leader's node id as the given nodes see it (leave out a node under a fault: a
    /// paused node accepts connections but never answers).
    pub fn leader_seen_by(&self, nodes: &[usize]) -> Option<usize> {
        let addrs: Vec<&str> = nodes.iter().map(|n| self.addrs[n - 1].as_str()).collect();
        let out = Command::new(&self.mandate)
            .args(["cluster", "status", "--json", "--ca-cert"])
            .arg(&self.ca_file)
            .env("MANDATE_ADDR", addrs.join(","))
            .env("MANDATE_TOKEN", &self.token)
            .output()
            .ok()?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        status["leader"]
            .as_u64()
            .filter(|l| *l > 0)
            .and_then(|l| usize::try_from(l).ok())
    }

    /// SIGKILL: the process dies at once, its data directory stays.
    pub fn kill(&self, node: usize) {
        run(
            "docker",
            &["kill", "--signal", "KILL", &self.container(node)],
        );
    }

    /// Starts a killed node again on its data.
    pub fn restart(&self, node: usize) {
        run("docker", &["start", &self.container(node)]);
    }

    /// SIGSTOP of every process in the container.
    pub fn pause(&self, node: usize) {
        run("docker", &["pause", &self.container(node)]);
    }

    /// SIGCONT.
    pub fn unpause(&self, node: usize) {
        run("docker", &["unpause", &self.container(node)]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in 1..=self.nodes {
            let _ = try_run("docker", &["rm", "-f", "-v", &self.container(node)]);
        }
        let _ = try_run("docker", &["network", "rm", &self.network]);
        let _ = try_run("docker", &["rmi", "-f", &self.image]);
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// `bytes` random bytes from the OS, as hex.
fn random_hex(bytes: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
