//! `multisite dev up|down`: the embedded cluster from the command line.

use crate::dev::cluster::{self, StateDir};
use crate::dev::kube;
use anyhow::{Context, bail};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Subcommand, Debug)]
pub enum DevCommand {
    /// Start a local cluster: install the CRDs, apply the manifests, write the
    /// kubeconfig, print a summary of the fleet as it changes. Ctrl-C or SIGTERM
    /// stops everything; the state stays in --dir and the next `dev up` resumes it.
    ///
    /// The cluster is the real Kubernetes control plane (etcd, kube-apiserver,
    /// kube-controller-manager, kube-scheduler from e2e/kube, built from Kubernetes' Go
    /// modules on first use: about 9 minutes on 2 cores, then cached) with `multisite
    /// node` running one Node per zone the Sites name, all as processes of this machine
    /// (needs root). Where that cannot be had (no Go, no root, no e2e/kube scripts) it
    /// says why in one line and runs the embedded stand-in API server instead.
    #[command(after_help = "Examples:
  multisite dev up -f examples/fleet.yaml
  multisite dev up -f examples/fleet.yaml --kube-binaries ~/kubernetes/server/bin
  multisite dev up -f examples/fleet.yaml --stand-in
  kubectl --kubeconfig .dev-state/kubeconfig get nodes,replicas -A

See docs/dev.md.")]
    Up(UpArgs),
    /// Stop the embedded cluster running from --dir.
    Down {
        #[arg(long, value_name = "DIR", default_value = ".dev-state")]
        dir: PathBuf,
    },
}

/// The flags of `multisite dev up` (the command's own text is on its subcommand).
#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Manifest files or directories to apply (server-side apply); repeatable.
    #[arg(short = 'f', long = "filename", value_name = "PATH")]
    pub manifests: Vec<PathBuf>,
    /// State directory: objects, pod data and logs, kubeconfig.
    #[arg(long, value_name = "DIR", default_value = ".dev-state")]
    pub dir: PathBuf,
    /// Run the embedded stand-in API server, not the real control plane.
    #[arg(long)]
    pub stand_in: bool,
    /// A directory with the official release binaries kube-apiserver,
    /// kube-controller-manager and kube-scheduler (and etcd, else etcd from PATH):
    /// used instead of building them from the Go modules.
    #[arg(long, value_name = "DIR", conflicts_with = "stand_in")]
    pub kube_binaries: Option<PathBuf>,
    /// Address of the stand-in API server (port 0 picks a free port); implies
    /// --stand-in.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
    /// Do not run the operator inside the dev cluster (run `multisite operator`
    /// against its kubeconfig yourself).
    #[arg(long)]
    pub no_operator: bool,
    /// Pods get loopback addresses from this one up; two dev clusters on one
    /// machine need different ranges (e.g. 127.1.0.1 and 127.2.0.1).
    #[arg(long, value_name = "IP", default_value = "127.1.0.1")]
    pub first_pod_address: Ipv4Addr,
    /// Record every request the API server answers as one JSON line appended to
    /// FILE (created if missing): the RBAC verb, API group, resource, subresource,
    /// namespace and name (or the non-resource URL), the client's User-Agent and
    /// the HTTP status. Shows what a client such as the operator really calls,
    /// e.g. to check RBAC rules against it. Stand-in only: implies --stand-in.
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Delegate mode: serve the groups apiextensions.k8s.io, multisite.dev,
    /// coordination.k8s.io and events.k8s.io from the API server at URL (plain
    /// HTTP, e.g. the one e2e/apiserver/up.sh starts) and core/v1 and apps/v1 here;
    /// clients still see one API server. The CRDs are installed there. Implies
    /// --stand-in.
    #[arg(long, value_name = "URL")]
    pub delegate: Option<String>,
}

/// `multisite dev up|down`.
pub async fn run(command: DevCommand) -> anyhow::Result<()> {
    match command {
        DevCommand::Up(args) => {
            let (dir, options, cluster) = up_options(args)?;
            up(dir, options, cluster).await
        }
        DevCommand::Down { dir } => {
            println!("{}", down(dir, Duration::from_secs(60))?);
            Ok(())
        }
    }
}

/// The state directory, options and cluster the flags of `dev up` ask for.
fn up_options(args: UpArgs) -> anyhow::Result<(PathBuf, cluster::UpOptions, Cluster)> {
    let UpArgs {
        manifests,
        dir,
        stand_in,
        kube_binaries,
        listen,
        log_json: _,
        no_operator,
        first_pod_address,
        audit_log,
        delegate,
    } = args;
    if !first_pod_address.is_loopback() {
        bail!(
            "--first-pod-address {first_pod_address}: pods live on loopback addresses (127.x.y.z)"
        );
    }
    // Only the stand-in serves these, so asking for one is asking for it.
    let stand_in = stand_in || listen.is_some() || audit_log.is_some() || delegate.is_some();
    let defaults = cluster::UpOptions::new(manifests);
    let options = cluster::UpOptions {
        listen: listen.unwrap_or(defaults.listen.clone()),
        operator: !no_operator,
        first_pod_address,
        audit_log,
        delegate,
        ..defaults
    };
    let which = if stand_in {
        Cluster::StandIn
    } else {
        Cluster::Real(kube::KubeOptions {
            harness: None,
            binaries: kube_binaries,
        })
    };
    Ok((dir, options, which))
}

/// Which cluster `dev up` runs.
pub enum Cluster {
    /// The embedded stand-in API server and its process kubelet.
    StandIn,
    /// The real control plane where it can be had, else the stand-in.
    Real(kube::KubeOptions),
}

/// `dev up`: runs until SIGINT or SIGTERM.
pub async fn up(dir: PathBuf, options: cluster::UpOptions, which: Cluster) -> anyhow::Result<()> {
    let state = StateDir::new(dir)?;
    // One signal, seen by whichever cluster runs (and by the real one while it starts).
    let (signalled, signal) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        crate::cmd::replica::shutdown_signal().await;
        let _ = signalled.send(true);
    });
    let shutdown = move || {
        let mut signal = signal.clone();
        async move {
            let _ = signal.wait_for(|s| *s).await;
        }
    };
    let ran_real = match &which {
        Cluster::StandIn => false,
        Cluster::Real(kube_options) => {
            match kube::up(&state, &options, kube_options, shutdown(), |line| {
                println!("{line}")
            })
            .await?
            {
                kube::Outcome::Ran => true,
                kube::Outcome::Unavailable(reason) => {
                    println!(
                        "real Kubernetes control plane unavailable ({reason}): running the embedded stand-in instead (--stand-in skips this check)"
                    );
                    false
                }
            }
        }
    };
    if !ran_real {
        cluster::up(&state, &options, shutdown(), |line| println!("{line}")).await?;
    }
    println!(
        "dev cluster stopped; its state stays in {}",
        state.0.display()
    );
    Ok(())
}

/// `dev down`: asks the dev cluster running from `dir` to stop, and waits (at most
/// `wait`) until it has.
pub fn down(dir: PathBuf, wait: Duration) -> anyhow::Result<String> {
    let state = StateDir::new(dir)?;
    let Some(pid) = cluster::running_pid(&state) else {
        return Ok(format!("no dev cluster runs from {}", state.0.display()));
    };
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .context("cannot run kill")?;
    if !status.success() {
        bail!("cannot signal process {pid}");
    }
    let start = Instant::now();
    while cluster::process_alive(pid) {
        if start.elapsed() > wait {
            bail!("process {pid} did not stop within {} s", wait.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(format!(
        "stopped the dev cluster of {} (process {pid})",
        state.0.display()
    ))
}
