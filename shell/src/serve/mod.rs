//! `call-assist serve`: the hub daemon. One Matrix account, named stations (a video and audio
//! source plus sinks for the other side), a local HTTP API that starts, lists and hangs up
//! calls and streams their events, SIGHUP to reload who may call whom.
//!
//! It reuses the live driver's pieces (sockets, HTTP through async-compat, media start and the
//! per-call media of [`LiveMedia`]), one [`LiveMedia`] per station. Everything runs on one smol
//! thread; the API's connections send [`api::Request`]s into the same channel as datagrams and
//! HTTP answers, so only the loop touches the agent.

pub mod api;
pub mod config;

use std::collections::{BTreeMap, VecDeque};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use call_assist_core::{
    Agent, AgentConfig, AgentEvent, ApiError, CallDirection, CallPolicy, CallState, Credentials,
    HttpFailure, HttpId, Input, MediaKind, Output, OwnedRoomId, OwnedUserId, Party,
};
use futures_lite::{FutureExt, StreamExt};
use serde_json::{json, Value};
use smol::channel::{Receiver, Sender};
use smol::Async;
use tracing::{debug, error, info, warn};

use self::api::{Command, Reply};
use self::config::{ServeConfig, StationConfig};
use crate::live::config::SavedSession;
use crate::live::exit;
use crate::live::media::LiveMedia;
use crate::media::rtsp::CameraEvent;

/// Inputs queued for the loop (datagrams, HTTP answers, API requests, camera frames).
const INBOX: usize = 1024;
/// Ended calls kept for `GET /calls` (the oldest is forgotten first).
const ENDED_KEPT: usize = 32;
/// How long `POST /calls` to a user without a direct room waits for them to join a new one.
const PEER_JOIN_WAIT: Duration = Duration::from_secs(60);
/// Event-stream clients at once (each is also an API connection).
const MAX_SUBSCRIBERS: usize = 32;

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
    Reload,
    /// Resolved host names of the homeserver's STUN/TURN URIs.
    Servers {
        stun: Vec<SocketAddr>,
        turn: Vec<SocketAddr>,
    },
    Camera(usize, CameraEvent),
    Api(api::Request),
}

struct Station {
    config: StationConfig,
    media: LiveMedia,
    profile: Option<call_assist_core::h264::ProfileLevelId>,
}

/// What the hub knows of one call.
struct CallRecord {
    station: usize,
    direction: CallDirection,
    peer: String,
    room: String,
    state: &'static str,
    started_unix_ms: u64,
    connected_at: Option<Instant>,
    ended: Option<(String, &'static str)>,
    video_frames_received: u64,
    audio_frames_received: u64,
}

/// `POST /calls` to a user with no direct room yet: waiting for the room and their join.
struct PendingCall {
    station: usize,
    peer: OwnedUserId,
    room: Option<OwnedRoomId>,
    since: Instant,
    reply: Sender<Reply>,
}

struct Hub {
    config: ServeConfig,
    json: bool,
    agent: Agent,
    sockets: BTreeMap<SocketAddr, Arc<Async<UdpSocket>>>,
    tx: Sender<Msg>,
    client: reqwest::Client,
    stations: Vec<Station>,
    calls: BTreeMap<String, CallRecord>,
    ended_order: VecDeque<String>,
    pending: Vec<PendingCall>,
    subscribers: Vec<Sender<String>>,
    synced: bool,
    reachable: bool,
    turn_uris_seen: Vec<String>,
    password_fallback: Option<call_assist_core::Secret>,
    shutting_down: Option<Instant>,
    exit: Option<u8>,
}

fn state_name(s: CallState) -> &'static str {
    match s {
        CallState::InviteSent => "invite_sent",
        CallState::Ringing => "ringing",
        CallState::Connecting => "connecting",
        CallState::Connected => "connected",
        _ => "ended",
    }
}

fn direction_name(d: CallDirection) -> &'static str {
    match d {
        CallDirection::Outbound => "outgoing",
        _ => "incoming",
    }
}

impl Hub {
    /// A call event: to stdout (`--json`) or the log, and to every event stream.
    fn emit(&mut self, v: Value) {
        if self.json {
            println!("{v}");
        } else {
            // User and room ids only at debug level (house rule), the rest at info.
            debug!("{v}");
            let mut brief = v.clone();
            if let Some(o) = brief.as_object_mut() {
                for k in ["from", "user", "room_id"] {
                    o.remove(k);
                }
            }
            info!("{brief}");
        }
        let line = v.to_string();
        self.subscribers.retain(|s| match s.try_send(line.clone()) {
            Ok(()) => true,
            Err(smol::channel::TrySendError::Full(_)) => {
                warn!(
                    "an event-stream client fell {} events behind: dropped",
                    api::EVENT_QUEUE
                );
                false
            }
            Err(smol::channel::TrySendError::Closed(_)) => false,
        });
    }

    fn station_name(&self, i: usize) -> &str {
        self.stations.get(i).map_or("?", |s| s.config.name.as_str())
    }

    fn drain(&mut self, now: Instant) -> Instant {
        loop {
            match self.agent.poll_output() {
                Output::Timeout(at) => return at,
                Output::Transmit(t) => {
                    let Some(sock) = self.sockets.get(&t.source) else {
                        debug!(source = %t.source, "no socket for transmit source");
                        continue;
                    };
                    if let Err(e) = sock.get_ref().send_to(&t.contents, t.destination) {
                        debug!(dest = %t.destination, "send failed: {e}");
                    }
                }
                Output::Http { id, request } => {
                    let tx = self.tx.clone();
                    let client = self.client.clone();
                    smol::spawn(async move {
                        let response =
                            async_compat::Compat::new(crate::live::run_http(client, request)).await;
                        let _ = tx.send(Msg::Http { id, response }).await;
                    })
                    .detach();
                }
                Output::Event(e) => self.on_event(e, now),
            }
        }
    }

    fn on_event(&mut self, e: AgentEvent, now: Instant) {
        match e {
            AgentEvent::LoggedIn {
                user_id,
                device_id,
                access_token,
            } => {
                info!(%device_id, "logged in as {user_id}");
                if let Some(dir) = &self.config.state_dir {
                    crate::live::save_login(
                        dir,
                        &self.config.homeserver,
                        &user_id,
                        &device_id,
                        &access_token,
                    );
                }
            }
            AgentEvent::LoginFailed { message } => {
                if let Some(pw) = self.password_fallback.take() {
                    warn!("saved access token refused ({message}); logging in with the password");
                    match new_agent(
                        &self.config,
                        &self.sockets,
                        Credentials::Password(pw),
                        self.stations.first().and_then(|s| s.profile),
                        now,
                    ) {
                        Ok(a) => self.agent = a,
                        Err(e) => {
                            error!("{e}");
                            self.exit = Some(exit::USAGE);
                        }
                    }
                    return;
                }
                error!("login refused: {message}");
                self.emit(json!({"event": "error", "kind": "login_refused", "message": message}));
                self.exit = Some(exit::LOGIN_REFUSED);
            }
            AgentEvent::HomeserverReachable(r) => {
                self.reachable = r;
                if !r {
                    warn!("homeserver unreachable; retrying");
                }
                self.emit(json!({"event": "homeserver", "reachable": r}));
            }
            AgentEvent::Synced => {
                self.synced = true;
                self.reachable = true;
                self.emit(json!({"event": "ready", "user": self.config.user.as_str()}));
            }
            AgentEvent::RoomCreated { room_id, peer } => {
                for p in self
                    .pending
                    .iter_mut()
                    .filter(|p| p.peer == peer && p.room.is_none())
                {
                    p.room = Some(room_id.clone());
                }
            }
            AgentEvent::RoomRequestFailed { message } => {
                for p in std::mem::take(&mut self.pending) {
                    let _ = p.reply.try_send(Reply::error(
                        502,
                        format!("cannot create a direct room with {}: {message}", p.peer),
                    ));
                }
            }
            AgentEvent::IncomingCall {
                call_id,
                from,
                room_id,
                ..
            } => {
                let station = self.config.answering_station(from.as_str());
                self.emit(json!({"event": "incoming", "call_id": call_id, "from": from,
                    "room_id": room_id, "station": station.map(|i| self.station_name(i).to_owned())}));
                let Some(i) = station else {
                    info!(%call_id, "no station answers {from}: left ringing");
                    return;
                };
                self.calls.insert(
                    call_id.clone(),
                    CallRecord {
                        station: i,
                        direction: CallDirection::Inbound,
                        peer: from.to_string(),
                        room: room_id.to_string(),
                        state: "ringing",
                        started_unix_ms: crate::live::unix_ms(),
                        connected_at: None,
                        ended: None,
                        video_frames_received: 0,
                        audio_frames_received: 0,
                    },
                );
                // The answer offers what this station's camera sends.
                self.agent
                    .set_h264_profile(self.stations.get(i).and_then(|s| s.profile));
                if let Err(err) = self.agent.answer(&call_id, now) {
                    warn!(%call_id, "cannot answer: {err}");
                }
            }
            AgentEvent::CallStateChanged { call_id, state } => {
                let name = state_name(state);
                let Some(rec) = self.calls.get_mut(&call_id) else {
                    return;
                };
                rec.state = name;
                let i = rec.station;
                if state == CallState::Connected && rec.connected_at.is_none() {
                    rec.connected_at = Some(now);
                    let mut lines = Vec::new();
                    if let Some(s) = self.stations.get_mut(i) {
                        lines = s.media.start_call(
                            &mut self.agent,
                            &call_id,
                            now,
                            crate::live::unix_ms(),
                        );
                        for l in &mut lines {
                            l["station"] = json!(s.config.name);
                        }
                    }
                    for l in lines {
                        self.emit(l);
                    }
                }
                let station = self.station_name(i).to_owned();
                self.emit(json!({"event": "state", "call_id": call_id, "station": station, "state": name}));
            }
            AgentEvent::Media(f) => {
                let Some(rec) = self.calls.get_mut(f.call_id.as_str()) else {
                    return;
                };
                match f.kind {
                    MediaKind::Video => rec.video_frames_received += 1,
                    MediaKind::Audio => rec.audio_frames_received += 1,
                }
                if let Some(s) = self.stations.get_mut(rec.station) {
                    s.media.remote_frame(&f, now);
                }
            }
            AgentEvent::KeyframeRequested { call_id } => {
                if let Some(s) = self
                    .calls
                    .get(&call_id)
                    .and_then(|r| self.stations.get_mut(r.station))
                {
                    if let Some(a) = s.media.keyframe_requested(&mut self.agent, &call_id, now) {
                        self.emit(json!({"event": "keyframe_request", "call_id": call_id.as_str(), "answer": a.as_str()}));
                    }
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
                let Some(rec) = self.calls.get_mut(&call_id) else {
                    return;
                };
                rec.state = "ended";
                rec.ended = Some((reason.to_string(), by));
                let i = rec.station;
                let mut recorded = None;
                if let Some(s) = self.stations.get_mut(i) {
                    recorded = s.media.end_call(&call_id);
                }
                self.ended_order.push_back(call_id.clone());
                while self.ended_order.len() > ENDED_KEPT {
                    if let Some(old) = self.ended_order.pop_front() {
                        self.calls.remove(&old);
                    }
                }
                let station = self.station_name(i).to_owned();
                self.emit(
                    json!({"event": "ended", "call_id": call_id, "station": station,
                    "reason": reason.as_str(), "by": by}),
                );
                if let Some(mut r) = recorded {
                    r["station"] = json!(station);
                    self.emit(r);
                }
            }
            AgentEvent::RelayAllocated { .. } | AgentEvent::RelayFailed { .. } => {
                if let Some(line) = crate::live::relay_line(&e) {
                    self.emit(line);
                }
            }
            other => debug!(?other, "event"),
        }
    }

    fn call_json(&self, id: &str, rec: &CallRecord, now: Instant) -> Value {
        let info = self.agent.call_info(id);
        json!({
            "id": id,
            "station": self.station_name(rec.station),
            "direction": direction_name(rec.direction),
            "peer": rec.peer,
            "room": rec.room,
            "state": rec.state,
            "started_unix_ms": rec.started_unix_ms,
            "connected_s": rec.connected_at.filter(|_| rec.ended.is_none())
                .map(|t| now.saturating_duration_since(t).as_secs()),
            "reason": rec.ended.as_ref().map(|e| e.0.clone()),
            "ended_by": rec.ended.as_ref().map(|e| e.1),
            "stats": {
                "frames_sent": info.as_ref().map_or(0, |i| i.frames_sent),
                "frames_received": info.as_ref().map_or(0, |i| i.frames_received),
                "keyframes_requested": info.as_ref().map_or(0, |i| i.keyframes_requested),
                "video_frames_received": rec.video_frames_received,
                "audio_frames_received": rec.audio_frames_received,
                "local_candidate": info.as_ref().and_then(|i| i.local_candidate.clone()),
                "remote_candidate": info.as_ref().and_then(|i| i.remote_candidate.clone()),
            },
        })
    }

    fn on_api(&mut self, req: api::Request, now: Instant) {
        let reply = match req.command {
            Command::Health => {
                let ok = self.synced && self.reachable;
                let active = self.calls.values().filter(|c| c.ended.is_none()).count();
                let stations: Vec<Value> = self
                    .stations
                    .iter()
                    .map(|s| json!({"name": s.config.name, "camera_up": s.media.camera_up}))
                    .collect();
                Reply::Json(
                    if ok { 200 } else { 503 },
                    json!({
                        "status": if ok { "ok" } else { "degraded" },
                        "synced": self.synced,
                        "homeserver_reachable": self.reachable,
                        "user": self.config.user.as_str(),
                        "active_calls": active,
                        "stations": stations,
                    }),
                )
            }
            Command::Stations => Reply::Json(
                200,
                json!(self
                    .stations
                    .iter()
                    .map(|s| json!({
                        "name": s.config.name,
                        "video": s.media_video(),
                        "camera_up": s.media.camera_up,
                        "answer": s.config.answer,
                        "may_call": s.config.may_call,
                    }))
                    .collect::<Vec<_>>()),
            ),
            Command::ListCalls => Reply::Json(
                200,
                json!(self
                    .calls
                    .iter()
                    .map(|(id, r)| self.call_json(id, r, now))
                    .collect::<Vec<_>>()),
            ),
            Command::GetCall(id) => match self.calls.get(&id) {
                Some(r) => Reply::Json(200, self.call_json(&id, r, now)),
                None => Reply::error(404, format!("no call {id:?}")),
            },
            Command::Hangup(id) => match self.calls.get(&id) {
                None => Reply::error(404, format!("no call {id:?}")),
                Some(r) if r.ended.is_some() => {
                    Reply::error(409, format!("call {id:?} has already ended"))
                }
                Some(_) => match self.agent.hangup(&id, now) {
                    Ok(()) => {
                        info!(call_id = %id, "hanging up (API)");
                        let r = self.calls.get(&id);
                        Reply::Json(
                            200,
                            r.map_or(json!({"id": id}), |r| self.call_json(&id, r, now)),
                        )
                    }
                    Err(e) => Reply::error(409, format!("cannot hang up {id:?}: {e}")),
                },
            },
            Command::RequestKeyframe(id) => match self.calls.get(&id) {
                None => Reply::error(404, format!("no call {id:?}")),
                Some(r) if r.ended.is_some() => {
                    Reply::error(409, format!("call {id:?} has already ended"))
                }
                Some(_) => match self.agent.request_keyframe(&id, now) {
                    Ok(sent) => {
                        info!(call_id = %id, sent, "keyframe request (API)");
                        Reply::Json(200, json!({"id": id, "requested": sent}))
                    }
                    Err(e) => Reply::error(409, format!("cannot ask {id:?} for a keyframe: {e}")),
                },
            },
            Command::Subscribe => {
                if self.subscribers.len() >= MAX_SUBSCRIBERS {
                    Reply::error(
                        503,
                        format!("at most {MAX_SUBSCRIBERS} event streams at once"),
                    )
                } else {
                    let (tx, rx) = smol::channel::bounded(api::EVENT_QUEUE);
                    self.subscribers.push(tx);
                    Reply::Events(rx)
                }
            }
            Command::StartCall { station, to } => {
                match self.start_call(&station, &to, &req.reply, now) {
                    Some(r) => r,
                    None => return,
                }
            }
        };
        let _ = req.reply.try_send(reply);
    }

    /// `POST /calls`: the reply, or `None` when it comes later (waiting for a direct room).
    fn start_call(
        &mut self,
        station: &str,
        to: &str,
        reply: &Sender<Reply>,
        now: Instant,
    ) -> Option<Reply> {
        let Some(i) = self.stations.iter().position(|s| s.config.name == station) else {
            let names: Vec<&str> = self
                .stations
                .iter()
                .map(|s| s.config.name.as_str())
                .collect();
            return Some(Reply::error(
                404,
                format!("no station {station:?} (stations: {})", names.join(", ")),
            ));
        };
        if self.shutting_down.is_some() {
            return Some(Reply::error(503, "shutting down"));
        }
        if !self.synced {
            return Some(Reply::error(503, "not connected to the homeserver yet"));
        }
        let may_call = |u: &str| {
            self.stations
                .get(i)
                .is_some_and(|s| s.config.may_call.iter().any(|m| m.as_str() == u))
        };
        if to.starts_with('@') {
            let Ok(peer) = OwnedUserId::try_from(to) else {
                return Some(Reply::error(
                    400,
                    format!("\"to\": {to:?} is not a Matrix user id"),
                ));
            };
            if !may_call(peer.as_str()) {
                return Some(Reply::error(
                    403,
                    format!("station {station:?} may not call {peer} (see may_call)"),
                ));
            }
            if let Some(room) = self.agent.find_direct_room(&peer) {
                return Some(self.place(i, &room, now));
            }
            if !self.pending.iter().any(|p| p.peer == peer) {
                info!(%peer, "no direct room yet; creating one");
                self.agent.create_direct_room(&peer, now);
            }
            self.pending.push(PendingCall {
                station: i,
                peer,
                room: None,
                since: now,
                reply: reply.clone(),
            });
            None
        } else if to.starts_with('!') {
            let Ok(room) = OwnedRoomId::try_from(to) else {
                return Some(Reply::error(
                    400,
                    format!("\"to\": {to:?} is not a room id"),
                ));
            };
            let Some(peer) = self.agent.room_peer(&room) else {
                return Some(Reply::error(
                    404,
                    format!("{room} is not a 1:1 room the hub is in"),
                ));
            };
            if !may_call(peer.as_str()) {
                return Some(Reply::error(
                    403,
                    format!("station {station:?} may not call {peer} (see may_call)"),
                ));
            }
            Some(self.place(i, &room, now))
        } else {
            Some(Reply::error(
                400,
                format!("\"to\": {to:?} is neither a user (@user:server) nor a room (!room)"),
            ))
        }
    }

    fn place(&mut self, station: usize, room: &call_assist_core::RoomId, now: Instant) -> Reply {
        self.agent
            .set_h264_profile(self.stations.get(station).and_then(|s| s.profile));
        match self.agent.place_call(room, now) {
            Ok(call_id) => {
                let peer = self
                    .agent
                    .room_peer(room)
                    .map(|p| p.to_string())
                    .unwrap_or_default();
                info!(%call_id, station = self.station_name(station), "calling in {room}");
                self.calls.insert(
                    call_id.clone(),
                    CallRecord {
                        station,
                        direction: CallDirection::Outbound,
                        peer,
                        room: room.to_string(),
                        state: "invite_sent",
                        started_unix_ms: crate::live::unix_ms(),
                        connected_at: None,
                        ended: None,
                        video_frames_received: 0,
                        audio_frames_received: 0,
                    },
                );
                let body = self
                    .calls
                    .get(&call_id)
                    .map_or(json!({"id": call_id}), |r| self.call_json(&call_id, r, now));
                Reply::Json(201, body)
            }
            Err(ApiError::TooManyCalls) => Reply::error(503, "too many calls in progress"),
            Err(e) => Reply::error(409, format!("cannot call in {room}: {e}")),
        }
    }

    /// Pending calls whose peer joined are placed; those waiting too long fail.
    fn check_pending(&mut self, now: Instant) {
        for p in std::mem::take(&mut self.pending) {
            let room = p
                .room
                .clone()
                .filter(|r| self.agent.room_peer(r).is_some())
                .or_else(|| self.agent.find_direct_room(&p.peer));
            if let Some(room) = room {
                let r = self.place(p.station, &room, now);
                let _ = p.reply.try_send(r);
            } else if now >= p.since + PEER_JOIN_WAIT || p.reply.is_closed() {
                let _ = p.reply.try_send(Reply::error(
                    504,
                    format!(
                        "{} did not join a direct room within {} s",
                        p.peer,
                        PEER_JOIN_WAIT.as_secs()
                    ),
                ));
            } else {
                self.pending.push(p);
            }
        }
    }

    fn reload(&mut self) {
        let new = match ServeConfig::load(&self.config.path, |k| std::env::var(k).ok()) {
            Ok(c) => c,
            Err(e) => {
                error!("config reload failed, keeping the running config: {e}");
                self.emit(json!({"event": "reload", "ok": false, "message": e.0}));
                return;
            }
        };
        let needs_restart = self.config.needs_restart(&new);
        for k in &needs_restart {
            warn!("config reload: {k} changed; that needs a restart (the running value stays)");
        }
        // Only the allow lists change in place: they decide the next call, not the ones up.
        for (s, n) in self.stations.iter_mut().zip(&new.stations) {
            if s.config.name == n.name {
                s.config.answer = n.answer.clone();
                s.config.may_call = n.may_call.clone();
            }
        }
        for (c, n) in self.config.stations.iter_mut().zip(&new.stations) {
            if c.name == n.name {
                c.answer = n.answer.clone();
                c.may_call = n.may_call.clone();
            }
        }
        self.agent
            .set_policy(CallPolicy::Allow(self.config.callers()));
        info!("config reloaded: answer and may_call lists applied");
        self.emit(json!({"event": "reload", "ok": true, "needs_restart": needs_restart}));
    }

    fn begin_shutdown(&mut self, now: Instant) {
        if self.shutting_down.is_some() {
            self.exit = Some(exit::OK);
            return;
        }
        self.agent.hangup_all(now);
        self.shutting_down = Some(now);
        for p in std::mem::take(&mut self.pending) {
            let _ = p.reply.try_send(Reply::error(503, "shutting down"));
        }
    }

    fn on_tick(&mut self, now: Instant) {
        for s in &mut self.stations {
            s.media.pump(&mut self.agent, now);
        }
        self.check_pending(now);
        self.resolve_turn_hosts();
        if let Some(since) = self.shutting_down {
            if self.agent.outbox_len() == 0 || now >= since + crate::live::SHUTDOWN_FLUSH {
                self.exit.get_or_insert(exit::OK);
            }
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
        let hosts = crate::live::named_hosts(&uris);
        if hosts.is_empty() {
            return;
        }
        let tx = self.tx.clone();
        // TURN servers from the config replace the homeserver's (still probed for STUN).
        let use_turn = self.config.network.turn.is_none();
        smol::spawn(async move {
            let (stun, turn) = smol::unblock(move || crate::live::resolve_hosts(&hosts)).await;
            let turn = if use_turn { turn } else { Vec::new() };
            let _ = tx.send(Msg::Servers { stun, turn }).await;
        })
        .detach();
    }

    fn next_deadline(&self, agent_at: Instant) -> Instant {
        let mut at = agent_at;
        for s in &self.stations {
            if let Some(t) = s.media.next_due() {
                at = at.min(t);
            }
        }
        if !self.pending.is_empty() || self.shutting_down.is_some() {
            at = at.min(Instant::now() + Duration::from_millis(100));
        }
        at
    }
}

impl Station {
    fn media_video(&self) -> String {
        let v = &self.config.media.video;
        // A camera URL may carry a user name: show the scheme and host only.
        match url::Url::parse(v) {
            Ok(u) if u.scheme() == "rtsp" => format!("rtsp://{}", u.host_str().unwrap_or("")),
            _ => v.clone(),
        }
    }
}

fn new_agent(
    config: &ServeConfig,
    sockets: &BTreeMap<SocketAddr, Arc<Async<UdpSocket>>>,
    credentials: Credentials,
    h264_profile: Option<call_assist_core::h264::ProfileLevelId>,
    now: Instant,
) -> Result<Agent, call_assist_core::ConfigError> {
    let addrs: Vec<SocketAddr> = sockets.keys().copied().collect();
    let mut c = AgentConfig::new(
        config.homeserver.clone(),
        config.user.clone(),
        credentials,
        addrs,
    );
    c.policy = CallPolicy::Allow(config.callers());
    c.stun_servers = crate::live::resolve_stun(&config.network.stun);
    c.relay_only = config.network.relay_only;
    c.turn = config.network.turn.as_ref().map(crate::live::static_turn);
    c.h264_profile = h264_profile;
    c.device_id = config
        .state_dir
        .as_deref()
        .and_then(|d| SavedSession::load(d, &config.homeserver, &config.user))
        .map(|s| s.device_id.as_str().into());
    Agent::new(c, crate::live::seed(), now, crate::live::unix_ms())
}

/// Runs the daemon; returns the exit code.
pub fn run(config: ServeConfig, json: bool) -> ExitCode {
    ExitCode::from(smol::block_on(run_async(config, json)))
}

async fn run_async(config: ServeConfig, json: bool) -> u8 {
    let n = &config.network;
    let ips = crate::live::local_ips(&n.interfaces, &n.exclude_interfaces, n.allow_loopback);
    if ips.is_empty() {
        eprintln!(
            "error: no usable network address (network.allow_loopback = true to use loopback)"
        );
        return exit::USAGE;
    }
    let (tx, rx): (Sender<Msg>, Receiver<Msg>) = smol::channel::bounded(INBOX);
    let sockets = crate::live::bind_udp(&ips, n.port, &tx, |local, from, data| Msg::Datagram {
        local,
        from,
        data,
    });
    if sockets.is_empty() {
        eprintln!("error: could not bind any UDP socket");
        return exit::USAGE;
    }
    let listener = match smol::net::TcpListener::bind(config.api.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: api.listen {}: {e}", config.api.listen);
            return exit::USAGE;
        }
    };
    let api_addr = listener.local_addr().unwrap_or(config.api.listen);

    // Every station's sources and sinks before anything else: nothing starts half-configured.
    let mut stations = Vec::new();
    for (i, s) in config.stations.iter().enumerate() {
        let sdp = config
            .state_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir)
            .join(format!("forward-{}.sdp", s.name));
        let started = crate::live::start_media_with(
            &s.media,
            s.video,
            s.rtsp_password.as_ref().map(|p| p.expose()),
            sdp,
            &tx,
            move |ev| Msg::Camera(i, ev),
        )
        .await;
        match started {
            Ok((media, profile)) => stations.push(Station {
                config: s.clone(),
                media,
                profile,
            }),
            Err(code) => {
                eprintln!("error: station {:?} cannot start", s.name);
                return code;
            }
        }
    }

    {
        let tx = tx.clone();
        use async_signal::Signal;
        match async_signal::Signals::new([Signal::Term, Signal::Int, Signal::Hup]) {
            Ok(mut signals) => {
                smol::spawn(async move {
                    while let Some(s) = signals.next().await {
                        let msg = match s {
                            Ok(Signal::Hup) => Msg::Reload,
                            _ => Msg::Shutdown,
                        };
                        info!(signal = ?s, "signal");
                        if tx.send(msg).await.is_err() {
                            return;
                        }
                    }
                })
                .detach();
            }
            Err(e) => warn!("cannot install signal handlers: {e}"),
        }
    }
    let client = match crate::live::http_client() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: HTTP client: {e}");
            return exit::USAGE;
        }
    };
    let saved = config
        .state_dir
        .as_deref()
        .and_then(|d| SavedSession::load(d, &config.homeserver, &config.user));
    let (credentials, password_fallback) =
        crate::live::login_credentials(&config.auth, saved.as_ref());
    let now = Instant::now();
    let first_profile = stations.first().and_then(|s| s.profile);
    let agent = match new_agent(&config, &sockets, credentials, first_profile, now) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    smol::spawn(api::serve(
        listener,
        config.api.token.clone(),
        tx.clone(),
        Msg::Api,
    ))
    .detach();
    let mut hub = Hub {
        config,
        json,
        agent,
        sockets,
        tx,
        client,
        stations,
        calls: BTreeMap::new(),
        ended_order: VecDeque::new(),
        pending: Vec::new(),
        subscribers: Vec::new(),
        synced: false,
        reachable: false,
        turn_uris_seen: Vec::new(),
        password_fallback,
        shutting_down: None,
        exit: None,
    };
    let names: Vec<String> = hub.stations.iter().map(|s| s.config.name.clone()).collect();
    hub.emit(json!({"event": "api", "listen": api_addr.to_string(),
        "token_required": hub.config.api.token.is_some(), "stations": names}));
    info!(
        "serving: API on http://{api_addr}, logging in to {} as {}",
        hub.config.homeserver, hub.config.user
    );

    loop {
        let now = Instant::now();
        hub.on_tick(now);
        let agent_at = hub.drain(now);
        if let Some(code) = hub.exit {
            return code;
        }
        let deadline = hub.next_deadline(agent_at);
        let msg = async { Some(rx.recv().await) }
            .or(async {
                smol::Timer::at(deadline).await;
                None
            })
            .await;
        let now = Instant::now();
        match msg {
            None => hub.agent.handle_input(Input::Timeout(now)),
            Some(Ok(Msg::Datagram { local, from, data })) => {
                hub.agent.handle_input(Input::Receive {
                    now,
                    source: from,
                    destination: local,
                    contents: &data,
                })
            }
            Some(Ok(Msg::Http { id, response })) => {
                hub.agent
                    .handle_input(Input::HttpResponse { now, id, response })
            }
            Some(Ok(Msg::Shutdown)) => hub.begin_shutdown(now),
            Some(Ok(Msg::Reload)) => hub.reload(),
            Some(Ok(Msg::Servers { stun, turn })) => {
                hub.agent.add_stun_servers(&stun, now);
                hub.agent.add_turn_servers(&turn, now);
            }
            Some(Ok(Msg::Camera(i, e))) => {
                if let Some(s) = hub.stations.get_mut(i) {
                    if let Some(mut line) = s.media.camera(&mut hub.agent, e, now, &mut s.profile) {
                        line["station"] = json!(s.config.name);
                        hub.emit(line);
                    }
                }
            }
            Some(Ok(Msg::Api(req))) => hub.on_api(req, now),
            Some(Err(_)) => return exit::OK,
        }
    }
}

/// `serve` arguments: `--config FILE [--json]`.
pub fn parse_args(
    args: impl Iterator<Item = String>,
) -> Result<(PathBuf, bool), config::ConfigError> {
    let mut path = None;
    let mut json = false;
    let mut args = args;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" => {
                path = Some(PathBuf::from(args.next().ok_or_else(|| {
                    config::ConfigError("--config needs a value".into())
                })?))
            }
            "--json" => json = true,
            other => return Err(config::ConfigError(format!("unknown option {other:?}"))),
        }
    }
    let path = path.ok_or_else(|| config::ConfigError("serve needs --config FILE".into()))?;
    Ok((path, json))
}
