//! Typed handles on the pinned maps. Every handle is opened from its pin, so the agent and the
//! inspection commands read and write the very same kernel objects.

use std::{mem::size_of, path::Path};

use anyhow::Context as _;
use aya::maps::{
    Array, DevMapHash, HashMap, LpmTrie, Map, MapData, MapError, MapType, PerCpuArray,
    lpm_trie::Key,
};
use lb_common::{
    config::{DataplaneConfig, RejectWindow},
    conntrack::{FlowKey, FlowState, FragmentKey, FragmentValue},
    iface::IfaceConfig,
    limits::{
        CONNTRACK_ENTRIES_PER_FLOW, MAP_AFFINITY, MAP_BACKEND_TRAFFIC, MAP_BACKENDS,
        MAP_CLUSTER_IPS, MAP_CONFIG, MAP_CONNTRACK, MAP_FRAGMENTS, MAP_IFACES, MAP_REJECT_RATE,
        MAP_SERVICE_INFO, MAP_SERVICE_TRAFFIC, MAP_SERVICES, MAP_SLOTS, MAP_SOCK_REVNAT,
        MAP_SOURCE_RANGES, MAP_STATS, MAP_TX_PORTS, MAX_AFFINITY, MAX_BACKENDS, MAX_CONNTRACK,
        MAX_FRAGMENTS, MAX_INTERFACES, MAX_SERVICES, MAX_SLOTS, MAX_SOCK_REVNAT, MAX_SOURCE_RANGES,
    },
    net::{addr_from_wire, addr_to_wire},
    service::{
        AffinityKey, AffinityValue, Backend, CLUSTER_IP_ALLOCATED, SOURCE_RANGE_ALLOWED,
        SOURCE_RANGE_ID_BITS, ServiceInfo, ServiceKey, ServiceValue, SlotKey, SockRevNatKey,
        SockRevNatValue, SourceRangeKey,
    },
    stats::{COUNTER_COUNT, Counter, ServiceTraffic, Traffic},
};

use crate::{node::Ipv4Cidr, reconcile::MapFull};

/// What a pinned map must look like for this build to reuse it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Layout {
    pub name: &'static str,
    pub kind: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

const fn layout(
    name: &'static str,
    kind: MapType,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
) -> Layout {
    Layout {
        name,
        kind,
        key_size: key_size as u32,
        value_size: value_size as u32,
        max_entries,
    }
}

/// `struct bpf_devmap_val`: the target ifindex and a chained program (unused).
const DEVMAP_VALUE_SIZE: usize = 8;

/// Map sizes chosen at start-up (`lb agent --conntrack-flows`, `--max-services`,
/// `--max-backends`, `--affinity-entries`). A pinned map of another size is refused until
/// `lb reset`: resizing a map means recreating it, which would forget its entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    /// `LB_CONNTRACK` entries (two per flow).
    pub conntrack_entries: u32,
    /// Service frontends: `LB_SERVICES`, `LB_SVC_INFO`, `LB_CLUSTER_IPS` and `LB_SVC_TRAFFIC`
    /// (service ids index it, so ids stay below this).
    pub services: u32,
    /// Backends: `LB_BACKENDS` and `LB_BE_TRAFFIC` (ids index them), and `LB_SLOTS` at twice
    /// this (a set switch holds the old and the new set).
    pub backends: u32,
    /// `LB_AFFINITY` (client, frontend) pairs.
    pub affinity: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            conntrack_entries: MAX_CONNTRACK,
            services: MAX_SERVICES,
            backends: MAX_BACKENDS,
            affinity: MAX_AFFINITY,
        }
    }
}

/// The fewest entries a map sized at start-up may have: id 0 is never used, so an id-indexed map
/// of fewer holds nothing.
const MIN_CAPACITY: u32 = 2;

impl Capacities {
    /// Room for `flows` tracked flows and the defaults elsewhere.
    pub fn for_flows(flows: u32) -> anyhow::Result<Self> {
        let conntrack_entries = flows
            .checked_mul(CONNTRACK_ENTRIES_PER_FLOW)
            .filter(|entries| *entries > 0)
            .with_context(|| {
                format!(
                    "{flows} tracked flows: need between 1 and {} flows",
                    u32::MAX / CONNTRACK_ENTRIES_PER_FLOW
                )
            })?;
        Ok(Self {
            conntrack_entries,
            ..Self::default()
        })
    }

    /// [`Capacities::for_flows`] with `services` frontends, `backends` backends and `affinity`
    /// affinity pairs.
    pub fn new(flows: u32, services: u32, backends: u32, affinity: u32) -> anyhow::Result<Self> {
        for (value, flag) in [
            (services, "--max-services"),
            (backends, "--max-backends"),
            (affinity, "--affinity-entries"),
        ] {
            if value < MIN_CAPACITY {
                anyhow::bail!("{flag} {value}: need at least {MIN_CAPACITY}");
            }
        }
        if backends.checked_mul(2).is_none() {
            anyhow::bail!("--max-backends {backends}: at most {}", u32::MAX / 2);
        }
        Ok(Self {
            services,
            backends,
            affinity,
            ..Self::for_flows(flows)?
        })
    }

    /// The size of the map `name` with these capacities; `None` for maps of a fixed size.
    pub fn of(&self, name: &str) -> Option<u32> {
        match name {
            MAP_CONNTRACK => Some(self.conntrack_entries),
            MAP_SERVICES | MAP_SERVICE_INFO | MAP_CLUSTER_IPS | MAP_SERVICE_TRAFFIC => {
                Some(self.services)
            }
            MAP_BACKENDS | MAP_BACKEND_TRAFFIC => Some(self.backends),
            MAP_SLOTS => Some(self.backends * 2),
            MAP_AFFINITY => Some(self.affinity),
            _ => None,
        }
    }

    /// Every map of the object as this build defines it, with these capacities.
    pub fn layouts(&self) -> [Layout; MAP_COUNT] {
        let mut layouts = LAYOUTS;
        for layout in &mut layouts {
            if let Some(capacity) = self.of(layout.name) {
                layout.max_entries = capacity;
            }
        }
        layouts
    }
}

/// Number of maps in the object.
pub const MAP_COUNT: usize = 17;

/// Every map of the object as this build defines it, with the default [`Capacities`].
pub const LAYOUTS: [Layout; MAP_COUNT] = [
    layout(
        MAP_SERVICES,
        MapType::Hash,
        size_of::<ServiceKey>(),
        size_of::<ServiceValue>(),
        MAX_SERVICES,
    ),
    layout(
        MAP_SLOTS,
        MapType::Hash,
        size_of::<SlotKey>(),
        size_of::<u32>(),
        MAX_SLOTS,
    ),
    layout(
        MAP_BACKENDS,
        MapType::Array,
        size_of::<u32>(),
        size_of::<Backend>(),
        MAX_BACKENDS,
    ),
    layout(
        MAP_SERVICE_INFO,
        MapType::Hash,
        size_of::<u32>(),
        size_of::<ServiceInfo>(),
        MAX_SERVICES,
    ),
    layout(
        MAP_CONNTRACK,
        MapType::LruHash,
        size_of::<FlowKey>(),
        size_of::<FlowState>(),
        MAX_CONNTRACK,
    ),
    layout(
        MAP_STATS,
        MapType::PerCpuArray,
        size_of::<u32>(),
        size_of::<u64>(),
        COUNTER_COUNT,
    ),
    layout(
        MAP_TX_PORTS,
        MapType::DevMapHash,
        size_of::<u32>(),
        DEVMAP_VALUE_SIZE,
        MAX_INTERFACES,
    ),
    layout(
        MAP_IFACES,
        MapType::Hash,
        size_of::<u32>(),
        size_of::<IfaceConfig>(),
        MAX_INTERFACES,
    ),
    layout(
        MAP_CLUSTER_IPS,
        MapType::Hash,
        size_of::<u32>(),
        size_of::<u32>(),
        MAX_SERVICES,
    ),
    layout(
        MAP_CONFIG,
        MapType::Array,
        size_of::<u32>(),
        size_of::<DataplaneConfig>(),
        1,
    ),
    layout(
        MAP_REJECT_RATE,
        MapType::PerCpuArray,
        size_of::<u32>(),
        size_of::<RejectWindow>(),
        1,
    ),
    layout(
        MAP_SOURCE_RANGES,
        MapType::LpmTrie,
        size_of::<Key<SourceRangeKey>>(),
        size_of::<u32>(),
        MAX_SOURCE_RANGES,
    ),
    layout(
        MAP_FRAGMENTS,
        MapType::LruHash,
        size_of::<FragmentKey>(),
        size_of::<FragmentValue>(),
        MAX_FRAGMENTS,
    ),
    layout(
        MAP_SOCK_REVNAT,
        MapType::LruHash,
        size_of::<SockRevNatKey>(),
        size_of::<SockRevNatValue>(),
        MAX_SOCK_REVNAT,
    ),
    layout(
        MAP_AFFINITY,
        MapType::LruHash,
        size_of::<AffinityKey>(),
        size_of::<AffinityValue>(),
        MAX_AFFINITY,
    ),
    layout(
        MAP_SERVICE_TRAFFIC,
        MapType::Array,
        size_of::<u32>(),
        size_of::<ServiceTraffic>(),
        MAX_SERVICES,
    ),
    layout(
        MAP_BACKEND_TRAFFIC,
        MapType::Array,
        size_of::<u32>(),
        size_of::<Traffic>(),
        MAX_BACKENDS,
    ),
];

fn open(pin_dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).map_err(|error| {
        let error = anyhow::Error::from(error);
        let denied = error.chain().any(|cause| {
            cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
        });
        if denied {
            error.context(format!(
                "reading {} needs root (or CAP_BPF): run lb with sudo",
                path.display()
            ))
        } else {
            error.context(format!(
                "no lb map pinned at {}: start `lb agent` (with the same --pin-dir) first",
                path.display()
            ))
        }
    })?;
    Ok(Map::from_map_data(data)?)
}

/// The maps that describe Services; written by the agent's reconciler.
pub struct ServiceMaps {
    /// `LB_SERVICES`.
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// `LB_SLOTS`.
    pub slots: HashMap<MapData, SlotKey, u32>,
    /// `LB_BACKENDS`.
    pub backends: Array<MapData, Backend>,
    /// `LB_SVC_INFO`.
    pub info: HashMap<MapData, u32, ServiceInfo>,
    /// `LB_CLUSTER_IPS`.
    pub cluster_ips: HashMap<MapData, u32, u32>,
    /// `LB_SRC_RANGES`.
    pub source_ranges: LpmTrie<MapData, SourceRangeKey, u32>,
    /// `LB_SVC_TRAFFIC`: zeroed with the id it counts for.
    pub service_traffic: Array<MapData, ServiceTraffic>,
    /// `LB_BE_TRAFFIC`: zeroed with the id it counts for.
    pub backend_traffic: Array<MapData, Traffic>,
    /// The capacities the maps were created with.
    capacities: Capacities,
}

impl ServiceMaps {
    /// Opens the Service maps pinned under `pin_dir`.
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            services: open(pin_dir, MAP_SERVICES)?.try_into()?,
            slots: open(pin_dir, MAP_SLOTS)?.try_into()?,
            backends: open(pin_dir, MAP_BACKENDS)?.try_into()?,
            info: open(pin_dir, MAP_SERVICE_INFO)?.try_into()?,
            cluster_ips: open(pin_dir, MAP_CLUSTER_IPS)?.try_into()?,
            source_ranges: open(pin_dir, MAP_SOURCE_RANGES)?.try_into()?,
            service_traffic: open(pin_dir, MAP_SERVICE_TRAFFIC)?.try_into()?,
            backend_traffic: open(pin_dir, MAP_BACKEND_TRAFFIC)?.try_into()?,
            capacities: Capacities {
                services: capacity(pin_dir, MAP_SERVICES)?,
                backends: capacity(pin_dir, MAP_BACKENDS)?,
                ..Capacities::default()
            },
        })
    }
}

/// The capacity (`max_entries`) of the map `name` pinned under `pin_dir`.
pub fn capacity(pin_dir: &Path, name: &str) -> anyhow::Result<u32> {
    let path = pin_dir.join(name);
    let map = MapData::from_pin(&path)
        .with_context(|| format!("opening the pinned map {}", path.display()))?;
    Ok(map.info()?.max_entries())
}

/// `result` of inserting into `map`, a refusal for lack of room made a [`MapFull`]: hash maps
/// answer `E2BIG` when full, tries `ENOSPC`.
fn room(result: Result<(), MapError>, map: &'static str, capacity: u32) -> anyhow::Result<()> {
    match result {
        Err(MapError::SyscallError(error))
            if matches!(
                error.io_error.raw_os_error(),
                Some(libc::E2BIG | libc::ENOSPC)
            ) =>
        {
            Err(MapFull { map, capacity }.into())
        }
        other => Ok(other?),
    }
}

/// Opens `LB_FRAGMENTS`.
pub fn open_fragments(
    pin_dir: &Path,
) -> anyhow::Result<HashMap<MapData, FragmentKey, FragmentValue>> {
    Ok(open(pin_dir, MAP_FRAGMENTS)?.try_into()?)
}

/// Opens `LB_AFFINITY`.
pub fn open_affinity(
    pin_dir: &Path,
) -> anyhow::Result<HashMap<MapData, AffinityKey, AffinityValue>> {
    Ok(open(pin_dir, MAP_AFFINITY)?.try_into()?)
}

/// Opens `LB_CONFIG`.
pub fn open_config(pin_dir: &Path) -> anyhow::Result<Array<MapData, DataplaneConfig>> {
    Ok(open(pin_dir, MAP_CONFIG)?.try_into()?)
}

/// Opens `LB_CONNTRACK`.
pub fn open_conntrack(pin_dir: &Path) -> anyhow::Result<HashMap<MapData, FlowKey, FlowState>> {
    Ok(open(pin_dir, MAP_CONNTRACK)?.try_into()?)
}

/// Opens `LB_TX_PORTS`.
pub fn open_tx_ports(pin_dir: &Path) -> anyhow::Result<DevMapHash<MapData>> {
    Ok(open(pin_dir, MAP_TX_PORTS)?.try_into()?)
}

/// Opens `LB_IFACES`.
pub fn open_ifaces(pin_dir: &Path) -> anyhow::Result<HashMap<MapData, u32, IfaceConfig>> {
    Ok(open(pin_dir, MAP_IFACES)?.try_into()?)
}

/// Reads `LB_STATS`, summed over CPUs, in `Counter::ALL` order.
pub fn read_counters(pin_dir: &Path) -> anyhow::Result<Vec<(Counter, u64)>> {
    let stats: PerCpuArray<MapData, u64> = open(pin_dir, MAP_STATS)?.try_into()?;
    Counter::ALL
        .iter()
        .map(|counter| {
            let per_cpu = stats
                .get(&(*counter as u32), 0)
                .with_context(|| format!("reading counter {}", counter.name()))?;
            Ok((*counter, per_cpu.iter().sum()))
        })
        .collect()
}

/// Deleting an entry that is already gone is success: deletes must be idempotent so that a retry
/// after a partial failure converges.
pub fn absent_is_fine(result: Result<(), MapError>) -> anyhow::Result<()> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(error))
            if error.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => Ok(other?),
    }
}

impl crate::reconcile::ServiceStore for ServiceMaps {
    fn service_capacity(&self) -> u32 {
        self.capacities.services
    }
    fn backend_capacity(&self) -> u32 {
        self.capacities.backends
    }
    fn set_backend(&mut self, id: u32, backend: &Backend) -> anyhow::Result<()> {
        Ok(self.backends.set(id, backend, 0)?)
    }
    fn clear_backend(&mut self, id: u32) -> anyhow::Result<()> {
        // Zeroed first: once the entry is cleared, a restarted agent takes the id for free and
        // would never zero it. The id's next backend starts from zero.
        self.backend_traffic.set(id, Traffic::default(), 0)?;
        Ok(self.backends.set(id, Backend::default(), 0)?)
    }
    fn set_slot(&mut self, key: SlotKey, backend_id: u32) -> anyhow::Result<()> {
        room(
            self.slots.insert(key, backend_id, 0),
            MAP_SLOTS,
            self.capacities.backends * 2,
        )
    }
    fn delete_slot(&mut self, key: SlotKey) -> anyhow::Result<()> {
        absent_is_fine(self.slots.remove(&key))
    }
    fn set_service(&mut self, key: ServiceKey, value: &ServiceValue) -> anyhow::Result<()> {
        room(
            self.services.insert(key, value, 0),
            MAP_SERVICES,
            self.capacities.services,
        )
    }
    fn delete_service(&mut self, key: ServiceKey) -> anyhow::Result<()> {
        absent_is_fine(self.services.remove(&key))
    }
    fn set_info(&mut self, service_id: u32, info: &ServiceInfo) -> anyhow::Result<()> {
        room(
            self.info.insert(service_id, info, 0),
            MAP_SERVICE_INFO,
            self.capacities.services,
        )
    }
    fn delete_info(&mut self, service_id: u32) -> anyhow::Result<()> {
        // Deleting the info frees the id (see `Garbage::Info`), so its counters are zeroed first
        // (a restarted agent takes an id without info for free): its next frontend starts from
        // zero.
        self.service_traffic
            .set(service_id, ServiceTraffic::default(), 0)?;
        absent_is_fine(self.info.remove(&service_id))
    }
    fn read_services(&self) -> anyhow::Result<Vec<(ServiceKey, ServiceValue)>> {
        Ok(self.services.iter().collect::<Result<_, _>>()?)
    }
    fn read_slots(&self) -> anyhow::Result<Vec<(SlotKey, u32)>> {
        Ok(self.slots.iter().collect::<Result<_, _>>()?)
    }
    fn read_active_backends(&self) -> anyhow::Result<Vec<(u32, Backend)>> {
        let mut active = Vec::new();
        for (id, backend) in self.backends.iter().enumerate() {
            let backend = backend?;
            if backend.flags & lb_common::service::BACKEND_ACTIVE != 0 {
                active.push((id as u32, backend));
            }
        }
        Ok(active)
    }
    fn read_infos(&self) -> anyhow::Result<Vec<(u32, ServiceInfo)>> {
        Ok(self.info.iter().collect::<Result<_, _>>()?)
    }
    fn set_cluster_ip(&mut self, addr: u32) -> anyhow::Result<()> {
        room(
            self.cluster_ips.insert(addr, CLUSTER_IP_ALLOCATED, 0),
            MAP_CLUSTER_IPS,
            self.capacities.services,
        )
    }
    fn delete_cluster_ip(&mut self, addr: u32) -> anyhow::Result<()> {
        absent_is_fine(self.cluster_ips.remove(&addr))
    }
    fn read_cluster_ips(&self) -> anyhow::Result<Vec<u32>> {
        Ok(self.cluster_ips.keys().collect::<Result<_, _>>()?)
    }
    fn set_source_range(&mut self, service_id: u32, range: Ipv4Cidr) -> anyhow::Result<()> {
        room(
            self.source_ranges.insert(
                &source_range_key(service_id, range),
                SOURCE_RANGE_ALLOWED,
                0,
            ),
            MAP_SOURCE_RANGES,
            MAX_SOURCE_RANGES,
        )
    }
    fn delete_source_range(&mut self, service_id: u32, range: Ipv4Cidr) -> anyhow::Result<()> {
        absent_is_fine(
            self.source_ranges
                .remove(&source_range_key(service_id, range)),
        )
    }
    fn read_source_ranges(&self) -> anyhow::Result<Vec<(u32, Ipv4Cidr)>> {
        let mut ranges = Vec::new();
        for key in self.source_ranges.keys() {
            let key = key?;
            let data = key.data();
            let prefix_len = key.prefix_len().saturating_sub(SOURCE_RANGE_ID_BITS);
            ranges.push((
                u32::from_be(data.service_id_be),
                Ipv4Cidr {
                    addr: addr_from_wire(data.addr),
                    prefix_len: u8::try_from(prefix_len).unwrap_or(u8::MAX),
                },
            ));
        }
        Ok(ranges)
    }
}

/// The `LB_SRC_RANGES` key admitting `range` to the frontend `service_id`.
fn source_range_key(service_id: u32, range: Ipv4Cidr) -> Key<SourceRangeKey> {
    let range = range.network();
    Key::new(
        SOURCE_RANGE_ID_BITS + u32::from(range.prefix_len),
        SourceRangeKey {
            service_id_be: service_id.to_be(),
            addr: addr_to_wire(range.addr),
        },
    )
}

/// How full one pinned map is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Occupancy {
    pub name: &'static str,
    pub entries: u64,
    pub capacity: u32,
}

/// `BPF_MAP_GET_NEXT_KEY`: the `bpf(2)` command walking a map's keys.
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// The part of `union bpf_attr` that `BPF_MAP_GET_NEXT_KEY` reads.
#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

/// The number of keys `map` holds, walked with `BPF_MAP_GET_NEXT_KEY` whatever their type
/// (the typed handles need the key type; this serves every map alike).
fn count_keys(map: &MapData, key_size: u32) -> anyhow::Result<u64> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = u32::try_from(map.fd().as_fd().as_raw_fd())?;
    let size = usize::try_from(key_size)?;
    let mut current = vec![0_u8; size];
    let mut next = vec![0_u8; size];
    let mut count = 0;
    let mut first = true;
    loop {
        let attr = NextKeyAttr {
            map_fd: fd,
            _pad: 0,
            // A null key asks for the first key.
            key: if first { 0 } else { current.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        // SAFETY: `attr` points at buffers of the map's key size that outlive the call.
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &raw const attr,
                size_of::<NextKeyAttr>(),
            )
        };
        if result != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::ENOENT) {
                return Ok(count);
            }
            return Err(error).context("walking a map's keys");
        }
        count += 1;
        first = false;
        std::mem::swap(&mut current, &mut next);
    }
}

/// Entries against capacity of every pinned map whose entries come and go (hash and LRU maps,
/// tries); arrays hold all their entries by construction and are left out. A map full of live
/// entries refuses new Services, or (LRU) forgets flows early.
pub fn occupancy(pin_dir: &Path) -> anyhow::Result<Vec<Occupancy>> {
    let mut all = Vec::new();
    for layout in LAYOUTS {
        if matches!(
            layout.kind,
            MapType::Array | MapType::PerCpuArray | MapType::DevMapHash
        ) {
            continue;
        }
        let path = pin_dir.join(layout.name);
        let map = MapData::from_pin(&path)
            .with_context(|| format!("opening the pinned map {}", path.display()))?;
        let info = map.info()?;
        all.push(Occupancy {
            name: layout.name,
            entries: count_keys(&map, info.key_size())
                .with_context(|| format!("counting the entries of {}", layout.name))?,
            capacity: info.max_entries(),
        });
    }
    Ok(all)
}
