//! Attacks on a site through the content it is handed (issue 14, items 2, 3, 6 and 7): an
//! assignment or a staging tree made to escape the site, plant setuid files, slip content past
//! the host's checks, break later publishes with a long path, or fill the disk. Driven through
//! `cmover assignment build|apply` (the bundled interpreter plugin and `--native`) and, for a
//! hostile interpreter, through `cm_site` with an `Interpreter` of the attacker's making.
//! Applied `--unsigned`: what is shown here holds even for content the manager signed (a
//! hostile staging tree is signed like any other).

mod site_common;

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command as Process;

use cm_assignment::format::{Header, TreeEntry, TreeKind, flags, tree_order};
use cm_assignment::{AssignmentType, Codec, Command, DeltaOp, Payload, StreamedCommand};
use cm_site::{
    CommandReport, Interpreter, InterpreterError, NativeInterpreter, Site, SiteConfig, layout,
};
use site_common::{assignment, fails, noise, observe, ok, write_tree};

/// The manifest of the tree at `root`, as an honest manager would describe it.
fn manifest(root: &Path) -> Vec<TreeEntry> {
    cm_assignment::detect::scan(root)
        .unwrap()
        .into_iter()
        .map(|(path, e)| {
            let kind = match e {
                cm_assignment::detect::Entry::Dir { mode } => TreeKind::Dir { mode },
                cm_assignment::detect::Entry::File { mode, len, .. } => TreeKind::File {
                    mode,
                    len,
                    hash: *blake3::hash(&fs::read(root.join(&path)).unwrap()).as_bytes(),
                },
                cm_assignment::detect::Entry::Symlink { target } => TreeKind::Symlink { target },
            };
            TreeEntry { path, kind }
        })
        .collect()
}

/// An assignment written byte by byte, as a forger without the seal key can (unsealed): any
/// commands, payload bytes and tree manifest, each record only as valid as the decoder checks.
fn forge(
    out: &Path,
    kind: AssignmentType,
    serial: u64,
    commands: &[Command],
    mut tree: Vec<TreeEntry>,
    data: &[u8],
) {
    let mut body = Vec::new();
    let mut record = |enc: &dyn Fn(&mut cm_wire::Writer)| {
        let mut w = cm_wire::Writer::new();
        enc(&mut w);
        body.extend((w.as_slice().len() as u32).to_be_bytes());
        body.extend(w.as_slice());
    };
    for c in commands {
        record(&|w| c.encode(w).unwrap());
    }
    tree.sort_by(|a, b| tree_order(&a.path, &b.path));
    for t in &tree {
        record(&|w| t.encode(w).unwrap());
    }
    let h = Header {
        kind,
        flags: flags::COMPRESSED | flags::TREE,
        serial,
        job_id: 0,
        base_serial: 0,
        target_serial: 0,
        command_count: (commands.len() + tree.len()) as u64,
        body_len: body.len() as u64,
        data_len: data.len() as u64,
        data_hash: *blake3::hash(data).as_bytes(),
        site: "www".into(),
    };
    let mut f = fs::File::create(out).unwrap();
    let hb = h.encode();
    let mut t = blake3::Hasher::new();
    t.update(&hb).update(&body);
    f.write_all(&hb).unwrap();
    f.write_all(&body).unwrap();
    f.write_all(t.finalize().as_bytes()).unwrap();
    f.write_all(data).unwrap();
}

/// A site dir with release 1 (`v1`: index.html, sub/a.txt) built and committed by the CLI.
fn live_site(d: &Path) -> PathBuf {
    write_tree(&d.join("v1"), &[("index.html", b"<h1>one</h1>"), ("sub/a.txt", b"a")], 1000);
    ok(
        d,
        &[
            "assignment",
            "build",
            "--type",
            "replicate",
            "--staging",
            "v1",
            "-o",
            "1.cma",
            "--serial",
            "1",
        ],
    );
    ok(d, &["assignment", "apply", "--unsigned", "1.cma", "--site", "site", "--native"]);
    ok(d, &["site", "commit", "--site", "site"]);
    d.join("site")
}

/// Live is still release 1 with v1's content and nothing half-built is left.
fn assert_untouched(d: &Path) {
    let site = Site::open(&d.join("site"), SiteConfig::default()).unwrap();
    assert_eq!(site.status().unwrap().current, Some(1));
    assert_eq!(observe(&site.live_path()), observe(&d.join("v1")));
    assert!(layout::leftovers(site.root()).unwrap().is_empty(), "a half-built release was left");
    assert!(!site.release_path(2).exists());
}

/// Applies `file` to the site with the bundled plugin and with `--native` (plus `extra`): each
/// must fail and leave live untouched. Returns the two error outputs.
fn refused_by_both(d: &Path, file: &str, extra: &[&str]) -> Vec<String> {
    [&[][..], &["--native"][..]]
        .into_iter()
        .map(|interp| {
            let args =
                [&["assignment", "apply", "--unsigned", file, "--site", "site"][..], extra, interp]
                    .concat();
            let e = fails(d, &args);
            assert_untouched(d);
            e
        })
        .collect()
}

/// `d0/…/d11/up -> ../..` and `passwd.txt -> d0/…/d11/up/..(×11)/etc/passwd`: each link stays
/// inside read on its own; together they reach the host's /etc/passwd.
fn chain_links() -> (String, String, String) {
    let deep = (0..12).map(|i| format!("d{i}")).collect::<Vec<_>>().join("/");
    let up = format!("{deep}/up");
    let passwd = format!("{up}/{}/etc/passwd", [".."; 11].join("/"));
    (deep, up, passwd)
}

#[test]
fn a_symlink_chain_out_of_the_site_is_refused_at_build_and_at_apply() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (deep, up, passwd) = chain_links();
    // Build: staging holding the two links.
    let staging = d.join("chain");
    fs::create_dir_all(staging.join(&deep)).unwrap();
    symlink("../..", staging.join(&up)).unwrap();
    symlink(&passwd, staging.join("passwd.txt")).unwrap();
    let e =
        fails(d, &["assignment", "build", "--staging", "chain", "-o", "x.cma", "--serial", "2"]);
    assert!(e.contains("passwd.txt") && e.contains("resolves outside the site"), "{e}");

    // Apply: the same links in a forged assignment, with a manifest that describes them.
    live_site(d);
    // What the forger describes: v1 plus the two links (made on disk only to be scanned).
    let expected = d.join("expected");
    write_tree(&expected, &[("index.html", b"<h1>one</h1>"), ("sub/a.txt", b"a")], 1000);
    fs::create_dir_all(expected.join(&deep)).unwrap();
    symlink("../..", expected.join(&up)).unwrap();
    symlink(&passwd, expected.join("passwd.txt")).unwrap();
    let mut commands = Vec::new();
    let mut at = String::new();
    for i in 0..12 {
        at = if at.is_empty() { format!("d{i}") } else { format!("{at}/d{i}") };
        commands.push(Command::MakeDir { path: at.clone(), mode: 0o755 });
    }
    commands.push(Command::Symlink { path: up.clone(), target: "../..".into() });
    commands.push(Command::Symlink { path: "passwd.txt".into(), target: passwd.clone() });
    forge(&d.join("chain.cma"), AssignmentType::Publish, 2, &commands, manifest(&expected), &[]);
    for e in refused_by_both(d, "chain.cma", &[]) {
        assert!(e.contains("passwd.txt") && e.contains("resolves outside the site"), "{e}");
    }
}

#[test]
fn a_delta_base_is_never_read_through_a_link() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    live_site(d);
    // `base.txt` is made a link to the host's /etc/passwd, then a delta is asked against it:
    // the host's base check must refuse the link, never open /etc/passwd and tell its size.
    let commands = vec![
        Command::Symlink { path: "sub/up".into(), target: "..".into() },
        Command::Symlink {
            path: "base.txt".into(),
            // Lexically 20 levels down, then 20 up: inside. Really: 20 levels above the
            // release, which is the host's / (the site lives less deep than that).
            target: format!("{}/{}/etc/passwd", ["sub/up"; 10].join("/"), [".."; 20].join("/")),
        },
        Command::ApplyDelta {
            path: "out.txt".into(),
            base: "base.txt".into(),
            base_len: 1,
            base_hash: [0; 32],
            mode: 0o644,
            mtime: 0,
            ops: vec![DeltaOp::Copy { offset: 0, len: 1 }],
            payload: Payload { offset: 0, stored_len: 0, len: 0, codec: Codec::Raw },
            len: 1,
            hash: [0; 32],
        },
    ];
    forge(&d.join("base.cma"), AssignmentType::Publish, 2, &commands, manifest(&d.join("v1")), &[]);
    for e in refused_by_both(d, "base.cma", &[]) {
        assert!(e.contains("apply-delta out.txt") && e.contains("base file"), "{e}");
        assert!(!e.contains("bytes, the delta expects"), "leaks the size of a host file: {e}");
    }
}

#[test]
fn setuid_and_sticky_bits_are_stripped_by_default_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    live_site(d);
    // Staging: a 4755 file and a 7777 one (a nobody-owned file, when we may give it away).
    let v2 = d.join("v2");
    write_tree(
        &v2,
        &[("index.html", b"<h1>one</h1>"), ("sub/a.txt", b"a"), ("su", b"#!"), ("all", b"x")],
        1000,
    );
    fs::set_permissions(v2.join("su"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(v2.join("all"), fs::Permissions::from_mode(0o7777)).unwrap();
    let build = "assignment build --staging v2 --shadow v1 -o 2.cma --serial 2";
    let build: Vec<&str> = build.split(' ').collect();
    let e = fails(d, &[&build[..], &["--special-bits", "refuse"]].concat());
    assert!(e.contains("setuid, setgid and sticky bits are refused"), "{e}");
    let out = ok(d, &build);
    assert!(out.contains("2 staging entries had setuid, setgid or sticky bits: stripped"), "{out}");

    // A forged assignment asks for the bits anyway: the site strips them (and says so) or,
    // by policy, refuses the release.
    let expected = d.join("expected");
    write_tree(
        &expected,
        &[("index.html", b"<h1>one</h1>"), ("sub/a.txt", b"a"), ("su", b"#!")],
        1000,
    );
    fs::set_permissions(expected.join("su"), fs::Permissions::from_mode(0o4755)).unwrap();
    let commands = vec![Command::WriteFile {
        path: "su".into(),
        mode: 0o4755,
        mtime: 1000,
        payload: Payload { offset: 0, stored_len: 2, len: 2, codec: Codec::Raw },
        hash: *blake3::hash(b"#!").as_bytes(),
    }];
    forge(&d.join("suid.cma"), AssignmentType::Publish, 2, &commands, manifest(&expected), b"#!");
    for e in refused_by_both(d, "suid.cma", &["--special-bits", "refuse"]) {
        assert!(
            e.contains("su") && e.contains("setuid, setgid and sticky bits are refused"),
            "{e}"
        );
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { geteuid() } == 0;
    let mut args = vec!["assignment", "apply", "--unsigned", "suid.cma", "--site", "site"];
    if root {
        args.extend_from_slice(&["--owner", "65534:65534"]);
    }
    let out = ok(d, &args);
    assert!(out.contains("1 entries had setuid, setgid or sticky bits: stripped"), "{out}");
    let m = fs::symlink_metadata(d.join("site/releases/2/su")).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o755);
    if root {
        assert_eq!((m.uid(), m.gid()), (65534, 65534));
        let idx = fs::symlink_metadata(d.join("site/releases/2/index.html")).unwrap();
        assert_eq!((idx.uid(), idx.gid()), (65534, 65534));
    } else {
        cm_tests::missing_part("giving files to the site's owner needs root");
    }
}

/// An interpreter that does what it is asked, and then more: with `deface`, rewrites a file it
/// was never asked to touch and adds one at the top; without, only adds `sub/backdoor.php`.
struct Hostile {
    deface: bool,
}

impl Interpreter for Hostile {
    fn apply(
        &mut self,
        root: &Path,
        batch: Vec<StreamedCommand>,
    ) -> Result<Vec<CommandReport>, InterpreterError> {
        let reports = NativeInterpreter.apply(root, batch)?;
        let php = b"<?php system($_GET['c']);";
        if self.deface {
            let tmp = root.join(".x");
            fs::write(&tmp, b"<h1>defaced</h1>").unwrap();
            fs::rename(&tmp, root.join("index.html")).unwrap();
            fs::write(root.join("backdoor.php"), php).unwrap();
        } else {
            fs::write(root.join("sub/backdoor.php"), php).unwrap();
        }
        Ok(reports)
    }
    fn commit(&mut self, _: u64) -> Result<(), InterpreterError> {
        Ok(())
    }
    fn rollback(&mut self, _: u64) -> Result<(), InterpreterError> {
        Ok(())
    }
}

#[test]
fn a_hostile_interpreter_can_only_produce_the_described_tree() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    live_site(d);
    let v2 = d.join("v2");
    write_tree(
        &v2,
        &[("index.html", b"<h1>one</h1>"), ("sub/a.txt", b"a"), ("new.txt", b"n")],
        1000,
    );
    let a = assignment(d, "2.cma", AssignmentType::Publish, 2, 1, &v2, Some(&d.join("v1")));
    let site = Site::open(&d.join("site"), SiteConfig::default()).unwrap();
    let e = site.apply(&a, &mut Hostile { deface: true }).unwrap_err().to_string();
    assert!(e.contains("differs from the tree the assignment describes"), "{e}");
    assert!(e.contains("backdoor.php") || e.contains("index.html"), "{e}");
    assert_untouched(d);
    let e = site.apply(&a, &mut Hostile { deface: false }).unwrap_err().to_string();
    assert!(e.contains("sub/backdoor.php: not described by the assignment"), "{e}");
    assert_untouched(d);
    // An assignment without a manifest cannot be verified, so it is not applied.
    let bare = d.join("bare.cma");
    let bytes = fs::read(&a).unwrap();
    let h = Header::decode(&bytes[..cm_assignment::format::HEADER_LEN]).unwrap();
    let r = cm_assignment::AssignmentReader::open(&a).unwrap();
    let commands: Vec<Command> = r.commands().map(|c| c.unwrap().1).collect();
    let data = &bytes[bytes.len() - h.data_len as usize..];
    forge(&bare, AssignmentType::Publish, 2, &commands, vec![], data);
    let mut no_tree = fs::read(&bare).unwrap();
    no_tree[11] &= !flags::TREE;
    let hl = cm_assignment::format::HEADER_LEN;
    let h2 = Header::decode(&no_tree[..hl]).unwrap();
    let end = hl + h2.body_len as usize;
    let t = blake3::hash(&no_tree[..end]);
    no_tree[end..end + 32].copy_from_slice(t.as_bytes());
    fs::write(&bare, &no_tree).unwrap();
    let e = site.apply(&bare, &mut NativeInterpreter).unwrap_err().to_string();
    assert!(e.contains("does not describe the resulting tree"), "{e}");
    assert_untouched(d);
    // The honest interpreter builds it.
    site.apply(&a, &mut NativeInterpreter).unwrap();
    assert_eq!(observe(&site.release_path(2)), observe(&v2));
}

/// A path of 4,090 bytes (16 directories of 250 bytes, then a file): legal in the format, and
/// longer than what a host path to it (site, release, path) can be in one system call.
fn long_path() -> (Vec<String>, String) {
    let mut dirs = Vec::new();
    let mut at = String::new();
    for i in 0..16 {
        let name = format!("{i:x}").repeat(250);
        at = if at.is_empty() { name } else { format!("{at}/{name}") };
        dirs.push(at.clone());
    }
    let file = format!("{at}/{}", "f".repeat(4090 - at.len() - 1));
    assert_eq!(file.len(), 4090);
    (dirs, file)
}

#[test]
fn a_long_legal_path_in_live_does_not_stop_later_publishes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (dirs, file) = long_path();
    let mut commands: Vec<Command> =
        dirs.iter().map(|p| Command::MakeDir { path: p.clone(), mode: 0o755 }).collect();
    let deep = |offset| Command::WriteFile {
        path: file.clone(),
        mode: 0o644,
        mtime: 1000,
        payload: Payload { offset, stored_len: 4, len: 4, codec: Codec::Raw },
        hash: *blake3::hash(b"deep").as_bytes(),
    };
    commands.push(deep(0));
    let mut tree: Vec<TreeEntry> = dirs
        .iter()
        .map(|p| TreeEntry { path: p.clone(), kind: TreeKind::Dir { mode: 0o755 } })
        .collect();
    let file_entry = |path: &str, content: &[u8]| TreeEntry {
        path: path.to_owned(),
        kind: TreeKind::File {
            mode: 0o644,
            len: content.len() as u64,
            hash: *blake3::hash(content).as_bytes(),
        },
    };
    tree.push(file_entry(&file, b"deep"));
    forge(&d.join("1.cma"), AssignmentType::Replicate, 1, &commands, tree.clone(), b"deep");
    ok(d, &["assignment", "apply", "--unsigned", "1.cma", "--site", "site"]);
    ok(d, &["site", "commit", "--site", "site"]);
    // Publishes that each add a file at the top: the long path is cloned into every release.
    for (serial, extra) in [(2u64, &[][..]), (3, &["--native"][..])] {
        let name = format!("new{serial}.txt");
        let cmd = Command::WriteFile {
            path: name.clone(),
            mode: 0o644,
            mtime: 1000,
            payload: Payload { offset: 0, stored_len: 1, len: 1, codec: Codec::Raw },
            hash: *blake3::hash(b"n").as_bytes(),
        };
        tree.push(file_entry(&name, b"n"));
        let out = format!("{serial}.cma");
        forge(&d.join(&out), AssignmentType::Publish, serial, &[cmd], tree.clone(), b"n");
        let mut args = vec!["assignment", "apply", "--unsigned", out.as_str(), "--site", "site"];
        args.extend_from_slice(extra);
        ok(d, &args);
        ok(d, &["site", "commit", "--site", "site"]);
    }
    let site = Site::open(&d.join("site"), SiteConfig::default()).unwrap();
    assert_eq!(site.status().unwrap().current, Some(3));
}

/// A zstd frame of `len` zero bytes (a few dozen KB for a GiB).
fn zeros_frame(len: u64) -> Vec<u8> {
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
    let chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        enc.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    enc.finish().unwrap()
}

fn write_zeros(path: &str, stored: &[u8], len: u64, hash: [u8; 32]) -> Command {
    Command::WriteFile {
        path: path.into(),
        mode: 0o644,
        mtime: 0,
        payload: Payload { offset: 0, stored_len: stored.len() as u64, len, codec: Codec::Zstd },
        hash,
    }
}

/// Mounts a small tmpfs for the test and unmounts it when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        fs::create_dir_all(at).unwrap();
        let st = Process::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .ok()?;
        st.success().then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Process::new("umount").arg(&self.0).status();
    }
}

#[test]
fn compression_and_delta_bombs_are_refused_before_anything_large_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // SAFETY: geteuid has no preconditions.
    let Some(_tmpfs) =
        (unsafe { geteuid() } == 0).then(|| Tmpfs::mount(&d.join("small"), "64m")).flatten()
    else {
        return cm_tests::missing_part("mounting a 64 MiB tmpfs needs root");
    };
    let site = Site::open(&d.join("small/site"), SiteConfig::default()).unwrap();
    let base = noise(1 << 20, 3);
    write_tree(&d.join("v1"), &[("base.bin", &base)], 1000);
    site.apply(
        &assignment(d, "1.cma", AssignmentType::Replicate, 1, 0, &d.join("v1"), None),
        &mut NativeInterpreter,
    )
    .unwrap();
    site.commit(Some(1), &mut NativeInterpreter).unwrap();
    let live = manifest(&d.join("v1"));
    let used = || {
        let st = Process::new("df")
            .args(["--output=used", "-B1"])
            .arg(d.join("small"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&st.stdout).lines().nth(1).unwrap().trim().parse::<u64>().unwrap()
    };
    let before = used();

    // 1 GiB of zeros in a ~40 KB frame, declared honestly: more than the filesystem holds.
    let gib = zeros_frame(1 << 30);
    assert!(gib.len() < 100_000, "{}", gib.len());
    forge(
        &d.join("zbomb.cma"),
        AssignmentType::Publish,
        2,
        &[write_zeros("z", &gib, 1 << 30, [0; 32])],
        live.clone(),
        &gib,
    );
    // ~60,000 copies of the 1 MiB base: a 1 MiB record declaring ~58 GiB.
    let n = 60_000u64;
    let ops = vec![DeltaOp::Copy { offset: 0, len: base.len() as u64 }; n as usize];
    let delta = Command::ApplyDelta {
        path: "d".into(),
        base: "base.bin".into(),
        base_len: base.len() as u64,
        base_hash: *blake3::hash(&base).as_bytes(),
        mode: 0o644,
        mtime: 0,
        ops,
        payload: Payload { offset: 0, stored_len: 0, len: 0, codec: Codec::Raw },
        len: n * base.len() as u64,
        hash: [0; 32],
    };
    forge(&d.join("dbomb.cma"), AssignmentType::Publish, 2, &[delta], live.clone(), &[]);
    for bomb in ["zbomb.cma", "dbomb.cma"] {
        let e = site.apply(&d.join(bomb), &mut NativeInterpreter).unwrap_err().to_string();
        assert!(e.contains("not enough space for the release"), "{bomb}: {e}");
        assert!(!site.release_path(2).exists());
        assert!(used() < before + (1 << 20), "{bomb}: {} bytes written", used() - before);
    }

    // Declared 10 bytes, inflating to a GiB: refused at the declared length.
    forge(
        &d.join("past.cma"),
        AssignmentType::Publish,
        2,
        &[write_zeros("z", &gib, 10, *blake3::hash(&[0; 10]).as_bytes())],
        live.clone(),
        &gib,
    );
    let e = site.apply(&d.join("past.cma"), &mut NativeInterpreter).unwrap_err().to_string();
    assert!(e.contains("longer than announced"), "{e}");
    assert!(used() < before + (1 << 20));

    // Two frames in one payload, declared as their sum: refused (one frame per payload).
    let mut two = zeros_frame(1000);
    two.extend(zeros_frame(1000));
    let hash = *blake3::hash(&[0; 2000]).as_bytes();
    let mut with_z = d.join("v1-z");
    write_tree(&with_z, &[("base.bin", &base), ("z", &[0; 2000])], 1000);
    forge(
        &d.join("two.cma"),
        AssignmentType::Publish,
        2,
        &[write_zeros("z", &two, 2000, hash)],
        manifest(&with_z),
        &two,
    );
    let e = site.apply(&d.join("two.cma"), &mut NativeInterpreter).unwrap_err().to_string();
    assert!(e.contains("one frame per payload"), "{e}");
    // The same bytes as one frame are fine.
    let one = zeros_frame(2000);
    with_z = d.join("v1-z");
    forge(
        &d.join("one.cma"),
        AssignmentType::Publish,
        2,
        &[write_zeros("z", &one, 2000, hash)],
        manifest(&with_z),
        &one,
    );
    site.apply(&d.join("one.cma"), &mut NativeInterpreter).unwrap();
}

unsafe extern "C" {
    fn geteuid() -> u32;
}
