//! `multisite dev up|down`: the embedded cluster from the command line.

use crate::dev::cluster::{self, StateDir};
use anyhow::{Context, bail};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `dev up`: runs until SIGINT or SIGTERM.
pub async fn up(dir: PathBuf, options: cluster::UpOptions) -> anyhow::Result<()> {
    let state = StateDir::new(dir)?;
    cluster::up(
        &state,
        &options,
        crate::cmd::replica::shutdown_signal(),
        |line| println!("{line}"),
    )
    .await?;
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
