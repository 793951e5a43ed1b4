//! The one error type of the client. Every variant reads as one line, and
//! none has a `source()`: the cause is already in the message, so printing
//! the chain (`{:#}` in `anyhow`) does not repeat it.

/// What can go wrong talking to a server.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server refused the request (an HTTP error status, on REST or on
    /// the WebSocket handshake), with the body's `code` and `message`.
    #[error("{status} {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Stable code from the body (or the status' name if the body was not the documented JSON).
        code: String,
        /// The server's explanation.
        message: String,
    },
    /// The server could not be reached, or the connection broke.
    #[error("cannot reach {url}: {detail}")]
    Unreachable {
        /// What was being called.
        url: String,
        /// Why, e.g. "Connection refused (os error 111)" or "timed out".
        detail: String,
    },
    /// The server answered something the protocol does not allow.
    #[error("unexpected answer from {url}: {detail}")]
    Unexpected {
        /// What was being called.
        url: String,
        /// What was wrong with it.
        detail: String,
    },
    /// The server closed the WebSocket.
    #[error("the server closed the connection: {}", describe_close(*code, reason))]
    Closed {
        /// The close code, if the server sent one (none: the connection just ended).
        code: Option<u16>,
        /// The close reason the server gave, if any.
        reason: String,
    },
    /// A call needs a token and none is known for this server.
    #[error("not logged in to {server}: run `nearby client login USERNAME PASSWORD` first")]
    NotLoggedIn {
        /// The server that was to be called.
        server: String,
    },
    /// The saved login could not be read or written.
    #[error("config file {path}: {detail}")]
    Config {
        /// The file.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// Standard output could not be written (e.g. the reader of a pipe is gone).
    #[error("cannot write the output: {0}")]
    Output(String),
    /// A bad argument (URL, coordinates, name, …) or a request that makes no
    /// sense in the current state (accepting a request nobody sent).
    #[error("{0}")]
    Invalid(String),
}

impl ClientError {
    /// Whether trying again later may succeed: the server was unreachable or
    /// busy, or closed the connection in a way that asks for a reconnect.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Api { status, .. } => *status == 503,
            Self::Closed { code, .. } => matches!(code, None | Some(1001 | 1006 | 1011 | 1012)),
            _ => false,
        }
    }

    /// The stable code of an [`ClientError::Api`] error, if it is one.
    pub fn api_code(&self) -> Option<&str> {
        match self {
            Self::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// "1012 (the server is restarting; reconnect later)", with the server's
/// reason if it gave one.
fn describe_close(code: Option<u16>, reason: &str) -> String {
    let meaning = match code {
        None => return "the connection ended without a close frame".to_owned(),
        Some(1000) => "normal closure",
        Some(1001) => "idle for too long",
        Some(1008) => "the token expired or was logged out; log in again",
        Some(1009) => "a frame was too large",
        Some(1011) => "the server could not start the session; retry later",
        Some(1012) => "the server is restarting; reconnect later",
        Some(_) => "",
    };
    let code = code.unwrap_or_default();
    match (meaning, reason.is_empty()) {
        ("", true) => code.to_string(),
        ("", false) => format!("{code} ({reason})"),
        (m, true) => format!("{code} ({m})"),
        (m, false) => format!("{code} ({m}: {reason})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_readable_line() {
        let e = ClientError::Api {
            status: 401,
            code: "bad_credentials".into(),
            message: "wrong username or password".into(),
        };
        assert_eq!(
            e.to_string(),
            "401 bad_credentials: wrong username or password"
        );
        let e = ClientError::Closed {
            code: Some(1012),
            reason: String::new(),
        };
        assert_eq!(
            e.to_string(),
            "the server closed the connection: 1012 (the server is restarting; reconnect later)"
        );
        assert!(e.is_retryable());
        let e = ClientError::Closed {
            code: Some(1008),
            reason: "token revoked".into(),
        };
        assert!(
            e.to_string().ends_with("log in again: token revoked)"),
            "{e}"
        );
        assert!(!e.is_retryable());
        for e in [
            ClientError::Closed {
                code: Some(4000),
                reason: String::new(),
            },
            ClientError::NotLoggedIn {
                server: "http://x".into(),
            },
        ] {
            assert!(!e.to_string().contains('\n'));
        }
    }
}
