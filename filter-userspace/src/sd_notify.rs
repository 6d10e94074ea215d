//! The systemd service notification protocol (`sd_notify(3)`), spoken directly: one datagram
//! of `KEY=value` lines to the Unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for
//! an abstract socket). No libsystemd. With `Type=notify`, systemd starts units ordered after
//! filterd only once it says `READY=1`, which filterd does after the classifiers are attached
//! on every interface and the API serves; a reload is bracketed by `RELOADING=1` and
//! `READY=1`, its outcome in `STATUS=`. Without `$NOTIFY_SOCKET` every call does nothing.

use std::io;
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Where notifications go.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` names, if it names one.
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(p) if !p.is_empty() => Notifier::to(&p.to_string_lossy()).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier sending to `path` (`@name`: the abstract socket `name`).
    pub fn to(path: &str) -> io::Result<Notifier> {
        let addr = match path.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
            None => SocketAddr::from_pathname(path)?,
        };
        Ok(Notifier {
            socket: UnixDatagram::unbound()?,
            addr,
        })
    }

    /// Send `state` (newline-separated `KEY=value` assignments).
    pub fn notify(&self, state: &str) -> io::Result<()> {
        self.socket.send_to_addr(state.as_bytes(), &self.addr)?;
        Ok(())
    }

    /// `READY=1`, with a status line.
    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.notify(&format!(
            "READY=1\nSTATUS={}\nMAINPID={}",
            one_line(status),
            std::process::id()
        ))
    }

    /// `RELOADING=1` (systemd 253 and later also want the monotonic time of the request).
    pub fn reloading(&self) -> io::Result<()> {
        self.notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()))
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) -> io::Result<()> {
        self.notify("STOPPING=1")
    }

    /// `STATUS=...` alone.
    pub fn status(&self, status: &str) -> io::Result<()> {
        self.notify(&format!("STATUS={}", one_line(status)))
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

fn monotonic_usec() -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime(2) with a valid clock id and out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(s: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn datagrams_reach_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("filterd-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::to(path.to_str().unwrap()).unwrap();
        n.ready("filtering on eth0\nsecond line").unwrap();
        let got = recv(&listener);
        assert_eq!(
            got,
            format!(
                "READY=1\nSTATUS=filtering on eth0 second line\nMAINPID={}",
                std::process::id()
            )
        );
        n.reloading().unwrap();
        let got = recv(&listener);
        let usec: u64 = got
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap()
            .parse()
            .unwrap();
        assert!(usec > 0);
        n.stopping().unwrap();
        assert_eq!(recv(&listener), "STOPPING=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn datagrams_reach_an_abstract_socket() {
        let name = format!("filterd-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::to(&format!("@{name}"))
            .unwrap()
            .status("reload failed: p.toml:3:8: bad")
            .unwrap();
        assert_eq!(recv(&listener), "STATUS=reload failed: p.toml:3:8: bad");
    }
}
