//! The `ge-orchestrator` binary: everything it does lives in [`ge_orchestrator::cli`].

fn main() -> std::process::ExitCode {
    ge_orchestrator::cli::main()
}
