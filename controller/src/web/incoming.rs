//! Connections to the web view. TLS handshakes run off the accept loop, so
//! a client that stalls its handshake never holds up the next one, and each
//! connection carries the client certificate its handshake verified (the
//! request handlers see it as [`Peer`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::tls::{Identity, TlsFiles};

/// How long a client has to finish its TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// The client certificate a connection presented.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientCert {
    /// None (or the view is served without TLS).
    Absent,
    /// One the CA signed, naming this identity.
    Identity(Identity),
    /// One the CA signed that names no wavegate identity.
    Unnamed,
}

/// The other end of a web view connection.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Its address.
    pub addr: SocketAddr,
    /// What its TLS handshake proved.
    pub cert: ClientCert,
}

/// Connections that finished their handshake, as an axum listener.
pub struct Incoming<Io> {
    ready: mpsc::Receiver<(Io, Peer)>,
    local: SocketAddr,
}

impl<Io> Listener for Incoming<Io>
where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Io = Io;
    type Addr = Peer;

    async fn accept(&mut self) -> (Io, Peer) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop only ends once this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Peer> {
        Ok(Peer {
            addr: self.local,
            cert: ClientCert::Absent,
        })
    }
}

impl<Io> Connected<IncomingStream<'_, Incoming<Io>>> for Peer
where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn connect_info(stream: IncomingStream<'_, Incoming<Io>>) -> Peer {
        stream.remote_addr().clone()
    }
}

/// Accept on `listener` and run `handshake` on each connection in a task
/// of its own; the connections it returns are what the listener yields.
/// Stops accepting once the returned listener is dropped.
pub fn incoming<Io, H, F>(listener: TcpListener, handshake: H) -> std::io::Result<Incoming<Io>>
where
    Io: Send + 'static,
    H: Fn(TcpStream, SocketAddr) -> F + Send + 'static,
    F: Future<Output = Option<(Io, Peer)>> + Send + 'static,
{
    let local = listener.local_addr()?;
    let (tx, ready) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                r = listener.accept() => r,
            };
            let (tcp, addr) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, most likely: give the open
                    // connections a moment to end rather than spinning.
                    tracing::warn!(error = %e, "The web view could not accept a connection.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let tx = tx.clone();
            let shaking = handshake(tcp, addr);
            tokio::spawn(async move {
                if let Some(conn) = shaking.await {
                    let _ = tx.send(conn).await;
                }
            });
        }
    });
    Ok(Incoming { ready, local })
}

/// Plain connections: no certificate, ever.
pub fn plain(listener: TcpListener) -> std::io::Result<Incoming<TcpStream>> {
    incoming(listener, |tcp, addr| async move {
        Some((
            tcp,
            Peer {
                addr,
                cert: ClientCert::Absent,
            },
        ))
    })
}

/// TLS connections with `config`; a client certificate, when one was sent,
/// has been verified against the CA by the handshake.
pub fn tls(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> std::io::Result<Incoming<tokio_rustls::server::TlsStream<TcpStream>>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    incoming(listener, move |tcp, addr| {
        let acceptor = acceptor.clone();
        async move {
            let stream = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %addr, error = %e, "A web view TLS handshake failed.");
                    return None;
                }
                Err(_) => return None,
            };
            let cert = match stream.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                None => ClientCert::Absent,
                Some(der) => Identity::from_der(der.as_ref()).map_or(ClientCert::Unnamed, ClientCert::Identity),
            };
            Some((stream, Peer { addr, cert }))
        }
    })
}

/// The web view's TLS: the controller's certificate, and client
/// certificates from the CA asked for but not required (a browser comes
/// in through a login link instead).
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(files.ca.as_bytes()) {
        roots.add(cert.map_err(|e| anyhow!("the CA file is not a PEM certificate: {e}"))?)?;
    }
    if roots.is_empty() {
        bail!("the CA file holds no certificate");
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
        .allow_unauthenticated()
        .build()
        .context("the CA cannot verify client certificates")?;
    let chain = CertificateDer::pem_slice_iter(files.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("the certificate file is not PEM: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(files.key.as_bytes()).map_err(|e| anyhow!("the key file: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("the certificate and key do not make a server identity")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// GET `path` from the web view at `addr` over TLS, presenting the client
/// certificate in `files` and checking the server's against its CA (as
/// `localhost`, a name every controller certificate carries). Returns the
/// status and the body. For tools such as the load generator.
pub async fn fetch(addr: SocketAddr, files: &TlsFiles, path: &str) -> Result<(u16, String)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(files.ca.as_bytes()) {
        roots.add(cert.map_err(|e| anyhow!("the CA file is not a PEM certificate: {e}"))?)?;
    }
    let chain = CertificateDer::pem_slice_iter(files.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("the certificate file is not PEM: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(files.key.as_bytes()).map_err(|e| anyhow!("the key file: {e}"))?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let name = ServerName::try_from("localhost")?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS with {addr}"))?;
    tls.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw).await {
        Ok(_) => {}
        // A server that closes without TLS's goodbye has still answered.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e).with_context(|| format!("reading the answer from {addr}")),
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("{addr} did not answer in HTTP"))?;
    Ok((status, body.to_owned()))
}
