//! `multisite gateway`: delivers change events and takes updates until SIGINT or SIGTERM.

use crate::gateway::{Gateway, router};
use crate::replica::api::ReplicaClient;
use anyhow::Context;
use std::path::PathBuf;

#[derive(clap::Subcommand, Debug)]
pub enum GatewayCommand {
    /// Run a family's gateway: send the change events at its replica to an outside
    /// system (HTTP POST of JSON, oldest first, each deleted once delivered, retried with
    /// back-off) and apply the outside system's updates (POST /v1/updates with the
    /// gateway token) to its replica. Only one gateway acts per replica (a lease there).
    Serve(GatewayArgs),
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

/// The flags of `multisite gateway serve` (the command's own text is on its subcommand).
#[derive(clap::Args, Debug)]
pub struct GatewayArgs {
    /// URL of the replica the gateway is pinned to.
    #[arg(long, value_name = "URL")]
    pub replica: String,
    /// That replica's name (the master of the change events it delivers).
    #[arg(long, value_name = "NAME")]
    pub replica_name: String,
    /// Where change events go (http://).
    #[arg(long, value_name = "URL")]
    pub endpoint: String,
    /// Address of the gateway's own API.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// File holding the family's shared secret.
    #[arg(long, value_name = "FILE", env = "MULTISITE_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// File holding the token the outside system presents on updates.
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,
    /// This process's name in the replica's gateway lease (in a pod: its name).
    #[arg(long, value_name = "NAME", env = "POD_NAME")]
    pub identity: Option<String>,
}

/// `multisite gateway serve|remaster`.
pub async fn run(command: GatewayCommand) -> anyhow::Result<()> {
    match command {
        GatewayCommand::Serve(args) => serve(args).await,
        GatewayCommand::Remaster { family, namespace } => {
            print!("{}", remaster(namespace, &family).await?);
            Ok(())
        }
    }
}

/// `multisite gateway serve`: runs until SIGINT or SIGTERM.
pub async fn serve(args: GatewayArgs) -> anyhow::Result<()> {
    if !args.endpoint.starts_with("http://") {
        anyhow::bail!(
            "--endpoint {}: only http:// endpoints are supported; put a TLS-terminating proxy in front of an https:// system",
            args.endpoint
        );
    }
    let secret = crate::cmd::replica::load_secret(args.secret_file.as_deref())?;
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| {
            format!(
                "cannot read the gateway token {}",
                args.token_file.display()
            )
        })?
        .trim()
        .to_string();
    if token.len() < 16 {
        anyhow::bail!(
            "the gateway token in {} is shorter than 16 characters",
            args.token_file.display()
        );
    }
    let identity = args
        .identity
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("gateway-{}", std::process::id()));
    let gateway = Gateway::new(
        identity,
        args.replica_name,
        args.replica.clone(),
        args.endpoint.clone(),
        token,
        // Record calls present a release; the gateway speaks the newest one it knows.
        ReplicaClient::new(
            secret.api_token,
            Some(crate::cmd::replica::newest_release(
                &crate::domain::compat::Compatibility::builtin(),
            )),
        )
        .with_timeout(std::time::Duration::from_secs(30)),
    );
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    println!(
        "gateway listening on http://{address}, replica {}, endpoint {}",
        args.replica, args.endpoint
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let delivery = tokio::spawn(gateway.clone().run(wait(stopped.clone())));
    axum::serve(listener, router(gateway))
        .with_graceful_shutdown(crate::cmd::replica::shutdown_signal())
        .await
        .context("the gateway server stopped")?;
    let _ = stop.send(true);
    let _ = delivery.await;
    Ok(())
}

/// `multisite gateway remaster FAMILY`: asks the operator (through the family's
/// annotation) to move the one-directional records' mastership to the gateway's replica.
pub async fn remaster(namespace: Option<String>, family: &str) -> anyhow::Result<String> {
    use kube::api::{Api, Patch, PatchParams};
    let client =
        crate::cmd::operator::kube_client(concat!("multisite/", env!("CARGO_PKG_VERSION"))).await?;
    let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_string());
    let api: Api<crate::api::ReplicaFamily> = Api::namespaced(client, &namespace);
    let Some(object) = api.get_opt(family).await? else {
        anyhow::bail!("no ReplicaFamily {family} in namespace {namespace}");
    };
    if object.spec.gateway.is_none() {
        anyhow::bail!("ReplicaFamily {namespace}/{family} has no gateway (spec.gateway)");
    }
    let patch = serde_json::json!({"metadata": {"annotations": {crate::operator::gateway::REMASTER: "true"}}});
    api.patch(family, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let count = object
        .status
        .and_then(|s| s.gateway)
        .map(|g| g.one_directional_records)
        .unwrap_or(0);
    Ok(format!(
        "asked the operator to move the mastership of {count} one-directional record(s) of {namespace}/{family} to the gateway's replica; `multisite status {family} -n {namespace}` shows when none is left\n"
    ))
}
