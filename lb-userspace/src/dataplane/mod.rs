//! The kernel side as userspace sees it: loading the embedded XDP program with its maps pinned
//! under the pin directory, attaching it to interfaces through pinned links, and typed access to
//! the pinned maps (which is also how inspection commands read them while the agent is down).
//!
//! Pinning is what lets the dataplane outlive the agent: the maps (conntrack included) and the XDP
//! links stay in bpffs, so a restarted or upgraded agent reuses the maps and atomically replaces
//! the program inside each existing link. No packet meets an interface without the program.

pub mod links;
pub mod maps;
pub mod system;

use std::{
    fs,
    path::{Path, PathBuf},
};

use std::os::fd::AsRawFd as _;

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::MapData,
    programs::{
        CgroupAttachMode, CgroupSockAddr, TestRun as _, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{
    config::DataplaneConfig,
    iface::{IFACE_LOCAL_SENDERS, IFACE_NO_XDP_TX, IfaceConfig},
    limits::LINKS_SUBDIR,
};
use tracing::{info, warn};

use crate::dataplane::maps::{Capacities, absent_is_fine};

/// The eBPF object built from `lb-ebpf` by this crate's build script.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The benchmark's floor program (`lb-ebpf/src/bin/lb-floor.rs`), built by the same build script.
/// Only `cargo xtask bench` loads it.
#[cfg(feature = "bench")]
pub static FLOOR_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-floor"));
/// Name of the floor's XDP program inside [`FLOOR_OBJECT`].
#[cfg(feature = "bench")]
pub const FLOOR_PROGRAM_NAME: &str = "lb_floor";

/// Name of the XDP program inside the object.
pub const PROGRAM_NAME: &str = "lb_xdp";

/// The socket-hook programs (cgroup `sock_addr`) inside the object; see `lb-ebpf/src/sock.rs`.
pub const SOCKET_PROGRAMS: [&str; 4] = [
    "lb_connect4",
    "lb_sendmsg4",
    "lb_recvmsg4",
    "lb_getpeername4",
];

/// Subdirectory of the pin directory holding one pinned link per socket-hook program.
pub const SOCKET_LINKS_SUBDIR: &str = "socket-links";

/// Every map of the object; each is pinned at `<pin dir>/<name>`.
pub const ALL_MAPS: [&str; maps::MAP_COUNT] = {
    let mut names = [""; maps::MAP_COUNT];
    let mut index = 0;
    while index < maps::MAP_COUNT {
        names[index] = maps::LAYOUTS[index].name;
        index += 1;
    }
    names
};

/// `struct xdp_md`, the context `BPF_PROG_TEST_RUN` takes for XDP programs.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct XdpMd {
    pub(crate) data: u32,
    pub(crate) data_end: u32,
    pub(crate) data_meta: u32,
    pub(crate) ingress_ifindex: u32,
    pub(crate) rx_queue_index: u32,
    pub(crate) egress_ifindex: u32,
}

/// The outcome of [`Dataplane::test_run`].
#[derive(Clone, Debug)]
pub struct TestRun {
    /// The XDP action (`XDP_PASS` = 2, `XDP_DROP` = 1, `XDP_TX` = 3, `XDP_REDIRECT` = 4).
    pub action: u32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
    /// The kernel's measured run time.
    pub duration: std::time::Duration,
}

/// The loaded program and its pinned maps.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// An exclusive `flock` on the pin directory, held while this dataplane lives: two agents on
    /// one pin directory would overwrite each other's ids and delete each other's entries.
    _lock: fs::File,
}

/// Whether the program may redirect frames into veth interfaces. A redirect into a veth is only
/// received when the veth's peer runs NAPI (GRO enabled or an XDP program attached), which the
/// agent cannot see from this side; otherwise the kernel drops the frame after the program has
/// returned. Without this, packets towards veths take the kernel stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VethRedirect {
    #[default]
    Never,
    Allowed,
}

/// Takes the pin directory's exclusive lock; `None` when another process holds it.
fn try_lock_pin_dir(pin_dir: &Path) -> anyhow::Result<Option<fs::File>> {
    let dir = fs::File::open(pin_dir).with_context(|| format!("opening {}", pin_dir.display()))?;
    // SAFETY: a valid open file descriptor.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        return Err(error).with_context(|| format!("locking {}", pin_dir.display()));
    }
    Ok(Some(dir))
}

impl Dataplane {
    /// Loads the program, reusing the maps already pinned in `pin_dir` (an agent restart) or
    /// creating and pinning them (first start) with `capacities`. Pinned maps of other sizes are
    /// refused: resizing a map means recreating it, which forgets what it holds.
    pub fn load(pin_dir: &Path, capacities: &Capacities) -> anyhow::Result<Self> {
        system::ensure_pin_dir(pin_dir)?;
        let Some(lock) = try_lock_pin_dir(pin_dir)? else {
            bail!(
                "another lb agent is using {}: stop it first, or give this one its own --pin-dir",
                pin_dir.display()
            );
        };
        let pin_paths: Vec<(&str, PathBuf)> = ALL_MAPS
            .iter()
            .map(|name| (*name, pin_dir.join(name)))
            .collect();
        // Before loading: the loader pins every missing map, and a start refused for a size
        // mismatch must not leave the missing ones pinned at the refused size.
        check_pinned_layouts(pin_dir, capacities)?;
        let mut loader = EbpfLoader::new();
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        for name in ALL_MAPS {
            if let Some(capacity) = capacities.of(name) {
                loader.map_max_entries(name, capacity);
            }
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(system::explain_bpf_error)
            .context("loading the eBPF object")?;
        check_pinned_layouts(pin_dir, capacities)?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .with_context(|| format!("the object has no program {PROGRAM_NAME}"))?
            .try_into()
            .context("lb_xdp is not an XDP program")?;
        program
            .load()
            .map_err(system::explain_bpf_error)
            .context("loading the XDP program into the kernel (verifier)")?;
        for name in SOCKET_PROGRAMS {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("the object has no program {name}"))?
                .try_into()
                .with_context(|| format!("{name} is not a cgroup socket program"))?;
            program
                .load()
                .map_err(system::explain_bpf_error)
                .with_context(|| format!("loading {name} into the kernel (verifier)"))?;
        }
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            _lock: lock,
        })
    }

    fn program(&mut self) -> anyhow::Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .context("program vanished from the object")?
            .try_into()?)
    }

    /// Attaches the program to `interface`, or atomically swaps it into the link pinned for that
    /// interface by an earlier agent, and allows redirects to it (veths only if `veth_redirect`).
    /// Returns the interface's index.
    pub fn attach(&mut self, interface: &str, veth_redirect: VethRedirect) -> anyhow::Result<u32> {
        let ifindex = system::interface_index(interface)?;
        let links_dir = self.pin_dir.join(LINKS_SUBDIR);
        fs::create_dir_all(&links_dir)
            .with_context(|| format!("creating {}", links_dir.display()))?;
        let link_pin = links_dir.join(interface);
        let replaced =
            link_pin.exists() && self.reuse_pinned_link(interface, ifindex, &link_pin)?;
        if !replaced {
            let program = self.program()?;
            let link_id = program
                .attach(interface, XdpMode::default())
                .map_err(|error| system::explain_attach_error(interface, error))?;
            let link = program.take_link(link_id)?;
            let fd_link = FdLink::try_from(link)
                .context("the kernel attached XDP without a BPF link (needs Linux 5.9+)")?;
            fd_link
                .pin(&link_pin)
                .with_context(|| format!("pinning the XDP link at {}", link_pin.display()))?;
        }
        // Loopback and some virtual devices answer no driver: they are not veths.
        let driver = system::interface_driver(interface).unwrap_or_default();
        let veth = driver == system::VETH_DRIVER;
        let redirect = !veth || veth_redirect == VethRedirect::Allowed;
        let config = IfaceConfig {
            // Local sockets send on veths, with partial checksums left for offload; and a
            // veth's peer only receives XDP_TX frames when it runs an XDP program itself.
            flags: if veth {
                IFACE_LOCAL_SENDERS | IFACE_NO_XDP_TX
            } else {
                0
            },
        };
        maps::open_ifaces(&self.pin_dir)?
            .insert(ifindex, config, 0)
            .with_context(|| format!("describing {interface} to the program"))?;
        let mut tx_ports = maps::open_tx_ports(&self.pin_dir)?;
        if redirect {
            tx_ports
                .insert(ifindex, ifindex, None, 0)
                .with_context(|| format!("allowing redirects to {interface}"))?;
        } else {
            absent_is_fine(tx_ports.remove(ifindex))?;
        }
        info!(
            interface,
            ifindex,
            driver,
            redirect,
            replaced,
            "XDP program {}",
            if replaced {
                "replaced in the existing link"
            } else {
                "attached"
            }
        );
        Ok(ifindex)
    }

    /// Swaps the program into the link pinned for `interface` at `link_pin` when that link holds
    /// the interface (index `ifindex`); otherwise unpins it, so that a fresh attach takes its
    /// place. Whether it swapped.
    fn reuse_pinned_link(
        &mut self,
        interface: &str,
        ifindex: u32,
        link_pin: &Path,
    ) -> anyhow::Result<bool> {
        let unusable = match PinnedFor::read(link_pin, ifindex) {
            PinnedFor::Other(other) => {
                // Swapping the program into it would serve `other` and leave this interface
                // without the program; the name's pin is stale (its detach failed, or someone
                // moved it).
                warn!(
                    interface,
                    ifindex,
                    other,
                    "the XDP link pinned under this name holds another interface; unpinning it \
                     and attaching afresh"
                );
                unpin_link(&self.pin_dir, interface, Some(other))?;
                return Ok(false);
            }
            PinnedFor::Deleted => None,
            PinnedFor::NotXdp => Some(anyhow::anyhow!("it holds no XDP link")),
            holder @ (PinnedFor::This | PinnedFor::Unknown(_)) => {
                if let PinnedFor::Unknown(error) = holder {
                    // As before this check existed: the swap says whether the link is usable.
                    warn!(
                        interface,
                        "{error:#}; cannot tell which interface the pinned XDP link holds, \
                         swapping the program into it"
                    );
                }
                match replace_in_pinned_link(self.program()?, link_pin) {
                    Ok(()) => return Ok(true),
                    // Deleted between the look and the swap.
                    Err(error) if system::errno_in(&*error) == Some(libc::ENOLINK) => None,
                    Err(error) => Some(error),
                }
            }
        };
        match unusable {
            // The kernel cut the link from its interface when that was deleted: this one was
            // re-created under the same name (a pod's veth), which is no fault.
            None => info!(
                interface,
                "the pinned XDP link was for a deleted interface of this name; attaching afresh"
            ),
            Some(error) => warn!(interface, %error, "pinned XDP link unusable; attaching afresh"),
        }
        fs::remove_file(link_pin).with_context(|| format!("removing {}", link_pin.display()))?;
        Ok(false)
    }

    /// Gives the program the node-wide settings.
    pub fn configure(&mut self, config: &DataplaneConfig) -> anyhow::Result<()> {
        maps::open_config(&self.pin_dir)?
            .set(0, config, 0)
            .context("writing the dataplane settings")
    }

    /// Attaches the socket hooks to the cgroup (v2) directory `cgroup`, so that every socket of
    /// the processes below it reaches Services like packets do. Links pinned by an earlier agent
    /// are replaced.
    pub fn attach_sockets(&mut self, cgroup: &Path) -> anyhow::Result<()> {
        let links_dir = self.pin_dir.join(SOCKET_LINKS_SUBDIR);
        fs::create_dir_all(&links_dir)
            .with_context(|| format!("creating {}", links_dir.display()))?;
        let cgroup_dir = fs::File::open(cgroup)
            .with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
        for name in SOCKET_PROGRAMS {
            let link_pin = links_dir.join(name);
            if link_pin.exists() {
                // The old program detaches with its pin; the new one attaches right after.
                fs::remove_file(&link_pin)
                    .with_context(|| format!("removing {}", link_pin.display()))?;
            }
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} vanished"))?
                .try_into()?;
            // A BPF link (flags 0, what `Single` maps to) always sits beside other programs on
            // the cgroup; the kernel refuses the multi-attach flag on links.
            let link_id = program
                .attach(&cgroup_dir, CgroupAttachMode::Single)
                .map_err(system::explain_bpf_error)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
            let link = FdLink::try_from(program.take_link(link_id)?)
                .context("the kernel attached a socket hook without a BPF link (needs 5.7+)")?;
            link.pin(&link_pin)
                .with_context(|| format!("pinning {}", link_pin.display()))?;
        }
        info!(cgroup = %cgroup.display(), "socket hooks attached");
        Ok(())
    }

    /// Runs the loaded program once on `packet` with `BPF_PROG_TEST_RUN`, as if it had arrived on
    /// `ingress_ifindex` of the calling thread's network namespace (0: that namespace's loopback).
    /// Returns the XDP action and the packet as the program left it. Maps are the live ones.
    pub fn test_run(&mut self, packet: &[u8], ingress_ifindex: u32) -> anyhow::Result<TestRun> {
        test_run_xdp(self.program()?, packet, ingress_ifindex, 1)
    }

    /// The kernel's id of the loaded program (as `bpftool prog show` lists it).
    pub fn program_id(&mut self) -> anyhow::Result<u32> {
        Ok(self.program()?.info()?.id())
    }

    /// [`Dataplane::test_run`] `repeat` times in one call; the duration is the mean per run.
    /// The kernel hands every repetition the same buffer, so from the second one on a program
    /// that rewrites the packet sees its own output: only meaningful for packets left untouched.
    pub fn test_run_repeated(
        &mut self,
        packet: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> anyhow::Result<TestRun> {
        test_run_xdp(self.program()?, packet, ingress_ifindex, repeat)
    }

    /// Detaches the program from interfaces attached by an earlier agent but no longer wanted,
    /// and unpins links pinned under a wanted name that hold another interface (a detach that
    /// failed, a pin moved by hand). Attaching that name would swap the program into the other
    /// interface's link, and attaching the other interface would find it taken.
    pub fn detach_others(&mut self, keep: &[String]) -> anyhow::Result<()> {
        for interface in attached_interfaces(&self.pin_dir)? {
            if !keep.contains(&interface) {
                detach(&self.pin_dir, &interface)?;
                continue;
            }
            let Ok(ifindex) = system::interface_index(&interface) else {
                continue;
            };
            let link_pin = self.pin_dir.join(LINKS_SUBDIR).join(&interface);
            if let PinnedFor::Other(other) = PinnedFor::read(&link_pin, ifindex) {
                warn!(
                    interface,
                    ifindex,
                    other,
                    "the XDP link pinned under this name holds another interface; unpinned"
                );
                unpin_link(&self.pin_dir, &interface, Some(other))?;
            }
        }
        Ok(())
    }
}

/// Which interface a pinned XDP link holds, as seen from the interface `ifindex` of its name.
enum PinnedFor {
    /// That interface: the program can be swapped into the link.
    This,
    /// None any more: the kernel cut the link from its interface when that was deleted.
    Deleted,
    /// Another interface, by index, still there.
    Other(u32),
    /// The pinned object is no XDP link.
    NotXdp,
    /// The kernel's answer could not be read.
    Unknown(anyhow::Error),
}

impl PinnedFor {
    fn read(link_pin: &Path, ifindex: u32) -> Self {
        match system::pinned_xdp_link_ifindex(link_pin) {
            Ok(Some(pinned)) if pinned == ifindex => Self::This,
            Ok(Some(0)) => Self::Deleted,
            Ok(Some(other)) => Self::Other(other),
            Ok(None) => Self::NotXdp,
            Err(error) => Self::Unknown(error),
        }
    }
}

fn replace_in_pinned_link(program: &mut Xdp, link_pin: &Path) -> anyhow::Result<()> {
    let pinned = PinnedLink::from_pin(link_pin)
        .with_context(|| format!("opening the pinned link {}", link_pin.display()))?;
    let link = XdpLink::try_from(FdLink::from(pinned))
        .map_err(|error: LinkError| anyhow::anyhow!("{error}"))?;
    let link_id = program.attach_to_link(link)?;
    // Dropping our handle closes only our file descriptor: the pin keeps the link alive.
    drop(program.take_link(link_id)?);
    Ok(())
}

/// Runs the loaded XDP `program` on `packet` with `BPF_PROG_TEST_RUN`, `repeat` times (at least
/// once), as if it had arrived on `ingress_ifindex` of the calling thread's network namespace.
pub fn test_run_xdp(
    program: &Xdp,
    packet: &[u8],
    ingress_ifindex: u32,
    repeat: u32,
) -> anyhow::Result<TestRun> {
    // Room for a program that grows the packet: a reject adds IPv4 and ICMP headers before it
    // cuts the rest (the kernel refuses a test run whose output does not fit).
    const OUTPUT_SLACK: usize = 256;
    let mut output = vec![0u8; packet.len() + OUTPUT_SLACK];
    let context = XdpMd {
        data: 0,
        data_end: u32::try_from(packet.len())?,
        data_meta: 0,
        ingress_ifindex,
        rx_queue_index: 0,
        egress_ifindex: 0,
    };
    let result = program.test_run(TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut output),
        ctx_in: Some(bytemuck::bytes_of(&context)),
        repeat: repeat.max(1),
        ..TestRunOptions::default()
    })?;
    output.truncate(result.data_size_out as usize);
    Ok(TestRun {
        action: result.return_value,
        packet: output,
        duration: result.duration,
    })
}

/// Interfaces that have a pinned XDP link under `pin_dir`.
pub fn attached_interfaces(pin_dir: &Path) -> anyhow::Result<Vec<String>> {
    let links_dir = pin_dir.join(LINKS_SUBDIR);
    let entries = match fs::read_dir(&links_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => {
            return Err(error).with_context(|| format!("listing {}", links_dir.display()));
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Detaches the program from `interface` by unpinning its link.
pub fn detach(pin_dir: &Path, interface: &str) -> anyhow::Result<()> {
    unpin_link(pin_dir, interface, system::interface_index(interface).ok())?;
    info!(interface, "XDP program detached");
    Ok(())
}

/// Unpins the XDP link pinned for `interface`, which detaches the program from the interface,
/// and forgets the interface `ifindex` in the program's maps. The index is the caller's to give:
/// once an interface is deleted or renamed, its old name no longer leads to it.
///
/// A pin already gone is still reported (`NotFound`), after the maps are cleaned all the same: a
/// retried unpin whose map cleanup failed the first time finds the pin gone.
pub fn unpin_link(pin_dir: &Path, interface: &str, ifindex: Option<u32>) -> anyhow::Result<()> {
    let link_pin = pin_dir.join(LINKS_SUBDIR).join(interface);
    let removed = fs::remove_file(&link_pin);
    if let Err(error) = &removed
        && error.kind() != std::io::ErrorKind::NotFound
    {
        return removed.with_context(|| format!("removing {}", link_pin.display()));
    }
    if let Some(ifindex) = ifindex
        && let Ok(mut tx_ports) = maps::open_tx_ports(pin_dir)
    {
        // Absent already when the interface was re-created: nothing to undo then.
        absent_is_fine(tx_ports.remove(ifindex))?;
        if let Ok(mut ifaces) = maps::open_ifaces(pin_dir) {
            absent_is_fine(ifaces.remove(&ifindex))?;
        }
    }
    removed.with_context(|| format!("removing {}", link_pin.display()))
}

/// Detaches the socket hooks by unpinning their links.
pub fn detach_sockets(pin_dir: &Path) -> anyhow::Result<()> {
    let links_dir = pin_dir.join(SOCKET_LINKS_SUBDIR);
    if !links_dir.exists() {
        return Ok(());
    }
    for name in SOCKET_PROGRAMS {
        let link_pin = links_dir.join(name);
        if link_pin.exists() {
            fs::remove_file(&link_pin)
                .with_context(|| format!("removing {}", link_pin.display()))?;
        }
    }
    fs::remove_dir(&links_dir).with_context(|| format!("removing {}", links_dir.display()))?;
    info!("socket hooks detached");
    Ok(())
}

/// Removes everything `lb` pinned under `pin_dir`: the links (which detaches the program from
/// every interface) and the maps (which forgets every Service and tracked flow).
pub fn reset(pin_dir: &Path) -> anyhow::Result<()> {
    if !pin_dir.exists() {
        return Ok(());
    }
    // Held until the end: no agent may start on the directory while it is being emptied.
    let Some(_lock) = try_lock_pin_dir(pin_dir)? else {
        bail!(
            "an lb agent is running on {}: stop it first (resetting would delete the maps from \
             under it)",
            pin_dir.display()
        );
    };
    for interface in attached_interfaces(pin_dir)? {
        detach(pin_dir, &interface)?;
    }
    let links_dir = pin_dir.join(LINKS_SUBDIR);
    if links_dir.exists() {
        fs::remove_dir(&links_dir).with_context(|| format!("removing {}", links_dir.display()))?;
    }
    detach_sockets(pin_dir)?;
    for name in ALL_MAPS {
        let path = pin_dir.join(name);
        if path.exists() {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    fs::remove_dir(pin_dir).with_context(|| {
        format!(
            "removing {} (it holds files lb did not create)",
            pin_dir.display()
        )
    })?;
    Ok(())
}

/// Refuses maps pinned by an incompatible build (another layout, kind or capacity): reusing them
/// would corrupt every entry or silently lose counters.
fn check_pinned_layouts(pin_dir: &Path, capacities: &Capacities) -> anyhow::Result<()> {
    for expected in capacities.layouts() {
        let path = pin_dir.join(expected.name);
        // Checked before the object is loaded too, when some maps are not pinned yet: those are
        // about to be created at the asked size.
        if !path.exists() {
            continue;
        }
        let map = MapData::from_pin(&path)
            .with_context(|| format!("opening the pinned map {}", path.display()))?;
        let info = map.info()?;
        let found = maps::Layout {
            name: expected.name,
            kind: info.map_type()?,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
        };
        if found.max_entries != expected.max_entries
            && found.kind == expected.kind
            && found.key_size == expected.key_size
            && found.value_size == expected.value_size
        {
            bail!(
                "the map pinned at {} holds {} entries but {} were asked for; resizing it means \
                 recreating it: stop the agent and run `lb reset` (which forgets tracked flows), or \
                 keep the current size",
                path.display(),
                found.max_entries,
                expected.max_entries,
            );
        }
        if found != expected {
            bail!(
                "the map pinned at {} is {found:?} but this lb expects {expected:?}; it was left \
                 by an incompatible version: stop the agent and run `lb reset` (which forgets \
                 tracked flows)",
                path.display(),
            );
        }
    }
    Ok(())
}
