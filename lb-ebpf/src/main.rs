//! The `lb` XDP program: Service load balancing for Kubernetes in the kernel.
//!
//! Per packet: [`parse`] the headers; if the destination is a Service frontend, [`select`] a
//! backend (the tracked one, or a new random one recorded in conntrack) and [`nat`] the
//! destination (and the source, for source NAT); else, if the packet is a backend's reply to a
//! tracked flow, restore the Service address as its source (and the client as its destination); then [`forward`] it (FIB lookup and redirect, or the kernel stack).
//! A packet a Service cannot take (no endpoint, or a ClusterIP port the Service does not define)
//! is answered with ICMP port unreachable by [`reject`]; one to an unallocated address of a
//! service CIDR is dropped. Every exit path bumps exactly one verdict counter in [`stats`].
#![no_std]
#![no_main]
// Atomic adds for the traffic counters (see `stats::add`).
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "core::intrinsics::atomic_xadd is the only atomic add the BPF target offers"
)]

mod explain;
mod forward;
mod fragments;
mod icmp;
mod maps;
mod nat;
mod parse;
mod reject;
mod select;
mod sock;
mod stats;

use aya_ebpf::{macros::xdp, programs::XdpContext};
use lb_common::{
    explain::{STEP_FRONTEND, STEP_REPLY, STEP_SOURCE_ALLOWED},
    service::{SERVICE_DROP_WHEN_EMPTY, SERVICE_SOURCE_RANGES, ServiceKey, ServiceValue},
    stats::{Counter, CounterKind},
};

use crate::{
    explain::Notes,
    forward::{Direction, Forwarded},
    nat::Rewrite,
    parse::{Packet, Parsed},
    reject::Unreachable,
    stats::{Drop, Verdict, Way},
};

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let notes = Notes::new(explain::requested(&ctx));
    let result = process(&ctx, &notes);
    if notes.explain {
        explain::finish(&ctx, &notes, result)
    } else {
        stats::finish(result)
    }
}

/// Whether `result` left the packet untranslated: dropped or answered with an ICMP error.
#[inline(always)]
fn is_refusal(result: &Result<Verdict, Drop>) -> bool {
    match result {
        Err(_) => true,
        Ok(verdict) => verdict.counter.kind() == CounterKind::Reject,
    }
}

#[inline(always)]
fn process(ctx: &XdpContext, notes: &Notes) -> Result<Verdict, Drop> {
    let packet = match parse::parse(ctx, notes)? {
        Parsed::Packet(packet) => packet,
        Parsed::IcmpError(error) => return icmp::translate(ctx, &error),
        Parsed::NotIpv4 => return Ok(Verdict::pass(Counter::PassNotIpv4)),
        Parsed::NotTcpUdp => return Ok(Verdict::pass(Counter::PassNotTcpUdp)),
        Parsed::LaterFragment(packet) => return fragments::follow(ctx, &packet),
    };

    let result = to_service_or_reply(ctx, &packet);
    // A refused first fragment takes its later fragments with it.
    if is_refusal(&result) {
        fragments::refuse(&packet);
    }
    result
}

/// A TCP or UDP packet: to a Service, a reply, or neither.
#[inline(always)]
fn to_service_or_reply(ctx: &XdpContext, packet: &Packet) -> Result<Verdict, Drop> {
    let frontend = ServiceKey {
        addr: packet.dst_addr,
        port: packet.dst_port,
        proto: packet.proto,
        _pad: 0,
    };
    if let Some(service) = maps::lookup_service(&frontend) {
        packet.notes.step(STEP_FRONTEND);
        packet.notes.service(service.service_id);
        let result = to_service(ctx, packet, &frontend, &service);
        // Translated: a backend was chosen (and noted) and the packet sent on towards it.
        if is_refusal(&result) {
            stats::refused(packet, service.service_id);
        } else {
            let backend_id = packet.notes.chosen_backend();
            stats::traffic(packet, service.service_id, backend_id, Way::ToBackend);
        }
        return result;
    }

    if let Some(reply) = select::lookup_reply(packet) {
        packet.notes.step(STEP_REPLY);
        packet.notes.service(reply.service_id);
        packet.notes.backend(reply.backend_id);
        let rewrite = Rewrite {
            src: Some(reply.service),
            dst: reply.client,
        };
        let result = send(ctx, packet, Direction::Reply, &rewrite);
        // Counted under the flow's ids only while they are still its: a long-lived flow may
        // outlast its endpoint, whose ids then count for their next owner.
        let still_its = maps::lookup_backend(reply.backend_id).is_some_and(|backend| {
            backend.addr == packet.src_addr
                && backend.port == packet.src_port
                && backend.service_id == reply.service_id
        });
        if still_its && !is_refusal(&result) {
            stats::traffic(packet, reply.service_id, reply.backend_id, Way::Reply);
        }
        return result;
    }

    if maps::is_cluster_ip(packet.dst_addr) {
        return reject::reject(ctx, packet, Counter::RejectUndefinedPort);
    }
    if maps::config().in_service_cidr(packet.dst_addr) {
        return Err(Drop::UnallocatedServiceIp);
    }
    Ok(Verdict::pass(Counter::PassNoService))
}

/// A packet to the frontend `frontend`, whose value is `service`.
#[inline(always)]
fn to_service(
    ctx: &XdpContext,
    packet: &Packet,
    frontend: &ServiceKey,
    service: &ServiceValue,
) -> Result<Verdict, Drop> {
    // Every packet, not only a flow's first: a range withdrawn cuts its flows too.
    if service.flags & SERVICE_SOURCE_RANGES != 0 {
        if !maps::source_allowed(service.service_id, packet.src_addr) {
            return Err(Drop::SourceRange);
        }
        packet.notes.step(STEP_SOURCE_ALLOWED);
    }
    let Some(flow) = select::select_backend(ctx, packet, frontend, service)? else {
        if service.flags & SERVICE_DROP_WHEN_EMPTY != 0 {
            return Err(Drop::NoLocalEndpoint);
        }
        return reject::reject(ctx, packet, Counter::RejectNoEndpoints);
    };
    packet.notes.backend(flow.backend_id);
    let rewrite = Rewrite {
        src: flow.snat,
        dst: Some(flow.backend),
    };
    // A packet answered with fragmentation needed goes nowhere: the caller counts it refused.
    send(ctx, packet, Direction::Service, &rewrite)
}

/// Translates `packet` by `rewrite` and forwards it; one too big for its next hop (DF set) gets
/// its translation undone and is answered with fragmentation needed, quoting it as its sender
/// sent it.
#[inline(always)]
fn send(
    ctx: &XdpContext,
    packet: &Packet,
    direction: Direction,
    rewrite: &Rewrite,
) -> Result<Verdict, Drop> {
    let partial = nat::rewrite(ctx, packet, rewrite);
    fragments::remember(packet, direction, rewrite);
    match forward::forward(ctx, packet, partial, direction) {
        Forwarded::Verdict(verdict) => Ok(verdict),
        Forwarded::TooBig { mtu } => {
            nat::restore(packet, rewrite, partial);
            reject::answer(
                ctx,
                packet,
                Unreachable::FragNeeded { mtu },
                Counter::RejectFragNeeded,
            )
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable by construction: the verifier rejects a program whose panic path it can reach,
    // because this loop never ends.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
