//! Mandate's consensus layer: openraft configured for Mandate, its tonic transport, the
//! leader-side write batcher, leader forwarding and linearizable reads.
//!
//! A write enters through [`Node::write`] on any node. A follower's [`forwarder::Forwarder`]
//! hands it to the leader over the internal `RaftPeer.ForwardBatch` RPC, together with the other
//! writes waiting on that follower; the leader stamps it (time, request id, generated ids)
//! and hands it to the [`batcher::Batcher`], which packs concurrent commands into one log entry.
//! Each caller receives the result of its own command.

pub mod batcher;
pub mod forwarder;
pub mod network;
pub mod node;
pub mod peer_service;
pub mod snapshots;
pub mod stamp;

pub use mandate_store::{Member, NodeId, TypeConfig};
pub use node::{Node, NodeError, ReadConsistency};

/// The openraft instance type for Mandate.
pub type Raft = openraft::Raft<TypeConfig>;

/// Timing of the raft protocol, in milliseconds.
#[derive(Debug, Clone)]
pub struct RaftTiming {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot every this many applied log entries; each member at its own offset
    /// (see [`snapshots`]).
    pub snapshot_logs_since_last: u64,
    /// Log entries kept after a snapshot, for followers that lag a little.
    pub logs_kept_after_snapshot: u64,
    /// How long sending one snapshot chunk to a lagging follower may take, and for the last
    /// chunk, installing the whole snapshot there (decoding it, replacing the state, fsync).
    /// openraft's default (200 ms) is far too short for a snapshot of any size: the leader
    /// would restart the transfer forever and the follower never catch up.
    pub install_snapshot_timeout_ms: u64,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming {
            // A follower campaigns once openraft's leader lease (election_timeout_max) and its
            // own election timeout have passed without a heartbeat: 1.5 to 2 s after a leader
            // dies with these values (measured with `mandate bench failover`).
            heartbeat_ms: 100,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 800,
            // A snapshot copies the whole state (hundreds of MB at a million delegations), so
            // it is taken as rarely as etcd's default `--snapshot-count`; the state itself is
            // persistent, so a restart never replays from the snapshot.
            snapshot_logs_since_last: 100_000,
            logs_kept_after_snapshot: 1_000,
            install_snapshot_timeout_ms: 60_000,
        }
    }
}

impl RaftTiming {
    /// The openraft configuration for these timings, or why they are inconsistent.
    pub fn to_config(&self) -> Result<openraft::Config, String> {
        if self.install_snapshot_timeout_ms < INSTALL_SNAPSHOT_TIMEOUT_MS_MIN {
            return Err(format!(
                "install_snapshot_timeout_ms is {}; sending and installing a snapshot chunk needs at least {INSTALL_SNAPSHOT_TIMEOUT_MS_MIN}",
                self.install_snapshot_timeout_ms
            ));
        }
        snapshots::SnapshotSchedule::new(self.snapshot_logs_since_last)?;
        openraft::Config {
            cluster_name: "mandate".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            // Each node asks for its own snapshots on its own schedule (`snapshots::run`).
            snapshot_policy: openraft::SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: self.logs_kept_after_snapshot,
            snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
            install_snapshot_timeout: self.install_snapshot_timeout_ms,
            ..Default::default()
        }
        .validate()
        .map_err(|e| e.to_string())
    }
}

/// Shortest `install_snapshot_timeout_ms` accepted.
pub const INSTALL_SNAPSHOT_TIMEOUT_MS_MIN: u64 = 1_000;

/// Size of one InstallSnapshot chunk sent to a lagging follower.
pub const SNAPSHOT_CHUNK_BYTES: u64 = 1024 * 1024;
/// Largest gRPC message between peers (an AppendEntries with a full batch, a snapshot chunk).
pub const PEER_MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_installs_get_far_more_time_than_openraft_gives_by_default() {
        let config = RaftTiming::default().to_config().expect("valid defaults");
        assert_eq!(config.install_snapshot_timeout, 60_000);
        let short = RaftTiming {
            install_snapshot_timeout_ms: 200,
            ..RaftTiming::default()
        };
        let err = short.to_config().expect_err("200 ms is refused");
        assert!(err.contains("install_snapshot_timeout_ms"), "{err}");
    }

    #[test]
    fn a_configuration_with_no_entries_between_snapshots_is_refused() {
        let never = RaftTiming {
            snapshot_logs_since_last: 0,
            ..RaftTiming::default()
        };
        let err = never
            .to_config()
            .expect_err("0 entries between snapshots is refused");
        assert!(err.contains("snapshot_logs_since_last"), "{err}");
    }
}
