//! The server side: accepted TCP connections, through a TLS handshake each, as a stream of TLS
//! streams for tonic (or any HTTP server).
//!
//! Each connection takes the settings current when it is accepted, so a certificate replaced on
//! disk is used from the next connection on. Handshakes run concurrently, off the accept loop, each
//! bounded in time ([`HANDSHAKE_TIMEOUT`]) and in number ([`MAX_HANDSHAKES`]: more are closed at
//! once), so a client that connects and says nothing holds nothing up. A failed handshake (a
//! plaintext client, no client certificate, one from another CA) closes that connection only: it
//! is logged at DEBUG (scanners would flood anything louder) and counted in
//! `llmesh_tls_handshake_failures_total`. The accept loop ends, and the listener closes, when the
//! stream is dropped (tonic drops it when it stops accepting, at shutdown).

use std::{io, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;

use super::ServerTls;

/// Longest a client may take to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; connections beyond are closed at once.
pub const MAX_HANDSHAKES: usize = 1024;

/// The connections `listener` accepts, once their handshake with `tls` succeeded.
pub fn incoming(listener: TcpListener, tls: ServerTls) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (ready, stream) = mpsc::channel(64);
    let failures = llmesh_telemetry::meter()
        .u64_counter("llmesh.tls.handshake_failures")
        .with_description(
            "TLS handshakes that failed or timed out (plaintext clients, missing or foreign client certificates)",
        )
        .build();
    tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            let accepted = tokio::select! {
                () = ready.closed() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                failures.add(1, &[]);
                tracing::debug!(%peer, "too many TLS handshakes in progress; connection closed");
                continue;
            };
            let acceptor = TlsAcceptor::from(tls.current());
            let (ready, failures) = (ready.clone(), failures.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = ready.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => {
                        failures.add(1, &[]);
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                    }
                    Err(_) => {
                        failures.add(1, &[]);
                        tracing::debug!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(stream)
}
