//! The lab's certificates and identities: one operator of each role, the
//! shell files that point the `wavegate` CLI at the lab as one of them, and
//! connections made as them.

use std::path::Path;

use wavegate_operator::client::Conn;
use wavegate_operator::tls::{CertDir, Pair, Role};

/// Identities written for a lab: (file stem, name, role).
pub(crate) const IDENTITIES: &[(&str, &str, Role)] = &[
    ("submitter", "submitter", Role::Submitter),
    ("approver", "approver", Role::Approver),
    ("auditor", "auditor", Role::Auditor),
    ("admin", "admin", Role::Admin),
];

pub(crate) fn env_file(url: &str, ca: &Path, pair: &Pair) -> String {
    format!(
        "# wavegate lab identity: source this file, then run wavegate commands.\nexport WAVEGATE_CONTROLLER='{url}'\nexport WAVEGATE_CA='{}'\nexport WAVEGATE_CERT='{}'\nexport WAVEGATE_KEY='{}'\n",
        ca.display(),
        pair.cert.display(),
        pair.key.display()
    )
}

/// A connection to a lab controller as one of its identities.
pub fn lab_conn(dir: &Path, url: &str, who: &str) -> Conn {
    let certs = CertDir::new(dir.join("certs"));
    let pair = certs.operator(who);
    Conn {
        controller: Some(url.to_owned()),
        ca: Some(certs.ca()),
        cert: Some(pair.cert),
        key: Some(pair.key),
    }
}
