//! `wavegate certs`: a private CA and the certificates it issues.

use std::path::PathBuf;

use anyhow::{Result, anyhow};
use clap::Subcommand;

use crate::tls::{CertDir, Role};

/// `wavegate certs ...`
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a private CA and the controller's certificate.
    Init {
        /// Directory for the CA and certificates.
        #[arg(long, default_value = "certs", env = "WAVEGATE_CERTS")]
        dir: PathBuf,
        /// Extra names (DNS or IP) the controller is reached by.
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
    },
    /// Issue a certificate.
    #[command(subcommand)]
    Issue(IssueCommand),
}

/// `wavegate certs issue ...`
#[derive(Debug, Subcommand)]
pub enum IssueCommand {
    /// A certificate for the agent of one inventory host.
    Agent {
        /// The host id, as in the inventory.
        host_id: String,
        /// Directory of the CA.
        #[arg(long, default_value = "certs", env = "WAVEGATE_CERTS")]
        dir: PathBuf,
    },
    /// A certificate for a person.
    Operator {
        /// The person's name (shown in approvals and logs).
        name: String,
        /// submitter, approver, auditor or admin.
        #[arg(long)]
        role: String,
        /// The person who holds it, the same in all their certificates (an
        /// e-mail address or an employee number): approvals count people,
        /// so two certificates of one person approve once.
        #[arg(long)]
        person: String,
        /// Directory of the CA.
        #[arg(long, default_value = "certs", env = "WAVEGATE_CERTS")]
        dir: PathBuf,
    },
}

/// Run a `certs` subcommand.
pub fn run(cmd: CertsCommand) -> Result<u8> {
    match cmd {
        CertsCommand::Init { dir, names } => {
            let certs = CertDir::new(&dir);
            certs.init(&names)?;
            println!(
                "created {} and the controller certificate in {}",
                certs.ca().display(),
                dir.display()
            );
        }
        CertsCommand::Issue(IssueCommand::Agent { host_id, dir }) => {
            if !wavegate_domain::fleet::is_valid_host_id(&host_id) {
                eprintln!("wavegate: `{host_id}` is not a valid host id (lower-case letters, digits, `.`, `_`, `-`)");
                return Ok(2);
            }
            let pair = CertDir::new(&dir).issue_agent(&host_id)?;
            println!("{}\n{}", pair.cert.display(), pair.key.display());
        }
        CertsCommand::Issue(IssueCommand::Operator {
            name,
            role,
            person,
            dir,
        }) => {
            let Some(role) = Role::parse(&role) else {
                eprintln!("wavegate: --role must be submitter, approver, auditor or admin, not `{role}`");
                return Ok(2);
            };
            if name.is_empty() || name.contains('/') {
                return Err(anyhow!("an operator name must be non-empty and contain no `/`"));
            }
            if !crate::tls::is_valid_person(&person) {
                eprintln!(
                    "wavegate: --person `{person}` cannot name a person: give printable ASCII without `/` and spaces, like an e-mail address or an employee number"
                );
                return Ok(2);
            }
            let pair = CertDir::new(&dir).issue_operator(&name, role, &person)?;
            println!("{}\n{}", pair.cert.display(), pair.key.display());
        }
    }
    Ok(0)
}
