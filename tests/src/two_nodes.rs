//! The two-node topology: two node namespaces and a client on one shared L2 segment (a bridge in
//! a namespace of its own), two backends behind each node.
//!
//! ```text
//!                  segment 192.168.50.0/24 (bridge)
//!        ┌───────────────────┼─────────────────────┐
//!   client .10          node-a .1 (s0)          node-b .2 (s0)
//!                        ├─ b1 ── a-1 10.1.1.2    ├─ b1 ── b-1 10.2.1.2
//!                        └─ b2 ── a-2 10.1.2.2    └─ b2 ── b-2 10.2.2.2
//! ```
//! Each node routes the other's backend subnets via the other's segment address; each backend
//! routes the segment via its node. No default route anywhere, nothing outside the namespaces.

use std::net::Ipv4Addr;

use crate::netns::{Netns, veth};

/// The segment's prefix length.
const SEGMENT_PREFIX: u8 = 24;
/// The client's address on the segment.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 10);
/// Each node's address on the segment.
pub const NODE_ADDRS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(192, 168, 50, 1),
    Ipv4Addr::new(192, 168, 50, 2),
];
/// The nodes' names, as EndpointSlices give them.
pub const NODE_NAMES: [&str; 2] = ["node-a", "node-b"];
/// Backends behind each node.
pub const BACKENDS_PER_NODE: usize = 2;
/// Each node's interface on the segment.
pub const SEGMENT_INTERFACE: &str = "s0";
const SEGMENT: &str = "192.168.50.0/24";

/// Address of backend `index` behind node `node` (both 0-based).
pub fn backend_addr(node: usize, index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, node as u8 + 1, index as u8 + 1, 2)
}

/// The node's address on the link to its backend `index`.
fn node_backend_side(node: usize, index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, node as u8 + 1, index as u8 + 1, 1)
}

/// The node-side interface towards backend `index`.
pub fn backend_interface(index: usize) -> String {
    format!("b{}", index + 1)
}

/// The name backend `index` of node `node` answers with.
pub fn backend_name(node: usize, index: usize) -> String {
    format!("{}-{}", ["a", "b"][node], index + 1)
}

/// The namespaces of the topology; dropping it removes them all.
pub struct TwoNodes {
    pub client: Netns,
    pub nodes: [Netns; 2],
    /// `backends[node][index]`.
    pub backends: [Vec<Netns>; 2],
    _segment: Netns,
}

impl TwoNodes {
    /// Builds the topology in namespaces named `<prefix>-...`.
    pub fn build(prefix: &str) -> anyhow::Result<Self> {
        let segment = Netns::create(&format!("{prefix}-seg"))?;
        segment.ip(&["link", "add", "br0", "type", "bridge"])?;
        segment.ip(&["link", "set", "br0", "up"])?;
        let client = Netns::create(&format!("{prefix}-client"))?;
        let nodes = [
            Netns::create(&format!("{prefix}-na"))?,
            Netns::create(&format!("{prefix}-nb"))?,
        ];
        let attach = |netns: &Netns, inside: &str, port: &str, addr: Ipv4Addr| {
            veth(netns, inside, &segment, port)?;
            segment.ip(&["link", "set", port, "master", "br0"])?;
            netns.ip(&[
                "addr",
                "add",
                &format!("{addr}/{SEGMENT_PREFIX}"),
                "dev",
                inside,
            ])
        };
        attach(&client, "eth0", "pc", CLIENT_ADDR)?;
        for (node, netns) in nodes.iter().enumerate() {
            attach(
                netns,
                SEGMENT_INTERFACE,
                &format!("p{node}"),
                NODE_ADDRS[node],
            )?;
            netns.sysctl("ipv4.ip_forward", "1")?;
            netns.sysctl("ipv4.conf.all.rp_filter", "0")?;
            netns.sysctl("ipv4.conf.default.rp_filter", "0")?;
            let other = 1 - node;
            netns.ip(&[
                "route",
                "add",
                &format!("10.{}.0.0/16", other + 1),
                "via",
                &NODE_ADDRS[other].to_string(),
            ])?;
        }
        let mut backends: [Vec<Netns>; 2] = [Vec::new(), Vec::new()];
        for (node, node_netns) in nodes.iter().enumerate() {
            for index in 0..BACKENDS_PER_NODE {
                let backend = Netns::create(&format!("{prefix}-{}", backend_name(node, index)))?;
                let interface = backend_interface(index);
                veth(node_netns, &interface, &backend, "eth0")?;
                node_netns.ip(&[
                    "addr",
                    "add",
                    &format!("{}/24", node_backend_side(node, index)),
                    "dev",
                    &interface,
                ])?;
                backend.ip(&[
                    "addr",
                    "add",
                    &format!("{}/24", backend_addr(node, index)),
                    "dev",
                    "eth0",
                ])?;
                backend.ip(&[
                    "route",
                    "add",
                    SEGMENT,
                    "via",
                    &node_backend_side(node, index).to_string(),
                ])?;
                backends[node].push(backend);
            }
        }
        Ok(Self {
            client,
            nodes,
            backends,
            _segment: segment,
        })
    }

    /// The interfaces the XDP program attaches to on a node.
    pub fn node_interfaces() -> Vec<String> {
        std::iter::once(SEGMENT_INTERFACE.to_owned())
            .chain((0..BACKENDS_PER_NODE).map(backend_interface))
            .collect()
    }
}
