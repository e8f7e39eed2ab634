//! A Kubernetes API server fixture for the agent's Kubernetes source: no kube-apiserver can be
//! installed on these machines, so this serves the real list/watch protocol over HTTP from a
//! store of typed objects (k8s-openapi), the way the API server does for the calls kube-rs's
//! watcher makes:
//!
//! - `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`, `/api/v1/nodes`: a list
//!   (`ServiceList`, ...) carrying the store's resourceVersion, filtered by `labelSelector`
//!   (`key`, `!key`, `key=value`, `key!=value`) and `fieldSelector` (`metadata.name`,
//!   `metadata.namespace`);
//! - the same with `watch=true&resourceVersion=N`: a stream of JSON lines, `ADDED`, `MODIFIED`,
//!   `DELETED` for every change after N, `BOOKMARK`s when idle (with `allowWatchBookmarks`),
//!   ending after `timeoutSeconds`; an `ERROR` event with a `410 Gone` Status when N is older than
//!   the last compaction, as the API server answers an expired resourceVersion.
//!
//! Tests drive it: create, change and delete objects, compact the history (the next watch of an
//! older resourceVersion gets 410), end every open watch, cut a watch in the middle of an event
//! (half a JSON line, then the connection closed), answer lists slowly, and stop the server
//! (every connection closed, the port refusing) and start it again on the same port.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Frame, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use k8s_openapi::{Metadata, Resource, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use lb_tests::netns::Netns;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

/// How long an idle watch waits before sending a bookmark.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// Watch events buffered per watcher before a slow one is cut off (it re-watches).
const EVENT_BUFFER: usize = 65_536;
/// How long a cut event's half line is given to leave before the connections drop.
const CUT_FLUSH: Duration = Duration::from_millis(200);
/// A watch's length when the client does not say (the API server picks 30-60 min).
const DEFAULT_WATCH_SECONDS: u64 = 1800;

type Body = BoxBody<Bytes, Infallible>;

/// One stored change, as a watch sends it.
#[derive(Clone, Debug)]
struct Change {
    resource_version: u64,
    path: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    resource_version: u64,
    /// Watches from a resourceVersion older than this get 410 Gone.
    compacted: u64,
    /// Objects by collection path, then (namespace, name).
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    history: Vec<Change>,
}

struct Shared {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    /// Bumped to close every connection, and with them every open watch.
    epoch: watch::Sender<u64>,
    lists: AtomicU64,
    watches: AtomicU64,
    /// How long each list waits before it is answered.
    list_delay: Mutex<Duration>,
    /// The next watch event sent anywhere is cut in half and its connection closed.
    cut_next_event: AtomicBool,
    /// Collection paths answered with 403 Forbidden, as for a role without the permission.
    forbidden: Mutex<Vec<String>>,
}

/// The running fixture; stopped on drop.
pub struct ApiServer {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Runtime,
    netns_name: String,
    addr: SocketAddr,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl ApiServer {
    /// Starts the server on a free port of `netns`'s loopback.
    pub fn start(netns: &Netns) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let (changes, _) = broadcast::channel(EVENT_BUFFER);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changes,
            epoch: watch::Sender::new(0),
            lists: AtomicU64::new(0),
            watches: AtomicU64::new(0),
            list_delay: Mutex::new(Duration::ZERO),
            cut_next_event: AtomicBool::new(false),
            forbidden: Mutex::new(Vec::new()),
        });
        let mut server = Self {
            shared,
            runtime,
            netns_name: netns.name().to_owned(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            accept: None,
        };
        server.listen(netns)?;
        Ok(server)
    }

    fn listen(&mut self, netns: &Netns) -> anyhow::Result<()> {
        let addr = self.addr;
        let listener = netns
            .run(|| std::net::TcpListener::bind(addr))?
            .with_context(|| format!("binding the API server fixture to {addr}"))?;
        listener.set_nonblocking(true)?;
        self.addr = listener.local_addr()?;
        let shared = Arc::clone(&self.shared);
        let _guard = self.runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        self.accept = Some(self.runtime.spawn(accept(listener, shared)));
        Ok(())
    }

    /// Writes a kubeconfig pointing at the server to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fixture\n  cluster:\n    server: \
             http://{}\nusers:\n- name: fixture\n  user: {{}}\ncontexts:\n- name: fixture\n  \
             context:\n    cluster: fixture\n    user: fixture\n    namespace: default\n\
             current-context: fixture\n",
            self.addr
        );
        std::fs::write(path, config).with_context(|| format!("writing {}", path.display()))
    }

    /// Creates or replaces `object` (ADDED or MODIFIED).
    pub fn apply<K>(&self, object: &K)
    where
        K: Resource + Metadata<Ty = ObjectMeta> + Serialize,
    {
        let meta = object.metadata();
        let key = (
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        );
        let value = serde_json::to_value(object).expect("objects serialize");
        let path = collection_path::<K>();
        let mut store = self.shared.store.lock().expect("store lock");
        let exists = store
            .objects
            .get(&path)
            .is_some_and(|objects| objects.contains_key(&key));
        let kind = if exists { "MODIFIED" } else { "ADDED" };
        let stored = store.record(&path, kind, value, &self.shared.changes);
        store.objects.entry(path).or_default().insert(key, stored);
    }

    /// Deletes the object `namespace/name` of kind `K` (DELETED), if it exists.
    pub fn delete<K: Resource>(&self, namespace: &str, name: &str) {
        let path = collection_path::<K>();
        let mut store = self.shared.store.lock().expect("store lock");
        let key = (namespace.to_owned(), name.to_owned());
        let removed = store
            .objects
            .get_mut(&path)
            .and_then(|objects| objects.remove(&key));
        if let Some(object) = removed {
            store.record(&path, "DELETED", object, &self.shared.changes);
        }
    }

    /// Forgets the history: a watch resuming from any resourceVersion handed out so far gets
    /// 410 Gone and must list again. Open watches end, so that they resume.
    pub fn compact(&self) {
        {
            let mut store = self.shared.store.lock().expect("store lock");
            store.resource_version += 1;
            store.compacted = store.resource_version;
            store.history.clear();
        }
        self.end_watches();
    }

    /// Ends every open watch (closing the connections), as an API server does at a watch's
    /// timeout or when it goes away.
    pub fn end_watches(&self) {
        self.shared.epoch.send_modify(|epoch| *epoch += 1);
    }

    /// Answers every list `delay` late, as an overloaded API server does.
    pub fn set_list_delay(&self, delay: Duration) {
        *self.shared.list_delay.lock().expect("delay lock") = delay;
    }

    /// Cuts the next watch event sent (not a bookmark) after half of its bytes, then drops every
    /// connection without ending its response, as a network failing mid-stream does.
    pub fn cut_next_event(&self) {
        self.shared.cut_next_event.store(true, Ordering::SeqCst);
    }

    /// Answers every request for objects of `K` with 403 Forbidden, as the API server does when
    /// the client's role does not allow it.
    pub fn forbid<K: Resource>(&self) {
        self.shared
            .forbidden
            .lock()
            .expect("forbidden lock")
            .push(collection_path::<K>());
    }

    /// Stops serving: every connection closes and the port refuses connections.
    pub fn stop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            // The listener closes only once the aborted task is dropped: wait for it, so that
            // the port refuses at once and a restart can bind it again.
            let _ = self.runtime.block_on(accept);
        }
        self.end_watches();
    }

    /// Serves again, on the same port, after [`ApiServer::stop`].
    pub fn restart(&mut self, netns: &Netns) -> anyhow::Result<()> {
        anyhow::ensure!(netns.name() == self.netns_name, "same namespace as before");
        self.listen(netns)
    }

    /// List requests served so far.
    pub fn lists(&self) -> u64 {
        self.shared.lists.load(Ordering::SeqCst)
    }

    /// Watch requests served so far.
    pub fn watches(&self) -> u64 {
        self.shared.watches.load(Ordering::SeqCst)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Store {
    /// Bumps the resourceVersion, stamps it on `object`, records the change and announces it to
    /// the open watches (under the store's lock, so that a watch starting meanwhile sees it
    /// once: in its backlog or as news).
    fn record(
        &mut self,
        path: &str,
        kind: &'static str,
        mut object: Value,
        changes: &broadcast::Sender<Change>,
    ) -> Value {
        self.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        let change = Change {
            resource_version: self.resource_version,
            path: path.to_owned(),
            kind,
            object: object.clone(),
        };
        self.history.push(change.clone());
        // No receiver (no open watch) is not an error.
        let _ = changes.send(change);
        object
    }
}

/// `/api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`, ...
fn collection_path<K: Resource>() -> String {
    if K::GROUP.is_empty() {
        format!("/api/{}/{}", K::VERSION, K::URL_PATH_SEGMENT)
    } else {
        format!("/apis/{}/{}/{}", K::GROUP, K::VERSION, K::URL_PATH_SEGMENT)
    }
}

/// The list kind of a collection path.
fn list_kind(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/api/v1/services" => Some(("v1", "ServiceList")),
        "/apis/discovery.k8s.io/v1/endpointslices" => {
            Some(("discovery.k8s.io/v1", "EndpointSliceList"))
        }
        "/api/v1/nodes" => Some(("v1", "NodeList")),
        _ => None,
    }
}

async fn accept(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = Arc::clone(&shared);
        let mut epoch = shared.epoch.subscribe();
        let started = *epoch.borrow_and_update();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let shared = Arc::clone(&shared);
                async move {
                    let watch = request
                        .uri()
                        .query()
                        .is_some_and(|query| query.contains("watch=true"));
                    if !watch {
                        let delay = *shared.list_delay.lock().expect("delay lock");
                        tokio::time::sleep(delay).await;
                    }
                    Ok::<_, Infallible>(handle(&shared, request))
                }
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = epoch_moved(&mut epoch, started) => {}
            }
        });
    }
}

/// Resolves when the epoch moves past `started`: every connection closes then (ending its
/// watches; kube-rs reconnects at once), and a stop has also dropped the listener.
async fn epoch_moved(epoch: &mut watch::Receiver<u64>, started: u64) {
    while *epoch.borrow_and_update() == started {
        if epoch.changed().await.is_err() {
            return;
        }
    }
}

/// A selector requirement: `key`, `!key`, `key=value`, `key!=value`.
enum Requirement {
    Exists(String),
    Absent(String),
    Equals(String, String),
    Differs(String, String),
}

fn parse_selector(text: &str) -> Vec<Requirement> {
    text.split(',')
        .map(str::trim)
        .filter(|term| !term.is_empty())
        .map(|term| {
            if let Some((key, value)) = term.split_once("!=") {
                Requirement::Differs(key.to_owned(), value.to_owned())
            } else if let Some((key, value)) =
                term.split_once("==").or_else(|| term.split_once('='))
            {
                Requirement::Equals(key.to_owned(), value.to_owned())
            } else if let Some(key) = term.strip_prefix('!') {
                Requirement::Absent(key.to_owned())
            } else {
                Requirement::Exists(term.to_owned())
            }
        })
        .collect()
}

/// Whether `values` (labels, or the field values by path) meet every requirement.
fn meets(requirements: &[Requirement], value_of: impl Fn(&str) -> Option<String>) -> bool {
    requirements.iter().all(|requirement| match requirement {
        Requirement::Exists(key) => value_of(key).is_some(),
        Requirement::Absent(key) => value_of(key).is_none(),
        Requirement::Equals(key, value) => value_of(key).as_deref() == Some(value),
        Requirement::Differs(key, value) => value_of(key).as_deref() != Some(value),
    })
}

/// The request's filters.
struct Filter {
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
}

impl Filter {
    fn admits(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        meets(&self.labels, |key| labels[key].as_str().map(str::to_owned))
            && meets(&self.fields, |path| {
                let mut value = object;
                for part in path.split('.') {
                    value = &value[part];
                }
                value.as_str().map(str::to_owned)
            })
    }
}

fn handle(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let query: BTreeMap<String, String> = request
        .uri()
        .query()
        .map(|query| {
            form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let Some((api_version, list_kind)) = list_kind(&path) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no collection at {path}"),
        );
    };
    if shared
        .forbidden
        .lock()
        .expect("forbidden lock")
        .contains(&path)
    {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!("the agent's role may not list {path}"),
        );
    }
    let filter = Filter {
        labels: parse_selector(query.get("labelSelector").map_or("", String::as_str)),
        fields: parse_selector(query.get("fieldSelector").map_or("", String::as_str)),
    };
    if query
        .get("watch")
        .is_some_and(|watch| watch == "true" || watch == "1")
    {
        shared.watches.fetch_add(1, Ordering::SeqCst);
        let since: u64 = query
            .get("resourceVersion")
            .and_then(|version| version.parse().ok())
            .unwrap_or(0);
        let seconds: u64 = query
            .get("timeoutSeconds")
            .and_then(|seconds| seconds.parse().ok())
            .unwrap_or(DEFAULT_WATCH_SECONDS);
        let bookmarks = query
            .get("allowWatchBookmarks")
            .is_some_and(|b| b == "true");
        return watch_response(shared, &path, filter, since, seconds, bookmarks);
    }
    shared.lists.fetch_add(1, Ordering::SeqCst);
    let store = shared.store.lock().expect("store lock");
    let items: Vec<&Value> = store
        .objects
        .get(&path)
        .into_iter()
        .flat_map(BTreeMap::values)
        .filter(|object| filter.admits(object))
        .collect();
    let list = json!({
        "apiVersion": api_version,
        "kind": list_kind,
        "metadata": {"resourceVersion": store.resource_version.to_string()},
        "items": items,
    });
    json_response(StatusCode::OK, &list)
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("a valid response")
}

fn status_object(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status_object(code, reason, message))
}

fn line(event: &Value) -> Result<Frame<Bytes>, Infallible> {
    Ok(Frame::data(Bytes::from(format!("{event}\n"))))
}

/// The first half of `event`'s line, without its end.
fn half_line(event: &Value) -> Result<Frame<Bytes>, Infallible> {
    let text = event.to_string();
    Ok(Frame::data(Bytes::from(text[..text.len() / 2].to_owned())))
}

fn watch_response(
    shared: &Arc<Shared>,
    path: &str,
    filter: Filter,
    since: u64,
    seconds: u64,
    bookmarks: bool,
) -> Response<Body> {
    let (backlog, mut changes, current, gone) = {
        let store = shared.store.lock().expect("store lock");
        let changes = shared.changes.subscribe();
        let gone = since != 0 && since < store.compacted;
        let backlog: Vec<Change> = store
            .history
            .iter()
            .filter(|change| change.resource_version > since && change.path == path)
            .cloned()
            .collect();
        (backlog, changes, store.resource_version, gone)
    };
    let body: Body = if gone {
        let event = json!({
            "type": "ERROR",
            "object": status_object(
                StatusCode::GONE,
                "Expired",
                &format!("too old resource version: {since} ({current})"),
            ),
        });
        BodyExt::boxed(StreamBody::new(futures::stream::iter([line(&event)])))
    } else {
        let path = path.to_owned();
        let mut epoch = shared.epoch.subscribe();
        let _ = epoch.borrow_and_update();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
        let bookmark_kind = list_kind(&path).map_or("", |(_, kind)| kind.trim_end_matches("List"));
        let bookmark_version = list_kind(&path).map_or("v1", |(version, _)| version);
        let shared = Arc::clone(shared);
        // Each event, and whether to cut it (after which the stream ends).
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<(Value, bool)>(EVENT_BUFFER);
        tokio::spawn(async move {
            let mut seen = since;
            for change in backlog {
                seen = change.resource_version;
                if filter.admits(&change.object)
                    && sender
                        .send((json!({"type": change.kind, "object": change.object}), false))
                        .await
                        .is_err()
                {
                    return;
                }
            }
            loop {
                let event = tokio::select! {
                    biased;
                    _ = epoch.changed() => return,
                    () = tokio::time::sleep_until(deadline) => return,
                    () = sender.closed() => return,
                    change = changes.recv() => match change {
                        Ok(change) => {
                            seen = seen.max(change.resource_version);
                            if change.path != path || !filter.admits(&change.object) {
                                continue;
                            }
                            json!({"type": change.kind, "object": change.object})
                        }
                        // Too slow to follow: end the watch, the client resumes.
                        Err(_) => return,
                    },
                    () = tokio::time::sleep(BOOKMARK_INTERVAL), if bookmarks => {
                        let current = shared.store.lock().expect("store lock").resource_version;
                        seen = seen.max(current);
                        json!({
                            "type": "BOOKMARK",
                            "object": {
                                "apiVersion": bookmark_version,
                                "kind": bookmark_kind,
                                "metadata": {"resourceVersion": seen.to_string()},
                            },
                        })
                    }
                };
                let cut = event["type"] != "BOOKMARK"
                    && shared.cut_next_event.swap(false, Ordering::SeqCst);
                if sender.send((event, cut)).await.is_err() {
                    return;
                }
                if cut {
                    // Let the half line out, then drop the connections without ending their
                    // responses, as a broken network does.
                    tokio::time::sleep(CUT_FLUSH).await;
                    shared.epoch.send_modify(|epoch| *epoch += 1);
                    return;
                }
            }
        });
        let stream = futures::stream::poll_fn(move |context| receiver.poll_recv(context)).map(
            |(event, cut)| {
                if cut { half_line(&event) } else { line(&event) }
            },
        );
        BodyExt::boxed(StreamBody::new(stream))
    };
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(body)
        .expect("a valid response")
}
