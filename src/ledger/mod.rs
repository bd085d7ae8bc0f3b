//! Money: pricing, the effective-dated registry and the fold that turns
//! events into ledger entries. Pure: no tokio, no SQL, no clock.

pub mod fold;
pub mod pricing;
pub mod registry;

#[cfg(test)]
mod proptest;
