//! The layers of ARCHITECTURE.md, checked: a module never names a layer above its own.
//! (Until the layers are crates of their own, this test is what enforces them.)

use std::path::Path;

/// Each layer, lowest first, with the top-level modules it is made of.
const LAYERS: &[&[&str]] = &[
    &["api"],
    &["domain"],
    &["packet"],
    &["replica"],
    &["operator"],
    &["client", "gateway", "node"],
    &["dev"],
    &["cmd"],
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
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

#[test]
fn no_module_names_a_layer_above_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layer_of = |module: &str| LAYERS.iter().position(|l| l.contains(&module));
    let mut violations = Vec::new();
    let mut checked = 0;
    for (level, modules) in LAYERS.iter().enumerate() {
        for module in *modules {
            let mut files = Vec::new();
            let dir = src.join(module);
            if dir.is_dir() {
                rust_files(&dir, &mut files);
            }
            let file = src.join(format!("{module}.rs"));
            if file.is_file() {
                files.push(file);
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
                            path.strip_prefix(&src).unwrap_or(&path).display()
                        ));
                    }
                }
            }
        }
    }
    assert!(
        checked > 100,
        "only {checked} crate:: paths found; is the scan broken?"
    );
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_scan_sees_paths_and_skips_comments() {
    let found = named_modules("use crate::operator::x; // crate::dev\nlet a = crate::api::Site;");
    assert_eq!(found, [(1, "operator".to_string()), (2, "api".to_string())]);
}
