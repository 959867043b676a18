//! `cmover history [--job N] [--run N] [--limit N]`: the manager's log of every run and decision.

use cm_manager::model::HistoryEntry;

use super::{print_json, table, utc};
use crate::client::{Client, ConnectArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only this job's entries.
    #[arg(long)]
    pub job: Option<u64>,
    /// Only this run's entries.
    #[arg(long)]
    pub run: Option<u64>,
    /// The newest this many entries (0: all).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let c = Client::connect(&a.connect)?;
    let mut query = Vec::new();
    if let Some(j) = a.job {
        query.push(format!("job={j}"));
    }
    if let Some(r) = a.run {
        query.push(format!("run={r}"));
    }
    if a.limit > 0 {
        query.push(format!("limit={}", a.limit));
    }
    let entries: Vec<HistoryEntry> = c.get(&format!("history?{}", query.join("&"))).await?;
    if c.json {
        return print_json(&entries);
    }
    let opt = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| vec![e.seq.to_string(), utc(e.at_ms), opt(e.job), opt(e.run), e.event.clone()])
        .collect();
    table(&["SEQ", "TIME (UTC)", "JOB", "RUN", "EVENT"], &rows);
    Ok(())
}
