//! The agent: one Matrix account/device, its calls, and the loop contract.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ruma::{OwnedRoomId, RoomId};
use str0m::net::{Protocol, Receive};
use tracing::{debug, info, warn};

use crate::call::signal::{self, Signal, SignalError};
use crate::call::{Call, CallAction, CallSetup};
use crate::dtls::SeededDtlsProvider;
use crate::limits;
use crate::matrix::{MatrixClient, MatrixEvent, RoomEvent, TurnServers};
use crate::rng::{Rng, Str0mRng};
use crate::stun::StunClient;
use crate::turn::{TurnClient, TurnCredentials, TurnEvent, TurnUri};
use crate::types::{
    AgentConfig, AgentEvent, ApiError, CallDirection, CallId, CallPolicy, CallState, Codec,
    ConfigError, HangupReason, Input, OutgoingFrame, Output, Party,
};

/// Candidates for a call id we have not seen yet.
#[derive(Debug)]
struct Orphans {
    since: Instant,
    lines: Vec<String>,
}

/// Counters of one call, for the driver's reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CallInfo {
    pub state: CallState,
    pub direction: CallDirection,
    pub frames_sent: u64,
    pub frames_received: u64,
    /// Video keyframe requests (PLI/FIR) sent to the peer.
    pub keyframes_requested: u64,
    /// Kinds of the local and remote candidate media flows on (`host`, `srflx`, `relay`,
    /// `prflx`), once connected.
    pub local_candidate: Option<String>,
    pub remote_candidate: Option<String>,
    /// Remote candidates taken (at most `limits::MAX_REMOTE_CANDIDATES`).
    pub remote_candidates: usize,
}

/// A Matrix calling agent. See the crate docs for the loop.
/// A datagram kept for a call still setting up.
#[derive(Debug)]
struct Held {
    at: Instant,
    source: SocketAddr,
    destination: SocketAddr,
    data: Vec<u8>,
}

pub struct Agent {
    config: AgentConfig,
    setup: CallSetup,
    rng: Rng,
    str0m_rng: Str0mRng,
    /// Our party id (one per agent, like matrix-js-sdk's per-device party id).
    party_id: String,
    matrix: MatrixClient,
    calls: BTreeMap<CallId, Call>,
    orphans: BTreeMap<CallId, Orphans>,
    /// Calls the /sync batch being processed answers, rejects or hangs up.
    batch_settled: std::collections::BTreeSet<CallId>,
    panics_caught: u64,
    /// Datagrams that came while a call was setting up and no call took yet ([`Agent::hold`]).
    held: std::collections::VecDeque<Held>,
    events: VecDeque<AgentEvent>,
    dropped_media_events: u64,
    stun: StunClient,
    turn: TurnClient,
    /// The latest `/voip/turnServer` answer.
    turn_servers: Option<TurnServers>,
    now: Instant,
    /// Wall clock anchor: `unix_ms` at `Instant`.
    unix_anchor: (Instant, u64),
}

impl Agent {
    // ---- construction and getters -------------------------------------------------------

    /// A new agent. `seed` drives every random choice (ids, ICE credentials, backoff jitter);
    /// `unix_ms` is the wall-clock time at `now`.
    pub fn new(
        config: AgentConfig,
        seed: u64,
        now: Instant,
        unix_ms: u64,
    ) -> Result<Agent, ConfigError> {
        if !(config.homeserver.starts_with("http://") || config.homeserver.starts_with("https://"))
        {
            return Err(ConfigError::BadHomeserverUrl(config.homeserver.clone()));
        }
        if config.local_addrs.is_empty() {
            return Err(ConfigError::NoLocalAddress);
        }
        if !config.audio && !config.video {
            return Err(ConfigError::NoMedia);
        }
        let mut rng = Rng::new(seed);
        let str0m_rng = Str0mRng::new(rng.u64());
        let crypto = SeededDtlsProvider::crypto_provider(rng.u64());
        let party_id = rng.id(10);
        let mut matrix = MatrixClient::new(
            config.homeserver.clone(),
            config.user_id.clone(),
            config.credentials.clone(),
            config.device_id.clone(),
            config.fetch_turn_servers,
            now,
        );
        matrix.set_run_id(&party_id);
        let mut stun = StunClient::default();
        for server in &config.stun_servers {
            stun.add_server(*server, &config.local_addrs, now, &mut rng);
        }
        let mut turn = TurnClient::default();
        if let Some(t) = &config.turn {
            turn.set_credentials(
                TurnCredentials {
                    username: t.username.clone(),
                    password: t.password.clone(),
                },
                &config.local_addrs,
                now,
            );
            for uri in &t.uris {
                match TurnUri::parse(uri) {
                    Ok(u) => {
                        if let (true, Some(addr)) = (u.is_udp_turn(), u.addr()) {
                            turn.add_server(addr, &config.local_addrs, now);
                        }
                    }
                    Err(e) => warn!("TURN URI {uri:?} ignored: {e}"),
                }
            }
        }
        let setup = CallSetup {
            crypto,
            reflexive: Vec::new(),
            relays: Vec::new(),
            gathering: turn.gathering(),
            relay_only: config.relay_only,
            local_addrs: config.local_addrs.clone(),
            video: config.video,
            h264_profile: config.h264_profile,
            audio: config.audio,
            audio_preference: config.audio_preference,
            lifetime: config.invite_lifetime,
        };
        Ok(Agent {
            config,
            setup,
            rng,
            str0m_rng,
            party_id,
            matrix,
            calls: BTreeMap::new(),
            orphans: BTreeMap::new(),
            batch_settled: std::collections::BTreeSet::new(),
            panics_caught: 0,
            held: VecDeque::new(),
            events: VecDeque::new(),
            dropped_media_events: 0,
            turn_servers: None,
            stun,
            turn,
            now,
            unix_anchor: (now, unix_ms),
        })
    }

    pub fn user_id(&self) -> &ruma::UserId {
        &self.config.user_id
    }

    pub fn party_id(&self) -> &str {
        &self.party_id
    }

    /// True once the first /sync has been processed (rooms known, invites ring).
    pub fn is_synced(&self) -> bool {
        self.matrix.initial_sync_done()
    }

    pub fn call_info(&self, call_id: &str) -> Option<CallInfo> {
        self.calls.get(call_id).map(|c| {
            let pair = c.selected_pair_kinds();
            CallInfo {
                state: c.state,
                direction: c.direction,
                frames_sent: c.stats.frames_sent,
                frames_received: c.stats.frames_received,
                keyframes_requested: c.stats.keyframes_requested,
                local_candidate: pair.as_ref().map(|p| p.0.clone()),
                remote_candidate: pair.map(|p| p.1),
                remote_candidates: c.remote_candidate_count(),
            }
        })
    }

    /// Ids of the calls the agent tracks (ended ones until they are forgotten).
    pub fn call_ids(&self) -> impl Iterator<Item = &CallId> {
        self.calls.keys()
    }

    /// The other member of a 1:1 room, when the agent knows the room.
    pub fn room_peer(&self, room_id: &RoomId) -> Option<ruma::OwnedUserId> {
        self.matrix
            .rooms
            .get(room_id)
            .and_then(|r| r.other_member(self.matrix.user_id()))
    }

    /// Adds STUN servers (e.g. the driver resolved the host names of the homeserver's TURN
    /// URIs); each is probed from every local address of its IP family.
    pub fn add_stun_servers(&mut self, servers: &[std::net::SocketAddr], now: Instant) {
        self.now = now;
        for s in servers {
            self.stun
                .add_server(*s, &self.config.local_addrs, now, &mut self.rng);
        }
    }

    /// Who may ring this agent from now on (a reloaded allow list). Calls in progress and
    /// ringing calls are not touched.
    pub fn set_policy(&mut self, policy: CallPolicy) {
        self.config.policy = policy;
    }

    /// Adds TURN servers (the driver resolved the host names of `turn:` URIs over UDP); a
    /// relay is allocated on each from every local address of its IP family.
    pub fn add_turn_servers(&mut self, servers: &[std::net::SocketAddr], now: Instant) {
        self.now = now;
        for s in servers {
            self.turn.add_server(*s, &self.config.local_addrs, now);
        }
        self.setup.gathering = self.turn.gathering();
    }

    /// True while a TURN allocation is under way (no relay and no failure yet).
    pub fn relays_pending(&self) -> bool {
        self.turn.gathering()
    }

    /// Sends a datagram through every ready relay to ourselves and back (for `check`);
    /// answered by [`AgentEvent::RelayTested`]. Returns how many relays are tested.
    pub fn test_relays(&mut self, now: Instant) -> usize {
        self.now = now;
        self.turn.start_self_test(now, &mut self.rng)
    }

    /// The H.264 profile the video source sends changed (a camera's first keyframe, or a
    /// camera reconfigured): calls from now on offer and answer it; calls in progress keep
    /// what they negotiated.
    pub fn set_h264_profile(&mut self, profile: Option<crate::h264::ProfileLevelId>) {
        self.config.h264_profile = profile;
        self.setup.h264_profile = profile;
    }

    /// The audio codec listed first from now on (see [`AgentConfig::audio_preference`]):
    /// calls from now on offer and answer it first; calls in progress keep what they
    /// negotiated. Only G.711 (PCMU, PCMA) and Opus are audio codecs; anything else is
    /// ignored (Opus first).
    pub fn set_audio_preference(&mut self, codec: Option<Codec>) {
        let codec = codec.filter(|c| matches!(c, Codec::Opus | Codec::Pcmu | Codec::Pcma));
        self.config.audio_preference = codec;
        self.setup.audio_preference = codec;
    }

    /// The TURN servers and credentials from the homeserver, once fetched.
    pub fn turn_servers(&self) -> Option<&TurnServers> {
        self.turn_servers.as_ref()
    }

    /// A 1:1 room (not public) where we and `peer` are the two joined members.
    pub fn find_direct_room(&self, peer: &ruma::UserId) -> Option<OwnedRoomId> {
        self.matrix
            .rooms
            .find_dm(self.matrix.user_id(), &peer.to_owned())
    }

    /// Asks the homeserver for a new direct room with `peer` invited, end-to-end encrypted
    /// when `encrypted` (the core never encrypts: the shell's layer does, once the room's
    /// `m.room.encryption` comes back in the sync); answered by [`AgentEvent::RoomCreated`]
    /// (the call can be placed once the peer has joined: see [`Agent::room_peer`]).
    pub fn create_direct_room(&mut self, peer: &ruma::UserId, encrypted: bool, now: Instant) {
        self.now = now;
        self.matrix.create_dm(peer.to_owned(), encrypted);
    }

    /// Room events waiting for the homeserver.
    pub fn outbox_len(&self) -> usize {
        self.matrix.outbox_len()
    }

    /// Panics of str0m caught on a peer's SDP (each cost one call or invite).
    pub fn panics_caught(&self) -> u64 {
        self.panics_caught
    }

    /// Remote media events dropped because the driver did not drain.
    pub fn dropped_media_events(&self) -> u64 {
        self.dropped_media_events
    }

    fn unix_ms(&self, now: Instant) -> u64 {
        let (at, ms) = self.unix_anchor;
        let delta = now.saturating_duration_since(at).as_millis() as u64;
        ms.saturating_add(delta)
    }

    /// Runs `f` with the agent's own state in fastrand's thread-local generator (str0m's RNG).
    fn with_rng<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let mut state = *self.str0m_rng.state_mut();
        let r = Str0mRng::scope(&mut state, || f(self));
        *self.str0m_rng.state_mut() = state;
        r
    }

    // ---- inputs -----------------------------------------------------------------------------

    /// Feeds one input. Then drain [`Agent::poll_output`] until it gives a timeout.
    pub fn handle_input(&mut self, input: Input) {
        self.with_rng(|a| a.handle_input_inner(input));
    }

    fn handle_input_inner(&mut self, input: Input) {
        match input {
            Input::Timeout(now) => {
                self.now = now;
                self.matrix.handle_timeout(now, &mut self.rng);
                self.turn.handle_timeout(now, &mut self.rng);
                for call in self.calls.values_mut() {
                    call.handle_timeout(now);
                }
                self.retry_held(now);
                let forget: Vec<CallId> = self
                    .calls
                    .iter()
                    .filter(|(_, c)| c.is_forgettable(now))
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in forget {
                    debug!(call_id = %id, "forgetting ended call");
                    self.calls.remove(&id);
                }
                self.orphans.retain(|_, o| {
                    now.saturating_duration_since(o.since) < limits::ORPHAN_CANDIDATES_TTL
                });
            }
            Input::Receive {
                now,
                source,
                destination,
                contents,
            } => {
                self.now = now;
                // Answers to our own STUN requests first: str0m does not expect them.
                if let Some(learned) = self.stun.handle_receive(source, destination, contents) {
                    if let Some(r) = learned {
                        self.setup.reflexive.push(r);
                        self.push_event(AgentEvent::ReflexiveAddress {
                            local: r.local,
                            mapped: r.mapped,
                        });
                    }
                    return;
                }
                // Then our TURN servers: answers, and peers' datagrams through a relay.
                let relayed =
                    self.turn
                        .handle_receive(source, destination, contents, now, &mut self.rng);
                let (source, destination, contents) = match &relayed {
                    None if self.turn.handle_plain(source, destination, contents) => {
                        self.process();
                        return;
                    }
                    None => (source, destination, contents),
                    Some(None) => {
                        self.process();
                        return;
                    }
                    Some(Some(r)) => (r.peer, r.relay, r.data.as_slice()),
                };
                let receive = match Receive::new(Protocol::Udp, source, destination, contents) {
                    Ok(r) => r,
                    Err(e) => {
                        debug!(len = contents.len(), "unparsable datagram dropped: {e}");
                        return;
                    }
                };
                let input = str0m::Input::Receive(now, receive);
                match self.calls.values_mut().find(|c| c.accepts(&input)) {
                    Some(call) => {
                        call.handle_receive(now, input);
                        self.retry_held(now);
                    }
                    None => self.hold(now, source, destination, contents),
                }
            }
            Input::HttpResponse { now, id, response } => {
                self.now = now;
                self.matrix
                    .handle_response(now, id, response, &mut self.rng);
            }
            Input::UnixTime { now, unix_ms } => {
                self.now = now;
                self.unix_anchor = (now, unix_ms);
            }
        }
        self.process();
    }

    /// Keeps a datagram no call takes yet, when a call is still setting up: a peer's DTLS
    /// hello can come just before str0m has a working ICE pair to that address (it then
    /// drops it, and the peer resends only ~0.5 s later). STUN is never kept.
    fn hold(&mut self, now: Instant, source: SocketAddr, destination: SocketAddr, data: &[u8]) {
        let setting_up = self
            .calls
            .values()
            .any(|c| matches!(c.state, CallState::InviteSent | CallState::Connecting));
        let stun = data.first().is_some_and(|b| *b < 2);
        if !setting_up || stun || data.len() > limits::HELD_DATAGRAM_MAX_LEN {
            debug!(len = data.len(), "datagram for no call dropped");
            return;
        }
        if self.held.len() >= limits::HELD_DATAGRAMS {
            self.held.pop_front();
        }
        self.held.push_back(Held {
            at: now,
            source,
            destination,
            data: data.to_vec(),
        });
    }

    /// Hands kept datagrams to the call that takes them now; drops those kept too long.
    fn retry_held(&mut self, now: Instant) {
        if self.held.is_empty() {
            return;
        }
        for h in std::mem::take(&mut self.held) {
            let Ok(receive) = Receive::new(Protocol::Udp, h.source, h.destination, &h.data) else {
                continue;
            };
            let input = str0m::Input::Receive(now, receive);
            if let Some(call) = self.calls.values_mut().find(|c| c.accepts(&input)) {
                debug!(len = h.data.len(), "kept datagram taken by its call");
                call.handle_receive(now, input);
            } else if now < h.at + limits::HELD_DATAGRAM_TTL {
                self.held.push_back(h);
            } else {
                debug!(len = h.data.len(), "datagram for no call dropped");
            }
        }
    }

    /// Moves matrix events into the calls and call actions into the outbox / event queue.
    fn process(&mut self) {
        self.process_turn();
        loop {
            // A whole /sync batch at once: the spec's call event liveness looks at all of it
            // before ringing (an invite it already answers or ends is not rung).
            let batch: Vec<MatrixEvent> = std::iter::from_fn(|| self.matrix.poll_event()).collect();
            if batch.is_empty() {
                break;
            }
            self.batch_settled = settled_calls(&batch);
            for ev in batch {
                self.on_matrix_event(ev);
            }
            self.batch_settled.clear();
        }
        self.drain_call_actions();
    }

    fn on_matrix_event(&mut self, ev: MatrixEvent) {
        {
            match ev {
                MatrixEvent::LoggedIn {
                    user_id,
                    device_id,
                    access_token,
                } => self.push_event(AgentEvent::LoggedIn {
                    user_id,
                    device_id,
                    access_token,
                }),
                MatrixEvent::LoginFailed(message) => {
                    self.push_event(AgentEvent::LoginFailed { message })
                }
                MatrixEvent::Reachable(r) => self.push_event(AgentEvent::HomeserverReachable(r)),
                MatrixEvent::InitialSyncDone => self.push_event(AgentEvent::Synced),
                MatrixEvent::Timeline(ev) => self.on_room_event(ev),
                MatrixEvent::TurnServers(t) => {
                    debug!(uris = t.uris.len(), ttl = ?t.ttl, "TURN credentials refreshed");
                    let now = self.now;
                    let from_homeserver = self.config.turn.is_none();
                    if from_homeserver {
                        self.turn.set_credentials(
                            TurnCredentials {
                                username: t.username.clone(),
                                password: t.password.clone(),
                            },
                            &self.config.local_addrs,
                            now,
                        );
                    }
                    for uri in &t.uris {
                        let u = match TurnUri::parse(uri) {
                            Ok(u) => u,
                            Err(e) => {
                                warn!("TURN URI from the homeserver ignored: {e}");
                                continue;
                            }
                        };
                        let Some(server) = u.addr() else {
                            debug!("TURN URI with a host name: the driver resolves it");
                            continue;
                        };
                        if u.is_udp_stun() {
                            self.stun.add_server(
                                server,
                                &self.config.local_addrs,
                                now,
                                &mut self.rng,
                            );
                        }
                        if u.is_udp_turn() && from_homeserver {
                            self.turn.add_server(server, &self.config.local_addrs, now);
                        }
                    }
                    self.setup.gathering = self.turn.gathering();
                    self.turn_servers = Some(t);
                }
                MatrixEvent::Invited { room_id, inviter } => {
                    let allowed = match &self.config.policy {
                        CallPolicy::Anyone => true,
                        CallPolicy::Allow(list) => list.contains(&inviter),
                    };
                    if allowed {
                        info!(%room_id, "joining a room we were invited to");
                        self.matrix.join(room_id);
                    } else {
                        info!(%room_id, "invite from a user not on the allow list ignored");
                    }
                }
                MatrixEvent::RoomCreated { room_id, peer } => {
                    self.push_event(AgentEvent::RoomCreated { room_id, peer })
                }
                MatrixEvent::RoomRequestFailed { what } => {
                    self.push_event(AgentEvent::RoomRequestFailed { message: what })
                }
                MatrixEvent::SendGaveUp { call_id } => {
                    let now = self.now;
                    if let Some(call) = call_id.and_then(|id| self.calls.get_mut(&id)) {
                        if call.state != CallState::Ended {
                            call.end(HangupReason::UnknownError, Party::Local, now);
                        }
                    }
                }
            }
        }
    }

    /// TURN allocations that came or went: relay candidates for the calls.
    fn process_turn(&mut self) {
        let now = self.now;
        while let Some(ev) = self.turn.poll_event() {
            match ev {
                TurnEvent::Allocated {
                    local,
                    server,
                    relay,
                    mapped,
                } => {
                    if !self.setup.relays.contains(&(relay, local)) {
                        self.setup.relays.push((relay, local));
                    }
                    for call in self.calls.values_mut() {
                        call.add_relay(relay, local, now);
                    }
                    self.push_event(AgentEvent::RelayAllocated {
                        server,
                        local,
                        relay,
                        mapped,
                    });
                }
                TurnEvent::Failed {
                    server,
                    code,
                    reason,
                    ..
                } => self.push_event(AgentEvent::RelayFailed {
                    server,
                    code,
                    reason,
                }),
                TurnEvent::SelfTest { relay, outbound } => {
                    self.push_event(AgentEvent::RelayTested { relay, outbound })
                }
                TurnEvent::Lost { relay } => {
                    self.setup.relays.retain(|(r, _)| *r != relay);
                    self.push_event(AgentEvent::RelayLost { relay });
                }
            }
        }
        let gathering = self.turn.gathering();
        if self.setup.gathering && !gathering {
            for call in self.calls.values_mut() {
                call.end_of_candidates(now);
            }
        }
        self.setup.gathering = gathering;
    }

    fn drain_call_actions(&mut self) {
        // Field by field, so no list of call ids is cloned on this hot path.
        let now = self.now;
        for call in self.calls.values_mut() {
            while let Some(action) = call.poll_action() {
                match action {
                    CallAction::Event(e) => {
                        if matches!(e, AgentEvent::PanicCaught { .. }) {
                            self.panics_caught += 1;
                        }
                        push_event(&mut self.events, &mut self.dropped_media_events, e)
                    }
                    CallAction::Send {
                        room_id,
                        event_type,
                        content,
                    } => {
                        let txn = format!("ca{}", self.rng.id(16));
                        if self
                            .matrix
                            .send_event(room_id, event_type, content, txn)
                            .is_err()
                            && event_type != "m.call.candidates"
                        {
                            call.end(HangupReason::UnknownError, Party::Local, now);
                        }
                    }
                }
            }
        }
    }

    fn push_event(&mut self, e: AgentEvent) {
        push_event(&mut self.events, &mut self.dropped_media_events, e);
    }

    fn on_room_event(&mut self, ev: RoomEvent) {
        let now = self.now;
        let signal = match signal::parse(&ev.event_type, &ev.content) {
            Ok(s) => s,
            Err(SignalError::Unhandled(t)) => {
                debug!(event_type = %t, "call event type not handled");
                return;
            }
            Err(e) => {
                warn!(event_type = %ev.event_type, "dropped malformed call event: {e}");
                return;
            }
        };
        let from_self = ev.sender == self.config.user_id;
        let party = signal.party_id().map(str::to_owned);
        if from_self && party.as_deref() == Some(self.party_id.as_str()) {
            return; // our own echo
        }
        let call_id = signal.call_id().to_owned();
        debug!(%call_id, signal = signal.name(), from_self, "call event");

        if let Signal::Invite(inv) = signal {
            if !from_self {
                self.on_invite(&ev, inv, now);
            }
            return;
        }

        let Some(call) = self.calls.get_mut(&call_id) else {
            if let Signal::Candidates(c) = &signal {
                if from_self {
                    return;
                }
                self.keep_orphans(
                    &call_id,
                    c.candidates.iter().map(|c| c.candidate.clone()),
                    now,
                );
            } else {
                debug!(%call_id, signal = signal.name(), "event for an unknown call ignored");
            }
            return;
        };

        if from_self {
            // Another device of ours took the call: stop ringing here.
            if matches!(
                signal,
                Signal::Answer(_) | Signal::Reject(_) | Signal::Hangup(_)
            ) {
                call.handled_elsewhere(now);
            }
            self.drain_call_actions();
            return;
        }
        if ev.sender != call.peer {
            debug!(%call_id, "call event from a third user ignored");
            return;
        }
        let party = party.as_deref();
        match signal {
            Signal::Invite(_) => {}
            Signal::Answer(a) => {
                if call.direction == CallDirection::Outbound {
                    call.on_answer(party.map(str::to_owned), &a.answer.sdp, now);
                }
            }
            Signal::Candidates(c) => call.on_candidates(party, &c.candidates),
            Signal::SelectAnswer(s) => {
                call.on_select_answer(party, s.selected_party_id.as_str(), now)
            }
            Signal::Reject(_) => call.on_reject(party, now),
            Signal::Negotiate(n) => {
                call.on_negotiate(party, &n.description.session_type, &n.description.sdp, now)
            }
            Signal::Hangup(h) => {
                call.on_hangup(party, HangupReason::from_wire(h.reason.as_str()), now)
            }
        }
        self.drain_call_actions();
    }

    /// An invite we cannot take is answered at once, so the caller's client shows it:
    /// `m.call.reject` (version 1), or a hangup with `reason` for version 0 peers.
    fn refuse_invite(
        &mut self,
        ev: &RoomEvent,
        call_id: &str,
        peer_v0: bool,
        reason: HangupReason,
    ) {
        let (event_type, content) = if peer_v0 {
            (
                "m.call.hangup",
                serde_json::json!({"call_id": call_id, "version": "0", "reason": reason.as_str()}),
            )
        } else {
            (
                "m.call.reject",
                serde_json::json!({"call_id": call_id, "party_id": self.party_id, "version": "1"}),
            )
        };
        let txn = format!("ca{}", self.rng.id(16));
        if self
            .matrix
            .send_event(ev.room_id.clone(), event_type, content, txn)
            .is_err()
        {
            warn!(%call_id, "the refusal could not be queued");
        }
    }

    fn keep_orphans(&mut self, call_id: &str, lines: impl Iterator<Item = String>, now: Instant) {
        if !self.orphans.contains_key(call_id) && self.orphans.len() >= limits::MAX_ORPHAN_CALLS {
            let oldest = self
                .orphans
                .iter()
                .min_by_key(|(_, o)| o.since)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.orphans.remove(&k);
            }
        }
        let o = self.orphans.entry(call_id.to_owned()).or_insert(Orphans {
            since: now,
            lines: Vec::new(),
        });
        for l in lines {
            if o.lines.len() < limits::MAX_BUFFERED_CANDIDATES {
                o.lines.push(l);
            }
        }
        debug!(%call_id, kept = o.lines.len(), "candidates before their invite kept");
    }

    fn on_invite(
        &mut self,
        ev: &RoomEvent,
        inv: ruma::events::call::invite::CallInviteEventContent,
        now: Instant,
    ) {
        let call_id = inv.call_id.to_string();
        if self.calls.contains_key(&call_id) {
            debug!(%call_id, "invite for a known call ignored (replay)");
            return;
        }
        if self.batch_settled.contains(&call_id) {
            info!(%call_id, "invite already answered, rejected or hung up in the same sync: not rung");
            return;
        }
        let lifetime = Duration::from_millis(u64::from(inv.lifetime));
        let age = Duration::from_millis(
            ev.age_ms
                .unwrap_or_else(|| self.unix_ms(now).saturating_sub(ev.origin_server_ts)),
        );
        let Some(remaining) = lifetime.checked_sub(age).filter(|d| !d.is_zero()) else {
            info!(%call_id, ?age, ?lifetime, "expired invite ignored");
            return;
        };
        if let Some(invitee) = &inv.invitee {
            if *invitee != self.config.user_id {
                info!(%call_id, "invite for another user ignored");
                return;
            }
        }
        let room = self.matrix.rooms.get(&ev.room_id);
        match room {
            Some(r) if r.public => {
                info!(%call_id, "invite in a public room ignored");
                return;
            }
            Some(r) if r.member_count() > 2 => {
                info!(%call_id, members = r.member_count(), "invite in a room with more than 2 members ignored");
                return;
            }
            _ => {}
        }
        if let CallPolicy::Allow(allowed) = &self.config.policy {
            if !allowed.contains(&ev.sender) {
                info!(%call_id, "invite from a user not on the allow list ignored");
                return;
            }
        }
        // Glare: we are calling the same user in the same room.
        let glare = self
            .calls
            .values()
            .find(|c| {
                c.direction == CallDirection::Outbound
                    && c.state == CallState::InviteSent
                    && c.room_id == ev.room_id
                    && c.peer == ev.sender
            })
            .map(|c| c.id.clone());
        if let Some(ours) = &glare {
            if *ours < call_id {
                info!(%call_id, ours = %ours, "glare: our call id is lesser; their invite ignored");
                return;
            }
        }
        // A caller who retries gets through: their earlier unconnected invite in this room
        // gives way to the new one.
        for c in self.calls.values_mut() {
            let unconnected = matches!(c.state, CallState::Ringing | CallState::Connecting);
            if c.direction == CallDirection::Inbound
                && unconnected
                && c.peer == ev.sender
                && c.room_id == ev.room_id
            {
                info!(call_id = %c.id, new = %call_id, "the caller's new invite replaces this unconnected call");
                c.hangup(HangupReason::UserHangup, now);
            }
        }
        self.drain_call_actions();
        let from_peer = self
            .calls
            .values()
            .filter(|c| c.direction == CallDirection::Inbound && c.peer == ev.sender)
            .filter(|c| matches!(c.state, CallState::Ringing | CallState::Connecting))
            .count();
        let live = self
            .calls
            .values()
            .filter(|c| c.state != CallState::Ended)
            .count();
        if live >= limits::MAX_CALLS || from_peer >= limits::MAX_UNCONNECTED_PER_PEER {
            warn!(%call_id, live, from_peer, "busy: invite answered with a rejection");
            self.refuse_invite(ev, &call_id, inv.party_id.is_none(), HangupReason::UserBusy);
            return;
        }
        let call = Call::inbound(
            call_id.clone(),
            ev.room_id.clone(),
            ev.sender.clone(),
            inv.party_id.as_ref().map(|p| p.to_string()),
            &inv.offer.sdp,
            remaining,
            self.party_id.clone(),
            &self.setup,
            now,
        );
        let mut call = match call {
            Ok(c) => c,
            Err(e) => {
                // Never left ringing into silence: the caller hears at once that it failed.
                warn!(%call_id, "invite refused: {e}");
                if matches!(e, crate::call::InviteRefused::Panicked) {
                    self.panics_caught += 1;
                    self.push_event(AgentEvent::PanicCaught {
                        call_id: Some(call_id.clone()),
                        during: "invite",
                    });
                }
                self.refuse_invite(
                    ev,
                    &call_id,
                    inv.party_id.is_none(),
                    HangupReason::UnknownError,
                );
                return;
            }
        };
        if let Some(o) = self.orphans.remove(&call_id) {
            for line in &o.lines {
                call.add_remote_candidate(line);
            }
        }
        let video = call.remote_video;
        self.calls.insert(call_id.clone(), call);
        self.push_event(AgentEvent::IncomingCall {
            call_id: call_id.clone(),
            room_id: ev.room_id.clone(),
            from: ev.sender.clone(),
            video,
        });
        self.push_event(AgentEvent::CallStateChanged {
            call_id: call_id.clone(),
            state: CallState::Ringing,
        });
        if let Some(ours) = glare {
            info!(%call_id, ours = %ours, "glare: their call id is lesser; answering theirs");
            if let Some(c) = self.calls.get_mut(&ours) {
                c.end(HangupReason::Replaced, Party::Local, now);
            }
            let setup = self.setup.clone();
            if let Some(c) = self.calls.get_mut(&call_id) {
                if let Err(e) = c.answer(&setup, now) {
                    warn!(%call_id, "glare answer failed: {e}");
                }
            }
            self.push_event(AgentEvent::CallReplaced {
                old: ours,
                new: call_id,
            });
        }
        self.drain_call_actions();
    }

    // ---- commands ---------------------------------------------------------------------------

    /// Places a video/audio call in a 1:1 room. Needs the room from /sync (see `is_synced`).
    pub fn place_call(&mut self, room_id: &RoomId, now: Instant) -> Result<CallId, ApiError> {
        self.with_rng(|a| a.place_call_inner(room_id, now))
    }

    fn place_call_inner(&mut self, room_id: &RoomId, now: Instant) -> Result<CallId, ApiError> {
        self.now = now;
        let peer = self
            .room_peer(room_id)
            .ok_or_else(|| ApiError::NotOneToOne(OwnedRoomId::from(room_id)))?;
        let live = self
            .calls
            .values()
            .filter(|c| c.state != CallState::Ended)
            .count();
        if live >= limits::MAX_CALLS {
            return Err(ApiError::TooManyCalls);
        }
        let call_id = self.rng.id(16);
        let call = Call::outbound(
            call_id.clone(),
            room_id.to_owned(),
            peer.clone(),
            Some(peer),
            self.party_id.clone(),
            &self.setup,
            now,
        )?;
        info!(%call_id, "placing call");
        self.calls.insert(call_id.clone(), call);
        self.drain_call_actions();
        Ok(call_id)
    }

    /// Answers a ringing call.
    pub fn answer(&mut self, call_id: &str, now: Instant) -> Result<(), ApiError> {
        self.with_rng(|a| {
            a.now = now;
            let setup = a.setup.clone();
            a.call_mut(call_id)?.answer(&setup, now)?;
            a.drain_call_actions();
            Ok(())
        })
    }

    /// Hangs up (or, when ringing, rejects) a call with `user_hangup`.
    pub fn hangup(&mut self, call_id: &str, now: Instant) -> Result<(), ApiError> {
        self.with_rng(|a| {
            a.now = now;
            let call = a.call_mut(call_id)?;
            if call.state == CallState::Ended {
                return Err(ApiError::WrongState {
                    call_id: call_id.to_owned(),
                    state: CallState::Ended,
                });
            }
            call.hangup(HangupReason::UserHangup, now);
            a.drain_call_actions();
            Ok(())
        })
    }

    /// Hangs up every call that is not ended (for shutdown).
    pub fn hangup_all(&mut self, now: Instant) {
        self.now = now;
        self.turn.delete_all(now, &mut self.rng);
        let ids: Vec<CallId> = self
            .calls
            .iter()
            .filter(|(_, c)| c.state != CallState::Ended)
            .map(|(k, _)| k.clone())
            .collect();
        for id in ids {
            let _ = self.hangup(&id, now);
        }
    }

    /// Renegotiates a connected call (m.call.negotiate with an ICE restart).
    pub fn renegotiate(&mut self, call_id: &str, now: Instant) -> Result<(), ApiError> {
        self.with_rng(|a| {
            a.now = now;
            a.call_mut(call_id)?.renegotiate()?;
            a.drain_call_actions();
            Ok(())
        })
    }

    /// Sends one frame of local media. `Ok(false)`: the call is not connected, frame dropped.
    pub fn write_media(
        &mut self,
        call_id: &str,
        now: Instant,
        frame: OutgoingFrame,
    ) -> Result<bool, ApiError> {
        self.with_rng(|a| {
            a.now = now;
            a.call_mut(call_id)?.write_media(now, frame)
        })
    }

    /// Asks the peer of a connected call for a video keyframe (PLI/FIR), at most once per
    /// [`limits::KEYFRAME_REQUEST_INTERVAL`](crate::limits::KEYFRAME_REQUEST_INTERVAL).
    /// `Ok(false)`: not connected, no video, or asked too recently. The agent also asks on
    /// its own after a loss in the peer's video.
    ///
    /// # Errors
    /// [`ApiError::UnknownCall`].
    pub fn request_keyframe(&mut self, call_id: &str, now: Instant) -> Result<bool, ApiError> {
        self.with_rng(|a| {
            a.now = now;
            Ok(a.call_mut(call_id)?.request_keyframe(now))
        })
    }

    /// Sends DTMF digits (`0-9 * # A-D`, at most [`limits::MAX_DTMF_DIGITS`]) into a connected
    /// call as RFC 4733 telephone events, one after another: each a
    /// [`limits::DTMF_TONE`](crate::limits::DTMF_TONE) tone, then a
    /// [`limits::DTMF_GAP`](crate::limits::DTMF_GAP) pause, timed by the agent's timeout.
    /// Digits sent while earlier ones still play queue behind them.
    ///
    /// # Errors
    /// [`ApiError::UnknownCall`]; [`ApiError::WrongState`] unless connected;
    /// [`ApiError::Dtmf`] for bad digits, a full queue, or a peer without telephone-event.
    pub fn send_dtmf(&mut self, call_id: &str, digits: &str, now: Instant) -> Result<(), ApiError> {
        let codes = crate::call::parse_digits(digits).map_err(ApiError::Dtmf)?;
        self.with_rng(|a| {
            a.now = now;
            a.call_mut(call_id)?.send_dtmf(&codes, now)
        })
    }

    /// Codecs negotiated for sending media of `kind` in a call.
    pub fn send_codecs(
        &mut self,
        call_id: &str,
        kind: str0m::media::MediaKind,
    ) -> Result<Vec<crate::types::Codec>, ApiError> {
        Ok(self.call_mut(call_id)?.send_codecs(kind))
    }

    fn call_mut(&mut self, call_id: &str) -> Result<&mut Call, ApiError> {
        self.calls
            .get_mut(call_id)
            .ok_or_else(|| ApiError::UnknownCall(call_id.to_owned()))
    }

    // ---- output -----------------------------------------------------------------------------

    /// The next thing to do. Drain until [`Output::Timeout`].
    pub fn poll_output(&mut self) -> Output {
        self.with_rng(|a| a.poll_output_inner())
    }

    fn poll_output_inner(&mut self) -> Output {
        'again: loop {
            if let Some(e) = self.events.pop_front() {
                return Output::Event(e);
            }
            let now = self.now;
            // The first call with a datagram to send or actions to carry out (no list of
            // call ids is built: this runs for every packet).
            let mut transmit = None;
            let mut acted = false;
            for call in self.calls.values_mut() {
                transmit = call.poll_transmit(now);
                acted = call.has_actions();
                if transmit.is_some() || acted {
                    break;
                }
            }
            if transmit.is_some() || acted {
                self.drain_call_actions();
                if let Some(t) = transmit {
                    if self.turn.is_relay(t.source) {
                        match self.turn.send(
                            t.source,
                            t.destination,
                            &t.contents,
                            now,
                            &mut self.rng,
                        ) {
                            Some(Some(wrapped)) => return Output::Transmit(wrapped),
                            // Waits for its channel (or no longer has a relay): look again.
                            _ => continue 'again,
                        }
                    }
                    return Output::Transmit(t);
                }
                // Its events go out first; then the calls are looked at again.
                continue 'again;
            }
            if let Some(t) = self.stun.poll_transmit(now) {
                return Output::Transmit(t);
            }
            if let Some(t) = self.turn.poll_queued(&mut self.rng) {
                return Output::Transmit(t);
            }
            if let Some(t) = self.turn.poll_transmit(now) {
                return Output::Transmit(t);
            }
            if let Some((id, request)) = self.matrix.poll_request(now) {
                return Output::Http { id, request };
            }
            let mut next = self.matrix.poll_timeout();
            for t in [self.stun.poll_timeout(), self.turn.poll_timeout()]
                .into_iter()
                .flatten()
            {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
            for c in self.calls.values() {
                next = match (next, c.poll_timeout()) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            if let Some(o) = self.orphans.values().map(|o| o.since).min() {
                let at = o + limits::ORPHAN_CANDIDATES_TTL;
                next = Some(next.map_or(at, |n| n.min(at)));
            }
            // Never return a deadline in the past: the driver would spin.
            let at = next.unwrap_or(now + Duration::from_secs(3600)).max(now);
            return Output::Timeout(at);
        }
    }
}

/// Queues an agent event; when the queue is full, remote media frames give way (counted),
/// call events never do.
fn push_event(events: &mut VecDeque<AgentEvent>, dropped_media: &mut u64, e: AgentEvent) {
    if events.len() >= limits::MAX_PENDING_EVENTS {
        if matches!(e, AgentEvent::Media(_)) {
            *dropped_media += 1;
            return;
        }
        // Make room by dropping the oldest media frame; call events are never dropped.
        if let Some(i) = events
            .iter()
            .position(|e| matches!(e, AgentEvent::Media(_)))
        {
            events.remove(i);
            *dropped_media += 1;
        }
    }
    events.push_back(e);
}

/// Call ids that a batch of events answers, rejects or hangs up (by anyone).
fn settled_calls(batch: &[MatrixEvent]) -> std::collections::BTreeSet<CallId> {
    batch
        .iter()
        .filter_map(|ev| match ev {
            MatrixEvent::Timeline(e)
                if matches!(
                    e.event_type.as_str(),
                    "m.call.answer" | "m.call.reject" | "m.call.hangup"
                ) =>
            {
                e.content.get("call_id")?.as_str().map(str::to_owned)
            }
            _ => None,
        })
        .collect()
}
