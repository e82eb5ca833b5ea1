//! The HTTP transport under the replica API's client (and the few calls to other
//! services: a gateway's outside endpoint, a client tier's status). Plain HTTP/1.1 over
//! hyper; every call has a deadline. The routes and bodies are in `replica::api`.

use crate::api::{BootstrapState, ErrorBody, RELEASE_HEADER, Reason};
use bytes_body::Full;
use http_body_util::BodyExt;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::time::Duration;

mod bytes_body {
    pub use http_body_util::Full;
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{url} is not a valid replica URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{url} did not answer within {seconds} s")]
    Timeout { url: String, seconds: u64 },
    /// The server answered with an error; `message` is its explanation, `reason` what
    /// callers decide on.
    #[error("{message}")]
    Status {
        status: u16,
        reason: Reason,
        message: String,
    },
    #[error("{url} answered with something that is not the expected JSON: {reason}")]
    BadAnswer { url: String, reason: String },
    /// The pod serves no replica yet: it waits for its bootstrap (its `503` answer,
    /// read as the typed state it sends).
    #[error("{}", .0.error)]
    AwaitingBootstrap(Box<BootstrapState>),
    #[error("cannot encode the request to {url}: {reason}")]
    Encode { url: String, reason: String },
}

impl HttpError {
    /// The reason of a refusal, if the server gave one.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            HttpError::Status { reason, .. } => Some(*reason),
            HttpError::AwaitingBootstrap(_) => Some(Reason::AwaitingBootstrap),
            _ => None,
        }
    }
}

/// A client that carries a bearer token and, for item calls, a client release. Its
/// clones share one connection pool.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<bytes::Bytes>>,
    token: String,
    release: Option<String>,
    timeout: Duration,
}

impl HttpClient {
    pub fn new(token: String, release: Option<String>) -> Self {
        let client = Client::builder(TokioExecutor::new()).build_http();
        HttpClient {
            client,
            token,
            release,
            timeout: Duration::from_secs(120),
        }
    }

    /// The same client with another deadline per call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The same client presenting `release` on record calls.
    pub fn with_release(mut self, release: Option<String>) -> Self {
        self.release = release;
        self
    }

    fn url(base: &str, path: &str) -> Result<hyper::Uri, HttpError> {
        let base = base.trim_end_matches('/');
        let base = if base.contains("://") {
            base.to_string()
        } else {
            format!("http://{base}")
        };
        let text = format!("{base}{path}");
        let uri: hyper::Uri =
            text.parse()
                .map_err(|e: hyper::http::uri::InvalidUri| HttpError::BadUrl {
                    url: base.clone(),
                    reason: e.to_string(),
                })?;
        if uri.scheme_str() != Some("http") {
            return Err(HttpError::BadUrl {
                url: base,
                reason: "only http:// is supported".into(),
            });
        }
        Ok(uri)
    }

    /// Sends a request and returns the status and body bytes of a success.
    pub async fn call(
        &self,
        method: Method,
        base: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, HttpError> {
        let uri = Self::url(base, path)?;
        let mut builder = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", content_type);
        if let Some(release) = &self.release {
            builder = builder.header(RELEASE_HEADER, release);
        }
        let request = builder
            .body(Full::new(bytes::Bytes::from(body)))
            .map_err(|e| HttpError::BadUrl {
                url: base.to_string(),
                reason: e.to_string(),
            })?;
        let seconds = self.timeout.as_secs();
        let answer = tokio::time::timeout(self.timeout, async {
            let response =
                self.client
                    .request(request)
                    .await
                    .map_err(|e| HttpError::Unreachable {
                        url: base.to_string(),
                        reason: error_chain(&e),
                    })?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| HttpError::Unreachable {
                    url: base.to_string(),
                    reason: e.to_string(),
                })?
                .to_bytes();
            Ok::<_, HttpError>((status, bytes))
        })
        .await
        .map_err(|_| HttpError::Timeout {
            url: base.to_string(),
            seconds,
        })??;
        let (status, bytes) = answer;
        if status.is_success() {
            return Ok(bytes.to_vec());
        }
        if status == StatusCode::SERVICE_UNAVAILABLE
            && let Ok(state) = serde_json::from_slice::<BootstrapState>(&bytes)
            && state.awaiting_bootstrap
        {
            return Err(HttpError::AwaitingBootstrap(Box::new(state)));
        }
        let (reason, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => (body.reason, body.error),
            Err(_) => (
                Reason::Unknown,
                format!(
                    "{base} answered {status}: {}",
                    String::from_utf8_lossy(&bytes).trim()
                ),
            ),
        };
        Err(HttpError::Status {
            status: status.as_u16(),
            reason,
            message,
        })
    }

    pub async fn get_json<T: DeserializeOwned>(
        &self,
        base: &str,
        path: &str,
    ) -> Result<T, HttpError> {
        let bytes = self
            .call(Method::GET, base, path, "application/json", Vec::new())
            .await?;
        parse(base, &bytes)
    }

    pub async fn send_json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        base: &str,
        path: &str,
        body: &B,
    ) -> Result<T, HttpError> {
        let body = encode(base, body)?;
        let bytes = self
            .call(method, base, path, "application/json", body)
            .await?;
        parse(base, &bytes)
    }
}

/// A request body as JSON bytes.
pub(crate) fn encode<B: Serialize>(base: &str, body: &B) -> Result<Vec<u8>, HttpError> {
    serde_json::to_vec(body).map_err(|e| HttpError::Encode {
        url: base.to_string(),
        reason: e.to_string(),
    })
}

pub(crate) fn parse<T: DeserializeOwned>(base: &str, bytes: &[u8]) -> Result<T, HttpError> {
    serde_json::from_slice(bytes).map_err(|e| HttpError::BadAnswer {
        url: base.to_string(),
        reason: e.to_string(),
    })
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `status` with `body` on every path; returns the base URL.
    async fn answering(status: StatusCode, body: String) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().fallback(move || {
            let body = body.clone();
            async move { (status, body) }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        base
    }

    /// A client and its clones share one connection pool: calls one after another
    /// reuse one connection instead of opening a new one each.
    #[tokio::test]
    async fn clones_of_a_client_reuse_one_connection() {
        use axum::serve::{Listener, ListenerExt};
        use std::sync::atomic::{AtomicUsize, Ordering};
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .tap_io(move |_| {
                counter.fetch_add(1, Ordering::SeqCst);
            });
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().fallback(|| async { "{}" });
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = HttpClient::new("t".into(), None);
        for _ in 0..5 {
            let clone = client.clone().with_timeout(Duration::from_secs(5));
            clone
                .get_json::<serde_json::Value>(&base, "/anything")
                .await
                .unwrap();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // A client made anew opens a connection of its own.
        HttpClient::new("t".into(), None)
            .get_json::<serde_json::Value>(&base, "/anything")
            .await
            .unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    fn waiting(running: Option<&str>, last_error: Option<&str>) -> BootstrapState {
        BootstrapState {
            family: "f".into(),
            replica: "r".into(),
            awaiting_bootstrap: true,
            running: running.map(Into::into),
            last_error: last_error.map(Into::into),
            error: "replica r awaits bootstrap".into(),
        }
    }

    /// A waiting pod's 503 is read as its typed state, not as text to match.
    #[tokio::test]
    async fn a_waiting_pod_answers_with_its_typed_state() {
        let client = HttpClient::new("t".into(), None);
        for state in [
            waiting(None, None),
            waiting(Some("cloning from a"), None),
            waiting(None, Some("source unreachable")),
        ] {
            let base = answering(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::to_string(&state).unwrap(),
            )
            .await;
            match client
                .get_json::<serde_json::Value>(&base, "/anything")
                .await
            {
                Err(HttpError::AwaitingBootstrap(got)) => assert_eq!(*got, state),
                other => panic!("{other:?}"),
            }
        }
    }

    /// Other 503 answers, and a body that only looks alike, stay plain status errors.
    #[tokio::test]
    async fn other_unavailable_answers_are_status_errors() {
        let client = HttpClient::new("t".into(), None);
        let mut not_waiting = serde_json::to_value(waiting(None, None)).unwrap();
        not_waiting["awaitingBootstrap"] = false.into();
        for (status, body) in [
            (
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"error":"awaiting bootstrap soon"}"#.to_string(),
            ),
            (StatusCode::SERVICE_UNAVAILABLE, not_waiting.to_string()),
            (
                StatusCode::CONFLICT,
                serde_json::to_string(&waiting(None, None)).unwrap(),
            ),
        ] {
            let base = answering(status, body.clone()).await;
            match client
                .get_json::<serde_json::Value>(&base, "/anything")
                .await
            {
                Err(HttpError::Status { status: got, .. }) => {
                    assert_eq!(got, status.as_u16(), "{body}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }
}
