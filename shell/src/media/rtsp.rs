//! An RTSP camera as a media source, through retina (the Rust RTSP client cameras are tested
//! against). H.264 is passed through as the camera sends it (Annex B access units, SPS/PPS in
//! front of every keyframe, the camera's timestamps); PCMU/PCMA audio likewise. No decoding.
//!
//! One task per camera runs the session and sends [`CameraEvent`]s to the shell's loop. When the
//! camera drops, it reconnects with backoff; timestamps stay monotonic across reconnects, so the
//! calls fed by it never see time go backwards. retina is tokio-based: the task runs under
//! `async-compat`, like reqwest.

use std::fmt;
use std::time::Duration;

use call_assist_core::h264::ProfileLevelId;
use call_assist_core::Codec;
use futures_lite::{FutureExt, StreamExt};
use retina::client::{
    Credentials, PlayOptions, SessionGroup, SessionOptions, SetupOptions, Transport,
};
use retina::codec::{CodecItem, FrameFormat};
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
    /// The camera has no H.264 video and no G.711 audio stream.
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
    /// One G.711 packet as the camera sent it.
    Audio {
        codec: Codec,
        data: Vec<u8>,
        /// In the codec's clock (8 kHz), monotonic across reconnects.
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
                "streams {found:?}; need video/h264 or audio/pcmu|pcma"
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
            .setup(
                i,
                SetupOptions::default()
                    .transport(transport.clone())
                    .frame_format(FrameFormat::SIMPLE),
            )
            .await
            .map_err(fail)?;
    }
    let resolution = video_i.and_then(|i| match described.streams().get(i)?.parameters()? {
        retina::codec::ParametersRef::Video(v) => Some(v.pixel_dimensions()),
        _ => None,
    });
    let playing = described.play(PlayOptions::default()).await.map_err(fail)?;
    let mut demuxed = playing.demuxed().map_err(fail)?;
    info!(camera = %source, ?resolution, audio = ?audio.map(|a| a.1), "camera playing");
    let playing = CameraEvent::Playing {
        video: video_i.is_some(),
        audio: audio.map(|a| a.1),
        resolution,
    };
    if tx.send(playing).await.is_err() {
        return Ok(());
    }
    let mut got_frames = false;
    loop {
        let next = async { Some(demuxed.next().await) }
            .or(async {
                smol::Timer::after(STALL_TIMEOUT).await;
                None
            })
            .await;
        let item = match next {
            None => {
                return Err((
                    RtspError::Session(format!("no data for {} s", STALL_TIMEOUT.as_secs())),
                    got_frames,
                ))
            }
            Some(None) => {
                return Err((
                    RtspError::Session("camera ended the stream".into()),
                    got_frames,
                ))
            }
            Some(Some(Err(e))) => return Err((classify(e), got_frames)),
            Some(Some(Ok(item))) => item,
        };
        let event = match item {
            CodecItem::VideoFrame(f) => {
                let keyframe = f.is_random_access_point();
                let rtp_time = video_tl.map(f.timestamp().elapsed(), RECONNECT_GAP_90K);
                let data = f.into_data();
                let profile = if keyframe {
                    call_assist_core::h264::profile_of_stream(&data)
                } else {
                    None
                };
                CameraEvent::Video {
                    data,
                    rtp_time,
                    keyframe,
                    profile,
                }
            }
            CodecItem::AudioFrame(f) => match audio {
                Some((_, codec)) => {
                    let gap = u64::from(f.frame_length().get());
                    CameraEvent::Audio {
                        codec,
                        rtp_time: audio_tl.map(f.timestamp().elapsed(), gap),
                        data: f.data().to_vec(),
                    }
                }
                None => continue,
            },
            _ => continue,
        };
        got_frames = true;
        if tx.send(event).await.is_err() {
            return Ok(());
        }
    }
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
