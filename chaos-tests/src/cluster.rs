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

/// Snapshot policy of the test clusters: small, so that snapshots are built and installed
/// while the workload runs, and a node that falls behind must install one.
pub const SNAPSHOT_LOGS_SINCE_LAST: u64 = 400;
pub const LOGS_KEPT_AFTER_SNAPSHOT: u64 = 100;
/// Ids beyond the initial nodes that have certificates ready (replacements, added nodes).
pub const SPARE_NODES: usize = 2;

/// N nodes, each a container named `<prefix>-<i>` with host name `mandate-<i>` and a fixed
/// address on a private network, its client port published on 127.0.0.1.
pub struct Cluster {
    /// Initial nodes; ids up to `nodes + SPARE_NODES` may be created later.
    pub nodes: usize,
    /// The node ids that are members now (voters or learners), in id order.
    pub members: Vec<usize>,
    /// The highest node id created so far.
    created: usize,
    /// Client addresses on the host, one per node id (index 0 is node 1).
    pub addrs: Vec<String>,
    pub token: String,
    pub ca_pem: Vec<u8>,
    ca_file: PathBuf,
    tls: PathBuf,
    peers: String,
    /// The network's first three octets: node N has address `<subnet>.<10 + N>`.
    subnet: String,
    prefix: String,
    network: String,
    image: String,
    mandate: PathBuf,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Builds the image, makes throw-away certificates and a KEK, starts `nodes` containers
    /// (client ports `base_port..`), waits for them and initialises the cluster. The private
    /// network's subnet is derived from `base_port`, so clusters with base ports 100 apart
    /// never share one.
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
        let ids = 1..=nodes + SPARE_NODES;
        let node_args: Vec<String> = ids
            .clone()
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
        let subnet = format!("10.77.{}", (base_port / 100) % 256);
        run(
            "docker",
            &[
                "network",
                "create",
                "--subnet",
                &format!("{subnet}.0/24"),
                &network,
            ],
        );
        let peers: Vec<String> = (1..=nodes)
            .map(|i| format!("{i}=mandate-{i}:7500/mandate-{i}:7400"))
            .collect();
        let mut cluster = Cluster {
            nodes,
            members: (1..=nodes).collect(),
            created: nodes,
            addrs: ids
                .map(|i| format!("127.0.0.1:{}", usize::from(base_port) + i - 1))
                .collect(),
            token: String::new(),
            ca_pem: std::fs::read(tls.join("ca.pem")).expect("ca"),
            ca_file: tls.join("ca.pem"),
            tls,
            peers: peers.join(","),
            subnet,
            prefix: format!("mandate-chaos-{tag}"),
            network,
            image,
            mandate,
            _dir: dir,
        };
        for i in 1..=nodes {
            cluster.create(i, &[]);
        }
        for i in 1..=nodes {
            cluster.wait_alive(i);
        }
        let init = cluster.mandate(&["cluster", "init", "--addr", &cluster.addrs[0], "--json"]);
        let init: serde_json::Value = serde_json::from_str(&init).expect("init json");
        cluster.token = init["root_token"].as_str().expect("root token").to_owned();
        cluster
    }

    /// Runs the `mandate` CLI against the cluster (CA and operator token given); its stdout.
    pub fn mandate(&self, args: &[&str]) -> String {
        let out = self.mandate_output(args);
        assert!(
            out.status.success(),
            "mandate {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the `mandate` CLI; its stdout, or its stderr when it fails.
    pub fn try_mandate(&self, args: &[&str]) -> Result<String, String> {
        let out = self.mandate_output(args);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    fn mandate_output(&self, args: &[&str]) -> Output {
        Command::new(&self.mandate)
            .args(args)
            .env("MANDATE_CA_CERT", &self.ca_file)
            .env("MANDATE_TOKEN", &self.token)
            .output()
            .expect("run mandate")
    }

    fn container(&self, node: usize) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// The node's address on the private network.
    pub fn ip(&self, node: usize) -> String {
        format!("{}.{}", self.subnet, 10 + node)
    }

    /// Creates and starts node `node`'s container, with `extra` environment.
    fn create(&self, node: usize, extra: &[String]) {
        let mut env = vec![
            format!("MANDATE_NODE_ID={node}"),
            format!("MANDATE_CLIENT_ADDR=mandate-{node}:7400"),
            format!("MANDATE_PEER_ADDR=mandate-{node}:7500"),
            "MANDATE_DATA_DIR=/var/lib/mandate".to_owned(),
            format!("MANDATE_PEERS={}", self.peers),
            format!("MANDATE_TLS_CERT=/etc/mandate/tls/node-{node}.pem"),
            format!("MANDATE_TLS_KEY=/etc/mandate/tls/node-{node}-key.pem"),
            "MANDATE_TLS_CA=/etc/mandate/tls/ca.pem".to_owned(),
            "MANDATE_KEK_FILE=/etc/mandate/tls/kek".to_owned(),
            format!("MANDATE_SNAPSHOT_LOGS_SINCE_LAST={SNAPSHOT_LOGS_SINCE_LAST}"),
            format!("MANDATE_LOGS_KEPT_AFTER_SNAPSHOT={LOGS_KEPT_AFTER_SNAPSHOT}"),
        ];
        env.extend(extra.iter().cloned());
        let port = format!("127.0.0.1:{}:7400", self.port(node));
        let volume = format!("{}:/etc/mandate/tls:ro", self.tls.display());
        let name = self.container(node);
        let hostname = format!("mandate-{node}");
        let ip = self.ip(node);
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
            "--ip",
            &ip,
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
        self.leader_seen_by(&self.members.clone())
    }

    /// The leader's node id as the given nodes see it (leave out a node under a fault: a
    /// paused node accepts connections but never answers).
    pub fn leader_seen_by(&self, nodes: &[usize]) -> Option<usize> {
        let addrs: Vec<&str> = nodes.iter().map(|n| self.addrs[n - 1].as_str()).collect();
        let out = self.mandate_output(&["cluster", "status", "--json", "--addr", &addrs.join(",")]);
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

    /// The host PID of the node's server (its network namespace is `/proc/PID/ns/net`), or
    /// `None` while the container is stopped.
    fn pid(&self, node: usize) -> Option<String> {
        let out = try_run(
            "docker",
            &[
                "inspect",
                "--format",
                "{{.State.Pid}}",
                &self.container(node),
            ],
        );
        let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && pid != "0" && !pid.is_empty()).then_some(pid)
    }

    /// Runs `program args` inside node `node`'s network namespace, from the host (the image
    /// has no tools; the host's iptables and tc act on the namespace). A stopped node has no
    /// namespace: nothing to do.
    fn in_netns(&self, node: usize, program: &str, args: &[&str]) {
        if let Some(pid) = self.pid(node) {
            let mut full = vec!["--target", pid.as_str(), "--net", program];
            full.extend(args);
            run("nsenter", &full);
        }
    }

    /// Cuts the network between every node of `a` and every node of `b`, both ways (packets
    /// are dropped, as on a real partition; clients on the host still reach every node).
    pub fn cut(&self, a: &[usize], b: &[usize]) {
        for &x in a {
            for &y in b {
                for (from, to) in [(x, y), (y, x)] {
                    let peer = self.ip(to);
                    self.in_netns(
                        from,
                        "iptables",
                        &["-w", "-A", "INPUT", "-s", &peer, "-j", "DROP"],
                    );
                    self.in_netns(
                        from,
                        "iptables",
                        &["-w", "-A", "OUTPUT", "-d", &peer, "-j", "DROP"],
                    );
                }
            }
        }
    }

    /// Splits the members into `groups`: nodes in different groups cannot reach each other.
    pub fn partition(&self, groups: &[Vec<usize>]) {
        for (i, a) in groups.iter().enumerate() {
            for b in &groups[i + 1..] {
                self.cut(a, b);
            }
        }
    }

    /// Removes every cut.
    pub fn heal_network(&self) {
        for node in 1..=self.nodes + SPARE_NODES {
            if self.exists(node) {
                self.in_netns(node, "iptables", &["-w", "-F", "INPUT"]);
                self.in_netns(node, "iptables", &["-w", "-F", "OUTPUT"]);
            }
        }
    }

    /// A lossy, slow link for node `node`: `loss` of its incoming packets dropped at random
    /// (iptables `statistic`) and its outgoing traffic shaped to `rate` (a `tbf` qdisc, e.g.
    /// `2mbit`), which queues and so delays it. This kernel has no `sch_netem`
    /// (CONFIG_NET_SCH_NETEM is off), so `tc netem` cannot be used here; these two are its
    /// loss and delay.
    pub fn degrade(&self, node: usize, loss: f64, rate: &str) {
        let probability = format!("{loss}");
        self.in_netns(
            node,
            "iptables",
            &[
                "-w",
                "-A",
                "INPUT",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &probability,
                "-j",
                "DROP",
            ],
        );
        self.in_netns(
            node,
            "tc",
            &[
                "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "32kbit",
                "latency", "400ms",
            ],
        );
    }

    /// Removes node `node`'s shaping (its drop rules go with [`Cluster::heal_network`]).
    pub fn clear_shaping(&self, node: usize) {
        if let Some(pid) = self.pid(node) {
            // Fails when there is no qdisc to remove: nothing to do then.
            let _ = try_run(
                "nsenter",
                &[
                    "--target", &pid, "--net", "tc", "qdisc", "del", "dev", "eth0", "root",
                ],
            );
        }
    }

    fn exists(&self, node: usize) -> bool {
        try_run("docker", &["inspect", &self.container(node)])
            .status
            .success()
    }

    /// SIGKILL of every member, then all start again at once on their data.
    pub fn kill_all(&self) {
        for &node in &self.members {
            self.kill(node);
        }
    }

    /// Starts every member again.
    pub fn restart_all(&self) {
        for &node in &self.members {
            self.restart(node);
        }
    }

    /// Adds a new node (the next unused id) as a learner that joins through node `via`, waits
    /// until it is alive, and promotes it to voter. Returns its id.
    pub fn add_node(&mut self, via: usize) -> usize {
        // Ids are never reused (docs/operations.md): the next one after every id created.
        let node = self
            .members
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
            .max(self.created)
            + 1;
        assert!(
            node <= self.nodes + SPARE_NODES,
            "no spare node id left (SPARE_NODES)"
        );
        self.created = node;
        self.create(
            node,
            &[
                format!("MANDATE_JOIN=mandate-{via}:7400"),
                format!("MANDATE_JOIN_TOKEN={}", self.token),
            ],
        );
        self.wait_alive(node);
        let deadline = Instant::now() + NODE_START_TIMEOUT;
        let id = node.to_string();
        loop {
            let out =
                self.mandate_output(&["cluster", "promote", &id, "--addr", &self.addrs.join(",")]);
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {node} was never promoted: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.logs(node)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        self.members.push(node);
        node
    }

    /// Removes node `node` from the membership (through the others) and destroys its
    /// container and data.
    pub fn remove_node(&mut self, node: usize) {
        let others: Vec<&str> = self
            .members
            .iter()
            .filter(|n| **n != node)
            .map(|n| self.addrs[n - 1].as_str())
            .collect();
        let deadline = Instant::now() + NODE_START_TIMEOUT;
        let id = node.to_string();
        loop {
            let out = self.mandate_output(&["cluster", "remove", &id, "--addr", &others.join(",")]);
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {node} could not be removed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        self.members.retain(|n| *n != node);
        run("docker", &["rm", "-f", "-v", &self.container(node)]);
    }

    /// Each member's (applied index, last log index) as it reports them, for members that
    /// answer.
    pub fn progress(&self) -> Vec<(usize, u64)> {
        self.members
            .iter()
            .filter_map(|&n| {
                let out = self.mandate_output(&[
                    "cluster",
                    "status",
                    "--json",
                    "--addr",
                    &self.addrs[n - 1],
                ]);
                let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
                let me = status["members"]
                    .as_array()?
                    .iter()
                    .find(|m| m["id"].as_u64() == u64::try_from(n).ok())?;
                Some((n, me["applied_index"].as_u64()?))
            })
            .collect()
    }

    /// Waits until every member has applied at least `index`.
    pub fn wait_applied(&self, index: u64, limit: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            let progress = self.progress();
            if progress.len() == self.members.len() && progress.iter().all(|(_, a)| *a >= index) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "members did not apply index {index} within {limit:?}: {progress:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in 1..=self.nodes + SPARE_NODES {
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
