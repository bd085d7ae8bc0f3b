//! IP addresses and CIDR blocks for allow/deny lists and the service
//! whitelist. Pure.

use std::net::IpAddr;

/// One address or CIDR block (IPv4 or IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpRule {
    pub network: IpAddr,
    pub prefix: u8,
}

impl IpRule {
    pub fn parse(s: &str) -> Result<IpRule, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR block"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && !p.starts_with('+') => n,
                _ => return Err(format!("`{s}` has an invalid prefix length")),
            },
        };
        // An IPv4-mapped IPv6 block (`::ffff:a.b.c.d/104`) is the IPv4
        // block it maps, so that it matches IPv4 clients (which `contains`
        // compares as IPv4).
        if let IpAddr::V6(v6) = network {
            if let (Some(v4), true) = (v6.to_ipv4_mapped(), prefix >= 96) {
                return Ok(IpRule {
                    network: IpAddr::V4(v4),
                    prefix: prefix - 96,
                });
            }
        }
        Ok(IpRule { network, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4-mapped IPv6 client address matches IPv4 rules.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                (u32::from(n) & mask) == (u32::from(a) & mask)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                (u128::from(n) & mask) == (u128::from(a) & mask)
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for IpRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_matching() {
        let r = IpRule::parse("198.51.100.0/24").unwrap();
        assert!(r.contains("198.51.100.7".parse().unwrap()));
        assert!(!r.contains("198.51.101.7".parse().unwrap()));
        assert!(r.contains("::ffff:198.51.100.9".parse().unwrap()));
        let r6 = IpRule::parse("2001:db8::/32").unwrap();
        assert!(r6.contains("2001:db8:1::1".parse().unwrap()));
        assert!(!r6.contains("2001:db9::1".parse().unwrap()));
        assert!(IpRule::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(IpRule::parse("10.0.0.1")
            .unwrap()
            .contains("10.0.0.1".parse().unwrap()));
        assert!(IpRule::parse("10.0.0.0/33").is_err());
        let mapped = IpRule::parse("::ffff:198.51.100.0/120").unwrap();
        assert!(mapped.contains("198.51.100.7".parse().unwrap()));
        assert!(mapped.contains("::ffff:198.51.100.8".parse().unwrap()));
        assert!(!mapped.contains("198.51.101.7".parse().unwrap()));
        assert!(IpRule::parse("nonsense").is_err());
    }
}
