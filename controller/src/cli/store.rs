//! `wavegate store ...`: the etcd store's members and leader, and moving a
//! controller's embedded store into etcd. `wavegate controllers`: each
//! controller's role.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use super::Output;
use super::client::Conn;
use crate::etcd::{Etcd, EtcdConfig};
use crate::leader::{LeaderRecord, Leadership};
use crate::store::etcd::{EtcdStore, Limits};
use crate::store::{RedbStore, StateStore, keys};
use crate::tls::TlsFiles;

/// Where an etcd store is.
#[derive(Clone, Debug, Args)]
pub struct EtcdArgs {
    /// The etcd cluster: etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379.
    #[arg(long, value_name = "URL", env = "WAVEGATE_STORE")]
    pub store: String,
    /// The controllers' key prefix in it.
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "/wavegate",
        env = "WAVEGATE_STORE_PREFIX"
    )]
    pub store_prefix: String,
    /// Mutual TLS to etcd.
    #[command(flatten)]
    pub tls: EtcdTlsArgs,
}

/// Mutual TLS to etcd: all three flags, or none.
#[derive(Clone, Debug, Default, Args)]
pub struct EtcdTlsArgs {
    /// CA certificate that signs the etcd members' certificates (mutual
    /// TLS to etcd; give --etcd-cert and --etcd-key with it).
    #[arg(long, value_name = "FILE", env = "WAVEGATE_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// This client's certificate for etcd.
    #[arg(long, value_name = "FILE", env = "WAVEGATE_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, value_name = "FILE", env = "WAVEGATE_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
}

/// The CA, certificate and key, as PEM text.
pub type Pem = (String, String, String);

/// Only some of the etcd TLS flags were given.
#[derive(Debug, thiserror::Error)]
#[error("mutual TLS to etcd needs all of --etcd-ca, --etcd-cert and --etcd-key")]
pub struct PartialTls;

impl EtcdTlsArgs {
    /// The CA, certificate and key as PEM text, if TLS was asked for. The
    /// outer error is a usage error (some flags only), the inner one an
    /// unreadable file.
    pub fn pem(&self) -> Result<Result<Option<Pem>>, PartialTls> {
        match (&self.etcd_ca, &self.etcd_cert, &self.etcd_key) {
            (None, None, None) => Ok(Ok(None)),
            (Some(ca), Some(cert), Some(key)) => Ok(TlsFiles::read(ca, cert, key).map(|t| Some((t.ca, t.cert, t.key)))),
            _ => Err(PartialTls),
        }
    }
}

impl EtcdArgs {
    /// A client for the cluster.
    pub fn client(&self) -> Result<Arc<Etcd>> {
        let mut cfg = EtcdConfig::parse(&self.store).map_err(|e| anyhow::anyhow!("--store: {e}"))?;
        cfg.tls = self.tls.pem()??;
        Ok(Arc::new(Etcd::new(cfg)?))
    }
}

/// `wavegate store ...`
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Each etcd member's health, the cluster's raft leader, and which
    /// controller holds the leadership.
    Status {
        /// The cluster.
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Copy a controller's embedded store (its data directory) into an
    /// empty etcd prefix, audit log and all, and verify the copy. Stop the
    /// controller first; afterwards start the controllers with `--store`.
    Migrate {
        /// The data directory of the controller whose store moves.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// Where to.
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

/// Run a `store` subcommand.
pub async fn run(cmd: StoreCommand) -> Result<u8> {
    match cmd {
        StoreCommand::Status { etcd, output } => status(&etcd, output).await,
        StoreCommand::Migrate { data, etcd } => migrate(&data, &etcd).await,
    }
}

async fn status(args: &EtcdArgs, output: Output) -> Result<u8> {
    let etcd = args.client()?;
    let members = etcd.statuses().await;
    let prefix = format!("{}/", args.store_prefix.trim_end_matches('/'));
    let leader = etcd
        .get(format!("{prefix}{}", keys::LEADER).as_bytes())
        .await
        .ok()
        .flatten()
        .and_then(|kv| serde_json::from_slice::<LeaderRecord>(&kv.value).ok());
    let up = members.iter().filter(|(_, r)| r.is_ok()).count();
    let raft_leader = members
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .map(|s| s.leader)
        .find(|l| *l != 0);
    let quorum = up > members.len() / 2 && raft_leader.is_some();
    let value = json!({
        "members": members.iter().map(|(e, r)| match r {
            Ok(s) => json!({
                "endpoint": e,
                "ok": true,
                "version": s.version,
                "db_bytes": s.db_size,
                "is_raft_leader": s.header.as_ref().is_some_and(|h| h.member_id == s.leader),
                "raft_term": s.raft_term,
                "errors": s.errors,
            }),
            Err(why) => json!({"endpoint": e, "ok": false, "error": why}),
        }).collect::<Vec<_>>(),
        "quorum": quorum,
        "controller_leader": leader.as_ref().map(|l| json!({"url": l.url, "since_ms": l.since_ms})),
    });
    if !output.emit(&value)? {
        for m in value["members"].as_array().into_iter().flatten() {
            if m["ok"] == true {
                println!(
                    "{:<24} up    etcd {}{}  {} bytes",
                    m["endpoint"].as_str().unwrap_or_default(),
                    m["version"].as_str().unwrap_or_default(),
                    if m["is_raft_leader"] == true {
                        "  raft leader"
                    } else {
                        ""
                    },
                    m["db_bytes"]
                );
            } else {
                println!(
                    "{:<24} DOWN  {}",
                    m["endpoint"].as_str().unwrap_or_default(),
                    m["error"].as_str().unwrap_or_default()
                );
            }
        }
        println!("quorum: {}", if quorum { "yes" } else { "NO (writes and leases stop)" });
        match &leader {
            Some(l) => println!("controller leader: {}", l.url),
            None => println!("controller leader: none elected"),
        }
    }
    Ok(if quorum { 0 } else { 1 })
}

async fn migrate(data: &std::path::Path, args: &EtcdArgs) -> Result<u8> {
    if !data.join("wavegate.redb").exists() {
        bail!(
            "no store in {} (expected {}/wavegate.redb)",
            data.display(),
            data.display()
        );
    }
    let redb = RedbStore::open(data)?;
    let before = redb.verify_audit()?;
    let Ok(records) = before else {
        bail!(
            "the audit log in {} does not verify ({:?}); fix that first: a migration copies it as it is",
            data.display(),
            before
        );
    };
    let entries = redb.export()?;
    let rollouts = entries.iter().filter(|(k, _)| k.starts_with(keys::ROLLOUTS)).count();
    let key = crate::store::signing_key(data)?;
    let etcd = args.client()?;
    // Not elected: the import is the only writer, and refuses to run if a
    // controller took the prefix's leadership.
    let store = EtcdStore::open(
        Arc::clone(&etcd),
        &args.store_prefix,
        key,
        Leadership::elected(""),
        Limits::for_fleet(0),
    )
    .await
    .context("opening the etcd store")?;
    let n = store.import(entries).await?;
    let copied = store.verify_audit().await?;
    match copied {
        Ok(m) if m == records => {}
        other => {
            bail!("the copied audit log does not verify as the original did ({other:?}); the etcd prefix is not usable")
        }
    }
    let loaded = store.load().await?;
    if loaded.len() != rollouts {
        bail!(
            "{} rollouts in etcd after the copy, {rollouts} in the original",
            loaded.len()
        );
    }
    println!(
        "migrated {n} keys from {} to {} ({} rollouts; the audit log of {records} records verifies)",
        data.display(),
        store.describe(),
        loaded.len()
    );
    println!(
        "next: copy {}/audit-ed25519.key into every controller's data directory, and start each with --store {} --store-prefix {}",
        data.display(),
        args.store,
        args.store_prefix
    );
    Ok(0)
}

/// `wavegate controllers`: ask every controller given its role.
pub async fn controllers(conn: &Conn, output: Output) -> Result<u8> {
    let urls = conn.urls();
    if urls.is_empty() {
        bail!("no controller: give --controller URL[,URL...] or set WAVEGATE_CONTROLLER");
    }
    let mut rows = Vec::new();
    for url in &urls {
        let row = match conn.connect_to(url).await {
            Ok(mut c) => match c.role(wavegate_proto::v1::RoleRequest {}).await {
                Ok(r) => {
                    let r = r.into_inner();
                    json!({"url": url, "role": r.role, "leader": r.leader, "why": r.why, "store": r.store})
                }
                Err(s) => json!({"url": url, "role": "unreachable", "why": s.message()}),
            },
            Err(e) => json!({"url": url, "role": "unreachable", "why": format!("{e:#}")}),
        };
        rows.push(row);
    }
    let leaders = rows
        .iter()
        .filter(|r| matches!(r["role"].as_str(), Some("leader" | "single")))
        .count();
    let value = serde_json::Value::Array(rows);
    if !output.emit(&value)? {
        for r in value.as_array().into_iter().flatten() {
            let why = r["why"].as_str().unwrap_or_default();
            println!(
                "{:<28} {:<11} {}",
                r["url"].as_str().unwrap_or_default(),
                r["role"].as_str().unwrap_or_default(),
                if why.is_empty() {
                    r["store"].as_str().unwrap_or_default()
                } else {
                    why
                }
            );
        }
    }
    Ok(if leaders == 1 { 0 } else { 1 })
}
