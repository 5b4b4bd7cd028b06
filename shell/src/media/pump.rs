//! Feeds a connected call with the test clip and tone at their real rates, in whichever video
//! codec the call negotiated. Shared by mock mode and the live shell.

use std::time::Instant;

use call_assist_core::{Agent, Codec, MediaKind, OutgoingFrame};
use tracing::{info, warn};

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

pub struct CallMedia {
    pub call_id: String,
    video: Option<LoopingVideo>,
    audio: Option<(ToneAudio, Codec)>,
    next_video: Instant,
    next_audio: Instant,
    pub frames_sent: u64,
}

impl CallMedia {
    /// Starts media for a call that just connected.
    pub fn start(agent: &mut Agent, call_id: &str, choice: VideoChoice, now: Instant) -> Self {
        let video_codecs = agent
            .send_codecs(call_id, MediaKind::Video)
            .unwrap_or_default();
        let audio_codecs = agent
            .send_codecs(call_id, MediaKind::Audio)
            .unwrap_or_default();
        let want = match choice {
            VideoChoice::H264 => Some(Codec::H264),
            VideoChoice::Vp8 => Some(Codec::Vp8),
            VideoChoice::Auto => [Codec::H264, Codec::Vp8]
                .into_iter()
                .find(|c| video_codecs.contains(c)),
        };
        let video = match want {
            Some(Codec::H264) if video_codecs.contains(&Codec::H264) => {
                LoopingVideo::testclip().ok()
            }
            Some(Codec::Vp8) if video_codecs.contains(&Codec::Vp8) => {
                LoopingVideo::testclip_vp8().ok()
            }
            _ => None,
        };
        let video = video.map(|mut v| {
            v.restart_at_keyframe();
            v
        });
        if video.is_none() && !video_codecs.is_empty() {
            warn!(%call_id, ?video_codecs, "no test clip in a codec the peer accepts; sending no video");
        }
        let audio = [Codec::Pcmu]
            .into_iter()
            .find(|c| audio_codecs.contains(c))
            .map(|c| (ToneAudio::new(440), c));
        info!(%call_id, video = ?video.as_ref().map(|v| v.codec()), audio = ?audio.as_ref().map(|a| a.1), "sending media");
        CallMedia {
            call_id: call_id.to_owned(),
            video,
            audio,
            next_video: now,
            next_audio: now,
            frames_sent: 0,
        }
    }

    /// When the next frame is due.
    pub fn next_due(&self) -> Option<Instant> {
        let v = self.video.as_ref().map(|_| self.next_video);
        let a = self.audio.as_ref().map(|_| self.next_audio);
        match (v, a) {
            (Some(v), Some(a)) => Some(v.min(a)),
            (v, a) => v.or(a),
        }
    }

    /// The peer asked for a keyframe: the next video frame is the clip's next keyframe.
    pub fn keyframe_requested(&mut self) {
        if let Some(v) = &mut self.video {
            v.restart_at_keyframe();
        }
    }

    /// Writes every frame due at `now`; returns how many the agent took.
    pub fn pump(&mut self, agent: &mut Agent, now: Instant) -> u64 {
        let mut sent = 0;
        if let Some(video) = &mut self.video {
            while self.next_video <= now {
                let f = video.next_frame();
                let frame = OutgoingFrame {
                    kind: MediaKind::Video,
                    codec: video.codec(),
                    rtp_time: f.rtp_time_90k,
                    data: &f.data,
                };
                if let Ok(true) = agent.write_media(&self.call_id, now, frame) {
                    sent += 1;
                }
                self.next_video += video.frame_interval();
            }
        }
        if let Some((audio, codec)) = &mut self.audio {
            while self.next_audio <= now {
                let f = audio.next_frame();
                let frame = OutgoingFrame {
                    kind: MediaKind::Audio,
                    codec: *codec,
                    rtp_time: f.rtp_time_8k,
                    data: &f.data,
                };
                if let Ok(true) = agent.write_media(&self.call_id, now, frame) {
                    sent += 1;
                }
                self.next_audio += audio.frame_interval();
            }
        }
        self.frames_sent += sent;
        sent
    }
}
