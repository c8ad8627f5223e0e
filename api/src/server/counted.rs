//! [`Counted`]: an accepted connection that holds its place among the node's connections and
//! fails its writes once its client has taken no byte for a while.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};

/// How many connections are open now (clone to share, e.g. with `/status`).
#[derive(Debug, Clone, Default)]
pub struct OpenConnections(Arc<AtomicUsize>);

impl OpenConnections {
    /// Connections open now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// How long a connection's writes may wait for its client to take a byte; shared, so that what
/// the connection becomes can change it (an upgraded WebSocket uses `ws.send_timeout_secs`). A
/// request finds its connection's in its extensions.
#[derive(Debug, Clone)]
pub struct WriteTimeout(Arc<AtomicU64>);

impl WriteTimeout {
    /// A timeout of `timeout`.
    pub fn new(timeout: Duration) -> Self {
        WriteTimeout(Arc::new(AtomicU64::new(millis(timeout))))
    }

    /// Changes it, for the writes that start waiting from now on.
    pub fn set(&self, timeout: Duration) {
        self.0.store(millis(timeout), Ordering::Relaxed);
    }

    /// The timeout now.
    pub fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The send queue of an accepted connection's socket, to see whether its client takes what it
/// is sent. A request finds its connection's in its extensions. It names the socket by its
/// descriptor, so it means that socket only while the connection is open, as it is for the
/// whole session of a WebSocket upgraded from the request.
#[derive(Debug, Clone, Copy)]
pub struct SendQueue(RawFd);

impl SendQueue {
    pub(super) fn of(stream: &TcpStream) -> Self {
        SendQueue(stream.as_raw_fd())
    }

    /// Bytes written to the socket that its peer has not acknowledged yet (`None` where the
    /// system cannot say). Meaningless once the connection has closed (another socket may have
    /// its descriptor): keep a `SendQueue` no longer than its connection.
    pub fn queued(&self) -> Option<usize> {
        queued(self.0)
    }
}

/// A write waiting for the client to take bytes: since when, and how many were queued then.
struct Stall {
    timer: Pin<Box<Sleep>>,
    queued: Option<usize>,
}

/// A connection that gives its place back when it closes, and fails a write once its client
/// has taken no byte for `write_timeout`.
///
/// A socket becomes writable again only when a good part of its send buffer (megabytes on a
/// fast link) has drained, so a client reading slowly can leave a write waiting longer than
/// the timeout while it reads all along. When the timer fires, the bytes still queued in the
/// socket (Linux `SIOCOUTQ`) say whether the client took any since it was set; if it did, the
/// wait starts again.
pub(super) struct Counted {
    io: TcpStream,
    _permit: Option<OwnedSemaphorePermit>,
    open: OpenConnections,
    write_timeout: WriteTimeout,
    stalled: Option<Stall>,
}

impl Counted {
    pub(super) fn new(
        io: TcpStream,
        permit: Option<OwnedSemaphorePermit>,
        open: &OpenConnections,
        write_timeout: WriteTimeout,
    ) -> Self {
        open.0.fetch_add(1, Ordering::Relaxed);
        Self {
            io,
            _permit: permit,
            open: open.clone(),
            write_timeout,
            stalled: None,
        }
    }

    /// `poll` of a write, failed with `TimedOut` once the client has taken nothing for
    /// `write_timeout` while it waited.
    fn timed<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if let Poll::Ready(out) = poll(Pin::new(&mut self.io), cx) {
            self.stalled = None;
            return Poll::Ready(out);
        }
        let (timeout, fd) = (self.write_timeout.get(), self.io.as_raw_fd());
        let stall = self.stalled.get_or_insert_with(|| Stall {
            timer: Box::pin(tokio::time::sleep(timeout)),
            queued: queued(fd),
        });
        while stall.timer.as_mut().poll(cx).is_ready() {
            match (stall.queued, queued(fd)) {
                (Some(then), Some(now)) if now < then => {
                    stall.queued = Some(now);
                    // (A timeout too large to add is a year: a configuration, not a client, chose it.)
                    let year = Duration::from_secs(365 * 86_400);
                    let until = Instant::now().checked_add(timeout);
                    stall
                        .timer
                        .as_mut()
                        .reset(until.unwrap_or_else(|| Instant::now() + year));
                }
                _ => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client took no byte within the connection's write timeout",
                    )))
                }
            }
        }
        Poll::Pending
    }
}

/// Bytes in the socket's send queue that the peer has not acknowledged yet.
#[cfg(target_os = "linux")]
fn queued(fd: RawFd) -> Option<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ on a socket) writes one int into `n` and nothing else; on a
    // descriptor that is closed or not a socket it fails.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    (rc == 0).then(|| usize::try_from(n).unwrap_or(0))
}

/// Unknown elsewhere: a stalled write then fails after the timeout as it stands.
#[cfg(not(target_os = "linux"))]
fn queued(_: RawFd) -> Option<usize> {
    None
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.open.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.timed(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.timed(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn a_lowered_write_timeout_drops_a_client_that_reads_nothing_that_much_sooner() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let timeout = WriteTimeout::new(Duration::from_secs(60));
        let mut conn = Counted::new(server, None, &OpenConnections::default(), timeout.clone());
        // What the connection became (a WebSocket) lowers it after the connection was made.
        timeout.set(Duration::from_millis(300));
        let began = Instant::now();
        let chunk = vec![0u8; 64 * 1024];
        let failed = loop {
            let wrote = tokio::time::timeout(Duration::from_secs(10), conn.write_all(&chunk));
            if let Err(e) = wrote.await.expect("never timed out") {
                break e;
            }
        };
        assert_eq!(failed.kind(), io::ErrorKind::TimedOut);
        // Within the lowered timeout of the buffers filling (far from the 60 s it started with).
        assert!(
            began.elapsed() < Duration::from_secs(3),
            "{:?}",
            began.elapsed()
        );
        drop(client);
    }
}
