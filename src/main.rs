//! The `intake` binary: everything lives in the library; see `intake --help`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    intake::cli::main_exit()
}
