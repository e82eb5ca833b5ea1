//! `multisite bench`: throughput and scaling figures of the replica's sync path,
//! each with a baseline measured in the same run. It prints figures; it asserts
//! nothing about time.

use crate::packet::change::{Change, FieldValue, ItemKind, ItemState, Operation};
use crate::packet::codec::{self, FamilySecret, Limits, PacketHeader};
use crate::replica::builtin_record_types;
use crate::replica::store::{DB_FILE, InitParams, Store};
use anyhow::Context;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The flags of `multisite bench` (the command's own text is on its subcommand).
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Scratch directory (the benchmark's own files there are replaced and removed).
    #[arg(long, value_name = "DIR", default_value = "target/bench")]
    pub dir: PathBuf,
    /// Changes in the import throughput run.
    #[arg(long, default_value_t = 100_000)]
    pub import_changes: u64,
    /// Records in the small database.
    #[arg(long, default_value_t = 1_000)]
    pub small_records: u64,
    /// Records in the large database.
    #[arg(long, default_value_t = 1_000_000)]
    pub large_records: u64,
    /// Changes per incremental sync.
    #[arg(long, default_value_t = 100)]
    pub incremental: u64,
    /// Incremental syncs measured (the median is printed).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
}

fn record_fields(i: u64) -> BTreeMap<String, FieldValue> {
    let mut f = BTreeMap::new();
    f.insert(
        "headline".into(),
        FieldValue::String(format!("defect number {i} crashes the nightly build")),
    );
    f.insert(
        "state".into(),
        FieldValue::String(["open", "assigned", "resolved", "closed"][(i % 4) as usize].into()),
    );
    f.insert(
        "owner".into(),
        FieldValue::String(format!("user{}", i % 97)),
    );
    f.insert(
        "description".into(),
        FieldValue::String("steps: build, run the suite, watch it fail at the third stage".into()),
    );
    f
}

/// `count` record creations as changes of a made-up origin, numbered from `first`.
fn synthetic_changes(origin: &str, first: u64, count: u64) -> Vec<Change> {
    (first..first + count)
        .map(|seq| Change {
            origin: origin.to_string(),
            seq,
            op: Operation::PutItem {
                item: ItemState {
                    kind: ItemKind::Record,
                    // Ids of another replica of the family (tag Z).
                    id: format!("BENCH{seq:05}Z"),
                    item_type: "Defect".into(),
                    fields: record_fields(seq),
                    master: origin.to_string(),
                    version: 1,
                    deleted: false,
                    owner: None,
                    schema_version: 1,
                },
                forced_from: None,
            },
        })
        .collect()
}

fn fresh(dir: &Path, name: &str) -> anyhow::Result<Store> {
    let path = dir.join(name);
    let _ = std::fs::remove_dir_all(&path);
    Ok(Store::init(
        &path,
        &InitParams {
            family: "bench".into(),
            replica: name.into(),
            id_prefix: "BENCH".into(),
            feature_level: 8,
            metaschema: 23,
            record_types: builtin_record_types(),
        },
    )?)
}

/// Plain SQLite: the same rows inserted into one table in one transaction.
fn plain_sqlite_rate(dir: &Path, changes: &[Change]) -> anyhow::Result<f64> {
    let path = dir.join("plain.db");
    let _ = std::fs::remove_file(&path);
    let mut conn = rusqlite::Connection::open(&path)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
         CREATE TABLE rows (id TEXT PRIMARY KEY, item_type TEXT, fields TEXT, master TEXT) WITHOUT ROWID;",
    )?;
    let start = Instant::now();
    let tx = conn.transaction()?;
    {
        let mut stmt =
            tx.prepare("INSERT INTO rows (id, item_type, fields, master) VALUES (?1, ?2, ?3, ?4)")?;
        for change in changes {
            if let Operation::PutItem { item, .. } = &change.op {
                stmt.execute(rusqlite::params![
                    item.id,
                    item.item_type,
                    serde_json::to_string(&item.fields)?,
                    item.master
                ])?;
            }
        }
    }
    tx.commit()?;
    Ok(changes.len() as f64 / start.elapsed().as_secs_f64())
}

fn fill(store: &mut Store, origin: &str, records: u64) -> anyhow::Result<()> {
    let batch = 20_000;
    let mut next = 1;
    while next <= records {
        let count = batch.min(records - next + 1);
        store.import(&synthetic_changes(origin, next, count))?;
        next += count;
    }
    Ok(())
}

/// Seconds for one incremental sync of `n` new changes between two replicas of a
/// database of `records` records: export, encode, decode, import, acknowledge.
fn incremental_sync(
    dir: &Path,
    records: u64,
    n: u64,
    rounds: usize,
    secret: &FamilySecret,
) -> anyhow::Result<(Duration, usize)> {
    let mut source = fresh(dir, &format!("source-{records}"))?;
    fill(&mut source, "elsewhere", records)?;
    source.checkpoint()?;
    let target_dir = dir.join(format!("target-{records}"));
    let _ = std::fs::remove_dir_all(&target_dir);
    std::fs::create_dir_all(&target_dir)?;
    let tag = source.snapshot_for_clone("target", &target_dir.join(DB_FILE))?;
    let mut target = Store::adopt_clone(
        &target_dir.join(DB_FILE),
        "target",
        &tag,
        &source.identity().replica.clone(),
    )?;
    let epochs = target.epochs()?;
    source.record_acknowledgement("target", 1, &epochs)?;
    source.checkpoint()?;
    target.checkpoint()?;
    let mut times = Vec::new();
    let mut bytes = 0;
    for round in 0..rounds {
        for i in 0..n {
            source.create_item(
                ItemKind::Record,
                "Defect",
                record_fields(i + round as u64 * n),
                None,
            )?;
        }
        let start = Instant::now();
        let changes = source.changes_for("target")?;
        let header = PacketHeader {
            packet_version: 12,
            family: "bench".into(),
            sender: source.identity().replica.clone(),
            sender_incarnation: 1,
            target: "target".into(),
            target_incarnation: 1,
        };
        let packet = codec::encode(&header, &changes, secret)?;
        bytes = packet.len();
        let decoded = codec::decode(&packet, secret, &Limits::default())?;
        let outcome = target.import_texts(&decoded.changes, Some(&decoded.texts))?;
        anyhow::ensure!(
            outcome.applied as u64 == n && outcome.blocked.is_none(),
            "incremental import applied {outcome:?}"
        );
        let epochs = target.epochs()?;
        source.record_acknowledgement("target", 1, &epochs)?;
        times.push(start.elapsed());
    }
    times.sort();
    let median = times.get(times.len() / 2).copied().unwrap_or_default();
    drop(source);
    drop(target);
    let _ = std::fs::remove_dir_all(dir.join(format!("source-{records}")));
    let _ = std::fs::remove_dir_all(&target_dir);
    Ok((median, bytes))
}

/// One import run into a fresh replica: (changes/s, packet bytes, seconds, seconds decoding).
fn import_run(
    dir: &Path,
    changes: &[Change],
    secret: &FamilySecret,
) -> anyhow::Result<(f64, usize, f64, f64)> {
    let mut store = fresh(dir, "import")?;
    let header = PacketHeader {
        packet_version: 12,
        family: "bench".into(),
        sender: "elsewhere".into(),
        sender_incarnation: 1,
        target: "import".into(),
        target_incarnation: 1,
    };
    let packets: Vec<Vec<u8>> = changes
        .chunks(crate::replica::store::MAX_CHANGES_PER_PACKET)
        .map(|chunk| codec::encode(&header, chunk, secret))
        .collect::<Result<_, _>>()?;
    let packet_bytes: usize = packets.iter().map(Vec::len).sum();
    let start = Instant::now();
    let mut applied = 0;
    let mut decoding = Duration::ZERO;
    for packet in &packets {
        let t = Instant::now();
        let decoded = codec::decode(packet, secret, &Limits::default())?;
        decoding += t.elapsed();
        applied += store
            .import_texts(&decoded.changes, Some(&decoded.texts))?
            .applied;
    }
    let elapsed = start.elapsed().as_secs_f64();
    anyhow::ensure!(
        applied == changes.len(),
        "import applied {applied} of {}",
        changes.len()
    );
    drop(store);
    let _ = std::fs::remove_dir_all(dir.join("import"));
    Ok((
        applied as f64 / elapsed,
        packet_bytes,
        elapsed,
        decoding.as_secs_f64(),
    ))
}

/// `multisite bench`: measures, then prints the figures.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    print!("{}", figures(args)?);
    Ok(())
}

/// The figures of one benchmark run, as printed.
pub fn figures(args: &BenchArgs) -> anyhow::Result<String> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let secret = FamilySecret::from_bytes(b"bench secret bench secret bench!")?;
    let mut out = String::new();

    // 1. Import throughput against plain SQLite.
    let changes = synthetic_changes("elsewhere", 1, args.import_changes);
    // Best of three runs each, alternating, so that a busy moment hurts neither side.
    let mut plain: f64 = 0.0;
    let mut best: Option<(f64, usize, f64, f64)> = None;
    for _ in 0..3 {
        plain = plain.max(plain_sqlite_rate(&args.dir, &changes)?);
        let run = import_run(&args.dir, &changes, &secret)?;
        if best.is_none_or(|b| run.0 > b.0) {
            best = Some(run);
        }
    }
    let (rate, packet_bytes, elapsed, decoding) = best.unwrap_or_default();
    let applied = args.import_changes;
    let _ = std::fs::remove_file(args.dir.join("plain.db"));
    out.push_str(&format!(
        "import: {applied} changes in {elapsed:.2} s = {rate:.0} changes/s (decode + import, one transaction per packet; best of 3)\n\
         plain SQLite bulk insert of the same rows: {plain:.0} rows/s (best of 3)\n\
         ratio import / plain: {:.2} (decoding took {decoding:.2} s of the import)\n\
         packet size: {packet_bytes} bytes for {applied} changes = {:.1} bytes/change\n",
        rate / plain,
        packet_bytes as f64 / applied as f64
    ));

    // 2. Incremental sync cost follows the changes, not the database size.
    let (small, small_bytes) = incremental_sync(
        &args.dir,
        args.small_records,
        args.incremental,
        args.rounds,
        &secret,
    )?;
    let (large, large_bytes) = incremental_sync(
        &args.dir,
        args.large_records,
        args.incremental,
        args.rounds,
        &secret,
    )?;
    out.push_str(&format!(
        "incremental sync of {} changes (median of {} rounds): {:.1} ms with {} records, {:.1} ms with {} records\n\
         ratio large / small: {:.2}\n\
         incremental packet: {} bytes ({} records) and {} bytes ({} records) = {:.1} bytes/change\n",
        args.incremental,
        args.rounds,
        small.as_secs_f64() * 1000.0,
        args.small_records,
        large.as_secs_f64() * 1000.0,
        args.large_records,
        large.as_secs_f64() / small.as_secs_f64().max(1e-9),
        small_bytes,
        args.small_records,
        large_bytes,
        args.large_records,
        large_bytes as f64 / args.incremental as f64
    ));
    Ok(out)
}
