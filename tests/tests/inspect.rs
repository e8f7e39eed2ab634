//! The inspection commands against real maps programmed by a real agent: `lb services` (type,
//! policies, endpoint counts, generation), `lb backends` (slots, conditions, locality, live flows
//! of real TCP connections) and `lb plan` (in sync, then missing, extra and stale frontends made
//! behind a stopped agent's back).
//!
//! Topology and network rule: see `lb_tests::topology`. Each test builds its own namespaces, pin
//! directory and manifest directory (named after a per-test prefix) and tears them down on drop,
//! failure included.

#[path = "support/maps.rs"]
mod maps;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use lb_tests::{
    agent::{Agent, AgentOptions, REDIRECT_VETH, lb, lb_binary, pin_dir, tear_down, wait_until},
    echo::{
        self, BACKEND_TCP_PORT, BACKEND_UDP_PORT, CLUSTER_IP, Connection, TCP_FRONTEND, TCP_PORT,
        UDP_PORT, backend_index,
    },
    leftovers::{self, remove_test_leftovers_once},
    netns::unique_prefix,
    privilege::require_root,
    servers::{Server, UdpChecksum},
    topology::{BACKENDS, NODE_CLIENT_SIDE, Offload, SingleNode, backend_addr},
};

/// The node the agent runs as (`--node-name`).
const NODE_NAME: &str = "node-a";
/// Another node, for remote endpoints.
const OTHER_NODE: &str = "node-b";
/// How long the agent may take to apply a manifest edit.
const APPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// The echo Service's TCP nodePort (inside the default range); its UDP one is the next.
const NODE_PORT: u16 = 30_080;
/// The second Service's TCP nodePort; its UDP one is the next.
const OTHER_NODE_PORT: u16 = 30_090;
/// The `metadata.generation` the manifests give the echo Service.
const GENERATION: u64 = 4;
/// A second Service's ClusterIP.
const OTHER_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// TCP connections held open through the Service in the live-flow test.
const CONNECTIONS: usize = 12;
/// `lb plan`'s exit status on drift.
const EXIT_DRIFT: i32 = 1;

/// How one endpoint of a manifest is listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Ready,
    /// `ready: false`: failing its probe.
    NotReady,
    /// `ready: false, serving: true, terminating: true`: shutting down gracefully.
    Terminating,
    /// Ready, on another node.
    Remote,
}

/// The Service `name` on `cluster_ip` and `node_port` (TCP 80 -> 8080, UDP 53 -> 5353 on the
/// next nodePort), a NodePort Service with `externalTrafficPolicy: Local` at generation
/// [`GENERATION`], with backend `index` listed as `endpoints[index]` (`None`: not listed).
fn manifest(
    name: &str,
    (cluster_ip, node_port): (Ipv4Addr, u16),
    endpoints: &[Option<Endpoint>],
) -> String {
    let listed: String = endpoints
        .iter()
        .enumerate()
        .filter_map(|(index, endpoint)| endpoint.map(|endpoint| (index, endpoint)))
        .map(|(index, endpoint)| {
            let node = if endpoint == Endpoint::Remote {
                OTHER_NODE
            } else {
                NODE_NAME
            };
            let conditions = match endpoint {
                Endpoint::Ready | Endpoint::Remote => "",
                Endpoint::NotReady => "  conditions: {ready: false}\n",
                Endpoint::Terminating => {
                    "  conditions: {ready: false, serving: true, terminating: true}\n"
                }
            };
            format!(
                "- addresses: [\"{}\"]\n  nodeName: {node}\n{conditions}",
                backend_addr(index)
            )
        })
        .collect();
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: e2e
  generation: {GENERATION}
spec:
  type: NodePort
  clusterIP: {cluster_ip}
  externalTrafficPolicy: Local
  ports:
  - name: http
    port: {TCP_PORT}
    targetPort: http
    nodePort: {node_port}
  - name: dns
    protocol: UDP
    port: {UDP_PORT}
    targetPort: {BACKEND_UDP_PORT}
    nodePort: {}
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
{listed}",
        node_port + 1
    )
}

/// The echo Service's ClusterIP and nodePort.
const ECHO: (Ipv4Addr, u16) = (CLUSTER_IP, NODE_PORT);
/// The other Service's.
const OTHER: (Ipv4Addr, u16) = (OTHER_CLUSTER_IP, OTHER_NODE_PORT);

/// Every backend ready on this node.
const ALL_READY: [Option<Endpoint>; BACKENDS] = [Some(Endpoint::Ready); BACKENDS];

/// A single-node cluster whose agent serves the manifests directory.
struct Cluster {
    agent: Option<Agent>,
    lb: PathBuf,
    pin_dir: PathBuf,
    workdir: PathBuf,
    _servers: Vec<Server>,
    topology: SingleNode,
}

impl Cluster {
    /// Starts with `files` (name, content) in the manifest directory.
    fn start(files: &[(&str, String)]) -> anyhow::Result<Self> {
        remove_test_leftovers_once();
        let prefix = unique_prefix(leftovers::TESTS);
        let lb = lb_binary()?;
        let topology = SingleNode::build(&prefix, Offload::default())?;
        let servers = echo::start_servers(&topology, UdpChecksum::Computed)?;
        let mut cluster = Self {
            agent: None,
            lb,
            pin_dir: pin_dir(&prefix),
            workdir: std::env::temp_dir().join(&prefix),
            _servers: servers,
            topology,
        };
        std::fs::create_dir_all(cluster.manifests())?;
        for (name, content) in files {
            std::fs::write(cluster.manifests().join(name), content)?;
        }
        cluster.start_agent()?;
        Ok(cluster)
    }

    fn manifests(&self) -> PathBuf {
        self.workdir.join("manifests")
    }

    fn state_dir(&self) -> PathBuf {
        self.workdir.join("state")
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
                state_dir: &self.state_dir(),
                log: &log,
                extra_args: &[REDIRECT_VETH, "--node-name", NODE_NAME],
            },
        )?);
        Ok(())
    }

    fn stop_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.stop();
        }
    }

    fn lb(&self, args: &[&str]) -> String {
        lb(&self.lb, &self.pin_dir, args).expect("lb command")
    }

    fn json(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.lb(&all)).expect("JSON rows")
    }

    /// `lb plan` (from the root namespace, as an operator would run it) with `args`: its exit
    /// status and output.
    fn plan(&self, args: &[&str]) -> (i32, String) {
        let output = Command::new(&self.lb)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("plan")
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("lb plan");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.is_empty(), "lb plan said on stderr: {stderr}");
        (
            output.status.code().expect("exit status"),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        tear_down(self.agent.take(), &self.lb, &self.pin_dir, &self.workdir);
    }
}

/// The row of `rows` whose `frontend` and `protocol` are these.
fn row<'a>(rows: &'a [serde_json::Value], frontend: &str, protocol: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|row| row["frontend"] == frontend && row["protocol"] == protocol)
        .unwrap_or_else(|| panic!("no row for {frontend}/{protocol} in {rows:#?}"))
}

#[test]
fn services_show_type_policies_endpoint_counts_and_generation() {
    if !require_root("services_show_type_policies_endpoint_counts_and_generation") {
        return;
    }
    let echo = manifest(
        "echo",
        ECHO,
        &[
            Some(Endpoint::Ready),
            Some(Endpoint::NotReady),
            Some(Endpoint::Terminating),
        ],
    );
    let other = manifest("other", OTHER, &ALL_READY).replace("e2e", "e2e-other");
    let cluster = Cluster::start(&[("echo.yaml", echo), ("other.yaml", other)]).expect("cluster");

    let table = cluster.lb(&["services", "-n", "e2e"]);
    println!("$ lb services -n e2e\n{table}");
    let rows = cluster.json(&["services", "-n", "e2e", "echo"]);
    // The ClusterIP and a nodePort on each of the node's four addresses, for each port.
    assert_eq!(rows.len(), 2 * (1 + 1 + BACKENDS), "{rows:#?}");
    let ready = format!("{}:{BACKEND_TCP_PORT}", backend_addr(0));
    let cluster_ip = row(&rows, &TCP_FRONTEND.to_string(), "TCP");
    let node_port = row(&rows, &format!("{NODE_CLIENT_SIDE}:{NODE_PORT}"), "TCP");
    for (row, kind) in [(cluster_ip, "ClusterIP"), (node_port, "NodePort")] {
        assert_eq!(row["namespace"], "e2e");
        assert_eq!(row["name"], "echo");
        assert_eq!(row["port_name"], "http");
        assert_eq!(row["service_type"], "NodePort");
        assert_eq!(row["frontend_kind"], kind);
        assert_eq!(row["internal_traffic_policy"], "Cluster");
        assert_eq!(row["external_traffic_policy"], "Local");
        assert_eq!(row["generation"], GENERATION);
        // One ready; the terminating one serves; the not-ready one neither.
        assert_eq!(row["ready"], 1, "{row:#}");
        assert_eq!(row["serving"], 2, "{row:#}");
        assert_eq!(row["terminating"], 1, "{row:#}");
        assert_eq!(row["endpoints"], serde_json::json!([ready]), "{row:#}");
    }
    // The table says the same.
    let line = table
        .lines()
        .find(|line| line.contains(&format!("{TCP_FRONTEND}/TCP")))
        .expect("the ClusterIP's line");
    for cell in [
        "echo",
        "http",
        "NodePort",
        "ClusterIP",
        "Cluster/Local",
        "1/2/1",
        &GENERATION.to_string(),
        &ready,
    ] {
        assert!(line.contains(cell), "{cell} missing from {line:?}");
    }

    // The filters: a namespace, a name, both.
    let names = |args: &[&str]| -> Vec<String> {
        let mut names: Vec<String> = cluster
            .json(args)
            .iter()
            .map(|row| format!("{}/{}", row["namespace"], row["name"]).replace('"', ""))
            .collect();
        names.dedup();
        names
    };
    assert_eq!(
        names(&["services"]),
        ["e2e/echo", "e2e-other/other"].map(str::to_owned)
    );
    assert_eq!(names(&["services", "-n", "e2e-other"]), ["e2e-other/other"]);
    assert_eq!(names(&["services", "other"]), ["e2e-other/other"]);
    assert!(names(&["services", "-n", "e2e", "other"]).is_empty());
}

#[test]
fn backends_show_slots_states_locality_and_the_live_flows_of_open_connections() {
    if !require_root("backends_show_slots_states_locality_and_the_live_flows_of_open_connections") {
        return;
    }
    // Backend 2 runs on another node: the ClusterIP (internal traffic, `Cluster`) uses it.
    let endpoints = [
        Some(Endpoint::Ready),
        Some(Endpoint::Ready),
        Some(Endpoint::Remote),
    ];
    let mut cluster =
        Cluster::start(&[("echo.yaml", manifest("echo", ECHO, &endpoints))]).expect("cluster");

    // Connections held open through the ClusterIP: each is one live flow on its backend.
    let mut connections = Vec::with_capacity(CONNECTIONS);
    let mut per_backend = [0_usize; BACKENDS];
    for _ in 0..CONNECTIONS {
        let mut connection = Connection::open(&cluster.topology.client, TCP_FRONTEND)
            .expect("connect through the ClusterIP");
        let reply = connection.request().expect("request");
        per_backend[backend_index(&reply).expect("backend")] += 1;
        connections.push(connection);
    }

    // Backend 0 stops being ready: it drains, keeping its entry and its connections.
    let draining = [
        Some(Endpoint::NotReady),
        Some(Endpoint::Ready),
        Some(Endpoint::Remote),
    ];
    std::fs::write(
        cluster.manifests().join("echo.yaml"),
        manifest("echo", ECHO, &draining),
    )
    .expect("edit");
    let cluster_ip_rows = |cluster: &Cluster| -> Vec<serde_json::Value> {
        cluster
            .json(&["backends", "e2e/echo"])
            .into_iter()
            .filter(|row| row["frontend"] == TCP_FRONTEND.to_string())
            .collect()
    };
    assert!(
        wait_until(APPLY_TIMEOUT, || cluster_ip_rows(&cluster)
            .iter()
            .any(|row| row["draining"] == true)),
        "the agent did not drain backend 0: {}",
        cluster.lb(&["backends", "e2e/echo"])
    );
    // Checked with the agent stopped too: the maps alone answer.
    cluster.stop_agent();
    let table = cluster.lb(&["backends", "e2e/echo"]);
    println!("$ lb backends e2e/echo\n{table}");
    let rows = cluster_ip_rows(&cluster);
    let by_backend: BTreeMap<String, &serde_json::Value> = rows
        .iter()
        .map(|row| (row["backend"].as_str().expect("backend").to_owned(), row))
        .collect();
    assert_eq!(by_backend.len(), BACKENDS, "{rows:#?}");
    for (index, flows) in per_backend.iter().enumerate() {
        let row = by_backend[&format!("{}:{BACKEND_TCP_PORT}", backend_addr(index))];
        assert_eq!(row["live_flows"], *flows, "backend {index}: {row:#}");
        assert_eq!(row["protocol"], "TCP");
        assert_eq!(row["port_name"], "http");
        let (state, draining, node) = match index {
            0 => ("not-ready", true, "local"),
            1 => ("ready", false, "local"),
            _ => ("ready", false, "remote"),
        };
        assert_eq!(row["state"], state, "backend {index}: {row:#}");
        assert_eq!(row["draining"], draining, "backend {index}: {row:#}");
        assert_eq!(row["node"], node, "backend {index}: {row:#}");
        // Draining: no slot; the two others hold slots 0 and 1.
        assert_eq!(row["slot"].is_null(), draining, "backend {index}: {row:#}");
    }
    let mut slots: Vec<u64> = rows.iter().filter_map(|row| row["slot"].as_u64()).collect();
    slots.sort_unstable();
    assert_eq!(slots, [0, 1]);
    // The UDP frontend carries no flow: none was sent.
    let udp = cluster.json(&["backends", "e2e/echo"]);
    assert!(
        udp.iter()
            .filter(|row| row["protocol"] == "UDP")
            .all(|row| row["live_flows"] == 0),
        "{udp:#?}"
    );
    // The connections still work through the stopped agent's dataplane.
    for connection in &mut connections {
        connection
            .request()
            .expect("request after the agent stopped");
    }
    // A Service the maps do not hold is an error, not an empty list.
    assert!(lb(&cluster.lb, &cluster.pin_dir, &["backends", "e2e/nothing"]).is_err());
}

#[test]
fn plan_is_clean_in_sync_and_names_missing_extra_and_stale_frontends() {
    if !require_root("plan_is_clean_in_sync_and_names_missing_extra_and_stale_frontends") {
        return;
    }
    let other = manifest("other", OTHER, &ALL_READY);
    let mut cluster = Cluster::start(&[
        ("echo.yaml", manifest("echo", ECHO, &ALL_READY)),
        ("other.yaml", other),
    ])
    .expect("cluster");
    let (status, out) = cluster.plan(&[]);
    println!("$ lb plan\n{out}");
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("in sync"), "{out}");

    // Behind the stopped agent's back: a frontend deleted from the maps, a Service deleted, and
    // an endpoint gone from the other Service.
    cluster.stop_agent();
    maps::delete_echo_tcp_frontend(&cluster.pin_dir);
    std::fs::remove_file(cluster.manifests().join("other.yaml")).expect("delete other");
    let fewer = [Some(Endpoint::Ready), Some(Endpoint::Ready), None];
    std::fs::write(
        cluster.manifests().join("echo.yaml"),
        manifest("echo", ECHO, &fewer),
    )
    .expect("edit");

    let (status, out) = cluster.plan(&[]);
    println!("$ lb plan\n{out}");
    assert_eq!(status, EXIT_DRIFT, "{out}");
    let (status, json) = cluster.plan(&["-o", "json"]);
    assert_eq!(status, EXIT_DRIFT, "{json}");
    let plan: serde_json::Value = serde_json::from_str(&json).expect("plan JSON");
    assert_eq!(plan["in_sync"], false);
    let rows = plan["frontends"].as_array().expect("frontends");
    let drift = |frontend: SocketAddr, protocol: &str| {
        row(rows, &frontend.to_string(), protocol)["drift"]
            .as_str()
            .expect("drift")
            .to_owned()
    };
    // The deleted frontend is missing; the same Service's UDP frontend lost an endpoint.
    assert_eq!(drift(TCP_FRONTEND, "TCP"), "missing");
    let udp_frontend = SocketAddr::from((CLUSTER_IP, UDP_PORT));
    assert_eq!(drift(udp_frontend, "UDP"), "stale");
    let stale = row(rows, &udp_frontend.to_string(), "UDP");
    let reasons = stale["reasons"].to_string();
    let gone = format!("{}:{BACKEND_UDP_PORT}", backend_addr(2));
    assert!(
        reasons.contains("endpoints for new flows") && reasons.contains(&gone),
        "{reasons}"
    );
    // The deleted Service: every frontend extra, named from the maps, its ClusterIP too.
    let extra: Vec<&serde_json::Value> = rows.iter().filter(|row| row["name"] == "other").collect();
    assert_eq!(extra.len(), 2 * (1 + 1 + BACKENDS), "{rows:#?}");
    assert!(
        extra.iter().all(|row| row["drift"] == "extra"),
        "{extra:#?}"
    );
    assert_eq!(
        plan["extra_cluster_ips"],
        serde_json::json!([OTHER_CLUSTER_IP.to_string()])
    );
    // Every other frontend of echo lost the same endpoint: stale, nothing else.
    let echo_stale = rows
        .iter()
        .filter(|row| row["name"] == "echo" && row["drift"] == "stale")
        .count();
    assert_eq!(echo_stale, 2 * (1 + 1 + BACKENDS) - 1, "{rows:#?}");
    assert_eq!(rows.len(), 1 + echo_stale + extra.len(), "{rows:#?}");

    // The agent catches up at start: in sync again.
    cluster.start_agent().expect("restart");
    let (status, out) = cluster.plan(&[]);
    assert_eq!(status, 0, "{out}");
    // Flags override the recorded settings: another node name makes every endpoint remote,
    // which the objects then want flagged, and the `Local` nodePorts empty.
    let (status, out) = cluster.plan(&["--node-name", OTHER_NODE]);
    assert_eq!(status, EXIT_DRIFT, "{out}");
    assert!(out.contains("remote"), "{out}");
}
