//! What the controller and the lab share, so that the lab can live in a
//! crate of its own that the deployed controller never links: certificates
//! and the identities in them ([`tls`]), the operator's connection to a
//! controller ([`client`]), and the command line's shared flags and output
//! formats ([`output`], [`policies`]). The controller re-exports each at its
//! old path (`wavegate::tls`, `wavegate::cli::client`, ...).

#![forbid(unsafe_code)]

pub mod client;
pub mod output;
pub mod policies;
pub mod tls;
