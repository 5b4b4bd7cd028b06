//! `cargo bench -p call-assist [-- --quick] [-- --only NAME]`: the figures of README
//! "Performance", one JSON object per line on stdout. Names: media, cpu_1080p, callgrind,
//! setup, memory, binary. Nothing is asserted: this prints, people and CI read.
//!
//! `callgrind` re-runs this binary under `valgrind --tool=callgrind` (when valgrind is there)
//! with `--callgrind-child PATH FRAMES`, collecting only inside the sender's or the
//! receiver's turns of the media loop: instruction counts do not move with a noisy machine.

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use call_assist::bench::{self, heap, Path};
use serde_json::{json, Value};

/// Counts allocations and bytes in use for `call_assist::bench::heap`.
struct Counting;

// SAFETY: every call is forwarded to `System` unchanged; the counters are plain atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        heap::ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        heap::LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        heap::ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        heap::LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        heap::LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        heap::ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        heap::LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// This thread's CPU time (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`; glibc is linked anyway,
/// so no crate for one call).
fn thread_cpu() -> Duration {
    #[repr(C)]
    struct Timespec {
        tv_sec: std::ffi::c_long,
        tv_nsec: std::ffi::c_long,
    }
    extern "C" {
        fn clock_gettime(clock: std::ffi::c_int, tp: *mut Timespec) -> std::ffi::c_int;
    }
    const CLOCK_THREAD_CPUTIME_ID: std::ffi::c_int = 3;
    let mut t = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid, writable timespec for the duration of the call.
    if unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut t) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

struct Counts {
    /// Frames of the media loops (30 per second of video).
    frames: u64,
    warmup: u64,
    callgrind_frames: u64,
    memory_late: Duration,
}

fn emit(v: Value) {
    println!("{v}");
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

fn path_name(p: Path) -> &'static str {
    match p {
        Path::Core => "core",
        Path::Bare => "bare_str0m",
    }
}

fn media(c: &Counts) {
    let mut pps = Vec::new();
    let mut allocs = Vec::new();
    for path in [Path::Core, Path::Bare] {
        let f = bench::media_loop(path, c.warmup, c.frames, thread_cpu);
        let packets = f.rtp_packets.max(1) as f64;
        emit(json!({
            "bench": "media", "path": path_name(path), "video": "synthetic 1080p30 H.264",
            "bitrate_bps": f.bitrate_bps, "frames": f.frames, "rtp_packets": f.rtp_packets,
            "datagrams": f.datagrams, "frames_received": f.received.video_frames,
            "tx_packets_per_s": f.tx_packets_per_s().round(),
            "loop_packets_per_s": f.loop_packets_per_s().round(),
            "tx_allocations_per_packet": round(f.tx_allocations as f64 / packets, 2),
            "rx_allocations_per_packet": round(f.rx_allocations as f64 / packets, 2),
        }));
        // CPU per second of video: the sender (what a hub sending its camera spends), the
        // receiver, and both (a hub forwarding the stream receives and sends it).
        let per_s = |ns: u64| ns as f64 / 1e6 / f.video_seconds;
        emit(json!({
            "bench": "cpu_1080p", "path": path_name(path), "bitrate_bps": f.bitrate_bps,
            "video_seconds": f.video_seconds,
            "tx_cpu_ms_per_video_s": round(per_s(f.tx_ns), 2),
            "rx_cpu_ms_per_video_s": round(per_s(f.rx_ns), 2),
            "forward_cpu_ms_per_video_s": round(per_s(f.tx_ns + f.rx_ns), 2),
            "forward_core_pct": round(per_s(f.tx_ns + f.rx_ns) / 10.0, 2),
        }));
        pps.push((f.tx_packets_per_s(), f.loop_packets_per_s()));
        allocs.push((
            f.tx_allocations as f64 / packets,
            f.rx_allocations as f64 / packets,
        ));
    }
    if let [(core_tx, core_loop), (bare_tx, bare_loop)] = pps[..] {
        emit(json!({
            "bench": "media_ratio",
            "tx_core_over_bare": round(core_tx / bare_tx, 3),
            "loop_core_over_bare": round(core_loop / bare_loop, 3),
        }));
    }
    // The core's own heap allocations per packet: what it adds to str0m's (the bare pair's).
    if let [(core_tx, core_rx), (bare_tx, bare_rx)] = allocs[..] {
        emit(json!({
            "bench": "media_allocations",
            "str0m_tx_per_packet": round(bare_tx, 2),
            "str0m_rx_per_packet": round(bare_rx, 2),
            "own_tx_per_packet": round(core_tx - bare_tx, 2),
            "own_rx_per_packet": round(core_rx - bare_rx, 2),
        }));
    }
}

/// The child under valgrind: one pair, warm-up and measured frames, packets on stdout.
fn callgrind_child(path: &str, frames: u64) {
    let path = if path == "core" {
        Path::Core
    } else {
        Path::Bare
    };
    let f = bench::media_loop(path, 0, frames, bench::wall_clock);
    println!(
        "{}",
        json!({"rtp_packets": f.rtp_packets, "frames": f.frames})
    );
}

fn callgrind(c: &Counts) {
    if Command::new("valgrind").arg("--version").output().is_err() {
        emit(json!({"bench": "callgrind", "skipped": "valgrind not found"}));
        return;
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return emit(json!({"bench": "callgrind", "skipped": e.to_string()})),
    };
    for path in ["core", "bare_str0m"] {
        let mut row = json!({"bench": "callgrind", "path": path});
        for side in ["tx", "rx"] {
            let out = std::env::temp_dir().join(format!(
                "call-assist-callgrind-{}-{path}-{side}.out",
                std::process::id()
            ));
            let run = Command::new("valgrind")
                .args(["--tool=callgrind", "--collect-atstart=no"])
                .arg(format!("--toggle-collect=*callgrind_{side}_section*"))
                .arg(format!("--callgrind-out-file={}", out.display()))
                .arg(&exe)
                .args(["--callgrind-child", path, &c.callgrind_frames.to_string()])
                .output();
            let packets = run.as_ref().ok().and_then(|o| {
                let s = String::from_utf8_lossy(&o.stdout);
                let v: Value = serde_json::from_str(s.lines().last()?).ok()?;
                v["rtp_packets"].as_u64()
            });
            let instructions = std::fs::read_to_string(&out).ok().and_then(|s| {
                s.lines()
                    .find_map(|l| {
                        l.strip_prefix("totals:")
                            .or_else(|| l.strip_prefix("summary:"))
                    })
                    .and_then(|v| v.trim().parse::<u64>().ok())
            });
            let _ = std::fs::remove_file(&out);
            match (packets, instructions) {
                (Some(p), Some(i)) if p > 0 => {
                    row[format!("{side}_instructions_per_packet")] = json!(i / p);
                    row["rtp_packets"] = json!(p);
                }
                _ => {
                    let err = run
                        .map(|o| {
                            String::from_utf8_lossy(&o.stderr)
                                .lines()
                                .last()
                                .unwrap_or("")
                                .to_owned()
                        })
                        .unwrap_or_else(|e| e.to_string());
                    row[format!("{side}_error")] = json!(err);
                }
            }
        }
        emit(row);
    }
}

fn setup() {
    for rtt in [10, 50, 200, 600] {
        let f = bench::setup_times(Duration::from_millis(rtt), 1);
        let mut v = serde_json::to_value(&f).unwrap_or_default();
        v["bench"] = json!("setup");
        emit(v);
    }
}

fn memory(c: &Counts) {
    let f = bench::memory_over_time(Duration::from_secs(60), c.memory_late, 1);
    let mut v = serde_json::to_value(&f).unwrap_or_default();
    v["bench"] = json!("memory");
    emit(v);
}

/// Size of the `call-assist` binary (`$CALL_ASSIST_BIN`, else the one cargo built for this
/// bench) as it is and stripped.
fn binary() {
    let bin = std::env::var("CALL_ASSIST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_call-assist").to_owned());
    let size = |p: &str| std::fs::metadata(p).map(|m| m.len()).ok();
    let stripped =
        std::env::temp_dir().join(format!("call-assist-stripped-{}", std::process::id()));
    let stripped_size = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(&bin)
        .status()
        .ok()
        .filter(|s| s.success())
        .and_then(|_| size(&stripped.to_string_lossy()));
    let _ = std::fs::remove_file(&stripped);
    emit(json!({
        "bench": "binary", "path": bin, "bytes": size(&bin), "stripped_bytes": stripped_size,
    }));
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--callgrind-child") {
        let path = args.get(i + 1).map_or("core", String::as_str);
        let frames = args.get(i + 2).and_then(|f| f.parse().ok()).unwrap_or(300);
        return callgrind_child(path, frames);
    }
    // `cargo bench` passes --bench; without it (`cargo test --all-targets`) a short run.
    let quick = args.iter().any(|a| a == "--quick") || !args.iter().any(|a| a == "--bench");
    let only: Vec<&str> = args
        .windows(2)
        .filter(|w| w[0] == "--only")
        .map(|w| w[1].as_str())
        .collect();
    let c = if quick {
        Counts {
            frames: 60,
            warmup: 10,
            callgrind_frames: 30,
            memory_late: Duration::from_secs(120),
        }
    } else {
        Counts {
            frames: 1800,
            warmup: 60,
            callgrind_frames: 300,
            memory_late: Duration::from_secs(3600),
        }
    };
    let want = |name: &str| only.is_empty() || only.contains(&name);
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines().find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
    });
    emit(json!({
        "bench": "machine", "arch": std::env::consts::ARCH, "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "quick": quick,
    }));
    if want("media") || want("cpu_1080p") {
        media(&c);
    }
    if want("callgrind") {
        callgrind(&c);
    }
    if want("setup") {
        setup();
    }
    if want("memory") {
        memory(&c);
    }
    if want("binary") {
        binary();
    }
}
