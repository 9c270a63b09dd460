//! Node configuration: one TOML file, every key overridable by `MANDATE_*` environment
//! variables and by command-line flags (the CLI applies those on top of the file).

use std::path::{Path, PathBuf};

use mandate_raft::RaftTiming;
use serde::{Deserialize, Serialize};

use crate::audit_sink::SinkConfig;
use crate::tls::TlsFiles;

/// One initial member of the cluster, as listed in `peers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerConfig {
    pub id: u64,
    pub peer_addr: String,
    pub client_addr: String,
}

/// Raft timings; see [`RaftTiming`] for the meaning of each.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftConfig {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub snapshot_logs_since_last: u64,
    pub logs_kept_after_snapshot: u64,
    pub install_snapshot_timeout_ms: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        let t = RaftTiming::default();
        RaftConfig {
            heartbeat_ms: t.heartbeat_ms,
            election_timeout_min_ms: t.election_timeout_min_ms,
            election_timeout_max_ms: t.election_timeout_max_ms,
            snapshot_logs_since_last: t.snapshot_logs_since_last,
            logs_kept_after_snapshot: t.logs_kept_after_snapshot,
            install_snapshot_timeout_ms: t.install_snapshot_timeout_ms,
        }
    }
}

impl From<&RaftConfig> for RaftTiming {
    fn from(c: &RaftConfig) -> Self {
        RaftTiming {
            heartbeat_ms: c.heartbeat_ms,
            election_timeout_min_ms: c.election_timeout_min_ms,
            election_timeout_max_ms: c.election_timeout_max_ms,
            snapshot_logs_since_last: c.snapshot_logs_since_last,
            logs_kept_after_snapshot: c.logs_kept_after_snapshot,
            install_snapshot_timeout_ms: c.install_snapshot_timeout_ms,
        }
    }
}

/// Limits on the grants this node issues. The cluster-wide hard limits (15 minutes, 100 uses)
/// are enforced by apply; these may only be tighter.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrantConfig {
    /// Lifetime of a grant when the agent asks for none.
    pub ttl_s_default: u64,
    /// Longest lifetime an agent may ask for.
    pub ttl_s_max: u64,
    /// Most uses an agent may ask for (a grant has 1 use unless it asks).
    pub uses_max: u32,
}

impl Default for GrantConfig {
    fn default() -> Self {
        GrantConfig {
            ttl_s_default: mandate_core::authz::GRANT_TTL_MS_DEFAULT / 1000,
            ttl_s_max: mandate_core::authz::GRANT_TTL_MS_MAX / 1000,
            uses_max: mandate_core::authz::GRANT_USES_MAX,
        }
    }
}

/// How much audit history the cluster keeps. The leader's settings decide (it proposes the
/// compactions), so give every node the same.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Most records retained; older ones are dropped first.
    pub retain_records: u64,
    /// Records older than this many seconds are dropped (0 = no age limit).
    pub retain_age_s: u64,
    /// How often the leader signs a checkpoint of the trail (when it has grown).
    pub checkpoint_interval_s: u64,
    /// Name secret paths in records by their audit HMAC only (set it on every node).
    pub hash_secret_paths: bool,
    /// Where this node copies the trail (`[[audit.sinks]]`); only the config file declares them.
    pub sinks: Vec<SinkConfig>,
}

/// Records kept by default.
pub const AUDIT_RETAIN_RECORDS_DEFAULT: u64 = 10_000_000;
/// Age kept by default: 400 days, beyond a year of history for yearly reviews.
pub const AUDIT_RETAIN_AGE_S_DEFAULT: u64 = 400 * 24 * 3600;

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            retain_records: AUDIT_RETAIN_RECORDS_DEFAULT,
            retain_age_s: AUDIT_RETAIN_AGE_S_DEFAULT,
            checkpoint_interval_s: 60,
            hash_secret_paths: false,
            sinks: Vec::new(),
        }
    }
}

/// The configuration of one node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's raft id; unique in the cluster and never reused.
    pub node_id: u64,
    /// Where clients reach this node (`host:port`).
    pub client_addr: String,
    /// Where the other members reach this node (`host:port`).
    pub peer_addr: String,
    /// Where the raft log, state and snapshots live.
    pub data_dir: PathBuf,
    /// The initial voters (this node included or not) used by `mandate cluster init`.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// A member's client address to ask, at start, to add this node as a learner.
    #[serde(default)]
    pub join: Option<String>,
    /// The operator token used for `join` (better given as `MANDATE_JOIN_TOKEN`).
    #[serde(default)]
    pub join_token: Option<String>,
    /// File holding the key-encryption key (64 hex digits); `MANDATE_KEK` may give it instead.
    /// Without one the node cannot sign grants or seal secrets.
    #[serde(default)]
    pub kek_file: Option<PathBuf>,
    /// Certificates for both listeners (`[tls]`); required unless `insecure`.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// Serve and dial in plaintext. Only for local experiments: the node logs it loudly.
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub grants: GrantConfig,
    #[serde(default)]
    pub raft: RaftConfig,
    #[serde(default)]
    pub audit: AuditConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the configuration file {path} is invalid: {message}")]
    Parse { path: String, message: String },
    #[error("configuration key {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

impl NodeConfig {
    /// Reads a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// The file form of this configuration.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a NodeConfig always serializes")
    }

    /// Checks the configuration as a whole.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(ConfigError::Invalid {
                key: "node_id",
                message: "must be at least 1 (0 means \"no node\" in status output)".into(),
            });
        }
        for (key, addr) in [
            ("client_addr", &self.client_addr),
            ("peer_addr", &self.peer_addr),
        ] {
            mandate_core::validate::host_port(key, addr).map_err(|e| ConfigError::Invalid {
                key,
                message: e.message,
            })?;
        }
        if self.client_addr == self.peer_addr {
            return Err(ConfigError::Invalid {
                key: "peer_addr",
                message: "must differ from client_addr".into(),
            });
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                key: "data_dir",
                message: "must be set".into(),
            });
        }
        let mut ids = std::collections::BTreeSet::new();
        for peer in &self.peers {
            if peer.id == 0 || !ids.insert(peer.id) {
                return Err(ConfigError::Invalid {
                    key: "peers",
                    message: format!("peer id {} is zero or listed twice", peer.id),
                });
            }
            if peer.id == self.node_id
                && (peer.peer_addr != self.peer_addr || peer.client_addr != self.client_addr)
            {
                return Err(ConfigError::Invalid {
                    key: "peers",
                    message: format!(
                        "the entry for this node ({}) disagrees with client_addr/peer_addr",
                        peer.id
                    ),
                });
            }
        }
        match (&self.tls, self.insecure) {
            (None, false) => {
                return Err(ConfigError::Invalid {
                    key: "tls",
                    message: "no certificates: set [tls] cert_file, key_file and ca_file \
                              (`mandate tls init` makes them), or run with --insecure to \
                              serve plaintext"
                        .into(),
                })
            }
            (Some(_), true) => {
                return Err(ConfigError::Invalid {
                    key: "insecure",
                    message: "cannot be set together with [tls]".into(),
                })
            }
            _ => {}
        }
        let hard = GrantConfig::default();
        let g = &self.grants;
        if g.ttl_s_max == 0
            || g.ttl_s_max > hard.ttl_s_max
            || g.ttl_s_default == 0
            || g.ttl_s_default > g.ttl_s_max
        {
            return Err(ConfigError::Invalid {
                key: "grants",
                message: format!(
                    "need 1 <= ttl_s_default <= ttl_s_max <= {} (got {} and {})",
                    hard.ttl_s_max, g.ttl_s_default, g.ttl_s_max
                ),
            });
        }
        if g.uses_max == 0 || g.uses_max > hard.uses_max {
            return Err(ConfigError::Invalid {
                key: "grants",
                message: format!("uses_max must be between 1 and {}", hard.uses_max),
            });
        }
        let mut names = std::collections::BTreeSet::new();
        for sink in &self.audit.sinks {
            sink.validate().map_err(|message| ConfigError::Invalid {
                key: "audit.sinks",
                message,
            })?;
            if !names.insert(sink.name.as_str()) {
                return Err(ConfigError::Invalid {
                    key: "audit.sinks",
                    message: format!("two sinks are named {:?}", sink.name),
                });
            }
        }
        if self.audit.checkpoint_interval_s == 0 {
            return Err(ConfigError::Invalid {
                key: "audit",
                message: "checkpoint_interval_s must be at least 1".into(),
            });
        }
        if self.audit.retain_records == 0 {
            return Err(ConfigError::Invalid {
                key: "audit",
                message: "retain_records must be at least 1".into(),
            });
        }
        RaftTiming::from(&self.raft)
            .to_config()
            .map_err(|message| ConfigError::Invalid {
                key: "raft",
                message,
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NodeConfig {
        NodeConfig {
            node_id: 1,
            client_addr: "127.0.0.1:7400".into(),
            peer_addr: "127.0.0.1:7500".into(),
            data_dir: "/tmp/x".into(),
            peers: vec![],
            join: None,
            join_token: None,
            kek_file: None,
            tls: None,
            insecure: true,
            grants: GrantConfig::default(),
            raft: RaftConfig::default(),
            audit: AuditConfig::default(),
        }
    }

    #[test]
    fn a_config_round_trips_through_toml() {
        let c = config();
        let back: NodeConfig = toml::from_str(&c.to_toml()).expect("parses");
        assert_eq!(back.to_toml(), c.to_toml());
        back.validate().expect("valid");
    }

    #[test]
    fn audit_sinks_are_declared_in_the_file_and_checked() {
        let text = r#"
node_id = 1
client_addr = "127.0.0.1:7400"
peer_addr = "127.0.0.1:7500"
data_dir = "/tmp/x"
insecure = true

[audit]
retain_records = 1000

[[audit.sinks]]
name = "local"
kind = "file"
path = "/var/log/mandate/audit.jsonl"

[[audit.sinks]]
name = "console"
kind = "stdout"
"#;
        let c: NodeConfig = toml::from_str(text).expect("parses");
        c.validate().expect("valid");
        assert_eq!(c.audit.retain_records, 1000);
        assert_eq!(c.audit.sinks.len(), 2);
        assert_eq!(c.audit.sinks[0].max_bytes, 100 * 1024 * 1024);

        let mut twice = c.clone();
        twice.audit.sinks[1].name = "local".into();
        assert!(twice
            .validate()
            .expect_err("dup")
            .to_string()
            .contains("two sinks"));
        let mut no_path = c.clone();
        no_path.audit.sinks[0].path = None;
        assert!(no_path
            .validate()
            .expect_err("path")
            .to_string()
            .contains("needs a path"));
        let mut none_kept = c;
        none_kept.audit.retain_records = 0;
        assert!(none_kept
            .validate()
            .expect_err("zero")
            .to_string()
            .contains("audit"));
    }

    #[test]
    fn invalid_settings_name_their_key() {
        let mut c = config();
        c.node_id = 0;
        assert!(c
            .validate()
            .expect_err("zero id")
            .to_string()
            .contains("node_id"));
        let mut c = config();
        c.peer_addr = c.client_addr.clone();
        assert!(c
            .validate()
            .expect_err("same addr")
            .to_string()
            .contains("peer_addr"));
        let mut c = config();
        c.client_addr = "localhost".into();
        assert!(c
            .validate()
            .expect_err("no port")
            .to_string()
            .contains("client_addr"));
        let mut c = config();
        c.peer_addr = "mandate_1:7500".into();
        assert!(c
            .validate()
            .expect_err("underscore")
            .to_string()
            .contains("peer_addr"));
        let mut c = config();
        c.client_addr = "mandate-1.mandate.default.svc:7400".into();
        c.peer_addr = "mandate-1.mandate.default.svc:7500".into();
        c.validate().expect("DNS names are addresses too");
    }

    #[test]
    fn grant_limits_may_only_tighten_the_cluster_limits() {
        let mut c = config();
        c.grants.ttl_s_max = 3600;
        assert!(c
            .validate()
            .expect_err("too long")
            .to_string()
            .contains("grants"));
        let mut c = config();
        c.grants.ttl_s_default = 120;
        c.grants.ttl_s_max = 60;
        assert!(c.validate().is_err());
        let mut c = config();
        c.grants.uses_max = 5;
        c.grants.ttl_s_max = 30;
        c.grants.ttl_s_default = 10;
        c.validate().expect("tighter limits are fine");
    }

    #[test]
    fn a_node_without_certificates_must_say_insecure() {
        let mut c = config();
        c.insecure = false;
        let err = c.validate().expect_err("no tls").to_string();
        assert!(err.contains("tls") && err.contains("--insecure"), "{err}");
        c.tls = Some(TlsFiles {
            cert_file: "node.pem".into(),
            key_file: "node-key.pem".into(),
            ca_file: "ca.pem".into(),
        });
        c.validate().expect("certificates given");
        c.insecure = true;
        assert!(c
            .validate()
            .expect_err("both")
            .to_string()
            .contains("insecure"));
    }

    #[test]
    fn the_example_node_configs_in_deploy_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config");
        for id in 1..=3u64 {
            let c = NodeConfig::load(&dir.join(format!("node-{id}.toml"))).expect("loads");
            c.validate().expect("valid");
            assert_eq!(c.node_id, id);
            assert!(c.tls.is_some() && !c.insecure, "examples use TLS");
            assert_eq!(c.peers.len(), 3);
        }
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused() {
        let text = format!("{}\nbogus = 1\n", config().to_toml());
        let err = toml::from_str::<NodeConfig>(&text).expect_err("unknown key");
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}
