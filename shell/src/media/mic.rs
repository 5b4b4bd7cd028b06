//! The hub's own microphone (`--audio alsa:DEVICE`, station `audio = "alsa:..."`): 8 kHz mono
//! s16 captured through ALSA in 20 ms periods, G.711-encoded per call (PCMU or PCMA, what the
//! call negotiated; see `pump.rs`).
//!
//! A thread reads the device (ALSA's reads block) and hands each period to the loop through a
//! bounded queue ([`MIC_QUEUE`]; a full queue drops the newest period, so a busy loop never
//! holds the device). A read error the device cannot recover from (unplugged) is a
//! [`MicEvent::Lost`]; the thread reopens the device every [`REOPEN_EVERY`] and reports
//! [`MicEvent::Ready`] when it is back. The RTP time runs on across a loss (by wall time), so
//! the peer's jitter buffer sees a gap, not a jump back.

use std::time::Duration;

/// Samples per second.
pub const RATE: usize = 8000;
/// One period: 20 ms, one G.711 packet.
pub const PERIOD: usize = 160;
/// Periods waiting for the loop (1 s).
pub const MIC_QUEUE: usize = 50;
/// How often a lost device is reopened.
pub const REOPEN_EVERY: Duration = Duration::from_secs(2);

/// What the capture thread reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MicEvent {
    /// One period of samples, at `rtp_time` (8 kHz).
    Frame { samples: Vec<i16>, rtp_time: u64 },
    /// The device captures again after [`MicEvent::Lost`].
    Ready,
    /// The device failed (unplugged); the thread reopens it.
    Lost { message: String },
}

#[cfg(feature = "alsa")]
pub use device::Mic;

#[cfg(feature = "alsa")]
mod device {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use alsa::pcm::{Access, Format, HwParams, PCM};
    use alsa::{Direction, ValueOr};
    use smol::channel::Sender;
    use tracing::{debug, info, warn};

    use super::{MicEvent, PERIOD, RATE, REOPEN_EVERY};

    const PERIOD_TIME: Duration = Duration::from_millis((PERIOD * 1000 / RATE) as u64);
    /// The device's own buffer: 25 periods (500 ms) of slack before an overrun.
    const DEVICE_BUFFER: usize = 25 * PERIOD;

    /// The microphone; dropping it stops the thread.
    #[derive(Debug)]
    pub struct Mic {
        stop: Arc<AtomicBool>,
        pub device: String,
    }

    impl Drop for Mic {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    fn open(device: &str) -> Result<PCM, alsa::Error> {
        let pcm = PCM::new(device, Direction::Capture, false)?;
        {
            let hwp = HwParams::any(&pcm)?;
            hwp.set_access(Access::RWInterleaved)?;
            hwp.set_format(Format::s16())?;
            hwp.set_channels(1)?;
            hwp.set_rate(RATE as u32, ValueOr::Nearest)?;
            hwp.set_period_size_near(PERIOD as alsa::pcm::Frames, ValueOr::Nearest)?;
            hwp.set_buffer_size_near(DEVICE_BUFFER as alsa::pcm::Frames)?;
            pcm.hw_params(&hwp)?;
        }
        let rate = pcm.hw_params_current()?.get_rate()?;
        if rate != RATE as u32 {
            // A device that cannot record at 8 kHz itself goes through ALSA's `plug` layer.
            return Err(alsa::Error::unsupported("8 kHz (use a plug: device)"));
        }
        pcm.prepare()?;
        pcm.start()?;
        Ok(pcm)
    }

    fn read(pcm: &PCM, buf: &mut [i16]) -> Result<(), alsa::Error> {
        let io = pcm.io_i16()?;
        let mut got = 0;
        while got < buf.len() {
            let rest = buf.get_mut(got..).unwrap_or_default();
            match io.readi(rest) {
                // A blocking read returns data or an error; nothing at all would spin here.
                Ok(0) => return Err(alsa::Error::new("snd_pcm_readi", -5)),
                Ok(n) => got += n,
                Err(e) => {
                    // An overrun (EPIPE) or a suspend: recovered here; anything else is lost.
                    pcm.try_recover(e, true)?;
                    pcm.start()?;
                }
            }
        }
        Ok(())
    }

    impl Mic {
        /// Opens `device` (a start-up check: `Err` says why it cannot record) and starts its
        /// thread; periods and events reach `events`.
        ///
        /// # Errors
        /// A message naming the device and ALSA's reason.
        pub fn open(device: &str, events: Sender<MicEvent>) -> Result<Mic, String> {
            let pcm = open(device).map_err(|e| format!("cannot open {device:?}: {e}"))?;
            let stop = Arc::new(AtomicBool::new(false));
            let (s, name) = (stop.clone(), device.to_owned());
            std::thread::Builder::new()
                .name("mic".into())
                .spawn(move || run(pcm, &name, &s, &events))
                .map_err(|e| format!("cannot start the microphone thread: {e}"))?;
            info!(device, "microphone open");
            Ok(Mic {
                stop,
                device: device.to_owned(),
            })
        }
    }

    fn run(pcm: PCM, device: &str, stop: &AtomicBool, events: &Sender<MicEvent>) {
        let mut pcm = Some(pcm);
        let mut rtp_time = 0u64;
        let mut next = Instant::now();
        let mut reopen_at = next;
        let mut dropped = 0u64;
        while !stop.load(Ordering::Relaxed) && !events.is_closed() {
            let mut samples = vec![0i16; PERIOD];
            match &pcm {
                Some(p) => match read(p, &mut samples) {
                    Ok(()) => {
                        let frame = MicEvent::Frame { samples, rtp_time };
                        if events.try_send(frame).is_err() {
                            dropped += 1;
                            debug!(dropped, "microphone: the loop is behind; period dropped");
                        }
                    }
                    Err(e) => {
                        warn!(device, "microphone lost: {e}");
                        pcm = None;
                        reopen_at = Instant::now() + REOPEN_EVERY;
                        let _ = events.try_send(MicEvent::Lost {
                            message: format!("{device}: {e}"),
                        });
                    }
                },
                None if Instant::now() >= reopen_at => match open(device) {
                    Ok(p) => {
                        info!(device, "microphone back");
                        pcm = Some(p);
                        let _ = events.try_send(MicEvent::Ready);
                    }
                    Err(e) => {
                        debug!(device, "microphone still gone: {e}");
                        reopen_at = Instant::now() + REOPEN_EVERY;
                    }
                },
                None => {}
            }
            rtp_time += PERIOD as u64;
            // Paced by wall time as well as by the device: plugins without a clock of their
            // own (file, null) would otherwise hand out samples as fast as they are read.
            next += PERIOD_TIME;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else if now - next > PERIOD_TIME * 5 {
                next = now;
            }
        }
    }
}
