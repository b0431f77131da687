//! Connecting the CLI to a controller, with the operator's identity.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use tonic::transport::{Channel, Endpoint};
use wavegate_proto::v1::operator_service_client::OperatorServiceClient;

use crate::tls::TlsFiles;

/// Where the controller is and who we are (flags or `WAVEGATE_*`).
#[derive(Clone, Debug, Args)]
pub struct Conn {
    /// Controller URL, like https://127.0.0.1:7443.
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
    /// Connect with mutual TLS.
    pub async fn connect(&self) -> Result<Client> {
        let Some(url) = &self.controller else {
            bail!("no controller: give --controller or set WAVEGATE_CONTROLLER (a lab's identities/*.env set it)");
        };
        let (Some(ca), Some(cert), Some(key)) = (&self.ca, &self.cert, &self.key) else {
            bail!("no identity: give --ca, --cert and --key, or set WAVEGATE_CA, WAVEGATE_CERT and WAVEGATE_KEY");
        };
        let tls = TlsFiles::read(ca, cert, key)?;
        let channel = Endpoint::from_shared(url.clone())
            .with_context(|| format!("`{url}` is not a controller URL"))?
            .tls_config(tls.client())?
            .connect()
            .await
            .with_context(|| format!("connecting to the controller at {url}"))?;
        Ok(OperatorServiceClient::new(channel))
    }
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
