//! Persistent state of harnessd: the registry, the event journal and the lock
//! that keeps one daemon per state directory.
//!
//! harnessd keeps its whole registry (stacks, their config, every service's state, port
//! and the backend's record of what runs) in memory and hands it to [`Store::save`] after
//! each batch of changes; events go to the append-only [`Journal`] so that clients can
//! replay what they missed (`subscribe` with `since`). [`StateLock`] makes sure only one
//! daemon writes a state directory. Everything here is synchronous std I/O: the daemon
//! calls it from a blocking thread.
//!
//! # State directory
//! `protocol::state_dir_from_env` picks it: `HARNESS_STATE_DIR`, else
//! `$XDG_STATE_HOME/harness`, else `$HOME/.local/state/harness`. It is created with mode 0700, its files with 0600.
//! This crate owns these files in it (others, such as the daemon's certificates and
//! `daemon.json`, belong to harnessd):
//!
//! | file | what |
//! |---|---|
//! | `harnessd.lock` | flock'ed by the running daemon ([`StateLock`]); holds its pid |
//! | `instance` | the daemon instance id (16 hex chars), written once on first start |
//! | `registry.json` | the header: schema version and instance id |
//! | `stacks/<name>.json` | one stack ([`StackRecord`]), replaced atomically by each [`Store::save`] that finds it changed; `<name>` is the stack's name with every byte but `A-Za-z0-9-_` percent-encoded |
//! | `*.json.tmp` | a save in progress; a leftover is a crashed save and is removed |
//! | `*.json.corrupt-<unix time>` | an unreadable file, moved aside for a human |
//! | `stacks.new/` | a schema 1 registry being moved into stack files; a leftover is removed |
//! | `stacks.corrupt-<unix time>/` | stack files found beside a schema 1 registry, moved aside |
//! | `events.jsonl` | the [`Journal`]: one [`protocol::Event`] JSON per line, oldest first |
//! | `events.jsonl.tmp` | a journal compaction in progress |
//! | `events.jsonl.corrupt-<unix time>` | the journal as it was before bad lines were dropped |
//!
//! # Implementation
//! No threads, no background work: every call does its I/O before it returns.
//! - Crash safety: a stack is written to `stacks/<name>.json.tmp`, fsynced, renamed over
//!   `stacks/<name>.json`, and the directory is fsynced once per save, so after a crash at
//!   any moment each stack file is either the old or the new one, never a mix.
//! - Cost in proportion to the change: the daemon's [`Snapshot`] shares its stacks
//!   ([`std::sync::Arc`]), and a save writes only those changed since the last one, so
//!   a change to a small stack costs the same beside one of 1000 services as alone.
//! - Group commit: the daemon coalesces changes, so one [`Store::save`] and one
//!   [`Journal::append`] (one write and one fdatasync for the whole batch) cover many
//!   changes.
//! - Nothing is reset silently: a registry file that cannot be read is moved aside and
//!   reported as a [`Recovery`] (a bad stack file costs that stack only), and so are
//!   journal lines that cannot be read. The daemon logs them
//!   and publishes them in its `daemon.reconciled` event.
//! - The journal is bounded: past [`DEFAULT_JOURNAL_MAX_BYTES`] (8 MiB) it is compacted
//!   to its newest half; `seq` numbers keep growing, and [`Journal::first_seq`] says how
//!   far back a replay can go.
//! - The format is versioned ([`SCHEMA_VERSION`]); [`Store::open`] migrates older
//!   schemas (schema 1 kept every stack in `registry.json`).
//!
//! # Examples
//! ```
//! use std::sync::Arc;
//! use registry::{Journal, ServiceRecord, StackRecord, StateLock, Store};
//!
//! let dir = tempfile::tempdir()?;
//! let _lock = StateLock::acquire(dir.path())?;
//! let (mut store, mut snapshot, recoveries) = Store::open(dir.path())?;
//! assert!(recoveries.is_empty());
//! let stack = snapshot
//!     .stacks
//!     .entry("demo".into())
//!     .or_insert_with(|| Arc::new(StackRecord::new("demo")));
//! // A change through make_mut is what the next save writes.
//! Arc::make_mut(stack)
//!     .services
//!     .insert("api".into(), ServiceRecord::new("2026-01-01T00:00:00.000Z".into()));
//! store.save(&snapshot)?;
//! assert!(dir.path().join("stacks/demo.json").exists());
//!
//! let (journal, _) = Journal::open(dir.path())?;
//! assert_eq!(journal.last_seq(), 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs, rust_2018_idioms)]
#![forbid(unsafe_code)]

mod fsutil;
mod journal;
mod lock;
mod store;

use std::fmt;
use std::path::PathBuf;

pub use journal::{Journal, DEFAULT_JOURNAL_MAX_BYTES};
pub use lock::StateLock;
pub use store::{ServiceRecord, Snapshot, StackRecord, Store, SCHEMA_VERSION};

/// Errors of the registry. I/O errors name the file or directory.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Another process holds the lock on the state directory.
    #[error(
        "another harnessd{} holds the state directory {}",
        holder_pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        dir.display()
    )]
    Locked {
        /// The state directory.
        dir: PathBuf,
        /// Pid the holder wrote into the lock file, when it could be read.
        holder_pid: Option<u32>,
    },
    /// Reading, writing, syncing or renaming a file failed (disk full, read-only, EACCES).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A registry file was written by a newer harnessd; this one does not start on it.
    #[error(
        "{}: written by a newer harnessd (registry schema {schema}; this one reads up to {}): run that harnessd, or stop its stacks with it (`harness down`) before starting this one",
        path.display(),
        crate::SCHEMA_VERSION
    )]
    NewerSchema {
        /// The file.
        path: PathBuf,
        /// Its schema.
        schema: u32,
    },
    /// Data could not be encoded or decoded (a journal line changed under the daemon).
    #[error("{}: {problem}", path.display())]
    Corrupt {
        /// The file involved.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// Something found wrong in the state directory at open, and what was done about it.
/// Its `Display` is one line for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The file that had the problem.
    pub path: PathBuf,
    /// Where the original was moved (or linked) to, to keep it for a human.
    pub moved_to: Option<PathBuf>,
    /// What was wrong and what was done.
    pub problem: String,
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.problem)?;
        if let Some(to) = &self.moved_to {
            write!(f, " (original kept as {})", to.display())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_and_recoveries_read_well() {
        let locked = RegistryError::Locked {
            dir: "/d".into(),
            holder_pid: None,
        };
        assert_eq!(
            locked.to_string(),
            "another harnessd holds the state directory /d"
        );
        let r = Recovery {
            path: "/d/a".into(),
            moved_to: Some("/d/b".into()),
            problem: "bad".into(),
        };
        assert_eq!(r.to_string(), "/d/a: bad (original kept as /d/b)");
    }
}
