//! Text rewrites that stand in for the network a real pod has: `0.0.0.0` becomes the
//! pod's own address (all pods share the host's network namespace), and a URL host
//! `NAME.NAMESPACE.svc[.cluster.local]` becomes the address of a pod Service NAME
//! selects (there is no cluster DNS and no kube-proxy). Shared by the node agent and
//! the embedded cluster's process kubelet.

use std::net::Ipv4Addr;

/// `0.0.0.0` as a whole address (not the end of `10.0.0.0`) becomes `ip`.
pub fn replace_any_address(value: &str, ip: Ipv4Addr) -> String {
    const ANY: &str = "0.0.0.0";
    let mut out = String::new();
    let mut rest = value;
    while let Some(found) = rest.find(ANY) {
        let before = rest[..found].chars().next_back();
        let after = rest[found + ANY.len()..].chars().next();
        let joined = |c: Option<char>| c.is_some_and(|c| c.is_ascii_digit() || c == '.');
        out.push_str(&rest[..found]);
        if joined(before) || joined(after) {
            out.push_str(ANY);
        } else {
            out.push_str(&ip.to_string());
        }
        rest = &rest[found + ANY.len()..];
    }
    out.push_str(rest);
    out
}

/// The `(namespace, service)` of a URL host `SERVICE.NAMESPACE.svc` or
/// `SERVICE.NAMESPACE.svc.cluster.local`; `None` for any other host.
fn service_of_host(host: &str) -> Option<(&str, &str)> {
    let name = host
        .strip_suffix(".svc.cluster.local")
        .or_else(|| host.strip_suffix(".svc"))?;
    let (service, namespace) = name.split_once('.')?;
    (!service.is_empty() && !namespace.is_empty() && !namespace.contains('.'))
        .then_some((namespace, service))
}

/// Calls `each` with every URL host in `value` (what follows `://` up to a port, path or
/// query) and pastes what it returns in its place.
fn map_url_hosts(
    value: &str,
    mut each: impl FnMut(&str) -> Result<String, String>,
) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(found) = rest.find("://") {
        let host_start = found + 3;
        out.push_str(&rest[..host_start]);
        let tail = &rest[host_start..];
        let host_end = tail.find([':', '/', '?']).unwrap_or(tail.len());
        out.push_str(&each(&tail[..host_end])?);
        rest = &tail[host_end..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The `(namespace, service)` pairs named by URL hosts in `value`, in order.
pub fn service_hosts(value: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let _ = map_url_hosts(value, |host| {
        if let Some((namespace, service)) = service_of_host(host) {
            found.push((namespace.to_string(), service.to_string()));
        }
        Ok(host.to_string())
    });
    found
}

/// `value` with each URL host `NAME.NAMESPACE.svc[.cluster.local]` replaced by what
/// `resolve(namespace, name)` answers; its error is the rewrite's error.
pub fn rewrite_service_hosts(
    value: &str,
    mut resolve: impl FnMut(&str, &str) -> Result<String, String>,
) -> Result<String, String> {
    map_url_hosts(value, |host| match service_of_host(host) {
        Some((namespace, service)) => resolve(namespace, service),
        None => Ok(host.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_any_address_becomes_the_pods() {
        let ip = Ipv4Addr::new(127, 3, 0, 9);
        assert_eq!(replace_any_address("0.0.0.0:80", ip), "127.3.0.9:80");
        assert_eq!(replace_any_address("10.0.0.0/8", ip), "10.0.0.0/8");
        assert_eq!(replace_any_address("a=0.0.0.0", ip), "a=127.3.0.9");
    }

    #[test]
    fn service_hosts_are_found_and_replaced() {
        let value = "--peer=http://db.ns.svc:7400/x,https://api.other.svc.cluster.local";
        assert_eq!(
            service_hosts(value),
            vec![
                ("ns".to_string(), "db".to_string()),
                ("other".to_string(), "api".to_string())
            ]
        );
        let rewritten = rewrite_service_hosts(value, |ns, name| Ok(format!("{name}@{ns}")));
        assert_eq!(
            rewritten.as_deref(),
            Ok("--peer=http://db@ns:7400/x,https://api@other")
        );
        assert!(service_hosts("http://example.com:80 db.ns.svc").is_empty());
        assert_eq!(
            rewrite_service_hosts("http://x.y.svc", |_, _| Err("none".into())),
            Err("none".to_string())
        );
    }
}
