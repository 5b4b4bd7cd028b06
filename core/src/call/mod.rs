//! One 1:1 call: the m.call.* state machine around one str0m `Rtc`.
//!
//! A call never talks to the homeserver itself: it queues [`CallAction`]s (room events to send,
//! agent events to report) that the agent drains after every interaction.

pub(crate) mod dtmf;
pub(crate) use dtmf::parse_digits;
pub(crate) mod signal;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ruma::events::call::candidates::Candidate as MxCandidate;
use ruma::{OwnedRoomId, OwnedUserId, UInt};
use serde_json::json;
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::config::CryptoProvider;
use str0m::format::{CodecExtra, FormatParams, PayloadParams};
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid, Pt, TelephoneEvent};
use str0m::{Candidate, CandidateKind, Event, IceConnectionState, Rtc, RtcConfig};
use tracing::{debug, info, warn};

use crate::h264::ProfileLevelId;
use crate::limits;
use crate::types::{
    AgentEvent, ApiError, CallDirection, CallId, CallState, Codec, HangupReason, MediaFrame,
    OutgoingFrame, Party, Transmit,
};

/// The call's named timers; a log line says which fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// Send the queued local candidates.
    CandidateFlush,
    /// Our invite (or the ringing invite) runs out.
    Lifetime,
    /// ICE+DTLS must be up by now.
    IceConnect,
    /// ICE has been disconnected for too long.
    IceDisconnected,
    /// An ended call is forgotten.
    Forget,
    /// Play the next queued DTMF digit.
    DtmfSend,
    /// A received DTMF press without its end report counts as ended.
    DtmfEnd,
}

const TIMERS: [Timer; 7] = [
    Timer::CandidateFlush,
    Timer::Lifetime,
    Timer::IceConnect,
    Timer::IceDisconnected,
    Timer::Forget,
    Timer::DtmfSend,
    Timer::DtmfEnd,
];

#[derive(Debug, Default)]
struct Timers([Option<Instant>; 7]);

impl Timers {
    fn slot(t: Timer) -> usize {
        t as usize
    }
    fn set(&mut self, t: Timer, at: Instant) {
        if let Some(s) = self.0.get_mut(Self::slot(t)) {
            *s = Some(at);
        }
    }
    fn stop(&mut self, t: Timer) {
        if let Some(s) = self.0.get_mut(Self::slot(t)) {
            *s = None;
        }
    }
    fn get(&self, t: Timer) -> Option<Instant> {
        self.0.get(Self::slot(t)).copied().flatten()
    }
    fn next(&self) -> Option<Instant> {
        self.0.iter().flatten().min().copied()
    }
    /// Whether `t` is due at `now`; if so it is cleared.
    fn take_if_due(&mut self, t: Timer, now: Instant) -> bool {
        let due = self.get(t).is_some_and(|at| at <= now);
        if due {
            self.stop(t);
        }
        due
    }
}

/// What a call asks the agent to do.
#[derive(Debug)]
pub(crate) enum CallAction {
    Send {
        room_id: OwnedRoomId,
        event_type: &'static str,
        content: serde_json::Value,
    },
    Event(AgentEvent),
}

/// Settings a call needs from the agent.
#[derive(Debug, Clone)]
pub(crate) struct CallSetup {
    pub crypto: Arc<CryptoProvider>,
    pub local_addrs: Vec<std::net::SocketAddr>,
    /// Server-reflexive addresses learned so far.
    pub reflexive: Vec<crate::stun::Reflexive>,
    /// TURN relayed addresses ready so far, with the local socket each belongs to.
    pub relays: Vec<(std::net::SocketAddr, std::net::SocketAddr)>,
    /// Some TURN allocation is still under way: end-of-candidates waits for it.
    pub gathering: bool,
    /// Offer only relay candidates (no host or server-reflexive address in room history).
    pub relay_only: bool,
    pub video: bool,
    pub h264_profile: Option<crate::h264::ProfileLevelId>,
    pub audio: bool,
    /// Listed first among the audio codecs (see `AgentConfig::audio_preference`).
    pub audio_preference: Option<Codec>,
    pub lifetime: Duration,
}

#[cfg(any(test, feature = "fuzzing"))]
impl CallSetup {
    /// Audio and video on one loopback address, seeded DTLS: for tests and fuzzing.
    pub(crate) fn loopback() -> Self {
        CallSetup {
            crypto: crate::dtls::SeededDtlsProvider::crypto_provider(1),
            local_addrs: vec![std::net::SocketAddr::from(([127, 0, 0, 1], 5000))],
            reflexive: Vec::new(),
            relays: Vec::new(),
            gathering: false,
            relay_only: false,
            video: true,
            h264_profile: None,
            audio: true,
            audio_preference: None,
            lifetime: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct CallStats {
    pub frames_sent: u64,
    pub frames_received: u64,
    /// PLI/FIR sent to the peer (our own after a loss, and the driver's).
    pub keyframes_requested: u64,
}

pub(crate) struct Call {
    pub id: CallId,
    pub room_id: OwnedRoomId,
    pub direction: CallDirection,
    pub peer: OwnedUserId,
    pub our_party: String,
    /// The other side's party: the selected answerer (outbound) or the inviter (inbound).
    pub opponent_party: Option<String>,
    /// The peer speaks VoIP version 0 (no party ids, no select_answer, no reject).
    peer_v0: bool,
    pub state: CallState,
    rtc: Rtc,
    /// Our offer (invite or negotiate) waiting for its answer.
    pending_offer: Option<SdpPendingOffer>,
    /// Datagrams (the peer's ICE checks) that came before the answer to our invite.
    early_checks: u8,
    /// The answer to the ringing invite, sent when the user answers.
    prepared_answer: Option<String>,
    audio_mid: Option<Mid>,
    video_mid: Option<Mid>,
    timers: Timers,
    rtc_deadline: Option<Instant>,
    /// Local candidates not sent yet (SDP lines); `None` entry = end-of-candidates.
    local_candidates: heapless::Deque<Option<String>, { limits::MAX_LOCAL_CANDIDATES + 1 }>,
    /// Outbound: candidates per answering party, applied when that party is selected.
    early_candidates: BTreeMap<String, Vec<String>>,
    remote_candidates: usize,
    /// Addresses and kinds of the candidates on both sides, to name the pair in use.
    local_kinds: Vec<(std::net::SocketAddr, CandidateKind)>,
    remote_kinds: Vec<(std::net::SocketAddr, CandidateKind)>,
    /// The (source, destination) of the latest datagram sent while connected.
    pub last_route: Option<(std::net::SocketAddr, std::net::SocketAddr)>,
    ice_connected_once: bool,
    pub remote_video: bool,
    lifetime: Duration,
    pub stats: CallStats,
    /// When we last asked the peer for a keyframe.
    last_keyframe_request: Option<Instant>,
    /// A remote video keyframe arrived: until then, a frame that is none asks for one.
    remote_keyframe_seen: bool,
    out: VecDeque<CallAction>,
    pub ended_reason: Option<HangupReason>,
    /// The profile our H.264 source sends (chooses the payload type media goes out on).
    h264_profile: Option<ProfileLevelId>,
    /// Local candidates were gathered (trickled relays go after them).
    gathered: bool,
    sent_end_of_candidates: bool,
    /// Received telephone events, collapsed to key presses.
    dtmf_rx: dtmf::DtmfReceiver,
    /// Digits waiting to be played.
    dtmf_tx: dtmf::DtmfSender,
    /// The latest audio frame written: its payload type, RTP time and when, so DTMF tones
    /// continue the audio's own RTP timeline.
    last_audio: Option<(Pt, MediaTime, Instant)>,
    /// When the call was made: the RTP timeline of DTMF sent before any audio.
    created: Instant,
}

/// What our invites and answers say we can do (matrix-js-sdk shows its dial pad for
/// `m.call.dtmf`; we cannot be transferred).
fn capabilities() -> serde_json::Value {
    json!({"m.call.dtmf": true, "m.call.transferee": false})
}

/// Offers (and accepts) RFC 4733 telephone-event next to our audio codecs, one payload type per
/// audio clock rate: str0m adds none unless asked.
fn add_telephone_events(c: &mut str0m::format::CodecConfig) {
    for (pt, rate) in [
        (limits::DTMF_48K_PT, Frequency::FORTY_EIGHT_KHZ),
        (limits::DTMF_8K_PT, Frequency::EIGHT_KHZ),
    ] {
        c.add_config(
            pt.into(),
            None,
            str0m::format::Codec::Tele,
            rate,
            None,
            FormatParams::default(),
        );
    }
}

fn rtc_config(setup: &CallSetup) -> RtcConfig {
    let mut c = RtcConfig::new()
        .set_crypto_provider(setup.crypto.clone())
        .clear_codecs()
        .set_stats_interval(None);
    if setup.audio {
        // str0m keeps this order in offers and answers (narrowed to what the peer has), and a
        // peer sends the first codec of our list it can.
        c = match setup.audio_preference {
            Some(Codec::Pcmu) => c
                .enable_pcmu(true, false)
                .enable_pcma(true, false)
                .enable_opus(true, false),
            Some(Codec::Pcma) => c
                .enable_pcma(true, false)
                .enable_pcmu(true, false)
                .enable_opus(true, false),
            _ => c
                .enable_opus(true, false)
                .enable_pcmu(true, false)
                .enable_pcma(true, false),
        };
        add_telephone_events(c.codec_config());
    }
    if setup.video {
        if let Some(profile) = setup.h264_profile {
            // The source's own profile first, on a payload type str0m's defaults leave free;
            // the usual set stays for receiving whatever H.264 the peer sends.
            let codecs = c.codec_config();
            codecs.add_h264(
                limits::H264_SOURCE_PT.into(),
                Some(limits::H264_SOURCE_RTX_PT.into()),
                true,
                profile.0,
            );
        }
        let codecs = c.codec_config();
        let defaults: Vec<_> = {
            let mut d = str0m::format::CodecConfig::empty();
            d.enable_h264(true);
            d.params().to_vec()
        };
        for p in defaults {
            let f = p.spec().format;
            // One entry per profile family and packetization mode: str0m panics ("Pt locked
            // multiple times") when two local entries match one offered payload type.
            let same = setup.h264_profile.is_some_and(|s| {
                let theirs = f.profile_level_id.map(ProfileLevelId);
                f.packetization_mode == Some(1)
                    && (theirs == Some(s)
                        || (s.family().is_some()
                            && theirs.and_then(ProfileLevelId::family) == s.family()))
            });
            if !same {
                codecs.add_h264(
                    p.pt(),
                    p.resend(),
                    f.packetization_mode == Some(1),
                    f.profile_level_id
                        .unwrap_or(ProfileLevelId::CONSTRAINED_BASELINE_3_1.0),
                );
            }
        }
        c = c.enable_vp8(true);
    }
    c
}

/// The H.264 payload type to send on: the one naming the source's exact profile, else its
/// profile family (levels are negotiable), else any packetization-mode 1, else the first.
fn h264_send_pt<'a>(
    params: impl Iterator<Item = &'a PayloadParams>,
    profile: Option<ProfileLevelId>,
) -> Option<PayloadParams> {
    let h264: Vec<PayloadParams> = params
        .filter(|p| p.spec().codec == str0m::format::Codec::H264)
        .copied()
        .collect();
    let plid = |p: &PayloadParams| p.spec().format.profile_level_id.map(ProfileLevelId);
    let mode1 = |p: &&PayloadParams| p.spec().format.packetization_mode == Some(1);
    let exact = profile.and_then(|s| h264.iter().filter(mode1).find(|p| plid(p) == Some(s)));
    let family = profile.and_then(|s| {
        let fam = s.family()?;
        h264.iter()
            .filter(mode1)
            .find(|p| plid(p).and_then(ProfileLevelId::family) == Some(fam))
    });
    exact
        .or(family)
        .or_else(|| h264.iter().find(mode1))
        .or(h264.first())
        .copied()
}

/// The first audio and video mids of an SDP (str0m reports an offer's media only when polled).
fn sdp_mids(sdp: &str) -> (Option<Mid>, Option<Mid>) {
    let (mut audio, mut video, mut kind) = (None, None, "");
    for line in sdp.lines() {
        if let Some(m) = line.strip_prefix("m=") {
            kind = m.split(' ').next().unwrap_or("");
        } else if let Some(mid) = line.strip_prefix("a=mid:") {
            let mid = Mid::from(mid.trim());
            match kind {
                "audio" if audio.is_none() => audio = Some(mid),
                "video" if video.is_none() => video = Some(mid),
                _ => {}
            }
        }
    }
    (audio, video)
}

/// `sdp_stream_metadata` for our SDP: its msid stream marked as user media. Sent under the
/// stable key and matrix-js-sdk's `org.matrix.msc3077.` key (Element Web reads only that one).
fn stream_metadata(sdp: &str) -> serde_json::Value {
    let streams: std::collections::BTreeSet<&str> = sdp
        .lines()
        .filter_map(|l| l.strip_prefix("a=msid:"))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|s| *s != "-")
        .collect();
    let map: serde_json::Map<String, serde_json::Value> = streams
        .into_iter()
        .map(|s| {
            (
                s.to_owned(),
                json!({"purpose": "m.usermedia", "audio_muted": false, "video_muted": false}),
            )
        })
        .collect();
    serde_json::Value::Object(map)
}

fn add_stream_metadata(content: &mut serde_json::Value, sdp: &str) {
    let meta = stream_metadata(sdp);
    if let Some(obj) = content.as_object_mut() {
        obj.insert("sdp_stream_metadata".into(), meta.clone());
        obj.insert("org.matrix.msc3077.sdp_stream_metadata".into(), meta);
    }
}

fn invite_has_video(sdp: &str) -> bool {
    sdp.lines()
        .any(|l| l.starts_with("m=video") && !l.starts_with("m=video 0 "))
}

impl Call {
    fn new(
        id: CallId,
        room_id: OwnedRoomId,
        direction: CallDirection,
        peer: OwnedUserId,
        our_party: String,
        setup: &CallSetup,
        now: Instant,
    ) -> Self {
        Call {
            id,
            room_id,
            direction,
            peer,
            our_party,
            opponent_party: None,
            peer_v0: false,
            state: match direction {
                CallDirection::Outbound => CallState::InviteSent,
                CallDirection::Inbound => CallState::Ringing,
            },
            rtc: rtc_config(setup).build(now),
            pending_offer: None,
            early_checks: 0,
            prepared_answer: None,
            audio_mid: None,
            video_mid: None,
            timers: Timers::default(),
            rtc_deadline: None,
            local_candidates: heapless::Deque::new(),
            early_candidates: BTreeMap::new(),
            remote_candidates: 0,
            local_kinds: Vec::new(),
            remote_kinds: Vec::new(),
            last_route: None,
            ice_connected_once: false,
            remote_video: false,
            lifetime: setup.lifetime,
            stats: CallStats::default(),
            last_keyframe_request: None,
            remote_keyframe_seen: false,
            out: VecDeque::new(),
            ended_reason: None,
            h264_profile: setup.h264_profile,
            gathered: false,
            sent_end_of_candidates: false,
            dtmf_rx: dtmf::DtmfReceiver::default(),
            dtmf_tx: dtmf::DtmfSender::default(),
            last_audio: None,
            created: now,
        }
    }

    /// Places a call: creates the offer and queues the invite.
    pub fn outbound(
        id: CallId,
        room_id: OwnedRoomId,
        peer: OwnedUserId,
        invitee: Option<OwnedUserId>,
        our_party: String,
        setup: &CallSetup,
        now: Instant,
    ) -> Result<Self, ApiError> {
        let mut call = Call::new(
            id,
            room_id,
            CallDirection::Outbound,
            peer,
            our_party,
            setup,
            now,
        );
        // Candidates known now go into the offer (str0m writes them in the first m-section),
        // so the peer can start ICE with the invite; later ones trickle.
        call.gather(setup, now, InSdp::Yes);
        let stream = format!("ca-{}", call.id);
        let mut api = call.rtc.sdp_api();
        if setup.audio {
            call.audio_mid = Some(api.add_media(
                MediaKind::Audio,
                Direction::SendRecv,
                Some(stream.clone()),
                Some(format!("{stream}-audio")),
                None,
            ));
        }
        if setup.video {
            call.video_mid = Some(api.add_media(
                MediaKind::Video,
                Direction::SendRecv,
                Some(stream.clone()),
                Some(format!("{stream}-video")),
                None,
            ));
        }
        let (offer, pending) = api
            .apply()
            .ok_or_else(|| ApiError::Rtc("no media to offer".into()))?;
        call.pending_offer = Some(pending);
        let sdp = offer.to_sdp_string();
        let mut content = json!({
            "call_id": call.id,
            "party_id": call.our_party,
            "version": "1",
            "lifetime": setup.lifetime.as_millis() as u64,
            "offer": {"type": "offer", "sdp": sdp},
            "capabilities": capabilities(),
        });
        add_stream_metadata(&mut content, &sdp);
        if let (Some(invitee), Some(obj)) = (invitee, content.as_object_mut()) {
            obj.insert("invitee".into(), json!(invitee));
        }
        call.send("m.call.invite", content);
        call.timers.set(Timer::Lifetime, now + setup.lifetime);
        call.event(AgentEvent::CallStateChanged {
            call_id: call.id.clone(),
            state: CallState::InviteSent,
        });
        Ok(call)
    }

    /// An invite for us: prepares the answer and rings. `remaining` is what is left of its
    /// lifetime. Err carries why the invite cannot be taken (bad SDP): it is then not rung.
    #[allow(clippy::too_many_arguments)]
    pub fn inbound(
        id: CallId,
        room_id: OwnedRoomId,
        from: OwnedUserId,
        their_party: Option<String>,
        offer_sdp: &str,
        remaining: Duration,
        our_party: String,
        setup: &CallSetup,
        now: Instant,
    ) -> Result<Self, InviteRefused> {
        let offer = SdpOffer::from_sdp_string(offer_sdp)
            .map_err(|e| InviteRefused::Sdp(format!("bad offer SDP: {e}")))?;
        let mut call = Call::new(
            id,
            room_id,
            CallDirection::Inbound,
            from,
            our_party,
            setup,
            now,
        );
        call.peer_v0 = their_party.is_none();
        call.opponent_party = their_party;
        call.remote_video = invite_has_video(offer_sdp);
        (call.audio_mid, call.video_mid) = sdp_mids(offer_sdp);
        let rtc = &mut call.rtc;
        let answer = remote_sdp(|| rtc.sdp_api().accept_offer(offer)).map_err(|e| match e {
            SdpRefused::Panicked => InviteRefused::Panicked,
            e => InviteRefused::Sdp(format!("offer refused: {e}")),
        })?;
        call.prepared_answer = Some(with_our_msid(&answer.to_sdp_string(), call.id.as_str()));
        call.note_sdp_candidates(offer_sdp);
        call.timers.set(Timer::Lifetime, now + remaining);
        Ok(call)
    }

    fn send(&mut self, event_type: &'static str, content: serde_json::Value) {
        self.out.push_back(CallAction::Send {
            room_id: self.room_id.clone(),
            event_type,
            content,
        });
    }

    fn event(&mut self, e: AgentEvent) {
        self.out.push_back(CallAction::Event(e));
    }

    pub fn poll_action(&mut self) -> Option<CallAction> {
        self.out.pop_front()
    }

    /// Actions are waiting for [`Call::poll_action`].
    pub fn has_actions(&self) -> bool {
        !self.out.is_empty()
    }

    fn set_state(&mut self, state: CallState) {
        if self.state != state {
            info!(call_id = %self.id, ?state, "call state");
            self.state = state;
            self.event(AgentEvent::CallStateChanged {
                call_id: self.id.clone(),
                state,
            });
        }
    }

    fn version(&self) -> &'static str {
        if self.peer_v0 {
            "0"
        } else {
            "1"
        }
    }

    /// Adds our host, server-reflexive and relay candidates and schedules the first batch.
    /// With [`InSdp::Yes`] they are written into our offer or answer and not trickled; the
    /// SDP lines of the ones added are returned.
    fn gather(&mut self, setup: &CallSetup, now: Instant, in_sdp: InSdp) -> Vec<String> {
        let mut candidates = Vec::new();
        if !setup.relay_only {
            candidates.extend(setup.local_addrs.iter().map(|a| Candidate::host(*a, "udp")));
            candidates.extend(
                setup
                    .reflexive
                    .iter()
                    .filter(|r| r.mapped != r.local)
                    .map(|r| Candidate::server_reflexive(r.mapped, r.local, "udp")),
            );
        }
        candidates.extend(
            setup
                .relays
                .iter()
                .map(|(relay, local)| Candidate::relayed(*relay, *local, "udp")),
        );
        let mut lines = Vec::new();
        for c in candidates {
            match c {
                Ok(c) => lines.extend(self.add_local_candidate(c, in_sdp)),
                Err(e) => warn!(call_id = %self.id, "local address not usable as candidate: {e}"),
            }
        }
        self.gathered = true;
        // End-of-candidates once no TURN allocation is pending (else when it finishes).
        if !setup.gathering {
            self.end_of_candidates(now);
        }
        self.timers
            .set(Timer::CandidateFlush, now + limits::CANDIDATE_BATCH_DELAY);
        lines
    }

    /// A relay allocated after this call gathered: trickled to the peer.
    pub fn add_relay(
        &mut self,
        relay: std::net::SocketAddr,
        local: std::net::SocketAddr,
        now: Instant,
    ) {
        if !self.gathered || self.state == CallState::Ended || self.sent_end_of_candidates {
            return;
        }
        match Candidate::relayed(relay, local, "udp") {
            Ok(c) => {
                self.add_local_candidate(c, InSdp::No);
            }
            Err(e) => warn!(call_id = %self.id, "relay not usable as candidate: {e}"),
        }
        self.timers
            .set(Timer::CandidateFlush, now + limits::CANDIDATE_BATCH_DELAY);
    }

    /// Queues end-of-candidates (once per gathering).
    pub fn end_of_candidates(&mut self, now: Instant) {
        if !self.gathered || self.sent_end_of_candidates || self.state == CallState::Ended {
            return;
        }
        self.sent_end_of_candidates = true;
        if self.local_candidates.push_back(None).is_err() {
            warn!(call_id = %self.id, "no room for end-of-candidates");
        }
        self.timers
            .set(Timer::CandidateFlush, now + limits::CANDIDATE_BATCH_DELAY);
    }

    /// Hands `c` to ICE; queues it for trickling unless it goes into our SDP. Returns its
    /// SDP line (`candidate:...`) when ICE took it.
    fn add_local_candidate(&mut self, c: Candidate, in_sdp: InSdp) -> Option<String> {
        let added = self.rtc.add_local_candidate(c)?;
        self.local_kinds.push((added.addr(), added.kind()));
        let line = added.to_sdp_string();
        if in_sdp == InSdp::Yes {
            return Some(line);
        }
        // One slot stays free for end-of-candidates.
        if self.local_candidates.len() >= limits::MAX_LOCAL_CANDIDATES
            || self.local_candidates.push_back(Some(line.clone())).is_err()
        {
            warn!(call_id = %self.id, "local candidate limit reached; candidate not sent");
        }
        Some(line)
    }

    fn flush_candidates(&mut self, now: Instant) {
        let mut batch = Vec::new();
        let sdp_mid = self
            .audio_mid
            .or(self.video_mid)
            .map(|m| m.to_string())
            .unwrap_or_else(|| "0".into());
        while batch.len() < limits::MAX_CANDIDATES_PER_EVENT {
            let Some(c) = self.local_candidates.pop_front() else {
                break;
            };
            let mut cand = MxCandidate::new(c.unwrap_or_default());
            cand.sdp_mid = Some(sdp_mid.clone());
            cand.sdp_m_line_index = Some(UInt::MIN);
            batch.push(cand);
        }
        if !batch.is_empty() {
            let content = json!({
                "call_id": self.id,
                "party_id": self.our_party,
                "version": self.version(),
                "candidates": batch,
            });
            self.send("m.call.candidates", content);
        }
        if !self.local_candidates.is_empty() {
            self.timers
                .set(Timer::CandidateFlush, now + limits::CANDIDATE_BATCH_DELAY);
        }
    }

    /// The user answers a ringing call.
    pub fn answer(&mut self, setup: &CallSetup, now: Instant) -> Result<(), ApiError> {
        if self.state != CallState::Ringing {
            return Err(ApiError::WrongState {
                call_id: self.id.clone(),
                state: self.state,
            });
        }
        let sdp = self.prepared_answer.take().unwrap_or_default();
        // The answer was written when the invite rang, before we had candidates (adding them
        // then would have started ICE checks towards a caller we had not answered yet).
        let lines = self.gather(setup, now, InSdp::Yes);
        let sdp = with_candidates(&sdp, &lines);
        let mut content = json!({
            "call_id": self.id,
            "version": self.version(),
            "answer": {"type": "answer", "sdp": sdp},
        });
        if !self.peer_v0 {
            add_stream_metadata(&mut content, &sdp);
        }
        if let Some(obj) = content.as_object_mut() {
            if !self.peer_v0 {
                obj.insert("party_id".into(), json!(self.our_party));
                obj.insert("capabilities".into(), capabilities());
            }
        }
        self.send("m.call.answer", content);
        self.timers.stop(Timer::Lifetime);
        self.timers
            .set(Timer::IceConnect, now + limits::ICE_CONNECT_TIMEOUT);
        self.set_state(CallState::Connecting);
        Ok(())
    }

    /// Ends the call from our side: reject when ringing (v1), hangup otherwise.
    pub fn hangup(&mut self, reason: HangupReason, now: Instant) {
        if self.state == CallState::Ended {
            return;
        }
        if self.state == CallState::Ringing && !self.peer_v0 {
            self.send(
                "m.call.reject",
                json!({"call_id": self.id, "party_id": self.our_party, "version": "1"}),
            );
            self.end(HangupReason::Rejected, Party::Local, now);
            return;
        }
        let mut content = json!({
            "call_id": self.id,
            "version": self.version(),
            "reason": reason.as_str(),
        });
        if let Some(obj) = content.as_object_mut() {
            if !self.peer_v0 {
                obj.insert("party_id".into(), json!(self.our_party));
            }
        }
        self.send("m.call.hangup", content);
        self.end(reason, Party::Local, now);
    }

    /// Ends the call without telling anyone (the other side already knows, or never will).
    pub fn end(&mut self, reason: HangupReason, by: Party, now: Instant) {
        if self.state == CallState::Ended {
            return;
        }
        info!(call_id = %self.id, %reason, ?by, "call ended");
        self.rtc.disconnect();
        self.local_candidates.clear();
        for t in TIMERS {
            self.timers.stop(t);
        }
        self.timers
            .set(Timer::Forget, now + limits::ENDED_CALL_MEMORY);
        self.set_state(CallState::Ended);
        self.ended_reason = Some(reason.clone());
        self.event(AgentEvent::CallEnded {
            call_id: self.id.clone(),
            reason,
            by,
        });
    }

    /// str0m panicked on this call's `Rtc`: its state may be half-changed, so it is dropped
    /// for a fresh one that never saw the peer (the hangup still goes out), and the panic
    /// becomes an event.
    fn poison(&mut self, during: &'static str, now: Instant) {
        self.rtc = RtcConfig::new().build(now);
        self.pending_offer = None;
        self.event(AgentEvent::PanicCaught {
            call_id: Some(self.id.clone()),
            during,
        });
        self.hangup(HangupReason::UnknownError, now);
    }

    pub fn is_forgettable(&self, now: Instant) -> bool {
        self.state == CallState::Ended && self.timers.get(Timer::Forget).is_none_or(|t| now >= t)
    }

    /// Renegotiates (m.call.negotiate): an ICE restart keeping the same media.
    pub fn renegotiate(&mut self) -> Result<(), ApiError> {
        if !matches!(self.state, CallState::Connecting | CallState::Connected) || self.peer_v0 {
            return Err(ApiError::WrongState {
                call_id: self.id.clone(),
                state: self.state,
            });
        }
        if self.pending_offer.is_some() {
            return Err(ApiError::Rtc("a negotiation is already in progress".into()));
        }
        let mut api = self.rtc.sdp_api();
        api.ice_restart(true);
        let (offer, pending) = api
            .apply()
            .ok_or_else(|| ApiError::Rtc("nothing to renegotiate".into()))?;
        self.pending_offer = Some(pending);
        self.send_negotiate("offer", offer.to_sdp_string());
        Ok(())
    }

    fn send_negotiate(&mut self, kind: &str, sdp: String) {
        let sdp = with_our_msid(&sdp, self.id.as_str());
        let mut content = json!({
            "call_id": self.id,
            "party_id": self.our_party,
            "version": "1",
            "lifetime": self.lifetime.as_millis() as u64,
            "description": {"type": kind, "sdp": sdp},
        });
        add_stream_metadata(&mut content, &sdp);
        self.send("m.call.negotiate", content);
    }

    /// Whether a signal from `party` belongs to the other side of this call.
    fn is_opponent(&self, party: Option<&str>) -> bool {
        match (&self.opponent_party, party) {
            (Some(ours), Some(theirs)) => ours == theirs,
            (None, _) => true,
            (Some(_), None) => self.peer_v0,
        }
    }

    /// An answer from `party` (outbound calls). The first valid answer is selected.
    pub fn on_answer(&mut self, party: Option<String>, sdp: &str, now: Instant) {
        if self.state != CallState::InviteSent {
            if self.opponent_party.as_deref() != party.as_deref() {
                debug!(call_id = %self.id, "answer from another party after selection ignored");
            }
            return;
        }
        let answer = match SdpAnswer::from_sdp_string(sdp) {
            Ok(a) => a,
            Err(e) => {
                warn!(call_id = %self.id, "answer with bad SDP dropped: {e}");
                return;
            }
        };
        let Some(pending) = self.pending_offer.take() else {
            return;
        };
        let rtc = &mut self.rtc;
        match remote_sdp(|| rtc.sdp_api().accept_answer(pending, answer)) {
            Ok(()) => {}
            Err(e @ SdpRefused::Panicked) => {
                warn!(call_id = %self.id, "answer refused: {e}; ending the call");
                self.poison("answer", now);
                return;
            }
            Err(e) => {
                warn!(call_id = %self.id, "answer refused: {e}");
                self.hangup(HangupReason::UnknownError, now);
                return;
            }
        }
        // The peer had our candidates from the invite and checked them before it answered.
        // str0m keeps those binding requests until it knows the peer's credentials, then
        // answers one per ICE tick (50 ms) and checks nothing of its own before they are
        // all answered: they are answered now, not over the next half second.
        for _ in 0..std::mem::take(&mut self.early_checks) {
            if let Err(e) = self.rtc.handle_input(str0m::Input::Timeout(now)) {
                self.rtc_failed(e, now);
                return;
            }
        }
        self.rtc_deadline = Some(now);
        self.note_sdp_candidates(sdp);
        self.peer_v0 = party.is_none();
        self.remote_video = invite_has_video(sdp);
        if let Some(p) = &party {
            self.send(
                "m.call.select_answer",
                json!({"call_id": self.id, "party_id": self.our_party, "version": "1", "selected_party_id": p}),
            );
        }
        let early = party
            .as_ref()
            .and_then(|p| self.early_candidates.remove(p))
            .or_else(|| self.early_candidates.remove(""))
            .unwrap_or_default();
        self.early_candidates.clear();
        self.opponent_party = party;
        for c in early {
            self.add_remote_candidate(&c);
        }
        self.timers.stop(Timer::Lifetime);
        self.timers
            .set(Timer::IceConnect, now + limits::ICE_CONNECT_TIMEOUT);
        self.set_state(CallState::Connecting);
    }

    pub fn on_candidates(&mut self, party: Option<&str>, candidates: &[MxCandidate]) {
        if self.state == CallState::Ended {
            return;
        }
        if self.direction == CallDirection::Outbound && self.state == CallState::InviteSent {
            // Not selected yet: keep them per party.
            let list = self
                .early_candidates
                .entry(party.unwrap_or_default().to_owned())
                .or_default();
            for c in candidates {
                if list.len() < limits::MAX_BUFFERED_CANDIDATES {
                    list.push(c.candidate.clone());
                }
            }
            return;
        }
        if !self.is_opponent(party) {
            debug!(call_id = %self.id, "candidates from another party ignored");
            return;
        }
        for c in candidates {
            self.add_remote_candidate(&c.candidate);
        }
    }

    pub fn remote_candidate_count(&self) -> usize {
        self.remote_candidates
    }

    /// Kinds of the candidates written in the peer's offer or answer (str0m took the
    /// candidates themselves), for naming the pair in use.
    fn note_sdp_candidates(&mut self, sdp: &str) {
        let lines = sdp.lines().filter_map(|l| l.trim().strip_prefix("a="));
        for line in lines.filter(|l| l.starts_with("candidate:")) {
            if self.remote_kinds.len() >= limits::MAX_REMOTE_CANDIDATES {
                break;
            }
            if let Ok(c) = Candidate::from_sdp_string(line) {
                self.remote_kinds.push((c.addr(), c.kind()));
            }
        }
    }

    pub fn add_remote_candidate(&mut self, line: &str) {
        let line = line.trim();
        if line.is_empty() {
            debug!(call_id = %self.id, "remote end-of-candidates");
            return;
        }
        if self.remote_candidates >= limits::MAX_REMOTE_CANDIDATES {
            warn!(call_id = %self.id, "remote candidate limit reached; candidate dropped");
            return;
        }
        let line = line.strip_prefix("a=").unwrap_or(line);
        match Candidate::from_sdp_string(line) {
            Ok(c) => {
                self.remote_candidates += 1;
                self.remote_kinds.push((c.addr(), c.kind()));
                self.rtc.add_remote_candidate(c);
            }
            Err(e) => warn!(call_id = %self.id, "malformed remote candidate dropped: {e}"),
        }
    }

    /// select_answer from the caller (inbound calls).
    pub fn on_select_answer(&mut self, party: Option<&str>, selected: &str, now: Instant) {
        if self.direction != CallDirection::Inbound || !self.is_opponent(party) {
            return;
        }
        if selected != self.our_party {
            info!(call_id = %self.id, "another device's answer was selected");
            self.end(HangupReason::AnsweredElsewhere, Party::Remote, now);
        }
    }

    pub fn on_hangup(&mut self, party: Option<&str>, reason: HangupReason, now: Instant) {
        if self.state == CallState::Ended {
            return;
        }
        // Before selection, any device of the peer may hang up (a v0 peer has no party id).
        if self.state != CallState::InviteSent && !self.is_opponent(party) {
            debug!(call_id = %self.id, "hangup from another party ignored");
            return;
        }
        self.end(reason, Party::Remote, now);
    }

    pub fn on_reject(&mut self, party: Option<&str>, now: Instant) {
        match (self.direction, self.state) {
            (CallDirection::Outbound, CallState::InviteSent) => {
                self.end(HangupReason::Rejected, Party::Remote, now)
            }
            _ if self.is_opponent(party) && self.direction == CallDirection::Inbound => {
                self.end(HangupReason::Rejected, Party::Remote, now)
            }
            _ => debug!(call_id = %self.id, "reject ignored in state {:?}", self.state),
        }
    }

    /// Our own user's other device answered or rejected this ringing call.
    pub fn handled_elsewhere(&mut self, now: Instant) {
        if self.state == CallState::Ringing {
            self.end(HangupReason::AnsweredElsewhere, Party::Local, now);
        }
    }

    pub fn on_negotiate(&mut self, party: Option<&str>, kind: &str, sdp: &str, now: Instant) {
        if !matches!(self.state, CallState::Connecting | CallState::Connected)
            || !self.is_opponent(party)
        {
            debug!(call_id = %self.id, "negotiate ignored in state {:?}", self.state);
            return;
        }
        match kind {
            "offer" => {
                let offer = match SdpOffer::from_sdp_string(sdp) {
                    Ok(o) => o,
                    Err(e) => {
                        warn!(call_id = %self.id, "negotiate offer with bad SDP dropped: {e}");
                        return;
                    }
                };
                if self.pending_offer.is_some() {
                    // Both sides offered at once: the callee is the polite one and yields.
                    if self.direction == CallDirection::Outbound {
                        debug!(call_id = %self.id, "negotiate glare: keeping our offer");
                        return;
                    }
                    self.pending_offer = None;
                }
                let rtc = &mut self.rtc;
                match remote_sdp(|| rtc.sdp_api().accept_offer(offer)) {
                    Ok(answer) => {
                        self.send_negotiate("answer", answer.to_sdp_string());
                        self.event(AgentEvent::Renegotiated {
                            call_id: self.id.clone(),
                        });
                    }
                    Err(e @ SdpRefused::Panicked) => {
                        warn!(call_id = %self.id, "negotiate offer refused: {e}; ending the call");
                        self.poison("negotiate_offer", now);
                    }
                    Err(e) => warn!(call_id = %self.id, "negotiate offer refused: {e}"),
                }
            }
            "answer" => {
                let Some(pending) = self.pending_offer.take() else {
                    debug!(call_id = %self.id, "negotiate answer without our offer ignored");
                    return;
                };
                let answer = match SdpAnswer::from_sdp_string(sdp) {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(call_id = %self.id, "negotiate answer with bad SDP dropped: {e}");
                        self.pending_offer = Some(pending);
                        return;
                    }
                };
                let rtc = &mut self.rtc;
                match remote_sdp(|| rtc.sdp_api().accept_answer(pending, answer)) {
                    Ok(()) => self.event(AgentEvent::Renegotiated {
                        call_id: self.id.clone(),
                    }),
                    Err(e @ SdpRefused::Panicked) => {
                        warn!(call_id = %self.id, "negotiate answer refused: {e}; ending the call");
                        self.poison("negotiate_answer", now);
                    }
                    Err(e) => warn!(call_id = %self.id, "negotiate answer refused: {e}"),
                }
            }
            other => warn!(call_id = %self.id, "negotiate with unknown type {other:?} dropped"),
        }
    }

    pub fn accepts(&self, input: &str0m::Input) -> bool {
        self.state != CallState::Ended && self.rtc.accepts(input)
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let rtc = if self.state == CallState::Ended {
            None
        } else {
            self.rtc_deadline
        };
        match (self.timers.next(), rtc) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        // Each timer fires at most once per input, so a timer re-armed for `now` can never
        // spin inside the core.
        for t in TIMERS {
            if !self.timers.take_if_due(t, now) {
                continue;
            }
            debug!(call_id = %self.id, timer = ?t, "call timer fired");
            match t {
                Timer::CandidateFlush => self.flush_candidates(now),
                Timer::Lifetime => match self.direction {
                    CallDirection::Outbound => self.hangup(HangupReason::InviteTimeout, now),
                    CallDirection::Inbound => {
                        self.end(HangupReason::InviteTimeout, Party::Remote, now)
                    }
                },
                Timer::IceConnect => {
                    if self.state == CallState::Connecting {
                        warn!(call_id = %self.id, "no media connection in {:?}", limits::ICE_CONNECT_TIMEOUT);
                        self.hangup(HangupReason::IceFailed, now);
                    }
                }
                Timer::IceDisconnected => {
                    warn!(call_id = %self.id, "ICE disconnected for {:?}", limits::ICE_DISCONNECTED_TIMEOUT);
                    self.hangup(HangupReason::IceTimeout, now);
                }
                // Cleared above: the agent now drops the call (`is_forgettable`).
                Timer::Forget => {}
                Timer::DtmfSend => self.play_next_digit(now),
                Timer::DtmfEnd => {
                    if let Some(press) = self.dtmf_rx.handle_timeout(now) {
                        debug!(call_id = %self.id, "DTMF press without end report");
                        self.report_press(press);
                    }
                    self.sync_dtmf_end_timer();
                }
            }
        }
        if self.state != CallState::Ended && self.rtc_deadline.is_some_and(|d| d <= now) {
            self.rtc_deadline = None;
            if let Err(e) = self.rtc.handle_input(str0m::Input::Timeout(now)) {
                self.rtc_failed(e, now);
            }
        }
    }

    pub fn handle_receive(&mut self, now: Instant, input: str0m::Input) {
        if self.state == CallState::InviteSent {
            self.early_checks = self.early_checks.saturating_add(1);
        }
        if let Err(e) = self.rtc.handle_input(input) {
            debug!(call_id = %self.id, "datagram refused by rtc: {e}");
        }
        self.rtc_deadline = Some(now);
    }

    fn rtc_failed(&mut self, e: str0m::RtcError, now: Instant) {
        warn!(call_id = %self.id, "rtc failed: {e}");
        self.hangup(HangupReason::UnknownError, now);
    }

    /// Drains str0m: the next datagram to send, handling its events on the way.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if self.state == CallState::Ended && !self.rtc.is_alive() {
            return None;
        }
        loop {
            match self.rtc.poll_output() {
                Ok(str0m::Output::Transmit(t)) => {
                    if self.state == CallState::Connected {
                        self.last_route = Some((t.source, t.destination));
                    }
                    return Some(Transmit {
                        source: t.source,
                        destination: t.destination,
                        contents: t.contents.into(),
                    });
                }
                Ok(str0m::Output::Timeout(t)) => {
                    self.rtc_deadline = Some(t);
                    return None;
                }
                Ok(str0m::Output::Event(e)) => self.on_rtc_event(e, now),
                Err(e) => {
                    self.rtc_deadline = None;
                    self.rtc_failed(e, now);
                    return None;
                }
            }
        }
    }

    fn on_rtc_event(&mut self, e: Event, now: Instant) {
        match e {
            Event::IceConnectionStateChange(s) => {
                debug!(call_id = %self.id, ice = ?s, "ice state");
                match s {
                    IceConnectionState::Connected | IceConnectionState::Completed => {
                        self.ice_connected_once = true;
                        self.timers.stop(Timer::IceDisconnected);
                    }
                    IceConnectionState::Disconnected
                        if self.ice_connected_once
                            && self.timers.get(Timer::IceDisconnected).is_none() =>
                    {
                        self.timers.set(
                            Timer::IceDisconnected,
                            now + limits::ICE_DISCONNECTED_TIMEOUT,
                        );
                    }
                    _ => {}
                }
            }
            Event::Connected if self.state == CallState::Connecting => {
                self.timers.stop(Timer::IceConnect);
                self.set_state(CallState::Connected);
            }
            Event::MediaAdded(m) => match m.kind {
                MediaKind::Audio if self.audio_mid.is_none() => self.audio_mid = Some(m.mid),
                MediaKind::Video if self.video_mid.is_none() => self.video_mid = Some(m.mid),
                _ => {}
            },
            Event::MediaData(d) if d.params.spec().codec.is_tele() => {
                if let CodecExtra::Tele(t) = d.codec_extra {
                    self.on_telephone_event(d.time.numer(), t, now);
                }
            }
            Event::MediaData(d) => {
                self.stats.frames_received += 1;
                let spec = d.params.spec();
                let kind = if spec.codec.is_audio() {
                    MediaKind::Audio
                } else {
                    MediaKind::Video
                };
                if kind == MediaKind::Video {
                    // A decoder (or recorder) cannot use what follows a loss, nor a first
                    // frame that is no keyframe: ask for one, as browsers do.
                    let keyframe = d.is_keyframe();
                    let why = if !d.contiguous {
                        Some("loss")
                    } else if !keyframe && !self.remote_keyframe_seen {
                        Some("no keyframe yet")
                    } else {
                        None
                    };
                    self.remote_keyframe_seen |= keyframe;
                    if let Some(why) = why {
                        if self.request_keyframe(now) {
                            debug!(call_id = %self.id, why, "asked the peer for a keyframe");
                        }
                    }
                }
                self.event(AgentEvent::Media(MediaFrame {
                    call_id: self.id.clone(),
                    kind,
                    codec: Codec::from_str0m(spec.codec),
                    rtp_time: d.time.numer(),
                    clock_rate: d.time.denom(),
                    contiguous: d.contiguous,
                    data: d.data,
                }));
            }
            Event::KeyframeRequest(_) => self.event(AgentEvent::KeyframeRequested {
                call_id: self.id.clone(),
            }),
            Event::Closed => debug!(call_id = %self.id, "rtc closed"),
            _ => {}
        }
    }

    /// Asks the peer for a video keyframe (PLI, or FIR when only that was negotiated), at most
    /// once per [`limits::KEYFRAME_REQUEST_INTERVAL`]. True when a request went out.
    pub fn request_keyframe(&mut self, now: Instant) -> bool {
        if self.state != CallState::Connected {
            return false;
        }
        if self
            .last_keyframe_request
            .is_some_and(|t| now.saturating_duration_since(t) < limits::KEYFRAME_REQUEST_INTERVAL)
        {
            return false;
        }
        let Some(mid) = self.video_mid else {
            return false;
        };
        let Some(mut writer) = self.rtc.writer(mid) else {
            return false;
        };
        use str0m::media::KeyframeRequestKind as K;
        let Some(kind) = [K::Pli, K::Fir]
            .into_iter()
            .find(|k| writer.is_request_keyframe_possible(*k))
        else {
            return false;
        };
        match writer.request_keyframe(None, kind) {
            Ok(()) => {
                self.last_keyframe_request = Some(now);
                self.stats.keyframes_requested += 1;
                self.rtc_deadline = Some(now);
                true
            }
            Err(e) => {
                debug!(call_id = %self.id, "keyframe request refused: {e}");
                false
            }
        }
    }

    /// Writes one frame of local media. `Ok(false)`: not connected yet, frame dropped.
    pub fn write_media(&mut self, now: Instant, frame: OutgoingFrame) -> Result<bool, ApiError> {
        if self.state != CallState::Connected {
            return Ok(false);
        }
        let mid = match frame.kind {
            MediaKind::Audio => self.audio_mid,
            MediaKind::Video => self.video_mid,
        }
        .ok_or(ApiError::NoSuchMedia)?;
        let wanted = frame.codec.to_str0m().ok_or(ApiError::NoSuchMedia)?;
        let writer = self.rtc.writer(mid).ok_or(ApiError::NoSuchMedia)?;
        let params = if wanted == str0m::format::Codec::H264 {
            h264_send_pt(writer.payload_params(), self.h264_profile)
        } else {
            writer
                .payload_params()
                .find(|p| p.spec().codec == wanted)
                .copied()
        }
        .ok_or(ApiError::NoSuchMedia)?;
        let freq = params.spec().clock_rate;
        let rtp_time = MediaTime::new(frame.rtp_time, freq);
        writer
            .write(params.pt(), now, rtp_time, frame.data)
            .map_err(|e| ApiError::Rtc(e.to_string()))?;
        if frame.kind == MediaKind::Audio {
            self.last_audio = Some((params.pt(), rtp_time, now));
        }
        self.stats.frames_sent += 1;
        self.rtc_deadline = Some(now);
        Ok(true)
    }

    /// Queues DTMF digits (event codes) to play one after another, each a
    /// [`limits::DTMF_TONE`] tone and a [`limits::DTMF_GAP`] pause.
    pub fn send_dtmf(&mut self, codes: &[u8], now: Instant) -> Result<(), ApiError> {
        if self.state != CallState::Connected {
            return Err(ApiError::WrongState {
                call_id: self.id.clone(),
                state: self.state,
            });
        }
        if self.dtmf_audio_pt().is_none() {
            return Err(ApiError::Dtmf(crate::types::DtmfError::NotNegotiated));
        }
        self.dtmf_tx.queue(codes).map_err(ApiError::Dtmf)?;
        // A running timer already keeps the pause after the previous digit.
        if self.timers.get(Timer::DtmfSend).is_none() {
            self.timers.set(Timer::DtmfSend, now);
        }
        Ok(())
    }

    /// The audio payload type (and its clock) to send tones with: the one audio goes out on if
    /// it has a telephone-event at its clock rate, else the first that has.
    fn dtmf_audio_pt(&mut self) -> Option<(Pt, Frequency)> {
        let mid = self.audio_mid?;
        let params: Vec<PayloadParams> = self.rtc.writer(mid)?.payload_params().copied().collect();
        let has_tele = |rate: Frequency| {
            params
                .iter()
                .any(|p| p.spec().codec.is_tele() && p.spec().clock_rate == rate)
        };
        let usable: Vec<&PayloadParams> = params
            .iter()
            .filter(|p| p.spec().codec.is_audio() && has_tele(p.spec().clock_rate))
            .collect();
        let current = self.last_audio.map(|(pt, _, _)| pt);
        usable
            .iter()
            .find(|p| Some(p.pt()) == current)
            .or(usable.first())
            .map(|p| (p.pt(), p.spec().clock_rate))
    }

    /// Plays the next queued digit (the timer keeps them apart); a digit str0m refuses is
    /// logged and skipped, the rest still play.
    fn play_next_digit(&mut self, now: Instant) {
        if self.state != CallState::Connected {
            return;
        }
        let Some(code) = self.dtmf_tx.next() else {
            return;
        };
        self.timers
            .set(Timer::DtmfSend, now + limits::DTMF_TONE + limits::DTMF_GAP);
        let (Some(mid), Some((pt, rate))) = (self.audio_mid, self.dtmf_audio_pt()) else {
            warn!(call_id = %self.id, "DTMF digit dropped: no telephone-event negotiated");
            return;
        };
        let rtp_time = match self.last_audio {
            Some((last_pt, t, at)) if last_pt == pt => {
                let since = now.saturating_duration_since(at);
                MediaTime::new(t.numer(), rate) + MediaTime::from(since).rebase(rate)
            }
            _ => MediaTime::from(now.saturating_duration_since(self.created)).rebase(rate),
        };
        let event = TelephoneEvent {
            event: code,
            end: true,
            volume: limits::DTMF_VOLUME,
            duration: limits::DTMF_TONE,
        };
        let Some(writer) = self.rtc.writer(mid) else {
            return;
        };
        match writer
            .telephone_event(event)
            .write(pt, now, rtp_time, Vec::new())
        {
            Ok(()) => {
                debug!(call_id = %self.id, "DTMF digit sent");
                self.rtc_deadline = Some(now);
            }
            Err(e) => warn!(call_id = %self.id, "DTMF digit refused by rtc: {e}"),
        }
    }

    /// One received RFC 4733 report: a press it completes becomes [`AgentEvent::Dtmf`].
    fn on_telephone_event(&mut self, rtp_time: u64, t: TelephoneEvent, now: Instant) {
        let report = dtmf::Report {
            rtp_time,
            code: t.event,
            end: t.end,
            duration: t.duration,
        };
        for press in self.dtmf_rx.on_report(report, now) {
            self.report_press(press);
        }
        self.sync_dtmf_end_timer();
    }

    fn report_press(&mut self, press: dtmf::Press) {
        // Not the digit: it may be part of a PIN.
        debug!(call_id = %self.id, "DTMF press");
        self.event(AgentEvent::Dtmf {
            call_id: self.id.clone(),
            digit: press.digit,
            duration_ms: u64::try_from(press.duration.as_millis()).unwrap_or(u64::MAX),
        });
    }

    fn sync_dtmf_end_timer(&mut self) {
        match self.dtmf_rx.deadline() {
            Some(at) => self.timers.set(Timer::DtmfEnd, at),
            None => self.timers.stop(Timer::DtmfEnd),
        }
    }

    /// Kinds (`host`, `srflx`, `relay`, `prflx`) of the local and remote candidate of the pair
    /// media is sent on; an address we were never told about is peer-reflexive.
    pub fn selected_pair_kinds(&self) -> Option<(String, String)> {
        let (src, dst) = self.last_route?;
        let kind = |list: &[(std::net::SocketAddr, CandidateKind)], a| {
            list.iter()
                .find(|(addr, _)| *addr == a)
                .map_or("prflx".to_owned(), |(_, k)| k.to_string())
        };
        Some((kind(&self.local_kinds, src), kind(&self.remote_kinds, dst)))
    }

    /// The codecs negotiated for sending, for the driver to pick a source format.
    pub fn send_codecs(&mut self, kind: MediaKind) -> Vec<Codec> {
        let mid = match kind {
            MediaKind::Audio => self.audio_mid,
            MediaKind::Video => self.video_mid,
        };
        let Some(mid) = mid else { return Vec::new() };
        let Some(writer) = self.rtc.writer(mid) else {
            return Vec::new();
        };
        writer
            .payload_params()
            .map(|p| Codec::from_str0m(p.spec().codec))
            .collect()
    }
}

/// Why an invite could not become a call.
#[derive(Debug)]
pub(crate) enum InviteRefused {
    /// Its offer is unusable (unparsable, or str0m said no).
    Sdp(String),
    /// str0m panicked on its offer.
    Panicked,
}

impl std::fmt::Display for InviteRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InviteRefused::Sdp(e) => f.write_str(e),
            InviteRefused::Panicked => f.write_str("str0m panicked on the offer"),
        }
    }
}

/// Why str0m did not take a peer's SDP.
#[derive(Debug)]
enum SdpRefused {
    /// str0m said no (incompatible offer, answer to another offer, ...).
    Rtc(str0m::RtcError),
    /// str0m panicked on it. Its state may be half-changed, so the call cannot go on.
    Panicked,
}

impl std::fmt::Display for SdpRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SdpRefused::Rtc(e) => write!(f, "{e}"),
            SdpRefused::Panicked => f.write_str("str0m panicked on the peer's SDP"),
        }
    }
}

/// Hands a remote peer's SDP to str0m. SDP is the one input of a peer that str0m interprets
/// in depth, through code with many internal assertions; a panic there would take every call
/// of the process with it, so it is caught here and costs only this call (release builds
/// unwind, see the workspace's `[profile.release]`).
fn remote_sdp<T>(f: impl FnOnce() -> Result<T, str0m::RtcError>) -> Result<T, SdpRefused> {
    #[cfg(test)]
    let f = || {
        if tests::PANIC_NEXT_SDP.with(|p| p.replace(false)) {
            panic!("injected: str0m panics on this SDP");
        }
        f()
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(SdpRefused::Rtc),
        Err(_) => Err(SdpRefused::Panicked),
    }
}

/// Whether candidates gathered now are written into our SDP or trickled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InSdp {
    Yes,
    No,
}

/// `sdp` (ours) with our own media stream, `ca-<call id>`, in every msid: str0m answers with
/// the offerer's msid stream and track ids (it builds answering media from the offer's lines),
/// and matrix-js-sdk then takes our stream for its own and shows no remote feed (Element
/// calling the hub saw and heard nothing). By hand: str0m has no way to set an answer's msid.
fn with_our_msid(sdp: &str, call_id: &str) -> String {
    let stream = format!("ca-{call_id}");
    let mut out = String::with_capacity(sdp.len() + 64);
    let mut kind = "media";
    for l in sdp.split_inclusive('\n') {
        let body = l.trim_end_matches(['\r', '\n']);
        let end = &l[body.len()..];
        if let Some(m) = body.strip_prefix("m=") {
            kind = m.split(' ').next().unwrap_or("media");
        }
        let track = format!("{stream}-{kind}");
        if body.starts_with("a=msid-semantic:") {
            out.push_str("a=msid-semantic: WMS ");
            out.push_str(&stream);
        } else if let Some(old) = body.strip_prefix("a=msid:") {
            if old.starts_with("- ") || old == "-" {
                out.push_str(body);
            } else {
                out.push_str("a=msid:");
                out.push_str(&stream);
                out.push(' ');
                out.push_str(&track);
            }
        } else if let Some((ssrc, _)) = body
            .strip_prefix("a=ssrc:")
            .and_then(|r| r.split_once(" msid:"))
        {
            out.push_str("a=ssrc:");
            out.push_str(ssrc);
            out.push_str(" msid:");
            out.push_str(&stream);
            out.push(' ');
            out.push_str(&track);
        } else {
            out.push_str(body);
        }
        out.push_str(end);
    }
    out
}

/// `sdp` with `a=<line>` added at the end of its first m-section, where str0m writes the
/// candidates of the SDP it builds itself. By hand: str0m's `SdpAnswer` cannot be changed
/// once written, and ours is written when the invite rings.
fn with_candidates(sdp: &str, lines: &[String]) -> String {
    let nl = if sdp.contains("\r\n") { "\r\n" } else { "\n" };
    let extra: usize = lines.iter().map(|l| l.len() + 4).sum();
    let mut out = String::with_capacity(sdp.len() + extra);
    let push = |out: &mut String| {
        for l in lines {
            out.push_str("a=");
            out.push_str(l);
            out.push_str(nl);
        }
    };
    let mut sections = 0;
    let mut added = lines.is_empty();
    for l in sdp.split_inclusive('\n') {
        if l.starts_with("m=") {
            sections += 1;
            if sections == 2 && !added {
                push(&mut out);
                added = true;
            }
        }
        out.push_str(l);
    }
    if !added {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push_str(nl);
        }
        push(&mut out);
    }
    out
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // a real Instant as the tests' time base
mod tests {
    use super::*;

    thread_local! {
        /// The next SDP handed to str0m panics (a stand-in for a str0m bug).
        pub(super) static PANIC_NEXT_SDP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    fn setup() -> CallSetup {
        CallSetup::loopback()
    }

    #[test]
    fn candidates_go_at_the_end_of_the_first_m_section() {
        let sdp = "v=0\r\ns=-\r\nm=audio 9 UDP 111\r\na=mid:0\r\nm=video 9 UDP 96\r\na=mid:1\r\n";
        let lines = vec!["candidate:1 1 udp 2 127.0.0.1 5000 typ host".to_owned()];
        assert_eq!(
            with_candidates(sdp, &lines),
            "v=0\r\ns=-\r\nm=audio 9 UDP 111\r\na=mid:0\r\n\
             a=candidate:1 1 udp 2 127.0.0.1 5000 typ host\r\n\
             m=video 9 UDP 96\r\na=mid:1\r\n"
        );
        let one = "v=0\r\nm=audio 9 UDP 111\r\na=mid:0";
        assert!(with_candidates(one, &lines)
            .ends_with("a=mid:0\r\na=candidate:1 1 udp 2 127.0.0.1 5000 typ host\r\n"));
        assert_eq!(with_candidates(sdp, &[]), sdp);
    }

    /// An answer names our stream, not the offerer's: with the offerer's own stream id in
    /// our msid, matrix-js-sdk took our media for its own and showed no remote feed.
    #[test]
    fn answers_carry_our_own_msid_not_the_offerers() {
        let setup = CallSetup::loopback();
        let mut theirs = rtc_config(&setup).build(Instant::now());
        let mut api = theirs.sdp_api();
        for kind in [MediaKind::Audio, MediaKind::Video] {
            let track = format!("browser-{kind}");
            api.add_media(
                kind,
                Direction::SendRecv,
                Some("browser".into()),
                Some(track),
                None,
            );
        }
        let (offer, _) = api.apply().unwrap();
        let offer_sdp = offer.to_sdp_string();
        assert!(offer_sdp.contains("a=msid:browser browser-"), "{offer_sdp}");
        let call = Call::inbound(
            "c1".into(),
            OwnedRoomId::try_from("!r:h").unwrap(),
            OwnedUserId::try_from("@p:h").unwrap(),
            Some("them".into()),
            &offer_sdp,
            Duration::from_secs(60),
            "us".into(),
            &setup,
            Instant::now(),
        )
        .unwrap();
        let answer = call.prepared_answer.clone().unwrap();
        assert!(!answer.contains("browser"), "{answer}");
        assert!(answer.contains("a=msid:ca-c1 ca-c1-audio\r\n"), "{answer}");
        assert!(answer.contains("a=msid:ca-c1 ca-c1-video\r\n"), "{answer}");
        assert_eq!(
            stream_metadata(&answer),
            json!({"ca-c1": {"purpose": "m.usermedia", "audio_muted": false, "video_muted": false}})
        );
        // Lines without a stream, and the rest of the SDP, stay as they are.
        let plain = "v=0\r\nm=audio 9 UDP 0\r\na=msid:- t\r\na=ssrc:1 cname:x\r\n";
        assert_eq!(with_our_msid(plain, "c1"), plain);
        assert_eq!(
            with_our_msid("m=video 9 UDP 96\na=ssrc:7 msid:b t\n", "c1"),
            "m=video 9 UDP 96\na=ssrc:7 msid:ca-c1 ca-c1-video\n"
        );
    }

    fn inbound(now: Instant) -> Result<Call, InviteRefused> {
        Call::inbound(
            "c1".into(),
            OwnedRoomId::try_from("!r:h").unwrap(),
            OwnedUserId::try_from("@p:h").unwrap(),
            Some("theirs".into()),
            &offer(None),
            Duration::from_secs(30),
            "ours".into(),
            &setup(),
            now,
        )
    }

    #[test]
    fn a_panic_on_an_invite_refuses_it_as_a_panic() {
        let now = Instant::now();
        assert!(inbound(now).is_ok());
        PANIC_NEXT_SDP.with(|p| p.set(true));
        assert!(matches!(inbound(now), Err(InviteRefused::Panicked)));
    }

    #[test]
    fn a_panic_mid_call_drops_the_rtc_ends_the_call_and_is_an_event() {
        let now = Instant::now();
        let mut call = inbound(now).unwrap();
        call.answer(&setup(), now).unwrap();
        while call.poll_action().is_some() {}
        PANIC_NEXT_SDP.with(|p| p.set(true));
        call.on_negotiate(Some("theirs"), "offer", &offer(None), now);
        let actions: Vec<CallAction> = std::iter::from_fn(|| call.poll_action()).collect();
        let panic = actions.iter().any(|a| {
            matches!(
                a,
                CallAction::Event(AgentEvent::PanicCaught {
                    during: "negotiate_offer",
                    ..
                })
            )
        });
        assert!(panic, "{actions:?}");
        let hangup = actions.iter().any(|a| {
            matches!(a, CallAction::Send { event_type: "m.call.hangup", content, .. }
                if content["reason"] == "unknown_error")
        });
        assert!(hangup, "{actions:?}");
        assert_eq!(call.state, CallState::Ended);
        // The fresh Rtc has no media: the old one is gone.
        assert!(call
            .rtc
            .media(call.video_mid.unwrap_or(Mid::from("0")))
            .is_none());
    }

    #[test]
    fn a_panic_in_str0m_on_remote_sdp_costs_only_that_sdp() {
        let r: Result<(), SdpRefused> = remote_sdp(|| panic!("a str0m bug"));
        assert!(matches!(r, Err(SdpRefused::Panicked)), "{r:?}");
        assert!(matches!(remote_sdp(|| Ok::<_, str0m::RtcError>(5)), Ok(5)));
    }

    fn offer(profile: Option<ProfileLevelId>) -> String {
        let setup = CallSetup {
            h264_profile: profile,
            audio: false,
            ..CallSetup::loopback()
        };
        let mut rtc = rtc_config(&setup).build(Instant::now());
        let mut api = rtc.sdp_api();
        api.add_media(MediaKind::Video, Direction::SendRecv, None, None, None);
        let (offer, _) = api.apply().unwrap();
        offer.to_sdp_string()
    }

    /// Audio codec names of an SDP's first audio m-line, in its order.
    fn audio_codecs(sdp: &str) -> Vec<String> {
        let m = sdp.lines().find(|l| l.starts_with("m=audio")).unwrap_or("");
        m.split(' ')
            .skip(3)
            .filter_map(|pt| {
                let map = format!("a=rtpmap:{pt} ");
                let line = sdp.lines().find(|l| l.starts_with(&map))?;
                Some(line.get(map.len()..)?.split('/').next()?.to_owned())
            })
            .filter(|c| c != "telephone-event")
            .collect()
    }

    fn audio_offer(preference: Option<Codec>) -> String {
        let setup = CallSetup {
            video: false,
            audio_preference: preference,
            ..CallSetup::loopback()
        };
        let mut rtc = rtc_config(&setup).build(Instant::now());
        let mut api = rtc.sdp_api();
        api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        let (offer, _) = api.apply().unwrap();
        offer.to_sdp_string()
    }

    #[test]
    fn a_g711_preference_puts_it_first_in_offers_and_answers() {
        assert_eq!(audio_codecs(&audio_offer(None)), ["opus", "PCMU", "PCMA"]);
        assert_eq!(
            audio_codecs(&audio_offer(Some(Codec::Pcmu))),
            ["PCMU", "PCMA", "opus"]
        );
        assert_eq!(
            audio_codecs(&audio_offer(Some(Codec::Pcma))),
            ["PCMA", "PCMU", "opus"]
        );
        // Answering a browser-like offer (Opus first): our preference leads the answer, so
        // the peer sends G.711.
        let theirs = audio_offer(None);
        for (pref, first) in [(None, "opus"), (Some(Codec::Pcma), "PCMA")] {
            let setup = CallSetup {
                video: false,
                audio_preference: pref,
                ..CallSetup::loopback()
            };
            let mut rtc = rtc_config(&setup).build(Instant::now());
            let offer = str0m::change::SdpOffer::from_sdp_string(&theirs).unwrap();
            let answer = rtc.sdp_api().accept_offer(offer).unwrap().to_sdp_string();
            assert_eq!(audio_codecs(&answer)[0], first, "{answer}");
        }
    }

    #[test]
    fn the_source_profile_is_offered_first_once_per_family() {
        let sdp = offer(Some(ProfileLevelId(0x640016)));
        let m = sdp.lines().find(|l| l.starts_with("m=video")).unwrap();
        let pts: Vec<&str> = m.split(' ').skip(3).collect();
        assert_eq!(pts[0], limits::H264_SOURCE_PT.to_string());
        assert!(sdp.contains("profile-level-id=640016"), "{sdp}");
        // The default High entry (64001f, mode 1) would make two of one family: left out.
        assert!(!sdp.contains("profile-level-id=64001f;"), "{sdp}");
        assert!(sdp.contains("profile-level-id=42e01f"), "{sdp}");
        assert!(sdp.contains("VP8/90000"), "{sdp}");
        // Without a source profile: str0m's usual set.
        let plain = offer(None);
        assert!(plain.contains("profile-level-id=64001f"), "{plain}");
        assert!(!plain.contains("profile-level-id=640016"), "{plain}");
    }
}
