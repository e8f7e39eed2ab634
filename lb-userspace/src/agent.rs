//! `lb agent`: attach the dataplane, then keep the Service maps equal to what the source says: a
//! directory of manifests, or the Kubernetes API ([`crate::kubernetes`]).

use std::{
    ops::RangeInclusive,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use lb_common::config::DataplaneConfig;
use notify::{RecursiveMode, Watcher as _};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::{Instant, interval_at, sleep},
};
use tracing::{info, warn};

use std::sync::Arc;

use crate::{
    dataplane::{
        Dataplane, VethRedirect,
        links::{Interfaces, Patterns},
        maps::{Capacities, ServiceMaps},
        system,
    },
    desired::{Note, desired_state},
    health::{self, Health},
    manifests::{ManifestError, Snapshot, load_dir},
    metrics::Metrics,
    node::{self, NodeConfig, NodePortAddresses, NodeSettings, SourceSetting},
    reconcile::{Reconciler, Refusal, Summary},
};

/// Where the Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A directory of Service and EndpointSlice manifests, watched.
    Manifests(PathBuf),
    /// The Kubernetes API: watches of Services and EndpointSlices, with the in-cluster
    /// configuration or a kubeconfig file.
    Cluster { kubeconfig: Option<PathBuf> },
}

/// How `lb agent` runs.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Where the Services and EndpointSlices come from.
    pub source: Source,
    /// The `--interfaces` patterns (names and globs) of the interfaces to attach the XDP program
    /// to; [`crate::dataplane::links`] follows them as links come and go.
    pub interfaces: Vec<String>,
    /// Where maps and links are pinned.
    pub pin_dir: PathBuf,
    /// Full re-read of the directory (or of the node's addresses, with the Kubernetes source)
    /// even without a change notification.
    pub resync: Duration,
    /// Where the agent keeps the last good version of every object across restarts.
    pub state_dir: PathBuf,
    /// Whether the program may redirect into veths; see [`VethRedirect`].
    pub veth_redirect: VethRedirect,
    /// Map sizes.
    pub capacities: Capacities,
    /// `--nodeport-addresses`: which of the node's addresses serve NodePorts.
    pub nodeport_addresses: NodePortAddresses,
    /// `--service-node-port-range`.
    pub node_port_range: RangeInclusive<u16>,
    /// This node's name in EndpointSlices' `nodeName`, for the `Local` traffic policies.
    pub node_name: String,
    /// Settings handed to the datapath as they are: service CIDRs and the reject rate.
    pub dataplane: DataplaneConfig,
    /// The cgroup (v2) whose processes' sockets the socket hooks translate; `None`: no hooks.
    pub socket_cgroup: Option<PathBuf>,
    /// Where `/healthz` and `/readyz` are served.
    pub health_address: std::net::SocketAddr,
    /// Where `/metrics` is served.
    pub metrics_address: std::net::SocketAddr,
}

/// The file in the state directory holding the last good objects.
pub const SNAPSHOT_FILE: &str = "manifests.json";

/// Keeps the node settings file of the state directory ([`NodeSettings`]) equal to what the
/// desired state is computed with, so that `lb plan` computes the same.
pub(crate) struct SettingsRecord {
    state_dir: PathBuf,
    source: SourceSetting,
    saved: Option<NodeSettings>,
    /// The refusals last written to [`REFUSED_FILE`].
    refused: Option<Vec<Refusal>>,
}

/// The file in the state directory listing the frontends refused for lack of room in a map
/// (`lb services` shows them, agent up or down).
pub const REFUSED_FILE: &str = "refused.json";

/// The frontends `state_dir` says the agent could not program for lack of room; none when the
/// file is absent (no agent ran with that state directory, or nothing was ever refused).
pub fn read_refusals(state_dir: &Path) -> anyhow::Result<Vec<Refusal>> {
    let path = state_dir.join(REFUSED_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
    }
}

impl SettingsRecord {
    pub(crate) fn new(options: &AgentOptions) -> Self {
        // Absolute, so that `lb plan` finds the directory from wherever it runs.
        let absolute = |path: &Path| std::fs::canonicalize(path).unwrap_or(path.to_owned());
        let source = match &options.source {
            Source::Manifests(dir) => SourceSetting::Manifests(absolute(dir)),
            Source::Cluster { kubeconfig } => SourceSetting::Kubernetes {
                kubeconfig: kubeconfig.as_deref().map(absolute),
            },
        };
        Self {
            state_dir: options.state_dir.clone(),
            source,
            saved: None,
            refused: None,
        }
    }

    /// Records the frontends `reconciler` could not program for lack of room, when they changed
    /// (written whole to a temporary file, then renamed, so a reader never sees half of it).
    pub(crate) fn record_refusals(&mut self, reconciler: &Reconciler) {
        let refused: Vec<Refusal> = reconciler.refused().cloned().collect();
        if self.refused.as_ref() == Some(&refused) {
            return;
        }
        let path = self.state_dir.join(REFUSED_FILE);
        let temporary = self.state_dir.join(format!("{REFUSED_FILE}.tmp"));
        let result = serde_json::to_vec_pretty(&refused)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| Ok(std::fs::write(&temporary, bytes)?))
            .and_then(|()| Ok(std::fs::rename(&temporary, &path)?));
        match result {
            Ok(()) => self.refused = Some(refused),
            Err(error) => warn!(
                "writing {}: {error:#}; `lb services` will not flag the refused frontends",
                path.display()
            ),
        }
    }

    /// Records `node` unless it is what the file already says. A failure is logged: the agent
    /// serves on, only `lb plan` would need its settings given as flags.
    pub(crate) fn record(&mut self, node: &NodeConfig) {
        let settings = NodeSettings::new(self.source.clone(), node);
        if self.saved.as_ref() == Some(&settings) {
            return;
        }
        let result = std::fs::create_dir_all(&self.state_dir)
            .map_err(anyhow::Error::from)
            .and_then(|()| settings.save(&self.state_dir));
        match result {
            Ok(()) => self.saved = Some(settings),
            Err(error) => warn!(
                "{error:#}; `lb plan` will need the node's settings as flags (--node-name, \
                 --nodeport-addresses, ...)"
            ),
        }
    }
}

/// Editors save in several steps (write a temporary file, rename, touch); one sync after they
/// settle is enough.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// The manifest directory and what was last read from it.
struct ManifestSource {
    dir: PathBuf,
    snapshot: Snapshot,
    /// Where the snapshot is saved, and what was saved last (to write only on change).
    snapshot_file: PathBuf,
    saved: String,
    /// Reported once per change, not on every resync.
    last_errors: Vec<ManifestError>,
    last_notes: Vec<Note>,
    /// What the node looked like at the last sync, reported when it changes.
    node: NodeConfig,
    /// Where `node` is recorded for `lb plan`.
    settings: SettingsRecord,
}

/// The node as it is now, logging a change of its NodePort addresses from `previous`.
/// Addresses come and go with interfaces; they are read again at every sync (a change
/// notification or the periodic resync).
pub(crate) fn read_node(options: &AgentOptions, previous: &NodeConfig) -> NodeConfig {
    let local = match node::local_addresses() {
        Ok(local) => local,
        Err(error) => {
            warn!("{error:#}; keeping the NodePort addresses as they were");
            return previous.clone();
        }
    };
    let node = NodeConfig {
        nodeport_addresses: match &options.nodeport_addresses {
            NodePortAddresses::All => node::nodeport_addresses(&local, &[]),
            NodePortAddresses::Within(cidrs) => node::nodeport_addresses(&local, cidrs),
            NodePortAddresses::Primary => previous
                .node_ips
                .iter()
                .copied()
                .filter(|addr| local.contains(addr))
                .collect(),
        },
        node_port_range: options.node_port_range.clone(),
        node_name: Some(options.node_name.clone()),
        // Known only from the Node object (Kubernetes source), which sets them separately.
        zone: previous.zone.clone(),
        node_ips: previous.node_ips.clone(),
    };
    if node.nodeport_addresses != previous.nodeport_addresses {
        let listed: Vec<String> = node
            .nodeport_addresses
            .iter()
            .map(ToString::to_string)
            .collect();
        info!("NodePorts are served on {}", listed.join(", "));
    }
    node
}

/// Logs the notes of a desired state when they differ from the last ones, and programs it.
pub(crate) fn program(
    reconciler: &mut Reconciler,
    maps: &mut ServiceMaps,
    desired: &crate::desired::DesiredState,
    notes: Vec<Note>,
    last_notes: &mut Vec<Note>,
    (metrics, started): (&Metrics, std::time::Instant),
) {
    if notes != *last_notes {
        for note in &notes {
            info!("{}: {}", note.object, note.message);
        }
        *last_notes = notes;
    }
    let summary = reconciler.reconcile(desired, maps);
    report(&summary, reconciler);
    metrics.observe_sync(started.elapsed(), &summary, reconciler);
}

/// Logs what a reconciliation did: its errors, and its counts when it wrote anything.
pub(crate) fn report(summary: &Summary, reconciler: &Reconciler) {
    for error in &summary.errors {
        // A full map is an operator's problem to solve (a capacity flag), not a passing one.
        match error.downcast_ref::<crate::reconcile::MapFull>() {
            Some(full) => tracing::error!(map = full.map, capacity = full.capacity, "{error:#}"),
            None => warn!("{error:#}"),
        }
    }
    if summary.changed() {
        info!(
            added = summary.added,
            updated = summary.updated,
            removed = summary.removed,
            unchanged = summary.unchanged,
            writes = summary.writes,
            "programmed {} Service frontends",
            reconciler.frontend_count()
        );
    }
}

impl ManifestSource {
    fn sync(
        &mut self,
        reconciler: &mut Reconciler,
        maps: &mut ServiceMaps,
        node: NodeConfig,
        metrics: &Metrics,
    ) {
        let started = std::time::Instant::now();
        self.node = node;
        let load = match load_dir(&self.dir, &self.snapshot) {
            Ok(load) => load,
            Err(error) => {
                warn!("{error:#}; keeping the Services as they are");
                return;
            }
        };
        if load.errors != self.last_errors {
            for error in &load.errors {
                warn!("{error}");
            }
            self.last_errors = load.errors.clone();
        }
        self.snapshot = load.snapshot;
        self.save_snapshot();
        self.settings.record(&self.node);
        let (desired, notes) = desired_state(
            self.snapshot
                .services
                .values()
                .map(|sourced| &sourced.object),
            self.snapshot.slices.values().map(|sourced| &sourced.object),
            &self.node,
        );
        program(
            reconciler,
            maps,
            &desired,
            notes,
            &mut self.last_notes,
            (metrics, started),
        );
        self.settings.record_refusals(reconciler);
    }
}

impl ManifestSource {
    fn new(dir: PathBuf, options: &AgentOptions) -> anyhow::Result<Self> {
        let state_dir = &options.state_dir;
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
        let snapshot_file = state_dir.join(SNAPSHOT_FILE);
        let (snapshot, saved) = match std::fs::read_to_string(&snapshot_file) {
            Ok(json) => match Snapshot::from_json(&json) {
                Ok(snapshot) => (snapshot, json),
                Err(error) => {
                    warn!(
                        "ignoring {}: {error:#}; objects broken now have no last good version",
                        snapshot_file.display()
                    );
                    (Snapshot::default(), String::new())
                }
            },
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                (Snapshot::default(), String::new())
            }
            Err(error) => {
                return Err(error).with_context(|| format!("reading {}", snapshot_file.display()));
            }
        };
        Ok(Self {
            dir,
            snapshot,
            snapshot_file,
            saved,
            last_errors: Vec::new(),
            last_notes: Vec::new(),
            node: NodeConfig::default(),
            settings: SettingsRecord::new(options),
        })
    }

    /// Keeps the last good objects on disk, written atomically, only when they changed.
    fn save_snapshot(&mut self) {
        let result = self.snapshot.to_json().and_then(|json| {
            if json != self.saved {
                let temporary = self.snapshot_file.with_extension("json.tmp");
                std::fs::write(&temporary, &json)?;
                std::fs::rename(&temporary, &self.snapshot_file)?;
                self.saved = json;
            }
            Ok(())
        });
        if let Err(error) = result {
            warn!(
                "saving {}: {error:#}; a restart would not know the last good objects",
                self.snapshot_file.display()
            );
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM. The dataplane stays attached afterwards.
pub async fn run(options: AgentOptions) -> anyhow::Result<()> {
    system::check_privileges()?;
    let patterns = Patterns::parse(&options.interfaces)?;
    for interface in patterns.names() {
        system::interface_index(interface)?;
    }
    if let Source::Manifests(dir) = &options.source
        && !dir.is_dir()
    {
        bail!(
            "--manifests {}: not a directory; give the directory holding your Service and \
             EndpointSlice YAML",
            dir.display()
        );
    }
    if matches!(options.source, Source::Manifests(_))
        && options.nodeport_addresses == NodePortAddresses::Primary
    {
        bail!(
            "--nodeport-addresses primary takes the node's addresses from its Node object, which \
             only the Kubernetes source has; with --manifests give prefixes instead"
        );
    }

    let mut dataplane = Dataplane::load(&options.pin_dir, &options.capacities)?;
    dataplane.configure(&options.dataplane)?;
    let interfaces = Interfaces::attach(&mut dataplane, patterns, options.veth_redirect).await?;
    match &options.socket_cgroup {
        Some(cgroup) => dataplane.attach_sockets(cgroup)?,
        None => crate::dataplane::detach_sockets(&options.pin_dir)?,
    }
    interfaces.allow_local_sources()?;
    let attached = interfaces.attached();
    for warning in system::sysctl_warnings(&attached) {
        warn!("{warning}");
    }
    // Until the agent stops: interfaces matched by a glob come and go with pods.
    let _following = interfaces.follow(dataplane);

    let mut maps = ServiceMaps::open(&options.pin_dir)?;
    let (mut reconciler, swept) = Reconciler::from_store(&mut maps)?;
    info!(
        frontends = reconciler.frontend_count(),
        swept, "read the pinned Service maps"
    );

    let mut stop = Stop::new()?;
    let health = Health::new(match &options.source {
        Source::Manifests(_) => "manifests",
        Source::Cluster { .. } => "kubernetes",
    });
    health::serve(options.health_address, Arc::clone(&health)).await?;
    info!(
        "health: http://{}/healthz and /readyz",
        options.health_address
    );
    let metrics = Metrics::new(options.pin_dir.clone());
    health::serve_http(
        options.metrics_address,
        "the metrics (--metrics-address)",
        Arc::clone(&metrics).answer(),
    )
    .await?;
    info!("metrics: http://{}/metrics", options.metrics_address);
    match &options.source {
        Source::Manifests(dir) => {
            watch_manifests(
                &options,
                dir,
                &mut reconciler,
                &mut maps,
                &mut stop,
                (&health, &metrics),
            )
            .await?;
        }
        Source::Cluster { kubeconfig } => {
            crate::kubernetes::run(
                &options,
                kubeconfig.as_deref(),
                &mut reconciler,
                &mut maps,
                &mut stop,
                (&health, &metrics),
            )
            .await?;
        }
    }
    info!(
        "stopping; the XDP program and the maps stay in place so traffic keeps flowing (`lb reset` \
         removes them)"
    );
    Ok(())
}

/// SIGTERM and SIGINT, which stop the agent.
pub(crate) struct Stop {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Stop {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
        })
    }

    /// Resolves when the agent is asked to stop.
    pub(crate) async fn requested(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// Keeps the maps equal to the manifests in `dir` until asked to stop.
async fn watch_manifests(
    options: &AgentOptions,
    dir: &Path,
    reconciler: &mut Reconciler,
    maps: &mut ServiceMaps,
    stop: &mut Stop,
    (health, metrics): (&Health, &Metrics),
) -> anyhow::Result<()> {
    let (events, mut changes) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // A closed channel means the agent is stopping.
        let _ = events.send(event.map(|_| ()));
    })
    .context("starting the manifest directory watcher")?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;

    let mut source = ManifestSource::new(dir.to_owned(), options)?;
    let node = read_node(options, &source.node);
    source.sync(reconciler, maps, node, metrics);
    health.set_ready();
    info!(
        frontends = reconciler.frontend_count(),
        "ready: watching {}",
        dir.display()
    );

    let mut resync = interval_at(Instant::now() + options.resync, options.resync);
    let mut watching = true;
    loop {
        tokio::select! {
            change = changes.recv(), if watching => match change {
                Some(change) => {
                    if let Err(error) = change {
                        warn!("watching {}: {error}", dir.display());
                    }
                    sleep(DEBOUNCE).await;
                    while changes.try_recv().is_ok() {}
                }
                None => {
                    warn!(
                        "the watcher of {} stopped; changes now apply at the periodic resync",
                        dir.display()
                    );
                    watching = false;
                    continue;
                }
            },
            _ = resync.tick() => {}
            _ = stop.requested() => return Ok(()),
        }
        let node = read_node(options, &source.node);
        source.sync(reconciler, maps, node, metrics);
    }
}
