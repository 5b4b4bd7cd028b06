//! G.711 mu-law (PCMU) and a deterministic test tone.

/// Sample rate of G.711 (Hz), also its RTP clock rate.
pub const SAMPLE_RATE: u32 = 8_000;
/// Samples (= PCMU bytes) in one 20 ms frame.
pub const FRAME_SAMPLES: usize = 160;

const BIAS: i32 = 0x84;
const CLIP: i32 = 32_635;

/// Encodes one 16-bit linear PCM sample as G.711 mu-law (bias 0x84, clip 32635).
pub fn linear_to_ulaw(sample: i16) -> u8 {
    let mut s = i32::from(sample);
    let sign: u8 = if s < 0 { 0x80 } else { 0 };
    if s < 0 {
        s = -s;
    }
    s = s.min(CLIP) + BIAS; // 0x84..=0x7fff
                            // Segment: position of the highest set bit among bits 7..=14.
    let top = u32::try_from(s >> 7).unwrap_or(1);
    let exponent = top.checked_ilog2().unwrap_or(0).min(7); // 0..=7
    let mantissa = ((s >> (exponent + 3)) & 0x0f) as u8;
    !(sign | ((exponent as u8) << 4) | mantissa)
}

/// G.711 A-law (PCMA) from a 16-bit linear sample.
pub fn linear_to_alaw(sample: i16) -> u8 {
    let mut pcm = i32::from(sample) >> 3; // 13-bit magnitude
    let mask = if pcm >= 0 {
        0xd5
    } else {
        pcm = -pcm - 1;
        0x55
    };
    let pcm = pcm.min(0x0fff);
    let seg = (0..8).find(|&s| pcm < (0x20 << s)).unwrap_or(7);
    let aval = if seg == 0 {
        (pcm >> 1) & 0x0f
    } else {
        ((seg << 4) | ((pcm >> seg) & 0x0f)) & 0x7f
    };
    (aval as u8) ^ mask
}

/// A 16-bit linear sample from G.711 A-law (PCMA).
pub fn alaw_to_linear(alaw: u8) -> i16 {
    let a = i32::from(alaw ^ 0x55);
    let seg = (a & 0x70) >> 4;
    let mut t = (a & 0x0f) << 4;
    t = match seg {
        0 => t + 8,
        1 => t + 0x108,
        _ => (t + 0x108) << (seg - 1),
    };
    let t = if a & 0x80 != 0 { t } else { -t };
    t as i16
}

/// PCMU to PCMA, through linear.
pub fn ulaw_to_alaw(u: u8) -> u8 {
    linear_to_alaw(ulaw_to_linear(u))
}

/// PCMA to PCMU, through linear.
pub fn alaw_to_ulaw(a: u8) -> u8 {
    linear_to_ulaw(alaw_to_linear(a))
}

/// Decodes one G.711 mu-law byte to 16-bit linear PCM.
pub fn ulaw_to_linear(ulaw: u8) -> i16 {
    let u = !ulaw;
    let exponent = u32::from((u >> 4) & 0x07);
    let mantissa = i32::from(u & 0x0f);
    let magnitude = (((mantissa << 3) + BIAS) << exponent) - BIAS; // 0..=32124
    let value = if u & 0x80 != 0 { -magnitude } else { magnitude };
    value as i16
}

/// Peak amplitude of the tone (about -10 dBFS).
const TONE_AMPLITUDE: f64 = 10_000.0;

/// sin(x) for x in [0, pi/2] with only + and *, so the result is bit-identical on every
/// platform (no libm). Error < 1e-9, far below one 16-bit step.
fn sin_first_quadrant(x: f64) -> f64 {
    let x2 = x * x;
    // Horner form of the Taylor series up to x^15.
    let mut acc = -1.0 / 1_307_674_368_000.0; // -1/15!
    acc = acc * x2 + 1.0 / 6_227_020_800.0; // 1/13!
    acc = acc * x2 - 1.0 / 39_916_800.0; // 1/11!
    acc = acc * x2 + 1.0 / 362_880.0; // 1/9!
    acc = acc * x2 - 1.0 / 5_040.0; // 1/7!
    acc = acc * x2 + 1.0 / 120.0; // 1/5!
    acc = acc * x2 - 1.0 / 6.0; // 1/3!
    acc = acc * x2 + 1.0;
    acc * x
}

/// sin(2*pi * phase / SAMPLE_RATE) for an integer phase in [0, SAMPLE_RATE).
fn sin_of_phase(phase: u32) -> f64 {
    let half = SAMPLE_RATE / 2;
    let quarter = SAMPLE_RATE / 4;
    let (p, negative) = if phase >= half {
        (phase - half, true)
    } else {
        (phase, false)
    };
    let p = if p > quarter { half - p } else { p }; // 0..=quarter
    let x = std::f64::consts::FRAC_PI_2 * f64::from(p) / f64::from(quarter);
    let s = sin_first_quadrant(x);
    if negative {
        -s
    } else {
        s
    }
}

/// A sine tone as 20 ms PCMU frames at 8 kHz. The phase comes from an integer sample
/// counter only, so the output is the same on every run and platform.
#[derive(Debug, Clone)]
pub struct ToneGenerator {
    freq_hz: u32,
    /// Phase in 1/8000 cycles, always < SAMPLE_RATE.
    phase: u32,
    samples: u64,
}

impl ToneGenerator {
    /// A tone of `freq_hz` (aliased modulo 8 kHz; 0 gives silence).
    pub fn new(freq_hz: u32) -> Self {
        Self {
            freq_hz: freq_hz % SAMPLE_RATE,
            phase: 0,
            samples: 0,
        }
    }

    /// The tone frequency in Hz (after reduction modulo 8 kHz).
    pub fn freq_hz(&self) -> u32 {
        self.freq_hz
    }

    /// Number of samples generated so far.
    pub fn samples_generated(&self) -> u64 {
        self.samples
    }

    /// The next 20 ms (160 samples) of the tone, mu-law encoded.
    pub fn next_frame(&mut self) -> [u8; FRAME_SAMPLES] {
        let mut frame = [0u8; FRAME_SAMPLES];
        for out in &mut frame {
            let sample = (TONE_AMPLITUDE * sin_of_phase(self.phase)).round() as i16;
            *out = linear_to_ulaw(sample);
            // Both terms < SAMPLE_RATE, so no overflow.
            self.phase = (self.phase + self.freq_hz) % SAMPLE_RATE;
        }
        self.samples = self.samples.wrapping_add(FRAME_SAMPLES as u64);
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alaw_known_values_and_round_trips() {
        assert_eq!(linear_to_alaw(0), 0xd5);
        assert_eq!(alaw_to_linear(0xd5), 8);
        assert_eq!(alaw_to_linear(0x55), -8);
        for x in (-32768i32..32768).step_by(97) {
            let x = x as i16;
            let back = i32::from(alaw_to_linear(linear_to_alaw(x)));
            // A-law's step is at most 1/32 of the magnitude (and 16 near zero).
            let tol = (i32::from(x).abs() / 16).max(16);
            assert!((back - i32::from(x)).abs() <= tol, "{x} -> {back}");
        }
        // mu-law -> A-law -> mu-law keeps the tone.
        for u in 0..=255u8 {
            let a = ulaw_to_linear(u) as i32;
            let b = ulaw_to_linear(alaw_to_ulaw(ulaw_to_alaw(u))) as i32;
            assert!((a - b).abs() <= (a.abs() / 8).max(16), "{u}: {a} vs {b}");
        }
    }

    #[test]
    fn known_values() {
        assert_eq!(linear_to_ulaw(0), 0xff);
        assert_eq!(linear_to_ulaw(-1), 0x7f);
        assert_eq!(linear_to_ulaw(i16::MAX), 0x80);
        assert_eq!(linear_to_ulaw(i16::MIN), 0x00);
        assert_eq!(ulaw_to_linear(0xff), 0);
        assert_eq!(ulaw_to_linear(0x80), 32_124);
        assert_eq!(ulaw_to_linear(0x00), -32_124);
        assert_eq!(ulaw_to_linear(0x7f), 0);
    }

    #[test]
    fn round_trip_error_small() {
        for x in i16::MIN..=i16::MAX {
            let y = ulaw_to_linear(linear_to_ulaw(x));
            let ax = i32::from(x).abs().min(CLIP);
            // Half a quantisation step of the segment, plus the clipped part.
            let bound = (ax + BIAS) / 32 + 1 + (i32::from(x).abs() - ax);
            let err = (i32::from(x) - i32::from(y)).abs();
            assert!(err <= bound, "x={x} y={y} err={err} bound={bound}");
            if x.unsigned_abs() < 100 {
                assert!(err <= 4, "x={x} y={y}");
            }
        }
        // Decoding then encoding is the identity except for the two codes of zero.
        for u in 0..=255u8 {
            let back = linear_to_ulaw(ulaw_to_linear(u));
            assert!(
                back == u || (u == 0x7f && back == 0xff),
                "u={u:#x} back={back:#x}"
            );
        }
    }

    #[test]
    fn sine_is_accurate() {
        for phase in 0..SAMPLE_RATE {
            let exact = (2.0 * std::f64::consts::PI * f64::from(phase) / 8000.0).sin();
            assert!((sin_of_phase(phase) - exact).abs() < 1e-9, "phase={phase}");
        }
    }

    #[test]
    fn tone_frames() {
        let mut tone = ToneGenerator::new(440);
        let a = tone.next_frame();
        let b = tone.next_frame();
        assert!(a.iter().any(|&s| s != a[0]), "frame is constant");
        assert_ne!(a, b);
        assert_eq!(tone.samples_generated(), 320);
        // Deterministic.
        let mut again = ToneGenerator::new(440);
        assert_eq!(again.next_frame(), a);
        // 440 Hz: 440*160/8000 = 8.8 cycles per frame -> about 17-18 sign changes.
        let signs = a
            .windows(2)
            .filter(|w| (ulaw_to_linear(w[0]) >= 0) != (ulaw_to_linear(w[1]) >= 0))
            .count();
        assert!((16..=19).contains(&signs), "{signs}");
        let peak = a.iter().map(|&s| ulaw_to_linear(s).abs()).max().unwrap();
        assert!((9_000..=10_600).contains(&peak), "{peak}");
        // 1 kHz repeats every 8 samples, so 20 ms frames are all the same.
        let mut k = ToneGenerator::new(1000);
        assert_eq!(k.next_frame(), k.next_frame());
        // Silence.
        assert!(ToneGenerator::new(0)
            .next_frame()
            .iter()
            .all(|&s| s == 0xff));
    }
}
