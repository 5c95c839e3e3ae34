//! Mesh addresses: the subnet (default `10.42.0.0/16`), the hub's address (its first),
//! and allocation of the others to nodes and aliases. The allocation is plain data, so
//! the daemon persists it in its registry.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::MeshError;

/// The default mesh subnet.
pub const DEFAULT_SUBNET: &str = "10.42.0.0/16";

/// An IPv4 subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Subnet {
    /// Network address.
    pub network: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
}

impl Subnet {
    /// Reads `a.b.c.d/prefix` (at most /30: a hub and a node need room).
    pub fn parse(text: &str) -> Result<Subnet, MeshError> {
        let bad = |why: &str| MeshError::BadAddress(format!("bad mesh subnet {text:?}: {why}"));
        let (addr, prefix) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| bad("expected address/prefix such as 10.42.0.0/16"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| bad("the prefix must be 8 to 30"))?;
        let mask = u32::MAX << (32 - prefix);
        Ok(Subnet {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - self.prefix)
    }

    /// The hub's address: the first host address.
    pub fn hub(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask())
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Addresses handed out in a subnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocator {
    /// The subnet.
    pub subnet: Subnet,
    /// Addresses in use (the hub's is always taken).
    pub taken: BTreeSet<Ipv4Addr>,
}

impl Allocator {
    /// An allocator with only the hub's address taken.
    pub fn new(subnet: Subnet) -> Allocator {
        Allocator {
            subnet,
            taken: BTreeSet::from([subnet.hub()]),
        }
    }

    /// The lowest free address.
    pub fn allocate(&mut self) -> Result<Ipv4Addr, MeshError> {
        let first = u32::from(self.subnet.hub()) + 1;
        let last = u32::from(self.subnet.broadcast()) - 1;
        let free = (first..=last)
            .map(Ipv4Addr::from)
            .find(|a| !self.taken.contains(a))
            .ok_or_else(|| MeshError::SubnetFull(self.subnet.to_string()))?;
        self.taken.insert(free);
        Ok(free)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_handed_out_lowest_first_around_taken_ones() {
        let subnet = Subnet::parse("10.42.7.9/24").unwrap();
        assert_eq!(subnet.to_string(), "10.42.7.0/24");
        assert_eq!(subnet.hub(), Ipv4Addr::new(10, 42, 7, 1));
        let mut a = Allocator::new(subnet);
        assert_eq!(a.allocate().unwrap(), Ipv4Addr::new(10, 42, 7, 2));
        assert_eq!(a.allocate().unwrap(), Ipv4Addr::new(10, 42, 7, 3));
        // The daemon marks what its records hold; the lowest free one comes next.
        a.taken.remove(&Ipv4Addr::new(10, 42, 7, 2));
        assert_eq!(a.allocate().unwrap(), Ipv4Addr::new(10, 42, 7, 2));
        assert!(a.taken.contains(&subnet.hub()));
    }

    #[test]
    fn a_full_subnet_says_so_and_bad_ones_are_refused() {
        let mut a = Allocator::new(Subnet::parse("10.0.0.0/30").unwrap());
        assert_eq!(a.allocate().unwrap(), Ipv4Addr::new(10, 0, 0, 2));
        assert!(matches!(a.allocate(), Err(MeshError::SubnetFull(_))));
        for bad in ["10.42.0.0", "10.42.0.0/31", "10.42.0/16", "x/16"] {
            assert!(Subnet::parse(bad).is_err(), "{bad}");
        }
    }
}
