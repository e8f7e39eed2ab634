//! `cargo xtask demo`: lb balancing a ClusterIP across three backends, for real.
//!
//! Builds `lb`, creates a client, a node and three backend namespaces (see
//! `lb_tests::topology`), starts a TCP and a UDP identity server in each backend, runs
//! `lb agent` on the node with the manifests in `examples/`, sends requests from the client to
//! the ClusterIP and prints which backend answered each, prints `lb services`, and tears it all
//! down, also on Ctrl-C or failure.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use lb_tests::{
    agent::{Agent, AgentOptions, REDIRECT_VETH, lb},
    netns::{remove_leftovers, unique_prefix},
    servers::{self, Reply},
    topology::{BACKENDS, CLIENT_ADDR, Offload, SingleNode, backend_addr},
};

use crate::{cargo, run_command, setup, workspace_root};

/// The ClusterIP and ports of `examples/echo.yaml`.
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
/// The backends' container ports, as the example's EndpointSlice lists them.
const BACKEND_TCP_PORT: u16 = 8080;
const BACKEND_UDP_PORT: u16 = 5353;
/// Requests sent before checking that every backend answered...
const MIN_REQUESTS: usize = 9;
/// ...and the most sent while waiting for the last one to appear (all three miss one another
/// with probability below 1e-9 at random selection).
const MAX_REQUESTS: usize = 60;
/// Per-request socket timeout.
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// What to tear down if the demo is interrupted: read by the Ctrl-C handler.
#[derive(Default)]
struct Cleanup {
    namespaces: Vec<String>,
    agent_pid: Option<u32>,
    pin_dir: Option<PathBuf>,
    lb: Option<PathBuf>,
}

impl Cleanup {
    fn run(&mut self) {
        if let Some(pid) = self.agent_pid.take() {
            // SAFETY: signalling the agent process this demo started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if let (Some(lb_path), Some(pin_dir)) = (&self.lb, self.pin_dir.take()) {
            let _ = lb(lb_path, &pin_dir, &["reset"]);
        }
        for name in self.namespaces.drain(..) {
            let _ = lb_tests::netns::run("ip", &["netns", "del", &name]);
        }
    }
}

fn tcp_request(
    client: &lb_tests::netns::Netns,
    index: usize,
) -> anyhow::Result<(Reply, SocketAddr)> {
    let target = SocketAddr::from((CLUSTER_IP, TCP_PORT));
    let stream = client
        .run(|| TcpStream::connect_timeout(&target, IO_TIMEOUT))?
        .with_context(|| format!("connecting to {target}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let local = stream.local_addr()?;
    let peer = stream.peer_addr()?;
    if peer != target {
        bail!("connected to {peer}, expected the ClusterIP {target}");
    }
    (&stream).write_all(format!("request {index}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    Ok((Reply::parse(&line)?, local))
}

fn udp_request(client: &lb_tests::netns::Netns) -> anyhow::Result<(Reply, SocketAddr)> {
    let target = SocketAddr::from((CLUSTER_IP, UDP_PORT));
    let socket = client.run(|| UdpSocket::bind(("0.0.0.0", 0)))??;
    // Connected: the kernel only delivers datagrams whose source is the ClusterIP.
    socket.connect(target)?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    socket.send(b"ping")?;
    let mut buffer = [0u8; 256];
    let length = socket
        .recv(&mut buffer)
        .context("no UDP reply from the ClusterIP")?;
    Ok((
        Reply::parse(std::str::from_utf8(&buffer[..length])?)?,
        socket.local_addr()?,
    ))
}

/// Sends requests until every backend has answered; returns how many each answered.
fn exercise(
    protocol: &str,
    port: u16,
    mut request: impl FnMut(usize) -> anyhow::Result<(Reply, SocketAddr)>,
) -> anyhow::Result<()> {
    let mut answered = [0usize; BACKENDS];
    for index in 0..MAX_REQUESTS {
        let (reply, local) = request(index)?;
        let backend = (0..BACKENDS)
            .find(|b| reply.backend == format!("backend-{}", b + 1))
            .with_context(|| format!("unknown backend {}", reply.backend))?;
        answered[backend] += 1;
        println!(
            "  {protocol} {local} -> {CLUSTER_IP}:{port}: answered by {} ({}), which saw the client as {}",
            reply.backend,
            backend_addr(backend),
            reply.client
        );
        if reply.client.ip() != CLIENT_ADDR {
            bail!(
                "the backend saw {} instead of the client's address",
                reply.client
            );
        }
        if index + 1 >= MIN_REQUESTS && answered.iter().all(|count| *count > 0) {
            println!("  {protocol}: every backend answered ({answered:?} requests each)\n");
            return Ok(());
        }
    }
    bail!("after {MAX_REQUESTS} {protocol} requests not every backend answered: {answered:?}")
}

fn demo(lb_path: &Path, cleanup: &Arc<Mutex<Cleanup>>) -> anyhow::Result<()> {
    let prefix = unique_prefix("lbd");
    let pin_dir = PathBuf::from("/sys/fs/bpf").join(&prefix);
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
    {
        let mut plan = cleanup.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        plan.namespaces = std::iter::once(topology.client.name())
            .chain([topology.node.name()])
            .chain(topology.backends.iter().map(|b| b.name()))
            .map(str::to_owned)
            .collect();
        plan.pin_dir = Some(pin_dir.clone());
        plan.lb = Some(lb_path.to_owned());
    }
    let mut backend_servers = Vec::new();
    for (index, backend) in topology.backends.iter().enumerate() {
        let name = format!("backend-{}", index + 1);
        backend_servers.push(servers::tcp(backend, &name, BACKEND_TCP_PORT)?);
        backend_servers.push(servers::udp(backend, &name, BACKEND_UDP_PORT)?);
    }
    let manifests = workspace_root().join("examples");
    let log = std::env::temp_dir().join(format!("{prefix}-agent.log"));
    println!(
        "xtask: starting `lb agent --manifests {} --interfaces {}` on the node (log: {})",
        manifests.display(),
        topology.node_interfaces().join(","),
        log.display()
    );
    let state_dir = std::env::temp_dir().join(format!("{prefix}-state"));
    let interfaces = topology.node_interfaces();
    let mut agent = Agent::spawn(
        &topology.node,
        &AgentOptions {
            lb: lb_path,
            pin_dir: &pin_dir,
            manifests: &manifests,
            interfaces: &interfaces,
            state_dir: &state_dir,
            log: &log,
            extra_args: &[REDIRECT_VETH],
        },
    )?;
    if let Ok(mut plan) = cleanup.lock() {
        plan.agent_pid = agent.pid();
    }
    agent.wait_ready()?;

    println!("\nxtask: requests from the client ({CLIENT_ADDR}) to the ClusterIP {CLUSTER_IP}");
    exercise("TCP", TCP_PORT, |index| {
        tcp_request(&topology.client, index)
    })?;
    exercise("UDP", UDP_PORT, |_| udp_request(&topology.client))?;

    println!("xtask: $ lb services");
    print!("{}", lb(lb_path, &pin_dir, &["services"])?);
    println!("\nxtask: $ lb stats   (non-zero counters)");
    for line in lb(lb_path, &pin_dir, &["stats"])?.lines() {
        if !line.ends_with(" 0") {
            println!("{line}");
        }
    }

    println!("\nxtask: tearing down");
    agent.stop();
    lb(lb_path, &pin_dir, &["reset"])?;
    drop(backend_servers);
    drop(topology);
    std::fs::remove_file(&log).ok();
    std::fs::remove_dir_all(&state_dir).ok();
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
    for stale in remove_leftovers("lbd") {
        println!(
            "xtask: removing a killed demo's leftovers at {}",
            stale.display()
        );
        let _ = lb(&lb_path, &stale, &["reset"]);
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
        plan.run(); // Only does something when the demo failed half-way.
    }
    result?;
    println!("xtask: demo finished: all three backends answered through the ClusterIP");
    Ok(())
}
