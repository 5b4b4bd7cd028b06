//! `--record DIR`: one streaming Matroska file per call with the remote video and audio.
//!
//! # Layout and why
//!
//! `EBML header | Segment (unknown size) { Info | Tracks | Cluster* }`. The Segment and each
//! Cluster start with the EBML "unknown size"; a Cluster's size is patched in when the next
//! one starts and the Segment's size and the Duration when [`Recorder::finish`] runs. Every
//! block is handed to the OS as soon as it is muxed (no user-space buffer), so a process
//! that is killed leaves a file ffprobe/ffmpeg read up to the last block; dropping a
//! `Recorder` without `finish` is exactly such a file.
//!
//! # When the tracks are declared
//!
//! Matroska wants all tracks in `Tracks` before the first Cluster, but a call's kinds show up
//! in any order, and an H.264 track needs its avcC (from the first SPS/PPS) first. So blocks
//! are held back (at most [`MAX_PENDING_FRAMES`] / [`MAX_PENDING_BYTES`]) until:
//!
//! 1. both kinds are ready (audio: its first frame; video: the first keyframe, with SPS and
//!    PPS for H.264), or
//! 2. one kind is ready and the other has not appeared in [`WAIT_FOR_OTHER_KIND_MS`] of media
//!    (an audio-only or video-only call), or
//! 3. one kind is ready and the other has appeared but is still not ready after
//!    [`WAIT_FOR_KEYFRAME_MS`] (video whose keyframes never arrive), or
//!
//!    (for 2 and 3 the wait must also have passed in arrival time: a sender that starts with
//!    a burst of older frames, such as a camera's cached GOP, spans seconds of media in a
//!    moment, before the other kind's first packet could arrive), or
//! 4. the hold-back buffer is full, or `finish` is called.
//!
//! A kind that is not declared then is not recorded (logged once). Video frames before the
//! first usable keyframe, and after a loss (`contiguous == false`) until the next keyframe,
//! are skipped, so the file never holds frames a decoder cannot decode.
//!
//! # Timestamps
//!
//! Millisecond timestamps come from `rtp_time` relative to each track's first frame. The
//! second track to start is placed at the first track's latest time (the two RTP clocks are
//! unrelated without RTCP, so arrival order is the best sync there is). Time going backwards
//! is clamped; a jump of more than [`MAX_RTP_JUMP_MS`] either way is taken as a sender restart
//! and the track's timeline continues from where it was.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use call_assist_core::h264::{nal_type, split_nalus};
use call_assist_core::{Codec, MediaFrame, MediaKind};

use super::codec_private::{self, Dimensions};
use super::ebml::{self, id};
use super::{sanitise_call_id, utc_stamp, WarnOnce};

/// Media time to wait for a kind that has not appeared at all once the other is ready.
pub const WAIT_FOR_OTHER_KIND_MS: u64 = 2_000;
/// Media time to wait for a usable first keyframe of a video stream that is arriving.
pub const WAIT_FOR_KEYFRAME_MS: u64 = 6_000;
/// Blocks held back before the tracks are declared; when full, the tracks are declared.
pub const MAX_PENDING_FRAMES: usize = 512;
/// Bytes held back before the tracks are declared; when full, the tracks are declared.
pub const MAX_PENDING_BYTES: usize = 8 << 20;
/// A frame larger than this is treated as garbage (a 4K keyframe is well below).
pub const MAX_FRAME_BYTES: usize = 4 << 20;
/// A new Cluster starts at each video keyframe and at least this often (bounds how much a
/// Cluster size patch covers; also keeps relative block times far inside i16).
pub const MAX_CLUSTER_MS: u64 = 2_000;
/// A larger RTP time step is a sender restart, not elapsed time.
pub const MAX_RTP_JUMP_MS: u64 = 60_000;
/// Largest SPS/PPS kept for the avcC.
const MAX_PARAM_SET_BYTES: usize = 1_024;
/// Bytes reserved in Info for the Duration element (ID 2 + size 1 + float 8).
const DURATION_ELEMENT_BYTES: usize = 11;
/// 2001-01-01T00:00:00Z, the epoch of Matroska's DateUTC, in Unix milliseconds.
const MATROSKA_EPOCH_UNIX_MS: i64 = 978_307_200_000;
/// Other files with the same name tried before giving up.
const MAX_NAME_COLLISIONS: u32 = 100;

/// What a finished recording holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordingSummary {
    /// The `.mkv` file; `None` when nothing recordable arrived and the empty file was removed.
    pub path: Option<PathBuf>,
    /// Codec of the recorded video track, if one was declared.
    pub video_codec: Option<Codec>,
    /// Codec of the recorded audio track, if one was declared.
    pub audio_codec: Option<Codec>,
    /// Video frames written (blocks in the file).
    pub video_frames: u64,
    /// Audio frames written (blocks in the file).
    pub audio_frames: u64,
    /// Frames not written: before the first keyframe, after a loss, of an undeclared kind, or bad.
    pub skipped_frames: u64,
    /// Media duration in milliseconds.
    pub duration_ms: u64,
}

/// A streaming Matroska writer for one call; see the module docs for the rules.
#[derive(Debug)]
pub struct Recorder {
    file: File,
    path: PathBuf,
    call_id: String,
    /// Bytes written so far = offset of the end of the file.
    pos: u64,
    segment_size_at: u64,
    segment_data_start: u64,
    duration_at: u64,
    phase: Phase,
    video: Track,
    audio: Track,
    pending: VecDeque<Block>,
    pending_bytes: usize,
    /// Arrival of the first frame, and how long ago that was at the latest one.
    first_arrival: Option<Instant>,
    arrival_span: Duration,
    cluster: Option<Cluster>,
    sps: Option<Vec<u8>>,
    pps: Option<Vec<u8>>,
    skipped: u64,
    warned: WarnOnce,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Tracks not declared yet; blocks go to `pending`.
    Waiting,
    /// Tracks written; blocks go to the file.
    Declared,
    /// A write to the file failed; the file is left as it is.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Video,
    Audio,
}

/// What the Tracks element says about one track.
#[derive(Debug, Clone)]
struct TrackSetup {
    codec_id: &'static str,
    codec_private: Option<Vec<u8>>,
    video: Option<Dimensions>,
    /// Sampling frequency, channels, bit depth.
    audio: Option<(f64, u64, Option<u64>)>,
}

#[derive(Debug, Default)]
struct Track {
    /// Learnt from the first supported frame of this kind; a later change is skipped.
    codec: Option<Codec>,
    /// Some once a frame that can start the track has arrived.
    setup: Option<TrackSetup>,
    /// Matroska track number, once declared.
    number: Option<u64>,
    /// RTP times of the first and latest frame seen (ready or not), for the waiting rules.
    seen: Option<(u64, u64, u32)>,
    clock: Option<Clock>,
    /// Skip until a keyframe (after a loss).
    await_keyframe: bool,
    frames: u64,
}

/// Maps a track's RTP time to file milliseconds.
#[derive(Debug, Clone, Copy)]
struct Clock {
    clock_rate: u32,
    origin_rtp: u64,
    origin_ms: u64,
    last_rtp: u64,
    last_ms: u64,
    last_step_ms: u64,
}

#[derive(Debug)]
struct Block {
    kind: Kind,
    ms: u64,
    keyframe: bool,
    data: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
struct Cluster {
    start_ms: u64,
    blocks: u32,
    size_at: u64,
    data_start: u64,
}

/// Why a frame was not written; each is logged once per recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    Garbage(&'static str),
    TooLarge,
    UnsupportedCodec,
    KindMismatch,
    CodecChanged,
    LateTrack,
    ZeroClockRate,
}

impl Skip {
    fn bit(self) -> u32 {
        match self {
            Skip::Garbage(_) => 0,
            Skip::TooLarge => 1,
            Skip::UnsupportedCodec => 2,
            Skip::KindMismatch => 3,
            Skip::CodecChanged => 4,
            Skip::LateTrack => 5,
            Skip::ZeroClockRate => 6,
        }
    }

    fn message(self) -> &'static str {
        match self {
            Skip::Garbage(why) => why,
            Skip::TooLarge => "frame larger than MAX_FRAME_BYTES",
            Skip::UnsupportedCodec => "codec cannot be recorded",
            Skip::KindMismatch => "codec does not match the media kind",
            Skip::CodecChanged => "codec changed during the call; the track keeps its first codec",
            Skip::LateTrack => "media kind appeared after the tracks were declared",
            Skip::ZeroClockRate => "clock rate 0",
        }
    }

    fn into_io(self) -> io::Error {
        let kind = match self {
            Skip::UnsupportedCodec => io::ErrorKind::Unsupported,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self.message())
    }
}

/// Bits of `WarnOnce` past the `Skip` ones.
const WARN_TIME_BACKWARDS: u32 = 16;
const WARN_PRE_KEYFRAME: u32 = 17;
const WARN_RESTART: u32 = 18;

enum WriteError {
    Skip(Skip),
    Io(io::Error),
}

impl From<io::Error> for WriteError {
    fn from(e: io::Error) -> Self {
        WriteError::Io(e)
    }
}

impl Recorder {
    /// Creates `dir/<yyyymmddThhmmssZ>-<call id>.mkv` (a `-N` suffix if taken) and writes the
    /// EBML header and segment info, so an unwritable directory fails here, at call start.
    ///
    /// # Errors
    /// Creating or writing the file failed.
    pub fn create(dir: &Path, call_id: &str, started_unix_ms: u64) -> io::Result<Recorder> {
        let stem = format!(
            "{}-{}",
            utc_stamp(started_unix_ms),
            sanitise_call_id(call_id)
        );
        let mut attempt = 0;
        let (file, path) = loop {
            let name = if attempt == 0 {
                format!("{stem}.mkv")
            } else {
                format!("{stem}-{attempt}.mkv")
            };
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (f, path),
                Err(e)
                    if e.kind() == io::ErrorKind::AlreadyExists
                        && attempt < MAX_NAME_COLLISIONS =>
                {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        };

        let mut head = Vec::new();
        ebml::put_master(&mut head, id::EBML, |b| {
            ebml::put_uint(b, id::EBML_VERSION, 1);
            ebml::put_uint(b, id::EBML_READ_VERSION, 1);
            ebml::put_uint(b, id::EBML_MAX_ID_LENGTH, 4);
            ebml::put_uint(b, id::EBML_MAX_SIZE_LENGTH, 8);
            ebml::put_str(b, id::DOC_TYPE, "matroska");
            ebml::put_uint(b, id::DOC_TYPE_VERSION, 4);
            ebml::put_uint(b, id::DOC_TYPE_READ_VERSION, 2);
        });
        ebml::put_id(&mut head, id::SEGMENT);
        let segment_size_at = head.len() as u64;
        head.extend_from_slice(&ebml::UNKNOWN_SIZE);
        let segment_data_start = head.len() as u64;

        let mut info = Vec::new();
        ebml::put_uint(&mut info, id::TIMESTAMP_SCALE, 1_000_000);
        ebml::put_str(&mut info, id::MUXING_APP, "call-assist");
        ebml::put_str(
            &mut info,
            id::WRITING_APP,
            concat!("call-assist ", env!("CARGO_PKG_VERSION")),
        );
        let since_2001_ms = i64::try_from(started_unix_ms)
            .unwrap_or(i64::MAX)
            .saturating_sub(MATROSKA_EPOCH_UNIX_MS);
        ebml::put_int8(
            &mut info,
            id::DATE_UTC,
            since_2001_ms.saturating_mul(1_000_000),
        );
        let void_in_info = info.len();
        ebml::put_void(&mut info, DURATION_ELEMENT_BYTES);
        ebml::put_id(&mut head, id::INFO);
        ebml::put_size(&mut head, info.len() as u64);
        let duration_at = (head.len() + void_in_info) as u64;
        head.extend_from_slice(&info);

        let mut rec = Recorder {
            file,
            path,
            call_id: call_id.to_owned(),
            pos: 0,
            segment_size_at,
            segment_data_start,
            duration_at,
            phase: Phase::Waiting,
            video: Track::default(),
            audio: Track::default(),
            pending: VecDeque::new(),
            pending_bytes: 0,
            first_arrival: None,
            arrival_span: Duration::ZERO,
            cluster: None,
            sps: None,
            pps: None,
            skipped: 0,
            warned: WarnOnce::default(),
        };
        rec.append(&head)?;
        tracing::info!(call_id = %rec.call_id, path = %rec.path.display(), "recording call");
        Ok(rec)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds one frame.
    ///
    /// # Errors
    /// `InvalidData` / `Unsupported` for a frame that was skipped (garbage, unsupported or
    /// changed codec, a kind that came too late); the recording goes on, and the cause is
    /// logged once. Any other kind is an I/O error: the file is left as far as it got and
    /// every later call fails too.
    pub fn write(&mut self, f: &MediaFrame, now: Instant) -> io::Result<()> {
        let first = *self.first_arrival.get_or_insert(now);
        self.arrival_span = now.saturating_duration_since(first);
        if self.phase == Phase::Failed {
            return Err(io::Error::other(
                "recording stopped after an earlier write error",
            ));
        }
        match self.accept(f) {
            Ok(()) => Ok(()),
            Err(WriteError::Skip(skip)) => {
                self.skipped += 1;
                if self.warned.first(skip.bit()) {
                    tracing::warn!(call_id = %self.call_id, codec = ?f.codec, "recording skips frames: {}", skip.message());
                }
                Err(skip.into_io())
            }
            Err(WriteError::Io(e)) => {
                self.fail(&e);
                Err(e)
            }
        }
    }

    /// Declares whatever tracks are ready if that has not happened, closes the last Cluster
    /// and patches the Segment size and Duration. With nothing recordable the file is removed.
    ///
    /// # Errors
    /// Writing, seeking or removing the file failed, or an earlier write did.
    pub fn finish(mut self) -> io::Result<RecordingSummary> {
        if self.phase == Phase::Failed {
            return Err(io::Error::other(
                "recording stopped after an earlier write error",
            ));
        }
        if self.phase == Phase::Waiting {
            if self.video.setup.is_none() && self.audio.setup.is_none() {
                drop(self.file);
                std::fs::remove_file(&self.path)?;
                tracing::info!(call_id = %self.call_id, "nothing recordable arrived; recording removed");
                return Ok(RecordingSummary {
                    path: None,
                    video_codec: None,
                    audio_codec: None,
                    video_frames: 0,
                    audio_frames: 0,
                    skipped_frames: self.skipped,
                    duration_ms: 0,
                });
            }
            self.declare()?;
        }
        self.close_cluster()?;
        let duration_ms = [&self.video, &self.audio]
            .iter()
            .filter_map(|t| t.clock.map(|c| c.last_ms + c.last_step_ms))
            .max()
            .unwrap_or(0);
        let mut duration = Vec::new();
        ebml::put_float(&mut duration, id::DURATION, duration_ms as f64);
        self.patch(self.duration_at, &duration)?;
        let segment_size = self.pos.saturating_sub(self.segment_data_start);
        self.patch(self.segment_size_at, &ebml::size8(segment_size))?;
        self.file.sync_all()?;
        let summary = RecordingSummary {
            path: Some(self.path.clone()),
            video_codec: self.video.number.and(self.video.codec),
            audio_codec: self.audio.number.and(self.audio.codec),
            video_frames: self.video.frames,
            audio_frames: self.audio.frames,
            skipped_frames: self.skipped,
            duration_ms,
        };
        tracing::info!(call_id = %self.call_id, path = %self.path.display(), ?summary, "recording finished");
        Ok(summary)
    }

    fn fail(&mut self, e: &io::Error) {
        self.phase = Phase::Failed;
        tracing::warn!(call_id = %self.call_id, path = %self.path.display(), "recording stopped: {e}");
    }

    fn track(&mut self, kind: Kind) -> &mut Track {
        match kind {
            Kind::Video => &mut self.video,
            Kind::Audio => &mut self.audio,
        }
    }

    fn accept(&mut self, f: &MediaFrame) -> Result<(), WriteError> {
        let kind = match (f.kind, f.codec) {
            (_, Codec::Other) => return Err(WriteError::Skip(Skip::UnsupportedCodec)),
            (MediaKind::Video, Codec::H264 | Codec::Vp8) => Kind::Video,
            (MediaKind::Audio, Codec::Opus | Codec::Pcmu | Codec::Pcma) => Kind::Audio,
            _ => return Err(WriteError::Skip(Skip::KindMismatch)),
        };
        if f.data.is_empty() {
            return Err(WriteError::Skip(Skip::Garbage("empty frame")));
        }
        if f.data.len() > MAX_FRAME_BYTES {
            return Err(WriteError::Skip(Skip::TooLarge));
        }
        if f.clock_rate == 0 {
            return Err(WriteError::Skip(Skip::ZeroClockRate));
        }
        let declared = self.phase == Phase::Declared;
        let track = self.track(kind);
        if track.codec.is_some_and(|c| c != f.codec) {
            return Err(WriteError::Skip(Skip::CodecChanged));
        }
        if declared && track.number.is_none() {
            return Err(WriteError::Skip(Skip::LateTrack));
        }

        let (data, keyframe) = match f.codec {
            Codec::H264 => match self.h264_to_avc(&f.data)? {
                Some(converted) => converted,
                // Parameter sets only: kept for the avcC, nothing to write.
                None => return Ok(()),
            },
            Codec::Vp8 => {
                let keyframe = f.data.first().is_some_and(|b| b & 1 == 0);
                if keyframe && codec_private::vp8_keyframe_dimensions(&f.data).is_none() {
                    return Err(WriteError::Skip(Skip::Garbage(
                        "VP8 keyframe without a valid header",
                    )));
                }
                if f.data.len() < 3 {
                    return Err(WriteError::Skip(Skip::Garbage(
                        "VP8 frame shorter than its frame tag",
                    )));
                }
                (f.data.to_vec(), keyframe)
            }
            _ => (f.data.to_vec(), true),
        };

        let setup = match (kind, self.track(kind).setup.is_some()) {
            (_, true) => None,
            (Kind::Video, false) if !keyframe => None,
            (Kind::Video, false) => self.video_setup(f.codec, &f.data),
            (Kind::Audio, false) => Some(audio_setup(f.codec)),
        };
        let track = self.track(kind);
        track.codec = Some(f.codec);
        track.seen = Some(match track.seen {
            Some((first, _, rate)) => (first, f.rtp_time, rate),
            None => (f.rtp_time, f.rtp_time, f.clock_rate),
        });
        if let Some(setup) = setup {
            track.setup = Some(setup);
        }
        let ready = track.setup.is_some();
        // After a loss a video decoder needs a keyframe again; until then frames are noise.
        let awaiting = kind == Kind::Video && {
            if !f.contiguous && !keyframe {
                track.await_keyframe = true;
            }
            if keyframe {
                track.await_keyframe = false;
            }
            track.await_keyframe
        };
        if !ready {
            self.skipped += 1;
            if self.warned.first(WARN_PRE_KEYFRAME) {
                tracing::debug!(call_id = %self.call_id, "recording waits for the first video keyframe");
            }
            return self.maybe_declare();
        }
        if awaiting {
            self.skipped += 1;
            return Ok(());
        }

        let other_ms = match kind {
            Kind::Video => self.audio.clock.map(|c| c.last_ms),
            Kind::Audio => self.video.clock.map(|c| c.last_ms),
        };
        let stamp = self.track(kind).stamp(f.rtp_time, f.clock_rate, other_ms);
        match stamp {
            Stamp::Backwards if self.warned.first(WARN_TIME_BACKWARDS) => {
                tracing::warn!(call_id = %self.call_id, ?kind, "RTP time went backwards; clamped in the recording");
            }
            Stamp::Restart if self.warned.first(WARN_RESTART) => {
                tracing::warn!(call_id = %self.call_id, ?kind, "RTP time jumped; timeline continued");
            }
            _ => {}
        }
        let ms = self.track(kind).clock.map_or(0, |c| c.last_ms);
        let block = Block {
            kind,
            ms,
            keyframe,
            data,
        };
        if self.phase == Phase::Declared {
            self.emit(block)?;
        } else {
            self.pending_bytes += block.data.len();
            self.pending.push_back(block);
            self.maybe_declare()?;
        }
        Ok(())
    }

    /// Annex B to 4-byte length prefixes (AUDs dropped), remembering SPS/PPS.
    /// `Ok(None)` for an access unit without a coded slice.
    fn h264_to_avc(&mut self, annexb: &[u8]) -> Result<Option<(Vec<u8>, bool)>, WriteError> {
        let mut out = Vec::with_capacity(annexb.len());
        let mut keyframe = false;
        let mut has_slice = false;
        let mut any = false;
        for nal in split_nalus(annexb) {
            any = true;
            let Some(&header) = nal.first() else {
                continue;
            };
            let ty = header & 0x1f;
            if header & 0x80 != 0 || ty == 0 {
                return Err(WriteError::Skip(Skip::Garbage(
                    "H.264 NAL unit with forbidden bit or type 0",
                )));
            }
            match ty {
                nal_type::AUD => continue,
                nal_type::SPS if nal.len() <= MAX_PARAM_SET_BYTES => self.sps = Some(nal.to_vec()),
                nal_type::PPS if nal.len() <= MAX_PARAM_SET_BYTES => self.pps = Some(nal.to_vec()),
                nal_type::IDR => keyframe = true,
                _ => {}
            }
            has_slice |= (nal_type::SLICE..=nal_type::IDR).contains(&ty);
            let len = u32::try_from(nal.len()).map_err(|_| WriteError::Skip(Skip::TooLarge))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(nal);
        }
        if !any {
            return Err(WriteError::Skip(Skip::Garbage(
                "H.264 frame without a start code",
            )));
        }
        Ok(has_slice.then_some((out, keyframe)))
    }

    /// The video track description if this keyframe can start it.
    fn video_setup(&self, codec: Codec, data: &[u8]) -> Option<TrackSetup> {
        match codec {
            Codec::H264 => {
                let (sps, pps) = (self.sps.as_deref()?, self.pps.as_deref()?);
                Some(TrackSetup {
                    codec_id: "V_MPEG4/ISO/AVC",
                    codec_private: Some(codec_private::avcc(sps, pps)?),
                    video: codec_private::h264_sps_dimensions(sps),
                    audio: None,
                })
            }
            Codec::Vp8 => Some(TrackSetup {
                codec_id: "V_VP8",
                codec_private: None,
                video: codec_private::vp8_keyframe_dimensions(data),
                audio: None,
            }),
            _ => None,
        }
    }

    fn maybe_declare(&mut self) -> Result<(), WriteError> {
        if self.phase != Phase::Waiting {
            return Ok(());
        }
        let (v_ready, a_ready) = (self.video.setup.is_some(), self.audio.setup.is_some());
        if !v_ready && !a_ready {
            return Ok(());
        }
        let unready_but_seen =
            (self.video.seen.is_some() && !v_ready) || (self.audio.seen.is_some() && !a_ready);
        let wait = if unready_but_seen {
            WAIT_FOR_KEYFRAME_MS
        } else {
            WAIT_FOR_OTHER_KIND_MS
        };
        let span = self.video.seen_span_ms().max(self.audio.seen_span_ms());
        let waited = span >= wait && self.arrival_span >= Duration::from_millis(wait);
        let full =
            self.pending.len() >= MAX_PENDING_FRAMES || self.pending_bytes >= MAX_PENDING_BYTES;
        if (v_ready && a_ready) || full || waited {
            self.declare()?;
        }
        Ok(())
    }

    /// Writes Tracks with the ready tracks and then the held-back blocks.
    fn declare(&mut self) -> io::Result<()> {
        let mut next_number = 1;
        let mut tracks = Vec::new();
        for kind in [Kind::Video, Kind::Audio] {
            let track = self.track(kind);
            let Some(setup) = track.setup.clone() else {
                if track.seen.is_some() {
                    tracing::warn!(call_id = %self.call_id, ?kind, "no usable keyframe in time; this kind is not recorded");
                }
                continue;
            };
            track.number = Some(next_number);
            ebml::put_master(&mut tracks, id::TRACK_ENTRY, |b| {
                ebml::put_uint(b, id::TRACK_NUMBER, next_number);
                ebml::put_uint(b, id::TRACK_UID, next_number);
                ebml::put_uint(b, id::TRACK_TYPE, if kind == Kind::Video { 1 } else { 2 });
                ebml::put_uint(b, id::FLAG_LACING, 0);
                ebml::put_str(b, id::LANGUAGE, "und");
                ebml::put_str(b, id::CODEC_ID, setup.codec_id);
                if let Some(private) = &setup.codec_private {
                    ebml::put_bytes(b, id::CODEC_PRIVATE, private);
                }
                if let Some(dims) = setup.video {
                    ebml::put_master(b, id::VIDEO, |v| {
                        ebml::put_uint(v, id::PIXEL_WIDTH, u64::from(dims.width));
                        ebml::put_uint(v, id::PIXEL_HEIGHT, u64::from(dims.height));
                    });
                }
                if let Some((rate, channels, depth)) = setup.audio {
                    ebml::put_master(b, id::AUDIO, |a| {
                        ebml::put_float(a, id::SAMPLING_FREQUENCY, rate);
                        ebml::put_uint(a, id::CHANNELS, channels);
                        if let Some(depth) = depth {
                            ebml::put_uint(a, id::BIT_DEPTH, depth);
                        }
                    });
                }
            });
            next_number += 1;
        }
        let mut element = Vec::new();
        ebml::put_bytes(&mut element, id::TRACKS, &tracks);
        self.append(&element)?;
        self.phase = Phase::Declared;
        tracing::debug!(call_id = %self.call_id, video = ?self.video.number.and(self.video.codec), audio = ?self.audio.number.and(self.audio.codec), "recording tracks declared");
        while let Some(block) = self.pending.pop_front() {
            let number = match block.kind {
                Kind::Video => self.video.number,
                Kind::Audio => self.audio.number,
            };
            if number.is_some() {
                self.emit(block)?;
            } else {
                self.skipped += 1;
            }
        }
        self.pending_bytes = 0;
        Ok(())
    }

    /// Writes one SimpleBlock, starting a Cluster first when due.
    fn emit(&mut self, block: Block) -> io::Result<()> {
        let track = match block.kind {
            Kind::Video => &mut self.video,
            Kind::Audio => &mut self.audio,
        };
        let Some(number) = track.number else {
            return Ok(());
        };
        track.frames += 1;
        let new_cluster = match self.cluster {
            None => true,
            Some(c) => {
                let rel = i128::from(block.ms) - i128::from(c.start_ms);
                (block.kind == Kind::Video && block.keyframe && c.blocks > 0)
                    || rel > i128::from(MAX_CLUSTER_MS)
                    || rel < i128::from(i16::MIN)
            }
        };
        if new_cluster {
            self.close_cluster()?;
            let mut head = Vec::new();
            ebml::put_id(&mut head, id::CLUSTER);
            let size_at = self.pos + head.len() as u64;
            head.extend_from_slice(&ebml::UNKNOWN_SIZE);
            let data_start = self.pos + head.len() as u64;
            ebml::put_uint(&mut head, id::TIMESTAMP, block.ms);
            self.append(&head)?;
            self.cluster = Some(Cluster {
                start_ms: block.ms,
                blocks: 0,
                size_at,
                data_start,
            });
        }
        let start = match &mut self.cluster {
            Some(c) => {
                c.blocks = c.blocks.saturating_add(1);
                c.start_ms
            }
            None => block.ms,
        };
        let rel = (i128::from(block.ms) - i128::from(start))
            .clamp(i128::from(i16::MIN), i128::from(i16::MAX));
        let rel = i16::try_from(rel).unwrap_or(0);
        let mut out = Vec::with_capacity(block.data.len() + 16);
        ebml::put_id(&mut out, id::SIMPLE_BLOCK);
        ebml::put_size(&mut out, block.data.len() as u64 + 4);
        out.push(0x80 | (number as u8 & 0x7f)); // track number as a 1-byte vint
        out.extend_from_slice(&rel.to_be_bytes());
        out.push(if block.keyframe { 0x80 } else { 0 });
        out.extend_from_slice(&block.data);
        self.append(&out)
    }

    /// Patches the open Cluster's size, so that only the last Cluster of a killed recording
    /// has an unknown size.
    fn close_cluster(&mut self) -> io::Result<()> {
        if let Some(c) = self.cluster.take() {
            let size = self.pos.saturating_sub(c.data_start);
            self.patch(c.size_at, &ebml::size8(size))?;
        }
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn patch(&mut self, at: u64, bytes: &[u8]) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(at))?;
        self.file.write_all(bytes)?;
        self.file.seek(SeekFrom::Start(self.pos))?;
        Ok(())
    }
}

fn audio_setup(codec: Codec) -> TrackSetup {
    match codec {
        Codec::Opus => TrackSetup {
            codec_id: "A_OPUS",
            codec_private: Some(codec_private::opus_head()),
            video: None,
            audio: Some((48_000.0, 2, None)),
        },
        _ => TrackSetup {
            codec_id: "A_MS/ACM",
            codec_private: Some(codec_private::waveformatex_g711(if codec == Codec::Pcma {
                codec_private::WAVE_FORMAT_ALAW
            } else {
                codec_private::WAVE_FORMAT_MULAW
            })),
            video: None,
            audio: Some((8_000.0, 1, Some(8))),
        },
    }
}

/// How a frame's time was mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stamp {
    Normal,
    Backwards,
    Restart,
}

impl Track {
    /// Media time between the first and the latest frame seen, in ms.
    fn seen_span_ms(&self) -> u64 {
        self.seen.map_or(0, |(first, last, rate)| {
            rtp_to_ms(last.saturating_sub(first), rate)
        })
    }

    /// Advances the clock to `rtp` (see the module docs) and says how.
    fn stamp(&mut self, rtp: u64, clock_rate: u32, other_ms: Option<u64>) -> Stamp {
        let Some(c) = &mut self.clock else {
            let ms = other_ms.unwrap_or(0);
            self.clock = Some(Clock {
                clock_rate,
                origin_rtp: rtp,
                origin_ms: ms,
                last_rtp: rtp,
                last_ms: ms,
                last_step_ms: 0,
            });
            return Stamp::Normal;
        };
        let jump_limit = u64::from(c.clock_rate) * (MAX_RTP_JUMP_MS / 1000);
        if rtp.abs_diff(c.last_rtp) > jump_limit {
            c.origin_rtp = rtp;
            c.origin_ms = c.last_ms + c.last_step_ms.max(1);
            c.last_rtp = rtp;
            c.last_ms = c.origin_ms;
            return Stamp::Restart;
        }
        if rtp < c.last_rtp {
            return Stamp::Backwards;
        }
        let ms = c.origin_ms + rtp_to_ms(rtp - c.origin_rtp, c.clock_rate);
        if ms > c.last_ms {
            c.last_step_ms = ms - c.last_ms;
        }
        c.last_rtp = rtp;
        c.last_ms = ms;
        Stamp::Normal
    }
}

fn rtp_to_ms(ticks: u64, clock_rate: u32) -> u64 {
    let ms = u128::from(ticks) * 1000 / u128::from(clock_rate.max(1));
    u64::try_from(ms).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::sink::testutil::*;

    /// When a frame arrives in these tests: as its media time says.
    fn at(f: &MediaFrame) -> Instant {
        static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let rate = u128::from(f.clock_rate).max(1);
        let us = (u128::from(f.rtp_time) * 1_000_000 / rate).min(1 << 40) as u64;
        *BASE.get_or_init(Instant::now) + Duration::from_micros(us)
    }

    fn record(dir: &Path, frames: &[MediaFrame]) -> Recorder {
        let mut rec = Recorder::create(dir, "!call:id/with?junk", 1_700_000_000_000).unwrap();
        for f in frames {
            rec.write(f, at(f)).unwrap();
        }
        rec
    }

    fn assert_close(actual: f64, expected: f64, tolerance: f64, what: &str) {
        assert!(
            (actual - expected).abs() <= tolerance,
            "{what}: {actual} not within {tolerance} of {expected}"
        );
    }

    #[test]
    fn h264_and_pcmu_make_one_mkv_that_ffprobe_reads() {
        let dir = temp_dir("h264");
        let frames = interleave(vec![h264_clip(1_234_567), pcmu(98_765, 200)]);
        let rec = record(&dir, &frames);
        let path = rec.path().to_owned();
        assert_eq!(
            path.file_name().unwrap().to_str().unwrap(),
            "20231114T221320Z-_call_id_with_junk.mkv"
        );
        let summary = rec.finish().unwrap();
        assert_eq!(summary.path.as_deref(), Some(path.as_path()));
        assert_eq!((summary.video_frames, summary.audio_frames), (60, 200));
        assert_eq!(summary.video_codec, Some(Codec::H264));
        assert_eq!(summary.audio_codec, Some(Codec::Pcmu));
        assert_eq!(summary.skipped_frames, 0);
        assert_eq!(summary.duration_ms, 4_000);

        let probe = ffprobe(&path);
        let v = stream(&probe, "video").expect("video stream");
        assert_eq!(v["codec_name"], "h264");
        assert_eq!(
            (v["width"].as_u64(), v["height"].as_u64()),
            (Some(320), Some(240))
        );
        assert_eq!(num(&v["nb_read_frames"]), 60.0);
        let a = stream(&probe, "audio").expect("audio stream");
        assert_eq!(a["codec_name"], "pcm_mulaw");
        assert_eq!(num(&a["sample_rate"]), 8_000.0);
        assert_close(num(&probe["format"]["duration"]), 4.0, 0.1, "duration");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn vp8_and_opus_record_as_v_vp8_and_a_opus() {
        let dir = temp_dir("vp8");
        let frames = interleave(vec![opus_silence(5_000, 200), vp8_clip(77)]);
        let summary = record(&dir, &frames).finish().unwrap();
        assert_eq!((summary.video_frames, summary.audio_frames), (60, 200));
        let path = summary.path.unwrap();
        let probe = ffprobe(&path);
        let v = stream(&probe, "video").expect("video stream");
        assert_eq!(v["codec_name"], "vp8");
        assert_eq!(
            (v["width"].as_u64(), v["height"].as_u64()),
            (Some(320), Some(240))
        );
        assert_eq!(num(&v["nb_read_frames"]), 60.0);
        let a = stream(&probe, "audio").expect("audio stream");
        assert_eq!(a["codec_name"], "opus");
        assert_close(num(&probe["format"]["duration"]), 4.0, 0.1, "duration");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_burst_of_older_video_waits_for_the_audio_in_arrival_time() {
        // A camera's cached GOP: seconds of video media in one moment, then the audio.
        let dir = temp_dir("burst");
        let video = h264_clip(0);
        let span_ms = video.last().map_or(0, |f| f.rtp_time / 90);
        assert!(span_ms > WAIT_FOR_OTHER_KIND_MS, "clip spans {span_ms} ms");
        let mut rec = Recorder::create(&dir, "burst", 0).unwrap();
        let t0 = at(&video[0]);
        for f in &video {
            rec.write(f, t0).unwrap();
        }
        assert!(
            rec.phase == Phase::Waiting,
            "declared before the audio could come"
        );
        for (i, f) in pcmu(0, 10).iter().enumerate() {
            rec.write(f, t0 + Duration::from_millis(100 + 20 * i as u64))
                .unwrap();
        }
        assert!(rec.phase == Phase::Declared);
        let summary = rec.finish().unwrap();
        assert_eq!(summary.video_codec, Some(Codec::H264));
        assert_eq!(summary.audio_codec, Some(Codec::Pcmu));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn audio_only_call_is_declared_after_the_wait() {
        let dir = temp_dir("alaw");
        let frames: Vec<MediaFrame> = pcmu(0, 150)
            .into_iter()
            .map(|mut f| {
                f.codec = Codec::Pcma;
                f
            })
            .collect();
        let mut rec = Recorder::create(&dir, "audio-only", 0).unwrap();
        for (i, f) in frames.iter().enumerate() {
            rec.write(f, at(f)).unwrap();
            // 2 s of audio = frame 100: declared then, not before.
            assert_eq!(rec.phase == Phase::Declared, i >= 100, "frame {i}");
        }
        let summary = rec.finish().unwrap();
        assert_eq!((summary.video_codec, summary.audio_frames), (None, 150));
        let probe = ffprobe(&summary.path.unwrap());
        assert!(stream(&probe, "video").is_none());
        assert_eq!(stream(&probe, "audio").unwrap()["codec_name"], "pcm_alaw");
        assert_close(num(&probe["format"]["duration"]), 3.0, 0.1, "duration");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn recording_dropped_without_finish_still_probes() {
        let dir = temp_dir("crash");
        let frames = interleave(vec![h264_clip(0), pcmu(0, 200)]);
        let rec = record(&dir, &frames[..frames.len() * 3 / 4]);
        let path = rec.path().to_owned();
        // No finish(): the Segment and the last Cluster keep their unknown sizes.
        drop(rec);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..4], &[0x1A, 0x45, 0xDF, 0xA3]);
        let probe = ffprobe(&path);
        let v = stream(&probe, "video").expect("video stream");
        assert_eq!(v["codec_name"], "h264");
        assert_eq!(num(&v["nb_read_frames"]), 45.0);
        assert_eq!(stream(&probe, "audio").unwrap()["codec_name"], "pcm_mulaw");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn frames_before_the_first_keyframe_are_skipped() {
        let dir = temp_dir("prekey");
        // Join mid-GOP: frames 5..15 precede the IDR at 15.
        let video = h264_clip(0).split_off(5);
        let frames = interleave(vec![video, pcmu(0, 180)]);
        let summary = record(&dir, &frames).finish().unwrap();
        assert_eq!(summary.video_frames, 45);
        assert_eq!(summary.skipped_frames, 10);
        let probe = ffprobe(&summary.path.unwrap());
        assert_eq!(
            num(&stream(&probe, "video").unwrap()["nb_read_frames"]),
            45.0
        );
        // Video starts where audio was when its keyframe came: about 10 frames / 15 fps in.
        assert_close(
            num(&stream(&probe, "video").unwrap()["start_time"]),
            0.667,
            0.05,
            "video start",
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_loss_skips_video_until_the_next_keyframe() {
        let dir = temp_dir("loss");
        let mut video = h264_clip(0);
        video[20].contiguous = false;
        let frames = interleave(vec![video, pcmu(0, 200)]);
        let summary = record(&dir, &frames).finish().unwrap();
        // Frames 20..30 wait for the IDR at 30.
        assert_eq!(summary.video_frames, 50);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_frames_are_skipped_with_an_error() {
        let dir = temp_dir("garbage");
        let mut rec = Recorder::create(&dir, "garbage", 0).unwrap();
        let bad = [
            frame(
                MediaKind::Video,
                Codec::H264,
                0,
                90_000,
                &[0xde, 0xad, 0xbe, 0xef],
            ),
            frame(
                MediaKind::Video,
                Codec::H264,
                0,
                90_000,
                &[0, 0, 1, 0x80, 1, 2],
            ),
            frame(MediaKind::Video, Codec::Vp8, 0, 90_000, &[0x00, 1, 2, 3, 4]),
            frame(MediaKind::Audio, Codec::Pcmu, 0, 8_000, &[]),
            frame(MediaKind::Audio, Codec::H264, 0, 8_000, &[1, 2, 3]),
            frame(MediaKind::Audio, Codec::Other, 0, 8_000, &[1, 2, 3]),
            frame(MediaKind::Audio, Codec::Pcmu, 0, 0, &[1, 2, 3]),
        ];
        for f in &bad {
            let err = rec.write(f, at(f)).unwrap_err();
            assert!(
                matches!(
                    err.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::Unsupported
                ),
                "{f:?}: {err}"
            );
        }
        // The recording goes on: the good media after the garbage is all there.
        for f in interleave(vec![h264_clip(0), pcmu(0, 200)]) {
            rec.write(&f, at(&f)).unwrap();
        }
        // A codec switch mid-call is refused for the track.
        let switched = frame(MediaKind::Video, Codec::Vp8, 400_000, 90_000, &[1, 2, 3]);
        assert_eq!(
            rec.write(&switched, at(&switched)).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let summary = rec.finish().unwrap();
        assert_eq!((summary.video_frames, summary.audio_frames), (60, 200));
        assert_eq!(summary.skipped_frames, bad.len() as u64 + 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn random_bytes_never_panic() {
        let dir = temp_dir("fuzz");
        let mut rec = Recorder::create(&dir, "fuzz", 0).unwrap();
        let mut rng = fastrand::Rng::with_seed(11);
        let codecs = [
            (MediaKind::Video, Codec::H264),
            (MediaKind::Video, Codec::Vp8),
            (MediaKind::Audio, Codec::Pcmu),
        ];
        for i in 0..3_000u64 {
            let len = rng.usize(0..64);
            let mut data: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if rng.bool() && data.len() > 4 {
                data[..4].copy_from_slice(&[0, 0, 0, 1]);
            }
            let (kind, codec) = codecs[rng.usize(..codecs.len())];
            let rate = if kind == MediaKind::Video {
                90_000
            } else {
                8_000
            };
            let t = if rng.u8(..) == 0 {
                rng.u64(..)
            } else {
                i * 3_000
            };
            let f = frame(kind, codec, t, rate, &data);
            let _ = rec.write(&f, at(&f));
        }
        rec.finish().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nothing_recordable_removes_the_file() {
        let dir = temp_dir("empty");
        let rec = Recorder::create(&dir, "empty", 0).unwrap();
        let path = rec.path().to_owned();
        assert!(path.exists());
        let summary = rec.finish().unwrap();
        assert_eq!(summary.path, None);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn same_name_gets_a_suffix() {
        let dir = temp_dir("names");
        let a = Recorder::create(&dir, "c", 0).unwrap();
        let b = Recorder::create(&dir, "c", 0).unwrap();
        assert_ne!(a.path(), b.path());
        assert!(b
            .path()
            .to_str()
            .unwrap()
            .ends_with("19700101T000000Z-c-1.mkv"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn clock_clamps_going_back_and_bridges_restarts() {
        let mut t = Track::default();
        assert_eq!(t.stamp(90_000, 90_000, Some(500)), Stamp::Normal);
        assert_eq!(t.clock.unwrap().last_ms, 500);
        assert_eq!(t.stamp(93_000, 90_000, None), Stamp::Normal);
        assert_eq!(t.clock.unwrap().last_ms, 533);
        assert_eq!(t.stamp(91_000, 90_000, None), Stamp::Backwards);
        assert_eq!(t.clock.unwrap().last_ms, 533);
        // A new sender offset far away continues one frame step later.
        assert_eq!(t.stamp(u64::MAX / 2, 90_000, None), Stamp::Restart);
        assert_eq!(t.clock.unwrap().last_ms, 566);
        assert_eq!(t.stamp(u64::MAX / 2 + 9_000, 90_000, None), Stamp::Normal);
        assert_eq!(t.clock.unwrap().last_ms, 666);
    }
}
