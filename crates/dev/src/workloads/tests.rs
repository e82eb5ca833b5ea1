//! The controllers' passes over a store, without processes.

use super::util::{deployments, pods, stateful_sets};
use super::{ImageMap, reconcile_controllers, repository_of, template_hash};
use crate::objects::{
    DeleteOptions, GenerationPolicy, ListOptions, ResourceInfo, Store, WriteOptions,
};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use std::path::PathBuf;

fn store() -> Store {
    let mut store = Store::default();
    store.register(
        pods(),
        ResourceInfo::new("Pod", true).with_status_subresource(),
    );
    store.register(
        super::util::claims(),
        ResourceInfo::new("PersistentVolumeClaim", true).with_status_subresource(),
    );
    for (resource, kind) in [
        (stateful_sets(), "StatefulSet"),
        (deployments(), "Deployment"),
    ] {
        store.register(
            resource,
            ResourceInfo::new(kind, true)
                .with_status_subresource()
                .with_generation(GenerationPolicy::Spec),
        );
    }
    store
}

fn pass(store: &mut Store) {
    let errors = reconcile_controllers(store, Timestamp::now());
    assert!(errors.is_empty(), "{errors:?}");
}

fn pod_names(store: &Store) -> Vec<String> {
    let mut names: Vec<String> = store
        .list(&pods(), Some("ns"), &ListOptions::default())
        .unwrap()
        .items
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

fn make_ready(store: &mut Store, name: &str) {
    let mut pod = store.get(&pods(), "ns", name).unwrap();
    pod["status"] =
        json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]});
    store
        .update_status(&pods(), "ns", name, pod, &WriteOptions::default())
        .unwrap();
}

fn set(replicas: i64, image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "db", "namespace": "ns"},
        "spec": {
            "replicas": replicas,
            "serviceName": "db",
            "selector": {"matchLabels": {"app": "db"}},
            "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [{"name": "c", "image": image}]}},
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {"resources": {"requests": {"storage": "1Gi"}}}}],
        },
    })
}

fn change_spec(
    store: &mut Store,
    resource: &crate::objects::ResourceKey,
    name: &str,
    edit: impl FnOnce(&mut Value),
) {
    let mut object = store.get(resource, "ns", name).unwrap();
    edit(&mut object["spec"]);
    store
        .update(resource, "ns", name, object, &WriteOptions::default())
        .unwrap();
}

#[test]
fn stateful_sets_create_in_order_and_remove_from_the_top() {
    let mut s = store();
    s.create(
        &stateful_sets(),
        "ns",
        set(3, "multisite"),
        &WriteOptions::default(),
        Timestamp::now(),
    )
    .unwrap();
    pass(&mut s);
    pass(&mut s);
    assert_eq!(pod_names(&s), ["db-0"]);
    let claim = s.get(&super::util::claims(), "ns", "data-db-0").unwrap();
    assert_eq!(claim["status"]["phase"], "Bound");
    assert_eq!(claim["status"]["capacity"]["storage"], "1Gi");
    let pod = s.get(&pods(), "ns", "db-0").unwrap();
    assert_eq!(
        pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "data-db-0"
    );
    assert_eq!(pod["metadata"]["labels"]["app"], "db");
    assert_eq!(
        pod["metadata"]["labels"]["apps.kubernetes.io/pod-index"],
        "0"
    );
    make_ready(&mut s, "db-0");
    pass(&mut s);
    assert_eq!(pod_names(&s), ["db-0", "db-1"]);
    make_ready(&mut s, "db-1");
    pass(&mut s);
    make_ready(&mut s, "db-2");
    pass(&mut s);
    let status = s.get(&stateful_sets(), "ns", "db").unwrap()["status"].clone();
    assert_eq!(status["readyReplicas"], 3);
    assert_eq!(status["replicas"], 3);

    // Scale down: the highest ordinal goes first, one at a time.
    change_spec(&mut s, &stateful_sets(), "db", |spec| {
        spec["replicas"] = json!(1)
    });
    let mut pod = s.get(&pods(), "ns", "db-2").unwrap();
    pod["metadata"]["finalizers"] = json!(["test/hold"]);
    s.update(&pods(), "ns", "db-2", pod, &WriteOptions::default())
        .unwrap();
    pass(&mut s);
    pass(&mut s);
    assert_eq!(pod_names(&s), ["db-0", "db-1", "db-2"]);
    let held = s.get(&pods(), "ns", "db-2").unwrap();
    assert!(held["metadata"]["deletionTimestamp"].is_string());
    let mut pod = held;
    pod["metadata"]["finalizers"] = json!([]);
    s.update(&pods(), "ns", "db-2", pod, &WriteOptions::default())
        .unwrap();
    pass(&mut s);
    assert_eq!(pod_names(&s), ["db-0"]);
    // Claims stay.
    assert!(s.get(&super::util::claims(), "ns", "data-db-2").is_ok());

    // A template change replaces pods from the top, once all are ready.
    change_spec(&mut s, &stateful_sets(), "db", |spec| {
        spec["replicas"] = json!(2);
        spec["template"]["spec"]["containers"][0]["image"] = json!("multisite:2");
    });
    pass(&mut s);
    assert_eq!(pod_names(&s), ["db-0", "db-1"]);
    make_ready(&mut s, "db-1");
    pass(&mut s);
    assert_eq!(pod_names(&s), ["db-1"], "the outdated db-0 goes");
    pass(&mut s);
    let pod = s.get(&pods(), "ns", "db-0").unwrap();
    assert_eq!(pod["spec"]["containers"][0]["image"], "multisite:2");
    let status = s.get(&stateful_sets(), "ns", "db").unwrap()["status"].clone();
    assert_eq!(status["observedGeneration"], 3);
}

#[test]
fn deployments_recreate_their_pods_on_a_template_change() {
    let mut s = store();
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "ns"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}},
    });
    s.create(
        &deployments(),
        "ns",
        deployment,
        &WriteOptions::default(),
        Timestamp::now(),
    )
    .unwrap();
    pass(&mut s);
    let first = pod_names(&s);
    assert_eq!(first.len(), 2);
    let hash = template_hash(&s.get(&deployments(), "ns", "web").unwrap()["spec"]["template"]);
    assert!(
        first
            .iter()
            .all(|n| n.starts_with(&format!("web-{hash}-")) && n.len() == 4 + hash.len() + 1 + 5)
    );
    for name in &first {
        let mut pod = s.get(&pods(), "ns", name).unwrap();
        pod["metadata"]["finalizers"] = json!(["test/hold"]);
        s.update(&pods(), "ns", name, pod, &WriteOptions::default())
            .unwrap();
        make_ready(&mut s, name);
    }
    pass(&mut s);
    let status = s.get(&deployments(), "ns", "web").unwrap()["status"].clone();
    assert_eq!(status["availableReplicas"], 2);
    assert_eq!(status["conditions"][0]["status"], "True");
    assert_eq!(status["conditions"][1]["reason"], "NewReplicaSetAvailable");

    change_spec(&mut s, &deployments(), "web", |spec| {
        spec["template"]["spec"]["containers"][0]["image"] = json!("y");
    });
    pass(&mut s);
    pass(&mut s);
    // Old pods are going; no new pod before they are gone.
    assert_eq!(pod_names(&s), first);
    for name in &first {
        let mut pod = s.get(&pods(), "ns", name).unwrap();
        assert!(pod["metadata"]["deletionTimestamp"].is_string());
        pod["metadata"]["finalizers"] = json!([]);
        s.update(&pods(), "ns", name, pod, &WriteOptions::default())
            .unwrap();
    }
    pass(&mut s);
    let second = pod_names(&s);
    assert_eq!(second.len(), 2);
    assert!(second.iter().all(|n| !first.contains(n)));
    let status = s.get(&deployments(), "ns", "web").unwrap()["status"].clone();
    assert_eq!(status["observedGeneration"], 2);
    assert_eq!(status["updatedReplicas"], 2);
    assert_eq!(status["conditions"][0]["status"], "False");

    // Scaling down deletes extras.
    change_spec(&mut s, &deployments(), "web", |spec| {
        spec["replicas"] = json!(1)
    });
    pass(&mut s);
    assert_eq!(pod_names(&s).len(), 1);
    s.delete(
        &deployments(),
        "ns",
        "web",
        &DeleteOptions::default(),
        Timestamp::now(),
    )
    .unwrap();
    pass(&mut s);
}

#[test]
fn template_hashes_ignore_key_order() {
    let a = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"x": 1}});
    let b = json!({"spec": {"x": 1}, "metadata": {"labels": {"b": "2", "a": "1"}}});
    assert_eq!(template_hash(&a), template_hash(&b));
    assert_ne!(template_hash(&a), template_hash(&json!({"spec": {"x": 2}})));
}

#[test]
fn images_map_by_reference_repository_or_the_multisite_suffix() {
    assert_eq!(
        repository_of("ghcr.io/acme/multisite:0.1.0"),
        "ghcr.io/acme/multisite"
    );
    assert_eq!(
        repository_of("localhost:5000/multisite"),
        "localhost:5000/multisite"
    );
    assert_eq!(
        repository_of("localhost:5000/multisite:v1@sha256:ab"),
        "localhost:5000/multisite"
    );
    let map = ImageMap {
        images: Vec::new(),
        multisite: Some(PathBuf::from("/bin/multisite")),
    }
    .with("busybox", "/bin/sh")
    .with("tools:2", "/bin/tools2");
    assert_eq!(
        map.program_for("localhost:5000/acme/multisite:1"),
        Some(PathBuf::from("/bin/multisite"))
    );
    assert_eq!(
        map.program_for("busybox:1.36"),
        Some(PathBuf::from("/bin/sh"))
    );
    assert_eq!(
        map.program_for("tools:2"),
        Some(PathBuf::from("/bin/tools2"))
    );
    assert_eq!(map.program_for("tools:3"), None);
    assert_eq!(map.program_for("nginx"), None);
    assert_eq!(map.program_for("multisite-web"), None);
}
