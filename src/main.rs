fn main() {
    std::process::exit(cachevol::cli::main());
}
