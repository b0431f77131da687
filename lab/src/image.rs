//! The booted hosts' image: a Debian 12 root with systemd as PID 1, D-Bus,
//! journald, openssh-server and two real services (nginx and postfix),
//! built offline from Debian's packages with mmdebstrap and cached by the
//! hash of everything that goes into it. Container hosts boot overlays of
//! it; VM hosts boot its kernel from a disk image made of it (see
//! [`vm_disk`]). Nothing on this machine outside the cache directory is
//! written.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The Debian release every booted host runs.
pub const SUITE: &str = "bookworm";

/// Packages beyond mmdebstrap's `minbase`: the init system and its bus,
/// the way in (sshd), the services a hosting operator patches, and what
/// health checks and maintenance steps use.
pub const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "nginx-light",
    "postfix",
    "iproute2",
    "procps",
    "curl",
    "python3",
    "apt-utils",
    // For VM hosts: a kernel (booted directly by qemu) and its initramfs.
    "linux-image-amd64",
    "initramfs-tools",
];

/// Run inside the new root before its packages are configured: postfix
/// delivers locally (no questions asked).
const ESSENTIAL_HOOK: &str = "printf 'postfix postfix/main_mailer_type select Local only\\npostfix postfix/mailname string lab.invalid\\n' | chroot \"$1\" debconf-set-selections";

/// Run on the finished root: no host keys or machine id shared by every
/// host (each gets its own at first boot), no package source outside the
/// lab, a console that does not wait for a login.
const CUSTOMIZE_HOOK: &str = "rm -f \"$1\"/etc/ssh/ssh_host_* && : > \"$1\"/etc/machine-id && rm -f \"$1\"/var/lib/dbus/machine-id && : > \"$1\"/etc/apt/sources.list && rm -rf \"$1\"/var/lib/apt/lists/* && mkdir -p \"$1\"/root/.ssh && chmod 0700 \"$1\"/root/.ssh";

/// What a VM host needs beyond a container (each part inert in a
/// container): DHCP on its virtio NIC (systemd-networkd, for `en*` only;
/// a container's `eth0` is set up by the lab), `/home` on its second
/// virtual disk, and a seed disk (label WGSEED, the way cloud images take
/// a NoCloud seed) that gives it its name, its sshd host key and the lab's
/// key before sshd starts.
const VM_HOOK: &str = r#"set -e
r="$1"
mkdir -p "$r/etc/systemd/network"
printf '[Match]
Name=en*

[Network]
DHCP=yes
' > "$r/etc/systemd/network/20-wavegate-vm.network"
chroot "$r" systemctl enable systemd-networkd.service
printf '[Unit]
Description=/home on its own virtual disk
ConditionVirtualization=vm

[Mount]
What=/dev/vdb
Where=/home
Type=ext4

[Install]
WantedBy=local-fs.target
' > "$r/etc/systemd/system/home.mount"
chroot "$r" systemctl enable home.mount
cat > "$r/usr/local/sbin/wavegate-seed" <<'SEED'
#!/bin/sh
# Take this VM's name, sshd host key and authorized key from its seed disk.
set -e
mkdir -p /run/wavegate-seed
mount -o ro /dev/disk/by-label/WGSEED /run/wavegate-seed
cd /run/wavegate-seed
hostname "$(cat hostname)"
cp hostname /etc/hostname
install -m 0600 host_key /etc/ssh/ssh_host_ed25519_key
install -m 0644 host_key.pub /etc/ssh/ssh_host_ed25519_key.pub
install -d -m 0700 /root/.ssh
install -m 0600 authorized_keys /root/.ssh/authorized_keys
cd /
umount /run/wavegate-seed
SEED
chmod 0755 "$r/usr/local/sbin/wavegate-seed"
printf '[Unit]
Description=This VM'"'"'s name and keys from its seed disk
ConditionVirtualization=vm
Requires=dev-disk-by\x2dlabel-WGSEED.device
After=dev-disk-by\x2dlabel-WGSEED.device
Before=ssh.service systemd-hostnamed.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/wavegate-seed

[Install]
WantedBy=multi-user.target
' > "$r/etc/systemd/system/wavegate-seed.service"
chroot "$r" systemctl enable wavegate-seed.service
"#;

/// Bumped whenever the recipe changes in a way the hash cannot see.
/// 2: the service packages' own .deb files are kept beside the image.
/// 3: a kernel, and what a VM host needs.
const RECIPE: u32 = 3;

/// Packages whose .deb files are kept beside the image (in `<hash>.debs`):
/// the lab's repository rebuilds them with new version numbers.
pub const KEPT_DEBS: &[&str] = &["nginx"];

/// The Debian mirror mmdebstrap downloads from (`WAVEGATE_DEBIAN_MIRROR`
/// overrides it).
fn mirror() -> String {
    std::env::var("WAVEGATE_DEBIAN_MIRROR").unwrap_or_else(|_| "http://deb.debian.org/debian".into())
}

/// Where built images are kept (`WAVEGATE_IMAGE_CACHE` overrides it).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("WAVEGATE_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/wavegate-lab/images"))
}

/// The hash of the image's inputs: suite, mirror, packages, hooks, recipe.
pub fn input_hash() -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for part in [
        format!("recipe {RECIPE}"),
        format!("suite {SUITE}"),
        format!("mirror {}", mirror()),
        format!("arch {}", std::env::consts::ARCH),
        format!("packages {}", PACKAGES.join(",")),
        format!("essential {ESSENTIAL_HOOK}"),
        format!("customize {CUSTOMIZE_HOOK}"),
        format!("vm {VM_HOOK}"),
    ] {
        h.update(part.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())[..16].to_owned()
}

/// Where the kept .deb files of the image built from the same inputs are.
pub fn debs_dir() -> PathBuf {
    cache_dir().join(format!("{}.debs", input_hash()))
}

/// The image's root directory, built (about 30 s, about 400 MB) unless the
/// cache already holds one with the same inputs. Builds never run twice at
/// once for the same cache.
pub fn ensure() -> Result<PathBuf> {
    let cache = cache_dir();
    std::fs::create_dir_all(&cache).with_context(|| format!("creating the image cache {}", cache.display()))?;
    let hash = input_hash();
    let root = cache.join(&hash);
    let debs = cache.join(format!("{hash}.debs"));
    let done = cache.join(format!("{hash}.done"));
    let lock_file = std::fs::File::create(cache.join(format!("{hash}.lock")))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking the image cache: {e}"))?;
    if done.exists() && root.join("usr/lib/systemd/systemd").exists() {
        return Ok(root);
    }
    if !on_path("mmdebstrap") {
        bail!("building the booted hosts' image needs mmdebstrap: apt-get install mmdebstrap");
    }
    let tar = cache.join(format!("{hash}.tar"));
    let partial = cache.join(format!("{hash}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(&debs);
    let keep = KEPT_DEBS
        .iter()
        .map(|p| format!("cp \"$1\"/var/cache/apt/archives/{p}_*.deb '{}'/", debs.display()))
        .collect::<Vec<_>>()
        .join(" && ");
    let keep_hook = format!("mkdir -p '{}' && {keep}", debs.display());
    eprintln!(
        "lab: building the Debian {SUITE} host image {hash} with mmdebstrap (once; cached in {})",
        cache.display()
    );
    let out = Command::new("mmdebstrap")
        .args(["--variant=minbase", "--quiet"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(format!("--essential-hook={ESSENTIAL_HOOK}"))
        .arg(format!("--customize-hook={keep_hook}"))
        .arg(format!("--customize-hook={CUSTOMIZE_HOOK}"))
        .arg(format!("--customize-hook={VM_HOOK}"))
        .arg(SUITE)
        .arg(&tar)
        .arg(mirror())
        .output()
        .context("running mmdebstrap")?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tar);
        bail!(
            "mmdebstrap could not build the host image: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::fs::create_dir_all(&partial)?;
    let ok = Command::new("tar")
        .arg("-C")
        .arg(&partial)
        .args(["--numeric-owner", "-xpf"])
        .arg(&tar)
        .status()
        .context("running tar")?
        .success();
    if !ok {
        bail!("unpacking the host image {} failed", tar.display());
    }
    std::fs::rename(&partial, &root)?;
    std::fs::remove_file(&tar)?;
    std::fs::write(&done, format!("{}\n", PACKAGES.join(" ")))?;
    Ok(root)
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

/// The disk image VM hosts boot from: an ext4 filesystem made of the image
/// root (`mke2fs -d`), sparse, 2 GiB, kept beside it and made once. Each VM
/// gets a copy-on-write overlay of it (qcow2).
pub fn vm_disk(root: &std::path::Path) -> Result<PathBuf> {
    let cache = cache_dir();
    let hash = input_hash();
    let disk = cache.join(format!("{hash}.vm.raw"));
    let lock_file = std::fs::File::create(cache.join(format!("{hash}.vm.lock")))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking the image cache: {e}"))?;
    if disk.exists() {
        return Ok(disk);
    }
    let partial = cache.join(format!("{hash}.vm.partial"));
    let _ = std::fs::remove_file(&partial);
    let out = Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-L", "wgroot", "-d"])
        .arg(root)
        .arg(&partial)
        .arg("2G")
        .output()
        .context("running mke2fs (package e2fsprogs)")?;
    if !out.status.success() {
        bail!(
            "making the VM disk image failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::fs::rename(&partial, &disk)?;
    Ok(disk)
}
