//! `mandate cluster ...` and `mandate token ...`: cluster administration.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use mandate_client::pb;
use serde_json::json;

use crate::output::print;
use crate::{Connection, Failure};

#[derive(Args, Debug)]
pub struct ClusterCommand {
    #[command(subcommand)]
    command: ClusterSub,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand, Debug)]
enum ClusterSub {
    /// Initialise a new cluster and print its root token (shown once).
    Init {
        /// An initial voter, as ID=PEER_ADDR/CLIENT_ADDR (repeatable; default: the node's
        /// configured peers).
        #[arg(long = "member")]
        members: Vec<String>,
    },
    /// Show every member: role, term, last log and applied index.
    Status,
    /// Add a node as a learner (it replicates but does not vote).
    AddLearner {
        #[arg(long)]
        id: u64,
        #[arg(long)]
        peer_addr: String,
        #[arg(long)]
        client_addr: String,
    },
    /// Make a learner a voter.
    Promote { id: u64 },
    /// Remove a member.
    Remove { id: u64 },
    /// Save or restore a snapshot of the state machine.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotSub,
    },
}

#[derive(Subcommand, Debug)]
enum SnapshotSub {
    /// Build a snapshot on the serving node and write it to FILE.
    Save { file: PathBuf },
    /// Seed an empty data directory from FILE, for a node that will start a new cluster
    /// holding that state (offline: run it before starting the node).
    Restore {
        file: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        node_id: u64,
        #[arg(long)]
        peer_addr: String,
        #[arg(long)]
        client_addr: String,
    },
}

#[derive(Args, Debug)]
pub struct TokenCommand {
    #[command(subcommand)]
    command: TokenSub,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand, Debug)]
enum TokenSub {
    /// Create an operator token (root only); it is shown once.
    Create {
        #[arg(long)]
        name: String,
    },
    /// Revoke an operator token by id (root only).
    Revoke { id: String },
}

fn parse_member(spec: &str) -> Result<pb::Member, Failure> {
    let bad = || {
        Failure(format!(
            "--member {spec:?}: expected ID=PEER_ADDR/CLIENT_ADDR"
        ))
    };
    let (id, addrs) = spec.split_once('=').ok_or_else(bad)?;
    let (peer_addr, client_addr) = addrs.split_once('/').ok_or_else(bad)?;
    Ok(pb::Member {
        id: id.parse().map_err(|_| bad())?,
        peer_addr: peer_addr.to_owned(),
        client_addr: client_addr.to_owned(),
    })
}

fn member_json(m: &pb::Member) -> serde_json::Value {
    json!({ "id": m.id, "peer_addr": m.peer_addr, "client_addr": m.client_addr })
}

fn membership_json(r: &pb::MembershipResponse) -> serde_json::Value {
    json!({
        "voters": r.voters.iter().map(member_json).collect::<Vec<_>>(),
        "learners": r.learners.iter().map(member_json).collect::<Vec<_>>(),
        "applied_index": r.applied_index,
    })
}

pub async fn run(cmd: ClusterCommand) -> Result<(), Failure> {
    let as_json = cmd.connection.json;
    if let ClusterSub::Snapshot {
        command:
            SnapshotSub::Restore {
                file,
                data_dir,
                node_id,
                peer_addr,
                client_addr,
            },
    } = &cmd.command
    {
        let member = mandate_store::Member {
            peer_addr: peer_addr.clone(),
            client_addr: client_addr.clone(),
        };
        let index = mandate_store::restore::restore(data_dir, file, *node_id, member)
            .await
            .map_err(Failure)?;
        print(
            &json!({ "restored_index": index, "data_dir": data_dir.display().to_string(), "node_id": node_id }),
            as_json,
        );
        return Ok(());
    }
    let client = cmd.connection.client()?;
    match cmd.command {
        ClusterSub::Init { members } => {
            let members: Vec<pb::Member> = members
                .iter()
                .map(|m| parse_member(m))
                .collect::<Result<_, _>>()?;
            let r = client
                .cluster(|mut c| {
                    let members = members.clone();
                    async move { c.init(pb::InitRequest { members }).await }
                })
                .await?;
            print(
                &json!({ "cluster_id": r.cluster_id, "root_token": r.root_token, "applied_index": r.applied_index }),
                as_json,
            );
        }
        ClusterSub::Status => {
            let r = client
                .cluster(|mut c| async move { c.status(pb::StatusRequest {}).await })
                .await?;
            let members: Vec<_> = r
                .members
                .iter()
                .map(|m| {
                    json!({
                        "id": m.id,
                        "peer_addr": m.peer_addr,
                        "client_addr": m.client_addr,
                        "role": m.role,
                        "voter": m.voter,
                        "leader_id": r.leader,
                        "term": m.term,
                        "last_log_index": m.last_log_index,
                        "applied_index": m.applied_index,
                        "snapshot_index": m.snapshot_index,
                        "purged_index": m.purged_index,
                        "apply_version_max": m.apply_version_max,
                    })
                })
                .collect();
            if as_json {
                print(
                    &json!({ "cluster_id": r.cluster_id, "leader": r.leader, "term": r.term, "served_by": r.served_by, "apply_version": r.apply_version, "members": members }),
                    true,
                );
            } else {
                println!(
                    "cluster {}  leader {}  term {}  apply version {}",
                    r.cluster_id, r.leader, r.term, r.apply_version
                );
                println!(
                    "ID\tROLE\tTERM\tLAST_LOG\tAPPLIED\tSNAPSHOT\tPURGED\tAPPLIES\tCLIENT_ADDR\tPEER_ADDR"
                );
                for m in &r.members {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        m.id,
                        m.role,
                        m.term,
                        m.last_log_index,
                        m.applied_index,
                        m.snapshot_index,
                        m.purged_index,
                        m.apply_version_max,
                        m.client_addr,
                        m.peer_addr
                    );
                }
            }
        }
        ClusterSub::AddLearner {
            id,
            peer_addr,
            client_addr,
        } => {
            let member = pb::Member {
                id,
                peer_addr,
                client_addr,
            };
            let r = client
                .cluster(|mut c| {
                    let member = member.clone();
                    async move {
                        c.add_learner(pb::AddLearnerRequest {
                            member: Some(member),
                        })
                        .await
                    }
                })
                .await?;
            print(&membership_json(&r), as_json);
        }
        ClusterSub::Promote { id } => {
            let r = client
                .cluster(|mut c| async move { c.promote(pb::MemberIdRequest { id }).await })
                .await?;
            print(&membership_json(&r), as_json);
        }
        ClusterSub::Remove { id } => {
            let r = client
                .cluster(|mut c| async move { c.remove(pb::MemberIdRequest { id }).await })
                .await?;
            print(&membership_json(&r), as_json);
        }
        ClusterSub::Snapshot {
            command: SnapshotSub::Save { file },
        } => {
            let chunks = client
                .cluster(|mut c| async move { c.snapshot_save(pb::SnapshotRequest {}).await })
                .await?;
            let mut bytes = Vec::new();
            let mut stream = chunks;
            while let Some(chunk) = stream
                .message()
                .await
                .map_err(|s| Failure(format!("the snapshot stream broke: {}", s.message())))?
            {
                bytes.extend_from_slice(&chunk.data);
            }
            let tmp = file.with_extension("partial");
            std::fs::write(&tmp, &bytes)?;
            std::fs::rename(&tmp, &file)?;
            print(
                &json!({ "file": file.display().to_string(), "size_bytes": bytes.len() }),
                as_json,
            );
        }
        ClusterSub::Snapshot {
            command: SnapshotSub::Restore { .. },
        } => unreachable!("handled above"),
    }
    Ok(())
}

pub async fn run_token(cmd: TokenCommand) -> Result<(), Failure> {
    let as_json = cmd.connection.json;
    let client = cmd.connection.client()?;
    match cmd.command {
        TokenSub::Create { name } => {
            let r = client
                .cluster(|mut c| {
                    let name = name.clone();
                    async move { c.create_token(pb::CreateTokenRequest { name }).await }
                })
                .await?;
            print(
                &json!({ "id": r.id, "token": r.token, "applied_index": r.applied_index }),
                as_json,
            );
        }
        TokenSub::Revoke { id } => {
            let r = client
                .cluster(|mut c| {
                    let id = id.clone();
                    async move { c.revoke_token(pb::RevokeTokenRequest { id }).await }
                })
                .await?;
            print(
                &json!({ "revoked": true, "applied_index": r.applied_index }),
                as_json,
            );
        }
    }
    Ok(())
}
