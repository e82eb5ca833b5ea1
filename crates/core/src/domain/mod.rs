//! The rules of the product as pure code: no I/O, no async.

pub mod compat;
pub mod links;
pub mod mastership;
pub mod planner;
pub mod scheduler;
