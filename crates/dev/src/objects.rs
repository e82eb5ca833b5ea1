//! The object store of the embedded API server: objects of any kind as JSON, with the
//! semantics Kubernetes gives them (resourceVersions, uids, generation, the status
//! subresource, finalizers, owner-reference garbage collection) and an event log that
//! list + watch are served from. Pure and synchronous: the HTTP layer calls it under a lock
//! and passes the time in, so behaviour is deterministic under test.

use super::names::{self, NameRule};
use super::selectors::Selectors;
use super::status::{Error, FieldError, GroupKind, GroupResource, OPTIMISTIC_LOCK_MESSAGE};
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::ops::Bound;

/// How many events the store keeps for watches and continued lists unless told otherwise.
pub const DEFAULT_EVENT_WINDOW: usize = 4096;

/// The real server retries a clashing generated name a few times before giving up.
const GENERATE_NAME_ATTEMPTS: usize = 8;

pub(super) type Object = Map<String, Value>;

/// A served resource: API group ("" for core), version and plural name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResourceKey {
    pub group: String,
    pub version: String,
    pub plural: String,
}

impl ResourceKey {
    pub fn new(group: &str, version: &str, plural: &str) -> Self {
        Self {
            group: group.to_string(),
            version: version.to_string(),
            plural: plural.to_string(),
        }
    }

    /// `v1` for the core group, `group/version` otherwise.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn group_resource(&self) -> GroupResource {
        GroupResource {
            group: self.group.clone(),
            resource: self.plural.clone(),
        }
    }
}

/// When `metadata.generation` is raised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum GenerationPolicy {
    /// The resource has no generation (config maps, secrets, leases, ...).
    #[default]
    None,
    /// On changes of `.spec` (apps resources).
    Spec,
    /// On changes of anything but metadata (and status, with a status subresource): custom
    /// resources.
    Content,
}

/// What the store needs to know of a resource to give its objects Kubernetes semantics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceInfo {
    pub kind: String,
    pub namespaced: bool,
    pub status_subresource: bool,
    pub generation: GenerationPolicy,
    pub name_rule: NameRule,
    /// Fields beyond `metadata.name` and `metadata.namespace` that field selectors accept.
    pub selectable_fields: Vec<String>,
}

impl ResourceInfo {
    /// A resource without status subresource, generation or extra selectable fields, whose
    /// names are RFC 1123 subdomains.
    pub fn new(kind: &str, namespaced: bool) -> Self {
        Self {
            kind: kind.to_string(),
            namespaced,
            status_subresource: false,
            generation: GenerationPolicy::None,
            name_rule: NameRule::Subdomain,
            selectable_fields: Vec::new(),
        }
    }

    pub fn with_status_subresource(mut self) -> Self {
        self.status_subresource = true;
        self
    }

    pub fn with_generation(mut self, generation: GenerationPolicy) -> Self {
        self.generation = generation;
        self
    }

    pub fn with_name_rule(mut self, rule: NameRule) -> Self {
        self.name_rule = rule;
        self
    }

    pub fn with_selectable_fields(mut self, fields: &[&str]) -> Self {
        self.selectable_fields = fields.iter().map(|f| f.to_string()).collect();
        self
    }
}

/// The type of a watch event, spelled as on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EventType {
    Added,
    Modified,
    Deleted,
    Bookmark,
    Error,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
            Self::Bookmark => "BOOKMARK",
            Self::Error => "ERROR",
        }
    }
}

/// One event of a watch.
#[derive(Clone, Debug, PartialEq)]
pub struct WatchEvent {
    pub event_type: EventType,
    pub object: Value,
}

impl WatchEvent {
    /// The event as a line of a watch response: `{"type":"ADDED","object":{...}}`.
    pub fn to_json(&self) -> Value {
        json!({"type": self.event_type.as_str(), "object": self.object})
    }

    /// The ERROR event a watch ends with when it fails (e.g. 410 Expired).
    pub fn error(error: &Error) -> Self {
        Self {
            event_type: EventType::Error,
            object: error.status_json(),
        }
    }

    pub fn resource_version(&self) -> u64 {
        resource_version_of(&self.object)
    }
}

/// The events a watch gets from one call, and the version to continue from.
#[derive(Clone, Debug, PartialEq)]
pub struct WatchBatch {
    pub events: Vec<WatchEvent>,
    /// Pass this to the next [`Store::watch_from`] to get the events that follow.
    pub resource_version: u64,
}

/// One page of a list.
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectList {
    pub items: Vec<Value>,
    pub resource_version: u64,
    /// Set when more objects follow; the opaque `metadata.continue`.
    pub continue_token: Option<String>,
    /// How many objects follow, given (as the real server does) only without selectors.
    pub remaining_item_count: Option<u64>,
}

impl ObjectList {
    /// The list as an API response: `{"apiVersion":...,"kind":"FooList","metadata":{...},"items":[...]}`.
    pub fn to_json(&self, api_version: &str, list_kind: &str) -> Value {
        let mut metadata = json!({"resourceVersion": self.resource_version.to_string()});
        if let Some(token) = &self.continue_token {
            metadata["continue"] = json!(token);
        }
        if let Some(count) = self.remaining_item_count {
            metadata["remainingItemCount"] = json!(count);
        }
        json!({
            "apiVersion": api_version,
            "kind": list_kind,
            "metadata": metadata,
            "items": self.items,
        })
    }
}

/// Options of create and update.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Do everything but store: the answer is what would have been stored.
    pub dry_run: bool,
}

/// `DeleteOptions.preconditions`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Preconditions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

/// Options of delete.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeleteOptions {
    pub preconditions: Preconditions,
    pub dry_run: bool,
}

/// Options of list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListOptions {
    pub selectors: Selectors,
    /// At most this many objects per page; `None` or 0 for all.
    pub limit: Option<u64>,
    /// The `metadata.continue` of the previous page.
    pub continue_token: Option<String>,
}

/// What a delete did.
#[derive(Clone, Debug, PartialEq)]
pub enum Deletion {
    /// The object is gone; this is its last state (with the delete's resourceVersion).
    Deleted(Value),
    /// The object has finalizers: it now has a `deletionTimestamp` and stays until they are
    /// removed.
    Finalizing(Value),
}

impl Deletion {
    pub fn object(&self) -> &Value {
        match self {
            Self::Deleted(o) | Self::Finalizing(o) => o,
        }
    }
}

/// An object the garbage collector deleted (or started deleting).
#[derive(Clone, Debug, PartialEq)]
pub struct Collected {
    pub resource: ResourceKey,
    pub namespace: String,
    pub name: String,
    pub deletion: Deletion,
}

/// One write as the event log keeps it: the object after the write and, for modifications
/// and deletions, before it (to filter watches by selector and rebuild older states).
#[derive(Clone, Debug)]
pub(super) struct Recorded {
    pub(super) resource_version: u64,
    pub(super) resource: ResourceKey,
    pub(super) key: String,
    pub(super) event_type: EventType,
    pub(super) object: Value,
    pub(super) previous: Option<Value>,
}

/// The objects of the embedded API server.
#[derive(Clone, Debug)]
pub struct Store {
    pub(super) resources: BTreeMap<ResourceKey, ResourceInfo>,
    /// Per resource, objects by `namespace/name` (or `name`), which sorts as etcd keys do.
    pub(super) objects: BTreeMap<ResourceKey, BTreeMap<String, Value>>,
    pub(super) resource_version: u64,
    /// One event per write, with consecutive resourceVersions.
    pub(super) events: VecDeque<Recorded>,
    pub(super) event_window: usize,
    /// Every event after this version is kept; older ones were dropped ("compacted").
    pub(super) compacted: u64,
    /// API groups whose objects live on another server (delegate mode): an owner of such
    /// a group is never looked for here, so its dependents are not collected.
    pub(super) foreign_owner_groups: Vec<String>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new(DEFAULT_EVENT_WINDOW)
    }
}

pub(super) fn storage_key(namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        name.to_string()
    } else {
        format!("{namespace}/{name}")
    }
}

/// The key of a name asked for, or `None` when no stored object can have it.
fn lookup_key(info: &ResourceInfo, namespace: &str, name: &str) -> Option<String> {
    let plausible = !name.is_empty()
        && !name.contains('/')
        && !namespace.contains('/')
        && info.namespaced != namespace.is_empty();
    plausible.then(|| storage_key(namespace, name))
}

pub(super) fn metadata_of(object: &Value) -> Option<&Object> {
    object.get("metadata")?.as_object()
}

pub(super) fn meta_text<'a>(object: &'a Value, field: &str) -> &'a str {
    metadata_of(object)
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn text<'a>(meta: &'a Object, field: &str) -> &'a str {
    meta.get(field).and_then(Value::as_str).unwrap_or("")
}

pub(super) fn resource_version_of(object: &Value) -> u64 {
    meta_text(object, "resourceVersion").parse().unwrap_or(0)
}

fn finalizers_of(meta: &Object) -> BTreeSet<String> {
    meta.get("finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn has_finalizers(object: &Value) -> bool {
    metadata_of(object).is_some_and(|m| !finalizers_of(m).is_empty())
}

fn owner_uids(object: &Value) -> Vec<&str> {
    metadata_of(object)
        .and_then(|m| m.get("ownerReferences"))
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default()
}

fn set_resource_version(object: &mut Value, resource_version: u64) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(
            "resourceVersion".into(),
            Value::String(resource_version.to_string()),
        );
    }
}

/// RFC 3339 at second precision, as `metav1.Time` is written.
pub(super) fn format_time(now: Timestamp) -> String {
    now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn truncate_to_second(now: Timestamp) -> Timestamp {
    Timestamp::from_second(now.as_second()).unwrap_or(now)
}

fn into_object(body: Value) -> Result<Object, Error> {
    match body {
        Value::Object(map) => Ok(map),
        _ => Err(Error::bad_request("the object must be a JSON object")),
    }
}

fn metadata_mut(object: &mut Object) -> Result<&mut Object, Error> {
    let entry = object
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if entry.is_null() {
        *entry = Value::Object(Map::new());
    }
    entry
        .as_object_mut()
        .ok_or_else(|| Error::bad_request("metadata must be an object"))
}

/// Fills in or checks `apiVersion` and `kind`: the store does not convert between kinds.
fn check_type(
    object: &mut Object,
    resource: &ResourceKey,
    info: &ResourceInfo,
) -> Result<(), Error> {
    let expected = [
        ("apiVersion", resource.api_version(), "API version"),
        ("kind", info.kind.clone(), "kind"),
    ];
    for (field, want, what) in expected {
        match object.get(field) {
            None | Some(Value::Null) => {
                object.insert(field.into(), Value::String(want));
            }
            Some(Value::String(have)) if *have == want => {}
            Some(have) => {
                let have = have
                    .as_str()
                    .map_or_else(|| have.to_string(), str::to_string);
                return Err(Error::bad_request(format!(
                    "the {what} in the data ({have}) does not match the expected {what} ({want})"
                )));
            }
        }
    }
    Ok(())
}

/// Checks the types of metadata fields and drops what Go's `omitempty` would drop (nulls,
/// empty strings, maps and lists), so stored objects look as the real server's do.
fn normalise_metadata(meta: &mut Object) -> Result<(), Error> {
    meta.retain(|_, v| !v.is_null());
    let wrong =
        |field: &str, what: &str| Error::bad_request(format!("metadata.{field} must be {what}"));
    for (field, value) in meta.iter() {
        let ok = match field.as_str() {
            "name" | "generateName" | "namespace" | "uid" | "resourceVersion"
            | "creationTimestamp" | "deletionTimestamp" | "selfLink" => value.is_string(),
            "generation" | "deletionGracePeriodSeconds" => value.is_i64(),
            "labels" | "annotations" => value
                .as_object()
                .is_some_and(|m| m.values().all(Value::is_string)),
            "finalizers" => value
                .as_array()
                .is_some_and(|a| a.iter().all(Value::is_string)),
            "ownerReferences" => value
                .as_array()
                .is_some_and(|a| a.iter().all(Value::is_object)),
            "managedFields" => value.is_array(),
            _ => true,
        };
        if !ok {
            let what = match field.as_str() {
                "generation" | "deletionGracePeriodSeconds" => "an integer",
                "labels" | "annotations" => "a map of strings",
                "finalizers" => "a list of strings",
                "ownerReferences" | "managedFields" => "a list of objects",
                _ => "a string",
            };
            return Err(wrong(field, what));
        }
    }
    meta.retain(|_, v| match v {
        Value::String(s) => !s.is_empty(),
        Value::Object(m) => !m.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => true,
    });
    Ok(())
}

/// The field errors of an object's metadata, as the real server's common validation finds them.
fn validate_metadata(meta: &Object, info: &ResourceInfo) -> Vec<FieldError> {
    let mut causes = Vec::new();
    let name = text(meta, "name");
    if name.is_empty() {
        causes.push(FieldError::required(
            "metadata.name",
            "name or generateName is required",
        ));
    } else {
        for reason in names::name_errors(info.name_rule, name) {
            causes.push(FieldError::invalid("metadata.name", json!(name), &reason));
        }
    }
    let namespace = text(meta, "namespace");
    if info.namespaced {
        if namespace.is_empty() {
            causes.push(FieldError::required("metadata.namespace", ""));
        } else {
            for reason in names::dns1123_label_errors(namespace) {
                causes.push(FieldError::invalid(
                    "metadata.namespace",
                    json!(namespace),
                    &reason,
                ));
            }
        }
    }
    if let Some(labels) = meta.get("labels").and_then(Value::as_object) {
        for (key, value) in labels {
            for reason in names::qualified_name_errors(key) {
                causes.push(FieldError::invalid("metadata.labels", json!(key), &reason));
            }
            for reason in names::label_value_errors(value.as_str().unwrap_or("")) {
                causes.push(FieldError::invalid(
                    "metadata.labels",
                    value.clone(),
                    &reason,
                ));
            }
        }
    }
    if let Some(annotations) = meta.get("annotations").and_then(Value::as_object) {
        for key in annotations.keys() {
            for reason in names::qualified_name_errors(key) {
                causes.push(FieldError::invalid(
                    "metadata.annotations",
                    json!(key),
                    &reason,
                ));
            }
        }
    }
    if let Some(refs) = meta.get("ownerReferences").and_then(Value::as_array) {
        let mut controllers = 0;
        for reference in refs {
            for (field, what) in [
                ("apiVersion", "version"),
                ("kind", "kind"),
                ("name", "name"),
                ("uid", "uid"),
            ] {
                let value = reference.get(field).and_then(Value::as_str).unwrap_or("");
                if value.is_empty() {
                    causes.push(FieldError::invalid(
                        &format!("metadata.ownerReferences.{field}"),
                        json!(value),
                        &format!("{what} must not be empty"),
                    ));
                }
            }
            if reference.get("controller") == Some(&Value::Bool(true)) {
                controllers += 1;
            }
        }
        if controllers > 1 {
            causes.push(FieldError::invalid(
                "metadata.ownerReferences",
                Value::Array(refs.clone()),
                "Only one reference can have Controller set to true",
            ));
        }
    }
    causes
}

/// The part of an object whose change raises its generation, per the resource's policy.
fn generation_content(object: &Object, info: &ResourceInfo) -> Value {
    match info.generation {
        GenerationPolicy::None => Value::Null,
        GenerationPolicy::Spec => object.get("spec").cloned().unwrap_or(Value::Null),
        GenerationPolicy::Content => {
            let mut content = object.clone();
            for field in ["metadata", "apiVersion", "kind"] {
                content.remove(field);
            }
            if info.status_subresource {
                content.remove("status");
            }
            Value::Object(content)
        }
    }
}

fn optimistic_lock(resource: &ResourceKey, name: &str, detail: String) -> Error {
    Error::Conflict {
        resource: resource.group_resource(),
        name: name.to_string(),
        detail,
    }
}

impl Store {
    /// An empty store keeping the last `event_window` events.
    pub fn new(event_window: usize) -> Self {
        Self {
            resources: BTreeMap::new(),
            objects: BTreeMap::new(),
            resource_version: 0,
            events: VecDeque::new(),
            event_window,
            compacted: 0,
            foreign_owner_groups: Vec::new(),
        }
    }

    /// Owners whose `apiVersion` is of one of `groups` live elsewhere: the garbage
    /// collector keeps every object that has such an owner.
    pub fn set_foreign_owner_groups(&mut self, groups: &[&str]) {
        self.foreign_owner_groups = groups.iter().map(|g| g.to_string()).collect();
    }

    /// Whether `object` has an owner of a group served elsewhere.
    fn owned_from_elsewhere(&self, object: &Value) -> bool {
        if self.foreign_owner_groups.is_empty() {
            return false;
        }
        metadata_of(object)
            .and_then(|m| m.get("ownerReferences"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|r| r.get("apiVersion").and_then(Value::as_str))
            .filter_map(|api_version| api_version.split_once('/').map(|(group, _)| group))
            .any(|group| self.foreign_owner_groups.iter().any(|g| g == group))
    }

    /// Serves `resource` (again, with new facts, if it already was).
    pub fn register(&mut self, resource: ResourceKey, info: ResourceInfo) {
        self.resources.insert(resource, info);
    }

    /// Stops serving `resource` and deletes its objects (each a DELETED event, finalizers
    /// notwithstanding); returns their last states.
    pub fn unregister(&mut self, resource: &ResourceKey) -> Vec<Value> {
        let keys: Vec<String> = self
            .objects
            .get(resource)
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        let removed = keys
            .iter()
            .filter_map(|key| self.remove_object(resource, key))
            .collect();
        self.objects.remove(resource);
        self.resources.remove(resource);
        removed
    }

    pub fn resource_info(&self, resource: &ResourceKey) -> Option<&ResourceInfo> {
        self.resources.get(resource)
    }

    /// Every served resource, for discovery.
    pub fn resources(&self) -> impl Iterator<Item = (&ResourceKey, &ResourceInfo)> {
        self.resources.iter()
    }

    /// The current resourceVersion: raised by every write. A watcher waiting for news polls
    /// this and calls [`Store::watch_from`] when it moves.
    pub fn resource_version(&self) -> u64 {
        self.resource_version
    }

    /// The oldest version a watch or a continue token may start from; older ones get 410.
    pub fn oldest_resource_version(&self) -> u64 {
        self.compacted
    }

    pub(super) fn info(&self, resource: &ResourceKey) -> Result<&ResourceInfo, Error> {
        self.resources.get(resource).ok_or(Error::ResourceNotFound)
    }

    /// Cluster-scoped resources have no namespaced URLs.
    pub(super) fn check_scope(info: &ResourceInfo, namespace: &str) -> Result<(), Error> {
        if !info.namespaced && !namespace.is_empty() {
            return Err(Error::ResourceNotFound);
        }
        Ok(())
    }

    fn not_found(resource: &ResourceKey, name: &str) -> Error {
        Error::NotFound {
            resource: resource.group_resource(),
            name: name.to_string(),
        }
    }

    fn stored(&self, resource: &ResourceKey, key: &str) -> Option<&Value> {
        self.objects.get(resource)?.get(key)
    }

    fn next_resource_version(&mut self) -> u64 {
        self.resource_version += 1;
        self.resource_version
    }

    fn record(&mut self, event: Recorded) {
        self.events.push_back(event);
        while self.events.len() > self.event_window {
            if let Some(dropped) = self.events.pop_front() {
                self.compacted = dropped.resource_version;
            }
        }
    }

    fn insert_object(&mut self, resource: &ResourceKey, key: String, mut object: Value) -> Value {
        let resource_version = self.next_resource_version();
        set_resource_version(&mut object, resource_version);
        self.objects
            .entry(resource.clone())
            .or_default()
            .insert(key.clone(), object.clone());
        self.record(Recorded {
            resource_version,
            resource: resource.clone(),
            key,
            event_type: EventType::Added,
            object: object.clone(),
            previous: None,
        });
        object
    }

    fn replace_object(
        &mut self,
        resource: &ResourceKey,
        key: String,
        mut object: Value,
        previous: Value,
    ) -> Value {
        let resource_version = self.next_resource_version();
        set_resource_version(&mut object, resource_version);
        self.objects
            .entry(resource.clone())
            .or_default()
            .insert(key.clone(), object.clone());
        self.record(Recorded {
            resource_version,
            resource: resource.clone(),
            key,
            event_type: EventType::Modified,
            object: object.clone(),
            previous: Some(previous),
        });
        object
    }

    /// Removes an object; its last state, stamped with the delete's resourceVersion as the
    /// real server stamps DELETED events, is returned and logged.
    fn remove_object(&mut self, resource: &ResourceKey, key: &str) -> Option<Value> {
        let previous = self.objects.get_mut(resource)?.remove(key)?;
        let resource_version = self.next_resource_version();
        let mut object = previous.clone();
        set_resource_version(&mut object, resource_version);
        self.record(Recorded {
            resource_version,
            resource: resource.clone(),
            key: key.to_string(),
            event_type: EventType::Deleted,
            object: object.clone(),
            previous: Some(previous),
        });
        Some(object)
    }

    /// Creates an object in `namespace` ("" for cluster-scoped resources).
    ///
    /// Sets uid, creationTimestamp (from `now`), resourceVersion, generation (1, where the
    /// resource has one), the name from `metadata.generateName` when no name is given, and
    /// drops `.status` where a status subresource owns it.
    pub fn create(
        &mut self,
        resource: &ResourceKey,
        namespace: &str,
        body: Value,
        options: &WriteOptions,
        now: Timestamp,
    ) -> Result<Value, Error> {
        let info = self.info(resource)?.clone();
        Self::check_scope(&info, namespace)?;
        let mut object = into_object(body)?;
        check_type(&mut object, resource, &info)?;
        let meta = metadata_mut(&mut object)?;
        normalise_metadata(meta)?;
        if meta.contains_key("resourceVersion") {
            return Err(Error::ResourceVersionOnCreate);
        }
        // The request's namespace wins over an empty one in the object and must match a set one.
        settle_namespace(meta, info.namespaced && !namespace.is_empty(), namespace)?;
        meta.insert("uid".into(), json!(names::new_uid()?));
        meta.insert("creationTimestamp".into(), json!(format_time(now)));
        for field in [
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
        ] {
            meta.remove(field);
        }
        if info.generation == GenerationPolicy::None {
            meta.remove("generation");
        } else {
            meta.insert("generation".into(), json!(1));
        }
        let generate_name = text(meta, "generateName").to_string();
        let mut name = text(meta, "name").to_string();
        if name.is_empty() && !generate_name.is_empty() {
            for _ in 0..GENERATE_NAME_ATTEMPTS {
                name = names::generate_name(&generate_name)?;
                let taken = self
                    .stored(resource, &storage_key(namespace, &name))
                    .is_some();
                if !taken {
                    break;
                }
            }
            meta.insert("name".into(), json!(name));
        }
        let causes = validate_metadata(meta, &info);
        if info.status_subresource {
            object.remove("status");
        }
        if !causes.is_empty() {
            return Err(Error::Invalid {
                kind: GroupKind {
                    group: resource.group.clone(),
                    kind: info.kind.clone(),
                },
                name,
                causes,
            });
        }
        let key = storage_key(if info.namespaced { namespace } else { "" }, &name);
        if let Some(existing) = self.stored(resource, &key) {
            return Err(Error::AlreadyExists {
                resource: resource.group_resource(),
                name,
                being_deleted: !meta_text(existing, "deletionTimestamp").is_empty(),
            });
        }
        let object = Value::Object(object);
        if options.dry_run {
            return Ok(object);
        }
        Ok(self.insert_object(resource, key, object))
    }

    /// The object named `name` in `namespace`.
    pub fn get(&self, resource: &ResourceKey, namespace: &str, name: &str) -> Result<Value, Error> {
        let info = self.info(resource)?;
        Self::check_scope(info, namespace)?;
        lookup_key(info, namespace, name)
            .and_then(|key| self.stored(resource, &key))
            .cloned()
            .ok_or_else(|| Self::not_found(resource, name))
    }

    /// Replaces an object (PUT). The given `metadata.resourceVersion`, if any, must be the
    /// current one; uid, creationTimestamp, deletion fields and generation are the server's;
    /// `.status` is kept where a status subresource owns it. An update that empties the
    /// finalizers of an object being deleted deletes it.
    pub fn update(
        &mut self,
        resource: &ResourceKey,
        namespace: &str,
        name: &str,
        body: Value,
        options: &WriteOptions,
    ) -> Result<Value, Error> {
        self.replace(resource, namespace, name, body, options, false)
    }

    /// Replaces only `.status` (PUT on the status subresource); the rest is kept as stored.
    pub fn update_status(
        &mut self,
        resource: &ResourceKey,
        namespace: &str,
        name: &str,
        body: Value,
        options: &WriteOptions,
    ) -> Result<Value, Error> {
        self.replace(resource, namespace, name, body, options, true)
    }

    fn replace(
        &mut self,
        resource: &ResourceKey,
        namespace: &str,
        name: &str,
        body: Value,
        options: &WriteOptions,
        status_only: bool,
    ) -> Result<Value, Error> {
        let info = self.info(resource)?.clone();
        Self::check_scope(&info, namespace)?;
        if status_only && !info.status_subresource {
            return Err(Error::ResourceNotFound);
        }
        let key =
            lookup_key(&info, namespace, name).ok_or_else(|| Self::not_found(resource, name))?;
        let existing = self
            .stored(resource, &key)
            .cloned()
            .ok_or_else(|| Self::not_found(resource, name))?;
        let existing_meta = metadata_of(&existing).cloned().unwrap_or_default();

        let mut body = into_object(body)?;
        check_type(&mut body, resource, &info)?;
        let meta = metadata_mut(&mut body)?;
        normalise_metadata(meta)?;
        match text(meta, "name") {
            "" => {
                meta.insert("name".into(), json!(name));
            }
            given if given != name => {
                return Err(Error::bad_request(format!(
                    "the name of the object ({given}) does not match the name on the URL ({name})"
                )));
            }
            _ => {}
        }
        settle_namespace(meta, info.namespaced, namespace)?;
        let existing_uid = text(&existing_meta, "uid");
        let given_uid = text(meta, "uid");
        if !given_uid.is_empty() && given_uid != existing_uid {
            return Err(optimistic_lock(
                resource,
                name,
                format!(
                    "Precondition failed: UID in precondition: {given_uid}, UID in object meta: {existing_uid}"
                ),
            ));
        }
        let existing_version = text(&existing_meta, "resourceVersion");
        let given_version = text(meta, "resourceVersion");
        // "0", like no version at all, asks for an unconditional update.
        let conditional = !given_version.is_empty() && given_version != "0";
        if conditional && given_version != existing_version {
            if given_version.parse::<u64>().is_err() {
                return Err(Error::bad_request(format!(
                    "invalid resourceVersion \"{given_version}\""
                )));
            }
            return Err(optimistic_lock(
                resource,
                name,
                OPTIMISTIC_LOCK_MESSAGE.to_string(),
            ));
        }

        let existing_object = existing.as_object().cloned().unwrap_or_default();
        let mut candidate = if status_only {
            let mut candidate = existing_object;
            match body.remove("status") {
                Some(status) => candidate.insert("status".into(), status),
                None => candidate.remove("status"),
            };
            // The field manager records status writes too, so the caller's managedFields stand.
            let managed = metadata_of(&Value::Object(body))
                .and_then(|m| m.get("managedFields"))
                .cloned();
            if let (Some(managed), Some(meta)) = (
                managed,
                candidate.get_mut("metadata").and_then(Value::as_object_mut),
            ) {
                meta.insert("managedFields".into(), managed);
            }
            candidate
        } else {
            self.prepare_update(resource, &info, body, &existing_object, &existing_meta)?
        };
        if let Some(meta) = candidate.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), json!(existing_version));
        }
        let candidate = Value::Object(candidate);
        // Like etcd, an update that changes nothing writes nothing.
        if candidate == existing {
            return Ok(existing);
        }
        let deleting = existing_meta.contains_key("deletionTimestamp");
        if !status_only && deleting && !has_finalizers(&candidate) {
            if !options.dry_run {
                self.remove_object(resource, &key);
            }
            return Ok(candidate);
        }
        if options.dry_run {
            return Ok(candidate);
        }
        Ok(self.replace_object(resource, key, candidate, existing))
    }

    /// The object a main-resource update stores: the body with the server's metadata kept,
    /// validated, its generation raised when its content changed.
    fn prepare_update(
        &self,
        resource: &ResourceKey,
        info: &ResourceInfo,
        mut candidate: Object,
        existing: &Object,
        existing_meta: &Object,
    ) -> Result<Object, Error> {
        if info.status_subresource {
            match existing.get("status") {
                Some(status) => candidate.insert("status".into(), status.clone()),
                None => candidate.remove("status"),
            };
        }
        let content_changed =
            generation_content(&candidate, info) != generation_content(existing, info);
        let meta = metadata_mut(&mut candidate)?;
        for field in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ] {
            match existing_meta.get(field) {
                Some(value) => meta.insert(field.into(), value.clone()),
                None => meta.remove(field),
            };
        }
        let mut causes = validate_metadata(meta, info);
        if existing_meta.contains_key("deletionTimestamp") {
            let before = finalizers_of(existing_meta);
            let added: Vec<String> = finalizers_of(meta).difference(&before).cloned().collect();
            if !added.is_empty() {
                let quoted: Vec<String> = added.iter().map(|f| format!("{f:?}")).collect();
                causes.push(FieldError::forbidden(
                    "metadata.finalizers",
                    &format!(
                        "no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}",
                        quoted.join(", ")
                    ),
                ));
            }
        }
        if !causes.is_empty() {
            return Err(Error::Invalid {
                kind: GroupKind {
                    group: resource.group.clone(),
                    kind: info.kind.clone(),
                },
                name: text(meta, "name").to_string(),
                causes,
            });
        }
        if let Some(generation) = meta.get("generation").and_then(Value::as_i64)
            && content_changed
        {
            meta.insert("generation".into(), json!(generation + 1));
        }
        Ok(candidate)
    }

    /// Deletes an object: at once without finalizers; with finalizers, by setting
    /// `deletionTimestamp` (and `deletionGracePeriodSeconds: 0`) and leaving it until they
    /// are removed. Dependents are left to [`Store::collect_garbage`] (background policy).
    pub fn delete(
        &mut self,
        resource: &ResourceKey,
        namespace: &str,
        name: &str,
        options: &DeleteOptions,
        now: Timestamp,
    ) -> Result<Deletion, Error> {
        let info = self.info(resource)?.clone();
        Self::check_scope(&info, namespace)?;
        let key =
            lookup_key(&info, namespace, name).ok_or_else(|| Self::not_found(resource, name))?;
        let existing = self
            .stored(resource, &key)
            .cloned()
            .ok_or_else(|| Self::not_found(resource, name))?;
        let preconditions = &options.preconditions;
        if let Some(uid) = &preconditions.uid {
            let have = meta_text(&existing, "uid");
            if uid != have {
                return Err(optimistic_lock(
                    resource,
                    name,
                    format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {have}"
                    ),
                ));
            }
        }
        if let Some(version) = &preconditions.resource_version {
            let have = meta_text(&existing, "resourceVersion");
            if version != have {
                return Err(optimistic_lock(
                    resource,
                    name,
                    format!(
                        "Precondition failed: ResourceVersion in precondition: {version}, ResourceVersion in object meta: {have}"
                    ),
                ));
            }
        }
        if !has_finalizers(&existing) {
            if options.dry_run {
                return Ok(Deletion::Deleted(existing));
            }
            let gone = self.remove_object(resource, &key).unwrap_or(existing);
            return Ok(Deletion::Deleted(gone));
        }
        let mut marked = existing.clone();
        if let Some(meta) = marked.get_mut("metadata").and_then(Value::as_object_mut) {
            mark_deleting(meta, now);
        }
        if marked == existing || options.dry_run {
            return Ok(Deletion::Finalizing(marked));
        }
        Ok(Deletion::Finalizing(
            self.replace_object(resource, key, marked, existing),
        ))
    }

    /// Deletes, as a normal delete (finalizers still hold), every object whose owner
    /// references all name uids that no longer exist, until no such object is left; returns
    /// what it deleted or started deleting. An object with an owner of a group served
    /// elsewhere ([`Store::set_foreign_owner_groups`]) is kept.
    pub fn collect_garbage(&mut self, now: Timestamp) -> Vec<Collected> {
        let mut collected = Vec::new();
        loop {
            let live: HashSet<String> = self
                .objects
                .values()
                .flat_map(|objects| objects.values())
                .map(|o| meta_text(o, "uid").to_string())
                .collect();
            let mut orphans = Vec::new();
            for (resource, objects) in &self.objects {
                for object in objects.values() {
                    let owners = owner_uids(object);
                    let orphaned = !owners.is_empty()
                        && owners.iter().all(|uid| !live.contains(*uid))
                        && meta_text(object, "deletionTimestamp").is_empty()
                        && !self.owned_from_elsewhere(object);
                    if orphaned {
                        orphans.push((
                            resource.clone(),
                            meta_text(object, "namespace").to_string(),
                            meta_text(object, "name").to_string(),
                        ));
                    }
                }
            }
            let mut removed_any = false;
            for (resource, namespace, name) in orphans {
                let options = DeleteOptions::default();
                if let Ok(deletion) = self.delete(&resource, &namespace, &name, &options, now) {
                    removed_any |= matches!(deletion, Deletion::Deleted(_));
                    collected.push(Collected {
                        resource,
                        namespace,
                        name,
                        deletion,
                    });
                }
            }
            // Only a removal can orphan more objects; marking one for deletion cannot.
            if !removed_any {
                return collected;
            }
        }
    }
}

/// Sets the deletion fields as the real server does when finalizers hold an object back,
/// raising the generation the first time.
fn mark_deleting(meta: &mut Object, now: Timestamp) {
    let now = truncate_to_second(now);
    if let Some(generation) = meta.get("generation").and_then(Value::as_i64)
        && generation > 0
        && !meta.contains_key("deletionTimestamp")
    {
        meta.insert("generation".into(), json!(generation + 1));
    }
    let later_or_unset = meta
        .get("deletionTimestamp")
        .and_then(Value::as_str)
        .and_then(|t| t.parse::<Timestamp>().ok())
        .is_none_or(|t| t > now);
    if later_or_unset {
        meta.insert("deletionTimestamp".into(), json!(format_time(now)));
    }
    meta.insert("deletionGracePeriodSeconds".into(), json!(0));
}

/// Keys after `start` (exclusive) in order.
pub(super) fn after<'a>(
    objects: &'a BTreeMap<String, Value>,
    start: Option<&str>,
) -> impl Iterator<Item = (&'a String, &'a Value)> + use<'a> {
    let lower = match start {
        Some(key) => Bound::Excluded(key.to_string()),
        None => Bound::Unbounded,
    };
    objects.range::<String, _>((lower, Bound::Unbounded))
}

#[cfg(test)]
#[path = "objects_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "objects_properties.rs"]
mod properties;

/// The request's namespace fills an empty one in the object and must match a set one;
/// objects that are not `scoped` carry none.
fn settle_namespace(meta: &mut Object, scoped: bool, namespace: &str) -> Result<(), Error> {
    if !scoped {
        meta.remove("namespace");
        return Ok(());
    }
    match text(meta, "namespace") {
        "" => {
            meta.insert("namespace".into(), json!(namespace));
        }
        given if given != namespace => {
            return Err(Error::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        _ => {}
    }
    Ok(())
}
