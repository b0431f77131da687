//! VM hosts (`lab up --hosts vm`): each host a qemu virtual machine that
//! boots the lab image's own Debian kernel, with systemd as PID 1, `/` on
//! a copy-on-write disk over the image, `/home` on a virtual disk of its
//! own (`/dev/vdb`), and a seed disk that gives it its name and keys. KVM
//! when this machine can run the guest, qemu's TCG otherwise.
//!
//! The lab reaches a VM only through qemu's user network with
//! `restrict=on`: the guest reaches nothing but two explicit forwards, its
//! sshd from a loopback port here, and the controller from the guest's
//! `10.0.2.100:7443`. The agent is installed over that sshd and run by the
//! shipped unit, as on the container hosts.
//!
//! Layout under `DIR/hosts/<id>/`: `disk.qcow2` (its `/`), `home.img` (its
//! `/home`), `seed.img` and `seed/` (its seed). `DIR/vms.json` names every
//! host's ssh port.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::json;

/// Where a guest reaches the controller.
pub const CONTROLLER_IN_GUEST: &str = "10.0.2.100";
const CONTROLLER_PORT_IN_GUEST: u16 = 7443;

/// The URL an agent in a VM dials.
pub fn agent_url() -> String {
    format!("https://{CONTROLLER_IN_GUEST}:{CONTROLLER_PORT_IN_GUEST}")
}

/// A free TCP port on loopback (asked of the kernel, then released).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether qemu can use KVM for a stock guest kernel here: `/dev/kvm`, and
/// the CPU's virtualisation extensions (a machine whose KVM runs only
/// paravirtualised guests has the device but not the flags).
pub fn kvm_usable() -> bool {
    Path::new("/dev/kvm").exists()
        && std::fs::read_to_string("/proc/cpuinfo")
            .map(|c| c.split_whitespace().any(|w| w == "vmx" || w == "svm"))
            .unwrap_or(false)
}

/// Every VM host's ssh port on loopback.
#[derive(Clone, Debug)]
pub struct Vms {
    /// Host id -> its sshd's forwarded port on 127.0.0.1.
    pub ssh_ports: BTreeMap<String, u16>,
}

/// Make every host's disks and seed, the lab's ssh files and `vms.json`.
pub fn prepare(dir: &Path, image_root: &Path, hosts: &[String]) -> Result<Vms> {
    use std::os::unix::fs::PermissionsExt as _;
    let base = crate::image::vm_disk(image_root)?;
    let ssh = crate::container::ssh_dir(dir);
    std::fs::create_dir_all(&ssh)?;
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o700))?;
    if !ssh.join("id").exists() {
        crate::container::keygen(&ssh.join("id"), "wavegate-lab")?;
    }
    let lab_key = std::fs::read_to_string(ssh.join("id.pub"))?;
    let mut ports = BTreeMap::new();
    let mut known = String::new();
    let mut config = String::new();
    for h in hosts {
        let host_dir = dir.join("hosts").join(h);
        std::fs::create_dir_all(&host_dir)?;
        crate::run_command(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(&base)
                .arg(host_dir.join("disk.qcow2")),
            "making a VM's disk (qemu-img, package qemu-utils)",
        )?;
        let home = host_dir.join("home.img");
        std::fs::File::create(&home)?.set_len(64 << 20)?;
        crate::run_command(
            Command::new("mkfs.ext4").args(["-q", "-F", "-L", "home"]).arg(&home),
            "making a VM's /home (mkfs.ext4)",
        )?;
        let seed = host_dir.join("seed");
        std::fs::create_dir_all(&seed)?;
        std::fs::write(seed.join("hostname"), format!("{h}\n"))?;
        std::fs::write(seed.join("authorized_keys"), &lab_key)?;
        crate::container::keygen(&seed.join("host_key"), &format!("root@{h}"))?;
        let public = std::fs::read_to_string(seed.join("host_key.pub"))?;
        let seed_img = host_dir.join("seed.img");
        let _ = std::fs::remove_file(&seed_img);
        crate::run_command(
            Command::new("mke2fs")
                .args(["-q", "-t", "ext4", "-L", "WGSEED", "-d"])
                .arg(&seed)
                .arg(&seed_img)
                .arg("4M"),
            "making a VM's seed disk (mke2fs)",
        )?;
        let port = free_port()?;
        ports.insert(h.clone(), port);
        let mut parts = public.split_whitespace();
        let (kind, key) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
        known.push_str(&format!("{h} {kind} {key}\n"));
        config.push_str(&format!(
            "Host {h}\n  HostName 127.0.0.1\n  Port {port}\n  HostKeyAlias {h}\n  User root\n  IdentityFile {key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {known}\n  StrictHostKeyChecking yes\n  BatchMode yes\n  ConnectTimeout 20\n  LogLevel ERROR\n",
            key = ssh.join("id").display(),
            known = ssh.join("known_hosts").display(),
        ));
    }
    std::fs::write(ssh.join("known_hosts"), known)?;
    std::fs::write(ssh.join("config"), config)?;
    std::fs::write(
        dir.join("vms.json"),
        serde_json::to_string_pretty(&json!({
            "accel": if kvm_usable() { "kvm" } else { "tcg" },
            "hosts": ports.iter().map(|(h, p)| (h.clone(), json!({"ssh_port": p}))).collect::<serde_json::Map<_, _>>(),
        }))?,
    )?;
    Ok(Vms { ssh_ports: ports })
}

/// `lab relay ADDR`: one guest connection, on stdin and stdout, carried to
/// ADDR. qemu's `guestfwd=...-tcp:` would open one connection at start and
/// put every guest connection on it (a reconnecting agent then speaks TLS
/// into the middle of the old stream); `-cmd:` starts this per connection.
pub fn relay(addr: &str) -> Result<u8> {
    let stream = std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    let mut to = stream.try_clone()?;
    // The guest's half: when it closes, the controller sees it.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut to);
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
    // The controller's half: when it closes, so does the guest's
    // connection (this process ends).
    // Rust's stdout is line-buffered: every chunk is flushed as it comes,
    // or TLS records would wait for a newline that never comes.
    use std::io::{Read as _, Write as _};
    let mut from = stream;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    break;
                }
            }
        }
    }
    Ok(0)
}

/// The command line that runs one VM host (`lab machine` runs it). A
/// reboot in the guest resets the VM and boots the kernel again inside
/// the same qemu process.
pub fn qemu_args(dir: &Path, image_root: &Path, host: &str, ssh_port: u16, controller: &str) -> Result<Vec<String>> {
    let me = std::env::current_exe()?;
    if me.display().to_string().contains(',') {
        bail!("qemu cannot run {} (a comma in its path)", me.display());
    }
    let host_dir = dir.join("hosts").join(host);
    let Some(controller_port) = controller.rsplit(':').next() else {
        bail!("the controller address {controller} has no port");
    };
    let kernel = image_root.join("vmlinuz");
    let initrd = image_root.join("initrd.img");
    if !kernel.exists() || !initrd.exists() {
        bail!(
            "the host image has no kernel ({}); it is built with linux-image-amd64",
            kernel.display()
        );
    }
    let accel = if kvm_usable() { "kvm" } else { "tcg" };
    let drive = |p: PathBuf, format: &str| format!("file={},if=virtio,format={format}", p.display());
    Ok(vec![
        "qemu-system-x86_64".into(),
        "-name".into(),
        host.into(),
        "-machine".into(),
        format!("q35,accel={accel}"),
        "-cpu".into(),
        if accel == "kvm" { "host".into() } else { "max".into() },
        "-m".into(),
        "768".into(),
        "-smp".into(),
        "1".into(),
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        "root=/dev/vda rw console=ttyS0 quiet".into(),
        "-drive".into(),
        drive(host_dir.join("disk.qcow2"), "qcow2"),
        "-drive".into(),
        drive(host_dir.join("home.img"), "raw"),
        "-drive".into(),
        format!("{},readonly=on", drive(host_dir.join("seed.img"), "raw")),
        "-netdev".into(),
        format!(
            "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{ssh_port}-:22,guestfwd=tcp:{CONTROLLER_IN_GUEST}:{CONTROLLER_PORT_IN_GUEST}-cmd:{} lab relay 127.0.0.1:{controller_port}",
            me.display()
        ),
        "-device".into(),
        "virtio-net-pci,netdev=n0".into(),
        "-display".into(),
        "none".into(),
        "-monitor".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
    ])
}

/// Read a lab's VM hosts' ssh ports (`None` for a lab of other hosts).
pub fn ssh_ports(dir: &Path) -> Option<BTreeMap<String, u16>> {
    let text = std::fs::read_to_string(dir.join("vms.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(
        v["hosts"]
            .as_object()?
            .iter()
            .filter_map(|(k, h)| Some((k.clone(), u16::try_from(h["ssh_port"].as_u64()?).ok()?)))
            .collect(),
    )
}
