//! Open WebSocket connections on this node, counted by tenant, by user and in all, each count
//! capped.
//!
//! The connect rate limits bound how fast connections open, not how many stay open: without a
//! cap, one token opening connections at its allowed rate and never closing them would grow the
//! node's memory for as long as it kept going. A connection takes a [`Slot`] when it is upgraded
//! and gives it back when it ends; one that sends its token in a message holds a pending slot,
//! counted on the node only, until then.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::client_addr::Client;

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The user (the token's subject) has this many connections open here already.
    #[error("this user has {0} WebSocket connections open on this node, the most allowed (ws.max_connections_per_user); close one first")]
    User(usize),
    /// The tenant has this many connections open here already.
    #[error("this tenant has {0} WebSocket connections open on this node, the most allowed (ws.max_connections_per_tenant); close one first")]
    Tenant(usize),
    /// The node has this many connections open already.
    #[error("this node has {0} WebSocket connections open, the most it takes (ws.max_connections); try another node or later")]
    Node(usize),
    /// The node has this many connections waiting for their `auth` message already.
    #[error("this node has {0} WebSocket connections waiting for their auth message, the most it takes (ws.max_pending_connections); send the token in the Authorization header, or retry shortly")]
    Pending(usize),
    /// The client's address has this many connections waiting for their `auth` message here.
    #[error("this address has {0} WebSocket connections waiting for their auth message on this node, the most allowed (ws.max_pending_per_address); send their auth messages first, or the token in the Authorization header")]
    PendingAddress(usize),
}

/// The caps of [`Connections::open`]; `0` is no cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Per user (a token's subject).
    pub per_user: usize,
    /// Per tenant.
    pub per_tenant: usize,
    /// On the whole node.
    pub node: usize,
}

#[derive(Debug, Default)]
struct Counts {
    tenants: HashMap<String, usize>,
    users: HashMap<(String, String), usize>,
    total: usize,
    /// Of `total`, those not authenticated yet.
    pending: usize,
    /// Of `pending`, those by client key ([`Client::keys`]; only those whose address is known).
    pending_by_address: HashMap<String, usize>,
}

impl Counts {
    /// `Err` when the user (`key.1`) or its tenant (`key.0`) is at its cap (`0`: none).
    fn check_user(&self, key: &(String, String), caps: Caps) -> Result<(), Refused> {
        let users = self.users.get(key).copied().unwrap_or(0);
        if caps.per_user > 0 && users >= caps.per_user {
            return Err(Refused::User(users));
        }
        let tenants = self.tenants.get(&key.0).copied().unwrap_or(0);
        if caps.per_tenant > 0 && tenants >= caps.per_tenant {
            return Err(Refused::Tenant(tenants));
        }
        Ok(())
    }

    /// Counts one more connection of the user and of its tenant.
    fn add_user(&mut self, key: &(String, String)) {
        *self.users.entry(key.clone()).or_default() += 1;
        *self.tenants.entry(key.0.clone()).or_default() += 1;
    }

    /// Counts one pending connection less, of the client keys `keys`.
    fn remove_pending(&mut self, keys: &[String]) {
        self.pending -= 1;
        for k in keys {
            if let Some(n) = self.pending_by_address.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.pending_by_address.remove(k);
                }
            }
        }
    }
}

/// The caps of [`Connections::pending`]; `0` is no cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingCaps {
    /// Connections on the whole node.
    pub node: usize,
    /// Of those, waiting for their `auth` message.
    pub pending: usize,
    /// Of those, from one client address.
    pub per_address: usize,
}

/// The node's open connections (clone to share).
#[derive(Debug, Clone, Default)]
pub struct Connections(Arc<Mutex<Counts>>);

impl Connections {
    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot for a connection of `user` of `tenant`, unless the user, the tenant or the
    /// node already has its most (checked in that order: what the client itself can fix first).
    pub fn open(&self, tenant: &str, user: &str, caps: Caps) -> Result<Slot, Refused> {
        let mut counts = self.counts();
        let key = (tenant.to_owned(), user.to_owned());
        counts.check_user(&key, caps)?;
        if caps.node > 0 && counts.total >= caps.node {
            return Err(Refused::Node(counts.total));
        }
        counts.add_user(&key);
        counts.total += 1;
        Ok(Slot {
            conns: self.clone(),
            key: Some(key),
            address: Vec::new(),
        })
    }

    /// Takes a place on the node for a connection whose token is not known yet, from the
    /// client `address` (`None`: not known), unless that address, the node's pending
    /// connections or the node is at its cap (checked in that order);
    /// [`Slot::promote`] makes it its user's once it is. Anyone can open such a connection, so
    /// their own caps keep them from taking every place from those that authenticate, and one
    /// client from taking every pending place from the others.
    pub fn pending(&self, caps: PendingCaps, client: Option<&Client>) -> Result<Slot, Refused> {
        let mut counts = self.counts();
        let keys: Vec<(String, usize)> = client.map(|c| c.keys().collect()).unwrap_or_default();
        for (key, factor) in &keys {
            let held = counts.pending_by_address.get(key).copied().unwrap_or(0);
            if caps.per_address > 0 && held >= caps.per_address.saturating_mul(*factor) {
                return Err(Refused::PendingAddress(held));
            }
        }
        if caps.node > 0 && counts.total >= caps.node {
            return Err(Refused::Node(counts.total));
        }
        if caps.pending > 0 && counts.pending >= caps.pending {
            return Err(Refused::Pending(counts.pending));
        }
        counts.total += 1;
        counts.pending += 1;
        for (key, _) in &keys {
            *counts.pending_by_address.entry(key.clone()).or_default() += 1;
        }
        Ok(Slot {
            conns: self.clone(),
            key: None,
            address: keys.into_iter().map(|(key, _)| key).collect(),
        })
    }

    /// Connections open now (pending ones included).
    pub fn open_now(&self) -> usize {
        self.counts().total
    }
}

/// One open connection's place in the counts; dropping it gives the place back.
#[derive(Debug)]
pub struct Slot {
    conns: Connections,
    /// Tenant and user; `None` while the connection has not authenticated.
    key: Option<(String, String)>,
    /// The client keys a pending connection is counted under, while it is pending.
    address: Vec<String>,
}

impl Slot {
    /// Counts this pending slot as a connection of `user` of `tenant`, unless the user or the
    /// tenant already has its most; it keeps its place on the node either way (a refused one
    /// stays pending until dropped). A slot that is someone's already stays theirs.
    pub fn promote(&mut self, tenant: &str, user: &str, caps: Caps) -> Result<(), Refused> {
        if self.key.is_some() {
            return Ok(());
        }
        let mut counts = self.conns.counts();
        let key = (tenant.to_owned(), user.to_owned());
        counts.check_user(&key, caps)?;
        counts.add_user(&key);
        let address = std::mem::take(&mut self.address);
        counts.remove_pending(&address);
        drop(counts);
        self.key = Some(key);
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.conns.counts();
        counts.total -= 1;
        let Some(key) = &self.key else {
            counts.remove_pending(&self.address);
            return;
        };
        let Counts { tenants, users, .. } = &mut *counts;
        for n in [users.get_mut(key), tenants.get_mut(&key.0)]
            .into_iter()
            .flatten()
        {
            *n -= 1;
        }
        if users.get(key) == Some(&0) {
            users.remove(key);
        }
        if tenants.get(&key.0) == Some(&0) {
            tenants.remove(&key.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(ip: &str) -> Client {
        let peer = crate::client_addr::PeerAddr(ip.parse().unwrap());
        crate::client_addr::client_key(Some(peer), &axum::http::HeaderMap::new(), 0).unwrap()
    }

    fn pending_caps(node: usize, pending: usize, per_address: usize) -> PendingCaps {
        PendingCaps {
            node,
            pending,
            per_address,
        }
    }

    fn caps(per_user: usize, per_tenant: usize, node: usize) -> Caps {
        Caps {
            per_user,
            per_tenant,
            node,
        }
    }

    #[test]
    fn a_user_gets_at_most_its_cap_and_a_closed_connection_frees_its_place() {
        let conns = Connections::default();
        let two = caps(2, 0, 0);
        let a = conns.open("acme", "ann", two).expect("first");
        let _b = conns.open("acme", "ann", two).expect("second");
        assert_eq!(
            conns.open("acme", "ann", two).unwrap_err(),
            Refused::User(2)
        );
        // Another user, or the same name in another tenant, is counted apart.
        let _c = conns.open("acme", "bob", two).expect("bob");
        let _d = conns.open("other", "ann", two).expect("other tenant");
        drop(a);
        let _e = conns.open("acme", "ann", two).expect("a place was freed");
        assert_eq!(conns.open_now(), 4);
    }

    #[test]
    fn a_pending_connection_holds_a_place_on_the_node_and_keeps_it_when_promoted() {
        let conns = Connections::default();
        let caps = caps(1, 0, 3);
        let mut a = conns.pending(pending_caps(3, 0, 0), None).expect("room");
        let mut b = conns.pending(pending_caps(3, 0, 0), None).expect("room");
        let _c = conns.open("acme", "bob", caps).expect("room");
        // The node is full: no more pending ones, and no authenticated ones either.
        assert_eq!(
            conns.pending(pending_caps(3, 0, 0), None).unwrap_err(),
            Refused::Node(3)
        );
        assert_eq!(
            conns.open("acme", "cy", caps).unwrap_err(),
            Refused::Node(3)
        );
        // Promoted, a pending one keeps its place: the node still counts three.
        a.promote("acme", "ann", caps).expect("ann's first");
        assert_eq!(conns.open_now(), 3);
        // Its user's cap holds: refused, the other stays pending (and counted).
        assert_eq!(
            b.promote("acme", "ann", caps).unwrap_err(),
            Refused::User(1)
        );
        assert_eq!(conns.open_now(), 3);
        drop(b);
        assert_eq!(conns.open_now(), 2);
        drop(a);
        assert_eq!(conns.open_now(), 1);
        assert!(!conns
            .counts()
            .users
            .contains_key(&("acme".into(), "ann".into())));
    }

    #[test]
    fn pending_connections_have_a_cap_of_their_own() {
        let conns = Connections::default();
        let caps = caps(0, 0, 10);
        let mut a = conns.pending(pending_caps(10, 2, 0), None).expect("room");
        let _b = conns.pending(pending_caps(10, 2, 0), None).expect("room");
        assert_eq!(
            conns.pending(pending_caps(10, 2, 0), None).unwrap_err(),
            Refused::Pending(2)
        );
        // Those that authenticate are not held back by them...
        let _c = conns.open("acme", "cy", caps).expect("room");
        // ... and one that authenticates frees its pending place.
        a.promote("acme", "ann", caps).expect("promoted");
        let _d = conns
            .pending(pending_caps(10, 2, 0), None)
            .expect("a pending place was freed");
        assert_eq!(conns.counts().pending, 2);
        assert_eq!(conns.open_now(), 4);
        drop(a);
        let pending = conns.counts().pending;
        assert_eq!((pending, conns.open_now()), (2, 3));
    }

    #[test]
    fn one_address_gets_at_most_its_share_of_the_pending_places() {
        let conns = Connections::default();
        let two = pending_caps(0, 10, 2);
        let mut a = conns
            .pending(two, Some(&client("192.0.2.1")))
            .expect("room");
        let _b = conns
            .pending(two, Some(&client("192.0.2.1")))
            .expect("room");
        assert_eq!(
            conns.pending(two, Some(&client("192.0.2.1"))).unwrap_err(),
            Refused::PendingAddress(2)
        );
        // Another address, or one not known, is not held back.
        let _c = conns
            .pending(two, Some(&client("192.0.2.9")))
            .expect("other address");
        let _d = conns.pending(two, None).expect("no address");
        // One that authenticates, or closes, gives its address's place back.
        a.promote("acme", "ann", caps(0, 0, 0)).expect("promoted");
        let e = conns
            .pending(two, Some(&client("192.0.2.1")))
            .expect("a place was freed");
        assert_eq!(
            conns.pending(two, Some(&client("192.0.2.1"))).unwrap_err(),
            Refused::PendingAddress(2)
        );
        drop(e);
        drop(a);
        let _f = conns
            .pending(two, Some(&client("192.0.2.1")))
            .expect("a place was freed");
        assert_eq!(conns.counts().pending, 4);
        assert_eq!(
            conns.counts().pending_by_address.get("a:192.0.2.1"),
            Some(&2)
        );
        // The node-wide pending cap still holds across addresses.
        let full = pending_caps(0, 4, 2);
        assert_eq!(
            conns.pending(full, Some(&client("192.0.2.7"))).unwrap_err(),
            Refused::Pending(4)
        );
    }

    #[test]
    fn an_ipv6_block_gets_a_few_addresses_worth_of_pending_places_in_all() {
        let conns = Connections::default();
        let one = pending_caps(0, 0, 1);
        let block = crate::client_addr::BLOCK_FACTOR;
        // One per /64, across as many /64s of a /48 as its share allows.
        let held: Vec<_> = (0..block)
            .map(|i| {
                let addr = format!("2001:db8:7:{i:x}::1");
                conns
                    .pending(one, Some(&client(&addr)))
                    .expect("under the block's share")
            })
            .collect();
        assert_eq!(
            conns
                .pending(one, Some(&client("2001:db8:7:ff::1")))
                .unwrap_err(),
            Refused::PendingAddress(block)
        );
        let _other = conns
            .pending(one, Some(&client("2001:db8:8::1")))
            .expect("another /48");
        drop(held);
        let _again = conns
            .pending(one, Some(&client("2001:db8:7:ff::1")))
            .expect("the block's places were given back");
        // Each held connection counts under its /64 and its /48; nothing else is left.
        let counts = conns.counts();
        assert_eq!(
            counts.pending_by_address.len(),
            4,
            "{:?}",
            counts.pending_by_address
        );
    }

    #[test]
    fn a_tenant_gets_at_most_its_cap_across_its_users() {
        let conns = Connections::default();
        let three = caps(0, 3, 0);
        let slots: Vec<_> = (0..3)
            .map(|i| {
                conns
                    .open("acme", &format!("u{i}"), three)
                    .expect("under the cap")
            })
            .collect();
        assert_eq!(
            conns.open("acme", "u9", three).unwrap_err(),
            Refused::Tenant(3)
        );
        assert!(conns.open("other", "u9", three).is_ok());
        drop(slots);
        assert_eq!(conns.open_now(), 0);
        assert!(conns.counts().users.is_empty() && conns.counts().tenants.is_empty());
    }

    #[test]
    fn the_node_takes_at_most_its_cap_across_tenants() {
        let conns = Connections::default();
        let four = caps(0, 0, 4);
        let slots: Vec<_> = (0..4)
            .map(|i| {
                conns
                    .open(&format!("t{i}"), "u", four)
                    .expect("under the cap")
            })
            .collect();
        assert_eq!(conns.open("t9", "u", four).unwrap_err(), Refused::Node(4));
        // A user at its own cap is told that first: closing one of its own is what helps.
        let one_each = caps(1, 0, 4);
        assert_eq!(
            conns.open("t0", "u", one_each).unwrap_err(),
            Refused::User(1)
        );
        assert_eq!(
            conns.pending(pending_caps(4, 0, 0), None).unwrap_err(),
            Refused::Node(4)
        );
        assert!(
            conns.pending(pending_caps(5, 0, 0), None).is_ok()
                && conns.pending(pending_caps(0, 0, 0), None).is_ok()
        );
        drop(slots);
        assert!(conns.open("t9", "u", four).is_ok());
    }

    #[test]
    fn zero_means_no_cap() {
        let conns = Connections::default();
        let slots: Vec<_> = (0..1000)
            .map(|_| conns.open("acme", "ann", caps(0, 0, 0)).expect("uncapped"))
            .collect();
        assert_eq!(conns.open_now(), slots.len());
    }
}
