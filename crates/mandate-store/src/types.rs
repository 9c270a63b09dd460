//! The openraft type configuration shared by storage and the raft layer.
//!
//! A log entry's payload is a [`Batch`]: one protobuf-encoded `CommandBatch`. Its response is a
//! [`BatchOutcome`]: one `CommandResult` per command. openraft's own envelope (log id,
//! membership, vote) is bincode, the only place bincode is used.

use std::fmt;

use bytes::Bytes;
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
        SnapshotData = crate::snapshot::SnapshotFile,
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

/// The commands of one log entry, held as the protobuf encoding of a `CommandBatch`. The
/// leader's batcher encodes it once; the log store, replication and the followers' logs copy
/// those bytes as they are, and apply decodes them once on each node. (Held decoded, every
/// command was encoded and decoded again for the leader's log, for each follower, for each
/// follower's log, and for each apply.) The serialized form is the same either way: the bytes
/// inside openraft's envelope.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch(Bytes);

impl Batch {
    /// The entry payload for `batch`.
    pub fn new(batch: &pb::CommandBatch) -> Self {
        Batch(batch.encode_to_vec().into())
    }

    /// The commands.
    pub fn decode(&self) -> Result<pb::CommandBatch, prost::DecodeError> {
        pb::CommandBatch::decode(self.0.as_ref())
    }
}

impl Serialize for Batch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Batch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes: Vec<u8> = serde::de::Deserialize::deserialize(d)?;
        Ok(Batch(bytes.into()))
    }
}

impl fmt::Display for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "command batch of {} bytes", self.0.len())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_stored_as_the_bytes_a_decoded_batch_was_and_decodes_to_its_commands() {
        let commands = pb::CommandBatch {
            commands: vec![pb::Command {
                request_id: "r1".into(),
                time_ms: 7,
                ..Default::default()
            }],
        };
        // A log entry's payload as written while batches were held decoded: bincode's byte
        // string (a little-endian u64 length, then the bytes) of the protobuf encoding.
        let encoded = commands.encode_to_vec();
        let mut earlier = (encoded.len() as u64).to_le_bytes().to_vec();
        earlier.extend_from_slice(&encoded);
        assert_eq!(
            bincode::serialize(&Batch::new(&commands)).expect("encode"),
            earlier
        );
        let read: Batch = bincode::deserialize(&earlier).expect("decode");
        assert_eq!(read.decode().expect("protobuf"), commands);
    }
}
