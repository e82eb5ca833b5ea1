//! Replica servers killed with SIGKILL in the middle of work (import, export and
//! push, right after an acknowledged change, during an upgrade, during a clone),
//! then restarted: nothing committed is lost, nothing is half done, and the family
//! still converges. Each test is bounded: a few rounds and a deadline.

mod common;

use common::{Family, Server, assert_converged, path_str, push_all, text};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Records made at the source before a large transfer.
const BULK: usize = 3000;

/// Rounds of kill and restart per test.
const ROUNDS: usize = 5;

/// Wall-clock bound of each test's kill loop.
const LOOP_LIMIT: Duration = Duration::from_secs(60);

/// Delays at which to kill, spread over `span` (what one undisturbed run takes),
/// with a little jitter from the clock so runs differ.
fn kill_delays(span: Duration) -> Vec<Duration> {
    let jitter = u64::from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_micros())
            .unwrap_or(0),
    );
    let span_us = span.as_micros().max(1000) as u64;
    (0..ROUNDS as u64)
        .map(|i| {
            Duration::from_micros((span_us * (2 * i + 1)) / (2 * ROUNDS as u64) + jitter % 500)
        })
        .collect()
}

/// The Defects at `url`: their number, and this replica's epoch for `origin`.
fn held(f: &Family, url: &str, origin: &str) -> (usize, u64) {
    let count = f.defects(url).len();
    let epoch = f.status(url)["epochs"][origin].as_u64().unwrap_or(0);
    (count, epoch)
}

/// tokyo (init, FL 7) with [`BULK`] records, and `clones` cloned before they were made.
fn bulk_family(test: &str, clones: &[&str]) -> (Family, Server, Vec<Server>, Vec<String>) {
    let f = Family::new(test);
    f.init("tokyo", 7);
    let tokyo = f.serve("tokyo");
    for name in clones {
        f.clone_replica(&tokyo.url, name);
    }
    let servers = clones.iter().map(|n| f.serve(n)).collect();
    let ids = f.api().create_defects(&tokyo.url, BULK, "bulk");
    (f, tokyo, servers, ids)
}

/// Times one undisturbed push of everything from `from` to `to`.
fn timed_push(f: &Family, from: &str, to: &str) -> Duration {
    let start = Instant::now();
    let report = f.push(from, to);
    let took = start.elapsed();
    assert!(
        report["changesSent"]
            .as_u64()
            .is_some_and(|n| n >= BULK as u64),
        "{report}"
    );
    took
}

#[test]
fn receiver_killed_during_a_large_import_converges_without_loss_or_duplicates() {
    let (f, tokyo, mut servers, ids) = bulk_family("kill-receiver", &["paris", "austin"]);
    let mut austin = servers.pop().expect("austin");
    let mut paris = servers.pop().expect("paris");
    // How long the import takes when nothing goes wrong, measured on austin.
    let span = timed_push(&f, &tokyo.url, &austin.url);
    let (_, tokyo_epoch) = held(&f, &tokyo.url, "tokyo");
    let (_, start_epoch) = held(&f, &paris.url, "tokyo");

    let started = Instant::now();
    let mut outcomes = Vec::new();
    for delay in kill_delays(span) {
        if started.elapsed() > LOOP_LIMIT {
            break;
        }
        let target = paris.url.clone();
        let push = f.spawn(&["sync", "push", "--from", &tokyo.url, "--to", &target]);
        std::thread::sleep(delay);
        paris.kill();
        let out = push.finish(Duration::from_secs(60));
        paris.restart();
        // The import is one transaction: all of it or none of it.
        let (count, epoch) = held(&f, &paris.url, "tokyo");
        assert!(
            (count == 0 && epoch == start_epoch) || (count == BULK && epoch == tokyo_epoch),
            "after a kill at {delay:?} paris holds {count} records and epoch {epoch}"
        );
        if !out.status.success() {
            let err = text(&out.stderr);
            assert!(
                err.contains(&target),
                "the failure does not name paris: {err}"
            );
        }
        outcomes.push((delay, out.status.success(), count));
        if count == BULK {
            break;
        }
    }
    assert!(!outcomes.is_empty());

    f.push(&tokyo.url, &paris.url);
    let digest = assert_converged(&f, &[&tokyo.url, &paris.url, &austin.url]);
    assert_eq!(digest.items, BULK as u64);
    assert_eq!(f.defects(&paris.url).len(), BULK);
    assert_eq!(held(&f, &paris.url, "tokyo").1, tokyo_epoch);
    // Each record arrived once: one state in its history.
    for id in [&ids[0], &ids[BULK / 2], &ids[BULK - 1]] {
        let history =
            common::json_of(&f.cli_ok(&["records", "history", "--replica", &paris.url, id]));
        assert_eq!(history.as_array().map(Vec::len), Some(1), "{id}: {history}");
    }
    // A later push to the restarted receivers has nothing to send.
    let report = f.push(&tokyo.url, &paris.url);
    assert_eq!(report["changesSent"], 0, "{report}");
    austin.restart();
    let report = f.push(&tokyo.url, &austin.url);
    assert_eq!(report["changesSent"], 0, "{report}");
}

#[test]
fn sender_killed_during_export_or_push_converges_after_restart() {
    let (f, mut tokyo, mut servers, ids) = bulk_family("kill-sender", &["paris", "austin"]);
    let austin = servers.pop().expect("austin");
    let paris = servers.pop().expect("paris");
    let span = timed_push(&f, &tokyo.url, &austin.url);
    let (_, tokyo_epoch) = held(&f, &tokyo.url, "tokyo");

    let started = Instant::now();
    for (round, delay) in kill_delays(span).into_iter().enumerate() {
        if started.elapsed() > LOOP_LIMIT {
            break;
        }
        // Odd rounds kill it during a file export, even ones during a push.
        let file = f.root.join(format!("round-{round}.packet"));
        let job = if round % 2 == 1 {
            f.spawn(&[
                "sync",
                "export",
                "--replica",
                &tokyo.url,
                "--peer",
                "paris",
                "--out",
                path_str(&file),
            ])
        } else {
            f.spawn(&["sync", "push", "--from", &tokyo.url, "--to", &paris.url])
        };
        std::thread::sleep(delay);
        tokyo.kill();
        let out = job.finish(Duration::from_secs(60));
        tokyo.restart();
        // Nothing committed at the sender is lost.
        assert_eq!(
            held(&f, &tokyo.url, "tokyo"),
            (BULK, tokyo_epoch),
            "round {round}"
        );
        // The receiver took the whole packet or nothing.
        let (count, _) = held(&f, &paris.url, "tokyo");
        assert!(
            count == 0 || count == BULK,
            "round {round}: paris holds {count}"
        );
        if round % 2 == 1 {
            if out.status.success() {
                // A written file is a whole packet.
                let report = common::json_of(&f.cli_ok(&[
                    "sync",
                    "import",
                    "--replica",
                    &paris.url,
                    path_str(&file),
                ]));
                assert!(report["held"].is_null(), "{report}");
            } else {
                assert!(!file.exists(), "a failed export left {}", file.display());
                assert!(!text(&out.stderr).is_empty());
            }
        }
    }

    f.push(&tokyo.url, &paris.url);
    let digest = assert_converged(&f, &[&tokyo.url, &paris.url, &austin.url]);
    assert_eq!(digest.items, BULK as u64);
    let at_paris = f.defects(&paris.url);
    assert!(ids.iter().all(|id| at_paris.contains_key(id)));
    assert_eq!(f.push(&tokyo.url, &paris.url)["changesSent"], 0);
}

#[test]
fn acknowledged_changes_survive_a_kill_right_after_the_answer() {
    let f = Family::new("kill-after-ack");
    f.init("tokyo", 7);
    let mut tokyo = f.serve("tokyo");
    f.clone_replica(&tokyo.url, "paris");
    let api = f.api();
    let mut acknowledged: Vec<(String, String)> = Vec::new();
    let started = Instant::now();
    for round in 0..ROUNDS {
        if started.elapsed() > LOOP_LIMIT {
            break;
        }
        // One by the CLI, a burst by the API, then an update; killed as soon as the last answer came.
        let headline = format!("round {round} by the CLI");
        acknowledged.push((f.create(&tokyo.url, &headline), headline));
        for i in 0..20 {
            let headline = format!("round {round} by the API {i}");
            let id = api.try_create(&tokyo.url, &headline).expect("a create");
            acknowledged.push((id, headline));
        }
        let (first, _) = acknowledged[0].clone();
        let headline = format!("updated in round {round}");
        let out = f.update(&tokyo.url, &first, &headline);
        assert!(out.status.success(), "{}", text(&out.stderr));
        acknowledged[0].1 = headline;
        tokyo.kill();
        tokyo.restart();
        let records = f.defects(&tokyo.url);
        assert_eq!(records.len(), acknowledged.len(), "round {round}");
        for (id, headline) in &acknowledged {
            let record = records.get(id).unwrap_or_else(|| panic!("{id} lost"));
            assert_eq!(record["fields"]["headline"], headline.as_str());
        }
    }
    // A mastership move that was answered survives too.
    let (moved, _) = acknowledged[1].clone();
    f.cli_ok(&[
        "mastership",
        "move",
        "--replica",
        &tokyo.url,
        &moved,
        "--to",
        "paris",
    ]);
    tokyo.kill();
    tokyo.restart();
    let item = f
        .get(&tokyo.url, "record", &moved)
        .expect("the moved record");
    assert_eq!(item["master"], "paris");
    // Ids handed out before the kills are not handed out again.
    let next = f.create(&tokyo.url, "after the kills");
    assert!(
        acknowledged.iter().all(|(id, _)| id != &next),
        "{next} reused"
    );
    let paris = f.serve("paris");
    f.push(&tokyo.url, &paris.url);
    assert_converged(&f, &[&tokyo.url, &paris.url]);
}

/// The (schema repository, user database) feature levels a replica reports.
fn pair(status: &Value) -> (i64, i64) {
    (
        status["schemaRepositoryFeatureLevel"]
            .as_i64()
            .expect("a level"),
        status["userDatabaseFeatureLevel"]
            .as_i64()
            .expect("a level"),
    )
}

#[test]
fn replica_killed_during_an_upgrade_restarts_at_a_valid_or_transient_pair_and_finishes() {
    // The sender at (8,8) has a large packet for each receiver at (7,7); the
    // receiver holds it, and its upgrade imports it: that is the work a kill interrupts.
    let f = Family::new("kill-upgrade");
    f.init("tokyo", 7);
    let tokyo = f.serve("tokyo");
    let names: Vec<String> = (0..ROUNDS).map(|i| format!("site{i}")).collect();
    for name in &names {
        f.clone_replica(&tokyo.url, name);
    }
    f.cli_ok(&[
        "replica",
        "upgrade",
        "--replica",
        &tokyo.url,
        "--schema-repository",
        "8",
    ]);
    f.cli_ok(&[
        "replica",
        "upgrade",
        "--replica",
        &tokyo.url,
        "--user-database",
        "8",
    ]);
    let ids = f.api().create_defects(&tokyo.url, BULK, "made at (8,8)");

    let started = Instant::now();
    let mut span = None;
    let mut rounds = 0;
    for (round, name) in names.iter().enumerate() {
        if started.elapsed() > LOOP_LIMIT {
            break;
        }
        rounds += 1;
        let mut site = f.serve(name);
        let report = f.push(&tokyo.url, &site.url);
        assert!(report["held"].as_str().is_some(), "{report}");
        // The first site upgrades undisturbed: that measures the span to kill within.
        let Some(span) = span else {
            let start = Instant::now();
            for (flag, level) in [("--schema-repository", "8"), ("--user-database", "8")] {
                f.cli_ok(&["replica", "upgrade", "--replica", &site.url, flag, level]);
            }
            span = Some(start.elapsed());
            continue;
        };
        let delays = kill_delays(span);
        let delay = delays[round % delays.len()];
        let mut steps = 0;
        // A kill that came too early for the step to start is retried with a doubled delay.
        let mut tries_here = 0;
        let mut last = None;
        loop {
            let before = pair(&f.status(&site.url));
            if last == Some(before) {
                tries_here += 1;
            } else {
                tries_here = 0;
            }
            last = Some(before);
            // The schema repository raise is quick: kill it within a few milliseconds.
            let (step, base) = match before {
                (7, 7) => (
                    ["--schema-repository", "8"],
                    Duration::from_millis(3 * round as u64),
                ),
                (8, 7) => (["--user-database", "8"], delay),
                (8, 8) => break,
                other => panic!("{name} is at {other:?}"),
            };
            let wait = base * (1 << tries_here.min(10));
            steps += 1;
            assert!(steps <= 20, "{name} does not finish its upgrade");
            let job = f.spawn(&[
                "replica",
                "upgrade",
                "--replica",
                &site.url,
                step[0],
                step[1],
            ]);
            std::thread::sleep(wait);
            site.kill();
            let out = job.finish(Duration::from_secs(60));
            site.restart();
            let status = f.status(&site.url);
            let after = pair(&status);
            assert!(
                [(7, 7), (8, 7), (8, 8)].contains(&after),
                "{name} restarted at {after:?}"
            );
            assert!(
                after >= before,
                "{name} went from {before:?} down to {after:?}"
            );
            let metaschema = status["metaschemaVersion"].as_i64();
            assert_eq!(
                metaschema,
                Some(if after.0 == 8 { 23 } else { 22 }),
                "{status}"
            );
            if out.status.success() {
                assert_ne!(after, before, "an answered upgrade of {name} was lost");
            }
            let (count, _) = held(&f, &site.url, "tokyo");
            assert!(count == 0 || count == BULK, "{name} holds {count} records");
        }
        // Whatever the kill left held comes in with the next packet at the latest.
        f.push(&tokyo.url, &site.url);
        let status = f.status(&site.url);
        assert_eq!(status["heldPackets"], 0, "{status}");
        assert_eq!(held(&f, &site.url, "tokyo").0, ids.len());
        assert_converged(&f, &[&tokyo.url, &site.url]);
    }
    assert!(rounds >= 2, "the loop ran out of time before any kill");
}

#[test]
// A replica killed after raising its user database but before importing what it
// held imports it when it starts again.
fn replica_killed_after_its_user_database_raise_imports_the_held_packet_on_restart() {
    let f = Family::new("kill-upgrade-held");
    f.init("tokyo", 7);
    let tokyo = f.serve("tokyo");
    for name in ["measure", "paris"] {
        f.clone_replica(&tokyo.url, name);
    }
    f.cli_ok(&[
        "replica",
        "upgrade",
        "--replica",
        &tokyo.url,
        "--schema-repository",
        "8",
    ]);
    f.cli_ok(&[
        "replica",
        "upgrade",
        "--replica",
        &tokyo.url,
        "--user-database",
        "8",
    ]);
    f.api().create_defects(&tokyo.url, BULK, "made at (8,8)");
    let raise = |url: &str, flag: &str| {
        f.cli_ok(&["replica", "upgrade", "--replica", url, flag, "8"]);
    };
    // How long the user database raise takes when it imports the held packet.
    let measure = f.serve("measure");
    f.push(&tokyo.url, &measure.url);
    raise(&measure.url, "--schema-repository");
    let start = Instant::now();
    raise(&measure.url, "--user-database");
    let span = start.elapsed();

    let mut paris = f.serve("paris");
    let report = f.push(&tokyo.url, &paris.url);
    assert!(report["held"].as_str().is_some(), "{report}");
    raise(&paris.url, "--schema-repository");
    let started = Instant::now();
    // Kill it from half of the span on, later each time, until it restarts at (8,8).
    for step in 0..ROUNDS as u32 {
        if started.elapsed() > LOOP_LIMIT {
            break;
        }
        let job = f.spawn(&[
            "replica",
            "upgrade",
            "--replica",
            &paris.url,
            "--user-database",
            "8",
        ]);
        std::thread::sleep(span / 2 + span * step / 2);
        paris.kill();
        drop(job.finish(Duration::from_secs(60)));
        paris.restart();
        let status = f.status(&paris.url);
        let (count, _) = held(&f, &paris.url, "tokyo");
        match pair(&status) {
            (8, 7) => assert_eq!(count, 0, "imported before the raise: {status}"),
            (8, 8) => {
                // No push since: the restarted replica imported what its raise released.
                assert_eq!(status["heldPackets"], 0, "{status}");
                assert_eq!(count, BULK, "{status}");
                return;
            }
            other => panic!("paris restarted at {other:?}"),
        }
    }
    raise(&paris.url, "--user-database");
    let status = f.status(&paris.url);
    assert_eq!(status["heldPackets"], 0, "{status}");
    assert_eq!(held(&f, &paris.url, "tokyo").0, BULK);
}

#[test]
fn source_killed_during_a_clone_leaves_no_half_made_replica() {
    let (f, mut tokyo, _, ids) = bulk_family("kill-clone-source", &[]);
    // How long a clone takes undisturbed.
    let start = Instant::now();
    f.clone_replica(&tokyo.url, "measure");
    let span = start.elapsed();

    let started = Instant::now();
    for (round, delay) in kill_delays(span).into_iter().enumerate() {
        if started.elapsed() > LOOP_LIMIT {
            break;
        }
        let name = format!("copy{round}");
        let data = f.data(&name);
        let job = f.spawn(&[
            "replica",
            "clone",
            "--from",
            &tokyo.url,
            "--data",
            path_str(&data),
            "--replica",
            &name,
        ]);
        let source = tokyo.url.clone();
        std::thread::sleep(delay);
        tokyo.kill();
        let out = job.finish(Duration::from_secs(60));
        tokyo.restart();
        assert_eq!(f.defects(&tokyo.url).len(), BULK, "the source lost records");
        if out.status.success() {
            // The clone finished before the kill: it is a whole replica.
            let copy = f.serve(&name);
            assert_eq!(f.defects(&copy.url).len(), BULK);
            continue;
        }
        let err = text(&out.stderr);
        assert!(
            err.starts_with("error: ") && err.contains(&source),
            "the failure does not say what went wrong: {err}"
        );
        assert!(
            !data.join("replica.db").exists(),
            "a failed clone left {}",
            data.join("replica.db").display()
        );
        let listen = format!("{}:0", f.ip(&name));
        let serve = f.cli(&[
            "replica",
            "serve",
            "--data",
            path_str(&data),
            "--listen",
            &listen,
        ]);
        assert!(!serve.status.success(), "a failed clone can be served");
        assert!(
            text(&serve.stderr).contains("holds no replica"),
            "{}",
            text(&serve.stderr)
        );
    }
    // The source still makes clones, and they converge with it.
    f.clone_replica(&tokyo.url, "after");
    let after = f.serve("after");
    let mine = f.create(&after.url, "made at the clone");
    f.push(&after.url, &tokyo.url);
    f.push(&tokyo.url, &after.url);
    let digest = assert_converged(&f, &[&tokyo.url, &after.url]);
    assert_eq!(digest.items, ids.len() as u64 + 1);
    assert!(f.get(&tokyo.url, "record", &mine).is_some());
}

#[test]
fn clone_that_failed_after_the_source_made_the_copy_can_be_run_again() {
    let f = Family::new("clone-rerun");
    f.init("tokyo", 7);
    let tokyo = f.serve("tokyo");
    let data = f.data("paris");
    let clone = [
        "replica",
        "clone",
        "--from",
        &tokyo.url,
        "--data",
        path_str(&data),
        "--replica",
        "paris",
    ];
    // The clone cannot put the copy where it writes it first, so it fails after the
    // source has made the copy (as when the clone or the source dies during the transfer).
    let blocker = data.join("replica.db.partial");
    std::fs::create_dir_all(&blocker).expect("create the blocker");
    let err = f.cli_refused(&clone);
    assert!(err.contains("cannot write"), "{err}");
    assert!(!data.join("replica.db").exists());
    std::fs::remove_dir_all(&blocker).expect("remove the blocker");

    // The source shows paris as a clone that has not answered yet...
    let pending = |f: &Family| -> Option<bool> {
        f.status(&tokyo.url)["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .find(|p| p["name"] == "paris")
            .and_then(|p| p["pendingClone"].as_bool())
    };
    assert_eq!(
        pending(&f),
        Some(true),
        "paris is registered as a pending clone"
    );
    // ...and the same command works once its cause is gone.
    let out = f.cli(&clone);
    assert!(
        out.status.success(),
        "the clone cannot be re-run: {}",
        text(&out.stderr)
    );
    let paris = f.serve("paris");
    f.push(&tokyo.url, &paris.url);
    assert_eq!(pending(&f), Some(false), "paris answered for itself");
    assert_converged(&f, &[&tokyo.url, &paris.url]);
    // Now the name is taken for good.
    let other = f.data("paris-again");
    let again = f.cli_refused(&[
        "replica",
        "clone",
        "--from",
        &tokyo.url,
        "--data",
        path_str(&other),
        "--replica",
        "paris",
    ]);
    assert!(again.contains("already a member"), "{again}");
}

#[test]
fn a_replica_restored_from_a_backup_gets_back_what_it_lost_and_reuses_no_number() {
    let f = Family::new("restore");
    f.init("tokyo", 7);
    let tokyo = f.serve("tokyo");
    f.clone_replica(&tokyo.url, "paris");
    f.clone_replica(&tokyo.url, "austin");
    let mut paris = f.serve("paris");
    let austin = f.serve("austin");
    let urls = [tokyo.url.clone(), paris.url.clone(), austin.url.clone()];
    let all: Vec<&str> = urls.iter().map(String::as_str).collect();
    let before = f.create(&paris.url, "before the backup");
    push_all(&f, &all, 2);

    let backup = f.data("paris-backup.db");
    f.cli_ok(&[
        "replica",
        "backup",
        "--replica",
        &paris.url,
        "--out",
        path_str(&backup),
    ]);
    let old_incarnation = f.status(&paris.url)["incarnation"]
        .as_u64()
        .expect("incarnation");
    // Changes made after the backup reach the peers, then paris loses them.
    let lost = f.create(&paris.url, "after the backup");
    f.push(&paris.url, &tokyo.url);
    f.push(&paris.url, &austin.url);
    let lost_epoch = f.status(&paris.url)["epochs"]["paris"]
        .as_u64()
        .expect("epoch");
    // A packet from paris that never reached tokyo: after the restore those changes
    // never happened, so tokyo must refuse it.
    f.create(&paris.url, "lost and never sent");
    let from_old_paris = f.data("from-old-paris.pkt");
    f.cli_ok(&[
        "sync",
        "export",
        "--replica",
        &paris.url,
        "--peer",
        "tokyo",
        "--out",
        path_str(&from_old_paris),
    ]);
    f.create(&tokyo.url, "for the old incarnation");
    let stale = f.data("stale.pkt");
    f.cli_ok(&[
        "sync",
        "export",
        "--replica",
        &tokyo.url,
        "--peer",
        "paris",
        "--out",
        path_str(&stale),
    ]);

    paris.kill();
    let data = f.data("paris");
    let said = f.cli_ok(&[
        "replica",
        "restore",
        "--data",
        path_str(&data),
        "--from",
        path_str(&backup),
    ]);
    assert!(said.contains("austin, tokyo"), "{said}");
    paris.restart();
    let status = f.status(&paris.url);
    assert!(
        status["incarnation"].as_u64().expect("incarnation") > old_incarnation,
        "{status}"
    );
    assert_eq!(
        status["restoring"],
        serde_json::json!(["austin", "tokyo"]),
        "{status}"
    );
    assert!(f.get(&paris.url, "record", &before).is_some());
    assert!(
        f.get(&paris.url, "record", &lost).is_none(),
        "the backup lacks it"
    );
    // No changes until the peers have re-sent what was lost.
    let err = f.cli_refused(&[
        "records",
        "create",
        "--replica",
        &paris.url,
        "--type",
        "Defect",
        "--field",
        "headline=x",
    ]);
    assert!(err.contains("restored from a backup"), "{err}");
    // A packet made for the old incarnation is refused.
    let err = f.cli_refused(&["sync", "import", "--replica", &paris.url, path_str(&stale)]);
    assert!(err.contains("incarnation"), "{err}");

    f.push(&tokyo.url, &paris.url);
    assert!(
        f.get(&paris.url, "record", &lost).is_some(),
        "tokyo re-sent paris's own lost change"
    );
    assert_eq!(
        f.status(&paris.url)["restoring"],
        serde_json::json!(["austin"])
    );
    f.push(&austin.url, &paris.url);
    let status = f.status(&paris.url);
    assert!(
        status
            .get("restoring")
            .is_none_or(|r| r.as_array().is_some_and(|a| a.is_empty())),
        "{status}"
    );
    assert_eq!(status["epochs"]["paris"].as_u64(), Some(lost_epoch));
    let err = f.cli_refused(&[
        "sync",
        "import",
        "--replica",
        &tokyo.url,
        path_str(&from_old_paris),
    ]);
    assert!(err.contains("restored from a backup since"), "{err}");

    // New changes continue after the lost ones: the peers apply them, none is
    // taken for a duplicate.
    let fresh = f.create(&paris.url, "after the restore");
    assert_ne!(fresh, lost);
    let report = f.push(&paris.url, &tokyo.url);
    assert!(report["applied"].as_u64().unwrap_or(0) >= 1, "{report}");
    assert!(f.get(&tokyo.url, "record", &fresh).is_some());
    // The restart gave paris a new port.
    let urls = [tokyo.url.clone(), paris.url.clone(), austin.url.clone()];
    let all: Vec<&str> = urls.iter().map(String::as_str).collect();
    push_all(&f, &all, 2);
    assert_converged(&f, &all);
}
