use clap::Parser;

fn main() {
    let cli = fcgpu::cli::Cli::parse();
    if let Err(e) = fcgpu::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
