//! The pods of one node: watched with `spec.nodeName=NAME`, run as processes, their
//! status written to `pods/status` as the kubelet writes it, and deleted for good
//! (grace period 0, uid precondition) once their processes are gone after a graceful
//! deletion.

use super::container::{Launch, Mount, WorkingDir, launch, signal_group};
use super::env::{PodFacts, container_env, expand};
use super::probes::{ProbeKind, ProbeSpec, probe_of, run_check};
use super::registration::{cpus, memory_bytes};
use super::rewrite::{replace_any_address, rewrite_service_hosts, service_hosts};
use super::volumes::{Prepared, prepare, write_token};
use super::{KnownPod, NodeCtx, lock};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Container, Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::Child;
use tokio::sync::mpsc;

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// A container that ran this long starts its back-off afresh (as the kubelet does).
const BACKOFF_RESET: Duration = Duration::from_secs(600);
const PASS: Duration = Duration::from_millis(250);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

#[derive(Debug)]
struct ProbeRun {
    spec: ProbeSpec,
    next: Instant,
    successes: u32,
    failures: u32,
    in_flight: bool,
    last_error: Option<String>,
}

#[derive(Debug)]
struct ContainerRun {
    spec: Container,
    name: String,
    image: String,
    program: Option<PathBuf>,
    child: Option<Child>,
    pid: Option<u32>,
    env: Vec<(String, String)>,
    started_at: Option<String>,
    started: Option<Instant>,
    restart_count: i32,
    exits: u32,
    /// The last exit, as `terminated` state JSON.
    last: Option<Value>,
    exit_code: Option<i32>,
    next_start: Option<Instant>,
    waiting: Option<(String, String)>,
    ready: bool,
    /// The startup probe passed (or there is none) for this instance.
    startup_done: bool,
    probes: Vec<ProbeRun>,
    /// A kill in progress (liveness or startup failure): SIGKILL at this time.
    kill_at: Option<Instant>,
    kill_reason: Option<String>,
    /// Counts starts, so that a probe result of an earlier instance is dropped.
    instance: u64,
    first_seen: Instant,
}

impl ContainerRun {
    fn new(spec: &Container, program: Option<PathBuf>, restart_count: i32) -> Self {
        Self {
            spec: spec.clone(),
            name: spec.name.clone(),
            image: spec.image.clone().unwrap_or_default(),
            program,
            child: None,
            pid: None,
            env: Vec::new(),
            started_at: None,
            started: None,
            restart_count,
            exits: 0,
            last: None,
            exit_code: None,
            next_start: None,
            waiting: None,
            ready: false,
            startup_done: false,
            probes: Vec::new(),
            kill_at: None,
            kill_reason: None,
            instance: 0,
            first_seen: Instant::now(),
        }
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }

    fn succeeded(&self) -> bool {
        !self.running() && self.exit_code == Some(0)
    }

    /// Exited and will not run again.
    fn done(&self) -> bool {
        !self.running() && self.next_start.is_none() && self.exit_code.is_some()
    }
}

#[derive(Debug)]
struct PodRun {
    uid: String,
    namespace: String,
    name: String,
    ip: Ipv4Addr,
    policy: RestartPolicy,
    dir: PathBuf,
    init: Vec<ContainerRun>,
    containers: Vec<ContainerRun>,
    start_time: String,
    prepared: Option<Prepared>,
    prepare_error: Option<String>,
    next_prepare: Instant,
    failed: Option<String>,
    /// Set once the pod is being stopped: when to send SIGKILL.
    kill_at: Option<Instant>,
    killed: bool,
    last_status: Option<Value>,
    last_write: Option<Instant>,
    pod: Pod,
}

impl PodRun {
    fn all(&self) -> impl Iterator<Item = &ContainerRun> {
        self.init.iter().chain(self.containers.iter())
    }

    fn all_mut(&mut self) -> impl Iterator<Item = &mut ContainerRun> {
        self.init.iter_mut().chain(self.containers.iter_mut())
    }

    fn initialized(&self) -> bool {
        self.init.iter().all(ContainerRun::succeeded)
    }

    fn label(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn container_mut(&mut self, init: bool, index: usize) -> Option<&mut ContainerRun> {
        if init {
            self.init.get_mut(index)
        } else {
            self.containers.get_mut(index)
        }
    }
}

/// A probe's answer for one container instance.
#[derive(Debug)]
struct ProbeResult {
    uid: String,
    index: usize,
    probe: usize,
    instance: u64,
    result: Result<(), String>,
}

fn time_text(now: Timestamp) -> String {
    now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn uid_of(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

fn grace_of(pod: &Pod) -> Duration {
    let seconds = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
        })
        .unwrap_or(30);
    Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

struct Runtime {
    node: Arc<NodeCtx>,
    known: BTreeMap<String, Pod>,
    init_seen: Option<BTreeSet<String>>,
    runs: BTreeMap<String, PodRun>,
    probe_tx: mpsc::UnboundedSender<ProbeResult>,
    /// Pods asked to be deleted for good, and when.
    deleting: BTreeMap<String, Instant>,
    reported: BTreeSet<String>,
}

/// Runs the node's pods until `stop` turns true, then stops their processes.
pub(super) async fn run(node: Arc<NodeCtx>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let api: Api<Pod> = Api::all(node.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", node.name));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    let (probe_tx, mut probe_rx) = mpsc::unbounded_channel();
    let mut runtime = Runtime {
        node: node.clone(),
        known: BTreeMap::new(),
        init_seen: None,
        runs: BTreeMap::new(),
        probe_tx,
        deleting: BTreeMap::new(),
        reported: BTreeSet::new(),
    };
    let mut ticker = tokio::time::interval(PASS);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch_failing = false;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            event = events.next() => match event {
                Some(Ok(event)) => {
                    watch_failing = false;
                    runtime.on_event(event);
                }
                Some(Err(error)) => {
                    if !watch_failing {
                        tracing::warn!(node = %node.name, %error, "pod watch failed; retrying");
                    }
                    watch_failing = true;
                }
                None => break,
            },
            Some(result) = probe_rx.recv() => runtime.on_probe(result),
            _ = ticker.tick() => runtime.pass().await,
        }
    }
    runtime.shutdown().await;
}

impl Runtime {
    fn on_event(&mut self, event: Event<Pod>) {
        match event {
            Event::Apply(pod) => {
                self.known.insert(uid_of(&pod), pod);
            }
            Event::Delete(pod) => {
                self.known.remove(&uid_of(&pod));
            }
            Event::Init => self.init_seen = Some(BTreeSet::new()),
            Event::InitApply(pod) => {
                if let Some(seen) = &mut self.init_seen {
                    seen.insert(uid_of(&pod));
                }
                self.known.insert(uid_of(&pod), pod);
            }
            Event::InitDone => {
                if let Some(seen) = self.init_seen.take() {
                    self.known.retain(|uid, _| seen.contains(uid));
                }
            }
        }
    }

    fn report(&self, errors: &mut BTreeSet<String>, message: String) {
        errors.insert(message);
    }

    /// One pass over every pod.
    async fn pass(&mut self) {
        let mut errors = BTreeSet::new();
        let known: Vec<(String, Pod)> = self
            .known
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (uid, pod) in &known {
            if pod.metadata.deletion_timestamp.is_some() {
                self.terminate(uid, pod, &mut errors).await;
                continue;
            }
            if !self.runs.contains_key(uid) {
                let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
                if matches!(phase, Some("Succeeded" | "Failed")) {
                    continue;
                }
                match self.admit(pod) {
                    Ok(run) => {
                        tracing::info!(node = %self.node.name, pod = %run.label(), ip = %run.ip, "pod admitted");
                        self.runs.insert(uid.clone(), run);
                    }
                    Err(message) => {
                        self.report(&mut errors, message);
                        continue;
                    }
                }
            }
            if let Some(mut run) = self.runs.remove(uid) {
                run.pod = pod.clone();
                self.step(&mut run, &mut errors).await;
                self.write_status(&mut run, &mut errors).await;
                self.runs.insert(uid.clone(), run);
            }
        }
        // Pods gone from the API server without a graceful deletion: stop and forget.
        let gone: Vec<String> = self
            .runs
            .keys()
            .filter(|uid| !self.known.contains_key(*uid))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(run) = self.runs.get_mut(&uid) {
                if run.kill_at.is_none() {
                    let grace = grace_of(&run.pod);
                    stop_pod(run, grace);
                }
                if reap_pod(run) {
                    self.forget(&uid);
                }
            }
        }
        self.deleting.retain(|uid, _| self.known.contains_key(uid));
        self.publish();
        let fresh: Vec<&String> = errors.difference(&self.reported).collect();
        for error in fresh {
            tracing::warn!(node = %self.node.name, %error, "pod");
        }
        self.reported = errors;
    }

    /// Updates what the other parts of the agent see: pod addresses, running containers.
    fn publish(&self) {
        let shared = &self.node.shared;
        {
            let mut pods = lock(&shared.pods);
            for (uid, run) in &self.runs {
                let ready = run.containers.iter().all(|c| c.ready && c.running());
                pods.insert(
                    uid.clone(),
                    KnownPod {
                        namespace: run.namespace.clone(),
                        labels: run.pod.metadata.labels.clone().unwrap_or_default(),
                        ip: run.ip,
                        ready: ready && run.kill_at.is_none(),
                    },
                );
            }
        }
        let mut running = lock(&shared.running);
        running.retain(|key, _| {
            !self
                .runs
                .values()
                .any(|r| key.starts_with(&format!("{}/{}/", r.namespace, r.name)))
        });
        for run in self.runs.values() {
            for container in run.all().filter(|c| c.running()) {
                let Some(pid) = container.pid else {
                    continue;
                };
                running.insert(
                    format!("{}/{}/{}", run.namespace, run.name, container.name),
                    super::RunningContainer {
                        pid,
                        env: container.env.clone(),
                    },
                );
            }
        }
    }

    fn forget(&mut self, uid: &str) {
        if let Some(run) = self.runs.remove(uid) {
            let mut running = lock(&self.node.shared.running);
            running.retain(|key, _| !key.starts_with(&format!("{}/{}/", run.namespace, run.name)));
            drop(running);
            if let Err(error) = std::fs::remove_dir_all(&run.dir)
                && error.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(%error, dir = %run.dir.display(), "cannot remove a pod directory");
            }
            tracing::info!(node = %self.node.name, pod = %run.label(), "pod stopped");
        }
        self.node.shared.release(uid);
    }

    /// Takes a pod on: its address, its directory, a run per container.
    fn admit(&self, pod: &Pod) -> Result<PodRun, String> {
        let uid = uid_of(pod);
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let spec = pod
            .spec
            .as_ref()
            .ok_or_else(|| format!("pod {namespace}/{name} has no spec"))?;
        let status = pod.status.as_ref();
        let previous_ip = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        let ip = self
            .node
            .shared
            .allocate(&uid, previous_ip)
            .map_err(|e| e.to_string())?;
        let restarts = |statuses: Option<&Vec<k8s_openapi::api::core::v1::ContainerStatus>>,
                        name: &str| {
            statuses
                .into_iter()
                .flatten()
                .find(|s| s.name == name)
                .map(|s| s.restart_count)
                .unwrap_or(0)
        };
        let images = &self.node.shared.settings.images;
        let make = |c: &Container, init: bool| {
            let statuses = if init {
                status.and_then(|s| s.init_container_statuses.as_ref())
            } else {
                status.and_then(|s| s.container_statuses.as_ref())
            };
            let program = images.program_for(c.image.as_deref().unwrap_or(""));
            // A pod started again by a new agent keeps counting its restarts.
            ContainerRun::new(c, program, restarts(statuses, &c.name))
        };
        let init: Vec<ContainerRun> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| make(c, true))
            .collect();
        let containers: Vec<ContainerRun> =
            spec.containers.iter().map(|c| make(c, false)).collect();
        let policy = match spec.restart_policy.as_deref() {
            Some("Never") => RestartPolicy::Never,
            Some("OnFailure") => RestartPolicy::OnFailure,
            _ => RestartPolicy::Always,
        };
        let dir = self.node.shared.settings.pod_dir(&namespace, &name, &uid);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let start_time = status
            .and_then(|s| s.start_time.as_ref())
            .map(|t| time_text(t.0))
            .unwrap_or_else(|| time_text(Timestamp::now()));
        let mut run = PodRun {
            uid,
            namespace,
            name,
            ip,
            policy,
            dir,
            init,
            containers,
            start_time,
            prepared: None,
            prepare_error: None,
            next_prepare: Instant::now(),
            failed: None,
            kill_at: None,
            killed: false,
            last_status: None,
            last_write: None,
            pod: pod.clone(),
        };
        let now = Instant::now();
        match run.init.first_mut() {
            Some(first) => first.next_start = Some(now),
            None => run
                .containers
                .iter_mut()
                .for_each(|c| c.next_start = Some(now)),
        }
        Ok(run)
    }

    fn facts<'a>(&'a self, run: &'a PodRun) -> PodFacts<'a> {
        PodFacts {
            pod: &run.pod,
            ip: run.ip,
            node: &self.node.name,
            cpus: cpus(),
            memory: memory_bytes(),
        }
    }

    /// Moves a pod on: volumes, exits, restarts, init order, probes, kills.
    async fn step(&self, run: &mut PodRun, errors: &mut BTreeSet<String>) {
        if run.kill_at.is_some() || run.failed.is_some() {
            reap_pod(run);
            return;
        }
        let clock = Instant::now();
        if run.prepared.is_none() {
            if run.next_prepare > clock {
                return;
            }
            let result = prepare(&self.node.client, &self.facts(run), &run.dir).await;
            match result {
                Ok(prepared) => {
                    run.prepared = Some(prepared);
                    run.prepare_error = None;
                }
                Err(message) => {
                    errors.insert(format!("pod {}: volumes: {message}", run.label()));
                    run.prepare_error = Some(message);
                    run.next_prepare = clock + Duration::from_secs(2);
                    return;
                }
            }
        }
        self.renew_tokens(run, errors).await;
        let settings = &self.node.shared.settings;
        let policy = run.policy;
        for container in &mut run.init {
            note_exit(settings, container, clock, policy, true);
        }
        for container in &mut run.containers {
            note_exit(settings, container, clock, policy, false);
        }
        for container in run.all_mut() {
            if let (Some(at), Some(pid)) = (container.kill_at, container.pid)
                && container.running()
                && at <= clock
            {
                signal_group(pid, libc::SIGKILL);
            }
        }
        if policy == RestartPolicy::Never
            && run
                .init
                .iter()
                .any(|c| !c.running() && c.exit_code.is_some_and(|code| code != 0))
        {
            run.failed = Some("an init container failed".into());
            return;
        }
        if !run.initialized() {
            let Some(index) = run.init.iter().position(|c| !c.succeeded()) else {
                return;
            };
            let container = &mut run.init[index];
            if !container.running()
                && container.next_start.is_none()
                && container.exit_code.is_none()
            {
                container.next_start = Some(clock);
            }
            self.start_due(run, true, index, errors).await;
            return;
        }
        for container in &mut run.containers {
            let never = container.started_at.is_none()
                && container.next_start.is_none()
                && container.exit_code.is_none();
            if never {
                container.next_start = Some(clock);
            }
        }
        for index in 0..run.containers.len() {
            self.start_due(run, false, index, errors).await;
        }
        self.start_probes(run);
    }

    async fn renew_tokens(&self, run: &mut PodRun, errors: &mut BTreeSet<String>) {
        let now = Instant::now();
        let due: Vec<usize> = run
            .prepared
            .iter()
            .flat_map(|p| p.tokens.iter().enumerate())
            .filter(|(_, t)| t.renew_at <= now)
            .map(|(i, _)| i)
            .collect();
        for index in due {
            let Some(token) = run
                .prepared
                .as_ref()
                .and_then(|p| p.tokens.get(index))
                .cloned()
            else {
                continue;
            };
            let result = write_token(&self.node.client, &self.facts(run), &token).await;
            let Some(slot) = run.prepared.as_mut().and_then(|p| p.tokens.get_mut(index)) else {
                continue;
            };
            match result {
                Ok(at) => slot.renew_at = at,
                Err(message) => {
                    slot.renew_at = now + Duration::from_secs(10);
                    errors.insert(format!("pod {}: {message}", run.label()));
                }
            }
        }
    }

    /// The address of a pod Service `name` in `namespace` selects, Ready ones first.
    async fn service_address(&self, namespace: &str, name: &str) -> Result<String, String> {
        let services: Api<Service> = Api::namespaced(self.node.client.clone(), namespace);
        let service = services
            .get_opt(name)
            .await
            .map_err(|e| format!("service {namespace}/{name}: {e}"))?
            .ok_or_else(|| format!("service {namespace}/{name} does not exist"))?;
        let selector = service.spec.and_then(|s| s.selector).unwrap_or_default();
        if selector.is_empty() {
            return Err(format!("service {namespace}/{name} selects no pods"));
        }
        let matches = |labels: &BTreeMap<String, String>| {
            selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        };
        let mut candidates: Vec<(bool, String)> = lock(&self.node.shared.pods)
            .values()
            .filter(|p| p.namespace == namespace && matches(&p.labels))
            .map(|p| (p.ready, p.ip.to_string()))
            .collect();
        if let Some(cluster) = &self.node.shared.cluster {
            let pods: Api<Pod> = Api::namespaced(cluster.clone(), namespace);
            let selector_text: Vec<String> =
                selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
            if let Ok(list) = pods
                .list(&ListParams::default().labels(&selector_text.join(",")))
                .await
            {
                for pod in list.items {
                    let status = pod.status.unwrap_or_default();
                    let Some(ip) = status.pod_ip.filter(|ip| !ip.is_empty()) else {
                        continue;
                    };
                    let ready = status
                        .conditions
                        .iter()
                        .flatten()
                        .any(|c| c.type_ == "Ready" && c.status == "True");
                    candidates.push((ready, ip));
                }
            }
        }
        candidates.sort_by_key(|(ready, _)| !*ready);
        candidates
            .into_iter()
            .next()
            .map(|(_, ip)| ip)
            .ok_or_else(|| format!("service {namespace}/{name} has no pod with an address yet"))
    }

    /// `values` with `0.0.0.0` and Service hosts rewritten.
    async fn rewrite(&self, ip: Ipv4Addr, values: Vec<String>) -> Result<Vec<String>, String> {
        let mut hosts = BTreeMap::new();
        for value in &values {
            for key in service_hosts(value) {
                if let std::collections::btree_map::Entry::Vacant(slot) = hosts.entry(key) {
                    let (namespace, name) = slot.key().clone();
                    slot.insert(self.service_address(&namespace, &name).await?);
                }
            }
        }
        values
            .iter()
            .map(|value| {
                let value = replace_any_address(value, ip);
                rewrite_service_hosts(&value, |ns, name| {
                    hosts
                        .get(&(ns.to_string(), name.to_string()))
                        .cloned()
                        .ok_or_else(|| format!("service {ns}/{name} is not resolved"))
                })
            })
            .collect()
    }

    /// Everything a container's start needs, or why it cannot start yet.
    async fn launch_of(&self, run: &PodRun, container: &ContainerRun) -> Result<Launch, String> {
        let program = container
            .program
            .clone()
            .ok_or_else(|| "no program".to_string())?;
        let node = &self.node;
        let base = vec![
            ("PATH".to_string(), PATH.to_string()),
            ("HOSTNAME".to_string(), run.name.clone()),
            ("KUBERNETES_SERVICE_HOST".to_string(), node.api_host.clone()),
            (
                "KUBERNETES_SERVICE_PORT".to_string(),
                node.api_port.to_string(),
            ),
            (
                "KUBERNETES_SERVICE_PORT_HTTPS".to_string(),
                node.api_port.to_string(),
            ),
            (
                "KUBERNETES_PORT".to_string(),
                format!("tcp://{}:{}", node.api_host, node.api_port),
            ),
        ];
        let facts = self.facts(run);
        let env = container_env(&node.client, &facts, &container.spec, base).await?;
        let defined: BTreeMap<String, String> = env.iter().cloned().collect();
        let lookup = |name: &str| defined.get(name).cloned();
        let mut argv: Vec<String> = container
            .spec
            .command
            .iter()
            .flatten()
            .map(|a| expand(a, &lookup))
            .collect();
        let entry = argv.first().and_then(|first| {
            std::path::Path::new(first)
                .file_name()
                .map(|f| f.to_owned())
        });
        if entry.is_some() && entry.as_deref() == program.file_name() {
            argv.remove(0);
        }
        argv.extend(
            container
                .spec
                .args
                .iter()
                .flatten()
                .map(|a| expand(a, &lookup)),
        );
        let argv = self.rewrite(run.ip, argv).await?;
        let (names, values): (Vec<String>, Vec<String>) = env.into_iter().unzip();
        let values = self.rewrite(run.ip, values).await?;
        let env: Vec<(String, String)> = names.into_iter().zip(values).collect();

        let volumes = run
            .prepared
            .as_ref()
            .map(|p| &p.volumes)
            .ok_or_else(|| "volumes are not ready".to_string())?;
        let mut mounts = Vec::new();
        for mount in container.spec.volume_mounts.iter().flatten() {
            let volume = volumes
                .get(&mount.name)
                .ok_or_else(|| format!("volume {:?} is mounted but not declared", mount.name))?;
            let sub = mount.sub_path.clone().unwrap_or_default();
            let sub = expand(&mount.sub_path_expr.clone().unwrap_or(sub), &|name| {
                defined.get(name).cloned()
            });
            let source = if sub.is_empty() {
                volume.path.clone()
            } else {
                if std::path::Path::new(&sub)
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    return Err(format!("subPath {sub:?} leaves its volume"));
                }
                let source = volume.path.join(&sub);
                if !source.exists() {
                    std::fs::create_dir_all(&source)
                        .map_err(|e| format!("{}: {e}", source.display()))?;
                }
                source
            };
            mounts.push(Mount {
                source,
                target: PathBuf::from(&mount.mount_path),
                read_only: volume.read_only || mount.read_only == Some(true),
            });
        }
        let working_dir = match container.spec.working_dir.as_deref() {
            Some(dir) if !dir.is_empty() => {
                let dir = PathBuf::from(dir);
                let under_mount = mounts.iter().any(|m| dir.starts_with(&m.target));
                if !under_mount && !dir.exists() {
                    std::fs::create_dir_all(&dir)
                        .map_err(|e| format!("workingDir {}: {e}", dir.display()))?;
                }
                WorkingDir::Inside(dir)
            }
            _ => WorkingDir::Host(run.dir.clone()),
        };
        let settings = &node.shared.settings;
        // The agent's own image runs the agent's own binary, whatever hides its path.
        let own = node.shared.settings.images.multisite.as_ref() == Some(&program);
        let arg0 = program.display().to_string();
        let program = if own {
            PathBuf::from("/proc/self/exe")
        } else {
            program
        };
        Ok(Launch {
            program,
            arg0,
            argv,
            env,
            working_dir,
            mounts,
            hostname: run.name.chars().take(63).collect(),
            log: settings.log_path(&run.namespace, &run.name, &container.name),
            previous_log: settings.previous_log_path(&run.namespace, &run.name, &container.name),
        })
    }

    async fn start_due(
        &self,
        run: &mut PodRun,
        init: bool,
        index: usize,
        errors: &mut BTreeSet<String>,
    ) {
        let clock = Instant::now();
        let label = run.label();
        let Some(container) = run.container_mut(init, index) else {
            return;
        };
        if container.running() || container.next_start.is_none_or(|t| t > clock) {
            return;
        }
        if container.program.is_none() {
            let waited = clock.duration_since(container.first_seen);
            let reason = if waited < Duration::from_secs(10) {
                "ErrImagePull"
            } else {
                "ImagePullBackOff"
            };
            container.waiting = Some((
                reason.into(),
                format!(
                    "no program runs image {:?} on this node agent: map it with `multisite node --image REPOSITORY=PROGRAM` (images whose repository ends in \"multisite\" run the agent's own executable)",
                    container.image
                ),
            ));
            return;
        }
        let Some(container) = (if init {
            run.init.get(index)
        } else {
            run.containers.get(index)
        }) else {
            return;
        };
        let prepared = self.launch_of(run, container).await;
        let Some(container) = run.container_mut(init, index) else {
            return;
        };
        let result = prepared.and_then(|l| {
            launch(&l)
                .map(|(child, created)| (child, created, l.env))
                .map_err(|e| e.to_string())
        });
        match result {
            Ok((child, created, env)) => {
                super::remember_mountpoints(&self.node.shared, created);
                if container.started_at.is_some() {
                    container.restart_count += 1;
                }
                container.pid = child.id();
                container.child = Some(child);
                container.env = env;
                container.started_at = Some(time_text(Timestamp::now()));
                container.started = Some(clock);
                container.next_start = None;
                container.waiting = None;
                container.instance += 1;
                container.kill_at = None;
                container.kill_reason = None;
                container.probes = [
                    ProbeKind::Startup,
                    ProbeKind::Liveness,
                    ProbeKind::Readiness,
                ]
                .into_iter()
                .filter_map(|kind| probe_of(&container.spec, kind))
                .map(|spec| ProbeRun {
                    next: clock + spec.initial_delay,
                    spec,
                    successes: 0,
                    failures: 0,
                    in_flight: false,
                    last_error: None,
                })
                .collect();
                container.startup_done = !container
                    .probes
                    .iter()
                    .any(|p| p.spec.kind == ProbeKind::Startup);
                container.ready = !container
                    .probes
                    .iter()
                    .any(|p| p.spec.kind == ProbeKind::Readiness);
                tracing::info!(pod = %label, container = %container.name, pid = ?container.pid, "container started");
                for probe in &container.probes {
                    if let super::probes::Check::Unsupported(why) = &probe.spec.check {
                        tracing::warn!(pod = %label, container = %container.name, kind = ?probe.spec.kind, %why, "probe not run; it counts as passing");
                    }
                }
            }
            Err(message) => {
                errors.insert(format!(
                    "pod {label} container {}: {message}",
                    container.name
                ));
                let reason = if message.contains("service ") {
                    "ContainerCreating"
                } else {
                    "CreateContainerConfigError"
                };
                container.waiting = Some((reason.into(), message));
                container.next_start = Some(clock + Duration::from_secs(1));
            }
        }
    }

    /// Starts the probes that are due, each as a task that reports back.
    fn start_probes(&self, run: &mut PodRun) {
        let clock = Instant::now();
        let (uid, ip) = (run.uid.clone(), run.ip);
        for (index, container) in run.containers.iter_mut().enumerate() {
            if !container.running() || container.kill_at.is_some() {
                continue;
            }
            let startup_done = container.startup_done;
            for (probe_index, probe) in container.probes.iter_mut().enumerate() {
                let gated = probe.spec.kind != ProbeKind::Startup && !startup_done;
                let finished = probe.spec.kind == ProbeKind::Startup && startup_done;
                if probe.in_flight || probe.next > clock || gated || finished {
                    continue;
                }
                probe.in_flight = true;
                let spec = probe.spec.clone();
                let (pid, env, instance) =
                    (container.pid, container.env.clone(), container.instance);
                let (tx, uid) = (self.probe_tx.clone(), uid.clone());
                tokio::spawn(async move {
                    let result = run_check(&spec, ip, pid, &env).await;
                    let _ = tx.send(ProbeResult {
                        uid,
                        index,
                        probe: probe_index,
                        instance,
                        result,
                    });
                });
            }
        }
    }

    fn on_probe(&mut self, result: ProbeResult) {
        let Some(run) = self.runs.get_mut(&result.uid) else {
            return;
        };
        let grace = run
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30);
        let label = run.label();
        let Some(container) = run.containers.get_mut(result.index) else {
            return;
        };
        if container.instance != result.instance {
            return;
        }
        let Some(probe) = container.probes.get_mut(result.probe) else {
            return;
        };
        probe.in_flight = false;
        probe.next = Instant::now() + probe.spec.period;
        let kind = probe.spec.kind;
        let (threshold_ok, threshold_bad) =
            (probe.spec.success_threshold, probe.spec.failure_threshold);
        let probe_grace = grace;
        match result.result {
            Ok(()) => {
                probe.failures = 0;
                probe.successes += 1;
                probe.last_error = None;
                if probe.successes >= threshold_ok {
                    match kind {
                        ProbeKind::Readiness => container.ready = true,
                        ProbeKind::Startup => container.startup_done = true,
                        ProbeKind::Liveness => {}
                    }
                }
            }
            Err(message) => {
                probe.successes = 0;
                probe.failures += 1;
                probe.last_error = Some(message.clone());
                if probe.failures >= threshold_bad {
                    match kind {
                        ProbeKind::Readiness => container.ready = false,
                        ProbeKind::Liveness | ProbeKind::Startup => {
                            if let Some(pid) = container.pid
                                && container.kill_at.is_none()
                            {
                                let what = if kind == ProbeKind::Liveness {
                                    "Liveness"
                                } else {
                                    "Startup"
                                };
                                tracing::info!(pod = %label, container = %container.name, %message, "{what} probe failed; the container will be restarted");
                                container.kill_reason =
                                    Some(format!("{what} probe failed: {message}"));
                                container.ready = false;
                                signal_group(pid, libc::SIGTERM);
                                container.kill_at = Some(
                                    Instant::now()
                                        + Duration::from_secs(
                                            u64::try_from(probe_grace).unwrap_or(0),
                                        ),
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// A pod with a deletionTimestamp: stop its processes within the grace period, then
    /// delete it for good.
    async fn terminate(&mut self, uid: &str, pod: &Pod, errors: &mut BTreeSet<String>) {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        if let Some(mut run) = self.runs.remove(uid) {
            run.pod = pod.clone();
            if run.kill_at.is_none() {
                tracing::info!(node = %self.node.name, pod = %run.label(), grace = ?grace_of(pod), "pod deleted: stopping its processes");
                stop_pod(&mut run, grace_of(pod));
            }
            let gone = reap_pod(&mut run);
            self.write_status(&mut run, errors).await;
            self.runs.insert(uid.to_string(), run);
            if !gone {
                return;
            }
        }
        let due = self
            .deleting
            .get(uid)
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(5));
        if !due {
            return;
        }
        self.deleting.insert(uid.to_string(), Instant::now());
        let api: Api<Pod> = Api::namespaced(self.node.client.clone(), &namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&name, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
            Err(error) => {
                errors.insert(format!("pod {namespace}/{name}: final delete: {error}"));
            }
        }
        // The pod is gone for good: so are its logs, as with the kubelet (a pod made
        // again under the same name must not show these as its previous instance's).
        if let Some(spec) = &pod.spec {
            let settings = &self.node.shared.settings;
            let names = spec
                .init_containers
                .iter()
                .flatten()
                .chain(spec.containers.iter())
                .map(|c| c.name.as_str());
            for container in names {
                let _ = std::fs::remove_file(settings.log_path(&namespace, &name, container));
                let _ =
                    std::fs::remove_file(settings.previous_log_path(&namespace, &name, container));
            }
        }
        self.forget(uid);
    }

    /// Writes the pod's status when it changed (and at least every minute).
    async fn write_status(&self, run: &mut PodRun, errors: &mut BTreeSet<String>) {
        let status = pod_status(run);
        let fresh = run
            .last_write
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60));
        if run.last_status.as_ref() == Some(&status) && fresh {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.node.client.clone(), &run.namespace);
        let patch = json!({"metadata": {"uid": run.uid}, "status": status});
        match api
            .patch_status(&run.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                run.last_status = Some(status);
                run.last_write = Some(Instant::now());
            }
            Err(error) => {
                errors.insert(format!("pod {}: status: {error}", run.label()));
            }
        }
    }

    /// Stops every process (TERM, then KILL after each pod's grace period) and leaves
    /// the pods as they are.
    async fn shutdown(&mut self) {
        for run in self.runs.values_mut() {
            let grace = grace_of(&run.pod);
            stop_pod(run, grace);
        }
        loop {
            let mut all_gone = true;
            for run in self.runs.values_mut() {
                all_gone &= reap_pod(run);
            }
            if all_gone {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let uids: Vec<String> = self.runs.keys().cloned().collect();
        for uid in uids {
            // Leave emptyDirs? The pod runs again at the next start, with fresh ones.
            self.forget(&uid);
        }
    }
}

/// SIGTERM to every running container of the pod, SIGKILL due after `grace`.
fn stop_pod(run: &mut PodRun, grace: Duration) {
    run.kill_at = Some(Instant::now() + grace);
    for container in run.all_mut() {
        container.ready = false;
        container.next_start = None;
        if let (Some(pid), true) = (container.pid, container.running()) {
            signal_group(pid, libc::SIGTERM);
        }
    }
}

/// Collects exits of a stopping pod (SIGKILL once its time has come); true when every
/// process is gone.
fn reap_pod(run: &mut PodRun) -> bool {
    let due = run.kill_at.is_some_and(|at| at <= Instant::now());
    let now = time_text(Timestamp::now());
    let mut all_gone = true;
    let killed = run.killed;
    for container in run.all_mut() {
        let Some(child) = &mut container.child else {
            continue;
        };
        match child.try_wait() {
            Ok(Some(status)) => {
                container.child = None;
                let code = status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
                container.exit_code = Some(code);
                container.ready = false;
                container.last = Some(terminated(container, code, &now, None));
            }
            Ok(None) => {
                all_gone = false;
                if due
                    && !killed
                    && let Some(pid) = container.pid
                {
                    signal_group(pid, libc::SIGKILL);
                }
            }
            Err(_) => {
                container.child = None;
            }
        }
    }
    if due {
        run.killed = true;
    }
    all_gone
}

fn terminated(container: &ContainerRun, code: i32, now: &str, message: Option<String>) -> Value {
    let reason = if code == 0 { "Completed" } else { "Error" };
    let mut state = json!({
        "exitCode": code,
        "reason": reason,
        "startedAt": container.started_at,
        "finishedAt": now,
        "containerID": container.pid.map(|p| format!("process://{p}")),
    });
    if let Some(message) = message {
        state["message"] = json!(message);
    }
    state
}

/// Records a container's exit and, as the restart policy says, when it runs again.
fn note_exit(
    settings: &super::Settings,
    container: &mut ContainerRun,
    clock: Instant,
    policy: RestartPolicy,
    init: bool,
) {
    let Some(child) = &mut container.child else {
        return;
    };
    let status = match child.try_wait() {
        Ok(Some(status)) => status,
        _ => return,
    };
    container.child = None;
    container.ready = false;
    container.kill_at = None;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    container.exit_code = Some(code);
    let now = time_text(Timestamp::now());
    let reason = container.kill_reason.take();
    container.last = Some(terminated(container, code, &now, reason));
    let ran = container
        .started
        .map(|s| clock.duration_since(s))
        .unwrap_or_default();
    if ran >= BACKOFF_RESET {
        container.exits = 0;
    }
    let restart = match policy {
        RestartPolicy::Always => !init || code != 0,
        RestartPolicy::OnFailure => code != 0,
        RestartPolicy::Never => false,
    };
    if restart {
        let factor = 1u32.checked_shl(container.exits).unwrap_or(u32::MAX);
        let delay = settings
            .backoff_base
            .saturating_mul(factor)
            .min(settings.backoff_cap);
        container.exits = container.exits.saturating_add(1);
        container.next_start = Some(clock + delay);
        container.waiting = Some((
            "CrashLoopBackOff".into(),
            format!(
                "back-off {}s restarting failed container={}",
                delay.as_secs(),
                container.name
            ),
        ));
    }
}

fn pod_condition(
    pod: &Pod,
    kind: &str,
    ok: bool,
    reason: Option<&str>,
    message: Option<String>,
) -> Value {
    let status = if ok { "True" } else { "False" };
    let transition = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.type_ == kind && c.status == status)
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| time_text(t.0))
        .unwrap_or_else(|| time_text(Timestamp::now()));
    let mut condition = json!({
        "type": kind,
        "status": status,
        "lastProbeTime": null,
        "lastTransitionTime": transition,
    });
    if let Some(generation) = pod.metadata.generation {
        condition["observedGeneration"] = json!(generation);
    }
    if let (false, Some(reason)) = (ok, reason) {
        condition["reason"] = json!(reason);
    }
    if let (false, Some(message)) = (ok, message) {
        condition["message"] = json!(message);
    }
    condition
}

/// The pod's status as the kubelet writes it (conditions it does not own are kept).
fn pod_status(run: &PodRun) -> Value {
    let pod = &run.pod;
    let initialized = run.initialized();
    let main_done = run.containers.iter().all(ContainerRun::done);
    let phase = if run.failed.is_some() {
        "Failed"
    } else if !initialized {
        "Pending"
    } else if main_done {
        if run.containers.iter().all(|c| c.exit_code == Some(0)) {
            "Succeeded"
        } else {
            "Failed"
        }
    } else if run.containers.iter().any(|c| c.started_at.is_some()) {
        "Running"
    } else {
        "Pending"
    };
    let unready: Vec<&str> = run
        .containers
        .iter()
        .filter(|c| !(c.ready && c.running()))
        .map(|c| c.name.as_str())
        .collect();
    let ready = phase == "Running" && unready.is_empty() && run.kill_at.is_none();
    let completed = phase == "Succeeded" || phase == "Failed";
    let not_ready_reason = if completed {
        "PodCompleted"
    } else {
        "ContainersNotReady"
    };
    let not_ready_message =
        (!completed).then(|| format!("containers with unready status: [{}]", unready.join(" ")));
    let uninitialized: Vec<&str> = run
        .init
        .iter()
        .filter(|c| !c.succeeded())
        .map(|c| c.name.as_str())
        .collect();
    let mut conditions: Vec<Value> = vec![
        pod_condition(
            pod,
            "PodReadyToStartContainers",
            run.prepared.is_some(),
            None,
            None,
        ),
        pod_condition(
            pod,
            "Initialized",
            initialized,
            Some("ContainersNotInitialized"),
            Some(format!(
                "containers with incomplete status: [{}]",
                uninitialized.join(" ")
            )),
        ),
        pod_condition(
            pod,
            "ContainersReady",
            ready,
            Some(not_ready_reason),
            not_ready_message.clone(),
        ),
        pod_condition(
            pod,
            "Ready",
            ready,
            Some(not_ready_reason),
            not_ready_message,
        ),
    ];
    let ours = [
        "PodReadyToStartContainers",
        "Initialized",
        "ContainersReady",
        "Ready",
    ];
    for other in pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| !ours.contains(&c.type_.as_str()))
    {
        if let Ok(value) = serde_json::to_value(other) {
            conditions.insert(0, value);
        }
    }
    let ip = run.ip.to_string();
    let mut status = json!({
        "phase": phase,
        "conditions": conditions,
        "hostIP": "127.0.0.1",
        "hostIPs": [{"ip": "127.0.0.1"}],
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": run.start_time,
        "containerStatuses": run
            .containers
            .iter()
            .map(|c| container_status(c, initialized, run.prepare_error.as_deref()))
            .collect::<Vec<_>>(),
    });
    if let Some(generation) = pod.metadata.generation {
        status["observedGeneration"] = json!(generation);
    }
    if !run.init.is_empty() {
        status["initContainerStatuses"] = json!(
            run.init
                .iter()
                .map(|c| container_status(c, true, run.prepare_error.as_deref()))
                .collect::<Vec<_>>()
        );
    }
    if let Some(qos) = pod.status.as_ref().and_then(|s| s.qos_class.clone()) {
        status["qosClass"] = json!(qos);
    }
    if let Some(message) = &run.failed {
        status["message"] = json!(message);
    }
    status
}

fn container_status(c: &ContainerRun, initialized: bool, volumes_error: Option<&str>) -> Value {
    let state = if c.running() {
        json!({"running": {"startedAt": c.started_at}})
    } else if c.done() {
        json!({"terminated": c.last})
    } else {
        let (reason, message) = match (&c.waiting, volumes_error) {
            (Some((reason, message)), _) => (reason.clone(), message.clone()),
            (None, Some(error)) => ("ContainerCreating".into(), error.to_string()),
            (None, None) if !initialized => ("PodInitializing".into(), String::new()),
            (None, None) => ("ContainerCreating".into(), String::new()),
        };
        let mut waiting = json!({"reason": reason});
        if !message.is_empty() {
            waiting["message"] = json!(message);
        }
        json!({"waiting": waiting})
    };
    let mut status = json!({
        "name": c.name,
        "image": c.image,
        "imageID": c.program.as_ref().map(|p| format!("process://{}", p.display())).unwrap_or_default(),
        "ready": c.ready && c.running(),
        "started": c.running() && c.startup_done,
        "restartCount": c.restart_count,
        "state": state,
    });
    if let Some(pid) = c.pid {
        status["containerID"] = json!(format!("process://{pid}"));
    }
    let show_last = c.running() || !c.done();
    if let (true, Some(last)) = (show_last, &c.last) {
        status["lastState"] = json!({"terminated": last});
    } else {
        status["lastState"] = json!({});
    }
    status
}
