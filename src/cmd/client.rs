//! `multisite client`: serves a client tier's page and API until SIGINT or SIGTERM.

use crate::client::{ClientTier, router};
use crate::replica::api::ReplicaClient;
use anyhow::Context;
use std::sync::Arc;

/// The flags of `multisite client` (the command's own text is on its subcommand).
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// URL of the replica this tier uses.
    #[arg(long, value_name = "URL")]
    pub replica: String,
    /// The client release this tier runs (e.g. 8.0.1.1).
    #[arg(long, value_name = "RELEASE")]
    pub release: String,
    /// The family's name (shown on the page).
    #[arg(long, value_name = "F")]
    pub family: String,
    /// The tier's name (shown on the page).
    #[arg(long, value_name = "T")]
    pub tier: String,
    /// Address to serve on.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// File holding the family's shared secret.
    #[arg(long, value_name = "FILE", env = "MULTISITE_SECRET_FILE")]
    pub secret_file: Option<std::path::PathBuf>,
}

/// `multisite client`: serves until SIGINT or SIGTERM.
pub async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let compat = crate::domain::compat::Compatibility::builtin();
    compat
        .release_row(&args.release)
        .map_err(|e| anyhow::anyhow!("--release {}: {e}", args.release))?;
    let secret = crate::cmd::replica::load_secret(args.secret_file.as_deref())?;
    let tier = Arc::new(ClientTier {
        family: args.family,
        tier: args.tier,
        release: args.release.clone(),
        replica_url: args.replica.clone(),
        client: ReplicaClient::new(secret.api_token, Some(args.release))
            .with_timeout(std::time::Duration::from_secs(30)),
    });
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    println!(
        "client tier {} listening on http://{address}, replica {}",
        tier.tier, args.replica
    );
    tracing::info!(tier = %tier.tier, release = %tier.release, replica = %args.replica, %address, "serving");
    axum::serve(listener, router(tier))
        .with_graceful_shutdown(crate::cmd::replica::shutdown_signal())
        .await
        .context("the client server stopped")?;
    Ok(())
}
