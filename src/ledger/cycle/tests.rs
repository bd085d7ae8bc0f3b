use super::*;
use crate::event::quota_cycle::tests::{cycle, utc};
use crate::event::{Mode, Period};
use chrono::Datelike;

fn version(from: &str, cycle: Option<QuotaCycle>, deleted: bool) -> CycleVersion {
    CycleVersion {
        from: utc(from),
        cycle,
        deleted,
    }
}

#[test]
fn due_starts_follow_the_version_in_force_at_each_start() {
    let daily = cycle(Period::Day, Mode::Natural, 1, "UTC", None);
    let mut big = daily.clone();
    big.amount = Decimal::new(5000, 0);
    big.rollover = Decimal::new(100, 0);
    let versions = [
        version("2026-11-01T10:00:00Z", Some(daily.clone()), false),
        version("2026-11-03T12:00:00Z", Some(big), false),
        version("2026-11-05T06:00:00Z", None, false),
        version("2026-11-07T06:00:00Z", Some(daily.clone()), true),
        version("2026-11-08T06:00:00Z", Some(daily), false),
    ];
    let due = due_starts(&versions, None, utc("2026-11-10T00:00:00Z"), 100);
    let got: Vec<(String, String, String)> = due
        .iter()
        .map(|d| {
            (
                d.start.format("%d").to_string(),
                d.expires_at.format("%d").to_string(),
                d.amount.to_string(),
            )
        })
        .collect();
    let want = [
        ("02", "03", "1000"),
        ("03", "04", "1000"),
        ("04", "05", "5000"),
        ("05", "06", "5000"),
        ("09", "10", "1000"),
        ("10", "11", "1000"),
    ];
    assert_eq!(
        got,
        want.map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    );
    // After the last booked start, at most `limit`, in order (a catch-up
    // goes on from where it stopped).
    let after = due_starts(
        &versions,
        Some(utc("2026-11-04T00:00:00Z")),
        utc("2026-11-10T00:00:00Z"),
        2,
    );
    assert_eq!(
        after.iter().map(|d| d.start.day()).collect::<Vec<_>>(),
        [5, 9]
    );
    assert!(due_starts(&versions, None, utc("2026-11-01T23:59:59Z"), 10).is_empty());
}

#[test]
fn a_start_at_the_versions_own_moment_counts() {
    let c = cycle(
        Period::Hour,
        Mode::Relative,
        1,
        "UTC",
        Some("2026-11-30T09:00:00Z"),
    );
    let v = [version("2026-11-30T09:00:00Z", Some(c), false)];
    let due = due_starts(&v, None, utc("2026-11-30T09:00:00Z"), 10);
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].start, utc("2026-11-30T09:00:00Z"));
    assert_eq!(due[0].expires_at, utc("2026-11-30T10:00:00Z"));
    // A version whose time has a fraction of a second still starts at an
    // anchor in its own second (anchors are whole seconds).
    let c = cycle(
        Period::Hour,
        Mode::Relative,
        1,
        "UTC",
        Some("2026-11-30T09:00:00Z"),
    );
    let v = [version("2026-11-30T09:00:00.750Z", Some(c), false)];
    let due = due_starts(&v, None, utc("2026-11-30T09:00:01Z"), 10);
    assert_eq!(
        due.first().map(|d| d.start),
        Some(utc("2026-11-30T09:00:00Z"))
    );
}
