//! `--forward-rtp` for real: the callee re-sends the caller's media as plain RTP on loopback
//! with an SDP file, and ffmpeg (Debian package, installed by `.ci/run`) plays that SDP and
//! decodes video and audio frames from it. Runs inside `tests/e2e/loopback-only.sh` like the
//! other live tests.

use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use call_assist_tests::live::*;

fn free_udp_port_pair() -> u16 {
    // An even port whose +2 (audio) is free too.
    for _ in 0..50 {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a probe socket");
        let p = s.local_addr().expect("probe address").port() & !1;
        if p > 1024
            && p < 65000
            && std::net::UdpSocket::bind(("127.0.0.1", p + 2)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok()
        {
            return p;
        }
    }
    panic!("no free UDP port pair");
}

#[test]
fn ffmpeg_plays_the_forwarded_call() {
    if !in_loopback_namespace("ffmpeg_plays_the_forwarded_call") {
        return;
    }
    let live = Live::start("ffmpeg_plays_the_forwarded_call");
    let alice = live.user("alice");
    let bob = live.user("bob");
    let room = live.hs.create_dm(&alice, &bob);
    let port = free_udp_port_pair();
    let dest = format!("127.0.0.1:{port}");
    let mut listener = live.listen(
        &bob,
        &[
            "--allow",
            &alice.id,
            "--max-calls",
            "1",
            "--forward-rtp",
            &dest,
        ],
    );
    listener.wait_event("ready", Duration::from_secs(30));
    let mut caller = live.call(&alice, &["--room", &room, "--duration-s", "14"]);
    let fwd = listener.wait_event("forwarding", Duration::from_secs(40));
    assert_eq!(fwd.value["to"], dest.as_str());
    let sdp = fwd.value["sdp"].as_str().expect("sdp path").to_owned();
    // The SDP names each stream once its codec is known (the first frames).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(&sdp).unwrap_or_default();
        if text.contains("m=video") && text.contains("m=audio") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SDP {sdp} never named both streams: {text:?}\n{}",
            listener.report()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let out = live.dir.join("played.mkv");
    let ffmpeg = Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-protocol_whitelist",
            "file,udp,rtp",
        ])
        .args([
            "-i",
            &sdp,
            "-t",
            "6",
            "-c:v",
            "copy",
            "-c:a",
            "pcm_s16le",
            "-y",
        ])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ffmpeg (Debian package) is installed by .ci/run");
    let done = ffmpeg.wait_with_output().expect("ffmpeg ran");
    assert!(
        done.status.success(),
        "ffmpeg failed: {}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(
        caller.wait_exit(Duration::from_secs(40)),
        0,
        "{}",
        caller.report()
    );
    assert_eq!(
        listener.wait_exit(Duration::from_secs(20)),
        0,
        "{}",
        listener.report()
    );

    let v = ffprobe(&out);
    let streams = v["streams"].as_array().cloned().unwrap_or_default();
    let frames = |kind: &str| -> u64 {
        streams
            .iter()
            .filter(|s| s["codec_type"] == kind)
            .filter_map(|s| s["nb_read_frames"].as_str()?.parse::<u64>().ok())
            .sum()
    };
    let video = streams
        .iter()
        .find(|s| s["codec_type"] == "video")
        .cloned()
        .unwrap_or_default();
    assert_eq!(video["codec_name"], "h264", "{v}");
    // The test clip is 320x240 at 15 fps: 6 s played gives dozens of decodable frames.
    assert_eq!(
        (video["width"].as_u64(), video["height"].as_u64()),
        (Some(320), Some(240)),
        "{v}"
    );
    assert!(
        frames("video") >= 30,
        "{} video frames decoded: {v}",
        frames("video")
    );
    assert!(
        frames("audio") >= 50,
        "{} audio frames decoded: {v}",
        frames("audio")
    );
}
