//! The embedded API server driven as a real one: through kube's client and through kubectl.

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use multisite::api::ReplicaFamily;
use multisite::dev::apiserver::{self, ApiServer};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A server on 127.0.0.1 and a port chosen by the system; it stops with the test's runtime.
async fn start() -> String {
    start_with(ApiServer::new(None).unwrap()).await
}

async fn start_with(server: ApiServer) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(apiserver::serve(listener, server));
    url
}

fn client(url: &str) -> kube::Client {
    let config = kube::Config::new(url.parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

fn config_map(name: &str, data: Value) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {"app": "demo"}},
        "data": data,
    }))
    .unwrap()
}

#[tokio::test]
async fn config_maps_through_kube_client() {
    let url = start().await;
    let client = client(&url);
    let info = client.apiserver_version().await.unwrap();
    assert_eq!(info.git_version, "v1.33.0-multisite");
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let created = api
        .create(
            &PostParams::default(),
            &config_map("one", json!({"a": "1"})),
        )
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    let again = api
        .create(&PostParams::default(), &config_map("one", json!({})))
        .await
        .unwrap_err();
    assert!(
        matches!(&again, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{again:?}"
    );
    // A namespace that does not exist.
    let elsewhere: Api<ConfigMap> = Api::namespaced(client.clone(), "nowhere");
    let missing = elsewhere
        .create(&PostParams::default(), &config_map("one", json!({})))
        .await
        .unwrap_err();
    assert!(
        matches!(&missing, kube::Error::Api(s) if s.code == 404 && s.message == "namespaces \"nowhere\" not found"),
        "{missing:?}"
    );
    // Dry run stores nothing.
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    api.create(&dry, &config_map("two", json!({})))
        .await
        .unwrap();
    assert!(api.get_opt("two").await.unwrap().is_none());
    api.create(
        &PostParams::default(),
        &config_map("two", json!({"b": "2"})),
    )
    .await
    .unwrap();

    let got = api.get("one").await.unwrap();
    assert_eq!(got.data.unwrap()["a"], "1");
    let listed = api
        .list(&ListParams::default().labels("app=demo"))
        .await
        .unwrap();
    let names: Vec<_> = listed
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["one", "two"]);
    let page = api.list(&ListParams::default().limit(1)).await.unwrap();
    assert_eq!(page.items.len(), 1);
    let token = page.metadata.continue_.clone().unwrap();
    let rest = api
        .list(&ListParams::default().limit(1).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(rest.items[0].metadata.name.as_deref(), Some("two"));
    let by_field = api
        .list(&ListParams::default().fields("metadata.name=two"))
        .await
        .unwrap();
    assert_eq!(by_field.items.len(), 1);

    // Merge patch, JSON patch.
    let merged = api
        .patch(
            "one",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"a": null, "c": "3"}})),
        )
        .await
        .unwrap();
    assert_eq!(merged.data.clone().unwrap().len(), 1);
    assert_eq!(merged.data.unwrap()["c"], "3");
    let request = axum::http::Request::patch("/api/v1/namespaces/default/configmaps/one")
        .header("content-type", "application/json-patch+json")
        .body(
            serde_json::to_vec(&json!([
                {"op": "add", "path": "/data/d", "value": "4"},
                {"op": "test", "path": "/data/c", "value": "3"},
                {"op": "move", "from": "/data/c", "path": "/data/e"},
            ]))
            .unwrap(),
        )
        .unwrap();
    let patched: ConfigMap = client.request(request).await.unwrap();
    let data = patched.data.unwrap();
    assert_eq!(data.get("d").map(String::as_str), Some("4"));
    assert_eq!(data.get("e").map(String::as_str), Some("3"));
    assert!(!data.contains_key("c"));
    let request = axum::http::Request::patch("/api/v1/namespaces/default/configmaps/one")
        .header("content-type", "application/json-patch+json")
        .body(br#"[{"op": "test", "path": "/data/d", "value": "5"}]"#.to_vec())
        .unwrap();
    let failed = client.request::<ConfigMap>(request).await.unwrap_err();
    assert!(
        matches!(&failed, kube::Error::Api(s) if s.code == 400),
        "{failed:?}"
    );

    // Server-side apply: create, then a conflict with another manager, then force.
    let apply = |manager: &str| PatchParams::apply(manager);
    let applied = api
        .patch(
            "three",
            &apply("first"),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "three"}, "data": {"x": "1", "y": "1"}})),
        )
        .await
        .unwrap();
    let managed = applied.metadata.managed_fields.unwrap();
    assert_eq!(managed.len(), 1);
    assert_eq!(managed[0].manager.as_deref(), Some("first"));
    assert_eq!(managed[0].operation.as_deref(), Some("Apply"));
    let conflict = api
        .patch(
            "three",
            &apply("second"),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "three"}, "data": {"x": "2"}})),
        )
        .await
        .unwrap_err();
    match &conflict {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
            assert_eq!(
                s.message,
                "Apply failed with 1 conflict: conflict with \"first\" using v1: .data.x"
            );
        }
        other => panic!("{other:?}"),
    }
    // The same value is no conflict: the field is shared.
    api.patch(
        "three",
        &apply("second"),
        &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "three"}, "data": {"y": "1"}})),
    )
    .await
    .unwrap();
    let forced = api
        .patch(
            "three",
            &apply("second").force(),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "three"}, "data": {"x": "2", "y": "1"}})),
        )
        .await
        .unwrap();
    assert_eq!(forced.data.unwrap()["x"], "2");
    // The first manager leaves out y: still owned by the second, it stays.
    let after = api
        .patch(
            "three",
            &apply("first"),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "three"}, "data": {}})),
        )
        .await
        .unwrap();
    assert_eq!(after.data.unwrap()["y"], "1");

    // Stale resourceVersion on update.
    let mut stale = api.get("two").await.unwrap();
    api.patch(
        "two",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"b": "3"}})),
    )
    .await
    .unwrap();
    stale.data = None;
    let err = api
        .replace("two", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409),
        "{err:?}"
    );

    api.delete("one", &DeleteParams::default()).await.unwrap();
    let gone = api.get("one").await.unwrap_err();
    assert!(
        matches!(&gone, kube::Error::Api(s) if s.code == 404),
        "{gone:?}"
    );
}

/// The next item of a stream, without naming the stream trait's crate.
async fn next_of<S: kube::runtime::WatchStreamExt + Unpin>(stream: &mut S) -> Option<S::Item> {
    std::future::poll_fn(|cx| std::pin::Pin::new(&mut *stream).poll_next(cx)).await
}

async fn install_crds(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in multisite::api::crds() {
        let created = crds.create(&PostParams::default(), &crd).await.unwrap();
        let status = created.status.unwrap();
        let conditions = status.conditions.unwrap();
        assert!(
            conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        );
    }
}

fn family(name: &str, level: i64) -> Value {
    json!({"apiVersion": "multisite.dev/v1alpha1", "kind": "ReplicaFamily",
        "metadata": {"name": name},
        "spec": {"idPrefix": "SAMPL", "featureLevel": level,
            "gateway": {"replica": "sampl-tokyo"},
            "sync": {"topology": "Mesh", "incrementalIntervalSeconds": 30}}})
}

#[tokio::test]
async fn replica_families_through_kube_client() {
    let url = start().await;
    let client = client(&url);
    install_crds(&client).await;
    let api: Api<ReplicaFamily> = Api::namespaced(client.clone(), "default");
    let object: ReplicaFamily = serde_json::from_value(family("sampl", 7)).unwrap();
    let created = api.create(&PostParams::default(), &object).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    // Raising the feature level is a spec change: generation 2.
    let raised = api
        .patch(
            "sampl",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"featureLevel": 8}})),
        )
        .await
        .unwrap();
    assert_eq!(raised.metadata.generation, Some(2));
    // Lowering it is refused by the transition rule, with the CRD's message.
    let lowered = api
        .patch(
            "sampl",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"featureLevel": 7}})),
        )
        .await
        .unwrap_err();
    match &lowered {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
            assert!(s.message.starts_with("ReplicaFamily.multisite.dev \"sampl\" is invalid: spec.featureLevel: Invalid value: 7: featureLevel cannot be lowered"), "{}", s.message);
        }
        other => panic!("{other:?}"),
    }
    // An out-of-range level on create.
    let bad: ReplicaFamily = serde_json::from_value(family("bad", 9)).unwrap();
    let refused = api.create(&PostParams::default(), &bad).await.unwrap_err();
    match &refused {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 422);
            assert!(s.message.contains("spec.featureLevel"), "{}", s.message);
        }
        other => panic!("{other:?}"),
    }
    // Apply with a second manager, then a merge-patched status on the subresource.
    let applied = api
        .patch(
            "sampl",
            &PatchParams::apply("ops"),
            &Patch::Apply(
                json!({"apiVersion": "multisite.dev/v1alpha1", "kind": "ReplicaFamily",
                "metadata": {"name": "sampl"}, "spec": {"featureLevel": 8,
                "clients": [{"name": "web", "release": "8.0.1.1", "replicas": 2}]}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(applied.spec.clients.len(), 1);
    let status = api
        .patch_status(
            "sampl",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"observedGeneration": 3}})),
        )
        .await
        .unwrap();
    assert_eq!(status.metadata.generation, applied.metadata.generation);
    // Unknown fields are pruned by default and refused with Strict.
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &kube::api::ApiResource::erase::<ReplicaFamily>(&()),
    );
    let mut extra = family("extra", 7);
    extra["spec"]["surprise"] = json!(true);
    let pruned = raw
        .create(
            &PostParams::default(),
            &serde_json::from_value(extra.clone()).unwrap(),
        )
        .await
        .unwrap();
    assert!(pruned.data["spec"].get("surprise").is_none());
    extra["metadata"]["name"] = json!("strict");
    let strict = raw
        .patch(
            "strict",
            &PatchParams::apply("ops").validation_strict(),
            &Patch::Apply(extra),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&strict, kube::Error::Api(s) if s.code == 400 && s.message.contains("unknown field \"spec.surprise\"")),
        "{strict:?}"
    );
    api.delete("sampl", &DeleteParams::default()).await.unwrap();
    // Deleting the CRD stops serving its resource.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.delete("replicafamilies.multisite.dev", &DeleteParams::default())
        .await
        .unwrap();
    let unserved = api.list(&ListParams::default()).await.unwrap_err();
    assert!(
        matches!(&unserved, kube::Error::Api(s) if s.code == 404),
        "{unserved:?}"
    );
}

#[tokio::test]
async fn watcher_sees_changes_in_order_across_restarts() {
    let url = start().await;
    let client = client(&url);
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    // A one-second server timeout: the watcher's watch ends and restarts from its version.
    let config = watcher::Config::default().timeout(1);
    let mut stream = Box::pin(watcher(api.clone(), config));
    let mut seen = Vec::new();
    let mut next = async || -> watcher::Event<ConfigMap> {
        tokio::time::timeout(Duration::from_secs(10), next_of(&mut stream))
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    };
    // The initial list: empty.
    assert!(matches!(next().await, watcher::Event::Init));
    assert!(matches!(next().await, watcher::Event::InitDone));
    api.create(&PostParams::default(), &config_map("w", json!({"v": "1"})))
        .await
        .unwrap();
    seen.push(next().await);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    api.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": "2"}})),
    )
    .await
    .unwrap();
    seen.push(next().await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    api.delete("w", &DeleteParams::default()).await.unwrap();
    seen.push(next().await);
    let summary: Vec<String> = seen
        .iter()
        .map(|e| match e {
            watcher::Event::Apply(c) => {
                format!("apply {}", c.data.clone().unwrap_or_default()["v"])
            }
            watcher::Event::Delete(c) => {
                format!("delete {}", c.metadata.name.clone().unwrap_or_default())
            }
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(summary, ["apply 1", "apply 2", "delete w"]);

    // A streaming list (sendInitialEvents) gives the same initial view.
    api.create(&PostParams::default(), &config_map("s", json!({"v": "1"})))
        .await
        .unwrap();
    let streaming = watcher::Config::default().streaming_lists();
    let mut stream = Box::pin(watcher(api.clone(), streaming));
    let mut initial = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), next_of(&mut stream))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match event {
            watcher::Event::Init => {}
            watcher::Event::InitApply(c) => initial.push(c.metadata.name.unwrap_or_default()),
            watcher::Event::InitDone => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(initial, ["s"]);
}

#[tokio::test]
async fn raw_http_watch_discovery_and_errors() {
    let url = start().await;
    let client = client(&url);
    let get = |path: &str| {
        let request = axum::http::Request::get(path).body(Vec::new()).unwrap();
        let client = client.clone();
        async move { client.request::<Value>(request).await }
    };
    let api = get("/api").await.unwrap();
    assert_eq!(api["versions"], json!(["v1"]));
    let core = get("/api/v1").await.unwrap();
    let pods = core["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "pods")
        .unwrap()
        .clone();
    assert_eq!(pods["namespaced"], true);
    assert_eq!(pods["shortNames"], json!(["po"]));
    assert!(
        core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "pods/status")
    );
    let groups = get("/apis").await.unwrap();
    let names: Vec<&str> = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g["name"].as_str())
        .collect();
    for group in [
        "apps",
        "coordination.k8s.io",
        "events.k8s.io",
        "apiextensions.k8s.io",
    ] {
        assert!(names.contains(&group), "{names:?}");
    }
    // kube's discovery, legacy and aggregated, after a CRD is registered.
    install_crds(&client).await;
    for discovery in [
        kube::Discovery::new(client.clone()).run().await.unwrap(),
        kube::Discovery::new(client.clone())
            .run_aggregated()
            .await
            .unwrap(),
    ] {
        let group = discovery.get("multisite.dev").unwrap();
        let (resource, capabilities) = group
            .recommended_resources()
            .into_iter()
            .find(|(r, _)| r.plural == "replicafamilies")
            .unwrap();
        assert_eq!(resource.kind, "ReplicaFamily");
        assert_eq!(capabilities.scope, kube::discovery::Scope::Namespaced);
        assert!(
            capabilities
                .subresources
                .iter()
                .any(|(r, _)| r.plural == "replicafamilies/status" || r.plural == "status")
        );
        let core = discovery.get("").unwrap();
        assert!(
            core.recommended_resources()
                .iter()
                .any(|(r, _)| r.plural == "pods")
        );
    }
    let namespaces = get("/api/v1/namespaces").await.unwrap();
    assert_eq!(namespaces["items"].as_array().unwrap().len(), 2);
    // Not served.
    let missing = get("/apis/nothing.example/v1").await.unwrap_err();
    assert!(
        matches!(&missing, kube::Error::Api(s) if s.code == 404),
        "{missing:?}"
    );
    // A watch from a version older than the window: one ERROR event with a 410 Status.
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for i in 0..3 {
        api.create(
            &PostParams::default(),
            &config_map(&format!("c{i}"), json!({})),
        )
        .await
        .unwrap();
    }
    let lines = watch_lines(
        &url,
        "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=0&timeoutSeconds=1",
    )
    .await;
    let types: Vec<&str> = lines.iter().filter_map(|l| l["type"].as_str()).collect();
    assert_eq!(types, ["ADDED", "ADDED", "ADDED"]);
    // Bookmarks when idle.
    let started = std::time::Instant::now();
    let lines = watch_lines(&url, "/api/v1/namespaces/default/configmaps?watch=1&allowWatchBookmarks=true&resourceVersion=0&timeoutSeconds=7").await;
    assert!(started.elapsed() >= Duration::from_secs(6));
    assert!(lines.iter().any(|l| l["type"] == "BOOKMARK"), "{lines:?}");
}

/// Reads a whole (time-limited) watch as its JSON lines.
async fn watch_lines(url: &str, path: &str) -> Vec<Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&raw);
    text.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// kubectl, which scripts/test.sh requires (it stops before the tests without it).
const KUBECTL: &str = "/usr/bin/kubectl";

fn kubectl(kubeconfig: &Path, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A directory under the system's temporary one, removed when dropped (also when the
/// test fails).
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = PathBuf;

    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!(
        "multisite-dev-apiserver-{name}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(path)
        .display()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_applies_crds_and_objects() {
    let url = start().await;
    let dir = temp_dir("kubectl");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, apiserver::kubeconfig(&url)).unwrap();
    let run = move |args: Vec<String>| {
        let kubeconfig = kubeconfig.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            kubectl(&kubeconfig, &args)
        })
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let (ok, out, err) = run(args(&["apply", "--server-side", "-f", &repo("crds")]))
        .await
        .unwrap();
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("replicafamilies.multisite.dev serverside-applied"),
        "{out}"
    );

    let manifests = dir.join("fleet.yaml");
    std::fs::write(
        &manifests,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: tracker}\n---\n\
         apiVersion: multisite.dev/v1alpha1\nkind: Site\nmetadata: {name: tokyo}\nspec: {zone: a}\n---\n\
         apiVersion: multisite.dev/v1alpha1\nkind: ReplicaFamily\nmetadata: {name: sampl, namespace: tracker}\n\
         spec:\n  idPrefix: SAMPL\n  featureLevel: 7\n  gateway: {replica: sampl-tokyo}\n  sync: {topology: Mesh, incrementalIntervalSeconds: 30}\n---\n\
         apiVersion: multisite.dev/v1alpha1\nkind: Replica\nmetadata: {name: sampl-tokyo, namespace: tracker}\n\
         spec: {family: sampl, site: tokyo, storage: 10Gi}\n",
    )
    .unwrap();
    let manifests = manifests.display().to_string();
    let (ok, out, err) = run(args(&["apply", "--server-side", "-f", &manifests]))
        .await
        .unwrap();
    assert!(ok, "{out}{err}");
    // Applying again changes nothing and still works.
    let (ok, out, err) = run(args(&["apply", "--server-side", "-f", &manifests]))
        .await
        .unwrap();
    assert!(ok, "{out}{err}");

    let (ok, out, err) = run(args(&["get", "replicafamilies,replicas", "-n", "tracker"]))
        .await
        .unwrap();
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("sampl") && out.contains("sampl-tokyo"),
        "{out}"
    );
    // The CRD's printer columns, from Table answers.
    let header = out.lines().next().unwrap_or_default();
    assert!(
        header.contains("TARGET FL") && header.contains("STRATEGY"),
        "{out}"
    );
    // Built-in kinds have their main columns.
    let (ok, out, err) = run(args(&["get", "namespace", "tracker"])).await.unwrap();
    assert!(ok, "{out}{err}");
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(header, ["NAME", "STATUS", "AGE"], "{out}");
    assert!(out.contains("Active"), "{out}");
    let (ok, out, err) = run(args(&[
        "wait",
        "--for=condition=Established",
        "crd/replicas.multisite.dev",
        "--timeout=5s",
    ]))
    .await
    .unwrap();
    assert!(ok && out.contains("condition met"), "{out}{err}");
    let (ok, out, err) = run(args(&["explain", "replicafamily.spec.featureLevel"]))
        .await
        .unwrap();
    assert!(
        ok && out.contains("FIELD: featureLevel <integer>"),
        "{out}{err}"
    );
    // `get -w` sees a change as a new row.
    let watching = run(args(&[
        "get",
        "replicafamilies",
        "-n",
        "tracker",
        "-w",
        "--request-timeout=3s",
    ]));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (ok, out, err) = run(args(&[
        "patch",
        "replicafamily",
        "sampl",
        "-n",
        "tracker",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"featureLevel":8}}"#,
    ]))
    .await
    .unwrap();
    assert!(ok, "{out}{err}");
    let (_, out, _) = watching.await.unwrap();
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("sampl")).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows[1].split_whitespace().nth(1) == Some("8"), "{out}");
    // Re-applying the manifests would change a field kubectl-patch now owns: a conflict,
    // worded as the real server words it; forced, the CRD's transition rule refuses it.
    let (ok, out, err) = run(args(&["apply", "--server-side", "-f", &manifests]))
        .await
        .unwrap();
    assert!(!ok, "{out}");
    assert!(
        err.contains("Apply failed with 1 conflict: conflict with \"kubectl-patch\" using multisite.dev/v1alpha1: .spec.featureLevel"),
        "{err}"
    );
    let (ok, out, err) = run(args(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        &manifests,
    ]))
    .await
    .unwrap();
    assert!(!ok, "{out}");
    assert!(err.contains("featureLevel cannot be lowered"), "{err}");
    // Client-side apply (a strategic merge patch for built-in kinds) works too.
    let config = dir.join("config.yaml");
    for value in ["1", "2"] {
        std::fs::write(
            &config,
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: settings, namespace: tracker}}\ndata: {{a: '{value}'}}\n"),
        )
        .unwrap();
        let (ok, out, err) = run(args(&["apply", "-f", &config.display().to_string()]))
            .await
            .unwrap();
        assert!(ok, "{out}{err}");
    }
    let (ok, out, err) = run(args(&[
        "get",
        "configmap",
        "settings",
        "-n",
        "tracker",
        "-o",
        "jsonpath={.data.a}",
    ]))
    .await
    .unwrap();
    assert!(ok && out == "2", "{out}{err}");
    // Typed kubectl subcommands send protobuf bodies: refused as 415, not misread.
    let (ok, _, err) = run(args(&["create", "namespace", "typed"])).await.unwrap();
    assert!(!ok && err.contains("kubectl apply -f"), "{err}");
    let (ok, out, err) = run(args(&[
        "get",
        "replicafamily",
        "sampl",
        "-n",
        "tracker",
        "-o",
        "json",
        "--show-managed-fields",
    ]))
    .await
    .unwrap();
    assert!(ok, "{out}{err}");
    let object: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(object["spec"]["featureLevel"], 8);
    assert_eq!(object["metadata"]["managedFields"][0]["manager"], "kubectl");

    // Feature level 9 is refused with the CRD's validation message.
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "apiVersion: multisite.dev/v1alpha1\nkind: ReplicaFamily\nmetadata: {name: other, namespace: tracker}\n\
         spec:\n  idPrefix: OTHER\n  featureLevel: 9\n  gateway: {replica: other-tokyo}\n  sync: {topology: Mesh, incrementalIntervalSeconds: 30}\n").unwrap();
    let (ok, out, err) = run(args(&[
        "apply",
        "--server-side",
        "-f",
        &bad.display().to_string(),
    ]))
    .await
    .unwrap();
    assert!(!ok, "{out}");
    // kubectl words a 422 from its details: "The <Kind> "<name>" is invalid: <causes>".
    assert!(
        err.contains("The ReplicaFamily \"other\" is invalid: spec.featureLevel: Invalid value: 9"),
        "{err}"
    );

    // Lowering the feature level is refused.
    let (ok, out, err) = run(args(&[
        "patch",
        "replicafamily",
        "sampl",
        "-n",
        "tracker",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"featureLevel":7}}"#,
    ]))
    .await
    .unwrap();
    assert!(!ok, "{out}");
    assert!(err.contains("featureLevel cannot be lowered"), "{err}");

    // Delete.
    let (ok, out, err) = run(args(&["delete", "replica", "sampl-tokyo", "-n", "tracker"]))
        .await
        .unwrap();
    assert!(ok, "{out}{err}");
    assert!(out.contains("deleted"), "{out}");
    let (ok, out, _) = run(args(&["get", "replicas", "-n", "tracker", "-o", "name"]))
        .await
        .unwrap();
    assert!(ok && out.trim().is_empty(), "{out}");
}

#[tokio::test]
async fn state_survives_a_restart_through_the_snapshot() {
    let dir = temp_dir("snapshot");
    let path = dir.join("state.json");
    let serve_once = |path: PathBuf| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = ApiServer::new(Some(path)).unwrap();
        (
            url,
            server.clone(),
            tokio::spawn(apiserver::serve(listener, server)),
        )
    };
    let (url, first, task) = serve_once(path.clone()).await;
    let client1 = client(&url);
    install_crds(&client1).await;
    let api: Api<ReplicaFamily> = Api::namespaced(client1, "default");
    let object: ReplicaFamily = serde_json::from_value(family("kept", 7)).unwrap();
    let created = api.create(&PostParams::default(), &object).await.unwrap();
    task.abort();
    let _ = task.await;
    // What a stopping dev cluster does; otherwise the snapshot follows within 250 ms.
    first.flush();

    let (url, _second, task) = serve_once(path).await;
    let api: Api<ReplicaFamily> = Api::namespaced(client(&url), "default");
    let kept = api.get("kept").await.unwrap();
    assert_eq!(kept.metadata.uid, created.metadata.uid);
    assert_eq!(kept.spec.feature_level, 7);
    // The transition rule still holds after the restart.
    let lowered = api
        .patch(
            "kept",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"featureLevel": 6}})),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&lowered, kube::Error::Api(s) if s.code == 422),
        "{lowered:?}"
    );
    task.abort();
    let _ = task.await;
}

#[tokio::test]
async fn too_old_watch_gets_410_and_garbage_is_collected() {
    // A window of four events: older versions are gone.
    let url = start_with(ApiServer::with_event_window(None, 4).unwrap()).await;
    let client = client(&url);
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let owner = api
        .create(&PostParams::default(), &config_map("owner", json!({})))
        .await
        .unwrap();
    let mut dependent = config_map("dependent", json!({}));
    dependent.metadata.owner_references = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            name: "owner".into(),
            uid: owner.metadata.uid.clone().unwrap(),
            ..Default::default()
        },
    ]);
    api.create(&PostParams::default(), &dependent)
        .await
        .unwrap();
    for i in 0..6 {
        api.create(
            &PostParams::default(),
            &config_map(&format!("f{i}"), json!({})),
        )
        .await
        .unwrap();
    }
    let lines = watch_lines(
        &url,
        "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=1&timeoutSeconds=5",
    )
    .await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["type"], "ERROR");
    assert_eq!(lines[0]["object"]["code"], 410);
    assert_eq!(lines[0]["object"]["reason"], "Expired");
    // Deleting the owner deletes the dependent (background propagation).
    api.delete("owner", &DeleteParams::default()).await.unwrap();
    assert!(api.get_opt("dependent").await.unwrap().is_none());
    // fieldValidation=Warn (the default) prunes with a Warning header.
    let request =
        axum::http::Request::post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&multisite::api::crds()[0]).unwrap())
            .unwrap();
    client.request::<Value>(request).await.unwrap();
    let mut body = family("warned", 7);
    body["spec"]["surprise"] = json!(1);
    let address = url.trim_start_matches("http://");
    let raw = raw_request(
        address,
        "POST",
        "/apis/multisite.dev/v1alpha1/namespaces/default/replicafamilies?fieldValidation=Warn",
        &body.to_string(),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 201"), "{raw}");
    assert!(
        raw.to_ascii_lowercase()
            .contains("warning: 299 - \"unknown field \\\"spec.surprise\\\"\""),
        "{raw}"
    );
}

async fn raw_request(address: &str, method: &str, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    String::from_utf8_lossy(&raw).into_owned()
}

#[tokio::test]
async fn namespaces_and_collections() {
    use k8s_openapi::api::core::v1::Namespace;
    let url = start().await;
    let client = client(&url);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let default = namespaces.get("default").await.unwrap();
    assert_eq!(default.status.unwrap().phase.as_deref(), Some("Active"));
    let created = namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "scratch"}})).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(created.status.unwrap().phase.as_deref(), Some("Active"));
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "scratch");
    for name in ["a", "b"] {
        api.create(&PostParams::default(), &config_map(name, json!({})))
            .await
            .unwrap();
    }
    let mut other = config_map("c", json!({}));
    other.metadata.labels = None;
    api.create(&PostParams::default(), &other).await.unwrap();
    // deletecollection with a label selector.
    let deleted = api
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("app=demo"),
        )
        .await
        .unwrap();
    let deleted = deleted.left().unwrap();
    assert_eq!(deleted.items.len(), 2);
    let left: Vec<_> = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    assert_eq!(left, ["c"]);
    // Deleting the namespace deletes what is in it.
    namespaces
        .delete("scratch", &DeleteParams::default())
        .await
        .unwrap();
    let everywhere: Api<ConfigMap> = Api::all(client.clone());
    assert!(
        everywhere
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let refused = api
        .create(&PostParams::default(), &config_map("d", json!({})))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, kube::Error::Api(s) if s.code == 404),
        "{refused:?}"
    );
}

#[tokio::test]
async fn shutdown_ends_watches_and_the_server() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(apiserver::serve_until(
        listener,
        ApiServer::new(None).unwrap(),
        async move {
            let _ = stopped.await;
        },
    ));
    let watching = tokio::spawn({
        let url = url.clone();
        async move { watch_lines(&url, "/api/v1/namespaces?watch=true").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(()).unwrap();
    let lines = tokio::time::timeout(Duration::from_secs(5), watching)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lines.len(), 2, "{lines:?}");
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn statefulsets_scale_through_the_subresource() {
    use k8s_openapi::api::apps::v1::StatefulSet;
    let url = start().await;
    let client = client(&url);
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    let set: StatefulSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "db"},
        "spec": {"replicas": 1, "serviceName": "db",
            "selector": {"matchLabels": {"app": "db"}},
            "template": {"metadata": {"labels": {"app": "db"}},
                "spec": {"containers": [{"name": "db", "image": "multisite"}]}}}
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &set).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let scale = api.get_scale("db").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(1));
    assert_eq!(scale.status.unwrap().selector.as_deref(), Some("app=db"));
    let scaled = api
        .patch_scale(
            "db",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    assert_eq!(scaled.spec.unwrap().replicas, Some(3));
    let stored = api.get("db").await.unwrap();
    assert_eq!(stored.spec.replicas, Some(3));
    assert_eq!(stored.metadata.generation, Some(2));
    // A strategic merge patch merges containers by name.
    let patched = api
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [
                {"name": "db", "args": ["serve"]}]}}}})),
        )
        .await
        .unwrap();
    let container = &patched.spec.template.spec.unwrap().containers[0];
    assert_eq!(container.image.as_deref(), Some("multisite"));
    assert_eq!(container.args.as_deref(), Some(&["serve".to_string()][..]));
    if Path::new(KUBECTL).exists() {
        let dir = temp_dir("scale");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, apiserver::kubeconfig(&url)).unwrap();
        let (ok, out, err) = tokio::task::spawn_blocking(move || {
            kubectl(&kubeconfig, &["scale", "statefulset", "db", "--replicas=5"])
        })
        .await
        .unwrap();
        assert!(ok && out.contains("scaled"), "{out}{err}");
        let stored = api.get("db").await.unwrap();
        assert_eq!(stored.spec.replicas, Some(5));
    }
}

/// As on a real server: a Secret's stringData lands in data (base64) and is not kept,
/// and the JSON patch that kube's finalizer helper sends adds the first finalizer.
#[tokio::test]
async fn secrets_keep_string_data_as_data_and_finalizers_patch_like_kubernetes() {
    use k8s_openapi::api::core::v1::Secret;
    let url = start().await;
    let client = client(&url);
    let api: Api<Secret> = Api::namespaced(client.clone(), "default");
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
        "data": {"kept": "AQI="},
        "stringData": {"key": "hello"}
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &secret).await.unwrap();
    assert!(created.string_data.is_none());
    let data = created.data.clone().unwrap();
    assert_eq!(data["key"].0, b"hello".to_vec());
    assert_eq!(data["kept"].0, vec![1u8, 2]);
    let read = api.get("s").await.unwrap();
    assert_eq!(read.data.unwrap()["key"].0, b"hello".to_vec());

    let patch = json!([
        {"op": "test", "path": "/metadata/finalizers", "value": null},
        {"op": "add", "path": "/metadata/finalizers", "value": ["example.com/f"]}
    ]);
    let request = hyper::http::Request::builder()
        .method("PATCH")
        .uri("/api/v1/namespaces/default/secrets/s")
        .header("content-type", "application/json-patch+json")
        .body(patch.to_string().into_bytes())
        .unwrap();
    let patched: Secret = client.request(request).await.unwrap();
    assert_eq!(
        patched.metadata.finalizers,
        Some(vec!["example.com/f".to_string()])
    );
}

/// Events written through `events.k8s.io/v1` (kube's event recorder, as the operator
/// writes them) are core `v1` Events too, as on a real cluster: `kubectl get events`
/// lists them, `kubectl describe` shows them, and both versions read and watch them.
#[tokio::test(flavor = "multi_thread")]
async fn events_of_events_k8s_io_are_core_events_too() {
    use k8s_openapi::api::core::v1::{Event as CoreEvent, ObjectReference};
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let url = start().await;
    let client = client(&url);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let map = maps
        .create(&PostParams::default(), &config_map("settings", json!({})))
        .await
        .unwrap();
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("ConfigMap".into()),
        name: map.metadata.name.clone(),
        namespace: Some("default".into()),
        uid: map.metadata.uid.clone(),
        ..Default::default()
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "multisite-operator".into(),
            instance: Some("test".into()),
        },
    );
    let event = Event {
        type_: EventType::Warning,
        reason: "Checked".into(),
        note: Some("the settings were checked".into()),
        action: "Check".into(),
        secondary: None,
    };
    // Twice: the second is a patch of the first (a series), as kube's recorder does.
    recorder.publish(&event, &reference).await.unwrap();
    recorder.publish(&event, &reference).await.unwrap();

    let core: Api<CoreEvent> = Api::namespaced(client.clone(), "default");
    let listed = core.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1, "{:?}", listed.items);
    let stored = &listed.items[0];
    assert_eq!(stored.message.as_deref(), Some("the settings were checked"));
    assert_eq!(stored.involved_object.name.as_deref(), Some("settings"));
    assert_eq!(stored.involved_object.uid, map.metadata.uid);
    assert_eq!(
        stored.reporting_component.as_deref(),
        Some("multisite-operator")
    );
    assert_eq!(stored.type_.as_deref(), Some("Warning"));
    assert_eq!(stored.series.as_ref().and_then(|s| s.count), Some(2));

    // The events.k8s.io view of the same object, selected by its own field names.
    let address = url.trim_start_matches("http://").to_string();
    let answer = raw_request(
        &address,
        "GET",
        "/apis/events.k8s.io/v1/namespaces/default/events?fieldSelector=regarding.name%3Dsettings",
        "",
    )
    .await;
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["apiVersion"], "events.k8s.io/v1");
    assert_eq!(body["items"][0]["note"], "the settings were checked");
    assert_eq!(body["items"][0]["regarding"]["kind"], "ConfigMap");
    assert!(body["items"][0].get("message").is_none(), "{body}");
    let other = raw_request(
        &address,
        "GET",
        "/apis/events.k8s.io/v1/namespaces/default/events?fieldSelector=regarding.name%3Dother",
        "",
    )
    .await;
    assert!(other.contains("\"items\":[]"), "{other}");
    let watched = watch_lines(
        &url,
        "/apis/events.k8s.io/v1/namespaces/default/events?watch=true&timeoutSeconds=1",
    )
    .await;
    assert_eq!(watched[0]["object"]["apiVersion"], "events.k8s.io/v1");
    assert_eq!(watched[0]["object"]["note"], "the settings were checked");

    // What a person types.
    let dir = temp_dir("events");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, apiserver::kubeconfig(&url)).unwrap();
    let (ok, out, err) = kubectl(&kubeconfig, &["get", "events", "-n", "default"]);
    assert!(ok, "{err}");
    let header = out.lines().next().unwrap_or_default();
    for column in ["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"] {
        assert!(header.contains(column), "{out}");
    }
    assert!(
        out.lines().any(|l| l.contains("Warning")
            && l.contains("Checked")
            && l.contains("configmap/settings")
            && l.contains("the settings were checked")),
        "{out}"
    );
    let (ok, out, err) = kubectl(&kubeconfig, &["describe", "configmap", "settings"]);
    assert!(ok, "{err}");
    let events = out.split("Events:").nth(1).unwrap_or_default();
    assert!(
        events.contains("Checked") && events.contains("the settings were checked"),
        "{out}"
    );
}

/// Where the pod log test's files are: `<dir>/<pod>_<container>[.previous].log`.
struct TestLogs(PathBuf);

impl apiserver::logs::LogFiles for TestLogs {
    fn log_file(&self, _namespace: &str, pod: &str, container: &str, previous: bool) -> PathBuf {
        let suffix = if previous { ".previous" } else { "" };
        self.0.join(format!("{pod}_{container}{suffix}.log"))
    }
}

/// `kubectl logs` of a pod: the container's output, the previous instance's, the last
/// lines, and `-f` that streams until the container stops.
#[tokio::test(flavor = "multi_thread")]
async fn pod_logs_are_served_from_the_container_log_files() {
    use k8s_openapi::api::core::v1::Pod;
    let dir = temp_dir("logs");
    let server = ApiServer::new(None).unwrap();
    server.serve_logs_from(TestLogs(dir.to_path_buf())).unwrap();
    assert!(server.serve_logs_from(TestLogs(dir.to_path_buf())).is_err());
    let url = start_with(server).await;
    let pods: Api<Pod> = Api::namespaced(client(&url), "default");
    let running = |names: &[&str]| -> Value {
        json!(names.iter().map(|n| json!({"name": n, "ready": true, "restartCount": 1,
            "image": "shell", "imageID": "", "state": {"running": {"startedAt": "2026-12-02T10:00:00Z"}}})).collect::<Vec<_>>())
    };
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
        "spec": {"containers": [{"name": "app", "image": "shell"}, {"name": "side", "image": "shell"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    pods.patch_status(
        "web",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"status": {"phase": "Running", "containerStatuses": running(&["app", "side"])}}),
        ),
    )
    .await
    .unwrap();
    std::fs::write(dir.join("web_app.log"), "one\ntwo\nthree\n").unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, apiserver::kubeconfig(&url)).unwrap();

    let (ok, out, err) = kubectl(&kubeconfig, &["logs", "web", "-c", "app"]);
    assert!(ok && out == "one\ntwo\nthree\n", "{out}{err}");
    let (ok, out, err) = kubectl(&kubeconfig, &["logs", "web", "-c", "app", "--tail=2"]);
    assert!(ok && out == "two\nthree\n", "{out}{err}");
    let (ok, _, err) = kubectl(&kubeconfig, &["logs", "web", "-c", "app", "--previous"]);
    assert!(
        !ok && err.contains("previous terminated container \"app\" in pod \"web\" not found"),
        "{err}"
    );
    std::fs::write(dir.join("web_app.previous.log"), "before the restart\n").unwrap();
    let (ok, out, err) = kubectl(&kubeconfig, &["logs", "web", "-c", "app", "-p"]);
    assert!(ok && out == "before the restart\n", "{out}{err}");
    let (ok, _, err) = kubectl(&kubeconfig, &["logs", "web", "-c", "nope"]);
    assert!(
        !ok && err.contains("container nope is not valid for pod web"),
        "{err}"
    );
    let (ok, _, err) = kubectl(&kubeconfig, &["logs", "web", "-c", "side"]);
    assert!(!ok && err.contains("is waiting to start"), "{err}");
    let address = url.trim_start_matches("http://");
    let answer = raw_request(
        address,
        "GET",
        "/api/v1/namespaces/default/pods/web/log",
        "",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 400")
            && answer.contains(
                "a container name must be specified for pod web, choose one of: [app side]"
            ),
        "{answer}"
    );
    let answer = raw_request(
        address,
        "GET",
        "/api/v1/namespaces/default/pods/gone/log",
        "",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");

    // -f: what is appended arrives, and the stream ends once the container stopped.
    let mut follow = tokio::process::Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["logs", "-f", "web", "-c", "app"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("web_app.log"))
            .unwrap();
        file.write_all(b"four\n").unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        follow.try_wait().unwrap().is_none(),
        "-f ended while the container runs"
    );
    let stopped = json!([{"name": "app", "ready": false, "restartCount": 1, "image": "shell", "imageID": "",
        "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]);
    pods.patch_status(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"containerStatuses": stopped}})),
    )
    .await
    .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(20), follow.wait_with_output())
        .await
        .expect("-f ends once the container stopped")
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "one\ntwo\nthree\nfour\n"
    );
}

/// A server-side apply that changes nothing writes nothing, as on a real server: the
/// resourceVersion stays and no watch event is sent; a changed apply is written.
#[tokio::test]
async fn an_apply_that_changes_nothing_writes_nothing() {
    let url = start().await;
    let client = client(&url);
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let params = kube::api::PatchParams::apply("multisite-operator").force();
    let body = config_map("same", json!({"a": "1"}));
    let first = api
        .patch("same", &params, &kube::api::Patch::Apply(&body))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let second = api
        .patch("same", &params, &kube::api::Patch::Apply(&body))
        .await
        .unwrap();
    assert_eq!(
        first.metadata.resource_version,
        second.metadata.resource_version
    );
    assert_eq!(
        first.metadata.managed_fields,
        second.metadata.managed_fields
    );
    let changed = api
        .patch(
            "same",
            &params,
            &kube::api::Patch::Apply(&config_map("same", json!({"a": "2"}))),
        )
        .await
        .unwrap();
    assert_ne!(
        changed.metadata.resource_version,
        second.metadata.resource_version
    );
}
