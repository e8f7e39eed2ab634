//! End to end in network namespaces: real TCP and UDP sockets through a ClusterIP served by the
//! XDP program that `lb agent` attaches and programs from a manifest directory.
//!
//! Topology and network rule: see `lb_tests::topology`. Each test builds its own namespaces,
//! pin directory and manifest directory (all named after a per-test prefix), so tests run in
//! parallel and clean up on drop, failure included.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use lb_tests::{
    agent::{Agent, AgentOptions, REDIRECT_VETH, lb, lb_binary, wait_until},
    netns::{Netns, unique_prefix},
    privilege::require_root,
    servers::{self, Reply, Server},
    topology::{BACKENDS, CLIENT_ADDR, Offload, SingleNode, backend_addr},
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const BACKEND_TCP_PORT: u16 = 8080;
const BACKEND_UDP_PORT: u16 = 5353;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// New flows per check: all three backends appear with probability 1 - 3(2/3)^30 > 0.99999.
const FLOWS: usize = 30;
/// How long the agent may take to apply a manifest edit.
const APPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// The manifests of a Service `echo` with TCP 80 -> 8080 and UDP 53 -> 5353 on `backends`.
fn echo_manifest(backends: &[usize]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|index| format!("- addresses: [\"{}\"]\n", backend_addr(*index)))
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: e2e
spec:
  clusterIP: {CLUSTER_IP}
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
  name: echo-1
  namespace: e2e
  labels:
    kubernetes.io/service-name: echo
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

/// A running single-node cluster: topology, identity servers, and an agent.
struct Cluster {
    agent: Option<Agent>,
    lb: PathBuf,
    pin_dir: PathBuf,
    workdir: PathBuf,
    _servers: Vec<Server>,
    topology: SingleNode,
}

impl Cluster {
    fn start(offload: Offload) -> anyhow::Result<Self> {
        let prefix = unique_prefix("lbt");
        let lb = lb_binary()?;
        let topology = SingleNode::build(&prefix, offload)?;
        let mut servers = Vec::new();
        for (index, backend) in topology.backends.iter().enumerate() {
            let name = format!("backend-{}", index + 1);
            servers.push(servers::tcp(backend, &name, BACKEND_TCP_PORT)?);
            servers.push(servers::udp(backend, &name, BACKEND_UDP_PORT)?);
        }
        let workdir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(workdir.join("manifests"))?;
        std::fs::write(
            workdir.join("manifests/echo.yaml"),
            echo_manifest(&[0, 1, 2]),
        )?;
        let mut cluster = Self {
            agent: None,
            lb,
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&prefix),
            workdir,
            _servers: servers,
            topology,
        };
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
        self.agent = Some(Agent::start(
            &self.topology.node,
            &AgentOptions {
                lb: &self.lb,
                pin_dir: &self.pin_dir,
                manifests: &self.manifests(),
                interfaces: &self.topology.node_interfaces(),
                state_dir: &self.workdir.join("state"),
                log: &log,
                extra_args: &[REDIRECT_VETH],
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
        serde_json::from_str(&self.lb(&["stats", "-o", "json"])).expect("stats JSON")
    }

    fn client(&self) -> &Netns {
        &self.topology.client
    }

    /// Endpoints the pinned maps hold for the TCP frontend.
    fn tcp_endpoints(&self) -> Vec<String> {
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&self.lb(&["services", "-o", "json"])).expect("services JSON");
        rows.iter()
            .find(|row| row["protocol"] == "TCP")
            .map(|row| {
                row["endpoints"]
                    .as_array()
                    .expect("endpoints")
                    .iter()
                    .map(|e| e.as_str().expect("endpoint").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.stop();
        }
        let _ = lb(&self.lb, &self.pin_dir, &["reset"]);
        let _ = std::fs::remove_dir_all(&self.workdir);
    }
}

/// A TCP connection to the ClusterIP, one request line per call.
struct Connection {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Connection {
    fn open(client: &Netns) -> anyhow::Result<Self> {
        let target = SocketAddr::from((CLUSTER_IP, TCP_PORT));
        let stream = client
            .run(|| TcpStream::connect_timeout(&target, IO_TIMEOUT))?
            .context("connecting to the ClusterIP")?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        // The handshake completing proves the SYN-ACK came back from the ClusterIP: a reply
        // from the backend's own address would have been answered with a reset.
        assert_eq!(stream.peer_addr()?, target);
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    fn request(&mut self) -> anyhow::Result<Reply> {
        self.stream.write_all(b"hello\n")?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let reply = Reply::parse(&line)?;
        assert_eq!(
            reply.client,
            self.stream.local_addr()?,
            "the backend must see the client's own address and port"
        );
        Ok(reply)
    }
}

/// A connected UDP socket to the ClusterIP: the kernel only delivers datagrams whose source is
/// the ClusterIP and port, so every reply received proves the reverse translation.
fn udp_socket(client: &Netns, checksum: bool) -> anyhow::Result<UdpSocket> {
    let socket = client.run(|| UdpSocket::bind(("0.0.0.0", 0)))??;
    if !checksum {
        // SO_NO_CHECK: send UDP with a zero checksum ("none"), which must stay zero.
        let one: libc::c_int = 1;
        // SAFETY: valid socket and option buffer.
        let result = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::SOL_SOCKET,
                libc::SO_NO_CHECK,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(result, 0, "SO_NO_CHECK");
    }
    socket.connect((CLUSTER_IP, UDP_PORT))?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok(socket)
}

fn udp_request(socket: &UdpSocket) -> anyhow::Result<Reply> {
    socket.send(b"ping")?;
    let mut buffer = [0u8; 256];
    let length = socket.recv(&mut buffer).context("no UDP reply")?;
    let reply = Reply::parse(std::str::from_utf8(&buffer[..length])?)?;
    assert_eq!(reply.client, socket.local_addr()?);
    Ok(reply)
}

fn backend_index(reply: &Reply) -> usize {
    (0..BACKENDS)
        .find(|index| reply.backend == format!("backend-{}", index + 1))
        .unwrap_or_else(|| panic!("unknown backend {}", reply.backend))
}

/// New TCP and UDP flows from the client; returns how many each backend took.
fn spread(cluster: &Cluster, udp_checksum: bool) -> ([usize; BACKENDS], [usize; BACKENDS]) {
    let mut tcp = [0; BACKENDS];
    let mut udp = [0; BACKENDS];
    for _ in 0..FLOWS {
        let reply = Connection::open(cluster.client())
            .and_then(|mut connection| connection.request())
            .expect("TCP request through the ClusterIP");
        tcp[backend_index(&reply)] += 1;
        let socket = udp_socket(cluster.client(), udp_checksum).expect("UDP socket");
        let reply = udp_request(&socket).expect("UDP request through the ClusterIP");
        udp[backend_index(&reply)] += 1;
    }
    (tcp, udp)
}

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, name: &str) -> u64 {
    after[name] - before[name]
}

#[test]
fn tcp_and_udp_reach_every_backend_with_partial_checksums() {
    if !require_root("tcp_and_udp_reach_every_backend_with_partial_checksums") {
        return;
    }
    // Linux's default: local sockets leave the L4 checksum to offload (CHECKSUM_PARTIAL).
    let cluster = Cluster::start(Offload::default()).expect("cluster");
    let before = cluster.counters();
    let (tcp, udp) = spread(&cluster, true);
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
    let cluster = Cluster::start(Offload {
        client_tx: false,
        backend_tx: false,
    })
    .expect("cluster");
    let before = cluster.counters();
    let (tcp, udp) = spread(&cluster, true);
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
    assert_eq!(delta(&before, &after, "stack_partial_checksum"), 0);
}

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
        let cluster = Cluster::start(offload).expect("cluster");
        let (tcp, udp) = spread(&cluster, false);
        assert!(
            tcp.iter().all(|n| *n > 0),
            "{offload:?}: TCP spread {tcp:?}"
        );
        assert!(
            udp.iter().all(|n| *n > 0),
            "{offload:?}: UDP spread {udp:?}"
        );
    }
}

#[test]
fn a_flow_stays_on_its_backend() {
    if !require_root("a_flow_stays_on_its_backend") {
        return;
    }
    let cluster = Cluster::start(Offload::default()).expect("cluster");
    let mut connection = Connection::open(cluster.client()).expect("connect");
    let first = connection.request().expect("request").backend;
    for _ in 0..50 {
        assert_eq!(connection.request().expect("request").backend, first);
    }
    let socket = udp_socket(cluster.client(), true).expect("socket");
    let first = udp_request(&socket).expect("request").backend;
    for _ in 0..50 {
        assert_eq!(udp_request(&socket).expect("request").backend, first);
    }
}

#[test]
fn traffic_not_for_a_service_passes_untouched() {
    if !require_root("traffic_not_for_a_service_passes_untouched") {
        return;
    }
    let cluster = Cluster::start(Offload::default()).expect("cluster");
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
    assert_eq!(reply.backend, "backend-2");
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
    let mut cluster = Cluster::start(Offload::default()).expect("cluster");
    let mut connection = Connection::open(cluster.client()).expect("connect");
    let backend = connection.request().expect("request").backend;

    // A crash: the agent dies without cleaning anything up.
    cluster.agent().kill();
    // The dataplane outlives it: links and maps are pinned.
    for _ in 0..5 {
        assert_eq!(
            connection.request().expect("request while down").backend,
            backend
        );
    }

    cluster.start_agent().expect("restart");
    for _ in 0..5 {
        assert_eq!(
            connection.request().expect("request after restart").backend,
            backend
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
    let (tcp, _) = spread(&cluster, true);
    assert!(tcp.iter().all(|n| *n > 0), "TCP spread {tcp:?}");
}

#[test]
fn removing_an_endpoint_stops_new_flows_and_moves_its_udp_flows() {
    if !require_root("removing_an_endpoint_stops_new_flows_and_moves_its_udp_flows") {
        return;
    }
    let cluster = Cluster::start(Offload::default()).expect("cluster");
    // A UDP flow (think DNS) pinned to backend 3 before it goes away.
    let pinned = (0..100)
        .map(|_| udp_socket(cluster.client(), true).expect("socket"))
        .find(|socket| udp_request(socket).expect("request").backend == "backend-3")
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
    let (tcp, udp) = spread(&cluster, true);
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
    let moved = udp_request(&pinned).expect("request after removal").backend;
    assert_ne!(moved, "backend-3");
}

#[test]
fn a_broken_manifest_keeps_the_service_and_names_the_field() {
    if !require_root("a_broken_manifest_keeps_the_service_and_names_the_field") {
        return;
    }
    let mut cluster = Cluster::start(Offload::default()).expect("cluster");
    // The Service breaks; the EndpointSlice in the same file changes validly (drops backend 3).
    let broken = echo_manifest(&[0, 1]).replace("port: 80\n", "port: 0\n");
    std::fs::write(cluster.manifests().join("echo.yaml"), broken).expect("edit");
    let manifest = cluster.manifests().join("echo.yaml");
    assert!(
        wait_until(APPLY_TIMEOUT, || {
            let log = cluster.agent().log_text();
            log.contains(&manifest.display().to_string())
                && log.contains("Service e2e/echo")
                && log.contains("spec.ports[0].port")
        }),
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
    let (tcp, _) = spread(&cluster, true);
    assert!(
        tcp[0] > 0 && tcp[1] > 0 && tcp[2] == 0,
        "TCP spread {tcp:?}"
    );
}
