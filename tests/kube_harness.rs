//! The real Kubernetes control plane of `e2e/kube/` (kube-apiserver, kube-controller-manager,
//! kube-scheduler and etcd built from Kubernetes' Go modules), checked with real
//! clients: kubectl against the administrator's kubeconfig, and kube's client with the
//! node and ServiceAccount credentials the harness hands out.
//!
//! Every test is ignored by default and needs `MULTISITE_KUBE_STATE`, a state directory
//! where `e2e/kube/up.sh` started the control plane:
//!
//! ```sh
//! e2e/kube/up.sh /tmp/kube && MULTISITE_KUBE_STATE=/tmp/kube \
//!     cargo test --test kube_harness -- --ignored --test-threads=1; e2e/kube/down.sh /tmp/kube
//! ```
//!
//! Run without it, a test fails: it never passes by skipping. Each test works in
//! namespaces and on nodes of its own (names carry a per-run suffix) and removes them,
//! so a control plane can be reused across runs.

use k8s_openapi::api::authentication::v1::{SelfSubjectReview, TokenRequest, TokenReview};
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long one kubectl call may take.
const KUBECTL_LIMIT: Duration = Duration::from_secs(60);
/// How long the control plane has to act on something (schedule, create a pod, ...).
const ACT_LIMIT: Duration = Duration::from_secs(60);

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The state directory up.sh made; fails the test when there is none.
fn state() -> PathBuf {
    let dir = std::env::var_os("MULTISITE_KUBE_STATE").unwrap_or_else(|| {
        panic!(
            "MULTISITE_KUBE_STATE is not set: these tests need the real control plane; \
             start it with `e2e/kube/up.sh DIR` and run them with MULTISITE_KUBE_STATE=DIR"
        )
    });
    let dir = PathBuf::from(dir);
    for file in ["url", "kubeconfig", "pki/ca.crt", "pki/ca.key"] {
        assert!(
            dir.join(file).is_file(),
            "{} is not a state directory of e2e/kube/up.sh: {file} is missing",
            dir.display()
        );
    }
    dir
}

/// A name no other run or test uses: `prefix-<pid><time><counter>`.
fn unique(prefix: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("time")
        .as_millis();
    format!(
        "{prefix}-{}{:x}{}",
        std::process::id(),
        millis % 0xffffff,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `cmd` to its end or until `limit`, when it is killed and the test fails.
fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{shown} did not finish within {limit:?}; stderr: {}",
                text(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// kubectl with the given kubeconfig.
fn kubectl_as(kubeconfig: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new("kubectl");
    cmd.arg("--kubeconfig").arg(kubeconfig).args(args);
    run_bounded(cmd, KUBECTL_LIMIT)
}

/// kubectl as the administrator; the test fails unless it succeeds. Returns stdout.
fn kubectl(state: &Path, args: &[&str]) -> String {
    let out = kubectl_as(&state.join("kubeconfig"), args);
    assert!(
        out.status.success(),
        "kubectl {} failed ({}): {}",
        args.join(" "),
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn kubectl_json(state: &Path, args: &[&str]) -> Value {
    let out = kubectl(state, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl {args:?}: not JSON ({e}): {out}"))
}

/// Polls `check` until it gives a value or `limit` passes.
fn eventually<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

async fn eventually_async<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A namespace of the test's own, deleted (without waiting) when the test ends.
struct Namespace {
    state: PathBuf,
    name: String,
}

impl Namespace {
    fn new(state: &Path, prefix: &str) -> Namespace {
        let name = unique(prefix);
        kubectl(state, &["create", "namespace", &name]);
        Namespace {
            state: state.to_path_buf(),
            name,
        }
    }

    /// Waits for the controller manager to give the namespace its "default"
    /// ServiceAccount, which a pod needs.
    fn wait_default_service_account(&self) {
        eventually("the default ServiceAccount", ACT_LIMIT, || {
            kubectl_as(
                &self.state.join("kubeconfig"),
                &["get", "serviceaccount", "default", "-n", &self.name],
            )
            .status
            .success()
            .then_some(())
        });
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = kubectl_as(
            &self.state.join("kubeconfig"),
            &[
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ],
        );
    }
}

/// Node objects a test made, deleted when it ends.
struct Nodes {
    state: PathBuf,
    names: Vec<String>,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = kubectl_as(
                &self.state.join("kubeconfig"),
                &["delete", "node", name, "--wait=false", "--ignore-not-found"],
            );
        }
    }
}

/// Credentials for node `name`, minted by e2e/kube/node-credentials.sh; returns the
/// node's kubeconfig.
fn node_credentials(state: &Path, name: &str) -> PathBuf {
    let mut cmd = Command::new(Path::new(REPO).join("e2e/kube/node-credentials.sh"));
    cmd.arg(state).arg(name);
    let out = run_bounded(cmd, KUBECTL_LIMIT);
    assert!(
        out.status.success(),
        "node-credentials.sh {name}: {}",
        text(&out.stderr)
    );
    let kubeconfig = PathBuf::from(text(&out.stdout).trim());
    assert_eq!(
        kubeconfig,
        state.join("nodes").join(name).join("kubeconfig")
    );
    kubeconfig
}

async fn client_from(kubeconfig: &Path) -> kube::Client {
    let file = Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|e| panic!("read {}: {e}", kubeconfig.display()));
    let config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("kubeconfig {}: {e}", kubeconfig.display()));
    kube::Client::try_from(config).expect("a client")
}

/// A client of the control plane that authenticates with a bearer token only.
fn token_client(state: &Path, token: &str) -> kube::Client {
    let url = std::fs::read_to_string(state.join("url")).expect("url");
    let mut config = kube::Config::new(url.trim().parse().expect("a URL"));
    let ca = std::fs::read(state.join("pki/ca.crt")).expect("ca.crt");
    config.root_cert = Some(vec![pem_body(&ca)]);
    config.auth_info.token = Some(token.to_string().into());
    kube::Client::try_from(config).expect("a client")
}

/// The DER bytes of the first PEM block.
fn pem_body(pem: &[u8]) -> Vec<u8> {
    let pem = text(pem);
    let b64: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64_decode(&b64)
}

fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=' && !c.is_ascii_whitespace()) {
        let v = ALPHABET.iter().position(|a| *a == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// The HTTP status code of a refused request.
fn refused_code<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> u16 {
    match result {
        Err(kube::Error::Api(status)) => status.code,
        other => panic!("expected the API server to refuse, got {other:?}"),
    }
}

/// A Node object as a node agent registers itself: Ready, with room for pods.
fn node_object(name: &str, zone: &str) -> Node {
    let now = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "topology.kubernetes.io/zone": zone,
            },
        },
        "status": {
            "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
            "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "conditions": [{
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "ready",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }],
        },
    }))
    .expect("a Node")
}

#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn server_reports_the_pinned_version() {
    let state = state();
    let versions = std::fs::read_to_string(state.join("versions")).expect("versions");
    let pinned = versions
        .lines()
        .find_map(|l| l.strip_prefix("kubernetes "))
        .expect("a kubernetes line in versions")
        .to_string();
    let go_mod = std::fs::read_to_string(Path::new(REPO).join("e2e/kube/go.mod")).expect("go.mod");
    assert!(
        go_mod.contains(&format!("k8s.io/kubernetes {pinned}")),
        "the build ({pinned}) is of the version e2e/kube/go.mod pins"
    );
    let version = kubectl_json(&state, &["get", "--raw", "/version"]);
    assert_eq!(version["gitVersion"], pinned.as_str(), "{version}");
}

#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn kubectl_creates_a_namespace_and_a_secret() {
    let state = state();
    let ns = Namespace::new(&state, "kh-secret");
    // -v=8 shows the requests: kubectl sends the new Secret as protobuf, the encoding
    // Kubernetes' own components use, and the server takes it.
    let out = kubectl_as(
        &state.join("kubeconfig"),
        &[
            "create",
            "secret",
            "generic",
            "s",
            "--from-literal=a=b",
            "-n",
            &ns.name,
            "-v=8",
        ],
    );
    assert!(
        out.status.success(),
        "kubectl create secret: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("secret/s created"),
        "{}",
        text(&out.stdout)
    );
    let trace = text(&out.stderr);
    let post: Vec<&str> = trace
        .lines()
        .skip_while(|l| !(l.contains("POST ") && l.contains("/secrets")))
        .take_while(|l| !l.contains("Response Body"))
        .collect();
    assert!(
        post.iter().any(|l| l
            .trim_end()
            .ends_with("Content-Type: application/vnd.kubernetes.protobuf")),
        "the POST body is protobuf: {post:#?}"
    );
    assert!(
        post.iter()
            .any(|l| l.contains("Response Status: 201 Created")),
        "created: {post:#?}"
    );
    let secret = kubectl_json(
        &state,
        &["get", "secret", "s", "-n", &ns.name, "-o", "json"],
    );
    assert_eq!(secret["data"]["a"], "Yg==", "{secret}");
    assert_eq!(secret["type"], "Opaque");

    // Read back as protobuf too.
    let url = std::fs::read_to_string(state.join("url")).expect("url");
    let pki = state.join("pki");
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sf",
        "--max-time",
        "10",
        "-H",
        "Accept: application/vnd.kubernetes.protobuf",
    ])
    .arg("--cacert")
    .arg(pki.join("ca.crt"))
    .arg("--cert")
    .arg(pki.join("admin.crt"))
    .arg("--key")
    .arg(pki.join("admin.key"))
    .arg(format!(
        "{}/api/v1/namespaces/{}/secrets/s",
        url.trim(),
        ns.name
    ));
    let out = run_bounded(cmd, KUBECTL_LIMIT);
    assert!(out.status.success(), "curl: {}", text(&out.stderr));
    assert!(
        out.stdout.starts_with(b"k8s\0"),
        "a protobuf body starts with the magic k8s\\0: {:?}",
        &out.stdout[..out.stdout.len().min(16)]
    );
}

#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn server_side_apply_of_the_crds_by_two_field_managers() {
    let state = state();
    let crds = Path::new(REPO).join("crds");
    let crds = crds.to_str().expect("a UTF-8 path");
    let first = unique("kh-first");
    let second = unique("kh-second");
    kubectl(
        &state,
        &[
            "apply",
            "--server-side",
            "--field-manager",
            &first,
            "-f",
            crds,
        ],
    );
    // The same content from a second manager is no conflict: fields with equal values
    // are owned by both, so no --force-conflicts is needed.
    let out = kubectl_as(
        &state.join("kubeconfig"),
        &[
            "apply",
            "--server-side",
            "--field-manager",
            &second,
            "-f",
            crds,
        ],
    );
    assert!(
        out.status.success(),
        "a second manager applying the same content: {}",
        text(&out.stderr)
    );
    let names = [
        "replicafamilies.multisite.dev",
        "replicas.multisite.dev",
        "schemapackages.multisite.dev",
        "sites.multisite.dev",
    ];
    for name in names {
        kubectl(
            &state,
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                &format!("crd/{name}"),
            ],
        );
        let crd = kubectl_json(
            &state,
            &["get", "crd", name, "-o", "json", "--show-managed-fields"],
        );
        let managers: Vec<(String, String)> = crd["metadata"]["managedFields"]
            .as_array()
            .expect("managedFields")
            .iter()
            .map(|m| {
                (
                    m["manager"].as_str().unwrap_or("").to_string(),
                    m["operation"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        for m in [&first, &second] {
            assert!(
                managers.contains(&(m.clone(), "Apply".to_string())),
                "{name}: {m} is an Apply manager: {managers:?}"
            );
        }
    }

    // A different value from the second manager is a conflict with the first (409),
    // taken over with --force-conflicts. Shown on a ConfigMap of the test's own, so
    // the shared CRDs keep the content of crds/.
    let ns = Namespace::new(&state, "kh-apply");
    let dir = std::env::temp_dir().join(unique("kh-apply"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let manifest = |value: &str| {
        let file = dir.join(format!("{value}.yaml"));
        std::fs::write(
            &file,
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shared\n  namespace: {}\ndata:\n  key: {value}\n",
                ns.name
            ),
        )
        .expect("write");
        file.to_str().expect("a UTF-8 path").to_string()
    };
    let one = manifest("one");
    let two = manifest("two");
    kubectl(
        &state,
        &[
            "apply",
            "--server-side",
            "--field-manager",
            &first,
            "-f",
            &one,
        ],
    );
    kubectl(
        &state,
        &[
            "apply",
            "--server-side",
            "--field-manager",
            &second,
            "-f",
            &one,
        ],
    );
    let out = kubectl_as(
        &state.join("kubeconfig"),
        &[
            "apply",
            "--server-side",
            "--field-manager",
            &second,
            "-f",
            &two,
        ],
    );
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "a changed value owned by {first} is a conflict"
    );
    assert!(
        err.contains("conflict") && err.contains(&first) && err.contains(".data.key"),
        "the conflict names the other manager and the field: {err}"
    );
    kubectl(
        &state,
        &[
            "apply",
            "--server-side",
            "--field-manager",
            &second,
            "--force-conflicts",
            "-f",
            &two,
        ],
    );
    let cm = kubectl_json(
        &state,
        &[
            "get",
            "configmap",
            "shared",
            "-n",
            &ns.name,
            "-o",
            "json",
            "--show-managed-fields",
        ],
    );
    assert_eq!(cm["data"]["key"], "two");
    let owners: Vec<&str> = cm["metadata"]["managedFields"]
        .as_array()
        .expect("managedFields")
        .iter()
        .filter(|m| m["fieldsV1"]["f:data"]["f:key"].is_object())
        .filter_map(|m| m["manager"].as_str())
        .collect();
    assert_eq!(
        owners,
        [second.as_str()],
        "the forced apply took the field: {cm}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn rbac_refuses_a_service_account_until_a_role_binding() {
    let state = state();
    let ns = Namespace::new(&state, "kh-rbac");
    kubectl(
        &state,
        &["create", "serviceaccount", "reader", "-n", &ns.name],
    );
    kubectl(
        &state,
        &[
            "create",
            "secret",
            "generic",
            "s",
            "--from-literal=a=b",
            "-n",
            &ns.name,
        ],
    );
    let token = kubectl(&state, &["create", "token", "reader", "-n", &ns.name]);
    let token = token.trim();

    // A kubeconfig with the token alone (no client certificate to fall back on).
    let url = std::fs::read_to_string(state.join("url")).expect("url");
    let kubeconfig = std::env::temp_dir().join(format!("{}.kubeconfig", unique("kh-rbac")));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\n",
            url.trim(),
            state.join("pki/ca.crt").display()
        ),
    )
    .expect("write kubeconfig");

    let out = kubectl_as(&kubeconfig, &["get", "secrets", "-n", &ns.name]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "listing secrets without a binding");
    let user = format!("system:serviceaccount:{}:reader", ns.name);
    assert!(
        err.contains("(Forbidden)")
            && err.contains(&user)
            && err.contains("cannot list resource \"secrets\""),
        "refused as Forbidden (403), naming the ServiceAccount: {err}"
    );

    kubectl(
        &state,
        &[
            "create",
            "role",
            "secret-reader",
            "--verb=get,list",
            "--resource=secrets",
            "-n",
            &ns.name,
        ],
    );
    kubectl(
        &state,
        &[
            "create",
            "rolebinding",
            "reader-reads",
            "--role=secret-reader",
            &format!("--serviceaccount={}:reader", ns.name),
            "-n",
            &ns.name,
        ],
    );
    let listed = eventually("the RoleBinding takes effect", ACT_LIMIT, || {
        let out = kubectl_as(
            &kubeconfig,
            &["get", "secrets", "-n", &ns.name, "-o", "name"],
        );
        out.status.success().then(|| text(&out.stdout))
    });
    assert!(listed.contains("secret/s"), "{listed}");
    // Only what the Role grants: other namespaces stay closed.
    let out = kubectl_as(&kubeconfig, &["get", "secrets", "-n", "default"]);
    assert!(!out.status.success() && text(&out.stderr).contains("(Forbidden)"));
    let _ = std::fs::remove_file(&kubeconfig);
}

#[tokio::test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
async fn token_request_gives_a_service_account_token() {
    let state = state();
    let ns = Namespace::new(&state, "kh-token");
    kubectl(
        &state,
        &["create", "serviceaccount", "worker", "-n", &ns.name],
    );
    let admin = client_from(&state.join("kubeconfig")).await;
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), &ns.name);
    let request: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": ["https://kubernetes.default.svc.cluster.local"],
            "expirationSeconds": 600,
        },
    }))
    .expect("a TokenRequest");
    let issued = accounts
        .create_token_request("worker", &PostParams::default(), &request)
        .await
        .expect("TokenRequest");
    let issued = serde_json::to_value(&issued).expect("JSON");
    let token = issued["status"]["token"]
        .as_str()
        .unwrap_or_else(|| panic!("a token in status: {issued}"))
        .to_string();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    assert!(
        issued["status"]["expirationTimestamp"].is_string(),
        "{issued}"
    );

    // The token authenticates as the ServiceAccount ...
    let as_worker = token_client(&state, &token);
    let review: Api<SelfSubjectReview> = Api::all(as_worker);
    let me = review
        .create(&PostParams::default(), &Default::default())
        .await
        .expect("SelfSubjectReview");
    let user = me.status.and_then(|s| s.user_info).expect("user info");
    assert_eq!(
        user.username.as_deref(),
        Some(format!("system:serviceaccount:{}:worker", ns.name).as_str())
    );
    assert!(
        user.groups
            .unwrap_or_default()
            .iter()
            .any(|g| g == "system:serviceaccounts"),
        "in group system:serviceaccounts"
    );
    // ... and the TokenReview API accepts it.
    let reviews: Api<TokenReview> = Api::all(admin);
    let reviewed = reviews
        .create(
            &PostParams::default(),
            &serde_json::from_value::<TokenReview>(json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": token},
            }))
            .expect("a TokenReview"),
        )
        .await
        .expect("TokenReview");
    assert_eq!(reviewed.status.and_then(|s| s.authenticated), Some(true));
}

#[tokio::test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
async fn up_made_node_credentials_for_the_configured_nodes() {
    let state = state();
    let names =
        std::env::var("MULTISITE_KUBE_NODES").unwrap_or_else(|_| "node-a node-b node-c".into());
    for name in names.split_whitespace() {
        let dir = state.join("nodes").join(name);
        for file in [
            "kubeconfig",
            "serving.crt",
            "serving.key",
            "client.crt",
            "client.key",
        ] {
            assert!(dir.join(file).is_file(), "{}/{file}", dir.display());
        }
        let client = client_from(&dir.join("kubeconfig")).await;
        let review: Api<SelfSubjectReview> = Api::all(client);
        let me = review
            .create(&PostParams::default(), &Default::default())
            .await
            .expect("SelfSubjectReview");
        let user = me.status.and_then(|s| s.user_info).expect("user info");
        assert_eq!(
            user.username.as_deref(),
            Some(format!("system:node:{name}").as_str())
        );
        assert!(
            user.groups
                .unwrap_or_default()
                .iter()
                .any(|g| g == "system:nodes")
        );
        // The serving certificate names the node and 127.0.0.1, signed by the CA.
        let mut cmd = Command::new("openssl");
        cmd.args(["verify", "-purpose", "sslserver", "-CAfile"])
            .arg(state.join("pki/ca.crt"))
            .arg(dir.join("serving.crt"));
        let out = run_bounded(cmd, KUBECTL_LIMIT);
        assert!(
            out.status.success(),
            "{}",
            text(&out.stdout) + &text(&out.stderr)
        );
        let mut cmd = Command::new("openssl");
        cmd.args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
            .arg(dir.join("serving.crt"));
        let san = text(&run_bounded(cmd, KUBECTL_LIMIT).stdout);
        assert!(
            san.contains(&format!("DNS:{name}")) && san.contains("IP Address:127.0.0.1"),
            "{san}"
        );
    }
}

#[tokio::test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
async fn a_node_may_register_itself_and_no_other_node() {
    let state = state();
    let own = unique("kh-node");
    let other = unique("kh-node");
    let mut nodes = Nodes {
        state: state.clone(),
        names: Vec::new(),
    };
    let kubeconfig = node_credentials(&state, &own);
    let as_node = client_from(&kubeconfig).await;
    let api: Api<Node> = Api::all(as_node.clone());

    nodes.names.push(other.clone());
    let code = refused_code(
        api.create(&PostParams::default(), &node_object(&other, "zone-x"))
            .await,
    );
    assert_eq!(code, 403, "{own} creating Node {other}");

    nodes.names.push(own.clone());
    let created = api
        .create(&PostParams::default(), &node_object(&own, "zone-x"))
        .await
        .unwrap_or_else(|e| panic!("{own} creating its own Node: {e}"));
    assert_eq!(created.metadata.name.as_deref(), Some(own.as_str()));

    // Another node's Node object exists now (made by the administrator) and stays
    // out of reach: the Node authorizer and NodeRestriction refuse changes to it.
    let admin: Api<Node> = Api::all(client_from(&state.join("kubeconfig")).await);
    admin
        .create(&PostParams::default(), &node_object(&other, "zone-x"))
        .await
        .expect("the administrator creates the other Node");
    let code = refused_code(
        api.patch(
            &other,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"labels": {"taken": "yes"}}})),
        )
        .await,
    );
    assert_eq!(code, 403, "{own} labelling Node {other}");
    let code = refused_code(api.delete(&other, &DeleteParams::default()).await);
    assert_eq!(code, 403, "{own} deleting Node {other}");
    // Its own object it may change.
    api.patch(
        &own,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"metadata": {"labels": {"checked": "yes"}}})),
    )
    .await
    .expect("a node labels its own Node");
    drop(nodes);
}

#[tokio::test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
async fn the_scheduler_binds_a_pod_to_a_ready_node_of_its_zone() {
    let state = state();
    let ns = Namespace::new(&state, "kh-sched");
    let zone_a = unique("kh-zone-a");
    let zone_b = unique("kh-zone-b");
    let node_a = unique("kh-sched-a");
    let node_b = unique("kh-sched-b");
    let nodes = Nodes {
        state: state.clone(),
        names: vec![node_a.clone(), node_b.clone()],
    };
    for (node, zone) in [(&node_a, &zone_a), (&node_b, &zone_b)] {
        let api: Api<Node> = Api::all(client_from(&node_credentials(&state, node)).await);
        api.create(&PostParams::default(), &node_object(node, zone))
            .await
            .unwrap_or_else(|e| panic!("{node} registering itself: {e}"));
    }
    ns.wait_default_service_account();
    let admin = client_from(&state.join("kubeconfig")).await;
    let pods: Api<Pod> = Api::namespaced(admin, &ns.name);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "zoned"},
        "spec": {
            "nodeSelector": {"topology.kubernetes.io/zone": zone_b},
            "containers": [{"name": "main", "image": "registry.invalid/none:1"}],
        },
    }))
    .expect("a Pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let bound = eventually_async("the scheduler binds the pod", ACT_LIMIT, || {
        let pods = pods.clone();
        async move {
            let pod = pods.get("zoned").await.ok()?;
            pod.spec.and_then(|s| s.node_name)
        }
    })
    .await;
    assert_eq!(bound, node_b, "the node of zone {zone_b}");
    let pod = pods.get("zoned").await.expect("pod");
    let scheduled = pod
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "PodScheduled")
        .expect("a PodScheduled condition");
    assert_eq!(scheduled.status, "True");
    drop(nodes);
}

#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn the_controller_manager_creates_a_statefulsets_pod() {
    let state = state();
    let ns = Namespace::new(&state, "kh-sts");
    ns.wait_default_service_account();
    let dir = std::env::temp_dir().join(unique("kh-sts"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("sts.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: web
  namespace: {}
spec:
  serviceName: web
  replicas: 1
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      containers:
      - name: main
        image: registry.invalid/none:1
",
            ns.name
        ),
    )
    .expect("write");
    kubectl(
        &state,
        &["apply", "-f", file.to_str().expect("a UTF-8 path")],
    );
    let pod = eventually(
        "the StatefulSet controller creates web-0",
        ACT_LIMIT,
        || {
            let out = kubectl_as(
                &state.join("kubeconfig"),
                &["get", "pod", "web-0", "-n", &ns.name, "-o", "json"],
            );
            out.status
                .success()
                .then(|| serde_json::from_slice::<Value>(&out.stdout).expect("JSON"))
        },
    );
    let owner = &pod["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "StatefulSet", "{pod}");
    assert_eq!(owner["name"], "web");
    assert_eq!(owner["controller"], true);
    assert_eq!(
        pod["metadata"]["labels"]["statefulset.kubernetes.io/pod-name"],
        "web-0"
    );
    let sts = eventually("the StatefulSet's status counts its pod", ACT_LIMIT, || {
        let sts = kubectl_json(
            &state,
            &["get", "statefulset", "web", "-n", &ns.name, "-o", "json"],
        );
        (sts["status"]["replicas"] == 1).then_some(sts)
    });
    assert_eq!(sts["status"]["replicas"], 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A node agent's HTTPS endpoint as far as `kubectl logs` needs one: `openssl s_server
/// -WWW` with the node's serving certificate, serving files of a directory, and
/// demanding a client certificate signed by the harness's CA (the API server's
/// kubelet client certificate). Killed when dropped.
struct NodeAgentStandIn {
    child: std::process::Child,
    dir: PathBuf,
    port: u16,
}

impl NodeAgentStandIn {
    fn start(state: &Path, node: &str, files: &[(&str, &str)]) -> NodeAgentStandIn {
        let dir = std::env::temp_dir().join(unique("kh-agent"));
        for (path, content) in files {
            let file = dir.join(path);
            std::fs::create_dir_all(file.parent().expect("a parent")).expect("mkdir");
            std::fs::write(&file, content).expect("write");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let creds = state.join("nodes").join(node);
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-WWW", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(creds.join("serving.crt"))
            .arg("-key")
            .arg(creds.join("serving.key"))
            .args(["-Verify", "1", "-verify_return_error", "-CAfile"])
            .arg(state.join("pki/ca.crt"))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server");
        let agent = NodeAgentStandIn { child, dir, port };
        eventually("the node agent stand-in listens", ACT_LIMIT, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        agent
    }
}

impl Drop for NodeAgentStandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
async fn kubectl_logs_reaches_the_node_agent_over_https() {
    let state = state();
    let ns = Namespace::new(&state, "kh-logs");
    let node = unique("kh-logs");
    let nodes = Nodes {
        state: state.clone(),
        names: vec![node.clone()],
    };
    let kubeconfig = node_credentials(&state, &node);
    let lines = "first line from the node agent\nsecond line\n";
    let agent = NodeAgentStandIn::start(
        &state,
        &node,
        &[(&format!("containerLogs/{}/talker/main", ns.name), lines)],
    );

    // The node registers with the port its agent listens on and 127.0.0.1 as its
    // InternalIP, the address type the API server prefers.
    let mut object = serde_json::to_value(node_object(&node, "zone-logs")).expect("JSON");
    object["status"]["daemonEndpoints"] = json!({"kubeletEndpoint": {"Port": agent.port}});
    let api: Api<Node> = Api::all(client_from(&kubeconfig).await);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(object).expect("a Node"),
    )
    .await
    .expect("the node registers itself");

    ns.wait_default_service_account();
    let admin = client_from(&state.join("kubeconfig")).await;
    let pods: Api<Pod> = Api::namespaced(admin, &ns.name);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "talker"},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "main", "image": "registry.invalid/none:1"}],
        },
    }))
    .expect("a Pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");

    let logs = kubectl(&state, &["logs", "talker", "-n", &ns.name]);
    assert_eq!(logs, lines, "the container's log, read from the node agent");
    drop(agent);
    drop(nodes);
}

#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn the_controller_manager_signs_an_approved_csr_with_the_ca() {
    let state = state();
    let name = unique("kh-csr");
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let openssl = |args: &[&str]| {
        let mut cmd = Command::new("openssl");
        cmd.args(args).current_dir(&dir);
        let out = run_bounded(cmd, KUBECTL_LIMIT);
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    };
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "key.pem",
    ]);
    let user = format!("/CN={name}/O=kh-testers");
    openssl(&[
        "req", "-new", "-key", "key.pem", "-subj", &user, "-out", "req.pem",
    ]);
    let request = std::fs::read(dir.join("req.pem")).expect("req.pem");
    let csr = json!({
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": {"name": name},
        "spec": {
            "request": base64_encode(&request),
            "signerName": "kubernetes.io/kube-apiserver-client",
            "expirationSeconds": 3600,
            "usages": ["client auth"],
        },
    });
    let file = dir.join("csr.json");
    std::fs::write(&file, csr.to_string()).expect("write");
    kubectl(
        &state,
        &["create", "-f", file.to_str().expect("a UTF-8 path")],
    );
    kubectl(&state, &["certificate", "approve", &name]);
    let issued = eventually("the signer issues the certificate", ACT_LIMIT, || {
        let csr = kubectl_json(&state, &["get", "csr", &name, "-o", "json"]);
        csr["status"]["certificate"].as_str().map(str::to_string)
    });
    let _ = kubectl_as(&state.join("kubeconfig"), &["delete", "csr", &name]);
    std::fs::write(dir.join("cert.pem"), base64_decode(&issued)).expect("write");
    let ca = state.join("pki/ca.crt");
    let verified = openssl(&[
        "verify",
        "-CAfile",
        ca.to_str().expect("a UTF-8 path"),
        "cert.pem",
    ]);
    assert!(verified.contains("cert.pem: OK"), "{verified}");
    let subject = openssl(&["x509", "-noout", "-subject", "-in", "cert.pem"]);
    assert!(
        subject.contains(&name) && subject.contains("kh-testers"),
        "{subject}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.len();
        let v = (chunk[0] as u32) << 16
            | (chunk.get(1).copied().unwrap_or(0) as u32) << 8
            | chunk.get(2).copied().unwrap_or(0) as u32;
        for i in 0..4 {
            if i <= n {
                out.push(ALPHABET[(v >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
