//! The single-node topology: a client, a node running lb, three backends.
//!
//! ```text
//!  client 10.0.0.2 ── eth0 ⇄ c0 ── node ── b1 ⇄ eth0 ── backend 1  10.1.1.2
//!                                 10.0.0.1 ├─ b2 ⇄ eth0 ── backend 2  10.1.2.2
//!                                          └─ b3 ⇄ eth0 ── backend 3  10.1.3.2
//! ```
//! The client routes the service CIDR and the backend subnets via the node; each backend routes
//! the client subnet via the node. There is no default route anywhere. The XDP program runs on
//! the node's c0, b1, b2, b3; the peers have GRO on so they can receive redirected frames.

use std::net::Ipv4Addr;

use crate::netns::{Netns, veth};

/// The client's address.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// The client's subnet, routed from each backend via the node.
pub const CLIENT_SUBNET: &str = "10.0.0.0/24";
/// The node's address on the client link.
pub const NODE_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// Service addresses the client sends to the node.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The backend subnets, reachable from the client through the node (for direct traffic).
pub const BACKEND_SUPERNET: &str = "10.1.0.0/16";
/// Number of backends.
pub const BACKENDS: usize = 3;
/// The node-side interface towards the client.
pub const NODE_CLIENT_INTERFACE: &str = "c0";
/// Interface name inside the client and backend namespaces.
pub const PEER_INTERFACE: &str = "eth0";

/// Address of backend `index` (0-based).
pub fn backend_addr(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, index as u8 + 1, 2)
}

/// The node's address on backend `index`'s link.
pub fn node_backend_side(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, index as u8 + 1, 1)
}

/// The node-side interface towards backend `index`.
pub fn node_backend_interface(index: usize) -> String {
    format!("b{}", index + 1)
}

/// Checksum offload settings of the senders' veths. With offload on (Linux's default), local
/// sockets leave a partial checksum for the stack to finish; with it off they send complete ones.
#[derive(Clone, Copy, Debug)]
pub struct Offload {
    pub client_tx: bool,
    pub backend_tx: bool,
}

impl Default for Offload {
    fn default() -> Self {
        Self {
            client_tx: true,
            backend_tx: true,
        }
    }
}

/// The namespaces of the topology; dropping it removes them all.
pub struct SingleNode {
    pub prefix: String,
    pub client: Netns,
    pub node: Netns,
    pub backends: Vec<Netns>,
}

fn set_offload(netns: &Netns, tx_checksum: bool) -> anyhow::Result<()> {
    netns.exec(
        "ethtool",
        &[
            "-K",
            PEER_INTERFACE,
            "tx",
            if tx_checksum { "on" } else { "off" },
            "gro",
            "on",
        ],
    )?;
    Ok(())
}

impl SingleNode {
    /// Builds the topology in namespaces named `<prefix>-client`, `<prefix>-node`,
    /// `<prefix>-b1`...
    pub fn build(prefix: &str, offload: Offload) -> anyhow::Result<Self> {
        let client = Netns::create(&format!("{prefix}-client"))?;
        let node = Netns::create(&format!("{prefix}-node"))?;
        node.sysctl("ipv4.ip_forward", "1")?;
        // Replies leave the node with the Service address as source through the stack; loose
        // or no reverse-path filtering is what kube-proxy nodes run with too.
        node.sysctl("ipv4.conf.all.rp_filter", "0")?;
        node.sysctl("ipv4.conf.default.rp_filter", "0")?;

        veth(&node, NODE_CLIENT_INTERFACE, &client, PEER_INTERFACE)?;
        node.ip(&[
            "addr",
            "add",
            &format!("{NODE_CLIENT_SIDE}/24"),
            "dev",
            NODE_CLIENT_INTERFACE,
        ])?;
        client.ip(&[
            "addr",
            "add",
            &format!("{CLIENT_ADDR}/24"),
            "dev",
            PEER_INTERFACE,
        ])?;
        for destination in [SERVICE_CIDR, BACKEND_SUPERNET] {
            client.ip(&[
                "route",
                "add",
                destination,
                "via",
                &NODE_CLIENT_SIDE.to_string(),
            ])?;
        }
        set_offload(&client, offload.client_tx)?;

        let mut backends = Vec::with_capacity(BACKENDS);
        for index in 0..BACKENDS {
            let backend = Netns::create(&format!("{prefix}-b{}", index + 1))?;
            let node_side = node_backend_interface(index);
            veth(&node, &node_side, &backend, PEER_INTERFACE)?;
            node.ip(&[
                "addr",
                "add",
                &format!("{}/24", node_backend_side(index)),
                "dev",
                &node_side,
            ])?;
            backend.ip(&[
                "addr",
                "add",
                &format!("{}/24", backend_addr(index)),
                "dev",
                PEER_INTERFACE,
            ])?;
            backend.ip(&[
                "route",
                "add",
                CLIENT_SUBNET,
                "via",
                &node_backend_side(index).to_string(),
            ])?;
            set_offload(&backend, offload.backend_tx)?;
            backends.push(backend);
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            client,
            node,
            backends,
        })
    }

    /// The node's interfaces the XDP program attaches to.
    pub fn node_interfaces(&self) -> Vec<String> {
        std::iter::once(NODE_CLIENT_INTERFACE.to_owned())
            .chain((0..BACKENDS).map(node_backend_interface))
            .collect()
    }
}
