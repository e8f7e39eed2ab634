//! Answering a packet with an ICMP destination unreachable built in its place, sent back out of
//! the interface it came in on (`XDP_TX`; on a veth a redirect, or the kernel stack when
//! redirects into it are not allowed):
//! - *port unreachable*, the way kube-proxy's REJECT refuses a Service that cannot take the
//!   packet: the client's connect or send fails at once instead of waiting for a timeout;
//! - *fragmentation needed* with the next hop's MTU, for a packet with DF set that is too big
//!   for the link towards its backend or client once translated. The answer quotes the packet as
//!   its sender sent it (the caller undoes the translation first), so the sender's path-MTU
//!   discovery learns the size; the kernel stack would quote the translated packet, which the
//!   sender cannot match to any of its sockets.
//!
//! The answer keeps the frame's VLAN tags and swaps its MAC addresses; its IPv4 source is the
//! address the client asked for (the Service's), its destination the client. It quotes the
//! offending IPv4 header, options included, and the first 8 bytes of its TCP or UDP header
//! (RFC 792), which is what the client's stack matches the error to its socket by.
//!
//! No ICMP error answers a packet from a non-unicast source or sent to a link-layer group address
//! (RFC 1122 3.2.2), and each CPU sends at most `DataplaneConfig::rejects_per_second` port
//! unreachables per second, as the kernel limits its own: a flood towards an empty Service must
//! not turn the node into a reflector. Those packets are dropped and counted instead.
//! Fragmentation needed is not limited, as Linux does not limit it: path-MTU discovery must not
//! stall.

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{checksum::fold, config::REJECT_WINDOW_NS, net::IPPROTO_ICMP, stats::Counter};

use crate::{
    maps::{LB_REJECT_RATE, LB_TX_PORTS, config, xdp_tx_works},
    parse::{
        EthHdr, ICMP_DEST_UNREACHABLE, IPV4_MIN_HLEN, Ipv4Hdr, MAX_VLAN_TAGS, Packet, VLAN_HLEN,
        header_at,
    },
    stats::{Drop, Verdict, event},
};

/// An ICMP destination unreachable header (RFC 792).
#[repr(C, packed(2))]
struct IcmpHdr {
    kind: u8,
    code: u8,
    check: u16,
    /// Zero for port unreachable; for fragmentation needed an unused word and the MTU.
    rest: [u16; 2],
}

const ICMP_HLEN: usize = size_of::<IcmpHdr>();
/// Bytes the answer puts in front of the quoted packet: its own IPv4 and ICMP headers.
const GROWTH: usize = IPV4_MIN_HLEN + ICMP_HLEN;
/// Bytes of the offending datagram past its IPv4 header that an ICMP error quotes (RFC 792):
/// enough for the ports.
const QUOTED_L4_BYTES: usize = 8;
const ICMP_PORT_UNREACHABLE: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// IPv4, a header of five 32-bit words (no options).
const VERSION_IHL: u8 = 0x45;
/// Precedence "internetwork control", which Linux gives its own ICMP errors.
const TOS_INTERNETWORK_CONTROL: u8 = 0xc0;
/// The type-of-service bits of the offending packet's TOS byte that Linux carries over into its
/// ICMP errors (`IPTOS_TOS_MASK`): neither its precedence nor its ECN bits.
const TOS_MASK: u8 = 0x1e;
/// TTL of the answer (Linux's default).
const ICMP_TTL: u8 = 64;
/// The longest IPv4 header, in 16-bit words (15 words of 32 bits).
const MAX_IPV4_HEADER_HALFWORDS: usize = 30;
/// Bytes per 16-bit word.
const HALFWORD: usize = 2;
/// First octets of addresses that are not unicast: 0 ("this network"); 224 and above
/// (multicast, reserved, limited broadcast).
const THIS_NETWORK_OCTET: u8 = 0;
const FIRST_MULTICAST_OCTET: u8 = 224;
/// The I/G bit of a MAC address' first octet: set for multicast and broadcast.
const MAC_GROUP_BIT: u8 = 1;

/// The destination unreachable message to answer with.
#[derive(Clone, Copy)]
pub enum Unreachable {
    Port,
    /// Fragmentation needed and DF set, with the next hop's MTU (RFC 1191).
    FragNeeded {
        mtu: u16,
    },
}

/// Answers `packet` with ICMP port unreachable, counted under `counter`; see the module
/// documentation.
#[inline(always)]
pub fn reject(ctx: &XdpContext, packet: &Packet, counter: Counter) -> Result<Verdict, Drop> {
    answer(ctx, packet, Unreachable::Port, counter)
}

/// Answers `packet` with `message`, counted under `counter`; see the module documentation.
#[inline(always)]
pub fn answer(
    ctx: &XdpContext,
    packet: &Packet,
    message: Unreachable,
    counter: Counter,
) -> Result<Verdict, Drop> {
    let first_octet = packet.src_addr.to_ne_bytes()[0];
    let (eth_dst, eth_src) = unsafe { ((*packet.eth).dst, (*packet.eth).src) };
    if first_octet == THIS_NETWORK_OCTET
        || first_octet >= FIRST_MULTICAST_OCTET
        || eth_dst[0] & MAC_GROUP_BIT != 0
    {
        return Err(Drop::RejectNotUnicast);
    }
    // An explain run spends none of the budget.
    if matches!(message, Unreachable::Port) && !packet.notes.explain && !within_budget() {
        return Err(Drop::RejectRateLimited);
    }

    let l2_len = packet.l3_offset;
    let ip_hlen = packet.l4_offset - packet.l3_offset;
    let quoted_len = ip_hlen + QUOTED_L4_BYTES;
    let quoted_sum = quoted_sum(ctx, packet, ip_hlen)?;
    let tos = unsafe { (*packet.ip).tos };

    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(GROWTH as i32)) } != 0 {
        return Err(Drop::RejectFailed);
    }
    // Every pointer into the frame is stale from here on; the old frame now starts at GROWTH.
    // Back out of the ingress interface: with XDP_TX, or a redirect on a veth; else the frame
    // stays addressed to this node and its stack forwards the answer to the client.
    let ingress = ctx.ingress_ifindex() as u32;
    let (action, swap) = if xdp_tx_works(ingress) {
        (xdp_action::XDP_TX, true)
    } else {
        match LB_TX_PORTS.redirect(ingress, xdp_action::XDP_PASS as u64) {
            Ok(xdp_action::XDP_REDIRECT) => (xdp_action::XDP_REDIRECT, true),
            _ => {
                event(packet, Counter::RejectViaStack);
                (xdp_action::XDP_PASS, false)
            }
        }
    };
    let (new_dst, new_src) = if swap {
        (eth_src, eth_dst)
    } else {
        (eth_dst, eth_src)
    };
    let eth: *mut EthHdr = header_at(ctx, 0).map_err(|_| Drop::RejectFailed)?;
    let old_eth: *const EthHdr = header_at(ctx, GROWTH).map_err(|_| Drop::RejectFailed)?;
    unsafe {
        (*eth).dst = new_dst;
        (*eth).src = new_src;
        (*eth).ether_type = (*old_eth).ether_type;
    }
    // The tags stay as they were, so the answer travels back in the same VLAN.
    let mut offset = size_of::<EthHdr>();
    for _ in 0..MAX_VLAN_TAGS {
        if offset >= l2_len {
            break;
        }
        let tag: *mut [u16; 2] = header_at(ctx, offset).map_err(|_| Drop::RejectFailed)?;
        let old_tag: *const [u16; 2] =
            header_at(ctx, offset + GROWTH).map_err(|_| Drop::RejectFailed)?;
        unsafe { *tag = *old_tag };
        offset += VLAN_HLEN;
    }

    let mut ip_header = Ipv4Hdr {
        version_ihl: VERSION_IHL,
        tos: TOS_INTERNETWORK_CONTROL | (tos & TOS_MASK),
        tot_len: ((GROWTH + quoted_len) as u16).to_be(),
        id: 0,
        frag_off: 0,
        ttl: ICMP_TTL,
        proto: IPPROTO_ICMP,
        check: 0,
        src: packet.dst_addr,
        dst: packet.src_addr,
    };
    ip_header.check = !fold(halfword_sum(&ip_header));
    let ip: *mut Ipv4Hdr = header_at(ctx, l2_len).map_err(|_| Drop::RejectFailed)?;
    unsafe { ip.write_unaligned(ip_header) };

    let (code, rest) = match message {
        Unreachable::Port => (ICMP_PORT_UNREACHABLE, [0, 0]),
        // An unused 16-bit word, then the MTU.
        Unreachable::FragNeeded { mtu } => (ICMP_FRAG_NEEDED, [0, mtu.to_be()]),
    };
    let mut icmp_header = IcmpHdr {
        kind: ICMP_DEST_UNREACHABLE,
        code,
        check: 0,
        rest,
    };
    icmp_header.check = !fold(quoted_sum + halfword_sum(&icmp_header));
    let icmp: *mut IcmpHdr =
        header_at(ctx, l2_len + IPV4_MIN_HLEN).map_err(|_| Drop::RejectFailed)?;
    unsafe { icmp.write_unaligned(icmp_header) };

    // The rest of the old datagram goes.
    let frame_len = ctx.data_end() - ctx.data();
    let wanted = l2_len + GROWTH + quoted_len;
    if frame_len > wanted
        && unsafe { bpf_xdp_adjust_tail(ctx.ctx, (wanted - frame_len) as i32) } != 0
    {
        return Err(Drop::RejectFailed);
    }
    Ok(Verdict { action, counter })
}

/// The one's-complement sum of what the answer quotes: the IPv4 header (`ip_hlen` bytes, options
/// included) and the first bytes of the L4 header. Summed from the packet rather than assumed from
/// the header checksum, so even a sender's corrupt header gets an answer whose checksum holds.
#[inline(always)]
fn quoted_sum(ctx: &XdpContext, packet: &Packet, ip_hlen: usize) -> Result<u32, Drop> {
    let mut sum: u32 = 0;
    let mut offset = 0;
    for _ in 0..MAX_IPV4_HEADER_HALFWORDS {
        if offset >= ip_hlen {
            break;
        }
        let word: *const u16 =
            header_at(ctx, packet.l3_offset + offset).map_err(|_| Drop::RejectFailed)?;
        sum += unsafe { *word } as u32;
        offset += HALFWORD;
    }
    // `parse` bounds-checked the whole TCP or UDP header, which is at least this long.
    let l4: *const [u16; QUOTED_L4_BYTES / HALFWORD] =
        header_at(ctx, packet.l4_offset).map_err(|_| Drop::RejectFailed)?;
    for word in unsafe { *l4 } {
        sum += word as u32;
    }
    Ok(sum)
}

/// Takes one ICMP error from this CPU's budget for the current second; `false` when it is spent.
#[inline(always)]
fn within_budget() -> bool {
    let limit = config().rejects_per_second as u64;
    if limit == 0 {
        return true;
    }
    let Some(window) = LB_REJECT_RATE.get_ptr_mut(0) else {
        return true;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: this CPU's own slot; XDP runs with preemption disabled.
    unsafe {
        if now.wrapping_sub((*window).start_ns) >= REJECT_WINDOW_NS {
            (*window).start_ns = now;
            (*window).sent = 0;
        }
        if (*window).sent >= limit {
            return false;
        }
        (*window).sent += 1;
    }
    true
}

/// The one's-complement sum (unfolded) of a header built on the stack. A fixed number of words,
/// so the compiler unrolls it and the verifier sees straight-line code.
#[inline(always)]
fn halfword_sum<T>(header: &T) -> u32 {
    // SAFETY: the header structs are `packed(2)` plain integers of an even size: every 16-bit
    // word is initialised and 2-byte aligned.
    let words = unsafe {
        core::slice::from_raw_parts(
            (header as *const T).cast::<u16>(),
            size_of::<T>() / HALFWORD,
        )
    };
    words.iter().fold(0, |sum, word| sum + *word as u32)
}
