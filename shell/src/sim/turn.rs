//! A simulated TURN server (RFC 8656 over UDP) that behaves like coturn with
//! `use-auth-secret`: REST credentials (`username = "<expiry unix s>:<user>"`, password =
//! base64(HMAC-SHA1(secret, username))), the expiry checked when an allocation is made, the
//! username tied to the allocation (441 for another one), 300 s permissions, channels.
//!
//! It owns a range of relayed ports on its own IP. The world hands it every datagram for that
//! IP and sends what it returns.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use base64::prelude::{Engine as _, BASE64_STANDARD};
use call_assist_core::turn::msg::{self, Builder, Class, Message};

pub const REALM: &str = "sim.local";
const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
const MAX_LIFETIME: u32 = 3600;
const DEFAULT_LIFETIME: u32 = 600;
const FIRST_RELAY_PORT: u16 = 49152;

/// REST credentials for `user`, valid until `expiry_unix_s`.
pub fn rest_credentials(secret: &str, user: &str, expiry_unix_s: u64) -> (String, String) {
    let username = format!("{expiry_unix_s}:{user}");
    let password = rest_password(secret, &username);
    (username, password)
}

fn rest_password(secret: &str, username: &str) -> String {
    let key = aws_lc_rs::hmac::Key::new(
        aws_lc_rs::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        secret.as_bytes(),
    );
    BASE64_STANDARD.encode(aws_lc_rs::hmac::sign(&key, username.as_bytes()).as_ref())
}

#[derive(Debug)]
struct Allocation {
    client: SocketAddr,
    username: String,
    key: [u8; 16],
    relay: SocketAddr,
    expires: Instant,
    permissions: BTreeMap<IpAddr, Instant>,
    channels: BTreeMap<u16, (SocketAddr, Instant)>,
}

/// Counters for tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TurnStats {
    pub allocations: u64,
    pub refreshes: u64,
    pub relayed_to_peer: u64,
    pub relayed_to_client: u64,
    pub refused: u64,
    /// Datagrams relayed from Send indications (not ChannelData).
    pub send_indications: u64,
}

#[derive(Debug)]
pub struct SimTurnServer {
    pub addr: SocketAddr,
    secret: String,
    nonce: Vec<u8>,
    allocs: Vec<Allocation>,
    next_port: u16,
    /// Longest allocation lifetime granted (coturn's `max-allocate-lifetime`, default 3600 s).
    pub max_lifetime: u32,
    /// Refuse ChannelBind (403), as a server without channel support would: clients must
    /// fall back to CreatePermission and Send/Data indications.
    pub refuse_channel_bind: bool,
    pub stats: TurnStats,
}

type Out = Vec<(SocketAddr, SocketAddr, Vec<u8>)>;

impl SimTurnServer {
    pub fn new(addr: SocketAddr, secret: &str) -> Self {
        SimTurnServer {
            addr,
            secret: secret.to_owned(),
            nonce: b"sim-nonce-1".to_vec(),
            allocs: Vec::new(),
            next_port: FIRST_RELAY_PORT,
            max_lifetime: MAX_LIFETIME,
            refuse_channel_bind: false,
            stats: TurnStats::default(),
        }
    }

    pub fn ip(&self) -> IpAddr {
        self.addr.ip()
    }

    /// Live allocations.
    pub fn allocations(&self) -> usize {
        self.allocs.len()
    }

    fn expire(&mut self, now: Instant) {
        self.allocs.retain(|a| a.expires > now);
        for a in &mut self.allocs {
            a.permissions.retain(|_, e| *e > now);
            a.channels.retain(|_, (_, e)| *e > now);
        }
    }

    /// One datagram to the server's IP (`to` = its TURN port or a relayed port). Returns the
    /// datagrams it sends: (source, destination, contents).
    pub fn handle(
        &mut self,
        now: Instant,
        unix_s: u64,
        from: SocketAddr,
        to: SocketAddr,
        data: &[u8],
    ) -> Out {
        self.expire(now);
        if to == self.addr {
            self.client_datagram(now, unix_s, from, data)
        } else {
            self.peer_datagram(from, to, data)
        }
    }

    fn peer_datagram(&mut self, from: SocketAddr, to: SocketAddr, data: &[u8]) -> Out {
        let Some(a) = self.allocs.iter().find(|a| a.relay == to) else {
            return Vec::new();
        };
        if !a.permissions.contains_key(&from.ip()) {
            return Vec::new();
        }
        self.stats.relayed_to_client += 1;
        let wrapped = match a.channels.iter().find(|(_, (p, _))| *p == from) {
            Some((n, _)) => msg::channel_data(*n, data),
            None => Builder::new(msg::DATA, Class::Indication, txn_for(data))
                .xor_addr(msg::ATTR_XOR_PEER_ADDRESS, from)
                .attr(msg::ATTR_DATA, data)
                .build(),
        };
        vec![(self.addr, a.client, wrapped)]
    }

    fn client_datagram(&mut self, now: Instant, unix_s: u64, from: SocketAddr, data: &[u8]) -> Out {
        if let Some((n, payload)) = msg::parse_channel_data(data) {
            let Some(a) = self.allocs.iter().find(|a| a.client == from) else {
                return Vec::new();
            };
            let Some((peer, _)) = a.channels.get(&n) else {
                return Vec::new();
            };
            self.stats.relayed_to_peer += 1;
            return vec![(a.relay, *peer, payload.to_vec())];
        }
        let Ok(m) = Message::parse(data) else {
            return Vec::new();
        };
        if m.method == msg::SEND && m.class == Class::Indication {
            let (Some(a), Some(peer), Some(payload)) = (
                self.allocs.iter().find(|a| a.client == from),
                m.xor_addr(msg::ATTR_XOR_PEER_ADDRESS),
                m.attr(msg::ATTR_DATA),
            ) else {
                return Vec::new();
            };
            if !a.permissions.contains_key(&peer.ip()) {
                return Vec::new();
            }
            self.stats.relayed_to_peer += 1;
            self.stats.send_indications += 1;
            return vec![(a.relay, peer, payload.to_vec())];
        }
        if m.class != Class::Request {
            return Vec::new();
        }
        if m.method == msg::BINDING {
            let r = Builder::new(msg::BINDING, Class::Success, m.txn)
                .xor_addr(msg::ATTR_XOR_MAPPED_ADDRESS, from)
                .build();
            return vec![(self.addr, from, r)];
        }
        let reply = self.request(now, unix_s, from, &m);
        vec![(self.addr, from, reply)]
    }

    fn error(&mut self, m: &Message<'_>, code: u16, reason: &str) -> Vec<u8> {
        self.stats.refused += 1;
        let mut b = Builder::new(m.method, Class::Error, m.txn).error(code, reason);
        if code == 401 || code == 438 {
            b = b
                .attr(msg::ATTR_REALM, REALM.as_bytes())
                .attr(msg::ATTR_NONCE, &self.nonce);
        }
        b.build()
    }

    fn request(&mut self, now: Instant, unix_s: u64, from: SocketAddr, m: &Message<'_>) -> Vec<u8> {
        let Some(username) = m.str_attr(msg::ATTR_USERNAME) else {
            return self.error(m, 401, "Unauthorized");
        };
        if m.attr(msg::ATTR_NONCE) != Some(&self.nonce[..]) {
            return self.error(m, 438, "Stale Nonce");
        }
        let password = rest_password(&self.secret, username);
        let key = msg::long_term_key(username, REALM, &password);
        if !m.verify_integrity(&key) {
            return self.error(m, 401, "Unauthorized");
        }
        let existing = self.allocs.iter().position(|a| a.client == from);
        match (m.method, existing) {
            (msg::ALLOCATE, Some(_)) => self.error(m, 437, "Allocation Mismatch"),
            (msg::ALLOCATE, None) => {
                let expiry: u64 = username
                    .split(':')
                    .next()
                    .and_then(|e| e.parse().ok())
                    .unwrap_or(0);
                if expiry < unix_s {
                    return self.error(m, 401, "Unauthorized");
                }
                let lifetime = m
                    .u32_attr(msg::ATTR_LIFETIME)
                    .unwrap_or(DEFAULT_LIFETIME)
                    .min(self.max_lifetime);
                let relay = SocketAddr::new(self.addr.ip(), self.next_port);
                self.next_port = self.next_port.wrapping_add(1).max(FIRST_RELAY_PORT);
                self.allocs.push(Allocation {
                    client: from,
                    username: username.to_owned(),
                    key,
                    relay,
                    expires: now + Duration::from_secs(u64::from(lifetime)),
                    permissions: BTreeMap::new(),
                    channels: BTreeMap::new(),
                });
                self.stats.allocations += 1;
                Builder::new(msg::ALLOCATE, Class::Success, m.txn)
                    .xor_addr(msg::ATTR_XOR_RELAYED_ADDRESS, relay)
                    .xor_addr(msg::ATTR_XOR_MAPPED_ADDRESS, from)
                    .u32(msg::ATTR_LIFETIME, lifetime)
                    .integrity(&key)
                    .fingerprint()
                    .build()
            }
            (_, None) => self.error(m, 437, "Allocation Mismatch"),
            (method, Some(i)) => {
                if self.allocs[i].username != username {
                    return self.error(m, 441, "Wrong Credentials");
                }
                let max = self.max_lifetime;
                let a = &mut self.allocs[i];
                let key = a.key;
                match method {
                    msg::REFRESH => {
                        let lifetime = m
                            .u32_attr(msg::ATTR_LIFETIME)
                            .unwrap_or(DEFAULT_LIFETIME)
                            .min(max);
                        self.stats.refreshes += 1;
                        if lifetime == 0 {
                            self.allocs.remove(i);
                        } else {
                            a.expires = now + Duration::from_secs(u64::from(lifetime));
                        }
                        Builder::new(msg::REFRESH, Class::Success, m.txn)
                            .u32(msg::ATTR_LIFETIME, lifetime)
                            .integrity(&key)
                            .fingerprint()
                            .build()
                    }
                    msg::CREATE_PERMISSION => {
                        let Some(peer) = m.xor_addr(msg::ATTR_XOR_PEER_ADDRESS) else {
                            return self.error(m, 400, "Bad Request");
                        };
                        a.permissions.insert(peer.ip(), now + PERMISSION_LIFETIME);
                        Builder::new(msg::CREATE_PERMISSION, Class::Success, m.txn)
                            .integrity(&key)
                            .fingerprint()
                            .build()
                    }
                    msg::CHANNEL_BIND if self.refuse_channel_bind => {
                        self.error(m, 403, "Forbidden")
                    }
                    msg::CHANNEL_BIND => {
                        let (Some(n), Some(peer)) =
                            (m.channel_number(), m.xor_addr(msg::ATTR_XOR_PEER_ADDRESS))
                        else {
                            return self.error(m, 400, "Bad Request");
                        };
                        let clash = a
                            .channels
                            .iter()
                            .any(|(cn, (p, _))| (*cn == n) != (*p == peer));
                        if !(0x4000..=0x4fff).contains(&n) || clash {
                            return self.error(m, 400, "Bad Request");
                        }
                        a.channels.insert(n, (peer, now + CHANNEL_LIFETIME));
                        a.permissions.insert(peer.ip(), now + PERMISSION_LIFETIME);
                        Builder::new(msg::CHANNEL_BIND, Class::Success, m.txn)
                            .integrity(&key)
                            .fingerprint()
                            .build()
                    }
                    _ => self.error(m, 400, "Bad Request"),
                }
            }
        }
    }
}

/// A deterministic transaction id for a Data indication (indications need no randomness).
fn txn_for(data: &[u8]) -> [u8; 12] {
    let mut t = [0u8; 12];
    for (i, b) in data.iter().take(12).enumerate() {
        t[i] = *b;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_credentials_match_coturn() {
        // base64(HMAC-SHA1("s3cret", "1700000000:alice")), as coturn/Synapse compute it.
        let (u, p) = rest_credentials("s3cret", "alice", 1_700_000_000);
        assert_eq!(u, "1700000000:alice");
        // Python: base64.b64encode(hmac.new(b"s3cret", b"1700000000:alice", hashlib.sha1).digest())
        assert_eq!(p, "TtElzSjT0GdnTQ9xdcRNxx96yQs=");
    }
}
