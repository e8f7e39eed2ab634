//! End to end in network namespaces: client -> node -> three backends (the harness's
//! single-node topology), through the last-created Service's ClusterIP, for each contender at
//! each scale. Every contender gets fresh namespaces of its own (a backend's TIME_WAIT socket
//! from a direct connection would otherwise reject the same tuple arriving translated), and the
//! rounds alternate between contenders so that drift of the shared machine hits them all alike.
//!
//! Per round: new connections for a bounded time from concurrent clients (connect, one request
//! line, the reply line, close from the client side so TIME_WAIT stays with the client), with
//! each connection's latency and the whole machine's CPU time; then one iperf3 TCP stream.
//! At the sizes the plan names, rounds of packet rate follow (see [`crate::rate`]).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use lb_tests::{
    agent::{Agent, AgentOptions, REDIRECT_VETH},
    netns::Netns,
    topology::{BACKENDS, Offload, SingleNode, backend_addr},
};

use crate::{
    bpfstats::{self, RunTimeStats},
    rate::{self, Generator},
    results::{Contender, EndToEnd, Memory, PacketRate, Programming, Sample, quantile},
    rules::{iptables, nftables},
    workload::{
        self, HTTP_SERVICE, IPERF_PORT, IPERF_SERVICE, SyntheticService, TARGET_PORT, Traffic,
        UDP_SERVICE,
    },
};

/// Endpoints per Service.
const ENDPOINTS: usize = BACKENDS;
/// Accepting threads per backend server: connections are short, a small pool keeps up.
const SERVER_THREADS: usize = 4;
/// How often blocked loops look at their stop flag.
const POLL: Duration = Duration::from_millis(20);
/// A connection attempt or read that takes longer than this counts as failed.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// What a client sends and a backend answers.
const REQUEST: &[u8] = b"GET\n";
const REPLY: &[u8] = b"OK\n";
/// The client's ephemeral ports: wide, and TIME_WAIT ports reused, so that a run of tens of
/// thousands of connections never waits for a free port.
const CLIENT_PORT_RANGE: &str = "1024 65535";
/// iperf3's bound on connecting: a dropped SYN fails the run instead of hanging it (the test
/// itself is bounded by `-t`).
const IPERF_CONNECT_TIMEOUT_MS: u32 = 2_000;
/// The share of a round's load duration spent again with BPF run-time statistics on, for lb's
/// in-situ cost (kept out of the main run: statistics add two clock reads per packet).
const IN_SITU_SHARE: u32 = 3;
/// How often, and how long, to look for an endpoint change in lb's maps.
const CHANGE_POLL: Duration = Duration::from_micros(200);
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// How much to measure.
#[derive(Clone, Debug)]
pub struct E2ePlan {
    pub services: Vec<usize>,
    pub contenders: Vec<Contender>,
    pub rounds: usize,
    /// Length of one connection-rate run.
    pub load_duration: Duration,
    /// Concurrent clients.
    pub clients: usize,
    /// Length of one iperf3 run, whole seconds.
    pub iperf_seconds: u32,
    /// Times one endpoint is changed in each loaded rule set.
    pub changes: usize,
    /// The sizes (among `services`) at which packet rate is measured too.
    pub rate_services: Vec<usize>,
    /// Length of one packet-rate run.
    pub rate_duration: Duration,
    /// Cold loads of the Services per contender (the figure is their median).
    pub loads: usize,
    /// nftables mode is loaded once above this many Services: one load of 30,000 takes about two
    /// minutes, and repeating it would break the run's time budget.
    pub nft_repeated_loads_max_services: usize,
}

/// A pooled server of the bench protocol: read the request line, answer, wait for the client
/// to close, close. Its threads block in `accept` (the kernel wakes exactly one per
/// connection, no polling delay); stopping shuts the listener down, which wakes them all.
struct Server {
    stop: Arc<AtomicBool>,
    listener: Arc<TcpListener>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // SAFETY: a valid listening socket; shutdown makes every blocked accept return.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn serve(stream: TcpStream) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    (&stream).write_all(REPLY)?;
    // The client closes first; reading its FIN keeps TIME_WAIT on its side.
    line.clear();
    reader.read_until(b'\n', &mut line)?;
    Ok(())
}

impl Server {
    fn start(netns: &Netns, port: u16) -> anyhow::Result<Self> {
        let listener = netns
            .run(|| TcpListener::bind(("0.0.0.0", port)))?
            .with_context(|| format!("binding port {port} in {}", netns.name()))?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..SERVER_THREADS)
            .map(|_| {
                let listener = Arc::clone(&listener);
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((stream, _)) => {
                                let _ = serve(stream);
                            }
                            // Out of descriptors or memory for a moment: back off briefly.
                            Err(_) => std::thread::sleep(POLL),
                        }
                    }
                })
            })
            .collect();
        Ok(Self {
            stop,
            listener,
            threads,
        })
    }
}

/// A child process killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One contender's topology, servers and loaded rules (or agent).
struct Stage {
    contender: Contender,
    _servers: Vec<Server>,
    _iperf: Process,
    agent: Option<Agent>,
    pin_dir: PathBuf,
    workdir: PathBuf,
    /// Where the clients connect: the traffic Service, or a backend for `Direct`.
    target: SocketAddr,
    iperf_target: SocketAddr,
    /// The packet generator, at the sizes where packet rate is measured.
    generator: Option<Generator>,
    /// Cold loads of the Services (the first when the stage was built), milliseconds.
    load_ms: Vec<f64>,
    change_ms: Vec<f64>,
    /// Last: fields drop in order, and the namespaces must outlive the servers in them.
    topology: SingleNode,
}

impl Drop for Stage {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.stop();
        }
        if self.contender == Contender::Lb {
            let _ = lb::dataplane::reset(&self.pin_dir);
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
        let _ = std::fs::remove_dir_all(&self.workdir);
    }
}

/// The whole machine's busy CPU time so far, seconds (every CPU, all of /proc/stat's busy
/// columns: user, nice, system, irq, softirq, steal).
fn busy_cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().unwrap_or_default())
        .collect();
    // user nice system idle iowait irq softirq steal
    const BUSY: [usize; 6] = [0, 1, 2, 5, 6, 7];
    let ticks: u64 = BUSY.iter().filter_map(|index| fields.get(*index)).sum();
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(ticks as f64 / ticks_per_second as f64)
}

/// What one connection-rate run saw.
struct Load {
    connections: u64,
    failures: u64,
    rate: f64,
    latencies_us: Vec<f64>,
    cpu_us_per_connection: f64,
}

fn one_connection(target: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(REQUEST)?;
    let mut reply = [0u8; 3];
    std::io::Read::read_exact(&mut stream, &mut reply)?;
    if reply != REPLY {
        return Err(std::io::Error::other("unexpected reply"));
    }
    Ok(())
}

fn run_load(
    client: &Netns,
    target: SocketAddr,
    duration: Duration,
    clients: usize,
) -> anyhow::Result<Load> {
    let cpu_before = busy_cpu_seconds()?;
    let started = Instant::now();
    let deadline = started + duration;
    let per_client = client.run(|| {
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..clients)
                .map(|_| {
                    // Threads inherit the network namespace of the thread that creates them.
                    scope.spawn(move || {
                        let mut latencies = Vec::new();
                        let mut failures = 0u64;
                        while Instant::now() < deadline {
                            let begin = Instant::now();
                            match one_connection(target) {
                                Ok(()) => latencies.push(begin.elapsed().as_secs_f64() * 1e6),
                                Err(_) => failures += 1,
                            }
                        }
                        (latencies, failures)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|worker| worker.join().unwrap_or_default())
                .collect::<Vec<_>>()
        })
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = busy_cpu_seconds()? - cpu_before;
    let mut latencies_us = Vec::new();
    let mut failures = 0;
    for (latencies, failed) in per_client {
        latencies_us.extend(latencies);
        failures += failed;
    }
    let connections = latencies_us.len() as u64;
    Ok(Load {
        connections,
        failures,
        rate: connections as f64 / elapsed,
        cpu_us_per_connection: cpu * 1e6 / connections.max(1) as f64,
        latencies_us,
    })
}

/// One iperf3 TCP stream from the client, Gbit/s.
fn run_iperf(client: &Netns, target: SocketAddr, seconds: u32) -> anyhow::Result<f64> {
    let output = client.exec(
        "iperf3",
        &[
            "-c",
            &target.ip().to_string(),
            "-p",
            &target.port().to_string(),
            "-t",
            &seconds.to_string(),
            "--connect-timeout",
            &IPERF_CONNECT_TIMEOUT_MS.to_string(),
            "-J",
        ],
    )?;
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let bits = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 reported no received throughput")?;
    Ok(bits / 1e9)
}

impl Stage {
    fn build(
        contender: Contender,
        prefix: &str,
        services: &[SyntheticService],
        lb_bin: &Path,
        with_rate: bool,
    ) -> anyhow::Result<Self> {
        let name = format!("{prefix}-{}", contender_tag(contender));
        let topology = SingleNode::build(&name, Offload::default())?;
        topology
            .client
            .sysctl("ipv4.ip_local_port_range", CLIENT_PORT_RANGE)?;
        topology.client.sysctl("ipv4.tcp_tw_reuse", "1")?;
        let servers = topology
            .backends
            .iter()
            .map(|backend| Server::start(backend, TARGET_PORT))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut iperf_command = topology.backends[0].command("iperf3")?;
        iperf_command
            .args(["-s", "-p", &IPERF_PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe. A killed benchmark must not leave the server
        // running: the kernel kills it when the thread that started it exits.
        unsafe {
            iperf_command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let iperf = Process(topology.backends[0].spawn(&mut iperf_command)?);
        let traffic = workload::named(services, HTTP_SERVICE)?;
        let iperf_service = workload::named(services, IPERF_SERVICE)?;
        let workdir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&workdir)?;
        let pin_dir = lb_tests::agent::pin_dir(&name);
        let mut stage = Self {
            contender,
            topology,
            _servers: servers,
            _iperf: iperf,
            agent: None,
            pin_dir,
            workdir,
            target: SocketAddr::V4(SocketAddrV4::new(traffic.cluster_ip, traffic.port)),
            iperf_target: SocketAddr::V4(SocketAddrV4::new(
                iperf_service.cluster_ip,
                iperf_service.port,
            )),
            generator: None,
            load_ms: Vec::new(),
            change_ms: Vec::new(),
        };
        if contender == Contender::Direct {
            stage.target = SocketAddr::V4(SocketAddrV4::new(backend_addr(0), TARGET_PORT));
            stage.iperf_target = SocketAddr::V4(SocketAddrV4::new(backend_addr(0), IPERF_PORT));
        } else {
            let elapsed = stage.load(services, lb_bin)?;
            stage.load_ms.push(elapsed.as_secs_f64() * 1e3);
        }
        if with_rate {
            let target = if contender == Contender::Direct {
                SocketAddrV4::new(backend_addr(0), TARGET_PORT)
            } else {
                let udp = workload::named(services, UDP_SERVICE)?;
                SocketAddrV4::new(udp.cluster_ip, udp.port)
            };
            stage.generator = Some(Generator::new(
                &stage.topology,
                target,
                TARGET_PORT,
                &stage.workdir,
            )?);
        }
        // One connection must work before anything is measured.
        let target = stage.target;
        stage
            .topology
            .client
            .run(|| one_connection(target))?
            .with_context(|| format!("{}: no connection to {target}", contender.label()))?;
        Ok(stage)
    }

    /// Loads `services` from nothing and returns how long it took: lb from `lb agent`'s start to
    /// ready (the YAML read included), the rule sets from the tool's start to its exit. Whatever
    /// an earlier load left is removed first, untimed.
    fn load(&mut self, services: &[SyntheticService], lb_bin: &Path) -> anyhow::Result<Duration> {
        let node = &self.topology.node;
        match self.contender {
            Contender::Lb => {
                if let Some(mut agent) = self.agent.take() {
                    agent.stop();
                }
                lb::dataplane::reset(&self.pin_dir)?;
                let state = self.workdir.join("state");
                if state.exists() {
                    std::fs::remove_dir_all(&state)?;
                }
                let manifests = self.workdir.join("manifests");
                std::fs::create_dir_all(&manifests)?;
                std::fs::write(
                    manifests.join("services.yaml"),
                    workload::manifests_yaml(services)?,
                )?;
                let started = Instant::now();
                let agent = Agent::start(
                    node,
                    &AgentOptions {
                        lb: lb_bin,
                        pin_dir: &self.pin_dir,
                        manifests: &manifests,
                        interfaces: &self.topology.node_interfaces(),
                        state_dir: &state,
                        log: &self.workdir.join("agent.log"),
                        extra_args: &[REDIRECT_VETH],
                    },
                )?;
                let elapsed = started.elapsed();
                self.agent = Some(agent);
                Ok(elapsed)
            }
            Contender::Iptables => {
                iptables::clear(node)?;
                iptables::load(node, &iptables::ruleset(services), false)
            }
            Contender::Nftables => {
                nftables::clear(node)?;
                nftables::load(node, &nftables::ruleset(services))
            }
            Contender::Direct => Ok(Duration::ZERO),
        }
    }

    /// Replaces one endpoint of the first Service `changes` times, timing each change until it
    /// is in force: rule sets until the tool returns, lb until the map holds the new endpoint.
    /// Run after the traffic rounds, since the first Service may be one that carries traffic.
    fn measure_changes(
        &mut self,
        services: &[SyntheticService],
        changes: usize,
    ) -> anyhow::Result<()> {
        let mut current = services.to_vec();
        for change in changed_versions(services, changes) {
            let node = &self.topology.node;
            let elapsed = match self.contender {
                Contender::Iptables => {
                    iptables::load(node, &iptables::change_endpoint(&current, &change), true)?
                }
                Contender::Nftables => {
                    nftables::load(node, &[nftables::change_endpoint(&current, &change)])?
                }
                Contender::Lb => self.lb_change(&current, &change)?,
                Contender::Direct => return Ok(()),
            };
            self.change_ms.push(elapsed.as_secs_f64() * 1e3);
            let index = change.index;
            current[index] = change;
        }
        Ok(())
    }

    /// Rewrites the manifests with `change` and waits until lb's maps serve its endpoints.
    fn lb_change(
        &self,
        current: &[SyntheticService],
        change: &SyntheticService,
    ) -> anyhow::Result<Duration> {
        let mut next = current.to_vec();
        next[change.index] = change.clone();
        let yaml = workload::manifests_yaml(&next)?;
        let manifests = self.workdir.join("manifests");
        let temporary = self.workdir.join("services.yaml.tmp");
        std::fs::write(&temporary, yaml)?;
        let maps = lb::dataplane::maps::ServiceMaps::open(&self.pin_dir)?;
        let key = lb_common::service::ServiceKey {
            addr: u32::from_ne_bytes(change.cluster_ip.octets()),
            port: change.port.to_be(),
            proto: change.protocol.number(),
            _pad: 0,
        };
        let wanted: Vec<u32> = change
            .endpoints
            .iter()
            .map(|addr| u32::from_ne_bytes(addr.octets()))
            .collect();
        let started = Instant::now();
        // A rename is atomic: the agent never reads half a file.
        std::fs::rename(&temporary, manifests.join("services.yaml"))?;
        loop {
            if frontend_backends(&maps, &key).is_ok_and(|mut found| {
                found.sort_unstable();
                let mut wanted = wanted.clone();
                wanted.sort_unstable();
                found == wanted
            }) {
                return Ok(started.elapsed());
            }
            ensure!(
                started.elapsed() < CHANGE_TIMEOUT,
                "lb did not apply an endpoint change within {CHANGE_TIMEOUT:?}"
            );
            std::thread::sleep(CHANGE_POLL);
        }
    }

    /// lb's drop counters (empty for the other contenders).
    fn lb_drop_counters(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        if self.contender != Contender::Lb {
            return Ok(BTreeMap::new());
        }
        Ok(lb::dataplane::maps::read_counters(&self.pin_dir)?
            .into_iter()
            .filter(|(counter, _)| counter.kind() == lb_common::stats::CounterKind::Drop)
            .map(|(counter, value)| (counter.name().to_owned(), value))
            .collect())
    }

    /// The id of lb's program, from the pinned link on the client-facing interface.
    fn lb_program_id(&self) -> anyhow::Result<Option<u32>> {
        if self.contender != Contender::Lb {
            return Ok(None);
        }
        let link = self
            .pin_dir
            .join(lb_common::limits::LINKS_SUBDIR)
            .join(lb_tests::topology::NODE_CLIENT_INTERFACE);
        Ok(Some(bpfstats::linked_program_id(&link)?))
    }
}

/// The backend addresses (network byte order) `key` is served by, as the maps hold them.
fn frontend_backends(
    maps: &lb::dataplane::maps::ServiceMaps,
    key: &lb_common::service::ServiceKey,
) -> anyhow::Result<Vec<u32>> {
    let value = maps.services.get(key, 0)?;
    (0..value.backend_count)
        .map(|slot| {
            let id = maps.slots.get(
                &lb_common::service::SlotKey {
                    backend_set: value.backend_set,
                    slot,
                },
                0,
            )?;
            Ok(maps.backends.get(&id, 0)?.addr)
        })
        .collect()
}

/// `count` versions of the first Service with one endpoint replaced each time, as a rolling
/// update would.
fn changed_versions(services: &[SyntheticService], count: usize) -> Vec<SyntheticService> {
    (0..count)
        .map(|version| {
            let mut changed = services[0].clone();
            let replaced = changed.endpoints.len() - 1;
            changed.endpoints[replaced] =
                Ipv4Addr::new(10, 127, (version / 250) as u8, (version % 250 + 1) as u8);
            changed
        })
        .collect()
}

fn contender_tag(contender: Contender) -> &'static str {
    match contender {
        Contender::Lb => "lb",
        Contender::Iptables => "ipt",
        Contender::Nftables => "nft",
        Contender::Direct => "dir",
    }
}

/// Measurements of one contender across the rounds.
#[derive(Default)]
struct Rounds {
    rate: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    cpu: Vec<f64>,
    iperf: Vec<f64>,
    in_situ: Vec<f64>,
    failures: u64,
    sent_pps: Vec<f64>,
    forwarded_pps: Vec<f64>,
}

/// Rounds of packet rate over `stages`, each round starting with another contender; every
/// contender passes the generator's check first.
fn rate_rounds(
    stages: &[Stage],
    measured: &mut [Rounds],
    plan: &E2ePlan,
    progress: &dyn Fn(&str),
) -> anyhow::Result<()> {
    for stage in stages {
        let Some(generator) = &stage.generator else {
            continue;
        };
        let backends = if stage.contender == Contender::Direct {
            1
        } else {
            ENDPOINTS
        };
        generator
            .check(&stage.topology, backends)
            .with_context(|| format!("{}: the packet-rate check", stage.contender.label()))?;
    }
    for round in 0..plan.rounds {
        progress(&format!("packet rate: round {}", round + 1));
        for offset in 0..stages.len() {
            let index = (round + offset) % stages.len();
            let stage = &stages[index];
            let Some(generator) = &stage.generator else {
                continue;
            };
            let rate = generator
                .measure(&stage.topology, plan.rate_duration)
                .with_context(|| format!("{}: packet rate", stage.contender.label()))?;
            measured[index].sent_pps.push(rate.offered_pps);
            measured[index].forwarded_pps.push(rate.forwarded_pps);
        }
    }
    Ok(())
}

/// Runs the end-to-end plan. Returns the end-to-end rows and the rule-set load timings.
pub fn run(
    plan: &E2ePlan,
    prefix: &str,
    lb_bin: &Path,
    progress: &dyn Fn(&str),
) -> anyhow::Result<E2eResults> {
    let mut results = E2eResults::default();
    for &count in &plan.services {
        let services = workload::services(count, ENDPOINTS, Traffic::All);
        let with_rate = plan.rate_services.contains(&count);
        let mut stages = Vec::new();
        for &contender in &plan.contenders {
            progress(&format!(
                "end to end: {count} Services, loading {}",
                contender.label()
            ));
            let stage = Stage::build(
                contender,
                &format!("{prefix}-{count}"),
                &services,
                lb_bin,
                with_rate,
            )?;
            progress(&format!(
                "end to end: {} loaded in {:.0} ms",
                contender.label(),
                stage.load_ms.first().copied().unwrap_or_default()
            ));
            stages.push(stage);
        }
        let mut measured: Vec<Rounds> = stages.iter().map(|_| Rounds::default()).collect();
        let drops_before: Vec<_> = stages
            .iter()
            .map(Stage::lb_drop_counters)
            .collect::<anyhow::Result<_>>()?;
        for round in 0..plan.rounds {
            progress(&format!(
                "end to end: {count} Services, round {}",
                round + 1
            ));
            // Each round starts with another contender, so none always runs first.
            let order: Vec<usize> = (0..stages.len())
                .map(|offset| (round + offset) % stages.len())
                .collect();
            for index in order {
                let stage = &stages[index];
                let rounds = &mut measured[index];
                let mut load = run_load(
                    &stage.topology.client,
                    stage.target,
                    plan.load_duration,
                    plan.clients,
                )?;
                if let Some(id) = stage.lb_program_id()? {
                    let stats = RunTimeStats::enable()?;
                    let before = bpfstats::program_runs(id)?;
                    run_load(
                        &stage.topology.client,
                        stage.target,
                        plan.load_duration / IN_SITU_SHARE,
                        plan.clients,
                    )?;
                    let after = bpfstats::program_runs(id)?;
                    drop(stats);
                    if let Some(ns) = after.ns_per_run_since(&before) {
                        rounds.in_situ.push(ns);
                    }
                }
                ensure!(
                    load.connections > 0,
                    "{}: no connection succeeded",
                    stage.contender.label()
                );
                rounds.rate.push(load.rate);
                rounds.p50.push(quantile(&mut load.latencies_us, 0.5));
                rounds.p99.push(quantile(&mut load.latencies_us, 0.99));
                rounds.cpu.push(load.cpu_us_per_connection);
                rounds.failures += load.failures;
                rounds.iperf.push(run_iperf(
                    &stage.topology.client,
                    stage.iperf_target,
                    plan.iperf_seconds,
                )?);
            }
        }
        let mut lb_drops = Vec::new();
        for (stage, before) in stages.iter().zip(&drops_before) {
            let after = stage.lb_drop_counters()?;
            lb_drops.push(
                after
                    .into_iter()
                    .map(|(name, value)| {
                        let moved = value.saturating_sub(before.get(&name).copied().unwrap_or(0));
                        (name, moved)
                    })
                    .filter(|(_, moved)| *moved > 0)
                    .collect::<Vec<_>>(),
            );
        }
        if with_rate {
            rate_rounds(&stages, &mut measured, plan, progress)?;
        }
        for stage in &mut stages {
            stage.measure_changes(&services, plan.changes)?;
            if let Some(agent) = &stage.agent {
                let maps = crate::memory::pinned_maps(&stage.pin_dir)?;
                results.memory.push(Memory {
                    services: count,
                    endpoints_per_service: ENDPOINTS,
                    agent_rss_mib: crate::memory::resident_mib(
                        agent.pid().context("the agent is not running")?,
                    )?,
                    map_memlock_mib: maps.iter().map(|(_, mib)| mib).sum(),
                    maps,
                });
            }
        }
        // More cold loads, each round starting with another contender.
        for round in 1..plan.loads {
            progress(&format!("end to end: {count} Services, load {}", round + 1));
            let contenders = stages.len();
            for offset in 0..contenders {
                let stage = &mut stages[(round + offset) % contenders];
                let skip = stage.contender == Contender::Direct
                    || (stage.contender == Contender::Nftables
                        && count > plan.nft_repeated_loads_max_services);
                if !skip {
                    let elapsed = stage.load(&services, lb_bin)?;
                    stage.load_ms.push(elapsed.as_secs_f64() * 1e3);
                }
            }
        }
        for ((stage, rounds), lb_drops) in stages.iter().zip(measured).zip(lb_drops) {
            if !rounds.forwarded_pps.is_empty() {
                results.packet_rate.push(PacketRate {
                    contender: stage.contender,
                    services: count,
                    flows: usize::from(rate::FLOWS),
                    sent_pps: Sample::from_rounds(rounds.sent_pps),
                    forwarded_pps: Sample::from_rounds(rounds.forwarded_pps),
                });
            }
            results.end_to_end.push(EndToEnd {
                contender: stage.contender,
                services: count,
                connections_per_second: Sample::from_rounds(rounds.rate),
                latency_p50_us: Sample::from_rounds(rounds.p50),
                latency_p99_us: Sample::from_rounds(rounds.p99),
                cpu_us_per_connection: Sample::from_rounds(rounds.cpu),
                iperf_gbps: Sample::from_rounds(rounds.iperf),
                in_situ_ns_per_packet: (!rounds.in_situ.is_empty())
                    .then(|| Sample::from_rounds(rounds.in_situ)),
                failed_connections: rounds.failures,
                lb_drops,
            });
            if stage.contender != Contender::Direct {
                results.programming.push(Programming {
                    contender: stage.contender,
                    services: count,
                    endpoints_per_service: ENDPOINTS,
                    load_ms: Sample::from_rounds(stage.load_ms.clone()),
                    change_ms: Sample::from_rounds(stage.change_ms.clone()),
                });
            }
        }
        drop(stages);
    }
    Ok(results)
}

/// What the end-to-end section measured.
#[derive(Default)]
pub struct E2eResults {
    pub end_to_end: Vec<EndToEnd>,
    pub programming: Vec<Programming>,
    pub memory: Vec<Memory>,
    pub packet_rate: Vec<PacketRate>,
}
