//! README's two commands, run as a newcomer runs them: in a fresh clone of the
//! repository, exactly as README.md writes them (the lines are read from README.md, so
//! the two cannot drift), with the default state directory relative to the clone.
//!
//! The clone carries the working tree's uncommitted changes too (modified, added and
//! deleted files), so that the test checks what is being built; in CI the working tree
//! is the commit. Cargo builds in this repository's target directory, so the clone
//! compiles only this crate again, not its dependencies.

mod common;

use common::text;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the run command may take to build and bring the fleet up.
const FIRST_RUN: Duration = Duration::from_secs(900);

/// README's commands: what runs the product, what runs the tests, and the kubectl line
/// it tells the user to type (from the comments of the same block).
#[derive(Debug, PartialEq)]
struct ReadmeCommands {
    run: String,
    test: String,
    kubectl: String,
}

/// The first `sh` block after the heading "## Two commands": its first two command
/// lines, and the kubectl line of its comments.
fn readme_commands(readme: &str) -> Result<ReadmeCommands, String> {
    let section = readme
        .split_once("## Two commands")
        .ok_or("README.md has no section \"## Two commands\"")?
        .1;
    let block = section
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .ok_or("the section \"## Two commands\" has no ```sh block")?
        .0;
    let commands: Vec<&str> = block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let kubectl = block
        .lines()
        .filter_map(|l| l.trim().strip_prefix('#'))
        .map(str::trim)
        .find(|l| l.starts_with("kubectl "))
        .ok_or("no kubectl line in the block's comments")?;
    match commands.as_slice() {
        [run, test] => Ok(ReadmeCommands {
            run: run.to_string(),
            test: test.to_string(),
            kubectl: kubectl.to_string(),
        }),
        other => Err(format!(
            "the block has {} commands, not 2: {other:?}",
            other.len()
        )),
    }
}

#[test]
fn readme_commands_are_found_where_readme_writes_them() {
    let readme = "# x\n## Two commands\n\n```sh\n# Run it; then:\n#   kubectl --kubeconfig k get pods\n\
                  cargo run -- dev up\n\n# Test it\nscripts/test.sh\n```\n```sh\nother\n```\n";
    assert_eq!(
        readme_commands(readme),
        Ok(ReadmeCommands {
            run: "cargo run -- dev up".into(),
            test: "scripts/test.sh".into(),
            kubectl: "kubectl --kubeconfig k get pods".into(),
        })
    );
    assert!(readme_commands("## Two commands\n```sh\na\n```\n").is_err());
    assert!(readme_commands("## Other\n```sh\na\nb\n```\n").is_err());
    assert!(readme_commands("## Two commands\n```sh\na\nb\n```\n").is_err());
}

fn git(repo: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .expect("run git");
    assert!(out.status.success(), "git {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// A clone of this repository in `dir`, with the working tree's uncommitted changes.
fn fresh_clone(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let clone = dir.join("multisite");
    let out = Command::new("git")
        .args(["clone", "--quiet", "--no-hardlinks"])
        .arg(root)
        .arg(&clone)
        .output()
        .expect("run git clone");
    assert!(out.status.success(), "git clone: {}", text(&out.stderr));
    // The work not yet committed, staged or not, against HEAD (which the clone has).
    let changed = git(root, &["diff", "--name-only", "--diff-filter=d", "HEAD"])
        + &git(root, &["ls-files", "--others", "--exclude-standard"]);
    let deleted = git(root, &["diff", "--name-only", "--diff-filter=D", "HEAD"]);
    for path in deleted.lines() {
        let _ = std::fs::remove_file(clone.join(path));
    }
    for path in changed.lines() {
        let from = root.join(path);
        if from.is_file() {
            let to = clone.join(path);
            std::fs::create_dir_all(to.parent().expect("a file has a parent")).expect("mkdir");
            std::fs::copy(&from, &to).expect("copy a changed file");
        }
    }
    clone
}

/// `line` as a shell runs it, in `dir`, with the environment a person's shell has: none
/// of the variables cargo sets for a test (they would change build scripts' inputs).
fn shell(dir: &Path, line: &str) -> Command {
    let mut command = Command::new("sh");
    command.arg("-c").arg(line).current_dir(dir);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if (name.starts_with("CARGO") && name != "CARGO_HOME") || name == "OUT_DIR" {
            command.env_remove(name.as_ref());
        }
    }
    command
}

/// The run command, in its own process group so that Ctrl-C can be sent to all of it.
struct Running(Child);

impl Running {
    fn interrupt(&self) {
        let _ = Command::new("kill")
            .args(["-INT", "--", &format!("-{}", self.0.id())])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.interrupt();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(30) {
                if matches!(self.0.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.0.id())])
                .status();
            let _ = self.0.wait();
        }
    }
}

/// Runs `line` (README's kubectl line or another) in `dir` until `done` accepts its
/// output or `limit` passes; returns the last output.
fn poll(dir: &Path, line: &str, limit: Duration, done: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let out = shell(dir, line).output().expect("run a shell");
        let all = text(&out.stdout) + &text(&out.stderr);
        if out.status.success() && done(&all) {
            return all;
        }
        assert!(
            start.elapsed() < limit,
            "`{line}` never gave what was waited for; last output:\n{all}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The processes whose command line names `dir` or whose working directory is inside
/// it (pods, the control plane's programs), as "PID COMMAND" lines.
fn processes_in(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    let me = std::process::id().to_string();
    for entry in entries.flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let cwd = std::fs::read_link(entry.path().join("cwd")).unwrap_or_default();
        if cmdline.contains(&dir.display().to_string()) || cwd.starts_with(dir) {
            found.push(format!("{pid} {cmdline}"));
        }
    }
    found
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// README's run command brings the example fleet to Ready in a fresh clone; the kubectl
/// line README gives shows it, `kubectl get events` the operator's Events and `kubectl
/// logs` a replica's output; Ctrl-C stops it with its pods. README's test command starts
/// and finds its tools.
#[test]
fn readme_commands_work_in_a_fresh_clone() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let commands = readme_commands(&readme).expect("README's commands");
    let dir = std::env::temp_dir().join(format!("multisite-fresh-clone-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let clone = fresh_clone(&dir);
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let log = dir.join("run.log");

    let mut run = shell(&clone, &commands.run);
    run.env("CARGO_TARGET_DIR", &target)
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(std::fs::File::create(dir.join("run.err")).expect("log"))
        .process_group(0);
    let running = Running(run.spawn().expect("start README's run command"));

    // The state directory is the default one, relative to the clone.
    let kubeconfig = clone.join(".dev-state/kubeconfig");
    let start = Instant::now();
    while !kubeconfig.exists() {
        assert!(
            start.elapsed() < FIRST_RUN,
            "no kubeconfig after {} s:\n{}\n{}",
            FIRST_RUN.as_secs(),
            log_of(&log),
            log_of(&dir.join("run.err"))
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let shown = poll(&clone, &commands.kubectl, Duration::from_secs(120), |out| {
        out.lines()
            .filter(|l| l.starts_with("replica.multisite.dev/") && l.contains(" Active "))
            .count()
            == 3
            && out
                .lines()
                .any(|l| l.starts_with("replicafamily.multisite.dev/sampl") && l.contains(" True "))
    });
    let header = shown.lines().next().unwrap_or_default();
    assert!(header.contains("READY"), "{shown}");
    let kubectl = |args: &str| format!("kubectl --kubeconfig .dev-state/kubeconfig {args}");
    let ready = poll(
        &clone,
        &kubectl(
            "get rf sampl -n tracker -o 'jsonpath={.status.conditions[?(@.type==\"Ready\")].status}'",
        ),
        Duration::from_secs(30),
        |out| out.trim() == "True",
    );
    assert_eq!(ready.trim(), "True");
    let events = poll(
        &clone,
        &kubectl("get events -n tracker"),
        Duration::from_secs(30),
        |out| out.contains("replica/sampl-tokyo") && out.contains("Bootstrapping"),
    );
    assert!(
        events.lines().next().unwrap_or_default().contains("REASON"),
        "{events}"
    );
    let logs = poll(
        &clone,
        &kubectl("logs -n tracker sampl-tokyo-0"),
        Duration::from_secs(30),
        |out| out.contains("listening on http://"),
    );
    assert!(
        logs.contains("replica sampl-tokyo of family sampl"),
        "{logs}"
    );

    // Where scripts/test.sh started the real control plane its binaries are cached, so
    // README's command runs on it: three nodes, one per Site zone, the pods on them. A
    // machine with the binaries cached from an earlier run takes this path too.
    let real = std::env::var_os("MULTISITE_KUBE_STATE").is_some()
        || log_of(&log).contains("starting the real Kubernetes control plane");
    if real {
        assert!(
            log_of(&log).contains("starting the real Kubernetes control plane"),
            "{}",
            log_of(&log)
        );
        let nodes = poll(
            &clone,
            &kubectl("get nodes -L topology.kubernetes.io/zone --no-headers"),
            Duration::from_secs(30),
            |out| out.lines().filter(|l| l.contains(" Ready ")).count() == 3,
        );
        for zone in ["asia-northeast1-a", "europe-west9-a", "us-south1-a"] {
            assert!(nodes.contains(zone), "no node in {zone}: {nodes}");
        }
        let pods = poll(
            &clone,
            &kubectl("get pods -n tracker -o wide --no-headers"),
            Duration::from_secs(30),
            |out| out.contains("node-asia-northeast1-a"),
        );
        assert!(
            pods.lines()
                .any(|l| l.starts_with("sampl-tokyo-0 ") && l.contains("node-asia-northeast1-a")),
            "{pods}"
        );
        // The commands people type first, which the stand-in refuses or lacks.
        for (command, expect) in [
            ("create namespace fresh-x", "namespace/fresh-x created"),
            (
                "create secret generic s -n fresh-x --from-literal=a=b",
                "secret/s created",
            ),
            (
                "apply --server-side -f crds/ --field-manager=first",
                "serverside-applied",
            ),
            (
                "apply --server-side -f crds/ --field-manager=second",
                "serverside-applied",
            ),
        ] {
            let out = poll(&clone, &kubectl(command), Duration::from_secs(10), |out| {
                out.contains(expect)
            });
            assert!(out.contains(expect), "kubectl {command}: {out}");
        }
    } else {
        eprintln!("!!! no real control plane here: README's command ran on the stand-in");
        assert!(
            log_of(&log).contains("running the embedded stand-in"),
            "{}",
            log_of(&log)
        );
    }

    // Ctrl-C, as README says, stops it and its pods.
    let pods_before = processes_in(&clone);
    assert!(!pods_before.is_empty(), "no process runs in the clone");
    running.interrupt();
    let mut running = running;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = running.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "Ctrl-C did not stop it"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // The shell around it dies of the interrupt, as in a terminal; `dev up` itself
    // stops cleanly and says so.
    use std::os::unix::process::ExitStatusExt;
    assert!(
        status.success() || status.signal() == Some(2),
        "{status}: {}",
        log_of(&dir.join("run.err"))
    );
    assert!(
        log_of(&log).contains("dev cluster stopped"),
        "{}",
        log_of(&log)
    );
    let left = processes_in(&clone);
    assert!(
        left.is_empty(),
        "processes left running (of {} before Ctrl-C): {left:?}",
        pods_before.len()
    );

    // The test command: it starts and finds its tools (the whole run is this run).
    let out = shell(&clone, &commands.test)
        .env("MULTISITE_TEST_PREFLIGHT", "1")
        .env("CARGO_TARGET_DIR", &target)
        .stdin(Stdio::null())
        .output()
        .expect("run README's test command");
    let all = text(&out.stdout) + &text(&out.stderr);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("every tool is there"), "{all}");
    for tool in ["cargo", "kubectl", "python3"] {
        assert!(
            all.lines()
                .any(|l| l.trim_start().starts_with(tool) && l.contains('/')),
            "{tool} not reported: {all}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
