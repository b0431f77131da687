//! A lab host's own filesystems (`lab up --fs PATH=TYPE[:SIZE]`): images
//! under `DIR/hosts/<id>/disks/` on loop devices, mounted inside its root;
//! and taking every one of them down again.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A filesystem every lab host gets (`--fs PATH=TYPE[:SIZE]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsSpec {
    /// Where it is mounted, inside each host's root.
    pub path: String,
    /// ext4, xfs or btrfs.
    pub fstype: String,
    /// Size of its image, bytes.
    pub bytes: u64,
}

/// Filesystem types a lab host can have, and the package with their mkfs.
const LAB_FS: &[(&str, &str)] = &[("ext4", "e2fsprogs"), ("xfs", "xfsprogs"), ("btrfs", "btrfs-progs")];

impl FsSpec {
    /// Parse `PATH=TYPE[:SIZE]`.
    pub fn parse(s: &str) -> Result<FsSpec, String> {
        let usage = "write --fs PATH=TYPE[:SIZE], like --fs /home=ext4 or --fs /var/lib/mysql=xfs:256M";
        let (path, rest) = s.split_once('=').ok_or_else(|| format!("`{s}` has no `=`; {usage}"))?;
        let path = wavegate_domain::plan::normalise_write_path(path)
            .map_err(|why| format!("the path `{path}` {why}; {usage}"))?;
        let (fstype, size) = match rest.split_once(':') {
            Some((t, z)) => (t, Some(z)),
            None => (rest, None),
        };
        if !LAB_FS.iter().any(|(t, _)| *t == fstype) {
            return Err(format!(
                "`{fstype}` is not a filesystem type a lab host can have; use one of: {}",
                LAB_FS.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(", ")
            ));
        }
        let bytes = match size {
            None => 64 << 20,
            Some(z) => parse_size(z).ok_or_else(|| format!("`{z}` is not a size; write it like 64M, 512M or 2G"))?,
        };
        if bytes < 16 << 20 {
            return Err(format!(
                "{bytes} bytes is too small for a filesystem; give at least 16M"
            ));
        }
        Ok(FsSpec {
            path,
            fstype: fstype.to_owned(),
            bytes,
        })
    }

    /// The image file of this filesystem for a host.
    fn image(&self, host_dir: &Path) -> PathBuf {
        host_dir.join("disks").join(format!(
            "{}.{}.img",
            self.path.trim_start_matches('/').replace('/', "-"),
            self.fstype
        ))
    }
}

fn parse_size(z: &str) -> Option<u64> {
    let (num, unit) = z.split_at(z.find(|c: char| !c.is_ascii_digit()).unwrap_or(z.len()));
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "K" | "k" => 1 << 10,
        "M" | "m" | "" => 1 << 20,
        "G" | "g" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Make (once) and mount every `--fs` filesystem of one host, shallowest
/// first. An image that exists already keeps its files.
pub(crate) fn mount_disks(host_dir: &Path, specs: &[FsSpec]) -> Result<()> {
    let mut specs: Vec<&FsSpec> = specs.iter().collect();
    specs.sort_by_key(|s| s.path.matches('/').count());
    std::fs::create_dir_all(host_dir.join("disks"))?;
    for spec in specs {
        let img = spec.image(host_dir);
        if !img.exists() {
            let f = std::fs::File::create(&img).with_context(|| format!("creating {}", img.display()))?;
            f.set_len(spec.bytes)?;
            drop(f);
            let mut mkfs = std::process::Command::new(format!("mkfs.{}", spec.fstype));
            match spec.fstype.as_str() {
                // xfsprogs refuses new filesystems under 300 MB unless it is
                // making them for a test suite, as xfstests does.
                "xfs" => mkfs
                    .args(["-q", "-f"])
                    .env("TEST_DIR", "1")
                    .env("TEST_DEV", "1")
                    .env("QA_CHECK_FS", "1"),
                // Mixed block groups: what btrfs-progs advises under 1 GiB.
                "btrfs" if spec.bytes < 1 << 30 => mkfs.args(["-q", "-f", "--mixed"]),
                "btrfs" => mkfs.args(["-q", "-f"]),
                _ => mkfs.args(["-q", "-F"]),
            };
            let package = LAB_FS.iter().find(|(t, _)| *t == spec.fstype).map_or("", |(_, p)| *p);
            crate::run_command(
                mkfs.arg(&img),
                &format!(
                    "making a {} filesystem (mkfs.{} from {package})",
                    spec.fstype, spec.fstype
                ),
            )?;
        }
        let point = host_dir.join("root").join(spec.path.trim_start_matches('/'));
        std::fs::create_dir_all(&point)?;
        crate::run_command(
            std::process::Command::new("mount")
                .arg("-o")
                .arg("loop")
                .arg(&img)
                .arg(&point),
            &format!("mounting {} at {}", img.display(), point.display()),
        )?;
    }
    Ok(())
}

/// Unmount every filesystem mounted under `dir` (deepest first) and detach
/// every loop device whose image lies under it, whatever state the lab is
/// in. Returns how many of each.
pub fn unmount_all(dir: &Path) -> Result<(usize, usize)> {
    let prefix = dir.display().to_string();
    let inside = |p: &str| p == prefix || p.starts_with(&format!("{prefix}/"));
    let text = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut points: Vec<String> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| inside(p))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    points.dedup();
    let mut mounts = 0;
    for p in &points {
        use nix::mount::{MntFlags, umount2};
        if umount2(p.as_str(), MntFlags::empty()).is_err() {
            // Something still holds it: detach it now, it goes when released.
            umount2(p.as_str(), MntFlags::MNT_DETACH).with_context(|| format!("unmounting {p}"))?;
        }
        mounts += 1;
    }
    let mut loops = 0;
    for e in std::fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        if inside(backing.trim()) {
            crate::run_command(
                std::process::Command::new("losetup").args(["-d", &format!("/dev/{name}")]),
                &format!("detaching /dev/{name}"),
            )?;
            loops += 1;
        }
    }
    Ok((mounts, loops))
}

#[cfg(test)]
mod tests {
    use super::FsSpec;

    #[test]
    fn fs_specs() {
        let s = FsSpec::parse("/var/lib/mysql=xfs:256M").expect("valid");
        assert_eq!(
            (s.path.as_str(), s.fstype.as_str(), s.bytes),
            ("/var/lib/mysql", "xfs", 256 << 20)
        );
        assert_eq!(FsSpec::parse("/home/=ext4").expect("valid").bytes, 64 << 20);
        assert_eq!(FsSpec::parse("/home=btrfs:1G").expect("valid").bytes, 1 << 30);
        for (bad, says) in [
            ("/home", "no `=`"),
            ("home=ext4", "relative"),
            ("/=ext4", "whole filesystem"),
            ("/home=zfs", "not a filesystem type"),
            ("/home=ext4:lots", "not a size"),
            ("/home=ext4:1M", "too small"),
        ] {
            let e = FsSpec::parse(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
