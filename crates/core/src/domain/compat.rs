//! The compatibility data: which client releases open which feature levels
//! (Table 1), and which packet versions a replica creates and accepts for each
//! pair of feature levels (Table 2).
//!
//! The tables are data, not code: the built-in document ([`BUILTIN_YAML`]) is
//! embedded in the binary, and a replacement can be loaded at run time, so a new
//! release is a change of data.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;

/// The built-in compatibility document (Tables 1 and 2 of the vendor's documentation).
pub const BUILTIN_YAML: &str = include_str!("compatibility.yaml");

/// A feature level: the features and data layout of a database.
pub type FeatureLevel = i32;

/// A packet format version.
pub type PacketVersion = i32;

/// The feature levels of one replica: its schema repository and its user database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlPair {
    pub schema_repository: FeatureLevel,
    pub user_database: FeatureLevel,
}

impl FlPair {
    pub const fn new(schema_repository: FeatureLevel, user_database: FeatureLevel) -> Self {
        FlPair {
            schema_repository,
            user_database,
        }
    }
}

impl fmt::Display for FlPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({},{})", self.schema_repository, self.user_database)
    }
}

/// One row of Table 1: a release, the metaschema it uses and the feature levels it opens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReleaseRow {
    /// The release as the table names it, e.g. `7.1.x`.
    pub release: String,
    /// Version prefixes this row covers: `7.1` covers `7.1`, `7.1.2`, `7.1.2.3`.
    pub matches: Vec<String>,
    pub metaschema: i32,
    pub feature_levels: Vec<FeatureLevel>,
}

/// One row of Table 2.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PacketRow {
    pub schema_repository: FeatureLevel,
    pub user_database: FeatureLevel,
    pub creates: PacketVersion,
    pub accepts: Vec<PacketVersion>,
}

/// The document as written in YAML.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompatibilityDocument {
    /// Oldest release first; the last row is the newest release.
    pub releases: Vec<ReleaseRow>,
    pub packet_versions: Vec<PacketRow>,
}

/// Why a compatibility document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompatError {
    #[error("the compatibility data is not valid YAML of the expected shape: {0}")]
    Parse(String),
    #[error("the compatibility data lists no releases")]
    NoReleases,
    #[error("release {release}: {problem}")]
    BadRelease { release: String, problem: String },
    #[error("packet version row {pair}: {problem}")]
    BadPacketRow { pair: FlPair, problem: String },
}

/// Why a release could not be looked up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    #[error(
        "release {0:?} is not in the compatibility data (known: {1}); use a listed release or add a row to the data"
    )]
    Unknown(String, String),
}

/// The validated, queryable compatibility data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compatibility {
    doc: CompatibilityDocument,
}

/// Parses a dotted version into numeric components; `None` when any component is not a number.
fn components(version: &str) -> Option<Vec<u64>> {
    version
        .trim()
        .split('.')
        .map(|part| part.parse::<u64>().ok())
        .collect()
}

impl Compatibility {
    /// The data built into the binary.
    pub fn builtin() -> Self {
        match Self::from_yaml(BUILTIN_YAML) {
            Ok(compat) => compat,
            // The embedded document is checked by tests; reaching this is a build defect.
            Err(err) => panic!("built-in compatibility data is invalid: {err}"),
        }
    }

    /// Loads and checks a compatibility document.
    pub fn from_yaml(text: &str) -> Result<Self, CompatError> {
        let doc: CompatibilityDocument =
            serde_saphyr::from_str(text).map_err(|e| CompatError::Parse(e.to_string()))?;
        Self::from_document(doc)
    }

    /// Checks a document: every release has version prefixes and feature levels,
    /// every packet row is a pair with the user database not above its schema
    /// repository, creates a version it accepts, and pairs are unique.
    pub fn from_document(doc: CompatibilityDocument) -> Result<Self, CompatError> {
        if doc.releases.is_empty() {
            return Err(CompatError::NoReleases);
        }
        let mut prefixes = BTreeSet::new();
        for row in &doc.releases {
            let bad = |problem: &str| CompatError::BadRelease {
                release: row.release.clone(),
                problem: problem.to_string(),
            };
            if row.matches.is_empty() {
                return Err(bad("lists no version prefixes under `matches`"));
            }
            for prefix in &row.matches {
                let Some(parts) = components(prefix) else {
                    return Err(bad(&format!(
                        "version prefix {prefix:?} is not a dotted number"
                    )));
                };
                if !prefixes.insert(parts) {
                    return Err(bad(&format!(
                        "version prefix {prefix:?} appears in two rows"
                    )));
                }
            }
            if row.feature_levels.is_empty() {
                return Err(bad("supports no feature level"));
            }
        }
        let mut pairs = BTreeSet::new();
        for row in &doc.packet_versions {
            let pair = FlPair::new(row.schema_repository, row.user_database);
            let bad = |problem: &str| CompatError::BadPacketRow {
                pair,
                problem: problem.to_string(),
            };
            if row.user_database > row.schema_repository {
                return Err(bad("a user database is never above its schema repository"));
            }
            if !row.accepts.contains(&row.creates) {
                return Err(bad("a replica must accept the version it creates"));
            }
            if !pairs.insert(pair) {
                return Err(bad("the pair appears twice"));
            }
        }
        Ok(Compatibility { doc })
    }

    pub fn document(&self) -> &CompatibilityDocument {
        &self.doc
    }

    /// The row of Table 1 that covers `release` (the longest matching prefix).
    pub fn release_row(&self, release: &str) -> Result<&ReleaseRow, ReleaseError> {
        let unknown = || {
            ReleaseError::Unknown(
                release.to_string(),
                self.doc
                    .releases
                    .iter()
                    .map(|r| r.release.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        };
        let wanted = components(release).ok_or_else(unknown)?;
        self.doc
            .releases
            .iter()
            .flat_map(|row| {
                row.matches
                    .iter()
                    .filter_map(move |p| components(p).map(|parts| (parts, row)))
            })
            .filter(|(parts, _)| wanted.starts_with(parts))
            .max_by_key(|(parts, _)| parts.len())
            .map(|(_, row)| row)
            .ok_or_else(unknown)
    }

    /// Whether `release` can open a database at feature level `fl`.
    pub fn release_supports(&self, release: &str, fl: FeatureLevel) -> Result<bool, ReleaseError> {
        Ok(self.release_row(release)?.feature_levels.contains(&fl))
    }

    /// The releases (as the table names them) that open feature level `fl`, oldest first.
    pub fn releases_supporting(&self, fl: FeatureLevel) -> Vec<&str> {
        self.doc
            .releases
            .iter()
            .filter(|r| r.feature_levels.contains(&fl))
            .map(|r| r.release.as_str())
            .collect()
    }

    /// Concrete versions (the first prefix of each row) of the releases that open
    /// feature level `fl`, oldest first: what a person can pass as a release.
    pub fn release_versions_supporting(&self, fl: FeatureLevel) -> Vec<&str> {
        self.doc
            .releases
            .iter()
            .filter(|r| r.feature_levels.contains(&fl))
            .filter_map(|r| r.matches.first().map(String::as_str))
            .collect()
    }

    /// The newest release in the data.
    pub fn newest_release(&self) -> &ReleaseRow {
        // `from_document` refuses an empty list.
        &self.doc.releases[self.doc.releases.len() - 1]
    }

    /// The newest release as a concrete version a client presents (e.g. `8.0.1.1`).
    pub fn newest_release_version(&self) -> String {
        let row = self.newest_release();
        row.matches
            .first()
            .cloned()
            .unwrap_or_else(|| row.release.clone())
    }

    /// The metaschema version a database at `fl` has: the lowest metaschema of a
    /// release that opens that level.
    pub fn metaschema_for(&self, fl: FeatureLevel) -> Option<i32> {
        self.doc
            .releases
            .iter()
            .filter(|r| r.feature_levels.contains(&fl))
            .map(|r| r.metaschema)
            .min()
    }

    fn packet_row(&self, pair: FlPair) -> Option<&PacketRow> {
        self.doc.packet_versions.iter().find(|r| {
            r.schema_repository == pair.schema_repository && r.user_database == pair.user_database
        })
    }

    /// Whether a replica may be at `pair` between steps (the pair is in Table 2).
    pub fn is_valid_pair(&self, pair: FlPair) -> bool {
        self.packet_row(pair).is_some()
    }

    /// Every valid pair, in table order.
    pub fn valid_pairs(&self) -> Vec<FlPair> {
        self.doc
            .packet_versions
            .iter()
            .map(|r| FlPair::new(r.schema_repository, r.user_database))
            .collect()
    }

    /// Every feature level named anywhere in the data, ascending.
    pub fn feature_levels(&self) -> Vec<FeatureLevel> {
        let mut levels: BTreeSet<FeatureLevel> = self
            .doc
            .releases
            .iter()
            .flat_map(|r| r.feature_levels.iter().copied())
            .collect();
        for row in &self.doc.packet_versions {
            levels.insert(row.schema_repository);
            levels.insert(row.user_database);
        }
        levels.into_iter().collect()
    }

    /// The packet version a replica at `pair` creates; `None` for a pair with no
    /// row, where the replica neither exports nor imports.
    pub fn creates(&self, pair: FlPair) -> Option<PacketVersion> {
        self.packet_row(pair).map(|r| r.creates)
    }

    /// The packet versions a replica at `pair` accepts (empty for a pair with no row).
    pub fn accepts(&self, pair: FlPair) -> &[PacketVersion] {
        self.packet_row(pair)
            .map(|r| r.accepts.as_slice())
            .unwrap_or(&[])
    }

    /// Whether a replica at `receiver` accepts packets of `version`.
    pub fn accepts_version(&self, receiver: FlPair, version: PacketVersion) -> bool {
        self.accepts(receiver).contains(&version)
    }

    /// Whether packets flow from a replica at `sender` to one at `receiver`.
    pub fn can_send(&self, sender: FlPair, receiver: FlPair) -> bool {
        self.creates(sender)
            .is_some_and(|version| self.accepts_version(receiver, version))
    }
}

/// An in-place feature level raise of one replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Raise {
    SchemaRepository(FeatureLevel),
    UserDatabase(FeatureLevel),
}

impl Compatibility {
    /// Whether a replica at `pair` may rest there between steps, or is between the
    /// two steps of a paired move (a listed pair is reachable by raising its user
    /// database).
    pub fn is_transient_pair(&self, pair: FlPair) -> bool {
        !self.is_valid_pair(pair)
            && (pair.user_database + 1..=pair.schema_repository)
                .any(|udb| self.is_valid_pair(FlPair::new(pair.schema_repository, udb)))
    }

    /// The pair after `raise`, or why the raise is refused: levels never go down, a
    /// user database never goes above its schema repository, and the result is a
    /// pair Table 2 lists, or the first step of a paired move.
    pub fn raise(&self, from: FlPair, raise: Raise) -> Result<FlPair, String> {
        match raise {
            Raise::SchemaRepository(level) => {
                if level <= from.schema_repository {
                    return Err(format!(
                        "the schema repository is at FL {}; feature levels only go up",
                        from.schema_repository
                    ));
                }
                if self.is_transient_pair(from) {
                    return Err(format!(
                        "the replica is at {from}, between the two steps of a paired move; raise its user database first"
                    ));
                }
                let to = FlPair::new(level, from.user_database);
                if self.is_valid_pair(to) || self.is_transient_pair(to) {
                    Ok(to)
                } else {
                    Err(format!(
                        "no pair with a schema repository at FL {level} can follow {from} (valid pairs: {})",
                        self.valid_pairs()
                            .iter()
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
            }
            Raise::UserDatabase(level) => {
                if level <= from.user_database {
                    return Err(format!(
                        "the user database is at FL {}; feature levels only go up",
                        from.user_database
                    ));
                }
                if level > from.schema_repository {
                    return Err(format!(
                        "the schema repository is at FL {}; raise it before the user database",
                        from.schema_repository
                    ));
                }
                let to = FlPair::new(from.schema_repository, level);
                if self.is_valid_pair(to) {
                    Ok(to)
                } else {
                    Err(format!("{to} is not a pair Table 2 lists"))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compat() -> Compatibility {
        Compatibility::builtin()
    }

    /// Table 1, row by row: (a release of that row, metaschema, feature levels).
    const TABLE_1: &[(&str, i32, &[FeatureLevel])] = &[
        ("2003.06.16", 22, &[5]),
        ("7.0.0.0", 22, &[5]),
        ("7.0.1.0", 22, &[5, 6]),
        ("7.1.2", 22, &[5, 6, 7]),
        ("7.1.0.0", 22, &[5, 6, 7]),
        ("8.0", 22, &[5, 6, 7]),
        ("8.0.0.4", 22, &[5, 6, 7]),
        ("8.0.1.1", 23, &[5, 6, 7, 8]),
    ];

    #[test]
    fn table_1_every_row() {
        let c = compat();
        for &(release, metaschema, levels) in TABLE_1 {
            let row = c.release_row(release).unwrap();
            assert_eq!(row.metaschema, metaschema, "metaschema of {release}");
            for fl in 1..=12 {
                assert_eq!(
                    c.release_supports(release, fl).unwrap(),
                    levels.contains(&fl),
                    "release {release} and FL {fl}"
                );
            }
        }
    }

    #[test]
    fn table_1_releases_supporting_each_level() {
        let c = compat();
        assert_eq!(
            c.releases_supporting(5),
            ["2003 .. 7.0.0.0", "7.0.1.0", "7.1.x", "8.0", "8.0.1.1"]
        );
        assert_eq!(
            c.releases_supporting(6),
            ["7.0.1.0", "7.1.x", "8.0", "8.0.1.1"]
        );
        assert_eq!(c.releases_supporting(7), ["7.1.x", "8.0", "8.0.1.1"]);
        assert_eq!(c.releases_supporting(8), ["8.0.1.1"]);
        assert!(c.releases_supporting(9).is_empty());
        assert_eq!(c.newest_release().release, "8.0.1.1");
    }

    #[test]
    fn metaschema_per_level() {
        let c = compat();
        for fl in 5..=7 {
            assert_eq!(c.metaschema_for(fl), Some(22), "FL {fl}");
        }
        assert_eq!(c.metaschema_for(8), Some(23));
        assert_eq!(c.metaschema_for(4), None);
    }

    #[test]
    fn unknown_releases_are_named() {
        let c = compat();
        for bad in ["6.9", "9.0.1", "", "8.x", "latest"] {
            let err = c.release_row(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
            assert!(err.contains("8.0.1.1"), "lists known releases: {err}");
        }
    }

    /// Table 2, row by row.
    const TABLE_2: &[(
        FeatureLevel,
        FeatureLevel,
        PacketVersion,
        std::ops::RangeInclusive<PacketVersion>,
    )] = &[
        (8, 8, 12, 6..=12),
        (7, 7, 11, 6..=11),
        (7, 6, 10, 6..=10),
        (7, 5, 9, 6..=9),
        (6, 6, 8, 6..=8),
        (6, 5, 7, 6..=7),
        (5, 5, 6, 6..=6),
    ];

    #[test]
    fn table_2_every_row() {
        let c = compat();
        for (sr, udb, creates, accepts) in TABLE_2.iter().cloned() {
            let pair = FlPair::new(sr, udb);
            assert!(c.is_valid_pair(pair));
            assert_eq!(c.creates(pair), Some(creates), "{pair}");
            for version in 1..=14 {
                assert_eq!(
                    c.accepts_version(pair, version),
                    accepts.contains(&version),
                    "{pair} accepting {version}"
                );
            }
        }
        assert_eq!(c.valid_pairs().len(), TABLE_2.len());
    }

    #[test]
    fn pairs_outside_table_2_are_invalid() {
        let c = compat();
        let listed: Vec<FlPair> = TABLE_2.iter().map(|r| FlPair::new(r.0, r.1)).collect();
        for sr in 1..=10 {
            for udb in 1..=10 {
                let pair = FlPair::new(sr, udb);
                assert_eq!(c.is_valid_pair(pair), listed.contains(&pair), "{pair}");
                if !listed.contains(&pair) {
                    assert_eq!(c.creates(pair), None);
                    assert!(c.accepts(pair).is_empty());
                }
            }
        }
        // The documented gap: (8,7) has no packet version.
        assert!(!c.is_valid_pair(FlPair::new(8, 7)));
    }

    #[test]
    fn lower_levels_send_to_higher_not_the_reverse() {
        let c = compat();
        assert!(c.can_send(FlPair::new(6, 6), FlPair::new(8, 8)));
        assert!(!c.can_send(FlPair::new(8, 8), FlPair::new(6, 6)));
        // The seed's example: (7,5) creates 9, which (6,6) does not accept.
        assert!(!c.can_send(FlPair::new(7, 5), FlPair::new(6, 6)));
        assert!(!c.can_send(FlPair::new(8, 7), FlPair::new(8, 8)));
    }

    #[test]
    fn raises_follow_table_2() {
        let c = compat();
        let ok = |from: (i32, i32), r: Raise| c.raise(FlPair::new(from.0, from.1), r);
        assert_eq!(
            ok((6, 6), Raise::SchemaRepository(7)),
            Ok(FlPair::new(7, 6))
        );
        assert_eq!(
            ok((7, 7), Raise::SchemaRepository(8)),
            Ok(FlPair::new(8, 7))
        );
        assert!(c.is_transient_pair(FlPair::new(8, 7)));
        assert_eq!(ok((8, 7), Raise::UserDatabase(8)), Ok(FlPair::new(8, 8)));
        assert!(ok((8, 7), Raise::SchemaRepository(9)).is_err());
        assert!(
            ok((6, 6), Raise::SchemaRepository(6))
                .unwrap_err()
                .contains("only go up")
        );
        assert!(
            ok((6, 6), Raise::UserDatabase(7))
                .unwrap_err()
                .contains("raise it before")
        );
        assert!(ok((7, 5), Raise::UserDatabase(5)).is_err());
        assert_eq!(ok((7, 5), Raise::UserDatabase(7)), Ok(FlPair::new(7, 7)));
        assert!(ok((6, 5), Raise::SchemaRepository(9)).is_err());
        // (8,6) is not listed and no user database raise of (8,6) stays below 8 validly
        // except to 8, so it is the first step of a paired move too.
        assert!(c.is_transient_pair(FlPair::new(8, 6)));
    }

    #[test]
    fn a_new_release_is_a_data_change() {
        let mut doc = compat().document().clone();
        doc.releases.push(ReleaseRow {
            release: "9.0".into(),
            matches: vec!["9.0".into()],
            metaschema: 24,
            feature_levels: vec![5, 6, 7, 8, 9],
        });
        doc.packet_versions.push(PacketRow {
            schema_repository: 9,
            user_database: 9,
            creates: 13,
            accepts: (6..=13).collect(),
        });
        let text = serde_saphyr::to_string(&doc).unwrap();
        let c = Compatibility::from_yaml(&text).unwrap();
        assert!(c.release_supports("9.0.1", 9).unwrap());
        assert_eq!(c.metaschema_for(9), Some(24));
        assert_eq!(c.newest_release().release, "9.0");
        assert!(c.can_send(FlPair::new(8, 8), FlPair::new(9, 9)));
    }

    #[test]
    fn bad_documents_are_refused_with_the_reason() {
        let base = compat().document().clone();
        let mut doc = base.clone();
        doc.packet_versions[0].user_database = 9;
        let err = Compatibility::from_document(doc).unwrap_err().to_string();
        assert!(err.contains("never above"), "{err}");

        let mut doc = base.clone();
        doc.packet_versions[0].accepts = vec![6];
        let err = Compatibility::from_document(doc).unwrap_err().to_string();
        assert!(err.contains("accept the version it creates"), "{err}");

        let mut doc = base.clone();
        doc.releases[1].matches.push("7.1".into());
        let err = Compatibility::from_document(doc).unwrap_err().to_string();
        assert!(err.contains("two rows"), "{err}");

        let err = Compatibility::from_yaml("releases: 3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid YAML"), "{err}");
        let err = Compatibility::from_yaml("releases: []\npacketVersions: []\nextra: 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("extra"), "{err}");
    }
}
