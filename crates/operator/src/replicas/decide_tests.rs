//! Tables for the Replica controller's decisions: each row a situation one reconcile
//! can observe, and what must be done about it.

use super::*;
use crate::context::Announcement;
use k8s_openapi::jiff::Timestamp;
use multisite_core::api::conditions::{DEGRADED, PROGRESSING, READY};
use multisite_core::api::{GatewaySpec, ReplicaFamilySpec, ReplicaSpec, SiteSpec};
use serde_json::json;

fn pod(status: serde_json::Value) -> Pod {
    serde_json::from_value(serde_json::json!({"metadata": {"name": "r-0"}, "status": status}))
        .expect("a pod")
}

#[test]
fn why_a_pod_does_not_serve() {
    let unschedulable = pod(
        serde_json::json!({"conditions": [{"type": "PodScheduled", "status": "False",
            "reason": "Unschedulable", "message": "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."}]}),
    );
    let crashing = pod(
        serde_json::json!({"containerStatuses": [{"name": "replica", "image": "x", "imageID": "",
            "ready": false, "restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}}}]}),
    );
    let creating = pod(
        serde_json::json!({"containerStatuses": [{"name": "replica", "image": "x", "imageID": "",
            "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]}),
    );
    let scheduled =
        pod(serde_json::json!({"conditions": [{"type": "PodScheduled", "status": "True"}]}));
    for (pod, zone, stuck, reason, says) in [
        (
            None,
            None,
            false,
            "PodStarting",
            "waiting for pod r-0 to start",
        ),
        (
            Some(&scheduled),
            None,
            false,
            "PodStarting",
            "waiting for pod r-0 to start",
        ),
        (
            Some(&creating),
            None,
            false,
            "PodStarting",
            "waiting for pod r-0 to start",
        ),
        (
            Some(&unschedulable),
            Some("zone-x"),
            true,
            "Unschedulable",
            "pod r-0 cannot be scheduled (its Site asks for nodes in zone zone-x): 0/3 nodes are available",
        ),
        (
            Some(&unschedulable),
            None,
            true,
            "Unschedulable",
            "pod r-0 cannot be scheduled: 0/3",
        ),
        (
            Some(&crashing),
            None,
            true,
            "PodNotStarting",
            "pod r-0 does not start: CrashLoopBackOff: back-off 40s",
        ),
    ] {
        let (got_stuck, got_reason, message) = pod_not_serving("r-0", pod, zone);
        assert_eq!((got_stuck, got_reason), (stuck, reason), "{message}");
        assert!(message.starts_with(says), "{message}");
    }
}

fn family() -> ReplicaFamily {
    ReplicaFamily::new("sampl", ReplicaFamilySpec::new("SAMPL", 7))
}

fn replica(
    name: &str,
    age_secs: i64,
    phase: Option<ReplicaPhase>,
    from: Option<&str>,
) -> Arc<Replica> {
    let mut r = Replica::new(
        name,
        ReplicaSpec {
            family: "sampl".into(),
            site: "s".into(),
            storage: "1Gi".into(),
            bootstrap_from: from.map(str::to_string),
            resources: None,
        },
    );
    r.metadata.creation_timestamp = Some(Time(
        Timestamp::from_second(1_000_000 - age_secs).expect("time"),
    ));
    if let Some(phase) = phase {
        r.status = Some(ReplicaStatus {
            phase: Some(phase),
            endpoint: Some(format!("http://{name}:7400")),
            incarnation: (phase == ReplicaPhase::Active).then_some(1),
            ..Default::default()
        });
    }
    Arc::new(r)
}

#[test]
fn bootstrap_table() {
    let f = family();
    let init = BootstrapPlan::Init {
        id_prefix: "SAMPL".into(),
        feature_level: 7,
    };
    let clone = |s: &str| BootstrapPlan::CloneFrom {
        source: s.into(),
        endpoint: format!("http://{s}:7400"),
    };
    let a_new = replica("a", 30, None, None);
    let b_new = replica("b", 20, None, None);
    let a_live = replica("a", 30, Some(ReplicaPhase::Active), None);
    let c_live = replica("c", 10, Some(ReplicaPhase::Active), None);
    let d_from_c = replica("d", 5, None, Some("c"));
    let d_from_b = replica("d", 5, None, Some("b"));
    type Case<'a> = (&'a Arc<Replica>, Vec<Arc<Replica>>, BootstrapPlan);
    let cases: Vec<Case> = vec![
        // The oldest of an empty family starts it; a younger one waits for it.
        (&a_new, vec![a_new.clone(), b_new.clone()], init.clone()),
        (
            &b_new,
            vec![a_new.clone(), b_new.clone()],
            BootstrapPlan::Wait("waiting for a to start the family".into()),
        ),
        // Once one serves, the others copy it (the oldest live one).
        (
            &b_new,
            vec![a_live.clone(), b_new.clone(), c_live.clone()],
            clone("a"),
        ),
        // bootstrapFrom wins, and waits for its source to serve.
        (
            &d_from_c,
            vec![a_live.clone(), c_live.clone(), d_from_c.clone()],
            clone("c"),
        ),
        (
            &d_from_b,
            vec![a_live.clone(), b_new.clone(), d_from_b.clone()],
            BootstrapPlan::Wait("bootstrap source b is not Active yet".into()),
        ),
        // Replicas that name a source never start the family, even when older.
        (
            &b_new,
            vec![replica("a", 30, None, Some("b")), b_new.clone()],
            init.clone(),
        ),
    ];
    for (me, members, expected) in cases {
        assert_eq!(
            bootstrap_plan(me, &f, &members),
            expected,
            "{}",
            me.name_any()
        );
    }
    // A replica that served before and lost its data is never re-created empty.
    let lost = replica("a", 30, Some(ReplicaPhase::Active), None);
    assert!(matches!(
        bootstrap_plan(&lost, &f, std::slice::from_ref(&lost)),
        BootstrapPlan::Refuse(_)
    ));
    let unknown = replica("d", 5, None, Some("zz"));
    assert!(
        matches!(bootstrap_plan(&unknown, &f, &[a_live.clone(), unknown.clone()]), BootstrapPlan::Wait(w) if w.contains("zz"))
    );
}

#[test]
fn heir_prefers_the_gateway_replica_then_the_oldest_active() {
    let mut f = family();
    let a = replica("a", 30, Some(ReplicaPhase::Active), None);
    let b = replica("b", 20, Some(ReplicaPhase::Active), None);
    let c = replica("c", 10, Some(ReplicaPhase::Active), None);
    let members = vec![a.clone(), b.clone(), c.clone()];
    assert_eq!(heir("a", Some(&f), &members).as_deref(), Some("b"));
    f.spec.gateway = Some(multisite_core::api::GatewaySpec {
        replica: "c".into(),
        endpoint: None,
    });
    assert_eq!(heir("a", Some(&f), &members).as_deref(), Some("c"));
    assert_eq!(heir("c", Some(&f), &members).as_deref(), Some("a"));
    assert_eq!(heir("a", Some(&f), std::slice::from_ref(&a)), None);
}

fn image() -> Image {
    Image {
        reference: "multisite:test".into(),
        pull_policy: "Never".into(),
    }
}

fn site() -> Site {
    let mut s = Site::new("s", SiteSpec::default());
    s.metadata.namespace = Some("tracker".into());
    s
}

fn in_namespace(r: &Arc<Replica>) -> Replica {
    let mut r = (**r).clone();
    r.metadata.namespace = Some("tracker".into());
    r.metadata.generation = Some(1);
    r.metadata.uid = Some(format!(
        "uid-{}",
        r.metadata.name.clone().unwrap_or_default()
    ));
    r
}

fn serving_pod(ip: &str, ready: bool) -> Pod {
    pod(
        json!({"podIP": ip, "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}),
    )
}

fn report(replica: &str, levels: (i32, i32)) -> StatusReport {
    serde_json::from_value(json!({
        "family": "sampl", "replica": replica, "idPrefix": "SAMPL", "idTag": "t",
        "incarnation": 1, "schemaRepositoryFeatureLevel": levels.0,
        "userDatabaseFeatureLevel": levels.1, "metaschemaVersion": 22,
        "packetVersion": {"creates": 11, "acceptsMin": 6, "acceptsMax": 11},
        "syncBlocked": null, "schemaVersion": 1, "userDatabaseSchemaVersion": 1,
        "schemaRepositoryMaster": "a", "epochs": {"a": 4}, "heldPackets": 0, "held": [],
        "peers": [], "mastered": {"records": 3}, "changeLog": 0
    }))
    .expect("a status report")
}

fn awaiting(running: bool, last_error: Option<&str>) -> Answer {
    Answer::AwaitingBootstrap(Box::new(BootstrapState {
        family: "sampl".into(),
        replica: "a".into(),
        awaiting_bootstrap: true,
        running: running.then(|| "init".to_string()),
        last_error: last_error.map(str::to_string),
        error: last_error.unwrap_or("waiting for bootstrap").to_string(),
    }))
}

/// What one reconcile sees, with everything present and nothing asked yet.
struct Scene {
    replica: Replica,
    family: Option<ReplicaFamily>,
    site: Option<Site>,
    members: Vec<Arc<Replica>>,
    statefulset: Option<StatefulSet>,
    service: Option<Service>,
    pod: Option<Pod>,
    answer: Answer,
    image: Image,
}

impl Scene {
    fn new(replica: Arc<Replica>) -> Self {
        let mut f = family();
        f.metadata.namespace = Some("tracker".into());
        Scene {
            replica: in_namespace(&replica),
            family: Some(f),
            site: Some(site()),
            members: vec![replica],
            statefulset: None,
            service: None,
            pod: None,
            answer: Answer::NotAsked,
            image: image(),
        }
    }

    fn with_pod(mut self, answer: Answer) -> Self {
        self.pod = Some(serving_pod("127.1.0.9", true));
        self.answer = answer;
        self
    }

    fn observed(&self) -> Observed<'_> {
        Observed {
            replica: &self.replica,
            family: self.family.as_ref(),
            site: self.site.as_ref(),
            members: &self.members,
            statefulset: self.statefulset.as_ref(),
            service: self.service.as_ref(),
            pod: self.pod.as_ref(),
            answer: self.answer.clone(),
            image: &self.image,
            now: Time(Timestamp::from_second(2_000_000).expect("time")),
        }
    }
}

fn condition<'a>(status: &'a ReplicaStatus, type_: &str) -> (bool, &'a str) {
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no condition {type_} in {status:?}"));
    (c.status == "True", c.reason.as_str())
}

fn reasons(events: &[Announcement]) -> Vec<&str> {
    events.iter().map(|e| e.reason).collect()
}

#[test]
fn a_replica_without_its_family_or_site_only_says_so() {
    let mut no_family = Scene::new(replica("a", 30, None, None));
    no_family.family = None;
    let mut no_site = Scene::new(replica("a", 30, None, None));
    no_site.site = None;
    for (scene, reason) in [(no_family, "FamilyNotFound"), (no_site, "SiteNotFound")] {
        let d = placement(&scene.observed());
        assert!(!d.family_secret && d.statefulset.is_none() && d.service.is_none());
        assert!(d.bootstrap.is_none() && d.events.is_empty());
        assert_eq!(d.status.phase, Some(ReplicaPhase::Pending));
        assert_eq!(condition(&d.status, DEGRADED), (true, reason));
        assert_eq!(condition(&d.status, READY), (false, reason));
        assert_eq!(d.requeue, Duration::from_secs(15));
    }
}

/// The workload is applied while the caches lack it or hold another build of it, and
/// not again once they hold what the operator built.
#[test]
fn the_workload_is_applied_only_when_the_cache_differs() {
    let fresh = Scene::new(replica("a", 30, None, None));
    let d = placement(&fresh.observed());
    assert!(d.family_secret);
    let built_sts = d.statefulset.clone().expect("a StatefulSet to apply");
    let built_svc = d.service.clone().expect("a Service to apply");
    assert!(
        built_sts
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(builders::APPLIED))
    );
    assert_eq!(condition(&d.status, PROGRESSING), (true, "PodStarting"));
    assert_eq!(d.requeue, Duration::from_secs(2));

    let mut settled = Scene::new(replica("a", 30, None, None));
    settled.statefulset = Some(built_sts.clone());
    settled.service = Some(built_svc.clone());
    let d = placement(&settled.observed());
    assert!(d.statefulset.is_none() && d.service.is_none(), "{d:?}");

    // Another image is another build: the StatefulSet goes out again, the Service not.
    settled.image.reference = "multisite:next".into();
    let d = placement(&settled.observed());
    assert!(d.statefulset.is_some() && d.service.is_none());

    // An object on its way out, or one without the digest (made by hand), is applied.
    let mut going = Scene::new(replica("a", 30, None, None));
    let mut deleted = built_sts.clone();
    deleted.metadata.deletion_timestamp = settled.observed().now.into();
    going.statefulset = Some(deleted);
    let mut by_hand = built_svc;
    by_hand.metadata.annotations = None;
    going.service = Some(by_hand);
    let d = placement(&going.observed());
    assert!(d.statefulset.is_some() && d.service.is_some());

    // Its labels or owner reference taken away: applied again to put them back. Labels
    // others add are theirs.
    let mut stripped = Scene::new(replica("a", 30, None, None));
    let mut no_owner = built_sts.clone();
    no_owner.metadata.owner_references = None;
    stripped.statefulset = Some(no_owner);
    let mut relabelled = d.service.clone().expect("a Service");
    if let Some(labels) = relabelled.metadata.labels.as_mut() {
        labels.remove(builders::REPLICA_LABEL);
    }
    stripped.service = Some(relabelled);
    let d = placement(&stripped.observed());
    assert!(d.statefulset.is_some() && d.service.is_some());
    let mut extra = Scene::new(replica("a", 30, None, None));
    let mut labelled = built_sts;
    labelled
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("team".into(), "tracker".into());
    extra.statefulset = Some(labelled);
    assert!(placement(&extra.observed()).statefulset.is_none());
}

#[test]
fn a_serving_replica_reports_its_levels_and_is_announced_once() {
    let scene = Scene::new(replica("a", 30, None, None))
        .with_pod(Answer::Report(Box::new(report("a", (7, 6)))));
    let d = placement(&scene.observed());
    assert_eq!(d.status.phase, Some(ReplicaPhase::Active));
    assert_eq!(d.status.schema_repository_feature_level, Some(7));
    assert_eq!(d.status.user_database_feature_level, Some(6));
    assert_eq!(d.status.endpoint.as_deref(), Some("http://127.1.0.9:7400"));
    assert_eq!(d.status.reachable, Some(true));
    assert_eq!(condition(&d.status, READY), (true, "Serving"));
    assert_eq!(condition(&d.status, PROGRESSING), (false, "Serving"));
    assert_eq!(reasons(&d.events), ["Active"]);
    assert!(d.bootstrap.is_none());
    assert_eq!(d.requeue, Duration::from_secs(5));

    // Already Active: no second announcement; a pod not ready is not Ready.
    let mut again = Scene::new(replica("a", 30, Some(ReplicaPhase::Active), None))
        .with_pod(Answer::Report(Box::new(report("a", (7, 6)))));
    again.pod = Some(serving_pod("127.1.0.9", false));
    let d = placement(&again.observed());
    assert!(d.events.is_empty());
    assert_eq!(condition(&d.status, READY), (false, "PodNotReady"));

    // After a restore it makes no change until its peers have re-sent what it lacks.
    let mut restoring = report("a", (7, 7));
    restoring.restoring = vec!["b".into()];
    let scene = Scene::new(replica("a", 30, Some(ReplicaPhase::Active), None))
        .with_pod(Answer::Report(Box::new(restoring)));
    let d = placement(&scene.observed());
    assert_eq!(condition(&d.status, PROGRESSING), (true, "Restoring"));
}

#[test]
fn a_pod_serving_another_replica_or_none_is_degraded() {
    let wrong = Scene::new(replica("a", 30, None, None))
        .with_pod(Answer::Report(Box::new(report("zz", (7, 7)))));
    let d = placement(&wrong.observed());
    assert_eq!(condition(&d.status, DEGRADED), (true, "WrongReplica"));
    assert_ne!(d.status.phase, Some(ReplicaPhase::Active));
    assert_eq!(d.requeue, Duration::from_secs(30));

    let down = Scene::new(replica("a", 30, None, None))
        .with_pod(Answer::Unreachable("connection refused".into()));
    let d = placement(&down.observed());
    assert_eq!(condition(&d.status, DEGRADED), (true, "Unreachable"));
    let message = &d.status.conditions[0].message;
    assert!(
        message.contains("http://127.1.0.9:7400") && message.contains("connection refused"),
        "{message}"
    );
    assert_eq!(d.status.reachable, Some(false));
}

/// A pod waiting for its bootstrap: asked to start the family or clone a live replica,
/// never twice while one runs, again after a failure (shown as Degraded), and never
/// for a replica that served before.
#[test]
fn bootstrap_decisions() {
    let url = "http://127.1.0.9:7400";
    let a_new = replica("a", 30, None, None);
    let init = Scene::new(a_new.clone()).with_pod(awaiting(false, None));
    let d = placement(&init.observed());
    let bootstrap = d.bootstrap.expect("a bootstrap");
    assert_eq!(bootstrap.url, url);
    assert_eq!(
        bootstrap.request.source,
        BootstrapSource::Init {
            id_prefix: "SAMPL".into(),
            feature_level: 7
        }
    );
    assert_eq!(bootstrap.announce.reason, "Bootstrapping");
    assert_eq!(d.status.phase, Some(ReplicaPhase::Bootstrapping));
    assert_eq!(condition(&d.status, DEGRADED), (false, "Bootstrapping"));
    assert!(d.events.is_empty(), "announced only once the pod took it");

    let mut clone = Scene::new(replica("b", 20, None, None)).with_pod(awaiting(false, None));
    clone.members = vec![
        replica("a", 30, Some(ReplicaPhase::Active), None),
        replica("b", 20, None, None),
    ];
    let d = placement(&clone.observed());
    assert_eq!(
        d.bootstrap.expect("a bootstrap").request.source,
        BootstrapSource::CloneFrom("http://a:7400".into())
    );

    let running = Scene::new(a_new.clone()).with_pod(awaiting(true, None));
    let d = placement(&running.observed());
    assert!(d.bootstrap.is_none());
    assert_eq!(condition(&d.status, PROGRESSING), (true, "Bootstrapping"));

    let failed = Scene::new(a_new).with_pod(awaiting(false, Some("disk full")));
    let d = placement(&failed.observed());
    assert!(d.bootstrap.is_some(), "asked again");
    assert_eq!(condition(&d.status, DEGRADED), (true, "BootstrapFailed"));

    let lost = Scene::new(replica("a", 30, Some(ReplicaPhase::Active), None))
        .with_pod(awaiting(false, None));
    let d = placement(&lost.observed());
    assert!(d.bootstrap.is_none());
    assert_eq!(condition(&d.status, DEGRADED), (true, "DataLost"));
    assert_eq!(reasons(&d.events), ["DataLost"]);
    assert!(d.events[0].warning);
}

#[test]
fn the_server_is_asked_only_when_its_answer_decides_something() {
    let pod_with_ip = serving_pod("127.1.0.9", true);
    let pod_without_ip = pod(json!({"phase": "Pending"}));
    let mut leaving = in_namespace(&replica("a", 30, Some(ReplicaPhase::Active), None));
    leaving.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    let mut forced_out = leaving.clone();
    forced_out
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(FORCE_REMOVE.into(), "true".into());
    let mut never_served = in_namespace(&replica("a", 30, None, None));
    never_served.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    let placed = in_namespace(&replica("a", 30, None, None));
    for (replica, placed_ok, pod, expected) in [
        (&placed, true, Some(&pod_with_ip), true),
        (&placed, false, Some(&pod_with_ip), false),
        (&placed, true, Some(&pod_without_ip), false),
        (&placed, true, None, false),
        (&leaving, false, Some(&pod_with_ip), true),
        (&leaving, true, None, false),
        (&forced_out, true, Some(&pod_with_ip), false),
        (&never_served, true, Some(&pod_with_ip), false),
    ] {
        assert_eq!(
            needs_answer(replica, placed_ok, pod),
            expected,
            "{:?} placed={placed_ok} pod={}",
            replica.metadata.annotations,
            pod.is_some()
        );
    }
}

fn leaving(scene: Scene) -> Scene {
    let mut scene = scene;
    scene.replica.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    scene
}

/// The removal workflow, step by step: each row a leaving replica's situation and the
/// step it takes.
#[test]
fn removal_steps() {
    let url = "http://127.1.0.9:7400";
    let a = replica("a", 30, Some(ReplicaPhase::Active), None);
    let b = replica("b", 20, Some(ReplicaPhase::Active), None);
    let b_new = replica("b", 20, None, None);
    let with_pending = |pending: Option<Vec<&str>>| {
        let mut r = report("a", (7, 7));
        r.removal_pending = pending.map(|p| p.into_iter().map(str::to_string).collect());
        Answer::Report(Box::new(r))
    };
    let members = |scene: Scene, members: Vec<Arc<Replica>>| Scene { members, ..scene };
    let mut forced = leaving(Scene::new(a.clone()));
    forced
        .replica
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(FORCE_REMOVE.into(), "true".into());
    type Row = (&'static str, Scene, RemovalStep, Option<&'static str>);
    let finish = |why: &str| RemovalStep::Finish(why.to_string());
    let rows: Vec<Row> = vec![
        (
            "forced",
            forced,
            finish("multisite.dev/force-remove set"),
            None,
        ),
        (
            "never served",
            leaving(Scene::new(replica("a", 30, None, None))),
            finish("the replica never served"),
            None,
        ),
        (
            "no pod",
            leaving(Scene::new(a.clone())),
            RemovalStep::Wait,
            Some("waiting for pod a-0 to serve"),
        ),
        (
            "pod holds no data",
            leaving(Scene::new(a.clone()).with_pod(awaiting(false, None))),
            finish("the replica holds no data"),
            None,
        ),
        (
            "unreachable",
            leaving(Scene::new(a.clone()).with_pod(Answer::Unreachable("refused".into()))),
            RemovalStep::Wait,
            Some("cannot reach the replica to move its mastership (refused)"),
        ),
        (
            "an heir is active",
            members(
                leaving(Scene::new(a.clone()).with_pod(with_pending(None))),
                vec![a.clone(), b.clone()],
            ),
            RemovalStep::Retire {
                url: url.into(),
                heir: "b".into(),
            },
            Some("mastership moved to b"),
        ),
        (
            "the last replica",
            leaving(Scene::new(a.clone()).with_pod(with_pending(None))),
            finish("the family's last replica"),
            None,
        ),
        (
            "no heir active yet",
            members(
                leaving(Scene::new(a.clone()).with_pod(with_pending(None))),
                vec![a.clone(), b_new],
            ),
            RemovalStep::Wait,
            Some("waiting for another replica to be Active"),
        ),
        (
            "peers still lack its changes",
            members(
                leaving(Scene::new(a.clone()).with_pod(with_pending(Some(vec!["b"])))),
                vec![a.clone(), b.clone()],
            ),
            RemovalStep::Wait,
            Some("waiting for b to receive this replica's last changes"),
        ),
        (
            "every peer holds its changes",
            members(
                leaving(Scene::new(a.clone()).with_pod(with_pending(Some(vec![])))),
                vec![a.clone(), b],
            ),
            finish("every peer holds a's changes"),
            None,
        ),
    ];
    for (name, scene, step, message) in rows {
        let d = removal(&scene.observed());
        match (&d.step, &step) {
            (RemovalStep::Finish(got), RemovalStep::Finish(want)) => {
                assert!(got.starts_with(want.as_str()), "{name}: {got}")
            }
            (got, want) => assert_eq!(got, want, "{name}"),
        }
        assert_eq!(
            d.starting.as_ref().map(|s| s.reason),
            Some("Removing"),
            "{name}"
        );
        if let Some(message) = message {
            assert_eq!(d.status.phase, Some(ReplicaPhase::Removing), "{name}");
            let progressing = d
                .status
                .conditions
                .iter()
                .find(|c| c.type_ == PROGRESSING)
                .expect("Progressing");
            assert!(
                progressing.message.starts_with(message),
                "{name}: {}",
                progressing.message
            );
        }
    }
}

#[test]
fn removal_is_announced_once() {
    let mut scene = leaving(Scene::new(replica(
        "a",
        30,
        Some(ReplicaPhase::Active),
        None,
    )));
    let first = removal(&scene.observed());
    assert!(first.starting.is_some());
    scene.replica.status = Some(first.status);
    assert!(removal(&scene.observed()).starting.is_none());
}

#[test]
fn the_gateway_replica_inherits_a_leaving_replicas_mastership() {
    let a = replica("a", 30, Some(ReplicaPhase::Active), None);
    let b = replica("b", 20, Some(ReplicaPhase::Active), None);
    let c = replica("c", 10, Some(ReplicaPhase::Active), None);
    let mut scene =
        leaving(Scene::new(a.clone()).with_pod(Answer::Report(Box::new(report("a", (7, 7))))));
    scene.members = vec![a, b, c];
    if let Some(f) = scene.family.as_mut() {
        f.spec.gateway = Some(GatewaySpec {
            replica: "c".into(),
            endpoint: None,
        })
    }
    assert!(
        matches!(removal(&scene.observed()).step, RemovalStep::Retire { heir, .. } if heir == "c")
    );
}
