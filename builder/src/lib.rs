//! The nodeflash image builder.

pub mod efi;
pub mod elf;
pub mod initramfs;
pub mod kmod;
