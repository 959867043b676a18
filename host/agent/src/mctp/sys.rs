//! Batched Linux syscalls for the MCTP driver: `recvmmsg`/`sendmmsg` (many datagrams per
//! call), UDP GSO (`UDP_SEGMENT`: several equal datagrams cross the stack, veth and bridge as
//! one packet) and GRO (`UDP_GRO`: they reach the receiver as one), `ppoll` (sub-millisecond
//! waits for pacing), `pwritev` (contiguous frames in one write) and `sync_file_range` (start
//! writeback while receiving, so the final flush is short).
//!
//! Everything here is IPv4 (the driver refuses other groups before it gets here).

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::time::Duration;

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Most segments one GSO send may carry (the kernel's `UDP_MAX_SEGMENTS`).
pub const MAX_SEGMENTS: usize = 64;
/// Most bytes one GSO send may carry (one IP packet before segmentation).
pub const MAX_GSO_BYTES: usize = 65_000;

fn set_udp_opt(fd: RawFd, opt: libc::c_int, val: libc::c_int) -> bool {
    // SAFETY: setsockopt on a valid fd with a pointer to a c_int and its exact size.
    unsafe {
        libc::setsockopt(
            fd,
            SOL_UDP,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// True when the kernel offers UDP GSO on this socket (Linux 4.18+).
pub fn gso_supported(fd: RawFd) -> bool {
    set_udp_opt(fd, UDP_SEGMENT, 0)
}

/// Asks for coalesced receives (Linux 5.0+); false when unavailable (then every datagram
/// arrives on its own, which works just as well, only with more per-packet work).
pub fn enable_gro(fd: RawFd) -> bool {
    set_udp_opt(fd, UDP_GRO, 1)
}

/// Room for one `cmsghdr` carrying an int (`UDP_GRO`) or a u16 (`UDP_SEGMENT`), aligned.
const CMSG_SPACE: usize = 32;

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

fn from_sockaddr(s: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr)), u16::from_be(s.sin_port))
}

/// Buffers for up to `n` datagrams received by one `recvmmsg`.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    lens: Vec<usize>,
    from: Vec<libc::sockaddr_in>,
    /// Per message: the `UDP_GRO` segment size when the kernel coalesced several datagrams.
    segs: Vec<usize>,
    control: Vec<[u64; CMSG_SPACE / 8]>,
}

impl RecvBatch {
    /// `n` buffers of `size` bytes. Pages are touched only as far as datagrams reach, so a
    /// batch sized for the largest datagram costs resident memory only for the frames in use.
    pub fn new(n: usize, size: usize) -> Self {
        RecvBatch {
            bufs: (0..n).map(|_| vec![0u8; size]).collect(),
            lens: vec![0; n],
            from: vec![sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); n],
            segs: vec![0; n],
            control: vec![[0; CMSG_SPACE / 8]; n],
        }
    }

    /// Receives what is queued on `fd` without blocking; returns how many datagrams arrived
    /// (0 when none were waiting).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let n = self.bufs.len();
        let mut iovs: Vec<libc::iovec> = self
            .bufs
            .iter_mut()
            .map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() })
            .collect();
        // SAFETY: an all-zero mmsghdr is a valid "empty" header; every pointer set below points
        // into `iovs` and `self.from`, which outlive the call.
        let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_name = (&mut self.from[i] as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            m.msg_hdr.msg_control = self.control[i].as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = CMSG_SPACE as _;
        }
        // SAFETY: `msgs` holds `n` initialised headers whose buffers are valid for writing.
        let got = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock
                || e.kind() == io::ErrorKind::Interrupted
            {
                Ok(0)
            } else {
                Err(e)
            };
        }
        let got = got as usize;
        for (i, m) in msgs.iter().take(got).enumerate() {
            // A datagram longer than the buffer arrives truncated (MSG_TRUNC): its tag then
            // fails to verify and the core drops it.
            self.lens[i] = m.msg_len as usize;
            self.segs[i] = 0;
            // SAFETY: the kernel filled `msg_control` up to `msg_controllen`; the CMSG macros
            // walk it within those bounds.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&m.msg_hdr);
                while !c.is_null() {
                    if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                        let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                        self.segs[i] = usize::try_from(v).unwrap_or(0);
                    }
                    c = libc::CMSG_NXTHDR(&m.msg_hdr, c);
                }
            }
        }
        Ok(got)
    }

    /// Message `i` of the last `recv`, read-only.
    pub fn slice(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.lens[i]]
    }

    /// Message `i` of the last `recv`, with its source and, when GRO coalesced several
    /// datagrams into it, their size (every one but the last is exactly that long).
    pub fn get(&mut self, i: usize) -> (&mut [u8], SocketAddrV4, Option<usize>) {
        let seg = Some(self.segs[i]).filter(|s| *s > 0 && *s < self.lens[i]);
        (&mut self.bufs[i][..self.lens[i]], from_sockaddr(&self.from[i]), seg)
    }
}

/// One message to send: the concatenation of `pieces` to `to`; with `segment` set, the kernel
/// cuts it into datagrams of that many bytes (UDP GSO; the last may be shorter).
pub struct Outgoing<'a> {
    pub pieces: Vec<&'a [u8]>,
    pub to: SocketAddrV4,
    pub segment: Option<u16>,
}

/// Sends every message with as few `sendmmsg` calls as the socket buffer allows, waiting
/// briefly for room when it is full. A message the kernel refuses on its own is skipped (its
/// datagrams count as lost: the protocol repairs them). Returns how many messages went out and
/// the first refusal's error, if any.
pub fn send_batch(fd: RawFd, out: &[Outgoing<'_>]) -> (usize, Option<io::Error>) {
    let mut names: Vec<libc::sockaddr_in> = out.iter().map(|o| sockaddr(o.to)).collect();
    let mut iovs: Vec<Vec<libc::iovec>> = out
        .iter()
        .map(|o| {
            o.pieces
                .iter()
                .map(|b| libc::iovec {
                    iov_base: b.as_ptr() as *mut libc::c_void,
                    iov_len: b.len(),
                })
                .collect()
        })
        .collect();
    let mut control: Vec<[u64; CMSG_SPACE / 8]> = vec![[0; CMSG_SPACE / 8]; out.len()];
    // SAFETY: an all-zero mmsghdr is a valid empty header; every pointer set below points into
    // `names`, `iovs` and `control`, which outlive the calls, and at caller-owned buffers the
    // kernel only reads.
    let mut msgs: Vec<libc::mmsghdr> =
        (0..out.len()).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (i, m) in msgs.iter_mut().enumerate() {
        m.msg_hdr.msg_iov = iovs[i].as_mut_ptr();
        m.msg_hdr.msg_iovlen = iovs[i].len() as _;
        m.msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_in).cast();
        m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if let Some(seg) = out[i].segment {
            m.msg_hdr.msg_control = control[i].as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE(2) fits in the 32 bytes of `control[i]`; the macros stay
            // within `msg_controllen`.
            unsafe {
                m.msg_hdr.msg_controllen = libc::CMSG_SPACE(2) as _;
                let c = libc::CMSG_FIRSTHDR(&m.msg_hdr);
                (*c).cmsg_level = SOL_UDP;
                (*c).cmsg_type = UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(2) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
            }
        }
    }
    let mut done = 0;
    let mut full_waits = 0;
    let mut refused = None;
    while done < msgs.len() {
        let rest = &mut msgs[done..];
        // SAFETY: `rest` is a valid slice of initialised headers.
        let sent = unsafe {
            libc::sendmmsg(fd, rest.as_mut_ptr(), rest.len() as libc::c_uint, libc::MSG_DONTWAIT)
        };
        if sent > 0 {
            done += sent as usize;
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock if full_waits < 100 => {
                full_waits += 1;
                let _ = wait(&[(fd, libc::POLLOUT)], Duration::from_millis(10));
            }
            // The first message of the rest failed on its own (a firewall refused it, GSO is
            // not available on the route): skip it and go on with the others.
            _ => {
                done += 1;
                refused.get_or_insert(e);
            }
        }
    }
    (done, refused)
}

/// Waits until one of `fds` is ready for its event, or `timeout`; returns which are ready.
pub fn wait(fds: &[(RawFd, libc::c_short)], timeout: Duration) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> =
        fds.iter().map(|(fd, ev)| libc::pollfd { fd: *fd, events: *ev, revents: 0 }).collect();
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(3600) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `p` is a valid array of pollfd of the given length; `ts` outlives the call.
    let rc = unsafe { libc::ppoll(p.as_mut_ptr(), p.len() as libc::nfds_t, &ts, std::ptr::null()) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(vec![false; fds.len()])
        } else {
            Err(e)
        };
    }
    Ok(p.iter().map(|x| x.revents != 0).collect())
}

/// Writes `pieces` back to back at `offset`, with one `pwritev` per 1 024 pieces.
pub fn pwrite_all(file: &File, pieces: &[&[u8]], mut offset: u64) -> io::Result<()> {
    for group in pieces.chunks(1024) {
        let iovs: Vec<libc::iovec> = group
            .iter()
            .map(|b| libc::iovec { iov_base: b.as_ptr() as *mut libc::c_void, iov_len: b.len() })
            .collect();
        let total: usize = group.iter().map(|b| b.len()).sum();
        let off =
            libc::off_t::try_from(offset).map_err(|_| io::Error::other("offset past off_t"))?;
        // SAFETY: the iovecs point at live, readable buffers of the stated lengths.
        let n = unsafe {
            libc::pwritev(file.as_raw_fd(), iovs.as_ptr(), iovs.len() as libc::c_int, off)
        };
        let mut written = if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
            0
        } else {
            n as usize
        };
        // A short write: finish the rest piece by piece.
        if written < total {
            let mut at = 0usize;
            for b in group {
                let end = at + b.len();
                if end > written {
                    let skip = written.saturating_sub(at);
                    file.write_all_at(&b[skip..], offset + (at + skip) as u64)?;
                    written = end;
                }
                at = end;
            }
        }
        offset += total as u64;
    }
    Ok(())
}

/// Starts writeback of the file's dirty pages without waiting for it, so the flush before
/// delivery finds little left to write.
pub fn start_writeback(file: &File) {
    // SAFETY: plain syscall on a valid fd; failure only means the final fsync does the work.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Gives the file `len` bytes with its blocks reserved on disk (`fallocate`): a disk too full
/// for the assignment fails here, at the start, not in the middle of the transfer, and writes
/// then land in allocated blocks instead of reserving them page by page. Where the file system
/// cannot preallocate, the file is only extended (sparse).
pub fn preallocate(file: &File, len: u64) -> io::Result<()> {
    let Ok(n) = libc::off_t::try_from(len) else { return file.set_len(len) };
    // SAFETY: plain syscall on a valid fd.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, n) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => file.set_len(len),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    #[test]
    fn batches_round_trip_over_loopback() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = match rx.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let payloads: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 100 + usize::from(i)]).collect();
        let mut msgs: Vec<Outgoing> = payloads
            .iter()
            .map(|p| Outgoing { pieces: vec![p.as_slice()], to, segment: None })
            .collect();
        // Ten equal datagrams of 300 bytes as one GSO message, given in uneven pieces.
        let equal = vec![7u8; 3000];
        if gso_supported(tx.as_raw_fd()) {
            msgs.push(Outgoing {
                pieces: vec![&equal[..1000], &equal[1000..]],
                to,
                segment: Some(300),
            });
        }
        let want = 40 + if msgs.len() > 40 { 10 } else { 0 };
        let gro = enable_gro(rx.as_raw_fd());
        let (sent, err) = send_batch(tx.as_raw_fd(), &msgs);
        assert_eq!((sent, err.map(|e| e.to_string())), (msgs.len(), None));
        let mut batch = RecvBatch::new(16, 65_536);
        let mut got = Vec::new();
        while got.len() < want {
            assert!(wait(&[(rx.as_raw_fd(), libc::POLLIN)], Duration::from_secs(5)).unwrap()[0]);
            let n = batch.recv(rx.as_raw_fd()).unwrap();
            for i in 0..n {
                let (b, from, seg) = batch.get(i);
                assert_eq!(std::net::SocketAddr::V4(from), tx.local_addr().unwrap());
                match seg {
                    Some(seg) => got.extend(b.chunks(seg).map(<[u8]>::to_vec)),
                    None => got.push(b.to_vec()),
                }
            }
        }
        assert_eq!(&got[..40], &payloads[..]);
        assert!(
            got[40..].iter().all(|d| d == &vec![7u8; 300]),
            "gro {gro}: {:?}",
            got[40..].iter().map(Vec::len).collect::<Vec<_>>()
        );
    }

    #[test]
    fn pwrite_all_writes_pieces_back_to_back() {
        let dir = tempfile_dir();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("f"))
            .unwrap();
        let pieces: Vec<Vec<u8>> = (0..2500u32).map(|i| vec![(i % 251) as u8; 3]).collect();
        let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
        pwrite_all(&f, &refs, 10).unwrap();
        let mut back = vec![0u8; 7500];
        f.read_exact_at(&mut back, 10).unwrap();
        assert_eq!(back, pieces.concat());
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "cm-mctp-sys-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
