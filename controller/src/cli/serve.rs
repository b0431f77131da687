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
use crate::hub::Hub;
use crate::store::Store;
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
    /// Address of the read-only web view, /metrics, /live and /ready. Keep it
    /// on loopback or behind an authenticating proxy: it shows every rollout.
    #[arg(long, default_value = "127.0.0.1:7080")]
    pub web_listen: String,
    /// Write the web view's bound address here once listening.
    #[arg(long, value_name = "FILE")]
    pub web_addr_file: Option<PathBuf>,
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
    #[arg(long, default_value = "256M", value_parser = bytes)]
    pub output_cap: u64,
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
    let store = Store::open(&args.data)?;
    let engine = Engine::new(
        store,
        Arc::new(Hub::default()),
        (fleet, &fleet_text),
        policies,
        Settings {
            agent_grace: args.agent_grace,
            output_cap: args.output_cap,
            notify: webhook.is_some(),
        },
    )?;
    if let Some(hook) = webhook {
        tokio::spawn(crate::notify::sender(engine.store_arc(), hook, engine.notified()));
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    if let Some(f) = &args.addr_file {
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())?;
        std::fs::rename(&tmp, f)?;
    }
    let web = tokio::net::TcpListener::bind(&args.web_listen)
        .await
        .with_context(|| format!("listening on {} for the web view", args.web_listen))?;
    let web_addr = web.local_addr()?;
    if let Some(f) = &args.web_addr_file {
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, web_addr.to_string())?;
        std::fs::rename(&tmp, f)?;
    }
    info!(%addr, %web_addr, tls = tls.is_some(), "Controller listening.");
    let web_engine = Arc::clone(&engine);
    tokio::spawn(async move {
        if let Err(e) = crate::web::serve(web, web_engine, std::future::pending()).await {
            tracing::error!(error = %e, "The web view stopped.");
        }
    });
    crate::server::serve(listener, engine, tls, shutdown()).await?;
    Ok(0)
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
