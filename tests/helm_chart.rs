//! Checks the Helm chart `charts/multisite-operator` with Helm's own engine.
//!
//! `scripts/helm.py` drives Helm's Go library (the PyPI package helm-sdkpy) to lint the
//! chart and render it in several configurations; these tests parse the rendered
//! manifests and check what the chart promises: the objects each configuration
//! produces, least-privilege RBAC without wildcards, a hardened Deployment running
//! `multisite operator`, the optional ServiceMonitor, and CRDs identical to `crds/`.
//!
//! helm-sdkpy must be installed (`python3 -m pip install --ignore-requires-python
//! helm-sdkpy`). Without it these tests fail, unless MULTISITE_SKIP_HELM=1 is set.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

const INSTALL_COMMAND: &str = "python3 -m pip install --ignore-requires-python helm-sdkpy";
const RELEASE: &str = "ms";
const NAMESPACE: &str = "multisite-system";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart_dir() -> PathBuf {
    root().join("charts").join("multisite-operator")
}

/// False (after a loud line on stderr) when MULTISITE_SKIP_HELM=1. Otherwise panics
/// unless python3 can import helm_sdkpy.
fn helm_ready(test: &str) -> bool {
    if std::env::var("MULTISITE_SKIP_HELM").as_deref() == Ok("1") {
        eprintln!(
            "\n########## SKIPPED {test}: MULTISITE_SKIP_HELM=1 is set, so the Helm chart was NOT checked ##########\n"
        );
        return false;
    }
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    let check = CHECK.get_or_init(|| {
        match Command::new("python3").args(["-c", "import helm_sdkpy"]).output() {
            Err(err) => Err(format!(
                "cannot run python3 ({err}). The Helm chart tests need Python 3 with helm-sdkpy: \
                 install Python 3, then `{INSTALL_COMMAND}` (or set MULTISITE_SKIP_HELM=1 to skip them)"
            )),
            Ok(out) if !out.status.success() => Err(format!(
                "python3 cannot import helm_sdkpy, which the Helm chart tests use to run Helm's engine.\n\
                 Install it with:\n    {INSTALL_COMMAND}\n\
                 (or set MULTISITE_SKIP_HELM=1 to skip these tests).\npython3 said: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Ok(_) => Ok(()),
        }
    });
    if let Err(message) = check {
        panic!("{message}");
    }
    true
}

/// Runs `python3 scripts/helm.py ARGS...` from the crate root.
fn helm_py(args: &[&str]) -> Output {
    Command::new("python3")
        .arg(root().join("scripts").join("helm.py"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("cannot run python3 scripts/helm.py")
}

fn describe(output: &Output) -> String {
    format!(
        "exit status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Renders the chart with `--set` expressions and returns its documents.
fn render(sets: &[&str]) -> Vec<Value> {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        chart.to_str().expect("chart path is UTF-8"),
        "--namespace",
        NAMESPACE,
        "--release",
        RELEASE,
    ];
    for set in sets {
        args.push("--set");
        args.push(set);
    }
    let output = helm_py(&args);
    assert!(
        output.status.success(),
        "helm.py template {sets:?} failed\n{}",
        describe(&output)
    );
    let text = String::from_utf8(output.stdout).expect("rendered manifests are UTF-8");
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|err| panic!("rendered manifests are not YAML: {err}\n{text}"));
    assert!(
        !docs.is_empty(),
        "helm.py template {sets:?} printed no manifests"
    );
    for doc in &docs {
        assert!(
            doc.get("kind").and_then(Value::as_str).is_some(),
            "a rendered document has no kind: {doc}"
        );
    }
    docs
}

/// Chart defaults, rendered once and shared by the tests.
fn default_render() -> &'static [Value] {
    static DOCS: OnceLock<Vec<Value>> = OnceLock::new();
    DOCS.get_or_init(|| render(&[]))
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn namespace(doc: &Value) -> Option<&str> {
    doc["metadata"]["namespace"].as_str()
}

fn of_kind<'a>(docs: &'a [Value], wanted: &str) -> Vec<&'a Value> {
    docs.iter().filter(|doc| kind(doc) == wanted).collect()
}

fn kind_counts(docs: &[Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for doc in docs {
        *counts.entry(kind(doc).to_string()).or_insert(0) += 1;
    }
    counts
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|items| items.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

type Permission = (String, String, String);

/// A role's rules as (apiGroup, resource, verb) triples, so that two roles granting
/// the same permissions compare equal however their rules are grouped.
fn permissions(role: &Value) -> BTreeSet<Permission> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().expect("a role has rules") {
        assert!(
            rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(),
            "unexpected rule shape in {}: {rule}",
            role["metadata"]["name"]
        );
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    out.insert((group.to_string(), resource.to_string(), verb.to_string()));
                }
            }
        }
    }
    out
}

fn grant(out: &mut BTreeSet<Permission>, group: &str, resources: &[&str], verbs: &[&str]) {
    for resource in resources {
        for verb in verbs {
            out.insert((group.to_string(), resource.to_string(), verb.to_string()));
        }
    }
}

/// What the operator may do in the namespaces it watches, and nothing more.
fn expected_operator_permissions() -> BTreeSet<Permission> {
    let kinds = ["replicafamilies", "sites", "replicas", "schemapackages"];
    let status: Vec<String> = kinds.iter().map(|k| format!("{k}/status")).collect();
    let finalizers: Vec<String> = kinds.iter().map(|k| format!("{k}/finalizers")).collect();
    let mut out = BTreeSet::new();
    grant(
        &mut out,
        "multisite.dev",
        &kinds,
        &["get", "list", "watch", "patch", "update"],
    );
    grant(
        &mut out,
        "multisite.dev",
        &status.iter().map(String::as_str).collect::<Vec<_>>(),
        &["get", "patch", "update"],
    );
    grant(
        &mut out,
        "multisite.dev",
        &finalizers.iter().map(String::as_str).collect::<Vec<_>>(),
        &["update"],
    );
    grant(
        &mut out,
        "apps",
        &["statefulsets", "deployments"],
        &[
            "get", "list", "watch", "create", "patch", "update", "delete",
        ],
    );
    grant(
        &mut out,
        "",
        &["services", "persistentvolumeclaims"],
        &["get", "list", "watch", "create", "patch", "delete"],
    );
    grant(
        &mut out,
        "",
        &["secrets"],
        &["get", "list", "watch", "create", "patch"],
    );
    grant(&mut out, "", &["pods"], &["get", "list", "watch", "delete"]);
    grant(&mut out, "", &["events"], &["create", "patch"]);
    grant(&mut out, "events.k8s.io", &["events"], &["create", "patch"]);
    out
}

fn expected_lease_permissions() -> BTreeSet<Permission> {
    let mut out = BTreeSet::new();
    grant(
        &mut out,
        "coordination.k8s.io",
        &["leases"],
        &["get", "create", "update"],
    );
    out
}

fn fullname() -> String {
    format!("{RELEASE}-multisite-operator")
}

fn leader_election_role(docs: &[Value]) -> Option<&Value> {
    let name = format!("{}-leader-election", fullname());
    docs.iter()
        .find(|doc| kind(doc) == "Role" && doc["metadata"]["name"].as_str() == Some(name.as_str()))
}

/// No rule of any Role or ClusterRole uses "*".
fn assert_no_wildcards(docs: &[Value]) {
    for role in docs
        .iter()
        .filter(|doc| matches!(kind(doc), "Role" | "ClusterRole"))
    {
        for rule in role["rules"].as_array().expect("a role has rules") {
            for field in ["apiGroups", "resources", "verbs"] {
                assert!(
                    !strings(&rule[field]).iter().any(|item| item.contains('*')),
                    "{} {} uses a wildcard in {field}: {rule}",
                    kind(role),
                    role["metadata"]["name"]
                );
            }
        }
    }
}

/// Every binding gives its role to the operator's ServiceAccount in the release namespace.
fn assert_bindings_target_operator(docs: &[Value]) {
    for binding in docs
        .iter()
        .filter(|doc| matches!(kind(doc), "RoleBinding" | "ClusterRoleBinding"))
    {
        let subjects = binding["subjects"]
            .as_array()
            .expect("a binding has subjects");
        assert_eq!(
            subjects.len(),
            1,
            "binding {} has several subjects",
            binding["metadata"]["name"]
        );
        assert_eq!(subjects[0]["kind"], "ServiceAccount");
        assert_eq!(subjects[0]["name"].as_str(), Some(fullname().as_str()));
        assert_eq!(subjects[0]["namespace"], NAMESPACE);
        let role_name = binding["roleRef"]["name"].as_str().expect("roleRef.name");
        let role_kind = if kind(binding) == "ClusterRoleBinding" {
            "ClusterRole"
        } else {
            "Role"
        };
        assert_eq!(binding["roleRef"]["kind"], role_kind);
        let role_exists = docs.iter().any(|doc| {
            kind(doc) == role_kind
                && doc["metadata"]["name"].as_str() == Some(role_name)
                && namespace(doc) == namespace(binding)
        });
        assert!(
            role_exists,
            "binding {} refers to a {role_kind} {role_name} the chart does not render",
            binding["metadata"]["name"]
        );
    }
}

fn deployment(docs: &[Value]) -> &Value {
    let deployments = of_kind(docs, "Deployment");
    assert_eq!(deployments.len(), 1, "expected exactly one Deployment");
    deployments[0]
}

fn operator_container(docs: &[Value]) -> &Value {
    let containers = deployment(docs)["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "the operator pod has one container");
    &containers[0]
}

fn args(docs: &[Value]) -> Vec<String> {
    strings(&operator_container(docs)["args"])
        .into_iter()
        .map(str::to_string)
        .collect()
}

fn read_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
    serde_saphyr::from_str(&text)
        .unwrap_or_else(|err| panic!("{} is not YAML: {err}", path.display()))
}

#[test]
fn chart_lints_clean() {
    if !helm_ready("chart_lints_clean") {
        return;
    }
    let chart = chart_dir();
    let chart = chart.to_str().expect("chart path is UTF-8");
    let configurations: [&[&str]; 3] = [
        &[],
        &["--set", "watchNamespaces={team-a,team-b}"],
        &["--set", "metrics.serviceMonitor.enabled=true"],
    ];
    for extra in configurations {
        let mut args = vec!["lint", chart, "--namespace", NAMESPACE];
        args.extend_from_slice(extra);
        let output = helm_py(&args);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "helm lint {extra:?} found errors\n{}",
            describe(&output)
        );
        assert!(
            !stdout.contains("[ERROR]") && !stdout.contains("[WARNING]"),
            "helm lint {extra:?} reported problems\n{}",
            describe(&output)
        );
        assert!(
            stdout.contains("0 error(s), 0 warning(s)"),
            "unexpected lint summary\n{}",
            describe(&output)
        );
    }
}

#[test]
fn lint_fails_on_bad_values_with_helms_message() {
    if !helm_ready("lint_fails_on_bad_values_with_helms_message") {
        return;
    }
    let chart = chart_dir();
    let output = helm_py(&["lint", chart.to_str().unwrap(), "--set", "logFormat=xml"]);
    assert!(
        !output.status.success(),
        "lint accepted logFormat=xml\n{}",
        describe(&output)
    );
    let all = describe(&output);
    assert!(
        all.contains("logFormat"),
        "the lint output does not say which value is wrong\n{all}"
    );
}

#[test]
fn default_values_render_cluster_wide_rbac() {
    if !helm_ready("default_values_render_cluster_wide_rbac") {
        return;
    }
    let docs = default_render();
    let counts = kind_counts(docs);
    let expected: BTreeMap<String, usize> = [
        ("ServiceAccount", 1),
        ("ClusterRole", 1),
        ("ClusterRoleBinding", 1),
        ("Role", 1),
        ("RoleBinding", 1),
        ("Service", 1),
        ("Deployment", 1),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_string(), n))
    .collect();
    assert_eq!(counts, expected, "objects rendered with default values");

    let cluster_role = of_kind(docs, "ClusterRole")[0];
    assert_eq!(
        permissions(cluster_role),
        expected_operator_permissions(),
        "ClusterRole permissions"
    );

    let lease_role = leader_election_role(docs).expect("a leader-election Role");
    assert_eq!(
        namespace(lease_role),
        Some(NAMESPACE),
        "the Lease Role lives in the release namespace"
    );
    assert_eq!(
        permissions(lease_role),
        expected_lease_permissions(),
        "leader-election Role permissions"
    );

    for doc in docs
        .iter()
        .filter(|doc| !matches!(kind(doc), "ClusterRole" | "ClusterRoleBinding"))
    {
        assert_eq!(
            namespace(doc),
            Some(NAMESPACE),
            "{} {} is not in the release namespace",
            kind(doc),
            doc["metadata"]["name"]
        );
    }
    assert_no_wildcards(docs);
    assert_bindings_target_operator(docs);
    assert!(
        !args(docs)
            .iter()
            .any(|arg| arg.starts_with("--watch-namespaces")),
        "no --watch-namespaces when watching every namespace"
    );
}

#[test]
fn watched_namespaces_get_a_role_each() {
    if !helm_ready("watched_namespaces_get_a_role_each") {
        return;
    }
    let docs = render(&["watchNamespaces={team-a,team-b}"]);
    assert!(
        of_kind(&docs, "ClusterRole").is_empty(),
        "no ClusterRole when namespaces are listed"
    );
    assert!(
        of_kind(&docs, "ClusterRoleBinding").is_empty(),
        "no ClusterRoleBinding when namespaces are listed"
    );

    let name = fullname();
    for watched in ["team-a", "team-b"] {
        let roles: Vec<_> = of_kind(&docs, "Role")
            .into_iter()
            .filter(|role| namespace(role) == Some(watched))
            .collect();
        assert_eq!(roles.len(), 1, "one Role in {watched}");
        assert_eq!(roles[0]["metadata"]["name"].as_str(), Some(name.as_str()));
        assert_eq!(
            permissions(roles[0]),
            expected_operator_permissions(),
            "Role permissions in {watched}"
        );
        let bindings: Vec<_> = of_kind(&docs, "RoleBinding")
            .into_iter()
            .filter(|binding| namespace(binding) == Some(watched))
            .collect();
        assert_eq!(bindings.len(), 1, "one RoleBinding in {watched}");
    }
    let lease_role = leader_election_role(&docs).expect("a leader-election Role");
    assert_eq!(namespace(lease_role), Some(NAMESPACE));
    assert_eq!(permissions(lease_role), expected_lease_permissions());
    assert_eq!(
        of_kind(&docs, "Role").len(),
        3,
        "a Role per watched namespace plus the Lease Role"
    );
    assert_eq!(
        of_kind(&docs, "RoleBinding").len(),
        3,
        "a RoleBinding per Role"
    );

    assert_no_wildcards(&docs);
    assert_bindings_target_operator(&docs);
    assert!(
        args(&docs).contains(&"--watch-namespaces=team-a,team-b".to_string()),
        "the operator is told which namespaces to watch: {:?}",
        args(&docs)
    );
}

#[test]
fn deployment_runs_the_operator_hardened() {
    if !helm_ready("deployment_runs_the_operator_hardened") {
        return;
    }
    let docs = default_render();
    let values = read_yaml(&chart_dir().join("values.yaml"));
    let chart = read_yaml(&chart_dir().join("Chart.yaml"));
    let container = operator_container(docs);

    let repository = values["image"]["repository"]
        .as_str()
        .expect("image.repository");
    let app_version = chart["appVersion"].as_str().expect("appVersion");
    assert_eq!(
        container["image"].as_str(),
        Some(format!("{repository}:{app_version}").as_str())
    );
    assert_eq!(container["imagePullPolicy"], values["image"]["pullPolicy"]);

    let args = args(docs);
    assert_eq!(
        args.first().map(String::as_str),
        Some("operator"),
        "args start with the role: {args:?}"
    );
    for expected in [
        "--leader-election",
        "--log-format=text",
        "--metrics-addr=0.0.0.0:8080",
    ] {
        assert!(
            args.iter().any(|arg| arg == expected),
            "{expected} missing from {args:?}"
        );
    }

    let env = container["env"].as_array().expect("env");
    for (name, field) in [
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_NAME", "metadata.name"),
    ] {
        let var = env
            .iter()
            .find(|var| var["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(
            var["valueFrom"]["fieldRef"]["fieldPath"], field,
            "{name} comes from the downward API"
        );
    }

    let ports = container["ports"].as_array().expect("ports");
    assert!(
        ports
            .iter()
            .any(|port| port["name"] == "http-metrics" && port["containerPort"] == 8080)
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(
        container["livenessProbe"]["httpGet"]["port"],
        "http-metrics"
    );
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(
        container["readinessProbe"]["httpGet"]["port"],
        "http-metrics"
    );
    assert!(
        container["resources"]["requests"].is_object()
            && container["resources"]["limits"].is_object()
    );

    let security = &container["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(strings(&security["capabilities"]["drop"]), vec!["ALL"]);
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    let pod_security = &deployment(docs)["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(pod_security["runAsNonRoot"], true);
    assert_eq!(pod_security["seccompProfile"]["type"], "RuntimeDefault");

    assert_eq!(deployment(docs)["spec"]["replicas"], 1);
    assert_eq!(
        deployment(docs)["spec"]["template"]["spec"]["serviceAccountName"].as_str(),
        Some(fullname().as_str())
    );
}

#[test]
fn values_change_the_operator_command_line() {
    if !helm_ready("values_change_the_operator_command_line") {
        return;
    }
    let docs = render(&[
        "image.repository=registry.example/multisite",
        "image.tag=9.9.9",
        "leaderElection.enabled=false",
        "logFormat=json",
        "metrics.port=9100",
        "sync.maxConcurrentIncremental=3",
    ]);
    assert_eq!(
        operator_container(&docs)["image"],
        "registry.example/multisite:9.9.9"
    );
    let args = args(&docs);
    assert_eq!(args.first().map(String::as_str), Some("operator"));
    assert!(
        !args.iter().any(|arg| arg == "--leader-election"),
        "leader election off: {args:?}"
    );
    assert!(
        args.iter().any(|arg| arg == "--log-format=json"),
        "{args:?}"
    );
    assert!(
        args.iter().any(|arg| arg == "--metrics-addr=0.0.0.0:9100"),
        "{args:?}"
    );
    for limit in ["--max-concurrent-full=1", "--max-concurrent-incremental=3"] {
        assert!(args.iter().any(|arg| arg == limit), "{limit}: {args:?}");
    }
    assert!(
        leader_election_role(&docs).is_none(),
        "no Lease Role without leader election"
    );
    assert_no_wildcards(&docs);

    let refused = helm_py(&[
        "template",
        chart_dir().to_str().unwrap(),
        "--set",
        "replicaCount=2,leaderElection.enabled=false",
    ]);
    assert!(
        !refused.status.success(),
        "two replicas without leader election must be refused"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("leaderElection.enabled"),
        "the refusal names the value to change\n{}",
        describe(&refused)
    );
}

#[test]
fn service_monitor_only_when_enabled() {
    if !helm_ready("service_monitor_only_when_enabled") {
        return;
    }
    assert!(
        of_kind(default_render(), "ServiceMonitor").is_empty(),
        "no ServiceMonitor by default"
    );

    let docs = render(&[
        "metrics.serviceMonitor.enabled=true",
        "metrics.serviceMonitor.labels.release=prometheus",
    ]);
    let monitors = of_kind(&docs, "ServiceMonitor");
    assert_eq!(monitors.len(), 1, "one ServiceMonitor when enabled");
    let monitor = monitors[0];
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(namespace(monitor), Some(NAMESPACE));
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "http-metrics");
    assert_eq!(endpoint["path"], "/metrics");

    // The monitor selects the metrics Service by labels the Service carries.
    let service = of_kind(&docs, "Service")[0];
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    for (key, value) in selector {
        assert_eq!(
            &service["metadata"]["labels"][key], value,
            "Service label {key}"
        );
    }
    assert!(
        service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|port| port["name"] == "http-metrics")
    );
    assert_no_wildcards(&docs);
}

#[test]
fn chart_crds_are_copies_of_generated_crds() {
    // Pure file comparison: needs no helm-sdkpy.
    let generated = root().join("crds");
    let shipped = chart_dir().join("crds");
    let list = |dir: &Path| -> BTreeSet<String> {
        if !dir.exists() {
            return BTreeSet::new();
        }
        std::fs::read_dir(dir)
            .unwrap_or_else(|err| panic!("cannot list {}: {err}", dir.display()))
            .map(|entry| {
                entry
                    .expect("directory entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .filter(|name| !name.starts_with('.'))
            .collect()
    };
    let generated_files = list(&generated);
    assert!(
        !generated_files.is_empty(),
        "crds/ is empty: it is generated from the Rust types by `multisite crd`; generate it, then copy it to charts/multisite-operator/crds/"
    );
    let shipped_files = list(&shipped);
    assert_eq!(
        shipped_files, generated_files,
        "charts/multisite-operator/crds/ must hold exactly the files of crds/: refresh it with `cp crds/*.yaml charts/multisite-operator/crds/`"
    );
    for name in &generated_files {
        let a = std::fs::read(generated.join(name)).expect("read crds/ file");
        let b = std::fs::read(shipped.join(name)).expect("read chart crds/ file");
        assert!(
            a == b,
            "charts/multisite-operator/crds/{name} differs from crds/{name}: refresh it with `cp crds/*.yaml charts/multisite-operator/crds/`"
        );
    }
}
