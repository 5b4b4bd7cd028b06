//! Peak RSS of a live `call-assist listen` on loopback: during one call, one call in an
//! end-to-end encrypted DM, and 10 calls at once in the one process. JSON lines on stdout; nothing is asserted.
//!
//! ```sh
//! tests/e2e/setup.sh                          # Synapse venv, once (needs the network)
//! cargo build --release -p call-assist        # the binary measured (or set CALL_ASSIST_BIN)
//! cargo bench -p call-assist-tests --bench live_rss
//! ```
//!
//! Like the live tests it re-runs itself inside `tests/e2e/loopback-only.sh` (a network
//! namespace with only `lo`), starts its own Synapse there and passes `--interface lo`.

use std::thread;
use std::time::{Duration, Instant};

use call_assist_tests::live::{self, Live, Proc, User};
use serde_json::json;

const READY: Duration = Duration::from_secs(30);
const CONNECT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);
/// How long each call stays connected (the listener hangs up).
const CALL_SECONDS: u64 = 15;

/// `VmHWM` and `VmRSS` of a running process, kB.
fn rss_kb(pid: u32) -> Option<(u64, u64)> {
    call_assist::bench::rss_kb(&pid.to_string())
}

/// Calls from `callers` to one listener, all at once; its peak RSS while they run.
fn calls(live: &Live, listener: &User, callers: &[(User, String)]) -> serde_json::Value {
    let mut args: Vec<String> = vec!["--interface".into(), "lo".into()];
    for (c, _) in callers {
        args.extend(["--allow".into(), c.id.clone()]);
    }
    args.extend([
        "--max-calls".into(),
        callers.len().to_string(),
        "--duration-s".into(),
        CALL_SECONDS.to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut bob = live.listen(listener, &args);
    bob.wait_event("ready", READY);
    let idle = rss_kb(bob.pid());
    let mut procs: Vec<Proc> = callers
        .iter()
        .map(|(c, room)| {
            live.call(
                c,
                &["--interface", "lo", "--room", room, "--duration-s", "600"],
            )
        })
        .collect();
    let started = Instant::now();
    let mut peak = 0;
    let mut caller_peak = 0;
    let mut rss_all_connected = None;
    loop {
        if let Some((hwm, rss)) = rss_kb(bob.pid()) {
            peak = peak.max(hwm);
            let connected = bob
                .events()
                .iter()
                .filter(|e| live::is_state(&e.value, "connected"))
                .count();
            if connected == callers.len() && rss_all_connected.is_none() {
                rss_all_connected = Some(rss);
            }
        }
        for p in &procs {
            if let Some((hwm, _)) = rss_kb(p.pid()) {
                caller_peak = caller_peak.max(hwm);
            }
        }
        if bob.poll_exit().is_some()
            || started.elapsed() > CONNECT + Duration::from_secs(CALL_SECONDS + 30)
        {
            break;
        }
        thread::sleep(POLL);
    }
    let code = bob.wait_exit(Duration::from_secs(30));
    let connected = bob
        .events()
        .iter()
        .filter(|e| live::is_state(&e.value, "connected"))
        .count();
    for p in &mut procs {
        let _ = p.wait_exit(Duration::from_secs(30));
    }
    json!({
        "bench": "live_rss", "calls": callers.len(), "connected": connected,
        "listener_exit": code,
        "listener_idle_rss_kb": idle.map(|(_, rss)| rss),
        "listener_rss_kb_all_connected": rss_all_connected,
        "listener_peak_rss_kb": peak,
        "caller_peak_rss_kb": caller_peak,
        "call_seconds": CALL_SECONDS,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this without: no Synapse then.
    if !args.iter().any(|a| a == "--bench" || a == "--calls") {
        println!(
            "{}",
            json!({"bench": "live_rss", "skipped": "run with cargo bench"})
        );
        return;
    }
    // Same as the live tests: everything runs in a namespace with only `lo`.
    live::bench_in_loopback_namespace(&args);
    let many: usize = args
        .iter()
        .skip_while(|a| *a != "--calls")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(10);
    let live = Live::start("bench_live_rss");
    let bob = live.user("bob");
    let callers: Vec<(User, String)> = (0..many)
        .map(|i| {
            let c = live.user(&format!("caller{i}"));
            let room = live.hs.create_dm(&c, &bob);
            (c, room)
        })
        .collect();
    println!("{}", calls(&live, &bob, &callers[..1]));
    // The same one call in an end-to-end encrypted DM (both sides call-assist).
    let e2ee_caller = live.user("caller_e2ee");
    let room = live.hs.create_encrypted_dm(&e2ee_caller, &bob);
    let mut encrypted = calls(&live, &bob, &[(e2ee_caller, room)]);
    encrypted["encrypted_dm"] = json!(true);
    println!("{encrypted}");
    println!("{}", calls(&live, &bob, &callers));
}
