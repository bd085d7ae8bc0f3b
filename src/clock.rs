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
