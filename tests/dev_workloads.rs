//! The workload runner of the embedded cluster against real processes: a StatefulSet of
//! replica servers (this crate's binary) and a Deployment of shell sleepers.

use k8s_openapi::jiff::Timestamp;
use multisite::dev::objects::{
    DeleteOptions, GenerationPolicy, ResourceInfo, ResourceKey, Store, WriteOptions,
};
use multisite::dev::workloads::{ImageMap, KUBELET_FINALIZER, Settings, run};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(30);
const BIN: &str = env!("CARGO_BIN_EXE_multisite");

fn pods() -> ResourceKey {
    ResourceKey::new("", "v1", "pods")
}

fn claims() -> ResourceKey {
    ResourceKey::new("", "v1", "persistentvolumeclaims")
}

fn sets() -> ResourceKey {
    ResourceKey::new("apps", "v1", "statefulsets")
}

fn deployments() -> ResourceKey {
    ResourceKey::new("apps", "v1", "deployments")
}

fn store() -> Arc<Mutex<Store>> {
    let mut store = Store::default();
    store.register(
        pods(),
        ResourceInfo::new("Pod", true).with_status_subresource(),
    );
    store.register(
        claims(),
        ResourceInfo::new("PersistentVolumeClaim", true).with_status_subresource(),
    );
    for (resource, kind) in [(sets(), "StatefulSet"), (deployments(), "Deployment")] {
        store.register(
            resource,
            ResourceInfo::new(kind, true)
                .with_status_subresource()
                .with_generation(GenerationPolicy::Spec),
        );
    }
    Arc::new(Mutex::new(store))
}

/// A fresh directory for one test's state.
fn state_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("multisite-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn settings(dir: &Path) -> Settings {
    let mut settings = Settings::new(dir.join("state"));
    settings.images = ImageMap {
        images: Vec::new(),
        multisite: Some(PathBuf::from(BIN)),
    }
    .with("shell", "/bin/sh");
    settings.backoff_base = Duration::from_millis(200);
    settings.grace_period = Duration::from_secs(5);
    settings.tick = Duration::from_millis(100);
    settings
}

fn get(store: &Mutex<Store>, resource: &ResourceKey, name: &str) -> Option<Value> {
    store.lock().unwrap().get(resource, "db", name).ok()
}

fn ready(pod: &Value) -> bool {
    pod["status"]["phase"] == "Running"
        && pod["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

fn pid_of(pod: &Value) -> u32 {
    pod["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|id| id.strip_prefix("process://"))
        .and_then(|p| p.parse().ok())
        .expect("a running container has a pid")
}

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; its state letter tells.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

async fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn http_status(ip: &str, path: &str) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect((ip, 7400)).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.ok()?;
    answer.split(' ').nth(1)?.parse().ok()
}

fn digest(ip: &str, secret: &Path) -> String {
    let out = std::process::Command::new(BIN)
        .args(["digest", "--replica", &format!("http://{ip}:7400")])
        .env("MULTISITE_SECRET_FILE", secret)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "digest failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn replica_set(secret: &Path) -> Value {
    let secret = secret.display().to_string();
    let init_script = r#"test -f "$DATA/replica.db" || exec "$BIN" replica init --data "$DATA" --family sampl --replica "$NAME" --id-prefix SAMPL --feature-level 8"#;
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "sampl", "namespace": "db"},
        "spec": {
            "replicas": 2,
            "serviceName": "sampl",
            "selector": {"matchLabels": {"app": "sampl"}},
            "template": {
                "metadata": {"labels": {"app": "sampl"}},
                "spec": {
                    "initContainers": [{
                        "name": "init",
                        "image": "shell",
                        "command": ["sh", "-c", init_script],
                        "env": [
                            {"name": "DATA", "value": "/data"},
                            {"name": "BIN", "value": BIN},
                            {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "MULTISITE_SECRET_FILE", "value": secret},
                        ],
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    }],
                    "containers": [{
                        "name": "replica",
                        "image": "registry.example:5000/tracker/multisite:0.1.0",
                        "args": ["replica", "serve", "--data", "/data", "--listen", "0.0.0.0:7400"],
                        "env": [{"name": "MULTISITE_SECRET_FILE", "value": secret}],
                        "ports": [{"name": "api", "containerPort": 7400}],
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "api"}, "periodSeconds": 1},
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    }],
                },
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
            }],
        },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateful_set_of_replicas_runs_restarts_and_scales_as_processes() {
    let dir = state_dir("statefulset");
    let secret = dir.join("family.secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
    let settings = settings(&dir);
    let settings_again = settings.clone();
    let state = settings.state_dir.clone();
    let store = store();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(run(store.clone(), settings, async {
        let _ = stopped.await;
    }));
    store
        .lock()
        .unwrap()
        .create(
            &sets(),
            "db",
            replica_set(&secret),
            &WriteOptions::default(),
            Timestamp::now(),
        )
        .unwrap();

    // Ordinal order: sampl-1 appears only once sampl-0 is Ready.
    let (first, second) = wait_for("two ready pods", || {
        let s = store.lock().unwrap();
        let first = s.get(&pods(), "db", "sampl-0").ok();
        let second = s.get(&pods(), "db", "sampl-1").ok();
        if second.is_some() {
            assert!(
                first.as_ref().is_some_and(ready),
                "sampl-1 came before sampl-0 was ready"
            );
        }
        match (first, second) {
            (Some(a), Some(b)) if ready(&a) && ready(&b) => Some((a, b)),
            _ => None,
        }
    })
    .await;
    let ip0 = first["status"]["podIP"].as_str().unwrap().to_string();
    let ip1 = second["status"]["podIP"].as_str().unwrap().to_string();
    assert_ne!(ip0, ip1);
    assert!(ip0.starts_with("127.") && ip1.starts_with("127."));
    assert_eq!(first["status"]["podIPs"][0]["ip"], ip0.as_str());
    assert_eq!(first["spec"]["hostname"], "sampl-0");
    assert_eq!(first["spec"]["subdomain"], "sampl");
    assert_eq!(
        first["metadata"]["ownerReferences"][0]["kind"],
        "StatefulSet"
    );
    assert_eq!(first["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(first["metadata"]["finalizers"][0], KUBELET_FINALIZER);
    assert_eq!(
        first["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"],
        0
    );
    assert_eq!(http_status(&ip0, "/healthz").await, Some(200));
    assert_eq!(http_status(&ip1, "/healthz").await, Some(200));
    let claim = get(&store, &claims(), "data-sampl-0").expect("a claim per ordinal");
    assert_eq!(claim["status"]["phase"], "Bound");
    assert!(claim["metadata"].get("ownerReferences").is_none());
    assert!(state.join("logs/db_sampl-0_replica.log").exists());
    assert!(state.join("volumes/db/data-sampl-0/replica.db").exists());
    let set = wait_for("the set's status", || {
        get(&store, &sets(), "sampl").filter(|s| s["status"]["readyReplicas"] == 2)
    })
    .await;
    assert_eq!(set["status"]["replicas"], 2);
    assert_eq!(set["status"]["currentReplicas"], 2);
    assert_eq!(set["status"]["availableReplicas"], 2);
    assert_eq!(set["status"]["observedGeneration"], 1);
    // Probes keep passing; passes that change nothing write nothing.
    let version = store.lock().unwrap().resource_version();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(store.lock().unwrap().resource_version(), version);

    // A killed process is restarted, with its data.
    let before = digest(&ip0, &secret);
    let pid = pid_of(&first);
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    let restarted = wait_for("a restart", || {
        get(&store, &pods(), "sampl-0")
            .filter(|p| ready(p) && p["status"]["containerStatuses"][0]["restartCount"] == 1)
    })
    .await;
    assert_ne!(pid_of(&restarted), pid);
    assert_eq!(restarted["status"]["podIP"], ip0.as_str());
    assert_eq!(
        restarted["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"],
        137
    );
    assert_eq!(digest(&ip0, &secret), before);

    // A deleted pod's process is stopped; the set makes it again, on the same claim.
    let old_uid = restarted["metadata"]["uid"].clone();
    let old_pid = pid_of(&restarted);
    store
        .lock()
        .unwrap()
        .delete(
            &pods(),
            "db",
            "sampl-0",
            &DeleteOptions::default(),
            Timestamp::now(),
        )
        .unwrap();
    let again = wait_for("a new sampl-0", || {
        get(&store, &pods(), "sampl-0").filter(|p| p["metadata"]["uid"] != old_uid && ready(p))
    })
    .await;
    assert!(!alive(old_pid), "the deleted pod's process still runs");
    let ip = again["status"]["podIP"].as_str().unwrap().to_string();
    assert_eq!(digest(&ip, &secret), before);

    // Scaling down removes the highest ordinal and keeps its claim.
    let pid1 = pid_of(&second);
    {
        let mut s = store.lock().unwrap();
        let mut set = s.get(&sets(), "db", "sampl").unwrap();
        set["spec"]["replicas"] = json!(1);
        s.update(&sets(), "db", "sampl", set, &WriteOptions::default())
            .unwrap();
    }
    wait_for("sampl-1 gone", || {
        get(&store, &pods(), "sampl-1").is_none().then_some(())
    })
    .await;
    assert!(!alive(pid1), "the removed pod's process still runs");
    assert!(get(&store, &claims(), "data-sampl-1").is_some());
    wait_for("the scaled status", || {
        get(&store, &sets(), "sampl")
            .filter(|s| s["status"]["replicas"] == 1 && s["status"]["observedGeneration"] == 2)
    })
    .await;

    // Shutdown stops every process.
    let last = pid_of(&get(&store, &pods(), "sampl-0").unwrap());
    stop.send(()).unwrap();
    tokio::time::timeout(WAIT, runner)
        .await
        .expect("the runner stops")
        .unwrap()
        .unwrap();
    assert!(!alive(last), "a process outlived the runner");

    // A new runner on the same store and state resumes the pod: same address, same data.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(run(store.clone(), settings_again, async {
        let _ = stopped.await;
    }));
    let resumed = wait_for("a resumed pod", || {
        get(&store, &pods(), "sampl-0").filter(|p| ready(p) && pid_of(p) != last)
    })
    .await;
    assert_eq!(resumed["status"]["podIP"], ip.as_str());
    assert_eq!(digest(&ip, &secret), before);
    let last = pid_of(&resumed);
    stop.send(()).unwrap();
    tokio::time::timeout(WAIT, runner)
        .await
        .expect("the runner stops")
        .unwrap()
        .unwrap();
    assert!(!alive(last), "a process outlived the runner");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_replaces_its_pods_when_the_template_changes() {
    let dir = state_dir("deployment");
    let mut settings = settings(&dir);
    settings.first_address = std::net::Ipv4Addr::new(127, 2, 0, 1);
    let store = store();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(run(store.clone(), settings, async {
        let _ = stopped.await;
    }));
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "db"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{
                    "name": "sleeper",
                    "image": "shell",
                    "command": ["sh", "-c", "echo listening on 0.0.0.0; exec sleep 600"],
                }]},
            },
        },
    });
    store
        .lock()
        .unwrap()
        .create(
            &deployments(),
            "db",
            deployment,
            &WriteOptions::default(),
            Timestamp::now(),
        )
        .unwrap();
    let ready_pods = |store: &Mutex<Store>| -> Vec<Value> {
        let s = store.lock().unwrap();
        let listed = s
            .list(&pods(), Some("db"), &Default::default())
            .unwrap()
            .items;
        listed.into_iter().filter(ready).collect()
    };
    let first = wait_for("two ready pods", || {
        let pods = ready_pods(&store);
        (pods.len() == 2).then_some(pods)
    })
    .await;
    let hash = first[0]["metadata"]["labels"]["pod-template-hash"]
        .as_str()
        .unwrap()
        .to_string();
    for pod in &first {
        let name = pod["metadata"]["name"].as_str().unwrap();
        let suffix = name.strip_prefix(&format!("web-{hash}-")).unwrap();
        assert_eq!(suffix.len(), 5);
    }
    let old_pids: Vec<u32> = first.iter().map(pid_of).collect();
    wait_for("an available deployment", || {
        get(&store, &deployments(), "web").filter(|d| {
            d["status"]["availableReplicas"] == 2
                && d["status"]["conditions"][0]["type"] == "Available"
                && d["status"]["conditions"][0]["status"] == "True"
        })
    })
    .await;

    {
        let mut s = store.lock().unwrap();
        let mut d = s.get(&deployments(), "db", "web").unwrap();
        d["spec"]["template"]["spec"]["containers"][0]["env"] =
            json!([{"name": "VERSION", "value": "2"}]);
        s.update(&deployments(), "db", "web", d, &WriteOptions::default())
            .unwrap();
    }
    let second = wait_for("two new ready pods", || {
        let pods = ready_pods(&store);
        let renewed = pods.len() == 2
            && pods
                .iter()
                .all(|p| p["metadata"]["labels"]["pod-template-hash"] != hash.as_str());
        renewed.then_some(pods)
    })
    .await;
    for pid in old_pids {
        assert!(!alive(pid), "an old pod's process still runs");
    }
    let status = wait_for("the new status", || {
        get(&store, &deployments(), "web").filter(|d| {
            d["status"]["observedGeneration"] == 2
                && d["status"]["updatedReplicas"] == 2
                && d["status"]["readyReplicas"] == 2
        })
    })
    .await;
    assert_eq!(
        status["status"]["conditions"][1]["reason"],
        "NewReplicaSetAvailable"
    );
    let log_name = format!(
        "logs/db_{}_sleeper.log",
        second[0]["metadata"]["name"].as_str().unwrap()
    );
    let ip = second[0]["status"]["podIP"].as_str().unwrap();
    let log = std::fs::read_to_string(dir.join("state").join(log_name)).unwrap();
    assert_eq!(log.trim(), format!("listening on {ip}"));

    let last: Vec<u32> = second.iter().map(pid_of).collect();
    stop.send(()).unwrap();
    tokio::time::timeout(WAIT, runner)
        .await
        .expect("the runner stops")
        .unwrap()
        .unwrap();
    for pid in last {
        assert!(!alive(pid), "a process outlived the runner");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn bare_pod(name: &str, restart_policy: &str, init: Option<&str>, script: &str) -> Value {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "db"},
        "spec": {
            "restartPolicy": restart_policy,
            "volumes": [{"name": "scratch", "emptyDir": {}}],
            "containers": [{
                "name": "main",
                "image": "shell",
                "command": ["sh", "-c", script, "--output=/scratch/out"],
                "env": [
                    {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "WHERE", "value": "/scratch/sub"},
                ],
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
            }],
        },
    });
    if let Some(init) = init {
        pod["spec"]["initContainers"] =
            json!([{"name": "init", "image": "shell", "command": ["sh", "-c", init]}]);
    }
    pod
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_pods_follow_their_restart_policy_and_map_volumes_env_and_addresses() {
    let dir = state_dir("pods");
    let mut settings = settings(&dir);
    settings.first_address = std::net::Ipv4Addr::new(127, 3, 0, 1);
    let store = store();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(run(store.clone(), settings, async {
        let _ = stopped.await;
    }));
    // $0 is the argument after the script: `--output=<emptyDir>/out`.
    let script = r#"echo "$IP $NS $WHERE $0" > "${0#--output=}"; cp "${0#--output=}" "$WHERE.copy" 2>/dev/null; mkdir -p "$WHERE" && cp "${0#--output=}" "$WHERE/out""#;
    let create = |pod: Value| {
        store
            .lock()
            .unwrap()
            .create(
                &pods(),
                "db",
                pod,
                &WriteOptions::default(),
                Timestamp::now(),
            )
            .unwrap();
    };
    store.lock().unwrap().register(
        ResourceKey::new("", "v1", "secrets"),
        ResourceInfo::new("Secret", true),
    );
    store
        .lock()
        .unwrap()
        .create(
            &ResourceKey::new("", "v1", "secrets"),
            "db",
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "family"},
                   "data": {"token": "czNjcmV0"}}),
            &WriteOptions::default(),
            Timestamp::now(),
        )
        .unwrap();
    let mut done = bare_pod("done", "Never", Some("exit 0"), script);
    done["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "cred", "secret": {"secretName": "family"}}));
    let main = &mut done["spec"]["containers"][0];
    main["volumeMounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "cred", "mountPath": "/etc/cred"}));
    main["env"].as_array_mut().unwrap().extend([
        json!({"name": "CRED", "value": "/etc/cred/token"}),
        json!({"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "family", "key": "token"}}}),
    ]);
    main["command"][2] = json!(format!(
        r#"{script}; echo "$TOKEN $(cat "$CRED")" >> "$WHERE/out""#
    ));
    create(done);
    create(bare_pod("bad-init", "Never", Some("exit 3"), "exit 0"));
    create(bare_pod("retried", "Always", Some("exit 4"), "exit 0"));
    create(bare_pod("crashing", "Always", None, "exit 5"));
    let mut foreign = bare_pod("foreign", "Always", None, "exit 0");
    foreign["spec"]["containers"][0]["image"] = json!("nginx:1.27");
    create(foreign);

    let done = wait_for("a finished pod", || {
        get(&store, &pods(), "done").filter(|p| p["status"]["phase"] == "Succeeded")
    })
    .await;
    let ip = done["status"]["podIP"].as_str().unwrap();
    let status = &done["status"]["containerStatuses"][0];
    assert_eq!(status["state"]["terminated"]["exitCode"], 0);
    assert_eq!(status["state"]["terminated"]["reason"], "Completed");
    assert_eq!(
        done["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"],
        0
    );
    let written =
        std::fs::read_to_string(dir.join("state/pods/db_done/volumes/scratch/sub/out")).unwrap();
    let scratch = dir.join("state/pods/db_done/volumes/scratch");
    assert_eq!(
        written.trim(),
        format!(
            "{ip} db {}/sub --output={}/out\ns3cret s3cret",
            scratch.display(),
            scratch.display()
        )
    );

    let bad = wait_for("a failed pod", || {
        get(&store, &pods(), "bad-init").filter(|p| p["status"]["phase"] == "Failed")
    })
    .await;
    assert_eq!(
        bad["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"],
        3
    );
    assert_eq!(
        bad["status"]["containerStatuses"][0]["state"]["waiting"]["reason"],
        "PodInitializing"
    );

    let retried = wait_for("a retried init container", || {
        get(&store, &pods(), "retried").filter(|p| {
            p["status"]["initContainerStatuses"][0]["restartCount"]
                .as_u64()
                .is_some_and(|n| n >= 2)
        })
    })
    .await;
    assert_eq!(retried["status"]["phase"], "Pending");
    assert_eq!(retried["status"]["conditions"][1]["type"], "Initialized");
    assert_eq!(retried["status"]["conditions"][1]["status"], "False");

    let crashing = wait_for("a restarted container", || {
        get(&store, &pods(), "crashing").filter(|p| {
            p["status"]["containerStatuses"][0]["restartCount"]
                .as_u64()
                .is_some_and(|n| n >= 2)
        })
    })
    .await;
    assert_eq!(crashing["status"]["phase"], "Running");
    assert_eq!(
        crashing["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"],
        5
    );

    let foreign = wait_for("an unscheduled pod", || {
        get(&store, &pods(), "foreign").filter(|p| p["status"]["phase"] == "Pending")
    })
    .await;
    assert_eq!(
        foreign["status"]["conditions"][0]["reason"],
        "Unschedulable"
    );
    assert!(foreign["metadata"].get("finalizers").is_none());

    // A process that ignores SIGTERM is killed after the pod's grace period; the pod
    // stays, marked for deletion, until then.
    let mut stubborn = bare_pod("stubborn", "Always", None, "trap '' TERM; exec sleep 600");
    stubborn["spec"]["terminationGracePeriodSeconds"] = json!(3);
    create(stubborn);
    let running = wait_for("a stubborn pod", || {
        get(&store, &pods(), "stubborn").filter(ready)
    })
    .await;
    let pid = pid_of(&running);
    let deleted_at = Instant::now();
    store
        .lock()
        .unwrap()
        .delete(
            &pods(),
            "db",
            "stubborn",
            &DeleteOptions::default(),
            Timestamp::now(),
        )
        .unwrap();
    let held = get(&store, &pods(), "stubborn").expect("held by the kubelet");
    assert!(held["metadata"]["deletionTimestamp"].is_string());
    wait_for("a terminating pod not ready", || {
        get(&store, &pods(), "stubborn").filter(|p| !ready(p))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(alive(pid), "SIGTERM is ignored until the grace period ends");
    assert!(get(&store, &pods(), "stubborn").is_some());
    wait_for("the stubborn pod gone", || {
        get(&store, &pods(), "stubborn").is_none().then_some(())
    })
    .await;
    assert!(deleted_at.elapsed() >= Duration::from_secs(3));
    assert!(!alive(pid));
    assert!(!dir.join("state/pods/db_stubborn").exists());

    // Once settled, a pass writes nothing.
    store
        .lock()
        .unwrap()
        .delete(
            &pods(),
            "db",
            "crashing",
            &DeleteOptions::default(),
            Timestamp::now(),
        )
        .unwrap();
    store
        .lock()
        .unwrap()
        .delete(
            &pods(),
            "db",
            "retried",
            &DeleteOptions::default(),
            Timestamp::now(),
        )
        .unwrap();
    wait_for("deleted pods gone", || {
        (get(&store, &pods(), "crashing").is_none() && get(&store, &pods(), "retried").is_none())
            .then_some(())
    })
    .await;
    let version = store.lock().unwrap().resource_version();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(store.lock().unwrap().resource_version(), version);

    stop.send(()).unwrap();
    tokio::time::timeout(WAIT, runner)
        .await
        .expect("the runner stops")
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
