//! Which client a request comes from, for the per-address rate limits of registrations and
//! logins.
//!
//! The address is the TCP peer's ([`PeerAddr`], set by [`crate::server::serve`]), unless the
//! API runs behind proxies: with `rate.trusted_proxy_hops = N`, the last `N` hops (the peer and
//! the `N - 1` last entries of `X-Forwarded-For`) are taken to be proxies, and the client is the
//! entry before them. Entries further left are whatever the client sent, so they are never
//! believed. An IPv6 client is counted by its /64, as one host usually holds a whole /64, and
//! also by its /48 with [`BLOCK_FACTOR`] times the budget, as anyone can get a /48 (a free
//! tunnel gives one) and spread over its 65,536 /64s.

use std::net::IpAddr;

use axum::http::HeaderMap;

/// The TCP peer of a request's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub IpAddr);

/// How many times an address's budget an IPv6 /48 gets in all.
pub const BLOCK_FACTOR: usize = 8;

/// A request's client, as the per-address limits count it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The address (`"1.2.3.4"`, `"2001:db8:1:2::/64"`).
    pub addr: String,
    /// For IPv6, the /48 the address lies in (`"2001:db8:1::/48"`), which has
    /// [`BLOCK_FACTOR`] times the address's budget.
    pub block: Option<String>,
}

impl Client {
    /// The keys to count the client under, each with the multiple of the per-address budget
    /// it gets: `("a:" + addr, 1)`, and for IPv6 `("b:" + block, BLOCK_FACTOR)`.
    pub fn keys(&self) -> impl Iterator<Item = (String, usize)> + '_ {
        std::iter::once((format!("a:{}", self.addr), 1))
            .chain(self.block.iter().map(|b| (format!("b:{b}"), BLOCK_FACTOR)))
    }
}

/// The client a request is counted as, or `None` when the request has no peer address (a
/// request not served by [`crate::server::serve`]: then no per-address limit applies).
///
/// With `hops` above 0 the client is the `X-Forwarded-For` entry `hops` from the right, the
/// peer counted as the rightmost; a header with fewer entries (a client that reached the API past
/// its proxies) gives its leftmost entry, and an entry that is not an address gives the peer.
pub fn client_key(peer: Option<PeerAddr>, headers: &HeaderMap, hops: u32) -> Option<Client> {
    let peer = peer?.0;
    // By bytes: an entry a client wrote with non-ASCII bytes spoils only itself, not the
    // entries a proxy appended to the same line.
    let chain: Vec<&[u8]> = headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|s| !s.is_empty())
        .collect();
    let hops = usize::try_from(hops).unwrap_or(usize::MAX);
    let client = if hops == 0 {
        peer
    } else {
        // The chain without the peer: the peer itself is hop 1.
        let from_right = hops - 1;
        let at = chain.len().saturating_sub(from_right + 1);
        chain
            .get(at)
            .and_then(|entry| std::str::from_utf8(entry).ok())
            .and_then(parse)
            .unwrap_or(peer)
    };
    Some(client_of_ip(client))
}

/// [`client_key`] of a request to this node: its peer, its headers and the node's
/// `rate.trusted_proxy_hops` (0 without a limiter).
pub fn client_of(
    state: &crate::AppState,
    peer: Option<PeerAddr>,
    headers: &HeaderMap,
) -> Option<Client> {
    let hops = state.limiter.as_ref().map_or(0, |l| l.trusted_proxy_hops());
    client_key(peer, headers, hops)
}

/// An `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse() {
        return Some(ip);
    }
    if let Ok(socket) = entry.parse::<std::net::SocketAddr>() {
        return Some(socket.ip());
    }
    None
}

/// The client at `ip`: IPv4 (or IPv4-mapped IPv6) as is, IPv6 by its /64 in its /48.
fn client_of_ip(ip: IpAddr) -> Client {
    let v6 = match ip {
        IpAddr::V4(_) => None,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => return client_of_ip(IpAddr::V4(v4)),
            None => Some(v6),
        },
    };
    match v6 {
        None => Client {
            addr: ip.to_string(),
            block: None,
        },
        Some(v6) => {
            let s = v6.segments();
            let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
            let block = std::net::Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0);
            Client {
                addr: format!("{net}/64"),
                block: Some(format!("{block}/48")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn peer(ip: &str) -> Option<PeerAddr> {
        Some(PeerAddr(ip.parse().unwrap()))
    }

    #[test]
    fn without_proxies_the_peer_is_the_client_whatever_the_header_says() {
        let h = headers(&["9.9.9.9"]);
        assert_eq!(
            client_key(peer("10.0.0.1"), &h, 0)
                .map(|c| c.addr)
                .as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(client_key(None, &h, 0), None);
    }

    #[test]
    fn behind_proxies_the_entry_before_them_is_the_client() {
        // The client forged the first entry; the load balancer appended the real address.
        let h = headers(&["6.6.6.6, 203.0.113.7"]);
        assert_eq!(
            client_key(peer("10.0.0.1"), &h, 1)
                .map(|c| c.addr)
                .as_deref(),
            Some("203.0.113.7")
        );
        // Two proxies: the second appended the first's address.
        let h = headers(&["6.6.6.6, 203.0.113.7", "10.0.0.9"]);
        assert_eq!(
            client_key(peer("10.0.0.1"), &h, 2)
                .map(|c| c.addr)
                .as_deref(),
            Some("203.0.113.7")
        );
        // Fewer entries than hops: the leftmost; none at all, or junk: the peer.
        assert_eq!(
            client_key(peer("10.0.0.1"), &h, 9)
                .map(|c| c.addr)
                .as_deref(),
            Some("6.6.6.6")
        );
        assert_eq!(
            client_key(peer("10.0.0.1"), &HeaderMap::new(), 1)
                .map(|c| c.addr)
                .as_deref(),
            Some("10.0.0.1")
        );
        // A non-ASCII entry the client wrote spoils only itself.
        let mut mixed = HeaderMap::new();
        mixed.append(
            "x-forwarded-for",
            axum::http::HeaderValue::from_bytes(b"\xff\xfe, 203.0.113.8").unwrap(),
        );
        assert_eq!(
            client_key(peer("10.0.0.1"), &mixed, 1)
                .map(|c| c.addr)
                .as_deref(),
            Some("203.0.113.8")
        );
        let junk = headers(&["unknown"]);
        assert_eq!(
            client_key(peer("10.0.0.1"), &junk, 1)
                .map(|c| c.addr)
                .as_deref(),
            Some("10.0.0.1")
        );
        let ported = headers(&["[2001:db8::1]:443, 198.51.100.2:80"]);
        assert_eq!(
            client_key(peer("10.0.0.1"), &ported, 1)
                .map(|c| c.addr)
                .as_deref(),
            Some("198.51.100.2")
        );
        assert_eq!(
            client_key(peer("10.0.0.1"), &ported, 2)
                .map(|c| c.addr)
                .as_deref(),
            Some("2001:db8::/64")
        );
    }

    #[test]
    fn ipv6_clients_count_by_their_64_within_their_48_and_mapped_ipv4_as_ipv4() {
        let none = HeaderMap::new();
        let a = client_key(peer("2001:db8:1:2:aaaa::1"), &none, 0).unwrap();
        let b = client_key(peer("2001:db8:1:2:bbbb::9"), &none, 0).unwrap();
        assert_eq!(a.addr, "2001:db8:1:2::/64");
        assert_eq!(a, b);
        // Another /64 of the same /48: another address, the same block.
        let c = client_key(peer("2001:db8:1:3::1"), &none, 0).unwrap();
        assert_ne!(a, c);
        assert_eq!(c.block.as_deref(), Some("2001:db8:1::/48"));
        assert_eq!(a.block, c.block);
        let keys: Vec<_> = c.keys().collect();
        assert_eq!(
            keys,
            [
                ("a:2001:db8:1:3::/64".to_string(), 1),
                ("b:2001:db8:1::/48".to_string(), BLOCK_FACTOR)
            ]
        );
        let v4 = client_key(peer("192.0.2.1"), &none, 0).unwrap();
        assert_eq!(
            v4.keys().collect::<Vec<_>>(),
            [("a:192.0.2.1".to_string(), 1)]
        );
        let mapped = client_key(peer("::ffff:192.0.2.1"), &none, 0).unwrap();
        assert_eq!(mapped, v4);
    }
}
