//! A step that tries to leave its sandbox, in its dry-run (at submit, before
//! anyone approved it) and in its confined real run (after approval). Each
//! escape is one the old chroot-with-every-capability allowed: a chroot
//! climb to the machine's real root, mknod of a block device and a write to
//! a loop device the test made, a mount (a read-only view remounted
//! writable, a bind mount out of the write set), `open_by_handle_at`,
//! ptrace of a process outside, and a write through `/proc/<pid>/root` of a
//! process outside. Each must fail, change nothing outside, and say what
//! was refused in the step's output. Needs root (namespaces, loop devices),
//! python3 and util-linux; `scripts/test` installs them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use sha2::{Digest as _, Sha256};
use wavegate_agent::exec::{run_step_once, run_supervised};
use wavegate_agent::journal::{Job, Journal, Mode, Stored};
use wavegate_agent::sandbox::{DryStep, StepReport};

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wavegate-agent"))
}

/// A host root like a lab's: its own etc, srv, tmp, dev and proc, the
/// machine's system directories (bound read-only by the runner).
struct Host {
    base: PathBuf,
    root: PathBuf,
    state: PathBuf,
}

impl Host {
    fn new(name: &str) -> Host {
        let base = std::env::temp_dir().join(format!("wavegate-escape-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("root");
        for d in ["etc/app", "srv/site", "tmp", "run", "dev", "proc", "sys", "mnt"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        for d in ["usr", "bin", "sbin", "lib", "lib64"] {
            let machine = Path::new("/").join(d);
            match std::fs::read_link(&machine) {
                Ok(t) => std::os::unix::fs::symlink(t, root.join(d)).expect("symlink"),
                Err(_) if machine.is_dir() => std::fs::create_dir_all(root.join(d)).expect("mkdir"),
                Err(_) => {}
            }
        }
        std::fs::write(root.join("etc/app/app.conf"), "setting = 1\n").expect("write");
        std::fs::write(root.join("srv/site/index.html"), "<h1>site</h1>\n").expect("write");
        let state = base.join("state");
        std::fs::create_dir_all(state.join("scratch")).expect("state");
        Host { base, root, state }
    }

    /// A file on the machine, outside the host root: where an escape lands.
    fn machine_marker(&self, what: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("wavegate-escaped-{what}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    async fn dry_run(&self, run: &str) -> (StepReport, String) {
        let mut job = Job::new("dry", "", 0, &self.root, Mode::DryRun);
        job.steps = vec![DryStep {
            name: "escape".into(),
            run: run.into(),
            writes: vec!["/srv/site".into()],
            max_deletions: 0,
            timeout_ms: 20_000,
            allow_failure: Some("the escape is expected to fail".into()),
            ..DryStep::default()
        }];
        let r = run_supervised(&exe(), &self.state.join("scratch"), &job)
            .await
            .expect("dry-run");
        assert!(!r.report.is_empty(), "no report: {}", r.detail);
        let mut reports: Vec<StepReport> = serde_json::from_str(&r.report).expect("report");
        (reports.remove(0), String::from_utf8_lossy(&r.output_tail).into_owned())
    }

    async fn confined(&self, id: &str, run: &str) -> (Stored, String) {
        let journal = Journal::open(&self.state).expect("journal");
        let mut job = Job::new(id, run, 20_000, &self.root, Mode::Confined);
        job.writes = vec!["/srv/site".into()];
        let r = run_step_once(&exe(), &journal, job).await.expect("run").0;
        let out = String::from_utf8_lossy(&r.output_tail).into_owned();
        (r, out)
    }

    fn host_tree(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
                let p = e.path();
                let rel = p.strip_prefix(&self.root).expect("rel").display().to_string();
                if ["usr", "bin", "sbin", "lib", "lib64", "dev", "proc", "sys", "tmp"].contains(&rel.as_str()) {
                    continue;
                }
                let m = p.symlink_metadata().expect("meta");
                if m.is_dir() {
                    out.push((rel, Vec::new()));
                    stack.push(p);
                } else if m.is_file() {
                    out.push((rel, std::fs::read(&p).expect("read")));
                } else {
                    out.push((rel, b"(other)".to_vec()));
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.base);
        }
    }
}

/// A process outside every sandbox, ended when this goes.
struct Outside(Child);

impl Outside {
    fn start() -> Outside {
        Outside(Command::new("sleep").arg("60").spawn().expect("sleep"))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `devices:` line a step printed.
fn devices(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("devices: "))
        .unwrap_or_default()
        .to_owned()
}

fn refused(out: &str) -> bool {
    out.contains("Operation not permitted") || out.contains("ermission denied") || out.contains("not permitted")
}

/// The classic chroot escape: chroot into a subdirectory, climb with `..`
/// past the top, chroot there, and write to the machine's own /tmp.
fn chroot_escape(marker: &Path) -> String {
    format!(
        "python3 -c '\nimport os\nos.makedirs(\"/srv/site/jail\", exist_ok=True)\nfd = os.open(\"/\", os.O_RDONLY)\nos.chroot(\"/srv/site/jail\")\nos.fchdir(fd)\nfor _ in range(64): os.chdir(\"..\")\nos.chroot(\".\")\nopen(\"{}\", \"w\").write(\"escaped\")\nprint(\"wrote it\")\n'",
        marker.display()
    )
}

#[tokio::test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
async fn a_chroot_escape_stays_in_the_sandbox_at_submit_and_in_the_real_run() {
    let h = Host::new("chroot");
    let marker = h.machine_marker("chroot");
    let (report, out) = h.dry_run(&chroot_escape(&marker)).await;
    assert!(
        !marker.exists(),
        "the dry-run escaped to the machine: {out} {report:#?}"
    );
    let (_, out) = h.confined("c1", &chroot_escape(&marker)).await;
    assert!(!marker.exists(), "the confined run escaped to the machine: {out}");
}

/// A loop device over an image the test made: the step tries to write it
/// through a device node it makes, and through the machine's /dev.
#[tokio::test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
async fn a_step_cannot_make_a_block_device_or_write_a_loop_device() {
    let h = Host::new("blk");
    let img = h.base.join("disk.img");
    std::fs::write(&img, vec![0x5a; 1 << 20]).expect("image");
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&img)
        .output()
        .expect("losetup");
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(dev.starts_with("/dev/loop"), "losetup: {out:?}");
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _d = Detach(dev.clone());
    let rdev = std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(&dev).expect("stat"));
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let before = Sha256::digest(std::fs::read(&img).expect("read"));
    let run = format!(
        "mknod /tmp/blk b {major} {minor} && dd if=/dev/zero of=/tmp/blk bs=4096 count=4 conv=notrunc; \
         dd if=/dev/zero of={dev} bs=4096 count=4 conv=notrunc; echo \"devices: $(ls /dev | tr '\\n' ' ')\""
    );
    let (report, out) = h.dry_run(&run).await;
    assert_eq!(
        Sha256::digest(std::fs::read(&img).expect("read")),
        before,
        "the dry-run wrote the disk: {out}"
    );
    assert!(refused(&out), "the refusal is not named: {out}\n{report:#?}");
    assert!(
        devices(&out).contains("null") && !devices(&out).contains("loop"),
        "the sandbox's /dev: {out}"
    );
    let (_, out) = h.confined("b1", &run).await;
    assert_eq!(
        Sha256::digest(std::fs::read(&img).expect("read")),
        before,
        "the confined run wrote the disk: {out}"
    );
    assert!(refused(&out), "the refusal is not named: {out}");
    assert!(
        devices(&out).contains("null") && !devices(&out).contains("loop"),
        "the confined run's /dev: {out}"
    );
}

#[tokio::test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
async fn a_step_cannot_mount_not_even_to_make_its_read_only_view_writable() {
    let h = Host::new("mount");
    let before = h.host_tree();
    let run = "mount -t tmpfs none /mnt; mount -o remount,rw,bind /etc; echo pwned > /etc/escaped; \
               mount --bind /etc /srv/site/etc && echo pwned > /srv/site/etc/escaped-too";
    let (report, out) = h.dry_run(run).await;
    assert!(refused(&out), "mount was not refused at submit: {out}\n{report:#?}");
    assert_eq!(h.host_tree(), before, "the dry-run changed the host");
    let (_, out) = h.confined("m1", run).await;
    assert!(refused(&out), "mount was not refused in the real run: {out}");
    assert!(
        !h.root.join("etc/escaped").exists(),
        "the confined run made /etc writable: {out}"
    );
    assert!(
        !h.root.join("etc/escaped-too").exists(),
        "a bind mount let it write /etc: {out}"
    );
}

const BY_HANDLE: &str = "python3 -c '\nimport ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nbuf = ctypes.create_string_buffer(8 + 128)\nctypes.c_uint.from_buffer(buf, 0).value = 128\nmid = ctypes.c_int()\nr = libc.name_to_handle_at(-100, b\"/etc/app/app.conf\", buf, ctypes.byref(mid), 0)\nprint(\"name_to_handle_at\", r, os.strerror(ctypes.get_errno()))\nfd = libc.open_by_handle_at(os.open(\"/\", os.O_RDONLY), buf, os.O_RDONLY)\nprint(\"open_by_handle_at\", fd, os.strerror(ctypes.get_errno()))\n'";

#[tokio::test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
async fn open_by_handle_at_is_refused() {
    let h = Host::new("handle");
    let (_, out) = h.dry_run(BY_HANDLE).await;
    assert!(
        out.contains("open_by_handle_at -1 Operation not permitted"),
        "open_by_handle_at was not refused at submit: {out}"
    );
    let (_, out) = h.confined("h1", BY_HANDLE).await;
    assert!(
        out.contains("open_by_handle_at -1 Operation not permitted"),
        "open_by_handle_at was not refused in the real run: {out}"
    );
}

#[tokio::test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
async fn a_step_cannot_trace_or_write_through_a_process_outside() {
    let h = Host::new("ptrace");
    let outside = Outside::start();
    let pid = outside.pid();
    let marker = h.machine_marker("procroot");
    let run = format!(
        "python3 -c '\nimport ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nr = libc.ptrace(16, {pid}, 0, 0)\nimport os\nprint(\"ptrace\", r, os.strerror(ctypes.get_errno()))\n'; \
         echo pwned > /proc/{pid}/root{}; ls /proc/{pid}/root/ >/dev/null 2>&1 && echo sees-outside",
        marker.display()
    );
    let (_, out) = h.dry_run(&run).await;
    assert!(
        out.contains("ptrace -1"),
        "ptrace reached a process outside at submit: {out}"
    );
    assert!(
        !marker.exists() && !out.contains("sees-outside"),
        "the dry-run reached the machine through /proc: {out}"
    );
    let (_, out) = h.confined("p1", &run).await;
    assert!(
        out.contains("ptrace -1"),
        "ptrace reached a process outside in the real run: {out}"
    );
    assert!(
        !marker.exists() && !out.contains("sees-outside"),
        "the confined run reached the machine through /proc/{pid}/root: {out}"
    );
}

/// Landlock: a write out of the write set through a symlink or `..` is
/// refused by the kernel, whatever the mounts say.
#[tokio::test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
async fn a_confined_write_through_a_symlink_or_dotdot_out_of_the_write_set_fails() {
    let h = Host::new("links");
    let before = h.host_tree();
    let run = "ln -s /etc /srv/site/etc-link; echo pwned > /srv/site/etc-link/escaped; \
               echo pwned > /srv/site/../../etc/escaped-too; echo fine > /srv/site/ok; cat /proc/self/status | grep -i seccomp";
    let (r, out) = h.confined("l1", run).await;
    let mut after = h.host_tree();
    after.retain(|(p, _)| p != "srv/site/ok" && p != "srv/site/etc-link");
    assert_eq!(after, before, "the confined run wrote outside its write set: {out}");
    assert_eq!(
        std::fs::read_to_string(h.root.join("srv/site/ok")).ok().as_deref(),
        Some("fine\n"),
        "a write inside the write set must still work: {out} {r:?}"
    );
    assert!(
        out.contains("Seccomp:\t2"),
        "the step does not run under a seccomp filter: {out}"
    );
}

/// /sys is read-only all the way down: a cgroup made (or killed) through
/// it would reach every service of the machine.
#[tokio::test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
async fn a_step_cannot_write_to_sys_or_the_cgroups_under_it() {
    let h = Host::new("sys");
    let probe = Path::new("/sys/fs/cgroup/pids").join(format!("wavegate-escape-{}", std::process::id()));
    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _rm = Rm(probe.clone());
    if !Path::new("/sys/fs/cgroup/pids").is_dir() {
        eprintln!("skipped: this machine has no /sys/fs/cgroup/pids to try");
        return;
    }
    let run = format!("mkdir {} && echo made-a-cgroup", probe.display());
    let (_, out) = h.dry_run(&run).await;
    assert!(
        !probe.exists() && !out.contains("made-a-cgroup"),
        "the dry-run made a cgroup on the machine: {out}"
    );
    assert!(out.contains("Read-only file system"), "the refusal is not named: {out}");
    let (_, out) = h.confined("s1", &run).await;
    assert!(
        !probe.exists() && !out.contains("made-a-cgroup"),
        "the confined run made a cgroup on the machine: {out}"
    );
}
