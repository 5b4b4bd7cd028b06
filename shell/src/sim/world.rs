//! The simulated world: agents, a simulated homeserver and a simulated network on one virtual
//! clock. A plain loop: find the earliest deadline of all parts, move the clock there, feed it,
//! drain every agent until it waits again.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use call_assist_core::{
    Agent, AgentConfig, AgentEvent, CallPolicy, CallState, Credentials, HttpFailure, HttpId, Input,
    MediaFrame, MediaKind, Output, Secret,
};
use ruma::{OwnedRoomId, OwnedUserId};
use tracing::{debug, warn};

use super::crypto::{self, CryptoFaults, SimCrypto};
use super::homeserver::{SimHomeserver, SimHttpError, Ticket};
use super::nat::{Nat, NatKind};
use super::net::{Datagram, LinkProfile, SimNet};
use super::turn::SimTurnServer;
use crate::media::pump::{CallMedia, CameraCache, MediaPlan, VideoChoice};

/// Wall-clock time at the start of every simulation (fixed: part of determinism).
pub const SIM_UNIX_START_MS: u64 = 1_767_225_600_000;

/// One line of the trace: simulated ms since start, agent name, event.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TraceLine {
    pub at_ms: u64,
    pub text: String,
}

/// Per agent figures for reports.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AgentStats {
    pub frames_sent: u64,
    pub frames_received: u64,
    pub video_frames_received: u64,
    pub audio_frames_received: u64,
}

/// A sink of remote media frames, called with the simulated time since the start.
pub type MediaSink = Box<dyn FnMut(Duration, &MediaFrame)>;

pub struct SimAgent {
    pub name: String,
    pub agent: Agent,
    pub addr: SocketAddr,
    pub user_id: OwnedUserId,
    /// Answer ringing calls at once.
    pub auto_answer: bool,
    /// Send the test clip and a tone while a call is connected.
    pub send_media: bool,
    /// Every event, with its simulated time (media frames counted, not kept).
    pub events: Vec<(Duration, AgentEvent)>,
    pub stats: AgentStats,
    /// When each call first got remote media.
    pub first_media: BTreeMap<String, Duration>,
    /// The encryption stand-in between this agent and the homeserver.
    pub crypto: SimCrypto,
    /// Where remote media frames go besides the counters, as a live shell's sinks (a camera's
    /// speaker, a recorder) take them: called at each frame's simulated time.
    pub media_sink: Option<MediaSink>,
    timeout: Option<Instant>,
    pump: Option<CallMedia>,
    /// Requests at the homeserver: the core's id, and whether it is a /sync.
    http: BTreeMap<Ticket, (HttpId, bool)>,
}

impl SimAgent {
    /// Events that are not media frames, for assertions.
    pub fn call_events(&self) -> impl Iterator<Item = &AgentEvent> {
        self.events.iter().map(|(_, e)| e)
    }

    pub fn ended_reason(&self, call_id: &str) -> Option<call_assist_core::HangupReason> {
        self.events.iter().find_map(|(_, e)| match e {
            AgentEvent::CallEnded {
                call_id: c, reason, ..
            } if c == call_id => Some(reason.clone()),
            _ => None,
        })
    }

    pub fn reached(&self, call_id: &str, state: CallState) -> bool {
        self.events.iter().any(|(_, e)| {
            matches!(e, AgentEvent::CallStateChanged { call_id: c, state: s } if c == call_id && *s == state)
        })
    }

    /// Whether this agent ever had the call (placed it or saw it ring).
    pub fn incoming_or_placed(&self, call_id: &str) -> bool {
        self.events.iter().any(|(_, e)| match e {
            AgentEvent::IncomingCall { call_id: c, .. } => c == call_id,
            AgentEvent::CallStateChanged { call_id: c, .. } => c == call_id,
            _ => false,
        })
    }

    /// Call ids this agent saw ringing.
    pub fn incoming_calls(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|(_, e)| match e {
                AgentEvent::IncomingCall { call_id, .. } => Some(call_id.clone()),
                _ => None,
            })
            .collect()
    }
}

/// How to build a world.
#[derive(Debug, Clone)]
pub struct WorldConfig {
    pub seed: u64,
    pub link: LinkProfile,
    pub homeserver_latency: Duration,
}

impl Default for WorldConfig {
    fn default() -> Self {
        WorldConfig {
            seed: 1,
            link: LinkProfile::ideal(Duration::from_millis(20)),
            homeserver_latency: Duration::from_millis(10),
        }
    }
}

pub struct World {
    pub seed: u64,
    start: Instant,
    now: Instant,
    pub net: SimNet,
    pub hs: SimHomeserver,
    pub agents: Vec<SimAgent>,
    pub trace: Vec<TraceLine>,
    /// NATs in front of agents (by agent index).
    pub nats: BTreeMap<usize, Nat>,
    pub turn: Option<SimTurnServer>,
    /// What goes wrong with room keys in encrypted rooms (read at each key share).
    pub crypto_faults: CryptoFaults,
    /// Room keys on their way (late-key fault): due instant, recipient, to-device event.
    pending_keys: Vec<(Instant, OwnedUserId, serde_json::Value)>,
    next_ticket: Ticket,
    tickets: BTreeMap<Ticket, usize>,
    /// Steps taken without the clock moving: a part that keeps asking to be woken "now"
    /// without doing anything would spin forever; the world stops it loudly instead.
    steps_at_instant: u32,
}

/// More steps than this at one instant is a livelock (a timer that re-arms at `now`).
const MAX_STEPS_AT_ONE_INSTANT: u32 = 100_000;

impl World {
    pub fn new(config: WorldConfig) -> Self {
        // The one real instant of a simulation: everything after is this plus virtual time.
        let start = Instant::now();
        let mut hs = SimHomeserver::new("sim.local");
        hs.set_latency(config.homeserver_latency);
        World {
            seed: config.seed,
            start,
            now: start,
            net: SimNet::new(config.seed, config.link),
            hs,
            agents: Vec::new(),
            trace: Vec::new(),
            nats: BTreeMap::new(),
            turn: None,
            crypto_faults: CryptoFaults::default(),
            pending_keys: Vec::new(),
            next_ticket: 0,
            tickets: BTreeMap::new(),
            steps_at_instant: 0,
        }
    }

    pub fn now(&self) -> Instant {
        self.now
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    pub fn unix_ms(&self) -> u64 {
        SIM_UNIX_START_MS + self.elapsed().as_millis() as u64
    }

    /// Registers `localpart` on the homeserver (once) and adds an agent logged in as it.
    /// Several agents with one localpart are several devices of one user.
    pub fn add_agent(&mut self, name: &str, localpart: &str, policy: CallPolicy) -> usize {
        self.add_agent_with(name, localpart, policy, |_| {})
    }

    /// [`World::add_agent`] with a last say on the agent's config (e.g. `relay_only`).
    pub fn add_agent_with(
        &mut self,
        name: &str,
        localpart: &str,
        policy: CallPolicy,
        tweak: impl FnOnce(&mut AgentConfig),
    ) -> usize {
        let password = format!("pw-{localpart}");
        let user_id = self.hs.register_user(localpart, &password);
        let idx = self.agents.len();
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10 + idx as u8)), 5000);
        let mut config = AgentConfig::new(
            self.hs.base_url(),
            user_id.clone(),
            Credentials::Password(Secret::new(password)),
            vec![addr],
        );
        config.policy = policy;
        tweak(&mut config);
        let seed = self.seed.wrapping_mul(1000).wrapping_add(idx as u64);
        let agent = match Agent::new(config, seed, self.now, self.unix_ms()) {
            Ok(a) => a,
            Err(e) => unreachable!("the simulator's own config is valid: {e}"),
        };
        self.agents.push(SimAgent {
            name: name.to_owned(),
            agent,
            addr,
            user_id: user_id.clone(),
            auto_answer: false,
            send_media: true,
            events: Vec::new(),
            stats: AgentStats::default(),
            first_media: BTreeMap::new(),
            crypto: SimCrypto::new(user_id.clone(), seed),
            media_sink: None,
            timeout: Some(self.now),
            pump: None,
            http: BTreeMap::new(),
        });
        idx
    }

    /// Puts agent `i` behind a NAT of `kind` with its own public IP: its own address becomes
    /// private (unreachable from outside), its datagrams leave from the NAT's mappings.
    pub fn put_behind_nat(&mut self, i: usize, kind: NatKind) {
        let public = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10 + i as u8));
        self.nats.insert(i, Nat::new(kind, public));
    }

    /// A TURN server at 198.51.100.1:3478 with a shared secret, and the homeserver handing out
    /// REST credentials for it valid for `ttl_s` (as Synapse with `turn_shared_secret`).
    /// Call before agents log in.
    pub fn add_turn_server(&mut self, secret: &str, ttl_s: u64) -> SocketAddr {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 3478);
        self.turn = Some(SimTurnServer::new(addr, secret));
        self.hs
            .set_turn_shared_secret(vec![format!("turn:{addr}?transport=udp")], secret, ttl_s);
        addr
    }

    /// Hands a datagram arriving at `d.destination` to whoever owns that address (TURN
    /// server, NAT, agent). Returns the agent index and the (translated) datagram.
    fn route(&mut self, now: Instant, d: Datagram) -> Option<(usize, Datagram)> {
        if let Some(turn) = self.turn.as_mut().filter(|t| t.ip() == d.destination.ip()) {
            let unix_s = (SIM_UNIX_START_MS + (now - self.start).as_millis() as u64) / 1000;
            for (source, destination, contents) in
                turn.handle(now, unix_s, d.source, d.destination, &d.contents)
            {
                self.net.send(
                    now,
                    Datagram {
                        source,
                        destination,
                        contents,
                    },
                );
            }
            return None;
        }
        if let Some((i, nat)) = self
            .nats
            .iter()
            .find(|(_, n)| n.public_ip == d.destination.ip())
        {
            let Some(private) = nat.inbound(d.source, d.destination.port()) else {
                debug!(src = %d.source, "NAT filtered a datagram");
                return None;
            };
            return Some((
                *i,
                Datagram {
                    destination: private,
                    ..d
                },
            ));
        }
        let i = self.agents.iter().position(|a| a.addr == d.destination)?;
        if self.nats.contains_key(&i) {
            // A private address behind a NAT: not routable from outside.
            return None;
        }
        Some((i, d))
    }

    /// A room with these agents' users joined.
    pub fn create_room(&mut self, members: &[usize]) -> OwnedRoomId {
        let users: Vec<OwnedUserId> = members
            .iter()
            .filter_map(|i| self.agents.get(*i).map(|a| a.user_id.clone()))
            .collect();
        let refs: Vec<&ruma::UserId> = users.iter().map(|u| u.as_ref()).collect();
        let unix = self.unix_ms();
        self.hs.create_room(&refs, false, unix)
    }

    /// [`World::create_room`] with end-to-end encryption on (the stand-in encrypts there).
    pub fn create_encrypted_room(&mut self, members: &[usize]) -> OwnedRoomId {
        let room = self.create_room(members);
        let unix = self.unix_ms();
        self.hs.enable_encryption(&room, unix);
        room
    }

    /// Every agent's wall clock jumps by `delta_ms` (forward or back), as an NTP step or a
    /// bad RTC would do; the homeserver keeps the true time.
    pub fn jump_agent_clocks(&mut self, delta_ms: i64) {
        let now = self.now;
        let unix_ms = self.unix_ms().saturating_add_signed(delta_ms);
        for i in 0..self.agents.len() {
            self.agents[i]
                .agent
                .handle_input(Input::UnixTime { now, unix_ms });
            self.drain(i);
        }
    }

    pub fn agent(&mut self, i: usize) -> &mut SimAgent {
        &mut self.agents[i]
    }

    /// Runs a command on an agent at the current instant and drains it.
    pub fn with_agent<R>(&mut self, i: usize, f: impl FnOnce(&mut Agent, Instant) -> R) -> R {
        let now = self.now;
        let r = f(&mut self.agents[i].agent, now);
        self.drain(i);
        r
    }

    pub fn place_call(&mut self, caller: usize, room: &OwnedRoomId) -> String {
        match self.with_agent(caller, |a, now| a.place_call(room, now)) {
            Ok(id) => id,
            Err(e) => panic!("place_call failed: {e}"),
        }
    }

    fn record(&mut self, i: usize, text: String) {
        let at_ms = self.elapsed().as_millis() as u64;
        self.trace.push(TraceLine {
            at_ms,
            text: format!("{} {}", self.agents[i].name, text),
        });
    }

    /// Drains agent `i` until it waits.
    ///
    /// Datagrams of one drain all leave at one instant; str0m may order them differently from
    /// run to run (HashMap order), so they enter the network sorted by their first bytes, which
    /// are deterministic for every protocol here (RTP/RTCP headers, DTLS record headers with
    /// their sequence numbers, STUN headers with their transaction ids).
    fn drain(&mut self, i: usize) {
        let mut datagrams = Vec::new();
        loop {
            let out = self.agents[i].agent.poll_output();
            match out {
                Output::Timeout(at) => {
                    self.agents[i].timeout = Some(at);
                    datagrams.sort_by(|a: &Datagram, b: &Datagram| {
                        let key = |d: &Datagram| {
                            (d.destination, d.contents.get(..16).map(<[u8]>::to_vec))
                        };
                        key(a).cmp(&key(b))
                    });
                    for d in datagrams {
                        self.net.send(self.now, d);
                    }
                    return;
                }
                Output::Transmit(t) => {
                    let source = match self.nats.get_mut(&i) {
                        Some(nat) => nat.outbound(t.source, t.destination),
                        None => t.source,
                    };
                    datagrams.push(Datagram {
                        source,
                        destination: t.destination,
                        contents: t.contents,
                    })
                }
                Output::Http { id, request } => {
                    let sync = crypto::is_sync(&request);
                    let faults = self.crypto_faults;
                    let (request, shares) = self.agents[i].crypto.outgoing(request, &faults);
                    self.share_keys(shares);
                    let request = match request {
                        Ok(r) => r,
                        Err(failure) => {
                            let now = self.now;
                            self.agents[i].agent.handle_input(Input::HttpResponse {
                                now,
                                id,
                                response: Err(failure),
                            });
                            continue;
                        }
                    };
                    let ticket = self.next_ticket;
                    self.next_ticket += 1;
                    self.tickets.insert(ticket, i);
                    self.agents[i].http.insert(ticket, (id, sync));
                    let unix = self.unix_ms();
                    self.hs.handle_request(ticket, request, self.now, unix);
                }
                Output::Event(e) => self.on_event(i, e),
            }
        }
    }

    /// Room keys to the homeserver's to-device queue, now or (late-key fault) later.
    fn share_keys(&mut self, shares: Vec<crypto::KeyShare>) {
        for s in shares {
            if s.delay.is_zero() {
                let unix = self.unix_ms();
                self.hs.send_to_device(&s.to, s.event, unix);
            } else {
                self.pending_keys.push((self.now + s.delay, s.to, s.event));
            }
        }
    }

    fn on_event(&mut self, i: usize, e: AgentEvent) {
        let now = self.now;
        let elapsed = self.elapsed();
        match &e {
            AgentEvent::Media(f) => {
                let a = &mut self.agents[i];
                a.stats.frames_received += 1;
                match f.kind {
                    MediaKind::Video => a.stats.video_frames_received += 1,
                    MediaKind::Audio => a.stats.audio_frames_received += 1,
                }
                a.first_media.entry(f.call_id.clone()).or_insert(elapsed);
                if let Some(sink) = &mut a.media_sink {
                    sink(elapsed, f);
                }
                let line = format!(
                    "media {:?} {:?} rtp={} len={}",
                    f.kind,
                    f.codec,
                    f.rtp_time,
                    f.data.len()
                );
                self.record(i, line);
                return;
            }
            AgentEvent::IncomingCall { call_id, .. } if self.agents[i].auto_answer => {
                let id = call_id.clone();
                let line = format!("{e:?}");
                self.record(i, line);
                self.agents[i].events.push((elapsed, e));
                if let Err(err) = self.agents[i].agent.answer(&id, now) {
                    warn!("auto-answer failed: {err}");
                }
                return;
            }
            AgentEvent::CallStateChanged {
                call_id,
                state: CallState::Connected,
            } if self.agents[i].send_media => {
                let plan = MediaPlan::testclip(VideoChoice::Auto);
                let cache = CameraCache::default();
                let media =
                    CallMedia::start(&mut self.agents[i].agent, call_id, &plan, &cache, now);
                self.agents[i].pump = Some(media);
            }
            AgentEvent::CallEnded { call_id, .. }
                if self.agents[i]
                    .pump
                    .as_ref()
                    .is_some_and(|p| &p.call_id == call_id) =>
            {
                self.agents[i].pump = None;
            }
            AgentEvent::KeyframeRequested { call_id } => {
                let a = &mut self.agents[i];
                if let Some(p) = a.pump.as_mut().filter(|p| &p.call_id == call_id) {
                    let _ = p.keyframe_requested(&mut a.agent, &CameraCache::default(), now);
                }
            }
            _ => {}
        }
        let line = match &e {
            // Secrets and device-specific ids stay out of the trace.
            AgentEvent::LoggedIn { .. } => "LoggedIn".to_owned(),
            other => format!("{other:?}"),
        };
        self.record(i, line);
        self.agents[i].events.push((elapsed, e));
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut t = self.net.poll_timeout();
        let mut consider = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t: Instant| t.min(x)));
            }
        };
        consider(self.hs.poll_timeout());
        consider(self.pending_keys.iter().map(|k| k.0).min());
        for a in &self.agents {
            consider(a.timeout);
            if let Some(p) = &a.pump {
                consider(p.next_due());
            }
        }
        t
    }

    /// Advances to the next deadline (not past `limit`) and handles everything due then.
    /// Returns false when nothing is due before `limit`.
    fn step(&mut self, limit: Instant) -> bool {
        let Some(next) = self.next_deadline() else {
            self.now = limit;
            return false;
        };
        if next > limit {
            self.now = limit;
            return false;
        }
        if next <= self.now {
            self.steps_at_instant += 1;
            assert!(
                self.steps_at_instant < MAX_STEPS_AT_ONE_INSTANT,
                "livelock: {} steps at {:?} without time moving",
                self.steps_at_instant,
                self.elapsed()
            );
        } else {
            self.steps_at_instant = 0;
        }
        self.now = self.now.max(next);
        let now = self.now;

        while let Some(d) = self.net.poll_deliver(now) {
            let Some((i, d)) = self.route(now, d) else {
                continue;
            };
            self.agents[i].agent.handle_input(Input::Receive {
                now,
                source: d.source,
                destination: d.destination,
                contents: &d.contents,
            });
            self.drain(i);
        }
        let unix = self.unix_ms();
        // Insertion order among keys due at one instant: deterministic.
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending_keys)
            .into_iter()
            .partition(|k| k.0 <= now);
        self.pending_keys = later;
        for (_, to, event) in due {
            self.hs.send_to_device(&to, event, unix);
        }
        while let Some((ticket, result)) = self.hs.poll_response(now, unix) {
            let Some(i) = self.tickets.remove(&ticket) else {
                continue;
            };
            let Some((id, sync)) = self.agents[i].http.remove(&ticket) else {
                continue;
            };
            let crypto = &mut self.agents[i].crypto;
            let response = result
                .map(|r| {
                    if !sync || !r.status().is_success() {
                        return r;
                    }
                    let (parts, body) = r.into_parts();
                    http::Response::from_parts(parts, crypto.on_sync(body, now))
                })
                .map_err(|e| match e {
                    SimHttpError::Timeout => HttpFailure::Timeout,
                    other => HttpFailure::Connect(format!("{other:?}")),
                });
            self.agents[i]
                .agent
                .handle_input(Input::HttpResponse { now, id, response });
            self.drain(i);
        }
        for i in 0..self.agents.len() {
            self.pump_media(i, now);
            if self.agents[i].timeout.is_some_and(|t| t <= now) {
                self.agents[i].timeout = None;
                self.agents[i].agent.handle_input(Input::Timeout(now));
                self.drain(i);
            }
        }
        true
    }

    fn pump_media(&mut self, i: usize, now: Instant) {
        let a = &mut self.agents[i];
        let Some(pump) = a.pump.as_mut() else {
            return;
        };
        let sent = pump.pump(&mut a.agent, now);
        a.stats.frames_sent += sent;
        if sent > 0 {
            self.drain(i);
        }
    }

    /// Runs the world for `d` of simulated time.
    pub fn run_for(&mut self, d: Duration) {
        let limit = self.now + d;
        while self.step(limit) {}
    }

    /// Runs until `pred` holds (checked after every step) or `max` passes. True if it held.
    pub fn run_until(&mut self, max: Duration, mut pred: impl FnMut(&World) -> bool) -> bool {
        let limit = self.now + max;
        loop {
            if pred(self) {
                return true;
            }
            if !self.step(limit) {
                return pred(self);
            }
        }
    }

    /// Runs until every agent has finished its first sync.
    pub fn run_until_synced(&mut self) -> bool {
        self.run_until(Duration::from_secs(30), |w| {
            w.agents.iter().all(|a| a.agent.is_synced())
        })
    }

    /// FNV-1a over the trace, with lines of one instant sorted (str0m may order events that
    /// share an instant differently; see README "Determinism").
    pub fn trace_hash(&self) -> u64 {
        let mut lines = self.trace.clone();
        lines.sort();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for l in &lines {
            for b in l
                .at_ms
                .to_le_bytes()
                .iter()
                .chain(l.text.as_bytes())
                .chain(b"\n")
            {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }
}
