//! Feeds a connected call from the configured sources, in whichever codecs the call
//! negotiated. Shared by mock mode and the live shell.
//!
//! Paced sources (the test clip, an H.264 file, the tone, an Ogg Opus file) are written when
//! due ([`CallMedia::pump`]); a camera pushes frames as they arrive ([`CallMedia::camera_video`],
//! [`CallMedia::camera_audio`]).
//!
//! Keyframes from a camera: a passthrough source cannot make the camera encode a new IDR, so
//! the camera's current GOP, its latest IDR (with SPS/PPS) and the frames since, is kept in a
//! [`CameraCache`] (bounded by [`GOP_CACHE_MAX_BYTES`] and [`GOP_CACHE_MAX_FRAMES`]). A call
//! that starts, or a peer that sends PLI/FIR, gets that GOP at once, so its decoder holds the
//! camera's current picture and the live frames that follow decode: the picture appears and
//! moves at once. When the GOP outgrew the cache (a long GOP at a high bitrate), only the IDR
//! goes out and then no P-frame until the camera's next IDR (P-frames after the IDR refer to
//! pictures the peer never got): the picture appears at once and is clean, and moves from the
//! camera's next IDR on.

use std::time::{Duration, Instant};

use call_assist_core::{Agent, Codec, MediaKind, OutgoingFrame};
use tracing::{debug, info, warn};

use super::ogg::LoopingOpus;
use super::pcm::RATE;
use super::transcode::{self, Encoder, TranscodeError};
use super::{LoopingVideo, ToneAudio};

/// Which clip to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VideoChoice {
    /// H.264 when the call negotiated it, else VP8.
    #[default]
    Auto,
    H264,
    Vp8,
}

/// Where a call's video comes from.
#[derive(Debug, Clone)]
pub enum VideoSource {
    /// The built-in clip in the chosen codec.
    TestClip(VideoChoice),
    /// An H.264 Annex B file, looped (parsed once; each call plays its own copy).
    File(LoopingVideo),
    /// The RTSP camera (frames pushed by the shell).
    Camera,
    None,
}

/// Where a call's audio comes from.
#[derive(Debug, Clone)]
pub enum AudioSource {
    /// A 440 Hz PCMU tone.
    Tone,
    /// An Ogg Opus file, looped.
    Opus(LoopingOpus),
    /// The RTSP camera's G.711 or Opus (frames pushed by the shell).
    Camera,
    /// The hub's microphone: this ALSA device (periods pushed by the shell, G.711-encoded).
    Mic(String),
    None,
}

/// What every call of this process sends.
#[derive(Debug, Clone)]
pub struct MediaPlan {
    pub video: VideoSource,
    pub audio: AudioSource,
}

impl MediaPlan {
    /// The test clip and tone (mock mode and the live default).
    pub fn testclip(choice: VideoChoice) -> Self {
        MediaPlan {
            video: VideoSource::TestClip(choice),
            audio: AudioSource::Tone,
        }
    }
}

/// Largest GOP (bytes of the IDR and the frames since) a camera's cache keeps: 2 s of
/// 1080p at 8 Mbit/s.
pub const GOP_CACHE_MAX_BYTES: usize = 2 << 20;
/// Most frames since the IDR the cache keeps (10 s at 30 fps).
pub const GOP_CACHE_MAX_FRAMES: usize = 300;

/// A camera's current GOP, for calls that start or ask for a keyframe.
#[derive(Debug, Default, Clone)]
pub struct CameraCache {
    /// SPS + PPS + IDR access unit first, then the frames after it, each with its 90 kHz
    /// timestamp. Only the IDR once the GOP outgrew the bounds.
    gop: Vec<(Vec<u8>, u64)>,
    bytes: usize,
    /// Frames since the IDR were dropped from the cache (bounds): a call that gets the IDR
    /// waits for the camera's next one.
    truncated: bool,
}

impl CameraCache {
    /// Notes a camera frame: a keyframe starts a new GOP, other frames join the current one.
    pub fn observe(&mut self, data: &[u8], rtp_time: u64, keyframe: bool) {
        if keyframe {
            self.gop.clear();
            self.gop.push((data.to_vec(), rtp_time));
            self.bytes = data.len();
            self.truncated = false;
            return;
        }
        if self.gop.is_empty() || self.truncated {
            return;
        }
        if self.gop.len() > GOP_CACHE_MAX_FRAMES
            || self.bytes.saturating_add(data.len()) > GOP_CACHE_MAX_BYTES
        {
            self.gop.truncate(1);
            self.bytes = self.gop.first().map_or(0, |f| f.0.len());
            self.truncated = true;
            return;
        }
        self.gop.push((data.to_vec(), rtp_time));
        self.bytes += data.len();
    }

    /// Forgets the GOP (the camera reconnected: its next frames do not follow it).
    pub fn reset(&mut self) {
        self.gop.clear();
        self.bytes = 0;
        self.truncated = false;
    }

    /// The latest IDR and its timestamp.
    #[cfg(test)]
    fn keyframe(&self) -> Option<(&[u8], u64)> {
        self.gop.first().map(|(d, t)| (d.as_slice(), *t))
    }

    /// Frames cached (the IDR included) and their bytes.
    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        (self.gop.len(), self.bytes)
    }
}

/// How a peer's PLI/FIR was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyframeAnswer {
    /// The clip went back to its keyframe.
    ClipRestarted,
    /// The camera's cached GOP (its latest IDR and the frames since) went out now, and live
    /// frames follow.
    CachedGop,
    /// The GOP outgrew the cache: its IDR went out now; P-frames wait for the camera's next IDR.
    CachedIdr,
    /// Nothing cached (the camera is reconnecting): the camera's next IDR goes out.
    NextIdr,
    /// The cached IDR went out less than [`KEYFRAME_RESEND_MIN`] ago.
    TooSoon,
    /// This call sends no video.
    NoVideo,
}

impl KeyframeAnswer {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyframeAnswer::ClipRestarted => "clip_restarted",
            KeyframeAnswer::CachedGop => "cached_gop",
            KeyframeAnswer::CachedIdr => "cached_idr",
            KeyframeAnswer::NextIdr => "next_idr",
            KeyframeAnswer::TooSoon => "too_soon",
            KeyframeAnswer::NoVideo => "no_video",
        }
    }
}

/// A peer's repeated PLI/FIR resends the cached keyframe at most this often.
const KEYFRAME_RESEND_MIN: Duration = Duration::from_millis(500);

#[derive(Debug)]
enum Video {
    Clip(LoopingVideo),
    Camera {
        /// Hold P-frames until the camera's next IDR.
        waiting_keyframe: bool,
        last_rtp_time: Option<u64>,
        last_resend: Option<Instant>,
    },
    Off,
}

#[derive(Debug)]
enum Audio {
    Tone(ToneAudio, Codec),
    Opus(LoopingOpus),
    /// The camera's G.711 or Opus; the codec last checked against what the call negotiated.
    Camera(Option<Codec>),
    /// The hub's microphone, encoded in the call's codec.
    Mic(Encoder),
    Off,
}

pub struct CallMedia {
    pub call_id: String,
    video: Video,
    audio: Audio,
    next_video: Instant,
    next_audio: Instant,
    pub frames_sent: u64,
}

/// The microphone's encoder for a call that takes `codecs`: G.711 when the peer takes it
/// (PCMU, else PCMA: no encoding cost to speak of), else Opus (when this build has it).
fn mic_encoder(codecs: &[Codec]) -> Result<Encoder, TranscodeError> {
    let codec = [Codec::Pcmu, Codec::Pcma, Codec::Opus]
        .into_iter()
        .find(|c| codecs.contains(c) && transcode::supported(*c))
        .unwrap_or(Codec::Opus);
    Encoder::new(codec)
}

fn clip_for(choice: VideoChoice, codecs: &[Codec], call_id: &str) -> Video {
    let want = match choice {
        VideoChoice::H264 => Some(Codec::H264),
        VideoChoice::Vp8 => Some(Codec::Vp8),
        VideoChoice::Auto => [Codec::H264, Codec::Vp8]
            .into_iter()
            .find(|c| codecs.contains(c)),
    };
    let clip = match want {
        Some(Codec::H264) if codecs.contains(&Codec::H264) => LoopingVideo::testclip().ok(),
        Some(Codec::Vp8) if codecs.contains(&Codec::Vp8) => LoopingVideo::testclip_vp8().ok(),
        _ => None,
    };
    match clip {
        Some(c) => Video::Clip(c),
        None => {
            warn!(%call_id, ?codecs, "no test clip in a codec the peer accepts; sending no video");
            Video::Off
        }
    }
}

impl CallMedia {
    /// Starts media for a call that just connected. A camera's cached keyframe goes out at
    /// once.
    pub fn start(
        agent: &mut Agent,
        call_id: &str,
        plan: &MediaPlan,
        cache: &CameraCache,
        now: Instant,
    ) -> Self {
        let video_codecs = agent
            .send_codecs(call_id, MediaKind::Video)
            .unwrap_or_default();
        let audio_codecs = agent
            .send_codecs(call_id, MediaKind::Audio)
            .unwrap_or_default();
        let h264 = video_codecs.contains(&Codec::H264);
        let video = match &plan.video {
            _ if video_codecs.is_empty() => Video::Off,
            VideoSource::TestClip(choice) => clip_for(*choice, &video_codecs, call_id),
            VideoSource::File(v) if h264 => Video::Clip(v.clone()),
            VideoSource::Camera if h264 => Video::Camera {
                waiting_keyframe: true,
                last_rtp_time: None,
                last_resend: None,
            },
            VideoSource::File(_) | VideoSource::Camera => {
                warn!(%call_id, ?video_codecs, "the peer takes no H.264; sending no video");
                Video::Off
            }
            VideoSource::None => Video::Off,
        };
        let video = match video {
            Video::Clip(mut v) => {
                v.restart_at_keyframe();
                Video::Clip(v)
            }
            v => v,
        };
        let audio = match &plan.audio {
            _ if audio_codecs.is_empty() => Audio::Off,
            AudioSource::Tone if audio_codecs.contains(&Codec::Pcmu) => {
                Audio::Tone(ToneAudio::new(ToneAudio::DEFAULT_FREQ_HZ), Codec::Pcmu)
            }
            AudioSource::Opus(o) if audio_codecs.contains(&Codec::Opus) => Audio::Opus(o.clone()),
            AudioSource::Camera => Audio::Camera(None),
            AudioSource::Mic(_) => match mic_encoder(&audio_codecs) {
                Ok(e) => Audio::Mic(e),
                Err(e) => {
                    warn!(%call_id, ?audio_codecs, "the microphone cannot be encoded for this call ({e}); sending no audio");
                    Audio::Off
                }
            },
            AudioSource::None => Audio::Off,
            _ => {
                warn!(%call_id, ?audio_codecs, "the peer takes none of the source's audio codecs; sending no audio");
                Audio::Off
            }
        };
        info!(%call_id, video = ?describe_video(&video), audio = ?describe_audio(&audio), "sending media");
        let mut media = CallMedia {
            call_id: call_id.to_owned(),
            video,
            audio,
            next_video: now,
            next_audio: now,
            frames_sent: 0,
        };
        let _ = media.send_cached_keyframe(agent, cache, now);
        media
    }

    /// When the next paced frame is due (`None` when only pushed sources or nothing).
    pub fn next_due(&self) -> Option<Instant> {
        let v = matches!(self.video, Video::Clip(_)).then_some(self.next_video);
        let a = matches!(self.audio, Audio::Tone(..) | Audio::Opus(_)).then_some(self.next_audio);
        match (v, a) {
            (Some(v), Some(a)) => Some(v.min(a)),
            (v, a) => v.or(a),
        }
    }

    /// The peer asked for a keyframe (PLI/FIR): what it gets.
    pub fn keyframe_requested(
        &mut self,
        agent: &mut Agent,
        cache: &CameraCache,
        now: Instant,
    ) -> KeyframeAnswer {
        match &mut self.video {
            Video::Clip(v) => {
                v.restart_at_keyframe();
                KeyframeAnswer::ClipRestarted
            }
            Video::Camera { last_resend, .. } => {
                if last_resend
                    .is_some_and(|t| now.saturating_duration_since(t) < KEYFRAME_RESEND_MIN)
                {
                    return KeyframeAnswer::TooSoon;
                }
                *last_resend = Some(now);
                self.send_cached_keyframe(agent, cache, now)
            }
            Video::Off => KeyframeAnswer::NoVideo,
        }
    }

    /// Sends the camera's cached GOP (or its IDR alone, see [`CameraCache`]): `CachedGop` or
    /// `CachedIdr` when the IDR went out, `NextIdr` when nothing did.
    fn send_cached_keyframe(
        &mut self,
        agent: &mut Agent,
        cache: &CameraCache,
        now: Instant,
    ) -> KeyframeAnswer {
        let Video::Camera {
            waiting_keyframe,
            last_rtp_time,
            ..
        } = &mut self.video
        else {
            return KeyframeAnswer::NoVideo;
        };
        if cache.gop.is_empty() {
            debug!(call_id = %self.call_id, "no camera keyframe cached yet; waiting for one");
            *waiting_keyframe = true;
            return KeyframeAnswer::NextIdr;
        }
        let mut sent = 0;
        for (data, at) in &cache.gop {
            if !send_h264(agent, &self.call_id, last_rtp_time, data, *at, now) {
                break;
            }
            sent += 1;
        }
        self.frames_sent += sent as u64;
        // Live frames follow the cached ones only when all of the GOP went out.
        *waiting_keyframe = cache.truncated || sent < cache.gop.len();
        debug!(call_id = %self.call_id, frames = sent, truncated = cache.truncated, "sent the camera's cached GOP");
        match sent {
            0 => KeyframeAnswer::NextIdr,
            _ if *waiting_keyframe => KeyframeAnswer::CachedIdr,
            _ => KeyframeAnswer::CachedGop,
        }
    }

    /// A camera video frame (call after [`CameraCache::observe`] for the same frame).
    pub fn camera_video(
        &mut self,
        agent: &mut Agent,
        data: &[u8],
        rtp_time: u64,
        keyframe: bool,
        now: Instant,
    ) {
        let Video::Camera {
            waiting_keyframe,
            last_rtp_time,
            ..
        } = &mut self.video
        else {
            return;
        };
        if *waiting_keyframe && !keyframe {
            return;
        }
        if send_h264(agent, &self.call_id, last_rtp_time, data, rtp_time, now) {
            *waiting_keyframe = false;
            self.frames_sent += 1;
        }
    }

    /// A camera audio packet (G.711 with an 8 kHz timestamp, or Opus with 48 kHz).
    pub fn camera_audio(
        &mut self,
        agent: &mut Agent,
        codec: Codec,
        data: &[u8],
        rtp_time: u64,
        now: Instant,
    ) {
        let Audio::Camera(checked) = &mut self.audio else {
            return;
        };
        if *checked != Some(codec) {
            let codecs = agent
                .send_codecs(&self.call_id, MediaKind::Audio)
                .unwrap_or_default();
            if !codecs.contains(&codec) {
                warn!(call_id = %self.call_id, ?codec, ?codecs, "the peer does not take the camera's audio codec; sending no audio");
                self.audio = Audio::Off;
                return;
            }
            *checked = Some(codec);
        }
        let frame = OutgoingFrame {
            kind: MediaKind::Audio,
            codec,
            rtp_time,
            data,
        };
        if let Ok(true) = agent.write_media(&self.call_id, now, frame) {
            self.frames_sent += 1;
        }
    }

    /// A period of the hub's microphone (8 kHz samples), encoded in the call's codec.
    pub fn mic_audio(&mut self, agent: &mut Agent, samples: &[i16], rtp_time: u64, now: Instant) {
        let Audio::Mic(encoder) = &mut self.audio else {
            return;
        };
        let codec = encoder.codec();
        let data = match encoder.encode(samples) {
            Ok(d) => d,
            Err(e) => {
                warn!(call_id = %self.call_id, "microphone: {e}; period dropped");
                return;
            }
        };
        // Opus's RTP clock is 48 kHz whatever the audio's rate.
        let rtp_time = if codec == Codec::Opus {
            rtp_time * (transcode::OPUS_CLOCK / RATE as u64)
        } else {
            rtp_time
        };
        let frame = OutgoingFrame {
            kind: MediaKind::Audio,
            codec,
            rtp_time,
            data: &data,
        };
        if let Ok(true) = agent.write_media(&self.call_id, now, frame) {
            self.frames_sent += 1;
        }
    }

    /// Writes every paced frame due at `now`; returns how many the agent took.
    pub fn pump(&mut self, agent: &mut Agent, now: Instant) -> u64 {
        self.pump_until(agent, now, now)
    }

    /// Writes, at `now`, every paced frame due by `until` (the live loop sends frames due
    /// within a few ms with the wake-up it has, instead of waking again for them). Frames are
    /// borrowed from their source, never copied here (the agent copies each once, for str0m).
    pub fn pump_until(&mut self, agent: &mut Agent, now: Instant, until: Instant) -> u64 {
        let mut sent = 0;
        if let Video::Clip(video) = &mut self.video {
            while self.next_video <= until {
                let codec = video.codec();
                let f = video.next_unit();
                let frame = OutgoingFrame {
                    kind: MediaKind::Video,
                    codec,
                    rtp_time: f.rtp_time_90k,
                    data: f.data,
                };
                if let Ok(true) = agent.write_media(&self.call_id, now, frame) {
                    sent += 1;
                }
                self.next_video += video.frame_interval();
            }
        }
        while self.next_audio <= until {
            let tone_frame;
            let (codec, rtp_time, data, interval): (_, _, &[u8], _) = match &mut self.audio {
                Audio::Tone(tone, codec) => {
                    let (samples, t) = tone.next_samples();
                    tone_frame = samples;
                    (*codec, t, &tone_frame, tone.frame_interval())
                }
                Audio::Opus(o) => {
                    let (data, t, d) = o.next_packet();
                    (Codec::Opus, t, data, d.max(Duration::from_millis(2)))
                }
                Audio::Camera(_) | Audio::Mic(_) | Audio::Off => break,
            };
            let frame = OutgoingFrame {
                kind: MediaKind::Audio,
                codec,
                rtp_time,
                data,
            };
            if let Ok(true) = agent.write_media(&self.call_id, now, frame) {
                sent += 1;
            }
            self.next_audio += interval;
        }
        self.frames_sent += sent;
        sent
    }
}

/// Writes one camera access unit; its timestamp never goes backwards (a resent cached IDR is
/// older than what was sent last). True when the agent took it.
fn send_h264(
    agent: &mut Agent,
    call_id: &str,
    last_rtp_time: &mut Option<u64>,
    data: &[u8],
    rtp_time: u64,
    now: Instant,
) -> bool {
    let t = last_rtp_time.map_or(rtp_time, |l| rtp_time.max(l.saturating_add(1)));
    let frame = OutgoingFrame {
        kind: MediaKind::Video,
        codec: Codec::H264,
        rtp_time: t,
        data,
    };
    let sent = matches!(agent.write_media(call_id, now, frame), Ok(true));
    if sent {
        *last_rtp_time = Some(t);
    }
    sent
}

fn describe_video(v: &Video) -> Option<String> {
    match v {
        Video::Clip(c) => Some(format!("{:?} clip", c.codec())),
        Video::Camera { .. } => Some("camera H264".into()),
        Video::Off => None,
    }
}

fn describe_audio(a: &Audio) -> Option<String> {
    match a {
        Audio::Tone(_, c) => Some(format!("{c:?} tone")),
        Audio::Opus(_) => Some("Opus file".into()),
        Audio::Camera(_) => Some("camera".into()),
        Audio::Mic(e) => Some(format!("{:?} microphone", e.codec())),
        Audio::Off => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_microphone_prefers_g711_and_encodes_opus_only_for_a_peer_that_insists() {
        let codec = |codecs: &[Codec]| mic_encoder(codecs).map(|e| e.codec());
        assert_eq!(codec(&[Codec::Opus, Codec::Pcma]), Ok(Codec::Pcma));
        assert_eq!(codec(&[Codec::Pcma, Codec::Pcmu]), Ok(Codec::Pcmu));
        let opus = codec(&[Codec::Opus]);
        if cfg!(feature = "opus") {
            assert_eq!(opus, Ok(Codec::Opus));
        } else {
            assert_eq!(opus, Err(TranscodeError::Unsupported(Codec::Opus)));
        }
    }

    #[test]
    fn the_cache_keeps_the_gop_from_its_idr_within_bounds() {
        let mut c = CameraCache::default();
        // P-frames before any IDR are of no use.
        c.observe(&[1; 10], 0, false);
        assert_eq!(c.len(), (0, 0));
        assert!(c.keyframe().is_none());
        c.observe(&[5; 100], 3000, true);
        c.observe(&[1; 10], 6000, false);
        c.observe(&[1; 10], 9000, false);
        assert_eq!(c.len(), (3, 120));
        assert!(!c.truncated);
        // A new IDR starts over.
        c.observe(&[5; 50], 12000, true);
        assert_eq!(c.len(), (1, 50));
        assert_eq!(c.keyframe().map(|k| k.1), Some(12000));
        // Beyond the byte bound only the IDR stays, and later frames are not kept.
        c.observe(&vec![1; GOP_CACHE_MAX_BYTES], 15000, false);
        assert_eq!(c.len(), (1, 50));
        assert!(c.truncated);
        c.observe(&[1; 10], 18000, false);
        assert_eq!(c.len(), (1, 50));
        // Beyond the frame bound too.
        c.observe(&[5; 50], 21000, true);
        assert!(!c.truncated);
        for i in 0..=GOP_CACHE_MAX_FRAMES as u64 + 1 {
            c.observe(&[1; 10], 24000 + i * 3000, false);
        }
        assert!(c.truncated);
        assert_eq!(c.len(), (1, 50));
        c.reset();
        assert_eq!(c.len(), (0, 0));
        assert!(c.keyframe().is_none());
    }
}
