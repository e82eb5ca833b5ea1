//! Standard status conditions, shared by every resource.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const SYNCHRONIZED: &str = "Synchronized";

/// Sets condition `type_` in `conditions`, keeping `lastTransitionTime` when the
/// status does not change (so watchers see real transitions only).
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: Time,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let fresh = Condition {
        type_: type_.to_string(),
        status: status.clone(),
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation,
        last_transition_time: now,
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            let keep_time = existing.status == status;
            let time = existing.last_transition_time.clone();
            *existing = fresh;
            if keep_time {
                existing.last_transition_time = time;
            }
        }
        None => conditions.push(fresh),
    }
}

/// One condition's value, reason and message.
pub type Verdict<'a> = (bool, &'a str, &'a str);

/// Sets the three standard conditions at once: Ready, Progressing, Degraded.
pub fn set_standard(
    conditions: &mut Vec<Condition>,
    [ready, progressing, degraded]: [Verdict; 3],
    observed_generation: Option<i64>,
    now: Time,
) {
    for (type_, (value, reason, message)) in [
        (READY, ready),
        (PROGRESSING, progressing),
        (DEGRADED, degraded),
    ] {
        set_condition(
            conditions,
            type_,
            value,
            reason,
            message,
            observed_generation,
            now.clone(),
        );
    }
}

/// Whether condition `type_` is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_changes_only_with_status() {
        let mut conds = Vec::new();
        set_condition(&mut conds, READY, false, "Starting", "m1", Some(1), at(10));
        set_condition(&mut conds, READY, false, "Waiting", "m2", Some(2), at(20));
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].last_transition_time, at(10));
        assert_eq!(conds[0].reason, "Waiting");
        assert_eq!(conds[0].observed_generation, Some(2));
        set_condition(&mut conds, READY, true, "Converged", "m3", Some(2), at(30));
        assert_eq!(conds[0].last_transition_time, at(30));
        assert!(is_true(&conds, READY));
        assert!(!is_true(&conds, DEGRADED));
    }
}
