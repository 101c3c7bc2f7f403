//! A parser for KTAP (the Kernel Test Anything Protocol, version 1) and the
//! TAP 14 dialect older KUnit printed, as found in a kernel's console output:
//! nested suites (by indentation, with `KTAP version` or `# Subtest:`
//! headers), plans, `ok`/`not ok` results with `# SKIP` and other directives,
//! and what a crash leaves (open suites, missing planned tests, a panic).
//!
//! Lines that are not KTAP (kernel messages, `init_suite`, …) are kept as the
//! log of the test they appear in and never change a result.

use serde::Serialize;

/// How one test ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Passed,
    Failed,
    Skipped,
    /// No result line: the output stopped (crash, hang) inside it.
    Crashed,
}

/// One test (a suite when it has subtests).
#[derive(Debug, Clone, Serialize)]
pub struct Test {
    pub name: String,
    pub status: Status,
    /// The directive's text after `SKIP`, `TIMEOUT`, … (or other diagnostic data).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The plan (`1..N`) its subtests announced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subtests: Vec<Test>,
    /// Diagnostic and other lines printed inside it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<String>,
}

/// Counts over leaf tests (test cases and parameter cases), as kunit.py counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub passed: u32,
    pub failed: u32,
    pub skipped: u32,
    /// Crashed, or announced by their suite's plan but never reported.
    pub crashed: u32,
}

impl Counts {
    pub fn total(&self) -> u32 {
        self.passed
            .saturating_add(self.failed)
            .saturating_add(self.skipped)
            .saturating_add(self.crashed)
    }
}

/// Everything read from one console output.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// A KTAP or TAP version line was found.
    pub found: bool,
    /// The top-level plan.
    pub plan: Option<u32>,
    /// Top-level tests (KUnit: suites).
    pub tests: Vec<Test>,
    pub counts: Counts,
    /// The output ended before every announced test reported.
    pub incomplete: bool,
    /// The first kernel crash line seen while tests were still running.
    pub crash: Option<String>,
}

impl Report {
    /// Tests crashed or the output stopped early.
    pub fn crashed(&self) -> bool {
        self.incomplete || self.crash.is_some() || self.counts.crashed > 0
    }
    /// Nothing crashed or failed, and at least one test passed (all
    /// skipped is not a pass, as kunit.py has it).
    pub fn passed(&self) -> bool {
        !self.crashed() && self.counts.failed == 0 && self.counts.passed > 0
    }
}

struct Frame {
    indent: usize,
    name: Option<String>,
    plan: Option<u32>,
    tests: Vec<Test>,
    log: Vec<String>,
}

impl Frame {
    fn new(indent: usize, name: Option<String>) -> Self {
        Frame {
            indent,
            name,
            plan: None,
            tests: Vec::new(),
            log: Vec::new(),
        }
    }

    /// A frame closed without a result line of its own.
    fn into_crashed(self) -> Test {
        Test {
            name: self.name.unwrap_or_else(|| "(unnamed)".into()),
            status: Status::Crashed,
            reason: Some("no result: the output stopped inside this test".into()),
            plan: self.plan,
            subtests: self.tests,
            log: self.log,
        }
    }
}

fn indent_of(line: &str) -> (usize, &str) {
    let mut n = 0;
    for (i, c) in line.char_indices() {
        match c {
            ' ' => n += 1,
            '\t' => n += 8,
            _ => return (n, &line[i..]),
        }
    }
    (n, "")
}

fn is_version(c: &str) -> bool {
    c.starts_with("KTAP version ") || c.starts_with("TAP version ")
}

fn parse_plan(c: &str) -> Option<u32> {
    let n = c.strip_prefix("1..")?;
    let n = n.split_whitespace().next()?;
    n.parse().ok()
}

/// `ok 3 - name # SKIP why` → (passed?, name, directive, reason).
fn parse_result(c: &str) -> Option<(bool, String, Option<String>, Option<String>)> {
    let (ok, rest) = if let Some(r) = c.strip_prefix("not ok ") {
        (false, r)
    } else if let Some(r) = c.strip_prefix("ok ") {
        (true, r)
    } else {
        return None;
    };
    let num_len = rest.bytes().take_while(u8::is_ascii_digit).count();
    if num_len == 0 {
        return None;
    }
    let rest = &rest[num_len..];
    let (desc, directive) = match rest.split_once('#') {
        Some((d, dir)) => (d, Some(dir.trim())),
        None => (rest, None),
    };
    let desc = desc.trim();
    let name = bounded(desc.strip_prefix("- ").unwrap_or(desc).trim());
    let (kind, reason) = match directive {
        Some(d) => {
            let (word, more) = d.split_once(char::is_whitespace).unwrap_or((d, ""));
            let more = (!more.trim().is_empty()).then(|| bounded(more.trim()));
            let upper = word.to_ascii_uppercase();
            if ["SKIP", "TODO", "XFAIL", "TIMEOUT", "ERROR"].contains(&upper.as_str()) {
                (Some(upper), more)
            } else {
                (None, (!d.is_empty()).then(|| bounded(d)))
            }
        }
        None => (None, None),
    };
    Some((ok, name, kind, reason))
}

const CRASH_MARKS: &[&str] = &[
    "Kernel panic",
    "BUG: ",
    "Oops: ",
    "general protection fault",
    "Segfault with no mm",
    "Kernel mode fault",
    "Kernel mode signal",
];

/// Nesting deeper than this is kept as log lines: KUnit nests three levels
/// (suite, case, parameter), and a hostile output must not make reports
/// whose paths grow with the square of the nesting.
const MAX_DEPTH: usize = 16;

/// Names and directive texts are cut to this many bytes.
const MAX_NAME: usize = 256;

fn bounded(s: &str) -> String {
    if s.len() <= MAX_NAME {
        return s.to_string();
    }
    let mut end = MAX_NAME;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn count(tests: &[Test], c: &mut Counts) {
    for t in tests {
        if let Some(p) = t.plan {
            let missing = p.saturating_sub(u32::try_from(t.subtests.len()).unwrap_or(u32::MAX));
            c.crashed = c.crashed.saturating_add(missing);
        }
        if t.subtests.is_empty() {
            let n = match t.status {
                Status::Passed => &mut c.passed,
                Status::Failed => &mut c.failed,
                Status::Skipped => &mut c.skipped,
                Status::Crashed => &mut c.crashed,
            };
            *n = n.saturating_add(1);
        } else {
            count(&t.subtests, c);
        }
    }
}

/// Parse a console output.
pub fn parse(output: &str) -> Report {
    let lines: Vec<&str> = output.lines().collect();
    let Some((start, prefix_len)) = lines.iter().enumerate().find_map(|(i, l)| {
        let pos = l.find("KTAP version ").or_else(|| l.find("TAP version "))?;
        Some((i, pos))
    }) else {
        return Report {
            found: false,
            plan: None,
            tests: vec![],
            counts: Counts::default(),
            incomplete: false,
            crash: lines
                .iter()
                .find(|l| CRASH_MARKS.iter().any(|m| l.contains(m)))
                .map(|l| l.trim().to_string()),
        };
    };
    let first = &lines[start][prefix_len..];
    let (root_indent, _) = indent_of(first);
    let mut stack = vec![Frame::new(root_indent, None)];
    let mut crash = None;
    for raw in &lines[start + 1..] {
        // The prefix (a timestamp, say) has the first line's width.
        let line = if raw.len() >= prefix_len && raw.is_char_boundary(prefix_len) {
            &raw[prefix_len..]
        } else {
            raw.trim_start()
        };
        let (ind, c) = indent_of(line);
        let c = c.trim_end();
        let top_indent = stack.last().map_or(0, |f| f.indent);
        if is_version(c) {
            let fresh = stack.last().is_some_and(|f| {
                f.indent == ind && f.tests.is_empty() && f.plan.is_none() && stack.len() > 1
            });
            if ind > top_indent {
                if stack.len() < MAX_DEPTH {
                    stack.push(Frame::new(ind, None));
                } else {
                    push_log(&mut stack, c);
                }
            } else if !fresh {
                push_log(&mut stack, c);
            }
            continue;
        }
        if let Some(name) = c.strip_prefix("# Subtest:") {
            let name = bounded(name.trim());
            let nested = stack.len() > 1;
            let room = stack.len() < MAX_DEPTH;
            match stack.last_mut() {
                Some(f) if nested && ind == f.indent && f.name.is_none() && f.tests.is_empty() => {
                    f.name = Some(name)
                }
                _ if ind > top_indent && room => stack.push(Frame::new(ind, Some(name))),
                _ => push_log(&mut stack, c),
            }
            continue;
        }
        if let Some(n) = parse_plan(c) {
            if ind > top_indent && stack.len() < MAX_DEPTH {
                stack.push(Frame::new(ind, None));
            }
            if let Some(f) = stack.last_mut() {
                if f.plan.is_none() && f.indent == ind {
                    f.plan = Some(n);
                    continue;
                }
            }
            push_log(&mut stack, c);
            continue;
        }
        if let Some((ok, name, directive, reason)) = parse_result(c) {
            if ind > top_indent && stack.len() < MAX_DEPTH {
                // Results deeper than any header: an implicit nested level.
                stack.push(Frame::new(ind, None));
            }
            let mut closed: Option<Frame> = None;
            while stack.len() > 1 && stack.last().is_some_and(|f| ind < f.indent) {
                let Some(mut f) = stack.pop() else { break };
                if let Some(inner) = closed.take() {
                    f.tests.push(inner.into_crashed());
                }
                closed = Some(f);
            }
            let status = match (directive.as_deref(), ok) {
                (Some("SKIP"), _) => Status::Skipped,
                (_, true) => Status::Passed,
                (_, false) => Status::Failed,
            };
            let mut t = Test {
                name,
                status,
                reason,
                plan: None,
                subtests: vec![],
                log: vec![],
            };
            if let Some(f) = closed {
                t.plan = f.plan;
                t.subtests = f.tests;
                t.log = f.log;
                if t.name.is_empty() {
                    t.name = f.name.unwrap_or_default();
                }
            }
            if let Some(f) = stack.last_mut() {
                f.tests.push(t);
            }
            continue;
        }
        if crash.is_none() && CRASH_MARKS.iter().any(|m| c.contains(m)) {
            // Between suites, with the top-level plan (if any) not yet met,
            // or inside one: a crash of the tests, not after them.
            let done = stack.len() == 1
                && !stack[0]
                    .plan
                    .is_some_and(|p| crate::num::small_u32(stack[0].tests.len()) < p);
            if !done {
                crash = Some(c.trim().to_string());
            }
        }
        push_log(&mut stack, c);
    }
    // Whatever is still open stopped without a result.
    let mut incomplete = stack.len() > 1;
    while stack.len() > 1 {
        let Some(f) = stack.pop() else { break };
        if let Some(parent) = stack.last_mut() {
            parent.tests.push(f.into_crashed());
        }
    }
    let root = stack.pop().unwrap_or_else(|| Frame::new(0, None));
    let mut counts = Counts::default();
    count(&root.tests, &mut counts);
    // Suites announced but never started are not counted (their cases are
    // unknown), but the run is incomplete.
    incomplete |= root
        .plan
        .is_some_and(|p| crate::num::small_u32(root.tests.len()) < p);
    Report {
        found: true,
        plan: root.plan,
        tests: root.tests,
        counts,
        incomplete,
        crash,
    }
}

fn push_log(stack: &mut [Frame], c: &str) {
    if let Some(f) = stack.last_mut() {
        if f.log.len() < 200 {
            f.log.push(c.to_string());
        }
    }
}

fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' => {
                o.push_str(&format!("&#x{:x};", c as u32))
            }
            c => o.push(c),
        }
    }
    o
}

fn leaves<'a>(t: &'a Test, path: String, out: &mut Vec<(String, &'a Test)>) {
    if t.subtests.is_empty() {
        out.push((path, t));
    } else {
        for s in &t.subtests {
            leaves(s, format!("{path}/{}", s.name), out);
        }
    }
}

/// JUnit XML: one `<testsuite>` per top-level test, one `<testcase>` per
/// leaf (nested names joined with `/`).
pub fn junit(report: &Report, name: &str) -> String {
    let c = report.counts;
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    x.push_str(&format!(
        "<testsuites name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\">\n",
        xml_escape(name),
        c.total(),
        c.failed,
        c.crashed,
        c.skipped
    ));
    for suite in &report.tests {
        let mut cases = Vec::new();
        if suite.subtests.is_empty() {
            cases.push((suite.name.clone(), suite));
        } else {
            for s in &suite.subtests {
                leaves(s, s.name.clone(), &mut cases);
            }
        }
        let mut sc = Counts::default();
        count(std::slice::from_ref(suite), &mut sc);
        x.push_str(&format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\">\n",
            xml_escape(&suite.name),
            sc.total(),
            sc.failed,
            sc.crashed,
            sc.skipped
        ));
        for (case, t) in cases {
            x.push_str(&format!(
                "    <testcase classname=\"{}\" name=\"{}\"",
                xml_escape(&suite.name),
                xml_escape(&case)
            ));
            let log = xml_escape(&t.log.join("\n"));
            let why = xml_escape(t.reason.as_deref().unwrap_or(""));
            match t.status {
                Status::Passed => x.push_str("/>\n"),
                Status::Skipped => x.push_str(&format!(
                    ">\n      <skipped message=\"{why}\"/>\n    </testcase>\n"
                )),
                Status::Failed => x.push_str(&format!(
                    ">\n      <failure message=\"{why}\">{log}</failure>\n    </testcase>\n"
                )),
                Status::Crashed => x.push_str(&format!(
                    ">\n      <error message=\"crashed: {why}\">{log}</error>\n    </testcase>\n"
                )),
            }
        }
        let missing = suite.plan.map_or(0, |p| {
            p.saturating_sub(crate::num::small_u32(suite.subtests.len()))
        });
        if missing > 0 {
            x.push_str(&format!(
                "    <testcase classname=\"{0}\" name=\"(missing)\">\n      <error message=\"{1} planned test(s) never reported\"/>\n    </testcase>\n",
                xml_escape(&suite.name),
                missing
            ));
        }
        x.push_str("  </testsuite>\n");
    }
    x.push_str("</testsuites>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    // Shaped like the console output of `umlctl kernel test` on 6.12 with
    // CONFIG_KUNIT_EXAMPLE_TEST (abridged), with a kernel message between.
    const PASSING: &str = "\
Linux version 6.12.117 (umlctl@umlctl) #1 Tue Dec  1 00:00:00 UTC 2026
Kernel command line: mem=1G console=tty kunit_shutdown=halt
KTAP version 1
1..2
    KTAP version 1
    # Subtest: example
    # module: kunit_example_test
    1..4
    # example_simple_test: initializing
    ok 1 example_simple_test
    ok 2 example_skip_test # SKIP this test should be skipped
        KTAP version 1
        # Subtest: example_params_test
        ok 1 example value 3
        ok 2 example value 2
        ok 3 example value 0 # SKIP unsupported param value 0
    # example_params_test: pass:2 fail:0 skip:1 total:3
    ok 3 example_params_test
random: crng init done
    ok 4 example_priority_test
# example: pass:3 fail:0 skip:1 total:4
# Totals: pass:5 fail:0 skip:2 total:7
ok 1 example
    KTAP version 1
    # Subtest: other
    1..1
    ok 1 other_case
ok 2 other
reboot: System halted
";

    #[test]
    fn passing_nested_with_params_and_skips() {
        let r = parse(PASSING);
        assert!(r.found && !r.crashed() && r.passed(), "{r:#?}");
        assert_eq!(r.plan, Some(2));
        assert_eq!(r.tests.len(), 2);
        let ex = &r.tests[0];
        assert_eq!(ex.name, "example");
        assert_eq!(ex.plan, Some(4));
        assert_eq!(ex.subtests.len(), 4);
        assert_eq!(ex.subtests[1].status, Status::Skipped);
        assert_eq!(
            ex.subtests[1].reason.as_deref(),
            Some("this test should be skipped")
        );
        assert_eq!(ex.subtests[2].name, "example_params_test");
        assert_eq!(ex.subtests[2].subtests.len(), 3);
        assert!(ex.subtests[2].log.iter().any(|l| l.contains("pass:2")));
        assert_eq!(
            r.counts,
            Counts {
                passed: 5,
                failed: 0,
                skipped: 2,
                crashed: 0
            }
        );
        assert_eq!(r.counts.total(), 7);
    }

    #[test]
    fn failing() {
        let out = "KTAP version 1\n1..1\n    KTAP version 1\n    # Subtest: s\n    1..2\n    # c2: EXPECTATION FAILED at lib/x.c:10\n    not ok 2 c2\n    ok 1 c1\nnot ok 1 s\n";
        let r = parse(out);
        assert!(!r.passed() && !r.crashed());
        assert_eq!(r.counts.failed, 1);
        assert_eq!(r.counts.passed, 1);
        assert_eq!(r.tests[0].status, Status::Failed);
        assert!(r.tests[0]
            .log
            .iter()
            .any(|l| l.contains("EXPECTATION FAILED")));
    }

    #[test]
    fn all_skipped_is_not_a_pass() {
        let r = parse("KTAP version 1\n1..1\n    # Subtest: s\n    1..1\n    ok 1 c # SKIP nope\nok 1 s # SKIP\n");
        assert!(!r.passed() && !r.crashed(), "{r:#?}");
        assert_eq!(r.counts.skipped, 1);
    }

    #[test]
    fn crashed_mid_suite_old_tap14_with_timestamps() {
        // The TAP 14 shape older KUnit printed, ended by a panic.
        let out = "\
[    0.060000] printk: console [mc-1] enabled
[    0.060000] TAP version 14
[    0.060000] 1..3
[    0.060000] \t# Subtest: kunit-resource-test
[    0.060000] \t1..2
[    0.060000] \tok 1 - kunit_resource_test_init_resources
[    0.060000] \tok 2 - kunit_resource_test_alloc_resource
[    0.060000] ok 1 - kunit-resource-test
[    0.060000] \t# Subtest: string-stream-test
[    0.060000] \t1..3
[    0.060000] \tok 1 - string_stream_test_empty_on_creation
[    0.060000] \tKernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(98,0)
[    0.060000] CPU: 0 PID: 1 Comm: swapper Not tainted 5.4.0-rc1 #2
";
        let r = parse(out);
        assert!(r.crashed(), "{r:#?}");
        assert!(r.incomplete);
        assert!(r.crash.as_deref().unwrap().starts_with("Kernel panic"));
        assert_eq!(r.tests.len(), 2);
        assert_eq!(r.tests[0].name, "kunit-resource-test");
        assert_eq!(r.tests[0].status, Status::Passed);
        let s = &r.tests[1];
        assert_eq!(
            (s.name.as_str(), s.status),
            ("string-stream-test", Status::Crashed)
        );
        assert_eq!(s.subtests.len(), 1);
        // 3 passed; 2 never reported in the open suite (counted as crashed,
        // as kunit.py counts them); 1 suite never started (not counted).
        assert_eq!(r.counts.passed, 3);
        assert_eq!(r.counts.crashed, 2);
        assert_eq!(r.counts.total(), 5);
    }

    #[test]
    fn missing_plan_and_unknown_lines_at_odd_indents() {
        let out = "KTAP version 1\n\t# Subtest: a\n\tok 1 - x\ninit_suite\n\tok 2 - y\nkunit a: all tests passed\nok 1 - a\n";
        let r = parse(out);
        assert!(r.passed(), "{r:#?}");
        assert_eq!(r.plan, None);
        assert_eq!(r.counts.passed, 2);
    }

    #[test]
    fn no_ktap_at_all() {
        let r = parse("Linux version 6.12\nKernel panic - not syncing: Out of memory\n");
        assert!(!r.found && !r.passed());
        assert!(r.crash.is_some());
        let r = parse("KTAP version 1\n1..0\n");
        assert!(r.found && !r.passed() && !r.crashed());
    }

    #[test]
    fn panic_after_completion_is_not_a_test_crash() {
        let r = parse("KTAP version 1\n1..1\nok 1 t\nKernel panic - not syncing: VFS: Unable to mount root fs\n");
        assert!(r.passed(), "{r:#?}");
        // No top-level plan: after the last suite is after the tests.
        let r = parse("TAP version 14\n\t# Subtest: s\n\t1..1\n\tok 1 - c\nok 1 - s\nKernel panic - not syncing: VFS\n");
        assert!(r.passed(), "{r:#?}");
        // Inside a suite it is a crash.
        let r = parse(
            "KTAP version 1\n\t# Subtest: s\n\t1..2\n\tok 1 - c\n\tKernel panic - not syncing: x\n",
        );
        assert!(r.crashed() && r.crash.is_some(), "{r:#?}");
    }

    #[test]
    fn junit_output() {
        let r = parse(PASSING);
        let x = junit(&r, "kunit <6.12>");
        assert!(x.contains("<testsuites name=\"kunit &lt;6.12&gt;\" tests=\"7\" failures=\"0\" errors=\"0\" skipped=\"2\">"), "{x}");
        assert!(x.contains("name=\"example_params_test/example value 3\""));
        assert_eq!(x.matches("<testcase ").count(), 7);
        assert_eq!(x.matches("<skipped ").count(), 2);
        let r = parse("KTAP version 1\n1..1\n  # Subtest: s\n  1..2\n  ok 1 a\n");
        let x = junit(&r, "k");
        assert!(
            x.contains("<error message=\"1 planned test(s) never reported\"/>"),
            "{x}"
        );
    }

    #[test]
    fn never_panics_on_noise() {
        let mut seed = 0x2545F4914F6CDD1Du64;
        let pieces = [
            "KTAP version 1",
            "1..3",
            "ok 1 a",
            "not ok 2 b # SKIP",
            "# Subtest: s",
            "    ",
            "\t",
            "ok",
            "1..",
            "x",
            "é",
        ];
        for _ in 0..2000 {
            let mut s = String::new();
            for _ in 0..(seed % 30) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                s.push_str(&" ".repeat((seed % 9) as usize));
                s.push_str(pieces[(seed >> 8) as usize % pieces.len()]);
                s.push('\n');
            }
            let r = parse(&s);
            let _ = junit(&r, "x");
        }
    }

    /// Hostile outputs (a test kernel can print anything): plans that
    /// would overflow the counts, nesting as deep as the input allows,
    /// names of a megabyte.
    #[test]
    fn hostile_outputs_stay_bounded() {
        let r = parse(
            "KTAP version 1\n1..4294967295\n    # Subtest: a\n    1..4294967295\nok 1 a\n    # Subtest: b\n    1..4294967295\nok 2 b\n",
        );
        assert_eq!(r.counts.crashed, u32::MAX);
        assert_eq!(r.counts.total(), u32::MAX);
        assert!(r.crashed());

        let mut deep = String::from("KTAP version 1\n");
        for i in 0..2000 {
            deep.push_str(&" ".repeat(i));
            deep.push_str("# Subtest: s\n");
        }
        deep.push_str(&" ".repeat(2000));
        deep.push_str("ok 1 leaf\n");
        let r = parse(&deep);
        fn depth(t: &[Test]) -> usize {
            t.iter().map(|t| 1 + depth(&t.subtests)).max().unwrap_or(0)
        }
        assert!(depth(&r.tests) <= MAX_DEPTH, "{}", depth(&r.tests));
        let _ = junit(&r, "deep");

        let long = "x".repeat(1 << 20);
        let r = parse(&format!(
            "KTAP version 1\n1..1\nnot ok 1 {long} # SKIP {long}\n"
        ));
        assert!(
            r.tests[0].name.len() <= MAX_NAME + 3,
            "{}",
            r.tests[0].name.len()
        );
        assert!(r.tests[0].reason.as_ref().unwrap().len() <= MAX_NAME + 3);
        assert_eq!(r.tests[0].status, Status::Skipped);
        // Cutting is on a character boundary.
        assert_eq!(
            bounded(&"é".repeat(200))
                .chars()
                .filter(|c| *c == 'é')
                .count(),
            128
        );
    }
}
