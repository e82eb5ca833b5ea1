//! The audit log: one JSON line per request, naming what an authorizer would be asked
//! about it (the RBAC verb, API group, resource, subresource, namespace and name, or the
//! non-resource URL), who asked (the User-Agent header) and the HTTP status answered.
//!
//! A request is taken apart the way the real server's request-info step does it, so the
//! lines can be checked against RBAC rules: `GET` on a collection is `list`, or `watch`
//! with `watch=true`; `GET` on an object is `get`; `POST` is `create`, `PUT` `update`,
//! `PATCH` `patch`; `DELETE` on an object is `delete` and on a collection
//! `deletecollection`. A `fieldSelector` of `metadata.name=X` on a list or watch names
//! the object, as there. Paths outside `/api/VERSION/...` and `/apis/GROUP/VERSION/...`
//! (discovery, `/version`, `/openapi`, health) are non-resource URLs, with the method in
//! lower case as their verb.
//!
//! A watch is logged when its response starts (status 200), not when it ends.

use axum::http::Method;
use serde_json::{Map, Value, json};
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// What a request asks for, in the terms of an authorizer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestAttributes {
    /// The RBAC verb (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`; for non-resource URLs the lower-case HTTP method).
    pub verb: String,
    pub target: Target,
}

/// A resource (possibly a subresource of one object), or a plain URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Resource {
        /// `""` for the core group.
        api_group: String,
        /// The plural name, e.g. `statefulsets`.
        resource: String,
        subresource: Option<String>,
        namespace: Option<String>,
        name: Option<String>,
    },
    NonResource(String),
}

/// Subresources of a namespace reached as `/api/v1/namespaces/NAME/SUB`: not the start of
/// a namespaced path.
const NAMESPACE_SUBRESOURCES: [&str; 2] = ["status", "finalize"];

fn non_empty(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_string())
}

/// Whether a query parameter is on, as the real server reads booleans (anything but
/// `0`/`false`, case-insensitive, once given).
fn query_flag(query: Option<&str>, key: &str) -> bool {
    query_value(query, key).is_some_and(|v| !v.eq_ignore_ascii_case("false") && v != "0")
}

fn query_value(query: Option<&str>, key: &str) -> Option<String> {
    let query = query?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == key).then(|| percent_decode(v))
    })
}

/// `%XX` escapes and `+` (a space in a query) decoded; bad escapes are kept as they are.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The object a field selector pins by name (`metadata.name=X` or `==X` among its terms).
fn selected_name(query: Option<&str>) -> Option<String> {
    let selector = query_value(query, "fieldSelector")?;
    selector.split(',').find_map(|term| {
        let (field, value) = term
            .split_once("==")
            .or_else(|| term.split_once('='))
            .filter(|(field, _)| !field.ends_with('!'))?;
        (field.trim() == "metadata.name" && !value.is_empty() && !value.contains('/'))
            .then(|| value.trim().to_string())
    })
}

/// Takes a request apart: its RBAC verb and what it is about.
pub fn request_attributes(method: &Method, path: &str, query: Option<&str>) -> RequestAttributes {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (api_group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] if !rest.is_empty() => ("", rest),
        ["apis", group, _version, rest @ ..] if !rest.is_empty() => (*group, rest),
        _ => {
            return RequestAttributes {
                verb: method.as_str().to_ascii_lowercase(),
                target: Target::NonResource(path.to_string()),
            };
        }
    };
    // The legacy `/watch/` prefix makes any read a watch.
    let (legacy_watch, mut rest) = match rest {
        ["watch", tail @ ..] => (true, tail),
        _ => (false, rest),
    };
    let mut namespace = None;
    if let ["namespaces", ns, tail @ ..] = rest {
        namespace = non_empty(ns);
        if !tail.is_empty() && !NAMESPACE_SUBRESOURCES.contains(&tail[0]) {
            rest = tail;
        }
    }
    let resource = rest.first().copied().unwrap_or_default().to_string();
    let mut name = rest.get(1).and_then(|n| non_empty(n));
    let subresource = rest.get(2).and_then(|s| non_empty(s));
    let mut verb = if legacy_watch {
        "watch"
    } else {
        match *method {
            Method::GET | Method::HEAD => "get",
            Method::POST => "create",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE => "delete",
            _ => "",
        }
    }
    .to_string();
    if verb.is_empty() {
        verb = method.as_str().to_ascii_lowercase();
    }
    if name.is_none() && (verb == "get" || verb == "watch") {
        if verb == "get" {
            verb = if query_flag(query, "watch") {
                "watch"
            } else {
                "list"
            }
            .to_string();
        }
        name = selected_name(query);
    }
    if name.is_none() && verb == "delete" {
        verb = "deletecollection".to_string();
    }
    RequestAttributes {
        verb,
        target: Target::Resource {
            api_group: api_group.to_string(),
            resource,
            subresource,
            namespace,
            name,
        },
    }
}

impl RequestAttributes {
    /// The audit line of this request: JSON, no newline.
    pub fn audit_line(&self, user_agent: &str, code: u16) -> String {
        let mut line = Map::new();
        line.insert("verb".into(), json!(self.verb));
        match &self.target {
            Target::Resource {
                api_group,
                resource,
                subresource,
                namespace,
                name,
            } => {
                line.insert("apiGroup".into(), json!(api_group));
                line.insert("resource".into(), json!(resource));
                for (key, value) in [
                    ("subresource", subresource),
                    ("namespace", namespace),
                    ("name", name),
                ] {
                    if let Some(value) = value {
                        line.insert(key.into(), json!(value));
                    }
                }
            }
            Target::NonResource(url) => {
                line.insert("nonResourceURL".into(), json!(url));
            }
        }
        line.insert("userAgent".into(), json!(user_agent));
        line.insert("code".into(), json!(code));
        Value::Object(line).to_string()
    }
}

/// An open audit file; lines are appended whole, one write each.
pub struct AuditLog {
    file: Mutex<File>,
    /// Set after the first failed write, so the failure is reported once.
    failed: AtomicBool,
}

impl AuditLog {
    /// Opens `path` for appending (created when missing).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            file: Mutex::new(file),
            failed: AtomicBool::new(false),
        })
    }

    /// Appends one request's line.
    pub fn record(&self, request: &RequestAttributes, user_agent: &str, code: u16) {
        let mut line = request.audit_line(user_agent, code);
        line.push('\n');
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(error) = file.write_all(line.as_bytes())
            && !self.failed.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(%error, "cannot write the audit log; further failures are not reported");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(
        group: &str,
        resource: &str,
        subresource: Option<&str>,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Target {
        Target::Resource {
            api_group: group.into(),
            resource: resource.into(),
            subresource: subresource.map(str::to_string),
            namespace: namespace.map(str::to_string),
            name: name.map(str::to_string),
        }
    }

    fn verb_and_target(method: Method, uri: &str) -> (String, Target) {
        let (path, query) = match uri.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (uri, None),
        };
        let attributes = request_attributes(&method, path, query);
        (attributes.verb, attributes.target)
    }

    #[test]
    fn methods_map_to_rbac_verbs() {
        let sts = "/apis/apps/v1/namespaces/tracker/statefulsets";
        let one = "/apis/apps/v1/namespaces/tracker/statefulsets/sampl-tokyo";
        let object = resource(
            "apps",
            "statefulsets",
            None,
            Some("tracker"),
            Some("sampl-tokyo"),
        );
        let collection = resource("apps", "statefulsets", None, Some("tracker"), None);
        for (method, uri, verb, target) in [
            (Method::GET, one, "get", &object),
            (Method::HEAD, one, "get", &object),
            (Method::GET, sts, "list", &collection),
            (Method::POST, sts, "create", &collection),
            (Method::PUT, one, "update", &object),
            (Method::PATCH, one, "patch", &object),
            (Method::DELETE, one, "delete", &object),
            (Method::DELETE, sts, "deletecollection", &collection),
        ] {
            assert_eq!(
                verb_and_target(method.clone(), uri),
                (verb.to_string(), target.clone()),
                "{method} {uri}"
            );
        }
    }

    #[test]
    fn watches_are_lists_with_watch_set_or_the_legacy_prefix() {
        let all = resource("multisite.dev", "replicas", None, None, None);
        for uri in [
            "/apis/multisite.dev/v1alpha1/replicas?watch=true&resourceVersion=10",
            "/apis/multisite.dev/v1alpha1/replicas?allowWatchBookmarks=true&watch=1",
            "/apis/multisite.dev/v1alpha1/watch/replicas",
        ] {
            assert_eq!(
                verb_and_target(Method::GET, uri),
                ("watch".into(), all.clone()),
                "{uri}"
            );
        }
        for uri in [
            "/apis/multisite.dev/v1alpha1/replicas?watch=false",
            "/apis/multisite.dev/v1alpha1/replicas?watch=0&limit=500",
        ] {
            assert_eq!(
                verb_and_target(Method::GET, uri),
                ("list".into(), all.clone()),
                "{uri}"
            );
        }
    }

    #[test]
    fn a_field_selector_on_the_name_names_the_object() {
        let (verb, target) = verb_and_target(
            Method::GET,
            "/api/v1/namespaces/tracker/pods?fieldSelector=metadata.name%3Dsampl-tokyo-0&watch=true",
        );
        assert_eq!(verb, "watch");
        assert_eq!(
            target,
            resource("", "pods", None, Some("tracker"), Some("sampl-tokyo-0"))
        );
        let (verb, target) = verb_and_target(
            Method::GET,
            "/api/v1/pods?fieldSelector=status.phase%3DRunning,metadata.name%3D%3Dp",
        );
        assert_eq!(verb, "list");
        assert_eq!(target, resource("", "pods", None, None, Some("p")));
        let (_, target) = verb_and_target(
            Method::GET,
            "/api/v1/pods?fieldSelector=metadata.name%21%3Dp",
        );
        assert_eq!(target, resource("", "pods", None, None, None));
    }

    #[test]
    fn subresources_and_namespaces_are_told_apart() {
        assert_eq!(
            verb_and_target(
                Method::PATCH,
                "/apis/multisite.dev/v1alpha1/namespaces/tracker/replicas/sampl-tokyo/status?fieldManager=m&force=true",
            ),
            (
                "patch".into(),
                resource(
                    "multisite.dev",
                    "replicas",
                    Some("status"),
                    Some("tracker"),
                    Some("sampl-tokyo")
                )
            )
        );
        assert_eq!(
            verb_and_target(
                Method::PUT,
                "/apis/apps/v1/namespaces/tracker/statefulsets/s/scale"
            ),
            (
                "update".into(),
                resource(
                    "apps",
                    "statefulsets",
                    Some("scale"),
                    Some("tracker"),
                    Some("s")
                )
            )
        );
        // A namespace is its own namespace, as the real server records it.
        assert_eq!(
            verb_and_target(Method::GET, "/api/v1/namespaces/tracker"),
            (
                "get".into(),
                resource("", "namespaces", None, Some("tracker"), Some("tracker"))
            )
        );
        assert_eq!(
            verb_and_target(Method::PUT, "/api/v1/namespaces/tracker/finalize"),
            (
                "update".into(),
                resource(
                    "",
                    "namespaces",
                    Some("finalize"),
                    Some("tracker"),
                    Some("tracker")
                )
            )
        );
        assert_eq!(
            verb_and_target(Method::GET, "/api/v1/namespaces"),
            ("list".into(), resource("", "namespaces", None, None, None))
        );
        assert_eq!(
            verb_and_target(
                Method::POST,
                "/apis/coordination.k8s.io/v1/namespaces/multisite-system/leases"
            ),
            (
                "create".into(),
                resource(
                    "coordination.k8s.io",
                    "leases",
                    None,
                    Some("multisite-system"),
                    None
                )
            )
        );
    }

    #[test]
    fn discovery_and_other_paths_are_non_resource_urls() {
        for path in [
            "/api",
            "/api/v1",
            "/apis",
            "/apis/multisite.dev",
            "/apis/multisite.dev/v1alpha1",
            "/version",
            "/openapi/v3/apis/apps/v1",
            "/healthz",
        ] {
            assert_eq!(
                verb_and_target(Method::GET, path),
                ("get".into(), Target::NonResource(path.into())),
                "{path}"
            );
        }
        assert_eq!(
            verb_and_target(Method::POST, "/version").0,
            "post",
            "the method is the verb of a non-resource URL"
        );
    }

    #[test]
    fn audit_lines_leave_out_what_a_request_does_not_name() {
        let attributes = request_attributes(
            &Method::GET,
            "/apis/multisite.dev/v1alpha1/replicas",
            Some("watch=true"),
        );
        let line: Value =
            serde_json::from_str(&attributes.audit_line("multisite-operator/0.1.0", 200))
                .expect("JSON");
        assert_eq!(
            line,
            json!({
                "verb": "watch",
                "apiGroup": "multisite.dev",
                "resource": "replicas",
                "userAgent": "multisite-operator/0.1.0",
                "code": 200,
            })
        );
        let attributes = request_attributes(&Method::GET, "/apis", None);
        let line: Value =
            serde_json::from_str(&attributes.audit_line("kubectl/v1.33", 200)).expect("JSON");
        assert_eq!(
            line,
            json!({"verb": "get", "nonResourceURL": "/apis", "userAgent": "kubectl/v1.33", "code": 200})
        );
        let attributes = request_attributes(&Method::DELETE, "/api/v1/namespaces/t/pods/p", None);
        let line: Value = serde_json::from_str(&attributes.audit_line("x", 404)).expect("JSON");
        assert_eq!(
            line,
            json!({
                "verb": "delete", "apiGroup": "", "resource": "pods", "namespace": "t",
                "name": "p", "userAgent": "x", "code": 404,
            })
        );
    }

    #[test]
    fn percent_decoding_keeps_bad_escapes() {
        assert_eq!(percent_decode("a%3Db+c"), "a=b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn lines_are_appended() {
        let path =
            std::env::temp_dir().join(format!("multisite-audit-unit-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, "{\"earlier\":true}\n").expect("write");
        let log = AuditLog::open(&path).expect("open");
        let request = request_attributes(&Method::GET, "/version", None);
        log.record(&request, "a", 200);
        log.record(&request, "b", 200);
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[2].contains("\"userAgent\":\"b\""), "{text}");
        let _ = std::fs::remove_file(&path);
    }
}
