//! The figures of README "Performance". `cargo bench -p call-assist` (shell/benches/perf.rs)
//! prints them as JSON lines. Nothing here asserts a time or a size: figures live in bench
//! output only; the tests run each function with tiny counts so it keeps working.
//!
//! - [`media_loop`]: a sender and a receiver moving synthetic 1080p H.264 with SRTP, either two
//!   `Agent`s in a connected call (the core's send path) or two bare str0m `Rtc`s, through the
//!   same loop: packets per second, heap allocations per packet, CPU per second of video.
//! - [`setup_times`]: invite -> first remote frame, and answer -> first keyframe at the callee,
//!   in the simulator at a given RTT.
//! - [`memory_over_time`]: heap in use after one minute of a simulated call and after `n`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use call_assist_core::{Agent, AgentEvent, CallPolicy, CallState, Codec, MediaKind, Output};
use serde::Serialize;
use str0m::change::SdpOffer;
use str0m::format::Codec as RtcCodec;
use str0m::media::{Direction, Frequency, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Rtc, RtcConfig};

use crate::sim::net::{Datagram, LinkProfile};
use crate::sim::world::{World, WorldConfig};

/// Heap counters, bumped by the counting allocator of the bench binary. Without that
/// allocator (tests, the `call-assist` binary) they stay at zero.
pub mod heap {
    use super::{AtomicI64, AtomicU64, Ordering};

    pub static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
    pub static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

    pub fn allocations() -> u64 {
        ALLOCATIONS.load(Ordering::Relaxed)
    }

    pub fn live_bytes() -> i64 {
        LIVE_BYTES.load(Ordering::Relaxed)
    }
}

/// `VmHWM` (peak) and `VmRSS` (now) of `/proc/<pid>/status` in kB (`pid` "self" for this one).
pub fn rss_kb(pid: &str) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

/// What the media loop times itself with: the bench binary passes this thread's CPU clock
/// (a busy machine then only slows the run, it does not change the figures); tests pass
/// [`wall_clock`].
pub type Clock = fn() -> Duration;

/// Time since the first call (monotonic wall time).
pub fn wall_clock() -> Duration {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed()
}

// ---------------------------------------------------------------- synthetic video

/// An H.264 Annex B stream shaped like a 1080p30 camera: an IDR (with SPS/PPS) every `gop`
/// frames, P-frames between. Slice bytes are random and never zero, so they hold no start
/// code; nothing on the path decodes them (str0m packetizes NAL units, it does not parse slices).
/// One GOP is made up front and replayed, so making frames costs nothing in the loop.
#[derive(Debug, Clone)]
pub struct SyntheticVideo {
    pub fps: u32,
    gop: Vec<Vec<u8>>,
    index: u64,
}

/// High profile, level 4.0, 1920x1080 (as x264 writes it).
const SPS_1080P: &[u8] = &[
    0x67, 0x64, 0x00, 0x28, 0xac, 0xd9, 0x40, 0x78, 0x02, 0x27, 0xe5, 0xc0, 0x44, 0x00, 0x00, 0x03,
    0x00, 0x04, 0x00, 0x00, 0x03, 0x00, 0xf0, 0x3c, 0x60, 0xc6, 0x58,
];
const PPS: &[u8] = &[0x68, 0xeb, 0xe3, 0xcb, 0x22, 0xc0];

impl SyntheticVideo {
    /// 1080p30, a keyframe every 2 s: 60 kB IDR, 14 kB P-frames (about 3.5 Mbit/s).
    pub fn hd1080() -> Self {
        Self::new(30, 60, 60_000, 14_000)
    }

    pub fn new(fps: u32, gop: usize, keyframe_bytes: usize, frame_bytes: usize) -> Self {
        let mut rng = fastrand::Rng::with_seed(1080);
        let gop = (0..gop.max(1))
            .map(|i| {
                let key = i == 0;
                let size = if key { keyframe_bytes } else { frame_bytes };
                let mut au = Vec::with_capacity(size + 64);
                if key {
                    for nal in [SPS_1080P, PPS] {
                        au.extend_from_slice(&[0, 0, 0, 1]);
                        au.extend_from_slice(nal);
                    }
                }
                au.extend_from_slice(&[0, 0, 0, 1, if key { 0x65 } else { 0x41 }]);
                au.extend((0..size).map(|_| rng.u8(1..=255)));
                au
            })
            .collect();
        SyntheticVideo { fps, gop, index: 0 }
    }

    pub fn bitrate_bps(&self) -> u64 {
        let gop_bytes: usize = self.gop.iter().map(Vec::len).sum();
        gop_bytes as u64 * 8 * u64::from(self.fps) / self.gop.len() as u64
    }

    pub fn frame_interval(&self) -> Duration {
        Duration::from_nanos(1_000_000_000 / u64::from(self.fps))
    }

    /// The next access unit, its 90 kHz timestamp and whether it is a keyframe.
    pub fn next_frame(&mut self) -> (&[u8], u64, bool) {
        let pos = (self.index % self.gop.len() as u64) as usize;
        let rtp = self.index * 90_000 / u64::from(self.fps);
        self.index += 1;
        (&self.gop[pos], rtp, pos == 0)
    }
}

// ---------------------------------------------------------------- two ends of a media path

/// What a receiving end saw.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Received {
    pub video_frames: u64,
    pub keyframes: u64,
    pub bytes: u64,
}

/// Whether an access unit holds an IDR slice among its first NAL units (parameter sets come
/// first and are short; scanning only the head keeps the check off the figures).
fn has_idr(au: &[u8]) -> bool {
    use call_assist_core::h264::{nal_type, nal_unit_type, split_nalus};
    split_nalus(&au[..au.len().min(64)]).any(|n| nal_unit_type(n) == Some(nal_type::IDR))
}

/// One end of a call, as the media loop drives it.
pub trait Endpoint {
    fn write_video(&mut self, now: Instant, rtp_time: u64, au: &[u8]);
    fn receive(&mut self, now: Instant, d: &Datagram);
    fn timeout(&mut self, now: Instant);
    /// Polls until the end waits: datagrams into `out`, received media into `got`.
    fn drain(&mut self, out: &mut Vec<Datagram>, got: &mut Received);
    fn deadline(&self) -> Option<Instant>;
}

/// An [`Agent`] with a connected call, taken out of a simulated world.
pub struct CoreEnd {
    agent: Agent,
    call_id: String,
    deadline: Option<Instant>,
    /// Homeserver requests asked for after the world was left behind (never answered).
    pub http_dropped: u64,
}

impl Endpoint for CoreEnd {
    fn write_video(&mut self, now: Instant, rtp_time: u64, au: &[u8]) {
        let frame = call_assist_core::OutgoingFrame {
            kind: MediaKind::Video,
            codec: Codec::H264,
            rtp_time,
            data: au,
        };
        match self.agent.write_media(&self.call_id, now, frame) {
            Ok(true) => {}
            other => panic!("write_media on a connected call: {other:?}"),
        }
    }

    fn receive(&mut self, now: Instant, d: &Datagram) {
        self.agent.handle_input(call_assist_core::Input::Receive {
            now,
            source: d.source,
            destination: d.destination,
            contents: &d.contents,
        });
    }

    fn timeout(&mut self, now: Instant) {
        self.agent
            .handle_input(call_assist_core::Input::Timeout(now));
    }

    fn drain(&mut self, out: &mut Vec<Datagram>, got: &mut Received) {
        loop {
            match self.agent.poll_output() {
                Output::Transmit(t) => out.push(Datagram {
                    source: t.source,
                    destination: t.destination,
                    contents: t.contents,
                }),
                Output::Http { .. } => self.http_dropped += 1,
                Output::Event(AgentEvent::Media(f)) if f.kind == MediaKind::Video => {
                    got.video_frames += 1;
                    got.bytes += f.data.len() as u64;
                    if has_idr(&f.data) {
                        got.keyframes += 1;
                    }
                }
                Output::Event(_) => {}
                Output::Timeout(at) => {
                    self.deadline = Some(at);
                    return;
                }
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

/// Two agents in a connected call (simulator: homeserver, ICE and DTLS), then taken out of
/// the world so nothing but the two agents runs.
pub fn core_pair(seed: u64) -> (CoreEnd, CoreEnd, Instant) {
    let mut world = World::new(WorldConfig {
        seed,
        link: LinkProfile::ideal(Duration::from_millis(5)),
        homeserver_latency: Duration::from_millis(5),
    });
    let caller = world.add_agent("caller", "alice", CallPolicy::Anyone);
    let callee = world.add_agent("callee", "bob", CallPolicy::Anyone);
    world.agent(callee).auto_answer = true;
    for i in [caller, callee] {
        world.agent(i).send_media = false;
    }
    let room = world.create_room(&[caller, callee]);
    assert!(world.run_until_synced(), "agents did not sync");
    let call_id = world.place_call(caller, &room);
    let connected = world.run_until(Duration::from_secs(30), |w| {
        w.agents[caller].reached(&call_id, CallState::Connected)
            && w.agents[callee].reached(&call_id, CallState::Connected)
    });
    assert!(connected, "the call did not connect");
    let now = world.now();
    let take = |w: &mut World| {
        let a = w.agents.pop().expect("two agents");
        CoreEnd {
            agent: a.agent,
            call_id: call_id.clone(),
            deadline: Some(now),
            http_dropped: 0,
        }
    };
    let rx = take(&mut world);
    let tx = take(&mut world);
    (tx, rx, now)
}

/// A bare str0m [`Rtc`]: what the core adds on top is everything the core costs.
pub struct BareEnd {
    rtc: Rtc,
    video: Option<Mid>,
    connected: bool,
    deadline: Option<Instant>,
}

impl BareEnd {
    fn new(now: Instant, addr: SocketAddr) -> Self {
        // The core's codec set and settings (core/src/call: rtc_config).
        let mut rtc = RtcConfig::new()
            .clear_codecs()
            .set_stats_interval(None)
            .enable_opus(true, false)
            .enable_pcmu(true, false)
            .enable_h264(true)
            .enable_vp8(true)
            .build(now);
        let c = Candidate::host(addr, "udp").expect("host candidate");
        rtc.add_local_candidate(c);
        BareEnd {
            rtc,
            video: None,
            connected: false,
            deadline: Some(now),
        }
    }
}

impl Endpoint for BareEnd {
    fn write_video(&mut self, now: Instant, rtp_time: u64, au: &[u8]) {
        let mid = self.video.expect("video mid");
        let writer = self.rtc.writer(mid).expect("video writer");
        let pt = writer
            .payload_params()
            .find(|p| {
                p.spec().codec == RtcCodec::H264 && p.spec().format.packetization_mode == Some(1)
            })
            .map(|p| p.pt())
            .expect("H.264 negotiated");
        writer
            .write(pt, now, MediaTime::new(rtp_time, Frequency::NINETY_KHZ), au)
            .expect("write");
    }

    fn receive(&mut self, now: Instant, d: &Datagram) {
        let Ok(r) = Receive::new(Protocol::Udp, d.source, d.destination, &d.contents) else {
            return;
        };
        let _ = self.rtc.handle_input(str0m::Input::Receive(now, r));
    }

    fn timeout(&mut self, now: Instant) {
        let _ = self.rtc.handle_input(str0m::Input::Timeout(now));
    }

    fn drain(&mut self, out: &mut Vec<Datagram>, got: &mut Received) {
        loop {
            match self.rtc.poll_output() {
                Ok(str0m::Output::Transmit(t)) => out.push(Datagram {
                    source: t.source,
                    destination: t.destination,
                    contents: t.contents.into(),
                }),
                Ok(str0m::Output::Timeout(at)) => {
                    self.deadline = Some(at);
                    return;
                }
                Ok(str0m::Output::Event(e)) => match e {
                    Event::Connected => self.connected = true,
                    Event::MediaAdded(m) if m.kind == MediaKind::Video => self.video = Some(m.mid),
                    Event::MediaData(d) if !d.params.spec().codec.is_audio() => {
                        got.video_frames += 1;
                        got.bytes += d.data.len() as u64;
                        if has_idr(&d.data) {
                            got.keyframes += 1;
                        }
                    }
                    _ => {}
                },
                Err(e) => panic!("bare rtc failed: {e}"),
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

/// Two bare str0m `Rtc`s with the core's codecs, negotiated (SDP offer/answer, host
/// candidates) and connected (ICE + DTLS) directly, at `now`.
pub fn bare_pair() -> (BareEnd, BareEnd, Instant) {
    let start = Instant::now();
    let a_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 5000);
    let b_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)), 5000);
    let mut a = BareEnd::new(start, a_addr);
    let mut b = BareEnd::new(start, b_addr);
    let mut change = a.rtc.sdp_api();
    change.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    let video = change.add_media(MediaKind::Video, Direction::SendRecv, None, None, None);
    let (offer, pending) = change.apply().expect("an offer");
    let offer = SdpOffer::from_sdp_string(&offer.to_sdp_string()).expect("offer parses");
    let answer = b.rtc.sdp_api().accept_offer(offer).expect("answer");
    a.rtc
        .sdp_api()
        .accept_answer(pending, answer)
        .expect("answer accepted");
    a.video = Some(video);
    b.rtc
        .add_remote_candidate(Candidate::host(a_addr, "udp").expect("candidate"));
    a.rtc
        .add_remote_candidate(Candidate::host(b_addr, "udp").expect("candidate"));
    let mut now = start;
    let mut sink = Received::default();
    for _ in 0..10_000 {
        if a.connected && b.connected && b.video.is_some() {
            return (a, b, now);
        }
        exchange(&mut a, &mut b, now, &mut sink);
        now = [a.deadline, b.deadline]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now)
            .max(now + Duration::from_millis(1));
        a.timeout(now);
        b.timeout(now);
    }
    panic!("bare str0m pair did not connect");
}

/// Drains both ends and delivers what they send to each other until both wait.
fn exchange<A: Endpoint, B: Endpoint>(a: &mut A, b: &mut B, now: Instant, got: &mut Received) {
    let mut to_b = Vec::new();
    let mut to_a = Vec::new();
    a.drain(&mut to_b, got);
    b.drain(&mut to_a, got);
    while !to_a.is_empty() || !to_b.is_empty() {
        for d in std::mem::take(&mut to_b) {
            b.receive(now, &d);
            b.drain(&mut to_a, got);
        }
        for d in std::mem::take(&mut to_a) {
            a.receive(now, &d);
            a.drain(&mut to_b, got);
        }
    }
}

// ---------------------------------------------------------------- the media loop

/// Figures of one run of [`media_loop`]. "tx" is everything the sender did (writing frames,
/// sending RTP, taking the receiver's RTCP), "rx" everything the receiver did; times by the
/// loop's [`Clock`].
#[derive(Debug, Default, Clone, Serialize)]
pub struct LoopFigures {
    pub frames: u64,
    pub video_seconds: f64,
    pub bitrate_bps: u64,
    /// RTP datagrams the sender sent (SRTP, video).
    pub rtp_packets: u64,
    /// Every datagram either side sent (RTP, RTCP, STUN).
    pub datagrams: u64,
    pub tx_ns: u64,
    pub rx_ns: u64,
    pub tx_allocations: u64,
    pub rx_allocations: u64,
    pub received: Received,
}

impl LoopFigures {
    pub fn tx_packets_per_s(&self) -> f64 {
        self.rtp_packets as f64 / (self.tx_ns.max(1) as f64 / 1e9)
    }

    pub fn loop_packets_per_s(&self) -> f64 {
        self.rtp_packets as f64 / ((self.tx_ns + self.rx_ns).max(1) as f64 / 1e9)
    }
}

fn is_rtp(d: &[u8]) -> bool {
    // Version 2, and not an RTCP packet type (200-207 in the second byte).
    d.len() >= 12 && d[0] >> 6 == 2 && !(200..=207).contains(&d[1])
}

/// One turn of one end: its timer if due, the datagrams for it, a frame to send, then a drain.
#[inline(always)]
fn section<E: Endpoint>(
    end: &mut E,
    now: Instant,
    frame: Option<(&[u8], u64)>,
    inbox: &mut Vec<Datagram>,
    out: &mut Vec<Datagram>,
    got: &mut Received,
) {
    if end.deadline().is_some_and(|d| d <= now) {
        end.timeout(now);
    }
    for d in inbox.drain(..) {
        end.receive(now, &d);
    }
    if let Some((au, rtp)) = frame {
        end.write_video(now, rtp, au);
    }
    end.drain(out, got);
}

/// The sender's turns; under callgrind the measured region of the "tx" figure.
#[inline(never)]
fn callgrind_tx_section<E: Endpoint>(
    end: &mut E,
    now: Instant,
    frame: Option<(&[u8], u64)>,
    inbox: &mut Vec<Datagram>,
    out: &mut Vec<Datagram>,
    got: &mut Received,
) {
    section(end, now, frame, inbox, out, got);
}

/// The receiver's turns; under callgrind the measured region of the "rx" figure.
#[inline(never)]
fn callgrind_rx_section<E: Endpoint>(
    end: &mut E,
    now: Instant,
    inbox: &mut Vec<Datagram>,
    out: &mut Vec<Datagram>,
    got: &mut Received,
) {
    section(end, now, None, inbox, out, got);
}

/// Sends `frames` frames of `video` from `tx` to `rx` as fast as the two can go, on a virtual
/// clock that moves one frame interval per frame (so str0m's timers see a real-time stream).
pub fn measured_loop<A: Endpoint, B: Endpoint>(
    tx: &mut A,
    rx: &mut B,
    video: &mut SyntheticVideo,
    frames: u64,
    now: &mut Instant,
    clock: Clock,
) -> LoopFigures {
    let mut fig = LoopFigures {
        frames,
        video_seconds: frames as f64 / f64::from(video.fps),
        bitrate_bps: video.bitrate_bps(),
        ..LoopFigures::default()
    };
    let mut sink = Received::default();
    let mut to_rx: Vec<Datagram> = Vec::with_capacity(128);
    let mut to_tx: Vec<Datagram> = Vec::with_capacity(128);
    for _ in 0..frames {
        let interval = video.frame_interval();
        let (au, rtp, _) = video.next_frame();
        *now += interval;
        let mut frame = Some((au, rtp));
        loop {
            let (t0, a0) = (clock(), heap::allocations());
            callgrind_tx_section(tx, *now, frame.take(), &mut to_tx, &mut to_rx, &mut sink);
            fig.tx_ns += (clock() - t0).as_nanos() as u64;
            fig.tx_allocations += heap::allocations() - a0;

            for d in &to_rx {
                fig.datagrams += 1;
                fig.rtp_packets += u64::from(is_rtp(&d.contents));
            }
            let (t0, a0) = (clock(), heap::allocations());
            callgrind_rx_section(rx, *now, &mut to_rx, &mut to_tx, &mut fig.received);
            fig.rx_ns += (clock() - t0).as_nanos() as u64;
            fig.rx_allocations += heap::allocations() - a0;
            fig.datagrams += to_tx.len() as u64;
            if to_tx.is_empty() {
                break;
            }
        }
    }
    fig
}

/// Which pair [`media_loop`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Two agents: the core's send and receive path.
    Core,
    /// Two bare str0m `Rtc`s.
    Bare,
}

/// Connects a pair, warms it up with `warmup` frames (first keyframe, RTCP under way), then
/// measures `frames` frames of synthetic 1080p.
pub fn media_loop(path: Path, warmup: u64, frames: u64, clock: Clock) -> LoopFigures {
    let mut video = SyntheticVideo::hd1080();
    match path {
        Path::Core => {
            let (mut tx, mut rx, mut now) = core_pair(7);
            measured_loop(&mut tx, &mut rx, &mut video, warmup, &mut now, clock);
            measured_loop(&mut tx, &mut rx, &mut video, frames, &mut now, clock)
        }
        Path::Bare => {
            let (mut tx, mut rx, mut now) = bare_pair();
            measured_loop(&mut tx, &mut rx, &mut video, warmup, &mut now, clock);
            measured_loop(&mut tx, &mut rx, &mut video, frames, &mut now, clock)
        }
    }
}

// ---------------------------------------------------------------- the simulator

/// Call setup in the simulator at one RTT (media path and homeserver alike).
#[derive(Debug, Clone, Serialize)]
pub struct SetupFigures {
    pub rtt_ms: u64,
    pub connected: bool,
    /// Caller's invite sent -> first remote media frame at the caller (as the demo reports).
    pub invite_to_first_frame_ms: Option<u64>,
    /// Callee answers -> first video frame at the callee, which is a keyframe (the sender's
    /// first frame always is); that is when the callee can show a picture.
    pub answer_to_keyframe_ms: Option<u64>,
}

pub fn setup_times(rtt: Duration, seed: u64) -> SetupFigures {
    let one_way = rtt / 2;
    let mut world = World::new(WorldConfig {
        seed,
        link: LinkProfile::ideal(one_way),
        homeserver_latency: one_way,
    });
    let caller = world.add_agent("caller", "alice", CallPolicy::Anyone);
    let callee = world.add_agent("callee", "bob", CallPolicy::Anyone);
    world.agent(callee).auto_answer = true;
    let room = world.create_room(&[caller, callee]);
    world.run_until_synced();
    let placed = world.elapsed();
    let call_id = world.place_call(caller, &room);
    let connected = world.run_until(Duration::from_secs(60), |w| {
        w.agents[caller].first_media.contains_key(&call_id)
            && w.trace
                .iter()
                .any(|l| l.text.starts_with("callee media Video"))
    });
    let answered = world.agents[callee]
        .events
        .iter()
        .find_map(|(at, e)| match e {
            AgentEvent::IncomingCall { call_id: c, .. } if *c == call_id => Some(*at),
            _ => None,
        });
    let keyframe_ms = world
        .trace
        .iter()
        .find(|l| l.text.starts_with("callee media Video"))
        .map(|l| l.at_ms);
    SetupFigures {
        rtt_ms: rtt.as_millis() as u64,
        connected,
        invite_to_first_frame_ms: world.agents[caller]
            .first_media
            .get(&call_id)
            .map(|t| t.saturating_sub(placed).as_millis() as u64),
        answer_to_keyframe_ms: match (answered, keyframe_ms) {
            (Some(a), Some(k)) => Some(k.saturating_sub(a.as_millis() as u64)),
            _ => None,
        },
    }
}

/// Heap in use (counting allocator) and RSS after `early` and after `late` of a simulated call.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryFigures {
    pub early_s: u64,
    pub late_s: u64,
    pub heap_bytes_early: i64,
    pub heap_bytes_late: i64,
    pub growth_bytes: i64,
    pub rss_kb_early: Option<u64>,
    pub rss_kb_late: Option<u64>,
    pub frames_received: u64,
}

/// One call (test clip and tone both ways, 20 ms one-way) kept up for `late`; heap in use is
/// read at `early` and `late` after it connected. The world's own records (trace, event list)
/// are emptied before each reading: they grow by design, the agents and the simulated
/// homeserver and network must not.
pub fn memory_over_time(early: Duration, late: Duration, seed: u64) -> MemoryFigures {
    let mut world = World::new(WorldConfig {
        seed,
        ..WorldConfig::default()
    });
    let caller = world.add_agent("caller", "alice", CallPolicy::Anyone);
    let callee = world.add_agent("callee", "bob", CallPolicy::Anyone);
    world.agent(callee).auto_answer = true;
    let room = world.create_room(&[caller, callee]);
    world.run_until_synced();
    let call_id = world.place_call(caller, &room);
    world.run_until(Duration::from_secs(30), |w| {
        w.agents[caller].reached(&call_id, CallState::Connected)
            && w.agents[callee].reached(&call_id, CallState::Connected)
    });
    let start = world.elapsed();
    let reading = |world: &mut World, at: Duration| {
        let chunk = Duration::from_secs(10);
        while world.elapsed() < start + at {
            let left = (start + at).saturating_sub(world.elapsed());
            world.run_for(left.min(chunk));
            world.trace = Vec::new();
            for a in &mut world.agents {
                a.events = Vec::new();
            }
        }
        (heap::live_bytes(), rss_kb("self").map(|(_, rss)| rss))
    };
    let (heap_early, rss_early) = reading(&mut world, early);
    let (heap_late, rss_late) = reading(&mut world, late);
    let connected = world.agents[caller].agent.call_info(&call_id).is_some();
    assert!(connected, "the call is still there");
    MemoryFigures {
        early_s: early.as_secs(),
        late_s: late.as_secs(),
        heap_bytes_early: heap_early,
        heap_bytes_late: heap_late,
        growth_bytes: heap_late - heap_early,
        rss_kb_early: rss_early,
        rss_kb_late: rss_late,
        frames_received: world.agents[callee].stats.frames_received,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // No timing or size asserts: only that each figure can still be produced.

    #[test]
    fn both_media_loops_deliver_every_frame() {
        for path in [Path::Core, Path::Bare] {
            let f = media_loop(path, 2, 3, wall_clock);
            assert_eq!(f.frames, 3);
            assert!(f.rtp_packets >= 3, "{path:?}: {f:?}");
            assert!(f.received.video_frames >= 2, "{path:?}: {f:?}");
        }
    }

    #[test]
    fn setup_figures_come_out_at_every_rtt() {
        for rtt in [10, 600] {
            let f = setup_times(Duration::from_millis(rtt), 1);
            assert!(f.connected, "{f:?}");
            assert!(f.invite_to_first_frame_ms.is_some() && f.answer_to_keyframe_ms.is_some());
        }
    }

    #[test]
    fn memory_is_read_twice() {
        let f = memory_over_time(Duration::from_secs(1), Duration::from_secs(2), 1);
        assert_eq!((f.early_s, f.late_s), (1, 2));
        assert!(f.frames_received > 0);
    }

    #[test]
    fn synthetic_keyframes_carry_an_idr() {
        let mut v = SyntheticVideo::hd1080();
        let (au, _, key) = v.next_frame();
        assert!(key && has_idr(au));
        let (au, rtp, key) = v.next_frame();
        assert!(!key && !has_idr(au) && rtp == 3000);
    }
}
