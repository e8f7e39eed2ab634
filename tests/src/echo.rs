//! The echo Service of `examples/echo.yaml`, shared by `cargo xtask demo` and the end-to-end
//! tests: its addresses, the identity servers behind it in the single-node topology, and clients
//! that check every reply came back translated.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{
    netns::Netns,
    servers::{self, Reply, Server, UdpChecksum},
    topology::{BACKENDS, SingleNode},
};

/// The Service's ClusterIP and ports, as `examples/echo.yaml` declares them.
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const TCP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;
/// The backends' container ports, as the example's EndpointSlice lists them.
pub const BACKEND_TCP_PORT: u16 = 8080;
pub const BACKEND_UDP_PORT: u16 = 5353;
/// Where clients send: the ClusterIP and the Service ports.
pub const TCP_FRONTEND: SocketAddr = SocketAddr::V4(SocketAddrV4::new(CLUSTER_IP, TCP_PORT));
pub const UDP_FRONTEND: SocketAddr = SocketAddr::V4(SocketAddrV4::new(CLUSTER_IP, UDP_PORT));
/// The manifest, relative to the workspace root.
pub const EXAMPLE_MANIFEST: &str = "examples/echo.yaml";
/// How long a connect or a reply may take: the topology answers in microseconds, so this only
/// bounds a failure.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The name backend `index` (0-based) answers with.
pub fn backend_name(index: usize) -> String {
    format!("backend-{}", index + 1)
}

/// Which backend sent `reply`.
pub fn backend_index(reply: &Reply) -> anyhow::Result<usize> {
    (0..BACKENDS)
        .find(|index| reply.backend == backend_name(*index))
        .with_context(|| format!("a reply from an unknown backend {:?}", reply.backend))
}

/// Starts a TCP and a UDP identity server on the backend ports of every backend of `topology`.
/// The UDP servers reply with `udp_checksum`.
pub fn start_servers(
    topology: &SingleNode,
    udp_checksum: UdpChecksum,
) -> anyhow::Result<Vec<Server>> {
    let mut started = Vec::new();
    for (index, backend) in topology.backends.iter().enumerate() {
        let name = backend_name(index);
        started.push(servers::tcp(backend, &name, BACKEND_TCP_PORT)?);
        started.push(servers::udp(
            backend,
            &name,
            BACKEND_UDP_PORT,
            udp_checksum,
        )?);
    }
    Ok(started)
}

/// A TCP connection from the client, one request line per [`Connection::request`].
pub struct Connection {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Connection {
    /// Connects from `client` to `target` (e.g. the ClusterIP). The handshake completing proves
    /// the SYN-ACK came back from `target`: one from the backend's own address would have been
    /// answered with a reset.
    pub fn open(client: &Netns, target: SocketAddr) -> anyhow::Result<Self> {
        let stream = client
            .run(|| TcpStream::connect_timeout(&target, IO_TIMEOUT))?
            .with_context(|| format!("connecting to {target}"))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    /// The client's own address and port.
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.stream.local_addr()?)
    }

    /// Sends one request line and reads the reply. Fails unless the backend saw the client's own
    /// address and port (the translation must not touch the source).
    pub fn request(&mut self) -> anyhow::Result<Reply> {
        seen_as(self.exchange()?, self.local_addr()?)
    }

    /// Sends one request line and reads the reply, whatever the backend saw as the client (the
    /// node's address, after source NAT).
    pub fn exchange(&mut self) -> anyhow::Result<Reply> {
        self.stream.write_all(b"hello\n")?;
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .context("no TCP reply through the connection")?;
        Reply::parse(&line)
    }
}

/// `reply`, unless its backend saw the client as something else than `local`: the client's
/// address and port must reach the backend untranslated.
fn seen_as(reply: Reply, local: SocketAddr) -> anyhow::Result<Reply> {
    if reply.client != local {
        bail!(
            "{} saw the client as {}, not as {local}",
            reply.backend,
            reply.client
        );
    }
    Ok(reply)
}

/// A UDP socket in `client` connected to `target`, sending `checksum`. Connected, the kernel
/// delivers only datagrams whose source is `target`, so every reply received proves the reverse
/// translation.
pub fn udp_socket(
    client: &Netns,
    target: SocketAddr,
    checksum: UdpChecksum,
) -> anyhow::Result<UdpSocket> {
    let socket = client
        .run(|| UdpSocket::bind(("0.0.0.0", 0)))?
        .context("binding a UDP socket in the client")?;
    servers::set_udp_checksum(&socket, checksum).context("SO_NO_CHECK")?;
    socket.connect(target)?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok(socket)
}

/// Sends one datagram on `socket` (from [`udp_socket`]) and reads the reply. Fails unless the
/// backend saw the client's own address and port.
pub fn udp_request(socket: &UdpSocket) -> anyhow::Result<Reply> {
    socket.send(b"ping")?;
    udp_receive(socket)
}

/// Reads the reply to a datagram already sent on `socket` (from [`udp_socket`]). Fails unless
/// the backend saw the client's own address and port.
pub fn udp_receive(socket: &UdpSocket) -> anyhow::Result<Reply> {
    seen_as(udp_receive_any(socket)?, socket.local_addr()?)
}

/// Reads the reply to a datagram already sent on `socket`, whatever the backend saw as the
/// client (the node's address, after source NAT).
pub fn udp_receive_any(socket: &UdpSocket) -> anyhow::Result<Reply> {
    // Identity replies are a name and an address: far below this.
    const REPLY_BUFFER: usize = 256;
    let mut buffer = [0u8; REPLY_BUFFER];
    let target = socket.peer_addr()?;
    let length = socket
        .recv(&mut buffer)
        .with_context(|| format!("no UDP reply from {target}"))?;
    Reply::parse(std::str::from_utf8(&buffer[..length])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::backend_addr;

    /// The demo serves `examples/echo.yaml` and checks it with these constants: they must say
    /// the same.
    #[test]
    fn constants_match_the_example_manifest() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(EXAMPLE_MANIFEST);
        let manifest = std::fs::read_to_string(&path).expect("examples/echo.yaml");
        let lines: Vec<&str> = manifest.lines().map(str::trim).collect();
        let expected = [
            format!("clusterIP: {CLUSTER_IP}"),
            format!("port: {TCP_PORT}"),
            format!("port: {UDP_PORT}"),
            format!("targetPort: {BACKEND_UDP_PORT}"),
            format!("port: {BACKEND_TCP_PORT}"),
            format!("port: {BACKEND_UDP_PORT}"),
        ]
        .into_iter()
        .chain((0..BACKENDS).map(|index| format!("- addresses: [\"{}\"]", backend_addr(index))));
        for line in expected {
            assert!(
                lines.contains(&line.as_str()),
                "{} has no line `{line}`",
                path.display()
            );
        }
    }
}
