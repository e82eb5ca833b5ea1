//! multisite: a Kubernetes operator for fleets of replicated tracker databases.
//!
//! Layers (a module never imports from a layer above it):
//! 1. [`api`]: the custom resource types, manifest parsing and schema checks. No I/O.
//! 2. [`domain`]: the rules as pure code: compatibility data, the upgrade planner,
//!    the link task scheduler, mastership.
//! 3. [`packet`]: the packet wire format.
//! 4. [`replica`]: the replica server (storage, sync, HTTP API, client).
//! 5. [`operator`]: the controllers, the sync runner, leader election, metrics.
//! 6. [`client`], [`gateway`]: the client tiers' front end and the family's gateway.
//! 7. [`node`]: the node agent (a kubelet stand-in for a real API server); it
//!    lends [`dev`] the image map and the address rewrites.
//! 8. [`dev`]: the embedded cluster: API server, workload runner.
//! 9. [`cmd`]: what the command line runs (reads files, prints results).

pub mod api;
pub mod client;
pub mod cmd;
pub mod dev;
pub mod domain;
pub mod gateway;
pub mod node;
pub mod operator;
pub mod packet;
pub mod replica;
