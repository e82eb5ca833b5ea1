//! Replica servers working as a family on loopback addresses: convergence by
//! pushes, mastership, feature levels, client releases, packet files, gaps and
//! cloning a live replica. Everything goes through the `multisite` CLI as a user
//! runs it (bulk writes go through the HTTP API).

mod common;

use common::{Family, assert_converged, json_of, path_str, push_all, run_bounded, text};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A family of three: tokyo made by `init` at `fl`, paris and austin cloned from it.
/// (Fields drop in order: the servers are killed before the directory goes.)
struct Three {
    tokyo: common::Server,
    paris: common::Server,
    austin: common::Server,
    family: Family,
}

fn three(test: &str, fl: i32) -> Three {
    let family = Family::new(test);
    family.init("tokyo", fl);
    let tokyo = family.serve("tokyo");
    family.clone_replica(&tokyo.url, "paris");
    family.clone_replica(&tokyo.url, "austin");
    let paris = family.serve("paris");
    let austin = family.serve("austin");
    Three {
        tokyo,
        paris,
        austin,
        family,
    }
}

fn epochs(status: &Value) -> &serde_json::Map<String, Value> {
    status["epochs"].as_object().expect("an epochs object")
}

#[test]
fn three_replicas_converge_after_changes_at_each_are_pushed_around() {
    let t = three("converge", 7);
    let f = &t.family;
    let urls = [
        t.tokyo.url.as_str(),
        t.paris.url.as_str(),
        t.austin.url.as_str(),
    ];

    let mut created = Vec::new();
    for (url, count) in [(urls[0], 4), (urls[1], 3), (urls[2], 2)] {
        for i in 0..count {
            created.push(f.create(url, &format!("made at {url} #{i}")));
        }
    }
    let unique: BTreeSet<&String> = created.iter().collect();
    assert_eq!(unique.len(), created.len(), "ids collide: {created:?}");
    // A change after creation, at each master, must travel too.
    for (url, id) in [
        (urls[0], &created[0]),
        (urls[1], &created[4]),
        (urls[2], &created[7]),
    ] {
        let out = f.update(url, id, "edited at its master");
        assert!(out.status.success(), "{}", text(&out.stderr));
    }

    push_all(f, &urls, 2);

    let digest = assert_converged(f, &urls);
    assert_eq!(digest.items, created.len() as u64);
    let wanted: BTreeSet<String> = created.iter().cloned().collect();
    for url in urls {
        let defects = f.defects(url);
        let held: BTreeSet<String> = defects.keys().cloned().collect();
        assert_eq!(held, wanted, "records at {url}");
        for id in [&created[0], &created[4], &created[7]] {
            assert_eq!(
                defects[id]["fields"]["headline"], "edited at its master",
                "{id} at {url}"
            );
        }
    }
    // The replicas' epoch tables agree too: each holds every origin's changes.
    let rows: Vec<Value> = urls.iter().map(|u| f.status(u)["epochs"].clone()).collect();
    assert!(
        rows.iter().all(|r| r == &rows[0]),
        "epochs differ: {rows:?}"
    );
    // Once converged, a push has nothing to send.
    for from in urls {
        for to in urls {
            if from != to {
                let report = f.push(from, to);
                assert_eq!(report["changesSent"], 0, "{from} -> {to}: {report}");
                assert_eq!(report["lag"], 0, "{from} -> {to}: {report}");
            }
        }
    }
}

#[test]
fn change_at_non_master_is_refused_and_mastership_move_takes_effect_on_import() {
    let t = three("mastership", 7);
    let f = &t.family;
    let (tokyo, paris, austin) = (
        t.tokyo.url.as_str(),
        t.paris.url.as_str(),
        t.austin.url.as_str(),
    );
    let id = f.create(tokyo, "mastered at tokyo");
    f.push(tokyo, paris);
    f.push(tokyo, austin);

    for url in [paris, austin] {
        let out = f.update(url, &id, "changed elsewhere");
        assert!(!out.status.success(), "update at {url} was accepted");
        let err = text(&out.stderr);
        assert!(err.contains("mastered at replica tokyo"), "{err}");
        let out = f.cli(&["records", "delete", "--replica", url, &id]);
        assert!(!out.status.success(), "delete at {url} was accepted");
        assert!(text(&out.stderr).contains("tokyo"), "{}", text(&out.stderr));
        let item = f.get(url, "record", &id).expect("still there");
        assert_eq!(item["fields"]["headline"], "mastered at tokyo");
        assert_eq!(item["master"], "tokyo");
    }
    // Only the master moves mastership.
    let err = f.cli_refused(&[
        "mastership",
        "move",
        "--replica",
        paris,
        &id,
        "--to",
        "paris",
    ]);
    assert!(err.contains("tokyo"), "{err}");

    let moved = f.cli_ok(&[
        "mastership",
        "move",
        "--replica",
        tokyo,
        &id,
        "--to",
        "paris",
    ]);
    assert!(
        moved.contains(&format!("{id} now mastered by paris")),
        "{moved}"
    );

    // The old master refuses at once, naming the new one.
    let out = f.update(tokyo, &id, "too late");
    assert!(!out.status.success(), "tokyo still accepted a change");
    assert!(
        text(&out.stderr).contains("mastered at replica paris"),
        "{}",
        text(&out.stderr)
    );
    // The new master refuses until it has imported the move.
    let out = f.update(paris, &id, "too early");
    assert!(
        !out.status.success(),
        "paris accepted a change before the move arrived"
    );
    assert!(
        text(&out.stderr).contains("mastered at replica tokyo"),
        "{}",
        text(&out.stderr)
    );

    f.push(tokyo, paris);
    let out = f.update(paris, &id, "changed at the new master");
    assert!(out.status.success(), "{}", text(&out.stderr));

    // austin hears of the move and the change only through paris.
    let before = f.get(austin, "record", &id).expect("at austin");
    assert_eq!(before["master"], "tokyo");
    f.push(paris, austin);
    let after = f.get(austin, "record", &id).expect("at austin");
    assert_eq!(after["master"], "paris");
    assert_eq!(after["fields"]["headline"], "changed at the new master");
    let out = f.update(austin, &id, "changed at austin");
    assert!(
        text(&out.stderr).contains("mastered at replica paris"),
        "{}",
        text(&out.stderr)
    );

    push_all(f, &[tokyo, paris, austin], 1);
    assert_converged(f, &[tokyo, paris, austin]);
    let at_tokyo = f.get(tokyo, "record", &id).expect("at tokyo");
    assert_eq!(at_tokyo["fields"]["headline"], "changed at the new master");
}

#[test]
fn moving_a_users_mastership_moves_the_workspace_items_they_created() {
    let t = three("user-move", 7);
    let f = &t.family;
    let (tokyo, paris) = (t.tokyo.url.as_str(), t.paris.url.as_str());
    let make = |args: &[&str]| f.create_item(tokyo, args);
    assert_eq!(make(&["--kind", "user", "--owner", "alice"]), "alice");
    assert_eq!(make(&["--kind", "user", "--owner", "bob"]), "bob");
    let query = make(&[
        "--kind",
        "workspace-item",
        "--type",
        "query",
        "--owner",
        "alice",
        "--field",
        "name=open defects",
    ]);
    let chart = make(&[
        "--kind",
        "workspace-item",
        "--type",
        "chart",
        "--owner",
        "alice",
    ]);
    let report = make(&[
        "--kind",
        "workspace-item",
        "--type",
        "report",
        "--owner",
        "bob",
    ]);
    f.push(tokyo, paris);

    let moved = f.cli_ok(&[
        "mastership",
        "move",
        "--replica",
        tokyo,
        "--kind",
        "user",
        "alice",
        "--to",
        "paris",
        "-o",
        "json",
    ]);
    let moved: BTreeSet<String> = json_of(&moved)
        .as_array()
        .expect("a list of moved items")
        .iter()
        .map(|i| i["id"].as_str().expect("an id").to_string())
        .collect();
    let expected: BTreeSet<String> = ["alice".to_string(), query.clone(), chart.clone()].into();
    assert_eq!(moved, expected, "bob's report must stay");

    let master = |url: &str, kind: &str, id: &str| -> String {
        let item = f
            .get(url, kind, id)
            .unwrap_or_else(|| panic!("{id} missing at {url}"));
        item["master"].as_str().expect("a master").to_string()
    };
    assert_eq!(master(tokyo, "workspace-item", &query), "paris");
    assert_eq!(master(tokyo, "workspace-item", &chart), "paris");
    assert_eq!(master(tokyo, "workspace-item", &report), "tokyo");
    assert_eq!(master(tokyo, "user", "bob"), "tokyo");

    let edit = |url: &str, id: &str| {
        f.cli(&[
            "records",
            "update",
            "--replica",
            url,
            "--kind",
            "workspace-item",
            id,
            "--field",
            "name=renamed",
        ])
    };
    let out = edit(tokyo, &query);
    assert!(
        !out.status.success(),
        "tokyo changed alice's query after the move"
    );
    assert!(text(&out.stderr).contains("paris"), "{}", text(&out.stderr));
    let out = edit(tokyo, &report);
    assert!(out.status.success(), "bob's report: {}", text(&out.stderr));

    f.push(tokyo, paris);
    assert_eq!(master(paris, "user", "alice"), "paris");
    assert_eq!(master(paris, "workspace-item", &query), "paris");
    let out = edit(paris, &query);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = edit(paris, &report);
    assert!(!out.status.success(), "paris changed bob's report");
    f.push(paris, tokyo);
    assert_converged(f, &[tokyo, paris]);
}

/// Workspace items follow the ordinary rule: one whose mastership was moved on its own
/// (so that users elsewhere can change it) is changed at its new master although its
/// owner's user record stays where it was; one without an owner is changed at its master.
#[test]
fn a_moved_workspace_item_is_changed_at_its_new_master_and_an_ownerless_one_at_its_master() {
    let t = three("workspace-rule", 7);
    let f = &t.family;
    let (tokyo, paris) = (t.tokyo.url.as_str(), t.paris.url.as_str());
    let create = |args: &[&str]| f.create_item(tokyo, args);
    assert_eq!(create(&["--kind", "user", "--owner", "alice"]), "alice");
    let query = create(&[
        "--kind",
        "workspace-item",
        "--type",
        "query",
        "--owner",
        "alice",
    ]);
    let ownerless = create(&["--kind", "workspace-item", "--type", "report"]);
    let edit = |url: &str, id: &str, value: &str| {
        f.cli(&[
            "records",
            "update",
            "--replica",
            url,
            "--kind",
            "workspace-item",
            id,
            "--field",
            &format!("name={value}"),
        ])
    };
    let out = edit(tokyo, &ownerless, "edited at its master");
    assert!(out.status.success(), "ownerless: {}", text(&out.stderr));

    f.push(tokyo, paris);
    f.cli_ok(&[
        "mastership",
        "move",
        "--replica",
        tokyo,
        "--kind",
        "workspace-item",
        &query,
        "--to",
        "paris",
    ]);
    f.push(tokyo, paris);
    let out = edit(paris, &query, "edited at its new master");
    assert!(
        out.status.success(),
        "alice's query at paris, her user record at tokyo: {}",
        text(&out.stderr)
    );
    let out = edit(tokyo, &query, "edited at the old master");
    assert!(
        !out.status.success(),
        "tokyo changed the query after the move"
    );
    assert!(text(&out.stderr).contains("paris"), "{}", text(&out.stderr));
    f.push(paris, tokyo);
    let at_tokyo = f
        .get(tokyo, "workspace-item", &query)
        .expect("the query at tokyo");
    assert_eq!(at_tokyo["fields"]["name"], "edited at its new master");
    assert_converged(f, &[tokyo, paris]);

    // A client tier over tokyo lists the workspace items, the query marked as locked
    // (mastered at paris), the report not.
    let listen = format!("{}:8080", f.ip("web"));
    let tier = f.spawn(&[
        "client",
        "--replica",
        tokyo,
        "--release",
        "8.0.1.1",
        "--family",
        "workspace-rule",
        "--tier",
        "web",
        "--listen",
        &listen,
    ]);
    let get = |path: &str| -> Option<String> {
        let out = run_bounded(
            {
                let mut curl = std::process::Command::new("curl");
                curl.args(["-sf", &format!("http://{listen}{path}")]);
                curl
            },
            Duration::from_secs(10),
        );
        out.status.success().then(|| text(&out.stdout))
    };
    let started = std::time::Instant::now();
    let listed = loop {
        if let Some(body) = get("/api/workspace") {
            break json_of(&body);
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the client tier did not answer"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let locked = |id: &str| {
        listed["items"]
            .as_array()
            .and_then(|items| items.iter().find(|i| i["id"] == id))
            .map(|i| (i["locked"].clone(), i["master"].clone()))
    };
    assert_eq!(
        locked(&query),
        Some((json!(true), json!("paris"))),
        "{listed}"
    );
    assert_eq!(
        locked(&ownerless),
        Some((json!(false), json!("tokyo"))),
        "{listed}"
    );
    let page = get("/workspace").expect("the workspace page");
    let row = page
        .lines()
        .flat_map(|l| l.split("<tr"))
        .find(|r| r.contains(&format!("id=\"{query}\"")))
        .unwrap_or_default()
        .to_string();
    assert!(row.contains("🔒 mastered at paris"), "{page}");
    let _ = tier.kill();
}

/// `records update --mastership` changes a record and hands it to another replica in one
/// change: refused at a replica that is not the master, and at the new master the change
/// and the mastership arrive together.
#[test]
fn a_change_can_move_the_records_mastership() {
    let t = three("change-moves", 7);
    let f = &t.family;
    let (tokyo, paris) = (t.tokyo.url.as_str(), t.paris.url.as_str());
    let id = f.create(tokyo, "assign me");
    f.push(tokyo, paris);
    let refused = f.cli_refused(&[
        "records",
        "update",
        "--replica",
        paris,
        &id,
        "--field",
        "state=assigned",
        "--mastership",
        "austin",
    ]);
    assert!(refused.contains("mastered at replica tokyo"), "{refused}");
    f.cli_ok(&[
        "records",
        "update",
        "--replica",
        tokyo,
        &id,
        "--field",
        "state=assigned",
        "--mastership",
        "paris",
    ]);
    let at_tokyo = f.get(tokyo, "record", &id).expect("at tokyo");
    assert_eq!(at_tokyo["master"], "paris");
    f.push(tokyo, paris);
    let at_paris = f.get(paris, "record", &id).expect("at paris");
    assert_eq!(
        (&at_paris["master"], &at_paris["fields"]["state"]),
        (&json!("paris"), &json!("assigned"))
    );
    let out = f.update(paris, &id, "fixed at paris");
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn feature_level_raise_holds_newer_packets_until_the_receiver_is_upgraded() {
    let f = Family::new("feature-levels");
    f.init("tokyo", 7);
    let tokyo_server = f.serve("tokyo");
    f.clone_replica(&tokyo_server.url, "paris");
    let paris_server = f.serve("paris");
    let (tokyo, paris) = (tokyo_server.url.as_str(), paris_server.url.as_str());
    let upgrade = |url: &str, flag: &str, level: &str| {
        f.cli(&["replica", "upgrade", "--replica", url, flag, level])
    };
    let levels = |url: &str| -> (i64, i64) {
        let s = f.status(url);
        (
            s["schemaRepositoryFeatureLevel"].as_i64().expect("a level"),
            s["userDatabaseFeatureLevel"].as_i64().expect("a level"),
        )
    };

    // Lowering and pairs Table 2 does not list are refused, and change nothing.
    for (flag, level, says) in [
        ("--user-database", "9", "raise it before the user database"),
        ("--user-database", "8", "raise it before the user database"),
        ("--schema-repository", "6", "only go up"),
        ("--schema-repository", "7", "only go up"),
        ("--user-database", "6", "only go up"),
        ("--schema-repository", "9", "no pair"),
    ] {
        let out = upgrade(paris, flag, level);
        assert!(!out.status.success(), "{flag} {level} was accepted");
        let err = text(&out.stderr);
        assert!(
            err.contains("upgrade refused") && err.contains(says),
            "{flag} {level}: {err}"
        );
    }
    assert_eq!(levels(paris), (7, 7));

    // A change at paris waits for tokyo across the raise.
    let from_paris = f.create(paris, "made at (7,7)");

    let out = upgrade(tokyo, "--schema-repository", "8");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status = f.status(tokyo);
    assert_eq!(levels(tokyo), (8, 7));
    assert_eq!(status["metaschemaVersion"], 23);
    assert!(status["packetVersion"].is_null(), "{status}");
    let blocked = status["syncBlocked"]
        .as_str()
        .expect("a reason")
        .to_string();
    assert!(blocked.contains("neither exports nor imports"), "{blocked}");
    let table = f.cli_ok(&["replica", "status", "--replica", tokyo]);
    assert!(table.contains("neither exports nor imports"), "{table}");
    assert!(table.contains("none (sync paused)"), "{table}");
    // Between the two raises it does not export...
    let err = f.cli_refused(&["sync", "push", "--from", tokyo, "--to", paris]);
    assert!(
        err.contains("not exporting") && err.contains(&blocked),
        "{err}"
    );
    let packet = f.root.join("between.packet");
    let err = f.cli_refused(&[
        "sync",
        "export",
        "--replica",
        tokyo,
        "--peer",
        "paris",
        "--out",
        path_str(&packet),
    ]);
    assert!(err.contains("neither exports nor imports"), "{err}");
    // ...nor import: what arrives is held.
    let report = f.push(paris, tokyo);
    assert!(
        report["held"]
            .as_str()
            .is_some_and(|r| r.contains("neither")),
        "{report}"
    );
    assert!(f.get(tokyo, "record", &from_paris).is_none());
    // Nor may anything be raised but its user database.
    let out = upgrade(tokyo, "--schema-repository", "9");
    assert!(!out.status.success());

    let out = upgrade(tokyo, "--user-database", "8");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status = f.status(tokyo);
    assert_eq!(levels(tokyo), (8, 8));
    assert!(status["syncBlocked"].is_null(), "{status}");
    assert_eq!(status["packetVersion"]["creates"], 12);
    // The packet held during the raise came in with the upgrade.
    assert_eq!(status["heldPackets"], 0, "{status}");
    assert!(f.get(tokyo, "record", &from_paris).is_some());
    let out = upgrade(tokyo, "--user-database", "7");
    assert!(
        text(&out.stderr).contains("only go up"),
        "{}",
        text(&out.stderr)
    );

    // A packet of version 12 is held at (7,7), reported, and not imported.
    let id = f.create(tokyo, "made at (8,8)");
    let report = f.push(tokyo, paris);
    let reason = report["held"].as_str().expect("held").to_string();
    assert!(reason.contains("packet version 12"), "{reason}");
    let status = f.status(paris);
    assert_eq!(status["heldPackets"], 1, "{status}");
    assert_eq!(status["held"][0]["sender"], "tokyo");
    assert_eq!(status["held"][0]["packetVersion"], 12);
    assert!(
        status["held"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not accepted")),
        "{status}"
    );
    let table = f.cli_ok(&["replica", "status", "--replica", paris]);
    assert!(table.contains("held packets:       1"), "{table}");
    assert!(
        f.get(paris, "record", &id).is_none(),
        "{id} was imported at (7,7)"
    );
    assert_ne!(f.digest(paris).digest, f.digest(tokyo).digest);
    // Pushing again re-sends the same changes; the held copies do not pile up.
    f.push(tokyo, paris);
    f.push(tokyo, paris);
    assert_eq!(
        f.status(paris)["heldPackets"],
        1,
        "held packets are not duplicated"
    );

    // First step of paris's raise: still held.
    let out = upgrade(paris, "--schema-repository", "8");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(f.status(paris)["heldPackets"], 1);
    assert!(f.get(paris, "record", &id).is_none());
    // Second step: imported by the upgrade itself, no push needed.
    let out = upgrade(paris, "--user-database", "8");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status = f.status(paris);
    assert_eq!(status["heldPackets"], 0, "{status}");
    let item = f
        .get(paris, "record", &id)
        .expect("imported after the upgrade");
    assert_eq!(item["fields"]["headline"], "made at (8,8)");
    assert_converged(&f, &[tokyo, paris]);
}

#[test]
fn client_release_that_cannot_open_the_feature_level_is_refused() {
    let f = Family::new("releases");
    f.init("tokyo", 7);
    let server = f.serve("tokyo");
    let tokyo = server.url.as_str();
    let id = f.create(tokyo, "visible to 7.1 and newer");
    let before = f.digest(tokyo);

    let get = |release: Option<&str>| {
        let mut args = vec!["records", "get", "--replica", tokyo, &id];
        if let Some(r) = release {
            args.extend(["--release", r]);
        }
        f.cli(&args)
    };
    for old in ["7.0.1.0", "7.0.0", "2003"] {
        let out = get(Some(old));
        assert!(!out.status.success(), "{old} opened an FL 7 replica");
        let err = text(&out.stderr);
        assert!(err.contains(old), "{err}");
        // The releases it names are ones `--release` takes.
        for newer in ["7.1", "8.0", "8.0.1.1"] {
            assert!(
                err.contains(newer),
                "the refusal does not name {newer}: {err}"
            );
        }
    }
    let out = f.cli(&[
        "records",
        "create",
        "--replica",
        tokyo,
        "--type",
        "Defect",
        "--release",
        "7.0.1.0",
    ]);
    assert!(!out.status.success(), "an old client created a record");
    assert_eq!(
        f.digest(tokyo),
        before,
        "a refused create changed the replica"
    );
    let err = text(&get(Some("6.5")).stderr);
    assert!(err.contains("not in the compatibility data"), "{err}");

    for ok in [
        None,
        Some("7.1"),
        Some("7.1.2"),
        Some("8.0"),
        Some("8.0.1.1"),
    ] {
        let out = get(ok);
        assert!(out.status.success(), "{ok:?}: {}", text(&out.stderr));
        assert!(
            text(&out.stdout).starts_with(&id),
            "{ok:?}: {}",
            text(&out.stdout)
        );
    }

    // At FL 8 only 8.0.1.1 opens the replica.
    f.cli_ok(&[
        "replica",
        "upgrade",
        "--replica",
        tokyo,
        "--schema-repository",
        "8",
    ]);
    f.cli_ok(&[
        "replica",
        "upgrade",
        "--replica",
        tokyo,
        "--user-database",
        "8",
    ]);
    let err = text(&get(Some("8.0")).stderr);
    assert!(
        err.contains("upgrade the client to 8.0.1.1") && !err.contains("7.1"),
        "{err}"
    );
    assert!(get(None).status.success());
}

#[test]
fn packet_files_import_once_and_damaged_misdirected_or_unauthorised_ones_are_refused() {
    let t = three("packet-files", 7);
    let f = &t.family;
    let (tokyo, paris, austin) = (
        t.tokyo.url.as_str(),
        t.paris.url.as_str(),
        t.austin.url.as_str(),
    );
    let ids: Vec<String> = (0..5)
        .map(|i| f.create(tokyo, &format!("by file {i}")))
        .collect();
    let packet = f.root.join("for-paris.packet");
    let packet_path = path_str(&packet);
    let out = f.cli_ok(&[
        "sync",
        "export",
        "--replica",
        tokyo,
        "--peer",
        "paris",
        "--out",
        packet_path,
    ]);
    assert!(out.contains("for paris"), "{out}");
    let bytes = std::fs::read(&packet).expect("the packet file");

    // Another replica does not take a packet made for paris.
    let err = f.cli_refused(&["sync", "import", "--replica", austin, packet_path]);
    assert!(
        err.contains("it is for replica paris, this is austin"),
        "{err}"
    );
    for id in &ids {
        assert!(f.get(austin, "record", id).is_none());
    }

    // A flipped byte anywhere past the header is caught.
    for at in [bytes.len() / 2, bytes.len() - 1] {
        let mut damaged = bytes.clone();
        damaged[at] ^= 0x40;
        let bad = f.root.join(format!("damaged-{at}.packet"));
        std::fs::write(&bad, &damaged).expect("write");
        let err = f.cli_refused(&["sync", "import", "--replica", paris, path_str(&bad)]);
        assert!(err.contains("corrupted"), "byte {at}: {err}");
    }
    let cut = f.root.join("cut.packet");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).expect("write");
    let err = f.cli_refused(&["sync", "import", "--replica", paris, path_str(&cut)]);
    assert!(err.contains("packet refused"), "{err}");
    assert_eq!(f.status(paris)["heldPackets"], 0);

    // The real one imports, and the answer is paris's own epoch row.
    let report = json_of(&f.cli_ok(&["sync", "import", "--replica", paris, packet_path]));
    assert_eq!(report["replica"], "paris");
    assert!(
        report["applied"].as_u64().is_some_and(|n| n >= 5),
        "{report}"
    );
    let paris_status = f.status(paris);
    assert_eq!(&report["epochs"], &paris_status["epochs"]);
    let tokyo_status = f.status(tokyo);
    assert_eq!(epochs(&report)["tokyo"], epochs(&tokyo_status)["tokyo"]);
    for id in &ids {
        assert!(f.get(paris, "record", id).is_some(), "{id}");
    }
    let digest = f.digest(paris);

    // Importing it again applies nothing.
    let again = json_of(&f.cli_ok(&["sync", "import", "--replica", paris, packet_path]));
    assert_eq!(again["applied"], 0, "{again}");
    assert_eq!(again["skipped"], report["applied"], "{again}");
    assert_eq!(again["epochs"], report["epochs"]);
    assert_eq!(f.digest(paris), digest);

    // Without the family's secret, nothing is answered.
    let other = f.root.join("other.secret");
    std::fs::write(&other, format!("{}\n", "5a".repeat(32))).expect("write");
    let wrong = path_str(&other);
    for args in [
        vec![
            "sync",
            "import",
            "--replica",
            paris,
            packet_path,
            "--secret-file",
            wrong,
        ],
        vec![
            "replica",
            "status",
            "--replica",
            paris,
            "--secret-file",
            wrong,
        ],
        vec!["digest", "--replica", paris, "--secret-file", wrong],
        vec![
            "records",
            "get",
            "--replica",
            paris,
            &ids[0],
            "--secret-file",
            wrong,
        ],
    ] {
        let err = f.cli_refused(&args);
        assert!(err.contains("wrong family token"), "{args:?}: {err}");
    }

    // A packet signed with another family's secret is refused even with the right token.
    let stranger = Family::new("packet-files-stranger");
    stranger.init("tokyo", 7);
    let stranger_tokyo = stranger.serve("tokyo");
    stranger.clone_replica(&stranger_tokyo.url, "paris");
    stranger.create(&stranger_tokyo.url, "forged");
    let forged = f.root.join("forged.packet");
    stranger.cli_ok(&[
        "sync",
        "export",
        "--replica",
        &stranger_tokyo.url,
        "--peer",
        "paris",
        "--out",
        path_str(&forged),
    ]);
    let err = f.cli_refused(&["sync", "import", "--replica", paris, path_str(&forged)]);
    assert!(
        err.contains("not signed with this family's secret"),
        "{err}"
    );
    assert_eq!(f.digest(paris), digest);
}

#[test]
fn packet_that_would_leave_a_gap_is_held_until_the_gap_is_filled() {
    let f = Family::new("gap");
    f.init("tokyo", 7);
    let tokyo_server = f.serve("tokyo");
    let tokyo = tokyo_server.url.clone();
    f.clone_replica(&tokyo, "paris");
    let mut paris = f.serve("paris");
    let export = |name: &str| {
        let file = f.root.join(name);
        f.cli_ok(&[
            "sync",
            "export",
            "--replica",
            &tokyo,
            "--peer",
            "paris",
            "--out",
            path_str(&file),
        ]);
        file
    };

    let first = f.create(&tokyo, "first");
    let p1 = export("p1.packet");
    // A backup of paris from before it got `first`.
    paris.kill();
    let backup = f.root.join("paris-backup");
    copy_dir(&paris.data, &backup);
    paris.restart();
    // paris takes `first`, and tokyo learns that it holds it...
    f.push(&tokyo, &paris.url);
    let second = f.create(&tokyo, "second");
    // ...so the next packet for paris carries only `second`.
    let p2 = export("p2.packet");
    // paris comes back from its backup: it lacks `first` again.
    paris.kill();
    std::fs::remove_dir_all(&paris.data).expect("remove paris's data");
    copy_dir(&backup, &paris.data);
    paris.restart();
    assert!(f.get(&paris.url, "record", &first).is_none());

    let report = json_of(&f.cli_ok(&["sync", "import", "--replica", &paris.url, path_str(&p2)]));
    let reason = report["held"].as_str().expect("held for a gap").to_string();
    assert!(reason.contains("gap"), "{reason}");
    assert_eq!(report["applied"], 0, "{report}");
    let status = f.status(&paris.url);
    assert_eq!(status["heldPackets"], 1, "{status}");
    assert!(f.get(&paris.url, "record", &second).is_none());

    let report = json_of(&f.cli_ok(&["sync", "import", "--replica", &paris.url, path_str(&p1)]));
    assert!(report["held"].is_null(), "{report}");
    assert_eq!(report["released"], 1, "{report}");
    assert_eq!(f.status(&paris.url)["heldPackets"], 0);
    assert!(f.get(&paris.url, "record", &first).is_some());
    assert!(f.get(&paris.url, "record", &second).is_some());
    assert_converged(&f, &[&tokyo, &paris.url]);
}

#[test]
fn clone_made_while_the_source_is_written_catches_up_by_push() {
    let f = Family::new("clone-live");
    f.init("tokyo", 7);
    let server = f.serve("tokyo");
    let tokyo = server.url.clone();
    let before = f.api().create_defects(&tokyo, 50, "before the clone");

    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let done = Arc::clone(&done);
        let api = f.api();
        let url = tokyo.clone();
        std::thread::spawn(move || {
            let mut ids = Vec::new();
            let mut after_done = 0;
            let deadline = Instant::now() + Duration::from_secs(60);
            // Writes until a few records after the clone finished, bounded in count and time.
            while ids.len() < 5000 && after_done < 20 && Instant::now() < deadline {
                if done.load(Ordering::SeqCst) {
                    after_done += 1;
                }
                let id = api
                    .try_create(&url, &format!("during the clone {}", ids.len()))
                    .expect("the source stays writable during the clone");
                ids.push(id);
            }
            ids
        })
    };
    // Let the writer get going before the copy starts.
    let start = Instant::now();
    while f.digest(&tokyo).items < 60 && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = f.clone_replica(&tokyo, "paris");
    assert!(out.contains("created replica paris"), "{out}");
    done.store(true, Ordering::SeqCst);
    let during = writer.join().expect("the writer");
    let paris_server = f.serve("paris");
    let paris = paris_server.url.clone();

    let copied = f.digest(&paris).items;
    let total = (before.len() + during.len()) as u64;
    assert!(
        copied >= 60 && copied < total,
        "the copy holds {copied} of {total}"
    );

    let mine = f.create(&paris, "made at the clone");
    f.push(&tokyo, &paris);
    f.push(&paris, &tokyo);
    let digest = assert_converged(&f, &[&tokyo, &paris]);
    assert_eq!(digest.items, total + 1);
    let held: BTreeSet<String> = f.defects(&paris).into_keys().collect();
    for id in before.iter().chain(&during).chain([&mine]) {
        assert!(held.contains(id), "{id} missing at paris");
    }
}

/// Copies a directory tree (a stopped replica's data, for backup and restore).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("create the copy");
    for entry in std::fs::read_dir(from).expect("read the directory") {
        let entry = entry.expect("an entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}

#[test]
fn a_removed_replica_hands_over_its_mastership_before_it_goes() {
    let t = three("remove", 7);
    let f = &t.family;
    let (tokyo, paris, austin) = (
        t.tokyo.url.as_str(),
        t.paris.url.as_str(),
        t.austin.url.as_str(),
    );
    let mine = f.create(austin, "made at austin");
    push_all(f, &[tokyo, paris, austin], 2);

    let said = f.cli_ok(&["replica", "remove", "--replica", austin, "--to", "tokyo"]);
    assert!(said.contains("mastership moved to tokyo"), "{said}");
    // The leaving replica makes no more changes, and names why.
    let err = f.cli_refused(&[
        "records",
        "create",
        "--replica",
        austin,
        "--type",
        "Defect",
        "--field",
        "headline=late",
    ]);
    assert!(err.contains("being removed"), "{err}");
    let status = f.status(austin);
    let pending: BTreeSet<String> = status["removalPending"]
        .as_array()
        .expect("removal pending")
        .iter()
        .filter_map(|p| p.as_str().map(str::to_string))
        .collect();
    assert_eq!(
        pending,
        BTreeSet::from(["tokyo".to_string(), "paris".to_string()])
    );
    // Until tokyo imports the move nobody may change the record.
    assert!(!f.update(tokyo, &mine, "too early").status.success());
    f.push(austin, tokyo);
    f.push(austin, paris);
    let status = f.status(austin);
    assert_eq!(status["removalPending"], serde_json::json!([]), "{status}");
    let table = f.cli_ok(&["replica", "status", "--replica", austin]);
    assert!(table.contains("its data can be deleted"), "{table}");
    // tokyo masters the record now; paris learns of the move through tokyo or austin.
    assert!(f.update(tokyo, &mine, "changed at tokyo").status.success());
    f.push(tokyo, paris);
    let at_paris = f.get(paris, "record", &mine).expect("record at paris");
    assert_eq!(at_paris["master"], "tokyo");
    let members = f.status(paris)["peers"].clone();
    let austin_member = members
        .as_array()
        .expect("peers")
        .iter()
        .find(|p| p["name"] == "austin")
        .cloned()
        .expect("austin listed");
    assert_eq!(austin_member["active"], false, "{members}");
    // The name is not given out again.
    let again = f.data("austin-again");
    let err = f.cli_refused(&[
        "replica",
        "clone",
        "--from",
        tokyo,
        "--data",
        path_str(&again),
        "--replica",
        "austin",
    ]);
    assert!(err.contains("already a member"), "{err}");
    assert_converged(f, &[tokyo, paris]);
}

#[test]
fn a_schema_package_reaches_every_replica_and_writes_change_events() {
    let t = three("package", 7);
    let f = &t.family;
    let (tokyo, paris) = (t.tokyo.url.as_str(), t.paris.url.as_str());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/interop-package.yaml");
    // Only the replica that masters the schema repository applies packages.
    let err = f.cli_refused(&["schema", "apply", "--replica", paris, "-f", manifest]);
    assert!(err.contains("mastered at replica tokyo"), "{err}");
    let said = f.cli_ok(&["schema", "apply", "--replica", tokyo, "-f", manifest]);
    assert!(said.contains("schema version 2"), "{said}");
    let again = f.cli_ok(&["schema", "apply", "--replica", tokyo, "-f", manifest]);
    assert!(
        again.contains("schema version 2"),
        "applying twice changes nothing: {again}"
    );
    f.cli_ok(&[
        "replica",
        "upgrade",
        "--replica",
        tokyo,
        "--user-database-schema",
        "2",
    ]);

    // A record changed at tokyo writes a change event; both travel to paris, where
    // they wait until paris's user database has the new schema version.
    let id = f.create(tokyo, "with an event");
    let events = |url: &str| -> Vec<Value> {
        json_of(&f.cli_ok(&[
            "records",
            "query",
            "--replica",
            url,
            "--type",
            "ChangeEvent",
            "-o",
            "json",
        ]))
        .as_array()
        .cloned()
        .unwrap_or_default()
    };
    let at_tokyo = events(tokyo);
    assert_eq!(at_tokyo.len(), 1, "{at_tokyo:?}");
    assert_eq!(at_tokyo[0]["fields"]["record"], id.as_str());
    assert_eq!(at_tokyo[0]["fields"]["action"], "create");
    assert_eq!(at_tokyo[0]["master"], "tokyo");
    let report = f.push(tokyo, paris);
    assert!(
        report["held"]
            .as_str()
            .is_some_and(|r| r.contains("schema version 2")),
        "{report}"
    );
    let status = f.status(paris);
    assert_eq!(status["schemaVersion"], 2, "the package itself arrived");
    assert!(f.get(paris, "record", &id).is_none());
    f.cli_ok(&[
        "replica",
        "upgrade",
        "--replica",
        paris,
        "--user-database-schema",
        "2",
    ]);
    assert!(
        f.get(paris, "record", &id).is_some(),
        "imported after the upgrade"
    );

    // A change at paris writes an event mastered by tokyo (the gateway's replica by
    // default is the schema repository's master); only tokyo may delete it.
    f.update(paris, &id, "changed at paris");
    let moved = f.cli_ok(&[
        "mastership",
        "move",
        "--replica",
        tokyo,
        &id,
        "--to",
        "paris",
    ]);
    assert!(moved.contains("paris"), "{moved}");
    f.push(tokyo, paris);
    assert!(f.update(paris, &id, "changed at paris").status.success());
    let at_paris: Vec<Value> = events(paris)
        .into_iter()
        .filter(|e| e["fields"]["action"] == "modify")
        .collect();
    assert_eq!(at_paris.len(), 1, "{at_paris:?}");
    assert_eq!(at_paris[0]["master"], "tokyo");
    let event = at_paris[0]["id"].as_str().expect("event id").to_string();
    let err = f.cli_refused(&["records", "delete", "--replica", paris, &event]);
    assert!(err.contains("mastered at replica tokyo"), "{err}");
    f.push(paris, tokyo);
    f.cli_ok(&["records", "delete", "--replica", tokyo, &event]);
    f.push(tokyo, paris);
    assert_converged(f, &[tokyo, paris]);
}

#[test]
fn a_forced_takeover_needs_the_flag_and_a_master_declared_gone_and_is_recorded() {
    let mut t = three("takeover", 7);
    let (tokyo, paris) = (t.tokyo.url.clone(), t.paris.url.clone());
    let austin = t.austin.url.clone();
    let f = &t.family;
    let orphan = f.create(&austin, "mastered at austin");
    push_all(f, &[&tokyo, &paris, &austin], 2);
    // austin is lost for good.
    t.austin.kill();
    let f = &t.family;
    let err = f.cli_refused(&[
        "mastership",
        "move",
        "--replica",
        &tokyo,
        &orphan,
        "--to",
        "tokyo",
    ]);
    assert!(err.contains("force"), "without --force: {err}");
    let err = f.cli_refused(&[
        "mastership",
        "move",
        "--replica",
        &tokyo,
        &orphan,
        "--force",
    ]);
    assert!(
        err.contains("not removed"),
        "austin not declared gone: {err}"
    );
    let said = f.cli_ok(&["replica", "forget", "--replica", &tokyo, "austin"]);
    assert!(said.contains("gone"), "{said}");
    let moved = f.cli_ok(&[
        "mastership",
        "move",
        "--replica",
        &tokyo,
        &orphan,
        "--force",
    ]);
    assert!(moved.contains("now mastered by tokyo"), "{moved}");
    let history = json_of(&f.cli_ok(&["records", "history", "--replica", &tokyo, &orphan]));
    let last = history
        .as_array()
        .and_then(|h| h.last())
        .cloned()
        .expect("history");
    assert_eq!(last["forcedFrom"], "austin", "{history}");
    assert!(f.update(&tokyo, &orphan, "taken over").status.success());
    f.push(&tokyo, &paris);
    let at_paris = f.get(&paris, "record", &orphan).expect("at paris");
    assert_eq!(at_paris["master"], "tokyo");
    let err = f.cli_refused(&["replica", "forget", "--replica", &tokyo, "tokyo"]);
    assert!(err.contains("cannot declare itself gone"), "{err}");
}

#[test]
fn packet_files_carry_acknowledgements_back_and_clones_number_after_the_highest_id() {
    let t = three("files-ack", 7);
    let f = &t.family;
    let (tokyo, paris) = (t.tokyo.url.as_str(), t.paris.url.as_str());
    for i in 0..5 {
        f.create(tokyo, &format!("r{i}"));
    }
    let packet = f.data("first.pkt");
    let report = f.data("first.ack");
    f.cli_ok(&[
        "sync",
        "export",
        "--replica",
        tokyo,
        "--peer",
        "paris",
        "--out",
        path_str(&packet),
    ]);
    f.cli_ok(&[
        "sync",
        "import",
        "--replica",
        paris,
        path_str(&packet),
        "--report",
        path_str(&report),
    ]);
    // Without the acknowledgement tokyo would export the same changes again.
    let again = f.data("again.pkt");
    f.cli_ok(&[
        "sync",
        "export",
        "--replica",
        tokyo,
        "--peer",
        "paris",
        "--out",
        path_str(&again),
    ]);
    let unacknowledged = std::fs::metadata(&again).expect("packet").len();
    let said = f.cli_ok(&["sync", "acknowledge", "--replica", tokyo, path_str(&report)]);
    assert!(said.contains("tokyo recorded what paris holds"), "{said}");
    f.cli_ok(&[
        "sync",
        "export",
        "--replica",
        tokyo,
        "--peer",
        "paris",
        "--out",
        path_str(&again),
    ]);
    let acknowledged = std::fs::metadata(&again).expect("packet").len();
    assert!(
        acknowledged < unacknowledged,
        "{acknowledged} >= {unacknowledged}"
    );

    // A replica cloned now numbers its records after the highest number it holds.
    f.clone_replica(tokyo, "lyon");
    let lyon = f.serve("lyon");
    let id = f.create(&lyon.url, "at lyon");
    let number: u64 = id
        .trim_start_matches("SAMPL")
        .trim_end_matches(char::is_alphabetic)
        .parse()
        .expect("a number");
    assert!(number > 5, "{id}");

    // A user deleted and created again exists again.
    f.cli_ok(&[
        "records",
        "create",
        "--replica",
        tokyo,
        "--kind",
        "user",
        "--owner",
        "alice",
    ]);
    f.cli_ok(&[
        "records",
        "delete",
        "--replica",
        tokyo,
        "--kind",
        "user",
        "alice",
    ]);
    f.cli_ok(&[
        "records",
        "create",
        "--replica",
        tokyo,
        "--kind",
        "user",
        "--owner",
        "alice",
    ]);
    let alice = f.get(tokyo, "user", "alice").expect("alice");
    assert!(alice.get("deleted").is_none_or(|d| d == false), "{alice}");
}
