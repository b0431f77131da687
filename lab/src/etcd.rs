//! A 3-member etcd cluster of a test's or a benchmark's own, on loopback
//! ports the kernel picked, started and stopped with `scripts/etcd-cluster`
//! (Debian's etcd-server; `scripts/test` installs it). The HA tests, the
//! store benchmark and the load generator all start theirs here.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// A running cluster; stopped when dropped.
pub struct EtcdCluster {
    /// Its directory (members' data and logs).
    pub dir: PathBuf,
    /// The store URL: `etcd://127.0.0.1:A,127.0.0.1:B,127.0.0.1:C`.
    pub url: String,
    /// The members' client ports, in order.
    pub client_ports: Vec<u16>,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/etcd-cluster")
}

fn free_ports(n: usize) -> Result<Vec<u16>> {
    // Held together so that the kernel hands out distinct ones.
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()
        .context("finding free loopback ports")?;
    held.iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect::<std::io::Result<_>>()
        .context("finding free loopback ports")
}

impl EtcdCluster {
    /// Start three members for test `name`, in the temporary directory.
    pub fn start(name: &str) -> Result<EtcdCluster> {
        let dir = std::env::temp_dir().join(format!("wavegate-etcd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        EtcdCluster::start_in(dir)
    }

    /// A cluster whose clients must use mutual TLS: a CA of its own in
    /// `dir/tls/` (`ca.pem`), a server certificate for 127.0.0.1, and a
    /// client certificate (`client.pem`, `client.key`) the members accept.
    pub fn start_tls(name: &str) -> Result<EtcdCluster> {
        let dir = std::env::temp_dir().join(format!("wavegate-etcd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls)?;
        let script = r#"set -euo pipefail
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
key ca.key
openssl req -x509 -new -key ca.key -out ca.pem -days 2 -subj /CN=wavegate-test-etcd-ca
for who in server client; do
  key $who.key
  openssl req -new -key $who.key -out $who.csr -subj /CN=$who
  printf 'subjectAltName=IP:127.0.0.1
extendedKeyUsage=serverAuth,clientAuth
' > $who.ext
  openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -out $who.pem -extfile $who.ext 2>/dev/null
done"#;
        let out = Command::new("bash")
            .args(["-c", script])
            .current_dir(&tls)
            .output()
            .context("openssl")?;
        if !out.status.success() {
            bail!(
                "making the test etcd's certificates:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        EtcdCluster::start_in(dir)
    }

    /// Start three members with their data and logs in `dir`.
    pub fn start_in(dir: PathBuf) -> Result<EtcdCluster> {
        if Command::new("etcd").arg("--version").output().is_err() {
            bail!("no etcd binary: install Debian's etcd-server (scripts/test does)");
        }
        let ports = free_ports(6)?;
        let list = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        let out = Command::new(script())
            .arg("start")
            .arg(&dir)
            .arg(&list)
            .output()
            .context("running scripts/etcd-cluster")?;
        if !out.status.success() {
            bail!(
                "scripts/etcd-cluster start failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let url = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_owned();
        Ok(EtcdCluster {
            dir,
            url,
            client_ports: vec![ports[0], ports[2], ports[4]],
        })
    }

    fn run(&self, args: &[&str]) -> Result<()> {
        let status = Command::new(script())
            .args(&args[..1])
            .arg(&self.dir)
            .args(&args[1..])
            .status()
            .context("running scripts/etcd-cluster")?;
        if !status.success() {
            bail!("etcd-cluster {args:?} failed");
        }
        Ok(())
    }

    /// SIGKILL member `n` (1..=3).
    pub fn kill(&self, n: usize) -> Result<()> {
        self.run(&["kill", &n.to_string()])
    }

    /// Start member `n` again on its data.
    pub fn start_member(&self, n: usize) -> Result<()> {
        self.run(&["start-member", &n.to_string()])
    }

    /// The client address of member `n`.
    pub fn member(&self, n: usize) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.client_ports[n - 1]))
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).status();
        // etcd preallocates its write-ahead log (over 100 MiB a member):
        // keep the members' logs of a failed test only.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
