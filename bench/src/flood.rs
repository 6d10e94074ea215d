//! The flood generator: refused requests at a fixed rate, each on a connection of its own (the
//! shape of a flood against `filterd`, which answers 405 and closes), so that what the flood
//! costs the allowed traffic next to it is the rejection's cost, not the generator's. wrk sends
//! as fast as it can and took half a CPU of this 2-CPU machine doing so; at a fixed rate the
//! generator's own CPU is small and the same in every arm.
//!
//! Run as `filter-bench flood ...` inside the lab's client namespace (a process of its own, so
//! its CPU is measured like wrk's, from `wait4`); it prints one `BENCH_JSON` line. Requests
//! are scheduled at `start + i / rate` and sent as their time comes (tokio's timer paces them
//! per millisecond); latency is measured from the scheduled time, so a stalled server shows as
//! latency, not as a lower rate (wrk2's correction of coordinated omission).
//!
//! Must not: open more than `max_in_flight` connections at once (a request due while that
//! many are open is counted `skipped`), or run past its deadline.

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use filter_tests::lab::Lab;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};

/// What to send, where, how fast and for how long.
#[derive(clap::Args, Clone, Debug, Serialize, Deserialize)]
pub struct FloodSpec {
    /// The server's address and port.
    #[arg(long)]
    pub addr: SocketAddr,
    #[arg(long, default_value = "DELETE")]
    pub method: String,
    #[arg(long, default_value = crate::PATH)]
    pub path: String,
    /// Requests per second.
    #[arg(long)]
    pub rate: u32,
    #[arg(long)]
    pub seconds: u64,
    /// Connections open at once, at most.
    #[arg(long, default_value_t = 1000)]
    pub max_in_flight: usize,
}

/// What one flood run did.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
#[serde(default)]
pub struct FloodResult {
    pub rate: u32,
    pub duration_us: u64,
    /// Requests due during the run.
    pub scheduled: u64,
    /// Requests not sent because `max_in_flight` connections were open.
    pub skipped: u64,
    /// Answers by status: 405, any other status.
    pub status_405: u64,
    pub status_other: u64,
    /// Connections that failed (refused, reset before an answer, timed out).
    pub errors: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// CPU seconds (user + system) of the generator process, filled by the parent.
    pub cpu_s: f64,
}

impl FloodResult {
    pub fn seconds(&self) -> f64 {
        (self.duration_us as f64 / 1e6).max(1e-6)
    }
    /// 405 answers per second.
    pub fn rps_405(&self) -> f64 {
        self.status_405 as f64 / self.seconds()
    }
    /// CPUs the generator kept busy.
    pub fn cores(&self) -> f64 {
        self.cpu_s / self.seconds()
    }
}

/// How long one request may take, connect to close.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

enum Outcome {
    Status(u16, Duration),
    Failed,
}

async fn one(addr: SocketAddr, request: Arc<[u8]>, due: Instant) -> Outcome {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        s.write_all(&request).await?;
        let mut got = Vec::with_capacity(512);
        let mut buf = [0u8; 1024];
        // Until the server closes. A reset after the answer (the client's own FIN meeting a
        // backend socket the filter reset) still leaves the answer read.
        loop {
            match s.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) if !got.is_empty() => break,
                Err(e) => return Err(e),
            }
        }
        Ok::<_, std::io::Error>(got)
    };
    match timeout(REQUEST_TIMEOUT, exchange).await {
        Ok(Ok(answer)) => match status_of(&answer) {
            Some(code) => Outcome::Status(code, due.elapsed()),
            None => Outcome::Failed,
        },
        _ => Outcome::Failed,
    }
}

/// The status code of an HTTP/1.x answer's first line.
fn status_of(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|&b| b == b'\n').next()?;
    let code = line.strip_prefix(b"HTTP/1.")?.get(2..5)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// The generator itself (the `flood` command, in the client namespace).
pub fn generate(spec: &FloodSpec) -> Result<FloodResult> {
    anyhow::ensure!(spec.rate > 0, "a flood needs a rate above zero");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the flood's runtime")?;
    rt.block_on(async {
        let request: Arc<[u8]> = format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\n\r\n",
            spec.method,
            spec.path,
            spec.addr.ip()
        )
        .into_bytes()
        .into();
        let mut out = FloodResult {
            rate: spec.rate,
            ..FloodResult::default()
        };
        let mut latencies: Vec<f64> = Vec::new();
        let mut record = |o: Result<Outcome, tokio::task::JoinError>, out: &mut FloodResult| match o
        {
            Ok(Outcome::Status(405, t)) => {
                out.status_405 += 1;
                latencies.push(t.as_secs_f64() * 1e6);
            }
            Ok(Outcome::Status(_, _)) => out.status_other += 1,
            _ => out.errors += 1,
        };
        let start = Instant::now();
        let end = start + Duration::from_secs(spec.seconds);
        let mut tasks = JoinSet::new();
        for i in 0u64.. {
            let due = start + Duration::from_nanos(i * 1_000_000_000 / spec.rate as u64);
            if due >= end {
                break;
            }
            tokio::time::sleep_until(due).await;
            out.scheduled += 1;
            while let Some(done) = tasks.try_join_next() {
                record(done, &mut out);
            }
            if tasks.len() >= spec.max_in_flight {
                out.skipped += 1;
                continue;
            }
            tasks.spawn(one(spec.addr, request.clone(), due));
        }
        while let Some(done) = tasks.join_next().await {
            record(done, &mut out);
        }
        out.duration_us = start.elapsed().as_micros() as u64;
        out.p50_us = crate::stats::quantile(&mut latencies, 0.5);
        out.p99_us = crate::stats::quantile(&mut latencies, 0.99);
        Ok(out)
    })
}

/// Start this binary's `flood` command with `spec` in the lab's client namespace.
pub fn spawn(lab: &Lab, spec: &FloodSpec) -> Result<Child> {
    let exe = std::env::current_exe().context("finding this binary for the flood")?;
    lab.client_cmd(exe)
        .arg("flood")
        .args(["--addr", &spec.addr.to_string()])
        .args(["--method", &spec.method, "--path", &spec.path])
        .args(["--rate", &spec.rate.to_string()])
        .args(["--seconds", &spec.seconds.to_string()])
        .args(["--max-in-flight", &spec.max_in_flight.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning the flood generator in the client namespace")
}

/// The generator's `BENCH_JSON` line.
pub fn parse(out: &str, err: &str) -> Result<FloodResult> {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("BENCH_JSON "))
        .with_context(|| {
            format!("the flood generator printed no BENCH_JSON line:\n{out}\n{err}")
        })?;
    serde_json::from_str(line).with_context(|| format!("the flood generator's line: {line}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_comes_from_the_first_line() {
        assert_eq!(
            status_of(b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\n\r\n"),
            Some(405)
        );
        assert_eq!(status_of(b"HTTP/1.0 200 OK\r\n"), Some(200));
        assert_eq!(status_of(b"HTTP/1.1 4"), None);
        assert_eq!(status_of(b"garbage"), None);
    }

    #[test]
    fn a_flood_paces_its_requests_and_reads_the_answers() {
        // A local server that answers 405 and closes, on loopback (no root needed).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            for s in listener.incoming() {
                let Ok(mut s) = s else { continue };
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
                let _ =
                    s.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nConnection: close\r\n\r\n");
            }
        });
        let r = generate(&FloodSpec {
            addr,
            method: "DELETE".into(),
            path: "/x".into(),
            rate: 200,
            seconds: 1,
            max_in_flight: 100,
        })
        .unwrap();
        assert_eq!(r.scheduled, 200);
        assert_eq!(r.status_405 + r.errors + r.skipped, 200, "{r:?}");
        assert!(r.status_405 >= 190, "{r:?}");
        assert!(
            r.duration_us >= 990_000 && r.duration_us < 3_000_000,
            "{r:?}"
        );
    }
}
