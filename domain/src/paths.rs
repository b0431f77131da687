//! Whether one host path lies within another: the one rule every part of
//! wavegate uses (write sets, untouchable paths, policies, snapshots,
//! mounts), so that a path is never inside for one of them and outside
//! for another.
//!
//! Paths are absolute and normalised (no `.`, `..`, doubled or trailing
//! slashes; the plan checker and the agent refuse any other). The test is
//! by whole components: `/srv/www` is within `/srv` and within itself, not
//! within `/sr` or `/srv/w`; `/` holds every path.

/// Whether `path` is `base` or below it, by whole components.
pub fn within(path: &str, base: &str) -> bool {
    within_bytes(path.as_bytes(), base.as_bytes())
}

/// [`within`] for paths as raw bytes (file names need not be UTF-8).
pub fn within_bytes(path: &[u8], base: &[u8]) -> bool {
    if base == b"/" {
        return path.first() == Some(&b'/');
    }
    path == base || (path.starts_with(base) && path.get(base.len()) == Some(&b'/'))
}

/// Whether `path` is within any of `bases`.
pub fn within_any<S: AsRef<str>>(path: &str, bases: &[S]) -> bool {
    bases.iter().any(|b| within(path, b.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_whole_components() {
        assert!(within("/srv/www", "/srv"));
        assert!(within("/srv", "/srv"));
        assert!(!within("/srv", "/srv/www"), "a parent is not within its child");
        assert!(!within("/srvx", "/srv"), "a prefix is not a component");
        assert!(!within("/srv/w", "/srv/www"));
        assert!(within_bytes(b"/home/a\xff/x", b"/home/a\xff"));
        assert!(!within_bytes(b"/home/a\xff", b"/home/a"));
    }

    #[test]
    fn the_root_holds_every_path() {
        // It did not for the plan checker, the policies and the snapshot
        // coverage check, while the agent's mount and file code said it did.
        assert!(within("/etc/passwd", "/"));
        assert!(within("/", "/"));
        assert!(!within("relative", "/"));
        assert!(within_any("/var/cache/x", &["/srv", "/var/cache"]));
        assert!(!within_any::<&str>("/var", &[]));
    }
}
