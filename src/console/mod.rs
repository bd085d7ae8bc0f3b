//! The finance console (contract, "Spend reports and the finance console"):
//! HTML pages served by `serve` at `/console/`, rendered on the server with
//! `maud` (escaping by construction), a stylesheet, one small script and
//! Chart.js, vendored from npm (`scripts/vendor-chartjs.sh`) and compiled
//! into the binary. Nothing is fetched from the internet.
//!
//! Sign-in: a `finance` or `admin` token pasted once; the service answers
//! with an `HttpOnly`, `SameSite=Strict` session cookie tied to that token
//! (`store::console`). Every page asks the same questions the API answers,
//! through the same functions and the same authorization (a scoped token
//! sees its tree), so every figure equals the API's. Forms that change
//! something carry the session's CSRF token; the sign-in form a
//! double-submitted one.

mod pages;
mod quarantine;

use axum::extract::{Form, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::{html, Markup, PreEscaped, DOCTYPE};
use rust_decimal::Decimal;
use serde::Deserialize;

use crate::api::auth::{token_hash, Caller, Role};
use crate::api::{ApiError, AppState};
use crate::store::console as sessions;

const COOKIE: &str = "qe_console";
const SIGNIN_CSRF: &str = "qe_signin";

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(pages::overview))
        .route("/console/sign-in", get(sign_in_page).post(sign_in))
        .route("/console/sign-out", post(sign_out))
        .route("/console/accounts", get(pages::find_account))
        .route("/console/accounts/{kind}/{id}", get(pages::account))
        .route(
            "/console/accounts/{kind}/{id}/ledger.csv",
            get(pages::ledger_csv),
        )
        .route("/console/quarantine", get(quarantine::page))
        .route(
            "/console/quarantine/{id}/redrive",
            post(quarantine::redrive),
        )
        .route("/console/assets/{name}", get(asset))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

async fn asset(Path(name): Path<String>) -> Response {
    let (body, ty): (&'static [u8], &str) = match name.as_str() {
        "console.css" => (
            include_bytes!("assets/console.css"),
            "text/css; charset=utf-8",
        ),
        "console.js" => (
            include_bytes!("assets/console.js"),
            "text/javascript; charset=utf-8",
        ),
        "chart.umd.min.js" => (
            include_bytes!("assets/chart.umd.min.js"),
            "text/javascript; charset=utf-8",
        ),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, ty),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// A signed-in person: the token's caller (role and scope) and the
/// session's CSRF token.
pub struct Signed {
    pub caller: Caller,
    pub csrf: String,
}

impl Signed {
    fn scope(&self) -> Option<&str> {
        self.caller.reseller_id.as_deref()
    }
}

/// The session a request carries, or the answer to give instead (to the
/// sign-in page when there is none).
async fn signed(st: &AppState, headers: &HeaderMap) -> Result<Signed, Response> {
    let Some(value) = cookie(headers, COOKIE) else {
        return Err(Redirect::to("/console/sign-in").into_response());
    };
    let hash = token_hash(&value);
    match sessions::session(&st.pool, &hash).await {
        Ok(Some(s)) => {
            let role = match s.role.as_str() {
                "admin" => Role::Admin,
                "finance" => Role::Finance,
                _ => return Err(Redirect::to("/console/sign-in").into_response()),
            };
            Ok(Signed {
                caller: Caller {
                    token_id: s.token_id,
                    role,
                    reseller_id: s.reseller_id,
                },
                csrf: s.csrf,
            })
        }
        Ok(None) => Err(Redirect::to("/console/sign-in?ended=1").into_response()),
        Err(e) => Err(error_page(None, ApiError::internal(e))),
    }
}

/// The value of one cookie.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

fn random_hex() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the system's random source");
    hex::encode(b)
}

/// Whether a form's CSRF token is the expected one (compared in constant
/// time).
fn csrf_ok(expected: &str, got: &str) -> bool {
    use sha2::Digest;
    let (a, b) = (sha2::Sha256::digest(expected), sha2::Sha256::digest(got));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
        && !expected.is_empty()
}

#[derive(Deserialize, Default)]
struct SignInQuery {
    ended: Option<String>,
}

async fn sign_in_page(q: axum::extract::Query<SignInQuery>) -> Response {
    let csrf = random_hex();
    let note = q.ended.is_some().then_some("Your session ended (signed out, idle for 12 hours, or its token was revoked). Sign in again.");
    sign_in_form(&csrf, note.map(String::from), StatusCode::OK)
}

fn sign_in_form(csrf: &str, message: Option<String>, status: StatusCode) -> Response {
    let body = layout(
        "Sign in",
        None,
        html! {
            h1 { "Sign in to the finance console" }
            @if let Some(m) = &message { p.error role="alert" { (m) } }
            form method="post" action="/console/sign-in" {
                input type="hidden" name="csrf" value=(csrf);
                p {
                    label for="token" { "Access token (role finance or admin)" } br;
                    input #token type="password" name="token" autocomplete="off" required size="70" autofocus;
                }
                button type="submit" { "Sign in" }
            }
            p.muted { "The token is sent once; the console keeps a session cookie tied to it, never the token itself." }
        },
    );
    let cookie = format!("{SIGNIN_CSRF}={csrf}; Path=/console; HttpOnly; SameSite=Strict");
    (status, [(header::SET_COOKIE, cookie)], body).into_response()
}

#[derive(Deserialize)]
struct SignInForm {
    token: String,
    csrf: String,
}

async fn sign_in(
    State(st): State<AppState>,
    headers: HeaderMap,
    Form(f): Form<SignInForm>,
) -> Response {
    let fresh = random_hex();
    let expected = cookie(&headers, SIGNIN_CSRF).unwrap_or_default();
    if !csrf_ok(&expected, &f.csrf) {
        return sign_in_form(
            &fresh,
            Some("The form expired; please sign in again.".into()),
            StatusCode::FORBIDDEN,
        );
    }
    let token = f.token.trim();
    let caller = if token.is_empty() || token.len() > 256 {
        None
    } else {
        match st.tokens.lookup(&st.pool, token).await {
            Ok(c) => c,
            Err(e) => return error_page(None, ApiError::internal(e)),
        }
    };
    let Some(caller) = caller else {
        return sign_in_form(
            &fresh,
            Some("Missing or invalid access token.".into()),
            StatusCode::UNAUTHORIZED,
        );
    };
    if caller.role < Role::Finance {
        return sign_in_form(
            &fresh,
            Some("This token may not do that: the console needs a finance or admin token.".into()),
            StatusCode::FORBIDDEN,
        );
    }
    let session = random_hex();
    if let Err(e) = sessions::create_session(
        &st.pool,
        &token_hash(&session),
        &caller.token_id,
        &random_hex(),
    )
    .await
    {
        return error_page(None, ApiError::internal(e));
    }
    let set = format!("{COOKIE}={session}; Path=/console; HttpOnly; SameSite=Strict");
    let clear = format!("{SIGNIN_CSRF}=; Path=/console; Max-Age=0; HttpOnly; SameSite=Strict");
    let mut resp = Redirect::to("/console/").into_response();
    resp.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_str(&set).expect("hex"),
    );
    resp.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_str(&clear).expect("ascii"),
    );
    resp
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

/// The session of a form's request, when the form carries its CSRF token.
async fn signed_form(st: &AppState, headers: &HeaderMap, csrf: &str) -> Result<Signed, Response> {
    let s = signed(st, headers).await?;
    if !csrf_ok(&s.csrf, csrf) {
        return Err(error_page(Some(&s), forbidden_form()));
    }
    Ok(s)
}

async fn sign_out(
    State(st): State<AppState>,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    let s = match signed_form(&st, &headers, &f.csrf).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Some(v) = cookie(&headers, COOKIE) {
        if let Err(e) = sessions::end_session(&st.pool, &token_hash(&v)).await {
            return error_page(Some(&s), ApiError::internal(e));
        }
    }
    let clear = format!("{COOKIE}=; Path=/console; Max-Age=0; HttpOnly; SameSite=Strict");
    let mut resp = Redirect::to("/console/sign-in").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&clear).expect("ascii"),
    );
    resp
}

fn forbidden_form() -> ApiError {
    let mut e = crate::api::auth::access_denied();
    e.detail = Some("the form's CSRF token does not match this session".into());
    e
}

/// Every page's frame: navigation, the account finder, sign-out.
fn layout(title: &str, s: Option<&Signed>, content: Markup) -> axum::response::Html<String> {
    axum::response::Html(html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · quota-engine finance" }
                link rel="stylesheet" href="/console/assets/console.css";
            }
            body {
                header {
                    span.brand { "quota-engine finance" }
                    @if let Some(s) = s {
                        nav aria-label="Pages" {
                            a href="/console/" { "Overview" }
                            a href="/console/quarantine" { "Quarantine" }
                        }
                        form method="get" action="/console/accounts" role="search" {
                            label for="find-kind" { "Account" }
                            select #find-kind name="kind" {
                                @for k in ["user", "reseller", "app", "key", "group"] { option value=(k) { (k) } }
                            }
                            label for="find-id" class="muted" { "id" }
                            input #find-id name="id" required size="16";
                            button type="submit" { "Open" }
                        }
                        span.muted {
                            (s.caller.role.as_str())
                            @if let Some(r) = s.scope() { " · reseller " (r) }
                        }
                        form method="post" action="/console/sign-out" {
                            input type="hidden" name="csrf" value=(s.csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { (content) }
            }
        }
    }.into_string())
}

/// An error as a page, with the API's status and message.
fn error_page(s: Option<&Signed>, e: ApiError) -> Response {
    if e.status.is_server_error() {
        // Logged by the API error's own response; the page says no more.
        let _ = e.detail.as_ref().map(|d| tracing::error!("console: {d}"));
    }
    let status = e.status;
    let detail = (!status.is_server_error())
        .then_some(e.detail.clone())
        .flatten();
    let body = layout(
        "Error",
        s,
        html! {
            h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
            p.error role="alert" { (e.message) @if let Some(d) = detail { " (" (d) ")" } }
        },
    );
    (status, body).into_response()
}

/// Units as dollars (one unit is $0.000001), rounded to cents (to the
/// unit below a cent), with the exact figure in units one click away.
fn money(units: Decimal) -> Markup {
    let exact = units / Decimal::from(1_000_000);
    let dollars = if exact.abs() < Decimal::new(1, 2) {
        exact.round_dp(6).normalize()
    } else {
        exact.round_dp(2)
    };
    html! {
        details.exact {
            summary { (format_dollars(dollars)) }
            span.units { (thousands(&units.normalize().to_string())) " units" }
        }
    }
}

fn format_dollars(d: Decimal) -> String {
    let s = if d.scale() > 2 {
        d.abs().to_string()
    } else {
        format!("{:.2}", d.abs())
    };
    let sign = if d.is_sign_negative() && !d.is_zero() {
        "−"
    } else {
        ""
    };
    format!("{sign}${}", thousands(&s))
}

/// Thousands separators in the integer part of a decimal string.
fn thousands(s: &str) -> String {
    let (sign, rest) = s.strip_prefix('-').map(|r| ("−", r)).unwrap_or(("", s));
    let (int, frac) = rest
        .split_once('.')
        .map(|(i, f)| (i, Some(f)))
        .unwrap_or((rest, None));
    let mut out = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{out}.{f}"),
        None => format!("{sign}{out}"),
    }
}

/// JSON for a `<script type="application/json">` block: nothing in it can
/// close the element.
fn script_json(v: &serde_json::Value) -> PreEscaped<String> {
    PreEscaped(
        v.to_string()
            .replace('<', "\\u003c")
            .replace('>', "\\u003e")
            .replace('&', "\\u0026"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_formatted_for_people() {
        assert_eq!(thousands("1234567.891"), "1,234,567.891");
        assert_eq!(thousands("-999"), "−999");
        assert_eq!(thousands("100"), "100");
        assert_eq!(
            format_dollars("1234567.5".parse().unwrap()),
            "$1,234,567.50"
        );
        assert_eq!(format_dollars("-0.25".parse().unwrap()), "−$0.25");
        assert!(money("2840".parse().unwrap())
            .into_string()
            .contains("$0.00284"));
        let m = money("1234567890".parse().unwrap()).into_string();
        assert!(
            m.contains("$1,234.57") && m.contains("1,234,567,890 units"),
            "{m}"
        );
        assert_eq!(
            script_json(&serde_json::json!({"a": "</script>"})).0,
            "{\"a\":\"\\u003c/script\\u003e\"}"
        );
        assert!(csrf_ok("abc", "abc") && !csrf_ok("abc", "abd") && !csrf_ok("", ""));
    }
}
