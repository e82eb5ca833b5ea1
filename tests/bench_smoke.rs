//! `multisite bench` runs end to end on small sizes and prints every figure (the
//! figures themselves are not judged here: they belong to release builds).

use std::process::Command;

#[test]
fn bench_prints_every_figure() {
    let dir = std::env::temp_dir().join(format!("multisite-bench-smoke-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_multisite"))
        .args([
            "bench",
            "--dir",
            dir.to_str().expect("a UTF-8 path"),
            "--import-changes",
            "2000",
            "--small-records",
            "100",
            "--large-records",
            "3000",
            "--incremental",
            "10",
            "--rounds",
            "2",
        ])
        .output()
        .expect("run multisite bench");
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for figure in [
        "changes/s",
        "plain SQLite bulk insert",
        "ratio import / plain",
        "bytes/change",
        "with 3000 records",
        "ratio large / small",
    ] {
        assert!(text.contains(figure), "missing {figure:?} in:\n{text}");
    }
}
