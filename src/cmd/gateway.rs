//! `multisite gateway`: delivers change events and takes updates until SIGINT or SIGTERM.

use crate::gateway::{Gateway, router};
use crate::replica::api::ReplicaClient;
use anyhow::Context;
use std::path::PathBuf;

pub struct GatewayArgs {
    pub replica: String,
    pub replica_name: String,
    pub endpoint: String,
    pub listen: String,
    pub secret_file: Option<PathBuf>,
    pub token_file: PathBuf,
    pub identity: Option<String>,
}

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
