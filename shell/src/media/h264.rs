//! The H.264 Annex B parser lives in the core (`call_assist_core::h264`): the SDP side needs
//! a source's profile, and the fuzz target reaches it there.

pub use call_assist_core::h264::*;

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames ffprobe counts in the shipped clip (see shell/assets/README.md).
    const TESTCLIP_FRAMES: usize = 60;

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
