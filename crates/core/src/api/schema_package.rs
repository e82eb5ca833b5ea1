//! `SchemaPackage`: a versioned add-on to a family's schema.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A schema package to apply to every replica of a family.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "multisite.dev",
    version = "v1alpha1",
    kind = "SchemaPackage",
    plural = "schemapackages",
    singular = "schemapackage",
    shortname = "mspkg",
    category = "multisite",
    namespaced,
    status = "SchemaPackageStatus",
    doc = "A versioned schema package (new record types and fields) applied to every replica of a family.",
    printcolumn(name = "Family", type_ = "string", json_path = ".spec.family"),
    printcolumn(name = "Package", type_ = "string", json_path = ".spec.package"),
    printcolumn(name = "Version", type_ = "string", json_path = ".spec.version"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.family == oldSelf.family").message("family is immutable"))]
pub struct SchemaPackageSpec {
    /// The family whose schema the package extends.
    #[schemars(regex(pattern = "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub family: String,
    /// Package name, e.g. `Interop`.
    #[schemars(length(min = 1, max = 63))]
    pub package: String,
    /// Package version, e.g. `1.0`.
    #[schemars(regex(pattern = "^[0-9]+(\\.[0-9]+){0,3}$"))]
    pub version: String,
    /// Record types the package adds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub record_types: Vec<PackageRecordType>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PackageRecordType {
    #[schemars(regex(pattern = "^[A-Za-z][A-Za-z0-9_]{0,62}$"))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub fields: Vec<PackageField>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PackageField {
    #[schemars(regex(pattern = "^[A-Za-z][A-Za-z0-9_]{0,62}$"))]
    pub name: String,
    /// Field type.
    #[serde(rename = "type")]
    pub field_type: FieldType,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum FieldType {
    String,
    Integer,
    Boolean,
    Timestamp,
    Reference,
}

impl FieldType {
    /// The type's name, as manifests and the replica API write it.
    pub fn name(self) -> &'static str {
        match self {
            FieldType::String => "String",
            FieldType::Integer => "Integer",
            FieldType::Boolean => "Boolean",
            FieldType::Timestamp => "Timestamp",
            FieldType::Reference => "Reference",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchemaPackageStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Schema version the package creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<i64>,
    /// The package's state at each replica.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<PackageReplicaStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PackageReplicaStatus {
    pub name: String,
    /// The package's schema version reached this replica's schema repository.
    #[serde(default)]
    pub applied: bool,
    /// This replica's user database was upgraded to that schema version.
    #[serde(default)]
    pub user_database_upgraded: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
