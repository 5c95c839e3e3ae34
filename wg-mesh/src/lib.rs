//! The harness's userspace WireGuard mesh, on boringtun.
//!
//! Hub and spokes: the harness host is the hub; each remote node has one peer, the hub,
//! with `allowed_ips` of the whole mesh subnet and a persistent keepalive, so nodes
//! behind NAT work and node-to-node traffic goes through the hub.
//!
//! - Sans-I/O core: [`keys`] (x25519 keys in WireGuard's base64), [`subnet`] (mesh
//!   address allocation), [`config`] (the wg-quick style file a node agent reads), and
//!   [`peers`] (the peer table and its routes).
//! - [`dataplane`]: one TUN device and a UDP port (a shared socket, and one
//!   connected to each peer) driven by boringtun's `noise::Tunn`, with peers added and removed while it runs (boringtun's own
//!   `device` panics when a peer is re-sent and reads the MTU once).
//! - The `harness-node` binary runs a data plane from a config file, with a control
//!   socket for peers: the node agent on remote hosts, and the hub's data plane beside
//!   harnessd.
//!
//! Private keys never appear in `Debug` output, errors or logs.

pub mod config;
pub mod dataplane;
pub mod ip;
pub mod keys;
pub mod peers;
pub mod subnet;

mod error;
mod udp;

pub use error::MeshError;
