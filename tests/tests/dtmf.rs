//! DTMF between two agents in the simulator: the capabilities that make Element show its dial
//! pad, digits through a lossy, jittery, reordering and duplicating link arriving once each
//! and in order, and the typed errors of `send_dtmf`.

use std::time::Duration;

use call_assist::sim::net::LinkProfile;
use call_assist::sim::world::{World, WorldConfig};
use call_assist_core::{AgentEvent, ApiError, DtmfError};
use call_assist_tests::*;

/// Digits pressed in `call_id` as `agent` reported them, with their durations.
fn pressed(world: &World, agent: usize, call_id: &str) -> Vec<(char, u64)> {
    world.agents[agent]
        .call_events()
        .filter_map(|e| match e {
            AgentEvent::Dtmf {
                call_id: c,
                digit,
                duration_ms,
            } if c == call_id => Some((*digit, *duration_ms)),
            _ => None,
        })
        .collect()
}

fn digits(world: &World, agent: usize, call_id: &str) -> String {
    pressed(world, agent, call_id).iter().map(|p| p.0).collect()
}

/// A bad link: 15 % loss, jitter beyond the tone updates' spacing, reordering, duplicates.
fn bad_link(seed: u64) -> WorldConfig {
    WorldConfig {
        seed,
        link: LinkProfile {
            latency: Duration::from_millis(30),
            jitter: Duration::from_millis(25),
            loss: 0.15,
            burst: None,
            reorder: 0.1,
            duplicate: 0.05,
        },
        ..WorldConfig::default()
    }
}

#[test]
fn invites_and_answers_advertise_dtmf() {
    let mut scene = Scene::new(config(31));
    scene.connected_call();
    for kind in ["m.call.invite", "m.call.answer"] {
        let events = scene.stored(kind);
        assert_eq!(events.len(), 1, "{kind}: {events:?}");
        assert_eq!(events[0]["capabilities"]["m.call.dtmf"], true, "{kind}");
        let sdp = events[0][if kind == "m.call.invite" {
            "offer"
        } else {
            "answer"
        }]["sdp"]
            .as_str()
            .unwrap_or_default();
        assert!(sdp.contains("telephone-event/48000"), "{kind} SDP:\n{sdp}");
    }
}

#[test]
fn digits_arrive_once_each_and_in_order() {
    let mut scene = Scene::new(config(32));
    let call_id = scene.connected_call();
    let (alice, bob) = (scene.alice, scene.bob);
    let sent = scene
        .world
        .with_agent(alice, |a, now| a.send_dtmf(&call_id, "1234#*AD09", now));
    assert_eq!(sent, Ok(()));
    scene.world.run_for(Duration::from_secs(4));
    assert_eq!(digits(&scene.world, bob, &call_id), "1234#*AD09");
    for (digit, ms) in pressed(&scene.world, bob, &call_id) {
        assert_eq!(ms, 100, "digit {digit} lasted {ms} ms");
    }
    assert!(pressed(&scene.world, alice, &call_id).is_empty());
}

#[test]
fn digits_through_a_lossy_reordering_link_arrive_once_each_and_in_order() {
    for seed in 40..44 {
        let mut scene = Scene::new(bad_link(seed));
        let call_id = scene.connected_call();
        let (alice, bob) = (scene.alice, scene.bob);
        scene.world.run_for(Duration::from_secs(1));
        let sent = scene
            .world
            .with_agent(alice, |a, now| a.send_dtmf(&call_id, "1234#", now));
        assert_eq!(sent, Ok(()), "seed {seed}");
        // Five digits of 170 ms, then the end timeout for a last press without end report.
        scene.world.run_for(Duration::from_secs(3));
        let lost = scene.world.net.stats.lost;
        assert!(lost > 0, "seed {seed}: the link lost nothing");
        assert_eq!(
            digits(&scene.world, bob, &call_id),
            "1234#",
            "seed {seed} ({lost} datagrams lost)"
        );
    }
}

#[test]
fn digits_queue_behind_digits_still_playing() {
    let mut scene = Scene::new(config(33));
    let call_id = scene.connected_call();
    let (alice, bob) = (scene.alice, scene.bob);
    for part in ["12", "3", "45"] {
        let sent = scene
            .world
            .with_agent(alice, |a, now| a.send_dtmf(&call_id, part, now));
        assert_eq!(sent, Ok(()));
        scene.world.run_for(Duration::from_millis(50));
    }
    scene.world.run_for(Duration::from_secs(3));
    assert_eq!(digits(&scene.world, bob, &call_id), "12345");
}

#[test]
fn bad_digits_and_unknown_calls_are_typed_errors() {
    let mut scene = Scene::new(config(34));
    let call_id = scene.connected_call();
    let alice = scene.alice;
    let mut send = |call: &str, digits: &str| {
        scene
            .world
            .with_agent(alice, |a, now| a.send_dtmf(call, digits, now))
    };
    assert_eq!(
        send(&call_id, "12x"),
        Err(ApiError::Dtmf(DtmfError::InvalidDigit('x')))
    );
    assert_eq!(send(&call_id, ""), Err(ApiError::Dtmf(DtmfError::Empty)));
    assert!(matches!(
        send(&call_id, &"1".repeat(33)),
        Err(ApiError::Dtmf(DtmfError::TooLong { len: 33, max: 32 }))
    ));
    assert_eq!(send("nope", "1"), Err(ApiError::UnknownCall("nope".into())));
    assert_eq!(send(&call_id, &"1".repeat(32)), Ok(()));
    assert!(matches!(
        send(&call_id, "2"),
        Err(ApiError::Dtmf(DtmfError::QueueFull { .. }))
    ));
}

#[test]
fn digits_through_a_bad_link_replay_from_their_seed() {
    let run = || {
        let mut scene = Scene::new(bad_link(45));
        let call_id = scene.connected_call();
        let alice = scene.alice;
        let sent = scene
            .world
            .with_agent(alice, |a, now| a.send_dtmf(&call_id, "#1*2", now));
        assert_eq!(sent, Ok(()));
        scene.world.run_for(Duration::from_secs(3));
        assert_eq!(digits(&scene.world, scene.bob, &call_id), "#1*2");
        (scene.world.trace_hash(), scene.world.trace.len())
    };
    assert_eq!(run(), run());
}
