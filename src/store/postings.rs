//! The ledger's rows, written by binary `COPY`: entries of every type as
//! rows of `ledger_entry_rows`, and a usage event's legs (key, app, user,
//! group, reseller) as one row of `usage_postings`
//! (V5__usage_postings.sql), with ids from one sequence in the fold's
//! order. The `ledger_entries` view reads both back as entries.

use deadpool_postgres::Transaction;
use postgres_types::{ToSql, Type};
use tokio_postgres::binary_copy::BinaryCopyInWriter;

use super::error::ApplyError;
use crate::event::AccountKind;
use crate::ledger::fold;

/// What one id of the `ledger_ids` sequence is written as: an entry row,
/// or a usage event's legs as one posting row (V5__usage_postings.sql).
enum LedgerUnit<'a> {
    Row(&'a fold::Entry),
    /// The legs in the fold's order (key, app, user, then group and
    /// reseller when the event names them).
    Posting(Vec<&'a fold::Entry>),
}

/// Group the fold's entries into entry rows and postings, in order. A usage
/// event's legs are consecutive (the fold writes them in one loop); legs of
/// one event split apart would be two posting rows for one event, which the
/// store's unique event id refuses as if it were a lost race, retried
/// forever: a broken invariant instead.
fn ledger_units(entries: &[fold::Entry]) -> Result<Vec<LedgerUnit<'_>>, ApplyError> {
    let mut units: Vec<LedgerUnit<'_>> = Vec::with_capacity(entries.len());
    let mut posted: std::collections::HashSet<&str> = Default::default();
    for e in entries {
        if e.entry_type != fold::EntryType::Usage {
            units.push(LedgerUnit::Row(e));
            continue;
        }
        if let Some(LedgerUnit::Posting(legs)) = units.last_mut() {
            if legs[0].event_id == e.event_id {
                legs.push(e);
                continue;
            }
        }
        if !posted.insert(e.event_id.as_str()) {
            return Err(ApplyError::Invariant(format!(
                "usage entries of event {} are not consecutive in the batch",
                e.event_id
            )));
        }
        units.push(LedgerUnit::Posting(vec![e]));
    }
    Ok(units)
}

/// A posting's legs by scope rank (key 0 … reseller 4) with their
/// `limited`, and the detail they share. Anything a posting row cannot hold
/// exactly as the fold produced it is a broken invariant.
#[allow(clippy::type_complexity)]
fn posting_legs<'a>(
    legs: &[&'a fold::Entry],
) -> Result<([Option<(&'a fold::Entry, bool)>; 5], &'a serde_json::Value), ApplyError> {
    let first = legs[0];
    let bad = |why: &str| {
        ApplyError::Invariant(format!(
            "usage entries of event {} do not form one posting: {why}",
            first.event_id
        ))
    };
    let fold::Detail::Usage { shared, .. } = &first.detail else {
        return Err(bad("its detail is not a usage detail"));
    };
    let mut by_rank: [Option<(&fold::Entry, bool)>; 5] = [None; 5];
    for e in legs {
        let fold::Detail::Usage { shared: s, limited } = &e.detail else {
            return Err(bad("its detail is not a usage detail"));
        };
        if !(std::sync::Arc::ptr_eq(s, shared) || s == shared)
            || e.charge != first.charge
            || e.occurred_at != first.occurred_at
            || e.attributed_at != first.attributed_at
            || e.recorded_at != first.recorded_at
            || e.source != first.source
        {
            return Err(bad("legs differ in a shared field"));
        }
        let rank = e.account.kind as usize;
        if by_rank[rank].replace((e, *limited)).is_some() {
            return Err(bad("two legs for one scope"));
        }
    }
    if by_rank[..3].iter().any(Option::is_none) {
        return Err(bad("no key, app or user leg"));
    }
    if first.charge.is_none() {
        return Err(bad("no charge"));
    }
    Ok((by_rank, shared))
}

/// The batch's ledger by binary `COPY`: entry rows and usage postings, with
/// ids from one sequence in the fold's order (so `entry_id` follows it).
pub(crate) async fn write_ledger(
    tx: &Transaction<'_>,
    entries: &[fold::Entry],
) -> Result<(), ApplyError> {
    let units = ledger_units(entries)?;
    let ids: Vec<i64> = tx
        .query(
            "SELECT nextval('ledger_ids') FROM generate_series(1, $1::int) ORDER BY 1",
            &[&(units.len() as i32)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if ids.len() != units.len() {
        return Err(ApplyError::Invariant(
            "the ledger id sequence gave too few ids".into(),
        ));
    }
    write_entry_rows(tx, &units, &ids).await?;
    write_postings(tx, &units, &ids).await
}

/// Entries other than usage, one row each (`entry_id` is the ledger id
/// times 8: room for the legs of a posting in the same id space).
async fn write_entry_rows(
    tx: &Transaction<'_>,
    units: &[LedgerUnit<'_>],
    ids: &[i64],
) -> Result<(), ApplyError> {
    let rows: Vec<(i64, &fold::Entry)> = units
        .iter()
        .zip(ids)
        .filter_map(|(u, id)| match u {
            LedgerUnit::Row(e) => Some((id * 8, *e)),
            LedgerUnit::Posting(_) => None,
        })
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    {
        const TYPES: [Type; 18] = [
            Type::INT8,
            Type::TEXT,
            Type::TEXT,
            Type::INT8,
            Type::TEXT,
            Type::TEXT,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::TIMESTAMPTZ,
            Type::TIMESTAMPTZ,
            Type::TEXT,
            Type::INT4,
            Type::INT8,
            Type::JSON,
            Type::BYTEA,
            Type::BYTEA,
            Type::TIMESTAMPTZ,
        ];
        let sink = tx
            .copy_in("COPY ledger_entry_rows (entry_id, kind, id, seq, event_id, entry_type, amount, balance_after, charge, occurred_at, recorded_at, topic, partition, kafka_offset, detail, prev_hash, hash, attributed_at) FROM STDIN (FORMAT binary)")
            .await?;
        let writer = BinaryCopyInWriter::new(sink, &TYPES);
        futures_util::pin_mut!(writer);
        for (entry_id, x) in rows {
            let source = x.source.as_ref();
            let detail = match &x.detail {
                fold::Detail::Object(v) => std::borrow::Cow::Borrowed(v),
                d => std::borrow::Cow::Owned(d.to_value()),
            };
            writer
                .as_mut()
                .write(&[
                    &entry_id,
                    &x.account.kind.as_str(),
                    &x.account.id.as_str(),
                    &x.seq,
                    &x.event_id.as_str(),
                    &x.entry_type.as_str(),
                    &x.amount,
                    &x.balance_after,
                    &x.charge,
                    &x.occurred_at,
                    &x.recorded_at,
                    &source.map(|s| s.topic.as_str()),
                    &source.map(|s| s.partition),
                    &source.map(|s| s.offset),
                    &*detail,
                    &x.prev_hash.as_slice(),
                    &x.hash.as_slice(),
                    &x.attributed_at,
                ])
                .await?;
        }
        writer.finish().await?;
    }
    Ok(())
}

/// The columns of a `usage_postings` row (the shared ones, then seven per
/// scope) and their types.
fn posting_columns() -> (Vec<Type>, String) {
    let mut types = vec![
        Type::INT8,
        Type::TEXT,
        Type::NUMERIC,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::INT4,
        Type::INT8,
        Type::JSON,
    ];
    let mut cols = String::from("posting_id, event_id, charge, occurred_at, attributed_at, recorded_at, topic, partition, kafka_offset, detail");
    for k in AccountKind::ALL {
        types.extend([
            Type::TEXT,
            Type::INT8,
            Type::NUMERIC,
            Type::NUMERIC,
            Type::BOOL,
            Type::BYTEA,
            Type::BYTEA,
        ]);
        let k = k.as_str();
        cols.push_str(&format!(
            ", {k}_id, {k}_seq, {k}_amount, {k}_balance, {k}_limited, {k}_prev_hash, {k}_hash"
        ));
    }
    (types, cols)
}

/// Usage events, one posting row each with its legs by scope.
async fn write_postings(
    tx: &Transaction<'_>,
    units: &[LedgerUnit<'_>],
    ids: &[i64],
) -> Result<(), ApplyError> {
    let postings: Vec<(i64, &Vec<&fold::Entry>)> = units
        .iter()
        .zip(ids)
        .filter_map(|(u, id)| match u {
            LedgerUnit::Posting(legs) => Some((*id, legs)),
            LedgerUnit::Row(_) => None,
        })
        .collect();
    if postings.is_empty() {
        return Ok(());
    }
    let (types, cols) = posting_columns();
    let sink = tx
        .copy_in(&format!(
            "COPY usage_postings ({cols}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &types);
    futures_util::pin_mut!(writer);
    for (id, legs) in postings {
        let (by_rank, detail) = posting_legs(legs)?;
        let first = legs[0];
        let source = first.source.as_ref();
        let topic = source.map(|s| s.topic.as_str());
        let partition = source.map(|s| s.partition);
        let offset = source.map(|s| s.offset);
        let leg_cols: Vec<_> = by_rank
            .iter()
            .map(|l| {
                (
                    l.map(|(e, _)| e.account.id.as_str()),
                    l.map(|(e, _)| e.seq),
                    l.map(|(e, _)| e.amount),
                    l.map(|(e, _)| e.balance_after),
                    l.map(|(_, limited)| limited),
                    l.map(|(e, _)| e.prev_hash.as_slice()),
                    l.map(|(e, _)| e.hash.as_slice()),
                )
            })
            .collect();
        let mut values: Vec<&(dyn ToSql + Sync)> = vec![
            &id,
            &first.event_id,
            &first.charge,
            &first.occurred_at,
            &first.attributed_at,
            &first.recorded_at,
            &topic,
            &partition,
            &offset,
            &detail,
        ];
        for l in &leg_cols {
            values.extend([
                &l.0 as &(dyn ToSql + Sync),
                &l.1,
                &l.2,
                &l.3,
                &l.4,
                &l.5,
                &l.6,
            ]);
        }
        writer.as_mut().write(&values).await?;
    }
    writer.finish().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::AccountRef;
    use chrono::TimeZone;
    use chrono::Utc;
    use fold::{Detail, Entry, EntryType};
    use rust_decimal::Decimal;

    fn entry(kind: AccountKind, event: &str, entry_type: EntryType, limited: bool) -> Entry {
        let t = Utc.with_ymd_and_hms(2026, 11, 27, 10, 0, 0).unwrap();
        let shared = std::sync::Arc::new(serde_json::json!({"discount": "1"}));
        Entry {
            account: AccountRef::new(kind, format!("{}-1", kind.as_str())),
            seq: 1,
            event_id: event.into(),
            entry_type,
            amount: Decimal::new(-5, 0),
            balance_after: Decimal::new(-5, 0),
            charge: Some(Decimal::new(5, 0)),
            occurred_at: t,
            attributed_at: None,
            recorded_at: t,
            source: None,
            detail: match entry_type {
                EntryType::Usage => Detail::Usage { shared, limited },
                _ => serde_json::json!({"grant_id": "g"}).into(),
            },
            prev_hash: [0; 32],
            hash: [1; 32],
        }
    }

    fn legs(event: &str, kinds: &[AccountKind]) -> Vec<Entry> {
        kinds
            .iter()
            .map(|k| entry(*k, event, EntryType::Usage, *k != AccountKind::Group))
            .collect()
    }

    #[test]
    fn a_usage_event_s_legs_are_one_posting_and_other_entries_rows_in_order() {
        use AccountKind::*;
        let mut entries = legs("u-1", &[Key, App, User, Group, Reseller]);
        entries.push(entry(User, "g-1", EntryType::Grant, true));
        entries.extend(legs("u-2", &[Key, App, User]));
        entries.extend(legs("u-3", &[Key, App, User, Reseller]));
        let units = ledger_units(&entries).unwrap();
        let shape: Vec<(String, usize)> = units
            .iter()
            .map(|u| match u {
                LedgerUnit::Row(e) => (e.event_id.clone(), 0),
                LedgerUnit::Posting(l) => (l[0].event_id.clone(), l.len()),
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                ("u-1".into(), 5),
                ("g-1".into(), 0),
                ("u-2".into(), 3),
                ("u-3".into(), 4)
            ]
        );
        let LedgerUnit::Posting(l) = &units[3] else {
            panic!()
        };
        let (by_rank, detail) = posting_legs(l).unwrap();
        assert_eq!(detail, &serde_json::json!({"discount": "1"}));
        // By scope rank; the group leg is absent, the reseller leg is rank 4.
        assert_eq!(
            by_rank.map(|l| l.map(|(e, limited)| (e.account.kind, limited))),
            [
                Some((Key, true)),
                Some((App, true)),
                Some((User, true)),
                None,
                Some((Reseller, true))
            ]
        );
        let LedgerUnit::Posting(l) = &units[0] else {
            panic!()
        };
        assert_eq!(
            posting_legs(l).unwrap().0[3].map(|(_, lim)| lim),
            Some(false)
        );
    }

    #[test]
    fn legs_that_cannot_share_a_posting_row_are_a_broken_invariant() {
        use AccountKind::*;
        let refuse = |mut l: Vec<Entry>, change: &dyn Fn(&mut Vec<Entry>)| {
            change(&mut l);
            let refs: Vec<&Entry> = l.iter().collect();
            match posting_legs(&refs) {
                Err(ApplyError::Invariant(m)) => m,
                _ => panic!("accepted"),
            }
        };
        let five = || legs("u-1", &[Key, App, User, Group, Reseller]);
        let m = refuse(five(), &|l| l[2].charge = Some(Decimal::new(6, 0)));
        assert!(m.contains("u-1") && m.contains("shared field"), "{m}");
        let m = refuse(five(), &|l| {
            l[1].detail = Detail::Usage {
                shared: std::sync::Arc::new(serde_json::json!({"discount": "0.5"})),
                limited: true,
            }
        });
        assert!(m.contains("shared field"), "{m}");
        let m = refuse(five(), &|l| l[4].account.kind = Group);
        assert!(m.contains("two legs for one scope"), "{m}");
        let m = refuse(five(), &|l| {
            l.remove(1);
        });
        assert!(m.contains("no key, app or user leg"), "{m}");
        let m = refuse(five(), &|l| l[0].detail = serde_json::json!({}).into());
        assert!(m.contains("not a usage detail"), "{m}");
        // One event's legs apart from each other in the batch.
        let mut split = legs("u-1", &[Key, App]);
        split.push(entry(User, "g-1", EntryType::Grant, true));
        split.extend(legs("u-1", &[User]));
        match ledger_units(&split) {
            Err(ApplyError::Invariant(m)) => assert!(m.contains("not consecutive"), "{m}"),
            _ => panic!("accepted"),
        }
    }
}
