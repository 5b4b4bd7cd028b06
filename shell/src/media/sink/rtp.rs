//! `--forward-rtp HOST:PORT`: the remote media re-sent as plain RTP (no SRTP, no RTCP) to a
//! local player such as ffplay, ffmpeg, VLC or GStreamer, which opens the SDP file
//! [`RtpForwarder::write_sdp`] writes.
//!
//! Video goes to PORT and audio to PORT+2 (the RTP/AVP habit of even ports, leaving the odd
//! ones for the player's RTCP). H.264 is packetized per RFC 6184 (single NAL unit packets,
//! FU-A for NALs larger than [`MAX_RTP_PAYLOAD`], AUDs dropped), VP8 per RFC 7741, audio one
//! packet per frame. The socket is non-blocking: a full send buffer drops packets rather than
//! stall the media pump (counted, logged once).

use std::ffi::OsString;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::Path;

use base64::prelude::{Engine as _, BASE64_STANDARD};
use call_assist_core::h264::{nal_type, nal_unit_type, split_nalus};
use call_assist_core::{Codec, MediaFrame, MediaKind};

use super::WarnOnce;

/// Largest RTP payload sent: with the 12-byte RTP header and IP/UDP headers it stays below
/// any MTU a local or tunnelled link has.
pub const MAX_RTP_PAYLOAD: usize = 1_200;
/// Dynamic payload type announced for H.264.
pub const PT_H264: u8 = 96;
/// Dynamic payload type announced for VP8.
pub const PT_VP8: u8 = 97;
/// Static payload type of PCMU (RFC 3551).
pub const PT_PCMU: u8 = 0;
/// Static payload type of PCMA (RFC 3551).
pub const PT_PCMA: u8 = 8;
/// Dynamic payload type announced for Opus (the one browsers use).
pub const PT_OPUS: u8 = 111;
/// Largest SPS/PPS put into the SDP's sprop-parameter-sets.
const MAX_PARAM_SET_BYTES: usize = 256;
/// FU-A NAL unit type (RFC 6184 §5.8).
const FU_A: u8 = 28;
/// RTP header length without CSRCs or extensions.
const RTP_HEADER_BYTES: usize = 12;

/// Bits of `WarnOnce`.
const WARN_DROPPED: u32 = 0;
const WARN_UNSUPPORTED: u32 = 1;
const WARN_GARBAGE: u32 = 2;
const WARN_SEND: u32 = 3;

/// One outgoing RTP stream.
#[derive(Debug, Clone, Copy)]
struct Stream {
    codec: Codec,
    payload_type: u8,
    ssrc: u32,
    seq: u16,
}

/// Re-sends one call's remote media as plain RTP to `dest` (video) and `dest`+2 (audio).
#[derive(Debug)]
pub struct RtpForwarder {
    socket: UdpSocket,
    video_dest: SocketAddr,
    audio_dest: SocketAddr,
    video: Option<Stream>,
    audio: Option<Stream>,
    sps: Option<Vec<u8>>,
    pps: Option<Vec<u8>>,
    session_id: u32,
    sdp_version: u64,
    packets_sent: u64,
    packets_dropped: u64,
    packet: Vec<u8>,
    warned: WarnOnce,
}

impl RtpForwarder {
    /// Binds a non-blocking UDP socket of `dest`'s address family on an ephemeral port.
    ///
    /// # Errors
    /// `InvalidInput` when `dest`'s port is 0 or too high to leave room for the audio port
    /// (`port + 2`); otherwise the bind failed.
    pub fn new(dest: SocketAddr) -> io::Result<Self> {
        let audio_port = match dest.port() {
            0 => None,
            p => p.checked_add(2),
        }
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "RTP forward port must be between 1 and 65533 (audio goes to port + 2)",
            )
        })?;
        let local: SocketAddr = match dest.ip() {
            IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(local)?;
        socket.set_nonblocking(true)?;
        let mut audio_dest = dest;
        audio_dest.set_port(audio_port);
        tracing::info!(video = %dest, audio = %audio_dest, "forwarding remote media as RTP");
        Ok(Self {
            socket,
            video_dest: dest,
            audio_dest,
            video: None,
            audio: None,
            sps: None,
            pps: None,
            session_id: fastrand::u32(..),
            sdp_version: 0,
            packets_sent: 0,
            packets_dropped: 0,
            packet: Vec::with_capacity(RTP_HEADER_BYTES + MAX_RTP_PAYLOAD),
            warned: WarnOnce::default(),
        })
    }

    /// Packetizes one frame and sends it.
    ///
    /// # Errors
    /// `Unsupported` for `Codec::Other`, `InvalidData` for a frame that gives no packet
    /// (empty, no H.264 NAL unit, codec not of the frame's kind), both logged once and
    /// harmless; other errors come from the socket. A full send buffer is not an error: the
    /// packet is dropped and counted.
    pub fn forward(&mut self, f: &MediaFrame) -> io::Result<()> {
        let (payload_type, is_video) = match (f.kind, f.codec) {
            (MediaKind::Video, Codec::H264) => (PT_H264, true),
            (MediaKind::Video, Codec::Vp8) => (PT_VP8, true),
            (MediaKind::Audio, Codec::Pcmu) => (PT_PCMU, false),
            (MediaKind::Audio, Codec::Pcma) => (PT_PCMA, false),
            (MediaKind::Audio, Codec::Opus) => (PT_OPUS, false),
            _ => {
                if self.warned.first(WARN_UNSUPPORTED) {
                    tracing::warn!(call_id = %f.call_id, codec = ?f.codec, kind = ?f.kind, "cannot forward this codec as RTP");
                }
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "codec not forwarded",
                ));
            }
        };
        let payloads = match f.codec {
            Codec::H264 => {
                self.learn_parameter_sets(&f.data);
                packetize_h264(&f.data, MAX_RTP_PAYLOAD)
            }
            Codec::Vp8 => packetize_vp8(&f.data, MAX_RTP_PAYLOAD),
            _ if f.data.is_empty() || f.data.len() > MAX_RTP_PAYLOAD * 4 => Vec::new(),
            _ => vec![f.data.to_vec()],
        };
        if payloads.is_empty() {
            if self.warned.first(WARN_GARBAGE) {
                tracing::warn!(call_id = %f.call_id, codec = ?f.codec, "frame gives no RTP packet; skipped");
            }
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "frame gives no RTP packet",
            ));
        }

        let slot = if is_video {
            &mut self.video
        } else {
            &mut self.audio
        };
        if slot.is_none_or(|s| s.codec != f.codec) {
            // A new codec is a new stream for the player: fresh SSRC, new SDP.
            *slot = Some(Stream {
                codec: f.codec,
                payload_type,
                ssrc: fastrand::u32(..),
                seq: fastrand::u16(..),
            });
            self.sdp_version += 1;
            tracing::debug!(call_id = %f.call_id, codec = ?f.codec, "RTP forward stream started");
        }
        let dest = if is_video {
            self.video_dest
        } else {
            self.audio_dest
        };
        let last = payloads.len() - 1;
        for (i, payload) in payloads.iter().enumerate() {
            let slot = if is_video {
                &mut self.video
            } else {
                &mut self.audio
            };
            let Some(stream) = slot.as_mut() else {
                break;
            };
            // Video: marker on the last packet of a picture (RFC 6184 §5.1, RFC 7741 §4.1).
            let marker = is_video && i == last;
            write_header(&mut self.packet, stream, marker, f.rtp_time as u32);
            stream.seq = stream.seq.wrapping_add(1);
            self.packet.extend_from_slice(payload);
            match self.socket.send_to(&self.packet, dest) {
                Ok(_) => self.packets_sent += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.packets_dropped += 1;
                    if self.warned.first(WARN_DROPPED) {
                        tracing::warn!(call_id = %f.call_id, "RTP forward socket full; dropping packets");
                    }
                }
                Err(e) => {
                    if self.warned.first(WARN_SEND) {
                        tracing::warn!(call_id = %f.call_id, "RTP forward send failed: {e}");
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Codecs of the video and audio streams, learnt from the first frame of each kind.
    pub fn codecs(&self) -> (Option<Codec>, Option<Codec>) {
        (self.video.map(|s| s.codec), self.audio.map(|s| s.codec))
    }

    /// Increments whenever [`sdp`](Self::sdp) would change (a codec or H.264 parameter sets
    /// learnt), so the shell rewrites the file only then.
    pub fn sdp_version(&self) -> u64 {
        self.sdp_version
    }

    /// Packets sent and dropped (send buffer full) so far.
    pub fn packet_counts(&self) -> (u64, u64) {
        (self.packets_sent, self.packets_dropped)
    }

    /// An SDP describing the streams seen so far (no m-line for a kind not seen yet).
    pub fn sdp(&self) -> String {
        let ip = self.video_dest.ip();
        let family = if ip.is_ipv4() { "IP4" } else { "IP6" };
        let mut sdp = format!(
            "v=0\r\no=- {} {} IN {family} {ip}\r\ns=call-assist\r\nc=IN {family} {ip}\r\nt=0 0\r\n",
            self.session_id, self.sdp_version
        );
        if let Some(v) = self.video {
            let pt = v.payload_type;
            sdp.push_str(&format!(
                "m=video {} RTP/AVP {pt}\r\n",
                self.video_dest.port()
            ));
            if v.codec == Codec::H264 {
                sdp.push_str(&format!(
                    "a=rtpmap:{pt} H264/90000\r\na=fmtp:{pt} packetization-mode=1"
                ));
                if let (Some(sps), Some(pps)) = (&self.sps, &self.pps) {
                    if let Some(plid) = call_assist_core::h264::profile_level_id(sps) {
                        sdp.push_str(&format!(";profile-level-id={plid:06x}"));
                    }
                    sdp.push_str(&format!(
                        ";sprop-parameter-sets={},{}",
                        BASE64_STANDARD.encode(sps),
                        BASE64_STANDARD.encode(pps)
                    ));
                }
                sdp.push_str("\r\n");
            } else {
                sdp.push_str(&format!("a=rtpmap:{pt} VP8/90000\r\n"));
            }
        }
        if let Some(a) = self.audio {
            let pt = a.payload_type;
            let rtpmap = match a.codec {
                Codec::Opus => "opus/48000/2",
                Codec::Pcma => "PCMA/8000",
                _ => "PCMU/8000",
            };
            sdp.push_str(&format!(
                "m=audio {} RTP/AVP {pt}\r\na=rtpmap:{pt} {rtpmap}\r\n",
                self.audio_dest.port()
            ));
        }
        sdp
    }

    /// Writes [`sdp`](Self::sdp) to `path` via a temporary file and a rename, so a player
    /// that opens the file meanwhile sees the old or the new SDP, never half of one.
    ///
    /// # Errors
    /// Writing or renaming failed.
    pub fn write_sdp(&self, path: &Path) -> io::Result<()> {
        let mut tmp = OsString::from(path.as_os_str());
        tmp.push(".tmp");
        std::fs::write(&tmp, self.sdp())?;
        std::fs::rename(&tmp, path)
    }

    /// Keeps the latest SPS/PPS for sprop-parameter-sets.
    fn learn_parameter_sets(&mut self, annexb: &[u8]) {
        for nal in split_nalus(annexb) {
            if nal.len() > MAX_PARAM_SET_BYTES {
                continue;
            }
            let slot = match nal_unit_type(nal) {
                Some(nal_type::SPS) => &mut self.sps,
                Some(nal_type::PPS) => &mut self.pps,
                _ => continue,
            };
            if slot.as_deref() != Some(nal) {
                *slot = Some(nal.to_vec());
                self.sdp_version += 1;
            }
        }
    }
}

/// Replaces `packet` with a 12-byte RTP header (RFC 3550 §5.1).
fn write_header(packet: &mut Vec<u8>, stream: &Stream, marker: bool, timestamp: u32) {
    packet.clear();
    packet.push(0x80); // V=2, no padding, extension or CSRCs
    packet.push(u8::from(marker) << 7 | (stream.payload_type & 0x7f));
    packet.extend_from_slice(&stream.seq.to_be_bytes());
    packet.extend_from_slice(&timestamp.to_be_bytes());
    packet.extend_from_slice(&stream.ssrc.to_be_bytes());
}

/// RTP payloads of an Annex B access unit (RFC 6184, packetization-mode 1): a NAL unit that
/// fits in `max_payload` goes alone, a larger one as FU-A fragments. AUDs are dropped (they
/// have no meaning in RTP) and so are NAL units with the forbidden bit set.
pub fn packetize_h264(annexb: &[u8], max_payload: usize) -> Vec<Vec<u8>> {
    // Room for the two FU bytes and at least one byte of payload.
    let max_payload = max_payload.max(3);
    let mut out = Vec::new();
    for nal in split_nalus(annexb) {
        let Some((&header, body)) = nal.split_first() else {
            continue;
        };
        if header & 0x80 != 0 || header & 0x1f == nal_type::AUD {
            continue;
        }
        if nal.len() <= max_payload {
            out.push(nal.to_vec());
            continue;
        }
        let indicator = (header & 0xe0) | FU_A;
        let ty = header & 0x1f;
        let chunks: Vec<&[u8]> = body.chunks(max_payload - 2).collect();
        let last = chunks.len().saturating_sub(1);
        for (i, chunk) in chunks.into_iter().enumerate() {
            let start = if i == 0 { 0x80 } else { 0 };
            let end = if i == last { 0x40 } else { 0 };
            let mut p = Vec::with_capacity(chunk.len() + 2);
            p.push(indicator);
            p.push(start | end | ty);
            p.extend_from_slice(chunk);
            out.push(p);
        }
    }
    out
}

/// RTP payloads of a VP8 frame (RFC 7741 §4.2): a one-byte payload descriptor (S bit on the
/// first packet, partition index 0, no extensions) in front of each piece. Empty for an
/// empty frame.
pub fn packetize_vp8(frame: &[u8], max_payload: usize) -> Vec<Vec<u8>> {
    let max_payload = max_payload.max(2);
    frame
        .chunks(max_payload - 1)
        .enumerate()
        .map(|(i, chunk)| {
            let mut p = Vec::with_capacity(chunk.len() + 1);
            p.push(if i == 0 { 0x10 } else { 0x00 });
            p.extend_from_slice(chunk);
            p
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::h264::START_CODE;
    use crate::media::sink::testutil::*;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    /// Reassembles single-NAL and FU-A payloads into NAL units.
    fn depacketize_h264(payloads: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut nals = Vec::new();
        let mut fu: Option<Vec<u8>> = None;
        for p in payloads {
            if p[0] & 0x1f == FU_A {
                let (s, e) = (p[1] & 0x80 != 0, p[1] & 0x40 != 0);
                if s {
                    assert!(fu.is_none(), "FU-A start inside a fragment");
                    fu = Some(vec![(p[0] & 0xe0) | (p[1] & 0x1f)]);
                }
                let buf = fu.as_mut().expect("FU-A continuation without start");
                buf.extend_from_slice(&p[2..]);
                if e {
                    nals.push(fu.take().unwrap());
                }
            } else {
                assert!(fu.is_none(), "single NAL inside a fragment");
                nals.push(p.clone());
            }
        }
        assert!(fu.is_none(), "unterminated FU-A");
        nals
    }

    fn annexb(nals: &[&[u8]]) -> Vec<u8> {
        nals.iter()
            .flat_map(|n| START_CODE.iter().chain(n.iter()).copied())
            .collect()
    }

    fn big_idr(len: usize) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(3);
        // Never 0, so no start code appears inside.
        std::iter::once(0x65)
            .chain((1..len).map(|_| rng.u8(1..)))
            .collect()
    }

    #[test]
    fn large_nal_becomes_fu_a_and_reassembles() {
        let sps = [0x67, 0x42, 0xc0, 0x1e, 0xda, 0x05];
        let pps = [0x68, 0xce, 0x3c, 0x80];
        let idr = big_idr(5_000);
        let au = annexb(&[&[0x09, 0xf0], &sps, &pps, &idr]);
        let payloads = packetize_h264(&au, MAX_RTP_PAYLOAD);
        // SPS, PPS alone; 4999 bytes of IDR body in 1198-byte fragments: 5 of them; no AUD.
        assert_eq!(payloads.len(), 7);
        assert!(payloads.iter().all(|p| p.len() <= MAX_RTP_PAYLOAD));
        assert_eq!(payloads[0], sps);
        assert_eq!(payloads[1], pps);
        for (i, p) in payloads[2..].iter().enumerate() {
            assert_eq!(p[0], 0x60 | FU_A, "indicator keeps NRI of the IDR");
            let expected = match i {
                0 => 0x80 | 5,
                4 => 0x40 | 5,
                _ => 5,
            };
            assert_eq!(p[1], expected, "FU header {i}");
        }
        assert_eq!(
            depacketize_h264(&payloads),
            vec![sps.to_vec(), pps.to_vec(), idr]
        );
    }

    #[test]
    fn testclip_round_trips_through_packetization() {
        for au in crate::media::h264::access_units(crate::media::TESTCLIP) {
            let payloads = packetize_h264(&au.data, MAX_RTP_PAYLOAD);
            let nals: Vec<Vec<u8>> = au.nalus().map(<[u8]>::to_vec).collect();
            assert_eq!(depacketize_h264(&payloads), nals);
        }
    }

    #[test]
    fn vp8_descriptor_marks_the_first_packet() {
        let frame: Vec<u8> = (0..3_000u32).map(|i| i as u8).collect();
        let payloads = packetize_vp8(&frame, MAX_RTP_PAYLOAD);
        assert_eq!(payloads.len(), 3);
        assert_eq!(
            payloads.iter().map(|p| p[0]).collect::<Vec<_>>(),
            [0x10, 0, 0]
        );
        let joined: Vec<u8> = payloads
            .iter()
            .flat_map(|p| p[1..].iter().copied())
            .collect();
        assert_eq!(joined, frame);
        assert!(packetize_vp8(&[], MAX_RTP_PAYLOAD).is_empty());
    }

    /// Two sockets on 127.0.0.1 at an even port P and at P + 2.
    fn port_pair() -> (UdpSocket, UdpSocket) {
        for _ in 0..200 {
            let p = 2 * fastrand::u16(10_000..32_000);
            let Ok(a) = UdpSocket::bind(("127.0.0.1", p)) else {
                continue;
            };
            let Ok(b) = UdpSocket::bind(("127.0.0.1", p + 2)) else {
                continue;
            };
            return (a, b);
        }
        panic!("no free UDP port pair on 127.0.0.1");
    }

    struct Packet {
        marker: bool,
        pt: u8,
        seq: u16,
        ts: u32,
        ssrc: u32,
        payload: Vec<u8>,
    }

    fn recv_all(sock: &UdpSocket) -> Vec<Packet> {
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 2_000];
        while let Ok(n) = sock.recv(&mut buf) {
            let b = &buf[..n];
            assert_eq!(b[0], 0x80, "RTP version 2, no padding/extension/CSRC");
            out.push(Packet {
                marker: b[1] & 0x80 != 0,
                pt: b[1] & 0x7f,
                seq: u16::from_be_bytes([b[2], b[3]]),
                ts: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
                ssrc: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
                payload: b[12..].to_vec(),
            });
        }
        out
    }

    #[test]
    fn forwarder_sends_rtp_to_port_and_port_plus_two() {
        let (video_rx, audio_rx) = port_pair();
        let dest = video_rx.local_addr().unwrap();
        let mut fwd = RtpForwarder::new(dest).unwrap();
        // Start just below 2^32 so the RTP timestamp wraps during the test.
        let base = (1u64 << 32) - 20_000;
        let video: Vec<MediaFrame> = h264_clip(base).into_iter().take(15).collect();
        let audio = pcmu(base, 50);
        for f in interleave(vec![video.clone(), audio.clone()]) {
            fwd.forward(&f).unwrap();
        }
        assert_eq!(fwd.codecs(), (Some(Codec::H264), Some(Codec::Pcmu)));

        let vp = recv_all(&video_rx);
        let ssrc = vp[0].ssrc;
        assert!(vp.iter().all(|p| p.pt == PT_H264 && p.ssrc == ssrc));
        for w in vp.windows(2) {
            assert_eq!(w[1].seq, w[0].seq.wrapping_add(1));
        }
        // One marker per access unit, on its last packet, and the NALs survive.
        let mut at = 0;
        for f in &video {
            let end = at + vp[at..].iter().position(|p| p.marker).unwrap() + 1;
            assert!(vp[at..end].iter().all(|p| p.ts == f.rtp_time as u32));
            let payloads: Vec<Vec<u8>> = vp[at..end].iter().map(|p| p.payload.clone()).collect();
            let nals: Vec<Vec<u8>> = split_nalus(&f.data).map(<[u8]>::to_vec).collect();
            assert_eq!(depacketize_h264(&payloads), nals);
            at = end;
        }
        assert_eq!(at, vp.len());
        assert!(vp.iter().any(|p| p.ts < 20_000), "timestamps wrapped");

        let ap = recv_all(&audio_rx);
        assert_eq!(ap.len(), 50);
        assert!(ap
            .iter()
            .all(|p| p.pt == PT_PCMU && !p.marker && p.payload.len() == 160));
        assert_ne!(ap[0].ssrc, ssrc);
        for (p, f) in ap.iter().zip(&audio) {
            assert_eq!(p.ts, f.rtp_time as u32);
            assert_eq!(p.payload, *f.data);
        }
        assert_eq!(fwd.packet_counts(), ((vp.len() + ap.len()) as u64, 0));
    }

    #[test]
    fn sdp_describes_what_was_seen() {
        let (video_rx, _audio_rx) = port_pair();
        let port = video_rx.local_addr().unwrap().port();
        let mut fwd = RtpForwarder::new(video_rx.local_addr().unwrap()).unwrap();
        assert!(!fwd.sdp().contains("m="));
        let v0 = fwd.sdp_version();
        fwd.forward(&h264_clip(0)[0]).unwrap();
        let sdp = fwd.sdp();
        assert!(fwd.sdp_version() > v0);
        assert!(sdp.contains("c=IN IP4 127.0.0.1\r\n"));
        assert!(sdp.contains(&format!("m=video {port} RTP/AVP 96\r\n")));
        assert!(sdp.contains("a=rtpmap:96 H264/90000\r\n"));
        assert!(sdp.contains(
            "a=fmtp:96 packetization-mode=1;profile-level-id=42c01e;sprop-parameter-sets="
        ));
        let sprop = sdp.split("sprop-parameter-sets=").nth(1).unwrap();
        let sprop: Vec<Vec<u8>> = sprop
            .lines()
            .next()
            .unwrap()
            .split(',')
            .map(|b| BASE64_STANDARD.decode(b).unwrap())
            .collect();
        let first = &h264_clip(0)[0].data;
        let param_sets: Vec<Vec<u8>> = split_nalus(first)
            .filter(|n| matches!(nal_unit_type(n), Some(7 | 8)))
            .map(<[u8]>::to_vec)
            .collect();
        assert_eq!(
            sprop, param_sets,
            "sprop-parameter-sets carries the SPS and PPS"
        );
        assert!(!sdp.contains("m=audio"));
        let v1 = fwd.sdp_version();
        fwd.forward(&h264_clip(0)[1]).unwrap();
        assert_eq!(fwd.sdp_version(), v1, "same parameter sets, same SDP");

        fwd.forward(&opus_silence(0, 1)[0]).unwrap();
        assert!(fwd.sdp().contains(&format!(
            "m=audio {} RTP/AVP 111\r\na=rtpmap:111 opus/48000/2\r\n",
            port + 2
        )));
        fwd.forward(&vp8_clip(0)[0]).unwrap();
        assert!(fwd.sdp().contains("m=video"));
        assert!(fwd.sdp().contains("a=rtpmap:97 VP8/90000\r\n"));
        assert_eq!(fwd.codecs(), (Some(Codec::Vp8), Some(Codec::Opus)));
    }

    #[test]
    fn bad_frames_and_ports_are_errors_not_panics() {
        assert!(RtpForwarder::new("127.0.0.1:0".parse().unwrap()).is_err());
        assert!(RtpForwarder::new("127.0.0.1:65534".parse().unwrap()).is_err());
        let (video_rx, _audio_rx) = port_pair();
        let mut fwd = RtpForwarder::new(video_rx.local_addr().unwrap()).unwrap();
        let bad = [
            frame(MediaKind::Video, Codec::H264, 0, 90_000, &[1, 2, 3]),
            frame(MediaKind::Video, Codec::Vp8, 0, 90_000, &[]),
            frame(MediaKind::Audio, Codec::Pcmu, 0, 8_000, &[]),
            frame(MediaKind::Audio, Codec::Vp8, 0, 8_000, &[1]),
            frame(MediaKind::Video, Codec::Other, 0, 90_000, &[1]),
        ];
        for f in &bad {
            assert!(fwd.forward(f).is_err(), "{f:?}");
        }
        assert_eq!(fwd.codecs(), (None, None));
        assert_eq!(fwd.packet_counts(), (0, 0));
    }

    /// ffmpeg, started on the SDP, receives the forwarded clip and remuxes 2 s of it.
    #[test]
    fn ffmpeg_receives_forwarded_media() {
        let found = Command::new("ffmpeg")
            .arg("-version")
            .stdout(Stdio::null())
            .status();
        assert!(
            found.is_ok(),
            "ffmpeg is needed for this test (apt install ffmpeg): {found:?}"
        );
        let dir = temp_dir("rtp");
        let (video_rx, audio_rx) = port_pair();
        let dest = video_rx.local_addr().unwrap();
        drop((video_rx, audio_rx));
        let mut fwd = RtpForwarder::new(dest).unwrap();
        // The first frames of each kind teach the forwarder the codecs and SPS/PPS, as in a
        // call, before any player listens.
        let clip = h264_clip(0);
        let tone = pcmu(0, 1);
        fwd.forward(&clip[0]).unwrap();
        fwd.forward(&tone[0]).unwrap();
        let sdp = dir.join("call.sdp");
        fwd.write_sdp(&sdp).unwrap();
        let out = dir.join("out.mkv");
        let mut child = Command::new("ffmpeg")
            .args([
                "-nostdin",
                "-hide_banner",
                "-loglevel",
                "error",
                "-protocol_whitelist",
                "file,udp,rtp",
                "-i",
            ])
            .arg(&sdp)
            .args(["-t", "2", "-c", "copy", "-y"])
            .arg(&out)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        // ffmpeg is listening once it holds both ports.
        let bound = |port: u16| UdpSocket::bind(("127.0.0.1", port)).is_err();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(bound(dest.port()) && bound(dest.port() + 2)) {
            assert!(
                Instant::now() < deadline,
                "ffmpeg did not bind the RTP ports"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Real-time pace, looping the clip, until ffmpeg has its 2 s (at most 15 s).
        let start = Instant::now();
        let mut tone_gen = crate::media::g711::ToneGenerator::new(440);
        let mut next_video = 0u64;
        let mut next_audio = 0u64;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            let elapsed = start.elapsed();
            if elapsed > Duration::from_secs(15) {
                child.kill().unwrap();
                panic!("ffmpeg did not finish: {:?}", child.wait());
            }
            let video_due = Duration::from_millis(next_video * 1000 / 15);
            let audio_due = Duration::from_millis(next_audio * 20);
            if video_due <= elapsed {
                let mut f = clip[(next_video % 60) as usize].clone();
                f.rtp_time = 6_000 * (next_video + 1);
                fwd.forward(&f).unwrap();
                next_video += 1;
            } else if audio_due <= elapsed {
                let f = frame(
                    MediaKind::Audio,
                    Codec::Pcmu,
                    160 * (next_audio + 1),
                    8_000,
                    &tone_gen.next_frame(),
                );
                fwd.forward(&f).unwrap();
                next_audio += 1;
            } else {
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        assert!(status.success(), "ffmpeg failed: {status}");
        eprintln!(
            "sent {next_video} video and {next_audio} audio frames in {:?}",
            start.elapsed()
        );
        let probe = ffprobe(&out);
        let v = stream(&probe, "video").expect("video stream");
        assert_eq!(v["codec_name"], "h264");
        assert_eq!(
            (v["width"].as_u64(), v["height"].as_u64()),
            (Some(320), Some(240))
        );
        assert!(num(&v["nb_read_frames"]) >= 20.0, "about 2 s of 15 fps");
        assert_eq!(
            stream(&probe, "audio").expect("audio stream")["codec_name"],
            "pcm_mulaw"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
