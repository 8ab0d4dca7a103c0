//! Which node of the cluster this machine is: matched by hardware facts
//! (DMI serial or product UUID, a NIC's MAC, a disk's serial), so one stick
//! serves the whole cluster.

use std::fmt::Write as _;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::facts::Facts;
use crate::profile::{HostId, Hostname, NodeMatch, Profile};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    /// The profile's node name, or None for a generic node.
    pub node: Option<String>,
    pub hostname: String,
    #[serde(skip)]
    pub hostid: HostId,
    /// Why: the facts that matched, or that none did.
    pub reason: String,
    /// The node's own disk rules, if it has any.
    #[serde(skip)]
    pub disk_select: Option<crate::profile::DiskSelect>,
    /// The node's own SSH keys, besides the profile's.
    #[serde(skip)]
    pub keys: Vec<String>,
}

fn same(a: &str, b: &str) -> bool {
    a.trim().eq_ignore_ascii_case(b.trim())
}

/// The facts of `m` that hold on this machine, or None if any does not (or
/// `m` is empty: such a node is never recognised).
fn matched(m: &NodeMatch, facts: &Facts) -> Option<Vec<String>> {
    if m.is_empty() {
        return None;
    }
    let mut why = Vec::new();
    if let Some(want) = &m.dmi_serial {
        facts
            .dmi
            .product_serial
            .as_deref()
            .filter(|s| same(s, want))?;
        why.push(format!("dmi-serial={want}"));
    }
    if let Some(want) = &m.product_uuid {
        facts
            .dmi
            .product_uuid
            .as_deref()
            .filter(|s| same(s, want))?;
        why.push(format!("product-uuid={want}"));
    }
    if let Some(want) = &m.mac {
        facts
            .net
            .iter()
            .find(|n| n.mac.as_deref().is_some_and(|mac| same(mac, want)))?;
        why.push(format!("mac={want}"));
    }
    if let Some(want) = &m.disk_serial {
        facts
            .block_devices
            .iter()
            .find(|d| !d.removable && d.serial.as_deref().is_some_and(|s| same(s, want)))?;
        why.push(format!("disk-serial={want}"));
    }
    Some(why)
}

/// The identity of this machine under `profile`.
pub fn identify(profile: &Profile, facts: &Facts) -> Result<Identity> {
    let hits: Vec<(&crate::profile::Node, Vec<String>)> = profile
        .nodes
        .iter()
        .filter_map(|n| matched(&n.matches, facts).map(|why| (n, why)))
        .collect();
    match hits.as_slice() {
        [(node, why)] => Ok(Identity {
            node: Some(node.name.get_ref().to_string()),
            hostname: node.name.get_ref().to_string(),
            hostid: node.hostid,
            reason: format!("matched {}", why.join(", ")),
            disk_select: node.disk.clone(),
            keys: node.keys.clone(),
        }),
        [] => {
            let d = &profile.default_node;
            if !d.install {
                bail!(
                    "this machine matches no node of the profile and [default-node] install = false; \
                     nothing was written. Its facts: dmi-serial={:?} product-uuid={:?} macs={:?}",
                    facts.dmi.product_serial.as_deref().unwrap_or(""),
                    facts.dmi.product_uuid.as_deref().unwrap_or(""),
                    facts.net.iter().filter_map(|n| n.mac.as_deref()).collect::<Vec<_>>()
                );
            }
            let serial = facts
                .dmi
                .product_serial
                .as_deref()
                .unwrap_or("unknown")
                .to_lowercase();
            let name: String = d
                .hostname
                .replace("{serial}", &serial)
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c.to_ascii_lowercase()
                    } else {
                        '-'
                    }
                })
                .collect();
            let hostname = Hostname::try_from(name.trim_matches('-').to_string())
                .map_err(|e| anyhow::anyhow!("[default-node] hostname gives {e}"))?;
            Ok(Identity {
                node: None,
                hostname: hostname.0,
                hostid: d.hostid,
                reason: "no node of the profile matches: generic node".into(),
                disk_select: None,
                keys: Vec::new(),
            })
        }
        several => {
            let mut msg = format!(
                "{} nodes of the profile match this machine, refusing to guess; nothing was written:\n",
                several.len()
            );
            for (n, why) in several {
                let _ = writeln!(msg, "  {}: {}", n.name.get_ref(), why.join(", "));
            }
            bail!("{}", msg.trim_end())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::{BlockDevice, Dmi, NetInterface};

    const PROFILE: &str = r#"
name = "t"
[disk]
select = { bus = "nvme" }
[pool]
[[nodes]]
name = "kos-mos"
hostid = "472479d4"
match = { dmi-serial = "KM-1" }
[[nodes]]
name = "logos"
hostid = "aeace675"
match = { mac = "52:54:00:aa:bb:02" }
[[nodes]]
name = "ontos"
hostid = "07602ecc"
match = { disk-serial = "S4EWNX0R" }
[[nodes]]
name = "pneuma"
hostid = "34fbd94b"
[default-node]
hostname = "node-{serial}"
"#;

    fn facts(serial: &str, mac: &str, disk_serial: &str) -> Facts {
        Facts {
            dmi: Dmi {
                product_serial: Some(serial.into()),
                ..Dmi::default()
            },
            net: vec![NetInterface {
                name: "eth0".into(),
                mac: Some(mac.into()),
                carrier: Some(true),
            }],
            block_devices: vec![BlockDevice::fixed(
                "nvme0n1",
                1 << 40,
                512,
                "nvme",
                disk_serial,
            )],
        }
    }

    fn profile() -> Profile {
        Profile::parse(PROFILE, "t.toml").expect("profile")
    }

    #[test]
    fn recognises_each_kind_of_fact() {
        let p = profile();
        let id = identify(&p, &facts("KM-1", "52:54:00:00:00:01", "X")).expect("kos-mos");
        assert_eq!(
            (id.hostname.as_str(), id.hostid),
            ("kos-mos", HostId::Fixed(0x472479d4))
        );
        assert_eq!(id.reason, "matched dmi-serial=KM-1");
        let id =
            identify(&p, &facts("?", "52:54:00:AA:BB:02", "X")).expect("logos by MAC, any case");
        assert_eq!(id.hostname, "logos");
        let id = identify(&p, &facts("?", "52:54:00:00:00:01", "S4EWNX0R")).expect("ontos by disk");
        assert_eq!(id.hostname, "ontos");
    }

    #[test]
    fn a_node_brings_its_disk_rules() {
        let src = PROFILE.replace(
            "match = { disk-serial = \"S4EWNX0R\" }",
            "match = { disk-serial = \"S4EWNX0R\" }\ndisk = { serial = \"S4EWNX0R\" }",
        );
        let p = Profile::parse(&src, "t.toml").expect("profile");
        let id = identify(&p, &facts("?", "52:54:00:00:00:01", "S4EWNX0R")).expect("ontos");
        assert_eq!(
            id.disk_select.and_then(|s| s.serial).as_deref(),
            Some("S4EWNX0R")
        );
    }

    #[test]
    fn a_node_without_match_rules_is_never_recognised() {
        let id = identify(&profile(), &facts("PN-1", "52:54:00:00:00:01", "X")).expect("generic");
        assert_eq!(id.node, None);
        assert_eq!(id.hostname, "node-pn-1");
        assert_eq!(id.hostid, HostId::Derive);
    }

    #[test]
    fn several_matches_are_refused() {
        let err =
            identify(&profile(), &facts("KM-1", "52:54:00:aa:bb:02", "X")).expect_err("ambiguous");
        let msg = err.to_string();
        assert!(msg.contains("2 nodes of the profile match"), "{msg}");
        assert!(
            msg.contains("kos-mos: dmi-serial=KM-1")
                && msg.contains("logos: mac=52:54:00:aa:bb:02"),
            "{msg}"
        );
    }

    #[test]
    fn refusal_when_the_default_node_may_not_install() {
        let mut p = profile();
        p.default_node.install = false;
        let err = identify(&p, &facts("ZZ", "52:54:00:00:00:01", "X")).expect_err("refused");
        assert!(err.to_string().contains("matches no node"), "{err}");
    }
}
