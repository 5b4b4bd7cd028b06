//! IVF (the simple container libvpx writes): a 32-byte file header, then frames with a
//! 12-byte header (size, timestamp). Used for the VP8 test clip.

use super::h264::AccessUnit;

/// Frame rate and frames of an IVF file; `None` if it is not IVF. Truncated frames end the list.
pub fn frames(data: &[u8]) -> Option<(u32, Vec<AccessUnit>)> {
    let header = data.get(..32)?;
    if header.get(..4)? != b"DKIF" {
        return None;
    }
    let le32 = |b: &[u8], at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let header_len = usize::from(u16::from_le_bytes(header.get(6..8)?.try_into().ok()?));
    let rate = le32(header, 16)?;
    let scale = le32(header, 20)?.max(1);
    let fps = (rate / scale).max(1);
    let mut out = Vec::new();
    let mut at = header_len.max(32);
    while let Some(size) = le32(data, at) {
        let start = at + 12;
        let Some(frame) = data.get(start..start + size as usize) else {
            break;
        };
        // VP8 frame tag: bit 0 of the first byte is 0 for a keyframe.
        let keyframe = frame.first().is_some_and(|b| b & 1 == 0);
        out.push(AccessUnit {
            data: frame.to_vec(),
            keyframe,
        });
        at = start + size as usize;
    }
    Some((fps, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_vp8_clip_has_60_frames_with_keyframes_every_15() {
        let (fps, frames) = frames(crate::media::TESTCLIP_VP8).unwrap();
        assert_eq!(fps, 15);
        assert_eq!(frames.len(), 60);
        assert!(frames[0].keyframe);
        assert_eq!(frames.iter().filter(|f| f.keyframe).count(), 4);
    }

    #[test]
    fn garbage_is_not_ivf() {
        assert!(frames(b"nope").is_none());
        assert!(frames(&[0u8; 64]).is_none());
        let mut truncated = crate::media::TESTCLIP_VP8[..100].to_vec();
        truncated.extend_from_slice(&[0xff; 12]);
        let (_, f) = frames(&truncated).unwrap();
        assert!(f.len() <= 1);
    }
}
