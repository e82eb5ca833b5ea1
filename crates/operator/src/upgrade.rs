//! The upgrade driver: computes the family's plan with the planner (the same code as
//! `multisite plan`), publishes it in `status.plan`, and carries it out one step at a
//! time. After every step it plans again from what it observes, so an operator
//! restarted mid-plan resumes at the right step (the planner's property tests show the
//! re-planned steps always reach the target).
//!
//! A step is done when the observation says so: a raise when the replica reports the
//! new level, a client tier when all its pods are ready at the new release, a pause or
//! resume when `status.plan.syncPaused` says so.

use super::OperatorError;
use super::context::Ctx;
use kube::ResourceExt;
use multisite_core::api::{
    PlanAction, PlanBlocked, PlanStatus, PlanStepStatus, Replica, ReplicaFamily, ReplicaPhase,
    StepState,
};
use multisite_core::domain::compat::{Compatibility, FlPair};
use multisite_core::domain::planner::{self, FleetObserved, Plan, Refusal, Step};
use multisite_replica::api::UpgradeRequest;
use std::sync::Arc;

/// The step as status shows it.
pub fn step_status(step: &Step, state: StepState) -> PlanStepStatus {
    let mut out = PlanStepStatus {
        action: PlanAction::PauseSync,
        tier: None,
        release: None,
        replica: None,
        feature_level: None,
        state,
        message: None,
    };
    match step {
        Step::UpgradeClients { tier, release } => {
            out.action = PlanAction::UpgradeClients;
            out.tier = Some(tier.clone());
            out.release = Some(release.clone());
        }
        Step::RaiseSchemaRepository {
            replica,
            feature_level,
        } => {
            out.action = PlanAction::RaiseSchemaRepository;
            out.replica = Some(replica.clone());
            out.feature_level = Some(*feature_level);
        }
        Step::RaiseUserDatabase {
            replica,
            feature_level,
        } => {
            out.action = PlanAction::RaiseUserDatabase;
            out.replica = Some(replica.clone());
            out.feature_level = Some(*feature_level);
        }
        Step::PauseSync => out.action = PlanAction::PauseSync,
        Step::ResumeSync => out.action = PlanAction::ResumeSync,
    }
    out
}

fn same_step(a: &PlanStepStatus, b: &PlanStepStatus) -> bool {
    a.action == b.action
        && a.tier == b.tier
        && a.release == b.release
        && a.replica == b.replica
        && a.feature_level == b.feature_level
}

/// The plan status after planning again (pure): steps finished since the last look
/// are kept as `Done`, the first remaining one is `Running` (unless the plan is held),
/// the rest `Pending`. A new target starts a new history.
pub fn next_status(
    previous: Option<&PlanStatus>,
    target: i32,
    planned: &Result<Plan, Refusal>,
    held: bool,
) -> PlanStatus {
    let previous = previous.cloned().unwrap_or_default();
    let same_target = previous.target_feature_level == Some(target);
    let mut done: Vec<PlanStepStatus> = if same_target {
        previous
            .steps
            .iter()
            .filter(|s| s.state == StepState::Done)
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    let mut out = PlanStatus {
        target_feature_level: Some(target),
        sync_paused: previous.sync_paused,
        ..PlanStatus::default()
    };
    match planned {
        Err(refusal) => {
            // Nothing changes; the steps already taken stay on record.
            out.steps = if same_target {
                previous.steps.clone()
            } else {
                Vec::new()
            };
            out.current = previous.current;
            out.blocked = Some(PlanBlocked {
                reason: refusal.reason.clone(),
            });
        }
        Ok(plan) => {
            let remaining: Vec<PlanStepStatus> = plan
                .steps
                .iter()
                .map(|s| step_status(s, StepState::Pending))
                .collect();
            // What ran before and is no longer planned has finished.
            if same_target {
                for step in previous
                    .steps
                    .iter()
                    .filter(|s| s.state == StepState::Running)
                {
                    if !remaining.iter().any(|r| same_step(r, step)) {
                        let mut finished = step.clone();
                        finished.state = StepState::Done;
                        finished.message = None;
                        done.push(finished);
                    }
                }
            }
            out.current = i32::try_from(done.len()).unwrap_or(i32::MAX);
            out.steps = done;
            for (i, mut step) in remaining.into_iter().enumerate() {
                if i == 0 && !held {
                    step.state = StepState::Running;
                }
                out.steps.push(step);
            }
        }
    }
    out
}

/// The observed fleet, with each reachable replica's levels as it reports them now
/// (Replica statuses are refreshed every few seconds; a plan step must not wait on that).
async fn observe(
    ctx: &Ctx,
    family: &ReplicaFamily,
    members: &[Arc<Replica>],
) -> Result<FleetObserved, OperatorError> {
    let namespace = family.namespace().unwrap_or_default();
    let replicas: Vec<Replica> = members.iter().map(|r| (**r).clone()).collect();
    let mut observed = planner::fleet_observed(family, &replicas);
    let client = ctx.replica_client(&namespace, &family.name_any()).await?;
    for (seen, replica) in observed.replicas.iter_mut().zip(
        replicas
            .iter()
            .filter(|r| r.status.as_ref().and_then(|s| s.phase) != Some(ReplicaPhase::Removing)),
    ) {
        let Some(url) = replica.status.as_ref().and_then(|s| s.endpoint.clone()) else {
            continue;
        };
        match client.status(&url).await {
            Ok(report) => {
                seen.pair = Some(FlPair::new(
                    report.schema_repository_feature_level,
                    report.user_database_feature_level,
                ));
                seen.reachable = true;
            }
            Err(_) => seen.reachable = false,
        }
    }
    Ok(observed)
}

/// What the driver decided this time.
pub struct Drive {
    pub status: PlanStatus,
    /// A step is to be carried out or under way.
    pub progressing: bool,
    /// Why the plan waits, if it does (paused, a step's precondition).
    pub waiting: Option<String>,
    /// The step to carry out now, once `status` is published.
    pub next: Option<Step>,
}

/// Plans again and carries out the first step if it may.
pub async fn drive(
    ctx: &Ctx,
    compat: &Compatibility,
    family: &ReplicaFamily,
    members: &[Arc<Replica>],
) -> Result<Drive, OperatorError> {
    let previous = family.status.as_ref().and_then(|s| s.plan.clone());
    let paused_sync = previous.as_ref().is_some_and(|p| p.sync_paused);
    let active: Vec<Arc<Replica>> = members
        .iter()
        .filter(|r| r.status.as_ref().and_then(|s| s.phase) != Some(ReplicaPhase::Removing))
        .cloned()
        .collect();
    // Nothing to plan until every replica serves.
    if let Some(r) = active
        .iter()
        .find(|r| r.status.as_ref().and_then(|s| s.phase) != Some(ReplicaPhase::Active))
    {
        let mut status = previous.unwrap_or_default();
        status.target_feature_level = Some(family.spec.feature_level);
        return Ok(Drive {
            status,
            progressing: false,
            waiting: Some(format!("waiting for replica {} to be Active", r.name_any())),
            next: None,
        });
    }
    // The Replica statuses first: when they show nothing to do, no replica is asked.
    let cached: Vec<Replica> = active.iter().map(|r| (**r).clone()).collect();
    let spec = planner::fleet_spec(family);
    let quick = planner::plan_from(
        compat,
        &spec,
        &planner::fleet_observed(family, &cached),
        paused_sync,
    );
    let planned = if quick.as_ref().is_ok_and(|p| p.steps.is_empty()) {
        quick
    } else {
        let observed = observe(ctx, family, &active).await?;
        planner::plan_from(compat, &spec, &observed, paused_sync)
    };
    let held = family.spec.paused;
    let status = next_status(previous.as_ref(), family.spec.feature_level, &planned, held);
    let Ok(plan) = planned else {
        return Ok(Drive {
            status,
            progressing: false,
            waiting: None,
            next: None,
        });
    };
    let Some(step) = plan.steps.first().cloned() else {
        return Ok(Drive {
            status,
            progressing: false,
            waiting: None,
            next: None,
        });
    };
    if held {
        return Ok(Drive {
            status,
            progressing: true,
            waiting: Some(format!("spec.paused holds the plan before: {step}")),
            next: None,
        });
    }
    Ok(Drive {
        status,
        progressing: true,
        waiting: None,
        next: Some(step),
    })
}

/// Carries out `step` (published as running in `status` beforehand, so that a restart
/// after it knows it ran). Returns why the plan waits, if it does; `status` gets the
/// step's outcome.
pub async fn execute(
    ctx: &Ctx,
    family: &ReplicaFamily,
    members: &[Arc<Replica>],
    step: &Step,
    status: &mut PlanStatus,
) -> Result<Option<String>, OperatorError> {
    let namespace = family.namespace().unwrap_or_default();
    let running = usize::try_from(status.current).unwrap_or(0);
    let waiting = match step {
        Step::PauseSync => {
            status.sync_paused = true;
            ctx.event(family, false, "StepDone", "Upgrade", format!("{step}"))
                .await;
            None
        }
        Step::ResumeSync => {
            status.sync_paused = false;
            ctx.event(family, false, "StepDone", "Upgrade", format!("{step}"))
                .await;
            None
        }
        Step::RaiseSchemaRepository {
            replica,
            feature_level,
        }
        | Step::RaiseUserDatabase {
            replica,
            feature_level,
        } => {
            let body = match step {
                Step::RaiseSchemaRepository { .. } => UpgradeRequest {
                    schema_repository: Some(*feature_level),
                    ..UpgradeRequest::default()
                },
                _ => UpgradeRequest {
                    user_database: Some(*feature_level),
                    ..UpgradeRequest::default()
                },
            };
            let url = Ctx::endpoint_of(members, replica);
            match url {
                None => Some(format!("replica {replica} has no address yet")),
                Some(url) => {
                    let client = ctx.replica_client(&namespace, &family.name_any()).await?;
                    match client.upgrade(&url, &body).await {
                        Ok(_) => {
                            ctx.event(family, false, "StepDone", "Upgrade", format!("{step}"))
                                .await;
                            None
                        }
                        Err(e) => Some(format!("{step}: {e}")),
                    }
                }
            }
        }
        Step::UpgradeClients { tier, release } => {
            Some(super::clients::roll_out(ctx, family, tier, release).await?)
        }
    };
    if let Some(s) = status.steps.get_mut(running) {
        s.message = waiting.clone();
    }
    Ok(waiting)
}

#[cfg(test)]
mod tests {
    use super::*;
    use multisite_core::domain::planner::RefusalKind;

    fn raise(replica: &str, level: i32) -> Step {
        Step::RaiseSchemaRepository {
            replica: replica.into(),
            feature_level: level,
        }
    }

    #[test]
    fn finished_steps_stay_on_record_and_the_first_remaining_runs() {
        let plan = |steps: Vec<Step>| Ok(Plan { steps });
        let first = next_status(None, 8, &plan(vec![raise("a", 8), raise("b", 8)]), false);
        assert_eq!(first.steps.len(), 2);
        assert_eq!(first.steps[0].state, StepState::Running);
        assert_eq!(first.steps[1].state, StepState::Pending);
        assert_eq!(first.current, 0);
        // a's raise happened: it leaves the plan and is recorded done.
        let second = next_status(Some(&first), 8, &plan(vec![raise("b", 8)]), false);
        assert_eq!(second.steps.len(), 2);
        assert_eq!(second.steps[0].state, StepState::Done);
        assert_eq!(second.steps[0].replica.as_deref(), Some("a"));
        assert_eq!(second.steps[1].state, StepState::Running);
        assert_eq!(second.current, 1);
        // Held: nothing runs.
        let held = next_status(Some(&second), 8, &plan(vec![raise("b", 8)]), true);
        assert_eq!(held.steps[1].state, StepState::Pending);
        // Done.
        let third = next_status(Some(&second), 8, &plan(vec![]), false);
        assert!(third.steps.iter().all(|s| s.state == StepState::Done));
        assert_eq!(third.current, 2);
        // A refusal keeps what happened and says why.
        let refused = next_status(
            Some(&second),
            8,
            &Err(Refusal {
                kind: RefusalKind::Replication,
                reason: "no".into(),
            }),
            false,
        );
        assert_eq!(refused.blocked.map(|b| b.reason).as_deref(), Some("no"));
        assert_eq!(refused.steps, second.steps);
        // A new target starts afresh.
        let fresh = next_status(Some(&third), 9, &plan(vec![raise("a", 9)]), false);
        assert_eq!(fresh.steps.len(), 1);
        assert_eq!(fresh.target_feature_level, Some(9));
    }
}
