//! Calls in end-to-end encrypted DMs: the `call-assist` binary and the matrix-js-sdk peer
//! with its Rust crypto (`peer.mjs --e2ee`) through a real Synapse, on loopback inside
//! `tests/e2e/loopback-only.sh` (see tests/tests/live.rs for what they need).
//!
//! ```sh
//! tests/e2e/loopback-only.sh cargo test -p call-assist-tests --test e2ee -- --test-threads=2
//! ```

use std::process::Command;
use std::time::Duration;

use call_assist_tests::live::*;
use serde_json::Value;

/// Logged in, keys uploaded and through the first sync.
const READY: Duration = Duration::from_secs(30);
/// A process that has nothing left to do exits within this.
const EXIT: Duration = Duration::from_secs(20);

/// The event types `sender` has in `room`, as Synapse stored them (its database, not the
/// agent's word).
fn stored_event_types(live: &Live, room: &str, sender: &str) -> Vec<String> {
    let db = live.hs.dir.join("homeserver.db");
    let script = "import sqlite3, sys\n\
                  c = sqlite3.connect(sys.argv[1])\n\
                  for (t,) in c.execute('SELECT type FROM events WHERE room_id = ? AND sender = ? ORDER BY stream_ordering', (sys.argv[2], sys.argv[3])):\n    print(t)\n";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(&db)
        .args([room, sender])
        .output()
        .expect("run python3 for sqlite3");
    assert!(
        out.status.success(),
        "reading {}: {}",
        db.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Every call event of `sender` in `room` is stored encrypted; there are some.
fn assert_calls_stored_encrypted(live: &Live, room: &str, sender: &str) {
    let types = stored_event_types(live, room, sender);
    let plaintext: Vec<&String> = types.iter().filter(|t| t.starts_with("m.call.")).collect();
    assert!(
        plaintext.is_empty(),
        "plaintext call events on Synapse: {types:?}"
    );
    let encrypted = types.iter().filter(|t| *t == "m.room.encrypted").count();
    assert!(
        encrypted >= 2,
        "too few encrypted events from {sender}: {types:?}"
    );
}

/// The js peer: connected, audio and video decoded, nothing left undecryptable.
fn assert_js_peer_ok(peer: &Proc) {
    let r: Value = peer.last_json();
    assert_eq!(r["connected"], true, "js peer: {r}\n{}", peer.report());
    assert!(
        count(&r, "audio_frames_received") > 0 && count(&r, "video_frames_received") > 0,
        "js peer decoded no audio or no video: {r}\n{}",
        peer.report()
    );
    assert_eq!(r["e2ee"], true, "{r}");
    assert_eq!(r["decryption_failures"], 0, "{r}\n{}", peer.report());
}

/// The agent's call connected, received audio and video, and sent frames.
fn assert_agent_got_media(p: &Proc) {
    let s = p.summary();
    assert_eq!(s["connected"], true, "{}: {s}\n{}", p.name, p.report());
    for key in [
        "video_frames_received",
        "audio_frames_received",
        "frames_sent",
    ] {
        assert!(
            count(&s, key) > 0,
            "{}: {key} is 0: {s}\n{}",
            p.name,
            p.report()
        );
    }
}

#[test]
fn js_sdk_calls_agent_in_encrypted_dm() {
    if !in_loopback_namespace("js_sdk_calls_agent_in_encrypted_dm") {
        return;
    }
    let live = Live::start("js_sdk_calls_agent_in_encrypted_dm");
    let alice = live.user("alice");
    let bob_user = live.user("bob");
    let room = live.hs.create_encrypted_dm(&alice, &bob_user);

    let mut bob = live.listen(&bob_user, &["--allow", &alice.id, "--max-calls", "1"]);
    bob.wait_event("ready", READY);
    let mut peer = live.js_peer(
        &alice,
        &[
            "--e2ee",
            "--call",
            &room,
            "--duration-s",
            "5",
            "--require",
            "audio,video",
            "--max-wait-s",
            "60",
        ],
    );
    let peer_exit = peer.wait_exit(Duration::from_secs(75));
    assert_eq!(bob.wait_exit(EXIT), 0, "{}", bob.report());
    assert_eq!(peer_exit, 0, "{}\n{}", peer.report(), bob.report());

    assert_js_peer_ok(&peer);
    assert_agent_got_media(&bob);
    assert_calls_stored_encrypted(&live, &room, &bob_user.id);
    assert_calls_stored_encrypted(&live, &room, &alice.id);
}

#[test]
fn agent_calls_js_sdk_in_encrypted_dm() {
    if !in_loopback_namespace("agent_calls_js_sdk_in_encrypted_dm") {
        return;
    }
    let live = Live::start("agent_calls_js_sdk_in_encrypted_dm");
    let alice = live.user("alice");
    let bob_user = live.user("bob");
    let room = live.hs.create_encrypted_dm(&alice, &bob_user);

    let mut peer = live.js_peer(&bob_user, &["--e2ee", "--answer", "--max-wait-s", "60"]);
    peer.wait_stderr("waiting for an incoming call", READY);
    let mut caller = live.call(&alice, &["--room", &room, "--duration-s", "5"]);
    let caller_exit = caller.wait_exit(Duration::from_secs(50));
    let peer_exit = peer.wait_exit(EXIT);
    assert_eq!(caller_exit, 0, "{}\n{}", caller.report(), peer.report());
    assert_eq!(peer_exit, 0, "{}\n{}", peer.report(), caller.report());

    assert_js_peer_ok(&peer);
    assert_agent_got_media(&caller);
    let r = peer.last_json();
    assert_eq!(r["hangup_reason"], "user_hangup", "{r}");
    assert_calls_stored_encrypted(&live, &room, &alice.id);
}
