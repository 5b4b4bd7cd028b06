//! Ogg Opus files (RFC 7845) as an audio source: the Opus packets of the first logical stream,
//! each with its duration read from its TOC byte (RFC 6716 §3.1), so a file plays at its real
//! rate whatever frame size the encoder chose. Panic-free on any input.

use std::io::Cursor;
use std::time::Duration;

use ogg::reading::PacketReader;

/// RTP clock of Opus (always 48 kHz, RFC 7587).
pub const OPUS_CLOCK_RATE: u64 = 48_000;

/// One Opus packet and how long it plays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpusPacket {
    pub data: Vec<u8>,
    /// Samples at 48 kHz.
    pub samples: u32,
}

/// Why an Ogg Opus file was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OggError {
    NotOgg,
    NotOpus,
    NoAudioPackets,
}

impl std::fmt::Display for OggError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OggError::NotOgg => "not an Ogg file (no OggS page)",
            OggError::NotOpus => "Ogg file whose first stream is not Opus (no OpusHead)",
            OggError::NoAudioPackets => "Ogg Opus file without audio packets",
        })
    }
}

impl std::error::Error for OggError {}

/// The packets of the first logical stream, in order. A truncated page, or one whose CRC does
/// not match, ends the list. `data` is the whole file, so memory stays within its size.
fn packets(data: &[u8]) -> Vec<Vec<u8>> {
    let mut reader = PacketReader::new(Cursor::new(data));
    let mut out = Vec::new();
    let mut first_serial = None;
    while let Ok(Some(packet)) = reader.read_packet() {
        let serial = packet.stream_serial();
        if *first_serial.get_or_insert(serial) == serial {
            out.push(packet.data);
        }
    }
    out
}

/// Samples (48 kHz) of one Opus packet from its TOC byte; `None` for an empty or
/// malformed packet.
pub fn packet_samples(packet: &[u8]) -> Option<u32> {
    let toc = *packet.first()?;
    let config = toc >> 3;
    // Frame size per config (RFC 6716 Table 2), in 48 kHz samples.
    let frame: u32 = match (config, config % 4) {
        (0..=11, 0) => 480,
        (0..=11, 1) => 960,
        (0..=11, 2) => 1920,
        (0..=11, _) => 2880,
        (12..=15, m) if m % 2 == 0 => 480,
        (12..=15, _) => 960,
        (_, 0) => 120,
        (_, 1) => 240,
        (_, 2) => 480,
        (_, _) => 960,
    };
    let frames = match toc & 3 {
        0 => 1,
        1 | 2 => 2,
        _ => u32::from(*packet.get(1)? & 0x3f),
    };
    let total = frame * frames;
    // RFC 6716 §3.2.5: at most 120 ms per packet.
    (frames > 0 && total <= 5760).then_some(total)
}

/// Parses an Ogg Opus file into its audio packets.
///
/// # Errors
/// [`OggError`] when it is not Ogg, not Opus, or has no audio.
pub fn opus_packets(data: &[u8]) -> Result<Vec<OpusPacket>, OggError> {
    let all = packets(data);
    let head = all.first().ok_or(OggError::NotOgg)?;
    if !head.starts_with(b"OpusHead") {
        return Err(OggError::NotOpus);
    }
    // Packet 2 is OpusTags; audio follows.
    let out: Vec<OpusPacket> = all
        .into_iter()
        .skip(2)
        .filter_map(|data| {
            let samples = packet_samples(&data)?;
            Some(OpusPacket { data, samples })
        })
        .collect();
    if out.is_empty() {
        return Err(OggError::NoAudioPackets);
    }
    Ok(out)
}

/// An Ogg Opus file looped forever with a 48 kHz timestamp that keeps increasing.
#[derive(Debug, Clone)]
pub struct LoopingOpus {
    packets: Vec<OpusPacket>,
    pos: usize,
    rtp_time: u64,
}

impl LoopingOpus {
    /// # Errors
    /// As [`opus_packets`].
    pub fn new(data: &[u8]) -> Result<Self, OggError> {
        Ok(LoopingOpus {
            packets: opus_packets(data)?,
            pos: 0,
            rtp_time: 0,
        })
    }

    /// The next packet, its 48 kHz timestamp and how long until the one after it.
    pub fn next_packet(&mut self) -> (&[u8], u64, Duration) {
        if self.pos >= self.packets.len() {
            self.pos = 0;
        }
        let t = self.rtp_time;
        let Some(p) = self.packets.get(self.pos) else {
            return (&[], t, Duration::from_millis(20));
        };
        self.pos += 1;
        self.rtp_time = t.saturating_add(u64::from(p.samples));
        let d = Duration::from_micros(u64::from(p.samples) * 1_000_000 / OPUS_CLOCK_RATE);
        (&p.data, t, d)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ogg::writing::{PacketWriteEndInfo, PacketWriter};

    /// An Ogg file of `pages`, each a (stream serial, packets) page, as the ogg crate writes it.
    fn ogg_file(pages: &[(u32, &[&[u8]])]) -> Vec<u8> {
        let mut w = PacketWriter::new(Vec::new());
        for (serial, packets) in pages {
            for (i, p) in packets.iter().enumerate() {
                let end = if i + 1 == packets.len() {
                    PacketWriteEndInfo::EndPage
                } else {
                    PacketWriteEndInfo::NormalPacket
                };
                w.write_packet(p.to_vec(), *serial, end, 0).unwrap();
            }
        }
        w.into_inner()
    }

    /// A small Ogg Opus file: head, tags, then `n` 20 ms packets (config 9: SILK WB 20 ms).
    pub fn sample_file(n: usize) -> Vec<u8> {
        let audio: Vec<Vec<u8>> = (0..n).map(|i| vec![9 << 3, i as u8, 0xaa]).collect();
        let mut pages: Vec<(u32, &[&[u8]])> = vec![
            (1, &[b"OpusHead\x01\x01\x38\x01\x80\xbb\0\0\0\0\0"]),
            (1, &[b"OpusTags\0\0\0\0\0\0\0\0"]),
        ];
        let refs: Vec<&[u8]> = audio.iter().map(|v| v.as_slice()).collect();
        if !refs.is_empty() {
            pages.push((1, &refs));
        }
        ogg_file(&pages)
    }

    #[test]
    fn reads_packets_and_loops() {
        let mut l = LoopingOpus::new(&sample_file(3)).unwrap();
        let (p, t, d) = l.next_packet();
        assert_eq!(
            (p.to_vec(), t, d),
            (vec![72, 0, 0xaa], 0, Duration::from_millis(20))
        );
        l.next_packet();
        l.next_packet();
        let (p, t, _) = l.next_packet();
        assert_eq!((p[1], t), (0, 3 * 960));
    }

    #[test]
    fn long_packets_span_segments() {
        let big = vec![1u8 << 3; 600];
        let f = ogg_file(&[
            (7, &[b"OpusHead\x01\x01"]),
            (7, &[b"OpusTags"]),
            (8, &[b"other stream"]),
            (7, &[&big]),
        ]);
        let p = opus_packets(&f).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].data.len(), 600);
        assert_eq!(p[0].samples, 960);
    }

    /// A file from another muxer: one second of a tone encoded by ffmpeg (libopus, 20 ms
    /// frames) reads as its packets, about 48 000 samples. Fails without ffmpeg (CI installs it).
    #[test]
    fn ffmpeg_ogg_opus_file_lasts_one_second() {
        let path = std::env::temp_dir().join(format!("call-assist-ogg-{}.ogg", std::process::id()));
        let status = std::process::Command::new("ffmpeg")
            .args([
                "-v",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
                "sine=frequency=440:duration=1",
            ])
            .args(["-c:a", "libopus", "-b:a", "32k"])
            .arg(&path)
            .status();
        match status {
            Ok(s) if s.success() => {}
            other => panic!("ffmpeg with libopus is needed for this test: {other:?}"),
        }
        let data = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let packets = opus_packets(&data).unwrap();
        let samples: u32 = packets.iter().map(|p| p.samples).sum();
        // The encoder's pre-skip (312 samples) rounds up to one more 20 ms frame.
        assert!(
            (48_000..=48_000 + 2 * 960).contains(&samples),
            "{} packets, {samples} samples",
            packets.len()
        );
    }

    #[test]
    fn toc_durations() {
        assert_eq!(packet_samples(&[0 << 3]), Some(480)); // SILK NB 10 ms
        assert_eq!(packet_samples(&[(3 << 3) | 1]), Some(5760)); // SILK NB 60 ms x 2 = 120 ms, the most allowed
        assert_eq!(packet_samples(&[(31 << 3) | 3, 0x05]), Some(4800)); // CELT 20 ms x 5
        assert_eq!(packet_samples(&[(31 << 3) | 3, 0x07]), None); // 140 ms: invalid
        assert_eq!(packet_samples(&[(16 << 3) | 3]), None); // code 3 without count byte
        assert_eq!(packet_samples(&[]), None);
    }

    #[test]
    fn bad_files_are_errors() {
        assert_eq!(opus_packets(b"").unwrap_err(), OggError::NotOgg);
        assert_eq!(opus_packets(b"RIFF....").unwrap_err(), OggError::NotOgg);
        assert_eq!(
            opus_packets(&ogg_file(&[(1, &[b"\x01vorbis"])])).unwrap_err(),
            OggError::NotOpus
        );
        assert_eq!(
            opus_packets(&sample_file(0)).unwrap_err(),
            OggError::NoAudioPackets
        );
        let mut corrupt = sample_file(3);
        *corrupt.last_mut().unwrap() ^= 1;
        assert_eq!(
            opus_packets(&corrupt).unwrap_err(),
            OggError::NoAudioPackets,
            "a page whose CRC does not match is not read"
        );
        let mut rng = fastrand::Rng::with_seed(3);
        let f = sample_file(20);
        for _ in 0..300 {
            let mut g = f.clone();
            for _ in 0..rng.usize(1..6) {
                let i = rng.usize(..g.len());
                g[i] = rng.u8(..);
            }
            g.truncate(rng.usize(..=g.len()));
            let _ = opus_packets(&g);
        }
    }
}
