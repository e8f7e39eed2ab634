//! kube-proxy's rule-set layouts for the same Services `lb` is given, to measure against.
//!
//! [`iptables`] writes what kube-proxy's iptables mode writes into the `nat` table, [`nftables`]
//! what its nftables mode (Kubernetes 1.31+) writes into `table ip kube-proxy`, both for
//! ClusterIP Services with the Cluster traffic policy, which is all the synthetic workload has.
//! Each module builds the full rule set, the update kube-proxy's partial sync writes when one
//! endpoint of a Service is replaced, and loads either into a network namespace with the tool
//! kube-proxy uses, timing it.
//!
//! The layouts differ from kube-proxy's only where this benchmark cannot tell: chain-name hashes
//! come from FNV-1a instead of SHA-256 (any stable hash names the chains equally well), the
//! filter-table rules that reject traffic to Services without endpoints are not written (every
//! synthetic Service has endpoints), and a Service without endpoints is simply left out.

pub mod iptables;
pub mod nftables;

use std::{
    fmt::Write as _,
    io::Write as _,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lb_tests::netns::Netns;

/// The cluster's pod CIDR as kube-proxy's local-traffic detector sees it. The benchmark client
/// (10.0.0.2) is inside, so neither layout masquerades its traffic: lb does no SNAT either, and
/// the comparison must not charge the kernel layouts for a translation lb skips.
const CLUSTER_CIDR: &str = "10.0.0.0/8";

/// kube-proxy's default masquerade mark (`--iptables-masquerade-bit=14`).
const MASQUERADE_MARK: &str = "0x4000";

/// The RFC 4648 base32 alphabet kube-proxy encodes its chain-name hashes with.
const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
/// Bits per base32 character.
const BASE32_BITS: u32 = 5;
/// FNV-1a 128-bit offset basis.
const FNV128_OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
/// FNV-1a 128-bit prime (2^88 + 2^8 + 0x3b).
const FNV128_PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;

/// The first `chars` base32 characters of a 128-bit FNV-1a hash of `input`: kube-proxy takes the
/// same number of characters from a SHA-256 hash, and only uniqueness and stability matter here.
fn chain_hash(input: &str, chars: usize) -> String {
    let hash = input.bytes().fold(FNV128_OFFSET, |hash, byte| {
        (hash ^ u128::from(byte)).wrapping_mul(FNV128_PRIME)
    });
    assert!(
        chars * BASE32_BITS as usize <= u128::BITS as usize,
        "a 128-bit hash has at most 25 base32 characters"
    );
    (1..=chars)
        .map(|i| {
            let shift = u128::BITS - BASE32_BITS * i as u32;
            let digit = (hash >> shift) % BASE32.len() as u128;
            char::from(BASE32[digit as usize])
        })
        .collect()
}

/// Appends `line` and a newline to a rule-set script.
fn push_line(out: &mut String, line: std::fmt::Arguments<'_>) {
    out.write_fmt(line).expect("a String takes any text");
    out.push('\n');
}

/// Runs `program args` inside `node` with `input` on its stdin and returns its wall time, from
/// start to exit, as a control plane waiting for it would see it. Fails with its stderr.
fn run_with_stdin(
    node: &Netns,
    program: &str,
    args: &[&str],
    input: &str,
) -> anyhow::Result<Duration> {
    let mut command = node.command(program)?;
    command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {program} in {} (is it installed?)", node.name()))?;
    let mut stdin = child.stdin.take().context("the child's stdin is piped")?;
    // A tool that rejects a line exits without reading the rest; its stderr says why, so the
    // write error (a broken pipe) is only reported when the tool itself succeeded.
    let written = stdin.write_all(input.as_bytes());
    drop(stdin);
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for {program} in {}", node.name()))?;
    let elapsed = start.elapsed();
    if !output.status.success() {
        bail!(
            "{program} {} in {} failed ({}): {}",
            args.join(" "),
            node.name(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    written.with_context(|| format!("writing the input of {program}"))?;
    Ok(elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_hashes_are_stable_base32_and_distinguish_close_names() {
        let a = chain_hash("bench/svc-1:httptcp", 16);
        assert_eq!(a, chain_hash("bench/svc-1:httptcp", 16));
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| BASE32.contains(&c)), "{a}");
        assert_ne!(a, chain_hash("bench/svc-2:httptcp", 16));
        assert_eq!(chain_hash("x", 8), chain_hash("x", 16)[..8]);
    }
}
