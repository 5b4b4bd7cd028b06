//! A sans-IO TURN client (RFC 8656 over UDP): relay candidates for calls behind NATs that
//! direct and server-reflexive paths cannot cross.
//!
//! One [`Allocation`] per (local socket, TURN server). Allocate with long-term credentials
//! (the 401 gives realm and nonce; a 438 gives a fresh nonce), Refresh before the lifetime
//! runs out, one ChannelBind per peer (it installs the permission too) refreshed before the
//! permission's 5 minutes, data as ChannelData once bound (a few datagrams wait for the bind).
//! Requests are retransmitted at 500 ms doubling. Every answer must match a transaction of
//! ours, come from the server, and pass MESSAGE-INTEGRITY once we hold a key: anything else is
//! dropped without a word back.
//!
//! Credentials from `/voip/turnServer` (or config) change over time. Servers tie an
//! allocation to the username it was made with (441 otherwise), so new credentials are used
//! for new allocations; an allocation whose own credentials are refused (401 with a fresh
//! nonce) is replaced by a new one made with the newest credentials.

pub mod msg;
mod uri;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::rng::Rng;
use crate::types::{Secret, Transmit};
use msg::{Builder, Class, Message};

pub use uri::{TurnUri, UriError, UriScheme, UriTransport};

use crate::limits::turn::{
    FIRST_RTO, MAX_ALLOCATIONS, MAX_CHANNELS, MAX_QUEUED, MAX_SENDS, PERMISSION_REFRESH,
    REFRESH_MARGIN, REQUESTED_LIFETIME, RETRY_FAILED,
};

/// First TURN channel number (RFC 8656 §12).
const FIRST_CHANNEL: u16 = 0x4000;

/// TURN credentials (long-term: username and password).
#[derive(Debug, Clone)]
pub struct TurnCredentials {
    pub username: Secret,
    pub password: Secret,
}

impl PartialEq for TurnCredentials {
    fn eq(&self, o: &Self) -> bool {
        self.username.expose() == o.username.expose()
            && self.password.expose() == o.password.expose()
    }
}

/// What happened to an allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TurnEvent {
    /// A relayed address is ready: offer it as a relay candidate.
    Allocated {
        local: SocketAddr,
        server: SocketAddr,
        relay: SocketAddr,
        /// Our address as the TURN server saw it (XOR-MAPPED-ADDRESS).
        mapped: Option<SocketAddr>,
    },
    /// The server refused or never answered. `code` is the STUN error code, if any.
    Failed {
        local: SocketAddr,
        server: SocketAddr,
        code: Option<u16>,
        reason: String,
    },
    /// A relayed address is gone (expired, refused on refresh, or replaced).
    Lost { relay: SocketAddr },
    /// A self-test datagram came back: `outbound` = sent through the relay to our own
    /// address; inbound = sent to the relay from our socket and handed back by the server.
    SelfTest { relay: SocketAddr, outbound: bool },
}

/// A datagram that came through a relay.
#[derive(Debug, PartialEq, Eq)]
pub struct Relayed {
    pub peer: SocketAddr,
    pub relay: SocketAddr,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Allocating,
    Allocated,
    /// Gave up; tried again at `retry_at`.
    Failed,
    /// Refresh with lifetime 0 sent (replaced or shutting down).
    Deleting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxnKind {
    Allocate,
    Refresh {
        lifetime: u32,
    },
    Bind {
        channel: u16,
    },
    /// CreatePermission for the txn's peer (when the server refused a ChannelBind).
    Permission,
}

#[derive(Debug)]
struct Txn {
    id: [u8; 12],
    kind: TxnKind,
    /// For Bind: the peer.
    peer: Option<SocketAddr>,
    bytes: Vec<u8>,
    sent: u32,
    next_at: Instant,
    /// Whether the request carried our credentials.
    authed: bool,
}

#[derive(Debug)]
struct Channel {
    peer: SocketAddr,
    number: u16,
    bound: bool,
    /// When the binding (and its permission) must be refreshed.
    refresh_at: Option<Instant>,
    /// The server refused the ChannelBind: a permission only, data as Send indications.
    indications: bool,
}

#[derive(Debug)]
struct Allocation {
    local: SocketAddr,
    server: SocketAddr,
    creds: TurnCredentials,
    realm: Option<String>,
    nonce: Option<Vec<u8>>,
    key: Option<[u8; 16]>,
    state: State,
    relay: Option<SocketAddr>,
    mapped: Option<SocketAddr>,
    expires: Option<Instant>,
    refresh_at: Option<Instant>,
    retry_at: Option<Instant>,
    txns: Vec<Txn>,
    channels: Vec<Channel>,
    queue: VecDeque<(SocketAddr, Vec<u8>)>,
    /// Self-test: the payload and whether the inbound datagram was sent yet.
    self_test: Option<(Vec<u8>, bool)>,
    /// 401s in a row on authenticated requests (a fresh nonce did not help: bad credentials).
    refused: u8,
}

impl Allocation {
    fn new(local: SocketAddr, server: SocketAddr, creds: TurnCredentials, now: Instant) -> Self {
        Allocation {
            local,
            server,
            creds,
            realm: None,
            nonce: None,
            key: None,
            state: State::Allocating,
            relay: None,
            mapped: None,
            expires: None,
            refresh_at: None,
            retry_at: Some(now),
            txns: Vec::new(),
            channels: Vec::new(),
            queue: VecDeque::new(),
            self_test: None,
            refused: 0,
        }
    }

    fn request(
        &self,
        method: u16,
        id: [u8; 12],
        kind: TxnKind,
        peer: Option<SocketAddr>,
    ) -> (Vec<u8>, bool) {
        let mut b = Builder::new(method, Class::Request, id);
        match kind {
            TxnKind::Allocate => {
                b = b
                    .attr(
                        msg::ATTR_REQUESTED_TRANSPORT,
                        &[msg::TRANSPORT_UDP, 0, 0, 0],
                    )
                    .u32(msg::ATTR_LIFETIME, REQUESTED_LIFETIME);
            }
            TxnKind::Refresh { lifetime } => b = b.u32(msg::ATTR_LIFETIME, lifetime),
            TxnKind::Bind { channel } => {
                b = b.channel(channel);
                if let Some(p) = peer {
                    b = b.xor_addr(msg::ATTR_XOR_PEER_ADDRESS, p);
                }
            }
            TxnKind::Permission => {
                if let Some(p) = peer {
                    b = b.xor_addr(msg::ATTR_XOR_PEER_ADDRESS, p);
                }
            }
        }
        match (&self.realm, &self.nonce, &self.key) {
            (Some(realm), Some(nonce), Some(key)) => {
                let bytes = b
                    .attr(msg::ATTR_USERNAME, self.creds.username.expose().as_bytes())
                    .attr(msg::ATTR_REALM, realm.as_bytes())
                    .attr(msg::ATTR_NONCE, nonce)
                    .integrity(key)
                    .fingerprint()
                    .build();
                (bytes, true)
            }
            _ => (b.fingerprint().build(), false),
        }
    }

    fn start(&mut self, kind: TxnKind, peer: Option<SocketAddr>, now: Instant, rng: &mut Rng) {
        let method = match kind {
            TxnKind::Allocate => msg::ALLOCATE,
            TxnKind::Refresh { .. } => msg::REFRESH,
            TxnKind::Bind { .. } => msg::CHANNEL_BIND,
            TxnKind::Permission => msg::CREATE_PERMISSION,
        };
        // One transaction per kind (and peer) at a time.
        self.txns.retain(|t| !(t.kind == kind && t.peer == peer));
        let id = txn_id(rng);
        let (bytes, authed) = self.request(method, id, kind, peer);
        self.txns.push(Txn {
            id,
            kind,
            peer,
            bytes,
            sent: 0,
            next_at: now,
            authed,
        });
    }

    fn fail(
        &mut self,
        code: Option<u16>,
        reason: String,
        now: Instant,
        events: &mut VecDeque<TurnEvent>,
    ) {
        warn!(server = %self.server, ?code, "TURN allocation failed: {reason}");
        if let Some(relay) = self.relay.take() {
            events.push_back(TurnEvent::Lost { relay });
        }
        events.push_back(TurnEvent::Failed {
            local: self.local,
            server: self.server,
            code,
            reason,
        });
        self.state = State::Failed;
        self.txns.clear();
        self.channels.clear();
        self.queue.clear();
        self.expires = None;
        self.refresh_at = None;
        self.retry_at = Some(now + RETRY_FAILED);
    }

    fn deadline(&self) -> Option<Instant> {
        let txn = self.txns.iter().map(|t| t.next_at).min();
        let chan = self.channels.iter().filter_map(|c| c.refresh_at).min();
        [txn, chan, self.refresh_at, self.retry_at, self.expires]
            .into_iter()
            .flatten()
            .min()
    }
}

fn txn_id(rng: &mut Rng) -> [u8; 12] {
    let mut id = [0u8; 12];
    let a = rng.u64().to_le_bytes();
    let b = rng.u64().to_le_bytes();
    for (x, y) in id.iter_mut().zip(a.iter().chain(b.iter())) {
        *x = *y;
    }
    id
}

/// The TURN client of one agent.
#[derive(Debug, Default)]
pub(crate) struct TurnClient {
    allocs: Vec<Allocation>,
    creds: Option<TurnCredentials>,
    servers: Vec<SocketAddr>,
    events: VecDeque<TurnEvent>,
}

impl TurnClient {
    /// The credentials for allocations from now on (existing ones keep theirs: see module docs).
    pub fn set_credentials(&mut self, creds: TurnCredentials, locals: &[SocketAddr], now: Instant) {
        if self.creds.as_ref() == Some(&creds) {
            return;
        }
        self.creds = Some(creds);
        // Allocations that failed (e.g. on expired credentials) are tried again at once.
        for a in &mut self.allocs {
            if a.state == State::Failed {
                a.retry_at = Some(now);
            }
        }
        let servers = self.servers.clone();
        for s in servers {
            self.add_server(s, locals, now);
        }
    }

    /// Allocates on `server` from every local socket of its IP family.
    pub fn add_server(&mut self, server: SocketAddr, locals: &[SocketAddr], now: Instant) {
        if !self.servers.contains(&server) {
            self.servers.push(server);
        }
        let Some(creds) = self.creds.clone() else {
            return;
        };
        for local in locals.iter().filter(|l| l.is_ipv4() == server.is_ipv4()) {
            if self
                .allocs
                .iter()
                .any(|a| a.local == *local && a.server == server)
            {
                continue;
            }
            if self.allocs.len() >= MAX_ALLOCATIONS {
                debug!("TURN allocation limit reached");
                return;
            }
            info!(server = %server, "TURN: allocating a relay");
            self.allocs
                .push(Allocation::new(*local, server, creds.clone(), now));
        }
    }

    pub fn poll_event(&mut self) -> Option<TurnEvent> {
        self.events.pop_front()
    }

    /// True while some allocation has not come to a result yet (a relay or a failure).
    pub fn gathering(&self) -> bool {
        self.allocs.iter().any(|a| a.state == State::Allocating)
    }

    pub fn is_relay(&self, addr: SocketAddr) -> bool {
        self.allocs.iter().any(|a| a.relay == Some(addr))
    }

    /// Deletes every allocation (Refresh with lifetime 0): for shutdown.
    pub fn delete_all(&mut self, now: Instant, rng: &mut Rng) {
        for a in &mut self.allocs {
            if a.state == State::Allocated {
                a.state = State::Deleting;
                a.channels.clear();
                a.refresh_at = None;
                a.start(TxnKind::Refresh { lifetime: 0 }, None, now, rng);
            }
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.allocs.iter().filter_map(Allocation::deadline).min()
    }

    pub fn handle_timeout(&mut self, now: Instant, rng: &mut Rng) {
        let events = &mut self.events;
        let newest = self.creds.clone();
        for a in &mut self.allocs {
            if a.expires.is_some_and(|e| e <= now) {
                info!(server = %a.server, "TURN allocation expired");
                if let Some(relay) = a.relay.take() {
                    events.push_back(TurnEvent::Lost { relay });
                }
                a.state = State::Failed;
                a.txns.clear();
                a.channels.clear();
                a.expires = None;
                a.refresh_at = None;
                a.retry_at = Some(now);
            }
            if a.retry_at.is_some_and(|t| t <= now) && a.state != State::Allocated {
                a.retry_at = None;
                if let Some(c) = &newest {
                    a.creds = c.clone();
                }
                a.state = State::Allocating;
                a.realm = None;
                a.nonce = None;
                a.key = None;
                a.refused = 0;
                a.start(TxnKind::Allocate, None, now, rng);
            }
            if a.refresh_at.is_some_and(|t| t <= now) {
                a.refresh_at = None;
                a.start(
                    TxnKind::Refresh {
                        lifetime: REQUESTED_LIFETIME,
                    },
                    None,
                    now,
                    rng,
                );
            }
            let due: Vec<(SocketAddr, TxnKind)> = a
                .channels
                .iter_mut()
                .filter(|c| c.refresh_at.is_some_and(|t| t <= now))
                .map(|c| {
                    c.refresh_at = None;
                    let kind = if c.indications {
                        TxnKind::Permission
                    } else {
                        TxnKind::Bind { channel: c.number }
                    };
                    (c.peer, kind)
                })
                .collect();
            for (peer, kind) in due {
                a.start(kind, Some(peer), now, rng);
            }
            // Requests that ran out of retransmissions.
            let dead: Vec<TxnKind> = a
                .txns
                .iter()
                .filter(|t| t.sent >= MAX_SENDS && t.next_at <= now)
                .map(|t| t.kind)
                .collect();
            if !dead.is_empty() {
                a.txns
                    .retain(|t| !(t.sent >= MAX_SENDS && t.next_at <= now));
                match a.state {
                    State::Deleting => {}
                    _ if dead
                        .iter()
                        .any(|k| !matches!(k, TxnKind::Bind { .. } | TxnKind::Permission)) =>
                    {
                        a.fail(None, "no answer from the TURN server".into(), now, events)
                    }
                    _ => debug!(server = %a.server, "TURN channel bind got no answer"),
                }
            }
        }
        self.allocs
            .retain(|a| !(a.state == State::Deleting && a.txns.is_empty()));
    }

    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        for a in &mut self.allocs {
            if let Some(t) = a
                .txns
                .iter_mut()
                .find(|t| t.sent < MAX_SENDS && t.next_at <= now)
            {
                t.sent += 1;
                t.next_at = now + FIRST_RTO * (1 << (t.sent - 1).min(6));
                return Some(Transmit {
                    source: a.local,
                    destination: a.server,
                    contents: t.bytes.clone(),
                });
            }
        }
        None
    }

    /// Wraps a datagram str0m sends from a relayed address. `None`: not one of our relays.
    /// `Some(None)`: queued until the peer's channel is bound (or dropped when the queue is full).
    pub fn send(
        &mut self,
        relay: SocketAddr,
        peer: SocketAddr,
        data: &[u8],
        now: Instant,
        rng: &mut Rng,
    ) -> Option<Option<Transmit>> {
        let a = self
            .allocs
            .iter_mut()
            .find(|a| a.relay == Some(relay) && a.state == State::Allocated)?;
        if let Some(c) = a.channels.iter().find(|c| c.peer == peer) {
            if c.bound {
                return Some(Some(Transmit {
                    source: a.local,
                    destination: a.server,
                    contents: wrap(c, data, rng),
                }));
            }
        } else {
            if a.channels.len() >= MAX_CHANNELS {
                debug!("TURN channel limit reached; datagram dropped");
                return Some(None);
            }
            let number = (FIRST_CHANNEL..FIRST_CHANNEL + MAX_CHANNELS as u16)
                .find(|n| !a.channels.iter().any(|c| c.number == *n))
                .unwrap_or(FIRST_CHANNEL);
            a.channels.push(Channel {
                peer,
                number,
                bound: false,
                refresh_at: None,
                indications: false,
            });
            a.start(TxnKind::Bind { channel: number }, Some(peer), now, rng);
        }
        if a.queue.len() >= MAX_QUEUED {
            a.queue.pop_front();
        }
        a.queue.push_back((peer, data.to_vec()));
        Some(None)
    }

    /// Sends a datagram through each ready relay to our own address as the server sees it
    /// (outbound), and once the permission exists one from our socket to the relay (inbound);
    /// each that comes back gives [`TurnEvent::SelfTest`]. Returns how many relays are tested.
    pub fn start_self_test(&mut self, now: Instant, rng: &mut Rng) -> usize {
        let mut n = 0;
        let targets: Vec<(SocketAddr, SocketAddr)> = self
            .allocs
            .iter()
            .filter(|a| a.state == State::Allocated)
            .filter_map(|a| Some((a.relay?, a.mapped?)))
            .collect();
        for (relay, mapped) in targets {
            let payload = format!("call-assist check {:016x}", rng.u64()).into_bytes();
            if let Some(a) = self.allocs.iter_mut().find(|a| a.relay == Some(relay)) {
                a.self_test = Some((payload.clone(), false));
            }
            let _ = self.send(relay, mapped, &payload, now, rng);
            n += 1;
        }
        n
    }

    /// A datagram that is not from a TURN server: the outbound self-test coming back from a
    /// relay's address, or not ours (`false`).
    pub fn handle_plain(
        &mut self,
        source: SocketAddr,
        destination: SocketAddr,
        data: &[u8],
    ) -> bool {
        let hit = self.allocs.iter().find(|a| {
            a.relay == Some(source)
                && a.local == destination
                && a.self_test.as_ref().is_some_and(|(p, _)| p == data)
        });
        if let Some(relay) = hit.and_then(|a| a.relay) {
            self.events.push_back(TurnEvent::SelfTest {
                relay,
                outbound: true,
            });
            return true;
        }
        false
    }

    /// Datagrams that waited for a channel bind and can go now.
    pub fn poll_queued(&mut self, rng: &mut Rng) -> Option<Transmit> {
        for a in &mut self.allocs {
            // The inbound self-test leaves once the permission for our own address exists.
            if let (Some((payload, sent)), Some(relay), Some(mapped)) =
                (&mut a.self_test, a.relay, a.mapped)
            {
                if !*sent && a.channels.iter().any(|c| c.peer == mapped && c.bound) {
                    *sent = true;
                    return Some(Transmit {
                        source: a.local,
                        destination: relay,
                        contents: payload.clone(),
                    });
                }
            }
            let Some(i) = a
                .queue
                .iter()
                .position(|(p, _)| a.channels.iter().any(|c| c.peer == *p && c.bound))
            else {
                continue;
            };
            let (peer, data) = a.queue.remove(i)?;
            let c = a.channels.iter().find(|c| c.peer == peer)?;
            return Some(Transmit {
                source: a.local,
                destination: a.server,
                contents: wrap(c, &data, rng),
            });
        }
        None
    }

    /// Takes a datagram from a TURN server. `None`: not from one of our servers (not ours).
    /// `Some(None)`: consumed (an answer, or dropped). `Some(Some(r))`: relayed peer data.
    pub fn handle_receive(
        &mut self,
        source: SocketAddr,
        destination: SocketAddr,
        data: &[u8],
        now: Instant,
        rng: &mut Rng,
    ) -> Option<Option<Relayed>> {
        let idx = self
            .allocs
            .iter()
            .position(|a| a.server == source && a.local == destination)?;
        let newest = self.creds.clone();
        let events = &mut self.events;
        let a = self.allocs.get_mut(idx)?;
        if let Some((number, payload)) = msg::parse_channel_data(data) {
            let relay = a.relay?;
            let Some(c) = a.channels.iter().find(|c| c.number == number && c.bound) else {
                debug!(number, "ChannelData on an unbound channel dropped");
                return Some(None);
            };
            if a.self_test.as_ref().is_some_and(|(p, _)| p == payload) && Some(c.peer) == a.mapped {
                events.push_back(TurnEvent::SelfTest {
                    relay,
                    outbound: false,
                });
                return Some(None);
            }
            return Some(Some(Relayed {
                peer: c.peer,
                relay,
                data: payload.to_vec(),
            }));
        }
        let m = match Message::parse(data) {
            Ok(m) => m,
            Err(e) => {
                debug!(server = %source, "datagram from the TURN server dropped: {e}");
                return Some(None);
            }
        };
        if m.method == msg::DATA && m.class == Class::Indication {
            let (Some(relay), Some(peer), Some(payload)) = (
                a.relay,
                m.xor_addr(msg::ATTR_XOR_PEER_ADDRESS),
                m.attr(msg::ATTR_DATA),
            ) else {
                debug!("malformed Data indication dropped");
                return Some(None);
            };
            if !a.channels.iter().any(|c| c.peer.ip() == peer.ip()) {
                debug!("Data indication from a peer without permission dropped");
                return Some(None);
            }
            return Some(Some(Relayed {
                peer,
                relay,
                data: payload.to_vec(),
            }));
        }
        if !matches!(m.class, Class::Success | Class::Error) {
            return Some(None);
        }
        let Some(ti) = a.txns.iter().position(|t| t.id == m.txn) else {
            debug!("TURN answer for no transaction of ours dropped");
            return Some(None);
        };
        // Integrity: a success must carry a valid MESSAGE-INTEGRITY once we hold a key;
        // an error may lack one (401/438 carry the nonce to use), but a wrong one is a forgery.
        let authed = a.txns.get(ti).is_some_and(|t| t.authed);
        if let Some(key) = a.key.filter(|_| authed) {
            let has = m.has(msg::ATTR_MESSAGE_INTEGRITY);
            if (m.class == Class::Success || has) && !m.verify_integrity(&key) {
                debug!("TURN answer failing MESSAGE-INTEGRITY dropped");
                return Some(None);
            }
        }
        let txn = a.txns.remove(ti);
        if m.class == Class::Success {
            a.refused = 0;
            on_success(a, &txn, &m, now, events);
            return Some(None);
        }
        let (code, reason) = m.error_code().unwrap_or((0, ""));
        let reason = reason.to_owned();
        match code {
            401 | 438 => {
                let realm = m
                    .str_attr(msg::ATTR_REALM)
                    .map(str::to_owned)
                    .or(a.realm.clone());
                let nonce = m.attr(msg::ATTR_NONCE).map(<[u8]>::to_vec);
                let (Some(realm), Some(nonce)) = (realm, nonce) else {
                    a.fail(
                        Some(code),
                        format!("{code} without realm/nonce"),
                        now,
                        events,
                    );
                    return Some(None);
                };
                if code == 401 && txn.authed {
                    a.refused += 1;
                }
                if a.refused >= 2 {
                    // Our credentials are refused even with a fresh nonce (expired or wrong).
                    if a.state == State::Allocated && newest.as_ref() != Some(&a.creds) {
                        info!(server = %a.server, "TURN credentials of an allocation expired; re-allocating with the new ones");
                    }
                    a.fail(Some(401), "credentials refused".into(), now, events);
                    if newest.as_ref().is_some_and(|n| *n != a.creds) {
                        a.retry_at = Some(now);
                    }
                    return Some(None);
                }
                a.key = Some(msg::long_term_key(
                    a.creds.username.expose(),
                    &realm,
                    a.creds.password.expose(),
                ));
                a.realm = Some(realm);
                a.nonce = Some(nonce);
                a.start(txn.kind, txn.peer, now, rng);
            }
            437 if txn.kind == TxnKind::Allocate => {
                // Allocation mismatch: the server still holds an allocation for this 5-tuple
                // (ours, from before a restart). It expires on its own; try again later.
                a.fail(Some(437), "allocation mismatch".into(), now, events);
            }
            _ => match txn.kind {
                TxnKind::Bind { channel } => {
                    // Channels are an optimisation: fall back to a permission and Send
                    // indications for this peer.
                    debug!(
                        code,
                        "TURN channel bind refused ({reason}); using a permission"
                    );
                    if let Some(c) = a.channels.iter_mut().find(|c| c.number == channel) {
                        c.indications = true;
                        c.number = 0;
                    }
                    a.start(TxnKind::Permission, txn.peer, now, rng);
                }
                TxnKind::Permission => {
                    debug!(code, "TURN permission refused: {reason}");
                    if let Some(p) = txn.peer {
                        a.channels.retain(|c| c.peer != p);
                        a.queue.retain(|(q, _)| *q != p);
                    }
                }
                TxnKind::Refresh { lifetime: 0 } => {}
                _ => a.fail(Some(code), format!("{code} {reason}"), now, events),
            },
        }
        Some(None)
    }
}

fn on_success(
    a: &mut Allocation,
    txn: &Txn,
    m: &Message<'_>,
    now: Instant,
    events: &mut VecDeque<TurnEvent>,
) {
    match txn.kind {
        TxnKind::Allocate => {
            let Some(relay) = m.xor_addr(msg::ATTR_XOR_RELAYED_ADDRESS) else {
                a.fail(
                    None,
                    "Allocate success without a relayed address".into(),
                    now,
                    events,
                );
                return;
            };
            let lifetime =
                Duration::from_secs(u64::from(m.u32_attr(msg::ATTR_LIFETIME).unwrap_or(600)));
            a.mapped = m.mapped_addr();
            a.relay = Some(relay);
            a.state = State::Allocated;
            set_lifetime(a, lifetime, now);
            info!(server = %a.server, "TURN relay allocated");
            debug!(%relay, ?lifetime, "TURN allocation");
            events.push_back(TurnEvent::Allocated {
                local: a.local,
                server: a.server,
                relay,
                mapped: a.mapped,
            });
        }
        TxnKind::Refresh { lifetime: 0 } => {}
        TxnKind::Refresh { .. } => {
            let lifetime =
                Duration::from_secs(u64::from(m.u32_attr(msg::ATTR_LIFETIME).unwrap_or(600)));
            debug!(server = %a.server, ?lifetime, "TURN allocation refreshed");
            set_lifetime(a, lifetime, now);
        }
        TxnKind::Bind { channel } => {
            if let Some(c) = a.channels.iter_mut().find(|c| c.number == channel) {
                c.bound = true;
                c.refresh_at = Some(now + PERMISSION_REFRESH);
            }
        }
        TxnKind::Permission => {
            if let Some(c) = a
                .channels
                .iter_mut()
                .find(|c| Some(c.peer) == txn.peer && c.indications)
            {
                c.bound = true;
                c.refresh_at = Some(now + PERMISSION_REFRESH);
            }
        }
    }
}

/// A datagram for `c`'s peer: ChannelData on a bound channel, else a Send indication.
fn wrap(c: &Channel, data: &[u8], rng: &mut Rng) -> Vec<u8> {
    if c.indications {
        Builder::new(msg::SEND, Class::Indication, txn_id(rng))
            .xor_addr(msg::ATTR_XOR_PEER_ADDRESS, c.peer)
            .attr(msg::ATTR_DATA, data)
            .build()
    } else {
        msg::channel_data(c.number, data)
    }
}

fn set_lifetime(a: &mut Allocation, lifetime: Duration, now: Instant) {
    a.expires = Some(now + lifetime);
    let margin = REFRESH_MARGIN.min(lifetime / 2);
    a.refresh_at = Some(now + lifetime - margin);
}

#[cfg(test)]
mod tests;
