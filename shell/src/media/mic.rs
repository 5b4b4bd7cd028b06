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

pub use super::pcm::{PERIOD, RATE, REOPEN_EVERY};
/// Periods waiting for the loop (1 s).
pub const MIC_QUEUE: usize = 50;

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

    use alsa::pcm::PCM;
    use alsa::Direction;
    use smol::channel::Sender;
    use tracing::{debug, info};

    use super::{MicEvent, PERIOD};
    use crate::media::pcm::{Periods, Turn};

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
        let pcm = crate::media::pcm::alsa_open(device, Direction::Capture, DEVICE_BUFFER)?;
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
        let mut periods = Periods::new(pcm, device, "microphone", open);
        let mut rtp_time = 0u64;
        let mut dropped = 0u64;
        while !stop.load(Ordering::Relaxed) && !events.is_closed() {
            let mut samples = vec![0i16; PERIOD];
            let mut got = false;
            let turn = periods.turn(|p| {
                read(p, &mut samples)?;
                got = true;
                Ok(())
            });
            if got
                && events
                    .try_send(MicEvent::Frame { samples, rtp_time })
                    .is_err()
            {
                dropped += 1;
                debug!(dropped, "microphone: the loop is behind; period dropped");
            }
            let news = match turn {
                Turn::Quiet => None,
                Turn::Lost(message) => Some(MicEvent::Lost { message }),
                Turn::Back => Some(MicEvent::Ready),
            };
            if let Some(ev) = news {
                let _ = events.try_send(ev);
            }
            // The RTP time runs on through a loss: the peer sees a gap, not a jump back.
            rtp_time += PERIOD as u64;
        }
    }
}
