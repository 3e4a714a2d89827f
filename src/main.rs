#![forbid(unsafe_code)]

fn main() {
    std::process::exit(cachevol::cli::main());
}
