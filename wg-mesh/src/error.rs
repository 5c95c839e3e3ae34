//! The crate's one error type.

/// What can go wrong in the mesh.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// A key is not 32 bytes of standard base64.
    #[error("bad WireGuard key: {0}")]
    BadKey(String),
    /// A subnet or address is malformed or does not fit.
    #[error("{0}")]
    BadAddress(String),
    /// The mesh subnet has no free address left.
    #[error("the mesh subnet {0} is full")]
    SubnetFull(String),
    /// A config file line could not be read.
    #[error("{file}:{line}: {message}")]
    BadConfig {
        /// The file shown.
        file: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The TUN device could not be made.
    #[error("cannot create the TUN device {name}: {detail}")]
    Tun {
        /// Interface name.
        name: String,
        /// The cause, with what to do about it.
        detail: String,
    },
    /// Socket I/O failed.
    #[error("{action}: {source}")]
    Io {
        /// What was attempted.
        action: String,
        /// The cause.
        source: std::io::Error,
    },
}
