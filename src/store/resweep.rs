//! Step 6, after the writes: accounts where something arrived out of time
//! order are swept again from their whole history, read back from
//! Postgres (every block, every debit the ledger holds, including this
//! transaction's), and the result and any void corrections written.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use rust_decimal::Decimal;

use super::error::ApplyError;
use super::load::{account_ref, lock_accounts, sorted_accounts, Blocks};
use super::sink::Windows;
use super::write::write_effects;
use crate::event::AccountRef;
use crate::ledger::fold;

/// Re-run the attribution sweep of `accounts` from their whole history
/// (every block, every debit entry, including the ones this transaction
/// just wrote) and write the result and any void corrections.
pub(crate) async fn resweep_accounts(
    tx: &Transaction<'_>,
    accounts: &BTreeSet<AccountRef>,
    now: DateTime<Utc>,
    windows: Windows,
) -> Result<(), ApplyError> {
    if accounts.is_empty() {
        return Ok(());
    }
    let mut st = windows.fold_state();
    lock_accounts(tx, accounts, &mut st, Blocks::All).await?;
    let sorted = sorted_accounts(accounts);
    let kinds: Vec<&str> = sorted.iter().map(|(k, _)| *k).collect();
    let ids: Vec<&str> = sorted.iter().map(|(_, i)| *i).collect();
    // The debits by `Entry::sweep_debit`'s rule, summed per sweep time.
    let rows = tx
        .query(
            "SELECT e.kind, e.id, coalesce(e.attributed_at, e.occurred_at), sum(-e.amount) FROM ledger_entries e JOIN unnest($1::text[], $2::text[]) u(k, i) ON e.kind = u.k AND e.id = u.i
             WHERE e.amount < 0 AND e.entry_type IN ('usage', 'adjustment') GROUP BY 1, 2, 3",
            &[&kinds, &ids],
        )
        .await?;
    let mut debits: HashMap<AccountRef, Vec<(DateTime<Utc>, Decimal)>> = HashMap::new();
    for r in rows {
        debits
            .entry(account_ref(r.get(0), r.get::<_, String>(1), "ledger")?)
            .or_default()
            .push((r.get(2), r.get(3)));
    }
    for a in st.accounts.values_mut() {
        a.needs_resweep = true;
    }
    let fx = fold::settle(&mut st, &debits, now).map_err(ApplyError::Invariant)?;
    write_effects(tx, &st, &fx, now).await
}
