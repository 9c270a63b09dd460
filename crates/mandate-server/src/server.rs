//! Assembling and running one node: storage, raft, the client listener (registry + cluster
//! services) and the peer listener (raft transport).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mandate_core::pb;
use mandate_proto::v1::agent_registry_server::AgentRegistryServer;
use mandate_proto::v1::audit_server::AuditServer;
use mandate_proto::v1::authz_server::AuthzServer;
use mandate_proto::v1::cluster_client::ClusterClient;
use mandate_proto::v1::cluster_server::ClusterServer;
use mandate_proto::v1::raft_peer_server::RaftPeerServer;
use mandate_proto::v1::{AddLearnerRequest, Member as MemberMsg};
use mandate_raft::peer_service::PeerService;
use mandate_raft::{Member, Node, RaftTiming, PEER_MESSAGE_BYTES_MAX};
use tokio::sync::watch;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::Status;

use crate::audit_service::{self, AuditService};
use crate::audit_sink::{self, SinkState, SinkStates};
use crate::authz_service::{self, AuthzService};
use crate::cluster_service::ClusterService;
use crate::config::{ConfigError, NodeConfig};
use crate::http;
use crate::refusals::{self, Refusals};
use crate::registry_service::RegistryService;
use crate::sealing::AuditHasher;
use crate::sealing::Kek;
use crate::tls::{member_endpoint, Tls};
use crate::tokens::Signer;
use crate::{status, CLIENT_MESSAGE_BYTES_MAX};

/// How often the leader looks for grants, approvals and replay-cache entries to expire.
pub const HOUSEKEEPING_INTERVAL_MS: u64 = 2_000;

fn load_kek(config: &NodeConfig) -> Result<Option<Kek>, ServerError> {
    let kek = match (&config.kek_file, std::env::var("MANDATE_KEK")) {
        (Some(path), _) => Some(Kek::from_file(path)),
        (None, Ok(hex)) => Some(Kek::from_hex(&hex)),
        (None, Err(_)) => None,
    };
    kek.transpose()
        .map_err(|e| ServerError::Start(e.to_string()))
}

/// How long a joining node keeps asking to be added as a learner.
pub const JOIN_ATTEMPTS_MAX: u32 = 60;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot start the node: {0}")]
    Start(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("the {listener} listener failed: {source}")]
    Serve {
        listener: &'static str,
        source: tonic::transport::Error,
    },
    #[error("raft stopped this node: {0}")]
    RaftStopped(String),
}

/// Who a command is proposed for, as authenticated by the serving node.
pub(crate) enum Principal {
    Operator(String),
    User(String),
    /// An agent, with the jti its command spends (empty for authorizations, which spend it
    /// themselves).
    Agent {
        id: String,
        jti: String,
        expires_ms: u64,
    },
    Bearer,
}

impl Principal {
    /// The principal of an agent authenticated by a client assertion.
    pub(crate) fn agent(verified: crate::tokens::VerifiedAgent) -> Self {
        Principal::Agent {
            id: verified.agent.id,
            jti: verified.jti,
            expires_ms: verified.expires_ms,
        }
    }
}

/// Proposes one command as the given operator and returns what apply made of it.
pub(crate) async fn submit(
    node: &Node,
    hasher: &AuditHasher,
    token: &pb::OperatorToken,
    kind: pb::command::Kind,
) -> Result<(pb::CommandApplied, u64), Status> {
    submit_as(node, hasher, Principal::Operator(token.id.clone()), kind).await
}

/// Proposes one command for `principal` and returns what apply made of it. The audit record's
/// stand-ins for sensitive values (token ids, the request context) are computed here, by the
/// serving node, with the audit key.
pub(crate) async fn submit_as(
    node: &Node,
    hasher: &AuditHasher,
    principal: Principal,
    kind: pb::command::Kind,
) -> Result<(pb::CommandApplied, u64), Status> {
    let mut command = pb::Command {
        serving_node: node.id,
        ..Default::default()
    };
    if hasher.hashes_secret_paths() {
        command.audit_hash_secret_paths = true;
        command.audit_resource = match &kind {
            pb::command::Kind::PutSecret(c) => hasher.resources([c.path.as_str()]),
            pb::command::Kind::Authorize(c) => hasher.resources([c.resource.as_str()]),
            pb::command::Kind::ConsumeGrant(c) => hasher.resources([c.resource.as_str()]),
            pb::command::Kind::CreateDelegation(c) => {
                hasher.resources(c.resources.iter().map(String::as_str))
            }
            _ => String::new(),
        };
    }
    match &kind {
        pb::command::Kind::CreateOperatorToken(c) => {
            command.audit_target = hasher.token_id(&c.token_id)
        }
        pb::command::Kind::RevokeOperatorToken(c) => {
            command.audit_target = hasher.token_id(&c.token_id)
        }
        pb::command::Kind::Authorize(c) => {
            command.audit_context = hasher.context(&c.request_context)
        }
        _ => {}
    }
    command.kind = Some(kind);
    match principal {
        Principal::Operator(id) => {
            command.audit_actor = hasher.token_id(&id);
            command.operator_token_id = id;
        }
        Principal::User(id) => command.user = id,
        Principal::Agent {
            id,
            jti,
            expires_ms,
        } => {
            command.agent = id;
            command.assertion_jti = jti;
            command.assertion_expires_ms = expires_ms;
        }
        Principal::Bearer => {}
    }
    let result = node
        .write(command)
        .await
        .map_err(|e| status::from_node(&e))?;
    match result.outcome {
        Some(pb::command_result::Outcome::Applied(applied)) => Ok((applied, result.log_index)),
        Some(pb::command_result::Outcome::Error(e)) => Err(status::from_command_error(&e)),
        None => Err(Status::internal("apply returned no outcome")),
    }
}

async fn bind(addr: &str) -> Result<tokio::net::TcpListener, ServerError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Listen {
            addr: addr.to_owned(),
            source,
        })
}

/// Runs a node until `shutdown` resolves.
pub async fn run(
    config: NodeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    config.validate()?;
    let member = Member {
        peer_addr: config.peer_addr.clone(),
        client_addr: config.client_addr.clone(),
    };
    let timing = RaftTiming::from(&config.raft);
    let tls = config.tls.as_ref().map(Tls::load).transpose()?;
    if tls.is_none() {
        tracing::warn!(
            "INSECURE: TLS is off (--insecure). Tokens, assertions, grants and secrets cross the \
             network in plaintext and any process that reaches the peer port can join raft. \
             Never run a real cluster like this."
        );
    }
    let node = Node::start(
        config.node_id,
        member,
        &config.data_dir,
        &timing,
        tls.as_ref().map(Tls::dialer),
    )
    .await
    .map_err(ServerError::Start)?;
    let kek = load_kek(&config)?;
    if kek.is_none() {
        tracing::warn!("no key-encryption key (kek_file or MANDATE_KEK): this node cannot sign grants or seal secrets");
    }
    let signer = Arc::new(Signer::new(kek));
    let client_listener = bind(&config.client_addr).await?;
    let peer_listener = bind(&config.peer_addr).await?;
    tracing::info!(
        node_id = config.node_id,
        client_addr = %config.client_addr,
        peer_addr = %config.peer_addr,
        data_dir = %config.data_dir.display(),
        "mandate node started"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut peer_builder = Server::builder();
    if let Some(tls) = &tls {
        peer_builder = peer_builder
            .tls_config(tls.peer_listener())
            .map_err(|source| ServerError::Serve {
                listener: "peer",
                source,
            })?;
    }
    let peer = peer_builder.add_service(
        RaftPeerServer::new(PeerService::new(node.clone()))
            .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX),
    );
    let hasher =
        AuditHasher::new(signer.kek()).hashing_secret_paths(config.audit.hash_secret_paths);
    let refusals = Refusals::new(hasher.clone());
    let refusal_task = tokio::spawn(refusals::flush(node.clone(), refusals.clone()));
    let grpc = Routes::new(
        AgentRegistryServer::new(RegistryService::new(
            node.clone(),
            hasher.clone(),
            refusals.clone(),
        ))
        .max_decoding_message_size(CLIENT_MESSAGE_BYTES_MAX),
    )
    .add_service(
        ClusterServer::new(ClusterService::new(
            node.clone(),
            config.clone(),
            signer.clone(),
            hasher.clone(),
            refusals.clone(),
            tls.clone(),
        ))
        .max_decoding_message_size(CLIENT_MESSAGE_BYTES_MAX),
    )
    .add_service(
        AuthzServer::new(AuthzService::new(
            node.clone(),
            signer.clone(),
            config.grants.clone(),
            hasher.clone(),
            refusals.clone(),
        ))
        .max_decoding_message_size(CLIENT_MESSAGE_BYTES_MAX),
    );
    let sinks: SinkStates = Arc::new(Mutex::new(
        config
            .audit
            .sinks
            .iter()
            .map(|s| SinkState {
                name: s.name.clone(),
                ..Default::default()
            })
            .collect(),
    ));
    let sink_tasks: Vec<_> = config
        .audit
        .sinks
        .iter()
        .enumerate()
        .map(|(index, sink)| {
            tokio::spawn(audit_sink::run(
                node.clone(),
                sink.clone(),
                config.data_dir.clone(),
                sinks.clone(),
                index,
            ))
        })
        .collect();
    let grpc = grpc.add_service(
        AuditServer::new(AuditService::new(
            node.clone(),
            sinks.clone(),
            hasher.clone(),
            refusals.clone(),
        ))
        .max_decoding_message_size(CLIENT_MESSAGE_BYTES_MAX),
    );
    let routes = Routes::from(grpc.into_axum_router().merge(http::routes(
        node.clone(),
        refusals.clone(),
        sinks.clone(),
    )));
    // HTTP/1.1 beside gRPC on the same port, for the JWKS document and the probes.
    let client = Server::builder().accept_http1(true).add_routes(routes);
    // TCP_NODELAY: a response written in several frames must not wait for the peer's delayed
    // ACK (Nagle), which adds about 40 ms to every small request.
    let incoming = |listener| TcpIncoming::from(listener).with_nodelay(Some(true));
    let peer_task = tokio::spawn(
        peer.serve_with_incoming_shutdown(incoming(peer_listener), stopped(stop_rx.clone())),
    );
    let client_stop = stopped(stop_rx.clone());
    let client_task = match &tls {
        Some(tls) => tokio::spawn(
            client.serve_with_incoming_shutdown(tls.client_incoming(client_listener), client_stop),
        ),
        None => tokio::spawn(
            client.serve_with_incoming_shutdown(incoming(client_listener), client_stop),
        ),
    };
    let audit_housekeeping = tokio::spawn(audit_service::housekeeping(
        node.clone(),
        config.audit.clone(),
        signer.clone(),
        Duration::from_millis(HOUSEKEEPING_INTERVAL_MS),
    ));
    let housekeeping = tokio::spawn(authz_service::housekeeping(
        node.clone(),
        Duration::from_millis(HOUSEKEEPING_INTERVAL_MS),
    ));
    if let Some(join) = config.join.clone() {
        tokio::spawn(join_cluster(
            node.clone(),
            config.clone(),
            tls.clone(),
            join,
        ));
    }

    // A fault that stops raft stops the node: it exits with the fault rather than go on
    // serving a state it can no longer keep current.
    let stopped_by_raft = tokio::select! {
        () = shutdown => None,
        fault = node.raft_stopped() => {
            tracing::error!(error = %fault, "raft stopped; the node stops");
            Some(fault)
        }
    };
    tracing::info!("mandate node stopping");
    let _ = stop_tx.send(true);
    housekeeping.abort();
    audit_housekeeping.abort();
    refusal_task.abort();
    for task in sink_tasks {
        task.abort();
    }
    let served = [("client", client_task.await), ("peer", peer_task.await)];
    if let Err(e) = node.raft.shutdown().await {
        tracing::warn!(error = %e, "raft did not shut down cleanly");
    }
    for (listener, result) in served {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(source)) => return Err(ServerError::Serve { listener, source }),
            Err(e) => return Err(ServerError::Start(format!("{listener} listener task: {e}"))),
        }
    }
    match stopped_by_raft {
        Some(fault) => Err(ServerError::RaftStopped(fault)),
        None => Ok(()),
    }
}

/// Asks the member at `join` to add this node as a learner, until it is a member.
async fn join_cluster(node: Arc<Node>, config: NodeConfig, tls: Option<Tls>, join: String) {
    let token = config
        .join_token
        .clone()
        .or_else(|| std::env::var("MANDATE_JOIN_TOKEN").ok());
    let Some(token) = token else {
        tracing::error!(
            "join is set but no join_token or MANDATE_JOIN_TOKEN was given; not joining"
        );
        return;
    };
    for attempt in 1..=JOIN_ATTEMPTS_MAX {
        if node
            .metrics()
            .membership_config
            .membership()
            .get_node(&node.id)
            .is_some()
        {
            tracing::info!("this node is a member of the cluster");
            return;
        }
        match ask_to_join(&join, &token, &config, tls.as_ref()).await {
            Ok(()) => {
                tracing::info!(join = %join, "added as a learner; promote it with `mandate cluster promote`");
                return;
            }
            Err(e) => tracing::warn!(attempt, join = %join, error = %e, "joining failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tracing::error!(join = %join, "giving up joining the cluster");
}

async fn ask_to_join(
    join: &str,
    token: &str,
    config: &NodeConfig,
    tls: Option<&Tls>,
) -> Result<(), String> {
    let channel = member_endpoint(join, tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut client = ClusterClient::new(channel);
    let mut request = tonic::Request::new(AddLearnerRequest {
        member: Some(MemberMsg {
            id: config.node_id,
            peer_addr: config.peer_addr.clone(),
            client_addr: config.client_addr.clone(),
        }),
    });
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|_| "the join token is not valid header text".to_owned())?;
    request.metadata_mut().insert("authorization", bearer);
    match client.add_learner(request).await {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
        Err(s) => Err(s.message().to_owned()),
    }
}
