//! Audio between a call's codec and 8 kHz mono samples, for the hub's speakers and
//! microphone: G.711 by table ([`g711`]), Opus through libopus (cargo feature `opus`: the
//! `opus` crate over `audiopus_sys`, which links the system's libopus found by pkg-config).
//!
//! libopus decodes straight to 8 kHz and encodes from it (its own band limiting), so no
//! resampler sits in between. An Opus RTP clock runs at 48 kHz whatever the audio's rate.

use std::fmt;

use call_assist_core::Codec;

use crate::media::g711;

/// Opus's RTP clock rate (RFC 7587), whatever the audio's own rate.
pub const OPUS_CLOCK: u64 = 48_000;
/// The longest Opus packet (120 ms) at 8 kHz.
#[cfg(feature = "opus")]
const MAX_OPUS_SAMPLES: usize = 960;
/// An encoded packet's bound: libopus's recommended maximum payload.
#[cfg(feature = "opus")]
const MAX_OPUS_BYTES: usize = 1275;

/// Why audio could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TranscodeError {
    /// The codec cannot be turned into samples here (Opus in a build without `opus`, video).
    Unsupported(Codec),
    /// libopus refused the packet or the samples (a corrupt packet, a bad frame size).
    Opus(String),
}

impl fmt::Display for TranscodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TranscodeError::Unsupported(c) => write!(f, "cannot decode or encode {c:?} here"),
            TranscodeError::Opus(m) => write!(f, "libopus: {m}"),
        }
    }
}

impl std::error::Error for TranscodeError {}

/// Whether this build turns `codec` into samples and back (G.711 always, Opus with `opus`).
pub fn supported(codec: Codec) -> bool {
    matches!(codec, Codec::Pcmu | Codec::Pcma) || (codec == Codec::Opus && cfg!(feature = "opus"))
}

/// One call's remote audio to 8 kHz samples (an Opus decoder keeps state across packets).
#[derive(Default)]
pub struct Decoder {
    #[cfg(feature = "opus")]
    opus: Option<opus::Decoder>,
}

impl fmt::Debug for Decoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Decoder")
    }
}

impl Decoder {
    /// Starts afresh (another call's audio follows).
    pub fn reset(&mut self) {
        *self = Decoder::default();
    }

    /// The samples of one packet of `codec`.
    ///
    /// # Errors
    /// [`TranscodeError::Unsupported`] for a codec this build cannot decode; libopus's error
    /// for a corrupt Opus packet.
    pub fn decode(&mut self, codec: Codec, data: &[u8]) -> Result<Vec<i16>, TranscodeError> {
        match codec {
            Codec::Pcmu => Ok(data.iter().map(|&b| g711::ulaw_to_linear(b)).collect()),
            Codec::Pcma => Ok(data.iter().map(|&b| g711::alaw_to_linear(b)).collect()),
            #[cfg(feature = "opus")]
            Codec::Opus => {
                let dec = match &mut self.opus {
                    Some(d) => d,
                    None => self.opus.insert(
                        opus::Decoder::new(8000, opus::Channels::Mono).map_err(opus_error)?,
                    ),
                };
                let mut out = vec![0i16; MAX_OPUS_SAMPLES];
                let n = dec.decode(data, &mut out, false).map_err(opus_error)?;
                out.truncate(n);
                Ok(out)
            }
            other => Err(TranscodeError::Unsupported(other)),
        }
    }
}

/// 8 kHz samples to one call's audio codec (an Opus encoder keeps state across packets).
pub struct Encoder {
    codec: Codec,
    #[cfg(feature = "opus")]
    opus: Option<opus::Encoder>,
}

impl fmt::Debug for Encoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Encoder({:?})", self.codec)
    }
}

impl Encoder {
    /// An encoder to `codec`.
    ///
    /// # Errors
    /// [`TranscodeError::Unsupported`] for a codec this build cannot encode; libopus's error
    /// if it cannot make an encoder.
    pub fn new(codec: Codec) -> Result<Encoder, TranscodeError> {
        match codec {
            Codec::Pcmu | Codec::Pcma => Ok(Encoder {
                codec,
                #[cfg(feature = "opus")]
                opus: None,
            }),
            #[cfg(feature = "opus")]
            Codec::Opus => Ok(Encoder {
                codec,
                opus: Some(
                    opus::Encoder::new(8000, opus::Channels::Mono, opus::Application::Voip)
                        .map_err(opus_error)?,
                ),
            }),
            other => Err(TranscodeError::Unsupported(other)),
        }
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// One packet of the samples (20 ms of them: a frame size Opus takes).
    ///
    /// # Errors
    /// libopus's, for a number of samples that is not an Opus frame size.
    pub fn encode(&mut self, samples: &[i16]) -> Result<Vec<u8>, TranscodeError> {
        match self.codec {
            Codec::Pcma => Ok(samples.iter().map(|&s| g711::linear_to_alaw(s)).collect()),
            Codec::Pcmu => Ok(samples.iter().map(|&s| g711::linear_to_ulaw(s)).collect()),
            #[cfg(feature = "opus")]
            Codec::Opus => match &mut self.opus {
                Some(e) => e.encode_vec(samples, MAX_OPUS_BYTES).map_err(opus_error),
                None => Err(TranscodeError::Unsupported(Codec::Opus)),
            },
            other => Err(TranscodeError::Unsupported(other)),
        }
    }
}

#[cfg(feature = "opus")]
fn opus_error(e: opus::Error) -> TranscodeError {
    TranscodeError::Opus(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 20 ms periods of a `freq` Hz sine at 8 kHz.
    fn sine(freq: f64, periods: usize) -> Vec<Vec<i16>> {
        (0..periods)
            .map(|p| {
                (0..160)
                    .map(|i| {
                        let t = (p * 160 + i) as f64 / 8000.0;
                        (8000.0 * (2.0 * std::f64::consts::PI * freq * t).sin()) as i16
                    })
                    .collect()
            })
            .collect()
    }

    /// The share of `x`'s energy at `freq` (Goertzel), 8 kHz.
    fn share(x: &[i16], freq: f64) -> f64 {
        let w = 2.0 * std::f64::consts::PI * freq / 8000.0;
        let (mut s1, mut s2) = (0.0, 0.0);
        for &v in x {
            let s = f64::from(v) + 2.0 * w.cos() * s1 - s2;
            s2 = s1;
            s1 = s;
        }
        let power = s1 * s1 + s2 * s2 - 2.0 * w.cos() * s1 * s2;
        let energy: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        2.0 * power / (x.len() as f64 * energy)
    }

    #[test]
    fn g711_round_trips_through_the_encoder_and_decoder() {
        for codec in [Codec::Pcmu, Codec::Pcma] {
            let mut e = Encoder::new(codec).unwrap();
            let mut d = Decoder::default();
            let input = &sine(440.0, 1)[0];
            let out = d.decode(codec, &e.encode(input).unwrap()).unwrap();
            assert_eq!(out.len(), 160);
            assert!(share(&out, 440.0) > 0.9, "{codec:?}");
        }
    }

    #[test]
    fn video_is_not_audio() {
        assert!(!supported(Codec::H264));
        assert_eq!(
            Decoder::default().decode(Codec::H264, &[0, 0, 1]),
            Err(TranscodeError::Unsupported(Codec::H264))
        );
        assert!(Encoder::new(Codec::Vp8).is_err());
    }

    #[cfg(feature = "opus")]
    #[test]
    fn opus_carries_a_sine_and_refuses_garbage() {
        assert!(supported(Codec::Opus));
        let mut e = Encoder::new(Codec::Opus).unwrap();
        let mut d = Decoder::default();
        let mut heard = Vec::new();
        for period in sine(440.0, 50) {
            let packet = e.encode(&period).unwrap();
            assert!(packet.len() < 160, "Opus is smaller than G.711");
            heard.extend(d.decode(Codec::Opus, &packet).unwrap());
        }
        assert_eq!(heard.len(), 50 * 160);
        // The last half second, past the codec's start-up.
        let tail = heard.get(heard.len() - 4000..).unwrap();
        assert!(share(tail, 440.0) > 0.8, "{}", share(tail, 440.0));
        assert!(share(tail, 1000.0) < 0.05);
        // A packet with an invalid TOC/length layout is an error, not a panic.
        assert!(d.decode(Codec::Opus, &[0xff, 0xff, 0xff]).is_err());
        // 7 samples are not an Opus frame.
        assert!(e.encode(&[0; 7]).is_err());
    }
}
