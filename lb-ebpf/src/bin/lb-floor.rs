//! The benchmark floor: the least an XDP program that looks at a packet's tuple must do. It
//! parses Ethernet, IPv4 and TCP (or UDP) with the same bounds checks as `lb_xdp`, reads the
//! tuple and returns `XDP_PASS`. Every load is volatile: the tuple is not used, and the compiler
//! would otherwise drop the loads and the checks that guard them. `cargo xtask bench` reports `lb_xdp`'s cost per packet as a ratio to this
//! program's, measured in the same run; it is never loaded by `lb` itself.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

const ETH_HLEN: usize = 14;
/// Offset of the EtherType in the Ethernet header.
const ETH_TYPE_OFFSET: usize = 12;
const ETHERTYPE_IPV4: u16 = 0x0800;
const IPV4_MIN_HLEN: usize = 20;
/// Offsets in the IPv4 header.
const IPV4_PROTO_OFFSET: usize = 9;
const IPV4_SRC_OFFSET: usize = 12;
const IPV4_DST_OFFSET: usize = 16;
/// The low nibble of the first IPv4 byte: the header length in 32-bit words.
const IHL_MASK: u8 = 0x0f;
const IHL_UNIT: usize = 4;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// TCP's and UDP's ports are their first four bytes; the shorter header (UDP's) bounds the check.
const L4_MIN_HLEN: usize = 8;

/// A pointer to `len` bytes at `offset`, or `None` past the end of the packet.
#[inline(always)]
fn at(ctx: &XdpContext, offset: usize, len: usize) -> Option<*const u8> {
    let start = ctx.data() + offset;
    if start + len > ctx.data_end() {
        return None;
    }
    Some(start as *const u8)
}

/// # Safety
/// `ptr` and the byte after it must be inside the packet (checked by [`at`]).
#[inline(always)]
unsafe fn read_u16(ptr: *const u8) -> u16 {
    // SAFETY: the caller's contract.
    u16::from_be_bytes(unsafe { [ptr.read_volatile(), ptr.add(1).read_volatile()] })
}

/// # Safety
/// `ptr` and the three bytes after it must be inside the packet (checked by [`at`]).
#[inline(always)]
unsafe fn read_u32(ptr: *const u8) -> u32 {
    // SAFETY: the caller's contract.
    unsafe { (u32::from(read_u16(ptr)) << 16) | u32::from(read_u16(ptr.add(2))) }
}

#[xdp]
pub fn lb_floor(ctx: XdpContext) -> u32 {
    match parse(&ctx) {
        // The tuple is read (volatile loads cannot be elided) and then ignored: the floor
        // decides nothing.
        Some(_) | None => xdp_action::XDP_PASS,
    }
}

/// The tuple's addresses and ports, XOR-folded.
#[inline(always)]
fn parse(ctx: &XdpContext) -> Option<u32> {
    let eth = at(ctx, 0, ETH_HLEN)?;
    // SAFETY: inside the Ethernet header checked above.
    if unsafe { read_u16(eth.add(ETH_TYPE_OFFSET)) } != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = at(ctx, ETH_HLEN, IPV4_MIN_HLEN)?;
    // SAFETY: inside the IPv4 header checked above.
    let (version_ihl, proto, src, dst) = unsafe {
        (
            ip.read_volatile(),
            ip.add(IPV4_PROTO_OFFSET).read_volatile(),
            read_u32(ip.add(IPV4_SRC_OFFSET)),
            read_u32(ip.add(IPV4_DST_OFFSET)),
        )
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let ihl = usize::from(version_ihl & IHL_MASK) * IHL_UNIT;
    if ihl < IPV4_MIN_HLEN {
        return None;
    }
    let l4 = at(ctx, ETH_HLEN + ihl, L4_MIN_HLEN)?;
    // SAFETY: the ports are the first four bytes of the L4 header checked above.
    let ports = unsafe { read_u32(l4) };
    Some(src ^ dst ^ ports)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable by construction: the verifier rejects a program whose panic path it can reach.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
