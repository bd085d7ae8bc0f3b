//! The overview and account pages. Each figure comes from the function the
//! API answers the same question with (`api::reports::report`,
//! `store::read::balance`, `store::finance::{summary, page, csv}`,
//! `store::outbox::list`), under the same authorization.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use maud::{html, Markup};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{error_page, layout, money, script_json, signed, thousands, Signed};
use crate::api::auth::{access_denied, in_tree};
use crate::api::finance::{account as account_param, csv_response, cursor_param};
use crate::api::reports::{self, SpendParams};
use crate::api::{ApiError, AppState};
use crate::store::finance::{self, Period};
use crate::store::{console as store, outbox, quarantine, read};

/// The series the overview's chart can stack by.
const SERIES: [&str; 3] = ["model", "reseller", "user"];

#[derive(Deserialize, Default)]
pub struct OverviewQuery {
    from: Option<String>,
    to: Option<String>,
    bucket: Option<String>,
    by: Option<String>,
    reconcile: Option<String>,
}

fn date_param(name: &str, v: Option<&str>, default: NaiveDate) -> Result<NaiveDate, ApiError> {
    match v {
        None | Some("") => Ok(default),
        Some(s) => NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map_err(|_| ApiError::invalid(name, format!("`{s}` is not a date (YYYY-MM-DD)"))),
    }
}

fn midnight(d: NaiveDate) -> DateTime<Utc> {
    d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc()
}

pub async fn overview(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<OverviewQuery>,
) -> Response {
    let s = match signed(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match overview_body(&st, &s, &q).await {
        Ok(body) => layout("Overview", Some(&s), body).into_response(),
        Err(e) => error_page(Some(&s), e),
    }
}

async fn overview_body(st: &AppState, s: &Signed, q: &OverviewQuery) -> Result<Markup, ApiError> {
    let tomorrow = (st.clock)().date_naive() + TimeDelta::days(1);
    let to = date_param("to", q.to.as_deref(), tomorrow)?;
    let from = date_param("from", q.from.as_deref(), to - TimeDelta::days(30))?;
    let bucket = q.bucket.clone().unwrap_or_else(|| "day".into());
    let by = q.by.clone().unwrap_or_else(|| "model".into());
    if !SERIES.contains(&by.as_str()) {
        return Err(ApiError::invalid("by", "must be model, reseller or user"));
    }
    let scope = s.caller.reseller_id.clone();
    let params = |by: &str, bucket: &str| SpendParams {
        from: Some(midnight(from).to_rfc3339()),
        to: Some(midnight(to).to_rfc3339()),
        bucket: Some(bucket.into()),
        by: Some(by.into()),
        tz: None,
    };
    let spend = reports::report(st, &reports::parse(&params(&by, &bucket), scope.clone())?).await?;
    let users = reports::report(
        st,
        &reports::parse(&params("user", "month"), scope.clone())?,
    )
    .await?;
    let internal = ApiError::internal;
    let m = store::money(&st.reports, midnight(from), midnight(to), scope.as_deref())
        .await
        .map_err(internal)?;
    let counts = quarantine::counts(&st.reports).await.map_err(internal)?;
    let holds = match scope {
        None => Some(
            store::holds_in_flight(&st.reports)
                .await
                .map_err(internal)?,
        ),
        Some(_) => None,
    };
    let reconcile = match (&q.reconcile, &scope) {
        (Some(_), None) => Some(finance::reconcile(&st.reports).await.map_err(internal)?),
        _ => None,
    };
    let mut chart = chart_data(&spend, &by);
    chart["bucket"] = json!(bucket);
    let top = top_accounts(&users);
    Ok(html! {
        h1 { "Overview" }
        form.filters method="get" action="/console/" aria-label="Period" {
            label { "From (UTC)" input type="date" name="from" value=(from); }
            label { "To (UTC, exclusive)" input type="date" name="to" value=(to); }
            label { "Bucket" select name="bucket" { @for b in ["hour", "day", "month"] { option value=(b) selected[b == bucket] { (b) } } } }
            label { "Stack by" select name="by" { @for b in SERIES { option value=(b) selected[b == by] { (b) } } } }
            button type="submit" { "Show" }
        }
        h2 #spend-heading { "Spend by " (by) ", per " (bucket) }
        div.chart-box { canvas #spend-chart role="img" aria-labelledby="spend-heading" aria-describedby="spend-table" {} }
        script #spend-data type="application/json" { (script_json(&chart)) }
        table #spend-table {
            caption.muted { "Totals per " (by) " over the period (the chart's figures, exactly)" }
            thead { tr { th scope="col" { (by) } th.num scope="col" { "spend" } } }
            tbody {
                @for sr in chart["series"].as_array().into_iter().flatten() {
                    tr { td { (sr["name"].as_str().unwrap_or("")) } td.num { (money(dec(&sr["total"]))) } }
                }
            }
            tfoot { tr { th scope="row" { "Total" } td.num #spend-total data-units=(spend["totals"]["charge"].as_str().unwrap_or("0")) { (money(dec(&spend["totals"]["charge"]))) } } }
        }
        p.muted { (thousands(&spend["totals"]["requests"].to_string())) " requests" }
        div.grid {
            section.card aria-labelledby="top-h" {
                h2 #top-h { "Top users" }
                table #top-accounts {
                    thead { tr { th scope="col" { "user" } th.num scope="col" { "spend" } th.num scope="col" { "requests" } } }
                    tbody { @for (id, charge, n) in &top {
                        tr data-id=(id) data-units=(charge.normalize().to_string()) {
                            td { a href=(format!("/console/accounts/user/{}", urlencode(id))) { (id) } }
                            td.num { (money(*charge)) } td.num { (thousands(&n.to_string())) }
                        }
                    } }
                }
            }
            section.card aria-labelledby="money-h" {
                h2 #money-h { "Grants and breakage" }
                @if s.caller.reseller_id.is_some() { p.muted { "Your reseller's own ledger." } }
                (category_table("Granted", &m.grants))
                (category_table("Breakage (expired or voided)", &m.breakage))
            }
            section.card aria-labelledby="ops-h" {
                h2 #ops-h { "Operations" }
                @if let Some((n, amount)) = holds { p { "Holds in flight: " strong #holds-in-flight { (thousands(&n.to_string())) } ", holding " (money(amount)) } }
                @match (&reconcile, s.caller.reseller_id.is_some()) {
                    (Some(r), _) => p #reconcile-status { "Reconcile: " @if r.ok { strong.ok { "ok" } } @else { strong.bad { (r.problems.len()) " problems" } } },
                    (None, false) => p { a href=(format!("/console/?from={from}&to={to}&bucket={bucket}&by={by}&reconcile=1")) { "Run reconcile" } span.muted { " (reads the whole ledger)" } },
                    (None, true) => p.muted { "Reconcile is for unscoped tokens." },
                }
                h3 { "Dead letters and waiting events" }
                table #quarantine-counts {
                    thead { tr { th scope="col" { "state" } th scope="col" { "reason" } th.num scope="col" { "events" } } }
                    tbody { @for (state, reason, n) in &counts {
                        tr { td { (state) } td { a href=(format!("/console/quarantine?state={state}&reason={reason}")) { (reason) } } td.num { (thousands(&n.to_string())) } }
                    } }
                }
            }
        }
        script src="/console/assets/chart.umd.min.js" {}
        script src="/console/assets/console.js" {}
    })
}

fn category_table(title: &str, m: &BTreeMap<String, Decimal>) -> Markup {
    html! {
        table {
            caption { (title) }
            tbody {
                @if m.is_empty() { tr { td.muted colspan="2" { "none" } } }
                @for (cat, amount) in m { tr { td { (cat) } td.num { (money(*amount)) } } }
            }
        }
    }
}

fn dec(v: &Value) -> Decimal {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or_default()
}

/// A path segment or query value, percent-encoded (unreserved characters
/// kept).
fn urlencode(s: &str) -> String {
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, KEEP).to_string()
}

/// The report as the chart draws it: bucket labels, and per series its
/// value in each bucket and its total (decimal strings of units).
fn chart_data(report: &Value, by: &str) -> Value {
    let rows = report["rows"].as_array().cloned().unwrap_or_default();
    let mut labels: Vec<String> = Vec::new();
    let mut series: BTreeMap<String, BTreeMap<String, Decimal>> = BTreeMap::new();
    for r in &rows {
        let label = r["bucket"].as_str().unwrap_or("").to_string();
        if labels.last() != Some(&label) {
            labels.push(label.clone());
        }
        let name = r[by].as_str().unwrap_or("(none)").to_string();
        *series.entry(name).or_default().entry(label).or_default() += dec(&r["charge"]);
    }
    let series: Vec<Value> = series
        .into_iter()
        .map(|(name, by_label)| {
            let total: Decimal = by_label.values().copied().sum();
            let values: Vec<String> = labels
                .iter()
                .map(|l| {
                    by_label
                        .get(l)
                        .copied()
                        .unwrap_or_default()
                        .normalize()
                        .to_string()
                })
                .collect();
            json!({"name": name, "values": values, "total": total.normalize().to_string()})
        })
        .collect();
    json!({"labels": labels, "series": series})
}

/// Users by spend over the period, the ten largest.
fn top_accounts(report: &Value) -> Vec<(String, Decimal, i64)> {
    let mut by: BTreeMap<String, (Decimal, i64)> = BTreeMap::new();
    for r in report["rows"].as_array().into_iter().flatten() {
        let e = by
            .entry(r["user"].as_str().unwrap_or("").to_string())
            .or_default();
        e.0 += dec(&r["charge"]);
        e.1 += r["requests"].as_i64().unwrap_or(0);
    }
    let mut v: Vec<(String, Decimal, i64)> = by.into_iter().map(|(k, (c, n))| (k, c, n)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(10);
    v
}

#[derive(Deserialize, Default)]
pub struct FindQuery {
    kind: Option<String>,
    id: Option<String>,
}

pub async fn find_account(Query(q): Query<FindQuery>) -> Response {
    let (kind, id) = (q.kind.unwrap_or_default(), q.id.unwrap_or_default());
    Redirect::to(&format!(
        "/console/accounts/{}/{}",
        urlencode(&kind),
        urlencode(id.trim())
    ))
    .into_response()
}

#[derive(Deserialize, Default)]
pub struct AccountQuery {
    from: Option<String>,
    to: Option<String>,
    cursor: Option<String>,
}

/// The account a page names, when the signed-in token may read it (a
/// scoped token: in its reseller's tree, as the API decides).
fn readable(
    st: &AppState,
    s: &Signed,
    kind: &str,
    id: &str,
) -> Result<crate::event::AccountRef, ApiError> {
    let a = account_param(kind, id)?;
    if let Some(r) = s.caller.reseller_id.as_deref() {
        if !in_tree(st, r, a.kind, &a.id) {
            return Err(access_denied());
        }
    }
    Ok(a)
}

fn period(q: &AccountQuery) -> Result<Period, ApiError> {
    let far = NaiveDate::MIN;
    let from = date_param("from", q.from.as_deref(), far)?;
    let to = date_param("to", q.to.as_deref(), far)?;
    Ok(Period {
        from: (from != far).then(|| midnight(from)),
        to: (to != far).then(|| midnight(to)),
    })
}

pub async fn account(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path((kind, id)): Path<(String, String)>,
    Query(q): Query<AccountQuery>,
) -> Response {
    let s = match signed(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match account_body(&st, &s, &kind, &id, &q).await {
        Ok(body) => layout(&format!("{kind} {id}"), Some(&s), body).into_response(),
        Err(e) => error_page(Some(&s), e),
    }
}

async fn account_body(
    st: &AppState,
    s: &Signed,
    kind: &str,
    id: &str,
    q: &AccountQuery,
) -> Result<Markup, ApiError> {
    let a = readable(st, s, kind, id)?;
    let p = period(q)?;
    let after = cursor_param(q.cursor.as_deref())?;
    let internal = ApiError::internal;
    let Some(b) = read::balance(&st.pool, &a, (st.clock)(), None)
        .await
        .map_err(internal)?
    else {
        return Err(ApiError::not_found(
            "account_not_found",
            format!("No ledger for {a}: no event has named it."),
        ));
    };
    let blocks = store::blocks(&st.reports, a.kind.as_str(), &a.id)
        .await
        .map_err(internal)?;
    let summary = finance::summary(&st.reports, &a, p)
        .await
        .map_err(internal)?;
    let (entries, next) = finance::page(&st.reports, &a, p, after, 50)
        .await
        .map_err(internal)?;
    let notes = outbox::list(
        &st.reports,
        Some(a.kind.as_str()),
        Some(&a.id),
        None,
        None,
        20,
    )
    .await
    .map_err(internal)?;
    let d = |v: &str| v.parse::<Decimal>().unwrap_or_default();
    let keep = |extra: &str| {
        let mut qs = vec![];
        if let Some(f) = q.from.as_deref().filter(|f| !f.is_empty()) {
            qs.push(format!("from={f}"));
        }
        if let Some(t) = q.to.as_deref().filter(|t| !t.is_empty()) {
            qs.push(format!("to={t}"));
        }
        if !extra.is_empty() {
            qs.push(extra.to_string());
        }
        if qs.is_empty() {
            String::new()
        } else {
            format!("?{}", qs.join("&"))
        }
    };
    let base = format!("/console/accounts/{}/{}", a.kind.as_str(), urlencode(&a.id));
    Ok(html! {
        h1 { (a.kind.as_str()) " " (a.id) }
        dl.grid #balance {
            div.card { dt { "Balance" } dd #balance-balance data-units=(b.balance) { (money(d(&b.balance))) } }
            div.card { dt { "Available" } dd #balance-available data-units=(b.available.clone().unwrap_or_default()) { (money(d(b.available.as_deref().unwrap_or("0")))) } }
            div.card { dt { "Held" } dd #balance-held { (money(d(b.held.as_deref().unwrap_or("0")))) } }
            div.card { dt { "Debt" } dd #balance-debt { (money(d(b.debt.as_deref().unwrap_or("0")))) } }
            div.card { dt { "Limited" } dd { (if b.limited { "yes" } else { "no (unlimited: usage is recorded)" }) }
                dt { "Expires" } dd { (b.expires_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "never".into())) } }
        }
        h2 { "Credit blocks" }
        table #blocks {
            thead { tr { th scope="col" { "block" } th scope="col" { "source" } th scope="col" { "category" } th scope="col" { "effective" } th scope="col" { "expires" } th.num scope="col" { "amount" } th.num scope="col" { "left" } } }
            tbody {
                @if blocks.is_empty() { tr { td.muted colspan="7" { "none" } } }
                @for (bid, source, cat, eff, exp, amount, left, voided) in &blocks {
                    tr { td { (bid) @if *voided { " (voided)" } } td { (source) } td { (cat.as_deref().unwrap_or("")) } td { (eff.to_rfc3339()) }
                         td { (exp.map(|t| t.to_rfc3339()).unwrap_or_else(|| "never".into())) } td.num { (money(*amount)) } td.num { (money(*left)) } }
                }
            }
        }
        h2 { "Statement" }
        form.filters method="get" action=(base) aria-label="Statement period" {
            label { "From (UTC)" input type="date" name="from" value=(q.from.clone().unwrap_or_default()); }
            label { "To (UTC, exclusive)" input type="date" name="to" value=(q.to.clone().unwrap_or_default()); }
            button type="submit" { "Show" }
            a #csv-link href=(format!("{base}/ledger.csv{}", keep(""))) download { "Download CSV" }
        }
        table #statement {
            tbody {
                @for (label, v) in [("Opening balance", &summary.opening_balance), ("Grants", &summary.grants), ("Usage", &summary.usage), ("Expiry", &summary.expiry),
                    ("Adjustments", &summary.adjustments), ("Reversals", &summary.reversals), ("Voids", &summary.voids), ("Rollovers", &summary.rollovers), ("Closing balance", &summary.closing_balance)] {
                    tr { th scope="row" { (label) } td.num data-units=(v) { (money(d(v))) } }
                }
                tr { th scope="row" { "Ties out" } td #ties-out { @if summary.ties_out { span.ok { "yes" } } @else { span.bad { "NO" } } } }
                @if let Some(br) = &summary.breakage { @for (cat, v) in br { tr { th scope="row" { "Breakage: " (cat) } td.num { (money(d(v))) } } } }
            }
        }
        h2 { "Ledger" }
        table #ledger {
            thead { tr { th.num scope="col" { "seq" } th scope="col" { "type" } th scope="col" { "event" } th.num scope="col" { "amount" } th.num scope="col" { "balance after" } th scope="col" { "occurred" } th scope="col" { "recorded" } } }
            tbody { @for e in &entries {
                tr { td.num { (e.seq) } td { (e.entry_type) } td { (e.event_id) } td.num { (money(d(&e.amount))) } td.num { (money(d(&e.balance_after))) }
                     td { (e.occurred_at.to_rfc3339()) } td { (e.recorded_at.to_rfc3339()) } }
            } }
        }
        @if let Some(n) = next { p { a #ledger-next href=(format!("{base}{}", keep(&format!("cursor=s{n}")))) { "Next page" } } }
        h2 { "Notifications" }
        table #notifications {
            thead { tr { th scope="col" { "type" } th scope="col" { "occurred" } th scope="col" { "id" } } }
            tbody {
                @if notes.is_empty() { tr { td.muted colspan="3" { "none" } } }
                @for (_, _, n) in &notes { tr { td { (n["type"].as_str().unwrap_or("")) } td { (n["occurred_at"].as_str().unwrap_or("")) } td { (n["event_id"].as_str().unwrap_or("")) } } }
            }
        }
    })
}

pub async fn ledger_csv(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path((kind, id)): Path<(String, String)>,
    Query(q): Query<AccountQuery>,
) -> Response {
    let s = match signed(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let r = async {
        let a = readable(&st, &s, &kind, &id)?;
        let p = period(&q)?;
        csv_response(&st, &s.caller.token_id, &a, p).await
    }
    .await;
    r.unwrap_or_else(|e| error_page(Some(&s), e))
}
