//! RTP to H.264 access units (RFC 6184, packetization modes 0 and 1), for passthrough sources
//! such as an RTSP camera.
//!
//! Sans-IO and panic-free like the rest of the core: [`Depacketizer::push`] takes one RTP
//! packet's sequence number, extended timestamp, marker bit and payload; [`Depacketizer::pop`]
//! hands out finished access units as Annex B bytes.
//!
//! - Single NAL unit packets, STAP-A and FU-A are understood. STAP-B, MTAP and FU-B (the
//!   interleaved mode, which no camera uses with WebRTC's packetization-mode 1) are refused
//!   with a typed error.
//! - An access unit ends at the marker bit, or, for senders that never set it, when a packet
//!   with another timestamp arrives.
//! - SPS and PPS are kept (in-band ones replace those from the SDP) and written in front of
//!   every IDR access unit, so each keyframe decodes on its own. An IDR is only called a
//!   keyframe once both are known. AUDs are dropped.
//! - After a lost packet (a gap in sequence numbers) or a malformed packet, nothing is handed
//!   out until the next keyframe: the frames in between refer to pictures a decoder no longer
//!   has. The same holds at the start, so the first access unit out is always a keyframe.
//! - Memory is bounded: an access unit larger than [`MAX_ACCESS_UNIT`] is dropped, and at most
//!   [`MAX_FINISHED_ACCESS_UNITS`] (two) finished access units wait for `pop`.

use std::collections::VecDeque;

use super::{nal_type, START_CODE};

pub use crate::limits::h264::MAX_ACCESS_UNIT;
use crate::limits::h264::{MAX_FINISHED_ACCESS_UNITS, MAX_PARAMETER_SET};

/// NAL unit types of RFC 6184's aggregation and fragmentation packets.
const STAP_A: u8 = 24;
const FU_A: u8 = 28;
#[cfg(test)]
const STAP_B: u8 = 25;
#[cfg(test)]
const FU_B: u8 = 29;

/// Why a packet could not be used. The access unit it belonged to is dropped; the
/// depacketizer waits for the next keyframe and keeps going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DepacketizeError {
    /// The RTP payload is empty.
    Empty,
    /// The forbidden_zero_bit of a NAL unit header is set.
    ForbiddenBit,
    /// NAL unit type 0 or 30/31, or STAP-B, MTAP or FU-B (interleaved mode).
    Unsupported(u8),
    /// A STAP-A whose sizes do not add up.
    BadAggregation,
    /// An FU-A shorter than its two header bytes.
    BadFragment,
    /// The access unit grew beyond [`MAX_ACCESS_UNIT`].
    TooLarge,
}

impl std::fmt::Display for DepacketizeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DepacketizeError::Empty => f.write_str("empty RTP payload"),
            DepacketizeError::ForbiddenBit => f.write_str("forbidden_zero_bit set in a NAL unit"),
            DepacketizeError::Unsupported(t) => {
                write!(
                    f,
                    "NAL unit type {t} is not supported (packetization mode 0/1 only)"
                )
            }
            DepacketizeError::BadAggregation => f.write_str("malformed STAP-A"),
            DepacketizeError::BadFragment => f.write_str("FU-A shorter than its header"),
            DepacketizeError::TooLarge => {
                write!(f, "access unit larger than {MAX_ACCESS_UNIT} bytes")
            }
        }
    }
}

impl std::error::Error for DepacketizeError {}

/// One finished access unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Annex B; a keyframe starts with SPS and PPS.
    pub data: Vec<u8>,
    /// The RTP timestamp (extended, as given to [`Depacketizer::push`]) of its packets.
    pub timestamp: i64,
    /// An IDR with SPS and PPS in front: decodable on its own.
    pub keyframe: bool,
}

/// What was dropped and why, for logs and stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DepacketizerStats {
    /// Access units handed out.
    pub frames: u64,
    /// Of those, keyframes.
    pub keyframes: u64,
    /// Packets missing (gaps in sequence numbers).
    pub packets_lost: u64,
    /// Packets that came late or twice (dropped).
    pub packets_late: u64,
    /// Access units dropped because a packet of theirs was lost or malformed, or too large.
    pub broken: u64,
    /// Complete access units dropped while waiting for a keyframe.
    pub waited: u64,
}

/// Puts H.264 access units back together from RTP packets. See the module docs.
#[derive(Debug)]
pub struct Depacketizer {
    sps: Option<Vec<u8>>,
    pps: Option<Vec<u8>>,
    /// Timestamp of the access unit being put together; `None` between access units.
    au_timestamp: Option<i64>,
    /// Its NAL units but SPS/PPS, Annex B.
    au: Vec<u8>,
    au_vcl: bool,
    au_idr: bool,
    /// A packet of it was lost or malformed: it is dropped when it ends.
    au_broken: bool,
    /// The NAL unit being reassembled from FU-A fragments.
    fragment: Option<Vec<u8>>,
    next_seq: Option<u16>,
    /// Nothing is handed out before the next keyframe.
    waiting_keyframe: bool,
    out: VecDeque<Frame>,
    stats: DepacketizerStats,
}

impl Default for Depacketizer {
    fn default() -> Self {
        Depacketizer::new()
    }
}

impl Depacketizer {
    pub fn new() -> Self {
        Depacketizer {
            sps: None,
            pps: None,
            au_timestamp: None,
            au: Vec::new(),
            au_vcl: false,
            au_idr: false,
            au_broken: false,
            fragment: None,
            next_seq: None,
            waiting_keyframe: true,
            out: VecDeque::with_capacity(MAX_FINISHED_ACCESS_UNITS),
            stats: DepacketizerStats::default(),
        }
    }

    /// Parameter sets known out of band (the SDP's `sprop-parameter-sets`, or an RTSP client's
    /// `avcC`); in-band ones replace them. NAL units that are not an SPS or PPS are ignored.
    pub fn set_parameter_set(&mut self, nalu: &[u8]) {
        self.keep_parameter_set(nalu);
    }

    /// One RTP packet. `timestamp` is the packet's RTP timestamp extended past wrap-around.
    ///
    /// # Errors
    /// When the packet is malformed; the access unit it belongs to is dropped, and later ones
    /// are handed out from the next keyframe on. Nothing else changes.
    pub fn push(
        &mut self,
        seq: u16,
        timestamp: i64,
        marker: bool,
        payload: &[u8],
    ) -> Result<(), DepacketizeError> {
        if let Some(expected) = self.next_seq {
            let ahead = seq.wrapping_sub(expected);
            if ahead >= 0x8000 {
                // Older than the last one: reordered or duplicated. Too late to use.
                self.stats.packets_late += 1;
                return Ok(());
            }
            if ahead > 0 {
                self.stats.packets_lost += u64::from(ahead);
                // The unfinished access unit lost its tail, or this one its head (or both).
                self.au_broken = true;
                self.fragment = None;
                if self.au_timestamp.is_some_and(|t| t != timestamp) {
                    self.finish();
                }
                self.au_broken = true;
            }
        }
        self.next_seq = Some(seq.wrapping_add(1));
        if self.au_timestamp.is_some_and(|t| t != timestamp) {
            // A sender that does not set the marker bit: the previous access unit is complete.
            self.finish();
        }
        self.au_timestamp = Some(timestamp);
        let result = self.payload(payload);
        if result.is_err() {
            self.au_broken = true;
            self.fragment = None;
        }
        if marker {
            self.finish();
        }
        result
    }

    /// The next finished access unit.
    pub fn pop(&mut self) -> Option<Frame> {
        self.out.pop_front()
    }

    pub fn stats(&self) -> DepacketizerStats {
        self.stats
    }

    fn payload(&mut self, payload: &[u8]) -> Result<(), DepacketizeError> {
        let (&header, rest) = payload.split_first().ok_or(DepacketizeError::Empty)?;
        if header & 0x80 != 0 {
            return Err(DepacketizeError::ForbiddenBit);
        }
        match header & 0x1f {
            1..=23 => self.nalu(payload),
            STAP_A => {
                let mut rest = rest;
                if rest.is_empty() {
                    return Err(DepacketizeError::BadAggregation);
                }
                while !rest.is_empty() {
                    let [hi, lo, tail @ ..] = rest else {
                        return Err(DepacketizeError::BadAggregation);
                    };
                    let len = usize::from(u16::from_be_bytes([*hi, *lo]));
                    let (nalu, tail) = match (tail.get(..len), tail.get(len..)) {
                        (Some(n), Some(t)) if len > 0 => (n, t),
                        _ => return Err(DepacketizeError::BadAggregation),
                    };
                    self.nalu(nalu)?;
                    rest = tail;
                }
                Ok(())
            }
            FU_A => {
                let [fu_header, data @ ..] = rest else {
                    return Err(DepacketizeError::BadFragment);
                };
                let start = fu_header & 0x80 != 0;
                let end = fu_header & 0x40 != 0;
                if start {
                    if self.fragment.is_some() {
                        // The previous fragmented NAL unit never ended.
                        self.au_broken = true;
                    }
                    let mut nalu = Vec::with_capacity(data.len().saturating_mul(4) + 1);
                    nalu.push((header & 0xe0) | (fu_header & 0x1f));
                    self.fragment = Some(nalu);
                }
                let Some(nalu) = self.fragment.as_mut() else {
                    // A middle or end fragment whose start was lost (already counted as a
                    // gap) or never sent.
                    self.au_broken = true;
                    return Ok(());
                };
                if nalu.len().saturating_add(data.len()) > MAX_ACCESS_UNIT {
                    self.fragment = None;
                    return Err(DepacketizeError::TooLarge);
                }
                nalu.extend_from_slice(data);
                if end {
                    if let Some(nalu) = self.fragment.take() {
                        self.nalu(&nalu)?;
                    }
                }
                Ok(())
            }
            // 0, STAP-B, MTAP16/24, FU-B, 30, 31
            t => Err(DepacketizeError::Unsupported(t)),
        }
    }

    /// One complete NAL unit of the current access unit.
    fn nalu(&mut self, nalu: &[u8]) -> Result<(), DepacketizeError> {
        let Some(&header) = nalu.first() else {
            return Err(DepacketizeError::Empty);
        };
        if header & 0x80 != 0 {
            return Err(DepacketizeError::ForbiddenBit);
        }
        match header & 0x1f {
            0 => Err(DepacketizeError::Unsupported(0)),
            nal_type::SPS | nal_type::PPS => {
                self.keep_parameter_set(nalu);
                Ok(())
            }
            nal_type::AUD => Ok(()),
            t => {
                if self.au.len().saturating_add(nalu.len() + START_CODE.len()) > MAX_ACCESS_UNIT {
                    return Err(DepacketizeError::TooLarge);
                }
                self.au.extend_from_slice(&START_CODE);
                self.au.extend_from_slice(nalu);
                self.au_vcl |= (nal_type::SLICE..=nal_type::IDR).contains(&t);
                self.au_idr |= t == nal_type::IDR;
                Ok(())
            }
        }
    }

    fn keep_parameter_set(&mut self, nalu: &[u8]) {
        let Some(&header) = nalu.first() else {
            return;
        };
        if nalu.len() > MAX_PARAMETER_SET {
            return;
        }
        let slot = match header & 0x1f {
            nal_type::SPS => &mut self.sps,
            nal_type::PPS => &mut self.pps,
            _ => return,
        };
        match slot {
            Some(v) if v.as_slice() == nalu => {}
            _ => *slot = Some(nalu.to_vec()),
        }
    }

    /// The current access unit is complete: hand it out, or drop it.
    fn finish(&mut self) {
        let Some(timestamp) = self.au_timestamp.take() else {
            return;
        };
        let mut au = std::mem::take(&mut self.au);
        let (vcl, idr, broken) = (self.au_vcl, self.au_idr, self.au_broken);
        self.au_vcl = false;
        self.au_idr = false;
        self.au_broken = false;
        self.fragment = None;
        if broken {
            self.stats.broken += 1;
            self.waiting_keyframe = true;
            return;
        }
        if !vcl {
            return; // SEI or parameter sets alone
        }
        let keyframe = idr && self.sps.is_some() && self.pps.is_some();
        if self.waiting_keyframe && !keyframe {
            self.stats.waited += 1;
            return;
        }
        if keyframe {
            let (Some(sps), Some(pps)) = (&self.sps, &self.pps) else {
                return;
            };
            let mut with_sets =
                Vec::with_capacity(au.len() + sps.len() + pps.len() + 2 * START_CODE.len());
            for p in [sps, pps] {
                with_sets.extend_from_slice(&START_CODE);
                with_sets.extend_from_slice(p);
            }
            with_sets.extend_from_slice(&au);
            au = with_sets;
        }
        if self.out.len() >= MAX_FINISHED_ACCESS_UNITS {
            // The caller is not popping. Frames waiting form a clean chain; this one is
            // dropped (and what refers to it), unless it is a keyframe, which starts anew.
            if keyframe {
                self.stats.broken += self.out.len() as u64;
                self.out.clear();
            } else {
                self.stats.broken += 1;
                self.waiting_keyframe = true;
                return;
            }
        }
        if keyframe {
            self.stats.keyframes += 1;
        }
        self.waiting_keyframe = false;
        self.stats.frames += 1;
        self.out.push_back(Frame {
            data: au,
            timestamp,
            keyframe,
        });
    }
}

/// The SPS and PPS NAL units of an `AVCDecoderConfigurationRecord` (ISO/IEC 14496-15
/// `avcC`, what RTSP clients build from `sprop-parameter-sets`). Malformed input gives what
/// could be read before the error.
pub fn avcc_parameter_sets(avcc: &[u8]) -> Vec<&[u8]> {
    /// `count` length-prefixed NAL units from the front of `rest`.
    fn take<'a>(count: usize, rest: &mut &'a [u8], out: &mut Vec<&'a [u8]>) -> bool {
        for _ in 0..count {
            let [hi, lo, tail @ ..] = *rest else {
                return false;
            };
            let len = usize::from(u16::from_be_bytes([*hi, *lo]));
            let Some(nalu) = tail.get(..len) else {
                return false;
            };
            out.push(nalu);
            *rest = tail.get(len..).unwrap_or_default();
        }
        true
    }
    let mut out = Vec::new();
    // version, profile, compatibility, level, lengthSizeMinusOne, numOfSequenceParameterSets
    let Some(&num_sps) = avcc.get(5) else {
        return out;
    };
    let mut rest = avcc.get(6..).unwrap_or_default();
    if !take(usize::from(num_sps & 0x1f), &mut rest, &mut out) {
        return out;
    }
    if let Some((&num_pps, tail)) = rest.split_first() {
        let mut tail = tail;
        take(usize::from(num_pps), &mut tail, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPS: &[u8] = &[0x67, 0x64, 0x00, 0x1e, 0xac, 0xd9];
    const PPS: &[u8] = &[0x68, 0xeb, 0xe3, 0xcb];

    fn idr(len: usize) -> Vec<u8> {
        let mut v = vec![0x65, 0x88];
        v.extend((0..len).map(|i| (i % 251) as u8 | 1));
        v
    }

    fn p_slice() -> Vec<u8> {
        vec![0x41, 0x9a, 0x02, 0x03]
    }

    fn annex_b(nalus: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for n in nalus {
            v.extend_from_slice(&START_CODE);
            v.extend_from_slice(n);
        }
        v
    }

    fn fu_a(nalu: &[u8], chunk: usize) -> Vec<Vec<u8>> {
        let header = nalu[0];
        let body = &nalu[1..];
        let chunks: Vec<&[u8]> = body.chunks(chunk).collect();
        let n = chunks.len();
        chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut p = vec![(header & 0xe0) | FU_A, header & 0x1f];
                if i == 0 {
                    p[1] |= 0x80;
                }
                if i + 1 == n {
                    p[1] |= 0x40;
                }
                p.extend_from_slice(c);
                p
            })
            .collect()
    }

    fn stap_a(nalus: &[&[u8]]) -> Vec<u8> {
        let mut p = vec![0x78];
        for n in nalus {
            p.extend_from_slice(&(n.len() as u16).to_be_bytes());
            p.extend_from_slice(n);
        }
        p
    }

    /// Pushes packets with consecutive sequence numbers from `seq`; marker on the last.
    fn push_au(d: &mut Depacketizer, seq: &mut u16, ts: i64, packets: &[Vec<u8>]) {
        for (i, p) in packets.iter().enumerate() {
            d.push(*seq, ts, i + 1 == packets.len(), p).unwrap();
            *seq = seq.wrapping_add(1);
        }
    }

    #[test]
    fn keyframe_from_stap_a_and_fragments() {
        let mut d = Depacketizer::new();
        let mut seq = 65530; // wraps during the test
        let idr = idr(3000);
        let mut packets = vec![stap_a(&[SPS, PPS])];
        packets.extend(fu_a(&idr, 1000));
        push_au(&mut d, &mut seq, 0, &packets);
        let f = d.pop().unwrap();
        assert!(f.keyframe);
        assert_eq!(f.timestamp, 0);
        assert_eq!(f.data, annex_b(&[SPS, PPS, &idr]));
        assert!(d.pop().is_none());
        push_au(&mut d, &mut seq, 6000, &[p_slice()]);
        let f = d.pop().unwrap();
        assert!(!f.keyframe);
        assert_eq!(f.data, annex_b(&[&p_slice()]));
        assert_eq!(d.stats().packets_lost, 0);
        assert_eq!(d.stats().frames, 2);
    }

    #[test]
    fn parameter_sets_go_in_front_of_every_idr() {
        let mut d = Depacketizer::new();
        d.set_parameter_set(SPS);
        d.set_parameter_set(PPS);
        let mut seq = 1;
        // An AUD and an SEI: the AUD is dropped, the SEI kept.
        let sei: &[u8] = &[0x06, 0x05, 0x01, 0x80];
        push_au(
            &mut d,
            &mut seq,
            10,
            &[vec![0x09, 0xf0], sei.to_vec(), idr(10)],
        );
        assert_eq!(d.pop().unwrap().data, annex_b(&[SPS, PPS, sei, &idr(10)]));
        // In-band parameter sets replace the SDP's.
        let sps2: &[u8] = &[0x67, 0x42, 0xc0, 0x1f, 0x01];
        push_au(
            &mut d,
            &mut seq,
            20,
            &[sps2.to_vec(), PPS.to_vec(), idr(10)],
        );
        assert_eq!(d.pop().unwrap().data, annex_b(&[sps2, PPS, &idr(10)]));
    }

    #[test]
    fn nothing_before_the_first_keyframe_or_without_parameter_sets() {
        let mut d = Depacketizer::new();
        let mut seq = 0;
        push_au(&mut d, &mut seq, 0, &[p_slice()]);
        // An IDR without SPS/PPS is no keyframe.
        push_au(&mut d, &mut seq, 1, &[idr(5)]);
        assert!(d.pop().is_none());
        assert_eq!(d.stats().waited, 2);
        push_au(&mut d, &mut seq, 2, &[SPS.to_vec(), PPS.to_vec(), idr(5)]);
        assert!(d.pop().unwrap().keyframe);
    }

    #[test]
    fn without_marker_bits_the_timestamp_ends_access_units() {
        let mut d = Depacketizer::new();
        for (seq, (ts, p)) in [
            (0, stap_a(&[SPS, PPS, &idr(4)])),
            (3000, p_slice()),
            (6000, p_slice()),
        ]
        .into_iter()
        .enumerate()
        {
            d.push(seq as u16, ts, false, &p).unwrap();
        }
        let got: Vec<(i64, bool)> = std::iter::from_fn(|| d.pop())
            .map(|f| (f.timestamp, f.keyframe))
            .collect();
        assert_eq!(got, vec![(0, true), (3000, false)]);
    }

    #[test]
    fn a_loss_drops_frames_until_the_next_keyframe() {
        let mut d = Depacketizer::new();
        let mut seq = 100u16;
        let key: Vec<Vec<u8>> = std::iter::once(stap_a(&[SPS, PPS]))
            .chain(fu_a(&idr(2000), 500))
            .collect();
        push_au(&mut d, &mut seq, 0, &key);
        assert!(d.pop().unwrap().keyframe);
        // A P-frame loses its middle fragment.
        let frags = fu_a(&[0x41, 1, 2, 3, 4, 5, 6, 7, 8, 9], 3);
        let lost = seq + 1;
        d.push(seq, 3000, false, &frags[0]).unwrap();
        d.push(seq + 2, 3000, true, &frags[2]).unwrap();
        seq += 3;
        // The next P-frame is whole but refers to the broken one.
        push_au(&mut d, &mut seq, 6000, &[p_slice()]);
        assert!(d.pop().is_none());
        let s = d.stats();
        assert_eq!((s.packets_lost, s.broken, s.waited), (1, 1, 1));
        // A late copy of the lost packet is ignored.
        d.push(lost, 3000, false, &frags[1]).unwrap();
        assert_eq!(d.stats().packets_late, 1);
        push_au(&mut d, &mut seq, 9000, &key);
        let f = d.pop().unwrap();
        assert!(f.keyframe);
        assert_eq!(f.timestamp, 9000);
    }

    #[test]
    fn a_lost_marker_packet_breaks_its_access_unit_only_once_known() {
        let mut d = Depacketizer::new();
        let mut seq = 0u16;
        push_au(&mut d, &mut seq, 0, &[stap_a(&[SPS, PPS, &idr(4)])]);
        d.pop().unwrap();
        // First packet of a two-packet IDR arrives; its marker packet is lost.
        let frags = fu_a(&idr(40), 25);
        d.push(seq, 3000, false, &stap_a(&[SPS, PPS])).unwrap();
        d.push(seq + 1, 3000, false, &frags[0]).unwrap();
        seq += 3; // frags[1] lost
        push_au(&mut d, &mut seq, 6000, &[p_slice()]);
        assert!(d.pop().is_none());
        // The IDR, and the P-frame (whose head might have been what was lost).
        assert_eq!(d.stats().broken, 2);
    }

    #[test]
    fn malformed_packets_are_errors_and_nothing_else_breaks() {
        let mut d = Depacketizer::new();
        let mut seq = 0u16;
        let bad: &[(&[u8], DepacketizeError)] = &[
            (&[], DepacketizeError::Empty),
            (&[0x85, 1], DepacketizeError::ForbiddenBit),
            (&[0x19, 1, 2], DepacketizeError::Unsupported(STAP_B)),
            (&[0x1d, 0x85, 2], DepacketizeError::Unsupported(FU_B)),
            (&[0x00], DepacketizeError::Unsupported(0)),
            (&[0x78], DepacketizeError::BadAggregation),
            (&[0x78, 0, 9, 1], DepacketizeError::BadAggregation),
            (&[0x78, 0, 0], DepacketizeError::BadAggregation),
            (&[0x7c], DepacketizeError::BadFragment),
        ];
        for (p, e) in bad {
            assert_eq!(d.push(seq, i64::from(seq), true, p), Err(*e), "{p:?}");
            seq += 1;
        }
        assert!(d.pop().is_none());
        push_au(&mut d, &mut seq, 100, &[stap_a(&[SPS, PPS, &idr(4)])]);
        assert!(d.pop().unwrap().keyframe);
    }

    #[test]
    fn oversized_access_units_are_dropped() {
        let mut d = Depacketizer::new();
        let mut seq = 0u16;
        let chunk = vec![0x55u8; 60_000];
        let mut start = vec![0x7c, 0x85];
        start.extend_from_slice(&chunk);
        d.push(seq, 0, false, &stap_a(&[SPS, PPS])).unwrap();
        seq += 1;
        d.push(seq, 0, false, &start).unwrap();
        seq += 1;
        let mut middle = vec![0x7c, 0x05];
        middle.extend_from_slice(&chunk);
        let mut err = None;
        for _ in 0..(MAX_ACCESS_UNIT / chunk.len() + 2) {
            if let Err(e) = d.push(seq, 0, false, &middle) {
                err = Some(e);
            }
            seq += 1;
        }
        assert_eq!(err, Some(DepacketizeError::TooLarge));
        d.push(seq, 3000, true, &stap_a(&[SPS, PPS, &idr(4)]))
            .unwrap();
        let f = d.pop().unwrap();
        assert_eq!(f.timestamp, 3000);
        assert_eq!(d.stats().broken, 1);
    }

    #[test]
    fn at_most_two_frames_wait() {
        let mut d = Depacketizer::new();
        let mut seq = 0u16;
        push_au(&mut d, &mut seq, 0, &[stap_a(&[SPS, PPS, &idr(4)])]);
        for ts in 1..5 {
            push_au(&mut d, &mut seq, ts, &[p_slice()]);
        }
        let got: Vec<i64> = std::iter::from_fn(|| d.pop())
            .map(|f| f.timestamp)
            .collect();
        // The keyframe and the first P-frame wait; the next one finds no room and is
        // dropped, and the rest refer to it, so they wait for the next keyframe.
        assert_eq!(got, vec![0, 1]);
        let s = d.stats();
        assert_eq!((s.broken, s.waited), (1, 2));
        push_au(&mut d, &mut seq, 9, &[stap_a(&[SPS, PPS, &idr(4)])]);
        assert!(d.pop().unwrap().keyframe);
    }

    #[test]
    fn avcc_gives_sps_and_pps() {
        let mut avcc = vec![1, 0x64, 0, 0x1e, 0xff, 0xe1];
        avcc.extend_from_slice(&(SPS.len() as u16).to_be_bytes());
        avcc.extend_from_slice(SPS);
        avcc.push(1);
        avcc.extend_from_slice(&(PPS.len() as u16).to_be_bytes());
        avcc.extend_from_slice(PPS);
        assert_eq!(avcc_parameter_sets(&avcc), vec![SPS, PPS]);
        assert_eq!(avcc_parameter_sets(&avcc[..avcc.len() - 1]), vec![SPS]);
        assert!(avcc_parameter_sets(&[1, 2]).is_empty());
    }
}
