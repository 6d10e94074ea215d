//! Steady-state kernel cost: packets of long-lived keep-alive connections, one
//! `BPF_PROG_TEST_RUN` call each (`repeat` 1), with sequence numbers that move on as a real
//! connection's do, so every packet takes the path it takes under traffic: a request read and
//! decided on a followed connection, its response framed by the egress program, a body
//! segment counted in bulk. (A frame replayed `repeat` times is new only once: after the first
//! run the classifier has seen its bytes.)
//!
//! Each call's duration is what the kernel measured for that one run (ns, its own timer
//! around the program); the figure per packet kind is the median over the packets of a round.
//! An ARP frame, sent the same way, gives the floor of a call (the timer and the program's
//! first check).
//!
//! Must not: send a frame the daemon refuses (it would answer someone), or leave connection
//! state behind (every connection ends with the client's FIN).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::kernel::{arp_frame, segment, Dir};

/// Connections' packets per round and kind.
pub const PACKETS: usize = 2000;

/// What wrk sends (its default request: no headers but `Host`).
const REQUEST: &[u8] = b"GET /api/items HTTP/1.1\r\nHost: 10.77.0.2\r\n\r\n";
/// What the bench's nginx answers (its response head, a 3-byte body).
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 10:28:15 GMT\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n";
/// An upload and a download whose bodies outlast the round.
const UPLOAD: &[u8] =
    b"POST /api/items HTTP/1.1\r\nHost: 10.77.0.2\r\nContent-Length: 1000000000\r\n\r\n";
const DOWNLOAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n";
/// wrk's request line without its `Host` header, and responses with fewer header lines than
/// nginx's: with the rows above they split a request's and a response's cost into the
/// per-packet part, the request or status line, and the header lines.
const LINE_ONLY: &[u8] = b"GET /api/items HTTP/1.1\r\n\r\n";
const STATUS_ONLY: &[u8] = b"HTTP/1.1 204 No Content\r\n\r\n";
const LENGTH_ONLY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
/// Body segment sizes: a request body of 512 B per segment, a response body of a full
/// 1500-byte MTU's payload.
const UP_SEGMENT: usize = 512;
const DOWN_SEGMENT: usize = 1448;

/// The long request line's path: with `GET `, ` HTTP/1.1` and its CRLF, the line is 1 KiB.
const LONG_PATH: usize = 1009;

pub const KINDS: [&str; 9] = [
    "ARP (floor of one call)",
    "keep-alive GET (wrk's request), ingress",
    "its response (nginx's 200, 3 B body), egress",
    "request body segment (512 B), ingress",
    "response body segment (1448 B), egress",
    "keep-alive GET, 1 KiB request line (1009 B path), ingress",
    "wrk's request line alone (no `Host`), ingress",
    "a 204's status line alone (no header), egress",
    "a 200 with only `Content-Length` (3 B body), egress",
];
/// Indices in [`KINDS`] (the report splits a request's and a response's cost with them).
pub mod kind {
    pub const ARP: usize = 0;
    pub const GET: usize = 1;
    pub const RESPONSE: usize = 2;
    pub const UP: usize = 3;
    pub const DOWN: usize = 4;
    pub const LONG: usize = 5;
    pub const LINE_ONLY: usize = 6;
    pub const STATUS_ONLY: usize = 7;
    pub const LENGTH_ONLY: usize = 8;
}

/// The builds a round may alternate between (`--baseline`).
pub const THIS_BUILD: &str = "this build";
pub const BASELINE: &str = "baseline";

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SteadyRun {
    pub kind: String,
    /// `THIS_BUILD` or `BASELINE`.
    #[serde(default = "this_build")]
    pub build: String,
    pub rules: usize,
    pub round: usize,
    pub packets: usize,
    /// Median and 10th percentile of the per-call durations (ns).
    pub p50: f64,
    pub p10: f64,
}

fn this_build() -> String {
    THIS_BUILD.to_owned()
}

/// bpf(2) `cmd` with `attr` as its attribute buffer (every pointer in it to memory that
/// outlives the call); `what` names the call in the error.
pub(super) fn bpf(cmd: libc::c_long, attr: &mut [u8], what: &str) -> Result<i64> {
    // SAFETY: a bpf(2) call with an attribute buffer of the size passed; the caller keeps the
    // buffers it points to alive.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(r)
}

/// `BPF_PROG_GET_FD_BY_ID`.
pub(super) fn prog_fd(id: u64) -> Result<OwnedFd> {
    let mut attr = [0u8; 16];
    attr[..4].copy_from_slice(&(id as u32).to_ne_bytes());
    let fd = bpf(13, &mut attr, &format!("BPF_PROG_GET_FD_BY_ID {id}"))?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_GET_INFO_BY_FD` into `info` (a `struct bpf_prog_info`; any array pointers and
/// counts the caller set in it are filled too).
pub(super) fn prog_info(fd: &OwnedFd, info: &mut [u8]) -> Result<()> {
    let mut attr = [0u8; 16];
    attr[0..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    bpf(15, &mut attr, "BPF_OBJ_GET_INFO_BY_FD").map(|_| ())
}

/// One `BPF_PROG_TEST_RUN` of `data`, `repeat` 1: (return value, ns).
fn run_once(fd: &OwnedFd, data: &[u8]) -> Result<(u32, u32)> {
    let mut out = vec![0u8; data.len() + 256];
    let mut attr = [0u8; 80];
    attr[0..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&(data.len() as u32).to_ne_bytes());
    attr[12..16].copy_from_slice(&(out.len() as u32).to_ne_bytes());
    attr[16..24].copy_from_slice(&(data.as_ptr() as u64).to_ne_bytes());
    attr[24..32].copy_from_slice(&(out.as_mut_ptr() as u64).to_ne_bytes());
    attr[32..36].copy_from_slice(&1u32.to_ne_bytes());
    bpf(10, &mut attr, "BPF_PROG_TEST_RUN")?;
    let word = |i: usize| u32::from_ne_bytes([attr[i], attr[i + 1], attr[i + 2], attr[i + 3]]);
    Ok((word(4), word(36)))
}

/// A connection as the two programs see it: the client's next sequence number (ingress) and
/// the server's (egress).
struct Conn {
    port: u16,
    client: u32,
    server: u32,
}

impl Conn {
    /// SYN in, SYN|ACK out: followed from its first byte in both directions.
    fn open(ingress: &OwnedFd, egress: &OwnedFd, port: u16) -> Result<Conn> {
        let (client, server) = (0x1000_0000u32, 0x7000_0000u32);
        run_once(ingress, &segment(Dir::In, port, client, 0, 0x02, &[]))?;
        run_once(
            egress,
            &segment(Dir::Out, port, server, client.wrapping_add(1), 0x12, &[]),
        )?;
        Ok(Conn {
            port,
            client: client.wrapping_add(1),
            server: server.wrapping_add(1),
        })
    }

    /// Client bytes through the ingress program: (return value, ns).
    fn send(&mut self, ingress: &OwnedFd, payload: &[u8]) -> Result<(u32, u32)> {
        let f = segment(Dir::In, self.port, self.client, self.server, 0x18, payload);
        self.client = self.client.wrapping_add(payload.len() as u32);
        run_once(ingress, &f)
    }

    /// Server bytes through the egress program: ns.
    fn answer(&mut self, egress: &OwnedFd, payload: &[u8]) -> Result<u32> {
        let f = segment(Dir::Out, self.port, self.server, self.client, 0x18, payload);
        self.server = self.server.wrapping_add(payload.len() as u32);
        Ok(run_once(egress, &f)?.1)
    }

    /// A request (`what`, which must pass) and its answer: the ns of each.
    fn exchange(
        &mut self,
        ingress: &OwnedFd,
        egress: &OwnedFd,
        what: &str,
        request: &[u8],
        response: &[u8],
    ) -> Result<(u32, u32)> {
        let (ret, t) = self.send(ingress, request)?;
        passed(what, ret)?;
        Ok((t, self.answer(egress, response)?))
    }

    /// The client's FIN: the classifier forgets the connection.
    fn close(self, ingress: &OwnedFd) -> Result<()> {
        run_once(
            ingress,
            &segment(Dir::In, self.port, self.client, self.server, 0x11, &[]),
        )?;
        Ok(())
    }
}

/// `TC_ACT_UNSPEC` (pass, under TCX: next): what every frame here must get.
const PASS: u32 = u32::MAX;

fn passed(what: &str, ret: u32) -> Result<()> {
    if ret != PASS {
        bail!("steady state: {what} was not passed (return value {ret})");
    }
    Ok(())
}

fn quantile(v: &mut [u32], q: f64) -> f64 {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * q) as usize] as f64
}

/// One build's programs and connections during a round.
struct Arm {
    build: &'static str,
    ingress: OwnedFd,
    egress: OwnedFd,
    keep: Conn,
    up: Conn,
    down: Conn,
    long: Conn,
    /// Keep-alive connections for the rows that split the costs (`LINE_ONLY`, `STATUS_ONLY`,
    /// `LENGTH_ONLY`).
    line: Conn,
    status: Conn,
    length: Conn,
    ns: [Vec<u32>; KINDS.len()],
}

/// Groups of packets in one [`Arm::step`] (each a connection's request and response, a body
/// segment, or the ARP frame), sent in an order rotated at every step: the first packet after
/// the bench's own code runs on colder caches than the ones after it.
const GROUPS: usize = 8;

impl Arm {
    /// Open the connections: two keep-alive ones (short and long request lines), an upload
    /// and a download whose bodies outlast the round (ports from `base`; each build has its
    /// own maps, so the ports may repeat).
    fn open(build: &'static str, ingress_id: u64, egress_id: u64, base: u16) -> Result<Arm> {
        let (ingress, egress) = (prog_fd(ingress_id)?, prog_fd(egress_id)?);
        let keep = Conn::open(&ingress, &egress, base)?;
        let mut up = Conn::open(&ingress, &egress, base + 1)?;
        let mut down = Conn::open(&ingress, &egress, base + 2)?;
        let long = Conn::open(&ingress, &egress, base + 3)?;
        let line = Conn::open(&ingress, &egress, base + 4)?;
        let status = Conn::open(&ingress, &egress, base + 5)?;
        let length = Conn::open(&ingress, &egress, base + 6)?;
        passed("the upload's head", up.send(&ingress, UPLOAD)?.0)?;
        passed("the download's request", down.send(&ingress, REQUEST)?.0)?;
        down.answer(&egress, DOWNLOAD)?;
        Ok(Arm {
            build,
            ingress,
            egress,
            keep,
            up,
            down,
            long,
            line,
            status,
            length,
            ns: Default::default(),
        })
    }

    /// One packet of each kind, the groups in the order `rotation` gives.
    fn step(&mut self, f: &Frames, rotation: usize) -> Result<()> {
        for g in 0..GROUPS {
            match (g + rotation) % GROUPS {
                0 => self.ns[kind::ARP].push(run_once(&self.ingress, &f.arp)?.1),
                1 => {
                    let (get, response) = self.keep.exchange(
                        &self.ingress,
                        &self.egress,
                        "a keep-alive GET",
                        REQUEST,
                        RESPONSE,
                    )?;
                    self.ns[kind::GET].push(get);
                    self.ns[kind::RESPONSE].push(response);
                }
                2 => {
                    let (ret, t) = self.up.send(&self.ingress, &f.up_body)?;
                    passed("a request body segment", ret)?;
                    self.ns[kind::UP].push(t);
                }
                3 => self.ns[kind::DOWN].push(self.down.answer(&self.egress, &f.down_body)?),
                // The answers of the next two are not measured: they are there so that
                // requests do not pile up unanswered.
                4 => {
                    let (t, _) = self.long.exchange(
                        &self.ingress,
                        &self.egress,
                        "a GET with a 1 KiB request line",
                        &f.long,
                        RESPONSE,
                    )?;
                    self.ns[kind::LONG].push(t);
                }
                5 => {
                    let (t, _) = self.line.exchange(
                        &self.ingress,
                        &self.egress,
                        "a GET without headers",
                        LINE_ONLY,
                        RESPONSE,
                    )?;
                    self.ns[kind::LINE_ONLY].push(t);
                }
                6 => {
                    let (_, t) = self.status.exchange(
                        &self.ingress,
                        &self.egress,
                        "a keep-alive GET",
                        REQUEST,
                        STATUS_ONLY,
                    )?;
                    self.ns[kind::STATUS_ONLY].push(t);
                }
                _ => {
                    let (_, t) = self.length.exchange(
                        &self.ingress,
                        &self.egress,
                        "a keep-alive GET",
                        REQUEST,
                        LENGTH_ONLY,
                    )?;
                    self.ns[kind::LENGTH_ONLY].push(t);
                }
            }
        }
        Ok(())
    }

    fn close(self, rules: usize, round: usize) -> Result<Vec<SteadyRun>> {
        let Arm {
            build,
            ingress,
            keep,
            up,
            down,
            long,
            line,
            status,
            length,
            mut ns,
            ..
        } = self;
        for conn in [keep, long, up, down, line, status, length] {
            conn.close(&ingress)?;
        }
        Ok(ns
            .iter_mut()
            .zip(KINDS)
            .map(|(v, kind)| SteadyRun {
                kind: kind.to_owned(),
                build: build.to_owned(),
                rules,
                round,
                packets: v.len(),
                p50: quantile(v, 0.5),
                p10: quantile(v, 0.1),
            })
            .collect())
    }
}

/// Traffic `--profile` can sample: one kind of steady-state packet, sent over and over.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    /// wrk's keep-alive GET (ingress) and nginx's 200 to it (egress).
    Get,
    /// wrk's request line alone, no header (ingress), and a 204 with no header (egress).
    Line,
    /// A GET with a 1 KiB request line (ingress), answered (egress).
    Long,
    /// Request body segments of an upload (ingress).
    Upload,
    /// Response body segments of a download (egress).
    Download,
}

/// `packets` packets of `traffic` through the programs, unmeasured (what `--profile` samples).
pub fn drive(ingress_id: u64, egress_id: u64, traffic: Traffic, packets: usize) -> Result<()> {
    let mut arm = Arm::open(THIS_BUILD, ingress_id, egress_id, 47_000)?;
    let f = Frames::new();
    for _ in 0..packets {
        match traffic {
            Traffic::Get => {
                let (a, b) = (&arm.ingress, &arm.egress);
                arm.keep
                    .exchange(a, b, "a keep-alive GET", REQUEST, RESPONSE)?;
            }
            Traffic::Line => {
                let (a, b) = (&arm.ingress, &arm.egress);
                arm.line
                    .exchange(a, b, "a GET without headers", LINE_ONLY, STATUS_ONLY)?;
            }
            Traffic::Long => {
                let (a, b) = (&arm.ingress, &arm.egress);
                arm.long
                    .exchange(a, b, "a GET with a 1 KiB request line", &f.long, RESPONSE)?;
            }
            Traffic::Upload => {
                passed(
                    "a request body segment",
                    arm.up.send(&arm.ingress, &f.up_body)?.0,
                )?;
            }
            Traffic::Download => {
                arm.down.answer(&arm.egress, &f.down_body)?;
            }
        }
    }
    let Arm {
        ingress,
        keep,
        up,
        down,
        long,
        line,
        status,
        length,
        ..
    } = arm;
    for conn in [keep, long, up, down, line, status, length] {
        conn.close(&ingress)?;
    }
    Ok(())
}

/// The frames a step sends besides the constant ones.
struct Frames {
    arp: Vec<u8>,
    up_body: Vec<u8>,
    down_body: Vec<u8>,
    long: Vec<u8>,
}

impl Frames {
    fn new() -> Frames {
        Frames {
            arp: arp_frame(),
            up_body: vec![b'u'; UP_SEGMENT],
            down_body: vec![b'd'; DOWN_SEGMENT],
            long: super::kernel::request(LONG_PATH),
        }
    }
}

/// One round: `PACKETS` of each kind for each build in `arms` (build, ingress program id,
/// egress program id), the builds alternating packet by packet.
pub fn round(
    arms: &[(&'static str, u64, u64)],
    rules: usize,
    round: usize,
    base: u16,
) -> Result<Vec<SteadyRun>> {
    let mut open = Vec::new();
    for &(build, ingress, egress) in arms {
        open.push(Arm::open(build, ingress, egress, base)?);
    }
    let frames = Frames::new();
    for i in 0..PACKETS {
        for arm in open.iter_mut() {
            arm.step(&frames, i)?;
        }
    }
    let mut out = Vec::new();
    for arm in open {
        out.extend(arm.close(rules, round)?);
    }
    Ok(out)
}
