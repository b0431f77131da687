//! `wavegate agent install --ssh` against a real sshd on loopback that this
//! test starts (its own configuration, host key and authorized key, all in
//! the lab directory): the agent is copied, started and confirmed connected;
//! a changed host key is refused. Needs root and openssh-server (installed
//! by scripts/test).

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use wavegate_tests::lab::{Lab, eventually};

fn keygen(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("pub"));
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen")
        .success();
    assert!(ok);
}

struct Sshd(Child);

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sshd(dir: &Path, port: u16) -> Sshd {
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {ak}\nPidFile {pid}\n\
             StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\n",
            hk = dir.join("host_key").display(),
            ak = dir.join("authorized_keys").display(),
            pid = dir.join("sshd.pid").display(),
        ),
    )
    .expect("sshd_config");
    let child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("sshd.log")).expect("log"))
        .spawn()
        .expect("sshd (package openssh-server, installed by scripts/test)");
    eventually(Duration::from_secs(10), "sshd to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
    });
    Sshd(child)
}

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn an_agent_is_installed_over_ssh_and_a_changed_host_key_is_refused() {
    let lab = Lab::up("ssh", "lab-fleet.yaml");
    let dir = lab.dir.join("ssh");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    keygen(&dir.join("id"));
    keygen(&dir.join("host_key"));
    std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys")).expect("authorized_keys");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let known = |host_pub: &Path| {
        let key = std::fs::read_to_string(host_pub).expect("host key");
        std::fs::write(dir.join("known_hosts"), format!("[127.0.0.1]:{port} {key}")).expect("known_hosts");
    };
    known(&dir.join("host_key.pub"));
    std::fs::write(
        dir.join("ssh_config"),
        format!(
            "Host lab-host\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n",
            dir.join("id").display(),
            dir.join("known_hosts").display()
        ),
    )
    .expect("ssh_config");
    let mut server = sshd(&dir, port);

    // s2's lab agent goes away; the installer puts a new one in its place.
    let _ = lab.kill9(&["wavegate-agent", "--host-id", "s2"], "exec-step");
    let remote = dir.join("remote-root");
    let install = |remote: &Path| {
        lab.wavegate_as(
            "admin",
            &[
                "agent",
                "install",
                "--ssh",
                "lab-host",
                "--ssh-config",
                dir.join("ssh_config").to_str().expect("path"),
                "--host-id",
                "s2",
                "--certs",
                lab.dir.join("certs").to_str().expect("path"),
                "--remote-root",
                remote.to_str().expect("path"),
                "--start",
                "nohup",
                "--wait",
                "30s",
            ],
        )
    };
    let run = install(&remote);
    assert_eq!(
        run.status,
        0,
        "install failed:\n{}\n{}\nsshd log:\n{}",
        run.stdout,
        run.stderr,
        std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
    );
    assert!(
        run.stdout
            .contains("agent s2 on lab-host is connected to the controller"),
        "{}",
        run.stdout
    );
    let key = remote.join("etc/wavegate-agent/agent.key");
    assert_eq!(
        std::fs::metadata(&key).expect("key").permissions().mode() & 0o777,
        0o600
    );
    assert!(remote.join("usr/local/bin/wavegate-agent").exists());

    // The host is "reinstalled" with a new host key: the installer refuses.
    drop(server);
    keygen(&dir.join("host_key"));
    server = sshd(&dir, port);
    let before = std::fs::metadata(remote.join("usr/local/bin/wavegate-agent"))
        .expect("bin")
        .modified()
        .expect("mtime");
    let run = install(&remote);
    assert_eq!(
        run.status, 3,
        "a changed host key must be refused:\n{}\n{}",
        run.stdout, run.stderr
    );
    assert!(run.stderr.contains("host key"), "{}", run.stderr);
    let after = std::fs::metadata(remote.join("usr/local/bin/wavegate-agent"))
        .expect("bin")
        .modified()
        .expect("mtime");
    assert_eq!(before, after, "nothing was copied to a host whose key changed");

    // An unreachable host is named as such.
    drop(server);
    let run = install(&remote);
    assert_eq!(run.status, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("cannot reach") || run.stderr.contains("ssh to"),
        "{}",
        run.stderr
    );
}
