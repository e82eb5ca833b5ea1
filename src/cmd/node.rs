//! `multisite node`: the node agent until SIGINT or SIGTERM.

use crate::node::{ImageMap, NodeName, Settings};
use anyhow::Context;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

/// The flags of `multisite node` (the command's own text is on its subcommand).
#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    /// A node to run, as NAME=ZONE (sets topology.kubernetes.io/zone); repeatable.
    #[arg(long = "node", value_name = "NAME=ZONE", required = true)]
    pub nodes: Vec<String>,
    /// Directory with one subdirectory per node: NAME/kubeconfig, NAME/serving.crt,
    /// NAME/serving.key (e2e/kube/up.sh writes them to STATE/nodes).
    #[arg(long, value_name = "DIR")]
    pub credentials: PathBuf,
    /// Pod directories, container logs and provisioned volumes live here.
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Pods get loopback addresses from this one up.
    #[arg(long, value_name = "IP", default_value = "127.3.0.1")]
    pub first_pod_address: Ipv4Addr,
    /// The kubelet endpoint of the first node; the next nodes take the next ports
    /// (0: every node a free port).
    #[arg(long, value_name = "PORT", default_value_t = 10250)]
    pub kubelet_port_base: u16,
    /// Run containers of image REPOSITORY (or an exact image reference) with PROGRAM,
    /// e.g. `shell=/bin/sh`; repeatable.
    #[arg(long = "image", value_name = "REPOSITORY=PROGRAM")]
    pub images: Vec<String>,
    /// A kubeconfig allowed to manage PersistentVolumes and read claims, storage
    /// classes and pods cluster-wide (e.g. an administrator's): turns on the volume
    /// provisioner for storage classes of provisioner `multisite.dev/node`, and finds
    /// the pods a Service selects on other agents' nodes.
    #[arg(long, value_name = "FILE")]
    pub provisioner_kubeconfig: Option<PathBuf>,
    /// Create this StorageClass (provisioner multisite.dev/node, WaitForFirstConsumer,
    /// reclaim Delete, the default class) unless it exists; needs
    /// --provisioner-kubeconfig.
    #[arg(long, value_name = "NAME")]
    pub install_storage_class: Option<String>,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
    /// First restart delay of an exited container (Kubernetes: 10), doubled per restart.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 10.0,
        hide = true,
        env = "MULTISITE_NODE_BACKOFF_BASE"
    )]
    pub backoff_base_seconds: f64,
    /// Longest restart delay (Kubernetes: 300).
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 300.0,
        hide = true,
        env = "MULTISITE_NODE_BACKOFF_CAP"
    )]
    pub backoff_cap_seconds: f64,
}

/// `NAME=ZONE`.
fn node_name(text: &str) -> anyhow::Result<NodeName> {
    let (name, zone) = text
        .split_once('=')
        .filter(|(n, z)| !n.is_empty() && !z.is_empty())
        .with_context(|| format!("--node {text:?}: expected NAME=ZONE"))?;
    Ok(NodeName {
        name: name.to_string(),
        zone: zone.to_string(),
    })
}

fn seconds(flag: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value).with_context(|| format!("{flag} {value}: not a duration"))
}

pub fn settings(args: NodeArgs) -> anyhow::Result<Settings> {
    let nodes = args
        .nodes
        .iter()
        .map(|n| node_name(n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut names = std::collections::BTreeSet::new();
    for node in &nodes {
        if !names.insert(node.name.clone()) {
            anyhow::bail!("--node {}: given twice", node.name);
        }
        let kubeconfig = args.credentials.join(&node.name).join("kubeconfig");
        if !kubeconfig.is_file() {
            anyhow::bail!(
                "node {}: no credentials at {} (e2e/kube/up.sh writes STATE/nodes/NAME/kubeconfig; pass --credentials STATE/nodes)",
                node.name,
                kubeconfig.display()
            );
        }
    }
    if !args.first_pod_address.is_loopback() {
        anyhow::bail!(
            "--first-pod-address {}: pods live on loopback addresses (127.x.y.z)",
            args.first_pod_address
        );
    }
    let mut images = ImageMap::current_exe();
    for image in &args.images {
        let (repository, program) = image
            .split_once('=')
            .filter(|(r, p)| !r.is_empty() && !p.is_empty())
            .with_context(|| format!("--image {image:?}: expected REPOSITORY=PROGRAM"))?;
        images = images.with(repository, program);
    }
    let mut settings = Settings::new(nodes, args.credentials, args.state_dir);
    settings.first_pod_address = args.first_pod_address;
    settings.kubelet_port_base = args.kubelet_port_base;
    settings.images = images;
    settings.provisioner_kubeconfig = args.provisioner_kubeconfig;
    settings.install_storage_class = args.install_storage_class;
    settings.backoff_base = seconds("--backoff-base-seconds", args.backoff_base_seconds)?;
    settings.backoff_cap = seconds("--backoff-cap-seconds", args.backoff_cap_seconds)?;
    Ok(settings)
}

pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    let settings = settings(args)?;
    crate::node::run(settings, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_need_a_zone() {
        assert_eq!(
            node_name("node-a=zone-a").unwrap(),
            NodeName {
                name: "node-a".into(),
                zone: "zone-a".into()
            }
        );
        assert!(node_name("node-a").is_err());
        assert!(node_name("=z").is_err());
    }
}
