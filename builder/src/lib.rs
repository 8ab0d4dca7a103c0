//! The nodeflash image builder: fetches and caches the inputs, writes the
//! initramfs, the EFI system partition image and the hybrid ISO.

pub mod archive;
pub mod build;
pub mod cache;
pub mod cli;
pub mod debian;
pub mod efi;
pub mod elf;
pub mod flash;
pub mod initramfs;
pub mod inputs;
pub mod iso;
pub mod kmod;
pub mod nix;
pub mod payload;
pub mod serve;
pub mod steps;
pub mod synthetic;
pub mod tools;
pub mod vm;
