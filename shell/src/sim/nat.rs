//! NAT models for simulated hosts (RFC 4787 terms): how a private endpoint is mapped to a
//! public one, and which inbound datagrams the mapping lets through.
//!
//! | kind | mapping | filtering |
//! |---|---|---|
//! | `FullCone` | endpoint-independent | none: anyone may send to the mapping |
//! | `AddressRestricted` | endpoint-independent | only from IPs the host sent to |
//! | `PortRestricted` | endpoint-independent | only from IP:port the host sent to |
//! | `Symmetric` | one mapping per destination | only from that destination |
//!
//! Mappings never expire within a simulation (real NATs keep UDP mappings for 30 s to
//! minutes; ICE consent checks refresh them every few seconds).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    FullCone,
    AddressRestricted,
    PortRestricted,
    Symmetric,
}

#[derive(Debug)]
pub struct Nat {
    pub kind: NatKind,
    pub public_ip: IpAddr,
    next_port: u16,
    /// (private, destination or None for endpoint-independent) -> public port.
    out: BTreeMap<(SocketAddr, Option<SocketAddr>), u16>,
    /// public port -> (private, destination for symmetric).
    back: BTreeMap<u16, (SocketAddr, Option<SocketAddr>)>,
    /// Where each private endpoint has sent (for filtering).
    sent_to: BTreeMap<SocketAddr, BTreeSet<SocketAddr>>,
}

impl Nat {
    pub fn new(kind: NatKind, public_ip: IpAddr) -> Self {
        Nat {
            kind,
            public_ip,
            next_port: 40000,
            out: BTreeMap::new(),
            back: BTreeMap::new(),
            sent_to: BTreeMap::new(),
        }
    }

    /// The public source of a datagram from `private` to `destination`.
    pub fn outbound(&mut self, private: SocketAddr, destination: SocketAddr) -> SocketAddr {
        let key = match self.kind {
            NatKind::Symmetric => (private, Some(destination)),
            _ => (private, None),
        };
        let port = match self.out.get(&key) {
            Some(p) => *p,
            None => {
                let p = self.next_port;
                self.next_port = self.next_port.wrapping_add(1).max(40000);
                self.out.insert(key, p);
                self.back.insert(p, key);
                p
            }
        };
        self.sent_to.entry(private).or_default().insert(destination);
        SocketAddr::new(self.public_ip, port)
    }

    /// The private destination of a datagram from `source` to our public `port`, if the NAT
    /// lets it in.
    pub fn inbound(&self, source: SocketAddr, port: u16) -> Option<SocketAddr> {
        let (private, dest) = *self.back.get(&port)?;
        let sent = self.sent_to.get(&private);
        let ok = match self.kind {
            NatKind::FullCone => true,
            NatKind::AddressRestricted => {
                sent.is_some_and(|s| s.iter().any(|d| d.ip() == source.ip()))
            }
            NatKind::PortRestricted => sent.is_some_and(|s| s.contains(&source)),
            NatKind::Symmetric => dest == Some(source),
        };
        ok.then_some(private)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn mapping_and_filtering_per_kind() {
        let host = a("10.0.0.2:5000");
        let (x, x2, y) = (
            a("198.51.100.1:3478"),
            a("198.51.100.1:9999"),
            a("203.0.113.5:7000"),
        );
        for kind in [
            NatKind::FullCone,
            NatKind::AddressRestricted,
            NatKind::PortRestricted,
            NatKind::Symmetric,
        ] {
            let mut nat = Nat::new(kind, "192.0.2.200".parse().unwrap());
            let px = nat.outbound(host, x);
            let py_would_be = nat.outbound(host, x).port();
            assert_eq!(
                px.port(),
                py_would_be,
                "one mapping per destination at least"
            );
            assert_eq!(
                nat.inbound(x, px.port()),
                Some(host),
                "{kind:?}: the answer gets in"
            );
            let from_other_port = nat.inbound(x2, px.port()).is_some();
            let from_stranger = nat.inbound(y, px.port()).is_some();
            match kind {
                NatKind::FullCone => assert!(from_other_port && from_stranger),
                NatKind::AddressRestricted => assert!(from_other_port && !from_stranger),
                NatKind::PortRestricted | NatKind::Symmetric => {
                    assert!(!from_other_port && !from_stranger)
                }
            }
            let py = nat.outbound(host, y);
            assert_eq!(
                py.port() != px.port(),
                kind == NatKind::Symmetric,
                "{kind:?}"
            );
        }
    }
}
