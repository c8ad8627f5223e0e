//! `detect_conflicts`: what a write collided with. The rules are on [`detect_conflicts`] and, for
//! app developers, in `docs/CONFLICTS.md`.

use serde_json::Value;

use crate::diff::{ChangeSet, Stamp};
use crate::events::{ConflictEvent, ConflictRule, ConflictSide, SideOp, EVENT_FORMAT_VERSION};
use crate::path::{dotted, is_prefix, FieldPath};
use crate::value::same_opt;

use super::path_key::{is_prefix_keyed, PathKey};
use super::plan::Named;
use super::sweep::{find, search, Cursor, Entry};

/// The document around a write, over the region that can change visibility (the named paths'
/// top-level subtrees, or the whole document), swept.
pub(super) struct ConflictView<'v, 'a> {
    /// The newest delete, after the write.
    pub deleted_at: Option<&'v Stamp>,
    /// The newest delete or replace, after the write.
    pub cleared_at: Option<&'v Stamp>,
    /// The document's version after the write.
    pub version: u64,
    /// The registers before the write, in path order.
    pub before: &'v [Entry<'a>],
    /// The registers after the write, in path order.
    pub after: &'v [Entry<'a>],
    /// True when the write removes the fields it does not name (a delete or a full set).
    pub implicit: bool,
    /// True when every path the write names got its own register from the write, visible or a
    /// removal (so the write lost nowhere).
    pub all_named_won: bool,
}

/// The newest register on `path`'s chain (ancestors, then descendants) with a stamp above `than`.
fn newer_on_chain<'e, 'a>(
    entries: &'e [Entry<'a>],
    path: &FieldPath,
    than: &Stamp,
) -> Option<&'e Entry<'a>> {
    let key = PathKey::of(path);
    let ancestors = (0..path.len()).filter_map(|i| find(entries, &path[..i]));
    let past = search(entries, key, path).map_or_else(|i| i, |i| i + 1);
    let descendants = entries[past..]
        .iter()
        .take_while(|e| is_prefix_keyed(key, path, e.key, e.path));
    ancestors
        .chain(descendants)
        .filter(|e| *e.stamp > *than)
        .max_by(|a, b| a.stamp.cmp(b.stamp))
}

/// The side the register `r` plays on the conflict's field `path`.
fn register_side(path: &FieldPath, r: &Entry<'_>) -> ConflictSide {
    let op = if r.value.is_some() {
        SideOp::Set
    } else {
        SideOp::Unset
    };
    let mut side = ConflictSide::new(r.stamp, op, r.value.cloned());
    if r.path != path {
        side.via_field = Some(dotted(r.path));
    }
    side
}

/// Writing the same thing is agreement, not a conflict: two removals, or the same value on the
/// same field (a value on an ancestor or descendant field is a different document).
fn agree(a: &ConflictSide, b: &ConflictSide) -> bool {
    match (a.op == SideOp::Set, b.op == SideOp::Set) {
        (false, false) => true,
        (true, true) => same_opt(a.value.as_ref(), b.value.as_ref()) && a.via_field == b.via_field,
        _ => false,
    }
}

/// Conflicts of `change` with what the document held, at most one per field. `touched` is every
/// path the write names, in the order to report them (`change.op` is not read); `side_op` is
/// what the write does to fields it does not name. See `docs/CONFLICTS.md`:
///
/// 1. each field the write names but lost: `lww_timestamp`, against the newest write that beat
///    it (on the field, an ancestor or descendant, or by deleting/replacing the document);
/// 2. each visible field the write replaced or removed (by naming it, an ancestor or descendant,
///    or by deleting/replacing the document) whose value came from another device's write that
///    the writer had not seen (`base_version` below that write's version): `stale_base_version`;
/// 3. each visible field a delete or full set did not name and could not remove because it is
///    newer: `lww_timestamp`.
pub(super) fn detect_conflicts<'c>(
    view: &ConflictView<'_, '_>,
    change: &'c ChangeSet,
    side_op: SideOp,
    touched: impl Iterator<Item = Named<'c>> + Clone,
) -> Vec<ConflictEvent> {
    let stamp: &Stamp = &change.stamp;
    let mut out = Vec::new();
    let mut report = |field: &FieldPath, rule, winner: ConflictSide, loser: ConflictSide| {
        // (The same device on both sides: a write of a device forgotten from the document's
        // table, older than its newer one. A device never conflicts with itself.)
        if agree(&winner, &loser) || winner.device_id == loser.device_id {
            return;
        }
        out.push(ConflictEvent {
            v: EVENT_FORMAT_VERSION,
            tenant: change.key.bucket.tenant.clone(),
            bucket: change.key.bucket.bucket.clone(),
            doc_id: change.key.doc_id.clone(),
            field: dotted(field),
            rule,
            winner,
            loser,
            detected_at_event: stamp.event_id.clone(),
            version: view.version,
        });
    };
    // The side a document-level stamp (delete or replace) plays on a field.
    let doc_side = |s: &Stamp| {
        let op = if view.deleted_at == Some(s) {
            SideOp::Delete
        } else {
            SideOp::Unset
        };
        ConflictSide::new(s, op, None)
    };
    let incoming_side = |path: &FieldPath, value: Option<&Value>, at: &FieldPath| {
        let op = if value.is_some() {
            SideOp::Set
        } else {
            SideOp::Unset
        };
        let mut side = ConflictSide::new(stamp, op, value.cloned());
        if at != path {
            side.via_field = Some(dotted(at));
        }
        side
    };

    // 1. Named fields the write lost. Usually there is none: every named path has its own
    // register from this write, visible (or a removal).
    for (path, value) in touched.clone().filter(|_| !view.all_named_won) {
        let now = find(view.after, path);
        let ours = now.filter(|e| *e.stamp == *stamp);
        if ours.is_some_and(|e| value.is_none() || !e.hidden) {
            continue;
        }
        let hidden_by = newer_on_chain(view.after, path, stamp);
        let at_path = now.filter(|e| *e.stamp > *stamp);
        let by_register = [at_path, hidden_by]
            .into_iter()
            .flatten()
            .max_by(|a, b| a.stamp.cmp(b.stamp));
        let by_doc = view.cleared_at.filter(|c| *c > stamp);
        let winner = match (by_register, by_doc) {
            (Some(r), Some(c)) if *c > *r.stamp => doc_side(c),
            (Some(r), _) => register_side(path, r),
            (None, Some(c)) => doc_side(c),
            (None, None) => continue,
        };
        report(
            path,
            ConflictRule::LwwTimestamp,
            winner,
            incoming_side(path, value, path),
        );
    }

    // 2. Visible fields the write replaced or removed without having seen them.
    let mut after = Cursor::new(view.after);
    let visible_before = view.before.iter().filter(|e| e.visible);
    for prev in visible_before.filter(|_| change.base_version.is_some()) {
        let path = prev.path;
        let unseen = change
            .base_version
            .is_some_and(|b| b < prev.changed_version)
            && prev.stamp.device_id != stamp.device_id;
        if !unseen || *prev.stamp >= *stamp {
            continue;
        }
        let now = after.find(prev.key, path);
        let replaced = !now.is_some_and(|e| e.visible) || now.is_some_and(|e| *e.stamp == *stamp);
        if !replaced {
            continue;
        }
        let via = touched
            .clone()
            .filter(|(p, _)| is_prefix(p, path) || is_prefix(path, p))
            .min_by(|a, b| a.0.cmp(b.0));
        let winner = match via {
            Some((at, value)) => incoming_side(path, value, at),
            None => ConflictSide::new(stamp, side_op, None),
        };
        report(
            path,
            ConflictRule::StaleBaseVersion,
            winner,
            register_side(path, prev),
        );
    }

    // 3. Fields a delete or a full-document set could not remove implicitly.
    if view.implicit {
        let mut after = Cursor::new(view.after);
        for prev in view.before.iter().filter(|e| e.visible) {
            let path = prev.path;
            let Some(now) = after.find(prev.key, path).filter(|e| *e.stamp > *stamp) else {
                continue;
            };
            let named = touched
                .clone()
                .any(|(n, _)| is_prefix(n, path) || is_prefix(path, n));
            if !named && now.visible {
                let winner = register_side(path, now);
                let loser = ConflictSide::new(stamp, side_op, None);
                report(path, ConflictRule::LwwTimestamp, winner, loser);
            }
        }
    }
    out
}
