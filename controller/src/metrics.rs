//! Prometheus metrics on an explicit registry (never the global one). Names
//! are `wavegate_controller_*`; a host id is never a label.

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Every metric the controller exports.
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Rollouts by state (set at scrape time).
    pub rollouts: IntGaugeVec,
    /// Waves confirmed healthy.
    pub waves_confirmed: IntCounter,
    /// Waves that halted.
    pub waves_halted: IntCounter,
    /// Real step results by outcome.
    pub steps: IntCounterVec,
    /// Dry-runs that blocked a step.
    pub dry_runs_blocked: IntCounter,
    /// Bytes of snapshots pinned (their wave not yet confirmed).
    pub snapshot_pinned_bytes: IntGauge,
    /// Agents with a live session.
    pub agents_connected: IntGauge,
    /// Hosts with an active updater outside the rollout, by kind
    /// (`unattended-upgrades`, `apt-daily`, ...), as their agents reported.
    pub hosts_with_updaters: IntGaugeVec,
    /// Records in the audit log.
    pub audit_records: IntGauge,
    /// Real step durations.
    pub step_duration: Histogram,
    /// Wave durations, start to confirmation.
    pub wave_duration: Histogram,
    /// From an agent's failing result arriving to the halt it caused being
    /// committed to the store.
    pub halt_commit: Histogram,
    /// The same, for the latest halt.
    pub last_halt_commit: Gauge,
    /// Bytes of steps' and checks' output stored.
    pub output_bytes: IntCounter,
    /// Bytes of output agents could not send (their session was full).
    pub output_dropped: IntCounter,
    /// Bytes of output not stored because a host was over its cap.
    pub output_capped: IntCounter,
    /// Results and output chunks an agent sent for a command that was not
    /// sent to its host (refused).
    pub foreign_messages: IntCounter,
}

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let name = |n: &str, help: &str| Opts::new(format!("wavegate_controller_{n}"), help);
        let m = Metrics {
            rollouts: IntGaugeVec::new(name("rollouts", "Rollouts by state."), &["state"])?,
            waves_confirmed: IntCounter::with_opts(name("waves_confirmed_total", "Waves confirmed healthy."))?,
            waves_halted: IntCounter::with_opts(name("waves_halted_total", "Waves that halted the rollout."))?,
            steps: IntCounterVec::new(name("steps_total", "Real step results by outcome."), &["outcome"])?,
            dry_runs_blocked: IntCounter::with_opts(name("dry_runs_blocked_total", "Dry-runs that blocked a step."))?,
            snapshot_pinned_bytes: IntGauge::with_opts(name("snapshot_pinned_bytes", "Bytes of pinned snapshots."))?,
            agents_connected: IntGauge::with_opts(name("agents_connected", "Agents with a live session."))?,
            hosts_with_updaters: IntGaugeVec::new(
                name(
                    "hosts_with_updaters",
                    "Hosts whose agents report an active updater outside the rollout, by kind.",
                ),
                &["kind"],
            )?,
            audit_records: IntGauge::with_opts(name("audit_records", "Records in the audit log."))?,
            step_duration: Histogram::with_opts(
                HistogramOpts::new("wavegate_controller_step_duration_seconds", "Real step durations.")
                    .buckets(vec![0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0]),
            )?,
            wave_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "wavegate_controller_wave_duration_seconds",
                    "Wave durations, start to confirmation.",
                )
                .buckets(vec![1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0]),
            )?,
            halt_commit: Histogram::with_opts(
                HistogramOpts::new(
                    "wavegate_controller_halt_commit_seconds",
                    "From a failing result arriving to its halt being committed to the store.",
                )
                .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0]),
            )?,
            last_halt_commit: Gauge::with_opts(name(
                "last_halt_commit_seconds",
                "From a failing result arriving to its halt being committed, for the latest halt.",
            ))?,
            output_bytes: IntCounter::with_opts(name("output_bytes_total", "Bytes of step and check output stored."))?,
            output_dropped: IntCounter::with_opts(name(
                "output_dropped_bytes_total",
                "Bytes of output agents could not send because their session was full.",
            ))?,
            output_capped: IntCounter::with_opts(name(
                "output_capped_bytes_total",
                "Bytes of output not stored because a host was over its cap.",
            ))?,
            foreign_messages: IntCounter::with_opts(name(
                "agent_foreign_messages_total",
                "Results and output an agent sent for a command not sent to its host (refused).",
            ))?,
            registry,
        };
        m.registry.register(Box::new(m.rollouts.clone()))?;
        m.registry.register(Box::new(m.foreign_messages.clone()))?;
        m.registry.register(Box::new(m.waves_confirmed.clone()))?;
        m.registry.register(Box::new(m.waves_halted.clone()))?;
        m.registry.register(Box::new(m.steps.clone()))?;
        m.registry.register(Box::new(m.dry_runs_blocked.clone()))?;
        m.registry.register(Box::new(m.snapshot_pinned_bytes.clone()))?;
        m.registry.register(Box::new(m.agents_connected.clone()))?;
        m.registry.register(Box::new(m.hosts_with_updaters.clone()))?;
        m.registry.register(Box::new(m.audit_records.clone()))?;
        m.registry.register(Box::new(m.step_duration.clone()))?;
        m.registry.register(Box::new(m.wave_duration.clone()))?;
        m.registry.register(Box::new(m.halt_commit.clone()))?;
        m.registry.register(Box::new(m.last_halt_commit.clone()))?;
        m.registry.register(Box::new(m.output_bytes.clone()))?;
        m.registry.register(Box::new(m.output_dropped.clone()))?;
        m.registry.register(Box::new(m.output_capped.clone()))?;
        Ok(m)
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    /// Every `wavegate_controller_*` name the example alert rules and the
    /// dashboard use is a metric the controller registers.
    #[test]
    fn deploy_files_name_real_metrics() {
        let m = Metrics::new().expect("metrics");
        m.rollouts.with_label_values(&["running"]).set(0);
        m.steps.with_label_values(&["ok"]).inc();
        let mut known: Vec<String> = Vec::new();
        for f in m.registry.gather() {
            let name = f.name().to_owned();
            for suffix in ["", "_bucket", "_sum", "_count"] {
                known.push(format!("{name}{suffix}"));
            }
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for file in [
            "deploy/prometheus/wavegate-alerts.yml",
            "deploy/grafana/wavegate-dashboard.json",
        ] {
            let text = std::fs::read_to_string(root.join(file)).expect("deploy file");
            let mut found = 0;
            for (i, _) in text.match_indices("wavegate_controller_") {
                let name: String = text[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    known.contains(&name),
                    "{file} names `{name}`, which the controller does not export"
                );
                found += 1;
            }
            assert!(found > 3, "{file} uses the metrics");
        }
        let dashboard: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("deploy/grafana/wavegate-dashboard.json")).expect("dashboard"),
        )
        .expect("the dashboard is JSON");
        assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 6));
    }
}
