//! `multisite plan` as a user runs it: the examples, the JSON shape, and bad input.

use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn multisite(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_multisite"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    child.wait_with_output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn staged_example_lists_clients_then_repositories_then_databases() {
    let out = multisite(&["plan", "-f", "examples/staged-upgrade.yaml"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let phase_of = |line: &str| -> Option<&str> {
        [
            "client tiers",
            "schema repositories",
            "user databases",
            "paired move",
        ]
        .into_iter()
        .find(|p| line.contains(p))
    };
    let phases: Vec<&str> = text.lines().filter_map(phase_of).collect();
    let mut order = phases.clone();
    order.dedup();
    assert_eq!(
        order,
        [
            "client tiers",
            "schema repositories",
            "user databases",
            "paired move"
        ],
        "{text}"
    );
    assert_eq!(
        phases.iter().filter(|p| **p == "paired move").count(),
        6,
        "{text}"
    );
}

#[test]
fn refused_example_names_the_reason_and_exits_3() {
    let out = multisite(&["plan", "-f", "examples/refused-upgrade.yaml"], None);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("PLAN REFUSED"), "{text}");
    assert!(text.contains("AllAtOnce"), "{text}");
    assert!(
        text.contains("allowUnidirectionalReplication: true"),
        "{text}"
    );
}

#[test]
fn json_output_has_the_documented_shape() {
    let out = multisite(
        &[
            "plan",
            "-f",
            "examples/all-at-once-upgrade.yaml",
            "-o",
            "json",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(v["blocked"].is_null());
    let actions: Vec<&str> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions.first(), Some(&"pauseSync"));
    assert_eq!(actions.last(), Some(&"resumeSync"));
    assert_eq!(v["steps"][1]["replica"], "sampl-tokyo");
    assert_eq!(v["steps"][1]["featureLevel"], 8);

    let out = multisite(
        &["plan", "-f", "examples/refused-upgrade.yaml", "-o", "json"],
        None,
    );
    assert_eq!(out.status.code(), Some(3));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["steps"].as_array().unwrap().len(), 0);
    assert_eq!(v["blocked"]["kind"], "replication");
    assert!(
        v["blocked"]["reason"]
            .as_str()
            .unwrap()
            .contains("AllAtOnce")
    );
}

#[test]
fn standard_input_is_read_with_dash() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/staged-upgrade.yaml"),
    )
    .unwrap();
    let out = multisite(&["plan", "-f", "-"], Some(&text));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("upgradeClients"));
}

/// Bad input: each case is an edit of the staged example, and the error must name
/// the source, the document and the field.
#[test]
fn bad_input_names_file_document_and_field() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/staged-upgrade.yaml"),
    )
    .unwrap();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "FL 9",
            text.replace("featureLevel: 8", "featureLevel: 9"),
            "spec.featureLevel: Invalid value: 9",
        ),
        (
            "unknown field",
            text.replace("idPrefix: SAMPL", "idPrefix: SAMPL\n      colour: blue"),
            "spec.colour: unknown field",
        ),
        (
            "wrong type",
            text.replace("replicas: 2}", "replicas: two}"),
            "spec.clients[0].replicas: Invalid value: \"two\": must be of type integer",
        ),
        (
            "unquoted release",
            text.replace("release: \"8.0.1.1\"", "release: 8.0"),
            "quote it",
        ),
        (
            "another family",
            text.replacen(
                "family: sampl, site: paris",
                "family: other, site: paris",
                1,
            ),
            "item 3 (Replica tracker/sampl-paris): spec.family: this replica belongs to family \"other\"",
        ),
        (
            "unknown kind",
            text.replacen("kind: Replica\n", "kind: Replicas\n", 1),
            "kind: unknown kind \"Replicas\"",
        ),
        ("not YAML", "a: [b".to_string(), "not valid YAML"),
        (
            "no family",
            "apiVersion: v1\nkind: List\nitems: []\n".to_string(),
            "holds no ReplicaFamily",
        ),
    ];
    for (case, input, needle) in cases {
        let out = multisite(&["plan", "-f", "-"], Some(&input));
        assert_eq!(out.status.code(), Some(1), "{case}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("<stdin>: document 1"), "{case}: {err}");
        assert!(err.contains(needle), "{case}: expected {needle:?} in {err}");
        assert!(stdout(&out).is_empty(), "{case}: nothing on stdout");
    }
}

#[test]
fn a_missing_file_and_bad_flags_are_clear() {
    let out = multisite(&["plan", "-f", "no/such/file.yaml"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot read no/such/file.yaml"),
        "{}",
        stderr(&out)
    );
    let out = multisite(
        &["plan", "-f", "examples/staged-upgrade.yaml", "-o", "xml"],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("possible values: table, json"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn replacement_compatibility_data_is_used() {
    let dir = std::env::temp_dir().join(format!("multisite-compat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Data in which 8.0.1.1 cannot open FL 8 refuses the staged example's client tier.
    let builtin = include_str!("../crates/core/src/domain/compatibility.yaml");
    let edited = builtin.replace("featureLevels: [5, 6, 7, 8]", "featureLevels: [5, 6, 7]");
    let path = dir.join("compat.yaml");
    std::fs::write(&path, edited).unwrap();
    let out = multisite(
        &[
            "plan",
            "-f",
            "examples/staged-upgrade.yaml",
            "--compatibility",
            path.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stdout(&out).contains("client tier web"), "{}", stdout(&out));
    std::fs::write(&path, "releases: nope").unwrap();
    let out = multisite(
        &[
            "plan",
            "-f",
            "examples/staged-upgrade.yaml",
            "--compatibility",
            path.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("compat.yaml"), "{}", stderr(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}
