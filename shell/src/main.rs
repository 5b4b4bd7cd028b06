//! `call-assist`: a headless Matrix calling agent.
//!
//! `call-assist demo [--seed N] [--loss F] [--latency-ms N] [--duration-s N] [--json]`
//! runs a call between two agents on the simulated homeserver and network (mock mode);
//! `call` and `listen` run the same core on real sockets against a real homeserver.

use std::process::ExitCode;
use std::time::Duration;

use call_assist::demo::{self, DemoOptions};
use call_assist::live;
use call_assist::serve;
use call_assist::sweep;

const USAGE: &str = "\
usage: call-assist <command> [options]

commands:
  demo    a call between two agents on the simulated homeserver and network
          --seed N         randomness of the whole world (default 1)
          --loss F         datagram loss per direction, 0.0..1.0 (default 0)
          --latency-ms N   one-way latency of the media path (default 20)
          --duration-s N   how long the call stays up once connected (default 5)
          --json           print one JSON object as the last line
  sweep   many seeds of a call across fault profiles in the simulator; prints a table
          --seeds N        seeds per profile (default 84: 12 profiles, 1008 runs)
          --first-seed N   (default 1)   --json   one JSON line per profile
          exits 1 if any run panicked or left a call without an end
  call    place a video call, stay connected, hang up
          --homeserver URL --user @me:server (--room ROOM_ID | --to @peer:server)
          [--duration-s N (default 10)] [--json] [common options]
  listen  answer calls from allowed users
          --homeserver URL --user @me:server [--allow @peer:server ...]
          [--max-calls N] [--duration-s N (hang up N s after connecting)] [--json]
          [common options]

  serve   the hub daemon: answers and places calls for named stations, local HTTP API
          --config FILE    TOML: [matrix], [api], [network], [[station]] (see README)
          [--json]         one JSON line per event on stdout
          SIGHUP reloads the stations' answer/may_call lists; SIGTERM hangs up and exits
          secrets: matrix.password_file or CALL_ASSIST_PASSWORD (or an access token),
          api.token_file or CALL_ASSIST_API_TOKEN (required unless the API is on loopback)

common options of call and listen:
  --config FILE            TOML file with the same settings (keys: homeserver, user, room,
                           to, allow, state_dir, allow_loopback, interfaces,
                           exclude_interfaces, video_codec, max_calls, duration_s, port,
                           stun, turn, turn_user, relay_only);
                           flags win over the file
  --state-dir DIR          keeps the device id and access token between runs
                           (default $XDG_STATE_HOME/call-assist or ~/.local/state/call-assist)
  --allow-loopback         also use loopback addresses for media (tests)
  --interface NAME         only use this interface (repeatable)
  --exclude-interface NAME never use this interface (repeatable)
  --port N                 local UDP port (default: any free port)
  --stun HOST:PORT         STUN server for server-reflexive candidates (repeatable; the
                           homeserver's TURN URIs with an IP address are probed too)
  --video-codec auto|h264|vp8   which test clip to send (default auto)
  --turn turn:HOST:PORT    TURN server instead of the homeserver's (repeatable; UDP only)
  --turn-user NAME         its username; the password in CALL_ASSIST_TURN_PASSWORD
  --relay-only             offer only relay candidates (no address of ours in the room)
secrets come from the environment only: CALL_ASSIST_PASSWORD or CALL_ASSIST_ACCESS_TOKEN

exit codes: 0 ok, 1 call did not connect, 2 usage or config error, 3 login refused,
            4 homeserver unreachable, 5 unknown room or not a 1:1 room
";

#[derive(Debug)]
struct UsageError(String);

fn value<T: std::str::FromStr>(
    args: &mut impl Iterator<Item = String>,
    flag: &str,
) -> Result<T, UsageError> {
    let v = args
        .next()
        .ok_or_else(|| UsageError(format!("{flag} needs a value")))?;
    v.parse()
        .map_err(|_| UsageError(format!("{flag}: cannot parse {v:?}")))
}

fn parse_demo(args: impl Iterator<Item = String>) -> Result<(DemoOptions, bool), UsageError> {
    let mut opts = DemoOptions::default();
    let mut json = false;
    let mut args = args;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seed" => opts.seed = value(&mut args, "--seed")?,
            "--loss" => {
                let l: f64 = value(&mut args, "--loss")?;
                if !(0.0..=1.0).contains(&l) {
                    return Err(UsageError(format!(
                        "--loss must be within 0.0..=1.0, got {l}"
                    )));
                }
                opts.loss = l;
            }
            "--latency-ms" => {
                opts.latency = Duration::from_millis(value(&mut args, "--latency-ms")?)
            }
            "--duration-s" => {
                opts.duration = Duration::from_secs(value(&mut args, "--duration-s")?)
            }
            "--json" => json = true,
            other => return Err(UsageError(format!("unknown option {other:?}"))),
        }
    }
    Ok((opts, json))
}

fn init_logs(json: bool) {
    // Logs go to stderr; with --json stdout carries only the JSON line.
    let default = if json {
        "warn"
    } else {
        "call_assist=info,call_assist_core=warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CALL_ASSIST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(command) = args.next() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    match command.as_str() {
        "demo" => {
            let (opts, json) = match parse_demo(args) {
                Ok(x) => x,
                Err(UsageError(e)) => {
                    eprintln!("error: {e}\n\n{USAGE}");
                    return ExitCode::from(2);
                }
            };
            init_logs(json);
            let report = demo::run(&opts, |line| {
                if !json {
                    println!("{line}");
                }
            });
            if json {
                match serde_json::to_string(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("error: cannot encode report: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                println!(
                    "connected: {}, setup: {} ms, hangup: {}, trace {}",
                    report.connected,
                    report.setup_ms.map_or("-".into(), |m| m.to_string()),
                    report.hangup_reason.as_deref().unwrap_or("-"),
                    report.trace_hash
                );
            }
            if report.connected {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        "sweep" => {
            let mut seeds = 84u64;
            let mut first = 1u64;
            let mut json = false;
            let mut args = args;
            while let Some(a) = args.next() {
                let r = match a.as_str() {
                    "--seeds" => value(&mut args, "--seeds").map(|v| seeds = v),
                    "--first-seed" => value(&mut args, "--first-seed").map(|v| first = v),
                    "--json" => {
                        json = true;
                        Ok(())
                    }
                    other => Err(UsageError(format!("unknown option {other:?}"))),
                };
                if let Err(UsageError(e)) = r {
                    eprintln!("error: {e}\n\n{USAGE}");
                    return ExitCode::from(2);
                }
            }
            init_logs(true);
            if !json {
                println!(
                    "{:<22} {:>5} {:>10} {:>12} {:>6} {:>7} {:>8} {:>8}",
                    "profile",
                    "runs",
                    "connected",
                    "ended+reason",
                    "stuck",
                    "panics",
                    "p50 ms",
                    "p95 ms"
                );
            }
            let reports = sweep::sweep(seeds, first, |r| {
                if json {
                    println!("{}", serde_json::to_string(r).unwrap_or_default());
                } else {
                    let ms = |m: Option<u64>| m.map_or("-".to_owned(), |m| m.to_string());
                    println!(
                        "{:<22} {:>5} {:>9.1}% {:>11.1}% {:>6} {:>7} {:>8} {:>8}",
                        r.profile,
                        r.runs,
                        r.connected_pct,
                        r.ended_with_reason_pct,
                        r.stuck,
                        r.panics,
                        ms(r.setup_p50_ms),
                        ms(r.setup_p95_ms)
                    );
                }
            });
            if reports.iter().any(|r| r.stuck > 0 || r.panics > 0) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        "call" | "listen" | "check" => {
            let args: Vec<String> = args.collect();
            if args.iter().any(|a| a == "-h" || a == "--help") {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            let opts =
                match live::config::parse(&command, args.into_iter(), |k| std::env::var(k).ok()) {
                    Ok(o) => o,
                    Err(e) => {
                        eprintln!("error: {e}\n\n{USAGE}");
                        return ExitCode::from(live::exit::USAGE);
                    }
                };
            init_logs(opts.json);
            live::run(opts)
        }
        "serve" => {
            let args: Vec<String> = args.collect();
            if args.iter().any(|a| a == "-h" || a == "--help") {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            let config = serve::parse_args(args.into_iter()).and_then(|(path, json)| {
                serve::config::ServeConfig::load(&path, |k| std::env::var(k).ok())
                    .map(|c| (c, json))
            });
            let (config, json) = match config {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(live::exit::USAGE);
                }
            };
            init_logs(json);
            serve::run(config, json)
        }
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("error: unknown command {other:?}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
