//! End to end in network namespaces: real TCP and UDP sockets through a ClusterIP served by the
//! XDP program that `lb agent` attaches and programs from a manifest directory.
//!
//! Topology and network rule: see `lb_tests::topology`. Each test builds its own namespaces,
//! pin directory and manifest directory (all named after a per-test prefix), so tests run in
//! parallel and clean up on drop, failure included.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, ErrorKind, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use lb_tests::{
    agent::{
        Agent, AgentOptions, REDIRECT_VETH, endpoints_in, lb, lb_binary, lb_in, pin_dir, tear_down,
        wait_until,
    },
    capture::{CapturedUdp, UdpCapture},
    echo::{
        self, BACKEND_TCP_PORT, BACKEND_UDP_PORT, CLUSTER_IP, Connection, IO_TIMEOUT, TCP_FRONTEND,
        TCP_PORT, UDP_FRONTEND, UDP_PORT, backend_index, backend_name, udp_request, udp_socket,
    },
    leftovers::{self, remove_test_leftovers_once},
    netns::{Netns, unique_prefix},
    privilege::require_root,
    servers::{Reply, Server, UdpChecksum},
    topology::{
        BACKENDS, CLIENT_ADDR, NODE_CLIENT_SIDE, Offload, SingleNode, backend_addr,
        node_backend_side,
    },
};

/// New flows per check: all three backends appear with probability 1 - 3(2/3)^30 > 0.99999.
const FLOWS: usize = 30;
/// How long the agent may take to apply a manifest edit.
const APPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// A second Service's ClusterIP, in the client's routed Service CIDR.
const SECOND_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// How long a connection to an address no Service holds may try: the node answers it with an
/// ICMP unreachable at once, so this only bounds a silent drop.
const UNSERVED_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The node the agent runs as (`--node-name`): the manifests' endpoints are on it, so external
/// traffic reaches them without source NAT.
const NODE_NAME: &str = "node-a";

/// The manifests of a Service `name` on `cluster_ip` with TCP 80 -> 8080 and UDP 53 -> 5353 on
/// `backends`, all on this node.
fn service_manifest(name: &str, cluster_ip: Ipv4Addr, backends: &[usize]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|index| {
            format!(
                "- addresses: [\"{}\"]\n  nodeName: {NODE_NAME}\n",
                backend_addr(*index)
            )
        })
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: e2e
spec:
  clusterIP: {cluster_ip}
  ports:
  - name: http
    port: {TCP_PORT}
    targetPort: http
  - name: dns
    protocol: UDP
    port: {UDP_PORT}
    targetPort: {BACKEND_UDP_PORT}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: e2e
  labels:
    kubernetes.io/service-name: {name}
addressType: IPv4
ports:
- name: http
  port: {BACKEND_TCP_PORT}
- name: dns
  protocol: UDP
  port: {BACKEND_UDP_PORT}
endpoints:
{endpoints}"
    )
}

/// The Service `echo` (the demo's ClusterIP and ports) on `backends`.
fn echo_manifest(backends: &[usize]) -> String {
    service_manifest("echo", CLUSTER_IP, backends)
}

/// How a cluster is set up.
#[derive(Clone, Copy, Debug)]
struct Setup {
    offload: Offload,
    /// What the backends' UDP replies carry.
    backend_udp_checksum: UdpChecksum,
    /// `lb agent` flags on top of the harness's.
    agent_args: &'static [&'static str],
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            offload: Offload::default(),
            backend_udp_checksum: UdpChecksum::Computed,
            agent_args: &[REDIRECT_VETH],
        }
    }
}

/// A running single-node cluster: topology, identity servers, and an agent.
struct Cluster {
    agent: Option<Agent>,
    lb: PathBuf,
    pin_dir: PathBuf,
    workdir: PathBuf,
    agent_args: &'static [&'static str],
    _servers: Vec<Server>,
    topology: SingleNode,
}

impl Cluster {
    fn start(setup: Setup) -> anyhow::Result<Self> {
        remove_test_leftovers_once();
        let prefix = unique_prefix(leftovers::TESTS);
        let lb = lb_binary()?;
        let topology = SingleNode::build(&prefix, setup.offload)?;
        let servers = echo::start_servers(&topology, setup.backend_udp_checksum)?;
        let mut cluster = Self {
            agent: None,
            lb,
            pin_dir: pin_dir(&prefix),
            workdir: std::env::temp_dir().join(&prefix),
            agent_args: setup.agent_args,
            _servers: servers,
            topology,
        };
        std::fs::create_dir_all(cluster.manifests())?;
        std::fs::write(
            cluster.manifests().join("echo.yaml"),
            echo_manifest(&[0, 1, 2]),
        )?;
        cluster.start_agent()?;
        Ok(cluster)
    }

    fn manifests(&self) -> PathBuf {
        self.workdir.join("manifests")
    }

    fn start_agent(&mut self) -> anyhow::Result<()> {
        let log = self.workdir.join(format!(
            "agent-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        // The endpoints are this node's unless a test says otherwise.
        let mut args = self.agent_args.to_vec();
        if !args.contains(&"--node-name") {
            args.extend(["--node-name", NODE_NAME]);
        }
        self.agent = Some(Agent::start(
            &self.topology.node,
            &AgentOptions {
                lb: &self.lb,
                pin_dir: &self.pin_dir,
                manifests: &self.manifests(),
                interfaces: &self.topology.node_interfaces(),
                state_dir: &self.workdir.join("state"),
                log: &log,
                extra_args: &args,
            },
        )?);
        Ok(())
    }

    fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("agent running")
    }

    fn lb(&self, args: &[&str]) -> String {
        lb(&self.lb, &self.pin_dir, args).expect("lb command")
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let stats: serde_json::Value =
            serde_json::from_str(&self.lb(&["stats", "-o", "json"])).expect("stats JSON");
        serde_json::from_value(stats["counters"].clone()).expect("counters")
    }

    fn client(&self) -> &Netns {
        &self.topology.client
    }

    /// The frontends the pinned maps hold, as `lb services` prints them (`10.96.0.10:80`).
    fn frontends(&self) -> Vec<String> {
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&self.lb(&["services", "-o", "json"])).expect("services JSON");
        rows.iter()
            .map(|row| row["frontend"].as_str().expect("frontend").to_owned())
            .collect()
    }

    /// Endpoints the pinned maps hold for `frontend` (empty when they do not hold it).
    fn endpoints(&self, frontend: SocketAddr, protocol: &str) -> Vec<String> {
        endpoints_in(&self.lb(&["services", "-o", "json"]), frontend, protocol)
    }

    /// The agent's `/metrics`, which must answer 200.
    fn metrics(&self) -> String {
        let (status, text) = lb_tests::agent::http_get(
            &self.topology.node,
            lb_tests::agent::METRICS_ADDRESS,
            "/metrics",
        )
        .expect("metrics endpoint");
        assert_eq!(status, 200, "{text}");
        text
    }

    /// The traffic `lb stats` reports for every frontend.
    fn traffic(&self) -> Vec<serde_json::Value> {
        let stats: serde_json::Value =
            serde_json::from_str(&self.lb(&["stats", "-o", "json"])).expect("stats JSON");
        serde_json::from_value(stats["services"].clone()).expect("services")
    }

    /// `lb explain ARGS -o json`, run in the node (where the interfaces are).
    fn explain(&self, args: &[&str]) -> serde_json::Value {
        let mut args = [&["explain"][..], args, &["-o", "json"]].concat();
        args.retain(|arg| !arg.is_empty());
        let text = lb_in(&self.topology.node, &self.lb, &self.pin_dir, &args).expect("lb explain");
        serde_json::from_str(&text).expect("explain JSON")
    }

    /// The flows `lb conntrack` lists, as (client, frontend, backend) triples: what an explain
    /// run must leave as it found.
    fn flows(&self) -> Vec<(String, String, String)> {
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&self.lb(&["conntrack", "-o", "json"])).expect("conntrack JSON");
        let mut flows: Vec<_> = rows
            .iter()
            .map(|row| {
                let field = |name: &str| row[name].to_string();
                (field("client"), field("frontend"), field("backend"))
            })
            .collect();
        flows.sort();
        flows
    }

    /// Endpoints of the echo Service's TCP frontend.
    fn tcp_endpoints(&self) -> Vec<String> {
        self.endpoints(TCP_FRONTEND, "TCP")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        tear_down(self.agent.take(), &self.lb, &self.pin_dir, &self.workdir);
    }
}

/// `FLOWS` new TCP and UDP flows from the client to the frontends `tcp_to` and `udp_to`;
/// returns how many each backend took.
fn spread_to(
    cluster: &Cluster,
    tcp_to: SocketAddr,
    udp_to: SocketAddr,
    udp_checksum: UdpChecksum,
) -> ([usize; BACKENDS], [usize; BACKENDS]) {
    let mut tcp = [0; BACKENDS];
    let mut udp = [0; BACKENDS];
    // Every socket stays open until the spread ends: a closed one frees its source port, and
    // the kernel may hand that port out again, so two "new" flows would share one tuple (and
    // one conntrack entry), and the flow count would come up short.
    let mut open_connections = Vec::with_capacity(FLOWS);
    let mut open_sockets = Vec::with_capacity(FLOWS);
    for _ in 0..FLOWS {
        let mut connection = Connection::open(cluster.client(), tcp_to)
            .unwrap_or_else(|error| panic!("TCP connection to {tcp_to}: {error:#}"));
        let reply = connection
            .request()
            .unwrap_or_else(|error| panic!("TCP request to {tcp_to}: {error:#}"));
        tcp[backend_index(&reply).expect("backend")] += 1;
        open_connections.push(connection);
        let socket = udp_socket(cluster.client(), udp_to, udp_checksum)
            .unwrap_or_else(|error| panic!("UDP socket to {udp_to}: {error:#}"));
        let reply = udp_request(&socket)
            .unwrap_or_else(|error| panic!("UDP request to {udp_to}: {error:#}"));
        udp[backend_index(&reply).expect("backend")] += 1;
        open_sockets.push(socket);
    }
    (tcp, udp)
}

/// [`spread_to`] `addr`'s TCP and UDP ports, asserting that every backend took flows of both.
fn assert_every_backend_through(
    cluster: &Cluster,
    addr: Ipv4Addr,
    (tcp_port, udp_port): (u16, u16),
) {
    let (tcp, udp) = spread_to(
        cluster,
        SocketAddr::from((addr, tcp_port)),
        SocketAddr::from((addr, udp_port)),
        UdpChecksum::Computed,
    );
    assert!(
        tcp.iter().all(|n| *n > 0),
        "TCP spread through {addr}: {tcp:?}"
    );
    assert!(
        udp.iter().all(|n| *n > 0),
        "UDP spread through {addr}: {udp:?}"
    );
}

/// [`spread_to`] the echo Service.
fn spread(cluster: &Cluster, udp_checksum: UdpChecksum) -> ([usize; BACKENDS], [usize; BACKENDS]) {
    spread_to(cluster, TCP_FRONTEND, UDP_FRONTEND, udp_checksum)
}

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, name: &str) -> u64 {
    after[name]
        .checked_sub(before[name])
        .unwrap_or_else(|| panic!("{name} went down: the stats map was replaced"))
}

/// The error a connected UDP socket of the client gets for a datagram to the echo Service's UDP
/// frontend, waiting at most `timeout` for it; `answered` says what an answer would mean.
fn udp_refusal(cluster: &Cluster, timeout: Duration, answered: &str) -> std::io::Error {
    cluster
        .client()
        .run(|| -> std::io::Result<std::io::Error> {
            let socket = std::net::UdpSocket::bind((CLIENT_ADDR, 0))?;
            socket.set_read_timeout(Some(timeout))?;
            socket.connect(UDP_FRONTEND)?;
            socket.send(b"query")?;
            let mut buffer = [0u8; 64];
            Ok(socket.recv(&mut buffer).expect_err(answered))
        })
        .expect("client thread")
        .expect("UDP socket")
}

/// The counters that moved between two readings, by how much.
fn moved(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(name, value)| (name.clone(), value - before.get(name).copied().unwrap_or(0)))
        .filter(|(_, delta)| *delta > 0)
        .collect()
}

fn tcp_reply(connection: &mut Connection) -> Reply {
    connection
        .request()
        .unwrap_or_else(|error| panic!("TCP request: {error:#}"))
}

fn udp_reply(socket: &std::net::UdpSocket) -> Reply {
    udp_request(socket).unwrap_or_else(|error| panic!("UDP request: {error:#}"))
}

#[test]
fn tcp_and_udp_reach_every_backend_with_partial_checksums() {
    if !require_root("tcp_and_udp_reach_every_backend_with_partial_checksums") {
        return;
    }
    // Linux's default: local sockets leave the L4 checksum to offload (CHECKSUM_PARTIAL).
    let cluster = Cluster::start(Setup::default()).expect("cluster");
    let before = cluster.counters();
    let (tcp, udp) = spread(&cluster, UdpChecksum::Computed);
    assert!(tcp.iter().all(|n| *n > 0), "TCP spread {tcp:?}");
    assert!(udp.iter().all(|n| *n > 0), "UDP spread {udp:?}");
    let after = cluster.counters();
    assert_eq!(delta(&before, &after, "flow_created"), 2 * FLOWS as u64);
    // Partial checksums cannot survive a redirect; every translated packet took the stack.
    assert!(delta(&before, &after, "stack_partial_checksum") > 0);
    assert_eq!(delta(&before, &after, "redirect_service"), 0);
    assert_eq!(delta(&before, &after, "redirect_reply"), 0);
    assert_eq!(delta(&before, &after, "drop_malformed"), 0);
}

#[test]
fn complete_checksums_take_the_redirect_path_and_the_stack_until_neighbours_resolve() {
    if !require_root(
        "complete_checksums_take_the_redirect_path_and_the_stack_until_neighbours_resolve",
    ) {
        return;
    }
    // As packets arrive from a NIC: complete checksums, so XDP may forward them itself.
    let cluster = Cluster::start(Setup {
        offload: Offload {
            client_tx: false,
            backend_tx: false,
        },
        ..Setup::default()
    })
    .expect("cluster");
    let before = cluster.counters();
    let (tcp, udp) = spread(&cluster, UdpChecksum::Computed);
    assert!(tcp.iter().all(|n| *n > 0), "TCP spread {tcp:?}");
    assert!(udp.iter().all(|n| *n > 0), "UDP spread {udp:?}");
    let after = cluster.counters();
    // Fast path: forwarded by XDP in both directions.
    assert!(delta(&before, &after, "redirect_service") > 0);
    assert!(delta(&before, &after, "redirect_reply") > 0);
    // Slow path: the node had not resolved the backends' MAC addresses for the first packets,
    // so the kernel stack took them and resolved the neighbours.
    assert!(delta(&before, &after, "stack_no_neighbour") > 0);
    assert!(delta(&before, &after, "stack_service") > 0);
    // On a veth a partial checksum is recognised by value, so a complete one that happens to
    // equal the pseudo-header sum reads as partial (2^-16 per packet; see Limitations): one such
    // packet in a run is that chance, a misreading would mark every packet of some flows.
    let partial = delta(&before, &after, "stack_partial_checksum");
    assert!(
        partial <= CHECKSUM_LOOKALIKES,
        "{partial} packets read as partial"
    );
}

/// Complete checksums a run may read as partial by chance (each packet: 2^-16).
const CHECKSUM_LOOKALIKES: u64 = 1;

#[test]
fn without_veth_redirects_complete_checksums_take_the_stack() {
    if !require_root("without_veth_redirects_complete_checksums_take_the_stack") {
        return;
    }
    // Packets XDP could forward itself, but every node interface is a veth and the agent was
    // not told their peers can receive redirects: the kernel must forward them all.
    let cluster = Cluster::start(Setup {
        offload: Offload {
            client_tx: false,
            backend_tx: false,
        },
        agent_args: &[],
        ..Setup::default()
    })
    .expect("cluster");
    let before = cluster.counters();
    let (tcp, udp) = spread(&cluster, UdpChecksum::Computed);
    assert!(tcp.iter().all(|n| *n > 0), "TCP spread {tcp:?}");
    assert!(udp.iter().all(|n| *n > 0), "UDP spread {udp:?}");
    let after = cluster.counters();
    assert!(delta(&before, &after, "stack_not_tx_port") > 0, "{after:?}");
    assert!(delta(&before, &after, "stack_service") > 0, "{after:?}");
    assert!(delta(&before, &after, "stack_reply") > 0, "{after:?}");
    assert_eq!(delta(&before, &after, "redirect_service"), 0, "{after:?}");
    assert_eq!(delta(&before, &after, "redirect_reply"), 0, "{after:?}");
    // Not the partial-checksum reason: the senders' checksums were complete.
    assert_eq!(
        delta(&before, &after, "stack_partial_checksum"),
        0,
        "{after:?}"
    );
}

/// UDP datagrams through the echo Service, each on a new flow, per direction.
const CAPTURED_REQUESTS: usize = 10;

#[test]
fn mixed_offload_and_zero_udp_checksums_are_accepted_by_the_receivers() {
    if !require_root("mixed_offload_and_zero_udp_checksums_are_accepted_by_the_receivers") {
        return;
    }
    // Complete checksums one way, partial the other; UDP without checksum both ways.
    for offload in [
        Offload {
            client_tx: false,
            backend_tx: true,
        },
        Offload {
            client_tx: true,
            backend_tx: false,
        },
    ] {
        let cluster = Cluster::start(Setup {
            offload,
            backend_udp_checksum: UdpChecksum::Zero,
            ..Setup::default()
        })
        .expect("cluster");
        let (tcp, udp) = spread(&cluster, UdpChecksum::Zero);
        assert!(
            tcp.iter().all(|n| *n > 0),
            "{offload:?}: TCP spread {tcp:?}"
        );
        assert!(
            udp.iter().all(|n| *n > 0),
            "{offload:?}: UDP spread {udp:?}"
        );

        // On the wire, as each receiver got them: requests at the backends, replies at the
        // client, all without checksum (a translation must leave a zero checksum zero).
        let at_client = UdpCapture::start(cluster.client()).expect("capture");
        let at_backends: Vec<UdpCapture> = cluster
            .topology
            .backends
            .iter()
            .map(|backend| UdpCapture::start(backend).expect("capture"))
            .collect();
        for _ in 0..CAPTURED_REQUESTS {
            udp_reply(
                &udp_socket(cluster.client(), UDP_FRONTEND, UdpChecksum::Zero).expect("socket"),
            );
        }
        let replies: Vec<CapturedUdp> = at_client
            .take()
            .expect("capture")
            .into_iter()
            .filter(|datagram| {
                !datagram.outgoing && SocketAddr::V4(datagram.source) == UDP_FRONTEND
            })
            .collect();
        let mut requests = Vec::new();
        for capture in &at_backends {
            requests.extend(
                capture
                    .take()
                    .expect("capture")
                    .into_iter()
                    .filter(|datagram| {
                        !datagram.outgoing && datagram.destination.port() == BACKEND_UDP_PORT
                    }),
            );
        }
        for (direction, datagrams) in [("requests", &requests), ("replies", &replies)] {
            assert_eq!(
                datagrams.len(),
                CAPTURED_REQUESTS,
                "{offload:?}: {direction} {datagrams:?}"
            );
            assert!(
                datagrams.iter().all(|datagram| datagram.checksum == 0),
                "{offload:?}: {direction} must arrive without checksum: {datagrams:?}"
            );
        }
    }
}

#[test]
fn a_flow_stays_on_its_backend() {
    if !require_root("a_flow_stays_on_its_backend") {
        return;
    }
    let cluster = Cluster::start(Setup::default()).expect("cluster");
    let mut connection = Connection::open(cluster.client(), TCP_FRONTEND).expect("connect");
    let first = tcp_reply(&mut connection).backend;
    for _ in 0..50 {
        assert_eq!(tcp_reply(&mut connection).backend, first);
    }
    let socket = udp_socket(cluster.client(), UDP_FRONTEND, UdpChecksum::Computed).expect("socket");
    let first = udp_reply(&socket).backend;
    for _ in 0..50 {
        assert_eq!(udp_reply(&socket).backend, first);
    }
}

#[test]
fn traffic_not_for_a_service_passes_untouched() {
    if !require_root("traffic_not_for_a_service_passes_untouched") {
        return;
    }
    let cluster = Cluster::start(Setup::default()).expect("cluster");
    let before = cluster.counters();
    let target = SocketAddr::from((backend_addr(1), BACKEND_TCP_PORT));
    let stream = cluster
        .client()
        .run(|| TcpStream::connect_timeout(&target, IO_TIMEOUT))
        .expect("thread")
        .expect("direct connection to a backend");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    (&stream).write_all(b"direct\n").expect("write");
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).expect("read");
    let reply = Reply::parse(&line).expect("reply");
    assert_eq!(reply.backend, backend_name(1));
    assert_eq!(reply.client.ip(), CLIENT_ADDR);
    let after = cluster.counters();
    assert!(delta(&before, &after, "pass_no_service") > 0);
    assert_eq!(delta(&before, &after, "flow_created"), 0);
}

#[test]
fn agent_restart_keeps_an_open_tcp_connection() {
    if !require_root("agent_restart_keeps_an_open_tcp_connection") {
        return;
    }
    let mut cluster = Cluster::start(Setup::default()).expect("cluster");
    let mut connection = Connection::open(cluster.client(), TCP_FRONTEND).expect("connect");
    let backend = tcp_reply(&mut connection).backend;
    let before = cluster.counters();

    // A crash: the agent dies without cleaning anything up.
    cluster.agent().kill();
    // The dataplane outlives it: links and maps are pinned.
    for _ in 0..5 {
        assert_eq!(tcp_reply(&mut connection).backend, backend);
    }

    cluster.start_agent().expect("restart");
    for _ in 0..5 {
        assert_eq!(tcp_reply(&mut connection).backend, backend);
    }
    // The same backend could be chosen again by chance (1 in 3): the proof that conntrack kept
    // the flow is that none of its packets made a flow or a new choice.
    let after = cluster.counters();
    for counter in ["flow_created", "flow_reselected"] {
        assert_eq!(
            after[counter], before[counter],
            "{counter}: the open connection's packets must find their flow across the restart"
        );
    }
    let log = cluster.agent().log_text();
    assert!(
        log.contains("replaced in the existing link"),
        "the restarted agent must swap its program into the pinned links:\n{log}"
    );
    // Nothing changed in the manifests, so the restarted agent must not write the maps.
    assert!(
        !log.contains("programmed"),
        "an idempotent restart writes nothing:\n{log}"
    );
    // And new flows still work.
    let (tcp, _) = spread(&cluster, UdpChecksum::Computed);
    assert!(tcp.iter().all(|n| *n > 0), "TCP spread {tcp:?}");
}

#[test]
fn removing_an_endpoint_stops_new_flows_and_moves_its_udp_flows() {
    if !require_root("removing_an_endpoint_stops_new_flows_and_moves_its_udp_flows") {
        return;
    }
    let cluster = Cluster::start(Setup::default()).expect("cluster");
    // A UDP flow (think DNS) pinned to backend 3 before it goes away.
    let pinned = (0..100)
        .map(|_| udp_socket(cluster.client(), UDP_FRONTEND, UdpChecksum::Computed).expect("socket"))
        .find(|socket| udp_reply(socket).backend == backend_name(2))
        .expect("some UDP flow lands on backend 3");

    std::fs::write(
        cluster.manifests().join("echo.yaml"),
        echo_manifest(&[0, 1]),
    )
    .expect("edit");
    assert!(
        wait_until(APPLY_TIMEOUT, || cluster.tcp_endpoints().len() == 2),
        "the agent did not apply the edit: {:?}",
        cluster.tcp_endpoints()
    );
    let (tcp, udp) = spread(&cluster, UdpChecksum::Computed);
    assert_eq!(
        tcp[2], 0,
        "new TCP flows reached the removed backend: {tcp:?}"
    );
    assert_eq!(
        udp[2], 0,
        "new UDP flows reached the removed backend: {udp:?}"
    );
    assert!(tcp[0] > 0 && tcp[1] > 0, "TCP spread {tcp:?}");
    // The pinned UDP flow moves to a live backend on its next datagram.
    let moved = udp_reply(&pinned).backend;
    assert_ne!(moved, backend_name(2));
}

/// The broken edit of the echo Service these tests make, and where the agent must say it is.
const BROKEN_FIELD: &str = "spec.ports[0].port";
const BROKEN_OBJECT: &str = "Service e2e/echo";

/// The echo manifest on `backends` with its Service's first port made invalid.
fn broken_echo_manifest(backends: &[usize]) -> String {
    echo_manifest(backends).replace(&format!("port: {TCP_PORT}\n"), "port: 0\n")
}

/// Whether `log` names the file, the object and the field of the broken echo Service.
fn names_the_error(log: &str, manifest: &std::path::Path) -> bool {
    log.contains(&manifest.display().to_string())
        && log.contains(BROKEN_OBJECT)
        && log.contains(BROKEN_FIELD)
}

#[test]
fn a_broken_manifest_keeps_the_service_and_names_the_field() {
    if !require_root("a_broken_manifest_keeps_the_service_and_names_the_field") {
        return;
    }
    let mut cluster = Cluster::start(Setup::default()).expect("cluster");
    // The Service breaks; the EndpointSlice in the same file changes validly (drops backend 3).
    let manifest = cluster.manifests().join("echo.yaml");
    std::fs::write(&manifest, broken_echo_manifest(&[0, 1])).expect("edit");
    assert!(
        wait_until(APPLY_TIMEOUT, || names_the_error(
            &cluster.agent().log_text(),
            &manifest
        )),
        "the agent must name the file, object and field:\n{}",
        cluster.agent().log_text()
    );
    // The broken Service kept its last good version (still serving port 80), and the valid
    // EndpointSlice beside it still applied.
    assert!(
        wait_until(APPLY_TIMEOUT, || cluster.tcp_endpoints().len() == 2),
        "{:?}",
        cluster.tcp_endpoints()
    );
    let (tcp, _) = spread(&cluster, UdpChecksum::Computed);
    assert!(
        tcp[0] > 0 && tcp[1] > 0 && tcp[2] == 0,
        "TCP spread {tcp:?}"
    );
}

#[test]
fn a_restart_with_a_broken_manifest_keeps_the_service() {
    if !require_root("a_restart_with_a_broken_manifest_keeps_the_service") {
        return;
    }
    let mut cluster = Cluster::start(Setup::default()).expect("cluster");
    let manifest = cluster.manifests().join("echo.yaml");
    std::fs::write(&manifest, broken_echo_manifest(&[0, 1, 2])).expect("edit");
    assert!(
        wait_until(APPLY_TIMEOUT, || names_the_error(
            &cluster.agent().log_text(),
            &manifest
        )),
        "the agent did not read the broken edit:\n{}",
        cluster.agent().log_text()
    );

    // The restarted agent reads the Service broken: only what it kept in --state-dir says what
    // the Service was.
    cluster.agent().kill();
    cluster.start_agent().expect("restart");
    let log = cluster.agent().log_text();
    assert!(
        names_the_error(&log, &manifest),
        "the restarted agent must name the file, object and field:\n{log}"
    );
    let all_backends = |port: u16| -> Vec<String> {
        (0..BACKENDS)
            .map(|index| format!("{}:{port}", backend_addr(index)))
            .collect()
    };
    assert_eq!(cluster.tcp_endpoints(), all_backends(BACKEND_TCP_PORT));
    assert_eq!(
        cluster.endpoints(UDP_FRONTEND, "UDP"),
        all_backends(BACKEND_UDP_PORT)
    );
    let (tcp, udp) = spread(&cluster, UdpChecksum::Computed);
    assert!(tcp.iter().all(|n| *n > 0), "TCP spread {tcp:?}");
    assert!(udp.iter().all(|n| *n > 0), "UDP spread {udp:?}");
}

#[test]
fn a_second_manifest_file_serves_until_it_is_deleted() {
    if !require_root("a_second_manifest_file_serves_until_it_is_deleted") {
        return;
    }
    let mut cluster = Cluster::start(Setup::default()).expect("cluster");
    let agent_pid = cluster.agent().pid();
    let second_tcp = SocketAddr::from((SECOND_CLUSTER_IP, TCP_PORT));
    let second_udp = SocketAddr::from((SECOND_CLUSTER_IP, UDP_PORT));
    let second_file = cluster.manifests().join("echo-2.yaml");

    std::fs::write(
        &second_file,
        service_manifest("echo-2", SECOND_CLUSTER_IP, &[0, 1, 2]),
    )
    .expect("add");
    assert!(
        wait_until(APPLY_TIMEOUT, || {
            cluster.endpoints(second_tcp, "TCP").len() == BACKENDS
                && cluster.endpoints(second_udp, "UDP").len() == BACKENDS
        }),
        "the agent did not program the new Service: {:?}",
        cluster.frontends()
    );
    let (tcp, udp) = spread_to(&cluster, second_tcp, second_udp, UdpChecksum::Computed);
    assert!(tcp.iter().all(|n| *n > 0), "TCP spread {tcp:?}");
    assert!(udp.iter().all(|n| *n > 0), "UDP spread {udp:?}");
    assert_eq!(cluster.agent().pid(), agent_pid, "served without a restart");

    std::fs::remove_file(&second_file).expect("delete");
    let second_ip = format!("{SECOND_CLUSTER_IP}:");
    assert!(
        wait_until(APPLY_TIMEOUT, || !cluster
            .frontends()
            .iter()
            .any(|frontend| frontend.starts_with(&second_ip))),
        "the agent did not remove the deleted Service: {:?}",
        cluster.frontends()
    );
    let before = cluster.counters();
    let connected = cluster
        .client()
        .run(|| TcpStream::connect_timeout(&second_tcp, UNSERVED_CONNECT_TIMEOUT))
        .expect("thread");
    assert!(
        connected.is_err(),
        "nothing serves {second_tcp} any more, yet a connection opened"
    );
    let after = cluster.counters();
    assert!(
        delta(&before, &after, "pass_no_service") > 0,
        "the SYN must pass untranslated: {after:?}"
    );
    assert_eq!(delta(&before, &after, "flow_created"), 0, "{after:?}");

    // The first Service was never touched.
    let (tcp, udp) = spread(&cluster, UdpChecksum::Computed);
    assert!(tcp.iter().all(|n| *n > 0), "TCP spread {tcp:?}");
    assert!(udp.iter().all(|n| *n > 0), "UDP spread {udp:?}");
}

#[test]
fn a_not_ready_endpoint_keeps_its_connections_until_it_leaves_the_slice() {
    if !require_root("a_not_ready_endpoint_keeps_its_connections_until_it_leaves_the_slice") {
        return;
    }
    let cluster = Cluster::start(Setup::default()).expect("cluster");
    let mut connection = Connection::open(cluster.client(), TCP_FRONTEND).expect("connect");
    let reply = connection.request().expect("request");
    let pinned = backend_index(&reply).expect("backend");

    // The pod fails its readiness probe (or starts terminating): still listed, not ready.
    let address = format!("- addresses: [\"{}\"]\n", backend_addr(pinned));
    let not_ready = echo_manifest(&[0, 1, 2]).replace(
        &address,
        &format!("{address}  conditions: {{ready: false}}\n"),
    );
    std::fs::write(cluster.manifests().join("echo.yaml"), not_ready).expect("edit");
    assert!(
        wait_until(APPLY_TIMEOUT, || cluster.tcp_endpoints().len() == 2),
        "the agent did not apply the edit: {:?}",
        cluster.tcp_endpoints()
    );
    // The established connection keeps its backend...
    for _ in 0..5 {
        let reply = connection.request().expect("request while not ready");
        assert_eq!(backend_index(&reply).expect("backend"), pinned);
    }
    // ...and no new flow gets it.
    let (tcp, udp) = spread(&cluster, UdpChecksum::Computed);
    assert_eq!(
        tcp[pinned], 0,
        "new TCP flows reached a not-ready endpoint: {tcp:?}"
    );
    assert_eq!(
        udp[pinned], 0,
        "new UDP flows reached a not-ready endpoint: {udp:?}"
    );

    // The endpoint leaves the slice: the connection gets a reset from the backend its next
    // segment is sent to, not a blackhole.
    let remaining: Vec<usize> = (0..BACKENDS).filter(|index| *index != pinned).collect();
    std::fs::write(
        cluster.manifests().join("echo.yaml"),
        echo_manifest(&remaining),
    )
    .expect("edit");
    let counters = cluster.counters();
    assert!(
        wait_until(APPLY_TIMEOUT, || {
            // The endpoint list is unchanged (it had no slot); the entry's removal shows in the
            // map only as the flow being re-selected, so poke the flow until that happens.
            let _ = connection.request();
            delta(&counters, &cluster.counters(), "flow_reselected") > 0
        }),
        "the removed endpoint's flow was never re-selected"
    );
    let started = std::time::Instant::now();
    let error = connection
        .request()
        .expect_err("the moved connection must be reset");
    assert!(
        started.elapsed() < IO_TIMEOUT,
        "the connection hung instead of being reset: {error:#}"
    );
}

/// A load balancer's addresses and an external IP, outside the Service CIDR. The client routes
/// them through the node, as the router in front of a cluster's nodes would.
const LOAD_BALANCER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const PROXYING_LOAD_BALANCER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

#[test]
fn load_balancer_ingress_and_external_ips_reach_every_backend() {
    if !require_root("load_balancer_ingress_and_external_ips_reach_every_backend") {
        return;
    }
    let cluster = Cluster::start(Setup::default()).expect("cluster");
    for addr in [LOAD_BALANCER_IP, PROXYING_LOAD_BALANCER_IP, EXTERNAL_IP] {
        cluster
            .client()
            .ip(&[
                "route",
                "add",
                &format!("{addr}/32"),
                "via",
                &NODE_CLIENT_SIDE.to_string(),
            ])
            .expect("client route");
    }
    // A LoadBalancer Service whose status lists an address traffic arrives at, and one of a
    // load balancer that proxies (ipMode: Proxy), which kube-proxy leaves alone.
    let manifest = service_manifest("edge", SECOND_CLUSTER_IP, &[0, 1, 2])
        .replacen(
            "spec:\n",
            &format!("spec:\n  type: LoadBalancer\n  externalIPs: [\"{EXTERNAL_IP}\"]\n"),
            1,
        )
        .replacen(
            "---\n",
            &format!(
                "status:\n  loadBalancer:\n    ingress:\n    - ip: {LOAD_BALANCER_IP}\n    - ip: \
                 {PROXYING_LOAD_BALANCER_IP}\n      ipMode: Proxy\n---\n"
            ),
            1,
        );
    std::fs::write(cluster.manifests().join("edge.yaml"), manifest).expect("manifest");
    let wanted: Vec<String> = [SECOND_CLUSTER_IP, LOAD_BALANCER_IP, EXTERNAL_IP]
        .iter()
        .map(|addr| format!("{addr}:{TCP_PORT}"))
        .collect();
    assert!(
        wait_until(APPLY_TIMEOUT, || {
            let frontends = cluster.frontends();
            wanted.iter().all(|frontend| frontends.contains(frontend))
        }),
        "the agent did not program {wanted:?}: {:?}",
        cluster.frontends()
    );
    assert!(
        !cluster
            .frontends()
            .iter()
            .any(|frontend| frontend.starts_with(&PROXYING_LOAD_BALANCER_IP.to_string())),
        "a proxying load balancer's address was programmed: {:?}",
        cluster.frontends()
    );
    for addr in [LOAD_BALANCER_IP, EXTERNAL_IP] {
        assert_every_backend_through(&cluster, addr, (TCP_PORT, UDP_PORT));
    }
    // Nothing serves the proxying load balancer's address on this node: the node has no
    // route to it and refuses at once.
    let refused = cluster
        .client()
        .run(|| {
            TcpStream::connect_timeout(
                &SocketAddr::from((PROXYING_LOAD_BALANCER_IP, TCP_PORT)),
                UNSERVED_CONNECT_TIMEOUT,
            )
        })
        .expect("client thread");
    assert!(refused.is_err(), "{PROXYING_LOAD_BALANCER_IP} answered");
}

/// The echo Service's nodePorts in the NodePort tests.
const TCP_NODE_PORT: u16 = 30_080;
const UDP_NODE_PORT: u16 = 30_053;

/// The echo manifest with the Service made a NodePort Service.
fn node_port_echo_manifest() -> String {
    echo_manifest(&[0, 1, 2])
        .replacen("spec:\n", "spec:\n  type: NodePort\n", 1)
        .replacen(
            "    targetPort: http\n",
            &format!("    targetPort: http\n    nodePort: {TCP_NODE_PORT}\n"),
            1,
        )
        .replacen(
            &format!("    targetPort: {BACKEND_UDP_PORT}\n"),
            &format!("    targetPort: {BACKEND_UDP_PORT}\n    nodePort: {UDP_NODE_PORT}\n"),
            1,
        )
}

/// Makes the echo Service a NodePort Service and waits until `addr`'s nodePort is programmed.
fn serve_node_ports(cluster: &Cluster, addr: Ipv4Addr) {
    std::fs::write(
        cluster.manifests().join("echo.yaml"),
        node_port_echo_manifest(),
    )
    .expect("edit");
    let wanted = format!("{addr}:{TCP_NODE_PORT}");
    assert!(
        wait_until(APPLY_TIMEOUT, || cluster.frontends().contains(&wanted)),
        "the agent did not program {wanted}: {:?}",
        cluster.frontends()
    );
}

#[test]
fn node_ports_answer_on_every_node_address() {
    if !require_root("node_ports_answer_on_every_node_address") {
        return;
    }
    let cluster = Cluster::start(Setup::default()).expect("cluster");
    serve_node_ports(&cluster, NODE_CLIENT_SIDE);
    // The node's address on the client's link, and its address on a backend's link (routed
    // through the node like any address behind it).
    for addr in [NODE_CLIENT_SIDE, node_backend_side(1)] {
        assert_every_backend_through(&cluster, addr, (TCP_NODE_PORT, UDP_NODE_PORT));
    }
}

#[test]
fn node_ports_answer_only_on_the_allowed_addresses() {
    if !require_root("node_ports_answer_only_on_the_allowed_addresses") {
        return;
    }
    let cluster = Cluster::start(Setup {
        agent_args: &[REDIRECT_VETH, "--nodeport-addresses", "10.0.0.0/24"],
        ..Setup::default()
    })
    .expect("cluster");
    serve_node_ports(&cluster, NODE_CLIENT_SIDE);
    let (tcp, _) = spread_to(
        &cluster,
        SocketAddr::from((NODE_CLIENT_SIDE, TCP_NODE_PORT)),
        SocketAddr::from((NODE_CLIENT_SIDE, UDP_NODE_PORT)),
        UdpChecksum::Computed,
    );
    assert!(tcp.iter().all(|n| *n > 0), "TCP spread {tcp:?}");
    let outside = node_backend_side(1);
    assert!(
        !cluster
            .frontends()
            .contains(&format!("{outside}:{TCP_NODE_PORT}")),
        "{:?}",
        cluster.frontends()
    );
    // Nothing listens there on the node itself: the node's stack refuses at once.
    let refused = cluster
        .client()
        .run(|| {
            TcpStream::connect_timeout(
                &SocketAddr::from((outside, TCP_NODE_PORT)),
                UNSERVED_CONNECT_TIMEOUT,
            )
        })
        .expect("client thread");
    assert!(
        refused.is_err(),
        "{outside}:{TCP_NODE_PORT} answered outside --nodeport-addresses"
    );
}

#[test]
fn terminating_endpoints_take_new_flows_while_none_is_ready() {
    if !require_root("terminating_endpoints_take_new_flows_while_none_is_ready") {
        return;
    }
    let cluster = Cluster::start(Setup::default()).expect("cluster");
    // A rollout caught halfway: no endpoint is ready; backends 1 and 2 are terminating but still
    // serving, backend 3 is terminating and no longer serves.
    let conditions = [
        "{ready: false, serving: true, terminating: true}",
        "{ready: false, serving: true, terminating: true}",
        "{ready: false, serving: false, terminating: true}",
    ];
    let mut manifest = echo_manifest(&[0, 1, 2]);
    for (index, condition) in conditions.iter().enumerate() {
        let line = format!("- addresses: [\"{}\"]\n", backend_addr(index));
        manifest = manifest.replacen(&line, &format!("{}  conditions: {condition}\n", line), 1);
    }
    std::fs::write(cluster.manifests().join("echo.yaml"), manifest).expect("edit");
    assert!(
        wait_until(APPLY_TIMEOUT, || cluster.tcp_endpoints().len() == 2),
        "the agent did not apply the edit: {:?}",
        cluster.tcp_endpoints()
    );
    let (tcp, udp) = spread(&cluster, UdpChecksum::Computed);
    assert_eq!(
        tcp[2], 0,
        "a non-serving endpoint got new TCP flows: {tcp:?}"
    );
    assert_eq!(
        udp[2], 0,
        "a non-serving endpoint got new UDP flows: {udp:?}"
    );
    assert!(tcp[0] > 0 && tcp[1] > 0, "TCP spread {tcp:?}");
    assert!(udp[0] > 0 && udp[1] > 0, "UDP spread {udp:?}");
    // lb explain names the branch.
    let explained = cluster.explain(&[
        "--from",
        &CLIENT_ADDR.to_string(),
        "--to",
        &format!("{TCP_FRONTEND}/tcp"),
    ]);
    assert_eq!(
        explained["frontend"]["terminating_fallback"], true,
        "{explained:#}"
    );
}

/// The NodePort echo manifest with `externalTrafficPolicy: Local`, its endpoints on the nodes
/// `nodes` names (one per backend).
fn local_policy_manifest(nodes: [&str; BACKENDS]) -> String {
    let mut manifest =
        node_port_echo_manifest().replacen("spec:\n", "spec:\n  externalTrafficPolicy: Local\n", 1);
    for (index, node) in nodes.iter().enumerate() {
        let line = format!("- addresses: [\"{}\"]\n", backend_addr(index));
        manifest = manifest.replacen(
            &format!("{line}  nodeName: {NODE_NAME}\n"),
            &format!("{line}  nodeName: {node}\n"),
            1,
        );
    }
    manifest
}

#[test]
fn external_traffic_policy_local_uses_only_this_node_s_endpoints_or_drops() {
    if !require_root("external_traffic_policy_local_uses_only_this_node_s_endpoints_or_drops") {
        return;
    }
    let cluster = Cluster::start(Setup {
        agent_args: &[REDIRECT_VETH, "--node-name", NODE_NAME],
        ..Setup::default()
    })
    .expect("cluster");
    let node_port = SocketAddr::from((NODE_CLIENT_SIDE, TCP_NODE_PORT));
    std::fs::write(
        cluster.manifests().join("echo.yaml"),
        local_policy_manifest([NODE_NAME, NODE_NAME, "node-b"]),
    )
    .expect("edit");
    assert!(
        wait_until(APPLY_TIMEOUT, || cluster.endpoints(node_port, "TCP").len()
            == 2),
        "the agent did not apply the policy: {:?}",
        cluster.endpoints(node_port, "TCP")
    );
    // External traffic (the nodePort) stays on this node's endpoints; the ClusterIP is not
    // external and keeps every endpoint.
    let (tcp, udp) = spread_to(
        &cluster,
        node_port,
        SocketAddr::from((NODE_CLIENT_SIDE, UDP_NODE_PORT)),
        UdpChecksum::Computed,
    );
    assert_eq!(
        tcp[2], 0,
        "another node's endpoint got nodePort traffic: {tcp:?}"
    );
    assert_eq!(
        udp[2], 0,
        "another node's endpoint got nodePort traffic: {udp:?}"
    );
    assert!(tcp[0] > 0 && tcp[1] > 0, "TCP spread {tcp:?}");
    let (tcp, _) = spread(&cluster, UdpChecksum::Computed);
    assert!(tcp.iter().all(|n| *n > 0), "ClusterIP spread {tcp:?}");

    // Every endpoint elsewhere: the nodePort drops (counted) rather than leave the node.
    std::fs::write(
        cluster.manifests().join("echo.yaml"),
        local_policy_manifest(["node-b"; BACKENDS]),
    )
    .expect("edit");
    assert!(
        wait_until(APPLY_TIMEOUT, || cluster
            .endpoints(node_port, "TCP")
            .is_empty()),
        "the agent did not apply the edit: {:?}",
        cluster.endpoints(node_port, "TCP")
    );
    let before = cluster.counters();
    let connected = cluster
        .client()
        .run(|| TcpStream::connect_timeout(&node_port, UNSERVED_CONNECT_TIMEOUT))
        .expect("client thread");
    // Dropped, not refused: the Service has endpoints, only not here (kube-proxy does the same).
    let error = connected.expect_err("answered with no local endpoint");
    assert_eq!(error.kind(), ErrorKind::TimedOut, "{node_port}: {error}");
    assert!(delta(&before, &cluster.counters(), "drop_no_local_endpoint") > 0);
    // lb explain gives the policy and the reason.
    let explained = cluster.explain(&[
        "--from",
        &CLIENT_ADDR.to_string(),
        "--to",
        &format!("{node_port}/tcp"),
    ]);
    assert_eq!(
        explained["frontend"]["traffic_policy"], "Local",
        "{explained:#}"
    );
    assert_eq!(explained["frontend"]["via"], "NodePort", "{explained:#}");
    assert_eq!(
        explained["verdict"], "drop_no_local_endpoint",
        "{explained:#}"
    );
}

/// An address of the service CIDR that no Service holds.
const UNALLOCATED_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);
/// A port the echo Service does not define.
const UNDEFINED_PORT: u16 = 81;

#[test]
fn a_service_without_endpoints_or_port_refuses_and_unallocated_addresses_drop() {
    if !require_root("a_service_without_endpoints_or_port_refuses_and_unallocated_addresses_drop") {
        return;
    }
    let cluster = Cluster::start(Setup {
        agent_args: &[REDIRECT_VETH, "--service-cidr", "10.96.0.0/12"],
        ..Setup::default()
    })
    .expect("cluster");
    let connect = |target: SocketAddr| {
        cluster
            .client()
            .run(move || TcpStream::connect_timeout(&target, UNSERVED_CONNECT_TIMEOUT))
            .expect("client thread")
    };

    // A port the Service does not define: refused at once, like a closed port on a host.
    let before = cluster.counters();
    let error = connect(SocketAddr::from((CLUSTER_IP, UNDEFINED_PORT)))
        .expect_err("an undefined port answered");
    assert_eq!(
        error.kind(),
        ErrorKind::ConnectionRefused,
        "{error}; counters moved: {:?}",
        moved(&before, &cluster.counters())
    );
    assert_eq!(
        delta(&before, &cluster.counters(), "reject_undefined_port"),
        1
    );

    // An unallocated address of the service CIDR: dropped (without the flag, the node's stack
    // would answer "no route").
    let before = cluster.counters();
    let error = connect(SocketAddr::from((UNALLOCATED_SERVICE_IP, TCP_PORT)))
        .expect_err("an unallocated address answered");
    assert_eq!(error.kind(), ErrorKind::TimedOut, "{error}");
    assert!(delta(&before, &cluster.counters(), "drop_unallocated_service_ip") > 0);

    // Every endpoint gone: TCP and UDP clients are refused at once instead of timing out.
    std::fs::write(cluster.manifests().join("echo.yaml"), echo_manifest(&[])).expect("edit");
    assert!(
        wait_until(APPLY_TIMEOUT, || cluster
            .frontends()
            .contains(&TCP_FRONTEND.to_string())
            && cluster.tcp_endpoints().is_empty()),
        "the agent did not apply the edit: {:?}",
        cluster.tcp_endpoints()
    );
    let before = cluster.counters();
    let error = connect(TCP_FRONTEND).expect_err("a Service without endpoints answered");
    assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{error}");
    let udp = udp_refusal(
        &cluster,
        UNSERVED_CONNECT_TIMEOUT,
        "a Service without endpoints answered",
    );
    assert_eq!(udp.kind(), ErrorKind::ConnectionRefused, "{udp}");
    assert_eq!(
        delta(&before, &cluster.counters(), "reject_no_endpoints"),
        2
    );
}

#[test]
fn without_veth_redirects_the_refusal_goes_back_through_the_node_s_stack() {
    if !require_root("without_veth_redirects_the_refusal_goes_back_through_the_node_s_stack") {
        return;
    }
    let cluster = Cluster::start(Setup {
        agent_args: &[],
        ..Setup::default()
    })
    .expect("cluster");
    let before = cluster.counters();
    let target = SocketAddr::from((CLUSTER_IP, UNDEFINED_PORT));
    let error = cluster
        .client()
        .run(move || TcpStream::connect_timeout(&target, UNSERVED_CONNECT_TIMEOUT))
        .expect("client thread")
        .expect_err("an undefined port answered");
    let moved = moved(&before, &cluster.counters());
    assert_eq!(
        error.kind(),
        ErrorKind::ConnectionRefused,
        "{error}; counters moved: {moved:?}"
    );
    assert_eq!(moved.get("reject_via_stack"), Some(&1), "{moved:?}");
}

#[test]
fn client_ip_session_affinity_keeps_a_client_on_one_endpoint() {
    if !require_root("client_ip_session_affinity_keeps_a_client_on_one_endpoint") {
        return;
    }
    let cluster = Cluster::start(Setup::default()).expect("cluster");
    std::fs::write(
        cluster.manifests().join("echo.yaml"),
        echo_manifest(&[0, 1, 2]).replacen("spec:\n", "spec:\n  sessionAffinity: ClientIP\n", 1),
    )
    .expect("edit");
    let sticky = || {
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&cluster.lb(&["services", "-o", "json"])).expect("JSON");
        rows.iter().all(|row| row["affinity_timeout_s"] == 10_800)
    };
    assert!(
        wait_until(APPLY_TIMEOUT, sticky),
        "the agent did not apply session affinity: {}",
        cluster.lb(&["services"])
    );
    // Every new connection and UDP flow of the client lands where its first one did: one
    // backend each for TCP and UDP (separate Service ports, separate affinities).
    let before = cluster.counters();
    let (tcp, udp) = spread(&cluster, UdpChecksum::Computed);
    assert_eq!(tcp.iter().filter(|n| **n > 0).count(), 1, "TCP {tcp:?}");
    assert_eq!(udp.iter().filter(|n| **n > 0).count(), 1, "UDP {udp:?}");
    assert_eq!(
        delta(&before, &cluster.counters(), "affinity_hit"),
        2 * (FLOWS as u64 - 1)
    );
    // lb explain follows the same affinity, and leaves it as it was.
    let endpoint = tcp.iter().position(|n| *n > 0).expect("the TCP endpoint");
    let explained = cluster.explain(&[
        "--from",
        &CLIENT_ADDR.to_string(),
        "--to",
        &format!("{TCP_FRONTEND}/tcp"),
    ]);
    assert_eq!(
        explained["backend"],
        format!("{}:{BACKEND_TCP_PORT}", backend_addr(endpoint)).as_str(),
        "{explained:#}"
    );
    assert!(lists(&explained["events"], "affinity_hit"), "{explained:#}");
    assert_eq!(explained["frontend"]["affinity_timeout_s"], 10_800);
}

/// The `edge` LoadBalancer Service on [`LOAD_BALANCER_IP`], admitting `ranges`.
fn guarded_load_balancer_manifest(ranges: &str) -> String {
    service_manifest("edge", SECOND_CLUSTER_IP, &[0, 1, 2])
        .replacen(
            "spec:\n",
            &format!("spec:\n  type: LoadBalancer\n  loadBalancerSourceRanges: [{ranges}]\n"),
            1,
        )
        .replacen(
            "---\n",
            &format!("status:\n  loadBalancer:\n    ingress:\n    - ip: {LOAD_BALANCER_IP}\n---\n"),
            1,
        )
}

#[test]
fn load_balancer_source_ranges_admit_their_clients_and_drop_the_others() {
    if !require_root("load_balancer_source_ranges_admit_their_clients_and_drop_the_others") {
        return;
    }
    let cluster = Cluster::start(Setup::default()).expect("cluster");
    cluster
        .client()
        .ip(&[
            "route",
            "add",
            &format!("{LOAD_BALANCER_IP}/32"),
            "via",
            &NODE_CLIENT_SIDE.to_string(),
        ])
        .expect("client route");
    let frontend = SocketAddr::from((LOAD_BALANCER_IP, TCP_PORT));
    let manifest = cluster.manifests().join("edge.yaml");
    std::fs::write(&manifest, guarded_load_balancer_manifest("10.0.0.0/24")).expect("manifest");
    // The ranges are written before the frontend that looks them up.
    assert!(
        wait_until(APPLY_TIMEOUT, || cluster
            .frontends()
            .contains(&frontend.to_string())),
        "{}",
        cluster.lb(&["services"])
    );
    // The client's own range: every backend answers through the load balancer IP.
    assert_every_backend_through(&cluster, LOAD_BALANCER_IP, (TCP_PORT, UDP_PORT));

    // Another range only: the client's connections are dropped and counted.
    std::fs::write(&manifest, guarded_load_balancer_manifest("192.0.2.0/24")).expect("edit");
    let before = cluster.counters();
    let dropped = wait_until(APPLY_TIMEOUT, || {
        cluster
            .client()
            .run(move || TcpStream::connect_timeout(&frontend, UNSERVED_CONNECT_TIMEOUT))
            .expect("client thread")
            .is_err_and(|error| error.kind() == ErrorKind::TimedOut)
    });
    assert!(dropped, "{frontend} still answered outside the ranges");
    assert!(delta(&before, &cluster.counters(), "drop_source_range") > 0);
    let explained = cluster.explain(&[
        "--from",
        &CLIENT_ADDR.to_string(),
        "--to",
        &format!("{frontend}/tcp"),
    ]);
    assert_eq!(explained["verdict"], "drop_source_range", "{explained:#}");
    assert_eq!(
        explained["frontend"]["source_ranges"], true,
        "{explained:#}"
    );
    // The ClusterIP of the same Service is not guarded.
    let through_cluster_ip = SocketAddr::from((SECOND_CLUSTER_IP, TCP_PORT));
    let mut connection =
        Connection::open(cluster.client(), through_cluster_ip).expect("ClusterIP connection");
    connection.request().expect("ClusterIP answer");
}

/// An address no Service holds, outside the service CIDR.
const NOT_A_SERVICE: &str = "10.250.0.1:80/tcp";

/// Whether `value`, a JSON array of strings, holds `wanted`.
fn lists(value: &serde_json::Value, wanted: &str) -> bool {
    value
        .as_array()
        .is_some_and(|items| items.iter().any(|item| item == wanted))
}

/// Counters an explain run must not move (background traffic such as IPv6 router solicitations
/// moves others).
const EXPLAIN_QUIET_COUNTERS: [&str; 8] = [
    "flow_created",
    "redirect_service",
    "tx_service",
    "stack_service",
    "reject_undefined_port",
    "reject_no_endpoints",
    "pass_no_service",
    "affinity_hit",
];

#[test]
fn explain_agrees_with_real_packets_and_changes_nothing() {
    if !require_root("explain_agrees_with_real_packets_and_changes_nothing") {
        return;
    }
    let cluster = Cluster::start(Setup::default()).expect("cluster");
    let mut connection = Connection::open(cluster.client(), TCP_FRONTEND).expect("connect");
    let real = backend_index(&tcp_reply(&mut connection)).expect("backend");
    let client = connection.local_addr().expect("client address").to_string();
    let tcp = format!("{TCP_FRONTEND}/tcp");
    let flows = cluster.flows();
    let counters = cluster.counters();
    let traffic = cluster.traffic();

    // The open connection's next packet goes where its packets went.
    let tracked = cluster.explain(&["--from", &client, "--to", &tcp, "--established"]);
    let real_endpoint = format!("{}:{BACKEND_TCP_PORT}", backend_addr(real));
    assert_eq!(tracked["backend"], real_endpoint.as_str(), "{tracked:#}");
    assert!(
        lists(&tracked["steps"], "followed the flow's conntrack entry"),
        "{tracked:#}"
    );
    assert_eq!(
        tracked["rewritten"],
        format!("TCP {client} -> {real_endpoint}").as_str(),
        "{tracked:#}"
    );
    assert!(
        tracked["frontend"]["service"]
            .as_str()
            .is_some_and(|service| service.ends_with("/echo:http")),
        "{tracked:#}"
    );

    // The backend's reply on that connection goes back to the client as the Service.
    let reply = cluster.explain(&[
        "--from",
        &real_endpoint,
        "--to",
        &format!("{client}/tcp"),
        "--established",
    ]);
    assert_eq!(
        reply["decision"], "reply of a tracked flow: back to its client",
        "{reply:#}"
    );
    assert_eq!(
        reply["rewritten"],
        format!("TCP {TCP_FRONTEND} -> {client}").as_str(),
        "{reply:#}"
    );

    // A new flow: a random one of the three endpoints, which would be recorded.
    let fresh = cluster.explain(&["--from", &CLIENT_ADDR.to_string(), "--to", &tcp]);
    let candidates: Vec<String> = fresh["frontend"]["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .map(|candidate| candidate["endpoint"].as_str().expect("endpoint").to_owned())
        .collect();
    assert_eq!(candidates.len(), BACKENDS, "{fresh:#}");
    let chosen = fresh["backend"].as_str().expect("a backend");
    assert!(
        candidates.iter().any(|candidate| candidate == chosen),
        "{fresh:#}"
    );
    assert!(lists(&fresh["events"], "flow_created"), "{fresh:#}");
    assert!(
        lists(&fresh["steps"], "random choice among the slots"),
        "{fresh:#}"
    );
    let udp = cluster.explain(&[
        "--from",
        &CLIENT_ADDR.to_string(),
        "--to",
        &format!("{UDP_FRONTEND}/udp"),
    ]);
    assert!(
        udp["rewritten"]
            .as_str()
            .expect("rewritten")
            .starts_with("UDP "),
        "{udp:#}"
    );

    // Refusals and strangers, with their reasons.
    let undefined = cluster.explain(&[
        "--from",
        &CLIENT_ADDR.to_string(),
        "--to",
        &format!("{CLUSTER_IP}:{UNDEFINED_PORT}/tcp"),
    ]);
    assert_eq!(
        undefined["verdict"], "reject_undefined_port",
        "{undefined:#}"
    );
    assert!(
        undefined["rewritten"]
            .as_str()
            .is_some_and(|text| text.starts_with("ICMP type 3 code 3")),
        "{undefined:#}"
    );
    let stranger = cluster.explain(&["--from", &CLIENT_ADDR.to_string(), "--to", NOT_A_SERVICE]);
    assert_eq!(stranger["verdict"], "pass_no_service", "{stranger:#}");
    assert_eq!(stranger["action"], "XDP_PASS", "{stranger:#}");

    // Nothing live moved: no flow, no counter, no traffic.
    assert_eq!(cluster.flows(), flows);
    let after = cluster.counters();
    for counter in EXPLAIN_QUIET_COUNTERS {
        assert_eq!(delta(&counters, &after, counter), 0, "{counter}");
    }
    assert_eq!(cluster.traffic(), traffic, "traffic moved");
    // And the real connection still goes where it went.
    assert_eq!(
        backend_index(&tcp_reply(&mut connection)).expect("backend"),
        real
    );
}

/// A port no backend listens on.
const CLOSED_BACKEND_PORT: u16 = 5399;

#[test]
fn a_closed_endpoint_port_refuses_through_the_service() {
    if !require_root("a_closed_endpoint_port_refuses_through_the_service") {
        return;
    }
    let cluster = Cluster::start(Setup::default()).expect("cluster");
    // The UDP port's endpoints point at a port nothing listens on: each backend's kernel answers
    // port unreachable about the translated datagram, which the client's socket can only match
    // once it is translated back.
    std::fs::write(
        cluster.manifests().join("echo.yaml"),
        echo_manifest(&[0, 1, 2]).replace(
            &format!("  port: {BACKEND_UDP_PORT}\n"),
            &format!("  port: {CLOSED_BACKEND_PORT}\n"),
        ),
    )
    .expect("edit");
    let closed = format!("{}:{CLOSED_BACKEND_PORT}", backend_addr(0));
    assert!(
        wait_until(APPLY_TIMEOUT, || cluster
            .endpoints(UDP_FRONTEND, "UDP")
            .contains(&closed)),
        "the agent did not apply the edit: {:?}",
        cluster.endpoints(UDP_FRONTEND, "UDP")
    );
    let before = cluster.counters();
    let error = udp_refusal(&cluster, IO_TIMEOUT, "a closed port answered");
    let moved = moved(&before, &cluster.counters());
    assert_eq!(
        error.kind(),
        ErrorKind::ConnectionRefused,
        "{error}; counters moved: {moved:?}"
    );
    assert_eq!(moved.get("icmp_error_translated"), Some(&1), "{moved:?}");
}

/// The MTU of the links to the backends in the path-MTU test: smaller than the client's.
const BACKEND_LINK_MTU: u16 = 1280;
/// A datagram that fits the client's link but not the backends'.
const BIG_DATAGRAM: usize = 1400;

#[test]
fn path_mtu_discovery_works_through_a_cluster_ip() {
    if !require_root("path_mtu_discovery_works_through_a_cluster_ip") {
        return;
    }
    let cluster = Cluster::start(Setup::default()).expect("cluster");
    let mtu = BACKEND_LINK_MTU.to_string();
    for (index, backend) in cluster.topology.backends.iter().enumerate() {
        let node_side = lb_tests::topology::node_backend_interface(index);
        cluster
            .topology
            .node
            .ip(&["link", "set", &node_side, "mtu", &mtu])
            .expect("node-side MTU");
        backend
            .ip(&["link", "set", "eth0", "mtu", &mtu])
            .expect("backend MTU");
    }
    let before = cluster.counters();
    let learned = cluster
        .client()
        .run(|| -> std::io::Result<(i32, std::io::Error)> {
            use std::os::fd::AsRawFd as _;
            let socket = std::net::UdpSocket::bind((CLIENT_ADDR, 0))?;
            socket.connect(UDP_FRONTEND)?;
            let fd = socket.as_raw_fd();
            let set = |option, value: libc::c_int| {
                // SAFETY: a valid socket and an int option value of the size given.
                let result = unsafe {
                    libc::setsockopt(
                        fd,
                        libc::IPPROTO_IP,
                        option,
                        (&value as *const libc::c_int).cast(),
                        size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if result == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            // DF on every datagram, and path-MTU discovery on this socket.
            set(libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO)?;
            let path_mtu = || -> std::io::Result<i32> {
                let mut value: libc::c_int = 0;
                let mut length = size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: as above, with room for the int the kernel writes.
                let result = unsafe {
                    libc::getsockopt(
                        fd,
                        libc::IPPROTO_IP,
                        libc::IP_MTU,
                        (&mut value as *mut libc::c_int).cast(),
                        &mut length,
                    )
                };
                if result == 0 {
                    Ok(value)
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            socket.send(&[0x5a; BIG_DATAGRAM])?;
            // The node answers at once; give the client's kernel a bounded moment to file it.
            let mut mtu = path_mtu()?;
            for _ in 0..PMTU_POLLS {
                if mtu < BIG_DATAGRAM as i32 {
                    break;
                }
                std::thread::sleep(PMTU_POLL_INTERVAL);
                mtu = path_mtu()?;
            }
            let refused = socket
                .send(&[0x5a; BIG_DATAGRAM])
                .expect_err("a datagram over the path MTU was sent");
            Ok((mtu, refused))
        })
        .expect("client thread")
        .expect("UDP socket");
    let moved = moved(&before, &cluster.counters());
    assert_eq!(
        learned.0,
        i32::from(BACKEND_LINK_MTU),
        "the client did not learn the path MTU; counters moved: {moved:?}"
    );
    assert_eq!(
        learned.1.raw_os_error(),
        Some(libc::EMSGSIZE),
        "{}",
        learned.1
    );
    assert_eq!(moved.get("reject_frag_needed"), Some(&1), "{moved:?}");
}

/// Bounds the wait for the client's kernel to take in a fragmentation-needed answer.
const PMTU_POLLS: usize = 50;
const PMTU_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A UDP datagram larger than the client's link: its kernel sends it in fragments.
const FRAGMENTED_DATAGRAM: usize = 4000;

#[test]
fn a_fragmented_datagram_reaches_one_backend_whole() {
    if !require_root("a_fragmented_datagram_reaches_one_backend_whole") {
        return;
    }
    let cluster = Cluster::start(Setup::default()).expect("cluster");
    let before = cluster.counters();
    let reply = cluster
        .client()
        .run(|| -> anyhow::Result<Reply> {
            let socket = udp_socket(cluster.client(), UDP_FRONTEND, UdpChecksum::Computed)?;
            socket.send(&[0x5a; FRAGMENTED_DATAGRAM])?;
            echo::udp_receive(&socket)
        })
        .expect("client thread")
        .expect("a reply to the fragmented datagram");
    let moved = moved(&before, &cluster.counters());
    // The backend answered (so it reassembled the whole datagram), to the client's own address.
    assert!(backend_index(&reply).is_ok(), "{reply:?}");
    // Three fragments of 1480 bytes at most: the first chose, the other two followed.
    assert_eq!(moved.get("fragment_translated"), Some(&2), "{moved:?}");
}

/// A cgroup (v2) of the test's own, removed on drop (once its processes are gone).
struct CgroupGuard(PathBuf);

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Runs `script` with bash in `netns`, inside `cgroup`; returns its output.
fn shell_in(netns: &Netns, cgroup: &std::path::Path, script: &str) -> std::process::Output {
    use std::{io::Write as _, os::unix::process::CommandExt as _};
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .expect("cgroup.procs");
    let mut command = netns.command("bash").expect("command");
    command.arg("-c").arg(script);
    // SAFETY: write(2) is async-signal-safe; `procs` stays open until exec. Writing 0 moves the
    // writing process into the cgroup.
    unsafe {
        command.pre_exec(move || {
            let mut file = &procs;
            file.write_all(b"0\n")
        });
    }
    command.output().expect("bash")
}

#[test]
fn the_node_s_own_sockets_reach_cluster_ips_and_node_ports() {
    if !require_root("the_node_s_own_sockets_reach_cluster_ips_and_node_ports") {
        return;
    }
    let Some(root) = lb::dataplane::system::cgroup2_root() else {
        println!("SKIP the_node_s_own_sockets_reach_cluster_ips_and_node_ports: no cgroup v2");
        return;
    };
    let cgroup = CgroupGuard(root.join(unique_prefix(leftovers::TESTS)));
    std::fs::create_dir(&cgroup.0).expect("creating a cgroup");
    let cgroup_arg: &'static str = Box::leak(cgroup.0.display().to_string().into_boxed_str());
    let args: &'static [&'static str] = Box::leak(Box::new([
        REDIRECT_VETH,
        lb_tests::agent::SOCKET_CGROUP,
        cgroup_arg,
    ]));
    let cluster = Cluster::start(Setup {
        agent_args: args,
        ..Setup::default()
    })
    .expect("cluster");
    std::fs::write(
        cluster.manifests().join("echo.yaml"),
        node_port_echo_manifest(),
    )
    .expect("edit");
    let node_port = SocketAddr::from((NODE_CLIENT_SIDE, TCP_NODE_PORT));
    assert!(
        wait_until(APPLY_TIMEOUT, || cluster
            .frontends()
            .contains(&node_port.to_string())),
        "{:?}",
        cluster.frontends()
    );
    let before = cluster.counters();
    let script = format!(
        "for i in $(seq {FLOWS}); do
           exec 3<>/dev/tcp/{CLUSTER_IP}/{TCP_PORT} && echo ping >&3 && read -r line <&3 && echo \"TCP $line\"
           exec 3<&-
         done
         exec 3<>/dev/tcp/{NODE_CLIENT_SIDE}/{TCP_NODE_PORT} && echo ping >&3 && read -r line <&3 && echo \"NODEPORT $line\"
         exec 3<&-
         exec 4<>/dev/udp/{CLUSTER_IP}/{UDP_PORT} && printf ping >&4
         read -r -t 3 line <&4; echo \"UDP $line\""
    );
    let output = shell_in(&cluster.topology.node, &cgroup.0, &script);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let moved = moved(&before, &cluster.counters());
    let backends = |kind: &str| -> BTreeMap<String, usize> {
        let mut seen = BTreeMap::new();
        for line in stdout.lines().filter_map(|line| line.strip_prefix(kind)) {
            let name = line
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            *seen.entry(name).or_insert(0) += 1;
        }
        seen
    };
    let tcp = backends("TCP ");
    assert_eq!(
        tcp.values().sum::<usize>(),
        FLOWS,
        "stdout {stdout}\nstderr {}\ncounters {moved:?}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        tcp.len(),
        BACKENDS,
        "the node's connections reached only {tcp:?}"
    );
    assert_eq!(backends("NODEPORT ").values().sum::<usize>(), 1, "{stdout}");
    assert_eq!(backends("UDP ").values().sum::<usize>(), 1, "{stdout}");
    // Every socket was translated before a packet left: none reached the XDP program.
    assert_eq!(
        moved.get("sock_translated"),
        Some(&(FLOWS as u64 + 2)),
        "{moved:?}"
    );
    assert_eq!(moved.get("flow_created"), None, "{moved:?}");

    // A process in the same cgroup but another network namespace (a pod) is left to XDP, where
    // everything that applies to packets applies to it.
    let before = cluster.counters();
    let output = shell_in(
        cluster.client(),
        &cgroup.0,
        &format!(
            "exec 3<>/dev/tcp/{CLUSTER_IP}/{TCP_PORT} && echo ping >&3 && read -r line <&3 && \
             echo \"TCP $line\""
        ),
    );
    let through_xdp = self::moved(&before, &cluster.counters());
    assert!(
        String::from_utf8_lossy(&output.stdout).starts_with("TCP backend-"),
        "{output:?}"
    );
    assert_eq!(through_xdp.get("sock_translated"), None, "{through_xdp:?}");
    assert_eq!(through_xdp.get("flow_created"), Some(&1), "{through_xdp:?}");

    // A Service without endpoints refuses the node's sockets.
    std::fs::write(cluster.manifests().join("echo.yaml"), echo_manifest(&[])).expect("edit");
    assert!(
        wait_until(APPLY_TIMEOUT, || cluster.tcp_endpoints().is_empty()),
        "{:?}",
        cluster.tcp_endpoints()
    );
    let output = shell_in(
        &cluster.topology.node,
        &cgroup.0,
        &format!("exec 3<>/dev/tcp/{CLUSTER_IP}/{TCP_PORT}"),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "connected to a Service without endpoints"
    );
    assert!(stderr.contains("Operation not permitted"), "{stderr}");
}

#[test]
fn a_backend_reaching_its_own_service_is_answered_by_itself_with_the_node_as_source() {
    if !require_root(
        "a_backend_reaching_its_own_service_is_answered_by_itself_with_the_node_as_source",
    ) {
        return;
    }
    let cluster = Cluster::start(Setup::default()).expect("cluster");
    // Backend 1 is the Service's only endpoint, so it is chosen when it calls the Service.
    std::fs::write(cluster.manifests().join("echo.yaml"), echo_manifest(&[0])).expect("edit");
    let only = vec![format!("{}:{BACKEND_TCP_PORT}", backend_addr(0))];
    assert!(
        wait_until(APPLY_TIMEOUT, || cluster.tcp_endpoints() == only),
        "the agent did not apply the edit: {:?}",
        cluster.tcp_endpoints()
    );
    let pod = &cluster.topology.backends[0];
    pod.ip(&[
        "route",
        "add",
        lb_tests::topology::SERVICE_CIDR,
        "via",
        &node_backend_side(0).to_string(),
    ])
    .expect("the pod's route to the Services");
    let before = cluster.counters();
    // Without source NAT the endpoint would answer itself directly, from its own address, and
    // the handshake to the ClusterIP would never complete; with it, the node's address on the
    // pod's link is the peer, on a port of the source NAT range.
    let snat_ports = lb_common::conntrack::SNAT_PORTS;
    let mut connection = Connection::open(pod, TCP_FRONTEND).expect("hairpin TCP connection");
    let reply = connection.exchange().expect("hairpin TCP reply");
    assert_eq!(reply.backend, backend_name(0));
    assert_eq!(
        reply.client.ip(),
        std::net::IpAddr::V4(node_backend_side(0))
    );
    assert!(snat_ports.contains(&reply.client.port()), "{reply:?}");
    // A second request on the same flow keeps its translation.
    assert_eq!(
        connection.exchange().expect("second request").client,
        reply.client
    );
    let socket = udp_socket(pod, UDP_FRONTEND, UdpChecksum::Computed).expect("UDP socket");
    socket.send(b"ping").expect("send");
    let udp = echo::udp_receive_any(&socket).expect("hairpin UDP reply");
    assert_eq!(udp.backend, backend_name(0));
    assert_eq!(udp.client.ip(), std::net::IpAddr::V4(node_backend_side(0)));
    assert!(snat_ports.contains(&udp.client.port()), "{udp:?}");
    let moved = moved(&before, &cluster.counters());
    assert_eq!(moved.get("flow_snat"), Some(&2), "{moved:?}");
    // `lb conntrack` shows each flow's source NAT address and port, as the backend saw them.
    let rows = conntrack_rows(&cluster, &[]);
    for (client, seen_as) in [
        (connection.local_addr().expect("local"), reply.client),
        (socket.local_addr().expect("local"), udp.client),
    ] {
        assert!(
            rows.iter().any(|row| row["client"] == client.to_string()
                && row["source"] == seen_as.to_string()
                && row["backend"]
                    .as_str()
                    .is_some_and(|backend| backend.starts_with(&format!("{}:", backend_addr(0))))),
            "{client} seen as {seen_as}: {rows:#?}"
        );
    }
}

#[test]
fn health_endpoints_say_live_and_ready_on_the_node() {
    if !require_root("health_endpoints_say_live_and_ready_on_the_node") {
        return;
    }
    let cluster = Cluster::start(Setup::default()).expect("cluster");
    let node = &cluster.topology.node;
    for path in ["/healthz", "/readyz"] {
        let (status, body) = lb_tests::agent::health(node, path).expect("health endpoint");
        assert_eq!(status, 200, "{path}: {body}");
        assert!(body.contains("\"ready\":true"), "{path}: {body}");
        assert!(body.contains("\"source\":\"manifests\""), "{path}: {body}");
    }
    let (status, _) = lb_tests::agent::health(node, "/").expect("health endpoint");
    assert_eq!(status, 404);
    // Only on the node's loopback: not from the client.
    let health_port = lb_tests::agent::HEALTH_ADDRESS
        .parse::<SocketAddr>()
        .expect("health address")
        .port();
    let from_client = SocketAddr::from((NODE_CLIENT_SIDE, health_port));
    assert!(
        cluster
            .client()
            .run(move || TcpStream::connect_timeout(&from_client, UNSERVED_CONNECT_TIMEOUT))
            .expect("client namespace")
            .is_err()
    );
}

/// `lb conntrack -o json` with `args`, as JSON rows.
fn conntrack_rows(cluster: &Cluster, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["conntrack", "-o", "json"];
    all.extend_from_slice(args);
    serde_json::from_str(&cluster.lb(&all)).expect("conntrack JSON")
}

#[test]
fn conntrack_lists_each_flow_with_its_backend_and_flushes_the_selected_ones() {
    if !require_root("conntrack_lists_each_flow_with_its_backend_and_flushes_the_selected_ones") {
        return;
    }
    let cluster = Cluster::start(Setup::default()).expect("cluster");
    assert!(conntrack_rows(&cluster, &[]).is_empty());
    // Three TCP connections held open and one UDP exchange: four flows, each with the backend
    // its client was answered by.
    let mut expected = BTreeMap::new();
    let mut connections = Vec::new();
    for _ in 0..3 {
        let mut connection = Connection::open(cluster.client(), TCP_FRONTEND).expect("connect");
        let reply = connection.request().expect("request");
        let backend = backend_addr(backend_index(&reply).expect("backend"));
        let client = connection.local_addr().expect("local address").to_string();
        expected.insert((client, "TCP"), format!("{backend}:{BACKEND_TCP_PORT}"));
        connections.push(connection);
    }
    let socket = udp_socket(cluster.client(), UDP_FRONTEND, UdpChecksum::Computed).expect("udp");
    let reply = udp_request(&socket).expect("udp reply");
    let udp_backend = backend_addr(backend_index(&reply).expect("backend"));
    expected.insert(
        (socket.local_addr().expect("local").to_string(), "UDP"),
        format!("{udp_backend}:{BACKEND_UDP_PORT}"),
    );

    let rows = conntrack_rows(&cluster, &[]);
    let listed: BTreeMap<(String, &str), String> = rows
        .iter()
        .map(|row| {
            assert_eq!(row["service"], "e2e/echo", "{row}");
            assert_eq!(row["source"], row["client"], "no source NAT here: {row}");
            let frontend = if row["protocol"] == "TCP" {
                TCP_FRONTEND
            } else {
                UDP_FRONTEND
            };
            assert_eq!(row["frontend"], frontend.to_string(), "{row}");
            let state = row["state"].as_str().expect("state");
            assert!(["established", "replied"].contains(&state), "{row}");
            let protocol = if row["protocol"] == "TCP" {
                "TCP"
            } else {
                "UDP"
            };
            (
                (row["client"].as_str().expect("client").to_owned(), protocol),
                row["backend"].as_str().expect("backend").to_owned(),
            )
        })
        .collect();
    assert_eq!(listed, expected);
    let table = cluster.lb(&["conntrack"]);
    assert!(table.starts_with("SERVICE"), "{table}");
    assert_eq!(table.lines().count(), 1 + expected.len(), "{table}");

    // Filters: by backend, and by a Service that has no flows.
    let first_backend = expected.values().next().expect("a flow").clone();
    let by_backend = conntrack_rows(&cluster, &["--backend", &first_backend]);
    assert_eq!(
        by_backend.len(),
        expected.values().filter(|b| **b == first_backend).count()
    );
    assert!(conntrack_rows(&cluster, &["--service", "e2e/other"]).is_empty());

    // A flush needs a selection, then forgets exactly the selected flows (both entries: the
    // rows are gone, and nothing of them is left to list).
    assert!(lb(&cluster.lb, &cluster.pin_dir, &["conntrack", "flush"]).is_err());
    let out = cluster.lb(&["conntrack", "flush", "--backend", &first_backend]);
    assert_eq!(out.trim(), format!("flushed {} flows", by_backend.len()));
    let left = conntrack_rows(&cluster, &[]);
    assert_eq!(left.len(), expected.len() - by_backend.len());
    assert!(
        left.iter()
            .all(|row| row["backend"] != first_backend.as_str())
    );
    let out = cluster.lb(&["conntrack", "flush", "--service", "e2e/echo"]);
    assert_eq!(out.trim(), format!("flushed {} flows", left.len()));
    assert!(conntrack_rows(&cluster, &[]).is_empty());
    // Reply entries went with their flows: the map itself is empty.
    let dump = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(cluster.pin_dir.join("LB_CONNTRACK"))
        .output()
        .expect("bpftool");
    assert!(dump.status.success(), "{dump:?}");
    let entries: Vec<serde_json::Value> =
        serde_json::from_slice(&dump.stdout).expect("bpftool JSON");
    assert!(entries.is_empty(), "{entries:?}");
}

/// The value of the OpenMetrics sample `name{labels}` in `text`.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

#[test]
fn metrics_count_the_traffic_sent_and_the_maps_entries() {
    if !require_root("metrics_count_the_traffic_sent_and_the_maps_entries") {
        return;
    }
    let cluster = Cluster::start(Setup::default()).expect("cluster");
    let node = &cluster.topology.node;
    let scrape = || {
        let text = cluster.metrics();
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
        text
    };
    let before = scrape();
    // The manifests were programmed once, with writes: one observation.
    assert!(sample(&before, "lb_sync_duration_seconds_count") >= 1.0);
    assert!(sample(&before, "lb_sync_errors_total") == 0.0);
    // Two frontends (TCP and UDP) and their ClusterIP.
    assert!(sample(&before, "lb_map_entries{map=\"LB_SERVICES\"}") == 2.0);
    assert!(sample(&before, "lb_map_entries{map=\"LB_CLUSTER_IPS\"}") == 1.0);
    assert!(sample(&before, "lb_map_capacity{map=\"LB_CONNTRACK\"}") > 0.0);

    // Three connections and one UDP exchange: four new flows, two conntrack entries each.
    let flows_before = sample(
        &before,
        "lb_datapath_packets_total{counter=\"flow_created\"}",
    );
    let mut connections = Vec::new();
    for _ in 0..3 {
        let mut connection = Connection::open(cluster.client(), TCP_FRONTEND).expect("connect");
        connection.request().expect("request");
        connections.push(connection);
    }
    let socket = udp_socket(cluster.client(), UDP_FRONTEND, UdpChecksum::Computed).expect("udp");
    udp_request(&socket).expect("udp reply");
    let after = scrape();
    assert_eq!(
        sample(
            &after,
            "lb_datapath_packets_total{counter=\"flow_created\"}"
        ) - flows_before,
        4.0
    );
    // Every metric is one of the datapath counters lb stats shows.
    let counters = cluster.counters();
    assert_eq!(
        sample(
            &after,
            "lb_datapath_packets_total{counter=\"flow_created\"}"
        ),
        counters["flow_created"] as f64
    );
    assert_eq!(
        sample(&after, "lb_map_entries{map=\"LB_CONNTRACK\"}"),
        8.0,
        "{after}"
    );
    let (status, _) = lb_tests::agent::http_get(node, lb_tests::agent::METRICS_ADDRESS, "/")
        .expect("metrics endpoint");
    assert_eq!(status, 404);
}

/// UDP sockets and datagrams each for the traffic test: every datagram is one packet each way.
const TRAFFIC_SOCKETS: usize = 3;
const TRAFFIC_DATAGRAMS: usize = 4;
/// `lb stats --watch` for the traffic test: two one-second reports, one line of JSON each.
const WATCH_ARGS: [&str; 8] = [
    "stats",
    "--watch",
    "--interval",
    "1",
    "--count",
    "2",
    "-o",
    "json",
];
/// How long the watch may take, and the pace of the datagrams sent meanwhile.
const WATCH_TIMEOUT: Duration = Duration::from_secs(10);
const WATCH_PACE: Duration = Duration::from_millis(50);
/// IPv4 and UDP headers and the 4-byte "ping" of `udp_request`.
const PING_IP_BYTES: u64 = 20 + 8 + 4;

/// The traffic row `lb stats` shows for `frontend`/`protocol`.
fn traffic_of<'a>(
    rows: &'a [serde_json::Value],
    frontend: SocketAddr,
    protocol: &str,
) -> &'a serde_json::Value {
    rows.iter()
        .find(|row| row["frontend"] == frontend.to_string().as_str() && row["protocol"] == protocol)
        .unwrap_or_else(|| panic!("no traffic row for {frontend}/{protocol}: {rows:#?}"))
}

fn count(row: &serde_json::Value, field: &str) -> u64 {
    row[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {row}"))
}

#[test]
fn stats_count_each_frontend_s_and_endpoint_s_traffic() {
    if !require_root("stats_count_each_frontend_s_and_endpoint_s_traffic") {
        return;
    }
    let cluster = Cluster::start(Setup::default()).expect("cluster");
    let before = cluster.traffic();
    let row = traffic_of(&before, UDP_FRONTEND, "UDP");
    assert_eq!(count(row, "packets"), 0, "{row}");

    let mut answered = [0u64; BACKENDS];
    for _ in 0..TRAFFIC_SOCKETS {
        let socket =
            udp_socket(cluster.client(), UDP_FRONTEND, UdpChecksum::Computed).expect("udp");
        for _ in 0..TRAFFIC_DATAGRAMS {
            answered[backend_index(&udp_reply(&socket)).expect("backend")] += 1;
        }
    }
    let sent = (TRAFFIC_SOCKETS * TRAFFIC_DATAGRAMS) as u64;

    let after = cluster.traffic();
    let row = traffic_of(&after, UDP_FRONTEND, "UDP");
    assert_eq!(count(row, "packets"), sent, "{row:#}");
    assert_eq!(count(row, "bytes"), sent * PING_IP_BYTES, "{row:#}");
    assert_eq!(count(row, "reply_packets"), sent, "{row:#}");
    assert!(count(row, "reply_bytes") > sent * PING_IP_BYTES, "{row:#}");
    assert_eq!(count(row, "flows"), TRAFFIC_SOCKETS as u64, "{row:#}");
    assert_eq!(count(row, "refused"), 0, "{row:#}");
    // Each endpoint counted exactly the datagrams it answered.
    for (index, answered) in answered.iter().enumerate() {
        let endpoint = format!("{}:{BACKEND_UDP_PORT}", backend_addr(index));
        let counted = row["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .find(|candidate| candidate["endpoint"] == endpoint.as_str())
            .unwrap_or_else(|| panic!("no endpoint {endpoint}: {row:#}"));
        assert_eq!(count(counted, "packets"), *answered, "{counted}");
        assert_eq!(count(counted, "reply_packets"), *answered, "{counted}");
    }
    // The TCP frontend saw none of it.
    assert_eq!(count(traffic_of(&after, TCP_FRONTEND, "TCP"), "packets"), 0);

    // The metrics say the same.
    let text = cluster.metrics();
    let labels = |extra: &str| {
        format!(
            "namespace=\"{}\",service=\"echo\",port=\"dns\",frontend=\"{UDP_FRONTEND}/UDP\"{extra}",
            row["namespace"].as_str().expect("namespace")
        )
    };
    assert_eq!(
        sample(
            &text,
            &format!(
                "lb_service_packets_total{{{}}}",
                labels(",direction=\"to_backend\"")
            )
        ),
        sent as f64,
        "{text}"
    );
    assert_eq!(
        sample(&text, &format!("lb_service_flows_total{{{}}}", labels(""))),
        TRAFFIC_SOCKETS as f64
    );

    // Watching while datagrams flow: a report names the UDP frontend's rate. The watch reads
    // its first figures some time after it starts, so the datagrams go on until it is done.
    let mut watch = std::process::Command::new(&cluster.lb)
        .arg("--pin-dir")
        .arg(&cluster.pin_dir)
        .args(WATCH_ARGS)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("lb stats --watch");
    let socket = udp_socket(cluster.client(), UDP_FRONTEND, UdpChecksum::Computed).expect("udp");
    let started = std::time::Instant::now();
    while watch.try_wait().expect("watch status").is_none() && started.elapsed() < WATCH_TIMEOUT {
        udp_reply(&socket);
        std::thread::sleep(WATCH_PACE);
    }
    let output = watch.wait_with_output().expect("lb stats --watch");
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    let moved = text.lines().any(|line| {
        let rates: serde_json::Value = serde_json::from_str(line).expect("rates JSON");
        rates["services"]
            .as_array()
            .expect("services")
            .iter()
            .any(|row| {
                row["frontend"] == UDP_FRONTEND.to_string().as_str()
                    && row["packets_per_s"].as_f64().is_some_and(|rate| rate > 0.0)
            })
    });
    assert!(moved, "no report named the UDP frontend's traffic: {text}");
}

/// Frontends a small LB_SERVICES takes: ids 1 to 3 (id 0 is never used).
const SMALL_SERVICE_CAPACITY: &str = "4";
/// How many frontends that leaves room for.
const SMALL_SERVICE_ROOM: usize = 3;

#[test]
fn a_full_map_is_an_error_a_metric_and_a_flag() {
    if !require_root("a_full_map_is_an_error_a_metric_and_a_flag") {
        return;
    }
    let mut cluster = Cluster::start(Setup {
        agent_args: &[REDIRECT_VETH, "--max-services", SMALL_SERVICE_CAPACITY],
        ..Setup::default()
    })
    .expect("cluster");
    // The echo Service's two frontends fit; a second Service's two leave one out.
    let second = cluster.manifests().join("second.yaml");
    std::fs::write(
        &second,
        service_manifest("second", SECOND_CLUSTER_IP, &[0, 1, 2]),
    )
    .expect("manifest");
    let state_dir = cluster.workdir.join("state");
    let services = |cluster: &Cluster| -> Vec<serde_json::Value> {
        serde_json::from_str(&cluster.lb(&[
            "services",
            "--state-dir",
            state_dir.to_str().expect("path"),
            "-o",
            "json",
        ]))
        .expect("services JSON")
    };
    let refused = |rows: &[serde_json::Value]| -> Vec<serde_json::Value> {
        rows.iter()
            .filter(|row| !row["refused"].is_null())
            .cloned()
            .collect()
    };
    assert!(
        wait_until(APPLY_TIMEOUT, || !refused(&services(&cluster)).is_empty()),
        "no frontend flagged: {}\n{}",
        cluster.lb(&["services"]),
        cluster.agent().log_text()
    );
    let rows = services(&cluster);
    let flagged = refused(&rows);
    assert_eq!(flagged.len(), 1, "{rows:#?}");
    assert_eq!(flagged[0]["name"], "second", "{rows:#?}");
    assert_eq!(
        flagged[0]["refused"],
        format!("LB_SERVICES full ({SMALL_SERVICE_CAPACITY} entries): not programmed").as_str()
    );
    assert_eq!(rows.len(), SMALL_SERVICE_ROOM + 1, "{rows:#?}");
    assert!(
        cluster.agent().log_text().contains(&format!(
            "map LB_SERVICES is full ({SMALL_SERVICE_CAPACITY} entries): raise `lb agent --max-services`"
        )),
        "{}",
        cluster.agent().log_text()
    );
    let text = cluster.metrics();
    assert_eq!(
        sample(&text, "lb_map_refused_frontends{map=\"LB_SERVICES\"}"),
        1.0,
        "{text}"
    );
    assert!(sample(&text, "lb_map_full_errors_total{map=\"LB_SERVICES\"}") >= 1.0);

    // Room made: the flag and the gauge clear.
    std::fs::remove_file(&second).expect("remove");
    assert!(
        wait_until(APPLY_TIMEOUT, || refused(&services(&cluster)).is_empty()),
        "{}",
        cluster.lb(&["services"])
    );
    assert_eq!(
        sample(
            &cluster.metrics(),
            "lb_map_refused_frontends{map=\"LB_SERVICES\"}"
        ),
        0.0
    );
}
