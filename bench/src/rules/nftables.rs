//! kube-proxy's nftables mode (Kubernetes 1.31+): `table ip kube-proxy`, written with `nft -f`.
//!
//! A packet that opens a connection is dispatched by one lookup in the `service-ips` verdict map,
//! keyed by (destination, protocol, port), to its Service port's `service-` chain, which picks
//! an endpoint with `numgen random` and a verdict map and goes to the endpoint's `endpoint-`
//! chain, which DNATs it. The dispatch costs the same for the first Service and the ten
//! thousandth, which is what this layout is measured for against iptables' walk.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::Context as _;
use lb_tests::netns::Netns;

use super::{CLUSTER_CIDR, MASQUERADE_MARK, chain_hash, push_line, run_with_stdin};
use crate::workload::SyntheticService;

/// Services per `nft` transaction. One transaction of 10,000 Services takes 70-100 s on the 6.18
/// development kernel, which does not preempt inside it and logs soft lockups meanwhile; ten of
/// 1,000 take about 12 s in all.
pub const MAX_SERVICES_PER_TRANSACTION: usize = 1_000;

/// The loader.
pub const NFT: &str = "nft";
/// kube-proxy's table, in the `ip` family (its IPv4 instance).
pub const TABLE: &str = "ip kube-proxy";

/// Service dispatch, jumped to from the prerouting and output NAT hooks.
const SERVICES_CHAIN: &str = "services";
/// The verdict map `services` looks packets up in.
const SERVICE_IPS_MAP: &str = "service-ips";
/// Marks a packet for masquerading.
const MARK_MASQ_CHAIN: &str = "mark-for-masquerade";
/// Masquerades the packets `mark-for-masquerade` marked, jumped to from the postrouting hook.
const MASQUERADING_CHAIN: &str = "masquerading";
/// `dstnat`'s value. nft 1.0.6 (Debian 12) only accepts the name at the prerouting hook, and
/// kube-proxy's `dstnat` at the output hook means the same number.
const DSTNAT_PRIORITY: &str = "-100";
/// kube-proxy's NAT base chains, named `${type}-${hook}`: (name, hook, priority, jump target).
const BASE_CHAINS: [(&str, &str, &str, &str); 3] = [
    ("nat-prerouting", "prerouting", "dstnat", SERVICES_CHAIN),
    ("nat-output", "output", DSTNAT_PRIORITY, SERVICES_CHAIN),
    (
        "nat-postrouting",
        "postrouting",
        "srcnat",
        MASQUERADING_CHAIN,
    ),
];
const SERVICE_CHAIN_PREFIX: &str = "service-";
const ENDPOINT_CHAIN_PREFIX: &str = "endpoint-";
/// Hash characters in front of a chain's readable name, as kube-proxy.
const HASH_CHARS: usize = 8;

/// The `service-` chain of a Service port: `service-HASH-ns/name/proto/port-name`.
pub fn service_chain(service: &SyntheticService) -> String {
    let base = service_base(service);
    format!(
        "{SERVICE_CHAIN_PREFIX}{}-{base}",
        chain_hash(&base, HASH_CHARS)
    )
}

/// The `endpoint-` chain of one endpoint of a Service port:
/// `endpoint-HASH-ns/name/proto/port-name__ip/port`.
pub fn endpoint_chain(service: &SyntheticService, endpoint: Ipv4Addr) -> String {
    let base = format!(
        "{}__{endpoint}/{}",
        service_base(service),
        service.target_port
    );
    format!(
        "{ENDPOINT_CHAIN_PREFIX}{}-{base}",
        chain_hash(&base, HASH_CHARS)
    )
}

/// `ns/name/proto/port-name`: nftables chain names allow `/`, which Kubernetes names do not
/// contain, so kube-proxy separates the parts with it.
fn service_base(service: &SyntheticService) -> String {
    format!(
        "{}/{}/{}/{}",
        service.namespace,
        service.name,
        service.protocol.lower(),
        service.port_name
    )
}

/// The rule set for `services` as `nft -f` scripts, each one transaction: the first creates the
/// table, its chains and the `service-ips` map, each of the others adds the chains and map
/// elements of at most [`MAX_SERVICES_PER_TRANSACTION`] Services, in creation order. Services
/// without endpoints are left out (kube-proxy rejects their traffic from filter chains, which
/// are not written).
pub fn ruleset(services: &[SyntheticService]) -> Vec<String> {
    let mut scripts = vec![setup()];
    for batch in services.chunks(MAX_SERVICES_PER_TRANSACTION) {
        let mut out = String::new();
        for service in batch.iter().filter(|s| !s.endpoints.is_empty()) {
            write_service(&mut out, service);
            push_line(
                &mut out,
                format_args!(
                    "add element {TABLE} {SERVICE_IPS_MAP} {{ {} . {} . {} : goto {} }}",
                    service.cluster_ip,
                    service.protocol.lower(),
                    service.port,
                    service_chain(service)
                ),
            );
        }
        scripts.push(out);
    }
    scripts
}

/// The transaction kube-proxy's partial sync writes when the endpoints of `changed` (the new
/// version of `services[changed.index]`) changed: the Service's chain and all its endpoint
/// chains created if new, flushed and rewritten, and the chains of removed endpoints flushed and
/// deleted. The `service-ips` element is unchanged and not written. kube-proxy deletes stale
/// chains one transaction (and at least a second) later, because kernels before 6.2 noticed
/// late that a flushed verdict map no longer referred to them; this kernel is newer, so the
/// delete is part of the one transaction.
///
/// # Panics
///
/// If `changed` is not a version of `services[changed.index]` or has no endpoints left.
pub fn change_endpoint(services: &[SyntheticService], changed: &SyntheticService) -> String {
    let old = &services[changed.index];
    assert_eq!(
        old.port_id(),
        changed.port_id(),
        "the changed Service must replace the one at its index"
    );
    assert!(
        !changed.endpoints.is_empty(),
        "a Service without endpoints loses its chains instead"
    );
    let mut out = String::new();
    write_service(&mut out, changed);
    for &endpoint in &old.endpoints {
        if !changed.endpoints.contains(&endpoint) {
            let chain = endpoint_chain(old, endpoint);
            push_line(&mut out, format_args!("flush chain {TABLE} {chain}"));
            push_line(&mut out, format_args!("delete chain {TABLE} {chain}"));
        }
    }
    out
}

/// Runs each script with `nft -f -` inside `node`, in order, and returns their total wall time.
pub fn load(node: &Netns, scripts: &[String]) -> anyhow::Result<Duration> {
    scripts
        .iter()
        .enumerate()
        .try_fold(Duration::ZERO, |total, (i, script)| {
            let elapsed = run_with_stdin(node, NFT, &["-f", "-"], script)
                .with_context(|| format!("nft transaction {} of {}", i + 1, scripts.len()))?;
            Ok(total + elapsed)
        })
}

/// Deletes the table a load made, so that the next load starts from nothing (adding it first
/// makes one transaction that works whether or not it exists).
pub fn clear(node: &Netns) -> anyhow::Result<()> {
    let script = format!("add table {TABLE}\ndelete table {TABLE}\n");
    run_with_stdin(node, NFT, &["-f", "-"], &script)?;
    Ok(())
}

/// What kube-proxy's full sync sets up before any Service: the table, the NAT base chains and
/// their jumps, masquerading, and the `service-ips` dispatch. Chains are added and flushed, as
/// kube-proxy does, so that the script also resets a table that exists.
fn setup() -> String {
    let mut out = String::new();
    push_line(
        &mut out,
        format_args!("add table {TABLE} {{ comment \"rules for kube-proxy\" ; }}"),
    );
    for (chain, hook, priority, _) in BASE_CHAINS {
        push_line(
            &mut out,
            format_args!(
                "add chain {TABLE} {chain} {{ type nat hook {hook} priority {priority} ; }}"
            ),
        );
        push_line(&mut out, format_args!("flush chain {TABLE} {chain}"));
    }
    for chain in [SERVICES_CHAIN, MASQUERADING_CHAIN, MARK_MASQ_CHAIN] {
        ensure_chain(&mut out, chain);
    }
    for (chain, _, _, target) in BASE_CHAINS {
        push_line(
            &mut out,
            format_args!("add rule {TABLE} {chain} jump {target}"),
        );
    }
    push_line(
        &mut out,
        format_args!("add rule {TABLE} {MARK_MASQ_CHAIN} mark set mark or {MASQUERADE_MARK}"),
    );
    push_line(
        &mut out,
        format_args!(
            "add rule {TABLE} {MASQUERADING_CHAIN} mark and {MASQUERADE_MARK} == 0 return"
        ),
    );
    push_line(
        &mut out,
        format_args!("add rule {TABLE} {MASQUERADING_CHAIN} mark set mark xor {MASQUERADE_MARK}"),
    );
    push_line(
        &mut out,
        format_args!("add rule {TABLE} {MASQUERADING_CHAIN} masquerade fully-random"),
    );
    push_line(
        &mut out,
        format_args!(
            "add map {TABLE} {SERVICE_IPS_MAP} {{ type ipv4_addr . inet_proto . inet_service : \
             verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
        ),
    );
    push_line(
        &mut out,
        format_args!("flush map {TABLE} {SERVICE_IPS_MAP}"),
    );
    push_line(
        &mut out,
        format_args!(
            "add rule {TABLE} {SERVICES_CHAIN} ip daddr . meta l4proto . th dport vmap \
             @{SERVICE_IPS_MAP}"
        ),
    );
    out
}

/// kube-proxy's `ensureChain`: the chain exists and holds nothing from before this transaction.
fn ensure_chain(out: &mut String, chain: &str) {
    push_line(out, format_args!("add chain {TABLE} {chain}"));
    push_line(out, format_args!("flush chain {TABLE} {chain}"));
}

/// A Service port's chain and its endpoints' chains, with their rules.
fn write_service(out: &mut String, service: &SyntheticService) {
    let service_chain = service_chain(service);
    let endpoint_chains: Vec<String> = service
        .endpoints
        .iter()
        .map(|&endpoint| endpoint_chain(service, endpoint))
        .collect();
    for chain in &endpoint_chains {
        ensure_chain(out, chain);
    }
    ensure_chain(out, &service_chain);
    let protocol = service.protocol.lower();
    // Traffic from outside the cluster is masqueraded so that replies come back through this
    // node; the benchmark client is inside CLUSTER_CIDR and is not.
    push_line(
        out,
        format_args!(
            "add rule {TABLE} {service_chain} ip daddr {} {protocol} dport {} ip saddr != \
             {CLUSTER_CIDR} jump {MARK_MASQ_CHAIN}",
            service.cluster_ip, service.port
        ),
    );
    let choices = endpoint_chains
        .iter()
        .enumerate()
        .map(|(i, chain)| format!("{i} : goto {chain}"))
        .collect::<Vec<_>>()
        .join(" , ");
    push_line(
        out,
        format_args!(
            "add rule {TABLE} {service_chain} numgen random mod {} vmap {{ {choices} }}",
            endpoint_chains.len()
        ),
    );
    for (chain, &endpoint) in endpoint_chains.iter().zip(&service.endpoints) {
        // Hairpin: a pod reaching itself through its Service is masqueraded, or it would see
        // its own address as the source of its own request.
        push_line(
            out,
            format_args!("add rule {TABLE} {chain} ip saddr {endpoint} jump {MARK_MASQ_CHAIN}"),
        );
        push_line(
            out,
            format_args!(
                "add rule {TABLE} {chain} meta l4proto {protocol} dnat to {endpoint}:{}",
                service.target_port
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use lb_tests::{leftovers::TESTS, netns::unique_prefix, privilege::require_root};

    use super::*;
    use crate::workload::{Traffic, services};

    /// An address no synthetic Service uses.
    const NEW_ENDPOINT: Ipv4Addr = Ipv4Addr::new(10, 127, 0, 1);

    fn count(text: &str, needle: &str) -> usize {
        text.matches(needle).count()
    }

    /// `service` with its second endpoint replaced by [`NEW_ENDPOINT`]; returns the old one too.
    fn replace_second_endpoint(service: &SyntheticService) -> (SyntheticService, Ipv4Addr) {
        let mut changed = service.clone();
        let old = std::mem::replace(&mut changed.endpoints[1], NEW_ENDPOINT);
        (changed, old)
    }

    #[test]
    fn three_services_have_a_chain_each_one_per_endpoint_and_a_map_element_each() {
        let services = services(3, 3, Traffic::Http);
        let endpoints: usize = services.iter().map(|s| s.endpoints.len()).sum();
        let scripts = ruleset(&services);
        assert_eq!(scripts.len(), 2);
        let text = &scripts[1];
        assert_eq!(count(text, &format!("add chain {TABLE} service-")), 3);
        assert_eq!(
            count(text, &format!("add chain {TABLE} endpoint-")),
            endpoints
        );
        assert_eq!(
            count(text, &format!("add element {TABLE} service-ips {{ ")),
            3
        );
        let service = &services[0];
        let chain = service_chain(service);
        assert!(chain.starts_with("service-") && chain.ends_with("-bench/svc-0/tcp/http"));
        let rules: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&format!("add rule {TABLE} {chain} ")))
            .collect();
        assert_eq!(rules.len(), 2);
        assert!(rules[0].ends_with(&format!(
            "ip daddr {} tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
            service.cluster_ip
        )));
        let first = endpoint_chain(service, service.endpoints[0]);
        assert!(first.ends_with(&format!(
            "-bench/svc-0/tcp/http__{}/8080",
            service.endpoints[0]
        )));
        assert!(
            rules[1].contains(&format!(
                "numgen random mod 3 vmap {{ 0 : goto {first} , 1 : goto "
            )),
            "{}",
            rules[1]
        );
        assert!(text.contains(&format!(
            "add rule {TABLE} {first} meta l4proto tcp dnat to {}:8080",
            service.endpoints[0]
        )));
        let setup = &scripts[0];
        assert!(setup.contains("type nat hook prerouting priority dstnat"));
        assert!(setup.contains("type nat hook output priority -100"));
        assert!(setup.contains("type nat hook postrouting priority srcnat"));
        assert!(setup.contains("ip daddr . meta l4proto . th dport vmap @service-ips"));
    }

    #[test]
    fn services_are_added_in_transactions_of_at_most_a_thousand_in_creation_order() {
        let services = services(2_500, 1, Traffic::Http);
        let scripts = ruleset(&services);
        assert_eq!(scripts.len(), 1 + 3);
        assert!(scripts[0].starts_with(&format!("add table {TABLE} ")));
        assert_eq!(count(&scripts[0], "add element"), 0);
        let elements: Vec<usize> = scripts[1..]
            .iter()
            .map(|s| count(s, "add element"))
            .collect();
        assert_eq!(elements, [1_000, 1_000, 500]);
        assert!(scripts[3].contains(&format!("{{ {} . tcp . 80 : ", services[2_499].cluster_ip)));
        assert!(scripts[1].contains(&format!("{{ {} . tcp . 80 : ", services[0].cluster_ip)));
    }

    #[test]
    fn change_endpoint_rewrites_the_service_and_deletes_the_old_endpoint_chain() {
        let services = services(5, 3, Traffic::Http);
        let (changed, old) = replace_second_endpoint(&services[4]);
        let text = change_endpoint(&services, &changed);
        let old_chain = endpoint_chain(&services[4], old);
        let new_chain = endpoint_chain(&changed, NEW_ENDPOINT);
        let service_chain = service_chain(&changed);
        assert!(text.contains(&format!("add chain {TABLE} {new_chain}\n")));
        assert!(text.contains(&format!("dnat to {NEW_ENDPOINT}:8080\n")));
        assert!(text.contains(&format!("flush chain {TABLE} {service_chain}\n")));
        assert!(text.contains(&format!("1 : goto {new_chain} ,")));
        assert!(text.ends_with(&format!(
            "flush chain {TABLE} {old_chain}\ndelete chain {TABLE} {old_chain}\n"
        )));
        assert_eq!(count(&text, &old_chain), 2, "only flushed and deleted");
        assert_eq!(count(&text, "add element"), 0);
        assert_eq!(count(&text, "add chain"), 1 + changed.endpoints.len());
    }

    fn listed_table(node: &Netns) -> String {
        let output = node
            .exec(NFT, &["list", "table", "ip", "kube-proxy"])
            .expect("nft list");
        String::from_utf8(output.stdout).expect("UTF-8")
    }

    #[test]
    fn nft_loads_the_ruleset_and_the_endpoint_change() {
        if !require_root("nft_loads_the_ruleset_and_the_endpoint_change") {
            return;
        }
        let node = Netns::create(&format!("{}-nft", unique_prefix(TESTS))).expect("namespace");
        let services = services(5, 3, Traffic::Http);
        load(&node, &ruleset(&services)).expect("full load");
        let listed = listed_table(&node);
        assert_eq!(count(&listed, "\tchain service-"), 5, "{listed}");
        assert_eq!(count(&listed, "\tchain endpoint-"), 15, "{listed}");
        for service in &services {
            assert!(
                listed.contains(&format!(
                    "{} . tcp . 80 : goto {}",
                    service.cluster_ip,
                    service_chain(service)
                )),
                "{listed}"
            );
        }

        let (changed, old) = replace_second_endpoint(&services[4]);
        let old_chain = endpoint_chain(&services[4], old);
        assert!(listed.contains(&format!("dnat to {old}:8080")), "{listed}");
        load(&node, &[change_endpoint(&services, &changed)]).expect("endpoint change");
        let listed = listed_table(&node);
        assert!(
            listed.contains(&format!("dnat to {NEW_ENDPOINT}:8080")),
            "{listed}"
        );
        assert!(!listed.contains(&format!("dnat to {old}:")), "{listed}");
        assert!(!listed.contains(&old_chain), "{listed}");
        assert!(
            listed.contains(&endpoint_chain(&changed, NEW_ENDPOINT)),
            "{listed}"
        );
        assert_eq!(count(&listed, "\tchain service-"), 5, "{listed}");
        assert_eq!(count(&listed, "\tchain endpoint-"), 15, "{listed}");
    }
}
