//! Crash points for the fault tests. With `WAVEGATE_FAILPOINT=<name>` in
//! its environment the controller stops dead at that point (it says so on
//! stderr and never goes on), so a test can SIGKILL it at a known state
//! transition and restart it on the same data. Without the variable, a
//! point costs one load of a cached value. Never set it in production.
//!
//! With `WAVEGATE_FAILPOINT_ONCE=<file>` as well, only the first process to
//! reach the point stops there (it creates the file): a standby that takes
//! over from a controller frozen at a point goes through it.

#[cfg(feature = "failpoints")]
use std::sync::OnceLock;

/// Every point, in the order a rollout meets them.
pub const POINTS: &[&str] = &[
    "submit-dry-run-done",
    "submit-committed",
    "approval-committed",
    "wave-start-committed",
    "step-persisted",
    "reboot-pending",
    "bake-committed",
    "wave-confirmed",
    "halt-committed",
    "rollback-restored",
];

#[cfg(feature = "failpoints")]
fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var("WAVEGATE_FAILPOINT").ok().filter(|p| !p.is_empty()))
        .as_deref()
}

/// Whether this process is the first to reach the armed point (always,
/// unless `WAVEGATE_FAILPOINT_ONCE` names a file another one created).
#[cfg(feature = "failpoints")]
fn first_to_reach() -> bool {
    match std::env::var_os("WAVEGATE_FAILPOINT_ONCE") {
        None => true,
        Some(f) => std::fs::OpenOptions::new().write(true).create_new(true).open(f).is_ok(),
    }
}

/// Stop here for good if this point is armed: the whole process stops
/// (SIGSTOP), so no other task moves on either; the test then kills it.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    debug_assert!(POINTS.contains(&name), "unknown failpoint {name}");
    if armed() == Some(name) && first_to_reach() {
        use std::io::Write as _;
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "wavegate: failpoint `{name}` reached; stopping to be killed");
        let _ = err.flush();
        loop {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
        }
    }
}

/// Without the `failpoints` feature (the deployed build) a point is
/// nothing: no environment variable can stop a production controller.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(name: &str) {
    debug_assert!(POINTS.contains(&name), "unknown failpoint {name}");
}
