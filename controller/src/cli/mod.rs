//! The `wavegate` command line: one module per subcommand, each with a `run`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use wavegate_domain::text::inert_lines;
pub use wavegate_operator::client;
pub use wavegate_operator::output::Output;
pub use wavegate_operator::policies::PolicyArgs;

pub mod agent;
pub mod audit;
pub mod certs;
pub mod fleet;
pub mod logs;
pub mod notices;
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
    #[cfg(feature = "lab")]
    Demo(wavegate_lab::demo::DemoArgs),
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
    /// The inventory's hosts as the controller sees them: role, agent, and
    /// what updates each one outside wavegate.
    Fleet {
        /// Which controller, as whom.
        #[command(flatten)]
        conn: client::Conn,
        /// The fleet command.
        #[command(subcommand)]
        cmd: fleet::FleetCommand,
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
    #[cfg(feature = "lab")]
    #[command(subcommand)]
    Lab(wavegate_lab::LabCommand),
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

/// Print text for a person: text from hosts and plans in it never drives
/// the terminal. Every line is made inert here, whatever built it; a field
/// that must stay on its line (a plan name in a row) is made inert with
/// [`inert`](wavegate_domain::text::inert) where the line is built, so
/// that a newline in it cannot make a line of its own.
pub fn show(text: &str) {
    print!("{}", inert_lines(text));
}

/// Run a parsed command line; returns the exit status.
pub async fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Plan(cmd) => plan::run(cmd).await,
        #[cfg(feature = "lab")]
        Command::Demo(args) => wavegate_lab::demo::run(args).await,
        Command::Serve(args) => serve::run(args).await,
        Command::Certs(cmd) => certs::run(cmd),
        Command::Rollout { conn, cmd } => rollout::run(cmd, &conn).await,
        Command::Snapshot { conn, cmd } => snapshot::run(cmd, &conn).await,
        Command::Fleet { conn, cmd } => fleet::run(cmd, &conn).await,
        Command::Audit { conn, cmd } => audit::run(cmd, &conn).await,
        Command::Agent { conn, cmd } => agent::run(cmd, &conn).await,
        #[cfg(feature = "lab")]
        Command::Lab(cmd) => wavegate_lab::run(cmd).await,
        Command::Store(cmd) => store::run(cmd).await,
        Command::Controllers { conn, output } => store::controllers(&conn, output).await,
        Command::Completions { shell } => shell::completions(shell),
        Command::Man { dir } => shell::man(dir.as_deref()),
    }
}
