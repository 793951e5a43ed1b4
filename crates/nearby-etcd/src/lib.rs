//! The pub/sub ring's membership in etcd.
//!
//! Key layout, under a prefix (default `/nearby/ring/`):
//!
//! | key | value | lifetime |
//! |---|---|---|
//! | `{prefix}members/{name}` | `{"url":"redis://host:port"}` | a lease kept alive by `nearby ring join` |
//!
//! * [`Registry::join`] registers one Redis server under a lease and keeps
//!   the lease alive while the server is healthy; the key goes when the
//!   agent stops (lease revoked) or dies (lease expires after its TTL).
//! * [`Registry::list`] and [`Registry::leave`] read and remove members.
//! * [`follow`] is what a node runs: it loads the members, watches the
//!   prefix from the next revision, re-watches from the last revision it saw
//!   after a broken connection, and reloads everything when that revision
//!   has been compacted away. While etcd cannot be reached it says so
//!   ([`Event::Stale`]) and the node keeps its last ring.
//!
//! A value that is not valid JSON with a `redis://` or `rediss://` URL, or a
//! name that is not a valid member name, is logged and skipped.
//!
//! etcd is spoken to through its JSON gateway (`gateway`), so building needs
//! nothing but Rust.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

mod gateway;
use gateway::{Gateway, WatchResponse, REQUEST_TIMEOUT};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/nearby/ring/";

/// What went wrong talking to etcd, or with what was asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// etcd could not be reached or refused the request.
    #[error("etcd: {0}")]
    Etcd(String),
    /// A name or URL that cannot be a ring member.
    #[error("{0}")]
    Invalid(String),
}

/// A pub/sub server in the ring.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    /// Its ring name: what channels are placed by.
    pub name: String,
    /// `redis://host:port`.
    pub url: String,
}

#[derive(Serialize, Deserialize)]
struct Value {
    url: String,
}

/// Checks a member name: 1 to 128 characters of `[A-Za-z0-9._:-]`.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "member name {name:?} must be 1 to 128 characters of letters, digits, '.', '_', ':' or '-'"
        )))
    }
}

/// Checks a member URL.
pub fn validate_url(url: &str) -> Result<(), Error> {
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "member url {url:?} must start with redis:// or rediss://"
        )))
    }
}

/// The name a server joins under when none is given: its URL's host:port.
pub fn default_name(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

/// Parses one key/value of the prefix; `None` (logged) if malformed.
fn parse(prefix: &str, key: &[u8], value: &[u8]) -> Option<Member> {
    let key = std::str::from_utf8(key).ok()?;
    let name = key.strip_prefix(prefix)?.strip_prefix("members/")?;
    let member = validate_name(name).ok().and_then(|()| {
        let v: Value = serde_json::from_slice(value).ok()?;
        validate_url(&v.url).ok()?;
        Some(Member {
            name: name.to_owned(),
            url: v.url,
        })
    });
    if member.is_none() {
        tracing::warn!(
            key,
            value = %String::from_utf8_lossy(value),
            "malformed ring member in etcd; skipped"
        );
    }
    member
}

/// A connection to etcd, scoped to one key prefix.
pub struct Registry {
    client: Gateway,
    prefix: String,
}

impl Registry {
    /// Connects to `endpoints` (`http://host:port`, or `host:port`).
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, Error> {
        let client = Gateway::connect(endpoints).await?;
        Ok(Self {
            client,
            prefix: prefix.to_owned(),
        })
    }

    fn key(&self, name: &str) -> String {
        format!("{}members/{name}", self.prefix)
    }

    /// The members, by name, and the store's revision they were read at.
    pub async fn list(&mut self) -> Result<(Vec<Member>, i64), Error> {
        let start = format!("{}members/", self.prefix);
        let (kvs, revision) = self.client.range_prefix(&start).await?;
        let members = kvs
            .iter()
            .filter_map(|kv| parse(&self.prefix, &kv.key, &kv.value))
            .collect();
        Ok((members, revision))
    }

    /// Removes `name`; returns whether it was a member.
    pub async fn leave(&mut self, name: &str) -> Result<bool, Error> {
        validate_name(name)?;
        let key = self.key(name);
        Ok(self.client.delete(&key).await? > 0)
    }

    /// Registers `name` → `url` under a lease of `ttl` and keeps it alive
    /// while `healthy()` says so, until `stop` completes; then revokes the
    /// lease (the member leaves at once). While unhealthy the lease is not
    /// renewed, so the member leaves within `ttl`; once healthy again it
    /// joins again under a new lease. Returns an error only when etcd
    /// cannot be reached at the start.
    pub async fn join<H, Fut>(
        &mut self,
        name: &str,
        url: &str,
        ttl: Duration,
        mut healthy: H,
        stop: impl Future<Output = ()>,
    ) -> Result<(), Error>
    where
        H: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        validate_name(name)?;
        validate_url(url)?;
        let ttl_s = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        let value = serde_json::json!({ "url": url }).to_string();
        let every = Duration::from_secs_f64(ttl_s as f64 / 3.0);
        let mut lease: Option<i64> = None;
        // The first registration must work: a mistyped endpoint fails now.
        if healthy().await {
            lease = Some(self.register(name, &value, ttl_s).await?);
            tracing::info!(name, url, ttl_s, "joined the ring");
        } else {
            tracing::warn!(name, url, "server unhealthy; not joining until it answers");
        }
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut stop => break,
                _ = tick.tick() => {}
            }
            let ok = healthy().await;
            lease = match (lease, ok) {
                (Some(id), true) => match self.client.keep_alive(id).await {
                    Ok(true) => Some(id),
                    Ok(false) => {
                        tracing::warn!(name, "lease expired; joining again");
                        self.try_register(name, &value, ttl_s).await
                    }
                    Err(e) => {
                        tracing::warn!(name, error = %e, "renewing the lease failed; retrying");
                        Some(id)
                    }
                },
                (Some(_), false) => {
                    // Not renewed: the key expires within the TTL, and a
                    // new lease is taken once the server answers again.
                    tracing::warn!(name, url, "server unhealthy; letting the lease lapse");
                    None
                }
                (None, true) => self.try_register(name, &value, ttl_s).await,
                (None, false) => None,
            };
        }
        if let Some(id) = lease {
            match tokio::time::timeout(REQUEST_TIMEOUT, self.client.lease_revoke(id)).await {
                Ok(Ok(_)) => tracing::info!(name, "left the ring"),
                Ok(Err(e)) => {
                    tracing::warn!(name, error = %e, "revoking the lease failed; it expires by itself")
                }
                Err(_) => {
                    tracing::warn!(name, "revoking the lease timed out; it expires by itself")
                }
            }
        }
        Ok(())
    }

    async fn register(&mut self, name: &str, value: &str, ttl_s: i64) -> Result<i64, Error> {
        let id = self.client.lease_grant(ttl_s).await?;
        let key = self.key(name);
        self.client.put(&key, value, id).await?;
        Ok(id)
    }

    async fn try_register(&mut self, name: &str, value: &str, ttl_s: i64) -> Option<i64> {
        match self.register(name, value, ttl_s).await {
            Ok(id) => {
                tracing::info!(name, "joined the ring");
                Some(id)
            }
            Err(e) => {
                tracing::warn!(name, error = %e, "joining the ring failed; retrying");
                None
            }
        }
    }
}

/// What [`follow`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The members now (complete, sorted by name).
    Members(Vec<Member>),
    /// etcd cannot be reached (true) or can again (false).
    Stale(bool),
}

/// Least and most time between two attempts to reach etcd.
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Follows the ring's members in etcd, sending each change to `events`,
/// until `events` is closed. Never fails: while etcd is unreachable it
/// sends `Stale(true)` and retries with backoff; `Stale(false)` once it
/// watches again.
pub async fn follow(endpoints: Vec<String>, prefix: String, events: mpsc::Sender<Event>) {
    let mut f = Follower {
        prefix,
        members: BTreeMap::new(),
        revision: None,
        stale: false,
        events,
    };
    let mut backoff = RETRY_MIN;
    loop {
        let was_stale = f.stale;
        let outcome = f.run(&endpoints).await;
        let Err(e) = outcome else {
            return; // the receiver is gone
        };
        if was_stale && !f.stale {
            backoff = RETRY_MIN; // it worked for a while
        }
        tracing::warn!(error = %e, "etcd unreachable or watch broken; routing on the last known ring");
        if !f.stale {
            f.stale = true;
            if f.events.send(Event::Stale(true)).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RETRY_MAX);
    }
}

struct Follower {
    prefix: String,
    members: BTreeMap<String, Member>,
    /// The last revision applied; `None` until a full load.
    revision: Option<i64>,
    /// `Stale(true)` was sent and not yet taken back.
    stale: bool,
    events: mpsc::Sender<Event>,
}

impl Follower {
    /// One connection's worth of following: `Ok(())` when `events` is
    /// closed, an error when etcd fails.
    async fn run(&mut self, endpoints: &[String]) -> Result<(), Error> {
        let mut reg = Registry::connect(endpoints, &self.prefix).await?;
        let start = format!("{}members/", self.prefix);
        loop {
            let from = match self.revision {
                // Re-watch from where the last watch stopped.
                Some(r) => r + 1,
                None => {
                    let (list, rev) = reg.list().await?;
                    self.members = list.into_iter().map(|m| (m.name.clone(), m)).collect();
                    self.revision = Some(rev);
                    if !self.send_members().await {
                        return Ok(());
                    }
                    rev + 1
                }
            };
            let mut stream = reg.client.watch(&start, from).await?;
            if self.stale {
                self.stale = false;
                if self.events.send(Event::Stale(false)).await.is_err() {
                    return Ok(());
                }
            }
            loop {
                let resp = stream.message().await?;
                if resp.compact_revision > 0 || resp.canceled {
                    // What was missed is gone from etcd's history: start
                    // over from a full load.
                    tracing::warn!(
                        compacted = resp.compact_revision,
                        "ring watch compacted or canceled; reloading the members"
                    );
                    self.revision = None;
                    break;
                }
                if apply(&self.prefix, &mut self.members, &mut self.revision, &resp)
                    && !self.send_members().await
                {
                    return Ok(());
                }
            }
        }
    }

    async fn send_members(&self) -> bool {
        let list = self.members.values().cloned().collect();
        self.events.send(Event::Members(list)).await.is_ok()
    }
}

/// Applies a watch response; returns whether the members changed.
fn apply(
    prefix: &str,
    members: &mut BTreeMap<String, Member>,
    revision: &mut Option<i64>,
    resp: &WatchResponse,
) -> bool {
    let before = members.clone();
    for ev in &resp.events {
        let Some(kv) = &ev.kv else { continue };
        let name = std::str::from_utf8(&kv.key)
            .ok()
            .and_then(|k| k.strip_prefix(prefix))
            .and_then(|k| k.strip_prefix("members/"))
            .map(str::to_owned);
        let Some(name) = name else { continue };
        if ev.kind == "DELETE" {
            members.remove(&name);
        } else {
            match parse(prefix, &kv.key, &kv.value) {
                Some(m) => {
                    members.insert(name, m);
                }
                None => {
                    members.remove(&name);
                }
            }
        }
        *revision = Some(revision.unwrap_or(0).max(kv.mod_revision));
    }
    if resp.header.revision > 0 {
        *revision = Some(revision.unwrap_or(0).max(resp.header.revision));
    }
    *members != before
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_urls_are_checked() {
        assert!(validate_name("redis-1:6379").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name(&"x".repeat(129)).is_err());
        assert!(validate_url("redis://10.0.0.1:6379").is_ok());
        assert!(validate_url("http://x").is_err());
        assert_eq!(default_name("redis://u:p@10.0.0.1:6380/0"), "10.0.0.1:6380");
        assert_eq!(default_name("redis://h:1"), "h:1");
    }

    #[test]
    fn malformed_values_are_skipped() {
        let p = DEFAULT_PREFIX;
        let key = |n: &str| format!("{p}members/{n}").into_bytes();
        assert_eq!(
            parse(p, &key("r1"), br#"{"url":"redis://h:1"}"#),
            Some(Member {
                name: "r1".into(),
                url: "redis://h:1".into()
            })
        );
        assert_eq!(parse(p, &key("r1"), b"not json"), None);
        assert_eq!(parse(p, &key("r1"), br#"{"url":"http://h:1"}"#), None);
        assert_eq!(
            parse(p, &key("bad/name"), br#"{"url":"redis://h:1"}"#),
            None
        );
        assert_eq!(parse(p, b"/other/key", br#"{"url":"redis://h:1"}"#), None);
    }

    use nearby_conformance::services::{self, EtcdProcess};

    fn etcd() -> Option<EtcdProcess> {
        match EtcdProcess::start() {
            Ok(e) => Some(e),
            Err(e) => {
                services::missing("etcd", e);
                None
            }
        }
    }

    fn member(name: &str) -> Member {
        Member {
            name: name.into(),
            url: format!("redis://{name}:6379"),
        }
    }

    fn put(etcd: &EtcdProcess, name: &str) {
        let key = format!("{DEFAULT_PREFIX}members/{name}");
        let value = format!(r#"{{"url":"redis://{name}:6379"}}"#);
        etcd.ctl(&["put", &key, &value]).expect("put");
    }

    async fn revision(reg: &mut Registry) -> i64 {
        reg.list().await.expect("list").1
    }

    /// Runs a follower that last saw `revision` and `members`, and returns
    /// the first members it reports.
    async fn resume(etcd: &EtcdProcess, revision: i64, members: &[&str]) -> Vec<Member> {
        let (tx, mut rx) = mpsc::channel(8);
        let mut f = Follower {
            prefix: DEFAULT_PREFIX.into(),
            members: members.iter().map(|n| (n.to_string(), member(n))).collect(),
            revision: Some(revision),
            stale: false,
            events: tx,
        };
        let endpoints = vec![etcd.url()];
        let task = tokio::spawn(async move { f.run(&endpoints).await });
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match rx.recv().await {
                    Some(Event::Members(m)) => return m,
                    Some(Event::Stale(_)) => continue,
                    None => panic!("follower stopped"),
                }
            }
        })
        .await
        .expect("members reported");
        task.abort();
        got
    }

    /// An etcd where `a` joined, then (after the returned revision, while a
    /// follower was away) `joining` joined and `a` left.
    async fn missed(joining: &[&str]) -> Option<(EtcdProcess, Registry, i64)> {
        let etcd = etcd()?;
        put(&etcd, "a");
        let mut reg = Registry::connect(&[etcd.url()], DEFAULT_PREFIX)
            .await
            .expect("connect");
        let seen = revision(&mut reg).await;
        for name in joining {
            put(&etcd, name);
        }
        assert!(reg.leave("a").await.expect("leave"));
        Some((etcd, reg, seen))
    }

    #[tokio::test]
    async fn a_resumed_watch_applies_what_changed_since_its_revision() {
        let Some((etcd, _, seen)) = missed(&["b"]).await else {
            return;
        };
        assert_eq!(resume(&etcd, seen, &["a"]).await, vec![member("b")]);
    }

    #[tokio::test]
    async fn a_compacted_revision_means_a_full_reload() {
        let Some((etcd, mut reg, seen)) = missed(&["b", "c"]).await else {
            return;
        };
        let now = revision(&mut reg).await;
        etcd.ctl(&["compaction", &now.to_string()])
            .expect("compact");
        // History from `seen` is gone: the follower must reload, which
        // also drops the stale "old" it believed in.
        let got = resume(&etcd, seen, &["a", "old"]).await;
        assert_eq!(got, vec![member("b"), member("c")]);
    }

    #[tokio::test]
    async fn join_registers_under_a_lease_and_revokes_it_on_stop() {
        let Some(etcd) = etcd() else { return };
        let mut reg = Registry::connect(&[etcd.url()], DEFAULT_PREFIX)
            .await
            .expect("connect");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let url = etcd.url();
        let agent = tokio::spawn(async move {
            let mut reg = Registry::connect(&[url], DEFAULT_PREFIX)
                .await
                .expect("connect");
            reg.join(
                "r1",
                "redis://h:1",
                Duration::from_secs(60),
                || async { true },
                async {
                    let _ = stop_rx.await;
                },
            )
            .await
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while reg.list().await.expect("list").0.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "never joined");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let lease = etcd
            .ctl(&["get", &format!("{DEFAULT_PREFIX}members/r1"), "-w", "json"])
            .expect("get");
        assert!(lease.contains("\"lease\""), "not under a lease: {lease}");
        stop_tx.send(()).expect("stop");
        agent.await.expect("agent").expect("join");
        // Revoked, not left to its 60 s TTL.
        assert!(reg.list().await.expect("list").0.is_empty());
    }

    #[tokio::test]
    async fn an_unhealthy_server_lets_its_lease_lapse() {
        let Some(etcd) = etcd() else { return };
        let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let h = healthy.clone();
        let url = etcd.url();
        let agent = tokio::spawn(async move {
            let mut reg = Registry::connect(&[url], DEFAULT_PREFIX)
                .await
                .expect("connect");
            let check = move || {
                let h = h.clone();
                async move { h.load(std::sync::atomic::Ordering::Relaxed) }
            };
            reg.join(
                "r1",
                "redis://h:1",
                Duration::from_secs(1),
                check,
                std::future::pending(),
            )
            .await
        });
        let mut reg = Registry::connect(&[etcd.url()], DEFAULT_PREFIX)
            .await
            .expect("connect");
        let until = |want: bool| {
            let url = etcd.url();
            async move {
                let mut reg = Registry::connect(&[url], DEFAULT_PREFIX)
                    .await
                    .expect("connect");
                let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
                loop {
                    let present = !reg.list().await.expect("list").0.is_empty();
                    if present == want {
                        return;
                    }
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "member present: {present}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        until(true).await;
        healthy.store(false, std::sync::atomic::Ordering::Relaxed);
        until(false).await;
        // Healthy again: it joins again under a new lease.
        healthy.store(true, std::sync::atomic::Ordering::Relaxed);
        until(true).await;
        let _ = reg.leave("r1").await;
        agent.abort();
    }
}
