//! `multisite node`: a node agent for a real Kubernetes API server. It registers one
//! Node per configured name (each with its own client certificate, so the Node
//! authorizer holds it to its own Node and the pods bound to it), renews the nodes'
//! Leases, and runs the pods bound to them as local processes: init containers then
//! containers, each in a mount namespace of its own where the pod's volumes sit at
//! their mount paths, with probes, restarts with back-off, graceful deletion, pod
//! status as the kubelet writes it, and the kubelet's HTTPS log endpoint. With a
//! credential allowed to manage PersistentVolumes it also provisions volumes for claims
//! of the `multisite.dev/node` storage class.
//!
//! Layers: this module uses [`multisite_core::api`]-level helpers only; the embedded cluster
//! (`multisite-dev`) imports [`images`] and [`rewrite`] from here.

mod container;
mod env;
pub mod images;
mod pods;
mod probes;
mod provisioner;
mod registration;
pub mod rewrite;
mod server;
mod volumes;

pub use images::{ImageMap, repository_of};
pub use provisioner::{PROVISIONER, storage_class};

use kube::Client;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One node this agent runs: its name and zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeName {
    pub name: String,
    pub zone: String,
}

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub nodes: Vec<NodeName>,
    /// `DIR/NAME/{kubeconfig,serving.crt,serving.key}` per node.
    pub credentials: PathBuf,
    /// Pod directories, logs and provisioned volumes live under here.
    pub state_dir: PathBuf,
    /// Pod addresses are the lowest free ones from here up.
    pub first_pod_address: Ipv4Addr,
    /// Node number `i` (in the order given) serves the kubelet API on `base + i`; 0: on
    /// free ports.
    pub kubelet_port_base: u16,
    pub images: ImageMap,
    /// A credential allowed to manage PersistentVolumes (and read claims and storage
    /// classes) cluster-wide: turns the provisioner on; also used to find the pods a
    /// Service selects on nodes of other agents.
    pub provisioner_kubeconfig: Option<PathBuf>,
    /// Create this StorageClass (provisioner `multisite.dev/node`, the default class)
    /// when it does not exist; needs `provisioner_kubeconfig`.
    pub install_storage_class: Option<String>,
    /// The first restart delay of an exited container, doubled up to `backoff_cap`
    /// (Kubernetes: 10 s and 5 min).
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// How often each node's Lease is renewed (Kubernetes: 10 s) and its status written
    /// when nothing changed (Kubernetes: 1 min when Leases are in use).
    pub lease_interval: Duration,
    pub status_interval: Duration,
}

impl Settings {
    /// Kubernetes' timings, the default image map.
    pub fn new(nodes: Vec<NodeName>, credentials: PathBuf, state_dir: PathBuf) -> Self {
        Self {
            nodes,
            credentials,
            state_dir,
            first_pod_address: Ipv4Addr::new(127, 3, 0, 1),
            kubelet_port_base: 10250,
            images: ImageMap::current_exe(),
            provisioner_kubeconfig: None,
            install_storage_class: None,
            backoff_base: Duration::from_secs(10),
            backoff_cap: Duration::from_secs(300),
            lease_interval: Duration::from_secs(10),
            status_interval: Duration::from_secs(60),
        }
    }

    fn log_path(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        self.state_dir
            .join("logs")
            .join(format!("{namespace}_{pod}_{container}.log"))
    }

    fn previous_log_path(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        self.state_dir
            .join("logs")
            .join(format!("{namespace}_{pod}_{container}.previous.log"))
    }

    fn pod_dir(&self, namespace: &str, pod: &str, uid: &str) -> PathBuf {
        self.state_dir
            .join("pods")
            .join(format!("{namespace}_{pod}_{uid}"))
    }
}

/// What the agent can fail on.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("client for {what}: {source}")]
    Client { what: String, source: kube::Error },
    #[error("node {node}: {source}")]
    Api { node: String, source: kube::Error },
    #[error("TLS for node {node}: {message}")]
    Tls { node: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl NodeError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// What a pod on one of this agent's nodes looks like to Service lookups.
#[derive(Clone, Debug)]
struct KnownPod {
    namespace: String,
    labels: BTreeMap<String, String>,
    ip: Ipv4Addr,
    ready: bool,
}

/// A container process, as exec finds it.
#[derive(Clone, Debug)]
struct RunningContainer {
    pid: u32,
    env: Vec<(String, String)>,
}

/// State the nodes of one agent share.
struct Shared {
    settings: Settings,
    /// Pod addresses in use, by pod uid.
    addresses: Mutex<BTreeMap<String, Ipv4Addr>>,
    /// Pods with an address, by uid, for Service lookups.
    pods: Mutex<BTreeMap<String, KnownPod>>,
    /// Containers whose process runs now, by `namespace/pod/container`: the process id
    /// and the environment it was given (for exec).
    running: Mutex<BTreeMap<String, RunningContainer>>,
    /// Mount points this agent created on the host (removed when it stops).
    mountpoints: Mutex<BTreeSet<PathBuf>>,
    /// The provisioner's cluster-wide client, if any.
    cluster: Option<Client>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    /// The pod's earlier address when free, else the lowest free one.
    fn allocate(&self, uid: &str, previous: Option<Ipv4Addr>) -> Result<Ipv4Addr, NodeError> {
        let mut addresses = lock(&self.addresses);
        if let Some(ip) = addresses.get(uid) {
            return Ok(*ip);
        }
        let used: BTreeSet<Ipv4Addr> = addresses.values().copied().collect();
        let first = self.settings.first_pod_address;
        let usable = |ip: &Ipv4Addr| {
            let o = ip.octets();
            o[0] == 127 && *ip >= first && o[3] != 0 && o[3] != 255 && !used.contains(ip)
        };
        let ip = match previous.filter(usable) {
            Some(ip) => ip,
            None => (u32::from(first)..=u32::from(Ipv4Addr::new(127, 255, 255, 254)))
                .map(Ipv4Addr::from)
                .find(usable)
                .ok_or_else(|| NodeError::Invalid("no free loopback address left".into()))?,
        };
        addresses.insert(uid.to_string(), ip);
        Ok(ip)
    }

    fn release(&self, uid: &str) {
        lock(&self.addresses).remove(uid);
        lock(&self.pods).remove(uid);
    }
}

/// One node of the agent.
struct NodeCtx {
    name: String,
    zone: String,
    client: Client,
    port: u16,
    /// The API server as pods reach it (`KUBERNETES_SERVICE_HOST`/`_PORT`).
    api_host: String,
    api_port: u16,
    /// PEM of the cluster CA (the kubeconfig's certificate authority).
    ca_pem: Vec<u8>,
    shared: Arc<Shared>,
}

/// A kube client from a kubeconfig file, and the config it was made from.
pub async fn client_from_kubeconfig(path: &Path) -> Result<(Client, kube::Config), NodeError> {
    let kubeconfig =
        kube::config::Kubeconfig::read_from(path).map_err(|source| NodeError::Kubeconfig {
            path: path.display().to_string(),
            source,
        })?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .map_err(|source| NodeError::Kubeconfig {
        path: path.display().to_string(),
        source,
    })?;
    let client = Client::try_from(config.clone()).map_err(|source| NodeError::Client {
        what: path.display().to_string(),
        source,
    })?;
    Ok((client, config))
}

/// The cluster CA of a kubeconfig as PEM: `certificate-authority-data`, or the file
/// `certificate-authority` names (relative to the kubeconfig's directory).
fn ca_of_kubeconfig(path: &Path, config: &kube::Config) -> Result<Vec<u8>, NodeError> {
    if let Some(roots) = &config.root_cert {
        let mut pem = Vec::new();
        for der in roots {
            let body = base64_encode(der);
            pem.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
            for chunk in body.as_bytes().chunks(64) {
                pem.extend_from_slice(chunk);
                pem.push(b'\n');
            }
            pem.extend_from_slice(b"-----END CERTIFICATE-----\n");
        }
        return Ok(pem);
    }
    if let Some(file) = &config.root_cert_file {
        let file = path.parent().unwrap_or(Path::new(".")).join(file);
        return std::fs::read(&file).map_err(|e| NodeError::io(&file, e));
    }
    Err(NodeError::Invalid(format!(
        "{}: names no certificate authority; the kubelet endpoint needs it to check the API server's client certificate",
        path.display()
    )))
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Runs the agent until `shutdown` completes: then stops every process (SIGTERM, then
/// SIGKILL after each pod's grace period) and leaves the pods as they are.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    if settings.nodes.is_empty() {
        return Err(NodeError::Invalid("no --node given".into()));
    }
    for dir in ["logs", "pods", "volumes"] {
        let path = settings.state_dir.join(dir);
        std::fs::create_dir_all(&path).map_err(|e| NodeError::io(&path, e))?;
    }
    let mut settings = settings;
    settings.state_dir = std::fs::canonicalize(&settings.state_dir)
        .map_err(|e| NodeError::io(&settings.state_dir, e))?;
    let cluster = match &settings.provisioner_kubeconfig {
        Some(path) => Some(client_from_kubeconfig(path).await?.0),
        None => None,
    };
    if let Some(class) = &settings.install_storage_class {
        let client = cluster.clone().ok_or_else(|| {
            NodeError::Invalid("--install-storage-class needs --provisioner-kubeconfig".into())
        })?;
        provisioner::install_storage_class(&client, class).await?;
    }
    let shared = Arc::new(Shared {
        settings: settings.clone(),
        addresses: Mutex::new(BTreeMap::new()),
        pods: Mutex::new(BTreeMap::new()),
        running: Mutex::new(BTreeMap::new()),
        mountpoints: Mutex::new(BTreeSet::new()),
        cluster: cluster.clone(),
    });
    let mut nodes = Vec::new();
    let mut listeners = Vec::new();
    for (index, node) in settings.nodes.iter().enumerate() {
        let kubeconfig = settings.credentials.join(&node.name).join("kubeconfig");
        let (client, config) = client_from_kubeconfig(&kubeconfig).await?;
        let api_host = config.cluster_url.host().unwrap_or("127.0.0.1").to_string();
        let api_port = config.cluster_url.port_u16().unwrap_or(443);
        let index = u16::try_from(index).unwrap_or(u16::MAX);
        // Base 0: every node a free port of the system's choosing.
        let wanted = match settings.kubelet_port_base {
            0 => 0,
            base => base.checked_add(index).ok_or_else(|| {
                NodeError::Invalid("--kubelet-port-base leaves no port for every node".into())
            })?,
        };
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", wanted))
            .await
            .map_err(|e| NodeError::Invalid(format!("kubelet port {wanted}: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| NodeError::Invalid(format!("kubelet port {wanted}: {e}")))?
            .port();
        listeners.push(listener);
        nodes.push(Arc::new(NodeCtx {
            name: node.name.clone(),
            zone: node.zone.clone(),
            client,
            port,
            api_host: api_host.trim_matches(['[', ']']).to_string(),
            api_port,
            ca_pem: ca_of_kubeconfig(&kubeconfig, &config)?,
            shared: shared.clone(),
        }));
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for (node, listener) in nodes.iter().zip(listeners) {
        let tls = server::tls_config(node, &settings.credentials)?;
        registration::register(node).await?;
        tasks.spawn(registration::heartbeat(node.clone(), stop_rx.clone()));
        tasks.spawn(server::serve(node.clone(), listener, tls, stop_rx.clone()));
        tasks.spawn(pods::run(node.clone(), stop_rx.clone()));
        tracing::info!(node = %node.name, zone = %node.zone, port = node.port, "node registered");
    }
    if let Some(client) = cluster {
        let names: BTreeSet<String> = settings.nodes.iter().map(|n| n.name.clone()).collect();
        tasks.spawn(provisioner::run(
            client,
            names,
            settings.state_dir.join("volumes"),
            stop_rx.clone(),
        ));
    }
    shutdown.await;
    tracing::info!("stopping: every process gets SIGTERM, then SIGKILL after its grace period");
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    remove_mountpoints(&shared);
    Ok(())
}

/// The file that remembers the mount points created on the host, so that an agent
/// started after one that was killed removes them too.
fn mountpoints_file(settings: &Settings) -> PathBuf {
    settings.state_dir.join("mountpoints")
}

/// Records mount points created on the host.
fn remember_mountpoints(shared: &Shared, created: Vec<PathBuf>) {
    if created.is_empty() {
        return;
    }
    let mut known = lock(&shared.mountpoints);
    known.extend(created);
    let text: String = known.iter().map(|p| format!("{}\n", p.display())).collect();
    let file = mountpoints_file(&shared.settings);
    if let Err(error) = std::fs::write(&file, text) {
        tracing::warn!(%error, file = %file.display(), "cannot record mount points");
    }
}

/// Removes the (empty) mount points agents created on the host, deepest first.
fn remove_mountpoints(shared: &Shared) {
    let file = mountpoints_file(&shared.settings);
    let mut created: Vec<PathBuf> = lock(&shared.mountpoints).iter().cloned().collect();
    if let Ok(text) = std::fs::read_to_string(&file) {
        created.extend(text.lines().filter(|l| !l.is_empty()).map(PathBuf::from));
    }
    created.sort();
    created.dedup();
    created.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    // A directory another process still has something mounted on (the pods of another
    // agent on this machine share mount points such as
    // /var/run/secrets/kubernetes.io/serviceaccount) stays: removing it would detach
    // that mount in the other process's namespace.
    let busy = mounted_anywhere();
    let mut left = Vec::new();
    for path in created {
        let resolved = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if busy.contains(&resolved) || busy.contains(&path) {
            left.push(path);
            continue;
        }
        let removed = match std::fs::symlink_metadata(&path) {
            Err(_) => Ok(()),
            Ok(m) if m.is_dir() => std::fs::remove_dir(&path),
            Ok(m) if m.len() == 0 => std::fs::remove_file(&path),
            Ok(_) => Ok(()),
        };
        if let Err(error) = removed {
            tracing::debug!(%error, path = %path.display(), "mount point left in place");
            left.push(path);
        }
    }
    let text: String = left.iter().map(|p| format!("{}\n", p.display())).collect();
    let _ = std::fs::write(&file, text);
}

/// Every mount point of every process's mount namespace on this machine.
fn mounted_anywhere() -> BTreeSet<PathBuf> {
    let mut points = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return points;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path().join("mountinfo")) else {
            continue;
        };
        for line in text.lines() {
            if let Some(point) = line.split(' ').nth(4) {
                points.insert(PathBuf::from(point.replace("\\040", " ")));
            }
        }
    }
    points
}
