//! The embedded cluster as one process: the API server, the workload runner, our
//! CRDs installed and the given manifests applied, state kept in a directory so a
//! restart resumes the fleet.

use crate::apiserver::{self, ApiServer};
use crate::objects::Store;
use crate::workloads::{self, StoreAccess};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use multisite_core::api::manifest;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Field manager of everything `dev up` applies.
pub const FIELD_MANAGER: &str = "multisite-dev";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error(
        "a dev cluster already runs from {dir} (process {pid}); stop it with `multisite dev down --dir {dir}`"
    )]
    AlreadyRunning { dir: String, pid: u32 },
    #[error("the embedded API server: {0}")]
    ApiServer(String),
    #[error("{0}")]
    Manifest(#[from] manifest::ManifestError),
    #[error("applying {object}: {reason}")]
    Apply { object: String, reason: String },
    #[error("the workload runner: {0}")]
    Workloads(String),
}

impl StoreAccess for ApiServer {
    fn with_store<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        self.write(f)
    }
}

/// Pod logs as the workload runner writes them.
impl apiserver::logs::LogFiles for workloads::Settings {
    fn log_file(&self, namespace: &str, pod: &str, container: &str, previous: bool) -> PathBuf {
        if previous {
            self.previous_log_path(namespace, pod, container)
        } else {
            self.log_path(namespace, pod, container)
        }
    }
}

/// Where a dev cluster keeps its files.
pub struct StateDir(pub PathBuf);

impl StateDir {
    /// `dir` made absolute (against the current directory): the paths derived from it
    /// are handed to pods whose processes run elsewhere.
    pub fn new(dir: impl AsRef<Path>) -> Result<Self, ClusterError> {
        let dir = dir.as_ref();
        std::path::absolute(dir)
            .map(StateDir)
            .map_err(|e| file_error(dir, e))
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.0.join("kubeconfig")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.0.join("dev.pid")
    }
    pub fn snapshot(&self) -> PathBuf {
        self.0.join("objects.json")
    }
    pub fn workloads(&self) -> PathBuf {
        self.0.join("workloads")
    }
}

fn file_error(path: &Path, reason: impl ToString) -> ClusterError {
    ClusterError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Whether process `pid` is alive: it has a /proc entry and is not a zombie
/// (an exited child its parent has not reaped yet).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// The process id written by a running dev cluster, if it is alive.
pub fn running_pid(state: &StateDir) -> Option<u32> {
    let text = std::fs::read_to_string(state.pid_file()).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    process_alive(pid).then_some(pid)
}

/// Every manifest file named: files as they are, directories' `.yaml`/`.yml`/`.json`
/// files in name order.
pub fn manifest_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ClusterError> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| file_error(path, e))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
                })
                .collect();
            inside.sort();
            files.extend(inside);
        } else if path.exists() {
            files.push(path.clone());
        } else {
            return Err(file_error(path, "no such file or directory"));
        }
    }
    Ok(files)
}

/// Applies our CRDs and then every object of `files` with server-side apply.
/// Returns one line per object applied.
pub async fn apply_all(
    client: &kube::Client,
    files: &[PathBuf],
) -> Result<Vec<String>, ClusterError> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut applied = Vec::new();
    for crd in multisite_core::api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .map_err(|e| ClusterError::Apply {
                object: format!("CustomResourceDefinition {name}"),
                reason: e.to_string(),
            })?;
        applied.push(format!("customresourcedefinition/{name}"));
    }
    for crd in multisite_core::api::crds() {
        wait_established(&crds, &crd.metadata.name.clone().unwrap_or_default()).await?;
    }
    let mut documents = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|e| file_error(file, e))?;
        documents.extend(manifest::documents(&file.display().to_string(), &text)?);
    }
    if documents.is_empty() {
        return Ok(applied);
    }
    let mut discovery = kube::Discovery::new(client.clone())
        .run()
        .await
        .map_err(|e| ClusterError::ApiServer(e.to_string()))?;
    for (origin, value) in documents {
        let object: DynamicObject =
            serde_json::from_value(value).map_err(|e| ClusterError::Apply {
                object: origin.to_string(),
                reason: e.to_string(),
            })?;
        let types = object.types.clone().unwrap_or_default();
        let (group, version) = match types.api_version.split_once('/') {
            Some((g, v)) => (g.to_string(), v.to_string()),
            None => (String::new(), types.api_version.clone()),
        };
        let gvk = GroupVersionKind::gvk(&group, &version, &types.kind);
        // A delegate may list a CRD's kind in discovery a moment after it is Established.
        let mut attempts = 0;
        while discovery.resolve_gvk(&gvk).is_none() && attempts < DISCOVERY_ATTEMPTS {
            attempts += 1;
            tokio::time::sleep(POLL).await;
            discovery = kube::Discovery::new(client.clone())
                .run()
                .await
                .map_err(|e| ClusterError::ApiServer(e.to_string()))?;
        }
        let Some((resource, caps)) = discovery.resolve_gvk(&gvk) else {
            return Err(ClusterError::Apply {
                object: origin.to_string(),
                reason: format!("the cluster serves no {} {}", types.api_version, types.kind),
            });
        };
        let name = object.metadata.name.clone().unwrap_or_default();
        let api: Api<DynamicObject> = match caps.scope {
            kube::discovery::Scope::Namespaced => {
                let ns = object
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".to_string());
                ensure_namespace(client, &ns).await?;
                Api::namespaced_with(client.clone(), &ns, &resource)
            }
            kube::discovery::Scope::Cluster => Api::all_with(client.clone(), &resource),
        };
        api.patch(&name, &params, &Patch::Apply(&object))
            .await
            .map_err(|e| ClusterError::Apply {
                object: origin.to_string(),
                reason: e.to_string(),
            })?;
        applied.push(format!("{}/{name}", resource.plural));
    }
    Ok(applied)
}

/// How often `dev up` looks again at a CRD or at discovery it waits for.
const POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// How long `dev up` waits for a CRD to become Established.
const ESTABLISHED_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);

/// How often discovery is asked again for a kind it does not list yet.
const DISCOVERY_ATTEMPTS: u32 = 25;

/// Waits until the CRD `name` has the condition `Established` (at once on the embedded
/// server; a delegate takes a moment).
async fn wait_established(
    crds: &Api<CustomResourceDefinition>,
    name: &str,
) -> Result<(), ClusterError> {
    let deadline = tokio::time::Instant::now() + ESTABLISHED_WITHIN;
    loop {
        let crd = crds.get(name).await.map_err(|e| ClusterError::Apply {
            object: format!("CustomResourceDefinition {name}"),
            reason: e.to_string(),
        })?;
        let established = crd
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
        if established {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ClusterError::Apply {
                object: format!("CustomResourceDefinition {name}"),
                reason: format!("not Established within {} s", ESTABLISHED_WITHIN.as_secs()),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Creates namespace `ns` if it does not exist (manifests may name their own).
async fn ensure_namespace(client: &kube::Client, ns: &str) -> Result<(), ClusterError> {
    use k8s_openapi::api::core::v1::Namespace;
    let api: Api<Namespace> = Api::all(client.clone());
    let object: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}
    }))
    .map_err(|e| ClusterError::ApiServer(e.to_string()))?;
    api.patch(
        ns,
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(&object),
    )
    .await
    .map(|_| ())
    .map_err(|e| ClusterError::Apply {
        object: format!("Namespace {ns}"),
        reason: e.to_string(),
    })
}

/// One line about the fleet: our resources and the pods.
pub fn summary(server: &ApiServer) -> String {
    server.read(|store| {
        let count = |group: &str, plural: &str| -> usize {
            store
                .resources()
                .into_iter()
                .find(|(key, _)| key.group == group && key.plural == plural)
                .and_then(|(key, _)| {
                    store
                        .list(key, None, &Default::default())
                        .ok()
                        .map(|l| l.items.len())
                })
                .unwrap_or(0)
        };
        let mut pods = (0, 0);
        if let Some((key, _)) = store
            .resources()
            .into_iter()
            .find(|(key, _)| key.group.is_empty() && key.plural == "pods")
            && let Ok(list) = store.list(key, None, &Default::default())
        {
            pods.0 = list.items.len();
            pods.1 = list
                .items
                .iter()
                .filter(|p| {
                    p.pointer("/status/conditions")
                        .and_then(|c| c.as_array())
                        .is_some_and(|c| {
                            c.iter()
                                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                        })
                })
                .count();
        }
        if let Some(url) = server.delegate_url() {
            return format!(
                "pods {} ({} ready)  custom resources on {url}",
                pods.0, pods.1
            );
        }
        format!(
            "families {}  sites {}  replicas {}  schema packages {}  pods {} ({} ready)",
            count("multisite.dev", "replicafamilies"),
            count("multisite.dev", "sites"),
            count("multisite.dev", "replicas"),
            count("multisite.dev", "schemapackages"),
            pods.0,
            pods.1
        )
    })
}

/// Reports the line `summary` makes every 2 s when it has changed, until `stopped`
/// turns true.
pub fn spawn_summaries<F, Fut>(
    mut summary: F,
    report: impl Fn(&str) + Send + Sync + 'static,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = String> + Send,
{
    tokio::spawn(async move {
        let mut last = String::new();
        loop {
            let line = summary().await;
            if line != last {
                report(&line);
                last = line;
            }
            tokio::select! {
                _ = stopped.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            }
        }
    })
}

/// How `dev up` runs.
#[derive(Clone, Debug)]
pub struct UpOptions {
    /// Manifest files or directories applied after the CRDs.
    pub manifests: Vec<PathBuf>,
    /// The API server's address (port 0: a free one).
    pub listen: String,
    /// Run the operator in this process.
    pub operator: bool,
    /// Pods get loopback addresses from here up.
    pub first_pod_address: std::net::Ipv4Addr,
    /// Append one JSON line per API request to this file.
    pub audit_log: Option<PathBuf>,
    /// Delegate mode: the API server (plain HTTP URL) that serves the CRDs, our custom
    /// resources, Leases and Events (see [`apiserver::delegate`]).
    pub delegate: Option<String>,
}

impl UpOptions {
    pub fn new(manifests: Vec<PathBuf>) -> Self {
        UpOptions {
            manifests,
            listen: "127.0.0.1:0".into(),
            operator: true,
            first_pod_address: std::net::Ipv4Addr::new(127, 1, 0, 1),
            audit_log: None,
            delegate: None,
        }
    }
}

/// The operator `dev up` runs in its own process: every namespace, the default image
/// (which the process kubelets map to this program), no leader election or metrics.
pub fn operator_settings() -> multisite_operator::Settings {
    multisite_operator::Settings {
        namespaces: Vec::new(),
        image: multisite_operator::builders::Image {
            reference: multisite_operator::default_image(),
            pull_policy: "IfNotPresent".into(),
        },
        election: None,
        metrics_addr: None,
        identity: "multisite-dev".into(),
        sync_limits: Default::default(),
    }
}

/// Makes the in-process operator's requests say who sends them (as `multisite
/// operator` does), so audit logs tell them from `dev up`'s own.
pub fn present_operator_agent(config: &mut kube::Config) {
    config.headers.push((
        hyper::http::header::USER_AGENT,
        hyper::http::HeaderValue::from_static(multisite_operator::USER_AGENT),
    ));
}

/// Waits for the in-process operator (if one runs) to stop, logging how it ended.
pub async fn join_operator(
    task: Option<tokio::task::JoinHandle<Result<(), multisite_operator::OperatorError>>>,
) {
    if let Some(task) = task {
        match task.await {
            Ok(Err(e)) => tracing::error!(error = %e, "the operator stopped"),
            Err(e) => tracing::error!(error = %e, "the operator task failed"),
            Ok(Ok(())) => {}
        }
    }
}

/// Runs the dev cluster until `shutdown` completes. `report` receives the lines a
/// person should see (kubeconfig path, what was applied, fleet summaries).
pub async fn up(
    state: &StateDir,
    options: &UpOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    report: impl Fn(&str) + Send + Sync + 'static,
) -> Result<(), ClusterError> {
    let manifests = &options.manifests;
    let listen = options.listen.as_str();
    let operator = options.operator;
    std::fs::create_dir_all(&state.0).map_err(|e| file_error(&state.0, e))?;
    if let Some(pid) = running_pid(state) {
        return Err(ClusterError::AlreadyRunning {
            dir: state.0.display().to_string(),
            pid,
        });
    }
    let files = manifest_files(manifests)?;
    let server = ApiServer::new(Some(state.snapshot()))
        .map_err(|e| ClusterError::ApiServer(e.to_string()))?;
    if let Some(path) = &options.audit_log {
        server
            .audit_to(path)
            .map_err(|e| file_error(path, format!("cannot write the audit log: {e}")))?;
    }
    if let Some(url) = &options.delegate {
        server.delegate_to(url).map_err(ClusterError::ApiServer)?;
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| ClusterError::ApiServer(format!("cannot listen on {listen}: {e}")))?;
    let address = listener
        .local_addr()
        .map_err(|e| ClusterError::ApiServer(e.to_string()))?;
    let url = format!("http://{address}");
    std::fs::write(state.kubeconfig(), apiserver::kubeconfig(&url))
        .map_err(|e| file_error(&state.kubeconfig(), e))?;
    std::fs::write(state.pid_file(), std::process::id().to_string())
        .map_err(|e| file_error(&state.pid_file(), e))?;

    // One shutdown, seen by the server, the runner and the summary loop.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let serving = tokio::spawn(apiserver::serve_until(
        listener,
        server.clone(),
        wait(stopped.clone()),
    ));
    report(&format!("API server on {url}"));
    report(&format!("kubeconfig: {}", state.kubeconfig().display()));
    if let Some(url) = server.delegate_url() {
        report(&format!(
            "delegating {} to {url}",
            apiserver::delegate::DELEGATED_GROUPS.join(", ")
        ));
    }

    let uri: hyper::Uri = url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| ClusterError::ApiServer(e.to_string()))?;
    let client_uri = uri.clone();
    let config = kube::Config::new(uri);
    let outcome = async {
        let client =
            kube::Client::try_from(config).map_err(|e| ClusterError::ApiServer(e.to_string()))?;
        for line in apply_all(&client, &files).await? {
            report(&format!("applied {line}"));
        }
        Ok::<kube::Client, ClusterError>(client)
    }
    .await;
    let client = match outcome {
        Ok(client) => client,
        Err(err) => {
            let _ = stop.send(true);
            let _ = serving.await;
            let _ = std::fs::remove_file(state.pid_file());
            return Err(err);
        }
    };
    // The unchanged operator, talking to this API server through kube's client.
    let operator_task = operator.then(|| {
        report("operator running in this process (--no-operator to run your own)");
        let settings = operator_settings();
        let mut config = kube::Config::new(client_uri.clone());
        present_operator_agent(&mut config);
        let operator_client = kube::Client::try_from(config).unwrap_or_else(|_| client.clone());
        tokio::spawn(multisite_operator::run(
            operator_client,
            settings,
            wait(stopped.clone()),
        ))
    });
    let runner_settings = workloads::Settings {
        first_address: options.first_pod_address,
        ..workloads::Settings::new(state.workloads())
    };
    server
        .serve_logs_from(runner_settings.clone())
        .map_err(ClusterError::ApiServer)?;
    let runner = tokio::spawn(workloads::run(
        Arc::new(server.clone()),
        runner_settings,
        wait(stopped.clone()),
    ));
    let summaries = {
        let server = server.clone();
        spawn_summaries(
            move || {
                let server = server.clone();
                async move { summary(&server) }
            },
            report,
            stopped.clone(),
        )
    };
    shutdown.await;
    let _ = stop.send(true);
    join_operator(operator_task).await;
    let runner_result = runner.await;
    let _ = serving.await;
    let _ = summaries.await;
    server.flush();
    let _ = std::fs::remove_file(state.pid_file());
    match runner_result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ClusterError::Workloads(e.to_string())),
        Err(e) => Err(ClusterError::Workloads(e.to_string())),
    }
}
