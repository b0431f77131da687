//! `wavegate demo`, the README's main command, as CI runs it: no terminal,
//! output to a pipe. It must exit 0, tell the three stories, and leave
//! nothing behind. Needs root.

use wavegate_tests::wavegate;

#[test]
#[ignore = "needs root (namespaces, mounts, loop devices): scripts/test runs it"]
fn the_demo_tells_its_three_stories_and_cleans_up() {
    let dir = std::env::temp_dir().join(format!("wavegate-demo-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = wavegate(["demo".as_ref(), "--dir".as_ref(), dir.as_os_str()]);
    assert_eq!(run.status, 0, "{}\n{}", run.stdout, run.stderr);
    let out = &run.stdout;
    for want in [
        "COMPLETED: 16 hosts patched in 4 waves",
        "would delete 6 files outside its write set",
        "REFUSED by its dry-run before anything ran",
        "HALTED by itself after the canary",
        "the canary was rolled back from its snapshot; 7 other hosts were never touched",
        "Summary",
    ] {
        assert!(out.contains(want), "the demo did not say {want:?}:\n{out}");
    }
    // Backups come after their primaries: bk01 is in a later wave than w01.
    let wave_of = |host: &str| {
        out.lines()
            .filter(|l| l.trim_start().starts_with("wave ") && l.contains(" host") && l.contains(host))
            .find_map(|l| l.split_whitespace().nth(1).and_then(|n| n.parse::<u32>().ok()))
            .unwrap_or_else(|| panic!("{host} is in no wave line:\n{out}"))
    };
    assert!(wave_of("bk01") > wave_of("w01"), "{out}");
    assert!(!dir.exists(), "the demo left {} behind", dir.display());
}
