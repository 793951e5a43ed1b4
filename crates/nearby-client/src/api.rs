//! The REST half: one method per route of `docs/protocol.md`.

use std::time::Duration;

use nearby_core::{FriendStatus, UserId};
use nearby_proto::rest::{
    ErrorBody, FriendList, FriendView, History, HistoryPoint, SessionCreated, SharingUpdate,
    UserView,
};
use nearby_proto::ws::{NearbyFriend, ServerFrame};
use reqwest::{Method, Url};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::ClientError;
use crate::live::Live;

/// Time allowed to open a TCP connection to the server.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for one whole REST call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A server's REST API, with or without a login token. Cheap to clone (the
/// connection pool is shared).
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
}

impl Client {
    /// A client of the server at `server`, e.g. `http://127.0.0.1:8080`
    /// (`http://` is assumed when no scheme is given). A path is kept as a
    /// prefix of every route, for servers behind a proxy.
    pub fn new(server: &str) -> Result<Self, ClientError> {
        let text = server.trim();
        let with_scheme = if text.contains("://") {
            text.to_owned()
        } else {
            format!("http://{text}")
        };
        let mut base = Url::parse(&with_scheme)
            .map_err(|e| ClientError::Invalid(format!("bad server URL {text:?}: {e}")))?;
        let refused = match base.scheme() {
            "http" => None,
            "https" => Some("this client speaks plain http:// only (no TLS built in)".to_owned()),
            other => Some(format!("scheme {other:?} is not http")),
        };
        if let Some(why) = refused {
            return Err(ClientError::Invalid(format!(
                "bad server URL {text:?}: {why}"
            )));
        }
        if base.host_str().unwrap_or_default().is_empty() {
            return Err(ClientError::Invalid(format!(
                "bad server URL {text:?}: no host"
            )));
        }
        base.set_query(None);
        base.set_fragment(None);
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .user_agent(concat!("nearby-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Invalid(format!("cannot set up HTTP: {e}")))?;
        Ok(Self {
            http,
            base,
            token: None,
        })
    }

    /// The same client, sending `token` as `Authorization: Bearer …`.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The server's base URL, without a trailing slash: the canonical
    /// spelling, used to tell whether a saved token belongs to this server.
    pub fn server(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_owned()
    }

    /// The token this client sends, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub(crate) fn require_token(&self) -> Result<&str, ClientError> {
        self.token
            .as_deref()
            .ok_or_else(|| ClientError::NotLoggedIn {
                server: self.server(),
            })
    }

    /// The URL of `segments` under the base (each segment percent-encoded).
    pub(crate) fn url(&self, segments: &[&str]) -> Result<Url, ClientError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| ClientError::Invalid(format!("{} cannot be a base URL", self.base)))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    /// `GET /healthz`: whether the server answers at all.
    pub async fn healthz(&self) -> Result<(), ClientError> {
        let _: serde_json::Value = self.json(Method::GET, &["healthz"], None, false).await?;
        Ok(())
    }

    /// `POST /v1/users`: create an account.
    pub async fn sign_up(&self, username: &str, password: &str) -> Result<UserView, ClientError> {
        let body = credentials(username, password);
        self.json(Method::POST, &["v1", "users"], Some(body), false)
            .await
    }

    /// `POST /v1/sessions`: log in. The token is in the answer; use
    /// [`Client::with_token`] to call with it.
    pub async fn log_in(
        &self,
        username: &str,
        password: &str,
    ) -> Result<SessionCreated, ClientError> {
        let body = credentials(username, password);
        self.json(Method::POST, &["v1", "sessions"], Some(body), false)
            .await
    }

    /// `DELETE /v1/sessions`: revoke this client's token.
    pub async fn log_out(&self) -> Result<(), ClientError> {
        self.empty(Method::DELETE, &["v1", "sessions"], None).await
    }

    /// `GET /v1/users/by-name/{username}`: find a user by exact name.
    pub async fn user_by_name(&self, username: &str) -> Result<UserView, ClientError> {
        self.json(
            Method::GET,
            &["v1", "users", "by-name", username],
            None,
            true,
        )
        .await
    }

    /// `GET /v1/friends`: friends and pending requests.
    pub async fn friends(&self) -> Result<Vec<FriendView>, ClientError> {
        let list: FriendList = self
            .json(Method::GET, &["v1", "friends"], None, true)
            .await?;
        Ok(list.friends)
    }

    /// `PUT /v1/friends/{id}`: ask `id` to be friends, or accept their
    /// request. Returns the relation after the call.
    pub async fn request_friend(&self, id: UserId) -> Result<FriendStatus, ClientError> {
        #[derive(Deserialize)]
        struct Answer {
            status: FriendStatus,
        }
        let id = id.to_string();
        let a: Answer = self
            .json(Method::PUT, &["v1", "friends", &id], None, true)
            .await?;
        Ok(a.status)
    }

    /// `DELETE /v1/friends/{id}`: unfriend, decline or cancel.
    pub async fn remove_friend(&self, id: UserId) -> Result<(), ClientError> {
        let id = id.to_string();
        self.empty(Method::DELETE, &["v1", "friends", &id], None)
            .await
    }

    /// `PUT /v1/friends/{id}/sharing`: share my location with `id` (for a
    /// while, approximately), or stop. Returns the server's answer
    /// (`{"id", "sharing", "sharing_until"?, "sharing_precision"?}`).
    pub async fn set_sharing(
        &self,
        id: UserId,
        update: SharingUpdate,
    ) -> Result<serde_json::Value, ClientError> {
        let id = id.to_string();
        let body = serde_json::to_value(update).map_err(|e| ClientError::Invalid(e.to_string()))?;
        self.json(
            Method::PUT,
            &["v1", "friends", &id, "sharing"],
            Some(body),
            true,
        )
        .await
    }

    /// `GET /v1/nearby`: the friends near now, nearest first (the snapshot a
    /// new WebSocket would get).
    pub async fn nearby(&self) -> Result<Vec<NearbyFriend>, ClientError> {
        let url = self.url(&["v1", "nearby"])?;
        match self
            .json(Method::GET, &["v1", "nearby"], None, true)
            .await?
        {
            ServerFrame::Snapshot { friends, .. } => Ok(friends),
            other => Err(ClientError::Unexpected {
                url: url.to_string(),
                detail: format!("expected a snapshot, got {other:?}"),
            }),
        }
    }

    /// `GET /v1/me/history`: my own accepted locations with
    /// `from <= ts < to` (Unix ms; the server's defaults are the last 24 h),
    /// oldest first.
    pub async fn history(
        &self,
        from_ms: Option<i64>,
        to_ms: Option<i64>,
    ) -> Result<Vec<HistoryPoint>, ClientError> {
        let mut url = self.url(&["v1", "me", "history"])?;
        for (key, value) in [("from", from_ms), ("to", to_ms)] {
            if let Some(v) = value {
                url.query_pairs_mut().append_pair(key, &v.to_string());
            }
        }
        let h: History = self.json_at(Method::GET, url, None, true).await?;
        Ok(h.points)
    }

    /// `GET /v1/me/history?format=geojson`: the same points as an RFC 7946
    /// FeatureCollection, as the server wrote it.
    pub async fn history_geojson(&self, from_ms: Option<i64>) -> Result<String, ClientError> {
        let mut url = self.url(&["v1", "me", "history"])?;
        url.query_pairs_mut().append_pair("format", "geojson");
        if let Some(v) = from_ms {
            url.query_pairs_mut().append_pair("from", &v.to_string());
        }
        self.exchange(Method::GET, url, None, true).await
    }

    /// `DELETE /v1/me/history`: deletes all of my history; how many points.
    pub async fn delete_history(&self) -> Result<u64, ClientError> {
        #[derive(Deserialize)]
        struct Deleted {
            deleted: u64,
        }
        let d: Deleted = self
            .json(Method::DELETE, &["v1", "me", "history"], None, true)
            .await?;
        Ok(d.deleted)
    }

    /// `GET /v1/me/ghost`, or with `set` `PUT` (`Some(until)`: hide until
    /// then, `Some(None)`: until turned off). Returns `{"ghost", "until"}`.
    pub async fn ghost(&self, set: Option<Option<i64>>) -> Result<serde_json::Value, ClientError> {
        self.switch("ghost", set).await
    }

    /// `DELETE /v1/me/ghost`: be seen again.
    pub async fn end_ghost(&self) -> Result<(), ClientError> {
        self.end_switch("ghost").await
    }

    /// `GET /v1/me/discoverable`, or with `set` `PUT` (`Some(until)`:
    /// discoverable by strangers nearby until then, `Some(None)`: until
    /// turned off). Returns `{"enabled", "until"}`.
    pub async fn discoverable(
        &self,
        set: Option<Option<i64>>,
    ) -> Result<serde_json::Value, ClientError> {
        self.switch("discoverable", set).await
    }

    /// `DELETE /v1/me/discoverable`: vanish from strangers at once.
    pub async fn end_discoverable(&self) -> Result<(), ClientError> {
        self.end_switch("discoverable").await
    }

    /// `GET /v1/me/{leaf}`, or `PUT` it with `{"until"}`.
    pub(crate) async fn switch(
        &self,
        leaf: &str,
        set: Option<Option<i64>>,
    ) -> Result<serde_json::Value, ClientError> {
        let path = ["v1", "me", leaf];
        match set {
            None => self.json(Method::GET, &path, None, true).await,
            Some(until) => {
                let body = serde_json::json!({ "until": until });
                self.json(Method::PUT, &path, Some(body), true).await
            }
        }
    }

    /// `DELETE /v1/me/{leaf}`: turn it off.
    pub(crate) async fn end_switch(&self, leaf: &str) -> Result<(), ClientError> {
        self.empty(Method::DELETE, &["v1", "me", leaf], None).await
    }

    /// `DELETE /v1/me`: deletes the account, confirmed by its credentials.
    pub async fn delete_account(&self, username: &str, password: &str) -> Result<(), ClientError> {
        let body = credentials(username, password);
        self.empty(Method::DELETE, &["v1", "me"], Some(body)).await
    }

    /// Opens the live WebSocket (`GET /v1/ws`) with this client's token.
    pub async fn connect(&self) -> Result<Live, ClientError> {
        Live::connect(self).await
    }

    /// A call whose success has a JSON body of type `T`.
    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &[&str],
        body: Option<serde_json::Value>,
        auth: bool,
    ) -> Result<T, ClientError> {
        self.json_at(method, self.url(path)?, body, auth).await
    }

    async fn json_at<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<serde_json::Value>,
        auth: bool,
    ) -> Result<T, ClientError> {
        let text = self.exchange(method, url.clone(), body, auth).await?;
        serde_json::from_str(&text).map_err(|e| ClientError::Unexpected {
            url: url.to_string(),
            detail: format!("{e} in {}", clip(&text)),
        })
    }

    /// An authenticated call whose success has no body worth reading.
    async fn empty(
        &self,
        method: Method,
        path: &[&str],
        body: Option<serde_json::Value>,
    ) -> Result<(), ClientError> {
        let url = self.url(path)?;
        self.exchange(method, url, body, true).await.map(drop)
    }

    /// Sends one request; the body text on success, else the server's error.
    async fn exchange(
        &self,
        method: Method,
        url: Url,
        body: Option<serde_json::Value>,
        auth: bool,
    ) -> Result<String, ClientError> {
        let mut req = self.http.request(method, url.clone());
        if auth {
            req = req.bearer_auth(self.require_token()?);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| unreachable(&url, &e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| unreachable(&url, &e))?;
        if status.is_success() {
            Ok(text)
        } else {
            Err(api_error(status.as_u16(), text.as_bytes()))
        }
    }
}

fn credentials(username: &str, password: &str) -> serde_json::Value {
    serde_json::json!({ "username": username, "password": password })
}

/// The error a refused request stands for: the documented JSON body if it is
/// one, else the status' name and the start of the body.
pub(crate) fn api_error(status: u16, body: &[u8]) -> ClientError {
    if let Ok(b) = serde_json::from_slice::<ErrorBody>(body) {
        return ClientError::Api {
            status,
            code: b.code,
            message: b.message,
        };
    }
    let code = reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("error")
        .to_ascii_lowercase()
        .replace(' ', "_");
    let text = String::from_utf8_lossy(body);
    let message = if text.trim().is_empty() {
        "(no explanation from the server)".to_owned()
    } else {
        clip(text.trim())
    };
    ClientError::Api {
        status,
        code,
        message,
    }
}

/// The innermost cause of a transport error: "Connection refused (os error
/// 111)" says more than "error sending request for url (…)".
pub(crate) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

fn unreachable(url: &Url, e: &reqwest::Error) -> ClientError {
    let detail = if e.is_timeout() {
        "timed out".to_owned()
    } else {
        root_cause(e)
    };
    let mut origin = url.clone();
    origin.set_path("");
    ClientError::Unreachable {
        url: origin.as_str().trim_end_matches('/').to_owned(),
        detail,
    }
}

/// At most 200 characters of `text`, on one line.
pub(crate) fn clip(text: &str) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    if text.chars().count() > 200 {
        format!("{one_line}…")
    } else {
        one_line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_are_normalised_and_checked() {
        let c = Client::new("127.0.0.1:8080").unwrap();
        assert_eq!(c.server(), "http://127.0.0.1:8080");
        let c = Client::new("http://example.org/nearby/?x=1#y").unwrap();
        assert_eq!(c.server(), "http://example.org/nearby");
        assert_eq!(
            c.url(&["v1", "users", "by-name", "a/b?c"])
                .unwrap()
                .as_str(),
            "http://example.org/nearby/v1/users/by-name/a%2Fb%3Fc"
        );
        for bad in ["https://x", "ftp://x", "http://", ""] {
            let e = Client::new(bad).unwrap_err();
            assert!(matches!(e, ClientError::Invalid(_)), "{bad}: {e:?}");
        }
    }

    #[test]
    fn refusals_keep_the_servers_code_and_message() {
        let e = api_error(
            404,
            br#"{"code":"unknown_user","message":"no user named \"x\""}"#,
        );
        assert_eq!(e.to_string(), r#"404 unknown_user: no user named "x""#);
        let e = api_error(502, b"<html>\nbad gateway</html>");
        assert_eq!(e.to_string(), "502 bad_gateway: <html> bad gateway</html>");
        assert!(api_error(503, b"").is_retryable());
    }

    #[tokio::test]
    async fn calls_without_a_login_say_so_before_any_io() {
        let c = Client::new("http://127.0.0.1:9").unwrap();
        let e = c.friends().await.unwrap_err();
        assert_eq!(
            e,
            ClientError::NotLoggedIn {
                server: "http://127.0.0.1:9".into()
            }
        );
    }

    #[tokio::test]
    async fn an_unreachable_server_is_one_readable_line() {
        // Bind then drop a listener: the port is (very likely) closed now.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = Client::new(&format!("http://127.0.0.1:{port}")).unwrap();
        let e = c.sign_up("alice", "correct horse").await.unwrap_err();
        assert!(e.is_retryable(), "{e:?}");
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("cannot reach http://127.0.0.1:{port}: ")),
            "{text}"
        );
        assert!(!text.contains("error sending request"), "{text}");
    }
}
