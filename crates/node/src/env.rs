//! A container's environment as the kubelet makes it: `envFrom`, then `env` in order
//! with `$(VAR)` references expanded against what is defined so far, `fieldRef`,
//! `resourceFieldRef`, `secretKeyRef`, `configMapKeyRef`; and the downward API values
//! the volumes share.

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::{Api, Client};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// `$(NAME)` replaced by `lookup(NAME)` where it has a value (left as written where it
/// has none), `$$` by `$`, as Kubernetes expands `command`, `args` and `env`.
pub(super) fn expand(value: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(close) = inner.find(')')
        {
            let name = &inner[..close];
            match lookup(name) {
                Some(found) => out.push_str(&found),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// What a pod's environment and downward API volumes may refer to besides the pod.
pub(super) struct PodFacts<'a> {
    pub pod: &'a Pod,
    pub ip: Ipv4Addr,
    pub node: &'a str,
    /// The node's cpu count and memory in bytes, for limits a container does not set.
    pub cpus: u64,
    pub memory: u64,
}

fn labels_text(map: Option<&BTreeMap<String, String>>) -> String {
    map.into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v:?}\n"))
        .collect()
}

/// The value of a `fieldRef` path.
pub(super) fn field_value(facts: &PodFacts, path: &str) -> Result<String, String> {
    let meta = &facts.pod.metadata;
    let spec = facts.pod.spec.as_ref();
    let key_in = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|p| p.strip_suffix("']"))
            .map(str::to_string)
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => labels_text(meta.labels.as_ref()),
        "metadata.annotations" => labels_text(meta.annotations.as_ref()),
        "spec.nodeName" => facts.node.to_string(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.podIP" | "status.podIPs" => facts.ip.to_string(),
        "status.hostIP" | "status.hostIPs" => "127.0.0.1".to_string(),
        other => {
            if let Some(key) = key_in("metadata.labels['") {
                meta.labels
                    .as_ref()
                    .and_then(|l| l.get(&key))
                    .cloned()
                    .unwrap_or_default()
            } else if let Some(key) = key_in("metadata.annotations['") {
                meta.annotations
                    .as_ref()
                    .and_then(|l| l.get(&key))
                    .cloned()
                    .unwrap_or_default()
            } else {
                return Err(format!("fieldPath {other:?} is not supported"));
            }
        }
    })
}

/// A quantity in milli-units (`250m` is 250, `2` is 2000, `1Gi` is 1073741824000).
pub(super) fn milli_of(quantity: &str) -> Option<u128> {
    let quantity = quantity.trim();
    let split = quantity
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(split);
    let factor: f64 = match suffix {
        "" => 1000.0,
        "m" => 1.0,
        "k" => 1e6,
        "M" => 1e9,
        "G" => 1e12,
        "T" => 1e15,
        "Ki" => 1024.0 * 1000.0,
        "Mi" => 1024f64.powi(2) * 1000.0,
        "Gi" => 1024f64.powi(3) * 1000.0,
        "Ti" => 1024f64.powi(4) * 1000.0,
        _ => return None,
    };
    let number: f64 = number.parse().ok()?;
    Some((number * factor).ceil() as u128)
}

/// The value of a `resourceFieldRef` (limits or requests of cpu, memory or
/// ephemeral-storage; a limit the container does not set is the node's capacity).
pub(super) fn resource_value(
    facts: &PodFacts,
    container: &Container,
    resource: &str,
    divisor: Option<&str>,
) -> Result<String, String> {
    let resources = container.resources.as_ref();
    let (kind, name) = resource
        .split_once('.')
        .ok_or_else(|| format!("resource {resource:?} is not supported"))?;
    let set = match kind {
        "limits" => resources.and_then(|r| r.limits.as_ref()),
        "requests" => resources.and_then(|r| r.requests.as_ref()),
        _ => return Err(format!("resource {resource:?} is not supported")),
    }
    .and_then(|m| m.get(name))
    .and_then(|q| milli_of(&q.0));
    let value = match (set, name) {
        (Some(v), _) => v,
        (None, "cpu") if kind == "limits" => u128::from(facts.cpus) * 1000,
        (None, "memory") if kind == "limits" => u128::from(facts.memory) * 1000,
        (None, _) => 0,
    };
    let divisor = divisor
        .and_then(milli_of)
        .filter(|d| *d > 0)
        .unwrap_or(1000);
    Ok(value.div_ceil(divisor).to_string())
}

/// The keys of a Secret (`data`, `stringData`) or a ConfigMap (`data`, `binaryData`);
/// `Ok(None)` when the object does not exist.
pub(super) async fn object_keys(
    client: &Client,
    namespace: &str,
    secret: bool,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
    let mut out = BTreeMap::new();
    if secret {
        let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let Some(object) = api
            .get_opt(name)
            .await
            .map_err(|e| format!("secret {name}: {e}"))?
        else {
            return Ok(None);
        };
        for (k, v) in object.data.into_iter().flatten() {
            out.insert(k, v.0);
        }
        for (k, v) in object.string_data.into_iter().flatten() {
            out.insert(k, v.into_bytes());
        }
    } else {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        let Some(object) = api
            .get_opt(name)
            .await
            .map_err(|e| format!("configmap {name}: {e}"))?
        else {
            return Ok(None);
        };
        for (k, v) in object.binary_data.into_iter().flatten() {
            out.insert(k, v.0);
        }
        for (k, v) in object.data.into_iter().flatten() {
            out.insert(k, v.into_bytes());
        }
    }
    Ok(Some(out))
}

/// The environment `container` declares, in order, expanded; `base` comes first and may
/// be overridden.
pub(super) async fn container_env(
    client: &Client,
    facts: &PodFacts<'_>,
    container: &Container,
    base: Vec<(String, String)>,
) -> Result<Vec<(String, String)>, String> {
    let namespace = facts.pod.metadata.namespace.clone().unwrap_or_default();
    let mut env: Vec<(String, String)> = base;
    let set = |env: &mut Vec<(String, String)>, name: String, value: String| {
        env.retain(|(n, _)| *n != name);
        env.push((name, value));
    };
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        let (secret, name, optional) = match (&source.secret_ref, &source.config_map_ref) {
            (Some(s), _) => (true, s.name.clone(), s.optional == Some(true)),
            (None, Some(c)) => (false, c.name.clone(), c.optional == Some(true)),
            (None, None) => continue,
        };
        match object_keys(client, &namespace, secret, &name).await? {
            Some(keys) => {
                for (key, value) in keys {
                    set(
                        &mut env,
                        format!("{prefix}{key}"),
                        String::from_utf8_lossy(&value).into_owned(),
                    );
                }
            }
            None if optional => {}
            None => {
                let kind = if secret { "secret" } else { "configmap" };
                return Err(format!("envFrom: {kind} {name:?} not found"));
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = if let Some(from) = &var.value_from {
            if let Some(field) = &from.field_ref {
                Some(field_value(facts, &field.field_path)?)
            } else if let Some(resource) = &from.resource_field_ref {
                let target = match &resource.container_name {
                    Some(name) if !name.is_empty() => facts
                        .pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.containers.iter().find(|c| &c.name == name))
                        .unwrap_or(container),
                    _ => container,
                };
                Some(resource_value(
                    facts,
                    target,
                    &resource.resource,
                    resource.divisor.as_ref().map(|d| d.0.as_str()),
                )?)
            } else {
                let (secret, name, key, optional) = match (
                    &from.secret_key_ref,
                    &from.config_map_key_ref,
                ) {
                    (Some(s), _) => (true, &s.name, &s.key, s.optional == Some(true)),
                    (None, Some(c)) => (false, &c.name, &c.key, c.optional == Some(true)),
                    (None, None) => {
                        return Err(format!(
                            "env {}: only value, fieldRef, resourceFieldRef, secretKeyRef and configMapKeyRef are supported",
                            var.name
                        ));
                    }
                };
                let found = object_keys(client, &namespace, secret, name)
                    .await?
                    .and_then(|keys| keys.get(key).cloned());
                match found {
                    Some(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
                    None if optional => None,
                    None => {
                        let kind = if secret { "secret" } else { "configmap" };
                        return Err(format!(
                            "env {}: {kind} {name:?} has no key {key:?}",
                            var.name
                        ));
                    }
                }
            }
        } else {
            let defined: BTreeMap<String, String> = env.iter().cloned().collect();
            let raw = var.value.clone().unwrap_or_default();
            Some(expand(&raw, &|name| defined.get(name).cloned()))
        };
        if let Some(value) = value {
            set(&mut env, var.name.clone(), value);
        }
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_expand_as_kubernetes_does() {
        let lookup = |name: &str| (name == "A").then(|| "x".to_string());
        assert_eq!(expand("$(A)-$(B)", &lookup), "x-$(B)");
        assert_eq!(expand("$$(A) $ $(A", &lookup), "$(A) $ $(A");
        assert_eq!(expand("plain", &lookup), "plain");
    }

    #[test]
    fn quantities_in_milli_units() {
        assert_eq!(milli_of("250m"), Some(250));
        assert_eq!(milli_of("2"), Some(2000));
        assert_eq!(milli_of("1Ki"), Some(1_024_000));
        assert_eq!(milli_of("1x"), None);
    }
}
