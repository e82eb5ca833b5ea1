//! The operator's Prometheus metrics (kept with `prometheus-client`, rendered in the
//! OpenMetrics text format) and the HTTP server for `/metrics`, `/healthz` and
//! `/readyz`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct LinkLabels {
    namespace: String,
    family: String,
    from: String,
    to: String,
}

impl LinkLabels {
    fn new(link: [&str; 4]) -> Self {
        let [namespace, family, from, to] = link.map(str::to_string);
        LinkLabels {
            namespace,
            family,
            from,
            to,
        }
    }

    fn values(&self) -> [String; 4] {
        [
            self.namespace.clone(),
            self.family.clone(),
            self.from.clone(),
            self.to.clone(),
        ]
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    namespace: String,
    family: String,
    from: String,
    to: String,
    task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskOutcomeLabels {
    namespace: String,
    family: String,
    from: String,
    to: String,
    task: String,
    outcome: String,
}

/// Reconciles take milliseconds to a few seconds: 5 ms doubling to about 40 s.
fn reconcile_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// Sync tasks take from a few milliseconds to the 30 minutes a full task may run.
fn task_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 18))
}

/// Everything `/metrics` reports.
pub struct Metrics {
    registry: Registry,
    leader: Gauge,
    reconciles: Family<KindLabels, Counter>,
    reconcile_errors: Family<KindLabels, Counter>,
    reconcile_seconds: Family<KindLabels, Histogram, fn() -> Histogram>,
    tasks: Family<TaskOutcomeLabels, Counter>,
    task_seconds: Family<TaskLabels, Histogram, fn() -> Histogram>,
    lag: Family<LinkLabels, Gauge>,
    held: Family<LinkLabels, Gauge>,
    /// The links that have gauges, so that those of links gone can be removed.
    links: Mutex<BTreeSet<LinkLabels>>,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let leader = Gauge::default();
        registry.register(
            "multisite_leader",
            "1 while this operator process holds the leader lease",
            leader.clone(),
        );
        let reconciles = Family::<KindLabels, Counter>::default();
        registry.register(
            "multisite_reconciles",
            "Reconciles run, by resource kind",
            reconciles.clone(),
        );
        let reconcile_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "multisite_reconcile_errors",
            "Reconciles that failed, by resource kind",
            reconcile_errors.clone(),
        );
        let reconcile_seconds =
            Family::<KindLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                reconcile_histogram,
            );
        registry.register(
            "multisite_reconcile_duration_seconds",
            "Time reconciles took, by resource kind",
            reconcile_seconds.clone(),
        );
        let tasks = Family::<TaskOutcomeLabels, Counter>::default();
        registry.register(
            "multisite_sync_tasks",
            "Sync tasks finished, by link, task kind and outcome",
            tasks.clone(),
        );
        let task_seconds = Family::<TaskLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            task_histogram,
        );
        registry.register(
            "multisite_sync_task_duration_seconds",
            "Time sync tasks took, by link and task kind",
            task_seconds.clone(),
        );
        let lag = Family::<LinkLabels, Gauge>::default();
        registry.register(
            "multisite_link_lag_changes",
            "Changes the receiving replica of a link still lacks, at the last task",
            lag.clone(),
        );
        let held = Family::<LinkLabels, Gauge>::default();
        registry.register(
            "multisite_link_held_packets",
            "Packets from the link's sender held at its receiver (not importable yet)",
            held.clone(),
        );
        Metrics {
            registry,
            leader,
            reconciles,
            reconcile_errors,
            reconcile_seconds,
            tasks,
            task_seconds,
            lag,
            held,
            links: Mutex::default(),
            ready: AtomicBool::new(false),
        }
    }
}

/// How a sync task ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
        }
    }
}

impl Metrics {
    /// One reconcile of `kind` that took `took`.
    pub fn reconciled(&self, kind: &str, failed: bool, took: Duration) {
        let labels = KindLabels {
            kind: kind.to_string(),
        };
        self.reconciles.get_or_create(&labels).inc();
        if failed {
            self.reconcile_errors.get_or_create(&labels).inc();
        }
        self.reconcile_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// A finished sync task of `kind` (`incremental`, `full`) on a link.
    pub fn task(&self, link: [&str; 4], kind: &str, outcome: Outcome, took: Duration) {
        let [namespace, family, from, to] = link.map(str::to_string);
        let task = TaskLabels {
            namespace,
            family,
            from,
            to,
            task: kind.to_string(),
        };
        self.task_seconds
            .get_or_create(&task)
            .observe(took.as_secs_f64());
        let counted = TaskOutcomeLabels {
            namespace: task.namespace,
            family: task.family,
            from: task.from,
            to: task.to,
            task: task.task,
            outcome: outcome.as_str().to_string(),
        };
        self.tasks.get_or_create(&counted).inc();
    }

    /// The current lag and held packets of a link (namespace, family, from, to).
    pub fn link(&self, link: [&str; 4], lag: i64, held: i64) {
        let labels = LinkLabels::new(link);
        self.lag.get_or_create(&labels).set(lag);
        self.held.get_or_create(&labels).set(held);
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(labels);
    }

    /// Forgets the gauges of links that no longer exist.
    pub fn retain_links(&self, keep: impl Fn(&[String]) -> bool) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.retain(|labels| {
            let kept = keep(&labels.values());
            if !kept {
                self.lag.remove(labels);
                self.held.remove(labels);
            }
            kept
        });
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Writing to a String fails only if a metric cannot be encoded; say so in the
            // scrape rather than serving half a page silently.
            tracing::error!(%error, "cannot encode the metrics");
            out.clear();
        }
        out
    }
}

/// Serves `/metrics`, `/healthz` (the process runs) and `/readyz` (the CRDs were found)
/// on `listener` until `stop` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<Metrics>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let ready = {
        let metrics = metrics.clone();
        move || async move {
            if metrics.is_ready() {
                (StatusCode::OK, "ok")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "starting")
            }
        }
    };
    let render = move || async move {
        (
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            metrics.render(),
        )
    };
    let app = axum::Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready));
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_escaped_labels() {
        let m = Metrics::default();
        m.reconciled("Replica", false, Duration::from_millis(3));
        m.reconciled("Replica", true, Duration::from_millis(30));
        let link = ["ns", "fam\"ily", "a", "b"];
        m.task(
            link,
            "incremental",
            Outcome::Succeeded,
            Duration::from_millis(250),
        );
        m.task(
            link,
            "incremental",
            Outcome::Failed,
            Duration::from_millis(750),
        );
        m.link(link, 7, 1);
        m.set_leader(true);
        let text = m.render();
        assert!(text.contains("multisite_leader 1"), "{text}");
        assert!(
            text.contains("multisite_reconciles_total{kind=\"Replica\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("multisite_reconcile_errors_total{kind=\"Replica\"} 1"),
            "{text}"
        );
        assert!(text.contains("family=\"fam\\\"ily\""), "{text}");
        assert!(
            text.contains("task=\"incremental\",outcome=\"failed\"} 1"),
            "{text}"
        );
        assert!(text.contains("multisite_sync_task_duration_seconds_sum{namespace=\"ns\",family=\"fam\\\"ily\",from=\"a\",to=\"b\",task=\"incremental\"} 1.0"), "{text}");
        assert!(text.contains("multisite_sync_task_duration_seconds_count{namespace=\"ns\",family=\"fam\\\"ily\",from=\"a\",to=\"b\",task=\"incremental\"} 2"), "{text}");
        assert!(
            text.contains("multisite_reconcile_duration_seconds_count{kind=\"Replica\"} 2"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("multisite_link_lag_changes{namespace=\"ns\",family=\"fam\\\"ily\",from=\"a\",to=\"b\"} 7"), "{text}");
        let other = ["ns", "fam", "c", "d"];
        m.link(other, 3, 0);
        m.retain_links(|labels| labels[2] == "c");
        let after = m.render();
        assert!(!after.contains("from=\"a\",to=\"b\"} 7"), "{after}");
        assert!(after.contains("from=\"c\",to=\"d\"} 3"), "{after}");
        // Every sample line belongs to a declared family.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            let base = ["_total", "_sum", "_count", "_bucket"]
                .iter()
                .fold(name, |n, suffix| n.strip_suffix(suffix).unwrap_or(n));
            assert!(text.contains(&format!("# TYPE {base} ")), "{line}");
        }
    }
}
