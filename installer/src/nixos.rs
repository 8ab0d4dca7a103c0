//! What an install leaves for NixOS: a module with the node's host name,
//! host ID and root's SSH keys, for the system's configuration to import.

use std::path::Path;

use anyhow::{Context, Result};

use crate::net::KeySet;

/// Where the module goes, under the installed root.
pub const MODULE_PATH: &str = "/etc/nixos/nodeflash.nix";

/// A Nix string literal.
fn quote(s: &str) -> String {
    format!(
        "\"{}\"",
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace("${", "\\${")
    )
}

/// The module's text.
pub fn module(hostname: &str, hostid: u32, keys: &KeySet) -> String {
    let keys: String = keys
        .keys
        .iter()
        .map(|k| format!("    {}\n", quote(&k.line())))
        .collect();
    format!(
        "# Written by nodeflash when it installed this node. Import it from\n\
         # configuration.nix so that NixOS keeps this host name, host ID and keys.\n\
         {{ ... }}:\n\
         {{\n  \
           networking.hostName = {};\n  \
           networking.hostId = \"{hostid:08x}\";\n  \
           users.users.root.openssh.authorizedKeys.keys = [\n{keys}  ];\n\
         }}\n",
        quote(hostname)
    )
}

/// Writes the module under `root`.
pub fn write_module(root: &Path, hostname: &str, hostid: u32, keys: &KeySet) -> Result<()> {
    let path = root.join(MODULE_PATH.trim_start_matches('/'));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(&path, module(hostname, hostid, keys))
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_carries_identity_and_quoted_keys() {
        let mut keys = KeySet::default();
        let key = crate::net::keys::parse_line(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a\"${b}",
            "test",
        )
        .expect("key");
        keys.add(key);
        let text = module("kos-mos", 0x472479d4, &keys);
        assert!(
            text.contains("networking.hostName = \"kos-mos\";"),
            "{text}"
        );
        assert!(text.contains("networking.hostId = \"472479d4\";"), "{text}");
        assert!(
            text.contains("\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a\\\"\\${b}\""),
            "{text}"
        );
        assert_eq!(quote(r"a\b"), r#""a\\b""#);
    }
}
