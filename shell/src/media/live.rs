//! The live shell's media: what each connected call sends (from a [`MediaPlan`], with a camera's
//! frames fanned out to every call) and where the remote side's media goes (recordings, RTP
//! forwarding).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use call_assist_core::h264::ProfileLevelId;
use call_assist_core::{Agent, Codec, MediaFrame, MediaKind};
use futures_lite::FutureExt;
use serde_json::json;
use smol::channel::Sender;
use tracing::{info, warn};

use crate::live::config::MediaOptions;
use crate::live::exit;
use crate::media::backchannel::{TalkbackEvent, TalkbackPacket, TalkbackSender};
use crate::media::g711;
use crate::media::mic::MicEvent;
use crate::media::pump::AudioSource;
use crate::media::pump::{CallMedia, CameraCache, KeyframeAnswer, MediaPlan, VideoChoice};
use crate::media::rtsp::{CameraEvent, RtspError};
use crate::media::sink::{Recorder, RtpForwarder};
use crate::media::speaker::SpeakerEvent;

/// How long start-up waits for a camera's first keyframe (its H.264 profile goes into our
/// SDP); after that the agent starts anyway and the camera joins calls when it comes up.
const CAMERA_START_WAIT: Duration = Duration::from_secs(10);
/// Camera events queued before the camera task waits.
const CAMERA_QUEUE: usize = 256;

/// The camera's speaker: the call's audio goes there (one call at a time).
#[derive(Debug)]
pub struct Talkback {
    queue: TalkbackSender,
    /// The speaker's codec, while its session is up.
    codec: Option<Codec>,
    /// The call whose audio the speaker plays: the first unmuted call that sends audio,
    /// until it ends or is muted.
    speaker: Option<String>,
    /// Calls whose audio must not reach the door (`POST /calls/ID/mute`).
    muted: BTreeSet<String>,
    /// Calls told that their audio cannot reach the speaker (Opus only).
    unavailable: BTreeSet<String>,
    /// The camera has no usable speaker at all.
    pub gone: bool,
}

/// The hub's own speaker (ALSA): the first call that sends G.711 audio plays there until it
/// ends.
#[derive(Debug)]
pub struct HubSpeaker {
    /// `None` only in unit tests (no device behind the gate).
    #[cfg(feature = "alsa")]
    device: Option<crate::media::speaker::Speaker>,
    /// The call at the speaker.
    call: Option<String>,
    /// Calls whose audio must not play (`POST /calls/ID/mute`).
    muted: BTreeSet<String>,
    /// Calls told that their audio cannot play (Opus only).
    unavailable: BTreeSet<String>,
    /// The device is open (false between `lost` and `ready`).
    pub up: bool,
    /// Samples decoded for the speaker (what the tests and `/health` can watch).
    pub samples: u64,
}

/// Why a call cannot be muted or unmuted: its station has neither talkback nor the hub's speaker.
#[derive(Debug, PartialEq, Eq)]
pub struct NoTalkback;

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
    /// The camera's speaker, for a station with `talkback`.
    pub talkback: Option<Talkback>,
    /// The hub's own speaker, for `--speaker` / station `speaker`.
    pub speaker: Option<HubSpeaker>,
    /// The hub's microphone (`--audio alsa:DEVICE`), kept open while the process runs.
    #[cfg(feature = "alsa")]
    mic: Option<crate::media::mic::Mic>,
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
            talkback: None,
            speaker: None,
            #[cfg(feature = "alsa")]
            mic: None,
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
        if let Some(t) = &mut self.talkback {
            if t.speaker.as_deref() == Some(call_id) {
                t.speaker = None;
            }
            t.muted.remove(call_id);
            t.unavailable.remove(call_id);
        }
        if let Some(sp) = &mut self.speaker {
            if sp.call.as_deref() == Some(call_id) {
                sp.call = None;
            }
            sp.unavailable.remove(call_id);
            sp.muted.remove(call_id);
        }
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

    /// Gates a call's audio toward the door (`muted`): the camera's speaker (talkback) and the
    /// hub's own, whichever the station has.
    pub fn set_muted(&mut self, call_id: &str, muted: bool) -> Result<(), NoTalkback> {
        if self.talkback.is_none() && self.speaker.is_none() {
            return Err(NoTalkback);
        }
        if let Some(t) = &mut self.talkback {
            if muted {
                t.muted.insert(call_id.to_owned());
                if t.speaker.as_deref() == Some(call_id) {
                    t.speaker = None;
                }
            } else {
                t.muted.remove(call_id);
            }
        }
        if let Some(sp) = &mut self.speaker {
            if muted {
                sp.muted.insert(call_id.to_owned());
                if sp.call.as_deref() == Some(call_id) {
                    sp.call = None;
                }
            } else {
                sp.muted.remove(call_id);
            }
        }
        Ok(())
    }

    /// The camera speaker's state for `/health` (`None`: no talkback).
    pub fn talkback_state(&self) -> Option<&'static str> {
        let t = self.talkback.as_ref()?;
        Some(if t.gone {
            "unavailable"
        } else if t.codec.is_some() {
            "ready"
        } else {
            "down"
        })
    }

    /// The hub speaker's state for `/health` and `/stations`: `ready` or `lost` (`None`: no
    /// speaker).
    pub fn speaker_state(&self) -> Option<&'static str> {
        self.speaker
            .as_ref()
            .map(|sp| if sp.up { "ready" } else { "lost" })
    }

    /// Whether a call's audio is kept from the door (`None`: no speaker of either kind).
    pub fn muted(&self, call_id: &str) -> Option<bool> {
        match (&self.talkback, &self.speaker) {
            (Some(t), _) => Some(t.muted.contains(call_id)),
            (None, Some(sp)) => Some(sp.muted.contains(call_id)),
            (None, None) => None,
        }
    }

    /// The backchannel task's news: the line to print, and the codec the hub's calls
    /// should prefer from now on (`Some` when the speaker came up).
    pub fn talkback_event(&mut self, e: TalkbackEvent) -> (serde_json::Value, Option<Codec>) {
        let Some(t) = &mut self.talkback else {
            return (json!({"event": "talkback", "state": "unexpected"}), None);
        };
        match e {
            TalkbackEvent::Ready { codec } => {
                t.codec = Some(codec);
                (
                    json!({"event": "talkback", "state": "ready", "codec": format!("{codec:?}")}),
                    Some(codec),
                )
            }
            TalkbackEvent::Lost { error, retry_in } => {
                t.codec = None;
                (
                    json!({"event": "talkback", "state": "lost", "message": error.to_string(),
                        "retry_in_ms": retry_in.as_millis() as u64}),
                    None,
                )
            }
            TalkbackEvent::Unavailable { message } => {
                t.codec = None;
                t.gone = true;
                (
                    json!({"event": "talkback", "state": "unavailable", "message": message}),
                    None,
                )
            }
        }
    }

    /// A call's remote audio toward the camera's speaker; a line when the call learns that
    /// its audio cannot go there.
    fn talk(&mut self, f: &MediaFrame) -> Option<serde_json::Value> {
        let t = self.talkback.as_mut()?;
        let call_id = f.call_id.as_str();
        if f.kind != MediaKind::Audio || t.muted.contains(call_id) {
            return None;
        }
        let camera = t.codec?;
        let data: Vec<u8> = match (f.codec, camera) {
            (a, b) if a == b => f.data.to_vec(),
            (Codec::Pcmu, Codec::Pcma) => f.data.iter().map(|&u| g711::ulaw_to_alaw(u)).collect(),
            (Codec::Pcma, Codec::Pcmu) => f.data.iter().map(|&a| g711::alaw_to_ulaw(a)).collect(),
            (theirs, _) => {
                if !t.unavailable.insert(call_id.to_owned()) {
                    return None;
                }
                warn!(%call_id, codec = ?theirs, camera = ?camera,
                    "talkback unavailable for this call: the peer sends {theirs:?} only and the camera's speaker plays {camera:?} (no transcoding)");
                return Some(
                    json!({"event": "talkback", "state": "unavailable", "call_id": call_id,
                    "message": format!("the peer sends {theirs:?}; the camera's speaker plays {camera:?}")}),
                );
            }
        };
        let (restart, line) = match &t.speaker {
            Some(s) if s == call_id => (false, None),
            Some(_) => return None,
            None => {
                t.speaker = Some(call_id.to_owned());
                let converted = f.codec != camera;
                info!(%call_id, codec = ?f.codec, converted, "talkback: this call's audio goes to the camera's speaker");
                let line = json!({"event": "talkback", "state": "speaking", "call_id": call_id,
                    "codec": format!("{:?}", f.codec), "speaker_codec": format!("{camera:?}")});
                (true, Some(line))
            }
        };
        t.queue.send(TalkbackPacket {
            data,
            rtp_time: f.rtp_time,
            restart: restart || !f.contiguous,
        });
        line
    }

    /// The microphone thread's news: a period goes to every call; a line when the device
    /// is lost or back.
    pub fn mic_event(
        &mut self,
        agent: &mut Agent,
        e: MicEvent,
        now: Instant,
    ) -> Option<serde_json::Value> {
        match e {
            MicEvent::Frame { samples, rtp_time } => {
                for m in self.calls.values_mut() {
                    m.mic_audio(agent, &samples, rtp_time, now);
                }
                None
            }
            MicEvent::Ready => Some(json!({"event": "microphone", "state": "ready"})),
            MicEvent::Lost { message } => {
                Some(json!({"event": "microphone", "state": "lost", "message": message}))
            }
        }
    }

    /// The speaker thread's news: the line to print.
    pub fn speaker_event(&mut self, e: SpeakerEvent) -> serde_json::Value {
        let Some(sp) = &mut self.speaker else {
            return json!({"event": "speaker", "state": "unexpected"});
        };
        match e {
            SpeakerEvent::Ready => {
                sp.up = true;
                json!({"event": "speaker", "state": "ready"})
            }
            SpeakerEvent::Lost { message } => {
                sp.up = false;
                json!({"event": "speaker", "state": "lost", "message": message})
            }
        }
    }

    /// A call's remote audio toward the hub's speaker: G.711 decoded into its buffer; a line
    /// when a call starts playing there or learns that it cannot.
    fn play(&mut self, f: &MediaFrame) -> Option<serde_json::Value> {
        let sp = self.speaker.as_mut()?;
        let call_id = f.call_id.as_str();
        if f.kind != MediaKind::Audio || sp.muted.contains(call_id) {
            return None;
        }
        let decode: fn(u8) -> i16 = match f.codec {
            Codec::Pcmu => g711::ulaw_to_linear,
            Codec::Pcma => g711::alaw_to_linear,
            theirs => {
                if !sp.unavailable.insert(call_id.to_owned()) {
                    return None;
                }
                warn!(%call_id, codec = ?theirs,
                    "speaker: the peer sends {theirs:?} only; the hub's speaker plays G.711 (PCMU/PCMA)");
                return Some(
                    json!({"event": "speaker", "state": "unavailable", "call_id": call_id,
                    "message": format!("the peer sends {theirs:?}; the hub's speaker plays PCMU or PCMA")}),
                );
            }
        };
        let line = match &sp.call {
            Some(c) if c == call_id => None,
            Some(_) => return None,
            None => {
                sp.call = Some(call_id.to_owned());
                #[cfg(feature = "alsa")]
                if let Some(d) = &sp.device {
                    d.clear();
                }
                info!(%call_id, codec = ?f.codec, "speaker: this call's audio plays on the hub's speaker");
                Some(
                    json!({"event": "speaker", "state": "playing", "call_id": call_id,
                    "codec": format!("{:?}", f.codec)}),
                )
            }
        };
        let samples: Vec<i16> = f.data.iter().map(|&b| decode(b)).collect();
        sp.samples += samples.len() as u64;
        #[cfg(feature = "alsa")]
        if let Some(d) = &sp.device {
            d.push(&samples);
        }
        line
    }

    /// Remote media of a call; a line to print when there is news.
    pub fn remote_frame(&mut self, f: &MediaFrame, now: Instant) -> Option<serde_json::Value> {
        let line = self.talk(f);
        let line = self.play(f).or(line);
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
        line
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

    /// Writes, at `now`, the paced frames due by `until`.
    pub fn pump(&mut self, agent: &mut Agent, now: Instant, until: Instant) {
        for m in self.calls.values_mut() {
            if m.next_due().is_some_and(|t| t <= until) {
                m.pump_until(agent, now, until);
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

/// Opens the hub's microphone; its periods and events reach `tx`. `Err` is the exit code,
/// after a clear message.
#[cfg(feature = "alsa")]
fn open_mic<M: Send + 'static>(
    live: &mut LiveMedia,
    device: &str,
    tx: &Sender<M>,
    wrap: impl Fn(MicEvent) -> M + Send + 'static,
) -> Result<(), u8> {
    let (ev_tx, ev_rx) = smol::channel::bounded(crate::media::mic::MIC_QUEUE);
    let mic = crate::media::mic::Mic::open(device, ev_tx).map_err(|e| {
        eprintln!("error: --audio alsa:{device}: {e}");
        exit::USAGE
    })?;
    live.mic = Some(mic);
    let tx = tx.clone();
    smol::spawn(async move {
        while let Ok(ev) = ev_rx.recv().await {
            if tx.send(wrap(ev)).await.is_err() {
                return;
            }
        }
    })
    .detach();
    Ok(())
}

#[cfg(not(feature = "alsa"))]
fn open_mic<M: Send + 'static>(
    _live: &mut LiveMedia,
    device: &str,
    _tx: &Sender<M>,
    _wrap: impl Fn(MicEvent) -> M + Send + 'static,
) -> Result<(), u8> {
    eprintln!(
        "error: --audio alsa:{device}: this build has no ALSA support (cargo feature `alsa`)"
    );
    Err(exit::USAGE)
}

/// Opens the hub's speaker; its events reach `tx`. `Err` is the exit code, after a clear
/// message (a missing device is a start-up error, like a missing file).
#[cfg(feature = "alsa")]
fn open_speaker<M: Send + 'static>(
    device: &str,
    tx: &Sender<M>,
    wrap: impl Fn(SpeakerEvent) -> M + Send + 'static,
) -> Result<HubSpeaker, u8> {
    let (ev_tx, ev_rx) = smol::channel::bounded(CAMERA_QUEUE);
    let speaker = crate::media::speaker::Speaker::open(device, ev_tx).map_err(|e| {
        eprintln!("error: --speaker: {e}");
        exit::USAGE
    })?;
    let tx = tx.clone();
    smol::spawn(async move {
        while let Ok(ev) = ev_rx.recv().await {
            if tx.send(wrap(ev)).await.is_err() {
                return;
            }
        }
    })
    .detach();
    Ok(HubSpeaker {
        device: Some(speaker),
        call: None,
        muted: BTreeSet::new(),
        unavailable: BTreeSet::new(),
        up: true,
        samples: 0,
    })
}

#[cfg(not(feature = "alsa"))]
fn open_speaker<M: Send + 'static>(
    _device: &str,
    _tx: &Sender<M>,
    _wrap: impl Fn(SpeakerEvent) -> M + Send + 'static,
) -> Result<HubSpeaker, u8> {
    eprintln!("error: --speaker: this build has no ALSA support (cargo feature `alsa`)");
    Err(exit::USAGE)
}

/// Reads the media options: files are loaded and checked, a camera is connected to and its
/// first keyframe awaited (for its H.264 profile). Camera events reach `tx` wrapped by `wrap`;
/// a forwarder writes its SDP file at `forward_sdp`. `Err` is the exit code, after a clear
/// message.
// One wrapper per kind of task event, so each task stays unaware of the driver's messages.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn start_media<M: Send + 'static>(
    m: &MediaOptions,
    video: VideoChoice,
    rtsp_password: Option<&str>,
    forward_sdp: PathBuf,
    tx: &Sender<M>,
    wrap: impl Fn(CameraEvent) -> M + Send + 'static,
    wrap_talkback: impl Fn(TalkbackEvent) -> M + Send + 'static,
    wrap_speaker: impl Fn(SpeakerEvent) -> M + Send + 'static,
    wrap_mic: impl Fn(MicEvent) -> M + Send + 'static,
) -> Result<(LiveMedia, Option<ProfileLevelId>), u8> {
    let sources = crate::media::source::plan(
        &m.video,
        m.audio.as_deref(),
        m.video_fps,
        video,
        m.rtsp_transport,
        rtsp_password,
    )
    .map_err(|e| {
        eprintln!("error: {e}");
        exit::USAGE
    })?;
    let mut profile = sources.h264_profile;
    if let Some(dir) = &m.record {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("error: --record: cannot create {}: {e}", dir.display());
            return Err(exit::USAGE);
        }
    }
    let forward = m.forward_rtp.map(|dest| (dest, forward_sdp));
    if let Some(dir) = forward.as_ref().and_then(|(_, sdp)| sdp.parent()) {
        let _ = std::fs::create_dir_all(dir);
    }
    let mic_device = match &sources.plan.audio {
        AudioSource::Mic(d) => Some(d.clone()),
        _ => None,
    };
    let mut live = LiveMedia::new(sources.plan, m.record.clone(), forward);
    if let Some(device) = mic_device {
        open_mic(&mut live, &device, tx, wrap_mic)?;
    }
    if let Some(device) = &m.speaker {
        live.speaker = Some(open_speaker(device, tx, wrap_speaker)?);
    }
    let Some(camera) = sources.camera else {
        if m.talkback {
            eprintln!("error: talkback needs an rtsp:// camera (its speaker) as the video source");
            return Err(exit::USAGE);
        }
        return Ok((live, profile));
    };
    if m.talkback {
        let (ev_tx, ev_rx) = smol::channel::bounded(CAMERA_QUEUE);
        let queue = crate::media::backchannel::spawn(camera.clone(), ev_tx);
        live.talkback = Some(Talkback {
            queue: TalkbackSender::new(queue),
            codec: None,
            speaker: None,
            muted: BTreeSet::new(),
            unavailable: BTreeSet::new(),
            gone: false,
        });
        let tx = tx.clone();
        smol::spawn(async move {
            while let Ok(ev) = ev_rx.recv().await {
                if tx.send(wrap_talkback(ev)).await.is_err() {
                    return;
                }
            }
        })
        .detach();
    }
    info!(camera = %camera, transport = ?camera.transport, "connecting to the camera");
    let (cam_tx, cam_rx) = smol::channel::bounded(CAMERA_QUEUE);
    smol::spawn(async_compat::Compat::new(crate::media::rtsp::run(
        camera.clone(),
        cam_tx,
    )))
    .detach();
    let deadline = Instant::now() + CAMERA_START_WAIT;
    let mut last_error = None;
    loop {
        let ev = async { cam_rx.recv().await.ok() }
            .or(async {
                smol::Timer::at(deadline).await;
                None
            })
            .await;
        let Some(ev) = ev else { break };
        match &ev {
            CameraEvent::Lost {
                error: e @ (RtspError::Unauthorized(_) | RtspError::NoUsableStream(_)),
                ..
            } => {
                eprintln!("error: camera {camera}: {e}");
                return Err(exit::MEDIA_SOURCE);
            }
            CameraEvent::Lost { error, .. } => last_error = Some(error.to_string()),
            CameraEvent::Video {
                profile: Some(p), ..
            } => {
                profile = Some(*p);
                info!(profile = %p, "camera H.264 profile");
                live.prime(&ev);
                break;
            }
            _ => {}
        }
        live.prime(&ev);
    }
    if profile.is_none() {
        warn!(
            camera = %camera,
            last_error = last_error.as_deref().unwrap_or("no keyframe yet"),
            "no keyframe from the camera within {} s; starting anyway, calls get its video once it is up",
            CAMERA_START_WAIT.as_secs()
        );
    }
    let tx = tx.clone();
    smol::spawn(async move {
        while let Ok(ev) = cam_rx.recv().await {
            if tx.send(wrap(ev)).await.is_err() {
                return;
            }
        }
    })
    .detach();
    Ok((live, profile))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A station's media with a talkback queue (no task behind it) whose speaker plays
    /// `codec`; the queue's receiving end.
    fn with_speaker(codec: Codec) -> (LiveMedia, smol::channel::Receiver<TalkbackPacket>) {
        let mut m = LiveMedia::new(MediaPlan::testclip(VideoChoice::Auto), None, None);
        let (tx, rx) = smol::channel::bounded(8);
        m.talkback = Some(Talkback {
            queue: TalkbackSender::new(tx),
            codec: None,
            speaker: None,
            muted: BTreeSet::new(),
            unavailable: BTreeSet::new(),
            gone: false,
        });
        let (line, pref) = m.talkback_event(TalkbackEvent::Ready { codec });
        assert_eq!((line["state"].as_str(), pref), (Some("ready"), Some(codec)));
        (m, rx)
    }

    fn audio(call: &str, codec: Codec, data: &[u8], rtp_time: u64) -> MediaFrame {
        MediaFrame {
            call_id: call.into(),
            kind: MediaKind::Audio,
            codec,
            rtp_time,
            clock_rate: if codec == Codec::Opus { 48_000 } else { 8_000 },
            contiguous: true,
            data: Arc::from(data),
        }
    }

    #[test]
    fn one_call_at_a_time_reaches_the_speaker_and_mute_gates_it() {
        let (mut m, rx) = with_speaker(Codec::Pcmu);
        let now = Instant::now();
        let line = m.remote_frame(&audio("a", Codec::Pcmu, &[1, 2], 0), now);
        assert_eq!(line.unwrap()["state"], "speaking");
        // A second call does not talk over the first.
        assert!(m
            .remote_frame(&audio("b", Codec::Pcmu, &[3], 0), now)
            .is_none());
        assert!(m
            .remote_frame(&audio("a", Codec::Pcmu, &[4], 160), now)
            .is_none());
        let got: Vec<Vec<u8>> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|p| p.data)
            .collect();
        assert_eq!(got, [vec![1, 2], vec![4]]);
        // Muting the speaker's call hands the speaker to the next call that talks.
        assert_eq!(m.set_muted("a", true), Ok(()));
        assert_eq!(m.muted("a"), Some(true));
        assert!(m
            .remote_frame(&audio("a", Codec::Pcmu, &[5], 320), now)
            .is_none());
        let line = m.remote_frame(&audio("b", Codec::Pcmu, &[6], 160), now);
        assert_eq!(line.unwrap()["call_id"], "b");
        let p = rx.try_recv().unwrap();
        assert_eq!((p.data, p.restart), (vec![6], true));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn opus_only_is_one_unavailable_line_and_the_other_law_is_converted() {
        let (mut m, rx) = with_speaker(Codec::Pcma);
        let now = Instant::now();
        let line = m
            .remote_frame(&audio("a", Codec::Opus, &[0xfc, 1], 0), now)
            .unwrap();
        assert_eq!(
            (&line["state"], &line["call_id"]),
            (&json!("unavailable"), &json!("a"))
        );
        assert!(m
            .remote_frame(&audio("a", Codec::Opus, &[0xfc, 1], 960), now)
            .is_none());
        assert!(rx.try_recv().is_err(), "no Opus reaches a G.711 speaker");
        // PCMU silence (0xff) becomes PCMA silence (0xd5).
        m.end_call("a");
        m.remote_frame(&audio("b", Codec::Pcmu, &[0xff, 0xff], 0), now);
        assert_eq!(rx.try_recv().unwrap().data, vec![0xd5, 0xd5]);
    }

    /// A station with the hub's speaker only (no device behind the gate).
    fn with_hub_speaker() -> LiveMedia {
        let mut m = LiveMedia::new(MediaPlan::testclip(VideoChoice::Auto), None, None);
        m.speaker = Some(HubSpeaker {
            #[cfg(feature = "alsa")]
            device: None,
            call: None,
            muted: BTreeSet::new(),
            unavailable: BTreeSet::new(),
            up: true,
            samples: 0,
        });
        m
    }

    #[test]
    fn the_hub_speaker_plays_one_g711_call_and_mute_gates_it() {
        let mut m = with_hub_speaker();
        let now = Instant::now();
        let samples = |m: &LiveMedia| m.speaker.as_ref().map_or(0, |s| s.samples);
        let line = m.remote_frame(&audio("a", Codec::Pcma, &[0xd5; 160], 0), now);
        let line = line.unwrap();
        assert_eq!(
            (&line["event"], &line["state"]),
            (&json!("speaker"), &json!("playing"))
        );
        assert_eq!(line["codec"], "Pcma");
        assert!(m
            .remote_frame(&audio("b", Codec::Pcmu, &[0xff; 160], 0), now)
            .is_none());
        assert_eq!(samples(&m), 160, "only the first call plays");
        // Opus-only: one line for that call, nothing played.
        let line = m
            .remote_frame(&audio("c", Codec::Opus, &[0xfc, 1], 0), now)
            .unwrap();
        assert_eq!(
            (&line["state"], &line["call_id"]),
            (&json!("unavailable"), &json!("c"))
        );
        assert!(m
            .remote_frame(&audio("c", Codec::Opus, &[0xfc, 1], 960), now)
            .is_none());
        // Muting the playing call hands the speaker to the next call that talks.
        assert_eq!(m.set_muted("a", true), Ok(()));
        assert_eq!(m.muted("a"), Some(true));
        assert!(m
            .remote_frame(&audio("a", Codec::Pcma, &[0xd5; 160], 160), now)
            .is_none());
        let line = m.remote_frame(&audio("b", Codec::Pcmu, &[0xff; 160], 160), now);
        assert_eq!(line.unwrap()["call_id"], "b");
        assert_eq!(samples(&m), 320);
        let line = m.speaker_event(SpeakerEvent::Lost {
            message: "gone".into(),
        });
        assert_eq!(
            (&line["state"], &line["message"]),
            (&json!("lost"), &json!("gone"))
        );
    }

    #[test]
    fn a_station_without_talkback_cannot_mute() {
        let mut m = LiveMedia::new(MediaPlan::testclip(VideoChoice::Auto), None, None);
        assert_eq!(m.set_muted("a", true), Err(NoTalkback));
        assert_eq!(m.muted("a"), None);
        assert_eq!(m.talkback_state(), None);
    }
}
