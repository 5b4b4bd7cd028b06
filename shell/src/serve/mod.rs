//! `call-assist serve`: the hub daemon. One Matrix account, named stations (a video and audio
//! source plus sinks for the other side), a local HTTP API that starts, lists and hangs up
//! calls and streams their events, SIGHUP to reload who may call whom.
//!
//! A [`Policy`] of the live driver, with one driver station per configured station. The API's
//! connections send [`api::Request`]s into the driver's channel, so only the loop touches
//! the agent.

pub mod api;
pub mod config;
pub mod webhook;

use std::collections::{BTreeMap, VecDeque};
use std::process::ExitCode;
use std::time::Instant;

use call_assist_core::{
    AgentEvent, ApiError, CallDirection, CallPolicy, CallState, DtmfError, MediaKind, OwnedRoomId,
    OwnedUserId, RoomId,
};
use serde_json::{json, Value};
use smol::channel::Sender;
use tracing::{error, info, warn};

use self::api::{Command, Reply};
use self::config::ServeConfig;
use crate::live::driver::{
    DialError, DialId, Dialed, Driver, Msg, Policy, Setup, StationSetup, PEER_JOIN_WAIT,
};
use crate::live::exit;
use crate::live::net::unix_ms;
use crate::live::session::Account;
use crate::live::{Lines, Style};

/// Ended calls kept for `GET /calls` (the oldest is forgotten first).
const ENDED_KEPT: usize = 32;
/// Event-stream clients at once (each is also an API connection).
const MAX_SUBSCRIBERS: usize = 32;

type Hub = Driver<api::Request>;

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
    /// The last digits pressed in this call, as long as the station's PIN (a rolling window).
    pressed: String,
}

impl CallRecord {
    fn new(station: usize, direction: CallDirection, peer: String, room: String) -> Self {
        CallRecord {
            station,
            direction,
            peer,
            room,
            state: match direction {
                CallDirection::Outbound => "invite_sent",
                _ => "ringing",
            },
            started_unix_ms: unix_ms(),
            connected_at: None,
            ended: None,
            video_frames_received: 0,
            audio_frames_received: 0,
            pressed: String::new(),
        }
    }
}

/// The `serve` policy: stations, call records, the API's requests.
struct Serve {
    config: ServeConfig,
    webhooks: Vec<webhook::Webhook>,
    calls: BTreeMap<String, CallRecord>,
    ended_order: VecDeque<String>,
    /// `POST /calls` to a user without a direct room: who waits for the answer.
    dials: BTreeMap<DialId, (OwnedUserId, Sender<Reply>)>,
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

impl Policy for Serve {
    type Command = api::Request;

    fn on_event(&mut self, d: &mut Hub, e: &AgentEvent, now: Instant) {
        match e {
            AgentEvent::Synced => d
                .lines
                .emit(json!({"event": "ready", "user": self.config.user.as_str()})),
            AgentEvent::IncomingCall {
                call_id,
                from,
                room_id,
                ..
            } => {
                let station = self.config.answering_station(from.as_str());
                d.lines.emit(
                    json!({"event": "incoming", "call_id": call_id, "from": from,
                    "room_id": room_id, "station": station.map(|i| self.station_name(i))}),
                );
                let Some(i) = station else {
                    info!(%call_id, "no station answers {from}: left ringing");
                    return;
                };
                let rec = CallRecord::new(
                    i,
                    CallDirection::Inbound,
                    from.to_string(),
                    room_id.to_string(),
                );
                self.calls.insert(call_id.clone(), rec);
                if let Err(err) = d.answer(call_id, i, now) {
                    warn!(%call_id, "cannot answer: {err}");
                }
            }
            AgentEvent::CallStateChanged { call_id, state } => {
                if let Some(rec) = self.calls.get_mut(call_id) {
                    rec.state = state_name(*state);
                    if *state == CallState::Connected {
                        rec.connected_at.get_or_insert(now);
                    }
                }
            }
            AgentEvent::Media(f) => {
                if let Some(rec) = self.calls.get_mut(f.call_id.as_str()) {
                    match f.kind {
                        MediaKind::Video => rec.video_frames_received += 1,
                        MediaKind::Audio => rec.audio_frames_received += 1,
                    }
                }
            }
            AgentEvent::Dtmf {
                call_id,
                digit,
                duration_ms,
            } => self.on_dtmf(d, call_id, *digit, *duration_ms),
            AgentEvent::CallEnded {
                call_id,
                reason,
                by,
            } => {
                let Some(rec) = self.calls.get_mut(call_id) else {
                    return;
                };
                rec.state = "ended";
                let by = if *by == call_assist_core::Party::Local {
                    "local"
                } else {
                    "remote"
                };
                rec.ended = Some((reason.to_string(), by));
                self.ended_order.push_back(call_id.clone());
                while self.ended_order.len() > ENDED_KEPT {
                    if let Some(old) = self.ended_order.pop_front() {
                        self.calls.remove(&old);
                    }
                }
            }
            _ => {}
        }
    }

    fn on_dial(&mut self, d: &mut Hub, dial: DialId, outcome: Dialed, now: Instant) {
        let Some((peer, reply)) = self.dials.remove(&dial) else {
            return;
        };
        let r = match outcome {
            Ok((call_id, room)) => self.placed(d, &call_id, &room, now),
            Err(DialError::Room(m)) => {
                Reply::error(502, format!("cannot create a direct room with {peer}: {m}"))
            }
            Err(DialError::NoJoin) => Reply::error(
                504,
                format!(
                    "{peer} did not join a direct room within {} s",
                    PEER_JOIN_WAIT.as_secs()
                ),
            ),
            Err(DialError::Place(room, e)) => place_error(&room, e),
            Err(DialError::ShuttingDown) => Reply::error(503, "shutting down"),
        };
        let _ = reply.try_send(r);
    }

    fn on_command(&mut self, d: &mut Hub, req: api::Request, now: Instant) {
        let reply = match req.command {
            Command::Health => self.health(d),
            Command::Stations => self.stations(d),
            Command::ListCalls => Reply::Json(
                200,
                json!(self
                    .calls
                    .iter()
                    .map(|(id, r)| self.call_json(d, id, r, now))
                    .collect::<Vec<_>>()),
            ),
            Command::GetCall(id) => match self.calls.get(&id) {
                Some(r) => Reply::Json(200, self.call_json(d, &id, r, now)),
                None => Reply::error(404, format!("no call {id:?}")),
            },
            Command::Hangup(id) => self.hangup(d, &id, now),
            Command::RequestKeyframe(id) => self.request_keyframe(d, &id, now),
            Command::SendDtmf { id, digits } => self.send_dtmf(d, &id, &digits, now),
            Command::Mute { id, muted } => self.mute(d, &id, muted),
            Command::Subscribe => match d.lines.subscribe(MAX_SUBSCRIBERS, api::EVENT_QUEUE) {
                Some(rx) => Reply::Events(rx),
                None => Reply::error(
                    503,
                    format!("at most {MAX_SUBSCRIBERS} event streams at once"),
                ),
            },
            Command::StartCall { station, to } => {
                match self.start_call(d, &station, &to, &req.reply, now) {
                    Some(r) => r,
                    None => return,
                }
            }
        };
        let _ = req.reply.try_send(reply);
    }

    /// Dials nobody waits for any more are dropped.
    fn on_tick(&mut self, d: &mut Hub, _now: Instant) {
        self.dials.retain(|id, (_, reply)| {
            let waiting = !reply.is_closed();
            if !waiting {
                d.cancel_dial(*id);
            }
            waiting
        });
    }

    fn stop_code(&self, _d: &Hub) -> u8 {
        exit::OK
    }

    fn on_reload(&mut self, d: &mut Hub) {
        self.reload(d);
    }
}

/// Adds `digit` to the rolling window of a call's last digits: true when the window now ends
/// with `pin` (the window then starts over, so one entry opens once). Compared without an
/// early exit, so timing does not tell how much of a guess was right.
fn pin_entered(window: &mut String, digit: char, pin: &str) -> bool {
    window.push(digit);
    let keep = pin.chars().count();
    while window.chars().count() > keep {
        window.remove(0);
    }
    let same = window.len() == pin.len()
        && window
            .bytes()
            .zip(pin.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        window.clear();
    }
    same
}

fn place_error(room: &RoomId, e: ApiError) -> Reply {
    match e {
        ApiError::TooManyCalls => Reply::error(503, "too many calls in progress"),
        e => Reply::error(409, format!("cannot call in {room}: {e}")),
    }
}

impl Serve {
    fn station_name(&self, i: usize) -> &str {
        self.config.stations.get(i).map_or("?", |s| s.name.as_str())
    }

    fn call_json(&self, d: &Hub, id: &str, rec: &CallRecord, now: Instant) -> Value {
        let info = d.agent.call_info(id);
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
            "talkback": d.stations.get(rec.station).and_then(|s| s.media.muted(id))
                .map(|m| if m { "muted" } else { "unmuted" }),
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

    fn health(&self, d: &Hub) -> Reply {
        let ok = d.synced && d.reachable;
        let active = self.calls.values().filter(|c| c.ended.is_none()).count();
        let stations: Vec<Value> = self
            .config
            .stations
            .iter()
            .zip(&d.stations)
            .map(|(c, s)| {
                json!({"name": c.name, "camera_up": s.media.camera_up,
                    "talkback": s.media.talkback_state(),
                    "speaker": s.media.speaker_state()})
            })
            .collect();
        Reply::Json(
            if ok { 200 } else { 503 },
            json!({
                "status": if ok { "ok" } else { "degraded" },
                "synced": d.synced,
                "homeserver_reachable": d.reachable,
                "user": self.config.user.as_str(),
                "active_calls": active,
                "panics_caught": d.agent.panics_caught(),
                "stations": stations,
                "webhooks": self.webhooks.iter().map(webhook::Webhook::health).collect::<Vec<_>>(),
            }),
        )
    }

    fn stations(&self, d: &Hub) -> Reply {
        let list: Vec<Value> = self
            .config
            .stations
            .iter()
            .zip(&d.stations)
            .map(|(c, s)| {
                json!({
                    "name": c.name,
                    "video": c.media_video(),
                    "camera_up": s.media.camera_up,
                    "talkback": s.media.talkback_state(),
                    "speaker": s.media.speaker_state(),
                    "answer": c.answer,
                    "may_call": c.may_call,
                })
            })
            .collect();
        Reply::Json(200, json!(list))
    }

    /// The call, if it is one of ours and still up.
    fn live_call(&self, id: &str) -> Result<(), Reply> {
        match self.calls.get(id) {
            None => Err(Reply::error(404, format!("no call {id:?}"))),
            Some(r) if r.ended.is_some() => {
                Err(Reply::error(409, format!("call {id:?} has already ended")))
            }
            Some(_) => Ok(()),
        }
    }

    fn hangup(&self, d: &mut Hub, id: &str, now: Instant) -> Reply {
        if let Err(r) = self.live_call(id) {
            return r;
        }
        match d.agent.hangup(id, now) {
            Ok(()) => {
                info!(call_id = %id, "hanging up (API)");
                let r = self.calls.get(id);
                Reply::Json(
                    200,
                    r.map_or(json!({"id": id}), |r| self.call_json(d, id, r, now)),
                )
            }
            Err(e) => Reply::error(409, format!("cannot hang up {id:?}: {e}")),
        }
    }

    fn request_keyframe(&self, d: &mut Hub, id: &str, now: Instant) -> Reply {
        if let Err(r) = self.live_call(id) {
            return r;
        }
        match d.agent.request_keyframe(id, now) {
            Ok(sent) => {
                info!(call_id = %id, sent, "keyframe request (API)");
                Reply::Json(200, json!({"id": id, "requested": sent}))
            }
            Err(e) => Reply::error(409, format!("cannot ask {id:?} for a keyframe: {e}")),
        }
    }

    /// `POST /calls/ID/mute` and `/unmute`: the call's audio toward the door only (the call
    /// itself and what the owner hears are not touched). 409 for a station with neither
    /// talkback nor the hub's speaker.
    fn mute(&mut self, d: &mut Hub, id: &str, muted: bool) -> Reply {
        if let Err(r) = self.live_call(id) {
            return r;
        }
        let Some(station) = self.calls.get(id).map(|r| r.station) else {
            return Reply::error(404, format!("no call {id:?}"));
        };
        let name = self.station_name(station).to_owned();
        let Some(s) = d.stations.get_mut(station) else {
            return Reply::error(404, format!("no station {name:?}"));
        };
        match s.media.set_muted(id, muted) {
            Ok(()) => {
                info!(call_id = %id, muted, "talkback (API)");
                let state = if muted { "muted" } else { "unmuted" };
                d.lines.emit(
                    json!({"event": "talkback", "state": state, "call_id": id, "station": name}),
                );
                Reply::Json(200, json!({"id": id, "talkback": state}))
            }
            Err(_) => Reply::error(
                409,
                format!("station {name:?} has no speaker (set talkback = true or speaker)"),
            ),
        }
    }

    /// `POST /calls/ID/dtmf`: bad digits are the client's fault (400); a call not connected
    /// yet, or whose peer did not negotiate telephone-event, cannot take them now (409).
    fn send_dtmf(&self, d: &mut Hub, id: &str, digits: &str, now: Instant) -> Reply {
        if let Err(r) = self.live_call(id) {
            return r;
        }
        match d.agent.send_dtmf(id, digits, now) {
            Ok(()) => {
                info!(call_id = %id, count = digits.chars().count(), "sending DTMF (API)");
                Reply::Json(200, json!({"id": id, "queued": digits.chars().count()}))
            }
            Err(ApiError::Dtmf(
                e @ (DtmfError::Empty | DtmfError::InvalidDigit(_) | DtmfError::TooLong { .. }),
            )) => Reply::error(400, format!("\"digits\": {e}")),
            Err(e) => Reply::error(409, format!("cannot send DTMF in {id:?}: {e}")),
        }
    }

    /// A key pressed in a call: the `dtmf` line, and `door` when it completes the station's
    /// PIN. On a station with a PIN the line leaves the digit out: it may be part of the PIN.
    fn on_dtmf(&mut self, d: &mut Hub, call_id: &str, digit: char, duration_ms: u64) {
        let Some(rec) = self.calls.get_mut(call_id) else {
            return;
        };
        let station = self.config.stations.get(rec.station);
        let name = station.map_or("?", |s| s.name.as_str());
        let pin = station.and_then(|s| s.pin.as_ref());
        let shown = if pin.is_some() {
            Value::Null
        } else {
            json!(digit.to_string())
        };
        d.lines
            .emit(json!({"event": "dtmf", "call_id": call_id, "station": name,
            "digit": shown, "duration_ms": duration_ms}));
        let Some(pin) = pin else { return };
        if pin_entered(&mut rec.pressed, digit, pin.expose()) {
            info!(%call_id, station = name, "PIN entered: door opened");
            d.lines
                .emit(json!({"event": "door", "action": "door_opened",
                "call_id": call_id, "station": name}));
        }
    }

    /// `POST /calls`: the reply, or `None` when it comes later (waiting for a direct room).
    fn start_call(
        &mut self,
        d: &mut Hub,
        station: &str,
        to: &str,
        reply: &Sender<Reply>,
        now: Instant,
    ) -> Option<Reply> {
        let Some(i) = self.config.stations.iter().position(|s| s.name == station) else {
            let names: Vec<&str> = self
                .config
                .stations
                .iter()
                .map(|s| s.name.as_str())
                .collect();
            return Some(Reply::error(
                404,
                format!("no station {station:?} (stations: {})", names.join(", ")),
            ));
        };
        if d.shutting_down() {
            return Some(Reply::error(503, "shutting down"));
        }
        if !d.synced {
            return Some(Reply::error(503, "not connected to the homeserver yet"));
        }
        let peer = match self.callee(d, to) {
            Ok(p) => p,
            Err(r) => return Some(r),
        };
        let may_call = self
            .config
            .stations
            .get(i)
            .is_some_and(|s| s.may_call.contains(&peer.0));
        if !may_call {
            return Some(Reply::error(
                403,
                format!("station {station:?} may not call {} (see may_call)", peer.0),
            ));
        }
        match peer.1 {
            Some(room) => Some(match d.place(&room, i, now) {
                Ok(call_id) => self.placed(d, &call_id, &room, now),
                Err(e) => place_error(&room, e),
            }),
            None => {
                let dial = d.call_user(&peer.0, i, now);
                self.dials.insert(dial, (peer.0, reply.clone()));
                None
            }
        }
    }

    /// Who `to` is (a user, or the other member of a 1:1 room), and the room if it is one.
    fn callee(&self, d: &Hub, to: &str) -> Result<(OwnedUserId, Option<OwnedRoomId>), Reply> {
        if to.starts_with('@') {
            let peer = OwnedUserId::try_from(to).map_err(|_| {
                Reply::error(400, format!("\"to\": {to:?} is not a Matrix user id"))
            })?;
            return Ok((peer, None));
        }
        if !to.starts_with('!') {
            return Err(Reply::error(
                400,
                format!("\"to\": {to:?} is neither a user (@user:server) nor a room (!room)"),
            ));
        }
        let room = OwnedRoomId::try_from(to)
            .map_err(|_| Reply::error(400, format!("\"to\": {to:?} is not a room id")))?;
        match d.agent.room_peer(&room) {
            Some(peer) => Ok((peer, Some(room))),
            None => Err(Reply::error(
                404,
                format!("{room} is not a 1:1 room the hub is in"),
            )),
        }
    }

    /// A call we placed: its record, and the API's 201 answer.
    fn placed(&mut self, d: &Hub, call_id: &str, room: &RoomId, now: Instant) -> Reply {
        let station = d.station_of(call_id).unwrap_or(0);
        let peer = d
            .agent
            .room_peer(room)
            .map(|p| p.to_string())
            .unwrap_or_default();
        info!(%call_id, station = self.station_name(station), "calling in {room}");
        let rec = CallRecord::new(station, CallDirection::Outbound, peer, room.to_string());
        let body = self.call_json(d, call_id, &rec, now);
        self.calls.insert(call_id.to_owned(), rec);
        Reply::Json(201, body)
    }

    fn reload(&mut self, d: &mut Hub) {
        let new = match ServeConfig::load(&self.config.path, |k| std::env::var(k).ok()) {
            Ok(c) => c,
            Err(e) => {
                error!("config reload failed, keeping the running config: {e}");
                d.lines
                    .emit(json!({"event": "reload", "ok": false, "message": e.0}));
                return;
            }
        };
        let needs_restart = self.config.needs_restart(&new);
        for k in &needs_restart {
            warn!("config reload: {k} changed; that needs a restart (the running value stays)");
        }
        // Only the allow lists and PINs change in place: they decide the next call or digit.
        for (c, n) in self.config.stations.iter_mut().zip(&new.stations) {
            if c.name == n.name {
                c.answer = n.answer.clone();
                c.may_call = n.may_call.clone();
                c.pin = n.pin.clone();
            }
        }
        d.agent.set_policy(CallPolicy::Allow(self.config.callers()));
        info!("config reloaded: answer, may_call and pin applied");
        d.lines
            .emit(json!({"event": "reload", "ok": true, "needs_restart": needs_restart}));
    }
}

/// Runs the daemon; returns the exit code.
pub fn run(config: ServeConfig, json: bool) -> ExitCode {
    ExitCode::from(smol::block_on(run_async(config, json)))
}

async fn run_async(config: ServeConfig, json: bool) -> u8 {
    let listener = match smol::net::TcpListener::bind(config.api.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: api.listen {}: {e}", config.api.listen);
            return exit::USAGE;
        }
    };
    let api_addr = listener.local_addr().unwrap_or(config.api.listen);
    let setup = Setup {
        account: Account {
            homeserver: config.homeserver.clone(),
            user: config.user.clone(),
            auth: config.auth.clone(),
            state_dir: config.state_dir.clone(),
            encrypt_new_dms: config.encrypt_new_dms,
        },
        network: config.network.clone(),
        stations: config
            .stations
            .iter()
            .map(|s| StationSetup {
                name: Some(s.name.clone()),
                media: s.media.clone(),
                video: s.video,
                rtsp_password: s.rtsp_password.clone(),
            })
            .collect(),
        policy: CallPolicy::Allow(config.callers()),
        lines: Lines::new(if json { Style::Json } else { Style::Log }),
        give_up_unreachable: false,
        reload_on_hup: true,
    };
    let (mut hub, rx) = match Hub::start(setup).await {
        Ok(d) => d,
        Err(code) => return code,
    };
    let mut webhooks = Vec::new();
    for w in &config.webhooks {
        match webhook::start(w) {
            Ok(w) => {
                info!(webhook = %w.shown, events = ?w.events, "webhook");
                hub.lines
                    .add_sink(w.events.clone(), w.tx.clone(), w.dropped.clone());
                webhooks.push(w);
            }
            Err(e) => {
                eprintln!("error: webhook HTTP client: {e}");
                return exit::USAGE;
            }
        }
    }
    let token = config.api.token.clone();
    smol::spawn(api::serve(listener, token, hub.sender(), Msg::Command)).detach();
    let names: Vec<&str> = config.stations.iter().map(|s| s.name.as_str()).collect();
    hub.lines
        .emit(json!({"event": "api", "listen": api_addr.to_string(),
        "token_required": config.api.token.is_some(), "stations": names}));
    info!(
        "serving: API on http://{api_addr}, logging in to {} as {}",
        config.homeserver, config.user
    );
    let mut serve = Serve {
        config,
        webhooks,
        calls: BTreeMap::new(),
        ended_order: VecDeque::new(),
        dials: BTreeMap::new(),
    };
    hub.run(rx, &mut serve).await
}

#[cfg(test)]
mod tests {
    use super::pin_entered;

    fn press(window: &mut String, digits: &str, pin: &str) -> Vec<bool> {
        digits
            .chars()
            .map(|d| pin_entered(window, d, pin))
            .collect()
    }

    #[test]
    fn only_the_exact_pin_opens_once_per_entry() {
        let mut w = String::new();
        assert_eq!(press(&mut w, "1234", "1234"), [false, false, false, true]);
        // The window starts over: the next digits alone do not open again.
        assert_eq!(press(&mut w, "4", "1234"), [false]);
    }

    #[test]
    fn a_wrong_digit_opens_nothing_and_the_pin_after_it_does() {
        let mut w = String::new();
        assert!(!press(&mut w, "1294", "1234").contains(&true));
        assert!(!press(&mut w, "123", "1234").contains(&true));
        assert_eq!(
            press(&mut w, "91234", "1234"),
            [false, false, false, false, true]
        );
        assert!(!press(&mut w, "4321", "1234").contains(&true));
        assert!(w.chars().count() <= 4);
    }
}
