//! `cmover mctp send FILE --group ADDR:PORT` and `cmover mctp receive --group ADDR:PORT --dir DIR`:
//! one file over MCTP reliable multicast, for operators and tests.

use anyhow::{Context, bail};
use cm_agent::mctp::{ReceiveOptions, SendOptions, receive, send_file};
use cm_mctp::{Member, Outcome, SenderConfig};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Where the cluster secret comes from: `--secret-file`, else the `CM_CLUSTER_SECRET` variable.
#[derive(clap::Args)]
pub struct Secret {
    /// File holding the cluster secret (every datagram is authenticated with a key derived from it).
    #[arg(long)]
    secret_file: Option<PathBuf>,
}

impl Secret {
    fn load(&self) -> anyhow::Result<Vec<u8>> {
        if let Some(p) = &self.secret_file {
            return std::fs::read(p)
                .with_context(|| format!("reading the cluster secret from {}", p.display()));
        }
        match std::env::var("CM_CLUSTER_SECRET") {
            Ok(s) if !s.is_empty() => Ok(s.into_bytes()),
            _ => bail!("no cluster secret: pass --secret-file FILE or set CM_CLUSTER_SECRET"),
        }
    }
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Send FILE to every receiver listening on the group, and print the group leader's report.
    Send {
        file: PathBuf,
        /// Multicast data channel, e.g. 239.192.7.1:7400.
        #[arg(long)]
        group: SocketAddr,
        /// Interface address to send on (IP_MULTICAST_IF) and receive reports at.
        #[arg(long, default_value = "127.0.0.1")]
        interface: Ipv4Addr,
        /// UDP port for members' reports.
        #[arg(long, default_value_t = 7401)]
        report_port: u16,
        /// Wait for this many receivers to report complete (they are otherwise unknown by id).
        #[arg(long, default_value_t = 1)]
        expect: usize,
        /// Expected members by id (from election registration); unicast-only ones as ID@ADDR:PORT.
        #[arg(long, value_delimiter = ',')]
        members: Vec<String>,
        /// Rate cap in megabits per second.
        #[arg(long, default_value_t = 4000)]
        max_rate_mbit: u64,
        /// Starting rate in megabits per second.
        #[arg(long, default_value_t = 2000)]
        rate_mbit: u64,
        /// Slow down when a receiver's checkpoint answers lag this many MiB behind (receivers
        /// of this driver buffer 32 MiB; much closer to that and bursts overrun them).
        #[arg(long, default_value_t = 12)]
        max_lag_mib: u64,
        /// MiB of a pass between two checkpoints (0: no mid-pass feedback).
        #[arg(long, default_value_t = 2)]
        checkpoint_mib: u64,
        /// Payload bytes per frame (1400 fits a 1500-byte MTU; up to 65 000 on loopback).
        #[arg(long, default_value_t = 1400)]
        frame_size: u16,
        /// Encrypt payloads with ChaCha20-Poly1305 as well as authenticating them.
        #[arg(long)]
        encrypt: bool,
        /// Complete members needed for success when some never complete.
        #[arg(long)]
        quorum: Option<usize>,
        #[arg(long, default_value_t = 1)]
        assignment_id: u64,
        #[arg(long, default_value_t = 1)]
        ttl: u32,
        /// FILE's BLAKE3 (hex), when already known (`cmover mctp hash FILE`, or an assignment's
        /// manifest): the session starts without a pass over the file first. A wrong value
        /// fails every receiver's verification, so nothing is delivered.
        #[arg(long, value_parser = parse_hash)]
        blake3: Option<[u8; 32]>,
        #[command(flatten)]
        secret: Secret,
    },
    /// Print FILE's BLAKE3 (hex), as `send --blake3` takes it.
    Hash { file: PathBuf },
    /// Receive one assignment from the group into DIR and print where it landed.
    Receive {
        #[arg(long)]
        group: SocketAddr,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1")]
        interface: Ipv4Addr,
        /// This member's id (default: random).
        #[arg(long)]
        member_id: Option<u64>,
        /// Give up after this many seconds without a delivery.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
        /// Benchmarks only: drop this share of incoming datagrams in the driver.
        #[arg(long, default_value_t = 0.0)]
        inject_loss: f64,
        /// Port of this member's unicast socket (reports leave from it; with --no-multicast the
        /// whole session arrives on it, and the sender names it in --members ID@ADDR:PORT).
        /// 0: any free port.
        #[arg(long, default_value_t = 0)]
        unicast_port: u16,
        /// Do not join the multicast group: receive the session by unicast only.
        #[arg(long)]
        no_multicast: bool,
        /// fsync the file before reporting complete (survives a crash of this host).
        #[arg(long)]
        fsync: bool,
        #[command(flatten)]
        secret: Secret,
    },
}

fn parse_hash(s: &str) -> Result<[u8; 32], String> {
    blake3::Hash::from_hex(s)
        .map(|h| *h.as_bytes())
        .map_err(|e| format!("not a BLAKE3 hash (64 hex digits): {e}"))
}

fn parse_member(s: &str) -> anyhow::Result<Member> {
    let (id, unicast) = match s.split_once('@') {
        Some((id, addr)) => {
            (id, Some(addr.parse().with_context(|| format!("member address in {s:?}"))?))
        }
        None => (s, None),
    };
    Ok(Member { id: id.parse().with_context(|| format!("member id in {s:?}"))?, unicast })
}

pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Send {
            file,
            group,
            interface,
            report_port,
            expect,
            members,
            max_rate_mbit,
            rate_mbit,
            max_lag_mib,
            checkpoint_mib,
            frame_size,
            encrypt,
            quorum,
            assignment_id,
            ttl,
            blake3,
            secret,
        } => {
            let mut config = SenderConfig::new(group, report_port);
            config.max_rate = max_rate_mbit * 125_000;
            config.initial_rate = rate_mbit.min(max_rate_mbit) * 125_000;
            config.min_rate = config.min_rate.min(config.initial_rate);
            config.max_lag_bytes = max_lag_mib << 20;
            config.checkpoint_bytes = checkpoint_mib << 20;
            config.frame_size = frame_size;
            config.encrypt = encrypt;
            config.quorum = quorum;
            config.min_participants = expect;
            let members =
                members.iter().map(|m| parse_member(m)).collect::<anyhow::Result<Vec<_>>>()?;
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("assignment").to_owned();
            let opts = SendOptions {
                config,
                interface,
                ttl,
                secret: secret.load()?,
                assignment: assignment_id,
                name,
                members,
                known_hash: blake3,
            };
            let out = send_file(&file, opts)
                .await
                .with_context(|| format!("sending {}", file.display()))?;
            let r = &out.report;
            let size = std::fs::metadata(&file)?.len();
            let secs = out.elapsed.as_secs_f64();
            println!(
                "mctp-send outcome={:?} size={size} elapsed_ms={} goodput_mbit={:.1} wire_bytes={} wire_ratio={:.4} frames_sent={} repairs={} checkpoints={} final_rate_mbit={} passes={} rounds={} complete={} incomplete={}",
                r.outcome,
                out.elapsed.as_millis(),
                size as f64 * 8.0 / secs / 1e6,
                out.wire_bytes,
                out.wire_bytes as f64 / size.max(1) as f64,
                out.stats.frames_sent,
                out.stats.repairs,
                out.stats.checkpoints,
                out.final_rate * 8 / 1_000_000,
                r.passes,
                r.rounds,
                r.complete.len(),
                r.incomplete.len(),
            );
            for (id, status) in &r.incomplete {
                println!("  member {id}: {status:?}");
            }
            if r.outcome == Outcome::Problem {
                bail!(
                    "session ended with a problem: {} of {} participants complete",
                    r.complete.len(),
                    r.complete.len() + r.incomplete.len()
                );
            }
            Ok(())
        }
        Command::Hash { file } => {
            let f = std::fs::File::open(&file)
                .with_context(|| format!("opening {}", file.display()))?;
            let hash = blake3::Hasher::new()
                .update_reader(f)
                .with_context(|| format!("reading {}", file.display()))?
                .finalize();
            println!("{hash}");
            Ok(())
        }
        Command::Receive {
            group,
            dir,
            interface,
            member_id,
            timeout_secs,
            inject_loss,
            unicast_port,
            no_multicast,
            fsync,
            secret,
        } => {
            let mut opts = ReceiveOptions::new(
                group,
                interface,
                member_id.unwrap_or_else(rand::random),
                secret.load()?,
                dir,
            );
            opts.timeout = Duration::from_secs(timeout_secs);
            opts.linger = Duration::from_secs(3);
            opts.inject_loss = inject_loss;
            opts.unicast_port = unicast_port;
            opts.join_group = !no_multicast;
            opts.durable = fsync;
            let got = receive(opts).await?;
            println!(
                "mctp-receive path={} size={} already_held={} frames={} duplicates={} coded_used={} coded_useless={} coded_lacking_several={} dropped={}",
                got.path.display(),
                got.info.size,
                got.already_held,
                got.stats.frames,
                got.stats.duplicates,
                got.stats.coded_used,
                got.stats.coded_useless,
                got.stats.coded_lacking_several,
                got.stats.dropped.total()
            );
            Ok(())
        }
    }
}
