//! Which invites ring. The caller, @carol, is scripted: her events are injected into the
//! homeserver with the offer SDP of a real invite, and Bob's agent decides.

use std::time::Duration;

use call_assist::sim::world::World;
use call_assist_core::{CallPolicy, CallState, OwnedRoomId, OwnedUserId};
use call_assist_tests::*;
use serde_json::{json, Value};

const CAROL_PARTY: &str = "carolparty";

/// Bob's agent, synced, in a 1:1 room with the scripted @carol.
struct BobAndCarol {
    world: World,
    bob: usize,
    bob_id: OwnedUserId,
    carol: OwnedUserId,
    room: OwnedRoomId,
    offer_sdp: String,
}

impl BobAndCarol {
    fn new(seed: u64) -> Self {
        let mut world = World::new(config(seed));
        let bob = world.add_agent("bob", "bob", CallPolicy::Anyone);
        let bob_id = world.agents[bob].user_id.clone();
        let carol = world.hs.register_user("carol", "pw-carol");
        let unix = world.unix_ms();
        let room = world.hs.create_room(&[&carol, &bob_id], false, unix);
        assert!(world.run_until_synced());
        BobAndCarol {
            world,
            bob,
            bob_id,
            carol,
            room,
            offer_sdp: real_offer_sdp(),
        }
    }

    /// A version 1 invite from Carol for Bob.
    fn invite(&self, call_id: &str) -> Value {
        json!({
            "call_id": call_id,
            "party_id": CAROL_PARTY,
            "version": "1",
            "lifetime": 60000,
            "invitee": self.bob_id,
            "offer": {"type": "offer", "sdp": self.offer_sdp},
        })
    }

    /// Carol sends `content` into `room`, stamped `age` ago; then 2 s pass.
    fn carol_sends(&mut self, room: &OwnedRoomId, event_type: &str, content: Value, age: Duration) {
        let stamped = self.world.unix_ms() - age.as_millis() as u64;
        let id = self
            .world
            .hs
            .inject_event(room, &self.carol, event_type, content, stamped);
        assert!(!id.is_empty(), "room {room} unknown to the homeserver");
        self.world.run_for(Duration::from_secs(2));
    }

    fn rang(&self, call_id: &str) -> bool {
        self.world.agents[self.bob]
            .incoming_calls()
            .iter()
            .any(|c| c == call_id)
    }
}

#[test]
fn invite_from_a_1to1_peer_rings() {
    let mut s = BobAndCarol::new(21);
    let invite = s.invite("good");
    let room = s.room.clone();
    s.carol_sends(&room, "m.call.invite", invite, Duration::ZERO);
    assert!(s.rang("good"));
    assert!(s.world.agents[s.bob].reached("good", CallState::Ringing));
}

#[test]
fn invite_in_a_room_with_three_members_is_not_rung() {
    let mut s = BobAndCarol::new(22);
    let dave = s.world.hs.register_user("dave", "pw-dave");
    let unix = s.world.unix_ms();
    let (carol, bob_id) = (s.carol.clone(), s.bob_id.clone());
    let group = s
        .world
        .hs
        .create_room(&[&carol, &bob_id, &dave], false, unix);
    s.world.run_for(Duration::from_secs(1));

    let invite = s.invite("in-a-group");
    s.carol_sends(&group, "m.call.invite", invite, Duration::ZERO);
    assert!(!s.rang("in-a-group"), "an invite in a 3 member room rang");

    let invite = s.invite("in-the-1to1");
    let room = s.room.clone();
    s.carol_sends(&room, "m.call.invite", invite, Duration::ZERO);
    assert!(
        s.rang("in-the-1to1"),
        "the same invite in the 1:1 room did not ring"
    );
}

#[test]
fn invite_naming_another_invitee_is_not_rung() {
    let mut s = BobAndCarol::new(23);
    let mut invite = s.invite("for-dave");
    invite["invitee"] = json!("@dave:sim.local");
    let room = s.room.clone();
    s.carol_sends(&room, "m.call.invite", invite, Duration::ZERO);
    assert!(!s.rang("for-dave"), "an invite for @dave rang for bob");

    let mut invite = s.invite("for-anyone");
    if let Some(obj) = invite.as_object_mut() {
        obj.remove("invitee");
    }
    s.carol_sends(&room, "m.call.invite", invite, Duration::ZERO);
    assert!(
        s.rang("for-anyone"),
        "an invite without invitee did not ring"
    );
}

#[test]
fn invite_past_lifetime_is_ignored() {
    let mut s = BobAndCarol::new(24);
    let room = s.room.clone();
    let mut invite = s.invite("stale");
    invite["lifetime"] = json!(1000);
    s.carol_sends(&room, "m.call.invite", invite, Duration::from_secs(5));
    assert!(
        !s.rang("stale"),
        "an invite sent 5 s ago with a 1 s lifetime rang"
    );
}

#[test]
fn invite_sent_while_the_callee_was_offline_rings_only_for_the_rest_of_its_lifetime() {
    let mut s = BobAndCarol::new(27);
    let room = s.room.clone();
    let now = s.world.now();
    s.world.hs.set_down(true, now);
    s.world.run_for(Duration::from_secs(1));

    let mut short = s.invite("short");
    short["lifetime"] = json!(1000);
    let mut long = s.invite("long");
    long["lifetime"] = json!(20_000);
    let sent_at = s.world.elapsed();
    for (call_id, invite) in [("short", short), ("long", long)] {
        let unix = s.world.unix_ms();
        let id = s
            .world
            .hs
            .inject_event(&room, &s.carol, "m.call.invite", invite, unix);
        assert!(!id.is_empty(), "{call_id} not stored");
    }
    s.world.run_for(Duration::from_secs(5));
    let now = s.world.now();
    s.world.hs.set_down(false, now);
    let bob = s.bob;
    assert!(s
        .world
        .run_until(PATIENCE, |w| w.agents[bob].ended_reason("long").is_some()));

    assert!(
        !s.rang("short"),
        "a 1 s invite rang after the callee was offline for 5 s"
    );
    assert!(
        s.rang("long"),
        "a 20 s invite did not ring after 5 s offline"
    );
    assert_eq!(
        s.world.agents[bob].ended_reason("long"),
        Some(call_assist_core::HangupReason::InviteTimeout)
    );
    let rang_at =
        reached_at(&s.world, bob, "long", CallState::Ringing).unwrap_or_default() - sent_at;
    let ended_at =
        reached_at(&s.world, bob, "long", CallState::Ended).unwrap_or_default() - sent_at;
    assert!(
        rang_at >= Duration::from_secs(5),
        "rang {rang_at:?} after it was sent"
    );
    // The lifetime counts from when Carol sent it, not from when Bob heard of it.
    assert!(
        ended_at >= Duration::from_millis(19_500) && ended_at <= Duration::from_millis(20_500),
        "stopped ringing {ended_at:?} after it was sent"
    );
}

#[test]
fn version_0_invite_rings_and_is_answered_without_party_id() {
    let mut s = BobAndCarol::new(25);
    let room = s.room.clone();
    let invite = json!({
        "call_id": "legacy",
        "version": 0,
        "lifetime": 60000,
        "offer": {"type": "offer", "sdp": s.offer_sdp},
    });
    s.carol_sends(&room, "m.call.invite", invite, Duration::ZERO);
    assert!(s.rang("legacy"), "a version 0 invite did not ring");

    let answered = s.world.with_agent(s.bob, |a, now| a.answer("legacy", now));
    assert_eq!(answered, Ok(()));
    s.world.run_for(Duration::from_secs(1));
    assert!(s.world.agents[s.bob].reached("legacy", CallState::Connecting));

    let answers = stored_for_call(&s.world, &room, "m.call.answer", "legacy");
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0].get("party_id"), None, "a v0 peer got a party_id");
    assert_eq!(answers[0]["version"], "0");
    assert_eq!(answers[0]["answer"]["type"], "answer");
    assert!(answers[0]["answer"]["sdp"]
        .as_str()
        .is_some_and(|sdp| sdp.starts_with("v=0")));
}

/// Carol's candidate for Bob to check: an address no agent listens on.
const CAROL_CANDIDATE: &str = "candidate:1 1 udp 2130706431 192.0.2.99 5000 typ host";

/// Carol sends an invite (with her candidates first when `early_candidates`), Bob answers;
/// returns whether it rang and how many datagrams went out in the 3 s after the answer.
fn answer_invite_with_candidates_first(early_candidates: bool) -> (bool, u64) {
    let mut s = BobAndCarol::new(26);
    let room = s.room.clone();
    if early_candidates {
        let candidates = json!({
            "call_id": "early", "party_id": CAROL_PARTY, "version": "1",
            "candidates": [
                {"candidate": CAROL_CANDIDATE, "sdpMid": "0", "sdpMLineIndex": 0},
                {"candidate": "", "sdpMid": "0", "sdpMLineIndex": 0},
            ],
        });
        s.carol_sends(&room, "m.call.candidates", candidates, Duration::ZERO);
        assert!(!s.rang("early"), "candidates alone rang");
    }
    let invite = s.invite("early");
    s.carol_sends(&room, "m.call.invite", invite, Duration::ZERO);
    let rang = s.rang("early");
    if rang {
        let answered = s.world.with_agent(s.bob, |a, now| a.answer("early", now));
        assert_eq!(answered, Ok(()));
    }
    let sent = s.world.net.stats.sent;
    s.world.run_for(Duration::from_secs(3));
    assert!(s.world.agents[s.bob].reached("early", CallState::Connecting));
    assert_eq!(s.world.agents[s.bob].ended_reason("early"), None);
    (rang, s.world.net.stats.sent - sent)
}

#[test]
fn candidates_arriving_before_their_invite_are_kept() {
    let (rang, checks) = answer_invite_with_candidates_first(true);
    assert!(rang, "the invite after its candidates did not ring");
    // Bob's only way to know Carol's address is the early candidate: ICE checks prove it
    // was kept and applied.
    assert!(
        checks > 0,
        "no connectivity checks towards the early candidate"
    );

    let (rang, checks) = answer_invite_with_candidates_first(false);
    assert!(rang);
    assert_eq!(checks, 0, "without candidates bob has nobody to check");
}

impl BobAndCarol {
    /// Carol sends several events at once: they reach Bob in one /sync batch.
    fn carol_sends_together(&mut self, room: &OwnedRoomId, events: Vec<(&str, Value)>) {
        let unix = self.world.unix_ms();
        let n = events.len();
        let ids = self.world.hs.inject_batch(room, &self.carol, events, unix);
        assert_eq!(ids.len(), n);
        self.world.run_for(Duration::from_secs(2));
    }

    /// What Bob sent in `room` for `call_id`: the event types.
    fn bob_sent(&self, room: &OwnedRoomId, call_id: &str) -> Vec<String> {
        self.world
            .hs
            .room_events(room)
            .iter()
            .filter(|e| e["sender"] == self.bob_id.as_str() && e["content"]["call_id"] == call_id)
            .map(|e| e["type"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

#[test]
fn invite_hung_up_in_the_same_sync_is_not_rung() {
    let mut s = BobAndCarol::new(31);
    let room = s.room.clone();
    let hangup = json!({"call_id": "gone", "party_id": CAROL_PARTY, "version": "1",
        "reason": "user_hangup"});
    let invite = s.invite("gone");
    s.carol_sends_together(
        &room,
        vec![("m.call.invite", invite), ("m.call.hangup", hangup)],
    );
    assert!(
        !s.rang("gone"),
        "an invite its own sync batch hangs up rang"
    );
    // Positive control: the same batch without the hangup rings.
    let invite = s.invite("live");
    s.carol_sends_together(&room, vec![("m.call.invite", invite)]);
    assert!(s.rang("live"));
}

#[test]
fn a_retried_invite_replaces_the_unconnected_one() {
    let mut s = BobAndCarol::new(32);
    let room = s.room.clone();
    let first = s.invite("first");
    s.carol_sends(&room, "m.call.invite", first, Duration::ZERO);
    assert!(s.rang("first"));
    let second = s.invite("second");
    s.carol_sends(&room, "m.call.invite", second, Duration::ZERO);
    assert!(s.rang("second"), "the retry did not ring");
    let bob = &s.world.agents[s.bob];
    assert!(
        bob.reached("first", CallState::Ended),
        "the first call still rings"
    );
    assert!(bob.reached("second", CallState::Ringing));
    assert_eq!(s.bob_sent(&room, "first"), ["m.call.reject"]);
}

#[test]
fn invites_beyond_a_peers_unconnected_limit_are_answered_busy() {
    let mut s = BobAndCarol::new(33);
    let (carol, bob_id) = (s.carol.clone(), s.bob_id.clone());
    let mut rooms = Vec::new();
    for _ in 0..3 {
        let unix = s.world.unix_ms();
        rooms.push(s.world.hs.create_room(&[&carol, &bob_id], false, unix));
    }
    s.world.run_for(Duration::from_secs(1));
    for (i, room) in rooms.iter().enumerate() {
        let invite = s.invite(&format!("burst{i}"));
        s.carol_sends(room, "m.call.invite", invite, Duration::ZERO);
    }
    assert!(s.rang("burst0") && s.rang("burst1"));
    assert!(
        !s.rang("burst2"),
        "a third unconnected call from one peer rang"
    );
    assert_eq!(
        s.bob_sent(&rooms[2], "burst2"),
        ["m.call.reject"],
        "the busy invite was not answered"
    );
    // A version 0 invite has no reject: it gets a user_busy hangup.
    let v0 = json!({"call_id": "old-client", "version": 0, "lifetime": 60000,
        "offer": {"type": "offer", "sdp": s.offer_sdp}});
    let room = rooms[2].clone();
    s.carol_sends(&room, "m.call.invite", v0, Duration::ZERO);
    let hangup: Vec<Value> = s
        .world
        .hs
        .room_events(&room)
        .into_iter()
        .filter(|e| e["sender"] == s.bob_id.as_str() && e["content"]["call_id"] == "old-client")
        .collect();
    assert_eq!(hangup.len(), 1, "{hangup:?}");
    assert_eq!(hangup[0]["type"], "m.call.hangup");
    assert_eq!(hangup[0]["content"]["reason"], "user_busy");
}

#[test]
fn an_invite_with_an_unusable_offer_is_rejected_not_left_ringing() {
    let mut s = BobAndCarol::new(34);
    let room = s.room.clone();
    let mut invite = s.invite("garbage");
    invite["offer"]["sdp"] = json!("v=0\r\nthis is not an offer\r\n");
    s.carol_sends(&room, "m.call.invite", invite, Duration::ZERO);
    assert!(!s.rang("garbage"));
    assert_eq!(s.bob_sent(&room, "garbage"), ["m.call.reject"]);
}
