use clap::{Parser, Subcommand};
use multisite::cmd::{bench, client, crd, dev, gateway, items, node, operator, plan, replica};
use std::process::ExitCode;

/// multisite: run fleets of replicated tracker databases over several sites on Kubernetes.
#[derive(Parser, Debug)]
#[command(name = "multisite", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show the upgrade plan for a family: the ordered steps that take its client
    /// tiers and replicas to the target feature level, or why no safe plan exists.
    ///
    /// The input is a ReplicaFamily and its Replicas as `kubectl get -o yaml` prints
    /// them (a List, or several YAML documents), statuses included: the status says
    /// where each replica and client tier is now.
    ///
    /// Exit status: 0 when a plan exists (possibly empty), 3 when the plan is
    /// refused (the reason is printed), 1 when the input is invalid.
    #[command(
        after_help = "Examples:\n  multisite plan -f examples/staged-upgrade.yaml\n  kubectl get replicafamily/sampl replicas -n tracker -o yaml | multisite plan -f - -o json"
    )]
    Plan(plan::PlanArgs),
    /// Create, run and upgrade replica servers.
    #[command(subcommand)]
    Replica(replica::ReplicaCommand),
    /// Create, read, query, change and delete records (and workspace items and users)
    /// at a replica. Changes are refused, naming the master, at a replica that does
    /// not master the item.
    #[command(subcommand)]
    Records(items::RecordsCommand),
    /// Move an item's mastership to another replica.
    #[command(subcommand)]
    Mastership(items::MastershipCommand),
    /// Move changes between replicas: push directly, or export and import packet files.
    #[command(subcommand)]
    Sync(items::SyncCommand),
    /// An embedded cluster on this machine, without Kubernetes: an API server that
    /// kubectl and kube's client talk to, and a workload runner that runs pods of
    /// the product's image as local processes on loopback addresses.
    #[command(subcommand)]
    Dev(dev::DevCommand),
    /// Run a node agent: a kubelet stand-in that registers Nodes with a real Kubernetes
    /// API server and runs the pods bound to them as local processes.
    ///
    /// For each `--node NAME=ZONE` the agent reads `DIR/NAME/kubeconfig` (the node's own
    /// client certificate, CN=system:node:NAME in O=system:nodes; the Node authorizer lets
    /// it touch only its own Node and the pods bound to it) and `DIR/NAME/serving.crt`
    /// and `serving.key` (the kubelet endpoint's certificate). It creates the Node with
    /// the hostname, zone, os and arch labels, reports it Ready, renews its Lease in
    /// kube-node-lease every 10 s, and serves `kubectl logs` and `kubectl exec` on
    /// 127.0.0.1 at port `--kubelet-port-base` + the node's position in the list.
    ///
    /// Pods bound to a node run as processes: the program of the container's image
    /// (images whose repository ends in `multisite` run this executable; `--image` maps
    /// more), with the container's command, args and env, in a mount namespace of its
    /// own where its volumes (emptyDir, secret, configMap, downwardAPI, projected with
    /// ServiceAccount tokens, persistentVolumeClaim, hostPath) are at their mount paths.
    /// Each pod gets a loopback address from `--first-pod-address` up; all pods share
    /// the host's network, so `0.0.0.0` in args and env becomes the pod's address, and
    /// URL hosts `NAME.NAMESPACE.svc` become the address of a pod Service NAME selects.
    /// Needs root (mount namespaces).
    ///
    /// SIGINT or SIGTERM stops every process (SIGTERM, then SIGKILL after the pod's grace
    /// period) and leaves the pods in the API server; the next start runs them again.
    #[command(
        after_help = "Examples:\n  e2e/kube/up.sh /tmp/kube\n  multisite node --node node-a=zone-a --node node-b=zone-b --credentials /tmp/kube/nodes --state-dir /tmp/kube/agent\n  multisite node --node node-a=zone-a --credentials /tmp/kube/nodes --state-dir /tmp/agent \\\n      --image shell=/bin/sh --provisioner-kubeconfig /tmp/kube/kubeconfig --install-storage-class standard\n\nSee docs/node.md."
    )]
    Node(node::NodeArgs),
    /// Run the operator: the controllers that turn ReplicaFamily, Site, Replica and
    /// SchemaPackage objects into running replica servers, synchronise each family on
    /// its schedule, and record status and Events. Talks to the cluster in KUBECONFIG
    /// (or the pod's service account) and stops on SIGINT or SIGTERM.
    #[command(
        after_help = "Examples:\n  multisite operator --metrics-addr 127.0.0.1:8080\n  KUBECONFIG=.dev-state/kubeconfig multisite operator --watch-namespaces tracker"
    )]
    Operator(operator::OperatorArgs),
    /// Serve a client tier: a web page and an HTTP API over one replica (list, query,
    /// view and edit records; a lock mark on records mastered at another replica). The
    /// tier presents its release to the replica, which refuses a release that cannot
    /// open its feature levels; the page shows the refusal and /readyz fails meanwhile.
    Client(client::ClientArgs),
    /// The family's gateway to an outside system.
    #[command(subcommand)]
    Gateway(gateway::GatewayCommand),
    /// Show a family as the operator sees it: replicas (phase, feature levels,
    /// incarnation, held packets, epochs) and links (last task, lag, errors).
    Status(operator::StatusArgs),
    /// Apply schema packages.
    #[command(subcommand)]
    Schema(replica::SchemaCommand),
    /// Print one line: the digest of a replica's replicated content. Replicas that
    /// hold the same changes print the same digest.
    Digest(replica::DigestArgs),
    /// Measure the replica's sync path: import throughput against plain SQLite,
    /// incremental sync cost in a small and a large database, packet bytes per
    /// change. Prints figures; build with --release for meaningful numbers.
    Bench(bench::BenchArgs),
    /// Print the CustomResourceDefinitions of the product (or write them, one file each).
    Crd(crd::CrdArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", explain(&err));
            ExitCode::from(1)
        }
    }
}

/// Exit status of a refused plan.
const EXIT_REFUSED: u8 = 3;

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(json) = logs(&cli.command) {
        init_logging(json);
    }
    match cli.command {
        Command::Plan(args) => {
            return Ok(if plan::run(&args)? {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_REFUSED)
            });
        }
        Command::Replica(command) => runtime()?.block_on(replica::run(command))?,
        Command::Records(command) => return runtime()?.block_on(items::records(command)),
        Command::Mastership(command) => return runtime()?.block_on(items::mastership(command)),
        Command::Sync(command) => return runtime()?.block_on(items::sync(command)),
        Command::Dev(command) => runtime()?.block_on(dev::run(command))?,
        Command::Node(args) => runtime()?.block_on(node::run(args))?,
        Command::Operator(args) => runtime()?.block_on(operator::run(args))?,
        Command::Client(args) => runtime()?.block_on(client::run(args))?,
        Command::Gateway(command) => runtime()?.block_on(gateway::run(command))?,
        Command::Status(args) => runtime()?.block_on(operator::status(args))?,
        Command::Schema(command) => runtime()?.block_on(replica::schema(command))?,
        Command::Digest(args) => runtime()?.block_on(replica::digest(args))?,
        Command::Bench(args) => bench::run(&args)?,
        Command::Crd(args) => crd::run(&args)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether a command logs, and as JSON lines (`Some(true)`) or text: the long-running
/// servers do; the other commands only print their results.
fn logs(command: &Command) -> Option<bool> {
    match command {
        Command::Operator(args) => Some(args.log_format == operator::LogFormat::Json),
        Command::Node(args) => Some(args.log_json),
        Command::Dev(dev::DevCommand::Up(args)) => Some(args.log_json),
        Command::Replica(replica::ReplicaCommand::Serve { log_json, .. }) => Some(*log_json),
        Command::Client(_) | Command::Gateway(gateway::GatewayCommand::Serve(_)) => Some(false),
        _ => None,
    }
}

/// The error and its causes, each cause added only when the text so far does not
/// already say it (our errors often include their cause in their own message).
fn explain(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if text.is_empty() {
            text = part;
        } else if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
    }
    text
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
