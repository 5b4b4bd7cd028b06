//! The one live driver: the place where datagrams, homeserver HTTP answers, signals, camera
//! frames and time enter the core.
//!
//! [`Driver`] owns what every live mode shares: the UDP sockets, the clock and timer, the HTTP
//! client, signals, the drain-until-Timeout loop, the stations' media, TURN host resolution,
//! login and the saved session, finding or creating a direct room and waiting for the peer to
//! join. A mode (`call`, `listen`, `check`, `serve`) is a [`Policy`]: what to do on an event,
//! a command or a tick, and when to stop.
//!
//! The loop runs on the calling thread and waits in an epoll of its own (see `Waiter`); what
//! it starts (HTTP, the crypto layer, the cameras, the API) runs as smol tasks on other
//! threads, and reqwest inside `async_compat::Compat`, which keeps one tokio runtime thread
//! in the background. Every input but the datagrams reaches the loop through one bounded
//! channel.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use call_assist_core::h264::ProfileLevelId;
use call_assist_core::{
    Agent, AgentConfig, AgentEvent, ApiError, CallId, CallPolicy, CallState, Credentials,
    HttpFailure, HttpId, Input, MediaKind, OwnedRoomId, OwnedUserId, Party, RoomId, Secret,
};
use futures_lite::{Stream, StreamExt};
use serde_json::{json, Value};
use smol::channel::{Receiver, Sender};
use tracing::{debug, error, info, warn};

use super::config::{MediaOptions, NetworkConfig};
use super::net::{self, Sockets};
use super::session::{login_credentials, Account, Auth, SavedSession};
use super::{exit, Lines};
use crate::e2ee::{self, E2ee};
use crate::media::backchannel::TalkbackEvent;
use crate::media::live::{start_media, LiveMedia};
use crate::media::pump::VideoChoice;
use crate::media::rtsp::CameraEvent;

/// Inputs queued for the loop (datagrams, HTTP answers, commands, camera frames); when full,
/// the socket readers and the camera wait.
const INBOX: usize = 1024;
/// How long the homeserver may stay unreachable before the first sync (then exit 4), for
/// modes that give up (`Setup::give_up_unreachable`).
const STARTUP_UNREACHABLE_GRACE: Duration = Duration::from_secs(10);
/// How long a call to a user without a direct room waits for them to join a new one.
pub(crate) const PEER_JOIN_WAIT: Duration = Duration::from_secs(60);
/// After a hangup on shutdown, how long to wait for the homeserver to take the events.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);
/// On exit, how long to wait for the crypto layer's requests in flight (see `E2ee::close`).
const E2EE_CLOSE: Duration = Duration::from_secs(3);

/// What reaches the loop. `C`: the mode's own commands (the API's requests for `serve`).
pub(crate) enum Msg<C> {
    Http {
        id: HttpId,
        response: Result<http::Response<Vec<u8>>, HttpFailure>,
    },
    /// SIGTERM or SIGINT.
    Stop,
    /// SIGHUP, for modes that reload.
    Reload,
    /// Resolved host names of STUN/TURN URIs.
    Servers {
        stun: Vec<SocketAddr>,
        turn: Vec<SocketAddr>,
    },
    /// An event of the camera of station `.0`.
    Camera(usize, CameraEvent),
    /// An event of the camera speaker (talkback) of station `.0`.
    Talkback(usize, TalkbackEvent),
    /// An event of the hub's own speaker of station `.0`.
    Speaker(usize, crate::media::speaker::SpeakerEvent),
    /// A period or event of the hub's microphone of station `.0`.
    Mic(usize, crate::media::mic::MicEvent),
    Command(C),
}

/// How long a core deadline may wait to share a wake-up with the shell's next one while
/// media is sent: str0m's NACK (every 33 ms), TWCC (50 ms), RTCP and receive timers then
/// ride along with the media pump's frames (every 20 ms for audio) instead of waking the
/// loop ~100 more times a second (issue #19). 20 ms of audio frame interval, plus
/// [`SEND_EARLY`]: a frame sent early moves the pump's next wake-up that much further from
/// the core's deadline. Before any media (ICE, DTLS, ringing) nothing waits.
const COALESCE: Duration = Duration::from_millis(25);

/// When the loop wakes next: the core's deadline, or the shell's when that comes within
/// [`COALESCE`] after it and media is being sent.
fn coalesced(agent_at: Instant, shell_at: Option<Instant>, media: bool) -> Instant {
    match shell_at {
        None => agent_at,
        Some(s) if s <= agent_at => s,
        Some(s) if media && s - agent_at <= COALESCE => s,
        Some(_) => agent_at,
    }
}

/// How early a paced media frame (test clip, tone, audio file) may go out: one due within
/// this after a wake-up the loop has anyway (a datagram, a message) goes out with it, and
/// the loop does not wake again for it (issue #19: about one wake-up in three while a call
/// runs was the media pump's). The peer sees these frames at most this much early, i.e. as
/// a few ms of jitter; nothing received waits.
const SEND_EARLY: Duration = Duration::from_millis(5);

/// While media is sent, a datagram that arrives at most this long before the loop's next
/// wake-up (the media pump's next frame: every 20 ms while audio is sent) waits for it in the
/// socket's buffer: the loop sleeps on its timer alone and reads what came with the wake-up
/// it has anyway. A js peer's call: 130 -> 60 wake-ups a second (issue #19), for at most this
/// much (10 ms on average) more delay on what is received: within the 20-40 ms a receiver's
/// jitter buffer holds anyway. Before any media (ICE, DTLS, ringing) nothing waits.
const RECEIVE_SLACK: Duration = Duration::from_millis(20);

/// What woke the loop.
enum Wake<C> {
    Msg(Msg<C>),
    /// The sockets that have datagrams, as [`Ready::Sockets`].
    Readable(u64),
    /// The deadline; with the sockets that held datagrams back meanwhile (`RECEIVE_SLACK`),
    /// read in the same turn.
    Timer(u64),
}

/// Datagrams read from one socket per wake-up, at most.
const READ_BATCH: usize = 64;

/// The loop's own epoll: the UDP sockets level-triggered, the inbox through a waker that
/// writes an eventfd, the next deadline as the wait's timeout (rounded up to the millisecond:
/// never early, at most 1 ms late).
///
/// Why not async-io's reactor, which `smol::block_on` shares: async-io keeps an "async-io"
/// thread that takes the reactor whenever the loop's thread lets go of it, i.e. after every
/// wake-up, and then every datagram woke that thread first and it woke the loop (a futex and
/// two context switches per datagram: 19 % of the hub's CPU in a call was that thread, and
/// 19 % the kernel's `finish_task_switch`; issue #19's profile). Written on rustix's epoll
/// rather than `polling` (async-io's poller) because `polling` re-arms a timerfd and its
/// notifier on every wait: five system calls per wake-up where this takes one.
struct Waiter {
    /// The sockets and the eventfd.
    epoll: std::os::fd::OwnedFd,
    /// The eventfd alone: waiting in it leaves datagrams in the sockets (`RECEIVE_SLACK`).
    inbox_only: std::os::fd::OwnedFd,
    /// Written by [`Notify`] when the inbox gets a message.
    eventfd: std::sync::Arc<std::os::fd::OwnedFd>,
    events: Vec<rustix::event::epoll::Event>,
    waker: std::task::Waker,
}

/// The epoll key of the eventfd; socket `i` (in `Sockets` order) has key `i`.
const NOTIFY_KEY: u64 = u64::MAX;

/// Socket `key`'s bit in [`Ready::Sockets`]; beyond 64 sockets, all bits ("read them all").
fn socket_bit(key: u64) -> u64 {
    u32::try_from(key)
        .ok()
        .and_then(|k| 1u64.checked_shl(k))
        .unwrap_or(u64::MAX)
}

/// Wakes the loop's epoll when the inbox gets a message.
struct Notify(std::sync::Arc<std::os::fd::OwnedFd>);

impl std::task::Wake for Notify {
    fn wake(self: std::sync::Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        // Fails only when the counter is full (then the loop is woken already).
        let _ = rustix::io::write(&*self.0, &1u64.to_ne_bytes());
    }
}

/// What woke the loop's epoll.
enum Ready {
    /// The sockets with these keys have datagrams (bit `i`: socket `i`; at most 64 sockets
    /// are told apart, the rest read as "all").
    Sockets(u64),
    Notified,
    Timeout,
}

impl Waiter {
    fn new(sockets: &Sockets) -> std::io::Result<Self> {
        use rustix::event::{epoll, eventfd, EventfdFlags};
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        for (key, sock) in sockets.values().enumerate() {
            epoll::add(
                &epoll,
                sock.get_ref(),
                epoll::EventData::new_u64(key as u64),
                epoll::EventFlags::IN,
            )?;
        }
        let eventfd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        let inbox_only = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        for e in [&epoll, &inbox_only] {
            epoll::add(
                e,
                &eventfd,
                epoll::EventData::new_u64(NOTIFY_KEY),
                epoll::EventFlags::IN,
            )?;
        }
        let eventfd = std::sync::Arc::new(eventfd);
        let waker = std::task::Waker::from(std::sync::Arc::new(Notify(eventfd.clone())));
        Ok(Self {
            epoll,
            inbox_only,
            eventfd,
            events: Vec::with_capacity(sockets.len() + 1),
            waker,
        })
    }

    /// Waits for a message in `rx`, a readable socket (if `sockets`) or `deadline`,
    /// whichever comes first.
    fn wait<C>(
        &mut self,
        mut rx: std::pin::Pin<&mut Receiver<Msg<C>>>,
        deadline: Instant,
        sockets: bool,
    ) -> std::io::Result<Wake<C>> {
        loop {
            let mut cx = std::task::Context::from_waker(&self.waker);
            if let std::task::Poll::Ready(m) = rx.as_mut().poll_next(&mut cx) {
                // The driver holds a sender itself, so the inbox never closes while it runs.
                return Ok(m.map_or(Wake::Timer(0), Wake::Msg));
            }
            let timeout = deadline.saturating_duration_since(Instant::now());
            if timeout.is_zero() {
                // What the sockets held back while they were left out of the wait.
                let held = match sockets {
                    true => 0,
                    false => match self.epoll_wait(Duration::ZERO, true)? {
                        Ready::Sockets(which) => which,
                        Ready::Notified | Ready::Timeout => 0,
                    },
                };
                return Ok(Wake::Timer(held));
            }
            match self.epoll_wait(timeout, sockets)? {
                Ready::Sockets(which) => return Ok(Wake::Readable(which)),
                // A message came (the next poll takes it), or the deadline passed.
                Ready::Notified | Ready::Timeout => {}
            }
        }
    }

    fn epoll_wait(&mut self, timeout: Duration, sockets: bool) -> std::io::Result<Ready> {
        use rustix::event::{epoll, Timespec};
        let timeout = Timespec {
            tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        self.events.clear();
        let epoll = if sockets {
            &self.epoll
        } else {
            &self.inbox_only
        };
        match epoll::wait(
            epoll,
            rustix::buffer::spare_capacity(&mut self.events),
            Some(&timeout),
        ) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(Ready::Notified),
            Err(e) => return Err(e.into()),
        }
        let mut sockets = 0u64;
        let mut notified = false;
        for e in &self.events {
            match e.data.u64() {
                NOTIFY_KEY => notified = true,
                key => sockets |= socket_bit(key),
            }
        }
        if notified {
            let mut counter = [0u8; 8];
            // Resets the counter; EAGAIN if another wait already did.
            let _ = rustix::io::read(&*self.eventfd, &mut counter);
        }
        Ok(if sockets != 0 {
            Ready::Sockets(sockets)
        } else if notified {
            Ready::Notified
        } else {
            Ready::Timeout
        })
    }
}

/// A mode of the live driver.
pub(crate) trait Policy {
    type Command: Send + 'static;
    /// An agent event, after the driver did its shared part (lines, media, session).
    fn on_event(&mut self, d: &mut Driver<Self::Command>, e: &AgentEvent, now: Instant);
    /// The outcome of [`Driver::call_user`].
    fn on_dial(
        &mut self,
        _d: &mut Driver<Self::Command>,
        _dial: DialId,
        _outcome: Dialed,
        _now: Instant,
    ) {
    }
    fn on_command(&mut self, _d: &mut Driver<Self::Command>, _c: Self::Command, _now: Instant) {}
    /// Time-driven work, before every drain.
    fn on_tick(&mut self, _d: &mut Driver<Self::Command>, _now: Instant) {}
    fn deadline(&self) -> Option<Instant> {
        None
    }
    /// SIGTERM/SIGINT: the exit code of the shutdown it starts.
    fn stop_code(&self, d: &Driver<Self::Command>) -> u8;
    fn on_reload(&mut self, _d: &mut Driver<Self::Command>) {}
}

/// A source of media and its sinks; `serve` has one per named station, the others one.
pub(crate) struct Station {
    pub name: Option<String>,
    pub media: LiveMedia,
    /// The H.264 profile the camera sends (it goes into the SDP of this station's calls).
    pub profile: Option<ProfileLevelId>,
    /// The audio codec this station's calls list first: its camera speaker's (talkback).
    pub audio_preference: Option<call_assist_core::Codec>,
}

/// How to start one station.
pub(crate) struct StationSetup {
    pub name: Option<String>,
    pub media: MediaOptions,
    pub video: VideoChoice,
    pub rtsp_password: Option<Secret>,
}

/// Everything the driver needs to start.
pub(crate) struct Setup {
    pub account: Account,
    pub network: NetworkConfig,
    pub stations: Vec<StationSetup>,
    pub policy: CallPolicy,
    pub lines: Lines,
    /// Exit 4 when the homeserver stays unreachable before the first sync (a daemon retries).
    pub give_up_unreachable: bool,
    /// SIGHUP reaches [`Policy::on_reload`] (otherwise it keeps its default action).
    pub reload_on_hup: bool,
}

pub(crate) type DialId = u64;
/// The call placed (and its room), or why none was.
pub(crate) type Dialed = Result<(CallId, OwnedRoomId), DialError>;

/// Why [`Driver::call_user`] placed no call.
#[derive(Debug)]
pub(crate) enum DialError {
    /// The homeserver refused to create the direct room.
    Room(String),
    /// The peer did not join within [`PEER_JOIN_WAIT`].
    NoJoin,
    Place(OwnedRoomId, ApiError),
    ShuttingDown,
}

/// A call to a user waiting for a direct room and their join.
struct Dial {
    id: DialId,
    station: usize,
    peer: OwnedUserId,
    room: Option<OwnedRoomId>,
    since: Instant,
    /// Whether the invite waits for [`NEW_DM_GRACE`] after the peer joins.
    grace: DmGrace,
}

/// A dial's wait after the peer joins: only for an encrypted direct room the dial created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DmGrace {
    /// An existing room or a plain one: the invite goes out when the peer is in the room.
    None,
    /// The dial created an encrypted room; the peer has not been seen in it yet.
    AwaitingJoin,
    /// The peer was first seen in the new encrypted room then.
    JoinedAt(Instant),
}

/// After the peer joins an encrypted DM the hub just created, how long the first invite
/// waits. The peer's client fetches the hub's device keys and cross-signing identity when it
/// joins; an invite that arrives before that fails to decrypt in Element's "exclude insecure
/// devices" mode (`UNSIGNED_SENDER_DEVICE`), and matrix-js-sdk does not decrypt it again when
/// the identity arrives, so the call never rings (e2ee.rs, seen in CI).
const NEW_DM_GRACE: Duration = Duration::from_millis(1500);

/// Per-process counters for the stats line.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counters {
    pub packets_sent: u64,
    pub packets_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub video_frames_received: u64,
    pub audio_frames_received: u64,
    /// What woke the loop (issue #19's live bench reports these per second).
    pub wakeups: Wakeups,
}

/// The loop's wake-ups by cause.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Wakeups {
    /// The core's own deadline (str0m, Matrix, STUN/TURN timers).
    pub agent_timer: u64,
    /// A media frame (or another shell deadline) was due.
    pub shell_timer: u64,
    /// A socket was readable.
    pub socket: u64,
    /// A message: an HTTP answer, a command, a camera event, a signal.
    pub message: u64,
}

pub(crate) struct Driver<C> {
    pub agent: Agent,
    pub lines: Lines,
    pub stations: Vec<Station>,
    pub counters: Counters,
    /// The first sync is done.
    pub synced: bool,
    pub reachable: bool,
    sockets: Sockets,
    tx: Sender<Msg<C>>,
    /// Every homeserver request of the core passes through it (end-to-end encryption).
    e2ee: E2ee,
    account: Account,
    config_turn: bool,
    /// The agent's config with the password, for when the saved access token is refused.
    password_fallback: Option<AgentConfig>,
    /// Which station each call of ours belongs to.
    call_station: BTreeMap<CallId, usize>,
    /// Calls whose media has started (state `Connected` seen).
    media_started: BTreeSet<CallId>,
    turn_uris_seen: Vec<String>,
    unreachable_since: Option<Instant>,
    give_up_unreachable: bool,
    dials: Vec<Dial>,
    next_dial: DialId,
    dial_outcomes: Vec<(DialId, Dialed)>,
    shutdown: Option<(Instant, u8)>,
    exit: Option<u8>,
}

impl<C: Send + 'static> Driver<C> {
    /// Binds the sockets, starts every station's media, installs signal handlers and makes the
    /// agent. `Err` is the exit code, after a clear message on stderr.
    pub async fn start(s: Setup) -> Result<(Self, Receiver<Msg<C>>), u8> {
        let n = &s.network;
        let ips = net::local_ips(&n.interfaces, &n.exclude_interfaces, n.allow_loopback);
        if ips.is_empty() {
            eprintln!("error: no usable network address (allow loopback to use loopback)");
            return Err(exit::USAGE);
        }
        let (tx, rx) = smol::channel::bounded(INBOX);
        let sockets = net::bind_udp(&ips, n.port);
        if sockets.is_empty() {
            eprintln!("error: could not bind any UDP socket");
            return Err(exit::USAGE);
        }
        // Every station's sources and sinks before anything else: nothing starts half-set-up.
        let state_dir = s.account.state_dir.as_deref();
        let stations = start_stations(s.stations, state_dir, &tx).await?;
        listen_for_signals(&tx, s.reload_on_hup);
        let client = net::http_client().map_err(|e| {
            eprintln!("error: HTTP client: {e}");
            exit::USAGE
        })?;
        let addrs: Vec<SocketAddr> = sockets.keys().copied().collect();
        let profile = stations.first().and_then(|s| s.profile);
        let (agent, password_fallback, token) = new_agent(&s.account, n, s.policy, addrs, profile)?;
        let e2ee = E2ee::new(
            client,
            s.account.homeserver.clone(),
            s.account.state_dir.clone(),
        );
        // A token login emits no LoggedIn: the layer starts now (asking the homeserver for
        // the device when no saved session names it).
        if let Some((device, token)) = token {
            e2ee.start_with_token(s.account.user.as_str(), device, token);
        }
        let mut driver = Driver {
            agent,
            lines: s.lines,
            stations,
            counters: Counters::default(),
            synced: false,
            reachable: false,
            sockets,
            tx,
            e2ee,
            config_turn: n.turn.is_some(),
            account: s.account,
            password_fallback,
            call_station: BTreeMap::new(),
            media_started: BTreeSet::new(),
            turn_uris_seen: Vec::new(),
            unreachable_since: None,
            give_up_unreachable: s.give_up_unreachable,
            dials: Vec::new(),
            next_dial: 0,
            dial_outcomes: Vec::new(),
            shutdown: None,
            exit: None,
        };
        // A station with the hub's speaker wants G.711 from the first invite on.
        driver.use_hub_audio();
        Ok((driver, rx))
    }

    /// Where the mode's own inputs go in (e.g. the API's requests).
    pub fn sender(&self) -> Sender<Msg<C>> {
        self.tx.clone()
    }

    /// Ends the run with `code` (the first code given wins).
    pub fn finish(&mut self, code: u8) {
        self.exit.get_or_insert(code);
    }

    pub fn shutting_down(&self) -> bool {
        self.shutdown.is_some() || self.exit.is_some()
    }

    /// Hangs up every call and exits with `code` once the homeserver took the hangups.
    pub fn begin_shutdown(&mut self, now: Instant, code: u8) {
        if self.shutting_down() {
            return;
        }
        self.agent.hangup_all(now);
        self.shutdown = Some((now, code));
        for dial in std::mem::take(&mut self.dials) {
            self.dial_outcomes
                .push((dial.id, Err(DialError::ShuttingDown)));
        }
    }

    /// The station a call of ours belongs to.
    pub fn station_of(&self, call_id: &str) -> Option<usize> {
        self.call_station.get(call_id).copied()
    }

    pub fn station_name(&self, i: usize) -> Option<&str> {
        self.stations.get(i).and_then(|s| s.name.as_deref())
    }

    /// Answers a ringing call with station `station`'s media.
    pub fn answer(&mut self, call_id: &str, station: usize, now: Instant) -> Result<(), ApiError> {
        self.use_station(station);
        let answered = self.agent.answer(call_id, now);
        self.use_hub_audio();
        answered?;
        self.call_station.insert(call_id.to_owned(), station);
        Ok(())
    }

    /// Places a call in `room` with station `station`'s media.
    pub fn place(
        &mut self,
        room: &RoomId,
        station: usize,
        now: Instant,
    ) -> Result<CallId, ApiError> {
        self.use_station(station);
        let placed = self.agent.place_call(room, now);
        self.use_hub_audio();
        let call_id = placed?;
        self.call_station.insert(call_id.clone(), station);
        Ok(call_id)
    }

    /// Calls `peer` in their direct room; creates one and waits for their join if there is
    /// none. The outcome reaches [`Policy::on_dial`].
    pub fn call_user(&mut self, peer: &OwnedUserId, station: usize, now: Instant) -> DialId {
        self.next_dial += 1;
        let id = self.next_dial;
        if self.shutting_down() {
            self.dial_outcomes.push((id, Err(DialError::ShuttingDown)));
            return id;
        }
        let room = self.agent.find_direct_room(peer);
        let mut grace = DmGrace::None;
        if room.is_none() && !self.dials.iter().any(|d| d.peer == *peer) {
            info!(%peer, "no direct room yet; creating one");
            let encrypted = self.account.encrypt_new_dms;
            self.agent.create_direct_room(peer, encrypted, now);
            if encrypted {
                grace = DmGrace::AwaitingJoin;
            }
        }
        self.dials.push(Dial {
            id,
            station,
            peer: peer.clone(),
            room,
            since: now,
            grace,
        });
        id
    }

    /// Forgets a dial nobody waits for any more.
    pub fn cancel_dial(&mut self, dial: DialId) {
        self.dials.retain(|d| d.id != dial);
    }

    /// The offer of the next call carries this station's H.264 profile and audio preference.
    fn use_station(&mut self, station: usize) {
        let profile = self.stations.get(station).and_then(|s| s.profile);
        self.agent.set_h264_profile(profile);
        let audio = self.stations.get(station).and_then(|s| s.audio_preference);
        self.agent.set_audio_preference(audio);
    }

    /// Incoming invites are prepared (their answer SDP) before a station is chosen: they list
    /// first the codec of the first station whose camera speaker is up (talkback), if any.
    fn use_hub_audio(&mut self) {
        let audio = self.stations.iter().find_map(|s| s.audio_preference);
        self.agent.set_audio_preference(audio);
    }

    /// A line with the call's station, where stations have names.
    pub fn emit_for(&mut self, station: Option<usize>, mut v: Value) {
        if let Some(name) = station.and_then(|i| self.station_name(i)) {
            v["station"] = json!(name);
        }
        self.lines.emit(v);
    }

    fn transmit(&mut self, t: call_assist_core::Transmit) {
        let Some(sock) = self.sockets.get(&t.source) else {
            debug!(source = %t.source, "no socket for transmit source");
            return;
        };
        match sock.get_ref().send_to(&t.contents, t.destination) {
            Ok(n) => {
                self.counters.packets_sent += 1;
                self.counters.bytes_sent += n as u64;
            }
            Err(e) => debug!(dest = %t.destination, "send failed: {e}"),
        }
    }

    fn send_http(&self, id: HttpId, request: http::Request<Vec<u8>>) {
        let tx = self.tx.clone();
        let e2ee = self.e2ee.clone();
        smol::spawn(async move {
            let response = async_compat::Compat::new(e2ee.run(request)).await;
            let _ = tx.send(Msg::Http { id, response }).await;
        })
        .detach();
    }

    /// The shared part of an event; `false`: the event is consumed (the policy does not see it).
    fn on_event(&mut self, e: &AgentEvent, now: Instant) -> bool {
        match e {
            AgentEvent::LoggedIn {
                user_id,
                device_id,
                access_token,
            } => {
                info!(%device_id, "logged in as {user_id}");
                self.save_login(user_id, device_id, access_token);
                self.e2ee
                    .start(user_id.as_str(), device_id.as_str(), access_token);
            }
            AgentEvent::LoginFailed { message } => return self.on_login_failed(message, now),
            AgentEvent::HomeserverReachable(r) => {
                self.reachable = *r;
                self.unreachable_since = if *r {
                    None
                } else {
                    warn!("homeserver unreachable; retrying");
                    self.unreachable_since.or(Some(now))
                };
                self.lines
                    .emit(json!({"event": "homeserver", "reachable": r}));
            }
            AgentEvent::Synced => {
                self.synced = true;
                self.reachable = true;
                self.unreachable_since = None;
            }
            AgentEvent::RoomCreated { room_id, peer } => {
                for d in self.dials.iter_mut() {
                    if d.peer == *peer && d.room.is_none() {
                        d.room = Some(room_id.clone());
                    }
                }
            }
            AgentEvent::RoomRequestFailed { message } => {
                for d in std::mem::take(&mut self.dials) {
                    self.dial_outcomes
                        .push((d.id, Err(DialError::Room(message.clone()))));
                }
            }
            AgentEvent::ReflexiveAddress { local, mapped } => self.lines.emit(
                json!({"event": "stun", "local": local.to_string(), "mapped": mapped.to_string()}),
            ),
            AgentEvent::RelayAllocated { server, relay, .. } => self.lines.emit(
                json!({"event": "relay", "server": server.to_string(), "relay": relay.to_string()}),
            ),
            AgentEvent::RelayFailed {
                server,
                code,
                reason,
            } => self.lines.emit(
                json!({"event": "relay_failed", "server": server.to_string(), "code": code, "reason": reason}),
            ),
            AgentEvent::RelayLost { relay } => self
                .lines
                .emit(json!({"event": "relay_lost", "relay": relay.to_string()})),
            _ => self.on_call_event(e, now),
        }
        true
    }

    /// A refused saved token falls back to the password (the policy does not see it).
    fn on_login_failed(&mut self, message: &str, now: Instant) -> bool {
        if let Some(config) = self.password_fallback.take() {
            warn!("saved access token refused ({message}); logging in with the password");
            match Agent::new(config, net::seed(), now, net::unix_ms()) {
                Ok(a) => self.agent = a,
                Err(e) => {
                    error!("{e}");
                    self.finish(exit::USAGE);
                }
            }
            return false;
        }
        error!("login refused: {message}");
        self.lines.say(&format!("error: login refused: {message}"));
        self.lines
            .emit(json!({"event": "error", "kind": "login_refused", "message": message}));
        self.finish(exit::LOGIN_REFUSED);
        true
    }

    /// The shared part of a call's event: its lines, its station's media.
    fn on_call_event(&mut self, e: &AgentEvent, now: Instant) {
        match e {
            AgentEvent::CallReplaced { old, new } => {
                // Glare: the peer's call takes over our call's station.
                if let Some(i) = self.call_station.remove(old) {
                    self.call_station.insert(new.clone(), i);
                }
            }
            AgentEvent::CallStateChanged { call_id, state } => self.on_state(call_id, *state, now),
            AgentEvent::Media(f) => {
                match f.kind {
                    MediaKind::Video => self.counters.video_frames_received += 1,
                    MediaKind::Audio => self.counters.audio_frames_received += 1,
                }
                let station = self.station_of(&f.call_id);
                let line = self
                    .station_mut(&f.call_id)
                    .and_then(|s| s.media.remote_frame(f, now));
                if let Some(line) = line {
                    self.emit_for(station, line);
                }
            }
            AgentEvent::KeyframeRequested { call_id } => self.on_keyframe_request(call_id, now),
            AgentEvent::PanicCaught { call_id, during } => {
                error!(
                    call_id = call_id.as_deref(),
                    during, "str0m panicked on the peer's SDP; only this call ended"
                );
                self.lines
                    .emit(json!({"event": "panic", "call_id": call_id, "during": during}));
            }
            AgentEvent::CallEnded {
                call_id,
                reason,
                by,
            } => {
                let by = if *by == Party::Local {
                    "local"
                } else {
                    "remote"
                };
                let station = self.station_of(call_id);
                self.emit_for(
                    station,
                    json!({"event": "ended", "call_id": call_id, "reason": reason.as_str(), "by": by}),
                );
                self.lines
                    .say(&format!("call {call_id} ended: {reason} ({by})"));
                self.media_started.remove(call_id);
                let recorded = self
                    .station_mut(call_id)
                    .and_then(|s| s.media.end_call(call_id));
                if let Some(line) = recorded {
                    self.emit_for(station, line);
                }
            }
            // The policies report it; not logged here: the digit may be part of a PIN.
            AgentEvent::Dtmf { .. } => {}
            other => debug!(?other, "event"),
        }
    }

    fn station_mut(&mut self, call_id: &str) -> Option<&mut Station> {
        let i = self.station_of(call_id)?;
        self.stations.get_mut(i)
    }

    fn on_state(&mut self, call_id: &str, state: CallState, now: Instant) {
        let name = match state {
            CallState::InviteSent => "invite_sent",
            CallState::Ringing => "ringing",
            CallState::Connecting => "connecting",
            CallState::Connected => "connected",
            _ => "ended",
        };
        let station = self.station_of(call_id);
        self.emit_for(
            station,
            json!({"event": "state", "call_id": call_id, "state": name}),
        );
        if state != CallState::Connected || self.media_started.contains(call_id) {
            return;
        }
        self.lines.say(&format!("call {call_id} connected"));
        self.media_started.insert(call_id.to_owned());
        let Some(i) = station else { return };
        let lines = match self.stations.get_mut(i) {
            Some(s) => s
                .media
                .start_call(&mut self.agent, call_id, now, net::unix_ms()),
            None => Vec::new(),
        };
        for line in lines {
            self.emit_for(station, line);
        }
    }

    fn on_keyframe_request(&mut self, call_id: &str, now: Instant) {
        let Some(i) = self.station_of(call_id) else {
            return;
        };
        let answer = match self.stations.get_mut(i) {
            Some(s) => s.media.keyframe_requested(&mut self.agent, call_id, now),
            None => None,
        };
        if let Some(a) = answer {
            info!(%call_id, answer = a.as_str(), "the peer asked for a keyframe");
            self.lines.emit(
                json!({"event": "keyframe_request", "call_id": call_id, "answer": a.as_str()}),
            );
        }
    }

    fn save_login(
        &self,
        user_id: &call_assist_core::UserId,
        device_id: &ruma::DeviceId,
        access_token: &Secret,
    ) {
        let Some(dir) = &self.account.state_dir else {
            return;
        };
        let s = SavedSession {
            homeserver: self.account.homeserver.clone(),
            user_id: user_id.to_string(),
            device_id: device_id.to_string(),
            access_token: access_token.expose().to_owned(),
        };
        if let Err(err) = s.save(dir) {
            warn!("cannot save session in {}: {err}", dir.display());
        }
    }

    /// Time-driven work of the driver: media, DNS, dials, shutdown, giving up.
    fn on_tick(&mut self, now: Instant) {
        for s in &mut self.stations {
            s.media.pump(&mut self.agent, now, now + SEND_EARLY);
        }
        self.resolve_turn_hosts();
        self.check_dials(now);
        if let Some((since, code)) = self.shutdown {
            if self.agent.outbox_len() == 0 || now >= since + SHUTDOWN_FLUSH {
                self.finish(code);
            }
        }
        let given_up = self
            .unreachable_since
            .is_some_and(|t| now >= t + STARTUP_UNREACHABLE_GRACE);
        if self.give_up_unreachable && !self.synced && given_up {
            self.lines.say("error: homeserver unreachable");
            self.lines.emit(json!({"event": "error", "kind": "unreachable", "message": "homeserver unreachable"}));
            self.finish(exit::UNREACHABLE);
        }
    }

    /// Dials whose peer joined are placed; those waiting too long fail.
    fn check_dials(&mut self, now: Instant) {
        for mut d in std::mem::take(&mut self.dials) {
            let room = d
                .room
                .clone()
                .filter(|r| self.agent.room_peer(r).is_some())
                .or_else(|| self.agent.find_direct_room(&d.peer));
            let waiting = match (&room, d.grace) {
                (Some(_), DmGrace::AwaitingJoin) => {
                    d.grace = DmGrace::JoinedAt(now);
                    true
                }
                (Some(_), DmGrace::JoinedAt(joined)) => now < joined + NEW_DM_GRACE,
                _ => false,
            };
            if waiting {
                self.dials.push(d);
            } else if let Some(room) = room {
                let placed = match self.place(&room, d.station, now) {
                    Ok(call_id) => Ok((call_id, room)),
                    Err(e) => Err(DialError::Place(room, e)),
                };
                self.dial_outcomes.push((d.id, placed));
            } else if now >= d.since + PEER_JOIN_WAIT {
                self.dial_outcomes.push((d.id, Err(DialError::NoJoin)));
            } else {
                self.dials.push(d);
            }
        }
    }

    /// When the homeserver's TURN URIs change, resolves their host names off the loop.
    fn resolve_turn_hosts(&mut self) {
        // Runs on every wake-up: compared before anything is cloned.
        let Some(uris) = self
            .agent
            .turn_servers()
            .filter(|t| t.uris != self.turn_uris_seen)
            .map(|t| t.uris.clone())
        else {
            return;
        };
        let hosts = net::named_hosts(&uris);
        self.turn_uris_seen = uris;
        if hosts.is_empty() {
            return;
        }
        let tx = self.tx.clone();
        // TURN servers from the config replace the homeserver's (still probed for STUN).
        let use_turn = !self.config_turn;
        smol::spawn(async move {
            let (stun, turn) = smol::unblock(move || net::resolve_hosts(&hosts)).await;
            let turn = if use_turn { turn } else { Vec::new() };
            let _ = tx.send(Msg::Servers { stun, turn }).await;
        })
        .detach();
    }

    /// A station is sending media (its pump has a frame due).
    fn media_running(&self) -> bool {
        self.stations.iter().any(|s| s.media.next_due().is_some())
    }

    /// The earliest of the shell's own deadlines (media frames, dials, shutdown, giving up).
    fn next_shell_deadline(&self) -> Option<Instant> {
        let media = self.stations.iter().filter_map(|s| s.media.next_due());
        let dials = self.dials.iter().map(|d| match d.grace {
            DmGrace::JoinedAt(joined) => joined + NEW_DM_GRACE,
            DmGrace::None | DmGrace::AwaitingJoin => d.since + PEER_JOIN_WAIT,
        });
        let flush = self.shutdown.map(|(since, _)| since + SHUTDOWN_FLUSH);
        let unreachable = self
            .unreachable_since
            .filter(|_| self.give_up_unreachable)
            .map(|t| t + STARTUP_UNREACHABLE_GRACE);
        media.chain(dials).chain(flush).chain(unreachable).min()
    }

    /// Feeds one input to the agent (or to the driver's or the policy's own handling).
    fn on_msg<P: Policy<Command = C>>(&mut self, p: &mut P, msg: Msg<C>, now: Instant) {
        match msg {
            Msg::Http { id, response } => {
                self.agent
                    .handle_input(Input::HttpResponse { now, id, response })
            }
            Msg::Stop => match self.shutdown {
                // A second signal: exit now.
                Some((_, code)) => self.finish(code),
                None => {
                    let code = p.stop_code(self);
                    self.begin_shutdown(now, code);
                }
            },
            Msg::Reload => p.on_reload(self),
            Msg::Servers { stun, turn } => {
                self.agent.add_stun_servers(&stun, now);
                self.agent.add_turn_servers(&turn, now);
            }
            Msg::Camera(i, e) => {
                let line = self
                    .stations
                    .get_mut(i)
                    .and_then(|s| s.media.camera(&mut self.agent, e, now, &mut s.profile));
                if let Some(line) = line {
                    self.emit_for(Some(i), line);
                }
            }
            Msg::Talkback(i, e) => {
                let Some(s) = self.stations.get_mut(i) else {
                    return;
                };
                let (line, codec) = s.media.talkback_event(e);
                if let Some(codec) = codec {
                    // Calls from now on ask the peer for what the speaker plays.
                    s.audio_preference = Some(codec);
                    self.use_hub_audio();
                }
                self.emit_for(Some(i), line);
            }
            Msg::Speaker(i, e) => {
                let Some(s) = self.stations.get_mut(i) else {
                    return;
                };
                let line = s.media.speaker_event(e);
                self.emit_for(Some(i), line);
            }
            Msg::Mic(i, e) => {
                let line = self
                    .stations
                    .get_mut(i)
                    .and_then(|s| s.media.mic_event(&mut self.agent, e, now));
                if let Some(line) = line {
                    self.emit_for(Some(i), line);
                }
            }
            Msg::Command(c) => p.on_command(self, c, now),
        }
    }

    /// Hands the dials' outcomes to the policy.
    fn settle<P: Policy<Command = C>>(&mut self, p: &mut P, now: Instant) {
        while !self.dial_outcomes.is_empty() {
            for (id, outcome) in std::mem::take(&mut self.dial_outcomes) {
                p.on_dial(self, id, outcome, now);
            }
        }
    }

    /// Drains the agent until it waits; returns its deadline.
    fn drain<P: Policy<Command = C>>(&mut self, p: &mut P, now: Instant) -> Instant {
        loop {
            match self.agent.poll_output() {
                call_assist_core::Output::Timeout(at) => return at,
                call_assist_core::Output::Transmit(t) => self.transmit(t),
                call_assist_core::Output::Http { id, request } => self.send_http(id, request),
                call_assist_core::Output::Event(e) => {
                    if self.on_event(&e, now) {
                        p.on_event(self, &e, now);
                    }
                    self.settle(p, now);
                }
            }
        }
    }

    /// The loop: tick, drain, wait for the next input or deadline; until a policy or the
    /// driver finishes. Returns the exit code.
    pub async fn run<P: Policy<Command = C>>(&mut self, rx: Receiver<Msg<C>>, p: &mut P) -> u8 {
        // Per datagram no task hop, no channel, no allocation and no other thread: the sockets
        // are read here on the loop's thread (until `WouldBlock`, a batch per wake-up), and the
        // loop waits in an epoll of its own (`Waiter`), not in async-io's reactor.
        let sockets = self.sockets.clone();
        let mut waiter = match Waiter::new(&sockets) {
            Ok(w) => w,
            Err(e) => {
                error!("cannot set up the event loop (epoll): {e}");
                return exit::NOT_CONNECTED;
            }
        };
        let mut buf = vec![0u8; net::MAX_DATAGRAM];
        let mut agent_due = None;
        // Polled as a stream, it keeps its listener across turns (`recv` made a new one, a
        // heap allocation, on every wake-up while the channel was empty).
        let mut rx = std::pin::pin!(rx);
        loop {
            let now = Instant::now();
            // The core's deadline passed: its own timer woke the loop, or something else did
            // first (then that wake-up serves it, and its timer needs none of its own).
            if agent_due.is_some_and(|a| a <= now) {
                self.agent.handle_input(Input::Timeout(now));
            }
            self.on_tick(now);
            p.on_tick(self, now);
            self.settle(p, now);
            let agent_at = self.drain(p, now);
            agent_due = Some(agent_at);
            if let Some(code) = self.exit {
                self.e2ee.close(E2EE_CLOSE).await;
                return code;
            }
            let mut shell_at = self.next_shell_deadline();
            if let Some(t) = p.deadline() {
                shell_at = Some(shell_at.map_or(t, |s| s.min(t)));
            }
            let deadline = coalesced(agent_at, shell_at, self.media_running());
            let for_agent = deadline == agent_at;
            let sockets_too = !(self.media_running()
                && deadline.saturating_duration_since(Instant::now()) <= RECEIVE_SLACK);
            let wake = match waiter.wait(rx.as_mut(), deadline, sockets_too) {
                Ok(w) => w,
                Err(e) => {
                    // epoll_wait fails only on a bad fd or a signal; the next turn retries.
                    warn!("event loop wait: {e}");
                    Wake::Timer(0)
                }
            };
            let w = &mut self.counters.wakeups;
            match wake {
                Wake::Msg(_) => w.message += 1,
                Wake::Readable(_) => w.socket += 1,
                Wake::Timer(_) if for_agent => w.agent_timer += 1,
                Wake::Timer(_) => w.shell_timer += 1,
            }
            match wake {
                Wake::Msg(msg) => self.on_msg(p, msg, Instant::now()),
                Wake::Readable(which) => self.read_datagrams(p, &sockets, which, &mut buf),
                Wake::Timer(0) => {}
                Wake::Timer(held) => self.read_datagrams(p, &sockets, held, &mut buf),
            }
        }
    }

    /// Feeds what the sockets hold to the agent, draining it after each datagram; at most
    /// [`READ_BATCH`] per socket, so commands and HTTP answers are not starved by a flood.
    fn read_datagrams<P: Policy<Command = C>>(
        &mut self,
        p: &mut P,
        sockets: &Sockets,
        which: u64,
        buf: &mut [u8],
    ) {
        let ready = sockets
            .iter()
            .enumerate()
            .filter(|(i, _)| which & socket_bit(*i as u64) != 0);
        for (_, (local, sock)) in ready {
            for _ in 0..READ_BATCH {
                let (n, from) = match sock.get_ref().recv_from(buf) {
                    Ok(r) => r,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        debug!(%local, "recv: {e}");
                        break;
                    }
                };
                let now = Instant::now();
                self.counters.packets_received += 1;
                self.counters.bytes_received += n as u64;
                self.agent.handle_input(Input::Receive {
                    now,
                    source: from,
                    destination: *local,
                    contents: buf.get(..n).unwrap_or_default(),
                });
                self.drain(p, now);
            }
        }
    }
}

/// Starts every station's media; its camera events reach `tx`.
async fn start_stations<C: Send + 'static>(
    setups: Vec<StationSetup>,
    state_dir: Option<&std::path::Path>,
    tx: &Sender<Msg<C>>,
) -> Result<Vec<Station>, u8> {
    let mut stations = Vec::new();
    for (i, st) in setups.into_iter().enumerate() {
        let sdp = state_dir
            .map_or_else(std::env::temp_dir, ToOwned::to_owned)
            .join(match &st.name {
                Some(name) => format!("forward-{name}.sdp"),
                None => "forward.sdp".to_owned(),
            });
        let password = st.rtsp_password.as_ref().map(Secret::expose);
        let started = start_media(
            &st.media,
            st.video,
            password,
            sdp,
            tx,
            move |ev| Msg::Camera(i, ev),
            move |ev| Msg::Talkback(i, ev),
            move |ev| Msg::Speaker(i, ev),
            move |ev| Msg::Mic(i, ev),
        );
        let (media, profile) = started.await.inspect_err(|_| {
            if let Some(name) = &st.name {
                eprintln!("error: station {name:?} cannot start");
            }
        })?;
        // The hub's speaker plays G.711: calls ask the peer for PCMU first (no Opus decoder).
        let audio_preference = media
            .speaker
            .is_some()
            .then_some(call_assist_core::Codec::Pcmu);
        stations.push(Station {
            name: st.name,
            media,
            profile,
            audio_preference,
        });
    }
    Ok(stations)
}

/// A token login's device (when a saved session names it) and token, for the crypto layer.
type TokenLogin = (Option<String>, Secret);

/// The agent, logging in with the saved session if there is one; with it, the config to
/// fall back to when the saved token is refused and a password is known, and the token login
/// (if it is one) for the crypto layer.
fn new_agent(
    a: &Account,
    n: &NetworkConfig,
    policy: CallPolicy,
    addrs: Vec<SocketAddr>,
    h264_profile: Option<ProfileLevelId>,
) -> Result<(Agent, Option<AgentConfig>, Option<TokenLogin>), u8> {
    let saved = a
        .state_dir
        .as_deref()
        .and_then(|d| Some((d, SavedSession::load(d, &a.homeserver, &a.user)?)))
        .and_then(|(d, s)| keep_session_with_keys(d, s, &a.auth));
    let (credentials, password) = login_credentials(&a.auth, saved.as_ref());
    let mut config = AgentConfig::new(a.homeserver.clone(), a.user.clone(), credentials, addrs);
    config.policy = policy;
    config.stun_servers = net::resolve_stun(&n.stun);
    config.relay_only = n.relay_only;
    config.turn = n.turn.as_ref().map(net::static_turn);
    config.h264_profile = h264_profile;
    let token = match &config.credentials {
        Credentials::AccessToken(t) => {
            Some((saved.as_ref().map(|s| s.device_id.clone()), t.clone()))
        }
        _ => None,
    };
    config.device_id = saved.map(|s| s.device_id.as_str().into());
    let fallback = password.map(|pw| {
        let mut c = config.clone();
        c.credentials = Credentials::Password(pw);
        c
    });
    let agent = Agent::new(config, net::seed(), Instant::now(), net::unix_ms()).map_err(|e| {
        eprintln!("error: {e}");
        exit::USAGE
    })?;
    Ok((agent, fallback, token))
}

/// A saved session whose crypto store is gone must not be reused: that device's keys are
/// lost, and peers would see its identity change. With a password, log in as a new device.
fn keep_session_with_keys(
    dir: &std::path::Path,
    s: SavedSession,
    auth: &Auth,
) -> Option<SavedSession> {
    if !e2ee::crypto_store_lost(dir) {
        return Some(s);
    }
    match auth {
        Auth::Password(_) => {
            warn!(
                old_device = %s.device_id,
                "the crypto store is missing: logging in as a new device (the old one is not reused)"
            );
            None
        }
        Auth::AccessToken(_) => {
            warn!(
                device = %s.device_id,
                "the crypto store is missing and an access token binds this device; its new keys may not be trusted by peers (log in with a password to get a new device)"
            );
            Some(s)
        }
    }
}

/// SIGTERM and SIGINT stop the run (hang up, flush, exit); SIGHUP reloads where asked.
fn listen_for_signals<C: Send + 'static>(tx: &Sender<Msg<C>>, reload_on_hup: bool) {
    use async_signal::{Signal, Signals};
    let mut wanted = vec![Signal::Term, Signal::Int];
    if reload_on_hup {
        wanted.push(Signal::Hup);
    }
    let mut signals = match Signals::new(wanted) {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot install signal handlers: {e}");
            return;
        }
    };
    let tx = tx.clone();
    smol::spawn(async move {
        while let Some(s) = signals.next().await {
            info!(signal = ?s, "signal");
            let msg = match s {
                Ok(Signal::Hup) => Msg::Reload,
                _ => Msg::Stop,
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    })
    .detach();
}

#[cfg(test)]
mod coalesce_tests {
    use super::*;

    #[test]
    fn core_deadlines_ride_along_with_media_within_the_slack_only() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        // Media running: a core deadline 5 ms before the next frame waits for it.
        assert_eq!(coalesced(t, Some(t + ms(5)), true), t + ms(5));
        assert_eq!(coalesced(t, Some(t + COALESCE), true), t + COALESCE);
        // Too far, no media, or no shell deadline: the core's own time.
        assert_eq!(coalesced(t, Some(t + COALESCE + ms(1)), true), t);
        assert_eq!(coalesced(t, Some(t + ms(5)), false), t);
        assert_eq!(coalesced(t, None, true), t);
        // The shell's deadline first: it wins either way.
        assert_eq!(coalesced(t + ms(3), Some(t), false), t);
    }
}
