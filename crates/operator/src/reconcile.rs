//! What every controller's reconcile shares: metrics (count, errors, duration by kind),
//! the error policy's back-off per object, reset by the next success, and one warning
//! line per failure. The four controllers wrap their own reconcile in [`instrumented`]
//! and hand [`error_policy`] to the controller.

use super::OperatorError;
use super::context::Ctx;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The longest the error policy waits before trying an object again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The back-off of each object whose last reconcile failed.
#[derive(Default)]
pub struct Backoffs {
    failing: Mutex<HashMap<String, backon::ExponentialBackoff>>,
}

impl Backoffs {
    /// Records a failure of `key` and says how long to wait: 1 s doubling to 5 min,
    /// with jitter (up to the wait again) so that objects failing together do not
    /// retry together.
    pub fn failed(&self, key: &str) -> Duration {
        use backon::BackoffBuilder;
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        failing
            .entry(key.to_string())
            .or_insert_with(|| {
                backon::ExponentialBuilder::default()
                    .with_min_delay(Duration::from_secs(1))
                    .with_max_delay(MAX_BACKOFF)
                    .with_factor(2.0)
                    .with_jitter()
                    .without_max_times()
                    .build()
            })
            .next()
            .map_or(MAX_BACKOFF, |wait| wait.min(MAX_BACKOFF))
    }

    /// Forgets `key`'s failures: its next failure waits the shortest time again.
    pub fn succeeded(&self, key: &str) {
        self.failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

/// The key of an object's back-off: kind, namespace, name.
fn backoff_key<K>(object: &K) -> String
where
    K: kube::Resource<DynamicType = ()>,
{
    format!(
        "{}/{}/{}",
        K::kind(&()),
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

/// Runs one reconcile of `object`, records it in the metrics and, when it succeeds,
/// forgets the object's back-off so the next failure starts again at the shortest wait.
pub async fn instrumented<K>(
    object: &K,
    ctx: &Ctx,
    reconcile: impl Future<Output = Result<Action, OperatorError>>,
) -> Result<Action, OperatorError>
where
    K: kube::Resource<DynamicType = ()>,
{
    let started = Instant::now();
    let result = reconcile.await;
    ctx.metrics
        .reconciled(&K::kind(&()), result.is_err(), started.elapsed());
    if result.is_ok() {
        ctx.backoffs.succeeded(&backoff_key(object));
    }
    result
}

/// The error policy of every controller: try the object again after its back-off.
pub fn error_policy<K>(object: Arc<K>, error: &OperatorError, ctx: Arc<Ctx>) -> Action
where
    K: kube::Resource<DynamicType = ()>,
{
    let wait = ctx.backoffs.failed(&backoff_key(object.as_ref()));
    tracing::warn!(
        kind = %K::kind(&()),
        namespace = %object.namespace().unwrap_or_default(),
        name = %object.name_any(),
        %error,
        retry_in = ?wait,
        "reconcile failed"
    );
    Action::requeue(wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits grow from 1 s towards the cap and never pass it; a success starts the
    /// object over; objects back off independently.
    #[test]
    fn backoff_grows_to_the_cap_and_a_success_resets_it() {
        let backoffs = Backoffs::default();
        let waits: Vec<Duration> = (0..14).map(|_| backoffs.failed("Site/ns/a")).collect();
        // With jitter each wait lies between the doubled delay and twice it.
        for (n, wait) in waits.iter().enumerate() {
            let base = Duration::from_secs(1 << n.min(9)).min(MAX_BACKOFF);
            assert!(*wait >= base && *wait <= MAX_BACKOFF, "{n}: {wait:?}");
        }
        assert_eq!(waits[13], MAX_BACKOFF);
        assert!(backoffs.failed("Site/ns/b") <= Duration::from_secs(2));
        backoffs.succeeded("Site/ns/a");
        assert!(backoffs.failed("Site/ns/a") <= Duration::from_secs(2));
    }

    #[test]
    fn keys_name_kind_namespace_and_object() {
        let site = multisite_core::api::Site::new("tokyo", Default::default());
        assert_eq!(backoff_key(&site), "Site//tokyo");
    }
}
