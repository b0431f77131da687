//! A local Debian package repository for labs, the demo and the tests: the
//! package `wgtest` in a good version 1.1 and a broken 1.2 whose maintainer
//! script empties a directory it does not own, built with dpkg-deb and
//! apt-ftparchive, and served over HTTP on loopback (a package step's fetch
//! has the network; nothing leaves this machine).
//!
//! Layout under the repository's directory:
//! - `debs/wgtest_1.0_all.deb`: the version the hosts start with;
//! - `good/`: a flat repository holding 1.1;
//! - `broken/`: a flat repository holding 1.2.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The test package's files, by version: (path, mode, content).
fn files(version: &str) -> Vec<(&'static str, u32, String)> {
    let mut v = vec![
        (
            "opt/wgtest/bin/wgtest",
            0o755,
            format!("#!/bin/sh\necho wgtest {version}\n"),
        ),
        ("opt/wgtest/share/VERSION", 0o644, format!("{version}\n")),
        ("etc/wgtest/wgtest.conf", 0o644, "listen = 127.0.0.1:7070\n".to_owned()),
    ];
    if version != "1.0" {
        v.push((
            "opt/wgtest/share/CHANGES",
            0o644,
            format!("{version}: fixes the vulnerability\n"),
        ));
    }
    v
}

use crate::run_command as run;

fn build_deb(work: &Path, out: &Path, version: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let tree = work.join(format!("wgtest-{version}"));
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(tree.join("DEBIAN"))?;
    for (path, mode, content) in files(version) {
        let p = tree.join(path);
        std::fs::create_dir_all(p.parent().context("a file has a directory")?)?;
        std::fs::write(&p, content)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    }
    std::fs::write(
        tree.join("DEBIAN/control"),
        format!(
            "Package: wgtest\nVersion: {version}\nArchitecture: all\nMaintainer: wavegate tests <tests@wavegate.invalid>\nSection: misc\nPriority: optional\nDescription: a package for wavegate's package-step tests\n"
        ),
    )?;
    std::fs::write(tree.join("DEBIAN/conffiles"), "/etc/wgtest/wgtest.conf\n")?;
    if version == "1.2" {
        // The broken version: its maintainer script empties a directory
        // that belongs to no package (the customers' data).
        let postinst = tree.join("DEBIAN/postinst");
        std::fs::write(
            &postinst,
            "#!/bin/sh\nset -e\n# \"clean up old sessions\"\nrm -rf /srv/customer-data/*\n",
        )?;
        std::fs::set_permissions(&postinst, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::create_dir_all(out)?;
    let deb = out.join(format!("wgtest_{version}_all.deb"));
    run(
        Command::new("dpkg-deb")
            .args(["-Zgzip", "--root-owner-group", "-b"])
            .arg(&tree)
            .arg(&deb),
        "building a package (dpkg-deb)",
    )?;
    Ok(deb)
}

fn index(dir: &Path) -> Result<()> {
    for (what, file) in [("packages", "Packages"), ("release", "Release")] {
        let out = run(
            Command::new("apt-ftparchive").arg(what).arg(".").current_dir(dir),
            "indexing the repository (apt-ftparchive, from apt-utils)",
        )?;
        std::fs::write(dir.join(file), out)?;
    }
    Ok(())
}

/// A built repository, served on loopback while it lives.
pub struct Repo {
    /// Its directory.
    pub dir: PathBuf,
    /// Its HTTP port on 127.0.0.1.
    pub port: u16,
}

impl Repo {
    /// Build the repository under `dir` and serve it.
    pub fn start(dir: &Path) -> Result<Repo> {
        let work = dir.join("work");
        std::fs::create_dir_all(&work)?;
        build_deb(&work, &dir.join("debs"), "1.0")?;
        build_deb(&work, &dir.join("good"), "1.1")?;
        build_deb(&work, &dir.join("broken"), "1.2")?;
        index(&dir.join("good"))?;
        index(&dir.join("broken"))?;
        let port = serve_on(TcpListener::bind("127.0.0.1:0")?, dir)?;
        Ok(Repo {
            dir: dir.to_path_buf(),
            port,
        })
    }

    /// The version-1.0 package the hosts start with.
    pub fn first_deb(&self) -> PathBuf {
        self.dir.join("debs/wgtest_1.0_all.deb")
    }

    /// An apt source line for one of the repositories (`good`, `broken`).
    pub fn source(&self, which: &str) -> String {
        format!("deb [trusted=yes] http://127.0.0.1:{}/{which} ./\n", self.port)
    }
}

/// A repository of a real service for booted hosts: Debian's own nginx
/// package (kept beside the host image) rebuilt by this code with new
/// version numbers. `good/` holds `VERSION+wg1`, the same program; in
/// `broken/`, `VERSION+wg2`'s nginx cannot start (its configuration test
/// fails), which no dry-run can see: its maintainer scripts ask for a
/// restart, held back in the sandbox. Served over HTTP on `addr` (the lab
/// bridge's address) while it lives.
pub struct ServiceRepo {
    /// Its directory.
    pub dir: PathBuf,
    /// Its base URL (`http://ADDR:PORT`).
    pub url: String,
    /// The version the hosts have.
    pub installed: String,
    /// The good update's version.
    pub good: String,
    /// The broken update's version.
    pub broken: String,
}

impl ServiceRepo {
    /// Build it under `dir` from the image's kept nginx package, and serve
    /// it on `addr`.
    pub fn start(dir: &Path, addr: &str) -> Result<ServiceRepo> {
        let debs = crate::image::debs_dir();
        let orig = std::fs::read_dir(&debs)
            .with_context(|| format!("reading {} (the host image's kept packages)", debs.display()))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("nginx_")))
            .with_context(|| format!("no nginx package in {}", debs.display()))?;
        let work = dir.join("work");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        let tree = work.join("nginx");
        run(
            Command::new("dpkg-deb").arg("-R").arg(&orig).arg(&tree),
            "unpacking nginx (dpkg-deb)",
        )?;
        let control = std::fs::read_to_string(tree.join("DEBIAN/control"))?;
        let installed = control
            .lines()
            .find_map(|l| l.strip_prefix("Version: "))
            .context("nginx's control file has no version")?
            .to_owned();
        let good = format!("{installed}+wg1");
        let broken = format!("{installed}+wg2");
        for (suite, version) in [("good", &good), ("broken", &broken)] {
            std::fs::write(
                tree.join("DEBIAN/control"),
                control.replace(&format!("Version: {installed}"), &format!("Version: {version}")),
            )?;
            if suite == "broken" {
                // The real binary stays, under another name; the one the
                // service starts fails its configuration test.
                let bin = tree.join("usr/sbin/nginx");
                std::fs::write(
                    &bin,
                    "#!/bin/sh\necho 'nginx: [emerg] this build cannot read its configuration' >&2\nexit 1\n",
                )?;
            }
            let out = dir.join(suite);
            std::fs::create_dir_all(&out)?;
            run(
                Command::new("dpkg-deb")
                    .args(["-Zgzip", "-b"])
                    .arg(&tree)
                    .arg(out.join(format!("nginx_{}_amd64.deb", version.replace(':', "%3a")))),
                "building nginx (dpkg-deb)",
            )?;
            index(&out)?;
        }
        let listener = TcpListener::bind((addr, 0)).with_context(|| format!("listening on {addr}"))?;
        let port = serve_on(listener, dir)?;
        Ok(ServiceRepo {
            dir: dir.to_path_buf(),
            url: format!("http://{addr}:{port}"),
            installed,
            good,
            broken,
        })
    }

    /// An apt source line for one of its suites (`good`, `broken`).
    pub fn source(&self, which: &str) -> String {
        format!("deb [trusted=yes] {}/{which} ./\n", self.url)
    }
}

/// Make a lab host an apt host: apt's directories, a sources.list naming
/// one of the repository's suites (`good`, `broken`), an empty dpkg
/// database, and wgtest 1.0 installed by dpkg (through `agent_bin`, default
/// `wavegate-agent` next to this binary).
pub fn seed_host(lab_dir: &Path, host: &str, repo: &Repo, suite: &str, agent_bin: Option<&Path>) -> Result<()> {
    let root = lab_dir.join("hosts").join(host).join("root");
    for d in [
        "etc/apt/apt.conf.d",
        "etc/apt/preferences.d",
        "etc/apt/sources.list.d",
        "etc/apt/trusted.gpg.d",
        "var/lib/apt/lists/partial",
        "var/cache/apt/archives/partial",
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
        "var/lib/dpkg/alternatives",
        "var/log/apt",
        "var/cache/debconf",
        "var/tmp",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::write(root.join("etc/apt/sources.list"), repo.source(suite))?;
    for f in ["status", "available", "lock", "lock-frontend"] {
        std::fs::write(root.join("var/lib/dpkg").join(f), "")?;
    }
    std::fs::copy(repo.first_deb(), root.join("var/tmp/wgtest_1.0_all.deb"))?;
    let cmd: Vec<String> = ["dpkg", "-i", "/var/tmp/wgtest_1.0_all.deb"]
        .map(str::to_owned)
        .to_vec();
    let (code, out, detail) = crate::exec::exec_output(lab_dir, host, agent_bin.map(Path::to_path_buf), &cmd)?;
    if code != 0 {
        bail!(
            "installing wgtest 1.0 on {host} failed ({detail}): {}",
            String::from_utf8_lossy(&out)
        );
    }
    Ok(())
}

/// Serve the files under `root` on `listener` from a thread of its own, a
/// thread per connection, for as long as the process lives; its port.
fn serve_on(listener: TcpListener, root: &Path) -> Result<u16> {
    let port = listener.local_addr()?.port();
    let root = root.to_path_buf();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let root = root.clone();
            std::thread::spawn(move || serve(&root, conn));
        }
    });
    Ok(port)
}

/// A request path with its `%XX` escapes decoded (apt asks for
/// `nginx_1.0%2bwg1.deb`); an escape that is not one is kept as it is.
fn percent_decoded(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Answer GET requests with files under `root`, one per connection.
fn serve(root: &Path, conn: std::net::TcpStream) {
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
    }
    let mut conn = conn;
    let path = percent_decoded(request.split_whitespace().nth(1).unwrap_or("/"));
    let rel = path.trim_start_matches('/');
    let head = request.starts_with("HEAD ");
    let file = if rel.split('/').any(|p| p == "..") {
        None
    } else {
        std::fs::read(root.join(rel)).ok().filter(|_| root.join(rel).is_file())
    };
    let _ = match file {
        Some(body) => {
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                body.len()
            );
            if head { Ok(()) } else { conn.write_all(&body) }
        }
        None => write!(
            conn,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_paths_are_percent_decoded() {
        assert_eq!(
            super::percent_decoded("/good/./nginx_1.22.1-9%2bdeb12u9%2Bwg1_amd64.deb"),
            "/good/./nginx_1.22.1-9+deb12u9+wg1_amd64.deb"
        );
        assert_eq!(super::percent_decoded("/a%zz%2"), "/a%zz%2");
    }
}
