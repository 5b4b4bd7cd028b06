//! TURN for real: coturn (Debian package) with `use-auth-secret` matching Synapse's
//! `turn_shared_secret`.
//!
//! - `call-assist check` on loopback: login, credentials, STUN, allocation and a datagram
//!   through the relay both ways; a wrong secret gives a clear failure and exit 1.
//! - Two agents in two network namespaces made by the test (veth pairs to the test's own
//!   namespace, no forwarding between them): they reach Synapse and coturn but not each
//!   other, so the call connects only through the relay, and media flows both ways.
//!
//! Like the other live tests each re-runs itself inside `tests/e2e/loopback-only.sh`: the
//! namespaces and links it creates live inside that namespace and vanish with it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use call_assist_tests::live::*;

const SECRET: &str = "turn-test-secret";
const CHECK: Duration = Duration::from_secs(60);
const READY: Duration = Duration::from_secs(30);
const EXIT: Duration = Duration::from_secs(20);

fn free_udp_port(ip: &str) -> u16 {
    let s = std::net::UdpSocket::bind((ip, 0)).expect("bind a probe socket");
    s.local_addr().expect("probe address").port()
}

/// coturn with REST credentials (`use-auth-secret`) listening on `ips` at `port`.
fn start_coturn(dir: &Path, ips: &[&str], relay_ip: &str, port: u16) -> Coturn {
    let mut args = vec![
        "--use-auth-secret".to_owned(),
        format!("--static-auth-secret={SECRET}"),
        "--realm=call-assist.test".to_owned(),
        "--allow-loopback-peers".to_owned(),
        format!("--listening-port={port}"),
        format!("--relay-ip={relay_ip}"),
        "--min-port=49152".to_owned(),
        "--max-port=49300".to_owned(),
    ];
    args.extend(ips.iter().map(|ip| format!("--listening-ip={ip}")));
    Coturn::start(dir, &args)
}

fn sh(script: &str) {
    let out = Command::new("sh")
        .args(["-c", script])
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_proves_the_relay_and_names_a_wrong_secret() {
    if !in_loopback_namespace("check_proves_the_relay_and_names_a_wrong_secret") {
        return;
    }
    let dir = test_dir("check_proves_the_relay_and_names_a_wrong_secret");
    let port = free_udp_port("127.0.0.1");
    let _coturn = start_coturn(&dir, &["127.0.0.1"], "127.0.0.1", port);
    let uri = format!("turn:127.0.0.1:{port}?transport=udp");

    for (secret, expect_ok) in [(SECRET, true), ("not-the-secret", false)] {
        let sub = dir.join(if expect_ok { "good" } else { "bad" });
        std::fs::create_dir_all(&sub).expect("test dir");
        let hs = Synapse::start_with(&sub, &["--turn-uri", &uri, "--turn-secret", secret]);
        let live = Live {
            dir: sub.clone(),
            hs,
        };
        let alice = live.user("alice");
        // Only loopback: the namespace test beside this one adds veth links to this namespace.
        let mut check = live.agent(&alice, &alice.password, "check", &["--interface", "lo"]);
        let code = check.wait_exit(CHECK);
        let report = check.last_json();
        assert_eq!(report["event"], "check", "{}", check.report());
        let turn = report["turn"].as_array().cloned().unwrap_or_default();
        assert_eq!(turn.len(), 1, "one TURN server: {report}");
        if expect_ok {
            assert_eq!(code, 0, "{}", check.report());
            assert_eq!(report["ok"], true);
            assert!(
                turn[0]["relay"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("127.0.0.1:")),
                "{report}"
            );
            assert_eq!(turn[0]["outbound"], true, "{report}");
            assert_eq!(turn[0]["inbound"], true, "{report}");
            assert!(!report["stun"].as_array().unwrap().is_empty(), "{report}");
        } else {
            assert_eq!(code, 1, "{}", check.report());
            assert_eq!(report["ok"], false);
            assert!(turn[0]["relay"].is_null(), "{report}");
            let error = turn[0]["error"].as_str().unwrap_or_default();
            assert!(error.contains("401"), "the refusal is named: {report}");
        }
        // The TURN password never shows up, not even in the logs.
        let logs = std::fs::read_to_string(sub.join("alice.stderr")).unwrap_or_default();
        assert!(!logs.contains(SECRET), "the shared secret is in the logs");
        drop(live);
    }

    // Human-readable output names each part.
    let sub = dir.join("text");
    std::fs::create_dir_all(&sub).expect("test dir");
    let hs = Synapse::start_with(&sub, &["--turn-uri", &uri, "--turn-secret", SECRET]);
    let live = Live {
        dir: sub.clone(),
        hs,
    };
    let bob = live.user("bob");
    let mut cmd = Command::new(agent_binary());
    cmd.args([
        "check",
        "--homeserver",
        &live.hs.base_url,
        "--user",
        &bob.id,
    ])
    .args(["--allow-loopback", "--interface", "lo", "--state-dir"])
    .arg(sub.join("bob-state"))
    .env("CALL_ASSIST_PASSWORD", &bob.password);
    let out = run(&mut cmd, CHECK);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for part in [
        "login: ok",
        "stun: 127.0.0.1:",
        "relay 127.0.0.1:",
        "result: a relay path works",
    ] {
        assert!(text.contains(part), "{part:?} missing from:\n{text}");
    }
}

/// `call-assist SUBCOMMAND` in a new network namespace whose only way out is the veth
/// `ca0`: the command starts once the test has given `ca0` its address.
fn agent_in_namespace(
    dir: &Path,
    name: &str,
    homeserver: &str,
    user: &User,
    subcommand: &str,
    args: &[&str],
) -> Proc {
    let mut cmd = Command::new("unshare");
    cmd.args(["--net", "--", "sh", "-c"])
        .arg(
            "ip link set lo up; \
             while ! ip -4 addr show dev ca0 2>/dev/null | grep -q inet; do sleep 0.05; done; \
             exec \"$@\"",
        )
        .arg("agent-netns")
        .arg(agent_binary())
        .arg(subcommand)
        .args(["--homeserver", homeserver, "--user", &user.id])
        .args(["--json", "--interface", "ca0", "--state-dir"])
        .arg(dir.join(format!("{name}-state")))
        .args(args)
        .env("CALL_ASSIST_PASSWORD", &user.password)
        .env("NO_COLOR", "1")
        .env("CALL_ASSIST_LOG", "info");
    Proc::spawn(name, cmd, dir)
}

/// Moves `peer` (made in this namespace) into the namespace of `pid` as `ca0` with `addr`,
/// default route via `gateway`.
fn wire(pid: u32, peer: &str, addr: &str, gateway: &str) {
    // `unshare` makes the agent's namespace after it has started: until then `pid` is still
    // in ours, and under load (CI) the move raced it and the link stayed here.
    let ours = std::fs::read_link("/proc/self/ns/net").ok();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_link(format!("/proc/{pid}/ns/net")).ok() == ours
        && std::time::Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    sh(&format!("ip link set {peer} netns {pid}"));
    sh(&format!(
        "nsenter -t {pid} -n sh -c 'ip link set {peer} name ca0 && ip link set ca0 up && \
         ip route add default via {gateway} dev ca0 onlink && ip addr add {addr}/24 dev ca0'"
    ));
}

#[test]
fn agents_that_cannot_reach_each_other_call_through_coturn() {
    if !in_loopback_namespace("agents_that_cannot_reach_each_other_call_through_coturn") {
        return;
    }
    let dir = test_dir("agents_that_cannot_reach_each_other_call_through_coturn");
    // This namespace is the "internet": 10.77.1.1 towards A, 10.77.2.1 towards B, and it
    // does not forward between them.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "0").expect("disable forwarding");
    sh("ip link add ca-a type veth peer name ca-a-peer && ip addr add 10.77.1.1/24 dev ca-a && ip link set ca-a up");
    sh("ip link add ca-b type veth peer name ca-b-peer && ip addr add 10.77.2.1/24 dev ca-b && ip link set ca-b up");
    let port = free_udp_port("10.77.1.1");
    let _coturn = start_coturn(&dir, &["10.77.1.1", "10.77.2.1"], "10.77.1.1", port);
    let uri = format!("turn:10.77.1.1:{port}?transport=udp");
    let hs = Synapse::start_with(
        &dir,
        &["--turn-uri", &uri, "--turn-secret", SECRET, "--bind-all"],
    );
    let live = Live {
        dir: dir.clone(),
        hs,
    };
    let alice = live.user("alice");
    let bob = live.user("bob");
    let room = live.hs.create_dm(&alice, &bob);
    let hs_a = format!("http://10.77.1.1:{}", live.hs.port);
    let hs_b = format!("http://10.77.2.1:{}", live.hs.port);

    let mut listener = agent_in_namespace(
        &dir,
        "bob",
        &hs_b,
        &bob,
        "listen",
        &["--allow", &alice.id, "--max-calls", "1"],
    );
    wire(listener.pid(), "ca-b-peer", "10.77.2.2", "10.77.2.1");
    listener.wait_event("ready", READY);
    listener.wait_event("relay", READY);

    let mut caller = agent_in_namespace(
        &dir,
        "alice",
        &hs_a,
        &alice,
        "call",
        &["--room", &room, "--duration-s", "6", "--relay-only"],
    );
    wire(caller.pid(), "ca-a-peer", "10.77.1.2", "10.77.1.1");
    assert_eq!(
        caller.wait_exit(Duration::from_secs(60)),
        0,
        "{}",
        caller.report()
    );
    assert_eq!(listener.wait_exit(EXIT), 0, "{}", listener.report());

    // The caller offered only its relay: that is its side of the pair.
    assert!(
        caller
            .events_of("stats")
            .iter()
            .any(|s| s["local_candidate"] == "relay"),
        "{}",
        caller.report()
    );
    for p in [&caller, &listener] {
        let s = p.summary();
        assert_eq!(s["connected"], true, "{}: {s}\n{}", p.name, p.report());
        for key in ["video_frames_received", "audio_frames_received"] {
            assert!(
                count(&s, key) > 0,
                "{}: {key} is 0: {s}\n{}",
                p.name,
                p.report()
            );
        }
        let stats = p.events_of("stats");
        assert!(
            stats
                .iter()
                .any(|s| s["local_candidate"] == "relay" || s["remote_candidate"] == "relay"),
            "{}: media did not go through the relay: {stats:?}\n{}",
            p.name,
            p.report()
        );
        assert!(
            stats
                .iter()
                .all(|s| !(s["local_candidate"] == "host" && s["remote_candidate"] == "host")),
            "{}: a direct host/host pair worked, the namespaces are not apart",
            p.name
        );
    }
}
