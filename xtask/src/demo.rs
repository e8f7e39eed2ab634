//! `cargo xtask demo`: lb balancing a ClusterIP across three backends, for real.
//!
//! Builds `lb`, creates a client, a node and three backend namespaces (see
//! `lb_tests::topology`), starts a TCP and a UDP identity server in each backend, runs
//! `lb agent` on the node with the manifests in `examples/`, sends requests from the client to
//! the ClusterIP and prints which backend answered each, prints `lb services`, and tears it all
//! down, also on Ctrl-C or failure.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, bail};
use lb_tests::{
    agent::{Agent, AgentOptions, REDIRECT_VETH, lb, lb_in, pin_dir},
    echo::{self, CLUSTER_IP, Connection, TCP_FRONTEND, UDP_FRONTEND, backend_index},
    leftovers,
    netns::{self, unique_prefix},
    servers::{Reply, UdpChecksum},
    topology::{BACKENDS, CLIENT_ADDR, Offload, SingleNode, backend_addr},
};

use crate::{cargo, run_command, setup, workspace_root};

/// Rows of `lb conntrack` the demo shows (the header and a few flows).
const DEMO_FLOW_ROWS: usize = 5;

/// Requests sent before checking that every backend answered...
const MIN_REQUESTS: usize = 9;
/// ...and the most sent while waiting for the last one to appear (all three miss one another
/// with probability below 1e-9 at random selection).
const MAX_REQUESTS: usize = 60;

/// What to tear down if the demo is interrupted or fails: read by the Ctrl-C handler, which
/// exits without running any destructor.
#[derive(Default)]
struct Cleanup {
    /// The run's prefix, known before anything is created: every namespace named `<prefix>-*`
    /// is this run's, including those of a topology whose build was interrupted half-way.
    prefix: Option<String>,
    /// The agent's state directory and log.
    workdir: Option<PathBuf>,
    agent_pid: Option<u32>,
    pin_dir: Option<PathBuf>,
    lb: Option<PathBuf>,
}

impl Cleanup {
    /// Tears down everything planned. A namespace the interrupted build creates after the sweep
    /// below still carries this process's pid: the next demo removes it as a leftover.
    fn run(&mut self) {
        if let Some(pid) = self.agent_pid.take() {
            // SAFETY: signalling the agent process this demo started and has not reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if let (Some(lb_path), Some(pin_dir)) = (&self.lb, self.pin_dir.take()) {
            let _ = lb(lb_path, &pin_dir, &["reset"]);
        }
        if let Some(prefix) = self.prefix.take() {
            netns::delete_with_prefix(&prefix);
        }
        if let Some(workdir) = self.workdir.take() {
            let _ = std::fs::remove_dir_all(workdir);
        }
    }
}

/// Sends requests to `frontend` until every backend has answered.
fn exercise(
    protocol: &str,
    frontend: SocketAddr,
    mut request: impl FnMut() -> anyhow::Result<(Reply, SocketAddr)>,
) -> anyhow::Result<()> {
    let mut answered = [0usize; BACKENDS];
    for sent in 1..=MAX_REQUESTS {
        // The helpers fail unless the backend saw the client's own address and port.
        let (reply, local) = request()?;
        let backend = backend_index(&reply)?;
        answered[backend] += 1;
        println!(
            "  {protocol} {local} -> {frontend}: answered by {} ({}), which saw the client as {}",
            reply.backend,
            backend_addr(backend),
            reply.client
        );
        if sent >= MIN_REQUESTS && answered.iter().all(|count| *count > 0) {
            println!("  {protocol}: every backend answered ({answered:?} requests each)\n");
            return Ok(());
        }
    }
    bail!("after {MAX_REQUESTS} {protocol} requests not every backend answered: {answered:?}")
}

fn demo(lb_path: &Path, cleanup: &Arc<Mutex<Cleanup>>) -> anyhow::Result<()> {
    let prefix = unique_prefix(leftovers::DEMO);
    let pin_dir = pin_dir(&prefix);
    let workdir = std::env::temp_dir().join(&prefix);
    {
        let mut plan = cleanup.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        plan.prefix = Some(prefix.clone());
        plan.workdir = Some(workdir.clone());
        plan.pin_dir = Some(pin_dir.clone());
        plan.lb = Some(lb_path.to_owned());
    }
    println!("xtask: building the topology (namespaces {prefix}-*)");
    // Senders compute complete checksums, as packets arriving from a NIC carry: the XDP program
    // then forwards both directions itself (`redirect_*` in the stats below). With Linux's
    // default veth offload the same traffic works through the stack instead (see the tests).
    let topology = SingleNode::build(
        &prefix,
        Offload {
            client_tx: false,
            backend_tx: false,
        },
    )?;
    let backend_servers = echo::start_servers(&topology, UdpChecksum::Computed)?;
    let manifests = workspace_root().join(
        Path::new(echo::EXAMPLE_MANIFEST)
            .parent()
            .context("the example manifest's directory")?,
    );
    std::fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
    let log = workdir.join("agent.log");
    println!(
        "xtask: starting `lb agent --manifests {} --interfaces {}` on the node (log: {})",
        manifests.display(),
        topology.node_interfaces().join(","),
        log.display()
    );
    let interfaces = topology.node_interfaces();
    let mut agent = Agent::spawn(
        &topology.node,
        &AgentOptions {
            lb: lb_path,
            pin_dir: &pin_dir,
            manifests: &manifests,
            interfaces: &interfaces,
            state_dir: &workdir.join("state"),
            log: &log,
            extra_args: &[REDIRECT_VETH],
        },
    )?;
    if let Ok(mut plan) = cleanup.lock() {
        plan.agent_pid = agent.pid();
    }
    agent.wait_ready()?;

    println!("\nxtask: requests from the client ({CLIENT_ADDR}) to the ClusterIP {CLUSTER_IP}");
    exercise("TCP", TCP_FRONTEND, || {
        let mut connection = Connection::open(&topology.client, TCP_FRONTEND)?;
        Ok((connection.request()?, connection.local_addr()?))
    })?;
    exercise("UDP", UDP_FRONTEND, || {
        let socket = echo::udp_socket(&topology.client, UDP_FRONTEND, UdpChecksum::Computed)?;
        Ok((echo::udp_request(&socket)?, socket.local_addr()?))
    })?;

    println!("xtask: $ lb services");
    print!("{}", lb(lb_path, &pin_dir, &["services"])?);
    println!("\nxtask: $ lb stats   (zero counters left out)");
    let stats = lb(lb_path, &pin_dir, &["stats"])?;
    // The frontends' table, whole; then the counters that moved.
    let (services, counters) = stats.split_once("\n\n").unwrap_or((&stats, ""));
    println!("{services}\n");
    for line in counters.lines() {
        if !line.ends_with(" 0") {
            println!("{line}");
        }
    }
    println!(
        "\nxtask: $ lb conntrack --backend {}   (first rows)",
        backend_addr(0)
    );
    let flows = lb(
        lb_path,
        &pin_dir,
        &["conntrack", "--backend", &backend_addr(0).to_string()],
    )?;
    for line in flows.lines().take(DEMO_FLOW_ROWS) {
        println!("{line}");
    }
    println!("\nxtask: $ lb explain --from {CLIENT_ADDR} --to {TCP_FRONTEND}/tcp");
    print!(
        "{}",
        lb_in(
            &topology.node,
            lb_path,
            &pin_dir,
            &[
                "explain",
                "--from",
                &CLIENT_ADDR.to_string(),
                "--to",
                &format!("{TCP_FRONTEND}/tcp")
            ],
        )?
    );

    println!("\nxtask: tearing down");
    agent.stop();
    if let Ok(mut plan) = cleanup.lock() {
        plan.agent_pid = None;
    }
    lb(lb_path, &pin_dir, &["reset"])?;
    drop(backend_servers);
    drop(topology);
    std::fs::remove_dir_all(&workdir).ok();
    if let Ok(mut plan) = cleanup.lock() {
        *plan = Cleanup::default();
    }
    Ok(())
}

/// Runs the demo.
pub fn run() -> anyhow::Result<()> {
    setup::ensure()?;
    run_command(cargo().args(["build", "-p", "lb-userspace"]))?;
    if !lb_tests::privilege::is_root() {
        bail!(
            "the demo loads XDP programs and creates network namespaces: run it as root (`sudo \
             cargo xtask demo`)"
        );
    }
    let lb_path = workspace_root().join("target/debug/lb");
    for stale in leftovers::remove(leftovers::DEMO, Some(&lb_path)) {
        println!(
            "xtask: removed a killed demo's leftovers at {}",
            stale.display()
        );
    }

    let cleanup = Arc::new(Mutex::new(Cleanup::default()));
    let on_signal = cleanup.clone();
    ctrlc::set_handler(move || {
        eprintln!("\nxtask: interrupted; tearing the demo down");
        if let Ok(mut plan) = on_signal.lock() {
            plan.run();
        }
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;

    let result = demo(&lb_path, &cleanup);
    if let Ok(mut plan) = cleanup.lock() {
        // Whatever demo() returned, its Agent guard has stopped and reaped the agent: the pid
        // may already be another process's.
        plan.agent_pid = None;
        // Only does something when the demo failed half-way.
        plan.run();
    }
    result?;
    println!("xtask: demo finished: all three backends answered through the ClusterIP");
    Ok(())
}
