//! Where site policies come from: the `--policies` flag of the commands
//! that check plans, and what it names.

use std::path::PathBuf;

/// Where policies come from.
#[derive(Clone, Debug)]
pub enum PolicySource {
    /// The default set built into the binary.
    Shipped,
    /// Every `*.yaml` / `*.yml` file directly in this directory.
    Dir(PathBuf),
}

/// Policy directory flag shared by commands that check plans.
#[derive(Clone, Debug, clap::Args)]
pub struct PolicyArgs {
    /// Directory of site policy files (`*.yaml`); the shipped `policies/` set
    /// is used when not given.
    #[arg(long, value_name = "DIR", env = "WAVEGATE_POLICIES")]
    pub policies: Option<PathBuf>,
}

impl PolicyArgs {
    /// Where to load policies from.
    pub fn source(&self) -> PolicySource {
        match &self.policies {
            Some(dir) => PolicySource::Dir(dir.clone()),
            None => PolicySource::Shipped,
        }
    }
}
