//! The HTTP server: at most `api.max_connections` connections at once, and none kept that makes
//! no progress for `api.idle_timeout_secs`.
//!
//! `axum::serve`, which this replaces, has neither: it accepts every connection, and it gives
//! hyper no timer, so hyper's header-read timeout never runs. A connection that sent nothing, a
//! keep-alive one left idle, one that announced a body and sent none of it, or one whose client
//! read none of a response stayed open for as long as its client kept it, each holding a task,
//! buffers and a file descriptor. WebSocket connections count here too, from the upgrade
//! request until they close (`ws.max_connections` caps them among themselves).

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::ServiceBuilder;
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::AppState;

mod counted;
mod fds;

use counted::Counted;
pub use counted::{OpenConnections, SendQueue, WriteTimeout};
pub use fds::{fd_limit, fit_to_fds, raise_fd_limit, RESERVED_FDS};

/// The limits [`serve`] holds connections to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Most connections open at once, HTTP and WebSocket (`0`: no cap). At the cap the server
    /// accepts no more until one closes; the kernel's backlog holds the next ones meanwhile.
    pub max_connections: usize,
    /// How long a connection may make no progress before it is closed (a request's body is
    /// refused): no request head (the idle time before one on a keep-alive connection
    /// included), no byte of a request's body, or no byte of a response taken by the client.
    pub idle_timeout: Duration,
}

impl ServerLimits {
    /// These limits with the connection cap fitted to the process's file-descriptor limit
    /// (raised to the hard limit first), and `ws_cap` (`ws.max_connections`, `0`: none) with
    /// it: where the node's cap is lowered, WebSockets keep below four fifths of it, so that
    /// they cannot take every place from HTTP requests. Each change is logged.
    pub fn fitted_to_fds(self, ws_cap: usize) -> (Self, usize) {
        let fds = raise_fd_limit();
        let cap = fit_to_fds(self.max_connections, fds);
        if cap == self.max_connections {
            return (self, ws_cap);
        }
        tracing::warn!(
            configured = self.max_connections,
            fd_limit = fds,
            cap,
            "the file-descriptor limit is too low for api.max_connections; holding fewer connections (raise LimitNOFILE / ulimit -n)"
        );
        let ws = ws_under(cap, ws_cap);
        if ws != ws_cap {
            tracing::warn!(
                configured = ws_cap,
                cap = ws,
                "ws.max_connections lowered with api.max_connections, to leave HTTP a fifth"
            );
        }
        let limits = Self {
            max_connections: cap,
            ..self
        };
        (limits, ws)
    }
}

/// `ws` (`0`: none) lowered if needed to leave HTTP a fifth (at least one) of `all` connections.
pub fn ws_under(all: usize, ws: usize) -> usize {
    let most = all.saturating_sub((all / 5).max(1)).max(1);
    if ws == 0 {
        most
    } else {
        ws.min(most)
    }
}

/// How long a stopping server waits for the requests in progress.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves the API on `listener` within `limits` until `shutdown` resolves, then waits for the
/// requests in progress (upgraded WebSocket connections are no longer the server's).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    limits: ServerLimits,
    open: OpenConnections,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let service = TowerToHyperService::new(
        ServiceBuilder::new()
            .layer(RequestBodyTimeoutLayer::new(limits.idle_timeout))
            .service(crate::routes::router(state)),
    );
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout);
    let permits = (limits.max_connections > 0).then(|| {
        Arc::new(Semaphore::new(
            limits.max_connections.min(Semaphore::MAX_PERMITS),
        ))
    });
    // Dropping `stop_rx` tells the accept loop and every connection to stop; each connection
    // holds a `done_rx`, so `done_tx.closed()` is when the last one has finished.
    let (stop_tx, stop_rx) = watch::channel(());
    tokio::spawn(async move {
        shutdown.await;
        drop(stop_rx);
    });
    let (done_tx, done_rx) = watch::channel(());
    let mut warned: Option<Instant> = None;
    loop {
        let permit = match &permits {
            None => None,
            Some(permits) => match permits.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                        warned = Some(Instant::now());
                        tracing::warn!(
                            max = limits.max_connections,
                            "the node holds api.max_connections connections; new ones wait in the kernel's backlog until one closes"
                        );
                    }
                    tokio::select! {
                        permit = permits.clone().acquire_owned() => match permit {
                            Ok(permit) => Some(permit),
                            Err(_) => break, // closed: never happens, the semaphore is ours
                        },
                        _ = stop_tx.closed() => break,
                    }
                }
            },
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => (stream, crate::client_addr::PeerAddr(peer.ip())),
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            _ = stop_tx.closed() => break,
        };
        // Small WebSocket frames and responses go out at once instead of waiting for the
        // previous segment's acknowledgement (Nagle).
        let _ = stream.set_nodelay(true);
        let timeout = WriteTimeout::new(limits.idle_timeout);
        let send_queue = SendQueue::of(&stream);
        let io = TokioIo::new(Counted::new(stream, permit, &open, timeout.clone()));
        let service = service.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
            req.extensions_mut().insert(timeout.clone());
            req.extensions_mut().insert(send_queue);
            req.extensions_mut().insert(peer);
            hyper::service::Service::call(&service, req)
        });
        let conn = http.serve_connection(io, service).with_upgrades();
        let stop = stop_tx.clone();
        let done = done_rx.clone();
        tokio::spawn(async move {
            // Declared first, dropped last: after the connection and its socket.
            let _done = done;
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.closed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    drop(done_rx);
    // Requests in progress get a while to finish; a client trickling a request or reading a
    // response slowly does not hold the process up past that.
    if tokio::time::timeout(SHUTDOWN_GRACE, done_tx.closed())
        .await
        .is_err()
    {
        tracing::warn!(
            requests = done_tx.receiver_count(),
            "stopping with requests still in progress after {SHUTDOWN_GRACE:?}"
        );
    }
    Ok(())
}

/// What to do when `accept` fails: a failed handshake concerns one client only; anything else
/// (out of file descriptors, `EMFILE`) is logged and retried a second later, when connections
/// may have closed.
async fn accept_failed(e: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;
    use crate::routes::tests::{state, Sweeping};

    const GET: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n";

    /// Serves a test state on a free port, with a cap of `max_connections` and an idle timeout
    /// of `idle_secs`, until `stop` is sent.
    async fn start(max_connections: usize, idle_secs: u64) -> Started {
        start_with(max_connections, idle_secs, state(Sweeping::to(0))).await
    }

    type Started = (
        std::net::SocketAddr,
        OpenConnections,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<io::Result<()>>,
    );

    async fn start_with(max_connections: usize, idle_secs: u64, state: AppState) -> Started {
        let limits = ServerLimits {
            max_connections,
            idle_timeout: Duration::from_secs(idle_secs),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = OpenConnections::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, state, limits, open.clone(), async move {
            let _ = stopped.await;
        }));
        (addr, open, stop, server)
    }

    #[tokio::test]
    async fn a_request_that_takes_longer_than_the_idle_timeout_is_answered() {
        let mut reader = Sweeping::to(0);
        reader.list_delay = Duration::from_millis(2500);
        let st = state(reader);
        let token = crate::routes::tests::token(&st, "b:r");
        let (addr, _open, _stop, _server) = start_with(10, 1, st).await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let get = format!(
            "GET /v1/buckets/b/docs HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {token}\r\n\r\n"
        );
        let asked = Instant::now();
        conn.write_all(get.as_bytes()).await.unwrap();
        let wait = Duration::from_secs(10);
        let text = String::from_utf8(read_within(&mut conn, wait).await.unwrap()).unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        // It did take longer than the timeout.
        assert!(
            asked.elapsed() >= Duration::from_secs(2),
            "{:?}",
            asked.elapsed()
        );
    }

    /// What the server sends on `conn` within `wait`: `Some(bytes)` (empty: it closed the
    /// connection), `None` when it sent nothing.
    async fn read_within(conn: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 4096];
        match tokio::time::timeout(wait, conn.read(&mut buf)).await {
            Ok(Ok(n)) => Some(buf[..n].to_vec()),
            Ok(Err(_)) => Some(Vec::new()),
            Err(_) => None,
        }
    }

    /// A keep-alive connection that has made one request and had its `200`.
    async fn served(addr: std::net::SocketAddr) -> TcpStream {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(GET).await.unwrap();
        let answer = read_within(&mut conn, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
        conn
    }

    async fn eventually(what: &str, ok: impl FnMut() -> bool) {
        within(Duration::from_secs(2), what, ok).await
    }

    async fn within(wait: Duration, what: &str, mut ok: impl FnMut() -> bool) {
        let until = Instant::now() + wait;
        while !ok() {
            assert!(
                Instant::now() < until,
                "{what} did not happen within {wait:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn silent_and_idle_connections_are_closed_and_the_cap_holds_the_next_until_then() {
        let (addr, open, _stop, _server) = start(2, 3).await;
        // One connection sends nothing; another makes a keep-alive request, then idles.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut idle = served(addr).await;
        eventually("two connections counted", || open.get() == 2).await;
        // A third is connected by the kernel but not accepted: its request waits.
        let mut third = TcpStream::connect(addr).await.unwrap();
        third.write_all(GET).await.unwrap();
        let early = read_within(&mut third, Duration::from_millis(500)).await;
        assert_eq!(early, None, "served beyond the cap");
        assert_eq!(open.get(), 2);
        // The header-read timeout closes both (the silent one and the idle keep-alive one),
        // and the third gets its place and its answer.
        for conn in [&mut silent, &mut idle] {
            let closed = read_within(conn, Duration::from_secs(5)).await;
            assert_eq!(closed.as_deref(), Some(&[][..]), "not closed");
        }
        let answer = read_within(&mut third, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
        eventually("only the third counted", || open.get() == 1).await;
        drop(third);
        eventually("none counted", || open.get() == 0).await;
    }

    #[tokio::test]
    async fn a_body_that_does_not_come_is_refused_and_its_connection_closed() {
        let st = state(Sweeping::to(0));
        let token = crate::routes::tests::token(&st, "b:rw");
        let (addr, open, _stop, _server) = start_with(10, 1, st).await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        // 100 bytes announced, one sent: no byte for the idle timeout (1 s), long before the
        // body's deadline (75 s).
        let head = format!("PUT /v1/buckets/b/docs/d HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{");
        conn.write_all(head.as_bytes()).await.unwrap();
        let answer = read_within(&mut conn, Duration::from_secs(5))
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains(r#""code":"timeout""#), "{text}");
        eventually("the connection closed", || open.get() == 0).await;
    }

    #[tokio::test]
    async fn a_document_write_without_a_valid_token_is_refused_before_its_body_is_read() {
        let (addr, _open, _stop, _server) = start(10, 30).await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        // 500,000 bytes announced, none sent: the answer does not wait for them.
        let head = "PUT /v1/buckets/b/docs/d HTTP/1.1\r\nhost: t\r\nauthorization: Bearer nope\r\ncontent-length: 500000\r\n\r\n";
        conn.write_all(head.as_bytes()).await.unwrap();
        let answer = read_within(&mut conn, Duration::from_secs(5))
            .await
            .expect("no answer while the body was awaited");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    }

    #[tokio::test]
    async fn a_document_body_over_its_limit_is_refused_with_413() {
        let st = state(Sweeping::to(0));
        let token = crate::routes::tests::token(&st, "b:rw");
        let over = st.limits.max_doc_bytes * 2 + 1;
        let (addr, _open, _stop, _server) = start_with(10, 5, st).await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let head = format!("PUT /v1/buckets/b/docs/d HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {over}\r\n\r\n");
        conn.write_all(head.as_bytes()).await.unwrap();
        // The answer may come before the whole body is taken: the write may then fail.
        let _ = conn.write_all(&vec![b' '; over]).await;
        let answer = read_within(&mut conn, Duration::from_secs(5))
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
        assert!(text.contains(r#""code":"too_large""#), "{text}");
    }

    #[tokio::test]
    async fn a_document_body_trickled_past_its_deadline_is_refused() {
        let mut st = state(Sweeping::to(0));
        st.body_deadline = Duration::from_secs(2);
        let token = crate::routes::tests::token(&st, "b:rw");
        // Each byte comes well within the idle timeout (3 s), the whole body does not within
        // the deadline (2 s).
        let (addr, open, _stop, _server) = start_with(10, 3, st).await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let head = format!("PATCH /v1/buckets/b/docs/d HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{");
        conn.write_all(head.as_bytes()).await.unwrap();
        let started = Instant::now();
        let answer = loop {
            if let Some(answer) = read_within(&mut conn, Duration::from_millis(500)).await {
                break answer;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "never refused");
            let _ = conn.write_all(b" ").await;
        };
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains(r#""code":"timeout""#), "{text}");
        assert!(started.elapsed() >= Duration::from_secs(2), "{text}");
        eventually("the connection closed", || open.get() == 0).await;
    }

    #[tokio::test]
    async fn a_client_that_reads_no_response_is_disconnected() {
        let (addr, open, _stop, _server) = start(10, 1).await;
        let _reader = flood(addr).await;
        eventually("one connection counted", || open.get() == 1).await;
        // Closed by the server about a second after its writes stopped moving.
        let closed = "the server closing a connection whose client reads nothing";
        within(Duration::from_secs(30), closed, || open.get() == 0).await;
    }

    #[tokio::test]
    async fn a_client_that_reads_slowly_but_steadily_keeps_its_connection() {
        let (addr, open, _stop, _server) = start(10, 2).await;
        let mut reader = flood(addr).await;
        // 64 KiB every 100 ms for 4 s: the socket seldom turns writable (that takes much of its
        // buffer drained), but the client takes bytes all along.
        let (until, mut got) = (Instant::now() + Duration::from_secs(4), 0);
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut buf = vec![0u8; 64 * 1024];
            let wait = Duration::from_secs(5);
            let n = tokio::time::timeout(wait, reader.read(&mut buf)).await;
            let n = n.expect("a response byte within 5 s").unwrap_or(0);
            assert!(
                n > 0,
                "closed after {got} bytes while the client was reading"
            );
            got += n;
        }
        assert_eq!(open.get(), 1);
    }

    /// Connects to `addr` and asks for far more responses than the two sockets' buffers hold
    /// (a few MB each), all at once; returns the reading half, which nothing has read.
    async fn flood(addr: std::net::SocketAddr) -> tokio::net::tcp::OwnedReadHalf {
        let get = b"GET /openapi.json HTTP/1.1\r\nhost: t\r\n\r\n";
        let mut probe = TcpStream::connect(addr).await.unwrap();
        probe.write_all(get).await.unwrap();
        let mut one = Vec::new();
        while !String::from_utf8_lossy(&one).contains("\r\n\r\n") {
            let wait = Duration::from_secs(5);
            one.extend(read_within(&mut probe, wait).await.unwrap());
        }
        drop(probe);
        let n = 64 * 1024 * 1024 / one.len().max(1) + 1;
        let conn = TcpStream::connect(addr).await.unwrap();
        let (reader, mut writer) = conn.into_split();
        let requests = get.repeat(n.min(200_000));
        tokio::spawn(async move {
            let _ = writer.write_all(&requests).await;
            std::future::pending::<()>().await;
        });
        reader
    }

    #[test]
    fn the_cap_fits_the_file_descriptor_limit() {
        // Room for it: unchanged. Too few descriptors: what is left after the reserve.
        assert_eq!(fit_to_fds(25_000, Some(100_000)), 25_000);
        assert_eq!(fit_to_fds(25_000, Some(20_000)), 20_000 - RESERVED_FDS);
        // A low limit (1,024 is a common default) keeps half for the rest.
        assert_eq!(fit_to_fds(25_000, Some(1_024)), 512);
        assert_eq!(fit_to_fds(25_000, Some(100)), 50);
        // WebSockets keep below four fifths of a fitted cap, leaving a fifth for HTTP.
        assert_eq!(ws_under(18_976, 20_000), 15_181);
        assert_eq!(ws_under(18_976, 18_900), 15_181);
        assert_eq!(ws_under(18_976, 0), 15_181);
        assert_eq!(ws_under(18_976, 10_000), 10_000);
        assert_eq!(ws_under(4, 0), 3);
        // No cap asked for, or the limit unknown: as configured.
        assert_eq!(fit_to_fds(0, Some(100)), 0);
        assert_eq!(fit_to_fds(25_000, None), 25_000);
        // The process's own limit is readable, and raising it never lowers it.
        let before = fd_limit().expect("RLIMIT_NOFILE");
        assert!(raise_fd_limit().expect("RLIMIT_NOFILE") >= before);
    }

    #[tokio::test]
    async fn without_a_cap_every_connection_is_served_and_shutdown_closes_idle_ones() {
        let (addr, open, stop, server) = start(0, 30).await;
        let mut conns = Vec::new();
        for _ in 0..5 {
            conns.push(served(addr).await);
        }
        assert_eq!(open.get(), 5);
        // Shutdown does not wait for the keep-alive connections' 30 s: it closes them.
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server did not stop")
            .unwrap()
            .unwrap();
        for conn in &mut conns {
            let closed = read_within(conn, Duration::from_secs(1)).await;
            assert_eq!(closed.as_deref(), Some(&[][..]), "not closed");
        }
        assert_eq!(open.get(), 0);
    }
}
