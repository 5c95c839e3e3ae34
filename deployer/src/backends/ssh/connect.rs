//! Making a session: TCP connect, handshake, host-key check, authentication.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ssh2::{CheckResult, HashType, KnownHostFileKind, MethodType, Session};

use super::{ssh_error, SshTarget};
use crate::DeployError;

/// What to do with a host whose key no known_hosts file has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum HostKeyPolicy {
    /// Refuse it (OpenSSH's `StrictHostKeyChecking yes`).
    #[default]
    Strict,
    /// Accept and record it in the daemon's own known_hosts (`accept-new`); a key
    /// that differs from a recorded one is still refused.
    AcceptNew,
}

/// Host key algorithms to pin when the key offered first is not the one recorded:
/// a known_hosts file may hold only another type of key for the host, which libssh2
/// reports as a mismatch.
const KEY_TYPES: [&str; 3] = [
    "ssh-ed25519",
    "ecdsa-sha2-nistp256,ecdsa-sha2-nistp384,ecdsa-sha2-nistp521",
    "rsa-sha2-512,rsa-sha2-256,ssh-rsa",
];

/// Ciphers, fastest first as measured here (harness-bench ssh): libssh2's AES-CTR
/// moved a 50 MB package in 0.99× the time of OpenSSH's scp, its AES-GCM in 1.3×.
const CIPHERS: &str =
    "aes128-ctr,aes256-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com";

/// Connects, checks the host key and logs in.
pub(super) fn open(target: &SshTarget) -> Result<(Session, TcpStream), DeployError> {
    let (session, socket, checked) = handshake(target, None)?;
    let (session, socket) = match checked {
        CheckResult::Match => (session, socket),
        CheckResult::NotFound if target.policy == HostKeyPolicy::AcceptNew => {
            remember(target, &session)?;
            (session, socket)
        }
        CheckResult::NotFound | CheckResult::Failure => {
            return Err(DeployError::HostKeyUnknown {
                host: target.describe(),
                fingerprint: fingerprint(&session),
                files: files_text(target),
            })
        }
        CheckResult::Mismatch => {
            let first = fingerprint(&session);
            let mut found = None;
            for types in KEY_TYPES {
                let Ok((s, sock, CheckResult::Match)) = handshake(target, Some(types)) else {
                    continue;
                };
                found = Some((s, sock));
                break;
            }
            found.ok_or_else(|| DeployError::HostKeyMismatch {
                host: target.describe(),
                fingerprint: first,
                files: files_text(target),
            })?
        }
    };
    authenticate(target, &session)?;
    session.set_keepalive(true, super::KEEPALIVE.as_secs() as u32);
    Ok((session, socket))
}

/// TCP connect and SSH handshake (offering only `key_types` when given); returns the
/// session and how its host key compares with the known_hosts files.
fn handshake(
    target: &SshTarget,
    key_types: Option<&str>,
) -> Result<(Session, TcpStream, CheckResult), DeployError> {
    let addrs: Vec<_> = (target.address.as_str(), target.port)
        .to_socket_addrs()
        .map_err(|e| ssh_error(target, "resolve the address", e))?
        .collect();
    let mut last = None;
    let mut tcp = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, target.connect_timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let tcp = tcp.ok_or_else(|| {
        ssh_error(
            target,
            "connect",
            last.map_or_else(|| "no address".to_owned(), |e| e.to_string()),
        )
    })?;
    // Commands are small request/answer exchanges: without NODELAY each waits out
    // the peer's delayed ACK (~40 ms).
    tcp.set_nodelay(true)
        .map_err(|e| ssh_error(target, "connect", e))?;
    let socket = tcp
        .try_clone()
        .map_err(|e| ssh_error(target, "connect", e))?;
    let mut session = Session::new().map_err(|e| ssh_error(target, "start a session", e))?;
    session.set_tcp_stream(tcp);
    session.set_timeout(target.connect_timeout.as_millis().min(u32::MAX as u128) as u32);
    // Transfers are cipher-bound: prefer the cipher libssh2 runs fastest.
    for (method, prefs) in [
        (MethodType::CryptCs, CIPHERS),
        (MethodType::CryptSc, CIPHERS),
    ] {
        session
            .method_pref(method, prefs)
            .map_err(|e| ssh_error(target, "choose ciphers", e))?;
    }
    if let Some(types) = key_types {
        session
            .method_pref(MethodType::HostKey, types)
            .map_err(|e| ssh_error(target, "choose host key types", e))?;
    }
    session
        .handshake()
        .map_err(|e| ssh_error(target, "complete the SSH handshake", e))?;
    let (key, _) = session
        .host_key()
        .ok_or_else(|| ssh_error(target, "read the host key", "the server sent none"))?;
    let mut known = session
        .known_hosts()
        .map_err(|e| ssh_error(target, "read known hosts", e))?;
    for file in known_hosts_files(target) {
        if file.exists() {
            known
                .read_file(&file, KnownHostFileKind::OpenSSH)
                .map_err(|e| ssh_error(target, &format!("read {}", file.display()), e))?;
        }
    }
    let checked = known.check_port(&target.address, target.port, key);
    Ok((session, socket, checked))
}

fn known_hosts_files(target: &SshTarget) -> impl Iterator<Item = PathBuf> + '_ {
    target
        .known_hosts
        .iter()
        .cloned()
        .chain(std::iter::once(target.own_known_hosts.clone()))
}

fn files_text(target: &SshTarget) -> String {
    known_hosts_files(target)
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `SHA256:…` as `ssh-keygen -l` prints it.
fn fingerprint(session: &Session) -> String {
    session
        .host_key_hash(HashType::Sha256)
        .map(|h| {
            format!(
                "SHA256:{}",
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(h)
            )
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Records the host's key in the daemon's own known_hosts (accept-new).
fn remember(target: &SshTarget, session: &Session) -> Result<(), DeployError> {
    let (key, key_type) = session
        .host_key()
        .ok_or_else(|| ssh_error(target, "read the host key", "the server sent none"))?;
    let file = &target.own_known_hosts;
    let write = |detail: String| DeployError::WriteFile {
        path: file.clone(),
        source: std::io::Error::other(detail),
    };
    let mut known = session.known_hosts().map_err(|e| write(e.to_string()))?;
    if file.exists() {
        known
            .read_file(file, KnownHostFileKind::OpenSSH)
            .map_err(|e| write(e.to_string()))?;
    }
    let name = if target.port == 22 {
        target.address.clone()
    } else {
        format!("[{}]:{}", target.address, target.port)
    };
    known
        .add(&name, key, "added by harness (accept-new)", key_type.into())
        .map_err(|e| write(e.to_string()))?;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| write(e.to_string()))?;
    }
    known
        .write_file(file, KnownHostFileKind::OpenSSH)
        .map_err(|e| write(e.to_string()))?;
    tracing::info!(
        "accepted the new host key {} of {} into {}",
        fingerprint(session),
        target.describe(),
        file.display()
    );
    Ok(())
}

/// Logs in with the key file, else the agent, else the default keys.
fn authenticate(target: &SshTarget, session: &Session) -> Result<(), DeployError> {
    let user = &target.user;
    let auth_error = |detail: String| DeployError::SshAuth {
        host: target.describe(),
        detail,
    };
    if let Some(key) = &target.key {
        return session
            .userauth_pubkey_file(user, None, key, None)
            .map_err(|e| {
                let hint = if e.code() == ssh2::ErrorCode::Session(-16) {
                    " (is the key protected by a passphrase? load it into ssh-agent and leave ssh_key out)"
                } else {
                    ""
                };
                auth_error(format!("key {}: {e}{hint}", key.display()))
            });
    }
    let mut tried = Vec::new();
    if std::env::var_os("SSH_AUTH_SOCK").is_some() {
        match session.userauth_agent(user) {
            Ok(()) if session.authenticated() => return Ok(()),
            Ok(()) => tried.push("ssh-agent: no key accepted".to_owned()),
            Err(e) => tried.push(format!("ssh-agent: {e}")),
        }
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    for name in ["id_ed25519", "id_ecdsa", "id_rsa"] {
        let Some(key) = home.as_deref().map(|h| h.join(".ssh").join(name)) else {
            continue;
        };
        if !Path::new(&key).exists() {
            continue;
        }
        match session.userauth_pubkey_file(user, None, &key, None) {
            Ok(()) => return Ok(()),
            Err(e) => tried.push(format!("{}: {e}", key.display())),
        }
    }
    if tried.is_empty() {
        tried.push("no ssh_key given, no SSH_AUTH_SOCK, no key in ~/.ssh".to_owned());
    }
    Err(auth_error(tried.join("; ")))
}
