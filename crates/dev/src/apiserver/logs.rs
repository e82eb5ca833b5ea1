//! `GET /api/v1/namespaces/{ns}/pods/{pod}/log`: a container's output, as `kubectl logs`
//! asks for it (`container`, `follow`, `previous`, `tailLines`, `limitBytes`).
//!
//! The real API server asks the pod's kubelet; here the API server reads the files the
//! workload runner writes (one per container instance, the one before it kept as the
//! previous), found through a [`LogFiles`] the dev cluster hands it. Simpler than the
//! real server: `timestamps`, `sinceSeconds` and `sinceTime` are not looked at.

use super::{ApiError, ApiServer, ChannelBody, Params, flag, param};
use crate::objects::ResourceKey;
use crate::status::Error;
use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;

/// Where a container's output is: the workload runner's naming of its log files.
pub trait LogFiles: Send + Sync + 'static {
    /// The log of the running (or last) instance of `container`, or of the one before
    /// it when `previous`.
    fn log_file(&self, namespace: &str, pod: &str, container: &str, previous: bool) -> PathBuf;
}

/// How often a followed log is read again for more output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

fn bad_request(message: String) -> Response {
    ApiError::from(Error::bad_request(message)).into_response()
}

/// Whether `container` of `pod` runs, as the pod's status says.
fn running(pod: &Value, container: &str) -> bool {
    ["containerStatuses", "initContainerStatuses"]
        .iter()
        .filter_map(|key| pod["status"][key].as_array())
        .flatten()
        .any(|s| s["name"] == container && s["state"]["running"].is_object())
}

fn container_names(pod: &Value, key: &str) -> Vec<String> {
    pod["spec"][key]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect()
}

/// The last `lines` lines of `text` (all of it when it has fewer).
fn tail(text: &[u8], lines: usize) -> &[u8] {
    if lines == 0 {
        return &[];
    }
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut seen = 0;
    for (at, byte) in body.iter().enumerate().rev() {
        if *byte == b'\n' {
            seen += 1;
            if seen == lines {
                return &text[at + 1..];
            }
        }
    }
    text
}

fn number(params: &Params, key: &str) -> Result<Option<u64>, String> {
    match param(params, key) {
        None | Some("") => Ok(None),
        Some(text) => text
            .parse::<u64>()
            .map(Some)
            .map_err(|_| format!("{key}: {text:?} is not a whole number")),
    }
}

/// The answer to a pod log request.
pub async fn pod_log(server: &ApiServer, namespace: &str, name: &str, params: &Params) -> Response {
    let pods = ResourceKey::new("", "v1", "pods");
    let pod = match server.read(|s| s.get(&pods, namespace, name)) {
        Ok(pod) => pod,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let containers = container_names(&pod, "containers");
    let init = container_names(&pod, "initContainers");
    let container = match param(params, "container").filter(|c| !c.is_empty()) {
        Some(c) => c.to_string(),
        None if containers.len() == 1 => containers[0].clone(),
        None => {
            return bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                containers.join(" ")
            ));
        }
    };
    if !containers.contains(&container) && !init.contains(&container) {
        return bad_request(format!("container {container} is not valid for pod {name}"));
    }
    let Some(files) = server.shared.logs.get() else {
        return bad_request(format!(
            "pod {name}: no container output here: this API server runs no workloads \
             (`multisite dev up` hands it the workload runner's logs)"
        ));
    };
    let previous = flag(params, "previous");
    let path = files.log_file(namespace, name, &container, previous);
    let (tail_lines, limit) = match (number(params, "tailLines"), number(params, "limitBytes")) {
        (Ok(t), Ok(l)) => (t, l),
        (Err(e), _) | (_, Err(e)) => return bad_request(e),
    };
    // One open file for all that is sent: a restart renames the path to the previous log,
    // and what follows keeps reading the instance it started with.
    let opened = std::fs::File::open(&path).and_then(|mut file| {
        let mut text = Vec::new();
        file.read_to_end(&mut text)?;
        Ok((file, text))
    });
    let (mut file, text) = match opened {
        Ok(opened) => opened,
        Err(_) if previous => {
            return bad_request(format!(
                "previous terminated container \"{container}\" in pod \"{name}\" not found"
            ));
        }
        Err(_) => {
            return bad_request(format!(
                "container \"{container}\" in pod \"{name}\" is waiting to start: ContainerCreating"
            ));
        }
    };
    let mut shown = match tail_lines {
        Some(lines) => tail(&text, usize::try_from(lines).unwrap_or(usize::MAX)).to_vec(),
        None => text.clone(),
    };
    if let Some(limit) = limit {
        shown.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    }
    if !flag(params, "follow") || previous || limit.is_some() {
        return plain(Body::from(shown));
    }
    let (sender, receiver) = mpsc::channel::<Bytes>(16);
    let server = server.clone();
    let (namespace, name) = (namespace.to_string(), name.to_string());
    tokio::spawn(async move {
        if !shown.is_empty() && sender.send(Bytes::from(shown)).await.is_err() {
            return;
        }
        follow(&server, &mut file, &sender, |server| {
            server
                .read(|s| s.get(&pods, &namespace, &name))
                .is_ok_and(|pod| running(&pod, &container))
        })
        .await;
    });
    plain(Body::new(ChannelBody(receiver)))
}

/// Sends what is appended to `file` until the container stops running (and its last
/// output is sent), the client goes or the server closes.
async fn follow(
    server: &ApiServer,
    file: &mut std::fs::File,
    sender: &mpsc::Sender<Bytes>,
    still_running: impl Fn(&ApiServer) -> bool,
) {
    let mut closing = server.shared.closing.subscribe();
    loop {
        let was_running = still_running(server);
        let mut more = Vec::new();
        // A read error ends the stream as the end of the output would.
        let _ = (&mut *file).take(64 * 1024).read_to_end(&mut more);
        if !more.is_empty() {
            if sender.send(Bytes::from(more)).await.is_err() {
                return;
            }
            continue;
        }
        if !was_running {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(FOLLOW_POLL) => {}
            () = sender.closed() => return,
            _ = closing.wait_for(|closed| *closed) => return,
        }
    }
}

fn plain(body: Body) -> Response {
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

#[cfg(test)]
mod tests {
    use super::tail;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(tail(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(tail(b"a\nb\n", 0), b"");
        assert_eq!(tail(b"", 3), b"");
    }
}
