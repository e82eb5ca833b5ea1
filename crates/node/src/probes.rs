//! Readiness, liveness and startup probes with Kubernetes' defaults: httpGet (a status
//! in 200..400), tcpSocket (a connection) and exec (the command exits 0, run inside the
//! container's mount namespace with `nsenter`). gRPC probes, and probes whose port
//! names no port, are not run: they count as passing, and the agent logs a warning.

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::net::Ipv4Addr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

async fn http_get(
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
) -> Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("dial tcp {host}:{port}: {e}"))?;
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.37\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let code: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| "the answer is not HTTP".to_string())?;
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
}
