//! `lb explain`: the live program run on a synthesized packet (`BPF_PROG_TEST_RUN`) that reports
//! what it decided and changes nothing.
//!
//! The request and the answer travel in the packet's XDP metadata, the bytes in front of the
//! frame that only XDP programs and `BPF_PROG_TEST_RUN` callers can write (`ctx.data` of the test
//! run's `xdp_md` gives their length). A packet from the wire has none when our program sees it,
//! so no sender on the wire can make a packet an explain run (a local XDP program that writes
//! metadata before ours, or redirects into a veth, could). `lb explain` puts a [`Trace`] there with
//! `magic` set to [`EXPLAIN_MAGIC`]; the program then:
//! - reads every map as usual (frontends, conntrack, affinity, source ranges, FIB), so it follows
//!   a tracked flow or an affinity entry exactly as the next real packet would;
//! - writes none: no conntrack, affinity or fragment entry is created, refreshed or deleted, no
//!   source NAT port is claimed, no counter moves, the reject rate budget is not spent;
//! - fills in the rest of the trace, which the test run hands back in front of the output packet.
//!
//! The kernel allows at most 32 bytes of metadata, hence the trace's size.

use bytemuck::{Pod, Zeroable};

/// `Trace::magic` of an explain run: "LBXP".
pub const EXPLAIN_MAGIC: u32 = 0x4c42_5850;
/// `Trace::magic` once the program has filled the trace in: "LBXD". A program that does not know
/// explain runs (an older build still attached) leaves `EXPLAIN_MAGIC`, and `lb explain` then
/// refuses to report, since that program may have changed live state.
pub const EXPLAIN_DONE: u32 = 0x4c42_5844;

/// `Trace::service_id`/`backend_id` when there is none.
pub const NO_ID: u32 = u32::MAX;

/// `Trace::steps`: the destination is a Service frontend (`service_id` says which).
pub const STEP_FRONTEND: u32 = 1;
/// `Trace::steps`: the frontend has `loadBalancerSourceRanges` and the client lies in them.
pub const STEP_SOURCE_ALLOWED: u32 = 2;
/// `Trace::steps`: the packet follows its flow's live conntrack entry.
pub const STEP_TRACKED: u32 = 4;
/// `Trace::steps`: a new flow; its backend was drawn at random among `candidates` slots.
pub const STEP_RANDOM: u32 = 8;
/// `Trace::steps`: the packet is a backend's reply on a tracked flow.
pub const STEP_REPLY: u32 = 16;
/// `Trace::steps`: the flow has a conntrack entry that may no longer be followed (expired, closed
/// and reopened, or its backend gone): a new choice replaces it.
pub const STEP_STALE_ENTRY: u32 = 32;

/// The request and answer of an explain run, in the packet's XDP metadata.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Trace {
    /// [`EXPLAIN_MAGIC`], written by `lb explain` (anything else is a normal packet); the
    /// program answers with [`EXPLAIN_DONE`].
    pub magic: u32,
    /// `STEP_*` bits: the branches taken.
    pub steps: u32,
    /// Bit `n` set: the event (or verdict) counter with index `n` fired (`stats::Counter`).
    pub events: u64,
    /// The frontend matched (its service id), or the one a reply belongs to; [`NO_ID`] when none.
    pub service_id: u32,
    /// The backend chosen or followed (an `LB_BACKENDS` id); [`NO_ID`] when none.
    pub backend_id: u32,
    /// For a random choice: the slots it was made among (the frontend's `backend_count`).
    pub candidates: u32,
    /// The verdict: the index of the counter the packet would be counted under.
    pub verdict: u32,
}

/// Bytes of metadata an explain run carries.
pub const TRACE_LEN: usize = size_of::<Trace>();

const _: () = assert!(
    TRACE_LEN == 32,
    "the kernel allows at most 32 bytes of XDP metadata"
);

impl Trace {
    /// The request `lb explain` sends: nothing decided yet.
    pub const fn request() -> Self {
        Self {
            magic: EXPLAIN_MAGIC,
            steps: 0,
            events: 0,
            service_id: NO_ID,
            backend_id: NO_ID,
            candidates: 0,
            verdict: 0,
        }
    }
}
