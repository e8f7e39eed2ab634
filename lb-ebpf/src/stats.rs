//! Verdicts, drop reasons and the per-CPU counters: the single place where a result becomes an
//! XDP action, so that no exit path goes uncounted.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::bindings::xdp_action;
use lb_common::stats::{Counter, Traffic};

use crate::{
    maps::{LB_BE_TRAFFIC, LB_STATS, LB_SVC_TRAFFIC},
    parse::Packet,
};

/// Why a packet is dropped. Every variant has its own counter.
#[derive(Clone, Copy)]
pub enum Drop {
    /// Truncated or invalid headers.
    Malformed,
    /// A `Local` traffic policy left the frontend no endpoint on this node.
    NoLocalEndpoint,
    /// To an unallocated address inside a service CIDR.
    UnallocatedServiceIp,
    /// From outside the frontend's `loadBalancerSourceRanges`.
    SourceRange,
    /// A later fragment of a datagram whose first fragment was refused.
    FragmentRefused,
    /// A reject was due; this CPU's ICMP budget for the second is spent.
    RejectRateLimited,
    /// A reject was due; the packet's source may not be answered with an ICMP error.
    RejectNotUnicast,
    /// A reject was due; the frame could not be resized.
    RejectFailed,
    /// The Service's backend set points at a missing slot or backend.
    BackendMissing,
    /// Every backend tried would collide with another live flow's tuple.
    TupleCollision,
    /// Source NAT found no free port towards the endpoint.
    SnatNoPort,
    /// Source NAT found no route, hence no source address, towards the endpoint.
    SnatNoSource,
    /// A new flow with source NAT could not be recorded.
    FlowUntracked,
}

impl Drop {
    pub const fn counter(self) -> Counter {
        match self {
            Drop::Malformed => Counter::DropMalformed,
            Drop::NoLocalEndpoint => Counter::DropNoLocalEndpoint,
            Drop::UnallocatedServiceIp => Counter::DropUnallocatedServiceIp,
            Drop::SourceRange => Counter::DropSourceRange,
            Drop::FragmentRefused => Counter::DropFragmentRefused,
            Drop::RejectRateLimited => Counter::DropRejectRateLimited,
            Drop::RejectNotUnicast => Counter::DropRejectNotUnicast,
            Drop::RejectFailed => Counter::DropRejectFailed,
            Drop::BackendMissing => Counter::DropBackendMissing,
            Drop::TupleCollision => Counter::DropTupleCollision,
            Drop::SnatNoPort => Counter::DropSnatNoPort,
            Drop::SnatNoSource => Counter::DropSnatNoSource,
            Drop::FlowUntracked => Counter::DropFlowUntracked,
        }
    }
}

/// An XDP action together with the verdict counter it is accounted under.
pub struct Verdict {
    pub action: u32,
    pub counter: Counter,
}

impl Verdict {
    /// Leave the packet to the kernel stack.
    #[inline(always)]
    pub const fn pass(counter: Counter) -> Self {
        Verdict {
            action: xdp_action::XDP_PASS,
            counter,
        }
    }
}

/// Adds one to `counter` on this CPU.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(value) = LB_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot; XDP runs with preemption disabled, so nothing else writes it now.
        unsafe { *value += 1 };
    }
}

/// Records the event `counter` for `packet`: counted, or only noted in an explain run.
#[inline(always)]
pub fn event(packet: &Packet, counter: Counter) {
    packet.notes.event(counter);
    if !packet.notes.explain {
        count(counter);
    }
}

/// Adds `value` to a counter other CPUs add to as well.
///
/// # Safety
/// `counter` points at a live map value.
#[inline(always)]
unsafe fn add(counter: *mut u64, value: u64) {
    // `AtomicU64::fetch_add` does not exist on this target (no compare-and-swap), but an
    // atomic add does: the intrinsic becomes one `lock add` instruction.
    // SAFETY: the caller's pointer, valid and aligned (map values are 8-byte aligned).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, value) };
}

/// Which way a translated packet went, for the traffic counters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Towards a backend.
    ToBackend,
    /// A backend's reply.
    Reply,
}

/// Adds `packet` to the traffic of `traffic` in direction `way`.
///
/// # Safety
/// `traffic` points at a live map value.
#[inline(always)]
unsafe fn add_packet(traffic: *mut Traffic, way: Way, bytes: u64) {
    unsafe {
        match way {
            Way::ToBackend => {
                add(&raw mut (*traffic).packets, 1);
                add(&raw mut (*traffic).bytes, bytes);
            }
            Way::Reply => {
                add(&raw mut (*traffic).reply_packets, 1);
                add(&raw mut (*traffic).reply_bytes, bytes);
            }
        }
    }
}

/// Counts a translated `packet` of frontend `service_id` through backend `backend_id`; nothing in
/// an explain run.
#[inline(always)]
pub fn traffic(packet: &Packet, service_id: u32, backend_id: u32, way: Way) {
    if packet.notes.explain {
        return;
    }
    let bytes = packet.ip_len() as u64;
    // SAFETY: map values, for as long as the program runs.
    unsafe {
        if let Some(service) = LB_SVC_TRAFFIC.get_ptr_mut(service_id) {
            add_packet(&raw mut (*service).traffic, way, bytes);
        }
        if let Some(backend) = LB_BE_TRAFFIC.get_ptr_mut(backend_id) {
            add_packet(backend, way, bytes);
        }
    }
}

/// Counts a new flow of frontend `service_id` given to backend `backend_id`; nothing in an explain
/// run.
#[inline(always)]
pub fn new_flow(packet: &Packet, service_id: u32, backend_id: u32) {
    if packet.notes.explain {
        return;
    }
    // SAFETY: map values, for as long as the program runs.
    unsafe {
        if let Some(service) = LB_SVC_TRAFFIC.get_ptr_mut(service_id) {
            add(&raw mut (*service).traffic.flows, 1);
        }
        if let Some(backend) = LB_BE_TRAFFIC.get_ptr_mut(backend_id) {
            add(&raw mut (*backend).flows, 1);
        }
    }
}

/// Counts a packet to frontend `service_id` that was dropped or rejected; nothing in an explain
/// run.
#[inline(always)]
pub fn refused(packet: &Packet, service_id: u32) {
    if packet.notes.explain {
        return;
    }
    if let Some(service) = LB_SVC_TRAFFIC.get_ptr_mut(service_id) {
        // SAFETY: a map value, for as long as the program runs.
        unsafe { add(&raw mut (*service).refused, 1) };
    }
}

/// Turns the program's result into its XDP action, counting it.
#[inline(always)]
pub fn finish(result: Result<Verdict, Drop>) -> u32 {
    match result {
        Ok(verdict) => {
            count(verdict.counter);
            verdict.action
        }
        Err(reason) => {
            count(reason.counter());
            xdp_action::XDP_DROP
        }
    }
}
