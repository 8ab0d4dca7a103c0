//! `/init` of the install image.

fn main() {
    nodeflash_installer::pid1::main()
}
