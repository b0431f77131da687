//! The generated `wavegate.v1` types and services. Generated types stop at the
//! gRPC modules: the controller and the agent convert them to domain types in
//! one place each.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// `wavegate.v1`.
pub mod v1 {
    tonic::include_proto!("wavegate.v1");
}
