//! File helpers shared by the store, the journal and the lock: private modes, crash-safe
//! replacement of a file, and names for files moved aside.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::RegistryError;

/// Mode of every file this crate creates: the state holds tokens, pids and configs.
pub(crate) const FILE_MODE: u32 = 0o600;

/// Wraps an I/O error with the path it concerns.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates `dir` (and missing parents) with mode 0700; an existing one is left as it is.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), RegistryError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

/// Options for a new private file.
pub(crate) fn private() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Makes `path` private (0600) when others may read it: it holds configs with
/// secrets. Returns what was done, for the daemon to report; `None` when it was
/// private already or is not there.
pub(crate) fn make_private(path: &Path) -> Result<Option<crate::Recovery>, RegistryError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = match fs::metadata(path) {
        Ok(m) => m.permissions().mode() & 0o777,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    fs::set_permissions(path, fs::Permissions::from_mode(FILE_MODE)).map_err(io_err(path))?;
    Ok(Some(crate::Recovery {
        path: path.to_owned(),
        moved_to: None,
        problem: format!("others could read it (mode {mode:o}); made it 0600"),
    }))
}

/// Writes `bytes` to a fresh `tmp` file and flushes it to disk. The handle is returned
/// open for reading and appending, so a caller can keep using the file after renaming it.
pub(crate) fn write_synced(tmp: &Path, bytes: &[u8]) -> Result<File, RegistryError> {
    let write = || -> io::Result<File> {
        let mut f = private().read(true).append(true).create(true).open(tmp)?;
        // A leftover from a crash may be longer than what we write now.
        f.set_len(0)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        Ok(f)
    };
    write().map_err(|e| {
        // Do not leave a half-written file behind (disk full); the next open would only
        // remove it anyway.
        let _ = fs::remove_file(tmp);
        io_err(tmp)(e)
    })
}

/// Renames `from` over `to` and fsyncs their directory, so the rename survives a crash.
pub(crate) fn rename_synced(from: &Path, to: &Path) -> Result<(), RegistryError> {
    fs::rename(from, to).map_err(io_err(to))?;
    sync_dir(to)
}

/// Fsyncs the directory holding `path`, making creations and renames in it durable.
pub(crate) fn sync_dir(path: &Path) -> Result<(), RegistryError> {
    sync_directory(path.parent().unwrap_or(Path::new(".")))
}

/// Fsyncs `dir`, making creations, renames and removals in it durable.
pub(crate) fn sync_directory(dir: &Path) -> Result<(), RegistryError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Replaces `path` with `bytes` crash-safely: temp file, fsync, rename, fsync of the dir.
pub(crate) fn replace(path: &Path, tmp: &Path, bytes: &[u8]) -> Result<File, RegistryError> {
    let f = write_synced(tmp, bytes)?;
    rename_synced(tmp, path)?;
    Ok(f)
}

/// Removes a leftover temp file of a write that a crash interrupted; returns whether
/// there was one.
pub(crate) fn remove_stale(tmp: &Path) -> Result<bool, RegistryError> {
    match fs::remove_file(tmp) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(tmp)(e)),
    }
}

/// A free name `<path>.corrupt-<unix time>[-n]` to keep a bad file under.
pub(crate) fn corrupt_name(path: &Path) -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let base = format!("{}.corrupt-{secs}", path.display());
    let mut name = PathBuf::from(&base);
    // Two recoveries within a second must not overwrite the first one's evidence.
    let mut n = 1;
    while name.symlink_metadata().is_ok() {
        name = PathBuf::from(format!("{base}-{n}"));
        n += 1;
    }
    name
}
