//! `multisite operator`: the controllers that turn the custom resources into running
//! replica servers and keep each family synchronised.
//!
//! One scope per watched namespace (or one for all namespaces), each with the four
//! controllers (Replica, ReplicaFamily, Site, SchemaPackage) and the sync runner, all
//! sharing one [`context::Ctx`]. With leader election only the lease holder runs them.
//! Every reconcile is idempotent and all progress lives in the cluster and the
//! replicas, so a restarted operator picks up where the last one stopped.

pub mod builders;
pub mod clients;
pub mod context;
pub mod families;
pub mod gateway;
pub mod leader;
pub mod metrics;
pub mod packages;
pub mod reconcile;
#[cfg(test)]
mod reconcile_tests;
pub mod replicas;
pub mod sites;
pub mod sync;
pub mod upgrade;

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, reflector::reflector, watcher};
use kube::{Resource, ResourceExt};
use multisite_core::api::Replica;
use multisite_core::api::ReplicaFamily;
use multisite_core::api::SchemaPackage;
use multisite_core::api::Site;
use std::net::SocketAddr;
use std::sync::Arc;

/// What the operator can fail on.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("replica API: {0}")]
    Replica(#[from] multisite_replica::http::HttpError),
    #[error("family secret: {0}")]
    Secret(String),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "the multisite.dev/v1alpha1 custom resource definitions are not installed in this cluster (missing: {missing}); \
         install them with `kubectl apply -f crds/` or the Helm chart, then start the operator again"
    )]
    MissingCrds { missing: String },
    #[error("cannot serve metrics on {addr}: {reason}")]
    Metrics { addr: String, reason: String },
    #[error("lost the leader lease; stopping so that a single operator acts")]
    LostLease,
}

/// The user agent of the operator's requests to the Kubernetes API.
pub const USER_AGENT: &str = concat!("multisite-operator/", env!("CARGO_PKG_VERSION"));

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Namespaces to watch; empty: all.
    pub namespaces: Vec<String>,
    /// The image (and pull policy) of the pods the operator creates.
    pub image: builders::Image,
    /// Leader election, if enabled.
    pub election: Option<leader::Election>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    /// This process's name in events and the lease.
    pub identity: String,
    /// How many sync tasks may run at once across all the families this operator
    /// watches; a family's `spec.sync` limits narrow them for its own links.
    pub sync_limits: multisite_core::domain::scheduler::Limits,
}

/// The image this build gives pods by default.
pub fn default_image() -> String {
    format!("ghcr.io/multisite/multisite:{}", env!("CARGO_PKG_VERSION"))
}

/// Fails with [`OperatorError::MissingCrds`] unless the API server serves our four kinds.
pub async fn check_crds(client: &kube::Client) -> Result<(), OperatorError> {
    let wanted = [
        ReplicaFamily::plural(&()).to_string(),
        Replica::plural(&()).to_string(),
        Site::plural(&()).to_string(),
        SchemaPackage::plural(&()).to_string(),
    ];
    let served: Vec<String> = match client
        .list_api_group_resources(multisite_core::api::API_VERSION)
        .await
    {
        Ok(list) => list.resources.into_iter().map(|r| r.name).collect(),
        Err(kube::Error::Api(e)) if e.code == 404 => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let missing: Vec<String> = wanted.into_iter().filter(|w| !served.contains(w)).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(OperatorError::MissingCrds {
            missing: missing.join(", "),
        })
    }
}

/// Runs the operator until `shutdown` resolves (or the lease is lost).
pub async fn run(
    client: kube::Client,
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), OperatorError> {
    check_crds(&client).await?;
    let metrics = Arc::new(metrics::Metrics::default());
    metrics.set_ready(true);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut background = Vec::new();
    if let Some(addr) = settings.metrics_addr {
        let listener =
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| OperatorError::Metrics {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                })?;
        tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving metrics and health probes");
        background.push(tokio::spawn({
            let metrics = metrics.clone();
            let stopped = until_stopped(stopped.clone());
            async move {
                if let Err(error) = metrics::serve(listener, metrics, stopped).await {
                    tracing::error!(%error, "metrics server stopped");
                }
            }
        }));
    }
    tokio::pin!(shutdown);

    let mut lease_lost: Option<tokio::task::JoinHandle<()>> = None;
    if let Some(election) = &settings.election {
        let leases: Api<Lease> = Api::namespaced(client.clone(), &election.namespace);
        tokio::select! {
            _ = leader::acquire(&leases, election) => {}
            _ = &mut shutdown => {
                let _ = stop.send(true);
                for task in background { let _ = task.await; }
                return Ok(());
            }
        }
        let election = election.clone();
        lease_lost = Some(tokio::spawn(async move {
            leader::keep(&leases, &election).await;
        }));
    }
    metrics.set_leader(true);

    let scopes: Vec<Option<String>> = if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().cloned().map(Some).collect()
    };
    tracing::info!(namespaces = ?settings.namespaces, image = %settings.image.reference, "operator running");
    // One sync runner for every scope, so that the limits hold across all families.
    let (scope_ready, ready_scopes) = tokio::sync::mpsc::unbounded_channel();
    let mut scope_tasks = vec![tokio::spawn(sync::run(
        ready_scopes,
        settings.sync_limits,
        metrics.clone(),
        stopped.clone(),
    ))];
    for scope in scopes {
        scope_tasks.push(tokio::spawn(run_scope(
            client.clone(),
            scope,
            settings.clone(),
            metrics.clone(),
            stopped.clone(),
            scope_ready.clone(),
        )));
    }
    let lost = async {
        match lease_lost.as_mut() {
            Some(handle) => {
                let _ = handle.await;
                true
            }
            None => std::future::pending::<bool>().await,
        }
    };
    let lost = tokio::select! {
        _ = &mut shutdown => false,
        lost = lost => lost,
    };
    metrics.set_leader(false);
    let _ = stop.send(true);
    for task in scope_tasks.into_iter().chain(background) {
        let _ = task.await;
    }
    if let Some(handle) = lease_lost {
        handle.abort();
    }
    if lost {
        return Err(OperatorError::LostLease);
    }
    tracing::info!("operator stopped");
    Ok(())
}

/// Resolves once the operator is told to stop (or the sender is gone).
async fn until_stopped(mut stopped: tokio::sync::watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

fn api<K>(client: &kube::Client, scope: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match scope {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// One watch of `K` for `N` consumers: the cache it fills, `N` streams of the objects it
/// touches (changed, or deleted) for controllers, and the watch itself, to be driven.
/// The streams are unbounded channels: a controller that has not started yet (they start
/// once every cache has loaded) or lags never holds the watch back, and a deletion
/// reaches it too.
fn watch_into_cache<K, const N: usize>(
    api: Api<K>,
    config: watcher::Config,
) -> (
    reflector::Store<K>,
    [UnboundedReceiver<K>; N],
    impl std::future::Future<Output = ()>,
)
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let channels: [(UnboundedSender<K>, UnboundedReceiver<K>); N] =
        std::array::from_fn(|_| futures::channel::mpsc::unbounded());
    let senders: Vec<UnboundedSender<K>> = channels.iter().map(|(s, _)| s.clone()).collect();
    let watch = reflector(writer, watcher(api, config))
        .default_backoff()
        .touched_objects()
        .for_each(move |touched| {
            match touched {
                Ok(object) => {
                    for sender in &senders {
                        // A closed channel is a controller that stopped.
                        let _ = sender.unbounded_send(object.clone());
                    }
                }
                Err(error) => {
                    tracing::warn!(kind = %K::kind(&()), %error, "watch failed; retrying")
                }
            }
            std::future::ready(())
        });
    (store, channels.map(|(_, r)| r), watch)
}

/// The controllers and the sync runner of one namespace (or of all).
async fn run_scope(
    client: kube::Client,
    scope: Option<String>,
    settings: Settings,
    metrics: Arc<metrics::Metrics>,
    stopped: tokio::sync::watch::Receiver<bool>,
    ready: tokio::sync::mpsc::UnboundedSender<Arc<context::Ctx>>,
) {
    let config = watcher::Config::default();
    // One watch of each kind the controllers read, into a cache; the Replicas' changes go
    // to the three controllers that follow them, the others' to the one that does.
    let (replica_store, [for_replicas, for_families, for_sites], replica_watch) =
        watch_into_cache(api::<Replica>(&client, &scope), config.clone());
    let (family_store, [family_events], family_watch) =
        watch_into_cache(api::<ReplicaFamily>(&client, &scope), config.clone());
    let (site_store, [site_events], site_watch) =
        watch_into_cache(api::<Site>(&client, &scope), config.clone());
    // The StatefulSets, Deployments, Services and pods of the product, cached so that a
    // reconcile reads them without a request, and watched so that a change to one
    // reconciles its Replica or family at once.
    let owned = config.clone().labels(builders::MANAGED);
    let (statefulsets, [statefulset_events], statefulset_watch) =
        watch_into_cache(api::<StatefulSet>(&client, &scope), owned.clone());
    let (deployments, [deployment_events], deployment_watch) =
        watch_into_cache(api::<Deployment>(&client, &scope), owned.clone());
    let (services, [service_events], service_watch) =
        watch_into_cache(api::<Service>(&client, &scope), owned.clone());
    let (pods, [pod_events], pod_watch) = watch_into_cache(api::<Pod>(&client, &scope), owned);
    let replicas = Controller::for_stream(for_replicas.map(Ok), replica_store.clone())
        .owns_stream(statefulset_events.map(Ok))
        .owns_stream(service_events.map(Ok))
        .watches_stream(pod_events.map(Ok), |pod: Pod| {
            // Only a replica's own pod: the gateway's names its replica too.
            let labels = pod.labels();
            if labels.get(builders::COMPONENT_LABEL).map(String::as_str) != Some("replica") {
                return None;
            }
            let namespace = pod.metadata.namespace.clone()?;
            Some(ObjectRef::new(labels.get(builders::REPLICA_LABEL)?).within(&namespace))
        });
    // A family is reconciled when it, one of its Replicas, or a Deployment it owns (its
    // client tiers and gateway) changes, and when the sync runner's link states for it
    // change (the trigger stream, joined once the context exists).
    let families = Controller::for_stream(family_events.map(Ok), family_store.clone())
        .watches_stream(for_families.map(Ok), |r: Replica| {
            let namespace = r.metadata.namespace.clone()?;
            Some(ObjectRef::new(&r.spec.family).within(&namespace))
        })
        .owns_stream(deployment_events.map(Ok));
    let sites = Controller::for_stream(site_events.map(Ok), site_store.clone()).watches_stream(
        for_sites.map(Ok),
        |r: Replica| {
            let namespace = r.metadata.namespace.clone()?;
            Some(ObjectRef::new(&r.spec.site).within(&namespace))
        },
    );
    let packages = Controller::new(api::<SchemaPackage>(&client, &scope), config.clone());
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "multisite-operator".into(),
            instance: Some(settings.identity.clone()),
        },
    );
    let ctx = Arc::new(context::Ctx::new(
        client.clone(),
        recorder,
        metrics,
        settings.image.clone(),
        context::Stores {
            replicas: replica_store,
            families: family_store,
            sites: site_store,
            statefulsets,
            deployments,
            services,
            pods,
        },
    ));
    let families = match ctx.take_family_triggers() {
        Some(triggers) => families.reconcile_on(triggers),
        None => families,
    };
    // Each watch and each controller is a task of its own: one future holding them all
    // would be too deep for a worker thread's stack in a debug build.
    let watches: Vec<BoxFuture<'static, ()>> = vec![
        replica_watch.boxed(),
        family_watch.boxed(),
        site_watch.boxed(),
        statefulset_watch.boxed(),
        deployment_watch.boxed(),
        service_watch.boxed(),
        pod_watch.boxed(),
    ];
    let mut tasks: Vec<tokio::task::JoinHandle<()>> = watches
        .into_iter()
        .map(|watch| {
            let stopped = until_stopped(stopped.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = watch => {}
                    _ = stopped => {}
                }
            })
        })
        .collect();
    // The controllers and the sync runner start once every cache has loaded: a reconcile
    // on a cache still empty would take a live pod for a missing one.
    let caches = ctx.caches();
    tokio::select! {
        () = caches.ready() => {}
        _ = until_stopped(stopped.clone()) => {
            for task in tasks {
                let _ = task.await;
            }
            return;
        }
    }
    tracing::debug!("caches loaded; controllers start");
    // The sync runner takes this scope's families from now on (a closed channel: the
    // runner stopped, as everything is stopping).
    let _ = ready.send(ctx.clone());
    let controllers: Vec<BoxFuture<'static, ()>> = vec![
        replicas
            .graceful_shutdown_on(until_stopped(stopped.clone()))
            .run(replicas::reconcile, reconcile::error_policy, ctx.clone())
            .for_each(|_| std::future::ready(()))
            .boxed(),
        families
            .graceful_shutdown_on(until_stopped(stopped.clone()))
            .run(families::reconcile, reconcile::error_policy, ctx.clone())
            .for_each(|_| std::future::ready(()))
            .boxed(),
        sites
            .graceful_shutdown_on(until_stopped(stopped.clone()))
            .run(sites::reconcile_site, reconcile::error_policy, ctx.clone())
            .for_each(|_| std::future::ready(()))
            .boxed(),
        packages
            .graceful_shutdown_on(until_stopped(stopped.clone()))
            .run(
                packages::reconcile_package,
                reconcile::error_policy,
                ctx.clone(),
            )
            .for_each(|_| std::future::ready(()))
            .boxed(),
    ];
    tasks.extend(controllers.into_iter().map(tokio::spawn));
    for task in tasks {
        let _ = task.await;
    }
}
