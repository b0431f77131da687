//! Helpers for tests that drive the built `wavegate` binary from outside, the
//! way an operator or an external test suite does.

#![forbid(unsafe_code)]

/// The tests' local etcd clusters (shared with the benchmarks and the load
/// generator).
pub use wavegate_lab::etcd;
pub mod lab;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A fixture file under `tests/fixtures/`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(rel)
}

/// The `wavegate` binary: `$WAVEGATE_BIN`, or the one cargo built next to this
/// test (`cargo test --workspace` builds it, because the controller crate has
/// integration tests of its own).
pub fn wavegate_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WAVEGATE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/wavegate
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let bin = profile_dir.join("wavegate");
    assert!(
        bin.exists(),
        "{} does not exist: run `cargo build --workspace` first, or set WAVEGATE_BIN",
        bin.display()
    );
    bin
}

/// What a run of the binary gave.
#[derive(Debug)]
pub struct Run {
    /// Exit status (-1 when killed by a signal).
    pub status: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Standard output as JSON; panics with both streams when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr))
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            status: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Run `wavegate` with `args` from the repository root, with no inherited
/// `WAVEGATE_*` settings.
pub fn wavegate<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(wavegate_bin());
    cmd.args(args).current_dir(repo_root());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("WAVEGATE_") {
            cmd.env_remove(k);
        }
    }
    cmd.output().expect("run wavegate").into()
}

/// A local HTTP server that answers 200 to every request and hands on
/// each request body it gets (a webhook receiver); returns its port.
pub fn webhook_receiver() -> (u16, std::sync::mpsc::Receiver<String>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut r = std::io::BufReader::new(conn.try_clone().expect("clone"));
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                if std::io::BufRead::read_line(&mut r, &mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            let _ = std::io::Read::read_exact(&mut r, &mut body);
            let mut c = conn;
            let _ = std::io::Write::write_all(
                &mut c,
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            if tx.send(String::from_utf8_lossy(&body).into_owned()).is_err() {
                break;
            }
        }
    });
    (port, rx)
}
