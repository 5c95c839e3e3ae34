//! Tells what answers on an open port by speaking to it, not by its number: an SSH
//! banner, PostgreSQL's reply to an SSL request, Redis's reply to PING, an HTTP status
//! line. Each probe uses a connection of its own, so one protocol's bytes never confuse
//! the next; the port's usual protocol is tried first.

use std::net::SocketAddr;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};

/// PostgreSQL's SSLRequest: length 8, code 80877103. A server answers one byte, `S` or
/// `N`, before anything else.
const PG_SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// What a probe learnt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `postgresql`, `redis`, `http`, `ssh` or `unknown`.
    pub kind: &'static str,
    /// What identified it.
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Postgres,
    Redis,
    Http,
}

/// The order to try for a port: its usual protocol first. An SSH server needs no step
/// of its own: it sends its banner on connect, before it reads anything.
fn steps_for(port: u16) -> [Step; 3] {
    use Step::*;
    match port {
        5432 | 5433 => [Postgres, Http, Redis],
        6379 | 6380 => [Redis, Http, Postgres],
        // A web server answers PING and GET at once; Redis answers GET with an error;
        // PostgreSQL closes on both. The SSL request goes last, as a server that does
        // not speak it waits for more bytes until the reply wait is over.
        _ => [Http, Redis, Postgres],
    }
}

/// Identifies the service at `addr`; `wait` bounds each connect and each reply.
pub async fn identify(addr: SocketAddr, wait: Duration) -> Identity {
    for step in steps_for(addr.port()) {
        if let Some(found) = try_step(addr, step, wait).await {
            return found;
        }
    }
    Identity {
        kind: "unknown",
        detail: None,
    }
}

/// Whether the service at `addr` is of `kind`: the check a `discovered` service gets
/// when it has none of its own.
pub async fn is_kind(addr: SocketAddr, kind: &str, wait: Duration) -> Result<String, String> {
    let step = match kind {
        "postgresql" => Step::Postgres,
        "redis" => Step::Redis,
        "http" => Step::Http,
        // Any probe reads the banner an SSH server sends first.
        "ssh" => Step::Http,
        other => return Err(format!("cannot check for a {other} service")),
    };
    match try_step(addr, step, wait).await {
        Some(found) if found.kind == kind => Ok(found
            .detail
            .unwrap_or_else(|| format!("{kind} answers at {addr}"))),
        Some(other) => Err(format!("{addr} answers as {}, not {kind}", other.kind)),
        None => Err(format!("no {kind} service answers at {addr}")),
    }
}

async fn try_step(addr: SocketAddr, step: Step, wait: Duration) -> Option<Identity> {
    let request: &[u8] = match step {
        Step::Postgres => &PG_SSL_REQUEST,
        Step::Redis => b"PING\r\n",
        Step::Http => b"GET / HTTP/1.0\r\nUser-Agent: harnessd\r\n\r\n",
    };
    // Servers on a LAN answer in milliseconds; one that does not speak the protocol
    // may wait for more bytes, so the wait for a reply is short.
    let reply = exchange(addr, request, wait, wait.min(MAX_REPLY_WAIT)).await?;
    judge(step, &reply)
}

/// Longest wait for the reply to a probe.
const MAX_REPLY_WAIT: Duration = Duration::from_millis(500);

/// What a reply to `step` says; `None` when it is not that protocol.
fn judge(step: Step, reply: &[u8]) -> Option<Identity> {
    let first_line = || {
        let text = String::from_utf8_lossy(reply);
        text.lines().next().unwrap_or_default().trim().to_owned()
    };
    let found = |kind, detail: String| {
        Some(Identity {
            kind,
            detail: Some(detail),
        })
    };
    if reply.starts_with(b"SSH-") {
        return found("ssh", first_line());
    }
    match step {
        Step::Postgres if reply == b"S" || reply == b"N" => {
            let ssl = if reply == b"S" { "offers" } else { "no" };
            found("postgresql", format!("SSL request answered: {ssl} SSL"))
        }
        Step::Redis if reply.starts_with(b"+PONG") || reply.starts_with(b"-NOAUTH") => {
            found("redis", format!("PING answered {}", first_line()))
        }
        Step::Http => {
            let head = crate::http1::parse_head(reply)?;
            let server = head
                .server
                .map(|s| format!(", Server: {s}"))
                .unwrap_or_default();
            found("http", format!("GET / answered {}{server}", head.code))
        }
        _ => None,
    }
}

/// Connects, sends `request` (when not empty) and reads what comes back within
/// `reply_wait`: up to the first 4 KiB, or until the server closes. `None` when the
/// connect fails or nothing comes back.
async fn exchange(
    addr: SocketAddr,
    request: &[u8],
    connect_wait: Duration,
    reply_wait: Duration,
) -> Option<Vec<u8>> {
    let connect = async { async_net::TcpStream::connect(addr).await.ok() };
    let mut stream = smol::future::or(connect, async {
        smol::Timer::after(connect_wait).await;
        None
    })
    .await?;
    if !request.is_empty() {
        stream.write_all(request).await.ok()?;
    }
    let read = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            // PostgreSQL's one byte, a banner line, an HTTP head: enough to judge.
            if got.len() == 1 && (got == b"S" || got == b"N")
                || got.contains(&b'\n')
                || got.len() >= 4096
            {
                break;
            }
        }
        got
    };
    let got = smol::future::or(read, async {
        smol::Timer::after(reply_wait).await;
        Vec::new()
    })
    .await;
    (!got.is_empty()).then_some(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_judged_by_protocol() {
        assert_eq!(
            judge(Step::Http, b"SSH-2.0-OpenSSH_9.2\r\n").unwrap().kind,
            "ssh"
        );
        assert_eq!(judge(Step::Postgres, b"N").unwrap().kind, "postgresql");
        assert_eq!(judge(Step::Redis, b"+PONG\r\n").unwrap().kind, "redis");
        assert_eq!(
            judge(Step::Redis, b"-NOAUTH Authentication required.\r\n")
                .unwrap()
                .kind,
            "redis"
        );
        let http = judge(Step::Http, b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n").unwrap();
        assert_eq!(
            http.detail.as_deref(),
            Some("GET / answered 200, Server: x")
        );
        // A web server's answer to PING is not Redis, an HTTP error is not PostgreSQL.
        assert!(judge(Step::Redis, b"HTTP/1.1 400 Bad Request\r\n").is_none());
        assert!(judge(Step::Postgres, b"HTTP/1.1 400 Bad Request\r\n").is_none());
        assert!(judge(Step::Http, b"220 smtp ready\r\n").is_none());
    }

    #[test]
    fn a_port_s_usual_protocol_goes_first() {
        assert_eq!(steps_for(5432)[0], Step::Postgres);
        assert_eq!(steps_for(6379)[0], Step::Redis);
        assert_eq!(steps_for(22)[0], Step::Http);
    }
}
