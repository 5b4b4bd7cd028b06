//! The live shell's media: what each connected call sends (from a [`MediaPlan`], with a camera's
//! frames fanned out to every call) and where the remote side's media goes (recordings, RTP
//! forwarding).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use call_assist_core::{Agent, MediaFrame};
use serde_json::json;
use tracing::{info, warn};

use crate::media::pump::{CallMedia, CameraCache, KeyframeAnswer, MediaPlan};
use crate::media::rtsp::CameraEvent;
use crate::media::sink::{Recorder, RtpForwarder};

/// Media of every call of the process.
pub struct LiveMedia {
    plan: MediaPlan,
    cache: CameraCache,
    calls: BTreeMap<String, CallMedia>,
    record_dir: Option<PathBuf>,
    recorders: BTreeMap<String, Recorder>,
    forward: Option<(SocketAddr, PathBuf)>,
    forwarders: BTreeMap<String, RtpForwarder>,
    /// The camera is streaming (false before its first session and while reconnecting).
    pub camera_up: bool,
    /// Camera frames received (video + audio).
    pub camera_frames: u64,
}

impl LiveMedia {
    pub fn new(
        plan: MediaPlan,
        record_dir: Option<PathBuf>,
        forward: Option<(SocketAddr, PathBuf)>,
    ) -> Self {
        LiveMedia {
            plan,
            cache: CameraCache::default(),
            calls: BTreeMap::new(),
            record_dir,
            recorders: BTreeMap::new(),
            forward,
            forwarders: BTreeMap::new(),
            camera_up: false,
            camera_frames: 0,
        }
    }

    /// A call connected: start sending, open its recording and forwarder. Returns JSON lines
    /// to print (where the recording and the SDP file are).
    pub fn start_call(
        &mut self,
        agent: &mut Agent,
        call_id: &str,
        now: Instant,
        unix_ms: u64,
    ) -> Vec<serde_json::Value> {
        let mut lines = Vec::new();
        let m = CallMedia::start(agent, call_id, &self.plan, &self.cache, now);
        self.calls.insert(call_id.to_owned(), m);
        if let Some(dir) = &self.record_dir {
            match Recorder::create(dir, call_id, unix_ms) {
                Ok(r) => {
                    info!(%call_id, path = %r.path().display(), "recording");
                    lines.push(json!({"event": "recording", "call_id": call_id, "path": r.path().display().to_string()}));
                    self.recorders.insert(call_id.to_owned(), r);
                }
                Err(e) => {
                    warn!(%call_id, dir = %dir.display(), "cannot record: {e}");
                    lines.push(json!({"event": "error", "kind": "record", "call_id": call_id, "message": e.to_string()}));
                }
            }
        }
        if let Some((dest, sdp)) = &self.forward {
            match RtpForwarder::new(*dest) {
                Ok(f) => {
                    info!(%call_id, %dest, sdp = %sdp.display(), "forwarding remote media as RTP");
                    lines.push(json!({"event": "forwarding", "call_id": call_id, "to": dest.to_string(), "sdp": sdp.display().to_string()}));
                    self.forwarders.insert(call_id.to_owned(), f);
                }
                Err(e) => {
                    warn!(%call_id, %dest, "cannot forward RTP: {e}");
                    lines.push(json!({"event": "error", "kind": "forward", "call_id": call_id, "message": e.to_string()}));
                }
            }
        }
        lines
    }

    /// A call ended: stop sending, close its recording.
    pub fn end_call(&mut self, call_id: &str) -> Option<serde_json::Value> {
        self.calls.remove(call_id);
        self.forwarders.remove(call_id);
        let r = self.recorders.remove(call_id)?;
        match r.finish() {
            Ok(s) => {
                info!(%call_id, ?s, "recording closed");
                Some(
                    json!({"event": "recorded", "call_id": call_id, "path": s.path.as_ref().map(|p| p.display().to_string()), "video_frames": s.video_frames, "audio_frames": s.audio_frames}),
                )
            }
            Err(e) => {
                warn!(%call_id, "closing the recording failed: {e}");
                None
            }
        }
    }

    /// Remote media of a call.
    pub fn remote_frame(&mut self, f: &MediaFrame, now: Instant) {
        if let Some(r) = self.recorders.get_mut(f.call_id.as_str()) {
            if let Err(e) = r.write(f, now) {
                warn!(call_id = %f.call_id, "recording: {e}");
            }
        }
        if let Some(fw) = self.forwarders.get_mut(f.call_id.as_str()) {
            let before = fw.sdp_version();
            if let Err(e) = fw.forward(f) {
                warn!(call_id = %f.call_id, "forwarding: {e}");
            }
            if let Some((_, path)) = &self.forward {
                if fw.sdp_version() != before {
                    if let Err(e) = fw.write_sdp(path) {
                        warn!(path = %path.display(), "cannot write the SDP file: {e}");
                    }
                }
            }
        }
    }

    /// The peer of a call asked for a keyframe: how it was answered (`None`: no such call).
    pub fn keyframe_requested(
        &mut self,
        agent: &mut Agent,
        call_id: &str,
        now: Instant,
    ) -> Option<KeyframeAnswer> {
        let m = self.calls.get_mut(call_id)?;
        Some(m.keyframe_requested(agent, &self.cache, now))
    }

    /// Writes the paced frames due.
    pub fn pump(&mut self, agent: &mut Agent, now: Instant) {
        for m in self.calls.values_mut() {
            if m.next_due().is_some_and(|t| t <= now) {
                m.pump(agent, now);
            }
        }
    }

    pub fn next_due(&self) -> Option<Instant> {
        self.calls.values().filter_map(CallMedia::next_due).min()
    }

    pub fn first_call(&self) -> Option<&String> {
        self.calls.keys().next()
    }

    /// A camera event from before the agent started (no calls yet): fills the keyframe cache.
    pub fn prime(&mut self, e: &CameraEvent) {
        match e {
            CameraEvent::Playing { .. } => {
                self.camera_up = true;
                self.cache.reset();
            }
            CameraEvent::Video {
                data,
                rtp_time,
                keyframe,
                ..
            } => self.cache.observe(data, *rtp_time, *keyframe),
            _ => {}
        }
    }

    /// A camera event; returns a JSON line to print when it is news for the user.
    pub fn camera(
        &mut self,
        agent: &mut Agent,
        e: CameraEvent,
        now: Instant,
        profile: &mut Option<call_assist_core::h264::ProfileLevelId>,
    ) -> Option<serde_json::Value> {
        match e {
            CameraEvent::Playing {
                video,
                audio,
                resolution,
            } => {
                self.camera_up = true;
                // The new session's frames do not follow the old keyframe.
                self.cache.reset();
                Some(
                    json!({"event": "camera", "state": "playing", "video": video,
                    "audio": audio.map(|c| format!("{c:?}")), "resolution": resolution}),
                )
            }
            CameraEvent::Video {
                data,
                rtp_time,
                keyframe,
                profile: p,
            } => {
                self.camera_frames += 1;
                if let Some(p) = p.filter(|p| Some(*p) != *profile) {
                    info!(profile = %p, "camera H.264 profile");
                    *profile = Some(p);
                    agent.set_h264_profile(Some(p));
                }
                self.cache.observe(&data, rtp_time, keyframe);
                for m in self.calls.values_mut() {
                    m.camera_video(agent, &data, rtp_time, keyframe, now);
                }
                None
            }
            CameraEvent::Audio {
                codec,
                data,
                rtp_time,
            } => {
                self.camera_frames += 1;
                for m in self.calls.values_mut() {
                    m.camera_audio(agent, codec, &data, rtp_time, now);
                }
                None
            }
            CameraEvent::Lost { error, retry_in } => {
                let was_up = std::mem::replace(&mut self.camera_up, false);
                let line = json!({"event": "camera", "state": "lost", "message": error.to_string(),
                    "retry_in_ms": retry_in.as_millis() as u64});
                was_up.then_some(line)
            }
        }
    }
}
