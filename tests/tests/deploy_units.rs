//! The systemd units in deploy/ parse: `systemd-analyze verify` (from the
//! systemd package, which scripts/test installs) accepts each one with no
//! warning, their ExecStart pointed at the binaries this build made.

use std::process::Command;

use wavegate_tests::{repo_root, wavegate_bin};

#[test]
fn the_systemd_units_verify_without_warnings() {
    let bin_dir = wavegate_bin().parent().expect("target dir").to_path_buf();
    let out_dir = std::env::temp_dir().join(format!("wavegate-units-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).expect("dir");
    let units = [
        "wavegate-controller.service",
        "wavegate-controller-ha.service",
        "wavegate-agent.service",
    ];
    for unit in units {
        let text = std::fs::read_to_string(repo_root().join("deploy/systemd").join(unit)).expect("unit");
        let text = text
            .replace(
                "/usr/local/bin/wavegate-agent ",
                &format!("{}/wavegate-agent ", bin_dir.display()),
            )
            .replace("/usr/local/bin/wavegate ", &format!("{}/wavegate ", bin_dir.display()));
        std::fs::write(out_dir.join(unit), text).expect("write");
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(units.iter().map(|u| out_dir.join(u)))
        .output()
        .expect("systemd-analyze (package systemd, installed by scripts/test)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("wavegate")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(&out_dir);
}
