//! Address and port rewriting with incremental checksum updates (RFC 1624).
//!
//! The IPv4 header checksum is always complete. The L4 checksum may be:
//! - zero (UDP only): "no checksum"; it stays zero;
//! - partial (the sender's socket left it to offload, `CHECKSUM_PARTIAL`): only the address change
//!   is folded in, because the port is summed when the kernel or NIC completes the checksum;
//! - complete: both the address and the port change are folded in; a UDP result of zero is sent
//!   as 0xffff (RFC 768).
//!
//! The partial case is recognised by value, since XDP cannot see the socket buffer's
//! `ip_summed` (see `lb_common::checksum::is_partial`), and only on interfaces where local sockets
//! send (veths, flagged in `LB_IFACES`): a NIC delivers complete checksums, so there a checksum
//! that merely looks partial is complete.

use lb_common::{
    checksum::{is_partial, partial_replace_u32, pseudo_header_sum, replace_u16, replace_u32},
    net::IPPROTO_UDP,
};

use aya_ebpf::programs::XdpContext;

use crate::{
    maps::has_local_senders,
    parse::{Packet, Piece, TCP_CHECK_OFFSET, UDP_CHECK_OFFSET},
    select::Endpoint,
};

/// Which end of the packet a rewrite replaces.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// DNAT: towards the backend; after source NAT, the reply back to the client.
    Destination,
    /// Reverse NAT: the reply's source becomes the Service again; or source NAT.
    Source,
}

/// A translation of a packet: each end given an address and port is replaced, the other kept.
#[derive(Clone, Copy)]
pub struct Rewrite {
    pub src: Option<Endpoint>,
    pub dst: Option<Endpoint>,
}

/// UDP's "checksum computed as zero" is transmitted as all ones.
const UDP_ZERO_CHECKSUM_SENT_AS: u16 = 0xffff;

/// Applies `rewrite` to `packet`. Returns whether the L4 checksum is partial, in which case the
/// packet must be finished by the kernel rather than redirected.
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, packet: &Packet, rewrite: &Rewrite) -> bool {
    let check_field = l4_check(packet);
    // SAFETY: `parse` bounds-checked the whole fixed L4 header, which holds the checksum.
    let old_check = unsafe { *check_field };
    // Fragments always carry complete checksums: the kernel completes one before fragmenting.
    let partial = old_check != 0
        && packet.piece == Piece::Whole
        && is_partial(
            old_check,
            pseudo_header_sum(
                packet.src_addr,
                packet.dst_addr,
                packet.proto,
                packet.l4_len,
            ),
        )
        && has_local_senders(ctx.ingress_ifindex() as u32);
    switch(packet, Side::Destination, rewrite.dst, partial, false);
    switch(packet, Side::Source, rewrite.src, partial, false);
    partial
}

/// Puts `packet` back as its sender sent it, after `rewrite` applied `done` and found its
/// checksum `partial` or not.
#[inline(always)]
pub fn restore(packet: &Packet, done: &Rewrite, partial: bool) {
    switch(packet, Side::Destination, done.dst, partial, true);
    switch(packet, Side::Source, done.src, partial, true);
}

/// Moves `side` of `packet` from its original address and port to `end` (or back, `undo`);
/// nothing when `end` is `None`.
#[inline(always)]
fn switch(packet: &Packet, side: Side, end: Option<Endpoint>, partial: bool, undo: bool) {
    let Some(end) = end else {
        return;
    };
    let original = match side {
        Side::Destination => (packet.dst_addr, packet.dst_port),
        Side::Source => (packet.src_addr, packet.src_port),
    };
    let translated = (end.addr, end.port);
    if undo {
        apply(packet, side, translated, original, partial);
    } else {
        apply(packet, side, original, translated, partial);
    }
}

#[inline(always)]
fn l4_check(packet: &Packet) -> *mut u16 {
    let check_offset = if packet.proto == IPPROTO_UDP {
        UDP_CHECK_OFFSET
    } else {
        TCP_CHECK_OFFSET
    };
    // SAFETY: in bounds, see `rewrite`.
    unsafe { packet.l4.add(check_offset).cast::<u16>() }
}

/// Replaces `old` by `new` on `side` of `packet`, with the checksum updates the module
/// documentation describes.
#[inline(always)]
fn apply(packet: &Packet, side: Side, old: (u32, u16), new: (u32, u16), partial: bool) {
    let ip = packet.ip;
    let ports = packet.l4.cast::<[u16; 2]>();
    let l4_check = l4_check(packet);
    let ((old_addr, old_port), (addr, port)) = (old, new);
    // SAFETY: `parse` bounds-checked the IPv4 header and the whole fixed L4 header, which holds
    // the ports and the checksum field.
    unsafe {
        let old_check = *l4_check;
        match side {
            Side::Destination => {
                (*ip).dst = addr;
                (*ports)[1] = port;
            }
            Side::Source => {
                (*ip).src = addr;
                (*ports)[0] = port;
            }
        }
        (*ip).check = replace_u32((*ip).check, old_addr, addr);

        if old_check == 0 && packet.proto == IPPROTO_UDP {
            // No checksum: nothing to update.
        } else if partial {
            *l4_check = partial_replace_u32(old_check, old_addr, addr);
        } else {
            let check = replace_u16(replace_u32(old_check, old_addr, addr), old_port, port);
            *l4_check = if check == 0 && packet.proto == IPPROTO_UDP {
                UDP_ZERO_CHECKSUM_SENT_AS
            } else {
                check
            };
        }
    }
}
