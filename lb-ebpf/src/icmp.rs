//! ICMP errors about translated flows, translated back the way the flow was, as netfilter does for
//! kube-proxy. Without this, an error about a translated packet quotes addresses its receiver
//! never used and is dropped unmatched: path-MTU discovery stalls, and a client is never told
//! that the endpoint's port is closed.
//!
//! Two cases, told apart by which conntrack entry the quoted packet's reversed tuple finds:
//! - the quote is a packet this node sent to a backend (client -> backend, after DNAT): the
//!   *reply* entry finds it. The quoted destination becomes the Service address and port again,
//!   the error's source the Service address (as netfilter rewrites it, even when a router
//!   between node and backend sent it), and it travels to the client like a reply;
//! - the quote is a reply this node sent to a client (Service -> client, after reverse NAT): the
//!   *original* entry finds it. The quoted source becomes the backend again, the error's
//!   destination the backend, and it travels like a packet to the Service.
//!
//! After source NAT both ends of the quote and of the error are translated: towards the client,
//! the quote's source (the node's address and port) becomes the client again and so does the
//! error's destination; towards the backend, the quote's destination becomes the node's address
//! and port and the error's source the node's address.
//!
//! Every checksum the changes touch is updated incrementally: the outer IPv4 header's, the
//! quoted IPv4 header's, the quoted UDP or TCP checksum when the quote holds it, and the ICMP
//! checksum over all of them. An error changes no conntrack state: it neither refreshes nor
//! closes the flow.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::XdpContext};
use lb_common::{
    checksum::{replace_u16, replace_u32},
    conntrack::{DIRECTION_ORIGINAL, DIRECTION_REPLY, FlowKey, FlowState, is_expired},
    net::IPPROTO_UDP,
    stats::Counter,
};

use crate::{
    forward::{Direction, Forwarded, forward},
    maps::LB_CONNTRACK,
    nat::Side,
    parse::{ICMP_CHECK_OFFSET, IcmpError, header_at},
    stats::{Drop, Verdict, event},
};

/// Offsets of the checksum in the quoted UDP and TCP headers.
const UDP_CHECK_OFFSET: usize = 6;
const TCP_CHECK_OFFSET: usize = 16;
/// Bytes of a checksum field.
const CHECK_LEN: usize = 2;
/// UDP's "checksum computed as zero" is transmitted as all ones.
const UDP_ZERO_CHECKSUM_SENT_AS: u16 = 0xffff;

/// Translates `error` if it is about a tracked flow and sends it on; passes it untouched
/// otherwise (it is about traffic the program never translated).
#[inline(always)]
pub fn translate(ctx: &XdpContext, error: &IcmpError) -> Result<Verdict, Drop> {
    let now = unsafe { bpf_ktime_get_ns() };
    let key = |direction| {
        FlowKey::new(
            (error.inner_dst_addr, error.inner_dst_port),
            (error.inner_src_addr, error.inner_src_port),
            error.inner_proto,
            direction,
        )
    };
    let (direction, state) = if let Some(state) = live(&key(DIRECTION_REPLY), error, now) {
        (Direction::Reply, state)
    } else if let Some(state) = live(&key(DIRECTION_ORIGINAL), error, now) {
        (Direction::Service, state)
    } else {
        return Ok(Verdict::pass(Counter::PassNotTcpUdp));
    };
    // About a packet to a backend, the quote's destination was translated and the error goes to
    // the client; about a reply, the quote's source was, and the error goes to the backend.
    let (quoted_side, outer_side) = match direction {
        Direction::Reply => (Side::Destination, Side::Source),
        Direction::Service => (Side::Source, Side::Destination),
    };
    rewrite_quote(ctx, error, quoted_side, state.nat_addr, state.nat_port)?;
    rewrite_outer(error, outer_side, state.nat_addr);
    // After source NAT the other end was translated too: the quote's source was the node's
    // address and port towards the backend (the reply entry holds the client's), or the quote's
    // destination was the client (the original entry holds the node's). The error's other end
    // follows, as netfilter applies both of a connection's translations to a related error.
    if state.snat_addr != 0 {
        rewrite_quote(ctx, error, outer_side, state.snat_addr, state.snat_port)?;
        rewrite_outer(error, quoted_side, state.snat_addr);
    }
    event(&error.outer, Counter::IcmpErrorTranslated);
    Ok(match forward(ctx, &error.outer, false, direction) {
        Forwarded::Verdict(verdict) => verdict,
        // Never for ICMP (`forward` leaves those to the kernel), but the kernel is the answer.
        Forwarded::TooBig { .. } => direction.to_stack(&error.outer, Counter::StackFragNeeded),
    })
}

/// The conntrack entry `key`, if its flow is alive.
#[inline(always)]
fn live(key: &FlowKey, error: &IcmpError, now: u64) -> Option<FlowState> {
    let state = unsafe { *LB_CONNTRACK.get_ptr(key)? };
    (!is_expired(&state, error.inner_proto, now)).then_some(state)
}

/// Replaces `side` of the quoted packet by `addr:port`, with every checksum that covers it.
#[inline(always)]
fn rewrite_quote(
    ctx: &XdpContext,
    error: &IcmpError,
    side: Side,
    addr: u32,
    port: u16,
) -> Result<(), Drop> {
    let icmp_check: *mut u16 =
        header_at(ctx, error.outer.l4_offset + ICMP_CHECK_OFFSET).map_err(|_| Drop::Malformed)?;
    let ports: *mut [u16; 2] =
        header_at(ctx, error.inner_l4_offset).map_err(|_| Drop::Malformed)?;
    let inner = error.inner_ip;
    // SAFETY: `parse` bounds-checked the quoted IPv4 header; the ICMP checksum and the quoted
    // ports were checked just above.
    unsafe {
        let mut icmp = *icmp_check;
        let (old_addr, old_port) = match side {
            Side::Destination => {
                let old = ((*inner).dst, (*ports)[1]);
                (*inner).dst = addr;
                (*ports)[1] = port;
                old
            }
            Side::Source => {
                let old = ((*inner).src, (*ports)[0]);
                (*inner).src = addr;
                (*ports)[0] = port;
                old
            }
        };
        icmp = replace_u32(icmp, old_addr, addr);
        icmp = replace_u16(icmp, old_port, port);
        let old_ip_check = (*inner).check;
        let ip_check = replace_u32(old_ip_check, old_addr, addr);
        (*inner).check = ip_check;
        icmp = replace_u16(icmp, old_ip_check, ip_check);

        // The quoted L4 checksum, when the quote reaches it: always for UDP, for TCP only when
        // the router quoted more than the minimum.
        let udp = error.inner_proto == IPPROTO_UDP;
        let check_offset = error.inner_l4_offset
            + if udp {
                UDP_CHECK_OFFSET
            } else {
                TCP_CHECK_OFFSET
            };
        // The frame check before the datagram-end check, which would make it look redundant
        // to the compiler (see `parse`).
        if let Ok(l4_check) = header_at::<u16>(ctx, check_offset)
            && check_offset + CHECK_LEN <= error.end
        {
            let old = *l4_check;
            if !(udp && old == 0) {
                let mut check = replace_u16(replace_u32(old, old_addr, addr), old_port, port);
                if udp && check == 0 {
                    check = UDP_ZERO_CHECKSUM_SENT_AS;
                }
                *l4_check = check;
                icmp = replace_u16(icmp, old, check);
            }
        }
        *icmp_check = icmp;
    }
    Ok(())
}

/// Replaces `side` of the error's own IPv4 header by `addr` (ICMP has no pseudo header: only the
/// IPv4 checksum covers it).
#[inline(always)]
fn rewrite_outer(error: &IcmpError, side: Side, addr: u32) {
    let ip = error.outer.ip;
    // SAFETY: `parse` bounds-checked the outer IPv4 header.
    unsafe {
        let old = match side {
            Side::Destination => {
                let old = (*ip).dst;
                (*ip).dst = addr;
                old
            }
            Side::Source => {
                let old = (*ip).src;
                (*ip).src = addr;
                old
            }
        };
        (*ip).check = replace_u32((*ip).check, old, addr);
    }
}
