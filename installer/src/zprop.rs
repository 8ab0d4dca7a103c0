//! ZFS names and property values, checked at build time as the node's
//! OpenZFS 2.1.11 will check them at `zpool create` / `zfs create`, so that
//! a value ZFS refuses never gets as far as a partitioned disk.
//!
//! The rules come from the `zfs-dkms` 2.1.11 source the builder unpacks
//! (`usr/src/zfs-2.1.11`):
//! - `module/zcommon/zfs_prop.c` (`zfs_prop_init`): dataset properties, the
//!   words of every index property, `recordsize` "512 to 1M, power of 2",
//!   `special_small_blocks` "zero or 512 to 1M", and
//!   `zfs_prop_valid_keylocation`;
//! - `module/zcommon/zpool_prop.c` (`zpool_prop_init`): pool properties,
//!   `ashift` "9-16, or 0=default";
//! - `include/sys/spa.h` (`ASHIFT_MIN` 9, `ASHIFT_MAX` 16),
//!   `include/sys/fs/zfs.h` (`SPA_MINBLOCKSIZE`, `ZFS_MAX_DATASET_NAME_LEN`
//!   256, `ZPROP_MAX_COMMENT` 32, `SPA_VERSION_BEFORE_FEATURES` 28,
//!   `SPA_VERSION_FEATURES` 5000), `module/zfs/dsl_dataset.c`
//!   (`zfs_max_recordsize` 1 MiB);
//! - `module/zcommon/zfeature_common.c`: the pool features;
//! - `module/zcommon/zfs_namecheck.c` (`pool_namecheck`,
//!   `entity_namecheck`, `dataset_nestcheck`): names;
//! - `module/zfs/dsl_crypt.c` (`dmu_objset_create_crypt_check`): encryption
//!   parameters only with encryption.
//! - `module/zfs/zfs_ioctl.c` (`zfs_check_settable`): values that need a
//!   pool feature.
//!
//! Two rules live in libzfs, which the dkms source does not carry: the
//! reserved pool-name prefixes of `zpool_name_valid`
//! (`lib/libzfs/libzfs_pool.c`) and the number syntax of `zfs_nicestrtonum`
//! (`lib/libzfs/libzfs_util.c`: a number with an optional `B`, `K`, `M`,
//! `G`, `T`, `P`, `E` or `Z` suffix, binary, optionally followed by `B` or
//! `iB`, any case).
//!
//! Property *words* are compared exactly, as `zprop_string_to_index` does
//! (`module/zcommon/zprop_common.c`, `strcmp`).

use std::collections::BTreeMap;

/// What values a property takes.
#[derive(Clone, Copy)]
enum Value {
    /// One of these words (an index property).
    Words(&'static [&'static str]),
    /// A pool's `ashift`: 0 (detect) or 9 to 16.
    Ashift,
    /// A block size: a power of two from 512 to 1 MiB; `zero` allows 0.
    BlockSize { zero: bool },
    /// A size or `none` (quotas and reservations).
    SizeOrNone,
    /// A count or `none` (limits).
    CountOrNone,
    /// A plain number (`pbkdf2iters`).
    Number,
    /// An absolute path, `legacy` or `none`.
    Mountpoint,
    /// `prompt`, `file:///…`, `https://…`, `http://…` or `none`.
    KeyLocation,
    /// Free text (SELinux contexts, share options).
    Text,
    /// A pool comment: printable ASCII, at most 32 characters.
    Comment,
    /// `none` or an absolute path.
    CacheFile,
    /// `off` or `legacy` (the image carries no compatibility.d files).
    Compatibility,
    /// A pool version: 1 to 28, or 5000 (feature flags).
    PoolVersion,
    /// Set by the installer itself: refused with this reason.
    Installer(&'static str),
}

const ON_OFF: &[&str] = &["on", "off"];

const COMPRESSION: &[&str] = &[
    "on",
    "off",
    "lzjb",
    "gzip",
    "gzip-1",
    "gzip-2",
    "gzip-3",
    "gzip-4",
    "gzip-5",
    "gzip-6",
    "gzip-7",
    "gzip-8",
    "gzip-9",
    "zle",
    "lz4",
    "zstd",
    "zstd-fast",
    "zstd-1",
    "zstd-2",
    "zstd-3",
    "zstd-4",
    "zstd-5",
    "zstd-6",
    "zstd-7",
    "zstd-8",
    "zstd-9",
    "zstd-10",
    "zstd-11",
    "zstd-12",
    "zstd-13",
    "zstd-14",
    "zstd-15",
    "zstd-16",
    "zstd-17",
    "zstd-18",
    "zstd-19",
    "zstd-fast-1",
    "zstd-fast-2",
    "zstd-fast-3",
    "zstd-fast-4",
    "zstd-fast-5",
    "zstd-fast-6",
    "zstd-fast-7",
    "zstd-fast-8",
    "zstd-fast-9",
    "zstd-fast-10",
    "zstd-fast-20",
    "zstd-fast-30",
    "zstd-fast-40",
    "zstd-fast-50",
    "zstd-fast-60",
    "zstd-fast-70",
    "zstd-fast-80",
    "zstd-fast-90",
    "zstd-fast-100",
    "zstd-fast-500",
    "zstd-fast-1000",
];

/// Dataset properties `zfs create -o` and `zpool create -O` accept, with
/// their values (`zfs_prop.c`, settable ones only).
const DATASET: &[(&str, Value)] = &[
    (
        "aclinherit",
        Value::Words(&[
            "discard",
            "noallow",
            "restricted",
            "passthrough",
            "secure",
            "passthrough-x",
        ]),
    ),
    (
        "aclmode",
        Value::Words(&["discard", "groupmask", "passthrough", "restricted"]),
    ),
    (
        "acltype",
        Value::Words(&["off", "posix", "nfsv4", "disabled", "noacl", "posixacl"]),
    ),
    ("atime", Value::Words(ON_OFF)),
    ("canmount", Value::Words(&["off", "on", "noauto"])),
    (
        "casesensitivity",
        Value::Words(&["sensitive", "insensitive", "mixed"]),
    ),
    (
        "checksum",
        Value::Words(&[
            "on",
            "off",
            "fletcher2",
            "fletcher4",
            "sha256",
            "noparity",
            "sha512",
            "skein",
            "edonr",
        ]),
    ),
    ("compression", Value::Words(COMPRESSION)),
    ("context", Value::Text),
    ("copies", Value::Words(&["1", "2", "3"])),
    (
        "dedup",
        Value::Words(&[
            "on",
            "off",
            "verify",
            "sha256",
            "sha256,verify",
            "sha512",
            "sha512,verify",
            "skein",
            "skein,verify",
            "edonr,verify",
        ]),
    ),
    ("defcontext", Value::Text),
    ("devices", Value::Words(ON_OFF)),
    (
        "dnodesize",
        Value::Words(&["legacy", "auto", "1k", "2k", "4k", "8k", "16k"]),
    ),
    (
        "encryption",
        Value::Words(&[
            "on",
            "off",
            "aes-128-ccm",
            "aes-192-ccm",
            "aes-256-ccm",
            "aes-128-gcm",
            "aes-192-gcm",
            "aes-256-gcm",
        ]),
    ),
    ("exec", Value::Words(ON_OFF)),
    ("filesystem_limit", Value::CountOrNone),
    ("fscontext", Value::Text),
    (
        "keyformat",
        Value::Words(&["none", "raw", "hex", "passphrase"]),
    ),
    ("keylocation", Value::KeyLocation),
    ("logbias", Value::Words(&["latency", "throughput"])),
    ("mlslabel", Value::Text),
    ("mountpoint", Value::Mountpoint),
    ("nbmand", Value::Words(ON_OFF)),
    (
        "normalization",
        Value::Words(&["none", "formD", "formKC", "formC", "formKD"]),
    ),
    ("overlay", Value::Words(ON_OFF)),
    ("pbkdf2iters", Value::Number),
    ("primarycache", Value::Words(&["all", "none", "metadata"])),
    ("quota", Value::SizeOrNone),
    ("readonly", Value::Words(ON_OFF)),
    ("recordsize", Value::BlockSize { zero: false }),
    (
        "redundant_metadata",
        Value::Words(&["all", "most", "some", "none"]),
    ),
    ("refquota", Value::SizeOrNone),
    ("refreservation", Value::SizeOrNone),
    ("relatime", Value::Words(ON_OFF)),
    ("reservation", Value::SizeOrNone),
    ("rootcontext", Value::Text),
    ("secondarycache", Value::Words(&["all", "none", "metadata"])),
    ("setuid", Value::Words(ON_OFF)),
    ("sharenfs", Value::Text),
    ("sharesmb", Value::Text),
    ("snapdev", Value::Words(&["hidden", "visible"])),
    ("snapdir", Value::Words(&["hidden", "visible"])),
    ("snapshot_limit", Value::CountOrNone),
    ("special_small_blocks", Value::BlockSize { zero: true }),
    ("sync", Value::Words(&["standard", "always", "disabled"])),
    ("utf8only", Value::Words(ON_OFF)),
    (
        "version",
        Value::Words(&["1", "2", "3", "4", "5", "current"]),
    ),
    (
        "volmode",
        Value::Words(&["default", "full", "geom", "dev", "none"]),
    ),
    ("vscan", Value::Words(ON_OFF)),
    ("xattr", Value::Words(&["off", "on", "sa", "dir"])),
    ("zoned", Value::Words(ON_OFF)),
];

/// Pool properties `zpool create -o` accepts (`zpool_prop.c`, settable ones).
const POOL: &[(&str, Value)] = &[
    (
        "altroot",
        Value::Installer("the installer creates the pool with its own altroot (-R /mnt)"),
    ),
    ("ashift", Value::Ashift),
    ("autoexpand", Value::Words(ON_OFF)),
    ("autoreplace", Value::Words(ON_OFF)),
    ("autotrim", Value::Words(ON_OFF)),
    (
        "bootfs",
        Value::Installer(
            "the installer sets bootfs to the dataset mounted at /, which does not exist yet \
             when the pool is created",
        ),
    ),
    ("cachefile", Value::CacheFile),
    ("comment", Value::Comment),
    ("compatibility", Value::Compatibility),
    ("delegation", Value::Words(ON_OFF)),
    ("failmode", Value::Words(&["wait", "continue", "panic"])),
    ("listsnapshots", Value::Words(ON_OFF)),
    ("multihost", Value::Words(ON_OFF)),
    (
        "readonly",
        Value::Installer("a read-only pool cannot receive the install"),
    ),
    ("version", Value::PoolVersion),
];

/// The pool features of OpenZFS 2.1.11 (`zfeature_common.c`), settable at
/// `zpool create` as `feature@NAME=enabled|disabled`.
const FEATURES: &[&str] = &[
    "allocation_classes",
    "async_destroy",
    "bookmark_v2",
    "bookmark_written",
    "bookmarks",
    "device_rebuild",
    "device_removal",
    "draid",
    "edonr",
    "embedded_data",
    "empty_bpobj",
    "enabled_txg",
    "encryption",
    "extensible_dataset",
    "filesystem_limits",
    "hole_birth",
    "large_blocks",
    "large_dnode",
    "livelist",
    "log_spacemap",
    "lz4_compress",
    "multi_vdev_crash_dump",
    "obsolete_counts",
    "project_quota",
    "redacted_datasets",
    "redaction_bookmarks",
    "resilver_defer",
    "sha512",
    "skein",
    "spacemap_histogram",
    "spacemap_v2",
    "userobj_accounting",
    "zpool_checkpoint",
    "zstd_compress",
];

/// `ZFS_MAX_DATASET_NAME_LEN` (`include/sys/fs/zfs.h`).
pub const MAX_NAME_LEN: usize = 256;
/// `zfs_max_dataset_nesting` (`zfs_namecheck.c`).
const MAX_NESTING: usize = 50;

/// A number as `zfs_nicestrtonum` reads it: `131072`, `128K`, `128KiB`,
/// `1.5M`; binary units. None when it is not one.
pub fn parse_number(s: &str) -> Option<u64> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() || num.starts_with('.') {
        return None;
    }
    let unit = unit.to_ascii_uppercase();
    let shift = match unit.as_str() {
        "" | "B" => 0,
        u => {
            let i = "KMGTPEZ".find(u.chars().next()?)?;
            let rest = &u[1..];
            if !(rest.is_empty() || rest == "B" || rest == "IB") {
                return None;
            }
            10 * (i as u32 + 1)
        }
    };
    let mult = 1u128.checked_shl(shift)?;
    let value = match num.split_once('.') {
        None => num.parse::<u128>().ok()?.checked_mul(mult)?,
        Some((int, frac)) => {
            // As `zfs_nicestrtonum`: a fraction only with a unit.
            if shift == 0 || frac.is_empty() || frac.len() > 18 {
                return None;
            }
            let int: u128 = int.parse().ok()?;
            let scale = 10u128.pow(frac.len() as u32);
            let frac: u128 = frac.parse().ok()?;
            let part = frac.checked_mul(mult)? / scale;
            int.checked_mul(mult)?.checked_add(part)?
        }
    };
    u64::try_from(value).ok()
}

fn check_value(name: &str, value: &str, kind: Value) -> Result<(), String> {
    let number = || {
        parse_number(value)
            .ok_or_else(|| format!("`{value}` is not a number (e.g. 131072, 128K or 1M)"))
    };
    match kind {
        Value::Words(words) => {
            if words.contains(&value) {
                Ok(())
            } else {
                Err(format!(
                    "`{value}` is not a value of `{name}`: use one of {}",
                    words.join(", ")
                ))
            }
        }
        Value::Ashift => match value.parse::<u32>() {
            Ok(0 | 9..=16) => Ok(()),
            _ => Err(format!(
                "ashift `{value}` is out of range: use 9 to 16 (a sector of 2^ashift bytes; 12 \
                 for 4 KiB), or 0 to let ZFS detect it"
            )),
        },
        Value::BlockSize { zero } => {
            let n = number()?;
            let ok = (zero && n == 0) || (n.is_power_of_two() && (512..=1 << 20).contains(&n));
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "`{name}` must be {}a power of two from 512 to 1M, not `{value}`",
                    if zero { "0 or " } else { "" }
                ))
            }
        }
        Value::SizeOrNone | Value::CountOrNone if value == "none" => Ok(()),
        Value::SizeOrNone => number().map(drop),
        Value::CountOrNone | Value::Number => value
            .parse::<u64>()
            .map(drop)
            .map_err(|_| format!("`{value}` is not a whole number")),
        Value::Mountpoint => {
            if value == "legacy" || value == "none" {
                return Ok(());
            }
            if !value.starts_with('/') {
                return Err(format!(
                    "mountpoint `{value}` is not an absolute path, `legacy` or `none`"
                ));
            }
            match value.split('/').find(|c| c.len() >= MAX_NAME_LEN) {
                Some(c) => Err(format!(
                    "mountpoint component `{c}` is longer than ZFS allows (255)"
                )),
                None => Ok(()),
            }
        }
        Value::KeyLocation => {
            let ok = value == "none"
                || value == "prompt"
                || ["file:///", "https://", "http://"]
                    .iter()
                    .any(|p| value.len() > p.len() && value.starts_with(p));
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "keylocation `{value}` is not `prompt`, `file:///…`, `https://…` or `none`"
                ))
            }
        }
        Value::Text => Ok(()),
        Value::Comment => {
            if value.len() > 32 || !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                Err(format!(
                    "comment `{value}` must be at most 32 printable ASCII characters"
                ))
            } else {
                Ok(())
            }
        }
        Value::CacheFile => {
            if value == "none" || (value.starts_with('/') && value.len() > 1) {
                Ok(())
            } else {
                Err(format!(
                    "cachefile `{value}` is not `none` or an absolute path"
                ))
            }
        }
        Value::Compatibility => {
            if value == "off" || value == "legacy" {
                Ok(())
            } else {
                Err(format!(
                    "compatibility `{value}`: use `off` or `legacy`; the image carries no \
                     compatibility.d files to name"
                ))
            }
        }
        Value::PoolVersion => match value.parse::<u32>() {
            Ok(1..=28 | 5000) => Ok(()),
            _ => Err(format!(
                "pool version `{value}` is not 1 to 28 or 5000 (feature flags)"
            )),
        },
        Value::Installer(why) => Err(format!("`{name}` cannot be set in the profile: {why}")),
    }
}

/// Whether `name` is a user property (`zfs_prop_user` in `zfs_prop.c`):
/// lowercase letters, digits, `-_.:` with at least one `:`.
fn is_user_property(name: &str) -> bool {
    name.contains(':')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.:".contains(&b))
}

/// Checks one pool property (`zpool create -o NAME=VALUE`), `feature@…`
/// included. Err: why ZFS or the install would refuse it.
pub fn check_pool_property(name: &str, value: &str) -> Result<(), String> {
    if let Some(feature) = name.strip_prefix("feature@") {
        if !FEATURES.contains(&feature) {
            return Err(format!(
                "`{feature}` is not a pool feature of OpenZFS 2.1 (zfeature_common.c)"
            ));
        }
        return match value {
            "enabled" | "disabled" => Ok(()),
            _ => Err(format!(
                "a feature is `enabled` or `disabled` at pool creation, not `{value}`"
            )),
        };
    }
    match POOL.iter().find(|(n, _)| *n == name) {
        Some((_, kind)) => check_value(name, value, *kind),
        None => Err(format!("`{name}` is not a ZFS pool property")),
    }
}

/// Checks one dataset property (`zfs create -o` / `zpool create -O`). User
/// properties (with a `:`) take any value. Err: why ZFS would refuse it.
pub fn check_dataset_property(name: &str, value: &str) -> Result<(), String> {
    if is_user_property(name) {
        return Ok(());
    }
    match DATASET.iter().find(|(n, _)| *n == name) {
        Some((_, kind)) => check_value(name, value, *kind),
        None => Err(format!("`{name}` is not a ZFS dataset property")),
    }
}

/// The encryption properties of one dataset's options taken together. Err:
/// the property at fault and why.
///
/// ZFS's rules (`dsl_crypt.c`, `dmu_objset_create_crypt_check`, and
/// `zfs_prop_valid_keylocation`): with `encryption` other than `off` a
/// `keyformat` (`raw`, `hex`, `passphrase`) is needed, and `keylocation`
/// (default `prompt`); without encryption neither may be given. Then
/// nodeflash's own: no key location can be served on the node today.
/// `prompt` needs a person at the console of an unattended install; a
/// `file:///` key would have to be on the stick and travel with the machine,
/// and the image carries none; the image's `zfs` has no HTTP client for an
/// `https://` key. So an encrypted dataset is refused, saying why.
pub fn check_encryption(options: &BTreeMap<String, String>) -> Result<(), (String, String)> {
    let get = |k: &str| options.get(k).map(String::as_str);
    let encrypted = get("encryption").is_some_and(|e| e != "off");
    if !encrypted {
        for k in ["keyformat", "keylocation", "pbkdf2iters"] {
            if get(k).is_some_and(|v| v != "none") {
                return Err((
                    k.into(),
                    format!("`{k}` goes with `encryption`, which this dataset does not set"),
                ));
            }
        }
        return Ok(());
    }
    match get("keyformat") {
        None | Some("none") => {
            return Err((
                "encryption".into(),
                "`encryption` needs `keyformat` (raw, hex or passphrase) and `keylocation`".into(),
            ))
        }
        Some(f) if f != "passphrase" && get("pbkdf2iters").is_some() => {
            return Err((
                "pbkdf2iters".into(),
                format!("`pbkdf2iters` goes with keyformat `passphrase`, not `{f}`"),
            ))
        }
        Some(_) => {}
    }
    let location = get("keylocation").unwrap_or("prompt");
    let why = match location {
        "none" => "with `encryption`, `keylocation` cannot be `none`",
        "prompt" => {
            "`keylocation = \"prompt\"` asks for the key at the console, and an unattended \
             install has nobody to answer: nodeflash cannot install encrypted datasets yet \
             (see docs/profile.md, Encryption)"
        }
        l if l.starts_with("file://") => {
            "a key file would have to be in the install image, on a stick that travels with \
             the machine, and nodeflash puts none there: it cannot install encrypted datasets \
             yet (see docs/profile.md, Encryption)"
        }
        _ => {
            "the image's `zfs` cannot fetch a key over the network (it carries no HTTP client \
             library): nodeflash cannot install encrypted datasets yet (see docs/profile.md, \
             Encryption)"
        }
    };
    Err(("keylocation".into(), why.into()))
}

/// The pool feature a dataset property value needs, as
/// `zfs_check_settable` (`module/zfs/zfs_ioctl.c`) asks for it: `lz4` and
/// `zstd*` compression, records above 128 KiB, dnodes other than `legacy`,
/// and the sha512, skein and edonr checksums.
fn feature_needed(name: &str, value: &str) -> Option<&'static str> {
    match name {
        "compression" if value == "lz4" => Some("lz4_compress"),
        "compression" if value.starts_with("zstd") => Some("zstd_compress"),
        "recordsize" => parse_number(value)
            .is_some_and(|n| n > 128 << 10)
            .then_some("large_blocks"),
        "dnodesize" if value != "legacy" => Some("large_dnode"),
        "checksum" | "dedup" => ["sha512", "skein", "edonr"]
            .into_iter()
            .find(|c| value.split(',').next() == Some(*c)),
        _ => None,
    }
}

/// Dataset properties that need a pool feature the pool options turn off
/// (`feature@NAME = "disabled"`, a `version` below 5000, or
/// `compatibility = "legacy"`, which enable no feature at all): `zfs
/// create` would refuse them with ENOTSUP after the disk was partitioned.
/// `datasets` are (key prefix, options). Err: the key at fault and why.
pub fn check_features<'a>(
    pool: &BTreeMap<String, String>,
    datasets: impl IntoIterator<Item = (String, &'a BTreeMap<String, String>)>,
) -> Result<(), (String, String)> {
    let why_off = |feature: &str| -> Option<String> {
        if pool.get(&format!("feature@{feature}")).map(String::as_str) == Some("disabled") {
            Some(format!("`feature@{feature} = \"disabled\"` turns it off"))
        } else if let Some(v) = pool.get("version").filter(|v| *v != "5000") {
            Some(format!(
                "pool `version = \"{v}\"` has no features (they need 5000)"
            ))
        } else if pool.get("compatibility").map(String::as_str) == Some("legacy") {
            Some("`compatibility = \"legacy\"` enables no features".into())
        } else {
            None
        }
    };
    for (key, options) in datasets {
        for (name, value) in options {
            if let Some(feature) = feature_needed(name, value) {
                if let Some(why) = why_off(feature) {
                    return Err((
                        format!("{key}.{name}"),
                        format!(
                            "`{name} = \"{value}\"` needs the pool feature {feature}, and \
                             [pool] options: {why}"
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Checks a pool name as `zpool create` does: `pool_namecheck`
/// (`zfs_namecheck.c`: letters, digits, `-_.:` and space; a letter first;
/// shorter than 240; not `mirror`, `raidz` or `draid`) and libzfs's
/// `zpool_name_valid` (no name beginning with `mirror`, `raidz`, `draid` or
/// `spare`, and not `log`). A name starting `c` and a digit is allowed by
/// 2.1.11 (the disk-like rule of older releases is gone from `pool_namecheck`).
pub fn check_pool_name(name: &str) -> Result<(), String> {
    // ZFS_MAX_DATASET_NAME_LEN - 2 - 2 * strlen("$ORIGIN")
    if name.len() >= MAX_NAME_LEN - 2 - 2 * "$ORIGIN".len() {
        return Err(format!(
            "pool name `{name}` is too long (at most 239 characters)"
        ));
    }
    if let Some(c) = name.chars().find(|&c| !valid_char(c)) {
        return Err(format!(
            "invalid character `{c}` in pool name `{name}`: use letters, digits, `-`, `_`, `.`, `:`"
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(format!("pool name `{name}` must begin with a letter"));
    }
    let reserved = ["mirror", "raidz", "draid", "spare"]
        .iter()
        .find(|p| name.starts_with(**p))
        .map(|p| format!("names beginning with `{p}`"))
        .or_else(|| (name == "log").then(|| "`log`".to_string()));
    if let Some(what) = reserved {
        return Err(format!(
            "pool name `{name}` is reserved: `zpool create` refuses {what}, which name vdev types"
        ));
    }
    Ok(())
}

/// Checks a dataset name below the pool (`local/nix`) as `zfs create` does
/// (`entity_namecheck` and `dataset_nestcheck` in `zfs_namecheck.c`):
/// components of letters, digits, `-_.:` and space, none empty, `.` or
/// `..`; no `@`, `#` or `%` (snapshots, bookmarks, temporary clones); fewer
/// than 50 levels. The full name's length is checked with the pool's name in
/// [`check_full_dataset_name`].
pub fn check_dataset_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty dataset name".into());
    }
    if name.starts_with('/') || name.ends_with('/') {
        return Err(format!(
            "dataset name `{name}` begins or ends with `/`: give it below the pool, e.g. `local/nix`"
        ));
    }
    for component in name.split('/') {
        if component.is_empty() {
            return Err(format!(
                "dataset name `{name}` has an empty component (`//`)"
            ));
        }
        if component == "." || component == ".." {
            return Err(format!(
                "dataset name `{name}` has a `{component}` component"
            ));
        }
        if let Some(c) = component.chars().find(|&c| !valid_char(c)) {
            return Err(format!(
                "invalid character `{c}` in dataset name `{name}`: use letters, digits, `-`, `_`, `.`, `:`"
            ));
        }
    }
    if name.matches('/').count() + 1 >= MAX_NESTING {
        return Err(format!(
            "dataset name `{name}` is nested too deep (ZFS allows fewer than {MAX_NESTING} levels)"
        ));
    }
    if name.len() >= MAX_NAME_LEN {
        return Err(format!("dataset name `{name}` is too long"));
    }
    Ok(())
}

/// The full name `pool/name` must be shorter than 256 bytes
/// (`ZFS_MAX_DATASET_NAME_LEN`).
pub fn check_full_dataset_name(pool: &str, name: &str) -> Result<(), String> {
    if pool.len() + 1 + name.len() >= MAX_NAME_LEN {
        return Err(format!(
            "`{pool}/{name}` is too long: ZFS names are shorter than {MAX_NAME_LEN} bytes"
        ));
    }
    Ok(())
}

/// `valid_char` of `zfs_namecheck.c`.
fn valid_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | ' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_as_zfs_reads_them() {
        assert_eq!(parse_number("131072"), Some(131072));
        assert_eq!(parse_number("128K"), Some(128 << 10));
        assert_eq!(parse_number("128k"), Some(128 << 10));
        assert_eq!(parse_number("1M"), Some(1 << 20));
        assert_eq!(parse_number("1MiB"), Some(1 << 20));
        assert_eq!(parse_number("1mb"), Some(1 << 20));
        assert_eq!(parse_number("1.5G"), Some(3 << 29));
        assert_eq!(parse_number("16E"), None, "more than 2^64");
        // Found by reading for the fuzzer: no overflow panic on long fractions.
        assert_eq!(parse_number("1.999999999999999999Z"), None);
        for bad in ["", "K", "1X", "1KK", "1.5", ".5K", "-1", "1 K"] {
            assert_eq!(parse_number(bad), None, "{bad}");
        }
    }

    #[test]
    fn values_from_the_property_tables() {
        for (name, value) in [
            ("compression", "zstd"),
            ("compression", "zstd-fast-1000"),
            ("compression", "gzip-9"),
            ("checksum", "sha512"),
            ("atime", "off"),
            ("canmount", "noauto"),
            ("xattr", "sa"),
            ("acltype", "posixacl"),
            ("dnodesize", "auto"),
            ("normalization", "formD"),
            ("recordsize", "1M"),
            ("recordsize", "512"),
            ("special_small_blocks", "0"),
            ("quota", "none"),
            ("quota", "10G"),
            ("mountpoint", "/srv/x"),
            ("com.example:tag", "anything"),
        ] {
            check_dataset_property(name, value).unwrap_or_else(|e| panic!("{name}={value}: {e}"));
        }
        for (name, value, want) in [
            ("compression", "zstd-20", "not a value of `compression`"),
            ("compression", "ZSTD", "not a value"),
            ("checksum", "md5", "not a value"),
            ("atime", "yes", "use one of on, off"),
            ("canmount", "auto", "not a value"),
            ("xattr", "on2", "not a value"),
            ("acltype", "posix1e", "not a value"),
            ("dnodesize", "32k", "not a value"),
            ("recordsize", "3K", "power of two"),
            ("recordsize", "2M", "power of two from 512 to 1M"),
            ("recordsize", "256", "power of two"),
            ("special_small_blocks", "100", "0 or a power of two"),
            ("quota", "lots", "not a number"),
            ("copies", "4", "not a value"),
            ("mountpoint", "srv", "not an absolute path"),
            ("keylocation", "ftp://x", "not `prompt`"),
            ("compresion", "zstd", "not a ZFS dataset property"),
            ("Com.Example:tag", "x", "not a ZFS dataset property"),
        ] {
            let e = check_dataset_property(name, value).expect_err(name);
            assert!(e.contains(want), "{name}={value}: {e}");
        }
        for (name, value) in [
            ("ashift", "12"),
            ("ashift", "0"),
            ("ashift", "9"),
            ("ashift", "16"),
            ("autotrim", "on"),
            ("failmode", "continue"),
            ("feature@zstd_compress", "enabled"),
            ("version", "28"),
            ("cachefile", "none"),
            ("compatibility", "legacy"),
        ] {
            check_pool_property(name, value).unwrap_or_else(|e| panic!("{name}={value}: {e}"));
        }
        for (name, value, want) in [
            ("ashift", "99", "out of range"),
            ("ashift", "8", "out of range"),
            ("ashift", "17", "out of range"),
            ("ashift", "4k", "out of range"),
            ("autotrim", "yes", "use one of on, off"),
            ("feature@zstd", "enabled", "not a pool feature"),
            ("feature@large_blocks", "active", "`enabled` or `disabled`"),
            ("version", "29", "not 1 to 28 or 5000"),
            ("altroot", "/a", "-R /mnt"),
            ("bootfs", "rpool/root", "sets bootfs"),
            ("readonly", "on", "read-only pool"),
            ("compatibility", "openzfs-2.0-linux", "no compatibility.d"),
            ("comment", "a comment that is far too long for zfs", "32"),
            ("size", "1G", "not a ZFS pool property"),
        ] {
            let e = check_pool_property(name, value).expect_err(name);
            assert!(e.contains(want), "{name}={value}: {e}");
        }
    }

    #[test]
    fn encryption_needs_its_keys_and_is_refused_with_the_reason() {
        let opts = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(check_encryption(&opts(&[("compression", "zstd")])).is_ok());
        assert!(check_encryption(&opts(&[("encryption", "off"), ("keylocation", "none")])).is_ok());
        let e = check_encryption(&opts(&[("encryption", "aes-256-gcm")])).expect_err("no keys");
        assert_eq!(e.0, "encryption");
        assert!(e.1.contains("needs `keyformat`"), "{}", e.1);
        let e = check_encryption(&opts(&[("keyformat", "hex")])).expect_err("no encryption");
        assert_eq!(e.0, "keyformat");
        // The example.
        let e = check_encryption(&opts(&[
            ("encryption", "aes-256-gcm"),
            ("keyformat", "passphrase"),
            ("keylocation", "prompt"),
        ]))
        .expect_err("prompt");
        assert_eq!(e.0, "keylocation");
        assert!(e.1.contains("unattended install"), "{}", e.1);
        for l in ["file:///etc/key", "https://keys.example/k"] {
            let e = check_encryption(&opts(&[
                ("encryption", "on"),
                ("keyformat", "raw"),
                ("keylocation", l),
            ]))
            .expect_err(l);
            assert!(e.1.contains("cannot install encrypted datasets"), "{}", e.1);
        }
    }

    #[test]
    fn values_that_need_a_feature_the_pool_turns_off() {
        let map = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let ds = map(&[("compression", "zstd"), ("recordsize", "1M")]);
        let check = |pool: &[(&str, &str)]| {
            check_features(&map(pool), [("pool.root-options".to_string(), &ds)])
        };
        assert!(check(&[]).is_ok());
        assert!(check(&[("feature@lz4_compress", "disabled")]).is_ok());
        let e = check(&[("feature@zstd_compress", "disabled")]).expect_err("zstd off");
        assert_eq!(e.0, "pool.root-options.compression");
        assert!(
            e.1.contains("needs the pool feature zstd_compress"),
            "{}",
            e.1
        );
        let e = check(&[("feature@large_blocks", "disabled")]).expect_err("large blocks off");
        assert_eq!(e.0, "pool.root-options.recordsize");
        assert!(check(&[("version", "28")]).is_err());
        assert!(check(&[("version", "5000")]).is_ok());
        assert!(check(&[("compatibility", "legacy")]).is_err());
        let sha = map(&[("checksum", "sha512"), ("dedup", "skein,verify")]);
        let e = check_features(
            &map(&[("feature@skein", "disabled")]),
            [("pool.datasets[0].options".to_string(), &sha)],
        )
        .expect_err("skein off");
        assert_eq!(e.0, "pool.datasets[0].options.dedup");
    }

    #[test]
    fn pool_names_as_zpool_create_checks_them() {
        for ok in [
            "rpool",
            "tank",
            "a",
            "Z9",
            "c0pool",
            "my pool",
            "a.b:c-d_e",
            "logs",
        ] {
            check_pool_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, want) in [
            ("mirror", "reserved"),
            ("mirror2", "reserved"),
            ("raidz", "reserved"),
            ("raidz1pool", "reserved"),
            ("draid", "reserved"),
            ("spare", "reserved"),
            ("spares", "reserved"),
            ("log", "reserved"),
            ("1pool", "begin with a letter"),
            ("_pool", "begin with a letter"),
            ("", "begin with a letter"),
            ("rpool/x", "invalid character `/`"),
            ("rp@ol", "invalid character `@`"),
            ("rpööl", "invalid character"),
        ] {
            let e = check_pool_name(bad).expect_err(bad);
            assert!(e.contains(want), "{bad}: {e}");
        }
        assert!(check_pool_name(&"p".repeat(240)).is_err());
        assert!(check_pool_name(&"p".repeat(239)).is_ok());
    }

    #[test]
    fn dataset_names_as_zfs_create_checks_them() {
        for ok in ["local", "local/nix", "ROOT/nixos", "a b", "x.y:z-1_2"] {
            check_dataset_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, want) in [
            ("", "empty"),
            ("/local", "begins or ends"),
            ("local/", "begins or ends"),
            ("a//b", "empty component"),
            ("a/./b", "`.` component"),
            ("..", "`..` component"),
            ("a@snap", "invalid character `@`"),
            ("a#mark", "invalid character `#`"),
            ("a%tmp", "invalid character `%`"),
        ] {
            let e = check_dataset_name(bad).expect_err(bad);
            assert!(e.contains(want), "{bad}: {e}");
        }
        // `rpool/` and 50 levels: 50 slashes, one too many.
        assert!(check_dataset_name(&vec!["d"; 50].join("/")).is_err());
        assert!(check_dataset_name(&vec!["d"; 49].join("/")).is_ok());
        assert!(check_full_dataset_name("rpool", &"n".repeat(250)).is_err());
        assert!(check_full_dataset_name("rpool", &"n".repeat(249)).is_ok());
    }
}
