//! `lb explain` runs (see `lb_common::explain`): recognising one, noting what the program decides
//! while it runs, and handing the trace back in the packet's metadata.
//!
//! Every packet carries [`Notes`]; the program notes its branches unconditionally (a few stores
//! to the stack are cheaper than testing first), and only an explain run copies them out. What
//! must not happen in an explain run (map writes, counters) tests `Notes::explain` instead.

use core::{cell::Cell, mem::size_of};

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    explain::{EXPLAIN_DONE, EXPLAIN_MAGIC, NO_ID, TRACE_LEN, Trace},
    stats::Counter,
};

use crate::stats::{Drop, Verdict};

/// What the program decided about one packet so far.
pub struct Notes {
    /// The packet is an explain run: trace, and write nothing live.
    pub explain: bool,
    steps: Cell<u32>,
    events: Cell<u64>,
    service_id: Cell<u32>,
    backend_id: Cell<u32>,
    candidates: Cell<u32>,
}

impl Notes {
    #[inline(always)]
    pub const fn new(explain: bool) -> Self {
        Self {
            explain,
            steps: Cell::new(0),
            events: Cell::new(0),
            service_id: Cell::new(NO_ID),
            backend_id: Cell::new(NO_ID),
            candidates: Cell::new(0),
        }
    }

    /// A branch taken (`lb_common::explain::STEP_*`).
    #[inline(always)]
    pub fn step(&self, step: u32) {
        self.steps.set(self.steps.get() | step);
    }

    /// An event counter that fired.
    #[inline(always)]
    pub fn event(&self, counter: Counter) {
        self.events.set(self.events.get() | 1 << counter as u32);
    }

    /// The frontend the packet is for (or a reply belongs to).
    #[inline(always)]
    pub fn service(&self, service_id: u32) {
        self.service_id.set(service_id);
    }

    /// The backend chosen or followed.
    #[inline(always)]
    pub fn backend(&self, backend_id: u32) {
        self.backend_id.set(backend_id);
    }

    /// The backend chosen or followed, once [`Notes::backend`] said it.
    #[inline(always)]
    pub fn chosen_backend(&self) -> u32 {
        self.backend_id.get()
    }

    /// The slots a random choice was made among.
    #[inline(always)]
    pub fn candidates(&self, count: u32) {
        self.candidates.set(count);
    }
}

/// Whether the packet in `ctx` is an explain run: its metadata holds a trace request.
#[inline(always)]
pub fn requested(ctx: &XdpContext) -> bool {
    let meta = ctx.metadata();
    if meta + size_of::<Trace>() > ctx.data() {
        return false;
    }
    // SAFETY: bounds-checked against the start of the packet just above.
    unsafe { (*(meta as *const Trace)).magic == EXPLAIN_MAGIC }
}

/// Ends an explain run: writes the trace, with the verdict the packet would be counted under,
/// into the metadata, and returns the XDP action without counting anything.
#[inline(always)]
pub fn finish(ctx: &XdpContext, notes: &Notes, result: Result<Verdict, Drop>) -> u32 {
    let (action, counter) = match result {
        Ok(verdict) => (verdict.action, verdict.counter),
        Err(reason) => (xdp_action::XDP_DROP, reason.counter()),
    };
    // A reject moved the frame (and its metadata with it): find it again.
    let meta = ctx.metadata();
    if meta + TRACE_LEN <= ctx.data() {
        let trace = meta as *mut Trace;
        // SAFETY: bounds-checked just above.
        unsafe {
            (*trace).magic = EXPLAIN_DONE;
            (*trace).steps = notes.steps.get();
            (*trace).events = notes.events.get() | 1 << counter as u32;
            (*trace).service_id = notes.service_id.get();
            (*trace).backend_id = notes.backend_id.get();
            (*trace).candidates = notes.candidates.get();
            (*trace).verdict = counter as u32;
        }
    }
    action
}
