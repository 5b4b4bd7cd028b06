//! The hub's own speaker through ALSA, with no sound card and no kernel module: the test
//! writes an ALSA config (`ALSA_CONFIG_PATH`, the whole configuration alsa-lib reads) whose
//! `hubspeaker` PCM is alsa-lib's `file` plugin over a `null` slave, so what the hub plays
//! lands in a raw file (s16le, 8 kHz mono) the test analyses.
//!
//! Needs `libasound2` (and `libasound2-dev` to build), `tests/e2e/setup.sh` (Synapse venv),
//! `npm ci` in tests/interop and `cargo build -p call-assist`. Run:
//!
//! ```sh
//! tests/e2e/loopback-only.sh cargo test -p call-assist-tests --test alsa -- --test-threads=2
//! ```

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use call_assist_tests::live::*;
use serde_json::json;

/// Logged in and through the first sync.
const READY: Duration = Duration::from_secs(30);
/// From placing a call to connected with media flowing, on loopback.
const CONNECT: Duration = Duration::from_secs(40);

/// CPU ticks (user + system) of the hub's thread named `name` so far.
fn thread_cpu_ticks(pid: u32, name: &str) -> u64 {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).expect("the hub's threads");
    for t in tasks.flatten() {
        let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        return f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    }
    panic!("the hub has no thread named {name:?}");
}

/// A test's Synapse, `alice` and `hub` in a DM, the test's ALSA configuration (`hubspeaker`
/// writes `speaker.raw` in the test's directory; `hubmic` reads `mic.raw`), `prepare` run on
/// that directory, and a hub `listen`ing to alice (one call at a time) with `args`, through
/// its first sync.
struct AlsaHub {
    live: Live,
    alice: User,
    room: String,
    speaker: PathBuf,
}

impl AlsaHub {
    /// The js peer (its microphone a 440 Hz sine) calls the hub for `seconds`, with `args`
    /// for peer.mjs.
    fn call(&self, seconds: &str, args: &[&str]) -> Proc {
        let mut all = vec![
            "--call",
            &self.room,
            "--duration-s",
            seconds,
            "--max-wait-s",
            "60",
        ];
        all.extend(args);
        self.live.js_peer(&self.alice, &all)
    }
}

/// `None` outside the test's loopback namespace (the test re-ran itself inside one).
fn alsa_hub(name: &str, prepare: impl FnOnce(&Path), args: &[&str]) -> Option<(AlsaHub, Proc)> {
    if !in_loopback_namespace(name) {
        return None;
    }
    let live = Live::start(name);
    let alice = live.user("alice");
    let hub_user = live.user("hub");
    let room = live.hs.create_dm(&alice, &hub_user);
    let speaker = live.dir.join("speaker.raw");
    let conf = alsa_config(&live.dir, &speaker);
    prepare(&live.dir);
    let conf_s = conf.display().to_string();
    let mut all = vec!["--allow", &alice.id, "--max-calls", "1"];
    all.extend(args);
    let mut hub = live.listen_with_env(&hub_user, &all, &[("ALSA_CONFIG_PATH", &conf_s)]);
    hub.wait_event("ready", READY);
    Some((
        AlsaHub {
            live,
            alice,
            room,
            speaker,
        },
        hub,
    ))
}

/// The js peer's call ran its course and the hub exited cleanly after it.
fn both_exit_cleanly(peer: &mut Proc, hub: &mut Proc) {
    assert_eq!(
        peer.wait_exit(Duration::from_secs(75)),
        0,
        "{}\n{}",
        peer.report(),
        hub.report()
    );
    assert_eq!(
        hub.wait_exit(Duration::from_secs(20)),
        0,
        "{}",
        hub.report()
    );
}

#[test]
fn a_missing_speaker_device_is_a_start_up_error() {
    let dir = test_dir("a_missing_speaker_device_is_a_start_up_error");
    let conf = alsa_config(&dir, &dir.join("unused.raw"));
    let out = run(
        Command::new(agent_binary())
            .args(["listen", "--homeserver", "http://127.0.0.1:9"])
            .args([
                "--user",
                "@hub:localhost",
                "--allow-anyone",
                "--allow-loopback",
                "--state-dir",
            ])
            .arg(dir.join("state"))
            .args(["--speaker", "no-such-speaker"])
            .env("CALL_ASSIST_PASSWORD", "x")
            .env("ALSA_CONFIG_PATH", &conf),
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("error: --speaker: cannot open \"no-such-speaker\""),
        "{stderr}"
    );
}

#[test]
fn the_hub_speaker_plays_the_callers_sine() {
    speaker_plays_the_callers_sine("the_hub_speaker_plays_the_callers_sine", "");
}

/// The Opus decoder (cargo feature `opus`): a peer that offers Opus alone is heard too.
#[test]
fn the_hub_speaker_plays_an_opus_only_callers_sine() {
    speaker_plays_the_callers_sine("the_hub_speaker_plays_an_opus_only_callers_sine", "opus");
}

/// The js peer (its microphone a 440 Hz sine, offering only `audio_codec` when given) calls a
/// hub with `--speaker`; the device gets the sine at 8000 samples a second.
fn speaker_plays_the_callers_sine(name: &str, audio_codec: &str) {
    let Some((t, mut hub)) = alsa_hub(name, |_| {}, &["--speaker", "hubspeaker"]) else {
        return;
    };
    let speaker = &t.speaker;
    let mut peer = t.call("12", &["--audio-codec", audio_codec]);
    // The hub's answer puts PCMU first, so a peer that has G.711 sends it.
    let playing = hub.wait_for("the call at the speaker", CONNECT, |v| {
        v["event"] == "speaker" && v["state"] == "playing"
    });
    let want = if audio_codec == "opus" {
        "Opus"
    } else {
        "Pcmu"
    };
    assert_eq!(playing.value["codec"], json!(want), "{}", playing.value);

    // CPU of the speaker's thread (decoded samples in, the device written) over 5 s.
    thread::sleep(Duration::from_secs(1));
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let (t0, c0) = (Instant::now(), thread_cpu_ticks(hub.pid(), "speaker"));
    let (h0, s0) = (
        cpu_ticks(hub.pid()),
        fs::metadata(speaker).map_or(0, |m| m.len()),
    );
    thread::sleep(Duration::from_secs(5));
    let secs = t0.elapsed().as_secs_f64();
    let thread_ms = (thread_cpu_ticks(hub.pid(), "speaker") - c0) as f64 * 1000.0 / ticks_per_s;
    let hub_ms = (cpu_ticks(hub.pid()) - h0) as f64 * 1000.0 / ticks_per_s;
    let played = fs::metadata(speaker).map_or(0, |m| m.len()) - s0;
    println!(
        "figure: hub speaker ({want}): speaker thread {:.1} ms CPU per second of playback; whole hub \
         (call, video, tone, speaker) {:.1} ms/s; {:.0} samples/s reached the device",
        thread_ms / secs,
        hub_ms / secs,
        played as f64 / 2.0 / secs
    );
    // The device is fed at its rate: 8000 samples a second, give or take a period's jitter.
    let rate = played as f64 / 2.0 / secs;
    assert!((7000.0..9000.0).contains(&rate), "{rate} samples/s");
    assert_hears_the_sine(speaker, &hub);
    both_exit_cleanly(&mut peer, &mut hub);
}

/// `seconds` of a `freq` Hz sine as raw s16le, 8 kHz mono.
fn sine_file(path: &Path, freq: f64, seconds: usize) {
    let bytes: Vec<u8> = (0..seconds * 8000)
        .flat_map(|i| {
            let t = i as f64 / 8000.0;
            let v = (8000.0 * (2.0 * std::f64::consts::PI * freq * t).sin()) as i16;
            v.to_le_bytes()
        })
        .collect();
    fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

#[test]
fn the_hub_microphone_reaches_the_caller() {
    microphone_reaches_the_caller("the_hub_microphone_reaches_the_caller", "");
}

/// The Opus encoder (cargo feature `opus`): a peer that offers Opus alone hears the microphone.
#[test]
fn the_hub_microphone_reaches_an_opus_only_caller() {
    microphone_reaches_the_caller("the_hub_microphone_reaches_an_opus_only_caller", "opus");
}

/// A hub whose microphone records a 1 kHz sine (not the hub's 440 Hz tone: what the peer
/// hears is the microphone) is called by the js peer (offering only `audio_codec` when given).
fn microphone_reaches_the_caller(name: &str, audio_codec: &str) {
    let Some((t, mut hub)) = alsa_hub(
        name,
        |dir| sine_file(&dir.join("mic.raw"), 1000.0, 60),
        &["--video", "none", "--audio", "alsa:hubmic"],
    ) else {
        return;
    };
    let mut peer = t.call("6", &["--require", "audio", "--audio-codec", audio_codec]);
    both_exit_cleanly(&mut peer, &mut hub);
    let r = peer.last_json();
    let packets = r["rtp"]["inbound"]["audio"]["packets"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        packets >= 150,
        "{packets} audio packets reached the peer: {r}"
    );
    let codec = r["rtp"]["inbound"]["audio"]["codec"].as_str().unwrap_or("");
    let want = if audio_codec == "opus" {
        "opus"
    } else {
        "pcmu"
    };
    assert!(
        codec.to_lowercase().ends_with(want),
        "the peer got {codec}: {r}"
    );
    let tone = &r["audio_tone"];
    eprintln!("peer heard ({codec}): {tone}");
    let share = |f: &str| tone["shares"][f].as_f64().unwrap_or(0.0);
    assert!(
        tone["rms"].as_f64().unwrap_or(0.0) > 300.0,
        "silence at the peer: {tone}"
    );
    assert!(share("1000") > 0.5, "not the microphone's 1 kHz: {tone}");
    assert!(
        share("440") < 0.05,
        "the hub's tone, not the microphone: {tone}"
    );
}

/// A FIFO at `path` read by a thread, as a sound card the test can unplug: `unplug` closes
/// the read end (the hub's next write fails as a USB device's does), `replug` opens it again.
struct Fifo {
    plugged: Arc<AtomicBool>,
    /// Everything read, in order.
    read: Arc<Mutex<Vec<u8>>>,
    /// Each read: the wall-clock time it returned (ms since the Unix epoch) and how many bytes
    /// had been read by then.
    reads: Arc<Mutex<Vec<(u128, usize)>>>,
}

impl Fifo {
    fn new(path: &Path) -> Fifo {
        let status = Command::new("mkfifo")
            .arg(path)
            .status()
            .expect("mkfifo runs");
        assert!(status.success(), "mkfifo {}", path.display());
        let plugged = Arc::new(AtomicBool::new(true));
        let read = Arc::new(Mutex::new(Vec::new()));
        let reads = Arc::new(Mutex::new(Vec::new()));
        let (p, r, rs, path) = (
            plugged.clone(),
            read.clone(),
            reads.clone(),
            path.to_owned(),
        );
        thread::spawn(move || loop {
            while !p.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(10));
            }
            // Blocks until the hub opens the write end.
            let Ok(mut f) = fs::File::open(&path) else {
                return;
            };
            let mut buf = [0u8; 4096];
            while p.load(Ordering::SeqCst) {
                match f.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut r = r.lock().unwrap();
                        r.extend_from_slice(&buf[..n]);
                        rs.lock().unwrap().push((epoch_ms(), r.len()));
                    }
                }
            }
        });
        Fifo {
            plugged,
            read,
            reads,
        }
    }

    fn len(&self) -> usize {
        self.read.lock().unwrap().len()
    }

    /// The tone bursts read so far that start after 100 ms of quiet (samples under 500) and
    /// have ended (100 quiet samples): each one's first sample's index and its samples.
    fn bursts(&self) -> Vec<(usize, Vec<f64>)> {
        let read = self.read.lock().unwrap();
        let (mut quiet, mut current, mut out) = (0, None::<(usize, Vec<f64>)>, Vec::new());
        for (j, b) in read.chunks_exact(2).enumerate() {
            let v = i16::from_le_bytes([b[0], b[1]]);
            // The first sample out of 100 ms of quiet starts a burst.
            if v.unsigned_abs() >= 500 && quiet >= 800 {
                current = Some((j, Vec::new()));
            }
            quiet = if v.unsigned_abs() < 500 { quiet + 1 } else { 0 };
            if let Some((_, samples)) = &mut current {
                samples.push(f64::from(v));
                if quiet >= 100 {
                    out.extend(current.take());
                }
            }
        }
        out
    }

    /// When each of [`Fifo::bursts`] reached the device: the wall-clock time (ms since the
    /// epoch) of the read that brought its first sample.
    fn onsets(&self) -> Vec<u128> {
        let reads = self.reads.lock().unwrap();
        self.bursts()
            .iter()
            .filter_map(|(j, _)| reads.iter().find(|(_, end)| *end > 2 * j).map(|r| r.0))
            .collect()
    }

    /// Whether the longest complete burst after byte `from` is the peer's 440 Hz sine (an
    /// underrun on a loaded machine can cut a burst short).
    fn sine_since(&self, from: usize) -> bool {
        self.bursts()
            .into_iter()
            .filter(|(j, _)| 2 * j >= from)
            .max_by_key(|(_, x)| x.len())
            .is_some_and(|(_, x)| {
                x.len() > 800 && tone_share(&x, 440.0) > 0.5 && tone_share(&x, 1000.0) < 0.05
            })
    }
}

#[test]
fn an_unplugged_speaker_is_an_event_and_the_call_goes_on() {
    let mut fifo = None;
    let Some((t, mut hub)) = alsa_hub(
        "an_unplugged_speaker_is_an_event_and_the_call_goes_on",
        |dir| fifo = Some(Fifo::new(&dir.join("speaker.raw"))),
        &["--speaker", "hubspeaker"],
    ) else {
        return;
    };
    let fifo = fifo.expect("the FIFO");
    // The peer's sine sounds in the first 200 ms of each wall-clock second: the latency from
    // its microphone (the samples' own times) to the speaker device is when a burst arrives.
    let mut peer = t.call("24", &["--audio-pulse"]);
    hub.wait_for("the call at the speaker", CONNECT, |v| {
        v["event"] == "speaker" && v["state"] == "playing"
    });
    thread::sleep(Duration::from_secs(8));
    // What the device got, for a look afterwards.
    let _ = fs::write(
        t.live.dir.join("fifo-copy.raw"),
        &*fifo.read.lock().unwrap(),
    );
    assert!(
        fifo.sine_since(0),
        "the speaker did not play the sine: {} bytes read; bursts (start, samples, 440 Hz share): {:?}",
        fifo.len(),
        fifo.bursts()
            .iter()
            .map(|(j, x)| (*j, x.len(), tone_share(x, 440.0)))
            .collect::<Vec<_>>()
    );
    // The first burst may have begun before the call's audio reached the speaker.
    let mut latency: Vec<u128> = fifo.onsets().iter().skip(1).map(|at| at % 1000).collect();
    latency.sort_unstable();
    let sizes: Vec<usize> = {
        let reads = fifo.reads.lock().unwrap();
        reads.windows(2).map(|w| w[1].1 - w[0].1).collect()
    };
    let typical = sizes.get(sizes.len() / 2).copied().unwrap_or(0);
    println!(
        "figure: peer microphone -> hub speaker device: {latency:?} ms over {} bursts \
         (median {} ms; the device got {typical} bytes a write)",
        latency.len(),
        latency.get(latency.len() / 2).copied().unwrap_or(0)
    );
    // A burst that an underrun cut (a loaded machine) does not count; most do.
    assert!(latency.len() >= 2, "bursts found: {latency:?}");
    assert!(
        latency.iter().all(|ms| *ms < 500),
        "a burst took half a second or more: {latency:?}"
    );

    // Unplugged: the hub's next write fails; a `lost` line, and the call goes on.
    fifo.plugged.store(false, Ordering::SeqCst);
    let unplugged = Instant::now();
    let lost = hub.wait_for("the speaker lost", Duration::from_secs(10), |v| {
        v["event"] == "speaker" && v["state"] == "lost"
    });
    println!(
        "figure: unplugged -> speaker lost line in {} ms: {}",
        unplugged.elapsed().as_millis(),
        lost.value
    );
    thread::sleep(Duration::from_secs(3));
    assert!(
        hub.poll_exit().is_none(),
        "the hub exited: {}",
        hub.report()
    );
    assert!(
        hub.events_of("ended").is_empty(),
        "the call ended with its speaker: {}",
        hub.report()
    );

    // Plugged back: reopened within the hub's 2 s retry, `ready`, and the sine again.
    let before = fifo.len();
    fifo.plugged.store(true, Ordering::SeqCst);
    let replugged = Instant::now();
    hub.wait_for_after(
        "the speaker back",
        replugged,
        Duration::from_secs(10),
        |v| v["event"] == "speaker" && v["state"] == "ready",
    );
    thread::sleep(Duration::from_secs(2));
    assert!(
        fifo.len() > before + 16_000,
        "nothing played after the replug"
    );
    assert!(fifo.sine_since(before), "not the sine after the replug");
    both_exit_cleanly(&mut peer, &mut hub);
}

fn epoch_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}
