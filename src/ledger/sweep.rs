//! The attribution sweep of one account: its credit blocks, which are open
//! when, and how debits burn them (earliest expiry first, debt repaid by
//! the next block to open). The incremental sweep the fold runs and the
//! full re-sweep from history ([`resweep`]) live here together because
//! they must agree exactly. Pure: time is passed in.
//!
//! The database checks `remaining >= 0`, `debt >= 0` and the balance
//! identity on every write; the sweep asserts the same where it computes
//! them ([`AccountState::check`] and the `assert_*` helpers), so a bug
//! stops here, in the property test, before Postgres ever sees it.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::event::{AccountRef, GrantCategory};

/// Whether credit with this validity is spendable at `t`: opened, not yet
/// expired. The one "open at t" rule (admission's view, the balance read
/// and the sweep use it).
pub fn credit_open_at(
    active_from: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    t: DateTime<Utc>,
) -> bool {
    active_from <= t && expires_at.is_none_or(|e| t < e)
}

/// The contract's `available` at `t`: credit in the blocks open at `t`,
/// given as (active_from, expires_at, remaining), minus debt.
pub fn available(
    blocks: impl IntoIterator<Item = (DateTime<Utc>, Option<DateTime<Utc>>, Decimal)>,
    debt: Decimal,
    t: DateTime<Utc>,
) -> Decimal {
    let open: Decimal = blocks
        .into_iter()
        .filter(|(from, until, _)| credit_open_at(*from, *until, t))
        .map(|(_, _, remaining)| remaining)
        .sum();
    open - debt
}

/// A credit block: what one grant (or credit-back) left to spend.
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub block_id: String,
    pub account: AccountRef,
    /// `grant`, `adjustment`, `reversal` or `cycle`.
    pub source: &'static str,
    pub category: Option<GrantCategory>,
    pub effective_at: DateTime<Utc>,
    /// When the block opens in the attribution sweep: `effective_at`, or
    /// the arrival time when that is earlier than the lateness window.
    pub active_from: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub amount: Decimal,
    pub remaining: Decimal,
    /// When a void closed it (sweep time), and what the void entries took.
    pub voided_at: Option<DateTime<Utc>>,
    pub void_amount: Decimal,
    /// What the finalized expiry entry took, once it fired.
    pub expired_amount: Option<Decimal>,
    /// A cycle block: the most of its remainder that moves into the next
    /// cycle's block at its expiry finalization (0 for other blocks), and
    /// what moved (also part of its amount leaving at finalization).
    pub rollover_cap: Decimal,
    pub rolled_out: Decimal,
    pub dirty: bool,
}

impl Block {
    /// What can make a block: a grant, a positive adjustment, a reversal.
    pub const SOURCES: [&'static str; 4] = ["grant", "adjustment", "reversal", "cycle"];

    /// The block source named by stored text.
    pub fn source_named(s: &str) -> Option<&'static str> {
        Self::SOURCES.into_iter().find(|x| *x == s)
    }

    pub fn open_at(&self, t: DateTime<Utc>) -> bool {
        credit_open_at(self.active_from, self.expires_at, t) && self.voided_at.is_none_or(|v| t < v)
    }

    /// Take `amount` (at most what is left) from the block.
    fn take(&mut self, amount: Decimal) {
        assert!(
            amount >= Decimal::ZERO && amount <= self.remaining,
            "block {}: take {} of remaining {}",
            self.block_id,
            amount,
            self.remaining
        );
        self.remaining -= amount;
        self.dirty = true;
    }

    /// Burn order: earliest expiry first, non-expiring last, then
    /// effective_at, then id.
    fn burn_key(&self) -> (bool, Option<DateTime<Utc>>, DateTime<Utc>, &str) {
        (
            self.expires_at.is_none(),
            self.expires_at,
            self.effective_at,
            &self.block_id,
        )
    }

    /// The moments at which the set of open blocks changes because of it.
    fn boundaries(&self) -> impl Iterator<Item = DateTime<Utc>> {
        [Some(self.active_from), self.expires_at, self.voided_at]
            .into_iter()
            .flatten()
    }
}

/// A ledger account as the fold sees it (locked by the store).
///
/// Attribution is a sweep over time: blocks open at their `active_from`
/// (repaying debt first), debits burn the blocks open at their time, voids
/// close a block. `hwm` is how far the sweep has gone. Events arriving in
/// time order extend the sweep exactly; one arriving behind `hwm` with no
/// block boundary in between burns the same blocks it would have burned
/// in order (within an interval without boundaries the open set is fixed,
/// so greedy burns commute). Anything else sets `needs_resweep`, and the
/// store re-runs the sweep from the account's whole history
/// ([`resweep`]) in the same transaction, so the state written is always
/// the one arrival in time order would have given.
#[derive(Clone, Debug, PartialEq)]
pub struct AccountState {
    pub account: AccountRef,
    pub registered: bool,
    pub balance: Decimal,
    pub debt: Decimal,
    /// Entries so far (the next entry's seq is `seq + 1`).
    pub seq: i64,
    pub last_hash: [u8; 32],
    /// Blocks with credit left or a boundary inside the lateness window
    /// (all blocks when resweeping).
    pub blocks: Vec<Block>,
    pub hwm: Option<DateTime<Utc>>,
    /// The `occurred_at` of the account's first applied usage.
    pub first_used_at: Option<DateTime<Utc>>,
    /// Warning settings and where the account's credit episodes stand.
    pub watch: crate::ledger::notify::Watch,
    pub needs_resweep: bool,
    pub dirty: bool,
    /// Every block boundary, sorted; rebuilt when blocks change.
    boundaries: Option<Vec<DateTime<Utc>>>,
}

impl AccountState {
    pub fn new(account: AccountRef) -> Self {
        AccountState {
            account,
            registered: false,
            balance: Decimal::ZERO,
            debt: Decimal::ZERO,
            seq: 0,
            last_hash: [0; 32],
            blocks: Vec::new(),
            hwm: None,
            first_used_at: None,
            watch: Default::default(),
            needs_resweep: false,
            dirty: false,
            boundaries: None,
        }
    }

    /// `balance` must equal what the blocks hold minus the debt. A mismatch
    /// is a bug: the caller stops.
    pub fn check(&self) -> Result<(), String> {
        let held: Decimal = self.blocks.iter().map(|b| b.remaining).sum();
        if held - self.debt != self.balance {
            return Err(format!(
                "account {}: balance {} != blocks {} - debt {}",
                self.account, self.balance, held, self.debt
            ));
        }
        Ok(())
    }

    /// What can be spent at `t`: credit in open blocks minus debt.
    pub fn available_at(&self, t: DateTime<Utc>) -> Decimal {
        let open = self
            .blocks
            .iter()
            .filter(|b| b.voided_at.is_none_or(|v| t < v))
            .map(|b| (b.active_from, b.expires_at, b.remaining));
        available(open, self.debt, t)
    }

    /// Move the sweep's high-water mark; it never moves back.
    fn set_hwm(&mut self, to: DateTime<Utc>) {
        assert!(
            self.hwm.is_none_or(|h| h <= to),
            "account {}: the sweep's high-water mark would move back from {:?} to {}",
            self.account,
            self.hwm,
            to
        );
        self.hwm = Some(to);
    }

    /// Change the debt by `delta`; it never goes below zero.
    fn add_debt(&mut self, delta: Decimal) {
        self.debt += delta;
        assert!(
            self.debt >= Decimal::ZERO,
            "account {}: debt {} below zero",
            self.account,
            self.debt
        );
        self.dirty = true;
    }

    /// Indices of the blocks that pass `filter`, in burn order (`blocks`
    /// is kept sorted by burn order).
    pub(crate) fn burn_order(&self, filter: impl Fn(&Block) -> bool) -> Vec<usize> {
        (0..self.blocks.len())
            .filter(|&i| filter(&self.blocks[i]))
            .collect()
    }

    /// Put the blocks in burn order (after loading them).
    pub fn sort_blocks(&mut self) {
        self.blocks.sort_by(|a, b| a.burn_key().cmp(&b.burn_key()));
        self.boundaries = None;
    }

    /// Take `amount` from the blocks open at `t` in burn order; the rest
    /// becomes debt. The balance is the caller's.
    pub(crate) fn burn_blocks(&mut self, amount: Decimal, t: DateTime<Utc>) {
        let mut left = amount;
        for b in self.blocks.iter_mut() {
            if left.is_zero() {
                break;
            }
            if b.remaining <= Decimal::ZERO || !b.open_at(t) {
                continue;
            }
            let take = left.min(b.remaining);
            b.take(take);
            left -= take;
        }
        self.add_debt(left);
    }

    /// Open block `i` at its `active_from`: it repays debt first.
    pub(crate) fn activate(&mut self, i: usize) {
        let b = &mut self.blocks[i];
        if self.debt > Decimal::ZERO && b.open_at(b.active_from) {
            let repay = self.debt.min(b.remaining);
            b.take(repay);
            self.add_debt(-repay);
        }
    }

    /// Move the sweep forward to `to`, opening the blocks that become
    /// active on the way, in time then burn order.
    pub(crate) fn advance(&mut self, to: DateTime<Utc>) {
        if self.hwm.is_some_and(|h| to <= h) {
            return;
        }
        let from = self.hwm;
        let mut acts =
            self.burn_order(|b| from.is_none_or(|h| b.active_from > h) && b.active_from <= to);
        acts.sort_by_key(|&i| self.blocks[i].active_from);
        for i in acts {
            self.activate(i);
        }
        self.set_hwm(to);
        self.dirty = true;
    }

    /// Whether the set of open blocks changes anywhere in `(lo, hi]`.
    pub(crate) fn boundary_in(&mut self, lo: DateTime<Utc>, hi: DateTime<Utc>) -> bool {
        let blocks = &self.blocks;
        let all = self.boundaries.get_or_insert_with(|| {
            let mut v: Vec<DateTime<Utc>> = blocks.iter().flat_map(|b| b.boundaries()).collect();
            v.sort();
            v
        });
        let i = all.partition_point(|x| *x <= lo);
        all.get(i).is_some_and(|x| *x <= hi)
    }

    /// A debit (usage or negative adjustment) at sweep time `t`.
    pub(crate) fn debit(&mut self, amount: Decimal, t: DateTime<Utc>) {
        match self.hwm {
            Some(h) if t < h => {
                if self.boundary_in(t, h) {
                    self.needs_resweep = true;
                }
            }
            _ => self.advance(t),
        }
        self.burn_blocks(amount, t);
        self.balance -= amount;
    }

    /// A new block (grant or credit-back).
    pub(crate) fn add_block(&mut self, block: Block) {
        self.balance += block.amount;
        let behind = self.hwm.is_some_and(|h| block.active_from <= h);
        let i = self
            .blocks
            .partition_point(|b| b.burn_key() <= block.burn_key());
        self.blocks.insert(i, block);
        self.boundaries = None;
        if behind {
            // It should have opened earlier: open it now, and let the
            // resweep put every debit since where it belongs.
            self.activate(i);
            self.needs_resweep = true;
        }
        self.dirty = true;
    }

    /// Void block `i` at sweep time `v`; returns what the void entry takes.
    pub(crate) fn void(&mut self, i: usize, v: DateTime<Utc>) -> Decimal {
        // Closed from `v` on: a block voided by the time it would open
        // never opens (so repays nothing), as in the resweep.
        self.blocks[i].voided_at = Some(v);
        self.boundaries = None;
        match self.hwm {
            Some(h) if v <= h => self.needs_resweep = true,
            _ => self.advance(v),
        }
        let b = &mut self.blocks[i];
        let left = b.remaining;
        b.remaining = Decimal::ZERO;
        b.void_amount += left;
        b.dirty = true;
        self.balance -= left;
        self.dirty = true;
        left
    }
}

/// Re-run the attribution sweep of one account from its whole history:
/// every block it ever had (`acct.blocks` must hold all of them) and its
/// debits as (sweep time, amount), in any order; amounts at one time may be
/// pre-summed. Sets the canonical block remainders, debt and `hwm`, and
/// returns the void corrections: (block id, extra amount the block's void
/// must take; negative gives back). The balance is not touched; the caller
/// writes the corrections as entries. A finalized expiry that the sweep
/// disagrees with is a broken invariant.
pub fn resweep(
    acct: &mut AccountState,
    debits: &[(DateTime<Utc>, Decimal)],
) -> Result<Vec<(String, Decimal)>, String> {
    // The sweep goes as far as the account's debits and voids, or as far
    // as it was advanced before (expiry finalization advances it); blocks
    // that open later wait, as they do in the incremental sweep.
    let horizon = debits
        .iter()
        .map(|d| d.0)
        .chain(acct.blocks.iter().filter_map(|b| b.voided_at))
        .chain(acct.hwm)
        .max();
    acct.sort_blocks();
    for b in &mut acct.blocks {
        // A void recorded on a block whose expiry was finalized came after
        // the finalization (a finalization skips voided blocks) and took
        // nothing; it does not close the block (as `apply_event` treats
        // it). Blocks written before that rule may still carry it.
        if b.expired_amount.is_some() && b.voided_at.is_some() {
            b.voided_at = None;
        }
    }
    let mut moments: Vec<DateTime<Utc>> = debits.iter().map(|d| d.0).collect();
    for b in &mut acct.blocks {
        b.remaining = b.amount;
        b.dirty = true;
        moments.push(b.active_from);
        moments.extend(b.voided_at);
    }
    moments.retain(|m| horizon.is_some_and(|h| *m <= h));
    moments.sort();
    moments.dedup();
    let mut per_time: BTreeMap<DateTime<Utc>, Decimal> = BTreeMap::new();
    for (t, a) in debits {
        *per_time.entry(*t).or_default() += *a;
    }
    acct.debt = Decimal::ZERO;
    let mut canon_void: HashMap<usize, Decimal> = HashMap::new();
    for t in moments {
        let mut acts = acct.burn_order(|b| b.active_from == t);
        acts.sort_by_key(|&i| acct.blocks[i].active_from);
        for i in acts {
            acct.activate(i);
        }
        for (i, b) in acct.blocks.iter_mut().enumerate() {
            if b.voided_at == Some(t) {
                canon_void.insert(i, b.remaining);
                b.remaining = Decimal::ZERO;
            }
        }
        if let Some(a) = per_time.get(&t) {
            acct.burn_blocks(*a, t);
        }
        // The re-sweep recomputes the mark from the moments it visits.
        acct.hwm = Some(t);
    }
    let mut corrections = Vec::new();
    for (i, b) in acct.blocks.iter_mut().enumerate() {
        if let Some(v) = canon_void.get(&i) {
            if *v != b.void_amount {
                corrections.push((b.block_id.clone(), *v - b.void_amount));
                b.void_amount = *v;
            }
        }
        if let Some(x) = b.expired_amount {
            // What left at finalization: the expiry, and what rolled over.
            if x + b.rolled_out != b.remaining {
                return Err(format!(
                    "account {}: block {} expired with {} (and rolled over {}) but the sweep leaves it {}",
                    acct.account, b.block_id, x, b.rolled_out, b.remaining
                ));
            }
            b.remaining = Decimal::ZERO;
        }
    }
    acct.needs_resweep = false;
    acct.dirty = true;
    Ok(corrections)
}
