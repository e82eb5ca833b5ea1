//! Readiness, liveness and startup probes with Kubernetes' defaults: httpGet (a status
//! in 200..400), tcpSocket (a connection) and exec (the command exits 0, run inside the
//! container's mount namespace with `nsenter`). gRPC probes, and probes whose port
//! names no port, are not run: they count as passing, and the agent logs a warning.

use hyper::Request;
use hyper::client::conn::http1;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::net::Ipv4Addr;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ProbeKind {
    Startup,
    Liveness,
    Readiness,
}

#[derive(Clone, Debug)]
pub(super) enum Check {
    Http {
        host: Option<String>,
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
        https: bool,
    },
    Tcp {
        host: Option<String>,
        port: u16,
    },
    Exec {
        command: Vec<String>,
    },
    Unsupported(String),
}

#[derive(Clone, Debug)]
pub(super) struct ProbeSpec {
    pub kind: ProbeKind,
    pub check: Check,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

fn port_of(port: &IntOrString, container: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(s) => s.parse().ok().or_else(|| {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(s.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
        }),
    }
}

/// The probe of `kind` a container declares, with Kubernetes' defaults.
pub(super) fn probe_of(container: &Container, kind: ProbeKind) -> Option<ProbeSpec> {
    let probe: &Probe = match kind {
        ProbeKind::Startup => container.startup_probe.as_ref(),
        ProbeKind::Liveness => container.liveness_probe.as_ref(),
        ProbeKind::Readiness => container.readiness_probe.as_ref(),
    }?;
    let check = if let Some(get) = &probe.http_get {
        match port_of(&get.port, container) {
            Some(port) => Check::Http {
                host: get.host.clone().filter(|h| !h.is_empty()),
                port,
                path: match get.path.as_deref().unwrap_or("") {
                    "" => "/".to_string(),
                    p if p.starts_with('/') => p.to_string(),
                    p => format!("/{p}"),
                },
                headers: get
                    .http_headers
                    .iter()
                    .flatten()
                    .map(|h| (h.name.clone(), h.value.clone()))
                    .collect(),
                https: get.scheme.as_deref() == Some("HTTPS"),
            },
            None => Check::Unsupported(format!("httpGet port {:?} is not a port", get.port)),
        }
    } else if let Some(tcp) = &probe.tcp_socket {
        match port_of(&tcp.port, container) {
            Some(port) => Check::Tcp {
                host: tcp.host.clone().filter(|h| !h.is_empty()),
                port,
            },
            None => Check::Unsupported(format!("tcpSocket port {:?} is not a port", tcp.port)),
        }
    } else if let Some(exec) = &probe.exec {
        Check::Exec {
            command: exec.command.clone().unwrap_or_default(),
        }
    } else {
        Check::Unsupported("only httpGet, tcpSocket and exec probes are supported".into())
    };
    let seconds = |value: Option<i32>, default: u64| {
        Duration::from_secs(value.and_then(|v| u64::try_from(v).ok()).unwrap_or(default))
    };
    let count = |value: Option<i32>, default: u32| {
        value
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(default)
            .max(1)
    };
    Some(ProbeSpec {
        kind,
        check,
        initial_delay: seconds(probe.initial_delay_seconds, 0),
        period: seconds(probe.period_seconds, 10).max(Duration::from_secs(1)),
        timeout: seconds(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
        success_threshold: count(probe.success_threshold, 1),
        failure_threshold: count(probe.failure_threshold, 3),
    })
}

/// An httpGet probe as the kubelet sends it: a GET without keep-alive, with the probe's
/// headers, `User-Agent`, `Accept` and `Host` unless the probe sets them; any status in
/// 200..400 passes. The connection lives in this future, so the caller's timeout ends it.
async fn http_get(
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
) -> Result<(), String> {
    let mut request = Request::get(path)
        .header(header::CONNECTION, "close")
        .body(String::new())
        .map_err(|e| format!("HTTP probe of {path:?}: {e}"))?;
    let fields = request.headers_mut();
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| format!("HTTP probe header {name:?}: {e}"))?;
        let value =
            HeaderValue::from_str(value).map_err(|e| format!("HTTP probe header {name}: {e}"))?;
        fields.append(name, value);
    }
    let defaults = [
        (header::HOST, format!("{host}:{port}")),
        (header::USER_AGENT, "kube-probe/1.37".to_string()),
        (header::ACCEPT, "*/*".to_string()),
    ];
    for (name, value) in defaults {
        if !fields.contains_key(&name) {
            let value = HeaderValue::from_str(&value)
                .map_err(|e| format!("HTTP probe header {name}: {e}"))?;
            fields.insert(name, value);
        }
    }
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("dial tcp {host}:{port}: {e}"))?;
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP probe {host}:{port}: {e}"))?;
    let answer = sender.send_request(request);
    tokio::pin!(answer, connection);
    let response = tokio::select! {
        biased;
        response = &mut answer => response,
        // The connection can end first (the server closes right after answering): the
        // answer, if any, is then already waiting.
        ended = &mut connection => match ended {
            Ok(()) => answer.await,
            Err(e) => Err(e),
        },
    }
    .map_err(|e| format!("HTTP probe {host}:{port}{path}: {e}"))?;
    let code = response.status().as_u16();
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP probe failed with statuscode: {code}"))
    }
}

/// Runs one check against a container; `Err` says why it failed.
pub(super) async fn run_check(
    spec: &ProbeSpec,
    ip: Ipv4Addr,
    pid: Option<u32>,
    env: &[(String, String)],
) -> Result<(), String> {
    let attempt = async {
        match &spec.check {
            Check::Http {
                host,
                port,
                path,
                headers,
                https,
            } => {
                let host = host.clone().unwrap_or_else(|| ip.to_string());
                if *https {
                    // Kubernetes does not verify a probe's certificate; a connection is
                    // what this agent checks for HTTPS.
                    tokio::net::TcpStream::connect((host.as_str(), *port))
                        .await
                        .map(|_| ())
                        .map_err(|e| format!("dial tcp {host}:{port}: {e}"))
                } else {
                    http_get(&host, *port, path, headers).await
                }
            }
            Check::Tcp { host, port } => {
                let host = host.clone().unwrap_or_else(|| ip.to_string());
                tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("dial tcp {host}:{port}: {e}"))
            }
            Check::Exec { command } => {
                let pid = pid.ok_or_else(|| "the container does not run".to_string())?;
                let (first, rest) = command
                    .split_first()
                    .ok_or_else(|| "exec probe without a command".to_string())?;
                let output = tokio::process::Command::new("nsenter")
                    .arg(format!("--target={pid}"))
                    .args(["--mount", "--uts", "--"])
                    .arg(first)
                    .args(rest)
                    .env_clear()
                    .envs(env.iter().cloned())
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .output()
                    .await
                    .map_err(|e| format!("nsenter: {e}"))?;
                if output.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "command {command:?} exited with {}: {}",
                        output.status.code().unwrap_or(-1),
                        String::from_utf8_lossy(&output.stdout).trim()
                    ))
                }
            }
            // Counted as passing: a probe the agent cannot run must not kill or hold back
            // the container (the start logs a warning).
            Check::Unsupported(_) => Ok(()),
        }
    };
    match tokio::time::timeout(spec.timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("timeout after {}s", spec.timeout.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_named_ports() {
        let container: Container = serde_json::from_value(serde_json::json!({
            "name": "c",
            "ports": [{"name": "api", "containerPort": 7400}],
            "readinessProbe": {"httpGet": {"path": "healthz", "port": "api"}},
            "livenessProbe": {"tcpSocket": {"port": 81}, "periodSeconds": 2},
        }))
        .unwrap();
        let ready = probe_of(&container, ProbeKind::Readiness).unwrap();
        match &ready.check {
            Check::Http { port, path, .. } => {
                assert_eq!((*port, path.as_str()), (7400, "/healthz"))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ready.period, Duration::from_secs(10));
        assert_eq!(ready.failure_threshold, 3);
        let live = probe_of(&container, ProbeKind::Liveness).unwrap();
        assert_eq!(live.period, Duration::from_secs(2));
        assert!(probe_of(&container, ProbeKind::Startup).is_none());
    }

    fn http_probe(port: u16, headers: &[(&str, &str)], https: bool) -> ProbeSpec {
        ProbeSpec {
            kind: ProbeKind::Readiness,
            check: Check::Http {
                host: None,
                port,
                path: "/healthz?full=1".to_string(),
                headers: headers
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect(),
                https,
            },
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 3,
        }
    }

    /// A server on 127.0.0.1 that answers one request with `answer` and hands back the
    /// request's head.
    async fn answering(answer: &'static str) -> (u16, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "the request ended early");
                head.extend_from_slice(&buf[..n]);
            }
            stream.write_all(answer.as_bytes()).await.unwrap();
            stream.shutdown().await.unwrap();
            String::from_utf8(head).unwrap()
        });
        (port, served)
    }

    async fn check(spec: &ProbeSpec) -> Result<(), String> {
        run_check(spec, Ipv4Addr::LOCALHOST, None, &[]).await
    }

    #[tokio::test]
    async fn http_probes_pass_on_2xx_and_3xx_and_send_the_headers() {
        let (port, served) = answering("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        check(&http_probe(
            port,
            &[("X-Probe", "yes"), ("X-Probe", "again")],
            false,
        ))
        .await
        .unwrap();
        let head = served.await.unwrap().to_ascii_lowercase();
        assert!(
            head.starts_with("get /healthz?full=1 http/1.1\r\n"),
            "{head}"
        );
        for line in [
            format!("host: 127.0.0.1:{port}"),
            "user-agent: kube-probe/1.37".to_string(),
            "accept: */*".to_string(),
            "connection: close".to_string(),
            "x-probe: yes".to_string(),
            "x-probe: again".to_string(),
        ] {
            assert!(
                head.contains(&format!("\r\n{line}\r\n")),
                "{line} in {head}"
            );
        }

        // A redirect passes too, without being followed; the server closes at once.
        let (port, _) = answering("HTTP/1.1 302 Found\r\nlocation: /elsewhere\r\n\r\n").await;
        check(&http_probe(port, &[], false)).await.unwrap();
    }

    #[tokio::test]
    async fn a_probe_s_host_and_user_agent_replace_the_defaults() {
        let (port, served) = answering("HTTP/1.1 204 No Content\r\n\r\n").await;
        let headers = [("Host", "app.example"), ("User-Agent", "mine")];
        check(&http_probe(port, &headers, false)).await.unwrap();
        let head = served.await.unwrap().to_ascii_lowercase();
        assert_eq!(head.matches("host:").count(), 1, "{head}");
        assert!(head.contains("\r\nhost: app.example\r\n"), "{head}");
        assert!(!head.contains("kube-probe"), "{head}");
    }

    #[tokio::test]
    async fn http_probes_fail_on_4xx_5xx_and_on_what_is_not_http() {
        let (port, _) =
            answering("HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n").await;
        let failed = check(&http_probe(port, &[], false)).await.unwrap_err();
        assert_eq!(failed, "HTTP probe failed with statuscode: 500");
        let (port, _) = answering("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").await;
        let failed = check(&http_probe(port, &[], false)).await.unwrap_err();
        assert_eq!(failed, "HTTP probe failed with statuscode: 404");
        let (port, _) = answering("SSH-2.0-OpenSSH_9.6\r\n\r\n").await;
        assert!(check(&http_probe(port, &[], false)).await.is_err());
        let port = {
            let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            closed.local_addr().unwrap().port()
        };
        let failed = check(&http_probe(port, &[], false)).await.unwrap_err();
        assert!(failed.starts_with("dial tcp 127.0.0.1:"), "{failed}");
    }

    #[tokio::test]
    async fn an_http_probe_that_gets_no_answer_fails_at_its_timeout() {
        // Connections queue in the backlog, and nothing ever reads them.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let started = std::time::Instant::now();
        let failed = check(&http_probe(port, &[], false)).await.unwrap_err();
        let took = started.elapsed();
        assert_eq!(failed, "timeout after 1s");
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(3),
            "{took:?}"
        );
        // HTTPS probes check only for a connection, so the same server passes one.
        check(&http_probe(port, &[], true)).await.unwrap();
        drop(silent);
    }
}
