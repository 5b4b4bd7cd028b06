//! What the agent knows of its rooms from /sync: who is joined and whether the room is public.
//! Enough to tell a 1:1 room (where invites ring) from anything else.

use std::collections::{BTreeMap, BTreeSet};

use ruma::api::client::sync::sync_events::v3::{Response, State};
use ruma::events::AnySyncTimelineEvent;
use ruma::serde::Raw;
use ruma::{OwnedRoomId, OwnedUserId, RoomId};
use serde::Deserialize;
use tracing::{debug, warn};

use super::RoomEvent;
use crate::limits;

#[derive(Debug, Default, Clone)]
pub(crate) struct RoomInfo {
    pub joined: BTreeSet<OwnedUserId>,
    /// `m.joined_member_count` from the room summary, when the server sent it.
    pub joined_count: Option<u64>,
    pub public: bool,
}

impl RoomInfo {
    pub fn member_count(&self) -> u64 {
        self.joined_count.unwrap_or(self.joined.len() as u64)
    }

    /// The one other joined member of a 1:1 room.
    pub fn other_member(&self, me: &OwnedUserId) -> Option<OwnedUserId> {
        if self.member_count() != 2 {
            return None;
        }
        self.joined.iter().find(|u| *u != me).cloned()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Rooms {
    rooms: BTreeMap<OwnedRoomId, RoomInfo>,
}

/// The fields of a timeline or state event we read; everything else stays raw.
#[derive(Deserialize)]
struct EventFields {
    #[serde(rename = "type")]
    event_type: String,
    sender: OwnedUserId,
    #[serde(default)]
    content: serde_json::Value,
    state_key: Option<String>,
    #[serde(default)]
    origin_server_ts: u64,
    #[serde(default)]
    unsigned: Unsigned,
}

#[derive(Deserialize, Default)]
struct Unsigned {
    age: Option<i64>,
}

impl Rooms {
    pub fn get(&self, room: &RoomId) -> Option<&RoomInfo> {
        self.rooms.get(room)
    }

    /// A non-public room where exactly `me` and `peer` are joined.
    pub fn find_dm(&self, me: &OwnedUserId, peer: &OwnedUserId) -> Option<OwnedRoomId> {
        self.rooms
            .iter()
            .find(|(_, r)| {
                !r.public
                    && r.member_count() == 2
                    && r.joined.contains(peer)
                    && r.joined.contains(me)
            })
            .map(|(id, _)| id.clone())
    }

    /// Rooms we are invited to, with who invited us (from the invite's stripped state).
    pub fn invites(r: &Response, me: &OwnedUserId) -> Vec<(OwnedRoomId, OwnedUserId)> {
        let mut out = Vec::new();
        for (room_id, invited) in &r.rooms.invite {
            let inviter = invited.invite_state.events.iter().find_map(|raw| {
                let ev = serde_json::from_str::<EventFields>(raw.json().get()).ok()?;
                let ours = ev.event_type == "m.room.member"
                    && ev.state_key.as_deref() == Some(me.as_str())
                    && ev.content.get("membership").and_then(|m| m.as_str()) == Some("invite");
                ours.then_some(ev.sender)
            });
            match inviter {
                Some(inviter) => out.push((room_id.clone(), inviter)),
                None => debug!("invite without our member event ignored"),
            }
        }
        out
    }

    /// Updates membership from a /sync answer and returns its timeline events in order.
    pub fn apply_sync(&mut self, r: &Response) -> Vec<RoomEvent> {
        let mut out = Vec::new();
        for (room_id, joined) in &r.rooms.join {
            if !self.rooms.contains_key(room_id) && self.rooms.len() >= limits::MAX_ROOMS {
                warn!("room limit reached; not tracking a new room");
                continue;
            }
            let info = self.rooms.entry(room_id.clone()).or_default();
            if let Some(n) = joined.summary.joined_member_count {
                info.joined_count = Some(n.into());
            }
            let state_events: &[Raw<ruma::events::AnySyncStateEvent>] = match &joined.state {
                State::Before(s) => &s.events,
                State::After(s) => &s.events,
                _ => &[],
            };
            for raw in state_events {
                if let Ok(ev) = serde_json::from_str::<EventFields>(raw.json().get()) {
                    apply_state(info, &ev);
                }
            }
            for raw in &joined.timeline.events {
                if let Some(ev) = timeline_event(room_id, info, raw) {
                    out.push(ev);
                }
            }
        }
        for room_id in r.rooms.leave.keys() {
            self.rooms.remove(room_id);
        }
        out
    }
}

fn apply_state(info: &mut RoomInfo, ev: &EventFields) {
    let Some(state_key) = &ev.state_key else {
        return;
    };
    match ev.event_type.as_str() {
        "m.room.member" => {
            let Ok(user) = OwnedUserId::try_from(state_key.as_str()) else {
                return;
            };
            let membership = ev.content.get("membership").and_then(|m| m.as_str());
            if membership == Some("join") {
                if info.joined.len() < limits::MAX_TRACKED_MEMBERS {
                    info.joined.insert(user);
                }
            } else {
                info.joined.remove(&user);
            }
        }
        "m.room.join_rules" => {
            info.public = ev.content.get("join_rule").and_then(|j| j.as_str()) == Some("public");
        }
        _ => {}
    }
}

fn timeline_event(
    room_id: &OwnedRoomId,
    info: &mut RoomInfo,
    raw: &Raw<AnySyncTimelineEvent>,
) -> Option<RoomEvent> {
    let json = raw.json().get();
    if json.len() > limits::MAX_EVENT_BYTES {
        warn!(bytes = json.len(), "oversized timeline event dropped");
        return None;
    }
    let ev = match serde_json::from_str::<EventFields>(json) {
        Ok(ev) => ev,
        Err(e) => {
            warn!("malformed timeline event dropped: {e}");
            return None;
        }
    };
    if ev.state_key.is_some() {
        apply_state(info, &ev);
        return None;
    }
    if !ev.event_type.starts_with("m.call.") {
        debug!(event_type = %ev.event_type, "timeline event not for us");
        return None;
    }
    Some(RoomEvent {
        room_id: room_id.clone(),
        sender: ev.sender,
        event_type: ev.event_type,
        content: ev.content,
        age_ms: ev.unsigned.age.and_then(|a| u64::try_from(a).ok()),
        origin_server_ts: ev.origin_server_ts,
    })
}
