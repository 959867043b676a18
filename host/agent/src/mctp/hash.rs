//! The send driver's thread pool for hashing a file frame by frame before an MCTP session.
//!
//! When a GL does not know the file's BLAKE3 and its frames are tree-tagged, it hashes the file
//! on every core: `cm_mctp::tree` cuts the frames into ranges and assembles the ranges' chaining
//! values into the file's hash; this module owns the threads (the sans-IO core starts none).

use cm_mctp::tree;

/// A frame's BLAKE3 chaining value.
type ChainingValue = [u8; 32];

/// BLAKE3 of `size` bytes read by `read(offset, buf)` in frames of `frame_size`, on `threads`
/// threads (each hashes a contiguous range of frames, at most [`tree::MAX_PARTS`]), and every
/// frame's CV when there are at most [`tree::MAX_KEPT_CVS`] frames. `frame_size` must fit the
/// tree and `size` exceed one frame. `read` must fill `buf` exactly; an error (the first range's
/// with one) is returned once every thread has stopped.
pub fn hash_frames<E: Send>(
    size: u64,
    frame_size: u16,
    threads: usize,
    read: impl Fn(u64, &mut [u8]) -> Result<(), E> + Sync,
) -> Result<([u8; 32], Option<Vec<ChainingValue>>), E> {
    let ranges = tree::frame_ranges(size, frame_size, threads);
    let frames = ranges.last().map_or(0, |r| r.end);
    let parts: Vec<Result<Vec<ChainingValue>, E>> = std::thread::scope(|scope| {
        let read = &read;
        let handles: Vec<_> = ranges
            .into_iter()
            .map(|range| scope.spawn(move || tree::range_cvs(size, frame_size, range, read)))
            .collect();
        handles.into_iter().map(|h| h.join().expect("hashing thread panicked")).collect()
    });
    let parts = parts.into_iter().collect::<Result<Vec<_>, E>>()?;
    Ok(tree::assemble(frames, parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_blake3_on_any_thread_count() {
        for (len, fs) in
            [(2049usize, 1024u16), (5 << 20, 8192), ((3 << 20) + 17, 2048), (70_000, 32768)]
        {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
            let cvs: Vec<ChainingValue> = data
                .chunks(usize::from(fs))
                .enumerate()
                .map(|(i, c)| tree::frame_cv((i * usize::from(fs)) as u64, c))
                .collect();
            for threads in [1, 2, 3, 7] {
                let (root, kept) = hash_frames::<()>(len as u64, fs, threads, |off, buf| {
                    buf.copy_from_slice(&data[off as usize..off as usize + buf.len()]);
                    Ok(())
                })
                .unwrap();
                assert_eq!(
                    root,
                    *blake3::hash(&data).as_bytes(),
                    "len {len} fs {fs} threads {threads}"
                );
                assert_eq!(kept.unwrap(), cvs);
            }
        }
        let failed =
            hash_frames(10_000, 1024, 2, |off, _| if off >= 4096 { Err("disk") } else { Ok(()) });
        assert_eq!(failed, Err("disk"));
    }
}
