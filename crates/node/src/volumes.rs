//! A pod's volumes as directories on the host, which each container then sees at its
//! mount paths (see [`super::container`]): emptyDir, secret, configMap, downwardAPI and
//! projected volumes (ServiceAccount tokens from the TokenRequest API, bound to the pod)
//! under the pod's directory; persistentVolumeClaim as the bound PersistentVolume's
//! `local.path` or `hostPath.path`; hostPath as the path.

use super::env::{PodFacts, field_value, object_keys, resource_value};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    DownwardAPIVolumeFile, KeyToPath, PersistentVolume, PersistentVolumeClaim, ServiceAccount,
};
use kube::api::PostParams;
use kube::{Api, Client};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

/// One volume as the containers get it.
#[derive(Clone, Debug)]
pub(super) struct VolumeDir {
    pub path: PathBuf,
    /// Secret, configMap, downwardAPI and projected volumes are always read-only.
    pub read_only: bool,
}

/// A ServiceAccount token file to renew.
#[derive(Clone, Debug)]
pub(super) struct TokenFile {
    pub file: PathBuf,
    pub service_account: String,
    pub audience: Option<String>,
    pub expiration_seconds: i64,
    pub mode: u32,
    pub renew_at: Instant,
}

#[derive(Debug, Default)]
pub(super) struct Prepared {
    pub volumes: BTreeMap<String, VolumeDir>,
    pub tokens: Vec<TokenFile>,
}

/// A relative path that stays inside its volume.
fn inside(dir: &Path, relative: &str) -> Result<PathBuf, String> {
    let rel = Path::new(relative);
    let ok = !relative.is_empty()
        && rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !ok {
        return Err(format!("path {relative:?} leaves its volume"));
    }
    Ok(dir.join(rel))
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    // Written aside and renamed, so that a reader never sees half a file.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode & 0o7777))
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn mode_of(mode: Option<i32>, default: u32) -> u32 {
    mode.and_then(|m| u32::try_from(m).ok()).unwrap_or(default)
}

/// Writes the keys of a Secret or ConfigMap into `dir`: all keys, or the `items` listed.
#[allow(clippy::too_many_arguments)]
async fn write_keys(
    client: &Client,
    namespace: &str,
    secret: bool,
    name: &str,
    items: Option<&Vec<KeyToPath>>,
    optional: bool,
    dir: &Path,
    mode: u32,
) -> Result<(), String> {
    let kind = if secret { "secret" } else { "configmap" };
    let Some(keys) = object_keys(client, namespace, secret, name).await? else {
        return if optional {
            Ok(())
        } else {
            Err(format!("{kind} {name:?} not found"))
        };
    };
    match items {
        Some(items) => {
            for item in items {
                match keys.get(&item.key) {
                    Some(bytes) => {
                        write_file(&inside(dir, &item.path)?, bytes, mode_of(item.mode, mode))?
                    }
                    None if optional => {}
                    None => return Err(format!("{kind} {name:?} has no key {:?}", item.key)),
                }
            }
        }
        None => {
            for (key, bytes) in &keys {
                write_file(&inside(dir, key)?, bytes, mode)?;
            }
        }
    }
    Ok(())
}

fn write_downward(
    facts: &PodFacts,
    items: &[DownwardAPIVolumeFile],
    dir: &Path,
    mode: u32,
) -> Result<(), String> {
    for item in items {
        let value = if let Some(field) = &item.field_ref {
            field_value(facts, &field.field_path)?
        } else if let Some(resource) = &item.resource_field_ref {
            let containers = facts.pod.spec.as_ref().map(|s| &s.containers);
            let container = containers
                .into_iter()
                .flatten()
                .find(|c| Some(&c.name) == resource.container_name.as_ref())
                .ok_or_else(|| {
                    format!(
                        "downwardAPI {}: resourceFieldRef names no container of the pod",
                        item.path
                    )
                })?;
            resource_value(
                facts,
                container,
                &resource.resource,
                resource.divisor.as_ref().map(|d| d.0.as_str()),
            )?
        } else {
            continue;
        };
        write_file(
            &inside(dir, &item.path)?,
            value.as_bytes(),
            mode_of(item.mode, mode),
        )?;
    }
    Ok(())
}

/// Asks the TokenRequest API for a token of the pod's ServiceAccount, bound to the pod,
/// and writes it; returns when to renew it (at 80% of its lifetime, as the kubelet does).
pub(super) async fn write_token(
    client: &Client,
    facts: &PodFacts<'_>,
    token: &TokenFile,
) -> Result<Instant, String> {
    let meta = &facts.pod.metadata;
    let namespace = meta.namespace.clone().unwrap_or_default();
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: token.audience.clone().map(|a| vec![a]),
            expiration_seconds: Some(token.expiration_seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: meta.name.clone(),
                uid: meta.uid.clone(),
            }),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let answer = api
        .create_token_request(&token.service_account, &PostParams::default(), &request)
        .await
        .map_err(|e| {
            format!(
                "token for serviceaccount {namespace}/{}: {e}",
                token.service_account
            )
        })?;
    let status = answer
        .status
        .ok_or_else(|| "the TokenRequest answer has no status".to_string())?;
    let text = status
        .token
        .ok_or_else(|| "the TokenRequest answer has no token".to_string())?;
    write_file(&token.file, text.as_bytes(), token.mode)?;
    let now = k8s_openapi::jiff::Timestamp::now();
    let left = status
        .expiration_timestamp
        .map(|t| t.0.duration_since(now).as_secs())
        .unwrap_or(token.expiration_seconds)
        .clamp(60, token.expiration_seconds.max(60));
    let renew = Duration::from_secs(u64::try_from(left).unwrap_or(3600) * 8 / 10);
    Ok(Instant::now() + renew)
}

/// Makes every volume of the pod (`dir` is the pod's own directory).
pub(super) async fn prepare(
    client: &Client,
    facts: &PodFacts<'_>,
    dir: &Path,
) -> Result<Prepared, String> {
    let pod = facts.pod;
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    let mut prepared = Prepared::default();
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.clone());
    for volume in volumes.into_iter().flatten() {
        let own = dir.join("volumes").join(&volume.name);
        let make = |path: &Path| {
            std::fs::create_dir_all(path).map_err(|e| format!("{}: {e}", path.display()))
        };
        let (path, read_only) = if volume.empty_dir.is_some() {
            make(&own)?;
            (own, false)
        } else if let Some(host) = &volume.host_path {
            let path = PathBuf::from(&host.path);
            match host.type_.as_deref().unwrap_or("") {
                "" | "DirectoryOrCreate" => make(&path)?,
                "FileOrCreate" if !path.exists() => write_file(&path, b"", 0o644)?,
                _ if !path.exists() => {
                    return Err(format!("hostPath {} does not exist", path.display()));
                }
                _ => {}
            }
            (path, false)
        } else if let Some(secret) = &volume.secret {
            make(&own)?;
            let name = secret.secret_name.clone().unwrap_or_default();
            let mode = mode_of(secret.default_mode, 0o644);
            let optional = secret.optional == Some(true);
            write_keys(
                client,
                &namespace,
                true,
                &name,
                secret.items.as_ref(),
                optional,
                &own,
                mode,
            )
            .await?;
            (own, true)
        } else if let Some(map) = &volume.config_map {
            make(&own)?;
            let mode = mode_of(map.default_mode, 0o644);
            let optional = map.optional == Some(true);
            write_keys(
                client,
                &namespace,
                false,
                &map.name,
                map.items.as_ref(),
                optional,
                &own,
                mode,
            )
            .await?;
            (own, true)
        } else if let Some(downward) = &volume.downward_api {
            make(&own)?;
            let mode = mode_of(downward.default_mode, 0o644);
            write_downward(facts, downward.items.as_deref().unwrap_or(&[]), &own, mode)?;
            (own, true)
        } else if let Some(projected) = &volume.projected {
            make(&own)?;
            let mode = mode_of(projected.default_mode, 0o644);
            for source in projected.sources.iter().flatten() {
                if let Some(secret) = &source.secret {
                    let optional = secret.optional == Some(true);
                    write_keys(
                        client,
                        &namespace,
                        true,
                        &secret.name,
                        secret.items.as_ref(),
                        optional,
                        &own,
                        mode,
                    )
                    .await?;
                }
                if let Some(map) = &source.config_map {
                    let optional = map.optional == Some(true);
                    write_keys(
                        client,
                        &namespace,
                        false,
                        &map.name,
                        map.items.as_ref(),
                        optional,
                        &own,
                        mode,
                    )
                    .await?;
                }
                if let Some(downward) = &source.downward_api {
                    write_downward(facts, downward.items.as_deref().unwrap_or(&[]), &own, mode)?;
                }
                if let Some(token) = &source.service_account_token {
                    let mut file = TokenFile {
                        file: inside(&own, &token.path)?,
                        service_account: service_account.clone(),
                        audience: token.audience.clone().filter(|a| !a.is_empty()),
                        expiration_seconds: token.expiration_seconds.unwrap_or(3600),
                        mode,
                        renew_at: Instant::now(),
                    };
                    file.renew_at = write_token(client, facts, &file).await?;
                    prepared.tokens.push(file);
                }
                if source.cluster_trust_bundle.is_some() || source.pod_certificate.is_some() {
                    return Err(format!(
                        "volume {}: clusterTrustBundle and podCertificate projections are not supported",
                        volume.name
                    ));
                }
            }
            (own, true)
        } else if let Some(claim) = &volume.persistent_volume_claim {
            (
                claim_path(client, &namespace, &claim.claim_name).await?,
                claim.read_only == Some(true),
            )
        } else {
            return Err(format!(
                "volume {}: only emptyDir, hostPath, secret, configMap, downwardAPI, projected and persistentVolumeClaim volumes are supported",
                volume.name
            ));
        };
        prepared
            .volumes
            .insert(volume.name.clone(), VolumeDir { path, read_only });
    }
    Ok(prepared)
}

/// The directory of the PersistentVolume a claim is bound to.
async fn claim_path(client: &Client, namespace: &str, claim: &str) -> Result<PathBuf, String> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let object = claims
        .get(claim)
        .await
        .map_err(|e| format!("persistentvolumeclaim {claim}: {e}"))?;
    let bound = object.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    let volume = object
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|v| !v.is_empty() && bound)
        .ok_or_else(|| format!("persistentvolumeclaim {claim} is not bound yet"))?;
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let pv = volumes
        .get(&volume)
        .await
        .map_err(|e| format!("persistentvolume {volume}: {e}"))?;
    let spec = pv.spec.unwrap_or_default();
    let path = spec
        .local
        .map(|l| l.path)
        .or(spec.host_path.map(|h| h.path))
        .ok_or_else(|| {
            format!("persistentvolume {volume} is neither a local nor a hostPath volume")
        })?;
    let path = PathBuf::from(path);
    std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_paths_stay_inside_the_volume() {
        let dir = Path::new("/v");
        assert_eq!(inside(dir, "a/b").unwrap(), PathBuf::from("/v/a/b"));
        assert!(inside(dir, "../x").is_err());
        assert!(inside(dir, "/etc/passwd").is_err());
        assert!(inside(dir, "").is_err());
    }
}
