//! Abuse limits kept in memory on each node: login guessing, sign-up
//! floods, and one user's sockets and updates across connections.
//!
//! **Logins** (NIST SP 800-63B 5.2.2). Each attempt is counted *before*
//! its password is hashed (so parallel guesses are counted too), and given
//! back if it succeeds:
//! * per account and address: after `login_free_failures` consecutive
//!   failures each attempt waits 1 s, doubling to 15 min;
//! * per address, over all accounts: a bucket of `3 ×
//!   login_ip_failures_per_min` refilled at that rate;
//! * per account, from addresses that never logged into it on this node:
//!   `login_account_failures_per_hour`. Addresses that did (the last 8 per
//!   account, for 30 days) are not held back, so a third party guessing
//!   from elsewhere cannot lock the owner out of their usual devices.
//!
//! A refused attempt is a 429 with `Retry-After`, never a verdict on the
//! password. **Sign-ups** are a bucket per address. **Users**: a socket
//! cap per node and one update bucket shared by all of a user's sockets on
//! the node. All limits are per node: behind a load balancer spreading one
//! client over N nodes, the cluster allows N times as much.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nearby_core::rate::TokenBucket;
use nearby_core::UserId;

use crate::config::ServerConfig;

/// Longest wait of the per-account-and-address backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(15 * 60);

/// How long an address that logged in is remembered for its account.
const KNOWN_FOR_MS: i64 = 30 * 24 * 3600 * 1000;

/// Addresses remembered per account.
const KNOWN_PER_ACCOUNT: usize = 8;

/// The key per-address limits count under: IPv4 (IPv4-mapped IPv6
/// included) as is, IPv6 by its /64, the block one subscriber gets.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    last_ms: i64,
}

#[derive(Debug, Default)]
struct LoginBook {
    pairs: HashMap<(String, IpAddr), Backoff>,
    ips: HashMap<IpAddr, TokenBucket>,
    accounts: HashMap<String, TokenBucket>,
    known: HashMap<String, Vec<(IpAddr, i64)>>,
}

/// One login attempt in progress: report how it ended.
#[derive(Debug)]
#[must_use]
pub struct Attempt {
    account: String,
    ip: IpAddr,
    took_account_token: bool,
}

/// The shared state of one user's sockets on this node.
#[derive(Debug)]
struct UserSlot {
    sockets: usize,
    updates: Arc<Mutex<TokenBucket>>,
}

/// A user's socket on this node; dropping it frees its place.
#[derive(Debug)]
pub struct SocketSlot {
    guards: Arc<Guards>,
    user: UserId,
    updates: Arc<Mutex<TokenBucket>>,
}

impl SocketSlot {
    /// Takes one update from the user's shared bucket.
    pub fn take_update(&self, now_ms: i64) -> bool {
        lock(&self.updates).try_take(now_ms)
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        let mut users = lock(&self.guards.users);
        if let Some(slot) = users.get_mut(&self.user) {
            slot.sockets -= 1;
            if slot.sockets == 0 {
                users.remove(&self.user);
            }
        }
    }
}

/// Every in-memory abuse limit of a node.
#[derive(Debug)]
pub struct Guards {
    cfg: ServerConfig,
    login: Mutex<LoginBook>,
    signups: Mutex<HashMap<IpAddr, TokenBucket>>,
    users: Mutex<HashMap<UserId, UserSlot>>,
    tickets: Mutex<HashMap<UserId, TokenBucket>>,
    changes: Mutex<HashMap<UserId, TokenBucket>>,
}

impl Guards {
    /// Empty books for these settings.
    pub fn new(cfg: &ServerConfig) -> Arc<Self> {
        Arc::new(Self {
            cfg: cfg.clone(),
            login: Mutex::default(),
            signups: Mutex::default(),
            users: Mutex::default(),
            tickets: Mutex::default(),
            changes: Mutex::default(),
        })
    }

    fn ip_bucket(&self, now_ms: i64) -> TokenBucket {
        let per_min = self.cfg.login_ip_failures_per_min;
        TokenBucket::new(f64::from(per_min) / 60.0, per_min.saturating_mul(3), now_ms)
    }

    fn account_bucket(&self, now_ms: i64) -> TokenBucket {
        let per_hour = self.cfg.login_account_failures_per_hour;
        TokenBucket::new(f64::from(per_hour) / 3600.0, per_hour, now_ms)
    }

    /// Starts a login attempt for `account` (canonical name) from `ip`, or
    /// says how long to wait. The attempt counts as a failure until
    /// [`Guards::login_succeeded`] says otherwise.
    pub fn login_begin(&self, account: &str, ip: IpAddr, now_ms: i64) -> Result<Attempt, Duration> {
        let ip = address_key(ip);
        let mut book = lock(&self.login);
        let key = (account.to_owned(), ip);
        if let Some(b) = book.pairs.get(&key) {
            let free = self.cfg.login_free_failures;
            if b.failures >= free {
                let exp = (b.failures - free).min(20);
                let wait = Duration::from_secs(1u64 << exp).min(MAX_BACKOFF);
                let until = b.last_ms.saturating_add(wait.as_millis() as i64);
                if now_ms < until {
                    return Err(Duration::from_millis((until - now_ms) as u64));
                }
            }
        }
        let known = book.known.get(account).is_some_and(|ips| {
            ips.iter()
                .any(|(k, t)| *k == ip && now_ms - t < KNOWN_FOR_MS)
        });
        let per_ip = self.cfg.limits_address(ip);
        let ip_wait = if per_ip {
            book.ips.get_mut(&ip).map_or(0, |b| b.wait_ms(now_ms))
        } else {
            0
        };
        // Looked up, not inserted: a refused attempt must not grow the book.
        let account_wait = if known {
            0
        } else {
            book.accounts
                .get_mut(account)
                .map_or(0, |b| b.wait_ms(now_ms))
        };
        let wait = ip_wait.max(account_wait);
        if wait > 0 {
            return Err(Duration::from_millis(wait as u64));
        }
        if per_ip {
            book.ips
                .entry(ip)
                .or_insert_with(|| self.ip_bucket(now_ms))
                .try_take(now_ms);
        }
        if !known {
            book.accounts
                .entry(account.to_owned())
                .or_insert_with(|| self.account_bucket(now_ms))
                .try_take(now_ms);
        }
        let b = book.pairs.entry(key).or_default();
        b.failures = b.failures.saturating_add(1);
        b.last_ms = now_ms;
        Ok(Attempt {
            account: account.to_owned(),
            ip,
            took_account_token: !known,
        })
    }

    /// The attempt could not be decided (hashing overloaded): it counts
    /// for nothing.
    pub fn login_abandoned(&self, attempt: Attempt) {
        let mut book = lock(&self.login);
        let key = (attempt.account.clone(), attempt.ip);
        if let Some(b) = book.pairs.get_mut(&key) {
            b.failures = b.failures.saturating_sub(1);
        }
        if let Some(b) = book.ips.get_mut(&attempt.ip) {
            b.refund();
        }
        if attempt.took_account_token {
            if let Some(b) = book.accounts.get_mut(&attempt.account) {
                b.refund();
            }
        }
    }

    /// The attempt's password was right: it was not a failure after all,
    /// and its address is now known for the account.
    pub fn login_succeeded(&self, attempt: Attempt, now_ms: i64) {
        let mut book = lock(&self.login);
        book.pairs.remove(&(attempt.account.clone(), attempt.ip));
        if let Some(b) = book.ips.get_mut(&attempt.ip) {
            b.refund();
        }
        if attempt.took_account_token {
            if let Some(b) = book.accounts.get_mut(&attempt.account) {
                b.refund();
            }
        }
        let ips = book.known.entry(attempt.account).or_default();
        ips.retain(|(ip, _)| *ip != attempt.ip);
        if ips.len() >= KNOWN_PER_ACCOUNT {
            ips.remove(0);
        }
        ips.push((attempt.ip, now_ms));
    }

    /// A sign-up from `ip`, or how long to wait.
    pub fn signup(&self, ip: IpAddr, now_ms: i64) -> Result<(), Duration> {
        let ip = address_key(ip);
        if !self.cfg.limits_address(ip) {
            return Ok(());
        }
        let per_hour = self.cfg.signups_per_ip_per_hour;
        let mut map = lock(&self.signups);
        let b = map.entry(ip).or_insert_with(|| {
            TokenBucket::new(f64::from(per_hour) / 3600.0, (per_hour / 4).max(1), now_ms)
        });
        take(b, now_ms)
    }

    /// A WebSocket ticket for `user`, or how long to wait. Each ticket is a
    /// store write, so a token cannot be used to flood the store.
    pub fn ticket(&self, user: UserId, now_ms: i64) -> Result<(), Duration> {
        per_user(&self.tickets, self.cfg.ws_tickets_per_min, user, now_ms)
    }

    /// A state change by `user` (a friend request or removal, sharing,
    /// ghost mode, discoverable, a history delete), or how long to wait:
    /// each is a store write and pushes frames to other people, so a
    /// flood of toggles costs every viewer a bounded number of frames.
    pub fn change(&self, user: UserId, now_ms: i64) -> Result<(), Duration> {
        per_user(&self.changes, self.cfg.changes_per_min, user, now_ms)
    }

    /// A place for one more socket of `user`, or `None` at the cap.
    pub fn open_socket(self: &Arc<Self>, user: UserId, now_ms: i64) -> Option<SocketSlot> {
        let mut users = lock(&self.users);
        let slot = users.entry(user).or_insert_with(|| UserSlot {
            sockets: 0,
            updates: Arc::new(Mutex::new(TokenBucket::new(
                self.cfg.user_updates_per_sec,
                self.cfg.user_update_burst,
                now_ms,
            ))),
        });
        if slot.sockets >= self.cfg.max_sockets_per_user {
            return None;
        }
        slot.sockets += 1;
        Some(SocketSlot {
            guards: self.clone(),
            user,
            updates: slot.updates.clone(),
        })
    }

    /// Forgets what no longer limits anyone (expired backoffs, full
    /// buckets, old known addresses), so the books stay as small as the
    /// recent abuse. Returns how many entries remain.
    pub fn sweep(&self, now_ms: i64) -> usize {
        let max_ms = MAX_BACKOFF.as_millis() as i64;
        let mut book = lock(&self.login);
        book.pairs.retain(|_, b| now_ms - b.last_ms < max_ms);
        book.ips.retain(|_, b| !b.is_full(now_ms));
        book.accounts.retain(|_, b| !b.is_full(now_ms));
        book.known.retain(|_, ips| {
            ips.retain(|(_, t)| now_ms - t < KNOWN_FOR_MS);
            !ips.is_empty()
        });
        let login = book.pairs.len() + book.ips.len() + book.accounts.len() + book.known.len();
        drop(book);
        let mut signups = lock(&self.signups);
        signups.retain(|_, b| !b.is_full(now_ms));
        let signups = signups.len();
        let mut per_user = 0;
        for book in [&self.tickets, &self.changes] {
            let mut book = lock(book);
            book.retain(|_, b| !b.is_full(now_ms));
            per_user += book.len();
        }
        login + signups + per_user
    }
}

/// One token from `user`'s bucket in `book` (`per_min`, burst half of it).
fn per_user(
    book: &Mutex<HashMap<UserId, TokenBucket>>,
    per_min: u32,
    user: UserId,
    now_ms: i64,
) -> Result<(), Duration> {
    let mut map = lock(book);
    let b = map.entry(user).or_insert_with(|| {
        TokenBucket::new(f64::from(per_min) / 60.0, (per_min / 2).max(1), now_ms)
    });
    take(b, now_ms)
}

/// One token from `b`, or how long until there is one.
fn take(b: &mut TokenBucket, now_ms: i64) -> Result<(), Duration> {
    match b.wait_ms(now_ms) {
        0 => {
            b.try_take(now_ms);
            Ok(())
        }
        wait => Err(Duration::from_millis(wait as u64)),
    }
}

/// Sweeps `guards` every minute; runs until the process ends.
pub async fn sweeper(guards: Arc<Guards>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let left = guards.sweep(crate::state::now_ms());
        tracing::debug!(entries = left, "abuse books swept");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guards() -> Arc<Guards> {
        Guards::new(&ServerConfig {
            login_free_failures: 2,
            login_ip_failures_per_min: 1,
            login_account_failures_per_hour: 4,
            signups_per_ip_per_hour: 8,
            max_sockets_per_user: 2,
            user_updates_per_sec: 1.0,
            user_update_burst: 2,
            limit_loopback: true,
            ..ServerConfig::default()
        })
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn failures_back_off_per_account_and_address() {
        let g = guards();
        assert!(g.login_begin("alice", A, 0).is_ok());
        assert!(g.login_begin("alice", A, 0).is_ok());
        let wait = g.login_begin("alice", A, 0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        // The same address may still try another account.
        assert!(g.login_begin("bob", A, 0).is_ok());
    }

    #[test]
    fn an_address_runs_out_over_all_accounts() {
        let g = guards();
        for name in ["a1", "a2", "a3"] {
            assert!(g.login_begin(name, A, 0).is_ok(), "burst of 3");
        }
        let wait = g.login_begin("a4", A, 0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(60));
        assert!(
            g.login_begin("a4", B, 0).is_ok(),
            "other addresses are not affected"
        );
    }

    #[test]
    fn guessing_from_elsewhere_does_not_lock_out_a_known_address() {
        let g = guards();
        let ok = g
            .login_begin("alice", A, 0)
            .unwrap_or_else(|w| panic!("{w:?}"));
        g.login_succeeded(ok, 0);
        // Four guessers exhaust the account's bucket for unknown addresses.
        for i in 0..4u8 {
            let ip = IpAddr::from([192, 0, 2, i]);
            assert!(g.login_begin("alice", ip, 10).is_ok());
        }
        assert!(g
            .login_begin("alice", IpAddr::from([192, 0, 2, 9]), 10)
            .is_err());
        assert!(
            g.login_begin("alice", A, 10).is_ok(),
            "the owner's usual address"
        );
    }

    #[test]
    fn success_gives_the_attempt_back() {
        let g = guards();
        for t in 0..10 {
            let a = g
                .login_begin("alice", A, t)
                .unwrap_or_else(|w| panic!("{w:?}"));
            g.login_succeeded(a, t);
        }
    }

    #[test]
    fn loopback_is_exempt_from_per_address_limits_unless_asked() {
        let g = Guards::new(&ServerConfig {
            signups_per_ip_per_hour: 1,
            ..ServerConfig::default()
        });
        let local = IpAddr::from([127, 0, 0, 1]);
        assert!((0..10).all(|_| g.signup(local, 0).is_ok()));
        assert!(g.signup(A, 0).is_ok() && g.signup(A, 0).is_err());
    }

    #[test]
    fn addresses_are_keyed_by_ipv4_or_ipv6_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap_or(A);
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap_or(A);
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap_or(A);
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(other));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap_or(B);
        assert_eq!(address_key(mapped), A);
        let g = guards();
        assert!(g.signup(a, 0).is_ok() && g.signup(b, 0).is_ok());
        assert!(g.signup(a, 0).is_err(), "one /64, one budget");
    }

    #[test]
    fn refused_attempts_do_not_grow_the_books() {
        let g = guards();
        for name in ["a1", "a2", "a3"] {
            assert!(g.login_begin(name, A, 0).is_ok());
        }
        for i in 0..100 {
            assert!(g.login_begin(&format!("spray{i}"), A, 0).is_err());
        }
        let book = lock(&g.login);
        assert_eq!((book.accounts.len(), book.pairs.len()), (3, 3));
    }

    #[test]
    fn sign_ups_are_a_bucket_per_address() {
        let g = guards();
        assert!(g.signup(A, 0).is_ok() && g.signup(A, 0).is_ok());
        let wait = g.signup(A, 0).unwrap_err();
        assert!((449..=451).contains(&wait.as_secs()), "{wait:?}");
        assert!(g.signup(B, 0).is_ok());
    }

    #[test]
    fn sockets_are_capped_and_share_one_update_bucket() {
        let g = guards();
        let u = UserId(1);
        let s1 = g.open_socket(u, 0).expect("first");
        let s2 = g.open_socket(u, 0).expect("second");
        assert!(g.open_socket(u, 0).is_none(), "cap of 2");
        assert!(s1.take_update(0) && s2.take_update(0));
        assert!(!s1.take_update(0) && !s2.take_update(0), "one bucket");
        drop(s1);
        assert!(g.open_socket(u, 0).is_some());
    }

    #[test]
    fn sweeping_keeps_only_what_still_limits() {
        let g = guards();
        let _ = g.login_begin("alice", A, 0);
        assert!(g.sweep(0) > 0);
        assert_eq!(g.sweep(KNOWN_FOR_MS), 0);
    }
}
