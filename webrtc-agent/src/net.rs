//! Which addresses media binds to.

use std::net::{IpAddr, Ipv4Addr};

/// Picks the addresses to gather candidates on. A configured address wins; otherwise every
/// non-loopback IPv4 address of the machine, or 127.0.0.1 when loopback is all there is
/// (a network namespace with only `lo`, as the tests use).
pub fn bind_ips(configured: Option<IpAddr>) -> Vec<IpAddr> {
    if let Some(ip) = configured {
        return vec![ip];
    }
    let mut ips: Vec<IpAddr> = rtc::shared::ifaces::ifaces()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|i| i.addr.map(|a| a.ip()))
        .filter(|ip| ip.is_ipv4() && !ip.is_loopback() && !ip.is_unspecified())
        .collect();
    ips.sort();
    ips.dedup();
    if ips.is_empty() {
        ips.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    ips
}

/// The one address a single-address engine binds when none is configured: of `ips` (from
/// [`bind_ips`]), the one on the interface of the default route (where clients on the
/// internet are reached), else the first. Reads the routing table; sends nothing.
pub fn primary_ip(ips: &[IpAddr]) -> Option<IpAddr> {
    let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let ifaces = rtc::shared::ifaces::ifaces().unwrap_or_default();
    default_route_iface(&routes)
        .and_then(|name| ifaces.iter().filter(|i| i.name == name).filter_map(|i| i.addr.map(|a| a.ip())).find(|ip| ips.contains(ip)))
        .or_else(|| ips.first().copied())
}

/// The interface of the IPv4 default route in `/proc/net/route` text (the lowest metric).
fn default_route_iface(routes: &str) -> Option<&str> {
    routes
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...; flag 0x1 = up.
            let (iface, dest, flags, metric, mask) = (f.first()?, f.get(1)?, f.get(3)?, f.get(6)?, f.get(7)?);
            let up = u16::from_str_radix(flags, 16).ok()? & 1 == 1;
            (*dest == "00000000" && *mask == "00000000" && up).then(|| (metric.parse::<u32>().unwrap_or(u32::MAX), *iface))
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, iface)| iface)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_ip_wins() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(bind_ips(Some(ip)), vec![ip]);
        assert!(!bind_ips(None).is_empty());
    }

    #[test]
    fn default_route_interface_is_found() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
            wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
            eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            tun0\t00000000\t00000000\t0000\t0\t0\t0\t00000000\t0\t0\t0\n";
        // The down tun0 does not count; of the two up default routes, the lower metric wins.
        assert_eq!(default_route_iface(table), Some("eth0"));
        assert_eq!(default_route_iface("Iface\tDestination\n"), None);
        assert_eq!(default_route_iface("garbage"), None);
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert_eq!(primary_ip(&[lo]), Some(lo));
        assert_eq!(primary_ip(&[]), None);
    }
}
