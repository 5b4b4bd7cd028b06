//! Entry points for cargo-fuzz (feature `fuzzing`). Each must never panic on any input.

use crate::call::signal;

/// An m.call.* event content of any type, as it would arrive in /sync.
pub fn call_event(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    for t in [
        "m.call.invite",
        "m.call.answer",
        "m.call.candidates",
        "m.call.select_answer",
        "m.call.reject",
        "m.call.negotiate",
        "m.call.hangup",
    ] {
        let _ = signal::parse(t, &value);
    }
}

/// An SDP offer or answer; whatever parses must print and parse again.
pub fn sdp(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(offer) = str0m::change::SdpOffer::from_sdp_string(text) {
        let again = offer.to_sdp_string();
        assert!(
            str0m::change::SdpOffer::from_sdp_string(&again).is_ok(),
            "SDP round trip failed"
        );
    }
    let _ = str0m::Candidate::from_sdp_string(text);
}
