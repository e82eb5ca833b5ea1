//! What a packet carries: changes, each the whole new state of one thing, made by
//! one origin replica and numbered by it.
//!
//! Changes carry states, not edits: only an item's master changes it, each change
//! raises the item's version, and a replica keeps the highest version it has seen.
//! So applying a change twice, or an old one late, changes nothing.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One change as it travels between replicas.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Change {
    /// The replica where the change was made.
    pub origin: String,
    /// Its number among the origin's changes: 1, 2, 3, ... without gaps.
    pub seq: u64,
    pub op: Operation,
}

pub use crate::domain::mastership::ItemKind;

/// A typed field value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FieldValue {
    String(String),
    Integer(i64),
    Boolean(bool),
    /// RFC 3339.
    Timestamp(String),
    /// The id of another record.
    Reference(String),
}

/// The whole state of a record, workspace item or user after a change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ItemState {
    pub kind: ItemKind,
    pub id: String,
    /// Record type (`Defect`), workspace item kind (`query`, `report`, `chart`) or `user`.
    pub item_type: String,
    #[serde(default)]
    pub fields: BTreeMap<String, FieldValue>,
    /// The replica that masters the item after this change.
    pub master: String,
    /// Raised by every change of the item, mastership moves included.
    pub version: u64,
    /// A deleted item stays as a tombstone so that late changes cannot revive it.
    #[serde(default)]
    pub deleted: bool,
    /// The user who created a workspace item (its mastership moves with theirs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The schema version this state needs at the receiver's user database.
    #[serde(default)]
    pub schema_version: u64,
}

/// A record type in a schema version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RecordTypeDef {
    pub name: String,
    pub fields: Vec<FieldDef>,
}

/// A field of a record type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FieldDef {
    pub name: String,
    /// `String`, `Integer`, `Boolean`, `Timestamp` or `Reference`.
    #[serde(rename = "type")]
    pub field_type: String,
}

/// A schema version, made at the replica that masters the schema repository.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SchemaVersion {
    pub version: u64,
    /// The package that made this version, if any (`Interop 1.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
    /// Every record type of the schema at this version.
    pub record_types: Vec<RecordTypeDef>,
}

/// A replica joining or leaving the family.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Membership {
    pub replica: String,
    /// The letters that end the ids of records the replica creates (empty for the first replica).
    pub id_tag: String,
    /// `false` once the replica has been removed.
    pub active: bool,
}

/// What a change does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
// Externally tagged (`{"putItem": {...}}`): decoding needs no buffering, which
// keeps import fast.
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Operation {
    /// A record, workspace item or user takes this state.
    PutItem {
        item: ItemState,
        /// Set when the master took the item over by force from a removed replica.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        forced_from: Option<String>,
    },
    /// The schema repository gains a version.
    AddSchemaVersion { schema: SchemaVersion },
    /// A replica joins or leaves.
    Membership { membership: Membership },
    /// A family-wide setting takes a value (the newest version wins).
    Setting { setting: Setting },
}

/// A family-wide setting: which replica masters the schema repository, which one
/// the gateway is pinned to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Setting {
    pub key: String,
    pub value: String,
    /// Raised by every change of the setting; ties go to the larger origin name.
    pub version: u64,
}

/// Setting key: the replica that masters the schema repository.
pub const SCHEMA_MASTER: &str = "schemaRepositoryMaster";
/// Setting key: the replica the family's gateway is connected to.
pub const GATEWAY_REPLICA: &str = "gatewayReplica";
/// The record type the interop package adds: one record per change of a record.
pub const CHANGE_EVENT_TYPE: &str = "ChangeEvent";
