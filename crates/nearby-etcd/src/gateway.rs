//! The few etcd v3 calls the ring needs, over etcd's JSON gateway
//! (`POST /v3/kv/range`, `/v3/watch`, …: the gRPC API spelled as JSON over
//! HTTP/1.1, served on the client port by etcd 3.4 and later).
//!
//! Why not a gRPC client: the Rust ones (`etcd-client`) generate their code
//! from `.proto` files at build time and so need `protoc` installed, which
//! broke `cargo build` on a machine with only Rust. Keys and values travel
//! base64-encoded and 64-bit integers as strings, as the gateway writes them.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use crate::Error;

/// How long one request to etcd may take.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// A client of one etcd cluster: tries its endpoints in turn.
pub(crate) struct Gateway {
    http: reqwest::Client,
    endpoints: Vec<String>,
    /// The endpoint that answered last.
    current: usize,
}

/// `http://host:port` for `host:port`; an `http(s)://` endpoint as given.
fn base_url(endpoint: &str) -> String {
    let e = endpoint.trim().trim_end_matches('/');
    if e.starts_with("http://") || e.starts_with("https://") {
        e.to_owned()
    } else {
        format!("http://{e}")
    }
}

/// The end of the range of every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

/// A 64-bit integer as the gateway writes it (a string), or a number;
/// absent is 0.
fn int<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        S(String),
        N(i64),
    }
    match Option::<Int>::deserialize(d)? {
        None => Ok(0),
        Some(Int::N(n)) => Ok(n),
        Some(Int::S(s)) => s.parse().map_err(serde::de::Error::custom),
    }
}

/// Base64 bytes; absent is empty.
fn bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(Vec::new()),
        Some(s) => B64.decode(s).map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Header {
    #[serde(default, deserialize_with = "int")]
    pub revision: i64,
}

#[derive(Debug, Deserialize)]
pub(crate) struct KeyValue {
    #[serde(default, deserialize_with = "bytes")]
    pub key: Vec<u8>,
    #[serde(default, deserialize_with = "bytes")]
    pub value: Vec<u8>,
    #[serde(default, deserialize_with = "int")]
    pub mod_revision: i64,
}

#[derive(Debug, Deserialize)]
struct Range {
    #[serde(default)]
    header: Header,
    #[serde(default)]
    kvs: Vec<KeyValue>,
}

#[derive(Debug, Deserialize)]
struct Deleted {
    #[serde(default, deserialize_with = "int")]
    deleted: i64,
}

#[derive(Debug, Deserialize)]
struct Lease {
    #[serde(rename = "ID", default, deserialize_with = "int")]
    id: i64,
    #[serde(rename = "TTL", default, deserialize_with = "int")]
    ttl: i64,
    #[serde(default)]
    error: String,
}

#[derive(Debug, Deserialize)]
struct KeptAlive {
    result: Lease,
}

/// A watch event: a key put (or changed) or deleted.
#[derive(Debug, Deserialize)]
pub(crate) struct WatchEvent {
    /// `DELETE`; absent (the default, `PUT`) for a put.
    #[serde(rename = "type", default)]
    pub kind: String,
    pub kv: Option<KeyValue>,
}

/// One message of a watch stream.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct WatchResponse {
    #[serde(default)]
    pub header: Header,
    #[serde(default)]
    pub canceled: bool,
    #[serde(default, deserialize_with = "int")]
    pub compact_revision: i64,
    #[serde(default)]
    pub events: Vec<WatchEvent>,
}

/// A line of the watch stream: a result, or an error.
#[derive(Debug, Deserialize)]
struct WatchLine {
    result: Option<WatchResponse>,
    error: Option<serde_json::Value>,
}

/// An error body of the gateway.
#[derive(Debug, Deserialize)]
struct Failure {
    #[serde(default)]
    message: String,
    #[serde(default)]
    error: String,
}

impl Gateway {
    /// A client of `endpoints` (`http://host:port` or `host:port`); answers
    /// once one of them does (so a mistyped endpoint fails now).
    pub(crate) async fn connect(endpoints: &[String]) -> Result<Self, Error> {
        if endpoints.is_empty() {
            return Err(Error::Invalid("no etcd endpoint given".into()));
        }
        // TCP keep-alive finds a silently dead connection (a partition) on
        // the long-lived watch: probes after 5 s idle, every 2 s, 3 of them.
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .tcp_keepalive(Duration::from_secs(5))
            .tcp_keepalive_interval(Duration::from_secs(2))
            .tcp_keepalive_retries(3)
            .build()
            .map_err(|e| Error::Etcd(format!("HTTP client: {e}")))?;
        let mut gw = Self {
            http,
            endpoints: endpoints.iter().map(|e| base_url(e)).collect(),
            current: 0,
        };
        gw.call::<serde_json::Value>("maintenance/status", json!({}))
            .await?;
        Ok(gw)
    }

    /// POSTs `body` to `/v3/{path}` of the endpoints in turn, from the one
    /// that answered last, until one answers.
    async fn send(
        &mut self,
        path: &str,
        body: &serde_json::Value,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, Error> {
        let mut last = None;
        for i in 0..self.endpoints.len() {
            let at = (self.current + i) % self.endpoints.len();
            let mut req = self
                .http
                .post(format!("{}/v3/{path}", self.endpoints[at]))
                .json(body);
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            match req.send().await {
                Ok(resp) => {
                    self.current = at;
                    if resp.status().is_success() {
                        return Ok(resp);
                    }
                    let status = resp.status();
                    let failure: Option<Failure> = resp.json().await.ok();
                    let why = failure
                        .map(|f| {
                            if f.message.is_empty() {
                                f.error
                            } else {
                                f.message
                            }
                        })
                        .unwrap_or_default();
                    return Err(Error::Etcd(format!("{path}: {status} {why}")));
                }
                Err(e) => last = Some(format!("{}: {e}", self.endpoints[at])),
            }
        }
        Err(Error::Etcd(last.unwrap_or_else(|| "no endpoint".into())))
    }

    /// One request and its JSON answer.
    async fn call<T: DeserializeOwned>(
        &mut self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<T, Error> {
        let resp = self.send(path, &body, Some(REQUEST_TIMEOUT)).await?;
        resp.json()
            .await
            .map_err(|e| Error::Etcd(format!("{path}: unreadable answer: {e}")))
    }

    /// Every key starting with `prefix`, and the revision they were read at.
    pub(crate) async fn range_prefix(
        &mut self,
        prefix: &str,
    ) -> Result<(Vec<KeyValue>, i64), Error> {
        let r: Range = self
            .call(
                "kv/range",
                json!({ "key": B64.encode(prefix), "range_end": B64.encode(prefix_end(prefix.as_bytes())) }),
            )
            .await?;
        Ok((r.kvs, r.header.revision))
    }

    /// Deletes `key`; how many keys went.
    pub(crate) async fn delete(&mut self, key: &str) -> Result<i64, Error> {
        let d: Deleted = self
            .call("kv/deleterange", json!({ "key": B64.encode(key) }))
            .await?;
        Ok(d.deleted)
    }

    /// A new lease of `ttl_s` seconds.
    pub(crate) async fn lease_grant(&mut self, ttl_s: i64) -> Result<i64, Error> {
        let l: Lease = self.call("lease/grant", json!({ "TTL": ttl_s })).await?;
        if !l.error.is_empty() || l.id == 0 {
            return Err(Error::Etcd(format!("lease grant refused: {}", l.error)));
        }
        Ok(l.id)
    }

    /// Puts `key` = `value` under `lease`.
    pub(crate) async fn put(&mut self, key: &str, value: &str, lease: i64) -> Result<(), Error> {
        self.call::<serde_json::Value>(
            "kv/put",
            json!({ "key": B64.encode(key), "value": B64.encode(value), "lease": lease.to_string() }),
        )
        .await?;
        Ok(())
    }

    /// Revokes `lease` (its keys go at once).
    pub(crate) async fn lease_revoke(&mut self, lease: i64) -> Result<(), Error> {
        self.call::<serde_json::Value>("lease/revoke", json!({ "ID": lease.to_string() }))
            .await?;
        Ok(())
    }

    /// One keep-alive of `lease`; false if it no longer exists.
    pub(crate) async fn keep_alive(&mut self, lease: i64) -> Result<bool, Error> {
        let k: KeptAlive = self
            .call("lease/keepalive", json!({ "ID": lease.to_string() }))
            .await?;
        Ok(k.result.ttl > 0)
    }

    /// Watches every key starting with `prefix` from revision `from`.
    pub(crate) async fn watch(&mut self, prefix: &str, from: i64) -> Result<Watch, Error> {
        let body = json!({ "create_request": {
            "key": B64.encode(prefix),
            "range_end": B64.encode(prefix_end(prefix.as_bytes())),
            "start_revision": from.to_string(),
        }});
        let resp = self.send("watch", &body, None).await?;
        Ok(Watch {
            resp,
            buf: Vec::new(),
        })
    }
}

/// A watch stream: newline-separated JSON messages.
pub(crate) struct Watch {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl Watch {
    /// The next message; an error when the stream breaks or ends.
    pub(crate) async fn message(&mut self) -> Result<WatchResponse, Error> {
        loop {
            if let Some(at) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return parse_line(&line);
            }
            match self.resp.chunk().await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                Ok(None) => return Err(Error::Etcd("etcd closed the watch".into())),
                Err(e) => return Err(Error::Etcd(format!("watch broken: {e}"))),
            }
        }
    }
}

fn parse_line(line: &[u8]) -> Result<WatchResponse, Error> {
    let l: WatchLine = serde_json::from_slice(line)
        .map_err(|e| Error::Etcd(format!("unreadable watch message: {e}")))?;
    match (l.result, l.error) {
        (_, Some(err)) => Err(Error::Etcd(format!("watch failed: {err}"))),
        (Some(r), None) => Ok(r),
        (None, None) => Ok(WatchResponse::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_end_where_the_next_key_begins() {
        assert_eq!(
            prefix_end(b"/nearby/ring/members/"),
            b"/nearby/ring/members0"
        );
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn endpoints_get_a_scheme() {
        assert_eq!(base_url("127.0.0.1:2379"), "http://127.0.0.1:2379");
        assert_eq!(base_url("http://h:1/"), "http://h:1");
    }

    #[test]
    fn watch_lines_read_as_the_gateway_writes_them() {
        let created = br#"{"result":{"header":{"revision":"2"},"created":true}}"#;
        let r = parse_line(created).expect("created");
        assert_eq!((r.header.revision, r.events.len()), (2, 0));
        let put = br#"{"result":{"header":{"revision":"3"},"events":[{"kv":{"key":"bmIvYQ==","create_revision":"2","mod_revision":"3","version":"2","value":"dw=="}}]}}"#;
        let r = parse_line(put).expect("put");
        let kv = r.events[0].kv.as_ref().expect("kv");
        assert_eq!(
            (kv.key.as_slice(), kv.value.as_slice(), kv.mod_revision),
            (&b"nb/a"[..], &b"w"[..], 3)
        );
        assert_eq!(r.events[0].kind, "");
        let del = br#"{"result":{"header":{"revision":"4"},"events":[{"type":"DELETE","kv":{"key":"bmIvYQ==","mod_revision":"4"}}]}}"#;
        assert_eq!(parse_line(del).expect("delete").events[0].kind, "DELETE");
        let compacted =
            br#"{"result":{"header":{"revision":"9"},"canceled":true,"compact_revision":"7"}}"#;
        let r = parse_line(compacted).expect("compacted");
        assert!(r.canceled && r.compact_revision == 7);
        assert!(parse_line(br#"{"error":{"grpc_code":14,"message":"x"}}"#).is_err());
        assert!(parse_line(b"not json").is_err());
    }
}
