//! The wavegate controller and its command-line interface.

#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod engine;
pub mod etcd;
pub mod failpoint;
pub mod hub;
pub mod leader;
pub mod metrics;
pub mod notify;
pub mod policies;
pub mod server;
pub mod store;
pub use wavegate_operator::tls;
pub mod web;
