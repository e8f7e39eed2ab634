//! An interface as `ip -s -j link` shows it inside a namespace: its index, MAC address and
//! packet counters.

use anyhow::Context as _;
use lb_tests::netns::Netns;

/// One reading of an interface.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    pub index: u32,
    pub mac: [u8; 6],
    /// Frames the interface received and sent so far (the kernel's 64-bit counters).
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// Reads interface `name` in `netns`.
pub fn read(netns: &Netns, name: &str) -> anyhow::Result<Link> {
    let output = netns.exec("ip", &["-s", "-j", "link", "show", "dev", name])?;
    let links: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let link = &links[0];
    let index = link["ifindex"].as_u64().context("ifindex")?;
    let text = link["address"].as_str().context("MAC address")?;
    let mut mac = [0u8; 6];
    for (byte, octet) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(octet, 16)?;
    }
    let counter = |direction: &str| {
        link["stats64"][direction]["packets"]
            .as_u64()
            .with_context(|| format!("{name}'s {direction} packet counter"))
    };
    Ok(Link {
        index: u32::try_from(index)?,
        mac,
        rx_packets: counter("rx")?,
        tx_packets: counter("tx")?,
    })
}
