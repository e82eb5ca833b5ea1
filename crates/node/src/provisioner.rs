//! The volume provisioner of the `multisite.dev/node` storage class: for a claim the
//! scheduler placed on one of this agent's nodes (annotation
//! `volume.kubernetes.io/selected-node`, binding mode WaitForFirstConsumer) it creates a
//! `local` PersistentVolume under `<state>/volumes/<pv>` with node affinity to that node
//! and a claimRef to the claim; Kubernetes' PV controller binds the two. A Released
//! volume of the class with reclaim policy Delete loses its directory, then its object.

use super::NodeError;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    LocalVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, ObjectReference,
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeSpec, VolumeNodeAffinity,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use kube::{Api, Client};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

/// The provisioner name StorageClasses name.
pub const PROVISIONER: &str = "multisite.dev/node";
const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";

/// The StorageClass of this provisioner: WaitForFirstConsumer, reclaim Delete, the
/// cluster's default class.
pub fn storage_class(name: &str) -> StorageClass {
    StorageClass {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            annotations: Some(BTreeMap::from([(
                "storageclass.kubernetes.io/is-default-class".to_string(),
                "true".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        provisioner: PROVISIONER.to_string(),
        reclaim_policy: Some("Delete".into()),
        volume_binding_mode: Some("WaitForFirstConsumer".into()),
        ..StorageClass::default()
    }
}

/// Creates the StorageClass unless one of that name exists.
pub(super) async fn install_storage_class(client: &Client, name: &str) -> Result<(), NodeError> {
    let api: Api<StorageClass> = Api::all(client.clone());
    let error = |source| NodeError::Client {
        what: format!("storageclass {name}"),
        source,
    };
    if api.get_opt(name).await.map_err(error)?.is_none() {
        api.create(&PostParams::default(), &storage_class(name))
            .await
            .map_err(error)?;
        tracing::info!(class = name, "storage class created");
    }
    Ok(())
}

/// Provisions and reclaims until `stop` turns true.
pub(super) async fn run(
    client: Client,
    nodes: BTreeSet<String>,
    root: PathBuf,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let mut claim_events = watcher::watcher(claims, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut volume_events = watcher::watcher(volumes, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut pending: BTreeMap<String, PersistentVolumeClaim> = BTreeMap::new();
    let mut released: BTreeMap<String, PersistentVolume> = BTreeMap::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            Some(Ok(claim)) = claim_events.next() => {
                if let Some(uid) = claim.metadata.uid.clone() {
                    pending.insert(uid, claim);
                }
            }
            Some(Ok(volume)) = volume_events.next() => {
                if let Some(name) = volume.metadata.name.clone() {
                    released.insert(name, volume);
                }
            }
            _ = ticker.tick() => {}
        }
        let uids: Vec<String> = pending.keys().cloned().collect();
        for uid in uids {
            let Some(claim) = pending.get(&uid).cloned() else {
                continue;
            };
            match provision(&client, &nodes, &root, &claim).await {
                Ok(true) => {
                    pending.remove(&uid);
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, claim = ?claim.metadata.name, "provisioning failed; retrying");
                }
            }
        }
        let names: Vec<String> = released.keys().cloned().collect();
        for name in names {
            let Some(volume) = released.remove(&name) else {
                continue;
            };
            if let Err(error) = reclaim(&client, &nodes, &volume).await {
                tracing::warn!(%error, volume = %name, "reclaiming failed; retrying");
                released.insert(name, volume);
            }
        }
    }
}

/// Creates the claim's volume when it is this agent's to make; true when nothing more
/// is to be done for the claim.
async fn provision(
    client: &Client,
    nodes: &BTreeSet<String>,
    root: &std::path::Path,
    claim: &PersistentVolumeClaim,
) -> Result<bool, String> {
    let spec = claim.spec.clone().unwrap_or_default();
    let phase = claim.status.as_ref().and_then(|s| s.phase.as_deref());
    if phase == Some("Bound") || spec.volume_name.as_deref().is_some_and(|v| !v.is_empty()) {
        return Ok(true);
    }
    if claim.metadata.deletion_timestamp.is_some() {
        return Ok(true);
    }
    let annotations = claim.metadata.annotations.clone().unwrap_or_default();
    let Some(node) = annotations
        .get(SELECTED_NODE)
        .filter(|n| nodes.contains(*n))
    else {
        return Ok(false);
    };
    let Some(class_name) = spec.storage_class_name.clone() else {
        return Ok(true);
    };
    let classes: Api<StorageClass> = Api::all(client.clone());
    let class = classes
        .get_opt(&class_name)
        .await
        .map_err(|e| format!("storageclass {class_name}: {e}"))?;
    let Some(class) = class.filter(|c| c.provisioner == PROVISIONER) else {
        return Ok(true);
    };
    let uid = claim.metadata.uid.clone().unwrap_or_default();
    let name = format!("pvc-{uid}");
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    if volumes
        .get_opt(&name)
        .await
        .map_err(|e| format!("persistentvolume {name}: {e}"))?
        .is_some()
    {
        return Ok(true);
    }
    let dir = root.join(&name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let capacity = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.clone())
        .and_then(|r| r.get("storage").cloned())
        .map(|q| BTreeMap::from([("storage".to_string(), q)]));
    let namespace = claim.metadata.namespace.clone().unwrap_or_default();
    let volume = PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            annotations: Some(BTreeMap::from([(
                PROVISIONED_BY.to_string(),
                PROVISIONER.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity,
            access_modes: spec.access_modes.clone(),
            storage_class_name: Some(class_name),
            persistent_volume_reclaim_policy: Some(
                class
                    .reclaim_policy
                    .clone()
                    .unwrap_or_else(|| "Delete".into()),
            ),
            volume_mode: spec.volume_mode.clone(),
            local: Some(LocalVolumeSource {
                path: dir.display().to_string(),
                fs_type: None,
            }),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                name: claim.metadata.name.clone(),
                namespace: Some(namespace.clone()),
                uid: Some(uid),
                resource_version: claim.metadata.resource_version.clone(),
                ..ObjectReference::default()
            }),
            node_affinity: Some(VolumeNodeAffinity {
                required: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: "kubernetes.io/hostname".into(),
                            operator: "In".into(),
                            values: Some(vec![node.clone()]),
                        }]),
                        ..NodeSelectorTerm::default()
                    }],
                }),
            }),
            ..PersistentVolumeSpec::default()
        }),
        ..PersistentVolume::default()
    };
    volumes
        .create(&PostParams::default(), &volume)
        .await
        .map_err(|e| format!("create persistentvolume {name}: {e}"))?;
    tracing::info!(volume = %name, claim = %format!("{namespace}/{}", claim.metadata.name.clone().unwrap_or_default()), %node, "volume provisioned");
    Ok(true)
}

/// Deletes a Released volume of ours with reclaim policy Delete: its data, then it.
async fn reclaim(
    client: &Client,
    nodes: &BTreeSet<String>,
    volume: &PersistentVolume,
) -> Result<(), String> {
    let ours = volume
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PROVISIONED_BY))
        .is_some_and(|p| p == PROVISIONER);
    let released = volume.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released");
    let spec = volume.spec.clone().unwrap_or_default();
    let delete = spec.persistent_volume_reclaim_policy.as_deref() == Some("Delete");
    let on_our_node = spec
        .node_affinity
        .and_then(|a| a.required)
        .into_iter()
        .flat_map(|r| r.node_selector_terms)
        .flat_map(|t| t.match_expressions.unwrap_or_default())
        .flat_map(|e| e.values.unwrap_or_default())
        .any(|v| nodes.contains(&v));
    if !(ours && released && delete && on_our_node) || volume.metadata.deletion_timestamp.is_some()
    {
        return Ok(());
    }
    let name = volume.metadata.name.clone().unwrap_or_default();
    if let Some(local) = spec.local {
        let dir = PathBuf::from(&local.path);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(format!("{}: {e}", dir.display()));
        }
    }
    let api: Api<PersistentVolume> = Api::all(client.clone());
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => {
            tracing::info!(volume = %name, "released volume deleted");
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(format!("delete persistentvolume {name}: {e}")),
    }
}
