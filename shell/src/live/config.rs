//! Live settings: a TOML file (`--config`), the same settings as flags (flags win), secrets
//! from the environment only, and the state directory that keeps the device across restarts.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use call_assist_core::{OwnedRoomId, OwnedUserId, Secret};
use serde::{Deserialize, Serialize};

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
    /// Audio source: `tone`, `file:PATH` (Ogg Opus), `camera`, `none`.
    pub audio: Option<String>,
    /// Frame rate an H.264 file is played at.
    pub video_fps: Option<u32>,
    /// `tcp` (default) or `udp`.
    pub rtsp_transport: Option<String>,
    /// Directory for recordings of the remote side, one file per call.
    pub record: Option<PathBuf>,
    /// `HOST:PORT` to re-send the remote media to as plain RTP (+ an SDP file).
    pub forward_rtp: Option<String>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| ConfigError(format!("config {}: {e}", path.display())))
    }
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

#[derive(Debug, Clone)]
pub enum Auth {
    Password(Secret),
    AccessToken(Secret),
}

#[derive(Debug, Clone)]
pub struct LiveOptions {
    pub homeserver: String,
    pub user: OwnedUserId,
    pub auth: Auth,
    pub mode: Mode,
    pub json: bool,
    pub state_dir: Option<PathBuf>,
    pub allow_loopback: bool,
    pub interfaces: Vec<String>,
    pub exclude_interfaces: Vec<String>,
    pub video: VideoChoice,
    pub port: u16,
    pub stun: Vec<String>,
    /// TURN from the config: URIs, username, password (from the environment).
    pub turn: Option<TurnOptions>,
    pub relay_only: bool,
    pub media: MediaOptions,
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
}

/// Frame rate of an H.264 file source unless `--video-fps` says otherwise.
pub const DEFAULT_FILE_FPS: u32 = 25;

fn next_value(args: &mut impl Iterator<Item = String>, flag: &str) -> Result<String, ConfigError> {
    args.next()
        .ok_or_else(|| ConfigError(format!("{flag} needs a value")))
}

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

/// Parses `call` / `listen` arguments (after the command name) and the environment.
pub fn parse(
    command: &str,
    args: impl Iterator<Item = String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<LiveOptions, ConfigError> {
    let mut args: Vec<String> = args.collect();
    // The config file first, so that flags override it.
    let mut file = FileConfig::default();
    if let Some(i) = args.iter().position(|a| a == "--config") {
        let path = args
            .get(i + 1)
            .cloned()
            .ok_or_else(|| ConfigError("--config needs a value".into()))?;
        file = FileConfig::load(Path::new(&path))?;
        args.drain(i..i + 2);
    }
    let mut json = false;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--homeserver" => file.homeserver = Some(next_value(&mut it, &a)?),
            "--user" => file.user = Some(next_value(&mut it, &a)?),
            "--room" => file.room = Some(next_value(&mut it, &a)?),
            "--to" => file.to = Some(next_value(&mut it, &a)?),
            "--state-dir" => file.state_dir = Some(PathBuf::from(next_value(&mut it, &a)?)),
            "--allow" => file
                .allow
                .get_or_insert_with(Vec::new)
                .push(next_value(&mut it, &a)?),
            "--allow-loopback" => file.allow_loopback = Some(true),
            "--interface" => file
                .interfaces
                .get_or_insert_with(Vec::new)
                .push(next_value(&mut it, &a)?),
            "--exclude-interface" => file
                .exclude_interfaces
                .get_or_insert_with(Vec::new)
                .push(next_value(&mut it, &a)?),
            "--video-codec" => file.video_codec = Some(next_value(&mut it, &a)?),
            "--max-calls" => {
                let v = next_value(&mut it, &a)?;
                file.max_calls = Some(
                    v.parse()
                        .map_err(|_| ConfigError(format!("--max-calls: {v:?} is not a number")))?,
                );
            }
            "--duration-s" => {
                let v = next_value(&mut it, &a)?;
                file.duration_s =
                    Some(v.parse().map_err(|_| {
                        ConfigError(format!("--duration-s: {v:?} is not a number"))
                    })?);
            }
            "--port" => {
                let v = next_value(&mut it, &a)?;
                file.port = Some(
                    v.parse()
                        .map_err(|_| ConfigError(format!("--port: {v:?} is not a port")))?,
                );
            }
            "--stun" => file
                .stun
                .get_or_insert_with(Vec::new)
                .push(next_value(&mut it, &a)?),
            "--turn" => file
                .turn
                .get_or_insert_with(Vec::new)
                .push(next_value(&mut it, &a)?),
            "--turn-user" => file.turn_user = Some(next_value(&mut it, &a)?),
            "--relay-only" => file.relay_only = Some(true),
            "--video" => file.video = Some(next_value(&mut it, &a)?),
            "--audio" => file.audio = Some(next_value(&mut it, &a)?),
            "--video-fps" => {
                let v = next_value(&mut it, &a)?;
                file.video_fps = Some(
                    v.parse()
                        .ok()
                        .filter(|f| (1..=240).contains(f))
                        .ok_or_else(|| ConfigError(format!("--video-fps: {v:?} is not 1..240")))?,
                );
            }
            "--rtsp-transport" => file.rtsp_transport = Some(next_value(&mut it, &a)?),
            "--record" => file.record = Some(PathBuf::from(next_value(&mut it, &a)?)),
            "--forward-rtp" => file.forward_rtp = Some(next_value(&mut it, &a)?),
            "--json" => json = true,
            other => return Err(ConfigError(format!("unknown option {other:?}"))),
        }
    }
    let homeserver = file.homeserver.ok_or_else(|| {
        ConfigError("--homeserver is required (or `homeserver` in --config)".into())
    })?;
    if !(homeserver.starts_with("http://") || homeserver.starts_with("https://")) {
        return Err(ConfigError(format!(
            "--homeserver must be an http:// or https:// URL, got {homeserver:?}"
        )));
    }
    let user = user_id(
        &file
            .user
            .ok_or_else(|| ConfigError("--user is required (or `user` in --config)".into()))?,
        "--user",
    )?;
    let auth = match (env("CALL_ASSIST_ACCESS_TOKEN"), env("CALL_ASSIST_PASSWORD")) {
        (_, Some(p)) if !p.is_empty() => Auth::Password(Secret::new(p)),
        (Some(t), _) if !t.is_empty() => Auth::AccessToken(Secret::new(t)),
        _ => {
            return Err(ConfigError(
                "set CALL_ASSIST_PASSWORD or CALL_ASSIST_ACCESS_TOKEN in the environment".into(),
            ))
        }
    };
    let duration = file.duration_s.map(Duration::from_secs);
    let mode = match command {
        "check" => Mode::Check,
        "call" => {
            let target = match (file.room, file.to) {
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
            Mode::Call {
                target,
                duration: duration.unwrap_or(Duration::from_secs(10)),
            }
        }
        _ => Mode::Listen {
            allow: file
                .allow
                .unwrap_or_default()
                .iter()
                .map(|u| user_id(u, "--allow"))
                .collect::<Result<_, _>>()?,
            max_calls: file.max_calls,
            hangup_after: duration,
        },
    };
    let state_dir = file.state_dir.or_else(|| {
        env("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|h| Path::new(&h).join(".local/state")))
            .map(|p| p.join("call-assist"))
    });
    Ok(LiveOptions {
        homeserver,
        user,
        auth,
        mode,
        json,
        state_dir,
        allow_loopback: file.allow_loopback.unwrap_or(false),
        interfaces: file.interfaces.unwrap_or_default(),
        exclude_interfaces: file.exclude_interfaces.unwrap_or_default(),
        video: parse_video(file.video_codec.as_deref().unwrap_or("auto"))?,
        port: file.port.unwrap_or(0),
        stun: file.stun.unwrap_or_default(),
        turn: turn_options(file.turn, file.turn_user, env("CALL_ASSIST_TURN_PASSWORD"))?,
        relay_only: file.relay_only.unwrap_or(false),
        media: MediaOptions {
            video: file.video.unwrap_or_else(|| "testclip".into()),
            audio: file.audio,
            video_fps: file.video_fps.unwrap_or(DEFAULT_FILE_FPS),
            rtsp_transport: file
                .rtsp_transport
                .as_deref()
                .unwrap_or("tcp")
                .parse()
                .map_err(|e| ConfigError(format!("--rtsp-transport: {e}")))?,
            record: file.record,
            forward_rtp: file.forward_rtp.map(|f| parse_forward(&f)).transpose()?,
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

/// What is kept between runs, so a restart reuses the same device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedSession {
    pub homeserver: String,
    pub user_id: String,
    pub device_id: String,
    pub access_token: String,
}

impl SavedSession {
    fn path(dir: &Path) -> PathBuf {
        dir.join("session.json")
    }

    /// The saved session for this homeserver and user, if any.
    pub fn load(dir: &Path, homeserver: &str, user: &OwnedUserId) -> Option<SavedSession> {
        let text = std::fs::read_to_string(Self::path(dir)).ok()?;
        let s: SavedSession = match serde_json::from_str(&text) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("ignoring unreadable {}: {e}", Self::path(dir).display());
                return None;
            }
        };
        (s.homeserver == homeserver && s.user_id == user.as_str()).then_some(s)
    }

    /// Writes the session, readable by the owner only.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let path = Self::path(dir);
        let tmp = dir.join("session.json.tmp");
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, text)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        }
        std::fs::rename(tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    fn args(s: &str) -> impl Iterator<Item = String> {
        s.split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn turn_flags_need_all_three_parts() {
        let base = "--homeserver http://h --user @a:h";
        let o = parse(
            "check",
            args(&format!(
                "{base} --turn turn:192.0.2.1:3478?transport=udp --turn-user u --relay-only"
            )),
            env(&[
                ("CALL_ASSIST_PASSWORD", "pw"),
                ("CALL_ASSIST_TURN_PASSWORD", "tp"),
            ]),
        )
        .unwrap();
        assert!(matches!(o.mode, Mode::Check));
        assert!(o.relay_only);
        let t = o.turn.unwrap();
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
                args(&format!("{base} {flags}")),
                env(&[("CALL_ASSIST_PASSWORD", "pw")]),
            )
            .unwrap_err();
            assert!(e.0.contains(needle), "{flags}: {e}");
        }
    }

    #[test]
    fn call_flags_parse() {
        let o = parse(
            "call",
            args("--homeserver http://127.0.0.1:8008 --user @a:localhost --to @b:localhost --duration-s 3 --json"),
            env(&[("CALL_ASSIST_PASSWORD", "pw")]),
        )
        .unwrap();
        assert!(o.json);
        assert!(
            matches!(o.mode, Mode::Call { target: Target::User(_), duration } if duration == Duration::from_secs(3))
        );
    }

    #[test]
    fn missing_secret_and_bad_ids_are_clear_errors() {
        let e = parse(
            "call",
            args("--homeserver http://h --user @a:h --to @b:h"),
            env(&[]),
        )
        .unwrap_err();
        assert!(e.0.contains("CALL_ASSIST_PASSWORD"));
        let e = parse(
            "call",
            args("--homeserver http://h --user alice --to @b:h"),
            env(&[("CALL_ASSIST_PASSWORD", "x")]),
        )
        .unwrap_err();
        assert!(e.0.contains("--user"), "{e}");
        let e = parse(
            "call",
            args("--homeserver ftp://h --user @a:h --to @b:h"),
            env(&[("CALL_ASSIST_PASSWORD", "x")]),
        )
        .unwrap_err();
        assert!(e.0.contains("http"), "{e}");
        let e = parse(
            "call",
            args("--homeserver http://h --user @a:h"),
            env(&[("CALL_ASSIST_PASSWORD", "x")]),
        )
        .unwrap_err();
        assert!(e.0.contains("--room"), "{e}");
    }

    #[test]
    fn config_file_with_unknown_key_names_it() {
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
            "homeserver = \"http://h\"\nuser = \"@a:h\"\nallow = [\"@b:h\"]\n",
        )
        .unwrap();
        let o = parse(
            "listen",
            vec!["--config".to_owned(), p.display().to_string()].into_iter(),
            env(&[("CALL_ASSIST_PASSWORD", "x")]),
        )
        .unwrap();
        assert!(matches!(o.mode, Mode::Listen { ref allow, .. } if allow.len() == 1));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn session_round_trip() {
        let dir = std::env::temp_dir().join(format!("ca-state-{}", std::process::id()));
        let user = OwnedUserId::try_from("@a:h").unwrap();
        let s = SavedSession {
            homeserver: "http://h".into(),
            user_id: user.to_string(),
            device_id: "DEV".into(),
            access_token: "tok".into(),
        };
        s.save(&dir).unwrap();
        assert_eq!(SavedSession::load(&dir, "http://h", &user), Some(s));
        assert_eq!(SavedSession::load(&dir, "http://other", &user), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
