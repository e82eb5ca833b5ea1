//! The store written to bytes and read back, so the dev cluster keeps its objects between
//! runs. The event window is not kept: after a restart a watch from an older version gets
//! 410 Expired and relists, as against a real API server after its watch cache restarts.

use super::objects::{
    ResourceInfo, ResourceKey, Store, meta_text, resource_version_of, storage_key,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Snapshot {
    resource_version: u64,
    resources: Vec<SnapshotResource>,
}

#[derive(Serialize, Deserialize)]
struct SnapshotResource {
    resource: ResourceKey,
    info: ResourceInfo,
    objects: Vec<Value>,
}

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the snapshot could not be written: {0}")]
    Encode(serde_json::Error),
    #[error("the snapshot is not readable: {0}")]
    Decode(serde_json::Error),
    #[error("the snapshot holds an object of {resource} that cannot be restored: {reason}")]
    Object { resource: String, reason: String },
}

impl Store {
    /// The registered resources, their objects and the resourceVersion counter, as JSON.
    pub fn to_bytes(&self) -> Result<Vec<u8>, SnapshotError> {
        let resources = self
            .resources
            .iter()
            .map(|(resource, info)| SnapshotResource {
                resource: resource.clone(),
                info: info.clone(),
                objects: self
                    .objects
                    .get(resource)
                    .map(|o| o.values().cloned().collect())
                    .unwrap_or_default(),
            })
            .collect();
        let snapshot = Snapshot {
            resource_version: self.resource_version,
            resources,
        };
        serde_json::to_vec(&snapshot).map_err(SnapshotError::Encode)
    }

    /// A store from [`Store::to_bytes`], keeping `event_window` events from now on; watches
    /// and continue tokens from before the snapshot get 410 Expired.
    pub fn from_bytes(bytes: &[u8], event_window: usize) -> Result<Self, SnapshotError> {
        let snapshot: Snapshot = serde_json::from_slice(bytes).map_err(SnapshotError::Decode)?;
        let mut store = Store::new(event_window);
        store.resource_version = snapshot.resource_version;
        store.compacted = snapshot.resource_version;
        for entry in snapshot.resources {
            let refuse = |reason: String| SnapshotError::Object {
                resource: entry.resource.group_resource().to_string(),
                reason,
            };
            let mut objects = BTreeMap::new();
            for object in entry.objects {
                let name = meta_text(&object, "name").to_string();
                let namespace = meta_text(&object, "namespace").to_string();
                if name.is_empty() || name.contains('/') {
                    return Err(refuse(format!("the name \"{name}\" is not valid")));
                }
                if entry.info.namespaced == namespace.is_empty() {
                    return Err(refuse(format!(
                        "\"{name}\" does not fit the scope of its resource"
                    )));
                }
                let version = resource_version_of(&object);
                if version == 0 || version > snapshot.resource_version {
                    return Err(refuse(format!(
                        "\"{name}\" has resourceVersion {version}, outside 1..={}",
                        snapshot.resource_version
                    )));
                }
                let key = storage_key(&namespace, &name);
                if objects.insert(key, object).is_some() {
                    return Err(refuse(format!("\"{name}\" appears twice")));
                }
            }
            if !objects.is_empty() {
                store.objects.insert(entry.resource.clone(), objects);
            }
            store.resources.insert(entry.resource, entry.info);
        }
        Ok(store)
    }
}
