//! Where the Service maps are written: the difference between the desired state and what the maps
//! hold, applied with the fewest writes and make-before-break.
//!
//! For a frontend whose backends changed, new backends are written first, then the slots of a
//! fresh backend set, then the one `LB_SERVICES` value that switches packets to the new set, and
//! only then are the old slots and the departed backends removed. Backends that stay keep their
//! ids, so established flows (whose conntrack entries name a backend id) are undisturbed.
//!
//! The reconciler keeps a mirror of what it wrote; at start-up it reads the mirror back from the
//! pinned maps (an agent restart) and sweeps entries no frontend references (an agent that died
//! half-way through a switch). Writes go through [`ServiceStore`], so the planning logic is
//! host-tested against [`MemoryStore`].

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, bail};
use lb_common::{
    limits::{MAX_BACKENDS, MAX_SERVICES},
    net::{addr_from_wire, addr_to_wire, port_from_wire, port_to_wire},
    service::{
        BACKEND_ACTIVE, Backend, NAME_LEN, PORT_NAME_LEN, ServiceInfo, ServiceKey, ServiceValue,
        SlotKey,
    },
};

use crate::desired::{BackendAddr, DesiredState, Frontend};

/// Write and read access to the Service maps.
pub trait ServiceStore {
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
}

/// Encodes the names of a frontend for `LB_SVC_INFO`, truncating at the field sizes (which the
/// Kubernetes name limits never exceed).
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
    }
}

fn backend_addr(backend: &Backend) -> BackendAddr {
    BackendAddr {
        addr: addr_from_wire(backend.addr),
        port: port_from_wire(backend.port),
    }
}

/// A pool of ids in `1..limit`, handed out round-robin so a freed id is reused as late as
/// possible (conntrack entries may still name it; they check the address too, but later is
/// better).
#[derive(Debug)]
struct IdPool {
    used: BTreeSet<u32>,
    next: u32,
    limit: u32,
    what: &'static str,
}

impl IdPool {
    fn new(limit: u32, what: &'static str) -> Self {
        Self {
            used: BTreeSet::new(),
            next: 1,
            limit,
            what,
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
            bail!(
                "all {} {} ids are in use: the map is full",
                self.limit - 1,
                self.what
            );
        }
        let mut id = self.next.max(1);
        while self.used.contains(&id) {
            id = if id + 1 >= self.limit { 1 } else { id + 1 };
        }
        self.used.insert(id);
        self.next = if id + 1 >= self.limit { 1 } else { id + 1 };
        Ok(id)
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
    info: Option<ServiceInfo>,
    /// The maps are not known to match `ids`/`backends` (a failed or interrupted write): rewrite.
    dirty: bool,
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
}

impl Reconciler {
    /// Reads what the maps hold and removes the entries no frontend references. Returns the
    /// reconciler and the number of stray entries removed.
    pub fn from_store(store: &mut impl ServiceStore) -> anyhow::Result<(Self, usize)> {
        let mut reconciler = Self {
            live: BTreeMap::new(),
            service_ids: IdPool::new(MAX_SERVICES, "service"),
            backend_ids: IdPool::new(MAX_BACKENDS, "backend"),
            backend_sets: IdPool::new(u32::MAX, "backend set"),
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
                info: infos.get(&value.service_id).copied(),
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

        let mut swept = 0;
        for key in slots.keys().filter(|key| !used_slots.contains(key)) {
            store.delete_slot(*key)?;
            swept += 1;
        }
        for id in backends.keys() {
            if !reconciler.backend_ids.used.contains(id) {
                store.clear_backend(*id)?;
                swept += 1;
            }
        }
        for id in infos.keys() {
            if !reconciler.service_ids.used.contains(id) {
                store.delete_info(*id)?;
                swept += 1;
            }
        }
        Ok((reconciler, swept))
    }

    /// Number of frontends the maps hold.
    pub fn frontend_count(&self) -> usize {
        self.live.len()
    }

    /// Makes the maps hold exactly `desired`.
    pub fn reconcile(&mut self, desired: &DesiredState, store: &mut impl ServiceStore) -> Summary {
        let mut summary = Summary::default();
        let mut counting = Counting { store, writes: 0 };
        for (key, frontend) in &desired.frontends {
            let result = match self.live.get(key) {
                None => self
                    .add(*key, frontend, &mut counting)
                    .map(|()| summary.added += 1),
                Some(live) if !live.dirty && Self::matches(live, frontend) => {
                    summary.unchanged += 1;
                    Ok(())
                }
                Some(_) => self
                    .update(*key, frontend, &mut counting)
                    .map(|()| summary.updated += 1),
            };
            if let Err(error) = result {
                if let Some(live) = self.live.get_mut(key) {
                    live.dirty = true;
                }
                summary.errors.push(error.context(format!(
                    "programming {}/{} {}:{}",
                    frontend.namespace, frontend.name, frontend.addr, frontend.port
                )));
            }
        }
        let stale: Vec<ServiceKey> = self
            .live
            .keys()
            .filter(|key| !desired.frontends.contains_key(key))
            .copied()
            .collect();
        for key in stale {
            match self.remove(key, &mut counting) {
                Ok(()) => summary.removed += 1,
                Err(error) => summary.errors.push(error.context(format!(
                    "removing {}:{}",
                    addr_from_wire(key.addr),
                    port_from_wire(key.port)
                ))),
            }
        }
        summary.writes = counting.writes;
        summary
    }

    fn matches(live: &LiveFrontend, frontend: &Frontend) -> bool {
        live.backends == frontend.backends && live.info == Some(service_info(frontend))
    }

    fn write_backend(
        &mut self,
        store: &mut Counting<'_, impl ServiceStore>,
        service_id: u32,
        backend: &BackendAddr,
    ) -> anyhow::Result<u32> {
        let id = self.backend_ids.allocate()?;
        let value = Backend {
            addr: addr_to_wire(backend.addr),
            port: port_to_wire(backend.port),
            flags: BACKEND_ACTIVE,
            _pad: 0,
            service_id,
        };
        if let Err(error) = store.run(|store| store.set_backend(id, &value)) {
            self.backend_ids.release(id);
            return Err(error);
        }
        Ok(id)
    }

    /// Writes the slots of a fresh backend set holding `ids`; 0 (no set) when `ids` is empty.
    fn write_set(
        &mut self,
        store: &mut Counting<'_, impl ServiceStore>,
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
            store.run(|store| store.set_slot(key, *id))?;
        }
        Ok(set)
    }

    fn delete_set(
        &mut self,
        store: &mut Counting<'_, impl ServiceStore>,
        value: &ServiceValue,
    ) -> anyhow::Result<()> {
        if value.backend_set == 0 {
            return Ok(());
        }
        for slot in 0..value.backend_count {
            let key = SlotKey {
                backend_set: value.backend_set,
                slot,
            };
            store.run(|store| store.delete_slot(key))?;
        }
        self.backend_sets.release(value.backend_set);
        Ok(())
    }

    fn add(
        &mut self,
        key: ServiceKey,
        frontend: &Frontend,
        store: &mut Counting<'_, impl ServiceStore>,
    ) -> anyhow::Result<()> {
        let service_id = self.service_ids.allocate()?;
        let mut ids = Vec::with_capacity(frontend.backends.len());
        for backend in &frontend.backends {
            ids.push(self.write_backend(store, service_id, backend)?);
        }
        let backend_set = self.write_set(store, &ids)?;
        let info = service_info(frontend);
        store.run(|store| store.set_info(service_id, &info))?;
        let value = ServiceValue {
            service_id,
            backend_set,
            backend_count: ids.len() as u32,
            flags: 0,
        };
        store.run(|store| store.set_service(key, &value))?;
        self.live.insert(
            key,
            LiveFrontend {
                value,
                ids,
                backends: frontend.backends.clone(),
                info: Some(info),
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
        if live.dirty || live.backends != frontend.backends {
            // Make: backends, then slots, then the single switching write.
            let mut ids = Vec::with_capacity(frontend.backends.len());
            for backend in &frontend.backends {
                let kept = live
                    .backends
                    .iter()
                    .position(|old| old == backend)
                    .map(|position| live.ids[position]);
                ids.push(match kept {
                    Some(id) => id,
                    None => self.write_backend(store, service_id, backend)?,
                });
            }
            let backend_set = self.write_set(store, &ids)?;
            let value = ServiceValue {
                service_id,
                backend_set,
                backend_count: ids.len() as u32,
                flags: 0,
            };
            store.run(|store| store.set_service(key, &value))?;
            // Break: the old set and the backends that left.
            self.delete_set(store, &live.value)?;
            for id in live.ids.iter().filter(|id| !ids.contains(id)) {
                store.run(|store| store.clear_backend(*id))?;
                self.backend_ids.release(*id);
            }
            let entry = self.live.get_mut(&key).context("frontend vanished")?;
            entry.value = value;
            entry.ids = ids;
            entry.backends = frontend.backends.clone();
            entry.dirty = false;
        }
        let info = service_info(frontend);
        if live.info != Some(info) {
            store.run(|store| store.set_info(service_id, &info))?;
            if let Some(entry) = self.live.get_mut(&key) {
                entry.info = Some(info);
            }
        }
        Ok(())
    }

    fn remove(
        &mut self,
        key: ServiceKey,
        store: &mut Counting<'_, impl ServiceStore>,
    ) -> anyhow::Result<()> {
        let live = self
            .live
            .get(&key)
            .context("removal of an unknown frontend")?
            .clone();
        store.run(|store| store.delete_service(key))?;
        self.delete_set(store, &live.value)?;
        for id in &live.ids {
            store.run(|store| store.clear_backend(*id))?;
            self.backend_ids.release(*id);
        }
        store.run(|store| store.delete_info(live.value.service_id))?;
        self.service_ids.release(live.value.service_id);
        self.live.remove(&key);
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
        self.slots.remove(&key).map(|_| ()).context("no such slot")
    }
    fn set_service(&mut self, key: ServiceKey, value: &ServiceValue) -> anyhow::Result<()> {
        self.services.insert(key, *value);
        Ok(())
    }
    fn delete_service(&mut self, key: ServiceKey) -> anyhow::Result<()> {
        self.services
            .remove(&key)
            .map(|_| ())
            .context("no such service")
    }
    fn set_info(&mut self, service_id: u32, info: &ServiceInfo) -> anyhow::Result<()> {
        self.infos.insert(service_id, *info);
        Ok(())
    }
    fn delete_info(&mut self, service_id: u32) -> anyhow::Result<()> {
        self.infos
            .remove(&service_id)
            .map(|_| ())
            .context("no such info")
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
}
