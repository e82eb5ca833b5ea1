//! Bootstrapping a replica that runs as a workload: its pod starts with an empty data
//! directory and waits until the operator says whether it is the family's first replica
//! (`init`) or a copy of a live one (`cloneFrom`). The request travels to the pod; the
//! data of a clone flows from the source replica to the new one, never through the caller.

use serde::{Deserialize, Serialize};

/// `POST /v1/bootstrap`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BootstrapRequest {
    /// Must match the family the pod was started for.
    pub family: String,
    /// Must match the replica the pod was started for.
    pub replica: String,
    #[serde(flatten)]
    pub source: BootstrapSource,
}

/// Where the new replica's data comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BootstrapSource {
    /// The family's first replica: an empty database.
    Init {
        id_prefix: String,
        feature_level: i32,
    },
    /// A copy of the live replica at this URL, which then catches up through packets.
    CloneFrom(String),
}

/// What a waiting pod says about itself (`GET /v1/bootstrap`, and the body of its
/// `503` answer to `GET /v1/status`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapState {
    pub family: String,
    pub replica: String,
    /// Always `true` while the pod waits; lets a caller tell this answer from others.
    pub awaiting_bootstrap: bool,
    /// Set while a bootstrap runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<String>,
    /// Why the last attempt failed; the caller may ask again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Human-readable summary, also under `error` for callers that read error bodies.
    pub error: String,
}
