//! The one mount guard: what a [`Mounts`] mounted is unmounted in reverse
//! order, by [`Mounts::unmount`] (which returns the first error) or, after
//! an error, when it is dropped (detached, errors ignored). The pattern of
//! coreos-installer's `blockdev.rs` `Mount` and bootc's `tempmount.rs`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use nix::mount::{MntFlags, MsFlags};

/// File systems mounted together, unmounted in reverse order.
#[derive(Debug, Default)]
pub struct Mounts {
    targets: Vec<PathBuf>,
    /// Whether [`Mounts::unmount`] detaches (`MNT_DETACH`, umount2(2)):
    /// needed for recursive bind mounts, whose submounts a plain unmount
    /// would leave busy.
    detach: bool,
}

impl Mounts {
    /// A guard whose [`Mounts::unmount`] detaches each mount with what is
    /// mounted below it (for a chroot's `/dev` and `/sys`).
    pub fn detaching() -> Self {
        Self {
            targets: Vec::new(),
            detach: true,
        }
    }

    /// Creates `target` (and its parents) and mounts `source` there
    /// (mount(2): `fstype` None for a bind mount; `data` the file system's
    /// options, such as ZFS's `zfsutil`).
    ///
    /// Errors: the directory cannot be created, or mount(2) fails; both name
    /// the source and the target.
    pub fn mount(
        &mut self,
        source: &str,
        target: impl Into<PathBuf>,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<()> {
        let target = target.into();
        std::fs::create_dir_all(&target)
            .with_context(|| format!("cannot create {}", target.display()))?;
        nix::mount::mount(Some(source), &target, fstype, flags, data)
            .with_context(|| format!("cannot mount {source} on {}", target.display()))?;
        self.targets.push(target);
        Ok(())
    }

    /// Mounts the ZFS dataset `dataset` on `target` whatever its
    /// `mountpoint` property says (`zfsutil`, as `zfs mount` does; the pool
    /// is imported with `-N`).
    ///
    /// Errors: as [`Mounts::mount`].
    pub fn zfs(&mut self, dataset: &str, target: impl Into<PathBuf>, flags: MsFlags) -> Result<()> {
        self.mount(dataset, target, Some("zfs"), flags, Some("zfsutil"))
    }

    /// Where the guard's mounts are, in the order they were made.
    pub fn targets(&self) -> &[PathBuf] {
        &self.targets
    }

    /// Unmounts everything in reverse order, each even when another failed.
    ///
    /// Errors: the first unmount that failed, naming its target.
    pub fn unmount(mut self) -> Result<()> {
        let flags = if self.detach {
            MntFlags::MNT_DETACH
        } else {
            MntFlags::empty()
        };
        let mut result = Ok(());
        while let Some(target) = self.targets.pop() {
            if let Err(e) = nix::mount::umount2(&target, flags) {
                if result.is_ok() {
                    result = Err(anyhow::anyhow!("cannot unmount {}: {e}", target.display()));
                }
            }
        }
        result
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for target in self.targets.drain(..).rev() {
            let _ = nix::mount::umount2(&target, MntFlags::MNT_DETACH);
        }
    }
}
