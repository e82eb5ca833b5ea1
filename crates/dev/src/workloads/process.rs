//! How a container becomes a process: its volumes as directories, its arguments and
//! environment with mount paths and `0.0.0.0` rewritten (see the kubelet's notes).

use super::util::{at, name_of, namespace_of, text, uid_of};
use super::{Settings, WorkloadError};
use crate::objects::{ResourceKey, Store};
use multisite_node::rewrite::{replace_any_address, rewrite_service_hosts};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::process::{Child, Command};

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A volume as a directory, by volume name.
fn volume_dirs(
    settings: &Settings,
    store: &Store,
    pod: &Value,
) -> Result<BTreeMap<String, PathBuf>, WorkloadError> {
    let (namespace, name) = (namespace_of(pod), name_of(pod));
    let pod_dir = settings.pod_dir(namespace, name);
    let mut dirs = BTreeMap::new();
    let volumes = at(pod, &["spec", "volumes"])
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for volume in volumes {
        let volume_name = text(&volume, &["name"]).to_string();
        let own = pod_dir.join("volumes").join(&volume_name);
        let dir = if let Some(claim) =
            at(&volume, &["persistentVolumeClaim", "claimName"]).and_then(Value::as_str)
        {
            settings.claim_dir(namespace, claim)
        } else if let Some(path) = at(&volume, &["hostPath", "path"]).and_then(Value::as_str) {
            PathBuf::from(path)
        } else if let Some(secret) = at(&volume, &["secret", "secretName"]).and_then(Value::as_str)
        {
            let data = key_values(store, namespace, "secrets", secret)?;
            write_files(&own, &data)?;
            own
        } else if let Some(map) = at(&volume, &["configMap", "name"]).and_then(Value::as_str) {
            let data = key_values(store, namespace, "configmaps", map)?;
            write_files(&own, &data)?;
            own
        } else {
            own
        };
        std::fs::create_dir_all(&dir).map_err(|e| WorkloadError::io(&dir, e))?;
        dirs.insert(volume_name, dir);
    }
    Ok(dirs)
}

fn write_files(dir: &Path, data: &BTreeMap<String, Vec<u8>>) -> Result<(), WorkloadError> {
    std::fs::create_dir_all(dir).map_err(|e| WorkloadError::io(dir, e))?;
    for (key, bytes) in data {
        if key.contains('/') || key.starts_with('.') {
            continue;
        }
        let path = dir.join(key);
        std::fs::write(&path, bytes).map_err(|e| WorkloadError::io(&path, e))?;
    }
    Ok(())
}

/// The keys of a Secret (`data` decoded, `stringData`) or ConfigMap (`data`, `binaryData`).
fn key_values(
    store: &Store,
    namespace: &str,
    plural: &str,
    name: &str,
) -> Result<BTreeMap<String, Vec<u8>>, WorkloadError> {
    let object = store.get(&ResourceKey::new("", "v1", plural), namespace, name)?;
    let mut out = BTreeMap::new();
    let (text_field, binary_field) = if plural == "secrets" {
        ("stringData", "data")
    } else {
        ("data", "binaryData")
    };
    if let Some(map) = object.get(binary_field).and_then(Value::as_object) {
        for (key, value) in map {
            let bytes: k8s_openapi::ByteString =
                serde_json::from_value(value.clone()).map_err(|e| WorkloadError::Pod {
                    pod: format!("{namespace}/{name}"),
                    message: format!("{plural} key {key}: {e}"),
                })?;
            out.insert(key.clone(), bytes.0);
        }
    }
    if let Some(map) = object.get(text_field).and_then(Value::as_object) {
        for (key, value) in map {
            out.insert(
                key.clone(),
                value.as_str().unwrap_or("").as_bytes().to_vec(),
            );
        }
    }
    Ok(out)
}

/// `value` with `0.0.0.0` turned into the pod's address and a leading mount path (or one
/// after the first `=`) turned into its directory.
fn map_value(value: &str, mounts: &[(String, PathBuf)], ip: Ipv4Addr) -> String {
    let value = replace_any_address(value, ip);
    let (head, tail) = match value.split_once('=') {
        Some((head, tail)) if !starts_with_mount(&value, mounts) => (format!("{head}="), tail),
        _ => (String::new(), value.as_str()),
    };
    for (mount, dir) in mounts {
        if let Some(rest) = strip_mount(tail, mount) {
            return format!("{head}{}{rest}", dir.display());
        }
    }
    value.clone()
}

fn starts_with_mount(value: &str, mounts: &[(String, PathBuf)]) -> bool {
    mounts.iter().any(|(m, _)| strip_mount(value, m).is_some())
}

/// What follows `mount` in `value` when `value` is `mount` or `mount/...`.
fn strip_mount<'a>(value: &'a str, mount: &str) -> Option<&'a str> {
    let mount = mount.trim_end_matches('/');
    let rest = value.strip_prefix(mount)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

/// `value` with each URL host `NAME.NAMESPACE.svc[.cluster.local]` replaced by the
/// address of a running pod that Service NAME selects (the cluster DNS a real kubelet's
/// pods have). A Service without such a pod is an error, so the container starts later.
fn resolve_services(store: &Store, value: &str) -> Result<String, String> {
    rewrite_service_hosts(value, |namespace, service| {
        service_address(store, namespace, service)
    })
}

/// The address of a pod with an IP that Service `service` in `namespace` selects (a
/// Ready one when there is one).
fn service_address(store: &Store, namespace: &str, service: &str) -> Result<String, String> {
    let services = ResourceKey::new("", "v1", "services");
    let object = store
        .get(&services, namespace, service)
        .map_err(|_| format!("service {namespace}/{service} does not exist"))?;
    let selector = at(&object, &["spec", "selector"])
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if selector.is_empty() {
        return Err(format!("service {namespace}/{service} selects no pods"));
    }
    let pods = super::util::list_all(store, &super::util::pods())
        .into_iter()
        .filter(|p| namespace_of(p) == namespace)
        .filter(|p| {
            selector
                .iter()
                .all(|(k, v)| at(p, &["metadata", "labels", k]) == Some(v))
        })
        .filter(|p| !text(p, &["status", "podIP"]).is_empty());
    let ready = |p: &Value| {
        at(p, &["status", "conditions"])
            .and_then(Value::as_array)
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
    };
    let mut candidates: Vec<Value> = pods.collect();
    candidates.sort_by_key(|p| !ready(p));
    candidates
        .first()
        .map(|p| text(p, &["status", "podIP"]).to_string())
        .ok_or_else(|| format!("service {namespace}/{service} has no pod with an address yet"))
}

/// Starts one container's process: its own process group, output to its log file.
pub(super) fn spawn(
    settings: &Settings,
    store: &Store,
    pod: &Value,
    ip: Ipv4Addr,
    spec: &Value,
    program: &Path,
    container_name: &str,
) -> Result<Child, WorkloadError> {
    let (namespace, name) = (namespace_of(pod), name_of(pod));
    let pod_label = format!("{namespace}/{name}");
    let volumes = volume_dirs(settings, store, pod)?;
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for mount in at(spec, &["volumeMounts"])
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let volume = text(mount, &["name"]);
        let dir = volumes.get(volume).ok_or_else(|| WorkloadError::Pod {
            pod: pod_label.clone(),
            message: format!("volume {volume:?} is mounted but not declared"),
        })?;
        let dir = match text(mount, &["subPath"]) {
            "" => dir.clone(),
            sub if sub.split('/').any(|part| part == "..") => {
                return Err(WorkloadError::Pod {
                    pod: pod_label,
                    message: format!("subPath {sub:?} leaves its volume"),
                });
            }
            sub => {
                let dir = dir.join(sub);
                std::fs::create_dir_all(&dir).map_err(|e| WorkloadError::io(&dir, e))?;
                dir
            }
        };
        mounts.push((text(mount, &["mountPath"]).to_string(), dir));
    }
    mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    let words = |field: &str| -> Vec<String> {
        at(spec, &[field])
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect()
    };
    let mut argv = words("command");
    let entrypoint = argv
        .first()
        .and_then(|first| Path::new(first).file_name().map(|f| f.to_owned()));
    if entrypoint.is_some() && entrypoint.as_deref() == program.file_name() {
        argv.remove(0);
    }
    argv.extend(words("args"));
    let resolve = |value: String| -> Result<String, WorkloadError> {
        resolve_services(store, &value).map_err(|message| WorkloadError::Pod {
            pod: pod_label.clone(),
            message,
        })
    };
    let argv: Vec<String> = argv
        .iter()
        .map(|a| resolve(map_value(a, &mounts, ip)))
        .collect::<Result<_, _>>()?;

    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), PATH.into()),
        ("HOSTNAME".into(), name.to_string()),
    ];
    for var in at(spec, &["env"])
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let var_name = text(var, &["name"]).to_string();
        let value = env_value(store, pod, ip, var).map_err(|message| WorkloadError::Pod {
            pod: pod_label.clone(),
            message: format!("env {var_name}: {message}"),
        })?;
        if let Some(value) = value {
            env.retain(|(n, _)| *n != var_name);
            env.push((var_name, resolve(map_value(&value, &mounts, ip))?));
        }
    }
    let working_dir = match text(spec, &["workingDir"]) {
        "" => settings.pod_dir(namespace, name),
        dir => PathBuf::from(map_value(dir, &mounts, ip)),
    };
    std::fs::create_dir_all(&working_dir).map_err(|e| WorkloadError::io(&working_dir, e))?;
    let log_path = settings.log_path(namespace, name, container_name);
    // A new instance, a new log; the one before stays readable as the previous.
    if std::fs::metadata(&log_path).is_ok_and(|m| m.len() > 0) {
        let previous = settings.previous_log_path(namespace, name, container_name);
        std::fs::rename(&log_path, &previous).map_err(|e| WorkloadError::io(&previous, e))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| WorkloadError::io(&log_path, e))?;
    let log_err = log
        .try_clone()
        .map_err(|e| WorkloadError::io(&log_path, e))?;
    let mut command = Command::new(program);
    command
        .args(&argv)
        .env_clear()
        .envs(env)
        .current_dir(&working_dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .kill_on_drop(true);
    command.spawn().map_err(|e| WorkloadError::io(program, e))
}

/// The value of one `env` entry; `None` for an optional reference that is missing.
fn env_value(
    store: &Store,
    pod: &Value,
    ip: Ipv4Addr,
    var: &Value,
) -> Result<Option<String>, String> {
    if let Some(value) = var.get("value").and_then(Value::as_str) {
        return Ok(Some(value.to_string()));
    }
    let Some(from) = var.get("valueFrom") else {
        return Ok(Some(String::new()));
    };
    if let Some(path) = at(from, &["fieldRef", "fieldPath"]).and_then(Value::as_str) {
        let value = match path {
            "metadata.name" => name_of(pod).to_string(),
            "metadata.namespace" => namespace_of(pod).to_string(),
            "metadata.uid" => uid_of(pod).to_string(),
            "status.podIP" => ip.to_string(),
            "status.hostIP" => "127.0.0.1".to_string(),
            "spec.nodeName" => "dev".to_string(),
            "spec.serviceAccountName" => text(pod, &["spec", "serviceAccountName"]).to_string(),
            other => {
                let label = other
                    .strip_prefix("metadata.labels['")
                    .and_then(|l| l.strip_suffix("']"))
                    .map(|key| ("labels", key));
                let annotation = other
                    .strip_prefix("metadata.annotations['")
                    .and_then(|l| l.strip_suffix("']"))
                    .map(|key| ("annotations", key));
                match label.or(annotation) {
                    Some((field, key)) => text(pod, &["metadata", field, key]).to_string(),
                    None => return Err(format!("fieldPath {other:?} is not supported")),
                }
            }
        };
        return Ok(Some(value));
    }
    for (reference, plural) in [
        ("secretKeyRef", "secrets"),
        ("configMapKeyRef", "configmaps"),
    ] {
        let Some(reference) = from.get(reference) else {
            continue;
        };
        let optional = reference.get("optional").and_then(Value::as_bool) == Some(true);
        let key = text(reference, &["key"]);
        let found = key_values(store, namespace_of(pod), plural, text(reference, &["name"]))
            .ok()
            .and_then(|data| data.get(key).cloned());
        return match found {
            Some(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
            None if optional => Ok(None),
            None => Err(format!(
                "{plural} {:?} has no key {key:?}",
                text(reference, &["name"])
            )),
        };
    }
    Err("only value, fieldRef, secretKeyRef and configMapKeyRef are supported".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_address_and_mount_paths_are_rewritten() {
        let ip = Ipv4Addr::new(127, 1, 0, 7);
        let mounts = vec![
            ("/data/logs".to_string(), PathBuf::from("/s/logs")),
            ("/data".to_string(), PathBuf::from("/s/pvc")),
        ];
        assert_eq!(map_value("0.0.0.0:7400", &mounts, ip), "127.1.0.7:7400");
        assert_eq!(
            map_value("http://0.0.0.0/", &mounts, ip),
            "http://127.1.0.7/"
        );
        assert_eq!(map_value("10.0.0.0/8", &mounts, ip), "10.0.0.0/8");
        assert_eq!(map_value("/data", &mounts, ip), "/s/pvc");
        assert_eq!(map_value("/data/db/x", &mounts, ip), "/s/pvc/db/x");
        assert_eq!(map_value("/data/logs/a", &mounts, ip), "/s/logs/a");
        assert_eq!(map_value("/database", &mounts, ip), "/database");
        assert_eq!(map_value("--data=/data/x", &mounts, ip), "--data=/s/pvc/x");
        assert_eq!(map_value("a=b", &mounts, ip), "a=b");
        assert_eq!(
            map_value("--listen=0.0.0.0:1", &mounts, ip),
            "--listen=127.1.0.7:1"
        );
    }

    #[test]
    fn service_names_in_urls_become_a_selected_pods_address() {
        use crate::objects::{ResourceInfo, WriteOptions};
        let mut store = Store::default();
        let services = ResourceKey::new("", "v1", "services");
        let pods = super::super::util::pods();
        store.register(services.clone(), ResourceInfo::new("Service", true));
        store.register(
            pods.clone(),
            ResourceInfo::new("Pod", true).with_status_subresource(),
        );
        let now = k8s_openapi::jiff::Timestamp::now();
        let opts = WriteOptions::default();
        let service =
            serde_json::json!({"metadata": {"name": "db"}, "spec": {"selector": {"app": "db"}}});
        store.create(&services, "ns", service, &opts, now).unwrap();
        // Not resolvable until a selected pod has an address.
        let err = resolve_services(&store, "http://db.ns.svc:7400").unwrap_err();
        assert!(err.contains("no pod with an address"), "{err}");
        for (name, app, ip) in [("other", "web", "127.1.0.9"), ("db-0", "db", "127.1.0.4")] {
            let pod = serde_json::json!({"metadata": {"name": name, "labels": {"app": app}}});
            let mut created = store.create(&pods, "ns", pod, &opts, now).unwrap();
            created["status"] = serde_json::json!({"podIP": ip});
            store
                .update_status(&pods, "ns", name, created, &opts)
                .unwrap();
        }
        assert_eq!(
            resolve_services(&store, "--replica=http://db.ns.svc:7400/v1").unwrap(),
            "--replica=http://127.1.0.4:7400/v1"
        );
        assert_eq!(
            resolve_services(&store, "http://db.ns.svc.cluster.local").unwrap(),
            "http://127.1.0.4"
        );
        // Other hosts and plain text are left alone.
        for same in [
            "http://example.com:80/x",
            "db.ns.svc",
            "http://10.0.0.1:7400",
        ] {
            assert_eq!(resolve_services(&store, same).unwrap(), same);
        }
        assert!(
            resolve_services(&store, "http://nope.ns.svc:1")
                .unwrap_err()
                .contains("does not exist")
        );
    }
}
