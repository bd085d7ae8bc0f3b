//! The finance console in a real browser (headless Chromium through
//! chromedriver) against a real `serve`, Postgres and broker: sign in, the
//! overview's chart and top accounts equal `GET /v1/reports/spend` for the
//! same period, an account's balance and statement equal the API's, its
//! CSV download is the API's CSV, an admin re-drives a rejected event, and
//! a scoped token is refused another reseller's account. Screenshots of
//! each page land in `target/test-logs/console/`. Session rules (cookie
//! flags, CSRF, revocation) are checked over plain HTTP.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::common::{Service, TestCtx};
use crate::reports::usage_at;
use crate::webdriver::Browser;
use crate::world::{d, register_world};

const PERIOD: &str = "from=2026-11-01T00:00:00Z&to=2026-11-03T00:00:00Z";

fn shots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-logs/console")
}

async fn api(svc: &Service, path: &str) -> Value {
    let (s, v) = svc.get_json(path).await;
    assert_eq!(s, 200, "{path}: {v}");
    v
}

fn sum(values: &Value) -> Decimal {
    values
        .as_array()
        .unwrap()
        .iter()
        .map(|v| d(v.as_str().unwrap()))
        .sum()
}

async fn seed(ctx: &TestCtx) {
    register_world(ctx).await;
    let list = [
        ("cu-0", "2026-11-01T09:30:00Z", "gpt-4o", Some("r_1"), 1200),
        ("cu-1", "2026-11-01T11:00:00Z", "tiny", Some("r_1"), 50_000),
        ("cu-2", "2026-11-02T08:00:00Z", "gpt-4o", Some("r_2"), 800),
        ("cu-3", "2026-11-02T09:00:00Z", "gpt-4o", Some("r_1"), 300),
    ];
    for (id, at, model, reseller, tokens) in list {
        ctx.produce(
            &ctx.topics.usage,
            "k",
            &usage_at(id, at, model, "success", reseller, tokens),
        )
        .await;
    }
    ctx.produce_raw(&ctx.topics.usage, Some("k"), b"not json at all")
        .await;
    ctx.wait_consumed(&ctx.topics.usage, 5, Duration::from_secs(60))
        .await;
}

async fn sign_in(b: &Browser, svc: &Service, token: &str) {
    b.goto(&svc.url("/console/")).await;
    assert!(
        b.url().await.ends_with("/console/sign-in"),
        "{}",
        b.url().await
    );
    b.type_into("#token", token).await;
    b.click("button[type=submit]").await;
    b.find("#spend-chart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_what_the_api_answers() {
    let ctx = TestCtx::new("console").await;
    let mut svc = ctx.serve();
    svc.ready().await;
    seed(&ctx).await;
    let admin = ctx.token("admin", None);
    let b = Browser::start().await;
    sign_in(&b, &svc, &admin).await;

    // Overview: the chart's figures and the top accounts are the report's.
    b.goto(&svc.url("/console/?from=2026-11-01&to=2026-11-03&bucket=day&by=model"))
        .await;
    b.find("#spend-chart").await;
    let report = api(
        &svc,
        &format!("/v1/reports/spend?{PERIOD}&bucket=day&by=model"),
    )
    .await;
    let total = d(report["totals"]["charge"].as_str().unwrap());
    assert!(total > Decimal::ZERO);
    let drawn = b
        .script(
            "const c = Chart.getChart('spend-chart'); return c.data.datasets.map(d => d.units);",
        )
        .await;
    let charted: Decimal = drawn.as_array().unwrap().iter().map(sum).sum();
    assert_eq!(charted, total, "the chart draws {drawn}");
    let labels = b
        .script("return Chart.getChart('spend-chart').data.labels;")
        .await;
    assert_eq!(
        labels,
        json!(["2026-11-01T00:00:00+00:00", "2026-11-02T00:00:00+00:00"])
    );
    assert_eq!(
        b.attr("#spend-total", "data-units").await.map(|s| d(&s)),
        Some(total)
    );
    let users = api(
        &svc,
        &format!("/v1/reports/spend?{PERIOD}&bucket=month&by=user"),
    )
    .await;
    let top = b.script("return [...document.querySelectorAll('#top-accounts tbody tr')].map(r => [r.dataset.id, r.dataset.units]);").await;
    let mut want: Vec<(String, Decimal)> = users["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["user"].as_str().unwrap().to_string(),
                d(r["charge"].as_str().unwrap()),
            )
        })
        .collect();
    want.sort_by_key(|w| std::cmp::Reverse(w.1));
    let got: Vec<(String, Decimal)> = top
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_string(),
                d(r[1].as_str().unwrap()),
            )
        })
        .collect();
    assert_eq!(got, want);
    assert!(b.text("#quarantine-counts").await.contains("invalid_json"));
    b.screenshot(&shots().join("overview.png")).await;

    // The account page: balance and statement as the API gives them.
    b.click("#top-accounts a[href='/console/accounts/user/u_1']")
        .await;
    b.find("#balance-balance").await;
    let bal = api(&svc, "/v1/balances/user/u_1").await;
    assert_eq!(
        b.attr("#balance-balance", "data-units").await,
        bal["balance"].as_str().map(String::from)
    );
    assert_eq!(
        b.attr("#balance-available", "data-units").await,
        bal["available"].as_str().map(String::from)
    );
    let ledger = api(&svc, "/v1/ledger/user/u_1").await;
    let closing = b.script("return [...document.querySelectorAll('#statement tr')].find(r => r.textContent.includes('Closing')).querySelector('td').dataset.units;").await;
    assert_eq!(closing, ledger["summary"]["closing_balance"]);
    assert_eq!(b.text("#ties-out").await, "yes");
    let rows = b
        .script("return document.querySelectorAll('#ledger tbody tr').length;")
        .await;
    assert_eq!(
        rows.as_u64(),
        Some(ledger["entries"].as_array().unwrap().len() as u64)
    );
    b.screenshot(&shots().join("account.png")).await;
    // Its CSV, downloaded with the session, is the API's CSV.
    let csv = b.script_async("const done = arguments[0]; fetch(document.getElementById('csv-link').href).then(r => r.text()).then(done);").await;
    let api_csv = svc
        .http()
        .get(svc.url("/v1/ledger/user/u_1?format=csv"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(csv.as_str(), Some(api_csv.as_str()));

    // Quarantine: the admin re-drives the rejected event.
    b.goto(&svc.url("/console/quarantine?state=rejected")).await;
    let id = b
        .attr("#quarantine tbody tr[data-state=rejected]", "data-id")
        .await
        .expect("a rejected event");
    let qid: i64 = id.parse().unwrap();
    let before: chrono::DateTime<chrono::Utc> = ctx
        .sql_one(
            "SELECT coalesce(resolved_at, 'epoch') FROM quarantine WHERE quarantine_id = $1",
            &[&qid],
        )
        .await;
    b.screenshot(&shots().join("quarantine.png")).await;
    b.click(&format!("#quarantine tr[data-id='{id}'] button"))
        .await;
    assert!(b.text("#redriven").await.contains(&id));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ctx.sql_one::<bool>("SELECT status = 'rejected' AND coalesce(resolved_at > $2, false) FROM quarantine WHERE quarantine_id = $1", &[&qid, &before]).await {
        assert!(Instant::now() < deadline, "the re-driven event was not retried");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A token scoped to another reseller is refused u_1's account.
    b.click("form[action='/console/sign-out'] button").await;
    b.find("#token").await;
    let scoped = ctx.token("finance", Some("r_2"));
    sign_in(&b, &svc, &scoped).await;
    b.goto(&svc.url("/console/accounts/user/u_1")).await;
    assert!(b.text("main").await.contains("This token may not do that."));
    b.screenshot(&shots().join("scoped-refused.png")).await;
    b.quit().await;
    sessions_over_http(&ctx, &svc, &admin).await;
    svc.terminate();
}

/// Cookie flags, CSRF on every form, gateway tokens refused, and a revoked
/// token's session ended.
async fn sessions_over_http(ctx: &TestCtx, svc: &Service, admin: &str) {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = http.get(svc.url("/console/sign-in")).send().await.unwrap();
    let pre = page
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let pre_value = pre.split(';').next().unwrap().to_string();
    let csrf = pre_value.split('=').nth(1).unwrap().to_string();
    let post = |cookie: String, form: Vec<(&'static str, String)>| {
        let http = http.clone();
        async move {
            http.post(svc.url("/console/sign-in"))
                .header("cookie", cookie)
                .form(&form)
                .send()
                .await
                .unwrap()
        }
    };
    // No double-submitted token: refused.
    let r = post(
        String::new(),
        vec![("token", admin.to_string()), ("csrf", csrf.clone())],
    )
    .await;
    assert_eq!(r.status(), 403);
    let gateway = ctx.token("gateway", None);
    let r = post(
        pre_value.clone(),
        vec![("token", gateway), ("csrf", csrf.clone())],
    )
    .await;
    assert_eq!(r.status(), 403);
    let r = post(
        pre_value.clone(),
        vec![("token", admin.to_string()), ("csrf", csrf.clone())],
    )
    .await;
    assert_eq!(r.status(), 303);
    let set: Vec<String> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    let session = set
        .iter()
        .find(|c| c.starts_with("qe_console="))
        .expect("a session cookie");
    assert!(
        session.contains("HttpOnly") && session.contains("SameSite=Strict"),
        "{session}"
    );
    let cookie = session.split(';').next().unwrap().to_string();
    let overview = http
        .get(svc.url("/console/"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(overview.status(), 200);
    // Sign-out without the session's CSRF token: refused.
    let r = http
        .post(svc.url("/console/sign-out"))
        .header("cookie", &cookie)
        .form(&[("csrf", "forged")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Revoking the token ends the session at once.
    let (code, _, err) = ctx.cli(&["token", "revoke", &token_id(ctx, admin).await], &[]);
    assert_eq!(code, 0, "{err}");
    let r = http
        .get(svc.url("/console/"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(
        r.headers().get("location").unwrap(),
        "/console/sign-in?ended=1"
    );
}

async fn token_id(ctx: &TestCtx, token: &str) -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(token.as_bytes()).to_vec();
    ctx.sql_one(
        "SELECT token_id FROM access_tokens WHERE token_hash = $1",
        &[&hash],
    )
    .await
}
