//! What one real 20 s call costs and how quickly its picture shows, through Synapse on
//! loopback, between call-assist and the matrix-js-sdk peer (`tests/interop/peer.mjs`:
//! libwebrtc through @roamhq/wrtc, 320x240@15 VP8 + a sine as Opus; the hub sends the test
//! clip + tone). JSON lines on stdout; nothing is asserted.
//!
//! For each of three calls it prints, per process, CPU seconds per call-second (user+system,
//! from `/proc/PID/stat`, while the call is connected) and peak RSS, and the js peer's time
//! from the invite to its first decoded video frame:
//! - `peer_calls_hub`: the js peer calls `call-assist listen` (placing -> first frame);
//! - `hub_calls_peer`: `call-assist call` calls the js peer (invite received -> first frame);
//! - `peer_calls_peer`: the js peer calls another js peer: the libwebrtc reference;
//! - `hub_calls_browser`: `call` calls matrix-js-sdk in headless Chromium
//!   (`tests/interop/browser-peer.mjs`, Element Web's stack; invite received -> first frame
//!   presented); Chromium's figures are those of its whole process tree;
//! - `browser_calls_browser`: Chromium calls Chromium: the browser reference.
//!
//! ```sh
//! tests/e2e/setup.sh && (cd tests/interop && npm ci)   # once (needs the registries)
//! cargo build --release -p call-assist                 # the binary measured (or CALL_ASSIST_BIN)
//! cargo bench -p call-assist-tests --bench live_call [-- --runs 3]
//! ```
//!
//! Like the live tests it re-runs itself inside `tests/e2e/loopback-only.sh` (a network
//! namespace with only `lo`) and starts its own Synapse there.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use call_assist_tests::live::{self, Live, Proc, User};
use serde_json::{json, Value};

const READY: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);
/// How long each call stays connected (the side that answers hangs up).
const CALL_SECONDS: u64 = 20;

/// User + system CPU time of a running process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// `root` and every process below it (Chromium runs as a browser, GPU, network and renderer
/// processes under the browser peer's node process).
fn process_tree(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 2..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((pid, ppid));
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

fn clock_ticks_per_second() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output();
    let ticks = out.ok().and_then(|o| String::from_utf8(o.stdout).ok());
    ticks.and_then(|t| t.trim().parse().ok()).unwrap_or(100.0)
}

fn peak_rss_kb(pid: u32) -> Option<u64> {
    call_assist::bench::rss_kb(&pid.to_string()).map(|(hwm, _)| hwm)
}

/// One process's figures over the connected window; with `tree`, of it and all its
/// descendants (CPU summed; memory as the largest sum of their current RSS, which counts
/// shared pages once per process).
#[derive(Default)]
struct Usage {
    tree: bool,
    at_connect: Option<(Instant, u64)>,
    last: Option<(Instant, u64)>,
    peak_kb: u64,
    /// Per process of a tree: its ticks at the last sample (a process that exits takes its
    /// ticks with it, so the tree's figure adds up each process's own growth).
    seen: std::collections::HashMap<u32, u64>,
    /// The tree's ticks since the first sample.
    grown: u64,
    most_processes: usize,
}

impl Usage {
    fn sample(&mut self, pid: u32, connected: bool) {
        let now = Instant::now();
        let t = if self.tree {
            let pids = process_tree(pid);
            self.most_processes = self.most_processes.max(pids.len());
            let rss: u64 = pids
                .iter()
                .filter_map(|p| call_assist::bench::rss_kb(&p.to_string()).map(|(_, now)| now))
                .sum();
            self.peak_kb = self.peak_kb.max(rss);
            let first = self.seen.is_empty();
            let mut seen = std::collections::HashMap::new();
            for p in pids {
                let Some(t) = cpu_ticks(p) else { continue };
                // A process born since the last sample grew all of its ticks since then.
                let before = self
                    .seen
                    .get(&p)
                    .copied()
                    .unwrap_or(if first { t } else { 0 });
                self.grown += t.saturating_sub(before);
                seen.insert(p, t);
            }
            self.seen = seen;
            Some(self.grown)
        } else {
            if let Some(kb) = peak_rss_kb(pid) {
                self.peak_kb = self.peak_kb.max(kb);
            }
            cpu_ticks(pid)
        };
        let Some(t) = t else { return };
        if connected {
            self.at_connect.get_or_insert((now, t));
            self.last = Some((now, t));
        }
    }

    fn figures(&self, tck: f64) -> Value {
        let per_s = match (self.at_connect, self.last) {
            (Some((t0, c0)), Some((t1, c1))) if t1 > t0 => {
                let s = t1.duration_since(t0).as_secs_f64();
                Some(((c1 - c0) as f64 / tck / s * 1000.0).round() / 1000.0)
            }
            _ => None,
        };
        let window = match (self.at_connect, self.last) {
            (Some((t0, _)), Some((t1, _))) => t1.duration_since(t0).as_secs_f64(),
            _ => 0.0,
        };
        let mut out = json!({
            "cpu_s_per_call_s": per_s,
            "window_s": (window * 10.0).round() / 10.0,
            "peak_rss_kb": self.peak_kb,
        });
        if self.tree {
            out["processes"] = json!(self.most_processes);
            out["peak_rss_kb_note"] =
                json!("sum of the processes' RSS (shared pages counted per process)");
        }
        out
    }
}

/// Samples both processes until `done`, counting CPU while `connected` says so.
fn watch(
    a: &mut Proc,
    b: &mut Proc,
    connected: impl Fn(&Proc, &Proc) -> bool,
    limit: Duration,
) -> (Usage, Usage) {
    // Browser peers are measured with their Chromium.
    let usage = |p: &Proc| Usage {
        tree: p.name.contains("-browser"),
        ..Usage::default()
    };
    let (mut ua, mut ub) = (usage(a), usage(b));
    let started = Instant::now();
    loop {
        let c = connected(a, b);
        ua.sample(a.pid(), c);
        ub.sample(b.pid(), c);
        let a_done = a.poll_exit().is_some();
        let b_done = b.poll_exit().is_some();
        if (a_done && b_done) || started.elapsed() > limit {
            break;
        }
        thread::sleep(POLL);
    }
    (ua, ub)
}

/// The hub's call is connected and not yet ended.
fn hub_connected(hub: &Proc) -> bool {
    let ev = hub.events();
    ev.iter().any(|e| live::is_state(&e.value, "connected"))
        && !ev
            .iter()
            .any(|e| e.value["event"] == "ended" || live::is_state(&e.value, "ended"))
}

/// The hub's wake-ups per second of connected call, by cause, from its first and last
/// `stats` lines (one a second while a call has media).
fn wakeups_per_s(hub: &Proc) -> Value {
    let stats: Vec<_> = hub
        .events()
        .into_iter()
        .filter(|e| e.value["event"] == "stats" && e.value["wakeups"].is_object())
        .collect();
    let (Some(first), Some(last)) = (stats.first(), stats.last()) else {
        return Value::Null;
    };
    let secs = last.at.duration_since(first.at).as_secs_f64();
    if secs <= 0.0 {
        return Value::Null;
    }
    let per_s = |k: &str| {
        let d = last.value["wakeups"][k].as_u64().unwrap_or(0)
            - first.value["wakeups"][k].as_u64().unwrap_or(0);
        (d as f64 / secs).round()
    };
    let rx = |e: &live::Event| e.value["packets_received"].as_u64().unwrap_or(0);
    let tx = |e: &live::Event| e.value["packets_sent"].as_u64().unwrap_or(0);
    json!({
        "agent_timer": per_s("agent_timer"), "shell_timer": per_s("shell_timer"),
        "socket": per_s("socket"), "message": per_s("message"),
        "datagrams_received": ((rx(last) - rx(first)) as f64 / secs).round(),
        "datagrams_sent": ((tx(last) - tx(first)) as f64 / secs).round(),
    })
}

/// ms from the js peer's timing mark `from` to its mark `to`.
fn peer_ms(peer: &Proc, from: &str, to: &str) -> Option<i64> {
    let r = peer.last_json();
    let t = &r["timings_ms"];
    Some(t[to].as_i64()? - t[from].as_i64()?)
}

/// One call under way between `a` and `b` (each named as its figures are): `connected` says
/// from `a` when the call is; `viewer` is the js peer whose first frame is timed from its mark
/// `from`. When `a` is the hub, its wake-ups are reported too.
struct Call {
    call: &'static str,
    a: (&'static str, Proc),
    b: (&'static str, Proc),
    connected: fn(&Proc) -> bool,
    viewer: Viewer,
    from: &'static str,
}

#[derive(Clone, Copy, PartialEq)]
enum Viewer {
    /// `a`, reported as the callee.
    A,
    /// `b`, reported as the peer.
    B,
}

impl Call {
    /// A call between the hub (`a`) and a peer (timed from its mark `from`).
    fn hub_and_peer(
        call: &'static str,
        hub: Proc,
        peer: (&'static str, Proc),
        from: &'static str,
    ) -> Self {
        Call {
            call,
            a: ("hub", hub),
            b: peer,
            connected: hub_connected,
            viewer: Viewer::B,
            from,
        }
    }
}

fn measure(c: Call, tck: f64) -> Value {
    let Call {
        call,
        a: (a_name, mut a),
        b: (b_name, mut b),
        connected,
        viewer,
        from,
    } = c;
    let limit = Duration::from_secs(CALL_SECONDS + 90);
    let (ua, ub) = watch(&mut a, &mut b, |a, _| connected(a), limit);
    let _ = a.wait_exit(Duration::from_secs(20));
    let _ = b.wait_exit(Duration::from_secs(20));
    let (v, who) = match viewer {
        Viewer::A => (&a, "callee"),
        Viewer::B => (&b, "peer"),
    };
    if ua.at_connect.is_none() || ub.at_connect.is_none() {
        eprintln!(
            "{call}: the call never connected\n{}\n{}",
            a.report(),
            b.report()
        );
    }
    let mut out = json!({"bench": "live_call", "call": call});
    out[a_name] = ua.figures(tck);
    out[b_name] = ub.figures(tck);
    out[format!("first_frame_at_{who}_ms")] = json!(peer_ms(v, from, "first_video_frame"));
    if a_name == "hub" {
        out["hub_wakeups_per_s"] = wakeups_per_s(&a);
    }
    out[format!("{who}_connected_ms")] = json!(peer_ms(v, from, "connected"));
    out
}

/// A js peer that answers the next call (it waits for the caller's hangup).
fn peer_calls_hub(live: &Live, hub: &User, caller: &User, room: &str) -> Call {
    let secs = CALL_SECONDS.to_string();
    let mut bob = live.listen(
        hub,
        &[
            "--interface",
            "lo",
            "--allow",
            &caller.id,
            "--max-calls",
            "1",
            "--duration-s",
            &secs,
        ],
    );
    bob.wait_event("ready", READY);
    let peer = live.js_peer(caller, &["--call", room, "--duration-s", "600"]);
    Call::hub_and_peer("peer_calls_hub", bob, ("js_peer", peer), "placing")
}

/// Which peer: matrix-js-sdk in Node (libwebrtc through @roamhq/wrtc) or in Chromium.
#[derive(Clone, Copy)]
enum Peer {
    Js,
    Browser,
}

impl Peer {
    fn start(self, live: &Live, user: &User, args: &[&str]) -> Proc {
        match self {
            Peer::Js => live.js_peer(user, args),
            Peer::Browser => live.browser_peer(user, args),
        }
    }

    fn answerer(self, live: &Live, user: &User) -> Proc {
        let args = ["--answer", "--duration-s", "600", "--max-wait-s", "120"];
        let mut p = self.start(live, user, &args);
        p.wait_stderr("waiting for an incoming call", READY);
        p
    }

    /// The call's name and the peer's, in the printed figures.
    fn names(self) -> (&'static str, &'static str, [&'static str; 3]) {
        match self {
            Peer::Js => (
                "hub_calls_peer",
                "peer_calls_peer",
                ["js_peer", "js_callee", "js_caller"],
            ),
            Peer::Browser => (
                "hub_calls_browser",
                "browser_calls_browser",
                ["browser", "browser_callee", "browser_caller"],
            ),
        }
    }
}

/// `call-assist call` calls the peer, which answers; the caller hangs up after CALL_SECONDS.
fn hub_calls(live: &Live, hub: &User, callee: &User, room: &str, peer: Peer) -> Call {
    let secs = CALL_SECONDS.to_string();
    let answerer = peer.answerer(live, callee);
    let bob = live.call(
        hub,
        &["--interface", "lo", "--room", room, "--duration-s", &secs],
    );
    let (call, _, [name, _, _]) = peer.names();
    Call::hub_and_peer(call, bob, (name, answerer), "incoming")
}

/// A peer calls a peer of the same kind: the reference for `hub_calls`.
fn peers_call(live: &Live, a: &User, b: &User, room: &str, peer: Peer) -> Call {
    let secs = CALL_SECONDS.to_string();
    let callee = peer.answerer(live, b);
    let caller = peer.start(live, a, &["--call", room, "--duration-s", &secs]);
    let (_, call, [_, callee_name, caller_name]) = peer.names();
    Call {
        call,
        a: (callee_name, callee),
        b: (caller_name, caller),
        // The callee's stderr says when it connected; the window is its connected marks.
        connected: |c| c.stderr_contains("-> connected") && !c.stderr_contains("-> ended"),
        viewer: Viewer::A,
        from: "incoming",
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this without: no Synapse then.
    if !args.iter().any(|a| a == "--bench" || a == "--runs") {
        println!(
            "{}",
            json!({"bench": "live_call", "skipped": "run with cargo bench"})
        );
        return;
    }
    live::bench_in_loopback_namespace(&args);
    let runs: usize = args
        .iter()
        .skip_while(|a| *a != "--runs")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let only: Option<&str> = args
        .iter()
        .skip_while(|a| *a != "--only")
        .nth(1)
        .map(String::as_str);
    let tck = clock_ticks_per_second();
    let live = Live::start("bench_live_call");
    let hub = live.user("hub");
    let js = live.user("js");
    let js2 = live.user("js2");
    // Chromium (matrix-js-sdk with the browser's WebRTC, as Element Web): the issue's "a
    // browser calls a browser" reference, and the hub calling that browser.
    let web = live.user("web");
    let web2 = live.user("web2");
    for _ in 0..runs {
        // Fresh rooms per run: a peer that logs in again syncs the last run's call events
        // (its invite, answer and select_answer) in an old room, and took them for its own.
        let room = live.hs.create_dm(&js, &hub);
        let js_room = live.hs.create_dm(&js, &js2);
        let web_room = live.hs.create_dm(&hub, &web);
        let webs_room = live.hs.create_dm(&web2, &web);
        if only.is_none_or(|o| o == "peer_calls_hub") {
            println!("{}", measure(peer_calls_hub(&live, &hub, &js, &room), tck));
        }
        if only.is_none_or(|o| o == "hub_calls_peer") {
            println!(
                "{}",
                measure(hub_calls(&live, &hub, &js, &room, Peer::Js), tck)
            );
        }
        if only.is_none_or(|o| o == "peer_calls_peer") {
            println!(
                "{}",
                measure(peers_call(&live, &js, &js2, &js_room, Peer::Js), tck)
            );
        }
        if only.is_none_or(|o| o == "hub_calls_browser") {
            println!(
                "{}",
                measure(hub_calls(&live, &hub, &web, &web_room, Peer::Browser), tck)
            );
        }
        if only.is_none_or(|o| o == "browser_calls_browser") {
            println!(
                "{}",
                measure(
                    peers_call(&live, &web2, &web, &webs_room, Peer::Browser),
                    tck
                )
            );
        }
    }
}
