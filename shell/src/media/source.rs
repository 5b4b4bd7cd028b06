//! Turns `--video SRC` / `--audio SRC` into a [`MediaPlan`]: files are read and checked once,
//! at start-up, so a wrong path or format is a clear error before any call.

use std::fmt;
use std::path::Path;

use call_assist_core::h264::ProfileLevelId;

use super::ogg::LoopingOpus;
use super::pump::{AudioSource, MediaPlan, VideoChoice, VideoSource};
use super::rtsp::{RtspSource, RtspTransport};
use super::LoopingVideo;

/// Largest media file read into memory (a looped clip, not a movie).
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// A source that cannot be used, with what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError(pub String);

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SourceError {}

/// The plan, the camera to connect to (if any) and the H.264 profile known so far.
#[derive(Debug)]
pub struct Sources {
    pub plan: MediaPlan,
    pub camera: Option<RtspSource>,
    /// From the file's SPS, or the clip's; a camera's is learnt from its first keyframe.
    pub h264_profile: Option<ProfileLevelId>,
}

fn read_file(path: &Path, flag: &str) -> Result<Vec<u8>, SourceError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| SourceError(format!("{flag}: cannot read {}: {e}", path.display())))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(SourceError(format!(
            "{flag}: {} is {} MB; files up to {} MB are looped from memory",
            path.display(),
            meta.len() / 1_000_000,
            MAX_FILE_BYTES / 1_000_000
        )));
    }
    std::fs::read(path)
        .map_err(|e| SourceError(format!("{flag}: cannot read {}: {e}", path.display())))
}

/// Builds the plan. `rtsp_password` fills in a camera URL that names a user but no password
/// (so the password need not be on the command line).
///
/// # Errors
/// [`SourceError`] naming the flag and what is wrong.
pub fn plan(
    video: &str,
    audio: Option<&str>,
    video_fps: u32,
    choice: VideoChoice,
    transport: RtspTransport,
    rtsp_password: Option<&str>,
) -> Result<Sources, SourceError> {
    let mut camera = None;
    let mut h264_profile = None;
    let video_source = match video {
        "testclip" => {
            if choice != VideoChoice::Vp8 {
                h264_profile = call_assist_core::h264::profile_of_stream(super::TESTCLIP);
            }
            VideoSource::TestClip(choice)
        }
        "none" => VideoSource::None,
        s if s.starts_with("rtsp://") => {
            let mut url = s.to_owned();
            if let Some(pw) = rtsp_password {
                url = with_password(&url, pw)?;
            }
            camera = Some(
                RtspSource::parse(&url, transport)
                    .map_err(|e| SourceError(format!("--video: {e}")))?,
            );
            VideoSource::Camera
        }
        s if s.starts_with("file:") => {
            let path = Path::new(s.trim_start_matches("file:"));
            let data = read_file(path, "--video")?;
            let v = LoopingVideo::new(&data, video_fps).map_err(|e| {
                SourceError(format!(
                    "--video: {} is not a usable H.264 Annex B file: {e}",
                    path.display()
                ))
            })?;
            h264_profile = call_assist_core::h264::profile_of_stream(&data);
            VideoSource::File(v)
        }
        other => {
            return Err(SourceError(format!(
                "--video must be testclip, none, file:PATH or rtsp://..., got {other:?}"
            )))
        }
    };
    let audio_source = match audio {
        None if camera.is_some() => AudioSource::Camera,
        None | Some("tone") => AudioSource::Tone,
        Some("none") => AudioSource::None,
        Some("camera") if camera.is_some() => AudioSource::Camera,
        Some("camera") => {
            return Err(SourceError(
                "--audio camera needs an rtsp:// --video source".into(),
            ))
        }
        Some(s) if s.starts_with("file:") => {
            let path = Path::new(s.trim_start_matches("file:"));
            let data = read_file(path, "--audio")?;
            AudioSource::Opus(
                LoopingOpus::new(&data)
                    .map_err(|e| SourceError(format!("--audio: {}: {e}", path.display())))?,
            )
        }
        Some(s) if s.starts_with("alsa:") => {
            let device = s.trim_start_matches("alsa:");
            if device.is_empty() {
                return Err(SourceError(
                    "--audio alsa:DEVICE needs an ALSA device (e.g. alsa:default)".into(),
                ));
            }
            AudioSource::Mic(device.to_owned())
        }
        Some(other) => {
            return Err(SourceError(format!(
                "--audio must be tone, none, camera, file:PATH (Ogg Opus) or alsa:DEVICE, got {other:?}"
            )))
        }
    };
    Ok(Sources {
        plan: MediaPlan {
            video: video_source,
            audio: audio_source,
        },
        camera,
        h264_profile,
    })
}

/// Puts `password` into an RTSP URL that has a user name and no password.
fn with_password(url: &str, password: &str) -> Result<String, SourceError> {
    let mut u =
        url::Url::parse(url).map_err(|e| SourceError(format!("--video: bad RTSP URL: {e}")))?;
    if !u.username().is_empty() && u.password().is_none() {
        u.set_password(Some(password))
            .map_err(|()| SourceError("--video: cannot set the RTSP password".into()))?;
    }
    Ok(u.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(video: &str, audio: Option<&str>) -> Result<Sources, SourceError> {
        plan(
            video,
            audio,
            25,
            VideoChoice::Auto,
            RtspTransport::Tcp,
            None,
        )
    }

    #[test]
    fn defaults_and_camera_audio() {
        let s = p("testclip", None).unwrap();
        assert!(matches!(s.plan.audio, AudioSource::Tone));
        assert_eq!(s.h264_profile, Some(ProfileLevelId(0x42c01e)));
        let s = p("rtsp://cam@127.0.0.1/x", None).unwrap();
        assert!(matches!(s.plan.video, VideoSource::Camera));
        assert!(matches!(s.plan.audio, AudioSource::Camera));
        assert!(s.camera.is_some());
        assert_eq!(s.h264_profile, None);
        assert!(p("testclip", Some("camera")).is_err());
    }

    #[test]
    fn password_from_the_environment_fills_the_url() {
        assert_eq!(
            with_password("rtsp://cam@h/x", "p@ss").unwrap(),
            "rtsp://cam:p%40ss@h/x"
        );
        assert_eq!(
            with_password("rtsp://cam:a@h/x", "b").unwrap(),
            "rtsp://cam:a@h/x"
        );
        assert_eq!(with_password("rtsp://h/x", "b").unwrap(), "rtsp://h/x");
    }

    #[test]
    fn files_are_checked_at_start() {
        let dir = std::env::temp_dir().join(format!("ca-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let h264 = dir.join("clip.h264");
        std::fs::write(&h264, crate::media::TESTCLIP).unwrap();
        let s = p(&format!("file:{}", h264.display()), None).unwrap();
        assert!(matches!(s.plan.video, VideoSource::File(_)));
        assert_eq!(s.h264_profile, Some(ProfileLevelId(0x42c01e)));
        let junk = dir.join("junk");
        std::fs::write(&junk, b"hello").unwrap();
        let e = p(&format!("file:{}", junk.display()), None).unwrap_err();
        assert!(e.0.contains("not a usable H.264"), "{e}");
        let e = p("file:/nonexistent/x.h264", None).unwrap_err();
        assert!(e.0.contains("cannot read /nonexistent/x.h264"), "{e}");
        let e = p("testclip", Some(&format!("file:{}", junk.display()))).unwrap_err();
        assert!(e.0.contains("not an Ogg file"), "{e}");
        let ogg = dir.join("a.opus");
        std::fs::write(&ogg, crate::media::ogg::tests::sample_file(5)).unwrap();
        let s = p("none", Some(&format!("file:{}", ogg.display()))).unwrap();
        assert!(matches!(s.plan.audio, AudioSource::Opus(_)));
        assert!(p("webcam", None).unwrap_err().0.contains("--video must be"));
        let s = p("none", Some("alsa:plughw:1")).unwrap();
        assert!(matches!(&s.plan.audio, AudioSource::Mic(d) if d == "plughw:1"));
        assert!(p("none", Some("alsa:"))
            .unwrap_err()
            .0
            .contains("needs an ALSA device"));
        assert!(p("testclip", Some("mic"))
            .unwrap_err()
            .0
            .contains("--audio must be"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
