//! Calls under a bad network, a failing homeserver and a misbehaving peer.

use std::time::Duration;

use call_assist::sim::homeserver::Fault;
use call_assist_core::{AgentEvent, CallState, HangupReason, Party};
use call_assist_tests::scenarios::{self, LossyCall, Outage};
use call_assist_tests::*;
use serde_json::{json, Value};

#[test]
fn call_connects_over_a_lossy_link_with_300ms_rtt() {
    let LossyCall {
        scene,
        call_id,
        connected,
    } = scenarios::lossy_call(11);
    let w = &scene.world;
    assert!(connected, "no connection with 10 % loss and 300 ms RTT");
    assert!(
        w.net.stats.lost > 0,
        "the link lost nothing: {:?}",
        w.net.stats
    );
    // 5 s connected: 75 video frames and 250 audio packets were sent each way.
    for i in [scene.alice, scene.bob] {
        let s = stats(w, i);
        assert!(
            s.video_frames_received >= 30 && s.audio_frames_received >= 150,
            "{}: {s:?}",
            w.agents[i].name
        );
        assert_eq!(w.agents[i].ended_reason(&call_id), None);
    }
}

#[test]
fn lost_video_makes_the_receiver_ask_for_keyframes_and_the_sender_answers() {
    // 20 % loss at 100 ms RTT for 20 s: NACKs recover most packets, not all.
    let mut scene = Scene::new(lossy_config(5, 50, 0.2));
    scene.world.agent(scene.bob).auto_answer = true;
    let call_id = scene.world.place_call(scene.alice, &scene.room);
    assert!(wait_connected(
        &mut scene.world,
        &[scene.alice, scene.bob],
        &call_id
    ));
    let start = scene.world.elapsed();
    scene.world.run_for(Duration::from_secs(20));
    let w = &scene.world;
    for (rx, tx) in [(scene.alice, scene.bob), (scene.bob, scene.alice)] {
        let asked = w.agents[rx]
            .agent
            .call_info(&call_id)
            .map_or(0, |i| i.keyframes_requested);
        let answered: Vec<Duration> = w.agents[tx]
            .events
            .iter()
            .filter(
                |(_, e)| matches!(e, AgentEvent::KeyframeRequested { call_id: c } if *c == call_id),
            )
            .map(|(t, _)| *t)
            .collect();
        let (rxn, txn) = (&w.agents[rx].name, &w.agents[tx].name);
        assert!(asked >= 1, "{rxn} lost video but asked for no keyframe");
        // Each request crosses the lossy link or not; some arrive.
        assert!(
            !answered.is_empty() && answered.len() as u64 <= asked,
            "{txn} saw {} of {rxn}'s {asked} keyframe requests",
            answered.len()
        );
        // At most one request per second of the call.
        let connected_s = (w.elapsed() - start).as_secs() + 1;
        assert!(
            asked <= connected_s,
            "{rxn} asked {asked} times in {connected_s} s"
        );
    }
}

#[test]
fn homeserver_down_for_10s_mid_call_media_continues_and_signalling_recovers() {
    let Outage {
        scene,
        call_id,
        at_outage,
        five_s_into_outage,
        bob_ended_before_recovery,
    } = scenarios::homeserver_outage(config(12));
    let w = &scene.world;

    for (k, i) in [scene.alice, scene.bob].into_iter().enumerate() {
        // 5 s of 15 fps video and 50 packets/s audio.
        assert!(
            five_s_into_outage[k] >= at_outage[k] + 200,
            "{}: media stalled with the homeserver down: {} -> {}",
            w.agents[i].name,
            at_outage[k],
            five_s_into_outage[k]
        );
        assert_eq!(
            reachability(w, i),
            vec![false, true],
            "{}",
            w.agents[i].name
        );
    }
    assert!(
        !bob_ended_before_recovery,
        "bob heard of the hangup while the homeserver was down"
    );
    assert_eq!(
        ending(w, scene.bob, &call_id),
        Some((HangupReason::UserHangup, Party::Remote)),
        "the hangup sent during the outage never arrived"
    );
    let hangups = scene.stored("m.call.hangup");
    assert_eq!(hangups.len(), 1, "{hangups:?}");
    assert_eq!(hangups[0]["reason"], "user_hangup");
}

/// Events a broken or hostile peer might send about `call_id`, as `party`.
fn garbage_call_events(call_id: &str, party: &str) -> Vec<(&'static str, Value)> {
    vec![
        ("m.call.candidates", json!("not an object")),
        ("m.call.candidates", json!([call_id, party])),
        (
            "m.call.candidates",
            json!({"call_id": call_id, "party_id": party, "version": "1", "candidates": "not a list"}),
        ),
        (
            "m.call.candidates",
            json!({"call_id": call_id, "party_id": party, "version": "1", "candidates": [
                {"candidate": "garbage", "sdpMid": "0", "sdpMLineIndex": 0},
                {"candidate": "candidate:x 1 udp notanumber 999.1.2.3 -5 typ nonsense", "sdpMid": "0", "sdpMLineIndex": 0},
                {"candidate": "a=candidate:\u{0}\u{1}\u{2}", "sdpMid": "0", "sdpMLineIndex": 0},
            ]}),
        ),
        (
            "m.call.candidates",
            json!({"call_id": call_id, "party_id": party, "version": "1", "candidates": [{"sdpMid": "0"}]}),
        ),
        (
            "m.call.negotiate",
            json!({"call_id": call_id, "party_id": party, "version": "1", "lifetime": 60000,
                "description": {"type": "offer", "sdp": "v=0\r\nthis is no SDP\r\n"}}),
        ),
        (
            "m.call.negotiate",
            json!({"call_id": call_id, "party_id": party, "version": "1", "lifetime": 60000,
                "description": {"type": "answer", "sdp": "garbage"}}),
        ),
        (
            "m.call.hangup",
            json!({"call_id": 12345, "party_id": party, "version": "1", "reason": "user_hangup"}),
        ),
        (
            "m.call.hangup",
            json!({"call_id": call_id, "party_id": party, "version": {"major": 1}, "reason": "user_hangup"}),
        ),
    ]
}

#[test]
fn malformed_call_events_and_sdp_are_dropped_and_the_call_goes_on() {
    let ((scene, call_id, before), logs) = capture_warnings(|| {
        let mut scene = Scene::new(config(13));
        let call_id = scene.connected_call();
        scene.world.run_for(Duration::from_secs(1));
        let before = [
            stats(&scene.world, scene.alice),
            stats(&scene.world, scene.bob),
        ];
        // Each side gets the garbage from the other side's user and party.
        for from in [scene.bob, scene.alice] {
            let sender = scene.world.agents[from].user_id.clone();
            let party = scene.world.agents[from].agent.party_id().to_owned();
            for (event_type, content) in garbage_call_events(&call_id, &party) {
                let unix = scene.world.unix_ms();
                scene
                    .world
                    .hs
                    .inject_event(&scene.room, &sender, event_type, content, unix);
                scene.world.run_for(Duration::from_millis(100));
            }
        }
        scene.world.run_for(Duration::from_secs(3));
        (scene, call_id, before)
    });
    let w = &scene.world;
    for (i, b) in [scene.alice, scene.bob].into_iter().zip(before) {
        let name = &w.agents[i].name;
        assert_eq!(
            w.agents[i].ended_reason(&call_id),
            None,
            "{name} ended the call"
        );
        assert_eq!(
            w.agents[i].agent.call_info(&call_id).map(|c| c.state),
            Some(CallState::Connected),
            "{name}"
        );
        let after = stats(w, i);
        assert!(
            after.video_frames_received >= b.video_frames_received + 60
                && after.audio_frames_received >= b.audio_frames_received + 200,
            "{name}: media stalled: {b:?} -> {after:?}"
        );
    }
    for expected in [
        "dropped malformed call event",
        "malformed remote candidate dropped",
        "negotiate offer with bad SDP dropped",
    ] {
        assert!(
            logs.contains(expected),
            "no warning {expected:?} in:\n{logs}"
        );
    }
}

#[test]
fn invite_with_garbage_sdp_is_not_rung_and_a_later_call_works() {
    let (mut scene, logs) = capture_warnings(|| {
        let mut scene = Scene::new(config(14));
        let alice_id = scene.world.agents[scene.alice].user_id.clone();
        let bob_id = scene.world.agents[scene.bob].user_id.clone();
        let unix = scene.world.unix_ms();
        let invite = json!({
            "call_id": "garbage-offer", "party_id": "mallory", "version": "1", "lifetime": 60000,
            "invitee": bob_id, "offer": {"type": "offer", "sdp": "v=0\r\nm=garbage\r\n"},
        });
        scene
            .world
            .hs
            .inject_event(&scene.room, &alice_id, "m.call.invite", invite, unix);
        scene.world.run_for(Duration::from_secs(2));
        scene
    });
    assert!(
        scene.world.agents[scene.bob].incoming_calls().is_empty(),
        "an invite with garbage SDP rang"
    );
    assert!(logs.contains("invite refused"), "no warning in:\n{logs}");

    let call_id = scene.connected_call();
    assert_eq!(
        scene.world.agents[scene.bob].incoming_calls(),
        vec![call_id]
    );
}

#[test]
fn call_connects_after_429_once_retry_after_has_passed() {
    let mut scene = Scene::new(config(15));
    scene.world.agent(scene.bob).auto_answer = true;
    let retry_after = Duration::from_millis(2000);
    scene.world.hs.fail_next(
        1,
        Fault::Status429 {
            retry_after_ms: retry_after.as_millis() as u64,
        },
    );
    let placed_at = scene.world.elapsed();
    let call_id = scene.world.place_call(scene.alice, &scene.room);
    assert!(wait_connected(
        &mut scene.world,
        &[scene.alice, scene.bob],
        &call_id
    ));

    let w = &scene.world;
    let rang_at = reached_at(w, scene.bob, &call_id, CallState::Ringing).unwrap_or_default();
    let connected_at =
        reached_at(w, scene.alice, &call_id, CallState::Connected).unwrap_or_default();
    assert!(
        rang_at - placed_at >= retry_after,
        "the invite was retried after {:?}",
        rang_at - placed_at
    );
    assert!(connected_at - placed_at >= retry_after);
    assert_eq!(
        scene.stored("m.call.invite").len(),
        1,
        "the rate-limited send stored nothing"
    );
    assert!(
        !reachability(w, scene.alice).contains(&false),
        "a 429 means the homeserver is there"
    );
}

#[test]
fn call_connects_after_two_502s_with_backoff() {
    let mut scene = Scene::new(config(16));
    scene.world.agent(scene.bob).auto_answer = true;
    scene.world.hs.fail_next(2, Fault::Status502);
    let placed_at = scene.world.elapsed();
    let call_id = scene.world.place_call(scene.alice, &scene.room);
    assert!(wait_connected(
        &mut scene.world,
        &[scene.alice, scene.bob],
        &call_id
    ));

    let w = &scene.world;
    let rang_at = reached_at(w, scene.bob, &call_id, CallState::Ringing).unwrap_or_default();
    // Backoff 500 ms then 1 s, each -20 % at worst.
    assert!(
        rang_at - placed_at >= Duration::from_millis(1200),
        "the invite went through after {:?}",
        rang_at - placed_at
    );
    assert_eq!(scene.stored("m.call.invite").len(), 1);
    assert_eq!(reachability(w, scene.alice).last(), Some(&true));
}
