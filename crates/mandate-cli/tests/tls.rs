//! TLS on both listeners: mutual TLS between peers under the cluster CA, server-authenticated
//! TLS for clients, and plaintext only when a node is told `--insecure`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{stderr, wait_for, DevCluster, MANDATE};
use mandate_client::pb;
use mandate_client::pb::raft_peer_client::RaftPeerClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Asks the peer listener at `addr` for a read index, presenting `identity` (or none).
fn read_index(addr: &str, ca: &Path, identity: Option<(&Path, &Path)>) -> Result<u64, String> {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(ca).expect("ca")));
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(
                std::fs::read(cert).expect("cert"),
                std::fs::read(key).expect("key"),
            ));
        }
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .expect("endpoint")
            .tls_config(tls)
            .expect("tls")
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        RaftPeerClient::new(channel)
            .read_index(pb::ReadIndexRequest {})
            .await
            .map(|r| r.into_inner().read_index)
            .map_err(|s| format!("{s:?}"))
    })
}

/// A CA other than the cluster's, with a certificate for `node`; returns its directory.
fn foreign_ca(c: &DevCluster, node: &str) -> PathBuf {
    let other = c.dir.path().join("other-ca");
    let out = Command::new(MANDATE)
        .args(["tls", "init", "--dir"])
        .arg(&other)
        .args(["--node", &format!("{node}=127.0.0.1")])
        .output()
        .expect("tls init");
    assert!(out.status.success(), "{}", stderr(&out));
    other
}

/// `mandate cluster status` against node 1, trusting `ca` (`None`: plaintext).
fn status_trusting(c: &DevCluster, ca: Option<&Path>) -> std::process::Output {
    let mut cmd = Command::new(MANDATE);
    cmd.args(["cluster", "status"])
        .env("MANDATE_ADDR", &c.addrs[0])
        .env("MANDATE_TOKEN", &c.token);
    match ca {
        Some(ca) => cmd.env("MANDATE_CA_CERT", ca),
        None => cmd.env_remove("MANDATE_CA_CERT"),
    };
    cmd.output().expect("cluster status")
}

/// One plaintext HTTP/1.1 GET; the whole response.
fn plain_http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

#[test]
fn the_peer_listener_admits_only_peers_signed_by_the_cluster_ca() {
    let c = DevCluster::start(1, 24400);
    let tls = c.dir.path().join("tls");
    let peer = c.peer_addr(1);
    // A certificate from the cluster's CA is a peer.
    c.tls_flags("9");
    let ours = (tls.join("node-9.pem"), tls.join("node-9-key.pem"));
    let index = read_index(&peer, &c.ca_cert, Some((&ours.0, &ours.1)));
    assert!(
        index.is_ok(),
        "a cluster-signed peer was refused: {index:?}"
    );

    // The same request with a certificate from another CA, or with none, is refused.
    let other = foreign_ca(&c, "9");
    let foreign = (other.join("node-9.pem"), other.join("node-9-key.pem"));
    let refused = read_index(&peer, &c.ca_cert, Some((&foreign.0, &foreign.1)));
    assert!(refused.is_err(), "a foreign peer was admitted: {refused:?}");
    let anonymous = read_index(&peer, &c.ca_cert, None);
    assert!(
        anonymous.is_err(),
        "a peer without a certificate was admitted"
    );
}

#[test]
fn clients_talk_tls_and_trust_only_the_cluster_ca() {
    let c = DevCluster::start(1, 24600);
    let ok = c.json(&c.addrs[0], &["cluster", "status"]);
    assert_eq!(ok["members"].as_array().map(Vec::len), Some(1), "{ok}");

    let other = foreign_ca(&c, "1");
    let wrong_ca = status_trusting(&c, Some(&other.join("ca.pem")));
    assert!(!wrong_ca.status.success());
    assert!(
        stderr(&wrong_ca).contains("certificate"),
        "{}",
        stderr(&wrong_ca)
    );
    let plaintext = status_trusting(&c, None);
    assert!(!plaintext.status.success());
    assert!(
        stderr(&plaintext).contains("--ca-cert"),
        "the error should say how to fix it: {}",
        stderr(&plaintext)
    );
}

#[test]
fn a_node_without_certificates_starts_only_when_told_insecure() {
    let dir = tempfile::tempdir().expect("temp dir");
    let args = |data: &str| {
        vec![
            "server".to_owned(),
            "--node-id".into(),
            "1".into(),
            "--client-addr".into(),
            "127.0.0.1:24800".into(),
            "--peer-addr".into(),
            "127.0.0.1:24900".into(),
            "--data-dir".into(),
            dir.path().join(data).to_str().expect("utf-8").into(),
        ]
    };
    let refused = Command::new(MANDATE)
        .args(args("refused"))
        .stdin(Stdio::null())
        .output()
        .expect("server");
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("tls") && stderr(&refused).contains("--insecure"),
        "{}",
        stderr(&refused)
    );
    assert!(
        !dir.path().join("refused").exists(),
        "a refused start must not create the data directory"
    );

    let log = dir.path().join("insecure.log");
    let file = std::fs::File::create(&log).expect("log");
    let mut child = Command::new(MANDATE)
        .args(args("insecure"))
        .arg("--insecure")
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("server");
    wait_for(
        "the plaintext node to listen",
        Duration::from_secs(20),
        || std::net::TcpStream::connect("127.0.0.1:24800").ok(),
    );
    let health = plain_http_get("127.0.0.1:24800", "/healthz");
    let _ = child.kill();
    let _ = child.wait();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.contains("INSECURE"),
        "the node must say so loudly: {text}"
    );
}
