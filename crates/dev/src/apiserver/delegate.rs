//! Delegate mode: the API groups of [`DELEGATED_GROUPS`] are served by another API server
//! (plain HTTP), the rest by the embedded one, and clients still see one server.
//!
//! Every request under `/apis/<delegated group>/...` (and the OpenAPI documents of those
//! groups) goes to the delegate as it came, headers included (authentication headers are
//! passed on, none are added); its answer comes back unchanged, the body streamed as it
//! arrives (watches). Discovery (`/apis`, legacy and aggregated) and the `/openapi/v3`
//! index are merged: the local groups but the delegated ones, and the delegate's entries
//! of the delegated groups. A delegate that cannot be reached is a 503 `Status` naming it.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::sync::watch;

/// The API groups a delegate serves.
pub const DELEGATED_GROUPS: &[&str] = &[
    "apiextensions.k8s.io",
    "multisite.dev",
    "coordination.k8s.io",
    "events.k8s.io",
];

/// How long connecting to the delegate may take before the client gets a 503.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a discovery document from the delegate may take.
const DOCUMENT_TIMEOUT: Duration = Duration::from_secs(15);

/// Whether requests for `group` go to the delegate.
pub fn delegated(group: &str) -> bool {
    DELEGATED_GROUPS.contains(&group)
}

/// Headers that belong to one connection, not to the request or answer.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

fn end_to_end(name: &HeaderName) -> bool {
    !HOP_BY_HOP.contains(&name.as_str())
}

/// The other API server and the HTTP client that reaches it.
#[derive(Clone)]
pub struct Delegate {
    /// `http://host:port` (with any path prefix), without a trailing slash.
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for Delegate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delegate")
            .field("base", &self.base)
            .finish()
    }
}

impl Delegate {
    /// A delegate at `url` (`http://host:port`; plain HTTP only).
    pub fn new(url: &str) -> Result<Self, String> {
        let base = url.trim().trim_end_matches('/').to_string();
        let parsed: Uri = base
            .parse()
            .map_err(|e| format!("the delegate URL {url:?} is not a URL: {e}"))?;
        if parsed.scheme_str() != Some("http") || parsed.authority().is_none() {
            return Err(format!(
                "the delegate URL {url:?} must be http://HOST:PORT (plain HTTP)"
            ));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self { base, client })
    }

    /// The delegate's URL as given.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// The 503 answer when the delegate does not answer.
    pub fn unavailable(&self, reason: &str) -> Response {
        let body = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("the delegate API server {} does not answer: {reason}", self.base),
            "reason": "ServiceUnavailable",
            "code": 503,
        });
        let mut response = (StatusCode::SERVICE_UNAVAILABLE, body.to_string()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }

    fn target(&self, uri: &Uri) -> Result<Uri, String> {
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        format!("{}{path}", self.base)
            .parse()
            .map_err(|e| format!("cannot address {path} there: {e}"))
    }

    /// Sends the request to the delegate and gives back its answer, the body streamed
    /// until it ends or `closing` turns true (the server shuts down: a forwarded watch
    /// must not hold it open).
    pub async fn forward(
        &self,
        method: Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: Bytes,
        closing: watch::Receiver<bool>,
    ) -> Response {
        let target = match self.target(uri) {
            Ok(target) => target,
            Err(reason) => return self.unavailable(&reason),
        };
        let mut request = hyper::Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = target;
        for (name, value) in headers {
            if name != header::HOST && end_to_end(name) {
                request.headers_mut().append(name.clone(), value.clone());
            }
        }
        match self.client.request(request).await {
            Ok(answer) => {
                let (parts, incoming) = answer.into_parts();
                let mut response = Response::new(streamed(incoming, closing));
                *response.status_mut() = parts.status;
                for (name, value) in &parts.headers {
                    if end_to_end(name) {
                        response.headers_mut().append(name.clone(), value.clone());
                    }
                }
                response
            }
            Err(error) => self.unavailable(&describe(&error)),
        }
    }

    /// A JSON document of the delegate (discovery, OpenAPI index), asked for with `accept`.
    /// An error is the answer to give the client.
    pub async fn document(&self, path: &str, accept: &str) -> Result<Value, Response> {
        let target: Uri = format!("{}{path}", self.base)
            .parse()
            .map_err(|e| self.unavailable(&format!("cannot address {path} there: {e}")))?;
        let mut request = hyper::Request::new(Full::new(Bytes::new()));
        *request.uri_mut() = target;
        if let Ok(value) = HeaderValue::from_str(accept) {
            request.headers_mut().insert(header::ACCEPT, value);
        }
        let fetch = async {
            let answer = self
                .client
                .request(request)
                .await
                .map_err(|e| describe(&e))?;
            let status = answer.status();
            let bytes = answer
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            if !status.is_success() {
                return Err(format!("{path} answered {status}"));
            }
            serde_json::from_slice::<Value>(&bytes)
                .map_err(|e| format!("{path} answered no JSON: {e}"))
        };
        match tokio::time::timeout(DOCUMENT_TIMEOUT, fetch).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(reason)) => Err(self.unavailable(&reason)),
            Err(_) => Err(self.unavailable(&format!(
                "no answer to {path} within {} s",
                DOCUMENT_TIMEOUT.as_secs()
            ))),
        }
    }
}

/// The delegate's answer body, chunk by chunk as it arrives, ending early when `closing`
/// turns true.
fn streamed(incoming: hyper::body::Incoming, closing: watch::Receiver<bool>) -> Body {
    let chunks = futures::stream::unfold(Some((incoming, closing)), |state| async move {
        let (mut incoming, mut closing) = state?;
        loop {
            // None: the server closes; Some(None): the answer is complete.
            let next = tokio::select! {
                frame = incoming.frame() => Some(frame),
                _ = closing.wait_for(|closed| *closed) => None,
            };
            match next?? {
                Err(error) => return Some((Err(error), None)),
                Ok(frame) => {
                    // Trailers are not passed on.
                    if let Ok(data) = frame.into_data() {
                        return Some((Ok(data), Some((incoming, closing))));
                    }
                }
            }
        }
    });
    Body::from_stream(chunks)
}

/// The error and its causes on one line (hyper's own text is only "client error").
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Keeps the entries of `local[field]` not of a delegated group and adds those of
/// `remote[field]` of a delegated group; `name` finds an entry's group.
fn merge_entries(
    mut local: Value,
    remote: &Value,
    field: &str,
    name: impl Fn(&Value) -> Option<&str>,
) -> Value {
    let mut entries: Vec<Value> = local[field]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|entry| !name(entry).is_some_and(delegated))
        .cloned()
        .collect();
    entries.extend(
        remote[field]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|entry| name(entry).is_some_and(delegated))
            .cloned(),
    );
    local[field] = Value::Array(entries);
    local
}

/// `/apis` as an `APIGroupList`: the local groups and the delegate's delegated ones.
pub fn merge_group_list(local: Value, remote: &Value) -> Value {
    merge_entries(local, remote, "groups", |g| g["name"].as_str())
}

/// `/apis` as aggregated discovery (`APIGroupDiscoveryList`), merged the same way.
pub fn merge_aggregated(local: Value, remote: &Value) -> Value {
    merge_entries(local, remote, "items", |g| g["metadata"]["name"].as_str())
}

/// Whether an aggregated discovery answer is one (a server may answer the legacy list).
pub fn is_aggregated(document: &Value) -> bool {
    document["kind"] == "APIGroupDiscoveryList"
}

/// The `/openapi/v3` index: the local paths but the delegated groups', and the
/// delegate's paths of the delegated groups (their documents are fetched through the
/// forwarding, so their `serverRelativeURL`s stay as the delegate gives them).
pub fn merge_openapi_index(mut local: Value, remote: &Value) -> Value {
    let group_of = |path: &str| -> Option<String> {
        let rest = path.strip_prefix("apis/")?;
        Some(rest.split('/').next().unwrap_or_default().to_string())
    };
    let mut paths = serde_json::Map::new();
    if let Some(own) = local["paths"].as_object() {
        for (path, entry) in own {
            if !group_of(path).is_some_and(|g| delegated(&g)) {
                paths.insert(path.clone(), entry.clone());
            }
        }
    }
    if let Some(theirs) = remote["paths"].as_object() {
        for (path, entry) in theirs {
            if group_of(path).is_some_and(|g| delegated(&g)) {
                paths.insert(path.clone(), entry.clone());
            }
        }
    }
    local["paths"] = Value::Object(paths);
    local
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_lists_take_each_group_from_its_side() {
        let local = json!({"kind": "APIGroupList", "groups": [
            {"name": "apps"}, {"name": "multisite.dev", "local": true}, {"name": "events.k8s.io"}]});
        let remote = json!({"groups": [
            {"name": "multisite.dev"}, {"name": "events.k8s.io"}, {"name": "other.example"}]});
        let merged = merge_group_list(local, &remote);
        let names: Vec<&str> = merged["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["apps", "multisite.dev", "events.k8s.io"]);
        assert!(merged["groups"][1].get("local").is_none());
        assert_eq!(merged["kind"], "APIGroupList");
    }

    #[test]
    fn openapi_index_takes_delegated_paths_from_the_delegate() {
        let local = json!({"paths": {"api/v1": {"serverRelativeURL": "/openapi/v3/api/v1"},
            "apis/multisite.dev/v1alpha1": {"serverRelativeURL": "local"}}});
        let remote = json!({"paths": {
            "apis/multisite.dev/v1alpha1": {"serverRelativeURL": "/openapi/v3/apis/multisite.dev/v1alpha1?hash=1"},
            "apis/apps/v1": {"serverRelativeURL": "theirs"}}});
        let merged = merge_openapi_index(local, &remote);
        let paths = merged["paths"].as_object().unwrap();
        assert_eq!(paths.len(), 2);
        assert_eq!(
            paths["apis/multisite.dev/v1alpha1"]["serverRelativeURL"],
            "/openapi/v3/apis/multisite.dev/v1alpha1?hash=1"
        );
        assert!(paths.contains_key("api/v1"));
    }

    #[test]
    fn only_plain_http_delegates() {
        assert!(Delegate::new("http://127.0.0.1:8080/").is_ok());
        assert!(Delegate::new("https://127.0.0.1:8080").is_err());
        assert!(Delegate::new("127.0.0.1:8080").is_err());
    }
}
