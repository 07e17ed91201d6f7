use clap::Parser;

fn main() {
    // A closed stdout/stderr pipe (`fcgpu … | head`) ends the process quietly instead of
    // panicking inside println!/eprintln!; files already written stay complete (all atomic).
    fcgpu::runfs::default_sigpipe();
    let cli = fcgpu::cli::Cli::parse();
    if let Err(e) = fcgpu::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
