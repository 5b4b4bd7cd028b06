//! The public vocabulary of the core: configuration, inputs, outputs and events.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ruma::{OwnedDeviceId, OwnedRoomId, OwnedUserId};
use str0m::media::MediaKind;

use crate::limits;

/// A secret (password, access token, TURN credential) that never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How the agent logs in.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Credentials {
    /// Password login (`m.login.password`); reuses `AgentConfig::device_id` when set.
    Password(Secret),
    /// An access token from an earlier login; `AgentConfig::device_id` should name its device.
    AccessToken(Secret),
}

/// Who may ring this agent.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum CallPolicy {
    /// Anyone in a 1:1 room.
    #[default]
    Anyone,
    /// Only these users; invites from others are ignored (not rung, not rejected).
    Allow(Vec<OwnedUserId>),
}

/// Static configuration of an [`Agent`](crate::Agent).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AgentConfig {
    /// Homeserver base URL, e.g. `https://matrix.example.org`.
    pub homeserver: String,
    pub user_id: OwnedUserId,
    pub credentials: Credentials,
    /// Device to log in as (kept across restarts by the driver).
    pub device_id: Option<OwnedDeviceId>,
    /// Local UDP addresses the driver receives on; each becomes a host candidate.
    pub local_addrs: Vec<SocketAddr>,
    pub policy: CallPolicy,
    /// `lifetime` of our invites and negotiate offers.
    pub invite_lifetime: Duration,
    /// Offer/accept video (H.264 out; H.264 or VP8 in).
    pub video: bool,
    /// The H.264 profile the local video source really sends (from its SPS). Offered first,
    /// with packetization-mode 1, and preferred for sending; `None` offers WebRTC's usual
    /// Constrained Baseline / Baseline / Main / High set.
    pub h264_profile: Option<crate::h264::ProfileLevelId>,
    /// Offer/accept audio (Opus, PCMU, PCMA).
    pub audio: bool,
    /// The audio codec to list first in our offers and answers, so the peer sends it (a peer
    /// sends the first codec of the other side's list it can): `Some(Pcmu)` or `Some(Pcma)`
    /// when what the peer says goes to a camera speaker that plays G.711, so it is only
    /// re-packetized. `None`: Opus first, then PCMU, PCMA.
    pub audio_preference: Option<Codec>,
    /// Fetch `/voip/turnServer` and keep it fresh.
    pub fetch_turn_servers: bool,
    /// STUN servers to learn server-reflexive addresses from (the homeserver's TURN URIs
    /// with an IP address are used too).
    pub stun_servers: Vec<SocketAddr>,
    /// TURN servers and credentials from the config (used instead of `/voip/turnServer`'s).
    pub turn: Option<StaticTurn>,
    /// Offer only relay candidates: no local or public address of ours goes into the room.
    /// Calls wait for a relay; without one they end with `ice_failed`.
    pub relay_only: bool,
}

/// TURN servers from the config: `turn:` URIs (IP literals; the driver resolves names and
/// adds them with `Agent::add_turn_servers`) and long-term credentials.
#[derive(Debug, Clone)]
pub struct StaticTurn {
    pub uris: Vec<String>,
    pub username: Secret,
    pub password: Secret,
}

impl AgentConfig {
    pub fn new(
        homeserver: impl Into<String>,
        user_id: OwnedUserId,
        credentials: Credentials,
        local_addrs: Vec<SocketAddr>,
    ) -> Self {
        AgentConfig {
            homeserver: homeserver.into(),
            user_id,
            credentials,
            device_id: None,
            local_addrs,
            policy: CallPolicy::Anyone,
            invite_lifetime: limits::DEFAULT_INVITE_LIFETIME,
            video: true,
            h264_profile: None,
            audio: true,
            audio_preference: None,
            fetch_turn_servers: true,
            stun_servers: Vec::new(),
            turn: None,
            relay_only: false,
        }
    }
}

/// Identifies one HTTP exchange between [`Output::Http`] and [`Input::HttpResponse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HttpId(pub u64);

/// Why an HTTP exchange produced no response.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HttpFailure {
    /// Could not connect (refused, DNS, TLS).
    Connect(String),
    /// The driver gave up waiting.
    Timeout,
    /// Anything else the transport reported.
    Other(String),
    /// The shell's end-to-end encryption could not encrypt a room event for its encrypted
    /// room, so nothing was sent (never plaintext instead); retrying will not help.
    Encryption(String),
}

/// Something for the agent to process.
#[derive(Debug)]
#[non_exhaustive]
pub enum Input<'a> {
    /// Time has moved on (a deadline from [`Output::Timeout`] was reached, or earlier).
    Timeout(Instant),
    /// A UDP datagram arrived on one of the local addresses.
    Receive {
        now: Instant,
        source: SocketAddr,
        destination: SocketAddr,
        contents: &'a [u8],
    },
    /// The answer to [`Output::Http`] with the same id.
    HttpResponse {
        now: Instant,
        id: HttpId,
        response: Result<http::Response<Vec<u8>>, HttpFailure>,
    },
    /// Wall-clock time (Unix milliseconds) at `now`: for invite lifetimes and event ages.
    UnixTime { now: Instant, unix_ms: u64 },
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub contents: Vec<u8>,
}

/// What the agent wants done next. Exhaustive on purpose: a driver must handle all four.
#[derive(Debug)]
#[must_use]
pub enum Output {
    Transmit(Transmit),
    /// Run this request and feed the answer back as [`Input::HttpResponse`].
    Http {
        id: HttpId,
        request: http::Request<Vec<u8>>,
    },
    Event(AgentEvent),
    /// Nothing more until this instant (or a new input).
    Timeout(Instant),
}

/// A call id (`call_id` of the m.call.* events).
pub type CallId = String;

/// Which way a call was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallDirection {
    Outbound,
    Inbound,
}

/// Where a call is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum CallState {
    /// Our invite is out, no answer selected yet.
    InviteSent,
    /// An invite for us is ringing.
    Ringing,
    /// Answer exchanged; ICE and DTLS in progress.
    Connecting,
    /// Media can flow.
    Connected,
    Ended,
}

/// Why a call ended: the spec's hangup reasons plus local outcomes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HangupReason {
    IceFailed,
    IceTimeout,
    InviteTimeout,
    UserHangup,
    UserMediaFailed,
    UserBusy,
    UnknownError,
    /// The callee rejected (m.call.reject), or we did.
    Rejected,
    /// Another device of the callee's user answered (or rejected) the call.
    AnsweredElsewhere,
    /// Glare: this call was replaced by the other side's call.
    Replaced,
    /// A reason string from the peer this version does not know.
    Other(String),
}

impl HangupReason {
    /// The reason as written in m.call.hangup.
    pub fn as_str(&self) -> &str {
        match self {
            HangupReason::IceFailed => "ice_failed",
            HangupReason::IceTimeout => "ice_timeout",
            HangupReason::InviteTimeout => "invite_timeout",
            HangupReason::UserHangup => "user_hangup",
            HangupReason::UserMediaFailed => "user_media_failed",
            HangupReason::UserBusy => "user_busy",
            HangupReason::UnknownError => "unknown_error",
            HangupReason::Rejected => "rejected",
            HangupReason::AnsweredElsewhere => "answered_elsewhere",
            HangupReason::Replaced => "replaced",
            HangupReason::Other(s) => s,
        }
    }

    pub(crate) fn from_wire(s: &str) -> Self {
        match s {
            "ice_failed" => HangupReason::IceFailed,
            "ice_timeout" => HangupReason::IceTimeout,
            "invite_timeout" => HangupReason::InviteTimeout,
            "user_hangup" => HangupReason::UserHangup,
            "user_media_failed" => HangupReason::UserMediaFailed,
            "user_busy" => HangupReason::UserBusy,
            "unknown_error" => HangupReason::UnknownError,
            other => HangupReason::Other(other.chars().take(64).collect()),
        }
    }
}

impl fmt::Display for HangupReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who ended a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Party {
    Local,
    Remote,
}

/// Media codecs the agent sends and receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Codec {
    H264,
    Vp8,
    Opus,
    Pcmu,
    Pcma,
    Other,
}

impl Codec {
    pub(crate) fn from_str0m(c: str0m::format::Codec) -> Self {
        use str0m::format::Codec as C;
        match c {
            C::H264 => Codec::H264,
            C::Vp8 => Codec::Vp8,
            C::Opus => Codec::Opus,
            C::PCMU => Codec::Pcmu,
            C::PCMA => Codec::Pcma,
            _ => Codec::Other,
        }
    }

    pub(crate) fn to_str0m(self) -> Option<str0m::format::Codec> {
        use str0m::format::Codec as C;
        match self {
            Codec::H264 => Some(C::H264),
            Codec::Vp8 => Some(C::Vp8),
            Codec::Opus => Some(C::Opus),
            Codec::Pcmu => Some(C::PCMU),
            Codec::Pcma => Some(C::PCMA),
            Codec::Other => None,
        }
    }
}

/// One frame of remote media (a depacketized video access unit or audio packet).
#[derive(Debug, Clone)]
pub struct MediaFrame {
    pub call_id: CallId,
    pub kind: MediaKind,
    pub codec: Codec,
    /// RTP timestamp in units of `clock_rate`.
    pub rtp_time: u64,
    pub clock_rate: u32,
    /// False when packets were lost before this frame.
    pub contiguous: bool,
    pub data: Arc<[u8]>,
}

/// One frame of local media to send.
#[derive(Debug, Clone, Copy)]
pub struct OutgoingFrame<'a> {
    pub kind: MediaKind,
    pub codec: Codec,
    /// RTP timestamp in units of the codec clock (90 kHz video, 48 kHz Opus, 8 kHz G.711).
    pub rtp_time: u64,
    /// H.264: an Annex B access unit. Audio: one encoded packet.
    pub data: &'a [u8],
}

/// Something that happened, for the driver and the user.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AgentEvent {
    LoggedIn {
        user_id: OwnedUserId,
        device_id: OwnedDeviceId,
        access_token: Secret,
    },
    /// The homeserver refused our credentials; the agent stops talking to it.
    LoginFailed {
        message: String,
    },
    /// The homeserver became unreachable (`false`) or reachable again (`true`).
    HomeserverReachable(bool),
    /// The first /sync finished: invites from now on ring.
    Synced,
    /// A STUN server told us the public address of a local socket (offered as `srflx`).
    ReflexiveAddress {
        local: SocketAddr,
        mapped: SocketAddr,
    },
    /// A TURN server gave us a relayed address (offered as `relay`).
    RelayAllocated {
        server: SocketAddr,
        local: SocketAddr,
        relay: SocketAddr,
        /// Our address as the TURN server saw it.
        mapped: Option<SocketAddr>,
    },
    /// A TURN allocation failed (retried later). `code`: the STUN error code, if any.
    RelayFailed {
        server: SocketAddr,
        code: Option<u16>,
        reason: String,
    },
    /// A relayed address is gone (expired, refused on refresh); a new one may follow.
    RelayLost {
        relay: SocketAddr,
    },
    /// A relay self-test datagram (see `Agent::test_relays`) came back: `outbound` = through
    /// the relay to us, else from us to the relay and back through the server.
    RelayTested {
        relay: SocketAddr,
        outbound: bool,
    },
    /// A direct room asked for with `Agent::create_direct_room` exists.
    RoomCreated {
        room_id: OwnedRoomId,
        peer: OwnedUserId,
    },
    /// Joining or creating a room was refused by the homeserver.
    RoomRequestFailed {
        message: String,
    },
    /// An invite rings. Answer with [`Agent::answer`](crate::Agent::answer) or reject.
    IncomingCall {
        call_id: CallId,
        room_id: OwnedRoomId,
        from: OwnedUserId,
        video: bool,
    },
    CallStateChanged {
        call_id: CallId,
        state: CallState,
    },
    /// Glare: our outgoing call `old` gave way to the peer's call `new`, which we answered.
    CallReplaced {
        old: CallId,
        new: CallId,
    },
    /// The call was renegotiated (m.call.negotiate offer and answer exchanged).
    Renegotiated {
        call_id: CallId,
    },
    Media(MediaFrame),
    /// The peer asks for a keyframe: send one as soon as the source has one.
    KeyframeRequested {
        call_id: CallId,
    },
    CallEnded {
        call_id: CallId,
        reason: HangupReason,
        by: Party,
    },
    /// The peer pressed a DTMF key (RFC 4733 telephone event), reported once per press.
    Dtmf {
        call_id: CallId,
        /// `0`-`9`, `*`, `#` or `A`-`D`.
        digit: char,
        /// How long the key was held, as the peer reported it.
        duration_ms: u64,
    },
    /// str0m panicked on a peer's SDP; the panic was caught and cost only this call (or
    /// invite, `call_id` of the invite). Counted in `Agent::panics_caught`.
    PanicCaught {
        call_id: Option<CallId>,
        /// What str0m was doing: `invite`, `answer`, `negotiate_offer`, `negotiate_answer`.
        during: &'static str,
    },
}

/// The caller misused the API.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApiError {
    UnknownCall(CallId),
    /// The call is not in a state where this command makes sense.
    WrongState {
        call_id: CallId,
        state: CallState,
    },
    TooManyCalls,
    /// The room is not a 1:1 room with one other member.
    NotOneToOne(OwnedRoomId),
    /// No negotiated media of this kind/codec in the call.
    NoSuchMedia,
    /// str0m refused the operation.
    Rtc(String),
    /// The digits cannot be sent (see [`DtmfError`]).
    Dtmf(DtmfError),
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::UnknownCall(c) => write!(f, "unknown call {c}"),
            ApiError::WrongState { call_id, state } => {
                write!(f, "call {call_id} is {state:?}, not valid for this command")
            }
            ApiError::TooManyCalls => write!(f, "too many calls (limit {})", limits::MAX_CALLS),
            ApiError::NotOneToOne(r) => write!(f, "room {r} is not a 1:1 room"),
            ApiError::NoSuchMedia => write!(f, "no such negotiated media"),
            ApiError::Rtc(e) => write!(f, "rtc: {e}"),
            ApiError::Dtmf(e) => write!(f, "dtmf: {e}"),
        }
    }
}

impl std::error::Error for ApiError {}

/// Why digits given to `Agent::send_dtmf` are refused (nothing of them is sent).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DtmfError {
    /// No digits.
    Empty,
    /// Not one of `0-9 * # A-D`.
    InvalidDigit(char),
    /// More digits than one command takes.
    TooLong { len: usize, max: usize },
    /// The call already has this many digits waiting; they would not fit behind them.
    QueueFull { queued: usize, max: usize },
    /// The peer did not negotiate telephone-event for our audio.
    NotNegotiated,
}

impl fmt::Display for DtmfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DtmfError::Empty => write!(f, "no digits"),
            DtmfError::InvalidDigit(c) => write!(f, "{c:?} is no DTMF digit (0-9 * # A-D)"),
            DtmfError::TooLong { len, max } => write!(f, "{len} digits, at most {max} at once"),
            DtmfError::QueueFull { queued, max } => {
                write!(f, "{queued} digits already waiting, at most {max}")
            }
            DtmfError::NotNegotiated => {
                write!(f, "the peer did not negotiate telephone-event (DTMF)")
            }
        }
    }
}

impl std::error::Error for DtmfError {}

/// Invalid [`AgentConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    BadHomeserverUrl(String),
    NoLocalAddress,
    NoMedia,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::BadHomeserverUrl(u) => {
                write!(
                    f,
                    "homeserver URL must start with http:// or https://, got {u:?}"
                )
            }
            ConfigError::NoLocalAddress => write!(f, "at least one local UDP address is needed"),
            ConfigError::NoMedia => write!(f, "enable audio, video or both"),
        }
    }
}

impl std::error::Error for ConfigError {}
