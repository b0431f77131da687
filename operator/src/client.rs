//! Connecting the CLI to a controller, with the operator's identity.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use tonic::transport::{Channel, Endpoint};
use wavegate_domain::text::{inert, inert_lines};
use wavegate_proto::v1::operator_service_client::OperatorServiceClient;

use crate::tls::TlsFiles;

/// Where the controller is and who we are (flags or `WAVEGATE_*`).
#[derive(Clone, Debug, Args)]
pub struct Conn {
    /// Controller URL, like https://127.0.0.1:7443; for a group of
    /// controllers sharing one store, all of them, comma-separated (the
    /// leader is asked).
    #[arg(long, env = "WAVEGATE_CONTROLLER", global = true)]
    pub controller: Option<String>,
    /// CA certificate of the controller.
    #[arg(long, env = "WAVEGATE_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Your operator certificate.
    #[arg(long, env = "WAVEGATE_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// Your operator key.
    #[arg(long, env = "WAVEGATE_KEY", global = true)]
    pub key: Option<PathBuf>,
}

/// The operator client type.
pub type Client = OperatorServiceClient<Channel>;

impl Conn {
    /// Connect with mutual TLS. Given several controllers, ask each for
    /// its role and connect to the leader; if none leads right now, to the
    /// first that answers (it serves reads).
    pub async fn connect(&self) -> Result<Client> {
        let Some(urls) = &self.controller else {
            bail!("no controller: give --controller or set WAVEGATE_CONTROLLER (a lab's identities/*.env set it)");
        };
        let urls: Vec<&str> = urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        if let [url] = urls.as_slice() {
            return self.connect_to(url).await;
        }
        let mut fallback = None;
        let mut why = Vec::new();
        for url in &urls {
            match self.connect_to(url).await {
                Ok(mut c) => match c.role(wavegate_proto::v1::RoleRequest {}).await {
                    Ok(r) if matches!(r.get_ref().role.as_str(), "leader" | "single") => return Ok(c),
                    Ok(r) => {
                        why.push(format!("{url}: {}", inert(&r.get_ref().role)));
                        fallback.get_or_insert(c);
                    }
                    Err(s) => why.push(format!("{url}: {}", inert(s.message()))),
                },
                Err(e) => why.push(format!("{url}: {e:#}")),
            }
        }
        match fallback {
            Some(c) => {
                eprintln!(
                    "wavegate: no controller leads right now ({}); reading from a standby",
                    why.join("; ")
                );
                Ok(c)
            }
            None => bail!("no controller answered: {}", why.join("; ")),
        }
    }

    /// The controllers' addresses.
    pub fn urls(&self) -> Vec<String> {
        self.controller
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect()
    }

    /// Connect to one controller.
    pub async fn connect_to(&self, url: &str) -> Result<Client> {
        let (Some(ca), Some(cert), Some(key)) = (&self.ca, &self.cert, &self.key) else {
            bail!("no identity: give --ca, --cert and --key, or set WAVEGATE_CA, WAVEGATE_CERT and WAVEGATE_KEY");
        };
        let tls = TlsFiles::read(ca, cert, key)?;
        let channel = Endpoint::from_shared(url.to_owned())
            .with_context(|| format!("`{url}` is not a controller URL"))?
            .connect_timeout(std::time::Duration::from_secs(5))
            .tls_config(tls.client())?
            .connect()
            .await
            .with_context(|| format!("connecting to the controller at {url}"))?;
        Ok(OperatorServiceClient::new(channel))
    }
}

/// Say why the controller refused a call, on standard error, and return the
/// exit status it maps to. The controller's message can quote a plan or a
/// host (a name, a path), so it is shown inert.
pub fn refused(status: &tonic::Status) -> u8 {
    eprintln!("wavegate: {}", inert_lines(status.message()));
    exit_for(status)
}

/// The exit status a refused call maps to: 2 bad input, 3 refused by a gate,
/// 1 anything else.
pub fn exit_for(status: &tonic::Status) -> u8 {
    match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::NotFound => 2,
        tonic::Code::FailedPrecondition | tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => 3,
        _ => 1,
    }
}
