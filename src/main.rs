use clap::{Parser, Subcommand};
use multisite::cmd::items::{self, Access, MastershipCommand, RecordsCommand, SyncCommand};
use std::path::PathBuf;
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
    Plan(multisite::cmd::plan::PlanArgs),
    /// Create, run and upgrade replica servers.
    Replica {
        #[command(subcommand)]
        command: ReplicaCommand,
    },
    /// Create, read, query, change and delete records (and workspace items and users)
    /// at a replica. Changes are refused, naming the master, at a replica that does
    /// not master the item.
    Records {
        #[command(subcommand)]
        command: RecordsCommand,
    },
    /// Move an item's mastership to another replica.
    Mastership {
        #[command(subcommand)]
        command: MastershipCommand,
    },
    /// Move changes between replicas: push directly, or export and import packet files.
    Sync {
        #[command(subcommand)]
        command: SyncCommand,
    },
    /// An embedded cluster on this machine, without Kubernetes: an API server that
    /// kubectl and kube's client talk to, and a workload runner that runs pods of
    /// the product's image as local processes on loopback addresses.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
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
    Node(multisite::cmd::node::NodeArgs),
    /// Run the operator: the controllers that turn ReplicaFamily, Site, Replica and
    /// SchemaPackage objects into running replica servers, synchronise each family on
    /// its schedule, and record status and Events. Talks to the cluster in KUBECONFIG
    /// (or the pod's service account) and stops on SIGINT or SIGTERM.
    #[command(
        after_help = "Examples:\n  multisite operator --metrics-addr 127.0.0.1:8080\n  KUBECONFIG=.dev-state/kubeconfig multisite operator --watch-namespaces tracker"
    )]
    Operator {
        /// Only act while holding a coordination.k8s.io Lease, so that of several
        /// operator processes exactly one acts.
        #[arg(long)]
        leader_election: bool,
        /// Namespace of the Lease (in a pod: its own namespace).
        #[arg(long, value_name = "NS", env = "POD_NAMESPACE")]
        lease_namespace: Option<String>,
        /// Name of the Lease.
        #[arg(long, value_name = "NAME", default_value = "multisite-operator")]
        lease_name: String,
        /// This process's identity in the Lease and in Events (in a pod: its name).
        #[arg(long, value_name = "NAME", env = "POD_NAME")]
        identity: Option<String>,
        /// Serve /metrics, /healthz and /readyz here (e.g. 0.0.0.0:8080); none by default.
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<String>,
        /// Watch only these namespaces (comma-separated); default: all.
        #[arg(long, value_name = "NS,...", value_delimiter = ',')]
        watch_namespaces: Vec<String>,
        /// Log line format.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        /// Image of the replica pods the operator creates (default: this release's image).
        #[arg(long, value_name = "IMAGE", env = "MULTISITE_IMAGE")]
        image: Option<String>,
        /// Pull policy of those pods.
        #[arg(
            long,
            value_name = "POLICY",
            env = "MULTISITE_IMAGE_PULL_POLICY",
            default_value = "IfNotPresent"
        )]
        image_pull_policy: String,
    },
    /// Serve a client tier: a web page and an HTTP API over one replica (list, query,
    /// view and edit records; a lock mark on records mastered at another replica). The
    /// tier presents its release to the replica, which refuses a release that cannot
    /// open its feature levels; the page shows the refusal and /readyz fails meanwhile.
    Client {
        /// URL of the replica this tier uses.
        #[arg(long, value_name = "URL")]
        replica: String,
        /// The client release this tier runs (e.g. 8.0.1.1).
        #[arg(long, value_name = "RELEASE")]
        release: String,
        /// The family's name (shown on the page).
        #[arg(long, value_name = "F")]
        family: String,
        /// The tier's name (shown on the page).
        #[arg(long, value_name = "T")]
        tier: String,
        /// Address to serve on.
        #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
        listen: String,
        /// File holding the family's shared secret.
        #[arg(long, value_name = "FILE", env = "MULTISITE_SECRET_FILE")]
        secret_file: Option<PathBuf>,
    },
    /// The family's gateway to an outside system.
    Gateway {
        #[command(subcommand)]
        command: GatewayCommand,
    },
    /// Show a family as the operator sees it: replicas (phase, feature levels,
    /// incarnation, held packets, epochs) and links (last task, lag, errors).
    Status {
        /// The ReplicaFamily's name.
        family: String,
        /// Namespace (default: the kubeconfig's).
        #[arg(short = 'n', long, value_name = "NS")]
        namespace: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: multisite::cmd::replica::Output,
    },
    /// Apply schema packages.
    Schema {
        #[command(subcommand)]
        command: SchemaCommand,
    },
    /// Print one line: the digest of a replica's replicated content. Replicas that
    /// hold the same changes print the same digest.
    Digest {
        /// URL of the replica server, e.g. http://127.0.0.2:7400.
        #[arg(long, value_name = "URL")]
        replica: String,
        #[command(flatten)]
        access: Access,
    },
    /// Measure the replica's sync path: import throughput against plain SQLite,
    /// incremental sync cost in a small and a large database, packet bytes per
    /// change. Prints figures; build with --release for meaningful numbers.
    Bench {
        /// Scratch directory (the benchmark's own files there are replaced and removed).
        #[arg(long, value_name = "DIR", default_value = "target/bench")]
        dir: PathBuf,
        /// Changes in the import throughput run.
        #[arg(long, default_value_t = 100_000)]
        import_changes: u64,
        /// Records in the small database.
        #[arg(long, default_value_t = 1_000)]
        small_records: u64,
        /// Records in the large database.
        #[arg(long, default_value_t = 1_000_000)]
        large_records: u64,
        /// Changes per incremental sync.
        #[arg(long, default_value_t = 100)]
        incremental: u64,
        /// Incremental syncs measured (the median is printed).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Print the CustomResourceDefinitions of the product (or write them, one file each).
    Crd {
        /// Write one file per CRD into this directory instead of printing a YAML stream.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum ReplicaCommand {
    /// Create the first replica of a family in a data directory.
    Init {
        /// Data directory (created if missing).
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// Family name.
        #[arg(long, value_name = "F")]
        family: String,
        /// This replica's name.
        #[arg(long, value_name = "R")]
        replica: String,
        /// Prefix of record ids, e.g. SAMPL gives SAMPL00001.
        #[arg(long, value_name = "P")]
        id_prefix: String,
        /// Feature level of the schema repository and user database.
        #[arg(long, value_name = "N")]
        feature_level: i32,
        /// Schema file (YAML: recordTypes: [{name, fields: [{name, type}]}]); default: a Defect record type.
        #[arg(long, value_name = "FILE")]
        schema: Option<PathBuf>,
        #[command(flatten)]
        access: Access,
    },
    /// Create a new replica from a live one; the source stays usable during the copy,
    /// and the new replica catches up through packets.
    Clone {
        /// URL of the live source replica.
        #[arg(long, value_name = "URL")]
        from: String,
        /// Data directory of the new replica.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// Name of the new replica.
        #[arg(long, value_name = "R")]
        replica: String,
        #[command(flatten)]
        access: Access,
    },
    /// Serve a replica's HTTP API until SIGINT or SIGTERM.
    Serve {
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// Address to listen on, e.g. 127.0.0.2:7400 (port 0 picks a free port; the
        /// first line printed says which).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7400")]
        listen: String,
        /// Sync every commit to disk (survives power loss, slower); the default survives a killed process.
        #[arg(long)]
        sync_full: bool,
        /// Log as JSON lines.
        #[arg(long)]
        log_json: bool,
        /// Seconds an acknowledged change stays in the change log (default 7 days), so
        /// that a replica restored from a backup that recent gets back what it lost.
        #[arg(long, value_name = "SECONDS")]
        log_retention: Option<u64>,
        /// When the data directory holds no replica yet, wait for `POST /v1/bootstrap`
        /// (from the operator) instead of failing: it creates the family's first replica
        /// or clones a live one. Needs --family and --replica (the pod's own identity,
        /// checked against the request) and --secret-file.
        #[arg(long, requires_all = ["family", "replica"])]
        await_bootstrap: bool,
        /// The family this replica belongs to (with --await-bootstrap).
        #[arg(long, value_name = "F")]
        family: Option<String>,
        /// This replica's name (with --await-bootstrap).
        #[arg(long, value_name = "R")]
        replica: Option<String>,
        #[command(flatten)]
        access: Access,
    },
    /// Raise a replica's feature levels in place: first the schema repository, then
    /// the user database. Lowering and invalid pairs are refused.
    #[command(group(clap::ArgGroup::new("level").required(true).args(["schema_repository", "user_database", "user_database_schema"])))]
    Upgrade {
        #[arg(long, value_name = "URL")]
        replica: String,
        /// Raise the schema repository to this feature level.
        #[arg(long, value_name = "N")]
        schema_repository: Option<i32>,
        /// Raise the user database to this feature level.
        #[arg(long, value_name = "N")]
        user_database: Option<i32>,
        /// Upgrade the user database to this schema version (after a schema package arrived).
        #[arg(long, value_name = "V")]
        user_database_schema: Option<u64>,
        #[command(flatten)]
        access: Access,
    },
    /// Declare a replica gone for good (its data is lost and it cannot be removed
    /// the normal way). Its items can then be taken over with `mastership move --force`.
    Forget {
        /// URL of a surviving replica.
        #[arg(long, value_name = "URL")]
        replica: String,
        /// Name of the replica that is gone.
        #[arg(value_name = "NAME")]
        gone: String,
        #[command(flatten)]
        access: Access,
    },
    /// Write a consistent copy of a live replica's database to a file.
    Backup {
        #[arg(long, value_name = "URL")]
        replica: String,
        #[arg(long = "out", value_name = "FILE")]
        out: PathBuf,
        #[command(flatten)]
        access: Access,
    },
    /// Put a backup in place of a stopped replica's database. The replica comes back
    /// as a new incarnation: packets made for the old one are refused, and it makes
    /// no changes until every peer has pushed to it what the backup lacks.
    Restore {
        /// The replica's data directory (its server must be stopped).
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// The backup file.
        #[arg(long = "from", value_name = "FILE")]
        from: PathBuf,
    },
    /// Start removing a replica from its family: everything it masters moves to
    /// another replica and it makes no more changes. Then push from it to every
    /// other replica; `replica status` says when its data can be deleted.
    Remove {
        /// URL of the replica to remove.
        #[arg(long, value_name = "URL")]
        replica: String,
        /// The active replica that takes over its mastership.
        #[arg(long, value_name = "R")]
        to: String,
        #[command(flatten)]
        access: Access,
    },
    /// Show a replica's feature levels, packet versions, epochs and held packets.
    Status {
        #[arg(long, value_name = "URL")]
        replica: String,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: multisite::cmd::replica::Output,
        #[command(flatten)]
        access: Access,
    },
}

#[derive(Subcommand, Debug)]
enum GatewayCommand {
    /// Run a family's gateway: send the change events at its replica to an outside
    /// system (HTTP POST of JSON, oldest first, each deleted once delivered, retried with
    /// back-off) and apply the outside system's updates (POST /v1/updates with the
    /// gateway token) to its replica. Only one gateway acts per replica (a lease there).
    Serve {
        /// URL of the replica the gateway is pinned to.
        #[arg(long, value_name = "URL")]
        replica: String,
        /// That replica's name (the master of the change events it delivers).
        #[arg(long, value_name = "NAME")]
        replica_name: String,
        /// Where change events go (http://).
        #[arg(long, value_name = "URL")]
        endpoint: String,
        /// Address of the gateway's own API.
        #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
        listen: String,
        /// File holding the family's shared secret.
        #[arg(long, value_name = "FILE", env = "MULTISITE_SECRET_FILE")]
        secret_file: Option<PathBuf>,
        /// File holding the token the outside system presents on updates.
        #[arg(long, value_name = "FILE")]
        token_file: PathBuf,
        /// This process's name in the replica's gateway lease (in a pod: its name).
        #[arg(long, value_name = "NAME", env = "POD_NAME")]
        identity: Option<String>,
    },
    /// Move the mastership of the records the gateway could not update (mastered at
    /// other replicas) to the gateway's replica, so that the outside system's next
    /// updates apply. Sets the family's annotation multisite.dev/remaster; the operator
    /// carries it out and removes it.
    Remaster {
        /// The ReplicaFamily's name.
        family: String,
        /// Namespace (default: the kubeconfig's).
        #[arg(short = 'n', long, value_name = "NS")]
        namespace: Option<String>,
    },
}

/// How log lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum DevCommand {
    /// Start a local cluster: install the CRDs, apply the manifests, write the
    /// kubeconfig, print a summary of the fleet as it changes. Ctrl-C or SIGTERM
    /// stops everything; the state stays in --dir and the next `dev up` resumes it.
    ///
    /// The cluster is the real Kubernetes control plane (etcd, kube-apiserver,
    /// kube-controller-manager, kube-scheduler from e2e/kube, built from Kubernetes' Go
    /// modules on first use: about 9 minutes on 2 cores, then cached) with `multisite
    /// node` running one Node per zone the Sites name, all as processes of this machine
    /// (needs root). Where that cannot be had (no Go, no root, no e2e/kube scripts) it
    /// says why in one line and runs the embedded stand-in API server instead.
    #[command(after_help = "Examples:
  multisite dev up -f examples/fleet.yaml
  multisite dev up -f examples/fleet.yaml --kube-binaries ~/kubernetes/server/bin
  multisite dev up -f examples/fleet.yaml --stand-in
  kubectl --kubeconfig .dev-state/kubeconfig get nodes,replicas -A

See docs/dev.md.")]
    Up {
        /// Manifest files or directories to apply (server-side apply); repeatable.
        #[arg(short = 'f', long = "filename", value_name = "PATH")]
        manifests: Vec<PathBuf>,
        /// State directory: objects, pod data and logs, kubeconfig.
        #[arg(long, value_name = "DIR", default_value = ".dev-state")]
        dir: PathBuf,
        /// Run the embedded stand-in API server, not the real control plane.
        #[arg(long)]
        stand_in: bool,
        /// A directory with the official release binaries kube-apiserver,
        /// kube-controller-manager and kube-scheduler (and etcd, else etcd from PATH):
        /// used instead of building them from the Go modules.
        #[arg(long, value_name = "DIR", conflicts_with = "stand_in")]
        kube_binaries: Option<PathBuf>,
        /// Address of the stand-in API server (port 0 picks a free port); implies
        /// --stand-in.
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Log as JSON lines.
        #[arg(long)]
        log_json: bool,
        /// Do not run the operator inside the dev cluster (run `multisite operator`
        /// against its kubeconfig yourself).
        #[arg(long)]
        no_operator: bool,
        /// Pods get loopback addresses from this one up; two dev clusters on one
        /// machine need different ranges (e.g. 127.1.0.1 and 127.2.0.1).
        #[arg(long, value_name = "IP", default_value = "127.1.0.1")]
        first_pod_address: std::net::Ipv4Addr,
        /// Record every request the API server answers as one JSON line appended to
        /// FILE (created if missing): the RBAC verb, API group, resource, subresource,
        /// namespace and name (or the non-resource URL), the client's User-Agent and
        /// the HTTP status. Shows what a client such as the operator really calls,
        /// e.g. to check RBAC rules against it. Stand-in only: implies --stand-in.
        #[arg(long, value_name = "FILE")]
        audit_log: Option<PathBuf>,
        /// Delegate mode: serve the groups apiextensions.k8s.io, multisite.dev,
        /// coordination.k8s.io and events.k8s.io from the API server at URL (plain
        /// HTTP, e.g. the one e2e/apiserver/up.sh starts) and core/v1 and apps/v1 here;
        /// clients still see one API server. The CRDs are installed there. Implies
        /// --stand-in.
        #[arg(long, value_name = "URL")]
        delegate: Option<String>,
    },
    /// Stop the embedded cluster running from --dir.
    Down {
        #[arg(long, value_name = "DIR", default_value = ".dev-state")]
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum SchemaCommand {
    /// Apply a schema package (a SchemaPackage manifest) at the replica that
    /// masters the schema repository. The new schema version travels to the other
    /// replicas in packets; upgrade each replica's user database to it with
    /// `replica upgrade --user-database-schema N`.
    Apply {
        /// URL of the replica that masters the schema repository.
        #[arg(long, value_name = "URL")]
        replica: String,
        /// The SchemaPackage manifest.
        #[arg(short = 'f', long = "filename", value_name = "FILE")]
        file: PathBuf,
        #[command(flatten)]
        access: Access,
    },
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
    match cli.command {
        Command::Replica { command } => replica_command(command),
        Command::Bench {
            dir,
            import_changes,
            small_records,
            large_records,
            incremental,
            rounds,
        } => {
            print!(
                "{}",
                multisite::cmd::bench::run(&multisite::cmd::bench::BenchArgs {
                    dir,
                    import_changes,
                    small_records,
                    large_records,
                    incremental,
                    rounds,
                })?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Records { command } => runtime()?.block_on(items::records(command)),
        Command::Mastership { command } => runtime()?.block_on(items::mastership(command)),
        Command::Sync { command } => runtime()?.block_on(items::sync(command)),
        Command::Operator {
            leader_election,
            lease_namespace,
            lease_name,
            identity,
            metrics_addr,
            watch_namespaces,
            log_format,
            image,
            image_pull_policy,
        } => {
            init_logging(log_format == LogFormat::Json);
            runtime()?.block_on(multisite::cmd::operator::run(
                multisite::cmd::operator::OperatorArgs {
                    leader_election,
                    lease_namespace,
                    lease_name,
                    identity,
                    metrics_addr,
                    watch_namespaces,
                    image,
                    image_pull_policy,
                },
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Client {
            replica,
            release,
            family,
            tier,
            listen,
            secret_file,
        } => {
            init_logging(false);
            runtime()?.block_on(multisite::cmd::client::serve(
                multisite::cmd::client::ClientArgs {
                    family,
                    tier,
                    release,
                    replica,
                    listen,
                    secret_file,
                },
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Gateway {
            command:
                GatewayCommand::Serve {
                    replica,
                    replica_name,
                    endpoint,
                    listen,
                    secret_file,
                    token_file,
                    identity,
                },
        } => {
            init_logging(false);
            runtime()?.block_on(multisite::cmd::gateway::serve(
                multisite::cmd::gateway::GatewayArgs {
                    replica,
                    replica_name,
                    endpoint,
                    listen,
                    secret_file,
                    token_file,
                    identity,
                },
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Gateway {
            command: GatewayCommand::Remaster { family, namespace },
        } => {
            print!(
                "{}",
                runtime()?.block_on(multisite::cmd::gateway::remaster(namespace, &family))?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Status {
            family,
            namespace,
            output,
        } => {
            let json = output == multisite::cmd::replica::Output::Json;
            print!(
                "{}",
                runtime()?.block_on(multisite::cmd::operator::status(namespace, &family, json))?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Node(args) => {
            init_logging(args.log_json);
            runtime()?.block_on(multisite::cmd::node::run(args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev { command } => {
            match command {
                DevCommand::Up {
                    manifests,
                    dir,
                    listen,
                    log_json,
                    no_operator,
                    first_pod_address,
                    audit_log,
                    delegate,
                    stand_in,
                    kube_binaries,
                } => {
                    init_logging(log_json);
                    if !first_pod_address.is_loopback() {
                        anyhow::bail!(
                            "--first-pod-address {first_pod_address}: pods live on loopback addresses (127.x.y.z)"
                        );
                    }
                    let stand_in =
                        stand_in || listen.is_some() || audit_log.is_some() || delegate.is_some();
                    let defaults = multisite::dev::cluster::UpOptions::new(manifests);
                    let options = multisite::dev::cluster::UpOptions {
                        listen: listen.unwrap_or(defaults.listen.clone()),
                        operator: !no_operator,
                        first_pod_address,
                        audit_log,
                        delegate,
                        ..defaults
                    };
                    let cluster = if stand_in {
                        multisite::cmd::dev::Cluster::StandIn
                    } else {
                        multisite::cmd::dev::Cluster::Real(multisite::dev::kube::KubeOptions {
                            harness: None,
                            binaries: kube_binaries,
                        })
                    };
                    runtime()?.block_on(multisite::cmd::dev::up(dir, options, cluster))?;
                }
                DevCommand::Down { dir } => {
                    println!(
                        "{}",
                        multisite::cmd::dev::down(dir, std::time::Duration::from_secs(60))?
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema {
            command:
                SchemaCommand::Apply {
                    replica,
                    file,
                    access,
                },
        } => {
            let (client, _) = items::connect(&access)?;
            print!(
                "{}",
                runtime()?.block_on(multisite::cmd::replica::apply_package(
                    &client, &replica, &file
                ))?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Digest { replica, access } => {
            let (client, _) = items::connect(&access)?;
            print!(
                "{}",
                runtime()?.block_on(multisite::cmd::replica::digest(&client, &replica))?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan(args) => Ok(if multisite::cmd::plan::run(&args)? {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(EXIT_REFUSED)
        }),
        Command::Crd { out_dir } => {
            match out_dir {
                Some(dir) => {
                    for path in multisite::cmd::crd::write_dir(&dir)? {
                        println!("wrote {path}");
                    }
                }
                None => print!("{}", multisite::cmd::crd::stream()?),
            }
            Ok(ExitCode::SUCCESS)
        }
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

fn replica_command(command: ReplicaCommand) -> anyhow::Result<ExitCode> {
    use multisite::cmd::replica as r;
    match command {
        ReplicaCommand::Init {
            data,
            family,
            replica,
            id_prefix,
            feature_level,
            schema,
            access,
        } => {
            let compat = multisite::domain::compat::Compatibility::builtin();
            print!(
                "{}",
                r::init(
                    r::InitArgs {
                        data,
                        family,
                        replica,
                        id_prefix,
                        feature_level,
                        schema,
                        secret_file: access.secret_file,
                    },
                    &compat
                )?
            );
        }
        ReplicaCommand::Clone {
            from,
            data,
            replica,
            access,
        } => {
            let secret = r::load_secret(access.secret_file.as_deref())?;
            let text = runtime()?.block_on(r::clone(&from, &data, &replica, &secret))?;
            print!("{text}");
        }
        ReplicaCommand::Serve {
            data,
            listen,
            sync_full,
            log_json,
            log_retention,
            await_bootstrap,
            family,
            replica,
            access,
        } => {
            init_logging(log_json);
            let secret = r::load_secret(access.secret_file.as_deref())?;
            let compat = multisite::domain::compat::Compatibility::builtin();
            let bootstrap = match (await_bootstrap, family, replica, access.secret_file) {
                (true, Some(family), Some(replica), Some(secret_file)) => Some(r::AwaitBootstrap {
                    expected: multisite::cmd::bootstrap::Expected { family, replica },
                    secret_file,
                }),
                _ => None,
            };
            runtime()?.block_on(r::serve(
                &data,
                &listen,
                sync_full,
                log_retention,
                secret,
                compat,
                bootstrap,
            ))?;
        }
        ReplicaCommand::Upgrade {
            replica,
            schema_repository,
            user_database,
            user_database_schema,
            access,
        } => {
            let (client, _) = items::connect(&access)?;
            let target = match (schema_repository, user_database, user_database_schema) {
                (Some(n), None, None) => r::UpgradeTarget::SchemaRepository(n),
                (None, Some(n), None) => r::UpgradeTarget::UserDatabase(n),
                (None, None, Some(v)) => r::UpgradeTarget::UserDatabaseSchema(v),
                _ => anyhow::bail!(
                    "give exactly one of --schema-repository, --user-database, --user-database-schema"
                ),
            };
            print!(
                "{}",
                runtime()?.block_on(r::upgrade(&client, &replica, target))?
            );
        }
        ReplicaCommand::Forget {
            replica,
            gone,
            access,
        } => {
            let (client, _) = items::connect(&access)?;
            print!(
                "{}",
                runtime()?.block_on(r::forget(&client, &replica, &gone))?
            );
        }
        ReplicaCommand::Backup {
            replica,
            out,
            access,
        } => {
            let (client, _) = items::connect(&access)?;
            print!(
                "{}",
                runtime()?.block_on(r::backup(&client, &replica, &out))?
            );
        }
        ReplicaCommand::Restore { data, from } => {
            print!("{}", r::restore(&data, &from)?);
        }
        ReplicaCommand::Remove {
            replica,
            to,
            access,
        } => {
            let (client, _) = items::connect(&access)?;
            print!(
                "{}",
                runtime()?.block_on(r::remove(&client, &replica, &to))?
            );
        }
        ReplicaCommand::Status {
            replica,
            output,
            access,
        } => {
            let (client, _) = items::connect(&access)?;
            print!(
                "{}",
                runtime()?.block_on(r::status(&client, &replica, output))?
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
