//! A sans-IO STUN binding client (RFC 8489): learns each local socket's server-reflexive
//! address from STUN servers, so calls can offer `srflx` candidates.
//!
//! Requests go out from each local address to each server, retransmitted at 500 ms, 1 s,
//! 2 s; answers are matched by transaction id and source, anything else is not ours.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use tracing::{debug, info};

use crate::rng::Rng;
use crate::types::Transmit;

const MAGIC_COOKIE: u32 = 0x2112_A442;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// Retransmissions after the first request.
const RETRIES: u32 = 3;
const FIRST_RTO: Duration = Duration::from_millis(500);
/// Most STUN servers × local addresses probed (more are ignored, logged).
const MAX_PROBES: usize = 16;

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
    let mut m = Vec::with_capacity(20);
    m.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    m.extend_from_slice(txn);
    m
}

/// The mapped address of a binding success answer for `txn`; `None` for anything else.
pub(crate) fn parse_binding_success(data: &[u8], txn: &[u8; 12]) -> Option<SocketAddr> {
    let header = data.get(..20)?;
    let msg_type = u16::from_be_bytes([*header.first()?, *header.get(1)?]);
    let len = usize::from(u16::from_be_bytes([*header.get(2)?, *header.get(3)?]));
    if msg_type != BINDING_SUCCESS
        || header.get(4..8)? != MAGIC_COOKIE.to_be_bytes()
        || header.get(8..20)? != txn
    {
        return None;
    }
    let body = data.get(20..20 + len)?;
    let mut at = 0;
    let mut plain = None;
    while let Some(h) = body.get(at..at + 4) {
        let t = u16::from_be_bytes([*h.first()?, *h.get(1)?]);
        let l = usize::from(u16::from_be_bytes([*h.get(2)?, *h.get(3)?]));
        let v = body.get(at + 4..at + 4 + l)?;
        match t {
            ATTR_XOR_MAPPED_ADDRESS => return address(v, Some(txn)),
            ATTR_MAPPED_ADDRESS => plain = address(v, None),
            _ => {}
        }
        at += 4 + l.div_ceil(4) * 4;
    }
    plain
}

fn address(v: &[u8], xor_txn: Option<&[u8; 12]>) -> Option<SocketAddr> {
    let family = *v.get(1)?;
    let mut port = u16::from_be_bytes([*v.get(2)?, *v.get(3)?]);
    let cookie = MAGIC_COOKIE.to_be_bytes();
    if xor_txn.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let ip = match family {
        0x01 => {
            let mut b: [u8; 4] = v.get(4..8)?.try_into().ok()?;
            if xor_txn.is_some() {
                for (x, c) in b.iter_mut().zip(cookie) {
                    *x ^= c;
                }
            }
            IpAddr::V4(Ipv4Addr::from(b))
        }
        0x02 => {
            let mut b: [u8; 16] = v.get(4..20)?.try_into().ok()?;
            if let Some(txn) = xor_txn {
                let key = cookie.iter().chain(txn.iter());
                for (x, k) in b.iter_mut().zip(key) {
                    *x ^= k;
                }
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
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
