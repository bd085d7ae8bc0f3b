//! Step 4 of a batch: load what the fold needs and lock the accounts it
//! will move. Which of the batch's ids were applied or are waiting, the
//! idempotency keys it reuses, the registry versions of the entities it
//! reads (through a cache of decoded versions), the postings its reversals
//! name, the grants its voids name, and the accounts with their relevant
//! credit blocks, locked `FOR UPDATE` in (kind, id) order.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use rust_decimal::Decimal;

use super::error::ApplyError;
use super::sink::Windows;
use crate::event::{self, AccountKind, AccountRef, EntityKind, EventBody, GrantCategory};
use crate::ledger::fold::{AccountState, Block, FoldState, Input, Posting};
use crate::ledger::registry::Version;

/// Registry versions are immutable once written (a change is a new
/// version), so a version decoded once can be reused by `version_seq`:
/// a batch still reads which versions its entities have, but fetches and
/// decodes only the ones it has not seen. Reading every version's payload
/// was the costliest query of a small batch (16 µs per usage event at
/// 5,000 events/s, BENCHMARKS.md). Cleared when it reaches
/// `limits::REGISTRY_CACHE_MAX` versions.
#[derive(Clone, Default)]
pub struct RegistryCache(Arc<std::sync::Mutex<HashMap<i64, Arc<event::Entity>>>>);

impl RegistryCache {
    fn get(&self, seq: i64) -> Option<Arc<event::Entity>> {
        self.0.lock().ok()?.get(&seq).cloned()
    }

    fn put(&self, seq: i64, entity: Arc<event::Entity>) {
        if let Ok(mut m) = self.0.lock() {
            if m.len() >= crate::limits::REGISTRY_CACHE_MAX {
                m.clear();
            }
            m.insert(seq, entity);
        }
    }
}

/// What a batch's events read besides their own ids.
#[derive(Default)]
struct Reads {
    /// Registry entities (kind, id) whose versions price or limit usage.
    entities: BTreeSet<(String, String)>,
    /// Accounts the batch may move.
    accounts: BTreeSet<AccountRef>,
    /// Usage events named by reversals.
    reversal_targets: Vec<String>,
    /// Grants named by voids.
    void_targets: Vec<String>,
}

impl Reads {
    fn of(events: &[&event::Event]) -> Reads {
        let mut r = Reads::default();
        for e in events {
            match &e.body {
                EventBody::Usage(u) => {
                    r.entities.insert(("model".into(), u.model.clone()));
                    for a in u.accounts() {
                        r.entities.insert((a.kind.as_str().into(), a.id.clone()));
                        r.accounts.insert(a);
                    }
                }
                EventBody::Upsert(up) => {
                    if let EntityKind::Account(k) = up.kind {
                        r.accounts.insert(AccountRef::new(k, &up.id));
                    }
                }
                EventBody::Granted(g) => {
                    r.accounts.insert(g.account.clone());
                }
                EventBody::Adjusted(a) => {
                    r.accounts.insert(a.account.clone());
                }
                EventBody::Reversed(x) => r.reversal_targets.push(x.usage_event_id.clone()),
                EventBody::GrantVoided(v) => r.void_targets.push(v.grant_id.clone()),
                EventBody::Error(_) => {}
            }
        }
        r
    }
}

/// Load and lock everything the fold of `inputs` needs.
pub(crate) async fn load_state(
    tx: &Transaction<'_>,
    cache: &RegistryCache,
    inputs: &[Input],
    now: DateTime<Utc>,
    windows: Windows,
) -> Result<FoldState, ApplyError> {
    let mut st = windows.fold_state();
    let events: Vec<&event::Event> = inputs
        .iter()
        .filter_map(|i| i.decoded.as_ref().ok())
        .collect();
    load_seen(tx, &events, &mut st).await?;
    let mut reads = Reads::of(&events);
    load_registry(tx, cache, &reads.entities, &mut st).await?;
    load_reversal_targets(tx, &mut reads, &mut st).await?;
    load_void_targets(tx, &mut reads, &mut st).await?;
    // Grants in the batch may be voided in the same batch: their accounts
    // are already in the set.
    let floor = lowest_floor(tx, inputs, &st, now).await?;
    lock_accounts(
        tx,
        &reads.accounts,
        &mut st,
        Blocks::Relevant {
            floor,
            grants: &reads.void_targets,
        },
    )
    .await?;
    Ok(st)
}

/// The earliest time an input is dated at (its `occurred_at`, or a
/// grant's `effective_at` when earlier): what the fold places.
pub(crate) fn earliest_time(i: &Input) -> Option<DateTime<Utc>> {
    let e = i.decoded.as_ref().ok()?;
    Some(match &e.body {
        EventBody::Granted(g) => e.occurred_at.min(g.effective_at),
        _ => e.occurred_at,
    })
}

/// The earliest time any input may be placed at on time, never later than
/// `FoldState::floor` will say once the horizon is read under the locks.
/// Normally the lateness window's start; inputs dated before it (late, or
/// applied late after an outage) may reach back to their production,
/// though not before what was finalized already (the horizon only moves
/// forward).
async fn lowest_floor(
    tx: &Transaction<'_>,
    inputs: &[Input],
    st: &FoldState,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, ApplyError> {
    let window = st.window(now);
    let lowest = inputs
        .iter()
        .filter(|i| earliest_time(i).is_some_and(|t| t < window))
        .filter_map(|i| st.own_floor(i))
        .fold(window, DateTime::min);
    if lowest >= window {
        return Ok(window);
    }
    Ok(match super::horizon::read(tx).await? {
        Some(f) => lowest.max(f.min(window)),
        None => lowest,
    })
}

/// Which of the batch's event ids were applied or are waiting, and which of
/// its idempotency keys were used, with their content hashes.
async fn load_seen(
    tx: &Transaction<'_>,
    events: &[&event::Event],
    st: &mut FoldState,
) -> Result<(), ApplyError> {
    let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    for r in tx
        .query(
            "SELECT event_id, content_hash FROM applied_events WHERE event_id = ANY($1)",
            &[&ids],
        )
        .await?
    {
        st.applied.insert(r.get(0), hash32(r.get(1)));
    }
    for r in tx.query("SELECT event_id, content_hash FROM quarantine WHERE status = 'waiting' AND event_id = ANY($1)", &[&ids]).await? {
        let h: Option<Vec<u8>> = r.get(1);
        if let Some(h) = h {
            st.waiting.insert(r.get(0), hash32(h));
        }
    }
    let idem: Vec<String> = events.iter().filter_map(|e| e.idempotency_key()).collect();
    if !idem.is_empty() {
        for r in tx
            .query(
                "SELECT idem_key, idem_hash FROM applied_events WHERE idem_key = ANY($1)",
                &[&idem],
            )
            .await?
        {
            st.idem_keys.insert(r.get(0), hash32(r.get(1)));
        }
    }
    Ok(())
}

/// Every version of the `entities`, decoded (or taken from the cache).
async fn load_registry(
    tx: &Transaction<'_>,
    cache: &RegistryCache,
    entities: &BTreeSet<(String, String)>,
    st: &mut FoldState,
) -> Result<(), ApplyError> {
    if entities.is_empty() {
        return Ok(());
    }
    let kinds: Vec<&str> = entities.iter().map(|(k, _)| k.as_str()).collect();
    let eids: Vec<&str> = entities.iter().map(|(_, i)| i.as_str()).collect();
    let rows = tx
        .query("SELECT r.kind, r.id, r.effective_from, r.version_seq, r.event_id FROM registry_versions r JOIN unnest($1::text[], $2::text[]) u(k, i) ON r.kind = u.k AND r.id = u.i", &[&kinds, &eids])
        .await?;
    let mut decoded: HashMap<i64, Arc<event::Entity>> = HashMap::new();
    let mut missing = Vec::new();
    for r in &rows {
        let seq: i64 = r.get(3);
        match cache.get(seq) {
            Some(e) => {
                decoded.insert(seq, e);
            }
            None => missing.push(seq),
        }
    }
    if !missing.is_empty() {
        for r in tx
            .query(
                "SELECT version_seq, payload::text FROM registry_versions WHERE version_seq = ANY($1)",
                &[&missing],
            )
            .await?
        {
            let seq: i64 = r.get(0);
            let entity = Arc::new(decode_version(seq, r.get(1))?);
            cache.put(seq, entity.clone());
            decoded.insert(seq, entity);
        }
    }
    for r in rows {
        let kind = EntityKind::parse(r.get(0)).ok_or_else(|| {
            ApplyError::Invariant(format!("unknown registry kind {}", r.get::<_, String>(0)))
        })?;
        let seq: i64 = r.get(3);
        let entity = decoded.get(&seq).ok_or_else(|| {
            ApplyError::Invariant(format!("registry version {seq} vanished while read"))
        })?;
        let id: String = r.get(1);
        st.registry.insert(
            kind,
            &id,
            Version {
                effective_from: r.get(2),
                seq,
                event_id: r.get(4),
                entity: (**entity).clone(),
            },
        );
    }
    Ok(())
}

/// A stored registry version's entity; one that does not decode is a
/// broken invariant.
fn decode_version(seq: i64, payload: &str) -> Result<event::Entity, ApplyError> {
    super::stored_entity(payload)
        .map_err(|why| {
            ApplyError::Invariant(format!(
                "stored registry version {seq} does not decode: {why}"
            ))
        })?
        .ok_or_else(|| {
            ApplyError::Invariant(format!("stored registry version {seq} is not an upsert"))
        })
}

/// The postings of the usage events reversals name, and which of them were
/// reversed already; their accounts join the batch's.
async fn load_reversal_targets(
    tx: &Transaction<'_>,
    reads: &mut Reads,
    st: &mut FoldState,
) -> Result<(), ApplyError> {
    let targets = &reads.reversal_targets;
    if targets.is_empty() {
        return Ok(());
    }
    for r in tx.query("SELECT event_id, kind, id, amount, charge FROM ledger_entries WHERE event_id = ANY($1) AND entry_type = 'usage' ORDER BY entry_id", &[targets]).await? {
        let account = account_ref(r.get(1), r.get::<_, String>(2), "ledger")?;
        let charge: Option<Decimal> = r.get(4);
        st.postings.entry(r.get(0)).or_default().push(Posting { account: account.clone(), amount: r.get(3), charge: charge.unwrap_or_default() });
        reads.accounts.insert(account);
    }
    for r in tx
        .query(
            "SELECT usage_event_id FROM reversals WHERE usage_event_id = ANY($1)",
            &[targets],
        )
        .await?
    {
        st.reversed.insert(r.get(0));
    }
    Ok(())
}

/// The accounts of the grants voids name; they join the batch's.
async fn load_void_targets(
    tx: &Transaction<'_>,
    reads: &mut Reads,
    st: &mut FoldState,
) -> Result<(), ApplyError> {
    if reads.void_targets.is_empty() {
        return Ok(());
    }
    for r in tx.query("SELECT block_id, kind, id FROM credit_blocks WHERE source = 'grant' AND block_id = ANY($1)", &[&reads.void_targets]).await? {
        let account = account_ref(r.get(1), r.get::<_, String>(2), "credit blocks")?;
        st.grant_accounts.insert(r.get(0), account.clone());
        reads.accounts.insert(account);
    }
    Ok(())
}

/// An account named by stored text; an unknown kind is a broken invariant.
pub(crate) fn account_ref(kind: &str, id: String, table: &str) -> Result<AccountRef, ApplyError> {
    let kind = AccountKind::parse(kind)
        .ok_or_else(|| ApplyError::Invariant(format!("bad account kind in {table}")))?;
    Ok(AccountRef::new(kind, id))
}

/// Accounts as (kind, id) text, sorted: the lock order.
pub(crate) fn sorted_accounts(accounts: &BTreeSet<AccountRef>) -> Vec<(&'static str, &str)> {
    let mut v: Vec<(&'static str, &str)> = accounts
        .iter()
        .map(|a| (a.kind.as_str(), a.id.as_str()))
        .collect();
    v.sort();
    v
}

/// Which credit blocks to load with the accounts.
pub(crate) enum Blocks<'a> {
    /// Every block (a resweep).
    All,
    /// Blocks with credit left or a boundary at or after `floor`, and the
    /// named grants (void targets): all a batch's fold can touch.
    Relevant {
        floor: DateTime<Utc>,
        grants: &'a [String],
    },
}

/// Lock `accounts` (made on first sight) in (kind, id) order and load them
/// with their `which` blocks into `st`; checks each as loaded.
pub(crate) async fn lock_accounts(
    tx: &Transaction<'_>,
    accounts: &BTreeSet<AccountRef>,
    st: &mut FoldState,
    which: Blocks<'_>,
) -> Result<(), ApplyError> {
    if accounts.is_empty() {
        return Ok(());
    }
    let sorted = sorted_accounts(accounts);
    let kinds: Vec<&str> = sorted.iter().map(|(k, _)| *k).collect();
    let ids: Vec<&str> = sorted.iter().map(|(_, i)| *i).collect();
    tx.execute("INSERT INTO accounts (kind, id) SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING", &[&kinds, &ids]).await?;
    let rows = tx
        .query("SELECT a.kind, a.id, a.registered, a.balance, a.debt, a.entry_count, a.last_hash, a.hwm, a.first_used_at, a.warning_threshold, a.expire_warning_secs, a.low_armed, a.exhausted_armed, a.low_fired, a.exhausted_fired FROM accounts a JOIN unnest($1::text[], $2::text[]) u(k, i) ON a.kind = u.k AND a.id = u.i ORDER BY a.kind, a.id FOR UPDATE OF a", &[&kinds, &ids])
        .await?;
    for r in rows {
        let account = account_ref(r.get(0), r.get::<_, String>(1), "accounts")?;
        let mut a = AccountState::new(account.clone());
        a.registered = r.get(2);
        a.balance = r.get(3);
        a.debt = r.get(4);
        a.seq = r.get(5);
        a.last_hash = hash32(r.get(6));
        a.hwm = r.get(7);
        a.first_used_at = r.get(8);
        a.watch = crate::ledger::notify::Watch {
            threshold: r.get(9),
            expire_warning_secs: r.get::<_, Option<i32>>(10).map(|s| s.max(0) as u32),
            low_armed: r.get(11),
            exhausted_armed: r.get(12),
            low_fired: r.get(13),
            exhausted_fired: r.get(14),
        };
        st.accounts.insert(account, a);
    }
    const COLS: &str = "SELECT b.kind, b.id, b.block_id, b.source, b.category, b.effective_at, b.expires_at, b.amount, b.remaining, b.active_from, b.voided_at, b.void_amount, b.expired_amount, b.rollover_cap, b.rolled_out FROM credit_blocks b JOIN unnest($1::text[], $2::text[]) u(k, i) ON b.kind = u.k AND b.id = u.i";
    let rows = match which {
        Blocks::All => tx.query(COLS, &[&kinds, &ids]).await?,
        Blocks::Relevant { floor, grants } => {
            let q = format!("{COLS} WHERE b.remaining > 0 OR b.active_from >= $3 OR b.expires_at >= $3 OR b.voided_at >= $3 OR (b.source = 'grant' AND b.block_id = ANY($4))");
            tx.query(&q, &[&kinds, &ids, &floor, &grants]).await?
        }
    };
    for r in rows {
        let block = block_of(&r)?;
        if let Some(a) = st.accounts.get_mut(&block.account) {
            a.blocks.push(block);
        }
    }
    for a in st.accounts.values_mut() {
        a.sort_blocks();
        a.check()
            .map_err(|e| ApplyError::Invariant(format!("as loaded: {e}")))?;
    }
    Ok(())
}

/// A credit block row; a source or category outside the known sets is a
/// broken invariant.
fn block_of(r: &tokio_postgres::Row) -> Result<Block, ApplyError> {
    let source: &str = r.get(3);
    let category: Option<&str> = r.get(4);
    let bad = |what: &str, v: &str| {
        ApplyError::Invariant(format!(
            "unknown credit block {what} `{v}` in credit blocks"
        ))
    };
    Ok(Block {
        block_id: r.get(2),
        account: account_ref(r.get(0), r.get::<_, String>(1), "credit blocks")?,
        source: Block::source_named(source).ok_or_else(|| bad("source", source))?,
        category: category
            .map(|c| GrantCategory::parse(c).ok_or_else(|| bad("category", c)))
            .transpose()?,
        effective_at: r.get(5),
        expires_at: r.get(6),
        amount: r.get(7),
        remaining: r.get(8),
        active_from: r.get(9),
        voided_at: r.get(10),
        void_amount: r.get(11),
        expired_amount: r.get(12),
        rollover_cap: r.get(13),
        rolled_out: r.get(14),
        dirty: false,
    })
}

/// A stored 32-byte hash.
pub(crate) fn hash32(v: Vec<u8>) -> [u8; 32] {
    let mut h = [0u8; 32];
    if v.len() == 32 {
        h.copy_from_slice(&v);
    }
    h
}
