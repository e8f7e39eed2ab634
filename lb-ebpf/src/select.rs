//! Backend choice and connection tracking.
//!
//! A packet to a Service follows its flow's conntrack entry while that entry is valid: not
//! expired, not a new TCP connection reusing the tuple of a closed one, and pointing at a backend
//! that `LB_BACKENDS` still holds with the same address and port. Otherwise a backend is drawn
//! uniformly at random among the Service's slots (kube-proxy's behaviour) and recorded: the
//! original entry (client -> VIP) names the backend, the reply entry (backend -> client) names the
//! VIP to restore on the way back.
//!
//! The two entries of a flow share one liveness and one close state: whenever a packet refreshes
//! its own entry (at most once per `REFRESH_INTERVAL_NS`) or brings a new FIN/RST, the peer entry
//! is updated too. So a flow is alive while either direction carries traffic, a reset sent by the
//! backend closes the flow for the client's next SYN, and an expired flow translates neither way.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
};
use lb_common::{
    conntrack::{
        DIRECTION_ORIGINAL, DIRECTION_REPLY, FlowKey, FlowState, REFRESH_INTERVAL_NS, SEEN_FIN,
        SEEN_RST, is_expired,
    },
    service::{ServiceValue, SlotKey},
    stats::Counter,
};

use crate::{
    maps::{LB_CONNTRACK, LB_SLOTS, lookup_backend},
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

#[inline(always)]
fn original_key(packet: &Packet) -> FlowKey {
    FlowKey {
        src_addr: packet.src_addr,
        dst_addr: packet.dst_addr,
        src_port: packet.src_port,
        dst_port: packet.dst_port,
        proto: packet.proto,
        direction: DIRECTION_ORIGINAL,
        _pad: [0; 2],
    }
}

/// The reply entry of a flow from `packet`'s client to `backend`.
#[inline(always)]
fn reply_key(packet: &Packet, backend_addr: u32, backend_port: u16) -> FlowKey {
    FlowKey {
        src_addr: backend_addr,
        dst_addr: packet.src_addr,
        src_port: backend_port,
        dst_port: packet.src_port,
        proto: packet.proto,
        direction: DIRECTION_REPLY,
        _pad: [0; 2],
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

/// Records that the flow is alive, and closing if the packet says so, on `state` and on the entry
/// of the other direction (`peer`). Looks the peer up only when something changed. Updates race
/// only with the same flow on another CPU, and every writer moves the values the same way.
#[inline(always)]
fn touch(state: &mut FlowState, peer: &FlowKey, tcp_flags: u8, now: u64) {
    let closing = closing_bits(tcp_flags) & !state.tcp_flags;
    let refresh = now.saturating_sub(state.last_seen_ns) > REFRESH_INTERVAL_NS;
    if closing == 0 && !refresh {
        return;
    }
    state.tcp_flags |= closing;
    if refresh {
        state.last_seen_ns = now;
    }
    if let Some(peer) = LB_CONNTRACK.get_ptr_mut(peer) {
        // SAFETY: a live map value; see above for concurrent writers.
        let peer = unsafe { &mut *peer };
        peer.tcp_flags |= state.tcp_flags;
        if peer.last_seen_ns < state.last_seen_ns {
            peer.last_seen_ns = state.last_seen_ns;
        }
    }
}

/// Whether a tracked flow may keep its backend for this packet.
#[inline(always)]
fn still_pinned(state: &FlowState, packet: &Packet, now: u64) -> bool {
    let new_connection = packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let closed = state.tcp_flags & (SEEN_FIN | SEEN_RST) != 0;
    if new_connection && closed {
        return false;
    }
    if is_expired(state, packet.proto, now) {
        return false;
    }
    match lookup_backend(state.backend_id) {
        Some(backend) => backend.addr == state.nat_addr && backend.port == state.nat_port,
        None => false,
    }
}

/// Chooses the backend for a packet to `service`: see the module documentation.
#[inline(always)]
pub fn select_backend(packet: &Packet, service: &ServiceValue) -> Result<Endpoint, Drop> {
    let now = unsafe { bpf_ktime_get_ns() };
    let key = original_key(packet);
    let mut replacing = false;
    if let Some(state) = LB_CONNTRACK.get_ptr_mut(key) {
        let state = unsafe { &mut *state };
        if still_pinned(state, packet, now) {
            let peer = reply_key(packet, state.nat_addr, state.nat_port);
            touch(state, &peer, packet.tcp_flags, now);
            return Ok(Endpoint {
                addr: state.nat_addr,
                port: state.nat_port,
            });
        }
        // The old backend's reply entry would otherwise translate stray packets from it.
        let _ = LB_CONNTRACK.remove(reply_key(packet, state.nat_addr, state.nat_port));
        replacing = true;
    }

    let backend_count = service.backend_count;
    if backend_count == 0 {
        return Err(Drop::NoBackend);
    }
    let slot = SlotKey {
        backend_set: service.backend_set,
        slot: unsafe { bpf_get_prandom_u32() } % backend_count,
    };
    let backend_id = unsafe { *LB_SLOTS.get_ptr(slot).ok_or(Drop::BackendMissing)? };
    let backend = lookup_backend(backend_id).ok_or(Drop::BackendMissing)?;

    let state = FlowState {
        nat_addr: backend.addr,
        nat_port: backend.port,
        tcp_flags: closing_bits(packet.tcp_flags),
        _pad: 0,
        backend_id,
        service_id: service.service_id,
        created_ns: now,
        last_seen_ns: now,
    };
    let flags = if replacing { BPF_ANY } else { BPF_NOEXIST } as u64;
    match LB_CONNTRACK.insert(key, state, flags) {
        Ok(()) => {}
        Err(EEXIST) => {
            // Another CPU recorded this flow between our lookup and insert: follow its choice.
            if let Some(winner) = LB_CONNTRACK.get_ptr(key) {
                let winner = unsafe { &*winner };
                return Ok(Endpoint {
                    addr: winner.nat_addr,
                    port: winner.nat_port,
                });
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
    if replacing {
        count(Counter::FlowReselected);
    }
    count(Counter::FlowCreated);
    Ok(Endpoint {
        addr: backend.addr,
        port: backend.port,
    })
}

/// If `packet` is a backend's reply on a live tracked flow, the Service address and port to
/// restore as its source. The entry of an expired flow is deleted instead: the tuple may be reused
/// by traffic that has nothing to do with the Service.
#[inline(always)]
pub fn lookup_reply(packet: &Packet) -> Option<Endpoint> {
    let key = FlowKey {
        direction: DIRECTION_REPLY,
        ..original_key(packet)
    };
    // SAFETY: a live map value; see `touch` for concurrent writers.
    let state = unsafe { &mut *LB_CONNTRACK.get_ptr_mut(key)? };
    let now = unsafe { bpf_ktime_get_ns() };
    if is_expired(state, packet.proto, now) {
        let _ = LB_CONNTRACK.remove(key);
        return None;
    }
    let original = FlowKey {
        src_addr: packet.dst_addr,
        dst_addr: state.nat_addr,
        src_port: packet.dst_port,
        dst_port: state.nat_port,
        proto: packet.proto,
        direction: DIRECTION_ORIGINAL,
        _pad: [0; 2],
    };
    touch(state, &original, packet.tcp_flags, now);
    Some(Endpoint {
        addr: state.nat_addr,
        port: state.nat_port,
    })
}
