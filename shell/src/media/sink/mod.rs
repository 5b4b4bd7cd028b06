//! Sinks for the remote side's media of a call: a Matroska [`Recorder`] (`--record DIR`) and
//! an [`RtpForwarder`] that re-sends the media as plain RTP to a local player
//! (`--forward-rtp HOST:PORT`).
//!
//! Both take the core's [`call_assist_core::MediaFrame`] as it comes out of the agent and do
//! their own, blocking-free I/O: a recording is appended with plain `write` calls (no
//! user-space buffer, so a killed process leaves every finished block on disk), and the
//! forwarder uses a non-blocking UDP socket that drops packets rather than stall the pump.
//! Bad frames are skipped with an error, never a panic; each kind of trouble is logged once
//! per call.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod codec_private;
pub mod ebml;
pub mod recorder;
pub mod rtp;

pub use recorder::{Recorder, RecordingSummary};
pub use rtp::RtpForwarder;

/// Longest call-id part of a file name, so names stay well below file-system limits.
const MAX_NAME_CHARS: usize = 64;

/// The call id reduced to `[A-Za-z0-9._-]` (other characters become `_`), at most 64
/// characters, never empty and never starting with `.` (no hidden files, no `..`).
pub fn sanitise_call_id(call_id: &str) -> String {
    let mut out: String = call_id
        .chars()
        .take(MAX_NAME_CHARS)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with('.') {
        out.replace_range(..1, "_");
    }
    if out.is_empty() {
        out.push_str("call");
    }
    out
}

/// `yyyymmddThhmmssZ` (UTC) of a Unix time in milliseconds, for file names that sort by time.
pub fn utc_stamp(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Bit set of the distinct troubles already logged, so a stream of bad frames logs once.
#[derive(Debug, Default, Clone, Copy)]
struct WarnOnce(u32);

impl WarnOnce {
    /// True the first time `bit` is seen.
    fn first(&mut self, bit: u32) -> bool {
        let mask = 1u32 << (bit % 32);
        let first = self.0 & mask == 0;
        self.0 |= mask;
        first
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Media fixtures and an ffprobe wrapper shared by the sink tests.

    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::Arc;

    use call_assist_core::{Codec, MediaFrame, MediaKind};

    use crate::media::g711::ToneGenerator;
    use crate::media::h264::access_units;

    /// A fresh, empty directory under the system temp dir.
    pub fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "call-assist-sink-{}-{name}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    pub fn frame(
        kind: MediaKind,
        codec: Codec,
        rtp_time: u64,
        clock_rate: u32,
        data: &[u8],
    ) -> MediaFrame {
        MediaFrame {
            call_id: "test-call".into(),
            kind,
            codec,
            rtp_time,
            clock_rate,
            contiguous: true,
            data: Arc::from(data),
        }
    }

    /// The H.264 test clip (60 frames, 15 fps) from rtp time `base`.
    pub fn h264_clip(base: u64) -> Vec<MediaFrame> {
        access_units(crate::media::TESTCLIP)
            .iter()
            .enumerate()
            .map(|(i, au)| {
                frame(
                    MediaKind::Video,
                    Codec::H264,
                    base + 6_000 * i as u64,
                    90_000,
                    &au.data,
                )
            })
            .collect()
    }

    /// The VP8 test clip (60 frames, 15 fps) from rtp time `base`.
    pub fn vp8_clip(base: u64) -> Vec<MediaFrame> {
        let (_, frames) = crate::media::ivf::frames(crate::media::TESTCLIP_VP8).unwrap();
        frames
            .iter()
            .enumerate()
            .map(|(i, f)| {
                frame(
                    MediaKind::Video,
                    Codec::Vp8,
                    base + 6_000 * i as u64,
                    90_000,
                    &f.data,
                )
            })
            .collect()
    }

    /// `n` 20 ms PCMU frames of a 440 Hz tone from rtp time `base`.
    pub fn pcmu(base: u64, n: usize) -> Vec<MediaFrame> {
        let mut tone = ToneGenerator::new(440);
        (0..n)
            .map(|i| {
                frame(
                    MediaKind::Audio,
                    Codec::Pcmu,
                    base + 160 * i as u64,
                    8_000,
                    &tone.next_frame(),
                )
            })
            .collect()
    }

    /// `n` 20 ms Opus silence frames (TOC 0xF8: CELT fullband 20 ms; the 3-byte frame WebRTC
    /// stacks send for silence) from rtp time `base`.
    pub fn opus_silence(base: u64, n: usize) -> Vec<MediaFrame> {
        (0..n)
            .map(|i| {
                frame(
                    MediaKind::Audio,
                    Codec::Opus,
                    base + 960 * i as u64,
                    48_000,
                    &[0xf8, 0xff, 0xfe],
                )
            })
            .collect()
    }

    /// Merges streams in presentation order (time since each stream's first frame), the way
    /// they arrive from the network.
    pub fn interleave(streams: Vec<Vec<MediaFrame>>) -> Vec<MediaFrame> {
        let mut all: Vec<(f64, usize, MediaFrame)> = Vec::new();
        for (s, frames) in streams.into_iter().enumerate() {
            let Some(base) = frames.first().map(|f| f.rtp_time) else {
                continue;
            };
            for f in frames {
                let t = (f.rtp_time - base) as f64 / f64::from(f.clock_rate);
                all.push((t, s, f));
            }
        }
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        all.into_iter().map(|(_, _, f)| f).collect()
    }

    /// `ffprobe -count_frames -show_streams -show_format` as JSON. Without ffprobe the test
    /// fails: it is the oracle (`.ci/run` installs ffmpeg).
    pub fn ffprobe(path: &Path) -> serde_json::Value {
        let out = match Command::new("ffprobe")
            .args([
                "-v",
                "error",
                "-count_frames",
                "-show_streams",
                "-show_format",
                "-of",
                "json",
            ])
            .arg(path)
            .output()
        {
            Ok(out) => out,
            Err(e) => panic!("ffprobe is needed for this test (apt install ffmpeg): {e}"),
        };
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        eprintln!(
            "ffprobe {}: status {}, stderr {:?}\n{}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            summarize(&json)
        );
        json
    }

    /// One line per stream with what the tests look at.
    pub fn summarize(json: &serde_json::Value) -> String {
        let mut s = String::new();
        for st in json["streams"].as_array().into_iter().flatten() {
            s.push_str(&format!(
                "  stream {} {} {}x{} sample_rate={} nb_read_frames={} duration={}\n",
                st["codec_type"],
                st["codec_name"],
                st["width"],
                st["height"],
                st["sample_rate"],
                st["nb_read_frames"],
                st["duration"]
            ));
        }
        s.push_str(&format!("  format duration={}", json["format"]["duration"]));
        s
    }

    /// The first stream of `codec_type`.
    pub fn stream<'a>(
        json: &'a serde_json::Value,
        codec_type: &str,
    ) -> Option<&'a serde_json::Value> {
        json["streams"]
            .as_array()?
            .iter()
            .find(|s| s["codec_type"] == codec_type)
    }

    /// A numeric field that ffprobe prints as a string ("60", "4.000000").
    pub fn num(v: &serde_json::Value) -> f64 {
        v.as_str()
            .and_then(|s| s.parse().ok())
            .or_else(|| v.as_f64())
            .unwrap_or(f64::NAN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_ids_become_safe_file_names() {
        assert_eq!(
            sanitise_call_id("1700000000abc-DEF_1.2"),
            "1700000000abc-DEF_1.2"
        );
        assert_eq!(sanitise_call_id("../../etc/passwd"), "_._.._etc_passwd");
        assert_eq!(sanitise_call_id("a b/c\\d:é"), "a_b_c_d__");
        assert_eq!(sanitise_call_id(""), "call");
        assert_eq!(sanitise_call_id(&"x".repeat(500)).len(), 64);
    }

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(1_700_000_000_123), "20231114T221320Z");
        assert_eq!(utc_stamp(951_825_600_000), "20000229T120000Z");
        assert!(utc_stamp(u64::MAX).ends_with('Z'));
    }
}
