//! The replica commands: `replica init|clone|serve|upgrade|status`, `records`,
//! `mastership`, `sync`, `digest`, `schema apply`.

use crate::cmd::items::{Access, connect};
use crate::domain::compat::Compatibility;
use crate::packet::change::{FieldDef, RecordTypeDef};
use crate::replica::api::{
    ImportReport, Item, PackageRequest, PushReport, PushRequest, ReplicaClient, StatusReport,
    UpgradeRequest,
};
use crate::replica::builtin_record_types;
use crate::replica::http::HttpError;
use crate::replica::secret::{self, Secret};
use crate::replica::server;
use crate::replica::store::{DB_FILE, InitParams, Store};
use anyhow::{Context, anyhow, bail};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How data is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(clap::Subcommand, Debug)]
pub enum ReplicaCommand {
    /// Create the first replica of a family in a data directory.
    Init(InitArgs),
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
        output: Output,
        #[command(flatten)]
        access: Access,
    },
}

/// `multisite replica ...`: runs one replica command and prints its result.
pub async fn run(command: ReplicaCommand) -> anyhow::Result<()> {
    match command {
        ReplicaCommand::Init(args) => {
            print!("{}", init(args, &Compatibility::builtin())?);
        }
        ReplicaCommand::Clone {
            from,
            data,
            replica,
            access,
        } => {
            let secret = load_secret(access.secret_file.as_deref())?;
            print!("{}", clone(&from, &data, &replica, &secret).await?);
        }
        ReplicaCommand::Serve {
            data,
            listen,
            sync_full,
            log_json: _,
            log_retention,
            await_bootstrap,
            family,
            replica,
            access,
        } => {
            let secret = load_secret(access.secret_file.as_deref())?;
            let bootstrap = match (await_bootstrap, family, replica, access.secret_file) {
                (true, Some(family), Some(replica), Some(secret_file)) => Some(AwaitBootstrap {
                    expected: crate::cmd::bootstrap::Expected { family, replica },
                    secret_file,
                }),
                _ => None,
            };
            serve(
                &data,
                &listen,
                sync_full,
                log_retention,
                secret,
                Compatibility::builtin(),
                bootstrap,
            )
            .await?;
        }
        ReplicaCommand::Upgrade {
            replica,
            schema_repository,
            user_database,
            user_database_schema,
            access,
        } => {
            let (client, _) = connect(&access)?;
            let target = match (schema_repository, user_database, user_database_schema) {
                (Some(n), None, None) => UpgradeTarget::SchemaRepository(n),
                (None, Some(n), None) => UpgradeTarget::UserDatabase(n),
                (None, None, Some(v)) => UpgradeTarget::UserDatabaseSchema(v),
                _ => bail!(
                    "give exactly one of --schema-repository, --user-database, --user-database-schema"
                ),
            };
            print!("{}", upgrade(&client, &replica, target).await?);
        }
        ReplicaCommand::Forget {
            replica,
            gone,
            access,
        } => {
            let (client, _) = connect(&access)?;
            print!("{}", forget(&client, &replica, &gone).await?);
        }
        ReplicaCommand::Backup {
            replica,
            out,
            access,
        } => {
            let (client, _) = connect(&access)?;
            print!("{}", backup(&client, &replica, &out).await?);
        }
        ReplicaCommand::Restore { data, from } => {
            print!("{}", restore(&data, &from)?);
        }
        ReplicaCommand::Remove {
            replica,
            to,
            access,
        } => {
            let (client, _) = connect(&access)?;
            print!("{}", remove(&client, &replica, &to).await?);
        }
        ReplicaCommand::Status {
            replica,
            output,
            access,
        } => {
            let (client, _) = connect(&access)?;
            print!("{}", status(&client, &replica, output).await?);
        }
    }
    Ok(())
}

#[derive(clap::Subcommand, Debug)]
pub enum SchemaCommand {
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

/// `multisite schema apply`.
pub async fn schema(command: SchemaCommand) -> anyhow::Result<()> {
    let SchemaCommand::Apply {
        replica,
        file,
        access,
    } = command;
    let (client, _) = connect(&access)?;
    print!("{}", apply_package(&client, &replica, &file).await?);
    Ok(())
}

/// The flags of `multisite digest` (the command's own text is on its subcommand).
#[derive(clap::Args, Debug)]
pub struct DigestArgs {
    /// URL of the replica server, e.g. http://127.0.0.2:7400.
    #[arg(long, value_name = "URL")]
    pub replica: String,
    #[command(flatten)]
    pub access: Access,
}

/// Finds and loads the family secret (`--secret-file` or `MULTISITE_SECRET_FILE`).
pub fn load_secret(path: Option<&Path>) -> anyhow::Result<Secret> {
    let path = path.ok_or(secret::SecretError::Missing)?;
    Ok(secret::load(path)?)
}

/// A client for the CLI's calls: the family token and a client release.
pub fn client(secret: &Secret, release: Option<&str>, compat: &Compatibility) -> ReplicaClient {
    let release = release
        .map(str::to_string)
        .unwrap_or_else(|| newest_release(compat));
    ReplicaClient::new(secret.api_token.clone(), Some(release))
}

/// The newest release in the compatibility data, as a concrete version.
pub fn newest_release(compat: &Compatibility) -> String {
    compat.newest_release_version()
}

/// Reads a schema file: YAML `recordTypes: [{name, fields: [{name, type}]}]`.
pub fn read_schema(path: &Path) -> anyhow::Result<Vec<RecordTypeDef>> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct SchemaFile {
        record_types: Vec<RecordTypeDef>,
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: SchemaFile =
        serde_saphyr::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    for t in &file.record_types {
        for FieldDef { name, field_type } in &t.fields {
            if !["String", "Integer", "Boolean", "Timestamp", "Reference"]
                .contains(&field_type.as_str())
            {
                bail!(
                    "{}: field {name} of record type {}: unknown type {field_type:?} (String, Integer, Boolean, Timestamp or Reference)",
                    path.display(),
                    t.name
                );
            }
        }
    }
    Ok(file.record_types)
}

/// The flags of `multisite replica init` (the command's own text is on its subcommand).
#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// Data directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Family name.
    #[arg(long, value_name = "F")]
    pub family: String,
    /// This replica's name.
    #[arg(long, value_name = "R")]
    pub replica: String,
    /// Prefix of record ids, e.g. SAMPL gives SAMPL00001.
    #[arg(long, value_name = "P")]
    pub id_prefix: String,
    /// Feature level of the schema repository and user database.
    #[arg(long, value_name = "N")]
    pub feature_level: i32,
    /// Schema file (YAML: recordTypes: [{name, fields: [{name, type}]}]); default: a Defect record type.
    #[arg(long, value_name = "FILE")]
    pub schema: Option<PathBuf>,
    #[command(flatten)]
    pub access: Access,
}

/// `replica init`: the first replica of a family.
pub fn init(args: InitArgs, compat: &Compatibility) -> anyhow::Result<String> {
    let prefix_ok = regex::Regex::new("^[A-Z][A-Z0-9]{0,7}$")?.is_match(&args.id_prefix);
    if !prefix_ok {
        bail!(
            "--id-prefix {:?}: use 1 to 8 capital letters or digits, starting with a letter (e.g. SAMPL)",
            args.id_prefix
        );
    }
    let metaschema = compat.metaschema_for(args.feature_level).ok_or_else(|| {
        anyhow!(
            "--feature-level {}: no release in the compatibility data opens it (levels: {:?})",
            args.feature_level,
            compat.feature_levels()
        )
    })?;
    if !compat.is_valid_pair(crate::domain::compat::FlPair::new(
        args.feature_level,
        args.feature_level,
    )) {
        bail!(
            "--feature-level {}: Table 2 has no packet version for it",
            args.feature_level
        );
    }
    let secret_path = args
        .access
        .secret_file
        .clone()
        .ok_or(secret::SecretError::Missing)?;
    let created = secret::create_if_missing(&secret_path)?;
    secret::load(&secret_path)?;
    let record_types = match &args.schema {
        Some(path) => read_schema(path)?,
        None => builtin_record_types(),
    };
    let store = Store::init(
        &args.data,
        &InitParams {
            family: args.family,
            replica: args.replica,
            id_prefix: args.id_prefix,
            feature_level: args.feature_level,
            metaschema,
            record_types,
        },
    )?;
    let id = store.identity();
    let mut out = format!(
        "created replica {} of family {} in {} (feature level {}, ids {}00001...)\n",
        id.replica,
        id.family,
        args.data.display(),
        args.feature_level,
        id.id_prefix
    );
    if created {
        out.push_str(&format!(
            "created the family secret {}\n",
            secret_path.display()
        ));
    }
    Ok(out)
}

/// `replica clone`: a new replica from a live one.
pub async fn clone(
    from: &str,
    data: &Path,
    replica: &str,
    secret: &Secret,
) -> anyhow::Result<String> {
    if data.join(DB_FILE).exists() {
        bail!("{} already holds a replica", data.display());
    }
    std::fs::create_dir_all(data).with_context(|| format!("cannot create {}", data.display()))?;
    let client = ReplicaClient::new(secret.api_token.clone(), None);
    let source = client.status(from).await?;
    // The copy arrives whole before it is put in place, so a failed transfer leaves nothing behind.
    let bytes = client.clone_for(from, replica).await?;
    let tmp = data.join(format!("{DB_FILE}.partial"));
    std::fs::write(&tmp, &bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    let tag = {
        // The tag is also recorded in the copy's membership; read it from there.
        let conn = rusqlite::Connection::open(&tmp)?;
        conn.query_row("SELECT id_tag FROM peers WHERE name = ?1", [replica], |r| {
            r.get::<_, String>(0)
        })
        .with_context(|| format!("the copy from {from} does not register {replica}"))?
    };
    let adopted = Store::adopt_clone(&tmp, replica, &tag, &source.replica)?;
    adopted.checkpoint()?;
    let family = adopted.identity().family.clone();
    drop(adopted);
    // Only a fully adopted copy becomes the replica; the WAL is checkpointed on close.
    std::fs::rename(&tmp, data.join(DB_FILE))?;
    Ok(format!(
        "created replica {} of family {} from {} in {} ({} bytes copied; ids end in {})\n",
        replica,
        family,
        source.replica,
        data.display(),
        bytes.len(),
        tag
    ))
}

/// `replica backup`: a consistent copy of a live replica's database.
pub async fn backup(client: &ReplicaClient, url: &str, out: &Path) -> anyhow::Result<String> {
    let bytes = client.backup(url).await?;
    let tmp = out.with_extension("partial");
    std::fs::write(&tmp, &bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(format!(
        "wrote a backup of {url} to {} ({} bytes)\n",
        out.display(),
        bytes.len()
    ))
}

/// `replica restore`: puts a backup in place of a stopped replica's database.
pub fn restore(data: &Path, from: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(data).with_context(|| format!("cannot create {}", data.display()))?;
    let staged = data.join(format!("{DB_FILE}.restoring"));
    std::fs::copy(from, &staged).with_context(|| format!("cannot copy {}", from.display()))?;
    let restored = Store::restore_from(&staged)?;
    restored.checkpoint()?;
    let identity = restored.identity().clone();
    let waiting = restored.restoring()?;
    drop(restored);
    // The old database's write-ahead log must not be replayed onto the backup.
    for suffix in ["-wal", "-shm"] {
        let stale = data.join(format!("{DB_FILE}{suffix}"));
        if stale.exists() {
            std::fs::remove_file(&stale)
                .with_context(|| format!("cannot remove {}", stale.display()))?;
        }
    }
    std::fs::rename(&staged, data.join(DB_FILE))?;
    Ok(format!(
        "restored replica {} of family {} from {} as incarnation {}; it makes no changes until {} have pushed to it\n",
        identity.replica,
        identity.family,
        from.display(),
        identity.incarnation,
        if waiting.is_empty() {
            "nobody".to_string()
        } else {
            waiting.join(", ")
        }
    ))
}

/// How `replica serve` starts when its data directory holds no replica yet.
pub struct AwaitBootstrap {
    pub expected: crate::cmd::bootstrap::Expected,
    pub secret_file: PathBuf,
}

/// `replica serve`: the HTTP API until SIGINT/SIGTERM. With `bootstrap`, an empty data
/// directory first waits for `POST /v1/bootstrap` on the same address.
pub async fn serve(
    data: &Path,
    listen: &str,
    sync_full: bool,
    log_retention: Option<u64>,
    secret: Secret,
    compat: Compatibility,
    bootstrap: Option<AwaitBootstrap>,
) -> anyhow::Result<()> {
    // One socket for both phases, so that callers never see the address go away.
    let socket = std::net::TcpListener::bind(listen)
        .with_context(|| format!("cannot listen on {listen}"))?;
    socket.set_nonblocking(true)?;
    let address = socket.local_addr()?;
    let listener = || -> anyhow::Result<tokio::net::TcpListener> {
        Ok(tokio::net::TcpListener::from_std(socket.try_clone()?)?)
    };
    if let Some(wait) = bootstrap
        && !data.join(DB_FILE).exists()
    {
        println!(
            "replica {} of family {} awaiting bootstrap on http://{address}",
            wait.expected.replica, wait.expected.family
        );
        tracing::info!(replica = %wait.expected.replica, family = %wait.expected.family, %address, "awaiting bootstrap");
        let secret = secret::load(&wait.secret_file)?;
        let bootstrapped = crate::cmd::bootstrap::await_bootstrap(
            listener()?,
            wait.expected,
            data.to_path_buf(),
            wait.secret_file,
            secret,
            compat.clone(),
            shutdown_signal(),
        )
        .await?;
        if !bootstrapped {
            tracing::info!("stopped before bootstrap");
            return Ok(());
        }
    }
    let mut store = Store::open_with(data, sync_full)?;
    if let Some(seconds) = log_retention {
        store.set_log_retention(seconds)?;
    }
    let identity = store.identity().clone();
    let replica = server::ReplicaServer::new(store, compat, secret);
    // Packets held before a restart may be importable now (an upgrade finished just
    // before the process stopped).
    let released = replica.retry_held_now().await?;
    if released > 0 {
        tracing::info!(released, "held packets imported at start");
    }
    let app = server::router(replica.clone());
    // The first line on stdout says where the server listens (tests and scripts read it).
    println!(
        "replica {} of family {} listening on http://{address}",
        identity.replica, identity.family
    );
    tracing::info!(replica = %identity.replica, family = %identity.family, %address, "serving");
    axum::serve(listener()?, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the server stopped")?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

/// Which level `replica upgrade` raises.
pub enum UpgradeTarget {
    SchemaRepository(i32),
    UserDatabase(i32),
    UserDatabaseSchema(u64),
}

pub async fn upgrade(
    client: &ReplicaClient,
    url: &str,
    target: UpgradeTarget,
) -> anyhow::Result<String> {
    let mut step = UpgradeRequest::default();
    match target {
        UpgradeTarget::SchemaRepository(n) => step.schema_repository = Some(n),
        UpgradeTarget::UserDatabase(n) => step.user_database = Some(n),
        UpgradeTarget::UserDatabaseSchema(n) => step.user_database_schema = Some(n),
    }
    let status = client.upgrade(url, &step).await?;
    Ok(format!(
        "replica {} now at schema repository FL {}, user database FL {} (metaschema {}){}\n",
        status.replica,
        status.schema_repository_feature_level,
        status.user_database_feature_level,
        status.metaschema_version,
        match &status.sync_blocked {
            Some(reason) => format!("; {reason}"),
            None => String::new(),
        }
    ))
}

/// `schema apply`: posts a SchemaPackage manifest's package to a replica.
pub async fn apply_package(
    client: &ReplicaClient,
    url: &str,
    file: &Path,
) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let source = file.display().to_string();
    let objects = crate::api::manifest::parse_objects(&source, &text)?;
    let packages: Vec<&crate::api::SchemaPackage> = objects
        .iter()
        .filter_map(|(_, o)| match o {
            crate::api::manifest::Object::SchemaPackage(p) => Some(p.as_ref()),
            _ => None,
        })
        .collect();
    let [package] = packages.as_slice() else {
        bail!(
            "{source}: expected exactly one SchemaPackage, found {}",
            packages.len()
        );
    };
    let schema = client
        .apply_package(url, &PackageRequest::from(&package.spec))
        .await?;
    Ok(format!(
        "package {} {} is schema version {} at {url}; upgrade each replica's user database with `multisite replica upgrade --user-database-schema {}`\n",
        package.spec.package, package.spec.version, schema.version, schema.version
    ))
}

pub async fn remove(client: &ReplicaClient, url: &str, to: &str) -> anyhow::Result<String> {
    let status = client.retire(url, to).await?;
    let pending = status.removal_pending.unwrap_or_default();
    Ok(format!(
        "replica {} is leaving family {}: its mastership moved to {to} and it makes no more changes.\n\
         Next: push from it to every other replica (multisite sync push --from {url} --to ...).\n\
         Replicas that still lack its last changes: {}\n",
        status.replica,
        status.family,
        if pending.is_empty() {
            "none: its data can be deleted".to_string()
        } else {
            pending.join(", ")
        }
    ))
}

/// `multisite replica status`: one replica's report, rendered.
pub async fn status(client: &ReplicaClient, url: &str, output: Output) -> anyhow::Result<String> {
    render_status(&client.status(url).await?, output)
}

/// `multisite replica forget`: records a member as gone at one replica.
pub async fn forget(client: &ReplicaClient, url: &str, gone: &str) -> anyhow::Result<String> {
    let status = client.forget_member(url, gone).await?;
    Ok(format!(
        "replica {gone} is recorded as gone at {}; take its items over with `multisite mastership move --replica {url} ID --force`\n",
        status.replica
    ))
}

/// `multisite digest`: prints one replica's digest of its items.
pub async fn digest(args: DigestArgs) -> anyhow::Result<()> {
    let (client, _) = connect(&args.access)?;
    let answer = client.digest(&args.replica).await?;
    println!(
        "{} {} {} items",
        answer.replica, answer.digest, answer.items
    );
    Ok(())
}

pub fn render_status(status: &StatusReport, output: Output) -> anyhow::Result<String> {
    if output == Output::Json {
        return Ok(serde_json::to_string_pretty(status)? + "\n");
    }
    let mut out = String::new();
    out.push_str(&format!(
        "replica:            {} (family {}, incarnation {})\n",
        status.replica, status.family, status.incarnation
    ));
    out.push_str(&format!(
        "feature levels:     schema repository {}, user database {}, metaschema {}\n",
        status.schema_repository_feature_level,
        status.user_database_feature_level,
        status.metaschema_version
    ));
    match &status.packet_version {
        Some(p) => out.push_str(&format!(
            "packet versions:    creates {}, accepts {}..{}\n",
            p.creates, p.accepts_min, p.accepts_max
        )),
        None => out.push_str("packet versions:    none (sync paused)\n"),
    }
    if let Some(reason) = &status.sync_blocked {
        out.push_str(&format!("sync:               {reason}\n"));
    }
    out.push_str(&format!(
        "schema:             version {} in the repository, user database at {}\n",
        status.schema_version, status.user_database_schema_version
    ));
    let epochs: Vec<String> = status
        .epochs
        .iter()
        .map(|(o, s)| format!("{o}={s}"))
        .collect();
    out.push_str(&format!("epochs:             {}\n", epochs.join(" ")));
    out.push_str(&format!("held packets:       {}\n", status.held_packets));
    for held in &status.held {
        out.push_str(&format!(
            "  #{} from {} (version {}): {}\n",
            held.id, held.sender, held.packet_version, held.reason
        ));
    }
    let mastered: Vec<String> = status
        .mastered
        .iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    out.push_str(&format!("mastered here:      {}\n", mastered.join(" ")));
    out.push_str(&format!(
        "change log:         {} entries\n",
        status.change_log
    ));
    if !status.restoring.is_empty() {
        out.push_str(&format!(
            "restore:            restored from a backup; waiting until {} push to it\n",
            status.restoring.join(", ")
        ));
    }
    if let Some(pending) = &status.removal_pending {
        if pending.is_empty() {
            out.push_str("removal:            every peer holds this replica's changes; its data can be deleted\n");
        } else {
            out.push_str(&format!(
                "removal:            waiting until {} hold this replica's last changes\n",
                pending.join(", ")
            ));
        }
    }
    Ok(out)
}

/// Parses `NAME=VALUE` arguments.
pub fn parse_fields(fields: &[String]) -> anyhow::Result<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for f in fields {
        let (name, value) = f
            .split_once('=')
            .ok_or_else(|| anyhow!("--field {f:?}: write NAME=VALUE"))?;
        if name.is_empty() {
            bail!("--field {f:?}: the field name is empty");
        }
        out.insert(name.to_string(), Value::String(value.to_string()));
    }
    Ok(out)
}

pub fn render_item(item: &Item, output: Output) -> anyhow::Result<String> {
    if output == Output::Json {
        return Ok(serde_json::to_string_pretty(item)? + "\n");
    }
    let mut out = format!(
        "{} ({}), master {}, version {}{}\n",
        item.id,
        item.item_type,
        item.master,
        item.version,
        if item.deleted { ", deleted" } else { "" }
    );
    for (k, v) in &item.fields {
        let text = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        out.push_str(&format!("  {k}: {text}\n"));
    }
    Ok(out)
}

pub async fn push(client: &ReplicaClient, from: &str, to: &str) -> anyhow::Result<PushReport> {
    let request = PushRequest {
        to: to.to_string(),
        full: false,
    };
    Ok(client.push(from, &request).await?)
}

pub fn render_push(report: &PushReport) -> String {
    let mut out = format!(
        "{} -> {}: {} packet(s), {} change(s) sent, {} applied, {} already held; {} change(s) still to send\n",
        report.from,
        report.to,
        report.packets,
        report.changes_sent,
        report.applied,
        report.skipped,
        report.lag
    );
    if let Some(reason) = &report.held {
        out.push_str(&format!("held at {}: {reason}\n", report.to));
    }
    out
}

pub async fn export(
    client: &ReplicaClient,
    url: &str,
    peer: &str,
    out: &Path,
) -> anyhow::Result<String> {
    let bytes = client.export(url, peer).await?;
    std::fs::write(out, &bytes).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(format!(
        "wrote a packet for {peer} to {} ({} bytes)\n",
        out.display(),
        bytes.len()
    ))
}

pub async fn import(
    client: &ReplicaClient,
    url: &str,
    file: &Path,
) -> anyhow::Result<ImportReport> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    Ok(client.import(url, bytes).await?)
}

/// Turns a refused or failed call into the error the CLI prints.
pub fn explain(err: HttpError) -> anyhow::Error {
    anyhow!(err.to_string())
}
