//! An RTSP camera as a media source, through retina (the Rust RTSP client cameras are tested
//! against). H.264 is passed through as the camera sends it (Annex B access units, SPS/PPS in
//! front of every keyframe, the camera's timestamps); PCMU/PCMA or Opus audio likewise, one
//! RTP payload per packet. No decoding.
//!
//! retina does RTSP (DESCRIBE/SETUP/PLAY, Basic and Digest auth, keepalives, TCP-interleaved
//! or UDP transport); its raw packet stream is read rather than its demuxer, because retina
//! has no Opus depacketizer and refuses to demux a session with a stream it cannot
//! depacketize. H.264 access units are put together by the core's
//! [`Depacketizer`](call_assist_core::h264::Depacketizer) (RFC 6184; after a lost packet it
//! holds frames until the next keyframe).
//!
//! One task per camera runs the session and sends [`CameraEvent`]s to the shell's loop. When the
//! camera drops, it reconnects with backoff; timestamps stay monotonic across reconnects, so the
//! calls fed by it never see time go backwards. retina is tokio-based: the task runs under
//! `async-compat`, like reqwest.

use std::fmt;
use std::time::Duration;

use call_assist_core::h264::ProfileLevelId;
use call_assist_core::h264::{avcc_parameter_sets, Depacketizer};
use call_assist_core::Codec;
use futures_lite::{FutureExt, StreamExt};
use retina::client::{
    Credentials, PacketItem, PlayOptions, SessionGroup, SessionOptions, SetupOptions, Transport,
};
use retina::codec::ParametersRef;
use smol::channel::Sender;
use std::sync::Arc;
use tracing::{info, warn};

/// First and largest wait before reconnecting to a camera (doubling in between).
pub const RECONNECT_MIN: Duration = Duration::from_millis(500);
pub const RECONNECT_MAX: Duration = Duration::from_secs(10);
/// No frame for this long counts as a dropped camera (retina notices closed connections
/// itself; this catches a camera that stops sending without closing).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Gap put between the last frame before a reconnect and the first after it.
const RECONNECT_GAP_90K: u64 = 3000;

/// Why a camera URL or session failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RtspError {
    /// Not an `rtsp://` URL, or one that does not parse.
    BadUrl(String),
    /// The camera refused the credentials (or asked for some and none were given).
    Unauthorized(String),
    /// The camera has no H.264 video and no G.711 or Opus audio stream.
    NoUsableStream(String),
    /// Connecting, DESCRIBE/SETUP/PLAY or the stream itself failed.
    Session(String),
}

impl fmt::Display for RtspError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RtspError::BadUrl(m) => write!(f, "bad RTSP URL: {m}"),
            RtspError::Unauthorized(m) => {
                write!(f, "camera refused the RTSP user name or password: {m}")
            }
            RtspError::NoUsableStream(m) => write!(f, "camera has no usable stream: {m}"),
            RtspError::Session(m) => write!(f, "RTSP session failed: {m}"),
        }
    }
}

impl std::error::Error for RtspError {}

/// Lower transport asked of the camera.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RtspTransport {
    /// RTP interleaved in the RTSP TCP connection: works through anything, the default.
    #[default]
    Tcp,
    /// RTP over UDP (LAN only: retina has no reorder buffer).
    Udp,
}

impl std::str::FromStr for RtspTransport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(RtspTransport::Tcp),
            "udp" => Ok(RtspTransport::Udp),
            other => Err(format!("RTSP transport must be tcp or udp, not {other:?}")),
        }
    }
}

/// A camera to connect to: the URL without its credentials, and the credentials apart, so
/// that the URL can be logged and the password never is.
#[derive(Clone)]
pub struct RtspSource {
    url: url::Url,
    creds: Option<Credentials>,
    pub transport: RtspTransport,
}

impl fmt::Debug for RtspSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RtspSource")
            .field("url", &self.url.as_str())
            .field("user", &self.creds.as_ref().map(|c| c.username.as_str()))
            .field("transport", &self.transport)
            .finish()
    }
}

impl fmt::Display for RtspSource {
    /// The URL with the user name but never the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.creds {
            Some(c) => {
                let mut u = self.url.clone();
                let _ = u.set_username(&c.username);
                f.write_str(u.as_str())
            }
            None => f.write_str(self.url.as_str()),
        }
    }
}

impl RtspSource {
    /// Parses `rtsp://[user[:password]@]host[:port]/path`; user and password are
    /// percent-decoded (a `@` in a password is written `%40`).
    ///
    /// # Errors
    /// [`RtspError::BadUrl`] when it is not an RTSP URL with a host.
    pub fn parse(s: &str, transport: RtspTransport) -> Result<Self, RtspError> {
        let mut url = url::Url::parse(s).map_err(|e| RtspError::BadUrl(e.to_string()))?;
        if url.scheme() != "rtsp" {
            return Err(RtspError::BadUrl(format!(
                "scheme must be rtsp, not {:?}",
                url.scheme()
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(RtspError::BadUrl("no host".into()));
        }
        let decode = |s: &str| {
            percent_decode(s).ok_or_else(|| RtspError::BadUrl("bad percent-encoding".into()))
        };
        let creds = if url.username().is_empty() {
            None
        } else {
            Some(Credentials {
                username: decode(url.username())?,
                password: decode(url.password().unwrap_or(""))?,
            })
        };
        let _ = url.set_username("");
        let _ = url.set_password(None);
        Ok(RtspSource {
            url,
            creds,
            transport,
        })
    }
}

impl RtspSource {
    /// The URL without credentials.
    pub fn url(&self) -> &url::Url {
        &self.url
    }

    /// User name and password, if any (never to be logged).
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.creds
            .as_ref()
            .map(|c| (c.username.as_str(), c.password.as_str()))
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// What the camera task reports.
#[derive(Debug, Clone)]
pub enum CameraEvent {
    /// A session is playing: which streams it carries.
    Playing {
        video: bool,
        audio: Option<Codec>,
        resolution: Option<(u32, u32)>,
    },
    /// One H.264 access unit (Annex B; keyframes carry SPS+PPS).
    Video {
        data: Vec<u8>,
        /// 90 kHz, monotonic across reconnects.
        rtp_time: u64,
        keyframe: bool,
        /// From the SPS in front of a keyframe.
        profile: Option<ProfileLevelId>,
    },
    /// One G.711 or Opus packet as the camera sent it.
    Audio {
        codec: Codec,
        data: Vec<u8>,
        /// In the codec's clock (8 kHz G.711, 48 kHz Opus), monotonic across reconnects.
        rtp_time: u64,
    },
    /// The session ended; the task reconnects after `retry_in`.
    Lost {
        error: RtspError,
        retry_in: Duration,
    },
}

/// Keeps a stream's output timestamps monotonic across sessions: each new session's first
/// timestamp continues just after the last one sent.
#[derive(Debug, Default, Clone, Copy)]
struct Timeline {
    /// Added to the session's elapsed time.
    offset: u64,
    /// Last output timestamp.
    last: Option<u64>,
    /// The session's first elapsed value is being waited for.
    rebase: bool,
}

impl Timeline {
    fn new_session(&mut self) {
        self.rebase = true;
    }

    fn map(&mut self, elapsed: i64, gap: u64) -> u64 {
        let elapsed = u64::try_from(elapsed).unwrap_or(0);
        if self.rebase {
            self.rebase = false;
            self.offset = match self.last {
                Some(last) => last.saturating_add(gap).saturating_sub(elapsed),
                None => 0,
            };
        }
        let t = self.offset.saturating_add(elapsed);
        // Never backwards, even if a camera's clock stutters.
        let t = self.last.map_or(t, |l| t.max(l));
        self.last = Some(t);
        t
    }
}

fn classify(e: retina::Error) -> RtspError {
    let s = e.to_string();
    if s.contains("401") || s.contains("Unauthorized") || s.contains("no credentials") {
        RtspError::Unauthorized(s)
    } else {
        RtspError::Session(s)
    }
}

/// Runs the camera until `tx` is closed: connect, stream, reconnect with backoff.
/// Must run inside `async_compat::Compat` (retina needs a tokio reactor).
pub async fn run(source: RtspSource, tx: Sender<CameraEvent>) {
    let group = Arc::new(SessionGroup::default());
    let mut video_tl = Timeline::default();
    let mut audio_tl = Timeline::default();
    let mut backoff = RECONNECT_MIN;
    loop {
        video_tl.new_session();
        audio_tl.new_session();
        let played = session(&source, &group, &tx, &mut video_tl, &mut audio_tl).await;
        let (error, got_frames) = match played {
            Ok(()) => return, // the receiver is gone
            Err(e) => e,
        };
        if got_frames {
            backoff = RECONNECT_MIN;
        }
        warn!(camera = %source, retry_in_ms = backoff.as_millis() as u64, "camera: {error}");
        if tx
            .send(CameraEvent::Lost {
                error,
                retry_in: backoff,
            })
            .await
            .is_err()
        {
            return;
        }
        smol::Timer::after(backoff).await;
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

/// One session. `Ok` only when the receiver went away; `Err((why, frames were received))`.
async fn session(
    source: &RtspSource,
    group: &Arc<SessionGroup>,
    tx: &Sender<CameraEvent>,
    video_tl: &mut Timeline,
    audio_tl: &mut Timeline,
) -> Result<(), (RtspError, bool)> {
    let fail = |e: retina::Error| (classify(e), false);
    let options = SessionOptions::default()
        .creds(source.creds.clone())
        .session_group(group.clone())
        .user_agent("call-assist".into());
    let mut described = retina::client::Session::describe(source.url.clone(), options)
        .await
        .map_err(fail)?;
    let video_i = described
        .streams()
        .iter()
        .position(|s| s.media() == "video" && s.encoding_name() == "h264");
    let audio = described.streams().iter().enumerate().find_map(|(i, s)| {
        match (s.media(), s.encoding_name()) {
            ("audio", "pcmu") => Some((i, Codec::Pcmu)),
            ("audio", "pcma") => Some((i, Codec::Pcma)),
            ("audio", "opus") => Some((i, Codec::Opus)),
            _ => None,
        }
    });
    if video_i.is_none() && audio.is_none() {
        let found: Vec<String> = described
            .streams()
            .iter()
            .map(|s| format!("{}/{}", s.media(), s.encoding_name()))
            .collect();
        return Err((
            RtspError::NoUsableStream(format!(
                "streams {found:?}; need video/h264 or audio/pcmu|pcma|opus"
            )),
            false,
        ));
    }
    let transport = match source.transport {
        RtspTransport::Tcp => Transport::Tcp(Default::default()),
        RtspTransport::Udp => Transport::Udp(Default::default()),
    };
    for i in video_i.into_iter().chain(audio.map(|a| a.0)) {
        described
            .setup(i, SetupOptions::default().transport(transport.clone()))
            .await
            .map_err(fail)?;
    }
    let mut depacketizer = Depacketizer::new();
    let mut resolution = None;
    if let Some(ParametersRef::Video(v)) = video_i
        .and_then(|i| described.streams().get(i))
        .and_then(|s| s.parameters())
    {
        // From the SDP's sprop-parameter-sets; in-band SPS/PPS replace them.
        resolution = Some(v.pixel_dimensions());
        for nalu in avcc_parameter_sets(v.extra_data()) {
            depacketizer.set_parameter_set(nalu);
        }
    }
    let mut playing = Box::pin(described.play(PlayOptions::default()).await.map_err(fail)?);
    info!(camera = %source, ?resolution, audio = ?audio.map(|a| a.1), "camera playing");
    let playing_event = CameraEvent::Playing {
        video: video_i.is_some(),
        audio: audio.map(|a| a.1),
        resolution,
    };
    if tx.send(playing_event).await.is_err() {
        return Ok(());
    }
    let mut got_frames = false;
    let mut bad_packets = 0u64;
    let why = loop {
        let next = async { Some(playing.next().await) }
            .or(async {
                smol::Timer::after(STALL_TIMEOUT).await;
                None
            })
            .await;
        let pkt = match next {
            None => break RtspError::Session(format!("no data for {} s", STALL_TIMEOUT.as_secs())),
            Some(None) => break RtspError::Session("camera ended the stream".into()),
            Some(Some(Err(e))) => break classify(e),
            Some(Some(Ok(PacketItem::Rtp(pkt)))) => pkt,
            Some(Some(Ok(_))) => continue, // RTCP
        };
        let stream = Some(pkt.stream_id());
        if stream == video_i {
            let ts = pkt.timestamp().elapsed();
            if let Err(e) = depacketizer.push(pkt.sequence_number(), ts, pkt.mark(), pkt.payload())
            {
                bad_packets += 1;
                // A camera that sends these sends many: the first, then every 100th.
                if bad_packets % 100 == 1 {
                    warn!(camera = %source, bad_packets, "camera: dropped a video packet: {e}");
                }
            }
            while let Some(f) = depacketizer.pop() {
                let rtp_time = video_tl.map(f.timestamp, RECONNECT_GAP_90K);
                let profile = if f.keyframe {
                    call_assist_core::h264::profile_of_stream(&f.data)
                } else {
                    None
                };
                let event = CameraEvent::Video {
                    data: f.data,
                    rtp_time,
                    keyframe: f.keyframe,
                    profile,
                };
                got_frames = true;
                if tx.send(event).await.is_err() {
                    return Ok(());
                }
            }
        } else if let Some((_, codec)) = audio.filter(|a| Some(a.0) == stream) {
            let payload = pkt.payload();
            if payload.is_empty() {
                continue;
            }
            // Gap after a reconnect: one packet's worth (G.711 carries a sample per byte;
            // cameras send Opus in 20 ms packets).
            let gap = match codec {
                Codec::Opus => 960,
                _ => payload.len() as u64,
            };
            let event = CameraEvent::Audio {
                codec,
                rtp_time: audio_tl.map(pkt.timestamp().elapsed(), gap),
                data: payload.to_vec(),
            };
            got_frames = true;
            if tx.send(event).await.is_err() {
                return Ok(());
            }
        }
    };
    let st = depacketizer.stats();
    info!(camera = %source, frames = st.frames, keyframes = st.keyframes,
        packets_lost = st.packets_lost, packets_late = st.packets_late,
        dropped_broken = st.broken, dropped_waiting = st.waited, bad_packets,
        "camera session ended");
    Err((why, got_frames))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_keeps_the_password_apart() {
        let s =
            RtspSource::parse("rtsp://cam:p%40ss@127.0.0.1:8554/live", RtspTransport::Tcp).unwrap();
        let c = s.creds.as_ref().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("cam", "p@ss"));
        assert_eq!(s.url.as_str(), "rtsp://127.0.0.1:8554/live");
        assert_eq!(s.to_string(), "rtsp://cam@127.0.0.1:8554/live");
        assert!(!format!("{s:?}").contains("p@ss"));
        let open = RtspSource::parse("rtsp://cam.local/s", RtspTransport::Udp).unwrap();
        assert!(open.creds.is_none());
    }

    #[test]
    fn bad_urls_are_errors() {
        for bad in ["", "http://x/y", "rtsp://", "rtsp://u:%zz@h/p", "not a url"] {
            assert!(
                matches!(
                    RtspSource::parse(bad, RtspTransport::Tcp),
                    Err(RtspError::BadUrl(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn timeline_stays_monotonic_across_sessions() {
        let mut t = Timeline::default();
        t.new_session();
        assert_eq!(t.map(0, 3000), 0);
        assert_eq!(t.map(6000, 3000), 6000);
        // The camera restarts its clock: the new session continues after the last frame.
        t.new_session();
        assert_eq!(t.map(0, 3000), 9000);
        assert_eq!(t.map(3000, 3000), 12000);
        // A stutter backwards is clamped.
        assert_eq!(t.map(1000, 3000), 12000);
        assert_eq!(t.map(-5, 3000), 12000);
    }

    #[test]
    fn transport_names() {
        assert_eq!("tcp".parse(), Ok(RtspTransport::Tcp));
        assert_eq!("udp".parse(), Ok(RtspTransport::Udp));
        assert!("http".parse::<RtspTransport>().is_err());
    }
}
