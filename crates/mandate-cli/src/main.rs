//! `mandate`: run a node (`server`), a local cluster (`dev`), and every admin command.

mod agent;
mod audit;
mod authz_cli;
mod bench;
mod cluster;
mod demo;
mod dev;
mod health;
mod identity;
mod output;
mod server;
mod tls;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use mandate_client::{parse_addrs, Client, ClientError};

/// glibc's allocator spends a large share of a loaded node's time in malloc and free
/// (measured with perf under `mandate bench register --clients 64`); mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Mandate: an authorization authority for AI agents.
#[derive(Parser)]
#[command(name = "mandate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one node.
    Server(server::ServerArgs),
    /// Run a local cluster of N nodes (each its own process) until interrupted.
    Dev(dev::DevArgs),
    /// Register and manage agents.
    Agent(agent::AgentCommand),
    /// Administer the cluster.
    Cluster(cluster::ClusterCommand),
    /// Create and revoke operator tokens.
    Token(cluster::TokenCommand),
    /// Measure throughput against a running cluster.
    Bench(bench::BenchCommand),
    /// Write, read and validate Cedar policy documents.
    Policy(authz_cli::PolicyCommand),
    /// Create, list, revoke and re-delegate delegations.
    Delegate(authz_cli::DelegateCommand),
    /// As an agent, ask to do one thing now; on allow, receive a grant token.
    Authorize(authz_cli::AuthorizeArgs),
    /// What an authorization would decide now, issuing nothing (operator token; for resource
    /// servers and gateways).
    Check(authz_cli::CheckArgs),
    /// As a user, list, approve and deny pending authorizations.
    Approval(authz_cli::ApprovalCommand),
    /// Consume, complete, revoke and introspect grants.
    Grant(authz_cli::GrantCommand),
    /// The secret store.
    Secret(authz_cli::SecretCommand),
    /// The cluster's token-signing keys.
    Keys(authz_cli::KeysCommand),
    /// Trusted issuers of user tokens.
    Issuer(authz_cli::IssuerCommand),
    /// Read, follow and verify the audit trail.
    Audit(audit::AuditCommand),
    /// Run the product story against the cluster in MANDATE_ADDR.
    Demo(demo::DemoArgs),
    /// Certificates for TLS: a cluster CA and node certificates.
    Tls(TlsCommand),
    /// Check that a node is alive (or, with --ready, ready to serve); for health checks.
    Health(health::HealthArgs),
}

#[derive(Args, Debug)]
struct TlsCommand {
    #[command(subcommand)]
    command: TlsSub,
}

#[derive(Subcommand, Debug)]
enum TlsSub {
    /// Make the cluster CA (unless DIR has one) and a certificate for each node named.
    Init(tls::TlsInitArgs),
}

/// How to reach the cluster; shared by every client command.
#[derive(Args, Clone, Debug)]
pub struct Connection {
    /// Node addresses, comma-separated (any live node will do).
    #[arg(
        long,
        env = "MANDATE_ADDR",
        global = true,
        default_value = "127.0.0.1:7400"
    )]
    pub addr: String,
    /// Operator token.
    #[arg(long, env = "MANDATE_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// The cluster CA certificate (PEM): talk TLS and trust only nodes it signed. Without it
    /// the client speaks plaintext, for clusters run with `--insecure`.
    #[arg(long, env = "MANDATE_CA_CERT", global = true)]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Connection {
    pub fn client(&self) -> Result<Client, ClientError> {
        self.client_at(&parse_addrs(&self.addr))
    }

    /// A client for the given node addresses, with this connection's token and CA.
    pub fn client_at(&self, addrs: &[String]) -> Result<Client, ClientError> {
        let ca = self
            .ca_cert
            .as_ref()
            .map(|path| {
                std::fs::read(path).map_err(|e| {
                    ClientError::Config(format!(
                        "cannot read the CA certificate {}: {e}",
                        path.display()
                    ))
                })
            })
            .transpose()?;
        Client::with_ca(addrs, self.token.as_deref(), ca.as_deref())
    }
}

/// A failure to report on stderr as one line.
#[derive(Debug)]
pub struct Failure(pub String);

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        match &e {
            ClientError::Status { code, message, .. } => Failure(format!("{message} ({code:?})")),
            _ => Failure(e.to_string()),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure(e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    mandate_server::jose::install();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mandate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Server(args) => server::run(args).await,
            Command::Dev(args) => dev::run(args).await,
            Command::Agent(c) => agent::run(c).await,
            Command::Cluster(c) => cluster::run(c).await,
            Command::Token(c) => cluster::run_token(c).await,
            Command::Bench(c) => bench::run(c).await,
            Command::Policy(c) => authz_cli::policy(c).await,
            Command::Delegate(c) => authz_cli::delegate(c).await,
            Command::Authorize(c) => authz_cli::authorize(c).await,
            Command::Check(c) => authz_cli::check(c).await,
            Command::Approval(c) => authz_cli::approval(c).await,
            Command::Grant(c) => authz_cli::grant(c).await,
            Command::Secret(c) => authz_cli::secret(c).await,
            Command::Keys(c) => authz_cli::keys(c).await,
            Command::Issuer(c) => authz_cli::issuer(c).await,
            Command::Audit(c) => audit::run(c).await,
            Command::Demo(c) => demo::run(c).await,
            Command::Tls(TlsCommand {
                command: TlsSub::Init(args),
            }) => tls::init(args),
            Command::Health(args) => health::run(args),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(message)) => {
            eprintln!("mandate: {message}");
            ExitCode::FAILURE
        }
    }
}
