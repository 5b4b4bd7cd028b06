//! Every capacity and timeout of the core, in one place: the agent's at the top level, the
//! TURN client's in [`turn`], the STUN client's in [`stun`], the H.264 depacketizer's in
//! [`h264`] (protocol constants such as channel numbers or NAL types stay with their code).
//!
//! Each queue says what happens when it is full. Durations are what the spec or
//! matrix-js-sdk (Element Web) use where they say something, otherwise chosen so a
//! lost homeserver or peer ends a call in bounded time.

use std::time::Duration;

/// Live calls (ringing, connecting, connected) one agent has at once; ended calls are kept
/// for `ENDED_CALL_MEMORY` but do not count. When full, further invites are answered busy
/// (`m.call.reject`, or a `user_busy` hangup for version 0) and `place_call` returns
/// `ApiError::TooManyCalls`. A hub is measured with 10 calls at once (README "Performance":
/// about 0.4 MB each).
pub const MAX_CALLS: usize = 16;

/// Unconnected (ringing or connecting) calls one peer may hold at once. Their next invite is
/// answered busy, so a burst of invites from one peer cannot fill the hub.
pub const MAX_UNCONNECTED_PER_PEER: usize = 2;

/// Agent events waiting for the driver. The driver drains after every input, so this only
/// fills if it does not; then remote media frames are dropped first (counted), never call events.
pub const MAX_PENDING_EVENTS: usize = 256;

/// Room events waiting to be sent to the homeserver (in order, one in flight).
/// When full, the oldest m.call.candidates event is dropped first, then new events are refused
/// (the call that needed it ends with `unknown_error` rather than hang).
pub const MAX_OUTBOX: usize = 64;

/// Candidates kept for a call id we have not seen yet (candidates may overtake their invite or
/// answer). Oldest call ids are forgotten first.
pub const MAX_ORPHAN_CALLS: usize = 16;
/// Candidates kept per call id or party before their invite/answer arrives; later ones are dropped.
pub const MAX_BUFFERED_CANDIDATES: usize = 64;
/// Orphan candidates older than this are forgotten.
pub const ORPHAN_CANDIDATES_TTL: Duration = Duration::from_secs(60);

/// Candidates in one m.call.candidates event; more wait for the next batch.
pub const MAX_CANDIDATES_PER_EVENT: usize = 32;
/// Local candidates waiting to be sent; more are dropped (logged).
pub const MAX_LOCAL_CANDIDATES: usize = 32;

/// Remote candidates accepted per call (a flood is cut off here, logged).
pub const MAX_REMOTE_CANDIDATES: usize = 64;

/// Rooms whose membership the agent tracks; more are not tracked (invites in them are not rung).
pub const MAX_ROOMS: usize = 1024;
/// Members remembered per room; above 2 the room is not a 1:1 room anyway.
pub const MAX_TRACKED_MEMBERS: usize = 16;

/// Largest m.call.* event content we accept from /sync (an SDP offer is a few kB).
pub const MAX_EVENT_BYTES: usize = 64 * 1024;
/// Largest HTTP response body the core parses.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Datagrams kept while a call sets up and no call takes them yet (a peer's DTLS hello that
/// comes a moment before str0m's ICE pair to its address works); older ones make room.
pub const HELD_DATAGRAMS: usize = 8;
/// Largest datagram kept that way (a DTLS ClientHello is a few hundred bytes).
pub const HELD_DATAGRAM_MAX_LEN: usize = 1500;
/// How long a kept datagram waits for its call.
pub const HELD_DATAGRAM_TTL: Duration = Duration::from_secs(2);

/// Delay before the first batch of local candidates is sent, then between batches.
pub const CANDIDATE_BATCH_DELAY: Duration = Duration::from_millis(200);

/// Default `lifetime` of our invites (matrix-js-sdk uses 60 s).
pub const DEFAULT_INVITE_LIFETIME: Duration = Duration::from_secs(60);

/// From answer to connected media: no ICE+DTLS in this time ends the call with `ice_failed`.
pub const ICE_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// ICE disconnected this long after it was connected ends the call with `ice_timeout`.
pub const ICE_DISCONNECTED_TIMEOUT: Duration = Duration::from_secs(30);

/// We ask a peer for a video keyframe (PLI/FIR) at most this often: after a loss, when the
/// first frame is no keyframe, or when the driver asks. A sender needs a moment to answer.
pub const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_secs(1);

/// Long-poll timeout asked of /sync.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// A request without an answer after this (plus the sync timeout for /sync) counts as failed.
/// The fault sweep's "homeserver hangs" profile did not connect in 60 s with 20 s here.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry backoff for homeserver requests: first delay, cap (doubling, +-20 % seeded jitter).
pub const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(8);
/// A 429 `retry_after_ms` larger than this is capped (a broken server must not park us forever).
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(60);
/// Attempts for one room event before it is given up (about 5 minutes with the backoff above).
pub const MAX_SEND_ATTEMPTS: u32 = 40;

/// TURN credentials are refreshed when this fraction of their ttl has passed.
pub const TURN_REFRESH_FRACTION: f64 = 0.9;
/// Retry interval when the homeserver gives no TURN servers.
pub const TURN_RETRY_EMPTY: Duration = Duration::from_secs(300);

/// Ended calls are forgotten after this (late events for them are ignored, not re-rung).
pub const ENDED_CALL_MEMORY: Duration = Duration::from_secs(120);

/// Payload type (and its RTX) of the H.264 entry naming the local source's own profile; str0m's
/// default codec set leaves both free.
pub const H264_SOURCE_PT: u8 = 100;
pub const H264_SOURCE_RTX_PT: u8 = 101;

/// Payload types of telephone-event (DTMF) at Opus's 48 kHz and G.711's 8 kHz clock: the
/// ones Chrome offers, free in str0m's default codec set.
pub const DTMF_48K_PT: u8 = 110;
pub const DTMF_8K_PT: u8 = 126;
/// Digits one `Agent::send_dtmf` takes, and digits a call queues for sending; more are
/// refused with `DtmfError::TooLong` / `DtmfError::QueueFull` (nothing of that call is queued).
pub const MAX_DTMF_DIGITS: usize = 32;
/// One sent digit: the tone, then the silence before the next (ITU-T Q.24 asks for at least
/// 40 ms of each; str0m at least 40 ms tone and 50 ms pause).
pub const DTMF_TONE: Duration = Duration::from_millis(100);
pub const DTMF_GAP: Duration = Duration::from_millis(70);
/// Volume of sent tones in -dBm0 (RFC 4733; libwebrtc sends 10).
pub const DTMF_VOLUME: u8 = 10;
/// A received press whose end reports were all lost counts as ended after this silence.
pub const DTMF_END_TIMEOUT: Duration = Duration::from_secs(1);
/// Received presses remembered per call, so their late and repeated reports are dropped; the
/// oldest is forgotten first (its reports are long over by then).
pub const DTMF_REMEMBERED_PRESSES: usize = 8;

/// The TURN client (`turn/mod.rs`).
pub mod turn {
    use std::time::Duration;

    /// Lifetime (seconds) asked for in Allocate and Refresh; the server may grant less, and the
    /// allocation is refreshed before whatever it granted runs out.
    pub const REQUESTED_LIFETIME: u32 = 600;
    /// Refresh the allocation this long before it expires (or at half its life if shorter).
    pub const REFRESH_MARGIN: Duration = Duration::from_secs(60);
    /// Permissions last 300 s (RFC 8656 §9); channel binds are refreshed at this age.
    pub const PERMISSION_REFRESH: Duration = Duration::from_secs(240);
    /// First retransmission timeout of a request; it doubles with each send.
    pub const FIRST_RTO: Duration = Duration::from_millis(500);
    /// Sends of one request (500 ms doubling: about 15 s in all). When they run out, a lost
    /// Allocate or Refresh fails the allocation (retried after [`RETRY_FAILED`]); a lost
    /// ChannelBind or CreatePermission only costs that peer its relay.
    pub const MAX_SENDS: u32 = 6;
    /// A failed allocation is tried again after this.
    pub const RETRY_FAILED: Duration = Duration::from_secs(30);
    /// Peers (channels) per allocation; ICE never needs more than the remote candidates.
    /// When full, datagrams to a new peer are dropped (logged).
    pub const MAX_CHANNELS: usize = 64;
    /// Datagrams waiting for their channel bind, per allocation; when full the oldest is dropped.
    pub const MAX_QUEUED: usize = 32;
    /// Allocations the client keeps (servers × local sockets); more are not made (logged).
    pub const MAX_ALLOCATIONS: usize = 8;
}

/// The STUN binding client (`stun.rs`).
pub mod stun {
    use std::time::Duration;

    /// Retransmissions after the first request; after the last one the probe gives up
    /// (no server-reflexive address from that server and socket).
    pub const RETRIES: u32 = 3;
    /// First retransmission timeout; it doubles with each retransmission.
    pub const FIRST_RTO: Duration = Duration::from_millis(500);
    /// Most STUN servers × local addresses probed (more are ignored, logged).
    pub const MAX_PROBES: usize = 16;
}

/// The RTP to H.264 depacketizer (`h264/depacketize.rs`).
pub mod h264 {
    /// Largest access unit put together (a 4K IDR is well below); a larger one is dropped with
    /// `DepacketizeError::TooLarge`, and as after any bad packet nothing is handed out until
    /// the next keyframe.
    pub const MAX_ACCESS_UNIT: usize = 4 << 20;
    /// Largest SPS or PPS kept; a larger one is ignored (the one kept before stays).
    pub const MAX_PARAMETER_SET: usize = 256;
    /// Finished access units waiting for `pop`. When full (the caller is not popping), a new
    /// keyframe replaces them all; any other access unit is dropped (counted as broken).
    pub const MAX_FINISHED_ACCESS_UNITS: usize = 2;
}
