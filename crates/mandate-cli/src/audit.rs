//! `mandate audit`: read, follow and verify the audit trail.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use mandate_client::{pb, Client, ClientError};
use mandate_core::audit;
use serde_json::{json, Value};

use crate::output::print;
use crate::{Connection, Failure};

/// How long `tail --follow` keeps trying to resume on another node after a failure.
pub const RESUME_TIMEOUT_MS: u64 = 30_000;

#[derive(Args, Debug)]
pub struct AuditCommand {
    #[command(subcommand)]
    command: AuditSub,
    #[command(flatten)]
    connection: Connection,
}

/// A position in the trail: `INDEX` or `INDEX.SEQUENCE`.
fn position(text: &str) -> Result<pb::AuditPosition, String> {
    let (index, sequence) = text.split_once('.').unwrap_or((text, "0"));
    match (index.parse(), sequence.parse()) {
        (Ok(log_index), Ok(sequence)) => Ok(pb::AuditPosition {
            log_index,
            sequence,
        }),
        _ => Err(format!(
            "{text:?} is not a position (LOG_INDEX or LOG_INDEX.SEQUENCE)"
        )),
    }
}

fn decision(text: &str) -> Result<pb::Decision, String> {
    match text {
        "allow" => Ok(pb::Decision::Allow),
        "deny" => Ok(pb::Decision::Deny),
        "pending" => Ok(pb::Decision::Pending),
        _ => Err(format!("{text:?} is not allow, deny or pending")),
    }
}

#[derive(Args, Debug, Clone)]
struct Range {
    /// First position (inclusive); 0 = the oldest retained record.
    #[arg(long, value_parser = position)]
    from: Option<pb::AuditPosition>,
    /// Last position (inclusive).
    #[arg(long, value_parser = position)]
    to: Option<pb::AuditPosition>,
}

#[derive(Subcommand, Debug)]
enum AuditSub {
    /// Print the committed records (and with --follow, new ones as they commit).
    Tail {
        #[command(flatten)]
        range: Range,
        #[arg(long)]
        follow: bool,
        /// Only records of this type (repeatable), e.g. authorize, create_delegation.
        #[arg(long = "type")]
        types: Vec<String>,
        /// Only records where this agent acted or is in the chain.
        #[arg(long)]
        agent: Option<String>,
        /// Only records on behalf of this user.
        #[arg(long)]
        user: Option<String>,
        #[arg(long, value_parser = decision)]
        decision: Option<pb::Decision>,
        #[arg(long)]
        resource_prefix: Option<String>,
    },
    /// Check the hash chain; exits non-zero naming the first position that does not verify.
    Verify {
        #[command(flatten)]
        range: Range,
    },
    /// The head, the oldest retained position, and this node's sinks with their lag.
    Info,
    /// The audit HMAC of a value (an operator token id), or of a request context given as
    /// KEY=VALUE pairs: what records show in `actor`, `target` or `context_digest`.
    Hash {
        #[arg(required_unless_present = "context", conflicts_with = "context")]
        value: Option<String>,
        /// A context entry KEY=VALUE (repeatable): hash the whole context as Authorize did.
        #[arg(long)]
        context: Vec<String>,
    },
    /// Write records to a file, one JSON object per line (written whole, then renamed into
    /// place); the chain is checked on the way and the file is not kept if it does not verify.
    Export {
        #[command(flatten)]
        range: Range,
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

fn pos(r: &pb::AuditRecord) -> String {
    format!("{}.{}", r.log_index, r.sequence)
}

fn record_line(r: &pb::AuditRecord) -> String {
    let mut line = format!(
        "{:<10} {} {:<18} {}:{}",
        pos(r),
        r.time_ms,
        r.r#type,
        r.actor_kind,
        r.actor
    );
    for (name, value) in [
        ("user", &r.user),
        ("agent", &r.agent),
        ("target", &r.target),
        ("action", &r.action),
        ("resource", &r.resource),
        ("grant", &r.grant_id),
    ] {
        if !value.is_empty() {
            line.push_str(&format!(" {name}={value}"));
        }
    }
    if r.decision != 0 {
        line.push_str(&format!(" decision={}", audit::decision_name(r.decision)));
    }
    line.push_str(&format!(" result={}", r.result));
    line
}

/// Streams the records of `request`; on a broken stream while following, resumes after the
/// last record received (on whichever node answers) so nothing is missed or repeated.
async fn stream(
    client: &Client,
    mut request: pb::SubscribeRequest,
    mut each: impl FnMut(pb::AuditRecord) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let mut failing_since: Option<Instant> = None;
    loop {
        let opened = client
            .audit(|mut c| {
                let r = request.clone();
                async move { c.subscribe(r).await }
            })
            .await;
        let failure = match opened {
            Ok(mut records) => loop {
                match records.message().await {
                    Ok(Some(record)) => {
                        failing_since = None;
                        request.from = Some(pb::AuditPosition {
                            log_index: record.log_index,
                            sequence: record.sequence + 1,
                        });
                        each(record)?;
                    }
                    Ok(None) => return Ok(()),
                    Err(status) => break ClientError::from_status(&status),
                }
            },
            Err(e) => e,
        };
        let since = *failing_since.get_or_insert_with(Instant::now);
        if !request.follow || since.elapsed() > Duration::from_millis(RESUME_TIMEOUT_MS) {
            return Err(failure.into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn run(cmd: AuditCommand) -> Result<(), Failure> {
    let as_json = cmd.connection.json;
    let client = cmd.connection.client()?;
    match cmd.command {
        AuditSub::Tail {
            range,
            follow,
            types,
            agent,
            user,
            decision,
            resource_prefix,
        } => {
            let request = pb::SubscribeRequest {
                from: range.from,
                to: range.to,
                follow,
                types,
                agent: agent.unwrap_or_default(),
                user: user.unwrap_or_default(),
                decision: decision.map_or(0, |d| d as i32),
                resource_prefix: resource_prefix.unwrap_or_default(),
            };
            stream(&client, request, |record| {
                if as_json {
                    println!("{}", audit::to_json(&record));
                } else {
                    println!("{}", record_line(&record));
                }
                Ok(())
            })
            .await
        }
        AuditSub::Hash { value, context } => {
            let value = match value {
                Some(v) => v.into_bytes(),
                None => {
                    let mut entries = std::collections::BTreeMap::new();
                    for entry in &context {
                        let (k, v) = entry.split_once('=').ok_or_else(|| {
                            Failure(format!("--context {entry:?}: expected KEY=VALUE"))
                        })?;
                        entries.insert(k.to_owned(), v.to_owned());
                    }
                    audit::canonical_context(&entries)
                }
            };
            let r = client
                .audit(|mut c| {
                    let value = value.clone();
                    async move { c.hash(pb::AuditHashRequest { value }).await }
                })
                .await?;
            print(&json!({ "hmac": hex::encode(r.hmac) }), as_json);
            Ok(())
        }
        AuditSub::Info => {
            let info = client
                .audit(|mut c| async move { c.info(pb::AuditInfoRequest {}).await })
                .await?;
            let sinks: Vec<Value> = info
                .sinks
                .iter()
                .map(|s| {
                    json!({
                        "name": s.name,
                        "position": format!("{}.{}", s.log_index, s.sequence),
                        "written": s.written,
                        "lag_entries": s.lag_entries,
                        "error": s.error,
                    })
                })
                .collect();
            print(
                &json!({
                    "head": info.head.as_ref().map(|h| format!("{}.{}", h.log_index, h.sequence)),
                    "head_hash": info.head.map(|h| hex::encode(h.hash)),
                    "oldest": info.base.map_or("0.0".to_owned(), |b| format!("{}.{}", b.log_index, b.sequence)),
                    "retained": info.retained,
                    "applied_index": info.applied_index,
                    "refusals_dropped": info.refusals_dropped,
                    "sinks": sinks,
                }),
                as_json,
            );
            Ok(())
        }
        AuditSub::Verify { range } => {
            let summary = verified(&client, &range, |_| Ok(())).await?;
            print(&summary, as_json);
            Ok(())
        }
        AuditSub::Export { range, out } => {
            let partial = out.with_extension("partial");
            let mut file = std::io::BufWriter::new(std::fs::File::create(&partial)?);
            let written = verified(&client, &range, |record| {
                use std::io::Write;
                writeln!(file, "{}", audit::to_json(record)).map_err(Failure::from)
            })
            .await;
            let written = match written {
                Ok(summary) => summary,
                Err(e) => {
                    drop(file);
                    let _ = std::fs::remove_file(&partial);
                    return Err(e);
                }
            };
            file.into_inner()
                .map_err(|e| Failure(e.to_string()))?
                .sync_all()?;
            std::fs::rename(&partial, &out)?;
            let mut summary = written;
            summary["out"] = json!(out.display().to_string());
            print(&summary, as_json);
            Ok(())
        }
    }
}

/// Streams the range, checking the chain and handing each record to `each`; returns the
/// summary (`verified`, `from`, `to`, `head_hash`) or the first position that fails.
async fn verified(
    client: &Client,
    range: &Range,
    mut each: impl FnMut(&pb::AuditRecord) -> Result<(), Failure>,
) -> Result<Value, Failure> {
    let info = client
        .audit(|mut c| async move { c.info(pb::AuditInfoRequest {}).await })
        .await?;
    let from_oldest = range
        .from
        .is_none_or(|p| (p.log_index, p.sequence) == (0, 0));
    let head = info.head.filter(|_| range.to.is_none());
    let request = pb::SubscribeRequest {
        from: range.from,
        to: range.to.or_else(|| {
            head.as_ref().map(|h| pb::AuditPosition {
                log_index: h.log_index,
                sequence: h.sequence,
            })
        }),
        ..Default::default()
    };
    // From the oldest retained record, its predecessor's hash is known: the compaction base's
    // (or none, when nothing was ever compacted).
    let mut prev: Option<Vec<u8>> =
        from_oldest.then(|| info.base.map(|b| b.prev_hash).unwrap_or_default());
    let keys = CheckpointKeys::fetch(client).await?;
    let mut hashes: HashMap<String, Vec<u8>> = HashMap::new();
    let mut checkpoints = 0u64;
    let mut first: Option<String> = None;
    let mut last: Option<String> = None;
    let mut count = 0u64;
    stream(client, request, |record| {
        audit::check(&record, prev.as_deref()).map_err(|why| {
            Failure(format!(
                "the audit trail does not verify at {}: {why}",
                pos(&record)
            ))
        })?;
        if record.r#type == "audit_checkpoint" && record.result == "ok" {
            keys.check(&record, hashes.get(&record.target))
                .map_err(|why| {
                    Failure(format!(
                        "the audit trail does not verify at {}: the checkpoint {why}",
                        pos(&record)
                    ))
                })?;
            checkpoints += 1;
        }
        hashes.insert(pos(&record), record.hash.clone());
        each(&record)?;
        first.get_or_insert_with(|| pos(&record));
        last = Some(pos(&record));
        prev = Some(record.hash);
        count += 1;
        Ok(())
    })
    .await?;
    if let Some(head) = head {
        let end = format!("{}.{}", head.log_index, head.sequence);
        if last.as_deref() != Some(end.as_str()) || prev.as_deref() != Some(head.hash.as_slice()) {
            return Err(Failure(format!(
                "the audit trail does not verify at {end}: the trail ends at {} but the head is {end}",
                last.as_deref().unwrap_or("nothing")
            )));
        }
    }
    Ok(json!({
        "verified": count,
        "checkpoints": checkpoints,
        "from": first,
        "to": last,
        "head_hash": prev.map(hex::encode),
    }))
}

/// The cluster's published keys, to check signed checkpoints with.
struct CheckpointKeys {
    jwks: JwkSet,
    issuer: String,
}

impl CheckpointKeys {
    async fn fetch(client: &Client) -> Result<Self, Failure> {
        let r = client
            .authz(|mut c| async move { c.jwks(pb::JwksRequest {}).await })
            .await?;
        Ok(CheckpointKeys {
            jwks: serde_json::from_str(&r.jwks_json)
                .map_err(|e| Failure(format!("the cluster JWKS does not parse: {e}")))?,
            issuer: r.grant_issuer,
        })
    }

    /// Checks the checkpoint's signature against the JWKS and that it vouches for the record
    /// it names (when that record was read: `vouched`).
    fn check(&self, record: &pb::AuditRecord, vouched: Option<&Vec<u8>>) -> Result<(), String> {
        let header = jsonwebtoken::decode_header(&record.checkpoint)
            .map_err(|e| format!("is malformed: {e}"))?;
        let kid = header.kid.ok_or("names no key")?;
        let jwk = self
            .jwks
            .find(&kid)
            .ok_or_else(|| format!("is signed by {kid}, which the JWKS does not hold"))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[self.issuer.as_str()]);
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["iss", "sub"]);
        let claims = jsonwebtoken::decode::<Value>(&record.checkpoint, &key, &validation)
            .map_err(|e| format!("signature does not verify: {e}"))?
            .claims;
        let claim = |name: &str| claims[name].as_str().unwrap_or_default().to_owned();
        if claim("sub") != mandate_server::tokens::CHECKPOINT_SUBJECT
            || claim("position") != record.target
        {
            return Err("is not the checkpoint its record says".into());
        }
        match vouched {
            Some(hash) if hex::encode(hash) != claim("hash") => {
                Err(format!("names a hash that {} does not have", record.target))
            }
            _ => Ok(()),
        }
    }
}
