//! Serving on a socket, and the life cycle: SIGTERM/SIGINT drain (not
//! ready, new requests 503, running streams finish up to a deadline, then
//! are cut with an error), a second signal exits at once, and an engine
//! that dies takes the process down with a non-zero exit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use super::AppState;

/// How the server stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Drained after a signal.
    Drained,
    /// The engine died; the process should exit non-zero.
    EngineDied,
}

/// Resolves on the first SIGTERM or SIGINT.
async fn signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Drains: stop admitting, wait for in-flight work up to `deadline`, then
/// cut what is left and give the streams a moment to send their error.
pub async fn drain(state: &AppState, deadline: Duration) {
    let engine = &state.engine;
    engine.start_drain();
    tracing::info!(in_flight = engine.in_flight(), deadline_secs = deadline.as_secs(), "draining");
    let start = Instant::now();
    while engine.in_flight() > 0 && start.elapsed() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if engine.in_flight() > 0 {
        tracing::warn!(in_flight = engine.in_flight(), "drain deadline passed; cutting running streams");
        engine.abort_running();
        let cut = Instant::now();
        while engine.in_flight() > 0 && cut.elapsed() < Duration::from_secs(2) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Serves `router` on `listener` until a signal has drained the server or
/// the engine died.
pub async fn serve(listener: TcpListener, router: axum::Router, state: Arc<AppState>) -> std::io::Result<Stopped> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(None::<Stopped>);
    let watcher_state = state.clone();
    tokio::spawn(async move {
        let engine = watcher_state.engine.clone();
        let died = async {
            while !engine.is_dead() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            _ = signal() => {
                // A second signal during the drain exits at once.
                tokio::spawn(async {
                    signal().await;
                    tracing::warn!("second signal: exiting now");
                    std::process::exit(130);
                });
                drain(&watcher_state, Duration::from_secs(watcher_state.server.drain_timeout_secs)).await;
                let _ = stop_tx.send(Some(Stopped::Drained));
            }
            _ = died => {
                tracing::error!("the engine stopped; shutting down");
                let _ = stop_tx.send(Some(Stopped::EngineDied));
            }
        }
    });
    let mut rx = stop_rx.clone();
    let shutdown = async move {
        let _ = rx.wait_for(Option::is_some).await;
    };
    // Tokens are small writes: without TCP_NODELAY, Nagle's algorithm holds
    // them back behind delayed ACKs (~40 ms bursts in a stream).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let server = axum::serve(listener, router).with_graceful_shutdown(shutdown);
    // Connections still open a few seconds after the shutdown began (idle
    // keep-alives, stuck clients) do not hold the process.
    let mut rx = stop_rx.clone();
    let hard_stop = async move {
        let _ = rx.wait_for(Option::is_some).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
    };
    tokio::select! {
        r = server => r?,
        _ = hard_stop => tracing::warn!("closing connections still open after the drain"),
    }
    let how = *stop_rx.borrow();
    Ok(how.unwrap_or(if state.engine.is_dead() { Stopped::EngineDied } else { Stopped::Drained }))
}
