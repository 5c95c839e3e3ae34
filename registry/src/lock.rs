//! The exclusive lock that keeps one daemon per state directory.

use std::fs::{self, File, TryLockError};
use std::io::Write;
use std::path::Path;

use crate::fsutil::{ensure_dir, io_err, private};
use crate::RegistryError;

/// Name of the lock file in the state directory.
const LOCK_FILE: &str = "harnessd.lock";

/// An exclusive `flock` on `<dir>/harnessd.lock`, held for the value's lifetime.
///
/// The kernel drops the lock when the process dies, so a crashed daemon never leaves a
/// stale lock behind; the file itself stays (removing it would race with a daemon that
/// just opened it) and holds the pid of the last holder.
#[derive(Debug)]
pub struct StateLock {
    // Only held: closing the file releases the lock.
    _file: File,
}

impl StateLock {
    /// Creates `dir` (mode 0700) if missing and locks it, writing our pid into the lock
    /// file. Fails with [`RegistryError::Locked`] naming the holder's pid when another
    /// process (or another `StateLock` in this one) holds it; never waits.
    pub fn acquire(dir: &Path) -> Result<StateLock, RegistryError> {
        ensure_dir(dir)?;
        let path = dir.join(LOCK_FILE);
        // Not truncated on open: until we hold the lock, the pid in it is the holder's.
        let mut file = private()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder_pid = fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
                return Err(RegistryError::Locked {
                    dir: dir.to_owned(),
                    holder_pid,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io_err(&path)(e)),
        }
        file.set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(io_err(&path))?;
        Ok(StateLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn second_acquire_is_refused_until_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let first = StateLock::acquire(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let lock_file = fs::metadata(dir.join(LOCK_FILE)).unwrap();
        assert_eq!(lock_file.permissions().mode() & 0o777, 0o600);

        // flock locks belong to open file descriptions, so this conflicts in-process.
        let err = StateLock::acquire(&dir).unwrap_err();
        match &err {
            RegistryError::Locked { dir: d, holder_pid } => {
                assert_eq!(d, &dir);
                assert_eq!(*holder_pid, Some(std::process::id()));
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("(pid {})", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains(&dir.display().to_string()), "{msg}");

        drop(first);
        let _again = StateLock::acquire(&dir).unwrap();
        let pid = fs::read_to_string(dir.join(LOCK_FILE)).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
    }
}
