//! `nearby bench --ceiling`: what the kernel and tokio allow at the
//! workload's shape, measured in the same run as the server.
//!
//! A bare fan-out over plain TCP, with no protocol logic: the same clients
//! (count, phases, rates, ramp) send a 16-byte update to a server process
//! of this binary (`bench --ceiling-serve ADJ`), which copies it into one
//! `--ceiling-frame-bytes` frame and queues that frame to each of the
//! sender's online friends in range (the run's own graph), one bounded
//! queue and one writer task per connection, one `write` per frame: the
//! shape of a `nearby` node without JSON, WebSocket framing, geometry,
//! privacy checks, the cache or the bus. Latency is measured the same way,
//! send to receipt on the client's clock.
//!
//! Frame layout (little-endian): sender `u32`, step `u32`, send time in µs
//! since the client process's start `u64`; the server's frames are that,
//! padded with zeros.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::fleet::{Schedule, Shared};
use crate::BenchError;

/// Bytes of an update, and the least a frame can be.
pub const UPDATE_BYTES: usize = 16;

/// Frames queued per connection before the server drops (as `nearby`'s
/// session queue does when a reader is slow).
const QUEUE: usize = 64;

/// The online friends in range of every user, by index: who the ceiling
/// server fans each user's update out to.
pub type Fanout = Vec<Vec<u32>>;

/// Each connection's frame queue, by user index, set once it says hello.
type Slot = OnceLock<mpsc::Sender<Arc<[u8]>>>;

/// A plain TCP connection to the ceiling server from `source`, announcing
/// `user`.
pub(crate) async fn open(
    addr: SocketAddr,
    source: Option<IpAddr>,
    user: u32,
) -> Result<TcpStream, BenchError> {
    let mut stream = crate::fleet::connect_from(addr, source).await?;
    stream.write_all(&user.to_le_bytes()).await?;
    Ok(stream)
}

/// One bare client: sends 16 bytes on the schedule the phones use, reads
/// `frame_bytes` frames and records each one's latency against its send's
/// step.
pub(crate) async fn client(
    stream: TcpStream,
    user: u32,
    phase: f64,
    frame_bytes: usize,
    shared: Arc<Shared>,
    go: CancellationToken,
    stop: CancellationToken,
) {
    let (mut rd, mut wr) = stream.into_split();
    tokio::select! {
        _ = go.cancelled() => {}
        _ = stop.cancelled() => return,
    }
    let me = user as usize;
    let mut schedule = Schedule::new(&shared, phase);
    // Frames arrive split or joined however TCP likes: `read` into the
    // free end (cancel-safe, unlike `read_exact` in a select).
    let mut buf = vec![0u8; frame_bytes * 8];
    let mut filled = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(schedule.next) => {
                if !schedule.due(&shared) || !shared.sending.load(std::sync::atomic::Ordering::Relaxed) {
                    continue;
                }
                let mut update = [0u8; UPDATE_BYTES];
                update[..4].copy_from_slice(&user.to_le_bytes());
                update[4..8].copy_from_slice(&u32::from(shared.sending_step()).to_le_bytes());
                update[8..].copy_from_slice(&shared.now_us().to_le_bytes());
                if wr.write_all(&update).await.is_err() {
                    shared.disconnects.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                shared.updates.fetch_add(1, Ordering::Relaxed);
                shared.expected.fetch_add(u64::from(shared.online_friends[me]), Ordering::Relaxed);
            }
            n = rd.read(&mut buf[filled..]) => {
                match n {
                    Ok(n) if n > 0 => filled += n,
                    _ => {
                        if !stop.is_cancelled() {
                            shared.disconnects.fetch_add(1, Ordering::Relaxed);
                        }
                        break;
                    }
                }
                let whole = filled / frame_bytes * frame_bytes;
                let now_us = shared.now_us();
                for frame in buf[..whole].chunks_exact(frame_bytes) {
                    shared.deliveries.fetch_add(1, Ordering::Relaxed);
                    let (step, sent_us) = parse(frame);
                    if step > 0 {
                        shared.record(me, step as usize, now_us.saturating_sub(sent_us));
                    }
                }
                buf.copy_within(whole..filled, 0);
                filled -= whole;
            }
        }
    }
}

/// (step, send time µs) of a frame or update.
fn parse(frame: &[u8]) -> (u32, u64) {
    let mut step = [0u8; 4];
    let mut sent = [0u8; 8];
    step.copy_from_slice(&frame[4..8]);
    sent.copy_from_slice(&frame[8..UPDATE_BYTES]);
    (u32::from_le_bytes(step), u64::from_le_bytes(sent))
}

/// Starts the ceiling server: this binary as `bench --ceiling-serve`, fed
/// `fanout` through a file. Returns the child (killed on drop) and its
/// address.
pub(crate) async fn spawn_server(
    fanout: &Fanout,
    frame_bytes: usize,
    plan_dir: &Path,
) -> Result<(tokio::process::Child, SocketAddr), BenchError> {
    let path = plan_dir.join(format!("nearby-ceiling-{}.json", std::process::id()));
    std::fs::write(&path, serde_json::to_vec(fanout).unwrap_or_default())?;
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["bench", "--ceiling-serve"])
        .arg(&path)
        .args(["--ceiling-frame-bytes", &frame_bytes.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| BenchError::Setup("ceiling server stdout".into()))?;
    let line = tokio::io::BufReader::new(stdout)
        .lines()
        .next_line()
        .await?
        .unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    let addr = line
        .trim()
        .parse()
        .map_err(|_| BenchError::Setup(format!("ceiling server said {line:?}")))?;
    Ok((child, addr))
}

/// `nearby bench --ceiling-serve ADJ`: the bare fan-out server. Prints its
/// address, serves until its stdin closes (the bench ended).
pub async fn serve(fanout_path: &Path, frame_bytes: usize) -> Result<(), BenchError> {
    let fanout: Fanout = serde_json::from_slice(&std::fs::read(fanout_path)?)
        .map_err(|e| BenchError::Args(format!("bad fan-out {}: {e}", fanout_path.display())))?;
    let fanout = Arc::new(fanout);
    let slots: Arc<Vec<Slot>> = Arc::new((0..fanout.len()).map(|_| OnceLock::new()).collect());
    let dropped = Arc::new(AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mut out = tokio::io::stdout();
    out.write_all(format!("{}\n", listener.local_addr()?).as_bytes())
        .await?;
    out.flush().await?;
    let accept = async {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (fanout, slots, dropped) = (fanout.clone(), slots.clone(), dropped.clone());
            tokio::spawn(async move {
                let _ = connection(stream, &fanout, &slots, &dropped, frame_bytes).await;
            });
        }
    };
    // The bench holds our stdin; its end (or the bench's) ends us.
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    let parent_gone = async { while matches!(stdin.read(&mut sink).await, Ok(n) if n > 0) {} };
    tokio::select! {
        () = accept => {}
        () = parent_gone => {}
    }
    let n = dropped.load(Ordering::Relaxed);
    if n > 0 {
        eprintln!("ceiling server: {n} frames dropped on full queues");
    }
    Ok(())
}

async fn connection(
    stream: TcpStream,
    fanout: &Fanout,
    slots: &[Slot],
    dropped: &AtomicU64,
    frame_bytes: usize,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (mut rd, wr) = stream.into_split();
    let mut hello = [0u8; 4];
    rd.read_exact(&mut hello).await?;
    let me = u32::from_le_bytes(hello) as usize;
    let (Some(slot), Some(friends)) = (slots.get(me), fanout.get(me)) else {
        return Ok(());
    };
    let (tx, rx) = mpsc::channel(QUEUE);
    if slot.set(tx).is_err() {
        return Ok(()); // a second connection for one user: not ours to serve
    }
    tokio::spawn(writer(wr, rx));
    let mut update = [0u8; UPDATE_BYTES];
    loop {
        rd.read_exact(&mut update).await?;
        let mut frame = vec![0u8; frame_bytes];
        frame[..UPDATE_BYTES].copy_from_slice(&update);
        let frame: Arc<[u8]> = frame.into();
        for f in friends {
            let sent = slots
                .get(*f as usize)
                .and_then(OnceLock::get)
                .is_some_and(|q| q.try_send(frame.clone()).is_ok());
            if !sent {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One `write` per frame, as a `nearby` session writes one WebSocket frame
/// per delivery.
async fn writer(mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Arc<[u8]>>) {
    while let Some(frame) = rx.recv().await {
        if wr.write_all(&frame).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_carries_its_step_and_send_time() {
        let mut frame = vec![0u8; 110];
        frame[..4].copy_from_slice(&7u32.to_le_bytes());
        frame[4..8].copy_from_slice(&3u32.to_le_bytes());
        frame[8..16].copy_from_slice(&123_456_789u64.to_le_bytes());
        assert_eq!(parse(&frame), (3, 123_456_789));
    }
}
