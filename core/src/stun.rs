//! A sans-IO STUN binding client (RFC 8489): learns each local socket's server-reflexive
//! address from STUN servers, so calls can offer `srflx` candidates.
//!
//! Requests go out from each local address to each server, retransmitted at 500 ms, 1 s,
//! 2 s; answers are matched by transaction id and source, anything else is not ours.

use std::net::SocketAddr;
use std::time::Instant;

use tracing::{debug, info};

use crate::limits::stun::{FIRST_RTO, MAX_PROBES, RETRIES};
use crate::rng::Rng;
use crate::turn::msg::{self, Builder, Class, Message};
use crate::types::Transmit;

#[derive(Debug)]
struct Probe {
    local: SocketAddr,
    server: SocketAddr,
    txn: [u8; 12],
    sent: u32,
    next_at: Option<Instant>,
}

/// A server-reflexive address of a local socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reflexive {
    pub local: SocketAddr,
    pub mapped: SocketAddr,
}

#[derive(Debug, Default)]
pub(crate) struct StunClient {
    probes: Vec<Probe>,
    found: Vec<Reflexive>,
}

fn binding_request(txn: &[u8; 12]) -> Vec<u8> {
    Builder::new(msg::BINDING, Class::Request, *txn).build()
}

/// The mapped address of a binding success answer for `txn`; `None` for anything else.
pub(crate) fn parse_binding_success(data: &[u8], txn: &[u8; 12]) -> Option<SocketAddr> {
    let m = Message::parse(data).ok()?;
    if m.method != msg::BINDING || m.class != Class::Success || m.txn != *txn {
        return None;
    }
    m.mapped_addr()
}

impl StunClient {
    /// Probes `server` from every local address of the same IP family.
    pub fn add_server(
        &mut self,
        server: SocketAddr,
        locals: &[SocketAddr],
        now: Instant,
        rng: &mut Rng,
    ) {
        for local in locals.iter().filter(|l| l.is_ipv4() == server.is_ipv4()) {
            if self
                .probes
                .iter()
                .any(|p| p.local == *local && p.server == server)
            {
                continue;
            }
            if self.probes.len() >= MAX_PROBES {
                debug!("STUN probe limit reached");
                return;
            }
            let mut txn = [0u8; 12];
            for chunk in txn.chunks_mut(8) {
                let r = rng.u64().to_le_bytes();
                chunk.copy_from_slice(r.get(..chunk.len()).unwrap_or_default());
            }
            self.probes.push(Probe {
                local: *local,
                server,
                txn,
                sent: 0,
                next_at: Some(now),
            });
        }
    }

    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        let p = self
            .probes
            .iter_mut()
            .find(|p| p.next_at.is_some_and(|t| t <= now))?;
        p.sent += 1;
        p.next_at = (p.sent <= RETRIES).then(|| now + FIRST_RTO * (1 << (p.sent - 1)));
        debug!(server = %p.server, attempt = p.sent, "STUN binding request");
        Some(Transmit {
            source: p.local,
            destination: p.server,
            contents: binding_request(&p.txn),
        })
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.probes.iter().filter_map(|p| p.next_at).min()
    }

    /// Takes a datagram if it answers one of our requests; a new reflexive address is returned.
    pub fn handle_receive(
        &mut self,
        source: SocketAddr,
        destination: SocketAddr,
        data: &[u8],
    ) -> Option<Option<Reflexive>> {
        let i = self.probes.iter().position(|p| {
            p.server == source
                && p.local == destination
                && parse_binding_success(data, &p.txn).is_some()
        })?;
        let probe = self.probes.swap_remove(i);
        let mapped = parse_binding_success(data, &probe.txn)?;
        let r = Reflexive {
            local: probe.local,
            mapped,
        };
        if self.found.contains(&r) {
            return Some(None);
        }
        info!(local = %r.local, "STUN: server-reflexive address learned");
        debug!(mapped = %r.mapped, server = %probe.server, "STUN mapping");
        self.found.push(r);
        Some(Some(r))
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a real Instant as the tests' time base
mod tests {
    use super::*;
    use crate::turn::msg::{ATTR_XOR_MAPPED_ADDRESS, MAGIC_COOKIE};
    use std::net::IpAddr;

    const BINDING_SUCCESS: u16 = 0x0101;

    fn success(txn: &[u8; 12], mapped: SocketAddr) -> Vec<u8> {
        let mut attr = vec![0, 0];
        let port = mapped.port() ^ (MAGIC_COOKIE >> 16) as u16;
        match mapped.ip() {
            IpAddr::V4(v4) => {
                attr[1] = 1;
                attr.extend_from_slice(&port.to_be_bytes());
                for (b, c) in v4.octets().iter().zip(MAGIC_COOKIE.to_be_bytes()) {
                    attr.push(b ^ c);
                }
            }
            IpAddr::V6(v6) => {
                attr[1] = 2;
                attr.extend_from_slice(&port.to_be_bytes());
                let key: Vec<u8> = MAGIC_COOKIE
                    .to_be_bytes()
                    .iter()
                    .chain(txn)
                    .copied()
                    .collect();
                for (b, k) in v6.octets().iter().zip(key) {
                    attr.push(b ^ k);
                }
            }
        }
        let mut m = BINDING_SUCCESS.to_be_bytes().to_vec();
        m.extend_from_slice(&((4 + attr.len()) as u16).to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        m.extend_from_slice(txn);
        m.extend_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
        m.extend_from_slice(&(attr.len() as u16).to_be_bytes());
        m.extend_from_slice(&attr);
        m
    }

    #[test]
    fn binding_learns_the_mapped_address_and_retransmits_until_then() {
        let t0 = Instant::now();
        let mut rng = Rng::new(1);
        let mut c = StunClient::default();
        let local: SocketAddr = "192.0.2.10:5000".parse().unwrap();
        let server: SocketAddr = "198.51.100.1:3478".parse().unwrap();
        c.add_server(
            server,
            &[local, "[2001:db8::1]:5000".parse().unwrap()],
            t0,
            &mut rng,
        );
        let req = c.poll_transmit(t0).unwrap();
        assert_eq!((req.source, req.destination), (local, server));
        assert_eq!(req.contents.len(), 20);
        assert!(
            c.poll_transmit(t0).is_none(),
            "one request per probe at a time"
        );
        assert_eq!(c.poll_timeout(), Some(t0 + FIRST_RTO));
        assert!(c.poll_transmit(t0 + FIRST_RTO).is_some(), "retransmitted");

        let txn: [u8; 12] = req.contents[8..20].try_into().unwrap();
        let mapped: SocketAddr = "203.0.113.7:61000".parse().unwrap();
        assert_eq!(c.handle_receive(server, local, b"not stun"), None);
        assert_eq!(
            c.handle_receive(
                "198.51.100.2:3478".parse().unwrap(),
                local,
                &success(&txn, mapped)
            ),
            None
        );
        let r = c
            .handle_receive(server, local, &success(&txn, mapped))
            .unwrap()
            .unwrap();
        assert_eq!(r.mapped, mapped);
        assert_eq!(c.found, vec![r]);
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn ipv6_and_garbage_answers() {
        let txn = [7u8; 12];
        let mapped: SocketAddr = "[2001:db8::42]:4000".parse().unwrap();
        assert_eq!(
            parse_binding_success(&success(&txn, mapped), &txn),
            Some(mapped)
        );
        assert_eq!(
            parse_binding_success(&success(&txn, mapped), &[8u8; 12]),
            None
        );
        for n in 0..40 {
            let mut bad = success(&txn, mapped);
            bad.truncate(n);
            let _ = parse_binding_success(&bad, &txn);
        }
        let mut huge_len = success(&txn, mapped);
        huge_len[2] = 0xff;
        assert_eq!(parse_binding_success(&huge_len, &txn), None);
    }

    #[test]
    fn gives_up_after_the_retries() {
        let t0 = Instant::now();
        let mut c = StunClient::default();
        c.add_server(
            "198.51.100.1:3478".parse().unwrap(),
            &["192.0.2.10:5000".parse().unwrap()],
            t0,
            &mut Rng::new(2),
        );
        let mut sent = 0;
        let mut now = t0;
        while let Some(at) = c.poll_timeout() {
            now = now.max(at);
            while c.poll_transmit(now).is_some() {
                sent += 1;
            }
        }
        assert_eq!(sent, 1 + RETRIES);
    }
}
