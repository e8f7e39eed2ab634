//! The host facts the dataplane depends on, checked up front so that a missing privilege, an
//! unmounted bpffs or a mistyped interface ends in one sentence saying what to do, not an errno.

use std::{
    error::Error as StdError,
    ffi::CString,
    fs, io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use lb_common::conntrack::SNAT_PORTS;

use crate::dataplane::XdpMd;

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is conventionally mounted.
const BPFFS_MOUNT_POINT: &str = "/sys/fs/bpf";
/// Capability numbers (linux/capability.h) the agent needs.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Fails with advice unless this process may load XDP programs and pin maps.
pub fn check_privileges() -> anyhow::Result<()> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("no CapEff line in /proc/self/status")?;
    let has = |cap: u32| effective & (1 << cap) != 0;
    let admin = has(CAP_SYS_ADMIN);
    if !(has(CAP_NET_ADMIN) && (has(CAP_BPF) || admin)) {
        bail!(
            "lb agent needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN) to load XDP \
             programs: run it with sudo, or in a container granted those capabilities"
        );
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: valid NUL-terminated path and a writable statfs buffer.
    if unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded, so the buffer is initialised.
    Ok(unsafe { stat.assume_init() }.f_type == BPF_FS_MAGIC)
}

/// Makes sure `pin_dir` exists on a bpffs, mounting bpffs at /sys/fs/bpf if nothing is mounted
/// there yet (a fresh machine).
pub fn ensure_pin_dir(pin_dir: &Path) -> anyhow::Result<()> {
    let mount_point = Path::new(BPFFS_MOUNT_POINT);
    if pin_dir.starts_with(mount_point) && !is_bpffs(mount_point).unwrap_or(false) {
        let fs_type = CString::new("bpf")?;
        let target = CString::new(BPFFS_MOUNT_POINT)?;
        // SAFETY: NUL-terminated strings; no mount data.
        let result = unsafe {
            libc::mount(
                fs_type.as_ptr(),
                target.as_ptr(),
                fs_type.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if result != 0 {
            return Err(io::Error::last_os_error()).with_context(|| {
                format!(
                    "bpffs is not mounted and mounting it failed: run `mount -t bpf bpf \
                     {BPFFS_MOUNT_POINT}` as root (in a container, mount the host's \
                     {BPFFS_MOUNT_POINT})"
                )
            });
        }
        tracing::info!("mounted bpffs at {BPFFS_MOUNT_POINT}");
    }
    fs::create_dir_all(pin_dir).with_context(|| format!("creating {}", pin_dir.display()))?;
    if !is_bpffs(pin_dir).with_context(|| format!("statfs {}", pin_dir.display()))? {
        bail!(
            "{} is not on a bpffs, so maps cannot be pinned there: choose a --pin-dir under a bpf \
             mount such as {BPFFS_MOUNT_POINT}",
            pin_dir.display()
        );
    }
    Ok(())
}

/// The index of a network interface in this network namespace.
pub fn interface_index(name: &str) -> anyhow::Result<u32> {
    let c_name = CString::new(name).map_err(|_| anyhow!("interface name {name:?} contains NUL"))?;
    // SAFETY: NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        bail!(
            "interface {name:?} does not exist in this network namespace: check `ip link` and \
             the --interfaces list"
        );
    }
    Ok(index)
}

/// `BPF_OBJ_GET` (linux/bpf.h, `enum bpf_cmd`): opens a pinned BPF object.
const BPF_OBJ_GET: libc::c_long = 7;

/// The part of `union bpf_attr` that `BPF_OBJ_GET` reads; the kernel takes the rest as zero.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// A file descriptor of the BPF object pinned at `path`.
fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    // Links only open read-write (flags 0).
    let attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `attr` is a valid BPF_OBJ_GET attribute whose path outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGetAttr,
            size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: the kernel just returned this descriptor, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The interface the XDP link pinned at `path` is attached to: `Some(0)` once the kernel cut it
/// from a deleted interface, `None` when the object pinned there is no XDP link. aya 0.14 keeps
/// the link's `ifindex` to itself, so it is read from the link's fdinfo.
pub fn pinned_xdp_link_ifindex(path: &Path) -> anyhow::Result<Option<u32>> {
    let fd = open_pinned(path).with_context(|| format!("opening {}", path.display()))?;
    let fdinfo_path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let fdinfo =
        fs::read_to_string(&fdinfo_path).with_context(|| format!("reading {fdinfo_path}"))?;
    xdp_link_ifindex(&fdinfo).with_context(|| {
        format!(
            "{} is an XDP link without an ifindex in its fdinfo",
            path.display()
        )
    })
}

/// The `ifindex` of an XDP link's fdinfo (`link_type:\txdp`, ..., `ifindex:\t3`); `Ok(None)` for
/// the fdinfo of anything else (a map, a program, a link of another type).
fn xdp_link_ifindex(fdinfo: &str) -> anyhow::Result<Option<u32>> {
    let field = |key: &str| {
        fdinfo.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            (name == key).then(|| value.trim())
        })
    };
    if field("link_type") != Some("xdp") {
        return Ok(None);
    }
    let ifindex = field("ifindex").context("no ifindex")?;
    Ok(Some(
        ifindex
            .parse()
            .with_context(|| format!("ifindex {ifindex:?}"))?,
    ))
}

/// The id of the program running in the link pinned at `path`, from the link's fdinfo
/// (`prog_id:\t42`).
pub fn pinned_link_program_id(path: &Path) -> anyhow::Result<u32> {
    let fd = open_pinned(path).with_context(|| format!("opening {}", path.display()))?;
    let fdinfo_path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let fdinfo =
        fs::read_to_string(&fdinfo_path).with_context(|| format!("reading {fdinfo_path}"))?;
    let id = fdinfo
        .lines()
        .find_map(|line| line.strip_prefix("prog_id:"))
        .with_context(|| format!("{} is not a BPF link (no prog_id)", path.display()))?;
    id.trim()
        .parse()
        .with_context(|| format!("prog_id {id:?} in {fdinfo_path}"))
}

/// `BPF_PROG_TEST_RUN` and `BPF_PROG_GET_FD_BY_ID` (linux/bpf.h, `enum bpf_cmd`).
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;

/// The part of `union bpf_attr` that `BPF_PROG_GET_FD_BY_ID` reads.
#[repr(C)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// The part of `union bpf_attr` that `BPF_PROG_TEST_RUN` reads and writes (`attr.test`).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid attribute of `command` whose pointers outlive the call.
    let result = unsafe { libc::syscall(libc::SYS_bpf, command, attr as *mut T, size_of::<T>()) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(result)
}

/// A file descriptor of the loaded program with id `id`.
pub fn program_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetFdByIdAttr {
        id,
        next_id: 0,
        open_flags: 0,
    };
    let fd = RawFd::try_from(bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?).map_err(io::Error::other)?;
    // SAFETY: the kernel just returned this descriptor, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One `BPF_PROG_TEST_RUN` of the XDP program `program` on `data`, whose first `meta_len` bytes
/// are XDP metadata, as if it arrived on `ingress_ifindex` (0: loopback). Returns the XDP action
/// and the metadata and frame the program left, which must fit in `out_capacity` bytes.
pub fn test_run_xdp_with_metadata(
    program: &OwnedFd,
    data: &[u8],
    meta_len: u32,
    ingress_ifindex: u32,
    out_capacity: usize,
) -> anyhow::Result<(u32, Vec<u8>)> {
    let mut output = vec![0u8; out_capacity];
    let context = XdpMd {
        data: meta_len,
        data_end: u32::try_from(data.len())?,
        data_meta: 0,
        ingress_ifindex,
        rx_queue_index: 0,
        egress_ifindex: 0,
    };
    let mut attr = TestRunAttr {
        prog_fd: u32::try_from(program.as_raw_fd())?,
        data_size_in: u32::try_from(data.len())?,
        data_size_out: u32::try_from(output.len())?,
        data_in: data.as_ptr() as u64,
        data_out: output.as_mut_ptr() as u64,
        repeat: 1,
        ctx_size_in: u32::try_from(size_of::<XdpMd>())?,
        ctx_in: &context as *const XdpMd as u64,
        ..TestRunAttr::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN")?;
    output.truncate(attr.data_size_out as usize);
    Ok((attr.retval, output))
}

/// The first OS error code in `error`'s chain.
pub(crate) fn errno_in(error: &(dyn StdError + 'static)) -> Option<i32> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(io) = error.downcast_ref::<io::Error>()
            && let Some(code) = io.raw_os_error()
        {
            return Some(code);
        }
        current = error.source();
    }
    None
}

/// Turns a BPF syscall failure into advice where the cause is known.
pub fn explain_bpf_error<E: StdError + Send + Sync + 'static>(error: E) -> anyhow::Error {
    match errno_in(&error) {
        Some(libc::EPERM) | Some(libc::EACCES) => anyhow!(error).context(
            "the kernel refused a BPF operation: run lb as root (or with CAP_BPF, CAP_NET_ADMIN \
             and CAP_SYS_ADMIN), and check that kernel.unprivileged_bpf_disabled or a security \
             module does not forbid BPF",
        ),
        Some(libc::ENOSYS) => anyhow!(error).context(
            "this kernel has no BPF syscall: lb needs Linux 5.15 or newer built with \
             CONFIG_BPF_SYSCALL and XDP",
        ),
        _ => anyhow!(error),
    }
}

/// Turns an XDP attach failure into advice where the cause is known.
pub fn explain_attach_error<E: StdError + Send + Sync + 'static>(
    interface: &str,
    error: E,
) -> anyhow::Error {
    match errno_in(&error) {
        Some(libc::EBUSY) | Some(libc::EEXIST) => anyhow!(error).context(format!(
            "another XDP program is already attached to {interface}: remove it first (`ip link \
             set dev {interface} xdp off`) or leave {interface} out of --interfaces"
        )),
        _ => explain_bpf_error(error).context(format!("attaching XDP to {interface}")),
    }
}

/// `rp_filter` value of strict reverse-path filtering (0 is off, 2 is loose).
const RP_FILTER_STRICT: u32 = 1;

fn net_sysctl(key: &str) -> Option<String> {
    fs::read_to_string(format!("/proc/sys/net/{key}"))
        .ok()
        .map(|value| value.trim().to_owned())
}

/// The first kernel whose `bpf_fib_lookup` gives a source address (`BPF_FIB_LOOKUP_SRC`), which
/// source NAT takes the node's address from.
const SNAT_KERNEL: (u32, u32) = (6, 7);

/// The warning for a kernel `release` (`uname -r`) too old for source NAT, if it is.
pub fn snat_kernel_warning(release: &str) -> Option<String> {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().ok());
    let version = (numbers.next()??, numbers.next()??);
    (version < SNAT_KERNEL).then(|| {
        format!(
            "kernel {release} predates Linux {}.{} (BPF_FIB_LOOKUP_SRC): flows that need source \
             NAT (external traffic to endpoints on other nodes under externalTrafficPolicy: \
             Cluster, and hairpins) will be dropped and counted as drop_snat_no_source",
            SNAT_KERNEL.0, SNAT_KERNEL.1
        )
    })
}

/// Host settings that silently break part of the dataplane, as warnings to log. Read in the
/// calling thread's network namespace.
pub fn sysctl_warnings(interfaces: &[String]) -> Vec<String> {
    let mut warnings = Vec::new();
    if net_sysctl("ipv4/ip_forward").as_deref() == Some("0") {
        warnings.push(
            "net.ipv4.ip_forward is 0: this node does not forward, so every packet translated to \
             a backend will be dropped; set it to 1"
                .to_owned(),
        );
    }
    if let Some(warning) = fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .and_then(|release| snat_kernel_warning(release.trim()))
    {
        warnings.push(warning);
    }
    // `ip_local_port_range` is "low<TAB>high".
    let ephemeral_top = net_sysctl("ipv4/ip_local_port_range")
        .and_then(|range| range.split_whitespace().nth(1)?.parse::<u16>().ok());
    if let Some(top) = ephemeral_top
        && top >= *SNAT_PORTS.start()
    {
        warnings.push(format!(
            "net.ipv4.ip_local_port_range reaches {top}: node sockets may take ports of the \
             source NAT range ({}-{}) and see replies to their connections taken for translated \
             flows; keep the range below {}",
            SNAT_PORTS.start(),
            SNAT_PORTS.end(),
            SNAT_PORTS.start()
        ));
    }
    warnings.extend(
        interfaces
            .iter()
            .filter_map(|interface| rp_filter_warning(interface)),
    );
    warnings
}

fn rp_filter(key: &str) -> Option<u32> {
    net_sysctl(&format!("ipv4/conf/{key}/rp_filter")).and_then(|value| value.parse().ok())
}

/// The warning for `interface`'s reverse-path filtering, if it would drop replies. Read in the
/// calling thread's network namespace.
pub fn rp_filter_warning(interface: &str) -> Option<String> {
    // The kernel applies the larger of the two values; 2 (loose) outranks 1 (strict).
    let strict = rp_filter("all")
        .unwrap_or(0)
        .max(rp_filter(interface).unwrap_or(0))
        == RP_FILTER_STRICT;
    strict.then(|| {
        format!(
            "strict reverse-path filtering (rp_filter=1) on {interface}: replies the kernel \
             routes carry a Service address as source and will be dropped; set \
             net.ipv4.conf.{interface}.rp_filter and net.ipv4.conf.all.rp_filter to 0 or 2"
        )
    })
}

/// Lets `interface` accept packets whose source is one of the node's own addresses
/// (`net.ipv4.conf.<interface>.accept_local`). A backend's reply to a NodePort client leaves XDP
/// with the node's address as source; when it takes the kernel stack (a partial checksum, no
/// neighbour yet) the kernel would drop it as a martian without this. Returns whether it changed
/// the setting. Written in the calling thread's network namespace.
pub fn accept_local(interface: &str) -> anyhow::Result<bool> {
    let key = format!("ipv4/conf/{interface}/accept_local");
    if net_sysctl(&key).as_deref() == Some("1") {
        return Ok(false);
    }
    let path = format!("/proc/sys/net/{key}");
    fs::write(&path, "1").with_context(|| format!("writing {path}"))?;
    Ok(true)
}

/// `SIOCETHTOOL` and `ETHTOOL_GDRVINFO` (linux/sockios.h, linux/ethtool.h).
const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x3;
/// `ETHTOOL_BUSINFO_LEN` and friends: the fixed string fields of `struct ethtool_drvinfo`.
const DRVINFO_STRING_LEN: usize = 32;

/// `struct ethtool_drvinfo`.
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; DRVINFO_STRING_LEN],
    version: [u8; DRVINFO_STRING_LEN],
    fw_version: [u8; DRVINFO_STRING_LEN],
    bus_info: [u8; DRVINFO_STRING_LEN],
    erom_version: [u8; DRVINFO_STRING_LEN],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// The kernel driver of `interface` (`veth`, `virtio_net`, `mlx5_core`, ...), asked over an
/// ioctl so that it answers for this network namespace (sysfs may show another one).
pub fn interface_driver(interface: &str) -> anyhow::Result<String> {
    // SAFETY: all-zero is valid for these plain C structs.
    let mut info: EthtoolDrvinfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = interface.as_bytes();
    if name.len() >= request.ifr_name.len() {
        bail!("interface name {interface:?} is too long");
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(name) {
        *slot = *byte as libc::c_char;
    }
    request.ifr_ifru.ifru_data = (&mut info as *mut EthtoolDrvinfo).cast();
    // SAFETY: plain socket call.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        return Err(io::Error::last_os_error()).context("opening a socket for ethtool");
    }
    // SAFETY: `request` points at a valid drvinfo buffer for the duration of the call.
    let result = unsafe { libc::ioctl(socket, SIOCETHTOOL, &mut request) };
    let error = io::Error::last_os_error();
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(socket) };
    if result != 0 {
        return Err(error).with_context(|| format!("asking {interface}'s driver (ethtool)"));
    }
    let end = info
        .driver
        .iter()
        .position(|byte| *byte == 0)
        .unwrap_or(DRVINFO_STRING_LEN);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// The driver name of virtual Ethernet pairs: their traffic comes from local sockets (pods), and
/// redirecting into one needs its peer to run NAPI (GRO or an XDP program on the peer).
pub const VETH_DRIVER: &str = "veth";

/// `statfs` magic of a cgroup v2 file system.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where the cgroup v2 hierarchy's root is mounted: `/sys/fs/cgroup` on unified hosts, its
/// `unified` directory on hybrid ones; `None` without cgroup v2.
pub fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| is_cgroup2(path))
}

fn is_cgroup2(path: &Path) -> bool {
    let Ok(text) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: a NUL-terminated path and a zeroed statfs the call fills.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let result = unsafe { libc::statfs(text.as_ptr(), &mut stat) };
    result == 0 && stat.f_type as i64 == CGROUP2_SUPER_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_before_6_7_are_warned_about_source_nat() {
        assert!(snat_kernel_warning("6.6.52-generic").is_some());
        assert!(snat_kernel_warning("5.15.0-122-generic").is_some());
        assert!(snat_kernel_warning("6.7.0").is_none());
        assert!(snat_kernel_warning("6.18.2-arch1-1").is_none());
        assert!(snat_kernel_warning("7.0").is_none());
        assert!(snat_kernel_warning("weird").is_none());
    }

    #[test]
    fn the_interface_of_an_xdp_link_is_read_from_its_fdinfo() {
        let xdp = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nlink_type:\txdp\n\
                   link_id:\t7\nprog_tag:\t3b185187f1855c4c\nprog_id:\t42\nifindex:\t3\n";
        assert_eq!(xdp_link_ifindex(xdp).expect("an XDP link"), Some(3));
        // Cut from its deleted interface.
        let cut = xdp.replace("ifindex:\t3", "ifindex:\t0");
        assert_eq!(xdp_link_ifindex(&cut).expect("an XDP link"), Some(0));
        let tcx = xdp.replace("link_type:\txdp", "link_type:\ttcx");
        assert_eq!(xdp_link_ifindex(&tcx).expect("a tcx link"), None);
        let map = "pos:\t0\nflags:\t02000002\nmap_type:\t1\nkey_size:\t4\nmax_entries:\t3\n";
        assert_eq!(xdp_link_ifindex(map).expect("a map"), None);
        assert!(xdp_link_ifindex("link_type:\txdp\nprog_id:\t42\n").is_err());
    }
}
