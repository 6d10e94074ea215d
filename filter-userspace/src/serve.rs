//! Serving the REST API's router on a TCP or Unix listener with hyper's HTTP/1 connection
//! builder. It exists for one setting `axum::serve` does not make: a header-read timeout. A
//! connection that has not sent a complete request head within it is closed, so a client that
//! opens connections and trickles header bytes (slowloris), or sends nothing, cannot hold them
//! for ever. The timer runs again for each request on a kept-alive connection, so an idle
//! keep-alive connection is closed after the same time.
//!
//! Shutdown: when the shared signal changes, no new connection is accepted; a connection with
//! a request in flight finishes it (the router's own per-request timeout bounds that) and is
//! closed, an idle one is closed at once; [`serve`] returns when all are gone.
//! Each request carries the connection's [`Peer`] (an extension): the TCP peer's address, or
//! over the Unix socket the peer's uid and pid (`SO_PEERCRED`), for the audit line of a policy
//! change. It must not know about routes, auth or limits: those are the router's
//! ([`crate::api`]).

use std::net::SocketAddr;
use std::time::Duration;

use axum::serve::Listener;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How long a client may take to send a request's line and headers (`filterd
/// --api-header-timeout`).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is at the other end of an API connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    /// The Unix socket: the peer process's credentials, as the kernel gives them.
    Unix {
        uid: Option<u32>,
        pid: Option<i32>,
    },
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(a) => write!(f, "{a}"),
            Peer::Unix { uid, pid } => {
                match uid {
                    Some(u) => write!(f, "uid {u}")?,
                    None => write!(f, "uid ?")?,
                }
                if let Some(p) = pid {
                    write!(f, " (pid {p})")?;
                }
                write!(f, " on the Unix socket")
            }
        }
    }
}

/// A listener whose connections can say who is at their other end.
pub trait ApiListener: Listener {
    fn peer(io: &Self::Io, addr: &Self::Addr) -> Peer;
}

impl ApiListener for tokio::net::TcpListener {
    fn peer(_io: &Self::Io, addr: &Self::Addr) -> Peer {
        Peer::Tcp(*addr)
    }
}

impl ApiListener for tokio::net::UnixListener {
    fn peer(io: &Self::Io, _addr: &Self::Addr) -> Peer {
        match io.peer_cred() {
            Ok(c) => Peer::Unix {
                uid: Some(c.uid()),
                pid: c.pid(),
            },
            Err(_) => Peer::Unix {
                uid: None,
                pid: None,
            },
        }
    }
}

/// Serve `router` on `listener` until `shutdown` changes (or its sender is gone).
pub async fn serve<L: ApiListener>(
    mut listener: L,
    router: Router,
    header_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let mut conns = JoinSet::new();
    loop {
        let io = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            // Reap finished connections as they go.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            (io, addr) = listener.accept() => (L::peer(&io, &addr), io),
        };
        let (peer, io) = io;
        let service = tower::ServiceExt::map_request(
            router.clone(),
            move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(peer.clone());
                req
            },
        );
        let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
        let mut stop = shutdown.clone();
        conns.spawn(async move {
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                // Header-read timeouts, clients that went away, malformed requests.
                tracing::debug!(error = %e, "API connection closed with an error");
            }
        });
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    async fn start(
        timeout: Duration,
    ) -> (
        std::net::SocketAddr,
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/x", get(|| async { "ok" }));
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, router, timeout, rx));
        (addr, tx, task)
    }

    /// Reads until EOF or error; what was read. Panics after `bound`.
    async fn closed_after(s: &mut TcpStream, bound: Duration) -> Vec<u8> {
        let mut got = Vec::new();
        let read = tokio::time::timeout(bound, async {
            let mut buf = [0u8; 512];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(read.is_ok(), "connection still open after {bound:?}");
        got
    }

    #[tokio::test]
    async fn partial_headers_are_cut_off_and_whole_requests_served() {
        let timeout = Duration::from_millis(500);
        let (addr, tx, task) = start(timeout).await;
        let t0 = Instant::now();
        // A slow client: part of a request line, then nothing.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /x HTT").await.unwrap();
        // One that sends nothing at all.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        // A normal request on another connection works meanwhile.
        let mut ok = TcpStream::connect(addr).await.unwrap();
        ok.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let reply = closed_after(&mut ok, Duration::from_secs(5)).await;
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.ends_with("ok"), "{reply}");
        for s in [&mut slow, &mut silent] {
            closed_after(s, Duration::from_secs(5)).await;
            let took = t0.elapsed();
            assert!(took >= timeout, "closed before the timeout: {took:?}");
        }
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("serve returns after shutdown")
            .unwrap();
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_and_stops_accepting() {
        let (addr, tx, task) = start(Duration::from_secs(30)).await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = idle.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("serve returns with an idle keep-alive connection open")
            .unwrap();
        closed_after(&mut idle, Duration::from_secs(5)).await;
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    }
}
