//! The Node object and its heartbeats: registration with the well-known labels, node
//! status (capacity, addresses, the kubelet endpoint, node info, conditions), and the
//! node's Lease in `kube-node-lease`.

use super::{NodeCtx, NodeError};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// What the agent reports as its kubelet version.
pub(super) const KUBELET_VERSION: &str = "v1.37.2-multisite";

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "s390x" => "s390x",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Total memory in bytes, from /proc/meminfo.
pub(super) fn memory_bytes() -> u64 {
    read_trimmed("/proc/meminfo")
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

pub(super) fn cpus() -> u64 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1)
}

/// Bytes of the file system that holds `path`.
fn disk_bytes(path: &std::path::Path) -> u64 {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return 0;
    };
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: statvfs(3) writes into the zeroed struct it is given.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    // SAFETY: statvfs returned 0, so the struct is filled in.
    let stat = unsafe { stat.assume_init() };
    stat.f_blocks.saturating_mul(stat.f_frsize)
}

fn os_image() -> String {
    read_trimmed("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into())
}

fn condition(
    kind: &str,
    status: &str,
    reason: &str,
    message: &str,
    since: &str,
    now: &str,
) -> Value {
    json!({
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastHeartbeatTime": now,
        "lastTransitionTime": since,
    })
}

/// The node's status as a kubelet reports it.
fn node_status(node: &NodeCtx, since: &str) -> Value {
    let now = Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let capacity = json!({
        "cpu": cpus().to_string(),
        "memory": format!("{}Ki", memory_bytes() / 1024),
        "pods": "110",
        "ephemeral-storage": disk_bytes(&node.shared.settings.state_dir).to_string(),
    });
    let machine = read_trimmed("/etc/machine-id");
    json!({
        "capacity": capacity,
        "allocatable": capacity,
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": node.name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": node.port}},
        // kube-apiserver then hands exec WebSockets through instead of speaking SPDY.
        "declaredFeatures": ["ExtendWebSocketsToKubelet"],
        "nodeInfo": {
            "machineID": machine,
            "systemUUID": machine,
            "bootID": read_trimmed("/proc/sys/kernel/random/boot_id"),
            "kernelVersion": read_trimmed("/proc/sys/kernel/osrelease"),
            "osImage": os_image(),
            "containerRuntimeVersion": "multisite://process",
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": arch(),
        },
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available", since, &now),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure", since, &now),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available", since, &now),
            condition("Ready", "True", "KubeletReady", "kubelet is posting ready status", since, &now),
        ],
    })
}

fn labels(node: &NodeCtx) -> BTreeMap<String, String> {
    [
        ("kubernetes.io/hostname", node.name.as_str()),
        ("topology.kubernetes.io/zone", node.zone.as_str()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", arch()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn api_error(node: &NodeCtx, source: kube::Error) -> NodeError {
    NodeError::Api {
        node: node.name.clone(),
        source,
    }
}

/// Creates the Node (or brings an existing one's labels up to date) and writes its
/// status.
pub(super) async fn register(node: &NodeCtx) -> Result<(), NodeError> {
    let api: Api<Node> = Api::all(node.client.clone());
    let object = Node {
        metadata: ObjectMeta {
            name: Some(node.name.clone()),
            labels: Some(labels(node)),
            ..ObjectMeta::default()
        },
        ..Node::default()
    };
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let patch = json!({"metadata": {"labels": labels(node)}});
            api.patch(&node.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| api_error(node, e))?;
        }
        Err(e) => return Err(api_error(node, e)),
    }
    write_status(node, &now_text()).await
}

fn now_text() -> String {
    Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

async fn write_status(node: &NodeCtx, since: &str) -> Result<(), NodeError> {
    let api: Api<Node> = Api::all(node.client.clone());
    let patch = json!({"status": node_status(node, since)});
    api.patch_status(&node.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| api_error(node, e))?;
    Ok(())
}

/// Renews the Lease and the status until `stop` turns true.
pub(super) async fn heartbeat(node: Arc<NodeCtx>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let since = now_text();
    let settings = &node.shared.settings;
    let mut ticker = tokio::time::interval(settings.lease_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = Instant::now();
    let mut lease: Option<Lease> = None;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = ticker.tick() => {}
        }
        // After a failure (the Node deleted, the API server away) register afresh: the
        // Node is created again if it is gone, and the Lease with an owner reference to it.
        let mut result = if failing {
            register(&node).await
        } else {
            Ok(())
        };
        if result.is_ok() {
            result = renew_lease(&node, &mut lease).await;
        }
        if result.is_ok() && last_status.elapsed() >= settings.status_interval {
            result = write_status(&node, &since).await;
            if result.is_ok() {
                last_status = Instant::now();
            }
        }
        match result {
            Err(error) if !failing => {
                tracing::warn!(node = %node.name, %error, "heartbeat failed; retrying");
                failing = true;
                lease = None;
            }
            Err(_) => lease = None,
            Ok(()) if failing => {
                tracing::info!(node = %node.name, "heartbeat works again");
                failing = false;
            }
            Ok(()) => {}
        }
    }
}

async fn renew_lease(node: &NodeCtx, cached: &mut Option<Lease>) -> Result<(), NodeError> {
    let api: Api<Lease> = Api::namespaced(node.client.clone(), "kube-node-lease");
    let now = MicroTime(Timestamp::now());
    let duration = i32::try_from(node.shared.settings.lease_interval.as_secs() * 4).unwrap_or(40);
    let mut lease = match cached.take() {
        Some(lease) => lease,
        None => match api
            .get_opt(&node.name)
            .await
            .map_err(|e| api_error(node, e))?
        {
            Some(lease) => lease,
            None => {
                let nodes: Api<Node> = Api::all(node.client.clone());
                let owner = nodes
                    .get(&node.name)
                    .await
                    .map_err(|e| api_error(node, e))?;
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(node.name.clone()),
                        namespace: Some("kube-node-lease".into()),
                        owner_references: Some(vec![OwnerReference {
                            api_version: "v1".into(),
                            kind: "Node".into(),
                            name: node.name.clone(),
                            uid: owner.metadata.uid.unwrap_or_default(),
                            ..OwnerReference::default()
                        }]),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(node.name.clone()),
                        lease_duration_seconds: Some(duration),
                        renew_time: Some(now),
                        ..LeaseSpec::default()
                    }),
                };
                *cached = Some(
                    api.create(&PostParams::default(), &lease)
                        .await
                        .map_err(|e| api_error(node, e))?,
                );
                return Ok(());
            }
        },
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = Some(node.name.clone());
    spec.lease_duration_seconds = Some(duration);
    spec.renew_time = Some(now);
    *cached = Some(
        api.replace(&node.name, &PostParams::default(), &lease)
            .await
            .map_err(|e| api_error(node, e))?,
    );
    Ok(())
}
