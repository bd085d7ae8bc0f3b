//! A registry upsert (model, group, key, app, user, reseller, service): a
//! new effective-dated version. An account's first version marks its
//! ledger registered; usage before it was already charged.

use super::{Cx, NewVersion, Outcome};
use crate::event::{AccountRef, EntityKind, Upsert};
use crate::ledger::registry::Version;

pub(super) fn apply(cx: &mut Cx, up: &Upsert) -> Outcome {
    *cx.next_seq += 1;
    cx.state.registry.insert(
        up.kind,
        &up.id,
        Version {
            effective_from: up.effective_from,
            seq: *cx.next_seq,
            event_id: cx.ev.event_id.clone(),
            entity: up.entity.clone(),
        },
    );
    if let EntityKind::Account(kind) = up.kind {
        let acct = cx.account(&AccountRef::new(kind, &up.id));
        if !acct.registered {
            acct.registered = true;
            acct.dirty = true;
        }
        // The warning settings of the latest version applied; changing
        // them fires nothing by itself.
        if let Some(q) = up.entity.quota() {
            let (t, s) = (q.warning_threshold, q.expire_warning_secs);
            if (acct.watch.threshold, acct.watch.expire_warning_secs) != (t, s) {
                acct.watch.threshold = t;
                acct.watch.expire_warning_secs = s;
                acct.dirty = true;
            }
        }
    }
    cx.fx.versions.push(NewVersion {
        kind: up.kind,
        id: up.id.clone(),
        effective_from: up.effective_from,
        event_id: cx.ev.event_id.clone(),
        canonical: cx.ev.canonical.clone(),
    });
    Outcome::Applied
}
