//! Which sync links a family has: one directed link per ordered pair of replicas that
//! exchange packets, from its topology, with each link's own settings.
//!
//! - Mesh: every replica sends to every other.
//! - HubAndSpoke: the hub sends to each spoke and each spoke to the hub; spokes reach
//!   each other through the hub. A hub that is not among the replicas gives no links
//!   (the family reports it instead of guessing another hub).
//!
//! Links are directed because the source's tasks are: a task on A->B brings B what A has.

use std::collections::BTreeMap;

/// The topology, as the family's spec names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topology {
    Mesh,
    HubAndSpoke { hub: String },
}

/// One directed link.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Link {
    pub from: String,
    pub to: String,
}

impl Link {
    pub fn new(from: impl Into<String>, to: impl Into<String>) -> Self {
        Link {
            from: from.into(),
            to: to.into(),
        }
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}->{}", self.from, self.to)
    }
}

/// A link's own settings (both default to on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkSettings {
    pub enabled: bool,
    pub automatic: bool,
}

impl Default for LinkSettings {
    fn default() -> Self {
        LinkSettings {
            enabled: true,
            automatic: true,
        }
    }
}

/// Why a family has no links where it should.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error("sync.hub names {hub}, which is not a replica of this family")]
    UnknownHub { hub: String },
}

/// The links between `replicas` (names; order and duplicates do not matter), each with
/// its settings from `overrides` (links named there that do not exist are ignored).
pub fn links(
    topology: &Topology,
    replicas: &[String],
    overrides: &BTreeMap<Link, LinkSettings>,
) -> Result<BTreeMap<Link, LinkSettings>, TopologyError> {
    let mut names: Vec<&String> = replicas.iter().collect();
    names.sort();
    names.dedup();
    let mut out = BTreeMap::new();
    let mut add = |from: &str, to: &str| {
        let link = Link::new(from, to);
        let settings = overrides.get(&link).copied().unwrap_or_default();
        out.insert(link, settings);
    };
    match topology {
        Topology::Mesh => {
            for from in &names {
                for to in &names {
                    if from != to {
                        add(from, to);
                    }
                }
            }
        }
        Topology::HubAndSpoke { hub } => {
            if names.len() > 1 && !names.contains(&hub) {
                return Err(TopologyError::UnknownHub { hub: hub.clone() });
            }
            for spoke in names.iter().filter(|n| **n != hub) {
                add(hub, spoke);
                add(spoke, hub);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, VecDeque};

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn table() {
        let hub = |h: &str| Topology::HubAndSpoke { hub: h.into() };
        type Case = (
            Topology,
            Vec<&'static str>,
            Vec<(&'static str, &'static str)>,
        );
        let cases: Vec<Case> = vec![
            (Topology::Mesh, vec![], vec![]),
            (Topology::Mesh, vec!["a"], vec![]),
            (Topology::Mesh, vec!["b", "a"], vec![("a", "b"), ("b", "a")]),
            (
                Topology::Mesh,
                vec!["a", "b", "c"],
                vec![
                    ("a", "b"),
                    ("a", "c"),
                    ("b", "a"),
                    ("b", "c"),
                    ("c", "a"),
                    ("c", "b"),
                ],
            ),
            (hub("a"), vec!["a"], vec![]),
            (
                hub("b"),
                vec!["a", "b", "c"],
                vec![("a", "b"), ("b", "a"), ("b", "c"), ("c", "b")],
            ),
        ];
        for (topology, replicas, expected) in cases {
            let got: Vec<(String, String)> = links(&topology, &names(&replicas), &BTreeMap::new())
                .expect("valid")
                .into_keys()
                .map(|l| (l.from, l.to))
                .collect();
            let expected: Vec<(String, String)> = expected
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            assert_eq!(got, expected, "{topology:?} over {replicas:?}");
        }
    }

    #[test]
    fn unknown_hub_is_an_error_not_a_guess() {
        let err = links(
            &Topology::HubAndSpoke { hub: "z".into() },
            &names(&["a", "b"]),
            &BTreeMap::new(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "sync.hub names z, which is not a replica of this family"
        );
    }

    #[test]
    fn overrides_apply_to_their_link_only() {
        let mut overrides = BTreeMap::new();
        let off = LinkSettings {
            enabled: false,
            automatic: true,
        };
        overrides.insert(Link::new("a", "b"), off);
        overrides.insert(Link::new("a", "zz"), off);
        let got = links(&Topology::Mesh, &names(&["a", "b"]), &overrides).expect("valid");
        assert_eq!(got.len(), 2);
        assert_eq!(got[&Link::new("a", "b")], off);
        assert_eq!(got[&Link::new("b", "a")], LinkSettings::default());
    }

    /// Every replica's changes can reach every other replica along the links.
    fn connected(links: &BTreeMap<Link, LinkSettings>, replicas: &BTreeSet<String>) -> bool {
        replicas.iter().all(|start| {
            let mut seen = BTreeSet::from([start.clone()]);
            let mut queue = VecDeque::from([start.clone()]);
            while let Some(at) = queue.pop_front() {
                for link in links.keys().filter(|l| l.from == at) {
                    if seen.insert(link.to.clone()) {
                        queue.push_back(link.to.clone());
                    }
                }
            }
            seen == *replicas
        })
    }

    proptest! {
        #[test]
        fn both_topologies_connect_every_replica(
            set in proptest::collection::btree_set("[a-e]{1,2}", 1..8),
            hub_index in 0usize..8,
        ) {
            let replicas: Vec<String> = set.iter().cloned().collect();
            let hub = replicas[hub_index % replicas.len()].clone();
            for topology in [Topology::Mesh, Topology::HubAndSpoke { hub: hub.clone() }] {
                let got = links(&topology, &replicas, &BTreeMap::new()).expect("valid");
                prop_assert!(connected(&got, &set));
                prop_assert!(got.keys().all(|l| l.from != l.to && set.contains(&l.from) && set.contains(&l.to)));
                if let Topology::HubAndSpoke { .. } = topology {
                    prop_assert!(got.keys().all(|l| l.from == hub || l.to == hub));
                    prop_assert_eq!(got.len(), 2 * (replicas.len() - 1));
                } else {
                    prop_assert_eq!(got.len(), replicas.len() * (replicas.len() - 1));
                }
            }
        }
    }
}
