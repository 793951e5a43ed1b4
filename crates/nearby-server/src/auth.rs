//! Passwords (argon2id, PHC strings), bearer tokens and the extractor that
//! turns a request into an authenticated user.
//!
//! A token is 32 random bytes, hex-encoded, handed to the client once; the
//! store keeps only its SHA-256, so a leaked database yields no usable token.
//! Tokens are stored rather than signed so that logout revokes them and every
//! node sharing the user store accepts them without sharing a key.

use std::sync::Arc;

use std::cell::RefCell;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use nearby_core::UserId;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::{now_ms, AppState};

thread_local! {
    /// Argon2's working memory (~19 MiB), kept per hashing thread and
    /// reused: allocating it per hash fragmented glibc's arenas until a few
    /// dozen logins held hundreds of MB.
    static BLOCKS: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// Runs argon2 into `out` on this thread's reusable memory.
fn argon2_into(
    argon: &Argon2,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), argon2::Error> {
    let need = argon.params().block_count();
    BLOCKS.with(|cell| {
        let mut blocks = cell.borrow_mut();
        if blocks.len() < need {
            blocks.resize(need, Block::default());
        }
        argon.hash_password_into_with_memory(password, salt, out, &mut blocks[..need])
    })
}

/// Hashes a password with argon2id (default parameters) and a random salt,
/// as a PHC string. CPU-heavy (tens of milliseconds): run it on the
/// [`Hasher`].
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let argon = Argon2::default();
    let salt = SaltString::generate(&mut OsRng);
    let mut salt_buf = [0u8; 64];
    let salt_bytes = salt.as_salt().decode_b64(&mut salt_buf)?;
    let len = argon
        .params()
        .output_len()
        .unwrap_or(Params::DEFAULT_OUTPUT_LEN);
    let output = Output::init_with(len, |out| {
        Ok(argon2_into(&argon, password.as_bytes(), salt_bytes, out)?)
    })?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(argon.params())?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    Ok(phc.to_string())
}

/// Checks a password against a stored PHC hash (any argon2 variant and
/// parameters). A malformed hash verifies nothing. CPU-heavy: run it on the
/// [`Hasher`].
pub fn verify_password(password: &str, phc: &str) -> bool {
    let Ok(h) = PasswordHash::new(phc) else {
        return false;
    };
    let (Ok(algorithm), Ok(params), Some(salt), Some(expected)) = (
        Algorithm::try_from(h.algorithm),
        Params::try_from(&h),
        h.salt,
        h.hash,
    ) else {
        return false;
    };
    let version = match h.version.map(Version::try_from).transpose() {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => return false,
    };
    let argon = Argon2::new(algorithm, version, params);
    let mut salt_buf = [0u8; 64];
    let Ok(salt_bytes) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    // `Output`'s equality is constant-time.
    Output::init_with(expected.len(), |out| {
        Ok(argon2_into(&argon, password.as_bytes(), salt_bytes, out)?)
    })
    .is_ok_and(|computed| computed == expected)
}

/// A new token and the hash to store.
pub fn new_token() -> (String, [u8; 32]) {
    let mut raw = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut raw);
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let hash = token_hash(&token);
    (token, hash)
}

/// What the store keeps for a token.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// An authenticated caller: from `Authorization: Bearer TOKEN`, or, on the
/// WebSocket upgrade only (browsers cannot set headers on a WebSocket),
/// from a single-use `ticket` (`POST /v1/ws-ticket`) or, for older
/// clients, the `token` query parameter.
#[derive(Debug, Clone, Copy)]
pub struct AuthUser {
    /// Who.
    pub id: UserId,
    /// When their token expires, Unix milliseconds.
    pub expires_at: i64,
    /// The token's hash, for logout.
    pub token_hash: [u8; 32],
}

fn bearer(parts: &Parts) -> Result<Option<&str>, ApiError> {
    if let Some(h) = parts.headers.get(AUTHORIZATION) {
        let h = h
            .to_str()
            .map_err(|_| ApiError::unauthorized("malformed Authorization header"))?;
        return match h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
        {
            Some(t) => Ok(Some(t.trim())),
            None => Err(ApiError::unauthorized(
                "Authorization must be `Bearer TOKEN`",
            )),
        };
    }
    // A token in the URL ends up in proxy access logs: accepted only where
    // a browser has no other way, the WebSocket upgrade (where a ticket is
    // the better way).
    if parts.uri.path() != "/v1/ws" {
        return Ok(None);
    }
    Ok(query_param(parts, "token="))
}

/// `name=value` of the request's query, the value.
fn query_param<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts
        .uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix(name)))
}

/// Whether `s` has the shape of our tokens and tickets: 64 hex digits.
fn well_formed(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The caller of a WebSocket upgrade with `?ticket=`: the ticket is taken
/// (it works once, on any node) and stands for the token it was issued
/// for, which must still be valid.
async fn ticket_user(state: &AppState, ticket: &str) -> Result<AuthUser, ApiError> {
    let refused = || ApiError::unauthorized("invalid, used or expired ticket");
    if !well_formed(ticket) {
        return Err(refused());
    }
    let users = &state.backends.users;
    let now = now_ms();
    let token = users
        .take_ticket(&token_hash(ticket), now)
        .await?
        .ok_or_else(refused)?;
    let hash: [u8; 32] = token.as_slice().try_into().map_err(|_| refused())?;
    match users.token_user(&hash, now).await? {
        Some((id, expires_at)) => Ok(AuthUser {
            id,
            expires_at,
            token_hash: hash,
        }),
        None => Err(ApiError::unauthorized(
            "the ticket's token is no longer valid",
        )),
    }
}

/// `POST /v1/ws-ticket`: a ticket that opens one WebSocket
/// (`GET /v1/ws?ticket=…`) within `--ws-ticket-secs`, so that a browser
/// need not put its long-lived token in a URL (where proxies' access logs,
/// history and consoles keep it). The session it opens is the token's: it
/// ends with the token's logout or expiry.
pub async fn ws_ticket(
    axum::extract::State(st): axum::extract::State<Arc<AppState>>,
    me: AuthUser,
) -> Result<axum::Json<nearby_proto::rest::WsTicket>, ApiError> {
    st.guards.ticket(me.id, now_ms()).map_err(|wait| {
        ApiError::too_many(
            "too_many_tickets",
            "too many WebSocket tickets for this user; wait a little",
            wait,
        )
    })?;
    let (ticket, hash) = new_token();
    let ttl = i64::try_from(st.cfg.ws_ticket_ttl.as_millis()).unwrap_or(i64::MAX);
    let expires_at = now_ms().saturating_add(ttl).min(me.expires_at);
    st.backends
        .users
        .create_ticket(&hash, &me.token_hash, expires_at)
        .await?;
    Ok(axum::Json(nearby_proto::rest::WsTicket {
        ticket,
        expires_at,
    }))
}

impl FromRequestParts<Arc<AppState>> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let token = match bearer(parts)? {
            Some(t) => t,
            None => match query_param(parts, "ticket=") {
                Some(ticket) if parts.uri.path() == "/v1/ws" => {
                    return ticket_user(state, ticket).await
                }
                _ => return Err(ApiError::unauthorized("a bearer token is required")),
            },
        };
        // Tokens we issue are 64 hex digits; anything else cannot match, so
        // do not spend a store lookup on it.
        if !well_formed(token) {
            return Err(ApiError::unauthorized("invalid token"));
        }
        let hash = token_hash(token);
        match state.backends.users.token_user(&hash, now_ms()).await? {
            Some((id, expires_at)) => Ok(Self {
                id,
                expires_at,
                token_hash: hash,
            }),
            None => Err(ApiError::unauthorized("invalid or expired token")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_themselves() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("correct horsf", &h));
        assert!(!verify_password("correct horse", "not a hash"));
    }

    #[test]
    fn hashes_are_interchangeable_with_the_stock_argon2_ones() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        // Stored by an earlier version (stock API), verified by ours.
        let salt = SaltString::generate(&mut OsRng);
        let stock = Argon2::default()
            .hash_password(b"correct horse", &salt)
            .unwrap()
            .to_string();
        assert!(verify_password("correct horse", &stock));
        assert!(!verify_password("wrong", &stock));
        // Ours, verified by the stock API; same parameters in the string.
        let ours = hash_password("correct horse").unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(Argon2::default()
            .verify_password(b"correct horse", &parsed)
            .is_ok());
        assert_eq!(
            ours.split('$').nth(3),
            stock.split('$').nth(3),
            "m, t, p differ"
        );
        // Other parameters still verify (the memory grows to fit).
        let big = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(32 * 1024, 1, 1, None).unwrap(),
        )
        .hash_password(b"pw", &salt)
        .unwrap()
        .to_string();
        assert!(verify_password("pw", &big));
    }

    #[test]
    fn tokens_are_random_hex_and_hash_stably() {
        let (a, ha) = new_token();
        let (b, _) = new_token();
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(token_hash(&a), ha);
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Which queue a hashing job waits in. Logins are served first: a flood of
/// sign-ups (each a full argon2 hash) must not delay people logging in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Password checks at login.
    Login,
    /// New passwords at sign-up.
    SignUp,
}

#[derive(Default)]
struct Lanes {
    login: std::collections::VecDeque<Job>,
    signup: std::collections::VecDeque<Job>,
    closed: bool,
}

/// A few dedicated threads for password hashing.
///
/// Argon2 takes ~19 MiB per hash. On tokio's blocking pool every burst of
/// logins lands on different threads, and glibc keeps each thread's arena
/// (a 50-login burst left the server at ~1 GB RSS). A fixed set of threads
/// bounds both the CPU and the memory hashing can take. Jobs wait in two
/// bounded queues, logins before sign-ups; beyond [`HASH_QUEUE`] logins or
/// [`SIGNUP_QUEUE`] sign-ups waiting, jobs are refused.
pub struct Hasher {
    shared: Arc<(std::sync::Mutex<Lanes>, std::sync::Condvar)>,
}

/// Login checks that may wait for a thread: about what two threads hash
/// within the 30 s request timeout.
pub const HASH_QUEUE: usize = 1024;

/// Sign-ups that may wait for a thread.
pub const SIGNUP_QUEUE: usize = 64;

/// The pool refused or lost a job.
#[derive(Debug, thiserror::Error)]
#[error("password hashing is overloaded; retry later")]
pub struct HasherBusy;

fn lanes(m: &std::sync::Mutex<Lanes>) -> std::sync::MutexGuard<'_, Lanes> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hasher {
    /// Starts `threads` hashing threads.
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new((
            std::sync::Mutex::new(Lanes::default()),
            std::sync::Condvar::new(),
        ));
        for i in 0..threads.max(1) {
            let shared = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("nearby-hash-{i}"))
                .spawn(move || {
                    let (lock, ready) = &*shared;
                    loop {
                        let job = {
                            let mut q = lanes(lock);
                            loop {
                                if let Some(job) =
                                    q.login.pop_front().or_else(|| q.signup.pop_front())
                                {
                                    break job;
                                }
                                if q.closed {
                                    return;
                                }
                                q = ready.wait(q).unwrap_or_else(|e| e.into_inner());
                            }
                        };
                        job();
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a hashing thread");
            }
        }
        Self { shared }
    }

    /// Runs `f` on a hashing thread, in `lane`, and waits for its result.
    pub async fn run<T: Send + 'static>(
        &self,
        lane: Lane,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HasherBusy> {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            // The request gave up (timed out, client gone): skip the hash.
            if !done.is_closed() {
                let _ = done.send(f());
            }
        });
        {
            let (lock, ready) = &*self.shared;
            let mut q = lanes(lock);
            let (queue, cap) = match lane {
                Lane::Login => (&mut q.login, HASH_QUEUE),
                Lane::SignUp => (&mut q.signup, SIGNUP_QUEUE),
            };
            if queue.len() >= cap {
                return Err(HasherBusy);
            }
            queue.push_back(job);
            ready.notify_one();
        }
        result.await.map_err(|_| HasherBusy)
    }
}

impl Drop for Hasher {
    fn drop(&mut self) {
        let (lock, ready) = &*self.shared;
        lanes(lock).closed = true;
        ready.notify_all();
    }
}
