//! The hub's own speaker (`--speaker DEVICE`, station `speaker = "..."`): a call's remote
//! audio, G.711 decoded to 8 kHz mono s16, played through ALSA.
//!
//! The call's packets arrive at the sender's clock and in bursts; the device takes samples at
//! its own clock. Between the two sits a [`JitterBuffer`]: playback starts once
//! [`TARGET`] samples are queued. Drift is judged over a [`WINDOW`] of pulls, not per packet
//! (jitter alone must not cause corrections, each of which is a small phase jump): a window
//! in which the queue never fell to the target plus [`HIGH_MARGIN`] holds latency it does not
//! need, so the next window drops one sample per period; a window in which it never got back
//! up to the target is running dry, so the next window repeats one per period (0.6 % at most,
//! inaudible on speech). Clock drift of either side thus never grows the delay nor starves
//! the device. An empty queue plays silence and waits for the target again, which grows by a
//! period (up to [`MAX_TARGET`]) so that the path's jitter fits from then on.
//!
//! The device is driven by its own thread (ALSA's calls block): every [`PERIOD`] of wall
//! time it pulls a period from the buffer and writes it. A write error the device cannot
//! recover from (unplugged USB audio) is a [`SpeakerEvent::Lost`]; the thread then reopens
//! the device every [`REOPEN_EVERY`] and reports [`SpeakerEvent::Ready`] when it is back.

use std::collections::VecDeque;

pub use super::pcm::{PERIOD, RATE, REOPEN_EVERY};
/// Queued samples before playback starts, at first (60 ms).
pub const TARGET: usize = 3 * PERIOD;
/// Each underrun (packets later than the queue) raises the target by a period, up to this
/// (200 ms): a jittery path buys a deeper buffer once instead of a gap every few seconds.
pub const MAX_TARGET: usize = 10 * PERIOD;
/// A window whose smallest queue (at a pull) stays above the target plus this runs long.
pub const HIGH_MARGIN: usize = PERIOD;
/// Pulls over which drift is judged (1 s).
pub const WINDOW: u32 = 50;
/// The bound: a push past this (a burst after a stall) drops the oldest samples down to
/// the target, so the speaker never lags the caller by more than half a second.
pub const MAX: usize = 25 * PERIOD;

/// What the buffer did, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JitterStats {
    /// Periods that found the queue empty (silence played, playback re-primed).
    pub underruns: u64,
    /// Samples dropped because the queue ran long (drift) or overflowed.
    pub dropped: u64,
    /// Samples repeated because the queue ran short (drift).
    pub inserted: u64,
}

/// A bounded queue of samples between the call and the device. Pure: no clock, no I/O.
#[derive(Debug, Default)]
pub struct JitterBuffer {
    queue: VecDeque<i16>,
    playing: bool,
    last: i16,
    /// This window's pulls so far and the smallest and largest queue seen at them.
    pulls: u32,
    min_len: usize,
    max_len: usize,
    /// What this window does, decided by the last one.
    correction: Correction,
    /// Queued samples before playback (re)starts; 0 until the first pull ([`TARGET`]).
    target: usize,
    pub stats: JitterStats,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Correction {
    #[default]
    None,
    Drop,
    Insert,
}

impl JitterBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Samples queued.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// A packet's samples, in order.
    pub fn push(&mut self, samples: &[i16]) {
        self.queue.extend(samples.iter().copied());
        if self.queue.len() > MAX {
            let excess = self.queue.len() - self.target();
            self.queue.drain(..excess);
            self.stats.dropped += excess as u64;
        }
    }

    /// Drops what is queued (a new call at the speaker).
    pub fn clear(&mut self) {
        self.queue.clear();
        self.playing = false;
        self.target = 0;
        self.restart_window();
    }

    fn restart_window(&mut self) {
        self.pulls = 0;
        self.min_len = usize::MAX;
        self.max_len = 0;
        self.correction = Correction::None;
    }

    /// Queued samples playback (re)starts at, and the level drift is judged against.
    pub fn target(&self) -> usize {
        self.target.max(TARGET)
    }

    /// Counts a pull that found `len` queued; at the window's end, decides the next one: a
    /// window that never fell to the target plus [`HIGH_MARGIN`] runs long, one that never
    /// got back up to the target runs short.
    fn observe(&mut self, len: usize) {
        if self.pulls == 0 {
            self.min_len = usize::MAX;
            self.max_len = 0;
        }
        self.pulls += 1;
        self.min_len = self.min_len.min(len);
        self.max_len = self.max_len.max(len);
        if self.pulls >= WINDOW {
            self.correction = if self.min_len > self.target() + HIGH_MARGIN {
                Correction::Drop
            } else if self.max_len < self.target() {
                Correction::Insert
            } else {
                Correction::None
            };
            self.pulls = 0;
        }
    }

    /// Fills `out` (one period) with the next samples, or silence.
    pub fn pull(&mut self, out: &mut [i16]) {
        let n = out.len();
        if !self.playing {
            if self.queue.len() < self.target() {
                out.fill(0);
                return;
            }
            self.playing = true;
            self.restart_window();
        }
        if self.queue.len() < n {
            self.stats.underruns += 1;
            self.target = (self.target() + PERIOD).min(MAX_TARGET);
            self.playing = false;
            out.fill(0);
            return;
        }
        let len = self.queue.len();
        self.observe(len);
        if self.correction == Correction::Drop && len > n {
            // Running long: skip one sample in the middle of the period.
            for (i, slot) in out.iter_mut().enumerate() {
                if i == n / 2 {
                    self.queue.pop_front();
                    self.stats.dropped += 1;
                }
                *slot = self.queue.pop_front().unwrap_or(self.last);
            }
        } else if self.correction == Correction::Insert && n > 1 {
            // Running short: say one sample twice.
            for (i, slot) in out.iter_mut().enumerate() {
                *slot = if i == n / 2 {
                    self.stats.inserted += 1;
                    self.last
                } else {
                    self.queue.pop_front().unwrap_or(self.last)
                };
                self.last = *slot;
            }
            return;
        } else {
            for slot in out.iter_mut() {
                *slot = self.queue.pop_front().unwrap_or(self.last);
            }
        }
        self.last = out.last().copied().unwrap_or(self.last);
    }
}

/// What the speaker's thread reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpeakerEvent {
    /// The device plays (again, after [`SpeakerEvent::Lost`]).
    Ready,
    /// The device failed mid-call (unplugged); the thread reopens it.
    Lost { message: String },
}

#[cfg(feature = "alsa")]
pub use device::Speaker;

#[cfg(feature = "alsa")]
mod device {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use alsa::pcm::PCM;
    use alsa::Direction;
    use smol::channel::Sender;
    use tracing::{debug, info};

    use super::{JitterBuffer, SpeakerEvent, PERIOD};
    use crate::media::pcm::{Periods, Turn};

    /// The device's own buffer: 4 periods (80 ms).
    const DEVICE_BUFFER: usize = 4 * PERIOD;

    /// The speaker: push samples in; the thread plays them. Dropping it stops the thread.
    #[derive(Debug)]
    pub struct Speaker {
        buffer: Arc<Mutex<JitterBuffer>>,
        stop: Arc<AtomicBool>,
        pub device: String,
    }

    impl Drop for Speaker {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    fn open(device: &str) -> Result<PCM, alsa::Error> {
        crate::media::pcm::alsa_open(device, Direction::Playback, DEVICE_BUFFER)
    }

    fn write(pcm: &PCM, samples: &[i16]) -> Result<(), alsa::Error> {
        let io = pcm.io_i16()?;
        match io.writei(samples) {
            Ok(_) => Ok(()),
            Err(e) => {
                // An underrun (EPIPE) or a suspend: recovered here; anything else is lost.
                pcm.try_recover(e, true)?;
                io.writei(samples).map(|_| ())
            }
        }
    }

    impl Speaker {
        /// Opens `device` (a start-up check: `Err` says why it cannot play) and starts its
        /// thread; events reach `events`.
        ///
        /// # Errors
        /// A message naming the device and ALSA's reason.
        pub fn open(device: &str, events: Sender<SpeakerEvent>) -> Result<Speaker, String> {
            let pcm = open(device).map_err(|e| format!("cannot open {device:?}: {e}"))?;
            let buffer = Arc::new(Mutex::new(JitterBuffer::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let (b, s, name) = (buffer.clone(), stop.clone(), device.to_owned());
            std::thread::Builder::new()
                .name("speaker".into())
                .spawn(move || run(pcm, &name, &b, &s, &events))
                .map_err(|e| format!("cannot start the speaker thread: {e}"))?;
            info!(device, "speaker open");
            Ok(Speaker {
                buffer,
                stop,
                device: device.to_owned(),
            })
        }

        pub fn push(&self, samples: &[i16]) {
            if let Ok(mut b) = self.buffer.lock() {
                b.push(samples);
            }
        }

        pub fn clear(&self) {
            if let Ok(mut b) = self.buffer.lock() {
                b.clear();
            }
        }
    }

    fn run(
        pcm: PCM,
        device: &str,
        buffer: &Mutex<JitterBuffer>,
        stop: &AtomicBool,
        events: &Sender<SpeakerEvent>,
    ) {
        let mut periods = Periods::new(pcm, device, "speaker", open);
        let mut out = [0i16; PERIOD];
        let mut last_stats = Default::default();
        while !stop.load(Ordering::Relaxed) && !events.is_closed() {
            if let Ok(mut b) = buffer.lock() {
                b.pull(&mut out);
                if b.stats != last_stats {
                    debug!(stats = ?b.stats, queued = b.len(), "speaker buffer");
                    last_stats = b.stats;
                }
            }
            let news = match periods.turn(|p| write(p, &out)) {
                Turn::Quiet => None,
                Turn::Lost(message) => Some(SpeakerEvent::Lost { message }),
                Turn::Back => Some(SpeakerEvent::Ready),
            };
            if let Some(ev) = news {
                let _ = events.try_send(ev);
            }
        }
        if let Some(p) = periods.into_pcm() {
            let _ = p.drain();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(start: i16) -> Vec<i16> {
        (0..PERIOD as i16).map(|i| start.wrapping_add(i)).collect()
    }

    fn pull(b: &mut JitterBuffer) -> Vec<i16> {
        let mut out = vec![0; PERIOD];
        b.pull(&mut out);
        out
    }

    #[test]
    fn playback_starts_at_the_target_and_keeps_order() {
        let mut b = JitterBuffer::new();
        b.push(&packet(1));
        b.push(&packet(1000));
        assert_eq!(pull(&mut b), vec![0; PERIOD], "silence until primed");
        b.push(&packet(2000));
        assert_eq!(pull(&mut b), packet(1));
        b.push(&packet(3000));
        assert_eq!(pull(&mut b), packet(1000));
        assert_eq!(b.stats, JitterStats::default());
    }

    #[test]
    fn an_empty_queue_plays_silence_and_reprimes() {
        let mut b = JitterBuffer::new();
        for k in 0..3 {
            b.push(&packet(k * 1000));
        }
        for _ in 0..3 {
            pull(&mut b);
        }
        assert_eq!(pull(&mut b), vec![0; PERIOD]);
        assert_eq!(b.stats.underruns, 1);
        b.push(&packet(5));
        assert_eq!(pull(&mut b), vec![0; PERIOD], "waits for the target again");
        assert_eq!(
            b.target(),
            TARGET + PERIOD,
            "a deeper target after the underrun"
        );
        b.push(&packet(6));
        b.push(&packet(7));
        b.push(&packet(8));
        assert_eq!(pull(&mut b), packet(5), "four periods queued: plays");
    }

    /// Sender and device at different clocks: the queue stays within a period or two of
    /// the thresholds and the correction is one sample per period at most.
    #[test]
    fn drift_either_way_keeps_the_queue_bounded() {
        for (sender_ppm, label) in [(5_000i64, "sender fast"), (-5_000, "sender slow")] {
            let mut b = JitterBuffer::new();
            // Device pulls a period every 20 ms; the sender's 20 ms packets arrive at
            // 20 ms * (1 - ppm): simulated on a microsecond clock.
            let packet_us = 20_000 - 20_000 * sender_ppm / 1_000_000;
            let (mut t_send, mut t_play) = (0i64, 0i64);
            let mut max_len = 0;
            for _ in 0..30_000 {
                if t_send <= t_play {
                    b.push(&packet(7));
                    t_send += packet_us;
                } else {
                    pull(&mut b);
                    t_play += 20_000;
                    max_len = max_len.max(b.len());
                }
            }
            let bound = TARGET + HIGH_MARGIN + 2 * PERIOD;
            assert!(max_len <= bound, "{label}: queue grew to {max_len}");
            assert_eq!(b.stats.underruns, 0, "{label}: {:?}", b.stats);
            if sender_ppm > 0 {
                assert!(
                    b.stats.dropped > 0 && b.stats.inserted == 0,
                    "{:?}",
                    b.stats
                );
            } else {
                assert!(
                    b.stats.inserted > 0 && b.stats.dropped == 0,
                    "{:?}",
                    b.stats
                );
            }
        }
    }

    /// Same clocks, packets in bursts of three (60 ms late, then all at once): jitter alone
    /// never drops or repeats a sample.
    #[test]
    fn jitter_without_drift_is_never_corrected() {
        let mut b = JitterBuffer::new();
        for k in 0..3000 {
            if k % 3 == 0 {
                for _ in 0..3 {
                    b.push(&packet(9));
                }
            }
            pull(&mut b);
        }
        assert_eq!(b.stats, JitterStats::default());
    }

    #[test]
    fn a_burst_past_the_bound_keeps_the_newest() {
        let mut b = JitterBuffer::new();
        for k in 0..(MAX / PERIOD + 1) {
            b.push(&packet(k as i16));
        }
        assert_eq!(b.len(), TARGET);
        assert_eq!(b.stats.dropped as usize, MAX + PERIOD - TARGET);
        let last = (MAX / PERIOD) as i16;
        assert_eq!(pull(&mut b), packet(last - 2));
    }
}
