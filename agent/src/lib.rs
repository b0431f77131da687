//! The wavegate agent: one per managed host. It dials the controller, keeps
//! one session open, and runs the steps and health checks it is sent, each
//! step at most once (its journal answers a repeated command).

#![forbid(unsafe_code)]

pub mod checks;
pub mod exec;
pub mod fetch;
pub mod jail;
pub mod journal;
pub mod mountinfo;
pub mod mounts;
pub mod output;
pub mod packages;
pub mod runner;
pub mod sandbox;
pub mod services;
pub mod session;
pub mod snapshot;
pub mod updaters;
