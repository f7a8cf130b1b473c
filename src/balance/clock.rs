//! [`EjectionClock`]: ends ejections on time.

use std::sync::Arc;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Pool;

/// Ends ejections on time: sleeps until the next ejected backend is due back and refreshes
/// the pool, which publishes the new usable count (readiness, and resuming a paused
/// sidecar). Re-arms whenever a new ejection starts.
///
/// Deliveries waiting in [`Pool::acquire`] do not need it (they wake on their own deadline);
/// it exists for the readers of [`Pool::usable`] when no delivery is waiting, as when
/// consumption is paused.
pub struct EjectionClock {
    pool: Arc<Pool>,
}

impl EjectionClock {
    /// A clock for `pool`.
    #[must_use]
    pub fn new(pool: Arc<Pool>) -> Self {
        Self { pool }
    }

    /// Runs until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        loop {
            let ejected = self.pool.ejected.notified();
            tokio::pin!(ejected);
            ejected.as_mut().enable();
            let next = self.pool.next_return();
            tokio::select! {
                () = stop.cancelled() => return,
                () = &mut ejected => {}
                () = sleep_until_some(next) => self.pool.refresh(),
            }
        }
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
