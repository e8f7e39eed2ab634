//! Two nodes, each running `lb agent` with its own name, on one L2 segment with a client: what
//! crosses nodes (see `lb_tests::two_nodes` for the topology and the network rule).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use lb_tests::{
    agent::{Agent, AgentOptions, lb, lb_binary, pin_dir, wait_until},
    echo::Connection,
    leftovers::{self, remove_test_leftovers_once},
    netns::unique_prefix,
    privilege::require_root,
    servers::{self, Reply, Server},
    two_nodes::{
        BACKENDS_PER_NODE, CLIENT_ADDR, NODE_ADDRS, NODE_NAMES, TwoNodes, backend_addr,
        backend_name,
    },
};

const BACKEND_PORT: u16 = 8080;
const NODE_PORT: u16 = 30_080;
const LOAD_BALANCER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 80);
/// Connections per check: both local backends appear with probability 1 - 2(1/2)^20.
const CONNECTIONS: usize = 20;
const APPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// The nodePort of the `Cluster`-policy Service.
const CLUSTER_NODE_PORT: u16 = 30_081;
/// Connections to the `Cluster`-policy nodePort: all four endpoints appear with probability
/// 1 - 4(3/4)^60 > 0.9999998.
const CLUSTER_CONNECTIONS: usize = 60;

/// A LoadBalancer Service `web` with `externalTrafficPolicy: Local` and a NodePort Service `wide`
/// with the default `Cluster` policy, each with two endpoints on each node.
fn manifest() -> String {
    let mut endpoints = String::new();
    for (node, name) in NODE_NAMES.iter().enumerate() {
        for index in 0..BACKENDS_PER_NODE {
            endpoints.push_str(&format!(
                "- addresses: [\"{}\"]\n  nodeName: {name}\n",
                backend_addr(node, index)
            ));
        }
    }
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: two
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  clusterIP: 10.96.0.80
  ports:
  - name: http
    port: 80
    targetPort: {BACKEND_PORT}
    nodePort: {NODE_PORT}
status:
  loadBalancer:
    ingress:
    - ip: {LOAD_BALANCER_IP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: two
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  port: {BACKEND_PORT}
endpoints:
{endpoints}---
apiVersion: v1
kind: Service
metadata:
  name: wide
  namespace: two
spec:
  type: NodePort
  clusterIP: 10.96.0.81
  ports:
  - name: http
    port: 80
    targetPort: {BACKEND_PORT}
    nodePort: {CLUSTER_NODE_PORT}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: wide-1
  namespace: two
  labels:
    kubernetes.io/service-name: wide
addressType: IPv4
ports:
- name: http
  port: {BACKEND_PORT}
endpoints:
{endpoints}"
    )
}

/// The topology, the backends' servers and one agent per node.
struct Cluster {
    agents: Vec<Agent>,
    lb: PathBuf,
    pins: Vec<PathBuf>,
    workdir: PathBuf,
    _servers: Vec<Server>,
    topology: TwoNodes,
}

impl Cluster {
    fn start() -> anyhow::Result<Self> {
        remove_test_leftovers_once();
        let prefix = unique_prefix(leftovers::TESTS);
        let lb = lb_binary()?;
        let topology = TwoNodes::build(&prefix)?;
        let mut servers = Vec::new();
        for (node, backends) in topology.backends.iter().enumerate() {
            for (index, backend) in backends.iter().enumerate() {
                servers.push(servers::tcp(
                    backend,
                    &backend_name(node, index),
                    BACKEND_PORT,
                )?);
            }
        }
        let workdir = std::env::temp_dir().join(&prefix);
        let manifests = workdir.join("manifests");
        std::fs::create_dir_all(&manifests)?;
        std::fs::write(manifests.join("web.yaml"), manifest())?;
        let mut cluster = Self {
            agents: Vec::new(),
            lb,
            pins: Vec::new(),
            workdir,
            _servers: servers,
            topology,
        };
        let interfaces = TwoNodes::node_interfaces();
        for (node, name) in NODE_NAMES.iter().enumerate() {
            let pins = pin_dir(&format!("{prefix}-{name}"));
            cluster.pins.push(pins.clone());
            let extra: &'static [&'static str] = match node {
                0 => &["--node-name", NODE_NAMES[0]],
                _ => &["--node-name", NODE_NAMES[1]],
            };
            cluster.agents.push(Agent::start(
                &cluster.topology.nodes[node],
                &AgentOptions {
                    lb: &cluster.lb,
                    pin_dir: &pins,
                    manifests: &manifests,
                    interfaces: &interfaces,
                    state_dir: &cluster.workdir.join(format!("state-{name}")),
                    log: &cluster.workdir.join(format!("agent-{name}.log")),
                    extra_args: extra,
                },
            )?);
        }
        Ok(cluster)
    }

    /// How many of `CONNECTIONS` connections from the client to `target` each backend answered,
    /// checking that every backend saw the client's own address.
    fn counters(&self, node: usize) -> BTreeMap<String, u64> {
        let stats: serde_json::Value = serde_json::from_str(
            &lb(&self.lb, &self.pins[node], &["stats", "-o", "json"]).expect("lb stats"),
        )
        .expect("stats JSON");
        serde_json::from_value(stats["counters"].clone()).expect("counters")
    }

    /// Waits until every node has programmed `port` on its own address.
    fn wait_for_node_port(&self, port: u16) {
        for (node, pins) in self.pins.iter().enumerate() {
            let frontend = format!("{}:{port}", NODE_ADDRS[node]);
            assert!(
                wait_until(APPLY_TIMEOUT, || lb(&self.lb, pins, &["services"])
                    .is_ok_and(|listing| listing.contains(&frontend))),
                "node {node} did not program {frontend}"
            );
        }
    }

    /// One request on a new connection from the client to `target`: which backend answered and
    /// whom it saw as its client, and the client's own address and port. The handshake
    /// completing proves the replies came back through the node that translated the flow: from
    /// the backend's own address they would get a reset.
    fn ask(&self, target: SocketAddr) -> (Reply, SocketAddr) {
        let mut connection = Connection::open(&self.topology.client, target)
            .unwrap_or_else(|error| panic!("connecting to {target}: {error:#}"));
        let reply = connection
            .exchange()
            .unwrap_or_else(|error| panic!("request to {target}: {error:#}"));
        (
            reply,
            connection.local_addr().expect("the client's address"),
        )
    }

    fn spread(&self, target: SocketAddr) -> BTreeMap<String, usize> {
        let mut answered = BTreeMap::new();
        for _ in 0..CONNECTIONS {
            let (reply, client) = self.ask(target);
            assert_eq!(
                reply.client, client,
                "a Local policy keeps the client's address and port"
            );
            *answered.entry(reply.backend).or_insert(0) += 1;
        }
        answered
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for mut agent in self.agents.drain(..) {
            agent.stop();
        }
        for (node, pins) in self.pins.iter().enumerate() {
            // `lb reset` must run where the interfaces are.
            let _ = self.topology.nodes[node].run(|| lb(&self.lb, pins, &["reset"]));
        }
        let _ = std::fs::remove_dir_all(&self.workdir);
    }
}

#[test]
fn a_local_policy_keeps_each_node_s_external_traffic_on_its_own_endpoints() {
    if !require_root("a_local_policy_keeps_each_node_s_external_traffic_on_its_own_endpoints") {
        return;
    }
    let cluster = Cluster::start().expect("two nodes");
    cluster
        .topology
        .client
        .ip(&[
            "route",
            "add",
            &format!("{LOAD_BALANCER_IP}/32"),
            "via",
            &NODE_ADDRS[0].to_string(),
        ])
        .expect("client route to the load balancer IP");
    for (node, pins) in cluster.pins.iter().enumerate() {
        let frontend = format!("{}:{NODE_PORT}", NODE_ADDRS[node]);
        assert!(
            wait_until(APPLY_TIMEOUT, || lb(&cluster.lb, pins, &["services"])
                .is_ok_and(|listing| listing.contains(&frontend))),
            "node {node} did not program {frontend}"
        );
    }
    // Each node's nodePort reaches both of its own endpoints and none of the other node's.
    for (node, addr) in NODE_ADDRS.iter().enumerate() {
        let answered = cluster.spread(SocketAddr::from((*addr, NODE_PORT)));
        let own: Vec<String> = (0..BACKENDS_PER_NODE)
            .map(|index| backend_name(node, index))
            .collect();
        assert_eq!(
            answered.keys().cloned().collect::<Vec<_>>(),
            own,
            "node {node}'s nodePort answered by {answered:?}"
        );
    }
    // The load balancer IP, delivered to node A: node A's endpoints only.
    let answered = cluster.spread(SocketAddr::from((LOAD_BALANCER_IP, 80)));
    assert_eq!(
        answered.keys().cloned().collect::<Vec<_>>(),
        vec![backend_name(0, 0), backend_name(0, 1)],
        "{answered:?}"
    );
}

#[test]
fn a_cluster_policy_reaches_the_other_node_s_endpoints_with_the_node_as_source() {
    if !require_root("a_cluster_policy_reaches_the_other_node_s_endpoints_with_the_node_as_source")
    {
        return;
    }
    let cluster = Cluster::start().expect("two nodes");
    cluster.wait_for_node_port(CLUSTER_NODE_PORT);
    let before = cluster.counters(0);
    let target = SocketAddr::from((NODE_ADDRS[0], CLUSTER_NODE_PORT));
    // Per backend: whom it saw as the client, and who the client was.
    let mut seen: BTreeMap<String, Vec<(SocketAddr, SocketAddr)>> = BTreeMap::new();
    for _ in 0..CLUSTER_CONNECTIONS {
        let (reply, client) = cluster.ask(target);
        seen.entry(reply.backend)
            .or_default()
            .push((reply.client, client));
    }
    let every: Vec<String> = (0..2)
        .flat_map(|node| (0..BACKENDS_PER_NODE).map(move |index| backend_name(node, index)))
        .collect();
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), every, "{seen:?}");
    let snat_ports = lb_common::conntrack::SNAT_PORTS;
    let mut translated = 0;
    for (backend, clients) in &seen {
        for (client, real) in clients {
            if backend.starts_with('a') {
                // Node A's own endpoints see the client itself.
                assert_eq!(client, real, "{backend}");
                assert_eq!(client.ip(), std::net::IpAddr::V4(CLIENT_ADDR), "{backend}");
            } else {
                // Node B's see node A, from a port of the source NAT range.
                assert_eq!(
                    client.ip(),
                    std::net::IpAddr::V4(NODE_ADDRS[0]),
                    "{backend}"
                );
                assert!(snat_ports.contains(&client.port()), "{backend}: {client}");
                translated += 1;
            }
        }
    }
    let after = cluster.counters(0);
    let moved = |name: &str| after[name] - before.get(name).copied().unwrap_or_default();
    assert_eq!(moved("flow_snat"), translated);
    assert_eq!(moved("flow_created"), CLUSTER_CONNECTIONS as u64);
}
