//! Secrets in output, masked before they leave the host.
//!
//! A step that prints `/etc/shadow`, a private key or a database password
//! must not show it to the submitter, store it in the audit log or serve it
//! on the web view. The agent masks every line of a command's output before
//! any of it is sent, stored or hashed: the built-in patterns (private key
//! blocks, password hashes, `PASSWORD=`-style assignments) and the site's
//! own (`kind: redact` policy rules). Masking keeps every byte's place: a
//! secret's bytes become `*`, so offsets and sizes of stored output stay
//! true and the agent's SHA-256 is of exactly what the controller stores.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};

use regex::bytes::{Regex, RegexSet};

/// The built-in patterns: a match (its first group, when it has one) is
/// masked.
pub const DEFAULT_PATTERNS: &[&str] = &[
    // crypt(3) password hashes, as in /etc/shadow, and the web's: Apache's
    // apr1, phpass (WordPress), argon2, pbkdf2.
    r"(\$(?:1|2[abxy]?|5|6|y|gy|7|sha1|md5|apr1|P|H|argon2(?:id|i|d)|pbkdf2(?:-sha\d+)?)\$[A-Za-z0-9./$=+,-]{8,})",
    // LDAP-style hashes ({SSHA}...) and MySQL's native ones (*HEX).
    r"(\{(?:SSHA|SHA|SMD5|MD5|CRYPT|SSHA256|SSHA512)\}[A-Za-z0-9+/=$.]{8,})",
    r"(?:^|[\s:=])(\*[0-9A-F]{40})\b",
    // HTTP credentials.
    r"(?i)authorization:\s*(?:bearer|basic|token)\s+([A-Za-z0-9._~+/=-]+)",
    // `--password X`, `--password=X`, `-pX` for mysql.
    r"(?i)--(?:password|passwd|pass|token|secret)[= ]([^\s'\x22]+)",
    r"(?:^|\s)mysql(?:dump|admin)?\b[^\n]*?\s-p([^\s'\x22]+)",
    // `password=...`, `DB_PASSWORD: ...`, `api_key = ...`, `token: ...`.
    r#"(?i)(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key)[A-Za-z0-9_.-]*["']?\s*[:=]\s*("[^"]*"|'[^']*'|[^\s"',;]+)"#,
    // A URL's credentials: scheme://user:password@host.
    r"[a-z][a-z0-9+.-]*://[^/\s:@]+:([^/\s@]+)@",
];

/// A line-by-line masker, with the state a private key block spans.
#[derive(Clone, Debug)]
pub struct Redactor {
    /// The site's patterns.
    extra: Arc<[String]>,
    /// Compiled when the first line is masked (see [`Redactor::lazy`]).
    compiled: OnceLock<Arc<Compiled>>,
    in_key: bool,
    /// After output was skipped (a key block may have begun in it): lines
    /// that look like a key's base64 are masked until one that does not.
    suspicious: bool,
}

/// The patterns, compiled once per process for each set of site patterns:
/// compiling them took a tenth of an agent's CPU when it was done for every
/// command (and again in each of its processes).
#[derive(Debug)]
struct Compiled {
    patterns: Vec<Regex>,
    /// All of them at once: most lines match none, and one pass says so.
    any: RegexSet,
}

/// Compiled pattern sets by the site patterns they add; a handful at most
/// (one per policy set a controller has sent), so the cache starts over
/// rather than grow past a few.
static COMPILED: LazyLock<Mutex<HashMap<Vec<String>, Arc<Compiled>>>> = LazyLock::new(Mutex::default);

fn compiled(extra: &[String]) -> Result<Arc<Compiled>, String> {
    let mut cache = COMPILED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(c) = cache.get(extra) {
        return Ok(Arc::clone(c));
    }
    let all: Vec<&str> = DEFAULT_PATTERNS
        .iter()
        .copied()
        .chain(extra.iter().map(String::as_str))
        .collect();
    let mut patterns = Vec::new();
    for p in &all {
        patterns.push(Regex::new(p).map_err(|e| format!("redact pattern `{p}`: {e}"))?);
    }
    let any = RegexSet::new(&all).map_err(|e| format!("redact patterns: {e}"))?;
    let c = Arc::new(Compiled { patterns, any });
    if cache.len() >= 8 {
        cache.clear();
    }
    cache.insert(extra.to_vec(), Arc::clone(&c));
    Ok(c)
}

impl Redactor {
    /// The built-in patterns and the site's `extra`. A site pattern that is
    /// not a valid regular expression is an error (policy files are checked
    /// when they are loaded; an agent refuses a command that carries one).
    pub fn new(extra: &[String]) -> Result<Redactor, String> {
        let r = Redactor::lazy(extra);
        let c = compiled(extra)?;
        let _ = r.compiled.set(c);
        Ok(r)
    }

    /// [`Redactor::new`] for patterns already checked (the agent checks a
    /// command's when it comes): compiled only when there is a line to
    /// mask, so a step's short-lived processes that print nothing never
    /// compile them. Should they not compile after all, the built-in
    /// patterns mask.
    pub fn lazy(extra: &[String]) -> Redactor {
        Redactor {
            extra: extra.into(),
            compiled: OnceLock::new(),
            in_key: false,
            suspicious: false,
        }
    }

    fn compiled(&self) -> &Compiled {
        self.compiled.get_or_init(|| {
            compiled(&self.extra)
                .or_else(|_| compiled(&[]))
                .expect("the built-in patterns compile (a test checks them)")
        })
    }

    /// The same masker for output that resumes after a gap.
    #[must_use]
    pub fn after_gap(mut self) -> Redactor {
        self.in_key = false;
        self.suspicious = true;
        self
    }

    /// Mask one line in place (with or without its newline).
    pub fn line(&mut self, line: &mut [u8]) {
        let text = &*line;
        let dashes = text.contains(&b'-') && contains(text, b"-----");
        let begin = if dashes {
            find_marker(text, b"-----BEGIN ")
        } else {
            None
        };
        let end = if dashes { find_marker(text, b"-----END ") } else { None };
        match (begin, end) {
            // A whole key on one line (a JSON service account, a key in an
            // environment variable): everything between the markers.
            (Some(b), Some(e)) if e > b => {
                mask(line, b, e);
                self.in_key = false;
                return;
            }
            (Some(b), _) => {
                // What follows the marker on its line is key material too.
                self.in_key = true;
                mask(line, b, line.len());
                return;
            }
            (None, Some(e)) => {
                mask(line, 0, e);
                self.in_key = false;
                return;
            }
            (None, None) => {}
        }
        if self.in_key {
            mask(line, 0, line.len());
            return;
        }
        if self.suspicious {
            let body: Vec<u8> = line.iter().copied().filter(|c| !c.is_ascii_whitespace()).collect();
            if body.len() >= 16 && body.iter().all(|c| c.is_ascii_alphanumeric() || b"+/=".contains(c)) {
                mask(line, 0, line.len());
                return;
            }
            self.suspicious = false;
        }
        let c = self.compiled();
        let hits = c.any.matches(line);
        if !hits.matched_any() {
            return;
        }
        let mut spans = Vec::new();
        for re in hits.iter().map(|i| &c.patterns[i]) {
            for c in re.captures_iter(line) {
                let m = c.get(1).or_else(|| c.get(0));
                if let Some(m) = m {
                    spans.push((m.start(), m.end()));
                }
            }
        }
        for (a, b) in spans {
            mask(line, a, b);
        }
    }

    /// Mask a whole buffer, line by line.
    pub fn all(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = data.to_vec();
        let mut start = 0;
        while start < out.len() {
            let end = out[start..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(out.len(), |i| start + i + 1);
            self.line(&mut out[start..end]);
            start = end;
        }
        out
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Where a PEM marker of a private key ends on a line (`-----BEGIN
/// OPENSSH PRIVATE KEY-----` or `-----END RSA PRIVATE KEY-----`), as the
/// offset just past it (BEGIN) or at its start (END).
fn find_marker(text: &[u8], head: &[u8]) -> Option<usize> {
    let at = text.windows(head.len()).position(|w| w == head)?;
    let rest = &text[at..];
    let close = rest[head.len()..].windows(5).position(|w| w == b"-----")? + head.len() + 5;
    if !contains(&rest[..close], b"PRIVATE KEY") {
        return None;
    }
    Some(if head == b"-----BEGIN " { at + close } else { at })
}

/// `*` over `line[a..b]`, newlines kept.
fn mask(line: &mut [u8], a: usize, b: usize) {
    for c in &mut line[a..b] {
        if *c != b'\n' && *c != b'\r' {
            *c = b'*';
        }
    }
}

/// Masks output that arrives in pieces: only whole lines are masked and
/// given back; the rest waits for its newline (or the end).
#[derive(Clone, Debug)]
pub struct Stream {
    r: Redactor,
    pending: Vec<u8>,
    /// After a gap the first (partial) line is masked whole: its start,
    /// with what made it a secret, was skipped.
    partial_first: bool,
}

/// A line longer than this is masked and given back as it is.
pub const MAX_LINE: usize = 64 * 1024;

impl Stream {
    /// A stream masked by `r`.
    pub fn new(r: Redactor) -> Stream {
        let partial_first = r.suspicious;
        Stream {
            r,
            pending: Vec::new(),
            partial_first,
        }
    }

    /// Take a piece; give back what is masked so far (whole lines).
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(data);
        let cut = match self.pending.iter().rposition(|&c| c == b'\n') {
            Some(i) => i + 1,
            None if self.pending.len() > MAX_LINE => self.pending.len(),
            None => return Vec::new(),
        };
        let rest = self.pending.split_off(cut);
        let mut done = std::mem::replace(&mut self.pending, rest);
        if self.partial_first {
            self.partial_first = false;
            let first = done.iter().position(|&c| c == b'\n').map_or(done.len(), |i| i + 1);
            mask(&mut done, 0, first);
        }
        if cut == done.len() && done.last() != Some(&b'\n') {
            // A line longer than MAX_LINE: its cut may split a secret, so
            // the whole piece is masked, and so is the rest of the line.
            mask(&mut done, 0, cut);
            self.partial_first = true;
            return done;
        }
        self.r.all(&done)
    }

    /// The end: what is left, masked.
    pub fn finish(&mut self) -> Vec<u8> {
        let done = std::mem::take(&mut self.pending);
        self.r.all(&done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(text: &str) -> String {
        String::from_utf8(Redactor::new(&[]).expect("patterns").all(text.as_bytes())).expect("utf-8")
    }

    #[test]
    fn shadow_hashes_keys_and_passwords_are_masked_in_place() {
        let shadow = "root:$6$saltsalt$9yJ1Cu1j3cwyG7zGP0UyC1Y8q4gWpUuXnV8oLX0:19000:0:99999:7:::\n";
        let out = masked(shadow);
        assert!(out.starts_with("root:*****"), "{out}");
        assert!(out.ends_with(":19000:0:99999:7:::\n"), "{out}");
        assert_eq!(out.len(), shadow.len());
        let env = "DB_PASSWORD=hunter2 other=1\npassword: \"s3cret words\"\napi_key = abc123\n";
        let out = masked(env);
        assert!(
            !out.contains("hunter2") && !out.contains("s3cret") && !out.contains("abc123"),
            "{out}"
        );
        assert!(out.contains("other=1"), "{out}");
        let key = "before\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\nQUJDREVG\n-----END OPENSSH PRIVATE KEY-----\nafter\n";
        let out = masked(key);
        assert!(
            !out.contains("b3BlbnNzaC1rZXktdjEAAAAA") && !out.contains("QUJDREVG"),
            "{out}"
        );
        assert!(
            out.contains("before") && out.contains("after") && out.contains("-----END"),
            "{out}"
        );
        assert!(masked("postgres://app:pw1234@db/x\n").contains("app:******@db"));
        let one = "{\"private_key\": \"-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADAN\\n-----END PRIVATE KEY-----\\n\"}\nnext line\n";
        let out = masked(one);
        assert!(!out.contains("MIIEvQIBADAN"), "{out}");
        assert!(
            out.contains("next line"),
            "one line's key does not mask what follows: {out}"
        );
        for secret in [
            "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.abc\n",
            "$P$BsecretPHPASShash0123\n",
            "$apr1$salty$Kx0fYbsecretHash\n",
            "mysql -u root -pTopSecret1 db\n",
            "--password=TopSecret2\n",
            "{SSHA}c2VjcmV0c2VjcmV0\n",
        ] {
            let out = masked(secret);
            assert!(
                ![
                    "eyJhbGciOiJIUzI1NiJ9",
                    "BsecretPHPASS",
                    "Kx0fYbsecret",
                    "TopSecret1",
                    "TopSecret2",
                    "c2VjcmV0c2Vj"
                ]
                .iter()
                .any(|s| out.contains(s)),
                "{secret:?} -> {out:?}"
            );
        }
        assert_eq!(masked("nothing here\n"), "nothing here\n");
    }

    #[test]
    fn a_key_split_across_pieces_is_masked_all_the_same() {
        let text = "x\n-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\nSECRETLINE\n-----END RSA PRIVATE KEY-----\nPASSWORD=abcdef\n";
        let mut s = Stream::new(Redactor::new(&[]).expect("patterns"));
        let mut out = Vec::new();
        for piece in text.as_bytes().chunks(7) {
            out.extend(s.push(piece));
        }
        out.extend(s.finish());
        let out = String::from_utf8(out).expect("utf-8");
        assert_eq!(out.len(), text.len());
        assert!(
            !out.contains("MIIEpAIBAAKCAQEA") && !out.contains("SECRETLINE") && !out.contains("abcdef"),
            "{out}"
        );
        assert_eq!(out, masked(text), "pieces and a whole give the same");
    }

    #[test]
    fn site_patterns_add_to_the_built_in_ones_and_bad_ones_are_refused() {
        let mut r = Redactor::new(&["customer-[0-9]{4}".into()]).expect("patterns");
        let out = String::from_utf8(r.all(b"customer-1234 ok\n")).expect("utf-8");
        assert_eq!(out, "************* ok\n");
        assert!(Redactor::new(&["(".into()]).is_err());
    }
}
