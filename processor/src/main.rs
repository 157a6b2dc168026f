//! The `processor` binary: everything lives in the library (`processor::cli`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    processor::cli::main_with_args(std::env::args_os()).await
}
