//! Checks an object against a CRD's OpenAPI v3 schema the way the API server does
//! for the parts users trip over: types, required fields, unknown fields, bounds,
//! lengths, patterns, enums, unique list-map keys, and the CEL rules
//! (`x-kubernetes-validations`) that need no old object.
//!
//! Used by `multisite plan` to refuse bad input with the field at fault, before the
//! object reaches any cluster.

use serde_json::Value;
use std::fmt;

/// One problem with one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path from the object's root, e.g. `spec.featureLevel` or `spec.clients[0].name`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Checks `object` against `schema` (the version's `openAPIV3Schema` as JSON).
/// `metadata` is left to the API server. Returns every problem found.
pub fn check(schema: &Value, object: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    walk(schema, object, "", &mut errors, true);
    if errors.is_empty()
        && let Err(failures) = kube_cel::validate(schema, object, None)
    {
        for failure in failures.as_slice() {
            errors.push(FieldError {
                path: failure.field_path.clone(),
                message: failure.message.clone(),
            });
        }
    }
    errors
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn shown(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 60 {
        format!("{}...", &text[..text.floor_char_boundary(57)])
    } else {
        text
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn walk(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>, root: bool) {
    let mut fail = |message: String| {
        errors.push(FieldError {
            path: if path.is_empty() {
                "<root>".into()
            } else {
                path.to_string()
            },
            message,
        })
    };
    if value.is_null() {
        if !schema
            .get("nullable")
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            fail("must not be null".into());
        }
        return;
    }
    let int_or_string = schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if int_or_string {
        if !(value.is_string() || value.is_i64() || value.is_u64()) {
            fail(format!(
                "must be an integer or a string, got {}",
                type_name(value)
            ));
        }
        return;
    }
    let Some(expected) = schema.get("type").and_then(Value::as_str) else {
        return;
    };
    let actual = type_name(value);
    let type_ok = match expected {
        "number" => matches!(actual, "number" | "integer"),
        other => other == actual,
    };
    if !type_ok {
        let hint = if expected == "string" && matches!(actual, "number" | "integer" | "boolean") {
            format!(" (quote it: \"{value}\")")
        } else {
            String::new()
        };
        fail(format!(
            "Invalid value: {}: must be of type {expected}, got {actual}{hint}",
            shown(value)
        ));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(shown).collect();
        fail(format!(
            "Unsupported value: {}: supported values: {}",
            shown(value),
            list.join(", ")
        ));
    }
    match value {
        Value::Object(map) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let preserve = schema
                .get("x-kubernetes-preserve-unknown-fields")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            for (key, child) in map {
                let child_path = join(path, key);
                // apiVersion, kind and metadata are the API server's to judge.
                if root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                match properties.and_then(|p| p.get(key)) {
                    Some(child_schema) => walk(child_schema, child, &child_path, errors, false),
                    None => match additional {
                        Some(extra) if extra.is_object() => {
                            walk(extra, child, &child_path, errors, false)
                        }
                        _ if preserve || properties.is_none() && additional.is_none() => {}
                        _ => errors.push(FieldError {
                            path: child_path,
                            message: "unknown field".into(),
                        }),
                    },
                }
            }
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for key in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(key) {
                        errors.push(FieldError {
                            path: join(path, key),
                            message: "Required value".into(),
                        });
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && items.len() as u64 > max
            {
                fail(format!("must have at most {max} items"));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    walk(item_schema, item, &format!("{path}[{i}]"), errors, false);
                }
            }
            check_map_keys(schema, items, path, errors);
        }
        Value::String(text) => {
            let length = text.chars().count() as u64;
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && length < min
            {
                fail(format!(
                    "Invalid value: {}: must be at least {min} characters long",
                    shown(value)
                ));
            }
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && length > max
            {
                fail(format!("Too long: may not be longer than {max} characters"));
            }
            if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
                match regex::Regex::new(pattern) {
                    Ok(re) if !re.is_match(text) => fail(format!(
                        "Invalid value: {}: must match the pattern {pattern}",
                        shown(value)
                    )),
                    Ok(_) => {}
                    Err(err) => fail(format!(
                        "the schema's pattern {pattern:?} is invalid: {err}"
                    )),
                }
            }
        }
        Value::Number(n) => {
            if let (Some(min), Some(v)) =
                (schema.get("minimum").and_then(Value::as_f64), n.as_f64())
                && v < min
            {
                fail(format!(
                    "Invalid value: {n}: must be greater than or equal to {}",
                    min as i64
                ));
            }
            if let (Some(max), Some(v)) =
                (schema.get("maximum").and_then(Value::as_f64), n.as_f64())
                && v > max
            {
                fail(format!(
                    "Invalid value: {n}: must be less than or equal to {}",
                    max as i64
                ));
            }
            if schema.get("format").and_then(Value::as_str) == Some("int32")
                && let Some(v) = n.as_i64()
                && i32::try_from(v).is_err()
            {
                fail(format!("Invalid value: {n}: does not fit in 32 bits"));
            }
        }
        Value::Bool(_) | Value::Null => {}
    }
}

/// `x-kubernetes-list-type: map` lists must not repeat a key.
fn check_map_keys(schema: &Value, items: &[Value], path: &str, errors: &mut Vec<FieldError>) {
    if schema.get("x-kubernetes-list-type").and_then(Value::as_str) != Some("map") {
        return;
    }
    let keys: Vec<&str> = schema
        .get("x-kubernetes-list-map-keys")
        .and_then(Value::as_array)
        .map(|k| k.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut seen: Vec<Vec<&Value>> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let key: Vec<&Value> = keys
            .iter()
            .map(|k| item.get(*k).unwrap_or(&Value::Null))
            .collect();
        if seen.contains(&key) {
            let shown_key: Vec<String> = keys
                .iter()
                .zip(&key)
                .map(|(k, v)| format!("{k}={}", shown(v)))
                .collect();
            errors.push(FieldError {
                path: format!("{path}[{i}]"),
                message: format!("Duplicate value: {}", shown_key.join(", ")),
            });
        } else {
            seen.push(key);
        }
    }
}

/// The `openAPIV3Schema` of the first version of a CRD, as JSON.
pub fn crd_schema(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Option<Value> {
    crd.spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| serde_json::to_value(s).ok())
}
