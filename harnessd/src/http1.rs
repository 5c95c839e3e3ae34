//! A minimal HTTP/1.1 GET: enough to read the status line and headers of a health or
//! discovery endpoint, without an HTTP client stack in the daemon.

use futures_lite::{AsyncReadExt, AsyncWriteExt};

/// The head of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// `HTTP/1.1 200 OK`.
    pub status_line: String,
    /// `200`.
    pub code: u16,
    /// The `Server` header, when there is one.
    pub server: Option<String>,
}

/// GETs `path` from `addr` (`host:port`), sending `host` as the Host header; returns
/// the response head. Errors say what went wrong, starting with `what`.
pub async fn get(addr: &str, host: &str, path: &str, what: &str) -> Result<Head, String> {
    let mut stream = async_net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: harnessd\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    // Up to the end of the headers (or of the stream), at most 16 KiB.
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    parse_head(&head).ok_or_else(|| {
        let first = String::from_utf8_lossy(&head);
        let first = first.lines().next().unwrap_or_default();
        format!("{what}: not an HTTP response: {first:?}")
    })
}

/// Parses a response head; `None` when it does not start with an HTTP status line.
pub fn parse_head(bytes: &[u8]) -> Option<Head> {
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.split("\r\n");
    let status_line = lines.next()?.to_owned();
    if !status_line.starts_with("HTTP/") {
        return None;
    }
    let code = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let server = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("server"))
        .map(|(_, v)| v.trim().to_owned());
    Some(Head {
        status_line,
        code,
        server,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn heads_are_parsed_with_their_server() {
        let h =
            super::parse_head(b"HTTP/1.1 404 Not Found\r\nserver: busybox\r\n\r\nbody").unwrap();
        assert_eq!((h.code, h.server.as_deref()), (404, Some("busybox")));
        assert_eq!(h.status_line, "HTTP/1.1 404 Not Found");
        assert!(super::parse_head(b"+PONG\r\n").is_none());
        assert!(super::parse_head(b"HTTP/1.0 abc\r\n").is_none());
    }
}
