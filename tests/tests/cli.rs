//! The command line as a user meets it: `--help` for every command, usage errors exit 2, and
//! logs without a terminal carry no colour codes.

use std::process::{Command, Stdio};
use std::time::Duration;

use call_assist_tests::live::agent_binary;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(agent_binary())
        .args(args)
        .env_remove("CALL_ASSIST_PASSWORD")
        .output()
        .expect("run call-assist");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_command_has_help_naming_its_flags() {
    for (command, flags) in [
        (
            "demo",
            &["--seed", "--loss", "--latency-ms", "--duration-s", "--json"][..],
        ),
        ("sweep", &["--seeds", "--first-seed"][..]),
        (
            "call",
            &[
                "--room",
                "--to",
                "--duration-s",
                "--homeserver",
                "--turn-user",
            ][..],
        ),
        (
            "listen",
            &["--allow", "--max-calls", "--record", "--forward-rtp"][..],
        ),
        ("check", &["--turn", "--relay-only", "--stun"][..]),
        ("serve", &["--config", "--json"][..]),
    ] {
        let (code, out, err) = run(&[command, "--help"]);
        assert_eq!(code, 0, "{command} --help: {err}");
        for f in flags {
            assert!(
                out.contains(f),
                "{command} --help does not name {f}:\n{out}"
            );
        }
    }
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("Exit codes"), "{out}");
}

#[test]
fn usage_errors_exit_2_and_say_why() {
    for (args, needle) in [
        (&["call", "--no-such-flag"][..], "--no-such-flag"),
        (&["listen", "--max-calls", "many"][..], "--max-calls"),
        (&["demo", "--loss", "2"][..], "0.0..=1.0"),
        (&["call", "--allow", "@a:b"][..], "--allow"),
        (&["serve"][..], "--config"),
        (&["nonsense"][..], "nonsense"),
        (&[][..], "Usage"),
        // A well-formed command line without the secret: the config check says so.
        (
            &[
                "listen",
                "--homeserver",
                "http://h",
                "--user",
                "@a:b",
                "--allow-anyone",
            ][..],
            "CALL_ASSIST_PASSWORD",
        ),
        // Who may call is a decision, never a default.
        (
            &["listen", "--homeserver", "http://h", "--user", "@a:b"][..],
            "--allow-anyone",
        ),
    ] {
        let (code, _, err) = run(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?} does not name {needle}: {err}"
        );
    }
}

#[test]
fn logs_into_a_pipe_have_no_colour_codes() {
    // A listener with an unreachable homeserver logs at once (its sockets); stderr is a pipe.
    let mut child = Command::new(agent_binary())
        .args([
            "listen",
            "--homeserver",
            "http://127.0.0.1:9",
            "--user",
            "@a:b",
            "--allow-loopback",
            "--interface",
            "lo",
            "--allow-anyone",
            "--state-dir",
        ])
        .arg(std::env::temp_dir().join(format!("ca-cli-{}", std::process::id())))
        .env("CALL_ASSIST_PASSWORD", "pw")
        .env("CALL_ASSIST_LOG", "call_assist=debug")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start listen");
    std::thread::sleep(Duration::from_secs(2));
    let _ = child.kill();
    let out = child.wait_with_output().expect("listen output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("receiving media on"), "no log line: {err}");
    assert!(!err.contains('\x1b'), "colour codes in a pipe: {err:?}");
}

/// Runs `args` with stdout closed from the start; (exit code, stderr).
fn with_stdout_closed(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut child = Command::new(agent_binary())
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start call-assist");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_closed_stdout_ends_demo_quietly_and_does_not_stop_a_listener() {
    let (code, err) = with_stdout_closed(&["demo", "--duration-s", "1"], &[]);
    assert_eq!(code, 0, "demo | head: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let (code, err) = with_stdout_closed(&["sweep", "--seeds", "1"], &[]);
    assert_ne!(code, 101, "sweep | head: {err}");
    assert!(!err.contains("panicked"), "{err}");
    // A listener whose JSON lines go nowhere keeps running until its own end: here the
    // homeserver stays unreachable, which is exit 4 after 10 s, not a panic at the first line.
    let state = std::env::temp_dir().join(format!("ca-cli-closed-{}", std::process::id()));
    let state = state.to_string_lossy().into_owned();
    let (code, err) = with_stdout_closed(
        &[
            "listen",
            "--homeserver",
            "http://127.0.0.1:9",
            "--user",
            "@a:b",
            "--json",
            "--allow-loopback",
            "--interface",
            "lo",
            "--allow-anyone",
            "--state-dir",
            &state,
        ],
        &[("CALL_ASSIST_PASSWORD", "pw")],
    );
    assert_eq!(code, 4, "listen --json | closed: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("stdout is closed"), "{err}");
}
