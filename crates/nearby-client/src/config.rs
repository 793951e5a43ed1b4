//! The login saved between runs of `nearby client`: which server, who, and
//! the bearer token. One small JSON file:
//!
//! ```json
//! {
//!   "server": "http://127.0.0.1:8080",
//!   "username": "alice",
//!   "user_id": "1",
//!   "token": "…64 hex digits…",
//!   "expires_at": 1796196059040
//! }
//! ```
//!
//! It lives at `$NEARBY_CLIENT_CONFIG`, else
//! `$XDG_CONFIG_HOME/nearby/client.json`, else `~/.config/nearby/client.json`.
//! It is written whole (a temporary file renamed over it) and, on Unix,
//! readable by its owner only, since the token is as good as the password
//! until it expires.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ClientError;

/// The file's contents. Everything but `server` is absent after `logout`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    /// The server logged in to (canonical form, see [`crate::Client::server`]).
    pub server: String,
    /// Who is logged in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Their id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// When the token stops working, Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

impl Saved {
    /// The token, if it was issued by `server` (a token is never sent to a
    /// server other than the one that issued it).
    pub fn token_for(&self, server: &str) -> Option<&str> {
        (same_server(&self.server, server))
            .then_some(self.token.as_deref())
            .flatten()
    }
}

/// Whether two server URLs name the same server: `localhost`, `[::1]` and
/// `127.0.0.1` are one host (this machine), and a trailing slash does not
/// count.
pub fn same_server(a: &str, b: &str) -> bool {
    fn canonical(s: &str) -> String {
        let s = s.trim().trim_end_matches('/').to_ascii_lowercase();
        let (scheme, rest) = s.split_once("://").unwrap_or(("http", &s));
        let (host_port, path) = rest.split_once('/').unwrap_or((rest, ""));
        let host_port = ["localhost", "[::1]"]
            .iter()
            .find_map(|h| {
                let port = host_port.strip_prefix(h)?;
                (port.is_empty() || port.starts_with(':')).then(|| format!("127.0.0.1{port}"))
            })
            .unwrap_or_else(|| host_port.to_owned());
        format!("{scheme}://{host_port}/{path}")
    }
    canonical(a) == canonical(b)
}

/// Where the login is kept.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    path: PathBuf,
}

impl ConfigFile {
    /// The file at `path`.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The file named by the environment (see the module docs).
    pub fn locate() -> Result<Self, ClientError> {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        if let Some(p) = var("NEARBY_CLIENT_CONFIG") {
            return Ok(Self::at(p));
        }
        let base = var("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|h| Path::new(&h).join(".config")))
            .or_else(|| var("APPDATA").map(PathBuf::from))
            .ok_or_else(|| ClientError::Config {
                path: "~/.config/nearby/client.json".into(),
                detail: "no home directory known; set NEARBY_CLIENT_CONFIG".into(),
            })?;
        Ok(Self::at(base.join("nearby").join("client.json")))
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved login; `None` if there is no file yet.
    pub fn load(&self) -> Result<Option<Saved>, ClientError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.error(e)),
        };
        serde_json::from_str(&text).map(Some).map_err(|e| {
            self.error(format!(
                "not a saved login ({e}); delete it or log in again"
            ))
        })
    }

    /// Replaces the file with `saved`.
    pub fn save(&self, saved: &Saved) -> Result<(), ClientError> {
        let text = serde_json::to_string_pretty(saved).map_err(|e| self.error(e))? + "\n";
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| self.error(e))?;
        }
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let written =
            write_private(&tmp, text.as_bytes()).and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.error(e));
        }
        Ok(())
    }

    fn error(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::Config {
            path: self.path.display().to_string(),
            detail: e.to_string(),
        }
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_loads_and_keeps_tokens_to_their_server() {
        let dir = tempfile::tempdir().unwrap();
        let file = ConfigFile::at(dir.path().join("sub").join("client.json"));
        assert_eq!(file.load().unwrap(), None);
        let saved = Saved {
            server: "http://127.0.0.1:8080".into(),
            username: Some("alice".into()),
            user_id: Some("1".into()),
            token: Some("abc".into()),
            expires_at: Some(5),
        };
        file.save(&saved).unwrap();
        let back = file.load().unwrap().unwrap();
        assert_eq!(back, saved);
        assert_eq!(back.token_for("http://127.0.0.1:8080"), Some("abc"));
        assert_eq!(back.token_for("http://127.0.0.1:9090"), None);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(file.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Logged out: only the server is left.
        file.save(&Saved {
            server: saved.server.clone(),
            ..Saved::default()
        })
        .unwrap();
        let text = std::fs::read_to_string(file.path()).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).unwrap(),
            serde_json::json!({ "server": "http://127.0.0.1:8080" })
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            1
        );
    }

    #[test]
    fn localhost_and_loopback_are_one_server() {
        assert!(same_server(
            "http://localhost:8080",
            "http://127.0.0.1:8080/"
        ));
        assert!(same_server("http://[::1]:8080/", "http://127.0.0.1:8080"));
        assert!(same_server(
            "http://LOCALHOST:8080",
            "http://127.0.0.1:8080"
        ));
        assert!(!same_server(
            "http://localhost:8081",
            "http://127.0.0.1:8080"
        ));
        assert!(!same_server(
            "http://localhost.evil:8080",
            "http://127.0.0.1:8080"
        ));
        assert!(!same_server("http://example.com", "http://127.0.0.1"));
    }

    #[test]
    fn a_damaged_file_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.json");
        std::fs::write(&path, "{not json").unwrap();
        let e = ConfigFile::at(&path).load().unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "config file {}: not a saved login",
                path.display()
            )),
            "{text}"
        );
    }
}
