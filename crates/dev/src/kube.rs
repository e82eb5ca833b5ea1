//! `dev up` on the real Kubernetes control plane: `e2e/kube/up.sh` starts etcd,
//! kube-apiserver, kube-controller-manager and kube-scheduler in `STATE/kube` (its
//! objects kept from one run to the next), this process runs the node agent with one
//! Node per zone its Sites name, and the operator with the administrator's kubeconfig.
//!
//! [`up`] answers whether the real control plane can be had here and runs on it; when
//! it cannot ([`Outcome::Unavailable`]) the caller runs the stand-in instead.

use crate::cluster::{self, ClusterError, StateDir};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::io::AsyncBufReadExt;

/// Where the control plane's programs come from.
#[derive(Clone, Debug, Default)]
pub struct KubeOptions {
    /// The harness scripts (`e2e/kube`); `None`: the checkout this program was built
    /// from, else `./e2e/kube`.
    pub harness: Option<PathBuf>,
    /// A directory of official release binaries (kube-apiserver, kube-controller-manager,
    /// kube-scheduler; etcd there or on PATH) to use instead of building.
    pub binaries: Option<PathBuf>,
}

/// The zones `dev up` makes nodes for when no Site names one.
pub const DEFAULT_ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

/// The StorageClass the node agent installs (the default class).
const STORAGE_CLASS: &str = "standard";

/// The outcome of [`prepare`].
enum Prepared {
    /// The control plane runs; [`run`] takes it from here.
    Running(ControlPlane),
    /// It cannot be had here, for this reason (one line); nothing was left running.
    Unavailable(String),
}

/// The outcome of [`up`].
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It ran until shutdown (or never started because shutdown came first).
    Ran,
    /// The real control plane cannot be had here, for this reason (one line); nothing
    /// was started and the pid file is gone.
    Unavailable(String),
}

/// `dev up` on the real control plane until `shutdown` completes (which may come while
/// the control plane is still being built or started: it is then stopped).
pub async fn up<S>(
    state: &StateDir,
    options: &cluster::UpOptions,
    kube: &KubeOptions,
    shutdown: S,
    report: impl Fn(&str) + Send + Sync + 'static,
) -> Result<Outcome, ClusterError>
where
    S: std::future::Future<Output = ()> + Send + 'static,
{
    std::fs::create_dir_all(&state.0).map_err(|e| ClusterError::File {
        path: state.0.display().to_string(),
        reason: e.to_string(),
    })?;
    if let Some(pid) = cluster::running_pid(state) {
        return Err(ClusterError::AlreadyRunning {
            dir: state.0.display().to_string(),
            pid,
        });
    }
    // Refused before anything starts: a manifest path that does not exist.
    cluster::manifest_files(&options.manifests)?;
    std::fs::write(state.pid_file(), std::process::id().to_string()).map_err(|e| {
        ClusterError::File {
            path: state.pid_file().display().to_string(),
            reason: e.to_string(),
        }
    })?;
    let mut shutdown = Box::pin(shutdown);
    let prepared = tokio::select! {
        prepared = prepare(state, kube, &report) => prepared,
        _ = &mut shutdown => {
            // up.sh is killed with its future; what it had started is stopped here.
            if let Some(harness) = harness_dir(kube) {
                ControlPlane { harness, dir: state.0.join("kube") }.stop().await;
            }
            let _ = std::fs::remove_file(state.pid_file());
            return Ok(Outcome::Ran);
        }
    };
    match prepared {
        Ok(Prepared::Running(plane)) => {
            run(state, plane, options, shutdown, report).await?;
            Ok(Outcome::Ran)
        }
        Ok(Prepared::Unavailable(reason)) => {
            let _ = std::fs::remove_file(state.pid_file());
            Ok(Outcome::Unavailable(reason))
        }
        Err(e) => {
            let _ = std::fs::remove_file(state.pid_file());
            Err(e)
        }
    }
}

/// A started control plane in `STATE/kube`.
pub struct ControlPlane {
    harness: PathBuf,
    dir: PathBuf,
}

impl ControlPlane {
    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Stops the control plane's programs (its data stays for the next run).
    async fn stop(&self) {
        let status = tokio::process::Command::new(self.harness.join("down.sh"))
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if !status.is_ok_and(|s| s.success()) {
            tracing::warn!(dir = %self.dir.display(), "e2e/kube/down.sh did not stop everything");
        }
    }
}

/// The harness scripts: `options.harness`, else the checkout this program was built
/// from, else `./e2e/kube`.
fn harness_dir(options: &KubeOptions) -> Option<PathBuf> {
    let candidates = match &options.harness {
        Some(dir) => vec![dir.clone()],
        None => vec![
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../e2e/kube"),
            PathBuf::from("e2e/kube"),
        ],
    };
    candidates
        .into_iter()
        .find(|dir| dir.join("up.sh").is_file())
        .and_then(|dir| std::fs::canonicalize(dir).ok())
}

/// Finds out whether the real control plane can run here and starts it in
/// `STATE/kube`, printing its progress (a first run builds it: minutes, with an
/// estimate). Unavailable: not root (the node agent makes mount namespaces), no
/// harness scripts, or what they need cannot be had (up.sh's exit 2).
async fn prepare(
    state: &StateDir,
    options: &KubeOptions,
    report: &(impl Fn(&str) + Sync),
) -> Result<Prepared, ClusterError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(Prepared::Unavailable(
            "the node agent needs root (it gives each pod a mount namespace)".into(),
        ));
    }
    let Some(harness) = harness_dir(options) else {
        return Ok(Prepared::Unavailable(match &options.harness {
            Some(dir) => format!("no up.sh in {}", dir.display()),
            None => "its scripts (e2e/kube of the source tree) are not here".into(),
        }));
    };
    if let Some(dir) = &options.binaries
        && !dir.is_dir()
    {
        return Err(ClusterError::File {
            path: dir.display().to_string(),
            reason: "--kube-binaries: not a directory".into(),
        });
    }
    let dir = state.0.join("kube");
    let plane = ControlPlane { harness, dir };
    // What a killed earlier run left running is stopped first (up.sh refuses it).
    plane.stop().await;
    report(&format!(
        "starting the real Kubernetes control plane in {}",
        plane.dir.display()
    ));
    let mut command = tokio::process::Command::new(plane.harness.join("up.sh"));
    command
        .arg(&plane.dir)
        .env("MULTISITE_KUBE_KEEP", "1")
        .env("MULTISITE_KUBE_NODES", "")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match &options.binaries {
        Some(binaries) => command.env("MULTISITE_KUBE_BINARIES", binaries),
        None => command.env_remove("MULTISITE_KUBE_BINARIES"),
    };
    let mut child = command.spawn().map_err(|e| ClusterError::File {
        path: plane.harness.join("up.sh").display().to_string(),
        reason: format!("cannot run: {e}"),
    })?;
    // Progress goes to the person as it comes; the error lines are kept for the reason.
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let progress = async {
        if let Some(out) = stdout {
            let mut lines = tokio::io::BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                report(&line);
            }
        }
    };
    let errors = async {
        let mut kept = Vec::new();
        if let Some(err) = stderr {
            let mut lines = tokio::io::BufReader::new(err).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if !line.starts_with(UNAVAILABLE) {
                    report(&line);
                }
                kept.push(line);
            }
        }
        kept
    };
    let ((), errors, status) = tokio::join!(progress, errors, child.wait());
    let status = status.map_err(|e| ClusterError::ApiServer(format!("up.sh: {e}")))?;
    match status.code() {
        Some(0) => Ok(Prepared::Running(plane)),
        Some(2) => Ok(Prepared::Unavailable(
            errors
                .iter()
                .rev()
                .find_map(|l| l.strip_prefix(UNAVAILABLE))
                .unwrap_or("e2e/kube/up.sh exited with 2")
                .trim()
                .to_string(),
        )),
        _ => Err(ClusterError::ApiServer(format!(
            "the real control plane did not start ({}): {}; `dev up --stand-in` runs the embedded one",
            status,
            errors
                .last()
                .map(String::as_str)
                .unwrap_or("see the lines above")
        ))),
    }
}

/// How up.sh and install.sh begin the line that says the harness cannot be had.
const UNAVAILABLE: &str = "kube harness unavailable:";

/// A node name for a zone: lower case, characters other than letters, digits, `-` and
/// `.` made `-`, prefixed `node-`.
pub fn node_name(zone: &str) -> String {
    let cleaned: String = zone
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = cleaned.trim_matches(['-', '.']);
    // Cut to the longest name Kubernetes takes, then end on a letter or digit again.
    let name: String = format!("node-{trimmed}").chars().take(253).collect();
    name.trim_end_matches(['-', '.']).to_string()
}

/// The zones to make nodes for: every zone the cluster's Sites name, or
/// [`DEFAULT_ZONES`] when none names one.
pub fn zones_for<'a>(site_zones: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    let zones: BTreeSet<String> = site_zones
        .into_iter()
        .filter(|z| !z.is_empty())
        .map(str::to_string)
        .collect();
    if zones.is_empty() {
        DEFAULT_ZONES.iter().map(|z| z.to_string()).collect()
    } else {
        zones
    }
}

/// Runs on the started control plane until `shutdown`: applies the CRDs and
/// manifests, starts the node agent and the operator, reports the fleet as it
/// changes, and on shutdown stops them and the control plane.
async fn run(
    state: &StateDir,
    plane: ControlPlane,
    options: &cluster::UpOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    report: impl Fn(&str) + Send + Sync + 'static,
) -> Result<(), ClusterError> {
    let outcome = run_on(state, &plane, options, shutdown, report).await;
    plane.stop().await;
    let _ = std::fs::remove_file(state.pid_file());
    outcome
}

fn kube_error(what: &str, e: impl std::fmt::Display) -> ClusterError {
    ClusterError::ApiServer(format!("{what}: {e}"))
}

async fn run_on(
    state: &StateDir,
    plane: &ControlPlane,
    options: &cluster::UpOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    report: impl Fn(&str) + Send + Sync + 'static,
) -> Result<(), ClusterError> {
    let files = cluster::manifest_files(&options.manifests)?;
    let admin = plane.kubeconfig();
    // README's kubectl line names STATE/kubeconfig, whichever cluster runs.
    std::fs::copy(&admin, state.kubeconfig()).map_err(|e| ClusterError::File {
        path: state.kubeconfig().display().to_string(),
        reason: e.to_string(),
    })?;
    let (client, config) = multisite_node::client_from_kubeconfig(&admin)
        .await
        .map_err(|e| kube_error("the administrator's kubeconfig", e))?;
    for line in cluster::apply_all(&client, &files).await? {
        report(&format!("applied {line}"));
    }
    report(&format!("kubeconfig: {}", state.kubeconfig().display()));

    let sites: kube::Api<multisite_core::api::Site> = kube::Api::all(client.clone());
    let sites = sites
        .list(&Default::default())
        .await
        .map_err(|e| kube_error("listing Sites", e))?;
    let zones = zones_for(sites.items.iter().filter_map(|s| s.spec.zone.as_deref()));
    let mut nodes = Vec::new();
    for zone in &zones {
        let name = node_name(zone);
        if !plane
            .dir
            .join("nodes")
            .join(&name)
            .join("kubeconfig")
            .is_file()
        {
            mint_credentials(plane, &name).await?;
        }
        nodes.push(multisite_node::NodeName {
            name,
            zone: zone.clone(),
        });
    }
    report(&format!(
        "nodes: {}",
        nodes
            .iter()
            .map(|n| format!("{} (zone {})", n.name, n.zone))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut agent_settings =
        multisite_node::Settings::new(nodes, plane.dir.join("nodes"), state.0.join("node"));
    agent_settings.first_pod_address = options.first_pod_address;
    agent_settings.kubelet_port_base = 0;
    agent_settings.provisioner_kubeconfig = Some(admin.clone());
    agent_settings.install_storage_class = Some(STORAGE_CLASS.into());
    let agent = tokio::spawn(multisite_node::run(agent_settings, wait(stopped.clone())));

    let operator_task = if options.operator {
        report("operator running in this process (--no-operator to run your own)");
        let mut config = config;
        cluster::present_operator_agent(&mut config);
        let operator_client =
            kube::Client::try_from(config).map_err(|e| kube_error("the operator's client", e))?;
        Some(tokio::spawn(multisite_operator::run(
            operator_client,
            cluster::operator_settings(),
            wait(stopped.clone()),
        )))
    } else {
        None
    };
    let summaries = {
        let client = client.clone();
        cluster::spawn_summaries(
            move || {
                let client = client.clone();
                async move { summary(&client).await }
            },
            report,
            stopped.clone(),
        )
    };
    // The agent may stop on its own (a port it cannot bind, a credential refused).
    let mut agent = agent;
    let agent_result = tokio::select! {
        _ = shutdown => None,
        result = &mut agent => Some(result),
    };
    let _ = stop.send(true);
    cluster::join_operator(operator_task).await;
    let agent_result = match agent_result {
        Some(result) => result,
        None => agent.await,
    };
    let _ = summaries.await;
    match agent_result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ClusterError::Workloads(format!("the node agent: {e}"))),
        Err(e) => Err(ClusterError::Workloads(format!("the node agent: {e}"))),
    }
}

/// `e2e/kube/node-credentials.sh` for one more node.
async fn mint_credentials(plane: &ControlPlane, name: &str) -> Result<(), ClusterError> {
    let output = tokio::process::Command::new(plane.harness.join("node-credentials.sh"))
        .arg(&plane.dir)
        .arg(name)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| kube_error("node-credentials.sh", e))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(ClusterError::ApiServer(format!(
            "credentials for node {name}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// One line about the fleet, as the stand-in's summary.
async fn summary(client: &kube::Client) -> String {
    use k8s_openapi::api::core::v1::Pod;
    use multisite_core::api::{Replica, ReplicaFamily, SchemaPackage, Site};
    async fn count<K>(client: &kube::Client) -> String
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned,
        K::DynamicType: Default,
    {
        let api: kube::Api<K> = kube::Api::all(client.clone());
        match api.list_metadata(&Default::default()).await {
            Ok(list) => list.items.len().to_string(),
            Err(_) => "?".into(),
        }
    }
    let pods: kube::Api<Pod> = kube::Api::all(client.clone());
    let (total, ready) = match pods.list(&Default::default()).await {
        Ok(list) => {
            let ready = list
                .items
                .iter()
                .filter(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                })
                .count();
            (list.items.len().to_string(), ready.to_string())
        }
        Err(_) => ("?".into(), "?".into()),
    };
    format!(
        "families {}  sites {}  replicas {}  schema packages {}  pods {total} ({ready} ready)",
        count::<ReplicaFamily>(client).await,
        count::<Site>(client).await,
        count::<Replica>(client).await,
        count::<SchemaPackage>(client).await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_valid_for_any_zone() {
        for (zone, name) in [
            ("asia-northeast1-a", "node-asia-northeast1-a"),
            ("Zone_A", "node-zone-a"),
            ("-eu.west-", "node-eu.west"),
            ("a b/c", "node-a-b-c"),
        ] {
            assert_eq!(node_name(zone), name, "zone {zone:?}");
        }
        let long = "z".repeat(400);
        assert_eq!(node_name(&long).len(), 253);
        // Cut where a '-' falls: the name still ends on a letter.
        let cut = format!("{}-b", "z".repeat(247));
        assert_eq!(node_name(&cut), format!("node-{}", "z".repeat(247)));
    }

    #[test]
    fn zones_default_to_three_when_no_site_names_one() {
        assert_eq!(
            zones_for(["", ""]).into_iter().collect::<Vec<_>>(),
            ["zone-a", "zone-b", "zone-c"]
        );
        assert_eq!(
            zones_for(["paris", "tokyo", "paris"])
                .into_iter()
                .collect::<Vec<_>>(),
            ["paris", "tokyo"]
        );
    }
}
