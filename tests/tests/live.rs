//! The `call-assist` binary against a real Synapse and a real matrix-js-sdk peer, all on
//! loopback inside a network namespace that has only `lo` (`tests/e2e/loopback-only.sh`).
//!
//! Needs: `tests/e2e/setup.sh` (Synapse venv), `npm ci` in `tests/interop`, and
//! `cargo build -p call-assist` (the binary). Run:
//!
//! ```sh
//! tests/e2e/loopback-only.sh cargo test -p call-assist-tests --test live -- --test-threads=1
//! ```
//!
//! Run outside a namespace, each test re-runs itself inside `loopback-only.sh`. Each test's
//! logs stay in `target/e2e/live/<pid of the run>/<test>/` (`<agent>.stderr`, `<agent>.stdout`,
//! `synapse/`).

use std::thread;
use std::time::{Duration, Instant};

use call_assist_tests::live::*;
use serde_json::Value;

/// Logged in and through the first sync.
const READY: Duration = Duration::from_secs(30);
/// From placing a call to connected on loopback (about 1 s normally: the invite waits for
/// the callee's sync long-poll).
const CONNECT: Duration = Duration::from_secs(30);
/// A process that has nothing left to do exits within this.
const EXIT: Duration = Duration::from_secs(20);

/// A JSON line's `call_id`.
fn call_id(v: &Value) -> String {
    v["call_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no call_id in {v}"))
        .to_owned()
}

/// The one `ended` line of `p`.
fn ended(p: &Proc) -> Value {
    let ended = p.events_of("ended");
    assert_eq!(
        ended.len(),
        1,
        "{}: ended lines {ended:?}\n{}",
        p.name,
        p.report()
    );
    ended[0].clone()
}

/// A summary of a call that connected and received both audio and video.
fn assert_connected_with_media(p: &Proc) {
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

/// The js peer's result: connected, audio and video decoded, and the agent's video was VP8
/// (wrtc has no H.264 decoder: anything else would not be counted at all).
fn assert_js_peer_got_media(peer: &Proc) {
    let r = peer.last_json();
    assert_eq!(r["connected"], true, "js peer: {r}\n{}", peer.report());
    assert!(
        count(&r, "video_frames_received") > 0 && count(&r, "audio_frames_received") > 0,
        "js peer decoded no audio or no video: {r}\n{}",
        peer.report()
    );
    let codec = r["rtp"]["inbound"]["video"]["codec"].as_str().unwrap_or("");
    assert!(
        codec.eq_ignore_ascii_case("video/VP8"),
        "the agent's video reached the js peer as {codec:?}, expected VP8: {}",
        r["rtp"]
    );
}

#[test]
fn synapse_restarts_on_the_same_port() {
    if !in_loopback_namespace("synapse_restarts_on_the_same_port") {
        return;
    }
    let live = Live::start("synapse_restarts_on_the_same_port");
    let alice = live.user("alice");
    let bob = live.user("bob");
    let room = live.hs.create_dm(&alice, &bob);
    assert!(room.starts_with('!'), "room id {room:?}");
    assert!(live.hs.answers());

    live.hs.stop();
    assert!(!live.hs.answers(), "Synapse still answers after stop");
    live.hs.restart();
    assert!(live.hs.answers(), "Synapse does not answer after a restart");
    // The database survived: registering again with the same password is a login.
    assert_eq!(live.user("alice").id, alice.id);
}

#[test]
fn agent_calls_agent_through_synapse() {
    if !in_loopback_namespace("agent_calls_agent_through_synapse") {
        return;
    }
    let live = Live::start("agent_calls_agent_through_synapse");
    let alice = live.user("alice");
    let bob_user = live.user("bob");
    let room = live.hs.create_dm(&alice, &bob_user);

    let mut bob = live.listen(&bob_user, &["--allow", &alice.id, "--max-calls", "1"]);
    bob.wait_event("ready", READY);
    let mut caller = live.call(&alice, &["--room", &room, "--duration-s", "5"]);

    assert_eq!(
        caller.wait_exit(CONNECT + Duration::from_secs(20)),
        0,
        "{}",
        caller.report()
    );
    assert_eq!(bob.wait_exit(EXIT), 0, "{}", bob.report());

    let incoming = bob.events_of("incoming");
    assert_eq!(incoming.len(), 1, "{}", bob.report());
    assert_eq!(incoming[0]["from"], alice.id.as_str());
    let placed = caller.wait_state("invite_sent", Duration::ZERO);
    assert_eq!(call_id(&incoming[0]), call_id(&placed.value));

    for p in [&caller, &bob] {
        assert_connected_with_media(p);
        assert_eq!(
            p.summary()["hangup_reason"],
            "user_hangup",
            "{}",
            p.report()
        );
        assert!(
            p.non_json_stdout().is_empty()
                && p.events().iter().all(|e| e.value["event"].is_string()),
            "{}: stdout must be JSON lines with an \"event\" key\n{}",
            p.name,
            p.report()
        );
        assert!(
            p.events().iter().any(|e| e.value["event"] == "stats"),
            "{}: no stats line during 5 s connected",
            p.name
        );
        // On loopback without TURN, media flows between host candidates.
        let stats = p.events_of("stats");
        assert!(
            stats
                .iter()
                .any(|s| s["local_candidate"] == "host" && s["remote_candidate"] == "host"),
            "{}: stats name no host/host pair\n{}",
            p.name,
            p.report()
        );
    }
    assert_eq!(bob.summary()["calls"], 1);
    assert!(count(&caller.summary(), "setup_ms") > 0);
    // The last line is the summary.
    for p in [&caller, &bob] {
        assert_eq!(p.last_json()["event"], "summary", "{}", p.report());
    }
}

#[test]
fn call_to_a_user_finds_the_dm() {
    if !in_loopback_namespace("call_to_a_user_finds_the_dm") {
        return;
    }
    let live = Live::start("call_to_a_user_finds_the_dm");
    let alice = live.user("alice");
    let bob_user = live.user("bob");
    live.hs.create_dm(&alice, &bob_user);

    let mut bob = live.listen(&bob_user, &["--allow", &alice.id, "--max-calls", "1"]);
    bob.wait_event("ready", READY);
    let mut caller = live.call(&alice, &["--to", &bob_user.id, "--duration-s", "2"]);

    assert_eq!(
        caller.wait_exit(CONNECT + Duration::from_secs(15)),
        0,
        "{}",
        caller.report()
    );
    assert_eq!(bob.wait_exit(EXIT), 0, "{}", bob.report());
    assert_eq!(caller.summary()["connected"], true, "{}", caller.report());
    assert_eq!(bob.events_of("incoming").len(), 1, "{}", bob.report());
}

#[test]
fn listener_ignores_a_caller_not_allowed() {
    if !in_loopback_namespace("listener_ignores_a_caller_not_allowed") {
        return;
    }
    let live = Live::start("listener_ignores_a_caller_not_allowed");
    let alice = live.user("alice");
    let bob_user = live.user("bob");
    let room = live.hs.create_dm(&alice, &bob_user);

    let mut bob = live.listen(
        &bob_user,
        &["--allow", "@carol:localhost", "--max-calls", "1"],
    );
    bob.wait_event("ready", READY);
    let mut caller = live.call(&alice, &["--room", &room, "--duration-s", "3"]);
    caller.wait_state("invite_sent", CONNECT);
    // The invite reached Bob and was refused (his log says so), not merely missed.
    bob.wait_stderr(
        "invite from a user not on the allow list ignored call_id=",
        Duration::from_secs(20),
    );
    caller.terminate();
    let caller_exit = caller.wait_exit(EXIT);

    assert!(
        caller
            .events_of("state")
            .iter()
            .all(|v| !is_state(v, "connected")),
        "{}",
        caller.report()
    );
    assert_eq!(caller.summary()["connected"], false, "{}", caller.report());
    assert_eq!(
        caller_exit,
        1,
        "a call that never connected exits 1\n{}",
        caller.report()
    );

    assert!(
        bob.poll_exit().is_none(),
        "bob's listener quit\n{}",
        bob.report()
    );
    bob.terminate();
    bob.wait_exit(EXIT);
    assert!(bob.events_of("incoming").is_empty(), "{}", bob.report());
    assert!(bob.events_of("state").is_empty(), "{}", bob.report());
    let s = bob.summary();
    assert_eq!(s["connected"], false, "{s}");
    assert_eq!(s["calls"], 0, "{s}");
}

#[test]
fn caller_hangs_up() {
    if !in_loopback_namespace("caller_hangs_up") {
        return;
    }
    let live = Live::start("caller_hangs_up");
    let alice = live.user("alice");
    let bob_user = live.user("bob");
    let room = live.hs.create_dm(&alice, &bob_user);

    let mut bob = live.listen(&bob_user, &["--allow", &alice.id, "--max-calls", "1"]);
    bob.wait_event("ready", READY);
    let mut caller = live.call(&alice, &["--room", &room, "--duration-s", "3"]);
    let connected = caller.wait_state("connected", CONNECT);
    assert_eq!(caller.wait_exit(EXIT), 0, "{}", caller.report());
    assert_eq!(bob.wait_exit(EXIT), 0, "{}", bob.report());

    let mine = ended(&caller);
    assert_eq!(
        (&mine["reason"], &mine["by"]),
        (&"user_hangup".into(), &"local".into()),
        "{mine}"
    );
    let theirs = ended(&bob);
    assert_eq!(
        (&theirs["reason"], &theirs["by"]),
        (&"user_hangup".into(), &"remote".into()),
        "{theirs}"
    );
    assert_eq!(bob.summary()["hangup_reason"], "user_hangup");
    // --duration-s 3 counts from connected.
    let ended_at = caller
        .wait_for("ended", Duration::ZERO, |v| v["event"] == "ended")
        .at;
    let talked = ended_at.duration_since(connected.at);
    assert!(
        talked >= Duration::from_millis(2500) && talked <= Duration::from_secs(6),
        "connected for {talked:?} with --duration-s 3"
    );
}

#[test]
fn callee_hangs_up() {
    if !in_loopback_namespace("callee_hangs_up") {
        return;
    }
    let live = Live::start("callee_hangs_up");
    let alice = live.user("alice");
    let bob_user = live.user("bob");
    let room = live.hs.create_dm(&alice, &bob_user);

    let mut bob = live.listen(
        &bob_user,
        &[
            "--allow",
            &alice.id,
            "--max-calls",
            "1",
            "--duration-s",
            "3",
        ],
    );
    bob.wait_event("ready", READY);
    let mut caller = live.call(&alice, &["--room", &room, "--duration-s", "30"]);
    caller.wait_state("connected", CONNECT);
    // Well before alice's own 30 s.
    assert_eq!(
        caller.wait_exit(Duration::from_secs(20)),
        0,
        "{}",
        caller.report()
    );
    assert_eq!(bob.wait_exit(EXIT), 0, "{}", bob.report());

    let mine = ended(&caller);
    assert_eq!(
        (&mine["reason"], &mine["by"]),
        (&"user_hangup".into(), &"remote".into()),
        "{mine}\n{}",
        caller.report()
    );
    let theirs = ended(&bob);
    assert_eq!(
        (&theirs["reason"], &theirs["by"]),
        (&"user_hangup".into(), &"local".into()),
        "{theirs}\n{}",
        bob.report()
    );
    assert_eq!(caller.summary()["connected"], true);
    assert_eq!(caller.summary()["hangup_reason"], "user_hangup");
}

#[test]
fn synapse_restart_mid_call_keeps_media() {
    if !in_loopback_namespace("synapse_restart_mid_call_keeps_media") {
        return;
    }
    let live = Live::start("synapse_restart_mid_call_keeps_media");
    let alice = live.user("alice");
    let bob_user = live.user("bob");
    let room = live.hs.create_dm(&alice, &bob_user);

    let mut bob = live.listen(&bob_user, &["--allow", &alice.id, "--max-calls", "1"]);
    bob.wait_event("ready", READY);
    // Long enough that signalling has recovered well before alice hangs up.
    let mut caller = live.call(&alice, &["--room", &room, "--duration-s", "30"]);
    caller.wait_state("connected", CONNECT);
    bob.wait_state("connected", CONNECT);
    thread::sleep(Duration::from_secs(2));

    // Before the stop: the agents may notice while synapse.py is still waiting for the exit.
    let down_at = Instant::now();
    live.hs.stop();
    for p in [&mut caller, &mut bob] {
        p.wait_for_after(
            "homeserver reachable:false",
            down_at,
            Duration::from_secs(9),
            |v| is_reachability(v, false),
        );
    }
    thread::sleep(Duration::from_secs(10).saturating_sub(down_at.elapsed()));
    // restart() returns once Synapse answers; an agent's retry may get through before that.
    let restart_at = Instant::now();
    live.hs.restart();
    let up_at = Instant::now();

    for p in [&caller, &bob] {
        // Stats from 1 s into the outage to its end: 15 fps video and 50 packets/s audio.
        let during = stats_between(p, down_at + Duration::from_secs(1), up_at);
        assert!(
            during.len() >= 5,
            "{}: {} stats lines in the outage\n{}",
            p.name,
            during.len(),
            p.report()
        );
        let (first, last) = (&during[0].value, &during[during.len() - 1].value);
        for key in ["video_frames_received", "audio_frames_received"] {
            assert!(
                count(last, key) > count(first, key),
                "{}: {key} stalled with Synapse down: {first} -> {last}",
                p.name
            );
        }
        let seconds = during[during.len() - 1]
            .at
            .duration_since(during[0].at)
            .as_secs_f64();
        let gained = count(last, "frames_received") - count(first, "frames_received");
        assert!(
            gained as f64 >= 20.0 * seconds,
            "{}: only {gained} frames in {seconds:.1} s with Synapse down",
            p.name
        );
    }
    // The retry backoff is at most 8 s (+20 % jitter): the first retry after Synapse is back
    // must be seen to succeed, not only the first long-poll that returns with an event.
    for p in [&mut caller, &mut bob] {
        p.wait_for_after(
            "homeserver reachable:true",
            restart_at,
            Duration::from_secs(12),
            |v| is_reachability(v, true),
        );
        assert!(
            p.events_of("ended").is_empty(),
            "{}: the call ended early\n{}",
            p.name,
            p.report()
        );
    }

    assert_eq!(
        caller.wait_exit(Duration::from_secs(40)),
        0,
        "{}",
        caller.report()
    );
    assert_eq!(bob.wait_exit(EXIT), 0, "{}", bob.report());
    let theirs = ended(&bob);
    assert_eq!(
        (&theirs["reason"], &theirs["by"]),
        (&"user_hangup".into(), &"remote".into()),
        "{theirs}\n{}",
        bob.report()
    );
    assert_eq!(bob.summary()["hangup_reason"], "user_hangup");
    for p in [&caller, &bob] {
        assert_connected_with_media(p);
        let down = p.events_of("homeserver");
        let flips: Vec<&Value> = down.iter().map(|v| &v["reachable"]).collect();
        assert!(flips.contains(&&Value::Bool(false)), "{}: {down:?}", p.name);
        assert_eq!(
            flips.last(),
            Some(&&Value::Bool(true)),
            "{}: {down:?}",
            p.name
        );
    }
}

#[test]
fn js_sdk_calls_agent() {
    if !in_loopback_namespace("js_sdk_calls_agent") {
        return;
    }
    let live = Live::start("js_sdk_calls_agent");
    let alice = live.user("alice");
    let bob_user = live.user("bob");
    let room = live.hs.create_dm(&alice, &bob_user);
    let (bob, peer) =
        live.js_peer_calls_listener(&alice, &bob_user, &room, &["--require", "audio,video"]);

    assert_js_peer_got_media(&peer);
    assert_one_usermedia_feed(&peer.last_json());
    assert_connected_with_media(&bob);
    Live::print_setup_figures("js-sdk calls the hub, plain DM", &peer);
    let theirs = ended(&bob);
    assert_eq!(
        (&theirs["reason"], &theirs["by"]),
        (&"user_hangup".into(), &"remote".into()),
        "{theirs}"
    );
}

/// Element Web calling the hub: matrix-js-sdk with its Rust crypto in Chromium (its own
/// WebRTC) places a video call in an encrypted DM right after it logged in; the hub answers,
/// both decode the other's video and hear its audio, and the browser hangs up.
#[test]
fn a_browser_calls_the_hub_in_an_encrypted_dm() {
    if !in_loopback_namespace("a_browser_calls_the_hub_in_an_encrypted_dm") {
        return;
    }
    let live = Live::start("a_browser_calls_the_hub_in_an_encrypted_dm");
    let owner = live.user("owner");
    let hub_user = live.user("hub");
    let room = live.hs.create_encrypted_dm(&owner, &hub_user);
    let mut hub = live.listen(&hub_user, &["--allow", &owner.id, "--max-calls", "1"]);
    hub.wait_event("ready", READY);
    let mut browser = live.browser_peer(
        &owner,
        &[
            "--call",
            &room,
            "--e2ee",
            "--duration-s",
            "5",
            "--max-wait-s",
            "60",
        ],
    );
    let browser_exit = browser.wait_exit(Duration::from_secs(75));
    assert_eq!(browser_exit, 0, "{}\n{}", browser.report(), hub.report());
    assert_eq!(hub.wait_exit(EXIT), 0, "{}", hub.report());

    let r = browser.last_json();
    assert_eq!(
        (&r["room_encrypted"], &r["decryption_failures"]),
        (&true.into(), &0.into()),
        "{r}"
    );
    assert!(
        count(&r["rtp"]["inbound"]["video"], "frames_decoded") > 0
            && count(&r["rtp"]["inbound"]["audio"], "samples") > 0,
        "the browser got no video or audio from the hub: {r}"
    );
    assert_one_usermedia_feed(&r);
    assert_connected_with_media(&hub);
    let theirs = ended(&hub);
    assert_eq!(
        (&theirs["reason"], &theirs["by"]),
        (&"user_hangup".into(), &"remote".into()),
        "{theirs}"
    );
    eprintln!(
        "figures: browser calls the hub, encrypted DM: placing -> connected {} ms, -> first frame {} ms",
        count(&r["timings_ms"], "connected") - count(&r["timings_ms"], "placing"),
        count(&r["timings_ms"], "first_video_frame") - count(&r["timings_ms"], "placing"),
    );
}

#[test]
fn agent_calls_js_sdk() {
    if !in_loopback_namespace("agent_calls_js_sdk") {
        return;
    }
    let live = Live::start("agent_calls_js_sdk");
    let alice = live.user("alice");
    let bob_user = live.user("bob");
    let room = live.hs.create_dm(&alice, &bob_user);

    let mut peer = live.js_peer(&bob_user, &["--answer", "--max-wait-s", "60"]);
    peer.wait_stderr("waiting for an incoming call", READY);
    let mut caller = live.call(&alice, &["--room", &room, "--duration-s", "5"]);
    let caller_exit = caller.wait_exit(CONNECT + Duration::from_secs(20));
    let peer_exit = peer.wait_exit(EXIT);
    assert_eq!(caller_exit, 0, "{}\n{}", caller.report(), peer.report());
    assert_eq!(peer_exit, 0, "{}\n{}", peer.report(), caller.report());

    assert_connected_with_media(&caller);
    assert_js_peer_got_media(&peer);
    let r = peer.last_json();
    assert_eq!(r["hangup_reason"], "user_hangup", "{r}");
    assert_eq!(r["hangup_party"], "remote", "{r}");
}

#[test]
fn bad_password_exits_3() {
    if !in_loopback_namespace("bad_password_exits_3") {
        return;
    }
    let live = Live::start("bad_password_exits_3");
    let alice = live.user("alice");
    let bob = live.user("bob");
    let room = live.hs.create_dm(&alice, &bob);

    let mut caller = live.agent(&alice, "not-the-password", "call", &["--room", &room]);
    assert_eq!(caller.wait_exit(EXIT), 3, "{}", caller.report());
    let mut listener = live.agent(&alice, "not-the-password", "listen", &["--allow", &bob.id]);
    assert_eq!(listener.wait_exit(EXIT), 3, "{}", listener.report());
}

#[test]
fn unreachable_homeserver_exits_4() {
    if !in_loopback_namespace("unreachable_homeserver_exits_4") {
        return;
    }
    let dir = test_dir("unreachable_homeserver_exits_4");
    let url = format!("http://127.0.0.1:{}", closed_port());
    let mut caller = agent(
        &dir,
        "alice",
        &url,
        "@alice:localhost",
        "alice-pw",
        "call",
        &["--room", "!room"],
    );
    assert_eq!(
        caller.wait_exit(Duration::from_secs(60)),
        4,
        "{}",
        caller.report()
    );
}

#[test]
fn unknown_room_exits_5() {
    if !in_loopback_namespace("unknown_room_exits_5") {
        return;
    }
    let live = Live::start("unknown_room_exits_5");
    let alice = live.user("alice");
    let bob = live.user("bob");
    live.hs.create_dm(&alice, &bob);

    let mut caller = live.call(&alice, &["--room", "!nosuchroom:localhost"]);
    assert_eq!(
        caller.wait_exit(Duration::from_secs(30)),
        5,
        "{}",
        caller.report()
    );
}

#[test]
fn group_room_exits_5() {
    if !in_loopback_namespace("group_room_exits_5") {
        return;
    }
    let live = Live::start("group_room_exits_5");
    let alice = live.user("alice");
    let bob = live.user("bob");
    let carol = live.user("carol");
    let room = live.hs.create_room(&alice, &[&bob, &carol], false);

    let mut caller = live.call(&alice, &["--room", &room]);
    assert_eq!(
        caller.wait_exit(Duration::from_secs(30)),
        5,
        "{}",
        caller.report()
    );
}

#[test]
fn call_without_room_or_peer_exits_2() {
    let dir = test_dir("call_without_room_or_peer_exits_2");
    // Never reached: usage is checked before any request.
    let url = format!("http://127.0.0.1:{}", closed_port());
    let mut caller = agent(
        &dir,
        "alice",
        &url,
        "@alice:localhost",
        "alice-pw",
        "call",
        &[],
    );
    assert_eq!(caller.wait_exit(EXIT), 2, "{}", caller.report());
}

/// coturn answering STUN only on 127.0.0.1:`port`.
fn start_stun_server(dir: &std::path::Path, port: u16) -> Coturn {
    Coturn::start(
        dir,
        &[
            "--listening-ip=127.0.0.1".to_owned(),
            "--stun-only".to_owned(),
            format!("--listening-port={port}"),
        ],
    )
}

fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a probe socket");
    s.local_addr().expect("probe address").port()
}

#[test]
fn stun_server_gives_each_socket_its_reflexive_address() {
    if !in_loopback_namespace("stun_server_gives_each_socket_its_reflexive_address") {
        return;
    }
    let live = Live::start("stun_server_gives_each_socket_its_reflexive_address");
    let port = free_udp_port();
    let _coturn = start_stun_server(&live.dir, port);

    let bob = live.user("bob");
    let stun = format!("127.0.0.1:{port}");
    let mut listener = live.listen(&bob, &["--stun", &stun, "--allow-anyone"]);
    let learned = listener.wait_event("stun", Duration::from_secs(15));
    // On loopback there is no NAT: the server sees the socket's own address.
    assert_eq!(
        learned.value["local"],
        learned.value["mapped"],
        "{}",
        listener.report()
    );
    assert!(
        learned.value["local"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{}",
        listener.report()
    );
}

/// `GET path` on the homeserver with a bearer token; the JSON body.
fn get_json(base_url: &str, path: &str, token: &str) -> Value {
    use std::io::{Read, Write};
    let hostport = base_url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(hostport).expect("connect to Synapse");
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {hostport}\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .expect("send request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read answer");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("bad JSON from {path}: {e}: {text}"))
}

/// A listener restarted on the same device right after a call does not ring for that call.
/// Synapse answers a repeated /sync request from its cache for 2 minutes: a restart that
/// began with an initial sync got the last run's initial sync and then, one per request, its
/// later answers, so the invite came in a batch without its answer and hangup, rang, and
/// `listen` answered a call that had ended (`answered_elsewhere`) and exited before the real
/// next call. Each run's initial sync is now its own (`MatrixClient::set_run_id`).
#[test]
fn a_restarted_listener_does_not_ring_for_the_call_it_just_took() {
    if !in_loopback_namespace("a_restarted_listener_does_not_ring_for_the_call_it_just_took") {
        return;
    }
    let live = Live::start("a_restarted_listener_does_not_ring_for_the_call_it_just_took");
    let alice = live.user("alice");
    let bob = live.user("bob");
    let room = live.hs.create_dm(&alice, &bob);
    let (first, _) = live.js_peer_calls_listener(&alice, &bob, &room, &[]);
    let old_call = first.events_of("incoming");
    assert_eq!(old_call.len(), 1, "{}", first.report());

    // Within Synapse's 2 minutes, on the same device: the next call is the one that rings.
    let (second, peer) = live.js_peer_calls_listener(&alice, &bob, &room, &[]);
    let rang = second.events_of("incoming");
    assert_eq!(rang.len(), 1, "{}", second.report());
    assert_ne!(
        rang[0]["call_id"],
        old_call[0]["call_id"],
        "{}",
        second.report()
    );
    assert_eq!(
        rang[0]["call_id"],
        peer.last_json()["call_id"],
        "{}",
        second.report()
    );
    assert_connected_with_media(&second);
}

#[test]
fn restart_reuses_the_saved_device() {
    if !in_loopback_namespace("restart_reuses_the_saved_device") {
        return;
    }
    let live = Live::start("restart_reuses_the_saved_device");
    let bob = live.user("bob");
    let session_file = live.dir.join("bob-state").join("session.json");
    let mut devices_seen = Vec::new();
    for run in 0..2 {
        let mut listener = live.listen(&bob, &["--allow-anyone"]);
        listener.wait_event("ready", READY);
        listener.terminate();
        assert_eq!(
            listener.wait_exit(EXIT),
            0,
            "run {run}: {}",
            listener.report()
        );
        let session: Value = serde_json::from_str(
            &std::fs::read_to_string(&session_file).expect("session.json written"),
        )
        .expect("session.json is JSON");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&session_file)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(
                mode & 0o077,
                0,
                "session.json must be private, mode {mode:o}"
            );
        }
        devices_seen.push(session["device_id"].as_str().unwrap_or_default().to_owned());
        let devices = get_json(
            &live.hs.base_url,
            "/_matrix/client/v3/devices",
            session["access_token"].as_str().unwrap_or_default(),
        );
        // (Registering the user made a device of its own, without a display name.)
        let ours = devices["devices"].as_array().map(|d| {
            d.iter()
                .filter(|d| d["display_name"] == "call-assist")
                .count()
        });
        assert_eq!(
            ours,
            Some(1),
            "run {run}: one call-assist device, got {devices}"
        );
        // The password never reaches the logs.
        assert!(
            !listener.report().contains(&bob.password),
            "password in the output"
        );
    }
    assert_eq!(
        devices_seen[0], devices_seen[1],
        "the second run reused the device"
    );
    assert!(!devices_seen[0].is_empty());
}

#[test]
fn sigterm_hangs_up_the_active_call() {
    if !in_loopback_namespace("sigterm_hangs_up_the_active_call") {
        return;
    }
    let live = Live::start("sigterm_hangs_up_the_active_call");
    let alice = live.user("alice");
    let bob_user = live.user("bob");
    let room = live.hs.create_dm(&alice, &bob_user);
    let mut bob = live.listen(&bob_user, &["--allow", &alice.id, "--max-calls", "1"]);
    bob.wait_event("ready", READY);
    let mut caller = live.call(&alice, &["--room", &room, "--duration-s", "600"]);
    caller.wait_state("connected", CONNECT);
    caller.terminate();
    assert_eq!(caller.wait_exit(EXIT), 0, "{}", caller.report());
    assert_eq!(bob.wait_exit(EXIT), 0, "{}", bob.report());
    let end = ended(&bob);
    assert_eq!(end["reason"], "user_hangup", "{}", bob.report());
    assert_eq!(end["by"], "remote", "{}", bob.report());
}

#[test]
fn homeserver_turn_uri_with_a_host_name_is_probed_for_stun() {
    if !in_loopback_namespace("homeserver_turn_uri_with_a_host_name_is_probed_for_stun") {
        return;
    }
    let dir = test_dir("homeserver_turn_uri_with_a_host_name_is_probed_for_stun");
    let port = free_udp_port();
    let _coturn = start_stun_server(&dir, port);
    // A host name, as homeservers usually hand out: the shell resolves it, the core probes it.
    let uri = format!("turn:localhost:{port}?transport=udp");
    let hs = Synapse::start_with(&dir, &["--turn-uri", &uri, "--turn-secret", "s3cret"]);
    let bob = User {
        localpart: "bob".into(),
        id: hs.register("bob", "bob-pw"),
        password: "bob-pw".into(),
    };
    let mut listener = agent(
        &dir,
        "bob",
        &hs.base_url,
        &bob.id,
        &bob.password,
        "listen",
        &["--allow-anyone"],
    );
    let learned = listener.wait_event("stun", Duration::from_secs(20));
    assert_eq!(
        learned.value["local"],
        learned.value["mapped"],
        "{}",
        listener.report()
    );
    assert!(
        !listener.report().contains("s3cret"),
        "TURN secret in the output"
    );
}

/// The digits of the `dtmf` lines of `p`, in order.
fn dtmf_digits(p: &Proc) -> String {
    p.events_of("dtmf")
        .iter()
        .filter_map(|v| v["digit"].as_str().map(str::to_owned))
        .collect()
}

/// matrix-js-sdk sees our `m.call.dtmf` capability and the negotiated telephone-event, and
/// presses digits with `MatrixCall.sendDtmfDigit`. @roamhq/wrtc 0.10 has no RTCDTMFSender
/// (`sender.dtmf` is undefined), so js-sdk cannot send any: the peer reports why (Chromium
/// can: `serve.rs::a_browser_presses_the_pin_on_its_dial_pad_and_the_webhook_opens_the_door`). Should a
/// wrtc ever send them, the hub must report exactly those digits, in order, once each.
#[test]
fn js_sdk_sees_dtmf_support_and_presses_digits() {
    if !in_loopback_namespace("js_sdk_sees_dtmf_support_and_presses_digits") {
        return;
    }
    let live = Live::start("js_sdk_sees_dtmf_support_and_presses_digits");
    let alice = live.user("alice");
    let bob_user = live.user("bob");
    let room = live.hs.create_dm(&alice, &bob_user);
    let (bob, peer) = live.js_peer_calls_listener(&alice, &bob_user, &room, &["--dtmf", "1234#"]);

    let r = peer.last_json();
    assert_eq!(r["dtmf"]["opponent_supports_dtmf"], true, "{r}");
    assert_eq!(r["telephone_event"], true, "{r}");
    let sent = r["dtmf"]["sent"].as_str().unwrap_or_default();
    if sent.is_empty() {
        let why = r["dtmf"]["error"].as_str().unwrap_or_default();
        assert!(why.contains("Unable to find a track to send DTMF"), "{r}");
    }
    assert_eq!(dtmf_digits(&bob), sent, "{}", bob.report());
}

/// The agent presses digits (`call --dtmf`) in a call whose only audio is those digits
/// (`--audio none`): the js peer's audio RTP counts exactly their RFC 4733 packets (str0m
/// sends a 100 ms tone as updates at 20, 40, 60, 80 ms and three end packets at 100 ms), and
/// its stats name the codec of that audio `audio/telephone-event`. libwebrtc has no
/// receiver-side DTMF API, so this is the proof at the RTP level.
#[test]
fn agent_presses_digits_the_js_peer_receives_as_rtp() {
    if !in_loopback_namespace("agent_presses_digits_the_js_peer_receives_as_rtp") {
        return;
    }
    let live = Live::start("agent_presses_digits_the_js_peer_receives_as_rtp");
    let alice = live.user("alice");
    let bob_user = live.user("bob");
    let room = live.hs.create_dm(&alice, &bob_user);

    // --dtmf only to read opponentSupportsDTMF() from our invite (wrtc cannot press).
    let mut peer = live.js_peer(
        &bob_user,
        &["--answer", "--max-wait-s", "60", "--dtmf", "5"],
    );
    peer.wait_stderr("waiting for an incoming call", READY);
    let mut caller = live.call(
        &alice,
        &[
            "--room",
            &room,
            "--duration-s",
            "4",
            "--audio",
            "none",
            "--dtmf",
            "123",
            "--dtmf-after-s",
            "1",
        ],
    );
    let caller_exit = caller.wait_exit(CONNECT + Duration::from_secs(20));
    let peer_exit = peer.wait_exit(EXIT);
    assert_eq!(caller_exit, 0, "{}\n{}", caller.report(), peer.report());
    assert_eq!(peer_exit, 0, "{}\n{}", peer.report(), caller.report());

    let sent = caller.events_of("dtmf_sent");
    assert_eq!(sent.len(), 1, "{}", caller.report());
    assert_eq!(sent[0]["digits"], "123");
    let r = peer.last_json();
    assert_eq!(r["telephone_event"], true, "{r}");
    assert_eq!(r["dtmf"]["opponent_supports_dtmf"], true, "{r}");
    let audio = &r["rtp"]["inbound"]["audio"];
    assert_eq!(audio["codec"], "audio/telephone-event", "{r}");
    assert_eq!(
        count(audio, "packets"),
        3 * 7,
        "audio RTP the peer got: {r}"
    );
    // One 4-byte RFC 4733 report per packet.
    assert_eq!(count(audio, "bytes"), 3 * 7 * 4, "{r}");
}
