//! Access control (the contract's "Running it"): bearer tokens stored as
//! SHA-256 hashes, roles `gateway` < `finance` < `admin`, and reseller
//! scope. Every route but `/healthz` and `/readyz` goes through
//! [`require_token`].

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use sha2::{Digest, Sha256};

use super::{ApiError, AppState};
use crate::admission::View;
use crate::event::{AccountKind, Entity};
use crate::store::access;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Role {
    Gateway,
    Finance,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Finance => "finance",
            Role::Admin => "admin",
        }
    }
    fn parse(s: &str) -> Option<Role> {
        match s {
            "gateway" => Some(Role::Gateway),
            "finance" => Some(Role::Finance),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Who is asking: put in the request's extensions by [`require_token`].
#[derive(Clone, Debug, PartialEq)]
pub struct Caller {
    pub token_id: String,
    pub role: Role,
    /// A token scoped to one reseller sees only it, its users and their
    /// apps and keys.
    pub reseller_id: Option<String>,
}

/// Every live token, by hash, loaded whole from `access_tokens` (a small
/// table): a known token costs no database round trip, nor does an unknown
/// one. The table is loaded again when it is older than `TOKEN_TTL` (so a
/// revoked token stops working within it) or when a token is not in it
/// (a new one), at most once per `TOKEN_RELOAD_MIN` and by one request at a
/// time: a flood of unknown tokens makes at most one query per
/// `TOKEN_RELOAD_MIN`, and expiry causes no stampede.
#[derive(Clone, Default)]
pub struct TokenCache {
    inner: Arc<TokenTable>,
}

#[derive(Default)]
struct TokenTable {
    tokens: RwLock<HashMap<[u8; 32], Caller>>,
    /// When the table was last loaded; the lock makes loads single-flight.
    loaded: tokio::sync::Mutex<Option<Instant>>,
    /// `loaded`, readable without the lock: ms since `epoch`.
    loaded_ms: std::sync::atomic::AtomicU64,
    /// Loads so far: a request that finds a load finished after it arrived
    /// answers from that load instead of loading again.
    loads: std::sync::atomic::AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl TokenTable {
    fn epoch(&self) -> Instant {
        *self.epoch.get_or_init(Instant::now)
    }

    fn fresh(&self, within: Duration) -> bool {
        let ms = self.loaded_ms.load(std::sync::atomic::Ordering::Acquire);
        ms > 0 && self.epoch().elapsed().as_millis() as u64 <= ms + within.as_millis() as u64
    }

    fn get(&self, h: &[u8; 32]) -> Option<Caller> {
        self.tokens.read().ok().and_then(|m| m.get(h).cloned())
    }

    async fn load(&self, pool: &Pool) -> anyhow::Result<()> {
        let rows = access::live_tokens(pool).await?;
        let mut m = HashMap::with_capacity(rows.len());
        for r in rows {
            let (Ok(h), Some(role)) = (
                <[u8; 32]>::try_from(r.hash.as_slice()),
                Role::parse(&r.role),
            ) else {
                continue;
            };
            m.insert(
                h,
                Caller {
                    token_id: r.token_id,
                    role,
                    reseller_id: r.reseller_id,
                },
            );
        }
        if let Ok(mut t) = self.tokens.write() {
            *t = m;
        }
        Ok(())
    }
}

impl TokenCache {
    pub(crate) async fn lookup(&self, pool: &Pool, token: &str) -> anyhow::Result<Option<Caller>> {
        use crate::limits::{TOKEN_RELOAD_MIN, TOKEN_TTL};
        let t = &self.inner;
        let h = token_hash(token);
        let known = t.get(&h);
        if t.fresh(TOKEN_TTL) && known.is_some() {
            return Ok(known);
        }
        let arrived = t.loads.load(std::sync::atomic::Ordering::Acquire);
        let mut loaded = t.loaded.lock().await;
        // A load that finished after this request arrived saw every token
        // made before it: answer from it (a flood of unknown tokens costs
        // one load, not one each).
        if t.loads.load(std::sync::atomic::Ordering::Acquire) != arrived {
            return Ok(t.get(&h));
        }
        if let Some(at) = *loaded {
            let since = at.elapsed();
            if since < TOKEN_RELOAD_MIN {
                tokio::time::sleep(TOKEN_RELOAD_MIN - since).await;
            }
        }
        let result = t.load(pool).await;
        if result.is_ok() || loaded.is_some() {
            // Loaded; or Postgres is down and the table as it was stands
            // for another `TOKEN_TTL`: the tokens known before keep
            // working (admission goes on answering from the in-memory
            // view), and the requests queued behind this one do not each
            // wait for the database in turn.
            let now = Instant::now();
            *loaded = Some(now);
            t.loads.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            t.loaded_ms.store(
                now.duration_since(t.epoch()).as_millis().max(1) as u64,
                std::sync::atomic::Ordering::Release,
            );
        }
        match result {
            Ok(()) => Ok(t.get(&h)),
            Err(e) if loaded.is_none() => Err(e),
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "cannot reload the token table; using the one loaded before"
                );
                Ok(t.get(&h))
            }
        }
    }
}

/// Make a token: 32 random bytes, hex, prefixed `qet_`. Only its hash is
/// stored; the token itself is returned once.
pub async fn create_token(
    pool: &Pool,
    role: Role,
    reseller_id: Option<&str>,
    name: Option<&str>,
) -> anyhow::Result<(String, String)> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let token = format!("qet_{}", hex::encode(bytes));
    let token_id = format!(
        "tok_{}",
        &hex::encode(Sha256::digest(token.as_bytes()))[..12]
    );
    access::insert_token(
        pool,
        &token_id,
        token_hash(&token).as_slice(),
        role.as_str(),
        reseller_id,
        name,
    )
    .await?;
    Ok((token_id, token))
}

pub async fn revoke_token(pool: &Pool, token_id: &str) -> anyhow::Result<bool> {
    access::revoke_token(pool, token_id).await
}

pub fn invalid_token() -> ApiError {
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        code: "invalid_access_token".into(),
        message: "Missing or invalid access token.".into(),
        error_type: "fastapi_request_error",
        param: None,
        detail: None,
    }
}

pub fn access_denied() -> ApiError {
    ApiError {
        status: StatusCode::FORBIDDEN,
        code: "access_denied".into(),
        message: "This token may not do that.".into(),
        error_type: "fastapi_request_error",
        param: None,
        detail: None,
    }
}

/// What a role may call. `admin` may do everything; `finance` may read
/// everything; `gateway` may ask for admission, read and release holds and
/// read balances.
fn role_allows(role: Role, method: &Method, path: &str) -> bool {
    match role {
        Role::Admin => true,
        Role::Finance => method == Method::GET,
        Role::Gateway => matches!(
            (method.as_str(), path),
            ("POST", "/v1/admission")
                | ("GET", "/v1/holds/{id}")
                | ("DELETE", "/v1/holds/{id}")
                | ("GET", "/v1/balances/{kind}/{id}")
                | ("GET", "/metrics")
                | ("GET", "/openapi.json")
        ),
    }
}

/// Routes a reseller-scoped token may use at all (the account routes check
/// the account; writes check their target).
fn scope_allows(path: &str) -> bool {
    path.starts_with("/v1/entities/")
        || matches!(
            path,
            "/v1/admission"
                | "/v1/holds/{id}"
                | "/v1/balances/{kind}/{id}"
                | "/v1/ledger/{kind}/{id}"
                | "/v1/notifications"
                | "/v1/reports/spend"
                | "/v1/quarantine"
                | "/v1/quarantine/{id}/redrive"
                | "/openapi.json"
                | "/v1/grants"
                | "/v1/adjustments"
                | "/v1/reversals"
                | "/v1/voids"
        )
}

/// The middleware: a valid bearer token with the role for the route, and
/// for a scoped token an account within its reseller.
pub async fn require_token(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty() && t.len() <= 256);
    let Some(token) = token else {
        return invalid_token().into_response();
    };
    let caller = match st.tokens.lookup(&st.pool, token).await {
        Ok(Some(c)) => c,
        Ok(None) => return invalid_token().into_response(),
        Err(e) => return ApiError::internal(e).into_response(),
    };
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    if !role_allows(caller.role, req.method(), &path) {
        return access_denied().into_response();
    }
    if let Some(r) = &caller.reseller_id {
        if !scope_allows(&path) {
            return access_denied().into_response();
        }
        // Account routes: the account must be in the reseller's tree.
        if path.starts_with("/v1/balances/") || path.starts_with("/v1/ledger/") {
            // The router's own percent-decoding, as the handler sees it.
            let params = axum::RequestExt::extract_parts::<
                axum::extract::Path<HashMap<String, String>>,
            >(&mut req)
            .await;
            let Ok(axum::extract::Path(params)) = params else {
                return access_denied().into_response();
            };
            let kind = params.get("kind").map(String::as_str).unwrap_or("");
            let id = params.get("id").cloned().unwrap_or_default();
            let ok = AccountKind::parse(kind).is_some_and(|k| in_tree(&st, r, k, &id));
            if !ok {
                return access_denied().into_response();
            }
        }
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// The reseller an account belongs to, as registered at `now`: a reseller
/// itself, a user's reseller, an app's user's, a key's app's user's. Groups
/// belong to no reseller.
pub fn reseller_of(v: &View, kind: AccountKind, id: &str, now: DateTime<Utc>) -> Option<String> {
    match kind {
        AccountKind::Reseller => v
            .resellers
            .get(id)
            .and_then(|r| r.at(now))
            .map(|_| id.to_string()),
        AccountKind::User => match v.users.get(id).and_then(|r| r.at(now)) {
            Some(Entity::User { reseller_id, .. }) => reseller_id.clone(),
            _ => None,
        },
        AccountKind::App => match v.apps.get(id).and_then(|r| r.at(now)) {
            Some(Entity::App { user_id, .. }) => reseller_of(v, AccountKind::User, user_id, now),
            _ => None,
        },
        AccountKind::Key => match v.keys.get(id).and_then(|r| r.at(now)) {
            Some(Entity::Key { app_id, .. }) => reseller_of(v, AccountKind::App, app_id, now),
            _ => None,
        },
        AccountKind::Group => None,
    }
}

/// Whether an account is in a reseller's tree as registered now (the
/// check every scoped read of an account makes).
pub fn in_tree(st: &AppState, reseller: &str, kind: AccountKind, id: &str) -> bool {
    let now = (st.clock)();
    st.view
        .read()
        .map(|v| reseller_of(&v, kind, id, now).as_deref() == Some(reseller))
        .unwrap_or(false)
}
