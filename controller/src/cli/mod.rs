//! The `wavegate` command line: one module per subcommand, each with a `run`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

pub mod agent;
pub mod audit;
pub mod certs;
pub mod client;
pub mod demo;
pub mod lab;
pub mod logs;
pub mod plan;
pub mod rollout;
pub mod serve;
pub mod shell;
pub mod snapshot;
pub mod store;
pub mod watch;

/// wavegate: staged patch rollouts with a safety gate.
#[derive(Debug, Parser)]
#[command(name = "wavegate", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// A hosting provider in a lab on this machine, and three stories: a good
    /// fix in canary waves, the 2012 update program refused, a broken canary
    /// halted and rolled back.
    Demo(demo::DemoArgs),
    /// Work with patch plans without running anything.
    #[command(subcommand)]
    Plan(plan::PlanCommand),
    /// Run the controller.
    Serve(serve::ServeArgs),
    /// Create the private CA and issue certificates.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Submit, approve, watch and steer rollouts.
    Rollout {
        /// Which controller, as whom.
        #[command(flatten)]
        conn: client::Conn,
        /// The rollout command.
        #[command(subcommand)]
        cmd: rollout::RolloutCommand,
    },
    /// Read, report, export and verify the tamper-evident audit log.
    Audit {
        /// Which controller, as whom.
        #[command(flatten)]
        conn: client::Conn,
        /// The audit command.
        #[command(subcommand)]
        cmd: audit::AuditCommand,
    },
    /// Install or upgrade agents on hosts over SSH.
    Agent {
        /// The controller to confirm with, as whom.
        #[command(flatten)]
        conn: client::Conn,
        /// The agent command.
        #[command(subcommand)]
        cmd: agent::AgentCommand,
    },
    /// The pre-change snapshots.
    Snapshot {
        /// Which controller, as whom.
        #[command(flatten)]
        conn: client::Conn,
        /// The snapshot command.
        #[command(subcommand)]
        cmd: snapshot::SnapshotCommand,
    },
    /// A controller and agents for an inventory on this machine.
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// The shared etcd store: its members and leader, and migrating an
    /// embedded store into it.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Each controller's role (the leader, a standby) when several share
    /// one store; exits 1 unless exactly one leads.
    Controllers {
        /// The controllers (all of them, comma-separated), as whom.
        #[command(flatten)]
        conn: client::Conn,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Print a shell completion script (`wavegate completions bash >
    /// /etc/bash_completion.d/wavegate`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Man pages: `wavegate.1` on stdout, or one per subcommand in DIR.
    Man {
        /// Write every page into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// How results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people: aligned columns and sentences (`text` is the same).
    #[default]
    #[value(alias = "text")]
    Table,
    /// One JSON document, for scripts.
    Json,
    /// The same document as YAML.
    Yaml,
}

impl Output {
    /// Print `value` as JSON or YAML and return true; for `table`, print
    /// nothing and return false (the caller prints its own form).
    pub fn emit(self, value: &impl serde::Serialize) -> anyhow::Result<bool> {
        match self {
            Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
            Output::Yaml => print!("{}", serde_saphyr::to_string(value)?),
            Output::Table => return Ok(false),
        }
        Ok(true)
    }
}

/// Policy directory flag shared by commands that check plans.
#[derive(Clone, Debug, clap::Args)]
pub struct PolicyArgs {
    /// Directory of site policy files (`*.yaml`); the shipped `policies/` set
    /// is used when not given.
    #[arg(long, value_name = "DIR", env = "WAVEGATE_POLICIES")]
    pub policies: Option<PathBuf>,
}

impl PolicyArgs {
    /// Where to load policies from.
    pub fn source(&self) -> crate::policies::PolicySource {
        match &self.policies {
            Some(dir) => crate::policies::PolicySource::Dir(dir.clone()),
            None => crate::policies::PolicySource::Shipped,
        }
    }
}

/// Run a parsed command line; returns the exit status.
pub async fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Plan(cmd) => plan::run(cmd),
        Command::Demo(args) => demo::run(args).await,
        Command::Serve(args) => serve::run(args).await,
        Command::Certs(cmd) => certs::run(cmd),
        Command::Rollout { conn, cmd } => rollout::run(cmd, &conn).await,
        Command::Snapshot { conn, cmd } => snapshot::run(cmd, &conn).await,
        Command::Audit { conn, cmd } => audit::run(cmd, &conn).await,
        Command::Agent { conn, cmd } => agent::run(cmd, &conn).await,
        Command::Lab(cmd) => lab::run(cmd).await,
        Command::Store(cmd) => store::run(cmd).await,
        Command::Controllers { conn, output } => store::controllers(&conn, output).await,
        Command::Completions { shell } => shell::completions(shell),
        Command::Man { dir } => shell::man(dir.as_deref()),
    }
}
