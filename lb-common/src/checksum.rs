//! One's-complement checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).
//!
//! Byte order: every 16-bit word and 32-bit value here is *raw*, i.e. as loaded from packet
//! memory on the running machine. A one's-complement sum is independent of byte order (RFC 1071
//! section 2(B)) as long as every operand is loaded the same way, so the datapath never swaps.
//!
//! Two kinds of L4 checksum field exist:
//! - complete: the field holds the final checksum, `!fold(pseudo header + L4 bytes)`;
//! - partial (`CHECKSUM_PARTIAL`, left by a local socket for offload): the field holds the
//!   *uncomplemented* folded pseudo-header sum, and whoever completes it later sums the L4 bytes
//!   over it. Only a change to the pseudo header (addresses, length) may touch such a field; a
//!   port change must not, or the completed checksum is wrong by the port difference.

/// Folds a 32-bit accumulator of 16-bit words into a 16-bit one's-complement sum.
#[inline(always)]
pub const fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Adds both 16-bit halves of a raw 32-bit value to an accumulator.
#[inline(always)]
pub const fn add_u32(acc: u32, value: u32) -> u32 {
    acc + (value & 0xffff) + (value >> 16)
}

/// Replaces a 16-bit word `old` by `new` in the data covered by the complete checksum `check`
/// (RFC 1624 equation 3: `HC' = ~(~HC + ~m + m')`, which never yields -0 wrongly).
#[inline(always)]
pub const fn replace_u16(check: u16, old: u16, new: u16) -> u16 {
    !fold((!check) as u32 + (!old) as u32 + new as u32)
}

/// Replaces a raw 32-bit value (two words) in the data covered by the complete checksum `check`.
#[inline(always)]
pub const fn replace_u32(check: u16, old: u32, new: u32) -> u16 {
    let acc = (!check) as u32;
    let acc = add_u32(acc, !old);
    let acc = add_u32(acc, new);
    !fold(acc)
}

/// Replaces a raw 32-bit value in the pseudo header under a *partial* checksum field, which holds
/// an uncomplemented sum: `S' = S + ~m + m'`.
#[inline(always)]
pub const fn partial_replace_u32(partial: u16, old: u32, new: u32) -> u16 {
    let acc = partial as u32;
    let acc = add_u32(acc, !old);
    let acc = add_u32(acc, new);
    fold(acc)
}

/// The unfolded sum of the IPv4 pseudo header (RFC 793 section 3.1, RFC 768). `src` and `dst`
/// are raw wire addresses; `proto` and `l4_len` are host values.
#[inline(always)]
pub const fn pseudo_header_sum(src: u32, dst: u32, proto: u8, l4_len: u16) -> u32 {
    let acc = add_u32(0, src);
    let acc = add_u32(acc, dst);
    acc + (proto as u16).to_be() as u32 + l4_len.to_be() as u32
}

/// Whether an L4 checksum field holds a partial checksum: exactly the folded pseudo-header sum
/// that Linux writes for `CHECKSUM_PARTIAL` (`~csum_tcpudp_magic(..)`). A complete checksum equals
/// it only by a 2^-16 coincidence; the datapath therefore applies this test only on interfaces
/// where local sockets send (see the project README's limitations).
#[inline(always)]
pub const fn is_partial(field: u16, pseudo_sum: u32) -> bool {
    field == fold(pseudo_sum)
}

/// The complete Internet checksum of `data` plus an initial accumulator (for a pseudo header).
/// Not used by the datapath (which only updates incrementally); used to build and check packets.
pub fn checksum(initial: u32, data: &[u8]) -> u16 {
    let mut acc: u64 = initial as u64;
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        acc += u16::from_ne_bytes([pair[0], pair[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += u16::from_ne_bytes([*last, 0]) as u64;
    }
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 1624 section 4 example, in the byte order the RFC writes (big-endian words).
    const RFC1624_OLD_CHECK: u16 = 0xdd2f;
    const RFC1624_OLD_WORD: u16 = 0x5555;
    const RFC1624_NEW_WORD: u16 = 0x3285;
    const RFC1624_OTHER_SUM: u32 = 0xcd7a;

    #[test]
    fn rfc1624_example_gives_positive_zero() {
        // Equation 3 must give 0x0000 (eqn 2 would give the wrong -0, 0xffff).
        assert_eq!(
            !fold(RFC1624_OTHER_SUM + RFC1624_OLD_WORD as u32),
            RFC1624_OLD_CHECK
        );
        assert_eq!(
            replace_u16(RFC1624_OLD_CHECK, RFC1624_OLD_WORD, RFC1624_NEW_WORD),
            0x0000
        );
        assert_eq!(!fold(RFC1624_OTHER_SUM + RFC1624_NEW_WORD as u32), 0x0000);
    }

    /// 0x0000 and 0xffff are the two representations of zero in one's complement.
    fn same_value(a: u16, b: u16) -> bool {
        a == b || (a == 0 && b == 0xffff) || (a == 0xffff && b == 0)
    }

    /// A tiny deterministic generator so the property checks need no dependency.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    const PROPERTY_CASES: usize = 20_000;

    #[test]
    fn incremental_updates_equal_recomputation() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..PROPERTY_CASES {
            let mut data = [0u8; 24];
            for b in data.iter_mut() {
                *b = rng.next() as u8;
            }
            let check = checksum(0, &data);
            // Replace a 16-bit word at offset 4 and a 32-bit value at offset 8.
            let old16 = u16::from_ne_bytes([data[4], data[5]]);
            let new16 = rng.next() as u16;
            let old32 = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
            let new32 = rng.next() as u32;
            data[4..6].copy_from_slice(&new16.to_ne_bytes());
            data[8..12].copy_from_slice(&new32.to_ne_bytes());
            let incremental = replace_u32(replace_u16(check, old16, new16), old32, new32);
            let full = checksum(0, &data);
            // 0x0000 and 0xffff are the same one's-complement value; both verify.
            assert!(
                same_value(incremental, full),
                "incremental {incremental:#06x} != full {full:#06x}"
            );
            // And the result verifies: summing data with the checksum gives all ones.
            let mut with_check = data.to_vec();
            with_check.extend_from_slice(&incremental.to_ne_bytes());
            assert_eq!(
                checksum(0, &with_check),
                0,
                "updated checksum does not verify"
            );
        }
    }

    #[test]
    fn partial_update_tracks_the_pseudo_header_only() {
        let mut rng = XorShift(0x1234_5678_9abc_def1);
        for _ in 0..PROPERTY_CASES {
            let (src, dst, new_dst) = (rng.next() as u32, rng.next() as u32, rng.next() as u32);
            let len = (rng.next() % 1480) as u16 + 8;
            let field = fold(pseudo_header_sum(src, dst, IPPROTO_UDP_FOR_TEST, len));
            assert!(is_partial(
                field,
                pseudo_header_sum(src, dst, IPPROTO_UDP_FOR_TEST, len)
            ));
            let updated = partial_replace_u32(field, dst, new_dst);
            let expected = fold(pseudo_header_sum(src, new_dst, IPPROTO_UDP_FOR_TEST, len));
            assert!(
                same_value(updated, expected),
                "partial {updated:#06x} != {expected:#06x}"
            );
        }
    }

    const IPPROTO_UDP_FOR_TEST: u8 = crate::net::IPPROTO_UDP;

    #[test]
    fn full_checksum_matches_the_textbook_ipv4_header() {
        // The widely reproduced example header 192.168.0.1 -> 192.168.0.199 whose checksum is
        // 0xb861.
        let header: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        let check = checksum(0, &header);
        assert_eq!(u16::from_be_bytes(check.to_ne_bytes()), 0xb861);
        let mut verified = header;
        verified[10..12].copy_from_slice(&check.to_ne_bytes());
        assert_eq!(checksum(0, &verified), 0);
    }
}
