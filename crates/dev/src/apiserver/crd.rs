//! CustomResourceDefinitions: registering their versions as served resources, their
//! status, and validating custom objects against the version's schema (pruning unknown
//! fields, structural checks, CEL rules with the old object for transition rules).

use super::discovery::crd_resource;
use crate::objects::{GenerationPolicy, ListOptions, ResourceInfo, ResourceKey, Store};
use crate::status::{Error, FieldError, FieldErrorType, GroupKind};
use multisite_core::api::schema_check;
use serde_json::{Map, Value, json};

/// The CRD objects in the store.
pub fn stored_crds(store: &Store) -> Vec<Value> {
    store
        .list(&crd_resource(), None, &ListOptions::default())
        .map(|l| l.items)
        .unwrap_or_default()
}

/// The resources a CRD serves, with what the store needs of each.
pub fn served_resources(crd: &Value) -> Vec<(ResourceKey, ResourceInfo)> {
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or_default();
    let plural = spec["names"]["plural"].as_str().unwrap_or_default();
    let kind = spec["names"]["kind"].as_str().unwrap_or_default();
    let namespaced = spec["scope"].as_str() != Some("Cluster");
    let mut out = Vec::new();
    if group.is_empty() || plural.is_empty() || kind.is_empty() {
        return out;
    }
    for version in spec["versions"].as_array().into_iter().flatten() {
        let Some(name) = version["name"].as_str() else {
            continue;
        };
        if version["served"].as_bool() == Some(false) {
            continue;
        }
        let mut info =
            ResourceInfo::new(kind, namespaced).with_generation(GenerationPolicy::Content);
        if version["subresources"]["status"].is_object() {
            info = info.with_status_subresource();
        }
        out.push((ResourceKey::new(group, name, plural), info));
    }
    out
}

/// Registers what `crd` serves and unregisters what `previous` served and it no longer does.
pub fn register(store: &mut Store, crd: &Value, previous: Option<&Value>) {
    let now = served_resources(crd);
    if let Some(previous) = previous {
        for (key, _) in served_resources(previous) {
            if !now.iter().any(|(k, _)| *k == key) {
                store.unregister(&key);
            }
        }
    }
    for (key, info) in now {
        store.register(key, info);
    }
}

/// Unregisters every resource `crd` served.
pub fn unregister(store: &mut Store, crd: &Value) {
    for (key, _) in served_resources(crd) {
        store.unregister(&key);
    }
}

/// The status a registered CRD gets: names accepted, established, the stored version.
pub fn accepted_status(crd: &Value, now: &str) -> Value {
    let spec = &crd["spec"];
    let condition = |kind: &str, reason: &str, message: &str| {
        json!({
            "type": kind,
            "status": "True",
            "lastTransitionTime": now,
            "reason": reason,
            "message": message,
        })
    };
    let stored: Vec<Value> = spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["storage"].as_bool() == Some(true))
        .filter_map(|v| v["name"].as_str().map(|s| json!(s)))
        .collect();
    json!({
        "conditions": [
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "acceptedNames": spec["names"],
        "storedVersions": stored,
    })
}

/// The CRD serving `resource`, if it is a custom resource.
pub fn crd_for(store: &Store, resource: &ResourceKey) -> Option<Value> {
    let name = format!("{}.{}", resource.plural, resource.group);
    store.get(&crd_resource(), "", &name).ok()
}

/// The `openAPIV3Schema` of `version` in `crd`.
pub fn version_schema(crd: &Value, version: &str) -> Option<Value> {
    crd["spec"]["versions"]
        .as_array()?
        .iter()
        .find(|v| v["name"].as_str() == Some(version))
        .map(|v| v["schema"]["openAPIV3Schema"].clone())
        .filter(Value::is_object)
}

/// How unknown fields are treated (`fieldValidation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

impl FieldValidation {
    pub fn parse(text: Option<&str>) -> Result<Self, Error> {
        match text {
            None | Some("") | Some("Warn") => Ok(Self::Warn),
            Some("Ignore") => Ok(Self::Ignore),
            Some("Strict") => Ok(Self::Strict),
            Some(other) => Err(Error::bad_request(format!(
                "fieldValidation parameter unsupported: {other}, must be one of Ignore, Warn, Strict"
            ))),
        }
    }
}

/// Removes from `value` every field the schema does not declare; returns their paths.
pub fn prune(schema: &Value, value: &mut Value, path: &str, root: bool, pruned: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            let preserve = schema["x-kubernetes-preserve-unknown-fields"].as_bool() == Some(true);
            let properties = schema["properties"].as_object();
            let additional = &schema["additionalProperties"];
            let mut unknown = Vec::new();
            for (key, child) in map.iter_mut() {
                let child_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                if root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                if let Some(child_schema) = properties.and_then(|p| p.get(key)) {
                    prune(child_schema, child, &child_path, false, pruned);
                } else if additional.is_object() {
                    prune(additional, child, &child_path, false, pruned);
                } else if !(preserve || additional.as_bool() == Some(true) || properties.is_none())
                {
                    unknown.push(key.clone());
                    pruned.push(child_path);
                }
            }
            for key in unknown {
                map.remove(&key);
            }
        }
        Value::Array(items) => {
            let item_schema = &schema["items"];
            if item_schema.is_object() {
                for (i, item) in items.iter_mut().enumerate() {
                    prune(item_schema, item, &format!("{path}[{i}]"), false, pruned);
                }
            }
        }
        _ => {}
    }
}

/// The value at a dotted path with `[i]` indexes, as schema_check and kube-cel spell them.
fn value_at(object: &Value, path: &str) -> Option<Value> {
    let mut current = object;
    for part in path.split('.') {
        let (name, indexes) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            current = current.get(name)?;
        }
        for index in indexes.split('[').filter(|s| !s.is_empty()) {
            let i: usize = index.trim_end_matches(']').parse().ok()?;
            current = current.get(i)?;
        }
    }
    Some(current.clone())
}

fn cause_of(object: &Value, path: &str, message: &str) -> FieldError {
    let path = path.trim_start_matches('.');
    if message == "Required value" {
        return FieldError::required(path, "");
    }
    let value = value_at(object, path).unwrap_or(Value::Null);
    let detail = match message.strip_prefix("Invalid value: ") {
        // "Invalid value: <shown>: <detail>": keep the detail, the value is shown again.
        Some(rest) => rest
            .split_once(": ")
            .map(|(_, d)| d.to_string())
            .unwrap_or_else(|| rest.to_string()),
        None => message.to_string(),
    };
    if let Some(rest) = message.strip_prefix("Unsupported value: ") {
        let detail = rest
            .split_once(": ")
            .map(|(_, d)| d.to_string())
            .unwrap_or_default();
        return FieldError::new(path, FieldErrorType::NotSupported, Some(value), &detail);
    }
    FieldError::invalid(path, value, &detail)
}

/// What validation of a custom object gives: the object (pruned) and the warnings.
pub struct Validated {
    pub object: Value,
    pub warnings: Vec<String>,
}

/// Validates (and prunes) a custom object of `resource` against its CRD's schema; `old` is
/// the stored object on update, for CEL transition rules.
/// What the real server does to built-in kinds on every write that clients rely on:
/// a Secret's `stringData` is merged into `data` (base64) and never stored.
fn normalize_builtin(resource: &ResourceKey, object: &mut Value) {
    if !(resource.group.is_empty() && resource.plural == "secrets") {
        return;
    }
    let Some(map) = object.as_object_mut() else {
        return;
    };
    let Some(Value::Object(strings)) = map.remove("stringData") else {
        return;
    };
    let data = map
        .entry("data")
        .or_insert_with(|| Value::Object(Default::default()));
    if !data.is_object() {
        *data = Value::Object(Default::default());
    }
    if let Some(data) = data.as_object_mut() {
        for (key, value) in strings {
            let bytes = value.as_str().unwrap_or_default().as_bytes().to_vec();
            let encoded =
                serde_json::to_value(k8s_openapi::ByteString(bytes)).unwrap_or(Value::Null);
            data.insert(key, encoded);
        }
    }
}

pub fn validate(
    store: &Store,
    resource: &ResourceKey,
    object: Value,
    old: Option<&Value>,
    mode: FieldValidation,
) -> Result<Validated, Error> {
    let Some(crd) = crd_for(store, resource) else {
        let mut object = object;
        normalize_builtin(resource, &mut object);
        return Ok(Validated {
            object,
            warnings: Vec::new(),
        });
    };
    let Some(schema) = version_schema(&crd, &resource.version) else {
        return Ok(Validated {
            object,
            warnings: Vec::new(),
        });
    };
    let kind = crd["spec"]["names"]["kind"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut object = object;
    let mut pruned = Vec::new();
    prune(&schema, &mut object, "", true, &mut pruned);
    let mut warnings = Vec::new();
    if !pruned.is_empty() {
        match mode {
            FieldValidation::Strict => {
                let fields: Vec<String> = pruned
                    .iter()
                    .map(|p| format!("unknown field \"{p}\""))
                    .collect();
                return Err(Error::bad_request(format!(
                    "{kind} in version \"{}\" cannot be handled as a {kind}: strict decoding error: {}",
                    resource.version,
                    fields.join(", ")
                )));
            }
            FieldValidation::Warn => {
                warnings.extend(pruned.iter().map(|p| format!("unknown field \"{p}\"")));
            }
            FieldValidation::Ignore => {}
        }
    }
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut causes: Vec<FieldError> = schema_check::check(&schema, &object)
        .iter()
        .map(|e| cause_of(&object, &e.path, &e.message))
        .collect();
    if causes.is_empty()
        && old.is_some()
        && let Err(failures) = kube_cel::validate(&schema, &object, old)
    {
        for failure in failures.as_slice() {
            causes.push(cause_of(&object, &failure.field_path, &failure.message));
        }
    }
    // As in Kubernetes: errors that leave the object unusable for CEL (a missing,
    // unsupported, too long or mistyped value) mean the rules were not evaluated, which
    // the answer says in one more cause.
    let blocking = causes.iter().any(|c| {
        matches!(
            c.error_type,
            FieldErrorType::Required
                | FieldErrorType::NotSupported
                | FieldErrorType::TooLong
                | FieldErrorType::TooMany
                | FieldErrorType::TypeInvalid
        )
    });
    if blocking && schema.to_string().contains("x-kubernetes-validations") {
        causes.push(FieldError::invalid(
            "<nil>",
            Value::Null,
            "some validation rules were not checked because the object was invalid; correct the existing errors to complete validation",
        ));
    }
    if !causes.is_empty() {
        return Err(Error::Invalid {
            kind: GroupKind {
                group: resource.group.clone(),
                kind,
            },
            name,
            causes,
        });
    }
    Ok(Validated { object, warnings })
}

/// The schema of each version keyed by version name, for `/openapi/v3`.
pub fn schemas_of_group_version(store: &Store, group: &str, version: &str) -> Map<String, Value> {
    let mut out = Map::new();
    for crd in stored_crds(store) {
        if crd["spec"]["group"].as_str() != Some(group) {
            continue;
        }
        if let Some(schema) = version_schema(&crd, version) {
            let kind = crd["spec"]["names"]["kind"].as_str().unwrap_or_default();
            out.insert(kind.to_string(), schema);
        }
    }
    out
}
