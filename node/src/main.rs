//! `weft`: the agent and its command line.

use clap::Parser;

fn main() {
    let cli = match weft_node::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // One line: what is wrong, without the usage block.
            let text = e.render().to_string();
            let msg: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| {
                    !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
                })
                .collect();
            let msg = msg.join(" ");
            eprintln!("weft: {} (see weft --help)", msg.trim_start_matches("error: "));
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(weft_node::cli::run(cli));
    // Do not wait for stray blocking work (a DNS lookup) on the way out.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    if let Err(e) = result {
        // One line: the error and its causes.
        let mut msg = e.to_string();
        for cause in e.chain().skip(1) {
            let c = cause.to_string();
            if !msg.contains(&c) {
                msg.push_str(": ");
                msg.push_str(&c);
            }
        }
        eprintln!("weft: {}", msg.replace('\n', " "));
        std::process::exit(1);
    }
}
