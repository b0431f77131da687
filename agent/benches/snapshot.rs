//! Benchmark 5: snapshot and restore throughput on ~1 GB of mixed files,
//! side by side with `tar | zstd -3` and `zstd -d | tar -x` on the same
//! data. Prints its figures; run with
//! `cargo bench -p wavegate-agent --bench snapshot`.
//!
//! The data: 20,000 small text files, 40 files of random bytes and 20 large
//! log-like files, about 1 GB, in a scratch directory (removed at the end).
//! Everything runs with a warm page cache, ours and theirs alike.

use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use rand::{Rng as _, RngCore as _, SeedableRng as _};

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

fn mb_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; nothing else to parse.
    let scratch = std::env::temp_dir().join(format!("wavegate-bench-snapshot-{}", std::process::id()));
    let root = scratch.join("root");
    let state = scratch.join("state");
    let data = root.join("srv/data");
    std::fs::create_dir_all(&data)?;
    std::fs::create_dir_all(&state)?;
    let bytes = generate(&data)?;
    sh("sync");
    println!(
        "benchmark 5: snapshot and restore of {:.2} GB in 20,060 files",
        bytes as f64 / 1e9
    );

    let writes = vec!["/srv/data".to_owned()];
    let t = Instant::now();
    let m = wavegate_agent::snapshot::take(&wavegate_agent::snapshot::Request {
        state_dir: &state,
        host: "bench",
        root: &root,
        rollout: "r-bench",
        writes: &writes,
        untouchable: &[],
        force: None,
    })?;
    let take = t.elapsed().as_secs_f64();

    let out = scratch.join("baseline.tar.zst");
    sh("sync");
    let t = Instant::now();
    sh(&format!(
        "tar -C {} -cf - srv/data | zstd -3 -q -T1 -o {} && sync -f {}",
        root.display(),
        out.display(),
        out.display()
    ));
    let tar = t.elapsed().as_secs_f64();

    // Both restores replace a tree that is there (ours after a bad step
    // deleted part of it), and both end with the data on disk.
    let untar = scratch.join("untar");
    std::fs::create_dir_all(&untar)?;
    let extract = format!("zstd -d -q -c {} | tar -C {} -xf -", out.display(), untar.display());
    sh(&extract);
    sh(&format!(
        "rm -rf {}/site000 {}/blobs/blob00.bin && sync",
        data.display(),
        data.display()
    ));
    let t = Instant::now();
    wavegate_agent::snapshot::restore(&state, "bench", &root, "r-bench")?;
    let restore = t.elapsed().as_secs_f64();

    sh("sync");
    let t = Instant::now();
    sh(&format!(
        "rm -rf {}/srv && {extract} && sync -f {}",
        untar.display(),
        untar.display()
    ));
    let untar_s = t.elapsed().as_secs_f64();

    println!(
        "  archive: ours {:.0} MB, tar | zstd -3 {:.0} MB",
        m.bytes() as f64 / 1e6,
        std::fs::metadata(&out)?.len() as f64 / 1e6
    );
    println!(
        "  snapshot (hash, archive, fsync, read back and verify): {take:.2} s, {:.0} MB/s; tar | zstd -3: {tar:.2} s, {:.0} MB/s; ours is {:.0}% of it (target >= 80%)",
        mb_s(bytes, take),
        mb_s(bytes, tar),
        100.0 * tar / take
    );
    println!(
        "  restore (check, replace, sync, check every file): {restore:.2} s, {:.0} MB/s; rm -rf, zstd -d | tar -x, sync: {untar_s:.2} s, {:.0} MB/s; ours is {:.0}% of it (target >= 80%)",
        mb_s(bytes, restore),
        mb_s(bytes, untar_s),
        100.0 * untar_s / restore
    );
    std::fs::remove_dir_all(&scratch)?;
    Ok(())
}
