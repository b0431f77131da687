//! A host root under a temporary directory with its own loop-mounted
//! filesystems (as `disks.rs` builds one), tenants that act as a bare
//! numeric uid through `setpriv`, and a listing of a tree that keeps names
//! byte for byte. Needs root, util-linux, e2fsprogs and btrfs-progs.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use wavegate_agent::snapshot::{self, BackendKind, Manifest};

/// The agent binary.
pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wavegate-agent"))
}

/// Run a shell command as root; it must succeed.
pub fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Bytes as text, one escape per byte that is not printable ASCII, so two
/// names that differ in any byte print differently.
pub fn esc(b: &[u8]) -> String {
    b.iter()
        .flat_map(|c| std::ascii::escape_default(*c))
        .map(char::from)
        .collect()
}

/// Files larger than this are listed by size, not read (a sparse 8 GB file,
/// a filler that fills a disk).
pub const BIG: u64 = 32 << 20;

/// One path of a tree: where, what (kind, size, link target, device), its
/// whole `st_mode` (type and permission bits), owner, and its bytes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Node {
    /// Host path, escaped byte for byte.
    pub path: String,
    /// `dir`, `file <len>`, `big <len>`, `link -> <target>`, `fifo`,
    /// `socket`, `chr <rdev>`, `blk <rdev>`.
    pub what: String,
    /// `st_mode`.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Content (files up to [`BIG`]).
    pub content: Vec<u8>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head: Vec<u8> = self.content.iter().take(24).copied().collect();
        write!(
            f,
            "{} [{} {:o} {}:{} \"{}\"]",
            self.path,
            self.what,
            self.mode,
            self.uid,
            self.gid,
            esc(&head)
        )
    }
}

/// The differences between two trees, one line each.
pub fn tree_diff(got: &[Node], want: &[Node]) -> Vec<String> {
    let mut lines = Vec::new();
    for w in want.iter().filter(|w| !got.contains(w)) {
        match got.iter().find(|g| g.path == w.path) {
            Some(g) => lines.push(format!("  changed: {g:?} (was {w:?})")),
            None => lines.push(format!("  missing: {w:?}")),
        }
    }
    for g in got.iter().filter(|g| !want.iter().any(|w| w.path == g.path)) {
        lines.push(format!("  unexpected: {g:?}"));
    }
    lines
}

/// Panic with the differences between two trees (a few of them, each on a
/// line) when they differ.
pub fn assert_same_tree(got: &[Node], want: &[Node], what: &str) {
    if got == want {
        return;
    }
    let mut lines = tree_diff(got, want);
    let n = lines.len();
    lines.truncate(8);
    panic!("{what}: {n} difference(s):\n{}", lines.join("\n"));
}

/// A host root with its own filesystems; everything is unmounted when it
/// goes, deepest first.
pub struct Host {
    /// The temporary directory holding everything.
    pub base: PathBuf,
    /// The host root.
    pub root: PathBuf,
    /// The agent's state directory.
    pub state: PathBuf,
    mounts: Vec<PathBuf>,
}

/// A host id for every snapshot these tests take.
pub const HOST: &str = "h1";

impl Host {
    /// A host root with `/etc` (a `passwd` and a `shadow` of known text),
    /// `/home` and `/tmp`. The root is a few directories down, so that no
    /// relative symlink a test plants can climb out of the base directory.
    pub fn new(name: &str) -> Host {
        let base = std::env::temp_dir().join(format!("wavegate-tenant-{name}-{}", std::process::id()));
        let _ = Command::new("sh")
            .args([
                "-c",
                &format!("umount -R {0}/host/root 2>/dev/null; rm -rf {0}", base.display()),
            ])
            .status();
        let root = base.join("host").join("root");
        for d in ["etc/app", "home", "tmp"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        for d in [&base, &base.join("host"), &root, &root.join("etc"), &root.join("home")] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let state = base.join("state");
        std::fs::create_dir_all(&state).expect("state");
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::create_dir_all(base.join("disks")).expect("disks");
        let h = Host {
            base,
            root,
            state,
            mounts: Vec::new(),
        };
        h.write_mode(
            "/etc/passwd",
            "root:x:0:0:root:/root:/bin/bash\nt1:x:2001:2001::/home/t1:/bin/sh\n",
            0o644,
        );
        h.write_mode(
            "/etc/shadow",
            "root:$6$known$hash:19000:0:99999:7:::\nt1:!:19000:0:99999:7:::\n",
            0o600,
        );
        h.write_mode("/etc/app/app.conf", "setting = 1\n", 0o644);
        h
    }

    /// A new filesystem of `fstype` (`ext4` or `btrfs`) at host path `at`.
    pub fn disk(&mut self, at: &str, fstype: &str, mb: u64) {
        let img = self
            .base
            .join("disks")
            .join(format!("{}.img", at.trim_start_matches('/').replace('/', "-")));
        sh(&format!("truncate -s {mb}M {}", img.display()));
        let mkfs = match fstype {
            "btrfs" => format!("mkfs.btrfs -q -f -M {} >/dev/null", img.display()),
            _ => format!("mkfs.ext4 -q -F {}", img.display()),
        };
        sh(&mkfs);
        let point = self.path(at);
        std::fs::create_dir_all(&point).expect("mount point");
        sh(&format!("mount -o loop {} {}", img.display(), point.display()));
        std::fs::set_permissions(&point, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        self.mounts.push(point);
    }

    /// A host path under the root.
    pub fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    /// A host path whose last part is raw bytes.
    pub fn path_bytes(&self, dir: &str, name: &[u8]) -> PathBuf {
        self.path(dir).join(OsStr::from_bytes(name))
    }

    /// Write a file (and its directories) as root.
    pub fn write(&self, p: &str, text: &str) {
        let full = self.path(p);
        std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
        std::fs::write(full, text).expect("write");
    }

    /// Write a file with a mode.
    pub fn write_mode(&self, p: &str, text: &str, mode: u32) {
        self.write(p, text);
        std::fs::set_permissions(self.path(p), std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// `chown -R uid:uid` a host path.
    pub fn chown(&self, p: &str, uid: u32) {
        sh(&format!("chown -R -h {uid}:{uid} {}", self.path(p).display()));
    }

    /// Tenants `t1`, `t2`, `t3` (uids 2001, 2002, 2003) under `/home`, each
    /// with a site and a mail directory.
    pub fn tenants(&self) {
        for (i, t) in ["t1", "t2", "t3"].iter().enumerate() {
            self.write_mode(&format!("/home/{t}/site/index.html"), &format!("<h1>{t}</h1>\n"), 0o644);
            self.write_mode(
                &format!("/home/{t}/site/app.php"),
                &format!("<?php echo '{t}';\n"),
                0o640,
            );
            self.write_mode(
                &format!("/home/{t}/Maildir/cur/1.eml"),
                &format!("From: a@{t}\n"),
                0o600,
            );
            std::os::unix::fs::symlink("site/index.html", self.path(&format!("/home/{t}/latest"))).expect("symlink");
            self.chown(&format!("/home/{t}"), 2001 + i as u32);
            std::fs::set_permissions(
                self.path(&format!("/home/{t}/Maildir")),
                std::fs::Permissions::from_mode(0o700),
            )
            .expect("chmod");
        }
    }

    /// Every path under host path `p` (itself included) with its kind, mode,
    /// owner and bytes, sorted; wavegate's btrfs snapshot holders left out.
    pub fn tree_of(&self, p: &str) -> Vec<Node> {
        let mut out = Vec::new();
        let top = self.path(p);
        if top.symlink_metadata().is_err() {
            return out;
        }
        let mut stack = vec![top];
        while let Some(full) = stack.pop() {
            let m = full.symlink_metadata().expect("lstat");
            let rel = full.strip_prefix(&self.root).expect("under the root");
            let path = format!("/{}", esc(rel.as_os_str().as_bytes()));
            let ft = m.file_type();
            let mut content = Vec::new();
            let what = if ft.is_dir() {
                for e in std::fs::read_dir(&full).expect("read_dir") {
                    let e = e.expect("dir entry");
                    if e.file_name().as_bytes().ends_with(b".wavegate-snapshots") {
                        continue;
                    }
                    stack.push(e.path());
                }
                "dir".to_owned()
            } else if ft.is_symlink() {
                let t = std::fs::read_link(&full).expect("readlink");
                format!("link -> {}", esc(t.as_os_str().as_bytes()))
            } else if ft.is_fifo() {
                "fifo".to_owned()
            } else if ft.is_socket() {
                "socket".to_owned()
            } else if ft.is_char_device() {
                format!("chr {:x}", m.rdev())
            } else if ft.is_block_device() {
                format!("blk {:x}", m.rdev())
            } else if m.len() > BIG {
                format!("big {}", m.len())
            } else {
                content = std::fs::read(&full).expect("read");
                format!("file {}", m.len())
            };
            out.push(Node {
                path,
                what,
                mode: m.mode(),
                uid: m.uid(),
                gid: m.gid(),
                content,
            });
        }
        out.sort();
        out
    }

    /// The whole host tree.
    pub fn tree(&self) -> Vec<Node> {
        self.tree_of("/")
    }

    /// The request for a snapshot of `writes`.
    pub fn take(&self, rollout: &str, writes: &[&str], force: Option<BackendKind>) -> anyhow::Result<Manifest> {
        let writes: Vec<String> = writes.iter().map(|w| (*w).to_owned()).collect();
        snapshot::take(&snapshot::Request {
            state_dir: &self.state,
            host: HOST,
            root: &self.root,
            rollout,
            writes: &writes,
            untouchable: &[],
            force,
        })
    }

    /// `take` on a thread of its own: its answer comes through the channel.
    pub fn take_in_thread(
        &self,
        rollout: &str,
        writes: &[&str],
        force: Option<BackendKind>,
    ) -> mpsc::Receiver<(anyhow::Result<Manifest>, Duration)> {
        let (tx, rx) = mpsc::channel();
        let (state, root, rollout) = (self.state.clone(), self.root.clone(), rollout.to_owned());
        let writes: Vec<String> = writes.iter().map(|w| (*w).to_owned()).collect();
        std::thread::spawn(move || {
            let t = Instant::now();
            let r = snapshot::take(&snapshot::Request {
                state_dir: &state,
                host: HOST,
                root: &root,
                rollout: &rollout,
                writes: &writes,
                untouchable: &[],
                force,
            });
            let _ = tx.send((r, t.elapsed()));
        });
        rx
    }

    /// `restore` on a thread of its own.
    pub fn restore_in_thread(&self, rollout: &str) -> mpsc::Receiver<(anyhow::Result<Manifest>, Duration)> {
        let (tx, rx) = mpsc::channel();
        let (state, root, rollout) = (self.state.clone(), self.root.clone(), rollout.to_owned());
        std::thread::spawn(move || {
            let t = Instant::now();
            let r = snapshot::restore(&state, HOST, &root, &rollout);
            let _ = tx.send((r, t.elapsed()));
        });
        rx
    }

    /// Restore the write set of `rollout`.
    pub fn restore(&self, rollout: &str) -> anyhow::Result<Manifest> {
        snapshot::restore(&self.state, HOST, &self.root, rollout)
    }

    /// Start `argv` as tenant `uid` (no supplementary groups, no
    /// capabilities) in host directory `cwd`, in a process group of its own
    /// that is killed when the returned guard goes.
    pub fn tenant(&self, uid: u32, cwd: &str, argv: &[&str]) -> Tenant {
        let child = Command::new("setpriv")
            .args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".to_owned(),
                "--".to_owned(),
            ])
            .args(argv)
            .current_dir(self.path(cwd))
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("setpriv");
        Tenant { child: Some(child) }
    }

    /// Run a shell script as tenant `uid` in `cwd`; it must succeed within
    /// 30 seconds.
    pub fn as_tenant(&self, uid: u32, cwd: &str, script: &str) {
        let mut t = self.tenant(uid, cwd, &["sh", "-c", script]);
        let status = t
            .wait(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("`{script}` ran for 30 s"));
        assert!(status.success(), "tenant `{script}` failed: {}", t.stderr());
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            // A tenant's process that was just killed may hold it a moment.
            let end = Instant::now() + Duration::from_secs(5);
            let ok = loop {
                let quiet = Instant::now() < end;
                let mut umount = Command::new("umount");
                if quiet {
                    umount.stderr(Stdio::null());
                }
                if umount.arg(m).status().is_ok_and(|s| s.success()) {
                    break true;
                }
                if !quiet {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            if !ok {
                // Something (a take that never finished) still holds it.
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.base);
        }
    }
}

/// A tenant's process; its whole process group is killed when this goes.
pub struct Tenant {
    child: Option<Child>,
}

impl Tenant {
    /// Wait for it to end, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let end = Instant::now() + limit;
        loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                return Some(s);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What it wrote to its standard error (after it ended).
    pub fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(e) = self.child.as_mut().and_then(|c| c.stderr.as_mut()) {
            let _ = std::io::Read::read_to_string(e, &mut s);
        }
        s
    }

    /// Kill its process group, reap it, and wait (at most 10 seconds) until
    /// every process of the group is gone (their working directories hold
    /// the filesystems).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pgid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).expect("pid"));
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = c.wait();
            eventually(Duration::from_secs(10), || {
                nix::sys::signal::killpg(pgid, None).is_err()
            });
        }
    }
}

impl Drop for Tenant {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Poll `f` until it is true or `limit` passes; whether it became true.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Mode bits (`0o7777`) of a path, not following a symlink.
pub fn perms(p: &Path) -> u32 {
    p.symlink_metadata().expect("lstat").mode() & 0o7777
}
