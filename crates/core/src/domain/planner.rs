//! The upgrade planner: from a family's spec and what was observed of its client
//! tiers and replicas to an ordered list of steps, or a refusal a person can act on.
//!
//! After every step of a plan these hold (DOMAIN.md section 3):
//! - every client tier can open every database it uses (its release supports the
//!   feature levels of the schema repository and user database of each replica it opens);
//! - every replica's (schema repository, user database) pair is in Table 2;
//! - no feature level goes down;
//! - with sync running: without `allowUnidirectionalReplication` every two replicas
//!   exchange packets both ways; with it, packets flow from the replica with the lower
//!   (user database, schema repository) levels to the higher one;
//! - by the end, every packet created while sync ran is accepted everywhere, so no
//!   held packet is stranded.
//!
//! A replica's move into a pair that Table 2 does not list (the (7,7) -> (8,8) case:
//! there is no packet version for (8,7)) is two consecutive steps of that replica,
//! schema repository then user database; the pair in between is never rested in and
//! the replica neither exports nor imports then, so the invariants are checked after
//! the second step (the client check also before it).
//!
//! Order: client tiers first; then schema repositories, then user databases, as far
//! as Table 2 allows; then the paired moves. `AllAtOnce` brackets the feature level
//! steps with `pauseSync` / `resumeSync` and checks sync only at the resume.
//!
//! Among the steps the order allows, the planner takes the largest raise that keeps
//! the invariants, trying replicas in the order given; property tests check it
//! against an exhaustive search on small fleets.

use crate::api::{Replica, ReplicaFamily, ReplicaPhase, UpgradeStrategy};
use crate::domain::compat::{Compatibility, FeatureLevel, FlPair, PacketVersion};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;

/// A client tier as the spec wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierSpec {
    pub name: String,
    pub release: String,
    /// The site whose replicas the tier opens; all replicas when `None`.
    pub site: Option<String>,
}

/// What the plan must reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetSpec {
    pub target: FeatureLevel,
    pub strategy: UpgradeStrategy,
    pub allow_unidirectional: bool,
    pub tiers: Vec<TierSpec>,
}

/// A client tier as observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierObserved {
    pub name: String,
    /// Release every ready pod runs; `None` before the tier was first deployed.
    pub release: Option<String>,
    /// All pods of the tier are ready at `release`.
    pub ready: bool,
}

/// A replica as observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaObserved {
    pub name: String,
    pub site: String,
    /// Its feature levels; `None` until the replica reported them.
    pub pair: Option<FlPair>,
    pub reachable: bool,
}

/// The observed state of a family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetObserved {
    pub tiers: Vec<TierObserved>,
    pub replicas: Vec<ReplicaObserved>,
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "camelCase")]
pub enum Step {
    /// Roll a client tier out at a release; done when all its pods are ready at it.
    UpgradeClients { tier: String, release: String },
    /// Raise a replica's schema repository to a feature level.
    #[serde(rename_all = "camelCase")]
    RaiseSchemaRepository {
        replica: String,
        feature_level: FeatureLevel,
    },
    /// Raise a replica's user database to a feature level.
    #[serde(rename_all = "camelCase")]
    RaiseUserDatabase {
        replica: String,
        feature_level: FeatureLevel,
    },
    /// Stop every link's tasks (all-at-once upgrades).
    PauseSync,
    /// Start the links again.
    ResumeSync,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::UpgradeClients { tier, release } => {
                write!(f, "upgrade client tier {tier} to release {release}")
            }
            Step::RaiseSchemaRepository {
                replica,
                feature_level,
            } => write!(
                f,
                "raise the schema repository of {replica} to FL {feature_level}"
            ),
            Step::RaiseUserDatabase {
                replica,
                feature_level,
            } => write!(
                f,
                "raise the user database of {replica} to FL {feature_level}"
            ),
            Step::PauseSync => write!(f, "pause sync"),
            Step::ResumeSync => write!(f, "resume sync"),
        }
    }
}

/// A plan that reaches the target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub steps: Vec<Step>,
}

/// What kind of obstacle refused a plan; the reason says the specifics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RefusalKind {
    /// The target is not a level the compatibility data knows.
    UnknownTarget,
    /// A replica is above the target: feature levels never go down.
    WouldLower,
    /// A client tier's release is unknown or cannot open a level it would have to.
    ClientRelease,
    /// A replica has not reported its feature levels, or reports a pair no step can repair.
    ReplicaState,
    /// A replica that needs a step cannot be reached.
    Unreachable,
    /// Sync would break (two-way or one-way) during a staged upgrade.
    Replication,
    /// No sequence of steps keeps every invariant.
    NoPath,
}

/// A refused plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    pub kind: RefusalKind,
    pub reason: String,
}

impl Refusal {
    fn new(kind: RefusalKind, reason: impl Into<String>) -> Self {
        Refusal {
            kind,
            reason: reason.into(),
        }
    }
}

/// Builds the spec side of the planner's input from a `ReplicaFamily`.
pub fn fleet_spec(family: &ReplicaFamily) -> FleetSpec {
    FleetSpec {
        target: family.spec.feature_level,
        strategy: family.spec.upgrade_strategy,
        allow_unidirectional: family.spec.allow_unidirectional_replication,
        tiers: family
            .spec
            .clients
            .iter()
            .map(|c| TierSpec {
                name: c.name.clone(),
                release: c.release.clone(),
                site: c.site.clone(),
            })
            .collect(),
    }
}

/// Builds the observed side from the family's status and its `Replica` objects.
/// Replicas being removed take no part in a plan.
pub fn fleet_observed(family: &ReplicaFamily, replicas: &[Replica]) -> FleetObserved {
    let tier_status = family
        .status
        .as_ref()
        .map(|s| s.clients.as_slice())
        .unwrap_or(&[]);
    let tiers = family
        .spec
        .clients
        .iter()
        .map(|c| {
            let seen = tier_status.iter().find(|s| s.name == c.name);
            TierObserved {
                name: c.name.clone(),
                release: seen.and_then(|s| s.release.clone()),
                ready: seen.is_some_and(|s| s.ready_replicas >= c.replicas),
            }
        })
        .collect();
    let replicas = replicas
        .iter()
        .filter(|r| r.status.as_ref().and_then(|s| s.phase) != Some(ReplicaPhase::Removing))
        .map(|r| {
            let status = r.status.as_ref();
            let pair = status.and_then(|s| {
                Some(FlPair::new(
                    s.schema_repository_feature_level?,
                    s.user_database_feature_level?,
                ))
            });
            ReplicaObserved {
                name: r.metadata.name.clone().unwrap_or_default(),
                site: r.spec.site.clone(),
                pair,
                reachable: status.and_then(|s| s.reachable).unwrap_or(true),
            }
        })
        .collect();
    FleetObserved { tiers, replicas }
}

/// The state the planner walks through.
#[derive(Clone, Debug, PartialEq, Eq)]
struct State {
    /// Release of each tier (index as in the spec); `None` before its first rollout.
    tiers: Vec<Option<String>>,
    pairs: Vec<FlPair>,
    sync_paused: bool,
}

/// Why a state breaks an invariant; the text is a sentence fragment.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Violation {
    Client(String),
    Pair(String),
    Sync(String),
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Client(s) | Violation::Pair(s) | Violation::Sync(s) => f.write_str(s),
        }
    }
}

struct Planner<'a> {
    compat: &'a Compatibility,
    spec: &'a FleetSpec,
    replicas: &'a [ReplicaObserved],
    /// For each tier, the indices of the replicas it opens.
    opens: Vec<Vec<usize>>,
}

impl<'a> Planner<'a> {
    fn pair_name(&self, i: usize, pair: FlPair) -> String {
        format!("{} at {}", self.replicas[i].name, pair)
    }

    /// Checks the client invariant: each tier's release opens both levels of every
    /// replica it uses. `transient` replicas are included (clients still open them).
    fn check_clients(&self, state: &State, only: Option<usize>) -> Result<(), Violation> {
        for (t, release) in state.tiers.iter().enumerate() {
            if only.is_some_and(|o| o != t) {
                continue;
            }
            let Some(release) = release else { continue };
            for &i in &self.opens[t] {
                let pair = state.pairs[i];
                for fl in [pair.schema_repository, pair.user_database] {
                    match self.compat.release_supports(release, fl) {
                        Ok(true) => {}
                        Ok(false) => {
                            return Err(Violation::Client(format!(
                                "client tier {} at release {} cannot open {} (FL {} is not supported by that release)",
                                self.spec.tiers[t].name,
                                release,
                                self.pair_name(i, pair),
                                fl
                            )));
                        }
                        Err(err) => return Err(Violation::Client(err.to_string())),
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks pair validity and, with sync running, packet flow between replicas.
    fn check_replicas(&self, state: &State, check_sync: bool) -> Result<(), Violation> {
        for (i, &pair) in state.pairs.iter().enumerate() {
            if !self.compat.is_valid_pair(pair) {
                return Err(Violation::Pair(format!(
                    "{} resting in a pair that Table 2 does not list",
                    self.pair_name(i, pair)
                )));
            }
        }
        if check_sync && !state.sync_paused {
            self.check_sync(&state.pairs, &[])?;
        }
        Ok(())
    }

    /// Checks packet flow between every two replicas, leaving out `skip` (replicas
    /// caught between the two steps of a paired move neither export nor import).
    fn check_sync(&self, pairs: &[FlPair], skip: &[usize]) -> Result<(), Violation> {
        let live: Vec<usize> = (0..pairs.len()).filter(|i| !skip.contains(i)).collect();
        for &a in &live {
            for &b in &live {
                if a == b {
                    continue;
                }
                let (pa, pb) = (pairs[a], pairs[b]);
                // One-way: packets must flow from the lower replica to the higher one.
                let must_flow = !self.spec.allow_unidirectional
                    || (pa.user_database, pa.schema_repository)
                        <= (pb.user_database, pb.schema_repository);
                if must_flow && !self.compat.can_send(pa, pb) {
                    let version = self
                        .compat
                        .creates(pa)
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| "none".to_string());
                    return Err(Violation::Sync(format!(
                        "{} creates packet version {}, which {} does not accept",
                        self.pair_name(a, pa),
                        version,
                        self.pair_name(b, pb)
                    )));
                }
            }
        }
        Ok(())
    }

    fn target_pair(&self) -> FlPair {
        FlPair::new(self.spec.target, self.spec.target)
    }

    /// Applies a group of feature-level steps (one step, or the two of a paired
    /// move) and checks the invariants; returns the new state or the violation.
    fn try_group(&self, state: &State, group: &[Step]) -> Result<State, Violation> {
        let mut next = state.clone();
        for step in group {
            apply(&mut next, self.replicas, step);
            self.check_clients(&next, None)?;
        }
        self.check_replicas(&next, true)?;
        Ok(next)
    }

    /// Candidate groups in preference order: schema repository raises (largest
    /// first), then user database raises, then paired moves.
    fn candidates(&self, state: &State) -> Vec<Vec<Step>> {
        let target = self.spec.target;
        let mut out = Vec::new();
        let movable: Vec<usize> = (0..state.pairs.len())
            .filter(|&i| self.replicas[i].reachable && state.pairs[i] != self.target_pair())
            .collect();
        for level in (1..=target).rev() {
            for &i in &movable {
                let p = state.pairs[i];
                if p.schema_repository < level
                    && self
                        .compat
                        .is_valid_pair(FlPair::new(level, p.user_database))
                {
                    out.push(vec![raise_sr(&self.replicas[i].name, level)]);
                }
            }
        }
        for level in (1..=target).rev() {
            for &i in &movable {
                let p = state.pairs[i];
                if p.user_database < level
                    && level <= p.schema_repository
                    && self
                        .compat
                        .is_valid_pair(FlPair::new(p.schema_repository, level))
                {
                    out.push(vec![raise_udb(&self.replicas[i].name, level)]);
                }
            }
        }
        for &i in &movable {
            let p = state.pairs[i];
            for level in (p.schema_repository + 1)..=target {
                if self
                    .compat
                    .is_valid_pair(FlPair::new(level, p.user_database))
                {
                    continue;
                }
                for udb in ((p.user_database + 1)..=level).rev() {
                    if self.compat.is_valid_pair(FlPair::new(level, udb)) {
                        out.push(vec![
                            raise_sr(&self.replicas[i].name, level),
                            raise_udb(&self.replicas[i].name, udb),
                        ]);
                        break;
                    }
                }
            }
        }
        out
    }
}

fn raise_sr(replica: &str, level: FeatureLevel) -> Step {
    Step::RaiseSchemaRepository {
        replica: replica.to_string(),
        feature_level: level,
    }
}

fn raise_udb(replica: &str, level: FeatureLevel) -> Step {
    Step::RaiseUserDatabase {
        replica: replica.to_string(),
        feature_level: level,
    }
}

fn apply(state: &mut State, replicas: &[ReplicaObserved], step: &Step) {
    let index = |name: &str| replicas.iter().position(|r| r.name == name);
    match step {
        Step::UpgradeClients { .. } => {}
        Step::RaiseSchemaRepository {
            replica,
            feature_level,
        } => {
            if let Some(i) = index(replica) {
                state.pairs[i].schema_repository = *feature_level;
            }
        }
        Step::RaiseUserDatabase {
            replica,
            feature_level,
        } => {
            if let Some(i) = index(replica) {
                state.pairs[i].user_database = *feature_level;
            }
        }
        Step::PauseSync => state.sync_paused = true,
        Step::ResumeSync => state.sync_paused = false,
    }
}

const WAYS_FORWARD: &str = "Ways forward: set spec.upgradeStrategy: AllAtOnce (sync pauses while every replica is raised, then resumes), or set spec.allowUnidirectionalReplication: true (packets from lower feature levels keep flowing to higher ones; the others are held until their receiver is raised)";

/// What a person can change when a staged upgrade would break replication: the way
/// that is not taken already.
fn ways_forward(spec: &FleetSpec) -> &'static str {
    if spec.allow_unidirectional {
        "Way forward: set spec.upgradeStrategy: AllAtOnce (sync pauses while every replica is raised, then resumes)"
    } else {
        WAYS_FORWARD
    }
}

/// Computes the plan from `observed` to `spec`, or refuses with a reason.
pub fn plan(
    compat: &Compatibility,
    spec: &FleetSpec,
    observed: &FleetObserved,
) -> Result<Plan, Refusal> {
    plan_from(compat, spec, observed, false)
}

/// [`plan`] for a family whose sync may already be paused (an all-at-once upgrade
/// under way): a paused family's plan does not pause again, and ends with
/// [`Step::ResumeSync`] even when no raise is left.
pub fn plan_from(
    compat: &Compatibility,
    spec: &FleetSpec,
    observed: &FleetObserved,
    sync_paused: bool,
) -> Result<Plan, Refusal> {
    let target = spec.target;
    let target_pair = FlPair::new(target, target);
    if !compat.is_valid_pair(target_pair) {
        return Err(Refusal::new(
            RefusalKind::UnknownTarget,
            format!(
                "feature level {target} is not in the compatibility data (levels with a packet version: {}); choose one of those or load data that lists it",
                compat
                    .valid_pairs()
                    .iter()
                    .filter(|p| p.schema_repository == p.user_database)
                    .map(|p| p.schema_repository.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }

    // Replicas: each must have reported its levels, none may be above the target.
    let replicas = &observed.replicas;
    let mut pairs = Vec::with_capacity(replicas.len());
    for r in replicas {
        let Some(pair) = r.pair else {
            return Err(Refusal::new(
                RefusalKind::ReplicaState,
                format!(
                    "replica {} has not reported its feature levels yet; wait until it is Active and reachable",
                    r.name
                ),
            ));
        };
        if pair.schema_repository > target || pair.user_database > target {
            return Err(Refusal::new(
                RefusalKind::WouldLower,
                format!(
                    "replica {} is at {} and spec.featureLevel is {}: feature levels never go down; set spec.featureLevel to at least {}",
                    r.name,
                    pair,
                    target,
                    pair.schema_repository.max(pair.user_database)
                ),
            ));
        }
        if pair.user_database > pair.schema_repository {
            return Err(Refusal::new(
                RefusalKind::ReplicaState,
                format!(
                    "replica {} reports {}: a user database above its schema repository is never valid; repair the replica before planning",
                    r.name, pair
                ),
            ));
        }
        pairs.push(pair);
    }
    // A replica resting in an unlisted pair was interrupted between the two steps of
    // a paired move; completing it is its first feature level step.
    let mut interrupted = Vec::new();
    for (i, &pair) in pairs.iter().enumerate() {
        if compat.is_valid_pair(pair) {
            continue;
        }
        let completion = (pair.user_database + 1..=pair.schema_repository)
            .rev()
            .find(|&udb| compat.is_valid_pair(FlPair::new(pair.schema_repository, udb)));
        match completion {
            Some(udb) => interrupted.push((i, udb)),
            None => {
                return Err(Refusal::new(
                    RefusalKind::ReplicaState,
                    format!(
                        "replica {} reports {}, a pair that Table 2 does not list and no raise of its user database repairs; repair the replica before planning",
                        replicas[i].name, pair
                    ),
                ));
            }
        }
    }

    // Client tiers: known releases that can open the target level.
    let mut opens = Vec::with_capacity(spec.tiers.len());
    for tier in &spec.tiers {
        if let Err(err) = compat.release_row(&tier.release) {
            return Err(Refusal::new(
                RefusalKind::ClientRelease,
                format!("client tier {}: {}", tier.name, err),
            ));
        }
        opens.push(
            replicas
                .iter()
                .enumerate()
                .filter(|(_, r)| tier.site.as_ref().is_none_or(|s| *s == r.site))
                .map(|(i, _)| i)
                .collect::<Vec<_>>(),
        );
        // A tier that opens no replica constrains nothing.
        let opens_some = opens.last().is_some_and(|o: &Vec<usize>| !o.is_empty());
        if opens_some
            && !compat
                .release_supports(&tier.release, target)
                .unwrap_or(false)
        {
            return Err(Refusal::new(
                RefusalKind::ClientRelease,
                format!(
                    "client tier {} is set to release {}, which cannot open feature level {}; set spec.clients[{}].release to a release that supports it ({})",
                    tier.name,
                    tier.release,
                    target,
                    tier.name,
                    compat.releases_supporting(target).join(", ")
                ),
            ));
        }
    }

    let planner = Planner {
        compat,
        spec,
        replicas,
        opens,
    };
    let tier_releases: Vec<Option<String>> = spec
        .tiers
        .iter()
        .map(|t| {
            observed
                .tiers
                .iter()
                .find(|o| o.name == t.name)
                .and_then(|o| o.release.clone())
        })
        .collect();
    let mut state = State {
        tiers: tier_releases,
        pairs,
        sync_paused: false,
    };
    let mut steps = Vec::new();
    let all_at_once = spec.strategy == UpgradeStrategy::AllAtOnce;
    // Paused sync that this plan will not keep paused is resumed first.
    let paused_for_plan = sync_paused && all_at_once;
    if sync_paused && !all_at_once {
        steps.push(Step::ResumeSync);
    }

    // 1. Client tiers, in spec order.
    for (t, tier) in spec.tiers.iter().enumerate() {
        let seen = observed.tiers.iter().find(|o| o.name == tier.name);
        let done = seen.is_some_and(|o| o.ready && o.release.as_deref() == Some(&tier.release));
        if done {
            continue;
        }
        state.tiers[t] = Some(tier.release.clone());
        // Only this tier changed; another tier's own step repairs that tier.
        if let Err(v) = planner.check_clients(&state, Some(t)) {
            return Err(Refusal::new(
                RefusalKind::ClientRelease,
                format!(
                    "rolling client tier {} out at release {} would break it: {}; choose a release that opens every level from the current ones to the target",
                    tier.name, tier.release, v
                ),
            ));
        }
        steps.push(Step::UpgradeClients {
            tier: tier.name.clone(),
            release: tier.release.clone(),
        });
    }

    let needs_raise: Vec<usize> = (0..state.pairs.len())
        .filter(|&i| state.pairs[i] != target_pair)
        .collect();
    if needs_raise.is_empty() {
        if paused_for_plan {
            steps.push(Step::ResumeSync);
        }
        return Ok(Plan { steps });
    }
    if let Some(&i) = needs_raise.iter().find(|&&i| !replicas[i].reachable) {
        return Err(Refusal::new(
            RefusalKind::Unreachable,
            format!(
                "replica {} at {} must be raised to FL {} but cannot be reached; wait until it is reachable again, or remove it from the family",
                replicas[i].name, state.pairs[i], target
            ),
        ));
    }
    // Packet versions created while sync runs; all must be importable at the end.
    let mut created: BTreeSet<PacketVersion> = BTreeSet::new();
    let record_created = |state: &State, created: &mut BTreeSet<PacketVersion>| {
        if !state.sync_paused {
            created.extend(state.pairs.iter().filter_map(|&p| compat.creates(p)));
        }
    };
    if paused_for_plan {
        state.sync_paused = true;
    } else if all_at_once {
        record_created(&state, &mut created);
        steps.push(Step::PauseSync);
        state.sync_paused = true;
    } else {
        // A family whose sync is already broken cannot be upgraded in stages.
        let skip: Vec<usize> = interrupted.iter().map(|&(i, _)| i).collect();
        if let Err(v) = planner.check_sync(&state.pairs, &skip) {
            return Err(Refusal::new(
                RefusalKind::Replication,
                format!(
                    "replication is already broken before any step: {v}. {}",
                    ways_forward(spec)
                ),
            ));
        }
        record_created(&state, &mut created);
    }

    // 2. Complete interrupted paired moves.
    for &(i, udb) in &interrupted {
        let group = vec![raise_udb(&replicas[i].name, udb)];
        match planner.try_group(&state, &group) {
            Ok(next) => {
                state = next;
                steps.extend(group);
                record_created(&state, &mut created);
            }
            Err(v) => {
                return Err(refusal_for(spec, &group, &v));
            }
        }
    }

    // 3. Feature levels, one group at a time, preferring the canonical order.
    while state.pairs.iter().any(|&p| p != target_pair) {
        let candidates = planner.candidates(&state);
        let mut first_violation = None;
        let mut taken = false;
        for group in candidates {
            match planner.try_group(&state, &group) {
                Ok(next) => {
                    state = next;
                    steps.extend(group);
                    record_created(&state, &mut created);
                    taken = true;
                    break;
                }
                Err(v) => {
                    if first_violation.is_none() {
                        first_violation = Some((group, v));
                    }
                }
            }
        }
        if !taken {
            return Err(match first_violation {
                Some((group, v)) => refusal_for(spec, &group, &v),
                None => Refusal::new(
                    RefusalKind::NoPath,
                    format!(
                        "no step leads from {} to FL {} through pairs that Table 2 lists; the compatibility data has no path",
                        describe_pairs(replicas, &state.pairs),
                        target
                    ),
                ),
            });
        }
    }

    if all_at_once {
        steps.push(Step::ResumeSync);
        state.sync_paused = false;
        if let Err(v) = planner.check_sync(&state.pairs, &[]) {
            return Err(Refusal::new(
                RefusalKind::Replication,
                format!("after the upgrade sync would still be broken: {v}"),
            ));
        }
        record_created(&state, &mut created);
    }

    // Every packet created on the way must be importable everywhere at the end.
    for (i, &pair) in state.pairs.iter().enumerate() {
        if let Some(version) = created.iter().find(|&&v| !compat.accepts_version(pair, v)) {
            return Err(Refusal::new(
                RefusalKind::Replication,
                format!(
                    "packets of version {} created during the upgrade would stay held at {} for good",
                    version,
                    planner.pair_name(i, pair)
                ),
            ));
        }
    }
    Ok(Plan { steps })
}

fn describe_pairs(replicas: &[ReplicaObserved], pairs: &[FlPair]) -> String {
    replicas
        .iter()
        .zip(pairs)
        .map(|(r, p)| format!("{} {}", r.name, p))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The refusal for the most preferred group that broke an invariant.
fn refusal_for(spec: &FleetSpec, group: &[Step], violation: &Violation) -> Refusal {
    let what = group
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(" and then ");
    if matches!(violation, Violation::Sync(_)) && spec.strategy == UpgradeStrategy::Staged {
        let mode = if spec.allow_unidirectional {
            "one-way replication from lower to higher feature levels"
        } else {
            "two-way replication (spec.allowUnidirectionalReplication is false)"
        };
        let ways = ways_forward(spec);
        return Refusal::new(
            RefusalKind::Replication,
            format!(
                "a staged upgrade to FL {} would break {}: after the step to {what}, {violation}. {ways}",
                spec.target, mode
            ),
        );
    }
    let kind = match violation {
        Violation::Client(_) => RefusalKind::ClientRelease,
        Violation::Sync(_) => RefusalKind::Replication,
        Violation::Pair(_) => RefusalKind::NoPath,
    };
    Refusal::new(
        kind,
        format!("no safe next step: {what} would leave {violation}"),
    )
}

#[cfg(test)]
#[path = "planner_tests.rs"]
mod tests;
