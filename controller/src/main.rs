//! The `kiwi-controller` binary: the command line is
//! [`kiwi_controller::cli`].

fn main() -> std::process::ExitCode {
    kiwi_controller::cli::main()
}
