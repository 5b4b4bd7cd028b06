//! ICE that never connects, or drops for too long, ends the call in bounded time with the
//! spec's reasons.

use std::time::Duration;

use call_assist::sim::world::World;
use call_assist_core::{CallState, HangupReason};
use call_assist_tests::{config, Scene};

fn two_agents(seed: u64) -> (World, usize, usize, call_assist_core::OwnedRoomId) {
    let mut scene = Scene::new(config(seed));
    scene.world.agent(scene.bob).auto_answer = true;
    (scene.world, scene.alice, scene.bob, scene.room)
}

#[test]
fn media_path_that_never_works_ends_with_ice_failed() {
    let (mut world, caller, callee, room) = two_agents(5);
    // Signalling works (the homeserver is not on the simulated UDP network); media cannot.
    let callee_ip = world.agents[callee].addr.ip();
    world.net.set_host_down(callee_ip, true);
    let call_id = world.place_call(caller, &room);

    let ended = world.run_until(Duration::from_secs(45), |w| {
        w.agents[caller].ended_reason(&call_id).is_some()
            && w.agents[callee].ended_reason(&call_id).is_some()
    });
    assert!(ended, "the call must end by itself within 45 s");
    assert_eq!(
        world.agents[caller].ended_reason(&call_id),
        Some(HangupReason::IceFailed)
    );
    assert_eq!(
        world.agents[callee].ended_reason(&call_id),
        Some(HangupReason::IceFailed)
    );
    assert!(!world.agents[caller].reached(&call_id, CallState::Connected));
    let hangups: Vec<_> = world
        .hs
        .room_events(&room)
        .into_iter()
        .filter(|e| e["type"] == "m.call.hangup")
        .collect();
    assert!(!hangups.is_empty(), "an m.call.hangup is sent");
    assert!(hangups
        .iter()
        .all(|h| h["content"]["reason"] == "ice_failed"));
}

#[test]
fn media_path_lost_mid_call_ends_with_ice_timeout() {
    let (mut world, caller, callee, room) = two_agents(6);
    let call_id = world.place_call(caller, &room);
    assert!(world.run_until(Duration::from_secs(10), |w| {
        w.agents[caller].reached(&call_id, CallState::Connected)
            && w.agents[callee].reached(&call_id, CallState::Connected)
    }));
    world.run_for(Duration::from_secs(2));
    let callee_ip = world.agents[callee].addr.ip();
    world.net.set_host_down(callee_ip, true);
    let cut_at = world.elapsed();

    let ended = world.run_until(Duration::from_secs(90), |w| {
        w.agents[caller].ended_reason(&call_id).is_some()
            && w.agents[callee].ended_reason(&call_id).is_some()
    });
    assert!(
        ended,
        "the call must end by itself within 90 s of losing its media path"
    );
    assert_eq!(
        world.agents[caller].ended_reason(&call_id),
        Some(HangupReason::IceTimeout)
    );
    assert_eq!(
        world.agents[callee].ended_reason(&call_id),
        Some(HangupReason::IceTimeout)
    );
    let took = world.elapsed() - cut_at;
    assert!(
        took >= Duration::from_secs(30),
        "ice_timeout only after the disconnected grace period, took {took:?}"
    );
}
