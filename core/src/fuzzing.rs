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
    use ruma::api::IncomingResponse;
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

/// A datagram from the TURN server (or anyone) into the TURN client, in each state of an
/// allocation: before the 401, after it, allocated with a bound channel. Also parsed as a
/// message on its own with every accessor.
pub fn turn_message(data: &[u8]) {
    use crate::turn::msg::{self, Builder, Class, Message};
    use crate::turn::{TurnClient, TurnCredentials};
    use crate::types::Secret;
    use std::time::{Duration, Instant};

    if let Ok(m) = Message::parse(data) {
        let _ = (m.mapped_addr(), m.error_code(), m.channel_number());
        let _ = (
            m.xor_addr(msg::ATTR_XOR_PEER_ADDRESS),
            m.u32_attr(msg::ATTR_LIFETIME),
        );
        let _ = m.verify_integrity(b"key");
    }
    let _ = msg::parse_channel_data(data);

    let local: std::net::SocketAddr = ([192, 0, 2, 10], 5000).into();
    let server: std::net::SocketAddr = ([198, 51, 100, 1], 3478).into();
    let peer: std::net::SocketAddr = ([203, 0, 113, 9], 7000).into();
    let realm = "fuzz";
    #[allow(clippy::disallowed_methods)] // a time base for the fuzzer, not the core's clock
    let mut now = Instant::now();
    let mut rng = crate::rng::Rng::new(1);
    let mut c = TurnClient::default();
    c.set_credentials(
        TurnCredentials {
            username: Secret::new("u"),
            password: Secret::new("p"),
        },
        &[local],
        now,
    );
    c.add_server(server, &[local], now);
    let key = msg::long_term_key("u", realm, "p");
    let feed = |c: &mut TurnClient, now: Instant, rng: &mut crate::rng::Rng| {
        let _ = c.handle_receive(server, local, data, now, rng);
        let _ = c.handle_plain(server, local, data);
        while c.poll_event().is_some() {}
    };
    // Step by step to an allocation with a bound channel, feeding the input at each step.
    for step in 0..4 {
        c.handle_timeout(now, &mut rng);
        let mut last = None;
        while let Some(t) = c.poll_transmit(now) {
            last = Some(t.contents);
        }
        feed(&mut c, now, &mut rng);
        let Some(req) = last else { break };
        let Ok(m) = Message::parse(&req) else { break };
        let answer = match step {
            0 => Builder::new(m.method, Class::Error, m.txn)
                .error(401, "Unauthorized")
                .attr(msg::ATTR_REALM, realm.as_bytes())
                .attr(msg::ATTR_NONCE, b"n")
                .build(),
            1 => Builder::new(m.method, Class::Success, m.txn)
                .xor_addr(
                    msg::ATTR_XOR_RELAYED_ADDRESS,
                    ([198, 51, 100, 1], 49152).into(),
                )
                .xor_addr(msg::ATTR_XOR_MAPPED_ADDRESS, local)
                .u32(msg::ATTR_LIFETIME, 600)
                .integrity(&key)
                .build(),
            _ => Builder::new(m.method, Class::Success, m.txn)
                .integrity(&key)
                .build(),
        };
        let _ = c.handle_receive(server, local, &answer, now, &mut rng);
        if step == 1 {
            let _ = c.send(([198, 51, 100, 1], 49152).into(), peer, b"x", now, &mut rng);
        }
        now += Duration::from_millis(10);
    }
    feed(&mut c, now, &mut rng);
    while c.poll_queued(&mut rng).is_some() {}
    c.handle_timeout(now + Duration::from_secs(700), &mut rng);
}

/// H.264 Annex B as a camera or file sends it: NAL units, access units, the SPS profile.
pub fn h264(data: &[u8]) {
    use crate::h264;
    for nal in h264::split_nalus(data) {
        let _ = h264::nal_unit_type(nal);
        let _ = h264::profile_level_id(nal);
        if let Ok(p) = h264::ProfileLevelId::from_sps(nal) {
            let _ = (p.profile_idc(), p.constraints(), p.level_idc(), p.family());
        }
    }
    for au in h264::access_units(data) {
        let _ = au.nalus().count();
    }
    let _ = h264::profile_of_stream(data);
    let _ = h264::avcc_parameter_sets(data);
    // The same bytes as RTP packets: each one a control byte (bit 0 marker, bit 1 a new
    // timestamp, bits 2-3: next packet, a gap of 1 or 2, or the previous one again), a length
    // byte and that many payload bytes.
    let mut d = h264::Depacketizer::new();
    let (mut seq, mut ts, mut rest) = (0u16, 0i64, data);
    while let [ctl, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (payload, tail) = tail.split_at(n);
        seq = match (ctl >> 2) & 3 {
            3 => seq.wrapping_sub(2), // the previous packet again
            jump => seq.wrapping_add(u16::from(jump)),
        };
        if ctl & 2 != 0 {
            ts += 3000;
        }
        let _ = d.push(seq, ts, ctl & 1 != 0, payload);
        seq = seq.wrapping_add(1);
        while let Some(f) = d.pop() {
            assert!(f.data.len() <= h264::MAX_ACCESS_UNIT + 1024);
            assert!(!f.keyframe || f.data.starts_with(&h264::START_CODE));
        }
        rest = tail;
    }
    let s = d.stats();
    assert!(s.keyframes <= s.frames);
}

/// A peer's SDP on a real str0m `Rtc`: taken as an invite's offer and answered, then as a
/// renegotiation offer of that call, then as the answer to a call we placed. str0m's panics
/// are caught by the call (they cost only that call); here a caught panic is a finding.
#[allow(clippy::disallowed_methods, clippy::panic)] // a harness: any Instant; a panic is a finding
pub fn negotiate(data: &[u8]) {
    use crate::call::{Call, CallAction, CallSetup};
    use crate::types::AgentEvent;
    let Ok(sdp) = std::str::from_utf8(data) else {
        return;
    };
    let now = std::time::Instant::now();
    let setup = CallSetup::loopback();
    let (Ok(room), Ok(peer)) = (
        ruma::OwnedRoomId::try_from("!fuzz:example.org"),
        ruma::OwnedUserId::try_from("@peer:example.org"),
    ) else {
        return;
    };
    let no_panic = |call: &mut Call| {
        while let Some(a) = call.poll_action() {
            if let CallAction::Event(AgentEvent::PanicCaught { during, .. }) = a {
                panic!("str0m panicked on a peer's SDP ({during})");
            }
        }
    };
    let remaining = std::time::Duration::from_secs(30);
    let inbound = Call::inbound(
        "in".into(),
        room.clone(),
        peer.clone(),
        Some("theirs".into()),
        sdp,
        remaining,
        "ours".into(),
        &setup,
        now,
    );
    match inbound {
        Err(crate::call::InviteRefused::Panicked) => panic!("str0m panicked on an offer"),
        Err(_) => {}
        Ok(mut call) => {
            let _ = call.answer(&setup, now);
            no_panic(&mut call);
            call.on_negotiate(Some("theirs"), "offer", sdp, now);
            no_panic(&mut call);
        }
    }
    if let Ok(mut call) = Call::outbound(
        "out".into(),
        room,
        peer.clone(),
        Some(peer),
        "ours".into(),
        &setup,
        now,
    ) {
        no_panic(&mut call);
        call.on_answer(Some("theirs".into()), sdp, now);
        no_panic(&mut call);
    }
}

/// DTMF digits as `send_dtmf` takes them, and RFC 4733 reports in any order, repeated or
/// missing, into the collapse of key presses: each 4 bytes are one report (RTP timestamp step,
/// event code, bit 7 end and 10 ms units of duration, ms until it arrives). Every press names
/// a DTMF digit and none comes without a report.
#[allow(clippy::disallowed_methods)] // a time base for the fuzzer, not the core's clock
pub fn dtmf(data: &[u8]) {
    use crate::call::dtmf::{DtmfReceiver, Report};
    use std::time::{Duration, Instant};
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(codes) = crate::call::parse_digits(text) {
            assert!(!codes.is_empty() && codes.len() <= crate::limits::MAX_DTMF_DIGITS);
            assert!(codes.iter().all(|c| *c <= 15));
        }
    }
    let mut rx = DtmfReceiver::default();
    let mut now = Instant::now();
    let (mut rtp_time, mut reports, mut presses) = (0u64, 0usize, Vec::new());
    for chunk in data.chunks_exact(4) {
        let [step, code, flags, wait] = *chunk else {
            continue;
        };
        // Steps of 128 and more go back: reordered and repeated presses.
        rtp_time = if step >= 128 {
            rtp_time.wrapping_sub(u64::from(step - 128))
        } else {
            rtp_time.wrapping_add(u64::from(step))
        };
        now += Duration::from_millis(u64::from(wait));
        presses.extend(rx.handle_timeout(now));
        let report = Report {
            rtp_time,
            code,
            end: flags & 0x80 != 0,
            duration: Duration::from_millis(10 * u64::from(flags & 0x7f)),
        };
        presses.extend(rx.on_report(report, now));
        reports += 1;
    }
    presses.extend(rx.handle_timeout(now + Duration::from_secs(3600)));
    assert!(presses.len() <= reports);
    assert!(presses
        .iter()
        .all(|p| crate::call::dtmf::event_code(p.digit).is_some()));
}

#[cfg(test)]
mod tests {
    #[test]
    fn dtmf_takes_any_bytes() {
        super::dtmf(b"");
        super::dtmf(b"12#*ABCD0");
        super::dtmf(&[
            0, 1, 0x05, 20, 0, 1, 0x8a, 20, 0, 1, 0x8a, 0, 200, 2, 0x0a, 5, 7, 16, 0x8a, 0,
        ]);
        let all: Vec<u8> = (0..=255u8).collect();
        super::dtmf(&all);
    }
}
