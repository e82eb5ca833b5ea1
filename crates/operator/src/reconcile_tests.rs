//! The reconcile tier: one reconcile of a controller against a scripted Kubernetes API
//! on loopback, asserting the requests it makes, request by request. Between the pure
//! rules' tests and the end-to-end runs, this is where a request dropped from (or added
//! to) a reconcile shows.

use super::context::Ctx;
use super::{builders, metrics, replicas};
use axum::body::Bytes;
use axum::http::{Method, StatusCode, Uri};
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

impl ScriptedApi {
    async fn start(read: impl Fn(&str) -> Option<Value> + Send + Sync + 'static) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let read = Arc::new(read);
        let app = axum::Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
            let record = record.clone();
            let read = read.clone();
            async move {
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let path = uri.path().to_string();
                let (status, answer) = answer(&method, &path, &body, read.as_ref());
                record.lock().unwrap().push(Seen { method, path, body });
                (status, axum::Json(answer))
            }
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

fn context(
    api: &ScriptedApi,
    replicas: Vec<Replica>,
    families: Vec<ReplicaFamily>,
    sites: Vec<Site>,
) -> Arc<Ctx> {
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
        (store_of(replicas), store_of(families), store_of(sites)),
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
/// the StatefulSet and Service applied, the pod looked for, and the status written.
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
            format!("GET /api/v1/namespaces/{NS}/pods/sampl-tokyo-0"),
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
    super::others::reconcile_site(Arc::new(s), ctx)
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
    super::others::reconcile_site(Arc::new(s.clone()), ctx.clone())
        .await
        .expect("a reconcile");
    let after = ctx.backoffs.failed("Site/tracker/tokyo");
    assert!(after <= std::time::Duration::from_secs(2), "{after:?}");
}

/// The sync runner wakes the family controller only when what it reports of a family
/// changed: its link states or its topology error; the same report again is silent.
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
    ctx.set_topology_error(key.clone(), Some("no hub".into()));
    ctx.set_topology_error(key.clone(), Some("no hub".into()));
    assert_eq!(woken(), ["tracker/sampl"]);
    ctx.set_topology_error(key.clone(), None);
    ctx.set_topology_error(key.clone(), None);
    assert_eq!(woken(), ["tracker/sampl"]);
}
