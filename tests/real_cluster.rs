//! The operator on the real Kubernetes control plane (`e2e/kube/`): the chart installed
//! by Helm's own engine (`scripts/helm.py install`), the operator running with the
//! chart's ServiceAccount token so that the real RBAC authorizes every request it
//! makes, and the real StatefulSet controller and scheduler acting on what it creates.
//!
//! Needs `MULTISITE_KUBE_STATE` (a state directory where `e2e/kube/up.sh` ran):
//! `scripts/test.sh` runs these with `--ignored` when the harness is up. Without it they
//! fail, so that no run passes by skipping them.

mod common;

use common::{Proc, text};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const WAIT: Duration = Duration::from_secs(90);

fn state() -> PathBuf {
    let state = std::env::var("MULTISITE_KUBE_STATE")
        .expect("MULTISITE_KUBE_STATE names the state directory of e2e/kube/up.sh");
    PathBuf::from(state)
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .current_dir(ROOT)
        .output()
        .expect("run kubectl");
    (out.status.success(), text(&out.stdout) + &text(&out.stderr))
}

fn json(kubeconfig: &Path, args: &[&str]) -> Option<Value> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let (ok, out) = kubectl(kubeconfig, &all);
    ok.then(|| serde_json::from_str(&out).ok()).flatten()
}

fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(
            start.elapsed() < WAIT,
            "{what}: not within {} s",
            WAIT.as_secs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn helm(args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("scripts/helm.py")
        .args(args)
        .current_dir(ROOT)
        .output()
        .expect("run scripts/helm.py");
    let all = text(&out.stdout) + &text(&out.stderr);
    assert!(out.status.success(), "helm.py {args:?}: {all}");
    all
}

/// `helm install` of the chart as `release` in `namespace`, watching `fleet`.
fn install_chart(admin: &Path, release: &str, namespace: &str, fleet: &str, extra: &[&str]) {
    let watch = format!("watchNamespaces={{{fleet}}}");
    let mut args = vec![
        "install",
        "charts/multisite-operator",
        "--kubeconfig",
        admin.to_str().expect("UTF-8"),
        "--release",
        release,
        "-n",
        namespace,
        "--create-namespace",
        "--set",
        &watch,
    ];
    args.extend(extra);
    let installed = helm(&args);
    assert!(installed.contains("status deployed"), "{installed}");
}

/// A kubeconfig for ServiceAccount `sa` of `namespace`: the cluster's URL and CA, a
/// token from the TokenRequest API.
fn service_account_kubeconfig(state: &Path, namespace: &str, sa: &str, path: &Path) {
    let admin = state.join("kubeconfig");
    let (ok, token) = kubectl(
        &admin,
        &["create", "token", sa, "-n", namespace, "--duration=2h"],
    );
    assert!(ok, "{token}");
    let url = std::fs::read_to_string(state.join("url")).expect("url");
    let config = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kube\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
         users:\n- name: {sa}\n  user:\n    token: {}\ncontexts:\n- name: {sa}\n  context: {{cluster: kube, user: {sa}, namespace: {namespace}}}\n\
         current-context: {sa}\n",
        url.trim(),
        state.join("pki/ca.crt").display(),
        token.trim()
    );
    std::fs::write(path, config).expect("write the kubeconfig");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The chart, installed by Helm's engine, gives the operator a ServiceAccount whose
/// rights the real RBAC enforces: the operator, running with that ServiceAccount's
/// token, turns `examples/fleet.yaml` into StatefulSets, Services and the family
/// Secret with no request refused, its Events are listed by `kubectl get events`, and
/// the real StatefulSet controller and scheduler take over from there.
#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn the_chart_installed_operator_runs_the_fleet_under_real_rbac() {
    let state = state();
    let admin = state.join("kubeconfig");
    // Namespaces of this run: one control plane may serve several runs.
    let namespace = format!("operator-{}", common::run_id());
    let namespace = namespace.as_str();
    let fleet = format!("tracker-{}", common::run_id());
    let fleet = fleet.as_str();
    let release = "ms";
    let sa = "ms-multisite-operator";
    let _uninstall = Uninstall {
        kubeconfig: admin.clone(),
        namespaces: vec![namespace.to_string(), fleet.to_string()],
        release,
    };
    // The chart gives the operator Roles in the namespaces it watches: they come first.
    let (ok, out) = kubectl(&admin, &["create", "namespace", fleet]);
    assert!(ok, "{out}");
    // No operator pod: the operator under test runs here, with the pod's credentials.
    install_chart(
        &admin,
        release,
        namespace,
        fleet,
        &["--set", "replicaCount=0"],
    );
    for crd in ["replicafamilies", "replicas", "sites", "schemapackages"] {
        let name = format!("crd/{crd}.multisite.dev");
        let (ok, out) = kubectl(
            &admin,
            &[
                "wait",
                "--for=condition=Established",
                &name,
                "--timeout=60s",
            ],
        );
        assert!(ok, "{out}");
    }
    let who = format!("--as=system:serviceaccount:{namespace}:{sa}");
    for (verb, resource, ns, allowed) in [
        ("create", "statefulsets.apps", fleet, true),
        ("patch", "replicas.multisite.dev/status", fleet, true),
        ("create", "events.events.k8s.io", fleet, true),
        ("update", "leases.coordination.k8s.io", namespace, true),
        ("delete", "nodes", "", false),
        (
            "create",
            "clusterrolebindings.rbac.authorization.k8s.io",
            "",
            false,
        ),
        ("get", "secrets", "kube-system", false),
    ] {
        let mut args = vec!["auth", "can-i", verb, resource, who.as_str()];
        if !ns.is_empty() {
            args.extend(["-n", ns]);
        }
        let (_, out) = kubectl(&admin, &args);
        assert_eq!(
            out.trim() == "yes",
            allowed,
            "can-i {verb} {resource} in {ns:?}: {out}"
        );
    }

    // The operator as its pod would run it, with the ServiceAccount's token.
    let dir = std::env::temp_dir().join(format!("multisite-real-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let kubeconfig = dir.join("operator.kubeconfig");
    service_account_kubeconfig(&state, namespace, sa, &kubeconfig);
    let log = dir.join("operator.log");
    let operator = Command::new(env!("CARGO_BIN_EXE_multisite"))
        .args(["operator", "--leader-election", "--log-format=json"])
        .arg(format!("--watch-namespaces={fleet}"))
        .arg(format!("--metrics-addr=127.0.0.1:{}", free_port()))
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAMESPACE", namespace)
        .env("POD_NAME", "operator-under-test")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start the operator");
    let _operator = Proc(operator);

    let manifest = dir.join("fleet.yaml");
    let example = std::fs::read_to_string(Path::new(ROOT).join("examples/fleet.yaml"))
        .expect("examples/fleet.yaml");
    std::fs::write(
        &manifest,
        example.replace("namespace: tracker", &format!("namespace: {fleet}")),
    )
    .expect("write the fleet");
    let (ok, out) = kubectl(&admin, &["apply", "-f", manifest.to_str().expect("UTF-8")]);
    assert!(ok, "{out}");
    for (replica, zone) in [
        ("sampl-tokyo", "asia-northeast1-a"),
        ("sampl-paris", "europe-west9-a"),
        ("sampl-austin", "us-south1-a"),
    ] {
        let set = wait_for(&format!("StatefulSet {replica}"), || {
            json(&admin, &["get", "statefulset", replica, "-n", fleet])
        });
        let terms = &set["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"];
        assert!(terms.to_string().contains(zone), "{terms}");
        wait_for(&format!("Service {replica}"), || {
            json(&admin, &["get", "service", replica, "-n", fleet])
        });
        // The real StatefulSet controller made the pod; no node has its zone yet.
        let pod = format!("{replica}-0");
        let unscheduled = wait_for(&format!("pod {pod} unschedulable"), || {
            let pod = json(&admin, &["get", "pod", &pod, "-n", fleet])?;
            let conditions = pod["status"]["conditions"].as_array()?.clone();
            conditions
                .into_iter()
                .find(|c| c["type"] == "PodScheduled" && c["status"] == "False")
        });
        assert_eq!(unscheduled["reason"], "Unschedulable", "{unscheduled}");
        let claim = format!("data-{pod}");
        wait_for(&format!("claim {claim}"), || {
            json(&admin, &["get", "pvc", &claim, "-n", fleet])
        });
        // The Replica says why it waits, naming its Site's zone.
        let ready = wait_for(
            &format!("Replica {replica} says it is unschedulable"),
            || {
                let replica = json(&admin, &["get", "replica", replica, "-n", fleet])?;
                let conditions = replica["status"]["conditions"].as_array()?.clone();
                conditions
                    .into_iter()
                    .find(|c| c["type"] == "Ready" && c["reason"] == "Unschedulable")
            },
        );
        assert_eq!(ready["status"], "False", "{ready}");
        let message = ready["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("zone {zone}")) && message.contains("cannot be scheduled"),
            "{message}"
        );
    }
    let secret = wait_for("the family Secret", || {
        json(&admin, &["get", "secret", "sampl-secret", "-n", fleet])
    });
    assert!(secret["data"]["secret"].is_string(), "{secret}");
    // Its Events, written through events.k8s.io, in kubectl's core view.
    let events = wait_for("the operator's Events", || {
        let (ok, out) = kubectl(&admin, &["get", "events", "-n", fleet]);
        (ok && out.contains("SecretCreated")).then_some(out)
    });
    assert!(events.contains("replicafamily/sampl"), "{events}");
    // The Lease of its leader election, in its own namespace.
    let lease = wait_for("the leader Lease", || {
        json(
            &admin,
            &["get", "lease", "multisite-operator", "-n", namespace],
        )
    });
    assert_eq!(lease["spec"]["holderIdentity"], "operator-under-test");
    let operator_log = std::fs::read_to_string(&log).unwrap_or_default();
    // kube's error for a refusal reads `... is forbidden: ...` with reason Forbidden.
    assert!(
        !operator_log.to_lowercase().contains("forbidden"),
        "the operator was refused a request:\n{operator_log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Uninstalls the release and deletes the run's namespaces when the test ends, failed or
/// not.
struct Uninstall {
    kubeconfig: PathBuf,
    namespaces: Vec<String>,
    release: &'static str,
}

impl Drop for Uninstall {
    fn drop(&mut self) {
        let _ = Command::new("python3")
            .arg("scripts/helm.py")
            .args(["uninstall", "--kubeconfig"])
            .arg(&self.kubeconfig)
            .args(["--release", self.release, "-n", &self.namespaces[0]])
            .current_dir(ROOT)
            .output();
        // The operator is gone by now: the Replicas' removal finalizers would hold their
        // namespace in Terminating for good.
        remove_finalizers(&self.kubeconfig, &self.namespaces[1..]);
        for namespace in &self.namespaces {
            let _ = Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(["delete", "namespace", namespace, "--wait=false"])
                .output();
        }
    }
}

/// Strips the finalizers of every Replica in `namespaces`.
fn remove_finalizers(kubeconfig: &Path, namespaces: &[String]) {
    for namespace in namespaces {
        let (_, names) = kubectl(
            kubeconfig,
            &["get", "replicas", "-n", namespace, "-o", "name"],
        );
        for name in names.lines().filter(|l| l.starts_with("replica")) {
            let _ = kubectl(
                kubeconfig,
                &[
                    "patch",
                    name,
                    "-n",
                    namespace,
                    "--type=merge",
                    "-p",
                    r#"{"metadata":{"finalizers":null}}"#,
                ],
            );
        }
    }
}

/// A node agent of a test, stopped with the test; its Nodes are deleted (a Node whose
/// agent is gone still takes pods until its lease runs out) and its directory removed.
struct Agent {
    process: Option<Proc>,
    dir: PathBuf,
    admin: PathBuf,
    nodes: Vec<String>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        drop(self.process.take());
        for node in &self.nodes {
            let _ = kubectl(&self.admin, &["delete", "node", node, "--wait=false"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A node agent running `nodes` (name, zone), its program and state outside /tmp (pods
/// mount their own /tmp over it).
fn start_agent(state: &Path, nodes: &[(&str, &str)], first_address: &str, port: u16) -> Agent {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    let dir = home
        .join(".cache")
        .join(format!("multisite-real-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let program = dir.join("multisite");
    std::fs::copy(env!("CARGO_BIN_EXE_multisite"), &program).expect("copy the program");
    for (name, _) in nodes {
        let out = Command::new(Path::new(ROOT).join("e2e/kube/node-credentials.sh"))
            .arg(state)
            .arg(name)
            .output()
            .expect("run node-credentials.sh");
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let mut command = Command::new(&program);
    command
        .arg("node")
        .arg("--credentials")
        .arg(state.join("nodes"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--first-pod-address", first_address])
        .args(["--kubelet-port-base", &port.to_string()])
        .arg("--provisioner-kubeconfig")
        .arg(state.join("kubeconfig"))
        .args(["--install-storage-class", "standard"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log")).expect("log"));
    for (name, zone) in nodes {
        command.args(["--node", &format!("{name}={zone}")]);
    }
    Agent {
        process: Some(Proc(command.spawn().expect("start multisite node"))),
        dir,
        admin: state.join("kubeconfig"),
        nodes: nodes.iter().map(|(name, _)| name.to_string()).collect(),
    }
}

/// What users run: the chart installed by Helm's engine, the operator as a pod of its
/// Deployment (its ServiceAccount token projected by the real API server, in-cluster
/// configuration), run by `multisite node` on nodes in the example's three zones. The
/// example fleet comes up Ready with each replica's pod on the node of its Site's zone,
/// `kubectl logs` shows a replica's output through the API server, and a Replica whose
/// Site names a zone no node has stays Pending with a condition that says so.
#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn the_chart_installed_operator_pod_brings_the_example_fleet_up_across_zones() {
    let state = state();
    let admin = state.join("kubeconfig");
    let pid = common::run_id();
    let namespace = format!("operator-pod-{pid}");
    let fleet = format!("fleet-{pid}");
    let (namespace, fleet) = (namespace.as_str(), fleet.as_str());
    let release = "fleet";
    let zones = [
        ("sampl-tokyo", "asia-northeast1-a"),
        ("sampl-paris", "europe-west9-a"),
        ("sampl-austin", "us-south1-a"),
    ];
    let nodes: Vec<(String, &str)> = zones
        .iter()
        .map(|(_, zone)| (format!("{zone}-{pid}"), *zone))
        .collect();
    let node_refs: Vec<(&str, &str)> = nodes.iter().map(|(n, z)| (n.as_str(), *z)).collect();
    let agent = start_agent(&state, &node_refs, "127.70.0.1", 12250);
    let _uninstall = Uninstall {
        kubeconfig: admin.clone(),
        namespaces: vec![namespace.to_string(), fleet.to_string()],
        release,
    };
    for (node, _) in &node_refs {
        let (ok, out) = kubectl(
            &admin,
            &[
                "wait",
                "--for=condition=Ready",
                &format!("node/{node}"),
                "--timeout=60s",
            ],
        );
        assert!(ok, "{out}");
    }
    let (ok, out) = kubectl(&admin, &["create", "namespace", fleet]);
    assert!(ok, "{out}");
    install_chart(
        &admin,
        release,
        namespace,
        fleet,
        &["--wait", "--timeout", "120"],
    );
    let operator = wait_for("the operator pod Ready", || {
        let pods = json(
            &admin,
            &[
                "get",
                "pods",
                "-n",
                namespace,
                "-l",
                "app.kubernetes.io/name=multisite-operator",
            ],
        )?;
        let pod = pods["items"].as_array()?.first()?.clone();
        let ready = pod["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        ready.then_some(pod)
    });
    assert!(operator["spec"]["nodeName"].is_string(), "{operator}");

    // The example fleet, and one more Replica at a Site whose zone no node has.
    let example = std::fs::read_to_string(Path::new(ROOT).join("examples/fleet.yaml"))
        .expect("examples/fleet.yaml");
    let extra = "---\napiVersion: multisite.dev/v1alpha1\nkind: Site\nmetadata: {name: nowhere, namespace: tracker}\n\
                 spec: {zone: nowhere-1z}\n---\napiVersion: multisite.dev/v1alpha1\nkind: Replica\n\
                 metadata: {name: sampl-nowhere, namespace: tracker}\nspec: {family: sampl, site: nowhere}\n";
    let apply = |name: &str, yaml: String| {
        let manifest = agent.dir.join(name);
        std::fs::write(
            &manifest,
            yaml.replace("namespace: tracker", &format!("namespace: {fleet}")),
        )
        .expect("write a manifest");
        let (ok, out) = kubectl(&admin, &["apply", "-f", manifest.to_str().expect("UTF-8")]);
        assert!(ok, "{out}");
    };
    apply("fleet.yaml", example);

    for (replica, zone) in zones {
        let pod = format!("{replica}-0");
        let placed = wait_for(&format!("{replica} Active"), || {
            let r = json(&admin, &["get", "replica", replica, "-n", fleet])?;
            (r["status"]["phase"] == "Active").then_some(())?;
            json(&admin, &["get", "pod", &pod, "-n", fleet])
        });
        let node = placed["spec"]["nodeName"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let labels = json(&admin, &["get", "node", &node]).expect("the pod's node");
        assert_eq!(
            labels["metadata"]["labels"]["topology.kubernetes.io/zone"], zone,
            "{pod} runs on {node}"
        );
    }
    wait_for("the family Ready", || {
        let family = json(&admin, &["get", "rf", "sampl", "-n", fleet])?;
        let conditions = family["status"]["conditions"].as_array()?.clone();
        conditions
            .into_iter()
            .find(|c| c["type"] == "Ready" && c["status"] == "True")
    });
    let (ok, out) = kubectl(&admin, &["logs", "-n", fleet, "sampl-tokyo-0"]);
    assert!(ok && out.contains("listening on http://"), "{out}");
    apply("nowhere.yaml", extra.to_string());
    let stuck = wait_for("sampl-nowhere says it is unschedulable", || {
        let r = json(&admin, &["get", "replica", "sampl-nowhere", "-n", fleet])?;
        let conditions = r["status"]["conditions"].as_array()?.clone();
        conditions
            .into_iter()
            .find(|c| c["type"] == "Ready" && c["reason"] == "Unschedulable")
    });
    let message = stuck["message"].as_str().unwrap_or_default();
    assert!(message.contains("zone nowhere-1z"), "{message}");
    let phase = json(&admin, &["get", "replica", "sampl-nowhere", "-n", fleet]).expect("replica");
    assert_eq!(phase["status"]["phase"], "Pending", "{phase}");
    let (_, events) = kubectl(&admin, &["get", "events", "-n", fleet]);
    assert!(events.contains("replica/sampl-tokyo"), "{events}");
}
