//! The stop signal: SIGTERM (systemd, docker) or SIGINT (Ctrl-C).

use log::warn;

/// Completes when the process is asked to stop.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                return;
            }
            Err(e) => warn!("cannot listen for SIGTERM ({e}); only SIGINT stops the gateway"),
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
