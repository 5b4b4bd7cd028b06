//! Calls between agents on a healthy network and homeserver: the m.call.* life cycle.

use std::time::Duration;

use call_assist::sim::world::World;
use call_assist_core::{AgentEvent, CallPolicy, CallState, HangupReason, Party};
use call_assist_tests::scenarios::{self, BasicCall};
use call_assist_tests::*;

/// After 3 s connected each side must have received at least this much (15 fps video and
/// 50 packets/s audio are sent, so this leaves room for setup and the first keyframe).
const MIN_VIDEO_FRAMES_3S: u64 = 25;
const MIN_AUDIO_FRAMES_3S: u64 = 100;

fn ringing(world: &World, i: usize, call_id: &str) -> bool {
    world.agents[i]
        .incoming_calls()
        .iter()
        .any(|c| c == call_id)
}

#[test]
fn basic_call_media_flows_both_ways_then_caller_hangs_up() {
    let BasicCall {
        scene,
        call_id,
        after_3s,
    } = scenarios::basic_call(config(1));
    let w = &scene.world;

    for (side, s) in ["alice", "bob"].iter().zip(after_3s) {
        assert!(
            s.video_frames_received >= MIN_VIDEO_FRAMES_3S,
            "{side} got {} video frames in 3 s",
            s.video_frames_received
        );
        assert!(
            s.audio_frames_received >= MIN_AUDIO_FRAMES_3S,
            "{side} got {} audio frames in 3 s",
            s.audio_frames_received
        );
    }
    assert_eq!(
        ending(w, scene.alice, &call_id),
        Some((HangupReason::UserHangup, Party::Local))
    );
    assert_eq!(
        ending(w, scene.bob, &call_id),
        Some((HangupReason::UserHangup, Party::Remote))
    );
    let hangups = scene.stored("m.call.hangup");
    assert_eq!(hangups.len(), 1, "{hangups:?}");
    assert_eq!(hangups[0]["reason"], "user_hangup");
    assert_eq!(
        hangups[0]["party_id"],
        w.agents[scene.alice].agent.party_id()
    );
    let selects = scene.stored("m.call.select_answer");
    assert_eq!(selects.len(), 1);
    assert_eq!(
        selects[0]["selected_party_id"],
        w.agents[scene.bob].agent.party_id()
    );
}

#[test]
fn known_candidates_are_in_the_invite_and_answer_sdp_and_not_trickled_again() {
    let BasicCall { scene, .. } = scenarios::basic_call(config(1));
    let sdp_candidates = |event: &str, key: &str| -> Vec<String> {
        let events = scene.stored(event);
        let sdp = events[0][key]["sdp"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        sdp.lines()
            .filter_map(|l| l.strip_prefix("a="))
            .filter(|l| l.starts_with("candidate:"))
            .map(str::to_owned)
            .collect()
    };
    let offered = sdp_candidates("m.call.invite", "offer");
    let answered = sdp_candidates("m.call.answer", "answer");
    assert!(
        offered.iter().any(|c| c.contains("typ host")),
        "{offered:?}"
    );
    assert!(
        answered.iter().any(|c| c.contains("typ host")),
        "{answered:?}"
    );
    // What went into an SDP is not sent again; the trickle still ends with end-of-candidates.
    let trickled: Vec<String> = scene
        .stored("m.call.candidates")
        .iter()
        .flat_map(|e| e["candidates"].as_array().cloned().unwrap_or_default())
        .map(|c| c["candidate"].as_str().unwrap_or_default().to_owned())
        .collect();
    for c in offered.iter().chain(&answered) {
        assert!(!trickled.contains(c), "{c} trickled again: {trickled:?}");
    }
    assert_eq!(
        trickled.iter().filter(|c| c.is_empty()).count(),
        2,
        "{trickled:?}"
    );
}

#[test]
fn callee_rejects_the_call() {
    let mut scene = Scene::new(config(2));
    let call_id = scene.world.place_call(scene.alice, &scene.room);
    let bob = scene.bob;
    assert!(scene
        .world
        .run_until(PATIENCE, |w| ringing(w, bob, &call_id)));

    let rejected = scene
        .world
        .with_agent(bob, |a, now| a.hangup(&call_id, now));
    assert_eq!(rejected, Ok(()));
    assert!(wait_ended(&mut scene.world, &[scene.alice], &call_id));

    let w = &scene.world;
    assert_eq!(
        ending(w, scene.alice, &call_id),
        Some((HangupReason::Rejected, Party::Remote))
    );
    assert_eq!(
        ending(w, bob, &call_id),
        Some((HangupReason::Rejected, Party::Local))
    );
    let rejects = scene.stored("m.call.reject");
    assert_eq!(rejects.len(), 1, "{rejects:?}");
    assert_eq!(rejects[0]["call_id"], call_id.as_str());
    assert_eq!(rejects[0]["party_id"], w.agents[bob].agent.party_id());
    assert!(scene.stored("m.call.answer").is_empty());
    assert!(!w.agents[scene.alice].reached(&call_id, CallState::Connecting));
}

#[test]
fn caller_hangs_up_before_the_answer() {
    let mut scene = Scene::new(config(3));
    let call_id = scene.world.place_call(scene.alice, &scene.room);
    let bob = scene.bob;
    assert!(scene
        .world
        .run_until(PATIENCE, |w| ringing(w, bob, &call_id)));

    let hung_up = scene
        .world
        .with_agent(scene.alice, |a, now| a.hangup(&call_id, now));
    assert_eq!(hung_up, Ok(()));
    assert!(wait_ended(&mut scene.world, &[bob], &call_id));

    let w = &scene.world;
    assert_eq!(
        ending(w, bob, &call_id),
        Some((HangupReason::UserHangup, Party::Remote))
    );
    assert_eq!(
        ending(w, scene.alice, &call_id),
        Some((HangupReason::UserHangup, Party::Local))
    );
    assert!(!w.agents[bob].reached(&call_id, CallState::Connecting));
    let hangups = scene.stored("m.call.hangup");
    assert_eq!(hangups.len(), 1);
    assert_eq!(hangups[0]["reason"], "user_hangup");
    // A ringing call that ended cannot be answered any more.
    assert!(scene
        .world
        .with_agent(bob, |a, now| a.answer(&call_id, now))
        .is_err());
}

#[test]
fn unanswered_invite_expires_after_its_lifetime() {
    let mut scene = Scene::new(config(4));
    let placed_at = scene.world.elapsed();
    let call_id = scene.world.place_call(scene.alice, &scene.room);
    assert!(wait_ended(
        &mut scene.world,
        &[scene.alice, scene.bob],
        &call_id
    ));
    scene.world.run_for(Duration::from_secs(1));

    let w = &scene.world;
    assert!(ringing(w, scene.bob, &call_id), "bob never rang");
    assert_eq!(
        ending(w, scene.alice, &call_id),
        Some((HangupReason::InviteTimeout, Party::Local))
    );
    let (reason, _) = ending(w, scene.bob, &call_id).unwrap_or_else(|| panic!("bob still rings"));
    assert_eq!(reason, HangupReason::InviteTimeout);

    let lifetime = Duration::from_secs(60);
    let margin = Duration::from_secs(2);
    let alice_end =
        reached_at(w, scene.alice, &call_id, CallState::Ended).unwrap_or_default() - placed_at;
    let bob_end =
        reached_at(w, scene.bob, &call_id, CallState::Ended).unwrap_or_default() - placed_at;
    assert!(
        alice_end >= lifetime && alice_end <= lifetime + margin,
        "alice gave up after {alice_end:?}"
    );
    assert!(
        bob_end + margin >= lifetime && bob_end <= lifetime + margin,
        "bob stopped ringing after {bob_end:?}"
    );

    let hangups = stored_for_call(w, &scene.room, "m.call.hangup", &call_id);
    assert_eq!(hangups.len(), 1, "{hangups:?}");
    assert_eq!(hangups[0]["reason"], "invite_timeout");
}

/// Seeds (from 1..40) where alice's call id sorts before bob's, and after, when both call at
/// the same instant after syncing.
fn glare_seeds() -> (u64, u64) {
    let mut alice_lesser = None;
    let mut alice_greater = None;
    for seed in 1..40 {
        let mut scene = Scene::new(config(seed));
        let a = scene.world.place_call(scene.alice, &scene.room);
        let b = scene.world.place_call(scene.bob, &scene.room);
        let slot = if a < b {
            &mut alice_lesser
        } else {
            &mut alice_greater
        };
        slot.get_or_insert(seed);
        if let (Some(l), Some(g)) = (alice_lesser, alice_greater) {
            return (l, g);
        }
    }
    panic!("no seeds for both orders: {alice_lesser:?} {alice_greater:?}");
}

#[test]
fn glare_lesser_call_id_wins_in_both_orders() {
    let (alice_lesser, alice_greater) = glare_seeds();
    for seed in [alice_lesser, alice_greater] {
        let g = scenarios::glare(config(seed));
        let (alice, bob) = (g.scene.alice, g.scene.bob);
        let w = &g.scene.world;
        let (winner, loser, loser_owner, winner_owner) = if g.alice_call < g.bob_call {
            (&g.alice_call, &g.bob_call, bob, alice)
        } else {
            (&g.bob_call, &g.alice_call, alice, bob)
        };
        assert_eq!(seed == alice_lesser, winner_owner == alice);

        for i in [alice, bob] {
            assert!(
                w.agents[i].reached(winner, CallState::Connected),
                "seed {seed}: {} did not connect the lesser call",
                w.agents[i].name
            );
            assert!(
                !w.agents[i].reached(loser, CallState::Connected),
                "seed {seed}: {} connected the greater call too",
                w.agents[i].name
            );
        }
        assert_eq!(
            w.agents[loser_owner].ended_reason(loser),
            Some(HangupReason::Replaced),
            "seed {seed}"
        );
        assert!(
            w.agents[loser_owner].call_events().any(|e| matches!(
                e, AgentEvent::CallReplaced { old, new } if old == loser && new == winner
            )),
            "seed {seed}: no CallReplaced"
        );
        // The winner's owner never rings for the greater call: it ignores that invite.
        assert!(!ringing(w, winner_owner, loser), "seed {seed}");
        assert_eq!(
            w.agents[winner_owner].ended_reason(winner),
            None,
            "seed {seed}"
        );
        assert_eq!(
            w.agents[loser_owner].ended_reason(winner),
            None,
            "seed {seed}"
        );
        let selects = stored_for_call(w, &g.scene.room, "m.call.select_answer", winner);
        assert_eq!(selects.len(), 1, "seed {seed}");
        assert_eq!(
            selects[0]["selected_party_id"],
            w.agents[loser_owner].agent.party_id()
        );
    }
}

#[test]
fn first_answer_of_two_callee_devices_is_selected() {
    let mut world = World::new(config(6));
    let alice = world.add_agent("alice", "alice", CallPolicy::Anyone);
    let phone = world.add_agent("bob-phone", "bob", CallPolicy::Anyone);
    let laptop = world.add_agent("bob-laptop", "bob", CallPolicy::Anyone);
    world.agent(phone).auto_answer = true;
    world.agent(laptop).auto_answer = true;
    let room = world.create_room(&[alice, phone]);
    assert!(world.run_until_synced());
    assert_ne!(
        world.agents[phone].agent.party_id(),
        world.agents[laptop].agent.party_id()
    );

    let call_id = world.place_call(alice, &room);
    assert!(world.run_until(PATIENCE, |w| {
        w.agents[alice].reached(&call_id, CallState::Connected)
            && [phone, laptop]
                .iter()
                .any(|d| w.agents[*d].reached(&call_id, CallState::Connected))
    }));
    world.run_for(Duration::from_secs(3));

    let (selected, other) = if world.agents[phone].reached(&call_id, CallState::Connected) {
        (phone, laptop)
    } else {
        (laptop, phone)
    };
    assert!(ringing(&world, phone, &call_id) && ringing(&world, laptop, &call_id));
    assert_eq!(
        stored(&world, &room, "m.call.answer").len(),
        2,
        "both devices answered"
    );
    let selects = stored(&world, &room, "m.call.select_answer");
    assert_eq!(selects.len(), 1, "{selects:?}");
    assert_eq!(
        selects[0]["selected_party_id"],
        world.agents[selected].agent.party_id()
    );

    assert_eq!(
        world.agents[other].ended_reason(&call_id),
        Some(HangupReason::AnsweredElsewhere)
    );
    assert!(!world.agents[other].reached(&call_id, CallState::Connected));
    assert_eq!(world.agents[selected].ended_reason(&call_id), None);
    assert_eq!(world.agents[alice].ended_reason(&call_id), None);

    for i in [alice, selected] {
        let s = stats(&world, i);
        assert!(
            s.video_frames_received >= MIN_VIDEO_FRAMES_3S
                && s.audio_frames_received >= MIN_AUDIO_FRAMES_3S,
            "{}: {s:?}",
            world.agents[i].name
        );
    }
    assert_eq!(stats(&world, other).frames_received, 0);
}

#[test]
fn renegotiation_works_in_both_directions() {
    let mut scene = Scene::new(config(8));
    let call_id = scene.connected_call();
    let (alice, bob) = (scene.alice, scene.bob);
    scene.world.run_for(Duration::from_secs(2));

    for (round, (offerer, answerer)) in [(alice, bob), (bob, alice)].into_iter().enumerate() {
        let expected = round + 1;
        let renegotiated = scene
            .world
            .with_agent(offerer, |a, now| a.renegotiate(&call_id, now));
        assert_eq!(renegotiated, Ok(()), "round {expected}");
        assert!(
            scene.world.run_until(PATIENCE, |w| {
                renegotiations(w, alice, &call_id) == expected
                    && renegotiations(w, bob, &call_id) == expected
            }),
            "round {expected}: alice {} bob {}",
            renegotiations(&scene.world, alice, &call_id),
            renegotiations(&scene.world, bob, &call_id)
        );

        let negotiates = stored_for_call(&scene.world, &scene.room, "m.call.negotiate", &call_id);
        assert_eq!(
            negotiates.len(),
            2 * expected,
            "round {expected}: {negotiates:?}"
        );
        let (offer, answer) = (&negotiates[2 * round], &negotiates[2 * round + 1]);
        assert_eq!(offer["description"]["type"], "offer");
        assert_eq!(
            offer["party_id"],
            scene.world.agents[offerer].agent.party_id()
        );
        assert_eq!(answer["description"]["type"], "answer");
        assert_eq!(
            answer["party_id"],
            scene.world.agents[answerer].agent.party_id()
        );

        let before = [stats(&scene.world, alice), stats(&scene.world, bob)];
        scene.world.run_for(Duration::from_secs(3));
        for (i, b) in [alice, bob].into_iter().zip(before) {
            let after = stats(&scene.world, i);
            assert!(
                after.video_frames_received >= b.video_frames_received + MIN_VIDEO_FRAMES_3S
                    && after.audio_frames_received >= b.audio_frames_received + MIN_AUDIO_FRAMES_3S,
                "round {expected}: {} media stalled after renegotiation: {b:?} -> {after:?}",
                scene.world.agents[i].name
            );
        }
    }
    for i in [alice, bob] {
        assert_eq!(scene.world.agents[i].ended_reason(&call_id), None);
        assert_eq!(
            scene.world.agents[i]
                .agent
                .call_info(&call_id)
                .map(|c| c.state),
            Some(CallState::Connected)
        );
    }
}

#[test]
fn the_pair_in_use_is_named_by_the_kinds_written_in_the_sdp() {
    // The candidates came in the invite and answer, not in m.call.candidates: the pair is
    // still host/host, not "prflx" (an address we had not been told about).
    let BasicCall { scene, call_id, .. } = scenarios::basic_call(config(1));
    for i in [scene.alice, scene.bob] {
        let info = scene.world.agents[i]
            .agent
            .call_info(&call_id)
            .expect("call known");
        assert_eq!(info.local_candidate.as_deref(), Some("host"));
        assert_eq!(info.remote_candidate.as_deref(), Some("host"));
    }
}
