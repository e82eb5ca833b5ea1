//! multisite: a Kubernetes operator for fleets of replicated tracker databases.
//!
//! The layers are the crates of this workspace; each depends only on those below it,
//! so the compiler enforces the order:
//! 1. `multisite-core` ([`api`], [`domain`], [`packet`]): the custom resources, the rules
//!    and the packet format as pure code, without an async runtime.
//! 2. `multisite-replica` ([`replica`]): the replica server (storage, sync, HTTP API,
//!    the typed client).
//! 3. `multisite-operator` ([`operator`]): the controllers, the sync runner, leader
//!    election, metrics.
//! 4. `multisite-tiers` ([`client`], [`gateway`]) and `multisite-node` ([`node`]): the
//!    client tiers' front end, the family's gateway, the node agent.
//! 5. `multisite-dev` ([`dev`]): the embedded cluster (API server, workload runner).
//! 6. this crate: [`cmd`], what the command line runs (reads files, prints results), and
//!    the binary (clap only).
//!
//! The lower crates are re-exported under their layer names, so `multisite::replica`
//! is `multisite_replica`.

pub use multisite_core::{api, domain, packet};
pub use multisite_dev as dev;
pub use multisite_node as node;
pub use multisite_operator as operator;
pub use multisite_replica as replica;
pub use multisite_tiers::{client, gateway};

pub mod cmd;
