//! What /proc says about a pid (whether it is still the process we started) and
//! about listening sockets.

use std::fs;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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
    // One read into a buffer that holds any stat line (52 numbers and a command name
    // of at most 64 bytes), where `read_to_string` made six.
    let mut buf = [0u8; 4096];
    let len = fs::File::open(format!("/proc/{pid}/stat"))
        .and_then(|mut file| file.read(&mut buf))
        .ok()?;
    parse_stat(std::str::from_utf8(&buf[..len]).ok()?)
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

/// The children of `pid` (of each of its threads), from `/proc/<pid>/task/*/children`;
/// `None` when that cannot be read (the pid is gone, or the kernel was built without
/// CONFIG_PROC_CHILDREN).
pub(crate) fn children(pid: u32) -> Option<Vec<u32>> {
    let mut children = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let list = fs::read_to_string(task.ok()?.path().join("children")).ok()?;
        children.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    Some(children)
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

/// The local addresses of TCP sockets listening on `port`, from /proc/net/tcp and
/// /proc/net/tcp6 of this network namespace.
pub fn tcp_listeners(port: u16) -> Vec<IpAddr> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| fs::read_to_string(f).ok())
        .flat_map(|text| parse_listeners(&text, port))
        .collect()
}

fn parse_listeners(text: &str, port: u16) -> Vec<IpAddr> {
    const LISTEN: &str = "0A";
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            let (addr, p) = local.split_once(':')?;
            (state == LISTEN && u16::from_str_radix(p, 16).ok()? == port)
                .then(|| parse_addr(addr))
                .flatten()
        })
        .collect()
}

/// A /proc/net address: hex of 32-bit words, each in host (little-endian) byte order.
fn parse_addr(hex: &str) -> Option<IpAddr> {
    let words: Vec<u32> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).map(u32::swap_bytes))
        .collect::<Result<_, _>>()
        .ok()?;
    match words.as_slice() {
        [a] => Some(IpAddr::V4(Ipv4Addr::from(*a))),
        [a, b, c, d] => {
            let bits = (u128::from(*a) << 96)
                | (u128::from(*b) << 64)
                | (u128::from(*c) << 32)
                | u128::from(*d);
            Some(IpAddr::V6(Ipv6Addr::from(bits)))
        }
        _ => None,
    }
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

    #[test]
    fn listeners_are_read_from_proc_net() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 10 0 0 10 0\n   1: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 10 0 0 10 0\n   2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 10 0 0 10 0\n";
        assert_eq!(
            parse_listeners(tcp, 8080),
            vec![IpAddr::from([127, 0, 0, 1])]
        );
        assert_eq!(parse_listeners(tcp, 80), vec![IpAddr::from([0, 0, 0, 0])]);
        let tcp6 = "header\n   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A rest\n";
        assert_eq!(
            parse_listeners(tcp6, 8080),
            vec![IpAddr::V6(Ipv6Addr::LOCALHOST)]
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(tcp_listeners(port), vec![IpAddr::from([127, 0, 0, 1])]);
    }
}
