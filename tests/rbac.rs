//! The Helm chart's RBAC against what the operator really calls.
//!
//! Runs `multisite dev up --no-operator --audit-log ...` and a separate `multisite
//! operator` process against it, and drives the operator through its main paths:
//! replicas brought to Active, a full sync asked for by annotation, a schema package,
//! a replica removed, and the last one force-removed. Then it reads the operator's
//! requests from the audit log and checks each one against the rules the chart grants
//! the operator's ServiceAccount, rendered by Helm's own engine (`scripts/helm.py`, as
//! in `tests/helm_chart.rs`). Every request the rules do not allow fails the test;
//! rules no request used are printed, as information only (some serve paths this run
//! does not take).
//!
//! Authorization is modelled as Kubernetes' RBAC authorizer does it: a request is
//! allowed when a rule of a role bound to the ServiceAccount matches its API group,
//! resource (`resource/subresource` for a subresource) and verb, `*` matching anything,
//! and for a Role (or a RoleBinding) only in that namespace. As on the real API server,
//! a server-side apply that creates its object is also authorized as `create`.
//! Discovery and other non-resource URLs are open to every authenticated user there,
//! so they are not checked.
//!
//! Needs helm-sdkpy (see tests/helm_chart.rs); MULTISITE_SKIP_HELM=1 skips the test.

use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use multisite::api::{Replica, ReplicaFamily, SchemaPackage};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_multisite");
const INSTALL_COMMAND: &str = "python3 -m pip install --ignore-requires-python helm-sdkpy";
const RELEASE: &str = "ms";
/// The release namespace: the operator's ServiceAccount and its Lease live here.
const RELEASE_NAMESPACE: &str = "multisite-system";
/// Where the fleet lives.
const NAMESPACE: &str = "tracker";
const FAMILY: &str = "sampl";
/// The replica removed through the removal workflow (not the gateway's).
const REMOVED: &str = "sampl-paris";
/// The replica removed last, with the force-remove annotation.
const KEPT: &str = "sampl-tokyo";
/// Pods of this test's dev cluster get loopback addresses from here up.
const FIRST_POD_ADDRESS: &str = "127.77.0.1";
/// The whole test, processes included, ends within this.
const TEST_LIMIT: Duration = Duration::from_secs(110);

const MANIFEST: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: multisite-system}
---
apiVersion: multisite.dev/v1alpha1
kind: Site
metadata: {name: tokyo, namespace: tracker}
spec: {zone: asia-northeast1-a}
---
apiVersion: multisite.dev/v1alpha1
kind: Site
metadata: {name: paris, namespace: tracker}
spec: {zone: europe-west9-a}
---
apiVersion: multisite.dev/v1alpha1
kind: ReplicaFamily
metadata: {name: sampl, namespace: tracker}
spec:
  idPrefix: SAMPL
  featureLevel: 7
  upgradeStrategy: Staged
  allowUnidirectionalReplication: true
  gateway: {replica: sampl-tokyo}
  sync: {topology: Mesh, incrementalIntervalSeconds: 1}
---
apiVersion: multisite.dev/v1alpha1
kind: Replica
metadata: {name: sampl-tokyo, namespace: tracker}
spec: {family: sampl, site: tokyo, storage: 1Gi}
---
apiVersion: multisite.dev/v1alpha1
kind: Replica
metadata: {name: sampl-paris, namespace: tracker}
spec: {family: sampl, site: paris, storage: 1Gi, bootstrapFrom: sampl-tokyo}
";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped, so a failing
/// test leaves nothing running. Its output goes to a log file.
struct Process {
    what: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

fn sigterm(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn wait_at_most(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Process {
    fn start(what: &'static str, mut command: Command, log: PathBuf) -> Process {
        let out = std::fs::File::create(&log).expect("create a log file");
        let err = out.try_clone().expect("clone a log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Process {
            what,
            child: Some(child),
            log,
        }
    }

    /// Whether it still runs; `Err` with its log when it ended.
    fn check_running(&mut self) -> Result<(), String> {
        let Some(child) = self.child.as_mut() else {
            return Err(format!("{} was stopped", self.what));
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "{} exited ({status}); its log:\n{}",
                self.what,
                tail(&self.log, 40)
            )),
            Err(e) => Err(format!("cannot poll {}: {e}", self.what)),
        }
    }

    /// SIGTERM, and the exit status once it ended (SIGKILL after `limit`, failing the test).
    fn stop(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("a running process");
        sigterm(child.id());
        match wait_at_most(&mut child, limit) {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not stop within {limit:?} of SIGTERM; its log:\n{}",
                    self.what,
                    tail(&self.log, 40)
                );
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM first: `dev up` then stops its pod processes too.
            sigterm(child.id());
            if wait_at_most(&mut child, Duration::from_secs(15)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The last `lines` lines of a file (for failure messages).
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------
// The chart's rules, rendered by Helm
// ---------------------------------------------------------------------------------

/// False (after a loud line) when MULTISITE_SKIP_HELM=1; panics when helm-sdkpy is missing.
fn helm_ready() -> bool {
    if std::env::var("MULTISITE_SKIP_HELM").as_deref() == Ok("1") {
        eprintln!(
            "\n########## SKIPPED the RBAC test: MULTISITE_SKIP_HELM=1 is set, so the chart's rules were NOT checked ##########\n"
        );
        return false;
    }
    let out = Command::new("python3")
        .args(["-c", "import helm_sdkpy"])
        .output();
    match out {
        Err(e) => panic!(
            "cannot run python3 ({e}); the RBAC test renders the chart with Helm's engine through \
             helm-sdkpy: `{INSTALL_COMMAND}` (or set MULTISITE_SKIP_HELM=1)"
        ),
        Ok(out) if !out.status.success() => panic!(
            "python3 cannot import helm_sdkpy, which renders the chart for this test.\n\
             Install it with:\n    {INSTALL_COMMAND}\n(or set MULTISITE_SKIP_HELM=1).\npython3 said: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Ok(_) => true,
    }
}

/// The chart's manifests rendered with `--set` expressions, release `ms` in the
/// release namespace.
fn render(sets: &[&str]) -> Vec<Value> {
    let chart = root().join("charts").join("multisite-operator");
    let mut command = Command::new("python3");
    command
        .arg(root().join("scripts").join("helm.py"))
        .arg("template")
        .arg(&chart)
        .args(["--namespace", RELEASE_NAMESPACE, "--release", RELEASE])
        .current_dir(root());
    for set in sets {
        command.args(["--set", set]);
    }
    let out = command.output().expect("run python3 scripts/helm.py");
    assert!(
        out.status.success(),
        "helm.py template {sets:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 manifests");
    serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("the rendered chart is not YAML: {e}\n{text}"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or_default()
}

/// One resource rule of a role (non-resource rules are left out: not checked here).
#[derive(Clone, Debug)]
struct Rule {
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    names: Vec<String>,
}

/// A role's rules as bound to the operator: everywhere (ClusterRoleBinding) or in one
/// namespace (RoleBinding).
#[derive(Clone, Debug)]
struct Grant {
    /// `ClusterRole NAME` or `Role NS/NAME`.
    role: String,
    namespace: Option<String>,
    rules: Vec<Rule>,
}

fn rules_of(role: &Value) -> Vec<Rule> {
    role["rules"]
        .as_array()
        .map(|rules| {
            rules
                .iter()
                .filter(|rule| rule.get("resources").is_some())
                .map(|rule| Rule {
                    groups: strings(&rule["apiGroups"]),
                    resources: strings(&rule["resources"]),
                    verbs: strings(&rule["verbs"]),
                    names: strings(&rule["resourceNames"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What the rendered chart grants the ServiceAccount its Deployment runs as.
fn grants(docs: &[Value]) -> Vec<Grant> {
    let deployment = docs
        .iter()
        .find(|d| kind(d) == "Deployment")
        .expect("the chart renders the operator's Deployment");
    let account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or("default")
        .to_string();
    let mut out = Vec::new();
    for binding in docs
        .iter()
        .filter(|d| matches!(kind(d), "RoleBinding" | "ClusterRoleBinding"))
    {
        let bound = binding["subjects"].as_array().is_some_and(|subjects| {
            subjects.iter().any(|s| {
                s["kind"] == "ServiceAccount"
                    && s["name"].as_str() == Some(account.as_str())
                    && s["namespace"].as_str() == Some(RELEASE_NAMESPACE)
            })
        });
        if !bound {
            continue;
        }
        let binding_namespace = (kind(binding) == "RoleBinding").then(|| {
            binding["metadata"]["namespace"]
                .as_str()
                .unwrap_or(RELEASE_NAMESPACE)
                .to_string()
        });
        let role_kind = binding["roleRef"]["kind"].as_str().unwrap_or_default();
        let role_name = binding["roleRef"]["name"].as_str().unwrap_or_default();
        let role = docs
            .iter()
            .find(|d| {
                kind(d) == role_kind
                    && name(d) == role_name
                    && (role_kind == "ClusterRole"
                        || d["metadata"]["namespace"].as_str() == binding_namespace.as_deref())
            })
            .unwrap_or_else(|| {
                panic!(
                    "binding {} names {role_kind} {role_name}, which the chart does not render",
                    name(binding)
                )
            });
        let label = match &binding_namespace {
            Some(ns) if role_kind == "Role" => format!("Role {ns}/{role_name}"),
            Some(ns) => format!("ClusterRole {role_name} (bound in {ns})"),
            None => format!("ClusterRole {role_name}"),
        };
        out.push(Grant {
            role: label,
            namespace: binding_namespace,
            rules: rules_of(role),
        });
    }
    assert!(
        !out.is_empty(),
        "the chart binds no role to ServiceAccount {RELEASE_NAMESPACE}/{account}"
    );
    out
}

/// (group, resource, verb) triples of a role, however its rules are grouped.
fn permission_set(rules: &[Rule]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in rules {
        for group in &rule.groups {
            for resource in &rule.resources {
                for verb in &rule.verbs {
                    out.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// The operator's requests and the authorizer
// ---------------------------------------------------------------------------------

/// One resource request of the operator, as the audit log has it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Call {
    verb: String,
    group: String,
    resource: String,
    subresource: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    code: u16,
}

impl Call {
    fn from_line(line: &Value) -> Call {
        let text = |key: &str| line[key].as_str().map(str::to_string);
        Call {
            verb: text("verb").expect("an audit line has a verb"),
            group: text("apiGroup").expect("a resource line has an apiGroup"),
            resource: text("resource").expect("a resource line has a resource"),
            subresource: text("subresource"),
            namespace: text("namespace"),
            name: text("name"),
            code: line["code"]
                .as_u64()
                .and_then(|c| u16::try_from(c).ok())
                .expect("an audit line has a code"),
        }
    }

    /// `resource` or `resource/subresource`, as RBAC rules name it.
    fn full_resource(&self) -> String {
        match &self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.clone(),
        }
    }

    /// The verbs the authorizer is asked for: a server-side apply that created its
    /// object (201) is also authorized as `create`.
    fn verbs(&self) -> Vec<&str> {
        if self.verb == "patch" && self.code == 201 {
            vec!["patch", "create"]
        } else {
            vec![self.verb.as_str()]
        }
    }

    /// How failures and counts name it: verb, group, resource, namespace.
    fn summary(&self, verb: &str) -> String {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        let place = match &self.namespace {
            Some(ns) => format!("namespace {ns}"),
            None => "all namespaces / cluster scope".to_string(),
        };
        format!(
            "{verb:<16} {group:<20} {:<28} {place}",
            self.full_resource()
        )
    }
}

fn matches(items: &[String], wanted: &str) -> bool {
    items.iter().any(|item| item == "*" || item == wanted)
}

fn resource_matches(item: &str, call: &Call) -> bool {
    item == "*"
        || item == call.full_resource()
        || call
            .subresource
            .as_ref()
            .is_some_and(|sub| item == format!("*/{sub}"))
}

fn rule_allows(rule: &Rule, call: &Call, verb: &str) -> bool {
    matches(&rule.groups, &call.group)
        && matches(&rule.verbs, verb)
        && rule.resources.iter().any(|r| resource_matches(r, call))
        && (rule.names.is_empty()
            || call
                .name
                .as_ref()
                .is_some_and(|n| rule.names.iter().any(|allowed| allowed == n)))
}

fn grant_applies(grant: &Grant, call: &Call) -> bool {
    match &grant.namespace {
        None => true,
        Some(ns) => call.namespace.as_deref() == Some(ns.as_str()),
    }
}

/// One permission of a grant: (role, group, resource, verb) as the rule writes them.
type Permission = (String, String, String, String);

/// Whether `grants` allow `verb` on `call`; every permission that allowed it is added
/// to `used`.
fn authorize(grants: &[Grant], call: &Call, verb: &str, used: &mut BTreeSet<Permission>) -> bool {
    let mut allowed = false;
    for grant in grants.iter().filter(|g| grant_applies(g, call)) {
        for rule in grant.rules.iter().filter(|r| rule_allows(r, call, verb)) {
            allowed = true;
            for group in rule
                .groups
                .iter()
                .filter(|g| *g == "*" || **g == call.group)
            {
                for resource in rule.resources.iter().filter(|r| resource_matches(r, call)) {
                    for rule_verb in rule.verbs.iter().filter(|v| *v == "*" || *v == verb) {
                        used.insert((
                            grant.role.clone(),
                            group.clone(),
                            resource.clone(),
                            rule_verb.clone(),
                        ));
                    }
                }
            }
        }
    }
    allowed
}

/// The requests `calls` makes that `grants` do not allow, as sorted lines with counts.
fn denied(grants: &[Grant], calls: &[Call], used: &mut BTreeSet<Permission>) -> Vec<String> {
    let mut out: BTreeMap<String, usize> = BTreeMap::new();
    for call in calls {
        for verb in call.verbs() {
            if !authorize(grants, call, verb, used) {
                *out.entry(call.summary(verb)).or_default() += 1;
            }
        }
    }
    out.into_iter()
        .map(|(line, n)| format!("  {line}  ({n}x)"))
        .collect()
}

/// The operator's resource requests in the audit log.
fn operator_calls(audit: &Path) -> Vec<Call> {
    let text = std::fs::read_to_string(audit)
        .unwrap_or_else(|e| panic!("cannot read the audit log {}: {e}", audit.display()));
    let mut calls = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let value: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("an audit line is not JSON ({e}): {line}"));
        let by_operator = value["userAgent"]
            .as_str()
            .is_some_and(|ua| ua.starts_with("multisite-operator/"));
        // Discovery and other non-resource URLs are open to every authenticated user.
        if by_operator && value.get("nonResourceURL").is_none() {
            calls.push(Call::from_line(&value));
        }
    }
    calls
}

// ---------------------------------------------------------------------------------
// Driving the operator
// ---------------------------------------------------------------------------------

struct Run {
    started: Instant,
    dir: PathBuf,
    // Dropped in this order on failure: the operator, then the cluster.
    operator: Option<Process>,
    dev: Process,
    runtime: tokio::runtime::Runtime,
}

impl Run {
    /// Time left before [`TEST_LIMIT`], at most `limit`.
    fn budget(&self, limit: Duration) -> Duration {
        limit.min(TEST_LIMIT.saturating_sub(self.started.elapsed()))
    }

    fn alive(&mut self) {
        if let Err(e) = self.dev.check_running() {
            panic!("{e}");
        }
        if let Some(operator) = self.operator.as_mut()
            && let Err(e) = operator.check_running()
        {
            panic!("{e}");
        }
    }

    /// Polls `probe` until it answers `Ok`, failing after `limit` with `what` and the
    /// last state it described (its `Err`).
    fn wait_until<T>(
        &mut self,
        what: &str,
        limit: Duration,
        mut probe: impl FnMut(&tokio::runtime::Runtime) -> Result<T, String>,
    ) -> T {
        let limit = self.budget(limit);
        let start = Instant::now();
        loop {
            self.alive();
            let last = match probe(&self.runtime) {
                Ok(found) => return found,
                Err(state) => state,
            };
            if start.elapsed() >= limit {
                let operator_log = self
                    .operator
                    .as_ref()
                    .map(|o| tail(&o.log, 30))
                    .unwrap_or_default();
                panic!(
                    "timed out after {limit:?} waiting until {what}; last seen: {last}\n\
                     --- operator log (last lines) ---\n{operator_log}\n\
                     --- dev up log (last lines) ---\n{}\n(state kept in {})",
                    tail(&self.dev.log, 15),
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

async fn client_for(kubeconfig: &Path) -> Result<kube::Client, String> {
    let config = Kubeconfig::read_from(kubeconfig).map_err(|e| e.to_string())?;
    let config = kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

fn phases(replicas: &[Replica]) -> BTreeMap<String, String> {
    replicas
        .iter()
        .map(|r| {
            let value = serde_json::to_value(r).unwrap_or_default();
            (
                r.metadata.name.clone().unwrap_or_default(),
                value["status"]["phase"]
                    .as_str()
                    .unwrap_or("(none)")
                    .to_string(),
            )
        })
        .collect()
}

/// Runs the dev cluster and the operator through the operator's paths; returns the
/// audit log once both processes stopped.
fn exercise_operator(dir: &Path, started: Instant) -> PathBuf {
    let manifest = dir.join("fleet.yaml");
    std::fs::write(&manifest, MANIFEST).expect("write the manifest");
    let audit = dir.join("audit.jsonl");
    let kubeconfig = dir.join("kubeconfig");
    let mut dev_command = Command::new(BIN);
    dev_command
        .args(["dev", "up", "--stand-in", "--no-operator", "--dir"])
        .arg(dir)
        .arg("--audit-log")
        .arg(&audit)
        .args(["--first-pod-address", FIRST_POD_ADDRESS, "-f"])
        .arg(&manifest)
        .current_dir(dir);
    let dev = Process::start("multisite dev up", dev_command, dir.join("dev-up.log"));
    let mut run = Run {
        started,
        dir: dir.to_path_buf(),
        operator: None,
        dev,
        runtime: tokio::runtime::Runtime::new().expect("a tokio runtime"),
    };

    // The cluster is up once the manifests are applied: both Replicas are stored.
    let client = run.wait_until(
        "dev up wrote its kubeconfig and applied the manifest",
        Duration::from_secs(30),
        |rt| {
            if !kubeconfig.exists() {
                return Err("no kubeconfig yet".into());
            }
            rt.block_on(async {
                let client = client_for(&kubeconfig).await?;
                let replicas: Api<Replica> = Api::namespaced(client.clone(), NAMESPACE);
                let listed = replicas
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| e.to_string())?;
                if listed.items.len() == 2 {
                    Ok(client)
                } else {
                    Err(format!("{} replicas stored", listed.items.len()))
                }
            })
        },
    );

    let mut operator_command = Command::new(BIN);
    operator_command
        .args([
            "operator",
            "--leader-election",
            "--lease-namespace",
            RELEASE_NAMESPACE,
            "--identity",
            "rbac-test",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("POD_NAMESPACE")
        .env_remove("POD_NAME")
        .env_remove("MULTISITE_IMAGE")
        .current_dir(dir);
    run.operator = Some(Process::start(
        "multisite operator",
        operator_command,
        dir.join("operator.log"),
    ));

    let replicas: Api<Replica> = Api::namespaced(client.clone(), NAMESPACE);
    let families: Api<ReplicaFamily> = Api::namespaced(client.clone(), NAMESPACE);
    let packages: Api<SchemaPackage> = Api::namespaced(client.clone(), NAMESPACE);

    // 1. The operator bootstraps both replicas (StatefulSets, Services, the family
    // Secret, pod reads, status writes, events) until they are Active.
    run.wait_until("both Replicas are Active", Duration::from_secs(60), |rt| {
        let listed = rt
            .block_on(replicas.list(&ListParams::default()))
            .map_err(|e| e.to_string())?;
        let phases = phases(&listed.items);
        if phases.len() == 2 && phases.values().all(|p| p == "Active") {
            Ok(())
        } else {
            Err(format!("{phases:?}"))
        }
    });

    // 2. A full sync asked for by annotation: the operator takes the annotation away.
    let annotate = json!({"metadata": {"annotations": {"multisite.dev/sync-now": "full"}}});
    run.runtime
        .block_on(families.patch(FAMILY, &PatchParams::default(), &Patch::Merge(&annotate)))
        .expect("annotate the family");
    run.wait_until(
        "the operator took the sync-now annotation",
        Duration::from_secs(20),
        |rt| {
            let family = rt
                .block_on(families.get(FAMILY))
                .map_err(|e| e.to_string())?;
            match family
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("multisite.dev/sync-now"))
            {
                None => Ok(()),
                Some(value) => Err(format!("annotation still {value:?}")),
            }
        },
    );

    // 3. A schema package: the operator validates it and writes its status.
    let package: SchemaPackage = serde_json::from_value(json!({
        "apiVersion": "multisite.dev/v1alpha1",
        "kind": "SchemaPackage",
        "metadata": {"name": "interop", "namespace": NAMESPACE},
        "spec": {
            "family": FAMILY,
            "package": "Interop",
            "version": "1.0",
            "recordTypes": [{"name": "ChangeEvent", "fields": [{"name": "record", "type": "String"}]}],
        },
    }))
    .expect("a SchemaPackage");
    run.runtime
        .block_on(packages.create(&PostParams::default(), &package))
        .expect("create the SchemaPackage");
    run.wait_until(
        "the operator wrote the SchemaPackage's status",
        Duration::from_secs(20),
        |rt| {
            let package = rt
                .block_on(packages.get("interop"))
                .map_err(|e| e.to_string())?;
            let value = serde_json::to_value(&package).unwrap_or_default();
            if value["status"]["observedGeneration"].is_i64() {
                Ok(())
            } else {
                Err(format!("status {}", value["status"]))
            }
        },
    );

    // 4. A replica removed through the removal workflow: its mastership moves to the
    // gateway's replica, then its finalizer is released.
    let gone = |run: &mut Run, replica: &str| {
        run.wait_until(
            &format!("Replica {replica} is gone"),
            Duration::from_secs(40),
            |rt| match rt.block_on(replicas.get_opt(replica)) {
                Ok(None) => Ok(()),
                Ok(Some(left)) => Err(format!("still there: {:?}", phases(&[left]))),
                Err(e) => Err(e.to_string()),
            },
        );
    };
    run.runtime
        .block_on(replicas.delete(REMOVED, &DeleteParams::default()))
        .expect("delete a Replica");
    gone(&mut run, REMOVED);

    // 5. The last replica removed with the force-remove annotation: the operator
    // deletes its StatefulSet, Service and volume claim itself.
    let force = json!({"metadata": {"annotations": {"multisite.dev/force-remove": "true"}}});
    run.runtime
        .block_on(replicas.patch(KEPT, &PatchParams::default(), &Patch::Merge(&force)))
        .expect("annotate the last Replica");
    run.runtime
        .block_on(replicas.delete(KEPT, &DeleteParams::default()))
        .expect("delete the last Replica");
    gone(&mut run, KEPT);

    // Stop the operator first, so all its requests are in the log, then the cluster.
    let mut operator = run.operator.take().expect("the operator runs");
    let status = operator.stop(run.budget(Duration::from_secs(20)));
    assert!(
        status.success(),
        "the operator did not stop cleanly ({status}):\n{}",
        tail(&operator.log, 30)
    );
    let status = run.dev.stop(run.budget(Duration::from_secs(30)));
    assert!(
        status.success(),
        "dev up did not stop cleanly ({status}):\n{}",
        tail(&run.dev.log, 30)
    );
    audit
}

// ---------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------

fn counts(calls: &[Call]) -> BTreeMap<(String, String, String), usize> {
    let mut out = BTreeMap::new();
    for call in calls {
        *out.entry((call.verb.clone(), call.group.clone(), call.full_resource()))
            .or_default() += 1;
    }
    out
}

#[test]
fn the_charts_rbac_allows_every_request_the_operator_makes() {
    if !helm_ready() {
        return;
    }
    let started = Instant::now();
    // Render first: a broken chart fails before any process starts.
    let cluster_wide = render(&[]);
    let per_namespace = render(&[&format!("watchNamespaces={{{NAMESPACE}}}")]);
    let cluster_grants = grants(&cluster_wide);
    let namespace_grants = grants(&per_namespace);

    let dir = std::env::temp_dir().join(format!("multisite-rbac-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the test directory");
    let audit = exercise_operator(&dir, started);
    let calls = operator_calls(&audit);

    // What the operator called, for the record.
    let mut report = String::from("requests the operator made (verb, group, resource: count):\n");
    for ((verb, group, resource), n) in counts(&calls) {
        let group = if group.is_empty() { "core" } else { &group };
        report.push_str(&format!("  {verb:<16} {group:<20} {resource:<28} {n}\n"));
    }
    eprintln!("{report}");

    // The Replica, family and Site controllers share one watch of the Replicas, so they
    // are watched (and listed) no more often than the families, each watched once by
    // their own controller (a watch the server ends is started again in both).
    let count = |verb: &str, resource: &str| {
        calls
            .iter()
            .filter(|c| c.verb == verb && c.resource == resource && c.subresource.is_none())
            .count()
    };
    for verb in ["list", "watch"] {
        let (replicas, families) = (count(verb, "replicas"), count(verb, "replicafamilies"));
        assert!(
            replicas >= 1 && replicas <= families,
            "{verb} of replicas: {replicas}, of replicafamilies: {families}; \
             the controllers should share one Replica watch\n{report}"
        );
    }

    // The run went through the paths it was meant to: no vacuous pass.
    let seen = counts(&calls);
    let saw = |verb: &str, group: &str, resource: &str| {
        seen.contains_key(&(verb.to_string(), group.to_string(), resource.to_string()))
    };
    for (verb, group, resource) in [
        ("watch", "multisite.dev", "replicas"),
        ("patch", "multisite.dev", "replicas/status"),
        ("patch", "multisite.dev", "replicafamilies"),
        ("patch", "multisite.dev", "schemapackages/status"),
        ("patch", "apps", "statefulsets"),
        ("delete", "apps", "statefulsets"),
        ("delete", "", "services"),
        ("delete", "", "persistentvolumeclaims"),
        ("get", "coordination.k8s.io", "leases"),
        ("create", "coordination.k8s.io", "leases"),
    ] {
        assert!(
            saw(verb, group, resource),
            "the operator never made `{verb}` on {group}/{resource}; the run did not exercise it\n{report}"
        );
    }
    assert!(
        calls
            .iter()
            .any(|c| c.resource == "leases" && c.namespace.as_deref() == Some(RELEASE_NAMESPACE)),
        "the Lease requests were not in {RELEASE_NAMESPACE}"
    );

    // Every request is allowed by the chart's default (all namespaces) rules.
    let mut used = BTreeSet::new();
    let refused = denied(&cluster_grants, &calls, &mut used);
    assert!(
        refused.is_empty(),
        "the chart's RBAC (default values) does not allow these operator requests \
         (verb, group, resource, namespace):\n{}\ngrants: {:#?}",
        refused.join("\n"),
        cluster_grants
            .iter()
            .map(|g| g.role.as_str())
            .collect::<Vec<_>>()
    );

    // What the chart grants that this run never used: information, not a failure.
    let mut unused: Vec<String> = Vec::new();
    for grant in &cluster_grants {
        for rule in &grant.rules {
            for group in &rule.groups {
                for resource in &rule.resources {
                    for verb in &rule.verbs {
                        let key = (
                            grant.role.clone(),
                            group.clone(),
                            resource.clone(),
                            verb.clone(),
                        );
                        if !used.contains(&key) {
                            let group = if group.is_empty() { "core" } else { group };
                            unused.push(format!(
                                "  {:<45} {verb:<8} {group:<20} {resource}",
                                grant.role
                            ));
                        }
                    }
                }
            }
        }
    }
    eprintln!(
        "granted by the chart but not used in this run (information only; other paths \
         such as upgrades, pod restarts and client tiers may use them):\n{}",
        unused.join("\n")
    );

    // With watchNamespaces the chart gives, in each watched namespace, a Role with the
    // ClusterRole's rules; the Lease Role stays in the release namespace.
    let cluster_role = cluster_wide
        .iter()
        .find(|d| kind(d) == "ClusterRole")
        .expect("a ClusterRole with default values");
    assert!(
        !per_namespace.iter().any(|d| kind(d) == "ClusterRole"),
        "watchNamespaces still renders a ClusterRole"
    );
    let namespace_role = per_namespace
        .iter()
        .find(|d| {
            kind(d) == "Role"
                && name(d) == name(cluster_role)
                && d["metadata"]["namespace"].as_str() == Some(NAMESPACE)
        })
        .unwrap_or_else(|| panic!("no Role {} in {NAMESPACE}", name(cluster_role)));
    assert_eq!(
        permission_set(&rules_of(namespace_role)),
        permission_set(&rules_of(cluster_role)),
        "the Role in a watched namespace must grant what the ClusterRole grants"
    );
    // The requests made inside a namespace are allowed by those Roles too (the
    // all-namespaces lists and watches of this run are not: an operator limited to
    // namespaces watches in each of them instead).
    let namespaced: Vec<Call> = calls
        .iter()
        .filter(|c| c.namespace.is_some())
        .cloned()
        .collect();
    let refused = denied(&namespace_grants, &namespaced, &mut BTreeSet::new());
    assert!(
        refused.is_empty(),
        "with watchNamespaces={{{NAMESPACE}}} the chart's Roles do not allow these \
         requests the operator made in a namespace:\n{}",
        refused.join("\n")
    );

    let elapsed = started.elapsed();
    eprintln!("{} operator requests checked in {elapsed:.1?}", calls.len());
    assert!(
        elapsed < TEST_LIMIT + Duration::from_secs(10),
        "the test took {elapsed:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

mod authorizer {
    use super::*;

    fn call(verb: &str, group: &str, resource: &str, sub: Option<&str>, ns: Option<&str>) -> Call {
        Call {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            subresource: sub.map(str::to_string),
            namespace: ns.map(str::to_string),
            name: Some("x".into()),
            code: 200,
        }
    }

    fn grant(
        namespace: Option<&str>,
        groups: &[&str],
        resources: &[&str],
        verbs: &[&str],
    ) -> Grant {
        let own = |items: &[&str]| items.iter().map(|s| s.to_string()).collect();
        Grant {
            role: "test".into(),
            namespace: namespace.map(str::to_string),
            rules: vec![Rule {
                groups: own(groups),
                resources: own(resources),
                verbs: own(verbs),
                names: Vec::new(),
            }],
        }
    }

    fn allowed(grants: &[Grant], call: &Call) -> bool {
        call.verbs()
            .into_iter()
            .all(|verb| authorize(grants, call, verb, &mut BTreeSet::new()))
    }

    #[test]
    fn rules_match_group_resource_subresource_and_verb() {
        let grants = [grant(None, &["apps"], &["statefulsets"], &["get", "patch"])];
        assert!(allowed(
            &grants,
            &call("get", "apps", "statefulsets", None, Some("t"))
        ));
        assert!(!allowed(
            &grants,
            &call("delete", "apps", "statefulsets", None, Some("t"))
        ));
        assert!(!allowed(
            &grants,
            &call("get", "", "statefulsets", None, Some("t"))
        ));
        assert!(
            !allowed(
                &grants,
                &call("patch", "apps", "statefulsets", Some("status"), None)
            ),
            "a subresource needs its own rule"
        );
        let wild = [grant(None, &["*"], &["*/status"], &["*"])];
        assert!(allowed(
            &wild,
            &call("patch", "apps", "statefulsets", Some("status"), None)
        ));
        assert!(!allowed(
            &wild,
            &call("patch", "apps", "statefulsets", None, None)
        ));
    }

    #[test]
    fn roles_apply_in_their_namespace_only() {
        let grants = [grant(Some("ns"), &[""], &["pods"], &["list"])];
        assert!(allowed(
            &grants,
            &call("list", "", "pods", None, Some("ns"))
        ));
        assert!(!allowed(
            &grants,
            &call("list", "", "pods", None, Some("other"))
        ));
        assert!(!allowed(&grants, &call("list", "", "pods", None, None)));
    }

    #[test]
    fn an_apply_that_creates_needs_create_too() {
        let grants = [grant(None, &["apps"], &["statefulsets"], &["patch"])];
        let mut created = call("patch", "apps", "statefulsets", None, Some("t"));
        assert!(allowed(&grants, &created));
        created.code = 201;
        assert!(!allowed(&grants, &created));
    }
}
