//! `mandate tls init`: a cluster CA and node certificates (rcgen), for real deployments and for
//! `mandate dev` and the test clusters, which make throw-away ones.
//!
//! Files in DIR: `ca.pem` and `ca-key.pem` (the CA; keep the key offline in production), and per
//! node `node-ID.pem` and `node-ID-key.pem`. One certificate per node serves its client
//! listener, its peer listener and its connections to peers (server and client
//! authentication). Running it again reuses the CA and issues certificates only for nodes that
//! have none, so a node added later gets a certificate from the same CA.

use std::path::{Path, PathBuf};

use clap::Args;
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use serde_json::json;

use crate::identity::write_private;
use crate::output::print;
use crate::Failure;

/// Years a CA made here is valid.
pub const CA_VALID_YEARS: i32 = 10;
/// Years a node certificate made here is valid (renew before; see docs/operations.md).
pub const NODE_VALID_YEARS: i32 = 2;
/// Most host names and addresses on one node certificate.
pub const NODE_NAMES_MAX: usize = 16;

#[derive(Args, Debug)]
pub struct TlsInitArgs {
    /// Where the CA and the node certificates are written (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// A node and the names clients and peers reach it by: ID=HOST[,HOST...] (IP addresses or
    /// DNS names; repeatable).
    #[arg(long = "node", required = true)]
    nodes: Vec<String>,
    #[arg(long)]
    json: bool,
}

/// The files of one node's certificate.
pub struct NodeFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    1970 + i32::try_from(secs / 31_556_952).unwrap_or(0)
}

fn tls_error(what: &str) -> impl Fn(rcgen::Error) -> Failure + '_ {
    move |e| Failure(format!("{what}: {e}"))
}

/// The CA in `dir`, made if it is not there yet.
fn ensure_ca(dir: &Path) -> Result<(String, KeyPair), Failure> {
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    if cert_path.exists() {
        let key = std::fs::read_to_string(&key_path)
            .map_err(|e| Failure(format!("cannot read {}: {e}", key_path.display())))?;
        let key = KeyPair::from_pem(&key).map_err(tls_error("the CA key"))?;
        return Ok((std::fs::read_to_string(&cert_path)?, key));
    }
    let key = KeyPair::generate().map_err(tls_error("generating the CA key"))?;
    let mut params = CertificateParams::new(Vec::new()).map_err(tls_error("the CA"))?;
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Mandate");
    name.push(DnType::CommonName, "Mandate cluster CA");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let year = this_year();
    params.not_before = date_time_ymd(year - 1, 1, 1);
    params.not_after = date_time_ymd(year + CA_VALID_YEARS, 1, 1);
    let cert = params
        .self_signed(&key)
        .map_err(tls_error("signing the CA"))?;
    write_private(&key_path, &key.serialize_pem())?;
    std::fs::write(&cert_path, cert.pem())?;
    Ok((cert.pem(), key))
}

/// Makes `dir`'s CA if needed and a certificate for every node in `nodes` that has none.
pub fn ensure(dir: &Path, nodes: &[(u64, Vec<String>)]) -> Result<Vec<NodeFiles>, Failure> {
    std::fs::create_dir_all(dir)?;
    let (ca_pem, ca_key) = ensure_ca(dir)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key).map_err(tls_error("the CA"))?;
    let mut files = Vec::new();
    for (id, names) in nodes {
        let cert_path = dir.join(format!("node-{id}.pem"));
        let key_path = dir.join(format!("node-{id}-key.pem"));
        if !cert_path.exists() {
            let key = KeyPair::generate().map_err(tls_error("generating a node key"))?;
            let mut params = CertificateParams::new(names.clone())
                .map_err(tls_error(&format!("node {id}'s names")))?;
            let mut name = DistinguishedName::new();
            name.push(DnType::OrganizationName, "Mandate");
            name.push(DnType::CommonName, format!("mandate node {id}"));
            params.distinguished_name = name;
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let year = this_year();
            params.not_before = date_time_ymd(year - 1, 1, 1);
            params.not_after = date_time_ymd(year + NODE_VALID_YEARS, 1, 1);
            let cert = params
                .signed_by(&key, &issuer)
                .map_err(tls_error(&format!("signing node {id}'s certificate")))?;
            write_private(&key_path, &key.serialize_pem())?;
            std::fs::write(&cert_path, cert.pem())?;
        }
        files.push(NodeFiles {
            cert: cert_path,
            key: key_path,
            ca: dir.join("ca.pem"),
        });
    }
    Ok(files)
}

fn parse_node(spec: &str) -> Result<(u64, Vec<String>), Failure> {
    let bad = || {
        Failure(format!(
            "--node {spec:?}: expected ID=HOST[,HOST...], e.g. 1=10.0.0.1,mandate-1"
        ))
    };
    let (id, hosts) = spec.split_once('=').ok_or_else(bad)?;
    let id: u64 = id.parse().ok().filter(|i| *i > 0).ok_or_else(bad)?;
    let names: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(str::to_owned)
        .collect();
    if names.is_empty() || names.len() > NODE_NAMES_MAX {
        return Err(Failure(format!(
            "--node {spec:?}: give 1 to {NODE_NAMES_MAX} host names or addresses"
        )));
    }
    Ok((id, names))
}

pub fn init(args: TlsInitArgs) -> Result<(), Failure> {
    let nodes = args
        .nodes
        .iter()
        .map(|n| parse_node(n))
        .collect::<Result<Vec<_>, _>>()?;
    let files = ensure(&args.dir, &nodes)?;
    let listed: Vec<_> = nodes
        .iter()
        .zip(&files)
        .map(|((id, names), f)| {
            json!({ "id": id, "names": names, "cert_file": f.cert, "key_file": f.key })
        })
        .collect();
    print(
        &json!({ "ca_file": args.dir.join("ca.pem"), "nodes": listed }),
        args.json,
    );
    Ok(())
}
