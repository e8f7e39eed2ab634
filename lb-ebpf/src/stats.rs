//! Verdicts, drop reasons and the per-CPU counters: the single place where a result becomes an
//! XDP action, so that no exit path goes uncounted.

use aya_ebpf::bindings::xdp_action;
use lb_common::stats::Counter;

use crate::maps::LB_STATS;

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
    const fn counter(self) -> Counter {
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
