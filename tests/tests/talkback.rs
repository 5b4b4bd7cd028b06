//! Talkback on the simulator: a call's audio crosses a lossy simulated link into the camera
//! speaker's gate (the live shell's `LiveMedia`, as `serve` runs it), whose backchannel is
//! scripted here: up at first, dropped mid-call, back a few seconds later. All on the
//! simulator's virtual clock, so each seed replays exactly.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use call_assist::media::backchannel::{TalkbackEvent, TalkbackPacket};
use call_assist::media::g711;
use call_assist::media::live::{LiveMedia, Talkback};
use call_assist::media::pump::{MediaPlan, VideoChoice};
use call_assist::media::rtsp::RtspError;
use call_assist_core::Codec;
use call_assist_tests::live::tone_share;
use call_assist_tests::*;
use serde_json::Value;

/// When the scripted backchannel drops, and when it is back (simulated time since start).
const DROP_AT: Duration = Duration::from_secs(6);
const BACK_AT: Duration = Duration::from_secs(9);

/// What the camera's speaker got, and the lines the hub printed, each at its simulated time.
#[derive(Default)]
struct Door {
    packets: Vec<(Duration, TalkbackPacket)>,
    lines: Vec<(Duration, Value)>,
}

/// Alice calls Bob over a link with 50 ms one-way latency and `loss`; Bob's station has
/// talkback, its camera's speaker takes PCMU, and its backchannel drops at [`DROP_AT`] and
/// is back at [`BACK_AT`]. 12 s of call after connecting.
fn talk_through(seed: u64, loss: f64) -> (Door, u64) {
    let mut scene = Scene::new(lossy_config(seed, 50, loss));
    scene.world.agent(scene.bob).auto_answer = true;
    let (tx, rx) = smol::channel::bounded(64);
    let mut media = LiveMedia::new(MediaPlan::testclip(VideoChoice::Auto), None, None);
    media.talkback = Some(Talkback::new(tx));
    let door = Rc::new(RefCell::new(Door::default()));
    let state = Rc::new(RefCell::new((media, 0u8)));
    let base = Instant::now();
    let (d, s) = (door.clone(), state.clone());
    scene.world.agent(scene.bob).media_sink = Some(Box::new(move |at, frame| {
        let mut s = s.borrow_mut();
        let (media, step) = &mut *s;
        let mut door = d.borrow_mut();
        // The scripted backchannel: up from the first frame, lost, then back.
        let event = match *step {
            0 => Some(TalkbackEvent::Ready { codec: Codec::Pcmu }),
            1 if at >= DROP_AT => Some(TalkbackEvent::Lost {
                error: RtspError::Session("the camera hung up".into()),
                retry_in: BACK_AT - DROP_AT,
            }),
            2 if at >= BACK_AT => Some(TalkbackEvent::Ready { codec: Codec::Pcmu }),
            _ => None,
        };
        if let Some(e) = event {
            *step += 1;
            door.lines.push((at, media.talkback_event(e).0));
        }
        if let Some(line) = media.remote_frame(frame, base + at) {
            door.lines.push((at, line));
        }
        while let Ok(p) = rx.try_recv() {
            door.packets.push((at, p));
        }
    }));
    let call_id = scene.world.place_call(scene.alice, &scene.room);
    assert!(
        wait_connected(&mut scene.world, &[scene.alice, scene.bob], &call_id),
        "seed {seed}: no connection"
    );
    scene.world.run_for(Duration::from_secs(12));
    let lost = scene.world.net.stats.lost;
    scene.world.agent(scene.bob).media_sink = None;
    drop(state);
    let door =
        Rc::try_unwrap(door).map_or_else(|_| panic!("the sink is gone"), RefCell::into_inner);
    (door, lost)
}

/// The G.711 samples of `packets`, decoded and placed by their RTP time (what loss took is
/// silence), so the tone keeps its phase across the gaps.
fn samples(packets: &[&TalkbackPacket]) -> Vec<f64> {
    let Some(first) = packets.first().map(|p| p.rtp_time) else {
        return Vec::new();
    };
    let mut x = Vec::new();
    for p in packets {
        let at = (p.rtp_time - first) as usize;
        if x.len() < at + p.data.len() {
            x.resize(at + p.data.len(), 0.0);
        }
        for (i, &b) in p.data.iter().enumerate() {
            x[at + i] = f64::from(g711::ulaw_to_linear(b));
        }
    }
    x
}

#[test]
fn talkback_survives_loss_and_a_backchannel_that_drops_and_comes_back() {
    let (door, lost) = talk_through(21, 0.1);
    assert!(lost > 0, "the link lost nothing");
    let states: Vec<&str> = door
        .lines
        .iter()
        .filter_map(|(_, l)| l["state"].as_str())
        .collect();
    // One call holds the speaker throughout: one `speaking`, and the gate resumes after the
    // backchannel is back without a second one.
    assert_eq!(
        states,
        ["ready", "speaking", "lost", "ready"],
        "{:?}",
        door.lines
    );
    let before: Vec<&TalkbackPacket> = door
        .packets
        .iter()
        .filter(|(at, _)| *at < DROP_AT)
        .map(|(_, p)| p)
        .collect();
    let during = door
        .packets
        .iter()
        .filter(|(at, _)| (DROP_AT..BACK_AT).contains(at))
        .count();
    let after: Vec<&TalkbackPacket> = door
        .packets
        .iter()
        .filter(|(at, _)| *at >= BACK_AT)
        .map(|(_, p)| p)
        .collect();
    // Audio is dropped while the camera is gone, not queued for later.
    assert_eq!(during, 0, "packets reached a camera that was gone");
    // 50 packets a second, less the link's 10 %.
    assert!(
        before.len() > 100,
        "{} packets before the drop",
        before.len()
    );
    assert!(
        after.len() > 100,
        "{} packets after it was back",
        after.len()
    );
    // Packets lost on the way restart the camera's timestamps (a gap, never a jump back).
    let restarts = door
        .packets
        .iter()
        .skip(1)
        .filter(|(_, p)| p.restart)
        .count();
    assert!(restarts > 0, "no loss reached the speaker's stream");
    for w in after.windows(2) {
        assert!(w[1].rtp_time > w[0].rtp_time, "RTP time went back");
    }
    // What the camera plays after it is back is the caller's 440 Hz tone.
    for (name, part) in [("before", &before), ("after", &after)] {
        let x = samples(part);
        assert!(
            tone_share(&x, 440.0) > 0.5 && tone_share(&x, 1000.0) < 0.05,
            "{name}: not the 440 Hz tone"
        );
    }
}

#[test]
fn talkback_through_loss_replays_from_its_seed() {
    let key = |d: &Door| -> Vec<(Duration, u64, bool, Vec<u8>)> {
        d.packets
            .iter()
            .map(|(at, p)| (*at, p.rtp_time, p.restart, p.data.clone()))
            .collect()
    };
    let (a, _) = talk_through(5, 0.15);
    let (b, _) = talk_through(5, 0.15);
    assert!(!a.packets.is_empty());
    assert_eq!(key(&a), key(&b));
}
