//! A damaged or unreadable store file at start: `wavegate serve` refuses to
//! start with an error that names the file, and the file is left exactly as
//! it was (no repair, no overwrite).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use wavegate_tests::lab::eventually;
use wavegate_tests::{Run, fixture, wavegate_bin};

fn serve(data: &Path) -> std::process::Child {
    Command::new(wavegate_bin())
        .arg("serve")
        .arg("--data")
        .arg(data)
        .arg("--fleet")
        .arg(fixture("lab-fleet.yaml"))
        .args(["--listen", "127.0.0.1:0", "--web-listen", "127.0.0.1:0"])
        .arg("--addr-file")
        .arg(data.with_extension("addr"))
        .arg("--insecure-plaintext-for-local-dev")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wavegate serve")
}

fn digest(p: &Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(p).expect("read the store")).to_vec()
}

/// Start on a damaged store: it must exit non-zero, name the file, and not
/// touch it.
fn refuses(data: &Path, file: &Path) -> Run {
    let before = file.is_file().then(|| digest(file));
    let run: Run = serve(data).wait_with_output().expect("serve exits").into();
    assert_ne!(run.status, 0, "started on a damaged store:\n{}", run.stderr);
    assert!(
        run.stderr.contains(&file.display().to_string()) && run.stderr.contains("will not overwrite"),
        "the error names the file and says it is left alone:\n{}",
        run.stderr
    );
    if let Some(before) = before {
        assert_eq!(digest(file), before, "the damaged store was modified");
    }
    run
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wavegate-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

#[test]
fn a_store_of_garbage_is_refused_and_left_as_it_is() {
    let dir = scratch("garbage");
    let file = dir.join("wavegate.redb");
    let garbage: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&file, garbage).expect("write");
    refuses(&dir, &file);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_truncated_store_is_refused_and_left_as_it_is() {
    let dir = scratch("truncated");
    // A real store first: start, wait until it listens, stop.
    let mut child = serve(&dir);
    eventually(Duration::from_secs(30), "the controller to listen", || {
        dir.with_extension("addr").exists().then_some(())
    });
    let _ = child.kill();
    let _ = child.wait();
    let file = dir.join("wavegate.redb");
    let len = std::fs::metadata(&file).expect("store").len();
    assert!(len > 4096, "a store was written ({len} bytes)");
    let f = std::fs::OpenOptions::new().write(true).open(&file).expect("open");
    f.set_len(len / 3).expect("truncate");
    drop(f);
    refuses(&dir, &file);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(dir.with_extension("addr"));
}

#[test]
fn a_store_path_that_cannot_be_read_as_a_file_is_refused() {
    let dir = scratch("unreadable");
    let file = dir.join("wavegate.redb");
    std::fs::create_dir_all(file.join("not-a-store")).expect("mkdir");
    refuses(&dir, &file);
    assert!(file.join("not-a-store").is_dir(), "what was there is still there");
    let _ = std::fs::remove_dir_all(&dir);
}
