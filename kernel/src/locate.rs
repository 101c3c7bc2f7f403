//! Which kernel a guest boots, and why: `--kernel`, then `$UMLCTL_KERNEL`,
//! then the default kernel in umlctl's kernel cache, then `linux.uml` and
//! `linux` on `PATH`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::cache;
use crate::error::{Error, Result};
use crate::inspect::{inspect, KernelInfo};

/// Where a kernel came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    /// `--kernel PATH`.
    Flag,
    /// `$UMLCTL_KERNEL`.
    Env,
    /// umlctl's kernel cache (default kernel `name`).
    Cache { name: String },
    /// Found on `PATH` under this name.
    Path { name: String },
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Flag => write!(f, "--kernel"),
            Origin::Env => write!(f, "$UMLCTL_KERNEL"),
            Origin::Cache { name } => write!(f, "kernel cache (default kernel {name:?})"),
            Origin::Path { name } => write!(f, "`{name}` on PATH"),
        }
    }
}

/// One place looked at and what was found there.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attempt {
    pub source: String,
    pub outcome: String,
}

/// The chosen kernel, its inspection, and the places that were tried.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Located {
    pub origin: Origin,
    pub info: KernelInfo,
    pub tried: Vec<Attempt>,
}

/// The cache's default kernel: its name and `<cache>/kernels/<name>/linux`.
fn cache_default() -> Option<(String, PathBuf)> {
    let name = cache::default_name()?;
    let path = cache::kernel_dir(&name).ok()?.join("linux");
    Some((name, path))
}

fn is_executable_file(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .filter(|d| d.is_absolute())
        .map(|d| d.join(name))
        .find(|p| is_executable_file(p))
}

/// Find and inspect the kernel to use. An explicitly named kernel (flag or
/// environment) that is unusable is an error; the automatic places are
/// skipped over when what they hold is unusable, and the error then lists
/// every place tried.
pub fn locate(explicit: Option<&Path>) -> Result<Located> {
    let mut tried = Vec::new();
    let mut note = |source: String, outcome: String| tried.push(Attempt { source, outcome });

    if let Some(p) = explicit {
        let info = inspect_explicit(p, "--kernel")?;
        note("--kernel".into(), format!("{}", p.display()));
        return Ok(Located {
            origin: Origin::Flag,
            info,
            tried,
        });
    }
    note("--kernel".into(), "not given".into());

    match std::env::var_os("UMLCTL_KERNEL").filter(|v| !v.is_empty()) {
        Some(v) => {
            let p = PathBuf::from(v);
            let info = inspect_explicit(&p, "$UMLCTL_KERNEL")?;
            note("$UMLCTL_KERNEL".into(), format!("{}", p.display()));
            return Ok(Located {
                origin: Origin::Env,
                info,
                tried,
            });
        }
        None => note("$UMLCTL_KERNEL".into(), "not set".into()),
    }

    match cache_default() {
        Some((name, path)) => match inspect(&path) {
            Ok(info) => {
                note(
                    "kernel cache".into(),
                    format!("default {name:?} at {}", path.display()),
                );
                return Ok(Located {
                    origin: Origin::Cache { name },
                    info,
                    tried,
                });
            }
            Err(e) => note(
                "kernel cache".into(),
                format!("default {name:?} is unusable: {e}"),
            ),
        },
        None => {
            let where_ = cache::dir()
                .map(|d| d.display().to_string())
                .unwrap_or_default();
            note(
                "kernel cache".into(),
                format!("no default kernel in {where_}"),
            )
        }
    }

    for name in ["linux.uml", "linux"] {
        match which(name) {
            Some(path) => match inspect(&path) {
                Ok(info) => {
                    note(format!("PATH ({name})"), format!("{}", path.display()));
                    return Ok(Located {
                        origin: Origin::Path { name: name.into() },
                        info,
                        tried,
                    });
                }
                Err(e) => note(format!("PATH ({name})"), format!("skipped: {e}")),
            },
            None => note(format!("PATH ({name})"), "not found".into()),
        }
    }

    let tried = tried
        .iter()
        .map(|a| format!("  - {}: {}", a.source, a.outcome))
        .collect::<Vec<_>>()
        .join("\n");
    Err(Error::KernelNotFound { tried })
}

fn inspect_explicit(p: &Path, via: &str) -> Result<KernelInfo> {
    if let Err(e) = fs::metadata(p) {
        let reason = match e.kind() {
            std::io::ErrorKind::NotFound => format!("does not exist (named by {via})"),
            _ => format!("cannot be accessed: {e} (named by {via})"),
        };
        return Err(Error::KernelUnusable {
            path: p.to_path_buf(),
            reason,
        });
    }
    if !is_executable_file(p) {
        return Err(Error::KernelUnusable {
            path: p.to_path_buf(),
            reason: format!("is not an executable file (named by {via})"),
        });
    }
    let p = fs::canonicalize(p).map_err(|e| Error::io("resolve", p, e))?;
    inspect(&p)
}
