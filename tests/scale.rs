//! Scale benchmark of the operator on the embedded cluster (not part of the normal
//! run: it starts 150 replica servers). Run it with a release build:
//!
//! ```sh
//! cargo test --release --test scale -- --ignored --nocapture
//! ```
//!
//! It brings up one family of 50 replicas and 20 families of 5, then prints:
//! the operator's resident memory (against its own figure with no fleet, measured in
//! the same run), reconciles per second while the fleet is steady, how long the fleet
//! took to become Ready, and the time from a record written at one replica until every
//! replica of its family holds it. `SCALE_BIG` and `SCALE_SMALL` (families of 5)
//! change the sizes.

mod common;
use common::Proc;
use multisite::packet::change::ItemKind;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_multisite");

fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("kubectl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn apply(kubeconfig: &Path, yaml: &str) {
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["apply", "--server-side", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("kubectl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("write");
    assert!(child.wait().expect("kubectl").success(), "apply failed");
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn scrape(port: u16) -> String {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body
}

fn reconciles(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("multisite_reconciles_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn family_yaml(ns: &str, family: &str, replicas: usize) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\n\
         apiVersion: multisite.dev/v1alpha1\nkind: Site\nmetadata: {{name: site, namespace: {ns}}}\nspec: {{}}\n---\n\
         apiVersion: multisite.dev/v1alpha1\nkind: ReplicaFamily\nmetadata: {{name: {family}, namespace: {ns}}}\n\
         spec: {{idPrefix: SCALE, featureLevel: 7, sync: {{incrementalIntervalSeconds: 5, maxConcurrentIncremental: 5}}}}\n---\n"
    );
    for i in 0..replicas {
        out.push_str(&format!(
            "apiVersion: multisite.dev/v1alpha1\nkind: Replica\nmetadata: {{name: {family}-r{i:02}, namespace: {ns}}}\n\
             spec: {{family: {family}, site: site}}\n---\n"
        ));
    }
    out
}

/// Replica name -> (endpoint, active) for every Replica in the cluster.
fn replicas(kubeconfig: &Path) -> BTreeMap<String, (String, bool)> {
    let out = kubectl(
        kubeconfig,
        &[
            "get",
            "replicas",
            "-A",
            "-o",
            "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name} {.status.endpoint} {.status.phase}{\"\\n\"}{end}",
        ],
    );
    out.lines()
        .filter_map(|l| {
            let mut cells = l.split_whitespace();
            let name = cells.next()?.to_string();
            let endpoint = cells.next().unwrap_or_default().to_string();
            let active = cells.next() == Some("Active");
            Some((name, (endpoint, active)))
        })
        .collect()
}

fn secret_token(kubeconfig: &Path, ns: &str, family: &str) -> String {
    let b64 = kubectl(
        kubeconfig,
        &[
            "get",
            "secret",
            "-n",
            ns,
            &format!("{family}-secret"),
            "-o",
            "jsonpath={.data.secret}",
        ],
    );
    let bytes: k8s_openapi::ByteString =
        serde_json::from_value(serde_json::Value::String(b64.trim().to_string())).expect("base64");
    multisite::replica::secret::from_bytes(&bytes.0)
        .expect("secret")
        .api_token
}

#[test]
#[ignore = "starts 150 replica servers; run by hand with --release -- --ignored --nocapture"]
fn scale() {
    let big: usize = std::env::var("SCALE_BIG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let small: usize = std::env::var("SCALE_SMALL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir: PathBuf = std::env::temp_dir().join(format!("multisite-scale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let _dev = Proc(
        Command::new(BIN)
            .args([
                "dev",
                "up",
                "--stand-in",
                "--no-operator",
                "--first-pod-address",
                "127.90.0.1",
                "--dir",
            ])
            .arg(&dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("dev.log")).expect("log"))
            .spawn()
            .expect("dev up"),
    );
    let kubeconfig = dir.join("kubeconfig");
    let start = Instant::now();
    while !dir.join("dev.pid").exists() {
        assert!(start.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(100));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let operator = Proc(
        Command::new(BIN)
            .args(["operator", "--metrics-addr"])
            .arg(format!("127.0.0.1:{port}"))
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("operator.log")).expect("log"))
            .spawn()
            .expect("operator"),
    );
    let pid = operator.0.id();
    std::thread::sleep(Duration::from_secs(3));
    let idle_rss = rss_kib(pid);

    let mut yaml = family_yaml("big", "big", big);
    for f in 0..small {
        yaml.push_str(&family_yaml(&format!("small{f:02}"), "fam", 5));
    }
    let total = big + 5 * small;
    let applied = Instant::now();
    apply(&kubeconfig, &yaml);
    let mut peak_rss = 0;
    loop {
        peak_rss = peak_rss.max(rss_kib(pid));
        let all = replicas(&kubeconfig);
        let active = all.values().filter(|(_, a)| *a).count();
        if active == total {
            break;
        }
        assert!(
            applied.elapsed() < Duration::from_secs(900),
            "only {active} of {total} replicas Active after 15 min"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    let ready_after = applied.elapsed();

    // Steady state: reconcile rate and memory over a quiet minute.
    let before = reconciles(&scrape(port));
    let window = Duration::from_secs(30);
    let t0 = Instant::now();
    while t0.elapsed() < window {
        peak_rss = peak_rss.max(rss_kib(pid));
        std::thread::sleep(Duration::from_secs(2));
    }
    let rate = (reconciles(&scrape(port)) - before) as f64 / window.as_secs_f64();
    let steady_rss = rss_kib(pid);

    // Propagation: a record written at one replica, until every replica holds it.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let all = replicas(&kubeconfig);
    let compat = multisite::domain::compat::Compatibility::builtin();
    let release = multisite::cmd::replica::newest_release(&compat);
    let mut propagation = Vec::new();
    for (ns, family, size) in [("big", "big", big), ("small00", "fam", 5)] {
        let client = multisite::replica::api::ReplicaClient::new(
            secret_token(&kubeconfig, ns, family),
            Some(release.clone()),
        );
        let urls: Vec<String> = all
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{ns}/")))
            .map(|(_, (url, _))| url.clone())
            .collect();
        assert_eq!(urls.len(), size);
        let body = common::defect(&[("headline", "scale")]);
        let written = Instant::now();
        let id = rt
            .block_on(client.create_item(&urls[0], ItemKind::Record, &body))
            .expect("create")
            .id;
        let mut waiting: Vec<String> = urls[1..].to_vec();
        while !waiting.is_empty() {
            waiting.retain(|url| {
                rt.block_on(client.get_item(url, ItemKind::Record, &id))
                    .is_err()
            });
            assert!(
                written.elapsed() < Duration::from_secs(600),
                "{id} did not reach every replica"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        propagation.push((ns, size, written.elapsed()));
    }

    println!("scale: {total} replicas in {} families", 1 + small);
    println!(
        "  fleet Ready (all replicas Active) after {:.1} s",
        ready_after.as_secs_f64()
    );
    println!(
        "  operator memory: idle {} MiB, steady {} MiB, peak {} MiB (steady/idle {:.1}x)",
        idle_rss / 1024,
        steady_rss / 1024,
        peak_rss / 1024,
        steady_rss as f64 / idle_rss.max(1) as f64
    );
    println!("  reconciles per second while steady: {rate:.1}");
    for (ns, size, took) in propagation {
        println!(
            "  one record from one replica to all {size} of {ns}: {:.1} s (incremental interval 5 s, 5 tasks at once)",
            took.as_secs_f64()
        );
    }
}
