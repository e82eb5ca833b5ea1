//! Reading manifests: YAML streams of our custom resources, as users write them or
//! as `kubectl get -o yaml` prints them (a `List`, statuses included). Every problem
//! is reported with the source, the document and the field.

use crate::api::{self, Replica, ReplicaFamily, SchemaPackage, Site, schema_check};
use kube::{CustomResourceExt, ResourceExt};
use serde_json::Value;
use std::fmt;

/// One of our custom resources, typed.
#[derive(Clone, Debug)]
pub enum Object {
    Family(Box<ReplicaFamily>),
    Site(Box<Site>),
    Replica(Box<Replica>),
    SchemaPackage(Box<SchemaPackage>),
}

/// Where an object came from, for messages: `file.yaml: document 2 (Replica tracker/sampl-paris)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub source: String,
    /// 1-based document number in the stream.
    pub document: usize,
    /// 1-based item number when the document is a `List`.
    pub item: Option<usize>,
    /// `Kind namespace/name`, once known.
    pub object: Option<String>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.source, self.document)?;
        if let Some(item) = self.item {
            write!(f, ", item {item}")?;
        }
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        Ok(())
    }
}

/// A problem at one place of the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub origin: Origin,
    /// The field at fault, when there is one.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{}: {}: {}", self.origin, field, self.message),
            None => write!(f, "{}: {}", self.origin, self.message),
        }
    }
}

/// Every problem found in a manifest stream.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.problems.iter().map(|p| p.to_string()).collect();
        f.write_str(&lines.join("\n"))
    }
}

impl ManifestError {
    fn one(origin: Origin, field: Option<String>, message: impl Into<String>) -> Self {
        ManifestError {
            problems: vec![Problem {
                origin,
                field,
                message: message.into(),
            }],
        }
    }
}

/// Splits a YAML stream into JSON documents, flattening `List`s. Empty documents
/// are skipped. Each comes with its origin.
pub fn documents(source: &str, text: &str) -> Result<Vec<(Origin, Value)>, ManifestError> {
    let origin = |document| Origin {
        source: source.to_string(),
        document,
        item: None,
        object: None,
    };
    let docs: Vec<Value> = serde_saphyr::from_multiple(text)
        .map_err(|err| ManifestError::one(origin(1), None, format!("not valid YAML: {err}")))?;
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        let number = i + 1;
        match doc {
            Value::Null => continue,
            Value::Object(ref map) if map.get("kind").and_then(Value::as_str) == Some("List") => {
                let Some(items) = map.get("items").and_then(Value::as_array) else {
                    return Err(ManifestError::one(
                        origin(number),
                        Some("items".into()),
                        "a List needs an `items` array",
                    ));
                };
                for (j, item) in items.iter().enumerate() {
                    out.push((
                        Origin {
                            item: Some(j + 1),
                            ..origin(number)
                        },
                        item.clone(),
                    ));
                }
            }
            Value::Object(_) => out.push((origin(number), doc)),
            other => {
                return Err(ManifestError::one(
                    origin(number),
                    None,
                    format!("expected a mapping with apiVersion and kind, found {other}"),
                ));
            }
        }
    }
    Ok(out)
}

/// Parses a stream of our custom resources, checking each against its CRD schema.
/// Objects of other kinds are an error. All problems are reported together.
pub fn parse_objects(source: &str, text: &str) -> Result<Vec<(Origin, Object)>, ManifestError> {
    let mut problems = Vec::new();
    let mut objects = Vec::new();
    for (mut origin, value) in documents(source, text)? {
        let api_version = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
        let name = value.pointer("/metadata/name").and_then(Value::as_str);
        let namespace = value.pointer("/metadata/namespace").and_then(Value::as_str);
        origin.object = Some(match (namespace, name) {
            (Some(ns), Some(n)) => format!("{kind} {ns}/{n}"),
            (None, Some(n)) => format!("{kind} {n}"),
            _ => kind.to_string(),
        });
        let mut problem = |field: Option<&str>, message: String| {
            problems.push(Problem {
                origin: origin.clone(),
                field: field.map(str::to_string),
                message,
            })
        };
        if api_version != api::API_VERSION {
            problem(
                Some("apiVersion"),
                format!("expected {}, found {:?}", api::API_VERSION, api_version),
            );
            continue;
        }
        let crd = match kind {
            "ReplicaFamily" => ReplicaFamily::crd(),
            "Site" => Site::crd(),
            "Replica" => Replica::crd(),
            "SchemaPackage" => SchemaPackage::crd(),
            other => {
                problem(
                    Some("kind"),
                    format!(
                        "unknown kind {other:?}; expected ReplicaFamily, Site, Replica or SchemaPackage"
                    ),
                );
                continue;
            }
        };
        if name.is_none_or(str::is_empty) {
            problem(Some("metadata.name"), "Required value".into());
            continue;
        }
        let errors = schema_check::crd_schema(&crd)
            .map(|schema| schema_check::check(&schema, &value))
            .unwrap_or_default();
        if !errors.is_empty() {
            for e in errors {
                problem(Some(&e.path), e.message);
            }
            continue;
        }
        let typed = match kind {
            "ReplicaFamily" => serde_json::from_value(value).map(|o| Object::Family(Box::new(o))),
            "Site" => serde_json::from_value(value).map(|o| Object::Site(Box::new(o))),
            "Replica" => serde_json::from_value(value).map(|o| Object::Replica(Box::new(o))),
            _ => serde_json::from_value(value).map(|o| Object::SchemaPackage(Box::new(o))),
        };
        match typed {
            Ok(object) => objects.push((origin, object)),
            Err(err) => problem(None, err.to_string()),
        }
    }
    if problems.is_empty() {
        Ok(objects)
    } else {
        Err(ManifestError { problems })
    }
}

/// A family and its replicas, as the planner reads them.
#[derive(Clone, Debug)]
pub struct FamilyManifest {
    pub family: ReplicaFamily,
    pub replicas: Vec<Replica>,
}

/// Picks the one `ReplicaFamily` of a stream (or the one named `family`) and its
/// replicas. A replica of another family, or in another namespace, is an error.
pub fn family_manifest(
    source: &str,
    objects: Vec<(Origin, Object)>,
    family: Option<&str>,
) -> Result<FamilyManifest, ManifestError> {
    let families: Vec<(&Origin, &ReplicaFamily)> = objects
        .iter()
        .filter_map(|(o, obj)| match obj {
            Object::Family(f) if family.is_none_or(|n| f.name_any() == n) => Some((o, f.as_ref())),
            _ => None,
        })
        .collect();
    let whole = Origin {
        source: source.to_string(),
        document: 1,
        item: None,
        object: None,
    };
    let (_, chosen) = match families.as_slice() {
        [one] => *one,
        [] => {
            let message = match family {
                Some(name) => format!("no ReplicaFamily named {name:?} in the input"),
                None => "the input holds no ReplicaFamily".to_string(),
            };
            return Err(ManifestError::one(whole, None, message));
        }
        many => {
            let names: Vec<String> = many.iter().map(|(_, f)| f.name_any()).collect();
            return Err(ManifestError::one(
                whole,
                None,
                format!(
                    "the input holds several ReplicaFamily objects ({}); choose one with --family",
                    names.join(", ")
                ),
            ));
        }
    };
    let family_name = chosen.name_any();
    let family_ns = chosen.namespace();
    let mut problems = Vec::new();
    let mut replicas = Vec::new();
    for (origin, object) in &objects {
        let Object::Replica(replica) = object else {
            continue;
        };
        if replica.spec.family != family_name {
            // With several families in one stream, other families' replicas are not ours to judge.
            if family.is_none() {
                problems.push(Problem {
                    origin: origin.clone(),
                    field: Some("spec.family".into()),
                    message: format!(
                        "this replica belongs to family {:?}, not to {:?}, the family in the input",
                        replica.spec.family, family_name
                    ),
                });
            }
            continue;
        }
        if replica.namespace() != family_ns {
            problems.push(Problem {
                origin: origin.clone(),
                field: Some("metadata.namespace".into()),
                message: format!(
                    "a replica lives in its family's namespace ({}), not in {}",
                    family_ns.as_deref().unwrap_or("<none>"),
                    replica.namespace().as_deref().unwrap_or("<none>")
                ),
            });
            continue;
        }
        replicas.push(replica.as_ref().clone());
    }
    if !problems.is_empty() {
        return Err(ManifestError { problems });
    }
    Ok(FamilyManifest {
        family: chosen.clone(),
        replicas,
    })
}
