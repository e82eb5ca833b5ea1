//! The patch types: JSON merge patch (RFC 7386, also used for strategic merge patches),
//! JSON patch (RFC 6902) and a simplified server-side apply with field managers.

use super::ApiError;
use crate::status::Error;
use json_patch::{PatchErrorKind, PatchOperation};
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

/// The merge key of a list field that a strategic merge patch merges item by item (the
/// built-in kinds' common ones); other lists are replaced.
fn strategic_merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "volumeDevices" => "name",
        "volumeMounts" => "mountPath",
        "ports" => "containerPort",
        "conditions" => "type",
        "ownerReferences" => "uid",
        _ => return None,
    })
}

/// A strategic merge patch, simplified: a JSON merge patch where the lists named in
/// [`strategic_merge_key`] merge item by item on their key (an item with
/// `$patch: delete` removes its match), `finalizers` are a union, and a map with
/// `$patch: replace` replaces instead of merging. Service ports merge on `port`.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) {
    strategic_merge(target, patch, None);
}

fn strategic_merge(target: &mut Value, patch: &Value, field: Option<&str>) {
    let Value::Object(patch_map) = patch else {
        if let (Some(field), Value::Array(items), Value::Array(current)) =
            (field, patch, &mut *target)
        {
            merge_list(current, items, field);
            return;
        }
        *target = patch.clone();
        return;
    };
    if patch_map.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replacement = patch_map.clone();
        replacement.remove("$patch");
        *target = Value::Object(replacement);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target_map) = target {
        for (key, value) in patch_map {
            if key.starts_with('$') {
                continue;
            }
            if value.is_null() {
                target_map.remove(key);
                continue;
            }
            let entry = target_map.entry(key.clone()).or_insert(Value::Null);
            if entry.is_null() {
                // Nothing to merge with: the patch's value, without directives.
                let mut fresh = Value::Null;
                strategic_merge(&mut fresh, value, None);
                if let (Value::Array(items), Value::Array(fresh_items)) = (value, &mut fresh) {
                    *fresh_items = items
                        .iter()
                        .filter(|i| i.get("$patch").and_then(Value::as_str) != Some("delete"))
                        .cloned()
                        .collect();
                }
                *entry = fresh;
            } else {
                strategic_merge(entry, value, Some(key));
            }
        }
    }
}

fn merge_list(current: &mut Vec<Value>, items: &[Value], field: &str) {
    if field == "finalizers" {
        for item in items {
            if !current.contains(item) {
                current.push(item.clone());
            }
        }
        return;
    }
    let Some(mut key) = strategic_merge_key(field) else {
        *current = items.to_vec();
        return;
    };
    // Service ports have no containerPort: they merge on port.
    if key == "containerPort" && items.iter().all(|i| i.get("containerPort").is_none()) {
        key = "port";
    }
    if !items.iter().all(|i| i.get(key).is_some()) {
        *current = items.to_vec();
        return;
    }
    for item in items {
        let position = current.iter().position(|c| c.get(key) == item.get(key));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (position, delete) {
            (Some(i), true) => {
                current.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic_merge(&mut current[i], item, None),
            (None, false) => current.push(item.clone()),
        }
    }
}

/// RFC 6902: applies the operations in order; a failure leaves `doc` part-patched (the
/// caller works on a copy). As in Kubernetes' JSON patch, a `test` of `null` passes on a
/// missing member: kube's finalizer helper relies on it to add the first finalizer.
pub fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), Error> {
    let Some(operations) = patch.as_array() else {
        return Err(Error::bad_request(
            "json patch must be a list of operations",
        ));
    };
    for (index, operation) in operations.iter().enumerate() {
        let parsed = PatchOperation::deserialize(operation).map_err(|e| {
            Error::bad_request(format!("json patch operation {index} ({operation}): {e}"))
        })?;
        if let PatchOperation::Test(test) = &parsed
            && test.value.is_null()
            && doc.pointer(test.path.as_str()).is_none()
        {
            continue;
        }
        // One operation at a time, so that the test above sees the earlier ones' result.
        json_patch::patch_unsafe(doc, std::slice::from_ref(&parsed))
            .map_err(|e| patch_failure(index, &parsed, &e.kind))?;
    }
    Ok(())
}

/// What failed, in terms of the request: the operation's place in the list, its op, and
/// the pointer at fault.
fn patch_failure(index: usize, operation: &PatchOperation, kind: &PatchErrorKind) -> Error {
    let (op, from) = match operation {
        PatchOperation::Add(_) => ("add", None),
        PatchOperation::Remove(_) => ("remove", None),
        PatchOperation::Replace(_) => ("replace", None),
        PatchOperation::Move(m) => ("move", Some(m.from.as_str())),
        PatchOperation::Copy(c) => ("copy", Some(c.from.as_str())),
        PatchOperation::Test(_) => ("test", None),
    };
    let path = operation.path().as_str();
    let why = match (kind, operation) {
        (PatchErrorKind::TestFailed, PatchOperation::Test(test)) => {
            format!("the value at {path:?} is not {}", test.value)
        }
        (PatchErrorKind::InvalidFromPointer, _) => {
            format!(
                "the from path {:?} does not exist",
                from.unwrap_or_default()
            )
        }
        (PatchErrorKind::CannotMoveInsideItself, _) => format!(
            "{:?} cannot move into itself ({path:?})",
            from.unwrap_or_default()
        ),
        (PatchErrorKind::InvalidPointer, _) if path.is_empty() => {
            "the root cannot be removed".to_string()
        }
        (PatchErrorKind::InvalidPointer, _) => {
            format!("the path {path:?} does not exist or its index is out of bounds")
        }
        (other, _) => format!("{other} at {path:?}"),
    };
    Error::bad_request(format!("json patch operation {index} ({op}): {why}"))
}

/// A field path of server-side apply: the map keys from the root to a leaf (lists are leaves).
type FieldPath = Vec<String>;

/// Fields no manager owns: they are the server's or identify the object.
fn ignored(path: &[String]) -> bool {
    match path {
        [top] => top == "apiVersion" || top == "kind",
        [meta, field, ..] if meta == "metadata" => matches!(
            field.as_str(),
            "name"
                | "namespace"
                | "resourceVersion"
                | "managedFields"
                | "uid"
                | "creationTimestamp"
                | "generation"
                | "deletionTimestamp"
                | "deletionGracePeriodSeconds"
        ),
        _ => false,
    }
}

/// The leaf paths of an applied object.
fn leaf_paths(value: &Value, prefix: &mut FieldPath, out: &mut Vec<FieldPath>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                prefix.push(key.clone());
                leaf_paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {
            if !prefix.is_empty() && !ignored(prefix) {
                out.push(prefix.clone());
            }
        }
    }
}

/// `fieldsV1` of a set of paths: `{"f:spec":{"f:replicas":{}}}`.
fn fields_v1(paths: &[FieldPath]) -> Value {
    let mut root = Map::new();
    for path in paths {
        let mut node = &mut root;
        for key in path {
            let entry = node
                .entry(format!("f:{key}"))
                .or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(next) = entry else {
                break;
            };
            node = next;
        }
    }
    Value::Object(root)
}

/// The paths of a `fieldsV1`: nodes without `f:` children are leaves (list items
/// keyed `k:`/`v:`/`i:` are owned with their list).
fn paths_of_fields(fields: &Value, prefix: &mut FieldPath, out: &mut Vec<FieldPath>) {
    let children: Vec<(&String, &Value)> = fields
        .as_object()
        .map(|m| m.iter().filter(|(k, _)| k.starts_with("f:")).collect())
        .unwrap_or_default();
    if children.is_empty() {
        if !prefix.is_empty() {
            out.push(prefix.clone());
        }
        return;
    }
    for (key, child) in children {
        prefix.push(key[2..].to_string());
        paths_of_fields(child, prefix, out);
        prefix.pop();
    }
}

fn value_at<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(key))
}

/// Removes the field at `path`. A map that the removal leaves empty goes too, as on a
/// real server, where applying a field means owning the maps that hold it.
fn remove_at(value: &mut Value, path: &[String]) {
    remove_and_prune(value, path);
}

/// [`remove_at`]; returns whether `value` is a map left empty by the removal.
fn remove_and_prune(value: &mut Value, path: &[String]) -> bool {
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    let Value::Object(map) = value else {
        return false;
    };
    if rest.is_empty() {
        if map.remove(first).is_none() {
            return false;
        }
    } else {
        let Some(child) = map.get_mut(first) else {
            return false;
        };
        if remove_and_prune(child, rest) {
            map.remove(first);
        } else {
            return false;
        }
    }
    map.is_empty()
}

fn overlaps(a: &[String], b: &[String]) -> bool {
    let n = a.len().min(b.len());
    a[..n] == b[..n]
}

fn child_schema<'a>(schema: Option<&'a Value>, key: &str) -> Option<&'a Value> {
    let schema = schema?;
    schema["properties"]
        .get(key)
        .or_else(|| schema.get("additionalProperties").filter(|s| s.is_object()))
}

/// Merges an applied object into the current one: maps key by key, lists replaced but for
/// `x-kubernetes-list-type: map` lists, merged item by item on their keys.
fn merge_applied(current: &mut Value, applied: &Value, schema: Option<&Value>) {
    match (current, applied) {
        (Value::Object(current), Value::Object(applied)) => {
            for (key, value) in applied {
                let sub = child_schema(schema, key);
                match current.get_mut(key) {
                    Some(existing) => merge_applied(existing, value, sub),
                    None => {
                        current.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (Value::Array(current), Value::Array(applied))
            if schema.is_some_and(|s| s["x-kubernetes-list-type"].as_str() == Some("map")) =>
        {
            let schema = schema.unwrap_or(&Value::Null);
            let keys: Vec<&str> = schema["x-kubernetes-list-map-keys"]
                .as_array()
                .map(|k| k.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let item_schema = schema.get("items");
            for item in applied {
                let same = |other: &Value| keys.iter().all(|k| other.get(*k) == item.get(*k));
                match current.iter_mut().find(|c| same(c)) {
                    Some(existing) => merge_applied(existing, item, item_schema),
                    None => current.push(item.clone()),
                }
            }
        }
        (current, applied) => *current = applied.clone(),
    }
}

/// What a server-side apply asks.
pub struct Apply<'a> {
    pub manager: &'a str,
    pub force: bool,
    pub api_version: &'a str,
    pub time: &'a str,
    /// The version's schema, for list-map merges (custom resources).
    pub schema: Option<&'a Value>,
}

/// One conflict: the other manager and the field path.
struct Conflict {
    manager: String,
    api_version: String,
    path: String,
}

fn conflict_error(conflicts: &[Conflict], kind: &str, name: &str, group: &str) -> ApiError {
    let count = conflicts.len();
    let mut groups: Vec<(String, String, Vec<String>)> = Vec::new();
    for c in conflicts {
        match groups
            .iter_mut()
            .find(|(m, v, _)| *m == c.manager && *v == c.api_version)
        {
            Some((_, _, paths)) => paths.push(c.path.clone()),
            None => groups.push((
                c.manager.clone(),
                c.api_version.clone(),
                vec![c.path.clone()],
            )),
        }
    }
    let text = if count == 1 {
        let c = &conflicts[0];
        format!(
            "conflict with \"{}\" using {}: {}",
            c.manager, c.api_version, c.path
        )
    } else {
        groups
            .iter()
            .map(|(m, v, paths)| {
                let list: Vec<String> = paths.iter().map(|p| format!("- {p}")).collect();
                format!("conflicts with \"{m}\" using {v}:\n{}", list.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let plural = if count == 1 { "" } else { "s" };
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|c| {
            json!({
                "reason": "FieldManagerConflict",
                "message": format!("conflict with \"{}\" using {}", c.manager, c.api_version),
                "field": c.path,
            })
        })
        .collect();
    let mut details = json!({"name": name, "kind": kind, "causes": causes});
    if !group.is_empty() {
        details["group"] = json!(group);
    }
    ApiError::Status {
        code: 409,
        body: json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("Apply failed with {count} conflict{plural}: {text}"),
            "reason": "Conflict",
            "details": details,
            "code": 409,
        }),
    }
}

fn managed_entries(object: &Value) -> Vec<Value> {
    object["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn dotted(path: &[String]) -> String {
    path.iter().map(|p| format!(".{p}")).collect()
}

/// Applies `applied` to `current` (`None`: the object does not exist yet). Returns the
/// object to store, with `metadata.managedFields` updated.
pub fn apply(
    current: Option<&Value>,
    applied: &Value,
    request: &Apply<'_>,
    resource_kind: (&str, &str),
) -> Result<Value, ApiError> {
    let mut new_paths = Vec::new();
    leaf_paths(applied, &mut Vec::new(), &mut new_paths);
    let entries = current.map(managed_entries).unwrap_or_default();
    let mut mine_before = Vec::new();
    let mut mine_before_entry: Option<Value> = None;
    let mut others: Vec<(Value, Vec<FieldPath>)> = Vec::new();
    for entry in entries {
        let mut paths = Vec::new();
        paths_of_fields(&entry["fieldsV1"], &mut Vec::new(), &mut paths);
        let is_mine = entry["manager"].as_str() == Some(request.manager)
            && entry["operation"].as_str() == Some("Apply");
        if is_mine {
            mine_before = paths;
            mine_before_entry = Some(entry);
        } else {
            others.push((entry, paths));
        }
    }
    let mut merged = current.cloned().unwrap_or_else(|| json!({}));
    // Fields this manager applied before and no longer does are removed, unless another
    // manager owns them too.
    for old in &mine_before {
        let still = new_paths.iter().any(|p| overlaps(p, old));
        let shared = others
            .iter()
            .any(|(_, paths)| paths.iter().any(|p| overlaps(p, old)));
        if !still && !shared {
            remove_at(&mut merged, old);
        }
    }
    merge_applied(&mut merged, applied, request.schema);
    let name = applied["metadata"]["name"].as_str().unwrap_or_default();
    if let Some(current) = current {
        let mut conflicts = Vec::new();
        for (entry, paths) in &mut others {
            let manager = entry["manager"].as_str().unwrap_or_default().to_string();
            let api_version = entry["apiVersion"].as_str().unwrap_or_default().to_string();
            let mut kept = Vec::new();
            for path in paths.drain(..) {
                let touched = new_paths.iter().any(|p| overlaps(p, &path));
                let changed = value_at(current, &path) != value_at(&merged, &path);
                if touched && changed {
                    if !request.force {
                        conflicts.push(Conflict {
                            manager: manager.clone(),
                            api_version: api_version.clone(),
                            path: dotted(&path),
                        });
                    }
                    // Forced: the field changes hands.
                } else {
                    kept.push(path);
                }
            }
            *paths = kept;
        }
        if !conflicts.is_empty() {
            return Err(conflict_error(
                &conflicts,
                resource_kind.0,
                name,
                resource_kind.1,
            ));
        }
    }
    let mut managed: Vec<Value> = Vec::new();
    for (mut entry, paths) in others {
        if paths.is_empty() {
            continue;
        }
        entry["fieldsV1"] = fields_v1(&paths);
        managed.push(entry);
    }
    let fields = fields_v1(&new_paths);
    // An apply of the same fields keeps the entry's time, as the real server does, so
    // that an apply that changes nothing writes nothing (no new resourceVersion, no
    // watch event).
    let time = match &mine_before_entry {
        Some(entry)
            if entry["fieldsV1"] == fields
                && entry["apiVersion"].as_str() == Some(request.api_version) =>
        {
            entry["time"].clone()
        }
        _ => json!(request.time),
    };
    managed.push(json!({
        "manager": request.manager,
        "operation": "Apply",
        "apiVersion": request.api_version,
        "time": time,
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    }));
    if let Some(meta) = merged
        .as_object_mut()
        .map(|m| m.entry("metadata").or_insert_with(|| json!({})))
        .and_then(Value::as_object_mut)
    {
        meta.insert("managedFields".into(), Value::Array(managed));
    }
    Ok(merged)
}

/// Who makes a write that is not an apply, for `managedFields`.
pub struct Writer<'a> {
    pub manager: &'a str,
    pub api_version: &'a str,
    pub time: &'a str,
    /// `Some("status")` for writes to the status subresource.
    pub subresource: Option<&'a str>,
}

/// Records a create, update or non-apply patch in `new`'s `managedFields`, as the real
/// server does: the writer's `Update` entry gains the fields it changed, which every other
/// manager loses (an update takes fields over without conflict); removed fields are owned
/// by no one. Main-resource writes leave `status` alone and status writes touch only it.
pub fn record_update(old: Option<&Value>, new: &mut Value, writer: &Writer<'_>) {
    let on_status = writer.subresource == Some("status");
    let relevant =
        |path: &FieldPath| (path.first().map(String::as_str) == Some("status")) == on_status;
    let mut new_leaves = Vec::new();
    leaf_paths(new, &mut Vec::new(), &mut new_leaves);
    let changed: Vec<FieldPath> = new_leaves
        .into_iter()
        .filter(|p| relevant(p))
        .filter(|p| old.is_none_or(|o| value_at(o, p) != value_at(new, p)))
        .collect();
    let mut removed = Vec::new();
    if let Some(old) = old {
        let mut old_leaves = Vec::new();
        leaf_paths(old, &mut Vec::new(), &mut old_leaves);
        removed = old_leaves
            .into_iter()
            .filter(|p| relevant(p) && value_at(new, p).is_none())
            .collect();
    }
    if changed.is_empty() && removed.is_empty() {
        return;
    }
    let subresource = writer.subresource.unwrap_or_default();
    let is_mine = |entry: &Value| {
        entry["manager"].as_str() == Some(writer.manager)
            && entry["operation"].as_str() == Some("Update")
            && entry["subresource"].as_str().unwrap_or_default() == subresource
    };
    let mut managed = Vec::new();
    let mut mine: Vec<FieldPath> = Vec::new();
    for mut entry in managed_entries(new) {
        let mut paths = Vec::new();
        paths_of_fields(&entry["fieldsV1"], &mut Vec::new(), &mut paths);
        if is_mine(&entry) {
            mine = paths;
            continue;
        }
        let kept: Vec<FieldPath> = paths
            .into_iter()
            .filter(|p| !changed.iter().chain(&removed).any(|c| overlaps(c, p)))
            .collect();
        if kept.is_empty() {
            continue;
        }
        entry["fieldsV1"] = fields_v1(&kept);
        managed.push(entry);
    }
    mine.retain(|p| !removed.iter().any(|r| overlaps(r, p)));
    for path in changed {
        if !mine.contains(&path) {
            mine.push(path);
        }
    }
    if !mine.is_empty() {
        let mut entry = json!({
            "manager": writer.manager,
            "operation": "Update",
            "apiVersion": writer.api_version,
            "time": writer.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": fields_v1(&mine),
        });
        if let Some(sub) = writer.subresource {
            entry["subresource"] = json!(sub);
        }
        managed.push(entry);
    }
    if let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("managedFields".into(), Value::Array(managed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(
            &mut doc,
            &json!({"a": "z", "c": {"f": null}, "l": [3], "n": {"x": 1}}),
        );
        assert_eq!(
            doc,
            json!({"a": "z", "c": {"d": "e"}, "l": [3], "n": {"x": 1}})
        );
        let mut scalar = json!({"a": 1});
        merge_patch(&mut scalar, &json!(["x"]));
        assert_eq!(scalar, json!(["x"]));
    }

    #[test]
    fn strategic_merge_patch_merges_known_lists_by_key() {
        let mut pod = json!({"metadata": {"finalizers": ["a"]}, "spec": {"containers": [
            {"name": "app", "image": "one", "env": [{"name": "X", "value": "1"}]},
            {"name": "side", "image": "two"}], "tolerations": [{"key": "k"}]}});
        strategic_merge_patch(
            &mut pod,
            &json!({"metadata": {"finalizers": ["b"]}, "spec": {"containers": [
                {"name": "app", "env": [{"name": "Y", "value": "2"}]},
                {"name": "side", "$patch": "delete"},
                {"name": "new", "image": "three"}], "tolerations": [{"key": "z"}]}}),
        );
        assert_eq!(
            pod,
            json!({"metadata": {"finalizers": ["a", "b"]}, "spec": {"containers": [
                {"name": "app", "image": "one", "env": [{"name": "X", "value": "1"},
                    {"name": "Y", "value": "2"}]},
                {"name": "new", "image": "three"}], "tolerations": [{"key": "z"}]}})
        );
    }

    #[test]
    fn json_patch_follows_rfc_6902() {
        let mut doc = json!({"a": {"b~c": 1, "d/e": 2}, "l": [1, 2, 3]});
        json_patch(
            &mut doc,
            &json!([
                {"op": "add", "path": "/l/1", "value": 9},
                {"op": "add", "path": "/l/-", "value": 4},
                {"op": "remove", "path": "/a/b~0c"},
                {"op": "replace", "path": "/a/d~1e", "value": 5},
                {"op": "copy", "from": "/a/d~1e", "path": "/copied"},
                {"op": "move", "from": "/l/0", "path": "/first"},
                {"op": "test", "path": "/first", "value": 1},
            ]),
        )
        .unwrap();
        assert_eq!(
            doc,
            json!({"a": {"d/e": 5}, "l": [9, 2, 3, 4], "copied": 5, "first": 1})
        );
        let mut doc = json!({"a": 1});
        assert!(json_patch(&mut doc, &json!([{"op": "remove", "path": "/b"}])).is_err());
        assert!(json_patch(&mut doc, &json!([{"op": "test", "path": "/a", "value": 2}])).is_err());
        // A test of null on a member that an earlier operation added compares the value.
        assert!(
            json_patch(
                &mut doc.clone(),
                &json!([{"op": "add", "path": "/n", "value": 1},
                    {"op": "test", "path": "/n", "value": null}])
            )
            .is_err()
        );
        // A missing member equals null, as the real server's JSON patch has it.
        json_patch(
            &mut doc,
            &json!([{"op": "test", "path": "/f", "value": null}, {"op": "add", "path": "/f", "value": ["x"]}]),
        )
        .unwrap();
        assert_eq!(doc["f"], json!(["x"]));
        assert!(json_patch(&mut doc, &json!([{"op": "test", "path": "/g", "value": 1}])).is_err());
        assert!(
            json_patch(
                &mut doc,
                &json!([{"op": "add", "path": "/l/5", "value": 2}])
            )
            .is_err()
        );
    }

    fn failure(patch: Value) -> String {
        let mut doc = json!({"a": 1, "l": [1], "m": {"x": 1}});
        match json_patch(&mut doc, &patch) {
            Err(Error::BadRequest { message }) => message,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn json_patch_failures_say_which_operation_and_where() {
        assert_eq!(
            failure(json!([{"op": "add", "path": "/b", "value": 1},
                {"op": "remove", "path": "/m/y"}])),
            "json patch operation 1 (remove): the path \"/m/y\" does not exist \
             or its index is out of bounds"
        );
        assert_eq!(
            failure(json!([{"op": "add", "path": "/l/3", "value": 1}])),
            "json patch operation 0 (add): the path \"/l/3\" does not exist \
             or its index is out of bounds"
        );
        assert_eq!(
            failure(json!([{"op": "test", "path": "/a", "value": 2}])),
            "json patch operation 0 (test): the value at \"/a\" is not 2"
        );
        assert_eq!(
            failure(json!([{"op": "copy", "from": "/z", "path": "/b"}])),
            "json patch operation 0 (copy): the from path \"/z\" does not exist"
        );
        assert_eq!(
            failure(json!([{"op": "move", "from": "/m", "path": "/m/x"}])),
            "json patch operation 0 (move): \"/m\" cannot move into itself (\"/m/x\")"
        );
        assert_eq!(
            failure(json!([{"op": "remove", "path": ""}])),
            "json patch operation 0 (remove): the root cannot be removed"
        );
        assert_eq!(
            failure(json!({"op": "remove", "path": "/a"})),
            "json patch must be a list of operations"
        );
        for (malformed, says) in [
            (
                json!({"op": "frob", "path": "/a"}),
                "unknown variant `frob`",
            ),
            (json!({"op": "add", "path": "/a"}), "missing field `value`"),
            (json!({"op": "add", "path": "a", "value": 1}), "\"a\""),
        ] {
            let message = failure(json!([malformed]));
            assert!(
                message.starts_with(&format!("json patch operation 0 ({malformed}): "))
                    && message.contains(says),
                "{message}"
            );
        }
    }

    fn request<'a>(manager: &'a str, force: bool, schema: Option<&'a Value>) -> Apply<'a> {
        Apply {
            manager,
            force,
            api_version: "v1",
            time: "2026-01-01T00:00:00Z",
            schema,
        }
    }

    #[test]
    fn apply_merges_list_maps_by_key_and_replaces_other_lists() {
        let schema = json!({"properties": {"spec": {"properties": {
            "clients": {"type": "array", "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"], "items": {"type": "object"}},
            "tags": {"type": "array"}}}}});
        let current = json!({"metadata": {"name": "x"}, "spec": {
            "clients": [{"name": "a", "replicas": 1}, {"name": "b", "replicas": 1}],
            "tags": ["p", "q"]}});
        let applied = json!({"metadata": {"name": "x"}, "spec": {
            "clients": [{"name": "b", "replicas": 3}, {"name": "c", "replicas": 1}],
            "tags": ["r"]}});
        let merged = apply(
            Some(&current),
            &applied,
            &request("m", false, Some(&schema)),
            ("things", ""),
        )
        .unwrap();
        assert_eq!(
            merged["spec"],
            json!({"clients": [{"name": "a", "replicas": 1}, {"name": "b", "replicas": 3},
                {"name": "c", "replicas": 1}], "tags": ["r"]})
        );
        let managed = &merged["metadata"]["managedFields"][0];
        assert_eq!(managed["manager"], "m");
        assert_eq!(
            managed["fieldsV1"],
            json!({"f:spec": {"f:clients": {}, "f:tags": {}}})
        );
    }

    #[test]
    fn a_map_left_empty_by_an_apply_goes_with_its_last_field() {
        let first = apply(
            None,
            &json!({"metadata": {"name": "x"}, "status": {"plan": {"blocked": {"reason": "no"}, "current": 1}}}),
            &request("m", false, None),
            ("things", ""),
        )
        .unwrap();
        let second = apply(
            Some(&first),
            &json!({"metadata": {"name": "x"}, "status": {"plan": {"current": 2}}}),
            &request("m", false, None),
            ("things", ""),
        )
        .unwrap();
        assert_eq!(second["status"], json!({"plan": {"current": 2}}));
        // A map another manager still has fields in stays.
        let mut shared = first.clone();
        shared["status"]["plan"]["blocked"]["by"] = json!("other");
        let writer = Writer {
            manager: "other",
            api_version: "v1",
            time: "2026-01-01T00:00:00Z",
            subresource: None,
        };
        record_update(Some(&first), &mut shared, &writer);
        let third = apply(
            Some(&shared),
            &json!({"metadata": {"name": "x"}, "status": {"plan": {"current": 3}}}),
            &request("m", false, None),
            ("things", ""),
        )
        .unwrap();
        assert_eq!(third["status"]["plan"]["blocked"], json!({"by": "other"}));
    }

    #[test]
    fn updates_take_fields_over_and_conflict_with_appliers() {
        let applied = apply(
            None,
            &json!({"metadata": {"name": "x"}, "data": {"a": "1", "b": "1"}}),
            &request("applier", false, None),
            ("configmaps", ""),
        )
        .unwrap();
        let mut edited = applied.clone();
        edited["data"]["a"] = json!("9");
        let writer = Writer {
            manager: "editor",
            api_version: "v1",
            time: "2026-01-01T00:00:00Z",
            subresource: None,
        };
        record_update(Some(&applied), &mut edited, &writer);
        let managed = edited["metadata"]["managedFields"].as_array().unwrap();
        assert_eq!(managed[0]["fieldsV1"], json!({"f:data": {"f:b": {}}}));
        assert_eq!(managed[1]["manager"], "editor");
        assert_eq!(managed[1]["fieldsV1"], json!({"f:data": {"f:a": {}}}));
        let Err(ApiError::Status { body, .. }) = apply(
            Some(&edited),
            &json!({"metadata": {"name": "x"}, "data": {"a": "1", "b": "1"}}),
            &request("applier", false, None),
            ("configmaps", ""),
        ) else {
            panic!("no conflict");
        };
        assert_eq!(
            body["message"],
            "Apply failed with 1 conflict: conflict with \"editor\" using v1: .data.a"
        );
    }

    #[test]
    fn apply_reports_conflicts_with_other_managers() {
        let first = apply(
            None,
            &json!({"metadata": {"name": "x"}, "data": {"a": "1", "b": "1"}}),
            &request("one", false, None),
            ("configmaps", ""),
        )
        .unwrap();
        let changed = json!({"metadata": {"name": "x"}, "data": {"a": "2", "b": "2"}});
        let Err(ApiError::Status { code, body }) = apply(
            Some(&first),
            &changed,
            &request("two", false, None),
            ("configmaps", ""),
        ) else {
            panic!("no conflict");
        };
        assert_eq!(code, 409);
        assert_eq!(
            body["message"],
            "Apply failed with 2 conflicts: conflicts with \"one\" using v1:\n- .data.a\n- .data.b"
        );
        let forced = apply(
            Some(&first),
            &changed,
            &request("two", true, None),
            ("configmaps", ""),
        )
        .unwrap();
        let managers: Vec<&str> = forced["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["manager"].as_str())
            .collect();
        assert_eq!(managers, ["two"]);
        // Leaving a field out removes it when no one else owns it.
        let dropped = apply(
            Some(&forced),
            &json!({"metadata": {"name": "x"}, "data": {"a": "2"}}),
            &request("two", false, None),
            ("configmaps", ""),
        )
        .unwrap();
        assert_eq!(dropped["data"], json!({"a": "2"}));
    }
}
