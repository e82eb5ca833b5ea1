//! Tables for the family controller's decisions: conditions, the transitions announced,
//! the plan's effect on Progressing, and when to look again.

use super::*;
use k8s_openapi::jiff::Timestamp;
use multisite_core::api::{PlanBlocked, ReplicaSpec, ReplicaStatus};

#[test]
fn sync_now_values() {
    assert_eq!(parse_sync_now("full"), Ok((TaskKind::Full, None)));
    assert_eq!(
        parse_sync_now(" incremental "),
        Ok((TaskKind::Incremental, None))
    );
    assert_eq!(
        parse_sync_now("full:a->b"),
        Ok((TaskKind::Full, Some(("a".into(), "b".into()))))
    );
    assert!(
        parse_sync_now("now")
            .unwrap_err()
            .contains("not a task kind")
    );
    assert!(parse_sync_now("full:a-b").unwrap_err().contains("FROM->TO"));
    assert!(parse_sync_now("full:->b").is_err());
}

fn link(lag: i64, held: i64, ran: bool, error: Option<&str>) -> LinkStatus {
    LinkStatus {
        from: "a".into(),
        to: "b".into(),
        last_task: ran.then(|| "Incremental".to_string()),
        lag_changes: lag,
        held_packets: held,
        error: error.map(str::to_string),
        ..Default::default()
    }
}

#[test]
fn synchronized_needs_every_link_run_empty_and_healthy() {
    let replica = |name: &str| {
        let mut r = Replica::new(
            name,
            multisite_core::api::ReplicaSpec {
                family: "f".into(),
                site: "s".into(),
                storage: "1Gi".into(),
                bootstrap_from: None,
                resources: None,
            },
        );
        r.status = Some(multisite_core::api::ReplicaStatus {
            phase: Some(ReplicaPhase::Active),
            ..Default::default()
        });
        Arc::new(r)
    };
    let two = vec![replica("a"), replica("b")];
    let cases = [
        (vec![link(0, 0, true, None)], true),
        (vec![link(3, 0, true, None)], false),
        (vec![link(0, 1, true, None)], false),
        (vec![link(0, 0, false, None)], false),
        (vec![link(0, 0, true, Some("down"))], false),
        (vec![], false),
    ];
    for (links, expected) in cases {
        assert_eq!(
            verdicts(&two, &links, None, None).synchronized.0,
            expected,
            "{links:?}"
        );
    }
    assert!(verdicts(&[replica("a")], &[], None, None).synchronized.0);
    assert!(!verdicts(&[], &[], None, None).ready.0);
    let failing = verdicts(&two, &[link(0, 0, true, Some("down"))], None, None);
    assert!(failing.degraded.0 && failing.degraded.2.contains("down"));
    assert_eq!(
        verdicts(&two, &[], Some("bad hub"), None).degraded.1,
        "TopologyInvalid"
    );
    let gateway = verdicts(&two, &[link(0, 0, true, None)], None, Some("gateway down"));
    assert_eq!((gateway.degraded.0, gateway.degraded.1), (true, "Gateway"));
}

fn at(seconds: i64) -> Time {
    Time(Timestamp::from_second(seconds).expect("time"))
}

fn member(name: &str, levels: Option<(i32, i32)>, ready: bool) -> Arc<Replica> {
    let mut r = Replica::new(
        name,
        ReplicaSpec {
            family: "f".into(),
            site: "s".into(),
            storage: "1Gi".into(),
            bootstrap_from: None,
            resources: None,
        },
    );
    let mut status = ReplicaStatus {
        phase: Some(ReplicaPhase::Active),
        schema_repository_feature_level: levels.map(|l| l.0),
        user_database_feature_level: levels.map(|l| l.1),
        ..Default::default()
    };
    conditions::set_condition(
        &mut status.conditions,
        READY,
        ready,
        "Serving",
        "",
        None,
        at(1),
    );
    r.status = Some(status);
    Arc::new(r)
}

fn fam(stored: &[(&str, bool)]) -> ReplicaFamily {
    let mut f = ReplicaFamily::new("f", multisite_core::api::ReplicaFamilySpec::new("F", 7));
    f.metadata.generation = Some(3);
    let mut status = ReplicaFamilyStatus::default();
    for (type_, value) in stored {
        conditions::set_condition(
            &mut status.conditions,
            type_,
            *value,
            "Before",
            "",
            Some(2),
            at(10),
        );
    }
    f.status = Some(status);
    f
}

fn observed<'a>(
    family: &'a ReplicaFamily,
    members: &'a [Arc<Replica>],
    announced: &[(&str, bool)],
) -> Observed<'a> {
    Observed {
        family,
        members,
        links: vec![link(0, 0, true, None)],
        topology_error: None,
        clients: vec![],
        gateway: GatewayOutcome {
            status: None,
            problem: None,
        },
        announced: announced.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        now: at(100),
    }
}

fn three_steps() -> Vec<multisite_core::api::PlanStepStatus> {
    let step: multisite_core::api::PlanStepStatus =
        serde_json::from_value(serde_json::json!({"action": "pauseSync"})).expect("a step");
    vec![step.clone(), step.clone(), step]
}

fn settled() -> Upgrade {
    Upgrade {
        plan: PlanStatus::default(),
        waiting: None,
        progressing: false,
    }
}

fn value(status: &ReplicaFamilyStatus, type_: &str) -> (bool, String) {
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_}"));
    (c.status == "True", c.reason.clone())
}

/// A transition is announced against what this process last announced, else against
/// the stored status; the first look after a start announces nothing it cannot compare.
#[test]
fn transitions_are_announced_once_against_the_last_announcement_or_the_status() {
    let two_ready = [
        member("a", Some((7, 7)), true),
        member("b", Some((7, 7)), true),
    ];
    let one_not = [
        member("a", Some((7, 7)), true),
        member("b", Some((7, 7)), false),
    ];
    // (name, stored conditions, announced, members, expected events: (reason, warning))
    type Row<'a> = (
        &'a str,
        Vec<(&'a str, bool)>,
        Vec<(&'a str, bool)>,
        &'a [Arc<Replica>],
        Vec<(&'a str, bool)>,
    );
    let rows: Vec<Row> = vec![
        (
            "nothing to compare with",
            vec![],
            vec![],
            &two_ready,
            vec![],
        ),
        (
            "ready after not ready in status",
            vec![(READY, false)],
            vec![],
            &two_ready,
            vec![("AllReplicasReady", false)],
        ),
        (
            "announced already, status lagging",
            vec![(READY, false)],
            vec![(READY, true)],
            &two_ready,
            vec![],
        ),
        (
            "not ready is a warning",
            vec![(READY, true)],
            vec![],
            &one_not,
            vec![("ReplicasNotReady", true)],
        ),
        (
            "healthy stays healthy",
            vec![(DEGRADED, false)],
            vec![],
            &two_ready,
            vec![],
        ),
        (
            "progressing changes are never announced",
            vec![(PROGRESSING, true)],
            vec![(PROGRESSING, true)],
            &two_ready,
            vec![],
        ),
        (
            "in sync stays in sync",
            vec![(SYNCHRONIZED, true)],
            vec![],
            &two_ready,
            vec![],
        ),
    ];
    for (name, stored, announced, members, expected) in rows {
        let family = fam(&stored);
        let d = status(&observed(&family, members, &announced), settled());
        let got: Vec<(&str, bool)> = d.events.iter().map(|e| (e.reason, e.warning)).collect();
        assert_eq!(got, expected, "{name}");
        assert_eq!(
            d.announced.get(READY),
            Some(&value(&d.status, READY).0),
            "{name}"
        );
    }
    // A failing link makes Degraded true: a warning; Synchronized false: a warning too.
    let family = fam(&[(DEGRADED, false), (SYNCHRONIZED, true)]);
    let mut o = observed(&family, &two_ready, &[]);
    o.links = vec![link(0, 0, true, Some("refused"))];
    let d = status(&o, settled());
    let got: Vec<(&str, bool)> = d.events.iter().map(|e| (e.reason, e.warning)).collect();
    assert_eq!(got, [("LinksFailing", true), ("Lagging", true)]);
}

/// Progressing follows the plan: refused, paused, waiting, carrying out a step, else
/// the replicas' own movement.
#[test]
fn progressing_follows_the_plan() {
    let members = [member("a", Some((7, 7)), true)];
    let blocked = PlanStatus {
        blocked: Some(PlanBlocked {
            reason: "no safe order".into(),
        }),
        ..Default::default()
    };
    let at_step_two = PlanStatus {
        steps: three_steps(),
        current: 1,
        ..Default::default()
    };
    let mut paused = fam(&[]);
    paused.spec.paused = true;
    let plain = fam(&[]);
    let rows = [
        (
            &plain,
            Upgrade {
                plan: blocked.clone(),
                waiting: None,
                progressing: false,
            },
            (false, "UpgradeRefused"),
        ),
        (
            &paused,
            Upgrade {
                plan: PlanStatus::default(),
                waiting: Some("paused".into()),
                progressing: false,
            },
            (true, "Paused"),
        ),
        (
            &plain,
            Upgrade {
                plan: PlanStatus::default(),
                waiting: Some("a client tier".into()),
                progressing: false,
            },
            (true, "Upgrading"),
        ),
        (
            &plain,
            Upgrade {
                plan: at_step_two,
                waiting: None,
                progressing: true,
            },
            (true, "Upgrading"),
        ),
        (&plain, settled(), (false, "Stable")),
    ];
    for (family, upgrade, (expected, reason)) in rows {
        let d = status(&observed(family, &members, &[]), upgrade);
        assert_eq!(
            value(&d.status, PROGRESSING),
            (expected, reason.to_string())
        );
    }
    let d = status(
        &observed(&plain, &members, &[]),
        Upgrade {
            plan: PlanStatus {
                steps: three_steps(),
                current: 1,
                ..Default::default()
            },
            waiting: None,
            progressing: true,
        },
    );
    let message = &d
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == PROGRESSING)
        .expect("Progressing")
        .message;
    assert_eq!(message, "carrying out step 2 of 3");
}

/// A refused plan is announced once, and again only after it was not refused.
#[test]
fn a_refused_plan_is_announced_once() {
    let members = [member("a", Some((7, 7)), true)];
    let family = fam(&[]);
    let refused = || Upgrade {
        plan: PlanStatus {
            blocked: Some(PlanBlocked {
                reason: "no safe order".into(),
            }),
            ..Default::default()
        },
        waiting: None,
        progressing: false,
    };
    let first = status(&observed(&family, &members, &[]), refused());
    assert_eq!(
        first.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
        ["UpgradeRefused"]
    );
    assert!(first.events[0].warning);
    assert_eq!(first.announced.get(UPGRADE_REFUSED), Some(&true));
    let again = status(
        &observed(&family, &members, &[(UPGRADE_REFUSED, true)]),
        refused(),
    );
    assert!(again.events.is_empty());
    let cleared = status(
        &observed(&family, &members, &[(UPGRADE_REFUSED, true)]),
        settled(),
    );
    assert_eq!(cleared.announced.get(UPGRADE_REFUSED), Some(&false));
}

/// A condition that keeps its value keeps its transition time, even when the plan
/// overrides what the replicas alone would say.
#[test]
fn an_unchanged_condition_keeps_its_transition_time() {
    let members = [member("a", Some((7, 7)), true)];
    let family = fam(&[(PROGRESSING, true), (READY, true)]);
    let d = status(
        &observed(&family, &members, &[]),
        Upgrade {
            plan: PlanStatus::default(),
            waiting: Some("a client tier".into()),
            progressing: false,
        },
    );
    for type_ in [PROGRESSING, READY] {
        let c = d
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("a condition");
        assert_eq!(c.last_transition_time, at(10), "{type_}");
        assert_eq!(c.observed_generation, Some(3), "{type_}");
    }
}

#[test]
fn the_family_level_is_the_lowest_once_every_replica_reports() {
    assert_eq!(feature_level(&[]), None);
    assert_eq!(
        feature_level(&[
            member("a", Some((8, 7)), true),
            member("b", Some((7, 7)), true)
        ]),
        Some(7)
    );
    assert_eq!(
        feature_level(&[
            member("a", Some((8, 8)), true),
            member("b", Some((8, 6)), true)
        ]),
        Some(6)
    );
    assert_eq!(
        feature_level(&[member("a", Some((8, 8)), true), member("b", None, true)]),
        None
    );
}

#[test]
fn a_settled_family_is_looked_at_seldom() {
    let members = [member("a", Some((7, 7)), true)];
    let mut family = fam(&[]);
    let d = status(&observed(&family, &members, &[]), settled());
    assert_eq!(d.requeue, Duration::from_secs(30));
    family.spec.gateway = Some(multisite_core::api::GatewaySpec {
        replica: "a".into(),
        endpoint: None,
    });
    let d = status(&observed(&family, &members, &[]), settled());
    assert_eq!(d.requeue, Duration::from_secs(10));
    let waiting = status(
        &observed(&family, &members, &[]),
        Upgrade {
            plan: PlanStatus::default(),
            waiting: Some("x".into()),
            progressing: false,
        },
    );
    assert_eq!(waiting.requeue, Duration::from_secs(2));
    let not_ready = [member("a", Some((7, 7)), false)];
    let d = status(&observed(&family, &not_ready, &[]), settled());
    assert_eq!(d.requeue, Duration::from_secs(2));
}
