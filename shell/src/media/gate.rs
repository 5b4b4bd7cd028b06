//! Which call a speaker plays, the camera's (talkback) or the hub's own: one call at a time,
//! never a muted one, and a call whose audio it cannot play is told so once.

use std::collections::BTreeSet;

/// What a speaker does with one audio frame of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Not played: the call is muted, another call holds the speaker, or the call was
    /// already told that its codec cannot play.
    Closed,
    /// Not played, and the call learns it now (print one line): its codec cannot play here.
    Unplayable,
    /// Played: the call takes the speaker with this frame (print one line; start afresh).
    Start,
    /// Played: the call already holds the speaker.
    Continue,
}

/// The speaker's gate.
#[derive(Debug, Default)]
pub struct SpeakerGate {
    /// The call at the speaker: the first unmuted call whose audio arrives, until it ends or
    /// is muted.
    call: Option<String>,
    /// Calls whose audio must not play (`POST /calls/ID/mute`).
    muted: BTreeSet<String>,
    /// Calls told that their audio cannot play.
    unplayable: BTreeSet<String>,
}

impl SpeakerGate {
    /// One audio frame of `call_id`; `playable`: whether this speaker can play its codec.
    pub fn admit(&mut self, call_id: &str, playable: bool) -> Admit {
        if self.muted.contains(call_id) {
            return Admit::Closed;
        }
        if !playable {
            return if self.unplayable.insert(call_id.to_owned()) {
                Admit::Unplayable
            } else {
                Admit::Closed
            };
        }
        match &self.call {
            Some(c) if c == call_id => Admit::Continue,
            Some(_) => Admit::Closed,
            None => {
                self.call = Some(call_id.to_owned());
                Admit::Start
            }
        }
    }

    /// Mutes or unmutes a call; a muted call leaves the speaker to the next call that talks.
    pub fn set_muted(&mut self, call_id: &str, muted: bool) {
        if muted {
            self.muted.insert(call_id.to_owned());
            self.leave(call_id);
        } else {
            self.muted.remove(call_id);
        }
    }

    pub fn is_muted(&self, call_id: &str) -> bool {
        self.muted.contains(call_id)
    }

    /// The call ended: forgotten.
    pub fn end_call(&mut self, call_id: &str) {
        self.leave(call_id);
        self.muted.remove(call_id);
        self.unplayable.remove(call_id);
    }

    fn leave(&mut self, call_id: &str) {
        if self.call.as_deref() == Some(call_id) {
            self.call = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_call_at_a_time_and_mute_hands_the_speaker_over() {
        let mut g = SpeakerGate::default();
        assert_eq!(g.admit("a", true), Admit::Start);
        assert_eq!(g.admit("b", true), Admit::Closed, "b does not talk over a");
        assert_eq!(g.admit("a", true), Admit::Continue);
        g.set_muted("a", true);
        assert!(g.is_muted("a"));
        assert_eq!(g.admit("a", true), Admit::Closed);
        assert_eq!(g.admit("b", true), Admit::Start);
        g.set_muted("a", false);
        assert_eq!(g.admit("a", true), Admit::Closed, "b holds it now");
        g.end_call("b");
        assert_eq!(g.admit("a", true), Admit::Start);
    }

    #[test]
    fn an_unplayable_call_is_told_once_and_never_takes_the_speaker() {
        let mut g = SpeakerGate::default();
        assert_eq!(g.admit("a", false), Admit::Unplayable);
        assert_eq!(g.admit("a", false), Admit::Closed);
        assert_eq!(g.admit("b", true), Admit::Start);
        // A call that ends is forgotten: the same id is told again.
        g.end_call("a");
        assert_eq!(g.admit("a", false), Admit::Unplayable);
        // A muted call is not told anything.
        g.set_muted("c", true);
        assert_eq!(g.admit("c", false), Admit::Closed);
    }
}
