//! `multisite operator` and `multisite status`.

use crate::api::conditions::{READY, SYNCHRONIZED};
use crate::api::{Replica, ReplicaFamily};
use crate::domain::scheduler::Limits;
use crate::operator::{self, Settings, builders::Image, leader::Election};
use anyhow::{Context, bail};
use kube::ResourceExt;
use kube::api::Api;
use serde_json::json;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::num::NonZeroU32;

/// How log lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The flags of `multisite operator` (the command's own text is on its subcommand).
#[derive(clap::Args, Debug)]
pub struct OperatorArgs {
    /// Only act while holding a coordination.k8s.io Lease, so that of several
    /// operator processes exactly one acts.
    #[arg(long)]
    pub leader_election: bool,
    /// Namespace of the Lease (in a pod: its own namespace).
    #[arg(long, value_name = "NS", env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(long, value_name = "NAME", default_value = "multisite-operator")]
    pub lease_name: String,
    /// This process's identity in the Lease and in Events (in a pod: its name).
    #[arg(long, value_name = "NAME", env = "POD_NAME")]
    pub identity: Option<String>,
    /// Serve /metrics, /healthz and /readyz here (e.g. 0.0.0.0:8080); none by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    /// Watch only these namespaces (comma-separated); default: all.
    #[arg(long, value_name = "NS,...", value_delimiter = ',')]
    pub watch_namespaces: Vec<String>,
    /// Log line format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Image of the replica pods the operator creates (default: this release's image).
    #[arg(long, value_name = "IMAGE", env = "MULTISITE_IMAGE")]
    pub image: Option<String>,
    /// Pull policy of those pods.
    #[arg(
        long,
        value_name = "POLICY",
        env = "MULTISITE_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent"
    )]
    pub image_pull_policy: String,
    /// How many full sync tasks may run at once across every family this operator
    /// watches. A full task never runs beside an incremental one. A family's
    /// spec.sync.maxConcurrentFull narrows this for its own links; the smaller wins.
    #[arg(long, value_name = "N", default_value_t = NonZeroU32::MIN)]
    pub max_concurrent_full: NonZeroU32,
    /// How many incremental sync tasks may run at once across every family this
    /// operator watches. A family's spec.sync.maxConcurrentIncremental narrows this
    /// for its own links; the smaller wins.
    #[arg(long, value_name = "N", default_value_t = NonZeroU32::MIN.saturating_add(4))]
    pub max_concurrent_incremental: NonZeroU32,
}

/// The flags of `multisite status` (the command's own text is on its subcommand).
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The ReplicaFamily's name.
    pub family: String,
    /// Namespace (default: the kubeconfig's).
    #[arg(short = 'n', long, value_name = "NS")]
    pub namespace: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: crate::cmd::replica::Output,
}

/// A client from `KUBECONFIG`, `~/.kube/config` or the pod's service account,
/// presenting `user_agent`.
pub async fn kube_client(user_agent: &'static str) -> anyhow::Result<kube::Client> {
    let mut config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration: set KUBECONFIG, or run inside a pod")?;
    config.headers.push((
        hyper::http::header::USER_AGENT,
        hyper::http::HeaderValue::from_static(user_agent),
    ));
    kube::Client::try_from(config).context("cannot build a Kubernetes client")
}

/// `multisite operator`: runs until SIGINT or SIGTERM.
pub async fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let identity = args
        .identity
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("multisite-operator-{}", std::process::id()));
    let election = if args.leader_election {
        let Some(namespace) = args.lease_namespace.filter(|s| !s.is_empty()) else {
            bail!(
                "--leader-election needs the namespace of the Lease: set --lease-namespace or POD_NAMESPACE"
            );
        };
        let mut election = Election::new(namespace, identity.clone());
        election.lease = args.lease_name;
        Some(election)
    } else {
        None
    };
    let metrics_addr: Option<SocketAddr> = match args.metrics_addr.as_deref() {
        None | Some("") | Some("0") => None,
        Some(text) => Some(text.parse().with_context(|| {
            format!("--metrics-addr {text:?}: expected ADDRESS:PORT, e.g. 0.0.0.0:8080")
        })?),
    };
    let settings = Settings {
        namespaces: args
            .watch_namespaces
            .into_iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect(),
        image: Image {
            reference: args
                .image
                .filter(|s| !s.is_empty())
                .unwrap_or_else(operator::default_image),
            pull_policy: args.image_pull_policy,
        },
        election,
        metrics_addr,
        identity,
        sync_limits: Limits {
            max_concurrent_full: args.max_concurrent_full,
            max_concurrent_incremental: args.max_concurrent_incremental,
        },
    };
    let client = kube_client(operator::USER_AGENT).await?;
    operator::run(client, settings, crate::cmd::replica::shutdown_signal()).await?;
    Ok(())
}

fn condition(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> String {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
        .unwrap_or_else(|| "-".into())
}

fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// Renders a family and its replicas as tables (pure).
pub fn render_status(family: &ReplicaFamily, replicas: &[Replica]) -> String {
    let status = family.status.clone().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "family {}/{}  target FL {}  reached FL {}  Ready {}  Synchronized {}  max lag {}",
        family.namespace().unwrap_or_default(),
        family.name_any(),
        family.spec.feature_level,
        or_dash(status.feature_level),
        condition(&status.conditions, READY),
        condition(&status.conditions, SYNCHRONIZED),
        or_dash(status.max_lag_changes),
    );
    let mut rows = vec![
        [
            "REPLICA",
            "SITE",
            "PHASE",
            "READY",
            "REPO FL",
            "DB FL",
            "INCARNATION",
            "HELD",
            "EPOCHS",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for r in replicas {
        let s = r.status.clone().unwrap_or_default();
        let epochs: Vec<String> = s.epochs.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        rows.push(vec![
            r.name_any(),
            r.spec.site.clone(),
            or_dash(s.phase.map(|p| format!("{p:?}"))),
            condition(&s.conditions, READY),
            or_dash(s.schema_repository_feature_level),
            or_dash(s.user_database_feature_level),
            or_dash(s.incarnation),
            s.held_packets.to_string(),
            if epochs.is_empty() {
                "-".into()
            } else {
                epochs.join(",")
            },
        ]);
    }
    out.push('\n');
    out.push_str(&table(&rows));
    let mut links = vec![
        [
            "FROM",
            "TO",
            "LAST TASK",
            "AT",
            "LAG",
            "HELD",
            "RUNNING",
            "ERROR",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for l in &status.links {
        links.push(vec![
            l.from.clone(),
            l.to.clone(),
            or_dash(l.last_task.clone()),
            or_dash(l.last_task_time.clone()),
            l.lag_changes.to_string(),
            l.held_packets.to_string(),
            if l.running { "yes".into() } else { "no".into() },
            or_dash(l.error.clone()),
        ]);
    }
    out.push('\n');
    if status.links.is_empty() {
        out.push_str("no links yet\n");
    } else {
        out.push_str(&table(&links));
    }
    out
}

fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<width$}", width = widths[i]))
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

/// `multisite status FAMILY`: prints the family and its replicas from the cluster.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let json_output = args.output == crate::cmd::replica::Output::Json;
    print!(
        "{}",
        fetch_status(args.namespace, &args.family, json_output).await?
    );
    Ok(())
}

/// The family and its replicas from the cluster, rendered.
async fn fetch_status(
    namespace: Option<String>,
    family: &str,
    json_output: bool,
) -> anyhow::Result<String> {
    let client = kube_client(concat!("multisite/", env!("CARGO_PKG_VERSION"))).await?;
    let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_string());
    let families: Api<ReplicaFamily> = Api::namespaced(client.clone(), &namespace);
    let Some(object) = families.get_opt(family).await? else {
        bail!("no ReplicaFamily {family} in namespace {namespace}");
    };
    let replicas: Api<Replica> = Api::namespaced(client, &namespace);
    let mut members: Vec<Replica> = replicas
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|r| r.spec.family == family)
        .collect();
    members.sort_by_key(|r| r.name_any());
    if json_output {
        return Ok(
            serde_json::to_string_pretty(&json!({"family": object, "replicas": members}))? + "\n",
        );
    }
    Ok(render_status(&object, &members))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        LinkStatus, ReplicaFamilySpec, ReplicaFamilyStatus, ReplicaSpec, ReplicaStatus,
    };

    #[test]
    fn status_table_shows_replicas_levels_and_links() {
        let mut family = ReplicaFamily::new("sampl", ReplicaFamilySpec::new("SAMPL", 8));
        family.metadata.namespace = Some("tracker".into());
        family.status = Some(ReplicaFamilyStatus {
            feature_level: Some(7),
            max_lag_changes: Some(4),
            links: vec![LinkStatus {
                from: "a".into(),
                to: "b".into(),
                last_task: Some("Incremental".into()),
                lag_changes: 4,
                ..Default::default()
            }],
            ..Default::default()
        });
        let mut replica = Replica::new(
            "a",
            ReplicaSpec {
                family: "sampl".into(),
                site: "tokyo".into(),
                storage: "1Gi".into(),
                bootstrap_from: None,
                resources: None,
            },
        );
        replica.status = Some(ReplicaStatus {
            schema_repository_feature_level: Some(8),
            user_database_feature_level: Some(7),
            epochs: [("a".to_string(), 12)].into(),
            incarnation: Some(1),
            ..Default::default()
        });
        let text = render_status(&family, &[replica]);
        assert!(
            text.starts_with("family tracker/sampl  target FL 8  reached FL 7"),
            "{text}"
        );
        let row = text
            .lines()
            .find(|l| l.starts_with("a "))
            .expect("replica row");
        for cell in ["tokyo", "8", "7", "a:12"] {
            assert!(row.contains(cell), "{row}");
        }
        let link = text
            .lines()
            .find(|l| l.starts_with("a ") && l.contains("Incremental"))
            .expect("link row");
        assert!(link.contains(" 4 "), "{link}");
    }
}
