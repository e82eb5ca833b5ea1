//! The workload runner of the embedded cluster: a StatefulSet and a Deployment controller
//! that make pods from their templates, and a process kubelet that runs each pod's
//! containers as local processes when their image maps to a program.
//!
//! Each pass works on the [`Store`] under its lock ([`reconcile_controllers`] is pure and
//! takes the time; [`Kubelet::sync`] starts and stops processes); [`run`] loops them.
//!
//! Where this is simpler than Kubernetes (the Kubernetes behaviour is the right one):
//! - Deployments own their pods directly (no ReplicaSets) and roll out recreate-style: on
//!   a template change every old pod is deleted, and the new ones are created once the old
//!   ones are gone, whatever `spec.strategy` says;
//! - StatefulSets: `podManagementPolicy` is always OrderedReady; a template change replaces
//!   pods from the highest ordinal down, one at a time once all are ready (RollingUpdate
//!   without partitions; `OnDelete` is honoured); `minReadySeconds` is ignored;
//! - PersistentVolumeClaims are Bound at creation, each backed by a directory; there are
//!   no PersistentVolume objects and claims are never deleted by the runner;
//! - the kubelet holds a pod with the finalizer [`KUBELET_FINALIZER`] while it runs its
//!   processes, so that a deleted pod stays (with its deletionTimestamp) until they are
//!   gone; the real API server does this with graceful deletion instead;
//! - a pass runs every [`Settings::tick`] rather than on watch events; a pass that changes
//!   nothing writes nothing;
//! - controllers find their pods by controller owner reference, not by `spec.selector`;
//!   owner-reference garbage collection (a deleted StatefulSet's pods) is the API layer's
//!   job ([`Store::collect_garbage`]), not the runner's; no Events are recorded;
//! - pods have no node: `spec.nodeName` stays unset, `status.hostIP` is 127.0.0.1;
//! - when the runner stops, its processes are stopped and pod statuses stay as last
//!   written; a new runner starts the pods again (init containers included, restart counts
//!   from 0), on their earlier addresses when free;
//! - addresses are unique within one runner: two runners on one machine need different
//!   [`Settings::first_address`]es.
//!
//! State directory layout: `pods/<namespace>_<pod>/` (working directory, emptyDirs under
//! `volumes/`, removed with the pod), `volumes/<namespace>/<claim>/` (claim data, kept),
//! `logs/<namespace>_<pod>_<container>.log` (the container's current instance; when it
//! starts again, the log of the one before is kept as `...<container>.previous.log`),
//! `run/<namespace>_<pod>_<container>.pid`.

mod controllers;
mod kubelet;
mod process;
mod util;

pub use controllers::{reconcile_controllers, template_hash};
pub use kubelet::{KUBELET_FINALIZER, Kubelet};
pub use multisite_node::images::{ImageMap, repository_of};

use super::objects::Store;
use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the runner can fail on.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error(transparent)]
    Store(#[from] super::status::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("pod {pod}: {message}")]
    Pod { pod: String, message: String },
    #[error("no free loopback address left for pods")]
    NoAddress,
}

impl WorkloadError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// How the runner runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Pod directories, PVC data, logs and pid files live under here.
    pub state_dir: PathBuf,
    pub images: ImageMap,
    /// The first restart delay of a container that exited; doubled on each restart up to
    /// [`Settings::backoff_cap`] (Kubernetes: 10 s and 5 min).
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Between SIGTERM and SIGKILL when a pod is deleted, unless the pod sets
    /// `terminationGracePeriodSeconds`.
    pub grace_period: Duration,
    /// How often [`run`] makes a pass.
    pub tick: Duration,
    /// Pod addresses are the lowest free ones from here up (default 127.1.0.1).
    pub first_address: std::net::Ipv4Addr,
}

impl Settings {
    /// Kubernetes' timings, the default image map, state under `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            images: ImageMap::current_exe(),
            backoff_base: Duration::from_secs(10),
            backoff_cap: Duration::from_secs(300),
            grace_period: Duration::from_secs(30),
            tick: Duration::from_millis(200),
            first_address: std::net::Ipv4Addr::new(127, 1, 0, 1),
        }
    }

    /// The log of a container's current (or last) instance:
    /// `<state>/logs/<namespace>_<pod>_<container>.log`.
    pub fn log_path(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        self.state_dir
            .join("logs")
            .join(format!("{namespace}_{pod}_{container}.log"))
    }

    /// The log of the instance before it (`kubectl logs --previous`):
    /// `<state>/logs/<namespace>_<pod>_<container>.previous.log`.
    pub fn previous_log_path(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        self.state_dir
            .join("logs")
            .join(format!("{namespace}_{pod}_{container}.previous.log"))
    }

    /// The data directory of a PersistentVolumeClaim: `<state>/volumes/<namespace>/<claim>`.
    pub fn claim_dir(&self, namespace: &str, claim: &str) -> PathBuf {
        self.state_dir.join("volumes").join(namespace).join(claim)
    }

    /// A pod's own directory (its working directory; emptyDirs below it), removed with the
    /// pod: `<state>/pods/<namespace>_<pod>`.
    pub fn pod_dir(&self, namespace: &str, pod: &str) -> PathBuf {
        self.state_dir
            .join("pods")
            .join(format!("{namespace}_{pod}"))
    }
}

/// How the runner reaches the store; the API server's state implements it too (and may
/// wake its watchers after `f` returns, since the runner writes through it).
pub trait StoreAccess: Send + Sync + 'static {
    fn with_store<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R;
}

impl StoreAccess for Mutex<Store> {
    fn with_store<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        let mut store = self.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut store)
    }
}

/// Runs the controllers and the kubelet until `shutdown` completes, then stops every
/// process it started (SIGTERM, SIGKILL after the grace period). Pods keep their state in
/// the store, so a later run starts their processes again.
pub async fn run<S: StoreAccess>(
    store: Arc<S>,
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkloadError> {
    let mut kubelet = Kubelet::new(settings.clone())?;
    let mut ticker = tokio::time::interval(settings.tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut reported = BTreeSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = ticker.tick() => {}
        }
        kubelet.probe().await;
        let now = k8s_openapi::jiff::Timestamp::now();
        let errors = store.with_store(|s| {
            let mut errors = reconcile_controllers(s, now);
            errors.extend(kubelet.sync(s, now));
            errors
        });
        // Each failure is logged once, not on every pass while it lasts.
        let messages: BTreeSet<String> = errors.iter().map(ToString::to_string).collect();
        for error in messages.difference(&reported) {
            tracing::warn!(%error, "workload runner");
        }
        reported = messages;
    }
    kubelet.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests;
