//! A deterministic simulated Matrix homeserver.
//!
//! It answers the raw `http::Request<Vec<u8>>` bytes the core builds with ruma (client-server
//! API v3 paths, `r0` accepted too) on a virtual clock: requests come in with an `Instant`,
//! answers leave through [`SimHomeserver::poll_response`] once their due time has passed. No
//! sockets, threads, real time or randomness, and only `BTreeMap`s, so the same call sequence
//! always gives the same bytes.
//!
//! Events added without an `Instant` (`inject_event`, `create_room`, `join`) release held
//! long-polls at the latest instant the server has seen: that is "now" on its virtual clock.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use http::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde_json::{json, Map, Value};

/// Opaque request tag chosen by the caller; the answer carries it back.
pub type Ticket = u64;

/// Transport-level failure of a simulated request (no HTTP response at all).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SimHttpError {
    ConnectionRefused,
    Timeout,
}

/// A fault injected into the next requests, in arrival order. The faulted request is not
/// processed (a faulted send stores nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    Status502,
    Status429 {
        retry_after_ms: u64,
    },
    /// Swallowed and never answered: the client's own timeout has to fire.
    Hang,
}

type Resp = Response<Vec<u8>>;
type HttpResult = Result<Resp, SimHttpError>;
/// A logged-in device: `(user, device_id)`. Each has its own sync stream and txn-id scope.
type DeviceKey = (OwnedUserId, String);

/// Non-state events in an initial sync timeline.
const INITIAL_TIMELINE_LIMIT: usize = 10;
const DEFAULT_LATENCY: Duration = Duration::from_millis(5);
/// How long a refused connection takes to fail while the server is down.
const REFUSED_AFTER: Duration = Duration::from_millis(1);
const ROOM_VERSION: &str = "10";
const FALLBACK_SERVER_NAME: &str = "sim.local";

#[derive(Debug, Clone)]
struct StoredEvent {
    pos: u64,
    event_type: String,
    sender: OwnedUserId,
    state_key: Option<String>,
    content: Value,
    origin_server_ts: u64,
    /// Sending device and its txn id; only that device sees `unsigned.transaction_id`.
    txn: Option<(DeviceKey, String)>,
}

impl StoredEvent {
    /// An event not yet in a room (`append` gives it its stream position).
    fn new(
        sender: &UserId,
        event_type: &str,
        state_key: Option<&str>,
        content: Value,
        ts: u64,
    ) -> Self {
        Self {
            pos: 0,
            event_type: event_type.to_owned(),
            sender: sender.to_owned(),
            state_key: state_key.map(str::to_owned),
            content,
            origin_server_ts: ts,
            txn: None,
        }
    }

    fn event_id(&self) -> String {
        format!("$e{}", self.pos)
    }

    fn base_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("type".into(), json!(self.event_type));
        m.insert("content".into(), self.content.clone());
        m.insert("sender".into(), json!(self.sender));
        m.insert("event_id".into(), json!(self.event_id()));
        m.insert("origin_server_ts".into(), json!(self.origin_server_ts));
        if let Some(key) = &self.state_key {
            m.insert("state_key".into(), json!(key));
        }
        m
    }

    /// The event as `viewer` receives it in /sync at wall-clock `unix_ms`.
    fn sync_json(&self, viewer: &DeviceKey, unix_ms: u64) -> Value {
        let mut unsigned = Map::new();
        unsigned.insert(
            "age".into(),
            json!(unix_ms.saturating_sub(self.origin_server_ts)),
        );
        if let Some((_, txn_id)) = self.txn.as_ref().filter(|(device, _)| device == viewer) {
            unsigned.insert("transaction_id".into(), json!(txn_id));
        }
        let mut m = self.base_json();
        m.insert("unsigned".into(), Value::Object(unsigned));
        Value::Object(m)
    }
}

#[derive(Debug, Default)]
struct Room {
    members: BTreeSet<OwnedUserId>,
    events: Vec<StoredEvent>,
}

impl Room {
    fn last_pos(&self) -> u64 {
        self.events.last().map_or(0, |e| e.pos)
    }

    /// State as of stream position `upto`: the last event per `(type, state_key)`, in stream order.
    fn state_at(&self, upto: u64) -> Vec<&StoredEvent> {
        let mut state: BTreeMap<(&str, &str), &StoredEvent> = BTreeMap::new();
        for e in self.events.iter().filter(|e| e.pos <= upto) {
            if let Some(key) = &e.state_key {
                state.insert((&e.event_type, key), e);
            }
        }
        let mut out: Vec<&StoredEvent> = state.into_values().collect();
        out.sort_by_key(|e| e.pos);
        out
    }

    fn join_pos(&self, user: &UserId) -> u64 {
        let is_own_member = |e: &&StoredEvent| {
            e.event_type == "m.room.member" && e.state_key.as_deref() == Some(user.as_str())
        };
        self.events
            .iter()
            .rev()
            .find(is_own_member)
            .map_or(0, |e| e.pos)
    }
}

/// A to-device message waiting for its recipient's devices (stream ordered like room events).
#[derive(Debug, Clone)]
struct ToDevice {
    pos: u64,
    to: OwnedUserId,
    event: Value,
}

/// To-device messages kept for late syncs; past this the oldest are dropped.
const MAX_TO_DEVICE: usize = 4096;

/// A /sync long-poll waiting for news or for its timeout.
#[derive(Debug)]
struct HeldSync {
    ticket: Ticket,
    device: DeviceKey,
    since: u64,
    arrived: Instant,
    /// `None` when `timeout` is too large to represent: held until news or the server goes down.
    deadline: Option<Instant>,
}

/// One request being processed.
struct Ctx<'a> {
    ticket: Ticket,
    now: Instant,
    unix_ms: u64,
    body: &'a [u8],
}

#[derive(Debug)]
enum Route {
    Versions,
    LoginFlows,
    Login,
    Sync,
    Send {
        room: String,
        event_type: String,
        txn_id: String,
    },
    TurnServer,
    JoinedMembers {
        room: String,
    },
    CreateRoom,
    WhoAmI,
}

/// Deterministic in-memory homeserver driven by a virtual clock.
#[derive(Debug)]
pub struct SimHomeserver {
    server_name: String,
    /// localpart -> password
    accounts: BTreeMap<String, String>,
    tokens: BTreeMap<String, DeviceKey>,
    rooms: BTreeMap<OwnedRoomId, Room>,
    /// To-device messages (the encryption stand-in's room keys), every device of the user.
    to_device: VecDeque<ToDevice>,
    txns: BTreeMap<(DeviceKey, String), String>,
    held: Vec<HeldSync>,
    /// Answers keyed by (due, ticket, arrival sequence) so equal tickets never collide.
    due: BTreeMap<(Instant, Ticket, u64), HttpResult>,
    faults: VecDeque<(usize, Fault)>,
    turn: Option<Value>,
    /// coturn-style REST credentials: (uris, shared secret, ttl s), made per request.
    turn_rest: Option<(Vec<String>, String, u64)>,
    latency: Duration,
    down: bool,
    last_now: Option<Instant>,
    last_unix_ms: u64,
    stream_pos: u64,
    next_seq: u64,
    next_device: u64,
    next_token: u64,
    next_room: u64,
    served: u64,
    /// Rewrites the content of events clients send (an attacker between client and server).
    tamper: Option<TamperFn>,
}

/// See [`SimHomeserver::set_tamper`].
pub type Tamper = Box<dyn FnMut(&str, &mut Value)>;

struct TamperFn(Tamper);

impl std::fmt::Debug for TamperFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tamper")
    }
}

impl SimHomeserver {
    /// A server named `server_name` (an invalid name falls back to "sim.local").
    pub fn new(server_name: &str) -> Self {
        let server_name = if ruma::ServerName::parse(server_name).is_ok() {
            server_name.to_owned()
        } else {
            tracing::warn!(
                server_name,
                "invalid sim server name, using {FALLBACK_SERVER_NAME}"
            );
            FALLBACK_SERVER_NAME.to_owned()
        };
        Self {
            server_name,
            accounts: BTreeMap::new(),
            tokens: BTreeMap::new(),
            rooms: BTreeMap::new(),
            to_device: VecDeque::new(),
            txns: BTreeMap::new(),
            held: Vec::new(),
            due: BTreeMap::new(),
            faults: VecDeque::new(),
            turn: None,
            turn_rest: None,
            latency: DEFAULT_LATENCY,
            down: false,
            last_now: None,
            last_unix_ms: 0,
            stream_pos: 0,
            next_seq: 0,
            next_device: 0,
            next_token: 0,
            next_room: 0,
            served: 0,
            tamper: None,
        }
    }

    // ---- getters ----

    #[must_use]
    pub fn base_url(&self) -> String {
        format!("http://{}", self.server_name)
    }

    #[must_use]
    pub fn is_down(&self) -> bool {
        self.down
    }

    /// Requests that reached the server while it was up (faulted ones included).
    #[must_use]
    pub fn requests_served(&self) -> u64 {
        self.served
    }

    /// Every event in the room timeline, in order, with `room_id` and without `unsigned`.
    #[must_use]
    pub fn room_events(&self, room: &RoomId) -> Vec<Value> {
        let Some(r) = self.rooms.get(room) else {
            return Vec::new();
        };
        let with_room = |e: &StoredEvent| {
            let mut m = e.base_json();
            m.insert("room_id".into(), json!(room));
            Value::Object(m)
        };
        r.events.iter().map(with_room).collect()
    }

    // ---- world setup (test and demo scaffolding) ----

    /// Registers (or re-passwords) `localpart`; characters not allowed in a localpart become `_`.
    pub fn register_user(&mut self, localpart: &str, password: &str) -> OwnedUserId {
        let allowed = |c: char| c.is_ascii_alphanumeric() || "._=-/+".contains(c);
        let mut local: String = localpart
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .map(|c| if allowed(c) { c } else { '_' })
            .collect();
        if local.is_empty() {
            local.push_str("user");
        }
        self.accounts.insert(local.clone(), password.to_owned());
        self.user_id(&local)
    }

    /// Creates a room with all `members` joined (first is creator), ids like "!r1:sim.local".
    pub fn create_room(&mut self, members: &[&UserId], public: bool, unix_ms: u64) -> OwnedRoomId {
        let owned: Vec<OwnedUserId> = members.iter().map(|u| (*u).to_owned()).collect();
        let room_id = self.create_room_inner(&owned, public, false, unix_ms);
        self.release_held(&room_id, self.last_now, unix_ms);
        room_id
    }

    /// Joins `user` to `room` (no-op if the room is unknown or the user already joined).
    pub fn join(&mut self, room: &RoomId, user: &UserId, unix_ms: u64) {
        let Some(r) = self.rooms.get_mut(room) else {
            tracing::warn!(%room, "sim join: unknown room");
            return;
        };
        if r.members.insert(user.to_owned()) {
            let content = json!({ "membership": "join", "displayname": user.localpart() });
            self.append(
                room,
                StoredEvent::new(user, "m.room.member", Some(user.as_str()), content, unix_ms),
            );
            self.release_held(room, self.last_now, self.last_unix_ms.max(unix_ms));
        }
    }

    /// Appends a raw non-state event as if `sender` sent it. Returns "" for an unknown room.
    pub fn inject_event(
        &mut self,
        room: &RoomId,
        sender: &UserId,
        event_type: &str,
        content: Value,
        unix_ms: u64,
    ) -> String {
        let id = self.append(
            room,
            StoredEvent::new(sender, event_type, None, content, unix_ms),
        );
        self.release_held(room, self.last_now, self.last_unix_ms.max(unix_ms));
        id.unwrap_or_default()
    }

    /// Appends several events before any waiting /sync is answered, so they reach the
    /// members in one sync batch. Returns their ids (empty for an unknown room).
    pub fn inject_batch(
        &mut self,
        room: &RoomId,
        sender: &UserId,
        events: Vec<(&str, Value)>,
        unix_ms: u64,
    ) -> Vec<String> {
        let ids = events
            .into_iter()
            .filter_map(|(event_type, content)| {
                self.append(
                    room,
                    StoredEvent::new(sender, event_type, None, content, unix_ms),
                )
            })
            .collect();
        self.release_held(room, self.last_now, self.last_unix_ms.max(unix_ms));
        ids
    }

    /// Turns on end-to-end encryption in `room` (an `m.room.encryption` state event from its
    /// creator), as Element's "Start chat" does.
    pub fn enable_encryption(&mut self, room: &RoomId, unix_ms: u64) {
        let Some(creator) = self
            .rooms
            .get(room)
            .and_then(|r| r.events.first())
            .map(|e| e.sender.clone())
        else {
            tracing::warn!(%room, "sim enable_encryption: unknown room");
            return;
        };
        let content = json!({ "algorithm": "m.megolm.v1.aes-sha2" });
        self.append(
            room,
            StoredEvent::new(&creator, "m.room.encryption", Some(""), content, unix_ms),
        );
        self.release_held(room, self.last_now, self.last_unix_ms.max(unix_ms));
    }

    /// A to-device `event` for every device of `to` (in their next /sync, which it wakes).
    pub fn send_to_device(&mut self, to: &UserId, event: Value, unix_ms: u64) {
        if self.to_device.len() >= MAX_TO_DEVICE {
            self.to_device.pop_front();
        }
        self.stream_pos += 1;
        self.to_device.push_back(ToDevice {
            pos: self.stream_pos,
            to: to.to_owned(),
            event,
        });
        let unix_ms = self.last_unix_ms.max(unix_ms);
        let (ready, waiting): (Vec<HeldSync>, Vec<HeldSync>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| h.device.0 == to);
        self.held = waiting;
        self.answer_held(ready, self.last_now, unix_ms);
    }

    pub fn set_turn_server(
        &mut self,
        uris: Vec<String>,
        username: String,
        password: String,
        ttl_s: u64,
    ) {
        let (uris, username, password) = (
            Value::from(uris),
            Value::from(username),
            Value::from(password),
        );
        self.turn =
            Some(json!({ "username": username, "password": password, "uris": uris, "ttl": ttl_s }));
    }

    /// Answers `/voip/turnServer` like Synapse with `turn_shared_secret`: a username
    /// `<expiry>:<user id>` valid for `ttl_s`, its password the secret's HMAC of it.
    pub fn set_turn_shared_secret(&mut self, uris: Vec<String>, secret: &str, ttl_s: u64) {
        self.turn_rest = Some((uris, secret.to_owned(), ttl_s));
    }

    fn turn_server(&self, cx: &Ctx, device: &DeviceKey) -> Value {
        if let Some((uris, secret, ttl)) = &self.turn_rest {
            let expiry = cx.unix_ms / 1000 + ttl;
            let (username, password) =
                super::turn::rest_credentials(secret, device.0.as_str(), expiry);
            return json!({ "username": username, "password": password, "uris": uris, "ttl": ttl });
        }
        self.turn.clone().unwrap_or_else(|| json!({}))
    }

    // ---- faults ----

    /// Added to every answer (default 5 ms).
    /// Every event a client sends passes through `f(event_type, content)` before it is stored:
    /// for tests of what a man in the middle (or a broken client) can do.
    pub fn set_tamper(&mut self, f: Tamper) {
        self.tamper = Some(TamperFn(f));
    }

    pub fn set_latency(&mut self, d: Duration) {
        self.latency = d;
    }

    /// While down, new requests are refused after 1 ms and held long-polls are refused at `now`.
    /// Stored events are kept.
    pub fn set_down(&mut self, down: bool, now: Instant) {
        self.observe(now, self.last_unix_ms);
        self.down = down;
        if down {
            for h in std::mem::take(&mut self.held) {
                self.schedule(now, h.ticket, Err(SimHttpError::ConnectionRefused));
            }
        }
    }

    /// The next `n` requests (in arrival order, any endpoint) get `fault` instead of an answer.
    /// Calls queue up: `fail_next(1, A); fail_next(1, B)` faults two requests, A then B.
    pub fn fail_next(&mut self, n: usize, fault: Fault) {
        if n > 0 {
            self.faults.push_back((n, fault));
        }
    }

    // ---- I/O ----

    /// A request arrives at `now`; its answer becomes available later through `poll_response`.
    pub fn handle_request(
        &mut self,
        ticket: Ticket,
        req: Request<Vec<u8>>,
        now: Instant,
        unix_ms: u64,
    ) {
        self.observe(now, unix_ms);
        tracing::debug!(ticket, method = %req.method(), path = req.uri().path(), "sim homeserver request");
        if self.down {
            self.schedule(
                after(now, REFUSED_AFTER),
                ticket,
                Err(SimHttpError::ConnectionRefused),
            );
            return;
        }
        self.served += 1;
        let resp = match self.take_fault() {
            Some(Fault::Hang) => return,
            Some(Fault::Status502) => {
                Some(error(StatusCode::BAD_GATEWAY, "M_UNKNOWN", "Bad gateway").response())
            }
            Some(Fault::Status429 { retry_after_ms }) => {
                let body = json!({
                    "errcode": "M_LIMIT_EXCEEDED",
                    "error": "Too many requests",
                    "retry_after_ms": retry_after_ms,
                });
                let mut resp = json_response(StatusCode::TOO_MANY_REQUESTS, &body);
                resp.headers_mut().insert(
                    RETRY_AFTER,
                    HeaderValue::from(retry_after_ms.div_ceil(1000)),
                );
                Some(resp)
            }
            None => {
                let cx = Ctx {
                    ticket,
                    now,
                    unix_ms,
                    body: req.body(),
                };
                self.dispatch(&cx, req.method(), req.uri(), req.headers())
            }
        };
        if let Some(resp) = resp {
            self.schedule(after(now, self.latency), ticket, Ok(resp));
        }
    }

    /// Next answer due at or before `now`, in order of due time, then ticket.
    #[must_use]
    pub fn poll_response(&mut self, now: Instant, unix_ms: u64) -> Option<(Ticket, HttpResult)> {
        self.observe(now, unix_ms);
        self.expire_held(now, unix_ms);
        let (&(due, _, _), _) = self.due.first_key_value()?;
        if due > now {
            return None;
        }
        self.due
            .pop_first()
            .map(|((_, ticket, _), result)| (ticket, result))
    }

    /// Earliest instant at which `poll_response` will have something.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let answers = self.due.keys().next().map(|k| k.0);
        let expiries = self
            .held
            .iter()
            .filter_map(|h| h.deadline)
            .map(|d| after(d, self.latency));
        answers.into_iter().chain(expiries).min()
    }

    // ---- internals ----

    fn observe(&mut self, now: Instant, unix_ms: u64) {
        self.last_now = Some(self.last_now.map_or(now, |t| t.max(now)));
        self.last_unix_ms = self.last_unix_ms.max(unix_ms);
    }

    fn schedule(&mut self, at: Instant, ticket: Ticket, result: HttpResult) {
        self.next_seq += 1;
        self.due.insert((at, ticket, self.next_seq), result);
    }

    fn take_fault(&mut self) -> Option<Fault> {
        let (left, fault) = self.faults.front_mut()?;
        let fault = *fault;
        *left -= 1;
        if *left == 0 {
            self.faults.pop_front();
        }
        Some(fault)
    }

    fn user_id(&self, localpart: &str) -> OwnedUserId {
        // Cannot fail: the localpart is sanitized and the server name validated in `new`.
        UserId::parse(format!("@{localpart}:{}", self.server_name))
            .unwrap_or_else(|_| ruma::owned_user_id!("@invalid:sim.local"))
    }

    fn append(&mut self, room: &RoomId, mut event: StoredEvent) -> Option<String> {
        let Some(r) = self.rooms.get_mut(room) else {
            tracing::warn!(%room, event_type = event.event_type, "sim homeserver: event for unknown room dropped");
            return None;
        };
        self.stream_pos += 1;
        event.pos = self.stream_pos;
        let id = event.event_id();
        r.events.push(event);
        Some(id)
    }

    fn create_room_inner(
        &mut self,
        members: &[OwnedUserId],
        public: bool,
        direct: bool,
        ts: u64,
    ) -> OwnedRoomId {
        self.next_room += 1;
        let room_id = RoomId::parse(format!("!r{}:{}", self.next_room, self.server_name))
            .unwrap_or_else(|_| ruma::owned_room_id!("!invalid:sim.local"));
        let room = self.rooms.entry(room_id.clone()).or_default();
        room.members.extend(members.iter().cloned());
        let Some(creator) = members.first() else {
            tracing::warn!(%room_id, "sim homeserver: room created without members");
            return room_id;
        };
        let create = json!({ "creator": creator, "room_version": ROOM_VERSION });
        let rule = json!({ "join_rule": if public { "public" } else { "invite" } });
        let mut events = vec![StoredEvent::new(
            creator,
            "m.room.create",
            Some(""),
            create,
            ts,
        )];
        for (i, user) in members.iter().enumerate() {
            let member = if direct && i > 0 {
                json!({ "membership": "join", "displayname": user.localpart(), "is_direct": true })
            } else {
                json!({ "membership": "join", "displayname": user.localpart() })
            };
            events.push(StoredEvent::new(
                user,
                "m.room.member",
                Some(user.as_str()),
                member,
                ts,
            ));
            if i == 0 {
                events.push(StoredEvent::new(
                    creator,
                    "m.room.join_rules",
                    Some(""),
                    rule.clone(),
                    ts,
                ));
            }
        }
        for e in events {
            self.append(&room_id, e);
        }
        room_id
    }

    /// Answers every held sync of a member of `room` now that the room has news.
    fn release_held(&mut self, room: &RoomId, at: Option<Instant>, unix_ms: u64) {
        let Some(members) = self.rooms.get(room).map(|r| r.members.clone()) else {
            return;
        };
        let (ready, waiting): (Vec<HeldSync>, Vec<HeldSync>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| members.contains(&h.device.0));
        self.held = waiting;
        self.answer_held(ready, at, unix_ms);
    }

    /// Answers these held syncs at `at` (or when each arrived, if later).
    fn answer_held(&mut self, ready: Vec<HeldSync>, at: Option<Instant>, unix_ms: u64) {
        for h in ready {
            let body = self.sync_body(&h.device, Some(h.since), unix_ms);
            let released = at.map_or(h.arrived, |t| t.max(h.arrived));
            self.schedule(
                after(released, self.latency),
                h.ticket,
                Ok(json_response(StatusCode::OK, &body)),
            );
        }
    }

    /// Held syncs whose timeout answer is due by `now` get it: no rooms, the same `next_batch`.
    fn expire_held(&mut self, now: Instant, unix_ms: u64) {
        let latency = self.latency;
        let (expired, waiting): (Vec<HeldSync>, Vec<HeldSync>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| h.deadline.is_some_and(|d| after(d, latency) <= now));
        self.held = waiting;
        for h in expired {
            let body = self.sync_body(&h.device, Some(h.since), unix_ms);
            let at = after(h.deadline.unwrap_or(now), latency);
            self.schedule(at, h.ticket, Ok(json_response(StatusCode::OK, &body)));
        }
    }

    fn authenticate(
        &self,
        headers: &HeaderMap,
        query: &BTreeMap<String, String>,
    ) -> Result<DeviceKey, ApiError> {
        let from_header = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(token) = from_header.or_else(|| query.get("access_token").map(String::as_str))
        else {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "M_MISSING_TOKEN",
                "Missing access token",
            ));
        };
        let unknown = || {
            error(
                StatusCode::UNAUTHORIZED,
                "M_UNKNOWN_TOKEN",
                "Unknown access token",
            )
        };
        self.tokens.get(token).cloned().ok_or_else(unknown)
    }

    /// The answer to a request, or `None` when it is a held long-poll.
    fn dispatch(
        &mut self,
        cx: &Ctx,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
    ) -> Option<Resp> {
        let query = parse_query(uri.query());
        let route = match route(method, uri.path()) {
            Ok(r) => r,
            Err(e) => return Some(e.response()),
        };
        let result = match route {
            Route::Versions => {
                Ok(json!({ "versions": (1..=12).map(|n| format!("v1.{n}")).collect::<Vec<_>>() }))
            }
            Route::LoginFlows => Ok(json!({ "flows": [{ "type": "m.login.password" }] })),
            Route::Login => self.login(cx.body),
            _ => match self.authenticate(headers, &query) {
                Err(resp) => Err(resp),
                Ok(device) => match route {
                    Route::Sync => return self.sync(cx, device, &query),
                    Route::Send {
                        room,
                        event_type,
                        txn_id,
                    } => self.send(cx, device, &room, &event_type, txn_id),
                    Route::TurnServer => Ok(self.turn_server(cx, &device)),
                    Route::JoinedMembers { room } => self.joined_members(&device, &room),
                    Route::CreateRoom => self.create_room_api(cx, &device),
                    Route::WhoAmI => {
                        Ok(json!({ "user_id": device.0, "device_id": device.1, "is_guest": false }))
                    }
                    Route::Versions | Route::LoginFlows | Route::Login => {
                        Err(unrecognized(StatusCode::NOT_FOUND))
                    }
                },
            },
        };
        Some(result.map_or_else(ApiError::response, |body| {
            json_response(StatusCode::OK, &body)
        }))
    }

    fn login(&mut self, body: &[u8]) -> Result<Value, ApiError> {
        let obj = parse_object(body)?;
        if obj.get("type").and_then(Value::as_str) != Some("m.login.password") {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "M_UNKNOWN",
                "Unknown login type",
            ));
        }
        // `identifier.user` per spec; top-level `user` is the legacy form.
        let user = obj
            .get("identifier")
            .and_then(|i| i.get("user"))
            .or_else(|| obj.get("user"));
        let (Some(user), Some(password)) = (
            user.and_then(Value::as_str),
            obj.get("password").and_then(Value::as_str),
        ) else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "M_BAD_JSON",
                "Missing user or password",
            ));
        };
        let localpart = match user.strip_prefix('@').map(|u| u.split_once(':')) {
            None => Some(user),
            Some(Some((local, server))) if server == self.server_name => Some(local),
            Some(_) => None,
        };
        let Some(localpart) =
            localpart.filter(|l| self.accounts.get(*l).is_some_and(|pw| pw == password))
        else {
            return Err(error(
                StatusCode::FORBIDDEN,
                "M_FORBIDDEN",
                "Invalid username or password",
            ));
        };
        let device_id = match obj
            .get("device_id")
            .and_then(Value::as_str)
            .filter(|d| !d.is_empty())
        {
            Some(d) => d.to_owned(),
            None => {
                self.next_device += 1;
                format!("DEV{}", self.next_device)
            }
        };
        self.next_token += 1;
        let token = format!("syt_{localpart}_{}", self.next_token);
        let user_id = self.user_id(localpart);
        tracing::debug!(user = %user_id, device_id, "sim homeserver login");
        self.tokens
            .insert(token.clone(), (user_id.clone(), device_id.clone()));
        let home_server = &self.server_name;
        Ok(
            json!({ "user_id": user_id, "access_token": token, "device_id": device_id, "home_server": home_server }),
        )
    }

    fn sync(
        &mut self,
        cx: &Ctx,
        device: DeviceKey,
        query: &BTreeMap<String, String>,
    ) -> Option<Resp> {
        // An unparsable `since` counts as 0: the client gets everything again rather than an error.
        let since = query.get("since").map(|s| {
            s.strip_prefix('s')
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        });
        let timeout_ms = query
            .get("timeout")
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        if let Some(since) = since.filter(|s| timeout_ms > 0 && !self.has_news(&device.0, *s)) {
            let deadline = cx.now.checked_add(Duration::from_millis(timeout_ms));
            self.held.push(HeldSync {
                ticket: cx.ticket,
                device,
                since,
                arrived: cx.now,
                deadline,
            });
            return None;
        }
        Some(json_response(
            StatusCode::OK,
            &self.sync_body(&device, since, cx.unix_ms),
        ))
    }

    fn has_news(&self, user: &UserId, since: u64) -> bool {
        self.rooms
            .values()
            .any(|r| r.members.contains(user) && r.last_pos() > since)
            || self.to_device.iter().any(|t| t.to == user && t.pos > since)
    }

    fn sync_body(&self, device: &DeviceKey, since: Option<u64>, unix_ms: u64) -> Value {
        let mut join = Map::new();
        for (room_id, room) in self
            .rooms
            .iter()
            .filter(|(_, r)| r.members.contains(&device.0))
        {
            let (timeline, state, limited, prev) = match since {
                None => {
                    let messages: Vec<&StoredEvent> = room
                        .events
                        .iter()
                        .filter(|e| e.state_key.is_none())
                        .collect();
                    let skip = messages.len().saturating_sub(INITIAL_TIMELINE_LIMIT);
                    let timeline: Vec<&StoredEvent> = messages.into_iter().skip(skip).collect();
                    let prev = timeline
                        .first()
                        .map_or(room.last_pos(), |e| e.pos.saturating_sub(1));
                    (timeline, room.state_at(u64::MAX), skip > 0, prev)
                }
                Some(since) if room.last_pos() > since => {
                    let timeline: Vec<&StoredEvent> =
                        room.events.iter().filter(|e| e.pos > since).collect();
                    // Joined since the token: also the state from before the timeline.
                    let state = if room.join_pos(&device.0) > since {
                        room.state_at(since)
                    } else {
                        Vec::new()
                    };
                    (timeline, state, false, since)
                }
                Some(_) => continue,
            };
            let events = |list: Vec<&StoredEvent>| -> Vec<Value> {
                list.into_iter()
                    .map(|e| e.sync_json(device, unix_ms))
                    .collect()
            };
            let entry = json!({
                "timeline": { "events": events(timeline), "limited": limited, "prev_batch": format!("p{prev}") },
                "state": { "events": events(state) },
                "summary": { "m.joined_member_count": room.members.len(), "m.invited_member_count": 0 },
                "ephemeral": { "events": [] },
                "account_data": { "events": [] },
                "unread_notifications": {},
            });
            join.insert(room_id.to_string(), entry);
        }
        let to_device: Vec<&Value> = self
            .to_device
            .iter()
            .filter(|t| t.to == device.0 && t.pos > since.unwrap_or(0))
            .map(|t| &t.event)
            .collect();
        json!({
            "next_batch": format!("s{}", self.stream_pos),
            "rooms": { "join": join, "invite": {}, "leave": {} },
            "presence": { "events": [] },
            "account_data": { "events": [] },
            "to_device": { "events": to_device },
            "device_lists": { "changed": [], "left": [] },
            "device_one_time_keys_count": {},
        })
    }

    /// Resolves a room path segment to a room `user` has joined.
    fn member_room(&self, user: &UserId, room: &str) -> Result<(OwnedRoomId, &Room), ApiError> {
        let bad_id = |_| {
            error(
                StatusCode::BAD_REQUEST,
                "M_INVALID_PARAM",
                "Invalid room id",
            )
        };
        let room_id = RoomId::parse(room).map_err(bad_id)?;
        let Some(r) = self.rooms.get(&room_id) else {
            return Err(error(StatusCode::NOT_FOUND, "M_NOT_FOUND", "Unknown room"));
        };
        if !r.members.contains(user) {
            return Err(error(
                StatusCode::FORBIDDEN,
                "M_FORBIDDEN",
                "User not in room",
            ));
        }
        Ok((room_id, r))
    }

    fn send(
        &mut self,
        cx: &Ctx,
        device: DeviceKey,
        room: &str,
        ty: &str,
        txn_id: String,
    ) -> Result<Value, ApiError> {
        let (room_id, _) = self.member_room(&device.0, room)?;
        if ty.is_empty() || txn_id.is_empty() {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "M_INVALID_PARAM",
                "Empty event type or transaction id",
            ));
        }
        let key = (device, txn_id);
        if let Some(event_id) = self.txns.get(&key) {
            return Ok(json!({ "event_id": event_id }));
        }
        let mut content = Value::Object(parse_object(cx.body)?);
        if let Some(TamperFn(tamper)) = self.tamper.as_mut() {
            tamper(ty, &mut content);
        }
        let event = StoredEvent::new(&key.0 .0, ty, None, content, cx.unix_ms);
        let event = StoredEvent {
            txn: Some(key.clone()),
            ..event
        };
        let event_id = self.append(&room_id, event).unwrap_or_default();
        self.txns.insert(key, event_id.clone());
        self.release_held(&room_id, Some(cx.now), cx.unix_ms);
        Ok(json!({ "event_id": event_id }))
    }

    fn joined_members(&self, device: &DeviceKey, room: &str) -> Result<Value, ApiError> {
        let (_, r) = self.member_room(&device.0, room)?;
        let profile = json!({ "display_name": null, "avatar_url": null });
        let joined: Map<String, Value> = r
            .members
            .iter()
            .map(|m| (m.to_string(), profile.clone()))
            .collect();
        Ok(json!({ "joined": joined }))
    }

    fn create_room_api(&mut self, cx: &Ctx, device: &DeviceKey) -> Result<Value, ApiError> {
        let obj = parse_object(cx.body)?;
        let mut members = vec![device.0.clone()];
        match obj.get("invite") {
            None | Some(Value::Null) => {}
            Some(Value::Array(list)) => {
                for v in list {
                    let Some(user) = v.as_str().and_then(|s| UserId::parse(s).ok()) else {
                        return Err(error(
                            StatusCode::BAD_REQUEST,
                            "M_INVALID_PARAM",
                            "Invalid user id in invite",
                        ));
                    };
                    // The sim only knows its own users; it auto-accepts invites on their behalf.
                    let local = user.server_name().as_str() == self.server_name;
                    if !local || !self.accounts.contains_key(user.localpart()) {
                        return Err(error(
                            StatusCode::NOT_FOUND,
                            "M_NOT_FOUND",
                            "Unknown user in invite",
                        ));
                    }
                    if !members.contains(&user) {
                        members.push(user);
                    }
                }
            }
            Some(_) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "M_BAD_JSON",
                    "invite must be a list",
                ))
            }
        }
        let field = |k: &str| obj.get(k).and_then(Value::as_str);
        let public =
            field("preset") == Some("public_chat") || field("visibility") == Some("public");
        let is_direct = obj
            .get("is_direct")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let room_id = self.create_room_inner(&members, public, is_direct, cx.unix_ms);
        if initial_encryption(&obj) {
            let content = json!({ "algorithm": "m.megolm.v1.aes-sha2" });
            self.append(
                &room_id,
                StoredEvent::new(
                    &device.0,
                    "m.room.encryption",
                    Some(""),
                    content,
                    cx.unix_ms,
                ),
            );
        }
        self.release_held(&room_id, Some(cx.now), cx.unix_ms);
        Ok(json!({ "room_id": room_id }))
    }
}

/// Whether a createRoom body asks for `m.room.encryption` in its initial state.
fn initial_encryption(body: &Map<String, Value>) -> bool {
    body.get("initial_state")
        .and_then(Value::as_array)
        .is_some_and(|list| {
            list.iter()
                .any(|e| e.get("type").and_then(Value::as_str) == Some("m.room.encryption"))
        })
}

fn after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).unwrap_or(t)
}

fn json_response(status: StatusCode, body: &Value) -> Resp {
    let mut resp = Response::new(serde_json::to_vec(body).unwrap_or_default());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A Matrix error answer, kept small until it becomes a response.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    errcode: &'static str,
    message: &'static str,
}

impl ApiError {
    fn response(self) -> Resp {
        let (errcode, error) = (self.errcode, self.message);
        let body = if errcode == "M_UNKNOWN_TOKEN" {
            json!({ "errcode": errcode, "error": error, "soft_logout": false })
        } else {
            json!({ "errcode": errcode, "error": error })
        };
        json_response(self.status, &body)
    }
}

fn error(status: StatusCode, errcode: &'static str, message: &'static str) -> ApiError {
    ApiError {
        status,
        errcode,
        message,
    }
}

fn unrecognized(status: StatusCode) -> ApiError {
    error(status, "M_UNRECOGNIZED", "Unrecognized request")
}

/// Like Synapse: unparsable -> `M_NOT_JSON`, valid JSON that is not an object -> `M_BAD_JSON`.
fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(error(
            StatusCode::BAD_REQUEST,
            "M_BAD_JSON",
            "Content must be a JSON object",
        )),
        Err(_) => Err(error(
            StatusCode::BAD_REQUEST,
            "M_NOT_JSON",
            "Content not JSON",
        )),
    }
}

fn route(method: &Method, path: &str) -> Result<Route, ApiError> {
    let only = |want: Method, r: Route| {
        if *method == want {
            Ok(r)
        } else {
            Err(unrecognized(StatusCode::METHOD_NOT_ALLOWED))
        }
    };
    if path == "/_matrix/client/versions" {
        return only(Method::GET, Route::Versions);
    }
    let rest = path
        .strip_prefix("/_matrix/client/v3/")
        .or_else(|| path.strip_prefix("/_matrix/client/r0/"));
    let Some(rest) = rest else {
        return Err(unrecognized(StatusCode::NOT_FOUND));
    };
    // Split before decoding so an escaped '/' stays inside its segment (txn ids may hold one).
    let Some(segs) = rest
        .split('/')
        .map(|s| percent_decode(s, false))
        .collect::<Option<Vec<String>>>()
    else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
            "Path is not valid UTF-8",
        ));
    };
    let parts: Vec<&str> = segs.iter().map(String::as_str).collect();
    let owned = |s: &&str| (*s).to_owned();
    match parts.as_slice() {
        ["login"] if *method == Method::GET => Ok(Route::LoginFlows),
        ["login"] => only(Method::POST, Route::Login),
        ["sync"] => only(Method::GET, Route::Sync),
        ["rooms", room, "send", ty, txn] => only(
            Method::PUT,
            Route::Send {
                room: owned(room),
                event_type: owned(ty),
                txn_id: owned(txn),
            },
        ),
        ["voip", "turnServer"] => only(Method::GET, Route::TurnServer),
        ["rooms", room, "joined_members"] => {
            only(Method::GET, Route::JoinedMembers { room: owned(room) })
        }
        ["createRoom"] => only(Method::POST, Route::CreateRoom),
        ["account", "whoami"] => only(Method::GET, Route::WhoAmI),
        _ => Err(unrecognized(StatusCode::NOT_FOUND)),
    }
}

fn parse_query(query: Option<&str>) -> BTreeMap<String, String> {
    let pairs = query.unwrap_or("").split('&').filter(|p| !p.is_empty());
    pairs
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(k, true)?, percent_decode(v, true)?))
        })
        .collect()
}

/// Decodes `%XX` escapes (and `+` as space in query strings); `None` if the result is not UTF-8.
fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = |at: usize| bytes.get(at).and_then(|c| char::from(*c).to_digit(16));
        match (b, hex(i + 1), hex(i + 2)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push(u8::try_from(hi * 16 + lo).unwrap_or(b'?'));
                i += 3;
            }
            (b'+', _, _) if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::api::client::uiaa::{MatrixUserIdentifier, UserIdentifier};
    use ruma::api::client::{message::send_message_event, session::login, sync::sync_events};
    use ruma::api::{
        auth_scheme::SendAccessToken, IncomingResponse, OutgoingRequest, SupportedVersions,
    };
    use std::borrow::Cow;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn req(method: Method, path: &str, token: Option<&str>, body: &[u8]) -> Request<Vec<u8>> {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("http://sim.local/_matrix/client/v3/{path}"));
        if let Some(t) = token {
            b = b.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        b.body(body.to_vec()).unwrap()
    }

    fn json_of(resp: &Resp) -> Value {
        serde_json::from_slice(resp.body()).unwrap()
    }

    /// Sends one request at `now`; asserts it is answered exactly `latency` (5 ms) later.
    fn call(hs: &mut SimHomeserver, r: Request<Vec<u8>>, now: Instant, unix_ms: u64) -> Resp {
        hs.handle_request(99, r, now, unix_ms);
        assert!(
            hs.poll_response(now, unix_ms).is_none(),
            "answered before latency"
        );
        assert_eq!(hs.poll_timeout(), Some(now + ms(5)));
        let (ticket, result) = hs.poll_response(now + ms(5), unix_ms).unwrap();
        assert_eq!(ticket, 99);
        result.unwrap()
    }

    fn login_body(user: &str, password: &str, device: Option<&str>) -> Vec<u8> {
        let id = json!({"type": "m.id.user", "user": user});
        let b = json!({"type": "m.login.password", "identifier": id, "password": password, "device_id": device});
        serde_json::to_vec(&b).unwrap()
    }

    fn login_token(hs: &mut SimHomeserver, user: &str, device: Option<&str>, t: Instant) -> String {
        let resp = call(
            hs,
            req(Method::POST, "login", None, &login_body(user, "pw", device)),
            t,
            0,
        );
        json_of(&resp)["access_token"].as_str().unwrap().to_owned()
    }

    /// alice and bob registered, joined to room "!r1" (stream at s4), alice logged in.
    fn world(t0: Instant) -> (SimHomeserver, OwnedRoomId, OwnedUserId, String) {
        let mut hs = SimHomeserver::new("sim.local");
        let alice = hs.register_user("alice", "pw");
        let bob = hs.register_user("bob", "pw");
        let room = hs.create_room(&[&alice, &bob], false, 1_000);
        let token = login_token(&mut hs, "alice", None, t0);
        (hs, room, bob, token)
    }

    fn send_path(room: &RoomId, txn: &str) -> String {
        format!(
            "rooms/{}/send/m.call.invite/{txn}",
            room.as_str().replace('!', "%21").replace(':', "%3A")
        )
    }

    fn timeline(sync: &Value, room: &str) -> Vec<Value> {
        sync["rooms"]["join"][room]["timeline"]["events"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    #[test]
    fn login_ok_and_bad_password() {
        let t0 = Instant::now();
        let mut hs = SimHomeserver::new("sim.local");
        hs.register_user("alice", "pw");
        let ok = call(
            &mut hs,
            req(
                Method::POST,
                "login",
                None,
                &login_body("@alice:sim.local", "pw", None),
            ),
            t0,
            0,
        );
        assert_eq!(
            (ok.status(), &ok.headers()[CONTENT_TYPE]),
            (StatusCode::OK, &"application/json".parse().unwrap())
        );
        let b = json_of(&ok);
        assert_eq!(b["user_id"], "@alice:sim.local");
        assert_eq!(
            (&b["device_id"], &b["access_token"]),
            (&json!("DEV1"), &json!("syt_alice_1"))
        );
        let again = json_of(&call(
            &mut hs,
            req(
                Method::POST,
                "login",
                None,
                &login_body("alice", "pw", Some("DEV1")),
            ),
            t0,
            0,
        ));
        assert_eq!(
            (&again["device_id"], &again["access_token"]),
            (&json!("DEV1"), &json!("syt_alice_2"))
        );
        for (user, pw) in [
            ("alice", "nope"),
            ("carol", "pw"),
            ("@alice:other.org", "pw"),
        ] {
            let bad = call(
                &mut hs,
                req(Method::POST, "login", None, &login_body(user, pw, None)),
                t0,
                0,
            );
            assert_eq!(bad.status(), StatusCode::FORBIDDEN);
            assert_eq!(
                json_of(&bad),
                json!({"errcode": "M_FORBIDDEN", "error": "Invalid username or password"})
            );
        }
        let who = call(
            &mut hs,
            req(Method::GET, "account/whoami", Some("syt_alice_2"), b""),
            t0,
            0,
        );
        assert_eq!(json_of(&who)["device_id"], "DEV1");
        for (token, errcode) in [
            (Some("syt_x"), "M_UNKNOWN_TOKEN"),
            (None, "M_MISSING_TOKEN"),
        ] {
            let resp = call(
                &mut hs,
                req(Method::GET, "account/whoami", token, b""),
                t0,
                0,
            );
            assert_eq!(
                (resp.status(), json_of(&resp)["errcode"].as_str()),
                (StatusCode::UNAUTHORIZED, Some(errcode))
            );
        }
    }

    #[test]
    fn send_then_sync_returns_event_with_age() {
        let t0 = Instant::now();
        let (mut hs, room, _bob, token) = world(t0);
        let initial = json_of(&call(
            &mut hs,
            req(Method::GET, "sync", Some(&token), b""),
            t0,
            2_000,
        ));
        let joined = &initial["rooms"]["join"][room.as_str()];
        let state: Vec<&Value> = joined["state"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| &e["type"])
            .collect();
        assert_eq!(
            json!(state),
            json!([
                "m.room.create",
                "m.room.member",
                "m.room.join_rules",
                "m.room.member"
            ])
        );
        assert_eq!(
            (
                &joined["summary"]["m.joined_member_count"],
                &initial["next_batch"]
            ),
            (&json!(2), &json!("s4"))
        );

        let send = req(
            Method::PUT,
            &send_path(&room, "t1"),
            Some(&token),
            br#"{"call_id":"c1"}"#,
        );
        let sent = call(&mut hs, send, t0 + ms(10), 5_000);
        assert_eq!(json_of(&sent), json!({"event_id": "$e5"}));
        let synced = json_of(&call(
            &mut hs,
            req(Method::GET, "sync?since=s4&timeout=0", Some(&token), b""),
            t0 + ms(20),
            5_250,
        ));
        let events = timeline(&synced, room.as_str());
        assert_eq!(events.len(), 1);
        assert_eq!(
            events[0],
            json!({
                "type": "m.call.invite", "content": {"call_id": "c1"}, "sender": "@alice:sim.local", "event_id": "$e5",
                "origin_server_ts": 5_000, "unsigned": {"age": 250, "transaction_id": "t1"},
            })
        );
        assert_eq!(synced["next_batch"], "s5");
        assert_eq!(hs.room_events(&room).len(), 5);
    }

    #[test]
    fn repeated_txn_id_is_idempotent() {
        let t0 = Instant::now();
        let (mut hs, room, _bob, token) = world(t0);
        let first = call(
            &mut hs,
            req(
                Method::PUT,
                &send_path(&room, "same"),
                Some(&token),
                br#"{"a":1}"#,
            ),
            t0,
            0,
        );
        let second = call(
            &mut hs,
            req(
                Method::PUT,
                &send_path(&room, "same"),
                Some(&token),
                br#"{"a":2}"#,
            ),
            t0,
            0,
        );
        assert_eq!(json_of(&first), json_of(&second));
        let invites: Vec<Value> = hs
            .room_events(&room)
            .into_iter()
            .filter(|e| e["type"] == "m.call.invite")
            .collect();
        assert_eq!(invites.len(), 1);
        assert_eq!(invites[0]["content"], json!({"a": 1}));
    }

    #[test]
    fn long_poll_is_held_until_an_event_arrives() {
        let t0 = Instant::now();
        let (mut hs, room, bob, token) = world(t0);
        hs.handle_request(
            7,
            req(
                Method::GET,
                "sync?since=s4&timeout=30000",
                Some(&token),
                b"",
            ),
            t0 + ms(100),
            0,
        );
        assert_eq!(
            hs.poll_timeout(),
            Some(t0 + ms(30_105)),
            "held: only the timeout answer is pending"
        );
        assert!(hs.poll_response(t0 + ms(1_000), 0).is_none());
        assert_eq!(
            hs.inject_event(&room, &bob, "m.call.hangup", json!({"call_id": "c"}), 7_000),
            "$e5"
        );
        assert_eq!(
            hs.poll_timeout(),
            Some(t0 + ms(1_005)),
            "released at the latest instant seen, plus latency"
        );
        let (ticket, resp) = hs.poll_response(t0 + ms(1_005), 7_000).unwrap();
        let events = timeline(&json_of(&resp.unwrap()), room.as_str());
        assert_eq!(
            (ticket, &events[0]["event_id"], &events[0]["unsigned"]),
            (7, &json!("$e5"), &json!({"age": 0}))
        );
        assert_eq!(hs.poll_timeout(), None);
    }

    #[test]
    fn long_poll_times_out_with_empty_rooms() {
        let t0 = Instant::now();
        let (mut hs, _room, _bob, token) = world(t0);
        hs.handle_request(
            3,
            req(Method::GET, "sync?since=s4&timeout=2000", Some(&token), b""),
            t0,
            0,
        );
        assert_eq!(hs.poll_timeout(), Some(t0 + ms(2_005)));
        assert!(hs.poll_response(t0 + ms(2_004), 0).is_none());
        let (ticket, resp) = hs.poll_response(t0 + ms(2_005), 0).unwrap();
        let b = json_of(&resp.unwrap());
        assert_eq!(
            (ticket, &b["next_batch"], &b["rooms"]["join"]),
            (3, &json!("s4"), &json!({}))
        );
    }

    #[test]
    fn down_refuses_requests_and_fails_pending_long_polls() {
        let t0 = Instant::now();
        let (mut hs, room, _bob, token) = world(t0);
        hs.handle_request(
            1,
            req(
                Method::GET,
                "sync?since=s4&timeout=30000",
                Some(&token),
                b"",
            ),
            t0,
            0,
        );
        hs.set_down(true, t0 + ms(50));
        assert!(hs.is_down());
        assert!(matches!(
            hs.poll_response(t0 + ms(50), 0),
            Some((1, Err(SimHttpError::ConnectionRefused)))
        ));
        let served = hs.requests_served();
        hs.handle_request(
            2,
            req(Method::PUT, &send_path(&room, "x"), Some(&token), b"{}"),
            t0 + ms(60),
            0,
        );
        assert_eq!(hs.poll_timeout(), Some(t0 + ms(61)));
        assert!(matches!(
            hs.poll_response(t0 + ms(61), 0),
            Some((2, Err(SimHttpError::ConnectionRefused)))
        ));
        assert_eq!(hs.requests_served(), served);
        hs.set_down(false, t0 + ms(70));
        assert_eq!(
            hs.room_events(&room).len(),
            4,
            "stored events kept, refused send not stored"
        );
        let ok = call(
            &mut hs,
            req(Method::PUT, &send_path(&room, "x"), Some(&token), b"{}"),
            t0 + ms(80),
            0,
        );
        assert_eq!(ok.status(), StatusCode::OK);
    }

    #[test]
    fn fail_next_429_then_hang_then_recovers() {
        let t0 = Instant::now();
        let (mut hs, _room, _bob, token) = world(t0);
        hs.fail_next(
            2,
            Fault::Status429 {
                retry_after_ms: 1_500,
            },
        );
        hs.fail_next(1, Fault::Hang);
        for _ in 0..2 {
            let resp = call(
                &mut hs,
                req(Method::GET, "voip/turnServer", Some(&token), b""),
                t0,
                0,
            );
            assert_eq!(
                (resp.status(), &resp.headers()[RETRY_AFTER]),
                (StatusCode::TOO_MANY_REQUESTS, &HeaderValue::from(2))
            );
            let b = json_of(&resp);
            assert_eq!(
                (&b["errcode"], &b["retry_after_ms"]),
                (&json!("M_LIMIT_EXCEEDED"), &json!(1_500))
            );
        }
        hs.handle_request(
            5,
            req(Method::GET, "voip/turnServer", Some(&token), b""),
            t0,
            0,
        );
        assert_eq!(hs.poll_timeout(), None, "hung request is never answered");
        assert_eq!(
            json_of(&call(
                &mut hs,
                req(Method::GET, "voip/turnServer", Some(&token), b""),
                t0,
                0
            )),
            json!({})
        );
        hs.set_turn_server(
            vec!["turn:turn.sim.local:3478?transport=udp".into()],
            "u".into(),
            "p".into(),
            86_400,
        );
        let resp = call(
            &mut hs,
            req(Method::GET, "voip/turnServer", Some(&token), b""),
            t0,
            0,
        );
        assert_eq!(json_of(&resp)["ttl"], 86_400);
        assert_eq!(hs.requests_served(), 6);
    }

    #[test]
    fn malformed_requests_get_matrix_errors() {
        let t0 = Instant::now();
        let (mut hs, room, _bob, token) = world(t0);
        let cases: [(Method, String, &[u8], StatusCode, &str); 8] = [
            (
                Method::PUT,
                send_path(&room, "a"),
                b"{not json",
                StatusCode::BAD_REQUEST,
                "M_NOT_JSON",
            ),
            (
                Method::PUT,
                send_path(&room, "b"),
                b"[1,2]",
                StatusCode::BAD_REQUEST,
                "M_BAD_JSON",
            ),
            (
                Method::POST,
                "login".into(),
                b"\xff\xfe",
                StatusCode::BAD_REQUEST,
                "M_NOT_JSON",
            ),
            (
                Method::POST,
                "login".into(),
                br#"{"type":"m.login.password"}"#,
                StatusCode::BAD_REQUEST,
                "M_BAD_JSON",
            ),
            (
                Method::PUT,
                "rooms/%21nope%3Asim.local/send/x/1".into(),
                b"{}",
                StatusCode::NOT_FOUND,
                "M_NOT_FOUND",
            ),
            (
                Method::PUT,
                "rooms/%FF/send/x/1".into(),
                b"{}",
                StatusCode::BAD_REQUEST,
                "M_INVALID_PARAM",
            ),
            (
                Method::GET,
                "rooms/x/sned".into(),
                b"",
                StatusCode::NOT_FOUND,
                "M_UNRECOGNIZED",
            ),
            (
                Method::GET,
                "createRoom".into(),
                b"",
                StatusCode::METHOD_NOT_ALLOWED,
                "M_UNRECOGNIZED",
            ),
        ];
        for (method, path, body, status, errcode) in cases {
            let resp = call(&mut hs, req(method, &path, Some(&token), body), t0, 0);
            assert_eq!(
                (resp.status(), json_of(&resp)["errcode"].as_str()),
                (status, Some(errcode)),
                "{path}"
            );
        }
        let garbage = call(
            &mut hs,
            req(
                Method::GET,
                "sync?since=%%zz&timeout=abc",
                Some(&token),
                b"",
            ),
            t0,
            0,
        );
        assert_eq!(
            json_of(&garbage)["next_batch"],
            "s4",
            "unparsable since/timeout answer at once"
        );
        assert_eq!(hs.room_events(&room).len(), 4);
    }

    #[test]
    fn two_devices_of_one_user_each_see_the_event() {
        let t0 = Instant::now();
        let (mut hs, room, _bob, alice_token) = world(t0);
        let phone = login_token(&mut hs, "bob", Some("PHONE"), t0);
        let hub = login_token(&mut hs, "bob", None, t0);
        hs.handle_request(
            1,
            req(
                Method::GET,
                "sync?since=s4&timeout=30000",
                Some(&phone),
                b"",
            ),
            t0,
            0,
        );
        hs.handle_request(
            2,
            req(Method::GET, "sync?since=s4&timeout=30000", Some(&hub), b""),
            t0,
            0,
        );
        hs.handle_request(
            3,
            req(
                Method::PUT,
                &send_path(&room, "t"),
                Some(&alice_token),
                b"{}",
            ),
            t0 + ms(10),
            100,
        );
        assert_eq!(hs.poll_timeout(), Some(t0 + ms(15)));
        let answers: Vec<(Ticket, HttpResult)> =
            std::iter::from_fn(|| hs.poll_response(t0 + ms(15), 100)).collect();
        assert_eq!(answers.iter().map(|a| a.0).collect::<Vec<_>>(), [1, 2, 3]);
        for (_, resp) in answers.iter().take(2) {
            let events = timeline(&json_of(resp.as_ref().unwrap()), room.as_str());
            assert_eq!(events[0]["event_id"], "$e5");
            assert_eq!(
                events[0]["unsigned"],
                json!({"age": 0}),
                "no transaction_id for other devices"
            );
        }
    }

    #[test]
    fn create_room_auto_joins_invitees_and_wakes_their_sync() {
        let t0 = Instant::now();
        let (mut hs, _room, bob, alice_token) = world(t0);
        let bob_token = login_token(&mut hs, "bob", None, t0);
        hs.handle_request(
            1,
            req(
                Method::GET,
                "sync?since=s4&timeout=30000",
                Some(&bob_token),
                b"",
            ),
            t0 + ms(5),
            0,
        );
        let body = json!({"preset": "trusted_private_chat", "is_direct": true, "invite": [bob]});
        let body = serde_json::to_vec(&body).unwrap();
        hs.handle_request(
            2,
            req(Method::POST, "createRoom", Some(&alice_token), &body),
            t0 + ms(5),
            0,
        );
        let (t1, r1) = hs.poll_response(t0 + ms(10), 0).unwrap();
        let (t2, r2) = hs.poll_response(t0 + ms(10), 0).unwrap();
        assert_eq!((t1, t2), (1, 2));
        assert_eq!(
            json_of(r2.as_ref().unwrap()),
            json!({"room_id": "!r2:sim.local"})
        );
        let events = timeline(&json_of(r1.as_ref().unwrap()), "!r2:sim.local");
        assert_eq!(
            (
                events.len(),
                &events[3]["state_key"],
                &events[3]["content"]["is_direct"]
            ),
            (4, &json!(bob), &json!(true))
        );
        let members = call(
            &mut hs,
            req(
                Method::GET,
                "rooms/!r2:sim.local/joined_members",
                Some(&bob_token),
                b"",
            ),
            t0,
            0,
        );
        assert_eq!(
            json_of(&members)["joined"][bob.as_str()],
            json!({"display_name": null, "avatar_url": null})
        );
    }

    /// The bytes ruma builds are understood, and ruma parses what the sim answers.
    #[test]
    fn ruma_requests_round_trip() {
        let t0 = Instant::now();
        let mut hs = SimHomeserver::new("sim.local");
        let alice = hs.register_user("alice", "pw");
        let room = hs.create_room(&[&alice], false, 0);
        let versions = SupportedVersions::from_parts(&["v1.12".to_owned()], &BTreeMap::new());
        let (base, v) = (hs.base_url(), || Cow::Borrowed(&versions));

        let id = UserIdentifier::Matrix(MatrixUserIdentifier::new("alice".into()));
        let info = login::v3::LoginInfo::Password(login::v3::Password::new(id, "pw".into()));
        let r = login::v3::Request::new(info)
            .try_into_http_request(&base, SendAccessToken::None, v())
            .unwrap();
        let (head, body) = call(&mut hs, r, t0, 0).into_parts();
        let login =
            login::v3::Response::try_from_http_response(Response::from_parts(head, &body[..]))
                .unwrap();
        assert_eq!(login.user_id, alice);
        let auth = SendAccessToken::IfRequired(&login.access_token);

        let content = ruma::serde::Raw::from_json(
            serde_json::value::to_raw_value(&json!({"call_id": "c"})).unwrap(),
        );
        let send = send_message_event::v3::Request::new_raw(
            room.clone(),
            "t/1".into(),
            "m.call.invite".into(),
            content,
        );
        let (head, body) = call(
            &mut hs,
            send.try_into_http_request(&base, auth, v()).unwrap(),
            t0,
            10,
        )
        .into_parts();
        let sent = send_message_event::v3::Response::try_from_http_response(Response::from_parts(
            head,
            &body[..],
        ))
        .unwrap();
        assert_eq!(sent.event_id.as_str(), "$e4");

        let mut sync = sync_events::v3::Request::new();
        sync.since = Some("s3".into());
        sync.timeout = Some(Duration::from_secs(30));
        let (head, body) = call(
            &mut hs,
            sync.try_into_http_request(&base, auth, v()).unwrap(),
            t0,
            20,
        )
        .into_parts();
        let synced = sync_events::v3::Response::try_from_http_response(Response::from_parts(
            head,
            &body[..],
        ))
        .unwrap();
        assert_eq!(synced.next_batch, "s4");
        let event = synced.rooms.join[&room].timeline.events[0]
            .deserialize_as_unchecked::<Value>()
            .unwrap();
        assert_eq!(
            event["unsigned"]["transaction_id"], "t/1",
            "escaped '/' in a txn id survives routing"
        );
    }
}
