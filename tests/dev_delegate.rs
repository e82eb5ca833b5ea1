//! Delegate mode of the embedded API server (`dev up --delegate URL`): the delegated
//! groups are forwarded to another server, answers and watch streams come back
//! unchanged, core and apps stay local, discovery merges both sides.
//!
//! Most tests use a small fake delegate written here. With `MULTISITE_APISERVER_STATE`
//! set to a state directory where `e2e/apiserver/up.sh` ran, one more test runs `dev up
//! --delegate` against that real server.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kube::core::GroupVersionKind;
use multisite::dev::apiserver::{self, ApiServer};
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// How long the fake delegate waits between the two events of a watch.
const WATCH_GAP: Duration = Duration::from_millis(1200);

/// What the fake delegate was asked: method, path and query, authorization header.
type Seen = Arc<Mutex<Vec<(String, String, Option<String>)>>>;

fn replica(name: &str) -> Value {
    json!({
        "apiVersion": "multisite.dev/v1alpha1", "kind": "Replica",
        "metadata": {"name": name, "namespace": "tracker", "uid": format!("uid-{name}"),
                     "resourceVersion": "17"},
        "spec": {"family": "sampl", "site": "tokyo"},
    })
}

fn fake_legacy_discovery() -> Value {
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
        {"name": "multisite.dev",
         "versions": [{"groupVersion": "multisite.dev/v1alpha1", "version": "v1alpha1"}],
         "preferredVersion": {"groupVersion": "multisite.dev/v1alpha1", "version": "v1alpha1"}},
        {"name": "apiextensions.k8s.io",
         "versions": [{"groupVersion": "apiextensions.k8s.io/v1", "version": "v1"}],
         "preferredVersion": {"groupVersion": "apiextensions.k8s.io/v1", "version": "v1"}},
        // Not a delegated group: must not show through the merged server.
        {"name": "other.example",
         "versions": [{"groupVersion": "other.example/v1", "version": "v1"}],
         "preferredVersion": {"groupVersion": "other.example/v1", "version": "v1"}},
    ]})
}

fn fake_aggregated_discovery() -> Value {
    let resource = |plural: &str, kind: &str, group: &str, version: &str, scope: &str| {
        json!({"resource": plural, "scope": scope, "singularResource": kind.to_ascii_lowercase(),
               "responseKind": {"group": group, "version": version, "kind": kind},
               "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]})
    };
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {}, "items": [
        {"metadata": {"name": "multisite.dev"}, "versions": [{"version": "v1alpha1",
            "freshness": "Current",
            "resources": [resource("replicas", "Replica", "multisite.dev", "v1alpha1", "Namespaced")]}]},
        {"metadata": {"name": "apiextensions.k8s.io"}, "versions": [{"version": "v1",
            "freshness": "Current",
            "resources": [resource("customresourcedefinitions", "CustomResourceDefinition",
                                   "apiextensions.k8s.io", "v1", "Cluster")]}]},
        {"metadata": {"name": "other.example"}, "versions": [{"version": "v1",
            "freshness": "Current",
            "resources": [resource("things", "Thing", "other.example", "v1", "Namespaced")]}]},
    ]})
}

fn json_answer(code: StatusCode, content_type: &'static str, body: Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, content_type)],
        body.to_string(),
    )
        .into_response()
}

/// The fake delegate: canned answers for `multisite.dev`, discovery of its groups, and a
/// watch that sends one event at once and the next after [`WATCH_GAP`].
async fn fake(seen: Seen, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or_default().to_string();
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or_default().to_string());
    seen.lock()
        .unwrap()
        .push((method.to_string(), format!("{path}?{query}"), authorization));
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    match (method.as_str(), path.as_str()) {
        ("GET", "/apis") if accept.starts_with(AGGREGATED) => {
            json_answer(StatusCode::OK, AGGREGATED, fake_aggregated_discovery())
        }
        ("GET", "/apis") => {
            json_answer(StatusCode::OK, "application/json", fake_legacy_discovery())
        }
        ("GET", "/apis/multisite.dev") => json_answer(
            StatusCode::OK,
            "application/json",
            json!({"kind": "APIGroup", "apiVersion": "v1", "name": "multisite.dev",
                   "versions": [{"groupVersion": "multisite.dev/v1alpha1", "version": "v1alpha1"}],
                   "preferredVersion": {"groupVersion": "multisite.dev/v1alpha1", "version": "v1alpha1"}}),
        ),
        ("GET", "/apis/multisite.dev/v1alpha1") => json_answer(
            StatusCode::OK,
            "application/json",
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "multisite.dev/v1alpha1",
                   "resources": [{"name": "replicas", "singularName": "replica", "namespaced": true,
                                  "kind": "Replica", "verbs": ["get", "list", "watch"]}]}),
        ),
        ("GET", "/apis/apiextensions.k8s.io/v1") => json_answer(
            StatusCode::OK,
            "application/json",
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "apiextensions.k8s.io/v1",
                   "resources": [{"name": "customresourcedefinitions", "singularName": "customresourcedefinition",
                                  "namespaced": false, "kind": "CustomResourceDefinition",
                                  "verbs": ["get", "list", "watch"]}]}),
        ),
        ("GET", "/openapi/v3") => json_answer(
            StatusCode::OK,
            "application/json",
            json!({"paths": {
                "apis/multisite.dev/v1alpha1": {"serverRelativeURL": "/openapi/v3/apis/multisite.dev/v1alpha1?hash=F00"},
                "apis/other.example/v1": {"serverRelativeURL": "/openapi/v3/apis/other.example/v1?hash=1"}}}),
        ),
        ("GET", "/apis/multisite.dev/v1alpha1/namespaces/tracker/replicas")
            if query.contains("watch=true") =>
        {
            let events = futures::stream::unfold(0u32, |sent| async move {
                let object = |name: &str| replica(name);
                match sent {
                    0 => Some((
                        Ok::<_, std::io::Error>(Bytes::from(format!(
                            "{}\n",
                            json!({"type": "ADDED", "object": object("first")})
                        ))),
                        1,
                    )),
                    1 => {
                        tokio::time::sleep(WATCH_GAP).await;
                        Some((
                            Ok(Bytes::from(format!(
                                "{}\n",
                                json!({"type": "MODIFIED", "object": object("second")})
                            ))),
                            2,
                        ))
                    }
                    _ => None,
                }
            });
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from_stream(events))
                .unwrap()
        }
        ("GET", "/apis/multisite.dev/v1alpha1/replicas") if query.contains("watch=true") => {
            // One event, then nothing, for ever.
            let first = Bytes::from(format!(
                "{}\n",
                json!({"type": "ADDED", "object": replica("only")})
            ));
            let events = futures::stream::iter([Ok::<_, std::io::Error>(first)])
                .chain(futures::stream::pending());
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from_stream(events))
                .unwrap()
        }
        ("GET", "/apis/multisite.dev/v1alpha1/namespaces/tracker/replicas/one") => {
            let mut answer = json_answer(StatusCode::OK, "application/json", replica("one"));
            answer
                .headers_mut()
                .insert("x-answered-by", "the-delegate".parse().unwrap());
            answer
        }
        ("GET", "/apis/multisite.dev/v1alpha1/namespaces/tracker/replicas/teapot") => (
            StatusCode::IM_A_TEAPOT,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "short and stout",
        )
            .into_response(),
        ("POST", "/apis/multisite.dev/v1alpha1/namespaces/tracker/replicas") => {
            // Echoes the body: proves it went through unchanged.
            (
                StatusCode::CREATED,
                [(header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response()
        }
        _ => json_answer(
            StatusCode::NOT_FOUND,
            "application/json",
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                   "code": 404, "message": format!("the fake delegate has no {path}")}),
        ),
    }
}

/// Starts the fake delegate; returns its URL and what it is asked.
async fn start_fake() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let state = seen.clone();
    let router = Router::new().fallback(move |method, uri, headers, body| {
        fake(state.clone(), method, uri, headers, body)
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, seen)
}

/// The embedded server in delegate mode, delegating to `delegate`; returns its URL.
async fn start_embedded(delegate: &str) -> (String, ApiServer) {
    let server = ApiServer::new(None).unwrap();
    server.delegate_to(delegate).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(apiserver::serve(listener, server.clone()));
    (url, server)
}

fn http() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

async fn call(method: &str, url: &str, accept: Option<&str>, body: &str) -> Answer {
    let mut request = Request::builder()
        .method(method)
        .uri(url)
        .header(header::AUTHORIZATION, "Bearer from-the-client");
    if let Some(accept) = accept {
        request = request.header(header::ACCEPT, accept);
    }
    if !body.is_empty() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let answer = http().request(request).await.unwrap();
    let (parts, incoming) = answer.into_parts();
    let body = incoming.collect().await.unwrap().to_bytes().to_vec();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn get(url: &str) -> Answer {
    call("GET", url, None, "").await
}

fn paths(seen: &Seen) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|(_, path, _)| path.clone())
        .collect()
}

#[tokio::test]
async fn delegated_requests_reach_the_delegate_and_come_back_unchanged() {
    let (delegate, seen) = start_fake().await;
    let (url, _server) = start_embedded(&delegate).await;

    let one = get(&format!(
        "{url}/apis/multisite.dev/v1alpha1/namespaces/tracker/replicas/one"
    ))
    .await;
    assert_eq!(one.status, StatusCode::OK);
    assert_eq!(one.json(), replica("one"));
    assert_eq!(one.content_type(), "application/json");
    assert_eq!(one.headers["x-answered-by"], "the-delegate");

    let teapot = get(&format!(
        "{url}/apis/multisite.dev/v1alpha1/namespaces/tracker/replicas/teapot"
    ))
    .await;
    assert_eq!(teapot.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(teapot.content_type(), "text/plain; charset=utf-8");
    assert_eq!(teapot.body, b"short and stout");

    let sent = json!({"apiVersion": "multisite.dev/v1alpha1", "kind": "Replica",
                      "metadata": {"name": "new"}, "spec": {"site": "paris"}})
    .to_string();
    let created = call(
        "POST",
        &format!("{url}/apis/multisite.dev/v1alpha1/namespaces/tracker/replicas?fieldManager=me"),
        None,
        &sent,
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(created.body, sent.as_bytes());

    let missing = get(&format!(
        "{url}/apis/apiextensions.k8s.io/v1/customresourcedefinitions/x"
    ))
    .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(
        missing.json()["message"]
            .as_str()
            .unwrap()
            .contains("the fake delegate")
    );

    let seen_now = seen.lock().unwrap().clone();
    assert!(seen_now.iter().any(|(method, path, _)| method == "POST"
        && path == "/apis/multisite.dev/v1alpha1/namespaces/tracker/replicas?fieldManager=me"));
    // The client's credentials go through as they are.
    assert!(
        seen_now
            .iter()
            .all(|(_, _, auth)| auth.as_deref() == Some("Bearer from-the-client")),
        "{seen_now:?}"
    );
}

#[tokio::test]
async fn watch_events_stream_through_as_they_come() {
    let (delegate, _seen) = start_fake().await;
    let (url, _server) = start_embedded(&delegate).await;
    let request = Request::builder()
        .uri(format!(
            "{url}/apis/multisite.dev/v1alpha1/namespaces/tracker/replicas?watch=true"
        ))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let start = Instant::now();
    let answer = http().request(request).await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    let mut body = answer.into_body();
    let mut received = Vec::new();
    let mut text = String::new();
    while received.len() < 2 {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("an event within 10 s")
            .expect("the stream goes on")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
            while let Some((line, rest)) = text.split_once('\n') {
                received.push((
                    start.elapsed(),
                    serde_json::from_str::<Value>(line).unwrap(),
                ));
                text = rest.to_string();
            }
        }
    }
    assert_eq!(received[0].1["type"], "ADDED");
    assert_eq!(received[0].1["object"]["metadata"]["name"], "first");
    assert_eq!(received[1].1["type"], "MODIFIED");
    assert!(
        received[0].0 < WATCH_GAP / 2,
        "the first event was held back: {:?}",
        received[0].0
    );
    assert!(
        received[1].0 >= WATCH_GAP,
        "the second event came too early: {:?}",
        received[1].0
    );
}

#[tokio::test]
async fn a_forwarded_watch_ends_when_the_server_shuts_down() {
    let (delegate, _seen) = start_fake().await;
    let server = ApiServer::new(None).unwrap();
    server.delegate_to(&delegate).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(apiserver::serve_until(listener, server, async move {
        let _ = stopped.await;
    }));
    let request = Request::builder()
        .uri(format!(
            "{url}/apis/multisite.dev/v1alpha1/replicas?watch=true"
        ))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let mut body = http().request(request).await.unwrap().into_body();
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("the first event")
        .expect("a frame")
        .unwrap();
    assert!(first.into_data().is_ok());
    stop.send(()).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
    assert!(ended.is_ok(), "the forwarded watch outlived the server");
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("the server stops with a forwarded watch open")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn core_and_apps_stay_local() {
    let (delegate, seen) = start_fake().await;
    let (url, _server) = start_embedded(&delegate).await;
    let config_map = json!({"apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": {"name": "local"}, "data": {"a": "1"}});
    let created = call(
        "POST",
        &format!("{url}/api/v1/namespaces/default/configmaps"),
        None,
        &config_map.to_string(),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(
        get(&format!("{url}/api/v1/namespaces/default/configmaps/local"))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        get(&format!(
            "{url}/apis/apps/v1/namespaces/default/statefulsets"
        ))
        .await
        .status,
        StatusCode::OK
    );
    assert_eq!(
        get(&format!("{url}/apis/apps/v1")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&format!("{url}/api/v1/namespaces")).await.status,
        StatusCode::OK
    );
    assert_eq!(get(&format!("{url}/api")).await.status, StatusCode::OK);
    assert!(
        paths(&seen).is_empty(),
        "the delegate was asked: {:?}",
        paths(&seen)
    );
}

fn names_of(list: &Value, field: &str, name: impl Fn(&Value) -> &Value) -> Vec<String> {
    list[field]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| name(entry).as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn discovery_merges_both_sides() {
    let (delegate, _seen) = start_fake().await;
    let (url, _server) = start_embedded(&delegate).await;

    let legacy = get(&format!("{url}/apis")).await;
    assert_eq!(legacy.status, StatusCode::OK);
    let groups = names_of(&legacy.json(), "groups", |g| &g["name"]);
    for group in ["apps", "multisite.dev", "apiextensions.k8s.io"] {
        assert_eq!(
            groups.iter().filter(|g| *g == group).count(),
            1,
            "{group} in {groups:?}"
        );
    }
    assert!(!groups.iter().any(|g| g == "other.example"), "{groups:?}");
    // Local built-ins of delegated groups give way to the delegate, which has none here.
    assert!(
        !groups.iter().any(|g| g == "coordination.k8s.io"),
        "{groups:?}"
    );

    let aggregated = call("GET", &format!("{url}/apis"), Some(AGGREGATED), "").await;
    assert_eq!(aggregated.status, StatusCode::OK);
    assert_eq!(aggregated.content_type(), AGGREGATED);
    let items = names_of(&aggregated.json(), "items", |g| &g["metadata"]["name"]);
    for group in ["apps", "multisite.dev", "apiextensions.k8s.io"] {
        assert_eq!(
            items.iter().filter(|g| *g == group).count(),
            1,
            "{group} in {items:?}"
        );
    }
    assert!(!items.iter().any(|g| g == "other.example"), "{items:?}");

    let group = get(&format!("{url}/apis/multisite.dev")).await;
    assert_eq!(group.json()["kind"], "APIGroup");
    let resources = get(&format!("{url}/apis/multisite.dev/v1alpha1")).await;
    assert_eq!(resources.json()["resources"][0]["kind"], "Replica");

    let openapi = get(&format!("{url}/openapi/v3")).await.json();
    let paths = openapi["paths"].as_object().unwrap();
    assert!(paths.contains_key("api/v1"), "{paths:?}");
    assert!(paths.contains_key("apis/apps/v1"), "{paths:?}");
    assert_eq!(
        paths["apis/multisite.dev/v1alpha1"]["serverRelativeURL"],
        "/openapi/v3/apis/multisite.dev/v1alpha1?hash=F00"
    );
    assert!(!paths.contains_key("apis/other.example/v1"), "{paths:?}");
}

#[tokio::test]
async fn kube_discovery_finds_local_and_delegated_kinds() {
    let (delegate, _seen) = start_fake().await;
    let (url, _server) = start_embedded(&delegate).await;
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let statefulset = GroupVersionKind::gvk("apps", "v1", "StatefulSet");
    let replica = GroupVersionKind::gvk("multisite.dev", "v1alpha1", "Replica");
    let crd = GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition");
    let legacy = kube::Discovery::new(client.clone()).run().await.unwrap();
    let aggregated = kube::Discovery::new(client).run_aggregated().await.unwrap();
    for discovery in [legacy, aggregated] {
        for gvk in [&statefulset, &replica, &crd] {
            assert!(discovery.resolve_gvk(gvk).is_some(), "{gvk:?} not found");
        }
        assert!(
            discovery
                .resolve_gvk(&GroupVersionKind::gvk("other.example", "v1", "Thing"))
                .is_none()
        );
    }
}

#[tokio::test]
async fn an_unreachable_delegate_is_a_503_naming_it() {
    let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let delegate = format!("http://{}", gone.local_addr().unwrap());
    drop(gone);
    let (url, _server) = start_embedded(&delegate).await;
    for path in [
        "/apis/multisite.dev/v1alpha1/namespaces/tracker/replicas",
        "/apis",
    ] {
        let answer = get(&format!("{url}{path}")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
        let status = answer.json();
        assert_eq!(status["kind"], "Status");
        assert_eq!(status["code"], 503);
        assert!(
            status["message"].as_str().unwrap().contains(&delegate),
            "{status}"
        );
    }
    // What is local still answers.
    assert_eq!(
        get(&format!("{url}/api/v1/namespaces")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn owners_of_delegated_groups_keep_their_dependents() {
    let (delegate, _seen) = start_fake().await;
    let (url, server) = start_embedded(&delegate).await;
    let owned = |name: &str, api_version: &str, kind: &str| {
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
               "metadata": {"name": name, "ownerReferences": [{
                   "apiVersion": api_version, "kind": kind, "name": "owner",
                   "uid": format!("not-here-{name}"), "controller": true}]},
               "spec": {"replicas": 0, "selector": {"matchLabels": {"app": name}},
                        "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": []}}}})
        .to_string()
    };
    let statefulsets = format!("{url}/apis/apps/v1/namespaces/default/statefulsets");
    let kept = call(
        "POST",
        &statefulsets,
        None,
        &owned("kept", "multisite.dev/v1alpha1", "Replica"),
    )
    .await;
    assert_eq!(kept.status, StatusCode::CREATED);
    let collected = call(
        "POST",
        &statefulsets,
        None,
        &owned("collected", "v1", "ConfigMap"),
    )
    .await;
    assert_eq!(collected.status, StatusCode::CREATED);
    // Another write runs the collector once more.
    let other = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "poke"}});
    call(
        "POST",
        &format!("{url}/api/v1/namespaces/default/configmaps"),
        None,
        &other.to_string(),
    )
    .await;
    assert_eq!(
        get(&format!("{statefulsets}/kept")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&format!("{statefulsets}/collected")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(server.delegate_url(), Some(delegate.as_str()));
}

/// Stops `dev up` when the test ends, however it ends.
struct Dev(Child);

impl Drop for Dev {
    fn drop(&mut self) {
        // SIGTERM first, so that the server stops as `dev down` stops it.
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kubectl(config: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(config)
        .args(args)
        .output()
        .expect("run kubectl");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
#[ignore = "needs the real API server: scripts/test.sh runs it with MULTISITE_APISERVER_STATE set"]
fn dev_up_against_the_real_api_server() {
    let state = std::env::var("MULTISITE_APISERVER_STATE").expect(
        "MULTISITE_APISERVER_STATE is not set: start e2e/apiserver/up.sh DIR and set it to DIR",
    );
    let real = std::fs::read_to_string(Path::new(&state).join("url"))
        .expect("the harness state directory has a url file")
        .trim()
        .to_string();
    let dir = std::env::temp_dir().join(format!("multisite-dev-delegate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let start = Instant::now();
    let log = std::fs::File::create(
        std::env::temp_dir().join(format!("multisite-dev-delegate-{}.log", std::process::id())),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_multisite"))
        .args(["dev", "up", "--no-operator", "--delegate", &real, "--dir"])
        .arg(&dir)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start dev up");
    let dev = Dev(child);
    let config = dir.join("kubeconfig");
    // Up once the CRDs are installed there and Established (dev up waits for that).
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "dev up --delegate did not come up"
        );
        if config.exists() {
            let (ok, out) = kubectl(&config, &["get", "crd", "-o", "name"]);
            if ok && out.contains("schemapackages.multisite.dev") {
                let (ok, _) = kubectl(&config, &["get", "replicas", "-A"]);
                if ok {
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("dev up --delegate ready in {:?}", start.elapsed());
    let (_, crds) = kubectl(&config, &["get", "crd", "-o", "name"]);
    for name in ["replicafamilies", "replicas", "sites", "schemapackages"] {
        assert!(crds.contains(&format!("{name}.multisite.dev")), "{crds}");
    }
    // The harness's stand-in CRDs for Leases and Events show through as well.
    assert!(crds.contains("leases.coordination.k8s.io"), "{crds}");
    // The CRDs are the real server's: the same uid there.
    let (ok, through) = kubectl(
        &config,
        &[
            "get",
            "crd",
            "replicas.multisite.dev",
            "-o",
            "jsonpath={.metadata.uid}",
        ],
    );
    assert!(ok, "{through}");
    let (ok, direct) = kubectl(
        &Path::new(&state).join("kubeconfig"),
        &[
            "get",
            "crd",
            "replicas.multisite.dev",
            "-o",
            "jsonpath={.metadata.uid}",
        ],
    );
    assert!(ok, "{direct}");
    assert_eq!(through, direct);
    let (ok, out) = kubectl(&config, &["get", "statefulsets", "-A"]);
    assert!(ok, "{out}");
    let (ok, out) = kubectl(&config, &["get", "namespaces", "-o", "name"]);
    assert!(ok && out.contains("namespace/default"), "{out}");
    drop(dev);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_delegate_without_aggregated_discovery_gets_the_legacy_list() {
    // This delegate answers the legacy list whatever the client accepts.
    let router = Router::new().fallback(|| async {
        json_answer(StatusCode::OK, "application/json", fake_legacy_discovery())
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let delegate = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let (url, _server) = start_embedded(&delegate).await;
    let answer = call("GET", &format!("{url}/apis"), Some(AGGREGATED), "").await;
    assert_eq!(answer.status, StatusCode::OK);
    // So the client falls back to the legacy documents, as with such a real server.
    assert_eq!(answer.content_type(), "application/json");
    let list = answer.json();
    assert_eq!(list["kind"], "APIGroupList");
    let groups = names_of(&list, "groups", |g| &g["name"]);
    assert!(groups.iter().any(|g| g == "apps"), "{groups:?}");
    assert!(groups.iter().any(|g| g == "multisite.dev"), "{groups:?}");
}
