//! Two agents driven through the simulator by arbitrary bytes (the `scenario` fuzz target and
//! its replay test): network faults, homeserver faults, clock jumps, NAT and TURN, and a
//! stream of commands. Invariants are checked after every step; a violation panics, which is
//! what the fuzzer looks for.
//!
//! Invariants: nothing panics; no queue is over its limit (the outbox, the agent's events);
//! every call ends up connected-then-ended or ended, each end with one of the spec's reasons,
//! within bounded time once both sides stop.

use std::time::Duration;

use call_assist_core::{limits, AgentEvent, CallPolicy, CallState};

use super::crypto::CryptoFaults;
use super::homeserver::Fault;
use super::nat::NatKind;
use super::net::LinkProfile;
use super::world::{World, WorldConfig};

/// Commands after the header; more are ignored (bounds the work of one input).
const MAX_COMMANDS: usize = 48;

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn frac(&mut self, max: f64) -> f64 {
        f64::from(self.u8()) / 255.0 * max
    }
}

fn nat(b: u8) -> Option<NatKind> {
    match b % 6 {
        1 => Some(NatKind::FullCone),
        2 => Some(NatKind::AddressRestricted),
        3 => Some(NatKind::PortRestricted),
        4 => Some(NatKind::Symmetric),
        _ => None,
    }
}

/// Every agent's queues within their limits.
fn check_bounds(w: &World) {
    for a in &w.agents {
        assert!(
            a.agent.outbox_len() <= limits::MAX_OUTBOX,
            "{}: outbox {} over its limit",
            a.name,
            a.agent.outbox_len()
        );
    }
}

/// What one scenario did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScenarioReport {
    /// Calls seen (placed or rung) over both agents.
    pub calls: usize,
    /// Of those, calls that reached Connected.
    pub connected: usize,
}

/// Runs one scenario from `data`. Panics when an invariant does not hold.
pub fn run_bytes(data: &[u8]) -> ScenarioReport {
    let mut report = ScenarioReport::default();
    let mut b = Bytes(data);
    let seed = u64::from_le_bytes([b.u8(), b.u8(), b.u8(), b.u8(), 0, 0, 0, 0]);
    let mut link = LinkProfile::ideal(Duration::from_millis(u64::from(b.u8()) * 600 / 255));
    link.jitter = Duration::from_millis(u64::from(b.u8() % 64));
    link.loss = b.frac(0.3);
    // One byte: burst loss (low bits), an encrypted room (bit 2), a room-key fault (bits 3-4).
    let flags = b.u8();
    if flags % 4 == 0 {
        link.burst = Some((0.02, 0.25));
    }
    let encrypted = flags & 0x04 != 0;
    let crypto_faults = match (flags >> 3) % 4 {
        1 => CryptoFaults {
            late_key: Some(Duration::from_millis(u64::from(flags) * 40)),
            ..CryptoFaults::default()
        },
        2 => CryptoFaults {
            missing_key: true,
            ..CryptoFaults::default()
        },
        3 => CryptoFaults {
            failed_share: true,
            ..CryptoFaults::default()
        },
        _ => CryptoFaults::default(),
    };
    link.reorder = b.frac(0.1);
    link.duplicate = b.frac(0.1);
    let (nat_a, nat_b, turn) = (nat(b.u8()), nat(b.u8()), b.u8() % 2 == 0);
    let mut world = World::new(WorldConfig {
        seed,
        link,
        homeserver_latency: Duration::from_millis(u64::from(b.u8() % 100)),
    });
    if turn {
        world.add_turn_server("scenario", 3600);
    }
    let alice = world.add_agent("alice", "alice", CallPolicy::Anyone);
    let bob = world.add_agent("bob", "bob", CallPolicy::Anyone);
    for (i, n) in [(alice, nat_a), (bob, nat_b)] {
        if let Some(kind) = n {
            world.put_behind_nat(i, kind);
        }
    }
    let room = if encrypted {
        world.crypto_faults = crypto_faults;
        world.create_encrypted_room(&[alice, bob])
    } else {
        world.create_room(&[alice, bob])
    };
    world.run_until_synced();
    check_bounds(&world);

    for _ in 0..MAX_COMMANDS {
        if b.0.is_empty() {
            break;
        }
        let op = b.u8();
        let arg = b.u8();
        let who = if op & 0x80 == 0 { alice } else { bob };
        match (op & 0x7f) % 10 {
            0 | 1 => {
                let _ = world.with_agent(who, |a, now| a.place_call(&room, now));
            }
            2 => {
                let ringing: Vec<String> = world.agents[who].incoming_calls();
                if let Some(id) = ringing.get(usize::from(arg) % ringing.len().max(1)) {
                    let id = id.clone();
                    let _ = world.with_agent(who, |a, now| a.answer(&id, now));
                }
            }
            3 => {
                let ids: Vec<String> = world.agents[who].agent.call_ids().cloned().collect();
                if let Some(id) = ids.get(usize::from(arg) % ids.len().max(1)) {
                    let id = id.clone();
                    let _ = world.with_agent(who, |a, now| a.hangup(&id, now));
                }
            }
            4 => world.agent(who).auto_answer = arg % 2 == 0,
            5 => {
                let fault = match arg % 3 {
                    0 => Fault::Status502,
                    1 => Fault::Status429 {
                        retry_after_ms: u64::from(arg) * 20,
                    },
                    _ => Fault::Hang,
                };
                world.hs.fail_next(usize::from(arg % 4) + 1, fault);
            }
            6 => world.jump_agent_clocks((i64::from(arg) - 128) * 1000),
            7 => {
                let ids: Vec<String> = world.agents[who].agent.call_ids().cloned().collect();
                if let Some(id) = ids.first() {
                    let id = id.clone();
                    let _ = world.with_agent(who, |a, now| a.renegotiate(&id, now));
                }
            }
            8 => {
                let now = world.now();
                world.hs.set_down(arg % 2 == 0, now);
            }
            _ => world.run_for(Duration::from_millis(u64::from(arg) * 40)),
        }
        world.run_for(Duration::from_millis(50));
        check_bounds(&world);
    }

    // Everyone stops: the homeserver comes back, both hang up everything, and every call must
    // reach an end with a reason in bounded time.
    let now = world.now();
    world.hs.set_down(false, now);
    for i in [alice, bob] {
        world.agent(i).auto_answer = false;
        world.with_agent(i, |a, now| a.hangup_all(now));
    }
    world.run_for(Duration::from_secs(130));
    check_bounds(&world);
    for a in &world.agents {
        let mut ids: Vec<&str> = a
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                AgentEvent::CallStateChanged { call_id, .. } => Some(call_id.as_str()),
                _ => None,
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            let ends = a
                .events
                .iter()
                .filter(
                    |(_, e)| matches!(e, AgentEvent::CallEnded { call_id, .. } if call_id == id),
                )
                .count();
            assert_eq!(ends, 1, "{}: call {id} ended {ends} times", a.name);
            assert!(
                a.reached(id, CallState::Ended),
                "{}: call {id} never reached Ended",
                a.name
            );
            report.calls += 1;
            if a.reached(id, CallState::Connected) {
                report.connected += 1;
            }
        }
    }
    report
}

/// A connected call in the simulator: (world, caller, callee, call id).
type Connected = (World, usize, usize, String);

fn connected_world() -> Option<Connected> {
    let mut world = World::new(WorldConfig::default());
    let caller = world.add_agent("caller", "alice", CallPolicy::Anyone);
    let callee = world.add_agent("callee", "bob", CallPolicy::Anyone);
    world.agent(callee).auto_answer = true;
    let room = world.create_room(&[caller, callee]);
    if !world.run_until_synced() {
        return None;
    }
    let call_id = world.place_call(caller, &room);
    let up = world.run_until(Duration::from_secs(10), |w| {
        w.agents[caller].reached(&call_id, CallState::Connected)
    });
    up.then_some((world, caller, callee, call_id))
}

/// The `datagrams` fuzz target: arbitrary datagrams (STUN, DTLS, SRTP/SRTCP, TURN or
/// garbage) into a connected call, from the peer's address or another one. The connected
/// world is built once per thread and kept (building one costs far more than an input); a
/// new one replaces it when its call ended. Invariants as in [`run_bytes`]: no panic, every
/// queue within its limit.
///
/// Input: records of `[flags, len, len bytes]`; flags bit 0 picks the agent, bit 1 a stranger's
/// source address instead of the peer's.
pub fn datagrams(data: &[u8]) {
    thread_local! {
        static WORLD: std::cell::RefCell<Option<Connected>> = const { std::cell::RefCell::new(None) };
    }
    WORLD.with(|cell| {
        let mut slot = cell.borrow_mut();
        let ended = slot
            .as_ref()
            .is_none_or(|(w, caller, _, call)| w.agents[*caller].ended_reason(call).is_some());
        if ended {
            *slot = connected_world();
        }
        let Some((world, caller, callee, _)) = slot.as_mut() else {
            panic!("the simulator could not connect a call");
        };
        let mut rest = data;
        while let [flags, len, tail @ ..] = rest {
            let n = usize::from(*len).min(tail.len());
            let (contents, next) = tail.split_at(n);
            rest = next;
            let (to, from) = if flags & 1 == 0 {
                (*caller, *callee)
            } else {
                (*callee, *caller)
            };
            let source = if flags & 2 == 0 {
                world.agents[from].addr
            } else {
                std::net::SocketAddr::from(([203, 0, 113, 9], 40000))
            };
            let d = super::net::Datagram {
                source,
                destination: world.agents[to].addr,
                contents: contents.to_vec(),
            };
            let now = world.now();
            world.net.send(now, d);
        }
        world.run_for(Duration::from_millis(30));
        check_bounds(world);
    });
}
