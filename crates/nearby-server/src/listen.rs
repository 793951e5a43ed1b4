//! Accepting connections: who gets in, and how long they may take.
//!
//! Every accepted TCP connection takes a ticket from [`Admission`] and holds
//! it for its whole life, WebSocket included (the ticket rides inside the
//! I/O object that hyper hands over on upgrade). Three bands:
//!
//! * **normal**, while fewer than `max_connections` are open and the peer
//!   has fewer than `max_connections_per_ip`: HTTP/1.1 with keep-alive,
//!   request headers due within `header_timeout`;
//! * **reserve**, the next `connection_reserve` connections: served one
//!   request each, headers due within [`RESERVE_HEADER_TIMEOUT`], and no
//!   WebSocket upgrade. Health checks, metrics and logins keep working
//!   when the node is full or under a slow-header attack, and a slow client
//!   cannot hold a reserve slot for long;
//! * **refused**, past both (or past the per-IP cap): one canned `503`
//!   with a JSON body, written without reading, and the socket closes at
//!   once.
//!
//! The default `max_connections` leaves room under the process's open-file
//! limit for the reserve and the node's own descriptors (database and Redis
//! connections, files), so `accept` does not run out of descriptors.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::config::ServerConfig;
use crate::error::ApiError;

/// Header deadline of a connection admitted into the reserve.
pub const RESERVE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// Descriptors the node keeps for itself (its database and Redis
/// connections, files, the listener) when `max_connections` is derived
/// from the open-file limit.
pub const OWN_DESCRIPTORS: u64 = 32;

/// Connection limits, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served normally.
    pub max: usize,
    /// Connections from one IP (0: no cap).
    pub per_ip: usize,
    /// Connections past `max` served one request each.
    pub reserve: usize,
    /// The per-IP cap applies to loopback addresses too.
    pub limit_loopback: bool,
}

impl Limits {
    /// From the settings; a `max_connections` of 0 means "what the
    /// open-file limit allows": the soft limit minus the reserve and
    /// [`OWN_DESCRIPTORS`].
    pub fn resolve(cfg: &ServerConfig) -> Self {
        let max = if cfg.max_connections > 0 {
            cfg.max_connections
        } else {
            let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
            let room = nofile.saturating_sub(OWN_DESCRIPTORS + cfg.connection_reserve as u64);
            usize::try_from(room).unwrap_or(usize::MAX).max(1)
        };
        Self {
            max,
            // Behind a proxy every connection comes from the proxy: a
            // per-address cap on the TCP peer would cap the node.
            per_ip: if cfg.trust_forwarded_for {
                0
            } else {
                cfg.max_connections_per_ip
            },
            reserve: cfg.connection_reserve,
            limit_loopback: cfg.limit_loopback,
        }
    }
}

/// Counts open connections, in total and per IP.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    total: AtomicUsize,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// What [`Admission::admit`] decided.
#[derive(Debug)]
pub enum Admit {
    /// Serve normally.
    Normal(Ticket),
    /// Serve one request, quickly, no WebSocket.
    Reserve(Ticket),
    /// Refuse, with this reason.
    Refuse(&'static str),
}

/// One admitted connection; dropping it frees the slot.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.total.fetch_sub(1, Ordering::AcqRel);
        let mut map = self
            .admission
            .by_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl Admission {
    /// Counters for these limits.
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            total: AtomicUsize::new(0),
            by_ip: Mutex::new(HashMap::new()),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Decides for a new connection from `ip`.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Admit {
        let ip = crate::abuse::address_key(ip);
        let l = self.limits;
        let mut map = self.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        let from_ip = map.get(&ip).copied().unwrap_or(0);
        let capped = l.limit_loopback || !ip.is_loopback();
        if capped && l.per_ip > 0 && from_ip >= l.per_ip {
            return Admit::Refuse("too many connections from your address");
        }
        let total = self.total.load(Ordering::Acquire);
        if total >= l.max.saturating_add(l.reserve) {
            return Admit::Refuse("the server is full");
        }
        *map.entry(ip).or_insert(0) += 1;
        self.total.fetch_add(1, Ordering::AcqRel);
        drop(map);
        let ticket = Ticket {
            admission: self.clone(),
            ip,
        };
        if total >= l.max {
            Admit::Reserve(ticket)
        } else {
            Admit::Normal(ticket)
        }
    }
}

/// A TCP stream that holds its admission ticket for as long as it lives,
/// through a WebSocket upgrade too.
struct Admitted {
    tcp: TcpStream,
    _ticket: Ticket,
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// The TCP peer of a request and the band it was admitted in; every
/// request carries it as an extension.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// The TCP peer.
    pub addr: SocketAddr,
    /// Admitted into the reserve: no WebSocket.
    pub reserved: bool,
}

/// The client's IP address: the TCP peer, or with `--trust-forwarded-for`
/// the address the proxy in front appended to `X-Forwarded-For`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

impl ClientIp {
    /// Reads it from a request's parts.
    pub fn of(parts: &Parts, trust_forwarded_for: bool) -> Self {
        let peer = parts
            .extensions
            .get::<Peer>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |p| p.addr.ip());
        if trust_forwarded_for {
            let forwarded = parts
                .headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|s| s.trim().parse::<IpAddr>().ok())
                .next_back();
            if let Some(ip) = forwarded {
                return Self(ip);
            }
        }
        Self(peer)
    }
}

impl FromRequestParts<Arc<crate::AppState>> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<crate::AppState>,
    ) -> Result<Self, ApiError> {
        Ok(Self::of(parts, state.cfg.trust_forwarded_for))
    }
}

/// The canned refusal: written without reading the request.
fn refusal(reason: &str) -> Vec<u8> {
    let body = serde_json::json!({ "code": "too_many_connections", "message": reason }).to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 5\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Refusals that first read the request head (briefly), so that the client
/// reads the 503 as the answer to its request; past this many at once the
/// 503 is written without reading.
const POLITE_REFUSALS: usize = 32;

/// How long a polite refusal waits for the request head.
const REFUSAL_READ: Duration = Duration::from_millis(500);

fn refuse(tcp: TcpStream, reason: &'static str, polite: &Arc<tokio::sync::Semaphore>) {
    let Ok(permit) = polite.clone().try_acquire_owned() else {
        let _ = tcp.try_write(&refusal(reason));
        return;
    };
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _permit = permit;
        let mut tcp = tcp;
        let mut head = Vec::with_capacity(1024);
        let _ = tokio::time::timeout(REFUSAL_READ, async {
            let mut buf = [0u8; 1024];
            while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        let _ = tokio::time::timeout(REFUSAL_READ, async {
            let _ = tcp.write_all(&refusal(reason)).await;
            let _ = tcp.shutdown().await;
        })
        .await;
    });
}

/// Accepts connections until `shutdown` fires, then lets the HTTP
/// connections finish their request in flight (up to `grace`). Upgraded
/// WebSockets are not waited for here.
pub async fn accept_loop(
    listener: TcpListener,
    router: Router,
    admission: Arc<Admission>,
    cfg: &ServerConfig,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let conns = TaskTracker::new();
    let refusing = Arc::new(tokio::sync::Semaphore::new(POLITE_REFUSALS));
    let header_timeout = cfg.header_timeout;
    let send_buffer = cfg.socket_send_buffer;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (tcp, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, or a connection reset before accept:
                // back off a little rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (ticket, reserved) = match admission.admit(addr.ip()) {
            Admit::Normal(t) => (t, false),
            Admit::Reserve(t) => (t, true),
            Admit::Refuse(reason) => {
                metrics::counter!("nearby_connections_refused_total").increment(1);
                refuse(tcp, reason, &refusing);
                continue;
            }
        };
        // Frames are already coalesced per wake-up (see `ws`); Nagle's
        // algorithm would only hold the next small write until the peer's
        // delayed ACK, which put a ~40 ms floor under the latency tail.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        if send_buffer > 0 {
            // Caps what the kernel holds for a client that stops reading
            // (autotuning lets it grow to megabytes).
            if let Err(e) = socket2::SockRef::from(&tcp).set_send_buffer_size(send_buffer) {
                tracing::debug!(error = %e, "cannot set SO_SNDBUF");
            }
        }
        let io = TokioIo::new(Admitted {
            tcp,
            _ticket: ticket,
        });
        let peer = Peer { addr, reserved };
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(peer);
            let router = router.clone();
            async move {
                let resp = router.oneshot(req.map(axum::body::Body::new)).await;
                Ok::<_, Infallible>(resp.unwrap_or_else(|e| match e {}))
            }
        });
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(if reserved {
                RESERVE_HEADER_TIMEOUT.min(header_timeout)
            } else {
                header_timeout
            })
            .keep_alive(!reserved)
            // Past hyper's default of 100 headers it answers 431 itself,
            // with an empty body: parse up to this many, so that our own
            // limit (`MAX_HEADERS`, answered in JSON) is the one met.
            .max_headers(crate::HTTP_MAX_HEADERS);
        let stop = shutdown.clone();
        conns.spawn(async move {
            let conn = http.serve_connection(io, service).with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    // Closed at once: new connections are refused by the kernel instead of
    // waiting in the backlog while the node drains.
    drop(listener);
    conns.close();
    if tokio::time::timeout(grace, conns.wait()).await.is_err() {
        tracing::warn!("HTTP connections still open after the grace period");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_fill_in_order_and_free_on_drop() {
        let adm = Admission::new(Limits {
            max: 2,
            per_ip: 3,
            reserve: 1,
            limit_loopback: true,
        });
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let t1 = adm.admit(a);
        let t2 = adm.admit(a);
        assert!(matches!((&t1, &t2), (Admit::Normal(_), Admit::Normal(_))));
        let t3 = adm.admit(b);
        assert!(matches!(t3, Admit::Reserve(_)), "{t3:?}");
        assert!(matches!(adm.admit(b), Admit::Refuse(_)), "full");
        drop(t1);
        let t4 = adm.admit(b);
        assert!(matches!(t4, Admit::Reserve(_)), "{t4:?}");
        assert_eq!(
            adm.open(),
            3,
            "the refused and the dropped ones are not counted"
        );
    }

    #[test]
    fn the_per_ip_cap_counts_every_band() {
        let adm = Admission::new(Limits {
            max: 10,
            per_ip: 2,
            reserve: 0,
            limit_loopback: true,
        });
        let ip = IpAddr::from([10, 0, 0, 1]);
        let _held = [adm.admit(ip), adm.admit(ip)];
        assert!(matches!(adm.admit(ip), Admit::Refuse(_)));
        assert!(matches!(
            adm.admit(IpAddr::from([10, 0, 0, 2])),
            Admit::Normal(_)
        ));
    }

    #[test]
    fn forwarded_for_is_read_only_when_trusted() {
        let (mut parts, ()) = axum::http::Request::builder()
            .header("x-forwarded-for", "203.0.113.9, 198.51.100.7")
            .body(())
            .map(|r| r.into_parts())
            .unwrap_or_else(|e| panic!("{e}"));
        parts.extensions.insert(Peer {
            addr: SocketAddr::from(([127, 0, 0, 1], 4000)),
            reserved: false,
        });
        assert_eq!(ClientIp::of(&parts, false).0, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(
            ClientIp::of(&parts, true).0,
            IpAddr::from([198, 51, 100, 7])
        );
    }
}
