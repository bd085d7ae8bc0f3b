//! A progress line on stderr for long tools (replay, export).

use std::io::Write;
use std::time::{Duration, Instant};

/// A progress line on stderr, redrawn at most every 200 ms.
pub struct Progress {
    what: &'static str,
    total: Option<u64>,
    done: u64,
    start: Instant,
    last: Instant,
}

impl Progress {
    pub fn new(what: &'static str, total: Option<u64>) -> Progress {
        let now = Instant::now();
        Progress {
            what,
            total,
            done: 0,
            start: now,
            last: now - Duration::from_secs(1),
        }
    }

    pub fn add(&mut self, n: u64) {
        self.done += n;
        if self.last.elapsed() >= Duration::from_millis(200) {
            self.draw();
        }
    }

    fn draw(&mut self) {
        self.last = Instant::now();
        let rate = self.done as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
        match self.total {
            Some(t) if t > 0 => {
                let width = 30;
                let filled = ((self.done.min(t) * width) / t) as usize;
                eprint!(
                    "\r{} [{}{}] {}/{} ({:.0}/s)   ",
                    self.what,
                    "#".repeat(filled),
                    ".".repeat(width as usize - filled),
                    self.done,
                    t,
                    rate
                );
            }
            _ => eprint!("\r{} {} ({:.0}/s)   ", self.what, self.done, rate),
        }
        let _ = std::io::stderr().flush();
    }

    pub fn finish(mut self) -> (u64, Duration) {
        self.draw();
        eprintln!();
        (self.done, self.start.elapsed())
    }
}
