//! `nodeflash`: builds install images on a build host.

fn main() -> std::process::ExitCode {
    nodeflash_builder::cli::main()
}
