//! Notifications: a webhook on a rollout's state changes (awaiting
//! approval, halted, completed, aborted), so that a halt at 3 a.m. reaches a
//! person.
//!
//! A notification is written to the store's outbox in the same transaction
//! as the change it announces, so it is never sent for a change a power cut
//! took back, and never lost once the change is durable. One sender delivers
//! them in order: an HTTP POST of a JSON body, signed with HMAC-SHA256 of
//! the body under a shared secret (`X-Wavegate-Signature-256:
//! sha256=<hex>`, as GitHub signs its webhooks), retried with backoff until
//! the receiver answers 2xx, however long it is away.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use sha2::Sha256;
use tokio::sync::Notify;
use tracing::{info, warn};
use wavegate_domain::rollout::{HostRecord, Rollout, RolloutState, failed_hosts, state_line};

use crate::store::StateStore;

/// Where notifications go, and how they are signed.
#[derive(Clone)]
pub struct Webhook {
    /// `http://` or `https://` URL.
    pub url: String,
    /// The HMAC key.
    pub secret: Vec<u8>,
    /// TLS for https (the system's roots, or a given CA).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// The event a rollout state is announced as, if it is one.
pub fn event_of(state: RolloutState) -> Option<&'static str> {
    match state {
        RolloutState::AwaitingApproval => Some("awaiting_approval"),
        RolloutState::Halted => Some("halted"),
        RolloutState::Completed => Some("completed"),
        RolloutState::Aborted => Some("aborted"),
        _ => None,
    }
}

/// The body of a notification for a rollout now in `state`.
pub fn body<'a>(r: &Rollout, hosts: impl IntoIterator<Item = &'a HostRecord>, event: &str, at: &str) -> Vec<u8> {
    let failed = failed_hosts(hosts);
    serde_json::json!({
        "event": event,
        "rollout": r.id,
        "plan": r.plan_name,
        "plan_hash": r.plan_hash,
        "state": r.state.as_str(),
        "summary": state_line(r.state.as_str(), &failed),
        "failed_hosts": failed,
        "halt_reason": r.halt_reason,
        "submitter": r.submitter,
        "waves": r.waves.iter().map(|w| serde_json::json!({"index": w.index, "state": w.state.as_str()})).collect::<Vec<_>>(),
        "at": at,
    })
    .to_string()
    .into_bytes()
}

/// `sha256=<hex>` of HMAC-SHA256(secret, body).
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    #[allow(clippy::expect_used)]
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Split an `http(s)://host[:port]/path` URL.
fn parse_url(url: &str) -> Result<(bool, String, u16, String)> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        bail!("`{url}` is not an http:// or https:// URL");
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || p.parse::<u16>().is_ok() => (
            h.trim_matches(['[', ']']).to_owned(),
            p.parse().with_context(|| format!("`{p}` is not a port in `{url}`"))?,
        ),
        _ => (hostport.trim_matches(['[', ']']).to_owned(), if tls { 443 } else { 80 }),
    };
    if host.is_empty() {
        bail!("`{url}` names no host");
    }
    Ok((tls, host, port, path.to_owned()))
}

/// POST one notification; the receiver's status code.
async fn post(hook: &Webhook, event: &str, seq: u64, body: &[u8]) -> Result<u16> {
    let (tls, host, port, path) = parse_url(&hook.url)?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .context("connecting took over 5 s")?
    .with_context(|| format!("connecting to {host}:{port}"))?;
    let req = hyper::Request::post(path)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("wavegate/", env!("CARGO_PKG_VERSION")),
        )
        .header("X-Wavegate-Event", event)
        .header("X-Wavegate-Delivery", seq.to_string())
        .header("X-Wavegate-Signature-256", signature(&hook.secret, body))
        .body(Full::new(Bytes::copy_from_slice(body)))?;
    let status = if tls {
        let config = hook.tls.clone().context("no TLS settings for an https webhook")?;
        let name = rustls::pki_types::ServerName::try_from(host.clone()).context("the webhook's host name")?;
        let stream = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
        send(hyper_util::rt::TokioIo::new(stream), req).await?
    } else {
        send(hyper_util::rt::TokioIo::new(tcp), req).await?
    };
    Ok(status)
}

async fn send<IO>(io: IO, req: hyper::Request<Full<Bytes>>) -> Result<u16>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let res = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .context("no answer within 10 s")??;
    let status = res.status().as_u16();
    let _ = res.into_body().collect().await;
    Ok(status)
}

/// Deliver the outbox, oldest first, for as long as the controller runs.
pub async fn sender(store: Arc<dyn StateStore>, hook: Webhook, wake: Arc<Notify>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let Ok(Some((seq, body))) = store.outbox_first().await else {
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            continue;
        };
        let event = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["event"].as_str().map(str::to_owned))
            .unwrap_or_default();
        match post(&hook, &event, seq, &body).await {
            Ok(code) if (200..300).contains(&code) => {
                info!(event, delivery = seq, "Notification delivered.");
                if let Err(e) = store.outbox_done(seq).await {
                    warn!(error = %format!("{e:#}"), delivery = seq, "Could not mark a notification delivered; it may be sent again.");
                }
                backoff = Duration::from_millis(250);
                continue;
            }
            Ok(code) => warn!(
                event,
                delivery = seq,
                status = code,
                "The webhook refused a notification; retrying."
            ),
            Err(e) => {
                warn!(event, delivery = seq, error = %format!("{e:#}"), "Could not deliver a notification; retrying.")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = wake.notified() => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// TLS for https webhooks: the system's trusted roots, and `ca` when given.
pub fn tls_config(ca: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        use rustls::pki_types::pem::PemObject as _;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            roots.add(cert.map_err(|e| anyhow::anyhow!("{} is not a PEM certificate: {e}", ca.display()))?)?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split() {
        assert_eq!(
            parse_url("http://127.0.0.1:8080/hooks/wg").expect("url"),
            (false, "127.0.0.1".into(), 8080, "/hooks/wg".into())
        );
        assert_eq!(
            parse_url("https://alerts.example").expect("url"),
            (true, "alerts.example".into(), 443, "/".into())
        );
        assert!(parse_url("ftp://x").is_err());
        assert!(parse_url("http://:80/").is_err());
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_the_body() {
        // RFC 4231, test case 2.
        let sig = signature(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
