//! wavegate's domain: the plan language, the fleet graph, target resolution,
//! the wave planner and site policies.
//!
//! Everything here is pure: it takes text and returns values. Reading files,
//! talking to agents and storing state belong to the controller and the agent.

#![forbid(unsafe_code)]

pub mod audit;
pub mod check;
pub mod command;
pub mod effects;
pub mod fleet;
pub mod packages;
pub mod paths;
pub mod plan;
pub mod policy;
pub mod redact;
pub mod rollout;
pub mod snapshot;
pub mod targets;
pub mod text;
pub mod units;
pub mod updaters;
pub mod violation;
pub mod waves;
pub mod windows;
pub mod yaml;

pub use check::{Report, WaveReport, check, check_plan, check_sources};
pub use fleet::{Fleet, Host, HostIdx, Role};
pub use plan::Plan;
pub use policy::PolicySet;
pub use targets::Targets;
pub use violation::{Code, Loc, Violation, exit_status};
pub use yaml::Source;
