//! `Table` answers (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`), what `kubectl
//! get` prints: for built-in kinds the real server's main columns (pods, statefulsets,
//! deployments, services, persistentvolumeclaims, namespaces, configmaps, secrets, leases,
//! events (the real server's Event columns);
//! Name and Age for the others), Name and the CRD's `additionalPrinterColumns` (or Name and
//! Age when it declares none) for custom resources. JSONPaths are the simple forms printer columns use:
//! `.a.b`, `.a[0]`, `.a[*].b` and `.a[?(@.k=="v")].b`.

use crate::objects::ResourceKey;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

/// Whether the client asked for a Table first.
pub fn wanted(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table") && first.contains("g=meta.k8s.io"))
}

struct Column {
    name: String,
    kind: String,
    format: String,
    description: String,
    priority: i64,
    json_path: String,
    /// A cell computed from the object rather than read at `json_path`.
    compute: Option<fn(&Value) -> Value>,
}

fn computed(name: &str, priority: i64, compute: fn(&Value) -> Value) -> Column {
    Column {
        name: name.into(),
        kind: "string".into(),
        format: String::new(),
        description: String::new(),
        priority,
        json_path: String::new(),
        compute: Some(compute),
    }
}

/// A string column read at `path`.
fn at(name: &str, path: &str, priority: i64) -> Column {
    Column {
        name: name.into(),
        kind: "string".into(),
        format: String::new(),
        description: String::new(),
        priority,
        json_path: path.into(),
        compute: None,
    }
}

fn number(value: &Value) -> i64 {
    value.as_i64().unwrap_or(0)
}

fn text_or(value: &Value, default: &str) -> Value {
    json!(value.as_str().filter(|s| !s.is_empty()).unwrap_or(default))
}

fn pod_ready(pod: &Value) -> Value {
    let total = pod["spec"]["containers"].as_array().map_or(0, Vec::len);
    let ready = pod["status"]["containerStatuses"]
        .as_array()
        .map_or(0, |s| {
            s.iter().filter(|c| c["ready"] == json!(true)).count()
        });
    json!(format!("{ready}/{total}"))
}

fn pod_status(pod: &Value) -> Value {
    if pod["metadata"]["deletionTimestamp"].is_string() {
        return json!("Terminating");
    }
    let waiting = pod["status"]["containerStatuses"].as_array().and_then(|s| {
        s.iter()
            .find_map(|c| c["state"]["waiting"]["reason"].as_str())
    });
    match waiting {
        Some(reason) => json!(reason),
        None => text_or(&pod["status"]["phase"], "Pending"),
    }
}

fn pod_restarts(pod: &Value) -> Value {
    json!(
        pod["status"]["containerStatuses"]
            .as_array()
            .map_or(0, |s| s
                .iter()
                .map(|c| number(&c["restartCount"]))
                .sum::<i64>())
    )
}

fn replicas_ready(object: &Value) -> Value {
    let wanted = object["spec"]["replicas"].as_i64().unwrap_or(1);
    json!(format!(
        "{}/{wanted}",
        number(&object["status"]["readyReplicas"])
    ))
}

fn service_ports(service: &Value) -> Value {
    let ports: Vec<String> = service["spec"]["ports"]
        .as_array()
        .map(|ports| {
            ports
                .iter()
                .map(|p| {
                    format!(
                        "{}/{}",
                        number(&p["port"]),
                        p["protocol"].as_str().unwrap_or("TCP")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    text_or(&json!(ports.join(",")), "<none>")
}

fn data_count(object: &Value) -> Value {
    let count = |field: &str| object[field].as_object().map_or(0, |m| m.len());
    json!(count("data") + count("binaryData") + count("stringData"))
}

/// When an Event was last seen: its series' last observation, else its last timestamp,
/// else its event time (the real server's order).
fn event_last_seen(event: &Value) -> Value {
    let at = [
        &event["series"]["lastObservedTime"],
        &event["lastTimestamp"],
        &event["eventTime"],
        &event["firstTimestamp"],
    ]
    .into_iter()
    .find_map(|t| t.as_str().and_then(|t| t.parse::<Timestamp>().ok()));
    match at {
        Some(t) => json!(human_duration(Timestamp::now().as_second() - t.as_second())),
        None => json!("<unknown>"),
    }
}

fn event_object(event: &Value) -> Value {
    let object = &event["involvedObject"];
    json!(format!(
        "{}/{}",
        object["kind"].as_str().unwrap_or_default().to_lowercase(),
        object["name"].as_str().unwrap_or_default()
    ))
}

fn event_source(event: &Value) -> Value {
    let component = event["source"]["component"]
        .as_str()
        .or_else(|| event["reportingComponent"].as_str())
        .unwrap_or_default();
    match event["source"]["host"].as_str() {
        Some(host) => json!(format!("{component}, {host}")),
        None => json!(component),
    }
}

fn event_count(event: &Value) -> Value {
    json!(
        event["series"]["count"]
            .as_i64()
            .or_else(|| event["count"].as_i64())
            .unwrap_or(1)
    )
}

/// The real server's Event columns (what `kubectl get events` prints): no Name or Age
/// in the default view.
fn event_columns(mut name: Column) -> Vec<Column> {
    name.priority = 1;
    vec![
        computed("Last Seen", 0, event_last_seen),
        at("Type", ".type", 0),
        at("Reason", ".reason", 0),
        computed("Object", 0, event_object),
        at("Subobject", ".involvedObject.fieldPath", 1),
        computed("Source", 1, event_source),
        at("Message", ".message", 0),
        Column {
            kind: "date".into(),
            ..at("First Seen", ".firstTimestamp", 1)
        },
        computed("Count", 1, event_count),
        name,
    ]
}

/// The columns between Name and Age of a built-in kind.
fn builtin_columns(resource: &ResourceKey) -> Vec<Column> {
    match (resource.group.as_str(), resource.plural.as_str()) {
        ("", "pods") => vec![
            computed("Ready", 0, pod_ready),
            computed("Status", 0, pod_status),
            computed("Restarts", 0, pod_restarts),
            at("IP", ".status.podIP", 1),
            at("Node", ".spec.nodeName", 1),
        ],
        ("apps", "statefulsets") => vec![computed("Ready", 0, replicas_ready)],
        ("apps", "deployments") => vec![
            computed("Ready", 0, replicas_ready),
            at("Up-to-date", ".status.updatedReplicas", 0),
            at("Available", ".status.availableReplicas", 0),
        ],
        ("", "services") => vec![
            at("Type", ".spec.type", 0),
            at("Cluster-IP", ".spec.clusterIP", 0),
            computed("Port(s)", 0, service_ports),
        ],
        ("", "persistentvolumeclaims") => vec![
            at("Status", ".status.phase", 0),
            at("Volume", ".spec.volumeName", 0),
            at("Capacity", ".status.capacity.storage", 0),
        ],
        ("", "namespaces") => vec![at("Status", ".status.phase", 0)],
        ("", "configmaps") => vec![computed("Data", 0, data_count)],
        ("", "secrets") => vec![at("Type", ".type", 0), computed("Data", 0, data_count)],
        ("coordination.k8s.io", "leases") => vec![at("Holder", ".spec.holderIdentity", 0)],
        _ => Vec::new(),
    }
}

fn columns(resource: &ResourceKey, crd: Option<&Value>) -> Vec<Column> {
    let version = resource.version.as_str();
    let name = Column {
        name: "Name".into(),
        kind: "string".into(),
        format: "name".into(),
        description: "Name must be unique within a namespace.".into(),
        priority: 0,
        json_path: ".metadata.name".into(),
        compute: None,
    };
    let age = Column {
        name: "Age".into(),
        kind: "date".into(),
        format: String::new(),
        description: "CreationTimestamp is the time the object was created.".into(),
        priority: 0,
        json_path: ".metadata.creationTimestamp".into(),
        compute: None,
    };
    let declared: Vec<Column> = crd
        .and_then(|crd| crd["spec"]["versions"].as_array())
        .and_then(|versions| {
            versions
                .iter()
                .find(|v| v["name"].as_str() == Some(version))
        })
        .and_then(|v| v["additionalPrinterColumns"].as_array())
        .map(|columns| {
            columns
                .iter()
                .map(|c| Column {
                    name: c["name"].as_str().unwrap_or_default().to_string(),
                    kind: c["type"].as_str().unwrap_or("string").to_string(),
                    format: c["format"].as_str().unwrap_or_default().to_string(),
                    description: c["description"].as_str().unwrap_or_default().to_string(),
                    priority: c["priority"].as_i64().unwrap_or(0),
                    json_path: c["jsonPath"].as_str().unwrap_or_default().to_string(),
                    compute: None,
                })
                .collect()
        })
        .unwrap_or_default();
    if crd.is_none() && resource.group.is_empty() && resource.plural == "events" {
        return event_columns(name);
    }
    if crd.is_none() {
        let middle = builtin_columns(resource);
        std::iter::once(name)
            .chain(middle)
            .chain(std::iter::once(age))
            .collect()
    } else if declared.is_empty() {
        vec![name, age]
    } else {
        std::iter::once(name).chain(declared).collect()
    }
}

/// One step of a printer column's JSONPath.
enum Step {
    Field(String),
    Index(usize),
    All,
    Filter { key: String, value: String },
}

fn steps(path: &str) -> Vec<Step> {
    let mut out = Vec::new();
    let mut rest = path.trim().trim_start_matches('{').trim_end_matches('}');
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('.') {
            let end = after.find(['.', '[']).unwrap_or(after.len());
            if end > 0 {
                out.push(Step::Field(after[..end].to_string()));
            }
            rest = &after[end..];
        } else if let Some(after) = rest.strip_prefix('[') {
            let end = after.find(']').unwrap_or(after.len());
            let inside = &after[..end];
            if inside == "*" {
                out.push(Step::All);
            } else if let Ok(i) = inside.parse() {
                out.push(Step::Index(i));
            } else if let Some(filter) = inside
                .strip_prefix("?(@.")
                .and_then(|f| f.strip_suffix(')'))
                && let Some((key, value)) = filter.split_once("==")
            {
                out.push(Step::Filter {
                    key: key.trim().to_string(),
                    value: value.trim().trim_matches(['"', '\'']).to_string(),
                });
            }
            rest = after.get(end + 1..).unwrap_or("");
        } else {
            let end = rest.find(['.', '[']).unwrap_or(rest.len());
            out.push(Step::Field(rest[..end].to_string()));
            rest = &rest[end..];
        }
    }
    out
}

fn evaluate<'a>(object: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut current = vec![object];
    for step in steps(path) {
        current = current
            .into_iter()
            .flat_map(|v| -> Vec<&Value> {
                match &step {
                    Step::Field(name) => v.get(name).into_iter().collect(),
                    Step::Index(i) => v.get(*i).into_iter().collect(),
                    Step::All => v.as_array().map(|a| a.iter().collect()).unwrap_or_default(),
                    Step::Filter { key, value } => v
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter(|item| {
                                    item.get(key).is_some_and(|k| match k {
                                        Value::String(s) => s == value,
                                        other => {
                                            serde_json::from_str::<Value>(value).ok().as_ref()
                                                == Some(other)
                                        }
                                    })
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            })
            .collect();
    }
    current
}

/// A duration as kubectl shows ages: `42s`, `5m3s`, `3h`, `2d4h`, ...
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    let s = seconds.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    match () {
        _ if s < 120 => format!("{s}s"),
        _ if m < 10 && s % 60 != 0 => format!("{m}m{}s", s % 60),
        _ if h < 3 => format!("{m}m"),
        _ if h < 8 && m % 60 != 0 => format!("{h}h{}m", m % 60),
        _ if h < 48 => format!("{h}h"),
        _ if d < 8 && h % 24 != 0 => format!("{d}d{}h", h % 24),
        _ if d < 365 * 2 => format!("{d}d"),
        _ if d < 365 * 8 && d % 365 != 0 => format!("{}y{}d", d / 365, d % 365),
        _ => format!("{}y", d / 365),
    }
}

fn cell(object: &Value, column: &Column, now: Timestamp) -> Value {
    if let Some(compute) = column.compute {
        return compute(object);
    }
    let found = evaluate(object, &column.json_path);
    let Some(first) = found.first() else {
        return Value::Null;
    };
    if column.kind == "date" {
        return match first.as_str().and_then(|t| t.parse::<Timestamp>().ok()) {
            Some(t) => json!(human_duration(now.as_second() - t.as_second())),
            None => Value::Null,
        };
    }
    if found.len() > 1 {
        let parts: Vec<String> = found
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        return json!(parts.join(","));
    }
    (*first).clone()
}

/// The Table of `objects` (one for a get, the items of a list for a list).
pub fn table(
    resource: &ResourceKey,
    crd: Option<&Value>,
    objects: &[Value],
    list_metadata: Value,
    include_object: Option<&str>,
) -> Value {
    let columns = columns(resource, crd);
    let now = Timestamp::now();
    let definitions: Vec<Value> = columns
        .iter()
        .map(|c| {
            json!({"name": c.name, "type": c.kind, "format": c.format,
                "description": c.description, "priority": c.priority})
        })
        .collect();
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let cells: Vec<Value> = columns.iter().map(|c| cell(object, c, now)).collect();
            let shown = match include_object {
                Some("None") => Value::Null,
                Some("Object") => object.clone(),
                _ => json!({
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": object["metadata"],
                }),
            };
            json!({"cells": cells, "object": shown})
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_metadata,
        "columnDefinitions": definitions,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printer_column_paths() {
        let object = json!({"status": {"conditions": [
            {"type": "Ready", "status": "True"}, {"type": "Synced", "status": "False"}]},
            "spec": {"list": [1, 2]}});
        let ready = evaluate(&object, r#".status.conditions[?(@.type=="Ready")].status"#);
        assert_eq!(ready, [&json!("True")]);
        assert_eq!(evaluate(&object, ".spec.list[1]"), [&json!(2)]);
        assert_eq!(evaluate(&object, ".spec.list[*]").len(), 2);
        assert!(evaluate(&object, ".spec.none").is_empty());
    }

    #[test]
    fn pod_columns() {
        let pod = json!({"metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}]},
            "status": {"phase": "Running", "podIP": "127.0.0.2", "containerStatuses": [
                {"ready": true, "restartCount": 2}, {"ready": false, "restartCount": 1}]}});
        let table = table(
            &ResourceKey::new("", "v1", "pods"),
            None,
            &[pod],
            json!({}),
            None,
        );
        let names: Vec<&str> = table["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(
            names,
            ["Name", "Ready", "Status", "Restarts", "IP", "Node", "Age"]
        );
        let cells = &table["rows"][0]["cells"];
        assert_eq!(cells[1], "1/2");
        assert_eq!(cells[2], "Running");
        assert_eq!(cells[3], 3);
        assert_eq!(cells[4], "127.0.0.2");
    }

    #[test]
    fn ages_as_kubectl_shows_them() {
        assert_eq!(human_duration(42), "42s");
        assert_eq!(human_duration(303), "5m3s");
        assert_eq!(human_duration(3 * 3600), "3h");
        assert_eq!(human_duration(52 * 3600), "2d4h");
        assert_eq!(human_duration(-5), "<invalid>");
    }
}
