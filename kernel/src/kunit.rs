//! `kernel test`: build a KUnit kernel (configured as kunit.py configures:
//! the kunitconfig plus `arch_uml.config`, completed by olddefconfig; cached
//! like every other build), boot it with `kunit_shutdown=halt`, and parse
//! its KTAP console output ([`crate::ktap`]).

use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::build::{self, Base, BuildSpec, Built, Observer};
use crate::error::{Error, Result};
use crate::jail::{Bind, JailRoot, Launch};
use crate::ktap::{self, Report};
use crate::run::{prepare_kernel, ShimMode};

/// What to test.
#[derive(Debug, Clone)]
pub struct KunitSpec {
    /// A Linux source directory or tarball.
    pub source: PathBuf,
    /// The kunitconfig; default: the tree's `.kunitconfig`, else
    /// `tools/testing/kunit/configs/default.config` (as kunit.py).
    pub kunitconfig: Option<PathBuf>,
    /// `kunit.filter_glob`: which suites (or `suite.case`s) run.
    pub filter_glob: Option<String>,
    /// More `--set` options for the build.
    pub sets: Vec<String>,
    pub jobs: Option<usize>,
    /// How long the kernel may run before it is declared hung.
    pub timeout: Duration,
    /// Guest memory (`mem=`).
    pub mem: String,
    /// How the kernel is confined.
    pub jail: crate::run::JailOpts,
}

/// How a test run ended.
#[derive(Debug, serde::Serialize)]
pub struct KunitOutcome {
    pub kernel: Built,
    pub report: Report,
    /// The kernel was still running at the timeout and was killed.
    pub timed_out: bool,
    /// The kernel's whole console output.
    pub console_log: PathBuf,
    /// Wall time of the boot, seconds.
    pub run_secs: f64,
}

/// The kunitconfig text and its label, per the rules of [`KunitSpec::kunitconfig`].
fn kunitconfig(spec: &KunitSpec, tree: &Path) -> Result<(String, String)> {
    let path = match &spec.kunitconfig {
        Some(p) => p.clone(),
        None => {
            let own = tree.join(".kunitconfig");
            if own.is_file() {
                own
            } else {
                tree.join("tools/testing/kunit/configs/default.config")
            }
        }
    };
    let text = fs::read_to_string(&path).map_err(|e| Error::io("read kunitconfig", &path, e))?;
    Ok((path.display().to_string(), text))
}

/// Build (or reuse) the KUnit kernel, boot it, and parse what it printed.
pub fn test(spec: &KunitSpec, obs: &dyn Observer) -> Result<KunitOutcome> {
    if spec.timeout.is_zero() {
        return Err(Error::Usage("--timeout must be more than 0 seconds".into()));
    }
    // Before the (long) build: a limit the guest's memory cannot fit.
    spec.jail
        .limits
        .validate(crate::cmdline::parse_size(&spec.mem)?)?;
    let tree = build::source_tree(&spec.source, obs)?;
    let mut extra = vec![kunitconfig(spec, &tree)?];
    let arch = tree.join("tools/testing/kunit/configs/arch_uml.config");
    if let Ok(text) = fs::read_to_string(&arch) {
        extra.push((arch.display().to_string(), text));
    }
    if !extra
        .iter()
        .any(|(_, t)| t.lines().any(|l| l.trim() == "CONFIG_KUNIT=y"))
    {
        extra.push(("kunit".into(), "CONFIG_KUNIT=y\n".into()));
    }
    let bspec = BuildSpec {
        base: Base::Bare,
        source: spec.source.clone(),
        name: None,
        fragments: vec![],
        sets: spec.sets.clone(),
        extra,
        jobs: spec.jobs,
        force: false,
        debug: false,
    };
    let kernel = build::build(&bspec, obs)?;

    obs.phase("running the tests");
    let prep = prepare_kernel(Some(&kernel.path), &[], ShimMode::Auto)?;
    let mem_bytes = crate::cmdline::parse_size(&spec.mem)?;
    let uml_dir = tempfile_dir()?;
    let _cleanup = crate::run::RunDirGuard(uml_dir.clone());
    let mut args = vec![
        format!("mem={}", spec.mem),
        "console=tty".into(),
        "kunit_shutdown=halt".into(),
        format!("umid=umlctl-kunit-{}", std::process::id()),
        format!("uml_dir={}/", uml_dir.display()),
    ];
    if let Some(g) = &spec.filter_glob {
        if g.is_empty() || g.contains(char::is_whitespace) {
            let _ = fs::remove_dir_all(&uml_dir);
            return Err(Error::Usage(format!(
                "filter {g:?}: a glob over suite names, or suite.case, without spaces (e.g. 'example*' or 'example.example_simple_test')"
            )));
        }
        args.push(format!("kunit.filter_glob={g}"));
    }
    let (reader, writer) =
        nix::unistd::pipe().map_err(|e| Error::sys("pipe", crate::error::errno(e)))?;
    let mut jail = prep.jail(JailRoot::Empty, mem_bytes, spec.jail);
    match jail.as_mut() {
        Some(j) => {
            crate::jail::hand_over(j, &uml_dir)?;
            j.bind(Bind::rw(&uml_dir));
        }
        None => crate::run::warn_unjailed(),
    }
    let null = fs::File::open("/dev/null").map_err(|e| Error::io("open", "/dev/null", e))?;
    let cgroup = crate::cgroup::for_guest(&crate::cgroup::run_name(), &spec.jail.limits)?;
    let launch = Launch {
        program: kernel.path.clone(),
        args,
        env: prep.uml_env(jail.is_some(), false)?,
        cwd: uml_dir.clone(),
        fds: vec![
            (null.as_raw_fd(), 0),
            (writer.as_raw_fd(), 1),
            (writer.as_raw_fd(), 2),
        ],
        new_session: true,
        die_with_parent: true,
        stop_before_exec: false,
        cgroup: cgroup.as_ref().map(|c| c.0.clone()),
    };
    let started = Instant::now();
    let spawned = crate::run::launch(jail.as_ref(), &launch, true);
    drop(writer);
    drop(null);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let _ = fs::remove_dir_all(&uml_dir);
            return Err(e);
        }
    };
    let collector = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = fs::File::from(reader).read_to_end(&mut out);
        out
    });
    let mut timed_out = false;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() >= spec.timeout => {
                timed_out = true;
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break,
        }
    }
    // Everything the kernel started goes: the jail's PID 1 (its PID
    // namespace), or unjailed UML's process group (UML calls setsid, which
    // keeps the group id equal to its pid).
    let target = child.kill_target();
    let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::signal::killpg(child.pid, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
    let run_secs = started.elapsed().as_secs_f64();
    let output = collector.join().unwrap_or_default();
    let _ = fs::remove_dir_all(&uml_dir);

    let console_log = kernel.meta.build_dir.join("umlctl-kunit.log");
    fs::write(&console_log, &output).map_err(|e| Error::io("write", &console_log, e))?;
    let report = ktap::parse(&String::from_utf8_lossy(&output));
    Ok(KunitOutcome {
        kernel,
        report,
        timed_out,
        console_log,
        run_secs,
    })
}

/// A private directory for UML's instance files (`uml_dir=`), removed after.
fn tempfile_dir() -> Result<PathBuf> {
    let base = crate::paths::runtime_dir()?;
    let d = base.join(format!("kunit-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    crate::paths::ensure_private_dir(&d)?;
    Ok(d)
}
