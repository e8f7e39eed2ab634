//! The agent's Kubernetes API source, end to end: `lb agent --kubeconfig` against the API server
//! fixture (`support::apiserver`, the real list/watch protocol over HTTP) on the single-node
//! topology, checked through the pinned maps and with real traffic. Network rule as always: see
//! `lb_tests::topology`; the fixture listens on the node namespace's loopback.

mod support;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use lb_tests::{
    agent::{
        Agent, AgentOptions, KUBECONFIG, REDIRECT_VETH, endpoints_in, health, lb, lb_binary,
        pin_dir, tear_down, wait_until,
    },
    echo::{
        self, BACKEND_TCP_PORT, BACKEND_UDP_PORT, CLUSTER_IP, Connection, TCP_FRONTEND, TCP_PORT,
        UDP_FRONTEND, UDP_PORT, backend_index,
    },
    leftovers::{self, remove_test_leftovers_once},
    netns::unique_prefix,
    privilege::require_root,
    servers::{Server, UdpChecksum},
    topology::{NODE_CLIENT_SIDE, Offload, SingleNode, backend_addr},
};
use serde_json::json;
use support::apiserver::ApiServer;

/// The node the agent runs as, and its endpoints' `nodeName`.
const NODE_NAME: &str = "node-a";
/// How long the agent may take to apply a change made in the API server.
const APPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// Connections per spread check: every backend appears with probability 1 - 3(2/3)^30.
const CONNECTIONS: usize = 30;

/// The echo Service (ClusterIP, TCP 80 -> 8080, UDP 53 -> 5353).
fn echo_service(labels: serde_json::Value) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "echo", "namespace": "e2e", "labels": labels},
        "spec": {
            "clusterIP": CLUSTER_IP.to_string(),
            "ports": [
                {"name": "http", "port": TCP_PORT, "targetPort": BACKEND_TCP_PORT},
                {"name": "dns", "protocol": "UDP", "port": UDP_PORT, "targetPort": BACKEND_UDP_PORT},
            ],
        },
    }))
    .expect("a valid Service")
}

/// The echo Service's EndpointSlice with `backends` (indices into the topology), all ready.
fn echo_slice(backends: &[usize]) -> EndpointSlice {
    let endpoints: Vec<serde_json::Value> = backends
        .iter()
        .map(|index| {
            json!({
                "addresses": [backend_addr(*index).to_string()],
                "conditions": {"ready": true},
                "nodeName": NODE_NAME,
            })
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "echo-1",
            "namespace": "e2e",
            "labels": {"kubernetes.io/service-name": "echo"},
        },
        "addressType": "IPv4",
        "ports": [
            {"name": "http", "port": BACKEND_TCP_PORT},
            {"name": "dns", "protocol": "UDP", "port": BACKEND_UDP_PORT},
        ],
        "endpoints": endpoints,
    }))
    .expect("a valid EndpointSlice")
}

/// The topology, its identity servers, the API server fixture and an agent watching it.
struct Cluster {
    agent: Option<Agent>,
    api: ApiServer,
    lb: PathBuf,
    pin_dir: PathBuf,
    workdir: PathBuf,
    _servers: Vec<Server>,
    topology: SingleNode,
}

impl Cluster {
    /// Starts everything, with the echo Service on every backend in the API server.
    fn start() -> anyhow::Result<Self> {
        let mut cluster = Self::build()?;
        cluster.start_agent(true)?;
        Ok(cluster)
    }

    /// Everything but the agent.
    fn build() -> anyhow::Result<Self> {
        remove_test_leftovers_once();
        let prefix = unique_prefix(leftovers::TESTS);
        let lb = lb_binary()?;
        let topology = SingleNode::build(&prefix, Offload::default())?;
        let servers = echo::start_servers(&topology, UdpChecksum::Computed)?;
        let api = ApiServer::start(&topology.node)?;
        api.apply(&echo_service(json!({})));
        api.apply(&echo_slice(&[0, 1, 2]));
        let workdir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&workdir)?;
        api.write_kubeconfig(&workdir.join("kubeconfig"))?;
        Ok(Self {
            agent: None,
            api,
            lb,
            pin_dir: pin_dir(&prefix),
            workdir,
            _servers: servers,
            topology,
        })
    }

    /// Starts the agent, and waits until it is ready if `wait`.
    fn start_agent(&mut self, wait: bool) -> anyhow::Result<()> {
        self.start_agent_with(wait, &[])
    }

    /// [`Cluster::start_agent`] with `extra` arguments.
    fn start_agent_with(&mut self, wait: bool, extra: &[&str]) -> anyhow::Result<()> {
        let kubeconfig = self.workdir.join("kubeconfig");
        let kubeconfig = kubeconfig.to_str().expect("a UTF-8 path");
        let mut args = vec![
            KUBECONFIG,
            kubeconfig,
            REDIRECT_VETH,
            "--node-name",
            NODE_NAME,
        ];
        args.extend_from_slice(extra);
        let options = AgentOptions {
            lb: &self.lb,
            pin_dir: &self.pin_dir,
            manifests: Path::new("/nonexistent"),
            interfaces: &self.topology.node_interfaces(),
            state_dir: &self.workdir.join("state"),
            log: &self.workdir.join("agent.log"),
            extra_args: &args,
        };
        self.agent = Some(if wait {
            Agent::start(&self.topology.node, &options)?
        } else {
            Agent::spawn(&self.topology.node, &options)?
        });
        Ok(())
    }

    fn lb(&self, args: &[&str]) -> String {
        lb(&self.lb, &self.pin_dir, args).expect("lb command")
    }

    fn stop_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.stop();
        }
    }

    /// `lb plan --kubeconfig <the fixture's> --state-dir <the agent's>` with `args`: its exit
    /// status, stdout and stderr. It runs in the node's namespace, where the fixture listens
    /// (on loopback); the agent's recorded settings come from its state directory.
    fn plan(&self, args: &[&str]) -> (i32, String, String) {
        let output = self
            .topology
            .node
            .command(&self.lb)
            .expect("a command in the node")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("plan")
            .arg(KUBECONFIG)
            .arg(self.workdir.join("kubeconfig"))
            .arg("--state-dir")
            .arg(self.workdir.join("state"))
            .args(args)
            .output()
            .expect("lb plan");
        (
            output.status.code().expect("exit status"),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// [`Cluster::plan`] with `-o json`, parsed, with its exit status and stderr.
    fn plan_json(&self, args: &[&str]) -> (i32, serde_json::Value, String) {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let (status, out, err) = self.plan(&all);
        let plan = serde_json::from_str(&out)
            .unwrap_or_else(|error| panic!("lb plan JSON: {error}\n{out}\n{err}"));
        (status, plan, err)
    }

    /// `lb services -o json`, as text (to compare whole).
    fn services_json(&self) -> String {
        self.lb(&["services", "-o", "json"])
    }

    /// The endpoints the maps hold for the echo Service's TCP frontend.
    fn tcp_endpoints(&self) -> Vec<String> {
        endpoints_in(&self.services_json(), TCP_FRONTEND, "TCP")
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.workdir.join("agent.log")).unwrap_or_default()
    }

    /// Whether the maps hold exactly `backends` for the echo Service's TCP frontend within
    /// `within`.
    fn endpoints_become(&self, backends: &[usize], within: Duration) -> bool {
        let expected: Vec<String> = backends.iter().map(|index| endpoint(*index)).collect();
        wait_until(within, || self.tcp_endpoints() == expected)
    }

    /// A connection through the ClusterIP, and the backend it was given.
    fn pinned_connection(&self) -> (Connection, usize) {
        let mut connection =
            Connection::open(&self.topology.client, TCP_FRONTEND).expect("connect");
        let backend = backend_of(&mut connection);
        (connection, backend)
    }

    /// How many of `CONNECTIONS` connections through the ClusterIP each backend took.
    fn spread(&self) -> BTreeMap<usize, usize> {
        let mut taken = BTreeMap::new();
        for _ in 0..CONNECTIONS {
            let mut connection =
                Connection::open(&self.topology.client, TCP_FRONTEND).expect("connect");
            let reply = connection.request().expect("request");
            *taken
                .entry(backend_index(&reply).expect("backend"))
                .or_insert(0) += 1;
        }
        taken
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        tear_down(self.agent.take(), &self.lb, &self.pin_dir, &self.workdir);
    }
}

/// The backend answering a request on `connection`.
fn backend_of(connection: &mut Connection) -> usize {
    backend_index(&connection.request().expect("a request on the connection")).expect("backend")
}

/// `addr:port` as `lb services` prints an endpoint.
fn endpoint(index: usize) -> String {
    format!("{}:{BACKEND_TCP_PORT}", backend_addr(index))
}

#[test]
fn services_and_slices_from_the_api_server_reach_the_maps_and_carry_traffic() {
    if !require_root("services_and_slices_from_the_api_server_reach_the_maps_and_carry_traffic") {
        return;
    }
    let cluster = Cluster::start().expect("cluster");
    // Listed at start-up: every backend, and real connections reach each of them.
    assert_eq!(
        cluster.tcp_endpoints(),
        vec![endpoint(0), endpoint(1), endpoint(2)]
    );
    assert_eq!(cluster.spread().len(), 3);

    // A slice change arrives through the watch.
    cluster.api.apply(&echo_slice(&[0, 2]));
    assert!(
        cluster.endpoints_become(&[0, 2], APPLY_TIMEOUT),
        "the slice change did not reach the maps: {:?}\n{}",
        cluster.tcp_endpoints(),
        cluster.agent_log()
    );
    let taken = cluster.spread();
    assert_eq!(taken.keys().copied().collect::<Vec<_>>(), vec![0, 2]);

    // A Service another proxy serves (kube-proxy's service-proxy-name label) is left alone, and
    // so is its slice.
    let mut other = echo_service(json!({"service.kubernetes.io/service-proxy-name": "other"}));
    other.metadata.name = Some("elsewhere".to_owned());
    other.spec.as_mut().expect("spec").cluster_ip = Some("10.96.0.77".to_owned());
    cluster.api.apply(&other);
    // A later change proves the watch got past the ignored Service.
    cluster.api.apply(&echo_slice(&[1]));
    assert!(
        cluster.endpoints_become(&[1], APPLY_TIMEOUT),
        "the second slice change did not reach the maps: {:?}",
        cluster.tcp_endpoints()
    );
    assert!(
        !cluster.services_json().contains("10.96.0.77"),
        "{}",
        cluster.services_json()
    );

    // Deleting the Service removes its frontends.
    cluster.api.delete::<Service>("e2e", "echo");
    assert!(
        wait_until(APPLY_TIMEOUT, || !cluster
            .services_json()
            .contains(&CLUSTER_IP.to_string())),
        "the deleted Service is still programmed: {}",
        cluster.services_json()
    );
    assert!(
        Connection::open(&cluster.topology.client, TCP_FRONTEND).is_err(),
        "a deleted Service still answers"
    );
}

#[test]
fn a_relist_after_410_gone_writes_nothing_and_keeps_live_flows() {
    if !require_root("a_relist_after_410_gone_writes_nothing_and_keeps_live_flows") {
        return;
    }
    let cluster = Cluster::start().expect("cluster");
    let mut connection = Connection::open(&cluster.topology.client, TCP_FRONTEND).expect("connect");
    let before_reply = connection.request().expect("request");
    let maps_before = cluster.services_json();
    let programmed_before = cluster.agent_log().matches("programmed").count();
    let lists_before = cluster.api.lists();
    let watches_before = cluster.api.watches();

    // The history is compacted and the watches end: resuming from their resourceVersion gets
    // 410 Gone, and the agent lists everything again.
    cluster.api.compact();
    assert!(
        wait_until(APPLY_TIMEOUT, || cluster.api.lists() >= lists_before + 2),
        "the agent did not list again after 410 Gone ({} lists before, {} now)",
        lists_before,
        cluster.api.lists()
    );
    assert!(
        wait_until(APPLY_TIMEOUT, || cluster.agent_log().contains("410 Gone")),
        "{}",
        cluster.agent_log()
    );
    // A change after the re-list still arrives (the watch resumed), and nothing before it was
    // written: the maps are as they were, the open connection keeps its backend.
    assert_eq!(cluster.services_json(), maps_before);
    assert_eq!(
        cluster.agent_log().matches("programmed").count(),
        programmed_before,
        "the re-list of unchanged objects wrote to the maps:\n{}",
        cluster.agent_log()
    );
    assert!(
        wait_until(APPLY_TIMEOUT, || cluster.api.watches()
            >= watches_before + 2),
        "the agent did not watch again after the re-list"
    );
    let after_reply = connection
        .request()
        .expect("the live connection after the re-list");
    assert_eq!(after_reply.backend, before_reply.backend);
    cluster.api.apply(&echo_slice(&[1, 2]));
    assert!(
        cluster.endpoints_become(&[1, 2], APPLY_TIMEOUT),
        "a change after the re-list did not arrive: {:?}",
        cluster.tcp_endpoints()
    );
}

/// How long the API server is away in the outage test (the "a minute").
const OUTAGE: Duration = Duration::from_secs(60);

#[test]
fn the_agent_rides_out_an_api_server_outage_and_catches_up() {
    if !require_root("the_agent_rides_out_an_api_server_outage_and_catches_up") {
        return;
    }
    let mut cluster = Cluster::start().expect("cluster");
    let (mut connection, pinned) = cluster.pinned_connection();

    cluster.api.stop();
    // While the API server is away the dataplane stays as it is: live flows and new ones.
    let away = std::time::Instant::now();
    while away.elapsed() < OUTAGE {
        let reply = connection.request().expect("a live flow during the outage");
        assert_eq!(backend_index(&reply).expect("backend"), pinned);
        assert_eq!(cluster.spread().len(), 3, "new flows during the outage");
        std::thread::sleep(Duration::from_secs(5));
    }
    // Alive all along, and saying the API server is away.
    let (status, body) = health(&cluster.topology.node, "/healthz").expect("/healthz");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"source_reachable\":false"), "{body}");
    // Each watch logs the loss once, not at every retry.
    let log = cluster.agent_log();
    for kind in ["Services", "EndpointSlices"] {
        let losses = log
            .lines()
            .filter(|line| line.contains(&format!("{kind}: ")))
            .filter(|line| line.contains("keeping the dataplane as it is"))
            .count();
        assert_eq!(losses, 1, "{kind}: the loss logged {losses} times:\n{log}");
    }

    // Changes made meanwhile arrive once it is back.
    cluster.api.apply(&echo_slice(&[pinned]));
    cluster
        .api
        .restart(&cluster.topology.node)
        .expect("restarting the API server");
    assert!(
        cluster.endpoints_become(&[pinned], Duration::from_secs(120)),
        "the agent did not catch up after the outage: {:?}\n{}",
        cluster.tcp_endpoints(),
        cluster.agent_log()
    );
    // Both kinds see it back, even the one whose objects did not change meanwhile (its watcher
    // reconnects without an event).
    assert!(
        wait_until(APPLY_TIMEOUT, || health(&cluster.topology.node, "/healthz")
            .is_ok_and(|(_, body)| body.contains("\"source_reachable\":true"))),
        "{:?}",
        health(&cluster.topology.node, "/healthz")
    );
    let log = cluster.agent_log();
    for kind in ["Services", "EndpointSlices"] {
        assert!(
            log.contains(&format!("{kind}: the API server answers again")),
            "{kind}:\n{log}"
        );
    }
}

#[test]
fn the_agent_is_ready_only_once_the_api_server_has_listed_everything() {
    if !require_root("the_agent_is_ready_only_once_the_api_server_has_listed_everything") {
        return;
    }
    let mut cluster = Cluster::build().expect("cluster");
    cluster.api.stop();
    cluster.start_agent(false).expect("agent");
    // Live at once, not ready, and saying why.
    let node = &cluster.topology.node;
    assert!(
        wait_until(APPLY_TIMEOUT, || health(node, "/healthz").is_ok_and(
            |(status, body)| status == 200 && body.contains("\"source_reachable\":false")
        )),
        "{}",
        cluster.agent_log()
    );
    let (status, body) = health(node, "/readyz").expect("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(cluster.tcp_endpoints().is_empty());
    // The API server comes: ready once both lists are programmed.
    cluster.api.restart(node).expect("starting the API server");
    assert!(
        wait_until(Duration::from_secs(60), || health(node, "/readyz")
            .is_ok_and(|(status, _)| status == 200)),
        "{}",
        cluster.agent_log()
    );
    assert_eq!(
        cluster.tcp_endpoints(),
        vec![endpoint(0), endpoint(1), endpoint(2)]
    );
    let (status, _) = health(node, "/metrics-not-here").expect("an unknown path");
    assert_eq!(status, 404);
}

/// This node's Node object, in `zone` when given.
fn this_node(zone: Option<&str>) -> Node {
    let labels = zone.map_or_else(
        || json!({}),
        |zone| json!({"topology.kubernetes.io/zone": zone}),
    );
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE_NAME, "labels": labels},
    }))
    .expect("a valid Node")
}

/// The echo slice with every backend ready and hinted for a zone: 0 and 1 for zone-1, 2 for
/// zone-2 (as the EndpointSlice controller hints for `trafficDistribution: PreferClose`).
fn zoned_echo_slice() -> EndpointSlice {
    let mut slice = echo_slice(&[0, 1, 2]);
    let value = serde_json::to_value(&slice).expect("a slice serializes");
    let mut value = value;
    for (index, endpoint) in value["endpoints"]
        .as_array_mut()
        .expect("endpoints")
        .iter_mut()
        .enumerate()
    {
        let zone = if index < 2 { "zone-1" } else { "zone-2" };
        endpoint["hints"] = json!({"forZones": [{"name": zone}]});
    }
    slice = serde_json::from_value(value).expect("a valid EndpointSlice");
    slice
}

#[test]
fn topology_hints_follow_the_zone_of_this_node_s_node_object() {
    if !require_root("topology_hints_follow_the_zone_of_this_node_s_node_object") {
        return;
    }
    let mut cluster = Cluster::build().expect("cluster");
    cluster.api.apply(&this_node(Some("zone-1")));
    cluster.api.apply(&zoned_echo_slice());
    cluster.start_agent(true).expect("agent");
    // In zone-1: new connections reach zone-1's endpoints only.
    let taken = cluster.spread();
    assert_eq!(
        taken.keys().copied().collect::<Vec<_>>(),
        vec![0, 1],
        "{taken:?}\n{}",
        cluster.agent_log()
    );
    assert!(cluster.agent_log().contains("this node is in zone zone-1"));

    // An open connection to a zone-1 endpoint keeps it when the node moves to zone-2, while
    // new ones go to zone-2's endpoint.
    let (mut connection, pinned) = cluster.pinned_connection();
    cluster.api.apply(&this_node(Some("zone-2")));
    assert!(
        wait_until(APPLY_TIMEOUT, || cluster.spread().len() == 1),
        "the zone change did not reach the maps:\n{}",
        cluster.agent_log()
    );
    assert_eq!(
        cluster.spread().keys().copied().collect::<Vec<_>>(),
        vec![2]
    );
    assert_eq!(backend_of(&mut connection), pinned);

    // Without the zone label, the hints no longer apply: every endpoint.
    cluster.api.apply(&this_node(None));
    assert!(
        wait_until(APPLY_TIMEOUT, || cluster.spread().len() == 3),
        "the zone label's removal did not reach the maps:\n{}",
        cluster.agent_log()
    );
}

/// The agent's first periodic resync (its default `--resync-seconds`).
const FIRST_RESYNC: Duration = Duration::from_secs(30);

/// How late the slow API server answers each list.
const SLOW_LIST: Duration = Duration::from_secs(3);

#[test]
fn slow_lists_and_a_watch_cut_mid_event_still_converge() {
    if !require_root("slow_lists_and_a_watch_cut_mid_event_still_converge") {
        return;
    }
    let mut cluster = Cluster::build().expect("cluster");
    cluster.api.set_list_delay(SLOW_LIST);
    cluster.start_agent(true).expect("agent");
    assert_eq!(
        cluster.tcp_endpoints(),
        vec![endpoint(0), endpoint(1), endpoint(2)]
    );
    let (mut connection, pinned) = cluster.pinned_connection();
    let keep: Vec<usize> = (0..3).filter(|index| *index != (pinned + 1) % 3).collect();

    // The slice change is cut after half its bytes and the connections drop: the agent must not
    // apply half an event, and gets the whole one when it watches again.
    let watches_before = cluster.api.watches();
    let lists_before = cluster.api.lists();
    cluster.api.cut_next_event();
    cluster.api.apply(&echo_slice(&keep));
    assert!(
        cluster.endpoints_become(&keep, Duration::from_secs(60)),
        "the cut change never arrived: {:?}\n{}",
        cluster.tcp_endpoints(),
        cluster.agent_log()
    );
    assert!(
        cluster.api.watches() > watches_before,
        "the agent did not watch again"
    );
    // It resumed the watch from the last whole event it had, without listing everything again.
    assert_eq!(cluster.api.lists(), lists_before);
    // The open connection kept its backend (it is still in the slice).
    assert_eq!(backend_of(&mut connection), pinned);
    // And the watch goes on.
    cluster.api.apply(&echo_slice(&[pinned]));
    assert!(
        cluster.endpoints_become(&[pinned], APPLY_TIMEOUT),
        "a later change did not arrive: {:?}",
        cluster.tcp_endpoints()
    );
}

#[test]
fn a_restarted_agent_takes_over_the_pinned_maps_without_a_write() {
    if !require_root("a_restarted_agent_takes_over_the_pinned_maps_without_a_write") {
        return;
    }
    let mut cluster = Cluster::start().expect("cluster");
    let maps_before = cluster.services_json();
    let (mut connection, pinned) = cluster.pinned_connection();

    // An upgrade: the agent stops, and a new one starts on the pinned maps.
    if let Some(mut agent) = cluster.agent.take() {
        agent.stop();
    }
    cluster.start_agent(true).expect("the new agent");
    let log = cluster.agent_log();
    assert!(
        log.contains("read the pinned Service maps frontends=2"),
        "{log}"
    );
    assert!(
        !log.contains("Service frontends added="),
        "the new agent rewrote unchanged entries:\n{log}"
    );
    assert_eq!(cluster.services_json(), maps_before);
    assert_eq!(backend_of(&mut connection), pinned);
    // And it follows changes.
    cluster.api.apply(&echo_slice(&[pinned]));
    assert!(
        cluster.endpoints_become(&[pinned], APPLY_TIMEOUT),
        "{:?}",
        cluster.tcp_endpoints()
    );
}

#[test]
fn objects_deleted_while_the_agent_was_cut_off_go_at_the_re_list() {
    if !require_root("objects_deleted_while_the_agent_was_cut_off_go_at_the_re_list") {
        return;
    }
    let mut cluster = Cluster::start().expect("cluster");
    // While the agent cannot see it, the slice is replaced by another one, and the history of
    // that is compacted away: only a re-list can tell the agent the old slice is gone.
    cluster.api.stop();
    cluster.api.delete::<EndpointSlice>("e2e", "echo-1");
    let mut replacement = echo_slice(&[1]);
    replacement.metadata.name = Some("echo-2".to_owned());
    cluster.api.apply(&replacement);
    cluster.api.compact();
    cluster
        .api
        .restart(&cluster.topology.node)
        .expect("restarting the API server");
    assert!(
        cluster.endpoints_become(&[1], Duration::from_secs(60)),
        "the re-list did not drop the deleted slice: {:?}\n{}",
        cluster.tcp_endpoints(),
        cluster.agent_log()
    );
    assert_eq!(
        cluster.spread().keys().copied().collect::<Vec<_>>(),
        vec![1]
    );
}

#[test]
fn without_permission_to_read_nodes_the_agent_serves_without_zones() {
    if !require_root("without_permission_to_read_nodes_the_agent_serves_without_zones") {
        return;
    }
    let mut cluster = Cluster::build().expect("cluster");
    cluster.api.forbid::<Node>();
    cluster.api.apply(&this_node(Some("zone-1")));
    cluster.api.apply(&zoned_echo_slice());
    let started = std::time::Instant::now();
    cluster
        .start_agent(true)
        .expect("the agent gets ready without the Node");
    // At the refusal, not at the first resync (30 s) after it.
    assert!(started.elapsed() < FIRST_RESYNC, "{}", cluster.agent_log());
    // Every endpoint: no zone known, so no hint applies.
    assert_eq!(cluster.spread().len(), 3);
    let log = cluster.agent_log();
    assert_eq!(
        log.matches("refuses the watch (403 Forbidden").count(),
        1,
        "{log}"
    );
    // An answer, not an outage.
    let (status, body) = health(&cluster.topology.node, "/healthz").expect("/healthz");
    assert_eq!(status, 200);
    assert!(body.contains("\"source_reachable\":true"), "{body}");
    // `lb plan` does as the agent does: no zone, a warning, and in sync.
    let (status, plan, err) = cluster.plan_json(&[]);
    assert_eq!(status, 0, "{plan:#}{err}");
    assert_eq!(plan["zone"], serde_json::Value::Null);
    assert!(err.contains("reading Node node-a"), "{err}");
}

/// The echo Service's TCP nodePort in the NodePort test.
const TCP_NODE_PORT: u16 = 30_080;

#[test]
fn primary_node_port_addresses_are_the_node_object_s_internal_ips() {
    if !require_root("primary_node_port_addresses_are_the_node_object_s_internal_ips") {
        return;
    }
    let mut cluster = Cluster::build().expect("cluster");
    let mut service = echo_service(json!({}));
    let spec = service.spec.as_mut().expect("spec");
    spec.type_ = Some("NodePort".to_owned());
    spec.ports.as_mut().expect("ports")[0].node_port = Some(i32::from(TCP_NODE_PORT));
    cluster.api.apply(&service);
    let mut node = this_node(None);
    node.status = Some(
        serde_json::from_value(json!({
            "addresses": [
                {"type": "InternalIP", "address": NODE_CLIENT_SIDE.to_string()},
                {"type": "Hostname", "address": NODE_NAME},
            ],
        }))
        .expect("a valid NodeStatus"),
    );
    cluster.api.apply(&node);
    cluster
        .start_agent_with(true, &["--nodeport-addresses", "primary"])
        .expect("agent");

    // Served on the InternalIP only, not on the node's other addresses.
    let node_port = SocketAddr::from((NODE_CLIENT_SIDE, TCP_NODE_PORT));
    let frontends = cluster.services_json();
    assert!(
        !endpoints_in(&frontends, node_port, "TCP").is_empty(),
        "{frontends}"
    );
    let other = SocketAddr::from((backend_side_of_node(), TCP_NODE_PORT));
    assert!(
        endpoints_in(&frontends, other, "TCP").is_empty(),
        "{frontends}"
    );
    let mut connection = Connection::open(&cluster.topology.client, node_port).expect("connect");
    backend_index(&connection.request().expect("request")).expect("a backend answers");

    // The Node's address changes: the NodePort follows it.
    let mut moved = node.clone();
    moved.status = Some(
        serde_json::from_value(json!({
            "addresses": [{"type": "InternalIP", "address": backend_side_of_node().to_string()}],
        }))
        .expect("a valid NodeStatus"),
    );
    cluster.api.apply(&moved);
    assert!(
        wait_until(APPLY_TIMEOUT, || {
            let frontends = cluster.services_json();
            endpoints_in(&frontends, node_port, "TCP").is_empty()
                && !endpoints_in(&frontends, other, "TCP").is_empty()
        }),
        "{}\n{}",
        cluster.services_json(),
        cluster.agent_log()
    );
}

/// One of the node's addresses other than its client side.
fn backend_side_of_node() -> Ipv4Addr {
    lb_tests::topology::node_backend_side(0)
}

/// `lb plan`'s exit status on drift.
const EXIT_DRIFT: i32 = 1;
/// A second Service's ClusterIP in the plan test.
const OTHER_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);

/// The drift `plan` (`lb plan -o json`) reports for `frontend`/`protocol` (`None`: none).
fn drift_of(plan: &serde_json::Value, frontend: SocketAddr, protocol: &str) -> Option<String> {
    plan["frontends"]
        .as_array()
        .expect("frontends")
        .iter()
        .find(|row| row["frontend"] == frontend.to_string() && row["protocol"] == protocol)
        .map(|row| row["drift"].as_str().expect("drift").to_owned())
}

#[test]
fn plan_against_the_api_server_is_clean_in_sync_and_names_drift() {
    if !require_root("plan_against_the_api_server_is_clean_in_sync_and_names_drift") {
        return;
    }
    let mut cluster = Cluster::build().expect("cluster");
    let mut other = echo_service(json!({}));
    other.metadata.name = Some("other".to_owned());
    other.spec.as_mut().expect("spec").cluster_ip = Some(OTHER_CLUSTER_IP.to_string());
    cluster.api.apply(&other);
    cluster.start_agent(true).expect("agent");

    let (status, out, err) = cluster.plan(&[]);
    println!("$ lb plan --kubeconfig ...\n{out}{err}");
    assert_eq!(status, 0, "{out}{err}\n{}", cluster.agent_log());
    assert!(
        out.contains("in sync: the maps hold the 4 frontends"),
        "{out}"
    );
    assert!(out.contains("(kubernetes http://127.0.0.1:"), "{out}");
    assert!(err.is_empty(), "lb plan said on stderr: {err}");

    // Behind the stopped agent's back: a frontend deleted from the maps, the other Service
    // deleted and an endpoint gone from echo's slice, in the API server.
    cluster.stop_agent();
    support::maps::delete_echo_tcp_frontend(&cluster.pin_dir);
    cluster.api.delete::<Service>("e2e", "other");
    cluster.api.apply(&echo_slice(&[0, 1]));

    let (status, out, err) = cluster.plan(&[]);
    println!("$ lb plan --kubeconfig ...\n{out}{err}");
    assert_eq!(status, EXIT_DRIFT, "{out}{err}");
    let (status, plan, err) = cluster.plan_json(&[]);
    assert_eq!(status, EXIT_DRIFT, "{plan:#}{err}");
    assert!(err.is_empty(), "lb plan said on stderr: {err}");
    assert_eq!(plan["in_sync"], false);
    assert_eq!(
        drift_of(&plan, TCP_FRONTEND, "TCP").as_deref(),
        Some("missing"),
        "{plan:#}"
    );
    assert_eq!(
        drift_of(&plan, UDP_FRONTEND, "UDP").as_deref(),
        Some("stale"),
        "{plan:#}"
    );
    let rows = plan["frontends"].as_array().expect("frontends");
    let stale = rows
        .iter()
        .find(|row| row["drift"] == "stale")
        .expect("a stale row");
    let gone = format!("{}:{BACKEND_UDP_PORT}", backend_addr(2));
    let reasons = stale["reasons"].to_string();
    assert!(
        reasons.contains("endpoints for new flows") && reasons.contains(&gone),
        "{reasons}"
    );
    for (port, protocol) in [(TCP_PORT, "TCP"), (UDP_PORT, "UDP")] {
        let frontend = SocketAddr::from((OTHER_CLUSTER_IP, port));
        assert_eq!(
            drift_of(&plan, frontend, protocol).as_deref(),
            Some("extra"),
            "{plan:#}"
        );
    }
    assert_eq!(rows.len(), 4, "{plan:#}");
    assert_eq!(
        plan["extra_cluster_ips"],
        json!([OTHER_CLUSTER_IP.to_string()])
    );
    assert!(
        plan["source"]
            .as_str()
            .expect("source")
            .starts_with("kubernetes ")
    );

    // The agent catches up at start: in sync again.
    cluster.start_agent(true).expect("the agent again");
    let (status, out, err) = cluster.plan(&[]);
    assert_eq!(status, 0, "{out}{err}");
}

#[test]
fn plan_without_permission_to_read_the_node_warns_and_uses_the_recorded_zone() {
    if !require_root("plan_without_permission_to_read_the_node_warns_and_uses_the_recorded_zone") {
        return;
    }
    let mut cluster = Cluster::build().expect("cluster");
    cluster.api.apply(&this_node(Some("zone-1")));
    cluster.api.apply(&zoned_echo_slice());
    cluster.start_agent(true).expect("agent");
    // The zone comes from the Node, as the agent's does.
    let (status, plan, err) = cluster.plan_json(&[]);
    assert_eq!(status, 0, "{plan:#}{err}");
    assert_eq!(plan["zone"], "zone-1");

    // The role loses the permission while the agent is stopped: the plan warns and compares
    // with the zone the agent recorded, rather than failing.
    cluster.stop_agent();
    cluster.api.forbid::<Node>();
    let (status, plan, err) = cluster.plan_json(&[]);
    println!("$ lb plan --kubeconfig ... -o json (stderr)\n{err}");
    assert_eq!(status, 0, "{plan:#}{err}");
    assert_eq!(plan["zone"], "zone-1");
    assert!(
        err.contains("reading Node node-a") && err.contains("403"),
        "no warning about the Node on stderr: {err}"
    );
    assert!(err.contains("as the agent recorded them"), "{err}");
    // `--zone` still replaces the recorded zone: zone-2 wants endpoint 2 alone.
    let (status, plan, err) = cluster.plan_json(&["--zone", "zone-2"]);
    assert_eq!(status, EXIT_DRIFT, "{plan:#}{err}");
    assert_eq!(plan["zone"], "zone-2");
    assert!(err.contains("the zone from --zone"), "{err}");
}
