//! Resources served as a view of another's storage, as the real server serves
//! `events.k8s.io/v1` Events and core `v1` Events from one storage: what is written
//! through either is listed, watched and read through both.
//!
//! The two Event versions differ only in the names of some top-level fields
//! (`regarding` is `involvedObject`, `note` is `message`, ...), so a view renames those
//! on the way in (objects, patches, field selectors) and on the way out (objects, lists,
//! watch events). Simpler than the real server: `managedFields` keep the stored version's
//! field names, and errors name the stored resource.

use crate::objects::ResourceKey;
use serde_json::{Map, Value};

/// A resource served from another resource's storage.
#[derive(Debug)]
pub struct View {
    pub served: (&'static str, &'static str, &'static str),
    pub stored: (&'static str, &'static str, &'static str),
    /// Top-level field names: (as served, as stored).
    renamed: &'static [(&'static str, &'static str)],
}

/// `events.k8s.io/v1` Events, stored as core `v1` Events.
const EVENTS: View = View {
    served: ("events.k8s.io", "v1", "events"),
    stored: ("", "v1", "events"),
    renamed: &[
        ("regarding", "involvedObject"),
        ("note", "message"),
        ("reportingController", "reportingComponent"),
        ("deprecatedSource", "source"),
        ("deprecatedFirstTimestamp", "firstTimestamp"),
        ("deprecatedLastTimestamp", "lastTimestamp"),
        ("deprecatedCount", "count"),
    ],
};

const VIEWS: &[View] = &[EVENTS];

/// The view `resource` is served as, if it is one.
pub fn view_of(resource: &ResourceKey) -> Option<&'static View> {
    VIEWS.iter().find(|v| {
        let (group, version, plural) = v.served;
        resource.group == group && resource.version == version && resource.plural == plural
    })
}

fn api_version(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    }
}

impl View {
    pub fn stored_resource(&self) -> ResourceKey {
        let (group, version, plural) = self.stored;
        ResourceKey::new(group, version, plural)
    }

    fn rename(&self, object: &mut Map<String, Value>, to_stored: bool) {
        for (served, stored) in self.renamed {
            let (from, to) = if to_stored {
                (served, stored)
            } else {
                (stored, served)
            };
            if let Some(value) = object.remove(*from) {
                object.insert((*to).to_string(), value);
            }
        }
    }

    /// An object (or a merge, strategic or apply patch, which has an object's shape) as
    /// the storage keeps it.
    pub fn to_stored(&self, mut object: Value) -> Value {
        if let Some(map) = object.as_object_mut() {
            self.rename(map, true);
            if map.contains_key("apiVersion") {
                map.insert(
                    "apiVersion".into(),
                    Value::String(api_version(self.stored.0, self.stored.1)),
                );
            }
        }
        object
    }

    /// A JSON patch (RFC 6902) whose paths name the served fields, with the stored ones.
    pub fn json_patch_to_stored(&self, mut patch: Value) -> Value {
        for operation in patch.as_array_mut().into_iter().flatten() {
            for key in ["path", "from"] {
                if let Some(path) = operation.get(key).and_then(Value::as_str) {
                    let renamed = self.path_to_stored(path);
                    operation[key] = Value::String(renamed);
                }
            }
        }
        patch
    }

    fn path_to_stored(&self, path: &str) -> String {
        let rest = path.strip_prefix('/').unwrap_or(path);
        let (first, tail) = match rest.split_once('/') {
            Some((first, tail)) => (first, Some(tail)),
            None => (rest, None),
        };
        let first = self
            .renamed
            .iter()
            .find(|(served, _)| *served == first)
            .map_or(first, |(_, stored)| stored);
        match tail {
            Some(tail) => format!("/{first}/{tail}"),
            None => format!("/{first}"),
        }
    }

    /// A field selector (`regarding.name=x,type!=Normal`) with the stored field names.
    pub fn field_selector_to_stored(&self, selector: &str) -> String {
        selector
            .split(',')
            .map(|requirement| {
                let (field, rest) = requirement
                    .find(['=', '!'])
                    .map_or((requirement, ""), |at| requirement.split_at(at));
                let (head, tail) = field
                    .trim()
                    .split_once('.')
                    .map_or((field.trim(), None), |(h, t)| (h, Some(t)));
                let head = self
                    .renamed
                    .iter()
                    .find(|(served, _)| *served == head)
                    .map_or(head, |(_, stored)| stored);
                match tail {
                    Some(tail) => format!("{head}.{tail}{rest}"),
                    None => format!("{head}{rest}"),
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// What the server answers, as the served resource shows it: an object, a list of
    /// them, or a watch event's object; a Status or a Table passes unchanged.
    pub fn to_served(&self, mut answer: Value) -> Value {
        let served_version = api_version(self.served.0, self.served.1);
        let Some(map) = answer.as_object_mut() else {
            return answer;
        };
        let kind = map
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if matches!(kind.as_str(), "Status" | "Table") {
            return answer;
        }
        if let Some(items) = map.get_mut("items").and_then(Value::as_array_mut) {
            for item in items.iter_mut() {
                if let Some(item) = item.as_object_mut() {
                    self.rename(item, false);
                    if item.contains_key("apiVersion") {
                        item.insert("apiVersion".into(), Value::String(served_version.clone()));
                    }
                }
            }
        } else {
            self.rename(map, false);
        }
        if map.contains_key("apiVersion") {
            map.insert("apiVersion".into(), Value::String(served_version));
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn events() -> &'static View {
        view_of(&ResourceKey::new("events.k8s.io", "v1", "events")).expect("a view")
    }

    #[test]
    fn only_events_of_events_k8s_io_are_a_view() {
        assert!(view_of(&ResourceKey::new("", "v1", "events")).is_none());
        assert!(view_of(&ResourceKey::new("events.k8s.io", "v1beta1", "events")).is_none());
        assert_eq!(
            events().stored_resource(),
            ResourceKey::new("", "v1", "events")
        );
    }

    #[test]
    fn an_event_goes_in_and_comes_back_out_unchanged() {
        let served = json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "e1", "namespace": "tracker"},
            "regarding": {"kind": "Replica", "name": "sampl-tokyo"},
            "note": "bootstrapped", "reason": "Bootstrapped", "type": "Normal",
            "reportingController": "multisite.dev/operator", "reportingInstance": "op-1",
            "action": "Bootstrap", "eventTime": "2026-12-02T10:00:00.000000Z",
            "series": {"count": 2, "lastObservedTime": "2026-12-02T10:01:00.000000Z"},
            "deprecatedCount": 3,
        });
        let stored = events().to_stored(served.clone());
        assert_eq!(stored["apiVersion"], "v1");
        assert_eq!(stored["involvedObject"]["name"], "sampl-tokyo");
        assert_eq!(stored["message"], "bootstrapped");
        assert_eq!(stored["reportingComponent"], "multisite.dev/operator");
        assert_eq!(stored["count"], 3);
        assert!(stored.get("note").is_none() && stored.get("regarding").is_none());
        // Fields both versions share keep their names.
        assert_eq!(stored["series"]["count"], 2);
        assert_eq!(events().to_served(stored), served);
    }

    #[test]
    fn lists_are_served_item_by_item_and_statuses_pass() {
        let list = json!({
            "apiVersion": "v1", "kind": "EventList", "metadata": {},
            "items": [{"apiVersion": "v1", "kind": "Event", "message": "a"}, {"message": "b"}],
        });
        let served = events().to_served(list);
        assert_eq!(served["apiVersion"], "events.k8s.io/v1");
        assert_eq!(served["items"][0]["apiVersion"], "events.k8s.io/v1");
        assert_eq!(served["items"][0]["note"], "a");
        assert_eq!(served["items"][1]["note"], "b");
        assert!(served["items"][1].get("apiVersion").is_none());
        let status = json!({"kind": "Status", "apiVersion": "v1", "message": "gone"});
        assert_eq!(events().to_served(status.clone()), status);
    }

    #[test]
    fn json_patches_and_field_selectors_name_the_stored_fields() {
        let patch = json!([
            {"op": "replace", "path": "/note", "value": "x"},
            {"op": "replace", "path": "/series/count", "value": 4},
            {"op": "copy", "from": "/deprecatedCount", "path": "/regarding/name"},
        ]);
        assert_eq!(
            events().json_patch_to_stored(patch),
            json!([
                {"op": "replace", "path": "/message", "value": "x"},
                {"op": "replace", "path": "/series/count", "value": 4},
                {"op": "copy", "from": "/count", "path": "/involvedObject/name"},
            ])
        );
        assert_eq!(
            events().field_selector_to_stored("regarding.name=a,type!=Normal,note==b"),
            "involvedObject.name=a,type!=Normal,message==b"
        );
    }
}
