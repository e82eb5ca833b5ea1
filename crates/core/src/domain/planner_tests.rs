//! Tests of the planner: tables of known fleets, and properties over random fleets
//! checked by an independent replay of each plan and an exhaustive search.

use super::*;
use proptest::prelude::*;
use std::collections::{HashSet, VecDeque};

fn compat() -> Compatibility {
    Compatibility::builtin()
}

fn replica(name: &str, site: &str, sr: i32, udb: i32) -> ReplicaObserved {
    ReplicaObserved {
        name: name.into(),
        site: site.into(),
        pair: Some(FlPair::new(sr, udb)),
        reachable: true,
    }
}

fn tier(name: &str, release: &str) -> TierSpec {
    TierSpec {
        name: name.into(),
        release: release.into(),
        site: None,
    }
}

fn seen(name: &str, release: &str) -> TierObserved {
    TierObserved {
        name: name.into(),
        release: Some(release.into()),
        ready: true,
    }
}

fn spec(target: i32, strategy: UpgradeStrategy, one_way: bool, tiers: Vec<TierSpec>) -> FleetSpec {
    FleetSpec {
        target,
        strategy,
        allow_unidirectional: one_way,
        tiers,
    }
}

fn three_sites(sr: i32, udb: i32) -> Vec<ReplicaObserved> {
    vec![
        replica("tokyo", "tokyo", sr, udb),
        replica("paris", "paris", sr, udb),
        replica("austin", "austin", sr, udb),
    ]
}

fn names(plan: &Plan) -> Vec<String> {
    plan.steps.iter().map(|s| s.to_string()).collect()
}

#[test]
fn staged_six_to_eight_orders_clients_then_repositories_then_databases() {
    let s = spec(
        8,
        UpgradeStrategy::Staged,
        true,
        vec![tier("web", "8.0.1.1")],
    );
    let o = FleetObserved {
        tiers: vec![seen("web", "7.0.1.0")],
        replicas: three_sites(6, 6),
    };
    let plan = plan(&compat(), &s, &o).unwrap();
    assert_eq!(
        names(&plan),
        [
            "upgrade client tier web to release 8.0.1.1",
            "raise the schema repository of tokyo to FL 7",
            "raise the schema repository of paris to FL 7",
            "raise the schema repository of austin to FL 7",
            "raise the user database of tokyo to FL 7",
            "raise the user database of paris to FL 7",
            "raise the user database of austin to FL 7",
            "raise the schema repository of tokyo to FL 8",
            "raise the user database of tokyo to FL 8",
            "raise the schema repository of paris to FL 8",
            "raise the user database of paris to FL 8",
            "raise the schema repository of austin to FL 8",
            "raise the user database of austin to FL 8",
        ]
    );
}

#[test]
fn staged_cross_site_upgrade_without_one_way_flag_is_refused_naming_the_ways_forward() {
    let s = spec(
        8,
        UpgradeStrategy::Staged,
        false,
        vec![tier("web", "8.0.1.1")],
    );
    let o = FleetObserved {
        tiers: vec![seen("web", "8.0.1.1")],
        replicas: three_sites(7, 7),
    };
    let refusal = plan(&compat(), &s, &o).unwrap_err();
    assert_eq!(refusal.kind, RefusalKind::Replication);
    assert!(refusal.reason.contains("AllAtOnce"), "{}", refusal.reason);
    assert!(
        refusal.reason.contains("allowUnidirectionalReplication"),
        "{}",
        refusal.reason
    );
    assert!(
        refusal.reason.contains("does not accept"),
        "{}",
        refusal.reason
    );
}

/// A family already in the seed's bad state (a user database at FL 5 under a schema
/// repository at FL 7, another replica at (6,6): packets no longer flow one way) is
/// refused for a staged upgrade; the refusal never asks for the one-way flag that is
/// already set, only for the way not taken.
#[test]
fn a_broken_family_is_refused_naming_only_the_way_not_taken() {
    let o = FleetObserved {
        tiers: vec![],
        replicas: vec![
            replica("tokyo", "tokyo", 7, 5),
            replica("paris", "paris", 6, 6),
        ],
    };
    for one_way in [true, false] {
        let s = spec(7, UpgradeStrategy::Staged, one_way, vec![]);
        let refusal = plan(&compat(), &s, &o).unwrap_err();
        assert_eq!(refusal.kind, RefusalKind::Replication);
        assert!(
            refusal.reason.contains("already broken"),
            "{}",
            refusal.reason
        );
        assert!(refusal.reason.contains("AllAtOnce"), "{}", refusal.reason);
        assert_eq!(
            refusal
                .reason
                .contains("allowUnidirectionalReplication: true"),
            !one_way,
            "{}",
            refusal.reason
        );
    }
}

#[test]
fn all_at_once_pauses_sync_around_every_raise() {
    let s = spec(8, UpgradeStrategy::AllAtOnce, false, vec![]);
    let o = FleetObserved {
        tiers: vec![],
        replicas: vec![replica("a", "x", 7, 7), replica("b", "y", 7, 7)],
    };
    let plan = plan(&compat(), &s, &o).unwrap();
    assert_eq!(
        plan.steps,
        vec![
            Step::PauseSync,
            raise_sr("a", 8),
            raise_udb("a", 8),
            raise_sr("b", 8),
            raise_udb("b", 8),
            Step::ResumeSync,
        ]
    );
}

#[test]
fn a_single_replica_can_be_staged_without_the_flag() {
    let s = spec(7, UpgradeStrategy::Staged, false, vec![]);
    let o = FleetObserved {
        tiers: vec![],
        replicas: vec![replica("only", "x", 5, 5)],
    };
    let plan = plan(&compat(), &s, &o).unwrap();
    assert_eq!(plan.steps, vec![raise_sr("only", 7), raise_udb("only", 7)]);
}

#[test]
fn mixed_levels_are_ordered_so_packets_keep_flowing_upward() {
    // (5,5) must not reach (7,5) while the other is still at (6,6): (7,5) creates 9,
    // which (6,6) does not accept, and (7,5) has the lower user database.
    let s = spec(7, UpgradeStrategy::Staged, true, vec![]);
    let o = FleetObserved {
        tiers: vec![],
        replicas: vec![replica("low", "x", 5, 5), replica("mid", "y", 6, 6)],
    };
    let plan = plan(&compat(), &s, &o).unwrap();
    assert_eq!(
        plan.steps,
        vec![
            raise_sr("mid", 7),
            raise_sr("low", 7),
            raise_udb("low", 7),
            raise_udb("mid", 7),
        ]
    );
}

#[test]
fn an_old_client_release_blocks_the_raise() {
    let s = spec(
        8,
        UpgradeStrategy::Staged,
        true,
        vec![tier("desk", "7.1.2")],
    );
    let o = FleetObserved {
        tiers: vec![seen("desk", "7.1.2")],
        replicas: three_sites(7, 7),
    };
    let refusal = plan(&compat(), &s, &o).unwrap_err();
    assert_eq!(refusal.kind, RefusalKind::ClientRelease);
    assert!(refusal.reason.contains("desk"), "{}", refusal.reason);
    assert!(refusal.reason.contains("8.0.1.1"), "{}", refusal.reason);
}

#[test]
fn a_client_downgrade_below_the_current_level_is_refused() {
    // 7.0.1.0 supports FL 6 but the replicas are at 7 already.
    let s = spec(
        7,
        UpgradeStrategy::Staged,
        true,
        vec![tier("web", "7.0.1.0")],
    );
    let o = FleetObserved {
        tiers: vec![seen("web", "8.0.1.1")],
        replicas: three_sites(7, 7),
    };
    let refusal = plan(&compat(), &s, &o).unwrap_err();
    assert_eq!(refusal.kind, RefusalKind::ClientRelease);
}

#[test]
fn a_tier_opens_only_its_site() {
    // The old tier at paris does not block the raise of ... nothing: it opens paris,
    // which must be raised, so the plan is refused; the same tier at a site without
    // replicas blocks nothing.
    let mut desk = tier("desk", "8.0.1.1");
    desk.site = Some("nowhere".into());
    let s = spec(8, UpgradeStrategy::AllAtOnce, false, vec![desk]);
    let o = FleetObserved {
        tiers: vec![seen("desk", "7.1.2")],
        replicas: three_sites(7, 7),
    };
    let plan = plan(&compat(), &s, &o).unwrap();
    assert_eq!(
        plan.steps[0],
        Step::UpgradeClients {
            tier: "desk".into(),
            release: "8.0.1.1".into()
        }
    );
}

#[test]
fn an_unready_tier_is_rolled_out_again() {
    let s = spec(
        7,
        UpgradeStrategy::Staged,
        true,
        vec![tier("web", "8.0.1.1")],
    );
    let mut t = seen("web", "8.0.1.1");
    t.ready = false;
    let o = FleetObserved {
        tiers: vec![t],
        replicas: three_sites(7, 7),
    };
    let plan = plan(&compat(), &s, &o).unwrap();
    assert_eq!(
        plan.steps,
        vec![Step::UpgradeClients {
            tier: "web".into(),
            release: "8.0.1.1".into()
        }]
    );
}

#[test]
fn nothing_to_do_is_an_empty_plan() {
    let s = spec(
        7,
        UpgradeStrategy::Staged,
        false,
        vec![tier("web", "8.0.1.1")],
    );
    let o = FleetObserved {
        tiers: vec![seen("web", "8.0.1.1")],
        replicas: three_sites(7, 7),
    };
    assert!(plan(&compat(), &s, &o).unwrap().steps.is_empty());
}

#[test]
fn refusals_for_bad_observations() {
    let c = compat();
    let s = spec(7, UpgradeStrategy::Staged, true, vec![]);
    let table: Vec<(Vec<ReplicaObserved>, RefusalKind, &str)> = vec![
        (
            vec![replica("hi", "x", 8, 8)],
            RefusalKind::WouldLower,
            "never go down",
        ),
        (
            vec![replica("odd", "x", 6, 7)],
            RefusalKind::ReplicaState,
            "above its schema repository",
        ),
        (
            vec![ReplicaObserved {
                pair: None,
                ..replica("new", "x", 5, 5)
            }],
            RefusalKind::ReplicaState,
            "has not reported",
        ),
        (
            vec![ReplicaObserved {
                reachable: false,
                ..replica("gone", "x", 6, 6)
            }],
            RefusalKind::Unreachable,
            "cannot be reached",
        ),
    ];
    for (replicas, kind, needle) in table {
        let o = FleetObserved {
            tiers: vec![],
            replicas,
        };
        let r = plan(&c, &s, &o).unwrap_err();
        assert_eq!(r.kind, kind, "{}", r.reason);
        assert!(r.reason.contains(needle), "{}", r.reason);
    }
    let upside_down = FleetObserved {
        tiers: vec![],
        replicas: vec![replica("odd", "x", 5, 6)],
    };
    let r = plan(
        &c,
        &spec(7, UpgradeStrategy::Staged, true, vec![]),
        &upside_down,
    )
    .unwrap_err();
    assert_eq!(r.kind, RefusalKind::ReplicaState);
    let r = plan(
        &c,
        &spec(9, UpgradeStrategy::Staged, true, vec![]),
        &upside_down,
    )
    .unwrap_err();
    assert_eq!(r.kind, RefusalKind::UnknownTarget);
    let unknown = spec(7, UpgradeStrategy::Staged, true, vec![tier("web", "6.1")]);
    let r = plan(&c, &unknown, &FleetObserved::default()).unwrap_err();
    assert_eq!(r.kind, RefusalKind::ClientRelease);
    assert!(r.reason.contains("\"6.1\""), "{}", r.reason);
}

#[test]
fn an_interrupted_paired_move_is_completed_first() {
    let s = spec(8, UpgradeStrategy::Staged, true, vec![]);
    let o = FleetObserved {
        tiers: vec![],
        replicas: vec![replica("a", "x", 8, 7), replica("b", "y", 7, 7)],
    };
    let plan = plan(&compat(), &s, &o).unwrap();
    assert_eq!(
        plan.steps,
        vec![raise_udb("a", 8), raise_sr("b", 8), raise_udb("b", 8)]
    );
}

// ---------------------------------------------------------------------------
// Independent replay: the rules written again, plainly, to judge any plan.

fn opens(t: &TierSpec, r: &ReplicaObserved) -> bool {
    t.site.as_ref().is_none_or(|s| s == &r.site)
}

fn clients_ok(
    c: &Compatibility,
    s: &FleetSpec,
    o: &FleetObserved,
    releases: &[Option<String>],
    pairs: &[FlPair],
) -> bool {
    tier_ok(c, s, o, releases, pairs, None)
}

/// The client rule for every tier, or for tier `only`.
fn tier_ok(
    c: &Compatibility,
    s: &FleetSpec,
    o: &FleetObserved,
    releases: &[Option<String>],
    pairs: &[FlPair],
    only: Option<usize>,
) -> bool {
    s.tiers
        .iter()
        .zip(releases)
        .enumerate()
        .filter(|(i, _)| only.is_none_or(|o| o == *i))
        .all(|(_, (t, rel))| {
            let Some(rel) = rel else { return true };
            o.replicas
                .iter()
                .zip(pairs)
                .filter(|(r, _)| opens(t, r))
                .all(|(_, p)| {
                    c.release_supports(rel, p.schema_repository)
                        .unwrap_or(false)
                        && c.release_supports(rel, p.user_database).unwrap_or(false)
                })
        })
}

fn sync_ok(c: &Compatibility, one_way: bool, pairs: &[FlPair], skip: &[usize]) -> bool {
    for (a, pa) in pairs.iter().enumerate() {
        for (b, pb) in pairs.iter().enumerate() {
            if a == b || skip.contains(&a) || skip.contains(&b) {
                continue;
            }
            let flows = c.creates(*pa).is_some_and(|v| c.accepts(*pb).contains(&v));
            let needed = if one_way {
                pa.user_database < pb.user_database
                    || (pa.user_database == pb.user_database
                        && pa.schema_repository <= pb.schema_repository)
            } else {
                true
            };
            if needed && !flows {
                return false;
            }
        }
    }
    true
}

/// Replays `plan` and panics with the first rule it breaks.
fn replay(c: &Compatibility, s: &FleetSpec, o: &FleetObserved, plan: &Plan) {
    let target = FlPair::new(s.target, s.target);
    let mut releases: Vec<Option<String>> = s
        .tiers
        .iter()
        .map(|t| {
            o.tiers
                .iter()
                .find(|x| x.name == t.name)
                .and_then(|x| x.release.clone())
        })
        .collect();
    let mut pairs: Vec<FlPair> = o.replicas.iter().map(|r| r.pair.unwrap()).collect();
    let mut paused = false;
    let mut created: HashSet<i32> = HashSet::new();
    let mut seen_fl_step = false;
    let mut seen_udb_single = false;
    let mut seen_paired = false;
    let mut pending: Option<usize> = pairs.iter().position(|p| !c.is_valid_pair(*p));
    let skip0: Vec<usize> = pairs
        .iter()
        .enumerate()
        .filter(|(_, p)| !c.is_valid_pair(**p))
        .map(|(i, _)| i)
        .collect();
    if !skip0.is_empty() {
        assert_eq!(
            skip0.len(),
            1,
            "test fleets hold at most one interrupted replica"
        );
    }
    if s.strategy == UpgradeStrategy::Staged {
        assert!(
            sync_ok(c, s.allow_unidirectional, &pairs, &skip0)
                || plan
                    .steps
                    .iter()
                    .all(|st| matches!(st, Step::UpgradeClients { .. }))
        );
        for p in &pairs {
            if let Some(v) = c.creates(*p) {
                created.insert(v);
            }
        }
    }
    let mut i = 0;
    while i < plan.steps.len() {
        let step = &plan.steps[i];
        match step {
            Step::UpgradeClients { tier, release } => {
                assert!(
                    !seen_fl_step && !paused,
                    "client steps come first: {plan:?}"
                );
                let t = s
                    .tiers
                    .iter()
                    .position(|t| &t.name == tier)
                    .expect("tier exists");
                assert_eq!(&s.tiers[t].release, release);
                releases[t] = Some(release.clone());
                assert!(tier_ok(c, s, o, &releases, &pairs, Some(t)), "after {step}");
            }
            Step::PauseSync => {
                assert_eq!(s.strategy, UpgradeStrategy::AllAtOnce);
                assert!(!paused && !seen_fl_step);
                for p in &pairs {
                    if let Some(v) = c.creates(*p) {
                        created.insert(v);
                    }
                }
                paused = true;
            }
            Step::ResumeSync => {
                assert!(paused);
                paused = false;
                assert!(
                    sync_ok(c, s.allow_unidirectional, &pairs, &[]),
                    "sync at resume"
                );
            }
            Step::RaiseSchemaRepository {
                replica,
                feature_level,
            }
            | Step::RaiseUserDatabase {
                replica,
                feature_level,
            } => {
                if s.strategy == UpgradeStrategy::AllAtOnce {
                    assert!(paused, "all-at-once raises run with sync paused");
                }
                seen_fl_step = true;
                let r = o
                    .replicas
                    .iter()
                    .position(|x| &x.name == replica)
                    .expect("replica exists");
                assert!(
                    o.replicas[r].reachable,
                    "only reachable replicas are raised"
                );
                let before = pairs[r];
                let is_sr = matches!(step, Step::RaiseSchemaRepository { .. });
                if is_sr {
                    assert!(*feature_level > before.schema_repository, "raise goes up");
                    pairs[r].schema_repository = *feature_level;
                } else {
                    assert!(*feature_level > before.user_database, "raise goes up");
                    assert!(
                        *feature_level <= before.schema_repository,
                        "database not above repository"
                    );
                    pairs[r].user_database = *feature_level;
                }
                assert!(
                    clients_ok(c, s, o, &releases, &pairs),
                    "clients after {step}"
                );
                if !c.is_valid_pair(pairs[r]) {
                    // Only the first half of a paired move may leave an unlisted pair,
                    // and the very next step must be the second half.
                    assert!(is_sr, "{step} leaves an unlisted pair");
                    let next = plan.steps.get(i + 1).expect("paired move completes");
                    match next {
                        Step::RaiseUserDatabase {
                            replica: r2,
                            feature_level: l2,
                        } if r2 == replica => {
                            pairs[r].user_database = *l2;
                        }
                        other => panic!("paired move broken by {other}"),
                    }
                    assert!(
                        c.is_valid_pair(pairs[r]),
                        "paired move ends in a listed pair"
                    );
                    assert!(clients_ok(c, s, o, &releases, &pairs));
                    seen_paired = true;
                    i += 1;
                } else if pending == Some(r) && !is_sr {
                    pending = None;
                } else if s.strategy == UpgradeStrategy::Staged {
                    // Canonical order: repositories, then databases, then paired moves.
                    assert!(!seen_paired, "single step after a paired move: {plan:?}");
                    if is_sr {
                        assert!(
                            !seen_udb_single,
                            "repository step after a database step: {plan:?}"
                        );
                    } else {
                        seen_udb_single = true;
                    }
                }
                assert!(
                    pairs.iter().all(|p| c.is_valid_pair(*p)) || pending.is_some(),
                    "pairs valid after {step}"
                );
                if !paused {
                    let skip: Vec<usize> = pending.into_iter().collect();
                    assert!(
                        sync_ok(c, s.allow_unidirectional, &pairs, &skip),
                        "sync after {step}: {pairs:?}"
                    );
                    for p in &pairs {
                        if let Some(v) = c.creates(*p) {
                            created.insert(v);
                        }
                    }
                }
            }
        }
        i += 1;
    }
    assert!(!paused, "sync resumed at the end");
    assert!(
        pairs.iter().all(|p| *p == target),
        "target reached: {pairs:?}"
    );
    for (t, rel) in s.tiers.iter().zip(&releases) {
        assert_eq!(
            rel.as_deref(),
            Some(t.release.as_str()),
            "tier {} at its release",
            t.name
        );
    }
    for p in &pairs {
        for v in &created {
            assert!(
                c.accepts(*p).contains(v),
                "held packets of version {v} importable at the end"
            );
        }
    }
}

/// Exhaustive search: does any sequence of raises (in any order, any size) reach
/// the target while keeping the rules? Client tiers are rolled out first.
fn some_plan_exists(c: &Compatibility, s: &FleetSpec, o: &FleetObserved) -> bool {
    let target = FlPair::new(s.target, s.target);
    let mut pairs: Vec<FlPair> = match o
        .replicas
        .iter()
        .map(|r| r.pair)
        .collect::<Option<Vec<_>>>()
    {
        Some(p) => p,
        None => return false,
    };
    if pairs.iter().any(|p| {
        p.schema_repository > s.target
            || p.user_database > s.target
            || p.user_database > p.schema_repository
    }) {
        return false;
    }
    if s.tiers.iter().any(|t| c.release_row(&t.release).is_err()) {
        return false;
    }
    let releases: Vec<Option<String>> = s.tiers.iter().map(|t| Some(t.release.clone())).collect();
    if !clients_ok(c, s, o, &releases, &pairs) {
        return false;
    }
    let one_way = s.allow_unidirectional;
    let paused = s.strategy == UpgradeStrategy::AllAtOnce;
    let mut created: u32 = 0;
    let note = |created: &mut u32, pairs: &[FlPair]| {
        for p in pairs {
            if let Some(v) = c.creates(*p) {
                *created |= 1 << v;
            }
        }
    };
    // Interrupted paired moves complete first.
    let skip: Vec<usize> = pairs
        .iter()
        .enumerate()
        .filter(|(_, p)| !c.is_valid_pair(**p))
        .map(|(i, _)| i)
        .collect();
    let needs_fl = pairs.iter().any(|p| *p != target);
    if needs_fl && !paused && !sync_ok(c, one_way, &pairs, &skip) {
        return false;
    }
    if needs_fl {
        note(&mut created, &pairs);
    }
    for &i in &skip {
        if !o.replicas[i].reachable {
            return false;
        }
        let p = pairs[i];
        match (p.user_database + 1..=p.schema_repository)
            .rev()
            .find(|&u| c.is_valid_pair(FlPair::new(p.schema_repository, u)))
        {
            Some(u) => pairs[i].user_database = u,
            None => return false,
        }
        if !clients_ok(c, s, o, &releases, &pairs) {
            return false;
        }
        let rest: Vec<usize> = skip
            .iter()
            .copied()
            .filter(|&j| pairs[j] != p || j != i)
            .filter(|&j| !c.is_valid_pair(pairs[j]))
            .collect();
        if !paused && !sync_ok(c, one_way, &pairs, &rest) {
            return false;
        }
        if !paused {
            note(&mut created, &pairs);
        }
    }
    let mut queue = VecDeque::new();
    let mut visited = HashSet::new();
    queue.push_back((pairs.clone(), created));
    visited.insert((pairs, created));
    while let Some((pairs, created)) = queue.pop_front() {
        if pairs.iter().all(|p| *p == target) {
            let final_ok = (!paused || sync_ok(c, one_way, &pairs, &[]))
                && (0..32)
                    .filter(|v| created & (1 << v) != 0)
                    .all(|v| c.accepts(target).contains(&v));
            if final_ok {
                return true;
            }
            continue;
        }
        for (i, r) in o.replicas.iter().enumerate() {
            if !r.reachable {
                continue;
            }
            let p = pairs[i];
            let mut moves = Vec::new();
            for l in p.schema_repository + 1..=s.target {
                let q = FlPair::new(l, p.user_database);
                if c.is_valid_pair(q) {
                    moves.push(vec![q]);
                } else {
                    for u in p.user_database + 1..=l {
                        if c.is_valid_pair(FlPair::new(l, u)) {
                            moves.push(vec![q, FlPair::new(l, u)]);
                        }
                    }
                }
            }
            for u in p.user_database + 1..=p.schema_repository {
                let q = FlPair::new(p.schema_repository, u);
                if c.is_valid_pair(q) {
                    moves.push(vec![q]);
                }
            }
            'moves: for m in moves {
                let mut next = pairs.clone();
                for q in &m {
                    next[i] = *q;
                    if !clients_ok(c, s, o, &releases, &next) {
                        continue 'moves;
                    }
                }
                if !paused && !sync_ok(c, one_way, &next, &[]) {
                    continue;
                }
                let mut nc = created;
                if !paused {
                    note(&mut nc, &next);
                }
                if visited.insert((next.clone(), nc)) {
                    queue.push_back((next, nc));
                }
            }
        }
    }
    false
}

const RELEASES: &[&str] = &["2003.06.16", "7.0.1.0", "7.1.2", "8.0", "8.0.1.1"];

fn arb_pair() -> impl Strategy<Value = FlPair> {
    prop_oneof![
        12 => prop::sample::select(vec![(5, 5), (6, 5), (6, 6), (7, 5), (7, 6), (7, 7), (8, 8)]),
        1 => Just((8, 7)),
    ]
    .prop_map(|(a, b)| FlPair::new(a, b))
}

fn arb_fleet() -> impl Strategy<Value = (FleetSpec, FleetObserved)> {
    let replicas =
        prop::collection::vec((arb_pair(), 0..3usize, prop::bool::weighted(0.92)), 1..=4);
    let tiers = prop::collection::vec(
        (
            prop_oneof![4 => Just("8.0.1.1"), 1 => prop::sample::select(RELEASES)],
            prop::option::of(prop::sample::select(RELEASES)),
            any::<bool>(),
            prop::option::of(0..3usize),
        ),
        0..=3,
    );
    (5..=8i32, any::<bool>(), any::<bool>(), replicas, tiers).prop_map(
        |(target, all_at_once, one_way, replicas, tiers)| {
            let sites = ["tokyo", "paris", "austin"];
            let mut interrupted = false;
            let replicas: Vec<ReplicaObserved> = replicas
                .into_iter()
                .enumerate()
                .map(|(i, (pair, site, reachable))| {
                    // At most one replica caught mid paired move.
                    let pair = if pair == FlPair::new(8, 7) && interrupted {
                        FlPair::new(7, 7)
                    } else {
                        pair
                    };
                    interrupted |= pair == FlPair::new(8, 7);
                    ReplicaObserved {
                        name: format!("r{i}"),
                        site: sites[site].into(),
                        pair: Some(pair),
                        reachable,
                    }
                })
                .collect();
            let spec = FleetSpec {
                target,
                strategy: if all_at_once {
                    UpgradeStrategy::AllAtOnce
                } else {
                    UpgradeStrategy::Staged
                },
                allow_unidirectional: one_way,
                tiers: tiers
                    .iter()
                    .enumerate()
                    .map(|(i, (rel, _, _, site))| TierSpec {
                        name: format!("t{i}"),
                        release: rel.to_string(),
                        site: site.map(|s| sites[s].to_string()),
                    })
                    .collect(),
            };
            let observed = FleetObserved {
                tiers: tiers
                    .iter()
                    .enumerate()
                    .map(|(i, (_, seen, ready, _))| TierObserved {
                        name: format!("t{i}"),
                        release: seen.map(|s| s.to_string()),
                        ready: *ready,
                    })
                    .collect(),
                replicas,
            };
            (spec, observed)
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Every plan the planner makes keeps every rule after every step and reaches the target.
    #[test]
    fn every_plan_keeps_the_invariants_after_every_step((s, o) in arb_fleet()) {
        let c = compat();
        if let Ok(plan) = plan(&c, &s, &o) {
            replay(&c, &s, &o, &plan);
        }
    }

    /// The planner finds a plan whenever an exhaustive search finds one, and refuses
    /// only when none exists.
    #[test]
    fn a_plan_is_found_whenever_one_exists((s, o) in arb_fleet()) {
        let c = compat();
        let exists = some_plan_exists(&c, &s, &o);
        match plan(&c, &s, &o) {
            Ok(p) => prop_assert!(exists, "planner found {p:?} where the search found none"),
            Err(r) => {
                prop_assert!(!exists, "planner refused ({}) but a plan exists", r.reason);
                prop_assert!(!r.reason.is_empty());
            }
        }
    }

    /// Staged cross-site raises without the one-way flag are refused, and the reason
    /// names both ways forward.
    #[test]
    fn staged_refusals_name_the_ways_forward((s, o) in arb_fleet()) {
        let c = compat();
        if let Err(r) = plan(&c, &s, &o)
            && r.kind == RefusalKind::Replication && s.strategy == UpgradeStrategy::Staged {
                prop_assert!(r.reason.contains("AllAtOnce"), "{}", r.reason);
                if !s.allow_unidirectional {
                    prop_assert!(r.reason.contains("allowUnidirectionalReplication"), "{}", r.reason);
                }
            }
    }
}

/// What the upgrade driver does: re-plan from what it observes after every step and
/// execute the first step. From any state on the way the plan must go on, and the
/// driver must reach the target in as many steps as the first plan had.
fn drive(s: &FleetSpec, start: FleetObserved) -> Vec<Step> {
    let compat = compat();
    let mut observed = start;
    let mut paused = false;
    let mut done = Vec::new();
    let first = plan_from(&compat, s, &observed, paused)
        .expect("a plan")
        .steps
        .len();
    loop {
        let next = plan_from(&compat, s, &observed, paused)
            .unwrap_or_else(|r| panic!("refused mid-way after {done:?}: {r}"));
        let Some(step) = next.steps.first().cloned() else {
            break;
        };
        match &step {
            Step::UpgradeClients { tier, release } => {
                for t in observed.tiers.iter_mut().filter(|t| t.name == *tier) {
                    t.release = Some(release.clone());
                    t.ready = true;
                }
                if !observed.tiers.iter().any(|t| t.name == *tier) {
                    observed.tiers.push(seen(tier, release));
                }
            }
            Step::RaiseSchemaRepository {
                replica,
                feature_level,
            } => {
                for r in observed.replicas.iter_mut().filter(|r| r.name == *replica) {
                    r.pair = r.pair.map(|p| FlPair::new(*feature_level, p.user_database));
                }
            }
            Step::RaiseUserDatabase {
                replica,
                feature_level,
            } => {
                for r in observed.replicas.iter_mut().filter(|r| r.name == *replica) {
                    r.pair = r
                        .pair
                        .map(|p| FlPair::new(p.schema_repository, *feature_level));
                }
            }
            Step::PauseSync => paused = true,
            Step::ResumeSync => paused = false,
        }
        done.push(step);
        assert!(
            done.len() <= first,
            "the driver took more steps than planned: {done:?}"
        );
    }
    assert!(!paused, "sync left paused");
    let target = FlPair::new(s.target, s.target);
    assert!(
        observed.replicas.iter().all(|r| r.pair == Some(target)),
        "{observed:?}"
    );
    assert_eq!(done.len(), first);
    done
}

#[test]
fn replanning_after_every_step_reaches_the_target() {
    let web = || vec![tier("web", "8.0.1.1")];
    let staged = drive(
        &spec(8, UpgradeStrategy::Staged, true, web()),
        FleetObserved {
            tiers: vec![seen("web", "7.0.1.0")],
            replicas: three_sites(6, 6),
        },
    );
    assert_eq!(
        staged[0],
        Step::UpgradeClients {
            tier: "web".into(),
            release: "8.0.1.1".into()
        }
    );
    let all = drive(
        &spec(8, UpgradeStrategy::AllAtOnce, false, web()),
        FleetObserved {
            tiers: vec![seen("web", "8.0.1.1")],
            replicas: three_sites(7, 7),
        },
    );
    assert_eq!(all.first(), Some(&Step::PauseSync));
    assert_eq!(all.last(), Some(&Step::ResumeSync));
    // Paused with every replica raised already: only the resume is left.
    let s = spec(8, UpgradeStrategy::AllAtOnce, false, vec![]);
    let o = FleetObserved {
        tiers: vec![],
        replicas: three_sites(8, 8),
    };
    assert_eq!(
        plan_from(&compat(), &s, &o, true).unwrap().steps,
        vec![Step::ResumeSync]
    );
    // Paused under a staged plan (the strategy changed): resumed first.
    let s = spec(8, UpgradeStrategy::Staged, true, vec![]);
    let o = FleetObserved {
        tiers: vec![],
        replicas: three_sites(7, 7),
    };
    assert_eq!(
        plan_from(&compat(), &s, &o, true).unwrap().steps[0],
        Step::ResumeSync
    );
}

proptest! {
    #[test]
    fn the_driver_finishes_every_plan_it_starts(
        levels in proptest::collection::vec((5i32..=8, 0i32..=3), 1..4),
        target in 5i32..=8,
        all_at_once in any::<bool>(),
        one_way in any::<bool>(),
    ) {
        let replicas: Vec<ReplicaObserved> = levels
            .iter()
            .enumerate()
            .map(|(i, (sr, down))| replica(&format!("r{i}"), &format!("s{i}"), *sr, (*sr - *down).max(5)))
            .collect();
        let strategy = if all_at_once { UpgradeStrategy::AllAtOnce } else { UpgradeStrategy::Staged };
        let s = spec(target, strategy, one_way, vec![]);
        let o = FleetObserved { tiers: vec![], replicas };
        if plan(&compat(), &s, &o).is_ok() {
            drive(&s, o);
        }
    }
}
