//! `multisite node` against the real Kubernetes control plane of `e2e/kube/`: the agent
//! registers node-a, node-b and node-c (zones zone-a, zone-b, zone-c) with the node
//! credentials up.sh made, and the pods the real scheduler binds to them run as local
//! processes.
//!
//! Every test is ignored by default and needs `MULTISITE_KUBE_STATE`, the state
//! directory of a running control plane; without it a test fails (it never passes by
//! skipping):
//!
//! ```sh
//! e2e/kube/up.sh /tmp/node-kube
//! MULTISITE_KUBE_STATE=/tmp/node-kube cargo test --test node_agent -- --ignored --test-threads=1
//! e2e/kube/down.sh /tmp/node-kube
//! ```
//!
//! Each test starts an agent of its own (stopped when the test ends, also on failure)
//! and works in a namespace of its own, so one control plane serves many runs.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const LIMIT: Duration = Duration::from_secs(60);
const NODES: [(&str, &str); 3] = [
    ("node-a", "zone-a"),
    ("node-b", "zone-b"),
    ("node-c", "zone-c"),
];

fn state() -> PathBuf {
    let Some(dir) = std::env::var_os("MULTISITE_KUBE_STATE") else {
        panic!(
            "MULTISITE_KUBE_STATE is not set: this test needs the real control plane; start it \
             with `e2e/kube/up.sh DIR` and run the test with MULTISITE_KUBE_STATE=DIR"
        );
    };
    let dir = PathBuf::from(dir);
    for (node, _) in NODES {
        let kubeconfig = dir.join("nodes").join(node).join("kubeconfig");
        assert!(
            kubeconfig.is_file(),
            "{} is missing: up.sh makes credentials for node-a, node-b and node-c",
            kubeconfig.display()
        );
    }
    dir
}

fn unique(prefix: &str) -> String {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{:x}{}",
        std::process::id(),
        now % 0xfffff,
        COUNT.fetch_add(1, Ordering::Relaxed)
    )
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn kubectl_output(state: &Path, args: &[&str], input: Option<&str>) -> Output {
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(state.join("kubeconfig"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("kubectl cannot run: {e}"));
    if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
        stdin.write_all(input.as_bytes()).expect("kubectl stdin");
    }
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait for kubectl").is_some() {
            return child.wait_with_output().expect("kubectl output");
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("kubectl {args:?} did not finish within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kubectl(state: &Path, args: &[&str]) -> String {
    let out = kubectl_output(state, args, None);
    assert!(
        out.status.success(),
        "kubectl {} failed: {}",
        args.join(" "),
        lossy(&out.stderr)
    );
    lossy(&out.stdout)
}

fn apply(state: &Path, namespace: &str, object: &Value) {
    let text = object.to_string();
    let out = kubectl_output(state, &["apply", "-n", namespace, "-f", "-"], Some(&text));
    assert!(
        out.status.success(),
        "kubectl apply failed: {}\n{text}",
        lossy(&out.stderr)
    );
}

fn get_json(state: &Path, args: &[&str]) -> Option<Value> {
    let mut full = vec!["get"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["-o", "json"]);
    let out = kubectl_output(state, &full, None);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn eventually<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A namespace of the test's own, deleted when the test ends.
struct Namespace {
    state: PathBuf,
    name: String,
}

impl Namespace {
    fn new(state: &Path) -> Self {
        let name = unique("node");
        kubectl(state, &["create", "namespace", &name]);
        eventually("the default ServiceAccount", LIMIT, || {
            get_json(state, &["serviceaccount", "default", "-n", &name]).map(|_| ())
        });
        Self {
            state: state.to_path_buf(),
            name,
        }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = kubectl_output(
            &self.state,
            &["delete", "namespace", &self.name, "--wait=false"],
            None,
        );
    }
}

/// Three ports in a row that nothing listens on.
fn free_port_base() -> u16 {
    let seed = (std::process::id() as u64 * 7919
        + SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0))
        % 20000;
    for offset in 0..2000u64 {
        let base = 30000 + ((seed + offset * 3) % 25000) as u16;
        let free = (0..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if free {
            return base;
        }
    }
    panic!("no three free ports in a row");
}

/// A running `multisite node`, stopped (SIGTERM, then SIGKILL) when dropped.
struct Agent {
    child: Child,
    dir: PathBuf,
    port_base: u16,
}

impl Agent {
    fn start(state: &Path, extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(unique("multisite-node-agent"));
        std::fs::create_dir_all(&dir).expect("agent state directory");
        let log = std::fs::File::create(dir.join("agent.log")).expect("agent log");
        let port_base = free_port_base();
        let mut command = Command::new(env!("CARGO_BIN_EXE_multisite"));
        command
            .arg("node")
            .arg("--credentials")
            .arg(state.join("nodes"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--kubelet-port-base")
            .arg(port_base.to_string())
            .args(["--image", "shell=/bin/sh"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        for (node, zone) in NODES {
            command.arg("--node").arg(format!("{node}={zone}"));
        }
        let child = command.spawn().expect("multisite node starts");
        let agent = Self {
            child,
            dir,
            port_base,
        };
        agent.wait_ready(state);
        agent
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Every node Ready, reported by this agent (its kubelet port).
    fn wait_ready(&self, state: &Path) {
        for (index, (node, _)) in NODES.iter().enumerate() {
            let port = u64::from(self.port_base) + index as u64;
            eventually(&format!("{node} Ready on port {port}"), LIMIT, || {
                let object = get_json(state, &["node", node])?;
                let ready = object["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                let ours =
                    object["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] == json!(port);
                (ready && ours).then_some(())
            });
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the agent this test started.
        let pid = self.child.id() as i32;
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let started = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if started.elapsed() > Duration::from_secs(40) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !std::thread::panicking() {
            // Kept after a failure, for its log and the pods' logs.
            let _ = std::fs::remove_dir_all(&self.dir);
            return;
        }
        let log = self.log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!(
            "--- the agent's last log lines (all of it, and the pods' logs, in {}) ---",
            self.dir.display()
        );
        for line in tail.iter().rev() {
            eprintln!("{line}");
        }
    }
}

fn pod(state: &Path, namespace: &str, name: &str) -> Option<Value> {
    get_json(state, &["pod", name, "-n", namespace])
}

fn condition(pod: &Value, kind: &str) -> Option<String> {
    pod["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .and_then(|c| c["status"].as_str())
        .map(str::to_string)
}

fn shell_pod(name: &str, zone: &str, script: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeSelector": {"topology.kubernetes.io/zone": zone},
            "terminationGracePeriodSeconds": 5,
            "containers": [{"name": "main", "image": "shell", "command": ["sh", "-c", script]}],
        },
    })
}

fn wait_running(state: &Path, namespace: &str, name: &str) -> Value {
    eventually(&format!("pod {name} Running"), LIMIT, || {
        let pod = pod(state, namespace, name)?;
        (pod["status"]["phase"] == "Running").then_some(pod)
    })
}

fn logs(state: &Path, namespace: &str, name: &str, extra: &[&str]) -> Option<String> {
    let mut args = vec!["logs", "-n", namespace, name];
    args.extend_from_slice(extra);
    let out = kubectl_output(state, &args, None);
    out.status.success().then(|| lossy(&out.stdout))
}

fn wait_log(state: &Path, namespace: &str, name: &str, needle: &str) -> String {
    eventually(&format!("{needle:?} in the log of {name}"), LIMIT, || {
        logs(state, namespace, name, &[]).filter(|l| l.contains(needle))
    })
}

#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn nodes_register_ready_with_zone_labels_and_renew_their_leases() {
    let state = state();
    let agent = Agent::start(&state, &[]);
    for (index, (node, zone)) in NODES.iter().enumerate() {
        let object = get_json(&state, &["node", node]).expect("the node exists");
        let labels = &object["metadata"]["labels"];
        assert_eq!(labels["kubernetes.io/hostname"], *node);
        assert_eq!(labels["topology.kubernetes.io/zone"], *zone);
        assert_eq!(labels["kubernetes.io/os"], "linux");
        assert!(labels["kubernetes.io/arch"].is_string());
        let status = &object["status"];
        assert_eq!(status["nodeInfo"]["kubeletVersion"], "v1.37.2-multisite");
        assert_eq!(
            status["nodeInfo"]["containerRuntimeVersion"],
            "multisite://process"
        );
        assert_eq!(status["capacity"]["pods"], "110");
        assert!(status["allocatable"]["memory"].is_string());
        assert_eq!(
            status["daemonEndpoints"]["kubeletEndpoint"]["Port"],
            json!(u64::from(agent.port_base) + index as u64)
        );
        let addresses = status["addresses"].as_array().expect("addresses");
        assert!(
            addresses
                .iter()
                .any(|a| a["type"] == "InternalIP" && a["address"] == "127.0.0.1")
        );
        for kind in ["MemoryPressure", "DiskPressure", "PIDPressure"] {
            assert_eq!(condition(&object, kind).as_deref(), Some("False"), "{kind}");
        }
    }
    let lease = |node: &str| {
        get_json(&state, &["lease", node, "-n", "kube-node-lease"]).expect("the node's lease")
    };
    let first = lease("node-b");
    assert_eq!(first["spec"]["holderIdentity"], "node-b");
    assert_eq!(first["spec"]["leaseDurationSeconds"], 40);
    assert_eq!(first["metadata"]["ownerReferences"][0]["kind"], "Node");
    assert_eq!(first["metadata"]["ownerReferences"][0]["name"], "node-b");
    let renewed = first["spec"]["renewTime"].clone();
    eventually("the lease renewed", Duration::from_secs(25), || {
        (lease("node-b")["spec"]["renewTime"] != renewed).then_some(())
    });
}

#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn a_pod_runs_on_its_zones_node_with_env_volumes_and_a_working_token() {
    let state = state();
    let _agent = Agent::start(&state, &[]);
    let ns = Namespace::new(&state);
    kubectl(
        &state,
        &[
            "create",
            "secret",
            "generic",
            "creds",
            "-n",
            &ns.name,
            "--from-literal=password=hunter2",
        ],
    );
    kubectl(
        &state,
        &[
            "create",
            "configmap",
            "settings",
            "-n",
            &ns.name,
            "--from-literal=greeting=hello",
            "--from-literal=color=blue",
        ],
    );
    let sa = "/var/run/secrets/kubernetes.io/serviceaccount";
    let script = format!(
        "echo secret=$(cat /etc/creds/password); \
         echo config=$(cat /etc/settings/greeting) item=$(cat /etc/only/colour); \
         echo env=$GREETING expanded=$EXPANDED pod=$POD_NAME node=$NODE ip=$POD_IP host=$(hostname); \
         echo args=$1 tmp=$(ls -A /tmp | wc -l); \
         echo namespace=$(cat {sa}/namespace); \
         curl -s --cacert {sa}/ca.crt -H \"Authorization: Bearer $(cat {sa}/token)\" \
           -H 'Content-Type: application/json' -X POST \
           -d '{{\"apiVersion\":\"authentication.k8s.io/v1\",\"kind\":\"SelfSubjectReview\"}}' \
           https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/apis/authentication.k8s.io/v1/selfsubjectreviews \
           | tr -d ' \\n'; echo; echo done; exec sleep 600"
    );
    let object = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "seer", "labels": {"app": "seer"}},
        "spec": {
            "nodeSelector": {"topology.kubernetes.io/zone": "zone-b"},
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "main",
                "image": "shell",
                "command": ["sh", "-c", script, "sh"],
                "args": ["$(GREETING)-arg"],
                "env": [
                    {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
                    {"name": "EXPANDED", "value": "$(GREETING)-world"},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                ],
                "volumeMounts": [
                    {"name": "creds", "mountPath": "/etc/creds"},
                    {"name": "settings", "mountPath": "/etc/settings"},
                    {"name": "only", "mountPath": "/etc/only"},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
            }],
            "volumes": [
                {"name": "creds", "secret": {"secretName": "creds"}},
                {"name": "settings", "configMap": {"name": "settings"}},
                {"name": "only", "configMap": {"name": "settings", "items": [{"key": "color", "path": "colour"}]}},
                {"name": "tmp", "emptyDir": {}},
            ],
        },
    });
    apply(&state, &ns.name, &object);
    let running = wait_running(&state, &ns.name, "seer");
    assert_eq!(running["spec"]["nodeName"], "node-b");
    let ip = running["status"]["podIP"]
        .as_str()
        .expect("podIP")
        .to_string();
    assert!(ip.starts_with("127."), "{ip}");
    let log = wait_log(&state, &ns.name, "seer", "done");
    for expected in [
        "secret=hunter2".to_string(),
        "config=hello item=blue".to_string(),
        format!("env=hello expanded=hello-world pod=seer node=node-b ip={ip} host=seer"),
        // /tmp is the pod's emptyDir (the agent's own state lies under the host's /tmp).
        "args=hello-arg tmp=0".to_string(),
        format!("namespace={}", ns.name),
        format!("\"username\":\"system:serviceaccount:{}:default\"", ns.name),
    ] {
        assert!(
            log.contains(&expected),
            "{expected:?} not in the log:\n{log}"
        );
    }
    // Nothing of the pod's mounts is visible on the host.
    assert!(!Path::new("/etc/creds/password").exists());
    let status = &running["status"];
    assert_eq!(status["hostIP"], "127.0.0.1");
    assert_eq!(status["podIPs"][0]["ip"], json!(ip));
    let container = &status["containerStatuses"][0];
    assert!(
        container["containerID"]
            .as_str()
            .is_some_and(|id| id.starts_with("process://")),
        "{container}"
    );
    assert!(container["state"]["running"]["startedAt"].is_string());
    for kind in [
        "PodScheduled",
        "PodReadyToStartContainers",
        "Initialized",
        "ContainersReady",
        "Ready",
    ] {
        assert_eq!(condition(&running, kind).as_deref(), Some("True"), "{kind}");
    }
}

#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn init_containers_run_first_and_a_readiness_probe_drives_ready() {
    let state = state();
    let _agent = Agent::start(&state, &[]);
    let ns = Namespace::new(&state);
    let object = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probed"},
        "spec": {
            "nodeSelector": {"topology.kubernetes.io/zone": "zone-a"},
            "terminationGracePeriodSeconds": 2,
            "initContainers": [{
                "name": "setup",
                "image": "shell",
                "command": ["sh", "-c", "echo from-init > /work/init.txt"],
                "volumeMounts": [{"name": "work", "mountPath": "/work"}],
            }],
            "containers": [{
                "name": "main",
                "image": "shell",
                "command": ["sh", "-c", "cat /work/init.txt; sleep 4; touch /work/ready; echo now-ready; exec sleep 600"],
                "readinessProbe": {"exec": {"command": ["cat", "/work/ready"]}, "periodSeconds": 1},
                "volumeMounts": [{"name": "work", "mountPath": "/work"}],
            }],
            "volumes": [{"name": "work", "emptyDir": {}}],
        },
    });
    apply(&state, &ns.name, &object);
    let running = wait_running(&state, &ns.name, "probed");
    assert_eq!(condition(&running, "Initialized").as_deref(), Some("True"));
    assert_eq!(
        running["status"]["initContainerStatuses"][0]["state"]["terminated"]["reason"],
        "Completed"
    );
    assert_eq!(condition(&running, "Ready").as_deref(), Some("False"));
    wait_log(&state, &ns.name, "probed", "from-init");
    let ready = eventually("the pod Ready", LIMIT, || {
        let pod = pod(&state, &ns.name, "probed")?;
        (condition(&pod, "Ready").as_deref() == Some("True")).then_some(pod)
    });
    assert_eq!(ready["status"]["containerStatuses"][0]["ready"], true);
    let log = logs(&state, &ns.name, "probed", &[]).unwrap_or_default();
    assert!(
        log.contains("now-ready"),
        "ready before the probe could pass: {log}"
    );
}

#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn an_exiting_container_restarts_with_back_off_and_keeps_its_previous_log() {
    let state = state();
    let _agent = Agent::start(
        &state,
        &["--backoff-base-seconds", "1", "--backoff-cap-seconds", "4"],
    );
    let ns = Namespace::new(&state);
    apply(
        &state,
        &ns.name,
        &shell_pod(
            "crasher",
            "zone-c",
            "echo instance-$(date +%s%N); sleep 0.3; exit 3",
        ),
    );
    let started = Instant::now();
    let crashed = eventually("three restarts", LIMIT, || {
        let pod = pod(&state, &ns.name, "crasher")?;
        (pod["status"]["containerStatuses"][0]["restartCount"].as_i64()? >= 3).then_some(pod)
    });
    // Back-off 1 s, 2 s, 4 s between the four runs (each ~0.3 s).
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(6),
        "restarted too soon: {elapsed:?}"
    );
    let status = &crashed["status"]["containerStatuses"][0];
    assert_eq!(status["lastState"]["terminated"]["exitCode"], 3);
    assert_eq!(status["lastState"]["terminated"]["reason"], "Error");
    let waiting = eventually("CrashLoopBackOff", LIMIT, || {
        let pod = pod(&state, &ns.name, "crasher")?;
        let state = &pod["status"]["containerStatuses"][0]["state"];
        (state["waiting"]["reason"] == "CrashLoopBackOff").then_some(pod)
    });
    assert_eq!(waiting["status"]["phase"], "Running");
    let current = logs(&state, &ns.name, "crasher", &[]).expect("current log");
    let previous = logs(&state, &ns.name, "crasher", &["--previous"]).expect("previous log");
    assert!(previous.starts_with("instance-"), "{previous:?}");
    assert!(current.starts_with("instance-"), "{current:?}");
    assert_ne!(current, previous);
}

#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn kubectl_logs_follows_a_running_container_through_the_api_server() {
    let state = state();
    let _agent = Agent::start(&state, &[]);
    let ns = Namespace::new(&state);
    apply(
        &state,
        &ns.name,
        &shell_pod(
            "talker",
            "zone-a",
            "i=0; while true; do i=$((i+1)); echo line-$i; sleep 0.5; done",
        ),
    );
    wait_running(&state, &ns.name, "talker");
    wait_log(&state, &ns.name, "talker", "line-1");
    let tail = logs(&state, &ns.name, "talker", &["--tail=1"]).expect("tail");
    assert_eq!(tail.lines().count(), 1, "{tail:?}");
    let mut follow = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(state.join("kubeconfig"))
        .args(["logs", "-f", "-n", &ns.name, "talker"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl logs -f");
    let stdout = follow.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while lines.len() < 12 && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
            lines.push(line);
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(lines.len() >= 12, "followed only {lines:?}");
    // Lines keep coming while kubectl follows: the last arrived well after the first.
    let spread = lines[lines.len() - 1].0.duration_since(lines[0].0);
    assert!(spread >= Duration::from_secs(1), "all at once: {lines:?}");
    let numbers: Vec<u64> = lines
        .iter()
        .filter_map(|(_, l)| l.strip_prefix("line-")?.parse().ok())
        .collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
}

#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn graceful_deletion_honours_the_grace_period_and_the_pod_disappears() {
    let state = state();
    let _agent = Agent::start(&state, &[]);
    let ns = Namespace::new(&state);
    // One pod finishes 2 s after SIGTERM, the other ignores it and is killed.
    let mut polite = shell_pod(
        "polite",
        "zone-b",
        "trap 'echo got-term; sleep 2; echo bye; exit 0' TERM; echo up; while true; do sleep 0.1; done",
    );
    polite["spec"]["terminationGracePeriodSeconds"] = json!(20);
    let mut stubborn = shell_pod(
        "stubborn",
        "zone-b",
        "trap '' TERM; echo up; while true; do sleep 0.1; done",
    );
    stubborn["spec"]["terminationGracePeriodSeconds"] = json!(3);
    apply(&state, &ns.name, &polite);
    apply(&state, &ns.name, &stubborn);
    for name in ["polite", "stubborn"] {
        wait_running(&state, &ns.name, name);
        wait_log(&state, &ns.name, name, "up");
    }
    let started = Instant::now();
    kubectl(
        &state,
        &[
            "delete",
            "pod",
            "polite",
            "stubborn",
            "-n",
            &ns.name,
            "--wait=false",
        ],
    );
    let terminating = pod(&state, &ns.name, "polite").expect("still there while it stops");
    assert!(terminating["metadata"]["deletionTimestamp"].is_string());
    let mut gone = std::collections::BTreeMap::new();
    eventually("both pods gone", LIMIT, || {
        for name in ["polite", "stubborn"] {
            if !gone.contains_key(name) && pod(&state, &ns.name, name).is_none() {
                gone.insert(name, started.elapsed());
            }
        }
        (gone.len() == 2).then_some(())
    });
    let (polite_took, stubborn_took) = (gone["polite"], gone["stubborn"]);
    assert!(
        polite_took >= Duration::from_secs(2) && polite_took < Duration::from_secs(15),
        "polite pod gone after {polite_took:?}"
    );
    assert!(
        stubborn_took >= Duration::from_secs(3) && stubborn_took < Duration::from_secs(15),
        "stubborn pod gone after {stubborn_took:?}"
    );
}

#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn a_statefulsets_claim_gets_a_volume_on_the_selected_node_that_outlives_its_pod() {
    let state = state();
    let admin = state.join("kubeconfig");
    let admin = admin.to_string_lossy().into_owned();
    let _agent = Agent::start(
        &state,
        &[
            "--provisioner-kubeconfig",
            &admin,
            "--install-storage-class",
            "standard",
        ],
    );
    let ns = Namespace::new(&state);
    let class = get_json(&state, &["storageclass", "standard"]).expect("the storage class");
    assert_eq!(class["provisioner"], "multisite.dev/node");
    assert_eq!(class["volumeBindingMode"], "WaitForFirstConsumer");
    let set = json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "db"},
        "spec": {
            "serviceName": "db",
            "replicas": 1,
            "selector": {"matchLabels": {"app": "db"}},
            "template": {
                "metadata": {"labels": {"app": "db"}},
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "nodeSelector": {"topology.kubernetes.io/zone": "zone-c"},
                    "containers": [{
                        "name": "main",
                        "image": "shell",
                        "command": ["sh", "-c", "echo run >> /data/runs; echo runs=$(wc -l < /data/runs); exec sleep 600"],
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    }],
                },
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": "standard",
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            }],
        },
    });
    apply(&state, &ns.name, &set);
    let first = wait_running(&state, &ns.name, "db-0");
    assert_eq!(first["spec"]["nodeName"], "node-c");
    wait_log(&state, &ns.name, "db-0", "runs=1");
    let claim = get_json(&state, &["pvc", "data-db-0", "-n", &ns.name]).expect("the claim");
    assert_eq!(claim["status"]["phase"], "Bound");
    assert_eq!(
        claim["metadata"]["annotations"]["volume.kubernetes.io/selected-node"],
        "node-c"
    );
    let pv_name = claim["spec"]["volumeName"]
        .as_str()
        .expect("volumeName")
        .to_string();
    let pv = get_json(&state, &["pv", &pv_name]).expect("the volume");
    assert_eq!(
        pv["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"],
        "multisite.dev/node"
    );
    assert_eq!(pv["spec"]["capacity"]["storage"], "1Gi");
    assert_eq!(pv["spec"]["persistentVolumeReclaimPolicy"], "Delete");
    assert_eq!(
        pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]["values"]
            [0],
        "node-c"
    );
    let path = PathBuf::from(pv["spec"]["local"]["path"].as_str().expect("local path"));
    assert!(path.join("runs").is_file());
    let old_uid = first["metadata"]["uid"].clone();
    kubectl(&state, &["delete", "pod", "db-0", "-n", &ns.name]);
    eventually("db-0 again, with its data", LIMIT, || {
        let pod = pod(&state, &ns.name, "db-0")?;
        let fresh = pod["metadata"]["uid"] != old_uid && pod["status"]["phase"] == "Running";
        let log = fresh
            .then(|| logs(&state, &ns.name, "db-0", &[]))
            .flatten()?;
        log.contains("runs=2").then_some(())
    });
    // The claim gone, the volume is Released and deleted, its directory with it.
    kubectl(&state, &["delete", "statefulset", "db", "-n", &ns.name]);
    eventually("db-0 gone", LIMIT, || {
        pod(&state, &ns.name, "db-0").is_none().then_some(())
    });
    kubectl(&state, &["delete", "pvc", "data-db-0", "-n", &ns.name]);
    eventually("the volume deleted", LIMIT, || {
        get_json(&state, &["pv", &pv_name]).is_none().then_some(())
    });
    assert!(!path.exists(), "{} is left", path.display());
}

#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn a_pod_for_a_zone_without_nodes_stays_pending_and_an_unknown_image_waits() {
    let state = state();
    let _agent = Agent::start(&state, &[]);
    let ns = Namespace::new(&state);
    apply(
        &state,
        &ns.name,
        &shell_pod("nowhere", "zone-z", "exec sleep 600"),
    );
    let mut unknown = shell_pod("unknown", "zone-a", "exec sleep 600");
    unknown["spec"]["containers"][0]["image"] = json!("registry.example/nothing:1.0");
    apply(&state, &ns.name, &unknown);
    let pending = eventually("nowhere Unschedulable", LIMIT, || {
        let pod = pod(&state, &ns.name, "nowhere")?;
        let scheduled = pod["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "PodScheduled")?
            .clone();
        (scheduled["reason"] == "Unschedulable").then_some(pod)
    });
    assert_eq!(pending["status"]["phase"], "Pending");
    assert!(pending["spec"]["nodeName"].is_null());
    let waiting = eventually("unknown waiting for its image", LIMIT, || {
        let pod = pod(&state, &ns.name, "unknown")?;
        let reason = pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
            .as_str()?
            .to_string();
        matches!(reason.as_str(), "ErrImagePull" | "ImagePullBackOff").then_some(pod)
    });
    assert_eq!(waiting["status"]["phase"], "Pending");
    let message = waiting["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or("");
    assert!(message.contains("--image"), "{message}");
    std::thread::sleep(Duration::from_secs(3));
    let later = pod(&state, &ns.name, "nowhere").expect("still there");
    assert_eq!(later["status"]["phase"], "Pending");
}

#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn service_hosts_and_the_any_address_become_pod_addresses() {
    let state = state();
    let _agent = Agent::start(&state, &[]);
    let ns = Namespace::new(&state);
    apply(
        &state,
        &ns.name,
        &shell_pod("backend", "zone-a", "exec sleep 600"),
    );
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "backend"},
        "spec": {"selector": {"app": "backend"}, "ports": [{"port": 7400}]},
    });
    apply(&state, &ns.name, &service);
    let backend = wait_running(&state, &ns.name, "backend");
    let backend_ip = backend["status"]["podIP"]
        .as_str()
        .expect("podIP")
        .to_string();
    // The client runs on another node of the agent than the pod its Service selects.
    let mut client = shell_pod(
        "client",
        "zone-c",
        "echo peer=$1 listen=$LISTEN; exec sleep 600",
    );
    client["spec"]["containers"][0]["command"] = json!([
        "sh",
        "-c",
        "echo peer=$1 listen=$LISTEN; exec sleep 600",
        "sh",
        format!("http://backend.{}.svc:7400/v1", ns.name),
    ]);
    client["spec"]["containers"][0]["env"] = json!([{"name": "LISTEN", "value": "0.0.0.0:8080"}]);
    apply(&state, &ns.name, &client);
    let running = wait_running(&state, &ns.name, "client");
    let ip = running["status"]["podIP"]
        .as_str()
        .expect("podIP")
        .to_string();
    let log = wait_log(&state, &ns.name, "client", "peer=");
    assert!(
        log.contains(&format!(
            "peer=http://{backend_ip}:7400/v1 listen={ip}:8080"
        )),
        "{log}"
    );
}

#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn a_failing_liveness_probe_restarts_the_container() {
    let state = state();
    let _agent = Agent::start(
        &state,
        &["--backoff-base-seconds", "1", "--backoff-cap-seconds", "2"],
    );
    let ns = Namespace::new(&state);
    let mut object = shell_pod("sickly", "zone-b", "echo started; exec sleep 600");
    object["spec"]["terminationGracePeriodSeconds"] = json!(1);
    object["spec"]["containers"][0]["livenessProbe"] = json!({
        "tcpSocket": {"port": 9},
        "periodSeconds": 1,
        "failureThreshold": 2,
    });
    apply(&state, &ns.name, &object);
    let restarted = eventually("a restart after failed liveness probes", LIMIT, || {
        let pod = pod(&state, &ns.name, "sickly")?;
        (pod["status"]["containerStatuses"][0]["restartCount"].as_i64()? >= 1).then_some(pod)
    });
    let last = &restarted["status"]["containerStatuses"][0]["lastState"]["terminated"];
    assert_eq!(last["reason"], "Error", "{last}");
    assert!(
        last["message"]
            .as_str()
            .is_some_and(|m| m.contains("Liveness probe failed")),
        "{last}"
    );
}

#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn a_new_agent_starts_the_pods_bound_to_its_nodes_again() {
    let state = state();
    let ns = Namespace::new(&state);
    let first_pid;
    {
        let _agent = Agent::start(&state, &[]);
        apply(
            &state,
            &ns.name,
            &shell_pod("survivor", "zone-a", "echo hello; exec sleep 600"),
        );
        let running = wait_running(&state, &ns.name, "survivor");
        first_pid = running["status"]["containerStatuses"][0]["containerID"].clone();
        assert!(first_pid.is_string());
    }
    // The agent stopped its processes and left the pod in place.
    let left = pod(&state, &ns.name, "survivor").expect("the pod stays");
    assert!(left["metadata"]["deletionTimestamp"].is_null());
    let pid: i32 = first_pid
        .as_str()
        .and_then(|id| id.strip_prefix("process://"))
        .and_then(|p| p.parse().ok())
        .expect("a process id");
    // SAFETY: signal 0 only asks whether the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    assert!(!alive, "process {pid} outlived its agent");
    let _agent = Agent::start(&state, &[]);
    eventually("the pod running again in a new process", LIMIT, || {
        let pod = pod(&state, &ns.name, "survivor")?;
        let status = &pod["status"]["containerStatuses"][0];
        (status["containerID"] != first_pid && status["state"]["running"].is_object()).then_some(())
    });
}

#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn kubectl_exec_runs_a_command_in_the_containers_mounts_over_a_websocket() {
    let state = state();
    let _agent = Agent::start(&state, &[]);
    let ns = Namespace::new(&state);
    let mut object = shell_pod("shell", "zone-b", "exec sleep 600");
    object["spec"]["containers"][0]["env"] = json!([{"name": "COLOR", "value": "green"}]);
    object["spec"]["containers"][0]["volumeMounts"] =
        json!([{"name": "work", "mountPath": "/work"}]);
    object["spec"]["volumes"] = json!([{"name": "work", "emptyDir": {}}]);
    apply(&state, &ns.name, &object);
    wait_running(&state, &ns.name, "shell");
    let node = get_json(&state, &["node", "node-b"]).expect("node-b");
    assert_eq!(
        node["status"]["declaredFeatures"],
        json!(["ExtendWebSocketsToKubelet"])
    );
    let out = kubectl_output(
        &state,
        &[
            "exec",
            "-n",
            &ns.name,
            "shell",
            "--",
            "sh",
            "-c",
            "echo color=$COLOR host=$(hostname); ls /var/run/secrets/kubernetes.io/serviceaccount; echo oops >&2; exit 7",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(7), "{}", lossy(&out.stderr));
    let stdout = lossy(&out.stdout);
    assert!(stdout.contains("color=green host=shell"), "{stdout}");
    assert!(stdout.contains("token"), "{stdout}");
    assert!(lossy(&out.stderr).contains("oops"));
    let piped = kubectl_output(
        &state,
        &[
            "exec",
            "-i",
            "-n",
            &ns.name,
            "shell",
            "--",
            "sh",
            "-c",
            "cat > /work/in; cat /work/in",
        ],
        Some("through stdin\n"),
    );
    assert!(piped.status.success(), "{}", lossy(&piped.stderr));
    assert_eq!(lossy(&piped.stdout), "through stdin\n");
}

#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn a_deleted_node_registers_again_with_a_new_lease() {
    let state = state();
    let _agent = Agent::start(&state, &[]);
    let before = get_json(&state, &["node", "node-c"]).expect("node-c");
    let old_uid = before["metadata"]["uid"].clone();
    kubectl(&state, &["delete", "node", "node-c"]);
    let again = eventually("node-c registered again", LIMIT, || {
        let node = get_json(&state, &["node", "node-c"])?;
        let ready = condition(&node, "Ready").as_deref() == Some("True");
        (node["metadata"]["uid"] != old_uid && ready).then_some(node)
    });
    assert_eq!(
        again["metadata"]["labels"]["topology.kubernetes.io/zone"],
        "zone-c"
    );
    eventually("node-c's lease owned by the new Node", LIMIT, || {
        let lease = get_json(&state, &["lease", "node-c", "-n", "kube-node-lease"])?;
        (lease["metadata"]["ownerReferences"][0]["uid"] == again["metadata"]["uid"]).then_some(())
    });
}
