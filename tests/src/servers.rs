//! Identity servers for the backends: each answers with its name and the client address it saw,
//! so a test can tell which backend took a flow and that the client's address arrived unchanged.
//!
//! TCP: one reply line per request line, `"<name> <client-ip>:<client-port>\n"`.
//! UDP: one reply datagram per datagram, `"<name> <client-ip>:<client-port>"`.
//! Every loop is bounded: accept and receive poll a stop flag, connections time out when idle.

use std::{
    io::{BufRead as _, BufReader, ErrorKind, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;

use crate::netns::Netns;

/// How often blocked loops look at their stop flag.
const POLL: Duration = Duration::from_millis(20);
/// A connection idle this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A running server; stops and joins its threads on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve_connection(name: &str, stream: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        line?;
        writer.write_all(format!("{name} {peer}\n").as_bytes())?;
    }
    Ok(())
}

/// Starts a TCP identity server on `port` (all addresses) inside `netns`.
pub fn tcp(netns: &Netns, name: &str, port: u16) -> anyhow::Result<Server> {
    let listener = netns
        .run(|| TcpListener::bind(("0.0.0.0", port)))?
        .with_context(|| format!("binding TCP port {port} in {}", netns.name()))?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let name = name.to_owned();
    let thread = std::thread::spawn(move || {
        let mut connections = Vec::new();
        while !stopping.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, peer)) => {
                    let name = name.clone();
                    connections.push(std::thread::spawn(move || {
                        // A reset or timeout just ends this connection.
                        let _ = serve_connection(&name, stream, peer);
                    }));
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
                Err(_) => std::thread::sleep(POLL),
            }
        }
        drop(listener);
        // Connection threads end at EOF or idle timeout; do not wait for them.
        drop(connections);
    });
    Ok(Server {
        stop,
        thread: Some(thread),
    })
}

/// What a UDP socket puts in the checksum field of the datagrams it sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpChecksum {
    /// A checksum, as Linux sends by default (completed by the stack or the offload).
    Computed,
    /// Zero, IPv4's "no checksum" (`SO_NO_CHECK`), which a translation must leave zero.
    Zero,
}

/// Makes `socket` send `checksum`.
pub fn set_udp_checksum(socket: &UdpSocket, checksum: UdpChecksum) -> std::io::Result<()> {
    let no_check = libc::c_int::from(checksum == UdpChecksum::Zero);
    // SAFETY: a valid socket, and an option buffer of the size given.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NO_CHECK,
            (&no_check as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Starts a UDP identity server on `port` (all addresses) inside `netns`, replying with
/// `checksum`.
pub fn udp(netns: &Netns, name: &str, port: u16, checksum: UdpChecksum) -> anyhow::Result<Server> {
    let socket = netns
        .run(|| UdpSocket::bind(("0.0.0.0", port)))?
        .with_context(|| format!("binding UDP port {port} in {}", netns.name()))?;
    set_udp_checksum(&socket, checksum).context("SO_NO_CHECK")?;
    socket.set_read_timeout(Some(POLL))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let name = name.to_owned();
    let thread = std::thread::spawn(move || {
        let mut buffer = [0u8; 2048];
        while !stopping.load(Ordering::Relaxed) {
            if let Ok((_, peer)) = socket.recv_from(&mut buffer) {
                let _ = socket.send_to(format!("{name} {peer}").as_bytes(), peer);
            }
        }
    });
    Ok(Server {
        stop,
        thread: Some(thread),
    })
}

/// A reply parsed back: which backend answered and the client address it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub backend: String,
    pub client: SocketAddr,
}

impl Reply {
    /// Parses `"<name> <ip>:<port>"`.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut words = text.split_whitespace();
        let backend = words.next().context("empty reply")?.to_owned();
        let client = words
            .next()
            .context("reply without a client address")?
            .parse()
            .with_context(|| format!("reply {text:?}"))?;
        Ok(Self { backend, client })
    }
}
