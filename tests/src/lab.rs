//! A lab for end-to-end tests: `wavegate lab up` in a temporary directory,
//! commands run as the lab's identities, and `lab down` when dropped.

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Run, fixture, wavegate, wavegate_bin};

/// Poll `f` every 25 ms until it returns `Some`, or panic with `what` after
/// `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A running lab.
pub struct Lab {
    /// Its directory.
    pub dir: PathBuf,
    /// Processes this test started itself (reaped when the lab goes down).
    children: std::sync::Mutex<Vec<std::process::Child>>,
}

impl Lab {
    /// Start a lab for a fixture fleet.
    pub fn up(name: &str, fleet: &str) -> Lab {
        Lab::up_with(name, fleet, "10s", &[])
    }

    /// Start a lab whose hosts have filesystems of their own
    /// (`--fs PATH=TYPE[:SIZE]` each).
    pub fn up_fs(name: &str, fleet: &str, fs: &[&str]) -> Lab {
        Lab::up_args(name, fleet, "10s", &[], fs)
    }

    /// Start a lab with more `lab up` flags (`--webhook URL`, ...).
    pub fn up_extra(name: &str, fleet: &str, args: &[&str]) -> Lab {
        Lab::start(name, fleet, "10s", &[], &[], args)
    }

    /// Start a lab with another agent grace, and extra environment for the
    /// controller (a failpoint).
    pub fn up_with(name: &str, fleet: &str, grace: &str, env: &[(&str, &str)]) -> Lab {
        Lab::up_args(name, fleet, grace, env, &[])
    }

    /// Start a lab whose `controllers` controllers share the etcd store at
    /// `store` (leadership lease 3 s), with more `lab up` flags.
    pub fn up_ha(
        name: &str,
        fleet: &str,
        store: &str,
        controllers: usize,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> Lab {
        let n = controllers.to_string();
        let mut args = vec!["--store", store, "--controllers", &n, "--lease-ttl", "3s"];
        args.extend_from_slice(extra);
        Lab::start(name, fleet, "10s", env, &[], &args)
    }

    /// Every controller's URL, the first (elected first) first.
    pub fn controllers(&self) -> Vec<String> {
        let lab: Value = serde_json::from_str(&std::fs::read_to_string(self.dir.join("lab.json")).expect("lab.json"))
            .expect("lab.json is JSON");
        match lab["controllers"].as_array() {
            Some(all) => all.iter().filter_map(|u| u.as_str().map(str::to_owned)).collect(),
            None => vec![self.controller()],
        }
    }

    /// (URL, role) of every controller, as `wavegate controllers` says.
    pub fn roles(&self) -> Vec<(String, String)> {
        let run = self.wavegate_as("auditor", &["controllers", "--output", "json"]);
        serde_json::from_str::<Value>(&run.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|r| {
                (
                    r["url"].as_str().unwrap_or_default().to_owned(),
                    r["role"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// Wait until controller `n` (from 1) leads.
    pub fn wait_leader(&self, n: usize, timeout: Duration) {
        let url = self.controllers()[n - 1].clone();
        eventually(timeout, &format!("controller {n} ({url}) to lead"), || {
            self.roles()
                .iter()
                .any(|(u, r)| *u == url && r == "leader")
                .then_some(())
        });
    }

    /// The log name of controller `n` (from 1).
    pub fn controller_log(n: usize) -> String {
        if n == 1 {
            "controller".into()
        } else {
            format!("controller-{n}")
        }
    }

    /// Wait until some controller of `count` stops at a failpoint; returns
    /// which (from 1).
    pub fn wait_failpoint_of(&self, point: &str, count: usize) -> usize {
        let needle = format!("failpoint `{point}` reached");
        eventually(Duration::from_secs(60), &needle, || {
            (1..=count).find(|n| self.log(&Lab::controller_log(*n)).contains(&needle))
        })
    }

    /// SIGKILL controller `n` (from 1); returns its command line.
    pub fn kill_controller(&self, n: usize) -> Vec<String> {
        let data = format!("{} --fleet", self.dir.join(Lab::controller_log(n)).display());
        self.kill9(&["serve", &data], "exec-step")
    }

    /// Every command a host's agent journaled (its `job.json` files).
    pub fn jobs(&self, host: &str) -> Vec<Value> {
        let dir = self.dir.join("hosts").join(host).join("agent/journal");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if let Ok(text) = std::fs::read_to_string(e.path().join("job.json"))
                && let Ok(v) = serde_json::from_str::<Value>(&text)
            {
                out.push(v);
            }
        }
        out
    }

    fn up_args(name: &str, fleet: &str, grace: &str, env: &[(&str, &str)], fs: &[&str]) -> Lab {
        Lab::start(name, fleet, grace, env, fs, &[])
    }

    fn start(name: &str, fleet: &str, grace: &str, env: &[(&str, &str)], fs: &[&str], extra: &[&str]) -> Lab {
        let dir = std::env::temp_dir().join(format!("wavegate-lab-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let lab = Lab {
            dir,
            children: std::sync::Mutex::new(Vec::new()),
        };
        let mut cmd = Command::new(wavegate_bin());
        cmd.current_dir(crate::repo_root())
            .args(["lab", "up", "--fleet"])
            .arg(fixture(fleet))
            .arg("--dir")
            .arg(&lab.dir)
            .args(["--agent-grace", grace])
            .args(fs.iter().flat_map(|f| ["--fs", f]))
            .args(extra)
            .env_remove("WAVEGATE_FAILPOINT")
            .envs(env.iter().copied());
        let run: Run = cmd.output().expect("lab up").into();
        assert_eq!(run.status, 0, "lab up failed:\n{}\n{}", run.stdout, run.stderr);
        lab
    }

    /// Start `wavegate` as `who` in the background (for a call that a
    /// failpoint will freeze).
    pub fn spawn_as(&self, who: &str, args: &[&str]) -> std::process::Child {
        let mut cmd = Command::new(wavegate_bin());
        cmd.args(args)
            .current_dir(crate::repo_root())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in self.identity(who) {
            cmd.env(k, v);
        }
        cmd.spawn().expect("spawn wavegate")
    }

    /// Wait until the controller's log says it stopped at `point`.
    pub fn wait_failpoint(&self, point: &str) {
        let needle = format!("failpoint `{point}` reached");
        eventually(Duration::from_secs(60), &needle, || {
            self.log("controller").contains(&needle).then_some(())
        });
    }

    /// SIGKILL the controller and start it again on the same data and
    /// address, without any failpoint; wait for every agent.
    pub fn restart_controller(&self) {
        self.restart_controller_with(&[]);
    }

    /// Like [`Lab::restart_controller`], with some of its flags given other
    /// values (`("--fleet", "/path/to/another.yaml")`).
    pub fn restart_controller_with(&self, flags: &[(&str, &str)]) {
        let addr = std::fs::read_to_string(self.dir.join("controller.addr")).expect("addr");
        let mut args = self.kill9(&["serve", "--data"], "exec-step");
        for (flag, value) in flags {
            let i = args
                .iter()
                .position(|a| a == flag)
                .unwrap_or_else(|| panic!("the controller has no {flag}: {args:?}"));
            args[i + 1] = (*value).to_owned();
        }
        // The same gRPC address again, so the agents find it; the web view may move.
        if let Some(i) = args.iter().position(|a| a == "--listen") {
            args[i + 1] = addr.trim().to_owned();
        }
        self.respawn(&args, "controller-restarted");
        self.wait_agents();
    }

    /// The controller's URL.
    pub fn controller(&self) -> String {
        let lab: Value = serde_json::from_str(&std::fs::read_to_string(self.dir.join("lab.json")).expect("lab.json"))
            .expect("lab.json is JSON");
        lab["controller"].as_str().expect("controller URL").to_owned()
    }

    /// The environment of an identity file (`export K='V'` lines).
    pub fn identity(&self, who: &str) -> Vec<(String, String)> {
        let text =
            std::fs::read_to_string(self.dir.join("identities").join(format!("{who}.env"))).expect("identity file");
        text.lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
            .collect()
    }

    /// Run `wavegate` as `who`.
    pub fn wavegate_as(&self, who: &str, args: &[&str]) -> Run {
        let mut cmd = Command::new(wavegate_bin());
        cmd.args(args).current_dir(crate::repo_root());
        for (k, v) in self.identity(who) {
            cmd.env(k, v);
        }
        cmd.output().expect("run wavegate").into()
    }

    /// Write a plan into the lab's directory; returns its path.
    pub fn write_plan(&self, name: &str, yaml: &str) -> String {
        let path = self.dir.join(format!("{name}.yaml"));
        std::fs::write(&path, yaml).expect("plan");
        path.display().to_string()
    }

    /// Submit the plan at `path` as the submitter; returns the rollout id.
    pub fn submit_path(&self, path: &str) -> String {
        let run = self.wavegate_as("submitter", &["rollout", "submit", path, "--output", "json"]);
        assert_eq!(run.status, 0, "submit failed:\n{}\n{}", run.stdout, run.stderr);
        run.json()["id"].as_str().expect("id").to_owned()
    }

    /// `audit verify` as the auditor must pass.
    pub fn audit_verifies(&self) {
        let run = self.wavegate_as("auditor", &["audit", "verify"]);
        assert_eq!(
            run.status, 0,
            "the audit log must verify:\n{}\n{}",
            run.stdout, run.stderr
        );
    }

    /// Submit a fixture plan as the submitter; returns the rollout id.
    pub fn submit(&self, plan: &str) -> String {
        let path = fixture(plan);
        let run = self.wavegate_as(
            "submitter",
            &[
                "rollout",
                "submit",
                path.to_str().expect("utf-8 path"),
                "--output",
                "json",
            ],
        );
        assert_eq!(run.status, 0, "submit failed:\n{}\n{}", run.stdout, run.stderr);
        run.json()["id"].as_str().expect("id").to_owned()
    }

    /// Approve as the approver.
    pub fn approve(&self, id: &str) {
        let run = self.wavegate_as("approver", &["rollout", "approve", id]);
        assert_eq!(run.status, 0, "approve failed:\n{}\n{}", run.stdout, run.stderr);
    }

    /// Undo a rollout as people do: the submitter asks for the rollback
    /// (which only shows what it would revert), then the approver and, when
    /// the plan needs two approvals, the admin approve the preview they read,
    /// and the hosts are restored. Returns the request's text.
    pub fn rollback(&self, id: &str) -> String {
        let asked = self.wavegate_as("submitter", &["rollout", "rollback", id]);
        assert_eq!(
            asked.status, 0,
            "rollback request failed:\n{}\n{}",
            asked.stdout, asked.stderr
        );
        let request = |s: &Value| s["rollback_requests"].as_array().and_then(|q| q.last()).cloned();
        let q = request(&self.status(id)).expect("the request");
        let digest = q["preview_digest"]
            .as_str()
            .expect("the request's preview digest")
            .to_owned();
        for who in ["approver", "admin"] {
            if request(&self.status(id)).is_some_and(|q| q["state"] == "done") {
                break;
            }
            let run = self.wavegate_as(who, &["rollout", "rollback", id, "--approve", "--preview", &digest]);
            assert_eq!(
                run.status, 0,
                "rollback approval by {who} failed:\n{}\n{}",
                run.stdout, run.stderr
            );
        }
        let q = request(&self.status(id)).expect("the request");
        assert_eq!(q["state"], "done", "the rollback request did not run: {q:#}");
        asked.stdout
    }

    /// `rollout status --output json` as the auditor.
    pub fn status(&self, id: &str) -> Value {
        let run = self.wavegate_as("auditor", &["rollout", "status", id, "--output", "json"]);
        assert_eq!(run.status, 0, "status failed:\n{}\n{}", run.stdout, run.stderr);
        run.json()
    }

    /// Wait until the rollout is in `state`.
    pub fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        let mut last = Value::Null;
        let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            eventually(timeout, &format!("rollout {id} to be {state}"), || {
                // During a failover a controller may not answer for a
                // moment: ask again.
                let run = self.wavegate_as("auditor", &["rollout", "status", id, "--output", "json"]);
                if run.status != 0 {
                    last = Value::String(run.stderr);
                    return None;
                }
                let s = run.json();
                last = s.clone();
                (s["state"] == state).then_some(s)
            })
        }));
        match found {
            Ok(s) => s,
            Err(_) => panic!(
                "rollout {id} never became {state}; last status:\n{last:#}\ncontroller log:\n{}",
                self.log("controller")
            ),
        }
    }

    /// A path inside a host's root.
    pub fn host_path(&self, host: &str, path: &str) -> PathBuf {
        self.dir
            .join("hosts")
            .join(host)
            .join("root")
            .join(path.trim_start_matches('/'))
    }

    /// A host file's text, if it exists.
    pub fn read_host(&self, host: &str, path: &str) -> Option<String> {
        std::fs::read_to_string(self.host_path(host, path)).ok()
    }

    /// The lines of a host file (none when it does not exist).
    pub fn host_lines(&self, host: &str, path: &str) -> Vec<String> {
        self.read_host(host, path)
            .map(|s| s.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// The lines the lab fixtures' steps append to `/etc/wavegate-marker`
    /// on `host`, one per run of the step (none when it never ran).
    pub fn marker_lines(&self, host: &str) -> Vec<String> {
        self.host_lines(host, "/etc/wavegate-marker")
    }

    /// Every file of every host's own tree (not the machine's system
    /// directories, nor the btrfs snapshots wavegate keeps beside the
    /// data), on every filesystem mounted in it: path -> (bytes, mode,
    /// owner). For "nothing changed".
    pub fn all_host_files(&self) -> std::collections::BTreeMap<String, (Vec<u8>, u32, u32)> {
        use std::os::unix::fs::MetadataExt as _;
        let mut out = std::collections::BTreeMap::new();
        let hosts = self.dir.join("hosts");
        for host in std::fs::read_dir(&hosts).expect("hosts").flatten() {
            let root = host.path().join("root");
            let mut stack = vec![root.clone()];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                    let p = e.path();
                    let rel = p.strip_prefix(&root).expect("rel").display().to_string();
                    if [
                        "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "dev", "proc", "tmp",
                    ]
                    .contains(&rel.as_str())
                        || rel.ends_with(".wavegate-snapshots")
                    {
                        continue;
                    }
                    let Ok(m) = p.symlink_metadata() else { continue };
                    let key = format!("{}:/{rel}", host.file_name().to_string_lossy());
                    if m.is_dir() {
                        out.insert(key, (Vec::new(), m.mode(), m.uid()));
                        stack.push(p);
                    } else if m.is_file() {
                        out.insert(key, (std::fs::read(&p).unwrap_or_default(), m.mode(), m.uid()));
                    } else {
                        out.insert(key, (b"(special)".to_vec(), m.mode(), m.uid()));
                    }
                }
            }
        }
        out
    }

    /// Write a file into a host's root (creating its directories).
    pub fn seed(&self, host: &str, path: &str, text: &str) {
        let p = self.host_path(host, path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("seed");
    }

    /// Run a command on a host as its steps see it (`wavegate lab exec`).
    pub fn exec(&self, host: &str, cmd: &[&str]) -> Run {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "lab".as_ref(),
            "exec".as_ref(),
            "--dir".as_ref(),
            self.dir.as_os_str(),
            host.as_ref(),
            "--".as_ref(),
        ];
        args.extend(cmd.iter().map(std::ffi::OsStr::new));
        wavegate(args)
    }

    /// A host's current boot id (the lab writes a new one at every boot).
    pub fn boot_id(&self, host: &str) -> String {
        std::fs::read_to_string(self.dir.join("hosts").join(host).join("boot-id"))
            .expect("boot-id")
            .trim()
            .to_owned()
    }

    /// A log of the lab (`controller`, `agent-<host>`).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join("logs").join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Processes of this lab whose command line contains every needle, the
    /// hosts' own `lab boot` processes included.
    pub fn pids_all(&self, needles: &[&str]) -> Vec<(i32, Vec<String>)> {
        self.find(needles, true)
    }

    /// Processes of this lab whose command line contains every needle (not
    /// counting the hosts' `lab boot` processes, which name their agents).
    pub fn pids(&self, needles: &[&str]) -> Vec<(i32, Vec<String>)> {
        self.find(needles, false)
    }

    fn find(&self, needles: &[&str], machines: bool) -> Vec<(i32, Vec<String>)> {
        let dir = self.dir.display().to_string();
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let line = args.join(" ");
            // A host's `lab boot` names its agent's command line too; it is
            // the host's machine, not the agent.
            let machine = args.windows(2).any(|w| w[0] == "lab" && w[1] == "boot");
            if line.contains(&dir) && needles.iter().all(|n| line.contains(n)) && (machines || !machine) {
                out.push((pid, args));
            }
        }
        out
    }

    /// SIGKILL one process of the lab; returns its command line.
    pub fn kill9(&self, needles: &[&str], exclude: &str) -> Vec<String> {
        let found: Vec<_> = self
            .pids(needles)
            .into_iter()
            .filter(|(_, a)| !a.join(" ").contains(exclude))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "expected one process matching {needles:?}, found {found:?}"
        );
        let (pid, args) = found.into_iter().next().expect("one");
        let status = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        // Gone, or a zombie: only then has it closed its files. (Its
        // command line empties earlier, when its memory goes, while its
        // files, and the store's lock with them, are still open: a
        // controller started again in that moment found its store locked.)
        // A zombie leader can still have threads tearing down, which hold
        // the files they share: all of them must be gone.
        eventually(Duration::from_secs(5), "the killed process to be gone", || {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = state.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
            let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count);
            (matches!(state, None | Some(None | Some('Z' | 'X'))) && threads <= 1).then_some(())
        });
        args
    }

    /// Start a process again from its command line, logging to `log`.
    pub fn respawn(&self, args: &[String], log: &str) {
        let out = std::fs::File::create(self.dir.join("logs").join(format!("{log}.log"))).expect("log");
        let err = out.try_clone().expect("log");
        let child = Command::new(&args[0])
            .env_remove("WAVEGATE_FAILPOINT")
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .expect("respawn");
        self.children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(child);
    }

    /// Restart one host's agent so that it dials `controller` instead (a
    /// proxy); waits until every agent is connected.
    pub fn reroute_agent(&self, host: &str, controller: &str) {
        let mut args = self.kill9(&["wavegate-agent", "--host-id", host], "exec-step");
        let i = args.iter().position(|a| a == "--controller").expect("--controller");
        args[i + 1] = controller.to_owned();
        self.respawn(&args, &format!("agent-{host}-rerouted"));
        self.wait_agents();
    }

    /// The host ids of each wave of a rollout, in order.
    pub fn waves(&self, id: &str) -> Vec<Vec<String>> {
        self.status(id)["waves"]
            .as_array()
            .expect("waves")
            .iter()
            .map(|w| {
                w["hosts"]
                    .as_array()
                    .expect("hosts")
                    .iter()
                    .map(|h| h["id"].as_str().expect("id").to_owned())
                    .collect()
            })
            .collect()
    }

    /// A host's state in a rollout.
    pub fn host_state(&self, id: &str, host: &str) -> (String, String) {
        let s = self.status(id);
        for w in s["waves"].as_array().expect("waves") {
            for h in w["hosts"].as_array().expect("hosts") {
                if h["id"] == host {
                    return (
                        h["state"].as_str().unwrap_or_default().to_owned(),
                        h["detail"].as_str().unwrap_or_default().to_owned(),
                    );
                }
            }
        }
        panic!("{host} is not in rollout {id}");
    }

    /// Wait until every agent of the lab is connected again.
    pub fn wait_agents(&self) {
        eventually(Duration::from_secs(60), "every agent to connect", || {
            let run = wavegate([
                "lab".as_ref(),
                "status".as_ref(),
                "--dir".as_ref(),
                self.dir.as_os_str(),
            ]);
            (run.status == 0).then_some(())
        });
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = wavegate(["lab".as_ref(), "down".as_ref(), "--dir".as_ref(), self.dir.as_os_str()]);
        for mut child in self
            .children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// An answer of the web view.
#[derive(Debug)]
pub struct Http {
    /// The status code (0 when curl got no answer).
    pub status: u16,
    /// The header lines, as sent.
    pub head: String,
    /// The body.
    pub body: String,
}

impl Http {
    /// The value of a header (named in any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// The web view: HTTPS with the controller's certificate, read with curl
/// trusting the lab's CA.
impl Lab {
    /// The first controller's web view (`https://ADDR`).
    pub fn web(&self) -> String {
        let lab: Value = serde_json::from_str(&std::fs::read_to_string(self.dir.join("lab.json")).expect("lab.json"))
            .expect("lab.json is JSON");
        lab["web"].as_str().expect("lab.json names the web view").to_owned()
    }

    /// The first controller's current login link (the file `lab.json`
    /// names: each use of a link writes the next one there).
    pub fn web_login(&self) -> String {
        let lab: Value = serde_json::from_str(&std::fs::read_to_string(self.dir.join("lab.json")).expect("lab.json"))
            .expect("lab.json is JSON");
        let file = lab["web_login_files"][0]
            .as_str()
            .expect("lab.json names the login file");
        std::fs::read_to_string(file).expect("the login file").trim().to_owned()
    }

    /// curl arguments that present a certificate of the lab: an identity
    /// (`auditor`, `admin`, ...) or `agent-HOST`.
    pub fn cert_args(&self, who: &str) -> Vec<String> {
        let certs = self.dir.join("certs");
        let (cert, key) = match who.strip_prefix("agent-") {
            Some(_) => (certs.join(format!("{who}.pem")), certs.join(format!("{who}.key"))),
            None => {
                let env = self.identity(who);
                let get = |k: &str| {
                    env.iter()
                        .find(|(n, _)| n == k)
                        .map(|(_, v)| PathBuf::from(v))
                        .unwrap_or_else(|| panic!("{who} has no {k}"))
                };
                (get("WAVEGATE_CERT"), get("WAVEGATE_KEY"))
            }
        };
        vec![
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
        ]
    }

    /// GET `url` (a path on the first web view, or a whole URL) with more
    /// curl arguments (a certificate, a header, a cookie).
    pub fn web_get(&self, url: &str, args: &[String]) -> Http {
        let url = if url.starts_with('/') {
            format!("{}{url}", self.web())
        } else {
            url.to_owned()
        };
        let out = Command::new("curl")
            .args(["-s", "-S", "--max-time", "30", "-D", "-", "--cacert"])
            .arg(self.dir.join("certs").join("ca.pem"))
            .args(args)
            .arg(&url)
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        Http {
            status: head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0),
            head: head.to_owned(),
            body: body.to_owned(),
        }
    }

    /// GET a path on the first web view as the lab identity `who`.
    pub fn web_as(&self, who: &str, path: &str) -> Http {
        self.web_get(path, &self.cert_args(who))
    }
}
