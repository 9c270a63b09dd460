//! Workloads: concurrent clients driving the public API while nemeses act, every operation
//! recorded in the history.
//!
//! - `register`: new agents, each once (invariant 1: acknowledged writes survive).
//! - `agent.create` / `agent.write` / `agent.read`: a few agents whose description is written
//!   and read by many clients through every node (linearizable registry reads).
//! - `grant.authorize` / `grant.consume`: agents and sub-agents authorize under delegations
//!   and re-delegations; each single-use grant is consumed by several clients at once, each
//!   through a different node.
//! - `delegation.revoke`: the user revokes delegations one by one while the others go on.
//! - audit subscribers follow the trail on several nodes.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use mandate_client::credentials::{agent_assertion, jwks_of, public_jwk, user_token};
use mandate_client::{pb, Client, ClientError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::history::{History, Outcome};

/// Most agents read back per page when checking what the cluster holds.
pub const LIST_PAGE_SIZE: u32 = 1000;
/// The description every linearizability agent is created with.
pub const INITIAL_DESCRIPTION: &str = "v0";
/// The resource tree the grant workload works in.
pub const RESOURCE_ROOT: &str = "secret/chaos";
/// Clients racing to consume each grant, each through a different node.
pub const CONSUMERS_PER_GRANT: usize = 3;
/// The user who delegates.
pub const USER: &str = "alice";

const POLICY: &str = r#"@id("chaos-user")
permit(principal == User::"alice", action == Action::"read", resource in Resource::"secret/chaos");

@id("chaos-agents")
permit(principal is Agent, action == Action::"read", resource in Resource::"secret/chaos");
"#;

const CEILING: &str =
    r#"permit(principal, action == Action::"read", resource in Resource::"secret/chaos");"#;

/// What every worker shares: the history and the stop flag.
#[derive(Clone)]
pub struct Shared {
    pub history: Arc<History>,
    pub stop: Arc<AtomicBool>,
}

impl Shared {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }
}

fn agent_id(response: pb::AgentResponse) -> String {
    response.agent.map(|a| a.id).unwrap_or_default()
}

/// One client registering agents named `<prefix>-<client>-<n>` until stopped.
pub async fn register_until(client: Arc<Client>, id: usize, prefix: String, shared: Shared) {
    let mut n = 0u64;
    while shared.running() {
        n += 1;
        register_once(&client, id, format!("{prefix}-{id}-{n}"), &shared).await;
    }
}

/// Registers agent `name`, recorded as a `register`; whether it was acknowledged.
pub async fn register_once(client: &Client, id: usize, name: String, shared: &Shared) -> bool {
    let request = pb::RegisterAgentRequest {
        name: name.clone(),
        owner: "chaos".into(),
        ..Default::default()
    };
    let call = client.registry(|mut c| {
        let r = request.clone();
        async move { c.register(r).await }
    });
    let node = client.current_addr().to_owned();
    let outcome = shared
        .history
        .observe(id, "register", name, String::new(), node, async {
            call.await.map(agent_id)
        })
        .await;
    outcome.is_ok()
}

/// One client creating, writing and reading the description of the agents in `keys`, through
/// the nodes it fails over among. `ids` is what the clients have learnt of the agents' ids.
pub async fn registry_until(
    client: Arc<Client>,
    id: usize,
    keys: Arc<Vec<String>>,
    ids: Arc<Mutex<HashMap<String, String>>>,
    seed: u64,
    shared: Shared,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut n = 0u64;
    while shared.running() {
        n += 1;
        let key = keys[rng.gen_range(0..keys.len())].clone();
        let known = ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let node = client.current_addr().to_owned();
        let history = &shared.history;
        match (known, rng.gen_range(0..10)) {
            (None, 0..=3) => {
                let request = pb::RegisterAgentRequest {
                    name: key.clone(),
                    owner: "chaos".into(),
                    description: INITIAL_DESCRIPTION.into(),
                    ..Default::default()
                };
                let call = client.registry(|mut c| {
                    let r = request.clone();
                    async move { c.register(r).await }
                });
                let outcome = history
                    .observe(
                        id,
                        "agent.create",
                        key.clone(),
                        INITIAL_DESCRIPTION.into(),
                        node,
                        async { call.await.map(agent_id) },
                    )
                    .await;
                if let Outcome::Ok { value } = outcome {
                    learn(&ids, key, value);
                }
            }
            (Some(agent), 0..=4) => {
                let value = format!("c{id}-{n}");
                let request = pb::UpdateAgentRequest {
                    id: agent,
                    description: Some(value.clone()),
                    ..Default::default()
                };
                let call = client.registry(|mut c| {
                    let r = request.clone();
                    async move { c.update(r).await }
                });
                history
                    .observe(id, "agent.write", key, value, node, async {
                        call.await.map(|_| String::new())
                    })
                    .await;
            }
            _ => {
                let request = pb::GetAgentRequest {
                    id_or_name: key.clone(),
                    read: None,
                };
                let call = client.registry(|mut c| {
                    let r = request.clone();
                    async move { c.get(r).await }
                });
                let mut learnt = None;
                history
                    .observe(id, "agent.read", key.clone(), String::new(), node, async {
                        call.await.map(|r| {
                            let agent = r.agent.unwrap_or_default();
                            learnt = Some(agent.id);
                            agent.description
                        })
                    })
                    .await;
                if let Some(agent) = learnt {
                    learn(&ids, key, agent);
                }
            }
        }
    }
}

fn learn(ids: &Mutex<HashMap<String, String>>, key: String, agent: String) {
    ids.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, agent);
}

/// The names of every agent whose name starts with `prefix`, read linearizably from the node(s)
/// `client` talks to.
pub async fn agent_names(client: &Client, prefix: &str) -> Result<BTreeSet<String>, ClientError> {
    let mut names = BTreeSet::new();
    let mut page_token = String::new();
    loop {
        let request = pb::ListAgentsRequest {
            page_size: LIST_PAGE_SIZE,
            page_token: page_token.clone(),
            ..Default::default()
        };
        let page = client
            .registry(|mut c| {
                let r = request.clone();
                async move { c.list(r).await }
            })
            .await?;
        names.extend(
            page.agents
                .into_iter()
                .map(|a| a.name)
                .filter(|n| n.starts_with(prefix)),
        );
        if page.next_page_token.is_empty() {
            return Ok(names);
        }
        page_token = page.next_page_token;
    }
}

/// An agent and its signing key.
pub struct Principal {
    pub id: String,
    pub key: SigningKey,
}

/// A delegation the grant workload authorizes under: the user's (`parent` none) or an
/// agent's re-delegation of one.
#[derive(Debug, Clone)]
pub struct Delegation {
    pub id: String,
    pub parent: Option<String>,
    /// Index of the agent it is to, in [`Grants::principals`].
    pub agent: usize,
}

/// What the grant workload set up before the faults: agents with keys, delegations to them
/// and re-delegations to sub-agents, and the user's token.
pub struct Grants {
    pub cluster_id: String,
    pub principals: Vec<Principal>,
    pub delegations: Vec<Delegation>,
    pub user_token: String,
}

/// A client call that must succeed (setup runs before any fault).
async fn must<T>(what: &str, call: impl std::future::Future<Output = Result<T, ClientError>>) -> T {
    call.await.unwrap_or_else(|e| panic!("setup: {what}: {e}"))
}

impl Grants {
    /// Trusts a fresh issuer, writes the policy, registers `agents` agents and as many
    /// sub-agents, and makes `per_agent` delegations from the user to each agent, each
    /// re-delegated to the agent's sub-agent.
    pub async fn setup(client: &Client, name: &str, agents: usize, per_agent: usize) -> Grants {
        let idp = SigningKey::generate(&mut rand::rngs::OsRng);
        let issuer = format!("chaos-{name}");
        let put = pb::PutIssuerRequest {
            issuer: Some(pb::TrustedIssuer {
                name: issuer.clone(),
                issuer: issuer.clone(),
                audience: "mandate".into(),
                jwks_json: jwks_of(&idp),
                leeway_s: 30,
            }),
        };
        must(
            "put issuer",
            client.authz(|mut c| {
                let r = put.clone();
                async move { c.put_issuer(r).await }
            }),
        )
        .await;
        let policy = pb::PutPolicyRequest {
            name: "chaos".into(),
            text: POLICY.into(),
        };
        must(
            "put policy",
            client.authz(|mut c| {
                let r = policy.clone();
                async move { c.put_policy(r).await }
            }),
        )
        .await;
        let cluster_id = must(
            "jwks",
            client.authz(|mut c| async move { c.jwks(pb::JwksRequest {}).await }),
        )
        .await
        .cluster_id;
        let user_token = user_token(&idp, &issuer, "mandate", USER, 24 * 3600).expect("user token");
        let mut principals = Vec::new();
        for i in 0..agents * 2 {
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            let register = pb::RegisterAgentRequest {
                name: format!("grants-{name}-{i}"),
                owner: USER.into(),
                public_keys: vec![public_jwk(&key.verifying_key())],
                ceiling: CEILING.into(),
                ..Default::default()
            };
            let agent = must(
                "register",
                client.registry(|mut c| {
                    let r = register.clone();
                    async move { c.register(r).await }
                }),
            )
            .await;
            principals.push(Principal {
                id: agent_id(agent),
                key,
            });
        }
        let mut delegations = Vec::new();
        for agent in 0..agents {
            for _ in 0..per_agent {
                let root = must(
                    "delegate",
                    create_delegation(
                        client,
                        user_delegation(&user_token, &principals[agent].id, "chaos", 24 * 3600),
                    ),
                )
                .await;
                let sub_agent = agents + agent;
                let assertion =
                    agent_assertion(&principals[agent].id, &principals[agent].key, &cluster_id)
                        .expect("assertion");
                let sub = must(
                    "re-delegate",
                    create_delegation(
                        client,
                        re_delegation(
                            assertion,
                            &root,
                            &principals[sub_agent].id,
                            "chaos, re-delegated",
                            12 * 3600,
                        ),
                    ),
                )
                .await;
                delegations.push(Delegation {
                    id: root.clone(),
                    parent: None,
                    agent,
                });
                delegations.push(Delegation {
                    id: sub,
                    parent: Some(root),
                    agent: sub_agent,
                });
            }
        }
        Grants {
            cluster_id,
            principals,
            delegations,
            user_token,
        }
    }

    fn assertion(&self, agent: usize) -> String {
        let p = &self.principals[agent];
        agent_assertion(&p.id, &p.key, &self.cluster_id).expect("assertion")
    }
}

/// The user's delegation of `read` on the resource tree to `agent`, re-delegable one hop.
fn user_delegation(
    user_token: &str,
    agent: &str,
    purpose: &str,
    ttl_seconds: u64,
) -> pb::CreateDelegationRequest {
    pb::CreateDelegationRequest {
        user_token: user_token.to_owned(),
        agent: agent.to_owned(),
        actions: vec!["read".into()],
        resources: vec![format!("{RESOURCE_ROOT}/*")],
        purpose: purpose.to_owned(),
        ttl_seconds,
        may_redelegate: true,
        max_depth: 1,
        ..Default::default()
    }
}

/// An agent's re-delegation of all of `parent` to `to`.
fn re_delegation(
    assertion: String,
    parent: &str,
    to: &str,
    purpose: &str,
    ttl_seconds: u64,
) -> pb::CreateDelegationRequest {
    pb::CreateDelegationRequest {
        agent_assertion: assertion,
        parent_id: parent.to_owned(),
        agent: to.to_owned(),
        actions: vec!["read".into()],
        resources: vec![format!("{RESOURCE_ROOT}/*")],
        purpose: purpose.to_owned(),
        ttl_seconds,
        ..Default::default()
    }
}

/// Creates a delegation; the new delegation's id.
async fn create_delegation(
    client: &Client,
    request: pb::CreateDelegationRequest,
) -> Result<String, ClientError> {
    client
        .authz(|mut c| {
            let r = request.clone();
            async move { c.create_delegation(r).await }
        })
        .await
        .map(delegation_id)
}

fn delegation_id(response: pb::DelegationResponse) -> String {
    response.delegation.map(|d| d.id).unwrap_or_default()
}

/// One user-side client creating delegations to the first agent until stopped, each
/// re-delegated by that agent to its sub-agent (`delegate`, `redelegate`: the value of an
/// acknowledged one is the new delegation's id).
pub async fn delegate_until(client: Arc<Client>, id: usize, grants: Arc<Grants>, shared: Shared) {
    let (agent, sub_agent) = (0, grants.principals.len() / 2);
    while shared.running() {
        let root = user_delegation(
            &grants.user_token,
            &grants.principals[agent].id,
            "chaos, delegated under faults",
            3600,
        );
        let call = create_delegation(&client, root);
        let node = client.current_addr().to_owned();
        let outcome = shared
            .history
            .observe(id, "delegate", String::new(), String::new(), node, call)
            .await;
        let Outcome::Ok { value: parent } = outcome else {
            continue;
        };
        let sub = re_delegation(
            grants.assertion(agent),
            &parent,
            &grants.principals[sub_agent].id,
            "chaos, re-delegated under faults",
            1800,
        );
        let call = create_delegation(&client, sub);
        let node = client.current_addr().to_owned();
        shared
            .history
            .observe(id, "redelegate", parent, String::new(), node, call)
            .await;
    }
}

/// The ids of the delegations to agent `agent`, as the node(s) `client` talks to hold them.
pub async fn delegation_ids(client: &Client, agent: &str) -> Result<BTreeSet<String>, ClientError> {
    let request = pb::ListDelegationsRequest {
        agent: agent.to_owned(),
        ..Default::default()
    };
    let list = client
        .authz(|mut c| {
            let r = request.clone();
            async move { c.list_delegations(r).await }
        })
        .await?;
    Ok(list.delegations.into_iter().map(|d| d.id).collect())
}

/// The value an `grant.authorize` records on allow: `allow:<grant id>`.
pub const ALLOW: &str = "allow:";

/// One agent-side client: authorizes under a random delegation (revoked ones too), and on
/// allow lets [`CONSUMERS_PER_GRANT`] clients, each through a different node, race to consume
/// the single-use grant.
pub async fn grants_until(
    client: Arc<Client>,
    consumers: Arc<Vec<Arc<Client>>>,
    id: usize,
    grants: Arc<Grants>,
    seed: u64,
    shared: Shared,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut n = 0u64;
    while shared.running() {
        n += 1;
        let d = grants.delegations[rng.gen_range(0..grants.delegations.len())].clone();
        let request = pb::AuthorizeRequest {
            agent_assertion: grants.assertion(d.agent),
            delegation_id: d.id.clone(),
            action: "read".into(),
            resource: format!("{RESOURCE_ROOT}/item-{id}-{n}"),
            ..Default::default()
        };
        let call = client.authz(|mut c| {
            let r = request.clone();
            async move { c.authorize(r).await }
        });
        let node = client.current_addr().to_owned();
        let mut token = None;
        let outcome = shared
            .history
            .observe(
                id,
                "grant.authorize",
                d.id.clone(),
                String::new(),
                node,
                async {
                    call.await.map(|r| match (r.decision(), r.grant) {
                        (pb::Decision::Allow, Some(grant)) => {
                            token = Some(r.token);
                            format!("{ALLOW}{}", grant.id)
                        }
                        (decision, _) => format!("{decision:?}: {}", r.reasons.join("; ")),
                    })
                },
            )
            .await;
        let (Outcome::Ok { value }, Some(token)) = (outcome, token) else {
            continue;
        };
        let grant = value.trim_start_matches(ALLOW).to_owned();
        let first = rng.gen_range(0..consumers.len());
        let races: Vec<_> = (0..CONSUMERS_PER_GRANT.min(consumers.len()))
            .map(|k| {
                let consumer = consumers[(first + k) % consumers.len()].clone();
                let shared = shared.clone();
                let (grant, token, delegation) = (grant.clone(), token.clone(), d.id.clone());
                tokio::spawn(async move {
                    let request = pb::ConsumeRequest { token };
                    let call = consumer.authz(|mut c| {
                        let r = request.clone();
                        async move { c.consume(r).await }
                    });
                    let node = consumer.current_addr().to_owned();
                    shared
                        .history
                        .observe(id, "grant.consume", grant, delegation, node, async {
                            call.await.map(|_| String::new())
                        })
                        .await;
                })
            })
            .collect();
        for race in races {
            race.await.expect("consumer task");
        }
    }
}

/// The user revokes one of its own delegations every `every`, in order, leaving the last
/// `keep` untouched so that authorizations go on succeeding.
pub async fn revoke_until(
    client: Arc<Client>,
    grants: Arc<Grants>,
    every: Duration,
    keep: usize,
    shared: Shared,
) {
    let roots: Vec<String> = grants
        .delegations
        .iter()
        .filter(|d| d.parent.is_none())
        .map(|d| d.id.clone())
        .collect();
    let revocable = roots.len().saturating_sub(keep);
    for root in roots.into_iter().take(revocable) {
        let started = tokio::time::Instant::now();
        while started.elapsed() < every {
            if !shared.running() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let request = pb::RevokeDelegationRequest {
            id: root.clone(),
            user_token: grants.user_token.clone(),
            agent_assertion: String::new(),
        };
        let call = client.authz(|mut c| {
            let r = request.clone();
            async move { c.revoke_delegation(r).await }
        });
        let node = client.current_addr().to_owned();
        shared
            .history
            .observe(0, "delegation.revoke", root, String::new(), node, async {
                call.await.map(|r| r.revoked_delegation_ids.join(","))
            })
            .await;
    }
}

/// One audit record as a subscriber saw it: position and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub log_index: u64,
    pub sequence: u32,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

impl From<&pb::AuditRecord> for Seen {
    fn from(r: &pb::AuditRecord) -> Self {
        Seen {
            log_index: r.log_index,
            sequence: r.sequence,
            prev_hash: r.prev_hash.clone(),
            hash: r.hash.clone(),
        }
    }
}

/// Follows the audit trail on one node from its oldest record until stopped, resuming after
/// the last record seen when the stream breaks (the node died, was cut off, restarted).
pub async fn subscribe_until(client: Arc<Client>, seen: Arc<Mutex<Vec<Seen>>>, shared: Shared) {
    while shared.running() {
        let from = seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .map(|s| pb::AuditPosition {
                log_index: s.log_index,
                sequence: s.sequence,
            });
        let request = pb::SubscribeRequest {
            from,
            follow: true,
            ..Default::default()
        };
        let stream = client
            .audit(|mut c| {
                let r = request.clone();
                async move { c.subscribe(r).await }
            })
            .await;
        let Ok(mut stream) = stream else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while shared.running() {
            match tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
                Err(_) => continue,
                Ok(Ok(Some(record))) => {
                    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                    let record = Seen::from(&record);
                    // Resuming starts at the last record seen (inclusive): skip it.
                    if seen.last() != Some(&record) {
                        seen.push(record);
                    }
                }
                Ok(_) => break,
            }
        }
    }
}

/// Node `client`'s whole audit trail up to and including `to`.
pub async fn audit_trail(client: &Client, to: pb::AuditPosition) -> Result<Vec<Seen>, ClientError> {
    let request = pb::SubscribeRequest {
        to: Some(to),
        follow: true,
        ..Default::default()
    };
    let mut stream = client
        .audit(|mut c| {
            let r = request.clone();
            async move { c.subscribe(r).await }
        })
        .await?;
    let mut trail = Vec::new();
    while let Some(record) = stream
        .message()
        .await
        .map_err(|s| ClientError::from_status(&s))?
    {
        trail.push(Seen::from(&record));
    }
    Ok(trail)
}
