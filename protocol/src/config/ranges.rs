//! Address ranges that discovery scans: `10.1.2.0/24`, a single `10.1.2.3`, or
//! `10.1.2.3/32`. IPv4 only: an IPv6 prefix is too large to scan.

use std::net::Ipv4Addr;

/// Most addresses one scan may cover (a /16), so a typo such as `10.0.0.0/8` is an
/// error instead of a 16-million-address scan.
pub const MAX_SCAN_ADDRESSES: u64 = 1 << 16;

/// A contiguous IPv4 range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressRange {
    first: u32,
    last: u32,
}

impl AddressRange {
    /// Parses `a.b.c.d/prefix` or `a.b.c.d`. For prefixes up to /30 the network and
    /// broadcast addresses are left out, as no host answers there.
    pub fn parse(text: &str) -> Result<AddressRange, String> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => {
                let prefix = p
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= 32)
                    .ok_or_else(|| format!("bad range {text:?}: the prefix must be 0 to 32"))?;
                (a, prefix)
            }
            None => (text, 32),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| {
            format!("bad range {text:?}: expected an IPv4 address or address/prefix such as 192.168.1.0/24")
        })?;
        let size = 1u64 << (32 - prefix);
        if size > MAX_SCAN_ADDRESSES {
            return Err(format!(
                "range {text:?} has {size} addresses; a scan covers at most {MAX_SCAN_ADDRESSES} (a /16): give smaller ranges"
            ));
        }
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        let network = u32::from(addr) & mask;
        let broadcast = network | !mask;
        let (first, last) = if prefix <= 30 {
            (network + 1, broadcast - 1)
        } else {
            (network, broadcast)
        };
        Ok(AddressRange { first, last })
    }

    /// Number of addresses.
    pub fn len(&self) -> u64 {
        u64::from(self.last - self.first) + 1
    }

    /// Always false: a range holds at least one address.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether `addr` is in the range.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        (self.first..=self.last).contains(&u32::from(addr))
    }

    /// The addresses, lowest first.
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> {
        (self.first..=self.last).map(Ipv4Addr::from)
    }
}

/// Every address of `ranges`, each once, in the order given; errors name the bad range.
pub fn scan_addresses(ranges: &[String]) -> Result<Vec<Ipv4Addr>, String> {
    let parsed = ranges
        .iter()
        .map(|r| AddressRange::parse(r))
        .collect::<Result<Vec<_>, _>>()?;
    let total: u64 = parsed.iter().map(AddressRange::len).sum();
    if total > MAX_SCAN_ADDRESSES {
        return Err(format!(
            "the ranges hold {total} addresses; a scan covers at most {MAX_SCAN_ADDRESSES}"
        ));
    }
    let mut seen = std::collections::HashSet::new();
    Ok(parsed
        .iter()
        .flat_map(AddressRange::addresses)
        .filter(|a| seen.insert(*a))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slash_24_has_254_hosts() {
        let r = AddressRange::parse("198.18.3.77/24").unwrap();
        assert_eq!(r.len(), 254);
        let all: Vec<_> = r.addresses().collect();
        assert_eq!(all[0], Ipv4Addr::new(198, 18, 3, 1));
        assert_eq!(all[253], Ipv4Addr::new(198, 18, 3, 254));
        assert!(!r.contains(Ipv4Addr::new(198, 18, 3, 0)));
        assert!(!r.contains(Ipv4Addr::new(198, 18, 3, 255)));
        assert!(!r.contains(Ipv4Addr::new(198, 18, 4, 1)));
    }

    #[test]
    fn single_addresses_and_small_prefixes() {
        assert_eq!(
            AddressRange::parse("127.0.0.1")
                .unwrap()
                .addresses()
                .collect::<Vec<_>>(),
            vec![Ipv4Addr::LOCALHOST]
        );
        assert_eq!(AddressRange::parse("10.0.0.0/31").unwrap().len(), 2);
        assert_eq!(AddressRange::parse("10.0.0.0/30").unwrap().len(), 2);
    }

    #[test]
    fn bad_and_huge_ranges_are_refused() {
        for bad in ["10.0.0.0/33", "nope", "::1/128", "10.0.0/24"] {
            assert!(AddressRange::parse(bad).is_err(), "{bad}");
        }
        let e = AddressRange::parse("10.0.0.0/8").unwrap_err();
        assert!(e.contains("at most 65536"), "{e}");
        assert!(AddressRange::parse("10.0.0.0/16").is_ok());
    }

    #[test]
    fn overlapping_ranges_give_each_address_once() {
        let all = scan_addresses(&["10.0.0.0/30".into(), "10.0.0.2".into()]).unwrap();
        assert_eq!(all.len(), 2);
    }
}
