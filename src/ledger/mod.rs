//! Money: pricing, the effective-dated registry, the attribution sweep and
//! the fold that turns events into ledger entries. Pure: no tokio, no SQL,
//! no clock.

pub mod cycle;
pub mod entry;
pub mod fold;
pub mod notify;
pub mod pricing;
pub mod registry;
pub mod spend;
pub mod sweep;

#[cfg(test)]
mod proptest;
