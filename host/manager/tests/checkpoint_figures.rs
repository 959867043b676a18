//! Figures for checkpoints (ignored: a short measurement, not a test): a 1 GiB, 10,000-file
//! site — half its files text-like, half random bytes — checkpointed, then 1 % of its files
//! changed and committed, then the checkpoint restored against that live release.
//!
//! ```text
//! cargo test --release -p cm-manager --test checkpoint_figures -- --ignored --nocapture
//! ```
//! (`CM_FIGURES_FILES` and `CM_FIGURES_BYTES` shrink or grow the site.)

use std::path::Path;
use std::time::Instant;

use cm_manager::checkpoint::{create, prepare_restore};
use cm_manager::model::HostedSite;
use cm_manager::prepare::{Context, snapshot_dir, snapshot_tree};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Fills `root` with `files` files of `total` bytes in all, 100 to a directory.
fn make_site(root: &Path, files: u64, total: u64) {
    let per = total / files;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut random = |buf: &mut [u8]| {
        for chunk in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
    };
    let mut buf = vec![0u8; per as usize];
    for i in 0..files {
        let dir = root.join(format!("d{:03}", i / 100));
        std::fs::create_dir_all(&dir).unwrap();
        if i % 2 == 0 {
            random(&mut buf);
            std::fs::write(dir.join(format!("f{i}.bin")), &buf).unwrap();
        } else {
            let mut text = String::with_capacity(per as usize);
            let mut n = i;
            while text.len() < per as usize {
                n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                text.push_str(&format!("<p>item {} of page {i}: {}</p>\n", n % 1000, n >> 40));
            }
            text.truncate(per as usize);
            std::fs::write(dir.join(format!("f{i}.html")), text).unwrap();
        }
    }
}

#[test]
#[ignore = "a measurement: run it by hand (see the module doc)"]
fn checkpoint_create_and_restore_figures() {
    let files = env("CM_FIGURES_FILES", 10_000);
    let total = env("CM_FIGURES_BYTES", 1 << 30);
    let d = tempfile::tempdir().unwrap();
    let (staging, data) = (d.path().join("staging"), d.path().join("data"));
    make_site(&staging, files, total);
    let mut site = HostedSite {
        name: "www".into(),
        content_group: "g".into(),
        staging: staging.display().to_string(),
        serial: 1,
        prepared: None,
        committed: vec![1],
        keep_releases: 2,
        holders: Default::default(),
        keep_checkpoints: 5,
        removed: Default::default(),
        filter: Default::default(),
        compression: Default::default(),
        golive: None,
        rotation: Default::default(),
        refresh: Default::default(),
        built: Default::default(),
        hot: Default::default(),
    };
    snapshot_tree(&staging, None, &snapshot_dir(&data, "www", 1)).unwrap();

    let t = Instant::now();
    let cp = create(&data, &site, 1, None, 0).unwrap();
    let create_s = t.elapsed().as_secs_f64();

    // 1 % of the files change (every 100th, a few bytes in the middle) and go live as release 2.
    for i in (0..files).step_by(100) {
        let ext = if i % 2 == 0 { "bin" } else { "html" };
        let p = staging.join(format!("d{:03}/f{i}.{ext}", i / 100));
        let mut b = std::fs::read(&p).unwrap();
        let mid = b.len() / 2;
        b[mid..mid + 8].copy_from_slice(b"CHANGED!");
        std::fs::write(&p, b).unwrap();
    }
    snapshot_tree(&staging, Some(&snapshot_dir(&data, "www", 1)), &snapshot_dir(&data, "www", 2))
        .unwrap();
    site.committed.push(2);
    site.serial = 2;

    let out = d.path().join("restore.cma");
    let ctx = Context { data_dir: &data, seal: None, signer: None };
    let t = Instant::now();
    let p = prepare_restore(&cp, &site, 3, 1, ctx, &out).unwrap();
    let restore_s = t.elapsed().as_secs_f64();
    let restore_len = std::fs::metadata(&out).unwrap().len();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!("site: {files} files, {:.0} MiB (half random, half text)", mib(total));
    println!(
        "checkpoint create: {create_s:.1} s, archive {:.0} MiB ({:.0} % of the content)",
        mib(cp.size),
        100.0 * cp.size as f64 / total as f64
    );
    println!(
        "restore prepare (verify + unpack + delta against live): {restore_s:.1} s, assignment {:.1} MiB",
        mib(restore_len)
    );
    println!("  {}", p.summary);
}
