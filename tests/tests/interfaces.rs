//! `--interfaces` with names and globs: the agent attaches the XDP program to interfaces that
//! appear after it started (a pod's veth), serves Service traffic through them, detaches from
//! those that go or are renamed out of the patterns, follows renames, and leaves alone what no
//! pattern matches, loopback included; and that a link pinned under an interface's name but
//! holding another interface is never reused for the named one.
//!
//! Topology and network rule: see `lb_tests::topology`. On top of the single node, a second
//! client namespace is plugged into the node while the agent runs, through a veth whose node
//! side, `lc1`, only a glob names.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use lb::dataplane::{Dataplane, VethRedirect, maps::Capacities, system::pinned_xdp_link_ifindex};
use lb_common::limits::LINKS_SUBDIR;
use lb_tests::{
    agent::{Agent, AgentOptions, REDIRECT_VETH, lb_binary, pin_dir, tear_down, wait_until},
    echo::{self, Connection, EXAMPLE_MANIFEST, TCP_FRONTEND, backend_index},
    leftovers::{self, remove_test_leftovers_once},
    netns::{Netns, unique_prefix, veth},
    privilege::require_root,
    servers::{Server, UdpChecksum},
    topology::{
        BACKENDS, NODE_CLIENT_INTERFACE, Offload, PEER_INTERFACE, SERVICE_CIDR, SingleNode,
        node_backend_interface,
    },
};

/// What the agent is started with: the client link by name, the backend links by a glob that
/// matches them at start-up, and a glob that matches nothing yet but would match `lo`.
const INTERFACES: [&str; 3] = [NODE_CLIENT_INTERFACE, "b*", "l*"];
/// The glob matching nothing at start-up.
const LATE_GLOB: &str = "l*";
/// The node side of the second client's veth: matched by [`LATE_GLOB`] only.
const NEW_INTERFACE: &str = "lc1";
/// A link matched by no pattern, and its veth peer (in the node too).
const UNMATCHED_INTERFACE: &str = "zz1";
const UNMATCHED_PEER: &str = "zz1p";
/// [`UNMATCHED_INTERFACE`] renamed into the glob, then within it, then out of it.
const RENAMED_IN: &str = "lc2";
const RENAMED_WITHIN: &str = "lc3";
const RENAMED_OUT: &str = "zz3";
/// Interfaces changed while the agent is down: the second client's link renamed (still matched),
/// and one deleted and re-created under its name.
const RENAMED_WHILE_DOWN: &str = "lc9";
const RECREATED_WHILE_DOWN: &str = "lc4";
const RECREATED_PEER: &str = "zz4p";
/// Two interfaces of the node matched by [`LATE_GLOB`], whose pins get mixed up while the agent
/// is down, and their veth peers (matched by no pattern).
const MIXED_UP: [&str; 2] = ["lp1", "lp2"];
const MIXED_UP_PEERS: [&str; 2] = ["zp1", "zp2"];
/// A veth pair of a bare namespace, for the dataplane alone.
const BARE_PAIR: [&str; 2] = ["la0", "lb0"];
/// The second client's subnet: the node is .1, the client .2.
const NEW_CLIENT_SUBNET: &str = "10.0.2.0/24";
const NEW_NODE_SIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
const NEW_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// How long the agent may take to act on a link appearing, going or being renamed. It acts on
/// the notification within milliseconds; the full re-read, 30 s, must not be what this sees.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(10);
/// New flows through the new interface: all from one backend with probability 3 (1/3)^12 < 1e-5.
const FLOWS: usize = 12;

/// The single node with echo servers and an agent started with [`INTERFACES`], plus the second
/// client's namespace (its veth comes and goes). Dropping it stops the agent and resets the pins.
struct Cluster {
    agent: Option<Agent>,
    lb: PathBuf,
    pin_dir: PathBuf,
    workdir: PathBuf,
    new_client: Netns,
    _servers: Vec<Server>,
    topology: SingleNode,
}

impl Cluster {
    fn start() -> anyhow::Result<Self> {
        remove_test_leftovers_once();
        let prefix = unique_prefix(leftovers::TESTS);
        let lb = lb_binary()?;
        let topology = SingleNode::build(&prefix, Offload::default())?;
        let servers = echo::start_servers(&topology, UdpChecksum::Computed)?;
        let new_client = Netns::create(&format!("{prefix}-client2"))?;
        for index in 0..BACKENDS {
            topology.backends[index].ip(&[
                "route",
                "add",
                NEW_CLIENT_SUBNET,
                "via",
                &lb_tests::topology::node_backend_side(index).to_string(),
            ])?;
        }
        let workdir = std::env::temp_dir().join(&prefix);
        let manifests = workdir.join("manifests");
        std::fs::create_dir_all(&manifests)?;
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        std::fs::copy(
            workspace.join(EXAMPLE_MANIFEST),
            manifests.join("echo.yaml"),
        )?;
        let mut cluster = Self {
            agent: None,
            lb,
            pin_dir: pin_dir(&prefix),
            workdir,
            new_client,
            _servers: servers,
            topology,
        };
        cluster.agent = Some(cluster.start_agent(&interfaces(&INTERFACES))?);
        Ok(cluster)
    }

    fn agent_options<'a>(
        &'a self,
        interfaces: &'a [String],
        log: &'a Path,
        manifests: &'a Path,
        state_dir: &'a Path,
    ) -> AgentOptions<'a> {
        AgentOptions {
            lb: &self.lb,
            pin_dir: &self.pin_dir,
            manifests,
            interfaces,
            state_dir,
            log,
            // The new client's veth peer gets GRO, as the topology's do.
            extra_args: &[REDIRECT_VETH],
        }
    }

    fn start_agent(&self, interfaces: &[String]) -> anyhow::Result<Agent> {
        let log = self.workdir.join(format!(
            "agent-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        let (manifests, state) = (self.workdir.join("manifests"), self.workdir.join("state"));
        Agent::start(
            &self.topology.node,
            &self.agent_options(interfaces, &log, &manifests, &state),
        )
    }

    fn node(&self) -> &Netns {
        &self.topology.node
    }

    fn log(&self) -> String {
        self.agent.as_ref().expect("agent").log_text()
    }

    fn pinned(&self, interface: &str) -> bool {
        self.pin_dir.join(LINKS_SUBDIR).join(interface).exists()
    }

    /// The id of the XDP program on the node's `interface`, if one is attached.
    fn xdp_program(&self, interface: &str) -> anyhow::Result<Option<u64>> {
        let output = self
            .node()
            .exec("ip", &["-j", "link", "show", "dev", interface])?;
        let links: serde_json::Value =
            serde_json::from_slice(&output.stdout).context("reading `ip -j link`")?;
        Ok(links[0]["xdp"]["prog"]["id"].as_u64())
    }

    /// The agent's program: the one on the client link, named at start-up.
    fn program(&self) -> u64 {
        self.xdp_program(NODE_CLIENT_INTERFACE)
            .expect("ip link")
            .expect("the program on the named interface")
    }

    /// Whether the agent's program is attached to `interface` and its link pinned.
    fn attached(&self, interface: &str) -> bool {
        self.pinned(interface) && self.xdp_program(interface).ok().flatten() == Some(self.program())
    }

    /// The index of the interface the link pinned as `name` holds, as the kernel says.
    fn pinned_for(&self, name: &str) -> anyhow::Result<Option<u32>> {
        pinned_xdp_link_ifindex(&self.pin_dir.join(LINKS_SUBDIR).join(name))
    }

    /// Whether neither a pin nor a program is left on `interface` (gone or not).
    fn detached(&self, interface: &str) -> bool {
        !self.pinned(interface) && self.xdp_program(interface).ok().flatten().is_none()
    }

    /// Plugs the second client into the node through `NEW_INTERFACE`.
    fn plug_new_client(&self) -> anyhow::Result<()> {
        veth(self.node(), NEW_INTERFACE, &self.new_client, PEER_INTERFACE)?;
        self.node().ip(&[
            "addr",
            "add",
            &format!("{NEW_NODE_SIDE}/24"),
            "dev",
            NEW_INTERFACE,
        ])?;
        self.new_client.ip(&[
            "addr",
            "add",
            &format!("{NEW_CLIENT_ADDR}/24"),
            "dev",
            PEER_INTERFACE,
        ])?;
        self.new_client.ip(&[
            "route",
            "add",
            SERVICE_CIDR,
            "via",
            &NEW_NODE_SIDE.to_string(),
        ])?;
        // Redirected frames reach a veth only when its peer runs NAPI.
        self.new_client
            .exec("ethtool", &["-K", PEER_INTERFACE, "gro", "on"])?;
        Ok(())
    }

    /// `FLOWS` new TCP flows from the second client to the ClusterIP; the backends they took.
    fn backends_through_new_interface(&self) -> anyhow::Result<BTreeSet<usize>> {
        let mut seen = BTreeSet::new();
        for _ in 0..FLOWS {
            let reply = Connection::open(&self.new_client, TCP_FRONTEND)?.request()?;
            seen.insert(backend_index(&reply)?);
        }
        Ok(seen)
    }

    /// A veth pair inside the node: `name` and a peer no pattern matches.
    fn add_veth(&self, name: &str, peer: &str) -> anyhow::Result<()> {
        self.node()
            .ip(&["link", "add", name, "type", "veth", "peer", "name", peer])
    }

    fn rename(&self, from: &str, to: &str) -> anyhow::Result<()> {
        // Linux renames only interfaces that are down.
        self.node().ip(&["link", "set", from, "down"])?;
        self.node().ip(&["link", "set", from, "name", to])?;
        self.node().ip(&["link", "set", to, "up"])
    }

    fn wait(&self, what: &str, condition: impl FnMut() -> bool) -> anyhow::Result<()> {
        if !wait_until(FOLLOW_TIMEOUT, condition) {
            bail!(
                "{what} within {FOLLOW_TIMEOUT:?}; agent log:\n{}",
                self.log()
            );
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        tear_down(self.agent.take(), &self.lb, &self.pin_dir, &self.workdir);
    }
}

fn interfaces(items: &[&str]) -> Vec<String> {
    items.iter().map(|item| (*item).to_owned()).collect()
}

/// The agent's log lines that mention `interface` (as a tracing field or in the message).
fn lines_about<'a>(log: &'a str, interface: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|line| {
            line.contains(&format!("interface=\"{interface}\""))
                || line.contains(&format!("interface {interface}"))
        })
        .collect()
}

#[test]
fn interfaces_matched_by_a_glob_are_followed_as_they_come_and_go() -> anyhow::Result<()> {
    if !require_root("interfaces_matched_by_a_glob_are_followed_as_they_come_and_go") {
        return Ok(());
    }
    let mut cluster = Cluster::start()?;

    // Start-up: the name and the glob's current matches; nothing for the glob matching nothing
    // yet, and never loopback.
    assert!(cluster.attached(NODE_CLIENT_INTERFACE));
    for index in 0..BACKENDS {
        assert!(cluster.attached(&node_backend_interface(index)));
    }
    assert!(cluster.detached("lo"), "loopback matched by {LATE_GLOB}");
    assert!(
        cluster.log().contains(&format!(
            "--interfaces {LATE_GLOB}: no interface matches yet"
        )),
        "{}",
        cluster.log()
    );

    // A link no pattern matches, then a pod-like one the glob matches: the agent reads their
    // notifications in order, so once the second is attached the first was passed over.
    cluster.add_veth(UNMATCHED_INTERFACE, UNMATCHED_PEER)?;
    cluster.plug_new_client()?;
    cluster.wait(&format!("{NEW_INTERFACE} was not attached"), || {
        cluster.attached(NEW_INTERFACE)
    })?;
    assert!(cluster.detached(UNMATCHED_INTERFACE));
    assert!(cluster.detached(UNMATCHED_PEER));
    let accept_local = cluster.node().run(|| {
        std::fs::read_to_string(format!(
            "/proc/sys/net/ipv4/conf/{NEW_INTERFACE}/accept_local"
        ))
    })??;
    assert_eq!(accept_local.trim(), "1", "accept_local on {NEW_INTERFACE}");

    // Real Service traffic enters through the new interface only: the node has no route, socket
    // or rule for the ClusterIP, so every handshake completing was translated by the program.
    let backends = cluster.backends_through_new_interface()?;
    assert!(backends.len() > 1, "{FLOWS} flows all went to {backends:?}");

    // The pod goes: its pin goes, and the agent says so.
    cluster.node().ip(&["link", "del", NEW_INTERFACE])?;
    cluster.wait(&format!("{NEW_INTERFACE}'s pin stayed"), || {
        !cluster.pinned(NEW_INTERFACE)
    })?;
    let log = cluster.log();
    assert!(
        lines_about(&log, NEW_INTERFACE)
            .iter()
            .any(|line| line.contains("interface gone")),
        "{log}"
    );

    // A pod with the same interface name again (another ifindex): attached afresh, quietly, and
    // serving.
    cluster.plug_new_client()?;
    cluster.wait(&format!("{NEW_INTERFACE} was not attached again"), || {
        cluster.attached(NEW_INTERFACE)
    })?;
    assert!(!cluster.backends_through_new_interface()?.is_empty());

    // Renames: into the glob (attached), within it (the pin follows, the program stays), out of
    // it (detached).
    cluster.rename(UNMATCHED_INTERFACE, RENAMED_IN)?;
    cluster.wait(&format!("{RENAMED_IN} was not attached"), || {
        cluster.attached(RENAMED_IN)
    })?;
    cluster.rename(RENAMED_IN, RENAMED_WITHIN)?;
    cluster.wait(&format!("{RENAMED_WITHIN}'s pin did not follow"), || {
        cluster.attached(RENAMED_WITHIN) && !cluster.pinned(RENAMED_IN)
    })?;
    cluster.rename(RENAMED_WITHIN, RENAMED_OUT)?;
    cluster.wait(&format!("{RENAMED_OUT} kept the program"), || {
        cluster.detached(RENAMED_OUT) && !cluster.pinned(RENAMED_WITHIN)
    })?;

    let log = cluster.log();
    assert!(
        lines_about(&log, RENAMED_WITHIN)
            .iter()
            .any(|line| line.contains("its XDP link follows")),
        "{RENAMED_IN} -> {RENAMED_WITHIN} was not followed in place:\n{log}"
    );
    assert!(
        !log.contains("unusable") && !log.contains("WARN lb::dataplane"),
        "a warning while following interfaces:\n{log}"
    );
    // The interfaces present from the start were never touched again.
    for interface in [NODE_CLIENT_INTERFACE.to_owned(), node_backend_interface(0)] {
        assert_eq!(
            lines_about(&log, &interface).len(),
            1,
            "{interface}:\n{log}"
        );
    }

    // A restart after interfaces changed while no agent ran: the renamed one's old pin still
    // holds it, the re-created one's pin was cut from its deleted namesake. Both are attached
    // again, without a warning, and the old name's pin is gone.
    cluster.add_veth(RECREATED_WHILE_DOWN, RECREATED_PEER)?;
    cluster.wait(&format!("{RECREATED_WHILE_DOWN} was not attached"), || {
        cluster.attached(RECREATED_WHILE_DOWN)
    })?;
    cluster.agent.take().expect("agent").stop();
    cluster.rename(NEW_INTERFACE, RENAMED_WHILE_DOWN)?;
    cluster.node().ip(&["link", "del", RECREATED_WHILE_DOWN])?;
    cluster.add_veth(RECREATED_WHILE_DOWN, RECREATED_PEER)?;
    cluster.agent = Some(cluster.start_agent(&interfaces(&INTERFACES))?);
    let log = cluster.log();
    assert!(cluster.attached(RENAMED_WHILE_DOWN), "{log}");
    assert!(!cluster.pinned(NEW_INTERFACE), "{log}");
    assert!(cluster.attached(RECREATED_WHILE_DOWN), "{log}");
    assert!(
        !log.contains("unusable") && !log.contains("WARN lb::dataplane"),
        "a warning at the restart:\n{log}"
    );
    assert!(
        cluster.backends_through_new_interface()?.len() > 1,
        "through {RENAMED_WHILE_DOWN} after the restart"
    );
    Ok(())
}

#[test]
fn a_missing_name_or_a_bad_glob_stops_the_start() -> anyhow::Result<()> {
    if !require_root("a_missing_name_or_a_bad_glob_stops_the_start") {
        return Ok(());
    }
    remove_test_leftovers_once();
    let prefix = unique_prefix(leftovers::TESTS);
    let node = Netns::create(&format!("{prefix}-node"))?;
    let lb = lb_binary()?;
    // Refused before anything is loaded or pinned: the paths are never created.
    let scratch = std::env::temp_dir().join(&prefix);
    for (items, expected) in [
        ("nosuch0,l*", "\"nosuch0\" does not exist"),
        ("eth0,veth[0-9", "not a glob"),
        ("lo,", "empty interface name"),
    ] {
        let output = node
            .command(&lb)?
            .arg("--pin-dir")
            .arg(pin_dir(&prefix))
            .args(["agent", "--no-socket-hooks", "--manifests"])
            .arg(&scratch)
            .args(["--interfaces", items])
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(expected),
            "--interfaces {items}: {stderr}"
        );
        assert!(!pin_dir(&prefix).exists(), "--interfaces {items} pinned");
    }
    Ok(())
}

#[test]
fn a_pin_left_under_another_interfaces_name_is_not_reused() -> anyhow::Result<()> {
    if !require_root("a_pin_left_under_another_interfaces_name_is_not_reused") {
        return Ok(());
    }
    let mut cluster = Cluster::start()?;
    let [first, second] = MIXED_UP;
    cluster.add_veth(first, MIXED_UP_PEERS[0])?;
    cluster.wait(&format!("{first} was not attached"), || {
        cluster.attached(first)
    })?;

    // While no agent runs, a second interface appears and the first one's link is pinned under
    // its name (as a failed detach or a hand could leave it): the second one's pin holds the
    // first interface, and the first has none.
    cluster.agent.take().expect("agent").stop();
    cluster.add_veth(second, MIXED_UP_PEERS[1])?;
    let links_dir = cluster.pin_dir.join(LINKS_SUBDIR);
    std::fs::rename(links_dir.join(first), links_dir.join(second))?;
    let (first_index, _) = cluster.node().link(first)?;
    let (second_index, _) = cluster.node().link(second)?;
    assert_eq!(cluster.pinned_for(second)?, Some(first_index));

    // Both run the new program, each through a link of its own pinned under its own name.
    // Reusing the stale pin would have put the program into the first interface's link (the
    // second running nothing), and the first interface's attach would have found it taken.
    cluster.agent = Some(cluster.start_agent(&interfaces(&INTERFACES))?);
    cluster.wait(
        &format!("{first} and {second} were not both attached"),
        || cluster.attached(first) && cluster.attached(second),
    )?;
    let log = cluster.log();
    assert_eq!(cluster.pinned_for(first)?, Some(first_index), "{log}");
    assert_eq!(cluster.pinned_for(second)?, Some(second_index), "{log}");
    assert!(
        lines_about(&log, second)
            .iter()
            .any(|line| line.contains("holds another interface")),
        "{log}"
    );
    for interface in MIXED_UP {
        assert!(
            !lines_about(&log, interface)
                .iter()
                .any(|line| line.contains("replaced=true")),
            "{interface} reused a link:\n{log}"
        );
    }
    Ok(())
}

/// Resets a pin directory when dropped, after the dataplane using it.
struct PinGuard(PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Err(error) = lb::dataplane::reset(&self.0) {
            eprintln!("cleaning up {}: {error:#}", self.0.display());
        }
    }
}

#[test]
fn an_attach_unpins_a_link_pinned_under_its_name_for_another_interface() -> anyhow::Result<()> {
    if !require_root("an_attach_unpins_a_link_pinned_under_its_name_for_another_interface") {
        return Ok(());
    }
    remove_test_leftovers_once();
    let prefix = unique_prefix(leftovers::TESTS);
    let node = Netns::create(&format!("{prefix}-node"))?;
    let [first, second] = BARE_PAIR;
    node.ip(&["link", "add", first, "type", "veth", "peer", "name", second])?;
    let (first_index, _) = node.link(first)?;
    let (second_index, _) = node.link(second)?;
    let pin_dir = pin_dir(&prefix);
    let links_dir = pin_dir.join(LINKS_SUBDIR);
    let xdp_program = |interface: &str| -> anyhow::Result<Option<u64>> {
        let output = node.exec("ip", &["-j", "link", "show", "dev", interface])?;
        let links: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        Ok(links[0]["xdp"]["prog"]["id"].as_u64())
    };
    node.run(|| -> anyhow::Result<()> {
        let _pins = PinGuard(pin_dir.clone());
        let mut dataplane = Dataplane::load(&pin_dir, &Capacities::default())?;
        dataplane.attach(first, VethRedirect::Never)?;
        // A pin under `second`'s name that holds `first`, as a failed detach or a hand leaves
        // one.
        std::fs::rename(links_dir.join(first), links_dir.join(second))?;
        assert_eq!(
            pinned_xdp_link_ifindex(&links_dir.join(second))?,
            Some(first_index)
        );

        assert_eq!(dataplane.attach(second, VethRedirect::Never)?, second_index);
        let program = u64::from(dataplane.program_id()?);
        assert_eq!(xdp_program(second)?, Some(program));
        assert_eq!(
            pinned_xdp_link_ifindex(&links_dir.join(second))?,
            Some(second_index)
        );
        // The stale link went with its pin, so `first` is free for an attach of its own.
        assert_eq!(xdp_program(first)?, None);
        dataplane.attach(first, VethRedirect::Never)?;
        assert_eq!(xdp_program(first)?, Some(program));
        assert_eq!(
            pinned_xdp_link_ifindex(&links_dir.join(first))?,
            Some(first_index)
        );
        assert_eq!(xdp_program(second)?, Some(program));
        Ok(())
    })??;
    Ok(())
}
