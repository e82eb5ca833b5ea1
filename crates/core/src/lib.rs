//! The core of multisite: what the product is, as pure code. No I/O, no clocks and no
//! async runtime, so every rule is tested exhaustively with tables and properties.
//!
//! Layers inside this crate (a module never names one above it):
//! 1. [`api`]: the custom resource types, manifest parsing and schema checks.
//! 2. [`domain`]: the rules: compatibility data, the upgrade planner, the link task
//!    scheduler, mastership.
//! 3. [`packet`]: the packet wire format.

pub mod api;
pub mod domain;
pub mod packet;
