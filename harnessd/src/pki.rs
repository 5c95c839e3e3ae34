//! The daemon's own PKI and token: made on first start, reused afterwards.
//!
//! Files in the state directory (all secrets 0600): `ca.pem` (public, clients pin it),
//! `ca.key`, `server.pem`, `server.key`, `token`. The CA's name carries the instance id so
//! a client that pins the wrong daemon's CA gets `UnknownIssuer`, not a confusing
//! signature error.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_rustls::rustls;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::DaemonError;

/// Paths of the PKI files in a state directory.
#[derive(Debug, Clone)]
pub struct PkiPaths {
    /// CA certificate (public).
    pub ca_cert: PathBuf,
    /// CA private key.
    pub ca_key: PathBuf,
    /// Server certificate chain.
    pub server_cert: PathBuf,
    /// Server private key.
    pub server_key: PathBuf,
    /// Client token.
    pub token: PathBuf,
}

impl PkiPaths {
    /// The PKI file paths inside `dir`.
    pub fn new(dir: &Path) -> Self {
        PkiPaths {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            token: dir.join("token"),
        }
    }
}

/// Loaded server identity and token.
pub struct Pki {
    /// TLS configuration of the listener (TLS 1.3 only).
    pub server_config: Arc<rustls::ServerConfig>,
    /// The token clients must send in `hello`.
    pub token: String,
}

/// What the listener needs beyond the daemon's own PKI.
#[derive(Debug, Clone, Default)]
pub struct ListenerTls {
    /// A CA (PEM) for client certificates: clients that present one must chain to it,
    /// and clients on other machines must present one (checked per connection).
    pub client_ca: Option<PathBuf>,
    /// Extra names for the server certificate (the listen address, `--server-name`).
    pub server_names: Vec<String>,
}

/// Names the server certificate always carries.
const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Loads the PKI from `paths`, making whatever is missing. With extra server names
/// the server certificate is issued afresh (by the same CA, which is what clients
/// pin), so it names what remote clients connect to.
pub fn load_or_create(
    paths: &PkiPaths,
    instance: &str,
    listener: &ListenerTls,
) -> Result<Pki, DaemonError> {
    if !paths.ca_cert.exists() || !paths.ca_key.exists() {
        create_ca(paths, instance)?;
        // A new CA invalidates any old server certificate.
        let _ = fs::remove_file(&paths.server_cert);
    }
    if !paths.server_cert.exists()
        || !paths.server_key.exists()
        || !listener.server_names.is_empty()
    {
        create_server_cert(paths, &listener.server_names)?;
    }
    if !paths.token.exists() {
        let token = random_hex(32)?;
        write_secret(&paths.token, token.as_bytes())?;
    }
    for secret in [&paths.ca_key, &paths.server_key, &paths.token] {
        check_private(secret)?;
    }
    let token = read(&paths.token)?.trim().to_owned();
    let chain_pem = read(&paths.server_cert)?;
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pki_error(&paths.server_cert, e))?;
    let key = PrivateKeyDer::from_pem_slice(read(&paths.server_key)?.as_bytes())
        .map_err(|e| pki_error(&paths.server_key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| pki_error(&paths.server_cert, e))?;
    let builder = match &listener.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(read(ca)?.as_bytes()) {
                roots
                    .add(cert.map_err(|e| pki_error(ca, e))?)
                    .map_err(|e| pki_error(ca, e))?;
            }
            // Optional at the TLS layer: local clients have none; the server refuses
            // remote clients without one after the handshake.
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| pki_error(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let server_config = builder
        .with_single_cert(chain, key)
        .map_err(|e| pki_error(&paths.server_cert, e))?;
    Ok(Pki {
        server_config: Arc::new(server_config),
        token,
    })
}

fn create_ca(paths: &PkiPaths, instance: &str) -> Result<(), DaemonError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error)?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("harness CA {instance}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_after = rcgen::date_time_ymd(2046, 1, 1);
    let key = KeyPair::generate().map_err(rcgen_error)?;
    let cert = params.self_signed(&key).map_err(rcgen_error)?;
    write_secret(&paths.ca_key, key.serialize_pem().as_bytes())?;
    write_file(&paths.ca_cert, cert.pem().as_bytes(), 0o644)
}

fn create_server_cert(paths: &PkiPaths, extra_names: &[String]) -> Result<(), DaemonError> {
    let ca_pem = read(&paths.ca_cert)?;
    let ca_key = KeyPair::from_pem(&read(&paths.ca_key)?).map_err(rcgen_error)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(rcgen_error)?;
    let mut names: Vec<String> = LOCAL_NAMES.iter().map(|n| n.to_string()).collect();
    for n in extra_names {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let mut params = CertificateParams::new(names).map_err(rcgen_error)?;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_after = rcgen::date_time_ymd(2045, 1, 1);
    let key = KeyPair::generate().map_err(rcgen_error)?;
    let cert = params.signed_by(&key, &issuer).map_err(rcgen_error)?;
    write_secret(&paths.server_key, key.serialize_pem().as_bytes())?;
    write_file(
        &paths.server_cert,
        format!("{}{}", cert.pem(), ca_pem).as_bytes(),
        0o644,
    )
}

/// `n` random bytes as lower-case hex.
pub fn random_hex(n: usize) -> Result<String, DaemonError> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).map_err(|e| DaemonError::Pki {
        path: PathBuf::from("getrandom"),
        message: e.to_string(),
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A secret file must not be readable by group or others: refuse to start otherwise.
fn check_private(path: &Path) -> Result<(), DaemonError> {
    let mode = fs::metadata(path)
        .map_err(|e| io_error(path, e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(DaemonError::Pki {
            path: path.to_owned(),
            message: format!(
                "secret file has mode {:o}; it must be 0600 (run: chmod 600 {})",
                mode & 0o777,
                path.display()
            ),
        });
    }
    Ok(())
}

fn write_secret(path: &Path, data: &[u8]) -> Result<(), DaemonError> {
    write_file(path, data, 0o600)
}

/// Writes a file atomically (temp + fsync + rename) with the given mode.
pub(crate) fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), DaemonError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io_error(&tmp, e))?;
    f.write_all(data).map_err(|e| io_error(&tmp, e))?;
    f.sync_all().map_err(|e| io_error(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_error(path, e))
}

fn read(path: &Path) -> Result<String, DaemonError> {
    fs::read_to_string(path).map_err(|e| io_error(path, e))
}

fn io_error(path: &Path, e: std::io::Error) -> DaemonError {
    DaemonError::Io {
        path: path.to_owned(),
        source: e,
    }
}

fn pki_error(path: &Path, e: impl std::fmt::Display) -> DaemonError {
    DaemonError::Pki {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

fn rcgen_error(e: rcgen::Error) -> DaemonError {
    DaemonError::Pki {
        path: PathBuf::from("rcgen"),
        message: e.to_string(),
    }
}
