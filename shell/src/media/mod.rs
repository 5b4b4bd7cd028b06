//! Media sources for mock mode and the CLI demo: the built-in H.264 test clip looped at
//! a fixed frame rate, and a G.711 test tone.
//!
//! See `shell/assets/README.md` for how the clip was made.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod backchannel;
pub mod g711;
pub mod gate;
pub mod h264;
pub mod ivf;
pub mod live;
pub mod mic;
pub mod ogg;
pub mod pcm;
pub mod pump;
pub mod rtsp;
pub mod sink;
pub mod source;
pub mod speaker;
pub mod transcode;

use std::fmt;
use std::time::Duration;

use self::g711::ToneGenerator;
use self::h264::AccessUnit;

/// The shipped test clip: 320x240, 15 fps, 4 s (60 frames), H.264 Constrained Baseline
/// level 3.0 (profile-level-id 42c01e), Annex B, SPS+PPS before every IDR, IDR every 15 frames.
pub const TESTCLIP: &[u8] = include_bytes!("../../assets/testclip.h264");
/// Frame rate the test clip was encoded at.
pub const TESTCLIP_FPS: u32 = 15;
/// The same picture as VP8 in IVF (for peers without H.264, such as libwebrtc builds
/// without it); see `shell/assets/README.md`.
pub const TESTCLIP_VP8: &[u8] = include_bytes!("../../assets/testclip_vp8.ivf");

/// RTP clock rate of video (RFC 6184).
pub const VIDEO_CLOCK_RATE: u64 = 90_000;
/// RTP clock rate of PCMU (RFC 3551).
pub const AUDIO_CLOCK_RATE: u64 = g711::SAMPLE_RATE as u64;
/// Duration of one PCMU frame.
pub const AUDIO_FRAME_INTERVAL: Duration = Duration::from_millis(20);

/// Why a media source could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaError {
    /// The clip contains no access unit with a coded slice.
    EmptyClip,
    /// The clip has access units but none is a keyframe (IDR).
    NoKeyframe,
    /// A frame rate of 0 was given.
    ZeroFps,
}

impl fmt::Display for MediaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MediaError::EmptyClip => f.write_str("H.264 clip contains no coded pictures"),
            MediaError::NoKeyframe => f.write_str("H.264 clip contains no IDR (keyframe)"),
            MediaError::ZeroFps => f.write_str("frame rate must be greater than zero"),
        }
    }
}

impl std::error::Error for MediaError {}

/// One video access unit to send, borrowed from its clip (no copy per frame).
/// `data` is Annex B (4-byte start codes); keyframes carry SPS+PPS in front of the IDR;
/// `rtp_time_90k` starts at 0 and keeps increasing across loops and restarts; `index` counts
/// the frames emitted before this one.
#[derive(Debug, Clone, Copy)]
pub struct VideoUnit<'a> {
    pub data: &'a [u8],
    pub rtp_time_90k: u64,
    pub keyframe: bool,
    pub index: u64,
}

/// Loops a clip's access units forever at `fps`, with a 90 kHz RTP timestamp that keeps
/// increasing across loops. Playback begins at the clip's first keyframe.
#[derive(Debug, Clone)]
pub struct LoopingVideo {
    /// Never empty and contains at least one keyframe (checked in `new`).
    aus: Vec<AccessUnit>,
    codec: call_assist_core::Codec,
    fps: u32,
    /// Position in `aus` of the next frame.
    pos: usize,
    /// Frames emitted so far.
    emitted: u64,
    last_keyframe_index: Option<u64>,
}

impl LoopingVideo {
    /// Parses an Annex B clip.
    ///
    /// # Errors
    /// [`MediaError::ZeroFps`] if `fps` is 0, [`MediaError::EmptyClip`] if the clip has no
    /// coded picture, [`MediaError::NoKeyframe`] if it has no IDR.
    pub fn new(clip: &[u8], fps: u32) -> Result<Self, MediaError> {
        if fps == 0 {
            return Err(MediaError::ZeroFps);
        }
        Self::from_units(h264::access_units(clip), fps, call_assist_core::Codec::H264)
    }

    /// Frames already split (any codec); `keyframe` marks where playback may start.
    pub fn from_units(
        aus: Vec<AccessUnit>,
        fps: u32,
        codec: call_assist_core::Codec,
    ) -> Result<Self, MediaError> {
        if fps == 0 {
            return Err(MediaError::ZeroFps);
        }
        if aus.is_empty() {
            return Err(MediaError::EmptyClip);
        }
        let first_key = aus
            .iter()
            .position(|au| au.keyframe)
            .ok_or(MediaError::NoKeyframe)?;
        Ok(Self {
            aus,
            codec,
            fps,
            pos: first_key,
            emitted: 0,
            last_keyframe_index: None,
        })
    }

    /// The built-in [`TESTCLIP`] at [`TESTCLIP_FPS`].
    ///
    /// # Errors
    /// As [`Self::new`]; the shipped clip is valid, so only a broken asset fails.
    pub fn testclip() -> Result<Self, MediaError> {
        Self::new(TESTCLIP, TESTCLIP_FPS)
    }

    /// The built-in VP8 clip ([`TESTCLIP_VP8`]).
    ///
    /// # Errors
    /// As [`Self::new`]; the shipped clip is valid, so only a broken asset fails.
    pub fn testclip_vp8() -> Result<Self, MediaError> {
        let (fps, aus) = ivf::frames(TESTCLIP_VP8).ok_or(MediaError::EmptyClip)?;
        Self::from_units(aus, fps, call_assist_core::Codec::Vp8)
    }

    /// The codec of the clip's frames.
    pub fn codec(&self) -> call_assist_core::Codec {
        self.codec
    }

    /// The next access unit of the loop. The caller paces calls by [`Self::frame_interval`].
    pub fn next_unit(&mut self) -> VideoUnit<'_> {
        if self.pos >= self.aus.len() {
            self.pos = 0;
        }
        let index = self.emitted;
        let rtp_time_90k = self.rtp_time_of(index);
        let at = self.pos;
        self.pos = self.pos.saturating_add(1);
        if self.pos >= self.aus.len() {
            self.pos = 0;
        }
        self.emitted = self.emitted.saturating_add(1);
        let (data, keyframe) = match self.aus.get(at) {
            Some(au) => (au.data.as_slice(), au.keyframe),
            // Unreachable: `aus` is non-empty and `pos` was wrapped above.
            None => (&[][..], false),
        };
        if keyframe {
            self.last_keyframe_index = Some(index);
        }
        VideoUnit {
            data,
            rtp_time_90k,
            keyframe,
            index,
        }
    }

    /// Time between two frames (1/fps, rounded to whole nanoseconds).
    pub fn frame_interval(&self) -> Duration {
        Duration::from_nanos(1_000_000_000 / u64::from(self.fps))
    }

    /// Frame rate the clip is played at.
    pub fn fps(&self) -> u32 {
        self.fps
    }

    /// Access units in one loop of the clip.
    pub fn frames_per_loop(&self) -> usize {
        self.aus.len()
    }

    /// Number of frames emitted so far (= `index` of the next frame).
    pub fn frames_emitted(&self) -> u64 {
        self.emitted
    }

    /// `index` of the most recently emitted keyframe, if any was emitted.
    pub fn last_keyframe_index(&self) -> Option<u64> {
        self.last_keyframe_index
    }

    /// Skips ahead so that the next [`Self::next_unit`] returns a keyframe: the next
    /// keyframe at or after the current position, wrapping around the loop. Timestamps
    /// and indices keep increasing. Use when a call starts or the peer asks for a keyframe.
    pub fn restart_at_keyframe(&mut self) {
        let len = self.aus.len();
        let start = if self.pos >= len { 0 } else { self.pos };
        let ahead = self.aus.iter().enumerate().skip(start);
        let wrapped = self.aus.iter().enumerate().take(start);
        if let Some((i, _)) = ahead.chain(wrapped).find(|(_, au)| au.keyframe) {
            self.pos = i;
        }
    }

    fn rtp_time_of(&self, index: u64) -> u64 {
        // u128 so that no index can overflow; exact for any fps (no drift).
        let t = u128::from(index) * u128::from(VIDEO_CLOCK_RATE) / u128::from(self.fps);
        u64::try_from(t).unwrap_or(u64::MAX)
    }
}

/// A sine test tone as PCMU frames with an 8 kHz RTP timestamp.
#[derive(Debug, Clone)]
pub struct ToneAudio {
    tone: ToneGenerator,
    emitted: u64,
}

impl ToneAudio {
    /// Default tone frequency of the demo.
    pub const DEFAULT_FREQ_HZ: u32 = 440;

    /// A tone of `freq_hz` (see [`ToneGenerator::new`]).
    pub fn new(freq_hz: u32) -> Self {
        Self {
            tone: ToneGenerator::new(freq_hz),
            emitted: 0,
        }
    }

    /// The next 20 ms PCMU frame (160 mu-law bytes) and its 8 kHz RTP time (0, +160 per frame).
    pub fn next_samples(&mut self) -> ([u8; g711::FRAME_SAMPLES], u64) {
        let index = self.emitted;
        self.emitted = self.emitted.saturating_add(1);
        (
            self.tone.next_frame(),
            index.saturating_mul(g711::FRAME_SAMPLES as u64),
        )
    }

    /// Always 20 ms.
    pub fn frame_interval(&self) -> Duration {
        AUDIO_FRAME_INTERVAL
    }
}

impl Default for ToneAudio {
    fn default() -> Self {
        Self::new(Self::DEFAULT_FREQ_HZ)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn testclip_loops_with_increasing_timestamps() {
        let mut v = LoopingVideo::testclip().unwrap();
        assert_eq!(v.frames_per_loop(), 60);
        assert_eq!(v.frame_interval(), Duration::from_nanos(66_666_666));
        let frames: Vec<(Vec<u8>, u64, bool, u64)> = (0..150)
            .map(|_| {
                let f = v.next_unit();
                (f.data.to_vec(), f.rtp_time_90k, f.keyframe, f.index)
            })
            .collect();
        for (i, (data, rtp_time, keyframe, index)) in frames.iter().enumerate() {
            assert_eq!(*index, i as u64);
            assert_eq!(*rtp_time, i as u64 * 6000);
            assert_eq!(*keyframe, i % 15 == 0, "frame {i}");
            assert!(data.starts_with(&h264::START_CODE));
        }
        // Second loop repeats the first one's bytes.
        assert_eq!(frames[0].0, frames[60].0);
        assert_eq!(frames[7].0, frames[127].0);
        assert_eq!(v.last_keyframe_index(), Some(135));
    }

    #[test]
    fn restart_at_keyframe() {
        let mut v = LoopingVideo::testclip().unwrap();
        let first = v.next_unit().data.to_vec();
        for _ in 0..4 {
            v.next_unit();
        }
        v.restart_at_keyframe();
        let k = v.next_unit();
        assert!(k.keyframe);
        assert_eq!(k.index, 5);
        assert_eq!(k.rtp_time_90k, 5 * 6000);
        assert_ne!(k.data, first.as_slice()); // the IDR at clip frame 15
        assert!(!v.next_unit().keyframe);
        // At a keyframe already: stays.
        let mut w = LoopingVideo::testclip().unwrap();
        w.restart_at_keyframe();
        assert_eq!(w.next_unit().data, first.as_slice());
        // Past the last keyframe: wraps to the clip's first one.
        let mut z = LoopingVideo::testclip().unwrap();
        for _ in 0..50 {
            z.next_unit();
        }
        z.restart_at_keyframe();
        assert_eq!(z.next_unit().data, first.as_slice());
    }

    #[test]
    fn rejects_bad_clips() {
        assert_eq!(
            LoopingVideo::new(&[], 15).unwrap_err(),
            MediaError::EmptyClip
        );
        assert_eq!(
            LoopingVideo::new(b"not h264 at all", 15).unwrap_err(),
            MediaError::EmptyClip
        );
        assert_eq!(
            LoopingVideo::new(&[0, 0, 1, 0x41, 0x9a, 0, 0, 1, 0x41, 0x9b], 15).unwrap_err(),
            MediaError::NoKeyframe
        );
        assert_eq!(
            LoopingVideo::new(TESTCLIP, 0).unwrap_err(),
            MediaError::ZeroFps
        );
        assert!(!MediaError::NoKeyframe.to_string().is_empty());
        // A clip starting with P frames begins at its first keyframe.
        let mut clip = vec![0, 0, 1, 0x41, 0x9a];
        clip.extend_from_slice(&[0, 0, 1, 0x65, 0x88]);
        let mut v = LoopingVideo::new(&clip, 30).unwrap();
        assert!(v.next_unit().keyframe);
        assert!(!v.next_unit().keyframe);
        assert_eq!(v.next_unit().rtp_time_90k, 6000);
    }

    #[test]
    fn tone_audio() {
        let mut a = ToneAudio::default();
        assert_eq!(a.frame_interval(), Duration::from_millis(20));
        let (f0, t0) = a.next_samples();
        let (_, t1) = a.next_samples();
        assert_eq!(f0.len(), 160);
        assert_eq!((t0, t1), (0, 160));
        assert!(f0.iter().any(|&b| b != f0[0]));
    }
}
