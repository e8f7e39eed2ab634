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
//! The two entries of a flow share one liveness and one close state: whenever a packet refreshes
//! its own entry (at most once per `REFRESH_INTERVAL_NS`) or brings a new FIN/RST, the peer entry
//! is updated too. So a flow is alive while either direction carries traffic, a reset sent by the
//! backend closes the flow for the client's next SYN, and an expired flow translates neither way.
//!
//! Conntrack values are shared with other CPUs and with userspace: they are only ever accessed
//! through raw pointers, field by field, never through references.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
};
use lb_common::{
    conntrack::{
        DIRECTION_ORIGINAL, DIRECTION_REPLY, FlowKey, FlowState, REFRESH_INTERVAL_NS, SEEN_FIN,
        SEEN_RST, is_expired,
    },
    service::{
        AffinityKey, AffinityValue, BACKEND_DRAINING, Backend, NS_PER_SECOND, ServiceKey,
        ServiceValue, SlotKey,
    },
    stats::Counter,
};

use crate::{
    maps::{LB_AFFINITY, LB_CONNTRACK, LB_SLOTS, lookup_backend, lookup_service},
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::{Drop, count},
};

/// An address and port to rewrite one side of a packet to (network byte order).
pub struct Endpoint {
    pub addr: u32,
    pub port: u16,
}

/// `-EEXIST`: another CPU recorded the same new flow first.
const EEXIST: i32 = -17;
/// Backends tried for a new flow before giving up on a tuple collision.
const COLLISION_ATTEMPTS: u32 = 3;

#[inline(always)]
fn original_key(packet: &Packet) -> FlowKey {
    FlowKey::new(
        (packet.src_addr, packet.src_port),
        (packet.dst_addr, packet.dst_port),
        packet.proto,
        DIRECTION_ORIGINAL,
    )
}

/// The reply entry of a flow from `packet`'s client to `backend`.
#[inline(always)]
fn reply_key(packet: &Packet, backend_addr: u32, backend_port: u16) -> FlowKey {
    FlowKey::new(
        (backend_addr, backend_port),
        (packet.src_addr, packet.src_port),
        packet.proto,
        DIRECTION_REPLY,
    )
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

/// Records that the flow is alive, and closing if the packet says so, on `state` and on the entry
/// of the other direction (`peer`). Looks the peer up only when something changed. Writes race
/// only with the same flow on another CPU, and every writer moves the values the same way (flags
/// only gain bits, timestamps only move forward).
///
/// # Safety
/// `state` points at a live `LB_CONNTRACK` value.
#[inline(always)]
unsafe fn touch(state: *mut FlowState, peer: &FlowKey, tcp_flags: u8, now: u64) {
    unsafe {
        let flags = (*state).tcp_flags;
        let closing = closing_bits(tcp_flags) & !flags;
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
/// connection, and the other flow's replies would get the wrong source).
#[inline(always)]
fn collides(packet: &Packet, backend: &Backend, now: u64) -> bool {
    let Some(existing) = LB_CONNTRACK.get_ptr(reply_key(packet, backend.addr, backend.port)) else {
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
        if !collides(packet, &backend, now) {
            if attempt > 0 {
                count(Counter::FlowCollisionAvoided);
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
        && !collides(packet, &backend, now);
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
        count(Counter::AffinityInsertFailed);
    }
}

/// Chooses the backend for a packet to the frontend `key`, whose value is `service`: see the
/// module documentation. `None`: the packet starts a flow (or its flow lost its backend) and the
/// frontend has no backend to give it.
#[inline(always)]
pub fn select_backend(
    packet: &Packet,
    key: &ServiceKey,
    service: &ServiceValue,
) -> Result<Option<Endpoint>, Drop> {
    let now = unsafe { bpf_ktime_get_ns() };
    let flow = original_key(packet);
    let mut replacing = false;
    if let Some(state) = LB_CONNTRACK.get_ptr_mut(flow) {
        // SAFETY: a live map value.
        unsafe {
            let (nat_addr, nat_port) = ((*state).nat_addr, (*state).nat_port);
            if still_pinned(state, packet, now) {
                touch(
                    state,
                    &reply_key(packet, nat_addr, nat_port),
                    packet.tcp_flags,
                    now,
                );
                return Ok(Some(Endpoint {
                    addr: nat_addr,
                    port: nat_port,
                }));
            }
            // The old backend's reply entry would otherwise translate stray packets from it.
            let _ = LB_CONNTRACK.remove(reply_key(packet, nat_addr, nat_port));
        }
        replacing = true;
    }

    let picked = match remembered(packet, service, now) {
        Some(backend) => {
            count(Counter::AffinityHit);
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

    let state = FlowState {
        nat_addr: backend.addr,
        nat_port: backend.port,
        tcp_flags: closing_bits(packet.tcp_flags),
        _pad: 0,
        backend_id,
        service_id: backend.service_id,
        created_ns: now,
        last_seen_ns: now,
    };
    let flags = if replacing { BPF_ANY } else { BPF_NOEXIST } as u64;
    match LB_CONNTRACK.insert(flow, state, flags) {
        Ok(()) => {}
        Err(EEXIST) => {
            // Another CPU recorded this flow between our lookup and insert: follow its choice.
            if let Some(winner) = LB_CONNTRACK.get_ptr(flow) {
                let winner = unsafe { *winner };
                return Ok(Some(Endpoint {
                    addr: winner.nat_addr,
                    port: winner.nat_port,
                }));
            }
        }
        Err(_) => count(Counter::FlowInsertFailed),
    }
    let reply = FlowState {
        nat_addr: packet.dst_addr,
        nat_port: packet.dst_port,
        ..state
    };
    if LB_CONNTRACK
        .insert(
            reply_key(packet, backend.addr, backend.port),
            reply,
            BPF_ANY as u64,
        )
        .is_err()
    {
        count(Counter::FlowInsertFailed);
    }
    remember(packet, service, backend_id, now);
    if replacing {
        count(Counter::FlowReselected);
    }
    count(Counter::FlowCreated);
    Ok(Some(Endpoint {
        addr: backend.addr,
        port: backend.port,
    }))
}

/// If `packet` is a backend's reply on a live tracked flow, the Service address and port to
/// restore as its source. The entry of an expired flow, or of a closed one when the backend
/// opens a new connection on the same tuple (a SYN), is deleted instead: the tuple now carries
/// traffic that has nothing to do with the Service, such as the client talking to the pod
/// directly from a reused port.
#[inline(always)]
pub fn lookup_reply(packet: &Packet) -> Option<Endpoint> {
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
            let _ = LB_CONNTRACK.remove(key);
            return None;
        }
        let original = FlowKey::new(
            (packet.dst_addr, packet.dst_port),
            (current.nat_addr, current.nat_port),
            packet.proto,
            DIRECTION_ORIGINAL,
        );
        touch(state, &original, packet.tcp_flags, now);
        Some(Endpoint {
            addr: current.nat_addr,
            port: current.nat_port,
        })
    }
}
