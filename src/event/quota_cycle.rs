//! An entity's `quota_cycle` (contract, "Quota cycles") and its schedule:
//! when its cycle blocks start and end. Calendar arithmetic (time zones,
//! daylight-saving days of 23 or 25 hours, month ends, leap days) is
//! chrono-tz's and chrono's; this module only says which calendar moments
//! count. Which starts an account is due is the ledger's
//! (`ledger::cycle`). Pure: time is passed in.

use chrono::{
    DateTime, Datelike, Duration, LocalResult, Months, NaiveDate, NaiveDateTime, TimeZone,
    Timelike, Utc,
};
use chrono_tz::Tz;
use rust_decimal::Decimal;

/// The largest `every` a cycle may have.
pub const MAX_EVERY: u32 = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Period {
    Hour,
    Day,
    Week,
    Month,
}

impl Period {
    pub const ALL: [Period; 4] = [Period::Hour, Period::Day, Period::Week, Period::Month];

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    pub fn parse(s: &str) -> Option<Period> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Calendar boundaries in the cycle's time zone.
    Natural,
    /// `anchor` + k × `every` × `period`, in UTC.
    Relative,
}

/// An entity's `quota_cycle`, as decoded.
#[derive(Clone, Debug, PartialEq)]
pub struct QuotaCycle {
    pub amount: Decimal,
    pub period: Period,
    pub every: u32,
    pub mode: Mode,
    /// Required in relative mode; natural mode counts `every` from the
    /// boundary at or before it (default: the version's effective time).
    pub anchor: Option<DateTime<Utc>>,
    pub timezone: Tz,
    /// The most of a cycle's unused credit that carries into the next.
    pub rollover: Decimal,
}

impl QuotaCycle {
    /// The schedule of a version in force from `from`.
    pub fn schedule(&self, from: DateTime<Utc>) -> Schedule<'_> {
        let anchor = self.anchor.unwrap_or(from);
        let base = match self.mode {
            Mode::Natural => self.unit_index(self.unit_floor(anchor)),
            Mode::Relative => 0,
        };
        Schedule {
            cycle: self,
            anchor,
            base,
        }
    }

    /// The natural boundary at or before `t` (or shortly before it, around
    /// a repeated local hour; the caller steps forward).
    fn unit_floor(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        let local = t.with_timezone(&self.timezone);
        match self.period {
            Period::Hour => {
                let into = i64::from(local.minute() * 60 + local.second());
                t - Duration::seconds(into) - Duration::nanoseconds(i64::from(local.nanosecond()))
            }
            Period::Day => local_start(self.timezone, local.date_naive()),
            Period::Week => local_start(self.timezone, monday_of(local.date_naive())),
            Period::Month => local_start(self.timezone, first_of_month(local.date_naive())),
        }
    }

    /// The next natural boundary after boundary `b`.
    fn unit_next(&self, b: DateTime<Utc>) -> DateTime<Utc> {
        let day = b.with_timezone(&self.timezone).date_naive();
        let next = match self.period {
            Period::Hour => self.unit_floor(b + Duration::hours(1)),
            Period::Day => local_start(self.timezone, day + Duration::days(1)),
            Period::Week => local_start(self.timezone, monday_of(day) + Duration::days(7)),
            Period::Month => local_start(self.timezone, first_of_month(day) + Months::new(1)),
        };
        // Strictly forward whatever the zone does.
        if next > b {
            next
        } else {
            b + Duration::hours(1)
        }
    }

    /// A natural boundary's position in the endless sequence of its unit
    /// (consecutive boundaries have consecutive indices), for `every`.
    fn unit_index(&self, b: DateTime<Utc>) -> i64 {
        let day = b.with_timezone(&self.timezone).date_naive();
        match self.period {
            Period::Hour => b.timestamp().div_euclid(3600),
            Period::Day => i64::from(day.num_days_from_ce()),
            Period::Week => i64::from(monday_of(day).num_days_from_ce()).div_euclid(7),
            Period::Month => i64::from(day.year()) * 12 + i64::from(day.month0()),
        }
    }
}

/// A version's cycle starts.
pub struct Schedule<'a> {
    cycle: &'a QuotaCycle,
    anchor: DateTime<Utc>,
    /// Natural mode: the unit index of the boundary at or before the anchor.
    base: i64,
}

impl Schedule<'_> {
    /// The first start at or after `t`.
    pub fn first_at_or_after(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        let c = self.cycle;
        match c.mode {
            Mode::Natural => {
                let mut b = c.unit_floor(t);
                while b < t {
                    b = c.unit_next(b);
                }
                while (c.unit_index(b) - self.base).rem_euclid(i64::from(c.every)) != 0 {
                    b = c.unit_next(b);
                }
                b
            }
            Mode::Relative => {
                if t <= self.anchor {
                    return self.anchor;
                }
                // An estimate from below, then forward to the first start
                // not before `t`.
                let mut k = match self.fixed_step() {
                    Some(step) => ((t - self.anchor).num_seconds() / step.num_seconds()).max(1) - 1,
                    None => {
                        let (a, b) = (self.anchor, t);
                        let months = (i64::from(b.year()) - i64::from(a.year())) * 12
                            + i64::from(b.month0())
                            - i64::from(a.month0());
                        (months / i64::from(c.every) - 1).max(0)
                    }
                };
                while self.relative(k) < t {
                    k += 1;
                }
                self.relative(k)
            }
        }
    }

    /// The start after start `s`.
    pub fn next_after(&self, s: DateTime<Utc>) -> DateTime<Utc> {
        match s.checked_add_signed(Duration::nanoseconds(1)) {
            Some(t) => self.first_at_or_after(t),
            None => DateTime::<Utc>::MAX_UTC,
        }
    }

    /// The length of a relative step, when it is fixed (all but months).
    fn fixed_step(&self) -> Option<Duration> {
        let n = i64::from(self.cycle.every);
        match self.cycle.period {
            Period::Hour => Some(Duration::hours(n)),
            Period::Day => Some(Duration::days(n)),
            Period::Week => Some(Duration::weeks(n)),
            Period::Month => None,
        }
    }

    /// The k-th relative start, computed from the anchor (months clamp to
    /// the month's last day, so the 31st gives the 30th in April).
    fn relative(&self, k: i64) -> DateTime<Utc> {
        match self.fixed_step() {
            Some(step) => self.anchor + Duration::seconds(step.num_seconds().saturating_mul(k)),
            None => {
                let months = u32::try_from(k * i64::from(self.cycle.every)).unwrap_or(u32::MAX);
                self.anchor
                    .checked_add_months(Months::new(months))
                    .unwrap_or(DateTime::<Utc>::MAX_UTC)
            }
        }
    }
}

fn monday_of(d: NaiveDate) -> NaiveDate {
    d - Duration::days(i64::from(d.weekday().num_days_from_monday()))
}

fn first_of_month(d: NaiveDate) -> NaiveDate {
    d.with_day(1).expect("every month has a 1st")
}

/// The first instant of local date `d` in `tz`: local 00:00, the earlier
/// one when it repeats, and when it does not exist (the clocks jump over
/// it) the first instant after it.
fn local_start(tz: Tz, d: NaiveDate) -> DateTime<Utc> {
    let midnight: NaiveDateTime = d.and_hms_opt(0, 0, 0).expect("00:00 is a time");
    match tz.from_local_datetime(&midnight) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(a, b) => a.min(b).with_timezone(&Utc),
        LocalResult::None => {
            // In a gap: the first local minute that exists is the instant
            // the clocks jumped (gaps end on a whole minute; none lasts more
            // than a day and a half).
            let mut m = midnight;
            for _ in 0..(48 * 60) {
                m += Duration::minutes(1);
                if let Some(t) = tz.from_local_datetime(&m).earliest() {
                    return t.with_timezone(&Utc);
                }
            }
            Utc.from_utc_datetime(&midnight)
        }
    }
}

#[cfg(test)]
#[path = "quota_cycle_tests.rs"]
pub(crate) mod tests;
