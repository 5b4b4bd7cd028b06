//! The Matrix account a live mode runs as, and the session kept between runs so a restart
//! reuses the same device.

use std::path::{Path, PathBuf};

use call_assist_core::{Credentials, OwnedUserId, Secret};
use serde::{Deserialize, Serialize};

/// How the account logs in; secrets come from the environment or files, never from flags.
#[derive(Debug, Clone)]
pub enum Auth {
    Password(Secret),
    AccessToken(Secret),
}

/// Who the agent logs in as, and where its device is kept.
#[derive(Debug, Clone)]
pub struct Account {
    pub homeserver: String,
    pub user: OwnedUserId,
    pub auth: Auth,
    pub state_dir: Option<PathBuf>,
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

/// What to log in with: a saved access token first, with the password (if any) kept as the
/// fallback for when the token is refused; else what the config gives.
pub(crate) fn login_credentials(
    auth: &Auth,
    saved: Option<&SavedSession>,
) -> (Credentials, Option<Secret>) {
    match (auth, saved) {
        (Auth::Password(pw), Some(s)) => (
            Credentials::AccessToken(Secret::new(s.access_token.clone())),
            Some(pw.clone()),
        ),
        (Auth::Password(pw), None) => (Credentials::Password(pw.clone()), None),
        (Auth::AccessToken(t), _) => (Credentials::AccessToken(t.clone()), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
