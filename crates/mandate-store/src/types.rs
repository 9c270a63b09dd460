//! The openraft type configuration shared by storage and the raft layer.
//!
//! A log entry's payload is a [`Batch`]: one protobuf-encoded `CommandBatch`. Its response is a
//! [`BatchOutcome`]: one `CommandResult` per command. openraft's own envelope (log id,
//! membership, vote) is bincode, the only place bincode is used.

use std::fmt;
use std::io::Cursor;

use mandate_proto::v1 as pb;
use prost::Message;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub type NodeId = u64;

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Batch,
        R = BatchOutcome,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// What the cluster knows about a member: where its peers and its clients reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub peer_addr: String,
    pub client_addr: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer={} client={}", self.peer_addr, self.client_addr)
    }
}

/// The commands of one log entry. Serialized as protobuf bytes inside openraft's envelope.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch(pub pb::CommandBatch);

impl Serialize for Batch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0.encode_to_vec())
    }
}

impl<'de> Deserialize<'de> for Batch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes: Vec<u8> = serde::de::Deserialize::deserialize(d)?;
        pb::CommandBatch::decode(bytes.as_slice())
            .map(Batch)
            .map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "batch of {} commands", self.0.commands.len())
    }
}

/// One result per command of a [`Batch`] (empty for blank and membership entries).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchOutcome(pub Vec<pb::CommandResult>);

impl Serialize for BatchOutcome {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let encoded: Vec<Vec<u8>> = self.0.iter().map(Message::encode_to_vec).collect();
        encoded.serialize(s)
    }
}

impl<'de> Deserialize<'de> for BatchOutcome {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let encoded: Vec<Vec<u8>> = Deserialize::deserialize(d)?;
        encoded
            .iter()
            .map(|b| pb::CommandResult::decode(b.as_slice()))
            .collect::<Result<_, _>>()
            .map(BatchOutcome)
            .map_err(serde::de::Error::custom)
    }
}
