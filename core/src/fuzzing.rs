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

/// A whole `/sync` answer body: parsed with ruma, applied to the room state, every call
/// event in it parsed.
pub fn sync_response(data: &[u8]) {
    use ruma::api::client::sync::sync_events;
    use ruma::api::IncomingResponseExt;
    let response = http::Response::new(data);
    let Ok(sync) = sync_events::v3::Response::try_from_http_response(response) else {
        return;
    };
    let mut rooms = crate::matrix::Rooms::default();
    for ev in rooms.apply_sync(&sync) {
        let _ = signal::parse(&ev.event_type, &ev.content);
    }
    let me: ruma::OwnedUserId = match "@fuzz:example.org".try_into() {
        Ok(u) => u,
        Err(_) => return,
    };
    let _ = crate::matrix::Rooms::invites(&sync, &me);
}

/// A datagram offered to the STUN client as the answer to its request.
pub fn stun_answer(data: &[u8]) {
    let txn = [0x42u8; 12];
    let _ = crate::stun::parse_binding_success(data, &txn);
}
