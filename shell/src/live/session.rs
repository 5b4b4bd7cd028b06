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
    /// Direct rooms the hub creates are end-to-end encrypted, as Element creates them
    /// (always off in a build without the `e2ee` feature).
    pub encrypt_new_dms: bool,
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

    /// Writes the session, readable by the owner only from its first byte, in a state dir
    /// only the owner may enter.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        private_dir(dir)?;
        let path = Self::path(dir);
        let tmp = dir.join("session.json.tmp");
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        let _ = std::fs::remove_file(&tmp);
        let mut f = private_file().open(&tmp)?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(tmp, path)
    }
}

/// Creates `dir` with mode 0700; an existing dir is left as it is (it may be shared on
/// purpose), with a warning when others may enter it.
pub(crate) fn private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        b.mode(0o700);
        b.create(dir)?;
        let mode = std::fs::metadata(dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                "state dir {} is open to other users (mode {:o}); chmod 700 it",
                dir.display(),
                mode & 0o777
            );
        }
        Ok(())
    }
    #[cfg(not(unix))]
    b.create(dir)
}

/// Options that create a new file readable by the owner only (mode 0600 from the start).
pub(crate) fn private_file() -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o
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
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&dir), 0o700, "state dir");
            assert_eq!(mode(&dir.join("session.json")), 0o600, "session file");
        }
        s.save(&dir).unwrap();
        assert_eq!(SavedSession::load(&dir, "http://h", &user), Some(s));
        assert_eq!(SavedSession::load(&dir, "http://other", &user), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
