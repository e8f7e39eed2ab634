//! Where the Service maps are written: the difference between the desired state and what the maps
//! hold, applied with the fewest writes and make-before-break.
//!
//! For a frontend whose backends changed, new backends are written first, then the slots of a
//! fresh backend set, then the one `LB_SERVICES` value that switches packets to the new set, and
//! only then are the old slots and the departed backends removed. Backends that stay keep their
//! ids, so established flows (whose conntrack entries name a backend id) are undisturbed. A
//! *draining* backend (listed but not ready) keeps its entry and id without a slot: its
//! established flows continue, new flows never get it.
//!
//! Failures never leak: every entry that no frontend references any more (the old half of a
//! switch, the new half of a switch that failed, what a removal leaves) goes on a garbage list
//! that is deleted at the end of every reconciliation and retried until it succeeds; an id returns
//! to its pool only once its entries are really gone. Deletes are idempotent, so a retry after a
//! partial failure always converges.
//!
//! The reconciler keeps a mirror of what it wrote; at start-up it reads the mirror back from the
//! pinned maps (an agent restart) and sweeps entries no frontend references (an agent that died
//! half-way through a switch). Writes go through [`ServiceStore`], so the planning logic is
//! host-tested against [`MemoryStore`].

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use anyhow::Context as _;
use lb_common::{
    limits::{MAP_BACKENDS, MAP_SERVICES, MAP_SLOTS, MAX_BACKENDS, MAX_SERVICES},
    net::{addr_from_wire, addr_to_wire, port_from_wire, port_to_wire},
    service::{
        BACKEND_ACTIVE, BACKEND_CONDITIONS, BACKEND_DRAINING, BACKEND_REMOTE, Backend, NAME_LEN,
        PORT_NAME_LEN, SERVICE_DROP_WHEN_EMPTY, SERVICE_SNAT_REMOTE, SERVICE_SOURCE_RANGES,
        ServiceInfo, ServiceKey, ServiceValue, SlotKey, frontend_kind_name, policy_name,
        service_type_name,
    },
};

use crate::{
    desired::{BackendAddr, DesiredState, Frontend, index::Changes},
    node::Ipv4Cidr,
};

/// Write and read access to the Service maps. Deletes of absent entries succeed.
pub trait ServiceStore {
    /// How many frontends the maps hold at most: service ids stay below it.
    fn service_capacity(&self) -> u32 {
        MAX_SERVICES
    }
    /// How many backends the maps hold at most: backend ids stay below it.
    fn backend_capacity(&self) -> u32 {
        MAX_BACKENDS
    }
    fn set_backend(&mut self, id: u32, backend: &Backend) -> anyhow::Result<()>;
    fn clear_backend(&mut self, id: u32) -> anyhow::Result<()>;
    fn set_slot(&mut self, key: SlotKey, backend_id: u32) -> anyhow::Result<()>;
    fn delete_slot(&mut self, key: SlotKey) -> anyhow::Result<()>;
    fn set_service(&mut self, key: ServiceKey, value: &ServiceValue) -> anyhow::Result<()>;
    fn delete_service(&mut self, key: ServiceKey) -> anyhow::Result<()>;
    fn set_info(&mut self, service_id: u32, info: &ServiceInfo) -> anyhow::Result<()>;
    fn delete_info(&mut self, service_id: u32) -> anyhow::Result<()>;

    fn read_services(&self) -> anyhow::Result<Vec<(ServiceKey, ServiceValue)>>;
    fn read_slots(&self) -> anyhow::Result<Vec<(SlotKey, u32)>>;
    fn read_active_backends(&self) -> anyhow::Result<Vec<(u32, Backend)>>;
    fn read_infos(&self) -> anyhow::Result<Vec<(u32, ServiceInfo)>>;

    /// Admits `range` to the frontend `service_id` in `LB_SRC_RANGES`.
    fn set_source_range(&mut self, service_id: u32, range: Ipv4Cidr) -> anyhow::Result<()>;
    fn delete_source_range(&mut self, service_id: u32, range: Ipv4Cidr) -> anyhow::Result<()>;
    fn read_source_ranges(&self) -> anyhow::Result<Vec<(u32, Ipv4Cidr)>>;

    /// Adds a ClusterIP (network byte order) to `LB_CLUSTER_IPS`.
    fn set_cluster_ip(&mut self, addr: u32) -> anyhow::Result<()>;
    fn delete_cluster_ip(&mut self, addr: u32) -> anyhow::Result<()>;
    fn read_cluster_ips(&self) -> anyhow::Result<Vec<u32>>;
}

/// Encodes what a frontend is for `LB_SVC_INFO`: names, type, policies, generation, endpoint
/// counts. Validated names always fit; the truncation only guards the fixed-size fields.
pub fn service_info(frontend: &Frontend) -> ServiceInfo {
    fn copy<const N: usize>(text: &str) -> [u8; N] {
        let mut field = [0u8; N];
        let mut end = text.len().min(N - 1);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        field[..end].copy_from_slice(&text.as_bytes()[..end]);
        field
    }
    ServiceInfo {
        namespace: copy::<NAME_LEN>(&frontend.namespace),
        name: copy::<NAME_LEN>(&frontend.name),
        port_name: copy::<PORT_NAME_LEN>(&frontend.port_name),
        generation: frontend.details.generation,
        ready: frontend.details.counts.ready,
        serving: frontend.details.counts.serving,
        terminating: frontend.details.counts.terminating,
        service_type: frontend.details.service_type,
        frontend_kind: frontend.details.frontend_kind,
        internal_policy: frontend.details.internal_policy,
        external_policy: frontend.details.external_policy,
    }
}

/// The `LB_BACKENDS` value of `backend`, an endpoint of `frontend` (whose id is `service_id`):
/// its datapath bits and its informational condition bits.
fn entry_for(
    service_id: u32,
    frontend: &Frontend,
    backend: &BackendAddr,
    draining: bool,
) -> Backend {
    let conditions = frontend
        .details
        .conditions
        .get(backend)
        .copied()
        .unwrap_or(0);
    backend_entry(service_id, backend, draining, conditions)
}

/// The `LB_BACKENDS` value of `backend`, an endpoint of the frontend `service_id`, with the
/// informational `conditions` bits (`BACKEND_CONDITIONS`).
fn backend_entry(
    service_id: u32,
    backend: &BackendAddr,
    draining: bool,
    conditions: u8,
) -> Backend {
    let mut flags = BACKEND_ACTIVE | (conditions & BACKEND_CONDITIONS);
    if draining {
        flags |= BACKEND_DRAINING;
    }
    if backend.remote {
        flags |= BACKEND_REMOTE;
    }
    Backend {
        addr: addr_to_wire(backend.addr),
        port: port_to_wire(backend.port),
        flags,
        _pad: 0,
        service_id,
    }
}

/// Whether the frontend's value carries `frontend`'s policy (everything but the backend set).
fn same_policy(value: &ServiceValue, frontend: &Frontend) -> bool {
    value.flags == frontend.flags() && value.affinity_timeout_s == frontend.affinity_timeout_s
}

fn backend_addr(backend: &Backend) -> BackendAddr {
    BackendAddr {
        addr: addr_from_wire(backend.addr),
        port: port_from_wire(backend.port),
        remote: backend.flags & BACKEND_REMOTE != 0,
    }
}

/// `[10.1.1.2:8080, 10.1.2.2:8080]`: endpoints in a reason of [`Reconciler::drift`].
fn endpoint_list<'a>(backends: impl Iterator<Item = &'a BackendAddr>) -> String {
    let listed: Vec<String> = backends
        .map(|backend| {
            let remote = if backend.remote { " (remote)" } else { "" };
            format!("{}:{}{remote}", backend.addr, backend.port)
        })
        .collect();
    format!("[{}]", listed.join(", "))
}

/// The `SERVICE_*` bits of `flags` by name, `none` without any.
fn flag_names(flags: u32) -> String {
    let names: Vec<&str> = [
        (SERVICE_DROP_WHEN_EMPTY, "drop-when-empty"),
        (SERVICE_SOURCE_RANGES, "source-ranges"),
        (SERVICE_SNAT_REMOTE, "snat-remote"),
    ]
    .iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| *name)
    .collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join("+")
    }
}

/// The `BACKEND_*` bits of `flags` by name.
fn backend_flag_names(flags: u8) -> String {
    use lb_common::service::{BACKEND_READY, BACKEND_SERVING, BACKEND_TERMINATING};
    let names: Vec<&str> = [
        (BACKEND_ACTIVE, "active"),
        (BACKEND_DRAINING, "draining"),
        (BACKEND_REMOTE, "remote"),
        (BACKEND_READY, "ready"),
        (BACKEND_SERVING, "serving"),
        (BACKEND_TERMINATING, "terminating"),
    ]
    .iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| *name)
    .collect();
    if names.is_empty() {
        "nothing".to_owned()
    } else {
        names.join("+")
    }
}

/// Why the `LB_SVC_INFO` entry `held` is not `wanted`, field by field.
fn info_differences(held: &ServiceInfo, wanted: &ServiceInfo) -> Vec<String> {
    let mut reasons = Vec::new();
    let mut compare = |what: &str, held: String, wanted: String| {
        if held != wanted {
            reasons.push(format!(
                "{what}: the maps hold {held}, the objects give {wanted}"
            ));
        }
    };
    let text = |bytes: &[u8]| {
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        format!("{:?}", String::from_utf8_lossy(&bytes[..end]))
    };
    compare(
        "name",
        format!("{}/{}", text(&held.namespace), text(&held.name)),
        format!("{}/{}", text(&wanted.namespace), text(&wanted.name)),
    );
    compare("port name", text(&held.port_name), text(&wanted.port_name));
    compare(
        "generation",
        held.generation.to_string(),
        wanted.generation.to_string(),
    );
    let counts = |info: &ServiceInfo| {
        format!(
            "{} ready/{} serving/{} terminating",
            info.ready, info.serving, info.terminating
        )
    };
    compare("endpoint counts", counts(held), counts(wanted));
    let codes = |info: &ServiceInfo| {
        format!(
            "type {} ({} frontend), internal/external traffic policy {}/{}",
            service_type_name(info.service_type),
            frontend_kind_name(info.frontend_kind),
            policy_name(info.internal_policy),
            policy_name(info.external_policy)
        )
    };
    compare("type and policies", codes(held), codes(wanted));
    reasons
}

/// A write refused for lack of room: the map is full, or (for maps indexed by id) every id below
/// its capacity is taken. The frontend it was for is not programmed (or keeps its old entries)
/// until room is made; `lb agent`'s capacity flags size the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFull {
    pub map: &'static str,
    pub capacity: u32,
}

impl MapFull {
    /// The `lb agent` flag that sizes `map`, if one does.
    pub fn flag(&self) -> Option<&'static str> {
        use lb_common::limits::{
            MAP_AFFINITY, MAP_BACKENDS, MAP_CLUSTER_IPS, MAP_SERVICE_INFO, MAP_SERVICES, MAP_SLOTS,
        };
        match self.map {
            MAP_SERVICES | MAP_SERVICE_INFO | MAP_CLUSTER_IPS => Some("--max-services"),
            MAP_BACKENDS | MAP_SLOTS => Some("--max-backends"),
            MAP_AFFINITY => Some("--affinity-entries"),
            _ => None,
        }
    }
}

impl std::fmt::Display for MapFull {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "map {} is full ({} entries)",
            self.map, self.capacity
        )?;
        match self.flag() {
            Some(flag) => write!(formatter, ": raise `lb agent {flag}` (needs `lb reset`)"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for MapFull {}

/// A frontend the maps could not take (or could not update) for lack of room.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Refusal {
    /// The map that was full.
    pub map: String,
    pub capacity: u32,
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    /// `10.96.0.10:80/TCP`.
    pub frontend: String,
    /// The frontend holds its previous entries (an update was refused); `false`: it is not in
    /// the maps at all.
    pub stale: bool,
}

/// A pool of ids in `1..limit`, handed out round-robin so a freed id is reused as late as
/// possible (conntrack entries may still name it; they check the address too, but later is
/// better).
#[derive(Debug)]
struct IdPool {
    used: BTreeSet<u32>,
    next: u32,
    limit: u32,
    /// The map the ids index (or the map an id names entries of).
    map: &'static str,
}

impl IdPool {
    fn new(limit: u32, map: &'static str) -> Self {
        Self {
            used: BTreeSet::new(),
            next: 1,
            limit,
            map,
        }
    }

    fn mark_used(&mut self, id: u32) {
        self.used.insert(id);
        if id >= self.next {
            self.next = if id + 1 >= self.limit { 1 } else { id + 1 };
        }
    }

    fn allocate(&mut self) -> anyhow::Result<u32> {
        if self.used.len() as u64 >= u64::from(self.limit) - 1 {
            return Err(MapFull {
                map: self.map,
                capacity: self.limit,
            }
            .into());
        }
        let mut id = self.next.max(1);
        while self.used.contains(&id) {
            id = if id + 1 >= self.limit { 1 } else { id + 1 };
        }
        self.used.insert(id);
        self.next = if id + 1 >= self.limit { 1 } else { id + 1 };
        Ok(id)
    }

    /// Ids left to hand out.
    fn available(&self) -> u64 {
        (u64::from(self.limit) - 1).saturating_sub(self.used.len() as u64)
    }

    /// Fails with [`MapFull`] unless `count` ids are left: checked before a frontend's first
    /// write, so that a frontend too big for what is left takes no id from one that fits.
    fn ensure(&self, count: usize) -> anyhow::Result<()> {
        if (count as u64) > self.available() {
            return Err(MapFull {
                map: self.map,
                capacity: self.limit,
            }
            .into());
        }
        Ok(())
    }

    fn release(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

/// What the maps hold for one frontend.
#[derive(Clone, Debug)]
struct LiveFrontend {
    value: ServiceValue,
    /// Backend ids in slot order.
    ids: Vec<u32>,
    /// Backends in slot order (parallel to `ids`).
    backends: Vec<BackendAddr>,
    /// Backends kept for established flows only (in no slot), by address.
    draining: BTreeMap<BackendAddr, u32>,
    info: Option<ServiceInfo>,
    /// What `LB_SRC_RANGES` holds for this frontend.
    source_ranges: BTreeSet<Ipv4Cidr>,
    /// The `Backend::flags` each of its backend entries (slotted and draining) holds, by id.
    flags: BTreeMap<u32, u8>,
    /// The maps are not known to match `ids`/`backends` (a failed or interrupted write): rewrite.
    dirty: bool,
}

/// An entry no frontend references any more, waiting to be deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Garbage {
    Slot(SlotKey),
    /// Also returns the backend id to its pool once cleared.
    Backend(u32),
    /// A source range of a frontend (by service id). Sorted before `Info`, so that a service id
    /// returns to its pool only once its ranges are gone.
    SourceRange(u32, Ipv4Cidr),
    /// Also returns the service id to its pool once deleted.
    Info(u32),
}

/// How one frontend of the maps differs from the objects (see [`Reconciler::drift`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drift {
    pub key: ServiceKey,
    /// The Service it belongs to: the objects' (missing, stale) or `LB_SVC_INFO`'s (extra;
    /// empty when the maps do not name it).
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub kind: DriftKind,
    /// Why, one line per difference.
    pub reasons: Vec<String>,
}

/// The three ways a frontend drifts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DriftKind {
    /// The objects ask for it; `LB_SERVICES` lacks it.
    Missing,
    /// The maps hold it; no object asks for it.
    Extra,
    /// Both have it, with differences.
    Stale,
}

/// One frontend as the maps hold it (see [`Reconciler::held`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldFrontend {
    pub key: ServiceKey,
    pub value: ServiceValue,
    pub info: Option<ServiceInfo>,
    pub backends: Vec<HeldBackend>,
}

/// One backend entry of a held frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldBackend {
    /// Its `LB_BACKENDS` index, which conntrack entries name.
    pub id: u32,
    pub backend: BackendAddr,
    /// Its slot in the frontend's backend set; `None`: draining (no new flows).
    pub slot: Option<u32>,
    /// Its `Backend::flags`.
    pub flags: u8,
}

/// Counts of one reconciliation.
#[derive(Debug, Default)]
pub struct Summary {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// Map writes and deletes performed.
    pub writes: usize,
    /// Frontends that could not be programmed; each is retried on the next reconciliation.
    pub errors: Vec<anyhow::Error>,
    /// Frontends refused again for lack of room in the same map as before: retried like the
    /// errors, but not reported again (see [`Reconciler::refused`]).
    pub refused_again: usize,
}

impl Summary {
    /// Whether anything was written.
    pub fn changed(&self) -> bool {
        self.writes > 0
    }
}

/// Counts writes as they happen.
struct Counting<'a, S: ServiceStore> {
    store: &'a mut S,
    writes: usize,
}

impl<S: ServiceStore> Counting<'_, S> {
    fn run(&mut self, write: impl FnOnce(&mut S) -> anyhow::Result<()>) -> anyhow::Result<()> {
        write(self.store)?;
        self.writes += 1;
        Ok(())
    }
}

/// Keeps the Service maps equal to the desired state; see the module documentation.
#[derive(Debug)]
pub struct Reconciler {
    live: BTreeMap<ServiceKey, LiveFrontend>,
    service_ids: IdPool,
    backend_ids: IdPool,
    backend_sets: IdPool,
    /// Entries to delete; see the module documentation.
    garbage: BTreeSet<Garbage>,
    /// What `LB_CLUSTER_IPS` holds (network byte order), written or read back.
    cluster_ips: BTreeSet<u32>,
    /// Frontends refused for lack of room, until they are programmed or no longer wanted.
    refused: BTreeMap<ServiceKey, Refusal>,
    /// The last pass found `LB_CLUSTER_IPS` full.
    cluster_ips_full: bool,
}

impl Reconciler {
    /// Reads what the maps hold and removes the entries no frontend references. Returns the
    /// reconciler and the number of stray entries removed.
    pub fn from_store(store: &mut impl ServiceStore) -> anyhow::Result<(Self, usize)> {
        let (mut reconciler, reflag) = Self::read(store)?;
        let mut counting = Counting { store, writes: 0 };
        for (id, value) in reflag {
            counting
                .run(|store| store.set_backend(id, &value))
                .context("correcting a backend's draining flag")?;
            let owner = reconciler
                .live
                .values_mut()
                .find(|live| live.value.service_id == value.service_id);
            if let Some(live) = owner {
                live.flags.insert(id, value.flags);
            }
        }
        if let Some(error) = reconciler.collect_garbage(&mut counting).into_iter().next() {
            return Err(error.context("sweeping stray entries"));
        }
        Ok((reconciler, counting.writes))
    }

    /// Reads what the maps hold without writing anything (what `lb plan` and `lb backends` see):
    /// the frontends, their slotted and draining backends, and the stray entries as garbage.
    /// Also returns the backend entries whose draining flag contradicts the slots, with the
    /// value they should hold ([`Reconciler::from_store`] writes them).
    pub fn read(store: &impl ServiceStore) -> anyhow::Result<(Self, Vec<(u32, Backend)>)> {
        let mut reconciler = Self {
            live: BTreeMap::new(),
            service_ids: IdPool::new(store.service_capacity(), MAP_SERVICES),
            backend_ids: IdPool::new(store.backend_capacity(), MAP_BACKENDS),
            backend_sets: IdPool::new(u32::MAX, MAP_SLOTS),
            garbage: BTreeSet::new(),
            cluster_ips: store.read_cluster_ips()?.into_iter().collect(),
            refused: BTreeMap::new(),
            cluster_ips_full: false,
        };
        let slots: BTreeMap<SlotKey, u32> = store.read_slots()?.into_iter().collect();
        let backends: BTreeMap<u32, Backend> = store.read_active_backends()?.into_iter().collect();
        let infos: BTreeMap<u32, ServiceInfo> = store.read_infos()?.into_iter().collect();
        let mut used_slots = BTreeSet::new();
        for (key, value) in store.read_services()? {
            let mut live = LiveFrontend {
                value,
                ids: Vec::new(),
                backends: Vec::new(),
                draining: BTreeMap::new(),
                info: infos.get(&value.service_id).copied(),
                source_ranges: BTreeSet::new(),
                flags: BTreeMap::new(),
                dirty: false,
            };
            for slot in 0..value.backend_count {
                let slot_key = SlotKey {
                    backend_set: value.backend_set,
                    slot,
                };
                match slots
                    .get(&slot_key)
                    .and_then(|id| backends.get(id).map(|backend| (*id, backend)))
                {
                    Some((id, backend)) => {
                        used_slots.insert(slot_key);
                        live.ids.push(id);
                        live.backends.push(backend_addr(backend));
                        live.flags.insert(id, backend.flags);
                    }
                    None => live.dirty = true,
                }
            }
            reconciler.service_ids.mark_used(value.service_id);
            if value.backend_set != 0 {
                reconciler.backend_sets.mark_used(value.backend_set);
            }
            for id in &live.ids {
                reconciler.backend_ids.mark_used(*id);
            }
            reconciler.live.insert(key, live);
        }

        // Active backends in no slot of their frontend are that frontend's draining ones.
        let by_service_id: BTreeMap<u32, ServiceKey> = reconciler
            .live
            .iter()
            .map(|(key, live)| (live.value.service_id, *key))
            .collect();
        for (id, backend) in &backends {
            if reconciler.backend_ids.used.contains(id) {
                continue;
            }
            let Some(live) = by_service_id
                .get(&backend.service_id)
                .and_then(|key| reconciler.live.get_mut(key))
            else {
                continue;
            };
            let addr = backend_addr(backend);
            if !live.backends.contains(&addr) && !live.draining.contains_key(&addr) {
                live.draining.insert(addr, *id);
                live.flags.insert(*id, backend.flags);
                reconciler.backend_ids.mark_used(*id);
            }
        }

        // The draining flag follows the slots: an agent that stopped between a switch and its
        // flag write left it wrong.
        let mut reflag = Vec::new();
        for live in reconciler.live.values() {
            let service_id = live.value.service_id;
            let slotted = live
                .ids
                .iter()
                .zip(&live.backends)
                .map(|(id, b)| (id, b, false));
            let draining = live.draining.iter().map(|(b, id)| (id, b, true));
            for (id, backend, should_drain) in slotted.chain(draining) {
                let flags = backends.get(id).map_or(0, |entry| entry.flags);
                if (flags & BACKEND_DRAINING != 0) != should_drain {
                    let conditions = flags & BACKEND_CONDITIONS;
                    let value = backend_entry(service_id, backend, should_drain, conditions);
                    reflag.push((*id, value));
                }
            }
        }

        // Strays keep their ids reserved until they are gone, so nothing new lands on them.
        for key in slots.keys().filter(|key| !used_slots.contains(key)) {
            reconciler.backend_sets.mark_used(key.backend_set);
            reconciler.garbage.insert(Garbage::Slot(*key));
        }
        for id in backends.keys() {
            if !reconciler.backend_ids.used.contains(id) {
                reconciler.backend_ids.mark_used(*id);
                reconciler.garbage.insert(Garbage::Backend(*id));
            }
        }
        for id in infos.keys() {
            if !reconciler.service_ids.used.contains(id) {
                reconciler.service_ids.mark_used(*id);
                reconciler.garbage.insert(Garbage::Info(*id));
            }
        }
        for (id, range) in store.read_source_ranges()? {
            match by_service_id
                .get(&id)
                .and_then(|key| reconciler.live.get_mut(key))
            {
                Some(live) => {
                    live.source_ranges.insert(range);
                }
                None => {
                    reconciler.garbage.insert(Garbage::SourceRange(id, range));
                }
            }
        }
        Ok((reconciler, reflag))
    }

    /// Deletes the garbage; what fails stays for the next attempt. Returns at most one error,
    /// summarising the failures, so a stuck map does not flood the log.
    fn collect_garbage(
        &mut self,
        store: &mut Counting<'_, impl ServiceStore>,
    ) -> Vec<anyhow::Error> {
        let mut errors: Vec<anyhow::Error> = Vec::new();
        let mut retired_sets = BTreeSet::new();
        for item in std::mem::take(&mut self.garbage) {
            let result = match item {
                Garbage::Slot(key) => {
                    retired_sets.insert(key.backend_set);
                    store.run(|store| store.delete_slot(key))
                }
                Garbage::Backend(id) => store.run(|store| store.clear_backend(id)),
                Garbage::SourceRange(id, range) => {
                    store.run(|store| store.delete_source_range(id, range))
                }
                Garbage::Info(id)
                    if self
                        .garbage
                        .iter()
                        .any(|item| matches!(item, Garbage::SourceRange(of, _) if *of == id)) =>
                {
                    // A range of this id could not be deleted: the id must not be reused yet.
                    self.garbage.insert(item);
                    continue;
                }
                Garbage::Info(id) => store.run(|store| store.delete_info(id)),
            };
            match result {
                Ok(()) => match item {
                    Garbage::Slot(_) | Garbage::SourceRange(..) => {}
                    Garbage::Backend(id) => self.backend_ids.release(id),
                    Garbage::Info(id) => self.service_ids.release(id),
                },
                Err(error) => {
                    errors.push(error.context(format!("deleting {item:?}")));
                    self.garbage.insert(item);
                }
            }
        }
        // A set id is free again once none of its slots is live or waiting for deletion.
        let live_sets: BTreeSet<u32> = self
            .live
            .values()
            .map(|live| live.value.backend_set)
            .collect();
        let failed = errors.len();
        let first = errors.into_iter().next().map(|error| {
            error.context(format!(
                "{failed} stale map entries could not be deleted; retrying at the next sync"
            ))
        });
        for set in retired_sets {
            let pending = self
                .garbage
                .iter()
                .any(|item| matches!(item, Garbage::Slot(key) if key.backend_set == set));
            if !pending && !live_sets.contains(&set) {
                self.backend_sets.release(set);
            }
        }
        first.into_iter().collect()
    }

    /// The slots of a frontend's backend set, as garbage.
    fn slots_of(value: &ServiceValue) -> impl Iterator<Item = Garbage> + use<> {
        let set = value.backend_set;
        let count = if set == 0 { 0 } else { value.backend_count };
        (0..count).map(move |slot| {
            Garbage::Slot(SlotKey {
                backend_set: set,
                slot,
            })
        })
    }

    /// The frontends refused for lack of room, until programmed or no longer wanted.
    pub fn refused(&self) -> impl Iterator<Item = &Refusal> {
        self.refused.values()
    }

    /// Number of frontends the maps hold.
    pub fn frontend_count(&self) -> usize {
        self.live.len()
    }

    /// How the maps differ from `desired`, frontend by frontend, by the comparison
    /// [`Reconciler::reconcile`] decides its writes with: empty exactly when a reconciliation
    /// would leave every frontend unchanged. Sorted by key.
    pub fn drift(&self, desired: &DesiredState) -> Vec<Drift> {
        let mut drift = Vec::new();
        for (key, frontend) in &desired.frontends {
            let (kind, reasons) = match self.live.get(key) {
                None => (
                    DriftKind::Missing,
                    vec!["LB_SERVICES has no entry for it".to_owned()],
                ),
                Some(live) => {
                    let reasons = Self::differences(live, frontend);
                    if reasons.is_empty() {
                        continue;
                    }
                    (DriftKind::Stale, reasons)
                }
            };
            drift.push(Drift {
                key: *key,
                namespace: frontend.namespace.clone(),
                name: frontend.name.clone(),
                port_name: frontend.port_name.clone(),
                kind,
                reasons,
            });
        }
        for (key, live) in &self.live {
            if desired.frontends.contains_key(key) {
                continue;
            }
            let text = |field: fn(&ServiceInfo) -> &[u8]| {
                live.info.as_ref().map_or_else(String::new, |info| {
                    let bytes = field(info);
                    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
                    String::from_utf8_lossy(&bytes[..end]).into_owned()
                })
            };
            drift.push(Drift {
                key: *key,
                namespace: text(|info| &info.namespace[..]),
                name: text(|info| &info.name[..]),
                port_name: text(|info| &info.port_name[..]),
                kind: DriftKind::Extra,
                reasons: vec![
                    "no Service asks for it (the Service, its port or this address is gone)"
                        .to_owned(),
                ],
            });
        }
        drift.sort_by_key(|drift| drift.key);
        drift
    }

    /// ClusterIPs `desired` has that `LB_CLUSTER_IPS` lacks, and those it holds that `desired`
    /// does not have.
    pub fn cluster_ip_drift(&self, desired: &DesiredState) -> (Vec<Ipv4Addr>, Vec<Ipv4Addr>) {
        let wanted: BTreeSet<u32> = desired
            .cluster_ips
            .iter()
            .map(|addr| addr_to_wire(*addr))
            .collect();
        let addrs = |set: std::collections::btree_set::Difference<'_, u32>| {
            let mut addrs: Vec<Ipv4Addr> = set.map(|addr| addr_from_wire(*addr)).collect();
            addrs.sort();
            addrs
        };
        (
            addrs(wanted.difference(&self.cluster_ips)),
            addrs(self.cluster_ips.difference(&wanted)),
        )
    }

    /// Entries no frontend references (slots, backends, source ranges, infos) that the next
    /// reconciliation would delete: left by an interrupted agent, or writes that failed.
    pub fn stray_entries(&self) -> usize {
        self.garbage.len()
    }

    /// What the maps hold for every frontend, with its backend entries: slotted ones in slot
    /// order, then draining ones. Sorted by key.
    pub fn held(&self) -> Vec<HeldFrontend> {
        self.live
            .iter()
            .map(|(key, live)| {
                let slotted = live
                    .ids
                    .iter()
                    .zip(&live.backends)
                    .enumerate()
                    .map(|(slot, (id, backend))| (*id, *backend, Some(slot as u32)));
                let draining = live
                    .draining
                    .iter()
                    .map(|(backend, id)| (*id, *backend, None));
                HeldFrontend {
                    key: *key,
                    value: live.value,
                    info: live.info,
                    backends: slotted
                        .chain(draining)
                        .map(|(id, backend, slot)| HeldBackend {
                            id,
                            backend,
                            slot,
                            flags: live.flags.get(&id).copied().unwrap_or(0),
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// Makes the maps hold exactly `desired`.
    pub fn reconcile(&mut self, desired: &DesiredState, store: &mut impl ServiceStore) -> Summary {
        let mut summary = Summary::default();
        let mut counting = Counting { store, writes: 0 };
        // Removals first, their ids freed at once: the room they make serves this very pass (a
        // frontend refused for lack of room gets in as soon as another leaves).
        let stale: Vec<ServiceKey> = self
            .live
            .keys()
            .filter(|key| !desired.frontends.contains_key(key))
            .copied()
            .collect();
        for key in stale {
            self.reconcile_frontend(key, None, &mut summary, &mut counting);
        }
        // A refused frontend no object asks for any more is no longer refused.
        self.refused
            .retain(|key, _| desired.frontends.contains_key(key));
        // What this first collection fails to delete stays garbage, retried (and reported if it
        // fails again) by the second.
        let _retried = self.collect_garbage(&mut counting);
        for (key, frontend) in &desired.frontends {
            self.reconcile_frontend(*key, Some(frontend), &mut summary, &mut counting);
        }
        summary.errors.extend(self.collect_garbage(&mut counting));
        let wanted: BTreeSet<u32> = desired
            .cluster_ips
            .iter()
            .map(|addr| addr_to_wire(*addr))
            .collect();
        let changes: BTreeMap<u32, bool> = wanted
            .difference(&self.cluster_ips)
            .map(|addr| (*addr, true))
            .chain(
                self.cluster_ips
                    .difference(&wanted)
                    .map(|addr| (*addr, false)),
            )
            .collect();
        self.reconcile_cluster_ips(&changes, &mut counting, &mut summary);
        summary.writes = counting.writes;
        summary
    }

    /// Programs only what `changes` lists (a watch event's worth; see [`Changes`]): the other
    /// frontends are not even compared. A frontend that failed before is retried by the next
    /// full [`Reconciler::reconcile`].
    pub fn reconcile_changes(
        &mut self,
        changes: &Changes,
        store: &mut impl ServiceStore,
    ) -> Summary {
        let mut summary = Summary::default();
        let mut counting = Counting { store, writes: 0 };
        // Removals first, as in a full pass.
        for (key, frontend) in &changes.frontends {
            if frontend.is_none() {
                self.reconcile_frontend(*key, None, &mut summary, &mut counting);
            }
        }
        // Retried, and reported if it fails again, by the second collection.
        let _retried = self.collect_garbage(&mut counting);
        for (key, frontend) in &changes.frontends {
            if let Some(frontend) = frontend {
                self.reconcile_frontend(*key, Some(frontend), &mut summary, &mut counting);
            }
        }
        summary.errors.extend(self.collect_garbage(&mut counting));
        let cluster_ips: BTreeMap<u32, bool> = changes
            .cluster_ips
            .iter()
            .map(|(addr, present)| (addr_to_wire(*addr), *present))
            .filter(|(addr, present)| self.cluster_ips.contains(addr) != *present)
            .collect();
        self.reconcile_cluster_ips(&cluster_ips, &mut counting, &mut summary);
        summary.writes = counting.writes;
        summary
    }

    /// Makes the frontend at `key` what `desired` says (`None`: no frontend), counting what it
    /// did in `summary`.
    fn reconcile_frontend(
        &mut self,
        key: ServiceKey,
        desired: Option<&Frontend>,
        summary: &mut Summary,
        counting: &mut Counting<'_, impl ServiceStore>,
    ) {
        let Some(frontend) = desired else {
            self.refused.remove(&key);
            if self.live.contains_key(&key) {
                match self.remove(key, counting) {
                    Ok(()) => summary.removed += 1,
                    Err(error) => summary.errors.push(error.context(format!(
                        "removing {}:{}",
                        addr_from_wire(key.addr),
                        port_from_wire(key.port)
                    ))),
                }
            }
            return;
        };
        let result = match self.live.get(&key) {
            None => self
                .add(key, frontend, counting)
                .map(|()| summary.added += 1),
            Some(live) if Self::matches(live, frontend) => {
                summary.unchanged += 1;
                Ok(())
            }
            Some(_) => self
                .update(key, frontend, counting)
                .map(|()| summary.updated += 1),
        };
        let full = result
            .as_ref()
            .err()
            .and_then(|error| error.downcast_ref::<MapFull>());
        let mut again = false;
        match full {
            Some(full) => {
                again = self
                    .refused
                    .get(&key)
                    .is_some_and(|refusal| refusal.map == full.map);
                let refusal = Refusal {
                    map: full.map.to_owned(),
                    capacity: full.capacity,
                    namespace: frontend.namespace.clone(),
                    name: frontend.name.clone(),
                    port_name: frontend.port_name.clone(),
                    frontend: format!(
                        "{}:{}/{}",
                        frontend.addr,
                        frontend.port,
                        lb_common::net::proto_name(frontend.proto)
                    ),
                    stale: self.live.contains_key(&key),
                };
                self.refused.insert(key, refusal);
            }
            None if result.is_ok() => {
                self.refused.remove(&key);
            }
            None => {}
        }
        if let Err(error) = result {
            if let Some(live) = self.live.get_mut(&key) {
                live.dirty = true;
            }
            if again {
                summary.refused_again += 1;
                return;
            }
            summary.errors.push(error.context(format!(
                "programming {}/{} {}:{}",
                frontend.namespace, frontend.name, frontend.addr, frontend.port
            )));
        }
    }

    /// Adds (`true`) and deletes (`false`) `LB_CLUSTER_IPS` entries (network byte order). Added
    /// before frontends go away would matter only to packets on undefined ports, so the order is
    /// free; what fails is retried at the next full reconciliation. Returns at most one error.
    /// A full `LB_CLUSTER_IPS` is reported once, then counted in `refused_again` while it
    /// stays full, like a refused frontend.
    fn reconcile_cluster_ips(
        &mut self,
        changes: &BTreeMap<u32, bool>,
        store: &mut Counting<'_, impl ServiceStore>,
        summary: &mut Summary,
    ) {
        let mut first_error = None;
        let mut failed = 0;
        for (&addr, &present) in changes {
            let result = if present {
                store.run(|store| store.set_cluster_ip(addr))
            } else {
                store.run(|store| store.delete_cluster_ip(addr))
            };
            match result {
                Ok(()) if present => {
                    self.cluster_ips.insert(addr);
                }
                Ok(()) => {
                    self.cluster_ips.remove(&addr);
                }
                Err(error) => {
                    failed += 1;
                    first_error.get_or_insert(error);
                }
            }
        }
        let full = first_error
            .as_ref()
            .is_some_and(|error| error.downcast_ref::<MapFull>().is_some());
        let again = full && self.cluster_ips_full;
        self.cluster_ips_full = full;
        match first_error {
            Some(_) if again => summary.refused_again += 1,
            Some(error) => summary.errors.push(error.context(format!(
                "{failed} ClusterIP entries could not be written; retrying at the next sync"
            ))),
            None => {}
        }
    }

    /// Whether the maps hold `frontend` exactly as [`Reconciler::reconcile`] would write it.
    fn matches(live: &LiveFrontend, frontend: &Frontend) -> bool {
        Self::differences(live, frontend).is_empty()
    }

    /// Why the maps' `live` frontend is not `frontend`, one reason per difference; empty when it
    /// is. The one comparison behind both the reconciler's decision to rewrite a frontend and
    /// `lb plan`'s report, so the two cannot disagree.
    fn differences(live: &LiveFrontend, frontend: &Frontend) -> Vec<String> {
        let mut reasons = Vec::new();
        if live.dirty {
            reasons
                .push("a slot of its backend set is missing or names a cleared backend".to_owned());
        }
        if live.backends != frontend.backends {
            reasons.push(format!(
                "endpoints for new flows: the maps hold {}, the objects give {}",
                endpoint_list(live.backends.iter()),
                endpoint_list(frontend.backends.iter())
            ));
        }
        let kept = Self::kept_draining(live, frontend);
        if !live.draining.keys().eq(kept.keys()) {
            reasons.push(format!(
                "draining endpoints: the maps hold {}, the objects give {}",
                endpoint_list(live.draining.keys()),
                endpoint_list(kept.keys())
            ));
        }
        if live.value.flags != frontend.flags() {
            reasons.push(format!(
                "policy: the maps hold {}, the objects give {}",
                flag_names(live.value.flags),
                flag_names(frontend.flags())
            ));
        }
        if live.value.affinity_timeout_s != frontend.affinity_timeout_s {
            reasons.push(format!(
                "session affinity timeout: the maps hold {}s, the objects give {}s",
                live.value.affinity_timeout_s, frontend.affinity_timeout_s
            ));
        }
        if !live
            .source_ranges
            .iter()
            .eq(frontend.source_ranges.iter().flatten())
        {
            let list = |ranges: Vec<String>| format!("[{}]", ranges.join(", "));
            reasons.push(format!(
                "source ranges: the maps hold {}, the objects give {}",
                list(live.source_ranges.iter().map(ToString::to_string).collect()),
                list(
                    frontend
                        .source_ranges
                        .iter()
                        .flatten()
                        .map(ToString::to_string)
                        .collect()
                )
            ));
        }
        // The entries of endpoints held in the role the objects give them: their flags (draining,
        // remote, conditions) must be what the reconciler writes.
        let slotted = live
            .ids
            .iter()
            .zip(&live.backends)
            .filter(|(_, backend)| frontend.backends.contains(backend))
            .map(|(id, backend)| (*id, backend, false));
        let draining = kept.iter().map(|(backend, id)| (*id, backend, true));
        for (id, backend, drains) in slotted.chain(draining) {
            let wanted = entry_for(live.value.service_id, frontend, backend, drains).flags;
            let held = live.flags.get(&id).copied().unwrap_or(0);
            if held != wanted {
                reasons.push(format!(
                    "endpoint {}:{} (backend {id}): the maps hold {}, the objects give {}",
                    backend.addr,
                    backend.port,
                    backend_flag_names(held),
                    backend_flag_names(wanted)
                ));
            }
        }
        let wanted = service_info(frontend);
        match &live.info {
            None => reasons.push("LB_SVC_INFO has no entry for it".to_owned()),
            Some(held) if *held != wanted => reasons.extend(info_differences(held, &wanted)),
            Some(_) => {}
        }
        reasons
    }

    /// Every backend entry the frontend holds, in a slot or draining, by address.
    fn entries(live: &LiveFrontend) -> BTreeMap<BackendAddr, u32> {
        let mut entries = live.draining.clone();
        entries.extend(live.backends.iter().copied().zip(live.ids.iter().copied()));
        entries
    }

    /// The draining backends to keep: only endpoints that already have an entry (from being
    /// ready before) can have flows on them; one never ready needs none.
    fn kept_draining(live: &LiveFrontend, frontend: &Frontend) -> BTreeMap<BackendAddr, u32> {
        let entries = Self::entries(live);
        frontend
            .draining
            .iter()
            .filter_map(|backend| entries.get(backend).map(|id| (*backend, *id)))
            .collect()
    }

    /// Allocates an id for `backend` and writes it. The id is recorded in `written` before the
    /// write, so that a failure anywhere later can hand everything written to the garbage.
    fn write_backend(
        &mut self,
        store: &mut Counting<'_, impl ServiceStore>,
        written: &mut Vec<Garbage>,
        service_id: u32,
        frontend: &Frontend,
        backend: &BackendAddr,
    ) -> anyhow::Result<u32> {
        let id = self.backend_ids.allocate()?;
        written.push(Garbage::Backend(id));
        let value = entry_for(service_id, frontend, backend, false);
        store.run(|store| store.set_backend(id, &value))?;
        Ok(id)
    }

    /// Writes the slots of a fresh backend set holding `ids`; 0 (no set) when `ids` is empty.
    fn write_set(
        &mut self,
        store: &mut Counting<'_, impl ServiceStore>,
        written: &mut Vec<Garbage>,
        ids: &[u32],
    ) -> anyhow::Result<u32> {
        if ids.is_empty() {
            return Ok(0);
        }
        let set = self.backend_sets.allocate()?;
        for (slot, id) in ids.iter().enumerate() {
            let key = SlotKey {
                backend_set: set,
                slot: slot as u32,
            };
            written.push(Garbage::Slot(key));
            store.run(|store| store.set_slot(key, *id))?;
        }
        Ok(set)
    }

    /// The "make" of make-before-break: writes the backends `entries` does not hold yet and the
    /// slots of a fresh backend set for `backends`, and returns the `LB_SERVICES` value that
    /// switches the frontend to them (the caller writes it) with the ids in slot order.
    fn make(
        &mut self,
        store: &mut Counting<'_, impl ServiceStore>,
        written: &mut Vec<Garbage>,
        service_id: u32,
        frontend: &Frontend,
        entries: &BTreeMap<BackendAddr, u32>,
    ) -> anyhow::Result<(ServiceValue, Vec<u32>)> {
        let new = frontend
            .backends
            .iter()
            .filter(|backend| !entries.contains_key(backend))
            .count();
        self.backend_ids.ensure(new)?;
        let mut ids = Vec::with_capacity(frontend.backends.len());
        for backend in &frontend.backends {
            ids.push(match entries.get(backend) {
                Some(id) => *id,
                None => self.write_backend(store, written, service_id, frontend, backend)?,
            });
        }
        let backend_set = self.write_set(store, written, &ids)?;
        let value = ServiceValue {
            service_id,
            backend_set,
            backend_count: ids.len() as u32,
            flags: frontend.flags(),
            affinity_timeout_s: frontend.affinity_timeout_s,
        };
        Ok((value, ids))
    }

    /// Hands what a failed operation wrote to the garbage and passes the error on.
    fn abandon(&mut self, written: Vec<Garbage>, error: anyhow::Error) -> anyhow::Error {
        self.garbage.extend(written);
        error
    }

    fn add(
        &mut self,
        key: ServiceKey,
        frontend: &Frontend,
        store: &mut Counting<'_, impl ServiceStore>,
    ) -> anyhow::Result<()> {
        // Checked before the service id is taken, so that a frontend that cannot fit takes
        // nothing, however often it is retried.
        self.backend_ids.ensure(frontend.backends.len())?;
        let service_id = self.service_ids.allocate()?;
        // The info is the service id's garbage handle: deleting it returns the id.
        let mut written = vec![Garbage::Info(service_id)];
        let info = service_info(frontend);
        let ranges: BTreeSet<Ipv4Cidr> = frontend.source_ranges.iter().flatten().copied().collect();
        let result = (|| {
            let (value, ids) =
                self.make(store, &mut written, service_id, frontend, &BTreeMap::new())?;
            // The ranges before the value whose flag makes the program look them up.
            for range in &ranges {
                written.push(Garbage::SourceRange(service_id, *range));
                store.run(|store| store.set_source_range(service_id, *range))?;
            }
            store.run(|store| store.set_info(service_id, &info))?;
            store.run(|store| store.set_service(key, &value))?;
            Ok((value, ids))
        })();
        let (value, ids) = result.map_err(|error| self.abandon(written, error))?;
        let flags = ids
            .iter()
            .zip(&frontend.backends)
            .map(|(id, backend)| (*id, entry_for(service_id, frontend, backend, false).flags))
            .collect();
        self.live.insert(
            key,
            LiveFrontend {
                value,
                ids,
                backends: frontend.backends.clone(),
                draining: BTreeMap::new(),
                info: Some(info),
                source_ranges: ranges,
                flags,
                dirty: false,
            },
        );
        Ok(())
    }

    fn update(
        &mut self,
        key: ServiceKey,
        frontend: &Frontend,
        store: &mut Counting<'_, impl ServiceStore>,
    ) -> anyhow::Result<()> {
        let live = self
            .live
            .get(&key)
            .context("update of an unknown frontend")?
            .clone();
        let service_id = live.value.service_id;
        let entries = Self::entries(&live);
        let draining = Self::kept_draining(&live, frontend);
        let mut ids = live.ids.clone();
        // New source ranges before the value that may start looking them up; withdrawn ones
        // after it (as garbage, deleted at the end of the reconciliation).
        let ranges: BTreeSet<Ipv4Cidr> = frontend.source_ranges.iter().flatten().copied().collect();
        for range in ranges.difference(&live.source_ranges) {
            // A deletion of the same range still pending (it failed earlier) must not undo this.
            self.garbage
                .remove(&Garbage::SourceRange(service_id, *range));
            store.run(|store| store.set_source_range(service_id, *range))?;
            if let Some(entry) = self.live.get_mut(&key) {
                entry.source_ranges.insert(*range);
            }
        }
        // The flags each entry holds as this update writes them.
        let mut flags = live.flags.clone();
        // A draining endpoint back in the set takes new flows again, affinity included: cleared
        // before the switch gives it a slot.
        for backend in &frontend.backends {
            if let Some(id) = live.draining.get(backend) {
                let value = entry_for(service_id, frontend, backend, false);
                store.run(|store| store.set_backend(*id, &value))?;
                flags.insert(*id, value.flags);
            }
        }
        if live.dirty || live.backends != frontend.backends {
            // Make: new backends, then the new set's slots, then the single switching write.
            let mut written = Vec::new();
            let result = (|| {
                let (value, ids) =
                    self.make(store, &mut written, service_id, frontend, &entries)?;
                store.run(|store| store.set_service(key, &value))?;
                Ok((value, ids))
            })();
            let (value, new_ids) = result.map_err(|error| self.abandon(written, error))?;
            for (id, backend) in new_ids.iter().zip(&frontend.backends) {
                if !entries.values().any(|held| held == id) {
                    flags.insert(*id, entry_for(service_id, frontend, backend, false).flags);
                }
            }
            // Break: the old set is garbage from now on.
            self.garbage.extend(Self::slots_of(&live.value));
            let entry = self.live.get_mut(&key).context("frontend vanished")?;
            entry.value = value;
            entry.ids = new_ids.clone();
            entry.backends = frontend.backends.clone();
            entry.dirty = false;
            ids = new_ids;
        } else if !same_policy(&live.value, frontend) {
            // Same backends, another policy: one write of the value, the set stays.
            let value = ServiceValue {
                flags: frontend.flags(),
                affinity_timeout_s: frontend.affinity_timeout_s,
                ..live.value
            };
            store.run(|store| store.set_service(key, &value))?;
            self.live.get_mut(&key).context("frontend vanished")?.value = value;
        }
        // The backends that left both the slots and the draining set go.
        self.garbage.extend(
            entries
                .values()
                .filter(|id| !ids.contains(id) && !draining.values().any(|kept| kept == *id))
                .map(|id| Garbage::Backend(*id)),
        );
        for range in live.source_ranges.difference(&ranges) {
            self.garbage
                .insert(Garbage::SourceRange(service_id, *range));
        }
        let entry = self.live.get_mut(&key).context("frontend vanished")?;
        entry.draining = draining.clone();
        entry.source_ranges.retain(|range| ranges.contains(range));
        // An endpoint that left the set but stays for its flows: affinity no longer leads to it.
        // Flagged after the switch took its slot (until then the flag is harmless), and recorded
        // as draining first: a failed write leaves the frontend dirty, and a dirty frontend gets
        // every draining flag written again.
        for (backend, id) in &draining {
            if live.dirty || !live.draining.contains_key(backend) {
                let value = entry_for(service_id, frontend, backend, true);
                store.run(|store| store.set_backend(*id, &value))?;
                flags.insert(*id, value.flags);
            }
        }
        // Entries whose role stayed but whose conditions changed (informational bits only), and
        // any the maps held with other flags: rewritten in place, the id stays.
        let slotted = ids
            .iter()
            .zip(&frontend.backends)
            .map(|(id, b)| (*id, b, false));
        let kept = draining.iter().map(|(backend, id)| (*id, backend, true));
        let mut held = BTreeMap::new();
        for (id, backend, drains) in slotted.chain(kept) {
            let value = entry_for(service_id, frontend, backend, drains);
            if flags.get(&id) != Some(&value.flags) {
                store.run(|store| store.set_backend(id, &value))?;
            }
            held.insert(id, value.flags);
        }
        if let Some(entry) = self.live.get_mut(&key) {
            entry.flags = held;
        }
        let info = service_info(frontend);
        if live.info != Some(info) {
            let result = store.run(|store| store.set_info(service_id, &info));
            if let Some(entry) = self.live.get_mut(&key) {
                entry.info = result.is_ok().then_some(info);
            }
            result?;
        }
        Ok(())
    }

    fn remove(
        &mut self,
        key: ServiceKey,
        store: &mut Counting<'_, impl ServiceStore>,
    ) -> anyhow::Result<()> {
        store.run(|store| store.delete_service(key))?;
        let live = self
            .live
            .remove(&key)
            .context("removal of an unknown frontend")?;
        self.garbage.extend(Self::slots_of(&live.value));
        self.garbage.extend(
            Self::entries(&live)
                .values()
                .map(|id| Garbage::Backend(*id)),
        );
        self.garbage.extend(
            live.source_ranges
                .iter()
                .map(|range| Garbage::SourceRange(live.value.service_id, *range)),
        );
        self.garbage.insert(Garbage::Info(live.value.service_id));
        Ok(())
    }
}

/// An in-memory [`ServiceStore`] with the semantics of the kernel maps (for host tests and
/// reference models).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryStore {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub slots: BTreeMap<SlotKey, u32>,
    /// Only active backends; clearing removes the entry (the array holds zeroes there).
    pub backends: BTreeMap<u32, Backend>,
    pub infos: BTreeMap<u32, ServiceInfo>,
    pub cluster_ips: BTreeSet<u32>,
    /// `LB_SRC_RANGES`: (service id, range).
    pub source_ranges: BTreeSet<(u32, Ipv4Cidr)>,
    /// (frontends, backends) the maps hold at most, as `lb agent --max-services` and
    /// `--max-backends` set them; `None`: the defaults.
    pub capacity: Option<(u32, u32)>,
}

impl MemoryStore {
    /// The backends a packet to `key` can reach, as the datapath would resolve them.
    pub fn resolve(&self, key: &ServiceKey) -> Option<Vec<BackendAddr>> {
        let value = self.services.get(key)?;
        (0..value.backend_count)
            .map(|slot| {
                let id = self.slots.get(&SlotKey {
                    backend_set: value.backend_set,
                    slot,
                })?;
                self.backends.get(id).map(backend_addr)
            })
            .collect()
    }
}

impl ServiceStore for MemoryStore {
    fn service_capacity(&self) -> u32 {
        self.capacity.map_or(MAX_SERVICES, |(services, _)| services)
    }
    fn backend_capacity(&self) -> u32 {
        self.capacity.map_or(MAX_BACKENDS, |(_, backends)| backends)
    }
    fn set_backend(&mut self, id: u32, backend: &Backend) -> anyhow::Result<()> {
        self.backends.insert(id, *backend);
        Ok(())
    }
    fn clear_backend(&mut self, id: u32) -> anyhow::Result<()> {
        self.backends.remove(&id);
        Ok(())
    }
    fn set_slot(&mut self, key: SlotKey, backend_id: u32) -> anyhow::Result<()> {
        self.slots.insert(key, backend_id);
        Ok(())
    }
    fn delete_slot(&mut self, key: SlotKey) -> anyhow::Result<()> {
        self.slots.remove(&key);
        Ok(())
    }
    fn set_service(&mut self, key: ServiceKey, value: &ServiceValue) -> anyhow::Result<()> {
        self.services.insert(key, *value);
        Ok(())
    }
    fn delete_service(&mut self, key: ServiceKey) -> anyhow::Result<()> {
        self.services.remove(&key);
        Ok(())
    }
    fn set_info(&mut self, service_id: u32, info: &ServiceInfo) -> anyhow::Result<()> {
        self.infos.insert(service_id, *info);
        Ok(())
    }
    fn delete_info(&mut self, service_id: u32) -> anyhow::Result<()> {
        self.infos.remove(&service_id);
        Ok(())
    }
    fn read_services(&self) -> anyhow::Result<Vec<(ServiceKey, ServiceValue)>> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn read_slots(&self) -> anyhow::Result<Vec<(SlotKey, u32)>> {
        Ok(self.slots.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn read_active_backends(&self) -> anyhow::Result<Vec<(u32, Backend)>> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn read_infos(&self) -> anyhow::Result<Vec<(u32, ServiceInfo)>> {
        Ok(self.infos.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn set_cluster_ip(&mut self, addr: u32) -> anyhow::Result<()> {
        self.cluster_ips.insert(addr);
        Ok(())
    }
    fn delete_cluster_ip(&mut self, addr: u32) -> anyhow::Result<()> {
        self.cluster_ips.remove(&addr);
        Ok(())
    }
    fn read_cluster_ips(&self) -> anyhow::Result<Vec<u32>> {
        Ok(self.cluster_ips.iter().copied().collect())
    }
    fn set_source_range(&mut self, service_id: u32, range: Ipv4Cidr) -> anyhow::Result<()> {
        self.source_ranges.insert((service_id, range));
        Ok(())
    }
    fn delete_source_range(&mut self, service_id: u32, range: Ipv4Cidr) -> anyhow::Result<()> {
        self.source_ranges.remove(&(service_id, range));
        Ok(())
    }
    fn read_source_ranges(&self) -> anyhow::Result<Vec<(u32, Ipv4Cidr)>> {
        Ok(self.source_ranges.iter().copied().collect())
    }
}
