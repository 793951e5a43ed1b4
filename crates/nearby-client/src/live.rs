//! The WebSocket half: one live connection to `GET /v1/ws`.
//!
//! Pings are answered by tungstenite while the connection is being read, so
//! a client that keeps calling [`Live::recv`] (even when it has nothing to
//! send) stays within the server's idle limit.

use futures_util::{SinkExt, StreamExt};
use nearby_proto::ws::ServerFrame;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::api::{api_error, root_cause, Client, CONNECT_TIMEOUT};
use crate::error::ClientError;

/// One frame from the server: its text as received, and its meaning if it
/// is a frame this client knows (`None` for a type added after it).
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// The JSON text, exactly as sent.
    pub text: String,
    /// The parsed frame, if known.
    pub frame: Option<ServerFrame>,
}

/// An open WebSocket to the server.
pub struct Live {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    url: String,
}

impl Live {
    pub(crate) async fn connect(client: &Client) -> Result<Self, ClientError> {
        let token = client.require_token()?;
        let mut url = client.url(&["v1", "ws"])?;
        // Only http is accepted by `Client::new`, so this cannot fail.
        let _ = url.set_scheme("ws");
        let shown = url.to_string();
        let mut req = shown
            .as_str()
            .into_client_request()
            .map_err(|e| ClientError::Invalid(format!("bad WebSocket URL {shown}: {e}")))?;
        let auth = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            ClientError::Invalid("the token has characters a header cannot carry".into())
        })?;
        req.headers_mut().insert("authorization", auth);
        let connecting = tokio_tungstenite::connect_async(req);
        let ws = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Err(_) => {
                return Err(ClientError::Unreachable {
                    url: shown,
                    detail: "timed out".into(),
                })
            }
            Ok(Err(tungstenite::Error::Http(resp))) => {
                let body = resp.body().as_deref().unwrap_or_default();
                return Err(api_error(resp.status().as_u16(), body));
            }
            Ok(Err(e)) => {
                return Err(ClientError::Unreachable {
                    url: shown,
                    detail: root_cause(&e),
                })
            }
            Ok(Ok((ws, _response))) => ws,
        };
        Ok(Self { ws, url: shown })
    }

    /// Sends `{"type":"location","lat":…,"lon":…}`. The server does not
    /// acknowledge it; a refusal comes back as an `error` frame.
    pub async fn send_location(&mut self, lat: f64, lon: f64) -> Result<(), ClientError> {
        let text = serde_json::json!({ "type": "location", "lat": lat, "lon": lon }).to_string();
        self.ws
            .send(Message::text(text))
            .await
            .map_err(|e| self.broken(e))
    }

    /// The next text frame. A close by the server is an error
    /// ([`ClientError::Closed`]), since the feed has ended. Cancel-safe: a
    /// frame is never lost by dropping the future (e.g. in `select!`).
    pub async fn recv(&mut self) -> Result<Incoming, ClientError> {
        loop {
            let msg = match self.ws.next().await {
                None => {
                    return Err(ClientError::Closed {
                        code: None,
                        reason: String::new(),
                    })
                }
                Some(Err(e)) => return Err(self.broken(e)),
                Some(Ok(m)) => m,
            };
            match msg {
                Message::Text(t) => {
                    let text = t.as_str().to_owned();
                    let frame = serde_json::from_str(&text).ok();
                    return Ok(Incoming { text, frame });
                }
                Message::Close(frame) => {
                    // Send the reply tungstenite queued, so the server's
                    // closing handshake ends now instead of timing out.
                    let _ = self.ws.flush().await;
                    return Err(ClientError::Closed {
                        code: frame.as_ref().map(|f| u16::from(f.code)),
                        reason: frame
                            .map(|f| f.reason.as_str().to_owned())
                            .unwrap_or_default(),
                    });
                }
                // Pings are answered by tungstenite on the next read; the
                // server sends no binary frames, and none are meaningful.
                Message::Ping(_) | Message::Pong(_) | Message::Binary(_) | Message::Frame(_) => {}
            }
        }
    }

    /// Like [`Live::recv`], but `None` once `deadline` passes.
    pub async fn recv_until(&mut self, deadline: Instant) -> Result<Option<Incoming>, ClientError> {
        match tokio::time::timeout_at(deadline, self.recv()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Closes the connection politely (1000) and waits briefly for the
    /// server's answer. Errors are ignored: the connection is going anyway.
    pub async fn close(mut self) {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        };
        if self.ws.close(Some(frame)).await.is_err() {
            return;
        }
        let deadline = Instant::now() + std::time::Duration::from_secs(1);
        while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, self.ws.next()).await {}
    }

    fn broken(&self, e: tungstenite::Error) -> ClientError {
        match e {
            tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
                ClientError::Closed {
                    code: None,
                    reason: String::new(),
                }
            }
            other => ClientError::Unreachable {
                url: self.url.clone(),
                detail: root_cause(&other),
            },
        }
    }
}
