//! Wire constants and conversions between Rust's address types and the network-byte-order
//! integers stored in map keys and values.
//!
//! A "wire" `u32` address is the four address octets in packet order reinterpreted as a native
//! integer (`u32::from_ne_bytes(octets)`); a "wire" `u16` port is `port.to_be()`. Both are what a
//! plain load from packet memory yields, which is why the datapath never swaps bytes.

use core::net::Ipv4Addr;

/// EtherType of IPv4.
pub const ETH_P_IPV4: u16 = 0x0800;
/// EtherType of an IEEE 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// EtherType of an IEEE 802.1ad (QinQ) service tag.
pub const ETH_P_8021AD: u16 = 0x88a8;

/// IP protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;

/// Converts an address to its wire form (network byte order in memory).
#[inline(always)]
pub const fn addr_to_wire(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// Converts a wire-form address back to an [`Ipv4Addr`].
#[inline(always)]
pub const fn addr_from_wire(wire: u32) -> Ipv4Addr {
    let [a, b, c, d] = wire.to_ne_bytes();
    Ipv4Addr::new(a, b, c, d)
}

/// Converts a host-order port to its wire form (network byte order in memory).
#[inline(always)]
pub const fn port_to_wire(port: u16) -> u16 {
    port.to_be()
}

/// Converts a wire-form port back to host order.
#[inline(always)]
pub const fn port_from_wire(wire: u16) -> u16 {
    u16::from_be(wire)
}

/// Human name of the L4 protocols the load balancer handles, as Kubernetes spells them.
pub const fn proto_name(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        _ => "?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_conversions_round_trip_and_match_packet_bytes() {
        let addr = Ipv4Addr::new(10, 96, 0, 10);
        let wire = addr_to_wire(addr);
        assert_eq!(wire.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(addr_from_wire(wire), addr);
        let port = port_to_wire(8080);
        assert_eq!(port.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(port_from_wire(port), 8080);
    }
}
