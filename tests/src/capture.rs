//! What UDP senders really put on the wire: a packet socket inside a namespace records the UDP
//! headers of every IPv4 packet its interfaces send or receive, so a test can check fields that
//! sockets never show (the checksum).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::Context as _;

use crate::netns::Netns;

const IPPROTO_UDP: u8 = 17;
/// IPv4 header: the shortest, and where its fields are.
const IPV4_MIN_HEADER: usize = 20;
const IPV4_PROTOCOL: usize = 9;
const IPV4_FRAGMENT: std::ops::Range<usize> = 6..8;
/// Fragment offset and "more fragments": non-first fragments carry no UDP header.
const IPV4_FRAGMENT_MASK: u16 = 0x3fff;
const IPV4_SOURCE: std::ops::Range<usize> = 12..16;
const IPV4_DESTINATION: std::ops::Range<usize> = 16..20;
const UDP_HEADER: usize = 8;
/// Room for any frame the test veths carry (their MTU, or a GRO aggregate's header).
const FRAME_BUFFER: usize = 65_536;

/// The UDP header of one captured datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapturedUdp {
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
    pub checksum: u16,
    /// Sent by this namespace (else received).
    pub outgoing: bool,
}

/// A capture of UDP over IPv4 on every interface of a namespace, from its start on.
pub struct UdpCapture {
    socket: OwnedFd,
}

fn word(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn address(bytes: &[u8], range: std::ops::Range<usize>) -> Ipv4Addr {
    let octets: [u8; 4] = bytes[range].try_into().unwrap_or_default();
    Ipv4Addr::from(octets)
}

/// The UDP header of an IPv4 packet, if it is an unfragmented (or first-fragment) UDP datagram.
fn parse(packet: &[u8], outgoing: bool) -> Option<CapturedUdp> {
    if packet.len() < IPV4_MIN_HEADER || packet[0] >> 4 != 4 {
        return None;
    }
    let header = usize::from(packet[0] & 0x0f) * 4;
    if packet[IPV4_PROTOCOL] != IPPROTO_UDP
        || word(packet, IPV4_FRAGMENT.start) & IPV4_FRAGMENT_MASK != 0
        || packet.len() < header + UDP_HEADER
    {
        return None;
    }
    let udp = &packet[header..];
    Some(CapturedUdp {
        source: SocketAddrV4::new(address(packet, IPV4_SOURCE), word(udp, 0)),
        destination: SocketAddrV4::new(address(packet, IPV4_DESTINATION), word(udp, 2)),
        checksum: word(udp, 6),
        outgoing,
    })
}

impl UdpCapture {
    /// Starts capturing in `netns`.
    pub fn start(netns: &Netns) -> anyhow::Result<Self> {
        let protocol = (libc::ETH_P_IP as u16).to_be();
        let socket = netns
            .run(|| {
                // SAFETY: plain socket creation; the result is checked before use.
                let fd = unsafe {
                    libc::socket(
                        libc::AF_PACKET,
                        libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                        libc::c_int::from(protocol),
                    )
                };
                if fd < 0 {
                    // errno is per thread: read it on the thread that failed.
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: a fresh descriptor that nothing else owns.
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            })?
            .with_context(|| format!("opening a packet socket in {}", netns.name()))?;
        Ok(Self { socket })
    }

    /// Every UDP datagram captured since the last call (or the start).
    pub fn take(&self) -> anyhow::Result<Vec<CapturedUdp>> {
        let mut captured = Vec::new();
        let mut buffer = vec![0u8; FRAME_BUFFER];
        loop {
            // SAFETY: all-zero is a valid sockaddr_ll.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: the buffers and their lengths are valid for writes.
            let length = unsafe {
                libc::recvfrom(
                    self.socket.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut from_len,
                )
            };
            if length < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() == std::io::ErrorKind::WouldBlock {
                    return Ok(captured);
                }
                return Err(error).context("reading the packet socket");
            }
            let packet = &buffer[..(length as usize).min(buffer.len())];
            let outgoing = from.sll_pkttype == libc::PACKET_OUTGOING;
            captured.extend(parse(packet, outgoing));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_udp_header() {
        let mut packet = vec![
            0x45,
            0,
            0,
            36,
            0,
            0,
            0x40,
            0,
            64,
            IPPROTO_UDP,
            0,
            0,
            10,
            0,
            0,
            2,
            10,
            96,
            0,
            10,
        ];
        packet.extend([0x30, 0x39, 0, 53, 0, 16, 0xab, 0xcd]);
        packet.extend(b"ping1234");
        assert_eq!(
            parse(&packet, true),
            Some(CapturedUdp {
                source: "10.0.0.2:12345".parse().expect("address"),
                destination: "10.96.0.10:53".parse().expect("address"),
                checksum: 0xabcd,
                outgoing: true,
            })
        );
        // A later fragment has no UDP header where one would be.
        packet[IPV4_FRAGMENT.start] = 0x20;
        packet[IPV4_FRAGMENT.start + 1] = 0x01;
        assert_eq!(parse(&packet, true), None);
        // TCP is not captured.
        packet[IPV4_FRAGMENT.start] = 0x40;
        packet[IPV4_FRAGMENT.start + 1] = 0;
        packet[IPV4_PROTOCOL] = 6;
        assert_eq!(parse(&packet, true), None);
    }
}
