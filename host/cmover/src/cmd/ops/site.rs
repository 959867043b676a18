//! `cmover site create|list|show`: hosted sites on the manager (a staging directory published
//! to a content group). The local `cmover site commit|rollback|status` are `cmd/site.rs`'s.

use cm_manager::model::HostedSite;
use serde_json::json;

use super::{print_json, table};
use crate::client::{Client, ConnectArgs};

pub async fn create(
    name: String,
    group: String,
    staging: String,
    keep_releases: Option<u32>,
    connect: ConnectArgs,
) -> anyhow::Result<()> {
    let c = Client::connect(&connect)?;
    let mut body = json!({ "content_group": group, "staging": staging });
    if let Some(k) = keep_releases {
        body["keep_releases"] = k.into();
    }
    let s: HostedSite = c.put(&format!("sites/{name}"), &body).await?;
    if c.json {
        return print_json(&s);
    }
    println!("site {} set: {} → content group {}", s.name, s.staging, s.content_group);
    Ok(())
}

pub async fn list(connect: ConnectArgs) -> anyhow::Result<()> {
    let c = Client::connect(&connect)?;
    let sites: Vec<HostedSite> = c.get("sites").await?;
    if c.json {
        return print_json(&sites);
    }
    print_sites(&sites);
    Ok(())
}

/// The sites as a table: group, live and prepared releases, how many servers hold live.
pub fn print_sites(sites: &[HostedSite]) {
    let opt = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
    let rows: Vec<Vec<String>> = sites
        .iter()
        .map(|s| {
            let on_live = s.holders.values().filter(|r| Some(**r) == s.live()).count();
            vec![
                s.name.clone(),
                s.content_group.clone(),
                opt(s.live()),
                opt(s.prepared),
                on_live.to_string(),
                s.staging.clone(),
            ]
        })
        .collect();
    table(&["SITE", "GROUP", "LIVE", "PREPARED", "SERVERS ON LIVE", "STAGING"], &rows);
}

pub async fn show(name: String, connect: ConnectArgs) -> anyhow::Result<()> {
    let c = Client::connect(&connect)?;
    let s: HostedSite = c.get(&format!("sites/{name}")).await?;
    if c.json {
        return print_json(&s);
    }
    let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
    println!("site           {}", s.name);
    println!("content group  {}", s.content_group);
    println!("staging        {}", s.staging);
    println!("live           {}", s.live().map_or("-".into(), |l| l.to_string()));
    println!("prepared       {}", s.prepared.map_or("-".into(), |p| p.to_string()));
    println!("committed      {}", list(&s.committed));
    println!("newest serial  {}", s.serial);
    println!("keep releases  {}", s.keep_releases);
    if !s.holders.is_empty() {
        println!();
        let rows: Vec<Vec<String>> =
            s.holders.iter().map(|(srv, r)| vec![srv.clone(), r.to_string()]).collect();
        table(&["SERVER", "RELEASE"], &rows);
    }
    Ok(())
}
