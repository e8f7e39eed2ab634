//! IPv4 fragments of a translated datagram. Only the first fragment carries the ports a Service
//! is chosen by; it is translated like any packet (its UDP or TCP checksum covers the whole
//! datagram, so the incremental update holds), and how is recorded in `LB_FRAGMENTS` under the
//! datagram's identity (source, destination, IPv4 id, protocol). The later fragments look that
//! up and get the same addresses, so the receiver reassembles one datagram from one endpoint.
//!
//! A first fragment that is rejected or dropped is recorded too, and its later fragments are
//! dropped: left to the stack, they would be routed on still addressed to the Service. A later
//! fragment arriving before its first one, or more than `FRAGMENT_LIFETIME_NS` after it, is passed
//! untouched, as is any fragment of traffic the program does not translate.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns, programs::XdpContext};
use lb_common::{
    checksum::replace_u32,
    conntrack::{
        FRAGMENT_LIFETIME_NS, FRAGMENT_REFUSED, FRAGMENT_REPLY, FRAGMENT_SERVICE, FragmentKey,
        FragmentValue,
    },
    stats::Counter,
};

use crate::{
    forward::{Direction, Forwarded, forward},
    maps::LB_FRAGMENTS,
    nat::Rewrite,
    parse::{Packet, Piece},
    select::Endpoint,
    stats::{Drop, Verdict, count, event},
};

#[inline(always)]
fn key(packet: &Packet) -> FragmentKey {
    FragmentKey {
        src_addr: packet.src_addr,
        dst_addr: packet.dst_addr,
        id: packet.ip_id,
        proto: packet.proto,
        _pad: 0,
    }
}

/// Records that the first fragment `packet`, travelling in `direction`, was translated by
/// `rewrite`. Does nothing for an unfragmented packet.
#[inline(always)]
pub fn remember(packet: &Packet, direction: Direction, rewrite: &Rewrite) {
    let kind = match direction {
        Direction::Service => FRAGMENT_SERVICE,
        Direction::Reply => FRAGMENT_REPLY,
    };
    let addr = |end: Option<Endpoint>| end.map_or(0, |end| end.addr);
    record(packet, kind, addr(rewrite.src), addr(rewrite.dst));
}

/// Records that the first fragment `packet` was rejected or dropped. Does nothing for an
/// unfragmented packet.
#[inline(always)]
pub fn refuse(packet: &Packet) {
    record(packet, FRAGMENT_REFUSED, 0, 0);
}

#[inline(always)]
fn record(packet: &Packet, kind: u8, src_addr: u32, dst_addr: u32) {
    if packet.piece != Piece::First || packet.notes.explain {
        return;
    }
    let value = FragmentValue {
        src_addr,
        dst_addr,
        kind,
        _pad: [0; 7],
        created_ns: unsafe { bpf_ktime_get_ns() },
    };
    if LB_FRAGMENTS
        .insert(key(packet), value, BPF_ANY as u64)
        .is_err()
    {
        count(Counter::FragmentInsertFailed);
    }
}

/// Translates the later fragment `packet` as its first fragment was, and sends it on (or drops
/// it with its refused first fragment).
#[inline(always)]
pub fn follow(ctx: &XdpContext, packet: &Packet) -> Result<Verdict, Drop> {
    let Some(entry) = LB_FRAGMENTS.get_ptr(key(packet)) else {
        return Ok(Verdict::pass(Counter::PassFragment));
    };
    let entry = unsafe { *entry };
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(entry.created_ns) > FRAGMENT_LIFETIME_NS {
        return Ok(Verdict::pass(Counter::PassFragment));
    }
    if entry.kind == FRAGMENT_REFUSED {
        return Err(Drop::FragmentRefused);
    }
    let ip = packet.ip;
    // SAFETY: `parse` bounds-checked the IPv4 header.
    unsafe {
        if entry.src_addr != 0 {
            let old = (*ip).src;
            (*ip).src = entry.src_addr;
            (*ip).check = replace_u32((*ip).check, old, entry.src_addr);
        }
        if entry.dst_addr != 0 {
            let old = (*ip).dst;
            (*ip).dst = entry.dst_addr;
            (*ip).check = replace_u32((*ip).check, old, entry.dst_addr);
        }
    }
    let direction = if entry.kind == FRAGMENT_REPLY {
        Direction::Reply
    } else {
        Direction::Service
    };
    event(packet, Counter::FragmentTranslated);
    Ok(match forward(ctx, packet, false, direction) {
        Forwarded::Verdict(verdict) => verdict,
        // A fragment may not carry DF; the kernel sorts out one that does.
        Forwarded::TooBig { .. } => direction.to_stack(packet, Counter::StackFragNeeded),
    })
}
