//! The Kubernetes API source: watches of `v1 Service` and `discovery.k8s.io/v1 EndpointSlice`
//! (kube-rs watchers: list, then watch from the list's resourceVersion, re-list after `410
//! Gone`, reconnect with backoff), feeding the same pure function as the manifest directory
//! ([`desired_state`]), so both sources program the maps alike.
//!
//! As kube-proxy, the watches leave out objects labelled `service.kubernetes.io/service-proxy-name`
//! (another proxy serves those Services) or `service.kubernetes.io/headless` (their slices).
//!
//! The maps are only programmed once both watches have listed everything: a half-listed cluster
//! would look like Services without endpoints. Afterwards each event recomputes only the
//! Services it touches ([`Index`]) and the reconciler writes only what differs, so a re-list of
//! unchanged objects writes nothing; a full reconciliation at each resync retries what failed. While the API server is unreachable the maps stay as they are; the watchers retry
//! with exponential backoff, and the agent logs once when the connection is lost and once when
//! it is back.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::Context as _;
use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, Resource,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::time::{Instant, interval_at, sleep_until};
use tracing::{info, warn};

use crate::{
    agent::{AgentOptions, SettingsRecord, Stop, read_node, report},
    dataplane::maps::ServiceMaps,
    desired::index::{Index, ObjectKey, object_key},
    health::Health,
    manifests::DEFAULT_NAMESPACE,
    metrics::Metrics,
    node::NodeConfig,
    reconcile::Reconciler,
};

/// The label selector kube-proxy watches Services and EndpointSlices with: not another proxy's,
/// not a headless Service's slices.
pub const PROXY_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// The HTTP status of an expired resourceVersion: the watcher re-lists.
const GONE: u16 = 410;

/// The HTTP status of a request the agent's role does not allow.
const FORBIDDEN: u16 = 403;

/// How soon a failed write is retried with a full reconciliation (rather than waiting for the
/// next resync).
const RETRY_AFTER_ERRORS: Duration = Duration::from_secs(1);
/// How soon a full reconciliation retries frontends refused again for lack of room.
const RETRY_REFUSED: Duration = Duration::from_secs(5);

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

/// The objects of one kind live in the [`Index`]; this is how each kind is stored there, and
/// which of them the agent watches.
trait Indexed: Resource + Clone + PartialEq + Sized {
    fn set(index: &mut Index, key: ObjectKey, object: Option<Self>) -> bool;
    fn keys(index: &Index) -> Vec<ObjectKey>;
    /// The objects watched: kube-proxy's label selector, or this node alone.
    fn selection(node_name: &str) -> watcher::Config {
        let _ = node_name;
        watcher::Config::default().labels(PROXY_SELECTOR)
    }
}

/// The Node label naming its zone, for topology-aware routing.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The `status.addresses` type of the node's primary addresses.
const INTERNAL_IP: &str = "InternalIP";

/// What the desired state takes from this node's Node object (`None`: there is none): its zone
/// label and its IPv4 InternalIPs.
pub fn node_facts(node: Option<&Node>) -> (Option<String>, Vec<std::net::Ipv4Addr>) {
    let zone = node
        .and_then(|node| node.metadata.labels.as_ref())
        .and_then(|labels| labels.get(ZONE_LABEL))
        .cloned();
    let node_ips = node
        .and_then(|node| node.status.as_ref())
        .and_then(|status| status.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|address| address.type_ == INTERNAL_IP)
        .filter_map(|address| address.address.parse().ok())
        .collect();
    (zone, node_ips)
}

/// Lists, once, the Services and EndpointSlices the agent watches (kube-proxy's selector).
pub async fn list_once(client: &Client) -> anyhow::Result<(Vec<Service>, Vec<EndpointSlice>)> {
    let params = ListParams::default().labels(PROXY_SELECTOR);
    let services = Api::<Service>::all(client.clone())
        .list(&params)
        .await
        .context("listing Services")?
        .items;
    let slices = Api::<EndpointSlice>::all(client.clone())
        .list(&params)
        .await
        .context("listing EndpointSlices")?
        .items;
    Ok((services, slices))
}

/// The field selector of this node's Node object alone.
fn node_selector(node_name: &str) -> String {
    format!("metadata.name={node_name}")
}

/// Reads, once, the Node named `node_name` (`None` when it does not exist) with the request the
/// agent's Node watch lists it with (a field selector on its name), so that both need the same
/// permission and see the same object.
pub async fn get_node(client: &Client, node_name: &str) -> anyhow::Result<Option<Node>> {
    let params = ListParams::default().fields(&node_selector(node_name));
    let nodes = Api::<Node>::all(client.clone())
        .list(&params)
        .await
        .map_err(|error| match error {
            // The API server's refusal in its own words, not the whole Status object.
            kube::Error::Api(status) => anyhow::anyhow!(
                "reading Node {node_name}: {} {}: {}",
                status.code,
                status.reason,
                status.message
            ),
            error => anyhow::Error::new(error).context(format!("reading Node {node_name}")),
        })?;
    Ok(nodes.items.into_iter().next())
}

/// This node's Node object, for its zone and addresses: the index keeps only what they say, not
/// the object.
impl Indexed for Node {
    fn set(index: &mut Index, _key: ObjectKey, object: Option<Self>) -> bool {
        let (zone, node_ips) = node_facts(object.as_ref());
        let known = index.node();
        if zone == known.zone && node_ips == known.node_ips {
            return false;
        }
        if zone != known.zone {
            match &zone {
                Some(zone) => info!("this node is in zone {zone}: topology hints for it apply"),
                None => info!("this node has no {ZONE_LABEL} label: zone hints do not apply"),
            }
        }
        if node_ips != known.node_ips {
            info!("this node's Node object gives it the InternalIPs {node_ips:?}");
        }
        let node = NodeConfig {
            zone,
            node_ips,
            ..known.clone()
        };
        index.set_node(node)
    }

    fn keys(index: &Index) -> Vec<ObjectKey> {
        // A re-list without the Node forgets its zone.
        index
            .node()
            .node_name
            .iter()
            .map(|name| (DEFAULT_NAMESPACE.to_owned(), name.clone()))
            .collect()
    }

    fn selection(node_name: &str) -> watcher::Config {
        watcher::Config::default().fields(&node_selector(node_name))
    }
}

impl Indexed for Service {
    fn set(index: &mut Index, key: ObjectKey, object: Option<Self>) -> bool {
        index.set_service(key, object)
    }

    fn keys(index: &Index) -> Vec<ObjectKey> {
        index.service_ids().cloned().collect()
    }
}

impl Indexed for EndpointSlice {
    fn set(index: &mut Index, key: ObjectKey, object: Option<Self>) -> bool {
        index.set_slice(key, object)
    }

    fn keys(index: &Index) -> Vec<ObjectKey> {
        index.slice_keys().cloned().collect()
    }
}

/// The state of one kind's watch: the objects themselves are in the [`Index`].
struct Objects<K> {
    kind: &'static str,
    /// Objects of a re-list in progress (between `Init` and `InitDone`).
    relisting: Option<BTreeMap<ObjectKey, K>>,
    /// A complete list has been seen.
    listed: bool,
    /// The API server answered the last request (reported on change only).
    reachable: bool,
    /// The API server refuses to list these objects to the agent (403: its role lacks the
    /// permission); reported once.
    forbidden: bool,
}

impl<K: Indexed> Objects<K> {
    fn new(kind: &'static str) -> Self {
        Self {
            kind,
            relisting: None,
            listed: false,
            reachable: true,
            forbidden: false,
        }
    }

    /// Applies one item of the watcher's stream to `index`. Returns whether the objects changed,
    /// or were listed completely for the first time.
    fn apply(
        &mut self,
        item: Result<watcher::Event<K>, watcher::Error>,
        index: &mut Index,
    ) -> bool {
        let event = match item {
            Ok(event) => event,
            // A refusal may be what the first programming waited for (see `forbidden`).
            Err(error) => return self.failed(&error),
        };
        // `Init` comes before the list is even asked for: it says nothing of the API server.
        if !matches!(event, watcher::Event::Init) {
            self.answered();
        }
        match event {
            watcher::Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(object) => {
                if let Some(relisting) = &mut self.relisting {
                    relisting.insert(object_key(object.meta()), object);
                }
                false
            }
            watcher::Event::InitDone => {
                // Only what differs from the objects known before reaches the index: a re-list
                // of unchanged objects changes nothing.
                let listed = self.relisting.take().unwrap_or_default();
                let mut changed = false;
                for key in K::keys(index) {
                    if !listed.contains_key(&key) {
                        changed |= K::set(index, key, None);
                    }
                }
                for (key, object) in listed {
                    changed |= K::set(index, key, Some(object));
                }
                let first = !self.listed;
                self.listed = true;
                first || changed
            }
            watcher::Event::Apply(object) => K::set(index, object_key(object.meta()), Some(object)),
            watcher::Event::Delete(object) => K::set(index, object_key(object.meta()), None),
        }
    }

    /// Notes a successful answer of the API server; logs the first after a loss or a refusal.
    fn answered(&mut self) {
        self.reached();
        if self.forbidden {
            info!("{}: the API server allows the watch now", self.kind);
            self.forbidden = false;
        }
    }

    /// Notes that the API server answered, if only with a refusal.
    fn reached(&mut self) {
        if !self.reachable {
            info!("{}: the API server answers again", self.kind);
            self.reachable = true;
        }
    }

    /// Reports a failed request once per loss of the API server; an expired resourceVersion is
    /// not a loss (the watcher re-lists at once). Returns whether the API server newly refused
    /// the watch.
    fn failed(&mut self, error: &watcher::Error) -> bool {
        if let watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) = error
            && status.code == FORBIDDEN
        {
            // An answer, not an outage: the role bound to the agent lacks the permission.
            self.reached();
            if !self.forbidden {
                warn!(
                    "{}: the API server refuses the watch (403 Forbidden: {}); grant the agent \
                     get, list and watch on them (deploy/02-clusterrole.yaml)",
                    self.kind, status.message
                );
                self.forbidden = true;
                return true;
            }
            return false;
        }
        if let watcher::Error::WatchError(status) = error
            && status.code == GONE
        {
            info!(
                "{}: the watch's resourceVersion expired (410 Gone); re-listing",
                self.kind
            );
            return false;
        }
        if self.reachable {
            warn!(
                "{}: {error}; keeping the dataplane as it is and retrying with backoff",
                self.kind
            );
            self.reachable = false;
        }
        false
    }
}

/// Asks the API server for one object of `K` (the same request a watcher's list makes, so the
/// same permissions): whether it answers. A watcher that reconnects emits nothing until an object
/// changes, so without this probe a quiet cluster would look unreachable long after it is back.
async fn answers<K>(client: &Client, node_name: &str) -> bool
where
    K: Indexed + Resource<DynamicType = ()> + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let api = Api::<K>::all(client.clone());
    let selection = K::selection(node_name);
    let params = ListParams {
        label_selector: selection.label_selector,
        field_selector: selection.field_selector,
        limit: Some(1),
        ..ListParams::default()
    };
    let request = api.list_metadata(&params);
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, request).await,
        Ok(Ok(_))
    )
}

/// Whether each probed kind (Services, EndpointSlices, Node) answered.
type Answers = [bool; 3];

/// [`answers`] when `wanted`; `false` (nothing learnt) otherwise.
async fn probe_if<K>(wanted: bool, client: &Client, node_name: &str) -> bool
where
    K: Indexed + Resource<DynamicType = ()> + std::fmt::Debug + serde::de::DeserializeOwned,
{
    wanted && answers::<K>(client, node_name).await
}

/// The watcher stream of one kind, with its selection and kube-rs's default backoff
/// (exponential, up to 30 s, reset after two minutes without error).
fn watch<K>(
    client: &Client,
    node_name: &str,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + use<K>
where
    K: Indexed
        + Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    watcher(Api::<K>::all(client.clone()), K::selection(node_name)).default_backoff()
}

/// Keeps the maps equal to the API server's Services and EndpointSlices (and this node's zone)
/// until asked to stop.
pub(crate) async fn run(
    options: &AgentOptions,
    kubeconfig: Option<&Path>,
    reconciler: &mut Reconciler,
    maps: &mut ServiceMaps,
    stop: &mut Stop,
    (health, metrics): (&Health, &Metrics),
) -> anyhow::Result<()> {
    let (client, server) = client(kubeconfig).await?;
    let node_name = options.node_name.as_str();
    info!(
        "watching Services and EndpointSlices (selector {PROXY_SELECTOR}) and Node {node_name} \
         at {server}"
    );
    let mut services = Objects::<Service>::new("Services");
    let mut slices = Objects::<EndpointSlice>::new("EndpointSlices");
    let mut nodes = Objects::<Node>::new("Node");
    let mut service_events = std::pin::pin!(watch::<Service>(&client, node_name));
    let mut slice_events = std::pin::pin!(watch::<EndpointSlice>(&client, node_name));
    let mut node_events = std::pin::pin!(watch::<Node>(&client, node_name));
    let mut index = Index::new(read_node(options, &NodeConfig::default()));
    let mut ready = false;
    let mut resync = interval_at(Instant::now() + options.resync, options.resync);
    let mut probe = interval_at(Instant::now() + PROBE_INTERVAL, PROBE_INTERVAL);
    // Probes run in a task of their own, so that a slow API server never holds up events or a
    // stop; their answers come back here.
    let (probed, mut probe_answers) = tokio::sync::mpsc::channel::<Answers>(1);
    let mut probing = false;
    let mut retry: Option<Instant> = None;
    let mut settings = SettingsRecord::new(options);
    loop {
        // A full reconciliation (every frontend compared) at start-up, at each resync and soon
        // after a failed write; in between, each event programs only what it touches.
        let mut full = !ready;
        let unreachable = !(services.reachable && slices.reachable && nodes.reachable);
        let changed = tokio::select! {
            Some(item) = service_events.next() => services.apply(item, &mut index),
            Some(item) = slice_events.next() => slices.apply(item, &mut index),
            Some(item) = node_events.next() => {
                let changed = nodes.apply(item, &mut index);
                if changed {
                    // The NodePort addresses may come from the Node (`primary`).
                    let node = read_node(options, index.node());
                    index.set_node(node);
                }
                changed
            }
            _ = resync.tick() => {
                let node = read_node(options, index.node());
                index.set_node(node);
                full = true;
                true
            }
            () = sleep_until(retry.unwrap_or_else(Instant::now)), if retry.is_some() => {
                retry = None;
                full = true;
                true
            }
            _ = probe.tick(), if unreachable && !probing => {
                probing = true;
                let wanted = [!services.reachable, !slices.reachable, !nodes.reachable];
                let (client, node_name, probed) =
                    (client.clone(), node_name.to_owned(), probed.clone());
                tokio::spawn(async move {
                    let (services, slices, nodes) = tokio::join!(
                        probe_if::<Service>(wanted[0], &client, &node_name),
                        probe_if::<EndpointSlice>(wanted[1], &client, &node_name),
                        probe_if::<Node>(wanted[2], &client, &node_name),
                    );
                    // The agent stopping closes the channel: nothing to report then.
                    let _ = probed.send([services, slices, nodes]).await;
                });
                false
            }
            Some([services_answer, slices_answer, nodes_answer]) = probe_answers.recv() => {
                probing = false;
                if services_answer {
                    services.answered();
                }
                if slices_answer {
                    slices.answered();
                }
                if nodes_answer {
                    nodes.answered();
                }
                false
            }
            () = stop.requested() => return Ok(()),
        };
        health.set_reachable(services.reachable && slices.reachable && nodes.reachable);
        // The Node's list completes too when it does not exist (an agent outside the cluster
        // with a --node-name no Node has): it then just has no zone. A role without the
        // permission to read Nodes (reported) does without zones rather than without Services.
        let node_known = nodes.listed || nodes.forbidden;
        if !(changed && services.listed && slices.listed && node_known) {
            continue;
        }
        let started = std::time::Instant::now();
        settings.record(index.node());
        let changes = index.flush();
        for notes in changes.notes.values() {
            for note in notes {
                info!("{}: {}", note.object, note.message);
            }
        }
        let summary = if full {
            reconciler.reconcile(&index.desired(), maps)
        } else {
            reconciler.reconcile_changes(&changes, maps)
        };
        report(&summary, reconciler);
        metrics.observe_sync(started.elapsed(), &summary, reconciler);
        settings.record_refusals(reconciler);
        if !summary.errors.is_empty() {
            retry = Some(Instant::now() + RETRY_AFTER_ERRORS);
        } else if summary.refused_again > 0 {
            // Room comes back only when something is removed or a capacity raised: a full
            // comparison every few seconds finds it without one every second.
            retry = Some(Instant::now() + RETRY_REFUSED);
        }
        if !ready {
            ready = true;
            health.set_ready();
            info!(
                services = index.service_ids().count(),
                endpoint_slices = index.slice_keys().count(),
                frontends = reconciler.frontend_count(),
                "ready: watching the API server; the first full list is programmed"
            );
        }
    }
}
