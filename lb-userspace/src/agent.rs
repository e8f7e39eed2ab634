//! `lb agent`: attach the dataplane, then keep the Service maps equal to the manifests.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use notify::{RecursiveMode, Watcher as _};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::{Instant, interval_at, sleep},
};
use tracing::{info, warn};

use crate::{
    dataplane::{Dataplane, maps::ServiceMaps, system},
    desired::{Note, desired_state},
    manifests::{ManifestError, Snapshot, load_dir},
    reconcile::Reconciler,
};

/// How `lb agent` runs.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Directory of Service and EndpointSlice manifests.
    pub manifests: PathBuf,
    /// Interfaces to attach the XDP program to.
    pub interfaces: Vec<String>,
    /// Where maps and links are pinned.
    pub pin_dir: PathBuf,
    /// Full re-read of the directory even without a change notification.
    pub resync: Duration,
}

/// Editors save in several steps (write a temporary file, rename, touch); one sync after they
/// settle is enough.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// The manifest directory and what was last read from it.
struct ManifestSource {
    dir: PathBuf,
    snapshot: Snapshot,
    /// Reported once per change, not on every resync.
    last_errors: Vec<ManifestError>,
    last_notes: Vec<Note>,
}

impl ManifestSource {
    fn sync(&mut self, reconciler: &mut Reconciler, maps: &mut ServiceMaps) {
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
        let (desired, notes) = desired_state(
            self.snapshot
                .services
                .values()
                .map(|sourced| &sourced.object),
            self.snapshot.slices.values().map(|sourced| &sourced.object),
        );
        if notes != self.last_notes {
            for note in &notes {
                info!("{}: {}", note.object, note.message);
            }
            self.last_notes = notes;
        }
        let summary = reconciler.reconcile(&desired, maps);
        for error in &summary.errors {
            warn!("{error:#}");
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
}

/// Runs the agent until SIGINT or SIGTERM. The dataplane stays attached afterwards.
pub async fn run(options: AgentOptions) -> anyhow::Result<()> {
    system::check_privileges()?;
    if options.interfaces.is_empty() {
        bail!("no interfaces given: pass --interfaces with the node's interfaces, e.g. eth0");
    }
    for interface in &options.interfaces {
        system::interface_index(interface)?;
    }
    if !options.manifests.is_dir() {
        bail!(
            "--manifests {}: not a directory; give the directory holding your Service and \
             EndpointSlice YAML",
            options.manifests.display()
        );
    }

    let mut dataplane = Dataplane::load(&options.pin_dir)?;
    for interface in &options.interfaces {
        dataplane.attach(interface)?;
    }
    dataplane.detach_others(&options.interfaces)?;
    for warning in system::sysctl_warnings(&options.interfaces) {
        warn!("{warning}");
    }

    let mut maps = ServiceMaps::open(&options.pin_dir)?;
    let (mut reconciler, swept) = Reconciler::from_store(&mut maps)?;
    info!(
        frontends = reconciler.frontend_count(),
        swept, "read the pinned Service maps"
    );

    let (events, mut changes) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // A closed channel means the agent is stopping.
        let _ = events.send(event.map(|_| ()));
    })
    .context("starting the manifest directory watcher")?;
    watcher
        .watch(&options.manifests, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", options.manifests.display()))?;

    let mut source = ManifestSource {
        dir: options.manifests.clone(),
        snapshot: Snapshot::default(),
        last_errors: Vec::new(),
        last_notes: Vec::new(),
    };
    source.sync(&mut reconciler, &mut maps);
    info!(
        frontends = reconciler.frontend_count(),
        "ready: watching {}",
        options.manifests.display()
    );

    let mut resync = interval_at(Instant::now() + options.resync, options.resync);
    let mut terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    loop {
        tokio::select! {
            change = changes.recv() => {
                if let Some(Err(error)) = change {
                    warn!("watching {}: {error}", options.manifests.display());
                }
                sleep(DEBOUNCE).await;
                while changes.try_recv().is_ok() {}
            }
            _ = resync.tick() => {}
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
        source.sync(&mut reconciler, &mut maps);
    }
    info!(
        "stopping; the XDP program and the maps stay in place so traffic keeps flowing (`lb reset` \
         removes them)"
    );
    Ok(())
}
