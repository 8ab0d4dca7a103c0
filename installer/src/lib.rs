//! The nodeflash installer.
//!
//! Two layers, kept apart by the `pid1` feature (on by default):
//! - always built, what both sides of nodeflash share: the profile model
//!   ([`profile`]), the payload format ([`payload`]), what the builder tells
//!   the installer about the image ([`image`]), the machine facts
//!   ([`facts`]), the plan ([`plan`]) and the one command helper ([`cmd`]);
//! - with `pid1`, the program that is PID 1 of the install image
//!   ([`pid1::main`]), its network half ([`net`]'s DHCP and HTTPS client)
//!   and the install itself. Its modules are private, so the compiler finds
//!   what PID 1 no longer calls. The builder depends on this crate without
//!   the feature, which keeps rustls and the DHCP client out of it.

#[cfg(feature = "pid1")]
pub mod boot;
#[cfg(feature = "pid1")]
mod check;
pub mod cmd;
#[cfg(feature = "pid1")]
mod console;
pub mod datasets;
#[cfg(feature = "pid1")]
mod devices;
pub mod disk;
pub mod facts;
pub mod fat;
pub mod image;
#[cfg(feature = "pid1")]
mod install;
pub mod mount;
pub mod net;
pub mod nixos;
pub mod nodes;
pub mod payload;
#[cfg(feature = "pid1")]
pub mod pid1;
pub mod plan;
pub mod profile;
pub mod progress;
#[cfg(feature = "pid1")]
mod report;
pub mod secureboot;
#[doc(hidden)]
pub mod testing;
pub mod units;
pub mod wait;
pub mod zfs;
pub mod zprop;
