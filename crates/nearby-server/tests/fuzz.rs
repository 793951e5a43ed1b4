//! Fuzzing with arbitrary bytes: the WebSocket frame parser (tungstenite,
//! the one axum runs, in the server role) feeding `parse_client_frame`, and
//! the whole REST router (path, query, headers and body parsers, through
//! the real handlers on embedded backends). Nothing may panic; every
//! refusal is a JSON error body; no input is a 500.
//!
//! A short run is part of the test suite. A long one:
//!
//! ```sh
//! NEARBY_FUZZ_SECS=600 cargo test --release -p nearby-server --test fuzz -- --ignored --nocapture
//! ```
//!
//! prints how many cases of each target ran.

use std::io::{Cursor, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use nearby_hub::Bus;
use nearby_proto::ws::parse_client_frame;
use nearby_server::{AppState, Backends, ServerConfig};
use nearby_store_memory::MemoryCache;
use nearby_store_sqlite::{SqliteHistoryStore, SqliteUserStore};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tower::ServiceExt;
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};

/// What a client sent (arbitrary bytes) as the server side reads it.
struct Wire {
    input: Cursor<Vec<u8>>,
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Frames that are valid WebSocket framing around arbitrary payloads, so
/// the JSON parser sees more than the frame parser's refusals.
fn masked_text(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81u8];
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n.min(65535) as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(
        payload
            .iter()
            .take(65535)
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4]),
    );
    f
}

fn ws_case(bytes: &[u8]) -> Result<(), TestCaseError> {
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(64 * 1024);
    config.max_frame_size = Some(64 * 1024);
    let mut ws = WebSocket::from_raw_socket(
        Wire {
            input: Cursor::new(bytes.to_vec()),
        },
        Role::Server,
        Some(config),
    );
    for _ in 0..64 {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                // Either a frame or an error with a stable code and a message.
                if let Err(e) = parse_client_frame(t.as_str()) {
                    prop_assert!(!e.code().is_empty() && !e.to_string().is_empty());
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    Ok(())
}

fn ws_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        // Valid framing, arbitrary payload.
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|p| masked_text(&p)),
        // Valid framing, JSON-ish payload.
        "[{}\\[\\]\":,a-z0-9.eE+\\- ]{0,120}".prop_map(|s| masked_text(s.as_bytes())),
        (
            -1e6f64..1e6,
            -1e6f64..1e6,
            "[a-z_]{0,12}",
            proptest::collection::vec(any::<u8>(), 0..40)
        )
            .prop_map(|(lat, lon, ty, tail)| {
                let mut p = format!(r#"{{"type":"{ty}","lat":{lat},"lon":{lon}}}"#).into_bytes();
                p.extend(tail);
                masked_text(&p)
            }),
    ]
}

const ROUTES: &[&str] = &[
    "/v1/users",
    "/v1/users/by-name/",
    "/v1/sessions",
    "/v1/friends",
    "/v1/friends/",
    "/v1/nearby",
    "/v1/me/history",
    "/v1/ws",
    "/healthz",
    "/readyz",
];

#[derive(Debug, Clone)]
struct RestInput {
    method: Method,
    path: String,
    query: String,
    body: Vec<u8>,
    json: bool,
    auth: Option<String>,
    with_token: bool,
}

fn rest_input() -> impl Strategy<Value = RestInput> {
    let method = prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::DELETE),
        Just(Method::PATCH),
    ];
    let body = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        "[{}\\[\\]\":,a-z0-9.\\- ]{0,100}".prop_map(String::into_bytes),
        ("[a-zA-Z0-9_.\\-é ]{0,40}", any::<bool>(), "[a-z]{0,10}").prop_map(|(u, e, k)| {
            format!(r#"{{"username":"{u}","{k}":{e},"enabled":{e}}}"#).into_bytes()
        }),
    ];
    (
        method,
        proptest::sample::select(ROUTES),
        "[a-zA-Z0-9%/._\\-]{0,30}",
        "[a-z=&0-9%+\\-]{0,40}",
        body,
        any::<bool>(),
        proptest::option::of("[ -~]{0,80}"),
        any::<bool>(),
    )
        .prop_map(
            |(method, route, tail, query, body, json, auth, with_token)| RestInput {
                method,
                path: format!("{route}{tail}"),
                query,
                body,
                json,
                auth,
                with_token,
            },
        )
}

/// REST cases that got past authentication with the fixture's token.
static AUTHENTICATED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

struct Fixture {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
    token: String,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let (router, token) = rt.block_on(async {
        let users = SqliteUserStore::open(&dir.path().join("users.db"))
            .await
            .expect("users.db");
        let history = SqliteHistoryStore::open(&dir.path().join("history.db"))
            .await
            .expect("history.db");
        let backends = Backends {
            users: Arc::new(users),
            history: Arc::new(history),
            cache: MemoryCache::new(Duration::from_secs(10)),
            bus: Arc::new(Bus::in_process()),
        };
        let st = AppState::new(ServerConfig::default(), backends).expect("state");
        let router = nearby_server::router(st);
        let creds = r#"{"username":"fuzzer","password":"correct horse"}"#;
        for path in ["/v1/users", "/v1/sessions"] {
            let req = Request::post(path)
                .header("content-type", "application/json")
                .body(Body::from(creds))
                .expect("request");
            let resp = router.clone().oneshot(req).await.expect("infallible");
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .expect("body");
            if path == "/v1/sessions" {
                let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
                let token = v["token"].as_str().expect("token").to_owned();
                return (router, token);
            }
        }
        unreachable!("the loop returns at /v1/sessions")
    });
    Fixture {
        rt,
        router,
        token,
        _dir: dir,
    }
}

fn rest_case(fx: &Fixture, input: &RestInput) -> Result<(), TestCaseError> {
    // Logging the fixture's token out would turn every later authenticated
    // case into a 401 and hide the handlers behind it.
    if input.with_token && input.method == Method::DELETE && input.path.starts_with("/v1/sessions")
    {
        return Ok(());
    }
    let uri = if input.query.is_empty() {
        input.path.clone()
    } else {
        format!("{}?{}", input.path, input.query)
    };
    let Ok(uri) = uri.parse::<axum::http::Uri>() else {
        return Ok(()); // not a request hyper would hand over
    };
    let mut req = Request::builder().method(input.method.clone()).uri(uri);
    if input.json {
        req = req.header("content-type", "application/json");
    }
    if input.with_token {
        req = req.header("authorization", format!("Bearer {}", fx.token));
    } else if let Some(a) = &input.auth {
        if let Ok(v) = axum::http::HeaderValue::from_str(a) {
            req = req.header("authorization", v);
        }
    }
    let req = req.body(Body::from(input.body.clone())).expect("request");
    let (status, body) = fx.rt.block_on(async {
        let resp = fx.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 22)
            .await
            .unwrap_or_default();
        (status, body)
    });
    prop_assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{:?}", input);
    if input.with_token && status != StatusCode::UNAUTHORIZED {
        AUTHENTICATED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    if status.is_client_error() || status.is_server_error() {
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| TestCaseError::fail(format!("{status} body not JSON ({e}): {input:?}")))?;
        prop_assert!(
            v["code"].as_str().is_some_and(|c| !c.is_empty())
                && v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{} {} for {:?}",
            status,
            v,
            input
        );
    }
    Ok(())
}

/// Runs both targets for `cases` each, or until `until` passes (counting
/// the cases); returns (websocket cases, REST cases).
fn fuzz(cases: u32, until: Option<Instant>) -> (u64, u64) {
    let fx = fixture();
    let (mut ws_total, mut rest_total) = (0u64, 0u64);
    loop {
        let config = Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        };
        let mut runner = TestRunner::new(config.clone());
        if let Err(e) = runner.run(&ws_input(), |bytes| ws_case(&bytes)) {
            panic!("websocket target: {e}");
        }
        ws_total += u64::from(cases);
        let mut runner = TestRunner::new(config);
        if let Err(e) = runner.run(&rest_input(), |input| rest_case(&fx, &input)) {
            panic!("REST target: {e}");
        }
        rest_total += u64::from(cases);
        if until.is_none_or(|t| Instant::now() >= t) {
            return (ws_total, rest_total);
        }
    }
}

#[test]
fn frames_and_bodies_never_panic() {
    let (ws, rest) = fuzz(256, None);
    assert_eq!((ws, rest), (256, 256));
}

#[test]
#[ignore = "long run: NEARBY_FUZZ_SECS=600"]
fn fuzz_for_a_while() {
    let secs: u64 = std::env::var("NEARBY_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let started = Instant::now();
    let (ws, rest) = fuzz(2000, Some(started + Duration::from_secs(secs)));
    eprintln!(
        "fuzzed for {:.0} s: {ws} WebSocket inputs, {rest} REST requests ({} authenticated), no panic, no 500",
        started.elapsed().as_secs_f64(),
        AUTHENTICATED.load(std::sync::atomic::Ordering::Relaxed)
    );
}
