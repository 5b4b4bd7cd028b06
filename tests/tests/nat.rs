//! NAT traversal in the simulator: NAT models per host and a simulated TURN server (coturn's
//! REST credential behaviour). Symmetric NATs on both sides connect only through the relay.

use std::time::Duration;

use call_assist::sim::nat::NatKind;
use call_assist::sim::world::{World, WorldConfig};
use call_assist_core::{AgentEvent, CallPolicy, CallState};
use call_assist_tests::*;

const SECRET: &str = "sim-turn-secret";

struct NatScene {
    world: World,
    alice: usize,
    bob: usize,
    room: call_assist_core::OwnedRoomId,
    call_id: String,
}

/// Alice and Bob behind the given NATs (None: on the open network), with or without TURN;
/// Alice calls, Bob answers at once.
fn call_behind(
    seed: u64,
    alice_nat: Option<NatKind>,
    bob_nat: Option<NatKind>,
    turn: bool,
    relay_only: bool,
    ttl_s: u64,
) -> NatScene {
    call_behind_with(seed, alice_nat, bob_nat, turn, relay_only, ttl_s, 3600)
}

fn call_behind_with(
    seed: u64,
    alice_nat: Option<NatKind>,
    bob_nat: Option<NatKind>,
    turn: bool,
    relay_only: bool,
    ttl_s: u64,
    turn_max_lifetime: u32,
) -> NatScene {
    let mut world = World::new(WorldConfig {
        seed,
        ..WorldConfig::default()
    });
    if turn {
        world.add_turn_server(SECRET, ttl_s);
        if let Some(t) = world.turn.as_mut() {
            t.max_lifetime = turn_max_lifetime;
        }
    }
    let alice = world.add_agent_with("alice", "alice", CallPolicy::Anyone, |c| {
        c.relay_only = relay_only
    });
    let bob = world.add_agent_with("bob", "bob", CallPolicy::Anyone, |c| {
        c.relay_only = relay_only
    });
    for (i, nat) in [(alice, alice_nat), (bob, bob_nat)] {
        if let Some(kind) = nat {
            world.put_behind_nat(i, kind);
        }
    }
    let room = world.create_room(&[alice, bob]);
    assert!(world.run_until_synced(), "agents did not sync");
    // TURN credentials are fetched after login; let the allocations finish.
    world.run_for(Duration::from_secs(2));
    world.agent(bob).auto_answer = true;
    let call_id = world.place_call(alice, &room);
    NatScene {
        world,
        alice,
        bob,
        room,
        call_id,
    }
}

fn relays_allocated(world: &World, i: usize) -> usize {
    world.agents[i]
        .call_events()
        .filter(|e| matches!(e, AgentEvent::RelayAllocated { .. }))
        .count()
}

fn pair(world: &World, i: usize, call_id: &str) -> (String, String) {
    let info = world.agents[i]
        .agent
        .call_info(call_id)
        .expect("call known");
    (
        info.local_candidate.unwrap_or_default(),
        info.remote_candidate.unwrap_or_default(),
    )
}

fn assert_media_both_ways(world: &mut World, alice: usize, bob: usize) {
    let before = [stats(world, alice), stats(world, bob)];
    world.run_for(Duration::from_secs(3));
    for (i, b) in [alice, bob].into_iter().zip(before) {
        let now = stats(world, i);
        assert!(
            now.video_frames_received >= b.video_frames_received + 25
                && now.audio_frames_received >= b.audio_frames_received + 100,
            "{} got {} video / {} audio frames in 3 s",
            world.agents[i].name,
            now.video_frames_received - b.video_frames_received,
            now.audio_frames_received - b.audio_frames_received
        );
    }
}

#[test]
fn both_behind_symmetric_nat_connect_only_through_turn() {
    let mut s = call_behind(
        1,
        Some(NatKind::Symmetric),
        Some(NatKind::Symmetric),
        true,
        false,
        3600,
    );
    assert_eq!(relays_allocated(&s.world, s.alice), 1);
    assert!(
        wait_connected(&mut s.world, &[s.alice, s.bob], &s.call_id),
        "call through TURN did not connect"
    );
    assert_media_both_ways(&mut s.world, s.alice, s.bob);
    let (a_local, a_remote) = pair(&s.world, s.alice, &s.call_id);
    let (b_local, b_remote) = pair(&s.world, s.bob, &s.call_id);
    assert!(
        [&a_local, &a_remote, &b_local, &b_remote]
            .iter()
            .any(|k| k.as_str() == "relay"),
        "no relay in the pairs: alice {a_local}/{a_remote}, bob {b_local}/{b_remote}"
    );
    let turn = s.world.turn.as_ref().unwrap().stats;
    assert!(
        turn.relayed_to_peer > 200 && turn.relayed_to_client > 200,
        "{turn:?}"
    );

    // The same NATs without TURN: no path at all, the call fails with ice_failed.
    let mut s = call_behind(
        1,
        Some(NatKind::Symmetric),
        Some(NatKind::Symmetric),
        false,
        false,
        0,
    );
    let (alice, call_id) = (s.alice, s.call_id.clone());
    assert!(wait_ended(&mut s.world, &[alice], &call_id));
    assert!(!s.world.agents[alice].reached(&call_id, CallState::Connected));
    assert_eq!(
        ending(&s.world, alice, &call_id).map(|(r, _)| r),
        Some(call_assist_core::HangupReason::IceFailed)
    );
}

#[test]
fn a_server_without_channels_still_relays_through_send_indications() {
    let mut world = World::new(WorldConfig {
        seed: 7,
        ..WorldConfig::default()
    });
    world.add_turn_server(SECRET, 3600);
    world.turn.as_mut().unwrap().refuse_channel_bind = true;
    let alice = world.add_agent("alice", "alice", CallPolicy::Anyone);
    let bob = world.add_agent("bob", "bob", CallPolicy::Anyone);
    world.put_behind_nat(alice, NatKind::Symmetric);
    world.put_behind_nat(bob, NatKind::Symmetric);
    let room = world.create_room(&[alice, bob]);
    assert!(world.run_until_synced());
    world.run_for(Duration::from_secs(2));
    world.agent(bob).auto_answer = true;
    let call_id = world.place_call(alice, &room);
    assert!(wait_connected(&mut world, &[alice, bob], &call_id));
    assert_media_both_ways(&mut world, alice, bob);
    let turn = world.turn.as_ref().unwrap().stats;
    assert!(turn.send_indications > 200, "{turn:?}");
}

#[test]
fn symmetric_and_full_cone_connect() {
    let mut s = call_behind(
        2,
        Some(NatKind::Symmetric),
        Some(NatKind::FullCone),
        true,
        false,
        3600,
    );
    assert!(wait_connected(&mut s.world, &[s.alice, s.bob], &s.call_id));
    assert_media_both_ways(&mut s.world, s.alice, s.bob);
    // Port-restricted on both sides connects too (server-reflexive + peer-reflexive).
    let mut s = call_behind(
        3,
        Some(NatKind::PortRestricted),
        Some(NatKind::AddressRestricted),
        true,
        false,
        3600,
    );
    assert!(wait_connected(&mut s.world, &[s.alice, s.bob], &s.call_id));
    assert_media_both_ways(&mut s.world, s.alice, s.bob);
}

#[test]
fn relay_only_mode_never_reveals_an_address_of_ours() {
    let mut s = call_behind(4, None, Some(NatKind::FullCone), true, true, 3600);
    assert!(wait_connected(&mut s.world, &[s.alice, s.bob], &s.call_id));
    assert_media_both_ways(&mut s.world, s.alice, s.bob);
    assert_eq!(pair(&s.world, s.alice, &s.call_id).0, "relay");
    assert_eq!(pair(&s.world, s.bob, &s.call_id).0, "relay");
    // Nothing in the room names a host or server-reflexive candidate or our addresses.
    let room = s.room.clone();
    let mut text = String::new();
    for t in ["m.call.invite", "m.call.answer", "m.call.candidates"] {
        for e in stored(&s.world, &room, t) {
            text.push_str(&e.to_string());
        }
    }
    assert!(text.contains("typ relay"), "{text}");
    for leak in ["typ host", "typ srflx", "192.0.2.", "203.0.113."] {
        assert!(!text.contains(leak), "{leak} in room history: {text}");
    }
}

#[test]
fn turn_credentials_expire_mid_call_without_dropping_media() {
    // 60 s credentials, 120 s allocations: the allocation is refreshed with credentials whose
    // timestamp has passed (as coturn allows), the homeserver hands out new ones every 54 s.
    let mut s = call_behind_with(
        5,
        Some(NatKind::Symmetric),
        Some(NatKind::Symmetric),
        true,
        false,
        60,
        120,
    );
    assert!(wait_connected(&mut s.world, &[s.alice, s.bob], &s.call_id));
    let first_username = s.world.agents[s.alice]
        .agent
        .turn_servers()
        .unwrap()
        .username
        .clone();
    // Five minutes: past the credentials, several allocation refreshes and the permission's
    // 300 s. Media must flow in every 30 s window.
    for window in 0..10 {
        let before = [stats(&s.world, s.alice), stats(&s.world, s.bob)];
        s.world.run_for(Duration::from_secs(30));
        for (i, b) in [s.alice, s.bob].into_iter().zip(before) {
            let got = stats(&s.world, i).video_frames_received - b.video_frames_received;
            assert!(
                got > 300,
                "window {window}: {} got {got} video frames",
                s.world.agents[i].name
            );
        }
    }
    assert!(s.world.agents[s.alice].reached(&s.call_id, CallState::Connected));
    assert!(
        ending(&s.world, s.alice, &s.call_id).is_none(),
        "the call ended"
    );
    let lost = s.world.agents[s.alice]
        .call_events()
        .filter(|e| matches!(e, AgentEvent::RelayLost { .. }))
        .count();
    assert_eq!(lost, 0, "a relay was lost");
    let turn = s.world.turn.as_ref().unwrap().stats;
    assert!(turn.refreshes >= 8, "{turn:?}");
    assert_ne!(
        s.world.agents[s.alice]
            .agent
            .turn_servers()
            .unwrap()
            .username,
        first_username,
        "the credentials were refreshed"
    );
}

#[test]
fn a_call_through_turn_replays_from_its_seed() {
    let run = || {
        let mut s = call_behind(
            6,
            Some(NatKind::Symmetric),
            Some(NatKind::PortRestricted),
            true,
            false,
            3600,
        );
        assert!(wait_connected(&mut s.world, &[s.alice, s.bob], &s.call_id));
        s.world.run_for(Duration::from_secs(2));
        (s.world.trace_hash(), s.world.trace.len())
    };
    assert_eq!(run(), run());
}
