//! Scaffolding for the scenario tests: a synced world with @alice and @bob, waits that name
//! what they wait for, readers of what the simulated homeserver stored, and the scenarios that
//! more than one test file runs (the determinism tests replay them).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use call_assist::sim::net::LinkProfile;
use call_assist::sim::world::{AgentStats, World, WorldConfig};
use call_assist_core::{AgentEvent, CallPolicy, CallState, OwnedRoomId};
use serde_json::Value;

pub mod live;

/// Long enough for anything the tests wait for (the invite lifetime is 60 s).
pub const PATIENCE: Duration = Duration::from_secs(90);

/// The default world: an ideal 20 ms link and a 10 ms homeserver.
pub fn config(seed: u64) -> WorldConfig {
    WorldConfig {
        seed,
        ..WorldConfig::default()
    }
}

/// A world whose media path has `latency_ms` one way and `loss` per datagram, each direction.
pub fn lossy_config(seed: u64, latency_ms: u64, loss: f64) -> WorldConfig {
    let mut link = LinkProfile::ideal(Duration::from_millis(latency_ms));
    link.loss = loss;
    WorldConfig {
        seed,
        link,
        ..WorldConfig::default()
    }
}

/// @alice and @bob in a 1:1 room, both logged in and synced. Nobody auto-answers yet.
pub struct Scene {
    pub world: World,
    pub alice: usize,
    pub bob: usize,
    pub room: OwnedRoomId,
}

impl Scene {
    pub fn new(config: WorldConfig) -> Scene {
        Self::build(config, false)
    }

    /// [`Scene::new`] in an end-to-end encrypted room (the simulator's encryption stand-in).
    pub fn encrypted(config: WorldConfig) -> Scene {
        Self::build(config, true)
    }

    fn build(config: WorldConfig, encrypted: bool) -> Scene {
        let mut world = World::new(config);
        let alice = world.add_agent("alice", "alice", CallPolicy::Anyone);
        let bob = world.add_agent("bob", "bob", CallPolicy::Anyone);
        let room = if encrypted {
            world.create_encrypted_room(&[alice, bob])
        } else {
            world.create_room(&[alice, bob])
        };
        assert!(world.run_until_synced(), "agents did not sync");
        Scene {
            world,
            alice,
            bob,
            room,
        }
    }

    /// Alice calls Bob, who answers at once; returns when both sides are connected.
    pub fn connected_call(&mut self) -> String {
        self.world.agent(self.bob).auto_answer = true;
        let call_id = self.world.place_call(self.alice, &self.room);
        assert!(
            wait_connected(&mut self.world, &[self.alice, self.bob], &call_id),
            "call {call_id} did not connect"
        );
        call_id
    }

    /// Contents of the events of `event_type` the homeserver stored in the room.
    pub fn stored(&self, event_type: &str) -> Vec<Value> {
        stored(&self.world, &self.room, event_type)
    }
}

/// Contents of the events of `event_type` stored in `room`, in timeline order.
pub fn stored(world: &World, room: &OwnedRoomId, event_type: &str) -> Vec<Value> {
    world
        .hs
        .room_events(room)
        .into_iter()
        .filter(|e| e["type"] == event_type)
        .map(|e| e["content"].clone())
        .collect()
}

/// Contents of the stored events of `event_type` that belong to `call_id`.
pub fn stored_for_call(
    world: &World,
    room: &OwnedRoomId,
    event_type: &str,
    call_id: &str,
) -> Vec<Value> {
    stored(world, room, event_type)
        .into_iter()
        .filter(|c| c["call_id"] == call_id)
        .collect()
}

/// Runs until every agent in `agents` has `call_id` connected.
pub fn wait_connected(world: &mut World, agents: &[usize], call_id: &str) -> bool {
    world.run_until(PATIENCE, |w| {
        agents
            .iter()
            .all(|i| w.agents[*i].reached(call_id, CallState::Connected))
    })
}

/// Runs until every agent in `agents` has seen `call_id` end.
pub fn wait_ended(world: &mut World, agents: &[usize], call_id: &str) -> bool {
    world.run_until(PATIENCE, |w| {
        agents
            .iter()
            .all(|i| w.agents[*i].ended_reason(call_id).is_some())
    })
}

pub fn stats(world: &World, i: usize) -> AgentStats {
    world.agents[i].stats
}

/// Who ended `call_id` at agent `i`, with the reason.
pub fn ending(
    world: &World,
    i: usize,
    call_id: &str,
) -> Option<(call_assist_core::HangupReason, call_assist_core::Party)> {
    world.agents[i].events.iter().find_map(|(_, e)| match e {
        AgentEvent::CallEnded {
            call_id: c,
            reason,
            by,
        } if c == call_id => Some((reason.clone(), *by)),
        _ => None,
    })
}

/// The homeserver reachability changes agent `i` reported, in order.
pub fn reachability(world: &World, i: usize) -> Vec<bool> {
    world.agents[i]
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            AgentEvent::HomeserverReachable(r) => Some(*r),
            _ => None,
        })
        .collect()
}

/// How many `Renegotiated` events agent `i` reported for `call_id`.
pub fn renegotiations(world: &World, i: usize, call_id: &str) -> usize {
    world.agents[i]
        .events
        .iter()
        .filter(|(_, e)| matches!(e, AgentEvent::Renegotiated { call_id: c } if c == call_id))
        .count()
}

/// When (simulated time since start) agent `i` saw `call_id` reach `state`.
pub fn reached_at(world: &World, i: usize, call_id: &str, state: CallState) -> Option<Duration> {
    world.agents[i].events.iter().find_map(|(t, e)| match e {
        AgentEvent::CallStateChanged {
            call_id: c,
            state: s,
        } if c == call_id && *s == state => Some(*t),
        _ => None,
    })
}

/// The offer SDP of a real invite, from a call placed in a throwaway world, for tests that
/// script the caller's side by injecting events. Its candidates (addresses of that world)
/// are taken out: the scripted caller names its own, or none.
pub fn real_offer_sdp() -> String {
    let mut scene = Scene::new(config(7));
    let call_id = scene.world.place_call(scene.alice, &scene.room);
    scene.world.run_for(Duration::from_secs(1));
    let invites = stored_for_call(&scene.world, &scene.room, "m.call.invite", &call_id);
    let sdp = invites
        .first()
        .and_then(|c| c["offer"]["sdp"].as_str())
        .map(str::to_owned);
    let sdp = sdp.unwrap_or_else(|| panic!("no invite with an offer was stored: {invites:?}"));
    let kept: Vec<&str> = sdp
        .split_inclusive('\n')
        .filter(|l| !l.starts_with("a=candidate:"))
        .collect();
    kept.concat()
}

/// Runs `f` with WARN-and-above logs of this thread captured; returns them with its result.
pub fn capture_warnings<R>(f: impl FnOnce() -> R) -> (R, String) {
    capture_logs(tracing::Level::WARN, f)
}

/// Runs `f` with the logs of this thread at `level` and above captured.
pub fn capture_logs<R>(level: tracing::Level, f: impl FnOnce() -> R) -> (R, String) {
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut v) = self.0.lock() {
                v.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let r = tracing::subscriber::with_default(subscriber, f);
    let logs = sink
        .0
        .lock()
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .unwrap_or_default();
    (r, logs)
}

/// Scenarios run by more than one test file; each returns the world at its end plus the
/// figures its checks need.
pub mod scenarios {
    use super::*;

    pub struct BasicCall {
        pub scene: Scene,
        pub call_id: String,
        /// Per agent (alice, bob) after 3 s connected.
        pub after_3s: [AgentStats; 2],
    }

    /// Alice calls Bob, Bob answers, they talk for 3 s, Alice hangs up.
    pub fn basic_call(config: WorldConfig) -> BasicCall {
        let mut scene = Scene::new(config);
        let call_id = scene.connected_call();
        scene.world.run_for(Duration::from_secs(3));
        let after_3s = [
            stats(&scene.world, scene.alice),
            stats(&scene.world, scene.bob),
        ];
        let hung_up = scene
            .world
            .with_agent(scene.alice, |a, now| a.hangup(&call_id, now));
        assert_eq!(hung_up, Ok(()));
        assert!(wait_ended(
            &mut scene.world,
            &[scene.alice, scene.bob],
            &call_id
        ));
        scene.world.run_for(Duration::from_millis(500));
        BasicCall {
            scene,
            call_id,
            after_3s,
        }
    }

    pub struct Glare {
        pub scene: Scene,
        pub alice_call: String,
        pub bob_call: String,
    }

    /// Alice and Bob call each other at the same instant; then 10 s pass.
    pub fn glare(config: WorldConfig) -> Glare {
        let mut scene = Scene::new(config);
        let alice_call = scene.world.place_call(scene.alice, &scene.room);
        let bob_call = scene.world.place_call(scene.bob, &scene.room);
        scene.world.run_for(Duration::from_secs(10));
        Glare {
            scene,
            alice_call,
            bob_call,
        }
    }

    pub struct Outage {
        pub scene: Scene,
        pub call_id: String,
        /// Frames received per agent (alice, bob) when the homeserver went down...
        pub at_outage: [u64; 2],
        /// ...and 5 s later, still down, just before Alice hung up.
        pub five_s_into_outage: [u64; 2],
        /// Whether Bob's call had ended when the homeserver came back.
        pub bob_ended_before_recovery: bool,
    }

    /// A connected call; the homeserver goes down for 10 s; Alice hangs up 5 s into the
    /// outage; the homeserver comes back; run until Bob hears of the hangup.
    pub fn homeserver_outage(config: WorldConfig) -> Outage {
        let mut scene = Scene::new(config);
        let call_id = scene.connected_call();
        scene.world.run_for(Duration::from_secs(2));
        let (alice, bob) = (scene.alice, scene.bob);
        let received = |w: &World| {
            [
                stats(w, alice).frames_received,
                stats(w, bob).frames_received,
            ]
        };

        let now = scene.world.now();
        scene.world.hs.set_down(true, now);
        let at_outage = received(&scene.world);
        scene.world.run_for(Duration::from_secs(5));
        let five_s_into_outage = received(&scene.world);
        let hung_up = scene
            .world
            .with_agent(scene.alice, |a, now| a.hangup(&call_id, now));
        assert_eq!(hung_up, Ok(()));
        scene.world.run_for(Duration::from_secs(5));
        let bob_ended_before_recovery = scene.world.agents[scene.bob]
            .ended_reason(&call_id)
            .is_some();
        let now = scene.world.now();
        scene.world.hs.set_down(false, now);
        wait_ended(&mut scene.world, &[scene.bob], &call_id);
        scene.world.run_for(Duration::from_secs(1));
        Outage {
            scene,
            call_id,
            at_outage,
            five_s_into_outage,
            bob_ended_before_recovery,
        }
    }

    pub struct LossyCall {
        pub scene: Scene,
        pub call_id: String,
        pub connected: bool,
    }

    /// Alice calls Bob over a link with 150 ms one-way latency and 10 % loss; 5 s of talk.
    pub fn lossy_call(seed: u64) -> LossyCall {
        let mut scene = Scene::new(lossy_config(seed, 150, 0.1));
        scene.world.agent(scene.bob).auto_answer = true;
        let call_id = scene.world.place_call(scene.alice, &scene.room);
        let connected = wait_connected(&mut scene.world, &[scene.alice, scene.bob], &call_id);
        if connected {
            scene.world.run_for(Duration::from_secs(5));
        }
        LossyCall {
            scene,
            call_id,
            connected,
        }
    }
}
