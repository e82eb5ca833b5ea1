//! The replica server's HTTP API (axum) and the sync logic behind it: export,
//! import with held packets, push to a peer, feature level raises, clone.
//!
//! Storage calls are blocking (SQLite); they run on the blocking pool behind one
//! mutex, so the async runtime never waits on disk.

use crate::domain::compat::{Compatibility, FlPair, Raise};
use crate::packet::change::{FieldValue, ItemKind, ItemState};
use crate::packet::codec::{self, Limits, PacketHeader};
use crate::replica::http::{HttpError, RELEASE_HEADER, ReplicaClient};
use crate::replica::secret::Secret;
use crate::replica::store::{HeldPacket, ImportOutcome, Store, StoreError};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Everything a request handler needs.
pub struct Replica {
    store: Mutex<Store>,
    compat: Compatibility,
    secret: Secret,
    limits: Limits,
    /// The gateway process allowed to act for this replica, until when. Kept in memory:
    /// after a restart the first gateway to ask gets it, and the other is refused at
    /// its next renewal.
    gateway_lease: Mutex<Option<(String, std::time::Instant)>>,
}

pub type Shared = Arc<Replica>;

/// An error answer: status and a message a person can act on.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        let status = match &err {
            StoreError::Refused(_) => StatusCode::CONFLICT,
            StoreError::NotFound { .. } => StatusCode::NOT_FOUND,
            StoreError::Invalid(_) | StoreError::AlreadyExists { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %err, "storage failure");
        }
        ApiError::new(status, err.to_string())
    }
}

impl From<HttpError> for ApiError {
    fn from(err: HttpError) -> Self {
        let status = match &err {
            HttpError::Status { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            HttpError::BadUrl { .. } => StatusCode::BAD_REQUEST,
            HttpError::AwaitingBootstrap(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_GATEWAY,
        };
        ApiError::new(status, err.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

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
    pub peers: Vec<crate::replica::store::Peer>,
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

impl Replica {
    pub fn new(store: Store, compat: Compatibility, secret: Secret) -> Shared {
        Arc::new(Replica {
            store: Mutex::new(store),
            compat,
            secret,
            limits: Limits::default(),
            gateway_lease: Mutex::new(None),
        })
    }

    /// Runs `f` with the store on the blocking pool.
    async fn with_store<T, F>(self: &Arc<Self>, f: F) -> ApiResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store, &Replica) -> ApiResult<T> + Send + 'static,
    {
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let mut store = me.store.lock().map_err(|_| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage lock poisoned")
            })?;
            f(&mut store, &me)
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    }

    fn pair(store: &Store) -> ApiResult<FlPair> {
        let levels = store.levels()?;
        Ok(FlPair::new(levels.schema_repository, levels.user_database))
    }

    /// Why this replica neither exports nor imports now, if so.
    fn sync_blocked(&self, pair: FlPair) -> Option<String> {
        if self.compat.creates(pair).is_none() {
            Some(format!(
                "the replica is at {pair}, a pair without a packet version (between the schema repository and user database raises); it neither exports nor imports until its user database is raised"
            ))
        } else {
            None
        }
    }

    fn status(&self, store: &Store) -> ApiResult<StatusReport> {
        let levels = store.levels()?;
        let pair = FlPair::new(levels.schema_repository, levels.user_database);
        let accepts = self.compat.accepts(pair);
        let packet_version = self.compat.creates(pair).map(|creates| PacketVersions {
            creates,
            accepts_min: accepts.iter().copied().min().unwrap_or(creates),
            accepts_max: accepts.iter().copied().max().unwrap_or(creates),
        });
        let held = store.held_packet_list()?;
        let id = store.identity().clone();
        let mastered = store
            .mastered_counts()?
            .into_iter()
            .map(|(k, n)| {
                let key = match k {
                    ItemKind::Record => "records",
                    ItemKind::WorkspaceItem => "workspaceItems",
                    ItemKind::User => "users",
                };
                (key.to_string(), n)
            })
            .collect();
        Ok(StatusReport {
            family: id.family,
            replica: id.replica,
            id_prefix: id.id_prefix,
            id_tag: id.id_tag,
            incarnation: id.incarnation,
            schema_repository_feature_level: levels.schema_repository,
            user_database_feature_level: levels.user_database,
            metaschema_version: levels.metaschema,
            packet_version,
            sync_blocked: self.sync_blocked(pair),
            schema_version: levels.schema_version,
            user_database_schema_version: levels.user_database_schema_version,
            schema_repository_master: store.schema_master()?,
            gateway_replica: store
                .setting(crate::packet::change::GATEWAY_REPLICA)?
                .map(|(v, _)| v),
            epochs: store.epochs()?,
            held_packets: held.len(),
            held,
            peers: store.peers()?,
            mastered,
            change_log: store.change_log_len()?,
            removal_pending: store.removal_pending()?,
            restoring: store.restoring()?,
        })
    }

    /// Why this replica cannot import a packet of `version` now, if so.
    fn refuse_version(&self, pair: FlPair, version: i32) -> Option<String> {
        if let Some(blocked) = self.sync_blocked(pair) {
            return Some(blocked);
        }
        if self.compat.accepts_version(pair, version) {
            None
        } else {
            let accepts = self.compat.accepts(pair);
            Some(format!(
                "packet version {version} is not accepted at {pair} (accepts {}..{}); the packet is held until this replica is upgraded",
                accepts.iter().min().unwrap_or(&0),
                accepts.iter().max().unwrap_or(&0)
            ))
        }
    }

    /// Imports a received packet, holding it when it cannot be imported yet, then
    /// retries held packets.
    fn import_packet(&self, store: &mut Store, bytes: &[u8]) -> ApiResult<ImportReport> {
        let packet = codec::decode(bytes, &self.secret.packets, &self.limits)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("packet refused: {e}")))?;
        let me = store.identity().clone();
        let h = &packet.header;
        if h.family != me.family {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "packet refused: it is for family {}, this replica belongs to {}",
                    h.family, me.family
                ),
            ));
        }
        if h.target != me.replica {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "packet refused: it is for replica {}, this is {}",
                    h.target, me.replica
                ),
            ));
        }
        if h.target_incarnation != me.incarnation {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "packet refused: it was made for incarnation {} of {}, which is now at incarnation {}; the sender must ask for the current state",
                    h.target_incarnation, me.replica, me.incarnation
                ),
            ));
        }
        if h.sender_incarnation < store.peer_incarnation(&h.sender)? {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "packet refused: it was made by incarnation {} of {}, which has been restored from a backup since",
                    h.sender_incarnation, h.sender
                ),
            ));
        }
        store.saw_peer_incarnation(&h.sender, h.sender_incarnation)?;
        // A packet from a new replica shows it is running: its clone is done.
        store.confirm_member(&h.sender)?;
        let pair = Self::pair(store)?;
        let version = i32::from(h.packet_version);
        let mut report = ImportReport {
            replica: me.replica.clone(),
            incarnation: me.incarnation,
            epochs: BTreeMap::new(),
            applied: 0,
            skipped: 0,
            held: None,
            released: 0,
        };
        // Kept until it can be imported; older copies it supersedes go.
        let hold = |store: &mut Store, reason: String| -> ApiResult<Option<String>> {
            drop_superseded_held(store, &h.sender, &packet.ranges)?;
            store.hold_packet(&h.sender, version, &reason, bytes)?;
            tracing::info!(sender = %h.sender, version, %reason, "packet held");
            Ok(Some(reason))
        };
        if let Some(reason) = self.refuse_version(pair, version) {
            report.held = hold(store, reason)?;
        } else {
            let outcome: ImportOutcome =
                store.import_texts(&packet.changes, Some(&packet.texts))?;
            report.applied = outcome.applied;
            report.skipped = outcome.skipped;
            if outcome.blocked.is_none() && packet.changes.is_empty() {
                // A sender ends what it re-sends to a restored replica with an empty packet.
                store.heard_after_restore(&h.sender)?;
            }
            if let Some(reason) = outcome.blocked {
                report.held = hold(store, reason)?;
            }
        }
        report.released = self.retry_held(store)?;
        report.epochs = store.epochs()?;
        Ok(report)
    }

    /// Imports every held packet that can be imported now; repeats while any does.
    /// Returns how many were released.
    fn retry_held(&self, store: &mut Store) -> ApiResult<usize> {
        let mut released = 0;
        loop {
            let mut progress = false;
            for held in store.held_packets()? {
                let pair = Self::pair(store)?;
                if let Some(reason) = self.refuse_version(pair, held.packet_version) {
                    store.update_held_reason(held.id, &reason)?;
                    continue;
                }
                let packet = match codec::decode(&held.bytes, &self.secret.packets, &self.limits) {
                    Ok(p)
                        if p.header.sender_incarnation
                            < store.peer_incarnation(&p.header.sender)? =>
                    {
                        // Made before its sender was restored: its changes may never have happened.
                        store.release_held(held.id)?;
                        tracing::warn!(sender = %held.sender, id = held.id, "held packet from an older incarnation dropped");
                        continue;
                    }
                    Ok(p) => p,
                    Err(e) => {
                        store.update_held_reason(held.id, &format!("cannot be decoded: {e}"))?;
                        continue;
                    }
                };
                let outcome = store.import_texts(&packet.changes, Some(&packet.texts))?;
                if outcome.applied > 0 {
                    progress = true;
                }
                match outcome.blocked {
                    None => {
                        store.release_held(held.id)?;
                        released += 1;
                        progress = true;
                        tracing::info!(sender = %held.sender, id = held.id, "held packet imported");
                    }
                    Some(reason) => store.update_held_reason(held.id, &reason)?,
                }
            }
            if !progress {
                return Ok(released);
            }
        }
    }

    /// Imports the held packets that can be imported now; returns how many.
    pub async fn retry_held_now(self: &Arc<Self>) -> ApiResult<usize> {
        self.with_store(|store, replica| replica.retry_held(store))
            .await
    }

    /// Pushes to the replica at `peer_url` everything it lacks, packet by packet.
    pub async fn push(self: &Arc<Self>, peer_url: &str) -> ApiResult<PushReport> {
        self.push_packets(peer_url, INCREMENTAL_PACKETS).await
    }

    /// Pushes at most `max_packets` packets to the replica at `peer_url`.
    pub async fn push_packets(
        self: &Arc<Self>,
        peer_url: &str,
        max_packets: usize,
    ) -> ApiResult<PushReport> {
        let client = ReplicaClient::new(self.secret.api_token.clone(), None);
        let me = self.with_store(|s, _| Ok(s.identity().clone())).await?;
        let mut report = PushReport {
            from: me.replica.clone(),
            ..PushReport::default()
        };
        for _ in 0..max_packets {
            // The peer's own word on what it committed is the only basis for sending.
            let peer: StatusReport = client.get_json(peer_url, "/v1/status").await?;
            if peer.family != me.family {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "{peer_url} serves replica {} of family {}, not of {}",
                        peer.replica, peer.family, me.family
                    ),
                ));
            }
            report.to = peer.replica.clone();
            let peer_name = peer.replica.clone();
            let peer_epochs = peer.epochs.clone();
            let peer_inc = peer.incarnation;
            let peer_restoring = peer.restoring.contains(&me.replica);
            let prepared = self
                .with_store(move |store, replica| {
                    store.record_acknowledgement(&peer_name, peer_inc, &peer_epochs)?;
                    store.confirm_member(&peer_name)?;
                    let pair = Self::pair(store)?;
                    if let Some(blocked) = replica.sync_blocked(pair) {
                        return Err(ApiError::new(
                            StatusCode::CONFLICT,
                            format!("not exporting: {blocked}"),
                        ));
                    }
                    let changes = store.changes_for(&peer_name)?;
                    let lag = lag(&store.epochs()?, &peer_epochs);
                    // A restored peer waits for a packet from everyone, empty or not.
                    if changes.is_empty() && !peer_restoring {
                        return Ok((None, lag));
                    }
                    let header = PacketHeader {
                        packet_version: u16::try_from(replica.compat.creates(pair).unwrap_or(0))
                            .unwrap_or(0),
                        family: store.identity().family.clone(),
                        sender: store.identity().replica.clone(),
                        sender_incarnation: store.identity().incarnation,
                        target: peer_name.clone(),
                        target_incarnation: peer_inc,
                    };
                    let bytes =
                        codec::encode(&header, &changes, &replica.secret.packets).map_err(|e| {
                            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
                        })?;
                    Ok((Some((bytes, changes.len())), lag))
                })
                .await?;
            let (Some((bytes, count)), lag_before) = prepared else {
                report.lag = prepared.1;
                return Ok(report);
            };
            report.lag = lag_before;
            let answer = client
                .call(
                    hyper::Method::POST,
                    peer_url,
                    "/v1/sync/import",
                    "application/octet-stream",
                    bytes,
                )
                .await?;
            let imported: ImportReport = serde_json::from_slice(&answer).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("{peer_url} answered an import with {e}"),
                )
            })?;
            report.packets += 1;
            report.changes_sent += count;
            report.applied += imported.applied;
            report.skipped += imported.skipped;
            let name = imported.replica.clone();
            let epochs = imported.epochs.clone();
            let inc = imported.incarnation;
            let lag_after = self
                .with_store(move |store, _| {
                    store.record_acknowledgement(&name, inc, &epochs)?;
                    Ok(lag(&store.epochs()?, &epochs))
                })
                .await?;
            report.lag = lag_after;
            if imported.held.is_some() {
                report.held = imported.held;
                return Ok(report);
            }
            if count == 0 {
                return Ok(report);
            }
            // A restored peer still gets the closing empty packet on the next round.
            if lag_after == 0 && !peer_restoring {
                return Ok(report);
            }
        }
        Ok(report)
    }
}

/// Forgets packets held from `sender` whose every change is either held already
/// or carried again by the packet about to be held (a sender re-sends what it has
/// no acknowledgement for, so held packets would otherwise pile up).
fn drop_superseded_held(
    store: &mut Store,
    sender: &str,
    newer: &[codec::OriginRange],
) -> ApiResult<()> {
    let epochs = store.epochs()?;
    for held in store.held_packets()? {
        if held.sender != sender {
            continue;
        }
        let Ok((_, ranges)) = codec::peek_header(&held.bytes) else {
            continue;
        };
        let covered = ranges.iter().all(|old| {
            let first_missing = old
                .first
                .max(epochs.get(&old.origin).copied().unwrap_or(0) + 1);
            first_missing > old.last
                || newer.iter().any(|n| {
                    n.origin == old.origin && n.first <= first_missing && old.last <= n.last
                })
        });
        if covered {
            store.release_held(held.id)?;
        }
    }
    Ok(())
}

/// Changes `mine` holds that `theirs` lacks.
fn lag(mine: &BTreeMap<String, u64>, theirs: &BTreeMap<String, u64>) -> u64 {
    mine.iter()
        .map(|(origin, seq)| seq.saturating_sub(theirs.get(origin).copied().unwrap_or(0)))
        .sum()
}

// ---------------------------------------------------------------------------
// Item representation on the wire: plain JSON values, typed by the schema.

/// An item as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ItemView {
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

impl From<&ItemState> for ItemView {
    fn from(item: &ItemState) -> Self {
        ItemView {
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

/// Turns a plain JSON value into the field's type (records) or a string (others).
fn typed(
    store: &Store,
    kind: ItemKind,
    item_type: &str,
    name: &str,
    value: &Value,
) -> ApiResult<FieldValue> {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("field {name}: {other} is not a string, number or boolean"),
            ));
        }
    };
    if kind == ItemKind::Record {
        Ok(store.parse_field(item_type, name, &text)?)
    } else {
        Ok(FieldValue::String(text))
    }
}

fn kind_of(segment: &str) -> ApiResult<ItemKind> {
    match segment {
        "records" => Ok(ItemKind::Record),
        "workspace-items" => Ok(ItemKind::WorkspaceItem),
        "users" => Ok(ItemKind::User),
        other => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no such collection {other:?}: use records, workspace-items or users"),
        )),
    }
}

// ---------------------------------------------------------------------------
// Handlers.

/// Refuses callers without the family's token.
fn authorize(replica: &Replica, headers: &HeaderMap) -> ApiResult<()> {
    if token_matches(&replica.secret.api_token, headers) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong family token: callers need the family's secret",
        ))
    }
}

/// Whether the request carries `expected` as its bearer token.
pub fn token_matches(expected: &str, headers: &HeaderMap) -> bool {
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let expected = expected.as_bytes();
    // Compared without an early exit, so timing does not tell how much matched.
    presented.len() == expected.len()
        && presented
            .bytes()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Refuses a client whose release cannot open this replica's feature levels.
fn check_release(replica: &Replica, store: &Store, headers: &HeaderMap) -> ApiResult<()> {
    let Some(release) = headers.get(RELEASE_HEADER).and_then(|v| v.to_str().ok()) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("present your client release in the {RELEASE_HEADER} header"),
        ));
    };
    let levels = store.levels()?;
    for fl in [levels.schema_repository, levels.user_database] {
        match replica.compat.release_supports(release, fl) {
            Ok(true) => {}
            Ok(false) => {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!(
                        "client release {release} cannot open this replica: it is at feature level {} (schema repository) / {} (user database) and {release} does not support FL {fl}; upgrade the client to {}",
                        levels.schema_repository,
                        levels.user_database,
                        replica.compat.release_versions_supporting(fl).join(" or ")
                    ),
                ));
            }
            Err(e) => return Err(ApiError::new(StatusCode::FORBIDDEN, e.to_string())),
        }
    }
    Ok(())
}

/// `POST /v1/gateway/lease`: a gateway process asks to be (or stay) the one that acts.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayLease {
    pub holder: String,
    pub seconds: u64,
}

/// Grants the lease to `holder` when it is free, expired or already theirs; 409 naming
/// the holder otherwise.
async fn gateway_lease(
    State(r): State<Shared>,
    Json(body): Json<GatewayLease>,
) -> ApiResult<Json<GatewayLease>> {
    let now = std::time::Instant::now();
    let mut lease = r
        .gateway_lease
        .lock()
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "lease lock poisoned"))?;
    if let Some((holder, until)) = lease.as_ref()
        && *holder != body.holder
        && *until > now
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "gateway {holder} acts for this replica for {} s more",
                until.duration_since(now).as_secs()
            ),
        ));
    }
    let seconds = body.seconds.clamp(1, 300);
    *lease = Some((
        body.holder.clone(),
        now + std::time::Duration::from_secs(seconds),
    ));
    Ok(Json(GatewayLease {
        holder: body.holder,
        seconds,
    }))
}

/// What `GET /v1/session` answers a client whose release may open this replica.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    pub family: String,
    pub replica: String,
    pub release: String,
    pub schema_repository_feature_level: i32,
    pub user_database_feature_level: i32,
}

/// Opens a client session: refused (403, saying which release would do) when the
/// presented release cannot open this replica's feature levels.
async fn session(State(r): State<Shared>, headers: HeaderMap) -> ApiResult<Json<Session>> {
    r.with_store(move |store, replica| {
        check_release(replica, store, &headers)?;
        let levels = store.levels()?;
        let release = headers
            .get(RELEASE_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        Ok(Json(Session {
            family: store.identity().family.clone(),
            replica: store.identity().replica.clone(),
            release,
            schema_repository_feature_level: levels.schema_repository,
            user_database_feature_level: levels.user_database,
        }))
    })
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateBody {
    #[serde(rename = "type")]
    item_type: Option<String>,
    #[serde(default)]
    fields: BTreeMap<String, Value>,
    /// Users: the user's name; workspace items: the owner.
    owner: Option<String>,
}

async fn create_item(
    State(r): State<Shared>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    Json(body): Json<CreateBody>,
) -> ApiResult<(StatusCode, Json<ItemView>)> {
    let kind = kind_of(&kind)?;
    r.with_store(move |store, replica| {
        check_release(replica, store, &headers)?;
        let item_type = match (kind, body.item_type) {
            (ItemKind::User, _) => "user".to_string(),
            (_, Some(t)) => t,
            (_, None) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "give the item's \"type\"",
                ));
            }
        };
        let mut fields = BTreeMap::new();
        for (name, value) in &body.fields {
            fields.insert(name.clone(), typed(store, kind, &item_type, name, value)?);
        }
        let item = store.create_item(kind, &item_type, fields, body.owner.as_deref())?;
        Ok((StatusCode::CREATED, Json(ItemView::from(&item))))
    })
    .await
}

async fn get_item(
    State(r): State<Shared>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<ItemView>> {
    let kind = kind_of(&kind)?;
    r.with_store(move |store, replica| {
        check_release(replica, store, &headers)?;
        match store.get_item(kind, &id)? {
            Some(item) => Ok(Json(ItemView::from(&item))),
            None => Err(StoreError::NotFound { kind, id }.into()),
        }
    })
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct UpdateBody {
    /// New values; `null` removes a field.
    fields: BTreeMap<String, Value>,
}

async fn update_item(
    State(r): State<Shared>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<UpdateBody>,
) -> ApiResult<Json<ItemView>> {
    let kind = kind_of(&kind)?;
    r.with_store(move |store, replica| {
        check_release(replica, store, &headers)?;
        let current = store
            .get_item(kind, &id)?
            .ok_or_else(|| StoreError::NotFound {
                kind,
                id: id.clone(),
            })?;
        let mut changes = BTreeMap::new();
        for (name, value) in &body.fields {
            let v = if value.is_null() {
                None
            } else {
                Some(typed(store, kind, &current.item_type, name, value)?)
            };
            changes.insert(name.clone(), v);
        }
        Ok(Json(ItemView::from(
            &store.update_item(kind, &id, changes)?,
        )))
    })
    .await
}

async fn delete_item(
    State(r): State<Shared>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<ItemView>> {
    let kind = kind_of(&kind)?;
    r.with_store(move |store, replica| {
        check_release(replica, store, &headers)?;
        Ok(Json(ItemView::from(&store.delete_item(kind, &id)?)))
    })
    .await
}

async fn list_items(
    State(r): State<Shared>,
    Path(kind): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<ItemView>>> {
    let kind = kind_of(&kind)?;
    r.with_store(move |store, replica| {
        check_release(replica, store, &headers)?;
        let item_type = query
            .iter()
            .find(|(k, _)| k == "type")
            .map(|(_, v)| v.clone());
        let mut filters = Vec::new();
        for (key, value) in &query {
            if let Some(name) = key.strip_prefix("field.") {
                let t = item_type.clone().ok_or_else(|| {
                    ApiError::new(StatusCode::BAD_REQUEST, "a field filter needs ?type=")
                })?;
                filters.push((
                    name.to_string(),
                    typed(store, kind, &t, name, &Value::String(value.clone()))?,
                ));
            } else if key != "type" {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("unknown query parameter {key:?}: use type= and field.NAME="),
                ));
            }
        }
        let items = store.query(kind, item_type.as_deref(), &filters)?;
        Ok(Json(items.iter().map(ItemView::from).collect()))
    })
    .await
}

async fn item_history(
    State(r): State<Shared>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<Value>>> {
    let kind = kind_of(&kind)?;
    r.with_store(move |store, replica| {
        check_release(replica, store, &headers)?;
        let entries = store.history(kind, &id)?;
        if entries.is_empty() {
            return Err(StoreError::NotFound { kind, id }.into());
        }
        Ok(Json(
            entries
                .iter()
                .map(|e| {
                    let mut entry = json!({"version": e.version, "origin": e.origin, "seq": e.seq, "state": ItemView::from(&e.state)});
                    if let Some(from) = &e.forced_from {
                        entry["forcedFrom"] = json!(from);
                    }
                    entry
                })
                .collect(),
        ))
    })
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MastershipBody {
    /// The new master; absent with `force` means "take over here".
    to: Option<String>,
    #[serde(default)]
    force: bool,
}

async fn move_mastership(
    State(r): State<Shared>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<MastershipBody>,
) -> ApiResult<Json<Vec<ItemView>>> {
    let kind = kind_of(&kind)?;
    r.with_store(move |store, replica| {
        check_release(replica, store, &headers)?;
        let me = store.identity().replica.clone();
        let moved = match body.to {
            Some(to) if to != me && body.force => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("a forced takeover makes this replica ({me}) the master; leave out the new master {to}, or leave out force"),
                ));
            }
            Some(to) if to != me => store.move_mastership(kind, &id, &to)?,
            _ => {
                let item = store.take_over(kind, &id, body.force)?;
                tracing::warn!(item = %id, "mastership taken over by force");
                vec![item]
            }
        };
        Ok(Json(moved.iter().map(ItemView::from).collect()))
    })
    .await
}

async fn status(State(r): State<Shared>) -> ApiResult<Json<StatusReport>> {
    r.with_store(|store, replica| Ok(Json(replica.status(store)?)))
        .await
}

async fn digest(State(r): State<Shared>) -> ApiResult<Json<Value>> {
    r.with_store(|store, _| {
        let (digest, items) = store.digest()?;
        Ok(Json(
            json!({"replica": store.identity().replica, "digest": digest, "items": items}),
        ))
    })
    .await
}

async fn import(State(r): State<Shared>, body: Bytes) -> ApiResult<Json<ImportReport>> {
    r.with_store(move |store, replica| Ok(Json(replica.import_packet(store, &body)?)))
        .await
}

#[derive(Deserialize)]
struct ExportQuery {
    peer: String,
}

async fn export(State(r): State<Shared>, Query(q): Query<ExportQuery>) -> ApiResult<Response> {
    r.with_store(move |store, replica| {
        let pair = Replica::pair(store)?;
        if let Some(blocked) = replica.sync_blocked(pair) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("not exporting: {blocked}"),
            ));
        }
        let peer = store
            .peers()?
            .into_iter()
            .find(|p| p.name == q.peer)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("{} is not a member of this family", q.peer),
                )
            })?;
        let changes = store.changes_for(&peer.name)?;
        let header = PacketHeader {
            packet_version: u16::try_from(replica.compat.creates(pair).unwrap_or(0)).unwrap_or(0),
            family: store.identity().family.clone(),
            sender: store.identity().replica.clone(),
            sender_incarnation: store.identity().incarnation,
            target: peer.name.clone(),
            target_incarnation: peer.incarnation.max(1),
        };
        let bytes = codec::encode(&header, &changes, &replica.secret.packets)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        Ok(([("content-type", "application/octet-stream")], bytes).into_response())
    })
    .await
}

/// Records a receiver's report of what it committed (the answer of an import of a
/// packet file, carried back by hand), so that the next export starts after it.
async fn acknowledge(
    State(r): State<Shared>,
    Json(report): Json<ImportReport>,
) -> ApiResult<Json<Value>> {
    r.with_store(move |store, _| {
        if !store.peers()?.iter().any(|p| p.name == report.replica) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{} is not a member of this family", report.replica),
            ));
        }
        store.record_acknowledgement(&report.replica, report.incarnation, &report.epochs)?;
        store.confirm_member(&report.replica)?;
        Ok(Json(
            json!({"replica": store.identity().replica, "acknowledged": report.replica}),
        ))
    })
    .await
}

/// Packets per incremental push; a longer backlog continues with the next task.
pub const INCREMENTAL_PACKETS: usize = 64;
/// Packets per full push: everything the peer lacks, within reason.
pub const FULL_PACKETS: usize = 100_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushBody {
    to: String,
    /// A full task: keep sending until the peer lacks nothing.
    #[serde(default)]
    full: bool,
}

async fn push(State(r): State<Shared>, Json(body): Json<PushBody>) -> ApiResult<Json<PushReport>> {
    let packets = if body.full {
        FULL_PACKETS
    } else {
        INCREMENTAL_PACKETS
    };
    Ok(Json(r.push_packets(&body.to, packets).await?))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct UpgradeBody {
    schema_repository: Option<i32>,
    user_database: Option<i32>,
    user_database_schema: Option<u64>,
}

async fn upgrade(
    State(r): State<Shared>,
    Json(body): Json<UpgradeBody>,
) -> ApiResult<Json<StatusReport>> {
    r.with_store(move |store, replica| {
        let pair = Replica::pair(store)?;
        let refuse =
            |m: String| ApiError::new(StatusCode::CONFLICT, format!("upgrade refused: {m}"));
        match (
            body.schema_repository,
            body.user_database,
            body.user_database_schema,
        ) {
            (Some(level), None, None) => {
                replica
                    .compat
                    .raise(pair, Raise::SchemaRepository(level))
                    .map_err(refuse)?;
                let metaschema = replica
                    .compat
                    .metaschema_for(level)
                    .ok_or_else(|| refuse(format!("no release opens FL {level}")))?;
                store.set_schema_repository_level(level, metaschema)?;
                tracing::info!(level, "schema repository raised");
            }
            (None, Some(level), None) => {
                replica
                    .compat
                    .raise(pair, Raise::UserDatabase(level))
                    .map_err(refuse)?;
                store.set_user_database_level(level)?;
                tracing::info!(level, "user database raised");
            }
            (None, None, Some(version)) => {
                store.upgrade_user_database_schema(version)?;
                tracing::info!(version, "user database upgraded to a new schema version");
            }
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "give exactly one of schemaRepository, userDatabase, userDatabaseSchema",
                ));
            }
        }
        replica.retry_held(store)?;
        Ok(Json(replica.status(store)?))
    })
    .await
}

/// A consistent copy of this replica's database (a backup).
async fn backup(State(r): State<Shared>) -> ApiResult<Response> {
    r.with_store(move |store, _| {
        let dir = store
            .path()
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default();
        let tmp = dir.join(".backup.db");
        let _ = std::fs::remove_file(&tmp);
        let made = store.backup_to(&tmp).and_then(|()| {
            std::fs::read(&tmp)
                .map_err(|e| StoreError::Invalid(format!("cannot read the copy: {e}")))
        });
        let _ = std::fs::remove_file(&tmp);
        let bytes = made?;
        tracing::info!(size = bytes.len(), "backup made");
        Ok(([("content-type", "application/octet-stream")], bytes).into_response())
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloneBody {
    replica: String,
}

/// Makes a copy of this replica's database for a new replica; answers the copy's
/// bytes with the new replica's id tag in `x-multisite-id-tag`.
async fn clone_replica(
    State(r): State<Shared>,
    Json(body): Json<CloneBody>,
) -> ApiResult<Response> {
    r.with_store(move |store, _| {
        let dir = store.path().parent().map(std::path::Path::to_path_buf).unwrap_or_default();
        let tmp = dir.join(format!(".clone-{}.db", body.replica));
        let _ = std::fs::remove_file(&tmp);
        let result = store.snapshot_for_clone(&body.replica, &tmp);
        let bytes = result.and_then(|tag| {
            std::fs::read(&tmp)
                .map(|b| (tag, b))
                .map_err(|e| StoreError::Invalid(format!("cannot read the copy: {e}")))
        });
        let _ = std::fs::remove_file(&tmp);
        let (tag, bytes) = bytes?;
        tracing::info!(replica = %body.replica, %tag, size = bytes.len(), "copy made for a new replica");
        Ok((
            [("content-type", "application/octet-stream".to_string()), ("x-multisite-id-tag", tag)],
            bytes,
        )
            .into_response())
    })
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PackageBody {
    package: String,
    version: String,
    record_types: Vec<crate::packet::change::RecordTypeDef>,
}

/// Applies a schema package (at the replica that masters the schema repository).
async fn apply_package(
    State(r): State<Shared>,
    Json(body): Json<PackageBody>,
) -> ApiResult<Json<crate::packet::change::SchemaVersion>> {
    r.with_store(move |store, _| {
        for t in &body.record_types {
            for f in &t.fields {
                if !["String", "Integer", "Boolean", "Timestamp", "Reference"].contains(&f.field_type.as_str()) {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("field {} of {}: unknown type {:?}", f.name, t.name, f.field_type),
                    ));
                }
            }
        }
        let schema = store.apply_schema_package(&body.package, &body.version, &body.record_types)?;
        tracing::info!(package = %body.package, version = %body.version, schema_version = schema.version, "schema package applied");
        Ok(Json(schema))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingBody {
    key: String,
    value: String,
}

/// Sets a family-wide setting (the gateway's replica; the schema repository's
/// master, only at its current master).
async fn set_setting(
    State(r): State<Shared>,
    Json(body): Json<SettingBody>,
) -> ApiResult<Json<StatusReport>> {
    r.with_store(move |store, replica| {
        use crate::packet::change::{GATEWAY_REPLICA, SCHEMA_MASTER};
        let members = store.peers()?;
        if !members.iter().any(|p| p.name == body.value && p.active) {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("{} is not an active member of the family", body.value)));
        }
        match body.key.as_str() {
            GATEWAY_REPLICA => {}
            SCHEMA_MASTER => {
                let master = store.schema_master()?;
                if master != store.identity().replica {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        format!("the schema repository is mastered at replica {master}; move it from there"),
                    ));
                }
            }
            other => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("unknown setting {other:?}: use {GATEWAY_REPLICA} or {SCHEMA_MASTER}"),
                ));
            }
        }
        store.set_setting(&body.key, &body.value)?;
        Ok(Json(replica.status(store)?))
    })
    .await
}

/// Declares a member gone for good, so that its items can be taken over by force.
async fn forget_member(
    State(r): State<Shared>,
    Path(name): Path<String>,
) -> ApiResult<Json<StatusReport>> {
    r.with_store(move |store, replica| {
        store.forget_member(&name)?;
        tracing::warn!(member = %name, "member declared gone for good");
        Ok(Json(replica.status(store)?))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetireBody {
    to: String,
}

/// Starts removing this replica: its mastership moves to `to` and it stops making changes.
async fn retire(
    State(r): State<Shared>,
    Json(body): Json<RetireBody>,
) -> ApiResult<Json<StatusReport>> {
    r.with_store(move |store, replica| {
        let moved = store.retire(&body.to)?;
        tracing::warn!(to = %body.to, moved, "replica leaving the family; mastership moved");
        Ok(Json(replica.status(store)?))
    })
    .await
}

async fn healthz() -> &'static str {
    "ok"
}

/// A replica that serves is bootstrapped already; asking again changes nothing.
async fn already_bootstrapped(State(r): State<Shared>) -> ApiResult<Json<Value>> {
    r.with_store(|store, _| {
        let id = store.identity();
        Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "replica {} of family {} is already bootstrapped",
                id.replica, id.family
            ),
        ))
    })
    .await
}

/// Refuses, before any body is read, calls without the family's token.
async fn require_token(
    State(r): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match authorize(&r, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(err) => err.into_response(),
    }
}

/// The HTTP API.
pub fn router(replica: Shared) -> Router {
    let packet_limit = replica.limits.max_packet_bytes;
    let api = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/session", get(session))
        .route("/v1/gateway/lease", post(gateway_lease))
        .route(
            "/v1/bootstrap",
            get(already_bootstrapped).post(already_bootstrapped),
        )
        .route("/v1/digest", get(digest))
        .route("/v1/upgrade", post(upgrade))
        .route("/v1/clone", post(clone_replica))
        .route("/v1/backup", post(backup))
        .route("/v1/retire", post(retire))
        .route("/v1/members/{name}/forget", post(forget_member))
        .route("/v1/schema-packages", post(apply_package))
        .route("/v1/settings", post(set_setting))
        .route(
            "/v1/sync/import",
            post(import).layer(axum::extract::DefaultBodyLimit::max(packet_limit)),
        )
        .route("/v1/sync/export", get(export))
        .route("/v1/sync/push", post(push))
        .route("/v1/sync/acknowledge", post(acknowledge))
        .route("/v1/{kind}", get(list_items).post(create_item))
        .route(
            "/v1/{kind}/{id}",
            get(get_item).patch(update_item).delete(delete_item),
        )
        .route("/v1/{kind}/{id}/history", get(item_history))
        .route("/v1/{kind}/{id}/mastership", post(move_mastership))
        .route_layer(axum::middleware::from_fn_with_state(
            replica.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(healthz))
        .merge(api)
        .with_state(replica)
}
