//! Node-wide settings the agent gives the datapath at start-up (`LB_CONFIG`, one entry).

use bytemuck::{Pod, Zeroable};

/// Service CIDRs `LB_CONFIG` holds: a primary and a secondary range, with room for ranges added
/// later through ServiceCIDR objects.
pub const MAX_SERVICE_CIDRS: usize = 4;

/// ICMP errors one CPU sends per second by default: what Linux allows the whole node
/// (`net.ipv4.icmp_msgs_per_sec`).
pub const DEFAULT_REJECTS_PER_SECOND: u32 = 1000;

/// An IPv4 prefix in the form the datapath tests with one AND and one compare.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Cidr {
    /// The network address, network byte order, host bits zero.
    pub addr: u32,
    /// The netmask, network byte order.
    pub mask: u32,
}

impl Cidr {
    /// Whether the wire-order address `addr` lies inside the prefix.
    #[inline(always)]
    pub const fn contains(&self, addr: u32) -> bool {
        addr & self.mask == self.addr
    }
}

/// Value of `LB_CONFIG` (key 0). Written by the agent at start-up, read by the datapath. All
/// zero (never written) means: no service CIDR, no limit on rejects.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DataplaneConfig {
    /// The cluster's service CIDRs (`lb agent --service-cidr`); the first
    /// `service_cidr_count` are in use. A TCP or UDP packet to an address inside one that no
    /// Service holds is dropped, as kube-proxy's nftables mode does.
    pub service_cidrs: [Cidr; MAX_SERVICE_CIDRS],
    /// Entries of `service_cidrs` in use.
    pub service_cidr_count: u32,
    /// ICMP errors (rejects) each CPU may send per second; 0: no limit.
    pub rejects_per_second: u32,
    /// Cookie of the node's network namespace (`SO_NETNS_COOKIE`): the socket hooks translate
    /// only sockets in it. A pod's sockets, in namespaces of their own, reach Services through
    /// XDP like any packet, with source ranges, affinity and ICMP rejects. 0: no socket is
    /// translated.
    pub netns_cookie: u64,
}

impl DataplaneConfig {
    /// Whether the wire-order address `addr` lies in one of the service CIDRs in use.
    #[inline(always)]
    pub fn in_service_cidr(&self, addr: u32) -> bool {
        self.service_cidrs
            .iter()
            .take(self.service_cidr_count as usize)
            .any(|cidr| cidr.contains(addr))
    }
}

/// Value of `LB_REJECT_RATE` (per CPU, key 0): the datapath's own record of the ICMP errors this
/// CPU sent in the current one-second window. Userspace only reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RejectWindow {
    /// Start of the window, `bpf_ktime_get_ns` time.
    pub start_ns: u64,
    /// ICMP errors sent since `start_ns`.
    pub sent: u64,
}

/// Length of a rate window.
pub const REJECT_WINDOW_NS: u64 = 1_000_000_000;

const _: () = {
    assert!(size_of::<Cidr>() == 8);
    assert!(size_of::<DataplaneConfig>() == 8 * MAX_SERVICE_CIDRS + 16);
    assert!(size_of::<RejectWindow>() == 16);
};

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]` and `bytemuck::Pod` (no padding, any bit pattern valid).
    unsafe impl aya::Pod for super::DataplaneConfig {}
    unsafe impl aya::Pod for super::RejectWindow {}
}
