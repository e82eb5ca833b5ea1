//! Storage tests: three replicas exchanging changes directly (no HTTP, no packets).

use super::builtin_record_types;
use super::store::*;
use multisite_core::packet::change::{FieldValue, ItemKind};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub(super) struct TempDir(PathBuf);

impl TempDir {
    pub(super) fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "multisite-store-{}-{}-{}",
            name,
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) fn init(dir: &TempDir, replica: &str) -> Store {
    Store::init(
        &dir.0,
        &InitParams {
            family: "sampl".into(),
            replica: replica.into(),
            id_prefix: "SAMPL".into(),
            feature_level: 7,
            metaschema: 22,
            record_types: builtin_record_types(),
        },
    )
    .unwrap()
}

fn s(text: &str) -> FieldValue {
    FieldValue::String(text.into())
}

fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, FieldValue> {
    pairs.iter().map(|(k, v)| (k.to_string(), s(v))).collect()
}

/// Sends from `a` to `b` what `b` lacks, and records `b`'s acknowledgement.
fn push(a: &mut Store, b: &mut Store) -> ImportOutcome {
    let peer = b.identity().replica.clone();
    let changes = a.changes_for(&peer).unwrap();
    let outcome = b.import(&changes).unwrap();
    let inc = b.identity().incarnation;
    a.record_acknowledgement(&peer, inc, &b.epochs().unwrap())
        .unwrap();
    a.confirm_member(&peer).unwrap();
    outcome
}

/// A three-replica family: paris and austin are cloned from tokyo.
fn family(dirs: &[TempDir; 3]) -> Vec<Store> {
    let mut a = init(&dirs[0], "tokyo");
    let mut b = clone_of(&mut a, &dirs[1], "paris");
    let mut c = clone_of(&mut a, &dirs[2], "austin");
    // paris learns that austin joined; everybody then holds the same changes.
    push(&mut a, &mut b);
    push(&mut a, &mut c);
    vec![a, b, c]
}

fn clone_of(source: &mut Store, dir: &TempDir, name: &str) -> Store {
    std::fs::create_dir_all(&dir.0).unwrap();
    let tag = source
        .snapshot_for_clone(name, &dir.0.join(DB_FILE))
        .unwrap();
    let from = source.identity().replica.clone();
    Store::adopt_clone(&dir.0.join(DB_FILE), name, &tag, &from).unwrap()
}

#[test]
fn a_clone_gets_its_own_tag_and_the_source_knows_what_it_holds() {
    let dirs = [TempDir::new("a"), TempDir::new("b"), TempDir::new("c")];
    let mut stores = family(&dirs);
    let digests: Vec<String> = stores.iter().map(|s| s.digest().unwrap().0).collect();
    assert!(
        digests.iter().all(|d| *d == digests[0]),
        "clones start equal"
    );
    assert_eq!(stores[1].identity().id_tag, "B");
    assert_eq!(stores[2].identity().id_tag, "C");
    let r = stores[1]
        .create_item(ItemKind::Record, "Defect", fields(&[]), None)
        .unwrap();
    assert_eq!(r.id, "SAMPL00001B");
    assert!(stores[0].changes_for("paris").unwrap().is_empty());
    let err = stores[0]
        .snapshot_for_clone("paris", &dirs[1].0.join("again.db"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("already a member"), "{err}");
}

#[test]
fn ids_are_short_and_never_collide_across_tags() {
    assert_eq!(child_id_tag("", 0), "B");
    assert_eq!(child_id_tag("", 24), "Z");
    assert_eq!(child_id_tag("", 25), "AB");
    assert_eq!(child_id_tag("B", 0), "BB");
    let mut seen = std::collections::HashSet::new();
    // Three generations of 60 children each: all distinct, none ends in A.
    let mut frontier = vec![String::new()];
    for _ in 0..3 {
        let mut next = Vec::new();
        for parent in frontier.iter().take(5) {
            for i in 0..60 {
                let tag = child_id_tag(parent, i);
                assert!(!tag.ends_with('A'));
                assert!(seen.insert(tag.clone()), "duplicate tag {tag}");
                next.push(tag);
            }
        }
        frontier = next;
    }
}

#[test]
fn local_changes_and_their_log_entries_commit_together() {
    let dir = TempDir::new("local");
    let mut a = init(&dir, "tokyo");
    let rec = a
        .create_item(
            ItemKind::Record,
            "Defect",
            fields(&[("headline", "crash"), ("state", "open")]),
            None,
        )
        .unwrap();
    assert_eq!(rec.id, "SAMPL00001");
    assert_eq!(rec.master, "tokyo");
    let rec2 = a
        .create_item(
            ItemKind::Record,
            "Defect",
            fields(&[("headline", "slow")]),
            None,
        )
        .unwrap();
    assert_eq!(rec2.id, "SAMPL00002");
    let before = a.epochs().unwrap()["tokyo"];
    let updated = a
        .update_item(
            ItemKind::Record,
            &rec.id,
            [("state".to_string(), Some(s("closed")))].into(),
        )
        .unwrap();
    assert_eq!(updated.version, 2);
    assert_eq!(a.epochs().unwrap()["tokyo"], before + 1);
    let history = a.history(ItemKind::Record, &rec.id).unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[1].state.fields["state"], s("closed"));
    let open = a
        .query(
            ItemKind::Record,
            Some("Defect"),
            &[("state".into(), s("closed"))],
        )
        .unwrap();
    assert_eq!(
        open.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["SAMPL00001"]
    );
    let err = a
        .create_item(
            ItemKind::Record,
            "Defect",
            fields(&[("colour", "red")]),
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("no field \"colour\""), "{err}");
    let err = a
        .create_item(ItemKind::Record, "Bug", fields(&[]), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Defect"), "{err}");
    // Reopening sees the same state.
    drop(a);
    let a = Store::open(&dir.0).unwrap();
    assert_eq!(
        a.get_item(ItemKind::Record, &rec.id)
            .unwrap()
            .unwrap()
            .version,
        2
    );
}

#[test]
fn three_replicas_converge_and_only_masters_change_items() {
    let dirs = [TempDir::new("a"), TempDir::new("b"), TempDir::new("c")];
    let mut stores = family(&dirs);
    let [a, b, c] = &mut stores[..] else {
        panic!("a family of three")
    };
    let r1 = a
        .create_item(
            ItemKind::Record,
            "Defect",
            fields(&[("headline", "one")]),
            None,
        )
        .unwrap();
    push(a, b);
    push(a, c);
    // A remote master refuses, naming the master.
    let err = b
        .update_item(
            ItemKind::Record,
            &r1.id,
            [("state".to_string(), Some(s("x")))].into(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("mastered at replica tokyo"), "{err}");
    // Move mastership to paris: tokyo refuses at once, paris only after importing.
    a.move_mastership(ItemKind::Record, &r1.id, "paris")
        .unwrap();
    assert!(
        a.update_item(ItemKind::Record, &r1.id, BTreeMap::new())
            .is_err()
    );
    assert!(
        b.update_item(ItemKind::Record, &r1.id, BTreeMap::new())
            .is_err()
    );
    push(a, b);
    b.update_item(
        ItemKind::Record,
        &r1.id,
        [("state".to_string(), Some(s("fixed")))].into(),
    )
    .unwrap();
    // c hears of it through b only: b forwards tokyo's move before its own change.
    c.create_item(
        ItemKind::Record,
        "Defect",
        fields(&[("headline", "from austin")]),
        None,
    )
    .unwrap();
    push(b, c);
    push(c, a);
    push(c, b);
    push(a, b);
    push(b, a);
    let digests: Vec<String> = [&*a, &*b, &*c]
        .iter()
        .map(|s| s.digest().unwrap().0)
        .collect();
    assert_eq!(digests[0], digests[1]);
    assert_eq!(digests[1], digests[2]);
    let at_c = c.get_item(ItemKind::Record, &r1.id).unwrap().unwrap();
    assert_eq!(at_c.master, "paris");
    assert_eq!(at_c.fields["state"], s("fixed"));
}

#[test]
fn imports_are_idempotent_and_gaps_are_held() {
    let dirs = [TempDir::new("a"), TempDir::new("b"), TempDir::new("c")];
    let mut stores = family(&dirs);
    let [a, b, _] = &mut stores[..] else {
        panic!("a family of three")
    };
    for i in 0..5 {
        a.create_item(
            ItemKind::Record,
            "Defect",
            fields(&[("headline", &format!("r{i}"))]),
            None,
        )
        .unwrap();
    }
    let changes = a.changes_for("paris").unwrap();
    assert_eq!(changes.len(), 5);
    // The last three first: a gap, nothing applied.
    let outcome = b.import(&changes[2..]).unwrap();
    assert_eq!(outcome.applied, 0);
    assert!(
        outcome.blocked.as_deref().unwrap_or("").contains("gap"),
        "{outcome:?}"
    );
    // The first two, then all five again: each change applied exactly once.
    assert_eq!(b.import(&changes[..2]).unwrap().applied, 2);
    let again = b.import(&changes).unwrap();
    assert_eq!(
        (again.applied, again.skipped, again.blocked.clone()),
        (3, 2, None)
    );
    assert_eq!(b.import(&changes).unwrap().skipped, 5);
    assert_eq!(b.query(ItemKind::Record, None, &[]).unwrap().len(), 5);
}

#[test]
fn the_log_is_trimmed_only_past_what_every_peer_acknowledged() {
    let dirs = [TempDir::new("a"), TempDir::new("b"), TempDir::new("c")];
    let mut stores = family(&dirs);
    let [a, b, c] = &mut stores[..] else {
        panic!("a family of three")
    };
    for _ in 0..3 {
        a.create_item(ItemKind::Record, "Defect", fields(&[]), None)
            .unwrap();
    }
    let full = a.change_log_len().unwrap();
    push(a, b);
    push(a, c);
    assert_eq!(
        a.change_log_len().unwrap(),
        full,
        "acknowledged changes stay for the retention time"
    );
    a.set_log_retention(0).unwrap();
    push(a, b);
    for _ in 0..3 {
        a.create_item(ItemKind::Record, "Defect", fields(&[]), None)
            .unwrap();
    }
    let full = a.change_log_len().unwrap();
    assert!(full >= 3);
    // Only paris acknowledges: nothing goes.
    push(a, b);
    assert_eq!(
        a.change_log_len().unwrap(),
        full,
        "austin has not acknowledged yet"
    );
    push(a, c);
    assert!(a.change_log_len().unwrap() < full);
    assert!(a.changes_for("paris").unwrap().is_empty());
    // A peer whose acknowledgement goes back (restored from a backup) past the
    // trimmed log cannot be served from it, and is told so.
    let epochs: std::collections::BTreeMap<String, u64> = b
        .epochs()
        .unwrap()
        .into_iter()
        .map(|(o, s)| (o, s.saturating_sub(2)))
        .collect();
    a.record_acknowledgement("paris", 2, &epochs).unwrap();
    let err = a.changes_for("paris").unwrap_err().to_string();
    assert!(err.contains("re-create paris"), "{err}");
}

#[test]
fn a_change_needing_a_newer_schema_is_held_until_the_upgrade() {
    let dirs = [TempDir::new("a"), TempDir::new("b"), TempDir::new("c")];
    let mut stores = family(&dirs);
    let [a, b, _] = &mut stores[..] else {
        panic!("a family of three")
    };
    let mut types = builtin_record_types();
    types.push(multisite_core::packet::change::RecordTypeDef {
        name: "ChangeEvent".into(),
        fields: vec![multisite_core::packet::change::FieldDef {
            name: "record".into(),
            field_type: "String".into(),
        }],
    });
    a.add_schema_version(Some("Interop 1.0".into()), types)
        .unwrap();
    a.upgrade_user_database_schema(2).unwrap();
    a.create_item(
        ItemKind::Record,
        "ChangeEvent",
        fields(&[("record", "SAMPL00001")]),
        None,
    )
    .unwrap();
    let changes = a.changes_for("paris").unwrap();
    let outcome = b.import(&changes).unwrap();
    assert_eq!(outcome.applied, 1, "the schema version itself imports");
    assert!(outcome.blocked.unwrap().contains("schema version 2"));
    b.upgrade_user_database_schema(2).unwrap();
    let outcome = b.import(&changes).unwrap();
    assert_eq!((outcome.applied, outcome.skipped), (1, 1));
}

#[test]
fn two_states_of_one_version_settle_the_same_way_everywhere() {
    let dirs = [TempDir::new("a"), TempDir::new("b"), TempDir::new("c")];
    let mut stores = family(&dirs);
    let [a, b, c] = &mut stores[..] else {
        panic!("a family of three")
    };
    // The same user name made at two replicas at once: one version, two states.
    a.create_item(ItemKind::User, "user", BTreeMap::new(), Some("alice"))
        .unwrap();
    b.create_item(ItemKind::User, "user", BTreeMap::new(), Some("alice"))
        .unwrap();
    // c hears from b first, a from b later: arrival order differs, the outcome does not.
    push(b, c);
    push(a, c);
    push(a, b);
    push(b, a);
    push(c, a);
    push(c, b);
    let masters: Vec<String> = [&*a, &*b, &*c]
        .iter()
        .map(|s| s.get_item(ItemKind::User, "alice").unwrap().unwrap().master)
        .collect();
    assert!(masters.iter().all(|m| *m == masters[0]), "{masters:?}");
    let digests: Vec<String> = [&*a, &*b, &*c]
        .iter()
        .map(|s| s.digest().unwrap().0)
        .collect();
    assert!(digests.iter().all(|d| *d == digests[0]));
}

/// A change may carry a mastership move (a mastership field set in an ordinary action):
/// the master changes the item and hands it over in one change set, so the new master
/// receives both together and the old one refuses further changes at once. A user's
/// record carries their workspace items along, as a move alone does.
#[test]
fn a_change_carries_the_mastership_move_in_one_change_set() {
    let to = |replica| ItemChange {
        move_to: Some(replica),
        ..ItemChange::default()
    };
    let dirs = [TempDir::new("a"), TempDir::new("b"), TempDir::new("c")];
    let mut stores = family(&dirs);
    let [a, b, _] = &mut stores[..] else {
        panic!("a family of three")
    };
    let r1 = a
        .create_item(
            ItemKind::Record,
            "Defect",
            fields(&[("headline", "one")]),
            None,
        )
        .unwrap();
    push(a, b);
    // Not at a remote master, nor to the master itself, nor to an unknown replica.
    let state = |v: &str| -> BTreeMap<String, Option<FieldValue>> {
        [("state".to_string(), Some(s(v)))].into()
    };
    let err = b
        .change_item(ItemKind::Record, &r1.id, state("x"), to("austin"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("mastered at replica tokyo"), "{err}");
    assert!(
        a.change_item(ItemKind::Record, &r1.id, state("x"), to("tokyo"))
            .is_err()
    );
    assert!(
        a.change_item(ItemKind::Record, &r1.id, state("x"), to("nowhere"))
            .is_err()
    );
    let before = a.get_item(ItemKind::Record, &r1.id).unwrap().unwrap();
    let moved = a
        .change_item(ItemKind::Record, &r1.id, state("assigned"), to("paris"))
        .unwrap();
    assert_eq!(moved.master, "paris");
    assert_eq!(moved.version, before.version + 1, "one change, one version");
    assert!(
        a.update_item(ItemKind::Record, &r1.id, state("y")).is_err(),
        "the old master refuses at once"
    );
    push(a, b);
    let at_b = b.get_item(ItemKind::Record, &r1.id).unwrap().unwrap();
    assert_eq!(
        (at_b.master.as_str(), at_b.fields.get("state")),
        ("paris", Some(&s("assigned")))
    );
    b.update_item(ItemKind::Record, &r1.id, state("fixed"))
        .unwrap();

    // A user's record moved through a change takes their workspace items with it.
    a.create_item(ItemKind::User, "user", BTreeMap::new(), Some("alice"))
        .unwrap();
    let query = a
        .create_item(
            ItemKind::WorkspaceItem,
            "query",
            fields(&[("name", "mine")]),
            Some("alice"),
        )
        .unwrap();
    a.change_item(
        ItemKind::User,
        "alice",
        [("email".to_string(), Some(s("alice@example")))].into(),
        to("paris"),
    )
    .unwrap();
    let query_at_a = a
        .get_item(ItemKind::WorkspaceItem, &query.id)
        .unwrap()
        .unwrap();
    assert_eq!(query_at_a.master, "paris");
    push(a, b);
    b.update_item(ItemKind::WorkspaceItem, &query.id, state("shared"))
        .unwrap();
}
