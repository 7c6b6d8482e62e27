//! `weft`: the agent and its command line.

use clap::Parser;

fn main() {
    let cli = weft_node::cli::Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(weft_node::cli::run(cli)) {
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
