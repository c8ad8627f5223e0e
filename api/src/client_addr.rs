//! Which client a request comes from, for the per-address rate limits of registrations and
//! logins.
//!
//! The address is the TCP peer's ([`PeerAddr`], set by [`crate::server::serve`]), unless the
//! API runs behind proxies: with `rate.trusted_proxy_hops = N`, the last `N` hops (the peer and
//! the `N - 1` last entries of `X-Forwarded-For`) are taken to be proxies, and the client is the
//! entry before them. Entries further left are whatever the client sent, so they are never
//! believed. IPv6 clients are counted by their /64, as one host usually holds a whole /64.

use std::net::IpAddr;

use axum::http::HeaderMap;

/// The TCP peer of a request's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub IpAddr);

/// The key a request's client is counted under (`"1.2.3.4"`, `"2001:db8:1:2::/64"`), or `None`
/// when the request has no peer address (a request not served by [`crate::server::serve`], as
/// in unit tests).
///
/// With `hops` above 0 the client is the `X-Forwarded-For` entry `hops` from the right, the
/// peer counted as the rightmost; a header with fewer entries (a client that reached the API past
/// its proxies) gives its leftmost entry, and an entry that is not an address gives the peer.
pub fn client_key(peer: Option<PeerAddr>, headers: &HeaderMap, hops: u32) -> Option<String> {
    let peer = peer?.0;
    let mut chain: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let hops = usize::try_from(hops).unwrap_or(usize::MAX);
    let client = if hops == 0 {
        peer
    } else {
        // The chain without the peer: the peer itself is hop 1.
        let from_right = hops - 1;
        let at = chain.len().saturating_sub(from_right + 1);
        chain.drain(..).nth(at).and_then(parse).unwrap_or(peer)
    };
    Some(key_of(client))
}

/// [`client_key`] of a request to this node: its peer, its headers and the node's
/// `rate.trusted_proxy_hops` (0 without a limiter).
pub fn client_of(
    state: &crate::AppState,
    peer: Option<PeerAddr>,
    headers: &HeaderMap,
) -> Option<String> {
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

/// The counting key of `ip`: IPv4 (or IPv4-mapped IPv6) as is, IPv6 by its /64.
fn key_of(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("{net}/64")
            }
        },
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
            client_key(peer("10.0.0.1"), &h, 0).as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(client_key(None, &h, 0), None);
    }

    #[test]
    fn behind_proxies_the_entry_before_them_is_the_client() {
        // The client forged the first entry; the load balancer appended the real address.
        let h = headers(&["6.6.6.6, 203.0.113.7"]);
        assert_eq!(
            client_key(peer("10.0.0.1"), &h, 1).as_deref(),
            Some("203.0.113.7")
        );
        // Two proxies: the second appended the first's address.
        let h = headers(&["6.6.6.6, 203.0.113.7", "10.0.0.9"]);
        assert_eq!(
            client_key(peer("10.0.0.1"), &h, 2).as_deref(),
            Some("203.0.113.7")
        );
        // Fewer entries than hops: the leftmost; none at all, or junk: the peer.
        assert_eq!(
            client_key(peer("10.0.0.1"), &h, 9).as_deref(),
            Some("6.6.6.6")
        );
        assert_eq!(
            client_key(peer("10.0.0.1"), &HeaderMap::new(), 1).as_deref(),
            Some("10.0.0.1")
        );
        let junk = headers(&["unknown"]);
        assert_eq!(
            client_key(peer("10.0.0.1"), &junk, 1).as_deref(),
            Some("10.0.0.1")
        );
        let ported = headers(&["[2001:db8::1]:443, 198.51.100.2:80"]);
        assert_eq!(
            client_key(peer("10.0.0.1"), &ported, 1).as_deref(),
            Some("198.51.100.2")
        );
        assert_eq!(
            client_key(peer("10.0.0.1"), &ported, 2).as_deref(),
            Some("2001:db8::/64")
        );
    }

    #[test]
    fn ipv6_clients_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let none = HeaderMap::new();
        let a = client_key(peer("2001:db8:1:2:aaaa::1"), &none, 0);
        let b = client_key(peer("2001:db8:1:2:bbbb::9"), &none, 0);
        assert_eq!(a.as_deref(), Some("2001:db8:1:2::/64"));
        assert_eq!(a, b);
        assert_ne!(a, client_key(peer("2001:db8:1:3::1"), &none, 0));
        assert_eq!(
            client_key(peer("::ffff:192.0.2.1"), &none, 0).as_deref(),
            Some("192.0.2.1")
        );
    }
}
