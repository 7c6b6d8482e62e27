//! The `weft` binary's own surface: help, completions, argument errors. (Being an integration
//! test of this package also makes `cargo test` build the binary the cross-process tests run.)

use std::process::Command;

fn weft(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_weft")).args(args).env_remove("WEFT_HOST").output().unwrap()
}

#[test]
fn help_lists_every_command() {
    let out = weft(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["agent", "members", "network", "dump", "table", "demo", "completions"] {
        assert!(text.contains(cmd), "--help lacks {cmd}:\n{text}");
    }
    let out = weft(&["network", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["create", "ls", "inspect", "rm", "attach", "detach"] {
        assert!(text.contains(cmd), "network --help lacks {cmd}");
    }
}

#[test]
fn completions_are_generated_for_common_shells() {
    for shell in ["bash", "zsh", "fish"] {
        let out = weft(&["completions", shell]);
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("weft"), "{shell}");
    }
    let out = weft(&["completions", "cmd.exe"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn an_unreachable_agent_is_one_line_saying_what_was_tried() {
    let out = weft(&["-H", "unix:///nonexistent/weft.sock", "dump"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("unix:///nonexistent/weft.sock") && err.contains("weft agent"), "{err}");
}
