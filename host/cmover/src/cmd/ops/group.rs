//! `cmover group create|list|show`: content groups, the servers a site goes to.

use cm_manager::model::ContentGroup;
use serde_json::json;

use super::{print_json, table};
use crate::client::{Client, ConnectArgs};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Create a content group, or replace its servers.
    Create {
        name: String,
        /// The group's servers (as their agents name themselves).
        #[arg(required = true)]
        servers: Vec<String>,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// List the content groups.
    List {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Show one content group's servers.
    Show {
        name: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Create { name, servers, connect } => {
            let c = Client::connect(&connect)?;
            let g: ContentGroup =
                c.put(&format!("groups/{name}"), &json!({ "servers": servers })).await?;
            if c.json {
                return print_json(&g);
            }
            println!("content group {} set: {} servers", g.name, g.servers.len());
        }
        Command::List { connect } => {
            let c = Client::connect(&connect)?;
            let groups: Vec<ContentGroup> = c.get("groups").await?;
            if c.json {
                return print_json(&groups);
            }
            let rows: Vec<Vec<String>> = groups
                .iter()
                .map(|g| vec![g.name.clone(), g.servers.len().to_string(), g.servers.join(" ")])
                .collect();
            table(&["GROUP", "SERVERS", "NAMES"], &rows);
        }
        Command::Show { name, connect } => {
            let c = Client::connect(&connect)?;
            let g: ContentGroup = c.get(&format!("groups/{name}")).await?;
            if c.json {
                return print_json(&g);
            }
            println!("content group {} ({} servers)", g.name, g.servers.len());
            for s in &g.servers {
                println!("  {s}");
            }
        }
    }
    Ok(())
}
