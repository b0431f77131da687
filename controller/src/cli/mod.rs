//! The `wavegate` command line: one module per subcommand, each with a `run`.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use wavegate_domain::text::{inert_lines, is_active};

pub mod agent;
pub mod audit;
pub mod certs;
pub mod client;
#[cfg(feature = "lab")]
pub mod demo;
#[cfg(feature = "lab")]
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
    #[cfg(feature = "lab")]
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
    #[cfg(feature = "lab")]
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
            Output::Json => println!("{}", json_inert(&serde_json::to_string_pretty(value)?)),
            Output::Yaml => print!("{}", yaml_inert(value)?),
            Output::Table => return Ok(false),
        }
        Ok(true)
    }

    /// `value` as one record of a stream: a JSON line, or a YAML document
    /// after `---`; `None` for `table` (the caller has its own line).
    pub fn record(self, value: &impl serde::Serialize) -> anyhow::Result<Option<String>> {
        Ok(match self {
            Output::Json => Some(json_inert(&serde_json::to_string(value)?).into_owned()),
            Output::Yaml => Some(format!("---\n{}", yaml_inert(value)?.trim_end())),
            Output::Table => None,
        })
    }
}

/// Print text for a person: text from hosts and plans in it never drives
/// the terminal. Every line is made inert here, whatever built it; a field
/// that must stay on its line (a plan name in a row) is made inert with
/// [`inert`](wavegate_domain::text::inert) where the line is built, so
/// that a newline in it cannot make a line of its own.
pub fn show(text: &str) {
    print!("{}", inert_lines(text));
}

/// JSON text with every active character that serde_json leaves as it is
/// (it escapes C0 controls only: DEL, C1 controls and the bidirectional
/// controls pass) written as a `\uXXXX` escape. Outside strings, JSON has
/// nothing but ASCII, so this is the same document, inert.
fn json_inert(json: &str) -> Cow<'_, str> {
    let active = |c: char| is_active(c) && c != '\n';
    if !json.chars().any(active) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if active(c) {
            // Every active character is in the Basic Multilingual Plane.
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `value` as YAML, inert. serde-saphyr writes a string with a control
/// character double-quoted with escapes, but leaves the bidirectional
/// controls as they are, in any style. When there are some, every string
/// holding one is written double-quoted, where `\uXXXX` is the character
/// itself; a key holding one shows the escape as text.
fn yaml_inert(value: &impl serde::Serialize) -> anyhow::Result<String> {
    let yaml = serde_saphyr::to_string(value)?;
    let active = |c: char| is_active(c) && c != '\n';
    if !yaml.chars().any(active) {
        return Ok(yaml);
    }
    let quoted = serde_saphyr::to_string(&Quoted(&serde_json::to_value(value)?))?;
    let mut out = String::with_capacity(quoted.len() + 16);
    for c in quoted.chars() {
        if active(c) {
            let _ = write!(out, "\\u{:04X}", c as u32);
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// A JSON value for serde-saphyr, with every string that holds an active
/// character double-quoted.
struct Quoted<'a>(&'a serde_json::Value);

impl serde::Serialize for Quoted<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde_json::Value;
        match self.0 {
            Value::String(t) if t.chars().any(is_active) => serde_saphyr::DoubleQuoted(t.as_str()).serialize(s),
            Value::Array(a) => s.collect_seq(a.iter().map(Quoted)),
            Value::Object(o) => s.collect_map(o.iter().map(|(k, v)| (k, Quoted(v)))),
            v => v.serialize(s),
        }
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
        #[cfg(feature = "lab")]
        Command::Demo(args) => demo::run(args).await,
        Command::Serve(args) => serve::run(args).await,
        Command::Certs(cmd) => certs::run(cmd),
        Command::Rollout { conn, cmd } => rollout::run(cmd, &conn).await,
        Command::Snapshot { conn, cmd } => snapshot::run(cmd, &conn).await,
        Command::Audit { conn, cmd } => audit::run(cmd, &conn).await,
        Command::Agent { conn, cmd } => agent::run(cmd, &conn).await,
        #[cfg(feature = "lab")]
        Command::Lab(cmd) => lab::run(cmd).await,
        Command::Store(cmd) => store::run(cmd).await,
        Command::Controllers { conn, output } => store::controllers(&conn, output).await,
        Command::Completions { shell } => shell::completions(shell),
        Command::Man { dir } => shell::man(dir.as_deref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text as a hostile host prints it: C0, DEL, C1 and bidirectional
    /// controls, a newline.
    const HOSTILE: &str = "\u{1b}[2J \u{7f} \u{9b}31m \u{85} \u{202e}exe.txt \u{2067}x\u{2069}\nnext\r";

    #[test]
    fn json_escapes_every_active_character_and_stays_the_same_document() {
        let v = serde_json::json!({"text": HOSTILE, "list": [HOSTILE, "plain"]});
        let text = json_inert(&serde_json::to_string_pretty(&v).expect("json")).into_owned();
        assert!(!text.chars().any(|c| is_active(c) && c != '\n'), "{text}");
        assert!(text.contains("\\u009b31m") && text.contains("\\u202eexe.txt"), "{text}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).expect("json"), v);
        // Plain text is left alone.
        assert!(matches!(json_inert("{\"a\": \"caf\u{e9}\"}"), Cow::Borrowed(_)));
    }

    #[test]
    fn yaml_escapes_every_active_character_and_reads_back_the_same() {
        #[derive(serde::Serialize)]
        struct Doc<'a> {
            text: &'a str,
            multi: &'a str,
            bidi_only: &'a str,
            list: Vec<&'a str>,
        }
        let doc = Doc {
            text: HOSTILE,
            multi: "one\ntwo\n",
            bidi_only: "abc\u{202e}def",
            list: vec!["x\u{2066}y\nz", "plain"],
        };
        let text = yaml_inert(&doc).expect("yaml");
        assert!(!text.chars().any(|c| is_active(c) && c != '\n'), "{text}");
        let back: serde_json::Value = serde_saphyr::from_str(&text).expect("yaml");
        assert_eq!(back, serde_json::to_value(&doc).expect("value"), "{text}");
        // Without any, the document is serde-saphyr's own.
        let plain = Doc {
            text: "a",
            multi: "one\ntwo\n",
            bidi_only: "b",
            list: vec!["c"],
        };
        assert_eq!(
            yaml_inert(&plain).expect("yaml"),
            serde_saphyr::to_string(&plain).expect("yaml")
        );
    }
}
