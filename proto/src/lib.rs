//! The generated `wavegate.v1` types and services. Generated types stop at the
//! gRPC modules: the controller and the agent convert them to domain types in
//! one place each.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// `wavegate.v1`.
pub mod v1 {
    tonic::include_proto!("wavegate.v1");
}

/// The part of etcd's v3 API the controller's etcd store uses
/// (`proto/etcd/v3.proto`), as a client.
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}
