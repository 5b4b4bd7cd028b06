//! `call-assist`: a headless Matrix calling agent.
//!
//! `demo` and `sweep` run calls on the simulated homeserver and network (mock mode); `call`,
//! `listen`, `check` and `serve` run the same core on real sockets against a real homeserver.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use call_assist::demo::{self, DemoOptions};
use call_assist::live::{self, config::CallArgs, config::CommonArgs, config::ListenArgs};
use call_assist::serve;
use call_assist::sweep;
use call_assist::{init_logs, stdout_line};
use clap::{Args, Parser, Subcommand};

const AFTER_HELP: &str = "\
Secrets come from the environment or files only: CALL_ASSIST_PASSWORD or
CALL_ASSIST_ACCESS_TOKEN, CALL_ASSIST_TURN_PASSWORD, CALL_ASSIST_RTSP_PASSWORD (serve: the
*_file keys of its config).

Exit codes: 0 ok, 1 call did not connect, 2 usage or config error, 3 login refused,
            4 homeserver unreachable, 5 unknown room or not a 1:1 room,
            6 the camera refused us or has nothing we can send";

#[derive(Parser)]
#[command(name = "call-assist", version, about = "A headless Matrix calling agent for low-power hubs",
    after_help = AFTER_HELP, arg_required_else_help = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A call between two agents on the simulated homeserver and network
    Demo(DemoArgs),
    /// Many seeds of a call across fault profiles in the simulator; prints a table
    /// (exits 1 if any run panicked or left a call without an end)
    Sweep(SweepArgs),
    /// Place a video call, stay connected, hang up
    #[command(after_help = AFTER_HELP)]
    Call(CallArgs),
    /// Answer calls from allowed users
    #[command(after_help = AFTER_HELP)]
    Listen(ListenArgs),
    /// Prove a STUN/TURN setup: log in, allocate relays, send through them; exit 0 if a
    /// relay carried datagrams both ways
    #[command(after_help = AFTER_HELP)]
    Check(CommonArgs),
    /// The hub daemon: answers and places calls for named stations, local HTTP API.
    /// SIGHUP reloads the stations' answer/may_call lists; SIGTERM hangs up and exits
    Serve(ServeArgs),
}

#[derive(Args)]
struct DemoArgs {
    /// Randomness of the whole world
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Datagram loss per direction, 0.0..=1.0
    #[arg(long, default_value_t = 0.0, value_parser = loss)]
    loss: f64,
    /// One-way latency of the media path
    #[arg(long, value_name = "N", default_value_t = 20)]
    latency_ms: u64,
    /// How long the call stays up once connected
    #[arg(long, value_name = "N", default_value_t = 5)]
    duration_s: u64,
    /// Print one JSON object as the last line
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SweepArgs {
    /// Seeds per profile (84: 12 profiles, 1008 runs)
    #[arg(long, value_name = "N", default_value_t = 84)]
    seeds: u64,
    #[arg(long, value_name = "N", default_value_t = 1)]
    first_seed: u64,
    /// One JSON line per profile
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// TOML: [matrix], [api], [network], [[station]] (see README). Secrets:
    /// matrix.password_file or CALL_ASSIST_PASSWORD (or an access token), api.token_file or
    /// CALL_ASSIST_API_TOKEN (required unless the API is on loopback)
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// One JSON line per event on stdout
    #[arg(long)]
    json: bool,
}

fn loss(s: &str) -> Result<f64, String> {
    let l: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&l) {
        Ok(l)
    } else {
        Err(format!("must be within 0.0..=1.0, got {l}"))
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Demo(a) => run_demo(a),
        Command::Sweep(a) => run_sweep(a),
        Command::Call(a) => live::run(live::config::LiveCommand::Call(a)),
        Command::Listen(a) => live::run(live::config::LiveCommand::Listen(a)),
        Command::Check(a) => live::run(live::config::LiveCommand::Check(a)),
        Command::Serve(a) => {
            let config =
                match serve::config::ServeConfig::load(&a.config, |k| std::env::var(k).ok()) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(live::exit::USAGE);
                    }
                };
            init_logs(a.json);
            serve::run(config, a.json)
        }
    }
}

fn run_demo(a: DemoArgs) -> ExitCode {
    let opts = DemoOptions {
        seed: a.seed,
        loss: a.loss,
        latency: Duration::from_millis(a.latency_ms),
        duration: Duration::from_secs(a.duration_s),
    };
    init_logs(a.json);
    // After stdout closes (`demo | head -1`) the rest is dropped quietly.
    let mut open = true;
    let report = demo::run(&opts, |line| {
        if !a.json && open {
            open = stdout_line(line);
        }
    });
    if a.json {
        match serde_json::to_string(&report) {
            Ok(s) => _ = stdout_line(&s),
            Err(e) => {
                eprintln!("error: cannot encode report: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else if open {
        stdout_line(&format!(
            "connected: {}, setup: {} ms, hangup: {}, trace {}",
            report.connected,
            report.setup_ms.map_or("-".into(), |m| m.to_string()),
            report.hangup_reason.as_deref().unwrap_or("-"),
            report.trace_hash
        ));
    }
    if report.connected {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run_sweep(a: SweepArgs) -> ExitCode {
    init_logs(true);
    let mut open = a.json
        || stdout_line(&format!(
            "{:<22} {:>5} {:>10} {:>12} {:>6} {:>7} {:>8} {:>8}",
            "profile", "runs", "connected", "ended+reason", "stuck", "panics", "p50 ms", "p95 ms"
        ));
    let reports = sweep::sweep(a.seeds, a.first_seed, |r| {
        if !open {
            return;
        }
        if a.json {
            open = stdout_line(&serde_json::to_string(r).unwrap_or_default());
        } else {
            let ms = |m: Option<u64>| m.map_or("-".to_owned(), |m| m.to_string());
            open = stdout_line(&format!(
                "{:<22} {:>5} {:>9.1}% {:>11.1}% {:>6} {:>7} {:>8} {:>8}",
                r.profile,
                r.runs,
                r.connected_pct,
                r.ended_with_reason_pct,
                r.stuck,
                r.panics,
                ms(r.setup_p50_ms),
                ms(r.setup_p95_ms)
            ));
        }
    });
    if reports.iter().any(|r| r.stuck > 0 || r.panics > 0) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
