//! The contract between a replica server and everyone who calls it (operator, peer
//! replicas, client tiers, gateways, the CLI): every route, every request and answer
//! body, and the reasons an error answer carries. The server's router takes its paths
//! from [`route`]; callers use [`ReplicaClient`], one method per route, so a renamed
//! field or route fails to compile on both sides at once.

use crate::http::{HttpClient, HttpError};
use crate::store::{HeldPacket, Peer};
use hyper::Method;
use multisite_core::packet::change::{
    FieldValue, ItemKind, ItemState, RecordTypeDef, SchemaVersion,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

/// The paths the replica server routes, as its router writes them.
pub mod route {
    pub const STATUS: &str = "/v1/status";
    pub const SESSION: &str = "/v1/session";
    pub const GATEWAY_LEASE: &str = "/v1/gateway/lease";
    pub const BOOTSTRAP: &str = "/v1/bootstrap";
    pub const DIGEST: &str = "/v1/digest";
    pub const UPGRADE: &str = "/v1/upgrade";
    pub const CLONE: &str = "/v1/clone";
    pub const BACKUP: &str = "/v1/backup";
    pub const RETIRE: &str = "/v1/retire";
    pub const FORGET_MEMBER: &str = "/v1/members/{name}/forget";
    pub const SCHEMA_PACKAGES: &str = "/v1/schema-packages";
    pub const SETTINGS: &str = "/v1/settings";
    pub const SYNC_IMPORT: &str = "/v1/sync/import";
    pub const SYNC_EXPORT: &str = "/v1/sync/export";
    pub const SYNC_PUSH: &str = "/v1/sync/push";
    pub const SYNC_ACKNOWLEDGE: &str = "/v1/sync/acknowledge";
    pub const ITEMS: &str = "/v1/{kind}";
    pub const ITEM: &str = "/v1/{kind}/{id}";
    pub const ITEM_HISTORY: &str = "/v1/{kind}/{id}/history";
    pub const ITEM_MASTERSHIP: &str = "/v1/{kind}/{id}/mastership";
    pub const HEALTHZ: &str = "/healthz";
    pub const READYZ: &str = "/readyz";

    /// The routes of the family's other workloads (client tiers, the gateway).
    pub mod workload {
        /// The workload's own report (`GatewayReport` for a gateway).
        pub const STATUS: &str = "/status";
        /// A gateway's incoming updates from the outside system.
        pub const GATEWAY_UPDATES: &str = "/v1/updates";
    }
}

/// Header carrying the caller's client release.
pub const RELEASE_HEADER: &str = "x-multisite-release";
/// Header of a clone's answer: the id tag the new replica's items end in.
pub const ID_TAG_HEADER: &str = "x-multisite-id-tag";

/// The path segment of each item collection.
pub fn collection(kind: ItemKind) -> &'static str {
    match kind {
        ItemKind::Record => "records",
        ItemKind::WorkspaceItem => "workspace-items",
        ItemKind::User => "users",
    }
}

/// The collection a path segment names, if any.
pub fn kind_of_collection(segment: &str) -> Option<ItemKind> {
    [ItemKind::Record, ItemKind::WorkspaceItem, ItemKind::User]
        .into_iter()
        .find(|kind| collection(*kind) == segment)
}

/// Why a request was refused, so that callers decide on a reason, not on a message.
/// Each reason has one HTTP status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reason {
    /// The request is malformed or names something that cannot be.
    Invalid,
    /// No token, or not the family's.
    Unauthorized,
    /// The client release presented cannot open this replica's feature levels.
    ReleaseRefused,
    /// No such item, collection or member.
    NotFound,
    /// An item of that id exists already.
    AlreadyExists,
    /// The rules refuse the change (mastership, a removal under way, a restore).
    Refused,
    /// The replica neither exports nor imports packets now.
    SyncBlocked,
    /// The feature level raise asked for is not allowed from where the replica is.
    UpgradeRefused,
    /// Another gateway holds this replica's lease.
    LeaseHeld,
    /// The pod serves a replica already; a bootstrap changes nothing.
    AlreadyBootstrapped,
    /// A bootstrap of this pod is running already.
    BootstrapRunning,
    /// The pod waits for its bootstrap.
    AwaitingBootstrap,
    /// A replica this one called failed or answered nonsense.
    PeerFailed,
    /// Storage or another part of the server failed.
    Internal,
    /// A reason this release does not know, or an answer without one.
    #[default]
    #[serde(other)]
    Unknown,
}

impl Reason {
    /// The HTTP status an answer with this reason has.
    pub fn status(self) -> u16 {
        match self {
            Reason::Invalid => 400,
            Reason::Unauthorized => 401,
            Reason::ReleaseRefused => 403,
            Reason::NotFound => 404,
            Reason::AlreadyExists => 400,
            Reason::Refused
            | Reason::SyncBlocked
            | Reason::UpgradeRefused
            | Reason::LeaseHeld
            | Reason::AlreadyBootstrapped
            | Reason::BootstrapRunning => 409,
            Reason::AwaitingBootstrap => 503,
            Reason::PeerFailed => 502,
            Reason::Internal | Reason::Unknown => 500,
        }
    }
}

/// The body of every error answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What is wrong, for a person to act on.
    pub error: String,
    #[serde(default)]
    pub reason: Reason,
}

/// Packet versions a replica creates and accepts, as the status reports them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PacketVersions {
    pub creates: i32,
    pub accepts_min: i32,
    pub accepts_max: i32,
}

/// `GET /v1/status`; field names follow the Replica resource's status.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub family: String,
    pub replica: String,
    pub id_prefix: String,
    pub id_tag: String,
    pub incarnation: u64,
    pub schema_repository_feature_level: i32,
    pub user_database_feature_level: i32,
    pub metaschema_version: i32,
    /// `null` while the replica is between the two steps of a paired move.
    pub packet_version: Option<PacketVersions>,
    /// Why the replica neither exports nor imports now, if so.
    pub sync_blocked: Option<String>,
    pub schema_version: u64,
    pub user_database_schema_version: u64,
    /// The replica where schema packages are applied.
    pub schema_repository_master: String,
    /// The replica the family's gateway is pinned to, once set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_replica: Option<String>,
    pub epochs: BTreeMap<String, u64>,
    pub held_packets: usize,
    pub held: Vec<HeldPacket>,
    pub peers: Vec<Peer>,
    pub mastered: BTreeMap<String, u64>,
    pub change_log: u64,
    /// Set while the replica is being removed: the peers that still lack some of
    /// its changes (empty: its data can be deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal_pending: Option<Vec<String>>,
    /// After a restore from backup: the peers that have not yet re-sent what the
    /// backup lacks. The replica makes no changes until this is empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restoring: Vec<String>,
}

/// What `POST /v1/sync/import` answers: the receiver's own report of what it committed.
/// Also the body of `POST /v1/sync/acknowledge`, carried back by hand.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportReport {
    pub replica: String,
    pub incarnation: u64,
    pub epochs: BTreeMap<String, u64>,
    pub applied: usize,
    pub skipped: usize,
    /// Set when the packet was held; says why.
    pub held: Option<String>,
    /// Held packets imported after this one.
    pub released: usize,
}

/// What `POST /v1/sync/acknowledge` answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Acknowledged {
    pub replica: String,
    pub acknowledged: String,
}

/// `GET /v1/sync/export`'s query.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    /// The member the packet is for.
    pub peer: String,
}

/// `POST /v1/sync/push`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushRequest {
    /// The receiver's replica API.
    pub to: String,
    /// A full task: keep sending until the peer lacks nothing.
    #[serde(default)]
    pub full: bool,
}

/// What `POST /v1/sync/push` answers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PushReport {
    pub from: String,
    pub to: String,
    pub packets: usize,
    pub changes_sent: usize,
    pub applied: usize,
    pub skipped: usize,
    pub held: Option<String>,
    /// Changes the peer still lacks after the push.
    pub lag: u64,
}

/// `GET /v1/digest`: a hash over every item, equal at replicas that hold the same.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Digest {
    pub replica: String,
    pub digest: String,
    pub items: u64,
}

/// `POST /v1/gateway/lease`, answered with the lease granted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayLease {
    pub holder: String,
    pub seconds: u64,
}

/// `GET /v1/session`: a client session the presented release may open.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    pub family: String,
    pub replica: String,
    pub release: String,
    pub schema_repository_feature_level: i32,
    pub user_database_feature_level: i32,
}

/// An item as the API shows it: field values as plain JSON, typed by the schema.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Item {
    pub id: String,
    #[serde(rename = "type")]
    pub item_type: String,
    pub fields: BTreeMap<String, Value>,
    pub master: String,
    pub version: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

fn plain(value: &FieldValue) -> Value {
    match value {
        FieldValue::String(s) | FieldValue::Timestamp(s) | FieldValue::Reference(s) => {
            Value::String(s.clone())
        }
        FieldValue::Integer(i) => Value::from(*i),
        FieldValue::Boolean(b) => Value::Bool(*b),
    }
}

impl From<&ItemState> for Item {
    fn from(item: &ItemState) -> Self {
        Item {
            id: item.id.clone(),
            item_type: item.item_type.clone(),
            fields: item
                .fields
                .iter()
                .map(|(k, v)| (k.clone(), plain(v)))
                .collect(),
            master: item.master.clone(),
            version: item.version,
            deleted: item.deleted,
            owner: item.owner.clone(),
        }
    }
}

/// `POST /v1/{kind}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateItem {
    /// The record type (records) or kind (workspace items); users need none.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub item_type: Option<String>,
    #[serde(default)]
    pub fields: BTreeMap<String, Value>,
    /// Users: the user's name; workspace items: the owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// `PATCH /v1/{kind}/{id}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateItem {
    /// New values; `null` removes a field.
    pub fields: BTreeMap<String, Value>,
    /// Move the item's mastership to this replica as part of the change (only at its
    /// master, to another active replica).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mastership: Option<String>,
    /// The outside system's update, applied by the family's gateway: the change event it
    /// writes says so (`origin: gateway`), so the gateway can tell the outside system
    /// that the change is its own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub via_gateway: bool,
}

/// `GET /v1/{kind}`: which items to list.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ItemQuery {
    /// Only items of this record type or workspace item kind.
    pub item_type: Option<String>,
    /// Only items whose field has this value (needs `item_type`).
    pub fields: Vec<(String, String)>,
}

impl ItemQuery {
    /// Items of one type.
    pub fn of_type(item_type: &str) -> Self {
        ItemQuery {
            item_type: Some(item_type.to_string()),
            fields: Vec::new(),
        }
    }

    /// The query string (`type=...&field.NAME=...`), empty when nothing is asked.
    fn encode(&self) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        if let Some(item_type) = &self.item_type {
            query.append_pair("type", item_type);
        }
        for (name, value) in &self.fields {
            query.append_pair(&format!("field.{name}"), value);
        }
        query.finish()
    }
}

/// One entry of `GET /v1/{kind}/{id}/history`, oldest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ItemHistoryEntry {
    pub version: u64,
    /// The replica whose change this is.
    pub origin: String,
    /// Its sequence number in that replica's change log.
    pub seq: u64,
    pub state: Item,
    /// Set when the change took mastership by force from this replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced_from: Option<String>,
}

/// `POST /v1/{kind}/{id}/mastership`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MoveMastership {
    /// The new master; absent with `force` means "take over here".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/upgrade`: one step, exactly one field set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpgradeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_repository: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_database: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_database_schema: Option<u64>,
}

/// `POST /v1/clone`: a copy of the database for a new replica.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    pub replica: String,
}

/// `POST /v1/schema-packages`, at the schema repository's master.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PackageRequest {
    pub package: String,
    pub version: String,
    pub record_types: Vec<RecordTypeDef>,
}

impl From<&multisite_core::api::SchemaPackageSpec> for PackageRequest {
    fn from(spec: &multisite_core::api::SchemaPackageSpec) -> Self {
        PackageRequest {
            package: spec.package.clone(),
            version: spec.version.clone(),
            record_types: spec
                .record_types
                .iter()
                .map(|t| RecordTypeDef {
                    name: t.name.clone(),
                    fields: t
                        .fields
                        .iter()
                        .map(|f| multisite_core::packet::change::FieldDef {
                            name: f.name.clone(),
                            field_type: f.field_type.name().to_string(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// `POST /v1/settings`: a family-wide setting.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Setting {
    pub key: String,
    pub value: String,
}

/// `POST /v1/retire`: start removing the replica, its mastership going to `to`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetireRequest {
    pub to: String,
}

/// `POST /v1/bootstrap`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BootstrapRequest {
    /// Must match the family the pod was started for.
    pub family: String,
    /// Must match the replica the pod was started for.
    pub replica: String,
    #[serde(flatten)]
    pub source: BootstrapSource,
}

/// Where the new replica's data comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BootstrapSource {
    /// The family's first replica: an empty database.
    Init {
        id_prefix: String,
        feature_level: i32,
    },
    /// A copy of the live replica at this URL, which then catches up through packets.
    CloneFrom(String),
}

/// What a waiting pod says about itself (`GET /v1/bootstrap`, and the body of its
/// `503` answer to `GET /v1/status`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapState {
    pub family: String,
    pub replica: String,
    /// Always `true` while the pod waits; lets a caller tell this answer from others.
    pub awaiting_bootstrap: bool,
    /// Set while a bootstrap runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<String>,
    /// Why the last attempt failed; the caller may ask again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Human-readable summary, also under `error` for callers that read error bodies.
    pub error: String,
}

/// Where a gateway stands (its `GET /status`), read by the operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayReport {
    pub replica: String,
    /// This process holds the lease and its replica answers.
    pub connected: bool,
    pub leader: bool,
    pub events_pending: u64,
    pub events_delivered: u64,
    pub one_directional_records: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A path segment with everything but unreserved characters percent-encoded.
pub fn segment(text: &str) -> String {
    const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(text, RESERVED).to_string()
}

fn item_path(kind: ItemKind, id: &str, tail: &str) -> String {
    format!("/v1/{}/{}{tail}", collection(kind), segment(id))
}

/// The typed client of the replica API: the family token, an optional client release
/// and a deadline per call, over one connection pool its clones share.
#[derive(Clone)]
pub struct ReplicaClient {
    http: HttpClient,
}

impl ReplicaClient {
    pub fn new(token: String, release: Option<String>) -> Self {
        ReplicaClient {
            http: HttpClient::new(token, release),
        }
    }

    /// The same client with another deadline per call.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        ReplicaClient {
            http: self.http.with_timeout(timeout),
        }
    }

    /// The same client presenting `release` on item calls.
    pub fn with_release(self, release: Option<String>) -> Self {
        ReplicaClient {
            http: self.http.with_release(release),
        }
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        base: &str,
        path: &str,
    ) -> Result<T, HttpError> {
        self.http.get_json(base, path).await
    }

    async fn send<B: Serialize, T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        base: &str,
        path: &str,
        body: &B,
    ) -> Result<T, HttpError> {
        self.http.send_json(method, base, path, body).await
    }

    async fn post<B: Serialize, T: serde::de::DeserializeOwned>(
        &self,
        base: &str,
        path: &str,
        body: &B,
    ) -> Result<T, HttpError> {
        self.send(Method::POST, base, path, body).await
    }

    /// `GET /v1/status`. A pod still waiting for its bootstrap answers
    /// [`HttpError::AwaitingBootstrap`].
    pub async fn status(&self, base: &str) -> Result<StatusReport, HttpError> {
        self.get(base, route::STATUS).await
    }

    /// `GET /v1/session`, with the client's release.
    pub async fn session(&self, base: &str) -> Result<Session, HttpError> {
        self.get(base, route::SESSION).await
    }

    /// `POST /v1/gateway/lease`.
    pub async fn gateway_lease(
        &self,
        base: &str,
        lease: &GatewayLease,
    ) -> Result<GatewayLease, HttpError> {
        self.post(base, route::GATEWAY_LEASE, lease).await
    }

    /// `POST /v1/bootstrap` to a waiting pod; it answers its state at once and
    /// bootstraps in the background.
    pub async fn bootstrap(
        &self,
        base: &str,
        request: &BootstrapRequest,
    ) -> Result<BootstrapState, HttpError> {
        self.post(base, route::BOOTSTRAP, request).await
    }

    /// `GET /v1/digest`.
    pub async fn digest(&self, base: &str) -> Result<Digest, HttpError> {
        self.get(base, route::DIGEST).await
    }

    /// `POST /v1/upgrade`.
    pub async fn upgrade(
        &self,
        base: &str,
        request: &UpgradeRequest,
    ) -> Result<StatusReport, HttpError> {
        self.post(base, route::UPGRADE, request).await
    }

    /// `POST /v1/clone`: the bytes of a copy of the database made for `replica`.
    pub async fn clone_for(&self, base: &str, replica: &str) -> Result<Vec<u8>, HttpError> {
        let body = CloneRequest {
            replica: replica.to_string(),
        };
        self.http
            .call(
                Method::POST,
                base,
                route::CLONE,
                "application/json",
                crate::http::encode(base, &body)?,
            )
            .await
    }

    /// `POST /v1/backup`: the bytes of a consistent copy of the database.
    pub async fn backup(&self, base: &str) -> Result<Vec<u8>, HttpError> {
        self.http
            .call(
                Method::POST,
                base,
                route::BACKUP,
                "application/json",
                Vec::new(),
            )
            .await
    }

    /// `POST /v1/retire`.
    pub async fn retire(&self, base: &str, to: &str) -> Result<StatusReport, HttpError> {
        let body = RetireRequest { to: to.to_string() };
        self.post(base, route::RETIRE, &body).await
    }

    /// `POST /v1/members/{name}/forget`.
    pub async fn forget_member(&self, base: &str, name: &str) -> Result<StatusReport, HttpError> {
        let path = format!("/v1/members/{}/forget", segment(name));
        self.post(base, &path, &serde_json::Map::new()).await
    }

    /// `POST /v1/schema-packages`.
    pub async fn apply_package(
        &self,
        base: &str,
        package: &PackageRequest,
    ) -> Result<SchemaVersion, HttpError> {
        self.post(base, route::SCHEMA_PACKAGES, package).await
    }

    /// `POST /v1/settings`.
    pub async fn set_setting(
        &self,
        base: &str,
        setting: &Setting,
    ) -> Result<StatusReport, HttpError> {
        self.post(base, route::SETTINGS, setting).await
    }

    /// `POST /v1/sync/import`: one packet file's bytes.
    pub async fn import(&self, base: &str, packet: Vec<u8>) -> Result<ImportReport, HttpError> {
        let bytes = self
            .http
            .call(
                Method::POST,
                base,
                route::SYNC_IMPORT,
                "application/octet-stream",
                packet,
            )
            .await?;
        crate::http::parse(base, &bytes)
    }

    /// `GET /v1/sync/export?peer=`: a packet of what `peer` lacks.
    pub async fn export(&self, base: &str, peer: &str) -> Result<Vec<u8>, HttpError> {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("peer", peer)
            .finish();
        let path = format!("{}?{query}", route::SYNC_EXPORT);
        self.http
            .call(Method::GET, base, &path, "application/json", Vec::new())
            .await
    }

    /// `POST /v1/sync/push`.
    pub async fn push(&self, base: &str, request: &PushRequest) -> Result<PushReport, HttpError> {
        self.post(base, route::SYNC_PUSH, request).await
    }

    /// `POST /v1/sync/acknowledge`.
    pub async fn acknowledge(
        &self,
        base: &str,
        report: &ImportReport,
    ) -> Result<Acknowledged, HttpError> {
        self.post(base, route::SYNC_ACKNOWLEDGE, report).await
    }

    /// `GET /v1/{kind}`.
    pub async fn list_items(
        &self,
        base: &str,
        kind: ItemKind,
        query: &ItemQuery,
    ) -> Result<Vec<Item>, HttpError> {
        let query = query.encode();
        let mut path = format!("/v1/{}", collection(kind));
        if !query.is_empty() {
            path = format!("{path}?{query}");
        }
        self.get(base, &path).await
    }

    /// `POST /v1/{kind}`.
    pub async fn create_item(
        &self,
        base: &str,
        kind: ItemKind,
        item: &CreateItem,
    ) -> Result<Item, HttpError> {
        let path = format!("/v1/{}", collection(kind));
        self.post(base, &path, item).await
    }

    /// `GET /v1/{kind}/{id}`.
    pub async fn get_item(&self, base: &str, kind: ItemKind, id: &str) -> Result<Item, HttpError> {
        self.get(base, &item_path(kind, id, "")).await
    }

    /// `PATCH /v1/{kind}/{id}`.
    pub async fn update_item(
        &self,
        base: &str,
        kind: ItemKind,
        id: &str,
        update: &UpdateItem,
    ) -> Result<Item, HttpError> {
        self.send(Method::PATCH, base, &item_path(kind, id, ""), update)
            .await
    }

    /// `DELETE /v1/{kind}/{id}`: answers the tombstone.
    pub async fn delete_item(
        &self,
        base: &str,
        kind: ItemKind,
        id: &str,
    ) -> Result<Item, HttpError> {
        let bytes = self
            .http
            .call(
                Method::DELETE,
                base,
                &item_path(kind, id, ""),
                "application/json",
                Vec::new(),
            )
            .await?;
        crate::http::parse(base, &bytes)
    }

    /// `GET /v1/{kind}/{id}/history`.
    pub async fn item_history(
        &self,
        base: &str,
        kind: ItemKind,
        id: &str,
    ) -> Result<Vec<ItemHistoryEntry>, HttpError> {
        self.get(base, &item_path(kind, id, "/history")).await
    }

    /// `POST /v1/{kind}/{id}/mastership`: answers every item that moved.
    pub async fn move_mastership(
        &self,
        base: &str,
        kind: ItemKind,
        id: &str,
        request: &MoveMastership,
    ) -> Result<Vec<Item>, HttpError> {
        self.post(base, &item_path(kind, id, "/mastership"), request)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collections_round_trip() {
        for kind in [ItemKind::Record, ItemKind::WorkspaceItem, ItemKind::User] {
            assert_eq!(kind_of_collection(collection(kind)), Some(kind));
        }
        assert_eq!(kind_of_collection("defects"), None);
    }

    #[test]
    fn ids_and_queries_are_encoded() {
        assert_eq!(
            item_path(ItemKind::Record, "a b/c", "/history"),
            "/v1/records/a%20b%2Fc/history"
        );
        assert_eq!(
            item_path(ItemKind::User, "ann-1_x.y~", ""),
            "/v1/users/ann-1_x.y~"
        );
        let query = ItemQuery {
            item_type: Some("Defect".into()),
            fields: vec![("state".into(), "open & new".into())],
        };
        assert_eq!(query.encode(), "type=Defect&field.state=open+%26+new");
        assert_eq!(ItemQuery::default().encode(), "");
    }

    /// Every reason survives the wire; one this release does not know reads as
    /// `Unknown` rather than failing the whole answer.
    #[test]
    fn reasons_round_trip_and_unknown_ones_are_tolerated() {
        for reason in [
            Reason::Invalid,
            Reason::Unauthorized,
            Reason::ReleaseRefused,
            Reason::NotFound,
            Reason::AlreadyExists,
            Reason::Refused,
            Reason::SyncBlocked,
            Reason::UpgradeRefused,
            Reason::LeaseHeld,
            Reason::AlreadyBootstrapped,
            Reason::BootstrapRunning,
            Reason::AwaitingBootstrap,
            Reason::PeerFailed,
            Reason::Internal,
        ] {
            let body = ErrorBody {
                error: "e".into(),
                reason,
            };
            let text = serde_json::to_string(&body).unwrap();
            assert_eq!(serde_json::from_str::<ErrorBody>(&text).unwrap(), body);
            assert!((400..600).contains(&reason.status()), "{reason:?}");
        }
        let later: ErrorBody =
            serde_json::from_str(r#"{"error":"e","reason":"SomethingNew"}"#).unwrap();
        assert_eq!(later.reason, Reason::Unknown);
        let none: ErrorBody = serde_json::from_str(r#"{"error":"e"}"#).unwrap();
        assert_eq!(none.reason, Reason::Unknown);
    }
}
