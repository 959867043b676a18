//! Host side of the `staging` interface: a capability-scoped view of one site's staging tree.
//!
//! Two fences keep a plugin inside the tree. First, every path is checked lexically
//! ([`clean`]): absolute paths and `..` that would climb above the root are refused as
//! `escape` before anything touches the disk. Second, every operation goes through a
//! `cap_std::fs::Dir` opened on the root, which resolves paths beneath it and refuses any
//! symlink that leads outside.
//!
//! Invariant (shared with `cm-site`): the staging tree holds hard links to the live release's
//! unchanged files, so no call here ever writes into an existing inode. New contents go to a
//! fresh temporary file renamed into place; `set-mode` on a file that shares its inode first
//! copies it to a fresh one.
//!
//! Every file created, byte written and file held open is charged to the call's quotas
//! (`quota.rs`) before it happens; the staging filesystem's free space is looked at on creates
//! and every MiB written.

use std::fs::FileTimes;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{FileExt, PermissionsExt as _};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use cap_std::fs::{Dir, MetadataExt, OpenOptions, Permissions, PermissionsExt};
use wasmtime::component::Resource;

use crate::bindings::staging::{self, EntryKind, EntryStat, Error, ErrorKind};
use crate::kernel_copy::{self, KernelCopy};
use crate::sandbox::{DataSource, HostState};

/// Copy buffer for host-side copies.
const COPY_CHUNK: usize = 64 * 1024;
/// Bytes charged to the quotas per step of a copy from a base file.
const KERNEL_COPY_CHUNK: u64 = 8 << 20;
/// Largest read a guest may ask `file-reader.read-at` for.
const MAX_READ_CHUNK: u32 = 1 << 20;
/// Prefix of temporary files; they live next to their target until renamed into place.
const TEMP_PREFIX: &str = ".cm-new-";

/// One site's staging tree, as granted to one call.
pub(crate) struct Staging {
    root: Arc<Dir>,
}

impl Staging {
    /// Open the staging tree at `root` (a host path the plugin never sees).
    pub(crate) fn open(root: &Path) -> io::Result<Self> {
        let dir = Dir::open_ambient_dir(root, cap_std::ambient_authority())?;
        Ok(Self { root: Arc::new(dir) })
    }
}

/// An open, read-only regular file of the tree.
pub struct FileReader {
    file: std::fs::File,
    size: u64,
    path: String,
}

/// A file being written: a fresh temporary inode next to its target.
pub struct FileWriter {
    root: Arc<Dir>,
    file: Option<BufWriter<std::fs::File>>,
    temp: String,
    target: String,
    written: u64,
}

impl Drop for FileWriter {
    /// An unfinished writer (dropped by the guest, or by a trap tearing the store down)
    /// leaves nothing behind.
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = self.root.remove_file(&self.temp);
        }
    }
}

fn error(kind: ErrorKind, message: String) -> Error {
    Error { kind, message }
}

/// Map an I/O error on `path` to a staging error that names the path and the cause.
fn io_error(what: &str, path: &str, e: io::Error) -> Error {
    let kind = match e.kind() {
        // cap-std's refusal to follow a path out of the tree.
        io::ErrorKind::PermissionDenied if e.to_string().contains("outside of the filesystem") => {
            ErrorKind::Escape
        }
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
        io::ErrorKind::NotADirectory => ErrorKind::NotADirectory,
        io::ErrorKind::IsADirectory => ErrorKind::IsADirectory,
        io::ErrorKind::DirectoryNotEmpty => ErrorKind::NotEmpty,
        _ => ErrorKind::Io,
    };
    let cause = if kind == ErrorKind::Escape {
        "leads outside the staging tree".to_string()
    } else {
        e.to_string()
    };
    error(kind, format!("{what} `{path}`: {cause}"))
}

/// Normalise a plugin-supplied path: relative, '/'-separated, `.` dropped, `..` resolved
/// lexically. Returns "" for the root itself.
pub(crate) fn clean(path: &str) -> Result<String, Error> {
    if path.contains('\0') {
        return Err(error(ErrorKind::InvalidPath, format!("path {path:?} contains a NUL byte")));
    }
    if path.starts_with('/') {
        return Err(error(
            ErrorKind::Escape,
            format!("absolute path `{path}` is outside the staging tree"),
        ));
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(error(
                        ErrorKind::Escape,
                        format!("path `{path}` climbs out of the staging tree"),
                    ));
                }
            }
            part => parts.push(part),
        }
    }
    Ok(parts.join("/"))
}

/// [`clean`], refusing the root itself (for calls that need a name).
fn clean_entry(path: &str) -> Result<String, Error> {
    let cleaned = clean(path)?;
    if cleaned.is_empty() {
        return Err(error(
            ErrorKind::InvalidPath,
            format!("path `{path}` names the staging root itself"),
        ));
    }
    Ok(cleaned)
}

/// The directory part of a cleaned path ("" for the root).
fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") }
}

/// A process-unique temporary name in `dir`.
fn temp_name(dir: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    join(
        dir,
        &format!("{TEMP_PREFIX}{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)),
    )
}

fn mode_permissions(mode: u32) -> Permissions {
    Permissions::from_std(std::fs::Permissions::from_mode(mode & 0o7777))
}

fn unix_time(seconds: i64) -> SystemTime {
    if seconds >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs())
    }
}

impl HostState {
    fn tree(&self) -> Result<&Arc<Dir>, Error> {
        self.staging
            .as_ref()
            .map(|s| &s.root)
            .ok_or_else(|| error(ErrorKind::Io, "this call was granted no staging tree".into()))
    }

    /// Charges the entries `make-dir path` will create (those missing now) to the quotas.
    fn charge_make_dir(&mut self, path: &str) -> wasmtime::Result<()> {
        let (Ok(root), Ok(cleaned)) = (self.tree().cloned(), clean(path)) else {
            return Ok(()); // `make_dir_in` reports it
        };
        let mut prefix = String::new();
        for part in cleaned.split('/').filter(|p| !p.is_empty()) {
            prefix = join(&prefix, part);
            if root.symlink_metadata(&prefix).is_err() {
                self.quotas.create(&root, &prefix)?;
            }
        }
        Ok(())
    }

    /// Charges one new entry at `path` to the quotas.
    fn charge_create(&mut self, path: &str) -> wasmtime::Result<()> {
        if let Ok(root) = self.tree().cloned() {
            self.quotas.create(&root, path)?;
        }
        Ok(())
    }

    /// A `set-mode` on a shared inode copies the file: the copy must fit above the reserve.
    fn charge_set_mode(&mut self, path: &str) -> wasmtime::Result<()> {
        let (Ok(root), Ok(cleaned)) = (self.tree().cloned(), clean_entry(path)) else {
            return Ok(());
        };
        if let Ok(meta) = root.metadata(&cleaned)
            && meta.is_file()
            && meta.nlink() > 1
        {
            self.quotas.check_space(&root, &cleaned, meta.len(), 1)?;
        }
        Ok(())
    }

    /// Charges `len` bytes about to be appended to `writer` to the quotas.
    fn charge_write(&mut self, writer: &Resource<FileWriter>, len: u64) -> wasmtime::Result<()> {
        let HostState { table, quotas, .. } = self;
        let writer = table.get(writer)?;
        quotas.write(&writer.root, &writer.target, len)?;
        Ok(())
    }

    fn make_dir_in(&self, path: &str, mode: u32) -> Result<(), Error> {
        let root = self.tree()?;
        let cleaned = clean(path)?;
        let mut prefix = String::new();
        for part in cleaned.split('/').filter(|p| !p.is_empty()) {
            prefix = join(&prefix, part);
            match root.create_dir(&prefix) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let meta =
                        root.metadata(&prefix).map_err(|e| io_error("make-dir", &prefix, e))?;
                    if !meta.is_dir() {
                        return Err(error(
                            ErrorKind::NotADirectory,
                            format!("make-dir `{prefix}`: exists and is not a directory"),
                        ));
                    }
                }
                Err(e) => return Err(io_error("make-dir", &prefix, e)),
            }
        }
        if cleaned.is_empty() {
            return Ok(());
        }
        root.set_permissions(&cleaned, mode_permissions(mode))
            .map_err(|e| io_error("make-dir", &cleaned, e))
    }

    fn create_file_in(&mut self, path: &str) -> Result<FileWriter, Error> {
        let root = self.tree()?.clone();
        let target = clean_entry(path)?;
        if let Ok(meta) = root.symlink_metadata(&target)
            && meta.is_dir()
        {
            return Err(error(
                ErrorKind::IsADirectory,
                format!("create-file `{target}`: is a directory"),
            ));
        }
        let temp = temp_name(parent(&target));
        let file = root
            .open_with(&temp, OpenOptions::new().write(true).create_new(true))
            .map_err(|e| io_error("create-file", &target, e))?;
        Ok(FileWriter {
            root,
            file: Some(BufWriter::with_capacity(COPY_CHUNK, file.into_std())),
            temp,
            target,
            written: 0,
        })
    }

    fn set_mode_in(&self, path: &str, mode: u32) -> Result<(), Error> {
        let root = self.tree()?;
        let cleaned = clean_entry(path)?;
        let meta = root.metadata(&cleaned).map_err(|e| io_error("set-mode", &cleaned, e))?;
        let shared_inode = meta.is_file() && meta.nlink() > 1;
        if !shared_inode {
            return root
                .set_permissions(&cleaned, mode_permissions(mode))
                .map_err(|e| io_error("set-mode", &cleaned, e));
        }
        // The inode is shared (a hard link to live): give this path a fresh copy first.
        let real = match root.symlink_metadata(&cleaned) {
            Ok(m) if m.is_symlink() => {
                return Err(error(
                    ErrorKind::Io,
                    format!(
                        "set-mode `{cleaned}`: is a symlink to a shared file; set the mode of its target"
                    ),
                ));
            }
            _ => cleaned.clone(),
        };
        let mut source = root.open(&real).map_err(|e| io_error("set-mode", &real, e))?.into_std();
        let temp = temp_name(parent(&real));
        let copy = (|| -> io::Result<()> {
            let mut fresh =
                root.open_with(&temp, OpenOptions::new().write(true).create_new(true))?.into_std();
            io::copy(&mut source, &mut fresh)?;
            fresh.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
            fresh.set_times(FileTimes::new().set_modified(unix_time(meta.mtime())))?;
            root.rename(&temp, root, &real)
        })();
        copy.map_err(|e| {
            let _ = root.remove_file(&temp);
            io_error("set-mode", &real, e)
        })
    }

    fn symlink_in(&self, path: &str, target: &str) -> Result<(), Error> {
        let root = self.tree()?;
        let link = clean_entry(path)?;
        if target.starts_with('/') {
            return Err(error(
                ErrorKind::Escape,
                format!("symlink `{link}`: absolute target `{target}` is outside the staging tree"),
            ));
        }
        if target.is_empty() || target.contains('\0') {
            return Err(error(
                ErrorKind::InvalidPath,
                format!("symlink `{link}`: invalid target {target:?}"),
            ));
        }
        // The target is resolved from the link's directory; it must stay inside the tree.
        clean(&join(parent(&link), target)).map_err(|_| {
            error(
                ErrorKind::Escape,
                format!("symlink `{link}`: target `{target}` points outside the staging tree"),
            )
        })?;
        let temp = temp_name(parent(&link));
        root.symlink(target, &temp).map_err(|e| io_error("symlink", &link, e))?;
        if let Ok(meta) = root.symlink_metadata(&link)
            && meta.is_dir()
        {
            let _ = root.remove_file(&temp);
            return Err(error(
                ErrorKind::IsADirectory,
                format!("symlink `{link}`: a directory is in the way"),
            ));
        }
        root.rename(&temp, root, &link).map_err(|e| {
            let _ = root.remove_file(&temp);
            io_error("symlink", &link, e)
        })
    }

    fn remove_in(&self, path: &str, recursive: bool) -> Result<(), Error> {
        let root = self.tree()?;
        let cleaned = clean_entry(path)?;
        let meta = root.symlink_metadata(&cleaned).map_err(|e| io_error("remove", &cleaned, e))?;
        let removed = if meta.is_dir() {
            if recursive { root.remove_dir_all(&cleaned) } else { root.remove_dir(&cleaned) }
        } else {
            root.remove_file(&cleaned)
        };
        removed.map_err(|e| io_error("remove", &cleaned, e))
    }

    fn stat_in(&self, path: &str) -> Result<Option<EntryStat>, Error> {
        let root = self.tree()?;
        let cleaned = clean(path)?;
        let meta = match if cleaned.is_empty() {
            root.dir_metadata()
        } else {
            root.symlink_metadata(&cleaned)
        } {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("stat", &cleaned, e)),
        };
        let kind = if meta.is_symlink() {
            EntryKind::Symlink
        } else if meta.is_dir() {
            EntryKind::Directory
        } else if meta.is_file() {
            EntryKind::File
        } else {
            EntryKind::Other
        };
        Ok(Some(EntryStat {
            kind,
            size: meta.len(),
            mode: meta.permissions().mode() & 0o7777,
            mtime: meta.mtime(),
        }))
    }

    fn list_dir_in(&self, path: &str) -> Result<Vec<String>, Error> {
        let root = self.tree()?;
        let cleaned = clean(path)?;
        let entries = if cleaned.is_empty() { root.entries() } else { root.read_dir(&cleaned) }
            .map_err(|e| io_error("list-dir", &cleaned, e))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_error("list-dir", &cleaned, e))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn open_file_in(&self, path: &str) -> Result<FileReader, Error> {
        let root = self.tree()?;
        let cleaned = clean_entry(path)?;
        let file = root.open(&cleaned).map_err(|e| io_error("open-file", &cleaned, e))?.into_std();
        let meta = file.metadata().map_err(|e| io_error("open-file", &cleaned, e))?;
        if !meta.is_file() {
            return Err(error(
                ErrorKind::IsADirectory,
                format!("open-file `{cleaned}`: not a regular file"),
            ));
        }
        Ok(FileReader { file, size: meta.len(), path: cleaned })
    }

    /// Append the next `len` bytes of `source` to `writer`, a chunk at a time.
    fn copy_source(
        &mut self,
        writer: &Resource<FileWriter>,
        source: &Resource<DataSource>,
        len: u64,
    ) -> wasmtime::Result<Result<(), Error>> {
        let mut buf = vec![0; COPY_CHUNK.min(len as usize)];
        let mut left = len;
        while left > 0 {
            let want = (left as usize).min(buf.len());
            let got = match self.table.get_mut(source)?.read_some(&mut buf[..want]) {
                Ok(n) => n,
                Err(e) => {
                    let target = &self.table.get(writer)?.target;
                    return Ok(Err(error(
                        ErrorKind::Payload,
                        format!("write `{target}`: reading payload: {e}"),
                    )));
                }
            };
            if got == 0 {
                let target = &self.table.get(writer)?.target;
                let message =
                    format!("write `{target}`: payload ended {left} bytes short of {len}");
                return Ok(Err(error(ErrorKind::Payload, message)));
            }
            self.charge_write(writer, got as u64)?;
            let writer = self.table.get_mut(writer)?;
            if let Err(e) = writer.append(&buf[..got]) {
                return Ok(Err(e));
            }
            left -= got as u64;
        }
        Ok(Ok(()))
    }

    /// Append `len` bytes of `base` from `offset`: inside the kernel where it can
    /// (`kernel_copy`), through a buffer where it cannot. Charged a chunk at a time, before
    /// each chunk is written.
    fn copy_base(
        &mut self,
        writer: &Resource<FileWriter>,
        base: &Resource<FileReader>,
        offset: u64,
        len: u64,
    ) -> wasmtime::Result<Result<(), Error>> {
        let (base_size, base_path) = {
            let base = self.table.get(base)?;
            (base.size, base.path.clone())
        };
        if offset.checked_add(len).is_none_or(|end| end > base_size) {
            let target = &self.table.get(writer)?.target;
            let message = format!(
                "write `{target}`: copy of {len} bytes at {offset} is outside base `{base_path}` ({base_size} bytes)"
            );
            return Ok(Err(error(ErrorKind::Payload, message)));
        }
        let shrank =
            || error(ErrorKind::Payload, format!("base `{base_path}` shrank while copying"));
        // Its own descriptor, so the writer can be borrowed from the table beside it; without
        // one, the buffered copy does it all.
        let mut in_kernel = self.table.get(base)?.file.try_clone().ok();
        let mut done = 0;
        while done < len {
            let chunk = (len - done).min(KERNEL_COPY_CHUNK);
            self.charge_write(writer, chunk)?;
            let mut copied = 0;
            if let Some(base_file) = &in_kernel {
                let writer = self.table.get_mut(writer)?;
                let out = match writer.flushed() {
                    Ok(out) => out,
                    Err(e) => return Ok(Err(e)),
                };
                match kernel_copy::append(base_file, offset + done, out, chunk) {
                    Ok(KernelCopy::Done) => copied = chunk,
                    Ok(KernelCopy::Unsupported { copied: c }) => {
                        in_kernel = None;
                        copied = c;
                    }
                    Ok(KernelCopy::SourceEnded { .. }) => return Ok(Err(shrank())),
                    Err(e) => return Ok(Err(io_error("copy", &base_path, e))),
                }
                writer.written += copied;
            }
            if copied < chunk
                && let Err(e) =
                    self.copy_base_buffered(writer, base, offset + done + copied, chunk - copied)?
            {
                return Ok(Err(e));
            }
            done += chunk;
        }
        Ok(Ok(()))
    }

    /// Append `len` bytes of `base` from `offset` through a buffer (already charged).
    fn copy_base_buffered(
        &mut self,
        writer: &Resource<FileWriter>,
        base: &Resource<FileReader>,
        offset: u64,
        len: u64,
    ) -> wasmtime::Result<Result<(), Error>> {
        let mut buf = vec![0; COPY_CHUNK.min(len as usize)];
        let mut done = 0;
        while done < len {
            let want = ((len - done) as usize).min(buf.len());
            let base = self.table.get(base)?;
            let got = match base.file.read_at(&mut buf[..want], offset + done) {
                Ok(0) => {
                    let message = format!("base `{}` shrank while copying", base.path);
                    return Ok(Err(error(ErrorKind::Payload, message)));
                }
                Ok(n) => n,
                Err(e) => return Ok(Err(io_error("read", &base.path, e))),
            };
            if let Err(e) = self.table.get_mut(writer)?.append(&buf[..got]) {
                return Ok(Err(e));
            }
            done += got as u64;
        }
        Ok(Ok(()))
    }
}

impl FileWriter {
    /// The file with everything buffered written out, for a write that bypasses the buffer.
    fn flushed(&mut self) -> Result<&std::fs::File, Error> {
        let file = self.file.as_mut().ok_or_else(|| {
            error(ErrorKind::Io, format!("write `{}`: already finished", self.target))
        })?;
        file.flush().map_err(|e| io_error("write", &self.target, e))?;
        Ok(file.get_ref())
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let file = self.file.as_mut().ok_or_else(|| {
            error(ErrorKind::Io, format!("write `{}`: already finished", self.target))
        })?;
        file.write_all(bytes).map_err(|e| io_error("write", &self.target, e))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Set mode and mtime, and rename the fresh inode over the target.
    fn finish(mut self, mode: u32, mtime: i64) -> Result<u64, Error> {
        let file = self.file.take().expect("a writer is finished once");
        let target = self.target.clone();
        let result = (|| -> io::Result<()> {
            let file = file.into_inner().map_err(|e| e.into_error())?;
            file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
            file.set_times(FileTimes::new().set_modified(unix_time(mtime)))?;
            drop(file);
            self.root.rename(&self.temp, &self.root, &self.target)
        })();
        match result {
            Ok(()) => Ok(self.written),
            Err(e) => {
                let _ = self.root.remove_file(&self.temp);
                Err(io_error("write", &target, e))
            }
        }
    }
}

impl staging::Host for HostState {
    fn make_dir(&mut self, path: String, mode: u32) -> wasmtime::Result<Result<(), Error>> {
        self.charge_make_dir(&path)?;
        Ok(self.make_dir_in(&path, mode))
    }

    fn create_file(
        &mut self,
        path: String,
    ) -> wasmtime::Result<Result<Resource<FileWriter>, Error>> {
        if let Ok(target) = clean_entry(&path) {
            self.charge_create(&target)?;
        }
        self.quotas.open_file()?;
        Ok(match self.create_file_in(&path) {
            Ok(writer) => Ok(self.table.push(writer)?),
            Err(e) => {
                self.quotas.close_file();
                Err(e)
            }
        })
    }

    fn open_file(&mut self, path: String) -> wasmtime::Result<Result<Resource<FileReader>, Error>> {
        self.quotas.open_file()?;
        Ok(match self.open_file_in(&path) {
            Ok(reader) => Ok(self.table.push(reader)?),
            Err(e) => {
                self.quotas.close_file();
                Err(e)
            }
        })
    }

    fn remove(&mut self, path: String, recursive: bool) -> wasmtime::Result<Result<(), Error>> {
        Ok(self.remove_in(&path, recursive))
    }

    fn rename(&mut self, from: String, to: String) -> wasmtime::Result<Result<(), Error>> {
        Ok((|| {
            let root = self.tree()?;
            let (from, to) = (clean_entry(&from)?, clean_entry(&to)?);
            root.rename(&from, root, &to)
                .map_err(|e| io_error("rename", &format!("{from}` -> `{to}"), e))
        })())
    }

    fn symlink(&mut self, path: String, target: String) -> wasmtime::Result<Result<(), Error>> {
        if let Ok(link) = clean_entry(&path) {
            self.charge_create(&link)?;
        }
        Ok(self.symlink_in(&path, &target))
    }

    fn set_mode(&mut self, path: String, mode: u32) -> wasmtime::Result<Result<(), Error>> {
        self.charge_set_mode(&path)?;
        Ok(self.set_mode_in(&path, mode))
    }

    fn stat(&mut self, path: String) -> wasmtime::Result<Result<Option<EntryStat>, Error>> {
        Ok(self.stat_in(&path))
    }

    fn list_dir(&mut self, path: String) -> wasmtime::Result<Result<Vec<String>, Error>> {
        Ok(self.list_dir_in(&path))
    }
}

impl staging::HostFileReader for HostState {
    fn size(&mut self, reader: Resource<FileReader>) -> wasmtime::Result<u64> {
        Ok(self.table.get(&reader)?.size)
    }

    fn read_at(
        &mut self,
        reader: Resource<FileReader>,
        offset: u64,
        max_len: u32,
    ) -> wasmtime::Result<Result<Vec<u8>, Error>> {
        let reader = self.table.get(&reader)?;
        let mut buf = vec![0; max_len.min(MAX_READ_CHUNK) as usize];
        let mut filled = 0;
        while filled < buf.len() {
            match reader.file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Ok(Err(io_error("read", &reader.path, e))),
            }
        }
        buf.truncate(filled);
        Ok(Ok(buf))
    }

    fn drop(&mut self, reader: Resource<FileReader>) -> wasmtime::Result<()> {
        self.table.delete(reader)?;
        self.quotas.close_file();
        Ok(())
    }
}

impl staging::HostFileWriter for HostState {
    fn write(
        &mut self,
        writer: Resource<FileWriter>,
        bytes: Vec<u8>,
    ) -> wasmtime::Result<Result<(), Error>> {
        self.charge_write(&writer, bytes.len() as u64)?;
        Ok(self.table.get_mut(&writer)?.append(&bytes))
    }

    fn copy_from_source(
        &mut self,
        writer: Resource<FileWriter>,
        source: Resource<DataSource>,
        len: u64,
    ) -> wasmtime::Result<Result<(), Error>> {
        self.copy_source(&writer, &source, len)
    }

    fn copy_from_file(
        &mut self,
        writer: Resource<FileWriter>,
        base: Resource<FileReader>,
        offset: u64,
        len: u64,
    ) -> wasmtime::Result<Result<(), Error>> {
        self.copy_base(&writer, &base, offset, len)
    }

    fn finish(
        &mut self,
        writer: Resource<FileWriter>,
        mode: u32,
        mtime: i64,
    ) -> wasmtime::Result<Result<u64, Error>> {
        let writer = self.table.delete(writer)?;
        self.quotas.close_file();
        Ok(writer.finish(mode, mtime))
    }

    fn drop(&mut self, writer: Resource<FileWriter>) -> wasmtime::Result<()> {
        // `FileWriter`'s own `Drop` removes the unfinished temporary file.
        self.table.delete(writer)?;
        self.quotas.close_file();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_resolves_inside_and_refuses_escapes() {
        assert_eq!(clean("a/./b//c").unwrap(), "a/b/c");
        assert_eq!(clean("a/../b").unwrap(), "b");
        assert_eq!(clean(".").unwrap(), "");
        assert_eq!(clean("../x").unwrap_err().kind, ErrorKind::Escape);
        assert_eq!(clean("a/../../x").unwrap_err().kind, ErrorKind::Escape);
        assert_eq!(clean("/etc/passwd").unwrap_err().kind, ErrorKind::Escape);
        assert_eq!(clean("a\0b").unwrap_err().kind, ErrorKind::InvalidPath);
        assert_eq!(clean_entry("a/..").unwrap_err().kind, ErrorKind::InvalidPath);
    }
}
