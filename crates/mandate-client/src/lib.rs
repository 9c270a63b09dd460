//! Rust client for Mandate: a list of node addresses, failover to a live node, the operator
//! token on every call, and typed errors.
//!
//! Any node accepts any request (followers forward writes to the leader), so the client only
//! needs *a* live node. It keeps using the node that last answered, and moves to the next
//! address when a node is unreachable or reports that the cluster is unavailable from where it
//! stands. Requests whose outcome is unknown are never retried by the client.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mandate_proto::v1::agent_registry_client::AgentRegistryClient;
use mandate_proto::v1::audit_client::AuditClient;
use mandate_proto::v1::authz_client::AuthzClient;
use mandate_proto::v1::cluster_client::ClusterClient;
use tonic::codegen::InterceptedService;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status};

#[cfg(feature = "credentials")]
pub mod credentials;

pub use mandate_proto::v1 as pb;
pub use tonic::{Code, Streaming};

/// How long a connection attempt to one node may take.
pub const CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Default deadline of one request on one node.
pub const REQUEST_TIMEOUT_MS: u64 = 15_000;
/// How many passes over the address list a request makes before giving up.
pub const ADDRESS_PASSES_MAX: usize = 3;
/// Metadata key naming the field a refused request got wrong.
pub const FIELD_METADATA: &str = "mandate-field";

/// What went wrong with a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The client was given nothing usable.
    #[error("{0}")]
    Config(String),
    /// No node could serve the request.
    #[error("no Mandate node could serve the request: {0}")]
    Unavailable(String),
    /// A node refused the request or failed it.
    #[error("{message}")]
    Status {
        code: Code,
        message: String,
        /// The request field the refusal names, when it names one.
        field: Option<String>,
    },
}

impl ClientError {
    /// The gRPC code of a refusal, `Unavailable` when no node answered.
    pub fn code(&self) -> Code {
        match self {
            ClientError::Config(_) => Code::InvalidArgument,
            ClientError::Unavailable(_) => Code::Unavailable,
            ClientError::Status { code, .. } => *code,
        }
    }

    /// The error a status from a node stands for (as returned by a streaming call).
    pub fn from_status(status: &Status) -> Self {
        ClientError::Status {
            code: status.code(),
            message: status.message().to_owned(),
            field: status
                .metadata()
                .get(FIELD_METADATA)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        }
    }
}

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct BearerAuth {
    header: Option<MetadataValue<Ascii>>,
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        Ok(request)
    }
}

pub type Registry = AgentRegistryClient<InterceptedService<Channel, BearerAuth>>;
pub type Cluster = ClusterClient<InterceptedService<Channel, BearerAuth>>;
pub type Authz = AuthzClient<InterceptedService<Channel, BearerAuth>>;
pub type Audit = AuditClient<InterceptedService<Channel, BearerAuth>>;

/// A client of one Mandate cluster.
pub struct Client {
    addrs: Vec<String>,
    channels: Vec<Channel>,
    auth: BearerAuth,
    current: AtomicUsize,
    tls: bool,
}

/// Splits `a,b,c` (as in `MANDATE_ADDR`) into addresses.
pub fn parse_addrs(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

impl Client {
    /// A plaintext client for the nodes at `addrs` (`host:port`, or full `http://` URLs), for
    /// clusters run with `--insecure`.
    pub fn new(addrs: &[String], token: Option<&str>) -> Result<Self, ClientError> {
        Self::with_ca(addrs, token, None)
    }

    /// A client for the nodes at `addrs`; with `ca_pem` (the cluster CA, PEM) it speaks TLS
    /// and trusts only nodes whose certificates that CA signed.
    pub fn with_ca(
        addrs: &[String],
        token: Option<&str>,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, ClientError> {
        if addrs.is_empty() {
            return Err(ClientError::Config(
                "no node address given (use --addr or MANDATE_ADDR)".into(),
            ));
        }
        let tls =
            ca_pem.map(|pem| ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)));
        let mut channels = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let host = addr
                .strip_prefix("https://")
                .or_else(|| addr.strip_prefix("http://"))
                .unwrap_or(addr);
            let url = match (&tls, addr.starts_with("http://")) {
                (Some(_), true) => {
                    return Err(ClientError::Config(format!(
                        "{addr:?} asks for plaintext but a CA certificate was given (use https:// or host:port)"
                    )))
                }
                (Some(_), false) => format!("https://{host}"),
                (None, _) if addr.starts_with("https://") => {
                    return Err(ClientError::Config(format!(
                        "{addr:?} needs the cluster CA certificate (--ca-cert or MANDATE_CA_CERT)"
                    )))
                }
                (None, _) => format!("http://{host}"),
            };
            let mut endpoint = Endpoint::from_shared(url)
                .map_err(|e| ClientError::Config(format!("bad address {addr:?}: {e}")))?
                .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
                .timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
                .tcp_nodelay(true);
            if let Some(tls) = &tls {
                endpoint = endpoint
                    .tls_config(tls.clone())
                    .map_err(|e| ClientError::Config(format!("TLS for {addr:?}: {e}")))?;
            }
            channels.push(endpoint.connect_lazy());
        }
        let header = token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| ClientError::Config("the token is not valid header text".into()))
            })
            .transpose()?;
        Ok(Client {
            addrs: addrs.to_vec(),
            channels,
            auth: BearerAuth { header },
            current: AtomicUsize::new(0),
            tls: tls.is_some(),
        })
    }

    /// The address of the node the client currently talks to.
    pub fn current_addr(&self) -> &str {
        &self.addrs[self.current.load(Ordering::Relaxed) % self.addrs.len()]
    }

    /// A connection that failed below gRPC: most often TLS on one side only, or a node
    /// certificate the given CA did not sign.
    fn is_transport(status: &Status) -> bool {
        (status.code() == Code::Unknown && status.message().starts_with("transport error"))
            || (status.code() == Code::Internal
                && status.message().starts_with("h2 protocol error"))
    }

    fn tls_hint(&self) -> &'static str {
        if self.tls {
            " (TLS failed: is the node's certificate signed by the CA given with --ca-cert, or does the node run --insecure?)"
        } else {
            " (the node may require TLS: give the cluster CA with --ca-cert or MANDATE_CA_CERT)"
        }
    }

    /// Whether a failed call certainly never reached the node: the connection (TCP, or the
    /// TLS handshake) could not be made, so the request was never sent.
    fn never_sent(status: &Status) -> bool {
        let mut source = std::error::Error::source(status);
        while let Some(e) = source {
            let text = e.to_string();
            if text.contains("tcp connect error")
                || text.contains("error trying to connect")
                || text.contains("Connection refused")
                || text.contains("dns error")
                || text.contains("invalid peer certificate")
            {
                return true;
            }
            source = e.source();
        }
        false
    }

    /// Whether the status was made by this side's transport (the connection failed or broke),
    /// not sent by a node.
    fn from_transport(status: &Status) -> bool {
        std::error::Error::source(status).is_some()
    }

    async fn with_failover<C, T, F, Fut>(
        &self,
        make: impl Fn(Channel) -> C,
        call: F,
    ) -> Result<T, ClientError>
    where
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let n = self.channels.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = String::new();
        for attempt in 0..n * ADDRESS_PASSES_MAX {
            let i = (start + attempt) % n;
            // The transport's own timeouts do not cover a TLS handshake with a node that
            // accepted the connection and then stopped (a paused process): bound the whole call.
            let answer = tokio::time::timeout(
                Duration::from_millis(REQUEST_TIMEOUT_MS),
                call(make(self.channels[i].clone())),
            )
            .await;
            let Ok(answer) = answer else {
                // The request may have been received: its outcome is unknown, so no retry.
                return Err(ClientError::Status {
                    code: Code::DeadlineExceeded,
                    message: format!(
                        "{} gave no answer within {REQUEST_TIMEOUT_MS} ms; the outcome is unknown",
                        self.addrs[i]
                    ),
                    field: None,
                });
            };
            let status = match answer {
                Ok(response) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(response.into_inner());
                }
                Err(status) => status,
            };
            // A TLS client and a plaintext node (or the reverse) fail below gRPC.
            let hint =
                if Self::is_transport(&status) || (!self.tls && status.code() == Code::Cancelled) {
                    self.tls_hint()
                } else {
                    ""
                };
            if Self::from_transport(&status) || status.code() == Code::Cancelled {
                if Self::never_sent(&status) {
                    // Nothing reached the node: the next one may serve it.
                    last = format!("{}: {}{hint}", self.addrs[i], status.message());
                    continue;
                }
                // The connection broke with the request on it: it may have been applied, and
                // sending it again could apply it twice.
                return Err(ClientError::Status {
                    code: Code::Unknown,
                    message: format!(
                        "the connection to {} failed during the call; the outcome is unknown: {}{hint}",
                        self.addrs[i],
                        status.message()
                    ),
                    field: None,
                });
            }
            if status.code() == Code::Unavailable {
                // The node answered that it cannot serve the request (no leader, no quorum,
                // shutting down) and did nothing with it.
                last = format!("{}: {}", self.addrs[i], status.message());
                continue;
            }
            self.current.store(i, Ordering::Relaxed);
            return Err(ClientError::from_status(&status));
        }
        Err(ClientError::Unavailable(last))
    }

    /// Calls the agent registry on a live node.
    pub async fn registry<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(Registry) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let auth = self.auth.clone();
        self.with_failover(
            |c| {
                AgentRegistryClient::with_interceptor(c, auth.clone())
                    .max_decoding_message_size(64 * 1024 * 1024)
            },
            call,
        )
        .await
    }

    /// Calls the cluster service on a live node.
    pub async fn cluster<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(Cluster) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let auth = self.auth.clone();
        self.with_failover(
            |c| {
                ClusterClient::with_interceptor(c, auth.clone())
                    .max_decoding_message_size(64 * 1024 * 1024)
            },
            call,
        )
        .await
    }

    /// Calls the authorization service on a live node.
    pub async fn authz<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(Authz) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let auth = self.auth.clone();
        self.with_failover(
            |c| {
                AuthzClient::with_interceptor(c, auth.clone())
                    .max_decoding_message_size(64 * 1024 * 1024)
            },
            call,
        )
        .await
    }

    /// Calls the audit service on a live node (for a subscription: opens it there).
    pub async fn audit<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(Audit) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let auth = self.auth.clone();
        self.with_failover(
            |c| {
                AuditClient::with_interceptor(c, auth.clone())
                    .max_decoding_message_size(64 * 1024 * 1024)
            },
            call,
        )
        .await
    }

    /// Calls the cluster service on the node at `addrs[index]` only (no failover).
    pub async fn cluster_at<T, F, Fut>(&self, index: usize, call: F) -> Result<T, ClientError>
    where
        F: FnOnce(Cluster) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let channel = self
            .channels
            .get(index)
            .ok_or_else(|| ClientError::Config(format!("no address number {index}")))?
            .clone();
        call(ClusterClient::with_interceptor(channel, self.auth.clone()))
            .await
            .map(Response::into_inner)
            .map_err(|s| match s.code() {
                Code::Unavailable => {
                    ClientError::Unavailable(format!("{}: {}", self.addrs[index], s.message()))
                }
                _ => ClientError::from_status(&s),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_lists_split_on_commas_and_ignore_blanks() {
        assert_eq!(parse_addrs("a:1, b:2,,c:3 "), vec!["a:1", "b:2", "c:3"]);
        assert!(parse_addrs(" ").is_empty());
    }

    async fn get_agent(client: &Client) -> Result<pb::AgentResponse, ClientError> {
        client
            .registry(|mut c| async move {
                c.get(pb::GetAgentRequest {
                    id_or_name: "a".into(),
                    read: None,
                })
                .await
            })
            .await
    }

    /// An address nothing listens on.
    fn closed_port() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        drop(listener);
        addr
    }

    #[tokio::test]
    async fn nodes_that_refuse_connections_are_passed_over_and_reported_unavailable() {
        let client = Client::new(&[closed_port(), closed_port()], None).expect("client");
        let err = get_agent(&client).await.expect_err("nothing listens");
        assert!(
            matches!(err, ClientError::Unavailable(_)),
            "a request that reached no node is safe to report as not done: {err:?}"
        );
    }

    #[tokio::test]
    async fn a_connection_that_breaks_during_a_call_is_not_retried_elsewhere() {
        // A "node" that takes the request and drops the connection without answering.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let broken = listener.local_addr().expect("addr").to_string();
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await;
                drop(socket);
            }
        });
        // The second node would answer "unavailable" if asked; it must not be asked.
        let second = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let second_addr = second.local_addr().expect("addr").to_string();
        let client = Client::new(&[broken, second_addr], None).expect("client");
        let err = get_agent(&client).await.expect_err("no answer");
        assert_eq!(err.code(), Code::Unknown, "{err:?}");
        assert!(err.to_string().contains("outcome is unknown"), "{err}");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        let asked = tokio::time::timeout(Duration::from_millis(200), second.accept()).await;
        assert!(asked.is_err(), "the request was sent to a second node");
    }

    #[test]
    fn a_client_needs_at_least_one_address() {
        let err = Client::new(&[], None).err().expect("no addresses");
        assert!(err.to_string().contains("MANDATE_ADDR"));
    }
}
