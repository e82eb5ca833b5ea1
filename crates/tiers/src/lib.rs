//! The workloads beside the replicas: the client tiers' front end ([`client`]) and
//! the family's gateway to an outside system ([`gateway`]). Both talk to replicas
//! through the replica API's typed client only.

pub mod client;
pub mod gateway;
