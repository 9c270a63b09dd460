//! The raft transport over tonic: openraft's RPCs travel as bincode inside `RaftPayload`
//! messages on the peer listener.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mandate_proto::v1::raft_peer_client::RaftPeerClient;
use mandate_proto::v1::RaftPayload;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::{Member, NodeId, TypeConfig, PEER_MESSAGE_BYTES_MAX};

/// How long a peer connection attempt may take.
pub const PEER_CONNECT_TIMEOUT_MS: u64 = 500;

/// Lazily connected gRPC clients to the other members, by peer address: over mutual TLS when
/// the node has certificates, in plaintext when it runs `--insecure`.
#[derive(Clone, Default)]
pub struct PeerClients {
    channels: Arc<Mutex<BTreeMap<String, Channel>>>,
    tls: Option<ClientTlsConfig>,
}

impl PeerClients {
    /// Clients that dial with `tls` (`None`: plaintext).
    pub fn new(tls: Option<ClientTlsConfig>) -> Self {
        PeerClients {
            channels: Arc::default(),
            tls,
        }
    }

    /// A client for the peer listening at `peer_addr` (`host:port`).
    pub fn client(
        &self,
        peer_addr: &str,
    ) -> Result<RaftPeerClient<Channel>, tonic::transport::Error> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match channels.get(peer_addr) {
            Some(c) => c.clone(),
            None => {
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                let mut endpoint = Endpoint::from_shared(format!("{scheme}://{peer_addr}"))?
                    .connect_timeout(Duration::from_millis(PEER_CONNECT_TIMEOUT_MS))
                    .tcp_nodelay(true);
                if let Some(tls) = &self.tls {
                    endpoint = endpoint.tls_config(tls.clone())?;
                }
                let c = endpoint.connect_lazy();
                channels.insert(peer_addr.to_owned(), c.clone());
                c
            }
        };
        Ok(RaftPeerClient::new(channel)
            .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX))
    }
}

/// Creates a [`PeerNetwork`] per target member.
#[derive(Clone, Default)]
pub struct NetworkFactory {
    pub peers: PeerClients,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Self::Network {
        PeerNetwork {
            target,
            peer_addr: node.peer_addr.clone(),
            peers: self.peers.clone(),
        }
    }
}

/// The connection to one member.
pub struct PeerNetwork {
    target: NodeId,
    peer_addr: String,
    peers: PeerClients,
}

/// Encodes a value for the peer wire (openraft's types are bincode).
pub fn to_payload<T: Serialize>(value: &T) -> Result<RaftPayload, bincode::Error> {
    Ok(RaftPayload {
        payload: bincode::serialize(value)?,
    })
}

/// Decodes a value from the peer wire.
pub fn from_payload<T: DeserializeOwned>(payload: &RaftPayload) -> Result<T, bincode::Error> {
    bincode::deserialize(&payload.payload)
}

enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl PeerNetwork {
    async fn call<Req, Resp, E>(
        &self,
        rpc: Rpc,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload = to_payload(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut client = self
            .peers
            .client(&self.peer_addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let mut request = tonic::Request::new(payload);
        request.set_timeout(option.hard_ttl());
        let reply = match rpc {
            Rpc::AppendEntries => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::InstallSnapshot => client.install_snapshot(request).await,
        };
        let reply = reply.map_err(|status| match status.code() {
            tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&status)),
            _ => RPCError::Network(NetworkError::new(&status)),
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            from_payload(reply.get_ref()).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.call(Rpc::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Rpc::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}
