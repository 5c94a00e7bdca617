//! Build provenance for `summary.json` (DESIGN "Reproducibility"): the commit tilt was built from
//! (with `-dirty` when tracked files differed from it) and the candle version in Cargo.lock.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    // --no-optional-locks: `git status` must not rewrite .git/index, which this script watches.
    let out = Command::new("git")
        .arg("--no-optional-locks")
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The version of `name` in Cargo.lock (`[[package]] name = "..." version = "..."`).
fn locked_version(lock: &str, name: &str) -> Option<String> {
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == format!("name = \"{name}\"") {
            let v = lines.next()?.trim();
            return v
                .strip_prefix("version = \"")
                .and_then(|v| v.strip_suffix('"'))
                .map(str::to_string);
        }
    }
    None
}

fn main() {
    let commit = match git(&["rev-parse", "HEAD"]) {
        Some(c) if !c.is_empty() => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            format!("{c}{}", if dirty { "-dirty" } else { "" })
        }
        _ => "unknown (not built from a git checkout)".to_string(),
    };
    println!("cargo:rustc-env=TILT_COMMIT={commit}");
    let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_default();
    let candle = locked_version(&lock, "candle-core").unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TILT_CANDLE_VERSION={candle}");

    // Rerun when the commit or the tracked sources change (only paths that exist: a missing one
    // would rerun this script on every build).
    let mut watched = vec![
        "Cargo.lock".to_string(),
        ".git/HEAD".into(),
        ".git/index".into(),
        ".git/packed-refs".into(),
        "src".into(),
        "kernels/src".into(),
        "actors/src".into(),
    ];
    if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(format!(".git/{r}"));
    }
    for p in watched.iter().filter(|p| Path::new(p).exists()) {
        println!("cargo:rerun-if-changed={p}");
    }
}
