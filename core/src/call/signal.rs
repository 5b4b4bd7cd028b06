//! m.call.* event contents in, typed; typed contents out.
//!
//! Parsing is ruma's, after two repairs for peers in the field: a numeric `version` (some
//! clients send `1` instead of `"1"`; the spec says to treat any version other than 0 as "1")
//! and a missing `version` (treated as 0, the only version that could omit it).

use ruma::events::call::answer::CallAnswerEventContent;
use ruma::events::call::candidates::CallCandidatesEventContent;
use ruma::events::call::hangup::CallHangupEventContent;
use ruma::events::call::invite::CallInviteEventContent;
use ruma::events::call::negotiate::CallNegotiateEventContent;
use ruma::events::call::reject::CallRejectEventContent;
use ruma::events::call::select_answer::CallSelectAnswerEventContent;
use serde::de::DeserializeOwned;

#[derive(Debug, Clone)]
pub(crate) enum Signal {
    Invite(CallInviteEventContent),
    Answer(CallAnswerEventContent),
    Candidates(CallCandidatesEventContent),
    SelectAnswer(CallSelectAnswerEventContent),
    Reject(CallRejectEventContent),
    Negotiate(CallNegotiateEventContent),
    Hangup(CallHangupEventContent),
}

/// Why an m.call.* event was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignalError {
    /// Not an m.call.* type this agent handles (e.g. sdp_stream_metadata_changed).
    Unhandled(String),
    NotAnObject,
    Malformed(String),
}

impl std::fmt::Display for SignalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SignalError::Unhandled(t) => write!(f, "unhandled event type {t}"),
            SignalError::NotAnObject => write!(f, "content is not a JSON object"),
            SignalError::Malformed(e) => write!(f, "malformed content: {e}"),
        }
    }
}

fn repaired(content: &serde_json::Value) -> Result<serde_json::Value, SignalError> {
    let mut content = content.clone();
    let obj = content.as_object_mut().ok_or(SignalError::NotAnObject)?;
    let version = match obj.get("version") {
        None => serde_json::Value::from("0"),
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(0) => "0".into(),
        Some(serde_json::Value::Number(_)) => "1".into(),
        Some(serde_json::Value::String(s)) => s.as_str().into(),
        Some(_) => return Err(SignalError::Malformed("version is not a string".into())),
    };
    obj.insert("version".into(), version);
    Ok(content)
}

fn de<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, SignalError> {
    serde_json::from_value(v).map_err(|e| SignalError::Malformed(e.to_string()))
}

/// The description must be of the kind the event carries (an invite's offer is an `offer`).
fn expect_type(d: &ruma::events::call::SessionDescription, kind: &str) -> Result<(), SignalError> {
    if d.session_type == kind {
        Ok(())
    } else {
        Err(SignalError::Malformed(format!(
            "description type {:?} where {kind:?} belongs",
            d.session_type
        )))
    }
}

pub(crate) fn parse(event_type: &str, content: &serde_json::Value) -> Result<Signal, SignalError> {
    let c = repaired(content)?;
    Ok(match event_type {
        "m.call.invite" => {
            let inv: CallInviteEventContent = de(c)?;
            expect_type(&inv.offer, "offer")?;
            Signal::Invite(inv)
        }
        "m.call.answer" => {
            let ans: CallAnswerEventContent = de(c)?;
            expect_type(&ans.answer, "answer")?;
            Signal::Answer(ans)
        }
        "m.call.candidates" => Signal::Candidates(de(c)?),
        "m.call.select_answer" => Signal::SelectAnswer(de(c)?),
        "m.call.reject" => Signal::Reject(de(c)?),
        "m.call.negotiate" => Signal::Negotiate(de(c)?),
        "m.call.hangup" => Signal::Hangup(de(c)?),
        other => return Err(SignalError::Unhandled(other.to_owned())),
    })
}

impl Signal {
    pub fn call_id(&self) -> &str {
        match self {
            Signal::Invite(c) => c.call_id.as_str(),
            Signal::Answer(c) => c.call_id.as_str(),
            Signal::Candidates(c) => c.call_id.as_str(),
            Signal::SelectAnswer(c) => c.call_id.as_str(),
            Signal::Reject(c) => c.call_id.as_str(),
            Signal::Negotiate(c) => c.call_id.as_str(),
            Signal::Hangup(c) => c.call_id.as_str(),
        }
    }

    /// The sender's party id; version 0 peers have none.
    pub fn party_id(&self) -> Option<&str> {
        match self {
            Signal::Invite(c) => c.party_id.as_deref().map(|p| p.as_str()),
            Signal::Answer(c) => c.party_id.as_deref().map(|p| p.as_str()),
            Signal::Candidates(c) => c.party_id.as_deref().map(|p| p.as_str()),
            Signal::SelectAnswer(c) => Some(c.party_id.as_str()),
            Signal::Reject(c) => Some(c.party_id.as_str()),
            Signal::Negotiate(c) => Some(c.party_id.as_str()),
            Signal::Hangup(c) => c.party_id.as_deref().map(|p| p.as_str()),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Signal::Invite(_) => "invite",
            Signal::Answer(_) => "answer",
            Signal::Candidates(_) => "candidates",
            Signal::SelectAnswer(_) => "select_answer",
            Signal::Reject(_) => "reject",
            Signal::Negotiate(_) => "negotiate",
            Signal::Hangup(_) => "hangup",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numeric_version_one_is_accepted() {
        let c = json!({"call_id": "c1", "party_id": "p", "version": 1, "lifetime": 60000,
            "offer": {"type": "offer", "sdp": "v=0"}});
        let Signal::Invite(inv) = parse("m.call.invite", &c).unwrap() else {
            panic!()
        };
        assert_eq!(inv.version.as_str(), "1");
    }

    #[test]
    fn version_zero_invite_without_party_id() {
        let c = json!({"call_id": "c1", "version": 0, "lifetime": 60000,
            "offer": {"type": "offer", "sdp": "v=0"}});
        let s = parse("m.call.invite", &c).unwrap();
        assert_eq!(s.party_id(), None);
        assert_eq!(s.call_id(), "c1");
    }

    #[test]
    fn malformed_contents_are_typed_errors() {
        assert_eq!(
            parse("m.call.invite", &json!([1, 2])).unwrap_err(),
            SignalError::NotAnObject
        );
        assert!(matches!(
            parse("m.call.answer", &json!({"call_id": 5, "version": "1"})),
            Err(SignalError::Malformed(_))
        ));
        assert!(matches!(
            parse(
                "m.call.invite",
                &json!({"call_id": "c", "version": {"x": 1}})
            ),
            Err(SignalError::Malformed(_))
        ));
        for (ty, content) in [
            (
                "m.call.invite",
                json!({"call_id": "c", "party_id": "p", "version": "1",
                "lifetime": 60000, "offer": {"type": "answer", "sdp": "v=0"}}),
            ),
            (
                "m.call.answer",
                json!({"call_id": "c", "party_id": "p", "version": "1",
                "answer": {"type": "offer", "sdp": "v=0"}}),
            ),
        ] {
            let e = parse(ty, &content).unwrap_err();
            assert!(
                matches!(&e, SignalError::Malformed(m) if m.contains("belongs")),
                "{ty}: {e}"
            );
        }
        assert!(matches!(
            parse("m.call.sdp_stream_metadata_changed", &json!({})),
            Err(SignalError::Unhandled(_))
        ));
    }
}
