//! The layers of ARCHITECTURE.md, checked. Between crates the compiler keeps the order
//! once the dependency graph is right, so this checks the graph (from `cargo metadata`),
//! that the core crate builds without an async runtime (`cargo tree`), and, inside the
//! crates that hold more than one layer, that a module never names one above its own.

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace's crates, lowest layer first, each with the workspace crates it may
/// depend on (directly).
const CRATES: &[(&str, &[&str])] = &[
    ("multisite-core", &[]),
    ("multisite-replica", &["multisite-core"]),
    (
        "multisite-operator",
        &["multisite-core", "multisite-replica"],
    ),
    ("multisite-tiers", &["multisite-core", "multisite-replica"]),
    ("multisite-node", &["multisite-core"]),
    (
        "multisite-dev",
        &[
            "multisite-core",
            "multisite-replica",
            "multisite-operator",
            "multisite-node",
        ],
    ),
    (
        "multisite",
        &[
            "multisite-core",
            "multisite-replica",
            "multisite-operator",
            "multisite-tiers",
            "multisite-node",
            "multisite-dev",
        ],
    ),
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn cargo(args: &[&str]) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let out = Command::new(cargo)
        .args(args)
        .current_dir(root())
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("cargo prints UTF-8")
}

#[test]
fn each_crate_depends_only_on_the_layers_below_it() {
    let metadata: Value = serde_json::from_str(&cargo(&[
        "metadata",
        "--format-version",
        "1",
        "--no-deps",
        "--offline",
    ]))
    .expect("cargo metadata prints JSON");
    let packages = metadata["packages"].as_array().expect("a package list");
    let names: BTreeSet<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
    let declared: BTreeSet<&str> = CRATES.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, declared, "the workspace's crates and CRATES differ");
    let mut violations = Vec::new();
    for package in packages {
        let name = package["name"].as_str().unwrap_or_default();
        let allowed = CRATES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, allowed)| *allowed)
            .unwrap_or_default();
        for dependency in package["dependencies"].as_array().into_iter().flatten() {
            let on = dependency["name"].as_str().unwrap_or_default();
            if declared.contains(on) && !allowed.contains(&on) {
                violations.push(format!("{name} depends on {on}"));
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_core_crate_has_no_async_runtime() {
    let tree = cargo(&[
        "tree",
        "--offline",
        "-p",
        "multisite-core",
        "-e",
        "normal",
        "--prefix",
        "none",
    ]);
    let crates: BTreeSet<&str> = tree
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert!(crates.contains("serde"), "the tree lists nothing:\n{tree}");
    for runtime in ["tokio", "async-std", "futures", "hyper"] {
        assert!(
            !crates.contains(runtime),
            "multisite-core depends on {runtime}:\n{tree}"
        );
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("a source directory") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The uses of `crate::MODULE` in code (comments left out) of one file.
fn named_modules(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.push((n + 1, name));
            rest = after;
        }
    }
    found
}

/// The layers inside one crate, lowest first: the violations and the paths looked at.
fn violations_in(src: &Path, layers: &[&[&str]]) -> (Vec<String>, usize) {
    let layer_of = |module: &str| layers.iter().position(|l| l.contains(&module));
    let mut violations = Vec::new();
    let mut checked = 0;
    for (level, modules) in layers.iter().enumerate() {
        for module in *modules {
            let mut files = Vec::new();
            let dir = src.join(module);
            if dir.is_dir() {
                rust_files(&dir, &mut files);
            }
            assert!(!files.is_empty(), "no source for layer module {module}");
            for path in files {
                let text = std::fs::read_to_string(&path).expect("readable source");
                for (line, named) in named_modules(&text) {
                    checked += 1;
                    if let Some(other) = layer_of(&named)
                        && other > level
                    {
                        violations.push(format!(
                            "{}:{line}: {module} (layer {level}) uses crate::{named} (layer {other})",
                            path.strip_prefix(root()).unwrap_or(&path).display()
                        ));
                    }
                }
            }
        }
    }
    (violations, checked)
}

#[test]
fn inside_the_core_no_module_names_a_layer_above_its_own() {
    let (violations, checked) = violations_in(
        &root().join("crates/core/src"),
        &[&["api"], &["domain"], &["packet"]],
    );
    assert!(
        checked > 3,
        "only {checked} crate:: paths found; is the scan broken?"
    );
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_two_tiers_do_not_name_each_other() {
    let src = root().join("crates/tiers/src");
    for (one, other) in [("client", "gateway"), ("gateway", "client")] {
        let (violations, _) = violations_in(&src, &[&[other], &[one]]);
        assert!(violations.is_empty(), "{}", violations.join("\n"));
    }
}

#[test]
fn the_scan_sees_paths_and_skips_comments() {
    let found = named_modules("use crate::operator::x; // crate::dev\nlet a = crate::api::Site;");
    assert_eq!(found, [(1, "operator".to_string()), (2, "api".to_string())]);
}
