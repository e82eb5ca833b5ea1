//! What every controller of one watch scope shares: the client, the caches of our
//! resources, the event recorder, metrics, and the sync runner's latest link states.

use super::OperatorError;
use super::builders::{self, Image};
use super::metrics::Metrics;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use multisite_core::api::Replica;
use multisite_core::api::Site;
use multisite_core::api::{LinkStatus, ReplicaFamily};
use multisite_core::domain::scheduler::TaskKind;
use multisite_replica::api::ReplicaClient;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The one field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "multisite-operator";

/// A family by namespace and name.
pub type FamilyKey = (String, String);

/// An object by kind, namespace and name.
type AppliedKey = (String, String, String);

/// A manual task asked for through the family's annotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManualRequest {
    pub family: FamilyKey,
    pub kind: TaskKind,
    /// Only this link (`from`, `to`), or every link of the family.
    pub link: Option<(String, String)>,
}

/// What the operator applies: a namespaced object it can send and read back.
pub trait Applicable:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + serde::Serialize
    + serde::de::DeserializeOwned
    + std::fmt::Debug
{
}

impl<K> Applicable for K where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug
{
}

/// A Kubernetes Event to publish about an object, as a decision names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    pub warning: bool,
    pub reason: &'static str,
    pub action: &'static str,
    pub note: String,
}

impl Announcement {
    pub fn normal(reason: &'static str, action: &'static str, note: String) -> Self {
        Announcement {
            warning: false,
            reason,
            action,
            note,
        }
    }

    pub fn warning(reason: &'static str, action: &'static str, note: String) -> Self {
        Announcement {
            warning: true,
            reason,
            action,
            note,
        }
    }
}

/// The caches of one watch scope, each filled by one watch, that the controllers read
/// instead of asking the API server.
#[derive(Clone)]
pub struct Stores {
    pub replicas: Store<Replica>,
    pub families: Store<ReplicaFamily>,
    pub sites: Store<Site>,
    /// The StatefulSets, Deployments, Services and pods of the product (labelled
    /// [`builders::MANAGED`]).
    pub statefulsets: Store<StatefulSet>,
    pub deployments: Store<Deployment>,
    pub services: Store<Service>,
    pub pods: Store<Pod>,
}

impl Stores {
    /// Resolves once every cache has loaded its first full list (or its watch is gone).
    pub async fn ready(&self) {
        // An error means the watch behind a cache stopped: the operator is stopping.
        let _ = tokio::join!(
            self.replicas.wait_until_ready(),
            self.families.wait_until_ready(),
            self.sites.wait_until_ready(),
            self.statefulsets.wait_until_ready(),
            self.deployments.wait_until_ready(),
            self.services.wait_until_ready(),
            self.pods.wait_until_ready(),
        );
    }
}

pub struct Ctx {
    pub client: kube::Client,
    /// Tables 1 and 2, for the upgrade planner.
    pub compat: multisite_core::domain::compat::Compatibility,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub image: Image,
    pub replicas: Store<Replica>,
    pub families: Store<ReplicaFamily>,
    /// Families whose link states changed, for the family controller to reconcile now
    /// (instead of polling the links on a fixed requeue).
    family_changes: futures::channel::mpsc::UnboundedSender<ObjectRef<ReplicaFamily>>,
    family_triggers:
        Mutex<Option<futures::channel::mpsc::UnboundedReceiver<ObjectRef<ReplicaFamily>>>>,
    pub sites: Store<Site>,
    pub statefulsets: Store<StatefulSet>,
    pub deployments: Store<Deployment>,
    pub services: Store<Service>,
    pub pods: Store<Pod>,
    /// The link index: the sync runner's view of each family's links, written only by
    /// the sync runner (`set_links`, `set_topology_error`, which wake the family when its
    /// conditions may change) and read by the family controller, the one writer of the
    /// family's status.
    links: Mutex<HashMap<FamilyKey, Vec<LinkStatus>>>,
    /// Why a family has no links although it should, from the sync runner.
    topology_errors: Mutex<HashMap<FamilyKey, String>>,
    /// Manual tasks waiting for the sync runner.
    pub manual: Mutex<Vec<ManualRequest>>,
    /// The error policy's back-off of each object whose last reconcile failed.
    pub backoffs: super::reconcile::Backoffs,
    /// One replica client per family: its token, and one connection pool that every
    /// call to the family's replicas shares.
    replica_clients: Mutex<HashMap<FamilyKey, ReplicaClient>>,
    /// Secrets (namespace, name) this process has seen or made, so they are not read
    /// again on every reconcile.
    secrets: Mutex<std::collections::HashSet<(String, String)>>,
    /// The last value of each family condition this process announced with an Event,
    /// so that a reconcile working from a cache that lags its own status write does
    /// not announce a transition twice.
    announced: Mutex<HashMap<FamilyKey, BTreeMap<String, bool>>>,
    /// The version each object had right after this process applied it (see
    /// [`Ctx::as_applied`]).
    applied: Mutex<HashMap<AppliedKey, String>>,
    /// The plan status this process last wrote for each family.
    plans: Mutex<HashMap<FamilyKey, multisite_core::api::PlanStatus>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ctx {
    pub fn new(
        client: kube::Client,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        image: Image,
        stores: Stores,
    ) -> Self {
        let (family_changes, family_triggers) = futures::channel::mpsc::unbounded();
        Ctx {
            family_changes,
            family_triggers: Mutex::new(Some(family_triggers)),
            client,
            compat: multisite_core::domain::compat::Compatibility::builtin(),
            recorder,
            metrics,
            image,
            replicas: stores.replicas,
            families: stores.families,
            sites: stores.sites,
            statefulsets: stores.statefulsets,
            deployments: stores.deployments,
            services: stores.services,
            pods: stores.pods,
            links: Mutex::default(),
            topology_errors: Mutex::default(),
            manual: Mutex::default(),
            backoffs: Default::default(),
            replica_clients: Mutex::default(),
            secrets: Mutex::default(),
            announced: Mutex::default(),
            plans: Mutex::default(),
            applied: Mutex::default(),
        }
    }

    pub fn family(&self, namespace: &str, name: &str) -> Option<Arc<ReplicaFamily>> {
        Self::cached(&self.families, namespace, name)
    }

    pub fn site(&self, namespace: &str, name: &str) -> Option<Arc<Site>> {
        Self::cached(&self.sites, namespace, name)
    }

    /// The Replica objects of a family, oldest first (then by name).
    pub fn members(&self, namespace: &str, family: &str) -> Vec<Arc<Replica>> {
        let mut members: Vec<Arc<Replica>> = self
            .replicas
            .state()
            .into_iter()
            .filter(|r| r.namespace().as_deref() == Some(namespace) && r.spec.family == family)
            .collect();
        members.sort_by(|a, b| {
            (
                a.metadata.creation_timestamp.as_ref().map(|t| t.0),
                a.name_any(),
            )
                .cmp(&(
                    b.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    b.name_any(),
                ))
        });
        members
    }

    /// Where replica `name` (one of `members`) serves its API, as its status says.
    pub fn endpoint_of(members: &[Arc<Replica>], name: &str) -> Option<String> {
        members
            .iter()
            .find(|r| r.name_any() == name)
            .and_then(|r| r.status.as_ref()?.endpoint.clone())
    }

    /// Records a family's link states; when what its conditions depend on changed, the
    /// family is reconciled now. A task starting or ending with nothing else changed
    /// (`running`, `lastTaskTime`) waits for the family's next look, so an idle family
    /// is not written once per task.
    pub fn set_links(&self, key: FamilyKey, links: Vec<LinkStatus>) {
        let changed = {
            let mut all = locked(&self.links);
            let changed = all
                .get(&key)
                .is_none_or(|before| link_conditions(before) != link_conditions(&links));
            all.insert(key.clone(), links);
            changed
        };
        if changed {
            self.family_changed(&key);
        }
    }

    /// Asks the family controller to reconcile `key` now.
    pub fn family_changed(&self, key: &FamilyKey) {
        // A closed channel means the controller stopped; nothing is left to tell.
        let _ = self
            .family_changes
            .unbounded_send(ObjectRef::new(&key.1).within(&key.0));
    }

    /// The stream of families to reconcile because their links changed; the family
    /// controller takes it once.
    pub fn take_family_triggers(
        &self,
    ) -> Option<futures::channel::mpsc::UnboundedReceiver<ObjectRef<ReplicaFamily>>> {
        locked(&self.family_triggers).take()
    }

    pub fn links_of(&self, key: &FamilyKey) -> Vec<LinkStatus> {
        locked(&self.links).get(key).cloned().unwrap_or_default()
    }

    pub fn set_topology_error(&self, key: FamilyKey, error: Option<String>) {
        let changed = {
            let mut errors = locked(&self.topology_errors);
            match error {
                Some(e) => errors.insert(key.clone(), e.clone()) != Some(e),
                None => errors.remove(&key).is_some(),
            }
        };
        if changed {
            self.family_changed(&key);
        }
    }

    pub fn topology_error(&self, key: &FamilyKey) -> Option<String> {
        locked(&self.topology_errors).get(key).cloned()
    }

    /// The state of each family condition this process last announced.
    pub fn announced(&self, family: &FamilyKey) -> BTreeMap<String, bool> {
        locked(&self.announced)
            .get(family)
            .cloned()
            .unwrap_or_default()
    }

    /// Records the states of family conditions as announced.
    pub fn record_announced(&self, family: &FamilyKey, states: BTreeMap<String, bool>) {
        locked(&self.announced)
            .entry(family.clone())
            .or_default()
            .extend(states);
    }

    pub fn remember_plan(&self, family: FamilyKey, plan: multisite_core::api::PlanStatus) {
        locked(&self.plans).insert(family, plan);
    }

    pub fn last_plan(&self, family: &FamilyKey) -> Option<multisite_core::api::PlanStatus> {
        locked(&self.plans).get(family).cloned()
    }

    pub fn ask(&self, request: ManualRequest) {
        locked(&self.manual).push(request);
    }

    pub fn take_manual(&self) -> Vec<ManualRequest> {
        std::mem::take(&mut *locked(&self.manual))
    }

    /// Publishes what a decision announced about `object`.
    pub async fn publish<K: Resource<DynamicType = ()>>(&self, object: &K, what: &Announcement) {
        self.event(
            object,
            what.warning,
            what.reason,
            what.action,
            what.note.clone(),
        )
        .await
    }

    /// Applies `object` with server-side apply under the operator's field manager, and
    /// remembers the version the API server gave it.
    pub async fn apply<K>(&self, object: &K) -> Result<(), OperatorError>
    where
        K: Applicable,
    {
        let meta = object.meta();
        let namespace = meta.namespace.clone().unwrap_or_default();
        let name = meta.name.clone().unwrap_or_default();
        let api: Api<K> = Api::namespaced(self.client.clone(), &namespace);
        let applied = api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(object),
            )
            .await?;
        let key = (K::kind(&()).to_string(), namespace, name);
        match version_of(&applied) {
            Some(version) => locked(&self.applied).insert(key, version),
            None => locked(&self.applied).remove(&key),
        };
        Ok(())
    }

    /// `cached` if it is still as this process last applied it: at the version the API
    /// server gave it then. An object changed since by someone else (its generation,
    /// or for objects without one its resourceVersion, moved on), or one this process
    /// has not applied since it started, counts as not as built, so the next decision
    /// applies it again and takes back what was changed.
    pub fn as_applied<K>(&self, cached: Option<Arc<K>>) -> Option<Arc<K>>
    where
        K: Resource<DynamicType = ()>,
    {
        let cached = cached?;
        let meta = cached.meta();
        let key = (
            K::kind(&()).to_string(),
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        );
        let version = version_of(cached.as_ref())?;
        (locked(&self.applied).get(&key) == Some(&version)).then_some(cached)
    }

    /// Applies `object` (stamped with its digest) unless `cached`, the cache's copy, is
    /// as this process last applied it and carries the same digest: then an apply
    /// would change nothing and none is made.
    pub async fn apply_changed<K>(
        &self,
        object: K,
        cached: Option<Arc<K>>,
    ) -> Result<(), OperatorError>
    where
        K: Applicable,
    {
        let object = builders::stamped(object);
        if builders::unchanged(&object, self.as_applied(cached).as_deref()) {
            return Ok(());
        }
        self.apply(&object).await
    }

    /// Removes annotation `key` from `family`: a request it carried has been taken.
    pub async fn remove_annotation(
        &self,
        family: &ReplicaFamily,
        key: &str,
    ) -> Result<(), OperatorError> {
        let api: Api<ReplicaFamily> =
            Api::namespaced(self.client.clone(), &family.namespace().unwrap_or_default());
        let patch = serde_json::json!({"metadata": {"annotations": {key: null}}});
        api.patch(
            &family.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        Ok(())
    }

    /// The caches, to wait for their first load.
    pub fn caches(&self) -> Stores {
        Stores {
            replicas: self.replicas.clone(),
            families: self.families.clone(),
            sites: self.sites.clone(),
            statefulsets: self.statefulsets.clone(),
            deployments: self.deployments.clone(),
            services: self.services.clone(),
            pods: self.pods.clone(),
        }
    }

    /// The cached object `name` of `store` in `namespace`.
    pub fn cached<K>(store: &Store<K>, namespace: &str, name: &str) -> Option<Arc<K>>
    where
        K: Resource<DynamicType = ()> + Clone,
    {
        store.get(&ObjectRef::new(name).within(namespace))
    }

    /// Publishes a Kubernetes Event about `object`; a failure to publish is logged only.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let reference = object.object_ref(&());
        tracing::info!(
            kind = %K::kind(&()),
            object = %reference.name.clone().unwrap_or_default(),
            namespace = %reference.namespace.clone().unwrap_or_default(),
            reason,
            note = %note,
            "event"
        );
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_string(),
            note: Some(note.chars().take(1000).collect()),
            action: action.to_string(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(%error, reason, "could not record an event");
        }
    }

    /// Creates the family Secret once; never rewrites an existing one (so the secret
    /// never changes under running replicas). Its value is never logged.
    pub async fn ensure_secret(&self, family: &ReplicaFamily) -> Result<(), OperatorError> {
        let namespace = family.namespace().unwrap_or_default();
        let name = builders::secret_name(&family.name_any());
        let created = self
            .create_secret_once(&namespace, &name, |value| {
                builders::family_secret(family, value)
            })
            .await?;
        if created {
            self.event(
                family,
                false,
                "SecretCreated",
                "CreateSecret",
                format!("created Secret {name} holding the family's shared secret"),
            )
            .await;
        }
        Ok(())
    }

    /// Creates Secret `name` from a fresh random value unless it exists (looked up once
    /// per process); never rewrites one. `true` when this call created it.
    pub async fn create_secret_once(
        &self,
        namespace: &str,
        name: &str,
        build: impl FnOnce(&str) -> Secret,
    ) -> Result<bool, OperatorError> {
        let key = (namespace.to_string(), name.to_string());
        if locked(&self.secrets).contains(&key) {
            return Ok(false);
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        if api.get_opt(name).await?.is_some() {
            locked(&self.secrets).insert(key);
            return Ok(false);
        }
        let value = multisite_replica::secret::generate()
            .map_err(|e| OperatorError::Secret(e.to_string()))?;
        match api.create(&Default::default(), &build(&value)).await {
            Ok(_) => {
                locked(&self.secrets).insert(key);
                Ok(true)
            }
            // Another reconcile made it first: that one stands.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// A client that carries the family's API token (read from its Secret once).
    pub async fn replica_client(
        &self,
        namespace: &str,
        family: &str,
    ) -> Result<ReplicaClient, OperatorError> {
        let key = (namespace.to_string(), family.to_string());
        if let Some(client) = locked(&self.replica_clients).get(&key).cloned() {
            return Ok(client);
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let name = builders::secret_name(family);
        let secret = api.get_opt(&name).await?.ok_or_else(|| {
            OperatorError::Secret(format!("Secret {namespace}/{name} does not exist yet"))
        })?;
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(builders::SECRET_KEY))
            .map(|b| b.0.clone())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(builders::SECRET_KEY))
                    .map(|s| s.clone().into_bytes())
            })
            .ok_or_else(|| {
                OperatorError::Secret(format!(
                    "Secret {namespace}/{name} has no key {:?}",
                    builders::SECRET_KEY
                ))
            })?;
        let secret = multisite_replica::secret::from_bytes(&bytes).map_err(|reason| {
            OperatorError::Secret(format!("Secret {namespace}/{name}: {reason}"))
        })?;
        let token = secret.api_token;
        let client = ReplicaClient::new(token, None).with_timeout(Duration::from_secs(30));
        locked(&self.replica_clients).insert(key.clone(), client.clone());
        // Read, so it exists: `ensure_secret` need not look again.
        locked(&self.secrets).insert((key.0, name));
        Ok(client)
    }
}

/// What of each link the family's conditions depend on: the links without their
/// task's progress (`running`, `lastTaskTime`).
fn link_conditions(links: &[LinkStatus]) -> Vec<LinkStatus> {
    links
        .iter()
        .cloned()
        .map(|l| LinkStatus {
            running: false,
            last_task_time: None,
            ..l
        })
        .collect()
}

/// Writes `status` with server-side apply under the operator's field manager.
pub async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    status: &(impl serde::Serialize + std::fmt::Debug),
) -> Result<(), OperatorError>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    /// The apply configuration of a status: the object's kind and its status only.
    #[derive(Debug, serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct StatusApply<'a, S> {
        api_version: &'a str,
        kind: &'a str,
        status: &'a S,
    }
    let patch = StatusApply {
        api_version: &K::api_version(&()),
        kind: &K::kind(&()),
        status,
    };
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// An object's version for [`Ctx::as_applied`]: its uid (a deleted and re-created
/// object is another) and its generation, which moves only when its spec changes, else
/// its resourceVersion.
fn version_of<K: Resource>(object: &K) -> Option<String> {
    let meta = object.meta();
    let version = meta
        .generation
        .map(|g| g.to_string())
        .or_else(|| meta.resource_version.clone())?;
    Some(format!(
        "{}/{version}",
        meta.uid.as_deref().unwrap_or_default()
    ))
}
