//! The bench's workloads: what one request of each is, and the state it needs set up first
//! (an issuer, a policy, an agent with its key, a delegation, live grants).

use std::sync::atomic::{AtomicU64, Ordering};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use mandate_client::{pb, Client};

use crate::identity;
use crate::{Connection, Failure};

#[derive(Debug, Clone)]
pub enum Workload {
    Register,
    Delegate,
    Authorize,
    AuthorizeConsume,
    Check { batch: usize },
    Introspect,
    Verify,
    AuditLag,
}

impl Workload {
    pub fn name(&self) -> &'static str {
        match self {
            Workload::Register => "register",
            Workload::Delegate => "delegate",
            Workload::Authorize => "authorize",
            Workload::AuthorizeConsume => "authorize+consume",
            Workload::Check { .. } => "check",
            Workload::Introspect => "introspect",
            Workload::Verify => "verify",
            Workload::AuditLag => "audit-lag",
        }
    }

    /// What `per_second` counts.
    pub fn unit(&self) -> &'static str {
        match self {
            Workload::Register => "registrations",
            Workload::Delegate => "delegations",
            Workload::Authorize | Workload::AuditLag => "authorizations",
            Workload::AuthorizeConsume => "authorize+consume pairs",
            Workload::Check { .. } => "decisions",
            Workload::Introspect => "introspections",
            Workload::Verify => "verifications",
        }
    }
}

/// An agent allowed `read` on `secret/bench/*` through one delegation.
pub struct AgentWorld {
    pub agent_id: String,
    pub key: ed25519_dalek::SigningKey,
    pub cluster_id: String,
    pub delegation_id: String,
    pub user_token: String,
}

/// Offline verification of grant tokens, as a resource server does it.
pub struct Verifier {
    token: String,
    key: DecodingKey,
    validation: Validation,
}

pub struct World {
    pub run: String,
    /// Numbers registrations across every phase of a run, so names never repeat.
    seq: AtomicU64,
    pub agent: Option<AgentWorld>,
    /// Live grant tokens to introspect.
    pub tokens: Vec<String>,
    pub verifier: Option<Verifier>,
    /// Lifetime the authorize workloads ask for (0: the cluster's default).
    pub grant_ttl_s: u64,
}

const BENCH_POLICY: &str = r#"
@id("bench-user")
permit(principal == User::"bench-user", action == Action::"read", resource in Resource::"secret/bench");
@id("bench-agents")
permit(principal is Agent, action == Action::"read", resource in Resource::"secret/bench") when { context.delegation.depth <= 1 };
"#;

/// Grant lifetime for tokens the set-up issues (introspection and verification targets).
const SETUP_GRANT_TTL_S: u64 = 600;
/// Live grants the introspect workload cycles through.
const INTROSPECT_TOKENS: usize = 64;

async fn agent_world(client: &Client, run: &str) -> Result<AgentWorld, Failure> {
    let (idp, issuer) = crate::authz_cli::trust_new_issuer(client, "bench", run).await?;
    crate::authz_cli::put_policy(client, "bench", BENCH_POLICY).await?;
    let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let register = pb::RegisterAgentRequest {
        name: format!("bench-agent-{run}"),
        owner: "bench-user".into(),
        public_keys: vec![identity::public_jwk(&key.verifying_key())],
        ..Default::default()
    };
    let agent = crate::authz_cli::register_agent(client, register).await?;
    let user_token = identity::user_token(&idp, &issuer, "mandate", "bench-user", 24 * 3600)?;
    let delegate = pb::CreateDelegationRequest {
        user_token: user_token.clone(),
        agent: agent.id.clone(),
        actions: vec!["read".into()],
        resources: vec!["secret/bench/*".into()],
        ttl_seconds: 24 * 3600,
        ..Default::default()
    };
    let delegation = crate::authz_cli::create_delegation(client, delegate).await?;
    Ok(AgentWorld {
        agent_id: agent.id,
        key,
        cluster_id: identity::cluster_id(client).await?,
        delegation_id: delegation.id,
        user_token,
    })
}

fn authorize_request(
    w: &AgentWorld,
    resource: String,
    ttl_seconds: u64,
    uses: u32,
) -> Result<pb::AuthorizeRequest, String> {
    Ok(pb::AuthorizeRequest {
        agent_assertion: identity::agent_assertion(&w.agent_id, &w.key, &w.cluster_id)
            .map_err(|e| e.to_string())?,
        delegation_id: w.delegation_id.clone(),
        action: "read".into(),
        resource,
        ttl_seconds,
        uses,
        ..Default::default()
    })
}

/// Authorizes once; returns the grant token.
async fn authorize(client: &Client, request: pb::AuthorizeRequest) -> Result<String, String> {
    let r = client
        .authz(|mut c| {
            let r = request.clone();
            async move { c.authorize(r).await }
        })
        .await
        .map_err(|e| e.to_string())?;
    if r.decision == pb::Decision::Allow as i32 && !r.token.is_empty() {
        Ok(r.token)
    } else {
        Err(format!("not allowed: {:?}", r.reasons))
    }
}

async fn verifier(client: &Client, token: String) -> Result<Verifier, Failure> {
    let jwks = client
        .authz(|mut c| async move { c.jwks(pb::JwksRequest {}).await })
        .await?;
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&jwks.jwks_json)
        .map_err(|e| Failure(format!("the cluster's JWKS does not parse: {e}")))?;
    let kid = jsonwebtoken::decode_header(&token)
        .map_err(|e| Failure(format!("the grant token's header: {e}")))?
        .kid
        .ok_or_else(|| Failure("the grant token has no kid".into()))?;
    let jwk = set
        .find(&kid)
        .ok_or_else(|| Failure(format!("the JWKS has no key {kid}")))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| Failure(format!("key {kid}: {e}")))?;
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_issuer(&[jwks.grant_issuer]);
    validation.set_audience(&[jwks.cluster_id]);
    Ok(Verifier {
        token,
        key,
        validation,
    })
}

impl World {
    pub async fn create(connection: &Connection, workload: &Workload) -> Result<World, Failure> {
        let run = hex::encode(rand::random::<[u8; 4]>());
        let mut world = World {
            run,
            seq: AtomicU64::new(0),
            agent: None,
            tokens: Vec::new(),
            verifier: None,
            grant_ttl_s: 0,
        };
        if matches!(workload, Workload::Register) {
            return Ok(world);
        }
        let client = connection.client()?;
        let agent = agent_world(&client, &world.run).await?;
        match workload {
            Workload::Introspect => {
                for i in 0..INTROSPECT_TOKENS {
                    let r = authorize_request(
                        &agent,
                        format!("secret/bench/introspect/{i}"),
                        SETUP_GRANT_TTL_S,
                        1,
                    )
                    .map_err(Failure)?;
                    world
                        .tokens
                        .push(authorize(&client, r).await.map_err(Failure)?);
                }
            }
            Workload::Verify => {
                let r =
                    authorize_request(&agent, "secret/bench/verify".into(), SETUP_GRANT_TTL_S, 1)
                        .map_err(Failure)?;
                let token = authorize(&client, r).await.map_err(Failure)?;
                let v = verifier(&client, token).await?;
                verify_once(&v).map_err(|e| Failure(format!("a fresh grant token fails: {e}")))?;
                world.verifier = Some(v);
            }
            _ => {}
        }
        world.agent = Some(agent);
        Ok(world)
    }

    fn agent(&self) -> Result<&AgentWorld, String> {
        self.agent
            .as_ref()
            .ok_or_else(|| "the workload has no agent set up".to_owned())
    }
}

/// Verifies the world's grant token offline: signature, `iss`, `aud`, `exp`.
pub fn verify_once(v: &Verifier) -> Result<(), String> {
    jsonwebtoken::decode::<serde_json::Value>(&v.token, &v.key, &v.validation)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// One request of `workload` by client `worker` (its `n`th); returns the units it did.
pub async fn once(
    workload: &Workload,
    world: &World,
    client: &Client,
    worker: usize,
    n: u64,
) -> Result<u64, String> {
    match workload {
        Workload::Register => {
            let request = pb::RegisterAgentRequest {
                name: format!(
                    "bench-{}-{}",
                    world.run,
                    world.seq.fetch_add(1, Ordering::Relaxed)
                ),
                owner: "bench".into(),
                description: "registered by mandate bench".into(),
                ..Default::default()
            };
            client
                .registry(|mut c| {
                    let request = request.clone();
                    async move { c.register(request).await }
                })
                .await
                .map_err(|e| e.to_string())?;
            Ok(1)
        }
        Workload::Delegate => {
            let w = world.agent()?;
            let request = pb::CreateDelegationRequest {
                user_token: w.user_token.clone(),
                agent: w.agent_id.clone(),
                actions: vec!["read".into()],
                resources: vec![format!("secret/bench/{worker}/{n}/*")],
                ttl_seconds: 3600,
                ..Default::default()
            };
            client
                .authz(|mut c| {
                    let r = request.clone();
                    async move { c.create_delegation(r).await }
                })
                .await
                .map_err(|e| e.to_string())?;
            Ok(1)
        }
        Workload::Authorize | Workload::AuditLag => {
            let w = world.agent()?;
            authorize(
                client,
                authorize_request(w, format!("secret/bench/{worker}"), 0, 0)?,
            )
            .await?;
            Ok(1)
        }
        Workload::AuthorizeConsume => {
            let w = world.agent()?;
            let token = authorize(
                client,
                authorize_request(w, format!("secret/bench/{worker}"), 0, 0)?,
            )
            .await?;
            let consume = pb::ConsumeRequest { token };
            client
                .authz(|mut c| {
                    let r = consume.clone();
                    async move { c.consume(r).await }
                })
                .await
                .map_err(|e| e.to_string())?;
            Ok(1)
        }
        Workload::Check { batch } => {
            let w = world.agent()?;
            let items = (0..*batch)
                .map(|k| pb::CheckItem {
                    agent: w.agent_id.clone(),
                    delegation_id: w.delegation_id.clone(),
                    action: "read".into(),
                    resource: format!("secret/bench/{worker}/{k}"),
                    ..Default::default()
                })
                .collect();
            let request = pb::CheckRequest {
                items,
                read: Some(pb::ReadOptions {
                    consistency: pb::ReadConsistency::Stale as i32,
                    min_applied_index: 0,
                }),
            };
            let r = client
                .authz(|mut c| {
                    let r = request.clone();
                    async move { c.check(r).await }
                })
                .await
                .map_err(|e| e.to_string())?;
            match r
                .results
                .iter()
                .find(|r| r.decision != pb::Decision::Allow as i32)
            {
                Some(denied) => Err(format!("a check was not allowed: {:?}", denied.reasons)),
                None => Ok(r.results.len() as u64),
            }
        }
        Workload::Introspect => {
            let token = world
                .tokens
                .get(worker % world.tokens.len().max(1))
                .ok_or("no tokens were set up")?
                .clone();
            let request = pb::IntrospectRequest { token };
            let r = client
                .authz(|mut c| {
                    let r = request.clone();
                    async move { c.introspect(r).await }
                })
                .await
                .map_err(|e| e.to_string())?;
            if r.active {
                Ok(1)
            } else {
                Err("a live grant introspected inactive".into())
            }
        }
        Workload::Verify => {
            verify_once(world.verifier.as_ref().ok_or("no verifier was set up")?)?;
            Ok(1)
        }
    }
}
