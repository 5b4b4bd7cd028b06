//! What `call` and `listen` share: the calls' bookkeeping, the `ready`/`incoming` lines,
//! scheduled hangups, the once-a-second stats line and the summary at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use call_assist_core::{AgentEvent, CallId, CallState};
use serde_json::json;
use tracing::info;

use super::driver::Driver;

/// How often the stats line is printed.
const STATS_EVERY: Duration = Duration::from_secs(1);

pub(crate) struct CallLog {
    /// When each call was placed or answered.
    started: BTreeMap<CallId, Instant>,
    /// Placed or answered -> first remote media.
    first_media: BTreeMap<CallId, Duration>,
    connected: BTreeSet<CallId>,
    hangup_at: BTreeMap<CallId, Instant>,
    /// Hang up each call this long after it connected.
    hangup_after: Option<Duration>,
    /// Digits to press in each call, and how long after it connected.
    dtmf: Option<(String, Duration)>,
    dtmf_at: BTreeMap<CallId, Instant>,
    pub ended: u32,
    last_reason: Option<String>,
    next_stats: Option<Instant>,
}

impl CallLog {
    pub fn new(hangup_after: Option<Duration>) -> Self {
        CallLog {
            started: BTreeMap::new(),
            first_media: BTreeMap::new(),
            connected: BTreeSet::new(),
            hangup_at: BTreeMap::new(),
            hangup_after,
            dtmf: None,
            dtmf_at: BTreeMap::new(),
            ended: 0,
            last_reason: None,
            next_stats: None,
        }
    }

    /// Press `digits` in each call `after` it connected.
    pub fn with_dtmf(mut self, dtmf: Option<(String, Duration)>) -> Self {
        self.dtmf = dtmf;
        self
    }

    /// A call was placed or answered: its setup time counts from now.
    pub fn started(&mut self, call_id: &str, now: Instant) {
        self.started.insert(call_id.to_owned(), now);
    }

    pub fn was_connected(&self, call_id: &str) -> bool {
        self.connected.contains(call_id)
    }

    pub fn any_connected(&self) -> bool {
        !self.connected.is_empty()
    }

    pub fn on_event<C: Send + 'static>(&mut self, d: &mut Driver<C>, e: &AgentEvent, now: Instant) {
        match e {
            AgentEvent::Synced => {
                d.lines.emit(json!({"event": "ready"}));
                d.lines.say("logged in and synced");
            }
            AgentEvent::IncomingCall {
                call_id,
                from,
                room_id,
                ..
            } => {
                d.lines.emit(json!({"event": "incoming", "call_id": call_id, "from": from, "room_id": room_id}));
                d.lines.say(&format!("incoming call {call_id} from {from}"));
            }
            AgentEvent::CallStateChanged {
                call_id,
                state: CallState::Connected,
            } if self.connected.insert(call_id.clone()) => {
                if let Some(after) = self.hangup_after {
                    self.hangup_at.insert(call_id.clone(), now + after);
                }
                if let Some((_, after)) = &self.dtmf {
                    self.dtmf_at.insert(call_id.clone(), now + *after);
                }
            }
            AgentEvent::Dtmf {
                call_id,
                digit,
                duration_ms,
            } => {
                let station = d.station_of(call_id);
                d.emit_for(
                    station,
                    json!({"event": "dtmf", "call_id": call_id, "digit": digit.to_string(),
                    "duration_ms": duration_ms}),
                );
                d.lines
                    .say(&format!("call {call_id}: DTMF {digit} ({duration_ms} ms)"));
            }
            AgentEvent::Media(f) => {
                if let Some(t) = self.started.get(&f.call_id) {
                    let d = now.saturating_duration_since(*t);
                    self.first_media.entry(f.call_id.clone()).or_insert(d);
                }
            }
            AgentEvent::CallEnded {
                call_id, reason, ..
            } => {
                self.hangup_at.remove(call_id);
                self.dtmf_at.remove(call_id);
                self.ended += 1;
                self.last_reason = Some(reason.to_string());
            }
            _ => {}
        }
    }

    /// Scheduled hangups and the stats line.
    pub fn on_tick<C>(&mut self, d: &mut Driver<C>, now: Instant) {
        let due: Vec<CallId> = self
            .hangup_at
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(c, _)| c.clone())
            .collect();
        for call_id in due {
            self.hangup_at.remove(&call_id);
            info!(%call_id, "hanging up");
            let _ = d.agent.hangup(&call_id, now);
        }
        self.press_due_digits(d, now);
        let next = *self.next_stats.get_or_insert(now + STATS_EVERY);
        if now >= next {
            self.next_stats = Some(now + STATS_EVERY);
            stats(d);
        }
    }

    /// Sends `--dtmf` into the calls whose time for it has come; the outcome is a line.
    fn press_due_digits<C>(&mut self, d: &mut Driver<C>, now: Instant) {
        let Some((digits, _)) = &self.dtmf else {
            return;
        };
        let due: Vec<CallId> = self
            .dtmf_at
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(c, _)| c.clone())
            .collect();
        for call_id in due {
            self.dtmf_at.remove(&call_id);
            match d.agent.send_dtmf(&call_id, digits, now) {
                Ok(()) => {
                    info!(%call_id, "sending DTMF digits");
                    d.lines
                        .emit(json!({"event": "dtmf_sent", "call_id": call_id,
                        "digits": digits}));
                }
                Err(e) => {
                    d.lines.say(&format!("error: cannot send DTMF: {e}"));
                    d.lines
                        .emit(json!({"event": "error", "kind": "dtmf", "call_id": call_id,
                        "message": e.to_string()}));
                }
            }
        }
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.hangup_at
            .values()
            .chain(self.dtmf_at.values())
            .copied()
            .chain(self.next_stats)
            .min()
    }

    /// The last JSON line (or text line) of a run.
    pub fn summary<C>(&self, d: &mut Driver<C>) {
        let (mut sent, mut received) = (0, 0);
        for id in d.agent.call_ids() {
            if let Some(i) = d.agent.call_info(id) {
                sent += i.frames_sent;
                received += i.frames_received;
            }
        }
        let c = d.counters;
        d.lines.emit(json!({
            "event": "summary",
            "connected": self.any_connected(),
            "setup_ms": self.first_media.values().next().map(|d| d.as_millis() as u64),
            "frames_sent": sent,
            "frames_received": received,
            "video_frames_received": c.video_frames_received,
            "audio_frames_received": c.audio_frames_received,
            "hangup_reason": self.last_reason,
            "calls": self.ended,
        }));
        d.lines.say(&format!(
            "connected: {}, calls ended: {}, last hangup: {}",
            self.any_connected(),
            self.ended,
            self.last_reason.as_deref().unwrap_or("-")
        ));
    }
}

/// The stats line of the first call with media.
fn stats<C>(d: &mut Driver<C>) {
    let Some(station) = d.stations.first() else {
        return;
    };
    let Some(call_id) = station.media.first_call().map(|c| c.to_owned()) else {
        return;
    };
    let (camera_up, camera_frames) = (station.media.camera_up, station.media.camera_frames);
    let info = d.agent.call_info(&call_id);
    let c = d.counters;
    d.lines.emit(json!({
        "event": "stats",
        "call_id": call_id,
        "packets_sent": c.packets_sent,
        "packets_received": c.packets_received,
        "bytes_sent": c.bytes_sent,
        "bytes_received": c.bytes_received,
        "frames_sent": info.as_ref().map_or(0, |i| i.frames_sent),
        "frames_received": info.as_ref().map_or(0, |i| i.frames_received),
        "keyframes_requested": info.as_ref().map_or(0, |i| i.keyframes_requested),
        "local_candidate": info.as_ref().and_then(|i| i.local_candidate.clone()),
        "remote_candidate": info.as_ref().and_then(|i| i.remote_candidate.clone()),
        "video_frames_received": c.video_frames_received,
        "audio_frames_received": c.audio_frames_received,
        "camera_up": camera_up,
        "camera_frames": camera_frames,
        "panics_caught": d.agent.panics_caught(),
        "wakeups": {
            "agent_timer": c.wakeups.agent_timer,
            "shell_timer": c.wakeups.shell_timer,
            "socket": c.wakeups.socket,
            "message": c.wakeups.message,
        },
    }));
}
