//! The peer table's routing: which peer an inner packet goes to (the longest matching
//! allowed IP).

use std::net::Ipv4Addr;

use crate::config::Cidr;

/// Routes to peers, by their allowed IPs; `T` identifies a peer.
#[derive(Debug, Clone)]
pub struct Routes<T> {
    entries: Vec<(Cidr, T)>,
}

impl<T> Default for Routes<T> {
    fn default() -> Self {
        Routes {
            entries: Vec::new(),
        }
    }
}

impl<T: Clone + PartialEq> Routes<T> {
    /// Routes `nets` to `peer`. An allowed IP belongs to one peer, the last to claim
    /// it (as in wg(8)): a node that joins again with a new key takes its address over
    /// from a stale peer that nobody removed.
    pub fn add(&mut self, nets: &[Cidr], peer: T) {
        self.entries.retain(|(n, _)| !nets.contains(n));
        for n in nets {
            self.entries.push((*n, peer.clone()));
        }
        // Longest prefix first, so the first match is the best one.
        self.entries.sort_by_key(|e| std::cmp::Reverse(e.0.prefix));
    }

    /// Removes every route to `peer`.
    pub fn remove(&mut self, peer: &T) {
        self.entries.retain(|(_, p)| p != peer);
    }

    /// The peer `dst` goes to.
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<&T> {
        self.entries
            .iter()
            .find(|(n, _)| n.contains(dst))
            .map(|(_, p)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_prefix_wins() {
        let mut r = Routes::default();
        r.add(&[Cidr::parse("10.42.0.0/16").unwrap()], "hub");
        r.add(&[Cidr::parse("10.42.0.5/32").unwrap()], "node5");
        assert_eq!(r.lookup("10.42.0.5".parse().unwrap()), Some(&"node5"));
        assert_eq!(r.lookup("10.42.0.6".parse().unwrap()), Some(&"hub"));
        assert_eq!(r.lookup("10.43.0.6".parse().unwrap()), None);
        r.remove(&"node5");
        assert_eq!(r.lookup("10.42.0.5".parse().unwrap()), Some(&"hub"));
    }

    #[test]
    fn an_address_claimed_again_goes_to_the_new_peer() {
        let mut r = Routes::default();
        let five = Cidr::parse("10.42.0.5/32").unwrap();
        r.add(&[five], "old");
        r.add(&[five], "new");
        assert_eq!(r.lookup("10.42.0.5".parse().unwrap()), Some(&"new"));
        r.remove(&"new");
        assert_eq!(r.lookup("10.42.0.5".parse().unwrap()), None);
    }
}
