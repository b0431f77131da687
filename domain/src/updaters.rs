//! Updaters outside the rollout: what on a host changes packages or the
//! system on its own schedule (Debian's unattended-upgrades and apt timers,
//! dnf-automatic, snap refreshes, cron jobs that run a package manager),
//! as each agent finds them and reports them with the evidence.

use serde::{Deserialize, Serialize};

/// What kind of updater it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdaterKind {
    /// Debian's unattended-upgrades, switched on by `APT::Periodic::Unattended-Upgrade`.
    UnattendedUpgrades,
    /// apt's own timers: `apt-daily.timer` (package lists) and
    /// `apt-daily-upgrade.timer` (what unattended-upgrades runs from).
    AptDaily,
    /// dnf-automatic's timers.
    DnfAutomatic,
    /// snapd, which refreshes snaps on its own.
    SnapRefresh,
    /// A cron job that runs a package manager.
    Cron,
}

impl UpdaterKind {
    /// Every kind, in the order they are shown.
    pub const ALL: [UpdaterKind; 5] = [
        UpdaterKind::UnattendedUpgrades,
        UpdaterKind::AptDaily,
        UpdaterKind::DnfAutomatic,
        UpdaterKind::SnapRefresh,
        UpdaterKind::Cron,
    ];

    /// Its name in reports, policies and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            UpdaterKind::UnattendedUpgrades => "unattended-upgrades",
            UpdaterKind::AptDaily => "apt-daily",
            UpdaterKind::DnfAutomatic => "dnf-automatic",
            UpdaterKind::SnapRefresh => "snap-refresh",
            UpdaterKind::Cron => "cron",
        }
    }

    /// The kind a name gives.
    pub fn parse(name: &str) -> Option<UpdaterKind> {
        UpdaterKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl std::fmt::Display for UpdaterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One updater found on a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Updater {
    /// What it is.
    pub kind: UpdaterKind,
    /// Which one: a unit (`apt-daily-upgrade.timer`), a setting, a job.
    pub what: String,
    /// Where the agent saw it: a file, its line and the text there, or the
    /// unit link that enables it.
    pub evidence: String,
    /// Whether wavegate can hold it for a rollout (mask a timer, override a
    /// setting); a cron job or snapd cannot be held, only refused.
    pub holdable: bool,
    /// The rollout holding it now, if one does (it is then not active).
    #[serde(default)]
    pub held_by: Option<String>,
}

impl Updater {
    /// Whether it can change the host now (not held by a rollout).
    pub fn active(&self) -> bool {
        self.held_by.is_none()
    }

    /// One line for people: `unattended-upgrades (APT::Periodic::... at
    /// /etc/apt/apt.conf.d/20auto-upgrades:2)`.
    pub fn describe(&self) -> String {
        let held = match &self.held_by {
            Some(r) => format!(", held by rollout {r}"),
            None => String::new(),
        };
        format!("{} {}: {}{held}", self.kind, self.what, self.evidence)
    }
}

/// What a site policy has wavegate do about the updaters on a plan's
/// targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdaterAction {
    /// Refuse the plan, naming the hosts and what runs on them.
    Refuse,
    /// Hold them (mask their timers, override their settings) from the
    /// start of the rollout to its end, and restore them after.
    Hold,
}

impl UpdaterAction {
    /// Its name in a policy.
    pub fn as_str(self) -> &'static str {
        match self {
            UpdaterAction::Refuse => "refuse",
            UpdaterAction::Hold => "hold",
        }
    }
}

/// What is known of one target's updaters at submit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Known<'a> {
    /// Its agent has reported these (maybe none).
    Reported(&'a [Updater]),
    /// Its agent never reported: the gate cannot tell.
    Unknown,
}

/// A site rule's verdict on one target: why it may not go ahead, if so.
/// A host whose agent never reported is refused: a gate that cannot decide
/// says no.
pub fn verdict(action: UpdaterAction, kinds: &[UpdaterKind], known: &Known<'_>) -> Option<String> {
    // One held by another rollout runs again when that rollout ends, maybe
    // in the middle of this one: a refusal counts it too.
    let applies =
        |u: &&Updater| (u.active() || action == UpdaterAction::Refuse) && (kinds.is_empty() || kinds.contains(&u.kind));
    match known {
        Known::Unknown => Some("its agent has not reported what updates it outside wavegate".into()),
        Known::Reported(list) => {
            let found: Vec<&Updater> = list.iter().filter(applies).collect();
            let stopping: Vec<&&Updater> = match action {
                UpdaterAction::Refuse => found.iter().collect(),
                UpdaterAction::Hold => found.iter().filter(|u| !u.holdable).collect(),
            };
            if stopping.is_empty() {
                return None;
            }
            let what: Vec<String> = stopping.iter().map(|u| u.describe()).collect();
            Some(match action {
                UpdaterAction::Refuse => what.join("; "),
                UpdaterAction::Hold => format!("cannot be held: {}", what.join("; ")),
            })
        }
    }
}

/// What the targets' agents reported of their updaters outside the
/// rollout, into a check report: a note for each target that has one, and
/// the site's `updaters` rule (`(id, action, kinds)`) applied: refused, a
/// violation naming the hosts; held, the rule id to hold them by. A target
/// whose agent never reported is refused under such a rule: the gate
/// cannot tell.
pub fn gate(
    report: &mut crate::Report,
    reported: impl Fn(&str) -> Option<Vec<Updater>>,
    rule: Option<(&str, UpdaterAction, &[UpdaterKind])>,
) -> Option<String> {
    let found: Vec<(String, Option<Vec<Updater>>)> = report.targets.iter().map(|h| (h.clone(), reported(h))).collect();
    for (host, list) in &found {
        let active: Vec<String> = list
            .iter()
            .flatten()
            .filter(|u| u.active())
            .map(Updater::describe)
            .collect();
        if !active.is_empty() {
            report.notes.push(format!(
                "{host} has updaters outside the rollout: {}",
                active.join("; ")
            ));
        }
    }
    let (rule, action, kinds) = rule?;
    let refused: Vec<(String, String)> = found
        .iter()
        .filter_map(|(host, list)| {
            let known = match list {
                Some(l) => Known::Reported(l),
                None => Known::Unknown,
            };
            verdict(action, kinds, &known).map(|why| (host.clone(), why))
        })
        .collect();
    if refused.is_empty() {
        if action == UpdaterAction::Hold {
            report.notes.push(format!(
                "the targets' updaters are held from the rollout's start to its end (site rule {rule})"
            ));
            return Some(rule.to_owned());
        }
        return None;
    }
    let named: Vec<String> = refused.iter().map(|(h, why)| format!("{h} ({why})")).collect();
    report.violations.push(
        crate::Violation::new(
            crate::Code::Policy(rule.to_owned()),
            format!(
                "{} of the targets {} updated outside the rollout, on {} own schedule: {}",
                refused.len(),
                if refused.len() == 1 { "is" } else { "are" },
                if refused.len() == 1 { "its" } else { "their" },
                named.join(", ")
            ),
        )
        .field("targets")
        .hosts(refused.iter().map(|(h, _)| h.clone()))
        .fix(match action {
            UpdaterAction::Refuse => {
                "switch them off on those hosts (or have the site rule hold them: `action: hold`), or leave the hosts out of the targets"
            }
            UpdaterAction::Hold => {
                "remove what cannot be held (a cron job, snapd) on those hosts, start their agents so they report, or leave the hosts out of the targets"
            }
        }),
    );
    report.ok = false;
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(kind: UpdaterKind, holdable: bool) -> Updater {
        Updater {
            kind,
            what: "x".into(),
            evidence: "/etc/x:1".into(),
            holdable,
            held_by: None,
        }
    }

    #[test]
    fn a_gate_that_cannot_tell_refuses_and_hold_refuses_what_it_cannot_hold() {
        let list = [u(UpdaterKind::UnattendedUpgrades, true), u(UpdaterKind::Cron, false)];
        let k = Known::Reported(&list);
        assert!(verdict(UpdaterAction::Refuse, &[], &Known::Unknown).is_some());
        assert!(verdict(UpdaterAction::Hold, &[], &Known::Unknown).is_some());
        let refused = verdict(UpdaterAction::Refuse, &[], &k).expect("refused");
        assert!(
            refused.contains("unattended-upgrades") && refused.contains("cron"),
            "{refused}"
        );
        let held = verdict(UpdaterAction::Hold, &[], &k).expect("the cron job cannot be held");
        assert!(held.contains("cron") && !held.contains("unattended"), "{held}");
        assert_eq!(
            verdict(UpdaterAction::Hold, &[UpdaterKind::UnattendedUpgrades], &k),
            None
        );
        assert_eq!(verdict(UpdaterAction::Refuse, &[], &Known::Reported(&[])), None);
        let mut held_now = u(UpdaterKind::AptDaily, true);
        held_now.held_by = Some("r0001".into());
        let held = [held_now];
        assert!(
            verdict(UpdaterAction::Refuse, &[], &Known::Reported(&held)).is_some(),
            "held by another rollout, it comes back when that one ends"
        );
        assert_eq!(verdict(UpdaterAction::Hold, &[], &Known::Reported(&held)), None);
    }
}
