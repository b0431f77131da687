//! `wavegate serve`: the long-running controller.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tracing::info;
use wavegate_domain::units::{Scalar, parse_duration};
use wavegate_domain::{Fleet, Source};

use super::PolicyArgs;
use crate::engine::{Engine, Settings};
use crate::etcd::{Etcd, EtcdConfig};
use crate::hub::Hub;
use crate::leader::{Leadership, Role};
use crate::store::etcd::{EtcdStore, Limits};
use crate::store::{RedbStore, StateStore};
use crate::tls::TlsFiles;

/// Flags of `wavegate serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Data directory: the durable store lives here.
    #[arg(long, value_name = "DIR", env = "WAVEGATE_DATA")]
    pub data: PathBuf,
    /// The fleet inventory: every host the controller may ever touch.
    #[arg(long, value_name = "FLEET", env = "WAVEGATE_FLEET")]
    pub fleet: PathBuf,
    /// Site policies (default: the shipped set).
    #[command(flatten)]
    pub policies: PolicyArgs,
    /// Address to listen on for agents and operators.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: String,
    /// Write the bound address here once listening (useful with port 0).
    #[arg(long, value_name = "FILE")]
    pub addr_file: Option<PathBuf>,
    /// Address of the read-only web view, /metrics, /live and /ready, served
    /// over TLS with --cert. Every page but /live and /ready needs a client
    /// certificate from --ca with an operator or auditor role, or a browser
    /// session from the one-time login link printed at start.
    #[arg(long, default_value = "127.0.0.1:7080")]
    pub web_listen: String,
    /// Write the web view's bound address here once listening.
    #[arg(long, value_name = "FILE")]
    pub web_addr_file: Option<PathBuf>,
    /// Who may read the web view, and by which names.
    #[command(flatten)]
    pub web_access: Box<WebAccessArgs>,
    /// CA certificate that signs agent and operator certificates.
    #[arg(long, value_name = "FILE", env = "WAVEGATE_CA")]
    pub ca: Option<PathBuf>,
    /// The controller's certificate.
    #[arg(long, value_name = "FILE", env = "WAVEGATE_CERT")]
    pub cert: Option<PathBuf>,
    /// The controller's private key.
    #[arg(long, value_name = "FILE", env = "WAVEGATE_KEY")]
    pub key: Option<PathBuf>,
    /// Serve without TLS, trusting an unverified identity header. For local
    /// development only; never on a network.
    #[arg(long)]
    pub insecure_plaintext_for_local_dev: bool,
    /// How long past a step's own timeout to wait for its agent (to reconnect
    /// and answer) before the host counts as failed.
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub agent_grace: Duration,
    /// How much of the steps' and checks' output to keep per host and
    /// rollout, like 256M or 1G (the rest stays in the agents' journals).
    /// Default: 256M with the embedded store, 4M with etcd.
    #[arg(long, value_parser = bytes)]
    pub output_cap: Option<u64>,
    /// How much output to keep per rollout, every host together, like 2G.
    /// Default: 2G with the embedded store, 256M with etcd.
    #[arg(long, value_parser = bytes)]
    pub output_rollout_cap: Option<u64>,
    /// The store: the embedded one in --data (the default), or an etcd
    /// cluster several controllers share, one of them leading:
    /// etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379.
    #[arg(long, value_name = "URL", env = "WAVEGATE_STORE")]
    pub store: Option<String>,
    /// Where in etcd this controller group keeps its keys.
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "/wavegate",
        env = "WAVEGATE_STORE_PREFIX"
    )]
    pub store_prefix: String,
    /// The leader's lease in etcd: a standby takes over this long after the
    /// leader stops refreshing it (the leader itself stops acting a fifth
    /// of it, at least 0.5 s, earlier).
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub lease_ttl: Duration,
    /// The address agents and operators reach this controller at, as the
    /// leader key announces it (default: https:// and the bound --listen
    /// address).
    #[arg(long, value_name = "URL")]
    pub advertise: Option<String>,
    /// Mutual TLS to etcd.
    #[command(flatten)]
    pub etcd_tls: super::store::EtcdTlsArgs,
    /// POST a signed JSON notification to this URL when a rollout awaits
    /// approval, halts, completes or is aborted (retried until delivered).
    #[arg(long, value_name = "URL", env = "WAVEGATE_WEBHOOK")]
    pub webhook: Option<String>,
    /// The shared secret the notifications are signed with
    /// (X-Wavegate-Signature-256: sha256=HMAC-SHA256 of the body).
    #[arg(long, value_name = "FILE", env = "WAVEGATE_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// A CA certificate (PEM) to trust for an https webhook, besides the
    /// system's.
    #[arg(long, value_name = "FILE")]
    pub webhook_ca: Option<PathBuf>,
}

/// The web view's login link and the names it answers to.
#[derive(Debug, Args)]
pub struct WebAccessArgs {
    /// Keep the web view's current login link in this file (mode 0600),
    /// written before the address files; each use of a link writes the next.
    #[arg(long, value_name = "FILE")]
    pub web_login_file: Option<PathBuf>,
    /// Another name the web view answers to, as browsers send it in `Host`
    /// (NAME or NAME:PORT; repeatable). Its address and localhost always
    /// work; any other name is refused (defeating DNS rebinding). The first
    /// one names the login link.
    #[arg(long, value_name = "NAME", value_parser = crate::web::host_name)]
    pub web_host: Vec<String>,
}

/// Parse a size flag: a count of bytes with K, M or G.
pub fn bytes(s: &str) -> Result<u64, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size; write it like 256M or 1G"))?;
    let mult = match unit {
        "" => 1,
        "K" | "k" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        _ => return Err(format!("`{s}` is not a size; write it like 256M or 1G")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("`{s}` is too large"))
}

/// Parse a duration flag the way plans write them.
pub fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(&Scalar::Text(s.to_owned())).map_err(|e| e.to_string())
}

/// Run the controller until SIGINT or SIGTERM.
pub async fn run(args: ServeArgs) -> Result<u8> {
    let tls = match (&args.ca, &args.cert, &args.key, args.insecure_plaintext_for_local_dev) {
        (Some(ca), Some(cert), Some(key), false) => Some(TlsFiles::read(ca, cert, key)?),
        (_, _, _, true) => None,
        _ => bail!("give --ca, --cert and --key (see `wavegate certs init`), or --insecure-plaintext-for-local-dev"),
    };
    let fleet_text = std::fs::read_to_string(&args.fleet)
        .with_context(|| format!("reading the fleet inventory {}", args.fleet.display()))?;
    let fleet_name = args.fleet.display().to_string();
    let fleet = match Fleet::parse(Source {
        name: &fleet_name,
        text: &fleet_text,
    }) {
        Ok(f) => f,
        Err(v) => {
            for x in &v {
                eprintln!("{x}");
            }
            return Ok(wavegate_domain::exit_status(&v));
        }
    };
    let policies = match crate::policies::load(&args.policies.source()) {
        Ok(p) => p,
        Err(v) => {
            for x in &v {
                eprintln!("{x}");
            }
            return Ok(2);
        }
    };
    let webhook = match &args.webhook {
        None => None,
        Some(url) => {
            let Some(secret_file) = &args.webhook_secret_file else {
                eprintln!("wavegate serve: --webhook needs --webhook-secret-file: notifications are always signed");
                return Ok(2);
            };
            let secret = std::fs::read(secret_file)
                .with_context(|| format!("reading the webhook secret {}", secret_file.display()))?;
            let secret = String::from_utf8_lossy(&secret).trim().as_bytes().to_vec();
            if secret.len() < 16 {
                eprintln!(
                    "wavegate serve: the webhook secret in {} is shorter than 16 bytes; write a long random one (like `openssl rand -hex 32`)",
                    secret_file.display()
                );
                return Ok(2);
            }
            let tls = if url.starts_with("https://") {
                Some(crate::notify::tls_config(args.webhook_ca.as_deref())?)
            } else if url.starts_with("http://") {
                None
            } else {
                eprintln!("wavegate serve: --webhook `{url}` is not an http:// or https:// URL");
                return Ok(2);
            };
            Some(crate::notify::Webhook {
                url: url.clone(),
                secret,
                tls,
            })
        }
    };
    raise_open_file_limit();
    // Take the port now (its address is this controller's name in an
    // election) but accept connections only once the store is open: until
    // then a client is refused at once and tries another controller.
    let socket = reserve(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = socket.local_addr()?;
    let hosts = fleet.hosts().count();
    let hub = Arc::new(Hub::default());
    let (store, leadership, etcd): (Arc<dyn StateStore>, Arc<Leadership>, Option<EtcdLeader>) = match &args.store {
        None => (RedbStore::open(&args.data)?.shared(), Leadership::single(), None),
        Some(url) => {
            let mut cfg = match EtcdConfig::parse(url) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("wavegate serve: --store: {e}");
                    return Ok(2);
                }
            };
            cfg.tls = match args.etcd_tls.pem() {
                Ok(pem) => pem?,
                Err(e) => {
                    eprintln!("wavegate serve: {e}");
                    return Ok(2);
                }
            };
            let advertise = match &args.advertise {
                Some(a) => a.clone(),
                None if addr.ip().is_unspecified() => {
                    eprintln!(
                        "wavegate serve: --listen {} is every address; with --store etcd://... give --advertise https://HOST:{} (the address agents and operators reach this controller at)",
                        args.listen,
                        addr.port()
                    );
                    return Ok(2);
                }
                None => format!("https://{addr}"),
            };
            let etcd = Arc::new(Etcd::new(cfg)?);
            let leadership = Leadership::elected(&advertise);
            let key = crate::store::signing_key(&args.data)?;
            let store = EtcdStore::open_waiting(
                Arc::clone(&etcd),
                &args.store_prefix,
                key,
                Arc::clone(&leadership),
                Limits::for_fleet(hosts),
            )
            .await?;
            let leader_key = store.leader_key();
            (Arc::new(store), leadership, Some((etcd, leader_key)))
        }
    };
    let output_cap = args.output_cap.unwrap_or(if etcd.is_some() {
        4 << 20
    } else {
        crate::engine::DEFAULT_OUTPUT_CAP
    });
    let engine = Engine::new(
        store,
        hub,
        (fleet, &fleet_text),
        policies,
        Settings {
            agent_grace: args.agent_grace,
            output_cap,
            output_rollout_cap: args.output_rollout_cap.unwrap_or(if etcd.is_some() {
                256 << 20
            } else {
                crate::engine::DEFAULT_OUTPUT_ROLLOUT_CAP
            }),
            notify: webhook.is_some(),
            leadership: Arc::clone(&leadership),
        },
    )
    .await?;
    let listener = socket
        .listen(1024)
        .with_context(|| format!("listening on {}", args.listen))?;
    let web = tokio::net::TcpListener::bind(&args.web_listen)
        .await
        .with_context(|| format!("listening on {} for the web view", args.web_listen))?;
    let web_addr = web.local_addr()?;
    let web = crate::web::WebView::new(
        web,
        crate::web::WebOptions {
            tls: tls.as_ref(),
            hosts: args.web_access.web_host.clone(),
            login_file: args.web_access.web_login_file.clone(),
        },
    )?;
    if let Some(f) = &args.web_addr_file {
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, web_addr.to_string())?;
        std::fs::rename(&tmp, f)?;
    }
    // Written last: whoever waits for this file finds both addresses.
    if let Some(f) = &args.addr_file {
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())?;
        std::fs::rename(&tmp, f)?;
    }
    info!(%addr, %web_addr, tls = tls.is_some(), store = %engine.store().describe(), "Controller listening.");
    // SIGTERM or ^C: let the agents go (their sessions end, so nothing
    // waits on them), stop both listeners, and give what is in flight a
    // bounded time.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    {
        let hub = Arc::clone(engine.hub());
        tokio::spawn(async move {
            shutdown().await;
            let n = hub.disconnect_all();
            info!(agents = n, "Shutting down: agent sessions closed.");
            let _ = stop_tx.send(true);
        });
    }
    let web_engine = Arc::clone(&engine);
    let web_stop = stopped(stop.clone());
    tokio::spawn(async move {
        if let Err(e) = web.serve(web_engine, web_stop).await {
            tracing::error!(error = %e, "The web view stopped.");
        }
    });
    let mut follower = None;
    match &etcd {
        None => {
            if let Some(hook) = webhook {
                tokio::spawn(crate::notify::sender(engine.store_arc(), hook, engine.notified()));
            }
        }
        Some((etcd, leader_key)) => {
            tokio::spawn(crate::leader::campaign(
                Arc::clone(etcd),
                leader_key.clone(),
                args.lease_ttl,
                Arc::clone(&leadership),
            ));
            let bound = [("--listen", addr), ("--web-listen", web_addr)];
            follower = Some(tokio::spawn(follow_role(Arc::clone(&engine), webhook, bound)));
        }
    }
    let grpc = crate::server::serve(listener, Arc::clone(&engine), tls, stopped(stop.clone()));
    tokio::select! {
        r = grpc => r?,
        () = async {
            stopped(stop).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("Operator streams were still open {} s after the signal; stopping anyway.", SHUTDOWN_GRACE.as_secs());
        }
    }
    // A controller that is shutting down gives its leadership up; it does
    // not start again as a standby.
    if let Some(f) = follower {
        f.abort();
    }
    if let Some((etcd, leader_key)) = &etcd {
        crate::leader::resign(etcd, leader_key, &leadership).await;
    }
    Ok(0)
}

/// Act on this controller's role as it changes: a standby reads the store
/// every second; the newly elected leader takes every rollout over; a
/// leader that cannot refresh its lease lets its agents go (they find the
/// leader); one that lost it starts again as a standby.
async fn follow_role(
    engine: Arc<Engine>,
    webhook: Option<crate::notify::Webhook>,
    bound: [(&'static str, std::net::SocketAddr); 2],
) {
    let leadership = Arc::clone(engine.leadership());
    let mut roles = leadership.subscribe();
    let mut webhook = webhook;
    let mut promoted = false;
    loop {
        let role = roles.borrow_and_update().clone();
        match role {
            Role::Standby { .. } | Role::Single => {
                if let Err(e) = engine.refresh().await {
                    tracing::warn!(error = %format!("{e:#}"), "A standby could not read the store.");
                }
            }
            Role::Leading if !promoted => {
                promoted = true;
                info!("This controller leads now; continuing every rollout from the store.");
                // A moment without etcd while reading the store is worth
                // waiting out: the lease is kept alive meanwhile, and
                // giving up would leave the group leaderless for a TTL.
                let mut tries = 0;
                let taken = loop {
                    match engine.promote().await {
                        Ok(()) => break Ok(()),
                        Err(e) if tries < 10 && leadership.fence().is_some() => {
                            tries += 1;
                            tracing::warn!(error = %format!("{e:#}"), "Taking over: reading the store failed; trying again.");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Err(e) => break Err(e),
                    }
                };
                if let Err(e) = taken {
                    leadership.lose(&format!("taking over failed: {e:#}"));
                    continue;
                }
                if let Some(hook) = webhook.take() {
                    tokio::spawn(crate::notify::sender(engine.store_arc(), hook, engine.notified()));
                }
            }
            Role::Leading => {}
            Role::Uncertain { why } => {
                let n = engine.hub().disconnect_all();
                tracing::warn!(agents = n, "{why}; the agents were let go to find the leader.");
            }
            Role::Lost { why } => {
                engine.hub().disconnect_all();
                restart_as_standby(&why, &bound);
            }
        }
        tokio::select! {
            r = roles.changed() => if r.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(1)), if !leadership.leads() => {}
        }
    }
}

/// Start this process again from the top (same binary, same arguments,
/// on the addresses it listens on now, also where it was given port 0):
/// nothing of the lost leadership survives in memory, and the new process
/// joins as a standby where agents and operators reach it.
fn restart_as_standby(why: &str, bound: &[(&str, std::net::SocketAddr)]) -> ! {
    use std::os::unix::process::CommandExt as _;
    tracing::error!("{why}; restarting as a standby.");
    let args = same_addresses(std::env::args_os().skip(1).collect(), bound);
    let err = match std::env::current_exe() {
        Ok(exe) => std::process::Command::new(exe).args(args).exec(),
        Err(e) => e,
    };
    tracing::error!(error = %err, "Could not restart; exiting so the service manager restarts it.");
    std::process::exit(75);
}

/// `args` with each `flag ADDR` (or `flag=ADDR`) replaced by the address
/// bound for it.
fn same_addresses(args: Vec<std::ffi::OsString>, bound: &[(&str, std::net::SocketAddr)]) -> Vec<std::ffi::OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let text = a.to_string_lossy().into_owned();
        match bound
            .iter()
            .find(|(f, _)| text == *f || text.starts_with(&format!("{f}=")))
        {
            Some((flag, addr)) => {
                if text == *flag {
                    it.next();
                }
                out.push(format!("{flag}={addr}").into());
            }
            None => out.push(a),
        }
    }
    out
}

/// The etcd client and the leader key an elected controller campaigns on.
type EtcdLeader = (Arc<Etcd>, Vec<u8>);

/// A socket bound to `listen` (resolved, first address) that does not
/// listen yet.
async fn reserve(listen: &str) -> Result<tokio::net::TcpSocket> {
    let Some(at) = tokio::net::lookup_host(listen).await?.next() else {
        bail!("`{listen}` resolves to no address");
    };
    let socket = if at.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(at)?;
    Ok(socket)
}

/// Every agent session is a socket: raise the soft open-file limit to the
/// hard one, as servers for thousands of connections do.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(error = %e, soft, "Could not raise the open-file limit; agents beyond it are refused.");
    }
}

/// How long open operator streams (`watch`, `logs -f`) may keep a
/// controller that was told to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Resolves once `stop` says so (or its sender is gone).
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("Shutting down.");
}

#[cfg(test)]
mod tests {
    use super::same_addresses;

    #[test]
    fn a_restart_listens_where_the_lost_leader_listened() {
        let args = [
            "--listen",
            "127.0.0.1:0",
            "--data",
            "d",
            "--web-listen=127.0.0.1:0",
            "--listen-x",
            "y",
        ]
        .map(std::ffi::OsString::from)
        .to_vec();
        let bound = [
            ("--listen", "127.0.0.1:4000".parse().expect("an address")),
            ("--web-listen", "127.0.0.1:4001".parse().expect("an address")),
        ];
        let got: Vec<String> = same_addresses(args, &bound)
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            got,
            [
                "--listen=127.0.0.1:4000",
                "--data",
                "d",
                "--web-listen=127.0.0.1:4001",
                "--listen-x",
                "y"
            ]
        );
    }
}
