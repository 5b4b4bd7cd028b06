//! `serve` settings: one TOML file with the Matrix account, the local API, the network and
//! the named stations. Every error names the key and its line; secrets come from the
//! environment or from files the config names, never from the config itself.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use call_assist_core::{OwnedUserId, Secret};
use serde::Deserialize;
use toml::Spanned;

pub use super::webhook::WebhookConfig;
use super::webhook::{DEFAULT_EVENTS, MORE_EVENTS};
pub use crate::live::config::NetworkConfig;
use crate::live::config::{Auth, MediaOptions, DEFAULT_FILE_FPS};
use crate::media::pump::VideoChoice;

/// Where the API listens unless `api.listen` says otherwise.
pub const DEFAULT_API_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8765);

/// A config that cannot be used: the message names the file, the line and the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    matrix: MatrixSection,
    #[serde(default)]
    api: ApiSection,
    #[serde(default)]
    network: NetworkSection,
    #[serde(default)]
    station: Vec<StationSection>,
    #[serde(default)]
    webhook: Vec<WebhookSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookSection {
    /// A file holding the URL: a Home Assistant webhook id is a secret.
    url_file: Spanned<PathBuf>,
    events: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MatrixSection {
    homeserver: Spanned<String>,
    user: Spanned<String>,
    password_file: Option<Spanned<PathBuf>>,
    access_token_file: Option<Spanned<PathBuf>>,
    state_dir: Option<PathBuf>,
    /// Direct rooms the hub creates are not end-to-end encrypted.
    #[serde(default)]
    unencrypted_dm: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiSection {
    listen: Option<Spanned<String>>,
    token_file: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkSection {
    #[serde(default)]
    allow_loopback: bool,
    #[serde(default)]
    interfaces: Vec<String>,
    #[serde(default)]
    exclude_interfaces: Vec<String>,
    #[serde(default)]
    port: u16,
    #[serde(default)]
    stun: Vec<String>,
    /// `turn:` URIs used instead of the homeserver's.
    #[serde(default)]
    turn: Vec<String>,
    turn_user: Option<String>,
    /// The TURN password (else CALL_ASSIST_TURN_PASSWORD).
    turn_password_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    relay_only: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StationSection {
    name: Spanned<String>,
    video: Option<Spanned<String>>,
    audio: Option<Spanned<String>>,
    video_fps: Option<Spanned<u32>>,
    video_codec: Option<Spanned<String>>,
    rtsp_transport: Option<Spanned<String>>,
    rtsp_password_file: Option<Spanned<PathBuf>>,
    record: Option<PathBuf>,
    forward_rtp: Option<Spanned<String>>,
    #[serde(default)]
    answer: Vec<Spanned<String>>,
    #[serde(default)]
    may_call: Vec<Spanned<String>>,
    /// DTMF digits that open the door (a `door` event) when pressed in this station's call.
    pin: Option<Spanned<String>>,
    /// A file holding the PIN, so it need not be in the config (like the other secrets).
    pin_file: Option<Spanned<PathBuf>>,
    /// The caller's voice at the door: the call's audio to the camera's speaker.
    talkback: Option<Spanned<bool>>,
    /// The caller's voice from the hub's own speaker: an ALSA device.
    speaker: Option<Spanned<String>>,
}

/// The local HTTP API.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Required as `Authorization: Bearer <token>` on every request when set.
    pub token: Option<Secret>,
}

/// A camera plus a place to show the other side, and who it talks to.
#[derive(Debug, Clone)]
pub struct StationConfig {
    pub name: String,
    pub media: MediaOptions,
    pub video: VideoChoice,
    pub rtsp_password: Option<Secret>,
    /// Calls from these users are answered by this station.
    pub answer: Vec<OwnedUserId>,
    /// This station may call these users (or rooms whose other member is one of them).
    pub may_call: Vec<OwnedUserId>,
    /// DTMF digits (upper case) that raise `door` when pressed in a call of this station.
    pub pin: Option<Secret>,
}

impl StationConfig {
    /// The video source for `GET /stations`: a camera URL may carry a user name, so only its
    /// scheme and host.
    pub fn media_video(&self) -> String {
        let v = &self.media.video;
        match url::Url::parse(v) {
            Ok(u) if u.scheme() == "rtsp" => format!("rtsp://{}", u.host_str().unwrap_or("")),
            _ => v.clone(),
        }
    }

    /// What needs a restart to change: everything but `answer`, `may_call` and `pin`.
    fn same_media(&self, other: &StationConfig) -> bool {
        self.name == other.name
            && self.media == other.media
            && self.video == other.video
            && self.rtsp_password.as_ref().map(Secret::expose)
                == other.rtsp_password.as_ref().map(Secret::expose)
    }
}

/// A checked `serve` config.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub path: PathBuf,
    pub homeserver: String,
    pub user: OwnedUserId,
    pub auth: Auth,
    pub state_dir: Option<PathBuf>,
    /// Direct rooms the hub creates are end-to-end encrypted (`matrix.unencrypted_dm` off).
    pub encrypt_new_dms: bool,
    pub api: ApiConfig,
    pub network: NetworkConfig,
    pub stations: Vec<StationConfig>,
    pub webhooks: Vec<WebhookConfig>,
}

impl ServeConfig {
    /// Reads and checks `path`; secrets from the files it names or from `env`.
    pub fn load(path: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config {}: {e}", path.display())))?;
        Self::parse(path, &text, env)
    }

    /// Checks the config `text` (read from `path`, which names it in errors).
    pub fn parse(
        path: &Path,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let at = |span: Option<Range<usize>>, key: &str, msg: &str| -> ConfigError {
            let line = span.map(|s| line_of(text, s.start));
            ConfigError(match line {
                Some(l) => format!("config {}, line {l}: {key}: {msg}", path.display()),
                None => format!("config {}: {key}: {msg}", path.display()),
            })
        };
        let file: FileConfig = toml::from_str(text).map_err(|e| {
            let span = e.span();
            let key = span
                .clone()
                .map(|s| key_at(text, s.start))
                .unwrap_or_default();
            let key = if key.is_empty() { "config".into() } else { key };
            at(span, &key, e.message().trim())
        })?;

        let m = &file.matrix;
        let homeserver = m.homeserver.get_ref().trim_end_matches('/').to_owned();
        if !(homeserver.starts_with("http://") || homeserver.starts_with("https://")) {
            return Err(at(
                Some(m.homeserver.span()),
                "matrix.homeserver",
                &format!("must be an http:// or https:// URL, got {homeserver:?}"),
            ));
        }
        let user = user_id(&m.user, "matrix.user", &at)?;
        let env: &dyn Fn(&str) -> Option<String> = &env;
        let auth = auth(m, &at, env)?;
        let state_dir = m.state_dir.clone().or_else(|| {
            env("XDG_STATE_HOME")
                .map(PathBuf::from)
                .or_else(|| env("HOME").map(|h| Path::new(&h).join(".local/state")))
                .map(|p| p.join("call-assist"))
        });
        let api = api(&file.api, &at, env)?;
        let network = network(&file.network, &at, env)?;
        if file.station.is_empty() {
            return Err(at(
                None,
                "station",
                "no [[station]]: add at least one (name, video, audio, answer, may_call)",
            ));
        }
        let mut stations: Vec<StationConfig> = Vec::new();
        for s in &file.station {
            stations.push(station(s, &at, &env, &stations)?);
        }
        let webhooks = file
            .webhook
            .iter()
            .map(|w| webhook(w, &at))
            .collect::<Result<_, _>>()?;
        Ok(ServeConfig {
            path: path.to_owned(),
            homeserver,
            user,
            auth,
            state_dir,
            encrypt_new_dms: cfg!(feature = "e2ee") && !m.unencrypted_dm,
            api,
            network,
            stations,
            webhooks,
        })
    }

    /// Who may ring the agent: everyone a station answers, and everyone a station may call
    /// (so that a room they invite the hub to is joined).
    pub fn callers(&self) -> Vec<OwnedUserId> {
        let mut all: Vec<OwnedUserId> = self
            .stations
            .iter()
            .flat_map(|s| s.answer.iter().chain(&s.may_call))
            .cloned()
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// The station that answers calls from `user`.
    pub fn answering_station(&self, user: &str) -> Option<usize> {
        self.stations
            .iter()
            .position(|s| s.answer.iter().any(|u| u.as_str() == user))
    }

    /// The settings of `new` that differ from `self` and cannot change without a restart
    /// (everything but the stations' `answer` and `may_call` lists and `pin`).
    pub fn needs_restart(&self, new: &ServeConfig) -> Vec<String> {
        let mut keys = Vec::new();
        if self.homeserver != new.homeserver {
            keys.push("matrix.homeserver".to_owned());
        }
        if self.user != new.user {
            keys.push("matrix.user".to_owned());
        }
        if self.state_dir != new.state_dir {
            keys.push("matrix.state_dir".to_owned());
        }
        if self.encrypt_new_dms != new.encrypt_new_dms {
            keys.push("matrix.unencrypted_dm".to_owned());
        }
        if self.api.listen != new.api.listen {
            keys.push("api.listen".to_owned());
        }
        if self.api.token.as_ref().map(Secret::expose) != new.api.token.as_ref().map(Secret::expose)
        {
            keys.push("api token".to_owned());
        }
        if self.network != new.network {
            keys.push("network".to_owned());
        }
        if self.webhooks != new.webhooks {
            keys.push("webhook".to_owned());
        }
        let names = |c: &ServeConfig| {
            c.stations
                .iter()
                .map(|s| s.name.clone())
                .collect::<Vec<_>>()
        };
        if names(self) != names(new) {
            keys.push("station (added, removed or renamed)".to_owned());
        } else {
            for (a, b) in self.stations.iter().zip(&new.stations) {
                if !a.same_media(b) {
                    keys.push(format!("station {:?} sources or sinks", a.name));
                }
            }
        }
        keys
    }
}

type At<'a> = dyn Fn(Option<Range<usize>>, &str, &str) -> ConfigError + 'a;

fn webhook(w: &WebhookSection, at: &At<'_>) -> Result<WebhookConfig, ConfigError> {
    let url = read_secret(&w.url_file, "webhook.url_file", at)?;
    let ok = url::Url::parse(url.expose())
        .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
    if !ok {
        return Err(at(
            Some(w.url_file.span()),
            "webhook.url_file",
            &format!(
                "{} does not hold an http:// or https:// URL",
                w.url_file.get_ref().display()
            ),
        ));
    }
    let events = match &w.events {
        None => DEFAULT_EVENTS.iter().map(|e| (*e).to_owned()).collect(),
        Some(list) => {
            let known = || DEFAULT_EVENTS.iter().chain(MORE_EVENTS);
            for e in list {
                if !known().any(|k| k == e.get_ref()) {
                    let all: Vec<&str> = known().copied().collect();
                    return Err(at(
                        Some(e.span()),
                        "webhook.events",
                        &format!("{:?}: use some of {}", e.get_ref(), all.join(", ")),
                    ));
                }
            }
            list.iter().map(|e| e.get_ref().clone()).collect()
        }
    };
    Ok(WebhookConfig { url, events })
}

type Env<'a> = dyn Fn(&str) -> Option<String> + 'a;

/// A secret from the file `f` names (trimmed, not empty).
fn read_secret(f: &Spanned<PathBuf>, key: &str, at: &At<'_>) -> Result<Secret, ConfigError> {
    let p = f.get_ref();
    let s = std::fs::read_to_string(p).map_err(|e| {
        at(
            Some(f.span()),
            key,
            &format!("cannot read {}: {e}", p.display()),
        )
    })?;
    let s = s.trim();
    if s.is_empty() {
        return Err(at(
            Some(f.span()),
            key,
            &format!("{} is empty", p.display()),
        ));
    }
    Ok(Secret::new(s))
}

fn auth(m: &MatrixSection, at: &At<'_>, env: &Env<'_>) -> Result<Auth, ConfigError> {
    Ok(match (&m.password_file, &m.access_token_file) {
        (Some(_), Some(t)) => {
            return Err(at(
                Some(t.span()),
                "matrix.access_token_file",
                "give either password_file or access_token_file, not both",
            ))
        }
        (Some(p), None) => Auth::Password(read_secret(p, "matrix.password_file", at)?),
        (None, Some(t)) => Auth::AccessToken(read_secret(t, "matrix.access_token_file", at)?),
        (None, None) => match (env("CALL_ASSIST_PASSWORD"), env("CALL_ASSIST_ACCESS_TOKEN")) {
            (Some(p), _) if !p.is_empty() => Auth::Password(Secret::new(p)),
            (_, Some(t)) if !t.is_empty() => Auth::AccessToken(Secret::new(t)),
            _ => {
                return Err(at(
                    None,
                    "matrix",
                    "no secret: set password_file or access_token_file, or \
                     CALL_ASSIST_PASSWORD or CALL_ASSIST_ACCESS_TOKEN in the environment",
                ))
            }
        },
    })
}

fn api(a: &ApiSection, at: &At<'_>, env: &Env<'_>) -> Result<ApiConfig, ConfigError> {
    let listen = match &a.listen {
        None => DEFAULT_API_LISTEN,
        Some(l) => l.get_ref().parse().map_err(|_| {
            at(
                Some(l.span()),
                "api.listen",
                &format!("{:?} is not IP:PORT (e.g. 127.0.0.1:8765)", l.get_ref()),
            )
        })?,
    };
    let token = match &a.token_file {
        Some(f) => Some(read_secret(f, "api.token_file", at)?),
        None => env("CALL_ASSIST_API_TOKEN")
            .filter(|t| !t.is_empty())
            .map(Secret::new),
    };
    if token.is_none() && !listen.ip().is_loopback() {
        return Err(at(
            a.listen.as_ref().map(Spanned::span),
            "api.listen",
            &format!(
                "{listen} is reachable from other hosts, so a bearer token is required: \
                 set api.token_file or CALL_ASSIST_API_TOKEN"
            ),
        ));
    }
    Ok(ApiConfig { listen, token })
}

fn network(n: &NetworkSection, at: &At<'_>, env: &Env<'_>) -> Result<NetworkConfig, ConfigError> {
    let turn_password = match &n.turn_password_file {
        Some(f) => Some(
            read_secret(f, "network.turn_password_file", at)?
                .expose()
                .to_owned(),
        ),
        None => env("CALL_ASSIST_TURN_PASSWORD"),
    };
    let turn = crate::live::config::turn_options(
        (!n.turn.is_empty()).then(|| n.turn.clone()),
        n.turn_user.clone(),
        turn_password,
    )
    .map_err(|e| {
        let msg =
            e.0.replace("--turn-user", "network.turn_user")
                .replace("--turn", "network.turn")
                .replace(
                    "the TURN password in CALL_ASSIST_TURN_PASSWORD",
                    "network.turn_password_file or CALL_ASSIST_TURN_PASSWORD",
                );
        at(None, "network.turn", &msg)
    })?;
    Ok(NetworkConfig {
        allow_loopback: n.allow_loopback,
        interfaces: n.interfaces.clone(),
        exclude_interfaces: n.exclude_interfaces.clone(),
        port: n.port,
        stun: n.stun.clone(),
        turn,
        relay_only: n.relay_only,
    })
}

fn user_id(s: &Spanned<String>, key: &str, at: &At<'_>) -> Result<OwnedUserId, ConfigError> {
    OwnedUserId::try_from(s.get_ref().as_str()).map_err(|e| {
        at(
            Some(s.span()),
            key,
            &format!(
                "{:?} is not a Matrix user id (@user:server): {e}",
                s.get_ref()
            ),
        )
    })
}

/// A station's name: short, plain and unique.
fn station_name(
    s: &StationSection,
    at: &At<'_>,
    earlier: &[StationConfig],
) -> Result<String, ConfigError> {
    let name = s.name.get_ref().clone();
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !name_ok {
        return Err(at(
            Some(s.name.span()),
            "station.name",
            &format!("{name:?}: use 1 to 64 letters, digits, '-' or '_'"),
        ));
    }
    if earlier.iter().any(|e| e.name == name) {
        return Err(at(
            Some(s.name.span()),
            "station.name",
            &format!("two stations are named {name:?}"),
        ));
    }
    Ok(name)
}

/// A station's video and audio sources, checked (files must exist).
fn sources(
    s: &StationSection,
    key: &dyn Fn(&str) -> String,
    at: &At<'_>,
) -> Result<(String, Option<String>), ConfigError> {
    let video = s
        .video
        .as_ref()
        .map_or("testclip".to_owned(), |v| v.get_ref().clone());
    let video_ok = matches!(video.as_str(), "testclip" | "none")
        || video.starts_with("rtsp://")
        || video.starts_with("file:");
    if !video_ok {
        return Err(at(
            s.video.as_ref().map(Spanned::span),
            &key("video"),
            &format!("{video:?}: use testclip, none, file:PATH (H.264 Annex B) or rtsp://..."),
        ));
    }
    let file_missing = |v: &str| {
        v.strip_prefix("file:")
            .is_some_and(|p| !Path::new(p).is_file())
    };
    if file_missing(&video) {
        return Err(at(
            s.video.as_ref().map(Spanned::span),
            &key("video"),
            &format!("{video:?}: no such file"),
        ));
    }
    let audio = s.audio.as_ref().map(|a| a.get_ref().clone());
    if let (Some(a), Some(span)) = (&audio, s.audio.as_ref().map(Spanned::span)) {
        if file_missing(a) {
            return Err(at(
                Some(span),
                &key("audio"),
                &format!("{a:?}: no such file"),
            ));
        }
    }
    if let (Some(a), Some(span)) = (&audio, s.audio.as_ref().map(Spanned::span)) {
        let ok = matches!(a.as_str(), "tone" | "camera" | "none")
            || a.starts_with("file:")
            || a.strip_prefix("alsa:").is_some_and(|d| !d.is_empty());
        if !ok {
            return Err(at(
                Some(span),
                &key("audio"),
                &format!(
                    "{a:?}: use tone, camera, none, file:PATH (Ogg Opus) or alsa:DEVICE (a microphone)"
                ),
            ));
        }
    }
    Ok((video, audio))
}

/// Whom a station answers (each caller by one station only) and whom it may call.
fn people(
    s: &StationSection,
    key: &dyn Fn(&str) -> String,
    at: &At<'_>,
    earlier: &[StationConfig],
) -> Result<(Vec<OwnedUserId>, Vec<OwnedUserId>), ConfigError> {
    let mut answer = Vec::new();
    for u in &s.answer {
        let id = user_id(u, &key("answer"), at)?;
        if let Some(other) = earlier.iter().find(|e| e.answer.contains(&id)) {
            return Err(at(
                Some(u.span()),
                &key("answer"),
                &format!("{id} is already answered by station {:?}", other.name),
            ));
        }
        answer.push(id);
    }
    let may_call: Vec<OwnedUserId> = s
        .may_call
        .iter()
        .map(|u| user_id(u, &key("may_call"), at))
        .collect::<Result<_, _>>()?;
    Ok((answer, may_call))
}

fn station(
    s: &StationSection,
    at: &At<'_>,
    env: &dyn Fn(&str) -> Option<String>,
    earlier: &[StationConfig],
) -> Result<StationConfig, ConfigError> {
    let name = station_name(s, at, earlier)?;
    let key = |k: &str| format!("station {name:?} {k}");
    let (video, audio) = sources(s, &key, at)?;
    let video_fps = match &s.video_fps {
        Some(f) if !(1..=240).contains(f.get_ref()) => {
            return Err(at(Some(f.span()), &key("video_fps"), "must be 1..240"))
        }
        Some(f) => *f.get_ref(),
        None => DEFAULT_FILE_FPS,
    };
    let video_choice = match &s.video_codec {
        None => VideoChoice::Auto,
        Some(v) => crate::live::config::parse_video(v.get_ref()).map_err(|_| {
            at(
                Some(v.span()),
                &key("video_codec"),
                &format!("{:?}: use auto, h264 or vp8", v.get_ref()),
            )
        })?,
    };
    let rtsp_transport = match &s.rtsp_transport {
        None => Default::default(),
        Some(t) => t
            .get_ref()
            .parse()
            .map_err(|e: String| at(Some(t.span()), &key("rtsp_transport"), &e))?,
    };
    let rtsp_password = match &s.rtsp_password_file {
        Some(f) => {
            let p = f.get_ref();
            let pw = std::fs::read_to_string(p).map_err(|e| {
                at(
                    Some(f.span()),
                    &key("rtsp_password_file"),
                    &format!("cannot read {}: {e}", p.display()),
                )
            })?;
            Some(Secret::new(pw.trim_end_matches(['\r', '\n'])))
        }
        None => env("CALL_ASSIST_RTSP_PASSWORD")
            .filter(|p| !p.is_empty())
            .map(Secret::new),
    };
    let forward_rtp = match &s.forward_rtp {
        None => None,
        Some(f) => Some(
            crate::live::config::parse_forward(f.get_ref()).map_err(|e| {
                at(
                    Some(f.span()),
                    &key("forward_rtp"),
                    e.0.trim_start_matches("--forward-rtp: "),
                )
            })?,
        ),
    };
    let (answer, may_call) = people(s, &key, at, earlier)?;
    let pin = station_pin(s, &key, at)?;
    let talkback = s.talkback.as_ref().is_some_and(|t| *t.get_ref());
    if talkback && !video.starts_with("rtsp://") {
        return Err(at(
            s.talkback.as_ref().map(Spanned::span),
            &key("talkback"),
            "needs an rtsp:// camera as video (talkback plays through the camera's speaker)",
        ));
    }
    let speaker = match &s.speaker {
        Some(d) if d.get_ref().trim().is_empty() => {
            return Err(at(
                Some(d.span()),
                &key("speaker"),
                "needs an ALSA device name (e.g. \"default\")",
            ))
        }
        d => d.as_ref().map(|d| d.get_ref().clone()),
    };
    Ok(StationConfig {
        name,
        media: MediaOptions {
            video,
            audio,
            video_fps,
            rtsp_transport,
            record: s.record.clone(),
            forward_rtp,
            talkback,
            speaker,
        },
        video: video_choice,
        rtsp_password,
        answer,
        may_call,
        pin,
    })
}

/// The station's PIN, from `pin` or the file `pin_file` names (not both).
fn station_pin(
    s: &StationSection,
    key: &dyn Fn(&str) -> String,
    at: &At<'_>,
) -> Result<Option<Secret>, ConfigError> {
    match (&s.pin, &s.pin_file) {
        (Some(_), Some(f)) => Err(at(
            Some(f.span()),
            &key("pin_file"),
            "give pin or pin_file, not both",
        )),
        (Some(p), None) => parse_pin(p.get_ref())
            .map(Some)
            .map_err(|e| at(Some(p.span()), &key("pin"), e)),
        (None, Some(f)) => {
            let pin = read_secret(f, &key("pin_file"), at)?;
            parse_pin(pin.expose())
                .map(Some)
                .map_err(|e| at(Some(f.span()), &key("pin_file"), e))
        }
        (None, None) => Ok(None),
    }
}

/// Longest station PIN (the rolling window of pressed digits is this long).
pub const MAX_PIN: usize = 16;

/// A station PIN: 1 to [`MAX_PIN`] DTMF digits. The message never repeats the PIN.
fn parse_pin(pin: &str) -> Result<Secret, &'static str> {
    let pin = pin.to_ascii_uppercase();
    let digits_ok = pin
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '*' | '#' | 'A'..='D'));
    if pin.is_empty() || pin.len() > MAX_PIN || !digits_ok {
        return Err("must be 1 to 16 DTMF digits (0-9 * # A-D)");
    }
    Ok(Secret::new(pin))
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()
        .get(..end)
        .map_or(0, |b| b.iter().filter(|c| **c == b'\n').count())
        + 1
}

/// The dotted key whose key or value is at byte `offset`: the nearest `key =` at or above
/// that line, inside the nearest `[table]` / `[[table]]` header above it.
fn key_at(text: &str, offset: usize) -> String {
    let line = line_of(text, offset);
    let lines: Vec<&str> = text.lines().collect();
    let mut key = None;
    let mut table = None;
    for l in lines.iter().take(line).rev() {
        let t = l.trim();
        if t.starts_with('[') {
            table = Some(t.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
            break;
        }
        if key.is_none() {
            if let Some((k, _)) = t.split_once('=') {
                if !t.starts_with('#') {
                    key = Some(k.trim().trim_matches('"').to_owned());
                }
            }
        }
    }
    match (table, key) {
        (Some(t), Some(k)) => format!("{t}.{k}"),
        (Some(t), None) => t,
        (None, Some(k)) => k,
        (None, None) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[matrix]
homeserver = "http://127.0.0.1:8008"
user = "@hub:localhost"

[api]
listen = "127.0.0.1:0"

[network]
allow_loopback = true

[[station]]
name = "door"
video = "testclip"
audio = "tone"
answer = ["@me:localhost"]
may_call = ["@me:localhost", "@you:localhost"]

[[station]]
name = "garden"
answer = ["@you:localhost"]
"#;

    fn env(k: &str) -> Option<String> {
        (k == "CALL_ASSIST_PASSWORD").then(|| "pw".to_owned())
    }

    fn parse(text: &str) -> Result<ServeConfig, ConfigError> {
        ServeConfig::parse(Path::new("hub.toml"), text, env)
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().0
    }

    #[test]
    fn a_good_config_parses() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.stations.len(), 2);
        assert_eq!(c.answering_station("@you:localhost"), Some(1));
        assert_eq!(c.answering_station("@nobody:localhost"), None);
        assert_eq!(c.callers().len(), 2);
        assert!(c.network.allow_loopback);
        assert!(matches!(c.auth, Auth::Password(_)));
    }

    #[test]
    fn turn_in_the_network_section() {
        let with = |extra: &str| {
            GOOD.replace(
                "allow_loopback = true",
                &format!("allow_loopback = true\n{extra}"),
            )
        };
        let e = err(&with(
            "turn = [\"turn:192.0.2.1:3478\"]\nturn_user = \"hub\"",
        ));
        assert!(
            e.contains("network.turn")
                && e.contains("network.turn_password_file or CALL_ASSIST_TURN_PASSWORD"),
            "{e}"
        );
        let e = err(&with("turn = [\"turns:192.0.2.1\"]\nturn_user = \"hub\""));
        assert!(e.contains("only turn: URIs over UDP"), "{e}");
        let dir = std::env::temp_dir().join(format!("ca-serve-turn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("turn.pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let c = parse(&with(&format!(
            "turn = [\"turn:192.0.2.1:3478\"]\nturn_user = \"hub\"\nturn_password_file = {:?}\nrelay_only = true",
            pw.display().to_string()
        )))
        .unwrap();
        let t = c.network.turn.unwrap();
        assert_eq!(
            (t.username.as_str(), t.password.expose()),
            ("hub", "s3cret")
        );
        assert!(c.network.relay_only);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_station_names_its_speaker_and_microphone() {
        let c = parse(GOOD).unwrap();
        assert!(c.stations.iter().all(|s| s.media.speaker.is_none()));
        let c = parse(&GOOD.replace(
            "name = \"garden\"",
            "name = \"garden\"\nspeaker = \"default\"\naudio = \"alsa:plughw:1\"",
        ))
        .unwrap();
        assert_eq!(c.stations[1].media.speaker.as_deref(), Some("default"));
        assert_eq!(c.stations[1].media.audio.as_deref(), Some("alsa:plughw:1"));
        let e = err(&GOOD.replace("name = \"garden\"", "name = \"garden\"\nspeaker = \" \""));
        assert!(
            e.contains("station \"garden\" speaker") && e.contains("ALSA device"),
            "{e}"
        );
    }

    #[test]
    fn talkback_is_off_by_default_and_needs_a_camera() {
        let c = parse(GOOD).unwrap();
        assert!(c.stations.iter().all(|s| !s.media.talkback));
        let e = err(&GOOD.replace("name = \"garden\"", "name = \"garden\"\ntalkback = true"));
        assert!(
            e.contains("line 21")
                && e.contains("station \"garden\" talkback")
                && e.contains("rtsp://"),
            "{e}"
        );
        let c = parse(&GOOD.replace(
            "name = \"garden\"",
            "name = \"garden\"\nvideo = \"rtsp://cam@192.0.2.7/s\"\ntalkback = true",
        ))
        .unwrap();
        assert!(c.stations[1].media.talkback);
        assert!(
            err(&GOOD.replace("name = \"garden\"", "name = \"garden\"\ntalkback = 1"))
                .contains("talkback")
        );
    }

    #[test]
    fn a_station_pin_is_checked_and_never_repeated_in_errors() {
        let with = |pin: &str| {
            GOOD.replace(
                "name = \"garden\"",
                &format!("name = \"garden\"\npin = {pin:?}"),
            )
        };
        let c = parse(&with("12#a")).unwrap();
        assert_eq!(c.stations[1].pin.as_ref().map(Secret::expose), Some("12#A"));
        assert!(c.stations[0].pin.is_none());
        assert!(!format!("{:?}", c.stations[1]).contains("12#A"));
        for bad in ["", "12x9", "12345678901234567"] {
            let e = err(&with(bad));
            assert!(
                e.contains("station \"garden\" pin") && e.contains("1 to 16 DTMF digits"),
                "{e}"
            );
            assert!(bad.is_empty() || !e.contains(bad), "{e}");
        }
        let dir = std::env::temp_dir().join(format!("ca-serve-pin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("door.pin");
        std::fs::write(&file, "4711#\n").unwrap();
        let from_file = GOOD.replace(
            "name = \"garden\"",
            &format!(
                "name = \"garden\"\npin_file = {:?}",
                file.display().to_string()
            ),
        );
        let c = parse(&from_file).unwrap();
        assert_eq!(
            c.stations[1].pin.as_ref().map(Secret::expose),
            Some("4711#")
        );
        let both = from_file.replace("pin_file", "pin = \"1\"\npin_file");
        assert!(err(&both).contains("give pin or pin_file, not both"));
        std::fs::write(&file, "47x1\n").unwrap();
        let e = err(&from_file);
        assert!(e.contains("pin_file") && !e.contains("47x1"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let e = err(&GOOD.replace("audio = \"tone\"", "audoi = \"tone\""));
        assert!(e.contains("line 15"), "{e}");
        assert!(e.contains("audoi"), "{e}");
    }

    #[test]
    fn a_wrong_type_names_the_key() {
        let e = err(&GOOD.replace("allow_loopback = true", "allow_loopback = \"yes\""));
        assert!(
            e.contains("line 10") && e.contains("network.allow_loopback"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_user_id_names_the_station_and_key() {
        let e = err(&GOOD.replace("answer = [\"@you:localhost\"]", "answer = [\"you\"]"));
        assert!(
            e.contains("line 21") && e.contains("\"garden\" answer"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_media_file_is_named() {
        let e = err(&GOOD.replace("audio = \"tone\"", "audio = \"file:/nonexistent/x.opus\""));
        assert!(
            e.contains("line 15") && e.contains("\"door\" audio") && e.contains("no such file"),
            "{e}"
        );
    }

    #[test]
    fn one_caller_is_answered_by_one_station() {
        let e = err(&GOOD.replace(
            "answer = [\"@you:localhost\"]",
            "answer = [\"@me:localhost\"]",
        ));
        assert!(e.contains("already answered by station \"door\""), "{e}");
    }

    #[test]
    fn a_public_api_needs_a_token() {
        let e = err(&GOOD.replace("127.0.0.1:0", "0.0.0.0:8765"));
        assert!(
            e.contains("line 7") && e.contains("api.listen") && e.contains("token"),
            "{e}"
        );
        let c = ServeConfig::parse(
            Path::new("hub.toml"),
            &GOOD.replace("127.0.0.1:0", "0.0.0.0:8765"),
            |k| match k {
                "CALL_ASSIST_PASSWORD" => Some("pw".into()),
                "CALL_ASSIST_API_TOKEN" => Some("t".into()),
                _ => None,
            },
        )
        .unwrap();
        assert_eq!(c.api.token.as_ref().map(Secret::expose), Some("t"));
    }

    #[test]
    fn webhooks_take_their_url_from_a_file_and_name_bad_events() {
        let dir = std::env::temp_dir().join(format!("ca-webhook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = dir.join("url");
        std::fs::write(&url, "http://127.0.0.1:8123/api/webhook/secret-id\n").unwrap();
        let hook = |extra: &str| format!("{GOOD}\n[[webhook]]\nurl_file = {url:?}\n{extra}");
        let c = parse(&hook("")).unwrap();
        assert_eq!(c.webhooks.len(), 1);
        assert_eq!(
            c.webhooks[0].url.expose(),
            "http://127.0.0.1:8123/api/webhook/secret-id"
        );
        assert_eq!(c.webhooks[0].events, DEFAULT_EVENTS);
        let c = parse(&hook("events = [\"ended\", \"panic\"]")).unwrap();
        assert_eq!(c.webhooks[0].events, ["ended", "panic"]);
        let e = err(&hook("events = [\"endd\"]"));
        assert!(e.contains("webhook.events") && e.contains("endd"), "{e}");
        std::fs::write(&url, "not a url").unwrap();
        let e = err(&hook(""));
        assert!(
            e.contains("webhook.url_file") && !e.contains("secret-id"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_secret_is_an_error() {
        let e = ServeConfig::parse(Path::new("hub.toml"), GOOD, |_| None)
            .unwrap_err()
            .0;
        assert!(e.contains("CALL_ASSIST_PASSWORD"), "{e}");
    }

    #[test]
    fn only_allow_lists_reload_without_a_restart() {
        let a = parse(GOOD).unwrap();
        let b =
            parse(&GOOD.replace("may_call = [\"@me:localhost\", \"@you:localhost\"]", "")).unwrap();
        assert!(a.needs_restart(&b).is_empty());
        let c = parse(&GOOD.replace("audio = \"tone\"", "audio = \"none\"")).unwrap();
        assert_eq!(
            a.needs_restart(&c),
            vec!["station \"door\" sources or sinks".to_owned()]
        );
    }
}
