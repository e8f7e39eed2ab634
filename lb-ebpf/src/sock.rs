//! Service translation for the node's own sockets, at `connect()` and `sendmsg()` (cgroup socket
//! hooks): XDP only sees packets arriving on an interface, so a process on the node (kubelet
//! probes, host-network pods, an operator's curl) reaching a ClusterIP or a NodePort of the node
//! is translated here instead, before any packet exists. The socket is connected (or each
//! datagram sent) straight to a backend drawn at random from the frontend's slots, as for a new
//! flow in XDP; no conntrack entry is needed, since the socket itself remembers its peer.
//!
//! So that applications still see the Service as their peer, the translation is recorded per
//! socket in `LB_SOCK_REVNAT` (socket cookie and backend -> frontend): `recvmsg()` reports a UDP
//! reply's source as the frontend, `getpeername()` the frontend too.
//!
//! Only sockets of the node's own network namespace are translated (`DataplaneConfig::
//! netns_cookie`): the hooks sit on a cgroup that also holds the pods, whose sockets live in
//! namespaces of their own and must reach Services through XDP, with everything that applies
//! there (source ranges, affinity, ICMP rejects).
//!
//! A frontend with no endpoint refuses the socket (`connect()` or `sendmsg()` fails with EPERM,
//! the only error a socket hook can give). Source ranges and session affinity do not apply to
//! the node's own sockets (the client address is not chosen yet at `connect()`).

use aya_ebpf::{
    bindings::{BPF_ANY, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use lb_common::{
    net::{IPPROTO_TCP, IPPROTO_UDP},
    service::{ServiceKey, SlotKey, SockRevNatKey, SockRevNatValue},
    stats::Counter,
};

use crate::{
    maps::{LB_SLOTS, LB_SOCK_REVNAT, config, lookup_backend, lookup_service},
    stats::count,
};

/// `AF_INET`.
const AF_INET: u32 = 2;
/// What a socket hook returns to let the call go on, or to refuse it with EPERM.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx)
}

/// The IP protocol of the socket behind `addr`, if TCP or UDP.
#[inline(always)]
fn protocol(addr: *const bpf_sock_addr) -> Option<u8> {
    let protocol = unsafe { (*addr).protocol } as u8;
    (protocol == IPPROTO_TCP || protocol == IPPROTO_UDP).then_some(protocol)
}

/// Whether the socket behind `ctx` lives in the node's network namespace.
#[inline(always)]
fn on_the_node(ctx: &SockAddrContext) -> bool {
    let node = config().netns_cookie;
    node != 0 && unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } == node
}

/// Rewrites the destination of a `connect()` or `sendmsg()` to a Service frontend.
#[inline(always)]
fn translate(ctx: &SockAddrContext) -> i32 {
    let addr = ctx.sock_addr;
    if unsafe { (*addr).user_family } != AF_INET || !on_the_node(ctx) {
        return ALLOW;
    }
    let Some(proto) = protocol(addr) else {
        return ALLOW;
    };
    // The port is kept in network byte order in the low 16 bits' memory.
    let (vip, port) = unsafe { ((*addr).user_ip4, (*addr).user_port as u16) };
    let key = ServiceKey {
        addr: vip,
        port,
        proto,
        _pad: 0,
    };
    let Some(service) = lookup_service(&key) else {
        return ALLOW;
    };
    if service.backend_count == 0 {
        count(Counter::SockRefused);
        return REFUSE;
    }
    let slot = SlotKey {
        backend_set: service.backend_set,
        slot: unsafe { bpf_get_prandom_u32() } % service.backend_count,
    };
    let Some(backend_id) = LB_SLOTS.get_ptr(slot).map(|id| unsafe { *id }) else {
        count(Counter::SockRefused);
        return REFUSE;
    };
    let Some(backend) = lookup_backend(backend_id) else {
        count(Counter::SockRefused);
        return REFUSE;
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let revnat_key = SockRevNatKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: 0,
    };
    let revnat = SockRevNatValue {
        addr: vip,
        port,
        _pad: 0,
    };
    if LB_SOCK_REVNAT
        .insert(revnat_key, revnat, BPF_ANY as u64)
        .is_err()
    {
        count(Counter::SockRevNatInsertFailed);
    }
    unsafe {
        (*addr).user_ip4 = backend.addr;
        (*addr).user_port = backend.port as u32;
    }
    count(Counter::SockTranslated);
    ALLOW
}

/// Reports a backend peer of a translated socket as the frontend it was reached through.
#[inline(always)]
fn restore(ctx: &SockAddrContext) -> i32 {
    let addr = ctx.sock_addr;
    if unsafe { (*addr).user_family } != AF_INET || protocol(addr).is_none() {
        return ALLOW;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let key = SockRevNatKey {
        cookie,
        addr: unsafe { (*addr).user_ip4 },
        port: unsafe { (*addr).user_port } as u16,
        _pad: 0,
    };
    if let Some(frontend) = LB_SOCK_REVNAT.get_ptr(key) {
        unsafe {
            (*addr).user_ip4 = (*frontend).addr;
            (*addr).user_port = (*frontend).port as u32;
        }
    }
    ALLOW
}
