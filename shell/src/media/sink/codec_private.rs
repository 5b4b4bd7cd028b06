//! What a container needs to know about a stream before its first frame: the Matroska
//! CodecPrivate blobs (avcC, OpusHead, WAVEFORMATEX) and picture sizes read from an H.264
//! SPS or a VP8 keyframe header. All parsers return `None` on malformed input.

use call_assist_core::h264::nal_type;
use h264_reader::nal::sps::SeqParameterSet;
use h264_reader::rbsp::{self, BitRead, BitReaderError, Numeric, Primitive};

/// Picture size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dimensions {
    pub width: u32,
    pub height: u32,
}

/// `AVCDecoderConfigurationRecord` (ISO/IEC 14496-15 §5.2.4.1) for one SPS and one PPS,
/// with 4-byte NAL lengths, as Matroska's `V_MPEG4/ISO/AVC` CodecPrivate.
pub fn avcc(sps: &[u8], pps: &[u8]) -> Option<Vec<u8>> {
    let [_, profile, compat, level, ..] = *sps else {
        return None;
    };
    let sps_len = u16::try_from(sps.len()).ok()?;
    let pps_len = u16::try_from(pps.len()).ok()?;
    let mut out = Vec::with_capacity(11 + sps.len() + pps.len());
    out.extend_from_slice(&[1, profile, compat, level, 0xFC | 3, 0xE0 | 1]);
    out.extend_from_slice(&sps_len.to_be_bytes());
    out.extend_from_slice(sps);
    out.push(1);
    out.extend_from_slice(&pps_len.to_be_bytes());
    out.extend_from_slice(pps);
    Some(out)
}

/// `OpusHead` (RFC 7845 §5.1) for a WebRTC stream: 2 channels (what `opus/48000/2`
/// negotiates; mono packets decode fine into it), no pre-skip because the recording starts
/// mid-stream, 48 kHz, mapping family 0.
pub fn opus_head() -> Vec<u8> {
    let mut out = Vec::with_capacity(19);
    out.extend_from_slice(b"OpusHead");
    out.push(1); // version
    out.push(2); // channels
    out.extend_from_slice(&0u16.to_le_bytes()); // pre-skip
    out.extend_from_slice(&48_000u32.to_le_bytes());
    out.extend_from_slice(&0i16.to_le_bytes()); // output gain
    out.push(0); // mapping family
    out
}

/// WAVEFORMATEX tag of G.711 A-law.
pub const WAVE_FORMAT_ALAW: u16 = 6;
/// WAVEFORMATEX tag of G.711 mu-law.
pub const WAVE_FORMAT_MULAW: u16 = 7;

/// An 18-byte `WAVEFORMATEX` for 8 kHz mono 8-bit G.711, the CodecPrivate of `A_MS/ACM`:
/// Matroska has no native G.711 codec ID and this is what ffmpeg itself writes and reads.
pub fn waveformatex_g711(format_tag: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(18);
    out.extend_from_slice(&format_tag.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // channels
    out.extend_from_slice(&8_000u32.to_le_bytes()); // samples per second
    out.extend_from_slice(&8_000u32.to_le_bytes()); // average bytes per second
    out.extend_from_slice(&1u16.to_le_bytes()); // block align
    out.extend_from_slice(&8u16.to_le_bytes()); // bits per sample
    out.extend_from_slice(&0u16.to_le_bytes()); // extra bytes
    out
}

/// Size of a VP8 keyframe (RFC 6386 §9.1: 3-byte frame tag, start code 9d 01 2a, then
/// 14-bit width and height); `None` for an interframe or a malformed header.
pub fn vp8_keyframe_dimensions(frame: &[u8]) -> Option<Dimensions> {
    let [tag, _, _, 0x9d, 0x01, 0x2a, w0, w1, h0, h1, ..] = *frame else {
        return None;
    };
    if tag & 1 != 0 {
        return None;
    }
    let width = u32::from(u16::from_le_bytes([w0, w1]) & 0x3fff);
    let height = u32::from(u16::from_le_bytes([h0, h1]) & 0x3fff);
    (width > 0 && height > 0).then_some(Dimensions { width, height })
}

/// Cropped picture size from an SPS NAL unit (header byte included), H.264 7.3.2.1.1, as
/// h264-reader reads it (retina's RTSP client already parses cameras' SPSs with it).
pub fn h264_sps_dimensions(sps: &[u8]) -> Option<Dimensions> {
    let (&header, _) = sps.split_first()?;
    if header & 0x1f != nal_type::SPS {
        return None;
    }
    let rbsp = rbsp::decode_nal(sps).ok()?;
    let reader = TrailingDataOk(rbsp::BitReader::new(&*rbsp));
    let (width, height) = SeqParameterSet::from_bits(reader)
        .ok()?
        .pixel_dimensions()
        .ok()?;
    let dims = Dimensions { width, height };
    (dims.width > 0 && dims.height > 0 && dims.width <= 16_384 && dims.height <= 16_384)
        .then_some(dims)
}

/// An RBSP reader that accepts data after the SPS's last field, as retina does: some cameras
/// send it, and the picture size is read long before it.
struct TrailingDataOk<R>(R);

impl<R: BitRead> BitRead for TrailingDataOk<R> {
    fn read_ue(&mut self, name: &'static str) -> Result<u32, BitReaderError> {
        self.0.read_ue(name)
    }
    fn read_se(&mut self, name: &'static str) -> Result<i32, BitReaderError> {
        self.0.read_se(name)
    }
    fn read_bool(&mut self, name: &'static str) -> Result<bool, BitReaderError> {
        self.0.read_bool(name)
    }
    fn read<U: Numeric>(&mut self, bits: u32, name: &'static str) -> Result<U, BitReaderError> {
        self.0.read(bits, name)
    }
    fn read_to<V: Primitive>(&mut self, name: &'static str) -> Result<V, BitReaderError> {
        self.0.read_to(name)
    }
    fn skip(&mut self, bits: u32, name: &'static str) -> Result<(), BitReaderError> {
        self.0.skip(bits, name)
    }
    fn has_more_rbsp_data(&mut self, name: &'static str) -> Result<bool, BitReaderError> {
        self.0.has_more_rbsp_data(name)
    }
    fn finish_rbsp(self) -> Result<(), BitReaderError> {
        match self.0.finish_rbsp() {
            Err(BitReaderError::RemainingData) => Ok(()),
            other => other,
        }
    }
    fn finish_sei_payload(self) -> Result<(), BitReaderError> {
        self.0.finish_sei_payload()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::h264::{access_units, nal_unit_type, split_nalus};

    fn testclip_sps_pps() -> (Vec<u8>, Vec<u8>) {
        let aus = access_units(crate::media::TESTCLIP);
        let first = &aus[0];
        let find = |t| {
            first
                .nalus()
                .find(|n| nal_unit_type(n) == Some(t))
                .unwrap()
                .to_vec()
        };
        (find(nal_type::SPS), find(nal_type::PPS))
    }

    #[test]
    fn testclip_sps_says_320x240() {
        let (sps, _) = testclip_sps_pps();
        assert_eq!(
            h264_sps_dimensions(&sps),
            Some(Dimensions {
                width: 320,
                height: 240
            })
        );
    }

    /// Cameras' 1080p SPSs: 1088 coded lines (68 macroblock rows) with 8 cropped at the bottom,
    /// once Baseline and once High profile (chroma format and scaling-list flags, then a VUI).
    #[test]
    fn cropped_1080p_sps_says_1920x1080() {
        let baseline = [
            0x67, 0x42, 0xc0, 0x28, 0xd9, 0x00, 0x78, 0x02, 0x27, 0xe5, 0x84, 0x00, 0x00, 0x03,
            0x00, 0x04, 0x00, 0x00, 0x03, 0x00, 0xf0, 0x3c, 0x60, 0xc9, 0x20,
        ];
        let high = [
            0x67, 0x64, 0x00, 0x28, 0xac, 0xd9, 0x40, 0x78, 0x02, 0x27, 0xe5, 0x84, 0x00, 0x00,
            0x03, 0x00, 0x04, 0x00, 0x00, 0x03, 0x00, 0xf0, 0x3c, 0x60, 0xc6, 0x58,
        ];
        let full_hd = Some(Dimensions {
            width: 1920,
            height: 1080,
        });
        assert_eq!(h264_sps_dimensions(&baseline), full_hd);
        assert_eq!(h264_sps_dimensions(&high), full_hd);
        let mut trailing = high.to_vec();
        trailing.extend_from_slice(&[0x80, 0x00]);
        assert_eq!(
            h264_sps_dimensions(&trailing),
            full_hd,
            "data after the SPS is ignored"
        );
    }

    #[test]
    fn avcc_layout() {
        let (sps, pps) = testclip_sps_pps();
        let rec = avcc(&sps, &pps).unwrap();
        assert_eq!(&rec[..6], &[1, 0x42, 0xc0, 0x1e, 0xff, 0xe1]);
        assert_eq!(usize::from(u16::from_be_bytes([rec[6], rec[7]])), sps.len());
        assert_eq!(rec.len(), 11 + sps.len() + pps.len());
        assert!(avcc(&[0x67], &pps).is_none());
    }

    #[test]
    fn vp8_clip_keyframe_is_320x240() {
        let (_, frames) = crate::media::ivf::frames(crate::media::TESTCLIP_VP8).unwrap();
        assert_eq!(
            vp8_keyframe_dimensions(&frames[0].data),
            Some(Dimensions {
                width: 320,
                height: 240
            })
        );
        assert_eq!(vp8_keyframe_dimensions(&frames[1].data), None);
    }

    #[test]
    fn broken_parameter_sets_give_none_not_panics() {
        let (sps, _) = testclip_sps_pps();
        for cut in 0..sps.len() {
            let _ = h264_sps_dimensions(&sps[..cut]);
        }
        for bit in 8..sps.len() * 8 {
            let mut flipped = sps.clone();
            flipped[bit / 8] ^= 0x80 >> (bit % 8);
            let _ = h264_sps_dimensions(&flipped);
        }
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2_000 {
            let len = rng.usize(0..40);
            let mut junk: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if let Some(h) = junk.first_mut() {
                *h = (*h & 0xe0) | nal_type::SPS;
            }
            let _ = h264_sps_dimensions(&junk);
            let _ = vp8_keyframe_dimensions(&junk);
        }
        assert!(split_nalus(&[]).next().is_none());
    }

    #[test]
    fn header_blobs_have_their_fixed_sizes() {
        assert_eq!(opus_head().len(), 19);
        let wf = waveformatex_g711(WAVE_FORMAT_MULAW);
        assert_eq!(wf.len(), 18);
        assert_eq!(&wf[..2], &[7, 0]);
    }
}
