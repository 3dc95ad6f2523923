//! Who a connection comes from, and how many connections each address may
//! hold at once (`max_connections_per_ip`).
//!
//! The count includes handshakes still in progress, so many connections
//! that never finish their handshake (slowloris) from one address use up
//! that address's share and nobody else's. Behind a load balancer every
//! client shares the balancer's address, so for peers listed in
//! `trusted_proxies` the client is the address their `X-Forwarded-For` (or
//! `Forwarded`) header names: the rightmost address in it that is not a
//! trusted proxy itself. From anyone else those headers are ignored: a
//! client cannot pick the address it is counted under.
//!
//! IPv6 clients are counted by their /64 network, which is what one host or
//! one customer usually holds; counting single IPv6 addresses would let a
//! host open a share per address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};

use hyper::header::{HeaderMap, HeaderName};
use ipnet::IpNet;

/// The key a client is counted under.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Connections held per client address, against one limit.
pub struct PerAddress {
    limit: u32,
    held: Mutex<HashMap<IpAddr, u32>>,
}

/// One connection's share of its address's count; given back when dropped.
pub struct Share {
    of: Arc<PerAddress>,
    key: IpAddr,
}

impl PerAddress {
    pub fn new(limit: u32) -> Arc<PerAddress> {
        Arc::new(PerAddress {
            limit,
            held: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, u32>> {
        // Nothing panics while holding the lock, but a poisoned map is
        // still a valid map.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A share for one more connection from `ip`, or `None` when the
    /// address already holds `limit`.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Share> {
        let key = key(ip);
        let mut held = self.lock();
        let count = held.entry(key).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(Share {
            of: self.clone(),
            key,
        })
    }

    /// Connections `ip` holds now.
    pub fn held(&self, ip: IpAddr) -> u32 {
        self.lock().get(&key(ip)).copied().unwrap_or(0)
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut held = self.of.lock();
        if let Some(count) = held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// The addresses whose forwarding headers are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(pub Vec<IpNet>);

impl TrustedProxies {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = key_exact(ip);
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client a request from `peer` is on behalf of: `peer` itself
    /// unless it is a trusted proxy, in which case the rightmost address
    /// in `X-Forwarded-For` (or else `Forwarded`) that is not one; `None`
    /// when a trusted proxy sent no usable address.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> Option<IpAddr> {
        if !self.contains(peer) {
            return Some(peer);
        }
        let chain = forwarded_for(
            headers,
            &hyper::header::HeaderName::from_static("x-forwarded-for"),
        )
        .or_else(|| forwarded(headers))?;
        chain.into_iter().rev().find(|ip| !self.contains(*ip))
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn key_exact(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The addresses of every `X-Forwarded-For` header, in order; `None` when
/// there is none or one of them is not a list of addresses (then nothing in
/// it can be trusted).
fn forwarded_for(headers: &HeaderMap, name: &HeaderName) -> Option<Vec<IpAddr>> {
    let mut out = Vec::new();
    for value in headers.get_all(name) {
        for item in value.to_str().ok()?.split(',') {
            out.push(parse_node(item.trim())?);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The `for=` addresses of RFC 7239 `Forwarded` headers, in order.
fn forwarded(headers: &HeaderMap) -> Option<Vec<IpAddr>> {
    let mut out = Vec::new();
    for value in headers.get_all(hyper::header::FORWARDED) {
        for element in value.to_str().ok()?.split(',') {
            for pair in element.split(';') {
                let Some((name, node)) = pair.trim().split_once('=') else {
                    continue;
                };
                if name.trim().eq_ignore_ascii_case("for") {
                    out.push(parse_node(node.trim().trim_matches('"'))?);
                }
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`, `[2001:db8::1]:4711`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse() {
        return Some(ip);
    }
    if let Some(rest) = node.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    node.rsplit_once(':')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    #[test]
    fn shares_are_counted_and_given_back() {
        let per = PerAddress::new(2);
        let a = per.take(ip("127.0.0.1"));
        let b = per.take(ip("127.0.0.1"));
        assert!(a.is_some() && b.is_some());
        assert!(per.take(ip("127.0.0.1")).is_none());
        assert!(per.take(ip("127.0.0.2")).is_some());
        drop(a);
        assert_eq!(per.held(ip("127.0.0.1")), 1);
        assert!(per.take(ip("127.0.0.1")).is_some());
    }

    #[test]
    fn ipv6_counts_by_64_network() {
        let per = PerAddress::new(1);
        let _a = per.take(ip("2001:db8:1:2::1"));
        assert!(per.take(ip("2001:db8:1:2::ffff")).is_none());
        assert!(per.take(ip("2001:db8:1:3::1")).is_some());
        let _m = per.take(ip("::ffff:10.1.2.3"));
        assert!(per.take(ip("10.1.2.3")).is_none());
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn forwarding_headers_are_believed_from_trusted_proxies_only() {
        let trusted = TrustedProxies(vec!["10.0.0.0/8".parse().expect("net")]);
        let h = headers(&[("x-forwarded-for", "203.0.113.9, 198.51.100.7, 10.1.1.1")]);
        assert_eq!(trusted.client(ip("10.0.0.1"), &h), Some(ip("198.51.100.7")));
        assert_eq!(trusted.client(ip("192.0.2.5"), &h), Some(ip("192.0.2.5")));
        let h = headers(&[(
            "forwarded",
            "for=192.0.2.60;proto=http, for=\"[2001:db8::1]:4711\"",
        )]);
        assert_eq!(trusted.client(ip("10.0.0.1"), &h), Some(ip("2001:db8::1")));
        assert_eq!(trusted.client(ip("10.0.0.1"), &headers(&[])), None);
        let h = headers(&[("x-forwarded-for", "garbage")]);
        assert_eq!(trusted.client(ip("10.0.0.1"), &h), None);
    }
}
