//! The waiting phase of `replica serve --await-bootstrap`: until the data directory holds
//! a replica, the pod answers only health checks and `POST /v1/bootstrap`, which creates
//! the family's first replica or clones a live one. Then the normal API takes over on
//! the same socket.

use crate::cmd::replica::{InitArgs, clone, init};
use crate::domain::compat::Compatibility;
use crate::replica::api::{BootstrapRequest, BootstrapSource, BootstrapState, Reason, route};
use crate::replica::secret::Secret;
use crate::replica::server::{ApiError, token_matches};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Who the pod was started as; a request for anyone else is refused.
#[derive(Clone, Debug)]
pub struct Expected {
    pub family: String,
    pub replica: String,
}

struct Waiting {
    expected: Expected,
    data: PathBuf,
    secret_file: PathBuf,
    secret: Secret,
    compat: Compatibility,
    state: Mutex<BootstrapState>,
    done: Notify,
}

type Shared = Arc<Waiting>;

fn refuse(reason: Reason, message: impl Into<String>) -> Response {
    ApiError::new(reason, message).into_response()
}

impl Waiting {
    fn snapshot(&self) -> BootstrapState {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        state.error = match (&state.running, &state.last_error) {
            (Some(running), _) => format!("replica {} is bootstrapping: {running}", state.replica),
            (None, Some(error)) => format!(
                "replica {} awaits bootstrap; the last attempt failed: {error}",
                state.replica
            ),
            (None, None) => format!("replica {} awaits bootstrap", state.replica),
        };
        state
    }

    fn update(&self, f: impl FnOnce(&mut BootstrapState)) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut state);
    }
}

async fn describe(State(w): State<Shared>) -> Json<BootstrapState> {
    Json(w.snapshot())
}

/// `GET /v1/status` while waiting: 503 with the waiting state, so callers that only
/// know the status call learn why.
async fn not_yet(State(w): State<Shared>) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, Json(w.snapshot())).into_response()
}

async fn not_ready() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "awaiting bootstrap").into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

async fn start(State(w): State<Shared>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    if !token_matches(&w.secret.api_token, &headers) {
        return refuse(
            Reason::Unauthorized,
            "missing or wrong family token: callers need the family's secret",
        );
    }
    let request: BootstrapRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return refuse(Reason::Invalid, format!("bootstrap request: {e}")),
    };
    if request.family != w.expected.family || request.replica != w.expected.replica {
        return refuse(
            Reason::Invalid,
            format!(
                "this pod serves replica {} of family {}, not {} of {}",
                w.expected.replica, w.expected.family, request.replica, request.family
            ),
        );
    }
    let busy = {
        let mut state = w.state.lock().unwrap_or_else(|p| p.into_inner());
        let busy = state.running.clone();
        if busy.is_none() {
            state.running = Some(match &request.source {
                BootstrapSource::Init { .. } => "creating the family's first replica".into(),
                BootstrapSource::CloneFrom(url) => format!("cloning from {url}"),
            });
        }
        busy
    };
    if let Some(running) = busy {
        return refuse(
            Reason::BootstrapRunning,
            format!("a bootstrap is already running: {running}"),
        );
    }
    let waiting = Arc::clone(&w);
    tokio::spawn(async move {
        let outcome = run(&waiting, request.source).await;
        match outcome {
            Ok(summary) => {
                tracing::info!(summary = summary.trim_end(), "bootstrapped");
                waiting.done.notify_one();
            }
            Err(err) => {
                let error = format!("{err:#}");
                tracing::warn!(%error, "bootstrap failed");
                waiting.update(|s| {
                    s.running = None;
                    s.last_error = Some(error);
                });
            }
        }
    });
    (StatusCode::ACCEPTED, Json(w.snapshot())).into_response()
}

async fn run(w: &Shared, source: BootstrapSource) -> anyhow::Result<String> {
    match source {
        BootstrapSource::Init {
            id_prefix,
            feature_level,
        } => {
            let args = InitArgs {
                data: w.data.clone(),
                family: w.expected.family.clone(),
                replica: w.expected.replica.clone(),
                id_prefix,
                feature_level,
                schema: None,
                access: crate::cmd::items::Access {
                    secret_file: Some(w.secret_file.clone()),
                    release: None,
                },
            };
            let compat = w.compat.clone();
            tokio::task::spawn_blocking(move || init(args, &compat)).await?
        }
        BootstrapSource::CloneFrom(url) => {
            clone(&url, &w.data, &w.expected.replica, &w.secret).await
        }
    }
}

/// Serves the waiting API on `listener` until a bootstrap succeeds (`true`) or `stop`
/// resolves first (`false`).
pub async fn await_bootstrap(
    listener: tokio::net::TcpListener,
    expected: Expected,
    data: PathBuf,
    secret_file: PathBuf,
    secret: Secret,
    compat: Compatibility,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<bool> {
    let waiting = Arc::new(Waiting {
        state: Mutex::new(BootstrapState {
            family: expected.family.clone(),
            replica: expected.replica.clone(),
            awaiting_bootstrap: true,
            ..BootstrapState::default()
        }),
        expected,
        data,
        secret_file,
        secret,
        compat,
        done: Notify::new(),
    });
    let app = Router::new()
        .route(route::HEALTHZ, get(healthz))
        .route(route::READYZ, get(not_ready))
        .route(route::STATUS, get(not_yet))
        .route(route::BOOTSTRAP, get(describe).post(start))
        .with_state(Arc::clone(&waiting));
    let (finish, finished) = tokio::sync::oneshot::channel::<bool>();
    let watcher = {
        let waiting = Arc::clone(&waiting);
        async move {
            let bootstrapped = tokio::select! {
                _ = waiting.done.notified() => true,
                _ = stop => false,
            };
            let _ = finish.send(bootstrapped);
        }
    };
    let (outcome_tx, outcome_rx) = tokio::sync::oneshot::channel::<bool>();
    let graceful = async move {
        let bootstrapped = finished.await.unwrap_or(false);
        let _ = outcome_tx.send(bootstrapped);
    };
    tokio::spawn(watcher);
    axum::serve(listener, app)
        .with_graceful_shutdown(graceful)
        .await?;
    Ok(outcome_rx.await.unwrap_or(false))
}
