//! Backend choice and connection tracking.
//!
//! A packet to a Service follows its flow's conntrack entry while that entry is valid: not
//! expired, not a new TCP connection reusing the tuple of a closed one, and pointing at a backend
//! that `LB_BACKENDS` still holds for this Service with the same address and port. Otherwise a
//! backend is drawn uniformly at random among the Service's slots (kube-proxy's behaviour) and
//! recorded: the original entry (client -> VIP) names the backend, the reply entry
//! (backend -> client) names the VIP to restore on the way back. With session affinity
//! (`sessionAffinity: ClientIP`), a new flow first goes where its client's last new flow to the
//! frontend went (`LB_AFFINITY`), while that is within the timeout and the backend still takes
//! new flows.
//!
//! Source NAT (external traffic to an endpoint on another node under `externalTrafficPolicy:
//! Cluster`, and hairpins) gives a new flow the node's address towards the backend, as the kernel
//! would pick it, and a random free port of `SNAT_PORTS`: the reply entry is keyed by the backend's
//! tuple towards that address and port, so claiming the port and recording the reply entry are one
//! `BPF_NOEXIST` insert.
//!
//! The two entries of a flow share one liveness and one close state: whenever a packet refreshes
//! its own entry (at most once per `REFRESH_INTERVAL_NS`), brings a new FIN/RST, or is the flow's
//! first reply (`SEEN_REPLY`: until then the flow has netfilter's short unanswered lifetimes), the
//! peer entry is updated too. So a flow is alive while either direction carries traffic, a reset sent by the
//! backend closes the flow for the client's next SYN, and an expired flow translates neither way.
//!
//! Conntrack values are shared with other CPUs and with userspace: they are only ever accessed
//! through raw pointers, field by field, never through references.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_EXIST, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::XdpContext,
};
use lb_common::{
    conntrack::{
        DIRECTION_ORIGINAL, DIRECTION_REPLY, FlowKey, FlowState, REFRESH_INTERVAL_NS, SEEN_FIN,
        SEEN_REPLY, SEEN_RST, SNAT_PORTS, is_expired,
    },
    explain::{STEP_RANDOM, STEP_STALE_ENTRY, STEP_TRACKED},
    service::{
        AffinityKey, AffinityValue, BACKEND_DRAINING, BACKEND_REMOTE, Backend, NS_PER_SECOND,
        SERVICE_SNAT_REMOTE, ServiceKey, ServiceValue, SlotKey,
    },
    stats::Counter,
};

use crate::{
    forward::source_towards,
    maps::{LB_AFFINITY, LB_CONNTRACK, LB_SLOTS, lookup_backend, lookup_service},
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::{self, Drop, count, event},
};

/// An address and port to rewrite one side of a packet to (network byte order).
#[derive(Clone, Copy)]
pub struct Endpoint {
    pub addr: u32,
    pub port: u16,
}

/// How a packet to a Service is translated: its destination becomes the backend, and with source
/// NAT its source becomes the node address and port the flow leaves from.
pub struct Translation {
    pub backend: Endpoint,
    pub snat: Option<Endpoint>,
    /// The backend's `LB_BACKENDS` id.
    pub backend_id: u32,
}

/// How a backend's reply is translated: its source becomes the Service again, and after source NAT
/// its destination becomes the client again.
pub struct Reply {
    pub service: Endpoint,
    pub client: Option<Endpoint>,
    /// The frontend's service id and the backend's id, for the traffic counters.
    pub service_id: u32,
    pub backend_id: u32,
}

/// `-EEXIST`: another CPU recorded the same new flow first.
const EEXIST: i32 = -17;
/// Backends tried for a new flow before giving up on a tuple collision.
const COLLISION_ATTEMPTS: u32 = 3;
/// Random ports of `SNAT_PORTS` tried for a new flow with source NAT before it is dropped.
const SNAT_PORT_ATTEMPTS: u32 = 8;
/// The first port of `SNAT_PORTS`, and how many there are.
const SNAT_FIRST_PORT: u16 = *SNAT_PORTS.start();
const SNAT_PORT_COUNT: u32 = (*SNAT_PORTS.end() - *SNAT_PORTS.start()) as u32 + 1;

#[inline(always)]
fn original_key(packet: &Packet) -> FlowKey {
    FlowKey::new(
        (packet.src_addr, packet.src_port),
        (packet.dst_addr, packet.dst_port),
        packet.proto,
        DIRECTION_ORIGINAL,
    )
}

/// The reply entry of a flow whose packets reach `backend` from `from`: the client, or the
/// address and port source NAT gave it.
#[inline(always)]
fn reply_key(proto: u8, backend: (u32, u16), from: (u32, u16)) -> FlowKey {
    FlowKey::new(backend, from, proto, DIRECTION_REPLY)
}

/// Where a tracked flow's packets reach its backend from: `state.snat_*` with source NAT, else the
/// client itself.
#[inline(always)]
fn sent_from(packet: &Packet, state: &FlowState) -> (u32, u16) {
    if state.snat_addr != 0 {
        (state.snat_addr, state.snat_port)
    } else {
        (packet.src_addr, packet.src_port)
    }
}

/// The `SEEN_*` bits `tcp_flags` contributes.
#[inline(always)]
fn closing_bits(tcp_flags: u8) -> u8 {
    let mut bits = 0;
    if tcp_flags & TCP_FIN != 0 {
        bits |= SEEN_FIN;
    }
    if tcp_flags & TCP_RST != 0 {
        bits |= SEEN_RST;
    }
    bits
}

#[inline(always)]
fn is_closed(tcp_flags: u8) -> bool {
    tcp_flags & (SEEN_FIN | SEEN_RST) != 0
}

/// Records that the flow is alive, closing if the packet says so, and answered if it is a reply
/// (`reply`), on `state` and on the entry of the other direction (`peer`). Looks the peer up only
/// when something changed. Writes race only with the same flow on another CPU, and every writer
/// moves the values the same way (flags only gain bits, timestamps only move forward).
///
/// # Safety
/// `state` points at a live `LB_CONNTRACK` value.
#[inline(always)]
unsafe fn touch(state: *mut FlowState, peer: &FlowKey, tcp_flags: u8, reply: bool, now: u64) {
    unsafe {
        let flags = (*state).tcp_flags;
        let answered = if reply { SEEN_REPLY } else { 0 };
        let closing = (closing_bits(tcp_flags) | answered) & !flags;
        let refresh = now.saturating_sub((*state).last_seen_ns) > REFRESH_INTERVAL_NS;
        if closing == 0 && !refresh {
            return;
        }
        (*state).tcp_flags = flags | closing;
        if refresh {
            (*state).last_seen_ns = now;
        }
        if let Some(peer) = LB_CONNTRACK.get_ptr_mut(peer) {
            (*peer).tcp_flags |= flags | closing;
            if refresh && (*peer).last_seen_ns < now {
                (*peer).last_seen_ns = now;
            }
        }
    }
}

/// Whether a tracked flow may keep its backend for this packet.
///
/// # Safety
/// `state` points at a live `LB_CONNTRACK` value.
#[inline(always)]
unsafe fn still_pinned(state: *const FlowState, packet: &Packet, now: u64) -> bool {
    let state = unsafe { *state };
    let new_connection = packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if new_connection && is_closed(state.tcp_flags) {
        return false;
    }
    if is_expired(&state, packet.proto, now) {
        return false;
    }
    // A backend id freed and reused for another Service (or another endpoint) must not keep
    // the flow: the endpoint must still serve this very Service at the same address and port.
    match lookup_backend(state.backend_id) {
        Some(backend) => {
            backend.addr == state.nat_addr
                && backend.port == state.nat_port
                && backend.service_id == state.service_id
        }
        None => false,
    }
}

/// Whether the reply tuple of a new flow to `backend` belongs to another live flow: the same
/// client port reaching the same endpoint through another Service (the backend would see one
/// connection, and the other flow's replies would get the wrong source). A flow with source NAT
/// never collides: it gets a port of its own.
#[inline(always)]
fn collides(packet: &Packet, service: &ServiceValue, backend: &Backend, now: u64) -> bool {
    if needs_snat(packet, service, backend) {
        return false;
    }
    let key = reply_key(
        packet.proto,
        (backend.addr, backend.port),
        (packet.src_addr, packet.src_port),
    );
    let Some(existing) = LB_CONNTRACK.get_ptr(key) else {
        return false;
    };
    let existing = unsafe { *existing };
    let same_service = existing.nat_addr == packet.dst_addr && existing.nat_port == packet.dst_port;
    !same_service && !is_closed(existing.tcp_flags) && !is_expired(&existing, packet.proto, now)
}

/// Picks a backend among `service`'s slots at random, avoiding one whose translated tuple is taken
/// by another live flow. Returns the backend id and entry, or `None` when the frontend has no
/// backends.
#[inline(always)]
fn pick(packet: &Packet, service: &ServiceValue, now: u64) -> Result<Option<(u32, Backend)>, Drop> {
    let backend_count = service.backend_count;
    if backend_count == 0 {
        return Ok(None);
    }
    packet.notes.step(STEP_RANDOM);
    packet.notes.candidates(backend_count);
    let first = unsafe { bpf_get_prandom_u32() } % backend_count;
    for attempt in 0..COLLISION_ATTEMPTS {
        if attempt >= backend_count {
            break;
        }
        let mut slot = first + attempt;
        if slot >= backend_count {
            slot -= backend_count;
        }
        let key = SlotKey {
            backend_set: service.backend_set,
            slot,
        };
        let backend_id = unsafe { *LB_SLOTS.get_ptr(key).ok_or(Drop::BackendMissing)? };
        let backend = lookup_backend(backend_id).ok_or(Drop::BackendMissing)?;
        if !collides(packet, service, &backend, now) {
            if attempt > 0 {
                event(packet, Counter::FlowCollisionAvoided);
            }
            return Ok(Some((backend_id, backend)));
        }
    }
    Err(Drop::TupleCollision)
}

/// The backend session affinity gives a new flow of `packet`'s client to `service`: the one its
/// last new flow got, if that flow started within the timeout and the backend still serves the
/// frontend, takes new flows (not draining), and is not taken for this tuple by another flow.
#[inline(always)]
fn remembered(packet: &Packet, service: &ServiceValue, now: u64) -> Option<(u32, Backend)> {
    if service.affinity_timeout_s == 0 {
        return None;
    }
    let key = affinity_key(packet, service);
    let entry = unsafe { *LB_AFFINITY.get_ptr(key)? };
    let timeout = service.affinity_timeout_s as u64 * NS_PER_SECOND;
    if now.saturating_sub(entry.last_flow_ns) > timeout {
        return None;
    }
    let backend = lookup_backend(entry.backend_id)?;
    let usable = backend.service_id == service.service_id
        && backend.flags & BACKEND_DRAINING == 0
        && !collides(packet, service, &backend, now);
    usable.then_some((entry.backend_id, backend))
}

#[inline(always)]
fn affinity_key(packet: &Packet, service: &ServiceValue) -> AffinityKey {
    AffinityKey {
        client_addr: packet.src_addr,
        service_id: service.service_id,
    }
}

/// Remembers where `packet`'s client's new flow went, for session affinity (kube-proxy restarts
/// the timeout at every new connection, not at every packet).
#[inline(always)]
fn remember(packet: &Packet, service: &ServiceValue, backend_id: u32, now: u64) {
    if service.affinity_timeout_s == 0 {
        return;
    }
    let value = AffinityValue {
        backend_id,
        _pad: 0,
        last_flow_ns: now,
    };
    if LB_AFFINITY
        .insert(affinity_key(packet, service), value, BPF_ANY as u64)
        .is_err()
    {
        event(packet, Counter::AffinityInsertFailed);
    }
}

/// Whether a new flow of `packet` to `backend` leaves with the node's address as its source:
/// external traffic under `externalTrafficPolicy: Cluster` sent to another node, whose endpoint
/// would otherwise answer the client directly with its own address; or a hairpin, an endpoint
/// reaching itself through its Service, which would otherwise answer itself without coming back
/// through the program (kube-proxy masquerades both).
#[inline(always)]
fn needs_snat(packet: &Packet, service: &ServiceValue, backend: &Backend) -> bool {
    let remote = service.flags & SERVICE_SNAT_REMOTE != 0 && backend.flags & BACKEND_REMOTE != 0;
    remote || packet.src_addr == backend.addr
}

/// Claims a port of `SNAT_PORTS` for a flow leaving from `addr` towards `backend`, by recording
/// the flow's reply entry `reply` under it: the entry's key is what makes the port taken. A port
/// whose entry expired (it waits for the LRU to need its room) is taken over.
#[inline(always)]
fn claim_snat_port(
    packet: &Packet,
    backend: &Backend,
    addr: u32,
    reply: &FlowState,
    now: u64,
) -> Result<u16, Drop> {
    for _ in 0..SNAT_PORT_ATTEMPTS {
        let offset = unsafe { bpf_get_prandom_u32() } % SNAT_PORT_COUNT;
        let port = (SNAT_FIRST_PORT + offset as u16).to_be();
        let key = reply_key(packet.proto, (backend.addr, backend.port), (addr, port));
        match LB_CONNTRACK.insert(key, reply, BPF_NOEXIST as u64) {
            Ok(()) => return Ok(port),
            Err(EEXIST) => {
                let Some(existing) = LB_CONNTRACK.get_ptr(key) else {
                    continue;
                };
                if is_expired(&unsafe { *existing }, packet.proto, now)
                    && LB_CONNTRACK.insert(key, reply, BPF_EXIST as u64).is_ok()
                {
                    return Ok(port);
                }
            }
            Err(_) => {}
        }
    }
    Err(Drop::SnatNoPort)
}

/// Removes the reply entry `key` of the flow `packet` belongs to, unless the entry has since been
/// given to another flow (a source NAT port taken over after expiry).
#[inline(always)]
fn remove_reply(packet: &Packet, key: &FlowKey, snat: bool) {
    let Some(entry) = LB_CONNTRACK.get_ptr(key) else {
        return;
    };
    let entry = unsafe { *entry };
    let ours = entry.nat_addr == packet.dst_addr
        && entry.nat_port == packet.dst_port
        && (!snat || (entry.snat_addr == packet.src_addr && entry.snat_port == packet.src_port));
    if ours {
        let _ = LB_CONNTRACK.remove(key);
    }
}

/// Whether two original entries translate alike (same backend and source NAT).
#[inline(always)]
fn same_translation(a: &FlowState, b: &FlowState) -> bool {
    a.nat_addr == b.nat_addr
        && a.nat_port == b.nat_port
        && a.snat_addr == b.snat_addr
        && a.snat_port == b.snat_port
}

/// Whether the reply entry `peer` of a live flow with source NAT is still the flow's; if the LRU
/// evicted it, claims it again. `false`: another flow owns the port now.
#[inline(always)]
fn reply_held(packet: &Packet, current: &FlowState, peer: &FlowKey) -> bool {
    if let Some(entry) = LB_CONNTRACK.get_ptr(peer) {
        let entry = unsafe { *entry };
        return entry.snat_addr == packet.src_addr
            && entry.snat_port == packet.src_port
            && entry.nat_addr == packet.dst_addr
            && entry.nat_port == packet.dst_port;
    }
    let reply = FlowState {
        nat_addr: packet.dst_addr,
        nat_port: packet.dst_port,
        snat_addr: packet.src_addr,
        snat_port: packet.src_port,
        ..*current
    };
    LB_CONNTRACK.insert(peer, reply, BPF_NOEXIST as u64).is_ok()
}

/// The translation of a tracked flow's packet.
#[inline(always)]
fn translation(state: &FlowState) -> Translation {
    Translation {
        backend_id: state.backend_id,
        backend: Endpoint {
            addr: state.nat_addr,
            port: state.nat_port,
        },
        snat: (state.snat_addr != 0).then_some(Endpoint {
            addr: state.snat_addr,
            port: state.snat_port,
        }),
    }
}

/// Chooses the backend for a packet to the frontend `key`, whose value is `service`: see the
/// module documentation. `None`: the packet starts a flow (or its flow lost its backend) and the
/// frontend has no backend to give it.
#[inline(always)]
pub fn select_backend(
    ctx: &XdpContext,
    packet: &Packet,
    key: &ServiceKey,
    service: &ServiceValue,
) -> Result<Option<Translation>, Drop> {
    let now = unsafe { bpf_ktime_get_ns() };
    let flow = original_key(packet);
    let mut replacing = false;
    if let Some(state) = LB_CONNTRACK.get_ptr_mut(flow) {
        // SAFETY: a live map value.
        unsafe {
            let current = *state;
            let peer = reply_key(
                packet.proto,
                (current.nat_addr, current.nat_port),
                sent_from(packet, &current),
            );
            if still_pinned(state, packet, now) {
                // An explain run takes a source NAT port as still held: it may claim nothing.
                if packet.notes.explain {
                    packet.notes.step(STEP_TRACKED);
                    return Ok(Some(translation(&current)));
                }
                if current.snat_addr == 0 || reply_held(packet, &current, &peer) {
                    packet.notes.step(STEP_TRACKED);
                    touch(state, &peer, packet.tcp_flags, false, now);
                    return Ok(Some(translation(&current)));
                }
                // Its port went to another flow: the flow starts again on a port of its own.
            } else if !packet.notes.explain {
                // The old backend's reply entry would otherwise translate stray packets from it.
                remove_reply(packet, &peer, current.snat_addr != 0);
            }
        }
        packet.notes.step(STEP_STALE_ENTRY);
        replacing = true;
    }

    let picked = match remembered(packet, service, now) {
        Some(backend) => {
            event(packet, Counter::AffinityHit);
            Some(backend)
        }
        None => match pick(packet, service, now) {
            // The agent switched the Service to a new backend set between our two lookups and
            // has already deleted the old set's slots: follow the switch once.
            Err(Drop::BackendMissing) => match lookup_service(key) {
                Some(fresh) if fresh.backend_set != service.backend_set => {
                    pick(packet, &fresh, now)?
                }
                _ => return Err(Drop::BackendMissing),
            },
            other => other?,
        },
    };
    let Some((backend_id, backend)) = picked else {
        return Ok(None);
    };

    let mut state = FlowState {
        nat_addr: backend.addr,
        nat_port: backend.port,
        tcp_flags: closing_bits(packet.tcp_flags),
        _pad: 0,
        backend_id,
        service_id: backend.service_id,
        created_ns: now,
        last_seen_ns: now,
        snat_addr: 0,
        snat_port: 0,
        _pad2: 0,
    };
    let mut reply = FlowState {
        nat_addr: packet.dst_addr,
        nat_port: packet.dst_port,
        ..state
    };
    let snat = needs_snat(packet, service, &backend);
    if snat {
        let addr = source_towards(ctx, backend.addr, packet.proto).ok_or(Drop::SnatNoSource)?;
        reply.snat_addr = packet.src_addr;
        reply.snat_port = packet.src_port;
        state.snat_addr = addr;
        // An explain run claims no port: the translation shows port 0.
        if !packet.notes.explain {
            state.snat_port = claim_snat_port(packet, &backend, addr, &reply, now)?;
        }
    }
    if packet.notes.explain {
        // What recording the flow would have counted, and nothing recorded.
        if replacing {
            event(packet, Counter::FlowReselected);
        }
        if snat {
            event(packet, Counter::FlowSnat);
        }
        event(packet, Counter::FlowCreated);
        return Ok(Some(translation(&state)));
    }
    let reply_key = reply_key(
        packet.proto,
        (backend.addr, backend.port),
        sent_from(packet, &state),
    );
    let flags = if replacing { BPF_ANY } else { BPF_NOEXIST } as u64;
    let recorded = match LB_CONNTRACK.insert(flow, state, flags) {
        // Two CPUs replacing one flow both succeed: the entry left is the winner's.
        Ok(()) if replacing => LB_CONNTRACK
            .get_ptr(flow)
            .is_some_and(|winner| same_translation(&unsafe { *winner }, &state)),
        Ok(()) => true,
        Err(EEXIST) => false,
        Err(_) => {
            count(Counter::FlowInsertFailed);
            false
        }
    };
    if !recorded {
        // Another CPU recorded this flow between our lookup and insert: follow its choice. A
        // port we claimed goes back; without a winner to follow, a flow with source NAT cannot
        // be sent (its replies would find no entry), one without goes on untracked.
        if snat {
            remove_reply(packet, &reply_key, true);
        }
        match LB_CONNTRACK.get_ptr(flow) {
            Some(winner) => return Ok(Some(translation(&unsafe { *winner }))),
            None if snat => return Err(Drop::FlowUntracked),
            None => {}
        }
    }
    // With source NAT, claiming the port recorded the reply entry already.
    if !snat
        && LB_CONNTRACK
            .insert(reply_key, reply, BPF_ANY as u64)
            .is_err()
    {
        count(Counter::FlowInsertFailed);
    }
    remember(packet, service, backend_id, now);
    if replacing {
        count(Counter::FlowReselected);
    }
    if snat {
        count(Counter::FlowSnat);
    }
    count(Counter::FlowCreated);
    stats::new_flow(packet, backend.service_id, backend_id);
    Ok(Some(translation(&state)))
}

/// Removes the original entry of the flow with source NAT whose reply entry `reply` (keyed by
/// `packet`'s tuple) was just deleted, if it still sends from that port: a flow must not keep
/// a port it no longer holds, which another flow may claim next.
#[inline(always)]
fn forget_original(packet: &Packet, reply: &FlowState) {
    let original = FlowKey::new(
        (reply.snat_addr, reply.snat_port),
        (reply.nat_addr, reply.nat_port),
        packet.proto,
        DIRECTION_ORIGINAL,
    );
    let Some(entry) = LB_CONNTRACK.get_ptr(original) else {
        return;
    };
    let entry = unsafe { *entry };
    if entry.snat_addr == packet.dst_addr && entry.snat_port == packet.dst_port {
        let _ = LB_CONNTRACK.remove(original);
    }
}

/// If `packet` is a backend's reply on a live tracked flow, the Service address and port to
/// restore as its source (and after source NAT, the client to restore as its destination). The
/// entry of an expired flow, or of a closed one when the backend opens a new connection on the
/// same tuple (a SYN), is deleted instead: the tuple now carries traffic that has nothing to do
/// with the Service, such as the client talking to the pod directly from a reused port.
#[inline(always)]
pub fn lookup_reply(packet: &Packet) -> Option<Reply> {
    let key = FlowKey {
        direction: DIRECTION_REPLY,
        ..original_key(packet)
    };
    let state = LB_CONNTRACK.get_ptr_mut(key)?;
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a live map value.
    unsafe {
        let current = *state;
        let reopened = packet.tcp_flags & TCP_SYN != 0 && is_closed(current.tcp_flags);
        if reopened || is_expired(&current, packet.proto, now) {
            if packet.notes.explain {
                return None;
            }
            let _ = LB_CONNTRACK.remove(key);
            if current.snat_addr != 0 {
                forget_original(packet, &current);
            }
            return None;
        }
        let client = (current.snat_addr != 0).then_some(Endpoint {
            addr: current.snat_addr,
            port: current.snat_port,
        });
        let original = FlowKey::new(
            match client {
                Some(client) => (client.addr, client.port),
                None => (packet.dst_addr, packet.dst_port),
            },
            (current.nat_addr, current.nat_port),
            packet.proto,
            DIRECTION_ORIGINAL,
        );
        if !packet.notes.explain {
            touch(state, &original, packet.tcp_flags, true, now);
        }
        Some(Reply {
            service: Endpoint {
                addr: current.nat_addr,
                port: current.nat_port,
            },
            client,
            service_id: current.service_id,
            backend_id: current.backend_id,
        })
    }
}
