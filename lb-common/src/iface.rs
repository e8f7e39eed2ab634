//! Per-interface configuration the agent writes for the datapath (`LB_IFACES`).

use bytemuck::{Pod, Zeroable};

/// `IfaceConfig::flags`: packets on this interface may come from local sockets (a veth to a pod
/// or a namespace) and so may carry a partial checksum. Elsewhere (a NIC) checksums are
/// complete, and a checksum that merely looks partial is treated as complete.
pub const IFACE_LOCAL_SENDERS: u32 = 1;

/// `IfaceConfig::flags`: a frame sent back with `XDP_TX` may never arrive. A veth delivers
/// `XDP_TX` frames into its peer's queue but wakes the peer only when the peer runs an XDP
/// program itself, which a pod's end never does; a redirect (which flushes) or the kernel stack
/// is used instead.
pub const IFACE_NO_XDP_TX: u32 = 2;

/// Value of `LB_IFACES` (key: ifindex). Written by userspace, read by the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct IfaceConfig {
    /// `IFACE_*` bits.
    pub flags: u32,
}

const _: () = assert!(size_of::<IfaceConfig>() == 4);

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]` and `bytemuck::Pod` (no padding, any bit pattern valid).
    unsafe impl aya::Pod for super::IfaceConfig {}
}
