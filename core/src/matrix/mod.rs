//! The homeserver client as a state machine: it hands out HTTP requests (built with ruma) and
//! takes their answers (parsed with ruma). Login, /sync long-poll, room events sent in order with
//! transaction ids, `/voip/turnServer` kept fresh; retries with seeded backoff, 429
//! `retry_after_ms` honoured, and requests the driver never answers time out here.

mod rooms;

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ruma::api::auth_scheme::SendAccessToken;
use ruma::api::client::membership::join_room_by_id;
use ruma::api::client::message::send_message_event;
use ruma::api::client::room::create_room;
use ruma::api::client::session::login;
use ruma::api::client::sync::sync_events;
use ruma::api::client::uiaa::{MatrixUserIdentifier, UserIdentifier};
use ruma::api::client::voip::get_turn_server_info;
use ruma::api::{IncomingResponse, MatrixVersion, OutgoingRequest, SupportedVersions};
use ruma::events::{AnyMessageLikeEventContent, MessageLikeEventType};
use ruma::serde::Raw;
use ruma::{OwnedDeviceId, OwnedRoomId, OwnedTransactionId, OwnedUserId};
use serde::Deserialize;
use tracing::{debug, info, warn};

use crate::limits;
use crate::rng::Rng;
use crate::types::{Credentials, HttpFailure, HttpId, Secret};

pub(crate) use rooms::Rooms;

/// A timeline event of a joined room, as much of it as the call logic needs.
#[derive(Debug, Clone)]
pub(crate) struct RoomEvent {
    pub room_id: OwnedRoomId,
    pub sender: OwnedUserId,
    pub event_type: String,
    pub content: serde_json::Value,
    /// `unsigned.age` in ms, when the server gave it.
    pub age_ms: Option<u64>,
    pub origin_server_ts: u64,
}

/// TURN servers from `/voip/turnServer`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TurnServers {
    pub uris: Vec<String>,
    pub username: Secret,
    pub password: Secret,
    pub ttl: Duration,
}

#[derive(Debug)]
pub(crate) enum MatrixEvent {
    LoggedIn {
        user_id: OwnedUserId,
        device_id: OwnedDeviceId,
        access_token: Secret,
    },
    LoginFailed(String),
    Reachable(bool),
    /// The first /sync answer has been processed.
    InitialSyncDone,
    Timeline(RoomEvent),
    TurnServers(TurnServers),
    /// A room event could not be delivered and was given up.
    SendGaveUp {
        call_id: Option<String>,
    },
    /// Someone invited us to a room.
    Invited {
        room_id: OwnedRoomId,
        inviter: OwnedUserId,
    },
    /// A room we asked for exists.
    RoomCreated {
        room_id: OwnedRoomId,
        peer: OwnedUserId,
    },
    /// Joining or creating a room was refused.
    RoomRequestFailed {
        what: String,
    },
}

/// One-off room requests (join an invite, create a direct room), sent one at a time.
#[derive(Debug, Clone)]
enum RoomRequest {
    Join(OwnedRoomId),
    /// A direct room with the peer invited; `encrypted` puts `m.room.encryption` in its
    /// initial state, as Element's "Start chat" does.
    CreateDm {
        peer: OwnedUserId,
        encrypted: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestKind {
    Login,
    Sync,
    Send,
    TurnServer,
    Room,
}

impl RequestKind {
    fn deadline(self, sent: Instant) -> Instant {
        match self {
            RequestKind::Sync => sent + limits::SYNC_TIMEOUT + limits::HTTP_TIMEOUT,
            _ => sent + limits::HTTP_TIMEOUT,
        }
    }
}

#[derive(Debug)]
struct InFlight {
    kind: RequestKind,
    deadline: Instant,
}

#[derive(Debug)]
struct OutgoingEvent {
    room_id: OwnedRoomId,
    event_type: String,
    txn_id: OwnedTransactionId,
    content: serde_json::Value,
    attempts: u32,
}

impl OutgoingEvent {
    fn call_id(&self) -> Option<String> {
        self.content
            .get("call_id")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    }
}

/// Retry bookkeeping for one kind of request.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    not_before: Option<Instant>,
}

impl Backoff {
    fn ready(&self, now: Instant) -> bool {
        self.not_before.is_none_or(|t| now >= t)
    }

    fn fail(&mut self, now: Instant, retry_after: Option<Duration>, rng: &mut Rng) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = match retry_after {
            Some(d) => d.min(limits::RETRY_AFTER_MAX),
            None => {
                let exp = limits::RETRY_BACKOFF_MIN
                    .saturating_mul(1u32 << self.failures.saturating_sub(1).min(16));
                rng.jitter(exp.min(limits::RETRY_BACKOFF_MAX))
            }
        };
        self.not_before = Some(now + delay);
        delay
    }

    fn succeed(&mut self) {
        self.failures = 0;
        self.not_before = None;
    }
}

/// What went wrong with one exchange, after looking at the answer.
#[derive(Debug)]
enum Failure {
    /// Worth retrying (transport, 5xx, timeout, 429 with its delay).
    Transient {
        retry_after: Option<Duration>,
        why: String,
    },
    /// Retrying will not help (4xx other than 429, unparsable 200).
    Permanent { status: u16, why: String },
}

fn as_slice(r: &http::Response<Vec<u8>>) -> http::Response<&[u8]> {
    let mut out = http::Response::new(r.body().as_slice());
    *out.status_mut() = r.status();
    *out.headers_mut() = r.headers().clone();
    out
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errcode: String,
    #[serde(default)]
    error: String,
    retry_after_ms: Option<u64>,
}

fn classify(response: &Result<http::Response<Vec<u8>>, HttpFailure>) -> Option<Failure> {
    let response = match response {
        Err(HttpFailure::Encryption(why)) => {
            return Some(Failure::Permanent {
                status: 0,
                why: format!("cannot encrypt for the room: {why}"),
            })
        }
        Err(e) => {
            return Some(Failure::Transient {
                retry_after: None,
                why: format!("transport: {e:?}"),
            })
        }
        Ok(r) => r,
    };
    let status = response.status();
    if status.is_success() {
        if response.body().len() > limits::MAX_RESPONSE_BYTES {
            return Some(Failure::Permanent {
                status: status.as_u16(),
                why: "response body too large".into(),
            });
        }
        return None;
    }
    let body: Option<ErrorBody> = serde_json::from_slice(response.body()).ok();
    let errcode = body.as_ref().map(|b| b.errcode.clone()).unwrap_or_default();
    let error = body.as_ref().map(|b| b.error.clone()).unwrap_or_default();
    let why = format!("HTTP {} {errcode} {error}", status.as_u16());
    if status.as_u16() == 429 {
        let ms = body.and_then(|b| b.retry_after_ms).unwrap_or(1000);
        return Some(Failure::Transient {
            retry_after: Some(Duration::from_millis(ms)),
            why,
        });
    }
    if status.is_server_error() || status.as_u16() == 408 {
        return Some(Failure::Transient {
            retry_after: None,
            why,
        });
    }
    Some(Failure::Permanent {
        status: status.as_u16(),
        why,
    })
}

#[derive(Debug)]
enum Session {
    NeedLogin,
    LoggingIn,
    Ready {
        /// Shared: every request clones it.
        access_token: Arc<Secret>,
    },
    /// Credentials refused: nothing more is sent.
    Failed,
}

pub(crate) struct MatrixClient {
    base_url: String,
    user_id: OwnedUserId,
    credentials: Credentials,
    device_id: Option<OwnedDeviceId>,
    session: Session,
    next_id: u64,
    in_flight: BTreeMap<HttpId, InFlight>,
    since: Option<String>,
    sync_in_flight: bool,
    sync_backoff: Backoff,
    initial_sync_done: bool,
    /// The `timeout` of a sync without `since` (see [`MatrixClient::set_run_id`]).
    initial_sync_timeout: Duration,
    outbox: VecDeque<OutgoingEvent>,
    send_in_flight: bool,
    send_backoff: Backoff,
    login_backoff: Backoff,
    fetch_turn: bool,
    turn_in_flight: bool,
    turn_next: Option<Instant>,
    turn_backoff: Backoff,
    reachable: bool,
    room_requests: VecDeque<RoomRequest>,
    room_in_flight: bool,
    room_backoff: Backoff,
    pub rooms: Rooms,
    events: VecDeque<MatrixEvent>,
}

impl MatrixClient {
    pub fn new(
        base_url: String,
        user_id: OwnedUserId,
        credentials: Credentials,
        device_id: Option<OwnedDeviceId>,
        fetch_turn: bool,
        now: Instant,
    ) -> Self {
        let session = match &credentials {
            Credentials::Password(_) => Session::NeedLogin,
            Credentials::AccessToken(t) => Session::Ready {
                access_token: Arc::new(t.clone()),
            },
        };
        MatrixClient {
            base_url: base_url.trim_end_matches('/').to_owned(),
            user_id,
            credentials,
            device_id,
            session,
            next_id: 0,
            in_flight: BTreeMap::new(),
            since: None,
            sync_in_flight: false,
            sync_backoff: Backoff::default(),
            initial_sync_done: false,
            initial_sync_timeout: Duration::ZERO,
            outbox: VecDeque::new(),
            send_in_flight: false,
            send_backoff: Backoff::default(),
            login_backoff: Backoff::default(),
            fetch_turn,
            turn_in_flight: false,
            turn_next: fetch_turn.then_some(now),
            turn_backoff: Backoff::default(),
            reachable: true,
            room_requests: VecDeque::new(),
            room_in_flight: false,
            room_backoff: Backoff::default(),
            rooms: Rooms::default(),
            events: VecDeque::new(),
        }
    }

    pub fn user_id(&self) -> &OwnedUserId {
        &self.user_id
    }

    pub fn initial_sync_done(&self) -> bool {
        self.initial_sync_done
    }

    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Queues a room event. Events leave in order, one at a time, retried with the same
    /// transaction id (so the homeserver stores each once).
    pub fn send_event(
        &mut self,
        room_id: OwnedRoomId,
        event_type: &str,
        content: serde_json::Value,
        txn_id: String,
    ) -> Result<(), ()> {
        if self.outbox.len() >= limits::MAX_OUTBOX {
            // Candidates are the most expendable: ICE can work with the ones already sent.
            let first_droppable = usize::from(self.send_in_flight);
            let victim = self
                .outbox
                .iter()
                .enumerate()
                .skip(first_droppable)
                .find(|(_, e)| e.event_type == "m.call.candidates")
                .map(|(i, _)| i);
            match victim {
                Some(i) => {
                    warn!("outbox full: dropping a queued m.call.candidates event");
                    self.outbox.remove(i);
                }
                None => {
                    warn!(event_type, "outbox full: event refused");
                    return Err(());
                }
            }
        }
        self.outbox.push_back(OutgoingEvent {
            room_id,
            event_type: event_type.to_owned(),
            txn_id: OwnedTransactionId::from(txn_id),
            content,
            attempts: 0,
        });
        Ok(())
    }

    /// Joins a room we were invited to.
    pub fn join(&mut self, room_id: OwnedRoomId) {
        self.push_room_request(RoomRequest::Join(room_id));
    }

    /// Creates a direct room with `peer` invited, end-to-end encrypted if `encrypted`.
    pub fn create_dm(&mut self, peer: OwnedUserId, encrypted: bool) {
        self.push_room_request(RoomRequest::CreateDm { peer, encrypted });
    }

    fn push_room_request(&mut self, r: RoomRequest) {
        if self.room_requests.len() >= limits::MAX_OUTBOX {
            warn!(?r, "too many room requests; dropped");
            return;
        }
        self.room_requests.push_back(r);
    }

    pub fn poll_event(&mut self) -> Option<MatrixEvent> {
        self.events.pop_front()
    }

    fn versions() -> Cow<'static, SupportedVersions> {
        Cow::Owned(SupportedVersions {
            versions: [MatrixVersion::V1_1].into_iter().collect(),
            features: Default::default(),
        })
    }

    fn next_http_id(&mut self, kind: RequestKind, now: Instant) -> HttpId {
        self.next_id += 1;
        let id = HttpId(self.next_id);
        self.in_flight.insert(
            id,
            InFlight {
                kind,
                deadline: kind.deadline(now),
            },
        );
        id
    }

    /// The next request to run now, if any.
    pub fn poll_request(&mut self, now: Instant) -> Option<(HttpId, http::Request<Vec<u8>>)> {
        let token = match &self.session {
            Session::Failed | Session::LoggingIn => return None,
            Session::NeedLogin => {
                if !self.login_backoff.ready(now) {
                    return None;
                }
                return self.login_request(now);
            }
            // Runs at the end of every drain (every datagram): a shared token, so this clone
            // is a count, not a copy of the string.
            Session::Ready { access_token } => Arc::clone(access_token),
        };
        let auth = SendAccessToken::IfRequired(token.expose());

        if !self.send_in_flight && self.send_backoff.ready(now) {
            if let Some(ev) = self.outbox.front_mut() {
                ev.attempts += 1;
                let raw: Raw<AnyMessageLikeEventContent> =
                    match serde_json::value::to_raw_value(&ev.content) {
                        Ok(r) => Raw::from_json(r),
                        Err(e) => {
                            warn!("cannot encode room event: {e}");
                            self.outbox.pop_front();
                            return None;
                        }
                    };
                let req = send_message_event::v3::Request::new_raw(
                    ev.room_id.clone(),
                    ev.txn_id.clone(),
                    MessageLikeEventType::from(ev.event_type.as_str()),
                    raw,
                );
                match req.try_into_http_request::<Vec<u8>>(&self.base_url, auth, Self::versions()) {
                    Ok(r) => {
                        debug!(event_type = %ev.event_type, attempt = ev.attempts, "sending room event");
                        self.send_in_flight = true;
                        return Some((self.next_http_id(RequestKind::Send, now), r));
                    }
                    Err(e) => {
                        warn!("cannot build send request: {e}");
                        self.outbox.pop_front();
                    }
                }
            }
        }

        if !self.sync_in_flight && self.sync_backoff.ready(now) {
            let mut req = sync_events::v3::Request::new();
            req.since = self.since.clone();
            // The first sync, and the first after a failure, return at once (so calls can be
            // placed, and a homeserver that came back is known to be back); others long-poll.
            req.timeout = Some(match &self.since {
                Some(_) if self.sync_backoff.failures == 0 => limits::SYNC_TIMEOUT,
                Some(_) => Duration::ZERO,
                None => self.initial_sync_timeout,
            });
            match req.try_into_http_request::<Vec<u8>>(&self.base_url, auth, Self::versions()) {
                Ok(r) => {
                    self.sync_in_flight = true;
                    return Some((self.next_http_id(RequestKind::Sync, now), r));
                }
                Err(e) => warn!("cannot build sync request: {e}"),
            }
        }

        if !self.room_in_flight && self.room_backoff.ready(now) {
            if let Some(r) = self.room_requests.front() {
                let built = match r.clone() {
                    RoomRequest::Join(room_id) => join_room_by_id::v3::Request::new(room_id)
                        .try_into_http_request::<Vec<u8>>(&self.base_url, auth, Self::versions()),
                    RoomRequest::CreateDm { peer, encrypted } => {
                        let mut req = create_room::v3::Request::new();
                        req.invite = vec![peer];
                        req.is_direct = true;
                        req.preset = Some(create_room::v3::RoomPreset::TrustedPrivateChat);
                        if encrypted {
                            req.initial_state.extend(encryption_state());
                        }
                        req.try_into_http_request::<Vec<u8>>(&self.base_url, auth, Self::versions())
                    }
                };
                match built {
                    Ok(req) => {
                        self.room_in_flight = true;
                        return Some((self.next_http_id(RequestKind::Room, now), req));
                    }
                    Err(e) => {
                        warn!("cannot build room request: {e}");
                        self.room_requests.pop_front();
                    }
                }
            }
        }

        if self.fetch_turn
            && !self.turn_in_flight
            && self.turn_backoff.ready(now)
            && self.turn_next.is_some_and(|t| now >= t)
        {
            let req = get_turn_server_info::v3::Request::new();
            match req.try_into_http_request::<Vec<u8>>(&self.base_url, auth, Self::versions()) {
                Ok(r) => {
                    self.turn_in_flight = true;
                    return Some((self.next_http_id(RequestKind::TurnServer, now), r));
                }
                Err(e) => warn!("cannot build turnServer request: {e}"),
            }
        }
        None
    }

    fn login_request(&mut self, now: Instant) -> Option<(HttpId, http::Request<Vec<u8>>)> {
        let Credentials::Password(password) = &self.credentials else {
            return None;
        };
        let identifier =
            UserIdentifier::Matrix(MatrixUserIdentifier::new(self.user_id.to_string()));
        let info = login::v3::LoginInfo::Password(login::v3::Password::new(
            identifier,
            password.expose().to_owned(),
        ));
        let mut req = login::v3::Request::new(info);
        req.device_id = self.device_id.clone();
        req.initial_device_display_name = Some("call-assist".into());
        match req.try_into_http_request::<Vec<u8>>(
            &self.base_url,
            SendAccessToken::None,
            Self::versions(),
        ) {
            Ok(r) => {
                self.session = Session::LoggingIn;
                Some((self.next_http_id(RequestKind::Login, now), r))
            }
            Err(e) => {
                warn!("cannot build login request: {e}");
                self.session = Session::Failed;
                self.events
                    .push_back(MatrixEvent::LoginFailed(e.to_string()));
                None
            }
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut consider = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        for f in self.in_flight.values() {
            consider(Some(f.deadline));
        }
        if matches!(self.session, Session::NeedLogin) {
            consider(self.login_backoff.not_before);
        }
        if matches!(self.session, Session::Ready { .. }) {
            if !self.sync_in_flight {
                consider(self.sync_backoff.not_before);
            }
            if !self.send_in_flight && !self.outbox.is_empty() {
                consider(self.send_backoff.not_before);
            }
            if self.fetch_turn && !self.turn_in_flight {
                consider(self.turn_next.max(self.turn_backoff.not_before));
            }
            if !self.room_in_flight && !self.room_requests.is_empty() {
                consider(self.room_backoff.not_before);
            }
        }
        t
    }

    /// Requests the driver has not answered by their deadline count as failed.
    pub fn handle_timeout(&mut self, now: Instant, rng: &mut Rng) {
        let expired: Vec<HttpId> = self
            .in_flight
            .iter()
            .filter(|(_, f)| now >= f.deadline)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            warn!(?id, "homeserver request timed out");
            self.handle_response(now, id, Err(HttpFailure::Timeout), rng);
        }
    }

    pub fn handle_response(
        &mut self,
        now: Instant,
        id: HttpId,
        response: Result<http::Response<Vec<u8>>, HttpFailure>,
        rng: &mut Rng,
    ) {
        let Some(flight) = self.in_flight.remove(&id) else {
            debug!(?id, "answer for an unknown or expired request ignored");
            return;
        };
        let failure = classify(&response);
        match &failure {
            Some(Failure::Transient {
                retry_after: None, ..
            }) => self.set_reachable(false),
            Some(_) | None => self.set_reachable(true),
        }
        match flight.kind {
            RequestKind::Login => self.on_login(now, response, failure, rng),
            RequestKind::Sync => self.on_sync(now, response, failure, rng),
            RequestKind::Send => self.on_send(now, response, failure, rng),
            RequestKind::TurnServer => self.on_turn(now, response, failure, rng),
            RequestKind::Room => self.on_room(now, response, failure, rng),
        }
    }

    fn set_reachable(&mut self, reachable: bool) {
        if self.reachable != reachable {
            self.reachable = reachable;
            if reachable {
                info!("homeserver reachable again");
            } else {
                warn!("homeserver unreachable; retrying with backoff");
            }
            self.events.push_back(MatrixEvent::Reachable(reachable));
        }
    }

    /// Makes this run's initial sync its own. Synapse answers a /sync from its cache when
    /// the same device asks the same (`since`, `timeout`, filter, ...) within 2 minutes: a
    /// restarted agent's initial sync got the last run's, then each of that run's later
    /// answers one per request, so an invite came in a batch without the answer and hangup
    /// that ended it, and rang. A sync without `since` never waits (Synapse ignores its
    /// `timeout`), so a timeout of `1..=1000` ms picked per run only changes the cache key.
    pub fn set_run_id(&mut self, run_id: &str) {
        // FNV-1a over the run's random party id: no draw of its own from the agent's RNG, so
        // seeded simulations keep their traces.
        let h = run_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        self.initial_sync_timeout = Duration::from_millis(1 + h % 1000);
    }

    /// A 401 on an authenticated request: log in again when we can, else give up.
    fn token_refused(&mut self, why: &str) {
        match self.credentials {
            Credentials::Password(_) => {
                warn!("access token refused ({why}); logging in again");
                self.session = Session::NeedLogin;
            }
            Credentials::AccessToken(_) => {
                warn!("access token refused ({why})");
                self.session = Session::Failed;
                self.events.push_back(MatrixEvent::LoginFailed(format!(
                    "access token refused: {why}"
                )));
            }
        }
    }

    fn on_login(
        &mut self,
        now: Instant,
        response: Result<http::Response<Vec<u8>>, HttpFailure>,
        failure: Option<Failure>,
        rng: &mut Rng,
    ) {
        match failure {
            Some(Failure::Transient { retry_after, why }) => {
                let d = self.login_backoff.fail(now, retry_after, rng);
                warn!("login failed ({why}); retrying in {d:?}");
                self.session = Session::NeedLogin;
            }
            Some(Failure::Permanent { why, .. }) => {
                warn!("login refused: {why}");
                self.session = Session::Failed;
                self.events.push_back(MatrixEvent::LoginFailed(why));
            }
            None => {
                let parsed = response.map_err(|e| format!("{e:?}")).and_then(|r| {
                    login::v3::Response::try_from_http_response(as_slice(&r))
                        .map_err(|e| e.to_string())
                });
                match parsed {
                    Ok(r) => {
                        self.login_backoff.succeed();
                        info!(device_id = %r.device_id, "logged in");
                        let token = Secret::new(r.access_token);
                        self.device_id = Some(r.device_id.clone());
                        self.session = Session::Ready {
                            access_token: Arc::new(token.clone()),
                        };
                        self.events.push_back(MatrixEvent::LoggedIn {
                            user_id: r.user_id,
                            device_id: r.device_id,
                            access_token: token,
                        });
                    }
                    Err(e) => {
                        let d = self.login_backoff.fail(now, None, rng);
                        warn!("unparsable login answer ({e}); retrying in {d:?}");
                        self.session = Session::NeedLogin;
                    }
                }
            }
        }
    }

    fn on_sync(
        &mut self,
        now: Instant,
        response: Result<http::Response<Vec<u8>>, HttpFailure>,
        failure: Option<Failure>,
        rng: &mut Rng,
    ) {
        self.sync_in_flight = false;
        match failure {
            Some(Failure::Transient { retry_after, why }) => {
                let d = self.sync_backoff.fail(now, retry_after, rng);
                warn!("sync failed ({why}); retrying in {d:?}");
            }
            Some(Failure::Permanent {
                status: 401, why, ..
            }) => self.token_refused(&why),
            Some(Failure::Permanent { why, .. }) => {
                let d = self.sync_backoff.fail(now, None, rng);
                warn!("sync refused ({why}); retrying in {d:?}");
            }
            None => {
                let parsed = response.map_err(|e| format!("{e:?}")).and_then(|r| {
                    sync_events::v3::Response::try_from_http_response(as_slice(&r))
                        .map_err(|e| e.to_string())
                });
                match parsed {
                    Ok(r) => {
                        self.sync_backoff.succeed();
                        self.since = Some(r.next_batch.clone());
                        for (room_id, inviter) in Rooms::invites(&r, &self.user_id) {
                            self.events
                                .push_back(MatrixEvent::Invited { room_id, inviter });
                        }
                        for ev in self.rooms.apply_sync(&r) {
                            self.events.push_back(MatrixEvent::Timeline(ev));
                        }
                        if !self.initial_sync_done {
                            self.initial_sync_done = true;
                            self.events.push_back(MatrixEvent::InitialSyncDone);
                        }
                    }
                    Err(e) => {
                        let d = self.sync_backoff.fail(now, None, rng);
                        warn!("unparsable sync answer ({e}); retrying in {d:?}");
                    }
                }
            }
        }
    }

    fn on_send(
        &mut self,
        now: Instant,
        _response: Result<http::Response<Vec<u8>>, HttpFailure>,
        failure: Option<Failure>,
        rng: &mut Rng,
    ) {
        self.send_in_flight = false;
        match failure {
            None => {
                self.send_backoff.succeed();
                if let Some(ev) = self.outbox.pop_front() {
                    debug!(event_type = %ev.event_type, "room event sent");
                }
            }
            Some(Failure::Transient { retry_after, why }) => {
                let gave_up = self
                    .outbox
                    .front()
                    .is_some_and(|e| e.attempts >= limits::MAX_SEND_ATTEMPTS);
                if gave_up {
                    self.send_backoff.succeed();
                    if let Some(ev) = self.outbox.pop_front() {
                        warn!(event_type = %ev.event_type, "giving up on room event after {} attempts ({why})", ev.attempts);
                        self.events.push_back(MatrixEvent::SendGaveUp {
                            call_id: ev.call_id(),
                        });
                    }
                } else {
                    let d = self.send_backoff.fail(now, retry_after, rng);
                    warn!("sending room event failed ({why}); retrying in {d:?}");
                }
            }
            Some(Failure::Permanent {
                status: 401, why, ..
            }) => self.token_refused(&why),
            Some(Failure::Permanent { why, .. }) => {
                self.send_backoff.succeed();
                if let Some(ev) = self.outbox.pop_front() {
                    warn!(event_type = %ev.event_type, "room event refused: {why}");
                    self.events.push_back(MatrixEvent::SendGaveUp {
                        call_id: ev.call_id(),
                    });
                }
            }
        }
    }

    fn on_room(
        &mut self,
        now: Instant,
        response: Result<http::Response<Vec<u8>>, HttpFailure>,
        failure: Option<Failure>,
        rng: &mut Rng,
    ) {
        self.room_in_flight = false;
        match failure {
            Some(Failure::Transient { retry_after, why }) => {
                let d = self.room_backoff.fail(now, retry_after, rng);
                warn!("room request failed ({why}); retrying in {d:?}");
            }
            Some(Failure::Permanent { status: 401, why }) => self.token_refused(&why),
            Some(Failure::Permanent { why, .. }) => {
                self.room_backoff.succeed();
                let r = self.room_requests.pop_front();
                warn!(?r, "room request refused: {why}");
                self.events
                    .push_back(MatrixEvent::RoomRequestFailed { what: why });
            }
            None => {
                self.room_backoff.succeed();
                match self.room_requests.pop_front() {
                    Some(RoomRequest::Join(room_id)) => info!(%room_id, "joined room"),
                    Some(RoomRequest::CreateDm { peer, encrypted }) => {
                        let parsed = response.ok().and_then(|r| {
                            create_room::v3::Response::try_from_http_response(as_slice(&r)).ok()
                        });
                        match parsed {
                            Some(r) => {
                                info!(room_id = %r.room_id, encrypted, "created direct room");
                                self.events.push_back(MatrixEvent::RoomCreated {
                                    room_id: r.room_id,
                                    peer,
                                });
                            }
                            None => self.events.push_back(MatrixEvent::RoomRequestFailed {
                                what: "unparsable createRoom answer".into(),
                            }),
                        }
                    }
                    None => {}
                }
            }
        }
    }

    fn on_turn(
        &mut self,
        now: Instant,
        response: Result<http::Response<Vec<u8>>, HttpFailure>,
        failure: Option<Failure>,
        rng: &mut Rng,
    ) {
        self.turn_in_flight = false;
        match failure {
            Some(Failure::Transient { retry_after, why }) => {
                let d = self.turn_backoff.fail(now, retry_after, rng);
                debug!("turnServer failed ({why}); retrying in {d:?}");
            }
            Some(Failure::Permanent {
                status: 401, why, ..
            }) => self.token_refused(&why),
            Some(Failure::Permanent { why, .. }) => {
                debug!("turnServer refused ({why})");
                self.turn_next = Some(now + limits::TURN_RETRY_EMPTY);
            }
            None => {
                self.turn_backoff.succeed();
                let parsed = response.ok().and_then(|r| {
                    get_turn_server_info::v3::Response::try_from_http_response(as_slice(&r)).ok()
                });
                match parsed {
                    Some(r) if !r.uris.is_empty() => {
                        let ttl = r.ttl.max(Duration::from_secs(60));
                        self.turn_next = Some(now + ttl.mul_f64(limits::TURN_REFRESH_FRACTION));
                        debug!(uris = r.uris.len(), ?ttl, "TURN servers");
                        self.events.push_back(MatrixEvent::TurnServers(TurnServers {
                            uris: r.uris,
                            username: Secret::new(r.username),
                            password: Secret::new(r.password),
                            ttl,
                        }));
                    }
                    _ => {
                        debug!("homeserver offers no TURN servers");
                        self.turn_next = Some(now + limits::TURN_RETRY_EMPTY);
                    }
                }
            }
        }
    }
}

/// The `m.room.encryption` initial state of an encrypted direct room (Megolm with the
/// recommended rotation), as Element sends it; `None` only if it cannot be serialised.
fn encryption_state() -> Option<ruma::serde::Raw<ruma::events::AnyInitialStateEvent>> {
    use ruma::events::room::encryption::RoomEncryptionEventContent;
    use ruma::events::InitialStateEvent;
    let event = InitialStateEvent::with_empty_state_key(
        RoomEncryptionEventContent::with_recommended_defaults(),
    );
    ruma::serde::Raw::new(&event).ok().map(|r| r.cast())
}
