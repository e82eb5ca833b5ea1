//! Harness for end-to-end tests of replica servers: a temporary family (data
//! directories and the family secret), replica servers on loopback addresses of
//! their own, the CLI with a time limit, and a few helpers over both.
//!
//! Every process started here is killed when its guard is dropped, panics included.

// Each test file uses a different part of the harness.
#![allow(dead_code)]

use multisite::packet::change::ItemKind;
use multisite::replica::api::{CreateItem, ReplicaClient};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_multisite");

/// Family name and id prefix of every test family.
pub const FAMILY: &str = "sampl";
pub const PREFIX: &str = "SAMPL";

/// How long one CLI call may take before the test fails.
pub const CLI_LIMIT: Duration = Duration::from_secs(120);

/// How long a server may take to say where it listens.
pub const START_LIMIT: Duration = Duration::from_secs(30);

static FAMILIES: AtomicU32 = AtomicU32::new(0);

/// A family under test: a temporary directory holding the secret file and one
/// data directory per replica, and the loopback network its servers use.
pub struct Family {
    pub root: PathBuf,
    pub secret: PathBuf,
    /// Second and third octets of this family's 127.X.Y.Z addresses.
    net: [u8; 2],
    hosts: std::sync::Mutex<BTreeMap<String, u8>>,
}

impl Family {
    /// A new, empty family directory for the test `name`.
    pub fn new(name: &str) -> Family {
        let n = FAMILIES.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let root = std::env::temp_dir().join(format!("multisite-e2e-{name}-{pid}-{n}"));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("create the test directory");
        // The process id picks the second octet and the test's number the third, so
        // tests running at once (in one binary or several) use different addresses.
        let net = [(1 + pid % 250) as u8, (1 + n % 250) as u8];
        Family {
            secret: root.join("family.secret"),
            root,
            net,
            hosts: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// The data directory of replica `name`.
    pub fn data(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The loopback address replica `name` listens on (the same across restarts).
    pub fn ip(&self, name: &str) -> String {
        let mut hosts = self.hosts.lock().expect("hosts lock");
        let next = 2 + hosts.len() as u8;
        let host = *hosts.entry(name.to_string()).or_insert(next);
        format!("127.{}.{}.{}", self.net[0], self.net[1], host)
    }

    /// A command running the binary with this family's secret.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("MULTISITE_SECRET_FILE", &self.secret)
            .env_remove("MULTISITE_COMPATIBILITY")
            .env_remove("RUST_LOG")
            .current_dir(&self.root);
        cmd
    }

    /// Runs the CLI to the end (failing the test past [`CLI_LIMIT`]).
    pub fn cli(&self, args: &[&str]) -> Output {
        run_bounded(self.command(args), CLI_LIMIT)
    }

    /// Runs the CLI, fails the test unless it succeeds, and returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "multisite {} failed ({}):\n{}",
            args.join(" "),
            out.status,
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Runs the CLI, fails the test if it succeeds, and returns its stderr.
    pub fn cli_refused(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "multisite {} should have been refused but printed:\n{}",
            args.join(" "),
            text(&out.stdout)
        );
        text(&out.stderr)
    }

    /// Starts the CLI in the background.
    pub fn spawn(&self, args: &[&str]) -> Background {
        Background::start(self.command(args), args.join(" "))
    }

    /// `replica init` of the family's first replica at feature level `fl`.
    pub fn init(&self, name: &str, fl: i32) {
        let data = self.data(name);
        let fl = fl.to_string();
        self.cli_ok(&[
            "replica",
            "init",
            "--data",
            path_str(&data),
            "--family",
            FAMILY,
            "--replica",
            name,
            "--id-prefix",
            PREFIX,
            "--feature-level",
            &fl,
        ]);
    }

    /// `replica clone` of a new replica `name` from the live replica at `from`.
    pub fn clone_replica(&self, from: &str, name: &str) -> String {
        let data = self.data(name);
        self.cli_ok(&[
            "replica",
            "clone",
            "--from",
            from,
            "--data",
            path_str(&data),
            "--replica",
            name,
        ])
    }

    /// Starts `replica serve` for replica `name` on its own loopback address.
    pub fn serve(&self, name: &str) -> Server {
        let mut server = Server {
            name: name.to_string(),
            url: String::new(),
            ip: self.ip(name),
            data: self.data(name),
            log: self.root.join(format!("{name}.log")),
            secret: self.secret.clone(),
            root: self.root.clone(),
            child: None,
        };
        server.start();
        server
    }

    /// The digest line of the replica at `url`.
    pub fn digest(&self, url: &str) -> Digest {
        let line = self.cli_ok(&["digest", "--replica", url]);
        Digest::parse(&line)
    }

    /// `replica status -o json` of the replica at `url`.
    pub fn status(&self, url: &str) -> Value {
        json_of(&self.cli_ok(&["replica", "status", "--replica", url, "-o", "json"]))
    }

    /// Creates a Defect at the replica at `url`; returns its id.
    pub fn create(&self, url: &str, headline: &str) -> String {
        let field = format!("headline={headline}");
        let out = self.cli_ok(&[
            "records",
            "create",
            "--replica",
            url,
            "--type",
            "Defect",
            "--field",
            &field,
            "--field",
            "state=open",
        ]);
        out.trim().to_string()
    }

    /// `records create` at the replica at `url` with `args` (kind, type, owner, fields);
    /// returns the new item's id.
    pub fn create_item(&self, url: &str, args: &[&str]) -> String {
        let mut all = vec!["records", "create", "--replica", url];
        all.extend_from_slice(args);
        self.cli_ok(&all).trim().to_string()
    }

    /// Updates a Defect's headline at the replica at `url`.
    pub fn update(&self, url: &str, id: &str, headline: &str) -> Output {
        let field = format!("headline={headline}");
        self.cli(&["records", "update", "--replica", url, id, "--field", &field])
    }

    /// An item as `records get -o json` prints it, or `None` when the replica
    /// answers that it does not exist.
    pub fn get(&self, url: &str, kind: &str, id: &str) -> Option<Value> {
        let out = self.cli(&[
            "records",
            "get",
            "--replica",
            url,
            "--kind",
            kind,
            id,
            "-o",
            "json",
        ]);
        if out.status.success() {
            return Some(json_of(&text(&out.stdout)));
        }
        let err = text(&out.stderr);
        assert!(
            err.contains("does not exist"),
            "records get {id} at {url} failed for another reason than absence:\n{err}"
        );
        None
    }

    /// The Defects a replica holds (not deleted), by id.
    pub fn defects(&self, url: &str) -> BTreeMap<String, Value> {
        let out = self.cli_ok(&[
            "records",
            "query",
            "--replica",
            url,
            "--type",
            "Defect",
            "-o",
            "json",
        ]);
        let items = json_of(&out);
        items
            .as_array()
            .expect("a JSON array of records")
            .iter()
            .map(|item| {
                (
                    item["id"].as_str().expect("an id").to_string(),
                    item.clone(),
                )
            })
            .collect()
    }

    /// `sync push --from A --to B`; returns its report.
    pub fn push(&self, from: &str, to: &str) -> Value {
        json_of(&self.cli_ok(&["sync", "push", "--from", from, "--to", to, "-o", "json"]))
    }

    /// A client of the HTTP API with the family token, for bulk work.
    pub fn api(&self) -> Api {
        let secret = multisite::replica::secret::load(&self.secret).expect("load the secret");
        Api {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime"),
            client: ReplicaClient::new(secret.api_token.clone(), Some("8.0.1.1".to_string())),
        }
    }
}

impl Drop for Family {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// One line of `multisite digest`: `REPLICA DIGEST N items`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    pub replica: String,
    pub digest: String,
    pub items: u64,
}

impl Digest {
    pub fn parse(line: &str) -> Digest {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert!(
            words.len() == 4 && words[3] == "items",
            "not a digest line: {line:?}"
        );
        assert!(
            words[1].len() == 64 && words[1].bytes().all(|b| b.is_ascii_hexdigit()),
            "not a SHA-256 digest: {line:?}"
        );
        Digest {
            replica: words[0].to_string(),
            digest: words[1].to_string(),
            items: words[2].parse().expect("an item count"),
        }
    }
}

/// A running `replica serve`; killed (SIGKILL) when dropped.
pub struct Server {
    pub name: String,
    pub url: String,
    pub ip: String,
    pub data: PathBuf,
    pub log: PathBuf,
    secret: PathBuf,
    root: PathBuf,
    child: Option<Child>,
}

impl Server {
    fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the server log");
        let listen = format!("{}:0", self.ip);
        let mut child = Command::new(BIN)
            .args(["replica", "serve", "--data"])
            .arg(&self.data)
            .args(["--listen", &listen])
            .env("MULTISITE_SECRET_FILE", &self.secret)
            .env("RUST_LOG", "info")
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start replica serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Drain the rest so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(START_LIMIT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "replica {} did not say where it listens:\n{}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
        };
        let expected = format!("replica {} of family {FAMILY} listening on ", self.name);
        let Some(url) = line.strip_prefix(&expected) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("unexpected first line of replica serve: {line:?}");
        };
        assert!(
            url.starts_with(&format!("http://{}:", self.ip)),
            "{} listens on {url}, not on its address {}",
            self.name,
            self.ip
        );
        self.url = url.to_string();
        self.child = Some(child);
    }

    /// Kills the server with SIGKILL (no chance to clean up) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same data directory and address (the port may change).
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("--- last lines of the log of {}:", self.name);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A CLI call running in the background; killed when dropped.
pub struct Background {
    what: String,
    child: Option<Child>,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

fn collect<R: Read + Send + 'static>(mut from: R) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = from.read_to_end(&mut buf);
        buf
    })
}

impl Background {
    fn start(mut cmd: Command, what: String) -> Background {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start multisite");
        let out: ChildStdout = child.stdout.take().expect("piped stdout");
        let err: ChildStderr = child.stderr.take().expect("piped stderr");
        Background {
            what,
            child: Some(child),
            stdout: Some(collect(out)),
            stderr: Some(collect(err)),
        }
    }

    /// Waits for the end, at most `limit` (then kills it and fails the test).
    pub fn finish(mut self, limit: Duration) -> Output {
        let mut child = self.child.take().expect("running");
        let status = wait_bounded(&mut child, limit, &self.what);
        Output {
            status,
            stdout: self
                .stdout
                .take()
                .map(|h| h.join().unwrap_or_default())
                .unwrap_or_default(),
            stderr: self
                .stderr
                .take()
                .map(|h| h.join().unwrap_or_default())
                .unwrap_or_default(),
        }
    }

    /// Kills it with SIGKILL and returns what it printed.
    pub fn kill(mut self) -> Output {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let status = child.wait().expect("wait for a killed process");
        Output {
            status,
            stdout: self
                .stdout
                .take()
                .map(|h| h.join().unwrap_or_default())
                .unwrap_or_default(),
            stderr: self
                .stderr
                .take()
                .map(|h| h.join().unwrap_or_default())
                .unwrap_or_default(),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_bounded(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait().expect("poll a child process") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("multisite {what} did not finish within {limit:?}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Runs a command to the end, at most `limit`, and collects its output.
pub fn run_bounded(cmd: Command, limit: Duration) -> Output {
    let what = format!("{:?}", cmd.get_args().collect::<Vec<_>>());
    Background::start(cmd, what).finish(limit)
}

/// A client of replica servers' HTTP API (the family token, the newest release).
pub struct Api {
    runtime: tokio::runtime::Runtime,
    client: ReplicaClient,
}

impl Api {
    /// Creates `count` Defects at the replica at `url`, one call each; returns their ids.
    pub fn create_defects(&self, url: &str, count: usize, headline: &str) -> Vec<String> {
        self.runtime.block_on(async {
            let mut ids = Vec::with_capacity(count);
            for i in 0..count {
                let body = defect(&[("headline", &format!("{headline} {i}")), ("state", "open")]);
                let item = self
                    .client
                    .create_item(url, ItemKind::Record, &body)
                    .await
                    .unwrap_or_else(|e| panic!("create a Defect at {url}: {e}"));
                ids.push(item.id);
            }
            ids
        })
    }

    /// Creates one Defect; `Err` carries the failure (e.g. a server that was killed).
    pub fn try_create(&self, url: &str, headline: &str) -> Result<String, String> {
        self.runtime.block_on(async {
            let item = self
                .client
                .create_item(url, ItemKind::Record, &defect(&[("headline", headline)]))
                .await
                .map_err(|e| e.to_string())?;
            Ok(item.id)
        })
    }
}

/// A Defect with these fields, as the replica API creates it.
pub fn defect(fields: &[(&str, &str)]) -> CreateItem {
    CreateItem {
        item_type: Some("Defect".into()),
        fields: fields
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect(),
        owner: None,
    }
}

/// Lossy UTF-8 of process output.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn json_of(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

/// Pushes along every ordered pair of `urls`, `rounds` times.
pub fn push_all(family: &Family, urls: &[&str], rounds: usize) {
    for _ in 0..rounds {
        for from in urls {
            for to in urls {
                if from != to {
                    family.push(from, to);
                }
            }
        }
    }
}

/// The digests of the replicas at `urls`, asserting they are all equal; returns one.
pub fn assert_converged(family: &Family, urls: &[&str]) -> Digest {
    let digests: Vec<Digest> = urls.iter().map(|u| family.digest(u)).collect();
    let first = digests[0].clone();
    for d in &digests[1..] {
        assert_eq!(
            (&d.digest, d.items),
            (&first.digest, first.items),
            "{} and {} differ: {digests:?}",
            d.replica,
            first.replica
        );
    }
    first
}

/// A child process stopped (and reaped) when dropped: SIGTERM first, so that a process
/// with children of its own (`dev up` and its pods) stops them too; SIGKILL if it is
/// still there after 60 s.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A name part unique to this test process on this machine, for objects on a cluster
/// that outlives the process (process ids are reused; the time makes them differ).
pub fn run_id() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    format!("{}-{}", std::process::id(), seconds % 100_000)
}
