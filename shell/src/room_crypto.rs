//! What an encryption layer between the core and the homeserver reads and rewrites, as JSON:
//! which of the core's requests concern it (syncs, call event sends), which rooms are
//! encrypted and who is in them, the encrypted timeline events of a /sync answer, and the
//! plaintext events that replace them. Shared by the real layer (`e2ee`, matrix-sdk-crypto)
//! and the simulator's seeded stand-in (`sim::crypto`), so both rewrite the same way.

use std::collections::{BTreeMap, BTreeSet};

use ruma::{OwnedRoomId, OwnedUserId};
use serde_json::{json, Map, Value};
use tracing::warn;

/// Rooms tracked; past this, new rooms are not (their sends fail closed if encrypted).
pub(crate) const MAX_ROOMS: usize = 1024;
/// Members tracked per room; past this, key sharing misses the newest members.
pub(crate) const MAX_MEMBERS: usize = 256;

#[derive(Debug, Default, Clone)]
pub(crate) struct RoomCrypto {
    /// The content of the room's `m.room.encryption` state event, once seen.
    pub encryption: Option<Value>,
    /// Joined and invited members: who gets the room key.
    pub members: BTreeSet<OwnedUserId>,
}

/// Where a timeline event sits in a sync answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Slot {
    pub room: OwnedRoomId,
    pub index: usize,
}

/// Updates `rooms` from the answer's state (joined rooms' state and timeline, invites'
/// stripped state, left rooms). Returns users newly seen in a room, for device tracking.
pub(crate) fn track_rooms(
    rooms: &mut BTreeMap<OwnedRoomId, RoomCrypto>,
    body: &Value,
) -> BTreeSet<OwnedUserId> {
    let mut new_users = BTreeSet::new();
    let sections = [
        ("join", &["state", "timeline"][..]),
        ("invite", &["invite_state"][..]),
    ];
    for (section, parts) in sections {
        let Some(map) = body
            .pointer(&format!("/rooms/{section}"))
            .and_then(Value::as_object)
        else {
            continue;
        };
        for (room_id, room) in map {
            let Ok(room_id) = OwnedRoomId::try_from(room_id.as_str()) else {
                continue;
            };
            if !rooms.contains_key(&room_id) && rooms.len() >= MAX_ROOMS {
                warn!("encryption: room limit reached; a new room is not tracked");
                continue;
            }
            let info = rooms.entry(room_id).or_default();
            for part in parts {
                let events = room
                    .pointer(&format!("/{part}/events"))
                    .and_then(Value::as_array);
                for ev in events.into_iter().flatten() {
                    apply_state(info, ev, &mut new_users);
                }
            }
        }
    }
    if let Some(left) = body.pointer("/rooms/leave").and_then(Value::as_object) {
        for room_id in left.keys() {
            if let Ok(room_id) = OwnedRoomId::try_from(room_id.as_str()) {
                rooms.remove(&room_id);
            }
        }
    }
    new_users
}

fn apply_state(info: &mut RoomCrypto, ev: &Value, new_users: &mut BTreeSet<OwnedUserId>) {
    let Some(state_key) = ev.get("state_key").and_then(Value::as_str) else {
        return;
    };
    let content = ev.get("content").cloned().unwrap_or(Value::Null);
    match ev.get("type").and_then(Value::as_str) {
        // Encryption cannot be turned off in a room: the first content seen stays.
        Some("m.room.encryption")
            if state_key.is_empty()
                && info.encryption.is_none()
                && content.get("algorithm").is_some() =>
        {
            info.encryption = Some(content);
        }
        Some("m.room.member") => {
            let Ok(user) = OwnedUserId::try_from(state_key) else {
                return;
            };
            let membership = content.get("membership").and_then(Value::as_str);
            if matches!(membership, Some("join" | "invite")) {
                if info.members.len() < MAX_MEMBERS && info.members.insert(user.clone()) {
                    new_users.insert(user);
                }
            } else {
                info.members.remove(&user);
            }
        }
        _ => {}
    }
}

/// Encrypted rooms and their members, to compare before and after a sync.
#[cfg_attr(not(feature = "e2ee"), allow(dead_code))] // the real layer's warm-up only
pub(crate) fn encrypted_members(
    rooms: &BTreeMap<OwnedRoomId, RoomCrypto>,
) -> BTreeMap<OwnedRoomId, BTreeSet<OwnedUserId>> {
    rooms
        .iter()
        .filter(|(_, r)| r.encryption.is_some())
        .map(|(id, r)| (id.clone(), r.members.clone()))
        .collect()
}

/// Rooms that are encrypted now and were not, or whose members changed.
#[cfg_attr(not(feature = "e2ee"), allow(dead_code))] // the real layer's warm-up only
pub(crate) fn changed_encrypted_rooms(
    before: &BTreeMap<OwnedRoomId, BTreeSet<OwnedUserId>>,
    now: &BTreeMap<OwnedRoomId, RoomCrypto>,
) -> Vec<OwnedRoomId> {
    now.iter()
        .filter(|(id, r)| r.encryption.is_some() && before.get(*id) != Some(&r.members))
        .map(|(id, _)| id.clone())
        .collect()
}

/// The joined rooms' timeline events of type `m.room.encrypted`, in order.
pub(crate) fn encrypted_slots(body: &Value) -> Vec<Slot> {
    let mut out = Vec::new();
    for (room, events) in timelines(body) {
        for (index, ev) in events.iter().enumerate() {
            if ev.get("type").and_then(Value::as_str) == Some("m.room.encrypted") {
                out.push(Slot {
                    room: room.clone(),
                    index,
                });
            }
        }
    }
    out
}

/// Plaintext `m.call.*` events in encrypted rooms: nobody honest sends them, so they are
/// dropped before the core sees them.
pub(crate) fn drop_plaintext_calls(
    body: &mut Value,
    rooms: &BTreeMap<OwnedRoomId, RoomCrypto>,
) -> usize {
    let mut dropped = 0;
    let Some(join) = body
        .pointer_mut("/rooms/join")
        .and_then(Value::as_object_mut)
    else {
        return 0;
    };
    for (room_id, room) in join.iter_mut() {
        let encrypted = OwnedRoomId::try_from(room_id.as_str())
            .ok()
            .and_then(|r| rooms.get(&r))
            .is_some_and(|r| r.encryption.is_some());
        if !encrypted {
            continue;
        }
        if let Some(events) = room
            .pointer_mut("/timeline/events")
            .and_then(Value::as_array_mut)
        {
            let before = events.len();
            events.retain(|ev| {
                !ev.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t.starts_with("m.call."))
            });
            dropped += before - events.len();
        }
    }
    dropped
}

fn timelines(body: &Value) -> Vec<(OwnedRoomId, &Vec<Value>)> {
    let Some(join) = body.pointer("/rooms/join").and_then(Value::as_object) else {
        return Vec::new();
    };
    join.iter()
        .filter_map(|(room_id, room)| {
            let room_id = OwnedRoomId::try_from(room_id.as_str()).ok()?;
            let events = room.pointer("/timeline/events")?.as_array()?;
            Some((room_id, events))
        })
        .collect()
}

pub(crate) fn event_at<'a>(body: &'a Value, slot: &Slot) -> Option<&'a Value> {
    body.pointer(&format!(
        "/rooms/join/{}/timeline/events/{}",
        pointer_escape(slot.room.as_str()),
        slot.index
    ))
}

pub(crate) fn event_at_mut<'a>(body: &'a mut Value, slot: &Slot) -> Option<&'a mut Value> {
    body.pointer_mut(&format!(
        "/rooms/join/{}/timeline/events/{}",
        pointer_escape(slot.room.as_str()),
        slot.index
    ))
}

/// JSON pointer escaping (RFC 6901) of one path segment.
fn pointer_escape(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// The plaintext event that takes the encrypted one's place: the decrypted type and content,
/// the envelope's event id, timestamp and unsigned data, and the sender the crypto layer
/// verified.
pub(crate) fn plaintext_event(envelope: &Value, decrypted: &Value, sender: &str) -> Value {
    let mut ev = Map::new();
    ev.insert(
        "type".into(),
        decrypted.get("type").cloned().unwrap_or(Value::Null),
    );
    ev.insert(
        "content".into(),
        decrypted
            .get("content")
            .cloned()
            .unwrap_or_else(|| json!({})),
    );
    ev.insert("sender".into(), json!(sender));
    for key in ["event_id", "origin_server_ts", "unsigned"] {
        if let Some(v) = envelope.get(key) {
            ev.insert(key.into(), v.clone());
        }
    }
    Value::Object(ev)
}

/// Puts late-decrypted events at the front of their room's timeline in this answer (they
/// are older than anything in it), creating the room's entry if the answer has none.
pub(crate) fn inject(body: &mut Value, room: &OwnedRoomId, events: Vec<Value>) {
    if !body.is_object() {
        return;
    }
    let rooms = &mut body["rooms"]["join"][room.as_str()]["timeline"]["events"];
    if !rooms.is_array() {
        *rooms = json!([]);
    }
    if let Some(list) = rooms.as_array_mut() {
        let rest = std::mem::take(list);
        list.extend(events);
        list.extend(rest);
    }
}

/// Adds `ms` to an event's `unsigned.age` (it waited that long in the layer).
pub(crate) fn age_by(ev: &mut Value, ms: u64) {
    if let Some(age) = ev.pointer_mut("/unsigned/age") {
        if let Some(a) = age.as_u64() {
            *age = json!(a.saturating_add(ms));
        }
    }
}

/// What the core asked for, as far as an encryption layer cares.
pub(crate) enum Kind {
    Sync,
    /// `PUT /rooms/{room}/send/{type}/{txn}` of a call event.
    CallSend {
        room: OwnedRoomId,
        event_type: String,
    },
    Other,
}

/// Sorts the core's request: a sync, a call event send (with its room), or anything else.
pub(crate) fn classify(request: &http::Request<Vec<u8>>) -> Kind {
    let path = request.uri().path();
    let Some(rest) = path.strip_prefix("/_matrix/client/") else {
        return Kind::Other;
    };
    let mut segs = rest.split('/');
    let _version = segs.next();
    match (segs.next(), request.method()) {
        (Some("sync"), &http::Method::GET) => Kind::Sync,
        (Some("rooms"), &http::Method::PUT) => {
            let room = segs.next().map(percent_decode);
            let send = segs.next();
            let event_type = segs.next().map(percent_decode);
            match (room, send, event_type) {
                (Some(room), Some("send"), Some(t)) if t.starts_with("m.call.") => {
                    match OwnedRoomId::try_from(room.as_str()) {
                        Ok(room) => Kind::CallSend {
                            room,
                            event_type: t,
                        },
                        Err(_) => Kind::Other,
                    }
                }
                _ => Kind::Other,
            }
        }
        _ => Kind::Other,
    }
}

/// The send URI with `m.room.encrypted` in place of the event type; same transaction id.
pub(crate) fn encrypted_uri(uri: &http::Uri, event_type: &str) -> Option<http::Uri> {
    let path = uri.path();
    let (head, txn) = path.rsplit_once('/')?;
    let (head, ty) = head.rsplit_once('/')?;
    if percent_decode(ty) != event_type {
        return None;
    }
    let mut s = format!("{head}/m.room.encrypted/{txn}");
    if let Some(q) = uri.query() {
        s.push('?');
        s.push_str(q);
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(s.parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

/// Percent-decoding of one URI path segment (room ids arrive as `%21room%3Aserver`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = |j: usize| bytes.get(j).and_then(|c| (*c as char).to_digit(16));
        match (b, hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room() -> OwnedRoomId {
        OwnedRoomId::try_from("!r:h").unwrap()
    }

    fn sync_body() -> Value {
        json!({"rooms": {"join": {"!r:h": {
            "state": {"events": [
                {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}},
                {"type": "m.room.member", "state_key": "@a:h", "sender": "@a:h", "content": {"membership": "join"}}
            ]},
            "timeline": {"events": [
                {"type": "m.room.member", "state_key": "@b:h", "sender": "@a:h", "content": {"membership": "invite"}},
                {"type": "m.call.invite", "sender": "@b:h", "content": {}},
                {"type": "m.room.encrypted", "sender": "@b:h", "event_id": "$e", "origin_server_ts": 5, "unsigned": {"age": 10}, "content": {}}
            ]}
        }}}})
    }

    #[test]
    fn encryption_and_members_are_tracked() {
        let mut rooms = BTreeMap::new();
        let new = track_rooms(&mut rooms, &sync_body());
        assert_eq!(new.len(), 2);
        let r = rooms.get(&room()).unwrap();
        assert!(r.encryption.is_some());
        assert_eq!(r.members.len(), 2);
        let leave = json!({"rooms": {"leave": {"!r:h": {}}}});
        track_rooms(&mut rooms, &leave);
        assert!(rooms.is_empty());
    }

    #[test]
    fn rooms_that_became_encrypted_or_changed_members_are_warmed() {
        let mut rooms = BTreeMap::new();
        let before = encrypted_members(&rooms);
        track_rooms(&mut rooms, &sync_body());
        assert_eq!(changed_encrypted_rooms(&before, &rooms), vec![room()]);
        let before = encrypted_members(&rooms);
        let same = json!({"rooms": {"join": {"!r:h": {"timeline": {"events": []}}}}});
        track_rooms(&mut rooms, &same);
        assert!(changed_encrypted_rooms(&before, &rooms).is_empty());
        let joined = json!({"rooms": {"join": {"!r:h": {"timeline": {"events": [
            {"type": "m.room.member", "state_key": "@c:h", "content": {"membership": "join"}}
        ]}}}}});
        track_rooms(&mut rooms, &joined);
        assert_eq!(changed_encrypted_rooms(&before, &rooms), vec![room()]);
    }

    #[test]
    fn plaintext_call_event_in_encrypted_room_is_dropped() {
        let mut rooms = BTreeMap::new();
        let mut body = sync_body();
        track_rooms(&mut rooms, &body);
        assert_eq!(drop_plaintext_calls(&mut body, &rooms), 1);
        let slots = encrypted_slots(&body);
        assert_eq!(
            slots,
            vec![Slot {
                room: room(),
                index: 1
            }]
        );
    }

    #[test]
    fn plaintext_replacement_keeps_envelope_fields_and_verified_sender() {
        let body = sync_body();
        let env = &body["rooms"]["join"]["!r:h"]["timeline"]["events"][2];
        let dec = json!({"type": "m.call.invite", "content": {"call_id": "c"}, "sender": "@evil:h", "room_id": "!r:h"});
        let ev = plaintext_event(env, &dec, "@b:h");
        assert_eq!(ev["type"], "m.call.invite");
        assert_eq!(ev["sender"], "@b:h");
        assert_eq!(ev["event_id"], "$e");
        assert_eq!(ev["unsigned"]["age"], 10);
    }

    #[test]
    fn late_events_go_first_and_age() {
        let mut body = json!({"next_batch": "x"});
        let mut ev = json!({"type": "m.call.invite", "unsigned": {"age": 10}});
        age_by(&mut ev, 5);
        inject(&mut body, &room(), vec![ev]);
        inject(&mut body, &room(), vec![json!({"type": "older"})]);
        let events = &body["rooms"]["join"]["!r:h"]["timeline"]["events"];
        assert_eq!(events[0]["type"], "older");
        assert_eq!(events[1]["unsigned"]["age"], 15);
    }

    fn put(uri: &str) -> http::Request<Vec<u8>> {
        http::Request::put(uri).body(Vec::new()).unwrap()
    }

    #[test]
    fn call_sends_are_recognised_and_rewritten_with_the_same_txn() {
        let r = put("http://h/_matrix/client/v3/rooms/%21r%3Ah/send/m.call.invite/t1");
        let Kind::CallSend { room, event_type } = classify(&r) else {
            panic!("not a call send")
        };
        assert_eq!(room.as_str(), "!r:h");
        assert_eq!(event_type, "m.call.invite");
        let uri = encrypted_uri(r.uri(), "m.call.invite").unwrap();
        assert_eq!(
            uri.to_string(),
            "http://h/_matrix/client/v3/rooms/%21r%3Ah/send/m.room.encrypted/t1"
        );
        let text = put("http://h/_matrix/client/v3/rooms/%21r%3Ah/send/m.room.message/t1");
        assert!(matches!(classify(&text), Kind::Other));
        let sync = http::Request::get("http://h/_matrix/client/v3/sync?since=x")
            .body(Vec::new())
            .unwrap();
        assert!(matches!(classify(&sync), Kind::Sync));
    }

    #[test]
    fn percent_decoding_survives_broken_escapes() {
        assert_eq!(percent_decode("%21a%3Ab"), "!a:b");
        assert_eq!(percent_decode("%2"), "%2");
        assert_eq!(percent_decode("%zz%"), "%zz%");
    }
}
