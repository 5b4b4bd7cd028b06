//! A real RTSP camera (GStreamer's RTSP server, `tests/e2e/rtsp_server.py`, Debian packages)
//! feeding a call across a real Synapse; the callee records, ffprobe reads the recording.
//! Runs inside the loopback-only namespace like `live.rs`.

use std::path::Path;
use std::thread;
use std::time::Duration;

use call_assist_tests::live::*;

const READY: Duration = Duration::from_secs(30);

#[test]
fn camera_call_is_recorded_and_survives_a_camera_restart() {
    let name = "camera_call_is_recorded_and_survives_a_camera_restart";
    if !in_loopback_namespace(name) {
        return;
    }
    let live = Live::start(name);
    let alice = live.user("alice");
    let bob_user = live.user("bob");
    let room = live.hs.create_dm(&alice, &bob_user);
    let port = closed_port();
    let camera = rtsp_server(&live.dir, "rtsp-1", port);
    let url = format!("rtsp://cam:secret@127.0.0.1:{port}/cam");
    let rec = live.dir.join("recordings");
    let rec_s = rec.display().to_string();

    let mut bob = live.listen(
        &bob_user,
        &["--allow", &alice.id, "--max-calls", "1", "--record", &rec_s],
    );
    bob.wait_event("ready", READY);
    let mut caller = live.call(
        &alice,
        &["--room", &room, "--duration-s", "14", "--video", &url],
    );
    caller.wait_state("connected", Duration::from_secs(40));
    thread::sleep(Duration::from_secs(4));
    // The camera dies and comes back on the same port: the call goes on.
    signal(camera.pid(), "KILL");
    thread::sleep(Duration::from_secs(1));
    let _camera2 = rtsp_server(&live.dir, "rtsp-2", port);
    assert_eq!(
        caller.wait_exit(Duration::from_secs(60)),
        0,
        "{}",
        caller.report()
    );
    assert_eq!(
        bob.wait_exit(Duration::from_secs(20)),
        0,
        "{}",
        bob.report()
    );

    let cams = caller.events_of("camera");
    let states: Vec<&str> = cams.iter().filter_map(|c| c["state"].as_str()).collect();
    assert!(
        states.contains(&"lost"),
        "no camera loss seen: {states:?}\n{}",
        caller.report()
    );
    // Back means a `playing` after the loss (the first `playing` came before it).
    assert!(
        states
            .iter()
            .skip_while(|s| **s != "lost")
            .any(|s| *s == "playing"),
        "camera not back: {states:?}\n{}",
        caller.report()
    );
    assert_eq!(
        caller.summary()["hangup_reason"],
        "user_hangup",
        "{}",
        caller.report()
    );
    let recorded = bob.events_of("recorded");
    assert_eq!(recorded.len(), 1, "{}", bob.report());
    let path = recorded[0]["path"]
        .as_str()
        .expect("a recording path")
        .to_owned();
    let probe = ffprobe(Path::new(&path));
    let streams = probe["streams"].as_array().expect("streams");
    let video = streams
        .iter()
        .find(|s| s["codec_type"] == "video")
        .unwrap_or_else(|| panic!("no video stream in {path}: {probe}"));
    assert_eq!(video["codec_name"], "h264", "{probe}");
    assert_eq!(
        (video["width"].as_u64(), video["height"].as_u64()),
        (Some(640), Some(480))
    );
    let frames: u64 = video["nb_read_frames"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // 14 s at 15 fps minus the reconnect and the wait for IDRs: well over 60 decodable frames.
    assert!(
        frames >= 60,
        "only {frames} video frames in {path}: {probe}"
    );
    let audio = streams.iter().find(|s| s["codec_type"] == "audio");
    assert_eq!(
        audio.map(|a| a["codec_name"].clone()),
        Some("pcm_mulaw".into()),
        "{probe}"
    );
    // Frames after the restart were recorded too (the call lasted past it).
    assert!(
        count(&bob.summary(), "video_frames_received") >= 100,
        "{}",
        bob.report()
    );
}

#[test]
fn wrong_rtsp_password_is_a_clear_error() {
    let name = "wrong_rtsp_password_is_a_clear_error";
    if !in_loopback_namespace(name) {
        return;
    }
    let live = Live::start(name);
    let alice = live.user("alice");
    let port = closed_port();
    let _camera = rtsp_server(&live.dir, "rtsp", port);
    let url = format!("rtsp://cam:xyzzy@127.0.0.1:{port}/cam");
    let mut caller = live.call(&alice, &["--to", "@bob:localhost", "--video", &url]);
    assert_eq!(
        caller.wait_exit(Duration::from_secs(30)),
        6,
        "{}",
        caller.report()
    );
    let report = caller.report();
    assert!(
        report.contains("refused the RTSP user name or password"),
        "{report}"
    );
    assert!(
        !report.contains("xyzzy"),
        "the password leaked into the output:\n{report}"
    );
}
