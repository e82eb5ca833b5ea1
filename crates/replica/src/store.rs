//! The replica's storage: one SQLite file (WAL) holding the schema repository
//! (schema versions, feature level, metaschema) and the user database (records,
//! workspace items, users, each with its master), the change log, the epoch table,
//! what each peer acknowledged, and held packets.
//!
//! Every local change and its change-log entry commit in one transaction; every
//! import is one transaction. Durability: WAL with `synchronous=NORMAL` survives a
//! killed process (what our crash tests kill); `--sync-full` adds power-loss safety.

use multisite_core::domain::mastership::{
    self, ItemView, Master, Operation as Action, ReplicaStatus,
};
use multisite_core::packet::change::{
    CHANGE_EVENT_TYPE, Change, FieldValue, GATEWAY_REPLICA, ItemKind, ItemState, Membership,
    Operation, RecordTypeDef, SCHEMA_MASTER, SchemaVersion, Setting,
};
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The database file inside a replica's data directory.
pub const DB_FILE: &str = "replica.db";

/// How long acknowledged changes stay in the log by default (7 days), so that a
/// replica restored from a backup that recent gets back everything it lost.
pub const DEFAULT_LOG_RETENTION_SECONDS: u64 = 7 * 24 * 3600;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Most changes one packet carries; a longer backlog goes in several packets.
pub const MAX_CHANGES_PER_PACKET: usize = 20_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error ({context}): {source}")]
    Sqlite {
        context: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{0}")]
    Refused(#[from] mastership::Refusal),
    #[error("{kind} {id} does not exist")]
    NotFound { kind: ItemKind, id: String },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "{path} holds no replica (no {DB_FILE}); create one with `multisite replica init` or `multisite replica clone`"
    )]
    NoReplica { path: String },
    #[error("{path} already holds a replica")]
    AlreadyExists { path: String },
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
}

impl StoreError {
    fn sql(context: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
        move |source| StoreError::Sqlite { context, source }
    }
}

type Result<T> = std::result::Result<T, StoreError>;

/// Who this replica is.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub family: String,
    pub replica: String,
    pub id_prefix: String,
    /// Letters ending the ids this replica creates; empty for the family's first replica.
    pub id_tag: String,
    pub incarnation: u64,
}

/// What `replica init` needs.
#[derive(Clone, Debug)]
pub struct InitParams {
    pub family: String,
    pub replica: String,
    pub id_prefix: String,
    pub feature_level: i32,
    pub metaschema: i32,
    pub record_types: Vec<RecordTypeDef>,
}

/// The feature levels and schema state of this replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Levels {
    pub schema_repository: i32,
    pub user_database: i32,
    pub metaschema: i32,
    /// Newest schema version in the schema repository.
    pub schema_version: u64,
    /// Schema version the user database has been upgraded to.
    pub user_database_schema_version: u64,
}

/// How an item is changed, beyond its fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ItemChange<'a> {
    /// Move its mastership to this replica in the same change.
    pub move_to: Option<&'a str>,
    /// Where the change comes from, for its change event.
    pub origin: Origin,
}

/// Where a record change comes from, as its change event says (when the interop
/// package's ChangeEvent type has an `origin` field).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Origin {
    /// A user or program at a replica.
    #[default]
    Replica,
    /// The outside system, through the family's gateway.
    Gateway,
}

/// A peer as this replica knows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    pub name: String,
    pub id_tag: String,
    pub active: bool,
    /// The peer's incarnation as last reported by the peer.
    pub incarnation: u64,
    /// What the peer reported it committed, per origin.
    pub acknowledged: BTreeMap<String, u64>,
    /// A replica cloned from this one that has not answered for itself yet; its
    /// clone can be made again under the same name.
    #[serde(default)]
    pub pending_clone: bool,
}

/// A packet kept until it can be imported.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldPacket {
    pub id: i64,
    pub sender: String,
    pub packet_version: i32,
    pub reason: String,
    pub received_at: String,
    #[serde(skip)]
    pub bytes: Vec<u8>,
}

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportOutcome {
    pub applied: usize,
    /// Changes already held (duplicates are harmless).
    pub skipped: usize,
    /// Why the rest of the packet could not be imported yet; the packet is then held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked: Option<String>,
}

/// One entry of an item's history.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub version: u64,
    pub origin: String,
    pub seq: u64,
    pub state: ItemState,
    /// Set when this state came from a forced takeover: the removed master.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forced_from: Option<String>,
}

/// A field filter of a query: field name and the value it must have.
pub type FieldFilter = (String, FieldValue);

pub struct Store {
    conn: Connection,
    identity: Identity,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE schema_versions (version INTEGER PRIMARY KEY, package TEXT, record_types TEXT NOT NULL);
CREATE TABLE items (
    kind TEXT NOT NULL, id TEXT NOT NULL, item_type TEXT NOT NULL, fields TEXT NOT NULL,
    master TEXT NOT NULL, version INTEGER NOT NULL, deleted INTEGER NOT NULL,
    owner TEXT, schema_version INTEGER NOT NULL,
    origin TEXT NOT NULL, seq INTEGER NOT NULL, forced_from TEXT,
    PRIMARY KEY (kind, id)) WITHOUT ROWID;
CREATE TABLE history (
    kind TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL, item_type TEXT NOT NULL,
    fields TEXT NOT NULL, master TEXT NOT NULL, deleted INTEGER NOT NULL, owner TEXT,
    schema_version INTEGER NOT NULL, origin TEXT NOT NULL, seq INTEGER NOT NULL, forced_from TEXT,
    PRIMARY KEY (kind, id, version)) WITHOUT ROWID;
CREATE TABLE changes (
    origin TEXT NOT NULL, seq INTEGER NOT NULL, pos INTEGER NOT NULL, logged_at INTEGER NOT NULL,
    body TEXT, kind TEXT, id TEXT, version INTEGER,
    PRIMARY KEY (origin, seq)) WITHOUT ROWID;
CREATE TABLE epochs (origin TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE peers (
    name TEXT PRIMARY KEY, id_tag TEXT NOT NULL, active INTEGER NOT NULL,
    incarnation INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE TABLE peer_epochs (
    peer TEXT NOT NULL, origin TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (peer, origin)) WITHOUT ROWID;
CREATE TABLE settings (
    key TEXT PRIMARY KEY, value TEXT NOT NULL, version INTEGER NOT NULL, origin TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE held_packets (
    id INTEGER PRIMARY KEY AUTOINCREMENT, sender TEXT NOT NULL, packet_version INTEGER NOT NULL,
    reason TEXT NOT NULL, received_at TEXT NOT NULL, bytes BLOB NOT NULL);
";

fn kind_key(kind: ItemKind) -> &'static str {
    match kind {
        ItemKind::Record => "record",
        ItemKind::WorkspaceItem => "workspace",
        ItemKind::User => "user",
    }
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn get_meta(conn: &Connection, key: &str) -> Result<Option<String>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
        .map_err(StoreError::sql("reading meta"))
}

fn need_meta(conn: &Connection, key: &str) -> Result<String> {
    get_meta(conn, key)?.ok_or_else(|| StoreError::Corrupt(format!("meta key {key} is missing")))
}

fn set_meta(conn: &Connection, key: &str, value: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )
    .map(|_| ())
    .map_err(StoreError::sql("writing meta"))
}

fn meta_number<T: std::str::FromStr>(conn: &Connection, key: &str) -> Result<T> {
    need_meta(conn, key)?
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("meta key {key} is not a number")))
}

/// Record numbers stay below this, so the counter can never wrap around.
const MAX_RECORD_NUMBER: u64 = 1 << 53;

/// The number inside a record id (`SAMPL00042B` -> 42); 0 when it has none.
fn record_number(prefix: &str, id: &str) -> u64 {
    id.strip_prefix(prefix)
        .map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().unwrap_or(0)
        })
        .unwrap_or(0)
}

/// The i-th child tag of `parent`: segments of `A`* then one letter B..Z, so
/// every tag splits into its ancestors' segments one way only and no two
/// replicas get the same tag.
pub fn child_id_tag(parent: &str, index: u64) -> String {
    let letters = b"BCDEFGHIJKLMNOPQRSTUVWXYZ";
    let count = letters.len() as u64;
    let mut tag = parent.to_string();
    for _ in 0..index / count {
        tag.push('A');
    }
    tag.push(char::from(letters[(index % count) as usize]));
    tag
}

/// Opens a connection with the pragmas every replica database uses.
fn connect(path: &Path, sync_full: bool) -> Result<Connection> {
    let conn = Connection::open(path).map_err(StoreError::sql("opening the database"))?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(StoreError::sql("setting the busy timeout"))?;
    let sync = if sync_full { "FULL" } else { "NORMAL" };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON; PRAGMA cache_size = -65536;"
    ))
    .map_err(StoreError::sql("setting pragmas"))?;
    Ok(conn)
}

impl Store {
    /// Creates the first replica of a family in `dir`.
    pub fn init(dir: &Path, p: &InitParams) -> Result<Store> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Invalid(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join(DB_FILE);
        if path.exists() {
            return Err(StoreError::AlreadyExists {
                path: dir.display().to_string(),
            });
        }
        let mut conn = connect(&path, false)?;
        let tx = conn
            .transaction()
            .map_err(StoreError::sql("starting init"))?;
        tx.execute_batch(SCHEMA)
            .map_err(StoreError::sql("creating tables"))?;
        for (key, value) in [
            ("family", p.family.as_str()),
            ("replica", p.replica.as_str()),
            ("id_prefix", p.id_prefix.as_str()),
            ("id_tag", ""),
        ] {
            set_meta(&tx, key, value)?;
        }
        for (key, value) in [
            ("incarnation", 1i64),
            ("schema_repository_fl", i64::from(p.feature_level)),
            ("user_database_fl", i64::from(p.feature_level)),
            ("metaschema", i64::from(p.metaschema)),
            ("user_database_schema_version", 1),
            ("next_record_number", 1),
            ("next_child_tag", 0),
            ("next_log_position", 1),
            (
                "log_retention_seconds",
                DEFAULT_LOG_RETENTION_SECONDS as i64,
            ),
            ("mastered_record", 0),
            ("mastered_workspace", 0),
            ("mastered_user", 0),
        ] {
            set_meta(&tx, key, &value.to_string())?;
        }
        tx.commit().map_err(StoreError::sql("committing init"))?;
        let mut store = Store::open_conn(conn, path)?;
        store.commit_local(vec![
            Operation::AddSchemaVersion {
                schema: SchemaVersion {
                    version: 1,
                    package: None,
                    record_types: p.record_types.clone(),
                },
            },
            Operation::Membership {
                membership: Membership {
                    replica: p.replica.clone(),
                    id_tag: String::new(),
                    active: true,
                },
            },
            Operation::Setting {
                setting: Setting {
                    key: SCHEMA_MASTER.to_string(),
                    value: p.replica.clone(),
                    version: 1,
                },
            },
        ])?;
        Ok(store)
    }

    /// Opens the replica in `dir`.
    pub fn open(dir: &Path) -> Result<Store> {
        Self::open_with(dir, false)
    }

    /// Opens the replica in `dir`, with `synchronous=FULL` when `sync_full`.
    pub fn open_with(dir: &Path, sync_full: bool) -> Result<Store> {
        let path = dir.join(DB_FILE);
        if !path.exists() {
            return Err(StoreError::NoReplica {
                path: dir.display().to_string(),
            });
        }
        let conn = connect(&path, sync_full)?;
        Store::open_conn(conn, path)
    }

    fn open_conn(conn: Connection, path: PathBuf) -> Result<Store> {
        let identity = Identity {
            family: need_meta(&conn, "family")?,
            replica: need_meta(&conn, "replica")?,
            id_prefix: need_meta(&conn, "id_prefix")?,
            id_tag: need_meta(&conn, "id_tag")?,
            incarnation: meta_number(&conn, "incarnation")?,
        };
        Ok(Store {
            conn,
            identity,
            path,
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn levels(&self) -> Result<Levels> {
        let schema_version: u64 = self
            .conn
            .query_row(
                "SELECT COALESCE(MAX(version), 0) FROM schema_versions",
                [],
                |r| r.get(0),
            )
            .map_err(StoreError::sql("reading schema versions"))?;
        Ok(Levels {
            schema_repository: meta_number(&self.conn, "schema_repository_fl")?,
            user_database: meta_number(&self.conn, "user_database_fl")?,
            metaschema: meta_number(&self.conn, "metaschema")?,
            schema_version,
            user_database_schema_version: meta_number(&self.conn, "user_database_schema_version")?,
        })
    }

    fn transaction(&mut self, context: &'static str) -> Result<Transaction<'_>> {
        self.conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(StoreError::sql(context))
    }

    /// Records `ops` as this replica's next changes and applies them, in one transaction.
    fn commit_local(&mut self, ops: Vec<Operation>) -> Result<Vec<Change>> {
        self.commit_local_with(ops, &[], false)
    }

    /// [`Store::commit_local`], also writing `meta` entries in the same transaction;
    /// `leaving` lets a replica being removed still hand over mastership.
    fn commit_local_with(
        &mut self,
        ops: Vec<Operation>,
        meta: &[(&str, &str)],
        leaving: bool,
    ) -> Result<Vec<Change>> {
        let me = self.identity.replica.clone();
        let family = self.identity.family.clone();
        let tx = self.transaction("starting a local change")?;
        for (key, value) in meta {
            set_meta(&tx, key, value)?;
        }
        let active: Option<bool> = tx
            .query_row("SELECT active FROM peers WHERE name = ?1", [&me], |r| {
                r.get(0)
            })
            .optional()
            .map_err(StoreError::sql("reading membership"))?;
        if active == Some(false) && !leaving {
            return Err(StoreError::Invalid(format!(
                "replica {me} is being removed from family {family}: it makes no more changes"
            )));
        }
        if let Some(waiting) = get_meta(&tx, "restoring")? {
            // Members removed since the backup are not waited for.
            let still: Vec<&str> = waiting
                .split(',')
                .filter(|p| {
                    tx.query_row("SELECT active FROM peers WHERE name = ?1", [p], |r| {
                        r.get::<_, bool>(0)
                    })
                    .unwrap_or(false)
                })
                .collect();
            if !still.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "replica {me} was restored from a backup and makes no changes until every peer has re-sent what it lost (waiting for: {})",
                    still.join(", ")
                )));
            }
        }
        let mut seq = epoch_of(&tx, &me)?;
        let mut apply = Apply::start(&tx, &me)?;
        let mut changes = Vec::with_capacity(ops.len());
        for op in ops {
            seq += 1;
            let change = Change {
                origin: me.clone(),
                seq,
                op,
            };
            apply.change(&tx, &change, None)?;
            changes.push(change);
        }
        set_epoch(&tx, &me, seq)?;
        apply.finish(&tx)?;
        tx.commit()
            .map_err(StoreError::sql("committing a local change"))?;
        Ok(changes)
    }

    /// The record types of the user database's schema version.
    pub fn record_types(&self) -> Result<Vec<RecordTypeDef>> {
        let version = self.levels()?.user_database_schema_version;
        let text: Option<String> = self
            .conn
            .query_row(
                "SELECT record_types FROM schema_versions WHERE version = ?1",
                [version],
                |r| r.get(0),
            )
            .optional()
            .map_err(StoreError::sql("reading the schema"))?;
        match text {
            Some(t) => from_json(&t, "record types"),
            None => Ok(Vec::new()),
        }
    }

    /// Checks a record's fields against its type; returns the typed fields.
    fn check_record_fields(
        &self,
        record_type: &str,
        fields: &BTreeMap<String, FieldValue>,
    ) -> Result<()> {
        let types = self.record_types()?;
        let Some(def) = types.iter().find(|t| t.name == record_type) else {
            let known: Vec<&str> = types.iter().map(|t| t.name.as_str()).collect();
            return Err(StoreError::Invalid(format!(
                "record type {record_type:?} is not in the schema (known: {})",
                known.join(", ")
            )));
        };
        for (name, value) in fields {
            let Some(field) = def.fields.iter().find(|f| &f.name == name) else {
                let known: Vec<&str> = def.fields.iter().map(|f| f.name.as_str()).collect();
                return Err(StoreError::Invalid(format!(
                    "record type {record_type} has no field {name:?} (fields: {})",
                    known.join(", ")
                )));
            };
            let fits = matches!(
                (field.field_type.as_str(), value),
                ("String", FieldValue::String(_))
                    | ("Integer", FieldValue::Integer(_))
                    | ("Boolean", FieldValue::Boolean(_))
                    | ("Timestamp", FieldValue::Timestamp(_))
                    | ("Reference", FieldValue::Reference(_))
            );
            if !fits {
                return Err(StoreError::Invalid(format!(
                    "field {name} of {record_type} is of type {}",
                    field.field_type
                )));
            }
        }
        Ok(())
    }

    /// Parses `NAME=VALUE` text into the field's type for `record_type`.
    pub fn parse_field(&self, record_type: &str, name: &str, text: &str) -> Result<FieldValue> {
        let types = self.record_types()?;
        let field_type = types
            .iter()
            .find(|t| t.name == record_type)
            .and_then(|t| t.fields.iter().find(|f| f.name == name))
            .map(|f| f.field_type.clone())
            .ok_or_else(|| {
                StoreError::Invalid(format!("record type {record_type} has no field {name:?}"))
            })?;
        parse_typed(&field_type, name, text)
    }

    /// Creates an item mastered here.
    pub fn create_item(
        &mut self,
        kind: ItemKind,
        item_type: &str,
        fields: BTreeMap<String, FieldValue>,
        owner: Option<&str>,
    ) -> Result<ItemState> {
        if kind == ItemKind::Record {
            self.check_record_fields(item_type, &fields)?;
        }
        let levels = self.levels()?;
        let id = match kind {
            ItemKind::User => owner
                .ok_or_else(|| StoreError::Invalid("a user needs a name".into()))?
                .to_string(),
            _ => {
                let number: u64 = meta_number(&self.conn, "next_record_number")?;
                set_meta(&self.conn, "next_record_number", &(number + 1).to_string())?;
                format!(
                    "{}{:05}{}",
                    self.identity.id_prefix, number, self.identity.id_tag
                )
            }
        };
        // A user's name is its id: a deleted user comes back as a newer version, made
        // where its tombstone is mastered.
        let mut version = 1;
        if kind == ItemKind::User
            && let Some(existing) = self.get_item(kind, &id)?
        {
            if !existing.deleted {
                return Err(StoreError::Invalid(format!("user {id} already exists")));
            }
            if existing.master != self.identity.replica {
                return Err(StoreError::Invalid(format!(
                    "user {id} was deleted at replica {}; create it again there",
                    existing.master
                )));
            }
            version = existing.version + 1;
        }
        let item = ItemState {
            kind,
            id,
            item_type: item_type.to_string(),
            fields,
            master: self.identity.replica.clone(),
            version,
            deleted: false,
            owner: owner.map(str::to_string),
            schema_version: levels.user_database_schema_version,
        };
        self.commit_record_change(&item, "create")?;
        Ok(item)
    }

    pub fn get_item(&self, kind: ItemKind, id: &str) -> Result<Option<ItemState>> {
        get_item(&self.conn, kind, id)
    }

    fn existing(&self, kind: ItemKind, id: &str) -> Result<ItemState> {
        match self.get_item(kind, id)? {
            Some(item) if !item.deleted => Ok(item),
            _ => Err(StoreError::NotFound {
                kind,
                id: id.to_string(),
            }),
        }
    }

    fn view(item: &ItemState) -> ItemView {
        ItemView {
            id: item.id.clone(),
            kind: item.kind,
            master: Master::At(item.master.clone()),
            moves: item.version,
            creator: item.owner.clone(),
        }
    }

    /// Refuses `action` on `item` unless this replica may do it: it masters the item.
    /// (No route does a user's own task, the one kind that also needs the user's record
    /// mastered here.)
    fn check(&self, action: &Action, item: &ItemState) -> Result<()> {
        mastership::check(action, &Self::view(item), &self.identity.replica, None)?;
        Ok(())
    }

    /// Changes fields of an item mastered here (`None` removes a field).
    pub fn update_item(
        &mut self,
        kind: ItemKind,
        id: &str,
        changes: BTreeMap<String, Option<FieldValue>>,
    ) -> Result<ItemState> {
        self.change_item(kind, id, changes, ItemChange::default())
    }

    /// Changes fields of an item mastered here and, with `how.move_to`, moves its
    /// mastership to that replica in the same change (a user's record carries their
    /// workspace items along, as a move alone does).
    pub fn change_item(
        &mut self,
        kind: ItemKind,
        id: &str,
        changes: BTreeMap<String, Option<FieldValue>>,
        how: ItemChange<'_>,
    ) -> Result<ItemState> {
        let move_to = how.move_to;
        let mut item = self.existing(kind, id)?;
        let mut carried = Vec::new();
        match move_to {
            None => self.check(&Action::Modify, &item)?,
            Some(to) => {
                mastership::check_change_with_move(
                    &Action::Modify,
                    &Self::view(&item),
                    &self.identity.replica,
                    to,
                    None,
                )?;
                self.require_active_peer(to)?;
                if kind == ItemKind::User {
                    carried = self.carried_with_user(id)?;
                }
            }
        }
        for (name, value) in changes {
            match value {
                Some(v) => item.fields.insert(name, v),
                None => item.fields.remove(&name),
            };
        }
        if kind == ItemKind::Record {
            self.check_record_fields(&item.item_type, &item.fields)?;
        }
        if let Some(to) = move_to {
            item.master = to.to_string();
        }
        item.version += 1;
        item.schema_version = item
            .schema_version
            .max(self.levels()?.user_database_schema_version);
        let carried = carried
            .into_iter()
            .map(|mut workspace_item| {
                workspace_item.master = item.master.clone();
                workspace_item.version += 1;
                Operation::PutItem {
                    item: workspace_item,
                    forced_from: None,
                }
            })
            .collect();
        self.commit_record_change_with(&item, "modify", how.origin, carried)?;
        Ok(item)
    }

    /// Refuses a mastership move to `to` unless it is an active member of the family.
    fn require_active_peer(&self, to: &str) -> Result<()> {
        if self.peers()?.iter().any(|p| p.name == to && p.active) {
            Ok(())
        } else {
            Err(StoreError::Invalid(format!(
                "replica {to} is not an active member of family {}",
                self.identity.family
            )))
        }
    }

    /// The workspace items mastered here that move with user `user`'s record.
    fn carried_with_user(&self, user: &str) -> Result<Vec<ItemState>> {
        let me = self.identity.replica.clone();
        let items = self.query(ItemKind::WorkspaceItem, None, &[])?;
        let views: Vec<ItemView> = items.iter().map(Self::view).collect();
        let carried: Vec<String> = mastership::items_moving_with_user(user, &me, &views)
            .into_iter()
            .map(str::to_string)
            .collect();
        Ok(items
            .into_iter()
            .filter(|i| carried.contains(&i.id))
            .collect())
    }

    /// Deletes an item mastered here (a tombstone replicates).
    pub fn delete_item(&mut self, kind: ItemKind, id: &str) -> Result<ItemState> {
        let mut item = self.existing(kind, id)?;
        self.check(&Action::Delete, &item)?;
        item.version += 1;
        item.deleted = true;
        if item.item_type == CHANGE_EVENT_TYPE {
            // The gateway deletes the events it delivered; that is no record change.
            self.commit_local(vec![Operation::PutItem {
                item: item.clone(),
                forced_from: None,
            }])?;
        } else {
            self.commit_record_change(&item, "delete")?;
        }
        Ok(item)
    }

    /// Moves an item's mastership to `to`; a user's workspace items mastered here go with it.
    pub fn move_mastership(
        &mut self,
        kind: ItemKind,
        id: &str,
        to: &str,
    ) -> Result<Vec<ItemState>> {
        let item = self.existing(kind, id)?;
        let action = Action::MoveMastership { to: to.to_string() };
        // A workspace item moves with its owner or on an explicit request at its master.
        self.check(&action, &item)?;
        self.require_active_peer(to)?;
        let mut moved = vec![item];
        if kind == ItemKind::User {
            moved.extend(self.carried_with_user(id)?);
        }
        let ops = moved
            .iter_mut()
            .map(|item| {
                item.master = to.to_string();
                item.version += 1;
                Operation::PutItem {
                    item: item.clone(),
                    forced_from: None,
                }
            })
            .collect();
        self.commit_local(ops)?;
        Ok(moved)
    }

    /// A family-wide setting and its version.
    pub fn setting(&self, key: &str) -> Result<Option<(String, u64)>> {
        self.conn
            .query_row(
                "SELECT value, version FROM settings WHERE key = ?1",
                [key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(StoreError::sql("reading a setting"))
    }

    /// Sets a family-wide setting from this replica.
    pub fn set_setting(&mut self, key: &str, value: &str) -> Result<()> {
        let version = self.setting(key)?.map(|(_, v)| v).unwrap_or(0) + 1;
        self.commit_local(vec![Operation::Setting {
            setting: Setting {
                key: key.to_string(),
                value: value.to_string(),
                version,
            },
        }])?;
        Ok(())
    }

    /// The replica that masters the schema repository.
    pub fn schema_master(&self) -> Result<String> {
        Ok(self
            .setting(SCHEMA_MASTER)?
            .map(|(v, _)| v)
            .unwrap_or_default())
    }

    /// Applies a schema package at the replica that masters the schema repository:
    /// a new schema version holding every record type so far plus the package's
    /// (fields new to an existing type are added to it). Applying the same package
    /// and version again changes nothing. Returns the schema version.
    pub fn apply_schema_package(
        &mut self,
        package: &str,
        version: &str,
        record_types: &[RecordTypeDef],
    ) -> Result<SchemaVersion> {
        let master = self.schema_master()?;
        if master != self.identity.replica {
            return Err(StoreError::Invalid(format!(
                "the schema repository is mastered at replica {master}; apply the package there"
            )));
        }
        let label = format!("{package} {version}");
        let latest = self.levels()?.schema_version;
        let rows: Vec<(u64, Option<String>, String)> = {
            let mut stmt = self
                .conn
                .prepare(
                    "SELECT version, package, record_types FROM schema_versions ORDER BY version",
                )
                .map_err(StoreError::sql("reading schema versions"))?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(StoreError::sql("reading schema versions"))?
                .collect::<std::result::Result<_, _>>()
                .map_err(StoreError::sql("reading schema versions"))?
        };
        let mut types: Vec<RecordTypeDef> = Vec::new();
        for (v, pkg, text) in rows {
            if pkg.as_deref() == Some(label.as_str()) {
                return Ok(SchemaVersion {
                    version: v,
                    package: pkg,
                    record_types: from_json(&text, "record types")?,
                });
            }
            if v == latest {
                types = from_json(&text, "record types")?;
            }
        }
        for new in record_types {
            match types.iter_mut().find(|t| t.name == new.name) {
                Some(existing) => {
                    for field in &new.fields {
                        match existing.fields.iter().find(|f| f.name == field.name) {
                            Some(f) if f.field_type != field.field_type => {
                                return Err(StoreError::Invalid(format!(
                                    "package {label}: field {} of {} is {} in the schema, not {}",
                                    field.name, new.name, f.field_type, field.field_type
                                )));
                            }
                            Some(_) => {}
                            None => existing.fields.push(field.clone()),
                        }
                    }
                }
                None => types.push(new.clone()),
            }
        }
        self.add_schema_version(Some(label), types)
    }

    /// When the user database's schema has the interop package's change-event type:
    /// the change event to write with a change of record `id`, mastered by the
    /// gateway's replica wherever the change happened.
    fn change_event(
        &mut self,
        id: &str,
        action: &str,
        origin: Origin,
    ) -> Result<Option<Operation>> {
        let types = self.record_types()?;
        let Some(def) = types.iter().find(|t| t.name == CHANGE_EVENT_TYPE) else {
            return Ok(None);
        };
        let gateway = match self.setting(GATEWAY_REPLICA)? {
            Some((replica, _)) => replica,
            None => self.schema_master()?,
        };
        let mut fields = BTreeMap::new();
        let origin = match origin {
            Origin::Replica => "replica",
            Origin::Gateway => "gateway",
        };
        for (name, value) in [
            ("record", id),
            ("action", action),
            ("replica", self.identity.replica.as_str()),
            ("origin", origin),
        ] {
            if def
                .fields
                .iter()
                .any(|f| f.name == name && f.field_type == "String")
            {
                fields.insert(name.to_string(), FieldValue::String(value.to_string()));
            }
        }
        let number: u64 = meta_number(&self.conn, "next_record_number")?;
        set_meta(&self.conn, "next_record_number", &(number + 1).to_string())?;
        Ok(Some(Operation::PutItem {
            item: ItemState {
                kind: ItemKind::Record,
                id: format!(
                    "{}{:05}{}",
                    self.identity.id_prefix, number, self.identity.id_tag
                ),
                item_type: CHANGE_EVENT_TYPE.to_string(),
                fields,
                master: if gateway.is_empty() {
                    self.identity.replica.clone()
                } else {
                    gateway
                },
                version: 1,
                deleted: false,
                owner: None,
                schema_version: self.levels()?.user_database_schema_version,
            },
            forced_from: None,
        }))
    }

    /// Commits a record change, with its change event when the schema has them.
    fn commit_record_change(&mut self, item: &ItemState, action: &str) -> Result<()> {
        self.commit_record_change_with(item, action, Origin::Replica, Vec::new())
    }

    /// Commits a change of `item` (with its change event, saying where the change came
    /// from) and `more` in one change set.
    fn commit_record_change_with(
        &mut self,
        item: &ItemState,
        action: &str,
        origin: Origin,
        more: Vec<Operation>,
    ) -> Result<()> {
        let mut ops = vec![Operation::PutItem {
            item: item.clone(),
            forced_from: None,
        }];
        if item.kind == ItemKind::Record
            && item.item_type != CHANGE_EVENT_TYPE
            && let Some(event) = self.change_event(&item.id, action, origin)?
        {
            ops.push(event);
        }
        ops.extend(more);
        self.commit_local(ops)?;
        Ok(())
    }

    /// First step of removing this replica from its family: in one change set, the
    /// mastership of everything mastered here moves to `to`, and this replica records
    /// that it leaves. It makes no more changes; once every peer holds these
    /// changes (see [`Store::removal_pending`]) its data can be deleted.
    pub fn retire(&mut self, to: &str) -> Result<usize> {
        let me = self.identity.replica.clone();
        if to == me {
            return Err(StoreError::Invalid(format!(
                "replica {me} cannot hand its mastership to itself; name another active replica"
            )));
        }
        let peers = self.peers()?;
        // Run again after it left, it hands over what it was given meanwhile.
        let already_left = peers.iter().any(|p| p.name == me && !p.active);
        if !peers.iter().any(|p| p.name == to && p.active) {
            return Err(StoreError::Invalid(format!(
                "replica {to} is not an active member of family {}",
                self.identity.family
            )));
        }
        let mut ops = Vec::new();
        for kind in [ItemKind::User, ItemKind::WorkspaceItem, ItemKind::Record] {
            for mut item in self.query(kind, None, &[])? {
                if item.master != me {
                    continue;
                }
                item.master = to.to_string();
                item.version += 1;
                ops.push(Operation::PutItem {
                    item,
                    forced_from: None,
                });
            }
        }
        let moved = ops.len();
        for key in [SCHEMA_MASTER, GATEWAY_REPLICA] {
            if let Some((value, version)) = self.setting(key)?
                && value == me
            {
                ops.push(Operation::Setting {
                    setting: Setting {
                        key: key.to_string(),
                        value: to.to_string(),
                        version: version + 1,
                    },
                });
            }
        }
        let tag = peers
            .iter()
            .find(|p| p.name == me)
            .map(|p| p.id_tag.clone())
            .unwrap_or_default();
        if !already_left {
            ops.push(Operation::Membership {
                membership: Membership {
                    replica: me,
                    id_tag: tag,
                    active: false,
                },
            });
        }
        if !ops.is_empty() {
            self.commit_local_with(ops, &[], already_left)?;
        }
        Ok(moved)
    }

    /// Declares replica `name` gone for good (it cannot retire itself: its data is
    /// lost). Its items can then be taken over by force. Refused for this replica
    /// itself (use [`Store::retire`]).
    pub fn forget_member(&mut self, name: &str) -> Result<()> {
        let me = self.identity.replica.clone();
        if name == me {
            return Err(StoreError::Invalid(format!(
                "replica {me} cannot declare itself gone; remove it with `replica remove` instead"
            )));
        }
        let peers = self.peers()?;
        let Some(peer) = peers.iter().find(|p| p.name == name) else {
            return Err(StoreError::Invalid(format!(
                "{name} is not a member of family {}",
                self.identity.family
            )));
        };
        if !peer.active {
            return Ok(());
        }
        let mut ops = vec![Operation::Membership {
            membership: Membership {
                replica: name.to_string(),
                id_tag: peer.id_tag.clone(),
                active: false,
            },
        }];
        // What the lost replica held for the family (the schema repository, the
        // gateway pin) comes here, recorded like any change.
        for key in [SCHEMA_MASTER, GATEWAY_REPLICA] {
            if let Some((value, version)) = self.setting(key)?
                && value == name
            {
                ops.push(Operation::Setting {
                    setting: Setting {
                        key: key.to_string(),
                        value: me.clone(),
                        version: version + 1,
                    },
                });
            }
        }
        self.commit_local(ops)?;
        self.confirm_member(name)?;
        Ok(())
    }

    /// For a replica being removed: the active peers that have not yet acknowledged
    /// every change it made (empty once it can be deleted). `None` when it is not
    /// being removed.
    pub fn removal_pending(&self) -> Result<Option<Vec<String>>> {
        let me = &self.identity.replica;
        let peers = self.peers()?;
        if peers.iter().any(|p| &p.name == me && p.active) {
            return Ok(None);
        }
        let mine = self.epochs()?.get(me).copied().unwrap_or(0);
        let mut pending: Vec<String> = peers
            .iter()
            .filter(|p| p.active && &p.name != me)
            .filter(|p| p.acknowledged.get(me).copied().unwrap_or(0) < mine)
            .map(|p| p.name.clone())
            .collect();
        // Items that reached it after it left must be handed over too.
        let still: u64 = self.mastered_counts()?.values().sum();
        if still > 0 {
            pending.push(format!(
                "{still} item(s) still mastered here: run `replica remove` again"
            ));
        }
        Ok(Some(pending))
    }

    /// Takes mastership of an item from a replica that was removed from the family.
    pub fn take_over(&mut self, kind: ItemKind, id: &str, force: bool) -> Result<ItemState> {
        let mut item = self.existing(kind, id)?;
        let status = match self.peers()?.iter().find(|p| p.name == item.master) {
            Some(p) if !p.active => ReplicaStatus::Removed,
            _ => ReplicaStatus::Alive,
        };
        mastership::check(
            &Action::TakeOver {
                force,
                master_status: status,
            },
            &Self::view(&item),
            &self.identity.replica,
            None,
        )?;
        let from = std::mem::replace(&mut item.master, self.identity.replica.clone());
        item.version += 1;
        self.commit_local(vec![Operation::PutItem {
            item: item.clone(),
            forced_from: Some(from),
        }])?;
        Ok(item)
    }

    /// Items of `kind`, optionally of one type, whose fields equal every filter.
    /// Deleted items are left out.
    pub fn query(
        &self,
        kind: ItemKind,
        item_type: Option<&str>,
        filters: &[FieldFilter],
    ) -> Result<Vec<ItemState>> {
        let mut sql = String::from(
            "SELECT kind, id, item_type, fields, master, version, deleted, owner, schema_version FROM items WHERE kind = ?1 AND deleted = 0",
        );
        let mut args: Vec<String> = vec![kind_key(kind).to_string()];
        if let Some(t) = item_type {
            args.push(t.to_string());
            sql.push_str(&format!(" AND item_type = ?{}", args.len()));
        }
        for (name, value) in filters {
            let wanted = to_json(value)?;
            args.push(format!("$.\"{}\"", name.replace('"', "")));
            let path_arg = args.len();
            args.push(wanted);
            sql.push_str(&format!(
                " AND json(json_extract(fields, ?{path_arg})) = json(?{})",
                args.len()
            ));
        }
        sql.push_str(" ORDER BY id");
        let mut stmt = self
            .conn
            .prepare(&sql)
            .map_err(StoreError::sql("preparing a query"))?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args.iter()), row_text)
            .map_err(StoreError::sql("running a query"))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(item_from_row(
                row.map_err(StoreError::sql("reading a row"))?,
            )?);
        }
        Ok(out)
    }

    /// Every state an item has had at this replica, oldest first: the states it
    /// replaced, then the current one.
    pub fn history(&self, kind: ItemKind, id: &str) -> Result<Vec<HistoryEntry>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT kind, id, item_type, fields, master, version, deleted, owner, schema_version, origin, seq, forced_from
                 FROM history WHERE kind = ?1 AND id = ?2
                 UNION ALL
                 SELECT kind, id, item_type, fields, master, version, deleted, owner, schema_version, origin, seq, forced_from
                 FROM items WHERE kind = ?1 AND id = ?2
                 ORDER BY version",
            )
            .map_err(StoreError::sql("preparing history"))?;
        let rows = stmt
            .query_map(params![kind_key(kind), id], |r| {
                Ok((
                    row_text(r)?,
                    r.get::<_, String>(9)?,
                    r.get::<_, u64>(10)?,
                    r.get::<_, Option<String>>(11)?,
                ))
            })
            .map_err(StoreError::sql("reading history"))?;
        let mut out = Vec::new();
        for row in rows {
            let (text, origin, seq, forced_from) =
                row.map_err(StoreError::sql("reading history"))?;
            let state = item_from_row(text)?;
            out.push(HistoryEntry {
                version: state.version,
                origin,
                seq,
                state,
                forced_from,
            });
        }
        Ok(out)
    }

    /// This replica's row of the epoch table: changes held from each origin.
    pub fn epochs(&self) -> Result<BTreeMap<String, u64>> {
        let mut stmt = self
            .conn
            .prepare("SELECT origin, seq FROM epochs")
            .map_err(StoreError::sql("reading epochs"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))
            .map_err(StoreError::sql("reading epochs"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(StoreError::sql("reading epochs"))
    }

    /// The family's replicas as this replica knows them, itself included.
    pub fn peers(&self) -> Result<Vec<Peer>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT name, id_tag, active, incarnation,
                   EXISTS (SELECT 1 FROM meta WHERE key = 'pending_clone:' || name)
                 FROM peers ORDER BY name",
            )
            .map_err(StoreError::sql("reading peers"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Peer {
                    name: r.get(0)?,
                    id_tag: r.get(1)?,
                    active: r.get(2)?,
                    incarnation: r.get(3)?,
                    acknowledged: BTreeMap::new(),
                    pending_clone: r.get(4)?,
                })
            })
            .map_err(StoreError::sql("reading peers"))?;
        let mut peers: Vec<Peer> = rows
            .collect::<std::result::Result<_, _>>()
            .map_err(StoreError::sql("reading peers"))?;
        for peer in &mut peers {
            peer.acknowledged = self.acknowledged(&peer.name)?;
        }
        Ok(peers)
    }

    fn acknowledged(&self, peer: &str) -> Result<BTreeMap<String, u64>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT origin, seq FROM peer_epochs WHERE peer = ?1")
            .map_err(StoreError::sql("reading acknowledgements"))?;
        let rows = stmt
            .query_map([peer], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?))
            })
            .map_err(StoreError::sql("reading acknowledgements"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(StoreError::sql("reading acknowledgements"))
    }

    /// The changes `peer` lacks by what it last acknowledged, in this replica's log
    /// order, at most [`MAX_CHANGES_PER_PACKET`]. Errors when the log was trimmed
    /// past what the peer holds (it must then be re-created from a live replica).
    pub fn changes_for(&self, peer: &str) -> Result<Vec<Change>> {
        let acked = self.acknowledged(peer)?;
        let mut picked: Vec<(i64, String, u64, LogBody)> = Vec::new();
        for (origin, held) in self.epochs()? {
            let from = acked.get(&origin).copied().unwrap_or(0);
            if held <= from {
                continue;
            }
            let first: Option<u64> = self
                .conn
                .query_row(
                    "SELECT MIN(seq) FROM changes WHERE origin = ?1 AND seq > ?2",
                    params![origin, from],
                    |r| r.get(0),
                )
                .map_err(StoreError::sql("reading the change log"))?;
            if first != Some(from + 1) {
                return Err(StoreError::Invalid(format!(
                    "replica {peer} holds {from} changes from {origin}, but the change log here starts after that; re-create {peer} from a live replica"
                )));
            }
            let mut stmt = self
                .conn
                .prepare_cached(
                    "SELECT pos, seq, body, kind, id, version FROM changes WHERE origin = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                )
                .map_err(StoreError::sql("reading the change log"))?;
            let rows = stmt
                .query_map(params![origin, from, MAX_CHANGES_PER_PACKET as i64], |r| {
                    let body = match r.get::<_, Option<String>>(2)? {
                        Some(text) => LogBody::Text(text),
                        None => LogBody::Item(r.get(3)?, r.get(4)?, r.get(5)?),
                    };
                    Ok((
                        r.get::<_, i64>(0)?,
                        origin.clone(),
                        r.get::<_, u64>(1)?,
                        body,
                    ))
                })
                .map_err(StoreError::sql("reading the change log"))?;
            for row in rows {
                picked.push(row.map_err(StoreError::sql("reading the change log"))?);
            }
        }
        picked.sort_by_key(|(pos, ..)| *pos);
        // Keep a log-order prefix so that every origin's run stays contiguous.
        picked.truncate(MAX_CHANGES_PER_PACKET);
        picked
            .into_iter()
            .map(|(_, origin, seq, body)| match body {
                LogBody::Text(text) => from_json(&text, "a change"),
                LogBody::Item(kind, id, version) => {
                    self.item_change(origin, seq, &kind, &id, version)
                }
            })
            .collect()
    }

    /// Rebuilds an item change from the state it produced (in the items table or
    /// the history).
    fn item_change(
        &self,
        origin: String,
        seq: u64,
        kind: &str,
        id: &str,
        version: u64,
    ) -> Result<Change> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT kind, id, item_type, fields, master, version, deleted, owner, schema_version, forced_from
                 FROM items WHERE kind = ?1 AND id = ?2 AND version = ?3
                 UNION ALL
                 SELECT kind, id, item_type, fields, master, version, deleted, owner, schema_version, forced_from
                 FROM history WHERE kind = ?1 AND id = ?2 AND version = ?3",
            )
            .and_then(|mut s| {
                s.query_row(params![kind, id, version], |r| Ok((row_text(r)?, r.get::<_, Option<String>>(9)?)))
                    .optional()
            })
            .map_err(StoreError::sql("reading the change log"))?;
        let (text, forced_from) = row.ok_or_else(|| {
            StoreError::Corrupt(format!("change {seq} of {origin} refers to {kind} {id} version {version}, which is not stored"))
        })?;
        Ok(Change {
            origin,
            seq,
            op: Operation::PutItem {
                item: item_from_row(text)?,
                forced_from,
            },
        })
    }

    /// Records what `peer` reported it committed; trims the change log of what
    /// every active peer now holds.
    pub fn record_acknowledgement(
        &mut self,
        peer: &str,
        incarnation: u64,
        epochs: &BTreeMap<String, u64>,
    ) -> Result<()> {
        let me = self.identity.replica.clone();
        let tx = self.transaction("recording an acknowledgement")?;
        let known: Option<u64> = tx
            .query_row(
                "SELECT incarnation FROM peers WHERE name = ?1",
                [peer],
                |r| r.get(0),
            )
            .optional()
            .map_err(StoreError::sql("recording an acknowledgement"))?;
        if known.is_some_and(|k| incarnation < k) {
            // A report from before the peer's restore says nothing about it now.
            return Ok(());
        }
        tx.execute(
            "UPDATE peers SET incarnation = ?2 WHERE name = ?1",
            params![peer, incarnation],
        )
        .map_err(StoreError::sql("recording an acknowledgement"))?;
        tx.execute("DELETE FROM peer_epochs WHERE peer = ?1", [peer])
            .map_err(StoreError::sql("recording an acknowledgement"))?;
        for (origin, seq) in epochs {
            tx.execute(
                "INSERT INTO peer_epochs (peer, origin, seq) VALUES (?1, ?2, ?3)",
                params![peer, origin, seq],
            )
            .map_err(StoreError::sql("recording an acknowledgement"))?;
        }
        trim(&tx, &me)?;
        tx.commit()
            .map_err(StoreError::sql("recording an acknowledgement"))
    }

    /// Changes still in the change log (not yet acknowledged by every peer).
    pub fn change_log_len(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT COUNT(*) FROM changes", [], |r| r.get(0))
            .map_err(StoreError::sql("counting the change log"))
    }

    /// Imports changes from a packet in one transaction: already-held changes are
    /// skipped; each origin's changes apply in order; the import stops at the first
    /// change that would leave a gap or needs a schema version the user database
    /// lacks, and says why (the caller then holds the packet).
    pub fn import(&mut self, changes: &[Change]) -> Result<ImportOutcome> {
        self.import_texts(changes, None)
    }

    /// [`Store::import`], given each change's JSON text as received (`texts[i]` is
    /// `changes[i]`), which the change log then keeps as it is.
    pub fn import_texts(
        &mut self,
        changes: &[Change],
        texts: Option<&[String]>,
    ) -> Result<ImportOutcome> {
        if texts.is_some_and(|t| t.len() != changes.len()) {
            return Err(StoreError::Invalid(
                "each change needs its text".to_string(),
            ));
        }
        let udb_schema: u64 = meta_number(&self.conn, "user_database_schema_version")?;
        let prefix = self.identity.id_prefix.clone();
        let me = self.identity.replica.clone();
        let tx = self.transaction("starting an import")?;
        let mut highest_number = 0;
        let mut apply = Apply::start(&tx, &me)?;
        let mut outcome = ImportOutcome::default();
        let mut held: BTreeMap<String, u64> = BTreeMap::new();
        for (i, change) in changes.iter().enumerate() {
            let have = match held.get(&change.origin) {
                Some(seq) => *seq,
                None => epoch_of(&tx, &change.origin)?,
            };
            if change.seq <= have {
                outcome.skipped += 1;
                continue;
            }
            if change.seq > have + 1 {
                outcome.blocked = Some(format!(
                    "change {} of {} arrived before changes {}..{} of it (a gap); the packet is held until they arrive",
                    change.seq,
                    change.origin,
                    have + 1,
                    change.seq - 1
                ));
                break;
            }
            if let Operation::PutItem { item, .. } = &change.op
                && item.schema_version > udb_schema
            {
                outcome.blocked = Some(format!(
                    "{} {} needs schema version {} and the user database is at schema version {}; the packet is held until the user database is upgraded",
                    item.kind, item.id, item.schema_version, udb_schema
                ));
                break;
            }
            apply.change(
                &tx,
                change,
                texts.and_then(|t| t.get(i)).map(String::as_str),
            )?;
            if let Operation::PutItem { item, .. } = &change.op
                && item.kind != ItemKind::User
            {
                highest_number = highest_number.max(record_number(&prefix, &item.id));
            }
            held.insert(change.origin.clone(), change.seq);
            outcome.applied += 1;
        }
        for (origin, seq) in &held {
            set_epoch(&tx, origin, *seq)?;
        }
        apply.finish(&tx)?;
        // New ids follow the highest number seen anywhere, so that records from every
        // replica keep arriving at the end of the id order (cheap appends) while the
        // tag keeps them unique.
        let next: u64 = meta_number(&tx, "next_record_number")?;
        if highest_number >= next && highest_number < MAX_RECORD_NUMBER {
            set_meta(&tx, "next_record_number", &(highest_number + 1).to_string())?;
        }
        tx.commit()
            .map_err(StoreError::sql("committing an import"))?;
        Ok(outcome)
    }

    /// Keeps a packet until it can be imported.
    pub fn hold_packet(
        &mut self,
        sender: &str,
        packet_version: i32,
        reason: &str,
        bytes: &[u8],
    ) -> Result<i64> {
        self.conn
            .execute(
                "INSERT INTO held_packets (sender, packet_version, reason, received_at, bytes) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![sender, packet_version, reason, now_rfc3339(), bytes],
            )
            .map_err(StoreError::sql("holding a packet"))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Held packets without their bytes (for status reports).
    pub fn held_packet_list(&self) -> Result<Vec<HeldPacket>> {
        self.read_held(false)
    }

    /// Held packets with their bytes, oldest first.
    pub fn held_packets(&self) -> Result<Vec<HeldPacket>> {
        self.read_held(true)
    }

    fn read_held(&self, with_bytes: bool) -> Result<Vec<HeldPacket>> {
        // Without the bytes the column is an empty blob, so status reports stay small.
        let bytes = if with_bytes { "bytes" } else { "x''" };
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT id, sender, packet_version, reason, received_at, {bytes} FROM held_packets ORDER BY id"
            ))
            .map_err(StoreError::sql("reading held packets"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(HeldPacket {
                    id: r.get(0)?,
                    sender: r.get(1)?,
                    packet_version: r.get(2)?,
                    reason: r.get(3)?,
                    received_at: r.get(4)?,
                    bytes: r.get(5)?,
                })
            })
            .map_err(StoreError::sql("reading held packets"))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(StoreError::sql("reading held packets"))
    }

    /// Updates why a held packet waits.
    pub fn update_held_reason(&mut self, id: i64, reason: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE held_packets SET reason = ?2 WHERE id = ?1",
                params![id, reason],
            )
            .map(|_| ())
            .map_err(StoreError::sql("updating a held packet"))
    }

    /// Forgets a held packet once it was imported whole.
    pub fn release_held(&mut self, id: i64) -> Result<()> {
        self.conn
            .execute("DELETE FROM held_packets WHERE id = ?1", [id])
            .map(|_| ())
            .map_err(StoreError::sql("releasing a held packet"))
    }

    /// Raises the schema repository's feature level in place.
    pub fn set_schema_repository_level(&mut self, level: i32, metaschema: i32) -> Result<()> {
        let tx = self.transaction("raising the schema repository")?;
        set_meta(&tx, "schema_repository_fl", &level.to_string())?;
        set_meta(&tx, "metaschema", &metaschema.to_string())?;
        tx.commit()
            .map_err(StoreError::sql("raising the schema repository"))
    }

    /// Raises the user database's feature level in place.
    pub fn set_user_database_level(&mut self, level: i32) -> Result<()> {
        set_meta(&self.conn, "user_database_fl", &level.to_string())
    }

    /// Upgrades the user database to a schema version the repository holds.
    pub fn upgrade_user_database_schema(&mut self, version: u64) -> Result<()> {
        let levels = self.levels()?;
        if version <= levels.user_database_schema_version {
            return Err(StoreError::Invalid(format!(
                "the user database is already at schema version {}",
                levels.user_database_schema_version
            )));
        }
        if version > levels.schema_version {
            return Err(StoreError::Invalid(format!(
                "the schema repository holds schema versions up to {}; {version} has not arrived yet",
                levels.schema_version
            )));
        }
        set_meta(
            &self.conn,
            "user_database_schema_version",
            &version.to_string(),
        )
    }

    /// Adds a schema version at the replica that masters the schema repository.
    pub fn add_schema_version(
        &mut self,
        package: Option<String>,
        record_types: Vec<RecordTypeDef>,
    ) -> Result<SchemaVersion> {
        let version = self.levels()?.schema_version + 1;
        let schema = SchemaVersion {
            version,
            package,
            record_types,
        };
        self.commit_local(vec![Operation::AddSchemaVersion {
            schema: schema.clone(),
        }])?;
        Ok(schema)
    }

    /// Source side of creating a replica from this live one: registers `new_replica`
    /// as a member with the next id tag, writes a consistent copy of the database to
    /// `dest` (this replica stays readable and writable meanwhile), and records that
    /// the new replica holds what the copy holds. Returns the new replica's id tag.
    pub fn snapshot_for_clone(&mut self, new_replica: &str, dest: &Path) -> Result<String> {
        let pending_key = format!("pending_clone:{new_replica}");
        let tag = match get_meta(&self.conn, &pending_key)? {
            // A clone that failed after registering: make the copy again, same tag.
            Some(tag) => tag,
            None => {
                if self.peers()?.iter().any(|p| p.name == new_replica) {
                    return Err(StoreError::Invalid(format!(
                        "replica {new_replica} is or was already a member of family {}; a removed replica's name is not reused",
                        self.identity.family
                    )));
                }
                let index: u64 = meta_number(&self.conn, "next_child_tag")?;
                let tag = child_id_tag(&self.identity.id_tag, index);
                let next = (index + 1).to_string();
                self.commit_local_with(
                    vec![Operation::Membership {
                        membership: Membership {
                            replica: new_replica.to_string(),
                            id_tag: tag.clone(),
                            active: true,
                        },
                    }],
                    &[
                        ("next_child_tag", next.as_str()),
                        (pending_key.as_str(), tag.as_str()),
                    ],
                    false,
                )?;
                tag
            }
        };
        let dest_text = dest
            .to_str()
            .ok_or_else(|| StoreError::Invalid(format!("{} is not UTF-8", dest.display())))?;
        self.conn
            .execute("VACUUM INTO ?1", [dest_text])
            .map_err(StoreError::sql("copying the database"))?;
        let copy = Connection::open(dest).map_err(StoreError::sql("reading the copy"))?;
        let mut stmt = copy
            .prepare("SELECT origin, seq FROM epochs")
            .map_err(StoreError::sql("reading the copy"))?;
        let held: BTreeMap<String, u64> = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u64>(1)?)))
            .map_err(StoreError::sql("reading the copy"))?
            .collect::<std::result::Result<_, _>>()
            .map_err(StoreError::sql("reading the copy"))?;
        self.record_acknowledgement(new_replica, 1, &held)?;
        Ok(tag)
    }

    /// The new replica `name` answered for itself: a clone made for it can no longer
    /// be made again under that name.
    pub fn confirm_member(&mut self, name: &str) -> Result<()> {
        self.conn
            .execute(
                "DELETE FROM meta WHERE key = ?1",
                [format!("pending_clone:{name}")],
            )
            .map(|_| ())
            .map_err(StoreError::sql("confirming a member"))
    }

    /// Clone side: turns a copy made by [`Store::snapshot_for_clone`] of replica
    /// `source`, at `path`, into replica `name` with id tag `tag`. The caller moves
    /// the file into place afterwards, so a half-adopted copy is never a replica.
    pub fn adopt_clone(path: &Path, name: &str, tag: &str, source: &str) -> Result<Store> {
        let path = path.to_path_buf();
        let mut conn = connect(&path, false)?;
        let tx = conn
            .transaction()
            .map_err(StoreError::sql("adopting the copy"))?;
        let copied_from: String = need_meta(&tx, "replica")?;
        if copied_from != source {
            return Err(StoreError::Invalid(format!(
                "the copy is of replica {copied_from}, not {source}"
            )));
        }
        set_meta(&tx, "replica", name)?;
        set_meta(&tx, "id_tag", tag)?;
        set_meta(&tx, "incarnation", "1")?;
        // next_record_number stays the source's: new ids follow the highest number seen.
        set_meta(&tx, "next_child_tag", "0")?;
        // The source's pending clones are the source's to make again, not this copy's.
        tx.execute("DELETE FROM meta WHERE key LIKE 'pending_clone:%'", [])
            .map_err(StoreError::sql("adopting the copy"))?;
        tx.execute("DELETE FROM held_packets", [])
            .map_err(StoreError::sql("adopting the copy"))?;
        for kind in [ItemKind::Record, ItemKind::WorkspaceItem, ItemKind::User] {
            let n: i64 = tx
                .query_row(
                    "SELECT COUNT(*) FROM items WHERE kind = ?1 AND master = ?2 AND deleted = 0",
                    params![kind_key(kind), name],
                    |r| r.get(0),
                )
                .map_err(StoreError::sql("adopting the copy"))?;
            set_meta(&tx, &mastered_key(kind), &n.to_string())?;
        }
        // What the source holds is exactly what the copy holds; beliefs about the
        // other peers are the source's (lower bounds, so nothing is skipped).
        tx.execute("DELETE FROM peer_epochs WHERE peer = ?1", [name])
            .map_err(StoreError::sql("adopting the copy"))?;
        tx.execute("DELETE FROM peer_epochs WHERE peer = ?1", [source])
            .map_err(StoreError::sql("adopting the copy"))?;
        tx.execute(
            "INSERT INTO peer_epochs (peer, origin, seq) SELECT ?1, origin, seq FROM epochs",
            [source],
        )
        .map_err(StoreError::sql("adopting the copy"))?;
        tx.commit().map_err(StoreError::sql("adopting the copy"))?;
        Store::open_conn(conn, path)
    }

    /// Sets how long acknowledged changes stay in the log.
    pub fn set_log_retention(&mut self, seconds: u64) -> Result<()> {
        set_meta(&self.conn, "log_retention_seconds", &seconds.to_string())
    }

    /// Writes a consistent copy of the database to `dest` (a backup); this replica
    /// stays usable meanwhile.
    pub fn backup_to(&self, dest: &Path) -> Result<()> {
        let dest_text = dest
            .to_str()
            .ok_or_else(|| StoreError::Invalid(format!("{} is not UTF-8", dest.display())))?;
        self.conn
            .execute("VACUUM INTO ?1", [dest_text])
            .map(|_| ())
            .map_err(StoreError::sql("copying the database"))
    }

    /// Turns a backup copy at `path` into a restored replica: a new incarnation
    /// (packets made for the old one are refused), no held packets, and no local
    /// changes until every active peer has re-sent what the backup lacks (they send
    /// at least an empty packet to a restoring replica).
    pub fn restore_from(path: &Path) -> Result<Store> {
        let conn = connect(path, false)?;
        let old: u64 = meta_number(&conn, "incarnation")?;
        // Later than any incarnation this replica had, even after several restores.
        let incarnation = (old + 1).max(unix_now());
        let me = need_meta(&conn, "replica")?;
        let mut stmt = conn
            .prepare("SELECT name FROM peers WHERE active = 1 AND name != ?1 ORDER BY name")
            .map_err(StoreError::sql("reading peers"))?;
        let peers: Vec<String> = stmt
            .query_map([&me], |r| r.get(0))
            .map_err(StoreError::sql("reading peers"))?
            .collect::<std::result::Result<_, _>>()
            .map_err(StoreError::sql("reading peers"))?;
        drop(stmt);
        set_meta(&conn, "incarnation", &incarnation.to_string())?;
        conn.execute("DELETE FROM held_packets", [])
            .map_err(StoreError::sql("restoring"))?;
        if !peers.is_empty() {
            set_meta(&conn, "restoring", &peers.join(","))?;
        }
        Store::open_conn(conn, path.to_path_buf())
    }

    /// The incarnation this replica last knew `peer` at (0 when unknown).
    pub fn peer_incarnation(&self, peer: &str) -> Result<u64> {
        self.conn
            .query_row(
                "SELECT incarnation FROM peers WHERE name = ?1",
                [peer],
                |r| r.get(0),
            )
            .optional()
            .map(|v| v.unwrap_or(0))
            .map_err(StoreError::sql("reading a peer"))
    }

    /// Raises what this replica knows of `peer`'s incarnation (a packet from it said so).
    pub fn saw_peer_incarnation(&mut self, peer: &str, incarnation: u64) -> Result<()> {
        self.conn
            .execute(
                "UPDATE peers SET incarnation = ?2 WHERE name = ?1 AND incarnation < ?2",
                params![peer, incarnation],
            )
            .map(|_| ())
            .map_err(StoreError::sql("recording a peer's incarnation"))
    }

    /// Peers a restored replica still waits for; empty when it is not restoring.
    /// Members removed or declared gone since the backup are not waited for.
    pub fn restoring(&self) -> Result<Vec<String>> {
        let Some(waiting) = get_meta(&self.conn, "restoring")? else {
            return Ok(Vec::new());
        };
        let active: Vec<String> = self
            .peers()?
            .into_iter()
            .filter(|p| p.active)
            .map(|p| p.name)
            .collect();
        Ok(waiting
            .split(',')
            .filter(|p| active.iter().any(|a| a == p))
            .map(str::to_string)
            .collect())
    }

    /// A restored replica received a packet (possibly empty) from `peer` made for
    /// its current incarnation: `peer` has re-sent what it had.
    pub fn heard_after_restore(&mut self, peer: &str) -> Result<()> {
        let waiting = self.restoring()?;
        if waiting.is_empty() {
            return Ok(());
        }
        let rest: Vec<String> = waiting.into_iter().filter(|p| p != peer).collect();
        if rest.is_empty() {
            self.conn
                .execute("DELETE FROM meta WHERE key = 'restoring'", [])
                .map_err(StoreError::sql("finishing a restore"))?;
        } else {
            set_meta(&self.conn, "restoring", &rest.join(","))?;
        }
        Ok(())
    }

    /// Moves the write-ahead log into the database file (after bulk work, so that
    /// later commits do not pay for it).
    pub fn checkpoint(&self) -> Result<()> {
        self.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .map_err(StoreError::sql("checkpointing"))
    }

    /// Items mastered here, by kind (kept up to date by every change, so reading
    /// them costs nothing).
    pub fn mastered_counts(&self) -> Result<BTreeMap<ItemKind, u64>> {
        let mut out = BTreeMap::new();
        for kind in [ItemKind::Record, ItemKind::WorkspaceItem, ItemKind::User] {
            let n: i64 = meta_number(&self.conn, &mastered_key(kind))?;
            out.insert(kind, u64::try_from(n).unwrap_or(0));
        }
        Ok(out)
    }

    /// A digest of the replicated content: schema versions, members, and every
    /// item with its master and version. Replicas holding the same changes agree.
    pub fn digest(&self) -> Result<(String, u64)> {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut feed = |parts: &[&str]| {
            for part in parts {
                ctx.update(&(part.len() as u64).to_be_bytes());
                ctx.update(part.as_bytes());
            }
        };
        let mut stmt = self
            .conn
            .prepare("SELECT version, COALESCE(package, ''), record_types FROM schema_versions ORDER BY version")
            .map_err(StoreError::sql("digesting"))?;
        let mut rows = stmt.query([]).map_err(StoreError::sql("digesting"))?;
        while let Some(r) = rows.next().map_err(StoreError::sql("digesting"))? {
            let v: i64 = r.get(0).map_err(StoreError::sql("digesting"))?;
            let p: String = r.get(1).map_err(StoreError::sql("digesting"))?;
            let t: String = r.get(2).map_err(StoreError::sql("digesting"))?;
            feed(&["schema", &v.to_string(), &p, &t]);
        }
        let mut stmt = self
            .conn
            .prepare("SELECT key, value, version FROM settings ORDER BY key")
            .map_err(StoreError::sql("digesting"))?;
        let mut rows = stmt.query([]).map_err(StoreError::sql("digesting"))?;
        while let Some(r) = rows.next().map_err(StoreError::sql("digesting"))? {
            let k: String = r.get(0).map_err(StoreError::sql("digesting"))?;
            let v: String = r.get(1).map_err(StoreError::sql("digesting"))?;
            let n: i64 = r.get(2).map_err(StoreError::sql("digesting"))?;
            feed(&["setting", &k, &v, &n.to_string()]);
        }
        drop(rows);
        drop(stmt);
        let mut stmt = self
            .conn
            .prepare("SELECT name, id_tag, active FROM peers ORDER BY name")
            .map_err(StoreError::sql("digesting"))?;
        let mut rows = stmt.query([]).map_err(StoreError::sql("digesting"))?;
        while let Some(r) = rows.next().map_err(StoreError::sql("digesting"))? {
            let n: String = r.get(0).map_err(StoreError::sql("digesting"))?;
            let t: String = r.get(1).map_err(StoreError::sql("digesting"))?;
            let a: bool = r.get(2).map_err(StoreError::sql("digesting"))?;
            feed(&["member", &n, &t, if a { "1" } else { "0" }]);
        }
        let mut stmt = self
            .conn
            .prepare("SELECT kind, id, item_type, fields, master, version, deleted, owner, schema_version FROM items ORDER BY kind, id")
            .map_err(StoreError::sql("digesting"))?;
        let mut rows = stmt.query([]).map_err(StoreError::sql("digesting"))?;
        let mut count = 0u64;
        while let Some(r) = rows.next().map_err(StoreError::sql("digesting"))? {
            let t = row_text(r).map_err(StoreError::sql("digesting"))?;
            if t.6 == 0 {
                count += 1;
            }
            feed(&[
                "item",
                &t.0,
                &t.1,
                &t.2,
                &t.3,
                &t.4,
                &t.5.to_string(),
                &t.6.to_string(),
                t.7.as_deref().unwrap_or(""),
                &t.8.to_string(),
            ]);
        }
        let digest = ctx.finish();
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Ok((hex, count))
    }
}

/// What the change log holds for a change: its text, or where its item state is.
enum LogBody {
    Text(String),
    Item(String, String, u64),
}

type ItemRow = (
    String,
    String,
    String,
    String,
    String,
    u64,
    i64,
    Option<String>,
    u64,
);

fn row_text(r: &rusqlite::Row<'_>) -> rusqlite::Result<ItemRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
    ))
}

fn item_from_row(t: ItemRow) -> Result<ItemState> {
    let kind = match t.0.as_str() {
        "record" => ItemKind::Record,
        "workspace" => ItemKind::WorkspaceItem,
        "user" => ItemKind::User,
        other => return Err(StoreError::Corrupt(format!("unknown item kind {other}"))),
    };
    Ok(ItemState {
        kind,
        id: t.1,
        item_type: t.2,
        fields: from_json(&t.3, "item fields")?,
        master: t.4,
        version: t.5,
        deleted: t.6 != 0,
        owner: t.7,
        schema_version: t.8,
    })
}

fn get_item(conn: &Connection, kind: ItemKind, id: &str) -> Result<Option<ItemState>> {
    let row = conn
        .query_row(
            "SELECT kind, id, item_type, fields, master, version, deleted, owner, schema_version FROM items WHERE kind = ?1 AND id = ?2",
            params![kind_key(kind), id],
            row_text,
        )
        .optional()
        .map_err(StoreError::sql("reading an item"))?;
    row.map(item_from_row).transpose()
}

fn epoch_of(conn: &Connection, origin: &str) -> Result<u64> {
    conn.query_row("SELECT seq FROM epochs WHERE origin = ?1", [origin], |r| {
        r.get(0)
    })
    .optional()
    .map(|v| v.unwrap_or(0))
    .map_err(StoreError::sql("reading an epoch"))
}

fn set_epoch(conn: &Connection, origin: &str, seq: u64) -> Result<()> {
    conn.execute(
        "INSERT INTO epochs (origin, seq) VALUES (?1, ?2) ON CONFLICT(origin) DO UPDATE SET seq = excluded.seq",
        params![origin, seq],
    )
    .map(|_| ())
    .map_err(StoreError::sql("writing an epoch"))
}

fn mastered_key(kind: ItemKind) -> String {
    format!("mastered_{}", kind_key(kind))
}

/// Applies changes inside one transaction: log positions and the counts of items
/// mastered here are kept in memory and written once at the end.
struct Apply<'a> {
    me: &'a str,
    pos: u64,
    now: u64,
    mastered: BTreeMap<ItemKind, i64>,
}

impl<'a> Apply<'a> {
    fn start(tx: &Connection, me: &'a str) -> Result<Self> {
        let mut mastered = BTreeMap::new();
        for kind in [ItemKind::Record, ItemKind::WorkspaceItem, ItemKind::User] {
            mastered.insert(kind, meta_number(tx, &mastered_key(kind))?);
        }
        Ok(Apply {
            me,
            now: unix_now(),
            pos: meta_number(tx, "next_log_position")?,
            mastered,
        })
    }

    fn finish(self, tx: &Connection) -> Result<()> {
        set_meta(tx, "next_log_position", &self.pos.to_string())?;
        for (kind, n) in self.mastered {
            set_meta(tx, &mastered_key(kind), &n.to_string())?;
        }
        Ok(())
    }

    /// Appends `change` (with its JSON `text`, when known) to the change log and
    /// applies it. An item state older than the one held only goes to the log.
    fn change(&mut self, tx: &Connection, change: &Change, text: Option<&str>) -> Result<()> {
        let at = self.pos;
        self.pos += 1;
        let owned;
        let body = match text {
            Some(t) => t,
            None => {
                owned = to_json(change)?;
                owned.as_str()
            }
        };
        // An item change whose state is kept (current or in the history) is logged as a
        // pointer to that state; anything else keeps its text.
        let stored_state = match &change.op {
            Operation::PutItem { item, forced_from } => {
                self.put_item(tx, change, item, forced_from.as_deref())?
            }
            _ => false,
        };
        match (&change.op, stored_state) {
            (Operation::PutItem { item, .. }, true) => tx
                .prepare_cached(
                    "INSERT INTO changes (origin, seq, pos, logged_at, kind, id, version) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .and_then(|mut s| {
                    s.execute(params![change.origin, change.seq, at, self.now, kind_key(item.kind), item.id, item.version])
                }),
            _ => tx
                .prepare_cached(
                    "INSERT INTO changes (origin, seq, pos, logged_at, body) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .and_then(|mut s| s.execute(params![change.origin, change.seq, at, self.now, body])),
        }
        .map_err(StoreError::sql("appending to the change log"))?;
        match &change.op {
            Operation::PutItem { .. } => {}
            Operation::AddSchemaVersion { schema } => {
                tx.execute(
                    "INSERT OR IGNORE INTO schema_versions (version, package, record_types) VALUES (?1, ?2, ?3)",
                    params![schema.version, schema.package, to_json(&schema.record_types)?],
                )
                .map_err(StoreError::sql("adding a schema version"))?;
            }
            Operation::Setting { setting } => {
                tx.execute(
                    "INSERT INTO settings (key, value, version, origin) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value, version = excluded.version, origin = excluded.origin
                     WHERE excluded.version > settings.version
                        OR (excluded.version = settings.version AND excluded.origin > settings.origin)",
                    params![setting.key, setting.value, setting.version, change.origin],
                )
                .map_err(StoreError::sql("recording a setting"))?;
            }
            Operation::Membership { membership } => {
                tx.execute(
                    "INSERT INTO peers (name, id_tag, active) VALUES (?1, ?2, ?3)
                     ON CONFLICT(name) DO UPDATE SET id_tag = excluded.id_tag, active = excluded.active",
                    params![membership.replica, membership.id_tag, membership.active],
                )
                .map_err(StoreError::sql("recording a member"))?;
            }
        }
        Ok(())
    }

    fn put_item(
        &mut self,
        tx: &Connection,
        change: &Change,
        item: &ItemState,
        forced_from: Option<&str>,
    ) -> Result<bool> {
        let kind = kind_key(item.kind);
        let fields = to_json(&item.fields)?;
        let row = params![
            kind,
            item.id,
            item.item_type,
            fields,
            item.master,
            item.version,
            item.deleted,
            item.owner,
            item.schema_version,
            change.origin,
            change.seq,
            forced_from
        ];
        let mut tie = false;
        // Most changes create an item: try that first, in one statement.
        let created = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO items (kind, id, item_type, fields, master, version, deleted, owner, schema_version, origin, seq, forced_from)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )
            .and_then(|mut s| s.execute(row))
            .map_err(StoreError::sql("writing an item"))?;
        if created == 0 {
            let (master, deleted, version, origin): (String, bool, u64, String) = tx
                .prepare_cached(
                    "SELECT master, deleted, version, origin FROM items WHERE kind = ?1 AND id = ?2",
                )
                .and_then(|mut s| {
                    s.query_row(params![kind, item.id], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })
                })
                .map_err(StoreError::sql("reading an item"))?;
            // The newer state wins; two states of one version (made at two replicas at
            // once, which mastership should prevent) are settled by the origin's name,
            // the same way everywhere, so replicas still converge.
            if (version, origin.as_str()) >= (item.version, change.origin.as_str()) {
                return Ok(false);
            }
            tie = version == item.version;
            // The state being replaced moves to the history.
            tx.prepare_cached(
                "INSERT OR IGNORE INTO history (kind, id, version, item_type, fields, master, deleted, owner, schema_version, origin, seq, forced_from)
                 SELECT kind, id, version, item_type, fields, master, deleted, owner, schema_version, origin, seq, forced_from
                 FROM items WHERE kind = ?1 AND id = ?2",
            )
            .and_then(|mut s| s.execute(params![kind, item.id]))
            .map_err(StoreError::sql("writing history"))?;
            tx.prepare_cached(
                "REPLACE INTO items (kind, id, item_type, fields, master, version, deleted, owner, schema_version, origin, seq, forced_from)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )
            .and_then(|mut s| s.execute(row))
            .map_err(StoreError::sql("writing an item"))?;
            if master == self.me && !deleted {
                *self.mastered.entry(item.kind).or_default() -= 1;
            }
        }
        if item.master == self.me && !item.deleted {
            *self.mastered.entry(item.kind).or_default() += 1;
        }
        // A tie leaves two states under one version: log the text, not a pointer.
        Ok(!tie)
    }
}

/// Drops change-log entries every other active member has acknowledged.
/// Entries younger than the retention stay, so a restored replica can get back what
/// it lost.
fn trim(tx: &Connection, me: &str) -> Result<()> {
    let retention: u64 = meta_number(tx, "log_retention_seconds")?;
    let cutoff = unix_now().saturating_sub(retention);
    let mut stmt = tx
        .prepare("SELECT name FROM peers WHERE active = 1 AND name != ?1")
        .map_err(StoreError::sql("trimming"))?;
    let others: Vec<String> = stmt
        .query_map([me], |r| r.get(0))
        .map_err(StoreError::sql("trimming"))?
        .collect::<std::result::Result<_, _>>()
        .map_err(StoreError::sql("trimming"))?;
    if others.is_empty() {
        // Alone in the family: keep the log for a replica that may join.
        return Ok(());
    }
    let mut stmt = tx
        .prepare("SELECT origin FROM epochs")
        .map_err(StoreError::sql("trimming"))?;
    let origins: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .map_err(StoreError::sql("trimming"))?
        .collect::<std::result::Result<_, _>>()
        .map_err(StoreError::sql("trimming"))?;
    for origin in origins {
        let mut floor = u64::MAX;
        for peer in &others {
            let seq: u64 = tx
                .query_row(
                    "SELECT seq FROM peer_epochs WHERE peer = ?1 AND origin = ?2",
                    params![peer, origin],
                    |r| r.get(0),
                )
                .optional()
                .map_err(StoreError::sql("trimming"))?
                .unwrap_or(0);
            floor = floor.min(seq);
        }
        if floor == 0 {
            continue;
        }
        // Entries are logged in sequence order, so the first one still inside the
        // retention time ends what may go. Finding it costs what is deleted, not the
        // size of the log.
        let young: Option<u64> = tx
            .query_row(
                "SELECT seq FROM changes WHERE origin = ?1 AND seq <= ?2 AND logged_at > ?3 ORDER BY seq LIMIT 1",
                params![origin, floor, cutoff],
                |r| r.get(0),
            )
            .optional()
            .map_err(StoreError::sql("trimming"))?;
        let upto = young.map_or(floor, |seq| seq.saturating_sub(1));
        if upto > 0 {
            tx.execute(
                "DELETE FROM changes WHERE origin = ?1 AND seq <= ?2",
                params![origin, upto],
            )
            .map_err(StoreError::sql("trimming"))?;
        }
    }
    Ok(())
}

/// Parses a field value of a declared type from text.
pub fn parse_typed(field_type: &str, name: &str, text: &str) -> Result<FieldValue> {
    let bad = |what: &str| StoreError::Invalid(format!("field {name}: {text:?} is not {what}"));
    Ok(match field_type {
        "String" => FieldValue::String(text.to_string()),
        "Integer" => FieldValue::Integer(text.parse().map_err(|_| bad("an integer"))?),
        "Boolean" => FieldValue::Boolean(text.parse().map_err(|_| bad("true or false"))?),
        "Timestamp" => {
            text.parse::<k8s_openapi::jiff::Timestamp>()
                .map_err(|_| bad("an RFC 3339 timestamp"))?;
            FieldValue::Timestamp(text.to_string())
        }
        "Reference" => FieldValue::Reference(text.to_string()),
        other => {
            return Err(StoreError::Corrupt(format!(
                "field {name} has unknown type {other}"
            )));
        }
    })
}
