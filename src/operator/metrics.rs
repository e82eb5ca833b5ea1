//! The operator's Prometheus metrics, kept in memory and rendered as the text format,
//! and the HTTP server for `/metrics`, `/healthz` and `/readyz`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Label values, in the order of the metric's label names.
type Labels = Vec<String>;

#[derive(Default)]
struct Families {
    reconciles: BTreeMap<Labels, u64>,
    reconcile_errors: BTreeMap<Labels, u64>,
    tasks: BTreeMap<Labels, u64>,
    task_seconds: BTreeMap<Labels, (f64, u64)>,
    lag: BTreeMap<Labels, i64>,
    held: BTreeMap<Labels, i64>,
}

/// Everything `/metrics` reports.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Families>,
    leader: AtomicBool,
    ready: AtomicBool,
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

/// Escapes a label value as the text format wants.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(names: &[&str], values: &[String]) -> String {
    let pairs: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", pairs.join(","))
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Families) -> R) -> R {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut inner)
    }

    pub fn reconciled(&self, kind: &str, failed: bool) {
        self.with(|m| {
            *m.reconciles.entry(vec![kind.to_string()]).or_default() += 1;
            if failed {
                *m.reconcile_errors
                    .entry(vec![kind.to_string()])
                    .or_default() += 1;
            }
        });
    }

    /// A finished sync task of `kind` (`incremental`, `full`) on a link.
    pub fn task(&self, link: [&str; 4], kind: &str, outcome: Outcome, took: Duration) {
        self.with(|m| {
            let mut key: Labels = link.iter().map(|s| s.to_string()).collect();
            key.push(kind.to_string());
            let seconds = m.task_seconds.entry(key.clone()).or_default();
            seconds.0 += took.as_secs_f64();
            seconds.1 += 1;
            key.push(outcome.as_str().to_string());
            *m.tasks.entry(key).or_default() += 1;
        });
    }

    /// The current lag and held packets of a link (namespace, family, from, to).
    pub fn link(&self, link: [&str; 4], lag: i64, held: i64) {
        self.with(|m| {
            let key: Labels = link.iter().map(|s| s.to_string()).collect();
            m.lag.insert(key.clone(), lag);
            m.held.insert(key, held);
        });
    }

    /// Forgets the gauges of links that no longer exist.
    pub fn retain_links(&self, keep: impl Fn(&[String]) -> bool) {
        self.with(|m| {
            m.lag.retain(|k, _| keep(k));
            m.held.retain(|k, _| keep(k));
        });
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The Prometheus text format.
    pub fn render(&self) -> String {
        const LINK: [&str; 4] = ["namespace", "family", "from", "to"];
        let mut out = String::new();
        let leader = u8::from(self.leader.load(Ordering::Relaxed));
        self.with(|m| {
            let family = |out: &mut String, name: &str, kind: &str, help: &str| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            };
            family(
                &mut out,
                "multisite_leader",
                "gauge",
                "1 while this operator process holds the leader lease.",
            );
            let _ = writeln!(out, "multisite_leader {leader}");
            family(
                &mut out,
                "multisite_reconciles_total",
                "counter",
                "Reconciles run, by resource kind.",
            );
            for (k, v) in &m.reconciles {
                let _ = writeln!(
                    out,
                    "multisite_reconciles_total{} {v}",
                    labels(&["kind"], k)
                );
            }
            family(
                &mut out,
                "multisite_reconcile_errors_total",
                "counter",
                "Reconciles that failed, by resource kind.",
            );
            for (k, v) in &m.reconcile_errors {
                let _ = writeln!(
                    out,
                    "multisite_reconcile_errors_total{} {v}",
                    labels(&["kind"], k)
                );
            }
            family(
                &mut out,
                "multisite_sync_tasks_total",
                "counter",
                "Sync tasks finished, by link, task kind and outcome.",
            );
            for (k, v) in &m.tasks {
                let names = [LINK[0], LINK[1], LINK[2], LINK[3], "task", "outcome"];
                let _ = writeln!(out, "multisite_sync_tasks_total{} {v}", labels(&names, k));
            }
            family(
                &mut out,
                "multisite_sync_task_duration_seconds",
                "summary",
                "Time sync tasks took, by link and task kind.",
            );
            for (k, (sum, count)) in &m.task_seconds {
                let names = [LINK[0], LINK[1], LINK[2], LINK[3], "task"];
                let l = labels(&names, k);
                let _ = writeln!(out, "multisite_sync_task_duration_seconds_sum{l} {sum}");
                let _ = writeln!(out, "multisite_sync_task_duration_seconds_count{l} {count}");
            }
            family(
                &mut out,
                "multisite_link_lag_changes",
                "gauge",
                "Changes the receiving replica of a link still lacks, at the last task.",
            );
            for (k, v) in &m.lag {
                let _ = writeln!(out, "multisite_link_lag_changes{} {v}", labels(&LINK, k));
            }
            family(
                &mut out,
                "multisite_link_held_packets",
                "gauge",
                "Packets from the link's sender held at its receiver (not importable yet).",
            );
            for (k, v) in &m.held {
                let _ = writeln!(out, "multisite_link_held_packets{} {v}", labels(&LINK, k));
            }
        });
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
            [("content-type", "text/plain; version=0.0.4")],
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
        m.reconciled("Replica", false);
        m.reconciled("Replica", true);
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
        assert!(text.contains("multisite_sync_task_duration_seconds_sum{namespace=\"ns\",family=\"fam\\\"ily\",from=\"a\",to=\"b\",task=\"incremental\"} 1"), "{text}");
        assert!(text.contains("multisite_link_lag_changes{namespace=\"ns\",family=\"fam\\\"ily\",from=\"a\",to=\"b\"} 7"), "{text}");
        m.retain_links(|_| false);
        assert!(!m.render().contains("multisite_link_lag_changes{"));
        // Every sample line belongs to a declared family.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            let base = name.trim_end_matches("_sum").trim_end_matches("_count");
            assert!(text.contains(&format!("# TYPE {base} ")), "{line}");
        }
    }
}
