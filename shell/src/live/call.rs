//! `call`: places one call (in a room, or to a user in their direct room), keeps it up for
//! `--duration-s`, hangs up and exits 0 if it connected.

use std::time::{Duration, Instant};

use call_assist_core::{AgentEvent, RoomId};
use serde_json::json;

use super::calls::CallLog;
use super::config::Target;
use super::driver::{DialError, DialId, Dialed, Driver, Policy};
use super::exit;

pub(crate) struct Call {
    target: Option<Target>,
    pub log: CallLog,
}

impl Call {
    pub fn new(target: Target, duration: Duration, dtmf: Option<(String, Duration)>) -> Self {
        Call {
            target: Some(target),
            log: CallLog::new(Some(duration)).with_dtmf(dtmf),
        }
    }

    fn placed(&mut self, d: &mut Driver<()>, room: &RoomId, call_id: &str, now: Instant) {
        d.lines.say(&format!("calling in {room} (call {call_id})"));
        self.log.started(call_id, now);
    }

    fn failed(d: &mut Driver<()>, kind: &str, message: String, code: u8) {
        d.lines.say(&format!("error: {message}"));
        d.lines
            .emit(json!({"event": "error", "kind": kind, "message": message}));
        d.finish(code);
    }
}

impl Policy for Call {
    type Command = ();

    fn on_event(&mut self, d: &mut Driver<()>, e: &AgentEvent, now: Instant) {
        self.log.on_event(d, e, now);
        match e {
            AgentEvent::Synced => match self.target.take() {
                Some(Target::Room(room)) => match d.place(&room, 0, now) {
                    Ok(call_id) => self.placed(d, &room, &call_id, now),
                    Err(e) => {
                        let message = format!("cannot call in {room}: {e}");
                        Self::failed(d, "room", message, exit::NO_SUCH_ROOM);
                    }
                },
                Some(Target::User(peer)) => {
                    d.call_user(&peer, 0, now);
                }
                None => {}
            },
            AgentEvent::CallEnded { call_id, .. } => {
                let ok = self.log.was_connected(call_id);
                d.begin_shutdown(now, if ok { exit::OK } else { exit::NOT_CONNECTED });
            }
            _ => {}
        }
    }

    fn on_dial(&mut self, d: &mut Driver<()>, _dial: DialId, outcome: Dialed, now: Instant) {
        match outcome {
            Ok((call_id, room)) => self.placed(d, &room, &call_id, now),
            Err(DialError::Room(m)) => {
                let message = format!("cannot create a direct room: {m}");
                Self::failed(d, "room", message, exit::NO_SUCH_ROOM);
            }
            Err(DialError::Place(room, e)) => {
                let message = format!("cannot call in {room}: {e}");
                Self::failed(d, "room", message, exit::NO_SUCH_ROOM);
            }
            Err(DialError::NoJoin) => {
                d.lines.say("error: the peer did not join the direct room");
                d.finish(exit::NOT_CONNECTED);
            }
            Err(DialError::ShuttingDown) => {}
        }
    }

    fn on_tick(&mut self, d: &mut Driver<()>, now: Instant) {
        self.log.on_tick(d, now);
    }

    fn deadline(&self) -> Option<Instant> {
        self.log.deadline()
    }

    /// A caller stopped before its call connected did not get its call through.
    fn stop_code(&self, _d: &Driver<()>) -> u8 {
        if self.log.any_connected() {
            exit::OK
        } else {
            exit::NOT_CONNECTED
        }
    }
}
