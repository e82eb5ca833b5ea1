//! Table tests of the object store: one test per behaviour of the Kubernetes API it keeps.

use super::*;
use crate::selectors::Selectors;
use crate::status::FieldErrorType;
use serde_json::json;

fn at(second: i64) -> Timestamp {
    Timestamp::from_second(1_795_000_000 + second).unwrap()
}

fn replicas() -> ResourceKey {
    ResourceKey::new("multisite.dev", "v1alpha1", "replicas")
}

fn configmaps() -> ResourceKey {
    ResourceKey::new("", "v1", "configmaps")
}

fn statefulsets() -> ResourceKey {
    ResourceKey::new("apps", "v1", "statefulsets")
}

fn namespaces() -> ResourceKey {
    ResourceKey::new("", "v1", "namespaces")
}

fn pods() -> ResourceKey {
    ResourceKey::new("", "v1", "pods")
}

fn store_with_window(window: usize) -> Store {
    let mut store = Store::new(window);
    store.register(
        replicas(),
        ResourceInfo::new("Replica", true)
            .with_status_subresource()
            .with_generation(GenerationPolicy::Content),
    );
    store.register(configmaps(), ResourceInfo::new("ConfigMap", true));
    store.register(
        statefulsets(),
        ResourceInfo::new("StatefulSet", true)
            .with_status_subresource()
            .with_generation(GenerationPolicy::Spec),
    );
    store.register(
        namespaces(),
        ResourceInfo::new("Namespace", false).with_name_rule(NameRule::Label),
    );
    store.register(
        pods(),
        ResourceInfo::new("Pod", true)
            .with_status_subresource()
            .with_selectable_fields(&["spec.nodeName", "status.phase"]),
    );
    store
}

fn store() -> Store {
    store_with_window(1000)
}

fn replica(name: &str) -> Value {
    json!({
        "apiVersion": "multisite.dev/v1alpha1",
        "kind": "Replica",
        "metadata": {"name": name},
        "spec": {"family": "sampl", "site": "tokyo"}
    })
}

fn configmap(name: &str, labels: Value) -> Value {
    json!({"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}})
}

fn create(store: &mut Store, resource: &ResourceKey, namespace: &str, body: Value) -> Value {
    store
        .create(resource, namespace, body, &WriteOptions::default(), at(0))
        .unwrap()
}

fn update(store: &mut Store, resource: &ResourceKey, namespace: &str, body: Value) -> Value {
    let name = body["metadata"]["name"].as_str().unwrap().to_string();
    store
        .update(resource, namespace, &name, body, &WriteOptions::default())
        .unwrap()
}

fn delete(store: &mut Store, resource: &ResourceKey, namespace: &str, name: &str) -> Deletion {
    store
        .delete(resource, namespace, name, &DeleteOptions::default(), at(10))
        .unwrap()
}

fn rv(object: &Value) -> u64 {
    resource_version_of(object)
}

fn events_after(store: &Store, resource: &ResourceKey, version: u64) -> Vec<(EventType, Value)> {
    store
        .watch_from(
            resource,
            None,
            &Selectors::everything(),
            Some(&version.to_string()),
        )
        .unwrap()
        .events
        .into_iter()
        .map(|e| (e.event_type, e.object))
        .collect()
}

fn names_of(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|o| {
            let ns = meta_text(o, "namespace");
            let name = meta_text(o, "name");
            if ns.is_empty() {
                name.to_string()
            } else {
                format!("{ns}/{name}")
            }
        })
        .collect()
}

fn list(
    store: &Store,
    resource: &ResourceKey,
    namespace: Option<&str>,
    options: ListOptions,
) -> ObjectList {
    store.list(resource, namespace, &options).unwrap()
}

fn with_labels(label: &str) -> ListOptions {
    ListOptions {
        selectors: Selectors::parse(Some(label), None).unwrap(),
        ..ListOptions::default()
    }
}

// ---- registration ----

#[test]
fn operations_on_an_unregistered_resource_are_not_found_with_the_kubernetes_message() {
    let mut store = store();
    let unknown = ResourceKey::new("example.com", "v1", "widgets");
    let errors = [
        store
            .create(&unknown, "a", json!({}), &WriteOptions::default(), at(0))
            .unwrap_err(),
        store.get(&unknown, "a", "x").unwrap_err(),
        store
            .list(&unknown, None, &ListOptions::default())
            .unwrap_err(),
        store
            .watch_from(&unknown, None, &Selectors::everything(), None)
            .unwrap_err(),
        store
            .delete(&unknown, "a", "x", &DeleteOptions::default(), at(0))
            .unwrap_err(),
    ];
    for err in errors {
        assert_eq!(err, Error::ResourceNotFound);
        assert_eq!(err.code(), 404);
        assert_eq!(err.reason(), Some("NotFound"));
        assert_eq!(
            err.to_string(),
            "the server could not find the requested resource"
        );
    }
}

#[test]
fn cluster_scoped_resources_have_no_namespaced_urls() {
    let mut store = store();
    let err = store
        .create(
            &namespaces(),
            "tracker",
            json!({"metadata": {"name": "x"}}),
            &WriteOptions::default(),
            at(0),
        )
        .unwrap_err();
    assert_eq!(err, Error::ResourceNotFound);
    assert_eq!(
        store
            .list(&namespaces(), Some("tracker"), &ListOptions::default())
            .unwrap_err(),
        Error::ResourceNotFound
    );
}

#[test]
fn registering_again_replaces_the_facts_of_a_resource() {
    let mut store = store();
    store.register(
        configmaps(),
        ResourceInfo::new("ConfigMap", true).with_status_subresource(),
    );
    assert!(
        store
            .resource_info(&configmaps())
            .unwrap()
            .status_subresource
    );
    assert_eq!(store.resources().count(), 5);
}

#[test]
fn unregistering_deletes_every_object_with_an_event() {
    let mut store = store();
    create(&mut store, &replicas(), "t", replica("a"));
    let mut b = replica("b");
    b["metadata"]["finalizers"] = json!(["x.dev/hold"]);
    create(&mut store, &replicas(), "t", b);
    let before = store.resource_version();
    let removed = store.unregister(&replicas());
    assert_eq!(removed.len(), 2);
    assert_eq!(store.resource_version(), before + 2);
    assert_eq!(
        store.get(&replicas(), "t", "a").unwrap_err(),
        Error::ResourceNotFound
    );
}

// ---- resourceVersion ----

#[test]
fn every_write_raises_the_one_global_resource_version() {
    let mut store = store();
    let a = create(&mut store, &replicas(), "t", replica("a"));
    let b = create(&mut store, &configmaps(), "t", configmap("b", json!({})));
    assert_eq!((rv(&a), rv(&b)), (1, 2));
    let mut a2 = a.clone();
    a2["spec"]["site"] = json!("paris");
    let a2 = update(&mut store, &replicas(), "t", a2);
    assert_eq!(rv(&a2), 3);
    let Deletion::Deleted(gone) = delete(&mut store, &configmaps(), "t", "b") else {
        panic!("b has no finalizers");
    };
    assert_eq!(rv(&gone), 4);
    assert_eq!(store.resource_version(), 4);
}

#[test]
fn resource_version_is_rendered_as_a_string() {
    let mut store = store();
    let a = create(&mut store, &replicas(), "t", replica("a"));
    assert_eq!(a["metadata"]["resourceVersion"], json!("1"));
}

// ---- create ----

#[test]
fn create_refuses_an_existing_name_with_already_exists() {
    let mut store = store();
    create(&mut store, &replicas(), "t", replica("a"));
    let err = store
        .create(
            &replicas(),
            "t",
            replica("a"),
            &WriteOptions::default(),
            at(1),
        )
        .unwrap_err();
    assert_eq!(err.code(), 409);
    assert_eq!(err.reason(), Some("AlreadyExists"));
    assert_eq!(
        err.to_string(),
        "replicas.multisite.dev \"a\" already exists"
    );
    // The same name in another namespace is another object.
    create(&mut store, &replicas(), "u", replica("a"));
}

#[test]
fn create_of_a_name_held_by_a_terminating_object_says_it_is_being_deleted() {
    let mut store = store();
    let mut a = replica("a");
    a["metadata"]["finalizers"] = json!(["x.dev/hold"]);
    create(&mut store, &replicas(), "t", a);
    delete(&mut store, &replicas(), "t", "a");
    let err = store
        .create(
            &replicas(),
            "t",
            replica("a"),
            &WriteOptions::default(),
            at(1),
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "object is being deleted: replicas.multisite.dev \"a\" already exists"
    );
}

#[test]
fn create_refuses_a_missing_name_as_invalid() {
    let mut store = store();
    let err = store
        .create(
            &replicas(),
            "t",
            json!({"spec": {}}),
            &WriteOptions::default(),
            at(0),
        )
        .unwrap_err();
    assert_eq!(err.code(), 422);
    assert_eq!(
        err.to_string(),
        "Replica.multisite.dev \"\" is invalid: metadata.name: Required value: name or generateName is required"
    );
    assert_eq!(store.resource_version(), 0);
}

#[test]
fn create_with_generate_name_appends_five_random_lowercase_alphanumerics() {
    let mut store = store();
    let body = json!({"metadata": {"generateName": "web-"}, "spec": {}});
    let a = create(&mut store, &replicas(), "t", body.clone());
    let b = create(&mut store, &replicas(), "t", body);
    let name = meta_text(&a, "name");
    assert!(name.starts_with("web-"));
    assert_eq!(name.len(), 9);
    assert!(
        name[4..]
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    );
    assert_ne!(name, meta_text(&b, "name"));
    assert_eq!(meta_text(&a, "generateName"), "web-");
    assert!(store.get(&replicas(), "t", name).is_ok());
}

#[test]
fn create_sets_uid_creation_timestamp_and_resource_version() {
    let mut store = store();
    let a = create(&mut store, &replicas(), "t", replica("a"));
    let uid = meta_text(&a, "uid");
    assert_eq!(uid.len(), 36);
    assert_eq!(uid.matches('-').count(), 4);
    assert_eq!(meta_text(&a, "resourceVersion"), "1");
    assert!(!meta_text(&a, "creationTimestamp").is_empty());
    let b = create(&mut store, &replicas(), "t", replica("b"));
    assert_ne!(meta_text(&b, "uid"), uid);
}

#[test]
fn creation_timestamp_is_rfc3339_at_second_precision_from_the_given_clock() {
    let mut store = store();
    let now: Timestamp = "2026-11-22T10:15:30.987654Z".parse().unwrap();
    let a = store
        .create(
            &replicas(),
            "t",
            replica("a"),
            &WriteOptions::default(),
            now,
        )
        .unwrap();
    assert_eq!(meta_text(&a, "creationTimestamp"), "2026-11-22T10:15:30Z");
}

#[test]
fn generation_starts_at_one_only_where_the_resource_has_one() {
    let mut store = store();
    let mut body = replica("a");
    body["metadata"]["generation"] = json!(7);
    let a = create(&mut store, &replicas(), "t", body);
    assert_eq!(a["metadata"]["generation"], json!(1));
    let mut cm = configmap("c", json!({}));
    cm["metadata"]["generation"] = json!(7);
    let c = create(&mut store, &configmaps(), "t", cm);
    assert_eq!(c["metadata"].get("generation"), None);
}

#[test]
fn create_keeps_whatever_else_the_object_holds() {
    let mut store = store();
    let mut body = replica("a");
    body["spec"]["nested"] = json!({"list": [1, 2, {"x": null}]});
    body["extra"] = json!("top-level field");
    body["metadata"]["labels"] = json!({"app": "web"});
    body["metadata"]["annotations"] = json!({"note": "kept"});
    body["metadata"]["ownerReferences"] =
        json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "o", "uid": "u-1"}]);
    body["metadata"]["managedFields"] = json!([{"manager": "kubectl"}]);
    let a = create(&mut store, &replicas(), "t", body.clone());
    assert_eq!(a["spec"], body["spec"]);
    assert_eq!(a["extra"], body["extra"]);
    for field in ["labels", "annotations", "ownerReferences", "managedFields"] {
        assert_eq!(a["metadata"][field], body["metadata"][field], "{field}");
    }
}

#[test]
fn create_drops_status_where_a_status_subresource_owns_it() {
    let mut store = store();
    let mut body = replica("a");
    body["status"] = json!({"phase": "Active"});
    let a = create(&mut store, &replicas(), "t", body);
    assert_eq!(a.get("status"), None);
    let mut cm = configmap("c", json!({}));
    cm["status"] = json!({"kept": true});
    let c = create(&mut store, &configmaps(), "t", cm);
    assert_eq!(c["status"], json!({"kept": true}));
}

#[test]
fn create_refuses_a_resource_version_with_the_real_servers_500() {
    let mut store = store();
    let mut body = replica("a");
    body["metadata"]["resourceVersion"] = json!("5");
    let err = store
        .create(&replicas(), "t", body, &WriteOptions::default(), at(0))
        .unwrap_err();
    assert_eq!(err, Error::ResourceVersionOnCreate);
    assert_eq!(err.code(), 500);
}

#[test]
fn create_takes_the_namespace_of_the_request_and_refuses_another() {
    let mut store = store();
    let a = create(&mut store, &replicas(), "tracker", replica("a"));
    assert_eq!(meta_text(&a, "namespace"), "tracker");
    let mut other = replica("b");
    other["metadata"]["namespace"] = json!("elsewhere");
    let err = store
        .create(
            &replicas(),
            "tracker",
            other,
            &WriteOptions::default(),
            at(0),
        )
        .unwrap_err();
    assert_eq!(err.code(), 400);
    assert_eq!(
        err.to_string(),
        "the namespace of the provided object does not match the namespace sent on the request"
    );
    let err = store
        .create(
            &replicas(),
            "",
            replica("c"),
            &WriteOptions::default(),
            at(0),
        )
        .unwrap_err();
    let Error::Invalid { causes, .. } = err else {
        panic!("a namespaced object needs a namespace");
    };
    assert_eq!(causes[0].field, "metadata.namespace");
    assert_eq!(causes[0].error_type, FieldErrorType::Required);
}

#[test]
fn create_clears_the_namespace_of_cluster_scoped_objects() {
    let mut store = store();
    let ns = create(
        &mut store,
        &namespaces(),
        "",
        json!({"metadata": {"name": "tracker", "namespace": "x"}}),
    );
    assert_eq!(ns["metadata"].get("namespace"), None);
    assert!(store.get(&namespaces(), "", "tracker").is_ok());
}

#[test]
fn create_validates_names_by_the_rule_of_the_resource() {
    let mut store = store();
    let err = store
        .create(
            &replicas(),
            "t",
            replica("Tokyo"),
            &WriteOptions::default(),
            at(0),
        )
        .unwrap_err();
    let Error::Invalid { kind, name, causes } = err else {
        panic!("capitals are not allowed");
    };
    assert_eq!(kind.to_string(), "Replica.multisite.dev");
    assert_eq!(name, "Tokyo");
    assert_eq!(causes[0].field, "metadata.name");
    assert_eq!(causes[0].error_type, FieldErrorType::Invalid);
    // Namespaces are labels: no dots.
    let err = store
        .create(
            &namespaces(),
            "",
            json!({"metadata": {"name": "a.b"}}),
            &WriteOptions::default(),
            at(0),
        )
        .unwrap_err();
    assert_eq!(err.code(), 422);
    create(&mut store, &replicas(), "t", replica("a.b"));
}

#[test]
fn create_validates_labels_annotations_and_owner_references() {
    let mut store = store();
    let mut body = replica("a");
    body["metadata"]["labels"] = json!({"bad key": "v", "ok": "bad value"});
    body["metadata"]["annotations"] = json!({"/x": "y"});
    body["metadata"]["ownerReferences"] = json!([
        {"apiVersion": "v1", "kind": "A", "name": "a", "uid": "1", "controller": true},
        {"apiVersion": "v1", "kind": "B", "name": "b", "uid": "", "controller": true}
    ]);
    let Error::Invalid { causes, .. } = store
        .create(&replicas(), "t", body, &WriteOptions::default(), at(0))
        .unwrap_err()
    else {
        panic!("invalid metadata");
    };
    let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
    assert!(fields.contains(&"metadata.labels"));
    assert!(fields.contains(&"metadata.annotations"));
    assert!(fields.contains(&"metadata.ownerReferences.uid"));
    assert!(fields.contains(&"metadata.ownerReferences"));
}

#[test]
fn metadata_of_the_wrong_type_is_a_bad_request() {
    let mut store = store();
    for (field, value) in [
        ("labels", json!({"a": 1})),
        ("finalizers", json!("x")),
        ("name", json!(3)),
        ("ownerReferences", json!([1])),
    ] {
        let mut body = replica("a");
        body["metadata"][field] = value;
        let err = store
            .create(&replicas(), "t", body, &WriteOptions::default(), at(0))
            .unwrap_err();
        assert_eq!(err.code(), 400, "{field}");
    }
    let err = store
        .create(
            &replicas(),
            "t",
            json!([1]),
            &WriteOptions::default(),
            at(0),
        )
        .unwrap_err();
    assert_eq!(err.code(), 400);
}

#[test]
fn create_sets_api_version_and_kind_and_refuses_others() {
    let mut store = store();
    let c = create(&mut store, &configmaps(), "t", configmap("c", json!({})));
    assert_eq!(
        (&c["apiVersion"], &c["kind"]),
        (&json!("v1"), &json!("ConfigMap"))
    );
    let mut wrong = replica("b");
    wrong["kind"] = json!("Site");
    let err = store
        .create(&replicas(), "t", wrong, &WriteOptions::default(), at(0))
        .unwrap_err();
    assert_eq!(err.code(), 400);
    let mut wrong = replica("b");
    wrong["apiVersion"] = json!("multisite.dev/v2");
    assert!(
        store
            .create(&replicas(), "t", wrong, &WriteOptions::default(), at(0))
            .is_err()
    );
}

#[test]
fn create_replaces_a_given_uid_and_drops_deletion_fields() {
    let mut store = store();
    let mut body = replica("a");
    body["metadata"]["uid"] = json!("mine");
    body["metadata"]["creationTimestamp"] = json!("2000-01-01T00:00:00Z");
    body["metadata"]["deletionTimestamp"] = json!("2000-01-01T00:00:00Z");
    body["metadata"]["deletionGracePeriodSeconds"] = json!(30);
    let a = create(&mut store, &replicas(), "t", body);
    assert_ne!(meta_text(&a, "uid"), "mine");
    assert_ne!(meta_text(&a, "creationTimestamp"), "2000-01-01T00:00:00Z");
    assert_eq!(a["metadata"].get("deletionTimestamp"), None);
    assert_eq!(a["metadata"].get("deletionGracePeriodSeconds"), None);
}

#[test]
fn create_drops_empty_and_null_metadata_as_the_real_server_omits_them() {
    let mut store = store();
    let mut body = replica("a");
    body["metadata"]["finalizers"] = json!([]);
    body["metadata"]["labels"] = json!({});
    body["metadata"]["annotations"] = Value::Null;
    let a = create(&mut store, &replicas(), "t", body);
    let meta = a["metadata"].as_object().unwrap();
    assert!(!meta.contains_key("finalizers"));
    assert!(!meta.contains_key("labels"));
    assert!(!meta.contains_key("annotations"));
}

#[test]
fn dry_run_create_stores_nothing() {
    let mut store = store();
    let dry = WriteOptions { dry_run: true };
    let a = store
        .create(&replicas(), "t", replica("a"), &dry, at(0))
        .unwrap();
    assert_eq!(meta_text(&a, "name"), "a");
    assert_eq!(a["metadata"].get("resourceVersion"), None);
    assert_eq!(store.resource_version(), 0);
    assert!(store.get(&replicas(), "t", "a").is_err());
}

// ---- get ----

#[test]
fn get_returns_the_stored_object_and_not_found_otherwise() {
    let mut store = store();
    let a = create(&mut store, &replicas(), "t", replica("a"));
    assert_eq!(store.get(&replicas(), "t", "a").unwrap(), a);
    let err = store.get(&replicas(), "u", "a").unwrap_err();
    assert_eq!(err.to_string(), "replicas.multisite.dev \"a\" not found");
    assert_eq!(
        err.status_json()["details"],
        json!({"name": "a", "group": "multisite.dev", "kind": "replicas"})
    );
    // A namespaced object is not found without its namespace, nor through a slash.
    assert!(store.get(&replicas(), "", "t/a").is_err());
    assert!(store.get(&replicas(), "", "a").is_err());
}

// ---- list ----

#[test]
fn list_returns_objects_in_key_order_across_or_within_namespaces() {
    let mut store = store();
    for (ns, name) in [("b", "x"), ("a", "y"), ("a-b", "z"), ("a", "b")] {
        create(&mut store, &replicas(), ns, replica(name));
    }
    let all = list(&store, &replicas(), None, ListOptions::default());
    // As etcd orders keys: "a/" sorts after "a-b/" because '/' > '-'.
    assert_eq!(names_of(&all.items), ["a-b/z", "a/b", "a/y", "b/x"]);
    let a = list(&store, &replicas(), Some("a"), ListOptions::default());
    assert_eq!(names_of(&a.items), ["a/b", "a/y"]);
    let everything = list(&store, &replicas(), Some(""), ListOptions::default());
    assert_eq!(everything.items.len(), 4);
}

#[test]
fn list_resource_version_is_the_current_one() {
    let mut store = store();
    create(&mut store, &replicas(), "t", replica("a"));
    create(&mut store, &configmaps(), "t", configmap("c", json!({})));
    let l = list(&store, &replicas(), None, ListOptions::default());
    assert_eq!(l.resource_version, 2);
    assert_eq!(l.continue_token, None);
    assert_eq!(l.remaining_item_count, None);
}

#[test]
fn list_filters_by_label_selector() {
    let mut store = store();
    create(
        &mut store,
        &configmaps(),
        "t",
        configmap("a", json!({"app": "web", "tier": "front"})),
    );
    create(
        &mut store,
        &configmaps(),
        "t",
        configmap("b", json!({"app": "db"})),
    );
    create(&mut store, &configmaps(), "t", configmap("c", json!({})));
    let cases = [
        ("app=web", vec!["t/a"]),
        ("app!=web", vec!["t/b", "t/c"]),
        ("app", vec!["t/a", "t/b"]),
        ("!app", vec!["t/c"]),
        ("app in (web,db)", vec!["t/a", "t/b"]),
        ("app notin (web)", vec!["t/b", "t/c"]),
        ("app=web,tier=front", vec!["t/a"]),
        ("app=web,tier=back", vec![]),
    ];
    for (selector, want) in cases {
        let got = list(&store, &configmaps(), None, with_labels(selector));
        assert_eq!(names_of(&got.items), want, "{selector}");
    }
}

#[test]
fn list_filters_by_field_selector_on_name_namespace_and_declared_fields() {
    let mut store = store();
    create(&mut store, &configmaps(), "t", configmap("a", json!({})));
    create(&mut store, &configmaps(), "u", configmap("a", json!({})));
    create(&mut store, &configmaps(), "u", configmap("b", json!({})));
    let by_field = |field: &str| ListOptions {
        selectors: Selectors::parse(None, Some(field)).unwrap(),
        ..ListOptions::default()
    };
    let cases = [
        ("metadata.name=a", vec!["t/a", "u/a"]),
        ("metadata.name==a,metadata.namespace=u", vec!["u/a"]),
        ("metadata.namespace!=u", vec!["t/a"]),
    ];
    for (selector, want) in cases {
        let got = list(&store, &configmaps(), None, by_field(selector));
        assert_eq!(names_of(&got.items), want, "{selector}");
    }
    create(
        &mut store,
        &pods(),
        "t",
        json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n1"}}),
    );
    let got = list(&store, &pods(), None, by_field("spec.nodeName=n1"));
    assert_eq!(names_of(&got.items), ["t/p"]);
}

#[test]
fn list_refuses_field_labels_the_resource_does_not_offer() {
    let store = store();
    let options = ListOptions {
        selectors: Selectors::parse(None, Some("spec.nodeName=n1")).unwrap(),
        ..ListOptions::default()
    };
    let err = store.list(&configmaps(), None, &options).unwrap_err();
    assert_eq!(err.code(), 400);
    assert_eq!(err.to_string(), "field label not supported: spec.nodeName");
}

#[test]
fn invalid_selectors_are_bad_requests_with_a_message() {
    for (label, field) in [(Some("app in ("), None), (None, Some("metadata.name"))] {
        let err = Selectors::parse(label, field).unwrap_err();
        assert_eq!(err.code(), 400);
        assert_eq!(err.reason(), Some("BadRequest"));
        assert!(!err.to_string().is_empty());
    }
}

#[test]
fn list_pages_with_limit_and_continue() {
    let mut store = store();
    for name in ["a", "b", "c", "d", "e"] {
        create(&mut store, &replicas(), "t", replica(name));
    }
    let mut pages = Vec::new();
    let mut token = None;
    loop {
        let page = list(
            &store,
            &replicas(),
            None,
            ListOptions {
                limit: Some(2),
                continue_token: token.clone(),
                ..ListOptions::default()
            },
        );
        assert_eq!(page.resource_version, 5);
        pages.push(names_of(&page.items));
        token = page.continue_token;
        if token.is_none() {
            break;
        }
    }
    assert_eq!(pages, [vec!["t/a", "t/b"], vec!["t/c", "t/d"], vec!["t/e"]]);
}

#[test]
fn remaining_item_count_is_given_only_without_selectors() {
    let mut store = store();
    for name in ["a", "b", "c"] {
        create(
            &mut store,
            &configmaps(),
            "t",
            configmap(name, json!({"app": "web"})),
        );
    }
    let page = list(
        &store,
        &configmaps(),
        None,
        ListOptions {
            limit: Some(1),
            ..ListOptions::default()
        },
    );
    assert_eq!(page.remaining_item_count, Some(2));
    let mut selected = with_labels("app=web");
    selected.limit = Some(1);
    let page = list(&store, &configmaps(), None, selected);
    assert!(page.continue_token.is_some());
    assert_eq!(page.remaining_item_count, None);
}

#[test]
fn a_continued_list_shows_the_objects_as_of_its_first_page() {
    let mut store = store();
    for name in ["a", "b", "c", "d"] {
        create(&mut store, &configmaps(), "t", configmap(name, json!({})));
    }
    let first = list(
        &store,
        &configmaps(),
        None,
        ListOptions {
            limit: Some(2),
            ..ListOptions::default()
        },
    );
    delete(&mut store, &configmaps(), "t", "c");
    create(&mut store, &configmaps(), "t", configmap("cc", json!({})));
    let mut d = store.get(&configmaps(), "t", "d").unwrap();
    d["data"] = json!({"changed": "yes"});
    update(&mut store, &configmaps(), "t", d);
    let rest = list(
        &store,
        &configmaps(),
        None,
        ListOptions {
            continue_token: first.continue_token.clone(),
            ..ListOptions::default()
        },
    );
    assert_eq!(names_of(&rest.items), ["t/c", "t/d"]);
    assert_eq!(rest.items[1]["data"], json!({"k": "v"}));
    assert_eq!(rest.resource_version, first.resource_version);
}

#[test]
fn a_continue_token_from_a_compacted_version_is_410_expired() {
    let mut store = store_with_window(2);
    for name in ["a", "b", "c"] {
        create(&mut store, &configmaps(), "t", configmap(name, json!({})));
    }
    let first = list(
        &store,
        &configmaps(),
        None,
        ListOptions {
            limit: Some(1),
            ..ListOptions::default()
        },
    );
    for name in ["d", "e", "f"] {
        create(&mut store, &configmaps(), "t", configmap(name, json!({})));
    }
    let err = store
        .list(
            &configmaps(),
            None,
            &ListOptions {
                continue_token: first.continue_token,
                ..ListOptions::default()
            },
        )
        .unwrap_err();
    assert_eq!(err.code(), 410);
    assert_eq!(err.reason(), Some("Expired"));
}

#[test]
fn a_garbled_continue_token_is_a_bad_request() {
    let store = store();
    for token in ["zz", "abc", "7b7d", "\u{e9}\u{e9}"] {
        let err = store
            .list(
                &configmaps(),
                None,
                &ListOptions {
                    continue_token: Some(token.to_string()),
                    ..ListOptions::default()
                },
            )
            .unwrap_err();
        assert_eq!(err.code(), 400, "{token}");
    }
}

#[test]
fn a_list_renders_with_list_metadata() {
    let mut store = store();
    for name in ["a", "b"] {
        create(&mut store, &configmaps(), "t", configmap(name, json!({})));
    }
    let page = list(
        &store,
        &configmaps(),
        None,
        ListOptions {
            limit: Some(1),
            ..ListOptions::default()
        },
    );
    let rendered = page.to_json("v1", "ConfigMapList");
    assert_eq!(rendered["kind"], "ConfigMapList");
    assert_eq!(rendered["metadata"]["resourceVersion"], "2");
    assert_eq!(rendered["metadata"]["remainingItemCount"], 1);
    assert!(rendered["metadata"]["continue"].is_string());
    assert_eq!(rendered["items"].as_array().unwrap().len(), 1);
}

// ---- update ----

#[test]
fn update_with_a_stale_resource_version_is_a_conflict() {
    let mut store = store();
    let a = create(&mut store, &replicas(), "t", replica("a"));
    let mut first = a.clone();
    first["spec"]["site"] = json!("paris");
    update(&mut store, &replicas(), "t", first);
    let mut stale = a;
    stale["spec"]["site"] = json!("austin");
    let err = store
        .update(&replicas(), "t", "a", stale, &WriteOptions::default())
        .unwrap_err();
    assert_eq!(err.code(), 409);
    assert_eq!(err.reason(), Some("Conflict"));
    assert_eq!(
        err.to_string(),
        "Operation cannot be fulfilled on replicas.multisite.dev \"a\": the object has been modified; \
         please apply your changes to the latest version and try again"
    );
}

#[test]
fn update_without_resource_version_is_unconditional() {
    let mut store = store();
    create(&mut store, &replicas(), "t", replica("a"));
    let mut body = replica("a");
    body["spec"]["site"] = json!("paris");
    let a = update(&mut store, &replicas(), "t", body);
    assert_eq!(a["spec"]["site"], "paris");
    assert_eq!(rv(&a), 2);
}

#[test]
fn update_with_resource_version_zero_is_unconditional_too() {
    let mut store = store();
    create(&mut store, &replicas(), "t", replica("a"));
    let mut body = replica("a");
    body["metadata"]["resourceVersion"] = json!("0");
    body["spec"]["site"] = json!("paris");
    assert_eq!(rv(&update(&mut store, &replicas(), "t", body)), 2);
    let mut body = replica("a");
    body["metadata"]["resourceVersion"] = json!("x1");
    let err = store
        .update(&replicas(), "t", "a", body, &WriteOptions::default())
        .unwrap_err();
    assert_eq!(err.code(), 400);
}

#[test]
fn update_keeps_uid_creation_timestamp_name_and_namespace() {
    let mut store = store();
    let a = create(&mut store, &replicas(), "t", replica("a"));
    let mut body = replica("a");
    body["metadata"]["creationTimestamp"] = json!("2000-01-01T00:00:00Z");
    body["spec"]["site"] = json!("paris");
    let b = update(&mut store, &replicas(), "t", body);
    for field in ["uid", "creationTimestamp", "name", "namespace"] {
        assert_eq!(meta_text(&a, field), meta_text(&b, field), "{field}");
    }
}

#[test]
fn update_with_another_uid_is_a_precondition_conflict() {
    let mut store = store();
    let a = create(&mut store, &replicas(), "t", replica("a"));
    let mut body = replica("a");
    body["metadata"]["uid"] = json!("someone-else");
    let err = store
        .update(&replicas(), "t", "a", body, &WriteOptions::default())
        .unwrap_err();
    assert_eq!(err.code(), 409);
    assert_eq!(
        err.to_string(),
        format!(
            "Operation cannot be fulfilled on replicas.multisite.dev \"a\": Precondition failed: \
             UID in precondition: someone-else, UID in object meta: {}",
            meta_text(&a, "uid")
        )
    );
}

#[test]
fn update_with_another_name_or_namespace_is_a_bad_request() {
    let mut store = store();
    create(&mut store, &replicas(), "t", replica("a"));
    let err = store
        .update(
            &replicas(),
            "t",
            "a",
            replica("b"),
            &WriteOptions::default(),
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the name of the object (b) does not match the name on the URL (a)"
    );
    let mut body = replica("a");
    body["metadata"]["namespace"] = json!("u");
    let err = store
        .update(&replicas(), "t", "a", body, &WriteOptions::default())
        .unwrap_err();
    assert_eq!(err.code(), 400);
}

#[test]
fn update_of_a_missing_object_is_not_found() {
    let mut store = store();
    let err = store
        .update(
            &replicas(),
            "t",
            "a",
            replica("a"),
            &WriteOptions::default(),
        )
        .unwrap_err();
    assert_eq!(err.code(), 404);
}

#[test]
fn generation_rises_when_the_spec_changes() {
    let mut store = store();
    let a = create(&mut store, &replicas(), "t", replica("a"));
    let mut body = a.clone();
    body["spec"]["site"] = json!("paris");
    let b = update(&mut store, &replicas(), "t", body);
    assert_eq!(b["metadata"]["generation"], 2);
}

#[test]
fn generation_stays_on_metadata_only_changes() {
    let mut store = store();
    let a = create(&mut store, &replicas(), "t", replica("a"));
    let mut body = a.clone();
    body["metadata"]["labels"] = json!({"app": "web"});
    body["metadata"]["generation"] = json!(40);
    let b = update(&mut store, &replicas(), "t", body);
    assert_eq!(b["metadata"]["generation"], 1);
    assert_eq!(rv(&b), 2);
}

#[test]
fn generation_of_spec_resources_ignores_other_top_level_fields_but_content_resources_do_not() {
    let mut store = store();
    let s = create(
        &mut store,
        &statefulsets(),
        "t",
        json!({"metadata": {"name": "s"}, "spec": {"replicas": 1}}),
    );
    let mut body = s.clone();
    body["extra"] = json!(1);
    let s = update(&mut store, &statefulsets(), "t", body);
    assert_eq!(s["metadata"]["generation"], 1);
    let mut body = s;
    body["spec"]["replicas"] = json!(3);
    assert_eq!(
        update(&mut store, &statefulsets(), "t", body)["metadata"]["generation"],
        2
    );

    let r = create(&mut store, &replicas(), "t", replica("r"));
    let mut body = r;
    body["extra"] = json!(1);
    assert_eq!(
        update(&mut store, &replicas(), "t", body)["metadata"]["generation"],
        2
    );
}

#[test]
fn an_update_that_changes_nothing_writes_nothing() {
    let mut store = store();
    let a = create(&mut store, &replicas(), "t", replica("a"));
    let again = update(&mut store, &replicas(), "t", a.clone());
    assert_eq!(again, a);
    assert_eq!(store.resource_version(), 1);
    assert!(events_after(&store, &replicas(), 1).is_empty());
}

#[test]
fn a_main_update_ignores_status_where_a_status_subresource_owns_it() {
    let mut store = store();
    create(&mut store, &replicas(), "t", replica("a"));
    let mut with_status = replica("a");
    with_status["status"] = json!({"phase": "Active"});
    let a = store
        .update_status(&replicas(), "t", "a", with_status, &WriteOptions::default())
        .unwrap();
    let mut body = a.clone();
    body["status"] = json!({"phase": "Removing"});
    body["spec"]["site"] = json!("paris");
    let b = update(&mut store, &replicas(), "t", body);
    assert_eq!(b["status"], json!({"phase": "Active"}));
    assert_eq!(b["spec"]["site"], "paris");
}

#[test]
fn a_main_update_changes_status_without_a_status_subresource() {
    let mut store = store();
    let c = create(&mut store, &configmaps(), "t", configmap("c", json!({})));
    let mut body = c;
    body["status"] = json!({"x": 1});
    assert_eq!(
        update(&mut store, &configmaps(), "t", body)["status"],
        json!({"x": 1})
    );
}

#[test]
fn a_status_update_changes_only_status_and_not_generation() {
    let mut store = store();
    let a = create(&mut store, &replicas(), "t", replica("a"));
    let mut body = a.clone();
    body["status"] = json!({"phase": "Active"});
    body["spec"]["site"] = json!("paris");
    body["metadata"]["labels"] = json!({"sneaky": "yes"});
    let b = store
        .update_status(&replicas(), "t", "a", body, &WriteOptions::default())
        .unwrap();
    assert_eq!(b["status"], json!({"phase": "Active"}));
    assert_eq!(b["spec"], a["spec"]);
    assert_eq!(b["metadata"].get("labels"), None);
    assert_eq!(b["metadata"]["generation"], 1);
    assert_eq!(rv(&b), 2);
}

#[test]
fn a_status_update_keeps_optimistic_concurrency() {
    let mut store = store();
    let a = create(&mut store, &replicas(), "t", replica("a"));
    let mut body = a.clone();
    body["spec"]["site"] = json!("paris");
    update(&mut store, &replicas(), "t", body);
    let mut stale = a;
    stale["status"] = json!({"phase": "Active"});
    let err = store
        .update_status(&replicas(), "t", "a", stale, &WriteOptions::default())
        .unwrap_err();
    assert_eq!(err.reason(), Some("Conflict"));
}

#[test]
fn a_status_update_on_a_resource_without_the_subresource_is_not_found() {
    let mut store = store();
    create(&mut store, &configmaps(), "t", configmap("c", json!({})));
    let err = store
        .update_status(
            &configmaps(),
            "t",
            "c",
            configmap("c", json!({})),
            &WriteOptions::default(),
        )
        .unwrap_err();
    assert_eq!(err, Error::ResourceNotFound);
}

#[test]
fn dry_run_update_stores_nothing() {
    let mut store = store();
    let a = create(&mut store, &replicas(), "t", replica("a"));
    let mut body = a.clone();
    body["spec"]["site"] = json!("paris");
    let dry = store
        .update(&replicas(), "t", "a", body, &WriteOptions { dry_run: true })
        .unwrap();
    assert_eq!(dry["spec"]["site"], "paris");
    assert_eq!(dry["metadata"]["generation"], 2);
    assert_eq!(store.get(&replicas(), "t", "a").unwrap(), a);
    assert_eq!(store.resource_version(), 1);
}

// ---- delete and finalizers ----

fn held(name: &str, finalizers: &[&str]) -> Value {
    let mut body = replica(name);
    body["metadata"]["finalizers"] = json!(finalizers);
    body
}

#[test]
fn delete_without_finalizers_removes_the_object_with_a_deleted_event() {
    let mut store = store();
    let a = create(&mut store, &replicas(), "t", replica("a"));
    let Deletion::Deleted(gone) = delete(&mut store, &replicas(), "t", "a") else {
        panic!("no finalizers: deleted at once");
    };
    assert_eq!(rv(&gone), 2);
    assert!(store.get(&replicas(), "t", "a").is_err());
    let events = events_after(&store, &replicas(), 1);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, EventType::Deleted);
    assert_eq!(meta_text(&events[0].1, "uid"), meta_text(&a, "uid"));
    assert_eq!(rv(&events[0].1), 2);
}

#[test]
fn delete_with_finalizers_sets_deletion_timestamp_and_keeps_the_object() {
    let mut store = store();
    create(&mut store, &replicas(), "t", held("a", &["x.dev/hold"]));
    let Deletion::Finalizing(marked) = delete(&mut store, &replicas(), "t", "a") else {
        panic!("finalizers hold it");
    };
    assert_eq!(meta_text(&marked, "deletionTimestamp"), format_time(at(10)));
    assert_eq!(marked["metadata"]["deletionGracePeriodSeconds"], 0);
    assert_eq!(store.get(&replicas(), "t", "a").unwrap(), marked);
    let events = events_after(&store, &replicas(), 1);
    assert_eq!(events[0].0, EventType::Modified);
}

#[test]
fn starting_deletion_raises_generation_once_as_kubernetes_does() {
    let mut store = store();
    create(&mut store, &replicas(), "t", held("a", &["x.dev/hold"]));
    let Deletion::Finalizing(marked) = delete(&mut store, &replicas(), "t", "a") else {
        panic!("finalizers hold it");
    };
    assert_eq!(marked["metadata"]["generation"], 2);
    let Deletion::Finalizing(again) = delete(&mut store, &replicas(), "t", "a") else {
        panic!("finalizers still hold it");
    };
    assert_eq!(again, marked);
    assert_eq!(store.resource_version(), 2);
}

#[test]
fn emptying_the_finalizers_of_a_terminating_object_deletes_it() {
    let mut store = store();
    create(&mut store, &replicas(), "t", held("a", &["x.dev/hold"]));
    delete(&mut store, &replicas(), "t", "a");
    let mut body = store.get(&replicas(), "t", "a").unwrap();
    body["metadata"]["finalizers"] = json!([]);
    let answer = update(&mut store, &replicas(), "t", body);
    assert_eq!(answer["metadata"].get("finalizers"), None);
    assert!(store.get(&replicas(), "t", "a").is_err());
    let events = events_after(&store, &replicas(), 2);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, EventType::Deleted);
    assert_eq!(rv(&events[0].1), 3);
}

#[test]
fn removing_one_of_two_finalizers_keeps_the_object() {
    let mut store = store();
    create(
        &mut store,
        &replicas(),
        "t",
        held("a", &["x.dev/a", "x.dev/b"]),
    );
    delete(&mut store, &replicas(), "t", "a");
    let mut body = store.get(&replicas(), "t", "a").unwrap();
    body["metadata"]["finalizers"] = json!(["x.dev/b"]);
    update(&mut store, &replicas(), "t", body);
    let a = store.get(&replicas(), "t", "a").unwrap();
    assert_eq!(a["metadata"]["finalizers"], json!(["x.dev/b"]));
}

#[test]
fn adding_a_finalizer_to_an_object_being_deleted_is_forbidden() {
    let mut store = store();
    create(&mut store, &replicas(), "t", held("a", &["x.dev/a"]));
    delete(&mut store, &replicas(), "t", "a");
    let mut body = store.get(&replicas(), "t", "a").unwrap();
    body["metadata"]["finalizers"] = json!(["x.dev/a", "x.dev/new"]);
    let err = store
        .update(&replicas(), "t", "a", body, &WriteOptions::default())
        .unwrap_err();
    assert_eq!(err.code(), 422);
    assert_eq!(
        err.to_string(),
        "Replica.multisite.dev \"a\" is invalid: metadata.finalizers: Forbidden: no new finalizers \
         can be added if the object is being deleted, found new finalizers []string{\"x.dev/new\"}"
    );
    assert_eq!(
        err.status_json()["details"]["causes"][0]["reason"],
        "FieldValueForbidden"
    );
}

#[test]
fn an_update_cannot_remove_the_deletion_timestamp() {
    let mut store = store();
    create(&mut store, &replicas(), "t", held("a", &["x.dev/a"]));
    let Deletion::Finalizing(marked) = delete(&mut store, &replicas(), "t", "a") else {
        panic!("held");
    };
    let mut body = marked.clone();
    body["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("deletionTimestamp");
    body["spec"]["site"] = json!("paris");
    let b = update(&mut store, &replicas(), "t", body);
    assert_eq!(
        meta_text(&b, "deletionTimestamp"),
        meta_text(&marked, "deletionTimestamp")
    );
}

#[test]
fn delete_with_a_stale_resource_version_precondition_is_a_conflict() {
    let mut store = store();
    create(&mut store, &replicas(), "t", replica("a"));
    let options = DeleteOptions {
        preconditions: Preconditions {
            resource_version: Some("7".into()),
            uid: None,
        },
        dry_run: false,
    };
    let err = store
        .delete(&replicas(), "t", "a", &options, at(1))
        .unwrap_err();
    assert_eq!(err.code(), 409);
    assert_eq!(
        err.to_string(),
        "Operation cannot be fulfilled on replicas.multisite.dev \"a\": Precondition failed: \
         ResourceVersion in precondition: 7, ResourceVersion in object meta: 1"
    );
    assert!(store.get(&replicas(), "t", "a").is_ok());
}

#[test]
fn delete_with_another_uid_precondition_is_a_conflict() {
    let mut store = store();
    let a = create(&mut store, &replicas(), "t", replica("a"));
    let wrong = DeleteOptions {
        preconditions: Preconditions {
            uid: Some("other".into()),
            resource_version: None,
        },
        dry_run: false,
    };
    assert_eq!(
        store
            .delete(&replicas(), "t", "a", &wrong, at(1))
            .unwrap_err()
            .code(),
        409
    );
    let right = DeleteOptions {
        preconditions: Preconditions {
            uid: Some(meta_text(&a, "uid").to_string()),
            resource_version: Some("1".into()),
        },
        dry_run: false,
    };
    assert!(store.delete(&replicas(), "t", "a", &right, at(1)).is_ok());
}

#[test]
fn delete_of_a_missing_object_is_not_found() {
    let mut store = store();
    let err = store
        .delete(&replicas(), "t", "a", &DeleteOptions::default(), at(0))
        .unwrap_err();
    assert_eq!(err.code(), 404);
}

#[test]
fn dry_run_delete_keeps_the_object() {
    let mut store = store();
    create(&mut store, &replicas(), "t", replica("a"));
    create(&mut store, &replicas(), "t", held("b", &["x.dev/a"]));
    let dry = DeleteOptions {
        dry_run: true,
        ..DeleteOptions::default()
    };
    assert!(matches!(
        store.delete(&replicas(), "t", "a", &dry, at(1)).unwrap(),
        Deletion::Deleted(_)
    ));
    let Deletion::Finalizing(b) = store.delete(&replicas(), "t", "b", &dry, at(1)).unwrap() else {
        panic!("held");
    };
    assert!(!meta_text(&b, "deletionTimestamp").is_empty());
    assert_eq!(store.resource_version(), 2);
    assert_eq!(
        store.get(&replicas(), "t", "b").unwrap()["metadata"].get("deletionTimestamp"),
        None
    );
}

// ---- garbage collection ----

fn owned_by(name: &str, owners: &[&Value]) -> Value {
    let refs: Vec<Value> = owners
        .iter()
        .map(|o| {
            json!({"apiVersion": "multisite.dev/v1alpha1", "kind": "Replica",
                   "name": meta_text(o, "name"), "uid": meta_text(o, "uid")})
        })
        .collect();
    json!({"metadata": {"name": name, "ownerReferences": refs}, "data": {}})
}

#[test]
fn garbage_collection_deletes_objects_whose_owners_are_all_gone() {
    let mut store = store();
    let a = create(&mut store, &replicas(), "t", replica("a"));
    let b = create(&mut store, &replicas(), "t", replica("b"));
    create(&mut store, &configmaps(), "t", owned_by("of-a", &[&a]));
    create(
        &mut store,
        &configmaps(),
        "t",
        owned_by("of-a-and-b", &[&a, &b]),
    );
    create(&mut store, &configmaps(), "t", configmap("free", json!({})));
    delete(&mut store, &replicas(), "t", "a");
    let collected = store.collect_garbage(at(20));
    assert_eq!(collected.len(), 1);
    assert_eq!(
        (collected[0].resource.clone(), collected[0].name.as_str()),
        (configmaps(), "of-a")
    );
    assert!(matches!(collected[0].deletion, Deletion::Deleted(_)));
    let left = list(&store, &configmaps(), None, ListOptions::default());
    assert_eq!(names_of(&left.items), ["t/free", "t/of-a-and-b"]);
}

#[test]
fn garbage_collection_follows_chains_of_owners() {
    let mut store = store();
    let a = create(&mut store, &replicas(), "t", replica("a"));
    let mut b = replica("b");
    b["metadata"]["ownerReferences"] =
        json!([{"apiVersion": "v1", "kind": "Replica", "name": "a", "uid": meta_text(&a, "uid")}]);
    let b = create(&mut store, &replicas(), "t", b);
    create(&mut store, &configmaps(), "t", owned_by("of-b", &[&b]));
    delete(&mut store, &replicas(), "t", "a");
    let collected = store.collect_garbage(at(20));
    let names: Vec<&str> = collected.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["b", "of-b"]);
    assert!(store.collect_garbage(at(21)).is_empty());
}

#[test]
fn garbage_collection_respects_finalizers() {
    let mut store = store();
    let a = create(&mut store, &replicas(), "t", replica("a"));
    let mut dependent = owned_by("of-a", &[&a]);
    dependent["metadata"]["finalizers"] = json!(["x.dev/hold"]);
    create(&mut store, &configmaps(), "t", dependent);
    delete(&mut store, &replicas(), "t", "a");
    let collected = store.collect_garbage(at(20));
    assert!(matches!(collected[0].deletion, Deletion::Finalizing(_)));
    let held = store.get(&configmaps(), "t", "of-a").unwrap();
    assert!(!meta_text(&held, "deletionTimestamp").is_empty());
    // Already being deleted: not collected again.
    assert!(store.collect_garbage(at(21)).is_empty());
}

#[test]
fn an_owner_waiting_for_its_finalizers_keeps_its_dependents() {
    let mut store = store();
    let a = create(&mut store, &replicas(), "t", held("a", &["x.dev/hold"]));
    create(&mut store, &configmaps(), "t", owned_by("of-a", &[&a]));
    delete(&mut store, &replicas(), "t", "a");
    assert!(store.collect_garbage(at(20)).is_empty());
}

// ---- watch ----

#[test]
fn a_watch_from_a_version_returns_the_events_after_it_with_objects_as_they_were() {
    let mut store = store();
    create(&mut store, &configmaps(), "t", configmap("c", json!({})));
    let a = create(&mut store, &replicas(), "t", replica("a"));
    let mut body = a.clone();
    body["spec"]["site"] = json!("paris");
    update(&mut store, &replicas(), "t", body);
    create(&mut store, &configmaps(), "t", configmap("d", json!({})));
    delete(&mut store, &replicas(), "t", "a");
    // Version "0" would mean "start now"; a watch resumes from a real version.
    let events = events_after(&store, &replicas(), 1);
    let kinds: Vec<EventType> = events.iter().map(|e| e.0).collect();
    assert_eq!(
        kinds,
        [EventType::Added, EventType::Modified, EventType::Deleted]
    );
    assert_eq!(events[0].1, a);
    assert_eq!(events[1].1["spec"]["site"], "paris");
    let versions: Vec<u64> = events.iter().map(|e| rv(&e.1)).collect();
    assert_eq!(versions, [2, 3, 5]);
    assert_eq!(events_after(&store, &replicas(), 3).len(), 1);
    assert!(events_after(&store, &replicas(), 5).is_empty());
}

#[test]
fn a_watch_filters_by_namespace_and_selectors() {
    let mut store = store();
    create(
        &mut store,
        &configmaps(),
        "t",
        configmap("a", json!({"app": "web"})),
    );
    create(
        &mut store,
        &configmaps(),
        "u",
        configmap("b", json!({"app": "web"})),
    );
    create(
        &mut store,
        &configmaps(),
        "t",
        configmap("c", json!({"app": "db"})),
    );
    let web = Selectors::parse(Some("app=web"), None).unwrap();
    let batch = store
        .watch_from(&configmaps(), Some("t"), &web, Some("0"))
        .unwrap();
    assert_eq!(
        names_of(
            &batch
                .events
                .iter()
                .map(|e| e.object.clone())
                .collect::<Vec<_>>()
        ),
        ["t/a"]
    );
    let batch = store
        .watch_from(&configmaps(), None, &web, Some("1"))
        .unwrap();
    assert_eq!(batch.events.len(), 1);
    assert_eq!(meta_text(&batch.events[0].object, "name"), "b");
}

#[test]
fn objects_entering_or_leaving_a_selection_are_added_or_deleted_for_that_watch() {
    let mut store = store();
    let a = create(
        &mut store,
        &configmaps(),
        "t",
        configmap("a", json!({"app": "db"})),
    );
    let web = Selectors::parse(Some("app=web"), None).unwrap();
    let mut body = a;
    body["metadata"]["labels"] = json!({"app": "web"});
    let entered = update(&mut store, &configmaps(), "t", body.clone());
    body["metadata"]["labels"] = json!({"app": "db"});
    body["metadata"]["resourceVersion"] = json!("2");
    update(&mut store, &configmaps(), "t", body);
    let batch = store
        .watch_from(&configmaps(), None, &web, Some("1"))
        .unwrap();
    let kinds: Vec<EventType> = batch.events.iter().map(|e| e.event_type).collect();
    assert_eq!(kinds, [EventType::Added, EventType::Deleted]);
    assert_eq!(batch.events[0].object, entered);
    // The DELETED one is the last state the watcher could see, at the event's version.
    assert_eq!(
        batch.events[1].object["metadata"]["labels"],
        json!({"app": "web"})
    );
    assert_eq!(batch.events[1].resource_version(), 3);
}

#[test]
fn a_watch_from_a_version_older_than_the_window_is_410_expired() {
    let mut store = store_with_window(3);
    for name in ["a", "b", "c", "d", "e"] {
        create(&mut store, &configmaps(), "t", configmap(name, json!({})));
    }
    assert_eq!(store.oldest_resource_version(), 2);
    let err = store
        .watch_from(&configmaps(), None, &Selectors::everything(), Some("1"))
        .unwrap_err();
    assert_eq!(err.code(), 410);
    assert_eq!(err.reason(), Some("Expired"));
    assert_eq!(err.to_string(), "too old resource version: 1 (2)");
    assert_eq!(events_after(&store, &configmaps(), 2).len(), 3);
}

#[test]
fn a_watch_without_version_or_from_zero_starts_now_with_synthetic_added_events() {
    let mut store = store();
    let a = create(&mut store, &replicas(), "t", replica("a"));
    let mut body = a;
    body["spec"]["site"] = json!("paris");
    let a = update(&mut store, &replicas(), "t", body);
    let b = create(&mut store, &replicas(), "t", replica("b"));
    for version in [None, Some("0"), Some("")] {
        let batch = store
            .watch_from(&replicas(), None, &Selectors::everything(), version)
            .unwrap();
        assert_eq!(batch.resource_version, 3);
        let events: Vec<(EventType, Value)> = batch
            .events
            .into_iter()
            .map(|e| (e.event_type, e.object))
            .collect();
        assert_eq!(
            events,
            [(EventType::Added, a.clone()), (EventType::Added, b.clone())]
        );
    }
}

#[test]
fn the_batch_version_continues_a_watch_without_gaps_or_repeats() {
    let mut store = store();
    create(
        &mut store,
        &configmaps(),
        "t",
        configmap("first", json!({})),
    );
    let first = store
        .watch_from(&replicas(), None, &Selectors::everything(), None)
        .unwrap();
    assert!(first.events.is_empty());
    assert_eq!(first.resource_version, 1);
    create(&mut store, &replicas(), "t", replica("a"));
    create(&mut store, &configmaps(), "t", configmap("c", json!({})));
    let second = store
        .watch_from(
            &replicas(),
            None,
            &Selectors::everything(),
            Some(&first.resource_version.to_string()),
        )
        .unwrap();
    assert_eq!(second.events.len(), 1);
    assert_eq!(second.resource_version, 3);
    let third = store
        .watch_from(
            &replicas(),
            None,
            &Selectors::everything(),
            Some(&second.resource_version.to_string()),
        )
        .unwrap();
    assert!(third.events.is_empty());
}

#[test]
fn a_watch_with_an_unparsable_version_is_a_bad_request() {
    let store = store();
    let err = store
        .watch_from(&replicas(), None, &Selectors::everything(), Some("abc"))
        .unwrap_err();
    assert_eq!(err.code(), 400);
}

#[test]
fn a_bookmark_holds_only_the_resource_version() {
    let mut store = store();
    create(&mut store, &replicas(), "t", replica("a"));
    let bookmark = store.bookmark(&replicas(), false).unwrap();
    assert_eq!(
        bookmark.to_json(),
        json!({"type": "BOOKMARK", "object": {
            "kind": "Replica", "apiVersion": "multisite.dev/v1alpha1",
            "metadata": {"resourceVersion": "1"}
        }})
    );
    let end = store.bookmark(&replicas(), true).unwrap();
    assert_eq!(
        end.object["metadata"]["annotations"],
        json!({"k8s.io/initial-events-end": "true"})
    );
}

#[test]
fn a_failed_watch_ends_with_an_error_event_carrying_the_status() {
    let err = Error::Expired {
        message: "too old resource version: 1 (2)".into(),
    };
    let event = WatchEvent::error(&err).to_json();
    assert_eq!(event["type"], "ERROR");
    assert_eq!(event["object"]["kind"], "Status");
    assert_eq!(event["object"]["code"], 410);
}

// ---- snapshot ----

#[test]
fn a_snapshot_keeps_objects_registrations_and_the_counter() {
    let mut store = store();
    create(&mut store, &replicas(), "t", replica("a"));
    create(
        &mut store,
        &namespaces(),
        "",
        json!({"metadata": {"name": "t"}}),
    );
    create(&mut store, &configmaps(), "t", configmap("c", json!({})));
    delete(&mut store, &configmaps(), "t", "c");
    let bytes = store.to_bytes().unwrap();
    let restored = Store::from_bytes(&bytes, 50).unwrap();
    assert_eq!(restored.resource_version(), 4);
    assert_eq!(
        restored.resources().collect::<Vec<_>>(),
        store.resources().collect::<Vec<_>>()
    );
    for resource in [replicas(), namespaces(), configmaps()] {
        assert_eq!(
            list(&restored, &resource, None, ListOptions::default()).items,
            list(&store, &resource, None, ListOptions::default()).items
        );
    }
}

#[test]
fn after_a_restore_old_watches_are_expired_and_versions_keep_rising() {
    let mut store = store();
    create(&mut store, &replicas(), "t", replica("a"));
    create(&mut store, &replicas(), "t", replica("b"));
    let mut restored = Store::from_bytes(&store.to_bytes().unwrap(), 50).unwrap();
    let err = restored
        .watch_from(&replicas(), None, &Selectors::everything(), Some("1"))
        .unwrap_err();
    assert_eq!(err.code(), 410);
    assert!(events_after(&restored, &replicas(), 2).is_empty());
    let c = create(&mut restored, &replicas(), "t", replica("c"));
    assert_eq!(rv(&c), 3);
    assert_eq!(events_after(&restored, &replicas(), 2).len(), 1);
}

#[test]
fn a_corrupt_snapshot_is_refused() {
    assert!(Store::from_bytes(b"not json", 10).is_err());
    let mut store = store();
    create(&mut store, &replicas(), "t", replica("a"));
    let mut snapshot: Value = serde_json::from_slice(&store.to_bytes().unwrap()).unwrap();
    snapshot["resourceVersion"] = json!(0);
    let bytes = serde_json::to_vec(&snapshot).unwrap();
    assert!(matches!(
        Store::from_bytes(&bytes, 10),
        Err(crate::snapshot::SnapshotError::Object { .. })
    ));
}
