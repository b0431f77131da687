//! The generated `wavegate.v1` types and services, and [`convert`], the one
//! place where they become domain types and back. Generated types stop at
//! the gRPC modules: the controller's engine and the agent's runners work on
//! domain types only.

pub mod convert;

/// The version of the agent contract this build speaks, sent in `Hello`.
/// Raised whenever a message changes shape (2: one `Step`, typed reports;
/// 3: `Step.only_roles`, which an older agent would not know to check, and
/// the updaters an agent reports and holds).
/// A controller and its agents must speak the same one.
pub const PROTOCOL: u32 = 3;

/// `wavegate.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("wavegate.v1");
}

/// The part of etcd's v3 API the controller's etcd store uses
/// (`proto/etcd/v3.proto`), as a client.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}
