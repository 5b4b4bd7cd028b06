//! `call-assist demo`: a caller and an auto-answering callee through the simulated world.

use std::time::Duration;

use call_assist_core::{CallPolicy, CallState};
use serde::Serialize;

use crate::sim::net::LinkProfile;
use crate::sim::world::{World, WorldConfig};

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub seed: u64,
    /// Loss probability per datagram, each direction (0.0 ..= 1.0).
    pub loss: f64,
    /// One-way latency of the media path.
    pub latency: Duration,
    /// How long the call stays up once connected.
    pub duration: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            seed: 1,
            loss: 0.0,
            latency: Duration::from_millis(20),
            duration: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SideReport {
    pub frames_sent: u64,
    pub frames_received: u64,
    pub video_frames_received: u64,
    pub audio_frames_received: u64,
}

/// The demo's outcome; the JSON line of `--json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DemoReport {
    pub seed: u64,
    pub loss: f64,
    pub latency_ms: u64,
    pub connected: bool,
    /// Invite sent -> first remote media frame at the caller, simulated ms.
    pub setup_ms: Option<u64>,
    /// Summed over both sides.
    pub frames_sent: u64,
    /// Summed over both sides.
    pub frames_received: u64,
    pub caller: SideReport,
    pub callee: SideReport,
    pub hangup_reason: Option<String>,
    pub trace_lines: usize,
    pub trace_hash: String,
}

/// Runs the demo; `progress` gets human-readable lines as they happen.
pub fn run(opts: &DemoOptions, mut progress: impl FnMut(&str)) -> DemoReport {
    let mut link = LinkProfile::ideal(opts.latency);
    link.loss = opts.loss.clamp(0.0, 1.0);
    let mut world = World::new(WorldConfig {
        seed: opts.seed,
        link,
        homeserver_latency: Duration::from_millis(10),
    });
    let caller = world.add_agent("caller", "alice", CallPolicy::Anyone);
    let callee = world.add_agent("callee", "bob", CallPolicy::Anyone);
    world.agent(callee).auto_answer = true;
    let room = world.create_room(&[caller, callee]);
    progress(&format!(
        "simulated homeserver up; room {room} with @alice and @bob; link {} ms one-way, {:.1} % loss",
        opts.latency.as_millis(),
        link.loss * 100.0
    ));

    world.run_until_synced();
    progress(&format!(
        "both agents logged in and synced at {} ms",
        world.elapsed().as_millis()
    ));

    let placed_at = world.elapsed();
    let call_id = world.place_call(caller, &room);
    progress(&format!("@alice calls @bob (call {call_id})"));

    let connected = world.run_until(Duration::from_secs(60), |w| {
        w.agents[caller].reached(&call_id, CallState::Connected)
            && w.agents[callee].reached(&call_id, CallState::Connected)
    });
    if connected {
        progress(&format!(
            "connected at {} ms; media flowing both ways",
            world.elapsed().as_millis()
        ));
        world.run_for(opts.duration);
        progress(&format!(
            "@alice hangs up after {} s",
            opts.duration.as_secs()
        ));
        let _ = world.with_agent(caller, |a, now| a.hangup(&call_id, now));
    } else {
        progress("the call did not connect within 60 s");
    }
    world.run_until(Duration::from_secs(60), |w| {
        w.agents[callee].ended_reason(&call_id).is_some()
            && w.agents[caller].ended_reason(&call_id).is_some()
    });
    world.run_for(Duration::from_millis(500));

    let setup_ms = world.agents[caller]
        .first_media
        .get(&call_id)
        .map(|t| t.saturating_sub(placed_at).as_millis() as u64);
    let hangup_reason = world.agents[callee]
        .ended_reason(&call_id)
        .or_else(|| world.agents[caller].ended_reason(&call_id))
        .map(|r| r.to_string());
    for a in [caller, callee] {
        let s = world.agents[a].stats;
        progress(&format!(
            "{}: sent {} frames, received {} ({} video, {} audio)",
            world.agents[a].name,
            s.frames_sent,
            s.frames_received,
            s.video_frames_received,
            s.audio_frames_received
        ));
    }
    let side = |i: usize| {
        let s = world.agents[i].stats;
        SideReport {
            frames_sent: s.frames_sent,
            frames_received: s.frames_received,
            video_frames_received: s.video_frames_received,
            audio_frames_received: s.audio_frames_received,
        }
    };
    let (c, e) = (side(caller), side(callee));
    DemoReport {
        seed: opts.seed,
        loss: link.loss,
        latency_ms: opts.latency.as_millis() as u64,
        connected,
        setup_ms,
        frames_sent: c.frames_sent + e.frames_sent,
        frames_received: c.frames_received + e.frames_received,
        caller: c,
        callee: e,
        hangup_reason,
        trace_lines: world.trace.len(),
        trace_hash: format!("{:016x}", world.trace_hash()),
    }
}
