//! call-assist: the binary's library part. Drivers of the sans-IO core: the simulated world
//! (`sim`, mock mode) and media sources/sinks (`media`).

pub mod bench;
pub mod demo;
#[cfg(feature = "e2ee")]
pub(crate) mod e2ee;
#[cfg(not(feature = "e2ee"))]
#[path = "e2ee_off.rs"]
pub(crate) mod e2ee;
pub mod live;
pub mod media;
pub(crate) mod room_crypto;
pub mod serve;
pub mod sim;
pub mod sweep;

/// Logs go to stderr (with `--json`, stdout carries only JSON lines), in colour only on a
/// terminal and without `NO_COLOR` (a file or journald would show the escape codes).
pub fn init_logs(json: bool) {
    use std::io::IsTerminal;
    let default = if json {
        "warn"
    } else {
        "call_assist=info,call_assist_core=warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CALL_ASSIST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && !no_color)
        .init();
}

/// Writes a line to stdout; `false` once stdout is closed (a consumer that exited, `| head`).
/// `println!` would panic there: a closed pipe must end `demo` quietly and never take a
/// daemon's calls down.
pub fn stdout_line(line: &str) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}
