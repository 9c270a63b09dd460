//! `mandate agent ...`: the agent registry.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use mandate_client::pb;
use serde_json::json;

use crate::identity;
use crate::output::{self, print};
use crate::{Connection, Failure};

#[derive(Args, Debug)]
pub struct AgentCommand {
    #[command(subcommand)]
    command: AgentSub,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Args, Debug)]
struct ReadArgs {
    /// Read what the serving node has applied, without a round trip to the leader.
    #[arg(long)]
    stale: bool,
}

#[derive(Subcommand, Debug)]
enum AgentSub {
    /// Register an agent.
    Register {
        #[arg(long)]
        name: String,
        /// The user who owns the agent.
        #[arg(long)]
        owner: String,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long, default_value = "")]
        model: String,
        #[arg(long, default_value = "")]
        provider: String,
        /// A label, key=value (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// A public key: a JWK (JSON) file, or a PEM public or private Ed25519 key (repeatable).
        #[arg(long = "public-key")]
        public_keys: Vec<PathBuf>,
        /// The agent's ceiling: a file holding the most it may ever do.
        #[arg(long)]
        ceiling: Option<PathBuf>,
    },
    /// Show one agent, by id or name.
    Get {
        id_or_name: String,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// List agents.
    List {
        #[arg(long)]
        owner: Option<String>,
        /// active, suspended or retired.
        #[arg(long)]
        status: Option<String>,
        /// Only agents with this label, key=value.
        #[arg(long)]
        label: Option<String>,
        #[arg(long, default_value_t = 0)]
        page_size: u32,
        #[arg(long, default_value = "")]
        page_token: String,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Change an agent's description, model, provider or labels.
    Update {
        id: String,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        provider: Option<String>,
        /// Replace all labels with these key=value labels (repeatable; none clears them).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Apply --label (even when none is given, which clears every label).
        #[arg(long)]
        replace_labels: bool,
    },
    /// Suspend an agent (by id or name): it is refused until resumed.
    Suspend { id: String },
    /// Resume a suspended agent (by id or name).
    Resume { id: String },
    /// Retire an agent (by id or name) for good; its id and name are never reused.
    Retire { id: String },
    /// Add a public key to an agent.
    AddKey {
        id: String,
        #[arg(long = "public-key")]
        public_key: PathBuf,
    },
    /// Remove a public key from an agent, by kid.
    RemoveKey {
        id: String,
        /// A kid is base64url and may begin with `-`; it is read as a value, never as a flag.
        #[arg(allow_hyphen_values = true)]
        kid: String,
    },
    /// Generate an Ed25519 key pair: the private key (PKCS#8 PEM) goes to --out, the public JWK
    /// is printed.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
}

fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>, Failure> {
    labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| Failure(format!("--label {l:?}: expected key=value")))
        })
        .collect()
}

/// Reads a public key from a JWK JSON file or a PEM (public or private) file.
fn read_public_key(path: &Path) -> Result<pb::Jwk, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure(format!("cannot read {}: {e}", path.display())))?;
    let trimmed = text.trim();
    if trimmed.starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(trimmed)
            .map_err(|e| Failure(format!("{} is not JSON: {e}", path.display())))?;
        let field = |name: &str| {
            value
                .get(name)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        return Ok(pb::Jwk {
            kid: field("kid"),
            kty: field("kty"),
            crv: field("crv"),
            x: field("x"),
        });
    }
    if let Ok(signing) = SigningKey::from_pkcs8_pem(trimmed) {
        return Ok(identity::public_jwk(&signing.verifying_key()));
    }
    VerifyingKey::from_public_key_pem(trimmed)
        .map(|k| identity::public_jwk(&k))
        .map_err(|_| {
            Failure(format!(
                "{} is neither a JWK nor a PEM Ed25519 key",
                path.display()
            ))
        })
}

fn keygen(out: &Path, as_json: bool) -> Result<(), Failure> {
    let signing = identity::write_new_signing_key(out)?;
    print(
        &output::jwk(&identity::public_jwk(&signing.verifying_key())),
        as_json,
    );
    Ok(())
}

fn read_options(read: &ReadArgs) -> Option<pb::ReadOptions> {
    Some(pb::ReadOptions {
        consistency: if read.stale {
            pb::ReadConsistency::Stale as i32
        } else {
            pb::ReadConsistency::Linearizable as i32
        },
        min_applied_index: 0,
    })
}

fn parse_status(status: Option<&str>) -> Result<pb::AgentStatus, Failure> {
    Ok(match status {
        None => pb::AgentStatus::Unspecified,
        Some("active") => pb::AgentStatus::Active,
        Some("suspended") => pb::AgentStatus::Suspended,
        Some("retired") => pb::AgentStatus::Retired,
        Some(other) => {
            return Err(Failure(format!(
                "--status {other:?}: expected active, suspended or retired"
            )))
        }
    })
}

/// An agent id, looked up by name when given one.
async fn resolve(client: &mandate_client::Client, id_or_name: &str) -> Result<String, Failure> {
    if id_or_name.starts_with("agt_") {
        return Ok(id_or_name.to_owned());
    }
    let request = pb::GetAgentRequest {
        id_or_name: id_or_name.to_owned(),
        read: None,
    };
    let r = client
        .registry(|mut c| {
            let request = request.clone();
            async move { c.get(request).await }
        })
        .await?;
    r.agent
        .map(|a| a.id)
        .ok_or_else(|| Failure("the server returned no agent".into()))
}

#[derive(Clone, Copy)]
enum Transition {
    Suspend,
    Resume,
    Retire,
}

async fn set_status(
    client: &mandate_client::Client,
    id_or_name: &str,
    transition: Transition,
    as_json: bool,
) -> Result<(), Failure> {
    let id = resolve(client, id_or_name).await?;
    let r = client
        .registry(|mut c| {
            let request = pb::AgentIdRequest { id: id.clone() };
            async move {
                match transition {
                    Transition::Suspend => c.suspend(request).await,
                    Transition::Resume => c.resume(request).await,
                    Transition::Retire => c.retire(request).await,
                }
            }
        })
        .await?;
    show(r, as_json)
}

fn show(response: pb::AgentResponse, as_json: bool) -> Result<(), Failure> {
    let agent = response
        .agent
        .ok_or_else(|| Failure("the server returned no agent".into()))?;
    let mut value = output::agent(&agent);
    value["applied_index"] = json!(response.applied_index);
    print(&value, as_json);
    Ok(())
}

pub async fn run(cmd: AgentCommand) -> Result<(), Failure> {
    let json_out = cmd.connection.json;
    if let AgentSub::Keygen { out } = &cmd.command {
        return keygen(out, json_out);
    }
    let client = cmd.connection.client()?;
    match cmd.command {
        AgentSub::Keygen { .. } => unreachable!("handled above"),
        AgentSub::Register {
            name,
            owner,
            description,
            model,
            provider,
            labels,
            public_keys,
            ceiling,
        } => {
            let request = pb::RegisterAgentRequest {
                name,
                owner,
                description,
                model,
                provider,
                labels: parse_labels(&labels)?,
                public_keys: public_keys
                    .iter()
                    .map(|p| read_public_key(p))
                    .collect::<Result<_, _>>()?,
                ceiling: match ceiling {
                    Some(path) => std::fs::read_to_string(&path)
                        .map_err(|e| Failure(format!("cannot read {}: {e}", path.display())))?,
                    None => String::new(),
                },
            };
            let r = client
                .registry(|mut c| {
                    let request = request.clone();
                    async move { c.register(request).await }
                })
                .await?;
            show(r, json_out)
        }
        AgentSub::Get { id_or_name, read } => {
            let request = pb::GetAgentRequest {
                id_or_name,
                read: read_options(&read),
            };
            let r = client
                .registry(|mut c| {
                    let request = request.clone();
                    async move { c.get(request).await }
                })
                .await?;
            show(r, json_out)
        }
        AgentSub::List {
            owner,
            status,
            label,
            page_size,
            page_token,
            read,
        } => {
            let request = pb::ListAgentsRequest {
                owner: owner.unwrap_or_default(),
                status: parse_status(status.as_deref())? as i32,
                label: label.unwrap_or_default(),
                page_size,
                page_token,
                read: read_options(&read),
            };
            let r = client
                .registry(|mut c| {
                    let request = request.clone();
                    async move { c.list(request).await }
                })
                .await?;
            if json_out {
                let agents: Vec<_> = r.agents.iter().map(output::agent).collect();
                print(
                    &json!({ "agents": agents, "next_page_token": r.next_page_token, "applied_index": r.applied_index }),
                    true,
                );
            } else {
                for a in &r.agents {
                    println!(
                        "{}\t{}\t{}\t{}",
                        a.id,
                        a.name,
                        a.owner,
                        output::status_name(a.status)
                    );
                }
                if !r.next_page_token.is_empty() {
                    println!("next page: --page-token {}", r.next_page_token);
                }
            }
            Ok(())
        }
        AgentSub::Update {
            id,
            description,
            model,
            provider,
            labels,
            replace_labels,
        } => {
            let id = resolve(&client, &id).await?;
            if !labels.is_empty() && !replace_labels {
                return Err(Failure(
                    "--label needs --replace-labels: an update replaces every label".into(),
                ));
            }
            let request = pb::UpdateAgentRequest {
                id,
                description,
                model,
                provider,
                replace_labels,
                labels: parse_labels(&labels)?,
            };
            let r = client
                .registry(|mut c| {
                    let request = request.clone();
                    async move { c.update(request).await }
                })
                .await?;
            show(r, json_out)
        }
        AgentSub::Suspend { id } => set_status(&client, &id, Transition::Suspend, json_out).await,
        AgentSub::Resume { id } => set_status(&client, &id, Transition::Resume, json_out).await,
        AgentSub::Retire { id } => set_status(&client, &id, Transition::Retire, json_out).await,
        AgentSub::AddKey { id, public_key } => {
            let id = resolve(&client, &id).await?;
            let request = pb::AddAgentKeyRequest {
                id,
                key: Some(read_public_key(&public_key)?),
            };
            let r = client
                .registry(|mut c| {
                    let request = request.clone();
                    async move { c.add_key(request).await }
                })
                .await?;
            show(r, json_out)
        }
        AgentSub::RemoveKey { id, kid } => {
            let id = resolve(&client, &id).await?;
            let request = pb::RemoveAgentKeyRequest { id, kid };
            let r = client
                .registry(|mut c| {
                    let request = request.clone();
                    async move { c.remove_key(request).await }
                })
                .await?;
            show(r, json_out)
        }
    }
}
