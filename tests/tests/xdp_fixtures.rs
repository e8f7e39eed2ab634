//! Table-driven fixtures for the XDP program, run with `BPF_PROG_TEST_RUN`: each case is an input
//! frame plus map contents, and the exact XDP action, output bytes and counter deltas expected.
//!
//! Expected frames are built independently with etherparse from a description of the packet
//! (never copied from the program's output), and every translated output has its IPv4 and L4
//! checksums recomputed from scratch by the small RFC 1071 routine below. Counter deltas are
//! compared over every counter, so a counter that should stay unchanged is checked too.
//!
//! Each test owns a network namespace (veth pairs whose both ends live in it, static neighbours,
//! forwarding on) and a pin directory, both named with a per-test prefix and removed on drop,
//! panics included, so the tests run in parallel. The whole body runs on a thread inside the
//! namespace: `test_run` resolves the ingress ifindex and does its FIB lookups there, and
//! `LB_TX_PORTS` resolves ifindexes in the namespace of the writer.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use etherparse::{
    EtherType, Ethernet2Header, IcmpEchoHeader, Icmpv4Header, Icmpv4Type, IpDscp, IpFragOffset,
    IpNumber, Ipv4Header, Ipv4Options, SingleVlanHeader, TcpHeader, TcpOptions, UdpHeader, VlanId,
    VlanPcp, icmpv4::DestUnreachableHeader,
};
use lb::{
    dataplane::{
        self, Dataplane,
        maps::{
            Capacities, ServiceMaps, open_affinity, open_conntrack, open_fragments, open_ifaces,
            open_tx_ports, read_counters,
        },
    },
    desired::{BackendAddr, DesiredState, Details, Frontend},
    node::Ipv4Cidr,
    reconcile::Reconciler,
};
use lb_common::{
    config::{Cidr, DataplaneConfig},
    conntrack::{
        DIRECTION_ORIGINAL, DIRECTION_REPLY, FRAGMENT_LIFETIME_NS, FlowKey, FlowState, FragmentKey,
        SEEN_FIN, SEEN_REPLY, SEEN_RST, SNAT_PORTS, UDP_LIFETIME_NS, UDP_UNREPLIED_LIFETIME_NS,
    },
    iface::{IFACE_LOCAL_SENDERS, IFACE_NO_XDP_TX, IfaceConfig},
    service::{
        AffinityKey, AffinityValue, BACKEND_ACTIVE, Backend, SERVICE_DROP_WHEN_EMPTY, ServiceKey,
        ServiceValue, SlotKey,
    },
    stats::Counter,
};
use lb_tests::{
    netns::{Netns, mac_text, unique_prefix, veth},
    privilege::require_root,
};

// XDP actions (linux/bpf.h `enum xdp_action`).
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const BPFFS: &str = "/sys/fs/bpf";

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const IPV4_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const TPID_8021Q: u16 = 0x8100;
const TPID_8021AD: u16 = 0x88a8;
/// Offsets of the checksum field in the TCP and UDP headers.
const TCP_CHECK_OFFSET: usize = 16;
const UDP_CHECK_OFFSET: usize = 6;

// TCP flag bits (byte 13 of the header).
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

const WINDOW: u16 = 64_240;
const CLIENT_ISN: u32 = 0x1000_0000;
const SERVER_ISN: u32 = 0x2000_0000;
/// TCP option: maximum segment size 1460.
const MSS_OPTION: [u8; 4] = [2, 4, 0x05, 0xb4];
const IP_ID: u16 = 0x4a21;
const DEFAULT_TTL: u8 = 64;

// The namespace: three veth pairs, both ends inside it. The `*0` ends carry the router's
// addresses; the peers only exist so that the links have carrier.
const IN_IF: &str = "in0";
const IN_PEER: &str = "in0p";
const IN_CIDR: &str = "10.0.0.1/24";
const OUT_IF: &str = "out0";
const OUT_PEER: &str = "out0p";
const OUT_CIDR: &str = "10.1.1.1/24";
/// A link the program may not redirect to (left out of `LB_TX_PORTS`).
const SIDE_IF: &str = "side0";
const SIDE_PEER: &str = "side0p";
const SIDE_CIDR: &str = "10.2.2.1/24";

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// A backend on the client's link: traffic to it leaves where it came in.
const LOCAL_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
const LOCAL_BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];
const BACKEND_A: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 2);
const BACKEND_A_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const BACKEND_B: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 4);
const BACKEND_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x04];
const BACKEND_C: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 5);
const BACKEND_C_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x05];
/// On out0's subnet, without a neighbour entry.
const UNRESOLVED_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 3);
/// Behind BACKEND_A acting as a gateway, on a route with a locked small MTU.
const ROUTED_SUBNET: &str = "10.1.2.0/24";
const ROUTED_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 5);
const ROUTED_MTU: usize = 600;
/// Bytes past the route MTU that also exceed the lab links' 1,500-byte MTU.
const AGGREGATE_EXTRA: usize = 1000;
/// On side0, which is not a TX port.
const SIDE_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 2, 2, 2);
const SIDE_BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x06];
/// TEST-NET-1: no route to it in the namespace.
const UNROUTED_BACKEND: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const OTHER_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const DNS_PORT: u16 = 53;
const BACKEND_DNS_PORT: u16 = 5353;

/// Runs of one tuple that must all reach the same backend.
const STICKY_RUNS: usize = 50;
/// Upper bound on new flows tried while waiting for every backend to be chosen; with 3 backends
/// all appear within 200 uniform draws except with probability 3 (2/3)^200 < 1e-34.
const MAX_NEW_FLOWS: u16 = 200;

// ---------------------------------------------------------------------------------------------
// Independent checksum arithmetic (RFC 1071), over big-endian words.

fn sum_words(mut acc: u64, data: &[u8]) -> u64 {
    let mut pairs = data.chunks_exact(2);
    for pair in &mut pairs {
        acc += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = pairs.remainder() {
        acc += u64::from(u16::from_be_bytes([*last, 0]));
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: usize) -> u64 {
    let acc = sum_words(0, &src.octets());
    let acc = sum_words(acc, &dst.octets());
    acc + u64::from(proto) + l4_len as u64
}

/// What Linux leaves in the L4 checksum field for `CHECKSUM_PARTIAL`: the folded pseudo-header
/// sum, not complemented.
fn partial_check(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: usize) -> u16 {
    fold(pseudo_header_sum(src, dst, proto, l4_len))
}

fn be16(bytes: &[u8], offset: usize) -> u16 {
    u16::from_be_bytes([bytes[offset], bytes[offset + 1]])
}

fn ip_at(bytes: &[u8], offset: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        bytes[offset],
        bytes[offset + 1],
        bytes[offset + 2],
        bytes[offset + 3],
    )
}

/// The state an L4 checksum field is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    /// Covers the pseudo header and all L4 bytes.
    Complete,
    /// The pseudo-header sum only (`CHECKSUM_PARTIAL`).
    Partial,
    /// UDP without a checksum.
    Zero,
}

/// Offset of the IPv4 header in an Ethernet frame, after any VLAN tags.
fn l3_offset(frame: &[u8]) -> usize {
    let mut offset = ETH_HLEN - 2;
    while matches!(be16(frame, offset), TPID_8021Q | TPID_8021AD) {
        offset += VLAN_HLEN;
    }
    assert_eq!(be16(frame, offset), ETHERTYPE_IPV4, "not an IPv4 frame");
    offset + 2
}

/// Recomputes the IPv4 and ICMP checksums of an ICMP frame from scratch.
fn verify_icmp_checksums(context: &str, frame: &[u8]) {
    let ip = &frame[l3_offset(frame)..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    assert_eq!(
        fold(sum_words(0, &ip[..ihl])),
        0xffff,
        "{context}: IPv4 header checksum does not verify"
    );
    assert_eq!(ip[9], IPPROTO_ICMP, "{context}: not ICMP");
    let total_len = usize::from(be16(ip, 2));
    assert_eq!(
        fold(sum_words(0, &ip[ihl..total_len])),
        0xffff,
        "{context}: ICMP checksum does not verify"
    );
}

/// Recomputes every checksum of an IPv4 TCP or UDP frame from scratch.
fn verify_checksums(context: &str, frame: &[u8], check: Check) {
    let ip = &frame[l3_offset(frame)..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    assert_eq!(
        fold(sum_words(0, &ip[..ihl])),
        0xffff,
        "{context}: IPv4 header checksum does not verify"
    );
    let total_len = usize::from(be16(ip, 2));
    let l4 = &ip[ihl..total_len];
    let (proto, src, dst) = (ip[9], ip_at(ip, 12), ip_at(ip, 16));
    let check_offset = match proto {
        IPPROTO_TCP => TCP_CHECK_OFFSET,
        IPPROTO_UDP => UDP_CHECK_OFFSET,
        other => panic!("{context}: protocol {other} is neither TCP nor UDP"),
    };
    let field = be16(l4, check_offset);
    match check {
        Check::Complete => {
            let sum = sum_words(pseudo_header_sum(src, dst, proto, l4.len()), l4);
            assert_eq!(
                fold(sum),
                0xffff,
                "{context}: L4 checksum {field:#06x} does not verify"
            );
            if proto == IPPROTO_UDP {
                assert_ne!(field, 0, "{context}: a computed UDP checksum must not be 0");
            }
        }
        Check::Partial => assert_eq!(
            field,
            partial_check(src, dst, proto, l4.len()),
            "{context}: partial checksum is not the pseudo-header sum"
        ),
        Check::Zero => assert_eq!(field, 0, "{context}: UDP checksum should stay 0"),
    }
}

// ---------------------------------------------------------------------------------------------
// Packet descriptions, serialised with etherparse.

#[derive(Clone, Debug)]
enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
        ack: u32,
        options: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// `payload` is the whole IPv4 payload (ICMP, a fragment, a cut header).
    Raw {
        proto: u8,
    },
}

#[derive(Clone, Debug)]
struct Pkt {
    eth_src: [u8; 6],
    eth_dst: [u8; 6],
    /// VLAN tags, outermost first: (TPID, VLAN id).
    tags: Vec<(u16, u16)>,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    ip_options: Vec<u8>,
    more_fragments: bool,
    /// In 8-byte units.
    fragment_offset: u16,
    l4: L4,
    check: Check,
    payload: Vec<u8>,
    /// Ethernet padding after the datagram.
    padding: Vec<u8>,
    /// Sent without DF (routers may fragment it).
    may_fragment: bool,
}

impl Pkt {
    fn ip(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Self {
        Self {
            eth_src: CLIENT_MAC,
            eth_dst: [0; 6],
            tags: Vec::new(),
            src,
            dst,
            ttl: DEFAULT_TTL,
            ip_options: Vec::new(),
            more_fragments: false,
            fragment_offset: 0,
            l4,
            check: Check::Complete,
            payload: Vec::new(),
            padding: Vec::new(),
            may_fragment: false,
        }
    }

    /// Clears DF.
    fn may_fragment(mut self) -> Self {
        self.may_fragment = true;
        self
    }

    fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Self {
        let (seq, ack) = if flags & SYN != 0 && flags & ACK != 0 {
            (SERVER_ISN, CLIENT_ISN + 1)
        } else if flags & SYN != 0 {
            (CLIENT_ISN, 0)
        } else {
            (CLIENT_ISN + 1, SERVER_ISN + 1)
        };
        Self::ip(
            src.0,
            dst.0,
            L4::Tcp {
                sport: src.1,
                dport: dst.1,
                flags,
                seq,
                ack,
                options: Vec::new(),
            },
        )
    }

    fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Self {
        Self::ip(
            src.0,
            dst.0,
            L4::Udp {
                sport: src.1,
                dport: dst.1,
            },
        )
    }

    fn raw(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Self {
        Self::ip(src, dst, L4::Raw { proto }).payload(payload)
    }

    fn eth(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.eth_src = src;
        self.eth_dst = dst;
        self
    }

    /// What a router does to the frame: new MACs, TTL minus one.
    fn hop(self, src: [u8; 6], dst: [u8; 6]) -> Self {
        let ttl = self.ttl - 1;
        self.eth(src, dst).ttl(ttl)
    }

    fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    fn tags(mut self, tags: &[(u16, u16)]) -> Self {
        self.tags = tags.to_vec();
        self
    }

    fn ip_options(mut self, options: &[u8]) -> Self {
        self.ip_options = options.to_vec();
        self
    }

    fn fragment(mut self, more_fragments: bool, offset: u16) -> Self {
        self.more_fragments = more_fragments;
        self.fragment_offset = offset;
        self
    }

    fn check(mut self, check: Check) -> Self {
        self.check = check;
        self
    }

    fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    fn padding(mut self, padding: &[u8]) -> Self {
        self.padding = padding.to_vec();
        self
    }

    fn tcp_options(mut self, new: &[u8]) -> Self {
        if let L4::Tcp { options, .. } = &mut self.l4 {
            *options = new.to_vec();
        }
        self
    }

    /// Rewrites the destination address and port (what DNAT should do).
    fn to(mut self, addr: Ipv4Addr, port: u16) -> Self {
        self.dst = addr;
        match &mut self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = port,
            L4::Raw { .. } => {}
        }
        self
    }

    /// Rewrites the source address and port (what reverse NAT should do).
    fn from(mut self, addr: Ipv4Addr, port: u16) -> Self {
        self.src = addr;
        match &mut self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => *sport = port,
            L4::Raw { .. } => {}
        }
        self
    }

    fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Udp { .. } => IPPROTO_UDP,
            L4::Raw { proto } => proto,
        }
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let (src, dst) = (self.src.octets(), self.dst.octets());
        let mut bytes = match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                seq,
                ack,
                options,
            } => {
                let mut header = TcpHeader::new(*sport, *dport, *seq, WINDOW);
                header.acknowledgment_number = *ack;
                header.fin = flags & FIN != 0;
                header.syn = flags & SYN != 0;
                header.rst = flags & RST != 0;
                header.psh = flags & PSH != 0;
                header.ack = flags & ACK != 0;
                header.options = TcpOptions::try_from_slice(options).expect("TCP options");
                header.checksum = match self.check {
                    Check::Complete => header
                        .calc_checksum_ipv4_raw(src, dst, &self.payload)
                        .expect("TCP checksum"),
                    Check::Partial => partial_check(
                        self.src,
                        self.dst,
                        IPPROTO_TCP,
                        header.header_len() + self.payload.len(),
                    ),
                    Check::Zero => 0,
                };
                header.to_bytes().to_vec()
            }
            L4::Udp { sport, dport } => {
                let mut header = UdpHeader {
                    source_port: *sport,
                    destination_port: *dport,
                    length: u16::try_from(UDP_HLEN + self.payload.len()).expect("UDP length"),
                    checksum: 0,
                };
                header.checksum = match self.check {
                    Check::Complete => header
                        .calc_checksum_ipv4_raw(src, dst, &self.payload)
                        .expect("UDP checksum"),
                    Check::Partial => partial_check(
                        self.src,
                        self.dst,
                        IPPROTO_UDP,
                        UDP_HLEN + self.payload.len(),
                    ),
                    Check::Zero => 0,
                };
                header.to_bytes().to_vec()
            }
            L4::Raw { .. } => Vec::new(),
        };
        bytes.extend_from_slice(&self.payload);
        bytes
    }

    fn bytes(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let unfragmented = !self.more_fragments && self.fragment_offset == 0;
        let mut ip = Ipv4Header {
            total_len: u16::try_from(IPV4_HLEN + self.ip_options.len() + l4.len())
                .expect("IPv4 total length"),
            identification: IP_ID,
            dont_fragment: unfragmented && !self.may_fragment,
            more_fragments: self.more_fragments,
            fragment_offset: IpFragOffset::try_new(self.fragment_offset).expect("offset"),
            time_to_live: self.ttl,
            protocol: IpNumber(self.proto()),
            source: self.src.octets(),
            destination: self.dst.octets(),
            options: Ipv4Options::try_from(self.ip_options.as_slice()).expect("IPv4 options"),
            ..Ipv4Header::default()
        };
        ip.header_checksum = ip.calc_header_checksum();

        let mut ether_types: Vec<u16> = self.tags.iter().map(|(tpid, _)| *tpid).collect();
        ether_types.push(ETHERTYPE_IPV4);
        let mut frame = Ethernet2Header {
            source: self.eth_src,
            destination: self.eth_dst,
            ether_type: EtherType(ether_types[0]),
        }
        .to_bytes()
        .to_vec();
        for (index, (_, vid)) in self.tags.iter().enumerate() {
            let tag = SingleVlanHeader {
                pcp: VlanPcp::ZERO,
                drop_eligible_indicator: false,
                vlan_id: VlanId::try_new(*vid).expect("VLAN id"),
                ether_type: EtherType(ether_types[index + 1]),
            };
            frame.extend_from_slice(&tag.to_bytes());
        }
        frame.extend_from_slice(&ip.to_bytes());
        frame.extend_from_slice(&l4);
        frame.extend_from_slice(&self.padding);
        frame
    }
}

/// TOS of an ICMP error: precedence "internetwork control" (RFC 791), as Linux sends them.
const ICMP_ERROR_TOS: u8 = 0xc0;
/// Bits of the TOS byte that form the DSCP.
const DSCP_SHIFT: u8 = 2;
/// Bytes of the offending datagram past its IPv4 header an ICMP error quotes (RFC 792).
const ICMP_QUOTED_L4_BYTES: usize = 8;

/// The ICMP port unreachable a router answers `offending` with, built with etherparse from RFC
/// 792: back to the sender from the address it asked for, in the same VLANs, quoting the IPv4
/// header (options included) and the first 8 bytes after it.
fn port_unreachable(offending: &Pkt) -> Vec<u8> {
    unreachable(offending, DestUnreachableHeader::Port)
}

/// Like [`port_unreachable`], with another destination unreachable message.
fn unreachable(offending: &Pkt, message: DestUnreachableHeader) -> Vec<u8> {
    let bytes = offending.bytes();
    let l3 = l3_offset(&bytes);
    let ihl = usize::from(bytes[l3] & 0x0f) * 4;
    let quote = &bytes[l3..l3 + ihl + ICMP_QUOTED_L4_BYTES];
    let icmp = Icmpv4Header::with_checksum(Icmpv4Type::DestinationUnreachable(message), quote);
    let mut ip = Ipv4Header {
        dscp: IpDscp::try_new(ICMP_ERROR_TOS >> DSCP_SHIFT).expect("DSCP"),
        total_len: u16::try_from(IPV4_HLEN + icmp.header_len() + quote.len())
            .expect("IPv4 total length"),
        // Linux sends its ICMP errors without DF (its ICMP socket does no path-MTU discovery).
        dont_fragment: false,
        time_to_live: DEFAULT_TTL,
        protocol: IpNumber(IPPROTO_ICMP),
        source: offending.dst.octets(),
        destination: offending.src.octets(),
        ..Ipv4Header::default()
    };
    ip.header_checksum = ip.calc_header_checksum();
    // The offending frame's link header, tags included, with the addresses swapped.
    let mut frame = bytes[..l3].to_vec();
    frame[..6].copy_from_slice(&offending.eth_src);
    frame[6..12].copy_from_slice(&offending.eth_dst);
    frame.extend_from_slice(&ip.to_bytes());
    frame.extend_from_slice(&icmp.to_bytes());
    frame.extend_from_slice(quote);
    frame
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .enumerate()
        .map(|(line, chunk)| {
            let words: Vec<String> = chunk.iter().map(|byte| format!("{byte:02x}")).collect();
            format!("  {:04x}: {}\n", line * 16, words.join(" "))
        })
        .collect()
}

fn assert_frame(context: &str, actual: &[u8], expected: &[u8]) {
    if actual != expected {
        let first = actual
            .iter()
            .zip(expected)
            .position(|(a, e)| a != e)
            .unwrap_or(actual.len().min(expected.len()));
        panic!(
            "{context}: output differs from the expected frame at byte {first} \
             (lengths {} vs {})\nactual:\n{}expected:\n{}",
            actual.len(),
            expected.len(),
            hex(actual),
            hex(expected)
        );
    }
}

fn action_name(action: u32) -> String {
    match action {
        XDP_DROP => "XDP_DROP".to_owned(),
        XDP_PASS => "XDP_PASS".to_owned(),
        XDP_TX => "XDP_TX".to_owned(),
        XDP_REDIRECT => "XDP_REDIRECT".to_owned(),
        other => format!("action {other}"),
    }
}

fn wire_addr(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

fn wire_port(port: u16) -> u16 {
    port.to_be()
}

fn flow_key(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8, direction: u8) -> FlowKey {
    FlowKey {
        src_addr: wire_addr(src.0),
        dst_addr: wire_addr(dst.0),
        src_port: wire_port(src.1),
        dst_port: wire_port(dst.1),
        proto,
        direction,
        _pad: [0; 2],
    }
}

/// `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a writable timespec.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    assert_eq!(result, 0, "clock_gettime");
    u64::try_from(now.tv_sec).expect("seconds") * 1_000_000_000
        + u64::try_from(now.tv_nsec).expect("nanoseconds")
}

fn frontend(
    name: &str,
    addr: Ipv4Addr,
    port: u16,
    proto: u8,
    backends: &[(Ipv4Addr, u16)],
) -> Frontend {
    let mut backends: Vec<BackendAddr> = backends
        .iter()
        .map(|(addr, port)| BackendAddr {
            addr: *addr,
            port: *port,
            remote: false,
        })
        .collect();
    backends.sort();
    backends.dedup();
    Frontend {
        namespace: "fixtures".to_owned(),
        name: name.to_owned(),
        port_name: String::new(),
        addr,
        port,
        proto,
        backends,
        draining: Vec::new(),
        drop_when_empty: false,
        affinity_timeout_s: 0,
        source_ranges: None,
        snat_remote: false,
        details: Details::default(),
    }
}

// ---------------------------------------------------------------------------------------------
// The lab: namespace, loaded program, maps, and the case runner.

/// Removes the pin directory however the test ends.
struct PinGuard(PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Err(error) = dataplane::reset(&self.0) {
            eprintln!("cleaning up {}: {error:#}", self.0.display());
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Iface {
    index: u32,
    mac: [u8; 6],
}

fn interface(netns: &Netns, name: &str) -> Iface {
    let (index, mac) = netns.link(name).expect("the lab's interface");
    Iface { index, mac }
}

fn build_topology(netns: &Netns) {
    for (name, peer, cidr) in [
        (IN_IF, IN_PEER, IN_CIDR),
        (OUT_IF, OUT_PEER, OUT_CIDR),
        (SIDE_IF, SIDE_PEER, SIDE_CIDR),
    ] {
        veth(netns, name, netns, peer).expect("creating a veth pair");
        netns
            .ip(&["addr", "add", cidr, "dev", name])
            .expect("adding an address");
    }
    netns.sysctl("ipv4.ip_forward", "1").expect("ip_forward");
    netns
        .sysctl("ipv4.conf.all.forwarding", "1")
        .expect("conf.all.forwarding");
    for (addr, mac, dev) in [
        (CLIENT, CLIENT_MAC, IN_IF),
        (LOCAL_BACKEND, LOCAL_BACKEND_MAC, IN_IF),
        (BACKEND_A, BACKEND_A_MAC, OUT_IF),
        (BACKEND_B, BACKEND_B_MAC, OUT_IF),
        (BACKEND_C, BACKEND_C_MAC, OUT_IF),
        (SIDE_BACKEND, SIDE_BACKEND_MAC, SIDE_IF),
    ] {
        netns
            .ip(&[
                "neigh",
                "add",
                &addr.to_string(),
                "lladdr",
                &mac_text(mac),
                "dev",
                dev,
                "nud",
                "permanent",
            ])
            .expect("adding a static neighbour");
    }
    // The FIB lookup only applies a route's MTU when it is locked.
    netns
        .ip(&[
            "route",
            "add",
            ROUTED_SUBNET,
            "via",
            &BACKEND_A.to_string(),
            "dev",
            OUT_IF,
            "mtu",
            "lock",
            &ROUTED_MTU.to_string(),
        ])
        .expect("adding the small-MTU route");
}

/// What one run must produce.
enum Expect {
    /// The output is the input, byte for byte.
    Unchanged,
    /// The output is exactly this packet, whose checksums are then recomputed.
    Frame(Pkt),
    /// The output is exactly this ICMP error frame, whose checksums are then recomputed.
    Icmp(Vec<u8>),
    /// The output is exactly this fragment, whose IPv4 checksum is then recomputed (its L4
    /// checksum covers the reassembled datagram).
    Fragment(Pkt),
}

struct Case {
    name: &'static str,
    input: Vec<u8>,
    ingress: u32,
    action: u32,
    output: Expect,
    /// Every counter not listed must stay unchanged.
    counters: Vec<(Counter, u64)>,
}

struct Lab {
    dataplane: Dataplane,
    maps: ServiceMaps,
    reconciler: Reconciler,
    pin_dir: PathBuf,
    in0: Iface,
    out0: Iface,
    side0: Iface,
    /// Last, so that the map handles above are closed before the pins go.
    _pins: PinGuard,
}

/// Runs `body` in a fresh namespace with the program loaded under a fresh pin directory.
fn with_lab(test: &str, body: impl FnOnce(&mut Lab) + Send) {
    if !require_root(test) {
        return;
    }
    let name = unique_prefix("lbt");
    let netns = Netns::create(&name).expect("creating the namespace");
    build_topology(&netns);
    let pin_dir = Path::new(BPFFS).join(&name);
    let netns_ref = &netns;
    netns
        .run(move || {
            let mut lab = Lab::new(netns_ref, pin_dir);
            body(&mut lab);
        })
        .expect("the test body failed inside the namespace (see the panic above)");
}

impl Lab {
    fn new(netns: &Netns, pin_dir: PathBuf) -> Self {
        let pins = PinGuard(pin_dir.clone());
        let dataplane =
            Dataplane::load(&pin_dir, &Capacities::default()).expect("loading the XDP program");
        let mut maps = ServiceMaps::open(&pin_dir).expect("opening the service maps");
        let (reconciler, swept) =
            Reconciler::from_store(&mut maps).expect("reading the service maps");
        assert_eq!(swept, 0, "a fresh pin directory has nothing to sweep");
        let lab = Self {
            dataplane,
            maps,
            reconciler,
            in0: interface(netns, IN_IF),
            out0: interface(netns, OUT_IF),
            side0: interface(netns, SIDE_IF),
            pin_dir,
            _pins: pins,
        };
        let mut tx_ports = open_tx_ports(&lab.pin_dir).expect("opening LB_TX_PORTS");
        for iface in [lab.in0, lab.out0] {
            tx_ports
                .insert(iface.index, iface.index, None, 0)
                .expect("allowing redirects");
        }
        // As the agent describes veths: local sockets may send partial checksums on them.
        for iface in [lab.in0, lab.out0, lab.side0] {
            lab.set_iface_flags(iface, IFACE_LOCAL_SENDERS);
        }
        lab
    }

    /// Describes `iface` in `LB_IFACES` with the `IFACE_*` bits `flags`.
    fn set_iface_flags(&self, iface: Iface, flags: u32) {
        open_ifaces(&self.pin_dir)
            .expect("opening LB_IFACES")
            .insert(iface.index, IfaceConfig { flags }, 0)
            .expect("describing the interface");
    }

    /// Programs exactly `frontends` through the reconciler, as the agent does, with no
    /// ClusterIP set (so packets to other ports of their addresses pass).
    fn program(&mut self, frontends: &[Frontend]) {
        self.program_state(&DesiredState {
            frontends: frontends
                .iter()
                .map(|frontend| (frontend.key(), frontend.clone()))
                .collect(),
            cluster_ips: BTreeSet::new(),
        });
    }

    /// Programs exactly `desired` through the reconciler, as the agent does.
    fn program_state(&mut self, desired: &DesiredState) {
        let summary = self.reconciler.reconcile(desired, &mut self.maps);
        assert!(
            summary.errors.is_empty(),
            "reconcile failed: {:?}",
            summary.errors
        );
    }

    /// The frontend's `LB_SERVICES` value and its backends by slot, as the maps hold them.
    fn resolve(&self, frontend: &Frontend) -> (ServiceValue, Vec<(u32, Backend)>) {
        let value = self
            .maps
            .services
            .get(&frontend.key(), 0)
            .expect("the frontend is programmed");
        let backends = (0..value.backend_count)
            .map(|slot| {
                let key = SlotKey {
                    backend_set: value.backend_set,
                    slot,
                };
                let id = self.maps.slots.get(&key, 0).expect("slot");
                (id, self.maps.backends.get(&id, 0).expect("backend"))
            })
            .collect();
        (value, backends)
    }

    /// The id of the backend `addr:port` of `frontend`.
    fn backend_id(&self, frontend: &Frontend, addr: Ipv4Addr, port: u16) -> u32 {
        let (_, backends) = self.resolve(frontend);
        let (id, backend) = backends
            .into_iter()
            .find(|(_, backend)| backend.addr == wire_addr(addr) && backend.port == wire_port(port))
            .unwrap_or_else(|| panic!("{addr}:{port} is not a backend of {}", frontend.name));
        assert_eq!(backend.flags & BACKEND_ACTIVE, BACKEND_ACTIVE);
        id
    }

    fn counters(&self) -> Vec<u64> {
        let counters = read_counters(&self.pin_dir).expect("reading LB_STATS");
        for (position, (counter, _)) in counters.iter().enumerate() {
            assert_eq!(*counter as usize, position, "counters out of order");
        }
        counters.into_iter().map(|(_, value)| value).collect()
    }

    fn conntrack(&self) -> BTreeMap<FlowKey, FlowState> {
        open_conntrack(&self.pin_dir)
            .expect("opening LB_CONNTRACK")
            .iter()
            .collect::<Result<_, _>>()
            .expect("reading LB_CONNTRACK")
    }

    /// Runs one packet and checks the action, the output and every counter's delta.
    fn check(&mut self, case: &Case) -> Vec<u8> {
        let before = self.counters();
        let run = self
            .dataplane
            .test_run(&case.input, case.ingress)
            .unwrap_or_else(|error| panic!("{}: test_run failed: {error:#}", case.name));
        let after = self.counters();
        assert_eq!(
            action_name(run.action),
            action_name(case.action),
            "{}: XDP action",
            case.name
        );
        match &case.output {
            Expect::Unchanged => assert_frame(case.name, &run.packet, &case.input),
            Expect::Frame(expected) => {
                assert_frame(case.name, &run.packet, &expected.bytes());
                verify_checksums(case.name, &run.packet, expected.check);
            }
            Expect::Icmp(expected) => {
                assert_frame(case.name, &run.packet, expected);
                verify_icmp_checksums(case.name, &run.packet);
            }
            Expect::Fragment(expected) => {
                assert_frame(case.name, &run.packet, &expected.bytes());
                let ip = &run.packet[l3_offset(&run.packet)..];
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                assert_eq!(
                    fold(sum_words(0, &ip[..ihl])),
                    0xffff,
                    "{}: IPv4 header checksum does not verify",
                    case.name
                );
            }
        }
        assert_counter_deltas(case.name, &before, &after, &case.counters);
        run.packet
    }

    fn check_all(&mut self, cases: &[Case]) {
        for case in cases {
            self.check(case);
        }
    }

    /// Like [`Lab::check`] when the backend is chosen at random: the output must be exactly one
    /// of `candidates`; returns which.
    fn check_any(
        &mut self,
        name: &str,
        input: &Pkt,
        ingress: u32,
        candidates: &[Pkt],
        counters: &[(Counter, u64)],
    ) -> usize {
        let before = self.counters();
        let run = self
            .dataplane
            .test_run(&input.bytes(), ingress)
            .unwrap_or_else(|error| panic!("{name}: test_run failed: {error:#}"));
        let after = self.counters();
        assert_eq!(
            action_name(run.action),
            action_name(XDP_REDIRECT),
            "{name}: XDP action"
        );
        let chosen = candidates
            .iter()
            .position(|candidate| candidate.bytes() == run.packet)
            .unwrap_or_else(|| {
                panic!(
                    "{name}: output matches no backend's expected frame\nactual:\n{}",
                    hex(&run.packet)
                )
            });
        verify_checksums(name, &run.packet, candidates[chosen].check);
        assert_counter_deltas(name, &before, &after, counters);
        chosen
    }
}

fn assert_counter_deltas(
    context: &str,
    before: &[u64],
    after: &[u64],
    expected: &[(Counter, u64)],
) {
    let actual: BTreeMap<&str, u64> = Counter::ALL
        .iter()
        .map(|counter| {
            let index = *counter as usize;
            (counter.name(), after[index] - before[index])
        })
        .filter(|(_, delta)| *delta != 0)
        .collect();
    let expected: BTreeMap<&str, u64> = expected
        .iter()
        .map(|(counter, delta)| (counter.name(), *delta))
        .filter(|(_, delta)| *delta != 0)
        .collect();
    assert_eq!(actual, expected, "{context}: counter deltas");
}

/// The frame a client sends to the router on in0.
fn from_client(lab: &Lab, packet: Pkt) -> Pkt {
    packet.eth(CLIENT_MAC, lab.in0.mac)
}

/// What a packet to the Service becomes when DNATed to `backend:port` and redirected out of out0.
fn to_backend(lab: &Lab, packet: &Pkt, backend: (Ipv4Addr, [u8; 6]), port: u16) -> Pkt {
    packet
        .clone()
        .to(backend.0, port)
        .hop(lab.out0.mac, backend.1)
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn new_tcp_flow_is_translated_and_tracked() {
    with_lab("new_tcp_flow_is_translated_and_tracked", |lab| {
        let web = frontend(
            "web",
            VIP,
            VIP_PORT,
            IPPROTO_TCP,
            &[(BACKEND_A, BACKEND_PORT)],
        );
        let other = frontend(
            "other",
            OTHER_VIP,
            VIP_PORT,
            IPPROTO_TCP,
            &[(BACKEND_B, BACKEND_PORT)],
        );
        lab.program(&[web.clone(), other]);
        let in0 = lab.in0.index;
        const CLIENT_PORT: u16 = 40_000;

        let syn = from_client(
            lab,
            Pkt::tcp((CLIENT, CLIENT_PORT), (VIP, VIP_PORT), SYN).tcp_options(&MSS_OPTION),
        );
        let started = monotonic_ns();
        lab.check(&Case {
            name: "SYN of a new flow",
            input: syn.bytes(),
            ingress: in0,
            action: XDP_REDIRECT,
            output: Expect::Frame(to_backend(
                lab,
                &syn,
                (BACKEND_A, BACKEND_A_MAC),
                BACKEND_PORT,
            )),
            counters: vec![(Counter::RedirectService, 1), (Counter::FlowCreated, 1)],
        });
        let finished = monotonic_ns();

        let (service, backends) = lab.resolve(&web);
        let backend_id = lab.backend_id(&web, BACKEND_A, BACKEND_PORT);
        assert_eq!(backends.len(), 1);
        let table = lab.conntrack();
        assert_eq!(
            table.len(),
            2,
            "one original and one reply entry: {table:?}"
        );
        let original_key = flow_key(
            (CLIENT, CLIENT_PORT),
            (VIP, VIP_PORT),
            IPPROTO_TCP,
            DIRECTION_ORIGINAL,
        );
        let reply_key = flow_key(
            (BACKEND_A, BACKEND_PORT),
            (CLIENT, CLIENT_PORT),
            IPPROTO_TCP,
            DIRECTION_REPLY,
        );
        let original = *table.get(&original_key).expect("original entry");
        let reply = *table.get(&reply_key).expect("reply entry");
        assert!(
            (started..=finished).contains(&original.created_ns),
            "created_ns {} outside the run [{started}, {finished}]",
            original.created_ns
        );
        let expected_original = FlowState {
            nat_addr: wire_addr(BACKEND_A),
            nat_port: wire_port(BACKEND_PORT),
            tcp_flags: 0,
            _pad: 0,
            backend_id,
            service_id: service.service_id,
            created_ns: original.created_ns,
            last_seen_ns: original.created_ns,
            snat_addr: 0,
            snat_port: 0,
            _pad2: 0,
        };
        assert_eq!(original, expected_original);
        assert_eq!(
            reply,
            FlowState {
                nat_addr: wire_addr(VIP),
                nat_port: wire_port(VIP_PORT),
                ..expected_original
            }
        );

        // Later packets of the flow follow the entry and create nothing.
        let data = from_client(
            lab,
            Pkt::tcp((CLIENT, CLIENT_PORT), (VIP, VIP_PORT), PSH | ACK)
                .payload(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n"),
        );
        // A minimum-size frame: 54 bytes padded to 60, padding the datagram must ignore.
        let padded_ack = from_client(
            lab,
            Pkt::tcp((CLIENT, CLIENT_PORT), (VIP, VIP_PORT), ACK).padding(&[0xee; 6]),
        );
        lab.check_all(&[
            Case {
                name: "data segment of the flow",
                input: data.bytes(),
                ingress: in0,
                action: XDP_REDIRECT,
                output: Expect::Frame(to_backend(
                    lab,
                    &data,
                    (BACKEND_A, BACKEND_A_MAC),
                    BACKEND_PORT,
                )),
                counters: vec![(Counter::RedirectService, 1)],
            },
            Case {
                name: "ACK with Ethernet padding",
                input: padded_ack.bytes(),
                ingress: in0,
                action: XDP_REDIRECT,
                output: Expect::Frame(to_backend(
                    lab,
                    &padded_ack,
                    (BACKEND_A, BACKEND_A_MAC),
                    BACKEND_PORT,
                )),
                counters: vec![(Counter::RedirectService, 1)],
            },
        ]);
        let table = lab.conntrack();
        assert_eq!(table.len(), 2, "no further entries: {table:?}");
        let original = table[&original_key];
        assert_eq!(
            (original.nat_addr, original.nat_port, original.backend_id),
            (
                expected_original.nat_addr,
                expected_original.nat_port,
                backend_id
            )
        );
        assert_eq!(original.created_ns, expected_original.created_ns);
    });
}

#[test]
fn established_flows_stick_and_new_flows_spread() {
    with_lab("established_flows_stick_and_new_flows_spread", |lab| {
        let backends = [
            (BACKEND_A, BACKEND_A_MAC),
            (BACKEND_B, BACKEND_B_MAC),
            (BACKEND_C, BACKEND_C_MAC),
        ];
        let addrs: Vec<(Ipv4Addr, u16)> = backends
            .iter()
            .map(|(addr, _)| (*addr, BACKEND_PORT))
            .collect();
        lab.program(&[frontend("web", VIP, VIP_PORT, IPPROTO_TCP, &addrs)]);
        let in0 = lab.in0.index;
        let candidates = |lab: &Lab, packet: &Pkt| -> Vec<Pkt> {
            backends
                .iter()
                .map(|backend| to_backend(lab, packet, *backend, BACKEND_PORT))
                .collect()
        };
        const STICKY_PORT: u16 = 30_000;
        const FIRST_SPREAD_PORT: u16 = 31_000;

        let syn = from_client(lab, Pkt::tcp((CLIENT, STICKY_PORT), (VIP, VIP_PORT), SYN));
        let chosen = lab.check_any(
            "SYN",
            &syn,
            in0,
            &candidates(lab, &syn),
            &[(Counter::RedirectService, 1), (Counter::FlowCreated, 1)],
        );
        for run in 0..STICKY_RUNS {
            let sequence = u32::try_from(run).expect("run");
            let segment = from_client(
                lab,
                Pkt::tcp((CLIENT, STICKY_PORT), (VIP, VIP_PORT), PSH | ACK)
                    .payload(&sequence.to_be_bytes()),
            );
            let again = lab.check_any(
                "segment of the established flow",
                &segment,
                in0,
                &candidates(lab, &segment),
                &[(Counter::RedirectService, 1)],
            );
            assert_eq!(again, chosen, "run {run} left the flow's backend");
        }

        let mut flows = Vec::new();
        let mut seen = BTreeSet::new();
        for offset in 0..MAX_NEW_FLOWS {
            let port = FIRST_SPREAD_PORT + offset;
            let syn = from_client(lab, Pkt::tcp((CLIENT, port), (VIP, VIP_PORT), SYN));
            let backend = lab.check_any(
                "SYN of another flow",
                &syn,
                in0,
                &candidates(lab, &syn),
                &[(Counter::RedirectService, 1), (Counter::FlowCreated, 1)],
            );
            flows.push((port, backend));
            seen.insert(backend);
            if seen.len() == backends.len() {
                break;
            }
        }
        assert_eq!(
            seen.len(),
            backends.len(),
            "{MAX_NEW_FLOWS} new flows did not reach every backend: {flows:?}"
        );
        for (port, backend) in &flows {
            let ack = from_client(lab, Pkt::tcp((CLIENT, *port), (VIP, VIP_PORT), ACK));
            let again = lab.check_any(
                "ACK of another flow",
                &ack,
                in0,
                &candidates(lab, &ack),
                &[(Counter::RedirectService, 1)],
            );
            assert_eq!(again, *backend, "flow from port {port} changed backend");
        }
        assert_eq!(lab.conntrack().len(), 2 * (flows.len() + 1));
    });
}

#[test]
fn backend_replies_are_reverse_translated() {
    with_lab("backend_replies_are_reverse_translated", |lab| {
        lab.program(&[frontend(
            "web",
            VIP,
            VIP_PORT,
            IPPROTO_TCP,
            &[(BACKEND_A, BACKEND_PORT)],
        )]);
        let (in0, out0) = (lab.in0, lab.out0);
        const CLIENT_PORT: u16 = 40_001;
        const UNTRACKED_PORT: u16 = 40_999;
        const OTHER_BACKEND_PORT: u16 = 9_999;

        let syn = from_client(lab, Pkt::tcp((CLIENT, CLIENT_PORT), (VIP, VIP_PORT), SYN));
        let reply = |src_port: u16, dst_port: u16, flags: u8| {
            Pkt::tcp((BACKEND_A, src_port), (CLIENT, dst_port), flags).eth(BACKEND_A_MAC, out0.mac)
        };
        let syn_ack = reply(BACKEND_PORT, CLIENT_PORT, SYN | ACK).tcp_options(&MSS_OPTION);
        let data = reply(BACKEND_PORT, CLIENT_PORT, PSH | ACK).payload(b"HTTP/1.1 200 OK\r\n\r\n");
        let fin = reply(BACKEND_PORT, CLIENT_PORT, FIN | ACK);
        let reversed = |packet: &Pkt| packet.clone().from(VIP, VIP_PORT).hop(in0.mac, CLIENT_MAC);
        lab.check_all(&[
            Case {
                name: "SYN creating the flow",
                input: syn.bytes(),
                ingress: in0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(to_backend(
                    lab,
                    &syn,
                    (BACKEND_A, BACKEND_A_MAC),
                    BACKEND_PORT,
                )),
                counters: vec![(Counter::RedirectService, 1), (Counter::FlowCreated, 1)],
            },
            Case {
                name: "SYN-ACK from the backend",
                input: syn_ack.bytes(),
                ingress: out0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(reversed(&syn_ack)),
                counters: vec![(Counter::RedirectReply, 1)],
            },
            Case {
                name: "data from the backend",
                input: data.bytes(),
                ingress: out0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(reversed(&data)),
                counters: vec![(Counter::RedirectReply, 1)],
            },
            Case {
                name: "backend to a client port without a flow",
                input: reply(BACKEND_PORT, UNTRACKED_PORT, ACK).bytes(),
                ingress: out0.index,
                action: XDP_PASS,
                output: Expect::Unchanged,
                counters: vec![(Counter::PassNoService, 1)],
            },
            Case {
                name: "backend from another port",
                input: reply(OTHER_BACKEND_PORT, CLIENT_PORT, ACK).bytes(),
                ingress: out0.index,
                action: XDP_PASS,
                output: Expect::Unchanged,
                counters: vec![(Counter::PassNoService, 1)],
            },
            Case {
                name: "UDP on the TCP flow's tuple",
                input: Pkt::udp((BACKEND_A, BACKEND_PORT), (CLIENT, CLIENT_PORT))
                    .eth(BACKEND_A_MAC, out0.mac)
                    .payload(b"udp")
                    .bytes(),
                ingress: out0.index,
                action: XDP_PASS,
                output: Expect::Unchanged,
                counters: vec![(Counter::PassNoService, 1)],
            },
            Case {
                name: "FIN from the backend",
                input: fin.bytes(),
                ingress: out0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(reversed(&fin)),
                counters: vec![(Counter::RedirectReply, 1)],
            },
        ]);
        let table = lab.conntrack();
        assert_eq!(table.len(), 2, "replies create no entries: {table:?}");
        let reply_entry = table[&flow_key(
            (BACKEND_A, BACKEND_PORT),
            (CLIENT, CLIENT_PORT),
            IPPROTO_TCP,
            DIRECTION_REPLY,
        )];
        assert_eq!(
            reply_entry.tcp_flags,
            SEEN_REPLY | SEEN_FIN,
            "the reply entry records that the flow is answered, and the backend's FIN"
        );
        assert_eq!(
            (reply_entry.nat_addr, reply_entry.nat_port),
            (wire_addr(VIP), wire_port(VIP_PORT))
        );
    });
}

#[test]
fn udp_checksums_are_updated_or_left_zero() {
    with_lab("udp_checksums_are_updated_or_left_zero", |lab| {
        lab.program(&[frontend(
            "dns",
            VIP,
            DNS_PORT,
            IPPROTO_UDP,
            &[(BACKEND_A, BACKEND_DNS_PORT)],
        )]);
        let (in0, out0) = (lab.in0, lab.out0);
        const EVEN_PORT: u16 = 5_000;
        const ODD_PORT: u16 = 5_001;
        const ZERO_PORT: u16 = 5_002;
        let query = |port: u16, payload: &[u8]| {
            from_client(
                lab,
                Pkt::udp((CLIENT, port), (VIP, DNS_PORT)).payload(payload),
            )
        };
        let answer = |port: u16, payload: &[u8]| {
            Pkt::udp((BACKEND_A, BACKEND_DNS_PORT), (CLIENT, port))
                .eth(BACKEND_A_MAC, out0.mac)
                .payload(payload)
        };
        let even = query(EVEN_PORT, b"\x12\x34\x01\x00\x00\x01");
        let odd = query(ODD_PORT, b"odd-length");
        let zero = query(ZERO_PORT, b"no checksum").check(Check::Zero);
        let answer_even = answer(EVEN_PORT, b"\x12\x34\x81\x80");
        let answer_zero = answer(ZERO_PORT, b"no checksum back").check(Check::Zero);
        let dnat =
            |packet: &Pkt| to_backend(lab, packet, (BACKEND_A, BACKEND_A_MAC), BACKEND_DNS_PORT);
        let reversed = |packet: &Pkt| packet.clone().from(VIP, DNS_PORT).hop(in0.mac, CLIENT_MAC);
        let new_flow = vec![(Counter::RedirectService, 1), (Counter::FlowCreated, 1)];
        lab.check_all(&[
            Case {
                name: "UDP with a checksum",
                input: even.bytes(),
                ingress: in0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(dnat(&even)),
                counters: new_flow.clone(),
            },
            Case {
                name: "UDP with an odd-length payload",
                input: odd.bytes(),
                ingress: in0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(dnat(&odd)),
                counters: new_flow.clone(),
            },
            Case {
                name: "UDP with a zero checksum",
                input: zero.bytes(),
                ingress: in0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(dnat(&zero)),
                counters: new_flow.clone(),
            },
            Case {
                name: "UDP reply with a checksum",
                input: answer_even.bytes(),
                ingress: out0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(reversed(&answer_even)),
                counters: vec![(Counter::RedirectReply, 1)],
            },
            Case {
                name: "UDP reply with a zero checksum",
                input: answer_zero.bytes(),
                ingress: out0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(reversed(&answer_zero)),
                counters: vec![(Counter::RedirectReply, 1)],
            },
        ]);
        let table = lab.conntrack();
        assert_eq!(
            table.len(),
            6,
            "three UDP flows, two entries each: {table:?}"
        );
        // The answered flows know it (they keep the long lifetime); the other does not.
        for (port, answered) in [
            (EVEN_PORT, SEEN_REPLY),
            (ODD_PORT, 0),
            (ZERO_PORT, SEEN_REPLY),
        ] {
            let key = flow_key(
                (CLIENT, port),
                (VIP, DNS_PORT),
                IPPROTO_UDP,
                DIRECTION_ORIGINAL,
            );
            let entry = table.get(&key).expect("UDP original entry");
            assert_eq!(
                (entry.nat_addr, entry.nat_port, entry.tcp_flags),
                (wire_addr(BACKEND_A), wire_port(BACKEND_DNS_PORT), answered)
            );
        }
    });
}

/// A payload ending in a 16-bit word chosen so that the UDP checksum of `src:sport ->
/// dst:dport` computes to zero.
fn payload_with_zero_udp_sum(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), prefix: &[u8]) -> Vec<u8> {
    (0..=u16::MAX)
        .map(|word| {
            let mut payload = prefix.to_vec();
            payload.extend_from_slice(&word.to_be_bytes());
            payload
        })
        .find(|payload| {
            let length = UDP_HLEN + payload.len();
            let header = [
                src.1.to_be_bytes(),
                dst.1.to_be_bytes(),
                u16::try_from(length).expect("length").to_be_bytes(),
            ]
            .concat();
            let sum = pseudo_header_sum(src.0, dst.0, IPPROTO_UDP, length);
            // All ones: the complemented checksum is 0.
            fold(sum_words(sum_words(sum, &header), payload)) == 0xffff
        })
        .expect("some final word always completes the sum to all ones")
}

#[test]
fn udp_checksum_computed_as_zero_is_sent_as_ffff() {
    with_lab("udp_checksum_computed_as_zero_is_sent_as_ffff", |lab| {
        lab.program(&[frontend(
            "dns",
            VIP,
            DNS_PORT,
            IPPROTO_UDP,
            &[(BACKEND_A, BACKEND_DNS_PORT)],
        )]);
        let (in0, out0) = (lab.in0, lab.out0);
        const CLIENT_PORT: u16 = 5_353;
        const PREFIX: &[u8] = b"zero-sum";

        let forward_payload =
            payload_with_zero_udp_sum((CLIENT, CLIENT_PORT), (BACKEND_A, BACKEND_DNS_PORT), PREFIX);
        let query = from_client(
            lab,
            Pkt::udp((CLIENT, CLIENT_PORT), (VIP, DNS_PORT)).payload(&forward_payload),
        );
        let reply_payload =
            payload_with_zero_udp_sum((VIP, DNS_PORT), (CLIENT, CLIENT_PORT), PREFIX);
        let answer = Pkt::udp((BACKEND_A, BACKEND_DNS_PORT), (CLIENT, CLIENT_PORT))
            .eth(BACKEND_A_MAC, out0.mac)
            .payload(&reply_payload);

        // The inputs must take the complete-checksum path: neither zero nor partial-looking.
        for (packet, name) in [(&query, "query"), (&answer, "answer")] {
            let bytes = packet.bytes();
            let field = be16(&bytes, ETH_HLEN + IPV4_HLEN + UDP_CHECK_OFFSET);
            let length = UDP_HLEN + packet.payload.len();
            assert_ne!(field, 0, "{name} input has a checksum");
            assert_ne!(
                field,
                partial_check(packet.src, packet.dst, IPPROTO_UDP, length),
                "{name} input must not look partial"
            );
        }

        let expected_query = to_backend(lab, &query, (BACKEND_A, BACKEND_A_MAC), BACKEND_DNS_PORT);
        let expected_answer = answer.clone().from(VIP, DNS_PORT).hop(in0.mac, CLIENT_MAC);
        let check_offset = ETH_HLEN + IPV4_HLEN + UDP_CHECK_OFFSET;
        for expected in [&expected_query, &expected_answer] {
            // etherparse also transmits a computed zero as all ones.
            assert_eq!(
                expected.bytes()[check_offset..check_offset + 2],
                [0xff, 0xff]
            );
        }
        let outputs = [
            lab.check(&Case {
                name: "query whose translated checksum is zero",
                input: query.bytes(),
                ingress: in0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(expected_query),
                counters: vec![(Counter::RedirectService, 1), (Counter::FlowCreated, 1)],
            }),
            lab.check(&Case {
                name: "answer whose reverse-translated checksum is zero",
                input: answer.bytes(),
                ingress: out0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(expected_answer),
                counters: vec![(Counter::RedirectReply, 1)],
            }),
        ];
        for output in outputs {
            assert_eq!(output[check_offset..check_offset + 2], [0xff, 0xff]);
        }
    });
}

#[test]
fn partial_checksums_are_left_to_the_stack() {
    with_lab("partial_checksums_are_left_to_the_stack", |lab| {
        lab.program(&[
            frontend(
                "web",
                VIP,
                VIP_PORT,
                IPPROTO_TCP,
                &[(BACKEND_A, BACKEND_PORT)],
            ),
            frontend(
                "dns",
                VIP,
                DNS_PORT,
                IPPROTO_UDP,
                &[(BACKEND_A, BACKEND_DNS_PORT)],
            ),
        ]);
        let (in0, out0) = (lab.in0, lab.out0);
        const TCP_PORT: u16 = 40_100;
        const UDP_PORT: u16 = 40_101;
        const PADDED_PORT: u16 = 40_102;
        const OPTIONS_PORT: u16 = 40_103;

        // The FIB would forward all of these (see the other tests): only the partial checksum
        // sends them to the stack, untouched apart from the translation.
        let tcp = from_client(
            lab,
            Pkt::tcp((CLIENT, TCP_PORT), (VIP, VIP_PORT), PSH | ACK)
                .payload(b"partial tcp payload")
                .check(Check::Partial),
        );
        let udp = from_client(
            lab,
            Pkt::udp((CLIENT, UDP_PORT), (VIP, DNS_PORT))
                .payload(b"partial udp")
                .check(Check::Partial),
        );
        let tcp_reply = Pkt::tcp((BACKEND_A, BACKEND_PORT), (CLIENT, TCP_PORT), ACK)
            .eth(BACKEND_A_MAC, out0.mac)
            .payload(b"partial reply")
            .check(Check::Partial);
        let udp_reply = Pkt::udp((BACKEND_A, BACKEND_DNS_PORT), (CLIENT, UDP_PORT))
            .eth(BACKEND_A_MAC, out0.mac)
            .payload(b"partial udp reply")
            .check(Check::Partial);
        // Recognising a partial checksum needs the L4 length from the IPv4 header: neither the
        // frame's length (padding) nor a fixed header size (options).
        let padded = from_client(
            lab,
            Pkt::tcp((CLIENT, PADDED_PORT), (VIP, VIP_PORT), ACK)
                .check(Check::Partial)
                .padding(&[0xee; 6]),
        );
        let with_options = from_client(
            lab,
            Pkt::udp((CLIENT, OPTIONS_PORT), (VIP, DNS_PORT))
                .ip_options(&[1, 1, 1, 0])
                .payload(b"partial, ihl 6")
                .check(Check::Partial),
        );
        let to_stack = vec![
            (Counter::StackService, 1),
            (Counter::StackPartialChecksum, 1),
            (Counter::FlowCreated, 1),
        ];
        let reply_to_stack = vec![(Counter::StackReply, 1), (Counter::StackPartialChecksum, 1)];
        lab.check_all(&[
            Case {
                name: "TCP with a partial checksum",
                input: tcp.bytes(),
                ingress: in0.index,
                action: XDP_PASS,
                output: Expect::Frame(tcp.clone().to(BACKEND_A, BACKEND_PORT)),
                counters: to_stack.clone(),
            },
            Case {
                name: "UDP with a partial checksum",
                input: udp.bytes(),
                ingress: in0.index,
                action: XDP_PASS,
                output: Expect::Frame(udp.clone().to(BACKEND_A, BACKEND_DNS_PORT)),
                counters: to_stack.clone(),
            },
            Case {
                name: "TCP with a partial checksum and Ethernet padding",
                input: padded.bytes(),
                ingress: in0.index,
                action: XDP_PASS,
                output: Expect::Frame(padded.clone().to(BACKEND_A, BACKEND_PORT)),
                counters: to_stack.clone(),
            },
            Case {
                name: "UDP with a partial checksum and IPv4 options",
                input: with_options.bytes(),
                ingress: in0.index,
                action: XDP_PASS,
                output: Expect::Frame(with_options.clone().to(BACKEND_A, BACKEND_DNS_PORT)),
                counters: to_stack,
            },
            Case {
                name: "TCP reply with a partial checksum",
                input: tcp_reply.bytes(),
                ingress: out0.index,
                action: XDP_PASS,
                output: Expect::Frame(tcp_reply.clone().from(VIP, VIP_PORT)),
                counters: reply_to_stack.clone(),
            },
            Case {
                name: "UDP reply with a partial checksum",
                input: udp_reply.bytes(),
                ingress: out0.index,
                action: XDP_PASS,
                output: Expect::Frame(udp_reply.clone().from(VIP, DNS_PORT)),
                counters: reply_to_stack,
            },
        ]);
    });
}

#[test]
fn ipv4_options_are_carried_through() {
    with_lab("ipv4_options_are_carried_through", |lab| {
        lab.program(&[
            frontend(
                "web",
                VIP,
                VIP_PORT,
                IPPROTO_TCP,
                &[(BACKEND_A, BACKEND_PORT)],
            ),
            frontend(
                "dns",
                VIP,
                DNS_PORT,
                IPPROTO_UDP,
                &[(BACKEND_A, BACKEND_DNS_PORT)],
            ),
        ]);
        let (in0, out0) = (lab.in0, lab.out0);
        /// Router Alert (RFC 2113): ihl 6.
        const ROUTER_ALERT: [u8; 4] = [0x94, 0x04, 0x00, 0x00];
        /// Three no-operations and an end of list, twice: ihl 7.
        const PADDED_OPTIONS: [u8; 8] = [1, 1, 1, 0, 1, 1, 1, 0];
        /// The largest header: 40 bytes of options, ihl 15.
        const MAX_OPTIONS: [u8; 40] = [1; 40];

        let tcp = from_client(
            lab,
            Pkt::tcp((CLIENT, 40_200), (VIP, VIP_PORT), SYN)
                .ip_options(&ROUTER_ALERT)
                .tcp_options(&MSS_OPTION),
        );
        let udp = from_client(
            lab,
            Pkt::udp((CLIENT, 40_201), (VIP, DNS_PORT))
                .ip_options(&PADDED_OPTIONS)
                .payload(b"options"),
        );
        let tcp_max = from_client(
            lab,
            Pkt::tcp((CLIENT, 40_202), (VIP, VIP_PORT), SYN).ip_options(&MAX_OPTIONS),
        );
        let reply = Pkt::tcp((BACKEND_A, BACKEND_PORT), (CLIENT, 40_200), SYN | ACK)
            .eth(BACKEND_A_MAC, out0.mac)
            .ip_options(&PADDED_OPTIONS);
        let new_flow = vec![(Counter::RedirectService, 1), (Counter::FlowCreated, 1)];
        let a = (BACKEND_A, BACKEND_A_MAC);
        lab.check_all(&[
            Case {
                name: "TCP with ihl 6",
                input: tcp.bytes(),
                ingress: in0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(to_backend(lab, &tcp, a, BACKEND_PORT)),
                counters: new_flow.clone(),
            },
            Case {
                name: "UDP with ihl 7",
                input: udp.bytes(),
                ingress: in0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(to_backend(lab, &udp, a, BACKEND_DNS_PORT)),
                counters: new_flow.clone(),
            },
            Case {
                name: "TCP with ihl 15",
                input: tcp_max.bytes(),
                ingress: in0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(to_backend(lab, &tcp_max, a, BACKEND_PORT)),
                counters: new_flow,
            },
            Case {
                name: "reply with ihl 7",
                input: reply.bytes(),
                ingress: out0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(reply.clone().from(VIP, VIP_PORT).hop(in0.mac, CLIENT_MAC)),
                counters: vec![(Counter::RedirectReply, 1)],
            },
        ]);
        // The ports were read after the options: the flows are keyed by the real ports.
        let table = lab.conntrack();
        for (port, dport, proto) in [
            (40_200, VIP_PORT, IPPROTO_TCP),
            (40_201, DNS_PORT, IPPROTO_UDP),
            (40_202, VIP_PORT, IPPROTO_TCP),
        ] {
            let key = flow_key((CLIENT, port), (VIP, dport), proto, DIRECTION_ORIGINAL);
            assert!(
                table.contains_key(&key),
                "no entry for port {port}: {table:?}"
            );
        }
    });
}

/// A raw Ethernet frame with `ether_type` and `body`.
fn ethernet(ether_type: u16, body: &[u8]) -> Vec<u8> {
    let mut frame = Ethernet2Header {
        source: CLIENT_MAC,
        destination: [0x02, 0, 0, 0, 0, 0xfe],
        ether_type: EtherType(ether_type),
    }
    .to_bytes()
    .to_vec();
    frame.extend_from_slice(body);
    frame
}

#[test]
fn packets_not_for_a_service_pass_untouched() {
    with_lab("packets_not_for_a_service_pass_untouched", |lab| {
        lab.program(&[
            frontend(
                "web",
                VIP,
                VIP_PORT,
                IPPROTO_TCP,
                &[(BACKEND_A, BACKEND_PORT)],
            ),
            frontend(
                "dns",
                VIP,
                DNS_PORT,
                IPPROTO_UDP,
                &[(BACKEND_A, BACKEND_DNS_PORT)],
            ),
        ]);
        let in0 = lab.in0.index;
        const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
        const SSH_PORT: u16 = 22;
        const HTTPS_PORT: u16 = 443;
        const CLIENT_PORT: u16 = 40_300;
        /// The second fragment of a 1500-byte datagram.
        const SECOND_FRAGMENT_OFFSET: u16 = 185;
        const ARP_REQUEST: [u8; 28] = [
            0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01, 0x02, 0, 0, 0, 0, 0x01, 10, 0, 0, 2, 0, 0, 0,
            0, 0, 0, 10, 0, 0, 1,
        ];
        let ipv6_tcp = {
            let mut frame = Vec::new();
            etherparse::PacketBuilder::ethernet2(CLIENT_MAC, lab.in0.mac)
                .ipv6([0xfd; 16], [0xfe; 16], DEFAULT_TTL)
                .tcp(CLIENT_PORT, VIP_PORT, CLIENT_ISN, WINDOW)
                .syn()
                .write(&mut frame, &[])
                .expect("IPv6 frame");
            frame
        };
        let icmp_echo = {
            let mut frame = Vec::new();
            etherparse::PacketBuilder::ethernet2(CLIENT_MAC, lab.in0.mac)
                .ipv4(CLIENT.octets(), VIP.octets(), DEFAULT_TTL)
                .icmpv4_echo_request(1, 1)
                .write(&mut frame, b"ping")
                .expect("ICMP frame");
            frame
        };
        let pass = |name, input: Vec<u8>, counter| Case {
            name,
            input,
            ingress: in0,
            action: XDP_PASS,
            output: Expect::Unchanged,
            counters: vec![(counter, 1)],
        };
        let client = |packet: Pkt| from_client(lab, packet).bytes();
        lab.check_all(&[
            pass(
                "TCP to the router itself",
                client(Pkt::tcp((CLIENT, CLIENT_PORT), (ROUTER, SSH_PORT), SYN)),
                Counter::PassNoService,
            ),
            pass(
                "TCP to the VIP on a port without a Service",
                client(Pkt::tcp((CLIENT, CLIENT_PORT), (VIP, HTTPS_PORT), SYN)),
                Counter::PassNoService,
            ),
            pass(
                "UDP to the TCP Service's port",
                client(Pkt::udp((CLIENT, CLIENT_PORT), (VIP, VIP_PORT)).payload(b"x")),
                Counter::PassNoService,
            ),
            pass(
                "TCP to the UDP Service's port",
                client(Pkt::tcp((CLIENT, CLIENT_PORT), (VIP, DNS_PORT), SYN)),
                Counter::PassNoService,
            ),
            pass(
                "ARP request",
                ethernet(ETHERTYPE_ARP, &ARP_REQUEST),
                Counter::PassNotIpv4,
            ),
            pass(
                "a bare Ethernet header",
                ethernet(ETHERTYPE_ARP, &[]),
                Counter::PassNotIpv4,
            ),
            pass("IPv6 TCP", ipv6_tcp, Counter::PassNotIpv4),
            pass(
                "three VLAN tags (two are parsed)",
                client(
                    Pkt::tcp((CLIENT, CLIENT_PORT), (VIP, VIP_PORT), SYN).tags(&[
                        (TPID_8021AD, 10),
                        (TPID_8021Q, 20),
                        (TPID_8021Q, 30),
                    ]),
                ),
                Counter::PassNotIpv4,
            ),
            pass("ICMP echo to the VIP", icmp_echo, Counter::PassNotTcpUdp),
            pass(
                "a later fragment whose first fragment never came",
                client(
                    Pkt::raw(CLIENT, VIP, IPPROTO_TCP, b"middle of a segment")
                        .fragment(false, SECOND_FRAGMENT_OFFSET),
                ),
                Counter::PassFragment,
            ),
            pass(
                "middle fragment of UDP to the VIP",
                client(Pkt::raw(CLIENT, VIP, IPPROTO_UDP, b"dns bytes").fragment(true, 1)),
                Counter::PassFragment,
            ),
        ]);
        assert!(lab.conntrack().is_empty(), "passed packets create no flows");
    });
}

/// Overwrites `bytes` at `offset`.
fn patched(mut frame: Vec<u8>, offset: usize, bytes: &[u8]) -> Vec<u8> {
    frame[offset..offset + bytes.len()].copy_from_slice(bytes);
    frame
}

#[test]
fn malformed_frames_are_dropped() {
    with_lab("malformed_frames_are_dropped", |lab| {
        lab.program(&[
            frontend(
                "web",
                VIP,
                VIP_PORT,
                IPPROTO_TCP,
                &[(BACKEND_A, BACKEND_PORT)],
            ),
            frontend(
                "dns",
                VIP,
                DNS_PORT,
                IPPROTO_UDP,
                &[(BACKEND_A, BACKEND_DNS_PORT)],
            ),
        ]);
        let in0 = lab.in0.index;
        const CLIENT_PORT: u16 = 40_400;
        const IP: usize = ETH_HLEN;
        const L4: usize = ETH_HLEN + IPV4_HLEN;
        const TCP_OFFSET_BYTE: usize = L4 + 12;
        const UDP_LENGTH: usize = L4 + 4;

        let client = |packet: Pkt| from_client(lab, packet);
        let syn = client(Pkt::tcp((CLIENT, CLIENT_PORT), (VIP, VIP_PORT), SYN)).bytes();
        let query = client(Pkt::udp((CLIENT, CLIENT_PORT), (VIP, DNS_PORT)).payload(b"abcd"));
        let tcp_header = Pkt::tcp((CLIENT, CLIENT_PORT), (VIP, VIP_PORT), SYN).l4_bytes();
        let udp_header = Pkt::udp((CLIENT, CLIENT_PORT), (VIP, DNS_PORT)).l4_bytes();
        // Valid IPv4 datagrams whose payload is a cut L4 header.
        let cut_tcp = |proto| client(Pkt::raw(CLIENT, VIP, proto, &tcp_header[..TCP_HLEN - 8]));
        let cut_udp = |proto| client(Pkt::raw(CLIENT, VIP, proto, &udp_header[..UDP_HLEN - 2]));
        let tagged_syn =
            client(Pkt::tcp((CLIENT, CLIENT_PORT), (VIP, VIP_PORT), SYN).tags(&[(TPID_8021Q, 7)]))
                .bytes();
        let qinq_syn = client(
            Pkt::tcp((CLIENT, CLIENT_PORT), (VIP, VIP_PORT), SYN)
                .tags(&[(TPID_8021AD, 7), (TPID_8021Q, 8)]),
        )
        .bytes();

        let drop = |name, input: Vec<u8>| Case {
            name,
            input,
            ingress: in0,
            action: XDP_DROP,
            output: Expect::Unchanged,
            counters: vec![(Counter::DropMalformed, 1)],
        };
        let pass = |name, input: Vec<u8>, counter| Case {
            name,
            input,
            ingress: in0,
            action: XDP_PASS,
            output: Expect::Unchanged,
            counters: vec![(counter, 1)],
        };
        lab.check_all(&[
            // Ethernet and VLAN headers.
            drop(
                "802.1Q tag cut short",
                tagged_syn[..ETH_HLEN + VLAN_HLEN - 2].to_vec(),
            ),
            drop(
                "QinQ inner tag cut short",
                qinq_syn[..ETH_HLEN + 2 * VLAN_HLEN - 1].to_vec(),
            ),
            // IPv4 header.
            drop("IPv4 EtherType without a header", syn[..ETH_HLEN].to_vec()),
            drop(
                "IPv4 header cut short",
                syn[..ETH_HLEN + IPV4_HLEN - 1].to_vec(),
            ),
            drop(
                "IPv4 header cut short after a VLAN tag",
                tagged_syn[..ETH_HLEN + VLAN_HLEN + IPV4_HLEN - 1].to_vec(),
            ),
            drop(
                "IP version 6 under the IPv4 EtherType",
                patched(syn.clone(), IP, &[0x65]),
            ),
            drop("IPv4 ihl 4", patched(syn.clone(), IP, &[0x44])),
            drop(
                "IPv4 ihl 15 beyond the total length",
                patched(syn.clone(), IP, &[0x4f]),
            ),
            drop(
                "IPv4 total length below the header",
                patched(syn.clone(), IP + 2, &19u16.to_be_bytes()),
            ),
            drop(
                "IPv4 datagram longer than the frame",
                syn[..syn.len() - 1].to_vec(),
            ),
            drop(
                "ICMP datagram longer than the frame",
                patched(
                    client(Pkt::raw(CLIENT, VIP, IPPROTO_ICMP, b"12345678")).bytes(),
                    IP + 2,
                    &u16::try_from(IPV4_HLEN + 9).expect("len").to_be_bytes(),
                ),
            ),
            // TCP header.
            drop("TCP header cut short", cut_tcp(IPPROTO_TCP).bytes()),
            drop(
                "TCP data offset 4",
                patched(syn.clone(), TCP_OFFSET_BYTE, &[0x40]),
            ),
            drop(
                "TCP data offset beyond the segment",
                patched(syn.clone(), TCP_OFFSET_BYTE, &[0x60]),
            ),
            // UDP header.
            drop("UDP header cut short", cut_udp(IPPROTO_UDP).bytes()),
            drop(
                "UDP length 7",
                patched(query.bytes(), UDP_LENGTH, &7u16.to_be_bytes()),
            ),
            drop(
                "UDP length beyond the datagram",
                patched(
                    query.bytes(),
                    UDP_LENGTH,
                    &u16::try_from(UDP_HLEN + query.payload.len() + 1)
                        .expect("len")
                        .to_be_bytes(),
                ),
            ),
            // Controls: the same cut L4 bytes are fine where no L4 header is parsed, which shows
            // that the drops above come from the L4 checks.
            pass(
                "cut TCP header in an ICMP datagram",
                cut_tcp(IPPROTO_ICMP).bytes(),
                Counter::PassNotTcpUdp,
            ),
            pass(
                "cut TCP header in a non-first fragment",
                cut_tcp(IPPROTO_TCP).fragment(false, 1).bytes(),
                Counter::PassFragment,
            ),
            pass(
                "cut UDP header in a non-first fragment",
                cut_udp(IPPROTO_UDP).fragment(false, 1).bytes(),
                Counter::PassFragment,
            ),
        ]);
        assert!(
            lab.conntrack().is_empty(),
            "malformed packets create no flows"
        );

        // A frame shorter than an Ethernet header never reaches the program: the kernel refuses
        // to run it, so the program's own check is unreachable through test_run.
        let before = lab.counters();
        let short = lab.dataplane.test_run(&syn[..ETH_HLEN - 1], in0);
        assert!(short.is_err(), "a 13-byte frame ran: {short:?}");
        assert_counter_deltas("13-byte frame", &before, &lab.counters(), &[]);
    });
}

#[test]
fn services_without_usable_backends_reject_or_drop() {
    with_lab("services_without_usable_backends_reject_or_drop", |lab| {
        const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
        const DANGLING_SLOT_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 31);
        const DEAD_BACKEND_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 32);
        /// Ids far above what the reconciler hands out for the few frontends here.
        const HAND_SERVICE_ID: u32 = 9_000;
        const HAND_BACKEND_SET: u32 = 9_000;
        const UNUSED_BACKEND_ID: u32 = 9_000;
        let empty = frontend("empty", EMPTY_VIP, VIP_PORT, IPPROTO_TCP, &[]);
        let empty_udp = frontend("empty-udp", EMPTY_VIP, DNS_PORT, IPPROTO_UDP, &[]);
        lab.program(&[empty.clone(), empty_udp]);
        let (value, _) = lab.resolve(&empty);
        assert_eq!(value.backend_count, 0);

        // States the reconciler never leaves, written by hand: a backend set whose slot is
        // missing, and a slot naming a backend id that is not active.
        let service_key = |addr: Ipv4Addr| ServiceKey {
            addr: wire_addr(addr),
            port: wire_port(VIP_PORT),
            proto: IPPROTO_TCP,
            _pad: 0,
        };
        let value = ServiceValue {
            service_id: HAND_SERVICE_ID,
            backend_set: HAND_BACKEND_SET,
            backend_count: 1,
            flags: 0,
            affinity_timeout_s: 0,
        };
        lab.maps
            .services
            .insert(service_key(DANGLING_SLOT_VIP), value, 0)
            .expect("writing a frontend");
        let dead_set = HAND_BACKEND_SET + 1;
        lab.maps
            .slots
            .insert(
                SlotKey {
                    backend_set: dead_set,
                    slot: 0,
                },
                UNUSED_BACKEND_ID,
                0,
            )
            .expect("writing a slot");
        lab.maps
            .services
            .insert(
                service_key(DEAD_BACKEND_VIP),
                ServiceValue {
                    service_id: HAND_SERVICE_ID + 1,
                    backend_set: dead_set,
                    ..value
                },
                0,
            )
            .expect("writing a frontend");

        let in0 = lab.in0.index;
        let client = |packet: Pkt| from_client(lab, packet).bytes();
        let drop = |name, input: Vec<u8>, counter| Case {
            name,
            input,
            ingress: in0,
            action: XDP_DROP,
            output: Expect::Unchanged,
            counters: vec![(counter, 1)],
        };
        let reject = |name, input: Pkt| Case {
            name,
            input: input.bytes(),
            ingress: in0,
            action: XDP_TX,
            output: Expect::Icmp(port_unreachable(&input)),
            counters: vec![(Counter::RejectNoEndpoints, 1)],
        };
        lab.check_all(&[
            reject(
                "TCP to a Service without endpoints",
                from_client(lab, Pkt::tcp((CLIENT, 40_500), (EMPTY_VIP, VIP_PORT), SYN)),
            ),
            reject(
                "UDP to a Service without endpoints",
                from_client(
                    lab,
                    Pkt::udp((CLIENT, 40_501), (EMPTY_VIP, DNS_PORT)).payload(b"q"),
                ),
            ),
            drop(
                "slot missing from the backend set",
                client(Pkt::tcp(
                    (CLIENT, 40_502),
                    (DANGLING_SLOT_VIP, VIP_PORT),
                    SYN,
                )),
                Counter::DropBackendMissing,
            ),
            drop(
                "slot naming an inactive backend",
                client(Pkt::tcp(
                    (CLIENT, 40_503),
                    (DEAD_BACKEND_VIP, VIP_PORT),
                    SYN,
                )),
                Counter::DropBackendMissing,
            ),
        ]);
        assert!(
            lab.conntrack().is_empty(),
            "rejected and dropped packets create no flows"
        );
    });
}

#[test]
fn forwarding_decisions() {
    with_lab("forwarding_decisions", |lab| {
        const VIP_ROUTED: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
        const VIP_UNRESOLVED: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
        const VIP_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
        const VIP_UNROUTED: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
        const VIP_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 14);
        const VIP_SIDE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 15);
        lab.program(&[
            frontend(
                "routed",
                VIP_ROUTED,
                VIP_PORT,
                IPPROTO_TCP,
                &[(BACKEND_A, BACKEND_PORT)],
            ),
            frontend(
                "unresolved",
                VIP_UNRESOLVED,
                VIP_PORT,
                IPPROTO_TCP,
                &[(UNRESOLVED_BACKEND, BACKEND_PORT)],
            ),
            frontend(
                "local",
                VIP_LOCAL,
                VIP_PORT,
                IPPROTO_TCP,
                &[(LOCAL_BACKEND, BACKEND_PORT)],
            ),
            frontend(
                "unrouted",
                VIP_UNROUTED,
                VIP_PORT,
                IPPROTO_TCP,
                &[(UNROUTED_BACKEND, BACKEND_PORT)],
            ),
            frontend(
                "gateway",
                VIP_GATEWAY,
                VIP_PORT,
                IPPROTO_TCP,
                &[(ROUTED_BACKEND, BACKEND_PORT)],
            ),
            frontend(
                "side",
                VIP_SIDE,
                VIP_PORT,
                IPPROTO_TCP,
                &[(SIDE_BACKEND, BACKEND_PORT)],
            ),
        ]);
        let (in0, out0, side0) = (lab.in0, lab.out0, lab.side0);
        assert_ne!(side0.index, out0.index);
        let syn = |port: u16, vip: Ipv4Addr| {
            Pkt::tcp((CLIENT, port), (vip, VIP_PORT), SYN).eth(CLIENT_MAC, in0.mac)
        };
        let at_route_mtu = |port: u16, extra: usize| {
            let payload = vec![0x5a; ROUTED_MTU - IPV4_HLEN - TCP_HLEN + extra];
            Pkt::tcp((CLIENT, port), (VIP_GATEWAY, VIP_PORT), PSH | ACK)
                .eth(CLIENT_MAC, in0.mac)
                .payload(&payload)
        };
        let redirected = syn(41_001, VIP_ROUTED);
        let ttl_two = syn(41_002, VIP_ROUTED).ttl(2);
        let ttl_one = syn(41_003, VIP_ROUTED).ttl(1);
        let unresolved = syn(41_004, VIP_UNRESOLVED);
        let local = syn(41_005, VIP_LOCAL);
        let local_reply = Pkt::tcp((LOCAL_BACKEND, BACKEND_PORT), (CLIENT, 41_005), SYN | ACK)
            .eth(LOCAL_BACKEND_MAC, in0.mac);
        let unrouted = syn(41_006, VIP_UNROUTED);
        let fits = at_route_mtu(41_007, 0);
        let too_big = at_route_mtu(41_008, 1);
        let too_big_no_df = at_route_mtu(41_013, 1).may_fragment();
        let too_big_expiring = at_route_mtu(41_014, 1).ttl(1);
        // Larger than the ingress link itself: what generic XDP sees of a GRO aggregate.
        let aggregate = at_route_mtu(41_015, AGGREGATE_EXTRA);
        let side = syn(41_009, VIP_SIDE);
        let reply = Pkt::tcp((BACKEND_A, BACKEND_PORT), (CLIENT, 41_001), SYN | ACK)
            .eth(BACKEND_A_MAC, out0.mac);
        let reply_ttl_one = reply.clone().ttl(1);
        let tagged = syn(41_010, VIP_ROUTED).tags(&[(TPID_8021Q, 100)]);
        let qinq = syn(41_011, VIP_ROUTED).tags(&[(TPID_8021AD, 100), (TPID_8021Q, 200)]);
        let tagged_reply = Pkt::tcp((BACKEND_A, BACKEND_PORT), (CLIENT, 41_010), SYN | ACK)
            .eth(BACKEND_A_MAC, out0.mac)
            .tags(&[(TPID_8021Q, 100)]);

        let to_a = |packet: &Pkt| packet.clone().to(BACKEND_A, BACKEND_PORT);
        let stack = |event| {
            vec![
                (Counter::StackService, 1),
                (event, 1),
                (Counter::FlowCreated, 1),
            ]
        };
        let redirect = vec![(Counter::RedirectService, 1), (Counter::FlowCreated, 1)];
        lab.check_all(&[
            Case {
                name: "FIB success: redirected with the neighbour's and out0's MACs",
                input: redirected.bytes(),
                ingress: in0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(to_a(&redirected).hop(out0.mac, BACKEND_A_MAC)),
                counters: redirect.clone(),
            },
            Case {
                name: "TTL 2 is still forwarded, leaving with TTL 1",
                input: ttl_two.bytes(),
                ingress: in0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(to_a(&ttl_two).hop(out0.mac, BACKEND_A_MAC)),
                counters: redirect.clone(),
            },
            Case {
                name: "TTL 1 goes to the stack translated, TTL and MACs untouched",
                input: ttl_one.bytes(),
                ingress: in0.index,
                action: XDP_PASS,
                output: Expect::Frame(to_a(&ttl_one)),
                counters: stack(Counter::StackTtlExceeded),
            },
            Case {
                name: "no neighbour entry",
                input: unresolved.bytes(),
                ingress: in0.index,
                action: XDP_PASS,
                output: Expect::Frame(unresolved.clone().to(UNRESOLVED_BACKEND, BACKEND_PORT)),
                counters: stack(Counter::StackNoNeighbour),
            },
            Case {
                name: "egress == ingress: XDP_TX",
                input: local.bytes(),
                ingress: in0.index,
                action: XDP_TX,
                output: Expect::Frame(
                    local
                        .clone()
                        .to(LOCAL_BACKEND, BACKEND_PORT)
                        .hop(in0.mac, LOCAL_BACKEND_MAC),
                ),
                counters: vec![(Counter::TxService, 1), (Counter::FlowCreated, 1)],
            },
            Case {
                name: "reply with egress == ingress: XDP_TX",
                input: local_reply.bytes(),
                ingress: in0.index,
                action: XDP_TX,
                output: Expect::Frame(
                    local_reply
                        .clone()
                        .from(VIP_LOCAL, VIP_PORT)
                        .hop(in0.mac, CLIENT_MAC),
                ),
                counters: vec![(Counter::TxReply, 1)],
            },
            Case {
                name: "no route to the backend",
                input: unrouted.bytes(),
                ingress: in0.index,
                action: XDP_PASS,
                output: Expect::Frame(unrouted.clone().to(UNROUTED_BACKEND, BACKEND_PORT)),
                counters: stack(Counter::StackNoRoute),
            },
            Case {
                name: "via a gateway at exactly the route MTU",
                input: fits.bytes(),
                ingress: in0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(
                    fits.clone()
                        .to(ROUTED_BACKEND, BACKEND_PORT)
                        .hop(out0.mac, BACKEND_A_MAC),
                ),
                counters: redirect.clone(),
            },
            Case {
                name: "one byte over the route MTU with DF: answered, quoted as sent",
                input: too_big.bytes(),
                ingress: in0.index,
                action: XDP_TX,
                output: Expect::Icmp(unreachable(
                    &too_big,
                    DestUnreachableHeader::FragmentationNeeded {
                        next_hop_mtu: ROUTED_MTU as u16,
                    },
                )),
                counters: vec![(Counter::RejectFragNeeded, 1), (Counter::FlowCreated, 1)],
            },
            Case {
                name: "too big with DF but TTL 1: the kernel answers time exceeded first",
                input: too_big_expiring.bytes(),
                ingress: in0.index,
                action: XDP_PASS,
                output: Expect::Frame(too_big_expiring.clone().to(ROUTED_BACKEND, BACKEND_PORT)),
                counters: stack(Counter::StackFragNeeded),
            },
            Case {
                name: "an aggregate larger than its ingress link: the kernel segments it",
                input: aggregate.bytes(),
                ingress: in0.index,
                action: XDP_PASS,
                output: Expect::Frame(aggregate.clone().to(ROUTED_BACKEND, BACKEND_PORT)),
                counters: stack(Counter::StackFragNeeded),
            },
            Case {
                name: "one byte over the route MTU without DF: the kernel fragments",
                input: too_big_no_df.bytes(),
                ingress: in0.index,
                action: XDP_PASS,
                output: Expect::Frame(too_big_no_df.clone().to(ROUTED_BACKEND, BACKEND_PORT)),
                counters: stack(Counter::StackFragNeeded),
            },
            Case {
                name: "egress not in LB_TX_PORTS: stack, not re-MACed",
                input: side.bytes(),
                ingress: in0.index,
                action: XDP_PASS,
                output: Expect::Frame(side.clone().to(SIDE_BACKEND, BACKEND_PORT)),
                counters: stack(Counter::StackNotTxPort),
            },
            Case {
                name: "reply redirected to the client",
                input: reply.bytes(),
                ingress: out0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(
                    reply
                        .clone()
                        .from(VIP_ROUTED, VIP_PORT)
                        .hop(in0.mac, CLIENT_MAC),
                ),
                counters: vec![(Counter::RedirectReply, 1)],
            },
            Case {
                name: "reply with TTL 1",
                input: reply_ttl_one.bytes(),
                ingress: out0.index,
                action: XDP_PASS,
                output: Expect::Frame(reply_ttl_one.clone().from(VIP_ROUTED, VIP_PORT)),
                counters: vec![(Counter::StackReply, 1), (Counter::StackTtlExceeded, 1)],
            },
            Case {
                name: "802.1Q-tagged: translated, left to the stack",
                input: tagged.bytes(),
                ingress: in0.index,
                action: XDP_PASS,
                output: Expect::Frame(to_a(&tagged)),
                counters: stack(Counter::StackVlan),
            },
            Case {
                name: "QinQ-tagged: translated, left to the stack",
                input: qinq.bytes(),
                ingress: in0.index,
                action: XDP_PASS,
                output: Expect::Frame(to_a(&qinq)),
                counters: stack(Counter::StackVlan),
            },
            Case {
                name: "802.1Q-tagged reply",
                input: tagged_reply.bytes(),
                ingress: out0.index,
                action: XDP_PASS,
                output: Expect::Frame(tagged_reply.clone().from(VIP_ROUTED, VIP_PORT)),
                counters: vec![(Counter::StackReply, 1), (Counter::StackVlan, 1)],
            },
        ]);

        // On a veth, XDP_TX would sit in the peer's queue: the packet leaves by a redirect into
        // the same interface instead (it is a TX port here), with the same rewrite.
        lab.set_iface_flags(in0, IFACE_LOCAL_SENDERS | IFACE_NO_XDP_TX);
        let local_on_veth = syn(41_012, VIP_LOCAL);
        lab.check(&Case {
            name: "egress == ingress on a veth: redirected, not XDP_TX",
            input: local_on_veth.bytes(),
            ingress: in0.index,
            action: XDP_REDIRECT,
            output: Expect::Frame(
                local_on_veth
                    .clone()
                    .to(LOCAL_BACKEND, BACKEND_PORT)
                    .hop(in0.mac, LOCAL_BACKEND_MAC),
            ),
            counters: redirect.clone(),
        });
    });
}

#[test]
fn backend_removed_by_reconcile_reselects_its_flows() {
    with_lab("backend_removed_by_reconcile_reselects_its_flows", |lab| {
        let backends = [
            (BACKEND_A, BACKEND_A_MAC),
            (BACKEND_B, BACKEND_B_MAC),
            (BACKEND_C, BACKEND_C_MAC),
        ];
        let web = |live: &[(Ipv4Addr, [u8; 6])]| {
            let addrs: Vec<(Ipv4Addr, u16)> =
                live.iter().map(|(addr, _)| (*addr, BACKEND_PORT)).collect();
            frontend("web", VIP, VIP_PORT, IPPROTO_TCP, &addrs)
        };
        lab.program(&[web(&backends)]);
        let in0 = lab.in0.index;
        let candidates = |lab: &Lab, packet: &Pkt| -> Vec<Pkt> {
            backends
                .iter()
                .map(|backend| to_backend(lab, packet, *backend, BACKEND_PORT))
                .collect()
        };
        const FLOW_PORT: u16 = 42_000;
        const FOLLOW_UPS: usize = 5;

        let syn = from_client(lab, Pkt::tcp((CLIENT, FLOW_PORT), (VIP, VIP_PORT), SYN));
        let new_flow = [(Counter::RedirectService, 1), (Counter::FlowCreated, 1)];
        let removed = lab.check_any("SYN", &syn, in0, &candidates(lab, &syn), &new_flow);

        // A second flow pinned to another backend, which the removal must not disturb.
        let mut bystander = None;
        for port in (FLOW_PORT + 1..).take(usize::from(MAX_NEW_FLOWS)) {
            let other = from_client(lab, Pkt::tcp((CLIENT, port), (VIP, VIP_PORT), SYN));
            let chosen = lab.check_any(
                "SYN of another flow",
                &other,
                in0,
                &candidates(lab, &other),
                &new_flow,
            );
            if chosen != removed {
                bystander = Some((port, chosen));
                break;
            }
        }
        let (bystander_port, bystander_backend) =
            bystander.expect("some flow landed on another backend");

        let remaining: Vec<(Ipv4Addr, [u8; 6])> = backends
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != removed)
            .map(|(_, backend)| *backend)
            .collect();
        lab.program(&[web(&remaining)]);
        let (_, live) = lab.resolve(&web(&remaining));
        assert_eq!(live.len(), 2);
        let flows_before = lab.conntrack().len();

        let ack = from_client(lab, Pkt::tcp((CLIENT, FLOW_PORT), (VIP, VIP_PORT), ACK));
        let reselected = lab.check_any(
            "ACK after its backend was removed",
            &ack,
            in0,
            &candidates(lab, &ack),
            &[
                (Counter::RedirectService, 1),
                (Counter::FlowReselected, 1),
                (Counter::FlowCreated, 1),
            ],
        );
        assert_ne!(
            reselected, removed,
            "the flow still goes to the removed backend"
        );
        let (new_addr, _) = backends[reselected];
        let (old_addr, old_mac) = backends[removed];

        let table = lab.conntrack();
        assert_eq!(
            table.len(),
            flows_before,
            "the flow's entries were replaced, not added"
        );
        let original = table[&flow_key(
            (CLIENT, FLOW_PORT),
            (VIP, VIP_PORT),
            IPPROTO_TCP,
            DIRECTION_ORIGINAL,
        )];
        assert_eq!(
            (original.nat_addr, original.nat_port, original.backend_id),
            (
                wire_addr(new_addr),
                wire_port(BACKEND_PORT),
                lab.backend_id(&web(&remaining), new_addr, BACKEND_PORT)
            )
        );
        let reply_key = |addr| {
            flow_key(
                (addr, BACKEND_PORT),
                (CLIENT, FLOW_PORT),
                IPPROTO_TCP,
                DIRECTION_REPLY,
            )
        };
        assert!(
            !table.contains_key(&reply_key(old_addr)),
            "the removed backend's reply entry must go"
        );
        let reply = table.get(&reply_key(new_addr)).expect("new reply entry");
        assert_eq!(
            (reply.nat_addr, reply.nat_port),
            (wire_addr(VIP), wire_port(VIP_PORT))
        );

        // A stray packet from the removed backend is no longer translated.
        let out0 = lab.out0.index;
        let stray =
            Pkt::tcp((old_addr, BACKEND_PORT), (CLIENT, FLOW_PORT), ACK).eth(old_mac, lab.out0.mac);
        lab.check(&Case {
            name: "stray reply from the removed backend",
            input: stray.bytes(),
            ingress: out0,
            action: XDP_PASS,
            output: Expect::Unchanged,
            counters: vec![(Counter::PassNoService, 1)],
        });

        for _ in 0..FOLLOW_UPS {
            let again = lab.check_any(
                "ACK after re-selection",
                &ack,
                in0,
                &candidates(lab, &ack),
                &[(Counter::RedirectService, 1)],
            );
            assert_eq!(again, reselected, "the re-selected flow must stick");
            let bystander_ack = from_client(
                lab,
                Pkt::tcp((CLIENT, bystander_port), (VIP, VIP_PORT), ACK),
            );
            let kept = lab.check_any(
                "ACK of the bystander flow",
                &bystander_ack,
                in0,
                &candidates(lab, &bystander_ack),
                &[(Counter::RedirectService, 1)],
            );
            assert_eq!(kept, bystander_backend, "an unaffected flow moved");
        }
    });
}

#[test]
fn new_connection_on_a_closed_tuple_is_reselected() {
    with_lab("new_connection_on_a_closed_tuple_is_reselected", |lab| {
        let web = frontend(
            "web",
            VIP,
            VIP_PORT,
            IPPROTO_TCP,
            &[(BACKEND_A, BACKEND_PORT)],
        );
        lab.program(std::slice::from_ref(&web));
        let (in0, out0) = (lab.in0, lab.out0);
        let backend_id = lab.backend_id(&web, BACKEND_A, BACKEND_PORT);

        for (port, closing_flags, seen) in [(43_000, FIN | ACK, SEEN_FIN), (43_001, RST, SEEN_RST)]
        {
            let packet = |flags: u8| {
                Pkt::tcp((CLIENT, port), (VIP, VIP_PORT), flags).eth(CLIENT_MAC, in0.mac)
            };
            let case = |name, flags, counters: &[(Counter, u64)]| {
                let input = packet(flags);
                Case {
                    name,
                    input: input.bytes(),
                    ingress: in0.index,
                    action: XDP_REDIRECT,
                    output: Expect::Frame(
                        input
                            .clone()
                            .to(BACKEND_A, BACKEND_PORT)
                            .hop(out0.mac, BACKEND_A_MAC),
                    ),
                    counters: counters.to_vec(),
                }
            };
            let original_key = flow_key(
                (CLIENT, port),
                (VIP, VIP_PORT),
                IPPROTO_TCP,
                DIRECTION_ORIGINAL,
            );
            let reply_key = flow_key(
                (BACKEND_A, BACKEND_PORT),
                (CLIENT, port),
                IPPROTO_TCP,
                DIRECTION_REPLY,
            );
            let entry = |lab: &Lab| lab.conntrack()[&original_key];
            let forwarded = [(Counter::RedirectService, 1)];

            lab.check(&case(
                "SYN",
                SYN,
                &[(Counter::RedirectService, 1), (Counter::FlowCreated, 1)],
            ));
            let first = entry(lab);
            assert_eq!(first.tcp_flags, 0);
            lab.check(&case("SYN retransmitted on the open flow", SYN, &forwarded));
            assert_eq!(
                entry(lab).created_ns,
                first.created_ns,
                "an open flow is kept"
            );
            lab.check(&case("closing segment", closing_flags, &forwarded));
            assert_eq!(entry(lab).tcp_flags, seen, "the close is recorded");
            lab.check(&case("ACK after the close", ACK, &forwarded));
            lab.check(&case("SYN-ACK after the close", SYN | ACK, &forwarded));
            assert_eq!(
                entry(lab).created_ns,
                first.created_ns,
                "only a SYN reopens"
            );

            lab.check(&case(
                "new SYN on the closed tuple",
                SYN,
                &[
                    (Counter::RedirectService, 1),
                    (Counter::FlowReselected, 1),
                    (Counter::FlowCreated, 1),
                ],
            ));
            let reopened = entry(lab);
            assert!(
                reopened.created_ns > first.created_ns,
                "the entry was not recreated"
            );
            assert_eq!(
                reopened,
                FlowState {
                    tcp_flags: 0,
                    created_ns: reopened.created_ns,
                    last_seen_ns: reopened.created_ns,
                    ..first
                }
            );
            assert_eq!(reopened.backend_id, backend_id);
            let reply = lab.conntrack()[&reply_key];
            assert_eq!(
                (reply.nat_addr, reply.tcp_flags, reply.created_ns),
                (wire_addr(VIP), 0, reopened.created_ns)
            );
            lab.check(&case("SYN retransmitted on the new flow", SYN, &forwarded));
        }

        // A flow first seen on its closing segment (picked up mid-stream, say after its entry was
        // evicted) is closed from the start: the next SYN starts afresh.
        const PICKED_UP_PORT: u16 = 43_002;
        let packet = |flags: u8| {
            Pkt::tcp((CLIENT, PICKED_UP_PORT), (VIP, VIP_PORT), flags).eth(CLIENT_MAC, in0.mac)
        };
        let translated = |packet: &Pkt| {
            packet
                .clone()
                .to(BACKEND_A, BACKEND_PORT)
                .hop(out0.mac, BACKEND_A_MAC)
        };
        let (fin, syn) = (packet(FIN | ACK), packet(SYN));
        lab.check(&Case {
            name: "FIN of an untracked flow",
            input: fin.bytes(),
            ingress: in0.index,
            action: XDP_REDIRECT,
            output: Expect::Frame(translated(&fin)),
            counters: vec![(Counter::RedirectService, 1), (Counter::FlowCreated, 1)],
        });
        let table = lab.conntrack();
        for key in [
            flow_key(
                (CLIENT, PICKED_UP_PORT),
                (VIP, VIP_PORT),
                IPPROTO_TCP,
                DIRECTION_ORIGINAL,
            ),
            flow_key(
                (BACKEND_A, BACKEND_PORT),
                (CLIENT, PICKED_UP_PORT),
                IPPROTO_TCP,
                DIRECTION_REPLY,
            ),
        ] {
            assert_eq!(table[&key].tcp_flags, SEEN_FIN, "{key:?}");
        }
        lab.check(&Case {
            name: "SYN after a picked-up FIN",
            input: syn.bytes(),
            ingress: in0.index,
            action: XDP_REDIRECT,
            output: Expect::Frame(translated(&syn)),
            counters: vec![
                (Counter::RedirectService, 1),
                (Counter::FlowReselected, 1),
                (Counter::FlowCreated, 1),
            ],
        });
    });
}

// ---------------------------------------------------------------------------------------------
// The two entries of a flow share liveness and close state.

/// Idle time that expires a UDP flow (it lives `UDP_LIFETIME_NS`, 120 s), with a margin.
const LONG_IDLE_NS: u64 = UDP_LIFETIME_NS + 10 * 1_000_000_000;
/// Idle time past the refresh interval but within every lifetime.
const SHORT_IDLE_NS: u64 = 2 * 1_000_000_000;

impl Lab {
    /// Moves a conntrack entry's last activity `idle_ns` into the past.
    fn age(&self, key: &FlowKey, idle_ns: u64) {
        // The clock starts at boot and the dataplane's idle time saturates at zero, so an idle
        // time longer than the uptime cannot be written: on a machine booted moments ago (a fresh
        // CI machine), wait until the clock has run that far.
        let uptime_ns = monotonic_ns();
        if uptime_ns <= idle_ns {
            let wait = std::time::Duration::from_nanos(idle_ns - uptime_ns + 1_000_000_000);
            eprintln!("the machine booted {uptime_ns} ns ago; waiting {wait:?} to age a flow");
            std::thread::sleep(wait);
        }
        let mut table = open_conntrack(&self.pin_dir).expect("opening LB_CONNTRACK");
        let mut state = table.get(key, 0).expect("the entry exists");
        state.last_seen_ns = monotonic_ns() - idle_ns;
        table.insert(key, state, 0).expect("ageing the entry");
    }
}

#[test]
fn an_expired_flow_is_translated_neither_way() {
    with_lab("an_expired_flow_is_translated_neither_way", |lab| {
        lab.program(&[frontend(
            "dns",
            VIP,
            DNS_PORT,
            IPPROTO_UDP,
            &[(BACKEND_A, BACKEND_DNS_PORT)],
        )]);
        let (in0, out0) = (lab.in0, lab.out0);
        const PORT: u16 = 44_997;
        let query = from_client(lab, Pkt::udp((CLIENT, PORT), (VIP, DNS_PORT)));
        let answer =
            Pkt::udp((BACKEND_A, BACKEND_DNS_PORT), (CLIENT, PORT)).eth(BACKEND_A_MAC, out0.mac);
        lab.check(&Case {
            name: "query",
            input: query.bytes(),
            ingress: in0.index,
            action: XDP_REDIRECT,
            output: Expect::Frame(to_backend(
                lab,
                &query,
                (BACKEND_A, BACKEND_A_MAC),
                BACKEND_DNS_PORT,
            )),
            counters: vec![(Counter::RedirectService, 1), (Counter::FlowCreated, 1)],
        });
        let original = flow_key(
            (CLIENT, PORT),
            (VIP, DNS_PORT),
            IPPROTO_UDP,
            DIRECTION_ORIGINAL,
        );
        let reply = flow_key(
            (BACKEND_A, BACKEND_DNS_PORT),
            (CLIENT, PORT),
            IPPROTO_UDP,
            DIRECTION_REPLY,
        );
        lab.age(&original, LONG_IDLE_NS);
        lab.age(&reply, LONG_IDLE_NS);
        // The tuple may now carry traffic that has nothing to do with the Service, e.g. the
        // client talking to the pod directly from the same port: it must not be rewritten.
        lab.check(&Case {
            name: "a packet from the backend on an expired flow",
            input: answer.bytes(),
            ingress: out0.index,
            action: XDP_PASS,
            output: Expect::Unchanged,
            counters: vec![(Counter::PassNoService, 1)],
        });
        assert!(
            !lab.conntrack().contains_key(&reply),
            "the expired reply entry is deleted"
        );
    });
}

#[test]
fn either_direction_keeps_the_flow_alive() {
    with_lab("either_direction_keeps_the_flow_alive", |lab| {
        lab.program(&[frontend(
            "dns",
            VIP,
            DNS_PORT,
            IPPROTO_UDP,
            &[(BACKEND_A, BACKEND_DNS_PORT), (BACKEND_B, BACKEND_DNS_PORT)],
        )]);
        let (in0, out0) = (lab.in0, lab.out0);
        const PORT: u16 = 45_001;
        let query = from_client(lab, Pkt::udp((CLIENT, PORT), (VIP, DNS_PORT)));
        lab.dataplane
            .test_run(&query.bytes(), in0.index)
            .expect("first query");
        let original = flow_key(
            (CLIENT, PORT),
            (VIP, DNS_PORT),
            IPPROTO_UDP,
            DIRECTION_ORIGINAL,
        );
        let chosen = lab.conntrack()[&original];
        let (backend, backend_mac) = if chosen.nat_addr == wire_addr(BACKEND_A) {
            (BACKEND_A, BACKEND_A_MAC)
        } else {
            (BACKEND_B, BACKEND_B_MAC)
        };
        let reply = flow_key(
            (backend, BACKEND_DNS_PORT),
            (CLIENT, PORT),
            IPPROTO_UDP,
            DIRECTION_REPLY,
        );
        // Only the backend has spoken lately (a server pushing datagrams): the client's own entry
        // is past its lifetime, the reply entry is due for a refresh.
        lab.age(&original, LONG_IDLE_NS);
        lab.age(&reply, SHORT_IDLE_NS);
        let push = Pkt::udp((backend, BACKEND_DNS_PORT), (CLIENT, PORT)).eth(backend_mac, out0.mac);
        lab.check(&Case {
            name: "the backend pushes a datagram",
            input: push.bytes(),
            ingress: out0.index,
            action: XDP_REDIRECT,
            output: Expect::Frame(push.clone().from(VIP, DNS_PORT).hop(in0.mac, CLIENT_MAC)),
            counters: vec![(Counter::RedirectReply, 1)],
        });
        let now = monotonic_ns();
        let table = lab.conntrack();
        assert!(
            now - table[&original].last_seen_ns < SHORT_IDLE_NS,
            "the reply refreshed the client's entry too"
        );
        lab.check(&Case {
            name: "the client speaks again and keeps its backend",
            input: query.bytes(),
            ingress: in0.index,
            action: XDP_REDIRECT,
            output: Expect::Frame(to_backend(
                lab,
                &query,
                (backend, backend_mac),
                BACKEND_DNS_PORT,
            )),
            counters: vec![(Counter::RedirectService, 1)],
        });
    });
}

#[test]
fn a_reset_from_the_backend_closes_the_flow_for_the_client() {
    with_lab(
        "a_reset_from_the_backend_closes_the_flow_for_the_client",
        |lab| {
            let web = frontend(
                "web",
                VIP,
                VIP_PORT,
                IPPROTO_TCP,
                &[(BACKEND_A, BACKEND_PORT)],
            );
            lab.program(std::slice::from_ref(&web));
            let (in0, out0) = (lab.in0, lab.out0);
            const PORT: u16 = 46_000;
            let syn = from_client(lab, Pkt::tcp((CLIENT, PORT), (VIP, VIP_PORT), SYN));
            let dnat = to_backend(lab, &syn, (BACKEND_A, BACKEND_A_MAC), BACKEND_PORT);
            lab.check(&Case {
                name: "SYN",
                input: syn.bytes(),
                ingress: in0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(dnat.clone()),
                counters: vec![(Counter::RedirectService, 1), (Counter::FlowCreated, 1)],
            });
            let reset = Pkt::tcp((BACKEND_A, BACKEND_PORT), (CLIENT, PORT), RST | ACK)
                .eth(BACKEND_A_MAC, out0.mac);
            lab.check(&Case {
                name: "the backend resets the connection",
                input: reset.bytes(),
                ingress: out0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(reset.clone().from(VIP, VIP_PORT).hop(in0.mac, CLIENT_MAC)),
                counters: vec![(Counter::RedirectReply, 1)],
            });
            let original = flow_key(
                (CLIENT, PORT),
                (VIP, VIP_PORT),
                IPPROTO_TCP,
                DIRECTION_ORIGINAL,
            );
            assert_eq!(
                lab.conntrack()[&original].tcp_flags,
                SEEN_REPLY | SEEN_RST,
                "the client's entry learns of the reset (a reply)"
            );
            lab.check(&Case {
                name: "the client's new connection on the same tuple is a new flow",
                input: syn.bytes(),
                ingress: in0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(dnat),
                counters: vec![
                    (Counter::RedirectService, 1),
                    (Counter::FlowReselected, 1),
                    (Counter::FlowCreated, 1),
                ],
            });
        },
    );
}

#[test]
fn a_flow_whose_service_lost_every_endpoint_is_rejected_not_reselected() {
    with_lab(
        "a_flow_whose_service_lost_every_endpoint_is_rejected_not_reselected",
        |lab| {
            let web = |backends: &[(Ipv4Addr, u16)]| {
                frontend("web", VIP, VIP_PORT, IPPROTO_TCP, backends)
            };
            lab.program(&[web(&[(BACKEND_A, BACKEND_PORT)])]);
            let in0 = lab.in0;
            let ack = from_client(lab, Pkt::tcp((CLIENT, 47_000), (VIP, VIP_PORT), ACK));
            lab.dataplane
                .test_run(&ack.bytes(), in0.index)
                .expect("first packet");
            lab.program(&[web(&[])]);
            for attempt in ["first", "second"] {
                lab.check(&Case {
                    name: if attempt == "first" {
                        "the flow's next packet"
                    } else {
                        "and the one after"
                    },
                    input: ack.bytes(),
                    ingress: in0.index,
                    action: XDP_TX,
                    output: Expect::Icmp(port_unreachable(&ack)),
                    counters: vec![(Counter::RejectNoEndpoints, 1)],
                });
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Interface kinds, tuple collisions, reopened tuples.

#[test]
fn a_checksum_that_only_looks_partial_is_complete_on_a_nic() {
    with_lab(
        "a_checksum_that_only_looks_partial_is_complete_on_a_nic",
        |lab| {
            lab.program(&[frontend(
                "dns",
                VIP,
                DNS_PORT,
                IPPROTO_UDP,
                &[(BACKEND_A, BACKEND_DNS_PORT)],
            )]);
            let in0 = lab.in0;
            const PORT: u16 = 48_000;
            // A UDP datagram whose complete, valid checksum happens to equal the folded
            // pseudo-header sum, the value a partial checksum holds (1 datagram in 65,536 does).
            let payload_len = 10;
            let partial = from_client(
                lab,
                Pkt::udp((CLIENT, PORT), (VIP, DNS_PORT))
                    .payload(&vec![0; payload_len])
                    .check(Check::Partial),
            );
            let mut frame = partial.bytes();
            let udp = ETH_HLEN + IPV4_HLEN;
            let l4_len = UDP_HLEN + payload_len;
            let pseudo = pseudo_header_sum(CLIENT, VIP, IPPROTO_UDP, l4_len);
            // Pick the first payload word so that the whole sum is all ones.
            let rest = fold(sum_words(pseudo, &frame[udp..udp + l4_len]));
            let word = !rest;
            frame[udp + UDP_HLEN..udp + UDP_HLEN + 2].copy_from_slice(&word.to_be_bytes());
            assert_eq!(
                fold(sum_words(pseudo, &frame[udp..udp + l4_len])),
                0xffff,
                "the datagram's checksum is complete and valid"
            );
            let mut payload = vec![0; payload_len];
            payload[..2].copy_from_slice(&word.to_be_bytes());
            let complete = from_client(
                lab,
                Pkt::udp((CLIENT, PORT), (VIP, DNS_PORT)).payload(&payload),
            );
            assert_eq!(
                complete.bytes(),
                frame,
                "the same datagram, built independently"
            );

            // From a NIC: a complete checksum, fully updated, forwarded by XDP.
            lab.set_iface_flags(in0, 0);
            lab.check(&Case {
                name: "from a NIC",
                input: frame.clone(),
                ingress: in0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(to_backend(
                    lab,
                    &complete,
                    (BACKEND_A, BACKEND_A_MAC),
                    BACKEND_DNS_PORT,
                )),
                counters: vec![(Counter::RedirectService, 1), (Counter::FlowCreated, 1)],
            });
            // From a veth the value is taken for a partial checksum (the documented 2^-16 risk
            // that remains where local sockets send).
            lab.set_iface_flags(in0, IFACE_LOCAL_SENDERS);
            let run = lab.dataplane.test_run(&frame, in0.index).expect("test_run");
            assert_eq!(action_name(run.action), action_name(XDP_PASS));
        },
    );
}

#[test]
fn a_new_flow_avoids_a_tuple_taken_through_another_service() {
    with_lab(
        "a_new_flow_avoids_a_tuple_taken_through_another_service",
        |lab| {
            // Two Services sharing endpoints; a client reusing one source port for both.
            let shared = [(BACKEND_A, BACKEND_PORT), (BACKEND_B, BACKEND_PORT)];
            let api = frontend("api", VIP, VIP_PORT, IPPROTO_TCP, &shared);
            let internal = frontend("api-internal", OTHER_VIP, VIP_PORT, IPPROTO_TCP, &shared);
            let lonely = frontend(
                "lonely",
                OTHER_VIP,
                DNS_PORT,
                IPPROTO_TCP,
                &[(BACKEND_A, BACKEND_PORT)],
            );
            lab.program(&[api, internal, lonely]);
            let in0 = lab.in0;
            let backend_of = |lab: &Lab, vip: Ipv4Addr, vip_port: u16, port: u16| {
                let key = flow_key(
                    (CLIENT, port),
                    (vip, vip_port),
                    IPPROTO_TCP,
                    DIRECTION_ORIGINAL,
                );
                lab.conntrack()[&key].nat_addr
            };
            for port in 49_000..49_020 {
                let first = from_client(lab, Pkt::tcp((CLIENT, port), (VIP, VIP_PORT), SYN));
                lab.dataplane
                    .test_run(&first.bytes(), in0.index)
                    .expect("run");
                let taken = backend_of(lab, VIP, VIP_PORT, port);
                let second = from_client(lab, Pkt::tcp((CLIENT, port), (OTHER_VIP, VIP_PORT), SYN));
                let run = lab
                    .dataplane
                    .test_run(&second.bytes(), in0.index)
                    .expect("run");
                assert_eq!(action_name(run.action), action_name(XDP_REDIRECT));
                assert_ne!(
                    backend_of(lab, OTHER_VIP, VIP_PORT, port),
                    taken,
                    "port {port}: both flows would be one connection at the backend"
                );
                // Each flow's replies still come back from its own Service.
                for (vip, backend) in [
                    (VIP, taken),
                    (OTHER_VIP, backend_of(lab, OTHER_VIP, VIP_PORT, port)),
                ] {
                    let reply_key = FlowKey {
                        src_addr: backend,
                        dst_addr: wire_addr(CLIENT),
                        src_port: wire_port(BACKEND_PORT),
                        dst_port: wire_port(port),
                        proto: IPPROTO_TCP,
                        direction: DIRECTION_REPLY,
                        _pad: [0; 2],
                    };
                    assert_eq!(lab.conntrack()[&reply_key].nat_addr, wire_addr(vip));
                }
            }
            // With one endpoint only, the second flow cannot avoid the taken tuple: it is dropped,
            // not allowed to hijack the first flow's replies. Find a port whose flow took A.
            let port = (49_100..49_100 + MAX_NEW_FLOWS)
                .find(|port| {
                    let first = from_client(lab, Pkt::tcp((CLIENT, *port), (VIP, VIP_PORT), SYN));
                    lab.dataplane
                        .test_run(&first.bytes(), in0.index)
                        .expect("run");
                    backend_of(lab, VIP, VIP_PORT, *port) == wire_addr(BACKEND_A)
                })
                .expect("some flow lands on backend A");
            let clash = from_client(lab, Pkt::tcp((CLIENT, port), (OTHER_VIP, DNS_PORT), SYN));
            lab.check(&Case {
                name: "the only endpoint's tuple is taken",
                input: clash.bytes(),
                ingress: in0.index,
                action: XDP_DROP,
                output: Expect::Unchanged,
                counters: vec![(Counter::DropTupleCollision, 1)],
            });
        },
    );
}

#[test]
fn a_backend_opening_a_connection_on_a_closed_tuple_is_not_translated() {
    with_lab(
        "a_backend_opening_a_connection_on_a_closed_tuple_is_not_translated",
        |lab| {
            let web = frontend(
                "web",
                VIP,
                VIP_PORT,
                IPPROTO_TCP,
                &[(BACKEND_A, BACKEND_PORT)],
            );
            lab.program(std::slice::from_ref(&web));
            let (in0, out0) = (lab.in0, lab.out0);
            const PORT: u16 = 50_000;
            let fin = from_client(lab, Pkt::tcp((CLIENT, PORT), (VIP, VIP_PORT), FIN | ACK));
            lab.dataplane
                .test_run(&fin.bytes(), in0.index)
                .expect("run");
            // The client now talks to the pod directly from the same port: the pod's SYN-ACK
            // must reach it unchanged, not disguised as the Service.
            let syn_ack = Pkt::tcp((BACKEND_A, BACKEND_PORT), (CLIENT, PORT), SYN | ACK)
                .eth(BACKEND_A_MAC, out0.mac);
            lab.check(&Case {
                name: "SYN-ACK of a direct connection",
                input: syn_ack.bytes(),
                ingress: out0.index,
                action: XDP_PASS,
                output: Expect::Unchanged,
                counters: vec![(Counter::PassNoService, 1)],
            });
            let reply_key = flow_key(
                (BACKEND_A, BACKEND_PORT),
                (CLIENT, PORT),
                IPPROTO_TCP,
                DIRECTION_REPLY,
            );
            assert!(!lab.conntrack().contains_key(&reply_key));
        },
    );
}

#[test]
fn a_draining_backend_keeps_its_flows_and_gets_no_new_ones() {
    with_lab(
        "a_draining_backend_keeps_its_flows_and_gets_no_new_ones",
        |lab| {
            let endpoints = [(BACKEND_A, BACKEND_PORT), (BACKEND_B, BACKEND_PORT)];
            let web = frontend("web", VIP, VIP_PORT, IPPROTO_TCP, &endpoints);
            lab.program(std::slice::from_ref(&web));
            let in0 = lab.in0;
            let backend_of = |lab: &Lab, port: u16| {
                let key = flow_key(
                    (CLIENT, port),
                    (VIP, VIP_PORT),
                    IPPROTO_TCP,
                    DIRECTION_ORIGINAL,
                );
                lab.conntrack()[&key].nat_addr
            };
            // An established flow on A.
            let port = (51_000..51_000 + MAX_NEW_FLOWS)
                .find(|port| {
                    let syn = from_client(lab, Pkt::tcp((CLIENT, *port), (VIP, VIP_PORT), SYN));
                    lab.dataplane
                        .test_run(&syn.bytes(), in0.index)
                        .expect("run");
                    backend_of(lab, *port) == wire_addr(BACKEND_A)
                })
                .expect("some flow lands on A");

            // A stops being ready (a failing probe, or its pod terminating).
            let drained = Frontend {
                backends: vec![BackendAddr {
                    addr: BACKEND_B,
                    port: BACKEND_PORT,
                    remote: false,
                }],
                draining: vec![BackendAddr {
                    addr: BACKEND_A,
                    port: BACKEND_PORT,
                    remote: false,
                }],
                ..web.clone()
            };
            lab.program(std::slice::from_ref(&drained));
            let ack = from_client(lab, Pkt::tcp((CLIENT, port), (VIP, VIP_PORT), ACK));
            lab.check(&Case {
                name: "the established flow keeps its draining backend",
                input: ack.bytes(),
                ingress: in0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(to_backend(
                    lab,
                    &ack,
                    (BACKEND_A, BACKEND_A_MAC),
                    BACKEND_PORT,
                )),
                counters: vec![(Counter::RedirectService, 1)],
            });
            for new_port in 52_000..52_000 + MAX_NEW_FLOWS {
                let syn = from_client(lab, Pkt::tcp((CLIENT, new_port), (VIP, VIP_PORT), SYN));
                lab.dataplane
                    .test_run(&syn.bytes(), in0.index)
                    .expect("run");
                assert_eq!(
                    backend_of(lab, new_port),
                    wire_addr(BACKEND_B),
                    "a new flow got the draining backend"
                );
            }

            // A leaves the slice: its established flow moves on (and TCP resets there).
            let gone = Frontend {
                draining: Vec::new(),
                ..drained
            };
            lab.program(std::slice::from_ref(&gone));
            lab.check(&Case {
                name: "the flow of a removed endpoint is re-selected",
                input: ack.bytes(),
                ingress: in0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(to_backend(
                    lab,
                    &ack,
                    (BACKEND_B, BACKEND_B_MAC),
                    BACKEND_PORT,
                )),
                counters: vec![
                    (Counter::RedirectService, 1),
                    (Counter::FlowReselected, 1),
                    (Counter::FlowCreated, 1),
                ],
            });
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Rejects and service-CIDR drops.

/// `10.96.0.0/12`, the lab's service CIDR, as the datapath stores it.
fn lab_service_cidr() -> Cidr {
    const PREFIX: u32 = 12;
    let mask = u32::MAX << (32 - PREFIX);
    Cidr {
        addr: wire_addr(Ipv4Addr::from(u32::from(VIP) & mask)),
        mask: mask.to_be(),
    }
}

fn lab_config(rejects_per_second: u32) -> DataplaneConfig {
    let mut config = DataplaneConfig {
        service_cidr_count: 1,
        rejects_per_second,
        ..DataplaneConfig::default()
    };
    config.service_cidrs[0] = lab_service_cidr();
    config
}

#[test]
fn packets_a_service_cannot_take_are_rejected_or_dropped_like_kube_proxy() {
    with_lab(
        "packets_a_service_cannot_take_are_rejected_or_dropped_like_kube_proxy",
        |lab| {
            const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
            const LOCAL_ONLY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 33);
            const UNALLOCATED: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);
            const OUTSIDE_SERVICE_CIDR: Ipv4Addr = Ipv4Addr::new(10, 2, 2, 9);
            const UNDEFINED_PORT: u16 = 443;
            const MULTICAST: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 9);
            const BROADCAST_MAC: [u8; 6] = [0xff; 6];
            /// An IPv4 option (NOP, NOP, NOP, end of list) to be quoted with the header.
            const NOPS: [u8; 4] = [1, 1, 1, 0];
            let frontends = [
                frontend("empty", EMPTY_VIP, VIP_PORT, IPPROTO_TCP, &[]),
                frontend("empty", EMPTY_VIP, DNS_PORT, IPPROTO_UDP, &[]),
                Frontend {
                    drop_when_empty: true,
                    ..frontend("local", LOCAL_ONLY_VIP, VIP_PORT, IPPROTO_TCP, &[])
                },
                frontend(
                    "web",
                    VIP,
                    VIP_PORT,
                    IPPROTO_TCP,
                    &[(BACKEND_A, BACKEND_PORT)],
                ),
            ];
            lab.program_state(&DesiredState {
                frontends: frontends.iter().map(|f| (f.key(), f.clone())).collect(),
                cluster_ips: [VIP, EMPTY_VIP, LOCAL_ONLY_VIP].into_iter().collect(),
            });
            assert_eq!(
                lab.maps.services.get(&frontends[2].key(), 0).unwrap().flags,
                SERVICE_DROP_WHEN_EMPTY
            );
            lab.dataplane
                .configure(&lab_config(0))
                .expect("configuring the dataplane");

            let in0 = lab.in0.index;
            let reject = |name, input: Pkt, counter| Case {
                name,
                input: input.bytes(),
                ingress: in0,
                action: XDP_TX,
                output: Expect::Icmp(port_unreachable(&input)),
                counters: vec![(counter, 1)],
            };
            let drop = |name, input: Pkt, counter| Case {
                name,
                input: input.bytes(),
                ingress: in0,
                action: XDP_DROP,
                output: Expect::Unchanged,
                counters: vec![(counter, 1)],
            };
            let router_mac = lab.in0.mac;
            let tcp = |dst: (Ipv4Addr, u16)| {
                Pkt::tcp((CLIENT, 41_000), dst, SYN).eth(CLIENT_MAC, router_mac)
            };
            let udp = |dst: (Ipv4Addr, u16)| {
                Pkt::udp((CLIENT, 41_001), dst)
                    .payload(b"query")
                    .eth(CLIENT_MAC, router_mac)
            };
            lab.check_all(&[
                reject(
                    "TCP to a Service without endpoints",
                    tcp((EMPTY_VIP, VIP_PORT)),
                    Counter::RejectNoEndpoints,
                ),
                reject(
                    "UDP to a Service without endpoints, padded frame",
                    udp((EMPTY_VIP, DNS_PORT)).padding(&[0; 6]),
                    Counter::RejectNoEndpoints,
                ),
                reject(
                    "QinQ-tagged: answered in the same VLANs",
                    tcp((EMPTY_VIP, VIP_PORT)).tags(&[(TPID_8021AD, 100), (TPID_8021Q, 200)]),
                    Counter::RejectNoEndpoints,
                ),
                reject(
                    "IPv4 options: quoted with the header",
                    tcp((EMPTY_VIP, VIP_PORT)).ip_options(&NOPS),
                    Counter::RejectNoEndpoints,
                ),
                reject(
                    "a partial checksum is quoted as it is",
                    tcp((EMPTY_VIP, VIP_PORT)).check(Check::Partial),
                    Counter::RejectNoEndpoints,
                ),
                reject(
                    "TCP to a ClusterIP on a port its Service does not define",
                    tcp((VIP, UNDEFINED_PORT)),
                    Counter::RejectUndefinedPort,
                ),
                reject(
                    "UDP to a ClusterIP on a port its Service does not define",
                    udp((VIP, DNS_PORT)),
                    Counter::RejectUndefinedPort,
                ),
                drop(
                    "no local endpoint under a Local policy",
                    tcp((LOCAL_ONLY_VIP, VIP_PORT)),
                    Counter::DropNoLocalEndpoint,
                ),
                drop(
                    "to an unallocated address of the service CIDR",
                    tcp((UNALLOCATED, VIP_PORT)),
                    Counter::DropUnallocatedServiceIp,
                ),
                drop(
                    "from a multicast source: never answered",
                    tcp((EMPTY_VIP, VIP_PORT)).from(MULTICAST, 41_000),
                    Counter::DropRejectNotUnicast,
                ),
                drop(
                    "from 0.0.0.0: never answered",
                    tcp((EMPTY_VIP, VIP_PORT)).from(Ipv4Addr::UNSPECIFIED, 41_000),
                    Counter::DropRejectNotUnicast,
                ),
                drop(
                    "to the broadcast MAC: never answered",
                    tcp((EMPTY_VIP, VIP_PORT)).eth(CLIENT_MAC, BROADCAST_MAC),
                    Counter::DropRejectNotUnicast,
                ),
                Case {
                    name: "outside the service CIDR and no ClusterIP: left to the kernel",
                    input: tcp((OUTSIDE_SERVICE_CIDR, VIP_PORT)).bytes(),
                    ingress: in0,
                    action: XDP_PASS,
                    output: Expect::Unchanged,
                    counters: vec![(Counter::PassNoService, 1)],
                },
            ]);
            assert!(
                lab.conntrack().is_empty(),
                "rejected and dropped packets create no flows"
            );

            // On veths: a redirect back into the veth, or (not a TX port) the kernel stack, which
            // forwards the answer still addressed to this node.
            let (in0_iface, side0) = (lab.in0, lab.side0);
            lab.set_iface_flags(in0_iface, IFACE_LOCAL_SENDERS | IFACE_NO_XDP_TX);
            lab.set_iface_flags(side0, IFACE_LOCAL_SENDERS | IFACE_NO_XDP_TX);
            let on_veth = tcp((EMPTY_VIP, VIP_PORT));
            let on_side = Pkt::tcp((SIDE_BACKEND, 41_002), (EMPTY_VIP, VIP_PORT), SYN)
                .eth(SIDE_BACKEND_MAC, side0.mac);
            let mut via_stack = port_unreachable(&on_side);
            via_stack[..6].copy_from_slice(&side0.mac);
            via_stack[6..12].copy_from_slice(&SIDE_BACKEND_MAC);
            lab.check_all(&[
                Case {
                    action: XDP_REDIRECT,
                    ..reject(
                        "on a veth that is a TX port: redirected",
                        on_veth,
                        Counter::RejectNoEndpoints,
                    )
                },
                Case {
                    name: "on a veth that is no TX port: through the stack, addressed to the node",
                    input: on_side.bytes(),
                    ingress: side0.index,
                    action: XDP_PASS,
                    output: Expect::Icmp(via_stack),
                    counters: vec![
                        (Counter::RejectNoEndpoints, 1),
                        (Counter::RejectViaStack, 1),
                    ],
                },
            ]);
            lab.set_iface_flags(in0_iface, IFACE_LOCAL_SENDERS);

            // Without service CIDRs, unallocated addresses are the kernel's business again;
            // ClusterIPs still reject their undefined ports.
            lab.dataplane
                .configure(&DataplaneConfig::default())
                .expect("configuring the dataplane");
            lab.check_all(&[
                Case {
                    name: "no service CIDR configured",
                    input: tcp((UNALLOCATED, VIP_PORT)).bytes(),
                    ingress: in0,
                    action: XDP_PASS,
                    output: Expect::Unchanged,
                    counters: vec![(Counter::PassNoService, 1)],
                },
                reject(
                    "a ClusterIP outside every configured range",
                    tcp((VIP, UNDEFINED_PORT)),
                    Counter::RejectUndefinedPort,
                ),
            ]);
        },
    );
}

/// Keeps the calling thread on the CPU it runs on now: per-CPU state must be the same CPU's.
fn pin_to_current_cpu() {
    // SAFETY: plain libc calls on a zeroed `cpu_set_t` owned here.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity"
        );
    }
}

#[test]
fn rejects_beyond_the_rate_are_dropped_and_counted() {
    with_lab("rejects_beyond_the_rate_are_dropped_and_counted", |lab| {
        const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
        const RATE: u32 = 3;
        const SENT: u32 = 5;
        lab.program(&[frontend("empty", EMPTY_VIP, VIP_PORT, IPPROTO_TCP, &[])]);
        lab.dataplane
            .configure(&lab_config(RATE))
            .expect("configuring the dataplane");
        // The budget is per CPU: every run must land on the same one.
        pin_to_current_cpu();
        let in0 = lab.in0.index;
        for attempt in 0..SENT {
            let syn = from_client(
                lab,
                Pkt::tcp(
                    (CLIENT, 42_000 + attempt as u16),
                    (EMPTY_VIP, VIP_PORT),
                    SYN,
                ),
            );
            let case = if attempt < RATE {
                Case {
                    name: "within the rate",
                    input: syn.bytes(),
                    ingress: in0,
                    action: XDP_TX,
                    output: Expect::Icmp(port_unreachable(&syn)),
                    counters: vec![(Counter::RejectNoEndpoints, 1)],
                }
            } else {
                Case {
                    name: "beyond the rate",
                    input: syn.bytes(),
                    ingress: in0,
                    action: XDP_DROP,
                    output: Expect::Unchanged,
                    counters: vec![(Counter::DropRejectRateLimited, 1)],
                }
            };
            lab.check(&case);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Session affinity.

/// Sends a SYN from `client:port` to `VIP:VIP_PORT` and returns the backend it was sent to.
fn backend_chosen(lab: &mut Lab, client: Ipv4Addr, port: u16) -> Ipv4Addr {
    let syn = Pkt::tcp((client, port), (VIP, VIP_PORT), SYN).eth(CLIENT_MAC, lab.in0.mac);
    let run = lab
        .dataplane
        .test_run(&syn.bytes(), lab.in0.index)
        .expect("test run");
    assert_eq!(action_name(run.action), action_name(XDP_REDIRECT));
    ip_at(&run.packet, l3_offset(&run.packet) + IPV4_DST_OFFSET)
}

/// Offset of the destination address in the IPv4 header.
const IPV4_DST_OFFSET: usize = 16;

/// The `index`-th of a range of client addresses next to the client's (all unicast).
fn other_client(index: u16) -> Ipv4Addr {
    const FIRST_HOST: u32 = 16;
    Ipv4Addr::from(u32::from(CLIENT) & !0xff | (FIRST_HOST + u32::from(index)) & 0xffff)
}

#[test]
fn session_affinity_sends_a_client_s_new_flows_to_its_last_endpoint() {
    with_lab(
        "session_affinity_sends_a_client_s_new_flows_to_its_last_endpoint",
        |lab| {
            const TIMEOUT_S: u32 = 10_800;
            const SHORT_TIMEOUT_S: u32 = 1;
            /// Clients whose remembered choice is checked at once; if expiry were ignored all
            /// would keep backend A, by chance only with probability (1/3)^30.
            const CLIENTS: u16 = 30;
            let endpoints = [
                (BACKEND_A, BACKEND_PORT),
                (BACKEND_B, BACKEND_PORT),
                (BACKEND_C, BACKEND_PORT),
            ];
            let sticky = |timeout: u32, draining: &[(Ipv4Addr, u16)]| {
                let ready: Vec<(Ipv4Addr, u16)> = endpoints
                    .iter()
                    .filter(|e| !draining.contains(e))
                    .copied()
                    .collect();
                let mut frontend = frontend("sticky", VIP, VIP_PORT, IPPROTO_TCP, &ready);
                frontend.affinity_timeout_s = timeout;
                frontend.draining = draining
                    .iter()
                    .map(|(addr, port)| BackendAddr {
                        addr: *addr,
                        port: *port,
                        remote: false,
                    })
                    .collect();
                frontend
            };
            lab.program(&[sticky(TIMEOUT_S, &[])]);
            let service_id = lab.resolve(&sticky(TIMEOUT_S, &[])).0.service_id;

            // Every new flow of one client goes where its first went.
            let before = lab.counters();
            let first = backend_chosen(lab, CLIENT, 43_000);
            for run in 1..STICKY_RUNS as u16 {
                assert_eq!(
                    backend_chosen(lab, CLIENT, 43_000 + run),
                    first,
                    "flow {run}"
                );
            }
            let after = lab.counters();
            assert_eq!(
                after[Counter::AffinityHit as usize] - before[Counter::AffinityHit as usize],
                STICKY_RUNS as u64 - 1
            );
            let affinity = open_affinity(&lab.pin_dir).expect("opening LB_AFFINITY");
            let key = AffinityKey {
                client_addr: wire_addr(CLIENT),
                service_id,
            };
            let entry = affinity.get(&key, 0).expect("the client's entry");
            assert_eq!(
                entry.backend_id,
                lab.backend_id(&sticky(TIMEOUT_S, &[]), first, BACKEND_PORT)
            );

            // Other clients are spread as usual.
            let mut seen = BTreeSet::new();
            for index in 0..MAX_NEW_FLOWS {
                seen.insert(backend_chosen(lab, other_client(index), 44_000));
                if seen.len() == endpoints.len() {
                    break;
                }
            }
            assert_eq!(seen.len(), endpoints.len(), "clients reached only {seen:?}");

            // An endpoint that stops taking new flows is not kept by affinity.
            lab.program(&[sticky(TIMEOUT_S, &[(first, BACKEND_PORT)])]);
            let moved = backend_chosen(lab, CLIENT, 43_500);
            assert_ne!(
                moved, first,
                "affinity led a new flow to a draining endpoint"
            );
            for run in 1..STICKY_RUNS as u16 {
                assert_eq!(backend_chosen(lab, CLIENT, 43_500 + run), moved);
            }

            // Choices older than the timeout are forgotten; younger ones are kept.
            lab.program(&[sticky(SHORT_TIMEOUT_S, &[])]);
            let a = lab.backend_id(&sticky(SHORT_TIMEOUT_S, &[]), BACKEND_A, BACKEND_PORT);
            let now = monotonic_ns();
            let expired_age = 2 * u64::from(SHORT_TIMEOUT_S) * 1_000_000_000;
            let mut affinity = open_affinity(&lab.pin_dir).expect("opening LB_AFFINITY");
            for index in 0..2 * CLIENTS {
                let last_flow_ns = if index < CLIENTS {
                    now
                } else {
                    now - expired_age
                };
                let key = AffinityKey {
                    client_addr: wire_addr(other_client(MAX_NEW_FLOWS + index)),
                    service_id,
                };
                let value = AffinityValue {
                    backend_id: a,
                    _pad: 0,
                    last_flow_ns,
                };
                affinity.insert(key, value, 0).expect("writing an entry");
            }
            for index in 0..CLIENTS {
                assert_eq!(
                    backend_chosen(lab, other_client(MAX_NEW_FLOWS + index), 45_000),
                    BACKEND_A,
                    "a remembered choice within the timeout"
                );
            }
            let kept = (CLIENTS..2 * CLIENTS)
                .filter(|index| {
                    backend_chosen(lab, other_client(MAX_NEW_FLOWS + index), 45_000) == BACKEND_A
                })
                .count();
            assert!(
                kept < usize::from(CLIENTS),
                "every expired choice was still followed"
            );

            // Without affinity, one client's flows spread.
            lab.program(&[sticky(0, &[])]);
            let mut seen = BTreeSet::new();
            for run in 0..MAX_NEW_FLOWS {
                seen.insert(backend_chosen(lab, CLIENT, 46_000 + run));
                if seen.len() == endpoints.len() {
                    break;
                }
            }
            assert_eq!(
                seen.len(),
                endpoints.len(),
                "one client reached only {seen:?}"
            );
        },
    );
}

// ---------------------------------------------------------------------------------------------
// loadBalancerSourceRanges.

#[test]
fn load_balancer_source_ranges_admit_only_their_clients() {
    with_lab(
        "load_balancer_source_ranges_admit_only_their_clients",
        |lab| {
            const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
            const OUTSIDER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 5);
            let cidr = |text: &str| text.parse::<Ipv4Cidr>().expect("a CIDR");
            let guarded = |ranges: Option<Vec<Ipv4Cidr>>| Frontend {
                source_ranges: ranges,
                ..frontend(
                    "guarded",
                    LB_IP,
                    VIP_PORT,
                    IPPROTO_TCP,
                    &[(BACKEND_A, BACKEND_PORT)],
                )
            };
            let open = frontend(
                "guarded",
                VIP,
                VIP_PORT,
                IPPROTO_TCP,
                &[(BACKEND_A, BACKEND_PORT)],
            );
            lab.program(&[guarded(Some(vec![cidr("10.0.0.0/24")])), open.clone()]);
            let in0 = lab.in0;
            let syn = |client: Ipv4Addr, port: u16, vip: Ipv4Addr| {
                Pkt::tcp((client, port), (vip, VIP_PORT), SYN).eth(CLIENT_MAC, in0.mac)
            };
            let out0_mac = lab.out0.mac;
            let admitted = |name, packet: Pkt| Case {
                name,
                input: packet.bytes(),
                ingress: in0.index,
                action: XDP_REDIRECT,
                output: Expect::Frame(
                    packet
                        .clone()
                        .to(BACKEND_A, BACKEND_PORT)
                        .hop(out0_mac, BACKEND_A_MAC),
                ),
                counters: vec![(Counter::RedirectService, 1), (Counter::FlowCreated, 1)],
            };
            let refused = |name, packet: Pkt| Case {
                name,
                input: packet.bytes(),
                ingress: in0.index,
                action: XDP_DROP,
                output: Expect::Unchanged,
                counters: vec![(Counter::DropSourceRange, 1)],
            };
            let inside = syn(CLIENT, 47_100, LB_IP);
            lab.check_all(&[
                admitted("a client inside the ranges", inside.clone()),
                refused("a client outside the ranges", syn(OUTSIDER, 47_101, LB_IP)),
                admitted(
                    "the same client through an address without ranges",
                    syn(OUTSIDER, 47_102, VIP),
                ),
            ]);

            // Narrowed to another /32: the established flow of the old range is cut too, the
            // outsider admitted, and the trie matches the whole address of a /32.
            lab.program(&[guarded(Some(vec![cidr("192.0.2.5/32")])), open.clone()]);
            let established =
                Pkt::tcp((CLIENT, 47_100), (LB_IP, VIP_PORT), ACK).eth(CLIENT_MAC, in0.mac);
            lab.check_all(&[
                refused("an established flow of a withdrawn range", established),
                admitted("the /32 itself", syn(OUTSIDER, 47_103, LB_IP)),
                refused(
                    "its neighbour",
                    syn(Ipv4Addr::new(192, 0, 2, 6), 47_104, LB_IP),
                ),
            ]);

            // Ranges that admit no IPv4 client: closed. None at all: open.
            lab.program(&[guarded(Some(Vec::new())), open.clone()]);
            lab.check(&refused("no IPv4 range", syn(OUTSIDER, 47_105, LB_IP)));
            lab.program(&[guarded(None), open]);
            lab.check(&admitted("no ranges", syn(OUTSIDER, 47_106, LB_IP)));
        },
    );
}

// ---------------------------------------------------------------------------------------------
// ICMP errors about translated flows.

/// The start of `packet`'s IPv4 datagram an ICMP error quotes: its header and `l4_bytes` more
/// (`None`: all of it).
fn quote_of(packet: &Pkt, l4_bytes: Option<usize>) -> Vec<u8> {
    let bytes = packet.bytes();
    let l3 = l3_offset(&bytes);
    let ihl = usize::from(bytes[l3] & 0x0f) * 4;
    match l4_bytes {
        Some(l4_bytes) => bytes[l3..l3 + ihl + l4_bytes].to_vec(),
        None => bytes[l3..].to_vec(),
    }
}

/// An ICMP message frame, built with etherparse.
fn icmp_frame(
    (src_mac, dst_mac): ([u8; 6], [u8; 6]),
    (src, dst): (Ipv4Addr, Ipv4Addr),
    ttl: u8,
    kind: &Icmpv4Type,
    payload: &[u8],
) -> Vec<u8> {
    let icmp = Icmpv4Header::with_checksum(kind.clone(), payload);
    let mut ip = Ipv4Header {
        total_len: u16::try_from(IPV4_HLEN + icmp.header_len() + payload.len()).expect("length"),
        time_to_live: ttl,
        protocol: IpNumber(IPPROTO_ICMP),
        source: src.octets(),
        destination: dst.octets(),
        ..Ipv4Header::default()
    };
    ip.header_checksum = ip.calc_header_checksum();
    let mut frame = Ethernet2Header {
        source: src_mac,
        destination: dst_mac,
        ether_type: EtherType(ETHERTYPE_IPV4),
    }
    .to_bytes()
    .to_vec();
    frame.extend_from_slice(&ip.to_bytes());
    frame.extend_from_slice(&icmp.to_bytes());
    frame.extend_from_slice(payload);
    frame
}

#[test]
fn icmp_errors_about_translated_flows_are_translated_back() {
    with_lab(
        "icmp_errors_about_translated_flows_are_translated_back",
        |lab| {
            /// A router between the node and the backend.
            const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 9);
            const PATH_MTU: u16 = 1400;
            /// TTL of a packet after the node forwarded it.
            const FORWARDED_TTL: u8 = DEFAULT_TTL - 1;
            lab.program(&[
                frontend(
                    "web",
                    VIP,
                    VIP_PORT,
                    IPPROTO_TCP,
                    &[(BACKEND_A, BACKEND_PORT)],
                ),
                frontend(
                    "dns",
                    VIP,
                    DNS_PORT,
                    IPPROTO_UDP,
                    &[(BACKEND_A, BACKEND_DNS_PORT)],
                ),
            ]);
            let (in0, out0) = (lab.in0, lab.out0);
            // A TCP flow and a UDP flow with a reply.
            let syn = Pkt::tcp((CLIENT, 48_000), (VIP, VIP_PORT), SYN)
                .payload(&[0x42; 40])
                .eth(CLIENT_MAC, in0.mac);
            let query = Pkt::udp((CLIENT, 48_001), (VIP, DNS_PORT))
                .payload(b"query")
                .eth(CLIENT_MAC, in0.mac);
            let answer = Pkt::udp((BACKEND_A, BACKEND_DNS_PORT), (CLIENT, 48_001))
                .payload(b"answer")
                .eth(BACKEND_A_MAC, out0.mac);
            for (packet, ingress) in [(&syn, in0), (&query, in0), (&answer, out0)] {
                let run = lab
                    .dataplane
                    .test_run(&packet.bytes(), ingress.index)
                    .expect("test run");
                assert_eq!(action_name(run.action), action_name(XDP_REDIRECT));
            }
            let flows = lab.conntrack();

            let frag_needed =
                Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: PATH_MTU,
                });
            let port = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
            // What the node sent, as a router or the backend quotes it, and what the client
            // must see quoted instead.
            let sent_syn = syn.clone().ttl(FORWARDED_TTL).to(BACKEND_A, BACKEND_PORT);
            let client_syn = syn.clone().ttl(FORWARDED_TTL);
            let sent_query = query
                .clone()
                .ttl(FORWARDED_TTL)
                .to(BACKEND_A, BACKEND_DNS_PORT);
            let client_query = query.clone().ttl(FORWARDED_TTL);
            // The reply as the client got it, and as the backend sent it.
            let got_answer = answer.clone().ttl(FORWARDED_TTL).from(VIP, DNS_PORT);
            let sent_answer = answer.clone().ttl(FORWARDED_TTL);

            let towards_client = |kind: &Icmpv4Type, quote: Vec<u8>| {
                icmp_frame(
                    (in0.mac, CLIENT_MAC),
                    (VIP, CLIENT),
                    FORWARDED_TTL,
                    kind,
                    &quote,
                )
            };
            let translated_reply = vec![
                (Counter::RedirectReply, 1),
                (Counter::IcmpErrorTranslated, 1),
            ];
            let pass = |name, input: Vec<u8>, ingress: Iface| Case {
                name,
                input,
                ingress: ingress.index,
                action: XDP_PASS,
                output: Expect::Unchanged,
                counters: vec![(Counter::PassNotTcpUdp, 1)],
            };
            lab.check_all(&[
                Case {
                    name: "fragmentation needed from a router about a packet to the backend",
                    input: icmp_frame(
                        (BACKEND_A_MAC, out0.mac),
                        (ROUTER, CLIENT),
                        DEFAULT_TTL,
                        &frag_needed,
                        &quote_of(&sent_syn, Some(ICMP_QUOTED_L4_BYTES)),
                    ),
                    ingress: out0.index,
                    action: XDP_REDIRECT,
                    output: Expect::Icmp(towards_client(
                        &frag_needed,
                        quote_of(&client_syn, Some(ICMP_QUOTED_L4_BYTES)),
                    )),
                    counters: translated_reply.clone(),
                },
                Case {
                    name: "a quote holding the TCP checksum gets it translated too",
                    input: icmp_frame(
                        (BACKEND_A_MAC, out0.mac),
                        (ROUTER, CLIENT),
                        DEFAULT_TTL,
                        &frag_needed,
                        &quote_of(&sent_syn, Some(TCP_HLEN + 8)),
                    ),
                    ingress: out0.index,
                    action: XDP_REDIRECT,
                    output: Expect::Icmp(towards_client(
                        &frag_needed,
                        quote_of(&client_syn, Some(TCP_HLEN + 8)),
                    )),
                    counters: translated_reply.clone(),
                },
                Case {
                    name: "port unreachable from the backend about a whole UDP datagram",
                    input: icmp_frame(
                        (BACKEND_A_MAC, out0.mac),
                        (BACKEND_A, CLIENT),
                        DEFAULT_TTL,
                        &port,
                        &quote_of(&sent_query, None),
                    ),
                    ingress: out0.index,
                    action: XDP_REDIRECT,
                    output: Expect::Icmp(towards_client(&port, quote_of(&client_query, None))),
                    counters: translated_reply.clone(),
                },
                Case {
                    name: "port unreachable from the client about a reply: to the backend",
                    input: icmp_frame(
                        (CLIENT_MAC, in0.mac),
                        (CLIENT, VIP),
                        DEFAULT_TTL,
                        &port,
                        &quote_of(&got_answer, None),
                    ),
                    ingress: in0.index,
                    action: XDP_REDIRECT,
                    output: Expect::Icmp(icmp_frame(
                        (out0.mac, BACKEND_A_MAC),
                        (CLIENT, BACKEND_A),
                        FORWARDED_TTL,
                        &port,
                        &quote_of(&sent_answer, None),
                    )),
                    counters: vec![
                        (Counter::RedirectService, 1),
                        (Counter::IcmpErrorTranslated, 1),
                    ],
                },
                pass(
                    "an error about a flow never translated",
                    icmp_frame(
                        (BACKEND_A_MAC, out0.mac),
                        (ROUTER, CLIENT),
                        DEFAULT_TTL,
                        &port,
                        &quote_of(
                            &Pkt::udp((CLIENT, 48_002), (BACKEND_A, BACKEND_DNS_PORT)),
                            None,
                        ),
                    ),
                    out0,
                ),
                pass(
                    "a quote too short to hold the ports",
                    icmp_frame(
                        (BACKEND_A_MAC, out0.mac),
                        (ROUTER, CLIENT),
                        DEFAULT_TTL,
                        &port,
                        &quote_of(&sent_query, Some(2)),
                    ),
                    out0,
                ),
                pass(
                    "a ping to the Service address",
                    icmp_frame(
                        (CLIENT_MAC, in0.mac),
                        (CLIENT, VIP),
                        DEFAULT_TTL,
                        &Icmpv4Type::EchoRequest(IcmpEchoHeader { id: 7, seq: 1 }),
                        b"ping",
                    ),
                    in0,
                ),
            ]);
            assert_eq!(lab.conntrack(), flows, "errors changed conntrack state");
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Fragments.

/// Bytes of a fragment's payload per unit of the IPv4 fragment offset.
const FRAGMENT_UNIT: usize = 8;

/// `datagram` (an L4 header and payload) cut at `cuts` into fragments from `src` to `dst`.
fn fragments(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, datagram: &[u8], cuts: &[usize]) -> Vec<Pkt> {
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(datagram.len());
    bounds
        .windows(2)
        .map(|range| {
            let more = range[1] < datagram.len();
            let offset = u16::try_from(range[0] / FRAGMENT_UNIT).expect("offset");
            Pkt::raw(src, dst, proto, &datagram[range[0]..range[1]]).fragment(more, offset)
        })
        .collect()
}

#[test]
fn fragments_follow_their_first_fragment_both_ways() {
    with_lab("fragments_follow_their_first_fragment_both_ways", |lab| {
        /// Where the datagrams are cut: multiples of the fragment unit.
        const CUTS: [usize; 2] = [48, 96];
        lab.program(&[
            frontend(
                "dns",
                VIP,
                DNS_PORT,
                IPPROTO_UDP,
                &[(BACKEND_A, BACKEND_DNS_PORT)],
            ),
            frontend("empty", OTHER_VIP, DNS_PORT, IPPROTO_UDP, &[]),
        ]);
        let (in0, out0) = (lab.in0, lab.out0);
        let payload: Vec<u8> = (0..100u8).collect();
        let query =
            |to: (Ipv4Addr, u16)| Pkt::udp((CLIENT, 48_100), to).payload(&payload).l4_bytes();
        let reply = |from: (Ipv4Addr, u16)| {
            Pkt::udp(from, (CLIENT, 48_100))
                .payload(&payload)
                .l4_bytes()
        };
        let sent = fragments(CLIENT, VIP, IPPROTO_UDP, &query((VIP, DNS_PORT)), &CUTS);
        let delivered = fragments(
            CLIENT,
            BACKEND_A,
            IPPROTO_UDP,
            &query((BACKEND_A, BACKEND_DNS_PORT)),
            &CUTS,
        );
        let answered = fragments(
            BACKEND_A,
            CLIENT,
            IPPROTO_UDP,
            &reply((BACKEND_A, BACKEND_DNS_PORT)),
            &CUTS,
        );
        let received = fragments(VIP, CLIENT, IPPROTO_UDP, &reply((VIP, DNS_PORT)), &CUTS);
        let from_client = |p: &Pkt| p.clone().eth(CLIENT_MAC, in0.mac);
        let from_backend = |p: &Pkt| p.clone().eth(BACKEND_A_MAC, out0.mac);
        let to_backend = |p: &Pkt| p.clone().hop(out0.mac, BACKEND_A_MAC);
        let to_client = |p: &Pkt| p.clone().hop(in0.mac, CLIENT_MAC);
        let forwarded = |name, input: Pkt, ingress: Iface, output: Pkt, counters| Case {
            name,
            input: input.bytes(),
            ingress: ingress.index,
            action: XDP_REDIRECT,
            output: Expect::Fragment(output),
            counters,
        };
        let service = vec![
            (Counter::RedirectService, 1),
            (Counter::FragmentTranslated, 1),
        ];
        let replied = vec![
            (Counter::RedirectReply, 1),
            (Counter::FragmentTranslated, 1),
        ];
        lab.check_all(&[
            Case {
                name: "a later fragment before its first: untouched",
                input: from_client(&sent[1]).bytes(),
                ingress: in0.index,
                action: XDP_PASS,
                output: Expect::Unchanged,
                counters: vec![(Counter::PassFragment, 1)],
            },
            forwarded(
                "the first fragment chooses the backend",
                from_client(&sent[0]),
                in0,
                to_backend(&delivered[0]),
                vec![(Counter::RedirectService, 1), (Counter::FlowCreated, 1)],
            ),
            forwarded(
                "the middle fragment follows it",
                from_client(&sent[1]),
                in0,
                to_backend(&delivered[1]),
                service.clone(),
            ),
            forwarded(
                "the last fragment follows it",
                from_client(&sent[2]),
                in0,
                to_backend(&delivered[2]),
                service.clone(),
            ),
            forwarded(
                "the backend's fragmented reply: first",
                from_backend(&answered[0]),
                out0,
                to_client(&received[0]),
                vec![(Counter::RedirectReply, 1)],
            ),
            forwarded(
                "the reply's middle fragment",
                from_backend(&answered[1]),
                out0,
                to_client(&received[1]),
                replied.clone(),
            ),
            forwarded(
                "the reply's last fragment",
                from_backend(&answered[2]),
                out0,
                to_client(&received[2]),
                replied,
            ),
        ]);

        // The reassembled datagram's UDP checksum holds for the backend's addresses.
        let datagram: Vec<u8> = delivered
            .iter()
            .flat_map(|fragment| fragment.payload.clone())
            .collect();
        assert_eq!(
            fold(sum_words(
                pseudo_header_sum(CLIENT, BACKEND_A, IPPROTO_UDP, datagram.len()),
                &datagram
            )),
            0xffff,
            "the reassembled datagram's UDP checksum"
        );

        // A refused first fragment (here: no endpoint) takes its later fragments with it: left to
        // the stack, they would be routed on still addressed to the Service.
        let refused = fragments(
            CLIENT,
            OTHER_VIP,
            IPPROTO_UDP,
            &Pkt::udp((CLIENT, 48_200), (OTHER_VIP, DNS_PORT))
                .payload(&payload)
                .l4_bytes(),
            &CUTS,
        );
        let first = from_client(&refused[0]);
        lab.check_all(&[
            Case {
                name: "a first fragment to a Service without endpoints",
                input: first.bytes(),
                ingress: in0.index,
                action: XDP_TX,
                output: Expect::Icmp(port_unreachable(&first)),
                counters: vec![(Counter::RejectNoEndpoints, 1)],
            },
            Case {
                name: "its later fragment",
                input: from_client(&refused[1]).bytes(),
                ingress: in0.index,
                action: XDP_DROP,
                output: Expect::Unchanged,
                counters: vec![(Counter::DropFragmentRefused, 1)],
            },
        ]);

        // Past the reassembly timeout, an identification is another datagram's.
        let mut entries = open_fragments(&lab.pin_dir).expect("opening LB_FRAGMENTS");
        let key = FragmentKey {
            src_addr: wire_addr(CLIENT),
            dst_addr: wire_addr(VIP),
            id: IP_ID.to_be(),
            proto: IPPROTO_UDP,
            _pad: 0,
        };
        let mut entry = entries.get(&key, 0).expect("the datagram's entry");
        assert_eq!(entry.dst_addr, wire_addr(BACKEND_A));
        assert_eq!(entry.src_addr, 0);
        entry.created_ns = monotonic_ns() - FRAGMENT_LIFETIME_NS - 1_000_000_000;
        entries.insert(key, entry, 0).expect("ageing the entry");
        lab.check(&Case {
            name: "a later fragment past the reassembly timeout",
            input: from_client(&sent[2]).bytes(),
            ingress: in0.index,
            action: XDP_PASS,
            output: Expect::Unchanged,
            counters: vec![(Counter::PassFragment, 1)],
        });
    });
}

/// Offset of the source address in the IPv4 header.
const IPV4_SRC_OFFSET: usize = 12;

#[test]
fn source_nat_claims_a_free_port_and_takes_over_expired_ones() {
    with_lab(
        "source_nat_claims_a_free_port_and_takes_over_expired_ones",
        |lab| {
            // The node's address on out0, where backend A lives: what the kernel would send from.
            let node: Ipv4Addr = OUT_CIDR.split('/').next().unwrap().parse().unwrap();
            let dns = frontend(
                "dns",
                VIP,
                DNS_PORT,
                IPPROTO_UDP,
                &[(BACKEND_A, BACKEND_DNS_PORT)],
            );
            lab.program(std::slice::from_ref(&dns));
            // Backend A calls its own Service and is the only endpoint: a hairpin.
            let hairpin = |lab: &mut Lab, port: u16| {
                let query = Pkt::udp((BACKEND_A, port), (VIP, DNS_PORT))
                    .payload(b"query")
                    .eth(BACKEND_A_MAC, lab.out0.mac);
                lab.dataplane
                    .test_run(&query.bytes(), lab.out0.index)
                    .expect("test run")
            };
            let before = lab.counters();
            let run = hairpin(lab, 40_000);
            assert_eq!(action_name(run.action), action_name(XDP_TX));
            let l3 = l3_offset(&run.packet);
            assert_eq!(ip_at(&run.packet, l3 + IPV4_SRC_OFFSET), node);
            assert_eq!(ip_at(&run.packet, l3 + IPV4_DST_OFFSET), BACKEND_A);
            let snat_port = be16(&run.packet, l3 + IPV4_HLEN);
            assert!(SNAT_PORTS.contains(&snat_port), "{snat_port}");
            verify_checksums("hairpin", &run.packet, Check::Complete);
            let after = lab.counters();
            assert_eq!(
                after[Counter::FlowSnat as usize] - before[Counter::FlowSnat as usize],
                1
            );
            // Its reply entry is keyed by the backend's tuple towards that port and restores
            // both ends.
            let reply_key = flow_key(
                (BACKEND_A, BACKEND_DNS_PORT),
                (node, snat_port),
                IPPROTO_UDP,
                DIRECTION_REPLY,
            );
            let reply = lab.conntrack()[&reply_key];
            assert_eq!(
                (reply.nat_addr, reply.nat_port),
                (wire_addr(VIP), wire_port(DNS_PORT))
            );
            assert_eq!(
                (reply.snat_addr, reply.snat_port),
                (wire_addr(BACKEND_A), wire_port(40_000))
            );
            // The answer goes back to the caller from the Service.
            let answer = Pkt::udp((BACKEND_A, BACKEND_DNS_PORT), (node, snat_port))
                .payload(b"answer")
                .eth(BACKEND_A_MAC, lab.out0.mac);
            let run = lab
                .dataplane
                .test_run(&answer.bytes(), lab.out0.index)
                .expect("test run");
            assert_eq!(action_name(run.action), action_name(XDP_TX));
            assert_eq!(ip_at(&run.packet, l3 + IPV4_SRC_OFFSET), VIP);
            assert_eq!(ip_at(&run.packet, l3 + IPV4_DST_OFFSET), BACKEND_A);
            assert_eq!(be16(&run.packet, l3 + IPV4_HLEN), DNS_PORT);
            assert_eq!(be16(&run.packet, l3 + IPV4_HLEN + 2), 40_000);
            verify_checksums("hairpin answer", &run.packet, Check::Complete);

            // Every other port towards the backend is taken by a live flow: a new flow is dropped
            // and counted, never sent with a port another flow owns.
            let conntrack = open_conntrack(&lab.pin_dir).expect("opening LB_CONNTRACK");
            let mut conntrack = conntrack;
            let now = monotonic_ns();
            let taken = |port: u16, last_seen_ns: u64, tcp_flags: u8| {
                (
                    flow_key(
                        (BACKEND_A, BACKEND_DNS_PORT),
                        (node, port),
                        IPPROTO_UDP,
                        DIRECTION_REPLY,
                    ),
                    FlowState {
                        nat_addr: wire_addr(OTHER_VIP),
                        nat_port: wire_port(DNS_PORT),
                        snat_addr: wire_addr(CLIENT),
                        snat_port: wire_port(port),
                        created_ns: last_seen_ns,
                        last_seen_ns,
                        tcp_flags,
                        ..FlowState::default()
                    },
                )
            };
            for port in SNAT_PORTS.filter(|port| *port != snat_port) {
                let (key, state) = taken(port, now, SEEN_REPLY);
                conntrack.insert(key, state, 0).expect("taking a port");
            }
            let before = lab.counters();
            let run = hairpin(lab, 40_001);
            assert_eq!(action_name(run.action), action_name(XDP_DROP));
            let after = lab.counters();
            assert_eq!(
                after[Counter::DropSnatNoPort as usize] - before[Counter::DropSnatNoPort as usize],
                1
            );
            assert!(!lab.conntrack().contains_key(&flow_key(
                (BACKEND_A, 40_001),
                (VIP, DNS_PORT),
                IPPROTO_UDP,
                DIRECTION_ORIGINAL
            )));

            // Idle for 31 s: answered flows keep their ports (120 s) ...
            let idle = now.saturating_sub(UDP_UNREPLIED_LIFETIME_NS + 1_000_000_000);
            for port in SNAT_PORTS.filter(|port| *port != snat_port) {
                let (key, state) = taken(port, idle, SEEN_REPLY);
                conntrack.insert(key, state, 0).expect("ageing a port");
            }
            let run = hairpin(lab, 40_002);
            assert_eq!(action_name(run.action), action_name(XDP_DROP));
            // ... unanswered ones (a flood nobody answers) have lost theirs, and a new flow takes
            // one over.
            for port in SNAT_PORTS.filter(|port| *port != snat_port) {
                let (key, state) = taken(port, idle, 0);
                conntrack.insert(key, state, 0).expect("ageing a port");
            }
            let run = hairpin(lab, 40_002);
            assert_eq!(action_name(run.action), action_name(XDP_TX));
            let port = be16(&run.packet, l3 + IPV4_HLEN);
            assert!(SNAT_PORTS.contains(&port) && port != snat_port, "{port}");
            let entries = lab.conntrack();
            let reply = entries[&flow_key(
                (BACKEND_A, BACKEND_DNS_PORT),
                (node, port),
                IPPROTO_UDP,
                DIRECTION_REPLY,
            )];
            assert_eq!(
                (reply.nat_addr, reply.snat_addr, reply.snat_port),
                (wire_addr(VIP), wire_addr(BACKEND_A), wire_port(40_002))
            );
            // The first flow kept its port.
            assert!(entries.contains_key(&reply_key));

            // The LRU evicting a live flow's reply entry does not cost it its port: its next
            // packet claims it again...
            conntrack
                .remove(&reply_key)
                .expect("evicting the reply entry");
            let run = hairpin(lab, 40_000);
            assert_eq!(action_name(run.action), action_name(XDP_TX));
            assert_eq!(be16(&run.packet, l3 + IPV4_HLEN), snat_port);
            let reclaimed = lab.conntrack()[&reply_key];
            assert_eq!(
                (reclaimed.snat_addr, reclaimed.snat_port),
                (wire_addr(BACKEND_A), wire_port(40_000))
            );
            // ... and if another flow took the port meanwhile, the flow starts again on a port of
            // its own rather than share it.
            let (_, mut intruder) = taken(snat_port, now, SEEN_REPLY);
            intruder.snat_port = wire_port(50_000);
            conntrack
                .insert(reply_key, intruder, 0)
                .expect("another flow on the port");
            let before = lab.counters();
            let run = hairpin(lab, 40_000);
            assert_eq!(action_name(run.action), action_name(XDP_TX));
            let moved = be16(&run.packet, l3 + IPV4_HLEN);
            assert!(moved != snat_port && SNAT_PORTS.contains(&moved), "{moved}");
            let after = lab.counters();
            assert_eq!(
                after[Counter::FlowReselected as usize] - before[Counter::FlowReselected as usize],
                1
            );
            assert_eq!(lab.conntrack()[&reply_key].snat_port, wire_port(50_000));
        },
    );
}
