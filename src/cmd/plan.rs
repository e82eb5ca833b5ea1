//! `multisite plan`: reads a family and its replicas, prints the upgrade plan.

use crate::api::UpgradeStrategy;
use crate::api::manifest::{self, FamilyManifest, ManifestError};
use crate::domain::compat::{CompatError, Compatibility, FlPair};
use crate::domain::planner::{self, Plan, Refusal, Step};
use kube::ResourceExt;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// How the plan is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{path}: {source}")]
    Compatibility {
        path: String,
        #[source]
        source: CompatError,
    },
}

/// The answer of `plan -o json`.
#[derive(Debug, Serialize)]
pub struct PlanReport {
    pub family: String,
    pub namespace: Option<String>,
    #[serde(rename = "targetFeatureLevel")]
    pub target_feature_level: i32,
    pub strategy: UpgradeStrategy,
    pub steps: Vec<Step>,
    pub blocked: Option<Blocked>,
}

#[derive(Debug, Serialize)]
pub struct Blocked {
    pub kind: planner::RefusalKind,
    pub reason: String,
}

/// The flags of `multisite plan` (the command's own text is on its subcommand).
#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// File with the family and its replicas; `-` reads standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
    /// The family to plan for, when the input holds several.
    #[arg(long, value_name = "NAME")]
    pub family: Option<String>,
    /// Compatibility data (Tables 1 and 2) to use instead of the built-in tables.
    #[arg(long, value_name = "FILE", env = "MULTISITE_COMPATIBILITY")]
    pub compatibility: Option<PathBuf>,
}

/// `multisite plan`: prints the plan (or why there is none); `false` when refused.
pub fn run(args: &PlanArgs) -> anyhow::Result<bool> {
    let compat = load_compatibility(args.compatibility.as_deref())?;
    let (source, text) = read_input(&args.file)?;
    let (fleet, outcome) = compute(&compat, &source, &text, args.family.as_deref())?;
    match args.output {
        Output::Table => print!("{}", render_table(&compat, &fleet, &outcome)),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report(&fleet, &outcome))?
        ),
    }
    Ok(outcome.is_ok())
}

/// Reads `path` (`-` for standard input) as text.
pub fn read_input(path: &Path) -> Result<(String, String), PlanError> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|source| PlanError::Read {
                path: "<stdin>".into(),
                source,
            })?;
        return Ok(("<stdin>".into(), text));
    }
    let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
        path: path.display().to_string(),
        source,
    })?;
    Ok((path.display().to_string(), text))
}

/// Loads the compatibility data: the built-in tables, or a replacement file.
pub fn load_compatibility(path: Option<&Path>) -> Result<Compatibility, PlanError> {
    match path {
        None => Ok(Compatibility::builtin()),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
                path: path.display().to_string(),
                source,
            })?;
            Compatibility::from_yaml(&text).map_err(|source| PlanError::Compatibility {
                path: path.display().to_string(),
                source,
            })
        }
    }
}

/// Parses the input and computes the plan.
pub fn compute(
    compat: &Compatibility,
    source: &str,
    text: &str,
    family: Option<&str>,
) -> Result<(FamilyManifest, Result<Plan, Refusal>), PlanError> {
    let objects = manifest::parse_objects(source, text)?;
    let fleet = manifest::family_manifest(source, objects, family)?;
    let spec = planner::fleet_spec(&fleet.family);
    let observed = planner::fleet_observed(&fleet.family, &fleet.replicas);
    let outcome = planner::plan(compat, &spec, &observed);
    Ok((fleet, outcome))
}

pub fn report(fleet: &FamilyManifest, outcome: &Result<Plan, Refusal>) -> PlanReport {
    let (steps, blocked) = match outcome {
        Ok(plan) => (plan.steps.clone(), None),
        Err(refusal) => (
            Vec::new(),
            Some(Blocked {
                kind: refusal.kind,
                reason: refusal.reason.clone(),
            }),
        ),
    };
    PlanReport {
        family: fleet.family.name_any(),
        namespace: fleet.family.namespace(),
        target_feature_level: fleet.family.spec.feature_level,
        strategy: fleet.family.spec.upgrade_strategy,
        steps,
        blocked,
    }
}

/// Renders the plan as a table a person reads before an upgrade.
pub fn render_table(
    compat: &Compatibility,
    fleet: &FamilyManifest,
    outcome: &Result<Plan, Refusal>,
) -> String {
    let family = &fleet.family;
    let name = match family.namespace() {
        Some(ns) => format!("{ns}/{}", family.name_any()),
        None => family.name_any(),
    };
    let strategy = match family.spec.upgrade_strategy {
        UpgradeStrategy::Staged if family.spec.allow_unidirectional_replication => {
            "Staged upgrade (one-way replication allowed)"
        }
        UpgradeStrategy::Staged => "Staged upgrade",
        UpgradeStrategy::AllAtOnce => "All-at-once upgrade",
    };
    let mut out = format!(
        "Family {name}: {strategy} to feature level {}\n",
        family.spec.feature_level
    );
    let observed = planner::fleet_observed(family, &fleet.replicas);
    let mut pairs: BTreeMap<String, FlPair> = BTreeMap::new();
    let now: Vec<String> = observed
        .replicas
        .iter()
        .map(|r| match r.pair {
            Some(p) => {
                pairs.insert(r.name.clone(), p);
                format!("{} {}", r.name, p)
            }
            None => format!("{} (levels not reported)", r.name),
        })
        .collect();
    out.push_str(&format!(
        "Replicas (repository,database): {}\n",
        now.join(", ")
    ));
    let plan = match outcome {
        Err(refusal) => {
            out.push_str(&format!("\nPLAN REFUSED: {}\n", refusal.reason));
            return out;
        }
        Ok(plan) if plan.steps.is_empty() => {
            out.push_str("\nNothing to do: every client tier and replica is at its target.\n");
            return out;
        }
        Ok(plan) => plan,
    };
    let mut tiers: BTreeMap<String, Option<String>> = observed
        .tiers
        .iter()
        .map(|t| (t.name.clone(), t.release.clone()))
        .collect();
    let mut rows = vec![[
        "STEP".to_string(),
        "PHASE".into(),
        "ACTION".into(),
        "TARGET".into(),
        "CHANGE".into(),
    ]];
    let mut previous_repository_to_invalid: Option<String> = None;
    for (i, step) in plan.steps.iter().enumerate() {
        let (phase, action, target, change) = match step {
            Step::UpgradeClients { tier, release } => {
                let from = tiers
                    .insert(tier.clone(), Some(release.clone()))
                    .flatten()
                    .unwrap_or_else(|| "not deployed".into());
                let change = if &from == release {
                    format!("{release} (finish rollout)")
                } else {
                    format!("{from} -> {release}")
                };
                ("client tiers", "upgradeClients", tier.clone(), change)
            }
            Step::RaiseSchemaRepository {
                replica,
                feature_level,
            } => {
                let pair = pairs.entry(replica.clone()).or_insert(FlPair::new(0, 0));
                let from = pair.schema_repository;
                pair.schema_repository = *feature_level;
                let paired = matches!(plan.steps.get(i + 1), Some(Step::RaiseUserDatabase { replica: r, .. }) if r == replica)
                    && pair.user_database < *feature_level
                    && !compat.is_valid_pair(*pair);
                if paired {
                    previous_repository_to_invalid = Some(replica.clone());
                }
                (
                    if paired {
                        "paired move"
                    } else {
                        "schema repositories"
                    },
                    "raiseSchemaRepository",
                    replica.clone(),
                    format!("FL {from} -> {feature_level}"),
                )
            }
            Step::RaiseUserDatabase {
                replica,
                feature_level,
            } => {
                let pair = pairs.entry(replica.clone()).or_insert(FlPair::new(0, 0));
                let from = pair.user_database;
                pair.user_database = *feature_level;
                let paired = previous_repository_to_invalid.take().as_ref() == Some(replica);
                (
                    if paired {
                        "paired move"
                    } else {
                        "user databases"
                    },
                    "raiseUserDatabase",
                    replica.clone(),
                    format!("FL {from} -> {feature_level}"),
                )
            }
            Step::PauseSync => ("sync", "pauseSync", "all links".into(), "stop tasks".into()),
            Step::ResumeSync => (
                "sync",
                "resumeSync",
                "all links".into(),
                "start tasks".into(),
            ),
        };
        rows.push([
            (i + 1).to_string(),
            phase.to_string(),
            action.to_string(),
            target,
            change,
        ]);
    }
    out.push('\n');
    out.push_str(&render_rows(&rows));
    out
}

/// Left-aligned columns separated by two spaces.
pub fn render_rows<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}
