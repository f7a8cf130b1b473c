//! Pausing: while no backend is usable, the supervisor waits here for one to come back,
//! probing ejected backends that have no health check, with a guard that re-reads the pool.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use lapin::Connection;
use tokio_util::sync::CancellationToken;

use super::{PROBE_INTERVAL, Sidecar};
use crate::balance::Pool;

impl Sidecar {
    /// While paused: waits until the published usable count is above 0, shutdown, or the
    /// connection is lost. Returns `None` on shutdown, `Some(Err(reason))` on a lost
    /// connection.
    ///
    /// A guard re-reads the pool itself every [`PROBE_INTERVAL`]: if the pool's recorded
    /// state has a usable backend that the published count does not show, the pause has
    /// outlived its cause, and it ends (counted in
    /// `amqp_sidecar_pause_self_corrections_total`, which should read 0). It also ends
    /// ejections whose time is up, should the [`EjectionClock`] be late.
    pub(super) async fn wait_for_backend(
        &self,
        usable: &mut tokio::sync::watch::Receiver<usize>,
        conn: &Connection,
        shutdown: &CancellationToken,
    ) -> Option<Result<(), String>> {
        let pool = &self.upstreams.pool;
        let mut guard = tokio::time::interval(PROBE_INTERVAL);
        guard.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return None,
                Ok(_) = usable.wait_for(|u| *u > 0) => return Some(Ok(())),
                () = connection_lost(conn) => {
                    return Some(Err("connection lost while paused".to_owned()));
                }
                _ = guard.tick() => {}
            }
            if *usable.borrow() != 0 {
                continue;
            }
            let recorded = pool.usable_recorded();
            if recorded > 0 {
                crate::metrics::pause_self_corrected();
                tracing::error!(
                    usable_backends = recorded,
                    "paused although a backend is usable (the published count missed it): resuming"
                );
                return Some(Ok(()));
            }
            // Ends ejections whose time is up, should the ejection clock be late.
            pool.refresh();
        }
    }
}

/// While paused, TCP-probes the ejected backends that have no active health check, and
/// readmits the first that accepts a connection. (Health-checked backends come back through
/// their checks.) Probes connect only: no message is consumed to find out.
pub(super) async fn probe_unusable(
    pool: Arc<Pool>,
    targets: Vec<(usize, Option<SocketAddr>)>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Unreachable backends are the prober's: a TCP connect cannot end that (a TLS
        // backend can accept TCP and still refuse the handshake).
        for &(i, addr) in &targets {
            let Some(addr) = addr else { continue };
            if !pool.is_usable(i)
                && !pool.is_unreachable(i)
                && crate::backend::health::tcp_probe(addr, PROBE_INTERVAL).await
            {
                tracing::info!(backend = i, %addr, "probe connected: readmitting the backend");
                pool.readmit(i);
            }
        }
    }
}

/// Resolves once the connection is no longer connected.
pub(super) async fn connection_lost(conn: &Connection) {
    while conn.status().connected() {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
