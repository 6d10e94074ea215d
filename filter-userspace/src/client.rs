//! `filterctl`'s HTTP/1.1 client for filterd's API, over TCP (`--api URL`) or the Unix socket
//! (`--api-socket PATH`): one request per connection (`Connection: close`), the bearer token,
//! JSON bodies; the answer read whole, or (the event feed) line by line as it comes. Plain
//! `http://` only: the API serves loopback and its socket. Blocking, no runtime.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the API is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `host:port` as the URL names it (also the `Host` header).
    Tcp(String),
    Unix(PathBuf),
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--api {0:?}: expected http://HOST:PORT (the API speaks plain HTTP on loopback; use --api-socket for its Unix socket)")]
    BadUrl(String),
    #[error("cannot reach filterd at {at}: {source} (is it running? `systemctl status filterd`; see --api / --api-socket)")]
    Connect {
        at: String,
        #[source]
        source: io::Error,
    },
    #[error("talking to filterd at {at}: {source}")]
    Io {
        at: String,
        #[source]
        source: io::Error,
    },
    #[error("filterd at {at} answered something that is not HTTP: {what}")]
    Protocol { at: String, what: String },
}

impl Endpoint {
    /// `--api URL` (`http://host:port`, a trailing `/` allowed).
    pub fn from_url(url: &str) -> Result<Endpoint, ClientError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| ClientError::BadUrl(url.into()))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(ClientError::BadUrl(url.into()));
        }
        let with_port = if authority.rsplit_once(':').is_some_and(|(h, p)| {
            !h.ends_with(':') && p.bytes().all(|b| b.is_ascii_digit()) && !p.is_empty()
        }) {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Endpoint::Tcp(with_port))
    }

    fn shown(&self) -> String {
        match self {
            Endpoint::Tcp(a) => format!("http://{a}"),
            Endpoint::Unix(p) => p.display().to_string(),
        }
    }
}

/// A whole answer.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// An answer whose body is read as it comes.
pub struct Streaming {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    body: Box<dyn BufRead + Send>,
}

impl Streaming {
    /// The next line of the body (without its newline), `None` at its end.
    pub fn next_line(&mut self) -> io::Result<Option<String>> {
        let mut line = String::new();
        if self.body.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        while line.ends_with(['\n', '\r']) {
            line.pop();
        }
        Ok(Some(line))
    }

    /// The rest of the body.
    pub fn rest(mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.body.read_to_end(&mut out)?;
        Ok(out)
    }
}

trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

/// A client of one filterd.
#[derive(Clone, Debug)]
pub struct Client {
    pub endpoint: Endpoint,
    pub token: Option<String>,
    /// For a whole answer (`None`: wait for ever; the event feed).
    pub timeout: Option<Duration>,
}

impl Client {
    pub fn new(endpoint: Endpoint, token: Option<String>) -> Client {
        Client {
            endpoint,
            token,
            timeout: Some(Duration::from_secs(120)),
        }
    }

    fn connect(&self) -> Result<Box<dyn Conn>, ClientError> {
        let at = self.endpoint.shown();
        let err = |source| ClientError::Connect {
            at: at.clone(),
            source,
        };
        Ok(match &self.endpoint {
            Endpoint::Tcp(a) => {
                let s = TcpStream::connect(a.as_str()).map_err(err)?;
                s.set_read_timeout(self.timeout).map_err(err)?;
                s.set_write_timeout(self.timeout).map_err(err)?;
                Box::new(s)
            }
            Endpoint::Unix(p) => {
                let s = UnixStream::connect(p).map_err(err)?;
                s.set_read_timeout(self.timeout).map_err(err)?;
                s.set_write_timeout(self.timeout).map_err(err)?;
                Box::new(s)
            }
        })
    }

    /// Send a request; the answer's head is read, its body left to the caller.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Streaming, ClientError> {
        let at = self.endpoint.shown();
        let io_err = |source| ClientError::Io {
            at: at.clone(),
            source,
        };
        let host = match &self.endpoint {
            Endpoint::Tcp(a) => a.clone(),
            Endpoint::Unix(_) => "localhost".into(),
        };
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: filterctl/{}\r\nAccept: application/json, application/x-ndjson\r\n",
            env!("CARGO_PKG_VERSION")
        );
        if let Some(t) = &self.token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if let Some(b) = body {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        head.push_str("\r\n");
        let mut conn = self.connect()?;
        conn.write_all(head.as_bytes()).map_err(io_err)?;
        if let Some(b) = body {
            conn.write_all(b).map_err(io_err)?;
        }
        conn.flush().map_err(io_err)?;
        let mut r = BufReader::new(conn);
        let proto = |what: String| ClientError::Protocol {
            at: at.clone(),
            what,
        };
        let mut line = String::new();
        r.read_line(&mut line).map_err(io_err)?;
        let status = line
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| line.strip_prefix("HTTP/1.0 "))
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| proto(format!("status line {:?}", line.trim_end())))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            if r.read_line(&mut line).map_err(io_err)? == 0 {
                return Err(proto("the head ended early".into()));
            }
            let l = line.trim_end_matches(['\r', '\n']);
            if l.is_empty() {
                break;
            }
            let (n, v) = l
                .split_once(':')
                .ok_or_else(|| proto(format!("header line {l:?}")))?;
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let body: Box<dyn BufRead + Send> = if get("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            Box::new(BufReader::new(Chunked {
                inner: r,
                left: 0,
                done: false,
            }))
        } else if let Some(n) = get("content-length").and_then(|v| v.parse::<u64>().ok()) {
            Box::new(BufReader::new(r.take(n)))
        } else {
            Box::new(r)
        };
        Ok(Streaming {
            status,
            headers,
            body,
        })
    }

    /// Send a request and read the whole answer.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        let s = self.send(method, path, body)?;
        let (status, headers) = (s.status, s.headers.clone());
        let at = self.endpoint.shown();
        let body = s.rest().map_err(|source| ClientError::Io { at, source })?;
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

/// A chunked body, de-chunked (RFC 9112 §7.1; extensions and trailers skipped).
struct Chunked<R> {
    inner: R,
    left: u64,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            if self.inner.read_line(&mut line)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let size = line.trim_end().split(';').next().unwrap_or("").trim();
            let n = u64::from_str_radix(size, 16).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, format!("chunk size {size:?}"))
            })?;
            if n == 0 {
                // Trailers, then the empty line.
                loop {
                    line.clear();
                    if self.inner.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                        break;
                    }
                }
                self.done = true;
                return Ok(0);
            }
            self.left = n;
        }
        let want = buf.len().min(self.left as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n as u64;
        if self.left == 0 {
            let mut crlf = String::new();
            self.inner.read_line(&mut crlf)?;
        }
        Ok(n)
    }
}

/// The endpoint `filterctl`'s flags name.
pub fn endpoint(api: &str, socket: Option<&Path>) -> Result<Endpoint, ClientError> {
    match socket {
        Some(p) => Ok(Endpoint::Unix(p.to_owned())),
        None => Endpoint::from_url(api),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use axum::Router;

    fn router() -> Router {
        Router::new()
            .route(
                "/v1/echo",
                post(|headers: axum::http::HeaderMap, body: String| async move {
                    format!(
                        "{}|{}|{}",
                        headers["authorization"].to_str().unwrap(),
                        headers["content-type"].to_str().unwrap(),
                        body
                    )
                }),
            )
            .route(
                "/v1/stream",
                get(|| async {
                    let chunks = futures_util::stream::iter(
                        ["{\"a\":1}\n", "{\"b\":", "2}\n"]
                            .into_iter()
                            .map(|s| Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(s))),
                    );
                    axum::body::Body::from_stream(chunks)
                }),
            )
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn talks_over_tcp_and_the_unix_socket_and_reads_chunked_bodies() {
        let dir = std::env::temp_dir().join(format!("filterd-client-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let unix = tokio::net::UnixListener::bind(&sock).unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let t1 = tokio::spawn(crate::serve::serve(
            tcp,
            router(),
            Duration::from_secs(5),
            rx.clone(),
        ));
        let t2 = tokio::spawn(crate::serve::serve(
            unix,
            router(),
            Duration::from_secs(5),
            rx,
        ));
        let endpoints = [
            endpoint(&format!("http://127.0.0.1:{port}/"), None).unwrap(),
            endpoint("ignored", Some(&sock)).unwrap(),
        ];
        tokio::task::spawn_blocking(move || {
            for e in endpoints {
                let c = Client::new(e, Some("tok".into()));
                let r = c.call("POST", "/v1/echo", Some(b"{\"x\":1}")).unwrap();
                assert_eq!(r.status, 200);
                assert_eq!(
                    String::from_utf8(r.body).unwrap(),
                    "Bearer tok|application/json|{\"x\":1}"
                );
                let mut s = c.send("GET", "/v1/stream", None).unwrap();
                assert_eq!(s.next_line().unwrap().as_deref(), Some("{\"a\":1}"));
                assert_eq!(s.next_line().unwrap().as_deref(), Some("{\"b\":2}"));
                assert_eq!(s.next_line().unwrap(), None);
                assert_eq!(c.call("GET", "/nope", None).unwrap().status, 404);
            }
        })
        .await
        .unwrap();
        tx.send(true).unwrap();
        t1.await.unwrap();
        t2.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn urls() {
        assert_eq!(
            Endpoint::from_url("http://127.0.0.1:9405").unwrap(),
            Endpoint::Tcp("127.0.0.1:9405".into())
        );
        assert_eq!(
            Endpoint::from_url("http://[::1]:9405/").unwrap(),
            Endpoint::Tcp("[::1]:9405".into())
        );
        assert_eq!(
            Endpoint::from_url("http://localhost").unwrap(),
            Endpoint::Tcp("localhost:80".into())
        );
        assert!(Endpoint::from_url("https://x:1").is_err());
        assert!(Endpoint::from_url("http://x:1/v1").is_err());
    }
}
