//! The kubelet's HTTPS endpoint of one node, on 127.0.0.1 at the port the Node status
//! advertises, with the node's serving certificate; clients must present a certificate
//! the cluster CA signed (the API server presents its kubelet client certificate).
//!
//! - `GET /healthz`: `ok`.
//! - `GET /containerLogs/{namespace}/{pod}/{container}` with `follow`, `previous`,
//!   `tailLines`, `limitBytes` (what `kubectl logs` asks through the API server).
//! - `GET /exec/{namespace}/{pod}/{container}?command=...&stdin=&stdout=&stderr=` as a
//!   WebSocket (`v5.channel.k8s.io`, `v4.channel.k8s.io`): the command runs with
//!   `nsenter` in the container's mount and UTS namespaces and its environment. The
//!   Node declares `ExtendWebSocketsToKubelet`, so kube-apiserver hands `kubectl exec`'s
//!   WebSocket through instead of translating it to SPDY/3.1.
//! - attach, port-forward and run, and exec over SPDY, answer 501 (docs/node.md).

use super::{NodeCtx, NodeError, lock};
use axum::Router;
use axum::body::Body;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path as UrlPath, Query, RawQuery, State};
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
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

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
                .with_upgrades()
                .await
            {
                tracing::debug!(node = %name, %peer, %error, "kubelet endpoint: connection ended");
            }
        });
    }
}

fn router(endpoint: Endpoint) -> Router {
    routes().with_state(endpoint)
}

fn routes() -> Router<Endpoint> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(container_logs),
        )
        .route("/exec/{namespace}/{pod}/{container}", any(exec))
        .route("/attach/{*rest}", any(streaming))
        .route("/portForward/{*rest}", any(streaming))
        .route("/run/{*rest}", any(streaming))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
}

async fn streaming() -> Response {
    (
        StatusCode::NOT_IMPLEMENTED,
        "multisite node does not serve attach, port-forward or run, nor exec over SPDY: \
         kube-apiserver proxies them to the kubelet as an upgraded stream (SPDY/3.1, or a \
         WebSocket to a node that declares ExtendWebSocketsToKubelet), and this agent serves \
         only exec, only as a WebSocket (v5.channel.k8s.io); read the logs (kubectl logs) or \
         reach the pod's address directly\n",
    )
        .into_response()
}

/// What an exec request asks for.
#[derive(Debug, Default, PartialEq, Eq)]
struct ExecQuery {
    command: Vec<String>,
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

/// `application/x-www-form-urlencoded` decoding of one value.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        let hex = (byte == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (byte, hex) {
            (_, Some(decoded)) => {
                out.push(decoded);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (other, None) => {
                out.push(other);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn exec_query(raw: &str) -> ExecQuery {
    let mut query = ExecQuery::default();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = decode(value);
        let on = matches!(value.as_str(), "1" | "true");
        match key {
            "command" => query.command.push(value),
            "input" | "stdin" => query.stdin = on,
            "output" | "stdout" => query.stdout = on,
            "error" | "stderr" => query.stderr = on,
            "tty" => query.tty = on,
            _ => {}
        }
    }
    query
}

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const CLOSE: u8 = 255;

async fn exec(
    State(endpoint): State<Endpoint>,
    UrlPath((namespace, pod, container)): UrlPath<(String, String, String)>,
    RawQuery(raw): RawQuery,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Ok(upgrade) = upgrade else {
        return streaming().await;
    };
    let query = exec_query(raw.as_deref().unwrap_or(""));
    let key = format!("{namespace}/{pod}/{container}");
    let Some(target) = lock(&endpoint.node.shared.running).get(&key).cloned() else {
        return (
            StatusCode::NOT_FOUND,
            format!("container {container:?} of pod {namespace}/{pod} does not run on this node\n"),
        )
            .into_response();
    };
    if query.command.is_empty() {
        return (StatusCode::BAD_REQUEST, "exec needs a command\n").into_response();
    }
    upgrade
        .protocols(["v5.channel.k8s.io", "v4.channel.k8s.io"])
        .on_upgrade(move |socket| run_exec(socket, target, query))
}

/// The Status kubectl reads from the error channel when the command ends.
fn exit_status(command: &[String], code: Option<i32>) -> String {
    match code {
        Some(0) => serde_json::json!({"metadata": {}, "status": "Success"}).to_string(),
        Some(code) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: error executing command {command:?}, exit code {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        })
        .to_string(),
        None => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command {command:?} was killed by a signal"),
            "reason": "InternalError",
        })
        .to_string(),
    }
}

/// A close with status 1000: kubectl reads the error channel to its end, which a
/// close without a status is not.
fn normal_close() -> Message {
    Message::Close(Some(axum::extract::ws::CloseFrame {
        code: axum::extract::ws::close_code::NORMAL,
        reason: "".into(),
    }))
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut bytes = Vec::with_capacity(data.len() + 1);
    bytes.push(channel);
    bytes.extend_from_slice(data);
    Message::Binary(bytes.into())
}

async fn run_exec(mut socket: WebSocket, target: super::RunningContainer, query: ExecQuery) {
    let spawned = tokio::process::Command::new("nsenter")
        .arg(format!("--target={}", target.pid))
        .args(["--mount", "--uts", "--wd", "--"])
        .args(&query.command)
        .env_clear()
        .envs(target.env.iter().cloned())
        .stdin(if query.stdin {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) => {
            let status = serde_json::json!({
                "metadata": {}, "status": "Failure", "reason": "InternalError",
                "message": format!("cannot run nsenter: {error}"),
            });
            let _ = socket
                .send(frame(ERROR, status.to_string().as_bytes()))
                .await;
            let _ = socket.send(normal_close()).await;
            return;
        }
    };
    let mut stdin = child.stdin.take();
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return;
    };
    let (mut out_open, mut err_open) = (true, true);
    let (mut out_buf, mut err_buf) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    loop {
        tokio::select! {
            message = socket.recv() => match message {
                Some(Ok(Message::Binary(bytes))) => match bytes.first() {
                    Some(&STDIN) => {
                        if let Some(pipe) = stdin.as_mut()
                            && pipe.write_all(&bytes[1..]).await.is_err()
                        {
                            stdin = None;
                        }
                    }
                    Some(&CLOSE) if bytes.get(1) == Some(&STDIN) => stdin = None,
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            read = stdout.read(&mut out_buf), if out_open => match read {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) if query.stdout => {
                    if socket.send(frame(STDOUT, &out_buf[..n])).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
            },
            read = stderr.read(&mut err_buf), if err_open => match read {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) if query.stderr => {
                    if socket.send(frame(STDERR, &err_buf[..n])).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
            },
            status = child.wait(), if !out_open && !err_open => {
                let code = status.ok().and_then(|s| s.code());
                let _ = socket
                    .send(frame(ERROR, exit_status(&query.command, code).as_bytes()))
                    .await;
                let _ = socket.send(normal_close()).await;
                return;
            }
        }
    }
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
            let running = lock(&node.shared.running).contains_key(&key);
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
    use super::{ExecQuery, exec_query, routes, tail_offset};

    #[test]
    fn the_routes_do_not_clash() {
        let _ = routes();
    }

    #[test]
    fn exec_queries_repeat_the_command() {
        assert_eq!(
            exec_query("command=sh&command=-c&command=echo+a%20b&stdin=1&output=1&tty=false"),
            ExecQuery {
                command: vec!["sh".into(), "-c".into(), "echo a b".into()],
                stdin: true,
                stdout: true,
                stderr: false,
                tty: false,
            }
        );
        assert_eq!(exec_query("command=50%").command, vec!["50%".to_string()]);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let text = b"a\nb\nc\n";
        assert_eq!(&text[tail_offset(text, 2)..], b"b\nc\n");
        assert_eq!(&text[tail_offset(text, 9)..], b"a\nb\nc\n");
        assert_eq!(&text[tail_offset(text, 0)..], b"");
        assert_eq!(&b"a\nb"[tail_offset(b"a\nb", 1)..], b"b");
    }
}
