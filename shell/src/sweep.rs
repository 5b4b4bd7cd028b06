//! `call-assist sweep`: many seeds across fault profiles in the simulator. Every run must end
//! with each call either connected-then-hung-up or ended with a reason, and nothing may panic.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use call_assist_core::{AgentEvent, CallPolicy, CallState};
use serde::Serialize;

use crate::sim::crypto::CryptoFaults;
use crate::sim::homeserver::Fault;
use crate::sim::net::LinkProfile;
use crate::sim::world::{World, WorldConfig};

/// A named set of faults.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: &'static str,
    pub link: LinkProfile,
    /// Homeserver faults injected right before the call is placed.
    pub hs_faults: Vec<(usize, Fault)>,
    pub hs_latency: Duration,
    /// Wall-clock jump (ms) applied to both agents mid-call.
    pub clock_jump_ms: i64,
    /// The homeserver goes down this long mid-call.
    pub hs_outage: Option<Duration>,
    /// The call is in an end-to-end encrypted room (the simulator's stand-in), with these
    /// room-key faults.
    pub encrypted: Option<CryptoFaults>,
}

fn link(latency_ms: u64, jitter_ms: u64, loss: f64) -> LinkProfile {
    let mut l = LinkProfile::ideal(Duration::from_millis(latency_ms));
    l.jitter = Duration::from_millis(jitter_ms);
    l.loss = loss;
    l
}

/// The profiles the sweep runs, from clean to hostile.
pub fn profiles() -> Vec<Profile> {
    let base = Profile {
        name: "clean",
        link: link(20, 0, 0.0),
        hs_faults: Vec::new(),
        hs_latency: Duration::from_millis(10),
        clock_jump_ms: 0,
        hs_outage: None,
        encrypted: None,
    };
    let mut bursty = link(50, 10, 0.02);
    bursty.burst = Some((0.02, 0.25));
    let mut messy = link(80, 60, 0.05);
    messy.reorder = 0.05;
    messy.duplicate = 0.05;
    vec![
        base.clone(),
        Profile {
            name: "loss 10%",
            link: link(20, 5, 0.10),
            ..base.clone()
        },
        Profile {
            name: "loss 30%",
            link: link(20, 5, 0.30),
            ..base.clone()
        },
        Profile {
            name: "bursty loss",
            link: bursty,
            ..base.clone()
        },
        Profile {
            name: "latency 600 ms",
            link: link(600, 20, 0.0),
            ..base.clone()
        },
        Profile {
            name: "no latency",
            link: link(0, 0, 0.0),
            hs_latency: Duration::ZERO,
            ..base.clone()
        },
        Profile {
            name: "reorder+dup+jitter",
            link: messy,
            ..base.clone()
        },
        Profile {
            name: "homeserver 502/429",
            hs_faults: vec![
                (3, Fault::Status502),
                (
                    2,
                    Fault::Status429 {
                        retry_after_ms: 1500,
                    },
                ),
            ],
            ..base.clone()
        },
        Profile {
            name: "homeserver hangs",
            hs_faults: vec![(2, Fault::Hang)],
            ..base.clone()
        },
        Profile {
            name: "homeserver down 10 s",
            hs_outage: Some(Duration::from_secs(10)),
            ..base.clone()
        },
        Profile {
            name: "clock +1 h",
            clock_jump_ms: 3_600_000,
            ..base.clone()
        },
        Profile {
            name: "clock -1 h",
            clock_jump_ms: -3_600_000,
            ..base.clone()
        },
        Profile {
            name: "encrypted room",
            encrypted: Some(CryptoFaults::default()),
            ..base.clone()
        },
        Profile {
            name: "encrypted, late keys",
            encrypted: Some(CryptoFaults {
                late_key: Some(Duration::from_secs(2)),
                ..CryptoFaults::default()
            }),
            ..base.clone()
        },
        Profile {
            name: "encrypted, no keys",
            encrypted: Some(CryptoFaults {
                missing_key: true,
                ..CryptoFaults::default()
            }),
            ..base
        },
    ]
}

/// What one run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// Connected, media flowed, hung up: both sides ended with a reason.
    Connected,
    /// Never connected, but both sides ended with a reason.
    EndedWithReason,
    /// Some call was still not ended at the end: a bug.
    Stuck,
    Panicked,
}

#[derive(Debug, Clone, Copy)]
pub struct RunResult {
    pub outcome: Outcome,
    pub setup_ms: Option<u64>,
}

/// One seed of one profile.
pub fn run_one(profile: &Profile, seed: u64) -> RunResult {
    let r = catch_unwind(AssertUnwindSafe(|| run_inner(profile, seed)));
    r.unwrap_or(RunResult {
        outcome: Outcome::Panicked,
        setup_ms: None,
    })
}

fn run_inner(p: &Profile, seed: u64) -> RunResult {
    let mut world = World::new(WorldConfig {
        seed,
        link: p.link,
        homeserver_latency: p.hs_latency,
    });
    let caller = world.add_agent("caller", "alice", CallPolicy::Anyone);
    let callee = world.add_agent("callee", "bob", CallPolicy::Anyone);
    world.agent(callee).auto_answer = true;
    let room = match p.encrypted {
        Some(faults) => {
            world.crypto_faults = faults;
            world.create_encrypted_room(&[caller, callee])
        }
        None => world.create_room(&[caller, callee]),
    };
    world.run_until_synced();
    for (n, f) in &p.hs_faults {
        world.hs.fail_next(*n, *f);
    }
    let placed = world.elapsed();
    let call_id = match world.with_agent(caller, |a, now| a.place_call(&room, now)) {
        Ok(id) => id,
        Err(_) => {
            return RunResult {
                outcome: Outcome::Stuck,
                setup_ms: None,
            }
        }
    };
    let connected = world.run_until(Duration::from_secs(60), |w| {
        w.agents[caller].reached(&call_id, CallState::Connected)
            && w.agents[callee].reached(&call_id, CallState::Connected)
    });
    if connected {
        world.run_for(Duration::from_secs(2));
        if p.clock_jump_ms != 0 {
            world.jump_agent_clocks(p.clock_jump_ms);
        }
        if let Some(d) = p.hs_outage {
            let now = world.now();
            world.hs.set_down(true, now);
            world.run_for(d);
            let now = world.now();
            world.hs.set_down(false, now);
        }
        world.run_for(Duration::from_secs(2));
        let _ = world.with_agent(caller, |a, now| a.hangup(&call_id, now));
    }
    // Whatever happened, both sides must reach an end with a reason in bounded time.
    let ended = world.run_until(Duration::from_secs(120), |w| {
        w.agents
            .iter()
            .all(|a| a.ended_reason(&call_id).is_some() || !a.incoming_or_placed(&call_id))
    });
    // Both agents stay healthy long after the call (ended calls are forgotten at 120 s).
    world.run_for(Duration::from_secs(150));
    let setup_ms = world.agents[caller]
        .first_media
        .get(&call_id)
        .map(|t| t.saturating_sub(placed).as_millis() as u64);
    let all_ended = ended
        && world.agents.iter().all(|a| {
            a.events.iter().all(|(_, e)| match e {
                AgentEvent::IncomingCall { call_id, .. } => a.ended_reason(call_id).is_some(),
                _ => true,
            })
        });
    RunResult {
        outcome: match (all_ended, connected) {
            (false, _) => Outcome::Stuck,
            (true, true) => Outcome::Connected,
            (true, false) => Outcome::EndedWithReason,
        },
        setup_ms,
    }
}

/// Figures of one profile.
#[derive(Debug, Clone, Serialize)]
pub struct ProfileReport {
    pub profile: String,
    pub runs: u64,
    pub connected_pct: f64,
    pub ended_with_reason_pct: f64,
    pub stuck: u64,
    pub panics: u64,
    pub setup_p50_ms: Option<u64>,
    pub setup_p95_ms: Option<u64>,
}

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(i).copied()
}

/// Runs `seeds` seeds (starting at `first_seed`) of each profile.
pub fn sweep(
    seeds: u64,
    first_seed: u64,
    mut progress: impl FnMut(&ProfileReport),
) -> Vec<ProfileReport> {
    quiet_panics_on_this_thread(true);
    let mut out = Vec::new();
    for p in profiles() {
        let mut setups = Vec::new();
        let (mut connected, mut ended, mut stuck, mut panics) = (0u64, 0u64, 0u64, 0u64);
        for seed in first_seed..first_seed + seeds {
            let r = run_one(&p, seed);
            match r.outcome {
                Outcome::Connected => connected += 1,
                Outcome::EndedWithReason => ended += 1,
                Outcome::Stuck => stuck += 1,
                Outcome::Panicked => panics += 1,
            }
            setups.extend(r.setup_ms);
        }
        setups.sort_unstable();
        let pct = |n: u64| (n as f64 * 1000.0 / seeds.max(1) as f64).round() / 10.0;
        let report = ProfileReport {
            profile: p.name.to_owned(),
            runs: seeds,
            connected_pct: pct(connected),
            ended_with_reason_pct: pct(connected + ended),
            stuck,
            panics,
            setup_p50_ms: percentile(&setups, 0.5),
            setup_p95_ms: percentile(&setups, 0.95),
        };
        progress(&report);
        out.push(report);
    }
    quiet_panics_on_this_thread(false);
    out
}

thread_local! {
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Panics of the sweep's runs are counted, not printed mid-table. Only this thread is quieted:
/// a panic on another thread (a test running beside the sweep) keeps its message, because the
/// process-wide hook is wrapped once rather than swapped while others run.
fn quiet_panics_on_this_thread(quiet: bool) {
    static WRAP: std::sync::Once = std::sync::Once::new();
    WRAP.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    QUIET.with(|q| q.set(quiet));
}
