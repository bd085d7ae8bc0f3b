//! The quarantine page: waiting and rejected events with their reason and
//! detail, read through `api::quarantine::read` (a scoped token sees the
//! events naming its tree); an admin re-drives a rejected one through
//! `api::quarantine::redrive_one`, with the session's CSRF token.

use axum::extract::{Form, Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use serde::Deserialize;

use super::{error_page, layout, signed, signed_form, CsrfForm};
use crate::api::auth::{access_denied, Role};
use crate::api::quarantine::{read, redrive_one, QuarantineQuery, REASONS};
use crate::api::AppState;

#[derive(Deserialize, Default)]
pub struct PageQuery {
    state: Option<String>,
    reason: Option<String>,
    before: Option<String>,
    redriven: Option<String>,
}

pub async fn page(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<PageQuery>,
) -> Response {
    let s = match signed(&st, &headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let nonempty = |v: &Option<String>| v.clone().filter(|x| !x.is_empty());
    let query = QuarantineQuery {
        state: nonempty(&q.state),
        reason: nonempty(&q.reason),
        before: nonempty(&q.before),
        limit: Some("100".into()),
    };
    let (rows, next) = match read(&st, &query, s.caller.reseller_id.as_deref()).await {
        Ok(r) => r,
        Err(e) => return error_page(Some(&s), e),
    };
    let admin = s.caller.role == Role::Admin;
    let state = query.state.clone().unwrap_or_default();
    let reason = query.reason.clone().unwrap_or_default();
    let body = html! {
        h1 { "Quarantine" }
        @if let Some(id) = &q.redriven { p #redriven role="status" { "Event " (id) " is waiting again; the sweeper retries it at once." } }
        form.filters method="get" action="/console/quarantine" aria-label="Filter" {
            label { "State" select name="state" {
                option value="" selected[state.is_empty()] { "waiting and rejected" }
                @for st_ in ["waiting", "rejected"] { option value=(st_) selected[st_ == state] { (st_) } }
            } }
            label { "Reason" select name="reason" {
                option value="" selected[reason.is_empty()] { "any" }
                @for r in REASONS { option value=(r) selected[r == reason] { (r) } }
            } }
            button type="submit" { "Show" }
        }
        table #quarantine {
            thead { tr {
                th.num scope="col" { "id" } th scope="col" { "state" } th scope="col" { "reason" } th scope="col" { "detail" }
                th scope="col" { "source" } th scope="col" { "received" } th scope="col" { "event" }
                @if admin { th scope="col" { "action" } }
            } }
            tbody {
                @if rows.is_empty() { tr { td.muted colspan="8" { "none" } } }
                @for r in &rows {
                    tr data-id=(r.quarantine_id) data-state=(r.status) {
                        td.num { (r.quarantine_id) } td { (r.status) } td { (r.reason) } td { (r.detail) }
                        td { (r.topic) "/" (r.partition) "@" (r.offset) } td { (r.received_at.to_rfc3339()) }
                        td { details { summary { (r.event_id.clone().unwrap_or_else(|| "(no id)".into())) }
                            pre { (r.payload.clone().unwrap_or_default()) @if r.payload_truncated { "…" } } } }
                        @if admin { td { @if r.status == "rejected" {
                            form method="post" action=(format!("/console/quarantine/{}/redrive", r.quarantine_id)) {
                                input type="hidden" name="csrf" value=(s.csrf);
                                button type="submit" aria-label=(format!("Re-drive event {}", r.quarantine_id)) { "Re-drive" }
                            }
                        } } }
                    }
                }
            }
        }
        @if let Some(n) = next {
            p { a href=(format!("/console/quarantine?state={state}&reason={reason}&before={n}")) { "Older" } }
        }
    };
    layout("Quarantine", Some(&s), body).into_response()
}

pub async fn redrive(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Form(f): Form<CsrfForm>,
) -> Response {
    let s = match signed_form(&st, &headers, &f.csrf).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if s.caller.role != Role::Admin {
        return error_page(Some(&s), access_denied());
    }
    match redrive_one(&st, id, s.caller.reseller_id.as_deref()).await {
        Ok(()) => Redirect::to(&format!("/console/quarantine?redriven={id}")).into_response(),
        Err(e) => error_page(Some(&s), e),
    }
}
