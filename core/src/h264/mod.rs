//! A small, panic-free H.264 Annex B parser: NALU splitting, access-unit grouping and
//! the `profile-level-id` (RFC 6184) of an SPS, so the SDP offers and answers the profile a
//! source really sends and media goes out on the payload type that names it.
//!
//! In the core because both the SDP side (profiles) and the shell's sources use it, and so
//! that the fuzz target reaches it. Only what the media sources need: it does not decode RBSP beyond the first bit of a
//! slice header. Any input, including garbage, gives a well-formed (possibly empty) result.

mod depacketize;
pub use depacketize::{
    avcc_parameter_sets, DepacketizeError, Depacketizer, DepacketizerStats, Frame, MAX_ACCESS_UNIT,
};

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
    ProfileLevelId::from_sps(nalu).ok().map(|p| p.0)
}

/// The profile of the first SPS in an Annex B stream (or access unit).
pub fn profile_of_stream(data: &[u8]) -> Option<ProfileLevelId> {
    split_nalus(data).find_map(|nal| ProfileLevelId::from_sps(nal).ok())
}

/// `profile-level-id` of RFC 6184 §8.1: `profile_idc`, the constraint flags byte and
/// `level_idc`, as the three bytes of an SPS after its NAL header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProfileLevelId(pub u32);

/// Why an SPS could not give a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpsError {
    /// Fewer than 4 bytes (NAL header + profile, constraints, level).
    TooShort,
    /// The NAL unit type is not 7 (sequence parameter set).
    NotSps(u8),
    /// `forbidden_zero_bit` is set: not an H.264 NAL unit.
    ForbiddenBit,
}

impl std::fmt::Display for SpsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpsError::TooShort => f.write_str("SPS shorter than 4 bytes"),
            SpsError::NotSps(t) => write!(f, "NAL unit type {t} is not an SPS (7)"),
            SpsError::ForbiddenBit => f.write_str("forbidden_zero_bit set in NAL header"),
        }
    }
}

impl std::error::Error for SpsError {}

impl ProfileLevelId {
    /// Constrained Baseline level 3.1, what every WebRTC peer decodes.
    pub const CONSTRAINED_BASELINE_3_1: ProfileLevelId = ProfileLevelId(0x42e01f);

    /// Reads the profile from an SPS NAL unit (header byte included, start code and emulation
    /// prevention bytes are irrelevant: the three bytes read come before any can occur).
    ///
    /// # Errors
    /// [`SpsError`] when `nal` is not an SPS or is too short.
    pub fn from_sps(nal: &[u8]) -> Result<Self, SpsError> {
        let [header, profile, constraints, level, ..] = *nal else {
            return Err(SpsError::TooShort);
        };
        if header & 0x80 != 0 {
            return Err(SpsError::ForbiddenBit);
        }
        if header & 0x1f != nal_type::SPS {
            return Err(SpsError::NotSps(header & 0x1f));
        }
        Ok(ProfileLevelId(
            u32::from(profile) << 16 | u32::from(constraints) << 8 | u32::from(level),
        ))
    }

    /// `profile_idc`.
    pub fn profile_idc(self) -> u8 {
        (self.0 >> 16) as u8
    }

    /// The constraint flags byte (`constraint_set0_flag` is the top bit).
    pub fn constraints(self) -> u8 {
        (self.0 >> 8) as u8
    }

    /// `level_idc` (level x 10, e.g. 31 for level 3.1).
    pub fn level_idc(self) -> u8 {
        self.0 as u8
    }

    /// The profile family RFC 6184 negotiates on (levels are negotiable, profiles are not).
    /// `None` for profile/constraint combinations the RFC's table does not name.
    pub fn family(self) -> Option<Family> {
        let c = self.constraints();
        let set = |bit: u8| c & (0x80 >> bit) != 0;
        // Low 4 bits (constraint_set4/5 and reserved) must be 0 except where a row says.
        match (self.profile_idc(), c & 0x0f) {
            (0x42, 0) if set(1) => Some(Family::ConstrainedBaseline),
            (0x4d, 0) if set(0) => Some(Family::ConstrainedBaseline),
            (0x58, 0) if set(0) && set(1) => Some(Family::ConstrainedBaseline),
            (0x42, 0) => Some(Family::Baseline),
            (0x58, 0) if set(0) => Some(Family::Baseline),
            (0x4d, 0) if !set(0) && !set(2) => Some(Family::Main),
            (0x58, 0) => Some(Family::Extended),
            (0x64, 0x0c) if c == 0x0c => Some(Family::ConstrainedHigh),
            (0x64, _) if c == 0 => Some(Family::High),
            _ => None,
        }
    }
}

impl std::fmt::Display for ProfileLevelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:06x}", self.0)
    }
}

/// H.264 profiles as RFC 6184 §8.2.2 matches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Family {
    ConstrainedBaseline,
    Baseline,
    Main,
    Extended,
    High,
    ConstrainedHigh,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_from_sps_bytes() {
        // x264 High 4.0, Constrained Baseline 3.0, Main 3.1 (constraint_set1 set).
        let high = ProfileLevelId::from_sps(&[0x67, 0x64, 0x00, 0x28, 0xac]).unwrap();
        assert_eq!(high, ProfileLevelId(0x640028));
        assert_eq!(high.to_string(), "640028");
        assert_eq!(high.family(), Some(Family::High));
        assert_eq!(high.level_idc(), 40);
        let cb = ProfileLevelId::from_sps(&[0x27, 0x42, 0xc0, 0x1e]).unwrap();
        assert_eq!(cb.family(), Some(Family::ConstrainedBaseline));
        assert_eq!(
            ProfileLevelId::CONSTRAINED_BASELINE_3_1.family(),
            Some(Family::ConstrainedBaseline)
        );
        assert_eq!(ProfileLevelId(0x4d401f).family(), Some(Family::Main));
        assert_eq!(ProfileLevelId(0x42001f).family(), Some(Family::Baseline));
        assert_eq!(
            ProfileLevelId(0x640c1f).family(),
            Some(Family::ConstrainedHigh)
        );
        assert_eq!(ProfileLevelId(0x6e001f).family(), None);
    }

    #[test]
    fn bad_sps_is_an_error() {
        assert_eq!(ProfileLevelId::from_sps(&[]), Err(SpsError::TooShort));
        assert_eq!(
            ProfileLevelId::from_sps(&[0x67, 0x64]),
            Err(SpsError::TooShort)
        );
        assert_eq!(
            ProfileLevelId::from_sps(&[0x68, 1, 2, 3]),
            Err(SpsError::NotSps(8))
        );
        assert_eq!(
            ProfileLevelId::from_sps(&[0xe7, 1, 2, 3]),
            Err(SpsError::ForbiddenBit)
        );
    }

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
}
