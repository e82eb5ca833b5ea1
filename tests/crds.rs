//! The CRDs: committed output up to date, structural schemas, and the validation
//! rules the API server will enforce (checked with the same CEL engine family the
//! API server's rules are written for, and with our schema checker).

use multisite::api::{self, schema_check};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn crd_values() -> Vec<Value> {
    api::crds()
        .iter()
        .map(|c| serde_json::to_value(c).unwrap())
        .collect()
}

fn schema_of(kind: &str) -> Value {
    let crd = api::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap();
    schema_check::crd_schema(&crd).unwrap()
}

#[test]
fn committed_crds_match_the_generated_ones() {
    let dir = root().join("crds");
    let rendered = multisite::cmd::crd::rendered().unwrap();
    let mut expected = BTreeSet::new();
    for (name, text) in &rendered {
        expected.insert(name.clone());
        let committed = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        assert!(
            committed == *text,
            "crds/{name} is stale: run `scripts/gen-crds.sh` and commit the result"
        );
    }
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(present, expected, "crds/ holds exactly the generated files");
}

#[test]
fn committed_crds_parse_back_to_the_generated_objects() {
    for (name, text) in multisite::cmd::crd::rendered().unwrap() {
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
        let parsed: Vec<&Value> = docs.iter().filter(|d| !d.is_null()).collect();
        assert_eq!(parsed.len(), 1, "{name}");
        let crd = api::crds()
            .into_iter()
            .find(|c| api::crd_file_name(c) == name)
            .unwrap();
        assert_eq!(parsed[0], &serde_json::to_value(crd).unwrap(), "{name}");
    }
}

/// Kubernetes' structural schema rules, as far as they concern generated schemas.
fn structural_problems(node: &Value, path: &str, problems: &mut Vec<String>) {
    let Some(map) = node.as_object() else {
        problems.push(format!("{path}: not an object"));
        return;
    };
    let int_or_string = map.get("x-kubernetes-int-or-string") == Some(&json!(true));
    let preserve = map.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    for forbidden in ["$ref", "definitions", "$schema", "oneOf", "allOf", "not"] {
        if map.contains_key(forbidden) {
            problems.push(format!("{path}: uses {forbidden}"));
        }
    }
    if let Some(any_of) = map.get("anyOf") {
        // Only the int-or-string form may use anyOf, and its branches carry nothing but types.
        if !int_or_string {
            problems.push(format!("{path}: anyOf without x-kubernetes-int-or-string"));
        }
        for branch in any_of.as_array().into_iter().flatten() {
            let keys: Vec<&String> = branch
                .as_object()
                .map(|m| m.keys().collect())
                .unwrap_or_default();
            if keys.iter().any(|k| *k != "type") {
                problems.push(format!("{path}: anyOf branch with {keys:?}"));
            }
        }
    }
    match map.get("type").and_then(Value::as_str) {
        Some("object") | Some("array") | Some("string") | Some("integer") | Some("number")
        | Some("boolean") => {}
        Some(other) => problems.push(format!("{path}: unknown type {other}")),
        None if int_or_string || preserve => {}
        None => problems.push(format!("{path}: no type")),
    }
    if map.contains_key("properties") && map.contains_key("additionalProperties") {
        problems.push(format!("{path}: both properties and additionalProperties"));
    }
    if let Some(props) = map.get("properties").and_then(Value::as_object) {
        for (key, child) in props {
            structural_problems(child, &format!("{path}.{key}"), problems);
        }
    }
    if let Some(extra) = map.get("additionalProperties")
        && extra.is_object()
    {
        structural_problems(extra, &format!("{path}.*"), problems);
    }
    if let Some(items) = map.get("items") {
        structural_problems(items, &format!("{path}[]"), problems);
    } else if map.get("type") == Some(&json!("array")) {
        problems.push(format!("{path}: array without items"));
    }
    if map.get("x-kubernetes-list-type") == Some(&json!("map")) {
        let items = map.get("items").cloned().unwrap_or_default();
        let required: BTreeSet<&str> = items["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        for key in map["x-kubernetes-list-map-keys"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            let defaulted = items["properties"][key].get("default").is_some();
            if !required.contains(key) && !defaulted {
                problems.push(format!(
                    "{path}: list map key {key} is neither required nor defaulted"
                ));
            }
        }
    }
    if let Some(format) = map.get("format").and_then(Value::as_str)
        && format.starts_with("uint")
    {
        problems.push(format!(
            "{path}: format {format} is not one Kubernetes knows"
        ));
    }
}

#[test]
fn schemas_are_structural() {
    for crd in crd_values() {
        let name = crd["metadata"]["name"].as_str().unwrap().to_string();
        for version in crd["spec"]["versions"].as_array().unwrap() {
            let schema = &version["schema"]["openAPIV3Schema"];
            let mut problems = Vec::new();
            structural_problems(schema, &name, &mut problems);
            // Root metadata may only constrain name and generateName; ours says nothing.
            assert!(
                schema["properties"]
                    .get("metadata")
                    .is_none_or(|m| m.get("properties").is_none())
            );
            assert!(problems.is_empty(), "{name}: {problems:#?}");
        }
    }
}

#[test]
fn the_structural_check_catches_what_it_must() {
    let mut problems = Vec::new();
    let bad = json!({"type": "object", "properties": {
        "a": {"description": "untyped"},
        "b": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "c": {"type": "array"},
        "d": {"type": "integer", "format": "uint32"}
    }});
    structural_problems(&bad, "x", &mut problems);
    let at: BTreeSet<&str> = problems
        .iter()
        .map(|p| p.split(':').next().unwrap())
        .collect();
    assert_eq!(
        at,
        BTreeSet::from(["x.a", "x.b", "x.c", "x.d"]),
        "{problems:#?}"
    );
    let mut problems = Vec::new();
    let good = json!({"type": "object", "properties": {
        "b": {"x-kubernetes-int-or-string": true, "anyOf": [{"type": "integer"}, {"type": "string"}]}
    }});
    structural_problems(&good, "x", &mut problems);
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn every_crd_has_status_columns_and_short_names() {
    for crd in crd_values() {
        let name = crd["metadata"]["name"].as_str().unwrap();
        assert_eq!(crd["spec"]["group"], "multisite.dev");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert!(
            !crd["spec"]["names"]["shortNames"]
                .as_array()
                .unwrap()
                .is_empty(),
            "{name}"
        );
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert!(
            version["subresources"]["status"].is_object(),
            "{name} has the status subresource"
        );
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert!(columns.contains(&"Ready"), "{name}: {columns:?}");
        assert!(columns.contains(&"Age"), "{name}: {columns:?}");
    }
}

fn family(spec: Value) -> Value {
    json!({"apiVersion": "multisite.dev/v1alpha1", "kind": "ReplicaFamily",
           "metadata": {"name": "sampl", "namespace": "tracker"}, "spec": spec})
}

fn good_family_spec() -> Value {
    json!({"idPrefix": "SAMPL", "featureLevel": 7,
           "gateway": {"replica": "sampl-tokyo"},
           "sync": {"topology": "Mesh", "incrementalIntervalSeconds": 30}})
}

fn with(mut spec: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let target = if parent.is_empty() {
        &mut spec
    } else {
        spec.pointer_mut(parent).unwrap()
    };
    if value.is_null() {
        target.as_object_mut().unwrap().remove(key);
    } else {
        target[key] = value;
    }
    spec
}

/// The rules the issue names, as a table: (case, spec, field expected in the error).
#[test]
fn invalid_families_are_refused_at_the_field() {
    let schema = schema_of("ReplicaFamily");
    let ok = family(good_family_spec());
    assert!(
        schema_check::check(&schema, &ok).is_empty(),
        "{:?}",
        schema_check::check(&schema, &ok)
    );
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "FL 9",
            with(good_family_spec(), "/featureLevel", json!(9)),
            "spec.featureLevel",
        ),
        (
            "FL 4",
            with(good_family_spec(), "/featureLevel", json!(4)),
            "spec.featureLevel",
        ),
        (
            "FL missing",
            with(good_family_spec(), "/featureLevel", Value::Null),
            "spec.featureLevel",
        ),
        (
            "gateway names no replica",
            with(
                good_family_spec(),
                "/gateway",
                json!({"endpoint": "https://x"}),
            ),
            "spec.gateway.replica",
        ),
        (
            "gateway replica empty",
            with(good_family_spec(), "/gateway", json!({"replica": ""})),
            "spec.gateway.replica",
        ),
        (
            "incremental interval 0",
            with(
                good_family_spec(),
                "/sync/incrementalIntervalSeconds",
                json!(0),
            ),
            "spec.sync.incrementalIntervalSeconds",
        ),
        (
            "full interval negative",
            with(good_family_spec(), "/sync/fullIntervalSeconds", json!(-5)),
            "spec.sync.fullIntervalSeconds",
        ),
        (
            "incremental limit 0",
            with(
                good_family_spec(),
                "/sync/maxConcurrentIncremental",
                json!(0),
            ),
            "spec.sync.maxConcurrentIncremental",
        ),
        (
            "full limit 0",
            with(good_family_spec(), "/sync/maxConcurrentFull", json!(0)),
            "spec.sync.maxConcurrentFull",
        ),
        (
            "unknown field",
            with(good_family_spec(), "/colour", json!("blue")),
            "spec.colour",
        ),
        (
            "bad strategy",
            with(good_family_spec(), "/upgradeStrategy", json!("Yolo")),
            "spec.upgradeStrategy",
        ),
        (
            "bad id prefix",
            with(good_family_spec(), "/idPrefix", json!("sampl")),
            "spec.idPrefix",
        ),
        (
            "hub missing",
            with(good_family_spec(), "/sync/topology", json!("HubAndSpoke")),
            "spec.sync",
        ),
        (
            "duplicate tier",
            with(
                good_family_spec(),
                "/clients",
                json!([{"name": "web", "release": "8.0.1.1"}, {"name": "web", "release": "7.1.2"}]),
            ),
            "spec.clients[1]",
        ),
    ];
    for (case, spec, field) in cases {
        let errors = schema_check::check(&schema, &family(spec));
        assert!(
            errors
                .iter()
                .any(|e| e.path == field || e.path.starts_with(&format!("{field}."))),
            "{case}: expected an error at {field}, got {errors:?}"
        );
    }
}

#[test]
fn feature_level_can_rise_but_never_fall() {
    let schema = schema_of("ReplicaFamily");
    let at = |fl: i64| family(with(good_family_spec(), "/featureLevel", json!(fl)));
    assert!(kube_cel::validate(&schema, &at(8), Some(&at(7))).is_ok());
    assert!(kube_cel::validate(&schema, &at(7), Some(&at(7))).is_ok());
    let err = kube_cel::validate(&schema, &at(6), Some(&at(7))).unwrap_err();
    let messages: Vec<String> = err.as_slice().iter().map(|e| e.message.clone()).collect();
    assert!(
        messages.iter().any(|m| m.contains("cannot be lowered")),
        "{messages:?}"
    );
    // The transition rule does not run on create.
    assert!(kube_cel::validate(&schema, &at(6), None).is_ok());
}

#[test]
fn immutable_fields_stay_put() {
    let schema = schema_of("ReplicaFamily");
    let old = family(good_family_spec());
    let new = family(with(good_family_spec(), "/idPrefix", json!("OTHER")));
    assert!(kube_cel::validate(&schema, &new, Some(&old)).is_err());
    let schema = schema_of("Replica");
    let replica = |site: &str| {
        json!({"apiVersion": "multisite.dev/v1alpha1", "kind": "Replica",
        "metadata": {"name": "r"}, "spec": {"family": "sampl", "site": site}})
    };
    assert!(schema_check::check(&schema, &replica("paris")).is_empty());
    assert!(kube_cel::validate(&schema, &replica("tokyo"), Some(&replica("paris"))).is_err());
    assert!(kube_cel::validate(&schema, &replica("paris"), Some(&replica("paris"))).is_ok());
}

#[test]
fn every_example_is_valid() {
    let mut checked = 0;
    for entry in std::fs::read_dir(root().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let objects = multisite::api::manifest::parse_objects(&path.display().to_string(), &text);
        assert!(objects.is_ok(), "{}", objects.unwrap_err());
        checked += 1;
    }
    assert!(checked >= 3);
}
