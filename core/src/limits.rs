//! Every capacity and timeout of the core, in one place.
//!
//! Each queue says what happens when it is full. Durations are what the spec or
//! matrix-js-sdk (Element Web) use where they say something, otherwise chosen so a
//! lost homeserver or peer ends a call in bounded time.

use std::time::Duration;

/// Calls one agent tracks at once (ringing + active + ended-not-yet-collected).
/// When full, further invites are not rung (logged) and `place_call` returns `ApiError::TooManyCalls`.
/// A hub is measured with 10 calls at once (README "Performance": about 0.4 MB each); ended
/// calls count here for `ENDED_CALL_MEMORY`, so the limit leaves room above that.
pub const MAX_CALLS: usize = 16;

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
