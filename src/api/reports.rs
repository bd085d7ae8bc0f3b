//! `GET /v1/reports/spend?from=&to=&bucket=&by=&tz=` (contract, "Spend
//! reports"): spend per bucket and dimensions from the rollup. A
//! reseller-scoped token sees its reseller's usage only.
//!
//! The rollup keeps whole UTC hours, so `from` and `to` must be whole
//! hours, and a time zone must be a whole number of hours from UTC over
//! the period (Kolkata's buckets cannot be cut from UTC hours): both are
//! refused with a message saying so rather than answered approximately.

use axum::extract::{Query, State};
use axum::Json;
use chrono::{DateTime, Offset, TimeDelta, TimeZone, Timelike, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::finance::time_param;
use super::{auth, ApiError, AppState};
use crate::ledger::spend::DIMS;
use crate::store::finance::dec;
use crate::store::finance::spend::{self, Bucket, SpendQuery, SpendRow};

/// The most rows one answer holds.
pub const MAX_ROWS: usize = 50_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpendParams {
    pub from: Option<String>,
    pub to: Option<String>,
    pub bucket: Option<String>,
    pub by: Option<String>,
    pub tz: Option<String>,
}

pub async fn spend(
    State(st): State<AppState>,
    caller: Option<axum::Extension<auth::Caller>>,
    q: Result<Query<SpendParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(p) = q.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let scope = caller.and_then(|c| c.reseller_id.clone());
    let q = parse(&p, scope)?;
    Ok(Json(report(&st, &q).await?))
}

/// Run a report and shape its answer (the console's overview uses it too).
pub async fn report(st: &AppState, q: &SpendQuery) -> Result<Value, ApiError> {
    let rows = match spend::spend(&st.reports, q).await {
        Ok(Some(rows)) => rows,
        Ok(None) => {
            return Err(ApiError::invalid(
                "by",
                format!("the report has more than {MAX_ROWS} rows: ask for fewer dimensions, a coarser bucket or a shorter period"),
            ))
        }
        Err(e) if spend::zone_unknown(&e) => {
            return Err(ApiError::invalid("tz", "the database does not know this time zone"))
        }
        Err(e) => return Err(ApiError::internal(e)),
    };
    shape(q, &rows).ok_or_else(|| {
        ApiError::invalid(
            "by",
            "the totals do not fit exact decimal arithmetic (28 digits): ask for a shorter period",
        )
    })
}

pub fn parse(p: &SpendParams, reseller: Option<String>) -> Result<SpendQuery, ApiError> {
    let from = whole_hour("from", p.from.as_deref())?;
    let to = whole_hour("to", p.to.as_deref())?;
    if from >= to {
        return Err(ApiError::invalid("to", "must be later than `from`"));
    }
    let bucket = match p.bucket.as_deref() {
        None => Bucket::Day,
        Some(b) => Bucket::parse(b).ok_or_else(|| {
            ApiError::invalid("bucket", format!("`{b}` is not one of hour, day, month"))
        })?,
    };
    let by = dims_param(p.by.as_deref())?;
    let tz = match p.tz.as_deref() {
        None => None,
        Some(z) => Some(zone_param(z, from, to)?),
    };
    Ok(SpendQuery {
        from,
        to,
        bucket,
        by,
        tz,
        reseller,
        max_rows: MAX_ROWS,
    })
}

fn whole_hour(name: &str, v: Option<&str>) -> Result<DateTime<Utc>, ApiError> {
    let t =
        time_param(name, v)?.ok_or_else(|| ApiError::invalid(name, "is required (RFC 3339)"))?;
    if t.minute() != 0 || t.second() != 0 || t.nanosecond() != 0 {
        return Err(ApiError::invalid(
            name,
            "must be a whole hour: the rollup keeps whole UTC hours",
        ));
    }
    Ok(t)
}

/// `by`: dimension names separated by commas, each once.
pub fn dims_param(v: Option<&str>) -> Result<Vec<&'static str>, ApiError> {
    let mut out: Vec<&'static str> = Vec::new();
    for name in v.unwrap_or("").split(',').filter(|s| !s.is_empty()) {
        let Some(d) = DIMS.iter().find(|d| **d == name) else {
            return Err(ApiError::invalid(
                "by",
                format!("`{name}` is not one of {}", DIMS.join(", ")),
            ));
        };
        if out.contains(d) {
            return Err(ApiError::invalid("by", format!("`{name}` is named twice")));
        }
        out.push(d);
    }
    Ok(out)
}

/// An IANA zone that is a whole number of hours from UTC on every day of
/// the period (checked once a day and at both ends: zones change offset at
/// most a few times a year).
fn zone_param(z: &str, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<String, ApiError> {
    let tz: chrono_tz::Tz = z
        .parse()
        .map_err(|_| ApiError::invalid("tz", format!("`{z}` is not an IANA time zone name")))?;
    let mut t = from;
    loop {
        let secs = tz
            .offset_from_utc_datetime(&t.naive_utc())
            .fix()
            .local_minus_utc();
        if secs % 3600 != 0 {
            return Err(ApiError::invalid(
                "tz",
                format!("`{z}` is not a whole number of hours from UTC at {}: the rollup keeps whole UTC hours", t.to_rfc3339()),
            ));
        }
        if t >= to {
            return Ok(tz.name().to_string());
        }
        t = (t + TimeDelta::days(1)).min(to);
    }
}

/// The answer; `None` when a total does not fit exact decimal arithmetic.
fn shape(q: &SpendQuery, rows: &[SpendRow]) -> Option<Value> {
    let tz: chrono_tz::Tz =
        q.tz.as_deref()
            .and_then(|z| z.parse().ok())
            .unwrap_or(chrono_tz::UTC);
    let mut total = SpendRow {
        bucket: q.from,
        dims: vec![],
        charge: Decimal::ZERO,
        requests: 0,
        tokens: [Decimal::ZERO; 4],
    };
    let list: Vec<Value> = rows
        .iter()
        .map(|r| {
            total.charge = total.charge.checked_add(r.charge)?;
            total.requests = total.requests.checked_add(r.requests)?;
            for (s, t) in total.tokens.iter_mut().zip(r.tokens) {
                *s = s.checked_add(t)?;
            }
            let mut o = Map::new();
            o.insert(
                "bucket".into(),
                json!(r.bucket.with_timezone(&tz).to_rfc3339()),
            );
            for (d, v) in q.by.iter().zip(&r.dims) {
                o.insert((*d).into(), json!(v));
            }
            sums(&mut o, r);
            Some(Value::Object(o))
        })
        .collect::<Option<_>>()?;
    let mut totals = Map::new();
    sums(&mut totals, &total);
    Some(json!({"rows": list, "totals": totals}))
}

fn sums(o: &mut Map<String, Value>, r: &SpendRow) {
    o.insert("charge".into(), json!(dec(r.charge)));
    o.insert("requests".into(), json!(r.requests));
    for (name, v) in [
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
    ]
    .iter()
    .zip(r.tokens)
    {
        // Token sums are integers; a JSON number while it fits in 64 bits.
        let n = u64::try_from(v)
            .map(|n| json!(n))
            .unwrap_or_else(|_| json!(dec(v)));
        o.insert((*name).into(), n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(from: &str, to: &str, by: Option<&str>, tz: Option<&str>) -> SpendParams {
        SpendParams {
            from: Some(from.into()),
            to: Some(to.into()),
            bucket: None,
            by: by.map(Into::into),
            tz: tz.map(Into::into),
        }
    }

    #[test]
    fn periods_are_whole_hours_and_zones_whole_hours_from_utc() {
        let ok = parse(
            &params(
                "2026-11-01T00:00:00Z",
                "2026-12-01T00:00:00Z",
                Some("model,reseller"),
                Some("America/New_York"),
            ),
            None,
        )
        .unwrap();
        assert_eq!(ok.by, vec!["model", "reseller"]);
        assert!(parse(
            &params("2026-11-01T00:30:00Z", "2026-12-01T00:00:00Z", None, None),
            None
        )
        .is_err());
        assert!(parse(
            &params("2026-12-01T00:00:00Z", "2026-11-01T00:00:00Z", None, None),
            None
        )
        .is_err());
        let e = parse(
            &params(
                "2026-11-01T00:00:00Z",
                "2026-11-02T00:00:00Z",
                None,
                Some("Asia/Kolkata"),
            ),
            None,
        )
        .unwrap_err();
        assert!(e
            .detail
            .unwrap_or_default()
            .contains("whole number of hours"));
        // Caracas moved from -4:30 to -4 on 2016-05-01.
        let caracas = |from: &str, to: &str| {
            parse(&params(from, to, None, Some("America/Caracas")), None).is_ok()
        };
        assert!(caracas("2016-06-01T00:00:00Z", "2016-07-01T00:00:00Z"));
        assert!(!caracas("2016-04-01T00:00:00Z", "2016-04-02T00:00:00Z"));
        assert!(!caracas("2016-04-01T00:00:00Z", "2016-06-01T00:00:00Z"));
        assert!(parse(
            &params(
                "2026-11-01T00:00:00Z",
                "2026-11-02T00:00:00Z",
                Some("model,model"),
                None
            ),
            None
        )
        .is_err());
        assert!(parse(
            &params(
                "2026-11-01T00:00:00Z",
                "2026-11-02T00:00:00Z",
                Some("colour"),
                None
            ),
            None
        )
        .is_err());
    }

    #[test]
    fn each_report_reads_the_cheapest_table_that_holds_it() {
        use spend::Source::*;
        let q = |by: &str, tz: Option<&str>, from: &str, scope: Option<&str>| {
            let p = params(from, "2026-12-01T00:00:00Z", Some(by), tz);
            spend::source(&parse(&p, scope.map(String::from)).unwrap())
        };
        let day = "2026-11-01T00:00:00Z";
        let five = "2026-11-01T05:00:00Z";
        assert_eq!(q("model", Some("Europe/Berlin"), five, None), OneDim);
        assert_eq!(q("", None, day, None), OneDim);
        assert_eq!(q("reseller", None, day, Some("r1")), OneDim);
        assert_eq!(q("model", None, day, Some("r1")), Daily);
        assert_eq!(q("model,reseller", None, day, None), Daily);
        assert_eq!(
            q("model,reseller", Some("Europe/Berlin"), day, None),
            Hourly
        );
        assert_eq!(q("model,reseller", None, five, None), Hourly);
        assert_eq!(q("model,key", None, day, None), Hourly);
    }
}
