//! Open WebSocket connections on this node, counted by tenant, by user and in all, each count
//! capped.
//!
//! The connect rate limits bound how fast connections open, not how many stay open: without a
//! cap, one token opening connections at its allowed rate and never closing them would grow the
//! node's memory for as long as it kept going. A connection takes a [`Slot`] once its token is
//! known and gives it back when it ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

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
        let Caps {
            per_user,
            per_tenant,
            node,
        } = caps;
        let mut counts = self.counts();
        let key = (tenant.to_owned(), user.to_owned());
        let users = counts.users.get(&key).copied().unwrap_or(0);
        if per_user > 0 && users >= per_user {
            return Err(Refused::User(users));
        }
        let tenants = counts.tenants.get(tenant).copied().unwrap_or(0);
        if per_tenant > 0 && tenants >= per_tenant {
            return Err(Refused::Tenant(tenants));
        }
        if node > 0 && counts.total >= node {
            return Err(Refused::Node(counts.total));
        }
        *counts.users.entry(key.clone()).or_default() += 1;
        *counts.tenants.entry(key.0.clone()).or_default() += 1;
        counts.total += 1;
        Ok(Slot {
            conns: self.clone(),
            key,
        })
    }

    /// Connections open now.
    pub fn open_now(&self) -> usize {
        self.counts().total
    }

    /// `Err` when the node holds `node` connections or more (`0`: no cap).
    pub fn room(&self, node: usize) -> Result<(), Refused> {
        match self.open_now() {
            open if node > 0 && open >= node => Err(Refused::Node(open)),
            _ => Ok(()),
        }
    }
}

/// One open connection's place in the counts; dropping it gives the place back.
#[derive(Debug)]
pub struct Slot {
    conns: Connections,
    key: (String, String),
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.conns.counts();
        counts.total -= 1;
        let Counts { tenants, users, .. } = &mut *counts;
        for n in [users.get_mut(&self.key), tenants.get_mut(&self.key.0)]
            .into_iter()
            .flatten()
        {
            *n -= 1;
        }
        if users.get(&self.key) == Some(&0) {
            users.remove(&self.key);
        }
        if tenants.get(&self.key.0) == Some(&0) {
            tenants.remove(&self.key.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(conns.room(4), Err(Refused::Node(4)));
        assert!(conns.room(5).is_ok() && conns.room(0).is_ok());
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
