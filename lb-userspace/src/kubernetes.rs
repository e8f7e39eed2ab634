//! The Kubernetes API source: watches of `v1 Service` and `discovery.k8s.io/v1 EndpointSlice`
//! (kube-rs watchers: list, then watch from the list's resourceVersion, re-list after `410
//! Gone`, reconnect with backoff), feeding the same pure function as the manifest directory
//! ([`desired_state`]), so both sources program the maps alike.
//!
//! As kube-proxy, the watches leave out objects labelled `service.kubernetes.io/service-proxy-name`
//! (another proxy serves those Services) or `service.kubernetes.io/headless` (their slices).
//!
//! The maps are only programmed once both watches have listed everything: a half-listed cluster
//! would look like Services without endpoints. Afterwards every event recomputes the desired
//! state and the reconciler writes only what differs, so a re-list of unchanged objects writes
//! nothing. While the API server is unreachable the maps stay as they are; the watchers retry
//! with exponential backoff, and the agent logs once when the connection is lost and once when
//! it is back.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::Context as _;
use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, Config, Resource,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::time::{Instant, interval_at};
use tracing::{info, warn};

use crate::{
    agent::{AgentOptions, Stop, program, read_node},
    dataplane::maps::ServiceMaps,
    desired::{Note, desired_state},
    health::Health,
    node::NodeConfig,
    reconcile::Reconciler,
};

/// The label selector kube-proxy watches Services and EndpointSlices with: not another proxy's,
/// not a headless Service's slices.
pub const PROXY_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// The HTTP status of an expired resourceVersion: the watcher re-lists.
const GONE: u16 = 410;

/// How often a kind whose watch lost the API server is probed for its return (for the log and
/// `/healthz`; the watcher reconnects on its own backoff).
const PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// How long one probe waits for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A client for the API server, and the server's address: from `kubeconfig` when given, else
/// the in-cluster configuration (the pod's service account).
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<(Client, String)> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        None => Config::incluster().context(
            "no --manifests and no --kubeconfig, and this is not a pod with a service account \
             (KUBERNETES_SERVICE_HOST unset or no token): give one of them",
        )?,
    };
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config).context("building the Kubernetes client")?;
    Ok((client, server))
}

/// The objects of one kind as the last complete list and the watch events since say.
struct Objects<K> {
    kind: &'static str,
    live: BTreeMap<(String, String), K>,
    /// Objects of a re-list in progress (between `Init` and `InitDone`).
    relisting: Option<BTreeMap<(String, String), K>>,
    /// A complete list has been seen.
    listed: bool,
    /// The API server answered the last request (reported on change only).
    reachable: bool,
}

impl<K: Resource + Clone + PartialEq> Objects<K> {
    fn new(kind: &'static str) -> Self {
        Self {
            kind,
            live: BTreeMap::new(),
            relisting: None,
            listed: false,
            reachable: true,
        }
    }

    fn key(object: &K) -> (String, String) {
        (
            object.meta().namespace.clone().unwrap_or_default(),
            object.meta().name.clone().unwrap_or_default(),
        )
    }

    /// Applies one item of the watcher's stream. Returns whether the objects changed.
    fn apply(&mut self, item: Result<watcher::Event<K>, watcher::Error>) -> bool {
        let event = match item {
            Ok(event) => event,
            Err(error) => {
                self.failed(&error);
                return false;
            }
        };
        self.answered();
        match event {
            watcher::Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(object) => {
                if let Some(relisting) = &mut self.relisting {
                    relisting.insert(Self::key(&object), object);
                }
                false
            }
            watcher::Event::InitDone => {
                let listed = self.relisting.take().unwrap_or_default();
                let first = !self.listed;
                self.listed = true;
                let changed = listed != self.live;
                self.live = listed;
                first || changed
            }
            watcher::Event::Apply(object) => {
                let key = Self::key(&object);
                if self.live.get(&key) == Some(&object) {
                    return false;
                }
                self.live.insert(key, object);
                true
            }
            watcher::Event::Delete(object) => self.live.remove(&Self::key(&object)).is_some(),
        }
    }

    /// Notes an answer of the API server; logs the first after a loss.
    fn answered(&mut self) {
        if !self.reachable {
            info!("{}: the API server answers again", self.kind);
            self.reachable = true;
        }
    }

    /// Reports a failed request once per loss of the API server; an expired resourceVersion is
    /// not a loss (the watcher re-lists at once).
    fn failed(&mut self, error: &watcher::Error) {
        if let watcher::Error::WatchError(status) = error
            && status.code == GONE
        {
            info!(
                "{}: the watch's resourceVersion expired (410 Gone); re-listing",
                self.kind
            );
            return;
        }
        if self.reachable {
            warn!(
                "{}: {error}; keeping the dataplane as it is and retrying with backoff",
                self.kind
            );
            self.reachable = false;
        }
    }
}

/// Asks the API server for one object of `K` (the same request a watcher's list makes, so the
/// same permissions): whether it answers. A watcher that reconnects emits nothing until an object
/// changes, so without this probe a quiet cluster would look unreachable long after it is back.
async fn answers<K>(client: &Client) -> bool
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let api = Api::<K>::all(client.clone());
    let params = ListParams::default().labels(PROXY_SELECTOR).limit(1);
    let request = api.list_metadata(&params);
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, request).await,
        Ok(Ok(_))
    )
}

/// The watcher stream of one kind, with kube-proxy's selector and kube-rs's default backoff
/// (exponential, up to a few minutes, reset after a successful event).
fn watch<K>(client: &Client) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    watcher(
        Api::<K>::all(client.clone()),
        watcher::Config::default().labels(PROXY_SELECTOR),
    )
    .default_backoff()
}

/// Keeps the maps equal to the API server's Services and EndpointSlices until asked to stop.
pub(crate) async fn run(
    options: &AgentOptions,
    kubeconfig: Option<&Path>,
    reconciler: &mut Reconciler,
    maps: &mut ServiceMaps,
    stop: &mut Stop,
    health: &Health,
) -> anyhow::Result<()> {
    let (client, server) = client(kubeconfig).await?;
    info!("watching Services and EndpointSlices at {server} (selector {PROXY_SELECTOR})");
    let mut services = Objects::<Service>::new("Services");
    let mut slices = Objects::<EndpointSlice>::new("EndpointSlices");
    let mut service_events = std::pin::pin!(watch::<Service>(&client));
    let mut slice_events = std::pin::pin!(watch::<EndpointSlice>(&client));
    let mut node = read_node(options, &NodeConfig::default());
    let mut notes: Vec<Note> = Vec::new();
    let mut ready = false;
    let mut resync = interval_at(Instant::now() + options.resync, options.resync);
    let mut probe = interval_at(Instant::now() + PROBE_INTERVAL, PROBE_INTERVAL);
    loop {
        let changed = tokio::select! {
            Some(item) = service_events.next() => services.apply(item),
            Some(item) = slice_events.next() => slices.apply(item),
            _ = resync.tick() => {
                let now = read_node(options, &node);
                let changed = now != node;
                node = now;
                changed
            }
            _ = probe.tick(), if !(services.reachable && slices.reachable) => {
                if !services.reachable && answers::<Service>(&client).await {
                    services.answered();
                }
                if !slices.reachable && answers::<EndpointSlice>(&client).await {
                    slices.answered();
                }
                false
            }
            () = stop.requested() => return Ok(()),
        };
        health.set_reachable(services.reachable && slices.reachable);
        if !(changed && services.listed && slices.listed) {
            continue;
        }
        let (desired, new_notes) =
            desired_state(services.live.values(), slices.live.values(), &node);
        program(reconciler, maps, &desired, new_notes, &mut notes);
        if !ready {
            ready = true;
            health.set_ready();
            info!(
                services = services.live.len(),
                endpoint_slices = slices.live.len(),
                frontends = reconciler.frontend_count(),
                "ready: watching the API server; the first full list is programmed"
            );
        }
    }
}
