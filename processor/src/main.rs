//! The `processor` binary: everything lives in the library (`processor::cli`).

// glibc's malloc took about a quarter of the worker's CPU during a drain (each event's body, its
// parsed form, the rows and the statements' parameters); mimalloc, as ingress, takes less (see
// BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    processor::cli::main_with_args(std::env::args_os()).await
}
