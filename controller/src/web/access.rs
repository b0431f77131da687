//! Who may read the web view. Tools present a client certificate from the
//! controller's CA with an operator role (Prometheus scrapes with an auditor
//! one); a person's browser comes in through a login link with a one-time
//! token, printed when `serve` starts (as Jupyter does), which it trades for
//! a session cookie. Every request also names a `Host` the view serves
//! (which defeats DNS rebinding), and every response carries the security
//! headers. Only `/live` and `/ready` answer anyone, and they say nothing
//! but whether the controller is alive and ready.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::incoming::{ClientCert, Peer};
use crate::tls::{Identity, Role};

/// How long a browser session lasts after its login.
pub const SESSION: Duration = Duration::from_secs(12 * 60 * 60);

/// Paths that answer without authentication: they reveal nothing but
/// whether the controller is alive and ready.
const OPEN: [&str; 2] = ["/live", "/ready"];

/// The security headers of every response.
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Someone the web view let in, as a request extension.
#[derive(Clone, Debug)]
pub struct Viewer(pub String);

/// What decides who may read the web view.
pub struct Access {
    tls: bool,
    /// Every `Host` value the view answers to, lowercase.
    hosts: Vec<String>,
    /// The session cookie's name (with the port: cookies are shared across
    /// the ports of one host, and a lab runs several controllers).
    cookie: String,
    /// `https://NAME` for the login links.
    base: String,
    login_file: Option<PathBuf>,
    state: Mutex<Logins>,
}

/// The current login token and the live sessions, each by its SHA-256.
struct Logins {
    token: [u8; 32],
    sessions: HashMap<[u8; 32], Instant>,
}

/// What a request's credentials amount to.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// In, as this.
    Allowed(String),
    /// A certificate from the CA that may not read the view.
    Forbidden,
    /// No certificate and no live session.
    Anonymous,
}

impl Access {
    /// Access for the view bound at `local`, also answering to `names`
    /// (`--web-host`, already checked by [`host_name`]): makes the first
    /// login token, writes its link to `login_file` and prints it.
    pub fn new(local: SocketAddr, names: &[String], tls: bool, login_file: Option<PathBuf>) -> Result<Access> {
        let port = local.port();
        let mut hosts = vec![local.to_string(), format!("localhost:{port}")];
        if local.ip().is_unspecified() || local.ip().is_loopback() {
            hosts.extend([format!("127.0.0.1:{port}"), format!("[::1]:{port}")]);
        }
        for n in names {
            let n = n.to_ascii_lowercase();
            if has_port(&n) {
                hosts.push(n);
            } else {
                hosts.extend([format!("{n}:{port}"), n]);
            }
        }
        hosts.sort();
        hosts.dedup();
        let name = match names.first() {
            Some(n) if has_port(n) => n.clone(),
            Some(n) => format!("{n}:{port}"),
            None if local.ip().is_unspecified() => format!("localhost:{port}"),
            None => local.to_string(),
        };
        let access = Access {
            tls,
            hosts,
            cookie: format!("wavegate-web-{port}"),
            base: format!("{}://{name}", if tls { "https" } else { "http" }),
            login_file,
            state: Mutex::new(Logins {
                token: [0; 32],
                sessions: HashMap::new(),
            }),
        };
        let mut logins = access.logins().context("the login state")?;
        access.next_token(&mut logins)?;
        drop(logins);
        Ok(access)
    }

    fn logins(&self) -> Result<std::sync::MutexGuard<'_, Logins>> {
        // A poisoned lock means a panic mid-change: refuse rather than guess.
        self.state
            .lock()
            .map_err(|_| anyhow::anyhow!("the web view's login state is damaged"))
    }

    /// Make a new login token (the old one stops working), write its link
    /// to the login file and print it.
    fn next_token(&self, logins: &mut Logins) -> Result<()> {
        let token = hex::encode(rand::random::<[u8; 32]>());
        logins.token = sha256(token.as_bytes());
        let link = format!("{}/login?token={token}", self.base);
        eprintln!("wavegate serve: the web view's login link (works once; the next one follows its use): {link}");
        if let Some(f) = &self.login_file {
            write_private(f, &format!("{link}\n"))
                .with_context(|| format!("writing the web view's login link to {}", f.display()))?;
        }
        Ok(())
    }

    fn host_ok(&self, req: &Request) -> bool {
        let mut hosts = req.headers().get_all(header::HOST).iter();
        let (Some(host), None) = (hosts.next(), hosts.next()) else {
            return false;
        };
        let Ok(host) = host.to_str() else { return false };
        let known = |h: &str| self.hosts.iter().any(|k| k.eq_ignore_ascii_case(h));
        known(host) && req.uri().authority().is_none_or(|a| known(a.as_str()))
    }

    fn decide(&self, cert: &ClientCert, headers: &HeaderMap) -> Decision {
        match cert {
            ClientCert::Identity(Identity::Operator { name, role, .. }) => match role {
                Role::Submitter | Role::Approver | Role::Admin | Role::Auditor => {
                    return Decision::Allowed(format!("{name} ({})", role.as_str()));
                }
            },
            ClientCert::Identity(Identity::Agent(_)) | ClientCert::Unnamed => return Decision::Forbidden,
            ClientCert::Absent => {}
        }
        let Some(id) = cookie(headers, &self.cookie) else {
            return Decision::Anonymous;
        };
        let Ok(mut logins) = self.logins() else {
            return Decision::Anonymous;
        };
        let now = Instant::now();
        match logins.sessions.get(&sha256(id.as_bytes())) {
            Some(until) if *until > now => Decision::Allowed("a login-link session".into()),
            Some(_) => {
                logins.sessions.retain(|_, until| *until > now);
                Decision::Anonymous
            }
            None => Decision::Anonymous,
        }
    }

    /// `GET /login?token=T[&next=/path]`: a good token is used up, starts a
    /// session and sends the browser on to `next`.
    fn login(&self, uri: &Uri, peer: &Peer) -> Response {
        let query = uri.query().unwrap_or("");
        let given = param(query, "token").unwrap_or_default();
        let mut logins = match self.logins() {
            Ok(l) => l,
            Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        };
        if !same(&sha256(given.as_bytes()), &logins.token) {
            tracing::info!(peer = %peer.addr, "A web view login with a wrong or used-up token was refused.");
            return (StatusCode::UNAUTHORIZED, LOGIN_REFUSED).into_response();
        }
        // The token is used up whether or not the next link can be written.
        if let Err(e) = self.next_token(&mut logins) {
            tracing::error!(error = %format!("{e:#}"), "The next login link is only in this log.");
        }
        let now = Instant::now();
        logins.sessions.retain(|_, until| *until > now);
        let session = hex::encode(rand::random::<[u8; 32]>());
        logins.sessions.insert(sha256(session.as_bytes()), now + SESSION);
        drop(logins);
        tracing::info!(peer = %peer.addr, "A web view login link was used; a session started.");
        let next = param(query, "next")
            .filter(|n| local_path(n))
            .unwrap_or_else(|| "/".into());
        let cookie = format!(
            "{}={session}; Max-Age={}; Path=/; HttpOnly; SameSite=Strict{}",
            self.cookie,
            SESSION.as_secs(),
            if self.tls { "; Secure" } else { "" }
        );
        let mut resp = StatusCode::SEE_OTHER.into_response();
        // Both are checked ASCII; a failure would only drop the header.
        if let (Ok(c), Ok(l)) = (HeaderValue::from_str(&cookie), HeaderValue::from_str(&next)) {
            resp.headers_mut().insert(header::SET_COOKIE, c);
            resp.headers_mut().insert(header::LOCATION, l);
        }
        resp
    }

    fn headers(&self, resp: &mut Response, localhost: bool) {
        let h = resp.headers_mut();
        for (k, v) in [
            ("content-security-policy", CSP),
            ("x-content-type-options", "nosniff"),
            ("x-frame-options", "DENY"),
            ("referrer-policy", "no-referrer"),
            ("cache-control", "no-store"),
        ] {
            h.insert(k, HeaderValue::from_static(v));
        }
        // HSTS pins a host name, not a port: on `localhost` it would turn
        // every other local development server to https for a year.
        // Browsers ignore it on IP addresses anyway.
        if self.tls && !localhost {
            h.insert(
                header::STRICT_TRANSPORT_SECURITY,
                HeaderValue::from_static("max-age=31536000"),
            );
        }
    }
}

const UNAUTHENTICATED: &str = "401 Unauthorized: log in first.

People: open the login link the controller printed when it started (in its
log, and in the file given to `serve --web-login-file`; a lab writes it to
lab.json as \"web_login\"). A link works once; the next one is printed and
written to the same file when it is used.

Tools: present a client certificate from the wavegate CA with an operator
or auditor role, e.g.
  curl --cacert ca.pem --cert auditor.pem --key auditor.key https://HOST:PORT/metrics
";

const LOGIN_REFUSED: &str = "401 Unauthorized: this login link is wrong or used up.

Each link works once. The controller prints the next one when a link is
used (in its log and in the file given to `serve --web-login-file`);
restarting `wavegate serve` prints a new one too.
";

const FORBIDDEN: &str = "403 Forbidden: this certificate does not open the web view.

Use an operator or auditor certificate from the wavegate CA, or a login link.
";

const MISDIRECTED: &str = "421 Misdirected Request: this web view does not answer to that name.

Use the address the controller listens on, localhost, or a name given to
`serve --web-host`.
";

/// The middleware in front of every route.
pub async fn guard(
    State(access): State<Arc<Access>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_owned();
    let open = OPEN.contains(&path.as_str());
    let localhost = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| h.eq_ignore_ascii_case("localhost") || h.to_ascii_lowercase().starts_with("localhost:"));
    let decision = access.decide(&peer.cert, req.headers());
    let mut resp = if open {
        // Details (why not ready) only for someone let in.
        if let Decision::Allowed(who) = decision
            && access.host_ok(&req)
        {
            req.extensions_mut().insert(Viewer(who));
        }
        next.run(req).await
    } else if !access.host_ok(&req) {
        (StatusCode::MISDIRECTED_REQUEST, MISDIRECTED).into_response()
    } else {
        match decision {
            Decision::Forbidden => (StatusCode::FORBIDDEN, FORBIDDEN).into_response(),
            _ if path == "/login" => access.login(req.uri(), &peer),
            Decision::Allowed(who) => {
                req.extensions_mut().insert(Viewer(who));
                next.run(req).await
            }
            Decision::Anonymous => (StatusCode::UNAUTHORIZED, UNAUTHENTICATED).into_response(),
        }
    };
    access.headers(&mut resp, localhost);
    resp
}

/// Check a `--web-host` value: a DNS name or an IP address, with or
/// without a port.
pub fn host_name(s: &str) -> Result<String, String> {
    let bad = || {
        format!(
            "`{s}` is not a host name; give a DNS name or an IP address, optionally with :PORT (like wavegate.example.net or 10.0.0.5:7080)"
        )
    };
    let (name, port) = match s.strip_prefix('[') {
        Some(rest) => {
            let (ip, after) = rest.split_once(']').ok_or_else(bad)?;
            ip.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
            match after {
                "" => (s, None),
                p => (s, Some(p.strip_prefix(':').ok_or_else(bad)?)),
            }
        }
        None => match s.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (s, None),
        },
    };
    if let Some(p) = port
        && p.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(bad());
    }
    let name_ok = name.starts_with('[')
        || (!name.is_empty()
            && name.len() <= 253
            && name
                .split('.')
                .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')));
    if !name_ok {
        return Err(bad());
    }
    Ok(s.to_ascii_lowercase())
}

fn has_port(name: &str) -> bool {
    match name.strip_prefix('[') {
        Some(rest) => rest.contains("]:"),
        None => name.contains(':'),
    }
}

/// A value of the cookie `name`, if it looks like one of our session ids.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, v)| *k == name && v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|(_, v)| v.to_owned())
}

/// The decoded value of `key` in a query string.
fn param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| percent_decode(v))
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'+' => b' ',
            b'%' => {
                let hi = (bytes.next()? as char).to_digit(16)?;
                let lo = (bytes.next()? as char).to_digit(16)?;
                (hi * 16 + lo) as u8
            }
            b => b,
        });
    }
    String::from_utf8(out).ok()
}

/// Whether `next` may be redirected to: a path on this server, never a
/// scheme-relative `//host` or a `/\host` that browsers read as one.
fn local_path(next: &str) -> bool {
    next.starts_with('/') && !next.starts_with("//") && next.bytes().all(|b| b.is_ascii_graphic() && b != b'\\')
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Compare without stopping at the first difference.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Write `text` to `path` readable by its owner only, replacing it whole.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(dir: &Path) -> Access {
        let local: SocketAddr = "127.0.0.1:7080".parse().expect("addr");
        Access::new(local, &["wg.example.net".into()], true, Some(dir.join("login"))).expect("access")
    }

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wavegate-web-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    fn peer() -> Peer {
        Peer {
            addr: "127.0.0.1:5000".parse().expect("addr"),
            cert: ClientCert::Absent,
        }
    }

    #[test]
    fn a_login_link_works_once_and_its_cookie_opens_the_view() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempdir("login");
        let a = access(&dir);
        let file = dir.join("login");
        assert_eq!(
            std::fs::metadata(&file).expect("login file").permissions().mode() & 0o777,
            0o600
        );
        let link = std::fs::read_to_string(&file).expect("link").trim().to_owned();
        assert!(link.starts_with("https://wg.example.net:7080/login?token="), "{link}");
        let uri: Uri = format!("{}&next=/rollouts/r1", &link[link.find("/login").expect("path")..])
            .parse()
            .expect("uri");
        let resp = a.login(&uri, &peer());
        assert_eq!(resp.status(), StatusCode::SEE_OTHER);
        assert_eq!(resp.headers()[header::LOCATION], "/rollouts/r1");
        let set = resp.headers()[header::SET_COOKIE].to_str().expect("ascii").to_owned();
        for part in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
            assert!(set.contains(part), "{set}");
        }
        assert_eq!(a.login(&uri, &peer()).status(), StatusCode::UNAUTHORIZED, "used up");
        let next = std::fs::read_to_string(&file).expect("link").trim().to_owned();
        assert_ne!(next, link, "a fresh link for the next person");

        let mut headers = HeaderMap::new();
        let pair = set.split(';').next().expect("pair").to_owned();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("other=1; {pair}")).expect("ascii"),
        );
        assert!(matches!(a.decide(&ClientCert::Absent, &headers), Decision::Allowed(_)));
        let forged = format!("wavegate-web-7080={}", "0".repeat(64));
        headers.insert(header::COOKIE, HeaderValue::from_str(&forged).expect("ascii"));
        assert_eq!(a.decide(&ClientCert::Absent, &headers), Decision::Anonymous);
        assert_eq!(a.decide(&ClientCert::Absent, &HeaderMap::new()), Decision::Anonymous);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn certificates_decide_before_cookies() {
        let dir = tempdir("certs");
        let a = access(&dir);
        let auditor = ClientCert::Identity(Identity::Operator {
            name: "eve".into(),
            role: Role::Auditor,
        });
        assert_eq!(
            a.decide(&auditor, &HeaderMap::new()),
            Decision::Allowed("eve (auditor)".into())
        );
        let agent = ClientCert::Identity(Identity::Agent("h1".into()));
        assert_eq!(a.decide(&agent, &HeaderMap::new()), Decision::Forbidden);
        assert_eq!(a.decide(&ClientCert::Unnamed, &HeaderMap::new()), Decision::Forbidden);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_local_paths_are_followed() {
        for ok in ["/", "/rollouts/r1", "/audit?x=1"] {
            assert!(local_path(ok), "{ok}");
        }
        for bad in [
            "",
            "//evil.example",
            "/\\evil.example",
            "https://evil.example",
            "/a b",
            "/\u{e9}",
        ] {
            assert!(!local_path(bad), "{bad}");
        }
        assert_eq!(param("a=1&next=%2F%2Fevil&token=ab", "next").as_deref(), Some("//evil"));
        assert_eq!(param("next=%zz", "next"), None);
    }

    #[test]
    fn host_names_are_checked() {
        for ok in [
            "wg.example.net",
            "WG.example.net:8443",
            "10.0.0.5",
            "10.0.0.5:7080",
            "[::1]:7080",
            "[fe80::1]",
        ] {
            assert!(host_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a/b",
            "a b",
            "x:0",
            "x:99999",
            "x:",
            "[::1",
            "[nope]:1",
            "évil",
            "a..b",
            "user@host",
        ] {
            assert!(host_name(bad).is_err(), "{bad}");
        }
    }
}
