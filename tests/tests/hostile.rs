//! Hostile and broken input: nothing a peer or a homeserver sends may crash the agent, wedge a
//! call or get media through without the right DTLS keys.

use std::time::Duration;

use call_assist::sim::world::World;
use call_assist_core::OwnedRoomId;
use call_assist_core::{AgentEvent, CallState};
use call_assist_tests::{config, Scene};
use serde_json::{json, Value};

/// Alice and Bob in a synced 1:1 room; Bob answers at once.
fn world(seed: u64) -> (World, usize, usize, OwnedRoomId) {
    let mut scene = Scene::new(config(seed));
    scene.world.agent(scene.bob).auto_answer = true;
    (scene.world, scene.alice, scene.bob, scene.room)
}

/// Flips the first hex digit of every `a=fingerprint:` line of an SDP.
fn spoil_fingerprint(sdp: &str) -> String {
    sdp.split("\r\n")
        .map(|l| match l.strip_prefix("a=fingerprint:sha-256 ") {
            Some(fp) => {
                let flipped = if fp.starts_with('A') { "B" } else { "A" };
                format!("a=fingerprint:sha-256 {flipped}{}", &fp[1..])
            }
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

#[test]
fn peer_whose_dtls_fingerprint_does_not_match_its_sdp_never_exchanges_media() {
    let (mut world, caller, callee, room) = world(21);
    world.hs.set_tamper(Box::new(|ty, content: &mut Value| {
        if ty == "m.call.invite" {
            if let Some(sdp) = content["offer"]["sdp"].as_str() {
                assert!(
                    sdp.contains("a=fingerprint:sha-256 "),
                    "offer carries a fingerprint"
                );
                content["offer"]["sdp"] = json!(spoil_fingerprint(sdp));
            }
        }
    }));
    let call_id = world.place_call(caller, &room);
    let ended = world.run_until(Duration::from_secs(60), |w| {
        w.agents[caller].ended_reason(&call_id).is_some()
            && w.agents[callee].ended_reason(&call_id).is_some()
    });
    assert!(ended, "the call ends by itself");
    assert!(
        world.agents[callee].incoming_calls().contains(&call_id),
        "the invite did ring"
    );
    for a in [caller, callee] {
        assert_eq!(
            world.agents[a].stats.frames_received, 0,
            "{} received media",
            world.agents[a].name
        );
        assert!(
            !world.agents[a].reached(&call_id, CallState::Connected),
            "{} connected",
            world.agents[a].name
        );
    }
}

#[test]
fn invite_in_a_public_room_is_not_rung() {
    let (mut world, caller, callee, one_to_one) = world(22);
    let users = [
        world.agents[caller].user_id.clone(),
        world.agents[callee].user_id.clone(),
    ];
    let refs: Vec<&call_assist_core::UserId> = users.iter().map(|u| u.as_ref()).collect();
    let unix = world.unix_ms();
    let public_room = world.hs.create_room(&refs, true, unix);
    // Both agents learn of the new room from their next sync.
    world.run_for(Duration::from_secs(2));
    let call_id = world.place_call(caller, &public_room);
    world.run_for(Duration::from_secs(5));
    assert!(
        world.agents[callee].incoming_calls().is_empty(),
        "rang in a public room"
    );
    assert!(!world.agents[caller].reached(&call_id, CallState::Connected));
    // Positive control: the same agents, the same call in their 1:1 room, rings.
    let call_id = world.place_call(caller, &one_to_one);
    world.run_for(Duration::from_secs(5));
    assert!(
        world.agents[callee].incoming_calls().contains(&call_id),
        "the control call in the 1:1 room did not ring"
    );
}

#[test]
fn replayed_invite_is_not_rung_again() {
    let (mut world, caller, callee, room) = world(23);
    let call_id = world.place_call(caller, &room);
    assert!(
        world.run_until(Duration::from_secs(10), |w| w.agents[callee]
            .reached(&call_id, CallState::Connected))
    );
    let _ = world.with_agent(caller, |a, now| a.hangup(&call_id, now));
    world.run_for(Duration::from_secs(2));
    let invite = world
        .hs
        .room_events(&room)
        .into_iter()
        .find(|e| e["type"] == "m.call.invite")
        .expect("the invite is stored");
    let alice = world.agents[caller].user_id.clone();
    let ts = invite["origin_server_ts"].as_u64().unwrap();
    // Right after the call, and again once the ended call is forgotten (its age then tells).
    for wait in [Duration::ZERO, Duration::from_secs(130)] {
        world.run_for(wait);
        world.hs.inject_event(
            &room,
            &alice,
            "m.call.invite",
            invite["content"].clone(),
            ts,
        );
        world.run_for(Duration::from_secs(3));
        assert_eq!(
            world.agents[callee].incoming_calls().len(),
            1,
            "replay rang after {wait:?}"
        );
    }
}

#[test]
fn a_flood_of_candidates_is_cut_off_and_the_call_goes_on() {
    let (mut world, caller, callee, room) = world(24);
    let call_id = world.place_call(caller, &room);
    assert!(
        world.run_until(Duration::from_secs(10), |w| w.agents[caller]
            .reached(&call_id, CallState::Connected))
    );
    let bob = world.agents[callee].user_id.clone();
    let bob_party = world.agents[callee].agent.party_id().to_owned();
    let unix = world.unix_ms();
    for batch in 0..50 {
        let candidates: Vec<Value> = (0..40)
            .map(|i| json!({"candidate": format!("candidate:{batch}{i} 1 udp 2130706431 198.51.100.{} {} typ host", i + 1, 10000 + batch), "sdpMid": "0", "sdpMLineIndex": 0}))
            .collect();
        world.hs.inject_event(
            &room,
            &bob,
            "m.call.candidates",
            json!({"call_id": call_id, "party_id": bob_party, "version": "1", "candidates": candidates}),
            unix,
        );
    }
    let before = world.agents[caller].stats.frames_received;
    world.run_for(Duration::from_secs(5));
    assert!(
        world.agents[caller].stats.frames_received > before + 100,
        "media stopped"
    );
    assert!(
        world.agents[caller].ended_reason(&call_id).is_none(),
        "the flood ended the call"
    );
    assert!(world.agents[caller].agent.outbox_len() < 4, "outbox grew");
    // The cap it claims: of ~2000 valid candidates, exactly the limit was taken.
    let taken = world.agents[caller]
        .agent
        .call_info(&call_id)
        .map(|i| i.remote_candidates);
    assert_eq!(taken, Some(call_assist_core::limits::MAX_REMOTE_CANDIDATES));
    // The flood reached the agent (2000 candidates) and nothing answered it in kind.
    let sent_candidates = world
        .hs
        .room_events(&room)
        .iter()
        .filter(|e| {
            e["type"] == "m.call.candidates" && e["sender"] == world.agents[caller].user_id.as_str()
        })
        .count();
    assert!(
        sent_candidates <= 2,
        "caller sent {sent_candidates} candidate events"
    );
    assert!(world.agents[caller]
        .events
        .iter()
        .all(|(_, e)| !matches!(e, AgentEvent::CallEnded { .. })));
}

#[test]
fn after_select_answer_events_from_other_parties_are_ignored() {
    let (mut world, caller, callee, room) = world(25);
    let call_id = world.place_call(caller, &room);
    assert!(world.run_until(Duration::from_secs(10), |w| {
        w.agents[caller].reached(&call_id, CallState::Connected)
    }));
    // Someone with bob's account but another device (party) tries to end or steer the call.
    let bob = world.agents[callee].user_id.clone();
    let unix = world.unix_ms();
    let other = "NOT-THE-SELECTED-PARTY";
    for (ty, content) in [
        (
            "m.call.hangup",
            json!({"call_id": call_id, "party_id": other, "version": "1", "reason": "user_hangup"}),
        ),
        (
            "m.call.negotiate",
            json!({"call_id": call_id, "party_id": other, "version": "1", "lifetime": 60000, "description": {"type": "offer", "sdp": "v=0\r\n"}}),
        ),
        (
            "m.call.candidates",
            json!({"call_id": call_id, "party_id": other, "version": "1", "candidates": [{"candidate": "candidate:1 1 udp 1 198.51.100.9 9 typ host", "sdpMid": "0", "sdpMLineIndex": 0}]}),
        ),
    ] {
        world.hs.inject_event(&room, &bob, ty, content, unix);
    }
    let before = world.agents[caller].stats.frames_received;
    world.run_for(Duration::from_secs(3));
    assert!(
        world.agents[caller].ended_reason(&call_id).is_none(),
        "a foreign party ended the call"
    );
    assert!(
        world.agents[caller].stats.frames_received > before + 50,
        "media stopped"
    );
    assert!(
        !world.agents[caller]
            .events
            .iter()
            .any(|(_, e)| matches!(e, AgentEvent::Renegotiated { .. })),
        "a foreign party renegotiated"
    );
    // The selected party can still end it.
    let _ = world.with_agent(callee, |a, now| a.hangup(&call_id, now));
    assert!(
        world.run_until(Duration::from_secs(10), |w| w.agents[caller]
            .ended_reason(&call_id)
            .is_some())
    );
}
