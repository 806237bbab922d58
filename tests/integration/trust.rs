//! The repository on its failure paths: forged duplicate snapshot objects,
//! read-only storage, copies without empty folders, permissions under a
//! loose umask, lost locks and garbage left by interrupted writers.

use std::path::Path;

use cbtvault::format::snapshot;
use cbtvault::format::ObjectName;

use crate::healing::object_path;
use crate::util::*;

/// A second object with the same id and generation as `id`'s, describing
/// an all-zero disk; returns its object name.
fn forge_duplicate(t: &TestRepo, id: &str) -> String {
    let bytes = std::fs::read(object_path(t, id)).unwrap();
    let mut obj = snapshot::decode(&bytes).unwrap();
    obj.entries.clear();
    let forged = snapshot::encode(&obj).unwrap();
    let name = ObjectName::of(&forged).to_hex();
    std::fs::write(t.repo.join("snapshots").join(&name), forged).unwrap();
    name
}

#[test]
fn forged_snapshot_with_the_same_id_and_generation_is_never_picked() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("disk.img"), &random_bytes(40, 0, 6 * BSU));
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    let genuine = object_path(&t, &id)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let forged = forge_duplicate(&t, &id);

    let (check, report) = t.check(false);
    check.expect_code(3);
    let text = report.to_string();
    assert!(
        text.contains(&forged) && text.contains(&genuine),
        "{report}"
    );

    for query in [id.as_str(), &id[..8], "latest"] {
        let target = t.path("out.img");
        let r = t.restore(query, &target, &[]).expect_code(1);
        r.stderr_mentions(&[&forged, &genuine, "generation"]);
        assert!(!target.exists());
    }
    // Removing the forged object is the fix; the genuine one restores.
    std::fs::remove_file(t.repo.join("snapshots").join(&forged)).unwrap();
    t.check(false).0.ok();
    t.assert_restores(&id, img.hash(), img.size());
}

/// Runs `f` with `dir` mounted read-only (a read-only bind mount when
/// running as root, for whom permissions do not stop writes; `chmod -R a-w`
/// otherwise). Returns false, after saying why, when neither is possible.
pub fn with_read_only(dir: &Path, f: impl FnOnce()) -> bool {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if root {
        let bind = std::process::Command::new("mount")
            .args(["--bind"])
            .arg(dir)
            .arg(dir)
            .status();
        if !bind.is_ok_and(|s| s.success()) {
            eprintln!(
                "SKIPPED: cannot bind-mount '{}' (no mount privilege)",
                dir.display()
            );
            return false;
        }
        let ro = std::process::Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(dir)
            .status();
        if !ro.is_ok_and(|s| s.success()) {
            let _ = std::process::Command::new("umount").arg(dir).status();
            eprintln!("SKIPPED: cannot remount '{}' read-only", dir.display());
            return false;
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = std::process::Command::new("umount").arg(dir).status();
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    } else {
        let chmod = |mode: &str| {
            std::process::Command::new("chmod")
                .args(["-R", mode])
                .arg(dir)
                .status()
                .unwrap()
        };
        chmod("a-w");
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        chmod("u+w");
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    }
    true
}
