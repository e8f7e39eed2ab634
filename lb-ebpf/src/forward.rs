//! Forwarding a rewritten packet: straight to the next hop when the kernel's FIB knows it
//! (`bpf_fib_lookup`, then `XDP_REDIRECT` or `XDP_TX`), otherwise to the kernel stack
//! (`XDP_PASS`), which routes, resolves neighbours, fragments and answers ICMP as usual.
//!
//! A packet only bypasses the stack when that is safe: its L4 checksum is complete (a partial one
//! would lose its offload state in a redirect), it is untagged, the FIB returned a next hop with a
//! resolved neighbour within the MTU, its TTL survives the hop, and the egress interface is one the
//! agent manages (`LB_TX_PORTS`). The program then acts as the router: TTL minus one, the
//! next hop's MAC addresses. A packet leaving where it came in goes with `XDP_TX`, except on a veth,
//! where only a redirect is sure to reach the peer (see `IFACE_NO_XDP_TX`). A TCP or UDP packet
//! with DF set that is too big for the next hop comes back to the caller, which answers
//! fragmentation needed itself (see `reject`); the kernel would quote the translated packet.

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_FIB_LOOKUP_SRC, bpf_fib_lookup, xdp_action,
    },
    helpers::{bpf_check_mtu, bpf_fib_lookup as fib_lookup},
    programs::XdpContext,
};
use lb_common::{checksum::replace_u16, net::IPPROTO_ICMP, stats::Counter};

use crate::{
    maps::{LB_TX_PORTS, xdp_tx_works},
    parse::{Packet, Piece},
    stats::{Verdict, event},
};

/// Which way the rewritten packet travels; selects the verdict counters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to backend, after DNAT.
    Service,
    /// Backend to client, after reverse NAT.
    Reply,
}

/// `AF_INET`, for `bpf_fib_lookup`.
const AF_INET: u8 = 2;
/// The lowest TTL that may still be forwarded (decremented to 1 or more).
const MIN_FORWARD_TTL: u8 = 2;
/// Offset of the TTL/protocol word in the IPv4 header (the unit the checksum update works on).
const TTL_WORD_OFFSET: usize = 8;

impl Direction {
    const fn verdict(self, action: u32) -> Verdict {
        let counter = match (self, action) {
            (Direction::Service, xdp_action::XDP_REDIRECT) => Counter::RedirectService,
            (Direction::Reply, xdp_action::XDP_REDIRECT) => Counter::RedirectReply,
            (Direction::Service, xdp_action::XDP_TX) => Counter::TxService,
            (Direction::Reply, xdp_action::XDP_TX) => Counter::TxReply,
            (Direction::Service, _) => Counter::StackService,
            (Direction::Reply, _) => Counter::StackReply,
        };
        Verdict { action, counter }
    }

    /// Hands `packet` to the kernel stack, recording why.
    #[inline(always)]
    pub fn to_stack(self, packet: &Packet, reason: Counter) -> Verdict {
        event(packet, reason);
        self.verdict(xdp_action::XDP_PASS)
    }
}

/// What became of a rewritten packet.
pub enum Forwarded {
    /// Sent on (or to the kernel stack) with this verdict.
    Verdict(Verdict),
    /// DF is set and the packet is larger than the next hop's MTU: the caller answers
    /// fragmentation needed, since only it can quote the packet as its sender sent it.
    TooBig { mtu: u16 },
}

/// The address the kernel would give a packet it routes from this packet's interface to `dst`
/// as its source (the route's preferred source, else the egress interface's address): the
/// address source NAT uses, as netfilter's masquerade does. `None` without a route.
#[inline(always)]
pub fn source_towards(ctx: &XdpContext, dst: u32, proto: u8) -> Option<u32> {
    // SAFETY: all-zero is a valid `bpf_fib_lookup`; a zero length never fails the MTU check.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.ifindex = ctx.ingress_ifindex() as u32;
    params.__bindgen_anon_4.ipv4_dst = dst;
    // SAFETY: `params` is a valid, exclusively borrowed `bpf_fib_lookup` of the size passed.
    let result = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_SRC | BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    } as u32;
    // SAFETY: on success the lookup wrote the source address.
    let source = unsafe { params.__bindgen_anon_3.ipv4_src };
    (result == BPF_FIB_LKUP_RET_SUCCESS && source != 0).then_some(source)
}

/// The IPv4 "don't fragment" flag, host order.
const IP_DONT_FRAGMENT: u16 = 0x4000;

/// Sends a rewritten packet on its way; see the module documentation.
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    packet: &Packet,
    partial: bool,
    direction: Direction,
) -> Forwarded {
    Forwarded::Verdict(match route(ctx, packet, partial, direction) {
        Ok(verdict) => verdict,
        Err(mtu) => return Forwarded::TooBig { mtu },
    })
}

/// [`forward`]; `Err` carries the MTU of a next hop the packet is too big for, with DF set.
#[inline(always)]
fn route(
    ctx: &XdpContext,
    packet: &Packet,
    partial: bool,
    direction: Direction,
) -> Result<Verdict, u16> {
    if packet.tagged {
        return Ok(direction.to_stack(
            packet,
            if partial {
                Counter::StackPartialChecksum
            } else {
                Counter::StackVlan
            },
        ));
    }
    let ip = packet.ip;
    let ingress = ctx.ingress_ifindex() as u32;

    // SAFETY: all-zero is a valid `bpf_fib_lookup` (plain integers and unions of them).
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = packet.proto;
    params.ifindex = ingress;
    // SAFETY: `parse` bounds-checked the IPv4 header and the L4 ports (a later fragment has none);
    // `rewrite` already put the translated addresses and ports in the packet.
    unsafe {
        if packet.piece != Piece::Later {
            let ports = *packet.l4.cast::<[u16; 2]>();
            params.sport = ports[0];
            params.dport = ports[1];
        }
        params.__bindgen_anon_1.tot_len = u16::from_be((*ip).tot_len);
        params.__bindgen_anon_2.tos = (*ip).tos;
        params.__bindgen_anon_3.ipv4_src = (*ip).src;
        params.__bindgen_anon_4.ipv4_dst = (*ip).dst;
    }
    // SAFETY: `params` is a valid, exclusively borrowed `bpf_fib_lookup` of the size passed.
    let result = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    } as u32;
    // Answered here only when the kernel would answer it too: DF set, TTL not expiring (Linux
    // checks the TTL first), and a packet as it came off the wire. One larger than its own
    // ingress link is an aggregate that generic XDP sees after GRO, whose segments fit: the
    // stack segments it.
    let too_big = || {
        let dont_fragment = u16::from_be(unsafe { (*ip).frag_off }) & IP_DONT_FRAGMENT != 0;
        let ttl_ok = unsafe { (*ip).ttl } >= MIN_FORWARD_TTL;
        let mut ingress_mtu: u32 = 0;
        // SAFETY: ifindex 0 is the context's own device; the helper writes its MTU.
        let off_the_wire = unsafe { bpf_check_mtu(ctx.as_ptr(), 0, &mut ingress_mtu, 0, 0) } == 0;
        // SAFETY: on FRAG_NEEDED the lookup wrote the MTU over the length it read.
        (dont_fragment && packet.proto != IPPROTO_ICMP && ttl_ok && off_the_wire)
            .then_some(unsafe { params.__bindgen_anon_1.mtu_result })
    };
    if partial {
        // The kernel finishes the checksum; only a packet too big for the next hop is answered
        // here (a partial checksum never comes from GSO: veths turn GSO off towards XDP).
        if result == BPF_FIB_LKUP_RET_FRAG_NEEDED
            && let Some(mtu) = too_big()
        {
            return Err(mtu);
        }
        return Ok(direction.to_stack(packet, Counter::StackPartialChecksum));
    }
    match result {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            return Ok(direction.to_stack(packet, Counter::StackNoNeighbour));
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            if let Some(mtu) = too_big() {
                return Err(mtu);
            }
            // The kernel fragments it (ICMP errors are small; the stack handles the rest).
            return Ok(direction.to_stack(packet, Counter::StackFragNeeded));
        }
        _ => return Ok(direction.to_stack(packet, Counter::StackNoRoute)),
    }

    let ttl = unsafe { (*ip).ttl };
    if ttl < MIN_FORWARD_TTL {
        return Ok(direction.to_stack(packet, Counter::StackTtlExceeded));
    }
    let egress = params.ifindex;
    let action = if egress == ingress && xdp_tx_works(ingress) {
        xdp_action::XDP_TX
    } else {
        // Records the target only; the frame leaves after the program returns, so the header
        // edits below still make it out. A missing entry falls back to XDP_PASS untouched.
        match LB_TX_PORTS.redirect(egress, xdp_action::XDP_PASS as u64) {
            Ok(action) => action,
            Err(_) => return Ok(direction.to_stack(packet, Counter::StackNotTxPort)),
        }
    };

    // SAFETY: bounds-checked headers, see above.
    unsafe {
        let ttl_word = (ip as *mut u8).add(TTL_WORD_OFFSET).cast::<u16>();
        let old_word = *ttl_word;
        (*ip).ttl = ttl - 1;
        (*ip).check = replace_u16((*ip).check, old_word, *ttl_word);
        (*packet.eth).dst = params.dmac;
        (*packet.eth).src = params.smac;
    }
    Ok(direction.verdict(action))
}
