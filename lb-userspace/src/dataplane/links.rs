//! Which interfaces the XDP program runs on: the `--interfaces` patterns (names and globs such as
//! `veth*`) matched against the links of the node's network namespace at start-up, then kept
//! matched while links come, go and get renamed (pods' veths), through rtnetlink notifications.
//!
//! Notifications are a hint, not the truth: the kernel drops them when the socket's buffer is
//! full, and one may describe a link that is gone by the time it is read. So the follower keeps
//! its own picture of the namespace's links, updated by each notification and replaced by a full
//! dump (read through a fresh subscription) when notifications were lost and every
//! [`RESCAN_INTERVAL`], and derives what to attach, detach and rename by comparing that picture
//! with what it pinned ([`plan`]). An attach asks the kernel about the interface first, and
//! whatever failed is tried again at the next full dump.

use std::{
    any::Any,
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    ffi::CString,
    io,
    os::fd::AsRawFd as _,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};
use futures::{StreamExt as _, TryStreamExt as _, channel::mpsc::UnboundedReceiver};
use lb_common::limits::LINKS_SUBDIR;
use rtnetlink::{
    MulticastGroup,
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        link::{LinkAttribute, LinkFlags, LinkMessage},
    },
    sys::{AsyncSocket as _, SocketAddr},
};
use tokio::{
    task::{AbortHandle, JoinHandle},
    time::{Instant, interval_at, timeout},
};
use tracing::{debug, error, info, warn};

use crate::dataplane::{Dataplane, VethRedirect, system, unpin_link};

/// A full re-read of the links even when no notification says anything was lost: the safety net
/// under notifications, which are best effort.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(30);
/// How long a dump of the links may take; the kernel answers at once, so this only bounds a
/// netlink socket that stopped answering.
const DUMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Receive buffer of the notification socket, for bursts of pods starting at once (a link
/// notification is 1 to 2 KiB). Notifications beyond it are lost and the links read again.
const NOTIFICATION_BUFFER_BYTES: libc::c_int = 4 << 20;
/// How long to wait before subscribing again after the notification socket failed, so that a
/// socket failing at once does not spin.
const RESUBSCRIBE_DELAY: Duration = Duration::from_secs(1);
/// The agent's exit status when the link follower panicked: any failure makes Kubernetes
/// restart the container.
const FOLLOWER_FAILED_STATUS: i32 = 1;
/// Characters that make an item of `--interfaces` a glob. Linux would take them in an interface
/// name, but no tool makes such names.
const GLOB_CHARACTERS: [char; 3] = ['*', '?', '['];

/// One item of `--interfaces`.
#[derive(Clone, Debug)]
pub enum Pattern {
    /// An interface's name: it must exist at start-up, so that a typo stops the agent instead of
    /// leaving an interface without the program.
    Name(String),
    /// A glob such as `veth*`: whatever matches, at start-up or later; possibly nothing yet.
    Glob(glob::Pattern),
}

impl Pattern {
    /// An item of `--interfaces`: a glob if it holds `*`, `?` or `[`, else a name.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        if text.is_empty() {
            bail!("an empty interface name in --interfaces (a stray comma?)");
        }
        if text.contains(GLOB_CHARACTERS) {
            let glob = glob::Pattern::new(text)
                .with_context(|| format!("--interfaces {text}: not a glob (`*`, `?`, `[...]`)"))?;
            Ok(Self::Glob(glob))
        } else {
            Ok(Self::Name(text.to_owned()))
        }
    }

    fn matches(&self, link: &Link) -> bool {
        match self {
            Self::Name(name) => *name == link.name,
            // XDP on loopback serves no Service traffic: packets there were made by the node
            // itself, whose own connections to Services the socket hooks translate. A glob as
            // wide as `*` must not put the program there; naming `lo` still does.
            Self::Glob(glob) => !link.loopback && glob.matches(&link.name),
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Name(name) => f.write_str(name),
            Self::Glob(glob) => f.write_str(glob.as_str()),
        }
    }
}

/// The `--interfaces` patterns.
#[derive(Clone, Debug)]
pub struct Patterns(Vec<Pattern>);

impl Patterns {
    /// The items of `--interfaces`; fails on an empty list or an item that is no valid glob.
    pub fn parse(items: &[String]) -> anyhow::Result<Self> {
        if items.is_empty() {
            bail!(
                "no interfaces given: pass --interfaces with the node's interfaces, e.g. eth0 or \
                 eth0,veth*"
            );
        }
        let mut seen = BTreeSet::new();
        items
            .iter()
            .filter(|item| seen.insert(item.as_str()))
            .map(|item| Pattern::parse(item))
            .collect::<anyhow::Result<_>>()
            .map(Self)
    }

    /// The interfaces named exactly, which must exist at start-up.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|pattern| match pattern {
            Pattern::Name(name) => Some(name.as_str()),
            Pattern::Glob(_) => None,
        })
    }

    fn globs(&self) -> impl Iterator<Item = &Pattern> {
        self.0
            .iter()
            .filter(|pattern| matches!(pattern, Pattern::Glob(_)))
    }

    /// Whether the program belongs on `link`.
    pub fn matches(&self, link: &Link) -> bool {
        self.0.iter().any(|pattern| pattern.matches(link))
    }
}

/// A link of the network namespace, as rtnetlink describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub loopback: bool,
}

/// The namespace's links by interface index.
type Links = BTreeMap<u32, Link>;

/// What it takes to bring the pinned links in line with the namespace's links.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    /// Attach to the interface `ifindex`, named `name`.
    Attach { name: String, ifindex: u32 },
    /// Unpin the link pinned as `name` for the interface `ifindex`, which is gone (`now` is
    /// `None`) or was renamed `now` and is no longer matched under that name.
    Detach {
        name: String,
        ifindex: u32,
        now: Option<String>,
    },
    /// The interface `ifindex` was renamed from `from` to `to` and is still matched: its pin
    /// moves, the program stays attached.
    Rename {
        from: String,
        to: String,
        ifindex: u32,
    },
}

/// Actions that failed, left for the next full re-read rather than tried again at every
/// notification.
#[derive(Debug, Default)]
struct Failures {
    /// Interfaces whose attach failed, by name, with the index it failed for.
    attaches: BTreeMap<String, u32>,
    /// Pins whose detach or move failed, by name, with their interface's index. They are still
    /// pinned, so still in `attached`.
    detaches: BTreeMap<String, u32>,
}

impl Failures {
    /// Whether a pin whose detach failed still holds the name `name` or the interface `ifindex`:
    /// an attach of either would meet it (a stale pin of the name, or an interface whose XDP
    /// slot is taken), so it waits with it.
    fn hold(&self, name: &str, ifindex: u32) -> bool {
        self.detaches
            .iter()
            .any(|(held, &held_index)| held == name || held_index == ifindex)
    }

    /// Everything gets another chance.
    fn clear(&mut self) {
        self.attaches.clear();
        self.detaches.clear();
    }
}

/// The actions that make `attached` (pinned names and their interfaces' indexes) follow `links`:
/// detaches and renames first, so that an attach never meets a stale pin of its name. Actions
/// that failed for the same name and interface (`failures`) are left for the next full re-read.
fn plan(
    links: &Links,
    attached: &BTreeMap<String, u32>,
    failures: &Failures,
    patterns: &Patterns,
) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut pinned = BTreeSet::new();
    for (name, &ifindex) in attached {
        let link = links.get(&ifindex);
        if let Some(link) = link
            && link.name == *name
            && patterns.matches(link)
        {
            pinned.insert(name.as_str());
            continue;
        }
        if failures.detaches.get(name) == Some(&ifindex) {
            continue;
        }
        match link {
            Some(link) if patterns.matches(link) && !attached.contains_key(&link.name) => {
                pinned.insert(link.name.as_str());
                actions.push(Action::Rename {
                    from: name.clone(),
                    to: link.name.clone(),
                    ifindex,
                });
            }
            // Renamed to a name not matched, or to one still pinned for another interface (two
            // interfaces swapping names): detached, and attached afresh below if matched.
            Some(link) => actions.push(Action::Detach {
                name: name.clone(),
                ifindex,
                now: Some(link.name.clone()),
            }),
            // Gone, or deleted and re-created under the same name with another index.
            None => actions.push(Action::Detach {
                name: name.clone(),
                ifindex,
                now: None,
            }),
        }
    }
    for (&ifindex, link) in links {
        if patterns.matches(link)
            && !pinned.contains(link.name.as_str())
            && failures.attaches.get(&link.name) != Some(&ifindex)
            && !failures.hold(&link.name, ifindex)
        {
            actions.push(Action::Attach {
                name: link.name.clone(),
                ifindex,
            });
        }
    }
    actions
}

fn link_of(message: &LinkMessage) -> Option<(u32, Link)> {
    let name = message
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })?;
    let loopback = message.header.flags.contains(LinkFlags::Loopback);
    Some((message.header.index, Link { name, loopback }))
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Every link of this network namespace (rtnetlink dump).
async fn dump_links() -> anyhow::Result<Links> {
    let (connection, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    let _connection = AbortOnDrop(tokio::spawn(connection));
    let dump = async {
        let mut links = Links::new();
        let mut messages = std::pin::pin!(handle.link().get().execute());
        while let Some(message) = messages.try_next().await? {
            if let Some((ifindex, link)) = link_of(&message) {
                links.insert(ifindex, link);
            }
        }
        anyhow::Ok(links)
    };
    timeout(DUMP_TIMEOUT, dump)
        .await
        .context("rtnetlink did not answer")?
        .context("listing the links (rtnetlink)")
}

/// What a notification says.
enum Notice {
    Link(u32, Link),
    Gone(u32),
    /// The kernel dropped notifications (the socket's buffer was full).
    Lost,
    /// The notification socket failed: no more notifications come through it.
    Closed,
    Other,
}

/// A subscription to link notifications (`RTNLGRP_LINK`).
struct Subscription {
    _connection: AbortOnDrop,
    messages: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
}

impl Subscription {
    fn open() -> anyhow::Result<Self> {
        let (mut connection, _, messages) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
                .context("subscribing to link notifications (rtnetlink)")?;
        let socket = connection.socket_mut().socket_ref();
        // SO_RCVBUFFORCE: the agent has CAP_NET_ADMIN, and net.core.rmem_max would cap the
        // plain option far below a burst of pods.
        // SAFETY: a valid socket and an int option the size given.
        let result = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&NOTIFICATION_BUFFER_BYTES as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if result != 0 {
            debug!(
                error = %io::Error::last_os_error(),
                "keeping the default notification buffer; bursts may overrun it (then the \
                 links are read again)"
            );
        }
        Ok(Self {
            _connection: AbortOnDrop(tokio::spawn(connection)),
            messages,
        })
    }

    async fn next(&mut self) -> Notice {
        let Some((message, _)) = self.messages.next().await else {
            return Notice::Closed;
        };
        match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                link_of(&link).map_or(Notice::Other, |(ifindex, link)| Notice::Link(ifindex, link))
            }
            // A bridge port leaving its bridge is a DELLINK of the bridge family; the interface
            // itself stays.
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link))
                if link.header.interface_family == AddressFamily::Unspec =>
            {
                Notice::Gone(link.header.index)
            }
            NetlinkPayload::Overrun(_) => Notice::Lost,
            _ => Notice::Other,
        }
    }
}

/// Sets `net.ipv4.conf.<interface>.accept_local` (see [`system::accept_local`]), saying so when
/// it changed it.
fn allow_local_sources(interface: &str) -> anyhow::Result<()> {
    if system::accept_local(interface)? {
        info!(
            "set net.ipv4.conf.{interface}.accept_local=1: NodePort replies carry the node's \
             address as source when the kernel routes them"
        );
    }
    Ok(())
}

/// Runs `allow` on each of `interfaces`: a failure on an interface `patterns` name exactly is
/// returned, one on an interface only a glob matches is warned about.
fn allow_local_sources_on<'a>(
    patterns: &Patterns,
    interfaces: impl IntoIterator<Item = &'a String>,
    mut allow: impl FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    for interface in interfaces {
        if let Err(error) = allow(interface) {
            if patterns.names().any(|name| name == interface) {
                return Err(error);
            }
            warn!(interface, "{error:#}");
        }
    }
    Ok(())
}

/// What [`Interfaces::sync`] does to the kernel and the pin directory. A trait so that its
/// bookkeeping of failures is tested without privileges.
trait Pins {
    /// The index of the interface named `name` now, if there is one.
    fn index_of(&self, name: &str) -> Option<u32>;
    /// Attaches the program to `name`, or swaps it into the link pinned for it; its index.
    fn attach(&mut self, name: &str) -> anyhow::Result<u32>;
    /// Unpins the link pinned as `name` for the interface `ifindex`; a pin already gone is fine.
    fn unpin(&mut self, name: &str, ifindex: u32) -> anyhow::Result<()>;
    /// Moves the pin `from` to `to`, failing (`EEXIST`) rather than replacing a pin at `to`.
    fn move_pin(&mut self, from: &str, to: &str) -> io::Result<()>;
}

/// The [`Pins`] of a running agent.
struct Kernel<'a> {
    dataplane: &'a mut Dataplane,
    veth_redirect: VethRedirect,
    /// Whether an attach also sets the interface's sysctls and warns about them; at start-up
    /// the agent does it for every interface at once, with the node-wide checks.
    set_sysctls: bool,
}

impl Pins for Kernel<'_> {
    fn index_of(&self, name: &str) -> Option<u32> {
        system::interface_index(name).ok()
    }

    fn attach(&mut self, name: &str) -> anyhow::Result<u32> {
        let ifindex = self.dataplane.attach(name, self.veth_redirect)?;
        if self.set_sysctls {
            if let Err(error) = allow_local_sources(name) {
                warn!(interface = name, "{error:#}");
            }
            if let Some(warning) = system::rp_filter_warning(name) {
                warn!("{warning}");
            }
        }
        Ok(ifindex)
    }

    fn unpin(&mut self, name: &str, ifindex: u32) -> anyhow::Result<()> {
        match unpin_link(&self.dataplane.pin_dir, name, Some(ifindex)) {
            // `lb reset` or a person removed it.
            Err(error)
                if error
                    .downcast_ref::<io::Error>()
                    .is_some_and(|error| error.kind() == io::ErrorKind::NotFound) =>
            {
                Ok(())
            }
            result => result,
        }
    }

    fn move_pin(&mut self, from: &str, to: &str) -> io::Result<()> {
        let links_dir = self.dataplane.pin_dir.join(LINKS_SUBDIR);
        move_pin(&links_dir.join(from), &links_dir.join(to))
    }
}

/// Renames the pin `from` to `to` unless something is pinned at `to` (`EEXIST`): that pin is
/// not in the follower's picture, and replacing it would drop whichever link it holds.
fn move_pin(from: &Path, to: &Path) -> io::Result<()> {
    let c_path = |path: &Path| {
        CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))
    };
    let (from, to) = (c_path(from)?, c_path(to)?);
    // SAFETY: NUL-terminated paths, relative to the working directory if relative at all.
    let result = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The interfaces the program is attached to, kept matching `--interfaces`.
pub struct Interfaces {
    patterns: Patterns,
    veth_redirect: VethRedirect,
    subscription: Option<Subscription>,
    /// The namespace's links as last heard of.
    links: Links,
    /// The links this agent pinned, by name, with their interface's index.
    attached: BTreeMap<String, u32>,
    /// Attaches and detaches that failed, retried at the next full re-read.
    failures: Failures,
    /// Whether an attach also sets the interface's sysctls and warns about them; at start-up the
    /// agent does it for every interface at once, with the node-wide checks.
    set_sysctls: bool,
}

impl Interfaces {
    /// Attaches the program to every interface `patterns` match now and detaches it from the
    /// interfaces an earlier agent attached that they no longer match. An interface named
    /// exactly that fails to attach fails the start; one matched by a glob is only warned about.
    /// Subscribes to link notifications first, so that a link appearing meanwhile is either in
    /// the dump or notified to [`Interfaces::follow`].
    pub async fn attach(
        dataplane: &mut Dataplane,
        patterns: Patterns,
        veth_redirect: VethRedirect,
    ) -> anyhow::Result<Self> {
        let subscription = Subscription::open()?;
        let links = dump_links().await?;
        for glob in patterns.globs() {
            if !links.values().any(|link| glob.matches(link)) {
                info!("--interfaces {glob}: no interface matches yet; attaching as they appear");
            }
        }
        let names: Vec<String> = patterns.names().map(str::to_owned).collect();
        let wanted: Vec<String> = links
            .values()
            .filter(|link| patterns.matches(link))
            .map(|link| link.name.clone())
            .chain(names.iter().cloned())
            .collect();
        // Before any attach: a link pinned for an interface renamed while no agent ran still
        // holds that interface, and would refuse a fresh attach under its new name.
        dataplane.detach_others(&wanted)?;
        let mut interfaces = Self {
            patterns,
            veth_redirect,
            subscription: Some(subscription),
            links,
            attached: BTreeMap::new(),
            failures: Failures::default(),
            set_sysctls: false,
        };
        for name in names {
            let ifindex = dataplane.attach(&name, veth_redirect)?;
            interfaces.attached.insert(name, ifindex);
        }
        interfaces.sync(&mut Kernel {
            dataplane,
            veth_redirect,
            set_sysctls: false,
        });
        Ok(interfaces)
    }

    /// The interfaces the program is attached to.
    pub fn attached(&self) -> Vec<String> {
        self.attached.keys().cloned().collect()
    }

    /// Sets `accept_local` on every interface attached (see [`system::accept_local`]). A failure
    /// on an interface named exactly fails the start, as its attach would; an interface matched
    /// by a glob may have gone since it was attached (a pod deleted meanwhile), so it is only
    /// warned about, as its attach is.
    pub fn allow_local_sources(&self) -> anyhow::Result<()> {
        allow_local_sources_on(&self.patterns, self.attached.keys(), allow_local_sources)
    }

    /// Keeps following link notifications in a task that owns `dataplane`, until the returned
    /// guard is dropped. Each sync runs to its end on a blocking thread, so stopping never
    /// leaves an attach, detach or rename half done. If the task panics, the process exits.
    pub fn follow(mut self, dataplane: Dataplane) -> Following {
        self.set_sysctls = true;
        let follower = tokio::spawn(self.run(dataplane));
        let abort = follower.abort_handle();
        // A follower gone would leave new pods' interfaces without the program for good, with
        // nothing but a panic message on stderr to say so. Exiting lets the DaemonSet restart
        // the agent, which attaches to what is there now; meanwhile the pinned links and maps
        // keep serving as they are.
        let supervisor = tokio::spawn(supervise(follower, |message| {
            error!(
                "the link follower panicked: {message}; exiting so that the agent is restarted \
                 (the pinned dataplane keeps serving meanwhile)"
            );
            std::process::exit(FOLLOWER_FAILED_STATUS)
        }));
        Following {
            follower: abort,
            _supervisor: AbortOnDrop(supervisor),
        }
    }

    async fn run(mut self, mut dataplane: Dataplane) -> Infallible {
        let mut rescan = interval_at(Instant::now() + RESCAN_INTERVAL, RESCAN_INTERVAL);
        loop {
            let notice = tokio::select! {
                notice = async {
                    match self.subscription.as_mut() {
                        Some(subscription) => subscription.next().await,
                        None => std::future::pending().await,
                    }
                } => Some(notice),
                _ = rescan.tick() => None,
            };
            match notice {
                None => {
                    // Failed actions get another chance, and a lost subscription another try.
                    self.failures.clear();
                    self.rescan().await;
                }
                Some(Notice::Link(ifindex, link)) => {
                    self.links.insert(ifindex, link);
                }
                Some(Notice::Gone(ifindex)) => {
                    self.links.remove(&ifindex);
                }
                Some(Notice::Lost) => {
                    warn!("link notifications were lost (buffer overrun); reading the links again");
                    self.rescan().await;
                }
                Some(Notice::Closed) => {
                    warn!("the link notifications stopped; subscribing again");
                    self.subscription = None;
                    tokio::time::sleep(RESUBSCRIBE_DELAY).await;
                    self.rescan().await;
                }
                Some(Notice::Other) => continue,
            }
            (self, dataplane) = self.sync_blocking(dataplane).await;
        }
    }

    /// [`Interfaces::sync`] on a blocking thread: attaches are BPF and ethtool syscalls and
    /// sysctl writes, and a burst of pods would otherwise stall the agent's single-threaded
    /// runtime (Service updates, health answers) for their whole length.
    async fn sync_blocking(self, dataplane: Dataplane) -> (Self, Dataplane) {
        // Any thread does: the agent enters its network namespace as a whole process (`ip netns
        // exec`, a pod's network), never thread by thread.
        let sync = tokio::task::spawn_blocking(move || {
            let (mut interfaces, mut dataplane) = (self, dataplane);
            interfaces.sync(&mut Kernel {
                dataplane: &mut dataplane,
                veth_redirect: interfaces.veth_redirect,
                set_sysctls: interfaces.set_sysctls,
            });
            (interfaces, dataplane)
        });
        match sync.await {
            Ok(done) => done,
            Err(error) => match error.try_into_panic() {
                // The follower's own panic, for the supervisor to see.
                Ok(panic) => std::panic::resume_unwind(panic),
                // Only when the runtime shuts down, which ends this task too.
                Err(_) => std::future::pending().await,
            },
        }
    }

    /// Replaces the picture of the links with a dump, through a fresh subscription opened
    /// before it. The old subscription's queue may hold notifications older than the dump,
    /// which applied after it would bring back what the dump no longer shows (a stale name of a
    /// renamed link, a link since deleted); every notification of the new one is at most as old
    /// as the dump, so applying them in order ends where the links are.
    async fn rescan(&mut self) {
        self.subscription = None;
        match Subscription::open() {
            Ok(subscription) => self.subscription = Some(subscription),
            Err(error) => warn!(
                "{error:#}; interfaces are followed by reading them every {}s until it works",
                RESCAN_INTERVAL.as_secs()
            ),
        }
        match dump_links().await {
            Ok(links) => self.links = links,
            Err(error) => warn!(
                "{error:#}; keeping the interfaces as they were, trying again in {}s",
                RESCAN_INTERVAL.as_secs()
            ),
        }
    }

    /// Brings the pinned links in line with the picture of the links. A detach or pin move that
    /// fails keeps its pin in `attached`, so that the next full re-read tries it again.
    fn sync(&mut self, pins: &mut impl Pins) {
        for action in plan(&self.links, &self.attached, &self.failures, &self.patterns) {
            match action {
                Action::Attach { name, ifindex } => {
                    // A detach that failed earlier in this sync: see `Failures::hold`.
                    if !self.failures.hold(&name, ifindex) {
                        self.attach_one(pins, name, ifindex);
                    }
                }
                Action::Detach { name, ifindex, now } => {
                    if let Err(error) = pins.unpin(&name, ifindex) {
                        self.detach_failed(&name, ifindex, &error);
                        continue;
                    }
                    self.attached.remove(&name);
                    match now {
                        None => info!(
                            interface = name,
                            ifindex, "interface gone: XDP link unpinned"
                        ),
                        Some(now) => info!(
                            interface = name,
                            ifindex, "interface renamed {now}: XDP program detached"
                        ),
                    }
                }
                Action::Rename { from, to, ifindex } => match pins.move_pin(&from, &to) {
                    Ok(()) => {
                        info!(
                            interface = to,
                            from, ifindex, "interface renamed: its XDP link follows"
                        );
                        self.attached.remove(&from);
                        self.attached.insert(to, ifindex);
                    }
                    // Whatever the error, EEXIST included (a pin at `to` this follower does not
                    // know of): the old pin goes, and the attach afresh meets the one at `to`,
                    // which `Dataplane::attach` reuses only if it holds this interface.
                    Err(error) => {
                        warn!(
                            interface = to,
                            from, "moving the pinned XDP link: {error}; attaching afresh"
                        );
                        match pins.unpin(&from, ifindex) {
                            Ok(()) => {
                                self.attached.remove(&from);
                                self.attach_one(pins, to, ifindex);
                            }
                            Err(error) => self.detach_failed(&from, ifindex, &error),
                        }
                    }
                },
            }
        }
    }

    fn detach_failed(&mut self, name: &str, ifindex: u32, error: &anyhow::Error) {
        warn!(
            interface = name,
            "detaching the XDP program: {error:#}; trying again in {}s",
            RESCAN_INTERVAL.as_secs()
        );
        self.failures.detaches.insert(name.to_owned(), ifindex);
    }

    fn attach_one(&mut self, pins: &mut impl Pins, name: String, ifindex: u32) {
        // A notification read late may describe a link deleted or renamed since; the
        // notifications that followed it will say what became of it.
        if pins.index_of(&name) != Some(ifindex) {
            debug!(interface = name, ifindex, "no longer there; not attaching");
            self.links.remove(&ifindex);
            return;
        }
        match pins.attach(&name) {
            Ok(ifindex) => {
                self.failures.attaches.remove(&name);
                self.attached.insert(name, ifindex);
            }
            Err(error) => {
                warn!(
                    interface = name,
                    "{error:#}; trying again in {}s",
                    RESCAN_INTERVAL.as_secs()
                );
                self.failures.attaches.insert(name, ifindex);
            }
        }
    }
}

/// Waits for the follower task to end, which it only does when stopped or when it panics; a
/// panic's message goes to `on_panic`.
async fn supervise(follower: JoinHandle<Infallible>, on_panic: impl FnOnce(String)) {
    match follower.await {
        Ok(never) => match never {},
        Err(error) => {
            if let Ok(panic) = error.try_into_panic() {
                on_panic(panic_message(&*panic));
            }
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// The task following link notifications; stopped when dropped.
pub struct Following {
    follower: AbortHandle,
    _supervisor: AbortOnDrop,
}

impl Drop for Following {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn patterns(items: &[&str]) -> Patterns {
        Patterns::parse(
            &items
                .iter()
                .map(|item| (*item).to_owned())
                .collect::<Vec<_>>(),
        )
        .expect("valid patterns")
    }

    fn link(name: &str) -> Link {
        Link {
            name: name.to_owned(),
            loopback: false,
        }
    }

    fn links(entries: &[(u32, &str)]) -> Links {
        entries
            .iter()
            .map(|(ifindex, name)| (*ifindex, link(name)))
            .collect()
    }

    fn attached(entries: &[(&str, u32)]) -> BTreeMap<String, u32> {
        entries
            .iter()
            .map(|(name, ifindex)| ((*name).to_owned(), *ifindex))
            .collect()
    }

    fn attach(name: &str, ifindex: u32) -> Action {
        Action::Attach {
            name: name.to_owned(),
            ifindex,
        }
    }

    fn detach(name: &str, ifindex: u32, now: Option<&str>) -> Action {
        Action::Detach {
            name: name.to_owned(),
            ifindex,
            now: now.map(str::to_owned),
        }
    }

    #[test]
    fn names_match_exactly_and_globs_match_like_a_shell() {
        let patterns = patterns(&["eth0", "veth*", "lxc?", "cali[0-9]*"]);
        for name in ["eth0", "veth", "veth1a2b", "lxcA", "cali7x"] {
            assert!(patterns.matches(&link(name)), "{name}");
        }
        for name in ["eth01", "eth", "xveth1", "lxc", "lxc12", "calix", "Veth1"] {
            assert!(!patterns.matches(&link(name)), "{name}");
        }
        assert_eq!(patterns.names().collect::<Vec<_>>(), ["eth0"]);
    }

    #[test]
    fn loopback_is_never_matched_by_a_glob_only_by_its_name() {
        let loopback = Link {
            name: "lo".to_owned(),
            loopback: true,
        };
        for glob in ["*", "l*", "lo*", "?o", "[l]o"] {
            assert!(!patterns(&[glob]).matches(&loopback), "{glob}");
        }
        assert!(patterns(&["lo"]).matches(&loopback));
        // The flag decides, not the name: a renamed loopback is still loopback.
        let renamed = Link {
            name: "lb0".to_owned(),
            loopback: true,
        };
        assert!(!patterns(&["lb*"]).matches(&renamed));
    }

    #[test]
    fn bad_items_are_refused() {
        assert!(Pattern::parse("").is_err());
        assert!(Pattern::parse("veth[0-9").is_err());
        assert!(Patterns::parse(&[]).is_err());
        assert!(matches!(Pattern::parse("eth0"), Ok(Pattern::Name(_))));
        assert!(matches!(Pattern::parse("eth[01]"), Ok(Pattern::Glob(_))));
    }

    #[test]
    fn repeated_items_count_once() {
        assert_eq!(patterns(&["eth0", "eth0"]).names().count(), 1);
    }

    #[test]
    fn matching_links_are_attached_others_left_alone() {
        let patterns = patterns(&["eth0", "veth*"]);
        let now = links(&[(1, "lo"), (2, "eth0"), (3, "veth1"), (4, "docker0")]);
        assert_eq!(
            plan(&now, &attached(&[]), &Failures::default(), &patterns),
            [attach("eth0", 2), attach("veth1", 3)]
        );
        assert!(
            plan(
                &now,
                &attached(&[("eth0", 2), ("veth1", 3)]),
                &Failures::default(),
                &patterns
            )
            .is_empty()
        );
    }

    #[test]
    fn a_deleted_interface_is_detached() {
        let patterns = patterns(&["veth*"]);
        assert_eq!(
            plan(
                &links(&[(3, "veth1")]),
                &attached(&[("veth1", 3), ("veth2", 4)]),
                &Failures::default(),
                &patterns
            ),
            [detach("veth2", 4, None)]
        );
    }

    #[test]
    fn an_interface_re_created_under_its_name_is_detached_then_attached_afresh() {
        // Its deletion went unnoticed (lost notifications): the stale pin goes first.
        assert_eq!(
            plan(
                &links(&[(9, "veth1")]),
                &attached(&[("veth1", 3)]),
                &Failures::default(),
                &patterns(&["veth*"])
            ),
            [detach("veth1", 3, None), attach("veth1", 9)]
        );
    }

    #[test]
    fn renames_move_the_pin_or_detach() {
        let patterns = patterns(&["veth*"]);
        let none = Failures::default();
        assert_eq!(
            plan(
                &links(&[(3, "veth9")]),
                &attached(&[("veth1", 3)]),
                &none,
                &patterns
            ),
            [Action::Rename {
                from: "veth1".to_owned(),
                to: "veth9".to_owned(),
                ifindex: 3
            }]
        );
        assert_eq!(
            plan(
                &links(&[(3, "eth9")]),
                &attached(&[("veth1", 3)]),
                &none,
                &patterns
            ),
            [detach("veth1", 3, Some("eth9"))]
        );
        assert_eq!(
            plan(&links(&[(3, "veth1")]), &attached(&[]), &none, &patterns),
            [attach("veth1", 3)]
        );
        // Two interfaces swapping names: neither pin can move first; both start over.
        assert_eq!(
            plan(
                &links(&[(3, "veth2"), (4, "veth1")]),
                &attached(&[("veth1", 3), ("veth2", 4)]),
                &none,
                &patterns
            ),
            [
                detach("veth1", 3, Some("veth2")),
                detach("veth2", 4, Some("veth1")),
                attach("veth2", 3),
                attach("veth1", 4)
            ]
        );
    }

    #[test]
    fn a_failed_attach_waits_unless_the_interface_changed() {
        let patterns = patterns(&["veth*"]);
        let failed = Failures {
            attaches: attached(&[("veth1", 3)]),
            ..Failures::default()
        };
        assert!(plan(&links(&[(3, "veth1")]), &attached(&[]), &failed, &patterns).is_empty());
        assert_eq!(
            plan(&links(&[(5, "veth1")]), &attached(&[]), &failed, &patterns),
            [attach("veth1", 5)]
        );
    }

    #[test]
    fn a_failed_detach_waits_with_its_name_and_interface() {
        let patterns = patterns(&["veth*"]);
        let failures = Failures {
            detaches: attached(&[("veth1", 3)]),
            ..Failures::default()
        };
        // Renamed out of the globs, and its old name taken by a new interface: neither the
        // detach nor the new interface's attach (which would meet the stale pin) happens until
        // the failures are forgotten.
        let now = links(&[(3, "eth9"), (7, "veth1")]);
        let pinned = attached(&[("veth1", 3)]);
        assert!(plan(&now, &pinned, &failures, &patterns).is_empty());
        assert_eq!(
            plan(&now, &pinned, &Failures::default(), &patterns),
            [detach("veth1", 3, Some("eth9")), attach("veth1", 7)]
        );
        // Renamed within the globs: its new name is not attached afresh either, the interface
        // still holds the link pinned under its old name.
        let renamed = links(&[(3, "veth9")]);
        assert!(plan(&renamed, &pinned, &failures, &patterns).is_empty());
        // Other interfaces go on.
        assert_eq!(
            plan(
                &links(&[(3, "eth9"), (4, "veth4")]),
                &pinned,
                &failures,
                &patterns
            ),
            [attach("veth4", 4)]
        );
    }

    #[test]
    fn start_up_fails_on_a_sysctl_only_for_interfaces_named_exactly() {
        let patterns = patterns(&["eth0", "veth*"]);
        let gone = |interface: &str| -> anyhow::Result<()> {
            bail!("writing /proc/sys/net/ipv4/conf/{interface}/accept_local: No such file")
        };
        let mut set = Vec::new();
        let result = allow_local_sources_on(
            &patterns,
            &["veth1".to_owned(), "veth2".to_owned()],
            |interface| {
                set.push(interface.to_owned());
                if interface == "veth1" {
                    gone(interface)
                } else {
                    Ok(())
                }
            },
        );
        // A pod's veth deleted between its attach and the write: the others still get it.
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(set, ["veth1", "veth2"]);
        assert!(allow_local_sources_on(&patterns, &["eth0".to_owned()], gone).is_err());
    }

    /// Interfaces, pins and links as [`Pins`] sees them, with unpins that fail on demand.
    #[derive(Default)]
    struct FakePins {
        /// Interface names and indexes now.
        interfaces: BTreeMap<String, u32>,
        /// Pin names and the index of the interface their link holds.
        pins: BTreeMap<String, u32>,
        /// Pins whose unpin fails.
        stuck: BTreeSet<String>,
        unpins: Vec<(String, u32)>,
    }

    impl Pins for FakePins {
        fn index_of(&self, name: &str) -> Option<u32> {
            self.interfaces.get(name).copied()
        }

        fn attach(&mut self, name: &str) -> anyhow::Result<u32> {
            let ifindex = self.index_of(name).context("no such interface")?;
            if self
                .pins
                .iter()
                .any(|(pin, &held)| held == ifindex && pin != name)
            {
                bail!("{name} already runs an XDP program");
            }
            // A pin of the name for another interface is replaced (Dataplane::attach).
            self.pins.insert(name.to_owned(), ifindex);
            Ok(ifindex)
        }

        fn unpin(&mut self, name: &str, ifindex: u32) -> anyhow::Result<()> {
            self.unpins.push((name.to_owned(), ifindex));
            if self.stuck.contains(name) {
                bail!("removing {name}: Device or resource busy");
            }
            self.pins.remove(name);
            Ok(())
        }

        fn move_pin(&mut self, from: &str, to: &str) -> io::Result<()> {
            if self.pins.contains_key(to) {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            let ifindex = self.pins.remove(from).ok_or(io::ErrorKind::NotFound)?;
            self.pins.insert(to.to_owned(), ifindex);
            Ok(())
        }
    }

    fn following(items: &[&str], now: Links, pinned: BTreeMap<String, u32>) -> Interfaces {
        Interfaces {
            patterns: patterns(items),
            veth_redirect: VethRedirect::Never,
            subscription: None,
            links: now,
            attached: pinned,
            failures: Failures::default(),
            set_sysctls: false,
        }
    }

    #[test]
    fn a_failed_detach_stays_pinned_and_is_tried_again_at_the_next_full_read() {
        let mut kernel = FakePins {
            interfaces: attached(&[("eth9", 3)]),
            pins: attached(&[("veth1", 3)]),
            stuck: BTreeSet::from(["veth1".to_owned()]),
            ..FakePins::default()
        };
        let mut interfaces =
            following(&["veth*"], links(&[(3, "eth9")]), attached(&[("veth1", 3)]));
        interfaces.sync(&mut kernel);
        assert_eq!(interfaces.attached, attached(&[("veth1", 3)]));
        // A notification meanwhile: a new interface under the old name waits with the retry.
        kernel.interfaces.insert("veth1".to_owned(), 7);
        interfaces.links.insert(7, link("veth1"));
        interfaces.sync(&mut kernel);
        assert_eq!(kernel.unpins, [("veth1".to_owned(), 3)]);
        assert_eq!(kernel.pins, attached(&[("veth1", 3)]));
        // The periodic full read.
        kernel.stuck.clear();
        interfaces.failures.clear();
        interfaces.sync(&mut kernel);
        assert_eq!(
            kernel.unpins,
            [("veth1".to_owned(), 3), ("veth1".to_owned(), 3)]
        );
        assert_eq!(kernel.pins, attached(&[("veth1", 7)]));
        assert_eq!(interfaces.attached, attached(&[("veth1", 7)]));
    }

    #[test]
    fn a_pin_that_cannot_move_is_detached_and_attached_afresh_or_kept_for_a_retry() {
        // A pin left at the new name (not this follower's): the move refuses to replace it.
        let mut kernel = FakePins {
            interfaces: attached(&[("veth9", 3)]),
            pins: attached(&[("veth1", 3), ("veth9", 8)]),
            stuck: BTreeSet::from(["veth1".to_owned()]),
            ..FakePins::default()
        };
        let mut interfaces = following(
            &["veth*"],
            links(&[(3, "veth9")]),
            attached(&[("veth1", 3)]),
        );
        interfaces.sync(&mut kernel);
        // Nor could the old pin go: it stays, to be tried again.
        assert_eq!(interfaces.attached, attached(&[("veth1", 3)]));
        assert_eq!(kernel.pins, attached(&[("veth1", 3), ("veth9", 8)]));
        kernel.stuck.clear();
        interfaces.failures.clear();
        interfaces.sync(&mut kernel);
        assert_eq!(interfaces.attached, attached(&[("veth9", 3)]));
        assert_eq!(kernel.pins, attached(&[("veth9", 3)]));
        // Without a pin in the way, the pin moves.
        kernel.interfaces = attached(&[("veth5", 3)]);
        interfaces.links = links(&[(3, "veth5")]);
        interfaces.sync(&mut kernel);
        assert_eq!(interfaces.attached, attached(&[("veth5", 3)]));
        assert_eq!(kernel.pins, attached(&[("veth5", 3)]));
        assert_eq!(
            kernel.unpins,
            [("veth1".to_owned(), 3), ("veth1".to_owned(), 3)]
        );
    }

    #[test]
    fn a_pin_never_moves_over_another() {
        let dir = std::env::temp_dir().join(format!("lb-move-pin-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("a scratch directory");
        let (from, to, free) = (dir.join("veth1"), dir.join("veth9"), dir.join("veth5"));
        fs::write(&from, "veth1").expect("writing");
        fs::write(&to, "veth9").expect("writing");
        let refused = move_pin(&from, &to);
        assert_eq!(
            refused.map_err(|error| error.raw_os_error()),
            Err(Some(libc::EEXIST))
        );
        assert_eq!(fs::read_to_string(&to).expect("reading"), "veth9");
        move_pin(&from, &free).expect("moving to a free name");
        assert_eq!(fs::read_to_string(&free).expect("reading"), "veth1");
        assert!(!from.exists());
        fs::remove_dir_all(&dir).expect("cleaning up");
    }

    #[tokio::test]
    async fn a_panicking_follower_is_reported_a_stopped_one_is_not() {
        let mut reported = Vec::new();
        let follower = tokio::spawn(async { panic!("follower broke") });
        supervise(follower, |message| reported.push(message)).await;
        assert_eq!(reported, ["follower broke"]);

        let follower = tokio::spawn(std::future::pending::<Infallible>());
        follower.abort();
        supervise(follower, |message| reported.push(message)).await;
        assert_eq!(reported, ["follower broke"]);
    }

    /// How long a test waits for a link notification the kernel sends at once.
    const NOTICE_TIMEOUT: Duration = Duration::from_secs(10);

    /// Runs `body` on a thread in a network namespace of its own (commands it starts run there
    /// too); `None`, without running it, when this process may not make one.
    fn in_own_netns<T: Send>(body: impl FnOnce() -> T + Send) -> Option<T> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: moves only this thread into a new network namespace.
                    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                        return None;
                    }
                    Some(body())
                })
                .join()
                .expect("the test thread panicked (see above)")
        })
    }

    fn ip(args: &[&str]) {
        let status = std::process::Command::new("ip")
            .args(args)
            .status()
            .expect("running ip");
        assert!(status.success(), "ip {args:?}");
    }

    #[test]
    fn a_rescan_drops_the_notifications_older_than_its_dump() {
        let ran = in_own_netns(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                let mut interfaces = following(&["x*"], Links::new(), BTreeMap::new());
                interfaces.subscription = Some(Subscription::open().expect("subscribing"));
                // Queued, unread, when the links are read again.
                ip(&["link", "add", "x1", "type", "veth", "peer", "name", "y1"]);
                ip(&["link", "set", "x1", "name", "x2"]);
                interfaces.rescan().await;
                let names: Vec<&str> = interfaces
                    .links
                    .values()
                    .map(|link| link.name.as_str())
                    .collect();
                assert!(names.contains(&"x2") && !names.contains(&"x1"), "{names:?}");
                // Everything notified until the next change is no older than the dump.
                ip(&["link", "set", "x2", "name", "x3"]);
                let subscription = interfaces.subscription.as_mut().expect("subscribed again");
                loop {
                    let notice = timeout(NOTICE_TIMEOUT, subscription.next())
                        .await
                        .expect("the rename to x3 notified");
                    match notice {
                        Notice::Link(_, link) if link.name == "x3" => break,
                        Notice::Link(_, link) => {
                            assert!(
                                !["x1", "x2"].contains(&link.name.as_str()),
                                "a notification older than the dump: {link:?}"
                            );
                        }
                        Notice::Closed => panic!("the subscription closed"),
                        Notice::Gone(_) | Notice::Lost | Notice::Other => {}
                    }
                }
            });
        });
        if ran.is_none() {
            eprintln!("skipped: making a network namespace needs CAP_SYS_ADMIN");
        }
    }
}
