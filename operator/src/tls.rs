//! Certificates and identities.
//!
//! A private CA (rcgen) issues every certificate. The identity is a SAN URI:
//! `wavegate://agent/<host-id>` or `wavegate://operator/<role>/<name>`. The
//! controller trusts an identity only from a client certificate the TLS layer
//! has verified against the CA; nothing in a request can claim another.
//!
//! An operator certificate also names the person who holds it, in a second
//! SAN URI `wavegate://person/<person>` set by the CA tooling: one person
//! may hold several certificates (a laptop and a jump host, two roles), and
//! approvals count people, not certificate names.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// What an operator may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Submits plans; may pause, resume and abort.
    Submitter,
    /// Approves other people's plans; may pause, resume and abort.
    Approver,
    /// Reads everything, changes nothing.
    Auditor,
    /// Everything an operator may do (still never approves its own plan).
    Admin,
}

impl Role {
    /// The name used in certificates and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Submitter => "submitter",
            Role::Approver => "approver",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        }
    }

    /// Parse a role name.
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "submitter" => Role::Submitter,
            "approver" => Role::Approver,
            "auditor" => Role::Auditor,
            "admin" => Role::Admin,
            _ => return None,
        })
    }
}

/// Who is calling, as proven by its certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// An agent for one host.
    Agent(String),
    /// A person with a role.
    Operator {
        /// Name.
        name: String,
        /// Role.
        role: Role,
    },
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Agent(h) => write!(f, "agent {h}"),
            Identity::Operator { name, role } => write!(f, "{name} ({})", role.as_str()),
        }
    }
}

impl Identity {
    /// The SAN URI that carries this identity.
    pub fn uri(&self) -> String {
        match self {
            Identity::Agent(h) => format!("wavegate://agent/{h}"),
            Identity::Operator { name, role } => format!("wavegate://operator/{}/{name}", role.as_str()),
        }
    }

    /// Parse a SAN URI.
    pub fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix("wavegate://")?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["agent", host] if !host.is_empty() => Some(Identity::Agent((*host).to_owned())),
            ["operator", role, name] if !name.is_empty() => Some(Identity::Operator {
                name: (*name).to_owned(),
                role: Role::parse(role)?,
            }),
            _ => None,
        }
    }

    /// The identity in a DER certificate (already verified by TLS).
    pub fn from_der(der: &[u8]) -> Option<Identity> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        san.value.general_names.iter().find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Identity::from_uri(u),
            _ => None,
        })
    }
}

/// The SAN URI that names the person holding an operator certificate.
pub fn person_uri(person: &str) -> String {
    format!("wavegate://person/{person}")
}

/// Whether `person` can name a person in a certificate: printable ASCII
/// (an e-mail address, an employee number), no `/`, at most 128 bytes.
pub fn is_valid_person(person: &str) -> bool {
    !person.is_empty() && person.len() <= 128 && person.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
}

/// The person a DER certificate (already verified by TLS) names, if any.
pub fn person_from_der(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => u
            .strip_prefix("wavegate://person/")
            .filter(|p| is_valid_person(p))
            .map(str::to_owned),
        _ => None,
    })
}

/// The person a request's verified peer certificate names, if any.
pub fn peer_person<T>(req: &tonic::Request<T>) -> Option<String> {
    let certs = req.peer_certs()?;
    person_from_der(certs.first()?.as_ref())
}

/// The files of a certificate directory.
#[derive(Clone, Debug)]
pub struct CertDir {
    dir: PathBuf,
}

/// A certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct Pair {
    /// Certificate.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

impl CertDir {
    /// A certificate directory (not created until `init`).
    pub fn new(dir: impl Into<PathBuf>) -> CertDir {
        CertDir { dir: dir.into() }
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// The controller's server certificate.
    pub fn controller(&self) -> Pair {
        self.pair("controller")
    }

    /// An agent's certificate.
    pub fn agent(&self, host: &str) -> Pair {
        self.pair(&format!("agent-{host}"))
    }

    /// An operator's certificate.
    pub fn operator(&self, name: &str) -> Pair {
        self.pair(&format!("operator-{name}"))
    }

    fn pair(&self, stem: &str) -> Pair {
        Pair {
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
        }
    }

    /// Create the CA and the controller's certificate (for `names`, plus
    /// localhost and 127.0.0.1). Refuses to overwrite an existing CA.
    pub fn init(&self, names: &[String]) -> Result<()> {
        if self.ca().exists() {
            bail!(
                "{} already exists; a new CA would orphan every certificate it issued",
                self.ca().display()
            );
        }
        std::fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.distinguished_name = dn("wavegate private CA");
        let cert = params.self_signed(&key)?;
        write_secret(&self.ca_key(), &key.serialize_pem())?;
        write(&self.ca(), &cert.pem())?;
        let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
        sans.extend(names.iter().cloned());
        self.issue_leaf(
            &self.controller(),
            "wavegate controller",
            sans,
            None,
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// Issue an agent certificate for `host`.
    pub fn issue_agent(&self, host: &str) -> Result<Pair> {
        let pair = self.agent(host);
        let id = Identity::Agent(host.to_owned());
        self.issue_leaf(&pair, host, Vec::new(), Some(id), ExtendedKeyUsagePurpose::ClientAuth)?;
        Ok(pair)
    }

    /// Issue an operator certificate to `person` (see [`is_valid_person`]).
    pub fn issue_operator(&self, name: &str, role: Role, person: &str) -> Result<Pair> {
        if !is_valid_person(person) {
            bail!(
                "`{person}` cannot name a person: use printable ASCII without `/` (an e-mail address or an employee number)"
            );
        }
        let pair = self.operator(name);
        let id = Identity::Operator {
            name: name.to_owned(),
            role,
        };
        self.issue_leaf_with(
            &pair,
            name,
            Vec::new(),
            Some(id),
            Some(person),
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        Ok(pair)
    }

    fn issue_leaf(
        &self,
        pair: &Pair,
        cn: &str,
        dns: Vec<String>,
        id: Option<Identity>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<()> {
        self.issue_leaf_with(pair, cn, dns, id, None, usage)
    }

    fn issue_leaf_with(
        &self,
        pair: &Pair,
        cn: &str,
        dns: Vec<String>,
        id: Option<Identity>,
        person: Option<&str>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<()> {
        let ca_pem = std::fs::read_to_string(self.ca()).with_context(|| {
            format!(
                "reading the CA {}; run `wavegate certs init` first",
                self.ca().display()
            )
        })?;
        let ca_key = KeyPair::from_pem(&std::fs::read_to_string(self.ca_key())?)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
        let mut params = CertificateParams::new(dns)?;
        params.distinguished_name = dn(cn);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        if let Some(id) = id {
            params.subject_alt_names.push(SanType::URI(id.uri().try_into()?));
        }
        if let Some(p) = person {
            params.subject_alt_names.push(SanType::URI(person_uri(p).try_into()?));
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write_secret(&pair.key, &key.serialize_pem())?;
        write(&pair.cert, &cert.pem())
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "wavegate");
    dn
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn write_secret(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// TLS material for a client or server, read from PEM files.
pub struct TlsFiles {
    /// The CA certificate.
    pub ca: String,
    /// This side's certificate.
    pub cert: String,
    /// This side's key.
    pub key: String,
}

impl TlsFiles {
    /// Read the three files, naming the one that is missing.
    pub fn read(ca: &Path, cert: &Path, key: &Path) -> Result<TlsFiles> {
        let read = |p: &Path, what: &str| {
            std::fs::read_to_string(p).with_context(|| format!("reading the {what} {}", p.display()))
        };
        Ok(TlsFiles {
            ca: read(ca, "CA certificate")?,
            cert: read(cert, "certificate")?,
            key: read(key, "private key")?,
        })
    }

    /// Server configuration: our identity, and client certificates required
    /// and verified against the CA.
    pub fn server(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca))
    }

    /// Client configuration for talking to the controller.
    pub fn client(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca))
            .identity(tonic::transport::Identity::from_pem(&self.cert, &self.key))
            .domain_name("localhost")
    }
}

/// The caller's identity from a request's verified peer certificate.
pub fn peer_identity<T>(req: &tonic::Request<T>) -> Result<Identity> {
    let certs = req.peer_certs().ok_or_else(|| anyhow!("no client certificate"))?;
    let first = certs.first().ok_or_else(|| anyhow!("no client certificate"))?;
    Identity::from_der(first.as_ref()).ok_or_else(|| anyhow!("the client certificate carries no wavegate identity"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_uris() {
        for id in [
            Identity::Agent("p09".into()),
            Identity::Operator {
                name: "ann".into(),
                role: Role::Approver,
            },
            Identity::Operator {
                name: "eve".into(),
                role: Role::Auditor,
            },
        ] {
            assert_eq!(Identity::from_uri(&id.uri()), Some(id));
        }
        assert_eq!(Identity::from_uri("wavegate://operator/root/x"), None, "unknown role");
        assert_eq!(Identity::from_uri("https://agent/p09"), None);
    }

    #[test]
    fn issued_certificates_carry_their_identity() {
        let dir = std::env::temp_dir().join(format!("wavegate-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let certs = CertDir::new(&dir);
        certs.init(&[]).expect("init");
        assert!(certs.init(&[]).is_err(), "a second init must not replace the CA");
        let agent = certs.issue_agent("p09").expect("agent");
        let op = certs
            .issue_operator("ann", Role::Approver, "ann@example.net")
            .expect("operator");
        let op_der = rustls_pemfile_first(&std::fs::read(&op.cert).expect("cert"));
        assert_eq!(person_from_der(&op_der).as_deref(), Some("ann@example.net"));
        assert!(
            certs.issue_operator("x", Role::Approver, "a/b").is_err(),
            "a `/` in a person"
        );
        assert!(certs.issue_operator("x", Role::Approver, "").is_err(), "no person");
        for (pair, want) in [
            (agent, Identity::Agent("p09".into())),
            (
                op,
                Identity::Operator {
                    name: "ann".into(),
                    role: Role::Approver,
                },
            ),
        ] {
            let pem = std::fs::read(&pair.cert).expect("cert");
            let der = rustls_pemfile_first(&pem);
            assert_eq!(Identity::from_der(&der), Some(want));
            if matches!(Identity::from_der(&der), Some(Identity::Agent(_))) {
                assert_eq!(person_from_der(&der), None, "an agent is no person");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn rustls_pemfile_first(pem: &[u8]) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem).expect("pem");
        p.contents
    }
}
