//! A harness that runs real `mandate` processes: `mandate dev` clusters, extra `mandate server`
//! nodes, and CLI commands against them.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

pub const MANDATE: &str = env!("CARGO_BIN_EXE_mandate");

/// Polls `probe` until it returns `Some`, failing the test after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A local cluster started with `mandate dev`.
pub struct DevCluster {
    pub dir: tempfile::TempDir,
    pub base: u16,
    pub nodes: u16,
    pub addrs: Vec<String>,
    pub token: String,
    /// The throw-away cluster CA `dev` made (every client command trusts it).
    pub ca_cert: PathBuf,
    dev: Child,
    extra: Vec<Child>,
    /// The environment `dev` was started with (kept for restarts).
    env: Vec<(String, String)>,
}

impl DevCluster {
    pub fn start(nodes: u16, base: u16) -> Self {
        Self::start_with_env(nodes, base, &[])
    }

    pub fn start_with_env(nodes: u16, base: u16, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let dev = spawn_dev(dir.path(), nodes, base, env);
        let (addrs, token) = wait_for_env(dir.path());
        let ca_cert = dir.path().join("tls/ca.pem");
        DevCluster {
            dir,
            base,
            nodes,
            addrs,
            token,
            ca_cert,
            dev,
            extra: Vec::new(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    pub fn addr(&self, node: u64) -> String {
        format!("127.0.0.1:{}", u64::from(self.base) + node - 1)
    }

    pub fn peer_addr(&self, node: u64) -> String {
        format!("127.0.0.1:{}", u64::from(self.base) + 100 + node - 1)
    }

    /// Runs a CLI command against the whole cluster.
    pub fn mandate(&self, args: &[&str]) -> Output {
        self.mandate_at(&self.addrs.join(","), args)
    }

    /// Runs a CLI command against the given addresses.
    pub fn mandate_at(&self, addrs: &str, args: &[&str]) -> Output {
        Command::new(MANDATE)
            .args(args)
            .env("MANDATE_ADDR", addrs)
            .env("MANDATE_TOKEN", &self.token)
            .env("MANDATE_CA_CERT", &self.ca_cert)
            .stdin(Stdio::null())
            .output()
            .expect("run mandate")
    }

    /// Runs a CLI command that must succeed with `--json`, and parses its output.
    pub fn json(&self, addrs: &str, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.mandate_at(addrs, &all);
        assert!(
            out.status.success(),
            "mandate {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
    }

    /// Like [`Self::json`], but `None` on failure (for polling).
    pub fn try_json(&self, addrs: &str, args: &[&str]) -> Option<Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.mandate_at(addrs, &all);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn status(&self, addrs: &str) -> Option<Value> {
        self.try_json(addrs, &["cluster", "status"])
    }

    pub fn leader(&self) -> u64 {
        wait_for("a leader", Duration::from_secs(10), || {
            let s = self.status(&self.addrs.join(","))?;
            s["leader"].as_u64().filter(|l| *l != 0)
        })
    }

    pub fn pid(&self, node: u64) -> i32 {
        let text = std::fs::read_to_string(self.dir.path().join(format!("node-{node}.pid")))
            .expect("pid file");
        text.trim().parse().expect("pid")
    }

    /// SIGKILLs a node started by `dev`.
    pub fn kill_node(&self, node: u64) {
        kill(Pid::from_raw(self.pid(node)), Signal::SIGKILL).expect("kill node");
    }

    /// Starts `mandate server` from a node directory's config file (after a kill).
    pub fn restart_node(&mut self, node: u64) {
        let config = self.dir.path().join(format!("node-{node}/config.toml"));
        let child = Command::new(MANDATE)
            .args(["server", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("restart node");
        self.extra.push(child);
    }

    /// Makes (once) a certificate for node `id` from the cluster's CA; returns the server flags
    /// that use it.
    pub fn tls_flags(&self, id: &str) -> Vec<String> {
        let tls = self.dir.path().join("tls");
        let out = Command::new(MANDATE)
            .args(["tls", "init", "--dir"])
            .arg(&tls)
            .args(["--node", &format!("{id}=127.0.0.1")])
            .output()
            .expect("run mandate tls init");
        assert!(out.status.success(), "tls init: {}", stderr(&out));
        let path = |name: String| tls.join(name).to_str().expect("utf-8").to_owned();
        vec![
            "--tls-cert".into(),
            path(format!("node-{id}.pem")),
            "--tls-key".into(),
            path(format!("node-{id}-key.pem")),
            "--tls-ca".into(),
            path("ca.pem".into()),
        ]
    }

    /// Starts a node outside `dev` with the given flags and a certificate from the cluster's
    /// CA (it is stopped with the cluster).
    pub fn spawn_server(&mut self, args: &[&str], env: &[(&str, &str)]) -> PathBuf {
        let id = args
            .iter()
            .position(|a| *a == "--node-id")
            .and_then(|i| args.get(i + 1))
            .expect("spawn_server needs --node-id");
        let tls = self.tls_flags(id);
        let log = self
            .dir
            .path()
            .join(format!("extra-{}.log", self.extra.len()));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(MANDATE)
            .arg("server")
            .args(args)
            .args(&tls)
            .envs(env.iter().copied())
            .stdout(file.try_clone().expect("clone log"))
            .stderr(file)
            .spawn()
            .expect("spawn server");
        self.extra.push(child);
        log
    }

    /// Stops `dev` with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        let _ = kill(Pid::from_raw(self.dev.id() as i32), Signal::SIGTERM);
        let _ = self.dev.wait();
        for child in &mut self.extra {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.extra.clear();
    }

    /// Starts `dev` again on the same directory.
    pub fn restart_dev(&mut self) {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.dev = spawn_dev(self.dir.path(), self.nodes, self.base, &env);
        let (addrs, token) = wait_for_env(self.dir.path());
        self.addrs = addrs;
        self.token = token;
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_dev(dir: &Path, nodes: u16, base: u16, env: &[(&str, &str)]) -> Child {
    // A stale env from an earlier run would be read before the new cluster is up.
    let _ = std::fs::remove_file(dir.join("env.ready"));
    let log = std::fs::File::create(dir.join("dev.log")).expect("dev log");
    let ready = std::fs::File::create(dir.join("env.ready")).expect("ready file");
    Command::new(MANDATE)
        .args([
            "dev",
            "--nodes",
            &nodes.to_string(),
            "--port",
            &base.to_string(),
            "--data-dir",
        ])
        .arg(dir)
        .envs(env.iter().copied())
        .env_remove("MANDATE_ADDR")
        .env_remove("MANDATE_TOKEN")
        .stdin(Stdio::null())
        .stdout(ready)
        .stderr(log)
        .spawn()
        .expect("spawn mandate dev")
}

/// `dev` prints the env lines on stdout once the cluster is up; wait for both lines.
fn wait_for_env(dir: &Path) -> (Vec<String>, String) {
    wait_for(
        "mandate dev to print its env",
        Duration::from_secs(60),
        || {
            let text = std::fs::read_to_string(dir.join("env.ready")).ok()?;
            let addr = text.lines().find_map(|l| l.strip_prefix("MANDATE_ADDR="))?;
            let token = text
                .lines()
                .find_map(|l| l.strip_prefix("MANDATE_TOKEN="))?;
            Some((
                addr.split(',').map(str::to_owned).collect(),
                token.to_owned(),
            ))
        },
    )
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An authorization world on a running cluster: a policy, an agent with a key, and a user
/// token for alice from the dev issuer.
pub struct World {
    pub agent_id: String,
    pub agent_key: ed25519_dalek::SigningKey,
    /// The agent's private key file (`<cluster dir>/<name>.pem`).
    pub key_file: String,
    pub alice: String,
    pub cluster_id: String,
}

pub const WORLD_POLICY: &str = r#"
@id("alice-team-a")
permit(principal == User::"alice", action, resource in Resource::"secret/team-a");

@id("agents")
permit(principal is Agent, action, resource in Resource::"secret");
"#;

impl World {
    /// Writes the policy, registers an agent and mints alice's token.
    pub fn create(c: &DevCluster, name: &str) -> World {
        let all = c.addrs.join(",");
        let policy = c.dir.path().join(format!("{name}.cedar"));
        std::fs::write(&policy, WORLD_POLICY).expect("write policy");
        c.json(
            &all,
            &["policy", "put", "world", policy.to_str().expect("utf-8")],
        );
        let key_file = c.dir.path().join(format!("{name}.pem"));
        c.json(
            &all,
            &[
                "agent",
                "keygen",
                "--out",
                key_file.to_str().expect("utf-8"),
            ],
        );
        let agent = c.json(
            &all,
            &[
                "agent",
                "register",
                "--name",
                name,
                "--owner",
                "alice",
                "--public-key",
                key_file.to_str().expect("utf-8"),
            ],
        );
        let pem = std::fs::read_to_string(&key_file).expect("key");
        let agent_key =
            <ed25519_dalek::SigningKey as ed25519_dalek::pkcs8::DecodePrivateKey>::from_pkcs8_pem(
                &pem,
            )
            .expect("pem");
        let out = c.mandate(&[
            "dev",
            "user-token",
            "alice",
            "--data-dir",
            c.dir.path().to_str().expect("utf-8"),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let alice = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let cluster_id = c.json(&all, &["keys", "jwks"])["cluster_id"]
            .as_str()
            .expect("cluster id")
            .to_owned();
        World {
            agent_id: agent["id"].as_str().expect("id").to_owned(),
            agent_key,
            key_file: key_file.to_str().expect("utf-8").to_owned(),
            alice,
            cluster_id,
        }
    }

    /// A fresh client assertion for the world's agent.
    pub fn assertion(&self) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_secs();
        let der =
            ed25519_dalek::pkcs8::EncodePrivateKey::to_pkcs8_der(&self.agent_key).expect("der");
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        let x = base64_url(self.agent_key.verifying_key().as_bytes());
        header.kid = Some(mandate_core::validate::jwk_thumbprint(&x));
        let jti: [u8; 16] = rand::random();
        jsonwebtoken::encode(
            &header,
            &serde_json::json!({ "iss": self.agent_id, "sub": self.agent_id, "aud": self.cluster_id, "iat": now, "exp": now + 30, "jti": hex::encode(jti) }),
            &jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes()),
        )
        .expect("sign assertion")
    }

    /// The `mandate authorize` arguments for the agent: `action` on `resource` under
    /// `delegation`, then `extra` flags.
    pub fn authorize_args(
        &self,
        delegation: &str,
        action: &str,
        resource: &str,
        extra: &[&str],
    ) -> Vec<String> {
        [
            "authorize",
            "--agent",
            &self.agent_id,
            "--agent-key",
            &self.key_file,
            "--delegation",
            delegation,
            "--action",
            action,
            "--resource",
            resource,
        ]
        .iter()
        .chain(extra)
        .map(|s| (*s).to_owned())
        .collect()
    }

    /// Runs `mandate authorize` for the agent (which must succeed) and returns its JSON.
    pub fn authorize(
        &self,
        c: &DevCluster,
        delegation: &str,
        action: &str,
        resource: &str,
        extra: &[&str],
    ) -> Value {
        let args = self.authorize_args(delegation, action, resource, extra);
        c.json(&c.addrs.join(","), &as_refs(&args))
    }

    /// Alice delegates `actions` on `resources` to the agent; returns the delegation id.
    pub fn delegate(
        &self,
        c: &DevCluster,
        actions: &[&str],
        resources: &[&str],
        extra: &[&str],
    ) -> String {
        let mut args = vec![
            "delegate",
            "create",
            "--user-token",
            &self.alice,
            "--agent",
            &self.agent_id,
        ];
        for a in actions {
            args.extend(["--action", a]);
        }
        for r in resources {
            args.extend(["--resource", r]);
        }
        args.extend(extra);
        c.json(&c.addrs.join(","), &args)["id"]
            .as_str()
            .expect("delegation id")
            .to_owned()
    }
}

pub fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A client pinned to one node (no failover), for tests that must hit every node.
pub fn client_at(ca_cert: &Path, addr: &str, token: &str) -> mandate_client::Client {
    clients(ca_cert, &[addr.to_owned()], token)
}

/// A client of the nodes at `addrs` that trusts the cluster CA at `ca_cert`.
pub fn clients(ca_cert: &Path, addrs: &[String], token: &str) -> mandate_client::Client {
    let ca = std::fs::read(ca_cert).expect("read the CA");
    mandate_client::Client::with_ca(addrs, Some(token), Some(&ca)).expect("client")
}

/// Runs a command that must fail with one line on stderr naming `code` and containing `needle`.
pub fn refused(c: &DevCluster, args: &[&str], code: &str, needle: &str) {
    let out = c.mandate(args);
    assert!(!out.status.success(), "mandate {args:?} succeeded");
    let err = stderr(&out);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "stderr is not one line: {err}"
    );
    assert!(
        err.contains(code) && err.contains(needle),
        "mandate {args:?}: expected {code} and {needle:?}, got {err}"
    );
}

/// One HTTP/1.1 GET: (status, content type, body).
/// One HTTP/1.1 GET over TLS (trusting `ca_cert`): status, content type and body.
pub fn http_get(ca_cert: &Path, addr: &str, path: &str) -> (u16, String, String) {
    use rustls::pki_types::pem::PemObject;
    use std::io::{Read, Write};
    let pem = std::fs::read_to_string(ca_cert).expect("read the CA");
    let mut roots = rustls::RootCertStore::empty();
    for der in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(der.expect("CA pem")).expect("CA certificate");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    // Offer only HTTP/1.1, as Kubernetes probes and Prometheus do.
    let mut config = config;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let (host, _) = addr.rsplit_once(':').expect("host:port");
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).expect("server name");
    let connection =
        rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("TLS client");
    let tcp = std::net::TcpStream::connect(addr).expect("connect");
    let mut stream = rustls::StreamOwned::new(connection, tcp);
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut raw = Vec::new();
    // The server may close without a TLS close_notify after `Connection: close`.
    if let Err(e) = stream.read_to_end(&mut raw) {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof,
            "read response: {e}"
        );
    }
    let response = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a header block");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

/// Borrows owned arguments for a command line.
pub fn as_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}
