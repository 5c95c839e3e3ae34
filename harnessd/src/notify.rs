//! Readiness for systemd (`Type=notify`): harnessd tells the service manager through
//! `NOTIFY_SOCKET` when it serves and when it stops. Without that variable nothing is
//! sent.

use std::os::unix::net::UnixDatagram;

/// Sends one sd_notify message (`READY=1`, `STOPPING=1`, ...) when `NOTIFY_SOCKET`
/// names a socket; returns whether it did.
pub fn notify(message: &str) -> std::io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    match bytes.strip_prefix(b"@") {
        // An abstract socket (systemd's usual choice): a name, not a file.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(message.as_bytes(), &addr)?;
        }
        None => {
            socket.send_to(message.as_bytes(), &path)?;
        }
    }
    Ok(true)
}
