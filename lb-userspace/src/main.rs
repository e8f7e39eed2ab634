//! The `lb` command line.

use std::{
    io::IsTerminal as _, ops::RangeInclusive, path::PathBuf, process::ExitCode, time::Duration,
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use lb::{
    agent::{AgentOptions, Source, run},
    dataplane::{self, VethRedirect, maps::Capacities},
    inspect::{
        backends::{backend_rows, backends_table},
        conntrack::{BackendFilter, FlowFilter, flow_rows, flows_table, flush},
        explain::{Client, Destination, Request, explain, explanation_text},
        plan::{PlanOptions, plan, plan_table},
        services::{ServiceFilter, service_rows, services_table},
        traffic::{rates, rates_table, read_stats, stats_table},
    },
    node::{Ipv4Cidr, NodePortAddresses, dataplane_config, host_name, parse_port_range},
};

/// The agent's `--state-dir` default, where `lb plan` finds its node settings.
const DEFAULT_STATE_DIR: &str = "/var/lib/lb";

/// `lb plan`'s exit status when the maps differ from the objects (0: in sync), as `diff` has it.
const EXIT_DRIFT: u8 = 1;
/// `lb plan`'s exit status when it could not compare (as `diff`'s "trouble"), so that a script
/// tells drift from failure.
const EXIT_PLAN_FAILED: u8 = 2;

fn parse_addresses(text: &str) -> anyhow::Result<Vec<std::net::Ipv4Addr>> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            item.parse()
                .map_err(|_| anyhow::anyhow!("{item:?} is not an IPv4 address"))
        })
        .collect()
}

fn parse_cidr(text: &str) -> anyhow::Result<Ipv4Cidr> {
    text.parse()
}

fn parse_interface_pattern(text: &str) -> anyhow::Result<String> {
    dataplane::links::Pattern::parse(text)?;
    Ok(text.to_owned())
}
use tracing_subscriber::EnvFilter;

/// An eBPF/XDP Service load balancer for Kubernetes.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Where the maps and XDP links are pinned (on bpffs).
    #[arg(long, global = true, default_value = lb_common::limits::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Log filter (RUST_LOG syntax), e.g. `info` or `lb=debug`; RUST_LOG wins when set.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the XDP program and program the maps from the Kubernetes API (in-cluster, or
    /// `--kubeconfig`) or from a directory of manifests, following changes until stopped. The
    /// dataplane keeps running after the agent stops.
    ///
    /// Example: lb agent --manifests /etc/lb/manifests --interfaces eth0,veth*
    Agent {
        /// Directory of Service and EndpointSlice YAML, as `kubectl apply -f DIR` takes,
        /// instead of the Kubernetes API.
        #[arg(long, conflicts_with = "kubeconfig")]
        manifests: Option<PathBuf>,
        /// Kubeconfig file to reach the API server with; default: the in-cluster configuration
        /// (the pod's service account). Ignored with `--manifests`.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Interfaces to attach to, comma separated: names, which must exist at start-up, and
        /// globs (`*`, `?`, `[...]`, e.g. `eth0,veth*`), which may match nothing yet. Interfaces
        /// are followed as they come, go and get renamed (pods' veths). A glob never matches
        /// loopback.
        #[arg(long, value_delimiter = ',', required = true, value_parser = parse_interface_pattern)]
        interfaces: Vec<String>,
        /// Seconds between full re-reads of the directory (with the API: of the node's
        /// addresses), on top of change notifications.
        #[arg(long, default_value_t = 30)]
        resync_seconds: u64,
        /// Directory where the agent keeps the last good version of every object, so that an
        /// object broken at start-up keeps its entries across a restart.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Also redirect from XDP into veth interfaces. Only safe when every attached veth's
        /// peer has GRO enabled or an XDP program (else the kernel drops the redirected frames);
        /// without it, packets towards veths take the kernel stack.
        #[arg(long)]
        xdp_redirect_veth: bool,
        /// Flows the conntrack map can track (two entries each, about 112 bytes per entry,
        /// preallocated). Beyond it the least recently used flows are forgotten. Changing it on
        /// a node with pinned maps needs `lb reset` first.
        #[arg(long, default_value_t = lb_common::limits::MAX_CONNTRACK / lb_common::limits::CONNTRACK_ENTRIES_PER_FLOW)]
        conntrack_flows: u32,
        /// Service frontends the maps hold (a frontend: one Service port on one address:
        /// ClusterIP, each node address for a NodePort, each load balancer IP and externalIP).
        /// A frontend beyond it is not programmed: an error names the map, `lb services` flags
        /// it and `lb_map_refused_frontends` counts it. Needs `lb reset` to change on a node with
        /// pinned maps.
        #[arg(long, default_value_t = lb_common::limits::MAX_SERVICES)]
        max_services: u32,
        /// Backends the maps hold (one per frontend and endpoint; a frontend keeps its old
        /// endpoints when the new ones do not fit). Needs `lb reset` to change.
        #[arg(long, default_value_t = lb_common::limits::MAX_BACKENDS)]
        max_backends: u32,
        /// (client, frontend) pairs session affinity remembers; the least recently used are
        /// forgotten first. Needs `lb reset` to change.
        #[arg(long, default_value_t = lb_common::limits::MAX_AFFINITY)]
        affinity_entries: u32,
        /// Serve NodePorts only on the node's addresses inside these prefixes (comma separated,
        /// e.g. 10.0.0.0/8), or `primary`: the InternalIPs of this node's Node object (Kubernetes
        /// source only), as kube-proxy's flag of the same name; default: every address of the
        /// node except loopback.
        #[arg(long, default_value = "", hide_default_value = true)]
        nodeport_addresses: NodePortAddresses,
        /// The range nodePorts come from, as the API server's flag of the same name; a
        /// nodePort outside it is not served.
        #[arg(long, default_value = "30000-32767", value_parser = parse_port_range)]
        service_node_port_range: RangeInclusive<u16>,
        /// This node's name, as EndpointSlices give it in `endpoints[].nodeName`: which
        /// endpoints are local for `internalTrafficPolicy`/`externalTrafficPolicy: Local`.
        /// Default: the host name.
        #[arg(long)]
        node_name: Option<String>,
        /// The cluster's service CIDRs (comma separated, e.g. 10.96.0.0/12), as the API server's
        /// `--service-cluster-ip-range`: TCP and UDP to an address inside them that no Service
        /// holds is dropped (`drop_unallocated_service_ip`), as kube-proxy's nftables mode does.
        /// Default: none, such traffic is left to the kernel.
        #[arg(long, value_delimiter = ',', value_parser = parse_cidr)]
        service_cidr: Vec<Ipv4Cidr>,
        /// ICMP port unreachable answers (rejects) each CPU sends per second at most; beyond it
        /// they are dropped (`drop_reject_rate_limited`). 0: no limit.
        #[arg(long, default_value_t = lb_common::config::DEFAULT_REJECTS_PER_SECOND)]
        reject_rate: u32,
        /// The cgroup (v2) directory whose processes' sockets reach Services through the socket
        /// hooks: a process on the node connecting to a ClusterIP or to a NodePort of the node
        /// gets a backend at connect() time. Default: the root of the cgroup v2 hierarchy (every
        /// process of the node).
        #[arg(long)]
        socket_cgroup: Option<PathBuf>,
        /// Leave the node's own sockets alone (no socket hooks; hooks of an earlier agent are
        /// removed).
        #[arg(long)]
        no_socket_hooks: bool,
        /// Where to serve `/healthz` (live) and `/readyz` (ready after the first full sync),
        /// over HTTP.
        #[arg(long, default_value = lb::health::DEFAULT_HEALTH_ADDRESS)]
        health_address: std::net::SocketAddr,
        /// Where to serve Prometheus metrics (`GET /metrics`, OpenMetrics text): datapath
        /// counters, map occupancy against capacity, programming latency, write errors.
        #[arg(long, default_value = lb::metrics::DEFAULT_METRICS_ADDRESS)]
        metrics_address: std::net::SocketAddr,
    },
    /// List the Service frontends the dataplane holds (from the pinned maps; works while the
    /// agent is down): Service type, which address the frontend is (ClusterIP, ExternalIP,
    /// LoadBalancer, NodePort), internal/external traffic policies, the endpoints of the Service
    /// port that are ready / serving / terminating, the generation programmed, and the
    /// endpoints new flows go to.
    ///
    /// Example: lb services -n default web
    ///
    /// Example: lb services -o json
    Services {
        /// Only the Services of this namespace.
        #[arg(short, long)]
        namespace: Option<String>,
        /// Only the Service of this name.
        name: Option<String>,
        /// The agent's state directory, where it lists the frontends it could not program for
        /// lack of room in a map (flagged, or listed as not programmed).
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// List a Service's backends as the dataplane holds them, frontend by frontend: backend id,
    /// slot (or draining: no new flows), the endpoint's conditions, local or remote, and its
    /// live flows (from the pinned maps and conntrack; works while the agent is down).
    ///
    /// Example: lb backends default/web
    Backends {
        /// The Service, as NAMESPACE/NAME.
        service: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Compare what the Service and EndpointSlice objects ask for with what the pinned maps
    /// hold, per frontend: missing, extra or stale, and why. Exit status 0 in sync, 1 on drift,
    /// 2 when the comparison failed. The desired state is computed with the agent's own
    /// function, from the agent's source and node settings as it recorded them in its
    /// --state-dir; flags override them.
    ///
    /// Example: lb plan
    ///
    /// Example: lb plan --manifests /etc/lb/manifests -o json
    Plan {
        /// Read the objects from this directory of manifests (default: the agent's source).
        #[arg(long, conflicts_with = "kubeconfig")]
        manifests: Option<PathBuf>,
        /// Read the objects from the API server of this kubeconfig (default: the agent's
        /// source).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// The agent's state directory, where it records its node settings.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Override the recorded node name.
        #[arg(long)]
        node_name: Option<String>,
        /// Override the recorded zone (of the node's Node object).
        #[arg(long)]
        zone: Option<String>,
        /// Override the recorded NodePort addresses: the node's addresses themselves, comma
        /// separated (e.g. 10.0.0.1,192.168.1.5), not prefixes.
        #[arg(long, value_parser = parse_addresses)]
        nodeport_addresses: Option<Vec<std::net::Ipv4Addr>>,
        /// Override the recorded node port range (LOW-HIGH).
        #[arg(long, value_parser = parse_port_range)]
        service_node_port_range: Option<RangeInclusive<u16>>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Show the traffic of every Service frontend (packets and bytes both ways, new flows,
    /// refused packets) and the datapath's counters (packets by verdict, drop reason and event);
    /// with --watch, what moved per second.
    ///
    /// Example: lb stats
    ///
    /// Example: lb stats --watch --interval 5
    Stats {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        /// Print rates every --interval seconds until interrupted (or --count times).
        #[arg(long)]
        watch: bool,
        /// Seconds between two readings of --watch.
        #[arg(long, default_value_t = 1.0, requires = "watch")]
        interval: f64,
        /// Stop --watch after this many reports.
        #[arg(long, requires = "watch")]
        count: Option<u32>,
    },
    /// Run the live program on a synthesized packet (BPF_PROG_TEST_RUN, against the live maps)
    /// and say what it decides: the Service and port matched, the policy branch (tracked flow,
    /// affinity, random choice, source ranges), the candidates, the backend, the packet as sent
    /// on, and the verdict or drop reason. Nothing live changes: no conntrack or affinity entry
    /// is created and no counter moves.
    ///
    /// Example: lb explain --from 10.0.0.2 --to 10.96.0.10:80/tcp
    ///
    /// Example: lb explain --from 10.0.0.2:40000 --to 192.168.1.10:30080/udp --iface eth0
    Explain {
        /// The client: IP, or IP:PORT to explain an existing flow (default port 60999).
        #[arg(long)]
        from: Client,
        /// The destination: IP:PORT/PROTO, PROTO tcp (default) or udp.
        #[arg(long)]
        to: Destination,
        /// The interface the packet arrives on (default: the attached one on the client's subnet,
        /// else the first attached one).
        #[arg(long)]
        iface: Option<String>,
        /// A TCP packet of an established connection (ACK) rather than a connection's first
        /// (SYN): a SYN on a closed tuple starts a new flow.
        #[arg(long)]
        established: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// List the flows the dataplane tracks: client, frontend, backend, source NAT, state, age
    /// (from the pinned conntrack map; works while the agent is down).
    ///
    /// Example: lb conntrack --service default/web --backend 10.1.1.2
    ///
    /// Example: lb conntrack flush --service default/web
    Conntrack {
        #[command(subcommand)]
        action: Option<ConntrackAction>,
        #[command(flatten)]
        filter: FlowSelection,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Detach the XDP program from every interface and delete the pinned maps. Stop the agent
    /// first. Traffic to Services stops being translated.
    ///
    /// Example: lb reset --pin-dir /sys/fs/bpf/lb
    Reset,
}

/// Which flows `lb conntrack` is about.
#[derive(Args, Clone, Debug)]
struct FlowSelection {
    /// Only the flows of this Service (NAMESPACE/NAME).
    #[arg(long)]
    service: Option<String>,
    /// Only the flows given this backend (IP or IP:PORT).
    #[arg(long)]
    backend: Option<BackendFilter>,
}

impl From<FlowSelection> for FlowFilter {
    fn from(selection: FlowSelection) -> Self {
        Self {
            service: selection.service,
            backend: selection.backend,
        }
    }
}

#[derive(Subcommand, Clone, Debug)]
enum ConntrackAction {
    /// Forget the selected flows (both directions), as `conntrack -D` does: their next packet
    /// starts a new flow, which usually breaks a TCP connection. A selection is required.
    ///
    /// Example: lb conntrack flush --backend 10.1.1.2:8080
    Flush {
        #[command(flatten)]
        filter: FlowSelection,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cli.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let failure = if matches!(cli.command, Command::Plan { .. }) {
        ExitCode::from(EXIT_PLAN_FAILED)
    } else {
        ExitCode::FAILURE
    };
    match execute(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("lb: {error:#}");
            failure
        }
    }
}

fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Agent {
            manifests,
            kubeconfig,
            interfaces,
            resync_seconds,
            state_dir,
            xdp_redirect_veth,
            conntrack_flows,
            max_services,
            max_backends,
            affinity_entries,
            nodeport_addresses,
            service_node_port_range,
            node_name,
            service_cidr,
            reject_rate,
            socket_cgroup,
            no_socket_hooks,
            health_address,
            metrics_address,
        } => {
            let dataplane = dataplane_config(&service_cidr, reject_rate)?;
            let socket_cgroup = if no_socket_hooks {
                None
            } else {
                match socket_cgroup.or_else(dataplane::system::cgroup2_root) {
                    Some(cgroup) => Some(cgroup),
                    None => anyhow::bail!(
                        "no cgroup v2 hierarchy is mounted (looked at /sys/fs/cgroup and \
                         /sys/fs/cgroup/unified): give --socket-cgroup, or --no-socket-hooks to \
                         leave the node's own sockets untranslated"
                    ),
                }
            };
            let node_name = match node_name {
                Some(name) => name,
                None => host_name()?,
            };
            let capacities = Capacities::new(
                conntrack_flows,
                max_services,
                max_backends,
                affinity_entries,
            )?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let source = match manifests {
                Some(dir) => Source::Manifests(dir),
                None => Source::Cluster { kubeconfig },
            };
            runtime
                .block_on(run(AgentOptions {
                    source,
                    interfaces,
                    pin_dir: cli.pin_dir,
                    resync: Duration::from_secs(resync_seconds.max(1)),
                    state_dir,
                    veth_redirect: if xdp_redirect_veth {
                        VethRedirect::Allowed
                    } else {
                        VethRedirect::Never
                    },
                    capacities,
                    nodeport_addresses,
                    node_port_range: service_node_port_range,
                    node_name,
                    dataplane,
                    socket_cgroup,
                    health_address,
                    metrics_address,
                }))
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Services {
            namespace,
            name,
            state_dir,
            output,
        } => {
            let refusals = lb::agent::read_refusals(&state_dir)?;
            let rows = service_rows(&cli.pin_dir, &ServiceFilter { namespace, name }, &refusals)?;
            match output {
                Output::Table => print!("{}", services_table(&rows)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Backends { service, output } => {
            let rows = backend_rows(&cli.pin_dir, &service)?;
            match output {
                Output::Table => print!("{}", backends_table(&rows)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan {
            manifests,
            kubeconfig,
            state_dir,
            node_name,
            zone,
            nodeport_addresses,
            service_node_port_range,
            output,
        } => {
            let plan = plan(
                &cli.pin_dir,
                &PlanOptions {
                    state_dir,
                    manifests,
                    kubeconfig,
                    node_name,
                    zone,
                    nodeport_addresses,
                    node_port_range: service_node_port_range,
                },
            )?;
            match output {
                Output::Table => print!("{}", plan_table(&plan)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&plan)?),
            }
            Ok(if plan.in_sync {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_DRIFT)
            })
        }
        Command::Stats {
            output,
            watch: false,
            ..
        } => {
            let stats = read_stats(&cli.pin_dir)?;
            match output {
                Output::Table => print!("{}", stats_table(&stats)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&stats)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats {
            output,
            watch: true,
            interval,
            count,
        } => {
            let interval = Duration::try_from_secs_f64(interval)
                .ok()
                .filter(|interval| !interval.is_zero())
                .ok_or_else(|| {
                    anyhow::anyhow!("--interval {interval}: need a positive number of seconds")
                })?;
            let mut before = read_stats(&cli.pin_dir)?;
            let mut taken = std::time::Instant::now();
            for _ in 0..count.unwrap_or(u32::MAX) {
                std::thread::sleep(interval);
                let after = read_stats(&cli.pin_dir)?;
                let now = std::time::Instant::now();
                let rates = rates(&before, &after, now - taken);
                match output {
                    Output::Table => println!("{}", rates_table(&rates)),
                    Output::Json => println!("{}", serde_json::to_string(&rates)?),
                }
                (before, taken) = (after, now);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain {
            from,
            to,
            iface,
            established,
            output,
        } => {
            let explanation = explain(
                &cli.pin_dir,
                &Request {
                    from: from.0,
                    to,
                    interface: iface,
                    established,
                },
            )?;
            match output {
                Output::Table => print!("{}", explanation_text(&explanation)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&explanation)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Conntrack {
            action: Some(ConntrackAction::Flush { filter }),
            ..
        } => {
            let flushed = flush(&cli.pin_dir, &filter.into())?;
            println!("flushed {flushed} flows");
            Ok(ExitCode::SUCCESS)
        }
        Command::Conntrack {
            action: None,
            filter,
            output,
        } => {
            let rows = flow_rows(&cli.pin_dir, &filter.into())?;
            match output {
                Output::Table => print!("{}", flows_table(&rows)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Reset => dataplane::reset(&cli.pin_dir).map(|()| ExitCode::SUCCESS),
    }
}
