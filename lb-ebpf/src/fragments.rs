//! IPv4 fragments of a translated datagram. Only the first fragment carries the ports a Service
//! is chosen by; it is translated like any packet (its UDP or TCP checksum covers the whole
//! datagram, so the incremental update holds), and how is recorded in `LB_FRAGMENTS` under the
//! datagram's identity (source, destination, IPv4 id, protocol). The later fragments look that
//! up and get the same address, so the receiver reassembles one datagram from one endpoint.
//!
//! A first fragment that is rejected or dropped is recorded too, and its later fragments are
//! dropped: left to the stack, they would be routed on still addressed to the Service. A later
//! fragment arriving before its first one, or more than `FRAGMENT_LIFETIME_NS` after it, is passed
//! untouched, as is any fragment of traffic the program does not translate.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns, programs::XdpContext};
use lb_common::{
    checksum::replace_u32,
    conntrack::{
        FRAGMENT_DESTINATION, FRAGMENT_LIFETIME_NS, FRAGMENT_REFUSED, FRAGMENT_SOURCE, FragmentKey,
        FragmentValue,
    },
    stats::Counter,
};

use crate::{
    forward::{Direction, Forwarded, forward},
    maps::LB_FRAGMENTS,
    nat::Side,
    parse::{Packet, Piece},
    stats::{Drop, Verdict, count},
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

/// Records that the first fragment `packet` had its `side` translated to `addr`. Does nothing for
/// an unfragmented packet.
#[inline(always)]
pub fn remember(packet: &Packet, side: Side, addr: u32) {
    record(
        packet,
        match side {
            Side::Destination => FRAGMENT_DESTINATION,
            Side::Source => FRAGMENT_SOURCE,
        },
        addr,
    );
}

/// Records that the first fragment `packet` was rejected or dropped. Does nothing for an
/// unfragmented packet.
#[inline(always)]
pub fn refuse(packet: &Packet) {
    record(packet, FRAGMENT_REFUSED, 0);
}

#[inline(always)]
fn record(packet: &Packet, side: u8, addr: u32) {
    if packet.piece != Piece::First {
        return;
    }
    let value = FragmentValue {
        addr,
        side,
        _pad: [0; 3],
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
    if entry.side == FRAGMENT_REFUSED {
        return Err(Drop::FragmentRefused);
    }
    let ip = packet.ip;
    // SAFETY: `parse` bounds-checked the IPv4 header.
    let direction = unsafe {
        let (old, direction) = if entry.side == FRAGMENT_SOURCE {
            let old = (*ip).src;
            (*ip).src = entry.addr;
            (old, Direction::Reply)
        } else {
            let old = (*ip).dst;
            (*ip).dst = entry.addr;
            (old, Direction::Service)
        };
        (*ip).check = replace_u32((*ip).check, old, entry.addr);
        direction
    };
    count(Counter::FragmentTranslated);
    Ok(match forward(ctx, packet, false, direction) {
        Forwarded::Verdict(verdict) => verdict,
        // A fragment may not carry DF; the kernel sorts out one that does.
        Forwarded::TooBig { .. } => direction.to_stack(Counter::StackFragNeeded),
    })
}
