//! Prometheus histograms kept in atomics (no lock on the hot path).

use std::sync::atomic::{AtomicU64, Ordering};

/// A histogram of durations in microseconds, rendered in seconds.
pub struct Histogram {
    name: &'static str,
    help: &'static str,
    bounds_us: &'static [u64],
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn new(name: &'static str, help: &'static str, bounds_us: &'static [u64]) -> Self {
        Histogram {
            name,
            help,
            bounds_us,
            counts: (0..=bounds_us.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe_us(&self, us: u64) {
        let i = self
            .bounds_us
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(self.bounds_us.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn render(&self, out: &mut String) {
        let n = self.name;
        out.push_str(&format!("# HELP {n} {}\n# TYPE {n} histogram\n", self.help));
        let mut cum = 0;
        for (i, b) in self.bounds_us.iter().enumerate() {
            cum += self.counts[i].load(Ordering::Relaxed);
            out.push_str(&format!("{n}_bucket{{le=\"{}\"}} {cum}\n", *b as f64 / 1e6));
        }
        cum += self.counts[self.bounds_us.len()].load(Ordering::Relaxed);
        out.push_str(&format!("{n}_bucket{{le=\"+Inf\"}} {cum}\n"));
        out.push_str(&format!(
            "{n}_sum {}\n",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        ));
        out.push_str(&format!("{n}_count {cum}\n"));
    }
}

/// Produce → visible-to-admission lag of each committed batch (its oldest
/// record).
pub fn visible_lag() -> Histogram {
    Histogram::new(
        "quota_visible_lag_seconds",
        "Kafka timestamp of a batch's oldest record to the batch being visible to this process's admission view.",
        &[
            5_000, 10_000, 25_000, 50_000, 100_000, 150_000, 250_000, 500_000, 1_000_000,
            2_500_000, 5_000_000, 10_000_000,
        ],
    )
}

/// Time from an admission request reaching its route (before the token
/// check) to its answer being ready; what the service itself adds.
pub fn admission_latency() -> Histogram {
    Histogram::new(
        "quota_admission_seconds",
        "Admission requests: time in the service from routing (token check included) to the answer.",
        &[
            50, 100, 250, 500, 1_000, 2_000, 5_000, 10_000, 25_000, 100_000, 1_000_000,
        ],
    )
}

/// Holds counted by how they began and ended, in this process (a hold is
/// settled by whichever process applies its usage event and expired by
/// whichever sweeps it first; sum over processes).
pub struct HoldCounters {
    pub created: AtomicU64,
    pub settled: AtomicU64,
    pub released: AtomicU64,
    pub expired: AtomicU64,
    /// Hold batches by how they went: in one statement; one statement
    /// refused, then decided on locked rows; decided on locked rows.
    pub batches_one_statement: AtomicU64,
    pub batches_fell_back: AtomicU64,
    pub batches_locked: AtomicU64,
}

pub static HOLDS: HoldCounters = HoldCounters {
    created: AtomicU64::new(0),
    settled: AtomicU64::new(0),
    released: AtomicU64::new(0),
    expired: AtomicU64::new(0),
    batches_one_statement: AtomicU64::new(0),
    batches_fell_back: AtomicU64::new(0),
    batches_locked: AtomicU64::new(0),
};

impl HoldCounters {
    pub fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn render(&self, out: &mut String) {
        counter_family(
            out,
            "quota_holds_total",
            "Holds created, settled, released and expired by this process.",
            "event",
            [
                ("created", &self.created),
                ("settled", &self.settled),
                ("released", &self.released),
                ("expired", &self.expired),
            ],
        );
        counter_family(
            out,
            "quota_hold_batches_total",
            "Hold batches of this process: placed in one statement; one statement refused (rows moved, or an account short), then decided on locked rows; decided on locked rows (taking, giving back or taking back leases, and the refused ones).",
            "path",
            [
                ("one_statement", &self.batches_one_statement),
                ("fell_back", &self.batches_fell_back),
                ("locked", &self.batches_locked),
            ],
        );
    }
}

/// One counter family in Prometheus' text format: its help, its type and
/// one line per label value.
fn counter_family<const N: usize>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    counters: [(&str, &AtomicU64); N],
) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
    for (value, c) in counters {
        out.push_str(&format!("{name}{{{label}=\"{value}\"}} {}\n", c.load(Ordering::Relaxed)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_in_seconds() {
        let h = admission_latency();
        for us in [40, 60, 60, 3_000, 2_000_000] {
            h.observe_us(us);
        }
        let mut out = String::new();
        h.render(&mut out);
        assert!(
            out.contains("quota_admission_seconds_bucket{le=\"0.00005\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("quota_admission_seconds_bucket{le=\"0.0001\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("quota_admission_seconds_bucket{le=\"0.005\"} 4\n"),
            "{out}"
        );
        assert!(
            out.contains("quota_admission_seconds_bucket{le=\"1\"} 4\n"),
            "{out}"
        );
        assert!(
            out.contains("quota_admission_seconds_bucket{le=\"+Inf\"} 5\n"),
            "{out}"
        );
        assert!(
            out.contains("quota_admission_seconds_sum 2.00316\n"),
            "{out}"
        );
        assert!(out.contains("quota_admission_seconds_count 5\n"), "{out}");
    }

    #[test]
    fn hold_counters_render_one_family_per_name_and_a_line_per_label() {
        let c = HoldCounters {
            created: AtomicU64::new(7),
            settled: AtomicU64::new(3),
            released: AtomicU64::new(1),
            expired: AtomicU64::new(2),
            batches_one_statement: AtomicU64::new(5),
            batches_fell_back: AtomicU64::new(1),
            batches_locked: AtomicU64::new(4),
        };
        let mut out = String::new();
        c.render(&mut out);
        let lines: Vec<&str> = out.lines().filter(|l| !l.starts_with("# HELP")).collect();
        assert_eq!(
            lines,
            [
                "# TYPE quota_holds_total counter",
                "quota_holds_total{event=\"created\"} 7",
                "quota_holds_total{event=\"settled\"} 3",
                "quota_holds_total{event=\"released\"} 1",
                "quota_holds_total{event=\"expired\"} 2",
                "# TYPE quota_hold_batches_total counter",
                "quota_hold_batches_total{path=\"one_statement\"} 5",
                "quota_hold_batches_total{path=\"fell_back\"} 1",
                "quota_hold_batches_total{path=\"locked\"} 4",
            ]
        );
        assert_eq!(out.lines().filter(|l| l.starts_with("# HELP")).count(), 2);
    }
}
