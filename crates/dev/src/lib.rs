//! The embedded cluster behind `multisite dev`: an in-process stand-in for the Kubernetes
//! API server. This part holds the objects and their semantics, with no I/O.
//!
//! Where the store is simpler than Kubernetes (the HTTP layer and the docs pin each one):
//! - per-version storage: each group/version/plural is its own resource, with no conversion;
//! - no defaulting or schema validation of kinds; only the common metadata is validated,
//!   with messages worded like, not identical to, the real server's;
//! - namespaces are not checked to exist (the NamespaceLifecycle admission is not here);
//! - deletes are background-propagated only; `gracePeriodSeconds` and the orphan and
//!   foreground policies are not modelled; the garbage collector matches owners by uid alone;
//! - update never creates (no create-on-update), and a client cannot set or clear the
//!   deletion fields (they are silently kept);
//! - a watch or continue token from a version older than the one event window is 410
//!   Expired (one window for all resources, not per-resource caches); a watch from a
//!   future version returns the events after it instead of waiting;
//! - a list page ends with a continue token only when more objects match (the real
//!   server may give one ending in an empty page); field selectors take no escapes;
//! - a list is always served from the latest state (`resourceVersion`/`resourceVersionMatch`
//!   on a first page are not honoured).

pub mod apiserver;
pub mod cluster;
pub mod kube;
pub mod names;
pub mod objects;
pub mod selectors;
pub mod snapshot;
pub mod status;
pub mod watch;
pub mod workloads;
