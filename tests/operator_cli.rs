//! `multisite operator` refusing to start, with messages that say what to do.

use multisite::dev::apiserver::{self, ApiServer};
use std::process::{Command, Output};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_multisite");

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs the operator with `args` against the cluster in `kubeconfig`, bounded in time.
async fn operator(kubeconfig: &std::path::Path, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(BIN);
    command
        .arg("operator")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("POD_NAMESPACE")
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the operator ended within 60 s")
        .expect("run the operator")
}

#[tokio::test]
async fn refuses_a_cluster_without_the_crds_and_bad_flags() {
    // An API server with the built-in kinds only.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(apiserver::serve(listener, ApiServer::new(None).unwrap()));
    let dir = std::env::temp_dir().join(format!("multisite-operator-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, apiserver::kubeconfig(&url)).unwrap();

    let out = operator(&kubeconfig, &[]).await;
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("custom resource definitions are not installed")
            && err.contains("missing: replicafamilies, replicas, sites, schemapackages")
            && err.contains("kubectl apply -f crds/"),
        "{err}"
    );

    let out = operator(&kubeconfig, &["--leader-election"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--lease-namespace or POD_NAMESPACE"),
        "{}",
        text(&out.stderr)
    );

    let out = operator(&kubeconfig, &["--metrics-addr", "localhost"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--metrics-addr \"localhost\": expected ADDRESS:PORT"),
        "{}",
        text(&out.stderr)
    );

    let out = operator(&kubeconfig, &["--log-format", "xml"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("invalid value 'xml'"),
        "{}",
        text(&out.stderr)
    );

    let out = Command::new(BIN)
        .args(["operator", "--help"])
        .output()
        .unwrap();
    let help = text(&out.stdout);
    for flag in [
        "--leader-election",
        "--watch-namespaces",
        "--metrics-addr",
        "--log-format",
        "--image",
    ] {
        assert!(help.contains(flag), "{help}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
