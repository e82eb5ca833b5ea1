//! `Replica`: one copy of a family's data at one site.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One replica of a family at a site.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "multisite.dev",
    version = "v1alpha1",
    kind = "Replica",
    plural = "replicas",
    singular = "replica",
    shortname = "msr",
    category = "multisite",
    namespaced,
    status = "ReplicaStatus",
    doc = "One replica of a family: a schema repository and a user database at one site.",
    printcolumn(name = "Family", type_ = "string", json_path = ".spec.family"),
    printcolumn(name = "Site", type_ = "string", json_path = ".spec.site"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Repo FL",
        type_ = "integer",
        json_path = ".status.schemaRepositoryFeatureLevel"
    ),
    printcolumn(
        name = "DB FL",
        type_ = "integer",
        json_path = ".status.userDatabaseFeatureLevel"
    ),
    printcolumn(name = "Held", type_ = "integer", json_path = ".status.heldPackets"),
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
pub struct ReplicaSpec {
    /// The family this replica belongs to. Fixed for the replica's life.
    #[x_kube(validation = Rule::new("self == oldSelf").message("family is immutable"))]
    #[schemars(regex(pattern = "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub family: String,
    /// The site hosting the replica. Fixed for the replica's life.
    #[x_kube(validation = Rule::new("self == oldSelf").message("site is immutable"))]
    #[schemars(regex(pattern = "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub site: String,
    /// Size of the replica's volume, e.g. `10Gi`.
    #[serde(default = "default_storage")]
    #[schemars(regex(pattern = "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    pub storage: String,
    /// A live replica to clone from; the family's first replica when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_from: Option<String>,
    /// CPU and memory of the replica server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ReplicaResources>,
}

fn default_storage() -> String {
    "1Gi".to_string()
}

/// Requests and limits, as quantities (`500m`, `1Gi`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaResources {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

/// What the replica server reports, as recorded by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Life-cycle phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ReplicaPhase>,
    /// Whether the operator reached the replica server at its last look.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 99))]
    pub schema_repository_feature_level: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 99))]
    pub user_database_feature_level: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metaschema_version: Option<i32>,
    /// Packet versions the replica creates and accepts (Table 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packet_version: Option<PacketVersionStatus>,
    /// Restore incarnation; raised by every restore from backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<i64>,
    /// Changes held from each origin replica (the replica's own row of the epoch table).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub epochs: BTreeMap<String, i64>,
    /// Packets received but not importable yet.
    #[serde(default)]
    pub held_packets: i64,
    /// Held packets by the replica that sent them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub held_from: BTreeMap<String, i64>,
    /// Where the operator reaches the replica's API (its pod's address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The replica the family's gateway is pinned to, as this replica knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_replica: Option<String>,
    /// The replica where schema packages are applied, as this replica knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_repository_master: Option<String>,
    /// While removing: the replicas that still lack some of this replica's changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal_pending: Option<Vec<String>>,
    /// Items this replica masters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mastered: Option<MasteredCounts>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum ReplicaPhase {
    Pending,
    Bootstrapping,
    Active,
    Removing,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PacketVersionStatus {
    pub creates: i32,
    pub accepts_min: i32,
    pub accepts_max: i32,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MasteredCounts {
    #[serde(default)]
    pub records: i64,
    #[serde(default)]
    pub workspace_items: i64,
    #[serde(default)]
    pub users: i64,
}
