//! The append-only event journal `events.jsonl`: group-committed appends, replay by
//! `seq`, recovery from torn writes and compaction to a bounded size.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use protocol::Event;

use crate::fsutil::{corrupt_name, ensure_dir, io_err, private, remove_stale, replace, sync_dir};
use crate::{Recovery, RegistryError};

/// Size past which [`Journal::open`]'s journal is compacted: 8 MiB.
pub const DEFAULT_JOURNAL_MAX_BYTES: u64 = 8 << 20;

const JOURNAL_FILE: &str = "events.jsonl";
const JOURNAL_TMP: &str = "events.jsonl.tmp";

/// The event journal `<dir>/events.jsonl`: one [`Event`] JSON per line, `seq` strictly
/// increasing, oldest first.
///
/// An in-memory index (seq and offset of every line, 16 bytes per event) lets
/// [`Journal::read_since`] read just the lines it returns.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    tmp: PathBuf,
    // Opened for reading and appending: appends always land at the end.
    file: File,
    len: u64,
    // (seq, byte offset of its line), oldest first.
    index: Vec<(u64, u64)>,
    max_bytes: u64,
    // Reused between appends.
    buf: Vec<u8>,
}

impl Journal {
    /// Opens (or creates) `<dir>/events.jsonl` with the default size bound
    /// ([`DEFAULT_JOURNAL_MAX_BYTES`]). See [`Journal::open_with_limit`].
    pub fn open(dir: &Path) -> Result<(Journal, Vec<Recovery>), RegistryError> {
        Journal::open_with_limit(dir, DEFAULT_JOURNAL_MAX_BYTES)
    }

    /// Opens (or creates) `<dir>/events.jsonl`, compacting it whenever it grows past
    /// `max_bytes`.
    ///
    /// The whole file is read once to index it. Damage is repaired and reported, never a
    /// panic or an error:
    /// - a torn last line (a crash mid-append; the batch was never acknowledged) is
    ///   truncated away;
    /// - lines that are not events, or whose `seq` does not increase, are dropped: the
    ///   file is rewritten without them and the original is kept as
    ///   `events.jsonl.corrupt-<unix time>`.
    pub fn open_with_limit(
        dir: &Path,
        max_bytes: u64,
    ) -> Result<(Journal, Vec<Recovery>), RegistryError> {
        ensure_dir(dir)?;
        let path = dir.join(JOURNAL_FILE);
        let tmp = dir.join(JOURNAL_TMP);
        // A compaction that a crash interrupted: the journal itself is intact.
        remove_stale(&tmp)?;
        let mut recoveries = Vec::new();
        let mut file = private()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut data = Vec::new();
        io::Read::read_to_end(&mut file, &mut data).map_err(io_err(&path))?;

        // 1. A torn last line: everything after the last newline.
        let complete = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if complete < data.len() {
            file.set_len(complete as u64)
                .and_then(|()| file.sync_data())
                .map_err(io_err(&path))?;
            recoveries.push(Recovery {
                path: path.clone(),
                moved_to: None,
                problem: format!(
                    "dropped a torn last line ({} bytes) left by a crash mid-append",
                    data.len() - complete
                ),
            });
            data.truncate(complete);
        }

        // 2. Index the lines; keep the good ones aside in case some are bad.
        let mut index = Vec::new();
        let mut good = Vec::new();
        let mut bad_lines = Vec::new();
        for (number, line) in data.split_inclusive(|&b| b == b'\n').enumerate() {
            let last = index.last().map_or(0, |&(seq, _)| seq);
            match serde_json::from_slice::<Event>(line) {
                Ok(event) if event.seq > last => {
                    index.push((event.seq, good.len() as u64));
                    good.extend_from_slice(line);
                }
                _ => bad_lines.push(number + 1),
            }
        }

        // 3. Bad lines: rewrite without them, keeping the original for a human. The hard
        //    link makes the original survive the rename, and at every moment
        //    `events.jsonl` is either the old or the new file.
        if !bad_lines.is_empty() {
            let moved_to = corrupt_name(&path);
            // A copy where the filesystem has no hard links.
            fs::hard_link(&path, &moved_to)
                .or_else(|_| fs::copy(&path, &moved_to).map(drop))
                .map_err(io_err(&moved_to))?;
            sync_dir(&moved_to)?;
            file = replace(&path, &tmp, &good)?;
            recoveries.push(Recovery {
                path: path.clone(),
                moved_to: Some(moved_to),
                problem: format!(
                    "dropped {} unreadable or out-of-order line(s): {}",
                    bad_lines.len(),
                    summarize(&bad_lines)
                ),
            });
        }
        let journal = Journal {
            path,
            tmp,
            file,
            len: good.len() as u64,
            index,
            max_bytes,
            buf: Vec::new(),
        };
        Ok((journal, recoveries))
    }

    /// `seq` of the newest event; 0 when the journal is empty.
    pub fn last_seq(&self) -> u64 {
        self.index.last().map_or(0, |&(seq, _)| seq)
    }

    /// `seq` of the oldest event still in the journal (older ones were compacted away,
    /// so a replay from before it is incomplete); `last_seq() + 1` when it is empty.
    pub fn first_seq(&self) -> u64 {
        self.index
            .first()
            .map_or(self.last_seq() + 1, |&(seq, _)| seq)
    }

    /// Appends a batch with one write and one fdatasync (group commit). If the write
    /// fails, the file is cut back to where it was, so a failed batch leaves nothing.
    /// Compacts the journal afterwards when it grew past its bound; a failed compaction
    /// is logged and retried at the next append, since the events themselves are safe.
    ///
    /// # Panics
    /// If the `seq`s are not strictly increasing, within the batch and after
    /// [`Journal::last_seq`]: that is a bug in the caller.
    pub fn append(&mut self, events: &[Event]) -> Result<(), RegistryError> {
        let mut last = self.last_seq();
        for e in events {
            assert!(
                e.seq > last,
                "journal seq must increase: {} after {last}",
                e.seq
            );
            last = e.seq;
        }
        if events.is_empty() {
            return Ok(());
        }
        self.buf.clear();
        let mut new_index = Vec::with_capacity(events.len());
        for e in events {
            new_index.push((e.seq, self.len + self.buf.len() as u64));
            serde_json::to_writer(&mut self.buf, e).map_err(|err| RegistryError::Corrupt {
                path: self.path.clone(),
                problem: format!("cannot encode event {}: {err}", e.seq),
            })?;
            self.buf.push(b'\n');
        }
        if let Err(e) = self
            .file
            .write_all(&self.buf)
            .and_then(|()| self.file.sync_data())
        {
            // Best effort: a partial batch in the middle of the file would read as a
            // garbage line later.
            let _ = self.file.set_len(self.len);
            return Err(io_err(&self.path)(e));
        }
        self.len += self.buf.len() as u64;
        self.index.extend(new_index);
        if self.len > self.max_bytes {
            if let Err(e) = self.compact() {
                tracing::warn!("cannot compact the event journal: {e}");
            }
        }
        Ok(())
    }

    /// Events with `seq >= since`, oldest first, at most `limit` of them.
    pub fn read_since(&self, since: u64, limit: usize) -> Result<Vec<Event>, RegistryError> {
        let start = self.index.partition_point(|&(seq, _)| seq < since);
        let end = start.saturating_add(limit).min(self.index.len());
        if start == end {
            return Ok(Vec::new());
        }
        let from = self.index[start].1;
        let to = self.index.get(end).map_or(self.len, |&(_, offset)| offset);
        let mut data = vec![0; (to - from) as usize];
        self.file
            .read_exact_at(&mut data, from)
            .map_err(io_err(&self.path))?;
        data.split_inclusive(|&b| b == b'\n')
            .map(|line| {
                // Every line was checked at open or written by us: a bad one now means
                // something else wrote the file.
                serde_json::from_slice(line).map_err(|e| RegistryError::Corrupt {
                    path: self.path.clone(),
                    problem: format!("changed under the daemon: {e}"),
                })
            })
            .collect()
    }

    /// Keeps the newest lines that fit in half the bound (at least the newest event, so
    /// `last_seq` survives): temp file, fsync, rename, fsync of the directory.
    fn compact(&mut self) -> Result<(), RegistryError> {
        let keep_from = self.len.saturating_sub(self.max_bytes / 2);
        let first = self
            .index
            .partition_point(|&(_, offset)| offset < keep_from)
            .min(self.index.len().saturating_sub(1));
        let Some(&(_, base)) = self.index.get(first) else {
            return Ok(());
        };
        let mut data = vec![0; (self.len - base) as usize];
        self.file
            .read_exact_at(&mut data, base)
            .map_err(io_err(&self.path))?;
        // The new file's handle is opened before the rename, so appends go to it even
        // if the directory changes later.
        self.file = replace(&self.path, &self.tmp, &data)?;
        self.index.drain(..first);
        for entry in &mut self.index {
            entry.1 -= base;
        }
        self.len -= base;
        Ok(())
    }
}

/// `3, 7, 9` or `3, 7, 9, ... (12 in all)` for a long list of line numbers.
fn summarize(lines: &[usize]) -> String {
    let shown: Vec<String> = lines.iter().take(10).map(|n| n.to_string()).collect();
    let mut s = format!("line {}", shown.join(", "));
    if lines.len() > shown.len() {
        s.push_str(&format!(", ... ({} in all)", lines.len()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::events::{EventKind, Exited, Reconciled};

    fn event(seq: u64) -> Event {
        Event {
            seq,
            time: "2026-01-01T00:00:00.000Z".into(),
            kind: EventKind::ServiceExited(Exited {
                stack: "demo".into(),
                name: format!("svc-{seq}"),
                code: Some(0),
                signal: None,
            }),
        }
    }

    fn events(seqs: std::ops::RangeInclusive<u64>) -> Vec<Event> {
        seqs.map(event).collect()
    }

    fn seqs(events: &[Event]) -> Vec<u64> {
        events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn append_reopen_and_read_since() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, rec) = Journal::open(tmp.path()).unwrap();
        assert!(rec.is_empty());
        assert_eq!((j.first_seq(), j.last_seq()), (1, 0));
        assert!(j.read_since(0, 10).unwrap().is_empty());
        j.append(&events(1..=3)).unwrap();
        j.append(&[]).unwrap();
        j.append(&events(4..=5)).unwrap();
        // Gaps are fine: seq only has to increase.
        j.append(&[event(9)]).unwrap();
        assert_eq!(j.last_seq(), 9);
        drop(j);

        let (j, rec) = Journal::open(tmp.path()).unwrap();
        assert!(rec.is_empty(), "{rec:?}");
        assert_eq!((j.first_seq(), j.last_seq()), (1, 9));
        assert_eq!(
            j.read_since(0, usize::MAX).unwrap(),
            [events(1..=5), vec![event(9)]].concat()
        );
        assert_eq!(seqs(&j.read_since(4, usize::MAX).unwrap()), [4, 5, 9]);
        assert_eq!(seqs(&j.read_since(6, usize::MAX).unwrap()), [9]);
        assert_eq!(seqs(&j.read_since(2, 2).unwrap()), [2, 3]);
        assert!(j.read_since(10, 5).unwrap().is_empty());
        assert!(j.read_since(1, 0).unwrap().is_empty());
    }

    #[test]
    #[should_panic(expected = "journal seq must increase")]
    fn non_increasing_seq_panics() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(tmp.path()).unwrap();
        j.append(&events(1..=2)).unwrap();
        j.append(&[event(2)]).unwrap();
    }

    #[test]
    fn torn_last_line_is_truncated_and_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(tmp.path()).unwrap();
        j.append(&events(1..=3)).unwrap();
        drop(j);
        let path = tmp.path().join(JOURNAL_FILE);
        let good_len = fs::metadata(&path).unwrap().len();
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":4,\"time\":\"2026-").unwrap();
        drop(f);

        let (mut j, rec) = Journal::open(tmp.path()).unwrap();
        assert_eq!(rec.len(), 1, "{rec:?}");
        assert!(rec[0].problem.contains("torn last line"), "{}", rec[0]);
        assert_eq!(fs::metadata(&path).unwrap().len(), good_len);
        assert_eq!(j.last_seq(), 3);
        // The interrupted batch was never acknowledged, so its seq is reused.
        j.append(&[event(4)]).unwrap();
        drop(j);
        let (j, rec) = Journal::open(tmp.path()).unwrap();
        assert!(rec.is_empty(), "{rec:?}");
        assert_eq!(seqs(&j.read_since(0, 10).unwrap()), [1, 2, 3, 4]);
    }

    #[test]
    fn garbage_lines_are_dropped_and_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(JOURNAL_FILE);
        let line = |seq| format!("{}\n", serde_json::to_string(&event(seq)).unwrap());
        let original = [
            line(1),
            "not json\n".into(),
            line(2),
            "\0\0\0\n".into(),
            line(2), // duplicate seq
            "{\"seq\":5,\"event\":\"from.the.future\"}\n".into(),
            line(3),
        ]
        .concat();
        fs::write(&path, &original).unwrap();

        let (mut j, rec) = Journal::open(tmp.path()).unwrap();
        assert_eq!(rec.len(), 1, "{rec:?}");
        assert!(rec[0].problem.contains("dropped 4"), "{}", rec[0]);
        assert!(rec[0].problem.contains("line 2, 4, 5, 6"), "{}", rec[0]);
        let moved = rec[0].moved_to.as_ref().unwrap();
        assert_eq!(fs::read_to_string(moved).unwrap(), original);
        assert_eq!(seqs(&j.read_since(0, 10).unwrap()), [1, 2, 3]);
        j.append(&[event(4)]).unwrap();
        drop(j);
        let (j, rec) = Journal::open(tmp.path()).unwrap();
        assert!(rec.is_empty(), "{rec:?}");
        assert_eq!(seqs(&j.read_since(0, 10).unwrap()), [1, 2, 3, 4]);
    }

    #[test]
    fn compaction_keeps_newest_and_seq_continues() {
        let tmp = tempfile::tempdir().unwrap();
        let line_len = serde_json::to_vec(&event(100)).unwrap().len() as u64 + 1;
        let max = 20 * line_len;
        let (mut j, _) = Journal::open_with_limit(tmp.path(), max).unwrap();
        for batch in 0..10 {
            let first = batch * 5 + 100;
            j.append(&events(first..=first + 4)).unwrap();
            let size = fs::metadata(tmp.path().join(JOURNAL_FILE)).unwrap().len();
            assert!(size <= max, "batch {batch}: {size} > {max}");
        }
        assert_eq!(j.last_seq(), 149);
        let first = j.first_seq();
        assert!(first > 100, "nothing was compacted");
        let kept = j.read_since(0, usize::MAX).unwrap();
        assert_eq!(seqs(&kept), (first..=149).collect::<Vec<_>>());
        assert!(!tmp.path().join(JOURNAL_TMP).exists());
        drop(j);

        let (mut j, rec) = Journal::open_with_limit(tmp.path(), max).unwrap();
        assert!(rec.is_empty(), "{rec:?}");
        assert_eq!((j.first_seq(), j.last_seq()), (first, 149));
        j.append(&[event(150)]).unwrap();
        assert_eq!(j.read_since(150, 1).unwrap(), [event(150)]);
    }

    #[test]
    fn compaction_keeps_at_least_the_newest_event() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open_with_limit(tmp.path(), 10).unwrap();
        j.append(&events(1..=3)).unwrap();
        let big = Event {
            seq: 4,
            time: "t".into(),
            kind: EventKind::DaemonReconciled(Reconciled {
                fixes: vec!["x".repeat(100)],
            }),
        };
        j.append(std::slice::from_ref(&big)).unwrap();
        assert_eq!((j.first_seq(), j.last_seq()), (4, 4));
        assert_eq!(j.read_since(0, 10).unwrap(), [big]);
    }

    #[test]
    fn summarize_caps_the_list() {
        assert_eq!(summarize(&[3]), "line 3");
        let many: Vec<usize> = (1..=12).collect();
        assert_eq!(
            summarize(&many),
            "line 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ... (12 in all)"
        );
    }
}
