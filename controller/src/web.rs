//! The read-only web view and the operational endpoints, on their own HTTP
//! port: `/` (rollouts), `/rollouts/{id}` (waves by hosts, dry-runs,
//! snapshots, output), `/audit` (timeline and verification), `/metrics`,
//! `/live`, `/ready`. Server-rendered HTML; nothing here changes anything.
//!
//! Served over TLS with the controller's certificate, and only to someone
//! let in (see [`access`]): a client certificate from the CA with an
//! operator role, or a browser session from a one-time login link.

mod access;
mod incoming;

use std::fmt::Write as _;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use tokio::net::TcpListener;
use wavegate_domain::rollout::RolloutState;
use wavegate_domain::snapshot::SnapshotState;

pub use self::access::{SESSION, Viewer, host_name};
pub use self::incoming::{ClientCert, Peer, fetch};
use crate::engine::{Engine, Entry, utc};
use crate::tls::TlsFiles;

/// How the web view is served and who may read it.
pub struct WebOptions<'a> {
    /// The controller's TLS files; `None` serves plain HTTP (local
    /// development only: the login token then crosses the wire in clear).
    pub tls: Option<&'a TlsFiles>,
    /// More names it answers to besides its address and `localhost`
    /// (`--web-host`, checked by [`host_name`]).
    pub hosts: Vec<String>,
    /// Where the current login link is kept (mode 0600).
    pub login_file: Option<PathBuf>,
}

/// The web view, bound, with its first login link made (and written).
pub struct WebView {
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    access: Arc<access::Access>,
}

impl WebView {
    /// Prepare the view on `listener`: TLS, the names it answers to, and
    /// the first login link, printed and written to the login file before
    /// this returns.
    pub fn new(listener: TcpListener, options: WebOptions<'_>) -> anyhow::Result<WebView> {
        use anyhow::Context as _;
        let tls = options
            .tls
            .map(incoming::server_config)
            .transpose()
            .context("the web view's TLS")?;
        let access = access::Access::new(
            listener.local_addr()?,
            &options.hosts,
            tls.is_some(),
            options.login_file,
        )?;
        Ok(WebView {
            listener,
            tls,
            access: Arc::new(access),
        })
    }

    /// Serve until `shutdown`.
    pub async fn serve(
        self,
        engine: Arc<Engine>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let app = Router::new()
            .route("/", get(index))
            .route("/rollouts/{id}", get(rollout))
            .route("/audit", get(audit))
            .route("/metrics", get(metrics))
            .route("/live", get(|| async { "ok\n" }))
            .route("/ready", get(ready))
            .with_state(engine)
            // Runs for every request, also one no route matches (`/login`
            // is answered there).
            .layer(axum::middleware::from_fn_with_state(self.access, access::guard))
            .into_make_service_with_connect_info::<Peer>();
        match self.tls {
            Some(config) => {
                axum::serve(incoming::tls(self.listener, config)?, app)
                    .with_graceful_shutdown(shutdown)
                    .await?;
            }
            None => {
                axum::serve(incoming::plain(self.listener)?, app)
                    .with_graceful_shutdown(shutdown)
                    .await?;
            }
        }
        Ok(())
    }
}

/// Escape text for HTML.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

const STYLE: &str = "
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:10px 24px;display:flex;gap:24px;align-items:baseline}
header a{color:#cfd8e6;text-decoration:none}header b{font-size:16px}
main{padding:18px 24px;max-width:1400px}
h1{font-size:20px;margin:4px 0 12px}h2{font-size:16px;margin:22px 0 8px}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0001;margin-bottom:8px}
th,td{padding:5px 10px;border-bottom:1px solid #e6e8ec;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;background:#dfe3ea}
.s-completed,.s-healthy,.s-confirmed{background:#cdeccf;color:#145a1c}
.s-running,.s-baking{background:#cfe3fb;color:#0f4c8a}
.s-halted,.s-failed,.s-refused,.s-aborted{background:#f9d0cc;color:#8a1a0f}
.s-succeeded{background:#e3f3d5;color:#3b6b12}.s-awaiting_approval,.s-paused{background:#fbecc5;color:#7a5600}
.s-untouched,.s-pending{background:#eceef1;color:#596273}
.halt{background:#fde8e6;border-left:4px solid #c0392b;padding:8px 12px;margin:10px 0}
.ok{background:#e5f5e6;border-left:4px solid #2e8b3a;padding:8px 12px;margin:10px 0}
.grid td{min-width:110px}.cell{padding:4px 6px;border-radius:6px}
.muted{color:#6b7385;font-size:12px}pre{background:#1d2330;color:#e8ecf3;padding:8px;max-height:220px;overflow:auto;margin:0;font-size:12px}
";

fn page(title: &str, body: &str) -> Html<String> {
    page_refreshing(title, body, None)
}

/// A page that reloads itself every `refresh` seconds (a rollout that is
/// still moving).
fn page_refreshing(title: &str, body: &str, refresh: Option<u32>) -> Html<String> {
    let meta = refresh.map_or(String::new(), |s| format!("<meta http-equiv=refresh content={s}>"));
    Html(format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8>{meta}<title>{} — wavegate</title><style>{STYLE}</style></head>\
         <body><header><b>wavegate</b><a href=\"/\">Rollouts</a><a href=\"/audit\">Audit log</a><a href=\"/metrics\">Metrics</a></header>\
         <main>{body}</main></body></html>",
        esc(title)
    ))
}

fn badge(state: &str) -> String {
    format!("<span class=\"badge s-{0}\">{0}</span>", esc(state))
}

async fn index(State(engine): State<Arc<Engine>>) -> Html<String> {
    let mut b = String::from(
        "<h1>Rollouts</h1><table><tr><th>Rollout</th><th>Plan</th><th>State</th><th>Waves</th><th>Hosts healthy</th><th>Submitted by</th><th>Approved by</th></tr>",
    );
    for e in engine.list().await {
        let r = &e.rollout;
        let healthy = e.hosts.values().filter(|h| h.state.as_str() == "healthy").count();
        let failed = e.hosts.values().filter(|h| h.state.as_str() == "failed").count();
        let state = match failed {
            n if n > 0 && r.state == wavegate_domain::rollout::RolloutState::Completed => {
                format!("{} <span class=muted>{n} failed</span>", badge(r.state.as_str()))
            }
            _ => badge(r.state.as_str()),
        };
        let _ = write!(
            b,
            "<tr><td><a href=\"/rollouts/{id}\">{id}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{healthy} / {}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.plan_name),
            state,
            r.waves.len(),
            e.hosts.len(),
            esc(&r.submitter),
            esc(&r.approvals.iter().map(|a| a.who.clone()).collect::<Vec<_>>().join(", ")),
            id = esc(&r.id),
        );
    }
    b.push_str("</table>");
    // What changes hosts outside every canary, as their agents reported.
    let mut reported: Vec<(String, Vec<wavegate_domain::updaters::Updater>)> = engine
        .hub()
        .all_updaters()
        .into_iter()
        .filter(|(_, l)| !l.is_empty())
        .collect();
    reported.sort_by(|a, b| a.0.cmp(&b.0));
    if !reported.is_empty() {
        let _ = write!(
            b,
            "<h2>Updaters outside the rollout</h2><p class=muted>{} host(s) change on their own schedule, outside every canary.</p>\
             <table><tr><th>Host</th><th>Kind</th><th>What</th><th>Evidence</th><th>Held by</th></tr>",
            reported.len()
        );
        for (host, list) in &reported {
            for u in list {
                let _ = write!(
                    b,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
                    esc(host),
                    esc(u.kind.as_str()),
                    esc(&u.what),
                    esc(&u.evidence),
                    esc(u.held_by.as_deref().unwrap_or("—"))
                );
            }
        }
        b.push_str("</table>");
    }
    page("Rollouts", &b)
}

fn rollout_body(e: &Entry) -> String {
    let r = &e.rollout;
    let mut b = format!(
        "<h1>Rollout {} — {} {}</h1>",
        esc(&r.id),
        esc(&r.plan_name),
        badge(r.state.as_str())
    );
    if let Some(reason) = &r.halt_reason {
        let _ = write!(b, "<div class=halt><b>Halted:</b> {}</div>", esc(reason));
    }
    let failed = wavegate_domain::rollout::failed_hosts(e.hosts.values());
    if let Some(note) = wavegate_domain::rollout::failed_note(&failed)
        && r.state == wavegate_domain::rollout::RolloutState::Completed
    {
        let _ = write!(b, "<div class=halt><b>Completed with {}</b></div>", esc(&note));
    }
    let _ = write!(
        b,
        "<table><tr><th>Plan hash</th><td><code>{}</code></td></tr><tr><th>Inventory hash</th><td><code>{}</code></td></tr>\
         <tr><th>Submitted by</th><td>{}</td></tr><tr><th>Approvals</th><td>{} of {} ({})</td></tr>\
         <tr><th>On failure</th><td>{}</td></tr><tr><th>Bake</th><td>{} ms, checks every {} ms</td></tr></table>",
        esc(&r.plan_hash),
        esc(&r.inventory_hash),
        esc(&r.submitter),
        r.approvals.len(),
        r.approvals_required,
        esc(&r.approvals.iter().map(|a| a.who.clone()).collect::<Vec<_>>().join(", ")),
        r.on_failure.as_str(),
        r.bake_ms,
        r.interval_ms
    );
    b.push_str("<h2>Waves</h2><table class=grid>");
    for w in &r.waves {
        let at_work = w.in_flight(&e.hosts);
        let _ = write!(
            b,
            "<tr><th>Wave {}<br>{}<br><span class=muted>{at_work}/{} at once</span>{}</th>",
            w.index,
            badge(w.state.as_str()),
            w.max_in_flight(),
            match (w.waiting(), w.windows.is_empty()) {
                (Some(why), _) => format!("<br><span class=muted>{}</span>", esc(&why)),
                (None, false) => format!(
                    "<br><span class=muted>windows: {}</span>",
                    esc(&w.window_lines().join("; "))
                ),
                (None, true) => String::new(),
            }
        );
        for id in &w.hosts {
            let Some(h) = e.hosts.get(id) else { continue };
            let snap = h.snapshot.as_ref().map(|s| s.state.as_str()).unwrap_or("none");
            let _ = write!(
                b,
                "<td title=\"{}\"><div class=\"cell s-{}\"><b>{}</b><br>{}<br><span class=muted>snapshot {}{}</span></div></td>",
                esc(&h.detail),
                h.state.as_str(),
                esc(&h.host),
                match e.activity.get(id) {
                    Some(doing) => format!("{} ({doing})", h.state.as_str()),
                    None => h.state.as_str().to_owned(),
                },
                snap,
                if h.rolled_back { " · rolled back" } else { "" }
            );
        }
        b.push_str("</tr>");
    }
    b.push_str("</table>");
    let mut dry: Vec<(&str, &wavegate_domain::effects::DryRunRecord)> =
        r.dry_runs.iter().map(|d| ("submit", d)).collect();
    for h in e.hosts.values() {
        dry.extend(h.dry_runs.iter().map(|d| ("before step", d)));
    }
    b.push_str("<h2>Dry-run reports</h2><table><tr><th>When</th><th>Host</th><th>Step</th><th>Verdict</th><th>Deleted</th><th>Modified</th><th>Created</th><th>Outside the write set</th></tr>");
    for (phase, d) in dry {
        let (del, modi, cre, outside) = match &d.report {
            Some(rep) => (
                format!("{} files", rep.deleted.count),
                rep.modified.count.to_string(),
                rep.created.count.to_string(),
                if rep.outside.count == 0 {
                    "—".to_string()
                } else {
                    format!(
                        "{} ({} files deleted): {}",
                        rep.outside.count,
                        rep.outside_deleted.count,
                        esc(&rep.outside.sample.join(", "))
                    )
                },
            ),
            None => ("?".into(), "?".into(), "?".into(), esc(&d.reasons.join("; "))),
        };
        let _ = write!(
            b,
            "<tr><td>{phase}</td><td>{}</td><td>{}</td><td>{}</td><td>{del}</td><td>{modi}</td><td>{cre}</td><td>{outside}</td></tr>",
            esc(&d.host),
            esc(&d.step),
            badge(if d.blocked { "refused" } else { "healthy" })
                .replace(">refused<", ">blocked<")
                .replace(">healthy<", ">ok<")
        );
    }
    b.push_str("</table><h2>Hosts</h2><table><tr><th>Host</th><th>Wave</th><th>State</th><th>Snapshot</th><th>Last step</th><th>Output</th></tr>");
    for h in e.hosts.values() {
        let snap = match &h.snapshot {
            Some(s) => format!(
                "{} · {} bytes{}",
                s.state.as_str(),
                s.bytes,
                match s.state {
                    SnapshotState::Retained { release_after_ms } => format!(" · until {}", utc(release_after_ms)),
                    _ => String::new(),
                }
            ),
            None => "none".into(),
        };
        let (step, out) = match h.results.last() {
            Some(s) => (
                format!(
                    "{} {} · exit {} · {} ms{}<br><span class=muted>sha256 {}</span>",
                    esc(&s.step),
                    esc(&s.outcome),
                    s.exit_code,
                    s.duration_ms,
                    if s.replayed { " · replayed" } else { "" },
                    esc(&s.output_sha256)
                ),
                if s.output_tail.is_empty() {
                    "<span class=muted>(no output)</span>".to_string()
                } else {
                    format!("<pre>{}</pre>", esc(&s.output_tail))
                },
            ),
            None => ("—".into(), String::new()),
        };
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}<br><span class=muted>{}</span></td><td>{}</td><td>{step}</td><td>{out}</td></tr>",
            esc(&h.host),
            h.wave + 1,
            badge(h.state.as_str()),
            esc(&h.detail),
            esc(&snap)
        );
    }
    b.push_str("</table><h2>Events</h2><table>");
    for ev in &r.events {
        let _ = write!(b, "<tr><td>{}</td></tr>", esc(ev));
    }
    b.push_str("</table>");
    b
}

async fn rollout(State(engine): State<Arc<Engine>>, Path(id): Path<String>) -> Response {
    match engine.show(&engine.full_id(&id)).await {
        Ok(e) => {
            let moving = matches!(
                e.rollout.state,
                RolloutState::Running | RolloutState::Paused | RolloutState::AwaitingApproval
            );
            let body = format!("{}{}", rollout_body(&e), output_section(&engine, &e).await);
            page_refreshing(&format!("Rollout {id}"), &body, moving.then_some(2)).into_response()
        }
        Err(_) => (
            StatusCode::NOT_FOUND,
            page("Not found", &format!("<h1>No rollout {}</h1>", esc(&id))),
        )
            .into_response(),
    }
}

/// The last output of every host's steps and checks.
async fn output_section(engine: &Arc<Engine>, e: &Entry) -> String {
    const SHOWN: u64 = 8 << 10;
    let mut b = String::from("<h2>Output</h2>");
    let mut any = false;
    for h in e.hosts.values() {
        let store = engine.store();
        let (rid, host) = (e.rollout.id.clone(), h.host.clone());
        let Ok(ends) = store.output_ends(rid.clone(), host.clone()).await else {
            continue;
        };
        // Pieces are at most 32 KiB: starting that far before the last
        // SHOWN bytes reads them all.
        let from = ends
            .iter()
            .map(|(s, end)| ((host.clone(), s.clone()), end.saturating_sub(SHOWN + (32 << 10))))
            .collect();
        let q = crate::store::OutputQuery {
            rollout: rid,
            host: Some(host),
            step: None,
            from,
            max_bytes: 4 << 20,
        };
        let Ok(pieces) = store.read_output(q).await else {
            continue;
        };
        for (step, end) in ends {
            let mut text = Vec::new();
            for p in pieces.iter().filter(|p| p.step == step) {
                text.extend_from_slice(&p.data);
            }
            let keep = text.len().saturating_sub(SHOWN as usize);
            let shown = String::from_utf8_lossy(&text[keep..]);
            any = true;
            let _ = write!(
                b,
                "<h3>{} — {} <span class=muted>({end} bytes; <code>wavegate rollout logs {} {}</code> for all)</span></h3><pre>{}</pre>",
                esc(&h.host),
                esc(&step),
                esc(&e.rollout.id),
                esc(&h.host),
                esc(&shown)
            );
        }
    }
    if !any {
        b.push_str("<p class=muted>No output yet.</p>");
    }
    b
}

async fn audit(State(engine): State<Arc<Engine>>) -> Response {
    let store = engine.store();
    let Ok((records, cp)) = store.audit().await else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "the audit log cannot be read").into_response();
    };
    let verdict = crate::store::verdict(&records, cp.as_ref(), &store.public_key());
    let key = hex::encode(store.public_key().to_bytes());
    let mut b = String::from("<h1>Audit log</h1>");
    match verdict {
        Ok(n) => {
            let _ = write!(
                b,
                "<div class=ok><b>Verified:</b> {n} records, hash chain intact, checkpoint signed by <code>{key}</code></div>"
            );
        }
        Err(t) => {
            let _ = write!(b, "<div class=halt><b>TAMPERED:</b> {}</div>", esc(&t.to_string()));
        }
    }
    b.push_str(
        "<table><tr><th>#</th><th>Time</th><th>Kind</th><th>Rollout</th><th>Host</th><th>Who</th><th>What</th></tr>",
    );
    for r in records.iter().rev() {
        let Some(body) = &r.body else { continue };
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            r.seq,
            utc(r.at_ms),
            esc(&body.kind),
            esc(body.rollout.as_deref().unwrap_or("")),
            esc(body.host.as_deref().unwrap_or("")),
            esc(body.actor.as_deref().unwrap_or("")),
            esc(&body.text)
        );
    }
    b.push_str("</table>");
    page("Audit log", &b).into_response()
}

async fn metrics(State(engine): State<Arc<Engine>>) -> Response {
    let m = engine.metrics();
    m.rollouts.reset();
    let (states, pinned) = engine
        .rollup(|e| {
            let pinned = e
                .hosts
                .values()
                .filter_map(|h| h.snapshot.as_ref())
                .filter(|s| s.state == SnapshotState::Pinned)
                .map(|s| s.bytes)
                .sum::<u64>();
            (e.rollout.state, pinned)
        })
        .into_iter()
        .fold((Vec::new(), 0u64), |(mut v, p), (state, bytes)| {
            v.push(state);
            (v, p + bytes)
        });
    for state in states {
        m.rollouts.with_label_values(&[state.as_str()]).inc();
    }
    for s in [
        "awaiting_approval",
        "running",
        "paused",
        "halted",
        "completed",
        "aborted",
        "refused",
    ] {
        let _ = m.rollouts.get_metric_with_label_values(&[s]);
    }
    m.snapshot_pinned_bytes.set(pinned as i64);
    m.agents_connected.set(engine.hub().connected().len() as i64);
    let reported = engine.hub().all_updaters();
    for kind in wavegate_domain::updaters::UpdaterKind::ALL {
        let hosts = reported
            .values()
            .filter(|list| list.iter().any(|u| u.kind == kind && u.active()))
            .count();
        m.hosts_with_updaters
            .with_label_values(&[kind.as_str()])
            .set(hosts as i64);
    }
    if let Ok(n) = engine.store().audit_len().await {
        m.audit_records.set(n as i64);
    }
    ([("content-type", "text/plain; version=0.0.4")], m.render()).into_response()
}

/// Ready or not; why not only to someone let in (the reasons name the
/// store and the other controllers).
async fn ready(State(engine): State<Arc<Engine>>, viewer: Option<Extension<Viewer>>) -> Response {
    let why = match readiness(&engine).await {
        Ok(()) => return (StatusCode::OK, "ready\n").into_response(),
        Err(why) => why,
    };
    let body = match viewer {
        Some(_) => format!("{why}\n"),
        None => "not ready\n".to_owned(),
    };
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}

async fn readiness(engine: &Engine) -> Result<(), String> {
    if let Some(why) = engine.store_failure() {
        return Err(why);
    }
    engine.leadership().may_act()?;
    engine.leading().map_err(|e| e.to_string())?;
    match engine.store().audit_len().await {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("the store cannot be read: {e:#}")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_markup() {
        assert_eq!(
            super::esc("<a href='x'>&</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&lt;/a&gt;"
        );
    }

    #[test]
    fn states_have_styles() {
        for s in [
            wavegate_domain::rollout::RolloutState::Refused,
            wavegate_domain::rollout::RolloutState::Halted,
        ] {
            assert!(super::STYLE.contains(&format!(".s-{}", s.as_str())));
        }
    }
}
