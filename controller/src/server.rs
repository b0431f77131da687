//! Running the controller: the gRPC services over an already-bound listener,
//! until the shutdown future resolves.

use std::future::Future;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use wavegate_proto::v1::agent_service_server::AgentServiceServer;
use wavegate_proto::v1::operator_service_server::OperatorServiceServer;

use crate::api::{Api, Auth};
use crate::engine::Engine;
use crate::tls::TlsFiles;

/// Serve the agent and operator APIs on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    engine: Arc<Engine>,
    tls: Option<TlsFiles>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let auth = if tls.is_some() {
        Auth::MutualTls
    } else {
        Auth::InsecurePlaintextForLocalDev
    };
    let api = Api::new(Arc::clone(&engine), auth);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        builder = builder.tls_config(tls.server()).context("setting up TLS")?;
    }
    engine.start();
    builder
        .add_service(AgentServiceServer::new(api.clone()))
        .add_service(OperatorServiceServer::new(api))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .context("serving gRPC")
}
