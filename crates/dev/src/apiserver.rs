//! The HTTP layer of the embedded API server: the Kubernetes REST API (the subset the
//! operator, kube's client and `kubectl` use) over the object store of [`crate`].
//!
//! Where it is simpler than the real server (tests in `tests/dev_apiserver.rs` pin these):
//! - JSON only: a protobuf body is refused with 415 (kubectl's typed subcommands such as
//!   `kubectl create namespace` send one; `kubectl apply` and kube's client send JSON);
//!   discovery is served both as the legacy documents and as aggregated discovery v2;
//! - `Table` answers (what `kubectl get` prints) have the main columns of the common
//!   built-in kinds (Name and Age for the others; see [`table`]) and the CRD's printer
//!   columns for custom resources;
//! - `/openapi/v3` documents hold, per group/version, one PATCH path per resource (naming
//!   its kind and the `fieldValidation` parameter, which kubectl checks before it leaves
//!   validation to the server) and the CRD schemas (for `kubectl explain`); no `/openapi/v2`;
//! - CRD validation messages put the value where the real server, for CEL rules, puts the
//!   type (`Invalid value: 7: <message>` instead of `Invalid value: "integer": <message>`);
//! - strategic merge patch (built-in kinds only, as on the real server) knows the merge keys
//!   of the common lists (containers, env, volumes, volumeMounts, ports, conditions,
//!   ownerReferences, ...), `finalizers` as a set and the `$patch: delete|replace`
//!   directives, not the kinds' full patch strategies nor `$retainKeys`/`$setElementOrder`;
//! - server-side apply is simplified: the applied object is merged into the stored one
//!   (maps key by key, lists replaced but for `x-kubernetes-list-type: map` lists of a
//!   CRD schema, merged item by item on their keys); field ownership is tracked per leaf
//!   (a list is one leaf, list items are not owned separately); creates, updates and the
//!   other patches record `Update` entries (manager: `fieldManager` or the user agent's
//!   program name) for the fields they changed, taking them from other managers; an apply
//!   that changes a field another manager owns is a 409 naming them, unless forced; a
//!   field this manager applied before and leaves out is removed unless another manager
//!   owns it;
//! - JSON patch failures are 400 Bad Request;
//! - validation is only for custom resources (built-in kinds are stored as given, with the
//!   store's metadata checks); `fieldValidation=Strict` refuses unknown fields with the
//!   real server's "strict decoding error" (400), `Warn` (the default) and `Ignore` prune them,
//!   `Warn` with a `Warning` header;
//! - no admission, no authentication or authorization; a new namespace is `Active` at
//!   once, and deleting one deletes its objects at once (objects with finalizers are left
//!   being deleted; the namespace does not wait for them in `Terminating`);
//! - a streaming list (`sendInitialEvents=true`) always starts from the latest state
//!   (`resourceVersionMatch` is not looked at);
//! - CRDs: every served version is its own resource with no conversion; the CRD's status
//!   is set to `NamesAccepted` and `Established` at once, without checking names for
//!   conflicts;
//! - no subresources but `status`, the `scale` of statefulsets and deployments and
//!   `pods/log` (see [`logs`]; no `scale` for CRDs, no `exec`, `attach`,
//!   `portforward`, `eviction`), no
//!   `/openapi/v2`, no legacy `/api/v1/watch/...` paths.
//!
//! [`ApiServer::delegate_to`] turns on delegate mode (see [`delegate`]): the CRD,
//! `multisite.dev`, Lease and Event groups are forwarded to another API server, core/v1
//! and apps/v1 stay here, and discovery merges both.
//!
//! [`ApiServer::audit_to`] appends one JSON line per request to a file (see [`audit`]):
//! the RBAC verb and resource each client asked for, so tests can check a role against
//! what a client really calls. The real server's audit policy, stages and event format
//! are not modelled.

pub mod audit;
pub mod crd;
pub mod delegate;
pub mod discovery;
pub mod logs;
pub mod patch;
pub mod table;
pub mod views;

use crate::objects::{
    DEFAULT_EVENT_WINDOW, DeleteOptions, Deletion, EventType, ListOptions, Preconditions,
    ResourceKey, Store, WatchEvent, WriteOptions,
};
use crate::selectors::Selectors;
use crate::snapshot::SnapshotError;
use crate::status::{Error, GroupResource};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use crd::FieldValidation;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// The version `/version` reports.
pub const GIT_VERSION: &str = "v1.33.0-multisite";

/// How often an idle watch that asked for bookmarks gets one.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(5);

/// Why the API server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("cannot read the snapshot {path}: {source}")]
    ReadSnapshot {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the snapshot {path} is not usable: {source}")]
    Snapshot {
        path: PathBuf,
        source: SnapshotError,
    },
    #[error("the API server stopped: {0}")]
    Serve(std::io::Error),
}

/// A failed request: a store error, or a ready-made Status (apply conflicts).
#[derive(Debug)]
pub enum ApiError {
    Store(Error),
    Status { code: u16, body: Value },
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        Self::Store(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::Store(error) => json_response(error.code(), &error.status_json(), &[]),
            Self::Status { code, body } => json_response(code, &body, &[]),
        }
    }
}

struct Shared {
    store: Mutex<Store>,
    /// Carries the store's resourceVersion after every write; watches wait on it.
    changes: watch::Sender<u64>,
    /// Set when the server shuts down: open watches end.
    closing: Arc<watch::Sender<bool>>,
    snapshot: Option<PathBuf>,
    /// Changes not yet in the snapshot file.
    dirty: std::sync::atomic::AtomicBool,
    /// Where each request is recorded, once [`ApiServer::audit_to`] was called.
    audit: OnceLock<audit::AuditLog>,
    /// The server of the delegated groups, once [`ApiServer::delegate_to`] was called.
    delegate: OnceLock<delegate::Delegate>,
    /// Where pods' output is, once [`ApiServer::serve_logs_from`] was called.
    logs: OnceLock<Box<dyn logs::LogFiles>>,
}

/// How often a changed store is written to its snapshot file.
const SNAPSHOT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

impl Shared {
    fn save(&self, store: &Store) {
        let Some(path) = &self.snapshot else {
            return;
        };
        let result = store
            .to_bytes()
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                let temporary = path.with_extension("tmp");
                std::fs::write(&temporary, bytes)
                    .and_then(|()| std::fs::rename(&temporary, path))
                    .map_err(|e| e.to_string())
            });
        if let Err(error) = result {
            tracing::warn!(path = %path.display(), %error, "cannot write the dev cluster snapshot");
        }
    }
}

impl Drop for Shared {
    /// The last changes reach the snapshot when the server goes.
    fn drop(&mut self) {
        if *self.dirty.get_mut() {
            let store = self
                .store
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            self.save(&store);
        }
    }
}

/// The embedded API server's state: the store, shared by every request.
#[derive(Clone)]
pub struct ApiServer {
    shared: Arc<Shared>,
}

fn now_text() -> String {
    Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

impl ApiServer {
    /// A server over the store kept in `snapshot` (read when the file exists, written
    /// within [`SNAPSHOT_EVERY`] of a change, by [`ApiServer::flush`] and when the last
    /// handle goes), or over a new store kept in memory only. Built-in resources, the
    /// resources of stored CRDs and the `default` and `kube-system` namespaces are there
    /// from the start.
    pub fn new(snapshot: Option<PathBuf>) -> Result<Self, ApiServerError> {
        Self::with_event_window(snapshot, DEFAULT_EVENT_WINDOW)
    }

    /// [`ApiServer::new`] keeping the last `event_window` events for watches (older
    /// versions get 410).
    pub fn with_event_window(
        snapshot: Option<PathBuf>,
        event_window: usize,
    ) -> Result<Self, ApiServerError> {
        let mut store = match &snapshot {
            Some(path) if path.exists() => {
                let bytes = std::fs::read(path).map_err(|source| ApiServerError::ReadSnapshot {
                    path: path.clone(),
                    source,
                })?;
                Store::from_bytes(&bytes, event_window).map_err(|source| {
                    ApiServerError::Snapshot {
                        path: path.clone(),
                        source,
                    }
                })?
            }
            _ => Store::new(event_window),
        };
        discovery::register_builtins(&mut store);
        for stored in crd::stored_crds(&store) {
            crd::register(&mut store, &stored, None);
        }
        for namespace in ["default", "kube-system"] {
            let resource = discovery::namespaces_resource();
            if store.get(&resource, "", namespace).is_err() {
                let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
                // Cannot fail for these names; should it, the namespace is simply missing.
                if let Ok(created) = store.create(
                    &resource,
                    "",
                    body,
                    &WriteOptions::default(),
                    Timestamp::now(),
                ) {
                    activate_namespace(&mut store, &created);
                }
            }
        }
        let (changes, _) = watch::channel(store.resource_version());
        let server = Self {
            shared: Arc::new(Shared {
                store: Mutex::new(store),
                changes,
                closing: Arc::new(watch::channel(false).0),
                snapshot,
                dirty: std::sync::atomic::AtomicBool::new(false),
                audit: OnceLock::new(),
                delegate: OnceLock::new(),
                logs: OnceLock::new(),
            }),
        };
        server.save(&server.lock());
        if server.shared.snapshot.is_some() {
            // Writes the snapshot at most every SNAPSHOT_EVERY, not on each change: a
            // whole-store rewrite per change made big fleets crawl. Ends with the server.
            let weak = Arc::downgrade(&server.shared);
            std::thread::spawn(move || {
                loop {
                    std::thread::sleep(SNAPSHOT_EVERY);
                    match weak.upgrade() {
                        Some(shared) => ApiServer { shared }.flush(),
                        None => break,
                    }
                }
            });
        }
        Ok(server)
    }

    /// Writes the snapshot now if anything changed since the last write.
    pub fn flush(&self) {
        if self
            .shared
            .dirty
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            self.save(&self.lock());
        }
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.shared
            .store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads the store.
    pub fn read<R>(&self, f: impl FnOnce(&Store) -> R) -> R {
        f(&self.lock())
    }

    /// Changes the store directly (controllers in the same process); watches are woken
    /// and the snapshot written afterwards.
    pub fn write<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        let mut store = self.lock();
        let before = store.resource_version();
        let out = f(&mut store);
        // Controllers call this on every pass; only real changes wake watches and
        // rewrite the snapshot.
        if store.resource_version() != before {
            self.changed(&mut store);
        }
        out
    }

    fn changed(&self, store: &mut Store) {
        store.collect_garbage(Timestamp::now());
        self.shared.changes.send_replace(store.resource_version());
        self.shared
            .dirty
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn save(&self, store: &Store) {
        self.shared.save(store);
    }

    /// Appends one JSON line per request from now on to `path` (created when missing):
    /// verb, apiGroup, resource, subresource, namespace, name or nonResourceURL,
    /// userAgent and the status code answered. A server writes to one audit file only;
    /// a second call is refused.
    pub fn audit_to(&self, path: &std::path::Path) -> std::io::Result<()> {
        let log = audit::AuditLog::open(path)?;
        self.shared.audit.set(log).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "this API server already writes an audit log",
            )
        })
    }

    /// Pod log requests (`kubectl logs`) are answered from the files `files` names. Once
    /// only; a second call is refused.
    pub fn serve_logs_from(&self, files: impl logs::LogFiles) -> Result<(), String> {
        self.shared
            .logs
            .set(Box::new(files))
            .map_err(|_| "this API server already serves pod logs".to_string())
    }

    /// Delegate mode: from now on the groups of [`delegate::DELEGATED_GROUPS`] are served
    /// by the API server at `url` (plain HTTP), requests for them forwarded there, and
    /// discovery merges both servers. The garbage collector no longer collects objects
    /// whose owner is of a delegated group (the owner is not in this store). Once only.
    pub fn delegate_to(&self, url: &str) -> Result<(), String> {
        let delegate = delegate::Delegate::new(url)?;
        self.shared
            .delegate
            .set(delegate)
            .map_err(|_| "this API server already has a delegate".to_string())?;
        self.lock()
            .set_foreign_owner_groups(delegate::DELEGATED_GROUPS);
        Ok(())
    }

    /// The delegate's URL in delegate mode.
    pub fn delegate_url(&self) -> Option<&str> {
        self.shared.delegate.get().map(delegate::Delegate::url)
    }

    /// The router serving the API.
    pub fn router(self) -> Router {
        Router::new().fallback(handle).with_state(self)
    }
}

/// Serves the API on `listener` until the future is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: ApiServer,
) -> Result<(), ApiServerError> {
    axum::serve(listener, server.router())
        .await
        .map_err(ApiServerError::Serve)
}

/// Serves the API on `listener` until `shutdown` completes; open watches are then ended and
/// requests in flight finished.
pub async fn serve_until(
    listener: tokio::net::TcpListener,
    server: ApiServer,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ApiServerError> {
    let closing = server.shared.closing.clone();
    axum::serve(listener, server.router())
        .with_graceful_shutdown(async move {
            shutdown.await;
            // Watches wait on changes: wake them so they see the server closing.
            let _ = closing.send(true);
        })
        .await
        .map_err(ApiServerError::Serve)
}

/// A kubeconfig pointing at `url` with no credentials, context `multisite-dev`.
pub fn kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: multisite-dev\n  cluster:\n    server: {url}\n\
         users:\n- name: multisite-dev\n  user: {{}}\ncontexts:\n- name: multisite-dev\n  context:\n    \
         cluster: multisite-dev\n    user: multisite-dev\n    namespace: default\n\
         current-context: multisite-dev\n"
    )
}

fn json_response(code: u16, body: &Value, warnings: &[String]) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for warning in warnings {
        let text = format!("299 - {}", Value::String(warning.clone()));
        if let Ok(value) = HeaderValue::from_str(&text) {
            headers.append("warning", value);
        }
    }
    response
}

fn ok(body: &Value) -> Response {
    json_response(200, body, &[])
}

/// The URL of an object or collection, taken apart.
struct Target {
    resource: ResourceKey,
    namespace: String,
    name: Option<String>,
    status: bool,
    /// The `scale` subresource (statefulsets and deployments).
    scale: bool,
}

fn has_scale(resource: &ResourceKey) -> bool {
    resource.group == "apps" && matches!(resource.plural.as_str(), "statefulsets" | "deployments")
}

fn parse_target(store: &Store, group: &str, version: &str, rest: &[&str]) -> Result<Target, Error> {
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..] if *plural != "status" && *plural != "finalize" => {
            (ns.to_string(), [&[*plural][..], tail].concat())
        }
        _ => (String::new(), rest.to_vec()),
    };
    let (plural, name, sub) = match rest.as_slice() {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(*sub)),
        _ => return Err(Error::ResourceNotFound),
    };
    let resource = ResourceKey::new(group, version, plural);
    let info = store
        .resource_info(&resource)
        .ok_or(Error::ResourceNotFound)?;
    let (status, scale) = match sub {
        None => (false, false),
        Some("status") if info.status_subresource => (true, false),
        Some("scale") if has_scale(&resource) => (false, true),
        Some(_) => return Err(Error::ResourceNotFound),
    };
    if !namespace.is_empty() && !info.namespaced {
        return Err(Error::ResourceNotFound);
    }
    Ok(Target {
        resource,
        namespace,
        name,
        status,
        scale,
    })
}

type Params = HashMap<String, String>;

fn param<'a>(params: &'a Params, key: &str) -> Option<&'a str> {
    params.get(key).map(String::as_str)
}

fn flag(params: &Params, key: &str) -> bool {
    matches!(param(params, key), Some("true" | "1"))
}

fn dry_run(params: &Params) -> Result<bool, Error> {
    match param(params, "dryRun") {
        None | Some("") => Ok(false),
        Some("All") => Ok(true),
        Some(other) => Err(Error::bad_request(format!(
            "Invalid dryRun value: {other}, supported values are: All"
        ))),
    }
}

fn parse_body(body: &[u8]) -> Result<Value, Error> {
    serde_json::from_slice(body).or_else(|json_error| {
        let text = std::str::from_utf8(body)
            .map_err(|_| Error::bad_request(format!("the body is not JSON: {json_error}")))?;
        serde_saphyr::from_str::<Value>(text)
            .map_err(|e| Error::bad_request(format!("the body is neither JSON nor YAML: {e}")))
    })
}

async fn handle(
    State(server): State<ApiServer>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if server.shared.audit.get().is_none() {
        return respond(server, method, uri, headers, body).await;
    }
    let request = audit::request_attributes(&method, uri.path(), uri.query());
    let user_agent = headers
        .get(header::USER_AGENT)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let response = respond(server.clone(), method, uri, headers, body).await;
    if let Some(log) = server.shared.audit.get() {
        log.record(&request, &user_agent, response.status().as_u16());
    }
    response
}

async fn respond(
    server: ApiServer,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let params: Params = match Query::<Params>::try_from_uri(&uri) {
        Ok(Query(p)) => p,
        Err(e) => return ApiError::from(Error::bad_request(e.to_string())).into_response(),
    };
    let path = uri.path().trim_end_matches('/').to_string();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_string();
    let get = method == Method::GET;
    let aggregated = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(discovery::aggregated_wanted);
    let aggregated_response = |body: Value| {
        let mut response = ok(&body);
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(discovery::AGGREGATED_CONTENT_TYPE),
        );
        response
    };
    if let Some(delegate) = server.shared.delegate.get() {
        match segments.as_slice() {
            ["apis", group, ..] | ["openapi", "v3", "apis", group, ..]
                if delegate::delegated(group) =>
            {
                let closing = server.shared.closing.subscribe();
                return delegate
                    .forward(method, &uri, &headers, body, closing)
                    .await;
            }
            ["apis"] if get && aggregated => {
                let local = server.read(|s| discovery::aggregated(s, false));
                return match delegate
                    .document("/apis", discovery::AGGREGATED_CONTENT_TYPE)
                    .await
                {
                    Ok(remote) if delegate::is_aggregated(&remote) => {
                        aggregated_response(delegate::merge_aggregated(local, &remote))
                    }
                    // The delegate answered the legacy list: so do we.
                    Ok(remote) => ok(&delegate::merge_group_list(
                        server.read(discovery::group_list),
                        &remote,
                    )),
                    Err(response) => response,
                };
            }
            ["apis"] if get => {
                return match delegate.document("/apis", "application/json").await {
                    Ok(remote) => ok(&delegate::merge_group_list(
                        server.read(discovery::group_list),
                        &remote,
                    )),
                    Err(response) => response,
                };
            }
            ["openapi", "v3"] if get => {
                return match delegate.document("/openapi/v3", "application/json").await {
                    Ok(remote) => ok(&delegate::merge_openapi_index(
                        server.read(openapi_index),
                        &remote,
                    )),
                    Err(response) => response,
                };
            }
            _ => {}
        }
    }
    match segments.as_slice() {
        ["version"] if get => ok(&json!({
            "major": "1",
            "minor": "33",
            "gitVersion": GIT_VERSION,
            "gitCommit": "",
            "gitTreeState": "clean",
            "buildDate": "1970-01-01T00:00:00Z",
            "goVersion": "",
            "compiler": "rustc",
            "platform": format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
        })),
        ["healthz" | "readyz" | "livez"] if get => (StatusCode::OK, "ok").into_response(),
        ["api"] if get && aggregated => {
            aggregated_response(server.read(|s| discovery::aggregated(s, true)))
        }
        ["apis"] if get && aggregated => {
            aggregated_response(server.read(|s| discovery::aggregated(s, false)))
        }
        ["api"] if get => ok(&discovery::core_versions(&host)),
        ["apis"] if get => ok(&server.read(discovery::group_list)),
        ["api", "v1"] if get => found(server.read(|s| discovery::resource_list(s, "", "v1"))),
        ["apis", group] if get => found(server.read(|s| discovery::group(s, group))),
        ["apis", group, version] if get => {
            found(server.read(|s| discovery::resource_list(s, group, version)))
        }
        ["openapi", "v3"] if get => ok(&server.read(openapi_index)),
        ["openapi", "v3", "version"] if get => ok(&openapi_version_document()),
        ["openapi", "v3", "apis", group] if get => {
            found(server.read(|s| openapi_group_document(s, group)))
        }
        ["openapi", "v3", "apis", group, version] if get => {
            found(server.read(|s| openapi_document(s, group, version)))
        }
        ["openapi", "v3", "api", version] if get => {
            found(server.read(|s| openapi_document(s, "", version)))
        }
        ["api", "v1", "namespaces", namespace, "pods", name, "log"] if get => {
            logs::pod_log(&server, namespace, name, &params).await
        }
        ["api", "v1", rest @ ..] => {
            resource_request(&server, "", "v1", rest, method, &headers, &params, body).await
        }
        ["apis", group, version, rest @ ..] => {
            resource_request(
                &server, group, version, rest, method, &headers, &params, body,
            )
            .await
        }
        _ => ApiError::from(Error::ResourceNotFound).into_response(),
    }
}

fn found(body: Option<Value>) -> Response {
    match body {
        Some(body) => ok(&body),
        None => ApiError::from(Error::ResourceNotFound).into_response(),
    }
}

fn openapi_index(store: &Store) -> Value {
    let mut paths = serde_json::Map::new();
    for (key, _) in store.resources() {
        let mut own = vec![if key.group.is_empty() {
            format!("api/{}", key.version)
        } else {
            format!("apis/{}/{}", key.group, key.version)
        }];
        // As the real server: a document per built-in group too (its discovery path);
        // groups that CRDs define have none.
        if !key.group.is_empty() && crd::crd_for(store, key).is_none() {
            own.push(format!("apis/{}", key.group));
        }
        for path in own {
            paths
                .entry(path.clone())
                .or_insert_with(|| json!({"serverRelativeURL": format!("/openapi/v3/{path}")}));
        }
    }
    paths.insert(
        "version".into(),
        json!({"serverRelativeURL": "/openapi/v3/version"}),
    );
    json!({"paths": paths})
}

/// The OpenAPI v3 document of `/version/`.
fn openapi_version_document() -> Value {
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": GIT_VERSION},
        "paths": {"/version/": {"get": {
            "description": "get the version information for this server",
            "operationId": "getCodeVersion",
            "responses": {"200": {"description": "OK"}}
        }}}
    })
}

/// The OpenAPI v3 document of a built-in group: its discovery path.
fn openapi_group_document(store: &Store, group: &str) -> Option<Value> {
    let built_in = store
        .resources()
        .into_iter()
        .any(|(key, _)| key.group == group && crd::crd_for(store, key).is_none());
    if !built_in {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": GIT_VERSION},
        "paths": {format!("/apis/{group}/"): {"get": {
            "description": "get information of a group",
            "operationId": "getAPIGroup",
            "responses": {"200": {"description": "OK"}}
        }}}
    }))
}

/// The OpenAPI v3 document of a group/version: a path per resource whose PATCH operation
/// names its kind and takes `fieldValidation` (kubectl looks for that before it sends
/// `fieldValidation=Strict` instead of validating on its side), and for custom resources
/// the schema of each kind, named as the real server names them (reversed group, version,
/// kind) with the GVK extension `kubectl explain` looks for.
fn openapi_document(store: &Store, group: &str, version: &str) -> Option<Value> {
    let prefix = if group.is_empty() {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    let mut paths = serde_json::Map::new();
    for (key, info) in store.resources() {
        if key.group != group || key.version != version {
            continue;
        }
        let gvk = json!({"group": group, "version": version, "kind": info.kind});
        let parameters = json!([
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        ]);
        let path = if info.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", key.plural)
        } else {
            format!("{prefix}/{}/{{name}}", key.plural)
        };
        paths.insert(
            path,
            json!({"patch": {
                "operationId": format!("patch{}", info.kind),
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": gvk,
                "parameters": parameters,
                "responses": {"200": {"description": "OK"}},
            }}),
        );
    }
    if paths.is_empty() {
        return None;
    }
    let reversed: Vec<&str> = group.split('.').rev().collect();
    let mut components = serde_json::Map::new();
    for (kind, mut schema) in crd::schemas_of_group_version(store, group, version) {
        schema["x-kubernetes-group-version-kind"] =
            json!([{"group": group, "version": version, "kind": kind}]);
        components.insert(format!("{}.{version}.{kind}", reversed.join(".")), schema);
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": GIT_VERSION},
        "paths": paths,
        "components": {"schemas": components},
    }))
}

#[allow(clippy::too_many_arguments)]
async fn resource_request(
    server: &ApiServer,
    group: &str,
    version: &str,
    rest: &[&str],
    method: Method,
    headers: &HeaderMap,
    params: &Params,
    body: Bytes,
) -> Response {
    let mut target = match server.read(|s| parse_target(s, group, version, rest)) {
        Ok(t) => t,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if content_type.starts_with("application/vnd.kubernetes.protobuf") && !body.is_empty() {
        return protobuf_refused().into_response();
    }
    // A view (events.k8s.io Events): the request goes to the stored resource, renamed.
    let view = views::view_of(&target.resource);
    let mut viewed_params;
    let (params, body) = match view {
        None => (params, body),
        Some(view) => {
            target.resource = view.stored_resource();
            viewed_params = params.clone();
            if let Some(selector) = viewed_params.get_mut("fieldSelector") {
                *selector = view.field_selector_to_stored(selector);
            }
            let body = if body.iter().all(u8::is_ascii_whitespace) {
                body
            } else {
                let parsed = match parse_body(&body) {
                    Ok(parsed) => parsed,
                    Err(e) => return ApiError::from(e).into_response(),
                };
                let stored = if content_type.starts_with("application/json-patch+json") {
                    view.json_patch_to_stored(parsed)
                } else {
                    view.to_stored(parsed)
                };
                Bytes::from(stored.to_string())
            };
            (&viewed_params, body)
        }
    };
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("unknown")
        .to_string();
    let as_table = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(table::wanted);
    if target.scale {
        let name = target.name.clone().unwrap_or_default();
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        return match scale(server, &target, &name, &method, params, content_type, &body) {
            Ok(object) => json_response(200, &object, &[]),
            Err(error) => error.into_response(),
        };
    }
    let result = match (&method, &target.name) {
        (&Method::GET, None) if flag(params, "watch") => {
            return watch_response(server.clone(), target, params, as_table, view);
        }
        (&Method::GET, None) => list(server, &target, params, as_table),
        (&Method::GET, Some(name)) => server
            .read(|s| -> Result<Value, Error> {
                let object = s.get(&target.resource, &target.namespace, name)?;
                if !as_table {
                    return Ok(object);
                }
                let crd = crd::crd_for(s, &target.resource);
                let metadata = json!({"resourceVersion": object["metadata"]["resourceVersion"]});
                Ok(table::table(
                    &target.resource,
                    crd.as_ref(),
                    std::slice::from_ref(&object),
                    metadata,
                    param(params, "includeObject"),
                ))
            })
            .map(|o| (200, o, Vec::new()))
            .map_err(ApiError::from),
        (&Method::POST, None) => create(server, &target, params, &user_agent, &body),
        (&Method::PUT, Some(name)) => update(server, &target, name, params, &user_agent, &body),
        (&Method::PATCH, Some(name)) => patch_object(
            server,
            &target,
            name,
            params,
            (&content_type, &user_agent),
            &body,
        ),
        (&Method::DELETE, Some(name)) => delete(server, &target, name, params, &body),
        (&Method::DELETE, None) => delete_collection(server, &target, params, &body),
        _ => Err(ApiError::from(Error::MethodNotAllowed {
            resource: GroupResource {
                group: target.resource.group.clone(),
                resource: target.resource.plural.clone(),
            },
            verb: method.to_string(),
        })),
    };
    match result {
        Ok((code, object, warnings)) => match view {
            Some(view) => json_response(code, &view.to_served(object), &warnings),
            None => json_response(code, &object, &warnings),
        },
        Err(error) => error.into_response(),
    }
}

type Answer = Result<(u16, Value, Vec<String>), ApiError>;

fn list(server: &ApiServer, target: &Target, params: &Params, as_table: bool) -> Answer {
    let selectors = Selectors::parse(
        param(params, "labelSelector"),
        param(params, "fieldSelector"),
    )?;
    let limit = match param(params, "limit") {
        None | Some("") => None,
        Some(text) => Some(
            text.parse::<u64>()
                .map_err(|_| Error::bad_request(format!("invalid limit: {text}")))?,
        ),
    };
    let options = ListOptions {
        selectors,
        limit,
        continue_token: param(params, "continue")
            .filter(|c| !c.is_empty())
            .map(str::to_string),
    };
    server.read(|store| {
        let info = store
            .resource_info(&target.resource)
            .ok_or(Error::ResourceNotFound)?;
        let list_kind = format!("{}List", info.kind);
        let namespace = Some(target.namespace.as_str()).filter(|n| !n.is_empty());
        let page = store.list(&target.resource, namespace, &options)?;
        let listed = page.to_json(&target.resource.api_version(), &list_kind);
        if as_table {
            let crd = crd::crd_for(store, &target.resource);
            return Ok((
                200,
                table::table(
                    &target.resource,
                    crd.as_ref(),
                    &page.items,
                    listed["metadata"].clone(),
                    param(params, "includeObject"),
                ),
                Vec::new(),
            ));
        }
        Ok((200, listed, Vec::new()))
    })
}

fn namespace_exists(store: &Store, target: &Target) -> Result<(), Error> {
    let namespaced = store
        .resource_info(&target.resource)
        .is_some_and(|i| i.namespaced);
    if namespaced
        && !target.namespace.is_empty()
        && store
            .get(&discovery::namespaces_resource(), "", &target.namespace)
            .is_err()
    {
        return Err(Error::NotFound {
            resource: GroupResource {
                group: String::new(),
                resource: "namespaces".into(),
            },
            name: target.namespace.clone(),
        });
    }
    Ok(())
}

/// After a CRD was written: serve what it declares and mark it established.
fn after_crd_write(store: &mut Store, crd_object: &Value, previous: Option<&Value>) -> Value {
    crd::register(store, crd_object, previous);
    let name = crd_object["metadata"]["name"].as_str().unwrap_or_default();
    let mut wanted = crd::accepted_status(crd_object, &now_text());
    // Keep the transition times when nothing else changes.
    if let Some(old) = crd_object.get("status") {
        if old["acceptedNames"] == wanted["acceptedNames"]
            && old["storedVersions"] == wanted["storedVersions"]
            && old["conditions"].is_array()
        {
            return crd_object.clone();
        }
        if let Some(conditions) = old["conditions"].as_array()
            && !conditions.is_empty()
        {
            wanted["conditions"] = json!(conditions);
        }
    }
    let mut with_status = crd_object.clone();
    with_status["status"] = wanted;
    store
        .update_status(
            &discovery::crd_resource(),
            "",
            name,
            with_status,
            &WriteOptions::default(),
        )
        .unwrap_or_else(|_| crd_object.clone())
}

/// A new namespace is `Active` at once (no namespace controller here).
fn activate_namespace(store: &mut Store, namespace: &Value) -> Value {
    let mut active = namespace.clone();
    active["status"] = json!({"phase": "Active"});
    let name = namespace["metadata"]["name"].as_str().unwrap_or_default();
    store
        .update_status(
            &discovery::namespaces_resource(),
            "",
            name,
            active,
            &WriteOptions::default(),
        )
        .unwrap_or_else(|_| namespace.clone())
}

/// Deleting a namespace deletes its objects at once (a simplification of the namespace
/// controller: objects with finalizers are left being deleted, and the namespace does not
/// wait for them).
fn empty_namespace(store: &mut Store, namespace: &str) {
    let resources: Vec<ResourceKey> = store
        .resources()
        .filter(|(_, info)| info.namespaced)
        .map(|(key, _)| key.clone())
        .collect();
    for resource in resources {
        let names: Vec<String> = store
            .list(&resource, Some(namespace), &ListOptions::default())
            .map(|l| {
                l.items
                    .iter()
                    .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        for name in names {
            // Already gone (garbage collected) is fine.
            let _ = store.delete(
                &resource,
                namespace,
                &name,
                &DeleteOptions::default(),
                Timestamp::now(),
            );
        }
    }
}

fn is_crd(resource: &ResourceKey) -> bool {
    *resource == discovery::crd_resource()
}

/// The manager of a non-apply write: `fieldManager`, or the user agent's program name as
/// the real server defaults it.
struct Writer {
    manager: String,
    api_version: String,
    time: String,
    status: bool,
}

impl Writer {
    fn of(target: &Target, params: &Params, user_agent: &str) -> Self {
        let manager = param(params, "fieldManager")
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| {
                user_agent
                    .split('/')
                    .next()
                    .unwrap_or("unknown")
                    .to_string()
            });
        Self {
            manager,
            api_version: target.resource.api_version(),
            time: now_text(),
            status: target.status,
        }
    }

    fn view(&self) -> patch::Writer<'_> {
        patch::Writer {
            manager: &self.manager,
            api_version: &self.api_version,
            time: &self.time,
            subresource: self.status.then_some("status"),
        }
    }
}

/// Keeps the stored `managedFields` when a write leaves them out, as the real server does.
fn keep_managed_fields(object: &mut Value, existing: &Value) {
    let given = object["metadata"].get("managedFields").is_some();
    if !given
        && let Some(managed) = existing["metadata"].get("managedFields")
        && let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut)
    {
        meta.insert("managedFields".into(), managed.clone());
    }
}

fn create(
    server: &ApiServer,
    target: &Target,
    params: &Params,
    user_agent: &str,
    body: &[u8],
) -> Answer {
    let object = parse_body(body)?;
    let dry = dry_run(params)?;
    let mode = FieldValidation::parse(param(params, "fieldValidation"))?;
    let mut store = server.lock();
    let writer = Writer::of(target, params, user_agent);
    let (code, object, warnings) =
        create_in(&mut store, target, object, dry, mode, Some(&writer.view()))?;
    if !dry {
        server.changed(&mut store);
    }
    Ok((code, object, warnings))
}

fn create_in(
    store: &mut Store,
    target: &Target,
    object: Value,
    dry: bool,
    mode: FieldValidation,
    writer: Option<&patch::Writer<'_>>,
) -> Answer {
    if target.status {
        return Err(Error::MethodNotAllowed {
            resource: target.resource.group_resource(),
            verb: "create".into(),
        }
        .into());
    }
    namespace_exists(store, target)?;
    let mut validated = crd::validate(store, &target.resource, object, None, mode)?;
    if let Some(writer) = writer {
        patch::record_update(None, &mut validated.object, writer);
    }
    let created = store.create(
        &target.resource,
        &target.namespace,
        validated.object,
        &WriteOptions { dry_run: dry },
        Timestamp::now(),
    )?;
    let created = if is_crd(&target.resource) && !dry {
        after_crd_write(store, &created, None)
    } else if target.resource == discovery::namespaces_resource() && !dry {
        activate_namespace(store, &created)
    } else {
        created
    };
    Ok((201, created, validated.warnings))
}

fn update(
    server: &ApiServer,
    target: &Target,
    name: &str,
    params: &Params,
    user_agent: &str,
    body: &[u8],
) -> Answer {
    let object = parse_body(body)?;
    let dry = dry_run(params)?;
    let mode = FieldValidation::parse(param(params, "fieldValidation"))?;
    let mut store = server.lock();
    let writer = Writer::of(target, params, user_agent);
    let answer = update_in(
        &mut store,
        target,
        name,
        object,
        dry,
        mode,
        Some(&writer.view()),
    )?;
    if !dry {
        server.changed(&mut store);
    }
    Ok(answer)
}

fn update_in(
    store: &mut Store,
    target: &Target,
    name: &str,
    mut object: Value,
    dry: bool,
    mode: FieldValidation,
    writer: Option<&patch::Writer<'_>>,
) -> Answer {
    let existing = store.get(&target.resource, &target.namespace, name)?;
    keep_managed_fields(&mut object, &existing);
    let mut validated = crd::validate(store, &target.resource, object, Some(&existing), mode)?;
    if let Some(writer) = writer {
        patch::record_update(Some(&existing), &mut validated.object, writer);
    }
    let options = WriteOptions { dry_run: dry };
    let updated = if target.status {
        store.update_status(
            &target.resource,
            &target.namespace,
            name,
            validated.object,
            &options,
        )?
    } else {
        store.update(
            &target.resource,
            &target.namespace,
            name,
            validated.object,
            &options,
        )?
    };
    let updated = if is_crd(&target.resource) && !dry {
        after_crd_write(store, &updated, Some(&existing))
    } else {
        updated
    };
    Ok((200, updated, validated.warnings))
}

fn patch_object(
    server: &ApiServer,
    target: &Target,
    name: &str,
    params: &Params,
    (content_type, user_agent): (&str, &str),
    body: &[u8],
) -> Answer {
    let dry = dry_run(params)?;
    let mode = FieldValidation::parse(param(params, "fieldValidation"))?;
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let patch_body = parse_body(body)?;
    let mut store = server.lock();
    let existing = store.get(&target.resource, &target.namespace, name);
    let answer = match media.as_str() {
        "application/apply-patch+yaml" => {
            let Some(manager) = param(params, "fieldManager").filter(|m| !m.is_empty()) else {
                return Err(Error::bad_request(
                    "PATCH, fieldManager is required for apply requests",
                )
                .into());
            };
            let schema = crd::crd_for(&store, &target.resource)
                .and_then(|c| crd::version_schema(&c, &target.resource.version));
            let api_version = target.resource.api_version();
            let time = now_text();
            let request = patch::Apply {
                manager,
                force: flag(params, "force"),
                api_version: &api_version,
                time: &time,
                schema: schema.as_ref(),
            };
            let kind = (
                target.resource.plural.as_str(),
                target.resource.group.as_str(),
            );
            match existing {
                Ok(current) => {
                    let merged = patch::apply(Some(&current), &patch_body, &request, kind)?;
                    update_in(&mut store, target, name, merged, dry, mode, None)?
                }
                Err(Error::NotFound { .. }) if !target.status => {
                    let mut applied = patch_body;
                    if let Some(meta) = applied.get_mut("metadata").and_then(Value::as_object_mut) {
                        meta.remove("resourceVersion");
                        if meta.get("name").and_then(Value::as_str) != Some(name) {
                            return Err(Error::bad_request(
                                "the name of the object does not match the name on the URL",
                            )
                            .into());
                        }
                    }
                    let created = patch::apply(None, &applied, &request, kind)?;
                    create_in(&mut store, target, created, dry, mode, None)?
                }
                Err(other) => return Err(other.into()),
            }
        }
        "application/merge-patch+json"
        | "application/strategic-merge-patch+json"
        | "application/json-patch+json" => {
            let current = existing?;
            let mut patched = current.clone();
            match media.as_str() {
                "application/json-patch+json" => patch::json_patch(&mut patched, &patch_body)?,
                "application/strategic-merge-patch+json" => {
                    if crd::crd_for(&store, &target.resource).is_some() {
                        return Err(unsupported_media_type(&media));
                    }
                    patch::strategic_merge_patch(&mut patched, &patch_body);
                }
                _ => patch::merge_patch(&mut patched, &patch_body),
            }
            let writer = Writer::of(target, params, user_agent);
            let mut answer = update_in(
                &mut store,
                target,
                name,
                patched,
                dry,
                mode,
                Some(&writer.view()),
            )?;
            answer.0 = 200;
            answer
        }
        other => return Err(unsupported_media_type(other)),
    };
    if !dry {
        server.changed(&mut store);
    }
    // An apply that creates answers 201, as on the real server; other patches 200.
    Ok(answer)
}

/// 415 for a protobuf body (what kubectl's typed subcommands, `create namespace`,
/// `create secret`, ..., send), naming the way around.
fn protobuf_refused() -> ApiError {
    let mut error = unsupported_media_type("application/vnd.kubernetes.protobuf");
    if let ApiError::Status { body, .. } = &mut error {
        body["message"] = json!(
            "this API server (the embedded stand-in of `multisite dev up`) reads JSON and YAML \
             bodies only, not protobuf, which kubectl's typed subcommands (create namespace, \
             create secret, ...) send: write the object to a file and use `kubectl apply -f \
             FILE`, or add `--dry-run=client -o yaml | kubectl apply -f -` to the command"
        );
    }
    error
}

/// 415: a body this server does not read (protobuf, unknown patch types).
fn unsupported_media_type(got: &str) -> ApiError {
    ApiError::Status {
        code: 415,
        body: json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!(
                "the body of the request was in an unknown format - accepted media types include: \
                 application/json, application/yaml, application/json-patch+json, \
                 application/merge-patch+json, application/apply-patch+yaml (got {got:?})"
            ),
            "reason": "UnsupportedMediaType",
            "code": 415,
        }),
    }
}

fn delete(server: &ApiServer, target: &Target, name: &str, params: &Params, body: &[u8]) -> Answer {
    let options_body = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        parse_body(body)?
    };
    let text = |v: &Value| v.as_str().map(str::to_string);
    let body_dry_run = options_body["dryRun"]
        .as_array()
        .is_some_and(|a| a.iter().any(|v| v.as_str() == Some("All")));
    let options = DeleteOptions {
        preconditions: Preconditions {
            uid: text(&options_body["preconditions"]["uid"]),
            resource_version: text(&options_body["preconditions"]["resourceVersion"]),
        },
        dry_run: dry_run(params)? || body_dry_run,
    };
    if target.status {
        return Err(Error::MethodNotAllowed {
            resource: target.resource.group_resource(),
            verb: "delete".into(),
        }
        .into());
    }
    let mut store = server.lock();
    let deletion = store.delete(
        &target.resource,
        &target.namespace,
        name,
        &options,
        Timestamp::now(),
    )?;
    if !options.dry_run {
        if let Deletion::Deleted(gone) = &deletion
            && is_crd(&target.resource)
        {
            crd::unregister(&mut store, gone);
        }
        if target.resource == discovery::namespaces_resource() {
            empty_namespace(&mut store, name);
        }
        server.changed(&mut store);
    }
    Ok((200, deletion.object().clone(), Vec::new()))
}

/// DELETE on a collection: deletes every object the selectors match; answers the list of
/// what was deleted (or marked for deletion).
fn delete_collection(server: &ApiServer, target: &Target, params: &Params, body: &[u8]) -> Answer {
    if target.status {
        return Err(Error::ResourceNotFound.into());
    }
    let selectors = Selectors::parse(
        param(params, "labelSelector"),
        param(params, "fieldSelector"),
    )?;
    let options_body = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        parse_body(body)?
    };
    let dry = dry_run(params)?
        || options_body["dryRun"]
            .as_array()
            .is_some_and(|a| a.iter().any(|v| v.as_str() == Some("All")));
    let mut store = server.lock();
    let namespace = Some(target.namespace.as_str()).filter(|n| !n.is_empty());
    let listed = store.list(
        &target.resource,
        namespace,
        &ListOptions {
            selectors,
            ..ListOptions::default()
        },
    )?;
    let mut deleted = Vec::new();
    for object in &listed.items {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let object_namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
        let options = DeleteOptions {
            dry_run: dry,
            ..DeleteOptions::default()
        };
        match store.delete(
            &target.resource,
            object_namespace,
            name,
            &options,
            Timestamp::now(),
        ) {
            Ok(deletion) => deleted.push(deletion.object().clone()),
            Err(Error::NotFound { .. }) => {}
            Err(other) => return Err(other.into()),
        }
    }
    if !dry {
        server.changed(&mut store);
    }
    let kind = store
        .resource_info(&target.resource)
        .map(|i| format!("{}List", i.kind))
        .unwrap_or_default();
    Ok((
        200,
        json!({
            "apiVersion": target.resource.api_version(),
            "kind": kind,
            "metadata": {"resourceVersion": store.resource_version().to_string()},
            "items": deleted,
        }),
        Vec::new(),
    ))
}

/// An object's `autoscaling/v1` Scale.
fn scale_of(object: &Value) -> Value {
    let meta = &object["metadata"];
    let selector: Vec<String> = object["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"],
            "creationTimestamp": meta["creationTimestamp"],
        },
        "spec": {"replicas": object["spec"]["replicas"].as_i64().unwrap_or(1)},
        "status": {
            "replicas": object["status"]["replicas"].as_i64().unwrap_or(0),
            "selector": selector.join(","),
        },
    })
}

/// The `scale` subresource: GET reads `spec.replicas`, PUT and PATCH (merge, strategic or
/// JSON patch of the Scale) set it.
fn scale(
    server: &ApiServer,
    target: &Target,
    name: &str,
    method: &Method,
    params: &Params,
    content_type: &str,
    body: &[u8],
) -> Result<Value, ApiError> {
    let mut store = server.lock();
    let current = store.get(&target.resource, &target.namespace, name)?;
    let current_scale = scale_of(&current);
    let wanted = match *method {
        Method::GET => return Ok(current_scale),
        Method::PUT => parse_body(body)?,
        Method::PATCH => {
            let patch_body = parse_body(body)?;
            let mut patched = current_scale.clone();
            if content_type.starts_with("application/json-patch+json") {
                patch::json_patch(&mut patched, &patch_body)?;
            } else {
                patch::merge_patch(&mut patched, &patch_body);
            }
            patched
        }
        _ => {
            return Err(Error::MethodNotAllowed {
                resource: target.resource.group_resource(),
                verb: method.to_string(),
            }
            .into());
        }
    };
    let Some(replicas) = wanted["spec"]["replicas"].as_i64().filter(|r| *r >= 0) else {
        return Err(Error::Invalid {
            kind: crate::status::GroupKind {
                group: "autoscaling".into(),
                kind: "Scale".into(),
            },
            name: name.to_string(),
            causes: vec![crate::status::FieldError::invalid(
                "spec.replicas",
                wanted["spec"]["replicas"].clone(),
                "must be greater than or equal to 0",
            )],
        }
        .into());
    };
    let mut updated = current.clone();
    updated["spec"]["replicas"] = json!(replicas);
    if let Some(version) = wanted["metadata"]["resourceVersion"].as_str()
        && !version.is_empty()
    {
        updated["metadata"]["resourceVersion"] = json!(version);
    }
    let dry = dry_run(params)?;
    let stored = store.update(
        &target.resource,
        &target.namespace,
        name,
        updated,
        &WriteOptions { dry_run: dry },
    )?;
    if !dry {
        server.changed(&mut store);
    }
    Ok(scale_of(&stored))
}

/// A response body fed from a channel, one chunk per message.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

fn event_line(event: &WatchEvent) -> Bytes {
    let mut line = event.to_json().to_string();
    line.push('\n');
    Bytes::from(line)
}

/// A watch event of a view, its object as the view serves it.
fn served_event(bookmark: WatchEvent, view: Option<&views::View>) -> WatchEvent {
    match view {
        Some(view) => WatchEvent {
            event_type: bookmark.event_type,
            object: view.to_served(bookmark.object),
        },
        None => bookmark,
    }
}

fn watch_response(
    server: ApiServer,
    target: Target,
    params: &Params,
    as_table: bool,
    view: Option<&'static views::View>,
) -> Response {
    let selectors = match Selectors::parse(
        param(params, "labelSelector"),
        param(params, "fieldSelector"),
    ) {
        Ok(s) => s,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let bookmarks = flag(params, "allowWatchBookmarks");
    let timeout = param(params, "timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    // A streaming list (`sendInitialEvents=true`): every current object as ADDED, then a
    // BOOKMARK marking the end of the initial events, then the changes.
    let mut initial_events = flag(params, "sendInitialEvents");
    let start = param(params, "resourceVersion")
        .filter(|_| !initial_events)
        .map(str::to_string);
    let include_object = param(params, "includeObject").map(str::to_string);
    let (sender, receiver) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut changes = server.shared.changes.subscribe();
        let mut closing = server.shared.closing.subscribe();
        let namespace = Some(target.namespace.clone()).filter(|n| !n.is_empty());
        let mut version = start;
        let mut columns_sent = false;
        // As a Table when asked: the column definitions in the first event only, as the
        // real server sends them.
        let mut shown = |event: &WatchEvent, store: &Store| -> WatchEvent {
            if matches!(event.event_type, EventType::Error) {
                return event.clone();
            }
            if !as_table || matches!(event.event_type, EventType::Bookmark) {
                return served_event(event.clone(), view);
            }
            let crd = crd::crd_for(store, &target.resource);
            let mut object = table::table(
                &target.resource,
                crd.as_ref(),
                std::slice::from_ref(&event.object),
                json!({"resourceVersion": event.object["metadata"]["resourceVersion"]}),
                include_object.as_deref(),
            );
            if columns_sent && let Some(map) = object.as_object_mut() {
                map.remove("columnDefinitions");
            }
            columns_sent = true;
            WatchEvent {
                event_type: event.event_type,
                object,
            }
        };
        loop {
            changes.borrow_and_update();
            let batch = server.read(|store| {
                store
                    .watch_from(
                        &target.resource,
                        namespace.as_deref(),
                        &selectors,
                        version.as_deref(),
                    )
                    .map(|mut batch| {
                        batch.events = batch.events.iter().map(|e| shown(e, store)).collect();
                        batch
                    })
            });
            match batch {
                Ok(batch) => {
                    for event in &batch.events {
                        if sender.send(event_line(event)).await.is_err() {
                            return;
                        }
                    }
                    version = Some(batch.resource_version.to_string());
                    if initial_events {
                        initial_events = false;
                        let end = server.read(|store| store.bookmark(&target.resource, true));
                        if let Ok(end) = end.map(|e| served_event(e, view))
                            && sender.send(event_line(&end)).await.is_err()
                        {
                            return;
                        }
                    }
                }
                Err(error) => {
                    let _ = sender.send(event_line(&WatchEvent::error(&error))).await;
                    return;
                }
            }
            let wait = async {
                let bookmark_due = tokio::time::sleep(BOOKMARK_INTERVAL);
                tokio::select! {
                    changed = changes.changed() => changed.is_ok(),
                    () = bookmark_due => true,
                    () = sender.closed() => false,
                    _ = closing.wait_for(|closed| *closed) => false,
                }
            };
            let go_on = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, wait)
                    .await
                    .unwrap_or(false),
                None => wait.await,
            };
            if !go_on {
                return;
            }
            if bookmarks && !changes.has_changed().unwrap_or(false) {
                let bookmark = server.read(|store| {
                    // Only when idle: the events up to now were sent.
                    if store.resource_version().to_string() == version.clone().unwrap_or_default() {
                        store
                            .bookmark(&target.resource, false)
                            .ok()
                            .map(|e| served_event(e, view))
                    } else {
                        None
                    }
                });
                if let Some(bookmark) = bookmark
                    && sender.send(event_line(&bookmark)).await.is_err()
                {
                    return;
                }
            }
        }
    });
    let mut response = Response::new(Body::new(ChannelBody(receiver)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
