//! The effective-dated registry: every version of every entity, and which
//! one was in force at a moment. Pure.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::event::{AccountKind, Entity, EntityKind};

/// Something effective-dated: in force from `effective_from`, ties broken
/// by the order it was applied in.
pub trait Dated {
    fn effective_from(&self) -> DateTime<Utc>;
    fn applied_seq(&self) -> i64;
}

/// Insert `v` into `list`, kept ordered by (effective_from, applied seq).
pub fn insert_dated<T: Dated>(list: &mut Vec<T>, v: T) {
    let key = (v.effective_from(), v.applied_seq());
    let at = list.partition_point(|x| (x.effective_from(), x.applied_seq()) <= key);
    list.insert(at, v);
}

/// The version in force at `t` in an ordered `list`: the latest
/// `effective_from` not after `t`, the later applied of equal ones. The one
/// rule the fold (pricing, limits) and admission share.
pub fn in_force<T: Dated>(list: &[T], t: DateTime<Utc>) -> Option<&T> {
    let n = list.partition_point(|x| x.effective_from() <= t);
    n.checked_sub(1).map(|i| &list[i])
}

/// Admission's view keeps versions as (effective_from, applied seq, state).
impl<T> Dated for (DateTime<Utc>, i64, T) {
    fn effective_from(&self) -> DateTime<Utc> {
        self.0
    }
    fn applied_seq(&self) -> i64 {
        self.1
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Version {
    pub effective_from: DateTime<Utc>,
    /// Applied order; breaks ties between versions with one `effective_from`.
    pub seq: i64,
    pub event_id: String,
    pub entity: Entity,
}

impl Dated for Version {
    fn effective_from(&self) -> DateTime<Utc> {
        self.effective_from
    }
    fn applied_seq(&self) -> i64 {
        self.seq
    }
}

#[derive(Clone, Debug, Default)]
pub struct Registry {
    versions: HashMap<(EntityKind, String), Vec<Version>>,
}

impl Registry {
    pub fn insert(&mut self, kind: EntityKind, id: &str, v: Version) {
        insert_dated(self.versions.entry((kind, id.to_string())).or_default(), v);
    }

    /// The version in force at `t`: the latest `effective_from` not after it.
    pub fn at(&self, kind: EntityKind, id: &str, t: DateTime<Utc>) -> Option<&Version> {
        in_force(self.versions.get(&(kind, id.to_string()))?, t)
    }

    pub fn known(&self, kind: EntityKind, id: &str) -> bool {
        self.versions.contains_key(&(kind, id.to_string()))
    }

    pub fn versions(&self, kind: EntityKind, id: &str) -> &[Version] {
        self.versions
            .get(&(kind, id.to_string()))
            .map_or(&[], Vec::as_slice)
    }

    /// Whether an account's usage moves its balance at `t`. A user is always
    /// limited. An account with no version in force yet counts as limited:
    /// charging a spending limit that later turns out unlimited is visible
    /// and reconcilable; letting usage through uncounted is not.
    pub fn limited_at(&self, kind: AccountKind, id: &str, t: DateTime<Utc>) -> bool {
        if kind == AccountKind::User {
            return true;
        }
        match self
            .at(EntityKind::Account(kind), id, t)
            .and_then(|v| v.entity.quota())
        {
            Some(q) => q.quota_limited,
            None => true,
        }
    }

    pub fn max_seq(&self) -> i64 {
        self.versions
            .values()
            .flatten()
            .map(|v| v.seq)
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Status;
    use chrono::TimeZone;

    fn model(seq: i64, from_h: u32) -> Version {
        Version {
            effective_from: Utc.with_ymd_and_hms(2026, 11, 27, from_h, 0, 0).unwrap(),
            seq,
            event_id: format!("v{seq}"),
            entity: Entity::Model {
                status: Status::Enabled,
                prices: vec![],
            },
        }
    }

    #[test]
    fn version_in_force_is_the_latest_effective_not_after_t() {
        let mut r = Registry::default();
        r.insert(EntityKind::Model, "m", model(2, 12));
        r.insert(EntityKind::Model, "m", model(1, 9));
        r.insert(EntityKind::Model, "m", model(3, 12));
        let t = |h| Utc.with_ymd_and_hms(2026, 11, 27, h, 0, 0).unwrap();
        assert!(r.at(EntityKind::Model, "m", t(8)).is_none());
        assert_eq!(r.at(EntityKind::Model, "m", t(9)).unwrap().event_id, "v1");
        assert_eq!(r.at(EntityKind::Model, "m", t(11)).unwrap().event_id, "v1");
        // Same effective_from: the later applied wins.
        assert_eq!(r.at(EntityKind::Model, "m", t(13)).unwrap().event_id, "v3");
    }
}
