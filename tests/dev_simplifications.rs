//! Where the embedded API server is simpler than Kubernetes, these tests pin what it
//! does instead, so that a change of behaviour is a decision and not an accident.
//! (Namespaces being active at once and emptied at once, and protobuf bodies refused
//! with 415, are pinned in dev_apiserver.rs.)

use multisite::dev::apiserver::{self, ApiServer};
use serde_json::{Value, json};

async fn start() -> kube::Client {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(apiserver::serve(
        listener,
        ApiServer::new(None).expect("server"),
    ));
    kube::Client::try_from(kube::Config::new(url.parse().expect("url"))).expect("client")
}

/// Sends a request; returns the status code and the body.
async fn send(
    client: &kube::Client,
    method: &str,
    path: &str,
    content_type: &str,
    body: Value,
) -> (u16, Value) {
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", content_type)
        .body(body.to_string().into_bytes())
        .expect("request");
    match client.request_text(request).await {
        Ok(text) => (
            200,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ),
        Err(kube::Error::Api(status)) => (
            status.code,
            json!({"reason": status.reason, "message": status.message}),
        ),
        Err(other) => panic!("{other}"),
    }
}

#[tokio::test]
async fn built_in_kinds_are_stored_without_validation() {
    let client = start().await;
    // A real server refuses a ConfigMap whose data holds a number; this one stores it.
    let (code, body) = send(
        &client,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/json",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "loose"}, "data": {"n": 1}}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["n"], 1);
}

#[tokio::test]
async fn a_failing_json_patch_is_a_400() {
    let client = start().await;
    send(
        &client,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/json",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "p"}, "data": {"a": "1"}}),
    )
    .await;
    let (code, _) = send(
        &client,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/p",
        "application/json-patch+json",
        json!([{"op": "test", "path": "/data/a", "value": "2"}]),
    )
    .await;
    assert_eq!(code, 400);
}

#[tokio::test]
async fn paths_not_served() {
    let client = start().await;
    for path in [
        "/api/v1/watch/namespaces/default/configmaps",
        "/openapi/v2",
        "/api/v1/namespaces/default/pods/x/log",
    ] {
        let (code, body) = send(&client, "GET", path, "application/json", Value::Null).await;
        assert_eq!(code, 404, "{path}: {body}");
    }
}

#[tokio::test]
async fn crds_are_established_at_once() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let client = start().await;
    let api: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    let crd = multisite::api::crds().remove(0);
    let created = api
        .create(&kube::api::PostParams::default(), &crd)
        .await
        .expect("create");
    let conditions = created
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default();
    assert!(
        conditions
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True"),
        "{conditions:?}"
    );
}
