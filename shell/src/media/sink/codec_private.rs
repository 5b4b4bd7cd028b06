//! What a container needs to know about a stream before its first frame: the Matroska
//! CodecPrivate blobs (avcC, OpusHead, WAVEFORMATEX) and picture sizes read from an H.264
//! SPS or a VP8 keyframe header. All parsers return `None` on malformed input.

use call_assist_core::h264::nal_type;

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

/// Reads bits MSB first from an RBSP (emulation prevention bytes already removed).
struct BitReader<'a> {
    data: &'a [u8],
    bit: usize,
}

impl BitReader<'_> {
    fn bit(&mut self) -> Option<u32> {
        let byte = self.data.get(self.bit / 8)?;
        let v = (byte >> (7 - (self.bit % 8))) & 1;
        self.bit += 1;
        Some(u32::from(v))
    }

    fn bits(&mut self, n: u32) -> Option<u32> {
        (0..n).try_fold(0u32, |acc, _| Some(acc << 1 | self.bit()?))
    }

    /// Exp-Golomb ue(v); longer than 31 leading zeros is malformed for every SPS field.
    fn ue(&mut self) -> Option<u32> {
        let mut zeros = 0;
        while self.bit()? == 0 {
            zeros += 1;
            if zeros > 31 {
                return None;
            }
        }
        let rest = self.bits(zeros)?;
        Some(((1u64 << zeros) - 1 + u64::from(rest)).min(u64::from(u32::MAX)) as u32)
    }

    fn se(&mut self) -> Option<i64> {
        let k = i64::from(self.ue()?);
        Some(if k % 2 == 1 { (k + 1) / 2 } else { -(k / 2) })
    }
}

/// The RBSP of a NAL unit payload: drops the 03 of every `00 00 03`.
fn unescape(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len());
    let mut zeros = 0;
    for &b in payload {
        if zeros >= 2 && b == 3 {
            zeros = 0;
            continue;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        out.push(b);
    }
    out
}

/// Skips a scaling_list() of `size` entries (H.264 7.3.2.1.1.1).
fn skip_scaling_list(r: &mut BitReader<'_>, size: usize) -> Option<()> {
    let mut last = 8i64;
    let mut next = 8i64;
    for _ in 0..size {
        if next != 0 {
            next = (last + r.se()? + 256).rem_euclid(256);
        }
        if next != 0 {
            last = next;
        }
    }
    Some(())
}

/// Cropped picture size from an SPS NAL unit (header byte included), H.264 7.3.2.1.1.
pub fn h264_sps_dimensions(sps: &[u8]) -> Option<Dimensions> {
    let (&header, payload) = sps.split_first()?;
    if header & 0x1f != nal_type::SPS {
        return None;
    }
    let rbsp = unescape(payload);
    let mut r = BitReader {
        data: &rbsp,
        bit: 0,
    };
    let profile_idc = r.bits(8)?;
    r.bits(16)?; // constraint flags, level_idc
    r.ue()?; // seq_parameter_set_id
    let mut chroma_format_idc = 1;
    let mut separate_colour_plane = 0;
    if matches!(
        profile_idc,
        100 | 110 | 122 | 244 | 44 | 83 | 86 | 118 | 128 | 138 | 139 | 134 | 135
    ) {
        chroma_format_idc = r.ue()?;
        if chroma_format_idc == 3 {
            separate_colour_plane = r.bit()?;
        }
        r.ue()?; // bit_depth_luma_minus8
        r.ue()?; // bit_depth_chroma_minus8
        r.bit()?; // qpprime_y_zero_transform_bypass_flag
        if r.bit()? == 1 {
            let lists = if chroma_format_idc == 3 { 12 } else { 8 };
            for i in 0..lists {
                if r.bit()? == 1 {
                    skip_scaling_list(&mut r, if i < 6 { 16 } else { 64 })?;
                }
            }
        }
    }
    r.ue()?; // log2_max_frame_num_minus4
    match r.ue()? {
        0 => {
            r.ue()?; // log2_max_pic_order_cnt_lsb_minus4
        }
        1 => {
            r.bit()?;
            r.se()?;
            r.se()?;
            let cycle = r.ue()?;
            if cycle > 255 {
                return None;
            }
            for _ in 0..cycle {
                r.se()?;
            }
        }
        _ => {}
    }
    r.ue()?; // max_num_ref_frames
    r.bit()?; // gaps_in_frame_num_value_allowed_flag
    let width_mbs = u64::from(r.ue()?) + 1;
    let height_map_units = u64::from(r.ue()?) + 1;
    let frame_mbs_only = u64::from(r.bit()?);
    if frame_mbs_only == 0 {
        r.bit()?; // mb_adaptive_frame_field_flag
    }
    r.bit()?; // direct_8x8_inference_flag
    let (mut crop_x, mut crop_y) = (0u64, 0u64);
    if r.bit()? == 1 {
        let left = u64::from(r.ue()?);
        let right = u64::from(r.ue()?);
        let top = u64::from(r.ue()?);
        let bottom = u64::from(r.ue()?);
        // Crop units (Table 6-1 and equations 7-19..7-22).
        let chroma_array_type = if separate_colour_plane == 1 {
            0
        } else {
            chroma_format_idc
        };
        let (unit_x, unit_y) = match chroma_array_type {
            0 => (1, 2 - frame_mbs_only),
            1 => (2, 2 * (2 - frame_mbs_only)),
            2 => (2, 2 - frame_mbs_only),
            _ => (1, 2 - frame_mbs_only),
        };
        crop_x = (left + right) * unit_x;
        crop_y = (top + bottom) * unit_y;
    }
    let width = (width_mbs * 16).checked_sub(crop_x)?;
    let height = ((2 - frame_mbs_only) * height_map_units * 16).checked_sub(crop_y)?;
    let dims = Dimensions {
        width: u32::try_from(width).ok()?,
        height: u32::try_from(height).ok()?,
    };
    (dims.width > 0 && dims.height > 0 && dims.width <= 16_384 && dims.height <= 16_384)
        .then_some(dims)
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
