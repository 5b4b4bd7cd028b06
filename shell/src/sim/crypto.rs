//! The simulator's seeded stand-in for the `e2ee` layer: the same place (between an agent's
//! homeserver requests and the homeserver), the same rewrites (`room_crypto`: call sends in
//! encrypted rooms leave as `m.room.encrypted` with the same transaction id, sync answers are
//! decrypted before the core reads them, undecryptable events wait for their key, plaintext
//! call events in encrypted rooms are dropped), with fake ciphertext.
//!
//! Not cryptography: content is XORed with a keystream from a seeded 64-bit "room key", so a
//! run stays deterministic and cheap. Room keys travel as plain `m.room_key` to-device
//! messages through the simulated homeserver; [`CryptoFaults`] delays them, loses them or
//! makes encryption fail, the three things that go wrong in real rooms.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use base64::prelude::{Engine as _, BASE64_STANDARD_NO_PAD};
use call_assist_core::HttpFailure;
use ruma::{OwnedRoomId, OwnedUserId};
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use crate::room_crypto::{self as rc, classify, encrypted_uri, Kind, RoomCrypto};

/// Encrypted events kept for their key (as the real layer).
const MAX_UNDECRYPTED: usize = 64;
/// How long an undecryptable event is retried (as the real layer).
const UNDECRYPTED_KEEP: Duration = Duration::from_secs(300);
const ALGORITHM: &str = "m.megolm.v1.aes-sha2";

/// What goes wrong with room keys; read when a key is shared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CryptoFaults {
    /// Room keys reach their recipients this much later than the events they open.
    pub late_key: Option<Duration>,
    /// Room keys never reach their recipients.
    pub missing_key: bool,
    /// Encryption fails (as when no device of the peer can be reached): nothing is sent.
    pub failed_share: bool,
}

/// A room key on its way to `to` (the world hands it to the homeserver after `delay`).
#[derive(Debug, Clone)]
pub struct KeyShare {
    pub to: OwnedUserId,
    pub event: Value,
    pub delay: Duration,
}

/// Counters for assertions and reports.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CryptoStats {
    pub encrypted: u64,
    pub decrypted: u64,
    /// Decrypted only after their key came (a later sync).
    pub decrypted_late: u64,
    /// Given up on: no key within [`UNDECRYPTED_KEEP`], or pushed out by newer ones.
    pub undecryptable_dropped: u64,
    pub plaintext_ignored: u64,
    pub encrypt_failed: u64,
}

/// This agent's outbound room key for one room.
#[derive(Debug)]
struct Outbound {
    session_id: String,
    key: u64,
    shared_with: BTreeSet<OwnedUserId>,
}

#[derive(Debug)]
struct Undecrypted {
    room: OwnedRoomId,
    event: Value,
    since: Instant,
}

/// One agent's stand-in layer.
#[derive(Debug)]
pub struct SimCrypto {
    user: OwnedUserId,
    seed: u64,
    rooms: BTreeMap<OwnedRoomId, RoomCrypto>,
    outbound: BTreeMap<OwnedRoomId, Outbound>,
    /// Room keys received: session id -> (key, the user who shared it).
    inbound: BTreeMap<String, (u64, OwnedUserId)>,
    undecrypted: VecDeque<Undecrypted>,
    pub stats: CryptoStats,
}

/// Whether the answer to `request` is a /sync answer the layer must see.
pub fn is_sync(request: &http::Request<Vec<u8>>) -> bool {
    matches!(classify(request), Kind::Sync)
}

impl SimCrypto {
    pub fn new(user: OwnedUserId, seed: u64) -> Self {
        SimCrypto {
            user,
            seed,
            rooms: BTreeMap::new(),
            outbound: BTreeMap::new(),
            inbound: BTreeMap::new(),
            undecrypted: VecDeque::new(),
            stats: CryptoStats::default(),
        }
    }

    /// One of the core's requests on its way out: unchanged, encrypted, or failed (never a
    /// plaintext call event into an encrypted room), with the room keys it makes travel.
    pub fn outgoing(
        &mut self,
        request: http::Request<Vec<u8>>,
        faults: &CryptoFaults,
    ) -> (Result<http::Request<Vec<u8>>, HttpFailure>, Vec<KeyShare>) {
        let Kind::CallSend { room, event_type } = classify(&request) else {
            return (Ok(request), Vec::new());
        };
        let Some(info) = self.rooms.get(&room).filter(|r| r.encryption.is_some()) else {
            return (Ok(request), Vec::new());
        };
        if faults.failed_share {
            self.stats.encrypt_failed += 1;
            warn!(%room, %event_type, "sim e2ee: not sent: cannot encrypt for the room");
            let failure =
                HttpFailure::Encryption("no device of the room's members (simulated)".into());
            return (Err(failure), Vec::new());
        }
        let members = info.members.clone();
        let shares = self.share(&room, &members, faults);
        let Some(out) = self.outbound.get(&room) else {
            return (Err(HttpFailure::Encryption("no room key".into())), shares);
        };
        let (mut parts, body) = request.into_parts();
        let content: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let plain = json!({ "type": event_type, "content": content, "room_id": room });
        let ciphertext = BASE64_STANDARD_NO_PAD.encode(xor(out.key, plain.to_string().as_bytes()));
        let envelope = json!({
            "algorithm": ALGORITHM,
            "session_id": out.session_id,
            "ciphertext": ciphertext,
        });
        let Some(uri) = encrypted_uri(&parts.uri, &event_type) else {
            return (
                Err(HttpFailure::Encryption("unexpected send URI".into())),
                shares,
            );
        };
        parts.uri = uri;
        self.stats.encrypted += 1;
        debug!(%room, %event_type, "sim e2ee: call event encrypted");
        let body = serde_json::to_vec(&envelope).unwrap_or_default();
        (Ok(http::Request::from_parts(parts, body)), shares)
    }

    /// Our room key for `room`, made on first use and shared with members who lack it.
    fn share(
        &mut self,
        room: &OwnedRoomId,
        members: &BTreeSet<OwnedUserId>,
        faults: &CryptoFaults,
    ) -> Vec<KeyShare> {
        let seed = self.seed;
        let user = self.user.clone();
        let out = self.outbound.entry(room.clone()).or_insert_with(|| {
            let id = fnv(&[user.as_str(), room.as_str()]) ^ seed;
            Outbound {
                session_id: format!("{id:016x}"),
                key: splitmix(&mut (id.rotate_left(17) ^ 0x5eed)),
                shared_with: BTreeSet::new(),
            }
        });
        let mut shares = Vec::new();
        for member in members {
            if !out.shared_with.insert(member.clone()) || faults.missing_key {
                continue;
            }
            let event = json!({
                "type": "m.room_key",
                "sender": self.user,
                "content": {
                    "algorithm": ALGORITHM,
                    "room_id": room,
                    "session_id": out.session_id,
                    "session_key": format!("{:016x}", out.key),
                },
            });
            shares.push(KeyShare {
                to: member.clone(),
                event,
                delay: faults.late_key.unwrap_or_default(),
            });
        }
        shares
    }

    /// A /sync answer as the core should see it (as the real layer's `on_sync`).
    pub fn on_sync(&mut self, body: Vec<u8>, now: Instant) -> Vec<u8> {
        let mut json: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => return body,
        };
        self.take_room_keys(&json);
        rc::track_rooms(&mut self.rooms, &json);
        let dropped = rc::drop_plaintext_calls(&mut json, &self.rooms);
        if dropped > 0 {
            self.stats.plaintext_ignored += dropped as u64;
            warn!(
                dropped,
                "sim e2ee: plaintext call events in encrypted rooms ignored"
            );
        }
        self.retry_undecrypted(&mut json, now);
        for slot in rc::encrypted_slots(&json) {
            let Some(envelope) = rc::event_at(&json, &slot).cloned() else {
                continue;
            };
            match self.decrypt(&slot.room, &envelope) {
                Ok(plain) => {
                    self.stats.decrypted += 1;
                    if let Some(ev) = rc::event_at_mut(&mut json, &slot) {
                        *ev = plain;
                    }
                }
                Err(e) => {
                    info!(room = %slot.room, "sim e2ee: cannot decrypt yet ({e}); kept for a retry");
                    if self.undecrypted.len() >= MAX_UNDECRYPTED {
                        self.undecrypted.pop_front();
                        self.stats.undecryptable_dropped += 1;
                    }
                    self.undecrypted.push_back(Undecrypted {
                        room: slot.room,
                        event: envelope,
                        since: now,
                    });
                }
            }
        }
        serde_json::to_vec(&json).unwrap_or(body)
    }

    fn take_room_keys(&mut self, json: &Value) {
        let events = json.pointer("/to_device/events").and_then(Value::as_array);
        for ev in events.into_iter().flatten() {
            if ev.get("type").and_then(Value::as_str) != Some("m.room_key") {
                continue;
            }
            let field = |k: &str| ev.pointer(&format!("/content/{k}")).and_then(Value::as_str);
            let sender = ev
                .get("sender")
                .and_then(Value::as_str)
                .and_then(|s| OwnedUserId::try_from(s).ok());
            let key = field("session_key").and_then(|k| u64::from_str_radix(k, 16).ok());
            if let (Some(id), Some(key), Some(sender)) = (field("session_id"), key, sender) {
                self.inbound.insert(id.to_owned(), (key, sender));
            }
        }
    }

    fn retry_undecrypted(&mut self, json: &mut Value, now: Instant) {
        let mut still = VecDeque::new();
        let mut late: BTreeMap<OwnedRoomId, Vec<Value>> = BTreeMap::new();
        for u in std::mem::take(&mut self.undecrypted) {
            let waited = now.saturating_duration_since(u.since);
            match self.decrypt(&u.room, &u.event) {
                Ok(mut plain) => {
                    info!(room = %u.room, ?waited, "sim e2ee: decrypted an event after its key came");
                    self.stats.decrypted_late += 1;
                    rc::age_by(
                        &mut plain,
                        u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                    );
                    late.entry(u.room).or_default().push(plain);
                }
                Err(_) if waited >= UNDECRYPTED_KEEP => {
                    warn!(room = %u.room, "sim e2ee: no room key came for an event; dropped");
                    self.stats.undecryptable_dropped += 1;
                }
                Err(_) => still.push_back(u),
            }
        }
        self.undecrypted = still;
        for (room, events) in late {
            rc::inject(json, &room, events);
        }
    }

    fn decrypt(&self, room: &OwnedRoomId, envelope: &Value) -> Result<Value, &'static str> {
        let field = |k: &str| {
            envelope
                .pointer(&format!("/content/{k}"))
                .and_then(Value::as_str)
        };
        let session = field("session_id").ok_or("no session id")?;
        let (key, owner) = self.inbound.get(session).ok_or("unknown room key")?;
        let bytes = field("ciphertext")
            .and_then(|c| BASE64_STANDARD_NO_PAD.decode(c).ok())
            .ok_or("bad ciphertext")?;
        let plain: Value =
            serde_json::from_slice(&xor(*key, &bytes)).map_err(|_| "bad plaintext")?;
        if plain.get("room_id").and_then(Value::as_str) != Some(room.as_str()) {
            return Err("the event was encrypted for another room");
        }
        if envelope.get("sender").and_then(Value::as_str) != Some(owner.as_str()) {
            return Err("the room key's owner is not the event's sender");
        }
        Ok(rc::plaintext_event(envelope, &plain, owner.as_str()))
    }
}

/// The fake cipher: `data` XOR a splitmix64 keystream seeded by `key`.
fn xor(key: u64, data: &[u8]) -> Vec<u8> {
    let mut state = key;
    let mut out = Vec::with_capacity(data.len());
    for chunk in data.chunks(8) {
        let ks = splitmix(&mut state).to_le_bytes();
        out.extend(chunk.iter().zip(ks).map(|(b, k)| b ^ k));
    }
    out
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fnv(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parts.iter().flat_map(|p| p.bytes().chain([0])) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> OwnedUserId {
        OwnedUserId::try_from(s).unwrap()
    }

    fn sync_with(room: &str, timeline: Vec<Value>, to_device: Vec<Value>) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "rooms": {"join": {room: {
                "state": {"events": [
                    {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": ALGORITHM}},
                    {"type": "m.room.member", "state_key": "@a:h", "content": {"membership": "join"}},
                    {"type": "m.room.member", "state_key": "@b:h", "content": {"membership": "join"}}
                ]},
                "timeline": {"events": timeline}
            }}},
            "to_device": {"events": to_device}
        }))
        .unwrap()
    }

    fn send(room: &str) -> http::Request<Vec<u8>> {
        http::Request::put(format!(
            "http://h/_matrix/client/v3/rooms/{room}/send/m.call.invite/t1"
        ))
        .body(br#"{"call_id":"c1"}"#.to_vec())
        .unwrap()
    }

    fn timeline_of(body: &[u8]) -> Vec<Value> {
        let v: Value = serde_json::from_slice(body).unwrap();
        v["rooms"]["join"]["!r:h"]["timeline"]["events"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    #[test]
    fn a_call_event_round_trips_and_a_late_key_opens_it_later() {
        let now = Instant::now();
        let (mut a, mut b) = (
            SimCrypto::new(user("@a:h"), 1),
            SimCrypto::new(user("@b:h"), 2),
        );
        a.on_sync(sync_with("!r:h", vec![], vec![]), now);
        let (req, shares) = a.outgoing(send("!r:h"), &CryptoFaults::default());
        let req = req.unwrap();
        assert!(req.uri().path().ends_with("/send/m.room.encrypted/t1"));
        assert!(!String::from_utf8_lossy(req.body()).contains("c1"));
        let env = json!({"type": "m.room.encrypted", "sender": "@a:h", "event_id": "$1",
            "unsigned": {"age": 0}, "content": serde_json::from_slice::<Value>(req.body()).unwrap()});
        // The key has not come: the event waits and the core sees nothing it can use.
        let first = b.on_sync(sync_with("!r:h", vec![env], vec![]), now);
        assert_eq!(timeline_of(&first)[0]["type"], "m.room.encrypted");
        let key = shares
            .iter()
            .find(|s| s.to == "@b:h")
            .unwrap()
            .event
            .clone();
        let later = b.on_sync(
            sync_with("!r:h", vec![], vec![key]),
            now + Duration::from_secs(2),
        );
        let ev = &timeline_of(&later)[0];
        assert_eq!(ev["type"], "m.call.invite");
        assert_eq!(ev["content"]["call_id"], "c1");
        assert_eq!(ev["sender"], "@a:h");
        assert_eq!(ev["unsigned"]["age"], 2000);
        assert_eq!(b.stats.decrypted_late, 1);
    }

    #[test]
    fn failed_share_sends_nothing_and_plaintext_calls_are_dropped() {
        let now = Instant::now();
        let mut a = SimCrypto::new(user("@a:h"), 1);
        let plain = json!({"type": "m.call.invite", "sender": "@b:h", "content": {}});
        let out = a.on_sync(sync_with("!r:h", vec![plain], vec![]), now);
        assert!(timeline_of(&out).is_empty());
        assert_eq!(a.stats.plaintext_ignored, 1);
        let faults = CryptoFaults {
            failed_share: true,
            ..CryptoFaults::default()
        };
        assert!(a.outgoing(send("!r:h"), &faults).0.is_err());
        // An unencrypted room: passed through untouched.
        let (req, shares) = a.outgoing(send("!other:h"), &faults);
        assert!(req.unwrap().uri().path().contains("m.call.invite"));
        assert!(shares.is_empty());
    }

    #[test]
    fn a_key_from_someone_else_does_not_open_the_event() {
        let now = Instant::now();
        let mut a = SimCrypto::new(user("@a:h"), 1);
        let mut b = SimCrypto::new(user("@b:h"), 2);
        a.on_sync(sync_with("!r:h", vec![], vec![]), now);
        let (req, shares) = a.outgoing(send("!r:h"), &CryptoFaults::default());
        let mut key = shares
            .iter()
            .find(|s| s.to == "@b:h")
            .unwrap()
            .event
            .clone();
        key["sender"] = json!("@mallory:h");
        let env = json!({"type": "m.room.encrypted", "sender": "@a:h",
            "content": serde_json::from_slice::<Value>(req.unwrap().body()).unwrap()});
        let out = b.on_sync(sync_with("!r:h", vec![env], vec![key]), now);
        assert_eq!(timeline_of(&out)[0]["type"], "m.room.encrypted");
    }
}
