//! The client side: a connector for tonic channels that dials TCP and runs the TLS handshake with
//! the settings current at that moment, so a client certificate or CA replaced on disk is used
//! from the next connection on (tonic's own TLS connector is built once).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::ClientTls;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Dials `host:port` of each URI and speaks TLS over it (ALPN `h2`).
#[derive(Debug, Clone)]
pub struct Connector {
    tls: ClientTls,
}

impl Connector {
    pub fn new(tls: ClientTls) -> Self {
        Self { tls }
    }
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| format!("{uri} names no host"))?;
            let port = uri.port_u16().unwrap_or(443);
            let name = tls.server_name(host).map_err(|error| format!("{error:#}"))?;
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let tcp = TcpStream::connect((bare, port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(tls.current()).connect(name, tcp).await?;
            Ok(TokioIo::new(stream))
        })
    }
}
