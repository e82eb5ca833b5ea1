//! `multisite dev up|down`: the embedded cluster from the command line.

use crate::dev::cluster::{self, StateDir};
use crate::dev::kube;
use anyhow::{Context, bail};
use std::path::PathBuf;
use std::time::{Duration, Instant};

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
