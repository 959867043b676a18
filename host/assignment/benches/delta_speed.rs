//! Delta computation speed on one core, without the site or the plugin host around it:
//! `cargo bench -p cm-assignment --bench delta_speed [-- MiB [runs]]` (default 256 MiB per
//! file, 3 runs). Throughput is one file's size over the time (wall clock, and this process's
//! CPU time, which the other load of a shared machine disturbs less), the median of the runs.
//! The first row is the floor every case pays: reading both files and hashing them with
//! BLAKE3; "× floor" is each row's CPU time over the floor's, measured right before it in
//! each run (the median of those ratios).

use std::io::Read;
use std::time::Instant;

fn cpu_secs() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes the struct it is given.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) }, 0);
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn hash_both(a: &std::path::Path, b: &std::path::Path) -> u64 {
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0;
    for p in [a, b] {
        let mut f = std::fs::File::open(p).unwrap();
        let mut h = blake3::Hasher::new();
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        total += h.finalize().as_bytes()[0] as u64;
    }
    total
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let mb: usize = args.first().map(|s| s.parse().expect("size in MiB")).unwrap_or(256);
    let runs: usize = args.get(1).map(|s| s.parse().expect("number of runs")).unwrap_or(3);
    // Median (wall, CPU) seconds of `f` over the runs, and the median ratio of its CPU time to
    // the floor's, measured right before it in each run (the load of a shared machine changes
    // from second to second).
    let timed = |f: &mut dyn FnMut(), floor: &mut dyn FnMut()| -> (f64, f64, f64) {
        let (mut walls, mut cpus, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs.max(1) {
            let c0 = cpu_secs();
            floor();
            let floor_cpu = cpu_secs() - c0;
            let (t, c0) = (Instant::now(), cpu_secs());
            f();
            walls.push(t.elapsed().as_secs_f64());
            cpus.push(cpu_secs() - c0);
            ratios.push(cpus[cpus.len() - 1] / floor_cpu);
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        (median(walls), median(cpus), median(ratios))
    };
    let dir = tempfile::tempdir().unwrap();
    let mut s: u64 = 1;
    let mut rnd = |n: usize| {
        let mut v = vec![0u8; n];
        for c in v.chunks_mut(8) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            c.copy_from_slice(&s.to_le_bytes()[..c.len()]);
        }
        v
    };
    let len = mb << 20;
    let a = rnd(len);
    let path = |n: &str| dir.path().join(n);
    std::fs::write(path("a"), &a).unwrap();
    std::fs::write(path("unrelated"), rnd(len)).unwrap();
    let mut c = a.clone();
    c[1000] ^= 1;
    c.insert(5 << 20.min(len / 2), 7);
    c[len - 77] ^= 3;
    std::fs::write(path("edits"), &c).unwrap();
    let mut c = a.clone();
    let mid = len / 2;
    c[mid..mid + 4096].copy_from_slice(&rnd(4096));
    std::fs::write(path("in-place"), &c).unwrap();
    let mut c = vec![b'!'];
    c.extend_from_slice(&a);
    std::fs::write(path("shifted"), &c).unwrap();
    // Repeated content: a 4 KiB pattern over the whole file, with a few bytes changed.
    let pattern = rnd(4096);
    let rep: Vec<u8> = pattern.iter().copied().cycle().take(len).collect();
    std::fs::write(path("repeated"), &rep).unwrap();
    let mut c = rep.clone();
    c.splice(len / 3..len / 3, *b"xyz");
    std::fs::write(path("repeated-edit"), &c).unwrap();
    drop((a, c, rep));

    println!("{runs} runs each, medians");
    println!(
        "| case | size | wall | wall GiB/s | CPU GiB/s | × floor (CPU) | literal bytes | ops |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let gib = mb as f64 / 1024.0;
    let mut floor = || {
        std::hint::black_box(hash_both(&path("a"), &path("unrelated")));
    };
    let (floor_wall, floor_cpu, _) = timed(&mut floor, &mut || {});
    println!(
        "| floor: read + BLAKE3 of both files | {mb} MiB | {floor_wall:.3} s | {:.2} | {:.2} | 1.00 | - | - |",
        gib / floor_wall,
        gib / floor_cpu
    );
    for (name, base, other) in [
        ("nothing in common", "a", "unrelated"),
        ("edits + 1-byte insert", "a", "edits"),
        ("in-place 4 KiB change", "a", "in-place"),
        ("1 byte inserted at the front", "a", "shifted"),
        ("repeated 4 KiB pattern, 3 bytes inserted", "repeated", "repeated-edit"),
    ] {
        let fa = std::fs::File::open(path(base)).unwrap();
        let fb = std::fs::File::open(path(other)).unwrap();
        let mut d = None;
        let (wall, cpu, ratio) = timed(
            &mut || {
                d = Some(cm_assignment::delta::compute(&fa, &fb, &mut std::io::sink()).unwrap())
            },
            &mut floor,
        );
        let d = d.expect("ran");
        println!(
            "| {name} | {mb} MiB | {wall:.3} s | {:.2} | {:.2} | {ratio:.2} | {} | {} |",
            gib / wall,
            gib / cpu,
            d.literal,
            d.ops.len()
        );
    }
}
