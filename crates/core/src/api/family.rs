//! `ReplicaFamily`: one replicated database, its target feature level, client tiers,
//! gateway and sync settings.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// The desired state of a replica family.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "multisite.dev",
    version = "v1alpha1",
    kind = "ReplicaFamily",
    plural = "replicafamilies",
    singular = "replicafamily",
    shortname = "rf",
    shortname = "family",
    category = "multisite",
    namespaced,
    status = "ReplicaFamilyStatus",
    doc = "A family of replicas of one tracker database, spread over sites.",
    printcolumn(
        name = "Target FL",
        type_ = "integer",
        json_path = ".spec.featureLevel"
    ),
    printcolumn(
        name = "FL",
        type_ = "integer",
        json_path = ".status.featureLevel",
        description = "the feature level every replica has reached"
    ),
    printcolumn(
        name = "Strategy",
        type_ = "string",
        json_path = ".spec.upgradeStrategy"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Synchronized",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Synchronized\")].status"
    ),
    printcolumn(
        name = "Lag",
        type_ = "integer",
        json_path = ".status.maxLagChanges",
        description = "largest lag of any link, in changes"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaFamilySpec {
    /// Prefix of record ids, e.g. `SAMPL` gives `SAMPL00001`. Fixed for the family's life.
    #[x_kube(validation = Rule::new("self == oldSelf").message("idPrefix is immutable"))]
    #[schemars(regex(pattern = "^[A-Z][A-Z0-9]{0,7}$"))]
    pub id_prefix: String,

    /// Name of the base schema of the family's databases.
    #[serde(default = "default_schema")]
    #[schemars(length(min = 1, max = 63))]
    pub schema: String,

    /// Target feature level (5..8). It can be raised, never lowered.
    #[x_kube(validation = Rule::new("self >= oldSelf").message("featureLevel cannot be lowered: feature levels never go down"))]
    #[schemars(range(min = 5, max = 8))]
    pub feature_level: i32,

    /// How a feature level raise is carried out: `Staged` (clients, then schema
    /// repositories, then user databases, sync running) or `AllAtOnce` (sync paused
    /// while every replica is raised).
    #[serde(default)]
    pub upgrade_strategy: UpgradeStrategy,

    /// Accept one-directional replication during a staged upgrade: packets flow from
    /// replicas at a lower feature level to higher ones, and packets the other way are
    /// held until the receiver is raised.
    #[serde(default)]
    pub allow_unidirectional_replication: bool,

    /// Stop orchestration between plan steps; status and sync keep running.
    #[serde(default)]
    pub paused: bool,

    /// Client tiers, upgraded before any feature level is raised.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub clients: Vec<ClientTier>,

    /// The gateway to an outside system, pinned to exactly one replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewaySpec>,

    /// Synchronisation settings.
    #[serde(default)]
    pub sync: SyncSpec,
}

impl ReplicaFamilySpec {
    /// A family with the given prefix and level and every other setting at its default.
    pub fn new(id_prefix: &str, feature_level: i32) -> Self {
        ReplicaFamilySpec {
            id_prefix: id_prefix.to_string(),
            schema: default_schema(),
            feature_level,
            upgrade_strategy: UpgradeStrategy::default(),
            allow_unidirectional_replication: false,
            paused: false,
            clients: Vec::new(),
            gateway: None,
            sync: SyncSpec::default(),
        }
    }
}

fn default_schema() -> String {
    "DefectTracking".to_string()
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum UpgradeStrategy {
    #[default]
    Staged,
    AllAtOnce,
}

/// A tier of clients (a Deployment of `multisite client`) at one release.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientTier {
    /// Name of the tier, unique in the family.
    #[schemars(regex(pattern = "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub name: String,
    /// Client release the tier runs, e.g. `8.0.1.1`; it must support the feature
    /// levels of the databases the tier opens.
    #[schemars(length(min = 1, max = 32))]
    pub release: String,
    /// Number of client pods.
    #[serde(default = "default_client_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// Site whose replicas the tier opens; every replica of the family when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

fn default_client_replicas() -> i32 {
    1
}

/// The gateway's pin and outside endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// The one replica the gateway connects to.
    #[schemars(regex(pattern = "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub replica: String,
    /// URL the gateway posts change events to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub endpoint: Option<String>,
}

/// Link topology and the task scheduler's settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.topology != 'HubAndSpoke' || has(self.hub)").message("sync.hub must name a replica when topology is HubAndSpoke"))]
pub struct SyncSpec {
    /// `Mesh`: a link between every pair of replicas. `HubAndSpoke`: links between the hub and every other replica.
    #[serde(default)]
    pub topology: Topology,
    /// The hub replica, for `HubAndSpoke`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<String>,
    /// Seconds between incremental tasks of a link.
    #[serde(default = "default_incremental_interval")]
    #[schemars(range(min = 1))]
    pub incremental_interval_seconds: i64,
    /// Seconds between full tasks of a link.
    #[serde(default = "default_full_interval")]
    #[schemars(range(min = 1))]
    pub full_interval_seconds: i64,
    /// Incremental tasks of different links that may run at once.
    #[serde(default = "default_max_incremental")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_concurrent_incremental: i32,
    /// Full tasks that may run at once (a full task never runs beside an incremental one).
    #[serde(default = "default_max_full")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_concurrent_full: i32,
    /// Per-link settings; links not listed are enabled and automatic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["from", "to"]))]
    pub links: Vec<LinkSpec>,
}

impl Default for SyncSpec {
    fn default() -> Self {
        SyncSpec {
            topology: Topology::default(),
            hub: None,
            incremental_interval_seconds: default_incremental_interval(),
            full_interval_seconds: default_full_interval(),
            max_concurrent_incremental: default_max_incremental(),
            max_concurrent_full: default_max_full(),
            links: Vec::new(),
        }
    }
}

fn default_incremental_interval() -> i64 {
    30
}
fn default_full_interval() -> i64 {
    86_400
}
fn default_max_incremental() -> i32 {
    5
}
fn default_max_full() -> i32 {
    1
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum Topology {
    #[default]
    Mesh,
    HubAndSpoke,
}

/// Settings of one directed link.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LinkSpec {
    /// Sending replica.
    pub from: String,
    /// Receiving replica.
    pub to: String,
    /// A disabled link runs no task.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Run tasks on the schedule (after the link passed its integrity check).
    #[serde(default = "default_true")]
    pub automatic: bool,
}

fn default_true() -> bool {
    true
}

/// What the operator observed and did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaFamilyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Degraded`, `Synchronized`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The feature level every replica's user database has reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_level: Option<i32>,
    /// Each client tier's deployed release and ready pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<ClientTierStatus>,
    /// The current upgrade plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanStatus>,
    /// Sync state of each link.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkStatus>,
    /// Largest lag of any link, in changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lag_changes: Option<i64>,
    /// The gateway's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayStatus>,
}

/// A client tier as deployed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientTierStatus {
    pub name: String,
    /// Release every ready pod of the tier runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    /// Pods wanted.
    #[serde(default)]
    pub replicas: i32,
    /// Pods ready at `release`.
    #[serde(default)]
    pub ready_replicas: i32,
}

/// An upgrade plan and how far it got.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanStatus {
    /// Feature level the plan leads to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_feature_level: Option<i32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<PlanStepStatus>,
    /// Index of the step being carried out.
    #[serde(default)]
    pub current: i32,
    /// Why no plan can be carried out, when refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<PlanBlocked>,
    /// Sync is paused by the plan (an all-at-once upgrade between its pause and resume
    /// steps): no sync task starts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sync_paused: bool,
}

/// One step of a plan with its state. `action` says which of the other fields apply.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanStepStatus {
    pub action: PlanAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_level: Option<i32>,
    #[serde(default)]
    pub state: StepState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PlanAction {
    UpgradeClients,
    RaiseSchemaRepository,
    RaiseUserDatabase,
    PauseSync,
    ResumeSync,
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum StepState {
    #[default]
    Pending,
    Running,
    Done,
    Failed,
}

/// A refused plan.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanBlocked {
    /// What stands in the way and what to do about it.
    pub reason: String,
}

/// Sync state of one directed link.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LinkStatus {
    pub from: String,
    pub to: String,
    /// Kind of the last task: `Incremental` or `Full`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_task: Option<String>,
    /// When the last task ended (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_task_time: Option<String>,
    /// Changes the receiver still lacks.
    #[serde(default)]
    pub lag_changes: i64,
    /// Packets from this link held at the receiver.
    #[serde(default)]
    pub held_packets: i64,
    /// A task of this link is running.
    #[serde(default)]
    pub running: bool,
    /// Last error, if the last task failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The gateway as observed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    pub replica: String,
    #[serde(default)]
    pub connected: bool,
    #[serde(default)]
    pub events_pending: i64,
    #[serde(default)]
    pub events_delivered: i64,
    /// Records the gateway cannot update because another replica masters them.
    #[serde(default)]
    pub one_directional_records: i64,
}
