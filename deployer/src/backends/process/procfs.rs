//! What /proc says about a pid: whether it is still the process we started.

use std::fs;

/// The two fields of `/proc/<pid>/stat` that identify a process run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    /// State letter: R, S, D, Z (zombie), ...
    pub(crate) state: char,
    /// Start time in clock ticks after boot; with the pid it identifies the process,
    /// because a pid is only reused by a process that started later.
    pub(crate) start: u64,
}

/// Reads `/proc/<pid>/stat`; `None` when the pid does not exist.
pub(crate) fn stat(pid: u32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<Stat> {
    // The command name (field 2) may contain spaces and parentheses, so fields are
    // counted after its last ')': field 3 is the state, field 22 the start time.
    let rest = text.get(text.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some(Stat { state, start })
}

/// The start time of `pid`, zombies included (their pid is still taken).
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|s| s.start)
}

/// Whether `pid` is the process that started at `start` and has not exited yet.
pub(crate) fn is_running(pid: u32, start: u64) -> bool {
    stat(pid).is_some_and(|s| s.start == start && s.state != 'Z' && s.state != 'X')
}

/// The `HARNESS_INSTANCE` value in the initial environment of `pid`, if readable.
pub(crate) fn instance_of(pid: u32) -> Option<String> {
    let environ = fs::read(format!("/proc/{pid}/environ")).ok()?;
    let key = format!("{}=", super::INSTANCE_VAR);
    environ
        .split(|b| *b == 0)
        .find_map(|var| var.strip_prefix(key.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_with_spaces_and_parens() {
        let line = "42 (a b) c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 \
                    1000 100 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                state: 'S',
                start: 987654
            })
        );
    }

    #[test]
    fn knows_itself() {
        let me = std::process::id();
        let start = start_time(me).expect("own stat");
        assert!(is_running(me, start));
        assert!(!is_running(me, start + 1));
    }
}
