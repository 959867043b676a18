//! Delta computation speed on one core, without the site or the plugin host around it:
//! `cargo bench -p cm-assignment --bench delta_speed [-- MiB]` (default 256 MiB per file).
//! Rows: two unrelated files (the worst case: every byte goes through the rolling scan), and a
//! file with a few in-place edits and a 1-byte insertion (the scan runs from the first edit).

use std::time::Instant;
fn main() {
    let mb: usize = std::env::args().skip(1).find(|a| !a.starts_with("--")).map(|s| s.parse().expect("size in MiB")).unwrap_or(256);
    let dir = tempfile::tempdir().unwrap();
    let mut s: u64 = 1;
    let mut rnd = |n: usize| { let mut v = vec![0u8; n]; for c in v.chunks_mut(8) { s ^= s << 13; s ^= s >> 7; s ^= s << 17; c.copy_from_slice(&s.to_le_bytes()[..c.len()]); } v };
    let a = rnd(mb << 20); let b = rnd(mb << 20);
    let mut c = a.clone(); c[1000] ^= 1; c.insert(5 << 20, 7); c[(mb << 20) - 77] ^= 3;
    std::fs::write(dir.path().join("a"), &a).unwrap();
    std::fs::write(dir.path().join("b"), &b).unwrap();
    std::fs::write(dir.path().join("c"), &c).unwrap();
    for (name, other) in [("nothing in common", "b"), ("edits + 1-byte insert", "c")] {
        let fa = std::fs::File::open(dir.path().join("a")).unwrap();
        let fb = std::fs::File::open(dir.path().join(other)).unwrap();
        let t = Instant::now();
        let d = cm_assignment::delta::compute(&fa, &fb, &mut std::io::sink()).unwrap();
        let e = t.elapsed().as_secs_f64();
        println!("| {name:<22} | {mb:>5} MiB | {e:>7.3} s | {:>5.2} GiB/s | literal {:>10} B |", (mb as f64 / 1024.0) / e, d.literal);
    }
}
