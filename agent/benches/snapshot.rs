//! Benchmark 5: snapshot and restore of ~1 GB of mixed files by each
//! backend (tar+zstd and btrfs), side by side with `tar | zstd -3` and
//! `zstd -d | tar -x` on the same data. Prints its figures; run with
//! `bash scripts/bench snapshot` (needs root and btrfs-progs: the data is
//! on a btrfs filesystem on a loop device).
//!
//! The data: 20,000 small text files, 40 files of random bytes and 20 large
//! log-like files, about 1 GB, in a scratch directory (removed at the end).
//! Everything runs with a warm page cache, ours and theirs alike.

use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use rand::{Rng as _, RngCore as _, SeedableRng as _};
use wavegate_agent::snapshot::{self, BackendKind, Manifest};

const WORDS: &[&str] = &[
    "server", "backup", "customer", "mail", "patch", "kernel", "restart", "the", "a", "of", "and", "wave", "disk",
    "config", "error", "ok", "user", "home", "var", "lib", "daemon", "cron", "update", "ssl", "cert",
];

fn generate(data: &Path) -> std::io::Result<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2012);
    let mut total = 0u64;
    for d in 0..200 {
        let dir = data.join(format!("site{d:03}"));
        std::fs::create_dir_all(&dir)?;
        for f in 0..100 {
            let size = rng.random_range(2_048..32_768);
            let mut text = String::with_capacity(size + 16);
            while text.len() < size {
                text.push_str(WORDS[rng.random_range(0..WORDS.len())]);
                text.push(if rng.random_ratio(1, 12) { '\n' } else { ' ' });
            }
            std::fs::write(dir.join(format!("page{f:03}.html")), &text)?;
            total += text.len() as u64;
        }
    }
    let blobs = data.join("blobs");
    std::fs::create_dir_all(&blobs)?;
    let mut buf = vec![0u8; 8 << 20];
    for i in 0..40 {
        rng.fill_bytes(&mut buf);
        std::fs::write(blobs.join(format!("blob{i:02}.bin")), &buf)?;
        total += buf.len() as u64;
    }
    let logs = data.join("logs");
    std::fs::create_dir_all(&logs)?;
    for i in 0..20 {
        let mut f = std::io::BufWriter::new(std::fs::File::create(logs.join(format!("access{i:02}.log")))?);
        let mut n = 0u64;
        while n < 16 << 20 {
            let line = format!(
                "2026-11-22T{:02}:{:02}:{:02}Z 10.0.{}.{} GET /{} {} {}\n",
                rng.random_range(0..24),
                rng.random_range(0..60),
                rng.random_range(0..60),
                rng.random_range(0..255),
                rng.random_range(0..255),
                WORDS[rng.random_range(0..WORDS.len())],
                [200, 200, 200, 304, 404, 500][rng.random_range(0..6)],
                rng.random_range(100..90_000)
            );
            f.write_all(line.as_bytes())?;
            n += line.len() as u64;
        }
        total += n;
    }
    Ok(total)
}

fn sh(cmd: &str) {
    let ok = Command::new("sh").args(["-c", cmd]).status().is_ok_and(|s| s.success());
    assert!(ok, "`{cmd}` failed");
}

fn take(
    state: &Path,
    root: &Path,
    path: &str,
    rollout: &str,
    force: Option<BackendKind>,
) -> anyhow::Result<(Manifest, f64)> {
    let writes = vec![path.to_owned()];
    sh("sync");
    let t = Instant::now();
    let m = snapshot::take(&snapshot::Request {
        state_dir: state,
        host: "bench",
        root,
        rollout,
        writes: &writes,
        untouchable: &[],
        force,
    })?;
    Ok((m, t.elapsed().as_secs_f64()))
}

fn restore(state: &Path, root: &Path, rollout: &str) -> anyhow::Result<f64> {
    sh("sync");
    let t = Instant::now();
    snapshot::restore(state, "bench", root, rollout)?;
    Ok(t.elapsed().as_secs_f64())
}

/// What a bad step does: a site and a blob are gone, a log is overwritten.
fn damage(data: &Path) {
    sh(&format!(
        "rm -rf {0}/site000 {0}/blobs/blob00.bin && echo broken > {0}/logs/access00.log && sync",
        data.display()
    ));
}

/// What the 2012 program did: all of it is gone.
fn wipe(data: &Path) {
    sh(&format!("rm -rf {}/* && sync", data.display()));
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; nothing else to parse.
    let scratch = std::env::temp_dir().join(format!("wavegate-bench-snapshot-{}", std::process::id()));
    let root = scratch.join("root");
    let state = scratch.join("state");
    let srv = root.join("srv");
    std::fs::create_dir_all(&srv)?;
    std::fs::create_dir_all(&state)?;
    // Everything on one btrfs filesystem (a sparse image on a loop device),
    // so both backends and the baseline read the same bytes from the same
    // disk.
    let img = scratch.join("btrfs.img");
    sh(&format!(
        "truncate -s 8G {0} && mkfs.btrfs -q -f {0} >/dev/null && mount -o loop {0} {1}",
        img.display(),
        srv.display()
    ));
    let result = run(&root, &state);
    for r in ["r-sub", "r-dir", "r-tar"] {
        let _ = snapshot::release(&state, &root, r);
    }
    sh(&format!("umount {}", srv.display()));
    std::fs::remove_dir_all(&scratch)?;
    result
}

fn run(root: &Path, state: &Path) -> anyhow::Result<()> {
    // The data as a subvolume of its own (per-site subvolumes, as hosting
    // panels make them for quotas), and the same bytes as a plain directory
    // inside the filesystem's top subvolume (a reflinked copy).
    let sub = root.join("srv/data");
    sh(&format!("btrfs -q subvolume create {}", sub.display()));
    let bytes = generate(&sub)?;
    let plain = root.join("srv/plain/data");
    std::fs::create_dir_all(plain.parent().unwrap_or(root))?;
    sh(&format!(
        "cp -a --reflink=always {} {} && sync",
        sub.display(),
        plain.display()
    ));
    println!(
        "benchmark 5: snapshot and restore of {:.2} GB in 20,060 files on btrfs (a loop device)",
        bytes as f64 / 1e9
    );

    let out = root.join("srv/baseline.tar.zst");
    sh("sync");
    let t = Instant::now();
    sh(&format!(
        "tar -C {} -cf - srv/data | zstd -3 -q -T1 -o {} && sync -f {}",
        root.display(),
        out.display(),
        out.display()
    ));
    let tar = t.elapsed().as_secs_f64();

    let (m_tar, take_tar) = take(state, root, "/srv/data", "r-tar", Some(BackendKind::TarZstd))?;
    let (m_sub, take_sub) = take(state, root, "/srv/data", "r-sub", None)?;
    let (m_dir, take_dir) = take(state, root, "/srv/plain/data", "r-dir", None)?;
    assert_eq!(m_tar.parts[0].backend, BackendKind::TarZstd);
    for m in [&m_sub, &m_dir] {
        assert_eq!(m.parts[0].backend, BackendKind::Btrfs, "{}", m.describe());
    }

    // Each restore replaces a tree that a bad step damaged, and ends with
    // the data on disk. The btrfs ones first: the tar restore rewrites every
    // file.
    damage(&sub);
    let sub_partial = restore(state, root, "r-sub")?;
    wipe(&sub);
    let sub_all = restore(state, root, "r-sub")?;
    damage(&plain);
    let dir_partial = restore(state, root, "r-dir")?;
    wipe(&plain);
    let dir_all = restore(state, root, "r-dir")?;
    damage(&sub);
    let tar_partial = restore(state, root, "r-tar")?;
    wipe(&sub);
    let tar_all = restore(state, root, "r-tar")?;

    let untar = root.join("srv/untar");
    std::fs::create_dir_all(&untar)?;
    let extract = format!("zstd -d -q -c {} | tar -C {} -xf -", out.display(), untar.display());
    sh(&extract);
    sh("sync");
    let t = Instant::now();
    sh(&format!(
        "rm -rf {}/srv && {extract} && sync -f {}",
        untar.display(),
        untar.display()
    ));
    let untar_s = t.elapsed().as_secs_f64();

    println!(
        "  kept: tar+zstd {:.0} MB (tar | zstd -3: {:.0} MB); a btrfs snapshot copies nothing, it shares the data",
        m_tar.bytes() as f64 / 1e6,
        std::fs::metadata(&out)?.len() as f64 / 1e6
    );
    println!("  seconds, and speed as a multiple of tar | zstd on the same data (higher is faster):");
    println!(
        "  {:<38} {:>16}   {:>16}   {:>16}",
        "", "snapshot", "restore", "restore, all lost"
    );
    let row = |name: &str, snap: f64, part: f64, all: f64| {
        println!(
            "  {name:<38} {snap:>7.3} {:>7.1}x   {part:>7.3} {:>7.1}x   {all:>7.3} {:>7.1}x",
            tar / snap,
            untar_s / part,
            untar_s / all
        );
    };
    row("tar | zstd -3, zstd -d | tar -x", tar, untar_s, untar_s);
    row("wavegate tar+zstd", take_tar, tar_partial, tar_all);
    row("wavegate btrfs, a subvolume", take_sub, sub_partial, sub_all);
    row("wavegate btrfs, a dir in a subvolume", take_dir, dir_partial, dir_all);
    println!(
        "  tar+zstd: hash, archive, fsync, read back and verify; restore: build beside, checking every record, swap in, sync."
    );
    println!(
        "  btrfs: read-only snapshot, check its flag and UUIDs, list it and hash its inodes; restore: check all that, then swap in"
    );
    println!(
        "  a copy of it (a whole subvolume) or rebuild what changed beside it as reflinks and swap it in (a directory), sync."
    );
    Ok(())
}
