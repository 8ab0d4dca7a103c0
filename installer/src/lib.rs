//! The nodeflash installer.
//!
//! As a library it holds what both sides of nodeflash share: the profile
//! model ([`profile`]), what the builder tells the installer about the image
//! ([`image`]), the machine facts ([`facts`]) and the one command helper
//! ([`cmd`]). As a program it is PID 1 of the install image ([`pid1`]).

pub mod boot;
pub mod check;
pub mod cmd;
pub mod console;
pub mod datasets;
pub mod disk;
pub mod facts;
pub mod fat;
pub mod image;
pub mod install;
pub mod net;
pub mod nixos;
pub mod nodes;
pub mod payload;
pub mod pid1;
pub mod plan;
pub mod profile;
pub mod progress;
pub mod report;
pub mod secureboot;
#[doc(hidden)]
pub mod testing;
pub mod units;
pub mod wait;
pub mod zfs;
pub mod zprop;
