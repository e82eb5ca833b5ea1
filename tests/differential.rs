//! The embedded stand-in against the real Kubernetes control plane (`e2e/kube/`): one
//! table of kubectl commands run against both, on the same objects. A row agrees when
//! both succeed or both fail and what the row compares (output, first line, a text both
//! must contain) is the same. A row that is a known difference must really differ, and
//! `docs/dev.md` must name it: fixing the stand-in makes the row fail until the listing
//! goes, so the list stays true.
//!
//! Needs `MULTISITE_KUBE_STATE` (a state directory where `e2e/kube/up.sh` ran);
//! `scripts/test.sh` runs it with `--ignored --nocapture` and the table is in the log.

mod common;

use common::text;
use multisite::dev::apiserver::{self, ApiServer};
use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// What a row compares besides success or failure.
#[derive(Clone, Copy, Debug)]
enum Compare {
    /// Only whether the command succeeded.
    Outcome,
    /// The whole output (stdout and stderr), namespaces replaced by `NS`.
    Output,
    /// The first line of the output (a table's header).
    Header,
    /// Both outputs contain this text.
    Contains(&'static str),
}

struct Row {
    what: &'static str,
    /// kubectl's arguments; `{ns}` is the namespace of the run, `{dir}` the directory of
    /// the run's files.
    args: &'static str,
    compare: Compare,
    /// A difference the stand-in keeps: the words `docs/dev.md` names it with.
    known: Option<&'static str>,
}

const fn row(what: &'static str, args: &'static str, compare: Compare) -> Row {
    Row {
        what,
        args,
        compare,
        known: None,
    }
}

const fn known(what: &'static str, args: &'static str, compare: Compare, doc: &'static str) -> Row {
    Row {
        what,
        args,
        compare,
        known: Some(doc),
    }
}

const ROWS: &[Row] = &[
    row(
        "apply a namespace",
        "apply -f {dir}/namespace.yaml",
        Compare::Outcome,
    ),
    known(
        "create namespace (typed: protobuf body)",
        "create namespace {ns}-typed",
        Compare::Outcome,
        "kubectl create namespace X",
    ),
    known(
        "create secret generic (typed)",
        "create secret generic s -n {ns} --from-literal=a=b",
        Compare::Outcome,
        "kubectl create secret generic",
    ),
    known(
        "create configmap (typed)",
        "create configmap c -n {ns} --from-literal=a=b",
        Compare::Outcome,
        "kubectl create configmap",
    ),
    row(
        "create secret generic through apply",
        "apply -f {dir}/secret.yaml",
        Compare::Outcome,
    ),
    row(
        "read the secret back",
        "get secret s -n {ns} -o jsonpath={.data.a}",
        Compare::Output,
    ),
    row(
        "apply crds/ server-side, field manager a",
        "apply --server-side --field-manager=first -f crds/",
        Compare::Outcome,
    ),
    row(
        "apply crds/ server-side again, field manager b",
        "apply --server-side --field-manager=second -f crds/",
        Compare::Outcome,
    ),
    row(
        "CRD accepted names",
        "get crd replicafamilies.multisite.dev -o jsonpath={.status.acceptedNames.kind}",
        Compare::Output,
    ),
    row(
        "wait for a CRD to be Established",
        "wait --for=condition=Established crd/replicas.multisite.dev --timeout=30s",
        Compare::Outcome,
    ),
    row(
        "api-resources of multisite.dev",
        "api-resources --api-group=multisite.dev",
        Compare::Output,
    ),
    row(
        "apply the example fleet",
        "apply -f {dir}/fleet.yaml",
        Compare::Outcome,
    ),
    row(
        "get replicafamilies (printer columns)",
        "get rf -n {ns}",
        Compare::Header,
    ),
    row(
        "get replicas -o wide (printer columns)",
        "get replicas -n {ns} -o wide",
        Compare::Header,
    ),
    row(
        "read a field back",
        "get rf sampl -n {ns} -o jsonpath={.spec.featureLevel}/{.spec.sync.topology}",
        Compare::Output,
    ),
    row(
        "an invalid family is refused",
        "apply -f {dir}/invalid.yaml",
        Compare::Contains("spec.featureLevel"),
    ),
    row(
        "explain a field of our CRD",
        "explain replicafamily.spec.sync",
        Compare::Contains("topology"),
    ),
    row(
        "merge patch",
        "patch rf sampl -n {ns} --type=merge -p {\"spec\":{\"paused\":true}}",
        Compare::Outcome,
    ),
    row(
        "label",
        "label rf sampl -n {ns} team=tracker",
        Compare::Outcome,
    ),
    row(
        "select by label",
        "get rf -n {ns} -l team=tracker -o name",
        Compare::Output,
    ),
    row(
        "annotate",
        "annotate site tokyo -n {ns} note=first",
        Compare::Outcome,
    ),
    row("get events", "get events -n {ns}", Compare::Outcome),
    row(
        "write an Event through events.k8s.io/v1",
        "apply -f {dir}/event.yaml",
        Compare::Outcome,
    ),
    row(
        "the core view lists it",
        "get events -n {ns}",
        Compare::Contains("replicafamily/sampl"),
    ),
    row(
        "the core view selects it by involvedObject",
        "get events -n {ns} --field-selector=involvedObject.name=sampl -o jsonpath={.items[*].message}",
        Compare::Output,
    ),
    row(
        "server-side apply of a StatefulSet",
        "apply --server-side -f {dir}/statefulset.yaml",
        Compare::Outcome,
    ),
    known(
        "defaults of a built-in kind",
        "get statefulset web -n {ns} -o jsonpath={.spec.podManagementPolicy}",
        Compare::Output,
        "no validation or defaulting of built-in kinds",
    ),
    row(
        "scale a StatefulSet",
        "scale statefulset web -n {ns} --replicas=2",
        Compare::Outcome,
    ),
    row(
        "read the scale back",
        "get statefulset web -n {ns} -o jsonpath={.spec.replicas}",
        Compare::Output,
    ),
    known(
        "auth can-i",
        "auth can-i create pods -n {ns}",
        Compare::Output,
        "kubectl auth can-i",
    ),
    row(
        "delete a custom resource",
        "delete rf sampl -n {ns}",
        Compare::Outcome,
    ),
    row(
        "get what is gone",
        "get rf sampl -n {ns}",
        Compare::Contains("NotFound"),
    ),
    row(
        "delete the namespace",
        "delete namespace {ns} --wait=false",
        Compare::Outcome,
    ),
];

struct Side {
    kubeconfig: PathBuf,
}

impl Side {
    fn run(&self, row: &Row, ns: &str, dir: &Path) -> (bool, String) {
        let line = row
            .args
            .replace("{ns}", ns)
            .replace("{dir}", &dir.display().to_string());
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(line.split(' '))
            .current_dir(ROOT)
            .output()
            .expect("run kubectl");
        let all = (text(&out.stdout) + &text(&out.stderr)).replace(ns, "NS");
        (out.status.success(), all)
    }
}

fn agree(compare: Compare, real: &(bool, String), stand_in: &(bool, String)) -> bool {
    if real.0 != stand_in.0 {
        return false;
    }
    match compare {
        Compare::Outcome => true,
        Compare::Output => real.1.trim() == stand_in.1.trim(),
        Compare::Header => real.1.lines().next() == stand_in.1.lines().next(),
        Compare::Contains(needle) => real.1.contains(needle) && stand_in.1.contains(needle),
    }
}

fn files(dir: &Path, ns: &str) {
    let example = std::fs::read_to_string(Path::new(ROOT).join("examples/fleet.yaml"))
        .expect("examples/fleet.yaml");
    let write = |name: &str, body: String| {
        std::fs::write(dir.join(name), body).expect("write a file of the run");
    };
    write(
        "namespace.yaml",
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"),
    );
    write(
        "secret.yaml",
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: s, namespace: {ns}}}\nstringData: {{a: b}}\n"
        ),
    );
    write(
        "fleet.yaml",
        example.replace("namespace: tracker", &format!("namespace: {ns}")),
    );
    write(
        "invalid.yaml",
        format!(
            "apiVersion: multisite.dev/v1alpha1\nkind: ReplicaFamily\nmetadata: {{name: other, namespace: {ns}}}\n\
             spec:\n  idPrefix: OTHER\n  featureLevel: 9\n  gateway: {{replica: other-tokyo}}\n  sync: {{topology: Mesh, incrementalIntervalSeconds: 30}}\n"
        ),
    );
    write(
        "event.yaml",
        format!(
            "apiVersion: events.k8s.io/v1\nkind: Event\nmetadata: {{name: sampl.checked, namespace: {ns}}}\n\
             eventTime: \"2026-12-02T10:00:00.000000Z\"\nreportingController: multisite-operator\nreportingInstance: diff\n\
             action: Check\nreason: Checked\ntype: Normal\nnote: the family was checked\n\
             regarding: {{apiVersion: multisite.dev/v1alpha1, kind: ReplicaFamily, name: sampl, namespace: {ns}}}\n"
        ),
    );
    write(
        "statefulset.yaml",
        format!(
            "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {{name: web, namespace: {ns}}}\nspec:\n  serviceName: web\n  replicas: 1\n\
             \x20 selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n\
             \x20   spec: {{containers: [{{name: web, image: ghcr.io/multisite/multisite:diff}}]}}\n"
        ),
    );
}

#[test]
#[ignore = "needs the real control plane: scripts/test.sh runs it with MULTISITE_KUBE_STATE set"]
fn kubectl_on_the_stand_in_and_on_the_real_control_plane() {
    let state = PathBuf::from(
        std::env::var("MULTISITE_KUBE_STATE")
            .expect("MULTISITE_KUBE_STATE names the state directory of e2e/kube/up.sh"),
    );
    let dir = std::env::temp_dir().join(format!("multisite-differential-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let ns = format!("diff-{}", common::run_id());
    files(&dir, &ns);

    // The stand-in, served from a runtime of its own for the length of the test.
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let url = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(apiserver::serve(
            listener,
            ApiServer::new(None).expect("a stand-in"),
        ));
        url
    });
    let stand_in = Side {
        kubeconfig: dir.join("stand-in.kubeconfig"),
    };
    std::fs::write(&stand_in.kubeconfig, apiserver::kubeconfig(&url)).expect("kubeconfig");
    let real = Side {
        kubeconfig: state.join("kubeconfig"),
    };
    let doc = std::fs::read_to_string(Path::new(ROOT).join("docs/dev.md")).expect("docs/dev.md");
    // Words a listing wraps over lines count as one run of text.
    let doc = doc.split_whitespace().collect::<Vec<_>>().join(" ");

    let mut problems = Vec::new();
    println!("| command | real control plane | stand-in | verdict |");
    println!("| --- | --- | --- | --- |");
    for row in ROWS {
        let on_real = real.run(row, &ns, &dir);
        let on_stand_in = stand_in.run(row, &ns, &dir);
        let same = agree(row.compare, &on_real, &on_stand_in);
        let verdict = match (same, row.known) {
            (true, None) => "same".to_string(),
            (false, Some(doc_words)) => {
                if !doc.contains(doc_words) {
                    problems.push(format!(
                        "{}: docs/dev.md does not name {doc_words:?}",
                        row.what
                    ));
                }
                "known difference (docs/dev.md)".to_string()
            }
            (false, None) => {
                problems.push(format!(
                    "{}: they differ\n  real: {}\n  stand-in: {}",
                    row.what, on_real.1, on_stand_in.1
                ));
                "DIFFERENT".to_string()
            }
            (true, Some(_)) => {
                problems.push(format!(
                    "{}: listed as a difference but the same now; drop the listing",
                    row.what
                ));
                "SAME, but listed as a difference".to_string()
            }
        };
        let cell = |(ok, out): &(bool, String)| {
            let first = out.lines().next().unwrap_or_default().replace('|', "\\|");
            let first: String = first.chars().take(70).collect();
            format!("{} {first}", if *ok { "ok:" } else { "fails:" })
        };
        println!(
            "| `kubectl {}` ({}) | {} | {} | {verdict} |",
            row.args,
            row.what,
            cell(&on_real),
            cell(&on_stand_in)
        );
    }
    // What only the real control plane made (the stand-in refused it).
    let _ = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&real.kubeconfig)
        .args([
            "delete",
            "namespace",
            &format!("{ns}-typed"),
            "--wait=false",
        ])
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
