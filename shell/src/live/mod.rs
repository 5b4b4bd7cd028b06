//! The live driver: the same core on real UDP sockets, a real clock and a real homeserver.
//!
//! smol runs everything on the calling thread except HTTP: reqwest needs a tokio reactor, so
//! each request runs inside `async_compat::Compat`, which keeps one tokio runtime thread in the
//! background. Every input reaches the agent through one channel; the loop drains the agent,
//! then waits for the channel or the next deadline.

mod check;
pub mod config;
pub(crate) mod media;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use call_assist_core::turn::TurnUri;
use call_assist_core::{
    Agent, AgentConfig, AgentEvent, CallPolicy, CallState, Credentials, HttpFailure, HttpId, Input,
    MediaKind, Output, Party, Secret, StaticTurn,
};
use futures_lite::{FutureExt, StreamExt};
use serde_json::json;
use smol::channel::{Receiver, Sender};
use smol::Async;
use tracing::{debug, error, info, warn};

use self::config::{Auth, LiveOptions, Mode, SavedSession, Target};
use self::media::LiveMedia;
use crate::media::rtsp::{CameraEvent, RtspError};

/// Exit codes of `call` and `listen`.
pub mod exit {
    pub const OK: u8 = 0;
    pub const NOT_CONNECTED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const LOGIN_REFUSED: u8 = 3;
    pub const UNREACHABLE: u8 = 4;
    pub const NO_SUCH_ROOM: u8 = 5;
    /// The camera refused our credentials, or has nothing we can send.
    pub const MEDIA_SOURCE: u8 = 6;
}

/// How long start-up waits for a camera's first keyframe (its H.264 profile goes into our
/// SDP); after that the agent starts anyway and the camera joins calls when it comes up.
const CAMERA_START_WAIT: Duration = Duration::from_secs(10);
/// Camera events queued before the camera task waits.
const CAMERA_QUEUE: usize = 256;

/// How long the homeserver may stay unreachable before the first sync (then exit 4).
const STARTUP_UNREACHABLE_GRACE: Duration = Duration::from_secs(10);
/// How long `call --to` waits for the peer to join a new direct room.
const PEER_JOIN_WAIT: Duration = Duration::from_secs(60);
/// After a hangup on shutdown, how long to wait for the homeserver to take the events.
pub(crate) const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);
/// Largest response body read from the homeserver.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Datagrams queued from the sockets before the loop takes them (then the readers wait).
const INBOX: usize = 1024;

enum Msg {
    Datagram {
        local: SocketAddr,
        from: SocketAddr,
        data: Vec<u8>,
    },
    Http {
        id: HttpId,
        response: Result<http::Response<Vec<u8>>, HttpFailure>,
    },
    Shutdown,
    /// Resolved host names of STUN/TURN URIs.
    Servers {
        stun: Vec<SocketAddr>,
        turn: Vec<SocketAddr>,
    },
    Camera(CameraEvent),
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Local addresses to receive media on, from the interfaces and the options.
fn gather_ips(opts: &LiveOptions) -> Vec<IpAddr> {
    local_ips(
        &opts.interfaces,
        &opts.exclude_interfaces,
        opts.allow_loopback,
    )
}

/// Addresses of the host's interfaces: only `interfaces` when given, never `exclude`,
/// loopback only when allowed, never link-local.
pub(crate) fn local_ips(
    interfaces: &[String],
    exclude: &[String],
    allow_loopback: bool,
) -> Vec<IpAddr> {
    let ifaces = match if_addrs::get_if_addrs() {
        Ok(i) => i,
        Err(e) => {
            warn!("cannot list network interfaces: {e}");
            Vec::new()
        }
    };
    let mut ips: Vec<IpAddr> = ifaces
        .iter()
        .filter(|i| interfaces.is_empty() || interfaces.contains(&i.name))
        .filter(|i| !exclude.contains(&i.name))
        .filter(|i| allow_loopback || !i.is_loopback())
        .filter(|i| !i.is_link_local())
        .map(|i| i.ip())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// Turns the core's HTTP request into a reqwest call and the answer back into bytes.
pub(crate) async fn run_http(
    client: reqwest::Client,
    request: http::Request<Vec<u8>>,
) -> Result<http::Response<Vec<u8>>, HttpFailure> {
    let request =
        reqwest::Request::try_from(request).map_err(|e| HttpFailure::Other(e.to_string()))?;
    let mut response = client.execute(request).await.map_err(|e| {
        if e.is_timeout() {
            HttpFailure::Timeout
        } else if e.is_connect() {
            HttpFailure::Connect(e.to_string())
        } else {
            HttpFailure::Other(e.to_string())
        }
    })?;
    let mut out = http::Response::builder().status(response.status());
    for (k, v) in response.headers() {
        out = out.header(k, v);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| HttpFailure::Other(e.to_string()))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(HttpFailure::Other("response body too large".into()));
        }
        body.extend_from_slice(&chunk);
    }
    out.body(body)
        .map_err(|e| HttpFailure::Other(e.to_string()))
}

/// Per-process counters for the once-a-second stats line.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    packets_sent: u64,
    packets_received: u64,
    bytes_sent: u64,
    bytes_received: u64,
    video_frames_received: u64,
    audio_frames_received: u64,
}

/// What the run is waiting for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Starting,
    /// `call --to`: a direct room was asked for / exists, waiting for the peer to join.
    WaitingForRoom {
        room: Option<call_assist_core::OwnedRoomId>,
        since: Instant,
    },
    Running,
    /// Hanging up and flushing the outbox before exit.
    ShuttingDown {
        since: Instant,
    },
    Done,
}

struct Run {
    opts: LiveOptions,
    agent: Agent,
    sockets: BTreeMap<SocketAddr, Arc<Async<UdpSocket>>>,
    tx: Sender<Msg>,
    client: reqwest::Client,
    phase: Phase,
    exit: u8,
    counters: Counters,
    media: LiveMedia,
    h264_profile: Option<call_assist_core::h264::ProfileLevelId>,
    hangup_at: BTreeMap<String, Instant>,
    placed_at: BTreeMap<String, Instant>,
    first_media: BTreeMap<String, Duration>,
    connected: BTreeMap<String, bool>,
    ended: u32,
    last_reason: Option<String>,
    unreachable_since: Option<Instant>,
    synced: bool,
    next_stats: Instant,
    /// The homeserver's TURN URIs whose host names were last resolved.
    turn_uris_seen: Vec<String>,
    password_fallback: Option<call_assist_core::Secret>,
    /// `check` mode: no calls, a report of what works.
    check: Option<check::Check>,
}

impl Run {
    fn print(&self, v: serde_json::Value) {
        if self.opts.json {
            println!("{v}");
        }
    }

    fn say(&self, line: &str) {
        if !self.opts.json {
            println!("{line}");
        }
    }

    fn finish(&mut self, code: u8) {
        if self.phase != Phase::Done {
            self.exit = code;
            self.phase = Phase::Done;
        }
    }

    /// Drains the agent until it waits; returns its deadline.
    fn drain(&mut self, now: Instant) -> Instant {
        loop {
            match self.agent.poll_output() {
                Output::Timeout(at) => return at,
                Output::Transmit(t) => {
                    let Some(sock) = self.sockets.get(&t.source) else {
                        debug!(source = %t.source, "no socket for transmit source");
                        continue;
                    };
                    match sock.get_ref().send_to(&t.contents, t.destination) {
                        Ok(n) => {
                            self.counters.packets_sent += 1;
                            self.counters.bytes_sent += n as u64;
                        }
                        Err(e) => debug!(dest = %t.destination, "send failed: {e}"),
                    }
                }
                Output::Http { id, request } => {
                    let tx = self.tx.clone();
                    let client = self.client.clone();
                    smol::spawn(async move {
                        let response = async_compat::Compat::new(run_http(client, request)).await;
                        let _ = tx.send(Msg::Http { id, response }).await;
                    })
                    .detach();
                }
                Output::Event(e) => self.on_event(e, now),
            }
        }
    }

    fn on_event(&mut self, e: AgentEvent, now: Instant) {
        if let Some(c) = self.check.as_mut() {
            c.on_event(&e, now);
        }
        match e {
            AgentEvent::LoggedIn {
                user_id,
                device_id,
                access_token,
            } => {
                info!(%device_id, "logged in as {user_id}");
                if let Some(dir) = &self.opts.state_dir {
                    save_login(
                        dir,
                        &self.opts.homeserver,
                        &user_id,
                        &device_id,
                        &access_token,
                    );
                }
            }
            AgentEvent::LoginFailed { message } => {
                if let Some(pw) = self.password_fallback.take() {
                    warn!("saved access token refused ({message}); logging in with the password");
                    self.restart_with_password(pw, now);
                    return;
                }
                error!("login refused: {message}");
                self.say(&format!("error: login refused: {message}"));
                self.print(json!({"event": "error", "kind": "login_refused", "message": message}));
                self.finish(exit::LOGIN_REFUSED);
            }
            AgentEvent::HomeserverReachable(r) => {
                self.unreachable_since = if r {
                    None
                } else {
                    self.unreachable_since.or(Some(now))
                };
                self.print(json!({"event": "homeserver", "reachable": r}));
                if !r {
                    warn!("homeserver unreachable; retrying");
                }
            }
            AgentEvent::Synced => {
                self.synced = true;
                self.unreachable_since = None;
                if self.check.is_none() {
                    self.print(json!({"event": "ready"}));
                    self.say("logged in and synced");
                }
                self.start_calling(now);
            }
            AgentEvent::RoomCreated { room_id, .. } => {
                if let Phase::WaitingForRoom { since, .. } = self.phase {
                    self.phase = Phase::WaitingForRoom {
                        room: Some(room_id),
                        since,
                    };
                }
            }
            AgentEvent::RoomRequestFailed { message } => {
                if matches!(self.phase, Phase::WaitingForRoom { .. }) {
                    self.say(&format!("error: cannot create a direct room: {message}"));
                    self.print(json!({"event": "error", "kind": "room", "message": message}));
                    self.finish(exit::NO_SUCH_ROOM);
                }
            }
            AgentEvent::IncomingCall {
                call_id,
                from,
                room_id,
                ..
            } => {
                self.print(json!({"event": "incoming", "call_id": call_id, "from": from, "room_id": room_id}));
                self.say(&format!("incoming call {call_id} from {from}"));
                if matches!(self.opts.mode, Mode::Listen { .. }) {
                    self.placed_at.insert(call_id.clone(), now);
                    if let Err(err) = self.agent.answer(&call_id, now) {
                        warn!(%call_id, "cannot answer: {err}");
                    }
                }
            }
            AgentEvent::CallStateChanged { call_id, state } => {
                let name = match state {
                    CallState::InviteSent => "invite_sent",
                    CallState::Ringing => "ringing",
                    CallState::Connecting => "connecting",
                    CallState::Connected => "connected",
                    _ => "ended",
                };
                self.print(json!({"event": "state", "call_id": call_id, "state": name}));
                if state == CallState::Connected {
                    self.say(&format!("call {call_id} connected"));
                    self.connected.insert(call_id.clone(), true);
                    for line in self
                        .media
                        .start_call(&mut self.agent, &call_id, now, unix_ms())
                    {
                        self.print(line);
                    }
                    let after = match &self.opts.mode {
                        Mode::Call { duration, .. } => Some(*duration),
                        Mode::Listen { hangup_after, .. } => *hangup_after,
                        Mode::Check => None,
                    };
                    if let Some(d) = after {
                        self.hangup_at.insert(call_id, now + d);
                    }
                }
            }
            AgentEvent::Media(f) => {
                self.media.remote_frame(&f, now);
                match f.kind {
                    MediaKind::Video => self.counters.video_frames_received += 1,
                    MediaKind::Audio => self.counters.audio_frames_received += 1,
                }
                if let Some(t) = self.placed_at.get(&f.call_id) {
                    let d = now.saturating_duration_since(*t);
                    self.first_media.entry(f.call_id).or_insert(d);
                }
            }
            AgentEvent::ReflexiveAddress { local, mapped } => {
                self.print(json!({"event": "stun", "local": local.to_string(), "mapped": mapped.to_string()}));
            }
            AgentEvent::RelayAllocated { .. } | AgentEvent::RelayFailed { .. } => {
                if let Some(line) = relay_line(&e) {
                    self.print(line);
                }
            }
            AgentEvent::RelayLost { relay } => {
                self.print(json!({"event": "relay_lost", "relay": relay.to_string()}));
            }
            AgentEvent::KeyframeRequested { call_id } => {
                if let Some(answer) = self
                    .media
                    .keyframe_requested(&mut self.agent, &call_id, now)
                {
                    info!(%call_id, answer = answer.as_str(), "the peer asked for a keyframe");
                    self.print(json!({"event": "keyframe_request", "call_id": call_id.as_str(), "answer": answer.as_str()}));
                }
            }
            AgentEvent::CallEnded {
                call_id,
                reason,
                by,
            } => {
                let by = if by == Party::Local {
                    "local"
                } else {
                    "remote"
                };
                self.print(json!({"event": "ended", "call_id": call_id, "reason": reason.as_str(), "by": by}));
                self.say(&format!("call {call_id} ended: {reason} ({by})"));
                if let Some(line) = self.media.end_call(&call_id) {
                    self.print(line);
                }
                self.hangup_at.remove(&call_id);
                self.ended += 1;
                self.last_reason = Some(reason.to_string());
                match &self.opts.mode {
                    Mode::Call { .. } => {
                        let ok = self.connected.get(&call_id).copied().unwrap_or(false);
                        self.begin_shutdown(now, if ok { exit::OK } else { exit::NOT_CONNECTED });
                    }
                    Mode::Listen { max_calls, .. } => {
                        if max_calls.is_some_and(|m| self.ended >= m) {
                            self.begin_shutdown(now, exit::OK);
                        }
                    }
                    Mode::Check => {}
                }
            }
            other => debug!(?other, "event"),
        }
    }

    fn restart_with_password(&mut self, pw: call_assist_core::Secret, now: Instant) {
        let addrs: Vec<SocketAddr> = self.sockets.keys().copied().collect();
        let mut config = agent_config(&self.opts, &addrs, Credentials::Password(pw));
        config.h264_profile = self.h264_profile;
        config.device_id = self
            .opts
            .state_dir
            .as_deref()
            .and_then(|d| SavedSession::load(d, &self.opts.homeserver, &self.opts.user))
            .map(|s| s.device_id.as_str().into());
        match Agent::new(config, seed(), now, unix_ms()) {
            Ok(a) => self.agent = a,
            Err(e) => {
                error!("{e}");
                self.finish(exit::USAGE);
            }
        }
    }

    fn start_calling(&mut self, now: Instant) {
        if self.phase != Phase::Starting {
            return;
        }
        self.phase = Phase::Running;
        if matches!(self.opts.mode, Mode::Check) {
            return;
        }
        let Mode::Call { target, .. } = self.opts.mode.clone() else {
            self.say("listening for calls");
            return;
        };
        match target {
            Target::Room(room) => self.place(&room, now),
            Target::User(peer) => match self.agent.find_direct_room(&peer) {
                Some(room) => self.place(&room, now),
                None => {
                    info!(%peer, "no direct room yet; creating one");
                    self.agent.create_direct_room(&peer, now);
                    self.phase = Phase::WaitingForRoom {
                        room: None,
                        since: now,
                    };
                }
            },
        }
    }

    fn place(&mut self, room: &call_assist_core::RoomId, now: Instant) {
        self.phase = Phase::Running;
        match self.agent.place_call(room, now) {
            Ok(call_id) => {
                self.say(&format!("calling in {room} (call {call_id})"));
                self.placed_at.insert(call_id, now);
            }
            Err(e) => {
                self.say(&format!("error: cannot call in {room}: {e}"));
                self.print(json!({"event": "error", "kind": "room", "message": e.to_string()}));
                self.finish(exit::NO_SUCH_ROOM);
            }
        }
    }

    fn begin_shutdown(&mut self, now: Instant, code: u8) {
        if matches!(self.phase, Phase::ShuttingDown { .. } | Phase::Done) {
            return;
        }
        self.exit = code;
        self.agent.hangup_all(now);
        self.phase = Phase::ShuttingDown { since: now };
    }

    /// Time-driven work of the shell: media, scheduled hangups, stats, phase deadlines.
    fn on_tick(&mut self, now: Instant) {
        self.media.pump(&mut self.agent, now);
        let due: Vec<String> = self
            .hangup_at
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(c, _)| c.clone())
            .collect();
        for call_id in due {
            self.hangup_at.remove(&call_id);
            info!(%call_id, "hanging up");
            let _ = self.agent.hangup(&call_id, now);
        }
        self.resolve_turn_hosts();
        if let Some(report) = self
            .check
            .as_mut()
            .and_then(|c| c.step(&mut self.agent, now))
        {
            let (code, text, json) = report;
            self.say(text.trim_end());
            self.print(json);
            self.finish(code);
        }
        if now >= self.next_stats {
            self.next_stats = now + Duration::from_secs(1);
            self.print_stats();
        }
        if !self.synced
            && self
                .unreachable_since
                .is_some_and(|t| now >= t + STARTUP_UNREACHABLE_GRACE)
        {
            self.say("error: homeserver unreachable");
            self.print(json!({"event": "error", "kind": "unreachable", "message": "homeserver unreachable"}));
            self.finish(exit::UNREACHABLE);
        }
        match self.phase.clone() {
            Phase::WaitingForRoom { room, since } => {
                if let Some(room) = room {
                    if self.agent.room_peer(&room).is_some() {
                        self.place(&room, now);
                        return;
                    }
                }
                if now >= since + PEER_JOIN_WAIT {
                    self.say("error: the peer did not join the direct room");
                    self.finish(exit::NOT_CONNECTED);
                }
            }
            Phase::ShuttingDown { since }
                if (self.agent.outbox_len() == 0 || now >= since + SHUTDOWN_FLUSH) =>
            {
                let code = self.exit;
                self.finish(code);
            }
            _ => {}
        }
    }

    /// When the homeserver's TURN URIs change, resolves their host names off the loop.
    fn resolve_turn_hosts(&mut self) {
        let Some(uris) = self.agent.turn_servers().map(|t| t.uris.clone()) else {
            return;
        };
        if uris == self.turn_uris_seen {
            return;
        }
        self.turn_uris_seen = uris.clone();
        // TURN servers from the config replace the homeserver's (still probed for STUN).
        let use_turn = self.opts.turn.is_none();
        let hosts = named_hosts(&uris);
        if hosts.is_empty() {
            return;
        }
        let tx = self.tx.clone();
        smol::spawn(async move {
            let (stun, turn) = smol::unblock(move || resolve_hosts(&hosts)).await;
            let turn = if use_turn { turn } else { Vec::new() };
            let _ = tx.send(Msg::Servers { stun, turn }).await;
        })
        .detach();
    }

    fn print_stats(&self) {
        let Some(call_id) = self.media.first_call() else {
            return;
        };
        let info = self.agent.call_info(call_id);
        let c = self.counters;
        self.print(json!({
            "event": "stats",
            "call_id": call_id,
            "packets_sent": c.packets_sent,
            "packets_received": c.packets_received,
            "bytes_sent": c.bytes_sent,
            "bytes_received": c.bytes_received,
            "frames_sent": info.as_ref().map_or(0, |i| i.frames_sent),
            "frames_received": info.as_ref().map_or(0, |i| i.frames_received),
            "keyframes_requested": info.as_ref().map_or(0, |i| i.keyframes_requested),
            "local_candidate": info.as_ref().and_then(|i| i.local_candidate.clone()),
            "remote_candidate": info.as_ref().and_then(|i| i.remote_candidate.clone()),
            "video_frames_received": c.video_frames_received,
            "audio_frames_received": c.audio_frames_received,
            "camera_up": self.media.camera_up,
            "camera_frames": self.media.camera_frames,
        }));
    }

    fn next_deadline(&self, agent_at: Instant) -> Instant {
        let mut at = agent_at.min(self.next_stats);
        if let Some(t) = self.media.next_due() {
            at = at.min(t);
        }
        for t in self.hangup_at.values() {
            at = at.min(*t);
        }
        if let Some(t) = self.unreachable_since {
            at = at.min(t + STARTUP_UNREACHABLE_GRACE);
        }
        match self.phase {
            Phase::WaitingForRoom { .. } | Phase::ShuttingDown { .. } => {
                at = at.min(Instant::now() + Duration::from_millis(100))
            }
            _ => {}
        }
        at
    }

    fn summary(&self) -> serde_json::Value {
        let (mut sent, mut received) = (0, 0);
        for id in self.agent.call_ids() {
            if let Some(i) = self.agent.call_info(id) {
                sent += i.frames_sent;
                received += i.frames_received;
            }
        }
        json!({
            "event": "summary",
            "connected": self.connected.values().any(|c| *c),
            "setup_ms": self.first_media.values().next().map(|d| d.as_millis() as u64),
            "frames_sent": sent,
            "frames_received": received,
            "video_frames_received": self.counters.video_frames_received,
            "audio_frames_received": self.counters.audio_frames_received,
            "hangup_reason": self.last_reason,
            "calls": self.ended,
        })
    }
}

/// Host names (not IP literals) of the homeserver's UDP STUN/TURN URIs: (`host:port`, is a
/// TURN server). The core takes IP literals itself; names need DNS, which is the shell's job.
pub(crate) fn named_hosts(uris: &[String]) -> Vec<(String, bool)> {
    uris.iter()
        .filter_map(|u| TurnUri::parse(u).ok())
        .filter(|u| u.is_udp_stun() && u.addr().is_none())
        .map(|u| (u.host_port(), u.is_udp_turn()))
        .collect()
}

/// Resolves named STUN/TURN hosts: (STUN addresses, TURN addresses).
pub(crate) fn resolve_hosts(hosts: &[(String, bool)]) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    use std::net::ToSocketAddrs;
    let (mut stun, mut turn) = (Vec::new(), Vec::new());
    for (h, is_turn) in hosts {
        match h.to_socket_addrs() {
            Ok(addrs) => {
                for a in addrs {
                    stun.push(a);
                    if *is_turn {
                        turn.push(a);
                    }
                }
            }
            Err(e) => warn!("STUN/TURN server {h}: {e}"),
        }
    }
    (stun, turn)
}

/// Resolves `host:port` STUN servers (DNS is the shell's job; the core takes addresses).
pub(crate) fn resolve_stun(servers: &[String]) -> Vec<SocketAddr> {
    use std::net::ToSocketAddrs;
    let mut out = Vec::new();
    for s in servers {
        let s = s.strip_prefix("stun:").unwrap_or(s);
        match s.to_socket_addrs() {
            Ok(addrs) => out.extend(addrs),
            Err(e) => warn!("STUN server {s}: {e}"),
        }
    }
    out
}

fn agent_config(opts: &LiveOptions, addrs: &[SocketAddr], credentials: Credentials) -> AgentConfig {
    let mut config = AgentConfig::new(
        opts.homeserver.clone(),
        opts.user.clone(),
        credentials,
        addrs.to_vec(),
    );
    config.policy = match &opts.mode {
        Mode::Listen { allow, .. } if !allow.is_empty() => CallPolicy::Allow(allow.clone()),
        Mode::Listen { .. } => CallPolicy::Anyone,
        // A caller rings for nobody, but joins a room its target invites it to.
        Mode::Call {
            target: Target::User(u),
            ..
        } => CallPolicy::Allow(vec![u.clone()]),
        Mode::Call { .. } | Mode::Check => CallPolicy::Allow(Vec::new()),
    };
    config.stun_servers = resolve_stun(&opts.stun);
    config.relay_only = opts.relay_only;
    config.turn = opts.turn.as_ref().map(static_turn);
    config
}

/// The JSON line of a TURN relay event (`relay`, `relay_failed`); the core logs them.
pub(crate) fn relay_line(e: &AgentEvent) -> Option<serde_json::Value> {
    match e {
        AgentEvent::RelayAllocated { server, relay, .. } => Some(
            json!({"event": "relay", "server": server.to_string(), "relay": relay.to_string()}),
        ),
        AgentEvent::RelayFailed {
            server,
            code,
            reason,
        } => Some(
            json!({"event": "relay_failed", "server": server.to_string(), "code": code, "reason": reason}),
        ),
        _ => None,
    }
}

/// Keeps a login's device and token in `dir` for the next start (a failure is only logged).
pub(crate) fn save_login(
    dir: &std::path::Path,
    homeserver: &str,
    user_id: &call_assist_core::UserId,
    device_id: &ruma::DeviceId,
    access_token: &call_assist_core::Secret,
) {
    let s = SavedSession {
        homeserver: homeserver.to_owned(),
        user_id: user_id.to_string(),
        device_id: device_id.to_string(),
        access_token: access_token.expose().to_owned(),
    };
    if let Err(err) = s.save(dir) {
        warn!("cannot save session in {}: {err}", dir.display());
    }
}

/// The homeserver HTTP client of the live drivers (reqwest on rustls; runs under async-compat).
pub(crate) fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        .connect_timeout(Duration::from_secs(10))
        .build()
}

/// What to log in with: a saved access token first, with the password (if any) kept as the
/// fallback for when the token is refused; else what the config gives.
pub(crate) fn login_credentials(
    auth: &Auth,
    saved: Option<&SavedSession>,
) -> (Credentials, Option<call_assist_core::Secret>) {
    match (auth, saved) {
        (Auth::Password(pw), Some(s)) => (
            Credentials::AccessToken(call_assist_core::Secret::new(s.access_token.clone())),
            Some(pw.clone()),
        ),
        (Auth::Password(pw), None) => (Credentials::Password(pw.clone()), None),
        (Auth::AccessToken(t), _) => (Credentials::AccessToken(t.clone()), None),
    }
}

/// TURN from the config for the core; host names are resolved here, once (the config is
/// read at start).
pub(crate) fn static_turn(t: &config::TurnOptions) -> StaticTurn {
    let mut uris = Vec::new();
    for u in &t.uris {
        match TurnUri::parse(u) {
            Ok(parsed) if parsed.addr().is_some() => uris.push(u.clone()),
            Ok(parsed) => {
                let (_, addrs) = resolve_hosts(&[(parsed.host_port(), true)]);
                uris.extend(addrs.iter().map(|a| format!("turn:{a}?transport=udp")));
            }
            Err(e) => warn!("TURN URI {u:?}: {e}"),
        }
    }
    StaticTurn {
        uris,
        username: Secret::new(t.username.clone()),
        password: t.password.clone(),
    }
}

/// Reads the media options: files are loaded and checked, a camera is connected to and its
/// first keyframe awaited (for its H.264 profile). `Err` is the exit code, after a clear
/// message.
async fn start_media(
    opts: &LiveOptions,
    tx: &Sender<Msg>,
) -> Result<(LiveMedia, Option<call_assist_core::h264::ProfileLevelId>), u8> {
    let rtsp_password = std::env::var("CALL_ASSIST_RTSP_PASSWORD").ok();
    let sdp = opts
        .state_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join("forward.sdp");
    start_media_with(
        &opts.media,
        opts.video,
        rtsp_password.as_deref(),
        sdp,
        tx,
        Msg::Camera,
    )
    .await
}

/// [`start_media`] for any driver: camera events reach `tx` wrapped by `wrap`; a forwarder
/// writes its SDP file at `forward_sdp`.
pub(crate) async fn start_media_with<M: Send + 'static>(
    m: &self::config::MediaOptions,
    video: crate::media::pump::VideoChoice,
    rtsp_password: Option<&str>,
    forward_sdp: std::path::PathBuf,
    tx: &Sender<M>,
    wrap: impl Fn(CameraEvent) -> M + Send + 'static,
) -> Result<(LiveMedia, Option<call_assist_core::h264::ProfileLevelId>), u8> {
    let sources = crate::media::source::plan(
        &m.video,
        m.audio.as_deref(),
        m.video_fps,
        video,
        m.rtsp_transport,
        rtsp_password,
    )
    .map_err(|e| {
        eprintln!("error: {e}");
        exit::USAGE
    })?;
    let mut profile = sources.h264_profile;
    if let Some(dir) = &m.record {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("error: --record: cannot create {}: {e}", dir.display());
            return Err(exit::USAGE);
        }
    }
    let forward = m.forward_rtp.map(|dest| (dest, forward_sdp));
    if let Some((_, sdp)) = &forward {
        if let Some(dir) = sdp.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
    }
    let mut live = LiveMedia::new(sources.plan, m.record.clone(), forward);
    let Some(camera) = sources.camera else {
        return Ok((live, profile));
    };
    info!(camera = %camera, transport = ?camera.transport, "connecting to the camera");
    let (cam_tx, cam_rx) = smol::channel::bounded(CAMERA_QUEUE);
    smol::spawn(async_compat::Compat::new(crate::media::rtsp::run(
        camera.clone(),
        cam_tx,
    )))
    .detach();
    let deadline = Instant::now() + CAMERA_START_WAIT;
    let mut early = Vec::new();
    let mut last_error = None;
    loop {
        let ev = async { cam_rx.recv().await.ok() }
            .or(async {
                smol::Timer::at(deadline).await;
                None
            })
            .await;
        let Some(ev) = ev else { break };
        match &ev {
            CameraEvent::Lost {
                error: e @ (RtspError::Unauthorized(_) | RtspError::NoUsableStream(_)),
                ..
            } => {
                eprintln!("error: camera {camera}: {e}");
                return Err(exit::MEDIA_SOURCE);
            }
            CameraEvent::Lost { error, .. } => last_error = Some(error.to_string()),
            CameraEvent::Video {
                profile: Some(p), ..
            } => {
                profile = Some(*p);
                info!(profile = %p, "camera H.264 profile");
                early.push(ev);
                break;
            }
            _ => {}
        }
        early.push(ev);
    }
    if profile.is_none() {
        warn!(
            camera = %camera,
            last_error = last_error.as_deref().unwrap_or("no keyframe yet"),
            "no keyframe from the camera within {} s; starting anyway, calls get its video once it is up",
            CAMERA_START_WAIT.as_secs()
        );
    }
    for ev in &early {
        live.prime(ev);
    }
    let tx = tx.clone();
    smol::spawn(async move {
        while let Ok(ev) = cam_rx.recv().await {
            if tx.send(wrap(ev)).await.is_err() {
                return;
            }
        }
    })
    .detach();
    Ok((live, profile))
}

pub(crate) fn seed() -> u64 {
    // The live agent's randomness must be unpredictable; the core only needs a seed.
    let mut buf = [0u8; 8];
    match std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
    {
        Ok(()) => u64::from_le_bytes(buf),
        Err(_) => unix_ms() ^ u64::from(std::process::id()).rotate_left(32),
    }
}

/// Binds a UDP socket on each address; each socket's datagrams reach `tx` wrapped by `wrap`
/// (local address, sender, bytes). Addresses that cannot be bound are logged and skipped.
pub(crate) fn bind_udp<M: Send + 'static>(
    ips: &[IpAddr],
    port: u16,
    tx: &Sender<M>,
    wrap: fn(SocketAddr, SocketAddr, Vec<u8>) -> M,
) -> BTreeMap<SocketAddr, Arc<Async<UdpSocket>>> {
    let mut sockets = BTreeMap::new();
    for ip in ips {
        match Async::<UdpSocket>::bind(SocketAddr::new(*ip, port)) {
            Ok(s) => {
                let s = Arc::new(s);
                let local = match s.get_ref().local_addr() {
                    Ok(a) => a,
                    Err(e) => {
                        warn!("socket without address: {e}");
                        continue;
                    }
                };
                info!(%local, "receiving media on");
                let reader = s.clone();
                let tx = tx.clone();
                smol::spawn(async move {
                    let mut buf = vec![0u8; 2048];
                    loop {
                        match reader.recv_from(&mut buf).await {
                            Ok((n, from)) => {
                                let data = buf.get(..n).unwrap_or_default().to_vec();
                                if tx.send(wrap(local, from, data)).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => debug!(%local, "recv: {e}"),
                        }
                    }
                })
                .detach();
                sockets.insert(local, s);
            }
            Err(e) => warn!(%ip, "cannot bind UDP: {e}"),
        }
    }
    sockets
}

/// Runs `call` or `listen`; returns the exit code.
pub fn run(opts: LiveOptions) -> ExitCode {
    ExitCode::from(smol::block_on(run_async(opts)))
}

async fn run_async(opts: LiveOptions) -> u8 {
    let ips = gather_ips(&opts);
    if ips.is_empty() {
        eprintln!("error: no usable network address (use --allow-loopback to use loopback)");
        return exit::USAGE;
    }
    let (tx, rx): (Sender<Msg>, Receiver<Msg>) = smol::channel::bounded(INBOX);
    let sockets = bind_udp(&ips, opts.port, &tx, |local, from, data| Msg::Datagram {
        local,
        from,
        data,
    });
    if sockets.is_empty() {
        eprintln!("error: could not bind any UDP socket");
        return exit::USAGE;
    }
    {
        let tx = tx.clone();
        match async_signal::Signals::new([async_signal::Signal::Term, async_signal::Signal::Int]) {
            Ok(mut signals) => {
                smol::spawn(async move {
                    while let Some(s) = signals.next().await {
                        info!(signal = ?s, "signal: hanging up and exiting");
                        let _ = tx.send(Msg::Shutdown).await;
                    }
                })
                .detach();
            }
            Err(e) => warn!("cannot install signal handlers: {e}"),
        }
    }
    let (media, h264_profile) = match start_media(&opts, &tx).await {
        Ok(m) => m,
        Err(code) => return code,
    };
    let client = match http_client() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: HTTP client: {e}");
            return exit::USAGE;
        }
    };

    let saved = opts
        .state_dir
        .as_deref()
        .and_then(|d| SavedSession::load(d, &opts.homeserver, &opts.user));
    let (credentials, password_fallback) = login_credentials(&opts.auth, saved.as_ref());
    let now = Instant::now();
    let addrs: Vec<SocketAddr> = sockets.keys().copied().collect();
    let mut config = agent_config(&opts, &addrs, credentials);
    config.h264_profile = h264_profile;
    config.device_id = saved.map(|s| s.device_id.as_str().into());
    let agent = match Agent::new(config, seed(), now, unix_ms()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    let mut run = Run {
        opts,
        agent,
        sockets,
        tx,
        client,
        phase: Phase::Starting,
        exit: exit::OK,
        counters: Counters::default(),
        media,
        h264_profile,
        hangup_at: BTreeMap::new(),
        placed_at: BTreeMap::new(),
        first_media: BTreeMap::new(),
        connected: BTreeMap::new(),
        ended: 0,
        last_reason: None,
        unreachable_since: None,
        synced: false,
        next_stats: now + Duration::from_secs(1),
        turn_uris_seen: Vec::new(),
        password_fallback,
        check: None,
    };
    if matches!(run.opts.mode, Mode::Check) {
        run.check = Some(check::Check::new(now));
    }
    run.say(&format!(
        "logging in to {} as {}",
        run.opts.homeserver, run.opts.user
    ));

    loop {
        let now = Instant::now();
        run.on_tick(now);
        let agent_at = run.drain(now);
        if run.phase == Phase::Done {
            break;
        }
        let deadline = run.next_deadline(agent_at);
        let msg = async { Some(rx.recv().await) }
            .or(async {
                smol::Timer::at(deadline).await;
                None
            })
            .await;
        let now = Instant::now();
        match msg {
            None => run.agent.handle_input(Input::Timeout(now)),
            Some(Ok(Msg::Datagram { local, from, data })) => {
                run.counters.packets_received += 1;
                run.counters.bytes_received += data.len() as u64;
                run.agent.handle_input(Input::Receive {
                    now,
                    source: from,
                    destination: local,
                    contents: &data,
                });
            }
            Some(Ok(Msg::Http { id, response })) => {
                run.agent
                    .handle_input(Input::HttpResponse { now, id, response })
            }
            Some(Ok(Msg::Shutdown)) => {
                if matches!(run.phase, Phase::ShuttingDown { .. }) {
                    run.finish(run.exit);
                } else {
                    // Stopping a listener is its normal end; a caller stopped before it
                    // connected did not get its call through.
                    let code = match run.opts.mode {
                        Mode::Listen { .. } => exit::OK,
                        Mode::Call { .. } if run.connected.values().any(|c| *c) => exit::OK,
                        Mode::Call { .. } | Mode::Check => exit::NOT_CONNECTED,
                    };
                    run.begin_shutdown(now, code);
                }
            }
            Some(Ok(Msg::Servers { stun, turn })) => {
                run.agent.add_stun_servers(&stun, now);
                run.agent.add_turn_servers(&turn, now);
            }
            Some(Ok(Msg::Camera(e))) => {
                if let Some(line) = run
                    .media
                    .camera(&mut run.agent, e, now, &mut run.h264_profile)
                {
                    run.print(line);
                }
            }
            Some(Err(_)) => break,
        }
    }
    if matches!(run.opts.mode, Mode::Check) {
        // The check's report was the last word.
        return run.exit;
    }
    let summary = run.summary();
    run.print(summary.clone());
    if !run.opts.json {
        println!(
            "connected: {}, calls ended: {}, last hangup: {}",
            summary["connected"],
            run.ended,
            run.last_reason.as_deref().unwrap_or("-")
        );
    }
    run.exit
}

#[cfg(test)]
mod tests {
    use super::named_hosts;

    #[test]
    fn only_named_udp_hosts_need_dns() {
        let uris = [
            "turn:turn.example.org:3478?transport=udp",
            "turn:turn.example.org:3478?transport=tcp",
            "turn:192.0.2.1:3478?transport=udp",
            "stun:stun.example.org",
            "turns:turn.example.org:5349",
        ]
        .map(String::from);
        assert_eq!(
            named_hosts(&uris),
            vec![
                ("turn.example.org:3478".to_owned(), true),
                ("stun.example.org:3478".to_owned(), false)
            ]
        );
    }
}
