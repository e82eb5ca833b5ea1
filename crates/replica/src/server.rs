//! The replica server's HTTP API (axum) and the sync logic behind it: export,
//! import with held packets, push to a peer, feature level raises, clone.
//!
//! Storage calls are blocking (SQLite); they run on the blocking pool behind one
//! mutex, so the async runtime never waits on disk.

use crate::api::{
    Acknowledged, CloneRequest, CreateItem, Digest, ErrorBody, ExportQuery, GatewayLease,
    ID_TAG_HEADER, ImportReport, Item, ItemHistoryEntry, MoveMastership, PackageRequest,
    PacketVersions, PushReport, PushRequest, RELEASE_HEADER, Reason, ReplicaClient, RetireRequest,
    Session, Setting, StatusReport, UpdateItem, UpgradeRequest, route,
};
use crate::http::HttpError;
use crate::secret::Secret;
use crate::store::{ImportOutcome, ItemChange, Origin, Store, StoreError};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use multisite_core::domain::compat::{Compatibility, FlPair, Raise};
use multisite_core::packet::change::{FieldValue, ItemKind};
use multisite_core::packet::codec::{self, Limits, PacketHeader};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Everything a request handler needs.
pub struct ReplicaServer {
    store: Mutex<Store>,
    compat: Compatibility,
    secret: Secret,
    limits: Limits,
    /// The gateway process allowed to act for this replica, until when. Kept in memory:
    /// after a restart the first gateway to ask gets it, and the other is refused at
    /// its next renewal.
    gateway_lease: Mutex<Option<(String, std::time::Instant)>>,
    /// Pushes to peers go through this one client, so its connections are reused.
    peers: ReplicaClient,
}

pub type Shared = Arc<ReplicaServer>;

/// An error answer: its reason, its status and a message a person can act on.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub reason: Reason,
    pub message: String,
}

impl ApiError {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::from_u16(reason.status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            reason,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
            reason: self.reason,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        let reason = match &err {
            StoreError::Refused(_) => Reason::Refused,
            StoreError::NotFound { .. } => Reason::NotFound,
            StoreError::Invalid(_) => Reason::Invalid,
            StoreError::AlreadyExists { .. } => Reason::AlreadyExists,
            _ => Reason::Internal,
        };
        if reason == Reason::Internal {
            tracing::error!(error = %err, "storage failure");
        }
        ApiError::new(reason, err.to_string())
    }
}

/// A peer's refusal is passed on with its own reason and status; a peer that could
/// not be asked is this replica's failure to reach it.
impl From<HttpError> for ApiError {
    fn from(err: HttpError) -> Self {
        match &err {
            HttpError::Status { status, reason, .. } => ApiError {
                status: StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY),
                reason: *reason,
                message: err.to_string(),
            },
            HttpError::BadUrl { .. } => ApiError::new(Reason::Invalid, err.to_string()),
            HttpError::AwaitingBootstrap(_) => {
                ApiError::new(Reason::AwaitingBootstrap, err.to_string())
            }
            _ => ApiError::new(Reason::PeerFailed, err.to_string()),
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

impl ReplicaServer {
    pub fn new(store: Store, compat: Compatibility, secret: Secret) -> Shared {
        Arc::new(ReplicaServer {
            store: Mutex::new(store),
            compat,
            limits: Limits::default(),
            gateway_lease: Mutex::new(None),
            peers: ReplicaClient::new(secret.api_token.clone(), None),
            secret,
        })
    }

    /// Runs `f` with the store on the blocking pool.
    async fn with_store<T, F>(self: &Arc<Self>, f: F) -> ApiResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store, &ReplicaServer) -> ApiResult<T> + Send + 'static,
    {
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let mut store = me
                .store
                .lock()
                .map_err(|_| ApiError::new(Reason::Internal, "storage lock poisoned"))?;
            f(&mut store, &me)
        })
        .await
        .map_err(|e| ApiError::new(Reason::Internal, e.to_string()))?
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
                .setting(multisite_core::packet::change::GATEWAY_REPLICA)?
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
            .map_err(|e| ApiError::new(Reason::Invalid, format!("packet refused: {e}")))?;
        let me = store.identity().clone();
        let h = &packet.header;
        if h.family != me.family {
            return Err(ApiError::new(
                Reason::Invalid,
                format!(
                    "packet refused: it is for family {}, this replica belongs to {}",
                    h.family, me.family
                ),
            ));
        }
        if h.target != me.replica {
            return Err(ApiError::new(
                Reason::Invalid,
                format!(
                    "packet refused: it is for replica {}, this is {}",
                    h.target, me.replica
                ),
            ));
        }
        if h.target_incarnation != me.incarnation {
            return Err(ApiError::new(
                Reason::Refused,
                format!(
                    "packet refused: it was made for incarnation {} of {}, which is now at incarnation {}; the sender must ask for the current state",
                    h.target_incarnation, me.replica, me.incarnation
                ),
            ));
        }
        if h.sender_incarnation < store.peer_incarnation(&h.sender)? {
            return Err(ApiError::new(
                Reason::Refused,
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
        let client = &self.peers;
        let me = self.with_store(|s, _| Ok(s.identity().clone())).await?;
        let mut report = PushReport {
            from: me.replica.clone(),
            ..PushReport::default()
        };
        for _ in 0..max_packets {
            // The peer's own word on what it committed is the only basis for sending.
            let peer = client.status(peer_url).await?;
            if peer.family != me.family {
                return Err(ApiError::new(
                    Reason::Invalid,
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
                            Reason::SyncBlocked,
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
                    let bytes = codec::encode(&header, &changes, &replica.secret.packets)
                        .map_err(|e| ApiError::new(Reason::Internal, e.to_string()))?;
                    Ok((Some((bytes, changes.len())), lag))
                })
                .await?;
            let (Some((bytes, count)), lag_before) = prepared else {
                report.lag = prepared.1;
                return Ok(report);
            };
            report.lag = lag_before;
            let imported = client.import(peer_url, bytes).await?;
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
                Reason::Invalid,
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
    crate::api::kind_of_collection(segment).ok_or_else(|| {
        ApiError::new(
            Reason::NotFound,
            format!("no such collection {segment:?}: use records, workspace-items or users"),
        )
    })
}

// ---------------------------------------------------------------------------
// Handlers.

/// Refuses callers without the family's token.
fn authorize(replica: &ReplicaServer, headers: &HeaderMap) -> ApiResult<()> {
    if token_matches(&replica.secret.api_token, headers) {
        Ok(())
    } else {
        Err(ApiError::new(
            Reason::Unauthorized,
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
fn check_release(replica: &ReplicaServer, store: &Store, headers: &HeaderMap) -> ApiResult<()> {
    let Some(release) = headers.get(RELEASE_HEADER).and_then(|v| v.to_str().ok()) else {
        return Err(ApiError::new(
            Reason::Invalid,
            format!("present your client release in the {RELEASE_HEADER} header"),
        ));
    };
    let levels = store.levels()?;
    for fl in [levels.schema_repository, levels.user_database] {
        match replica.compat.release_supports(release, fl) {
            Ok(true) => {}
            Ok(false) => {
                return Err(ApiError::new(
                    Reason::ReleaseRefused,
                    format!(
                        "client release {release} cannot open this replica: it is at feature level {} (schema repository) / {} (user database) and {release} does not support FL {fl}; upgrade the client to {}",
                        levels.schema_repository,
                        levels.user_database,
                        replica.compat.release_versions_supporting(fl).join(" or ")
                    ),
                ));
            }
            Err(e) => return Err(ApiError::new(Reason::ReleaseRefused, e.to_string())),
        }
    }
    Ok(())
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
        .map_err(|_| ApiError::new(Reason::Internal, "lease lock poisoned"))?;
    if let Some((holder, until)) = lease.as_ref()
        && *holder != body.holder
        && *until > now
    {
        return Err(ApiError::new(
            Reason::LeaseHeld,
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

async fn create_item(
    State(r): State<Shared>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    Json(body): Json<CreateItem>,
) -> ApiResult<(StatusCode, Json<Item>)> {
    let kind = kind_of(&kind)?;
    r.with_store(move |store, replica| {
        check_release(replica, store, &headers)?;
        let item_type = match (kind, body.item_type) {
            (ItemKind::User, _) => "user".to_string(),
            (_, Some(t)) => t,
            (_, None) => {
                return Err(ApiError::new(Reason::Invalid, "give the item's \"type\""));
            }
        };
        let mut fields = BTreeMap::new();
        for (name, value) in &body.fields {
            fields.insert(name.clone(), typed(store, kind, &item_type, name, value)?);
        }
        let item = store.create_item(kind, &item_type, fields, body.owner.as_deref())?;
        Ok((StatusCode::CREATED, Json(Item::from(&item))))
    })
    .await
}

async fn get_item(
    State(r): State<Shared>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<Item>> {
    let kind = kind_of(&kind)?;
    r.with_store(move |store, replica| {
        check_release(replica, store, &headers)?;
        match store.get_item(kind, &id)? {
            Some(item) => Ok(Json(Item::from(&item))),
            None => Err(StoreError::NotFound { kind, id }.into()),
        }
    })
    .await
}

async fn update_item(
    State(r): State<Shared>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<UpdateItem>,
) -> ApiResult<Json<Item>> {
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
        let how = ItemChange {
            move_to: body.mastership.as_deref(),
            origin: if body.via_gateway {
                Origin::Gateway
            } else {
                Origin::Replica
            },
        };
        let moved = store.change_item(kind, &id, changes, how)?;
        Ok(Json(Item::from(&moved)))
    })
    .await
}

async fn delete_item(
    State(r): State<Shared>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<Item>> {
    let kind = kind_of(&kind)?;
    r.with_store(move |store, replica| {
        check_release(replica, store, &headers)?;
        Ok(Json(Item::from(&store.delete_item(kind, &id)?)))
    })
    .await
}

async fn list_items(
    State(r): State<Shared>,
    Path(kind): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<Item>>> {
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
                let t = item_type
                    .clone()
                    .ok_or_else(|| ApiError::new(Reason::Invalid, "a field filter needs ?type="))?;
                filters.push((
                    name.to_string(),
                    typed(store, kind, &t, name, &Value::String(value.clone()))?,
                ));
            } else if key != "type" {
                return Err(ApiError::new(
                    Reason::Invalid,
                    format!("unknown query parameter {key:?}: use type= and field.NAME="),
                ));
            }
        }
        let items = store.query(kind, item_type.as_deref(), &filters)?;
        Ok(Json(items.iter().map(Item::from).collect()))
    })
    .await
}

async fn item_history(
    State(r): State<Shared>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<ItemHistoryEntry>>> {
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
                .map(|e| ItemHistoryEntry {
                    version: e.version,
                    origin: e.origin.clone(),
                    seq: e.seq,
                    state: Item::from(&e.state),
                    forced_from: e.forced_from.clone(),
                })
                .collect(),
        ))
    })
    .await
}

async fn move_mastership(
    State(r): State<Shared>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<MoveMastership>,
) -> ApiResult<Json<Vec<Item>>> {
    let kind = kind_of(&kind)?;
    r.with_store(move |store, replica| {
        check_release(replica, store, &headers)?;
        let me = store.identity().replica.clone();
        let moved = match body.to {
            Some(to) if to != me && body.force => {
                return Err(ApiError::new(
                    Reason::Invalid,
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
        Ok(Json(moved.iter().map(Item::from).collect()))
    })
    .await
}

async fn status(State(r): State<Shared>) -> ApiResult<Json<StatusReport>> {
    r.with_store(|store, replica| Ok(Json(replica.status(store)?)))
        .await
}

async fn digest(State(r): State<Shared>) -> ApiResult<Json<Digest>> {
    r.with_store(|store, _| {
        let (digest, items) = store.digest()?;
        Ok(Json(Digest {
            replica: store.identity().replica.clone(),
            digest,
            items,
        }))
    })
    .await
}

async fn import(State(r): State<Shared>, body: Bytes) -> ApiResult<Json<ImportReport>> {
    r.with_store(move |store, replica| Ok(Json(replica.import_packet(store, &body)?)))
        .await
}

async fn export(State(r): State<Shared>, Query(q): Query<ExportQuery>) -> ApiResult<Response> {
    r.with_store(move |store, replica| {
        let pair = ReplicaServer::pair(store)?;
        if let Some(blocked) = replica.sync_blocked(pair) {
            return Err(ApiError::new(
                Reason::SyncBlocked,
                format!("not exporting: {blocked}"),
            ));
        }
        let peer = store
            .peers()?
            .into_iter()
            .find(|p| p.name == q.peer)
            .ok_or_else(|| {
                ApiError::new(
                    Reason::NotFound,
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
            .map_err(|e| ApiError::new(Reason::Internal, e.to_string()))?;
        Ok(([("content-type", "application/octet-stream")], bytes).into_response())
    })
    .await
}

/// Records a receiver's report of what it committed (the answer of an import of a
/// packet file, carried back by hand), so that the next export starts after it.
async fn acknowledge(
    State(r): State<Shared>,
    Json(report): Json<ImportReport>,
) -> ApiResult<Json<Acknowledged>> {
    r.with_store(move |store, _| {
        if !store.peers()?.iter().any(|p| p.name == report.replica) {
            return Err(ApiError::new(
                Reason::Invalid,
                format!("{} is not a member of this family", report.replica),
            ));
        }
        store.record_acknowledgement(&report.replica, report.incarnation, &report.epochs)?;
        store.confirm_member(&report.replica)?;
        Ok(Json(Acknowledged {
            replica: store.identity().replica.clone(),
            acknowledged: report.replica,
        }))
    })
    .await
}

/// Packets per incremental push; a longer backlog continues with the next task.
pub const INCREMENTAL_PACKETS: usize = 64;
/// Packets per full push: everything the peer lacks, within reason.
pub const FULL_PACKETS: usize = 100_000;

async fn push(
    State(r): State<Shared>,
    Json(body): Json<PushRequest>,
) -> ApiResult<Json<PushReport>> {
    let packets = if body.full {
        FULL_PACKETS
    } else {
        INCREMENTAL_PACKETS
    };
    Ok(Json(r.push_packets(&body.to, packets).await?))
}

async fn upgrade(
    State(r): State<Shared>,
    Json(body): Json<UpgradeRequest>,
) -> ApiResult<Json<StatusReport>> {
    r.with_store(move |store, replica| {
        let pair = ReplicaServer::pair(store)?;
        let refuse =
            |m: String| ApiError::new(Reason::UpgradeRefused, format!("upgrade refused: {m}"));
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
                    Reason::Invalid,
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

/// Makes a copy of this replica's database for a new replica; answers the copy's
/// bytes with the new replica's id tag in [`ID_TAG_HEADER`].
async fn clone_replica(
    State(r): State<Shared>,
    Json(body): Json<CloneRequest>,
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
            [("content-type", "application/octet-stream".to_string()), (ID_TAG_HEADER, tag)],
            bytes,
        )
            .into_response())
    })
    .await
}

/// Applies a schema package (at the replica that masters the schema repository).
async fn apply_package(
    State(r): State<Shared>,
    Json(body): Json<PackageRequest>,
) -> ApiResult<Json<multisite_core::packet::change::SchemaVersion>> {
    r.with_store(move |store, _| {
        for t in &body.record_types {
            for f in &t.fields {
                if !["String", "Integer", "Boolean", "Timestamp", "Reference"].contains(&f.field_type.as_str()) {
                    return Err(ApiError::new(
                        Reason::Invalid,
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

/// Sets a family-wide setting (the gateway's replica; the schema repository's
/// master, only at its current master).
async fn set_setting(
    State(r): State<Shared>,
    Json(body): Json<Setting>,
) -> ApiResult<Json<StatusReport>> {
    r.with_store(move |store, replica| {
        use multisite_core::packet::change::{GATEWAY_REPLICA, SCHEMA_MASTER};
        let members = store.peers()?;
        if !members.iter().any(|p| p.name == body.value && p.active) {
            return Err(ApiError::new(Reason::Invalid, format!("{} is not an active member of the family", body.value)));
        }
        match body.key.as_str() {
            GATEWAY_REPLICA => {}
            SCHEMA_MASTER => {
                let master = store.schema_master()?;
                if master != store.identity().replica {
                    return Err(ApiError::new(
                        Reason::Refused,
                        format!("the schema repository is mastered at replica {master}; move it from there"),
                    ));
                }
            }
            other => {
                return Err(ApiError::new(
                    Reason::Invalid,
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

/// Starts removing this replica: its mastership moves to `to` and it stops making changes.
async fn retire(
    State(r): State<Shared>,
    Json(body): Json<RetireRequest>,
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
            Reason::AlreadyBootstrapped,
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
        .route(route::STATUS, get(status))
        .route(route::SESSION, get(session))
        .route(route::GATEWAY_LEASE, post(gateway_lease))
        .route(
            route::BOOTSTRAP,
            get(already_bootstrapped).post(already_bootstrapped),
        )
        .route(route::DIGEST, get(digest))
        .route(route::UPGRADE, post(upgrade))
        .route(route::CLONE, post(clone_replica))
        .route(route::BACKUP, post(backup))
        .route(route::RETIRE, post(retire))
        .route(route::FORGET_MEMBER, post(forget_member))
        .route(route::SCHEMA_PACKAGES, post(apply_package))
        .route(route::SETTINGS, post(set_setting))
        .route(
            route::SYNC_IMPORT,
            post(import).layer(axum::extract::DefaultBodyLimit::max(packet_limit)),
        )
        .route(route::SYNC_EXPORT, get(export))
        .route(route::SYNC_PUSH, post(push))
        .route(route::SYNC_ACKNOWLEDGE, post(acknowledge))
        .route(route::ITEMS, get(list_items).post(create_item))
        .route(
            route::ITEM,
            get(get_item).patch(update_item).delete(delete_item),
        )
        .route(route::ITEM_HISTORY, get(item_history))
        .route(route::ITEM_MASTERSHIP, post(move_mastership))
        .route_layer(axum::middleware::from_fn_with_state(
            replica.clone(),
            require_token,
        ));
    Router::new()
        .route(route::HEALTHZ, get(healthz))
        .route(route::READYZ, get(healthz))
        .merge(api)
        .with_state(replica)
}
