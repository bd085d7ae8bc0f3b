use super::*;
use chrono::TimeZone;

pub(crate) fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

pub(crate) fn cycle(
    period: Period,
    mode: Mode,
    every: u32,
    tz: &str,
    anchor: Option<&str>,
) -> QuotaCycle {
    QuotaCycle {
        amount: Decimal::new(1000, 0),
        period,
        every,
        mode,
        anchor: anchor.map(utc),
        timezone: tz.parse().unwrap(),
        rollover: Decimal::ZERO,
    }
}

/// `n` consecutive starts from the first at or after `from`.
fn starts(c: &QuotaCycle, from: &str, n: usize) -> Vec<String> {
    let sched = c.schedule(utc(from));
    let mut s = sched.first_at_or_after(utc(from));
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(s.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        s = sched.next_after(s);
    }
    out
}

#[test]
fn a_daily_natural_cycle_follows_local_midnight_through_both_dst_changes() {
    let c = cycle(Period::Day, Mode::Natural, 1, "America/New_York", None);
    // Spring forward on 8 March 2026: that day lasts 23 hours.
    assert_eq!(
        starts(&c, "2026-03-07T01:00:00Z", 3),
        [
            "2026-03-07T05:00:00Z",
            "2026-03-08T05:00:00Z",
            "2026-03-09T04:00:00Z"
        ]
    );
    // Fall back on 1 November 2026: that day lasts 25 hours.
    assert_eq!(
        starts(&c, "2026-10-31T03:00:00Z", 3),
        [
            "2026-10-31T04:00:00Z",
            "2026-11-01T04:00:00Z",
            "2026-11-02T05:00:00Z"
        ]
    );
}

#[test]
fn a_local_midnight_that_does_not_exist_starts_at_the_first_instant_after_it() {
    // Chile moves its clocks from 00:00 to 01:00 on 6 September 2026.
    let tz: Tz = "America/Santiago".parse().unwrap();
    let d = NaiveDate::from_ymd_opt(2026, 9, 6).unwrap();
    let start = local_start(tz, d);
    assert_eq!(start, utc("2026-09-06T04:00:00Z"));
    assert_eq!(start.with_timezone(&tz).hour(), 1);
    assert!(tz
        .from_local_datetime(&d.and_hms_opt(0, 0, 0).unwrap())
        .earliest()
        .is_none());
    let c = cycle(Period::Day, Mode::Natural, 1, "America/Santiago", None);
    assert_eq!(
        starts(&c, "2026-09-05T00:00:00Z", 3),
        [
            "2026-09-05T04:00:00Z",
            "2026-09-06T04:00:00Z",
            "2026-09-07T03:00:00Z"
        ]
    );
}

#[test]
fn an_hourly_natural_cycle_counts_both_repeated_hours_and_half_hour_zones() {
    let c = cycle(Period::Hour, Mode::Natural, 1, "America/New_York", None);
    // 01:00 happens twice on 1 November 2026: each is an hour's start.
    assert_eq!(
        starts(&c, "2026-11-01T04:30:00Z", 4),
        [
            "2026-11-01T05:00:00Z",
            "2026-11-01T06:00:00Z",
            "2026-11-01T07:00:00Z",
            "2026-11-01T08:00:00Z"
        ]
    );
    let india = cycle(Period::Hour, Mode::Natural, 1, "Asia/Kolkata", None);
    assert_eq!(
        starts(&india, "2026-11-30T10:00:00Z", 2),
        ["2026-11-30T10:30:00Z", "2026-11-30T11:30:00Z"]
    );
}

#[test]
fn weekly_and_monthly_natural_cycles_start_on_monday_and_the_first_in_their_zone() {
    let w = cycle(Period::Week, Mode::Natural, 1, "Europe/Berlin", None);
    // Monday 30 November 2026, 00:00 CET; Monday 30 March 2026 is after
    // the spring change (CEST).
    assert_eq!(
        starts(&w, "2026-11-26T00:00:00Z", 2),
        ["2026-11-29T23:00:00Z", "2026-12-06T23:00:00Z"]
    );
    assert_eq!(
        starts(&w, "2026-03-25T00:00:00Z", 1),
        ["2026-03-29T22:00:00Z"]
    );
    let m = cycle(Period::Month, Mode::Natural, 1, "Asia/Shanghai", None);
    assert_eq!(
        starts(&m, "2027-01-15T00:00:00Z", 3),
        [
            "2027-01-31T16:00:00Z",
            "2027-02-28T16:00:00Z",
            "2027-03-31T16:00:00Z"
        ]
    );
}

#[test]
fn every_n_counts_from_the_boundary_at_or_before_the_anchor() {
    let c = cycle(
        Period::Day,
        Mode::Natural,
        3,
        "UTC",
        Some("2026-11-02T15:00:00Z"),
    );
    assert_eq!(
        starts(&c, "2026-11-03T00:00:00Z", 3),
        [
            "2026-11-05T00:00:00Z",
            "2026-11-08T00:00:00Z",
            "2026-11-11T00:00:00Z"
        ]
    );
    // Without an anchor it counts from the version's own time.
    let d = cycle(Period::Month, Mode::Natural, 2, "UTC", None);
    assert_eq!(
        starts(&d, "2026-11-20T00:00:00Z", 2),
        ["2027-01-01T00:00:00Z", "2027-03-01T00:00:00Z"]
    );
}

#[test]
fn a_monthly_relative_cycle_anchored_on_the_31st_clamps_to_each_months_end() {
    let c = cycle(
        Period::Month,
        Mode::Relative,
        1,
        "UTC",
        Some("2026-01-31T10:00:00Z"),
    );
    assert_eq!(
        starts(&c, "2026-01-31T10:00:00Z", 6),
        [
            "2026-01-31T10:00:00Z",
            "2026-02-28T10:00:00Z",
            "2026-03-31T10:00:00Z",
            "2026-04-30T10:00:00Z",
            "2026-05-31T10:00:00Z",
            "2026-06-30T10:00:00Z"
        ]
    );
    // Computed from the anchor each time, from any moment, and with a
    // leap year's 29 February.
    let l = cycle(
        Period::Month,
        Mode::Relative,
        1,
        "UTC",
        Some("2027-12-31T00:00:00Z"),
    );
    assert_eq!(
        starts(&l, "2028-02-01T00:00:00Z", 2),
        ["2028-02-29T00:00:00Z", "2028-03-31T00:00:00Z"]
    );
    let y = cycle(
        Period::Month,
        Mode::Relative,
        12,
        "UTC",
        Some("2028-02-29T08:00:00Z"),
    );
    assert_eq!(
        starts(&y, "2028-03-01T00:00:00Z", 4),
        [
            "2029-02-28T08:00:00Z",
            "2030-02-28T08:00:00Z",
            "2031-02-28T08:00:00Z",
            "2032-02-29T08:00:00Z"
        ]
    );
}

#[test]
fn relative_cycles_of_fixed_length_are_utc_steps_from_the_anchor() {
    let c = cycle(
        Period::Hour,
        Mode::Relative,
        5,
        "Asia/Shanghai",
        Some("2026-11-30T01:17:00Z"),
    );
    assert_eq!(
        starts(&c, "2026-11-29T00:00:00Z", 2),
        ["2026-11-30T01:17:00Z", "2026-11-30T06:17:00Z"]
    );
    assert_eq!(
        starts(&c, "2026-12-30T00:00:00Z", 1),
        ["2026-12-30T01:17:00Z"]
    );
    let w = cycle(
        Period::Week,
        Mode::Relative,
        2,
        "UTC",
        Some("2026-03-01T12:00:00Z"),
    );
    assert_eq!(
        starts(&w, "2026-03-16T00:00:00Z", 1),
        ["2026-03-29T12:00:00Z"]
    );
}
