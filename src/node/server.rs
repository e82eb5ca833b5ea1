//! The kubelet's HTTPS endpoint of one node, on 127.0.0.1 at the port the Node status
//! advertises, with the node's serving certificate; clients must present a certificate
//! the cluster CA signed (the API server presents its kubelet client certificate).
//!
//! - `GET /healthz`: `ok`.
//! - `GET /containerLogs/{namespace}/{pod}/{container}` with `follow`, `previous`,
//!   `tailLines`, `limitBytes` (what `kubectl logs` asks through the API server).
//! - exec, attach, port-forward and run answer 501: they need the streaming protocols
//!   (SPDY/3.1 or WebSocket with Kubernetes' channel framing), which the agent does not
//!   serve (docs/node.md).

use super::{NodeCtx, NodeError, lock};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// The TLS configuration of one node's endpoint.
pub(super) fn tls_config(
    node: &NodeCtx,
    credentials: &Path,
) -> Result<Arc<rustls::ServerConfig>, NodeError> {
    let tls = |message: String| NodeError::Tls {
        node: node.name.clone(),
        message,
    };
    let dir = credentials.join(&node.name);
    let cert_path = dir.join("serving.crt");
    let key_path = dir.join("serving.key");
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| tls(format!("{}: {e}", cert_path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls(format!("{}: {e}", cert_path.display())))?;
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| tls(format!("{}: {e}", key_path.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&node.ca_pem) {
        let ca = ca.map_err(|e| tls(format!("the cluster CA: {e}")))?;
        roots
            .add(ca)
            .map_err(|e| tls(format!("the cluster CA: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| tls(format!("client certificate verifier: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| tls(format!("{}: {e}", cert_path.display())))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[derive(Clone)]
struct Endpoint {
    node: Arc<NodeCtx>,
}

/// Serves until `stop` turns true.
pub(super) async fn serve(
    node: Arc<NodeCtx>,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let router = router(Endpoint { node: node.clone() });
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, peer)) = accepted else {
            continue;
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        let name = node.name.clone();
        tokio::spawn(async move {
            let stream = match acceptor.accept(stream).await {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::debug!(node = %name, %peer, %error, "kubelet endpoint: TLS handshake refused");
                    return;
                }
            };
            let service = TowerToHyperService::new(router);
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(node = %name, %peer, %error, "kubelet endpoint: connection ended");
            }
        });
    }
}

fn router(endpoint: Endpoint) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(container_logs),
        )
        .route("/exec/{*rest}", any(streaming))
        .route("/attach/{*rest}", any(streaming))
        .route("/portForward/{*rest}", any(streaming))
        .route("/run/{*rest}", any(streaming))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(endpoint)
}

async fn streaming() -> Response {
    (
        StatusCode::NOT_IMPLEMENTED,
        "multisite node does not serve exec, attach, port-forward or run: kube-apiserver \
         proxies them to the kubelet as an upgraded stream (SPDY/3.1, or WebSocket with the \
         v5.channel.k8s.io / portforward.k8s.io framing), and this agent has no server for \
         those protocols yet; read the logs (kubectl logs) or reach the pod's address directly\n",
    )
        .into_response()
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct LogQuery {
    follow: Option<String>,
    previous: Option<String>,
    tail_lines: Option<u64>,
    limit_bytes: Option<u64>,
}

fn flag(value: &Option<String>) -> bool {
    matches!(value.as_deref(), Some("true" | "1" | ""))
}

/// The start offset that leaves the last `lines` lines of `bytes`.
fn tail_offset(bytes: &[u8], lines: u64) -> usize {
    if lines == 0 {
        return bytes.len();
    }
    let mut seen = 0;
    let end = if bytes.last() == Some(&b'\n') {
        bytes.len() - 1
    } else {
        bytes.len()
    };
    for index in (0..end).rev() {
        if bytes[index] == b'\n' {
            seen += 1;
            if seen == lines {
                return index + 1;
            }
        }
    }
    0
}

async fn container_logs(
    State(endpoint): State<Endpoint>,
    UrlPath((namespace, pod, container)): UrlPath<(String, String, String)>,
    Query(query): Query<LogQuery>,
) -> Response {
    let settings = &endpoint.node.shared.settings;
    let previous = flag(&query.previous);
    let path: PathBuf = if previous {
        settings.previous_log_path(&namespace, &pod, &container)
    } else {
        settings.log_path(&namespace, &pod, &container)
    };
    let bytes = match tokio::fs::read(&path).await {
        Ok(bytes) => bytes,
        Err(_) => {
            let message = if previous {
                format!(
                    "previous terminated container \"{container}\" in pod \"{pod}\" not found\n"
                )
            } else {
                format!("container \"{container}\" in pod \"{pod}\" has no log yet\n")
            };
            return (StatusCode::NOT_FOUND, message).into_response();
        }
    };
    let start = query.tail_lines.map_or(0, |n| tail_offset(&bytes, n));
    let limit = query.limit_bytes.unwrap_or(u64::MAX);
    let first: Vec<u8> = bytes[start..]
        .iter()
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
        .copied()
        .collect();
    let headers = [(header::CONTENT_TYPE, "text/plain")];
    if !flag(&query.follow) || previous || (first.len() as u64) >= limit {
        return (headers, first).into_response();
    }
    // Follow: what is there, then what is appended while the container runs.
    let key = format!("{namespace}/{pod}/{container}");
    let node = endpoint.node.clone();
    let sent = first.len() as u64;
    let offset = bytes.len() as u64;
    let state = (Some(first), path, offset, sent, limit, node, key, 0u32);
    let stream = futures::stream::unfold(state, |state| async move {
        let (first, path, offset, sent, limit, node, key, idle) = state;
        if let Some(first) = first {
            return Some((
                Ok::<_, std::io::Error>(bytes::Bytes::from(first)),
                (None, path, offset, sent, limit, node, key, idle),
            ));
        }
        let mut idle = idle;
        loop {
            if sent >= limit {
                return None;
            }
            let chunk = read_from(&path, offset, limit - sent).await;
            match chunk {
                Some(chunk) if !chunk.is_empty() => {
                    let n = chunk.len() as u64;
                    return Some((
                        Ok(bytes::Bytes::from(chunk)),
                        (None, path, offset + n, sent + n, limit, node, key, 0),
                    ));
                }
                _ => {}
            }
            let running = lock(&node.shared.running).contains(&key);
            // The instance ended (or a new one began with a new file): stop following
            // once nothing more comes.
            if !running {
                idle += 1;
                if idle > 4 {
                    return None;
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    (headers, Body::from_stream(stream)).into_response()
}

/// Up to `max` bytes of `path` from `offset`; `None` when the file is gone or shorter.
async fn read_from(path: &Path, offset: u64, max: u64) -> Option<Vec<u8>> {
    let mut file = tokio::fs::File::open(path).await.ok()?;
    let len = file.metadata().await.ok()?.len();
    if len <= offset {
        return None;
    }
    file.seek(SeekFrom::Start(offset)).await.ok()?;
    let want = (len - offset).min(max).min(1 << 20);
    let mut buf = vec![0u8; usize::try_from(want).ok()?];
    file.read_exact(&mut buf).await.ok()?;
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::tail_offset;

    #[test]
    fn tail_keeps_the_last_lines() {
        let text = b"a\nb\nc\n";
        assert_eq!(&text[tail_offset(text, 2)..], b"b\nc\n");
        assert_eq!(&text[tail_offset(text, 9)..], b"a\nb\nc\n");
        assert_eq!(&text[tail_offset(text, 0)..], b"");
        assert_eq!(&b"a\nb"[tail_offset(b"a\nb", 1)..], b"b");
    }
}
