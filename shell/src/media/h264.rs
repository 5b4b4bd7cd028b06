//! A small, panic-free H.264 Annex B parser: NALU splitting, access-unit grouping and
//! the `profile-level-id` of an SPS.
//!
//! Only what the media sources need: it does not decode RBSP beyond the first bit of a
//! slice header. Any input, including garbage, gives a well-formed (possibly empty) result.

/// NAL unit types used here (ITU-T H.264 Table 7-1).
pub mod nal_type {
    /// Coded slice of a non-IDR picture.
    pub const SLICE: u8 = 1;
    /// Coded slice data partition A.
    pub const SLICE_DPA: u8 = 2;
    /// Coded slice of an IDR picture.
    pub const IDR: u8 = 5;
    /// Supplemental enhancement information.
    pub const SEI: u8 = 6;
    /// Sequence parameter set.
    pub const SPS: u8 = 7;
    /// Picture parameter set.
    pub const PPS: u8 = 8;
    /// Access unit delimiter.
    pub const AUD: u8 = 9;
}

/// The 4-byte Annex B start code written in front of every NALU of an [`AccessUnit`].
pub const START_CODE: [u8; 4] = [0, 0, 0, 1];

/// One coded picture with its parameter sets / SEI, as Annex B bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessUnit {
    /// Annex B, each NALU preceded by a 4-byte start code.
    pub data: Vec<u8>,
    /// Contains an IDR slice (NAL type 5).
    pub keyframe: bool,
}

impl AccessUnit {
    /// The NALUs of this access unit (without start codes).
    pub fn nalus(&self) -> impl Iterator<Item = &[u8]> {
        split_nalus(&self.data)
    }
}

/// The `nal_unit_type` of a NALU (without start code); `None` for an empty slice.
pub fn nal_unit_type(nalu: &[u8]) -> Option<u8> {
    nalu.first().map(|h| h & 0x1f)
}

/// Position of the next start code (`00 00 01`) at or after `from`: (start, end-exclusive).
fn find_start_code(data: &[u8], from: usize) -> Option<(usize, usize)> {
    let rest = data.get(from..)?;
    rest.windows(3)
        .position(|w| w == [0, 0, 1])
        .map(|p| (from + p, from + p + 3))
}

/// Drops trailing zero bytes (the leading zero of a 4-byte start code, trailing_zero_8bits).
fn trim_trailing_zeros(mut nalu: &[u8]) -> &[u8] {
    while let [head @ .., 0] = nalu {
        nalu = head;
    }
    nalu
}

/// Splits an Annex B byte stream into NAL units (without start codes).
///
/// Accepts 3- and 4-byte start codes. Bytes before the first start code are ignored,
/// trailing zero bytes of a NALU are dropped, and empty NALUs are skipped.
pub fn split_nalus(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut next = find_start_code(data, 0).map(|(_, end)| end);
    std::iter::from_fn(move || loop {
        let begin = next?;
        let (nalu, following) = match find_start_code(data, begin) {
            Some((sc_start, sc_end)) => (data.get(begin..sc_start), Some(sc_end)),
            None => (data.get(begin..), None),
        };
        next = following;
        let nalu = trim_trailing_zeros(nalu.unwrap_or_default());
        if !nalu.is_empty() {
            return Some(nalu);
        }
    })
}

fn is_vcl(nal_type: u8) -> bool {
    (nal_type::SLICE..=nal_type::IDR).contains(&nal_type)
}

/// A slice whose `first_mb_in_slice` is 0: ue(v) == 0 is the single bit `1`, so the first
/// bit after the one-byte NAL header is set.
fn is_first_slice_of_picture(nalu: &[u8]) -> bool {
    nalu.get(1).is_some_and(|b| b & 0x80 != 0)
}

/// Groups the NALUs of an Annex B stream into access units.
///
/// A new access unit begins, once the current one has a coded slice, at an AUD, SPS, PPS,
/// SEI, NAL types 14..=18, or a slice with `first_mb_in_slice == 0` (H.264 7.4.1.2.3).
/// NALUs with the forbidden_zero_bit set or type 0 are skipped; access units without any
/// coded slice (e.g. trailing parameter sets) are dropped.
pub fn access_units(data: &[u8]) -> Vec<AccessUnit> {
    let mut out = Vec::new();
    let mut current = AccessUnit {
        data: Vec::new(),
        keyframe: false,
    };
    let mut has_vcl = false;

    for nalu in split_nalus(data) {
        let Some(&header) = nalu.first() else {
            continue;
        };
        let ty = header & 0x1f;
        if header & 0x80 != 0 || ty == 0 {
            continue;
        }
        let starts_new = match ty {
            nal_type::SEI | nal_type::SPS | nal_type::PPS | nal_type::AUD | 14..=18 => true,
            nal_type::SLICE | nal_type::SLICE_DPA | nal_type::IDR => {
                is_first_slice_of_picture(nalu)
            }
            _ => false,
        };
        if starts_new && has_vcl {
            out.push(std::mem::replace(
                &mut current,
                AccessUnit {
                    data: Vec::new(),
                    keyframe: false,
                },
            ));
            has_vcl = false;
        }
        current.data.extend_from_slice(&START_CODE);
        current.data.extend_from_slice(nalu);
        has_vcl |= is_vcl(ty);
        current.keyframe |= ty == nal_type::IDR;
    }
    if has_vcl {
        out.push(current);
    }
    out
}

/// The `profile-level-id` (RFC 6184) of an SPS NALU: profile_idc, constraint flags and
/// level_idc, the three bytes after the NAL header, e.g. `0x42c01e`.
///
/// A leading Annex B start code is tolerated. `None` if this is not an SPS or is too short.
pub fn profile_level_id(sps_nalu: &[u8]) -> Option<u32> {
    let nalu = sps_nalu
        .strip_prefix(&START_CODE[..])
        .or_else(|| sps_nalu.strip_prefix(&START_CODE[1..]))
        .unwrap_or(sps_nalu);
    if nal_unit_type(nalu)? != nal_type::SPS {
        return None;
    }
    match nalu.get(1..4)? {
        &[profile, constraints, level] => {
            Some(u32::from(profile) << 16 | u32::from(constraints) << 8 | u32::from(level))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames ffprobe counts in the shipped clip (see shell/assets/README.md).
    const TESTCLIP_FRAMES: usize = 60;

    #[test]
    fn splits_three_and_four_byte_start_codes() {
        let data = [
            0xAA, 0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 0, 0, 1, 0x65, 0x88, 0,
        ];
        let nalus: Vec<&[u8]> = split_nalus(&data).collect();
        assert_eq!(
            nalus,
            vec![&[0x67, 1, 2][..], &[0x68, 3][..], &[0x65, 0x88][..]]
        );
    }

    #[test]
    fn groups_access_units() {
        let mut s = Vec::new();
        for nalu in [
            &[0x09, 0xf0][..],         // AUD
            &[0x67, 0x42, 0xc0, 0x1e], // SPS
            &[0x68, 0xce],             // PPS
            &[0x65, 0x88, 0x84],       // IDR, first_mb 0
            &[0x65, 0x40, 0x11],       // IDR, first_mb != 0 (second slice)
            &[0x41, 0x9a],             // P, first_mb 0 -> new AU
            &[0x41, 0x9b],             // P, first_mb 0 -> new AU
            &[0x06, 0x05],             // SEI -> new AU
            &[0x41, 0x9c],             // P joins the SEI's AU
            &[0x67, 0x42],             // trailing SPS without a slice: dropped
        ] {
            s.extend_from_slice(&[0, 0, 1]);
            s.extend_from_slice(nalu);
        }
        let aus = access_units(&s);
        assert_eq!(aus.len(), 4);
        assert!(aus[0].keyframe);
        assert_eq!(aus[0].nalus().count(), 5);
        assert!(!aus[1].keyframe);
        assert_eq!(aus[1].data, vec![0, 0, 0, 1, 0x41, 0x9a]);
        assert_eq!(aus[3].nalus().count(), 2);
    }

    #[test]
    fn garbage_does_not_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0, 0],
            vec![0, 0, 1],
            vec![0, 0, 0, 1],
            vec![0, 0, 1, 0, 0, 1, 0, 0, 0, 1],
            vec![0, 0, 1, 0x65],
            vec![0, 0, 1, 0xe5, 0x88],
            vec![0xff; 64],
            vec![0; 64],
        ];
        let random = (0..500).map(|_| {
            let len = rng.usize(0..200);
            (0..len)
                .map(|_| match rng.u8(0..4) {
                    0 => 0,
                    1 => 1,
                    _ => rng.u8(..),
                })
                .collect::<Vec<u8>>()
        });
        for data in cases.into_iter().chain(random) {
            for nalu in split_nalus(&data) {
                assert!(!nalu.is_empty());
                assert!(nalu.len() <= data.len());
            }
            for au in access_units(&data) {
                assert!(au.data.starts_with(&START_CODE));
                assert!(au.nalus().count() >= 1);
                assert_eq!(
                    au.keyframe,
                    au.nalus().any(|n| nal_unit_type(n) == Some(nal_type::IDR))
                );
            }
            let _ = profile_level_id(&data);
        }
        assert!(access_units(&[0, 0, 1, 0x65]).len() == 1);
        assert!(access_units(&[0, 0, 1, 0xe5, 0x88]).is_empty());
    }

    #[test]
    fn profile_level_id_of_sps() {
        assert_eq!(
            profile_level_id(&[0x67, 0x42, 0xc0, 0x1e, 0xd9]),
            Some(0x42c01e)
        );
        assert_eq!(
            profile_level_id(&[0, 0, 0, 1, 0x67, 0x64, 0, 0x28]),
            Some(0x640028)
        );
        assert_eq!(profile_level_id(&[0x67, 0x42, 0xc0]), None);
        assert_eq!(profile_level_id(&[0x68, 0x42, 0xc0, 0x1e]), None);
        assert_eq!(profile_level_id(&[]), None);
    }

    #[test]
    fn shipped_clip() {
        let aus = access_units(crate::media::TESTCLIP);
        assert_eq!(aus.len(), TESTCLIP_FRAMES);
        let first = &aus[0];
        assert!(first.keyframe);
        let types: Vec<u8> = first.nalus().filter_map(nal_unit_type).collect();
        assert!(types.contains(&nal_type::SPS));
        assert!(types.contains(&nal_type::PPS));
        assert!(types.contains(&nal_type::IDR));
        let sps = first
            .nalus()
            .find(|n| nal_unit_type(n) == Some(nal_type::SPS))
            .unwrap();
        assert_eq!(profile_level_id(sps), Some(0x42c01e));
        // GOP of 15: one IDR (with SPS+PPS in front) every 15 frames.
        for (i, au) in aus.iter().enumerate() {
            assert_eq!(au.keyframe, i % 15 == 0, "AU {i}");
            if au.keyframe {
                let types: Vec<u8> = au.nalus().filter_map(nal_unit_type).collect();
                assert!(
                    types.starts_with(&[nal_type::SPS, nal_type::PPS]),
                    "AU {i}: {types:?}"
                );
            }
        }
        let total: usize = aus.iter().map(|a| a.nalus().count()).sum();
        assert_eq!(total, split_nalus(crate::media::TESTCLIP).count());
    }
}
