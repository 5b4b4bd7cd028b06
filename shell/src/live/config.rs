//! Settings of `call`, `listen` and `check`: a TOML file (`--config`) and the same settings as
//! flags (clap). A flag replaces the file's value, lists included. Secrets come from the
//! environment only.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use call_assist_core::{OwnedRoomId, OwnedUserId, Secret};
use clap::Args;
use serde::Deserialize;

pub use super::session::{Account, Auth};
use crate::media::pump::VideoChoice;

/// A bad command line or config file: exit code 2.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The config file. Every key is optional; secrets are not accepted here (environment only).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub homeserver: Option<String>,
    pub user: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub allow: Option<Vec<String>>,
    /// `listen` answers any Matrix user (instead of an `allow` list).
    pub allow_anyone: Option<bool>,
    pub allow_loopback: Option<bool>,
    pub interfaces: Option<Vec<String>>,
    pub exclude_interfaces: Option<Vec<String>>,
    pub video_codec: Option<String>,
    pub max_calls: Option<u32>,
    pub duration_s: Option<u64>,
    pub port: Option<u16>,
    pub room: Option<String>,
    pub to: Option<String>,
    /// STUN servers as `host:port`.
    pub stun: Option<Vec<String>>,
    /// TURN servers as `turn:` URIs, used instead of the homeserver's (`/voip/turnServer`).
    pub turn: Option<Vec<String>>,
    /// Username for `turn` (the password comes from CALL_ASSIST_TURN_PASSWORD).
    pub turn_user: Option<String>,
    /// Offer only relay candidates: no address of the hub goes into room history.
    pub relay_only: Option<bool>,
    /// Video source: `testclip`, `file:PATH` (H.264 Annex B), `rtsp://...`, `none`.
    pub video: Option<String>,
    /// Audio source: `tone`, `file:PATH` (Ogg Opus), `camera`, `alsa:DEVICE`, `none`.
    pub audio: Option<String>,
    /// Frame rate an H.264 file is played at.
    pub video_fps: Option<u32>,
    /// `tcp` (default) or `udp`.
    pub rtsp_transport: Option<String>,
    /// Directory for recordings of the remote side, one file per call.
    pub record: Option<PathBuf>,
    /// `HOST:PORT` to re-send the remote media to as plain RTP (+ an SDP file).
    pub forward_rtp: Option<String>,
    /// A direct room `call` creates is not end-to-end encrypted.
    pub unencrypted_dm: Option<bool>,
    /// ALSA device the remote side's audio plays through.
    pub speaker: Option<String>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| ConfigError(format!("config {}: {e}", path.display())))
    }
}

/// Flags of every live command.
#[derive(Debug, Default, Args)]
pub struct CommonArgs {
    /// TOML file with the same settings (keys: homeserver, user, room, to, allow, state_dir,
    /// allow_loopback, interfaces, exclude_interfaces, video_codec, max_calls, duration_s,
    /// port, stun, turn, turn_user, relay_only, video, audio, video_fps, rtsp_transport,
    /// record, forward_rtp, unencrypted_dm, speaker); a flag replaces the file's value, lists included
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Homeserver base URL (http:// or https://)
    #[arg(long, value_name = "URL")]
    pub homeserver: Option<String>,
    /// The hub's Matrix user
    #[arg(long, value_name = "@me:server")]
    pub user: Option<String>,
    /// Keeps the device id and access token between runs
    /// [default: $XDG_STATE_HOME/call-assist or ~/.local/state/call-assist]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Also use loopback addresses for media (tests)
    #[arg(long)]
    pub allow_loopback: bool,
    /// Only use this interface (repeatable)
    #[arg(long = "interface", value_name = "NAME")]
    pub interfaces: Vec<String>,
    /// Never use this interface (repeatable)
    #[arg(long = "exclude-interface", value_name = "NAME")]
    pub exclude_interfaces: Vec<String>,
    /// Local UDP port [default: any free port]
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
    /// STUN server for server-reflexive candidates (repeatable; the homeserver's TURN URIs
    /// with an IP address are probed too)
    #[arg(long, value_name = "HOST:PORT")]
    pub stun: Vec<String>,
    /// Which test clip to send: auto, h264 or vp8 [default: auto]
    #[arg(long, value_name = "CODEC")]
    pub video_codec: Option<String>,
    /// TURN server instead of the homeserver's (repeatable; UDP only)
    #[arg(long, value_name = "turn:HOST:PORT")]
    pub turn: Vec<String>,
    /// Username of --turn; the password in CALL_ASSIST_TURN_PASSWORD
    #[arg(long, value_name = "NAME")]
    pub turn_user: Option<String>,
    /// Offer only relay candidates (no address of ours in the room)
    #[arg(long)]
    pub relay_only: bool,
    /// Video source: testclip, file:PATH (H.264 Annex B), rtsp://..., none [default: testclip]
    #[arg(long, value_name = "SOURCE")]
    pub video: Option<String>,
    /// Audio source: tone, file:PATH (Ogg Opus), camera, alsa:DEVICE (a microphone), none
    /// [default: the camera's, else tone]
    #[arg(long, value_name = "SOURCE")]
    pub audio: Option<String>,
    /// Frame rate an H.264 file is played at [default: 25]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=240))]
    pub video_fps: Option<u32>,
    /// tcp or udp [default: tcp]; the camera password in CALL_ASSIST_RTSP_PASSWORD
    #[arg(long, value_name = "TRANSPORT")]
    pub rtsp_transport: Option<String>,
    /// Directory for recordings of the remote side, one file per call
    #[arg(long, value_name = "DIR")]
    pub record: Option<PathBuf>,
    /// Play the remote side's audio through this ALSA device (e.g. default, plughw:1)
    #[arg(long, value_name = "DEVICE")]
    pub speaker: Option<String>,
    /// Re-send the remote media as plain RTP to IP:PORT (audio at PORT+2, plus an SDP file)
    #[arg(long, value_name = "IP:PORT")]
    pub forward_rtp: Option<String>,
    /// One JSON object per line on stdout
    #[arg(long)]
    pub json: bool,
}

/// `call`: place a video call, stay connected, hang up.
#[derive(Debug, Default, Args)]
pub struct CallArgs {
    /// The room to call in
    #[arg(long, value_name = "ROOM_ID")]
    pub room: Option<String>,
    /// The user to call, in a direct room (found, or created and waited for)
    #[arg(long, value_name = "@peer:server")]
    pub to: Option<String>,
    /// How long the call stays up once connected [default: 10]
    #[arg(long, value_name = "N")]
    pub duration_s: Option<u64>,
    /// A direct room created for --to is not end-to-end encrypted (by default it is, as
    /// Element creates them)
    #[arg(long)]
    pub unencrypted_dm: bool,
    /// Press these DTMF digits (0-9 * # A-D) in the call, e.g. to open a door or answer an IVR
    #[arg(long, value_name = "DIGITS")]
    pub dtmf: Option<String>,
    /// Press the --dtmf digits N s after the call connected
    #[arg(long, value_name = "N", default_value_t = 2, requires = "dtmf")]
    pub dtmf_after_s: u64,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `listen`: answer calls from allowed users.
#[derive(Debug, Default, Args)]
pub struct ListenArgs {
    /// Answer calls from this user (repeatable); one of --allow and --allow-anyone is required
    #[arg(long, value_name = "@peer:server")]
    pub allow: Vec<String>,
    /// Answer calls from any Matrix user (the camera goes to whoever calls)
    #[arg(long, conflicts_with = "allow")]
    pub allow_anyone: bool,
    /// Exit after this many calls
    #[arg(long, value_name = "N")]
    pub max_calls: Option<u32>,
    /// Hang up each call N s after it connected
    #[arg(long, value_name = "N")]
    pub duration_s: Option<u64>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// A live command as given.
#[derive(Debug)]
pub enum LiveCommand {
    Call(CallArgs),
    Listen(ListenArgs),
    Check(CommonArgs),
}

/// Where a `call` goes.
#[derive(Debug, Clone)]
pub enum Target {
    Room(OwnedRoomId),
    /// Find or create a direct room with this user.
    User(OwnedUserId),
}

#[derive(Debug, Clone)]
pub enum Mode {
    Call {
        target: Target,
        duration: Duration,
        /// DTMF digits to press, and how long after the call connected.
        dtmf: Option<(String, Duration)>,
    },
    Listen {
        allow: Vec<OwnedUserId>,
        max_calls: Option<u32>,
        /// Hang up each answered call this long after it connected.
        hangup_after: Option<Duration>,
    },
    /// `check`: STUN, TURN allocation and a relay round trip, then exit.
    Check,
}

/// Which interfaces and servers carry media (`serve`'s `[network]` too).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkConfig {
    pub allow_loopback: bool,
    pub interfaces: Vec<String>,
    pub exclude_interfaces: Vec<String>,
    pub port: u16,
    pub stun: Vec<String>,
    /// TURN from the config (instead of `/voip/turnServer`).
    pub turn: Option<TurnOptions>,
    pub relay_only: bool,
}

#[derive(Debug, Clone)]
pub struct LiveOptions {
    pub account: Account,
    pub mode: Mode,
    pub json: bool,
    pub network: NetworkConfig,
    pub video: VideoChoice,
    pub media: MediaOptions,
    pub rtsp_password: Option<Secret>,
}

/// TURN servers given in the config rather than by the homeserver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnOptions {
    pub uris: Vec<String>,
    pub username: String,
    pub password: call_assist_core::Secret,
}

/// Sources and sinks, as given (files are opened and cameras reached when the agent starts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaOptions {
    pub video: String,
    /// `None`: the camera's audio when the video is a camera, else the tone.
    pub audio: Option<String>,
    pub video_fps: u32,
    pub rtsp_transport: crate::media::rtsp::RtspTransport,
    pub record: Option<PathBuf>,
    pub forward_rtp: Option<SocketAddr>,
    /// The remote side's audio goes to the camera's speaker (ONVIF backchannel).
    pub talkback: bool,
    /// The remote side's audio plays through this ALSA device (the hub's own speaker).
    pub speaker: Option<String>,
}

/// Frame rate of an H.264 file source unless `--video-fps` says otherwise.
pub const DEFAULT_FILE_FPS: u32 = 25;

fn user_id(s: &str, what: &str) -> Result<OwnedUserId, ConfigError> {
    OwnedUserId::try_from(s).map_err(|e| {
        ConfigError(format!(
            "{what}: {s:?} is not a Matrix user id (@user:server): {e}"
        ))
    })
}

pub(crate) fn parse_video(s: &str) -> Result<VideoChoice, ConfigError> {
    match s {
        "auto" => Ok(VideoChoice::Auto),
        "h264" => Ok(VideoChoice::H264),
        "vp8" => Ok(VideoChoice::Vp8),
        other => Err(ConfigError(format!(
            "--video-codec must be auto, h264 or vp8, got {other:?}"
        ))),
    }
}

/// Who may call a listener: a decision, never a default (it sends its camera to the caller).
fn listen_allow(a: &ListenArgs, file: &FileConfig) -> Result<Vec<OwnedUserId>, ConfigError> {
    let allow: Vec<OwnedUserId> = list(a.allow.clone(), file.allow.clone())
        .iter()
        .map(|u| user_id(u, "--allow"))
        .collect::<Result<_, _>>()?;
    let anyone = a.allow_anyone || (a.allow.is_empty() && file.allow_anyone == Some(true));
    if allow.is_empty() && !anyone {
        return Err(ConfigError(
            "listen answers only the users given with --allow @user:server (or `allow = [...]` \
             in --config); to answer any Matrix user, say --allow-anyone"
                .into(),
        ));
    }
    if anyone && !allow.is_empty() {
        return Err(ConfigError(
            "give either an allow list or allow_anyone, not both".into(),
        ));
    }
    Ok(allow)
}

/// A list flag given replaces the file's list.
fn list(flag: Vec<String>, file: Option<Vec<String>>) -> Vec<String> {
    if flag.is_empty() {
        file.unwrap_or_default()
    } else {
        flag
    }
}

impl LiveOptions {
    /// The command's flags over its config file, and the environment (secrets, state dir).
    pub fn new(
        command: LiveCommand,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<LiveOptions, ConfigError> {
        let common = match &command {
            LiveCommand::Call(a) => &a.common,
            LiveCommand::Listen(a) => &a.common,
            LiveCommand::Check(c) => c,
        };
        let file = match &common.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let mode = mode(&command, &file)?;
        let unencrypted_dm = matches!(&command, LiveCommand::Call(a) if a.unencrypted_dm)
            || file.unencrypted_dm.unwrap_or(false);
        let c = match command {
            LiveCommand::Call(a) => a.common,
            LiveCommand::Listen(a) => a.common,
            LiveCommand::Check(c) => c,
        };
        let mut account = account(&c, &file, &env)?;
        account.encrypt_new_dms &= !unencrypted_dm;
        let network = NetworkConfig {
            allow_loopback: c.allow_loopback || file.allow_loopback.unwrap_or(false),
            interfaces: list(c.interfaces, file.interfaces),
            exclude_interfaces: list(c.exclude_interfaces, file.exclude_interfaces),
            port: c.port.or(file.port).unwrap_or(0),
            stun: list(c.stun, file.stun),
            turn: turn_options(
                Some(list(c.turn, file.turn)),
                c.turn_user.or(file.turn_user),
                env("CALL_ASSIST_TURN_PASSWORD"),
            )?,
            relay_only: c.relay_only || file.relay_only.unwrap_or(false),
        };
        let transport = c.rtsp_transport.or(file.rtsp_transport);
        let forward = c.forward_rtp.or(file.forward_rtp);
        let video_fps = match c.video_fps.or(file.video_fps) {
            Some(f) if !(1..=240).contains(&f) => {
                return Err(ConfigError(format!("video_fps: {f} is not 1..240")))
            }
            f => f.unwrap_or(DEFAULT_FILE_FPS),
        };
        Ok(LiveOptions {
            account,
            mode,
            json: c.json,
            network,
            video: parse_video(
                c.video_codec
                    .or(file.video_codec)
                    .as_deref()
                    .unwrap_or("auto"),
            )?,
            media: MediaOptions {
                video: c.video.or(file.video).unwrap_or_else(|| "testclip".into()),
                audio: c.audio.or(file.audio),
                video_fps,
                rtsp_transport: transport
                    .as_deref()
                    .unwrap_or("tcp")
                    .parse()
                    .map_err(|e| ConfigError(format!("--rtsp-transport: {e}")))?,
                record: c.record.or(file.record),
                forward_rtp: forward.map(|f| parse_forward(&f)).transpose()?,
                talkback: false,
                speaker: c.speaker.or(file.speaker),
            },
            rtsp_password: env("CALL_ASSIST_RTSP_PASSWORD").map(Secret::new),
        })
    }
}

fn account(
    c: &CommonArgs,
    file: &FileConfig,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Account, ConfigError> {
    let homeserver = c
        .homeserver
        .clone()
        .or(file.homeserver.clone())
        .ok_or_else(|| {
            ConfigError("--homeserver is required (or `homeserver` in --config)".into())
        })?;
    if !(homeserver.starts_with("http://") || homeserver.starts_with("https://")) {
        return Err(ConfigError(format!(
            "--homeserver must be an http:// or https:// URL, got {homeserver:?}"
        )));
    }
    let user = c
        .user
        .as_ref()
        .or(file.user.as_ref())
        .ok_or_else(|| ConfigError("--user is required (or `user` in --config)".into()))?;
    let auth = match (env("CALL_ASSIST_ACCESS_TOKEN"), env("CALL_ASSIST_PASSWORD")) {
        (_, Some(p)) if !p.is_empty() => Auth::Password(Secret::new(p)),
        (Some(t), _) if !t.is_empty() => Auth::AccessToken(Secret::new(t)),
        _ => {
            return Err(ConfigError(
                "set CALL_ASSIST_PASSWORD or CALL_ASSIST_ACCESS_TOKEN in the environment".into(),
            ))
        }
    };
    let state_dir = c.state_dir.clone().or(file.state_dir.clone()).or_else(|| {
        env("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|h| Path::new(&h).join(".local/state")))
            .map(|p| p.join("call-assist"))
    });
    Ok(Account {
        homeserver,
        user: user_id(user, "--user")?,
        auth,
        state_dir,
        encrypt_new_dms: cfg!(feature = "e2ee"),
    })
}

fn mode(command: &LiveCommand, file: &FileConfig) -> Result<Mode, ConfigError> {
    Ok(match command {
        LiveCommand::Check(_) => Mode::Check,
        LiveCommand::Call(a) => {
            let (room, to) = match (&a.room, &a.to) {
                // Either flag replaces both of the file's keys.
                (None, None) => (file.room.clone(), file.to.clone()),
                (r, t) => (r.clone(), t.clone()),
            };
            let target = match (room, to) {
                (Some(r), None) => Target::Room(
                    OwnedRoomId::try_from(r.as_str())
                        .map_err(|e| ConfigError(format!("--room: {r:?} is not a room id: {e}")))?,
                ),
                (None, Some(u)) => Target::User(user_id(&u, "--to")?),
                _ => {
                    return Err(ConfigError(
                        "call needs exactly one of --room ROOM_ID or --to @user:server".into(),
                    ))
                }
            };
            let duration = a.duration_s.or(file.duration_s).unwrap_or(10);
            let dtmf = match &a.dtmf {
                Some(digits) => {
                    call_assist_core::check_dtmf_digits(digits)
                        .map_err(|e| ConfigError(format!("--dtmf: {e}")))?;
                    Some((digits.clone(), Duration::from_secs(a.dtmf_after_s)))
                }
                None => None,
            };
            Mode::Call {
                target,
                duration: Duration::from_secs(duration),
                dtmf,
            }
        }
        LiveCommand::Listen(a) => Mode::Listen {
            allow: listen_allow(a, file)?,
            max_calls: a.max_calls.or(file.max_calls),
            hangup_after: a.duration_s.or(file.duration_s).map(Duration::from_secs),
        },
    })
}

/// `--turn URI ... --turn-user U` with CALL_ASSIST_TURN_PASSWORD: all three or none.
pub(crate) fn turn_options(
    uris: Option<Vec<String>>,
    user: Option<String>,
    password: Option<String>,
) -> Result<Option<TurnOptions>, ConfigError> {
    let Some(uris) = uris.filter(|u| !u.is_empty()) else {
        if user.is_some() {
            return Err(ConfigError("--turn-user needs --turn URI".into()));
        }
        return Ok(None);
    };
    for u in &uris {
        let parsed = call_assist_core::turn::TurnUri::parse(u)
            .map_err(|e| ConfigError(format!("--turn {u:?}: {e}")))?;
        if !parsed.is_udp_turn() {
            return Err(ConfigError(format!(
                "--turn {u:?}: only turn: URIs over UDP are supported (no turns: or transport=tcp)"
            )));
        }
    }
    let username = user.ok_or_else(|| ConfigError("--turn needs --turn-user".into()))?;
    let password = password.filter(|p| !p.is_empty()).ok_or_else(|| {
        ConfigError("--turn needs the TURN password in CALL_ASSIST_TURN_PASSWORD".into())
    })?;
    Ok(Some(TurnOptions {
        uris,
        username,
        password: call_assist_core::Secret::new(password),
    }))
}

/// `HOST:PORT` with an IP literal on this host (loopback or a local address: the stream is
/// unencrypted and meant for a player next to the hub).
pub(crate) fn parse_forward(s: &str) -> Result<SocketAddr, ConfigError> {
    let addr: SocketAddr = s.parse().map_err(|_| {
        ConfigError(format!(
            "--forward-rtp: {s:?} is not IP:PORT (e.g. 127.0.0.1:5004)"
        ))
    })?;
    if addr.port() == 0 || addr.port() > u16::MAX - 2 {
        return Err(ConfigError(format!(
            "--forward-rtp: port {} leaves no room for audio at port + 2",
            addr.port()
        )));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[derive(Parser)]
    enum Cli {
        Call(CallArgs),
        Listen(ListenArgs),
        Check(CommonArgs),
    }

    fn parse(
        command: &str,
        args: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<LiveOptions, ConfigError> {
        let argv = ["call-assist", command]
            .into_iter()
            .chain(args.split_whitespace());
        let cli = Cli::try_parse_from(argv).map_err(|e| ConfigError(e.to_string()))?;
        let command = match cli {
            Cli::Call(a) => LiveCommand::Call(a),
            Cli::Listen(a) => LiveCommand::Listen(a),
            Cli::Check(c) => LiveCommand::Check(c),
        };
        LiveOptions::new(command, env)
    }

    #[test]
    fn turn_flags_need_all_three_parts() {
        let base = "--homeserver http://h --user @a:h";
        let o = parse(
            "check",
            &format!("{base} --turn turn:192.0.2.1:3478?transport=udp --turn-user u --relay-only"),
            env(&[
                ("CALL_ASSIST_PASSWORD", "pw"),
                ("CALL_ASSIST_TURN_PASSWORD", "tp"),
            ]),
        )
        .unwrap();
        assert!(matches!(o.mode, Mode::Check));
        assert!(o.network.relay_only);
        let t = o.network.turn.unwrap();
        assert_eq!(
            (t.uris.len(), t.username.as_str(), t.password.expose()),
            (1, "u", "tp")
        );
        for (flags, needle) in [
            (
                "--turn turn:192.0.2.1 --turn-user u",
                "CALL_ASSIST_TURN_PASSWORD",
            ),
            ("--turn turn:192.0.2.1", "--turn-user"),
            ("--turn-user u", "--turn URI"),
            (
                "--turn turns:192.0.2.1 --turn-user u",
                "only turn: URIs over UDP",
            ),
            (
                "--turn http://x --turn-user u",
                "not a stun:, turn: or turns: URI",
            ),
        ] {
            let e = parse(
                "listen",
                &format!("{base} --allow-anyone {flags}"),
                env(&[("CALL_ASSIST_PASSWORD", "pw")]),
            )
            .unwrap_err();
            assert!(e.0.contains(needle), "{flags}: {e}");
        }
    }

    #[test]
    fn listen_needs_an_allow_list_or_allow_anyone() {
        let pw = || env(&[("CALL_ASSIST_PASSWORD", "x")]);
        let base = "--homeserver http://h --user @a:h";
        let e = parse("listen", base, pw()).unwrap_err();
        assert!(e.0.contains("--allow-anyone"), "{e}");
        let o = parse("listen", &format!("{base} --allow-anyone"), pw()).unwrap();
        assert!(matches!(o.mode, Mode::Listen { ref allow, .. } if allow.is_empty()));
        assert!(matches!(
            super::super::call_policy(&o.mode),
            call_assist_core::CallPolicy::Anyone
        ));
        let o = parse("listen", &format!("{base} --allow @b:h"), pw()).unwrap();
        assert!(
            matches!(super::super::call_policy(&o.mode), call_assist_core::CallPolicy::Allow(ref a) if a.len() == 1)
        );
        assert!(parse(
            "listen",
            &format!("{base} --allow @b:h --allow-anyone"),
            pw()
        )
        .is_err());
    }

    #[test]
    fn call_flags_parse() {
        let o = parse(
            "call",
            "--homeserver http://127.0.0.1:8008 --user @a:localhost --to @b:localhost --duration-s 3 --json",
            env(&[("CALL_ASSIST_PASSWORD", "pw")]),
        )
        .unwrap();
        assert!(o.json);
        assert!(
            matches!(o.mode, Mode::Call { target: Target::User(_), duration, .. } if duration == Duration::from_secs(3))
        );
    }

    #[test]
    fn missing_secret_and_bad_ids_are_clear_errors() {
        let pw = || env(&[("CALL_ASSIST_PASSWORD", "x")]);
        let e = parse(
            "call",
            "--homeserver http://h --user @a:h --to @b:h",
            env(&[]),
        )
        .unwrap_err();
        assert!(e.0.contains("CALL_ASSIST_PASSWORD"));
        let e = parse("call", "--homeserver http://h --user alice --to @b:h", pw()).unwrap_err();
        assert!(e.0.contains("--user"), "{e}");
        let e = parse("call", "--homeserver ftp://h --user @a:h --to @b:h", pw()).unwrap_err();
        assert!(e.0.contains("http"), "{e}");
        let e = parse("call", "--homeserver http://h --user @a:h", pw()).unwrap_err();
        assert!(e.0.contains("--room"), "{e}");
        let e = parse(
            "call",
            "--homeserver http://h --user @a:h --room !r --allow @b:h",
            pw(),
        )
        .unwrap_err();
        assert!(
            e.0.contains("--allow"),
            "a listen flag on call is refused: {e}"
        );
    }

    #[test]
    fn flags_replace_the_files_values_lists_included() {
        let dir = std::env::temp_dir().join(format!("ca-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.toml");
        std::fs::write(
            &p,
            "homeserver = \"http://h\"\nuser = \"@a:h\"\npasword = \"x\"\n",
        )
        .unwrap();
        let e = FileConfig::load(&p).unwrap_err();
        assert!(e.0.contains("pasword"), "{e}");
        std::fs::write(
            &p,
            "homeserver = \"http://h\"\nuser = \"@a:h\"\nallow = [\"@b:h\", \"@c:h\"]\n\
             stun = [\"192.0.2.1:3478\"]\nport = 5000\nmax_calls = 3\n",
        )
        .unwrap();
        let pw = || env(&[("CALL_ASSIST_PASSWORD", "x")]);
        let cfg = format!("--config {}", p.display());
        let o = parse("listen", &cfg, pw()).unwrap();
        assert!(
            matches!(o.mode, Mode::Listen { ref allow, max_calls: Some(3), .. } if allow.len() == 2)
        );
        assert_eq!((o.network.port, o.network.stun.len()), (5000, 1));
        let o = parse(
            "listen",
            &format!("{cfg} --allow @d:h --stun 192.0.2.2:3478 --port 6000 --max-calls 1"),
            pw(),
        )
        .unwrap();
        let Mode::Listen {
            allow, max_calls, ..
        } = o.mode
        else {
            panic!("not listen")
        };
        assert_eq!(
            allow.iter().map(|u| u.as_str()).collect::<Vec<_>>(),
            ["@d:h"]
        );
        assert_eq!(max_calls, Some(1));
        assert_eq!(o.network.stun, ["192.0.2.2:3478"]);
        assert_eq!(o.network.port, 6000);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
