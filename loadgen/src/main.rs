//! `wavegate-loadgen`: plays thousands of hosts from one process, each with
//! its own certificate and its own mutual-TLS gRPC session, against a real
//! `wavegate serve`; and the scale benchmarks built on it. Every figure it
//! prints is measured in the run that prints it.

mod fake;
mod rig;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use tokio::time::Instant;
use wavegate::cli::client::Client;
use wavegate::tls::CertDir;
use wavegate_proto::v1 as pb;

use crate::fake::{Kind, first_of};
use crate::rig::{Rig, cpu_time, noop_plan, raise_nofile, rss_kib};

/// Load generator and scale benchmarks for wavegate.
#[derive(Debug, Parser)]
#[command(name = "wavegate-loadgen", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Connect a fake agent for every host of an inventory to a running
    /// controller and answer its commands (every step succeeds) until
    /// interrupted. The certificate directory must hold `agent-<host>.pem`
    /// and `.key` for each host (`wavegate certs issue`).
    Agents {
        /// Controller URL.
        #[arg(long)]
        controller: String,
        /// Certificate directory (`ca.pem`, `agent-<host>.pem|.key`).
        #[arg(long)]
        certs: PathBuf,
        /// The inventory whose hosts to play.
        #[arg(long)]
        fleet: PathBuf,
        /// TLS handshakes in flight at once.
        #[arg(long, default_value_t = 256)]
        parallel: usize,
    },
    /// Benchmark 1: controller memory with 1,000, 5,000 and 10,000 agents.
    Memory {
        /// Agent counts, measured in increasing order on one controller.
        #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
        agents: Vec<usize>,
    },
    /// Benchmark 2: a one-step no-op plan, waves [1, 10%, 100%], no bake.
    Rollout {
        /// Fleet sizes, each on a fresh controller.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        hosts: Vec<usize>,
        /// Keep the state in a 3-member etcd cluster of the benchmark's own
        /// (`--store etcd://...`) instead of redb.
        #[arg(long)]
        etcd: bool,
        /// The plan's `max_in_flight` (default: the plan default, 10 %).
        #[arg(long)]
        max_in_flight: Option<String>,
    },
    /// Benchmark 10: failover. Two controllers on a 3-member etcd; the
    /// leader is SIGKILLed mid-rollout; the time from the kill until the
    /// standby leads and until it sends its first step.
    Failover {
        /// Fleet size (one host per wave, so steps flow all the time).
        #[arg(long, default_value_t = 60)]
        hosts: usize,
        /// Failovers to measure, each on a fresh rig.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// The leadership lease (`wavegate serve --lease-ttl`).
        #[arg(long, default_value = "3s", value_parser = wavegate::cli::serve::duration)]
        lease_ttl: Duration,
    },
    /// Benchmark 3: halt latency after a failing step in wave 2.
    Halt {
        /// Fleet size.
        #[arg(long, default_value_t = 1000)]
        hosts: usize,
        /// Rollouts to halt (one after the other).
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// The plan's `max_in_flight` (default: the plan default, 10 %).
        #[arg(long)]
        max_in_flight: Option<String>,
    },
    /// Benchmark 4: a real `wavegate-agent`'s memory and CPU while idle and
    /// connected (heartbeats only).
    AgentIdle {
        /// How long to watch it.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cmd: Cmd) -> Result<()> {
    raise_nofile()?;
    match cmd {
        Cmd::Agents {
            controller,
            certs,
            fleet,
            parallel,
        } => agents(&controller, &certs, &fleet, parallel).await,
        Cmd::Memory { agents } => memory(&agents).await,
        Cmd::Rollout {
            hosts,
            etcd,
            max_in_flight,
        } => {
            for n in hosts {
                rollout(n, etcd, max_in_flight.as_deref()).await?;
            }
            Ok(())
        }
        Cmd::Failover { hosts, runs, lease_ttl } => failover(hosts, runs, lease_ttl).await,
        Cmd::Halt {
            hosts,
            runs,
            max_in_flight,
        } => halt(hosts, runs, max_in_flight.as_deref()).await,
        Cmd::AgentIdle { seconds } => agent_idle(seconds).await,
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|k| k.parse::<u64>().ok())
        .map_or(0, |k| k / 1024 / 1024);
    format!("{cpu}, {cores} cores, {mem} GiB RAM")
}

async fn agents(url: &str, certs: &std::path::Path, fleet: &std::path::Path, parallel: usize) -> Result<()> {
    let text = std::fs::read_to_string(fleet).with_context(|| format!("reading {}", fleet.display()))?;
    let name = fleet.display().to_string();
    let parsed = wavegate_domain::Fleet::parse(wavegate_domain::Source {
        name: &name,
        text: &text,
    })
    .map_err(|v| anyhow::anyhow!("{}", v.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")))?;
    let hosts: Vec<String> = parsed.hosts().map(|h| parsed.id(h).to_owned()).collect();
    let fake = Arc::new(fake::Fleet::default());
    let started = Instant::now();
    fake::start(url, &CertDir::new(certs), &hosts, &fake, parallel).await?;
    println!(
        "{} fake agents connected in {:.1} s; answering until interrupted",
        hosts.len(),
        started.elapsed().as_secs_f64()
    );
    tokio::signal::ctrl_c().await?;
    let seen = fake.seen();
    println!("{} commands answered", seen.len());
    Ok(())
}

async fn memory(sizes: &[usize]) -> Result<()> {
    let max = sizes.iter().copied().max().unwrap_or(0);
    println!("benchmark 1: controller memory with connected agents ({})", machine());
    let rig = Rig::up("memory", max).await?;
    let mut admin = rig.operator("admin").await?;
    // The baseline: started, inventory loaded, one operator connection.
    rig.wait_connected(&mut admin, 0).await?;
    let base = rss_kib(rig.pid())?;
    println!("  controller idle, no agents: {base} KiB resident");
    let fake = Arc::new(fake::Fleet::default());
    let mut connected = 0;
    for &n in sizes {
        let started = Instant::now();
        fake::start(&rig.url, &rig.certs, &rig.hosts[connected..n], &fake, 256).await?;
        rig.wait_connected(&mut admin, n).await?;
        connected = n;
        let rss = rss_kib(rig.pid())?;
        let per = (rss.saturating_sub(base)) as f64 * 1024.0 / n as f64;
        println!(
            "  {n:>6} agents: controller {rss:>8} KiB resident, {:>6.1} KB per agent (target < 100 KB); connected in {:.1} s",
            per / 1000.0,
            started.elapsed().as_secs_f64()
        );
    }
    println!(
        "  fake agents alive at the end: {}",
        fake.connected.load(Ordering::SeqCst)
    );
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn status(client: &mut Client, id: &str) -> Result<pb::RolloutStatus> {
    Ok(client
        .status(pb::RolloutRequest { id: id.to_owned() })
        .await?
        .into_inner())
}

async fn submit(client: &mut Client, plan: String) -> Result<pb::SubmitResponse> {
    Ok(client
        .submit(pb::SubmitRequest {
            plan_yaml: plan,
            plan_file: "loadgen-plan.yaml".into(),
            bypass: Vec::new(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("submit refused: {}", s.message()))?
        .into_inner())
}

async fn rollout(n: usize, etcd: bool, max_in_flight: Option<&str>) -> Result<()> {
    println!(
        "benchmark 2: one-step no-op plan over {n} hosts, waves [1, 10%, 100%], no bake, max_in_flight {}, store {} ({})",
        max_in_flight.unwrap_or("10% (default)"),
        if etcd { "etcd (3 members, loopback)" } else { "redb" },
        machine()
    );
    let store = if etcd {
        rig::Store::Etcd {
            controllers: 1,
            lease_ttl: Duration::from_secs(10),
        }
    } else {
        rig::Store::Redb
    };
    let rig = Rig::up_on("rollout", n, store).await?;
    let fake = Arc::new(fake::Fleet::default());
    let started = Instant::now();
    fake::start(&rig.url, &rig.certs, &rig.hosts, &fake, 256).await?;
    let mut admin = rig.operator("admin").await?;
    rig.wait_connected(&mut admin, n).await?;
    println!("  {n} agents connected in {:.1} s", started.elapsed().as_secs_f64());
    let (mut submitter, mut approver) = (rig.operator("submitter").await?, rig.operator("approver").await?);
    let t = Instant::now();
    let sub = submit(&mut submitter, noop_plan(n, "noop", "0", max_in_flight)).await?;
    let submit_time = t.elapsed();
    let waves: Vec<Vec<String>> = status(&mut submitter, &sub.id)
        .await?
        .waves
        .iter()
        .map(|w| w.hosts.iter().map(|h| h.id.clone()).collect())
        .collect();
    fake.clear();
    let cpu0 = cpu_time(rig.pid())?;
    let t0 = Instant::now();
    approver
        .approve(pb::ApproveRequest {
            id: sub.id.clone(),
            plan_hash: sub.plan_hash.clone(),
        })
        .await?;
    // Every host answers its step, then the rollout completes.
    let deadline = t0 + Duration::from_secs(600);
    loop {
        let steps = fake::first_of(&fake.seen(), Kind::Step).len();
        if steps >= n {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {steps} of {n} hosts got their step in 600 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let final_status = loop {
        let s = status(&mut submitter, &sub.id).await?;
        if s.state == "completed" {
            break s;
        }
        if s.state != "running" || Instant::now() > deadline {
            bail!("the rollout ended {}: {}", s.state, s.halt_reason);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let total = t0.elapsed();
    let cpu = cpu_time(rig.pid())?.saturating_sub(cpu0);
    let seen = fake.seen();

    // Checks that make the figures mean something.
    let mut steps_per_host: HashMap<&str, usize> = HashMap::new();
    for s in seen.iter().filter(|s| s.kind == Kind::Step) {
        *steps_per_host.entry(&s.host).or_default() += 1;
    }
    let twice = steps_per_host.values().filter(|&&c| c != 1).count();
    if steps_per_host.len() != n || twice != 0 {
        bail!(
            "{} hosts got a step, {twice} of them more than once (expected {n}, each once)",
            steps_per_host.len()
        );
    }
    let healthy = final_status
        .waves
        .iter()
        .flat_map(|w| &w.hosts)
        .filter(|h| h.state == "healthy")
        .count();
    if healthy != n {
        bail!("{healthy} of {n} hosts ended healthy");
    }

    // Dispatch latency: from the moment a wave may start (approval, or the
    // last answer of the wave before) to each host's first command and to
    // its real step.
    let first_any = {
        let mut m: HashMap<Arc<str>, Instant> = HashMap::new();
        for s in &seen {
            m.entry(Arc::clone(&s.host)).or_insert(s.at);
        }
        m
    };
    let step_at = first_of(&seen, Kind::Step);
    let last_answer: HashMap<Arc<str>, Instant> = {
        let mut m: HashMap<Arc<str>, Instant> = HashMap::new();
        for s in seen.iter().filter(|s| s.kind == Kind::Step) {
            m.insert(Arc::clone(&s.host), s.answered);
        }
        m
    };
    let (mut to_first, mut to_step) = (Vec::new(), Vec::new());
    let mut wave_start = t0;
    for (i, wave) in waves.iter().enumerate() {
        let mut wave_end = wave_start;
        for h in wave {
            let h: &str = h;
            let first = first_any.get(h).copied().context("a host without commands")?;
            let step = step_at.get(h).copied().context("a host without a step")?;
            to_first.push(first.saturating_duration_since(wave_start));
            to_step.push(step.saturating_duration_since(wave_start));
            wave_end = wave_end.max(last_answer.get(h).copied().unwrap_or(wave_end));
        }
        println!(
            "  wave {}: {:>5} hosts, {}",
            i + 1,
            wave.len(),
            ms(wave_end.saturating_duration_since(wave_start))
        );
        wave_start = wave_end;
    }
    to_first.sort();
    to_step.sort();
    let commands = seen.len();
    println!("  submit (checks and the canary's dry-run): {}", ms(submit_time));
    println!(
        "  approval to completed: {:.2} s (target for 10,000 hosts: < 10 s)",
        total.as_secs_f64()
    );
    println!(
        "  per host: {:.0} us of wall time, {:.0} us of controller CPU; {:.1} commands per host",
        total.as_secs_f64() * 1e6 / n as f64,
        cpu.as_secs_f64() * 1e6 / n as f64,
        commands as f64 / n as f64
    );
    println!(
        "  dispatch latency, wave start to first command: p50 {}, p99 {}, max {}",
        ms(percentile(&to_first, 0.50)),
        ms(percentile(&to_first, 0.99)),
        ms(percentile(&to_first, 1.0))
    );
    println!(
        "  wave start to real step (after dry-run and snapshot): p50 {}, p99 {}, max {}",
        ms(percentile(&to_step, 0.50)),
        ms(percentile(&to_step, 0.99)),
        ms(percentile(&to_step, 1.0))
    );
    println!("  every host got exactly one step and ended healthy");
    Ok(())
}

async fn halt(n: usize, runs: usize, max_in_flight: Option<&str>) -> Result<()> {
    println!(
        "benchmark 3: halt latency, {n} hosts, a failing step in wave 2, max_in_flight {}, {runs} rollouts ({})",
        max_in_flight.unwrap_or("10% (default)"),
        machine()
    );
    let rig = Rig::up("halt", n).await?;
    let fake = Arc::new(fake::Fleet::default());
    fake::start(&rig.url, &rig.certs, &rig.hosts, &fake, 256).await?;
    let mut admin = rig.operator("admin").await?;
    rig.wait_connected(&mut admin, n).await?;
    let (mut submitter, mut approver) = (rig.operator("submitter").await?, rig.operator("approver").await?);
    let (mut observed, mut committed, mut after, mut inflight) = (Vec::new(), Vec::new(), 0usize, Vec::new());
    let mut limit = 0u64;
    for run in 0..runs {
        let sub = submit(&mut submitter, noop_plan(n, &format!("halt-{run}"), "0", max_in_flight)).await?;
        let st = status(&mut submitter, &sub.id).await?;
        let wave2: Vec<String> = st
            .waves
            .get(1)
            .map(|w| w.hosts.iter().map(|h| h.id.clone()).collect())
            .unwrap_or_default();
        limit = st.waves.get(1).map_or(0, |w| w.max_in_flight);
        fake.clear();
        fake.fail_first_step_of(wave2);
        approver
            .approve(pb::ApproveRequest {
                id: sub.id.clone(),
                plan_hash: sub.plan_hash.clone(),
            })
            .await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let (failed_at, _) = loop {
            if let Some(f) = fake
                .failed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
            {
                break f;
            }
            if Instant::now() > deadline {
                bail!("no step of wave 2 was sent in 120 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let seen_halted = loop {
            let s = status(&mut admin, &sub.id).await?;
            if s.state == "halted" {
                break Instant::now();
            }
            if Instant::now() > deadline {
                bail!("rollout {} did not halt: {}", sub.id, s.state);
            }
        };
        observed.push(seen_halted.saturating_duration_since(failed_at));
        let commit = rig
            .metric("wavegate_controller_last_halt_commit_seconds")
            .await?
            .context("the controller reports no halt commit time")?;
        committed.push(Duration::from_secs_f64(commit));
        let seen = fake.seen();
        let steps_after = seen
            .iter()
            .filter(|s| s.kind == Kind::Step && s.at > seen_halted)
            .count();
        after += steps_after;
        inflight.push(
            seen.iter()
                .filter(|s| s.kind == Kind::Step && s.at > failed_at && s.at <= seen_halted)
                .count(),
        );
        admin.abort(pb::RolloutRequest { id: sub.id.clone() }).await?;
    }
    observed.sort();
    committed.sort();
    println!(
        "  controller, failing result received to halt committed (fdatasync done): p50 {}, p99 {}, max {} (target < 50 ms)",
        ms(percentile(&committed, 0.5)),
        ms(percentile(&committed, 0.99)),
        ms(percentile(&committed, 1.0))
    );
    println!(
        "  end to end, failing result sent to a Status call showing `halted`: p50 {}, p99 {}, max {}",
        ms(percentile(&observed, 0.5)),
        ms(percentile(&observed, 0.99)),
        ms(percentile(&observed, 1.0))
    );
    let most = inflight.iter().max().copied().unwrap_or(0);
    println!(
        "  real steps that arrived between the failing result and the observed halt: max {most} per run (bound: max_in_flight of wave 2 = {limit})"
    );
    println!("  real steps that arrived after the observed halt: {after} (target: 0)");
    if after != 0 {
        bail!("{after} hosts got a step after the halt");
    }
    if most as u64 > limit {
        bail!("{most} steps arrived after the failing result, more than max_in_flight ({limit})");
    }
    Ok(())
}

async fn agent_idle(seconds: u64) -> Result<()> {
    println!(
        "benchmark 4: an idle, connected wavegate-agent over {seconds} s ({})",
        machine()
    );
    let rig = Rig::up("agent-idle", 1).await?;
    let host = &rig.hosts[0];
    let exe = std::env::current_exe()?;
    let agent = exe.parent().map(|p| p.join("wavegate-agent")).unwrap_or_default();
    let pair = rig.certs.agent(host);
    let (root, state) = (rig.dir.join("host-root"), rig.dir.join("agent-state"));
    std::fs::create_dir_all(&root)?;
    let log = std::fs::File::create(rig.dir.join("agent.log"))?;
    let mut child = std::process::Command::new(&agent)
        .args(["--controller", &rig.url, "--host-id", host])
        .arg("--ca")
        .arg(rig.certs.ca())
        .arg("--cert")
        .arg(&pair.cert)
        .arg("--key")
        .arg(&pair.key)
        .arg("--host-root")
        .arg(&root)
        .arg("--state-dir")
        .arg(&state)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", agent.display()))?;
    let mut admin = rig.operator("admin").await?;
    let measured = async {
        rig.wait_connected(&mut admin, 1).await?;
        let pid = child.id();
        let (rss0, cpu0, t0) = (rss_kib(pid)?, cpu_time(pid)?, Instant::now());
        // The measurement window: the agent only sends heartbeats.
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let (rss1, cpu1, wall) = (rss_kib(pid)?, cpu_time(pid)?, t0.elapsed());
        let cpu = cpu1.saturating_sub(cpu0);
        println!("  resident memory: {rss0} KiB after connecting, {rss1} KiB at the end (target < 10 MB)");
        println!(
            "  CPU: {:.0} ms over {:.0} s, {:.3}% of one core (target: not measurable)",
            cpu.as_secs_f64() * 1000.0,
            wall.as_secs_f64(),
            100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
        );
        anyhow::Ok(())
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    measured
}

/// A one-step no-op plan with one host per wave and no bake: a step is in
/// flight at every moment of the rollout.
fn one_by_one_plan(n: usize) -> String {
    let waves: String = (0..n).map(|_| "  - size: 1\n").collect();
    format!(
        "name: failover\ntargets:\n  groups: [g-load]\n  expect_count: {n}\nsteps:\n  - name: noop\n    run: \"true\"\n    writes: [/var/lib/wavegate-noop]\n    timeout: 60s\nwaves:\n{waves}health:\n  bake: 0s\n  interval: 1s\nfailure_budget:\n  canary: 0\n  wave: 0\non_failure: halt\n"
    )
}

async fn failover(n: usize, runs: usize, lease_ttl: Duration) -> Result<()> {
    println!(
        "benchmark 10: failover, two controllers on a 3-member etcd (loopback), lease {lease_ttl:?}, {n} hosts one per wave ({})",
        machine()
    );
    let (mut elected, mut first_step) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        let mut rig = Rig::up_on(
            "failover",
            n,
            rig::Store::Etcd {
                controllers: 2,
                lease_ttl,
            },
        )
        .await?;
        rig.wait_role(1, "standby", Duration::from_secs(30)).await?;
        let fake = Arc::new(fake::Fleet::default());
        fake::start_on(&rig.urls, &rig.certs, &rig.hosts, &fake, 64, true).await?;
        let mut admin = rig.operator("admin").await?;
        rig.wait_connected(&mut admin, n).await?;
        let (mut submitter, mut approver) = (rig.operator("submitter").await?, rig.operator("approver").await?);
        let sub = submit(&mut submitter, one_by_one_plan(n)).await?;
        approver
            .approve(pb::ApproveRequest {
                id: sub.id.clone(),
                plan_hash: sub.plan_hash.clone(),
            })
            .await?;
        // Let a third of the waves pass, then kill the leader mid-wave.
        let deadline = Instant::now() + Duration::from_secs(120);
        while first_of(&fake.seen(), Kind::Step).len() < n / 3 {
            if Instant::now() > deadline {
                bail!("the rollout did not get a third of the way in 120 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        rig.kill(0)?;
        let killed = Instant::now();
        rig.wait_role(1, "leader", lease_ttl * 4 + Duration::from_secs(10))
            .await?;
        let led = killed.elapsed();
        let stepped = loop {
            if let Some(s) = fake.seen().iter().find(|s| s.kind == Kind::Step && s.at > killed) {
                break s.at.saturating_duration_since(killed);
            }
            if Instant::now() > killed + Duration::from_secs(120) {
                bail!("the new leader sent no step within 120 s of the kill");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        // It finishes the rollout, every host healthy.
        let done = loop {
            let s = status(&mut rig.operator("admin").await?, &sub.id).await?;
            if s.state != "running" {
                break s;
            }
            if Instant::now() > killed + Duration::from_secs(300) {
                bail!("the new leader did not finish the rollout in 300 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let healthy = done
            .waves
            .iter()
            .flat_map(|w| &w.hosts)
            .filter(|h| h.state == "healthy")
            .count();
        if done.state != "completed" || healthy != n {
            bail!(
                "after the failover the rollout ended {} with {healthy} of {n} hosts healthy",
                done.state
            );
        }
        println!(
            "  run {run}: leader killed -> standby leads {}, -> its first step sent {}; rollout completed, {n} of {n} healthy",
            ms(led),
            ms(stepped)
        );
        elected.push(led);
        first_step.push(stepped);
    }
    elected.sort();
    first_step.sort();
    println!(
        "  kill to new leader: p50 {}, max {}; kill to first step by the new leader: p50 {}, max {} (lease {lease_ttl:?})",
        ms(percentile(&elected, 0.5)),
        ms(percentile(&elected, 1.0)),
        ms(percentile(&first_step, 0.5)),
        ms(percentile(&first_step, 1.0))
    );
    Ok(())
}
