//! The wavegate controller and its command-line interface.

#![forbid(unsafe_code)]

pub mod cli;
pub mod policies;
