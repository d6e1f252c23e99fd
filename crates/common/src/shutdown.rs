//! The shutdown signal: SIGTERM (orchestrators) or SIGINT / Ctrl-C (people).

use std::future::Future;

/// Registers the signal handlers now and returns a future that resolves on the first SIGTERM or
/// Ctrl-C. Call it before binding the listener: a signal that arrives after the `listening on`
/// line must start a graceful shutdown, not kill the process with the default action.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
                    _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
                },
                (Err(error), _) | (_, Err(error)) => {
                    tracing::warn!(%error, "cannot listen for shutdown signals; stop this process with SIGKILL");
                    std::future::pending::<()>().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        tracing::info!("Ctrl-C received, shutting down");
    }
}
