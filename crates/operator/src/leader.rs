//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator
//! processes only one acts. The holder renews the lease well within its duration;
//! another process takes it over only once it has expired. Every write carries the
//! resourceVersion it read, so two candidates never both win.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use std::time::Duration;

/// How the election runs.
#[derive(Clone, Debug)]
pub struct Election {
    pub namespace: String,
    pub lease: String,
    /// This process's name in the lease (its pod name).
    pub identity: String,
    /// How long a lease lasts without renewal.
    pub duration: Duration,
    /// How often the holder renews and a candidate retries.
    pub retry: Duration,
}

impl Election {
    pub fn new(namespace: String, identity: String) -> Self {
        Election {
            namespace,
            lease: "multisite-operator".into(),
            identity,
            duration: Duration::from_secs(15),
            retry: Duration::from_secs(2),
        }
    }
}

/// What a look at the lease decided (pure, so it can be tested).
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Ours, or free, or expired: write it with us as holder.
    Take { transition: bool },
    /// Somebody else holds it until then.
    HeldBy(String),
}

/// Whether `me` may take `lease` at `now`.
pub fn judge(lease: &Lease, me: &str, now: Timestamp) -> Verdict {
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.unwrap_or_default();
    if holder.is_empty() || holder == me {
        return Verdict::Take {
            transition: holder != me,
        };
    }
    let seconds = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    let renewed = spec
        .renew_time
        .map(|t| t.0)
        .or(spec.acquire_time.map(|t| t.0));
    match renewed {
        Some(at) if at + SignedDuration::from_secs(seconds) > now => Verdict::HeldBy(holder),
        _ => Verdict::Take { transition: true },
    }
}

fn claim(
    mut lease: Lease,
    me: &str,
    duration: Duration,
    transition: bool,
    now: Timestamp,
) -> Lease {
    let mut spec = lease.spec.take().unwrap_or_default();
    if transition {
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.holder_identity = Some(me.to_string());
    spec.lease_duration_seconds = Some(i32::try_from(duration.as_secs()).unwrap_or(15));
    spec.renew_time = Some(MicroTime(now));
    lease.spec = Some(spec);
    lease
}

/// One attempt to take or renew the lease. `Ok(true)`: we hold it now.
pub async fn try_acquire(api: &Api<Lease>, election: &Election) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    match api.get_opt(&election.lease).await? {
        None => {
            let mut lease = Lease::default();
            lease.metadata.name = Some(election.lease.clone());
            let lease = claim(lease, &election.identity, election.duration, true, now);
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(lease) => match judge(&lease, &election.identity, now) {
            Verdict::HeldBy(_) => Ok(false),
            Verdict::Take { transition } => {
                let lease = claim(
                    lease,
                    &election.identity,
                    election.duration,
                    transition,
                    now,
                );
                // The resourceVersion read above makes this a compare-and-swap.
                match api
                    .replace(&election.lease, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        },
    }
}

/// Waits until this process holds the lease.
pub async fn acquire(api: &Api<Lease>, election: &Election) {
    let mut announced = None;
    loop {
        match try_acquire(api, election).await {
            Ok(true) => {
                tracing::info!(lease = %election.lease, identity = %election.identity, "became the leader");
                return;
            }
            Ok(false) => {
                let holder = api
                    .get_opt(&election.lease)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|l| l.spec.and_then(|s| s.holder_identity));
                if holder != announced {
                    tracing::info!(lease = %election.lease, holder = ?holder, "standing by: another operator leads");
                    announced = holder;
                }
            }
            Err(error) => tracing::warn!(%error, lease = %election.lease, "leader election"),
        }
        tokio::time::sleep(election.retry).await;
    }
}

/// Renews the lease until a renewal has failed for longer than the lease lasts (or
/// somebody else took it); then returns, and the caller must stop acting.
pub async fn keep(api: &Api<Lease>, election: &Election) {
    let mut last_renewal = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(election.retry).await;
        match try_acquire(api, election).await {
            Ok(true) => last_renewal = tokio::time::Instant::now(),
            Ok(false) => {
                tracing::error!(lease = %election.lease, "lost the lease to another operator");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "renewing the lease");
                // Stop before the lease can expire, so two leaders never overlap.
                if last_renewal.elapsed() + election.retry >= election.duration {
                    tracing::error!(lease = %election.lease, "could not renew the lease in time");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;

    fn lease(holder: Option<&str>, renewed_secs_ago: Option<i64>, duration: i32) -> Lease {
        let now = Timestamp::now();
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                renew_time: renewed_secs_ago.map(|s| MicroTime(now - SignedDuration::from_secs(s))),
                lease_duration_seconds: Some(duration),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn table() {
        let now = Timestamp::now();
        let cases = [
            (lease(None, None, 15), Verdict::Take { transition: true }),
            (
                lease(Some(""), Some(1), 15),
                Verdict::Take { transition: true },
            ),
            (
                lease(Some("me"), Some(1), 15),
                Verdict::Take { transition: false },
            ),
            (
                lease(Some("me"), Some(100), 15),
                Verdict::Take { transition: false },
            ),
            (
                lease(Some("other"), Some(1), 15),
                Verdict::HeldBy("other".into()),
            ),
            (
                lease(Some("other"), Some(14), 15),
                Verdict::HeldBy("other".into()),
            ),
            (
                lease(Some("other"), Some(16), 15),
                Verdict::Take { transition: true },
            ),
            (
                lease(Some("other"), None, 15),
                Verdict::Take { transition: true },
            ),
        ];
        for (lease, expected) in cases {
            assert_eq!(judge(&lease, "me", now), expected, "{:?}", lease.spec);
        }
    }

    #[test]
    fn claiming_counts_transitions_only_on_a_change_of_holder() {
        let now = Timestamp::now();
        let taken = claim(
            lease(Some("other"), Some(30), 15),
            "me",
            Duration::from_secs(15),
            true,
            now,
        );
        let spec = taken.spec.clone().expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("me"));
        assert_eq!(spec.lease_transitions, Some(1));
        let renewed = claim(taken, "me", Duration::from_secs(15), false, now);
        assert_eq!(renewed.spec.expect("spec").lease_transitions, Some(1));
    }
}
