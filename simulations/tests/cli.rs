//! The `weft-sim` binary's own surface: bad arguments are one line and exit 2 before anything
//! runs; a run's JSON carries the documented fields; CSV and SVG files are written.

use std::process::{Command, Output};

fn sim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weft-sim")).args(args).output().unwrap()
}

fn one_line_error(out: &Output, needle: &str) {
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(needle), "{err}");
    assert!(out.stdout.is_empty(), "nothing ran");
}

#[test]
fn bad_arguments_name_the_problem() {
    one_line_error(&sim(&["convergence", "--nodes", "1"]), "--nodes");
    one_line_error(&sim(&["convergence", "--loss", "1.5"]), "--loss");
    one_line_error(&sim(&["convergence", "--plot", "/no/such/dir/x.svg"]), "/no/such/dir");
    one_line_error(&sim(&["networkdb-matrix", "--only", "nope"]), "unknown perturbation \"nope\"");
    one_line_error(&sim(&["networkdb-matrix", "--churn-sizes", "2"]), "--churn-sizes");
    one_line_error(&sim(&["scale", "--nodes", "10", "--join-over-s", "60"]), "--join-over-s");
    one_line_error(&sim(&["soak", "--networks", "0"]), "--networks");
    one_line_error(&sim(&["soak", "--duration", "0"]), "--duration-s");
    // Clap's own errors, one line too.
    one_line_error(&sim(&["convergence", "--seeds", "0"]), "--seeds");
    one_line_error(&sim(&["convergence", "--nodes", "ten"]), "--nodes");
    one_line_error(&sim(&["frobnicate"]), "frobnicate");
}

#[test]
fn a_run_prints_the_documented_json_and_writes_its_files() {
    let dir = std::env::temp_dir().join(format!("weft-sim-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (csv, svg) = (dir.join("c.csv"), dir.join("c.svg"));
    let out = sim(&[
        "convergence",
        "--nodes",
        "4,6",
        "--seeds",
        "2",
        "--json",
        "--csv",
        csv.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let objects: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(objects.len(), 2, "one object per size");
    for (o, n) in objects.iter().zip([4, 6]) {
        assert_eq!(o["nodes"], n);
        assert_eq!(o["seed"], 1);
        for field in ["p50_ms", "p90_ms", "p99_ms", "max_ms", "msgs_per_node_per_s", "bytes_per_node_per_s"] {
            assert!(o[field].as_f64().is_some_and(|v| v >= 0.0), "{field} in {o}");
        }
        assert!(o["p50_ms"].as_f64() <= o["max_ms"].as_f64());
    }
    let rows = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(rows.lines().count(), 1 + 4, "a header and one row per (size, seed)");
    let drawing = std::fs::read_to_string(&svg).unwrap();
    assert!(drawing.contains("<svg") && drawing.contains("4 nodes") && drawing.contains("6 nodes"));
    std::fs::remove_dir_all(&dir).unwrap();
}
