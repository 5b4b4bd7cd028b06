//! What the hub's speaker (`speaker.rs`) and microphone (`mic.rs`) share: 8 kHz mono s16 in
//! 20 ms periods, how an ALSA device is opened for that, and the device thread's period loop
//! (wall-time pacing, a lost device reopened every [`REOPEN_EVERY`]).

use std::time::Duration;

/// Samples per second (G.711's rate; Opus is decoded and encoded at this rate too).
pub const RATE: usize = 8000;
/// One period: 20 ms, what one G.711 packet carries.
pub const PERIOD: usize = 160;
/// One period of wall time.
pub const PERIOD_TIME: Duration = Duration::from_millis((PERIOD * 1000 / RATE) as u64);
/// How often a lost device is reopened.
pub const REOPEN_EVERY: Duration = Duration::from_secs(2);

#[cfg(feature = "alsa")]
pub use device::{alsa_open, Periods, Turn};

#[cfg(feature = "alsa")]
mod device {
    use std::time::Instant;

    use alsa::pcm::{Access, Format, HwParams, PCM};
    use alsa::{Direction, ValueOr};
    use tracing::{debug, info, warn};

    use super::{PERIOD, PERIOD_TIME, RATE, REOPEN_EVERY};

    /// Opens `device` for `direction` at [`RATE`], mono s16, [`PERIOD`]-sample periods and a
    /// device buffer of about `buffer` samples; prepared (a capture device still needs
    /// `start`).
    ///
    /// # Errors
    /// ALSA's, or "unsupported" for a device that cannot run at 8 kHz itself (it needs a
    /// `plug` name, which resamples).
    pub fn alsa_open(
        device: &str,
        direction: Direction,
        buffer: usize,
    ) -> Result<PCM, alsa::Error> {
        let pcm = PCM::new(device, direction, false)?;
        {
            let hwp = HwParams::any(&pcm)?;
            hwp.set_access(Access::RWInterleaved)?;
            hwp.set_format(Format::s16())?;
            hwp.set_channels(1)?;
            hwp.set_rate(RATE as u32, ValueOr::Nearest)?;
            hwp.set_period_size_near(PERIOD as alsa::pcm::Frames, ValueOr::Nearest)?;
            hwp.set_buffer_size_near(buffer as alsa::pcm::Frames)?;
            pcm.hw_params(&hwp)?;
        }
        if pcm.hw_params_current()?.get_rate()? != RATE as u32 {
            return Err(alsa::Error::unsupported("8 kHz (use a plug: device)"));
        }
        pcm.prepare()?;
        Ok(pcm)
    }

    /// What one period of a device thread brought.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Turn {
        /// The device did its period (or is still gone and not yet due to be reopened).
        Quiet,
        /// The device failed: this message; it is closed and reopened later.
        Lost(String),
        /// The device was reopened.
        Back,
    }

    /// A device thread's periods: the device while it works, reopened every
    /// [`REOPEN_EVERY`] once it failed, each period paced by wall time as well as by the
    /// device (plugins without a clock of their own, such as `file` and `null`, would
    /// otherwise move samples as fast as they are asked).
    pub struct Periods {
        device: String,
        /// `"speaker"`, `"microphone"`: for log lines.
        what: &'static str,
        open: fn(&str) -> Result<PCM, alsa::Error>,
        pcm: Option<PCM>,
        next: Instant,
        reopen_at: Instant,
    }

    impl Periods {
        pub fn new(
            pcm: PCM,
            device: &str,
            what: &'static str,
            open: fn(&str) -> Result<PCM, alsa::Error>,
        ) -> Periods {
            let now = Instant::now();
            Periods {
                device: device.to_owned(),
                what,
                open,
                pcm: Some(pcm),
                next: now,
                reopen_at: now,
            }
        }

        /// One period: `io` on the device if it is open (an `Err` closes it), else a reopen
        /// when one is due; then sleeps until the next period.
        pub fn turn(&mut self, io: impl FnOnce(&PCM) -> Result<(), alsa::Error>) -> Turn {
            let (device, what) = (self.device.as_str(), self.what);
            let turn = match &self.pcm {
                Some(p) => match io(p) {
                    Ok(()) => Turn::Quiet,
                    Err(e) => {
                        warn!(device, "{what} lost: {e}");
                        self.pcm = None;
                        self.reopen_at = Instant::now() + REOPEN_EVERY;
                        Turn::Lost(format!("{device}: {e}"))
                    }
                },
                None if Instant::now() >= self.reopen_at => match (self.open)(device) {
                    Ok(p) => {
                        info!(device, "{what} back");
                        self.pcm = Some(p);
                        Turn::Back
                    }
                    Err(e) => {
                        debug!(device, "{what} still gone: {e}");
                        self.reopen_at = Instant::now() + REOPEN_EVERY;
                        Turn::Quiet
                    }
                },
                None => Turn::Quiet,
            };
            self.next += PERIOD_TIME;
            let now = Instant::now();
            if self.next > now {
                std::thread::sleep(self.next - now);
            } else if now - self.next > PERIOD_TIME * 5 {
                self.next = now;
            }
            turn
        }

        /// The device, when open (to drain it at the end).
        pub fn into_pcm(self) -> Option<PCM> {
            self.pcm
        }
    }
}
