//! Header parsing: Ethernet with up to two VLAN tags (802.1Q, 802.1ad), IPv4, TCP and UDP (whole
//! or in fragments), and ICMP errors quoting TCP or UDP.
//!
//! Invariants of a returned [`Packet`]:
//! - every pointer has been bounds-checked against `data_end` for the whole fixed header it
//!   points to (for TCP, the 20-byte base header; for UDP, all 8 bytes), except `l4` of a later
//!   fragment, which has no L4 header (see [`Piece::Later`]);
//! - the IPv4 total length fits in the frame and covers the IPv4 header and the whole L4 header
//!   (Ethernet padding after the datagram is allowed and ignored);
//! - addresses and ports are copied raw (network byte order), `l4_len` is in host order.
//!
//! Header structs are `packed(2)`: packet data is only 2-byte aligned after a 14-byte Ethernet
//! header, so 32-bit fields are loaded as two halves rather than by a misaligned word load.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_common::net::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_IPV4, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{explain::Notes, stats::Drop};

#[repr(C, packed(2))]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// EtherType, network byte order.
    pub ether_type: u16,
}

#[repr(C, packed(2))]
struct VlanHdr {
    _tci: u16,
    /// Encapsulated EtherType, network byte order.
    ether_type: u16,
}

#[repr(C, packed(2))]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    /// Network byte order.
    pub tot_len: u16,
    pub id: u16,
    /// Flags and fragment offset, network byte order.
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub src: u32,
    pub dst: u32,
}

/// The fixed part of a TCP header, up to and including the checksum.
#[repr(C, packed(2))]
struct TcpHdr {
    _src_port: u16,
    _dst_port: u16,
    _seq: u32,
    _ack: u32,
    /// Data offset in the high nibble.
    data_offset: u8,
    flags: u8,
    _window: u16,
    _check: u16,
    _urgent: u16,
}

#[repr(C, packed(2))]
struct UdpHdr {
    _src_port: u16,
    _dst_port: u16,
    /// Network byte order.
    len: u16,
    _check: u16,
}

pub const ETH_HLEN: usize = size_of::<EthHdr>();
pub const VLAN_HLEN: usize = size_of::<VlanHdr>();
/// VLAN tags the parser looks through: a customer tag inside a service tag (QinQ).
pub const MAX_VLAN_TAGS: usize = 2;
pub const IPV4_MIN_HLEN: usize = size_of::<Ipv4Hdr>();
const TCP_MIN_HLEN: usize = size_of::<TcpHdr>();
const UDP_HLEN: usize = size_of::<UdpHdr>();
const IP_VERSION_4: u8 = 4;
/// Mask of the IPv4 "more fragments" flag and the fragment offset, host order.
const IP_FRAGMENT_MASK: u16 = 0x3fff;
/// IHL and TCP data offset count 32-bit words.
const WORD: usize = 4;
/// The IPv4 version sits in the high nibble of the first byte, the IHL in the low one; the TCP
/// data offset sits in the high nibble of byte 12.
const HIGH_NIBBLE_SHIFT: u8 = 4;
const LOW_NIBBLE_MASK: u8 = 0x0f;

/// Offset of the checksum field in a TCP header.
pub const TCP_CHECK_OFFSET: usize = 16;
/// Offset of the checksum field in a UDP header.
pub const UDP_CHECK_OFFSET: usize = 6;

/// TCP flag bits (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A parsed IPv4 TCP or UDP packet that is not a fragment.
///
/// `repr(C)`: with the fields in Rust's order of choice, the compiler merged the `Parsed`
/// discriminant with neighbouring bytes into shifted pointer words, which the verifier refuses
/// (pointer arithmetic with `>>=`).
#[repr(C)]
pub struct Packet<'n> {
    /// The Ethernet header (rewritten with the next hop's addresses on redirect).
    pub eth: *mut EthHdr,
    /// The IPv4 header, options excluded from the struct but included in the bounds check.
    pub ip: *mut Ipv4Hdr,
    /// Start of the TCP or UDP header; see the module invariants.
    pub l4: *mut u8,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// The frame carries at least one VLAN tag.
    pub tagged: bool,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// Addresses and ports as they were before any rewrite, network byte order.
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP or UDP header plus payload, host order (IPv4 total length minus the IPv4 header).
    pub l4_len: u16,
    /// Offset of the IPv4 header in the frame: the Ethernet header and its VLAN tags.
    pub l3_offset: usize,
    /// Offset of the TCP or UDP header in the frame.
    pub l4_offset: usize,
    /// Where the packet stands in its datagram.
    pub piece: Piece,
    /// The IPv4 identification, as in the packet (what ties fragments together).
    pub ip_id: u16,
    /// What the program decided about it so far, and whether it is an explain run.
    pub notes: &'n Notes,
}

impl Packet<'_> {
    /// The IPv4 datagram's length: header, options and L4.
    #[inline(always)]
    pub fn ip_len(&self) -> usize {
        self.l4_offset - self.l3_offset + self.l4_len as usize
    }
}

/// Where a packet stands in its IPv4 datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// Not fragmented.
    Whole,
    /// The first fragment: it carries the TCP or UDP header, whose UDP length and checksum cover
    /// the whole datagram.
    First,
    /// A later fragment: payload only. `l4` points at it but is not bounds-checked and ports are
    /// zero; only the addresses may be read or rewritten.
    Later,
}

/// An ICMP error (destination unreachable, time exceeded, parameter problem) quoting the start of
/// a TCP or UDP packet: what a translated flow's errors look like.
///
/// Invariants: the outer packet is parsed like any `Packet` (its `l4` is the ICMP header, its
/// ports zero); the quoted IPv4 header is bounds-checked whole (20 bytes; its options are
/// counted in `inner_l4_offset`), and `QUOTED_L4_BYTES` of the quoted TCP or UDP header lie
/// inside both the frame and the outer datagram.
pub struct IcmpError<'n> {
    pub outer: Packet<'n>,
    /// The quoted IPv4 header.
    pub inner_ip: *mut Ipv4Hdr,
    /// Offset in the frame of the quoted TCP or UDP header.
    pub inner_l4_offset: usize,
    /// Offset in the frame where the outer datagram ends (Ethernet padding excluded).
    pub end: usize,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub inner_proto: u8,
    /// The quoted addresses and ports, network byte order.
    pub inner_src_addr: u32,
    pub inner_dst_addr: u32,
    pub inner_src_port: u16,
    pub inner_dst_port: u16,
}

/// ICMP types that quote the packet they are about (RFC 792).
pub const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// The ICMP header: type, code, checksum and four type-specific bytes.
pub const ICMP_HLEN: usize = 8;
/// Offset of the checksum in the ICMP header.
pub const ICMP_CHECK_OFFSET: usize = 2;
/// Bytes of the quoted datagram past its IPv4 header that every ICMP error carries (RFC 792):
/// the ports, and for UDP the checksum.
pub const QUOTED_L4_BYTES: usize = 8;
/// Mask of the fragment offset alone (the quoted packet may carry "more fragments" and still
/// start with its ports).
const IP_OFFSET_MASK: u16 = 0x1fff;

/// What `parse` found.
pub enum Parsed<'n> {
    /// Another EtherType (ARP, IPv6, ...): passed untouched.
    NotIpv4,
    /// IPv4 carrying neither TCP nor UDP, nor an ICMP error about them: passed untouched.
    NotTcpUdp,
    /// An ICMP error about a TCP or UDP packet.
    IcmpError(IcmpError<'n>),
    /// A later fragment of a TCP or UDP datagram (see `Piece::Later`).
    LaterFragment(Packet<'n>),
    /// A TCP or UDP packet to consider.
    Packet(Packet<'n>),
}

/// A pointer to a `T` at `offset`, if the frame holds all of it.
#[inline(always)]
pub fn header_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Drop> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return Err(Drop::Malformed);
    }
    Ok((start + offset) as *mut T)
}

#[inline(always)]
fn is_vlan(ether_type: u16) -> bool {
    ether_type == ETH_P_8021Q.to_be() || ether_type == ETH_P_8021AD.to_be()
}

#[inline(always)]
pub fn parse<'n>(ctx: &XdpContext, notes: &'n Notes) -> Result<Parsed<'n>, Drop> {
    let eth: *mut EthHdr = header_at(ctx, 0)?;
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3_offset = ETH_HLEN;
    let tagged = is_vlan(ether_type);
    // Two tags at most: a customer tag inside a service tag (QinQ). Unrolled for the verifier.
    if tagged {
        let vlan: *mut VlanHdr = header_at(ctx, l3_offset)?;
        ether_type = unsafe { (*vlan).ether_type };
        l3_offset += VLAN_HLEN;
        if is_vlan(ether_type) {
            let inner: *mut VlanHdr = header_at(ctx, l3_offset)?;
            ether_type = unsafe { (*inner).ether_type };
            l3_offset += VLAN_HLEN;
        }
    }
    if ether_type != ETH_P_IPV4.to_be() {
        return Ok(Parsed::NotIpv4);
    }

    let ip: *mut Ipv4Hdr = header_at(ctx, l3_offset)?;
    let version_ihl = unsafe { (*ip).version_ihl };
    let ip_hlen = (version_ihl & LOW_NIBBLE_MASK) as usize * WORD;
    if version_ihl >> HIGH_NIBBLE_SHIFT != IP_VERSION_4 || ip_hlen < IPV4_MIN_HLEN {
        return Err(Drop::Malformed);
    }
    let tot_len = u16::from_be(unsafe { (*ip).tot_len }) as usize;
    // Scalar arithmetic only: the verifier refuses a packet pointer plus a 16-bit length.
    let frame_len = ctx.data_end() - ctx.data();
    if tot_len < ip_hlen || l3_offset + tot_len > frame_len {
        return Err(Drop::Malformed);
    }

    let proto = unsafe { (*ip).proto };
    let fragment = u16::from_be(unsafe { (*ip).frag_off }) & IP_FRAGMENT_MASK != 0;
    let l4_offset = l3_offset + ip_hlen;
    let l4_len = tot_len - ip_hlen;
    if proto == IPPROTO_ICMP && !fragment {
        let icmp: *mut [u8; ICMP_HLEN] = match header_at(ctx, l4_offset) {
            Ok(icmp) => icmp,
            Err(_) => return Ok(Parsed::NotTcpUdp),
        };
        let outer = Packet {
            eth,
            ip,
            l4: icmp.cast(),
            proto,
            tagged,
            tcp_flags: 0,
            src_addr: unsafe { (*ip).src },
            dst_addr: unsafe { (*ip).dst },
            src_port: 0,
            dst_port: 0,
            l4_len: l4_len as u16,
            l3_offset,
            l4_offset,
            piece: Piece::Whole,
            ip_id: unsafe { (*ip).id },
            notes,
        };
        return Ok(parse_icmp_error(ctx, outer, l3_offset + tot_len));
    }
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Ok(Parsed::NotTcpUdp);
    }
    let piece = if !fragment {
        Piece::Whole
    } else if u16::from_be(unsafe { (*ip).frag_off }) & IP_OFFSET_MASK == 0 {
        Piece::First
    } else {
        // Pointer arithmetic without a dereference: the verifier allows it unchecked.
        return Ok(Parsed::LaterFragment(Packet {
            eth,
            ip,
            l4: (ctx.data() + l4_offset) as *mut u8,
            proto,
            tagged,
            tcp_flags: 0,
            src_addr: unsafe { (*ip).src },
            dst_addr: unsafe { (*ip).dst },
            src_port: 0,
            dst_port: 0,
            l4_len: l4_len as u16,
            l3_offset,
            l4_offset,
            piece: Piece::Later,
            ip_id: unsafe { (*ip).id },
            notes,
        }));
    };

    let mut tcp_flags = 0;
    let l4: *mut u8 = if proto == IPPROTO_TCP {
        let tcp: *mut TcpHdr = header_at(ctx, l4_offset)?;
        let tcp_hlen = (unsafe { (*tcp).data_offset } >> HIGH_NIBBLE_SHIFT) as usize * WORD;
        if tcp_hlen < TCP_MIN_HLEN || tcp_hlen > l4_len {
            return Err(Drop::Malformed);
        }
        tcp_flags = unsafe { (*tcp).flags };
        tcp.cast()
    } else {
        let udp: *mut UdpHdr = header_at(ctx, l4_offset)?;
        let udp_len = u16::from_be(unsafe { (*udp).len }) as usize;
        // A first fragment holds only the start of the datagram its length counts.
        if udp_len < UDP_HLEN || (udp_len > l4_len && piece == Piece::Whole) {
            return Err(Drop::Malformed);
        }
        udp.cast()
    };
    let ports = l4.cast::<[u16; 2]>();
    let [src_port, dst_port] = unsafe { *ports };

    Ok(Parsed::Packet(Packet {
        eth,
        ip,
        l4,
        proto,
        tagged,
        tcp_flags,
        src_addr: unsafe { (*ip).src },
        dst_addr: unsafe { (*ip).dst },
        src_port,
        dst_port,
        l4_len: l4_len as u16,
        l3_offset,
        l4_offset,
        piece,
        ip_id: unsafe { (*ip).id },
        notes,
    }))
}

/// An ICMP error about a TCP or UDP packet, or `NotTcpUdp` for any other ICMP message (echo,
/// errors about other protocols or later fragments, quotes too short to name the ports): those
/// are the kernel's business.
#[inline(always)]
fn parse_icmp_error<'n>(ctx: &XdpContext, outer: Packet<'n>, end: usize) -> Parsed<'n> {
    let kind = unsafe { *outer.l4 };
    if kind != ICMP_DEST_UNREACHABLE && kind != ICMP_TIME_EXCEEDED && kind != ICMP_PARAMETER_PROBLEM
    {
        return Parsed::NotTcpUdp;
    }
    let inner_offset = outer.l4_offset + ICMP_HLEN;
    let Ok(inner_ip) = header_at::<Ipv4Hdr>(ctx, inner_offset) else {
        return Parsed::NotTcpUdp;
    };
    let version_ihl = unsafe { (*inner_ip).version_ihl };
    let inner_hlen = (version_ihl & LOW_NIBBLE_MASK) as usize * WORD;
    let inner_proto = unsafe { (*inner_ip).proto };
    let inner_offset_field = u16::from_be(unsafe { (*inner_ip).frag_off }) & IP_OFFSET_MASK;
    if version_ihl >> HIGH_NIBBLE_SHIFT != IP_VERSION_4
        || inner_hlen < IPV4_MIN_HLEN
        || (inner_proto != IPPROTO_TCP && inner_proto != IPPROTO_UDP)
        || inner_offset_field != 0
    {
        return Parsed::NotTcpUdp;
    }
    let inner_l4_offset = inner_offset + inner_hlen;
    // The frame check first: after the datagram-end check, the compiler would find it implied
    // (the datagram lies inside the frame) and drop it, and the verifier cannot follow that.
    let Ok(ports) = header_at::<[u16; QUOTED_L4_BYTES / 2]>(ctx, inner_l4_offset) else {
        return Parsed::NotTcpUdp;
    };
    if inner_l4_offset + QUOTED_L4_BYTES > end {
        return Parsed::NotTcpUdp;
    }
    let [inner_src_port, inner_dst_port, _, _] = unsafe { *ports };
    Parsed::IcmpError(IcmpError {
        inner_src_addr: unsafe { (*inner_ip).src },
        inner_dst_addr: unsafe { (*inner_ip).dst },
        outer,
        inner_ip,
        inner_l4_offset,
        end,
        inner_proto,
        inner_src_port,
        inner_dst_port,
    })
}
