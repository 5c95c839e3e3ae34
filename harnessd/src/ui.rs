//! The browser dashboard (`ui-examples/dashboard`), served by harnessd on its own port
//! so that the page and its WebSocket share one origin and one certificate. A
//! connection whose request is a WebSocket upgrade goes on to the protocol; any other
//! request gets one of the dashboard's files (or 404) and is closed.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest request head read before giving up on a connection.
const MAX_HEAD: usize = 16 << 10;

/// The dashboard's files: path, content type, body.
const FILES: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("../../ui-examples/dashboard/index.html"),
    ),
    (
        "/app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../ui-examples/dashboard/app.js"),
    ),
    (
        "/style.css",
        "text/css; charset=utf-8",
        include_str!("../../ui-examples/dashboard/style.css"),
    ),
];

/// Reads an HTTP request head (through the blank line).
pub async fn read_head(stream: &mut (impl AsyncRead + Unpin)) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

/// Whether a request head asks for a WebSocket.
pub fn is_websocket(head: &[u8]) -> bool {
    String::from_utf8_lossy(head).lines().any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("upgrade")
                && value.trim().eq_ignore_ascii_case("websocket")
        })
    })
}

/// Answers a plain HTTP request with a dashboard file, 404 or 405.
pub async fn respond(stream: &mut (impl AsyncWrite + Unpin), head: &[u8]) -> io::Result<()> {
    let text = String::from_utf8_lossy(head);
    let mut parts = text.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split(['?', '#']).next().unwrap_or("");
    let path = if path == "/index.html" { "/" } else { path };
    let (status, content_type, body) = match (method, FILES.iter().find(|f| f.0 == path)) {
        ("GET" | "HEAD", Some((_, content_type, body))) => ("200 OK", *content_type, *body),
        ("GET" | "HEAD", None) => ("404 Not Found", "text/plain", "not found\n"),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n"),
    };
    let headers = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\nContent-Security-Policy: default-src 'self'; connect-src 'self'; frame-ancestors 'none'\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(headers.as_bytes()).await?;
    if method != "HEAD" {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.flush().await?;
    stream.close().await
}

/// A stream that first yields bytes already read from it (the request head), so the
/// WebSocket handshake sees the whole request.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    read: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// `prefix` comes out first, then the rest of `inner`.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            read: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.read < this.prefix.len() {
            let rest = &this.prefix[this.read..];
            let n = rest.len().min(buf.len());
            buf[..n].copy_from_slice(&rest[..n]);
            this.read += n;
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrades_are_told_from_page_requests_and_pages_are_served() {
        assert!(is_websocket(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        ));
        assert!(!is_websocket(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        let mut out = Vec::new();
        smol::block_on(respond(&mut out, b"GET /app.js?v=1 HTTP/1.1\r\n\r\n")).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Type: text/javascript"));
        let mut out = Vec::new();
        smol::block_on(respond(&mut out, b"GET /../token HTTP/1.1\r\n\r\n")).unwrap();
        assert!(String::from_utf8(out).unwrap().starts_with("HTTP/1.1 404"));
        let mut read = Vec::new();
        let mut s = Prefixed::new(b"head".to_vec(), &b"-rest"[..]);
        smol::block_on(s.read_to_end(&mut read)).unwrap();
        assert_eq!(read, b"head-rest");
    }
}
