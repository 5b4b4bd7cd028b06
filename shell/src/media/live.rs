//! The live shell's media: what each connected call sends (from a [`MediaPlan`], with a camera's
//! frames fanned out to every call) and where the remote side's media goes (recordings, RTP
//! forwarding).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use call_assist_core::h264::ProfileLevelId;
use call_assist_core::{Agent, Codec, MediaFrame, MediaKind};
use futures_lite::FutureExt;
use serde_json::json;
use smol::channel::Sender;
use tracing::{debug, info, warn};

use crate::live::config::MediaOptions;
use crate::live::exit;
use crate::media::backchannel::{TalkbackEvent, TalkbackPacket, TalkbackSender};
use crate::media::g711;
use crate::media::gate::{Admit, SpeakerGate};
use crate::media::mic::MicEvent;
use crate::media::pcm::RATE;
use crate::media::pump::AudioSource;
use crate::media::pump::{CallMedia, CameraCache, KeyframeAnswer, MediaPlan, VideoChoice};
use crate::media::rtsp::{CameraEvent, RtspError};
use crate::media::sink::{Recorder, RtpForwarder};
use crate::media::speaker::SpeakerEvent;
use crate::media::transcode::{self, Decoder};

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
    gate: SpeakerGate,
    /// Opus from the call at the speaker, decoded to be G.711-encoded for the camera.
    decoder: Decoder,
    /// The camera has no usable speaker at all.
    pub gone: bool,
}

impl Talkback {
    /// The camera's speaker behind `queue` (the backchannel task's), down until its
    /// [`TalkbackEvent::Ready`].
    pub fn new(queue: smol::channel::Sender<TalkbackPacket>) -> Talkback {
        Talkback {
            queue: TalkbackSender::new(queue),
            codec: None,
            gate: SpeakerGate::default(),
            decoder: Decoder::default(),
            gone: false,
        }
    }
}

/// The hub's own speaker (ALSA): the first call that sends G.711 audio plays there until it
/// ends.
#[derive(Debug)]
pub struct HubSpeaker {
    /// `None` only in unit tests (no device behind the gate).
    #[cfg(feature = "alsa")]
    device: Option<crate::media::speaker::Speaker>,
    gate: SpeakerGate,
    /// The call at the speaker's audio to samples.
    decoder: Decoder,
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
        for gate in self.gates() {
            gate.end_call(call_id);
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
        for gate in self.gates() {
            gate.set_muted(call_id, muted);
        }
        Ok(())
    }

    /// The gates of the station's speakers (the camera's, the hub's).
    fn gates(&mut self) -> impl Iterator<Item = &mut SpeakerGate> {
        let t = self.talkback.as_mut().map(|t| &mut t.gate);
        t.into_iter()
            .chain(self.speaker.as_mut().map(|sp| &mut sp.gate))
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
            (Some(t), _) => Some(t.gate.is_muted(call_id)),
            (None, Some(sp)) => Some(sp.gate.is_muted(call_id)),
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
        if f.kind != MediaKind::Audio {
            return None;
        }
        let camera = t.codec?;
        let line = match t.gate.admit(call_id, transcode::supported(f.codec)) {
            Admit::Closed => return None,
            Admit::Unplayable => {
                let theirs = f.codec;
                warn!(%call_id, codec = ?theirs, camera = ?camera,
                    "talkback unavailable for this call: the peer sends {theirs:?} only, which this build cannot decode for the camera's {camera:?} speaker");
                return Some(
                    json!({"event": "talkback", "state": "unavailable", "call_id": call_id,
                    "message": format!("the peer sends {theirs:?}, which this build cannot decode; the camera's speaker plays {camera:?}")}),
                );
            }
            Admit::Continue => None,
            Admit::Start => {
                t.decoder.reset();
                let converted = f.codec != camera;
                info!(%call_id, codec = ?f.codec, converted, "talkback: this call's audio goes to the camera's speaker");
                Some(
                    json!({"event": "talkback", "state": "speaking", "call_id": call_id,
                    "codec": format!("{:?}", f.codec), "speaker_codec": format!("{camera:?}")}),
                )
            }
        };
        let data: Vec<u8> = match (f.codec, camera) {
            (a, b) if a == b => f.data.to_vec(),
            (Codec::Pcmu, Codec::Pcma) => f.data.iter().map(|&u| g711::ulaw_to_alaw(u)).collect(),
            (Codec::Pcma, Codec::Pcmu) => f.data.iter().map(|&a| g711::alaw_to_ulaw(a)).collect(),
            (theirs, _) => {
                let samples = match t.decoder.decode(theirs, &f.data) {
                    Ok(s) => s,
                    Err(e) => {
                        debug!(%call_id, "talkback: a packet the decoder refused: {e}");
                        return line;
                    }
                };
                let encode = if camera == Codec::Pcma {
                    g711::linear_to_alaw
                } else {
                    g711::linear_to_ulaw
                };
                samples.iter().map(|&s| encode(s)).collect()
            }
        };
        // The camera's G.711 clock is 8 kHz; Opus's RTP clock is 48 kHz.
        let rtp_time = f.rtp_time * RATE as u64 / u64::from(f.clock_rate.max(1));
        t.queue.send(TalkbackPacket {
            data,
            rtp_time,
            restart: line.is_some() || !f.contiguous,
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
        if f.kind != MediaKind::Audio {
            return None;
        }
        let line = match sp.gate.admit(call_id, transcode::supported(f.codec)) {
            Admit::Closed => return None,
            Admit::Unplayable => {
                let theirs = f.codec;
                warn!(%call_id, codec = ?theirs,
                    "speaker: the peer sends {theirs:?} only, which this build cannot decode");
                return Some(
                    json!({"event": "speaker", "state": "unavailable", "call_id": call_id,
                    "message": format!("the peer sends {theirs:?}, which this build cannot decode")}),
                );
            }
            Admit::Continue => None,
            Admit::Start => {
                sp.decoder.reset();
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
        let samples = match sp.decoder.decode(f.codec, &f.data) {
            Ok(s) => s,
            Err(e) => {
                debug!(%call_id, "speaker: a packet the decoder refused: {e}");
                return line;
            }
        };
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

/// Hands a task's events to the driver's channel, wrapped as the driver's message, until
/// either side closes.
fn forward_events<E: Send + 'static, M: Send + 'static>(
    rx: smol::channel::Receiver<E>,
    tx: &Sender<M>,
    wrap: impl Fn(E) -> M + Send + 'static,
) {
    let tx = tx.clone();
    smol::spawn(async move {
        while let Ok(ev) = rx.recv().await {
            if tx.send(wrap(ev)).await.is_err() {
                return;
            }
        }
    })
    .detach();
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
    forward_events(ev_rx, tx, wrap);
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
    forward_events(ev_rx, tx, wrap);
    Ok(HubSpeaker {
        device: Some(speaker),
        gate: SpeakerGate::default(),
        decoder: Decoder::default(),
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
        live.talkback = Some(Talkback::new(queue));
        forward_events(ev_rx, tx, wrap_talkback);
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
    forward_events(cam_rx, tx, wrap);
    Ok((live, profile))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A station's media with a talkback queue (no task behind it) whose speaker plays
    /// `codec`, and the hub's speaker (no device behind it); the queue's receiving end.
    fn with_speakers(codec: Codec) -> (LiveMedia, smol::channel::Receiver<TalkbackPacket>) {
        let mut m = LiveMedia::new(MediaPlan::testclip(VideoChoice::Auto), None, None);
        let (tx, rx) = smol::channel::bounded(8);
        m.talkback = Some(Talkback::new(tx));
        m.speaker = Some(HubSpeaker {
            #[cfg(feature = "alsa")]
            device: None,
            gate: SpeakerGate::default(),
            decoder: Decoder::default(),
            up: true,
            samples: 0,
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

    fn samples(m: &LiveMedia) -> u64 {
        m.speaker.as_ref().map_or(0, |s| s.samples)
    }

    #[test]
    fn g711_reaches_both_speakers_the_other_law_converted_and_mute_gates_both() {
        let (mut m, rx) = with_speakers(Codec::Pcma);
        let now = Instant::now();
        // The line of the speaker that reported last (the hub's) is what comes back.
        let line = m.remote_frame(&audio("a", Codec::Pcmu, &[0xff, 0xff], 0), now);
        assert_eq!(line.unwrap()["state"], "playing");
        let p = rx.try_recv().unwrap();
        // PCMU silence (0xff) becomes PCMA silence (0xd5); a new speaker starts afresh.
        assert_eq!((p.data, p.restart), (vec![0xd5, 0xd5], true));
        assert_eq!(samples(&m), 2);
        assert_eq!(m.set_muted("a", true), Ok(()));
        assert_eq!(m.muted("a"), Some(true));
        assert!(m
            .remote_frame(&audio("a", Codec::Pcmu, &[0xff], 160), now)
            .is_none());
        assert!(rx.try_recv().is_err());
        assert_eq!(samples(&m), 2);
        let line = m.talkback_event(TalkbackEvent::Lost {
            error: RtspError::Session("reset".into()),
            retry_in: Duration::from_millis(500),
        });
        assert_eq!(line.0["state"], "lost");
        assert_eq!(m.talkback_state(), Some("down"));
    }

    #[cfg(not(feature = "opus"))]
    #[test]
    fn opus_only_is_one_unavailable_line_per_speaker() {
        let (mut m, rx) = with_speakers(Codec::Pcmu);
        m.speaker = None;
        let now = Instant::now();
        let line = m.remote_frame(&audio("a", Codec::Opus, &[0xfc, 1], 0), now);
        let line = line.unwrap();
        assert_eq!(
            (&line["event"], &line["state"], &line["call_id"]),
            (&json!("talkback"), &json!("unavailable"), &json!("a"))
        );
        assert!(m
            .remote_frame(&audio("a", Codec::Opus, &[0xfc, 1], 960), now)
            .is_none());
        assert!(rx.try_recv().is_err(), "no Opus reaches a G.711 speaker");
        let (mut m, _rx) = with_speakers(Codec::Pcmu);
        m.talkback = None;
        let line = m.remote_frame(&audio("c", Codec::Opus, &[0xfc, 1], 0), now);
        assert_eq!(line.unwrap()["event"], "speaker");
        assert_eq!(samples(&m), 0);
        let line = m.speaker_event(SpeakerEvent::Lost {
            message: "gone".into(),
        });
        assert_eq!(
            (&line["state"], &line["message"]),
            (&json!("lost"), &json!("gone"))
        );
        assert_eq!(m.speaker_state(), Some("lost"));
    }

    #[cfg(feature = "opus")]
    #[test]
    fn opus_is_decoded_for_both_speakers_and_g711_encoded_for_the_camera() {
        use crate::media::transcode::Encoder;
        let (mut m, rx) = with_speakers(Codec::Pcma);
        let now = Instant::now();
        let mut enc = Encoder::new(Codec::Opus).unwrap();
        let packet = enc.encode(&[0i16; 160]).unwrap();
        // 20 ms at 48 kHz into the call.
        let line = m.remote_frame(&audio("a", Codec::Opus, &packet, 960), now);
        assert_eq!(line.unwrap()["codec"], "Opus");
        let p = rx.try_recv().unwrap();
        // 20 ms of PCMA (silence is 0xd5 or its neighbour), on the camera's 8 kHz clock.
        assert_eq!((p.data.len(), p.rtp_time, p.restart), (160, 160, true));
        assert!(
            p.data.iter().all(|&b| b == 0xd5 || b == 0x55),
            "{:?}",
            p.data
        );
        assert_eq!(samples(&m), 160);
        // A packet libopus refuses is dropped with a log line; the call stays at the speaker.
        assert!(m
            .remote_frame(&audio("a", Codec::Opus, &[0xff, 0xff, 0xff], 1920), now)
            .is_none());
        assert!(rx.try_recv().is_err());
        assert_eq!(samples(&m), 160);
        let packet = enc.encode(&[0i16; 160]).unwrap();
        assert!(m
            .remote_frame(&audio("a", Codec::Opus, &packet, 2880), now)
            .is_none());
        assert_eq!(rx.try_recv().unwrap().rtp_time, 480);
    }

    #[test]
    fn a_station_without_talkback_cannot_mute() {
        let mut m = LiveMedia::new(MediaPlan::testclip(VideoChoice::Auto), None, None);
        assert_eq!(m.set_muted("a", true), Err(NoTalkback));
        assert_eq!(m.muted("a"), None);
        assert_eq!(m.talkback_state(), None);
    }
}
