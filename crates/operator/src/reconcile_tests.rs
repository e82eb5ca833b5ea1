//! The reconcile tier: one reconcile of a controller against a scripted Kubernetes API
//! on loopback, asserting the requests it makes, request by request. Between the pure
//! rules' tests and the end-to-end runs, this is where a request dropped from (or added
//! to) a reconcile shows.

use super::context::{Ctx, Stores};
use super::{builders, metrics, replicas};
use axum::body::Bytes;
use axum::http::{Method, StatusCode, Uri};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use multisite_core::api::{Replica, ReplicaFamily, ReplicaFamilySpec, ReplicaSpec, Site, SiteSpec};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};

/// One request the operator made: method, path, and its JSON body (if any).
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    body: Value,
}

impl Seen {
    fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// How the scripted API answers one request: a status and a body.
type Answer = (StatusCode, Value);

fn not_found(path: &str) -> Answer {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "reason": "NotFound", "code": 404, "message": format!("{path} not found")}),
    )
}

/// Answers a read with the object `stored` has at the path (404 when none), a patch with
/// the stored object (of the object, for a subresource) or else the body sent, a create
/// with the body sent, and a delete with success.
fn answer(
    method: &Method,
    path: &str,
    body: &Value,
    stored: &dyn Fn(&str) -> Option<Value>,
) -> Answer {
    match *method {
        Method::GET => match stored(path) {
            Some(object) => (StatusCode::OK, object),
            None => not_found(path),
        },
        Method::DELETE => (
            StatusCode::OK,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200}),
        ),
        Method::POST => (StatusCode::CREATED, body.clone()),
        _ => {
            let object = path.strip_suffix("/status").unwrap_or(path);
            (
                StatusCode::OK,
                stored(object).unwrap_or_else(|| body.clone()),
            )
        }
    }
}

/// A Kubernetes API on loopback that records every request and answers by `read`.
struct ScriptedApi {
    seen: Arc<Mutex<Vec<Seen>>>,
    client: kube::Client,
}

/// A router that records every request into `seen` and answers it by `answer`
/// (method, path, JSON body).
fn recording(
    seen: Arc<Mutex<Vec<Seen>>>,
    answer: impl Fn(&Method, &str, &Value) -> Answer + Send + Sync + 'static,
) -> axum::Router {
    let answer = Arc::new(answer);
    axum::Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
        let seen = seen.clone();
        let answer = answer.clone();
        async move {
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let path = uri.path().to_string();
            let (status, reply) = answer(&method, &path, &body);
            seen.lock().unwrap().push(Seen { method, path, body });
            (status, axum::Json(reply))
        }
    })
}

impl ScriptedApi {
    async fn start(read: impl Fn(&str) -> Option<Value> + Send + Sync + 'static) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let app = recording(seen.clone(), move |method, path, body| {
            answer(method, path, body, &read)
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let config = kube::Config::new(url.parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        ScriptedApi { seen, client }
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn lines(&self) -> Vec<String> {
        self.requests().iter().map(Seen::line).collect()
    }
}

fn store_of<K>(objects: Vec<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (reader, mut writer) = reflector::store();
    for object in objects {
        writer.apply_watcher_event(&watcher::Event::Apply(object));
    }
    reader
}

/// The caches of a scope holding these objects, and none of the replicas' workloads.
fn stores(replicas: Vec<Replica>, families: Vec<ReplicaFamily>, sites: Vec<Site>) -> Stores {
    Stores {
        replicas: store_of(replicas),
        families: store_of(families),
        sites: store_of(sites),
        statefulsets: store_of(vec![]),
        deployments: store_of(vec![]),
        services: store_of(vec![]),
        pods: store_of(vec![]),
    }
}

fn context(
    api: &ScriptedApi,
    replicas: Vec<Replica>,
    families: Vec<ReplicaFamily>,
    sites: Vec<Site>,
) -> Arc<Ctx> {
    context_with(api, stores(replicas, families, sites))
}

fn context_with(api: &ScriptedApi, stores: Stores) -> Arc<Ctx> {
    let recorder = Recorder::new(
        api.client.clone(),
        Reporter {
            controller: "multisite-operator".into(),
            instance: Some("test".into()),
        },
    );
    Arc::new(Ctx::new(
        api.client.clone(),
        recorder,
        Arc::new(metrics::Metrics::default()),
        builders::Image {
            reference: "multisite:test".into(),
            pull_policy: "Never".into(),
        },
        stores,
    ))
}

const NS: &str = "tracker";
const REPLICAS: &str = "/apis/multisite.dev/v1alpha1/namespaces/tracker/replicas";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/tracker/events";

fn replica(finalized: bool) -> Replica {
    let mut r = Replica::new(
        "sampl-tokyo",
        ReplicaSpec {
            family: "sampl".into(),
            site: "tokyo".into(),
            storage: "1Gi".into(),
            bootstrap_from: None,
            resources: None,
        },
    );
    r.metadata.namespace = Some(NS.into());
    r.metadata.uid = Some("uid-r".into());
    r.metadata.resource_version = Some("7".into());
    r.metadata.generation = Some(1);
    if finalized {
        r.metadata.finalizers = Some(vec![replicas::FINALIZER.into()]);
    }
    r
}

/// The API's store: only the Replica itself.
fn stored(replica: &Replica) -> impl Fn(&str) -> Option<Value> + Send + Sync + 'static {
    let path = format!(
        "{REPLICAS}/{}",
        replica.metadata.name.clone().unwrap_or_default()
    );
    let object = serde_json::to_value(replica).unwrap();
    move |p: &str| (p == path).then(|| object.clone())
}

fn family() -> ReplicaFamily {
    let mut f = ReplicaFamily::new("sampl", ReplicaFamilySpec::new("SAMPL", 7));
    f.metadata.namespace = Some(NS.into());
    f.metadata.uid = Some("uid-f".into());
    f
}

fn site() -> Site {
    let mut s = Site::new("tokyo", SiteSpec::default());
    s.metadata.namespace = Some(NS.into());
    s
}

/// A new Replica gets the removal finalizer before anything else, with one patch that
/// carries the version read (so a stale copy cannot overwrite another's finalizers).
#[tokio::test]
async fn a_new_replica_gets_its_finalizer_first_and_nothing_else() {
    let r = replica(false);
    let api = ScriptedApi::start(stored(&r)).await;
    let ctx = context(&api, vec![r.clone()], vec![family()], vec![site()]);
    replicas::reconcile(Arc::new(r), ctx)
        .await
        .expect("a reconcile");
    let requests = api.requests();
    assert_eq!(api.lines(), [format!("PATCH {REPLICAS}/sampl-tokyo")]);
    assert_eq!(
        requests[0].body["metadata"]["finalizers"],
        json!([replicas::FINALIZER])
    );
    assert_eq!(requests[0].body["metadata"]["resourceVersion"], json!("7"));
}

/// A Replica whose family does not exist yet only says so in its status.
#[tokio::test]
async fn a_replica_without_its_family_reports_it_in_status_only() {
    let r = replica(true);
    let api = ScriptedApi::start(stored(&r)).await;
    let ctx = context(&api, vec![r.clone()], vec![], vec![site()]);
    replicas::reconcile(Arc::new(r), ctx)
        .await
        .expect("a reconcile");
    let requests = api.requests();
    assert_eq!(
        api.lines(),
        [format!("PATCH {REPLICAS}/sampl-tokyo/status")]
    );
    let status = &requests[0].body["status"];
    assert_eq!(status["phase"], json!("Pending"));
    let degraded = status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Degraded"))
        .expect("a Degraded condition");
    assert_eq!(degraded["reason"], json!("FamilyNotFound"));
}

/// The first reconcile of a placed Replica: the family Secret is made (and announced),
/// the StatefulSet and Service applied, and the status written. The pod is looked for
/// in the cache, not asked of the API server.
#[tokio::test]
async fn a_placed_replica_gets_its_secret_workload_and_status() {
    let r = replica(true);
    let api = ScriptedApi::start(stored(&r)).await;
    let ctx = context(&api, vec![r.clone()], vec![family()], vec![site()]);
    replicas::reconcile(Arc::new(r), ctx)
        .await
        .expect("a reconcile");
    assert_eq!(
        api.lines(),
        [
            format!("GET /api/v1/namespaces/{NS}/secrets/sampl-secret"),
            format!("POST /api/v1/namespaces/{NS}/secrets"),
            format!("POST {EVENTS}"),
            format!("PATCH /apis/apps/v1/namespaces/{NS}/statefulsets/sampl-tokyo"),
            format!("PATCH /api/v1/namespaces/{NS}/services/sampl-tokyo"),
            format!("PATCH {REPLICAS}/sampl-tokyo/status"),
        ]
    );
    let requests = api.requests();
    assert_eq!(requests[3].body["kind"], json!("StatefulSet"));
    assert_eq!(requests[4].body["spec"]["clusterIP"], json!("None"));
    assert_eq!(requests[2].body["reason"], json!("SecretCreated"));
}

/// Deleting a Replica that never served: its workload and data go, then its finalizer;
/// both steps are announced as events.
#[tokio::test]
async fn removing_a_replica_that_never_served_deletes_its_workload_then_the_finalizer() {
    let mut r = replica(true);
    r.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    let api = ScriptedApi::start(stored(&r)).await;
    let ctx = context(&api, vec![r.clone()], vec![family()], vec![site()]);
    replicas::reconcile(Arc::new(r), ctx)
        .await
        .expect("a reconcile");
    assert_eq!(
        api.lines(),
        [
            format!("POST {EVENTS}"),
            format!("DELETE /apis/apps/v1/namespaces/{NS}/statefulsets/sampl-tokyo"),
            format!("DELETE /api/v1/namespaces/{NS}/services/sampl-tokyo"),
            format!("DELETE /api/v1/namespaces/{NS}/persistentvolumeclaims/data-sampl-tokyo-0"),
            format!("POST {EVENTS}"),
            format!("PATCH {REPLICAS}/sampl-tokyo"),
        ]
    );
    let requests = api.requests();
    assert_eq!(requests[0].body["reason"], json!("Removing"));
    assert_eq!(requests[4].body["reason"], json!("Removed"));
    assert_eq!(requests[5].body["metadata"]["finalizers"], json!([]));
}

/// A Site's status counts the replicas it hosts, in one status apply.
#[tokio::test]
async fn a_site_counts_its_replicas_in_one_status_write() {
    let s = site();
    let path = format!("/apis/multisite.dev/v1alpha1/namespaces/{NS}/sites/tokyo");
    let object = serde_json::to_value(&s).unwrap();
    let api = ScriptedApi::start(move |p| (p == path).then(|| object.clone())).await;
    let ctx = context(&api, vec![replica(true)], vec![family()], vec![s.clone()]);
    super::sites::reconcile_site(Arc::new(s), ctx)
        .await
        .expect("a reconcile");
    assert_eq!(
        api.lines(),
        [format!(
            "PATCH /apis/multisite.dev/v1alpha1/namespaces/{NS}/sites/tokyo/status"
        )]
    );
    let status = &api.requests()[0].body["status"];
    assert_eq!(status["replicaCount"], json!(1));
    assert_eq!(status["replicas"], json!(["sampl-tokyo"]));
}

/// Every controller's back-off is reset by its next success: a Site that failed twice
/// waits the shortest time again after one good reconcile.
#[tokio::test]
async fn a_success_resets_the_back_off_of_a_site() {
    let s = site();
    let path = format!("/apis/multisite.dev/v1alpha1/namespaces/{NS}/sites/tokyo");
    let object = serde_json::to_value(&s).unwrap();
    let api = ScriptedApi::start(move |p| (p == path).then(|| object.clone())).await;
    let ctx = context(&api, vec![], vec![], vec![s.clone()]);
    let failure = super::OperatorError::Secret("test failure".into());
    for _ in 0..2 {
        super::reconcile::error_policy(Arc::new(s.clone()), &failure, ctx.clone());
    }
    let third = ctx.backoffs.failed("Site/tracker/tokyo");
    assert!(third >= std::time::Duration::from_secs(4), "{third:?}");
    super::sites::reconcile_site(Arc::new(s.clone()), ctx.clone())
        .await
        .expect("a reconcile");
    let after = ctx.backoffs.failed("Site/tracker/tokyo");
    assert!(after <= std::time::Duration::from_secs(2), "{after:?}");
}

/// The sync runner wakes the family controller only when what it reports of a family
/// changed: its links' lag, held packets, errors, first task, or its topology error; the
/// same report again, or a task's start and end alone, is silent.
#[tokio::test]
async fn link_and_topology_changes_trigger_the_family_and_repeats_do_not() {
    let api = ScriptedApi::start(|_| None).await;
    let ctx = context(&api, vec![], vec![family()], vec![]);
    let mut triggers = ctx.take_family_triggers().expect("the trigger stream");
    assert!(ctx.take_family_triggers().is_none(), "taken once");
    let key = (NS.to_string(), "sampl".to_string());
    let mut woken = || {
        let mut refs = Vec::new();
        while let Ok(r) = triggers.try_recv() {
            refs.push(format!("{}/{}", r.namespace.unwrap_or_default(), r.name));
        }
        refs
    };
    let link = |lag: i64| multisite_core::api::LinkStatus {
        from: "sampl-tokyo".into(),
        to: "sampl-paris".into(),
        lag_changes: lag,
        ..Default::default()
    };
    ctx.set_links(key.clone(), vec![link(3)]);
    assert_eq!(woken(), ["tracker/sampl"]);
    ctx.set_links(key.clone(), vec![link(3)]);
    assert!(woken().is_empty());
    ctx.set_links(key.clone(), vec![link(0)]);
    assert_eq!(woken(), ["tracker/sampl"]);
    // A task running or just run, nothing else changed: the family's poll shows it.
    let ran = multisite_core::api::LinkStatus {
        running: true,
        last_task_time: Some("2026-12-07T23:54:19Z".into()),
        ..link(0)
    };
    ctx.set_links(key.clone(), vec![ran.clone()]);
    assert!(woken().is_empty());
    assert_eq!(ctx.links_of(&key), [ran], "the latest states are kept");
    for changed in [
        multisite_core::api::LinkStatus {
            error: Some("refused".into()),
            ..link(0)
        },
        multisite_core::api::LinkStatus {
            held_packets: 1,
            ..link(0)
        },
        multisite_core::api::LinkStatus {
            last_task: Some("Incremental".into()),
            ..link(0)
        },
    ] {
        ctx.set_links(key.clone(), vec![link(0)]);
        woken();
        ctx.set_links(key.clone(), vec![changed.clone()]);
        assert_eq!(woken(), ["tracker/sampl"], "{changed:?}");
    }
    // A link that goes away changes the family too.
    ctx.set_links(key.clone(), vec![]);
    assert_eq!(woken(), ["tracker/sampl"]);
    ctx.set_topology_error(key.clone(), Some("no hub".into()));
    ctx.set_topology_error(key.clone(), Some("no hub".into()));
    assert_eq!(woken(), ["tracker/sampl"]);
    ctx.set_topology_error(key.clone(), None);
    ctx.set_topology_error(key.clone(), None);
    assert_eq!(woken(), ["tracker/sampl"]);
}

/// A replica server on loopback that records every request and answers by `answer`.
/// Pods serve the replica API on the product's fixed port, so each stub takes that port
/// on a loopback address of its own, chosen at run time among free ones.
struct ReplicaStub {
    seen: Arc<Mutex<Vec<Seen>>>,
    ip: String,
}

impl ReplicaStub {
    async fn start(answer: impl Fn(&Method, &str) -> Answer + Send + Sync + 'static) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let app = recording(seen.clone(), move |method, path, _| answer(method, path));
        let base = std::process::id() % 200;
        let listener = loop {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            assert!(n < 1000, "no free loopback address for a replica stub");
            let ip = format!("127.{}.{}.{}", 100 + base % 50, n / 250, 1 + n % 250);
            if let Ok(listener) =
                tokio::net::TcpListener::bind(format!("{ip}:{}", builders::API_PORT)).await
            {
                break listener;
            }
        };
        let ip = listener.local_addr().unwrap().ip().to_string();
        tokio::spawn(async move { axum::serve(listener, app).await });
        ReplicaStub { seen, ip }
    }

    fn lines(&self) -> Vec<String> {
        self.seen.lock().unwrap().iter().map(Seen::line).collect()
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// A pod of `replica` that serves at this stub, ready.
    fn pod(&self, replica: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": builders::pod_name(replica), "namespace": NS},
            "status": {"podIP": self.ip, "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap()
    }
}

/// The API's store: the Replica and the family Secret.
fn stored_with_secret(replica: &Replica) -> impl Fn(&str) -> Option<Value> + Send + Sync + 'static {
    let own = stored(replica);
    let secret =
        builders::family_secret(&family(), &multisite_replica::secret::generate().unwrap());
    let path = format!("/api/v1/namespaces/{NS}/secrets/sampl-secret");
    let secret = serde_json::to_value(secret).unwrap();
    move |p: &str| own(p).or_else(|| (p == path).then(|| secret.clone()))
}

fn status_report(replica: &str) -> Value {
    json!({
        "family": "sampl", "replica": replica, "idPrefix": "SAMPL", "idTag": "t",
        "incarnation": 1, "schemaRepositoryFeatureLevel": 7, "userDatabaseFeatureLevel": 7,
        "metaschemaVersion": 22, "packetVersion": {"creates": 11, "acceptsMin": 6, "acceptsMax": 11},
        "syncBlocked": null, "schemaVersion": 1, "userDatabaseSchemaVersion": 1,
        "schemaRepositoryMaster": replica, "epochs": {replica: 4}, "heldPackets": 0, "held": [],
        "peers": [], "mastered": {"records": 3}, "changeLog": 0
    })
}

/// `replica`'s StatefulSet and Service as the operator builds them, as the API server
/// keeps them (generation 1).
fn workload(replica: &Replica) -> (StatefulSet, Service) {
    let image = builders::Image {
        reference: "multisite:test".into(),
        pull_policy: "Never".into(),
    };
    let mut statefulset = builders::stamped(builders::statefulset(replica, &site(), &image));
    statefulset.metadata.generation = Some(1);
    let mut service = builders::stamped(builders::service(replica));
    service.metadata.resource_version = Some("5".into());
    (statefulset, service)
}

/// The API's store: the Replica, the family Secret, and the Replica's workload.
fn stored_settled(replica: &Replica) -> impl Fn(&str) -> Option<Value> + Send + Sync + 'static {
    let base = stored_with_secret(replica);
    let name = replica.metadata.name.clone().unwrap_or_default();
    let (statefulset, service) = workload(replica);
    let paths = [
        (
            format!("/apis/apps/v1/namespaces/{NS}/statefulsets/{name}"),
            serde_json::to_value(statefulset).unwrap(),
        ),
        (
            format!("/api/v1/namespaces/{NS}/services/{name}"),
            serde_json::to_value(service).unwrap(),
        ),
    ];
    move |p: &str| {
        base(p).or_else(|| {
            paths
                .iter()
                .find(|(path, _)| path == p)
                .map(|(_, o)| o.clone())
        })
    }
}

/// The caches of a scope where `replica`'s workload is as the operator builds it and
/// its pod serves at `stub`.
fn settled_stores(replica: &Replica, stub: &ReplicaStub) -> Stores {
    let (statefulset, service) = workload(replica);
    Stores {
        statefulsets: store_of(vec![statefulset]),
        services: store_of(vec![service]),
        pods: store_of(vec![
            stub.pod(&replica.metadata.name.clone().unwrap_or_default()),
        ]),
        ..stores(vec![replica.clone()], vec![family()], vec![site()])
    }
}

/// A serving replica: its own report goes into its status, its workload is applied
/// once by a process that has not applied it yet, and once the status holds the report
/// the poll costs one call to the replica and no request to Kubernetes. A StatefulSet
/// changed by someone else (its generation moved on) is applied again, alone.
#[tokio::test]
async fn a_settled_replica_costs_its_poll_no_kubernetes_request() {
    let stub = ReplicaStub::start(|_, path| {
        if path == multisite_replica::api::route::STATUS {
            (StatusCode::OK, status_report("sampl-tokyo"))
        } else {
            not_found(path)
        }
    })
    .await;
    let mut r = replica(true);
    let api = ScriptedApi::start(stored_settled(&r)).await;
    // The StatefulSet cache with its writer kept, as the watch keeps it.
    let (statefulsets, mut watch) = reflector::store();
    let (cached, _) = workload(&r);
    watch.apply_watcher_event(&watcher::Event::Apply(cached.clone()));
    let ctx = context_with(
        &api,
        Stores {
            statefulsets,
            ..settled_stores(&r, &stub)
        },
    );
    replicas::reconcile(Arc::new(r.clone()), ctx.clone())
        .await
        .expect("a reconcile");
    let statefulset = format!("PATCH /apis/apps/v1/namespaces/{NS}/statefulsets/sampl-tokyo");
    assert_eq!(
        api.lines(),
        [
            format!("GET /api/v1/namespaces/{NS}/secrets/sampl-secret"),
            statefulset.clone(),
            format!("PATCH /api/v1/namespaces/{NS}/services/sampl-tokyo"),
            format!("PATCH {REPLICAS}/sampl-tokyo/status"),
            format!("POST {EVENTS}"),
        ]
    );
    assert_eq!(stub.lines(), ["GET /v1/status"]);
    let written = api.requests()[3].body["status"].clone();
    assert_eq!(written["phase"], json!("Active"));
    assert_eq!(written["epochs"], json!({"sampl-tokyo": 4}));
    assert_eq!(api.requests()[4].body["reason"], json!("Active"));

    // The next poll, with the status written: the replica is asked, Kubernetes is not.
    r.status = Some(serde_json::from_value(written).unwrap());
    replicas::reconcile(Arc::new(r.clone()), ctx.clone())
        .await
        .expect("a reconcile");
    assert_eq!(api.lines().len(), 5, "{:?}", api.lines());
    assert_eq!(stub.lines(), ["GET /v1/status", "GET /v1/status"]);

    // Someone edits the StatefulSet: its generation moves on, the digest stays.
    let mut edited = cached;
    edited.metadata.generation = Some(2);
    watch.apply_watcher_event(&watcher::Event::Apply(edited));
    replicas::reconcile(Arc::new(r.clone()), ctx.clone())
        .await
        .expect("a reconcile");
    assert_eq!(api.lines()[5..], [statefulset]);

    // The watch then brings the object as that apply left it: nothing more to do.
    let (as_applied, _) = workload(&r);
    watch.apply_watcher_event(&watcher::Event::Apply(as_applied));
    replicas::reconcile(Arc::new(r), ctx)
        .await
        .expect("a reconcile");
    assert_eq!(api.lines().len(), 6, "{:?}", api.lines());
}

/// The controllers start only once every cache has loaded its first list.
#[tokio::test]
async fn the_caches_are_ready_only_once_each_has_loaded() {
    use std::time::Duration;
    fn loading<K>() -> (Store<K>, reflector::store::Writer<K>)
    where
        K: kube::Resource<DynamicType = ()> + Clone + 'static,
    {
        reflector::store()
    }
    let (replicas, mut w1) = loading();
    let (families, mut w2) = loading();
    let (sites, mut w3) = loading();
    let (statefulsets, mut w4) = loading();
    let (deployments, mut w5) = loading();
    let (services, mut w6) = loading();
    let (pods, mut w7) = loading::<Pod>();
    let stores = Stores {
        replicas,
        families,
        sites,
        statefulsets,
        deployments,
        services,
        pods,
    };
    let waiting = tokio::time::timeout(Duration::from_millis(50), stores.ready());
    assert!(waiting.await.is_err(), "ready before any cache loaded");
    w1.apply_watcher_event(&watcher::Event::InitDone);
    w2.apply_watcher_event(&watcher::Event::InitDone);
    w3.apply_watcher_event(&watcher::Event::InitDone);
    w4.apply_watcher_event(&watcher::Event::InitDone);
    w5.apply_watcher_event(&watcher::Event::InitDone);
    w6.apply_watcher_event(&watcher::Event::InitDone);
    let waiting = tokio::time::timeout(Duration::from_millis(50), stores.ready());
    assert!(
        waiting.await.is_err(),
        "ready with the pod cache still loading"
    );
    w7.apply_watcher_event(&watcher::Event::InitDone);
    tokio::time::timeout(Duration::from_secs(5), stores.ready())
        .await
        .expect("ready once every cache loaded");
}

/// A pod waiting for its bootstrap is told to start the family; the bootstrap is
/// announced once the pod took it, and the status says Bootstrapping. A pod that
/// answers that a bootstrap runs already is not announced again.
#[tokio::test]
async fn a_waiting_pod_is_bootstrapped_and_announced_once() {
    for (answer, announced) in [
        (
            (
                StatusCode::ACCEPTED,
                json!({"family": "sampl", "replica": "sampl-tokyo", "awaitingBootstrap": true,
                       "running": "creating the family", "error": "bootstrapping"}),
            ),
            true,
        ),
        (
            (
                StatusCode::CONFLICT,
                json!({"error": "a bootstrap runs", "reason": "BootstrapRunning"}),
            ),
            false,
        ),
    ] {
        let stub = ReplicaStub::start(move |method, path| match (method.as_str(), path) {
            ("GET", "/v1/status") => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"family": "sampl", "replica": "sampl-tokyo", "awaitingBootstrap": true,
                       "error": "waiting for bootstrap"}),
            ),
            ("POST", "/v1/bootstrap") => answer.clone(),
            _ => not_found(path),
        })
        .await;
        let r = replica(true);
        let api = ScriptedApi::start(stored_settled(&r)).await;
        let ctx = context_with(&api, settled_stores(&r, &stub));
        replicas::reconcile(Arc::new(r), ctx)
            .await
            .expect("a reconcile");
        assert_eq!(stub.lines(), ["GET /v1/status", "POST /v1/bootstrap"]);
        let request = &stub.requests()[1].body;
        assert_eq!(request["replica"], json!("sampl-tokyo"));
        assert_eq!(request["init"]["id_prefix"], json!("SAMPL"));
        // A process that has not applied the workload yet applies it once.
        let mut expected = vec![
            format!("GET /api/v1/namespaces/{NS}/secrets/sampl-secret"),
            format!("PATCH /apis/apps/v1/namespaces/{NS}/statefulsets/sampl-tokyo"),
            format!("PATCH /api/v1/namespaces/{NS}/services/sampl-tokyo"),
        ];
        if announced {
            expected.push(format!("POST {EVENTS}"));
        }
        expected.push(format!("PATCH {REPLICAS}/sampl-tokyo/status"));
        assert_eq!(api.lines(), expected);
        let status = api.requests().last().unwrap().body["status"].clone();
        assert_eq!(status["phase"], json!("Bootstrapping"));
    }
}

/// A served replica being deleted hands its mastership to the other active replica
/// first, announces it, and waits (finalizer kept) for the peers to receive that.
#[tokio::test]
async fn removal_moves_mastership_to_the_heir_and_keeps_the_finalizer() {
    let stub = ReplicaStub::start(|method, path| match (method.as_str(), path) {
        ("GET", "/v1/status") => (StatusCode::OK, status_report("sampl-tokyo")),
        ("POST", "/v1/retire") => (StatusCode::OK, status_report("sampl-tokyo")),
        _ => not_found(path),
    })
    .await;
    let mut r = replica(true);
    r.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    r.status = Some(multisite_core::api::ReplicaStatus {
        phase: Some(multisite_core::api::ReplicaPhase::Active),
        incarnation: Some(1),
        ..Default::default()
    });
    let mut heir = replica(true);
    heir.metadata.name = Some("sampl-paris".into());
    heir.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(1).unwrap(),
    ));
    heir.status = Some(multisite_core::api::ReplicaStatus {
        phase: Some(multisite_core::api::ReplicaPhase::Active),
        endpoint: Some("http://127.0.0.1:1".into()),
        incarnation: Some(1),
        ..Default::default()
    });
    let api = ScriptedApi::start(stored_settled(&r)).await;
    let ctx = context_with(
        &api,
        Stores {
            replicas: store_of(vec![r.clone(), heir]),
            ..settled_stores(&r, &stub)
        },
    );
    replicas::reconcile(Arc::new(r), ctx)
        .await
        .expect("a reconcile");
    assert_eq!(stub.lines(), ["GET /v1/status", "POST /v1/retire"]);
    assert_eq!(stub.requests()[1].body["to"], json!("sampl-paris"));
    assert_eq!(
        api.lines(),
        [
            format!("GET /api/v1/namespaces/{NS}/secrets/sampl-secret"),
            format!("POST {EVENTS}"),
            format!("POST {EVENTS}"),
            format!("PATCH {REPLICAS}/sampl-tokyo/status"),
        ]
    );
    let requests = api.requests();
    assert_eq!(requests[1].body["reason"], json!("Removing"));
    assert_eq!(requests[2].body["reason"], json!("MastershipMoved"));
    assert_eq!(requests[3].body["status"]["phase"], json!("Removing"));
}

/// A settled family (its one replica Active at the target level, its client tier's
/// Deployment in the cache, complete at the tier's release): its status is written once,
/// and the next reconcile, with that status in place, makes no request at all.
#[tokio::test]
async fn a_settled_family_writes_its_status_once_then_makes_no_request() {
    use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
    let mut f = family();
    f.metadata.generation = Some(1);
    f.spec.clients = vec![multisite_core::api::ClientTier {
        name: "web".into(),
        release: "8.0.1.1".into(),
        replicas: 1,
        site: None,
    }];
    let mut r = replica(true);
    r.status = Some(multisite_core::api::ReplicaStatus {
        phase: Some(multisite_core::api::ReplicaPhase::Active),
        schema_repository_feature_level: Some(7),
        user_database_feature_level: Some(7),
        endpoint: Some("http://127.0.0.1:1".into()),
        incarnation: Some(1),
        conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: "Serving".into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ),
        }],
        ..Default::default()
    });
    let mut tier: Deployment =
        builders::client_deployment(&f, &f.spec.clients[0], "8.0.1.1", "sampl-tokyo", &{
            builders::Image {
                reference: "multisite:test".into(),
                pull_policy: "Never".into(),
            }
        });
    tier.metadata.generation = Some(1);
    tier.status = Some(DeploymentStatus {
        observed_generation: Some(1),
        replicas: Some(1),
        updated_replicas: Some(1),
        ready_replicas: Some(1),
        ..Default::default()
    });
    let family_path = format!("/apis/multisite.dev/v1alpha1/namespaces/{NS}/replicafamilies/sampl");
    let family_object = serde_json::to_value(&f).unwrap();
    let secret = stored_with_secret(&r);
    let api = ScriptedApi::start(move |p| {
        secret(p).or_else(|| (p == family_path).then(|| family_object.clone()))
    })
    .await;
    let ctx = context_with(
        &api,
        Stores {
            deployments: store_of(vec![tier]),
            ..stores(vec![r], vec![f.clone()], vec![site()])
        },
    );
    super::families::reconcile(Arc::new(f.clone()), ctx.clone())
        .await
        .expect("a reconcile");
    let family_status =
        format!("PATCH /apis/multisite.dev/v1alpha1/namespaces/{NS}/replicafamilies/sampl/status");
    assert_eq!(
        api.lines(),
        [
            format!("GET /api/v1/namespaces/{NS}/secrets/sampl-secret"),
            family_status.clone(),
        ]
    );
    let written = api.requests()[1].body["status"].clone();
    assert_eq!(written["featureLevel"], json!(7));
    assert_eq!(
        written["clients"],
        json!([{"name": "web", "release": "8.0.1.1", "replicas": 1, "readyReplicas": 1}])
    );
    let ready = written["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .expect("a Ready condition");
    assert_eq!(ready["status"], json!("True"));

    f.status = Some(serde_json::from_value(written).unwrap());
    super::families::reconcile(Arc::new(f), ctx)
        .await
        .expect("a reconcile");
    assert_eq!(api.lines().len(), 2, "{:?}", api.lines());
}

/// A schema package: applied once at the replica that masters the schema repository
/// (announced), then each replica's user database upgraded once the new schema version
/// has reached it (announced), and the package's status says where each replica is.
#[tokio::test]
async fn a_schema_package_is_applied_at_the_master_then_each_user_database_upgraded() {
    use multisite_core::api::{SchemaPackage, SchemaPackageSpec};
    // The replica's schema versions: (schema, user database); the package makes 2.
    let versions = Arc::new(Mutex::new((1u64, 1u64)));
    let at_replica = versions.clone();
    let stub = ReplicaStub::start(move |method, path| {
        let mut versions = at_replica.lock().unwrap();
        match (method.as_str(), path) {
            ("GET", "/v1/status") => {
                let mut report = status_report("sampl-tokyo");
                report["schemaVersion"] = json!(versions.0);
                report["userDatabaseSchemaVersion"] = json!(versions.1);
                (StatusCode::OK, report)
            }
            ("POST", "/v1/schema-packages") => {
                versions.0 = 2;
                (
                    StatusCode::OK,
                    json!({"version": 2, "package": "Interop 1.0", "recordTypes": []}),
                )
            }
            ("POST", "/v1/upgrade") => {
                versions.1 = 2;
                (StatusCode::OK, status_report("sampl-tokyo"))
            }
            _ => not_found(path),
        }
    })
    .await;
    let mut r = replica(true);
    r.status = Some(multisite_core::api::ReplicaStatus {
        phase: Some(multisite_core::api::ReplicaPhase::Active),
        endpoint: Some(format!("http://{}:{}", stub.ip, builders::API_PORT)),
        ..Default::default()
    });
    let mut package: SchemaPackage = SchemaPackage::new(
        "interop",
        serde_json::from_value::<SchemaPackageSpec>(json!({
            "family": "sampl", "package": "Interop", "version": "1.0",
            "recordTypes": [{"name": "ChangeEvent", "fields": [{"name": "record", "type": "String"}]}]
        }))
        .unwrap(),
    );
    package.metadata.namespace = Some(NS.into());
    package.metadata.generation = Some(1);
    let package_path =
        format!("/apis/multisite.dev/v1alpha1/namespaces/{NS}/schemapackages/interop");
    let package_object = serde_json::to_value(&package).unwrap();
    let secret = stored_with_secret(&r);
    let api = ScriptedApi::start(move |p| {
        secret(p).or_else(|| (p == package_path).then(|| package_object.clone()))
    })
    .await;
    let ctx = context(&api, vec![r], vec![family()], vec![site()]);
    let status_write =
        format!("PATCH /apis/multisite.dev/v1alpha1/namespaces/{NS}/schemapackages/interop/status");

    super::packages::reconcile_package(Arc::new(package.clone()), ctx.clone())
        .await
        .expect("a reconcile");
    assert_eq!(stub.lines(), ["GET /v1/status", "POST /v1/schema-packages"]);
    assert_eq!(stub.requests()[1].body["package"], json!("Interop"));
    assert_eq!(
        api.lines(),
        [
            format!("GET /api/v1/namespaces/{NS}/secrets/sampl-secret"),
            format!("POST {EVENTS}"),
            status_write.clone(),
        ]
    );
    assert_eq!(api.requests()[1].body["reason"], json!("Applied"));
    let written = api.requests()[2].body["status"].clone();
    assert_eq!(written["schemaVersion"], json!(2));
    assert_eq!(written["replicas"][0]["applied"], json!(false));

    // Next look: the version has arrived; the user database is upgraded to it.
    package.status = Some(serde_json::from_value(written).unwrap());
    super::packages::reconcile_package(Arc::new(package), ctx)
        .await
        .expect("a reconcile");
    assert_eq!(
        stub.lines()[2..],
        ["GET /v1/status", "POST /v1/upgrade"],
        "not applied twice"
    );
    assert_eq!(
        stub.requests()[3].body["userDatabaseSchema"],
        json!(2),
        "{:?}",
        stub.requests()[3].body
    );
    assert_eq!(api.lines()[3..], [format!("POST {EVENTS}"), status_write]);
    assert_eq!(
        api.requests()[3].body["reason"],
        json!("UserDatabaseUpgraded")
    );
    let status = &api.requests()[4].body["status"];
    assert_eq!(status["replicas"][0]["applied"], json!(true));
    assert_eq!(status["replicas"][0]["userDatabaseUpgraded"], json!(true));
    assert_eq!(*versions.lock().unwrap(), (2, 2));
}

/// Push calls seen by the replica stubs of the sync runner test: how many full and
/// incremental pushes run now, the most full ones seen at once, whether a full push ever
/// ran beside an incremental one, and the full pushes done.
#[derive(Clone, Copy, Debug, Default)]
struct Pushes {
    full: usize,
    incremental: usize,
    most_full: usize,
    mixed: bool,
    full_done: usize,
}

/// A replica of family `family` named `name` on a loopback address of its own, serving
/// its status (knowing `peer`) and pushes that take `takes` each.
async fn syncing_replica(
    family: &'static str,
    name: &'static str,
    peer: &'static str,
    pushes: Arc<Mutex<Pushes>>,
    takes: std::time::Duration,
) -> String {
    use axum::routing::{get, post};
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let status = move || async move {
        let mut report = status_report(name);
        report["family"] = json!(family);
        report["peers"] = json!([{"name": peer, "idTag": "p", "active": true,
                                  "incarnation": 1, "acknowledged": {}}]);
        axum::Json(report)
    };
    let push = move |axum::Json(request): axum::Json<Value>| {
        let pushes = pushes.clone();
        async move {
            let full = request["full"] == json!(true);
            {
                let mut p = pushes.lock().unwrap();
                if full {
                    p.full += 1;
                    p.most_full = p.most_full.max(p.full);
                } else {
                    p.incremental += 1;
                }
                p.mixed |= p.full > 0 && p.incremental > 0;
            }
            tokio::time::sleep(takes).await;
            {
                let mut p = pushes.lock().unwrap();
                if full {
                    p.full = p.full.saturating_sub(1);
                    p.full_done += 1;
                } else {
                    p.incremental = p.incremental.saturating_sub(1);
                }
            }
            axum::Json(
                json!({"from": name, "to": peer, "packets": 0, "changesSent": 0,
                              "applied": 0, "skipped": 0, "held": null, "lag": 0}),
            )
        }
    };
    let app = axum::Router::new()
        .route(multisite_replica::api::route::STATUS, get(status))
        .route(multisite_replica::api::route::SYNC_PUSH, post(push));
    let base = 50 + std::process::id() % 50;
    let listener = loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(n < 1000, "no free loopback address for a replica stub");
        let ip = format!("127.{}.{}.{}", 100 + base, n / 250, 1 + n % 250);
        if let Ok(listener) =
            tokio::net::TcpListener::bind(format!("{ip}:{}", builders::API_PORT)).await
        {
            break listener;
        }
    };
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// Runs the sync runner over three families of two replicas each under `limits`, until
/// every link has run a full task; returns what the replicas saw.
async fn three_families_synced(limits: multisite_core::domain::scheduler::Limits) -> Pushes {
    three_families_synced_with(limits, None).await.0
}

/// [`three_families_synced`], where family `paused` (if any) reaches the pause step of
/// an upgrade plan while tasks wait (pushes then take 800 ms, so that they do wait):
/// returns what the other families' replicas saw, and what the paused family's saw of
/// full tasks started after the pause (`full_done` counts only those), once every link
/// of the others ran a full task (and a while longer).
async fn three_families_synced_with(
    limits: multisite_core::domain::scheduler::Limits,
    paused: Option<&str>,
) -> (Pushes, Pushes) {
    let takes = std::time::Duration::from_millis(if paused.is_some() { 800 } else { 300 });
    let pushes = Arc::new(Mutex::new(Pushes::default()));
    let paused_pushes = Arc::new(Mutex::new(Pushes::default()));
    let mut replicas = Vec::new();
    let mut families = Vec::new();
    let mut secrets = Vec::new();
    for (family, [x, y]) in [
        ("fa", ["fa-x", "fa-y"]),
        ("fb", ["fb-x", "fb-y"]),
        ("fc", ["fc-x", "fc-y"]),
    ] {
        let mut f = ReplicaFamily::new(family, ReplicaFamilySpec::new("F", 7));
        f.metadata.namespace = Some(NS.into());
        f.metadata.uid = Some(format!("uid-{family}"));
        let is_paused = paused == Some(family);
        let seen_by = if is_paused { &paused_pushes } else { &pushes };
        let value = multisite_replica::secret::generate().unwrap();
        secrets.push((
            format!("/api/v1/namespaces/{NS}/secrets/{family}-secret"),
            serde_json::to_value(builders::family_secret(&f, &value)).unwrap(),
        ));
        families.push(f);
        for (name, peer) in [(x, y), (y, x)] {
            let url = syncing_replica(family, name, peer, seen_by.clone(), takes).await;
            let mut r = Replica::new(
                name,
                ReplicaSpec {
                    family: family.into(),
                    site: "tokyo".into(),
                    storage: "1Gi".into(),
                    bootstrap_from: None,
                    resources: None,
                },
            );
            r.metadata.namespace = Some(NS.into());
            r.status = Some(multisite_core::api::ReplicaStatus {
                phase: Some(multisite_core::api::ReplicaPhase::Active),
                endpoint: Some(url),
                ..Default::default()
            });
            replicas.push(r);
        }
    }
    let api = ScriptedApi::start(move |p| {
        secrets
            .iter()
            .find(|(path, _)| path == p)
            .map(|(_, s)| s.clone())
    })
    .await;
    // The family cache with its writer kept, to pause a family while the runner runs.
    let (family_cache, mut family_watch) = reflector::store();
    for f in &families {
        family_watch.apply_watcher_event(&watcher::Event::Apply(f.clone()));
    }
    let ctx = context_with(
        &api,
        Stores {
            families: family_cache,
            ..stores(replicas, vec![], vec![site()])
        },
    );
    let (scopes, ready) = tokio::sync::mpsc::unbounded_channel();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let runner = tokio::spawn(super::sync::run(
        ready,
        limits,
        Arc::new(metrics::Metrics::default()),
        stopped,
    ));
    scopes.send(ctx).unwrap();
    let started = std::time::Instant::now();
    let mut paused_started_before = 0;
    if let Some(name) = paused {
        // The first full task runs, tasks wait behind it: now the pause.
        while pushes.lock().unwrap().full == 0 && paused_pushes.lock().unwrap().full == 0 {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "no task ran"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let mut f = families
            .iter()
            .find(|f| f.metadata.name.as_deref() == Some(name))
            .expect("the paused family")
            .clone();
        f.status = Some(multisite_core::api::ReplicaFamilyStatus {
            plan: Some(multisite_core::api::PlanStatus {
                sync_paused: true,
                ..Default::default()
            }),
            ..Default::default()
        });
        family_watch.apply_watcher_event(&watcher::Event::Apply(f));
        // Once the runner has looked (a tick), what the paused family has started so far
        // is done or running; nothing of it may start from now on.
        tokio::time::sleep(super::sync::TICK + std::time::Duration::from_millis(100)).await;
        let at_pause = *paused_pushes.lock().unwrap();
        paused_started_before = at_pause.full_done + at_pause.full;
    }
    let links = if paused.is_some() { 4 } else { 6 };
    while pushes.lock().unwrap().full_done < links {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "not every link ran a full task"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // A while longer: a paused family's tasks would have had their turn by now.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    stop.send(true).unwrap();
    runner.await.unwrap();
    let mut paused_seen = *paused_pushes.lock().unwrap();
    paused_seen.full_done -= paused_started_before.min(paused_seen.full_done);
    (*pushes.lock().unwrap(), paused_seen)
}

/// A family that reaches the pause step of its upgrade plan while its tasks wait behind
/// other families' runs none of them: one scheduler serves it with the others, whose
/// tasks keep ending and making room.
#[tokio::test]
async fn a_paused_family_runs_no_task_while_the_others_sync() {
    let (others, paused) = three_families_synced_with(
        multisite_core::domain::scheduler::Limits::default(),
        Some("fb"),
    )
    .await;
    assert!(others.full_done >= 4, "{others:?}");
    assert_eq!(
        paused.full_done, 0,
        "full tasks started after the pause: {paused:?}"
    );
}

/// The operator's limit on full tasks holds across its families: three families whose
/// own limits allow one full task each never run two at once under the default limits,
/// and do run side by side once the operator allows three. A full task never runs
/// beside an incremental one.
#[tokio::test]
async fn three_families_never_run_more_full_tasks_than_the_operator_allows() {
    use multisite_core::domain::scheduler::Limits;
    let one = three_families_synced(Limits::default()).await;
    assert_eq!(
        one.most_full, 1,
        "full tasks at once under the default limits"
    );
    assert!(!one.mixed, "a full task ran beside an incremental one");
    let three = three_families_synced(Limits {
        max_concurrent_full: std::num::NonZeroU32::new(3).unwrap(),
        ..Limits::default()
    })
    .await;
    assert!(
        three.most_full > 1,
        "the families' full tasks never ran side by side: {}",
        three.most_full
    );
    assert!(three.most_full <= 3);
    assert!(!three.mixed);
}
