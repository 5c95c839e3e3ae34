//! Service log files: one JSON object per line, rotated by size, read by offset.
//!
//! A line of `x.log` is `{"o":12,"t":"2024-05-01T10:00:00.123Z","s":"stdout","l":"text"}`.
//! Offsets number a service's lines from 0 and keep counting across rotations
//! (`x.log` -> `x.log.1` -> ... -> `x.log.N`, the oldest dropped) and across restarts
//! of the service, so a client can resume from the offset it saw last.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::DeployError;

/// Longest line stored as one entry; longer lines are split into several entries.
pub const MAX_LINE: usize = 64 * 1024;

/// How far apart the binary search in [`read_from`] stops and starts reading lines.
const SEARCH_SLACK: u64 = 64 * 1024;

/// Chunk size for reading a file backwards in [`tail`].
const TAIL_CHUNK: u64 = 64 * 1024;

/// One line of a service's output.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// Position of the line in the service's whole output, from 0.
    #[serde(rename = "o")]
    pub offset: u64,
    /// When the shim read the line, RFC 3339 UTC with milliseconds.
    #[serde(rename = "t")]
    pub time: String,
    /// `stdout` or `stderr`.
    #[serde(rename = "s")]
    pub stream: String,
    /// The text without its newline (invalid UTF-8 replaced by U+FFFD).
    #[serde(rename = "l")]
    pub line: String,
}

/// Entries with `offset >= offset`, oldest first, at most `max`, across the rotated
/// files. A missing log is empty; entries rotated away are skipped.
pub fn read_from(log_path: &Path, offset: u64, max: usize) -> Result<Vec<LogEntry>, DeployError> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| DeployError::ReadLog { path, source }
    };
    let files = files_newest_first(log_path);
    // The newest file whose first entry is at or before `offset` holds it; when none
    // does, the entry was rotated away and reading starts at the oldest file.
    let mut start = files.len();
    for (i, file) in files.iter().enumerate() {
        start = i + 1;
        match first_offset(file).map_err(err(file))? {
            Some(first) if first <= offset => break,
            _ => {}
        }
    }
    let mut out = Vec::new();
    let mut next = offset;
    for file in files[..start].iter().rev() {
        if out.len() >= max {
            break;
        }
        read_file_from(file, &mut next, max, &mut out).map_err(err(file))?;
    }
    Ok(out)
}

/// The last `n` entries, oldest first. Reads the files backwards in chunks, so the
/// cost depends on `n`, not on the size of the log.
pub fn tail(log_path: &Path, n: usize) -> Result<Vec<LogEntry>, DeployError> {
    let mut newest_first = Vec::new();
    for file in files_newest_first(log_path) {
        if newest_first.len() >= n {
            break;
        }
        last_entries(&file, n - newest_first.len(), &mut newest_first).map_err(|source| {
            DeployError::ReadLog {
                path: file.clone(),
                source,
            }
        })?;
    }
    newest_first.reverse();
    Ok(newest_first)
}

/// The offset the next line of this service gets: one past the last one written,
/// or 0 for a service that never logged.
pub fn next_offset(log_path: &Path) -> Result<u64, DeployError> {
    Ok(tail(log_path, 1)?.last().map_or(0, |e| e.offset + 1))
}

/// `x.log`, `x.log.1`, `x.log.2`, ... as far as they exist.
fn files_newest_first(log_path: &Path) -> Vec<PathBuf> {
    let current = log_path.exists().then(|| log_path.to_owned());
    let rotated = (1..)
        .map(|i| rotated(log_path, i))
        .take_while(|p| p.exists());
    current.into_iter().chain(rotated).collect()
}

fn rotated(log_path: &Path, i: usize) -> PathBuf {
    let mut name = log_path.as_os_str().to_owned();
    name.push(format!(".{i}"));
    PathBuf::from(name)
}

/// A file that vanished between listing and opening (rotated away) reads as empty.
fn open_existing(path: &Path) -> io::Result<Option<File>> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Parses a complete line; anything else (a torn last line, garbage) is skipped.
fn parse(line: &[u8]) -> Option<LogEntry> {
    serde_json::from_slice(line).ok()
}

fn first_offset(path: &Path) -> io::Result<Option<u64>> {
    let Some(file) = open_existing(path)? else {
        return Ok(None);
    };
    let mut line = Vec::new();
    BufReader::new(file).read_until(b'\n', &mut line)?;
    Ok(line
        .ends_with(b"\n")
        .then(|| parse(&line))
        .flatten()
        .map(|e| e.offset))
}

/// Appends the entries of one file with offset >= `*next` to `out` (up to `max` in
/// all), moving `*next` past each, which also drops duplicates when a rotation
/// happens while reading.
fn read_file_from(
    path: &Path,
    next: &mut u64,
    max: usize,
    out: &mut Vec<LogEntry>,
) -> io::Result<()> {
    let Some(file) = open_existing(path)? else {
        return Ok(());
    };
    let start = seek_start(&file, file.metadata()?.len(), *next)?;
    let mut reader = BufReader::new(&file);
    reader.seek(SeekFrom::Start(start))?;
    let mut line = Vec::new();
    while out.len() < max {
        line.clear();
        // A line without its newline is still being written: stop before it.
        if reader.read_until(b'\n', &mut line)? == 0 || !line.ends_with(b"\n") {
            break;
        }
        if let Some(entry) = parse(&line).filter(|e| e.offset >= *next) {
            *next = entry.offset + 1;
            out.push(entry);
        }
    }
    Ok(())
}

/// A line start at or before the first line with offset >= `target`: binary search
/// over byte positions (offsets grow along the file), so following a 10 MiB log
/// does not parse it all on every read.
fn seek_start(file: &File, len: u64, target: u64) -> io::Result<u64> {
    // Invariant: `lo` is a line start and every line before it has offset < target.
    let (mut lo, mut hi) = (0, len);
    while hi - lo > SEARCH_SLACK {
        let mid = lo + (hi - lo) / 2;
        match line_after(file, mid)? {
            Some((start, offset)) if offset < target && start < hi => lo = start,
            _ => hi = mid,
        }
    }
    Ok(lo)
}

/// The first complete line starting at or after `pos`: its start and offset.
fn line_after(file: &File, pos: u64) -> io::Result<Option<(u64, u64)>> {
    let mut reader = BufReader::new(file);
    reader.seek(SeekFrom::Start(pos - 1))?;
    let mut skipped = Vec::new();
    reader.read_until(b'\n', &mut skipped)?;
    let start = pos - 1 + skipped.len() as u64;
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    Ok(line
        .ends_with(b"\n")
        .then(|| parse(&line))
        .flatten()
        .map(|e| (start, e.offset)))
}

/// Pushes up to `n` of the last entries of one file onto `newest_first`, newest first.
fn last_entries(path: &Path, n: usize, newest_first: &mut Vec<LogEntry>) -> io::Result<()> {
    let Some(file) = open_existing(path)? else {
        return Ok(());
    };
    let wanted = newest_first.len() + n;
    let mut pos = file.metadata()?.len();
    // Bytes after `pos` not yet parsed: the head of a line that starts before `pos`.
    let mut carry = Vec::new();
    while pos > 0 && newest_first.len() < wanted {
        let size = TAIL_CHUNK.min(pos);
        pos -= size;
        let mut buf = vec![0; size as usize];
        file.read_exact_at(&mut buf, pos)?;
        buf.extend_from_slice(&carry);
        // Before the first newline is a fragment of a line that starts earlier,
        // unless this chunk starts the file.
        let split = if pos == 0 {
            0
        } else {
            buf.iter()
                .position(|b| *b == b'\n')
                .map_or(buf.len(), |i| i + 1)
        };
        let (head, complete) = buf.split_at(split);
        // The last piece (after the final newline) is empty or a torn line: parse
        // fails on both, so it is skipped.
        for line in complete.rsplit(|b| *b == b'\n') {
            if newest_first.len() >= wanted {
                break;
            }
            newest_first.extend(parse(line));
        }
        carry = head.to_vec();
    }
    Ok(())
}

/// The shim's writer: appends entries, rotates by size, numbers lines.
pub(crate) struct LogWriter {
    path: PathBuf,
    file: File,
    size: u64,
    next: u64,
    max_bytes: u64,
    keep: usize,
}

impl LogWriter {
    /// Opens `path` for appending, continuing the offsets found in it and its
    /// rotated files.
    pub(crate) fn open(path: &Path, max_bytes: u64, keep: usize) -> Result<Self, DeployError> {
        let err = |source| DeployError::WriteLog {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(err)?;
        }
        let next = next_offset(path)?;
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        let size = file.metadata().map_err(err)?.len();
        // A shim killed mid-write leaves a torn line; start on a fresh one so the
        // next entry stays parseable.
        if size > 0 {
            let mut last = [0];
            file.read_exact_at(&mut last, size - 1).map_err(err)?;
            if last != *b"\n" {
                file.write_all(b"\n").map_err(err)?;
            }
        }
        Ok(Self {
            path: path.to_owned(),
            file,
            size,
            next,
            max_bytes,
            keep,
        })
    }

    /// Appends one line of `stream` (`stdout` or `stderr`), at most [`MAX_LINE`] bytes.
    pub(crate) fn write(&mut self, stream: &str, line: &[u8]) -> io::Result<()> {
        let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        self.write_at(stream, line, now)
    }

    /// Appends one line stamped with `time` (RFC 3339), e.g. the engine's timestamp.
    pub(crate) fn write_at(&mut self, stream: &str, line: &[u8], time: String) -> io::Result<()> {
        let entry = LogEntry {
            offset: self.next,
            time,
            stream: stream.to_owned(),
            line: String::from_utf8_lossy(line).into_owned(),
        };
        let mut buf = serde_json::to_vec(&entry)?;
        buf.push(b'\n');
        if self.size > 0 && self.size + buf.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        // One write per entry, so readers never see two entries interleaved.
        self.file.write_all(&buf)?;
        self.size += buf.len() as u64;
        self.next += 1;
        Ok(())
    }

    /// x.log.(N-1) -> x.log.N, ..., x.log -> x.log.1, then a fresh x.log.
    fn rotate(&mut self) -> io::Result<()> {
        for i in (1..self.keep).rev() {
            match fs::rename(rotated(&self.path, i), rotated(&self.path, i + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        if self.keep > 0 {
            fs::rename(&self.path, rotated(&self.path, 1))?;
        }
        self.file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// Splits a byte stream, fed in pieces of any size, into lines of at most
/// [`MAX_LINE`] bytes (without the newline); a longer line is cut into pieces of that
/// size.
#[derive(Default)]
pub(crate) struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Hands each line that `bytes` completes to `emit` and keeps the rest.
    pub(crate) fn feed(&mut self, mut bytes: &[u8], mut emit: impl FnMut(&[u8])) {
        while !bytes.is_empty() {
            let room = MAX_LINE - self.partial.len();
            let newline = bytes.iter().take(room + 1).position(|&b| b == b'\n');
            let (line, rest) = match newline {
                Some(i) => (&bytes[..i], &bytes[i + 1..]),
                None if bytes.len() > room => bytes.split_at(room),
                None => {
                    self.partial.extend_from_slice(bytes);
                    return;
                }
            };
            if self.partial.is_empty() {
                emit(line);
            } else {
                self.partial.extend_from_slice(line);
                emit(&self.partial);
                self.partial.clear();
            }
            bytes = rest;
        }
    }

    /// At end of file: hands over the unfinished last line, if any.
    pub(crate) fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.partial.is_empty() {
            emit(&self.partial);
            self.partial.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_lines(path: &Path, max_bytes: u64, keep: usize, lines: std::ops::Range<u64>) {
        let mut w = LogWriter::open(path, max_bytes, keep).unwrap();
        for i in lines {
            let stream = if i % 2 == 0 { "stdout" } else { "stderr" };
            w.write(stream, format!("line {i}").as_bytes()).unwrap();
        }
    }

    fn offsets(entries: &[LogEntry]) -> Vec<u64> {
        entries.iter().map(|e| e.offset).collect()
    }

    #[test]
    fn missing_log_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        assert_eq!(read_from(&path, 0, 10).unwrap(), vec![]);
        assert_eq!(tail(&path, 10).unwrap(), vec![]);
        assert_eq!(next_offset(&path).unwrap(), 0);
    }

    #[test]
    fn rotation_keeps_offsets_continuous() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/x.log");
        write_lines(&path, 1000, 3, 0..100);
        assert!(rotated(&path, 3).exists());
        assert!(!rotated(&path, 4).exists());
        let all = read_from(&path, 0, usize::MAX).unwrap();
        let first = all[0].offset;
        assert!(first > 0, "old lines are dropped");
        assert_eq!(offsets(&all), (first..100).collect::<Vec<_>>());
        assert_eq!(all[1].line, format!("line {}", first + 1));
        // Reading from inside an older file crosses into the newer ones.
        assert_eq!(
            offsets(&read_from(&path, first + 3, 5).unwrap()),
            (first + 3..first + 8).collect::<Vec<_>>()
        );
        assert_eq!(
            offsets(&read_from(&path, 0, 2).unwrap()),
            vec![first, first + 1]
        );
        assert_eq!(read_from(&path, 100, 10).unwrap(), vec![]);
        let last = tail(&path, 30).unwrap();
        assert_eq!(offsets(&last), (70..100).collect::<Vec<_>>());
        assert_eq!(last[29].stream, "stderr");
        assert_eq!(next_offset(&path).unwrap(), 100);
        // A restart continues the numbering.
        write_lines(&path, 1000, 3, 100..103);
        assert_eq!(offsets(&tail(&path, 4).unwrap()), vec![99, 100, 101, 102]);
        assert_eq!(tail(&path, 1).unwrap()[0].line, "line 102");
    }

    #[test]
    fn continues_after_a_rotation_left_an_empty_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        write_lines(&path, 1000, 2, 0..20);
        // What a rotation does before the first write to the fresh file.
        fs::rename(rotated(&path, 1), rotated(&path, 2)).unwrap();
        fs::rename(&path, rotated(&path, 1)).unwrap();
        File::create(&path).unwrap();
        assert_eq!(next_offset(&path).unwrap(), 20);
        assert_eq!(read_from(&path, 19, 10).unwrap()[0].line, "line 19");
    }

    #[test]
    fn read_from_searches_a_big_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        write_lines(&path, u64::MAX, 3, 0..20_000);
        assert!(fs::metadata(&path).unwrap().len() > 10 * SEARCH_SLACK);
        for start in [0, 1, 4_999, 12_345, 19_999] {
            let got = read_from(&path, start, 3).unwrap();
            assert_eq!(
                offsets(&got),
                (start..(start + 3).min(20_000)).collect::<Vec<_>>()
            );
        }
        assert_eq!(offsets(&tail(&path, 2).unwrap()), vec![19_998, 19_999]);
    }

    #[test]
    fn torn_last_line_is_skipped_and_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        write_lines(&path, u64::MAX, 3, 0..3);
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"o\":3,\"t\":")
            .unwrap();
        assert_eq!(offsets(&read_from(&path, 0, 10).unwrap()), vec![0, 1, 2]);
        assert_eq!(next_offset(&path).unwrap(), 3);
        write_lines(&path, u64::MAX, 3, 3..4);
        assert_eq!(offsets(&read_from(&path, 0, 10).unwrap()), vec![0, 1, 2, 3]);
    }

    #[test]
    fn keep_zero_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        write_lines(&path, 300, 0, 0..10);
        assert!(!rotated(&path, 1).exists());
        assert_eq!(tail(&path, 1).unwrap()[0].offset, 9);
    }

    #[test]
    fn splits_long_lines_and_converts_bad_utf8() {
        let mut input = vec![b'a'; MAX_LINE];
        input.push(b'\n');
        input.extend(vec![b'b'; MAX_LINE * 2 + 5]);
        input.extend(b"\nbad \xff\n\nlast");
        // Fed whole, byte by byte, and in pieces that end anywhere: the same lines.
        for piece in [input.len(), 1, 7, MAX_LINE - 1, MAX_LINE, MAX_LINE + 1] {
            let mut got = Vec::new();
            let mut splitter = LineSplitter::default();
            for chunk in input.chunks(piece) {
                splitter.feed(chunk, |l| got.push(l.to_vec()));
            }
            splitter.finish(|l| got.push(l.to_vec()));
            let lens: Vec<usize> = got.iter().map(Vec::len).collect();
            assert_eq!(
                lens,
                vec![MAX_LINE, MAX_LINE, MAX_LINE, 5, 5, 0, 4],
                "{piece}"
            );
            assert_eq!(got[4], b"bad \xff");
            assert!(got[..3].iter().all(|l| l.iter().all(|&b| b == l[0])));
        }

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let mut w = LogWriter::open(&path, u64::MAX, 3).unwrap();
        w.write("stdout", b"bad \xff").unwrap();
        assert_eq!(tail(&path, 1).unwrap()[0].line, "bad \u{fffd}");
    }
}
