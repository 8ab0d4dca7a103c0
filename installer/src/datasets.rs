//! The dataset tree as ZFS will see it, computed once: every dataset's
//! effective `mountpoint` and `canmount` by ZFS's own rules, and from them
//! the one list of what is mounted, where and in which order. The install's
//! `zfs mount` commands, the NixOS chroot and nodeflash's check system all
//! use [`mount_order`]; `profile check` refuses collisions with [`tree`].
//!
//! The rules are zfsprops(7):
//! - `mountpoint` is inherited: a child without its own value gets its
//!   parent's mountpoint followed by its own name (`/` + `nix` → `/nix`);
//!   `none` and `legacy` are inherited as they are. The pool's root dataset
//!   defaults to `/<pool>`.
//! - `canmount` is *not* inherited: a dataset without its own value is `on`.
//! - `zfs mount -a` mounts the `canmount=on` datasets with a path; a
//!   `canmount=noauto` dataset is mounted only when asked, which is how a
//!   boot environment's root (`ROOT/nixos` at `/`) is mounted by the initrd.
//!   So the installed system mounts the root dataset (the one at `/`,
//!   `canmount` `on` or `noauto`) and every `canmount=on` dataset with a
//!   path, parents first (`zfs mount -a` sorts by mountpoint).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::profile::Pool;

/// `canmount` (zfsprops(7)): `on` (the default), `off` or `noauto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CanMount {
    On,
    Off,
    Noauto,
}

impl CanMount {
    /// Parses ZFS's spelling; None for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "on" => Some(Self::On),
            "off" => Some(Self::Off),
            "noauto" => Some(Self::Noauto),
            _ => None,
        }
    }
}

/// One dataset with the values ZFS will give it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Effective {
    /// Full name, with the pool (`rpool/safe/root`).
    pub name: String,
    /// An absolute path (normalised), `none` or `legacy`.
    pub mountpoint: String,
    /// The dataset whose own value this mountpoint comes from; None when the
    /// dataset sets it itself or it is the pool's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inherited_from: Option<String>,
    pub canmount: CanMount,
    /// With `mountpoint` `legacy`: where it is mounted (`legacy-mount`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub legacy_mount: Option<String>,
    /// The profile key that set the mountpoint (`pool.datasets[2].mountpoint`),
    /// or the dataset's name key when it is inherited (for error messages).
    #[serde(skip)]
    pub key: String,
}

/// A dataset the installed system mounts, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mounted {
    pub dataset: String,
    pub mountpoint: String,
    /// A legacy dataset, mounted with `mount -t zfs` (`zfs mount` refuses
    /// it) at `mountpoint`, its `legacy-mount`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub legacy: bool,
}

impl Mounted {
    /// Where dataset `d` is mounted: its effective mountpoint, or the
    /// `legacy-mount` of a legacy dataset.
    pub fn of(d: &Effective) -> Mounted {
        Mounted {
            dataset: d.name.clone(),
            mountpoint: d
                .legacy_mount
                .clone()
                .unwrap_or_else(|| d.mountpoint.clone()),
            legacy: d.legacy_mount.is_some(),
        }
    }
}

/// `path` with `//` collapsed and no trailing `/` (the root stays `/`);
/// `none` and `legacy` unchanged.
pub fn normalise(path: &str) -> String {
    if !path.starts_with('/') {
        return path.to_string();
    }
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    format!("/{}", parts.join("/"))
}

/// A profile problem in the dataset tree: the key and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeError {
    /// Index in `pool.datasets`, None for the pool's root dataset.
    pub dataset: Option<usize>,
    pub key: String,
    pub message: String,
}

fn mountpoint_value(v: &str) -> Result<String, String> {
    if v == "none" || v == "legacy" || (v.starts_with('/') && !v.split('/').any(|c| c == "..")) {
        Ok(normalise(v))
    } else {
        Err(format!(
            "invalid mountpoint `{v}`: use an absolute path, \"legacy\" or \"none\""
        ))
    }
}

/// Every dataset of `pool`, its root first, with its effective mountpoint
/// and canmount, in the profile's order. A mountpoint given in `options`
/// counts as the `mountpoint` key does (both at once is an error); a
/// `canmount` other than `on`, `off`, `noauto` is an error. Parents must be
/// listed before their children (the profile checks that first); a missing
/// parent counts as the pool's root.
pub fn effective(pool: &Pool) -> Result<Vec<Effective>, TreeError> {
    let pool_name = pool.name.to_string();
    let canmount = |opts: &BTreeMap<String, String>, key: &str, ds: Option<usize>| match opts
        .get("canmount")
    {
        None => Ok(CanMount::On),
        Some(v) => CanMount::parse(v).ok_or_else(|| TreeError {
            dataset: ds,
            key: format!("{key}.canmount"),
            message: format!("canmount `{v}` is not `on`, `off` or `noauto`"),
        }),
    };
    let root_mp = match pool.root_options.get("mountpoint") {
        Some(v) => mountpoint_value(v).map_err(|message| TreeError {
            dataset: None,
            key: "pool.root-options.mountpoint".into(),
            message,
        })?,
        None => format!("/{pool_name}"),
    };
    let mut out = vec![Effective {
        name: pool_name.clone(),
        mountpoint: root_mp,
        inherited_from: None,
        canmount: canmount(&pool.root_options, "pool.root-options", None)?,
        legacy_mount: None,
        key: "pool.root-options.mountpoint".into(),
    }];
    let mut by_name: BTreeMap<String, usize> = BTreeMap::from([(pool_name.clone(), 0)]);
    for (i, ds) in pool.datasets.iter().enumerate() {
        let rel = ds.name.get_ref().0.as_str();
        let full = format!("{pool_name}/{rel}");
        let key = format!("pool.datasets[{i}]");
        let own = match (&ds.mountpoint, ds.options.get("mountpoint")) {
            (Some(_), Some(_)) => {
                return Err(TreeError {
                    dataset: Some(i),
                    key: format!("{key}.options.mountpoint"),
                    message: format!(
                        "dataset `{rel}` has both `mountpoint` and `options.mountpoint`: give it once, as `mountpoint`"
                    ),
                })
            }
            (Some(m), None) => Some((
                mountpoint_value(&m.get_ref().0).map_err(|message| TreeError {
                    dataset: Some(i),
                    key: format!("{key}.mountpoint"),
                    message,
                })?,
                format!("{key}.mountpoint"),
            )),
            (None, Some(v)) => Some((
                mountpoint_value(v).map_err(|message| TreeError {
                    dataset: Some(i),
                    key: format!("{key}.options.mountpoint"),
                    message,
                })?,
                format!("{key}.options.mountpoint"),
            )),
            (None, None) => None,
        };
        let (mountpoint, inherited_from, key_of) = match own {
            Some((mp, k)) => (mp, None, k),
            None => {
                let parent_name = match rel.rsplit_once('/') {
                    Some((p, _)) => format!("{pool_name}/{p}"),
                    None => pool_name.clone(),
                };
                let parent = &out[*by_name.get(&parent_name).unwrap_or(&0)];
                let leaf = rel.rsplit('/').next().unwrap_or(rel);
                let mp = if parent.mountpoint.starts_with('/') {
                    normalise(&format!("{}/{leaf}", parent.mountpoint))
                } else {
                    parent.mountpoint.clone()
                };
                let from = parent
                    .inherited_from
                    .clone()
                    .unwrap_or_else(|| parent.name.clone());
                (mp, Some(from), format!("{key}.name"))
            }
        };
        let canmount = canmount(&ds.options, &format!("{key}.options"), Some(i))?;
        let legacy_mount = match &ds.legacy_mount {
            None => None,
            Some(path) => {
                let bad = |message: String| TreeError {
                    dataset: Some(i),
                    key: format!("{key}.legacy-mount"),
                    message,
                };
                if mountpoint != "legacy" {
                    return Err(bad(format!(
                        "`legacy-mount` is for a dataset whose mountpoint is `legacy`; ZFS \
                         mounts `{rel}` itself (mountpoint `{mountpoint}`): give it \
                         `mountpoint = \"legacy\"`, or leave `legacy-mount` out"
                    )));
                }
                if canmount == CanMount::Off {
                    return Err(bad(format!(
                        "`{rel}` has `canmount = \"off\"` and cannot be mounted: leave \
                         `legacy-mount` out, or the `canmount`"
                    )));
                }
                match mountpoint_value(path) {
                    Ok(p) if p.starts_with('/') => Some(p),
                    _ => {
                        return Err(bad(format!(
                            "`legacy-mount` `{path}` is not an absolute path"
                        )))
                    }
                }
            }
        };
        by_name.insert(full.clone(), out.len());
        out.push(Effective {
            name: full,
            mountpoint,
            inherited_from,
            canmount,
            legacy_mount,
            key: key_of,
        });
    }
    Ok(out)
}

/// Whether the installed system mounts this dataset (see the module's rules).
pub fn is_mounted(d: &Effective) -> bool {
    if d.mountpoint == "legacy" {
        return d.legacy_mount.is_some() && d.canmount != CanMount::Off;
    }
    d.mountpoint.starts_with('/')
        && match d.canmount {
            CanMount::On => true,
            CanMount::Noauto => d.mountpoint == "/",
            CanMount::Off => false,
        }
}

/// What the installed system mounts, parents first: fewer path components
/// first, then by path: parents before children, as `zfs mount -a`
/// orders them (OpenZFS `lib/libzfs/libzfs_mount.c`, `mountpoint_cmp`).
pub fn mount_order(tree: &[Effective]) -> Vec<Mounted> {
    let mut list: Vec<(usize, Mounted)> = tree
        .iter()
        .filter(|d| is_mounted(d))
        .map(|d| {
            let m = Mounted::of(d);
            let depth = m.mountpoint.split('/').filter(|c| !c.is_empty()).count();
            (depth, m)
        })
        .collect();
    list.sort_by(|a, b| (a.0, &a.1.mountpoint).cmp(&(b.0, &b.1.mountpoint)));
    list.into_iter().map(|(_, m)| m).collect()
}

/// The profile's tree, checked: [`effective`], and no two datasets that can
/// be mounted (`canmount` `on` or `noauto`) at the same path, compared
/// after [`normalise`] and with inherited mountpoints. `canmount=off`
/// datasets may share a path (that is what `off` is for).
pub fn tree(pool: &Pool) -> Result<Vec<Effective>, TreeError> {
    let all = effective(pool)?;
    let mut seen: BTreeMap<&str, &Effective> = BTreeMap::new();
    for (i, d) in all.iter().enumerate() {
        let path = d.legacy_mount.as_deref().unwrap_or(&d.mountpoint);
        if !path.starts_with('/') || d.canmount == CanMount::Off {
            continue;
        }
        if let Some(other) = seen.insert(path, d) {
            let how = match &d.inherited_from {
                Some(from) => format!(" (inherited from `{from}`)"),
                None => String::new(),
            };
            return Err(TreeError {
                dataset: i.checked_sub(1),
                key: d.key.clone(),
                message: format!(
                    "mountpoint `{}` of dataset `{}`{how} is already used by dataset `{}`; \
                     give each dataset its own mountpoint, or `canmount = \"off\"` in its options",
                    path, d.name, other.name
                ),
            });
        }
    }
    Ok(all)
}

/// The mounted dataset holding `path` (the longest mountpoint that is a
/// prefix of it, by path components), with its mountpoint.
pub fn holding<'a>(mounts: &'a [Mounted], path: &str) -> Option<&'a Mounted> {
    mounts
        .iter()
        .filter(|m| std::path::Path::new(path).starts_with(&m.mountpoint))
        .max_by_key(|m| m.mountpoint.len())
}

/// [`mount_order`] of the profile's pool; empty when the tree is invalid
/// (a loaded profile has been checked with [`tree`]).
pub fn mounts(pool: &Pool) -> Vec<Mounted> {
    effective(pool).map(|t| mount_order(&t)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Profile;

    fn pool(body: &str) -> Pool {
        let src = format!("name = \"t\"\n[disk]\nselect = {{ serial = \"S\" }}\n[pool]\n{body}");
        Profile::parse(&src, "t.toml").expect("profile").pool
    }

    fn order(body: &str) -> Vec<(String, String)> {
        mount_order(&effective(&pool(body)).expect("tree"))
            .into_iter()
            .map(|m| (m.dataset, m.mountpoint))
            .collect()
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn a_child_inherits_its_parents_mountpoint() {
        // Issue 17 case 1: `root/nix` has no mountpoint, ZFS gives it /nix.
        let got = order(
            "root-options = { canmount = \"off\", mountpoint = \"none\" }\n\
             [[pool.datasets]]\nname = \"root\"\nmountpoint = \"/\"\n\
             [[pool.datasets]]\nname = \"root/nix\"\n",
        );
        assert_eq!(
            got,
            pairs(&[("rpool/root", "/"), ("rpool/root/nix", "/nix")])
        );
    }

    #[test]
    fn the_openzfs_guide_layout_mounts_its_bare_children() {
        // root-options at /, canmount=off; children with no mountpoint.
        let t = effective(&pool(
            "root-options = { mountpoint = \"/\", canmount = \"off\" }\n\
             [[pool.datasets]]\nname = \"nix\"\n\
             [[pool.datasets]]\nname = \"home\"\n\
             [[pool.datasets]]\nname = \"home/alice\"\n\
             [[pool.datasets]]\nname = \"none\"\nmountpoint = \"none\"\n\
             [[pool.datasets]]\nname = \"none/below\"\n",
        ))
        .expect("tree");
        assert_eq!(t[0].canmount, CanMount::Off);
        assert_eq!(t[3].mountpoint, "/home/alice");
        assert_eq!(t[3].inherited_from.as_deref(), Some("rpool"));
        assert_eq!(t[5].mountpoint, "none", "none is inherited as it is");
        assert_eq!(
            mount_order(&t)
                .into_iter()
                .map(|m| m.mountpoint)
                .collect::<Vec<_>>(),
            ["/home", "/nix", "/home/alice"]
        );
    }

    #[test]
    fn canmount_is_not_inherited_and_a_noauto_root_is_mounted() {
        // Issue 17 case 2: the boot-environment layout.
        let got = order(
            "root-options = { mountpoint = \"none\", canmount = \"off\" }\n\
             [[pool.datasets]]\nname = \"ROOT\"\noptions = { canmount = \"off\" }\nmountpoint = \"none\"\n\
             [[pool.datasets]]\nname = \"ROOT/nixos\"\nmountpoint = \"/\"\noptions = { canmount = \"noauto\" }\n\
             [[pool.datasets]]\nname = \"ROOT/nixos/var\"\n\
             [[pool.datasets]]\nname = \"data\"\nmountpoint = \"/srv\"\noptions = { canmount = \"noauto\" }\n\
             [[pool.datasets]]\nname = \"nix\"\nmountpoint = \"/nix\"\n",
        );
        // ROOT/nixos/var is canmount=on (not inherited from noauto) at /var;
        // a noauto dataset other than the root is not mounted.
        assert_eq!(
            got,
            pairs(&[
                ("rpool/ROOT/nixos", "/"),
                ("rpool/nix", "/nix"),
                ("rpool/ROOT/nixos/var", "/var")
            ])
        );
    }

    #[test]
    fn the_pool_root_defaults_to_slash_pool_and_options_mountpoint_counts() {
        let t = effective(&pool(
            "[[pool.datasets]]\nname = \"a\"\noptions = { mountpoint = \"/srv/a/\" }\n\
             [[pool.datasets]]\nname = \"a/b\"\n",
        ))
        .expect("tree");
        assert_eq!(t[0].mountpoint, "/rpool");
        assert_eq!(t[1].mountpoint, "/srv/a", "trailing slash normalised");
        assert_eq!(t[1].key, "pool.datasets[0].options.mountpoint");
        assert_eq!(t[2].mountpoint, "/srv/a/b");
        assert_eq!(t[2].inherited_from.as_deref(), Some("rpool/a"));
    }

    #[test]
    fn collisions_are_found_after_normalising_and_inheriting() {
        let err = |body: &str| tree(&pool_unchecked(body)).expect_err("collision");
        // Three datasets at /.
        let e = err("[[pool.datasets]]\nname = \"a\"\nmountpoint = \"/\"\n[[pool.datasets]]\nname = \"b\"\nmountpoint = \"/\"\n[[pool.datasets]]\nname = \"c\"\nmountpoint = \"/\"\n");
        assert_eq!(e.key, "pool.datasets[1].mountpoint");
        assert!(e.message.contains("`rpool/a`"), "{e:?}");
        // /home and /home/ through options.
        let e = err("[[pool.datasets]]\nname = \"a\"\nmountpoint = \"/home\"\n[[pool.datasets]]\nname = \"b\"\noptions = { mountpoint = \"/home/\" }\n");
        assert_eq!(e.key, "pool.datasets[1].options.mountpoint");
        // An inherited /home beside an explicit one.
        let e = err("root-options = { mountpoint = \"/\" , canmount = \"off\" }\n[[pool.datasets]]\nname = \"home\"\n[[pool.datasets]]\nname = \"h\"\nmountpoint = \"/home\"\n");
        assert_eq!(e.key, "pool.datasets[1].mountpoint");
        assert_eq!(e.dataset, Some(1));
        // The pool's root at / beside a dataset at /.
        let e = err("root-options = { mountpoint = \"/\" }\n[[pool.datasets]]\nname = \"r\"\nmountpoint = \"/\"\n");
        assert!(e.message.contains("`rpool`"), "{e:?}");
        // canmount=off datasets may share a path.
        tree(&pool_unchecked("root-options = { mountpoint = \"/\", canmount = \"off\" }\n[[pool.datasets]]\nname = \"ROOT\"\nmountpoint = \"/\"\noptions = { canmount = \"off\" }\n[[pool.datasets]]\nname = \"ROOT/nixos\"\nmountpoint = \"/\"\n")).expect("off shares");
        // Both keys at once.
        let e = err("[[pool.datasets]]\nname = \"a\"\nmountpoint = \"/a\"\noptions = { mountpoint = \"/b\" }\n");
        assert!(e.message.contains("give it once"), "{e:?}");
    }

    #[test]
    fn profile_check_names_the_line_and_key_of_a_collision() {
        // Two datasets at /home, one through `options`: line 9 is the
        // second dataset's name (its mountpoint has no span of its own).
        let src = "name = \"t\"\n[disk]\nselect = { serial = \"S\" }\n[pool]\n\
                   [[pool.datasets]]\nname = \"a\"\nmountpoint = \"/home\"\n\
                   [[pool.datasets]]\nname = \"b\"\noptions = { mountpoint = \"//home/\" }\n";
        let e = Profile::parse(src, "t.toml").expect_err("collision");
        assert_eq!(e.key, "pool.datasets[1].options.mountpoint");
        assert_eq!((e.file.as_str(), e.line), ("t.toml", 9), "{e}");
        assert!(
            e.message.contains("already used by dataset `rpool/a`"),
            "{e}"
        );
    }

    /// A pool parsed without the profile's checks (to test them here).
    fn pool_unchecked(body: &str) -> Pool {
        let src = format!("name = \"t\"\n[disk]\nselect = {{ serial = \"S\" }}\n[pool]\n{body}");
        toml::from_str::<Profile>(&src).expect("toml").pool
    }

    #[test]
    fn holding_finds_the_longest_mountpoint() {
        let m = |d: &str, p: &str| Mounted {
            dataset: d.into(),
            mountpoint: p.into(),
            legacy: false,
        };
        let mounts = [m("r/root", "/"), m("r/nix", "/nix"), m("r/ni", "/ni")];
        assert_eq!(
            holding(&mounts, "/nix/store").map(|m| m.dataset.as_str()),
            Some("r/nix")
        );
        assert_eq!(
            holding(&mounts, "/nixos").map(|m| m.dataset.as_str()),
            Some("r/root")
        );
        assert_eq!(holding(&mounts[1..], "/etc"), None);
    }

    #[test]
    fn normalises_paths() {
        assert_eq!(normalise("/home/"), "/home");
        assert_eq!(normalise("//a//b/"), "/a/b");
        assert_eq!(normalise("/"), "/");
        assert_eq!(normalise("none"), "none");
    }
}
