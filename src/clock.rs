//! The service clock: the system's, or the test clock. Injected everywhere
//! time is read (the sink, the sweeper, the API), never read directly, so
//! that tests can move it. The pure modules never see it: they are given
//! the time.

use std::sync::Arc;

use chrono::{DateTime, Utc};

/// The time source; injected so tests control it.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(Utc::now)
}

/// The system clock moved forward by `offset_ms` (set by `PUT
/// /v1/test/clock` when `QUOTA_TEST_CLOCK` is on).
pub fn offset_clock(offset_ms: Arc<std::sync::atomic::AtomicI64>) -> Clock {
    Arc::new(move || {
        Utc::now()
            + chrono::Duration::milliseconds(offset_ms.load(std::sync::atomic::Ordering::SeqCst))
    })
}
