//! The sync runner: for every family, the links from its topology, driven by the link
//! task scheduler on the family's timetable. Each task asks the sending replica to push
//! to the receiving one; the data goes from pod to pod, never through the operator.
//!
//! One runner serves every family the operator watches, in every watched namespace,
//! with one scheduler: the operator's limits (one full task, or up to five incremental
//! ones, by default) hold across all families, and a family's `spec.sync` limits narrow
//! them for its own links.
//!
//! What it keeps in memory (the scheduler's queue, when each link's tasks last came
//! due) is rebuilt after a restart: every link is checked again and gets its tasks at
//! once, which is harmless because a push sends only what the receiver lacks.

use super::context::{Ctx, FamilyKey};
use super::metrics::{Metrics, Outcome};
use kube::ResourceExt;
use multisite_core::api::ReplicaPhase;
use multisite_core::api::{LinkStatus, ReplicaFamily, Topology as SpecTopology};
use multisite_core::domain::links::{Link, LinkSettings, Topology, links};
use multisite_core::domain::scheduler::{
    Decision, LastDue, Limits, LinkGates, Scheduler, Task, TaskKind, Timetable, Trigger,
};
use multisite_replica::api::{PushReport, PushRequest, StatusReport};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How often the runner looks at the families.
pub const TICK: Duration = Duration::from_millis(500);

/// What a spawned job reports back.
enum Done {
    Task {
        family: FamilyKey,
        link: Link,
        kind: TaskKind,
        took: Duration,
        result: Result<PushReport, String>,
    },
    Check {
        family: FamilyKey,
        link: Link,
        result: Result<(), String>,
    },
}

#[derive(Default)]
struct LinkState {
    last_task: Option<TaskKind>,
    last_task_time: Option<String>,
    lag: i64,
    error: Option<String>,
}

/// A link of one family: the scheduler's key across the operator's families.
type FamilyLink = (FamilyKey, Link);

fn family_of(link: &FamilyLink) -> FamilyKey {
    link.0.clone()
}

struct FamilySync {
    /// The watch scope the family is in.
    ctx: Arc<Ctx>,
    last_due: BTreeMap<Link, LastDue>,
    checked: BTreeSet<Link>,
    checking: BTreeSet<Link>,
    state: BTreeMap<Link, LinkState>,
    endpoints: BTreeMap<String, String>,
}

fn kind_name(kind: TaskKind) -> &'static str {
    match kind {
        TaskKind::Incremental => "Incremental",
        TaskKind::Full => "Full",
    }
}

fn limits_of(family: &ReplicaFamily) -> Limits {
    let n = |v: i32| NonZeroU32::new(u32::try_from(v).unwrap_or(1)).unwrap_or(NonZeroU32::MIN);
    Limits {
        max_concurrent_full: n(family.spec.sync.max_concurrent_full),
        max_concurrent_incremental: n(family.spec.sync.max_concurrent_incremental),
    }
}

fn timetable_of(family: &ReplicaFamily) -> Timetable {
    let n = |v: i64| NonZeroU64::new(u64::try_from(v).unwrap_or(1)).unwrap_or(NonZeroU64::MIN);
    Timetable {
        incremental_every: n(family.spec.sync.incremental_interval_seconds),
        full_every: n(family.spec.sync.full_interval_seconds),
    }
}

/// The links a family should have now, from its topology over the replicas that can
/// take part (serving, or leaving and still handing on their last changes).
pub fn family_links(
    family: &ReplicaFamily,
    members: &BTreeMap<String, String>,
) -> Result<BTreeMap<Link, LinkSettings>, multisite_core::domain::links::TopologyError> {
    let topology = match family.spec.sync.topology {
        SpecTopology::Mesh => Topology::Mesh,
        SpecTopology::HubAndSpoke => Topology::HubAndSpoke {
            hub: family.spec.sync.hub.clone().unwrap_or_default(),
        },
    };
    let overrides: BTreeMap<Link, LinkSettings> = family
        .spec
        .sync
        .links
        .iter()
        .map(|l| {
            (
                Link::new(&l.from, &l.to),
                LinkSettings {
                    enabled: l.enabled,
                    automatic: l.automatic,
                },
            )
        })
        .collect();
    let names: Vec<String> = members.keys().cloned().collect();
    links(&topology, &names, &overrides)
}

/// Changes the sender has (by origin) that the receiver has not committed.
pub fn epoch_lag(sender: &BTreeMap<String, i64>, receiver: &BTreeMap<String, i64>) -> i64 {
    sender
        .iter()
        .map(|(origin, seq)| (seq - receiver.get(origin).copied().unwrap_or(0)).max(0))
        .fold(0i64, i64::saturating_add)
}

/// The scheduler of all the operator's links and what the runner keeps of each family.
struct Runner {
    scheduler: Scheduler<FamilyLink, FamilyKey>,
    families: HashMap<FamilyKey, FamilySync>,
    metrics: Arc<Metrics>,
    done: mpsc::UnboundedSender<Done>,
}

/// Runs the sync runner until `stop` says so: over the families of every scope whose
/// context arrives on `scopes` (each once its caches have loaded), under `limits`.
pub async fn run(
    mut scopes: mpsc::UnboundedReceiver<Arc<Ctx>>,
    limits: Limits,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut runner = Runner {
        scheduler: Scheduler::grouped(limits, family_of),
        families: HashMap::new(),
        metrics,
        done: done_tx,
    };
    let mut contexts: Vec<Arc<Ctx>> = Vec::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            Some(ctx) = scopes.recv() => contexts.push(ctx),
            _ = ticker.tick() => runner.tick(&contexts),
            Some(done) = done_rx.recv() => runner.finished(done),
        }
    }
}

fn epoch_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Runner {
    fn tick(&mut self, contexts: &[Arc<Ctx>]) {
        let mut seen = BTreeSet::new();
        // Every family's tasks that come due now, decided together: the scheduler takes
        // an instant's full tasks first, across all families.
        let mut due = Vec::new();
        for ctx in contexts {
            self.tick_scope(ctx, &mut seen, &mut due);
        }
        let mut start = Vec::new();
        for (task, decision) in self.scheduler.tasks_due(due) {
            match decision {
                Decision::Start => start.push(task),
                Decision::Queue => {
                    tracing::debug!(family = %task.link.0.1, link = %task.link.1, kind = ?task.kind, "task queued")
                }
                Decision::Drop(reason) => {
                    tracing::debug!(family = %task.link.0.1, link = %task.link.1, kind = ?task.kind, %reason, "task dropped")
                }
            }
        }
        self.spawn_tasks(start);
        for (key, fs) in &self.families {
            publish(&self.scheduler, key, fs);
        }
        let gone: Vec<FamilyKey> = self
            .families
            .keys()
            .filter(|key| !seen.contains(*key))
            .cloned()
            .collect();
        for key in gone {
            self.forget(&key);
        }
        let families = &self.families;
        self.metrics.retain_links(|labels| {
            families
                .get(&(labels[0].clone(), labels[1].clone()))
                .is_some_and(|fs| fs.state.contains_key(&Link::new(&labels[2], &labels[3])))
        });
    }

    /// Forgets a family that is gone: its links leave the scheduler (a running task
    /// still holds its slot until it ends) and its own limits go.
    fn forget(&mut self, key: &FamilyKey) {
        let links: Vec<Link> = self
            .families
            .get(key)
            .map(|fs| fs.state.keys().cloned().collect())
            .unwrap_or_default();
        let mut start = Vec::new();
        for link in links {
            start.extend(self.scheduler.remove_link(&(key.clone(), link)).started);
        }
        start.extend(self.scheduler.set_group_limits(key.clone(), None));
        self.families.remove(key);
        self.spawn_tasks(start);
    }

    /// Starts tasks the scheduler started, each with its family's scope and addresses.
    fn spawn_tasks(&self, tasks: Vec<Task<FamilyLink>>) {
        for task in tasks {
            let (family, link) = task.link.clone();
            match self.families.get(&family) {
                Some(fs) => spawn_task(
                    &fs.ctx,
                    family,
                    Task::new(link, task.kind, task.trigger),
                    &fs.endpoints,
                    &self.done,
                ),
                // Its family is gone: the task ends at once, freeing its slot.
                None => {
                    let _ = self.done.send(Done::Task {
                        family,
                        link,
                        kind: task.kind,
                        took: Duration::ZERO,
                        result: Err("the family is gone".into()),
                    });
                }
            }
        }
    }

    /// Brings one scope's families up to date: their limits, links and gates; the
    /// tasks that come due go into `due`.
    fn tick_scope(
        &mut self,
        ctx: &Arc<Ctx>,
        seen: &mut BTreeSet<FamilyKey>,
        due: &mut Vec<Task<FamilyLink>>,
    ) {
        let now = epoch_seconds();
        let mut manual = ctx.take_manual();
        for family in ctx.families.state() {
            let key: FamilyKey = (family.namespace().unwrap_or_default(), family.name_any());
            if family.metadata.deletion_timestamp.is_some() {
                continue;
            }
            seen.insert(key.clone());
            let limits = limits_of(&family);
            let mut start: Vec<Task<FamilyLink>> = Vec::new();
            if self.scheduler.group_limits(&key) != Some(limits) {
                start.extend(self.scheduler.set_group_limits(key.clone(), Some(limits)));
            }
            let fs = self
                .families
                .entry(key.clone())
                .or_insert_with(|| FamilySync {
                    ctx: ctx.clone(),
                    last_due: BTreeMap::new(),
                    checked: BTreeSet::new(),
                    checking: BTreeSet::new(),
                    state: BTreeMap::new(),
                    endpoints: BTreeMap::new(),
                });
            fs.endpoints = ctx
                .members(&key.0, &key.1)
                .iter()
                .filter_map(|r| {
                    let status = r.status.as_ref()?;
                    let phase = status.phase?;
                    matches!(phase, ReplicaPhase::Active | ReplicaPhase::Removing)
                        .then(|| (r.name_any(), status.endpoint.clone()))
                        .and_then(|(n, e)| e.map(|e| (n, e)))
                })
                .collect();
            let wanted = match family_links(&family, &fs.endpoints) {
                Ok(wanted) => {
                    ctx.set_topology_error(key.clone(), None);
                    wanted
                }
                Err(e) => {
                    ctx.set_topology_error(key.clone(), Some(e.to_string()));
                    BTreeMap::new()
                }
            };
            let gone: Vec<Link> = fs
                .state
                .keys()
                .filter(|l| !wanted.contains_key(*l))
                .cloned()
                .collect();
            for link in gone {
                start.extend(
                    self.scheduler
                        .remove_link(&(key.clone(), link.clone()))
                        .started,
                );
                fs.state.remove(&link);
                fs.last_due.remove(&link);
                fs.checked.remove(&link);
            }
            let timetable = timetable_of(&family);
            // An all-at-once upgrade between its pause and resume steps: no task starts.
            let paused = family
                .status
                .as_ref()
                .and_then(|s| s.plan.as_ref())
                .is_some_and(|p| p.sync_paused);
            for (link, settings) in &wanted {
                fs.state.entry(link.clone()).or_default();
                let gates = LinkGates {
                    // A pause of the upgrade plan disables the links in the scheduler,
                    // which drops their waiting tasks: nothing of the family starts
                    // until it resumes, even when another family's task ends.
                    enabled: settings.enabled && !paused,
                    automatic: settings.automatic,
                    integrity_checked: fs.checked.contains(link),
                };
                let family_link = (key.clone(), link.clone());
                if self.scheduler.gates(&family_link) != Some(gates) {
                    let changed = self.scheduler.set_gates(family_link, gates);
                    start.extend(changed.started);
                    for (task, reason) in changed.dropped {
                        tracing::debug!(link = %task.link.1, %reason, "queued task dropped");
                    }
                }
                if settings.enabled && !gates.integrity_checked && !fs.checking.contains(link) {
                    fs.checking.insert(link.clone());
                    spawn_check(ctx, key.clone(), link.clone(), &fs.endpoints, &self.done);
                }
                // Only links that may run on their own come due; others wait for a person.
                if gates.refusal(Trigger::Scheduled).is_none() && !paused {
                    let last = fs.last_due.get(link).copied().unwrap_or_default();
                    let now_due = timetable.due_at(last, now);
                    let entry = fs.last_due.entry(link.clone()).or_default();
                    for kind in now_due.kinds {
                        match kind {
                            TaskKind::Full => entry.full = Some(now),
                            TaskKind::Incremental => entry.incremental = Some(now),
                        }
                        due.push(Task::new(
                            (key.clone(), link.clone()),
                            kind,
                            Trigger::Scheduled,
                        ));
                    }
                }
            }
            manual.retain(|request| {
            if request.family != key {
                return true;
            }
            if paused {
                tracing::info!(family = %key.1, "manual task dropped: sync is paused by the upgrade plan");
                return false;
            }
            for link in wanted.keys() {
                let wanted_link = request
                    .link
                    .as_ref()
                    .is_none_or(|(f, t)| *f == link.from && *t == link.to);
                if wanted_link {
                    due.push(Task::new(
                        (key.clone(), link.clone()),
                        request.kind,
                        Trigger::Manual,
                    ));
                }
            }
            false
        });
            self.spawn_tasks(start);
        }
    }
}

/// Hands the links' state to the family controller and the metrics.
fn publish(scheduler: &Scheduler<FamilyLink, FamilyKey>, key: &FamilyKey, fs: &FamilySync) {
    let ctx = &fs.ctx;
    let members = ctx.members(&key.0, &key.1);
    let statuses_by_name: BTreeMap<String, &multisite_core::api::ReplicaStatus> = members
        .iter()
        .filter_map(|r| Some((r.name_any(), r.status.as_ref()?)))
        .collect();
    let held_at = |to: &str, from: &str| -> i64 {
        statuses_by_name
            .get(to)
            .and_then(|s| s.held_from.get(from).copied())
            .unwrap_or(0)
    };
    // Lag from both ends' own epoch tables, so that a link whose tasks do not run
    // (disabled, failing) still shows what it owes; the last task's figure otherwise.
    let lag_of = |link: &Link, state: &LinkState| -> i64 {
        match (
            statuses_by_name.get(&link.from),
            statuses_by_name.get(&link.to),
        ) {
            (Some(from), Some(to)) if !from.epochs.is_empty() => {
                epoch_lag(&from.epochs, &to.epochs)
            }
            _ => state.lag,
        }
    };
    let statuses: Vec<LinkStatus> = fs
        .state
        .iter()
        .map(|(link, state)| {
            let held = held_at(&link.to, &link.from);
            let lag = lag_of(link, state);
            ctx.metrics
                .link([&key.0, &key.1, &link.from, &link.to], lag, held);
            LinkStatus {
                from: link.from.clone(),
                to: link.to.clone(),
                last_task: state.last_task.map(|k| kind_name(k).to_string()),
                last_task_time: state.last_task_time.clone(),
                lag_changes: lag,
                held_packets: held,
                running: scheduler.running_on(&(key.clone(), link.clone())).is_some(),
                error: state.error.clone(),
            }
        })
        .collect();
    ctx.set_links(key.clone(), statuses);
}

impl Runner {
    fn finished(&mut self, report: Done) {
        match report {
            Done::Check {
                family,
                link,
                result,
            } => {
                let Some(fs) = self.families.get_mut(&family) else {
                    return;
                };
                fs.checking.remove(&link);
                let state = fs.state.entry(link.clone()).or_default();
                match result {
                    Ok(()) => {
                        fs.checked.insert(link);
                        state.error = None;
                    }
                    Err(e) => {
                        tracing::warn!(%link, error = %e, "link integrity check failed");
                        state.error = Some(format!("integrity check: {e}"));
                    }
                }
            }
            Done::Task {
                family,
                link,
                kind,
                took,
                result,
            } => {
                let outcome = if result.is_ok() {
                    Outcome::Succeeded
                } else {
                    Outcome::Failed
                };
                self.metrics.task(
                    [&family.0, &family.1, &link.from, &link.to],
                    &kind_name(kind).to_lowercase(),
                    outcome,
                    took,
                );
                let started = self
                    .scheduler
                    .task_finished(&(family.clone(), link.clone()));
                if let Some(fs) = self.families.get_mut(&family) {
                    let state = fs.state.entry(link.clone()).or_default();
                    state.last_task = Some(kind);
                    state.last_task_time = Some(k8s_openapi::jiff::Timestamp::now().to_string());
                    match result {
                        Ok(report) => {
                            state.lag = i64::try_from(report.lag).unwrap_or(i64::MAX);
                            state.error = None;
                            tracing::debug!(%link, ?kind, sent = report.changes_sent, lag = report.lag, "task finished");
                        }
                        Err(e) => {
                            tracing::warn!(%link, ?kind, error = %e, "task failed");
                            state.error = Some(e);
                            // Check the link again before it runs on its own.
                            fs.checked.remove(&link);
                        }
                    }
                }
                self.spawn_tasks(started);
                if let Some(fs) = self.families.get(&family) {
                    publish(&self.scheduler, &family, fs);
                }
            }
        }
    }
}

fn spawn_task(
    ctx: &Arc<Ctx>,
    family: FamilyKey,
    task: Task<Link>,
    endpoints: &BTreeMap<String, String>,
    done: &mpsc::UnboundedSender<Done>,
) {
    let from = endpoints.get(&task.link.from).cloned();
    let to = endpoints.get(&task.link.to).cloned();
    let ctx = Arc::clone(ctx);
    let done = done.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let result = async {
            let (Some(from), Some(to)) = (from, to) else {
                return Err("an end of the link has no address".to_string());
            };
            let client = ctx
                .replica_client(&family.0, &family.1)
                .await
                .map_err(|e| e.to_string())?;
            // A full task may take longer; both are bounded.
            let client = client.with_timeout(Duration::from_secs(match task.kind {
                TaskKind::Incremental => 120,
                TaskKind::Full => 1800,
            }));
            let request = PushRequest {
                to,
                full: task.kind == TaskKind::Full,
            };
            client
                .push(&from, &request)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        let _ = done.send(Done::Task {
            family,
            link: task.link,
            kind: task.kind,
            took: started.elapsed(),
            result,
        });
    });
}

/// The integrity check before a link runs on its own: both ends answer with the
/// family's token, serve the family, and know each other as members.
fn spawn_check(
    ctx: &Arc<Ctx>,
    family: FamilyKey,
    link: Link,
    endpoints: &BTreeMap<String, String>,
    done: &mpsc::UnboundedSender<Done>,
) {
    let from = endpoints.get(&link.from).cloned();
    let to = endpoints.get(&link.to).cloned();
    let ctx = Arc::clone(ctx);
    let done = done.clone();
    tokio::spawn(async move {
        let result = async {
            let (Some(from), Some(to)) = (from, to) else {
                return Err("an end of the link has no address".to_string());
            };
            let client = ctx
                .replica_client(&family.0, &family.1)
                .await
                .map_err(|e| e.to_string())?;
            let mut reports = Vec::new();
            for (name, url) in [(&link.from, &from), (&link.to, &to)] {
                let report = client.status(url).await.map_err(|e| e.to_string())?;
                if report.family != family.1 || report.replica != *name {
                    return Err(format!(
                        "{url} serves replica {} of family {}, not {name} of {}",
                        report.replica, report.family, family.1
                    ));
                }
                reports.push(report);
            }
            // A replica learns of a peer when the peer is cloned from it or through
            // packets; one of the two ends must already know the other.
            let knows = |r: &StatusReport, other: &str| r.peers.iter().any(|p| p.name == other);
            if !knows(&reports[0], &link.to) && !knows(&reports[1], &link.from) {
                return Err(format!(
                    "neither {} nor {} knows the other as a member of the family",
                    link.from, link.to
                ));
            }
            Ok(())
        }
        .await;
        let _ = done.send(Done::Check {
            family,
            link,
            result,
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use multisite_core::api::{LinkSpec, ReplicaFamilySpec, SyncSpec};

    #[test]
    fn epoch_lag_counts_what_the_receiver_lacks_only() {
        let map = |pairs: &[(&str, i64)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(
            epoch_lag(&map(&[("a", 10), ("b", 5)]), &map(&[("a", 7), ("b", 9)])),
            3
        );
        assert_eq!(epoch_lag(&map(&[("a", 10)]), &map(&[])), 10);
        assert_eq!(epoch_lag(&map(&[]), &map(&[("a", 3)])), 0);
    }

    #[test]
    fn family_links_follow_topology_and_per_link_settings() {
        let mut family = ReplicaFamily::new(
            "f",
            ReplicaFamilySpec {
                sync: SyncSpec {
                    links: vec![LinkSpec {
                        from: "a".into(),
                        to: "b".into(),
                        enabled: false,
                        automatic: true,
                    }],
                    ..Default::default()
                },
                ..ReplicaFamilySpec::new("F", 7)
            },
        );
        let members: BTreeMap<String, String> = ["a", "b", "c"]
            .iter()
            .map(|n| (n.to_string(), format!("http://{n}")))
            .collect();
        let links = family_links(&family, &members).expect("mesh");
        assert_eq!(links.len(), 6);
        assert!(!links[&Link::new("a", "b")].enabled);
        assert!(links[&Link::new("b", "a")].enabled);
        family.spec.sync.topology = SpecTopology::HubAndSpoke;
        family.spec.sync.hub = Some("c".into());
        let links = family_links(&family, &members).expect("hub");
        assert_eq!(links.len(), 4);
        family.spec.sync.hub = Some("z".into());
        assert!(family_links(&family, &members).is_err());
    }
}
