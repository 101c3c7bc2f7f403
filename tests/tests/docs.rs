//! `umlctl completions SHELL` and `umlctl manpages DIR`: generated from the
//! real argument definitions, so they are checked against the binary itself.

mod common;

use std::fs;
use std::process::Command;

use common::*;

fn umlctl(args: &[&str]) -> std::process::Output {
    Command::new(umlctl_bin()).args(args).output().unwrap()
}

#[test]
fn bash_completion_completes_subcommands_and_options() {
    let script = assert_ok(&umlctl(&["completions", "bash"]), "completions bash");
    let dir = scratch();
    let f = dir.path().join("umlctl.bash");
    fs::write(&f, script).unwrap();
    // Drive the completion function as bash's completer would.
    let complete = |words: &str, cword: usize| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE='{words}'; COMP_POINT=${{#COMP_LINE}}; _umlctl umlctl \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                f.display()
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let subs = complete("umlctl ker", 1);
    assert_eq!(subs.trim(), "kernel", "{subs}");
    let opts = complete("umlctl run --over", 2);
    assert!(opts.lines().any(|l| l == "--overlay"), "{opts}");
    let image = complete("umlctl image build --dir", 3);
    assert!(image.lines().any(|l| l == "--dir-owner"), "{image}");
    // The hidden guest-side entry point is not offered.
    assert!(!complete("umlctl gu", 1).contains("guest-init"));
}

#[test]
fn every_shell_gets_a_script_and_unknown_shells_are_refused() {
    for (shell, marker) in [
        ("zsh", "#compdef umlctl"),
        ("fish", "complete -c umlctl"),
        ("elvish", "umlctl"),
        ("powershell", "umlctl"),
    ] {
        let text = assert_ok(&umlctl(&["completions", shell]), shell);
        assert!(text.contains(marker), "{shell}: no {marker:?}");
        assert!(
            text.contains("kernel") && text.contains("overlay"),
            "{shell} lacks subcommands/options"
        );
    }
    let o = umlctl(&["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(125), "usage errors exit 125");
    assert!(String::from_utf8_lossy(&o.stderr).contains("possible values: bash"));
}

#[test]
fn man_pages_cover_every_visible_command_and_render() {
    let dir = scratch();
    let out = dir.path().join("man");
    assert_ok(&umlctl(&["manpages", out.to_str().unwrap()]), "manpages");
    let mut pages: Vec<String> = fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    pages.sort();
    for p in [
        "umlctl.1",
        "umlctl-run.1",
        "umlctl-kernel-build.1",
        "umlctl-cow-merge.1",
        "umlctl-image-build.1",
        "umlctl-netd.1",
        "umlctl-net-ls.1",
        "umlctl-completions.1",
    ] {
        assert!(pages.contains(&p.to_string()), "{p} missing from {pages:?}");
    }
    assert!(
        !pages
            .iter()
            .any(|p| p.contains("guest-init") || p.contains("help")),
        "{pages:?}"
    );
    // Every subcommand named in `umlctl --help` has its page.
    let help = assert_ok(&umlctl(&["--help"]), "--help");
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("Options:")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() > 15, "{commands:?}");
    for c in commands {
        assert!(pages.contains(&format!("umlctl-{c}.1")), "no page for {c}");
    }
    // man renders one, with its full name and options.
    let page = out.join("umlctl-kernel-build.1");
    assert!(fs::read_to_string(&page)
        .unwrap()
        .contains(".TH umlctl-kernel-build 1 "));
    let rendered = Command::new("man")
        .arg("-l")
        .arg(&page)
        .env("MANWIDTH", "100")
        .env("MAN_KEEP_FORMATTING", "0")
        .output()
        .expect("man (man-db)");
    // Drop grotty's overstrike (bold is "X\bX") to get plain text.
    let mut text = String::new();
    for c in String::from_utf8_lossy(&rendered.stdout).chars() {
        if c == '\u{8}' {
            text.pop();
        } else {
            text.push(c);
        }
    }
    assert!(
        text.contains("umlctl-kernel-build") && text.contains("--source"),
        "{text}"
    );
    // A DIR that cannot be made is an error naming it.
    let o = umlctl(&["manpages", "/proc/no/such/dir"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/proc/no/such/dir"));
}
