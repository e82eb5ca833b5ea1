//! multisite: a Kubernetes operator for fleets of replicated tracker databases.
//!
//! Layers (a module never imports from a layer above it):
//! 1. [`api`]: the custom resource types. No I/O.
//! 2. [`domain`]: the rules as pure code: compatibility data, the upgrade planner,
//!    the link task scheduler, mastership.
//! 3. [`cmd`]: what the command line runs (reads files, prints results).

pub mod api;
pub mod cmd;
pub mod domain;
pub mod packet;
pub mod replica;
