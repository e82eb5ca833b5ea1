//! Our CRDs under the real Kubernetes API machinery (k8s.io/apiextensions-apiserver, built
//! by `e2e/apiserver/`), and the embedded API server's verdicts compared with it.
//!
//! The tests are `#[ignore]`d: they need `MULTISITE_APISERVER_STATE` to name a state
//! directory where `e2e/apiserver/up.sh` started the real server, and fail without it.
//! `scripts/test.sh` starts the server and runs them with `--ignored`, or says loudly
//! that they are not run.

use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use multisite::dev::apiserver::{self, ApiServer};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn client(url: &str) -> kube::Client {
    let mut config = kube::Config::new(url.parse().expect("a URL"));
    config.headers.push((
        hyper::http::header::AUTHORIZATION,
        hyper::http::HeaderValue::from_static("Bearer multisite-test"),
    ));
    kube::Client::try_from(config).expect("a client")
}

/// The real server's URL, if the harness runs.
fn real_server() -> String {
    let state = PathBuf::from(std::env::var("MULTISITE_APISERVER_STATE").expect(
        "MULTISITE_APISERVER_STATE is not set: start e2e/apiserver/up.sh DIR and set it to DIR",
    ));
    let url = std::fs::read_to_string(state.join("url"))
        .expect("the harness state directory has a url file");
    url.trim().to_string()
}

async fn install_crds(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in multisite::api::crds() {
        let name = crd.metadata.name.clone().expect("a name");
        api.patch(
            &name,
            &PatchParams::apply("conformance").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("install {name}: {e}"));
    }
    let start = Instant::now();
    loop {
        let established = api
            .list(&Default::default())
            .await
            .expect("list CRDs")
            .items
            .iter()
            .filter(|c| c.spec.group == multisite::api::GROUP)
            .filter(|c| {
                c.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    })
            })
            .count();
        if established == 4 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the CRDs did not become Established"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clients of the real server at `url` and of a fresh embedded one, our CRDs on both.
async fn both_servers(url: &str) -> (kube::Client, kube::Client) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let stand_in_url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(apiserver::serve(
        listener,
        ApiServer::new(None).expect("a stand-in"),
    ));
    let (real, stand_in) = (client(url), client(&stand_in_url));
    install_crds(&real).await;
    install_crds(&stand_in).await;
    (real, stand_in)
}

fn api_for(client: &kube::Client, kind: &str, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(multisite::api::GROUP, multisite::api::VERSION, kind);
    let plural = match kind {
        "ReplicaFamily" => "replicafamilies",
        "Replica" => "replicas",
        "Site" => "sites",
        "SchemaPackage" => "schemapackages",
        other => panic!("no plural for {other}"),
    };
    let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// What a server said: accepted (with the stored object), or refused with a code and
/// the fields its causes name.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    Accepted(Value),
    Refused {
        code: u16,
        fields: BTreeSet<String>,
        message: String,
    },
}

impl Verdict {
    /// The part both servers must agree on.
    fn shape(&self) -> String {
        match self {
            Verdict::Accepted(_) => "accepted".into(),
            Verdict::Refused { code, fields, .. } => format!("refused {code} {fields:?}"),
        }
    }
}

fn verdict(result: Result<DynamicObject, kube::Error>) -> Verdict {
    match result {
        Ok(object) => Verdict::Accepted(serde_json::to_value(object).expect("JSON")),
        Err(kube::Error::Api(status)) => Verdict::Refused {
            code: status.code,
            fields: status
                .details
                .as_ref()
                .map(|d| {
                    d.causes
                        .iter()
                        .map(|c| c.field.clone())
                        .filter(|f| !f.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            message: status.message.clone(),
        },
        Err(other) => panic!("not an API answer: {other}"),
    }
}

fn family(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "multisite.dev/v1alpha1", "kind": "ReplicaFamily", "metadata": {"name": name}, "spec": spec})
}

fn good_spec() -> Value {
    json!({"idPrefix": "SAMPL", "featureLevel": 7, "gateway": {"replica": "sampl-tokyo"}})
}

fn with(mut base: Value, path: &[&str], value: Value) -> Value {
    let mut at = &mut base;
    for key in &path[..path.len() - 1] {
        at = at.get_mut(*key).expect("path");
    }
    at[path[path.len() - 1]] = value;
    base
}

/// One case: an object to create, and optionally a merge patch to apply to it after.
struct Case {
    name: &'static str,
    kind: &'static str,
    object: Value,
    update: Option<Value>,
}

fn cases() -> Vec<Case> {
    let f = |name: &'static str, object: Value| Case {
        name,
        kind: "ReplicaFamily",
        object,
        update: None,
    };
    let spec = good_spec;
    vec![
        f("a valid family", family("valid", spec())),
        f(
            "feature level 9",
            family("fl9", with(spec(), &["featureLevel"], json!(9))),
        ),
        f(
            "feature level 4",
            family("fl4", with(spec(), &["featureLevel"], json!(4))),
        ),
        f(
            "gateway without a replica",
            family(
                "gw",
                with(spec(), &["gateway"], json!({"endpoint": "http://x"})),
            ),
        ),
        f(
            "gateway with an empty replica",
            family("gwe", with(spec(), &["gateway"], json!({"replica": ""}))),
        ),
        f(
            "incremental interval 0",
            family(
                "int",
                with(spec(), &["sync"], json!({"incrementalIntervalSeconds": 0})),
            ),
        ),
        f(
            "1001 concurrent tasks",
            family(
                "conc",
                with(spec(), &["sync"], json!({"maxConcurrentIncremental": 1001})),
            ),
        ),
        f(
            "hub and spoke without a hub",
            family(
                "hub",
                with(spec(), &["sync"], json!({"topology": "HubAndSpoke"})),
            ),
        ),
        f(
            "a lower-case id prefix",
            family("prefix", with(spec(), &["idPrefix"], json!("sampl"))),
        ),
        f(
            "an unknown topology",
            family("topo", with(spec(), &["sync"], json!({"topology": "Ring"}))),
        ),
        f(
            "an unknown field is pruned",
            family("pruned", with(spec(), &["bogus"], json!(true))),
        ),
        Case {
            name: "feature level lowered",
            kind: "ReplicaFamily",
            object: family("lowered", spec()),
            update: Some(json!({"spec": {"featureLevel": 6}})),
        },
        Case {
            name: "feature level raised",
            kind: "ReplicaFamily",
            object: family("raised", spec()),
            update: Some(json!({"spec": {"featureLevel": 8}})),
        },
        Case {
            name: "id prefix changed",
            kind: "ReplicaFamily",
            object: family("renamed", spec()),
            update: Some(json!({"spec": {"idPrefix": "OTHER"}})),
        },
        Case {
            name: "a replica with bad storage",
            kind: "Replica",
            object: json!({"apiVersion": "multisite.dev/v1alpha1", "kind": "Replica", "metadata": {"name": "r1"},
                "spec": {"family": "sampl", "site": "tokyo", "storage": "ten gigs"}}),
            update: None,
        },
        Case {
            name: "a replica moved to another family",
            kind: "Replica",
            object: json!({"apiVersion": "multisite.dev/v1alpha1", "kind": "Replica", "metadata": {"name": "r2"},
                "spec": {"family": "sampl", "site": "tokyo"}}),
            update: Some(json!({"spec": {"family": "other"}})),
        },
        Case {
            name: "a package with a bad version",
            kind: "SchemaPackage",
            object: json!({"apiVersion": "multisite.dev/v1alpha1", "kind": "SchemaPackage", "metadata": {"name": "p1"},
                "spec": {"family": "sampl", "package": "Interop", "version": "one"}}),
            update: None,
        },
    ]
}

async fn run_case(client: &kube::Client, namespace: &str, case: &Case) -> Verdict {
    let api = api_for(client, case.kind, namespace);
    let object: DynamicObject = serde_json::from_value(case.object.clone()).expect("an object");
    let created = verdict(api.create(&PostParams::default(), &object).await);
    let Some(update) = &case.update else {
        return created;
    };
    assert!(
        matches!(created, Verdict::Accepted(_)),
        "{}: the object to update was refused: {created:?}",
        case.name
    );
    let name = case.object["metadata"]["name"].as_str().expect("a name");
    verdict(
        api.patch(name, &PatchParams::default(), &Patch::Merge(update))
            .await,
    )
}

#[tokio::test]
#[ignore = "needs the real API server: scripts/test.sh runs it with MULTISITE_APISERVER_STATE set"]
async fn the_stand_in_gives_the_real_servers_verdicts() {
    let url = real_server();
    let (real, stand_in) = both_servers(&url).await;
    // A namespace of its own on the real server (which has no Namespace objects).
    let namespace = format!("conformance-{}", std::process::id());
    let mut differences = Vec::new();
    eprintln!("{:<34} {:<44} real server's message", "case", "verdict");
    for case in cases() {
        let from_real = run_case(&real, &namespace, &case).await;
        let from_stand_in = run_case(&stand_in, "default", &case).await;
        let message = match &from_real {
            Verdict::Refused { message, .. } => message.clone(),
            Verdict::Accepted(_) => String::new(),
        };
        eprintln!("{:<34} {:<44} {message}", case.name, from_real.shape());
        assert_eq!(
            matches!(from_real, Verdict::Refused { .. }),
            meant_to_be_refused(&case),
            "{}: the real server's verdict is not the CRD's intent: {from_real:?}",
            case.name
        );
        if from_real.shape() != from_stand_in.shape() {
            differences.push(format!(
                "{}: real server {}, stand-in {} ({:?})",
                case.name,
                from_real.shape(),
                from_stand_in.shape(),
                from_stand_in
            ));
        }
        // Pruning: neither keeps the unknown field.
        if case.name == "an unknown field is pruned" {
            for (who, v) in [("real server", &from_real), ("stand-in", &from_stand_in)] {
                if let Verdict::Accepted(object) = v {
                    assert!(
                        object["spec"].get("bogus").is_none(),
                        "the {who} kept an unknown field"
                    );
                }
            }
        }
    }
    assert!(
        differences.is_empty(),
        "the stand-in differs from Kubernetes:\n{}",
        differences.join("\n")
    );
}

/// Whether the table means the case to be refused: the CRDs' rules must hold on the
/// real server too, not only agree between the two servers.
fn meant_to_be_refused(case: &Case) -> bool {
    !matches!(
        case.name,
        "a valid family" | "an unknown field is pruned" | "feature level raised"
    )
}

#[tokio::test]
#[ignore = "needs the real API server: scripts/test.sh runs it with MULTISITE_APISERVER_STATE set"]
async fn every_crd_and_example_is_accepted_by_the_real_server() {
    let url = real_server();
    let real = client(&url);
    install_crds(&real).await;
    // Every example manifest's custom resources, created with a server-side dry run.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("examples")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut checked = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        for (origin, mut value) in
            multisite::api::manifest::documents(&file.display().to_string(), &text).expect("YAML")
        {
            let kind = value["kind"].as_str().unwrap_or_default().to_string();
            if !matches!(
                kind.as_str(),
                "ReplicaFamily" | "Replica" | "Site" | "SchemaPackage"
            ) {
                continue;
            }
            // Status is not written through the main resource; examples carry it for `plan`.
            if let Some(map) = value.as_object_mut() {
                map.remove("status");
            }
            let namespace = value["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            let api = api_for(&real, &kind, &namespace);
            let object: DynamicObject = serde_json::from_value(value).expect("an object");
            let params = PostParams {
                dry_run: true,
                ..Default::default()
            };
            api.create(&params, &object)
                .await
                .unwrap_or_else(|e| panic!("{origin}: the real server refused it: {e}"));
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} example objects found");
    eprintln!("{checked} example objects accepted by the real server");
}

async fn get_json(client: &kube::Client, path: &str) -> Value {
    let request = hyper::http::Request::get(path)
        .body(Vec::new())
        .expect("a request");
    let text = client
        .request_text(request)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Discovery details clients may read: the stand-in answers as the real server does.
#[tokio::test]
#[ignore = "needs the real API server: scripts/test.sh runs it with MULTISITE_APISERVER_STATE set"]
async fn discovery_and_openapi_index_match_the_real_server() {
    let url = real_server();
    let (real, stand_in) = both_servers(&url).await;
    // storageVersionHash of our resources.
    let hashes = |list: &Value| -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = list["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| !r["name"].as_str().unwrap_or("/").contains('/'))
            .map(|r| {
                (
                    r["name"].as_str().unwrap_or_default().to_string(),
                    r["storageVersionHash"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect();
        out.sort();
        out
    };
    let path = "/apis/multisite.dev/v1alpha1";
    let from_real = hashes(&get_json(&real, path).await);
    assert_eq!(from_real.len(), 4, "{from_real:?}");
    assert_eq!(hashes(&get_json(&stand_in, path).await), from_real);
    // The OpenAPI v3 index: group/version documents, group documents of built-in groups
    // only, and /version.
    let index = |v: &Value| -> BTreeSet<String> {
        v["paths"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    let real_index = index(&get_json(&real, "/openapi/v3").await);
    let stand_in_index = index(&get_json(&stand_in, "/openapi/v3").await);
    for path in [
        "apis/multisite.dev/v1alpha1",
        "apis/multisite.dev",
        "apis/apiextensions.k8s.io",
        "apis/apiextensions.k8s.io/v1",
        "version",
    ] {
        assert_eq!(
            real_index.contains(path),
            stand_in_index.contains(path),
            "/openapi/v3 lists {path}: real {real_index:?}, stand-in {stand_in_index:?}"
        );
    }
}
