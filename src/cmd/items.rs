//! The item and packet commands (`records`, `mastership`, `sync`): their flags and what
//! they do, each call through the replica API's typed client.

use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;

/// How a command reaches replica servers.
#[derive(clap::Args, Debug, Clone)]
pub struct Access {
    /// File holding the family's shared secret (`replica init` creates it).
    #[arg(
        long,
        value_name = "FILE",
        env = "MULTISITE_SECRET_FILE",
        global = true
    )]
    pub secret_file: Option<PathBuf>,
    /// Client release to present to the replica (default: the newest release in the
    /// compatibility data). A replica refuses a release that cannot open its feature level.
    #[arg(long, value_name = "RELEASE", global = true)]
    pub release: Option<String>,
}

/// The kinds of item the records commands handle.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum KindArg {
    Record,
    WorkspaceItem,
    User,
}

impl From<KindArg> for crate::packet::change::ItemKind {
    fn from(k: KindArg) -> Self {
        use crate::packet::change::ItemKind;
        match k {
            KindArg::Record => ItemKind::Record,
            KindArg::WorkspaceItem => ItemKind::WorkspaceItem,
            KindArg::User => ItemKind::User,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct ItemArgs {
    /// URL of the replica server.
    #[arg(long, value_name = "URL")]
    pub replica: String,
    /// What kind of item.
    #[arg(long, value_enum, default_value = "record")]
    pub kind: KindArg,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: crate::cmd::replica::Output,
    #[command(flatten)]
    pub access: Access,
}

#[derive(Subcommand, Debug)]
pub enum RecordsCommand {
    /// Create an item mastered at this replica; prints its id (-o json: the item).
    Create {
        #[command(flatten)]
        item: ItemArgs,
        /// Record type (workspace items: query, report or chart).
        #[arg(long = "type", value_name = "T")]
        item_type: Option<String>,
        /// A field value, NAME=VALUE; repeat for more.
        #[arg(long = "field", value_name = "NAME=VALUE")]
        fields: Vec<String>,
        /// Users: the user's name; workspace items: the owning user.
        #[arg(long, value_name = "USER")]
        owner: Option<String>,
    },
    /// Print an item.
    Get {
        #[command(flatten)]
        item: ItemArgs,
        id: String,
    },
    /// Change fields of an item mastered at this replica (NAME= removes a field).
    Update {
        #[command(flatten)]
        item: ItemArgs,
        id: String,
        #[arg(
            long = "field",
            value_name = "NAME=VALUE",
            required_unless_present = "mastership"
        )]
        fields: Vec<String>,
        /// Move the item's mastership to this replica as part of the change (at its
        /// master only): the change and the move travel together.
        #[arg(long, value_name = "REPLICA")]
        mastership: Option<String>,
    },
    /// Delete an item mastered at this replica.
    Delete {
        #[command(flatten)]
        item: ItemArgs,
        id: String,
    },
    /// List items of a type whose fields have the given values.
    Query {
        #[command(flatten)]
        item: ItemArgs,
        #[arg(long = "type", value_name = "T")]
        item_type: Option<String>,
        #[arg(long = "field", value_name = "NAME=VALUE")]
        fields: Vec<String>,
    },
    /// Every state an item has had, oldest first.
    History {
        #[command(flatten)]
        item: ItemArgs,
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum MastershipCommand {
    /// Move an item's mastership (run against its current master). Until the new
    /// master imports the move, nobody may change the item. Moving a user moves the
    /// workspace items they created.
    Move {
        #[command(flatten)]
        item: ItemArgs,
        id: String,
        /// The new master replica.
        #[arg(long, value_name = "R", required_unless_present = "force")]
        to: Option<String>,
        /// Take mastership over at --replica from a master that was removed from the
        /// family (recorded in the item's history).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum SyncCommand {
    /// Send from one replica to another everything the receiver lacks, straight
    /// from replica to replica; retried sends are harmless.
    Push {
        #[arg(long, value_name = "URL")]
        from: String,
        #[arg(long, value_name = "URL")]
        to: String,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: crate::cmd::replica::Output,
        #[command(flatten)]
        access: Access,
    },
    /// Write a packet of what a peer lacks (by its last acknowledgement) to a file.
    Export {
        #[arg(long, value_name = "URL")]
        replica: String,
        /// The receiving replica's name.
        #[arg(long, value_name = "R")]
        peer: String,
        #[arg(long = "out", value_name = "FILE")]
        out: PathBuf,
        #[command(flatten)]
        access: Access,
    },
    /// Import a packet file; prints what the replica now holds (its acknowledgement,
    /// as JSON; `--report FILE` also writes it to a file for `sync acknowledge`).
    Import {
        #[arg(long, value_name = "URL")]
        replica: String,
        file: PathBuf,
        /// Also write the acknowledgement to this file.
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
        #[command(flatten)]
        access: Access,
    },
    /// Give the sender of a packet file the receiver's acknowledgement (written by
    /// `sync import --report`), so that its next export starts after what was imported.
    Acknowledge {
        /// URL of the replica that exported the packet.
        #[arg(long, value_name = "URL")]
        replica: String,
        /// The acknowledgement file.
        #[arg(value_name = "REPORT")]
        report: PathBuf,
        #[command(flatten)]
        access: Access,
    },
}

/// The client and compatibility data for a command that talks to replicas.
pub fn connect(
    access: &Access,
) -> anyhow::Result<(
    crate::replica::api::ReplicaClient,
    crate::domain::compat::Compatibility,
)> {
    let compat = crate::domain::compat::Compatibility::builtin();
    let secret = crate::cmd::replica::load_secret(access.secret_file.as_deref())?;
    let client = crate::cmd::replica::client(&secret, access.release.as_deref(), &compat);
    Ok((client, compat))
}

pub async fn records(command: RecordsCommand) -> anyhow::Result<ExitCode> {
    use crate::cmd::replica as r;
    use crate::replica::api::{CreateItem, ItemQuery, UpdateItem};
    let item_args = match &command {
        RecordsCommand::Create { item, .. }
        | RecordsCommand::Get { item, .. }
        | RecordsCommand::Update { item, .. }
        | RecordsCommand::Delete { item, .. }
        | RecordsCommand::Query { item, .. }
        | RecordsCommand::History { item, .. } => item,
    };
    let (client, _) = connect(&item_args.access)?;
    let base = item_args.replica.clone();
    let output = item_args.output;
    let kind = item_args.kind.into();
    match command {
        RecordsCommand::Create {
            item_type,
            fields,
            owner,
            ..
        } => {
            let item = CreateItem {
                item_type,
                fields: r::parse_fields(&fields)?,
                owner,
            };
            let created = client.create_item(&base, kind, &item).await?;
            match output {
                r::Output::Json => print!("{}", r::render_item(&created, output)?),
                r::Output::Table => println!("{}", created.id),
            }
        }
        RecordsCommand::Get { id, .. } => {
            let item = client.get_item(&base, kind, &id).await?;
            print!("{}", r::render_item(&item, output)?);
        }
        RecordsCommand::Update {
            id,
            fields,
            mastership,
            ..
        } => {
            let mut values = r::parse_fields(&fields)?;
            for v in values.values_mut() {
                if v.as_str() == Some("") {
                    *v = serde_json::Value::Null;
                }
            }
            let update = UpdateItem {
                fields: values,
                mastership,
                via_gateway: false,
            };
            let item = client.update_item(&base, kind, &id, &update).await?;
            print!("{}", r::render_item(&item, output)?);
        }
        RecordsCommand::Delete { id, .. } => {
            let item = client.delete_item(&base, kind, &id).await?;
            print!("{}", r::render_item(&item, output)?);
        }
        RecordsCommand::Query {
            item_type, fields, ..
        } => {
            let query = ItemQuery {
                item_type,
                fields: r::parse_fields(&fields)?
                    .into_iter()
                    .map(|(name, value)| (name, value.as_str().unwrap_or("").to_string()))
                    .collect(),
            };
            let items = client.list_items(&base, kind, &query).await?;
            match output {
                r::Output::Json => println!("{}", serde_json::to_string_pretty(&items)?),
                r::Output::Table => {
                    for item in &items {
                        print!("{}", r::render_item(item, output)?);
                    }
                }
            }
        }
        RecordsCommand::History { id, .. } => {
            let entries = client.item_history(&base, kind, &id).await?;
            println!("{}", serde_json::to_string_pretty(&entries)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn mastership(command: MastershipCommand) -> anyhow::Result<ExitCode> {
    use crate::cmd::replica as r;
    use crate::replica::api::MoveMastership;
    let MastershipCommand::Move {
        item,
        id,
        to,
        force,
    } = command;
    let (client, _) = connect(&item.access)?;
    let request = MoveMastership { to, force };
    let moved = client
        .move_mastership(&item.replica, item.kind.into(), &id, &request)
        .await?;
    match item.output {
        r::Output::Json => println!("{}", serde_json::to_string_pretty(&moved)?),
        r::Output::Table => {
            for m in &moved {
                println!("{} now mastered by {}", m.id, m.master);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn sync(command: SyncCommand) -> anyhow::Result<ExitCode> {
    use crate::cmd::replica as r;
    match command {
        SyncCommand::Push {
            from,
            to,
            output,
            access,
        } => {
            let (client, _) = connect(&access)?;
            let report = r::push(&client, &from, &to).await?;
            match output {
                r::Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                r::Output::Table => print!("{}", r::render_push(&report)),
            }
        }
        SyncCommand::Export {
            replica,
            peer,
            out,
            access,
        } => {
            let (client, _) = connect(&access)?;
            print!("{}", r::export(&client, &replica, &peer, &out).await?);
        }
        SyncCommand::Import {
            replica,
            file,
            report: report_file,
            access,
        } => {
            let (client, _) = connect(&access)?;
            let report = r::import(&client, &replica, &file).await?;
            let text = serde_json::to_string_pretty(&report)?;
            if let Some(path) = report_file {
                std::fs::write(&path, &text)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
            }
            println!("{text}");
        }
        SyncCommand::Acknowledge {
            replica,
            report,
            access,
        } => {
            let (client, _) = connect(&access)?;
            let text = std::fs::read_to_string(&report)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", report.display()))?;
            let body: crate::replica::api::ImportReport =
                serde_json::from_str(&text).map_err(|e| {
                    anyhow::anyhow!("{} is not an import report: {e}", report.display())
                })?;
            let answer = client.acknowledge(&replica, &body).await?;
            println!(
                "{} recorded what {} holds",
                answer.replica, answer.acknowledged
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
