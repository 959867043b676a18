//! Assignments side by side with rsync, plus delta, apply and commit figures. Prints a table.
//!
//! `cargo bench -p cm-site --bench vs_rsync` runs the full sizes (1 GiB tree, 1 GiB file,
//! 10,000-file site); environment variables shrink them:
//! `CM_BENCH_TREE_MB`, `CM_BENCH_FILE_MB`, `CM_BENCH_SITE_FILES`, `CM_BENCH_RSS_MB` (0 skips
//! the peak-RSS runs; `CM_BENCH_RSS_DELTA=0` skips their delta half, so the source is removed
//! before the apply and the disk holds at most the source and the assignment, or the assignment and
//! the site), `CM_BENCH_DETECT_FILES` (files in the change-detection memory run, 0 skips it). Data lives under a temporary directory (`TMPDIR` to move it).
//! rsync is run as `rsync -a --no-whole-file --stats` (and with `-z`) from staging into a copy
//! of the shadow tree: the delta algorithm, as between two hosts.

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, UNIX_EPOCH};

use cm_assignment::{AssignmentType, BuildOptions, build, delta};
use cm_site::{NativeInterpreter, Site, SiteConfig};

const MB: u64 = 1 << 20;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Deterministic bytes: xorshift noise (incompressible) or text-like (compressible).
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn noise(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
    fn text(&mut self, n: usize) -> Vec<u8> {
        const WORDS: [&str; 12] = [
            "<div class=\"item\">",
            "</div>\n",
            "content ",
            "mover ",
            "<p>",
            "</p>",
            "release ",
            "server ",
            "the ",
            "a ",
            "<li>",
            "group ",
        ];
        let mut v = Vec::with_capacity(n + 32);
        while v.len() < n {
            v.extend_from_slice(WORDS[(self.next() % 12) as usize].as_bytes());
        }
        v.truncate(n);
        v
    }
}

fn set_mtime(p: &Path, secs: u64) {
    let f = fs::File::options().write(true).open(p).unwrap();
    f.set_modified(UNIX_EPOCH + Duration::from_secs(secs)).unwrap();
}

fn cp_a(from: &Path, to: &Path) {
    assert!(Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap().success());
}

fn drop_dir(p: &Path) {
    let _ = fs::remove_dir_all(p);
}

/// Runs rsync from `staging/` into a fresh copy of `shadow`; returns (bytes sent, seconds).
fn rsync(staging: &Path, shadow: &Path, scratch: &Path, compress: bool) -> (u64, f64) {
    let dest = scratch.join("rsync-dest");
    drop_dir(&dest);
    cp_a(shadow, &dest);
    sync();
    let mut cmd = Command::new("rsync");
    cmd.args(["-a", "--no-whole-file", "--stats"]);
    if compress {
        cmd.arg("-z");
    }
    let t = Instant::now();
    let out = cmd
        .arg(format!("{}/", staging.display()))
        .arg(format!("{}/", dest.display()))
        .output()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "rsync failed: {}", String::from_utf8_lossy(&out.stderr));
    let stats = String::from_utf8_lossy(&out.stdout);
    let sent = stats
        .lines()
        .find_map(|l| l.strip_prefix("Total bytes sent: "))
        .map(|v| v.replace([',', '.'], "").trim().parse().unwrap())
        .expect("rsync --stats prints Total bytes sent");
    drop_dir(&dest);
    (sent, secs)
}

fn sync() {
    let _ = Command::new("sync").status();
}

/// Our side: (assignment bytes, seconds to build).
fn ours(staging: &Path, shadow: &Path, out: &Path) -> (u64, f64) {
    let t = Instant::now();
    let r =
        build(staging, Some(shadow), out, &BuildOptions::new(AssignmentType::Publish, 2)).unwrap();
    (r.file_len, t.elapsed().as_secs_f64())
}

struct Table(Vec<[String; 4]>);

impl Table {
    fn row(&mut self, what: &str, ours: String, rsync: String, note: String) {
        // Also at once on stderr, so a long run shows progress.
        eprintln!("{what}: {ours} | {rsync} | {note}");
        self.0.push([what.into(), ours, rsync, note]);
    }
}

fn mixed_tree(root: &Path, total: u64, g: &mut Gen) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut left = total;
    let mut i = 0u64;
    while left > 0 {
        // Sizes from 1 KiB to ~1 MiB, skewed small; half text (html), half binary (jpg, bin).
        let size = (1024u64 << (g.next() % 11)).min(left.max(1));
        let (ext, bytes) = match i % 4 {
            0 | 1 => ("html", g.text(size as usize)),
            2 => ("jpg", g.noise(size as usize)),
            _ => ("bin", g.noise(size as usize)),
        };
        let p = root.join(format!("d{:02}/s{:02}/f{i:06}.{ext}", i % 37, i % 11));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, bytes).unwrap();
        set_mtime(&p, 1_000_000);
        files.push(p);
        left = left.saturating_sub(size);
        i += 1;
    }
    files
}

/// Changes 1 % of the files a little: a few bytes overwritten, a few inserted.
fn touch_one_percent(files: &[PathBuf], g: &mut Gen) -> usize {
    let mut n = 0;
    for f in files.iter().step_by(100) {
        let mut b = fs::read(f).unwrap();
        let at = (g.next() % b.len() as u64) as usize;
        let end = (at + 16).min(b.len());
        b[at..end].copy_from_slice(&g.noise(end - at));
        let ins = (g.next() % b.len() as u64) as usize;
        b.splice(ins..ins, g.noise(8));
        fs::write(f, b).unwrap();
        set_mtime(f, 2_000_000);
        n += 1;
    }
    n
}

fn gib_s(bytes: u64, secs: f64) -> String {
    format!("{:.2} GiB/s", bytes as f64 / (1u64 << 30) as f64 / secs)
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--rss-child") {
        return rss_child();
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let tree_mb = env("CM_BENCH_TREE_MB", 1024);
    let file_mb = env("CM_BENCH_FILE_MB", 1024);
    let site_files = env("CM_BENCH_SITE_FILES", 10_000);
    let rss_mb = env("CM_BENCH_RSS_MB", 1024);
    let detect_files = env("CM_BENCH_DETECT_FILES", 100_000);
    let rss_delta = env("CM_BENCH_RSS_DELTA", 1) != 0;
    let scratch = tempfile::tempdir().unwrap();
    let s = scratch.path();
    let mut g = Gen(0x1234_5678_9abc_def1);
    let mut t = Table(Vec::new());

    // 1. Mixed tree, 1 % of the files changed a little.
    let (shadow, staging) = (s.join("tree-shadow"), s.join("tree-staging"));
    let files = mixed_tree(&shadow, tree_mb * MB, &mut g);
    cp_a(&shadow, &staging);
    let staged: Vec<PathBuf> =
        files.iter().map(|f| staging.join(f.strip_prefix(&shadow).unwrap())).collect();
    let changed = touch_one_percent(&staged, &mut g);
    sync();
    let (a_bytes, a_secs) = ours(&staging, &shadow, &s.join("tree.cma"));
    let (r_bytes, r_secs) = rsync(&staging, &shadow, s, false);
    let (rz_bytes, rz_secs) = rsync(&staging, &shadow, s, true);
    let what = format!("tree {tree_mb} MiB, {} files, {changed} changed", files.len());
    t.row(
        &format!("{what}: bytes"),
        a_bytes.to_string(),
        format!("{r_bytes} (-z: {rz_bytes})"),
        format!("{:.2}× rsync", a_bytes as f64 / r_bytes as f64),
    );
    t.row(
        &format!("{what}: seconds"),
        format!("{a_secs:.3}"),
        format!("{r_secs:.3} (-z: {rz_secs:.3})"),
        format!("{:.2}× rsync", a_secs / r_secs),
    );

    // Apply throughput: the whole tree as a replicate, then the 1 % publish, via the native interpreter.
    let site = Site::open(&s.join("site-tree"), SiteConfig::default()).unwrap();
    let full = s.join("tree-full.cma");
    build(&shadow, None, &full, &BuildOptions::new(AssignmentType::Replicate, 1)).unwrap();
    sync();
    let t0 = Instant::now();
    let r = site.apply(&full, &mut NativeInterpreter).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    t.row(
        "apply replicate of the tree (verify, decompress, write, check, sync)",
        format!("{secs:.3} s"),
        "-".into(),
        format!("{} of content", gib_s(r.bytes_written, secs)),
    );
    site.commit(Some(1), &mut NativeInterpreter).unwrap();
    let t0 = Instant::now();
    let r = site.apply(&s.join("tree.cma"), &mut NativeInterpreter).unwrap();
    t.row(
        "apply the 1 % publish (hard-link clone + changes)",
        format!("{:.3} s", t0.elapsed().as_secs_f64()),
        "-".into(),
        format!("{} files linked", r.linked),
    );
    drop(site);
    drop_dir(&s.join("site-tree"));
    for p in [&staging, &shadow] {
        drop_dir(p);
    }
    let _ = fs::remove_file(s.join("tree-full.cma"));

    // 2. One big file, 1 MiB changed in the middle.
    let (shadow, staging) = (s.join("file-shadow"), s.join("file-staging"));
    fs::create_dir_all(&shadow).unwrap();
    fs::create_dir_all(&staging).unwrap();
    {
        let mut f = fs::File::create(shadow.join("big.bin")).unwrap();
        for _ in 0..file_mb {
            f.write_all(&g.noise(MB as usize)).unwrap();
        }
    }
    set_mtime(&shadow.join("big.bin"), 1_000_000);
    fs::copy(shadow.join("big.bin"), staging.join("big.bin")).unwrap();
    let f = fs::File::options().write(true).open(staging.join("big.bin")).unwrap();
    let mid = file_mb * MB / 2;
    f.write_all_at(&g.noise(MB.min(file_mb * MB / 4) as usize), mid).unwrap();
    drop(f);
    set_mtime(&staging.join("big.bin"), 2_000_000);
    sync();
    let (a_bytes, a_secs) = ours(&staging, &shadow, &s.join("file.cma"));
    let (r_bytes, r_secs) = rsync(&staging, &shadow, s, false);
    let what = format!("one {file_mb} MiB file, 1 MiB changed mid-file");
    t.row(
        &format!("{what}: bytes"),
        a_bytes.to_string(),
        r_bytes.to_string(),
        format!("{:.3}× rsync", a_bytes as f64 / r_bytes as f64),
    );
    t.row(
        &format!("{what}: seconds"),
        format!("{a_secs:.3}"),
        format!("{r_secs:.3}"),
        format!("{:.2}× rsync", a_secs / r_secs),
    );

    // Delta throughput, one core (both files' bytes over the time): in-place change (settled by
    // the comparison at equal offsets), a byte inserted at the front (settled by prefix and
    // suffix), and unrelated content (the base cut and indexed, the new file cut in bursts).
    let base = fs::File::open(shadow.join("big.bin")).unwrap();
    let new = fs::File::open(staging.join("big.bin")).unwrap();
    let t0 = Instant::now();
    delta::compute(&base, &new, &mut std::io::sink()).unwrap();
    t.row(
        "delta, in-place 1 MiB change (per core)",
        gib_s(2 * file_mb * MB, t0.elapsed().as_secs_f64()),
        "-".into(),
        "both files read and hashed".into(),
    );
    let shifted_path = s.join("shifted.bin");
    {
        let mut out = fs::File::create(&shifted_path).unwrap();
        out.write_all(b"!").unwrap();
        std::io::copy(&mut fs::File::open(shadow.join("big.bin")).unwrap(), &mut out).unwrap();
    }
    let shifted = fs::File::open(&shifted_path).unwrap();
    let t0 = Instant::now();
    let d = delta::compute(&base, &shifted, &mut std::io::sink()).unwrap();
    t.row(
        "delta, 1 byte inserted at the front (per core)",
        gib_s(2 * file_mb * MB, t0.elapsed().as_secs_f64()),
        "-".into(),
        format!("{} literal bytes, {} ops", d.literal, d.ops.len()),
    );
    let unrelated_mb = file_mb.min(256);
    let unrelated_path = s.join("unrelated.bin");
    {
        let mut out = fs::File::create(&unrelated_path).unwrap();
        for _ in 0..unrelated_mb {
            out.write_all(&g.noise(MB as usize)).unwrap();
        }
    }
    let unrelated = fs::File::open(&unrelated_path).unwrap();
    let base_part = s.join("base-part.bin");
    fs::write(&base_part, {
        let mut v = vec![0u8; (unrelated_mb * MB) as usize];
        base.read_exact_at(&mut v, 0).unwrap();
        v
    })
    .unwrap();
    let t0 = Instant::now();
    delta::compute(&fs::File::open(&base_part).unwrap(), &unrelated, &mut std::io::sink()).unwrap();
    t.row(
        &format!("delta, {unrelated_mb} MiB of unrelated content (per core, worst case)"),
        gib_s(2 * unrelated_mb * MB, t0.elapsed().as_secs_f64()),
        "-".into(),
        "every cut of the new file missing".into(),
    );
    for p in [&shifted_path, &unrelated_path, &base_part] {
        let _ = fs::remove_file(p);
    }

    // Apply of the big delta.
    let site = Site::open(&s.join("site-file"), SiteConfig::default()).unwrap();
    build(
        &shadow,
        None,
        &s.join("file-full.cma"),
        &BuildOptions::new(AssignmentType::Replicate, 1),
    )
    .unwrap();
    site.apply(&s.join("file-full.cma"), &mut NativeInterpreter).unwrap();
    site.commit(Some(1), &mut NativeInterpreter).unwrap();
    let _ = fs::remove_file(s.join("file-full.cma"));
    sync();
    let t0 = Instant::now();
    let r = site.apply(&s.join("file.cma"), &mut NativeInterpreter).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    t.row(
        "apply the 1 MiB-change delta to the big file",
        format!("{secs:.3} s"),
        "-".into(),
        format!("{} of file rebuilt+checked", gib_s(r.bytes_written, secs)),
    );
    drop(site);
    drop_dir(&s.join("site-file"));
    // Disk is shared: free the big file's trees before the next sections.
    for p in [&shadow, &staging] {
        drop_dir(p);
    }
    let _ = fs::remove_file(s.join("file.cma"));

    // 3. Commit duration for a site of N files.
    let site_tree = s.join("site-src");
    for i in 0..site_files {
        let p = site_tree.join(format!("d{:03}/f{i:06}.html", i % 100));
        if i < 100 {
            fs::create_dir_all(p.parent().unwrap()).unwrap();
        }
        fs::write(&p, g.text(512)).unwrap();
    }
    let site = Site::open(&s.join("site-many"), SiteConfig::default()).unwrap();
    build(
        &site_tree,
        None,
        &s.join("many-1.cma"),
        &BuildOptions::new(AssignmentType::Replicate, 1),
    )
    .unwrap();
    site.apply(&s.join("many-1.cma"), &mut NativeInterpreter).unwrap();
    site.commit(Some(1), &mut NativeInterpreter).unwrap();
    let v2 = s.join("site-src2");
    cp_a(&site_tree, &v2);
    fs::write(v2.join("d000/f000000.html"), "changed").unwrap();
    build(
        &v2,
        Some(&site_tree),
        &s.join("many-2.cma"),
        &BuildOptions::new(AssignmentType::Publish, 2),
    )
    .unwrap();
    let t0 = Instant::now();
    let r = site.apply(&s.join("many-2.cma"), &mut NativeInterpreter).unwrap();
    let build_secs = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    site.commit(Some(2), &mut NativeInterpreter).unwrap();
    let commit = t0.elapsed();
    let t0 = Instant::now();
    site.rollback(&mut NativeInterpreter).unwrap();
    let rollback = t0.elapsed();
    t.row(
        &format!("commit, {site_files}-file site"),
        format!("{:.2} ms", commit.as_secs_f64() * 1e3),
        "-".into(),
        format!("rollback {:.2} ms", rollback.as_secs_f64() * 1e3),
    );
    t.row(
        &format!("build release from live, {site_files}-file site"),
        format!("{build_secs:.3} s"),
        "-".into(),
        format!("{} hard links", r.linked),
    );
    drop(site);

    // 4. Peak RSS of building and applying a large assignment, each in a child process.
    if rss_mb > 0 {
        let big = s.join("rss-src");
        fs::create_dir_all(&big).unwrap();
        {
            let mut f = fs::File::create(big.join("huge.bin")).unwrap();
            for _ in 0..rss_mb {
                f.write_all(&g.noise(MB as usize)).unwrap();
            }
            let mut h = fs::File::create(big.join("huge.html")).unwrap();
            for _ in 0..rss_mb / 4 {
                h.write_all(&g.text(MB as usize)).unwrap();
            }
        }
        let out = s.join("rss.cma");
        let build_rss = rss_of(&["build", big.to_str().unwrap(), out.to_str().unwrap()]);
        let size = fs::metadata(&out).unwrap().len();
        if !rss_delta {
            drop_dir(&big);
        }
        let site_dir = s.join("site-rss");
        let apply_rss =
            rss_of(&["apply", out.to_str().unwrap(), site_dir.to_str().unwrap(), "commit"]);
        let _ = fs::remove_file(&out);
        t.row(
            &format!("peak RSS, build {} MiB replicate assignment", size / MB),
            format!("{} MiB", build_rss / 1024),
            "-".into(),
            "child process, VmHWM".into(),
        );
        t.row(
            &format!("peak RSS, apply {} MiB replicate assignment", size / MB),
            format!("{} MiB", apply_rss / 1024),
            "-".into(),
            "child process, VmHWM".into(),
        );
        let big2 = s.join("rss-src2");
        if rss_delta {
            // A delta build and apply of the same big files: 1 MiB changed in the middle of each.
            cp_a(&big, &big2);
            for name in ["huge.bin", "huge.html"] {
                let f = fs::File::options().write(true).open(big2.join(name)).unwrap();
                let len = f.metadata().unwrap().len();
                f.write_all_at(&g.noise(MB.min(len / 4) as usize), len / 2).unwrap();
                drop(f);
                set_mtime(&big2.join(name), 3_000_000);
            }
            let out = s.join("rss-delta.cma");
            let delta_rss = rss_of(&[
                "build-delta",
                big2.to_str().unwrap(),
                big.to_str().unwrap(),
                out.to_str().unwrap(),
            ]);
            let apply_delta_rss =
                rss_of(&["apply", out.to_str().unwrap(), site_dir.to_str().unwrap()]);
            t.row(
                &format!("peak RSS, build delta of {} MiB of files", (rss_mb + rss_mb / 4)),
                format!("{} MiB", delta_rss / 1024),
                "-".into(),
                "child process, VmHWM".into(),
            );
            t.row(
                &format!(
                    "peak RSS, apply that delta ({} KiB assignment)",
                    fs::metadata(&out).unwrap().len() / 1024
                ),
                format!("{} MiB", apply_delta_rss / 1024),
                "-".into(),
                "child process, VmHWM".into(),
            );
        }
        for p in [&big, &big2, &site_dir] {
            drop_dir(p);
        }
    }

    // 5. Change detection's memory over a tree of many small files (1 % changed), each in a
    // child process: the build (both trees walked a directory at a time) next to merely
    // scanning both trees into maps, what the build did before.
    if detect_files > 0 {
        let (shadow, staging) = (s.join("detect-shadow"), s.join("detect-staging"));
        for i in 0..detect_files {
            let p = shadow.join(format!("d{:03}/s{:02}/f{i:06}.html", i % 500, i % 20));
            if i < 10_000 {
                fs::create_dir_all(p.parent().unwrap()).unwrap();
            }
            fs::write(&p, g.text(200)).unwrap();
        }
        cp_a(&shadow, &staging);
        for i in (0..detect_files).step_by(100) {
            let p = staging.join(format!("d{:03}/s{:02}/f{i:06}.html", i % 500, i % 20));
            fs::write(&p, g.text(210)).unwrap();
        }
        let out = s.join("detect.cma");
        let (sh, st, o) =
            (shadow.to_str().unwrap(), staging.to_str().unwrap(), out.to_str().unwrap());
        let scan_rss = rss_of(&["scan-both", st, sh]);
        let build_rss = rss_of(&["build-delta", st, sh, o]);
        let base_rss = rss_of(&["nothing"]);
        t.row(
            &format!("peak RSS, change detection over two {detect_files}-file trees"),
            format!("{} MiB", build_rss / 1024),
            "-".into(),
            format!(
                "both trees scanned into maps: {} MiB; an idle child: {} MiB",
                scan_rss / 1024,
                base_rss / 1024
            ),
        );
        let _ = fs::remove_file(&out);
        for p in [&shadow, &staging] {
            drop_dir(p);
        }
    }

    println!("\n{:<72} {:>16} {:>32}  note", "figure", "ours", "rsync");
    for [a, b, c, d] in &t.0 {
        println!("{a:<72} {b:>16} {c:>32}  {d}");
    }
}

/// Runs this bench binary as a child doing one step; returns the child's peak RSS in KiB
/// (its own `VmHWM`, printed as its last line: `getrusage(RUSAGE_CHILDREN)` would report the
/// largest of all children so far, not this one).
fn rss_of(args: &[&str]) -> u64 {
    let out = Command::new(std::env::current_exe().unwrap())
        .arg("--rss-child")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "child {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("VmHWM-KiB "))
        .and_then(|v| v.trim().parse().ok())
        .expect("child prints VmHWM-KiB")
}

/// Peak resident set of this process so far, in KiB.
fn vm_hwm_kib() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("/proc/self/status has VmHWM")
}

fn rss_child() {
    let a: Vec<String> = std::env::args().skip(2).collect();
    match a[0].as_str() {
        "build" => {
            build(
                Path::new(&a[1]),
                None,
                Path::new(&a[2]),
                &BuildOptions::new(AssignmentType::Replicate, 1),
            )
            .unwrap();
        }
        "build-delta" => {
            // a[1] = staging, a[2] = shadow, a[3] = output
            build(
                Path::new(&a[1]),
                Some(Path::new(&a[2])),
                Path::new(&a[3]),
                &BuildOptions::new(AssignmentType::Publish, 2),
            )
            .unwrap();
        }
        "scan-both" => {
            // a[1], a[2]: the trees; what change detection held before it walked them.
            let (x, y) = (
                cm_assignment::detect::scan(Path::new(&a[1])).unwrap(),
                cm_assignment::detect::scan(Path::new(&a[2])).unwrap(),
            );
            std::hint::black_box((x.len(), y.len()));
        }
        "nothing" => {}
        "apply" => {
            let site = Site::open(Path::new(&a[2]), SiteConfig::default()).unwrap();
            site.apply(Path::new(&a[1]), &mut NativeInterpreter).unwrap();
            if a.get(3).map(String::as_str) == Some("commit") {
                site.commit(None, &mut NativeInterpreter).unwrap();
            }
        }
        other => panic!("unknown child step {other}"),
    }
    println!("VmHWM-KiB {}", vm_hwm_kib());
}
