//! Calls in end-to-end encrypted rooms on the simulator: its seeded encryption stand-in
//! (`sim::crypto`) sits where the real layer (`e2ee`, matrix-sdk-crypto) sits, so the core's
//! path through encrypted rooms (late keys, missing keys, failed encryption, plaintext
//! impostors) is tested deterministically here and with real crypto in `e2ee.rs`.

use std::time::Duration;

use call_assist::sim::world::World;
use call_assist_core::{AgentEvent, CallState, HangupReason, Party};
use call_assist_tests::*;
use serde_json::json;

fn rang(world: &World, i: usize, call_id: &str) -> bool {
    world.agents[i]
        .incoming_calls()
        .iter()
        .any(|c| c == call_id)
}

/// Event types stored in the room that are not state.
fn stored_types(scene: &Scene) -> Vec<String> {
    scene
        .world
        .hs
        .room_events(&scene.room)
        .into_iter()
        .filter(|e| e.get("state_key").is_none())
        .filter_map(|e| e["type"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn a_call_in_an_encrypted_room_connects_and_the_server_stores_only_ciphertext() {
    let mut scene = Scene::encrypted(config(11));
    let call_id = scene.connected_call();
    scene
        .world
        .with_agent(scene.alice, |a, now| a.hangup(&call_id, now))
        .expect("hangup");
    assert!(wait_ended(&mut scene.world, &[scene.bob], &call_id));

    let types = stored_types(&scene);
    assert!(
        types.iter().all(|t| t == "m.room.encrypted"),
        "plaintext in an encrypted room: {types:?}"
    );
    // invite, answer, select_answer, hangup (and end-of-candidates if the call lasted long
    // enough for its batch): all encrypted.
    assert!(types.len() >= 4, "{types:?}");
    for i in [scene.alice, scene.bob] {
        let s = scene.world.agents[i].crypto.stats;
        assert!(s.encrypted >= 1 && s.decrypted >= 1, "{s:?}");
        assert_eq!(s.undecryptable_dropped, 0);
    }
    assert_eq!(
        ending(&scene.world, scene.bob, &call_id),
        Some((HangupReason::UserHangup, Party::Remote))
    );
}

#[test]
fn an_invite_whose_room_key_comes_late_still_rings_and_connects() {
    let mut scene = Scene::encrypted(config(12));
    let late = Duration::from_secs(4);
    scene.world.crypto_faults.late_key = Some(late);
    let placed = scene.world.elapsed();
    let call_id = scene.world.place_call(scene.alice, &scene.room);
    let bob = scene.bob;
    assert!(scene.world.run_until(PATIENCE, |w| rang(w, bob, &call_id)));
    let rang_after = scene.world.elapsed() - placed;
    assert!(
        rang_after >= late,
        "rang after {rang_after:?}, before its key"
    );
    assert!(scene.world.agents[bob].crypto.stats.decrypted_late >= 1);

    scene
        .world
        .with_agent(bob, |a, now| a.answer(&call_id, now))
        .expect("answer");
    assert!(wait_connected(
        &mut scene.world,
        &[scene.alice, scene.bob],
        &call_id
    ));
}

#[test]
fn an_invite_whose_room_key_never_comes_ends_cleanly() {
    let mut scene = Scene::encrypted(config(13));
    scene.world.crypto_faults.missing_key = true;
    let call_id = scene.world.place_call(scene.alice, &scene.room);
    assert!(wait_ended(&mut scene.world, &[scene.alice], &call_id));
    assert_eq!(
        ending(&scene.world, scene.alice, &call_id),
        Some((HangupReason::InviteTimeout, Party::Local))
    );
    assert!(
        !rang(&scene.world, scene.bob, &call_id),
        "rang without a key"
    );
    // Kept for its key, then given up on (bounded in time).
    scene.world.run_for(Duration::from_secs(300));
    let s = scene.world.agents[scene.bob].crypto.stats;
    assert!(s.undecryptable_dropped >= 1, "{s:?}");
    assert!(!scene.world.agents[scene.bob].incoming_or_placed(&call_id));
}

#[test]
fn a_call_that_cannot_be_encrypted_ends_at_once_and_sends_nothing() {
    let mut scene = Scene::encrypted(config(14));
    scene.world.crypto_faults.failed_share = true;
    let before = stored_types(&scene).len();
    let placed = scene.world.elapsed();
    let call_id = scene.world.place_call(scene.alice, &scene.room);
    assert!(wait_ended(&mut scene.world, &[scene.alice], &call_id));
    let ended_after = scene.world.elapsed() - placed;
    assert!(
        ended_after < Duration::from_secs(2),
        "ended after {ended_after:?}"
    );
    assert_eq!(
        ending(&scene.world, scene.alice, &call_id),
        Some((HangupReason::UnknownError, Party::Local))
    );
    scene.world.run_for(Duration::from_secs(5));
    assert_eq!(stored_types(&scene).len(), before, "something was sent");
    assert!(!rang(&scene.world, scene.bob, &call_id));
}

#[test]
fn plaintext_call_events_in_an_encrypted_room_are_ignored() {
    for encrypted in [false, true] {
        let mut scene = if encrypted {
            Scene::encrypted(config(15))
        } else {
            Scene::new(config(15))
        };
        let alice = scene.world.agents[scene.alice].user_id.clone();
        let bob = scene.world.agents[scene.bob].user_id.clone();
        let invite = json!({
            "call_id": "impostor",
            "party_id": "p1",
            "version": "1",
            "lifetime": 60000,
            "invitee": bob,
            "offer": {"type": "offer", "sdp": real_offer_sdp()},
        });
        let unix = scene.world.unix_ms();
        let room = scene.room.clone();
        scene
            .world
            .hs
            .inject_event(&room, &alice, "m.call.invite", invite, unix);
        scene.world.run_for(Duration::from_secs(3));
        // The unencrypted room is the positive control: the same event rings there.
        assert_eq!(
            rang(&scene.world, scene.bob, "impostor"),
            !encrypted,
            "encrypted room: {encrypted}"
        );
        let ignored = scene.world.agents[scene.bob].crypto.stats.plaintext_ignored;
        assert_eq!(ignored > 0, encrypted);
    }
}

#[test]
fn the_direct_room_an_agent_creates_is_encrypted_and_calls_in_it_are() {
    let mut scene = Scene::new(config(16));
    let bob_id = scene.world.agents[scene.bob].user_id.clone();
    scene.world.with_agent(scene.alice, |a, now| {
        a.create_direct_room(&bob_id, true, now)
    });
    let alice = scene.alice;
    let created = |w: &World| {
        w.agents[alice].call_events().find_map(|e| match e {
            AgentEvent::RoomCreated { room_id, .. } => Some(room_id.clone()),
            _ => None,
        })
    };
    assert!(scene.world.run_until(PATIENCE, |w| created(w).is_some()));
    let room = created(&scene.world).expect("created");
    let state = scene.world.hs.room_events(&room);
    assert!(
        state.iter().any(|e| e["type"] == "m.room.encryption"
            && e["content"]["algorithm"] == "m.megolm.v1.aes-sha2"),
        "{state:?}"
    );
    scene.room = room;
    scene.world.run_for(Duration::from_secs(1));
    let call_id = scene.connected_call();
    assert!(scene.world.agents[scene.alice].reached(&call_id, CallState::Connected));
    let types = stored_types(&scene);
    assert!(types.iter().all(|t| t == "m.room.encrypted"), "{types:?}");
    assert!(!types.is_empty());
}

#[test]
fn the_same_seed_gives_the_same_trace_with_encryption_on() {
    let run = |late: bool| {
        let mut scene = Scene::encrypted(lossy_config(17, 30, 0.03));
        if late {
            scene.world.crypto_faults.late_key = Some(Duration::from_millis(1500));
        }
        let call_id = scene.connected_call();
        scene.world.run_for(Duration::from_secs(2));
        scene
            .world
            .with_agent(scene.alice, |a, now| a.hangup(&call_id, now))
            .expect("hangup");
        scene.world.run_for(Duration::from_secs(2));
        scene.world.trace_hash()
    };
    assert_eq!(run(false), run(false));
    assert_eq!(run(true), run(true));
    assert_ne!(run(false), run(true), "the late key changed nothing");
}

/// The figure for the README: invite -> connected in an encrypted room and in a plain one,
/// on the simulator (its stand-in costs no homeserver round trips, so the difference is the
/// late key alone; the live figure is in `e2ee.rs`).
#[test]
fn setup_time_in_an_encrypted_room() {
    let setup = |encrypted: bool, late_ms: u64| {
        let mut scene = if encrypted {
            Scene::encrypted(config(18))
        } else {
            Scene::new(config(18))
        };
        if late_ms > 0 {
            scene.world.crypto_faults.late_key = Some(Duration::from_millis(late_ms));
        }
        let placed = scene.world.elapsed();
        let call_id = scene.connected_call();
        reached_at(&scene.world, scene.alice, &call_id, CallState::Connected).expect("connected")
            - placed
    };
    let plain = setup(false, 0);
    let encrypted = setup(true, 0);
    let late = setup(true, 500);
    println!("sim setup invite->connected: plain {plain:?}, encrypted {encrypted:?}, encrypted with keys 500 ms late {late:?}");
    assert!(late > encrypted, "a late key cost nothing");
}
