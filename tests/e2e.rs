//! End-to-end scenarios of the operator, written once and run against either cluster:
//!
//! - by default, each scenario starts its own embedded cluster (`multisite dev up
//!   --no-operator`, pods on a loopback range of their own) and a separate
//!   `multisite operator` process, so that scenarios can kill and restart it;
//! - with `MULTISITE_E2E_KUBE_STATE` set (a state directory of `e2e/kube/up.sh` whose
//!   nodes a `multisite node` agent runs, as `scripts/test.sh` sets it up), scenarios run
//!   on that real Kubernetes control plane, each in a namespace of its own named per run,
//!   with a separate `multisite operator` process as on the embedded cluster; the
//!   agent's pods have loopback addresses, so the test reaches them directly;
//! - with `MULTISITE_E2E_KUBECONFIG` set, scenarios run in namespaces of their own on
//!   that cluster, where the operator is already installed (by the Helm chart; set
//!   `MULTISITE_E2E_EXTERNAL_OPERATOR=1`), and reach replica pods with `kubectl
//!   port-forward`. `e2e/kind/run.sh` runs them that way.
//!
//! Every process a scenario starts is stopped when the scenario ends, failures included.

mod common;
use common::Proc;
#[path = "../e2e/outside_system.rs"]
mod outside_system;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use multisite::api::{Replica, ReplicaFamily, ReplicaPhase};
use multisite::packet::change::ItemKind;
use multisite::replica::api::{Digest, ItemQuery, ReplicaClient, UpdateItem};
use multisite::replica::http::HttpClient;
use outside_system::OutsideSystem;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_multisite");
const KUBECTL: &str = "kubectl";
/// How long a cluster-level wait may take before the scenario fails.
const WAIT: Duration = Duration::from_secs(120);

enum Mode {
    /// Our own operator process, on our own embedded cluster (`dev` is its `dev up`) or
    /// on the real control plane whose nodes `multisite node` runs (`dev` is None).
    Embedded {
        // Dropped in this order: the operator stops before the cluster.
        operator: Option<Proc>,
        dev: Option<Proc>,
        dir: PathBuf,
        /// `--leader-election` for the operator.
        lease: bool,
        metrics: u16,
    },
    /// A cluster given by kubeconfig, operator installed there.
    External,
}

/// One scenario's cluster, namespace and clients.
struct Env {
    name: String,
    rt: tokio::runtime::Runtime,
    kube: kube::Client,
    kubeconfig: PathBuf,
    namespace: String,
    mode: Mode,
    forwards: Mutex<BTreeMap<String, (Proc, String)>>,
    started: Instant,
}

/// With `MULTISITE_E2E_DELEGATE_STATE` (a state directory of `e2e/apiserver/up.sh`), the
/// embedded cluster forwards our custom resources, Leases and Events to that real
/// Kubernetes API server (`dev up --delegate`).
fn delegate_args() -> Vec<String> {
    let Ok(state) = std::env::var("MULTISITE_E2E_DELEGATE_STATE") else {
        return Vec::new();
    };
    let url = std::fs::read_to_string(Path::new(&state).join("url"))
        .unwrap_or_else(|e| panic!("{state}/url: {e}"));
    vec!["--delegate".to_string(), url.trim().to_string()]
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl Env {
    /// Starts the cluster for scenario `name`; `index` keeps embedded clusters of
    /// scenarios running at once on different pod address ranges.
    fn start(name: &str, index: u8, lease: bool) -> Env {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        if let Ok(kubeconfig) = std::env::var("MULTISITE_E2E_KUBECONFIG") {
            let kubeconfig = PathBuf::from(kubeconfig);
            let kube = rt.block_on(client_for(&kubeconfig));
            let namespace = format!("e2e-{name}-{}", std::process::id() % 100_000);
            let env = Env {
                name: name.to_string(),
                rt,
                kube,
                kubeconfig,
                namespace,
                mode: Mode::External,
                forwards: Mutex::default(),
                started: Instant::now(),
            };
            env.apply(&format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {}}}\n",
                env.namespace
            ));
            return env;
        }
        let dir = std::env::temp_dir().join(format!("multisite-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a state directory");
        if let Ok(state) = std::env::var("MULTISITE_E2E_KUBE_STATE") {
            let kubeconfig = Path::new(&state).join("kubeconfig");
            let kube = rt.block_on(client_for(&kubeconfig));
            let mut env = Env {
                name: name.to_string(),
                rt,
                kube,
                kubeconfig,
                // The control plane keeps its objects across runs.
                namespace: format!("e2e-{name}-{}", common::run_id()),
                mode: Mode::Embedded {
                    dev: None,
                    operator: None,
                    dir,
                    lease,
                    metrics: free_port(),
                },
                forwards: Mutex::default(),
                started: Instant::now(),
            };
            env.apply(&format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {}}}\n",
                env.namespace
            ));
            env.start_operator();
            return env;
        }
        let pid = std::process::id();
        let first = format!("127.{}.{}.1", 100 + u32::from(index), 1 + pid % 250);
        let log = std::fs::File::create(dir.join("dev.log")).expect("dev log");
        let dev = Command::new(BIN)
            .args([
                "dev",
                "up",
                "--stand-in",
                "--no-operator",
                "--first-pod-address",
                &first,
                "--dir",
            ])
            .arg(&dir)
            .args(delegate_args())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start dev up");
        let dev = Proc(dev);
        let kubeconfig = dir.join("kubeconfig");
        let start = Instant::now();
        while !dir.join("dev.pid").exists() || !kubeconfig.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "dev up did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let kube = rt.block_on(client_for(&kubeconfig));
        // dev up installs the CRDs before it writes its pid file only after applying.
        let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
            Api::all(kube.clone());
        let start = Instant::now();
        while rt
            .block_on(crds.get_opt("replicas.multisite.dev"))
            .ok()
            .flatten()
            .is_none()
        {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the CRDs were not installed"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut env = Env {
            name: name.to_string(),
            rt,
            kube,
            kubeconfig,
            // A namespace per scenario (and per run, with a delegate API server, which
            // keeps its objects across runs): scenarios may share a delegate.
            namespace: if delegate_args().is_empty() {
                format!("e2e-{name}")
            } else {
                format!("e2e-{name}-{}", std::process::id())
            },
            mode: Mode::Embedded {
                dev: Some(dev),
                operator: None,
                dir,
                lease,
                metrics: free_port(),
            },
            forwards: Mutex::default(),
            started: Instant::now(),
        };
        env.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {}}}\n",
            env.namespace
        ));
        env.start_operator();
        env
    }

    /// Fails the test unless the cluster is the embedded one: the stand-in outside
    /// system listens on this machine's loopback, which only its pods reach.
    fn needs_the_outside_system_on_loopback(&self) {
        assert!(
            self.embedded(),
            "the stand-in outside system listens on this machine's loopback, which only the \
             embedded cluster's pods reach: run it without MULTISITE_E2E_KUBE_STATE / \
             MULTISITE_E2E_DELEGATE_STATE (scripts/test.sh --skips it there)"
        );
    }

    /// Applies the interop package and waits until every replica has it.
    fn install_interop(&self) {
        self.apply(INTEROP);
        let packages: Api<multisite::api::SchemaPackage> =
            Api::namespaced(self.kube.clone(), &self.namespace);
        self.wait("the interop package is on every replica", || {
            let status = self.rt.block_on(packages.get("interop")).ok()?.status?;
            multisite::api::conditions::is_true(&status.conditions, "Ready").then_some(())
        });
    }

    fn embedded(&self) -> bool {
        matches!(self.mode, Mode::Embedded { .. })
    }

    /// Starts the embedded cluster's operator process (again).
    fn start_operator(&mut self) {
        let kubeconfig = self.kubeconfig.clone();
        let namespace = self.namespace.clone();
        let Mode::Embedded {
            operator,
            dir,
            lease,
            metrics,
            ..
        } = &mut self.mode
        else {
            return;
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("operator.log"))
            .expect("operator log");
        let mut command = Command::new(BIN);
        command
            .args(["operator", "--identity", "e2e-operator", "--metrics-addr"])
            .arg(format!("127.0.0.1:{metrics}"))
            .args(["--watch-namespaces", &namespace])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(log);
        if *lease {
            command.args(["--leader-election", "--lease-namespace", &namespace]);
        }
        *operator = Some(Proc(command.spawn().expect("start the operator")));
    }

    /// Kills the operator at once (SIGKILL), as a crash would.
    fn kill_operator(&mut self) {
        match &mut self.mode {
            Mode::Embedded { operator, .. } => {
                if let Some(mut p) = operator.take() {
                    let _ = p.0.kill();
                    let _ = p.0.wait();
                }
            }
            Mode::External => {
                let out = self.kubectl(&[
                    "delete",
                    "pod",
                    "-n",
                    "multisite-system",
                    "-l",
                    "app.kubernetes.io/name=multisite-operator",
                    "--grace-period=0",
                    "--force",
                ]);
                assert!(out.status.success(), "{}", text(&out.stderr));
            }
        }
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(KUBECTL)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("run kubectl")
    }

    /// `kubectl apply --server-side` of `yaml` in the scenario's namespace.
    fn apply(&self, yaml: &str) {
        let mut child = Command::new(KUBECTL)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args([
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager",
                "e2e",
                "-n",
                &self.namespace,
                "-f",
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(yaml.as_bytes())
            .expect("write the manifest");
        let out = child.wait_with_output().expect("kubectl apply");
        assert!(
            out.status.success(),
            "kubectl apply failed: {}\n{yaml}",
            text(&out.stderr)
        );
    }

    fn families(&self) -> Api<ReplicaFamily> {
        Api::namespaced(self.kube.clone(), &self.namespace)
    }

    fn replicas(&self) -> Api<Replica> {
        Api::namespaced(self.kube.clone(), &self.namespace)
    }

    fn family(&self, name: &str) -> ReplicaFamily {
        self.rt
            .block_on(self.families().get(name))
            .expect("the family")
    }

    fn replica(&self, name: &str) -> Option<Replica> {
        self.rt
            .block_on(self.replicas().get_opt(name))
            .expect("read a Replica")
    }

    /// What a person would look at when a wait fails.
    fn diagnostics(&self) -> String {
        let mut out = String::new();
        for args in [
            vec![
                "get",
                "replicafamilies,replicas,sites,pods,statefulsets",
                "-n",
                &self.namespace,
                "-o",
                "wide",
            ],
            vec!["get", "replicas", "-n", &self.namespace, "-o", "yaml"],
            vec![
                "get",
                "replicafamilies",
                "-n",
                &self.namespace,
                "-o",
                "jsonpath={.items[*].status.plan}{\"\\n\"}{.items[*].status.conditions}{\"\\n\"}{.items[*].status.clients}",
            ],
            vec![
                "get",
                "deployments,pods",
                "-n",
                &self.namespace,
                "-o",
                "wide",
            ],
        ] {
            let o = self.kubectl(&args);
            out.push_str(&text(&o.stdout));
            out.push_str(&text(&o.stderr));
        }
        if let Mode::Embedded { dir, .. } = &self.mode {
            let log = std::fs::read_to_string(dir.join("operator.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            out.push_str("\n--- operator log (last lines) ---\n");
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Polls `check` until it gives a value, or fails the scenario after [`WAIT`].
    fn wait<T>(&self, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(value) = check() {
                eprintln!(
                    "[{}] {what}: after {:.1} s",
                    self.name,
                    start.elapsed().as_secs_f64()
                );
                return value;
            }
            if start.elapsed() > WAIT {
                panic!(
                    "[{}] timed out waiting until {what}\n{}",
                    self.name,
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn wait_active(&self, names: &[&str]) {
        self.wait(
            &format!("{} are Active and Ready", names.join(", ")),
            || {
                names
                    .iter()
                    .all(|n| {
                        self.replica(n).and_then(|r| r.status).is_some_and(|s| {
                            s.phase == Some(ReplicaPhase::Active)
                                && multisite::api::conditions::is_true(&s.conditions, "Ready")
                        })
                    })
                    .then_some(())
            },
        );
    }

    /// Key `key` of Secret `name` in the scenario's namespace, once the Secret exists.
    fn secret_value(&self, name: &str, key: &str) -> Vec<u8> {
        let secrets: Api<Secret> = Api::namespaced(self.kube.clone(), &self.namespace);
        let secret = self.wait(&format!("Secret {name} exists"), || {
            self.rt.block_on(secrets.get_opt(name)).ok().flatten()
        });
        secret
            .data
            .and_then(|d| d.get(key).map(|b| b.0.clone()))
            .unwrap_or_else(|| panic!("Secret {name} has no key {key}"))
    }

    /// The address of a pod `selector` selects, once one has it.
    fn pod_address(&self, what: &str, selector: &str) -> String {
        let pods: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.kube.clone(), &self.namespace);
        let params = kube::api::ListParams::default().labels(selector);
        self.wait(&format!("{what} has an address"), || {
            let list = self.rt.block_on(pods.list(&params)).ok()?;
            list.items.into_iter().find_map(|p| p.status?.pod_ip)
        })
    }

    /// The family's API client (its token from the family Secret, the newest release).
    fn client(&self, family: &str) -> ReplicaClient {
        let bytes = self.secret_value(&format!("{family}-secret"), "secret");
        let secret = multisite::replica::secret::from_bytes(&bytes).expect("a usable secret");
        let compat = multisite::domain::compat::Compatibility::builtin();
        ReplicaClient::new(
            secret.api_token,
            Some(multisite::cmd::replica::newest_release(&compat)),
        )
    }

    /// Where the test reaches replica `name`'s API.
    fn url(&self, name: &str) -> String {
        if self.embedded() {
            let start = Instant::now();
            loop {
                if let Some(url) = self.replica(name).and_then(|r| r.status?.endpoint) {
                    return url;
                }
                assert!(
                    start.elapsed() < WAIT,
                    "{name} has no endpoint\n{}",
                    self.diagnostics()
                );
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        let mut forwards = self.forwards.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((proc_, url)) = forwards.get_mut(name)
            && proc_.0.try_wait().ok().flatten().is_none()
        {
            return url.clone();
        }
        let mut child = Command::new(KUBECTL)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args([
                "port-forward",
                "-n",
                &self.namespace,
                &format!("pod/{name}-0"),
                ":7400",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("kubectl port-forward");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("port-forward output");
        // "Forwarding from 127.0.0.1:PORT -> 7400"
        let port = line
            .split("127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected port-forward output: {line}"));
        let url = format!("http://127.0.0.1:{port}");
        forwards.insert(name.to_string(), (Proc(child), url.clone()));
        url
    }

    /// Waits until replica `name` answers its status call again.
    fn wait_serving(&self, client: &ReplicaClient, name: &str) {
        self.wait(&format!("{name} serves again"), || {
            let url = self.url(name);
            self.rt.block_on(client.status(&url)).ok().map(|_| ())
        });
    }

    /// Creates `count` Defects at replica `name`; returns their ids.
    fn write(&self, client: &ReplicaClient, name: &str, count: usize, tag: &str) -> Vec<String> {
        let url = self.url(name);
        self.rt.block_on(async {
            let mut ids = Vec::new();
            for i in 0..count {
                let body = common::defect(&[("headline", &format!("{tag} {i}"))]);
                let item = client
                    .create_item(&url, ItemKind::Record, &body)
                    .await
                    .unwrap_or_else(|e| panic!("create a Defect at {name}: {e}"));
                ids.push(item.id);
            }
            ids
        })
    }

    /// Every Defect at replica `name`: id -> item.
    fn defects(&self, client: &ReplicaClient, name: &str) -> Option<BTreeMap<String, Value>> {
        let url = self.url(name);
        let items = self
            .rt
            .block_on(client.list_items(&url, ItemKind::Record, &ItemQuery::of_type("Defect")))
            .ok()?;
        items
            .into_iter()
            .map(|i| Some((i.id.clone(), serde_json::to_value(i).ok()?)))
            .collect()
    }

    fn digest(&self, client: &ReplicaClient, name: &str) -> Option<Digest> {
        let url = self.url(name);
        self.rt.block_on(client.digest(&url)).ok()
    }

    /// Waits until every replica named holds exactly the same items and at least `ids`.
    fn wait_converged(&self, client: &ReplicaClient, names: &[&str], ids: &BTreeSet<String>) {
        self.wait(
            &format!("{} hold the same {} records", names.join(", "), ids.len()),
            || {
                let digests: Vec<Digest> = names
                    .iter()
                    .map(|n| self.digest(client, n))
                    .collect::<Option<_>>()?;
                let first = digests.first()?.digest.clone();
                if !digests.iter().all(|d| d.digest == first) {
                    return None;
                }
                names
                    .iter()
                    .all(|n| {
                        self.defects(client, n)
                            .is_some_and(|d| ids.iter().all(|id| d.contains_key(id)))
                    })
                    .then_some(())
            },
        );
    }

    fn patch_family(&self, name: &str, patch: Value) {
        self.rt
            .block_on(
                self.families()
                    .patch(name, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .expect("patch the family");
    }

    /// The operator's /metrics text (embedded clusters only).
    fn metrics(&self) -> Option<String> {
        let Mode::Embedded { metrics, .. } = &self.mode else {
            return None;
        };
        scrape(*metrics)
    }

    /// The process of container `container` of pod `pod`, as `multisite node` reports it
    /// in the container's id (`process://PID`).
    fn container_pid(&self, pod: &str, container: &str) -> String {
        let pods: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.kube.clone(), &self.namespace);
        self.wait(&format!("{pod} runs {container}"), || {
            let pod = self.rt.block_on(pods.get_opt(pod)).ok().flatten()?;
            let statuses = pod.status?.container_statuses?;
            let status = statuses.into_iter().find(|c| c.name == container)?;
            status.state?.running?;
            status
                .container_id?
                .strip_prefix("process://")
                .map(str::to_string)
        })
    }

    /// Kills replica `name`'s server process (embedded) or its pod (elsewhere) at once.
    fn kill_replica(&self, name: &str) {
        match &self.mode {
            Mode::Embedded { dir, dev, .. } => {
                let pid = if dev.is_some() {
                    let pid_file = dir
                        .join("workloads")
                        .join("run")
                        .join(format!("{}_{name}-0_replica.pid", self.namespace));
                    std::fs::read_to_string(&pid_file)
                        .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()))
                } else {
                    self.container_pid(&format!("{name}-0"), "replica")
                };
                let status = Command::new("kill")
                    .args(["-KILL", pid.trim()])
                    .status()
                    .expect("kill");
                assert!(status.success(), "kill {pid}");
            }
            Mode::External => {
                let out = self.kubectl(&[
                    "delete",
                    "pod",
                    "-n",
                    &self.namespace,
                    &format!("{name}-0"),
                    "--grace-period=0",
                    "--force",
                ]);
                assert!(out.status.success(), "{}", text(&out.stderr));
                self.forwards
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(name);
            }
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.forwards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        // A cluster that outlives the scenario keeps nothing of it.
        if !matches!(self.mode, Mode::Embedded { dev: Some(_), .. }) {
            if let Mode::Embedded {
                dev: None,
                operator,
                ..
            } = &mut self.mode
            {
                // Our operator stops with the scenario (first, so that it adds no
                // finalizer again): the removal finalizers of its Replicas would hold the
                // namespace in Terminating for good.
                drop(operator.take());
                let names = self.kubectl(&["get", "replicas", "-n", &self.namespace, "-o", "name"]);
                for name in text(&names.stdout).lines() {
                    let _ = self.kubectl(&[
                        "patch",
                        name,
                        "-n",
                        &self.namespace,
                        "--type=merge",
                        "-p",
                        r#"{"metadata":{"finalizers":null}}"#,
                    ]);
                }
            }
            let _ = self.kubectl(&["delete", "namespace", &self.namespace, "--wait=false"]);
        }
        eprintln!(
            "[{}] scenario ran {:.1} s",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }
}

async fn client_for(kubeconfig: &Path) -> kube::Client {
    let text = std::fs::read_to_string(kubeconfig).expect("read the kubeconfig");
    let config: kube::config::Kubeconfig =
        serde_json::from_value(serde_saphyr_to_json(&text)).expect("a kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
        .await
        .expect("a client configuration");
    kube::Client::try_from(config).expect("a client")
}

/// The kubeconfig as JSON (it is YAML on disk).
fn serde_saphyr_to_json(text: &str) -> Value {
    serde_saphyr::from_str(text).expect("YAML")
}

/// Sites, a family and its replicas: `replicas` are (name, site, bootstrapFrom).
fn fleet(
    family: &str,
    sites: &[&str],
    replicas: &[(&str, &str, Option<&str>)],
    sync: &str,
) -> String {
    fleet_at(family, sites, replicas, sync, 7, "")
}

/// [`fleet`] at feature level `level`, with more `spec` lines (indented two spaces).
fn fleet_at(
    family: &str,
    sites: &[&str],
    replicas: &[(&str, &str, Option<&str>)],
    sync: &str,
    level: i32,
    spec: &str,
) -> String {
    let mut out = String::new();
    for site in sites {
        out.push_str(&format!(
            "apiVersion: multisite.dev/v1alpha1\nkind: Site\nmetadata: {{name: {site}}}\nspec: {{}}\n---\n"
        ));
    }
    out.push_str(&format!(
        "apiVersion: multisite.dev/v1alpha1\nkind: ReplicaFamily\nmetadata: {{name: {family}}}\n\
         spec:\n  idPrefix: SAMPL\n  featureLevel: {level}\n{spec}  sync: {{incrementalIntervalSeconds: 1{sync}}}\n---\n"
    ));
    for (name, site, from) in replicas {
        out.push_str(&replica_yaml(family, name, site, *from));
    }
    out
}

fn replica_yaml(family: &str, name: &str, site: &str, from: Option<&str>) -> String {
    let from = from
        .map(|f| format!(", bootstrapFrom: {f}"))
        .unwrap_or_default();
    format!(
        "apiVersion: multisite.dev/v1alpha1\nkind: Replica\nmetadata: {{name: {name}}}\n\
         spec: {{family: {family}, site: {site}, storage: 1Gi{from}}}\n---\n"
    )
}

fn set(ids: impl IntoIterator<Item = Vec<String>>) -> BTreeSet<String> {
    ids.into_iter().flatten().collect()
}

/// The interop schema package of family sampl, as examples/interop-package.yaml has it
/// (without its namespace).
const INTEROP: &str = "apiVersion: multisite.dev/v1alpha1\nkind: SchemaPackage\nmetadata: {name: interop}\n\
    spec:\n  family: sampl\n  package: Interop\n  version: \"1.0\"\n  recordTypes:\n\
    \x20   - name: ChangeEvent\n      fields: [{name: record, type: String}, {name: action, type: String}, {name: replica, type: String}, {name: origin, type: String}]\n";

const THREE: [(&str, &str, Option<&str>); 3] = [
    ("sampl-tokyo", "tokyo", None),
    ("sampl-paris", "paris", Some("sampl-tokyo")),
    ("sampl-austin", "austin", Some("sampl-tokyo")),
];
const NAMES: [&str; 3] = ["sampl-tokyo", "sampl-paris", "sampl-austin"];
const SITES: [&str; 3] = ["tokyo", "paris", "austin"];

/// A family of three replicas at three sites comes up Ready; records written at each
/// replica converge on all; status, `kubectl get`, Events, `multisite status` and the
/// metrics say so.
#[test]
fn three_sites_come_up_ready_and_records_converge() {
    let env = Env::start("converge", 1, false);
    env.apply(&fleet("sampl", &SITES, &THREE, ""));
    env.wait_active(&NAMES);
    let client = env.client("sampl");
    let mut ids = Vec::new();
    for name in NAMES {
        ids.push(env.write(&client, name, 10, name));
    }
    let ids = set(ids);
    assert_eq!(ids.len(), 30);
    env.wait_converged(&client, &NAMES, &ids);
    env.wait("the family is Ready and Synchronized with no lag", || {
        let status = env.family("sampl").status?;
        let ok = multisite::api::conditions::is_true(&status.conditions, "Ready")
            && multisite::api::conditions::is_true(&status.conditions, "Synchronized")
            && status.max_lag_changes == Some(0)
            && status.links.len() == 6
            && status.feature_level == Some(7);
        ok.then_some(())
    });

    // What a person sees with kubectl: Ready, feature levels and lag columns.
    let out = env.kubectl(&["get", "replicafamilies,replicas", "-n", &env.namespace]);
    let table = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let family_header = table.lines().next().unwrap_or_default();
    for column in ["TARGET FL", "FL", "READY", "SYNCHRONIZED", "LAG"] {
        assert!(family_header.contains(column), "{table}");
    }
    let family_row = table
        .lines()
        .find(|l| l.contains("replicafamily.multisite.dev/sampl"))
        .expect("family row");
    assert!(
        family_row
            .split_whitespace()
            .filter(|w| *w == "True")
            .count()
            >= 2,
        "{family_row}"
    );
    for name in NAMES {
        let row = table
            .lines()
            .find(|l| l.contains(&format!("replica.multisite.dev/{name}")))
            .expect("replica row");
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert!(
            cells.contains(&"Active") && cells.contains(&"True"),
            "{row}"
        );
        assert_eq!(
            cells.iter().filter(|c| **c == "7").count(),
            2,
            "both FLs shown: {row}"
        );
    }

    // Every decision is an Event.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.kube.clone(), &env.namespace);
    let reasons: BTreeSet<String> = env
        .rt
        .block_on(events.list(&Default::default()))
        .expect("list events")
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    for reason in [
        "SecretCreated",
        "Bootstrapping",
        "Active",
        "AllReplicasReady",
    ] {
        assert!(
            reasons.contains(reason),
            "no {reason} event among {reasons:?}"
        );
    }

    // `multisite status` prints the fleet.
    let out = Command::new(BIN)
        .args(["status", "sampl", "-n", &env.namespace])
        .env("KUBECONFIG", &env.kubeconfig)
        .output()
        .expect("multisite status");
    let status = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(status.contains("Ready True"), "{status}");
    for name in NAMES {
        assert!(
            status
                .lines()
                .any(|l| l.starts_with(name) && l.contains("Active")),
            "{status}"
        );
    }

    if let Some(metrics) = env.metrics() {
        assert!(metrics.contains("multisite_leader 1"), "{metrics}");
        assert!(metrics.contains("outcome=\"succeeded\""), "{metrics}");
        assert!(
            metrics.contains(&format!(
                "multisite_link_lag_changes{{namespace=\"{}\",family=\"sampl\"",
                env.namespace
            )),
            "{metrics}"
        );
        assert!(
            metrics.contains("multisite_reconciles_total{kind=\"Replica\"}"),
            "{metrics}"
        );
    }
}

/// A fourth replica added later is cloned from a live one and catches up.
#[test]
fn a_fourth_replica_added_later_catches_up() {
    let env = Env::start("fourth", 2, false);
    env.apply(&fleet("sampl", &SITES, &THREE, ""));
    env.wait_active(&NAMES);
    let client = env.client("sampl");
    let before = set([
        env.write(&client, "sampl-tokyo", 15, "early"),
        env.write(&client, "sampl-paris", 15, "early"),
    ]);
    env.apply(&replica_yaml(
        "sampl",
        "sampl-lima",
        "austin",
        Some("sampl-paris"),
    ));
    env.wait_active(&["sampl-lima"]);
    let late = env.write(&client, "sampl-lima", 5, "late");
    let all: BTreeSet<String> = before.union(&set([late.clone()])).cloned().collect();
    let four = ["sampl-tokyo", "sampl-paris", "sampl-austin", "sampl-lima"];
    env.wait_converged(&client, &four, &all);
    // The clone got ids of its own.
    assert!(late.iter().all(|id| !before.contains(id)));
    env.wait("the family has twelve links", || {
        (env.family("sampl").status?.links.len() == 12).then_some(())
    });
}

/// Deleting a Replica moves its mastership to another replica first, waits until that
/// change reached every peer, then removes the workload and its data.
#[test]
fn a_removed_replica_moves_its_mastership_first() {
    let env = Env::start("remove", 3, false);
    env.apply(&fleet("sampl", &SITES, &THREE, ""));
    env.wait_active(&NAMES);
    let client = env.client("sampl");
    let at_austin = env.write(&client, "sampl-austin", 8, "austin's");
    let others = env.write(&client, "sampl-tokyo", 2, "tokyo's");
    let all = set([at_austin.clone(), others]);
    env.wait_converged(&client, &NAMES, &all);

    env.rt
        .block_on(
            env.replicas()
                .delete("sampl-austin", &DeleteParams::default()),
        )
        .expect("delete the Replica");
    let mut phases = BTreeSet::new();
    env.wait("sampl-austin is gone", || {
        match env.replica("sampl-austin") {
            Some(r) => {
                if let Some(p) = r.status.and_then(|s| s.phase) {
                    phases.insert(format!("{p:?}"));
                }
                None
            }
            None => Some(()),
        }
    });
    assert!(phases.contains("Removing"), "phases seen: {phases:?}");
    // The records it mastered are mastered elsewhere now, everywhere.
    let remaining = ["sampl-tokyo", "sampl-paris"];
    env.wait_converged(&client, &remaining, &all);
    for name in remaining {
        let defects = env.defects(&client, name).expect("records");
        for id in &at_austin {
            let master = defects[id]["master"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(
                remaining.contains(&master.as_str()),
                "{id} at {name} is mastered by {master}"
            );
        }
    }
    // Its workload and data are gone.
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(env.kube.clone(), &env.namespace);
    let sets: Api<k8s_openapi::api::apps::v1::StatefulSet> =
        Api::namespaced(env.kube.clone(), &env.namespace);
    env.wait("its StatefulSet and claim are deleted", || {
        let claim = env
            .rt
            .block_on(claims.get_opt("data-sampl-austin-0"))
            .ok()?;
        let sts = env.rt.block_on(sets.get_opt("sampl-austin")).ok()?;
        (claim.is_none() && sts.is_none()).then_some(())
    });
    // Both the survivors keep working.
    let after = env.write(&client, "sampl-paris", 3, "after");
    let all: BTreeSet<String> = all.union(&set([after])).cloned().collect();
    env.wait_converged(&client, &remaining, &all);
}

/// A replica server killed (SIGKILL) repeatedly while records are written and synced
/// loses nothing: every record written reaches every replica.
#[test]
fn a_replica_pod_killed_during_sync_loses_nothing() {
    let env = Env::start("podkill", 4, false);
    env.apply(&fleet("sampl", &SITES, &THREE, ""));
    env.wait_active(&NAMES);
    let client = env.client("sampl");
    let mut ids = Vec::new();
    for round in 0..2 {
        ids.push(env.write(&client, "sampl-tokyo", 40, &format!("round {round}")));
        // Paris is killed while tokyo's changes are being pushed to it.
        env.kill_replica("sampl-paris");
        ids.push(env.write(&client, "sampl-austin", 10, &format!("austin {round}")));
        env.wait_serving(&client, "sampl-paris");
        ids.push(env.write(&client, "sampl-paris", 5, &format!("paris {round}")));
    }
    let ids = set(ids);
    assert_eq!(ids.len(), 110);
    env.wait_converged(&client, &NAMES, &ids);
    // It was never re-created: the same incarnation throughout.
    assert_eq!(
        env.replica("sampl-paris")
            .and_then(|r| r.status?.incarnation),
        Some(1)
    );
}

/// The operator killed while tasks run, and records written while it is down: a new
/// operator (after the old one's lease expires) resumes, and nothing is re-created.
#[test]
fn the_operator_killed_mid_task_resumes() {
    let mut env = Env::start("operator", 5, true);
    env.apply(&fleet("sampl", &SITES, &THREE, ""));
    env.wait_active(&NAMES);
    let client = env.client("sampl");
    let incarnations: Vec<Option<i64>> = NAMES
        .iter()
        .map(|n| env.replica(n).and_then(|r| r.status?.incarnation))
        .collect();
    // A backlog for austin, then its links open and the operator dies as the tasks start.
    env.patch_family(
        "sampl",
        json!({"spec": {"sync": {"links": [
            {"from": "sampl-tokyo", "to": "sampl-austin", "enabled": false},
            {"from": "sampl-paris", "to": "sampl-austin", "enabled": false}
        ]}}}),
    );
    std::thread::sleep(Duration::from_secs(2));
    let mut ids = vec![env.write(&client, "sampl-tokyo", 300, "backlog")];
    env.patch_family("sampl", json!({"spec": {"sync": {"links": []}}}));
    // The runner looks at the family every half second; the pushes of the backlog
    // take longer than that, so the operator dies with tasks under way.
    std::thread::sleep(Duration::from_millis(700));
    env.kill_operator();
    ids.push(env.write(&client, "sampl-paris", 10, "while down"));
    env.start_operator();
    let ids = set(ids);
    env.wait_converged(&client, &NAMES, &ids);
    let after: Vec<Option<i64>> = NAMES
        .iter()
        .map(|n| env.replica(n).and_then(|r| r.status?.incarnation))
        .collect();
    assert_eq!(incarnations, after, "no replica was re-created");
    if env.embedded() {
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(env.kube.clone(), &env.namespace);
        let lease = env
            .rt
            .block_on(leases.get("multisite-operator"))
            .expect("the lease");
        let spec = lease.spec.expect("lease spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("e2e-operator"));
    }
}

/// Disabling a link stops its tasks; enabling it again catches the receiver up.
#[test]
fn a_disabled_link_stops_and_catches_up_when_reenabled() {
    let env = Env::start("links", 6, false);
    env.apply(&fleet("sampl", &SITES, &THREE, ""));
    env.wait_active(&NAMES);
    let client = env.client("sampl");
    let first = set([env.write(&client, "sampl-tokyo", 3, "first")]);
    env.wait_converged(&client, &NAMES, &first);
    env.patch_family(
        "sampl",
        json!({"spec": {"sync": {"links": [
            {"from": "sampl-tokyo", "to": "sampl-austin", "enabled": false},
            {"from": "sampl-paris", "to": "sampl-austin", "enabled": false}
        ]}}}),
    );
    // Let a task already running on those links finish.
    std::thread::sleep(Duration::from_secs(3));
    let last_tasks = |env: &Env| -> BTreeMap<String, Option<String>> {
        env.family("sampl")
            .status
            .map(|s| s.links)
            .unwrap_or_default()
            .into_iter()
            .filter(|l| l.to == "sampl-austin")
            .map(|l| (l.from, l.last_task_time))
            .collect()
    };
    let before = last_tasks(&env);
    let held_back = set([env.write(&client, "sampl-tokyo", 10, "held back")]);
    env.wait_converged(&client, &["sampl-tokyo", "sampl-paris"], &held_back);
    std::thread::sleep(Duration::from_secs(3));
    let austin = env
        .defects(&client, "sampl-austin")
        .expect("records at austin");
    assert!(
        held_back.iter().all(|id| !austin.contains_key(id)),
        "a disabled link delivered"
    );
    assert_eq!(last_tasks(&env), before, "tasks ran on disabled links");
    env.wait("the family shows the lag and is not Synchronized", || {
        let status = env.family("sampl").status?;
        let lagging = status
            .links
            .iter()
            .any(|l| l.to == "sampl-austin" && l.lag_changes >= 10);
        (lagging && !multisite::api::conditions::is_true(&status.conditions, "Synchronized"))
            .then_some(())
    });

    env.patch_family(
        "sampl",
        json!({"spec": {"sync": {"links": [
            {"from": "sampl-tokyo", "to": "sampl-austin", "enabled": true},
            {"from": "sampl-paris", "to": "sampl-austin", "enabled": true}
        ]}}}),
    );
    let all: BTreeSet<String> = first.union(&held_back).cloned().collect();
    env.wait_converged(&client, &NAMES, &all);
    env.wait("the family is Synchronized again", || {
        let status = env.family("sampl").status?;
        multisite::api::conditions::is_true(&status.conditions, "Synchronized").then_some(())
    });
    // A person can ask for a full task through the annotation; it is taken and removed.
    let full_tasks = |env: &Env| -> Option<u64> {
        let metrics = env.metrics()?;
        let line = metrics.lines().find(|l| {
            l.starts_with("multisite_sync_tasks_total{")
                && l.contains(
                    "from=\"sampl-tokyo\",to=\"sampl-austin\",task=\"full\",outcome=\"succeeded\"",
                )
        })?;
        line.rsplit(' ').next()?.parse().ok()
    };
    let before = full_tasks(&env).unwrap_or(0);
    env.rt
        .block_on(env.families().patch(
            "sampl",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"annotations": {"multisite.dev/sync-now": "full:sampl-tokyo->sampl-austin"}}})),
        ))
        .expect("annotate");
    env.wait(
        "the annotation is taken and a full task ran on sampl-tokyo->sampl-austin",
        || {
            let family = env.family("sampl");
            let gone = !family.annotations().contains_key("multisite.dev/sync-now");
            let ran = !env.embedded() || full_tasks(&env).is_some_and(|n| n > before);
            (gone && ran).then_some(())
        },
    );
}

/// Of two operators with leader election only the lease holder acts; when it dies the
/// other takes the lease over and the family keeps synchronising.
#[test]
fn two_operators_only_the_leader_acts() {
    let mut env = Env::start("leader", 7, true);
    assert!(
        env.embedded(),
        "needs the embedded cluster's own operator processes: run it without \
         MULTISITE_E2E_KUBE_STATE / MULTISITE_E2E_DELEGATE_STATE (scripts/test.sh --skips it there)"
    );
    env.apply(&fleet("sampl", &SITES, &THREE, ""));
    env.wait_active(&NAMES);
    let standby_metrics = free_port();
    let Mode::Embedded { dir, .. } = &env.mode else {
        return;
    };
    let log = std::fs::File::create(dir.join("standby.log")).expect("standby log");
    let standby = Proc(
        Command::new(BIN)
            .args([
                "operator",
                "--leader-election",
                "--lease-namespace",
                &env.namespace,
            ])
            .args(["--watch-namespaces", &env.namespace])
            .args(["--identity", "e2e-standby", "--metrics-addr"])
            .arg(format!("127.0.0.1:{standby_metrics}"))
            .env("KUBECONFIG", &env.kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the standby operator"),
    );
    env.wait("the standby serves its metrics as a non-leader", || {
        scrape(standby_metrics)
            .filter(|m| m.contains("multisite_leader 0"))
            .map(|_| ())
    });
    assert!(
        env.metrics()
            .is_some_and(|m| m.contains("multisite_leader 1"))
    );
    // The standby reconciles nothing while it waits.
    std::thread::sleep(Duration::from_secs(2));
    let quiet = scrape(standby_metrics).unwrap_or_default();
    assert!(!quiet.contains("multisite_reconciles_total{"), "{quiet}");

    env.kill_operator();
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(env.kube.clone(), &env.namespace);
    env.wait("the standby holds the lease", || {
        let lease = env
            .rt
            .block_on(leases.get_opt("multisite-operator"))
            .ok()??;
        (lease.spec?.holder_identity.as_deref() == Some("e2e-standby")).then_some(())
    });
    let client = env.client("sampl");
    let ids = set([env.write(&client, "sampl-paris", 5, "after failover")]);
    env.wait_converged(&client, &NAMES, &ids);
    assert!(scrape(standby_metrics).is_some_and(|m| m.contains("multisite_leader 1")));
    drop(standby);
}

// ---------------------------------------------------------------------------------
// Staged upgrades, client tiers
// ---------------------------------------------------------------------------------

impl Env {
    fn levels(&self, name: &str) -> Option<(i32, i32)> {
        let status = self.replica(name)?.status?;
        Some((
            status.schema_repository_feature_level?,
            status.user_database_feature_level?,
        ))
    }

    fn plan(&self, family: &str) -> Option<multisite::api::PlanStatus> {
        self.family(family).status?.plan
    }

    /// Waits until the family's plan has run to its end at `level`.
    fn wait_upgraded(
        &self,
        family: &str,
        names: &[&str],
        level: i32,
    ) -> multisite::api::PlanStatus {
        self.wait(
            &format!("every replica is at ({level}, {level}) and the plan is done"),
            || {
                let plan = self.plan(family)?;
                let done = plan.target_feature_level == Some(level)
                    && !plan.steps.is_empty()
                    && plan
                        .steps
                        .iter()
                        .all(|s| s.state == multisite::api::StepState::Done)
                    && !plan.sync_paused;
                let levels = names.iter().all(|n| self.levels(n) == Some((level, level)));
                (done && levels).then_some(plan)
            },
        )
    }

    fn condition(
        &self,
        family: &str,
        type_: &str,
    ) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
        self.family(family)
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == type_)
    }
}

/// Writes records round the replicas until `stop` is set; returns the ids written.
fn write_throughout(
    env: &Env,
    client: &ReplicaClient,
    names: &[&str],
    stop: &std::sync::atomic::AtomicBool,
) -> (Vec<String>, usize) {
    let urls: Vec<String> = names.iter().map(|n| env.url(n)).collect();
    let mut ids = Vec::new();
    let mut refused = 0;
    let mut i = 0usize;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let url = &urls[i % urls.len()];
        let body = common::defect(&[("headline", &format!("during the upgrade {i}"))]);
        match env
            .rt
            .block_on(client.create_item(url, ItemKind::Record, &body))
        {
            Ok(item) => ids.push(item.id),
            // A replica between the two steps of a paired move, or restarting: try the next.
            Err(_) => refused += 1,
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(15));
    }
    (ids, refused)
}

/// Three sites from FL 6 to 8, staged, packets flowing one way meanwhile; records are
/// written at every site throughout, and every one of them reaches every replica.
#[test]
fn staged_six_to_eight_loses_no_record() {
    let env = Env::start("staged", 8, false);
    env.apply(&fleet_at(
        "sampl",
        &SITES,
        &THREE,
        "",
        6,
        "  allowUnidirectionalReplication: true\n",
    ));
    env.wait_active(&NAMES);
    let client = env.client("sampl");
    let before = set([env.write(&client, "sampl-paris", 5, "before")]);
    env.wait_converged(&client, &NAMES, &before);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (written, refused, plan) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| write_throughout(&env, &client, &NAMES, &stop));
        std::thread::sleep(Duration::from_secs(1));
        env.patch_family("sampl", json!({"spec": {"featureLevel": 8}}));
        let plan = env.wait_upgraded("sampl", &NAMES, 8);
        // Keep writing a little after the last raise.
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (ids, refused) = writer.join().expect("the writer");
        (ids, refused, plan)
    });
    let written = set([written]);
    eprintln!(
        "[staged] records written during the upgrade: {} (attempts refused: {refused}); plan of {} steps",
        written.len(),
        plan.steps.len()
    );
    assert!(
        written.len() >= 50,
        "too few records written during the upgrade: {}",
        written.len()
    );
    // Schema repositories before user databases: the first raise is a repository's.
    let actions: Vec<multisite::api::PlanAction> = plan.steps.iter().map(|s| s.action).collect();
    assert_eq!(
        actions.first(),
        Some(&multisite::api::PlanAction::RaiseSchemaRepository)
    );
    assert_eq!(plan.steps.len(), 12, "{actions:?}");
    let all: BTreeSet<String> = before.union(&written).cloned().collect();
    env.wait_converged(&client, &NAMES, &all);
    let arrived: Vec<usize> = NAMES
        .iter()
        .map(|n| {
            env.defects(&client, n)
                .map(|d| written.iter().filter(|id| d.contains_key(*id)).count())
                .unwrap_or(0)
        })
        .collect();
    eprintln!("[staged] of them, arrived at tokyo, paris, austin: {arrived:?}");
    assert!(arrived.iter().all(|n| *n == written.len()));
    // The held packets drained.
    env.wait("no packet is held anywhere", || {
        NAMES
            .iter()
            .all(|n| {
                env.replica(n)
                    .and_then(|r| r.status)
                    .is_some_and(|s| s.held_packets == 0)
            })
            .then_some(())
    });
}

/// Without one-way replication a staged cross-site raise is refused, with the reason
/// in a condition, and nothing changes; all-at-once then pauses sync, raises, resumes.
#[test]
fn a_refused_plan_changes_nothing_until_the_spec_allows_it() {
    let env = Env::start("refused", 9, false);
    env.apply(&fleet("sampl", &SITES, &THREE, ""));
    env.wait_active(&NAMES);
    env.patch_family("sampl", json!({"spec": {"featureLevel": 8}}));
    let condition = env.wait("the family says the plan is refused", || {
        env.condition("sampl", "Progressing")
            .filter(|c| c.reason == "UpgradeRefused")
    });
    assert_eq!(condition.status, "False");
    assert!(
        condition.message.contains("AllAtOnce")
            && condition.message.contains("allowUnidirectionalReplication"),
        "{}",
        condition.message
    );
    assert!(env.plan("sampl").and_then(|p| p.blocked).is_some());
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        NAMES.iter().all(|n| env.levels(n) == Some((7, 7))),
        "a refused plan changed a replica"
    );

    env.patch_family("sampl", json!({"spec": {"upgradeStrategy": "AllAtOnce"}}));
    let plan = env.wait_upgraded("sampl", &NAMES, 8);
    let actions: Vec<multisite::api::PlanAction> = plan.steps.iter().map(|s| s.action).collect();
    assert_eq!(
        actions.first(),
        Some(&multisite::api::PlanAction::PauseSync),
        "{actions:?}"
    );
    assert_eq!(
        actions.last(),
        Some(&multisite::api::PlanAction::ResumeSync),
        "{actions:?}"
    );
    let client = env.client("sampl");
    let after = set([env.write(&client, "sampl-austin", 3, "after")]);
    env.wait_converged(&client, &NAMES, &after);
}

/// A client tier whose release cannot open the target holds the raise back; once the
/// tier is set to a newer release, it is rolled out (all pods ready) before any raise.
/// Its page marks records mastered elsewhere; a client of an old release is refused.
#[test]
fn an_old_client_tier_blocks_the_raise_until_it_is_upgraded() {
    let env = Env::start("clients", 10, false);
    let tier = "  clients:\n    - {name: web, release: \"7.1.2\", replicas: 1, site: tokyo}\n  allowUnidirectionalReplication: true\n";
    env.apply(&fleet_at("sampl", &SITES, &THREE, "", 7, tier));
    env.wait_active(&NAMES);
    env.wait("client tier web runs release 7.1.2", || {
        let clients = env.family("sampl").status?.clients;
        clients
            .iter()
            .any(|c| {
                c.name == "web" && c.release.as_deref() == Some("7.1.2") && c.ready_replicas == 1
            })
            .then_some(())
    });
    let client = env.client("sampl");
    let at_paris = env.write(&client, "sampl-paris", 1, "paris's")[0].clone();
    env.wait_converged(&client, &NAMES, &set([vec![at_paris.clone()]]));

    // The tier's page, fetched through its pod, marks paris's record as locked here.
    if env.embedded() {
        let ip = env.pod_address(
            "the web tier's pod",
            "app.kubernetes.io/name=multisite-client",
        );
        let page = http_get(&format!("{ip}:8080"), "/");
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        let row = page
            .split("<tr")
            .find(|r| r.contains(&at_paris))
            .unwrap_or_else(|| panic!("no row for {at_paris}: {page}"));
        assert!(row.contains("🔒 mastered at sampl-paris"), "{row}");
        let view = http_get(&format!("{ip}:8080"), &format!("/records/{at_paris}"));
        assert!(
            view.contains("id=\"lock\"") && view.contains("disabled"),
            "{view}"
        );
    }

    env.patch_family("sampl", json!({"spec": {"featureLevel": 8}}));
    let condition = env.wait("the raise is refused because of the tier", || {
        env.condition("sampl", "Progressing")
            .filter(|c| c.reason == "UpgradeRefused")
    });
    assert!(
        condition.message.contains("client tier web"),
        "{}",
        condition.message
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(NAMES.iter().all(|n| env.levels(n) == Some((7, 7))));

    env.patch_family("sampl", json!({"spec": {"clients": [{"name": "web", "release": "8.0.1.1", "replicas": 1, "site": "tokyo"}]}}));
    let plan = env.wait_upgraded("sampl", &NAMES, 8);
    assert_eq!(
        plan.steps[0].action,
        multisite::api::PlanAction::UpgradeClients,
        "{:?}",
        plan.steps
    );
    assert_eq!(plan.steps[0].release.as_deref(), Some("8.0.1.1"));
    assert!(
        plan.steps[1..]
            .iter()
            .all(|s| s.action != multisite::api::PlanAction::UpgradeClients)
    );
    let clients = env.family("sampl").status.expect("status").clients;
    assert_eq!(clients[0].release.as_deref(), Some("8.0.1.1"));

    // A client of the old release is refused by a replica at FL 8, visibly.
    if env.embedded() {
        let Mode::Embedded { dir, .. } = &env.mode else {
            unreachable!()
        };
        let secret_file = dir.join("client.secret");
        std::fs::write(&secret_file, env.secret_value("sampl-secret", "secret"))
            .expect("write the secret");
        let port = free_port();
        let _old = Proc(
            Command::new(BIN)
                .args([
                    "client",
                    "--release",
                    "7.1.2",
                    "--family",
                    "sampl",
                    "--tier",
                    "old",
                ])
                .arg(format!("--replica={}", env.url("sampl-tokyo")))
                .arg(format!("--listen=127.0.0.1:{port}"))
                .arg("--secret-file")
                .arg(&secret_file)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start an old client"),
        );
        let page = env.wait("the old client serves its page", || {
            let page = http_get(&format!("127.0.0.1:{port}"), "/");
            (!page.is_empty()).then_some(page)
        });
        assert!(page.starts_with("HTTP/1.1 403"), "{page}");
        assert!(
            page.contains("Refused by the replica") && page.contains("cannot open"),
            "{page}"
        );
        assert!(http_get(&format!("127.0.0.1:{port}"), "/readyz").starts_with("HTTP/1.1 503"));
    }
}

/// A paused plan is published but not carried out; unpaused it runs, and an operator
/// killed in the middle of it resumes at the right step (no step twice).
#[test]
fn a_paused_plan_holds_and_a_restarted_operator_resumes_it() {
    let mut env = Env::start("resume", 11, false);
    env.apply(&fleet_at(
        "sampl",
        &SITES,
        &THREE,
        "",
        6,
        "  allowUnidirectionalReplication: true\n  paused: true\n",
    ));
    env.wait_active(&NAMES);
    env.patch_family("sampl", json!({"spec": {"featureLevel": 8}}));
    let held = env.wait("the plan is published and held", || {
        let plan = env.plan("sampl")?;
        (plan.target_feature_level == Some(8) && !plan.steps.is_empty()).then_some(plan)
    });
    assert!(
        held.steps
            .iter()
            .all(|s| s.state == multisite::api::StepState::Pending),
        "{:?}",
        held.steps
    );
    assert_eq!(
        env.condition("sampl", "Progressing")
            .map(|c| c.reason)
            .as_deref(),
        Some("Paused")
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        NAMES.iter().all(|n| env.levels(n) == Some((6, 6))),
        "a held plan raised a replica"
    );
    let planned = held.steps.len();

    env.patch_family("sampl", json!({"spec": {"paused": false}}));
    env.wait("the plan is under way", || {
        let plan = env.plan("sampl")?;
        (plan.current >= 1).then_some(())
    });
    // Held again mid-way, then the operator dies and a new one takes over.
    env.patch_family("sampl", json!({"spec": {"paused": true}}));
    let mid = env.wait("the plan holds mid-way", || {
        let plan = env.plan("sampl")?;
        plan.steps
            .iter()
            .all(|s| s.state != multisite::api::StepState::Running)
            .then_some(plan)
    });
    let done_mid = mid
        .steps
        .iter()
        .filter(|s| s.state == multisite::api::StepState::Done)
        .count();
    assert!(
        done_mid < planned,
        "the plan ran to its end before it could be held: {:?}",
        mid.steps
    );
    env.kill_operator();
    std::thread::sleep(Duration::from_secs(1));
    env.start_operator();
    std::thread::sleep(Duration::from_secs(3));
    let after_restart = env.plan("sampl").expect("a plan");
    assert_eq!(
        after_restart
            .steps
            .iter()
            .filter(|s| s.state == multisite::api::StepState::Done)
            .count(),
        done_mid,
        "a held plan moved after the restart: {:?}",
        after_restart.steps
    );
    env.patch_family("sampl", json!({"spec": {"paused": false}}));
    let plan = env.wait_upgraded("sampl", &NAMES, 8);
    assert_eq!(plan.steps.len(), planned, "{:?}", plan.steps);
    let mut seen = BTreeSet::new();
    for step in &plan.steps {
        let key = format!(
            "{:?} {:?} {:?}",
            step.action, step.replica, step.feature_level
        );
        assert!(seen.insert(key.clone()), "step done twice: {key}");
    }
}

/// An operator's `/metrics` on 127.0.0.1:`port`, if it answers.
fn scrape(port: u16) -> Option<String> {
    let answer = http_get(&format!("127.0.0.1:{port}"), "/metrics");
    (!answer.is_empty()).then_some(answer)
}

/// A GET over plain HTTP/1.1; the whole answer, or "" when nobody answers.
fn http_get(address: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(address) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

/// A SchemaPackage is applied at the schema repository's master, travels to the other
/// replicas, and every user database is upgraded to it; a replica added later gets it.
/// Record changes then write change events.
#[test]
fn a_schema_package_reaches_every_replica_including_a_late_one() {
    let env = Env::start("package", 12, false);
    env.apply(&fleet("sampl", &SITES, &THREE, ""));
    env.wait_active(&NAMES);
    env.apply(INTEROP);
    let packages: Api<multisite::api::SchemaPackage> =
        Api::namespaced(env.kube.clone(), &env.namespace);
    let wait_everywhere = |names: &[&str]| {
        env.wait(
            &format!(
                "the package is applied and upgraded at {}",
                names.join(", ")
            ),
            || {
                let status = env.rt.block_on(packages.get("interop")).ok()?.status?;
                let everywhere = names.iter().all(|n| {
                    status
                        .replicas
                        .iter()
                        .any(|r| r.name == *n && r.applied && r.user_database_upgraded)
                });
                (everywhere && multisite::api::conditions::is_true(&status.conditions, "Ready"))
                    .then_some(status)
            },
        )
    };
    let status = wait_everywhere(&NAMES);
    let version = status.schema_version.expect("a schema version");
    env.apply(&replica_yaml("sampl", "sampl-lima", "austin", None));
    env.wait_active(&["sampl-lima"]);
    wait_everywhere(&["sampl-tokyo", "sampl-paris", "sampl-austin", "sampl-lima"]);
    let client = env.client("sampl");
    let status = env
        .rt
        .block_on(client.status(&env.url("sampl-lima")))
        .expect("lima's status");
    assert_eq!(
        i64::try_from(status.user_database_schema_version).ok(),
        Some(version)
    );
    // With the package in place, a record change writes a change event.
    let id = env.write(&client, "sampl-paris", 1, "with events")[0].clone();
    env.wait("a change event for the new record exists", || {
        let url = env.url("sampl-paris");
        let events: Vec<Value> = env
            .rt
            .block_on(client.list_items(&url, ItemKind::Record, &ItemQuery::of_type("ChangeEvent")))
            .ok()?
            .into_iter()
            .filter_map(|e| serde_json::to_value(e).ok())
            .collect();
        events
            .iter()
            .any(|e| e["fields"]["record"] == json!(id))
            .then_some(())
    });
}

// ---------------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------------

/// The outside system received `expected` events, each once.
fn assert_each_delivered_once(events: &[Value], expected: usize) {
    let ids: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    let unique: BTreeSet<&&str> = ids.iter().collect();
    assert_eq!(
        ids.len(),
        unique.len(),
        "an event was delivered twice: {ids:?}"
    );
    assert_eq!(
        ids.len(),
        expected,
        "events beyond the changes made: {events:?}"
    );
}

/// Change events written before the family had a gateway, at replicas that are not the
/// schema repository's master (so mastered at that master, the only place they could
/// go), all reach the outside system once the gateway is pinned to a third replica:
/// the operator hands them to the gateway's replica, which delivers them.
#[test]
fn change_events_written_before_the_pin_was_known_reach_the_outside_system_once_each() {
    let env = Env::start("early-events", 14, false);
    env.needs_the_outside_system_on_loopback();
    env.apply(&fleet_at("sampl", &SITES, &THREE, "", 7, ""));
    env.wait_active(&NAMES);
    env.install_interop();
    // No gateway yet: the events of these records are mastered at sampl-tokyo, the
    // schema repository's master, though made at paris and austin.
    let client = env.client("sampl");
    let mut created = Vec::new();
    for name in ["sampl-paris", "sampl-austin"] {
        created.extend(env.write(&client, name, 3, name));
    }
    let outside = OutsideSystem::start(3);
    let spec = format!(
        "  gateway: {{replica: sampl-austin, endpoint: \"http://127.0.0.1:{}/events\"}}\n",
        outside.port
    );
    env.apply(&fleet_at("sampl", &SITES, &THREE, "", 7, &spec));
    let expected: BTreeSet<String> = created.iter().cloned().collect();
    let events = env.wait(
        &format!(
            "the outside system received the {} early events",
            expected.len()
        ),
        || {
            let events = outside.events();
            let got: BTreeSet<String> = events
                .iter()
                .filter(|e| e["action"] == "create")
                .filter_map(|e| e["record"].as_str().map(str::to_string))
                .collect();
            expected.is_subset(&got).then_some(events)
        },
    );
    assert_each_delivered_once(&events, expected.len());
    env.wait("the gateway reports none pending", || {
        let gateway = env.family("sampl").status?.gateway?;
        (gateway.replica == "sampl-austin"
            && gateway.events_delivered >= expected.len() as i64
            && gateway.events_pending == 0)
            .then_some(())
    });
}

/// With the interop package in place, change events from every site reach the outside
/// system through the gateway, once each, despite failed deliveries; updates from the
/// outside system apply at the gateway's replica, and one mastered elsewhere is refused
/// and counted as one-directional.
#[test]
fn change_events_from_every_site_reach_the_outside_system_once_each() {
    let env = Env::start("gateway", 13, false);
    env.needs_the_outside_system_on_loopback();
    let outside = OutsideSystem::start(3);
    let spec = format!(
        "  gateway: {{replica: sampl-tokyo, endpoint: \"http://127.0.0.1:{}/events\"}}\n",
        outside.port
    );
    env.apply(&fleet_at("sampl", &SITES, &THREE, "", 7, &spec));
    env.wait_active(&NAMES);
    env.install_interop();
    env.wait("the gateway is connected to sampl-tokyo", || {
        let gateway = env.family("sampl").status?.gateway?;
        (gateway.connected && gateway.replica == "sampl-tokyo").then_some(())
    });
    let client = env.client("sampl");
    let mut created = Vec::new();
    for name in NAMES {
        created.extend(env.write(&client, name, 4, name));
    }
    // One change of each record at its master, too.
    for id in &created {
        let master = NAMES
            .iter()
            .find(|n| {
                env.defects(&client, n)
                    .is_some_and(|d| d.get(id).is_some_and(|i| i["master"] == json!(**n)))
            })
            .copied()
            .expect("a master");
        let url = env.url(master);
        env.rt
            .block_on(client.update_item(
                &url,
                ItemKind::Record,
                id,
                &UpdateItem {
                    fields: [("state".to_string(), json!("open"))].into(),
                    mastership: None,
                    via_gateway: false,
                },
            ))
            .expect("modify");
    }
    let expected: BTreeSet<(String, String)> = created
        .iter()
        .flat_map(|id| {
            [
                (id.clone(), "create".to_string()),
                (id.clone(), "modify".to_string()),
            ]
        })
        .collect();
    let events = env.wait(
        &format!("the outside system received {} events", expected.len()),
        || {
            let events = outside.events();
            let got: BTreeSet<(String, String)> = events
                .iter()
                .map(|e| {
                    (
                        e["record"].as_str().unwrap_or_default().to_string(),
                        e["action"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect();
            expected.is_subset(&got).then_some(events)
        },
    );
    assert_each_delivered_once(&events, expected.len());
    let sites: BTreeSet<&str> = events
        .iter()
        .filter_map(|e| e["replica"].as_str())
        .collect();
    assert_eq!(sites.len(), 3, "events from every site: {sites:?}");
    env.wait(
        "the gateway reports them delivered and none pending",
        || {
            let gateway = env.family("sampl").status?.gateway?;
            (gateway.events_delivered >= expected.len() as i64 && gateway.events_pending == 0)
                .then_some(())
        },
    );

    // Updates from outside: one to a record mastered at the gateway's replica, one to a
    // record mastered at paris.
    let token = String::from_utf8(env.secret_value("sampl-gateway", "token")).expect("utf-8");
    let ip = env.pod_address(
        "the gateway pod",
        "app.kubernetes.io/instance=sampl-gateway",
    );
    let gateway = HttpClient::new(token, None);
    let updates = multisite::replica::api::route::workload::GATEWAY_UPDATES;
    let url = format!("http://{ip}:8080");
    let at_tokyo = created[0].clone();
    let at_paris = created[4].clone();
    env.rt
        .block_on(gateway.send_json::<_, Value>(
            hyper::Method::POST,
            &url,
            updates,
            &json!({"id": at_tokyo, "fields": {"state": "closed"}}),
        ))
        .expect("an update at the gateway's replica");
    // Its change event comes back to the outside system marked as its own.
    env.wait(
        "the update's change event arrives marked origin gateway",
        || {
            outside
                .events()
                .iter()
                .any(|e| e["record"] == json!(at_tokyo) && e["origin"] == "gateway")
                .then_some(())
        },
    );
    assert!(
        events.iter().all(|e| e["origin"] == "replica"),
        "the changes made at the replicas are marked origin replica: {events:?}"
    );
    let refused = env
        .rt
        .block_on(gateway.send_json::<_, Value>(
            hyper::Method::POST,
            &url,
            updates,
            &json!({"id": at_paris, "fields": {"state": "closed"}}),
        ))
        .expect_err("an update to a record mastered elsewhere");
    assert!(refused.to_string().contains("sampl-paris"), "{refused}");
    env.wait("the family counts one one-directional record", || {
        let gateway = env.family("sampl").status?.gateway?;
        (gateway.one_directional_records == 1).then_some(())
    });

    // `multisite gateway remaster` moves that record to the gateway's replica; the
    // outside system's update then applies.
    let out = Command::new(BIN)
        .args(["gateway", "remaster", "sampl", "-n", &env.namespace])
        .env("KUBECONFIG", &env.kubeconfig)
        .output()
        .expect("multisite gateway remaster");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("1 one-directional record"),
        "{}",
        text(&out.stdout)
    );
    env.wait("no one-directional record is left", || {
        let family = env.family("sampl");
        let gone = !family.annotations().contains_key("multisite.dev/remaster");
        (gone && family.status?.gateway?.one_directional_records == 0).then_some(())
    });
    env.rt
        .block_on(gateway.send_json::<_, Value>(
            hyper::Method::POST,
            &url,
            updates,
            &json!({"id": at_paris, "fields": {"state": "closed"}}),
        ))
        .expect("the update applies once the record is mastered at the gateway's replica");

    // The pin moves to paris while changes keep coming: every event still arrives once.
    let mut more = Vec::new();
    for name in NAMES {
        more.extend(env.write(&client, name, 2, "before the move"));
    }
    env.patch_family(
        "sampl",
        json!({"spec": {"gateway": {"replica": "sampl-paris"}}}),
    );
    for name in NAMES {
        more.extend(env.write(&client, name, 2, "during the move"));
    }
    env.wait("the gateway runs at sampl-paris", || {
        let gateway = env.family("sampl").status?.gateway?;
        (gateway.replica == "sampl-paris" && gateway.connected).then_some(())
    });
    for name in NAMES {
        more.extend(env.write(&client, name, 2, "after the move"));
    }
    // The earlier changes, the new records, and the two updates that came in through
    // the gateway.
    let total = expected.len() + more.len() + 2;
    let expected: BTreeSet<(String, String)> = expected
        .into_iter()
        .chain(more.iter().map(|id| (id.clone(), "create".to_string())))
        .chain([
            (at_tokyo.clone(), "modify".to_string()),
            (at_paris.clone(), "modify".to_string()),
        ])
        .collect();
    let events = env.wait(
        &format!("the outside system received all {total} events"),
        || {
            let events = outside.events();
            let got: BTreeSet<(String, String)> = events
                .iter()
                .map(|e| {
                    (
                        e["record"].as_str().unwrap_or_default().to_string(),
                        e["action"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect();
            (expected.is_subset(&got) && events.len() >= total).then_some(events)
        },
    );
    let ids: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    let unique: BTreeSet<&&str> = ids.iter().collect();
    assert_eq!(
        ids.len(),
        unique.len(),
        "an event was delivered twice across the move: {ids:?}"
    );
    assert_eq!(ids.len(), total, "{events:?}");
}
