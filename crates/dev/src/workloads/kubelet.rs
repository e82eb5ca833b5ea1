//! The process kubelet: runs the containers of pods whose images map to a program as local
//! processes, each pod on its own loopback address.
//!
//! - A container runs the mapped program with the container's `command` and `args` as its
//!   arguments; when the first word of `command` names the program itself (`multisite`,
//!   `/usr/local/bin/multisite`), it is dropped, as it stands for the image's entrypoint.
//! - The environment is emptied, then `PATH`, `HOSTNAME` and the container's `env` are set
//!   (literal values, `fieldRef` to the pod's name, namespace, uid, labels, pod IP and host
//!   IP, `secretKeyRef` and `configMapKeyRef` read from the store).
//! - Mounts are not mounts (no root, no namespaces): each volume is a directory (emptyDir:
//!   `<pod dir>/volumes/<name>`; persistentVolumeClaim: the claim's data directory, which
//!   outlives the pod; secret and configMap: their keys written as files in the pod's
//!   directory; hostPath: the path), and an argument, env value or working directory that
//!   starts with a mount path (or holds `=` followed by one, as in `--data=/data`) gets the
//!   directory in place of the mount path.
//! - `0.0.0.0` in an argument or env value becomes the pod's address.
//! - A URL host `NAME.NAMESPACE.svc` (or `.svc.cluster.local`) in an argument or env
//!   value becomes the address of a pod that Service NAME selects, Ready ones first,
//!   when the container starts (there is no cluster DNS); a container whose Service has
//!   no such pod yet waits.
//! - Init containers run one at a time, in order, each to completion; one that fails is
//!   run again with back-off (restartPolicy Always or OnFailure) or fails the pod (Never).
//!   A pod the runner finds already running from an earlier run starts again from its
//!   init containers (as after a node reboot).
//! - Readiness: `readinessProbe.httpGet` (path, port number or name; periodSeconds,
//!   timeoutSeconds, failureThreshold, successThreshold, initialDelaySeconds) against the
//!   pod's address, always plain HTTP (`scheme` and `host` are ignored); other probe
//!   kinds and liveness/startup probes are ignored, and a container without an HTTP
//!   readiness probe is ready once started.

use super::process::spawn;
use super::util::{
    at, deleting, format_time, list_all, name_of, namespace_of, pods, text, uid_of, write_status,
};
use super::{Settings, WorkloadError};
use crate::objects::{Store, WriteOptions};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Child;

/// Held on a pod while its processes run, so that a deleted pod stays until they are gone.
pub const KUBELET_FINALIZER: &str = "dev.multisite/process-kubelet";

/// A container that ran this long without exiting starts its back-off afresh.
const BACKOFF_RESET: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

#[derive(Clone, Debug)]
struct Probe {
    port: u16,
    path: String,
    initial_delay: Duration,
    period: Duration,
    timeout: Duration,
    failure_threshold: u32,
    success_threshold: u32,
}

#[derive(Debug)]
struct ContainerRun {
    name: String,
    spec: Value,
    program: PathBuf,
    child: Option<Child>,
    pid: Option<u32>,
    started_at: Option<String>,
    started: Option<Instant>,
    restart_count: u32,
    /// Consecutive exits, for the back-off.
    exits: u32,
    /// The state of the last exit (`lastState.terminated`, or `state.terminated` when the
    /// container is done).
    terminated: Option<Value>,
    exit_code: Option<i32>,
    /// When to start (again); `None` while running or when done.
    next_start: Option<Instant>,
    /// Why the last start failed.
    waiting: Option<(String, String)>,
    ready: bool,
    probe: Option<Probe>,
    next_probe: Instant,
    probe_failures: u32,
    probe_successes: u32,
}

impl ContainerRun {
    fn new(spec: &Value, program: PathBuf, now: Instant) -> Self {
        let probe = http_probe(spec);
        Self {
            name: text(spec, &["name"]).to_string(),
            spec: spec.clone(),
            program,
            child: None,
            pid: None,
            started_at: None,
            started: None,
            restart_count: 0,
            exits: 0,
            terminated: None,
            exit_code: None,
            next_start: None,
            waiting: None,
            ready: false,
            probe,
            next_probe: now,
            probe_failures: 0,
            probe_successes: 0,
        }
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }

    fn succeeded(&self) -> bool {
        !self.running() && self.exit_code == Some(0)
    }
}

#[derive(Debug)]
struct PodRun {
    namespace: String,
    name: String,
    ip: Ipv4Addr,
    policy: RestartPolicy,
    init: Vec<ContainerRun>,
    containers: Vec<ContainerRun>,
    start_time: String,
    failed: Option<String>,
    /// Set once the pod is being stopped: when to send SIGKILL.
    kill_at: Option<Instant>,
    killed: bool,
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
}

/// The process kubelet: what runs, by pod uid.
#[derive(Debug)]
pub struct Kubelet {
    settings: Settings,
    pods: BTreeMap<String, PodRun>,
}

impl Kubelet {
    pub fn new(mut settings: Settings) -> Result<Self, WorkloadError> {
        for dir in ["logs", "pods", "volumes", "run"] {
            let path = settings.state_dir.join(dir);
            std::fs::create_dir_all(&path).map_err(|e| WorkloadError::io(&path, e))?;
        }
        // Every path handed to a pod (volumes, secrets, working directory) derives from
        // this one, and each process runs in a working directory of its own: a relative
        // state directory would resolve elsewhere there.
        settings.state_dir = std::fs::canonicalize(&settings.state_dir)
            .map_err(|e| WorkloadError::io(&settings.state_dir, e))?;
        Ok(Self {
            settings,
            pods: BTreeMap::new(),
        })
    }

    /// The pids of a pod's running containers, by container name.
    pub fn pids(&self, namespace: &str, pod: &str) -> BTreeMap<String, u32> {
        self.pods
            .values()
            .filter(|p| p.namespace == namespace && p.name == pod)
            .flat_map(|p| p.all())
            .filter_map(|c| Some((c.name.clone(), c.pid.filter(|_| c.running())?)))
            .collect()
    }

    /// One pass: starts new pods, restarts exited containers, stops deleted pods, writes
    /// pod statuses. Returns what failed.
    pub fn sync(&mut self, store: &mut Store, now: Timestamp) -> Vec<WorkloadError> {
        let mut errors = Vec::new();
        if store.resource_info(&pods()).is_none() {
            return errors;
        }
        let listed = list_all(store, &pods());
        let present: BTreeSet<&str> = listed.iter().map(uid_of).collect();
        // Pods gone from the store: stop their processes.
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|uid| !present.contains(uid.as_str()))
            .cloned()
            .collect();
        let grace = self.settings.grace_period;
        for uid in gone {
            if let Some(run) = self.pods.get_mut(&uid)
                && run.kill_at.is_none()
            {
                stop(run, grace);
            }
        }
        for pod in &listed {
            let uid = uid_of(pod).to_string();
            if deleting(pod) {
                match self.pods.get_mut(&uid) {
                    Some(run) => {
                        let grace = at(pod, &["spec", "terminationGracePeriodSeconds"])
                            .and_then(Value::as_u64)
                            .map(Duration::from_secs);
                        if run.kill_at.is_none() {
                            stop(run, grace.unwrap_or(self.settings.grace_period));
                            // A terminating pod is no longer ready.
                            let status = pod_status(run, pod, now);
                            if let Err(e) = write_status(store, &pods(), pod, status) {
                                errors.push(e.into());
                            }
                        }
                    }
                    None => {
                        if let Err(e) = remove_finalizer(store, pod) {
                            errors.push(e);
                        }
                    }
                }
                continue;
            }
            if !self.pods.contains_key(&uid) {
                match self.admit(store, pod, now) {
                    Ok(Some(run)) => {
                        self.pods.insert(uid.clone(), run);
                    }
                    Ok(None) => continue,
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                }
            }
            let current = store
                .get(&pods(), namespace_of(pod), name_of(pod))
                .unwrap_or_else(|_| pod.clone());
            if let Some(run) = self.pods.get_mut(&uid) {
                step(&self.settings, store, &current, run, now);
                let status = pod_status(run, &current, now);
                if let Err(e) = write_status(store, &pods(), &current, status) {
                    errors.push(e.into());
                }
            }
        }
        // Pods whose processes are all gone after a stop: release them.
        let stopped: Vec<String> = self
            .pods
            .iter_mut()
            .filter(|(_, run)| run.kill_at.is_some())
            .filter_map(|(uid, run)| reap(run).then(|| uid.clone()))
            .collect();
        for uid in stopped {
            let Some(run) = self.pods.remove(&uid) else {
                continue;
            };
            for container in run.all() {
                let _ = std::fs::remove_file(self.pid_file(&run, &container.name));
            }
            let dir = self.settings.pod_dir(&run.namespace, &run.name);
            if let Err(e) = std::fs::remove_dir_all(&dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                errors.push(WorkloadError::io(&dir, e));
            }
            if let Ok(pod) = store.get(&pods(), &run.namespace, &run.name)
                && uid_of(&pod) == uid
                && let Err(e) = remove_finalizer(store, &pod)
            {
                errors.push(e);
            }
        }
        errors
    }

    fn pid_file(&self, run: &PodRun, container: &str) -> PathBuf {
        pid_file(&self.settings, &run.namespace, &run.name, container)
    }

    /// Takes a pod on when every container's image maps to a program: gives it an address
    /// and its directories, and holds it with the finalizer.
    fn admit(
        &mut self,
        store: &mut Store,
        pod: &Value,
        now: Timestamp,
    ) -> Result<Option<PodRun>, WorkloadError> {
        if matches!(text(pod, &["status", "phase"]), "Succeeded" | "Failed") {
            return Ok(None);
        }
        let specs = |field: &str| {
            at(pod, &["spec", field])
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let (init_specs, main_specs) = (specs("initContainers"), specs("containers"));
        if main_specs.is_empty() {
            return Ok(None);
        }
        let clock = Instant::now();
        let mut runs = Vec::new();
        for spec in init_specs.iter().chain(main_specs.iter()) {
            match self.settings.images.program_for(text(spec, &["image"])) {
                Some(program) => runs.push(ContainerRun::new(spec, program, clock)),
                None => {
                    unschedulable(store, pod, text(spec, &["image"]), now)?;
                    return Ok(None);
                }
            }
        }
        let containers = runs.split_off(init_specs.len());
        let ip = self.allocate(text(pod, &["status", "podIP"]))?;
        let policy = match text(pod, &["spec", "restartPolicy"]) {
            "Never" => RestartPolicy::Never,
            "OnFailure" => RestartPolicy::OnFailure,
            _ => RestartPolicy::Always,
        };
        let (namespace, name) = (namespace_of(pod), name_of(pod));
        let dir = self.settings.pod_dir(namespace, name);
        std::fs::create_dir_all(&dir).map_err(|e| WorkloadError::io(&dir, e))?;
        add_finalizer(store, pod)?;
        let mut run = PodRun {
            namespace: namespace.to_string(),
            name: name.to_string(),
            ip,
            policy,
            init: runs,
            containers,
            start_time: format_time(now),
            failed: None,
            kill_at: None,
            killed: false,
        };
        match run.init.first_mut() {
            Some(first) => first.next_start = Some(clock),
            None => run
                .containers
                .iter_mut()
                .for_each(|c| c.next_start = Some(clock)),
        }
        Ok(Some(run))
    }

    /// The pod's earlier address when it is free, else the lowest free one from
    /// [`Settings::first_address`]. An address is free when no pod of this runner has it
    /// and nothing on the machine listens on it (another runner's pods, stray processes).
    fn allocate(&self, previous: &str) -> Result<Ipv4Addr, WorkloadError> {
        let live: BTreeSet<Ipv4Addr> = self.pods.values().map(|p| p.ip).collect();
        let listening = listening_addresses();
        let usable = |ip: &Ipv4Addr| {
            let o = ip.octets();
            o[0] == 127
                && ip >= &self.settings.first_address
                && o[3] != 0
                && o[3] != 255
                && !live.contains(ip)
                && !listening.contains(ip)
        };
        if let Ok(ip) = previous.parse::<Ipv4Addr>()
            && usable(&ip)
        {
            return Ok(ip);
        }
        let last = u32::from(Ipv4Addr::new(127, 255, 255, 254));
        (u32::from(self.settings.first_address)..=last)
            .map(Ipv4Addr::from)
            .find(usable)
            .ok_or(WorkloadError::NoAddress)
    }

    /// Runs the readiness probes that are due (outside the store's lock).
    pub async fn probe(&mut self) {
        let now = Instant::now();
        let mut checks = tokio::task::JoinSet::new();
        for (uid, run) in &self.pods {
            if run.kill_at.is_some() {
                continue;
            }
            for (index, container) in run.containers.iter().enumerate() {
                let Some(probe) = &container.probe else {
                    continue;
                };
                let due = container.running()
                    && container.next_probe <= now
                    && container
                        .started
                        .is_some_and(|s| now.duration_since(s) >= probe.initial_delay);
                if due {
                    let (ip, probe, uid) = (run.ip, probe.clone(), uid.clone());
                    checks.spawn(async move {
                        let ok = http_get(ip, &probe).await;
                        (uid, index, ok)
                    });
                }
            }
        }
        while let Some(done) = checks.join_next().await {
            let Ok((uid, index, ok)) = done else {
                continue;
            };
            let Some(container) = self
                .pods
                .get_mut(&uid)
                .and_then(|r| r.containers.get_mut(index))
            else {
                continue;
            };
            let Some(probe) = &container.probe else {
                continue;
            };
            container.next_probe = Instant::now() + probe.period;
            if ok {
                container.probe_failures = 0;
                container.probe_successes += 1;
                if container.probe_successes >= probe.success_threshold {
                    container.ready = true;
                }
            } else {
                container.probe_successes = 0;
                container.probe_failures += 1;
                if container.probe_failures >= probe.failure_threshold {
                    container.ready = false;
                }
            }
        }
    }

    /// Stops every process: SIGTERM, then SIGKILL after the grace period.
    pub async fn shutdown(&mut self) {
        let grace = self.settings.grace_period;
        for run in self.pods.values_mut() {
            stop(run, grace);
        }
        loop {
            let mut all_gone = true;
            for run in self.pods.values_mut() {
                all_gone &= reap(run);
            }
            if all_gone {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.pods.clear();
    }
}

/// The addresses something listens on (TCP, from `/proc/net/tcp`; none where that file
/// cannot be read).
fn listening_addresses() -> BTreeSet<Ipv4Addr> {
    const LISTEN: &str = "0A";
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state) = (fields.get(1)?, fields.get(3)?);
            if *state != LISTEN {
                return None;
            }
            let hex = local.split(':').next()?;
            // The kernel prints the network-order bytes as one native-endian number.
            let raw = u32::from_str_radix(hex, 16).ok()?;
            Some(Ipv4Addr::from(raw.to_ne_bytes()))
        })
        .collect()
}

/// `<state>/run/<namespace>_<pod>_<container>.pid`, while the container runs.
fn pid_file(settings: &Settings, namespace: &str, pod: &str, container: &str) -> PathBuf {
    settings
        .state_dir
        .join("run")
        .join(format!("{namespace}_{pod}_{container}.pid"))
}

/// Sends SIGTERM to every process group of the pod and sets when to SIGKILL them.
fn stop(run: &mut PodRun, grace: Duration) {
    run.kill_at = Some(Instant::now() + grace);
    for container in run.all_mut() {
        container.next_start = None;
        container.ready = false;
        if let Some(pid) = container.pid.filter(|_| container.child.is_some()) {
            signal_group(pid, "TERM");
        }
    }
}

/// Whether every process of a stopping pod is gone; SIGKILLs them once the grace is over.
fn reap(run: &mut PodRun) -> bool {
    let late = run.kill_at.is_some_and(|t| Instant::now() >= t);
    if late && !run.killed {
        run.killed = true;
        for container in run.all_mut() {
            if let (Some(pid), Some(_)) = (container.pid, &container.child) {
                signal_group(pid, "KILL");
            }
        }
    }
    let mut all_gone = true;
    for container in run.all_mut() {
        if let Some(child) = &mut container.child {
            match child.try_wait() {
                Ok(None) => all_gone = false,
                _ => container.child = None,
            }
        }
    }
    all_gone
}

/// Signals the process group a container leads (each container is its own group).
fn signal_group(pid: u32, signal: &str) {
    let result = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(format!("-{pid}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if let Err(error) = result {
        tracing::warn!(%error, pid, "cannot signal a pod's process");
    }
}

/// Notes exits, schedules restarts and starts what is due.
fn step(settings: &Settings, store: &Store, pod: &Value, run: &mut PodRun, now: Timestamp) {
    if run.kill_at.is_some() || run.failed.is_some() {
        return;
    }
    let clock = Instant::now();
    let policy = run.policy;
    for container in &mut run.init {
        note_exit(settings, container, clock, now, policy, true);
    }
    for container in &mut run.containers {
        note_exit(settings, container, clock, now, policy, false);
    }
    // An init container that failed under restartPolicy Never fails the pod.
    if policy == RestartPolicy::Never
        && run
            .init
            .iter()
            .any(|c| !c.running() && c.exit_code.is_some_and(|code| code != 0))
    {
        run.failed = Some("an init container failed".to_string());
        return;
    }
    if !run.initialized() {
        // The first init container that has not succeeded runs next.
        let pending = run.init.iter().position(|c| !c.succeeded());
        if let Some(index) = pending {
            let idle = !run.init[index].running() && run.init[index].next_start.is_none();
            if idle && run.init[index].exit_code.is_none() {
                run.init[index].next_start = Some(clock);
            }
            start_due(settings, store, pod, run, true, index, clock, now);
        }
        return;
    }
    // Main containers start once the init containers are done.
    for container in &mut run.containers {
        let never_started = container.started_at.is_none()
            && container.next_start.is_none()
            && container.exit_code.is_none()
            && container.waiting.is_none();
        if never_started {
            container.next_start = Some(clock);
        }
    }
    for index in 0..run.containers.len() {
        start_due(settings, store, pod, run, false, index, clock, now);
    }
}

/// Records a container's exit and, as the restart policy says, when it runs again.
fn note_exit(
    settings: &Settings,
    container: &mut ContainerRun,
    clock: Instant,
    now: Timestamp,
    policy: RestartPolicy,
    init: bool,
) {
    let Some(child) = &mut container.child else {
        return;
    };
    let status = match child.try_wait() {
        Ok(Some(status)) => status,
        Ok(None) => return,
        Err(_) => return,
    };
    container.child = None;
    container.ready = false;
    container.probe_successes = 0;
    container.probe_failures = 0;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    container.exit_code = Some(code);
    container.terminated = Some(json!({
        "exitCode": code,
        "reason": if code == 0 { "Completed" } else { "Error" },
        "startedAt": container.started_at,
        "finishedAt": format_time(now),
        "containerID": container.pid.map(|p| format!("process://{p}")),
    }));
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
    }
}

#[allow(clippy::too_many_arguments)]
fn start_due(
    settings: &Settings,
    store: &Store,
    pod: &Value,
    run: &mut PodRun,
    init: bool,
    index: usize,
    clock: Instant,
    now: Timestamp,
) {
    let (ip, label) = (run.ip, run.label());
    let container = if init {
        &mut run.init[index]
    } else {
        &mut run.containers[index]
    };
    if container.running() || container.next_start.is_none_or(|t| t > clock) {
        return;
    }
    match spawn(
        settings,
        store,
        pod,
        ip,
        &container.spec,
        &container.program,
        &container.name,
    ) {
        Ok(child) => {
            if container.started_at.is_some() {
                container.restart_count += 1;
            }
            container.pid = child.id();
            container.child = Some(child);
            container.started_at = Some(format_time(now));
            container.started = Some(clock);
            container.next_start = None;
            container.waiting = None;
            container.next_probe = clock;
            container.ready = container.probe.is_none();
            if let Some(pid) = container.pid {
                let path = pid_file(settings, &run.namespace, &run.name, &container.name);
                if let Err(error) = std::fs::write(&path, format!("{pid}\n")) {
                    tracing::warn!(%error, path = %path.display(), "cannot write a pid file");
                }
            }
        }
        Err(error) => {
            tracing::warn!(%error, pod = %label, container = %container.name, "cannot start a container");
            container.waiting = Some(("CreateContainerConfigError".into(), error.to_string()));
            container.next_start = Some(clock + settings.backoff_base);
        }
    }
}

/// The container's HTTP readiness probe, with Kubernetes' defaults.
fn http_probe(spec: &Value) -> Option<Probe> {
    let probe = spec.get("readinessProbe")?;
    let get = probe.get("httpGet")?;
    let port = match get.get("port")? {
        Value::Number(n) => u16::try_from(n.as_u64()?).ok()?,
        Value::String(s) => match s.parse::<u16>() {
            Ok(n) => n,
            Err(_) => at(spec, &["ports"])?
                .as_array()?
                .iter()
                .find(|p| p.get("name").and_then(Value::as_str) == Some(s.as_str()))
                .and_then(|p| p.get("containerPort")?.as_u64())
                .and_then(|n| u16::try_from(n).ok())?,
        },
        _ => return None,
    };
    let seconds = |field: &str, default: u64| {
        Duration::from_secs(probe.get(field).and_then(Value::as_u64).unwrap_or(default))
    };
    let count = |field: &str, default: u32| {
        probe
            .get(field)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(default)
            .max(1)
    };
    let path = match text(get, &["path"]) {
        "" => "/".to_string(),
        p if p.starts_with('/') => p.to_string(),
        p => format!("/{p}"),
    };
    Some(Probe {
        port,
        path,
        initial_delay: seconds("initialDelaySeconds", 0),
        period: seconds("periodSeconds", 10).max(Duration::from_secs(1)),
        timeout: seconds("timeoutSeconds", 1).max(Duration::from_secs(1)),
        failure_threshold: count("failureThreshold", 3),
        success_threshold: count("successThreshold", 1),
    })
}

/// A GET with a status in 200..400 within the timeout.
async fn http_get(ip: Ipv4Addr, probe: &Probe) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((ip, probe.port))
            .await
            .ok()?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {ip}:{}\r\nUser-Agent: kube-probe/1.34\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            probe.path, probe.port
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 64];
        let mut read = 0;
        while read < 12 {
            let n = stream.read(&mut head[read..]).await.ok()?;
            if n == 0 {
                break;
            }
            read += n;
        }
        let line = String::from_utf8_lossy(&head[..read]).to_string();
        let code: u16 = line.split(' ').nth(1)?.get(..3)?.parse().ok()?;
        Some((200..400).contains(&code))
    };
    matches!(
        tokio::time::timeout(probe.timeout, attempt).await,
        Ok(Some(true))
    )
}

fn add_finalizer(store: &mut Store, pod: &Value) -> Result<(), WorkloadError> {
    edit_finalizers(store, pod, |f| {
        if !f.iter().any(|x| x == KUBELET_FINALIZER) {
            f.push(json!(KUBELET_FINALIZER));
        }
    })
}

fn remove_finalizer(store: &mut Store, pod: &Value) -> Result<(), WorkloadError> {
    edit_finalizers(store, pod, |f| f.retain(|x| x != KUBELET_FINALIZER))
}

fn edit_finalizers(
    store: &mut Store,
    pod: &Value,
    edit: impl FnOnce(&mut Vec<Value>),
) -> Result<(), WorkloadError> {
    let before: Vec<Value> = at(pod, &["metadata", "finalizers"])
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut after = before.clone();
    edit(&mut after);
    if after == before {
        return Ok(());
    }
    let mut updated = pod.clone();
    if let Some(meta) = updated.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        if after.is_empty() {
            meta.remove("finalizers");
        } else {
            meta.insert("finalizers".into(), Value::Array(after));
        }
    }
    store.update(
        &pods(),
        namespace_of(pod),
        name_of(pod),
        updated,
        &WriteOptions::default(),
    )?;
    Ok(())
}

/// The pod's status as the kubelet sees it.
fn pod_status(run: &PodRun, pod: &Value, now: Timestamp) -> Value {
    let initialized = run.initialized();
    let main_done = run
        .containers
        .iter()
        .all(|c| !c.running() && c.next_start.is_none() && c.exit_code.is_some());
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
    let containers_ready = phase == "Running" && run.containers.iter().all(|c| c.ready);
    let previous = at(pod, &["status", "conditions"])
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let conditions: Vec<Value> = [
        ("PodScheduled", true),
        ("Initialized", initialized),
        ("ContainersReady", containers_ready),
        ("Ready", containers_ready),
    ]
    .into_iter()
    .map(|(kind, ok)| pod_condition(&previous, kind, ok, now))
    .collect();
    let ip = run.ip.to_string();
    let mut status = json!({
        "phase": phase,
        "conditions": conditions,
        "hostIP": "127.0.0.1",
        "hostIPs": [{"ip": "127.0.0.1"}],
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": run.start_time,
        "qosClass": "BestEffort",
        "containerStatuses": run.containers.iter().map(|c| container_status(c, initialized)).collect::<Vec<_>>(),
    });
    if !run.init.is_empty() {
        status["initContainerStatuses"] = json!(
            run.init
                .iter()
                .map(|c| container_status(c, true))
                .collect::<Vec<_>>()
        );
    }
    if let Some(message) = &run.failed {
        status["message"] = json!(message);
    }
    status
}

/// Says on a pod that no program runs its image, as a scheduler says it found no node.
fn unschedulable(
    store: &mut Store,
    pod: &Value,
    image: &str,
    now: Timestamp,
) -> Result<(), WorkloadError> {
    let previous = at(pod, &["status", "conditions"])
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut scheduled = pod_condition(&previous, "PodScheduled", false, now);
    scheduled["reason"] = json!("Unschedulable");
    scheduled["message"] = json!(format!(
        "the dev cluster runs no program for image {image:?}"
    ));
    let status = json!({"phase": "Pending", "conditions": [scheduled], "qosClass": "BestEffort"});
    write_status(store, &pods(), pod, status)?;
    Ok(())
}

fn pod_condition(previous: &[Value], kind: &str, ok: bool, now: Timestamp) -> Value {
    let status = if ok { "True" } else { "False" };
    let transition = previous
        .iter()
        .find(|c| {
            c.get("type").and_then(Value::as_str) == Some(kind)
                && c.get("status").and_then(Value::as_str) == Some(status)
        })
        .and_then(|c| c.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| json!(format_time(now)));
    json!({"type": kind, "status": status, "lastProbeTime": null, "lastTransitionTime": transition})
}

fn container_status(c: &ContainerRun, initialized: bool) -> Value {
    let state = if c.running() {
        json!({"running": {"startedAt": c.started_at}})
    } else if c.next_start.is_none() && c.exit_code.is_some() {
        json!({"terminated": c.terminated})
    } else {
        let (reason, message) = match &c.waiting {
            Some((reason, message)) => (reason.as_str(), message.as_str()),
            None if !initialized => ("PodInitializing", ""),
            None if c.exit_code.is_some() => (
                "CrashLoopBackOff",
                "back-off restarting the exited container",
            ),
            None => ("ContainerCreating", ""),
        };
        json!({"waiting": {"reason": reason, "message": message}})
    };
    let mut status = json!({
        "name": c.name,
        "image": text(&c.spec, &["image"]),
        "imageID": "",
        "ready": c.ready && c.running(),
        "started": c.running(),
        "restartCount": c.restart_count,
        "state": state,
    });
    if let Some(pid) = c.pid {
        status["containerID"] = json!(format!("process://{pid}"));
    }
    if c.running()
        && let Some(last) = &c.terminated
    {
        status["lastState"] = json!({"terminated": last});
    } else if !c.running() && c.next_start.is_some() && c.terminated.is_some() {
        status["lastState"] = json!({"terminated": c.terminated});
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_with_a_listener_are_seen() {
        let listener = std::net::TcpListener::bind("127.9.8.7:0").unwrap();
        assert!(listening_addresses().contains(&Ipv4Addr::new(127, 9, 8, 7)));
        drop(listener);
    }

    #[test]
    fn http_probes_take_named_ports_and_defaults() {
        let spec = json!({
            "name": "c",
            "ports": [{"name": "api", "containerPort": 7400}],
            "readinessProbe": {"httpGet": {"path": "healthz", "port": "api"}},
        });
        let probe = http_probe(&spec).unwrap();
        assert_eq!(probe.port, 7400);
        assert_eq!(probe.path, "/healthz");
        assert_eq!(probe.period, Duration::from_secs(10));
        assert_eq!(probe.failure_threshold, 3);
        assert!(http_probe(&json!({"readinessProbe": {"exec": {"command": ["true"]}}})).is_none());
        assert!(http_probe(&json!({"readinessProbe": {"httpGet": {"port": "nope"}}})).is_none());
    }
}
