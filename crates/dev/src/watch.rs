//! List (with limit and continue) and watch, both served from the store's objects and its
//! window of recent events.

use super::objects::{
    EventType, ListOptions, ObjectList, Recorded, ResourceKey, Store, WatchBatch, WatchEvent,
    after, meta_text,
};
use super::selectors::Selectors;
use super::status::Error;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// What a continue token holds: the list's resourceVersion and the last key it returned.
#[derive(Serialize, Deserialize)]
struct ContinueToken {
    rv: u64,
    start: String,
}

fn encode_continue(resource_version: u64, start: &str) -> String {
    let text = json!({"rv": resource_version, "start": start}).to_string();
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Result<ContinueToken, Error> {
    let invalid = |why: &str| Error::bad_request(format!("continue key is not valid: {why}"));
    if !token.len().is_multiple_of(2) || !token.is_ascii() {
        return Err(invalid("not a token this server gave"));
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&token[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| invalid("not a token this server gave"))?;
    serde_json::from_slice(&bytes).map_err(|_| invalid("not a token this server gave"))
}

fn in_namespace(object: &Value, namespace: Option<&str>) -> bool {
    namespace.is_none_or(|ns| meta_text(object, "namespace") == ns)
}

/// An event as a watcher with these selectors sees it: an object that starts matching is
/// ADDED, one that stops matching is DELETED (its last matching state, at the event's
/// version), as the real server's watch cache does.
fn as_seen(event: &Recorded, selectors: &Selectors) -> Option<WatchEvent> {
    let now = event.event_type != EventType::Deleted && selectors.matches(&event.object);
    let before = event
        .previous
        .as_ref()
        .is_some_and(|p| selectors.matches(p));
    let (event_type, object) = match (now, before) {
        (true, false) => (EventType::Added, event.object.clone()),
        (true, true) => (EventType::Modified, event.object.clone()),
        (false, true) if event.event_type == EventType::Deleted => {
            (EventType::Deleted, event.object.clone())
        }
        (false, true) => {
            let mut last = event.previous.clone()?;
            if let Some(meta) = last.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.insert(
                    "resourceVersion".into(),
                    json!(event.resource_version.to_string()),
                );
            }
            (EventType::Deleted, last)
        }
        (false, false) => return None,
    };
    Some(WatchEvent { event_type, object })
}

impl Store {
    /// Checks the namespace and selectors of a list or watch against the resource.
    fn check_collection(
        &self,
        resource: &ResourceKey,
        namespace: Option<&str>,
        selectors: &Selectors,
    ) -> Result<(), Error> {
        let info = self.info(resource)?;
        if let Some(namespace) = namespace {
            Self::check_scope(info, namespace)?;
        }
        selectors.field.check_fields(&info.selectable_fields)
    }

    /// The objects of `resource` as they were at `resource_version`, rebuilt by undoing the
    /// newer events; the caller has checked the version is retained.
    fn objects_at(
        &self,
        resource: &ResourceKey,
        resource_version: u64,
    ) -> Cow<'_, BTreeMap<String, Value>> {
        let current = self.objects.get(resource);
        if resource_version >= self.resource_version {
            return current.map_or_else(|| Cow::Owned(BTreeMap::new()), Cow::Borrowed);
        }
        let mut objects = current.cloned().unwrap_or_default();
        let newer = self
            .events
            .iter()
            .rev()
            .take_while(|e| e.resource_version > resource_version);
        for event in newer.filter(|e| e.resource == *resource) {
            match (&event.event_type, &event.previous) {
                (EventType::Added, _) | (_, None) => {
                    objects.remove(&event.key);
                }
                (_, Some(previous)) => {
                    objects.insert(event.key.clone(), previous.clone());
                }
            }
        }
        Cow::Owned(objects)
    }

    /// Lists objects of `resource` in `namespace` (all namespaces with `None`), filtered by
    /// selectors, in key order, a page at a time with `limit` and `continue`. A continued
    /// list shows the objects as they were when its first page was taken; its token goes
    /// stale (410 Expired) once that version leaves the event window.
    pub fn list(
        &self,
        resource: &ResourceKey,
        namespace: Option<&str>,
        options: &ListOptions,
    ) -> Result<ObjectList, Error> {
        let namespace = namespace.filter(|n| !n.is_empty());
        self.check_collection(resource, namespace, &options.selectors)?;
        let (resource_version, start) = match &options.continue_token {
            None => (self.resource_version, None),
            Some(token) => {
                let token = decode_continue(token)?;
                if token.rv > self.resource_version {
                    return Err(Error::bad_request(
                        "continue key is not valid: its resource version is in the future",
                    ));
                }
                if token.rv < self.compacted {
                    return Err(Error::Expired {
                        message: "The provided continue parameter is too old to display a consistent list result. \
                                  Start a new list without the continue parameter."
                            .to_string(),
                    });
                }
                (token.rv, Some(token.start))
            }
        };
        let objects = self.objects_at(resource, resource_version);
        let limit = options
            .limit
            .filter(|l| *l > 0)
            .map(|l| usize::try_from(l).unwrap_or(usize::MAX));
        let mut items = Vec::new();
        let mut last_key = None;
        let mut remaining: u64 = 0;
        for (key, object) in after(&objects, start.as_deref()) {
            if !in_namespace(object, namespace) || !options.selectors.matches(object) {
                continue;
            }
            if limit.is_some_and(|l| items.len() >= l) {
                remaining += 1;
                // The count is only reported without selectors; with them one more is enough.
                if !options.selectors.is_empty() {
                    break;
                }
                continue;
            }
            items.push(object.clone());
            last_key = Some(key);
        }
        let continue_token = last_key
            .filter(|_| remaining > 0)
            .map(|key| encode_continue(resource_version, key));
        let remaining_item_count =
            (continue_token.is_some() && options.selectors.is_empty()).then_some(remaining);
        Ok(ObjectList {
            items,
            resource_version,
            continue_token,
            remaining_item_count,
        })
    }

    /// The events of `resource` after `resource_version`, as a watcher in `namespace` (all
    /// with `None`) with these selectors sees them. Without a version, or with "0", the
    /// watch starts now with a synthetic ADDED event for every current object. A version
    /// older than the event window is 410 Expired; the watcher relists.
    pub fn watch_from(
        &self,
        resource: &ResourceKey,
        namespace: Option<&str>,
        selectors: &Selectors,
        resource_version: Option<&str>,
    ) -> Result<WatchBatch, Error> {
        let namespace = namespace.filter(|n| !n.is_empty());
        self.check_collection(resource, namespace, selectors)?;
        let Some(text) = resource_version.filter(|v| !v.is_empty() && *v != "0") else {
            let events = self
                .objects
                .get(resource)
                .into_iter()
                .flat_map(|objects| objects.values())
                .filter(|o| in_namespace(o, namespace) && selectors.matches(o))
                .map(|o| WatchEvent {
                    event_type: EventType::Added,
                    object: o.clone(),
                })
                .collect();
            return Ok(WatchBatch {
                events,
                resource_version: self.resource_version,
            });
        };
        let version: u64 = text
            .parse()
            .map_err(|_| Error::bad_request(format!("invalid resource version: {text}")))?;
        if version < self.compacted {
            return Err(Error::Expired {
                message: format!("too old resource version: {version} ({})", self.compacted),
            });
        }
        let first = self
            .events
            .partition_point(|e| e.resource_version <= version);
        let events = self
            .events
            .range(first..)
            .filter(|e| e.resource == *resource && in_namespace(&e.object, namespace))
            .filter_map(|e| as_seen(e, selectors))
            .collect();
        Ok(WatchBatch {
            events,
            resource_version: version.max(self.resource_version),
        })
    }

    /// A BOOKMARK event at the current version: only `metadata.resourceVersion` (and, to end
    /// the initial events of a streaming list, the `k8s.io/initial-events-end` annotation).
    pub fn bookmark(
        &self,
        resource: &ResourceKey,
        initial_events_end: bool,
    ) -> Result<WatchEvent, Error> {
        let info = self.info(resource)?;
        let mut metadata = json!({"resourceVersion": self.resource_version.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        Ok(WatchEvent {
            event_type: EventType::Bookmark,
            object: json!({
                "kind": info.kind,
                "apiVersion": resource.api_version(),
                "metadata": metadata,
            }),
        })
    }
}
