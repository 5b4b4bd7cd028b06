//! `listen`: answers every call the policy lets ring; exits after `--max-calls` calls or on
//! SIGTERM/SIGINT (exit 0: stopping a listener is its normal end).

use std::time::{Duration, Instant};

use call_assist_core::AgentEvent;
use tracing::warn;

use super::calls::CallLog;
use super::driver::{Driver, Policy};
use super::exit;

pub(crate) struct Listen {
    max_calls: Option<u32>,
    pub log: CallLog,
}

impl Listen {
    pub fn new(max_calls: Option<u32>, hangup_after: Option<Duration>) -> Self {
        Listen {
            max_calls,
            log: CallLog::new(hangup_after),
        }
    }
}

impl Policy for Listen {
    type Command = ();

    fn on_event(&mut self, d: &mut Driver<()>, e: &AgentEvent, now: Instant) {
        self.log.on_event(d, e, now);
        match e {
            AgentEvent::Synced => d.lines.say("listening for calls"),
            AgentEvent::IncomingCall { call_id, .. } => {
                self.log.started(call_id, now);
                if let Err(err) = d.answer(call_id, 0, now) {
                    warn!(%call_id, "cannot answer: {err}");
                }
            }
            AgentEvent::CallEnded { .. } if self.max_calls.is_some_and(|m| self.log.ended >= m) => {
                d.begin_shutdown(now, exit::OK);
            }
            _ => {}
        }
    }

    fn on_tick(&mut self, d: &mut Driver<()>, now: Instant) {
        self.log.on_tick(d, now);
    }

    fn deadline(&self) -> Option<Instant> {
        self.log.deadline()
    }

    fn stop_code(&self, _d: &Driver<()>) -> u8 {
        exit::OK
    }
}
