//! The config a node agent reads: wg-quick's format (`[Interface]` and `[Peer]`
//! sections of `Key = value` lines), so an operator can read it and `wg-quick` users
//! know it. The harness writes it at deploy time into the release's
//! `network/wireguard.conf`, mode 0600: it holds the node's private key.

use std::net::{Ipv4Addr, SocketAddr};

use crate::keys::{PrivateKey, PublicKey};
use crate::MeshError;

/// An address with its prefix (`10.42.0.2/16`, or `/32` for one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// Address.
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Reads `a.b.c.d/p` or `a.b.c.d` (a /32).
    pub fn parse(text: &str) -> Result<Cidr, MeshError> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, p.parse::<u8>().ok().filter(|p| *p <= 32)),
            None => (text, Some(32)),
        };
        match (addr.parse(), prefix) {
            (Ok(addr), Some(prefix)) => Ok(Cidr { addr, prefix }),
            _ => Err(MeshError::BadAddress(format!(
                "bad address {text:?}: expected a.b.c.d/prefix"
            ))),
        }
    }

    /// Whether `ip` is in this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        };
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The local side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// The interface's key.
    pub private_key: PrivateKey,
    /// Its mesh address, with the mesh's prefix.
    pub address: Cidr,
    /// UDP port to listen on (a node may leave it to the kernel).
    pub listen_port: Option<u16>,
    /// Tunnel MTU (default [`DEFAULT_MTU`]).
    pub mtu: Option<u16>,
}

/// The tunnel MTU when the config gives none: 1500 minus WireGuard's 80 bytes over IPv6.
pub const DEFAULT_MTU: u16 = 1420;

/// The keepalive every node keeps towards the hub, so a NAT in between keeps its
/// mapping.
pub const NODE_KEEPALIVE: u16 = 25;

/// One peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its key.
    pub public_key: PublicKey,
    /// Where to send to it first (the hub learns nodes' endpoints from their packets).
    pub endpoint: Option<SocketAddr>,
    /// Inner addresses it may use and that are routed to it.
    pub allowed_ips: Vec<Cidr>,
    /// Seconds between keepalives.
    pub persistent_keepalive: Option<u16>,
}

/// A whole config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `[Interface]`.
    pub interface: Interface,
    /// `[Peer]` sections.
    pub peers: Vec<Peer>,
}

impl Config {
    /// The config of a node whose one peer is the hub at `hub_endpoint`.
    pub fn node(
        private_key: PrivateKey,
        address: Cidr,
        hub: PublicKey,
        hub_endpoint: SocketAddr,
        mesh: Cidr,
    ) -> Config {
        Config {
            interface: Interface {
                private_key,
                address,
                listen_port: None,
                mtu: None,
            },
            peers: vec![Peer {
                public_key: hub,
                endpoint: Some(hub_endpoint),
                allowed_ips: vec![mesh],
                persistent_keepalive: Some(NODE_KEEPALIVE),
            }],
        }
    }

    /// The file's text (it holds the private key: write it 0600).
    pub fn render(&self) -> String {
        let i = &self.interface;
        let mut out = format!(
            "[Interface]\nPrivateKey = {}\nAddress = {}\n",
            i.private_key.to_base64(),
            i.address
        );
        if let Some(p) = i.listen_port {
            out += &format!("ListenPort = {p}\n");
        }
        if let Some(m) = i.mtu {
            out += &format!("MTU = {m}\n");
        }
        for p in &self.peers {
            out += &format!("\n[Peer]\nPublicKey = {}\n", p.public_key);
            if let Some(e) = p.endpoint {
                out += &format!("Endpoint = {e}\n");
            }
            let ips: Vec<String> = p.allowed_ips.iter().map(Cidr::to_string).collect();
            out += &format!("AllowedIPs = {}\n", ips.join(", "));
            if let Some(k) = p.persistent_keepalive {
                out += &format!("PersistentKeepalive = {k}\n");
            }
        }
        out
    }

    /// Reads a config file's text; `file` names it in errors (which never quote a
    /// key's value).
    pub fn parse(text: &str, file: &str) -> Result<Config, MeshError> {
        enum Section {
            None,
            Interface,
            Peer,
        }
        let err = |line: usize, message: String| MeshError::BadConfig {
            file: file.to_owned(),
            line,
            message,
        };
        let mut section = Section::None;
        let (mut key, mut address, mut port, mut mtu) = (None, None, None, None);
        let mut peers: Vec<Peer> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = raw.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            match line {
                "[Interface]" => {
                    section = Section::Interface;
                    continue;
                }
                "[Peer]" => {
                    section = Section::Peer;
                    peers.push(Peer {
                        public_key: PublicKey([0; 32]),
                        endpoint: None,
                        allowed_ips: Vec::new(),
                        persistent_keepalive: None,
                    });
                    continue;
                }
                _ => {}
            }
            let (name, value) = line
                .split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| err(n, "expected `Key = value` or a [Section]".into()))?;
            let bad = |e: MeshError| err(n, format!("{name}: {e}"));
            match (&section, name) {
                (Section::Interface, "PrivateKey") => {
                    // The message names the problem, never the value.
                    key = Some(PrivateKey::from_base64(value).map_err(bad)?);
                }
                (Section::Interface, "Address") => address = Some(Cidr::parse(value).map_err(bad)?),
                (Section::Interface, "ListenPort") => {
                    port = Some(
                        value
                            .parse()
                            .map_err(|_| err(n, format!("ListenPort: bad port {value:?}")))?,
                    )
                }
                (Section::Interface, "MTU") => {
                    mtu = Some(
                        value
                            .parse()
                            .map_err(|_| err(n, format!("MTU: bad value {value:?}")))?,
                    )
                }
                (Section::Peer, "PublicKey") => {
                    let peer = peers.last_mut().expect("in a [Peer] section");
                    peer.public_key = PublicKey::from_base64(value).map_err(bad)?;
                }
                (Section::Peer, "Endpoint") => {
                    let peer = peers.last_mut().expect("in a [Peer] section");
                    peer.endpoint = Some(value.parse().map_err(|_| {
                        err(n, format!("Endpoint: expected ip:port, found {value:?}"))
                    })?);
                }
                (Section::Peer, "AllowedIPs") => {
                    let peer = peers.last_mut().expect("in a [Peer] section");
                    for part in value.split(',').filter(|p| !p.trim().is_empty()) {
                        peer.allowed_ips.push(Cidr::parse(part).map_err(bad)?);
                    }
                }
                (Section::Peer, "PersistentKeepalive") => {
                    let peer = peers.last_mut().expect("in a [Peer] section");
                    peer.persistent_keepalive = Some(value.parse().map_err(|_| {
                        err(n, format!("PersistentKeepalive: bad value {value:?}"))
                    })?);
                }
                (Section::None, _) => return Err(err(n, format!("`{name}` outside a section"))),
                _ => return Err(err(n, format!("unknown key `{name}`"))),
            }
        }
        let missing = |what: &str| err(0, format!("[Interface] has no {what}"));
        let interface = Interface {
            private_key: key.ok_or_else(|| missing("PrivateKey"))?,
            address: address.ok_or_else(|| missing("Address"))?,
            listen_port: port,
            mtu,
        };
        if let Some(i) = peers.iter().position(|p| p.public_key.0 == [0; 32]) {
            return Err(err(0, format!("peer {} has no PublicKey", i + 1)));
        }
        Ok(Config { interface, peers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_config_round_trips_through_its_text() {
        let key = PrivateKey::generate().unwrap();
        let hub = PrivateKey::generate().unwrap().public();
        let c = Config::node(
            key.clone(),
            Cidr::parse("10.42.0.2/16").unwrap(),
            hub,
            "198.18.0.1:51820".parse().unwrap(),
            Cidr::parse("10.42.0.0/16").unwrap(),
        );
        let text = c.render();
        assert!(text.contains("PersistentKeepalive = 25"), "{text}");
        assert_eq!(Config::parse(&text, "wireguard.conf").unwrap(), c);
    }

    #[test]
    fn errors_name_the_line_and_never_the_key() {
        let secret = PrivateKey::generate().unwrap().to_base64();
        let text = format!("[Interface]\nPrivateKey = {secret}\nAddress = 10.42.0.2/33\n");
        let e = Config::parse(&text, "w.conf").unwrap_err().to_string();
        assert!(e.starts_with("w.conf:3: Address: bad address"), "{e}");
        let e = Config::parse("[Interface]\nPrivateKey = short\n", "w.conf")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("w.conf:2: PrivateKey") && !e.contains("short"),
            "{e}"
        );
        let e = Config::parse(
            &format!("[Interface]\nPrivateKey = {secret}\nAddress = 10.42.0.2/16\nTable = off\n"),
            "w.conf",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("unknown key `Table`") && !e.contains(&secret),
            "{e}"
        );
    }

    #[test]
    fn networks_contain_their_addresses() {
        let c = Cidr::parse("10.42.0.0/16").unwrap();
        assert!(c.contains("10.42.200.3".parse().unwrap()));
        assert!(!c.contains("10.43.0.1".parse().unwrap()));
        assert!(Cidr::parse("10.42.0.7")
            .unwrap()
            .contains("10.42.0.7".parse().unwrap()));
    }
}
