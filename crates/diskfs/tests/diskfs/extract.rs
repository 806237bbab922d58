//! Safe extraction: hostile names and on-disk symlinks never lead to a
//! write outside the target directory.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use diskfs::extract::{ExtractError, Extractor};
use diskfs::Timestamp;

/// Every path under `dir` (not following links), with file contents.
fn snapshot(dir: &Path) -> BTreeSet<(String, Vec<u8>)> {
    let mut out = BTreeSet::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let md = fs::symlink_metadata(e.path()).unwrap();
        let content = if md.is_file() {
            fs::read(e.path()).unwrap()
        } else {
            Vec::new()
        };
        out.insert((e.path().display().to_string(), content));
        if md.is_dir() {
            out.extend(snapshot(&e.path()));
        }
    }
    out
}

#[test]
fn hostile_names_and_planted_links_stay_inside_the_target() {
    let outer = tempfile::tempdir().unwrap();
    let target = outer.path().join("target");
    let victim = outer.path().join("victim");
    fs::create_dir(&target).unwrap();
    fs::create_dir(&victim).unwrap();
    fs::write(victim.join("passwd"), b"original").unwrap();
    // A symlink already on disk under the target, pointing outside.
    std::os::unix::fs::symlink(&victim, target.join("planted")).unwrap();
    std::os::unix::fs::symlink(victim.join("passwd"), target.join("planted_file")).unwrap();
    let before = snapshot(&victim);
    let outer_before: BTreeSet<_> = fs::read_dir(outer.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();

    let x = Extractor::new(&target).unwrap();
    let mut data: &[u8] = b"evil";
    for bad in [
        &b".."[..],
        b"../victim/passwd",
        b"../../etc/passwd",
        b"/etc/passwd",
        b"a/../../victim/x",
        b"a//b",
        b"a\0b",
        b"",
    ] {
        let err = x.write_file(bad, &mut data, 0o644).unwrap_err();
        assert!(matches!(err, ExtractError::InvalidPath { .. }), "{err}");
    }
    // Through a planted directory link.
    let err = x
        .write_file(b"planted/passwd", &mut data, 0o644)
        .unwrap_err();
    assert!(matches!(err, ExtractError::SymlinkOnDisk { .. }), "{err}");
    let err = x.create_dir(b"planted/sub", 0o755).unwrap_err();
    assert!(matches!(err, ExtractError::SymlinkOnDisk { .. }), "{err}");
    // A symlink from the image (absolute, to /etc-like dir), then a file
    // "through" it.
    x.symlink(b"etc", victim.to_str().unwrap().as_bytes())
        .unwrap();
    let err = x.write_file(b"etc/passwd", &mut data, 0o644).unwrap_err();
    assert!(matches!(err, ExtractError::SymlinkOnDisk { .. }), "{err}");
    let err = x
        .set_mtime(
            b"etc/passwd",
            Timestamp {
                seconds: 0,
                nanos: 0,
            },
        )
        .unwrap_err();
    assert!(matches!(err, ExtractError::SymlinkOnDisk { .. }), "{err}");
    // A file over a planted file link replaces the link, not its target.
    x.write_file(b"planted_file", &mut &b"new"[..], 0o600)
        .unwrap();
    assert_eq!(fs::read(target.join("planted_file")).unwrap(), b"new");
    assert!(!fs::symlink_metadata(target.join("planted_file"))
        .unwrap()
        .file_type()
        .is_symlink());

    // Ordinary entries work.
    x.create_dir(b"d1/d2", 0o750).unwrap();
    x.write_file(b"d1/d2/f", &mut &b"content"[..], 0o640)
        .unwrap();
    x.set_mtime(
        b"d1/d2/f",
        Timestamp {
            seconds: 1_000_000_000,
            nanos: 5,
        },
    )
    .unwrap();
    x.symlink(b"d1/link", b"../../../../outside").unwrap();
    x.set_mtime(
        b"d1/link",
        Timestamp {
            seconds: 1_000_000_001,
            nanos: 0,
        },
    )
    .unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let md = fs::metadata(target.join("d1/d2/f")).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o640);
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_000_000_000, 5));
    assert_eq!(
        fs::read_link(target.join("d1/link")).unwrap().to_str(),
        Some("../../../../outside")
    );
    assert_eq!(
        fs::symlink_metadata(target.join("d1/link"))
            .unwrap()
            .mtime(),
        1_000_000_001
    );
    // Writing through the just-restored relative link is refused too.
    let err = x.write_file(b"d1/link/x", &mut data, 0o644).unwrap_err();
    assert!(matches!(err, ExtractError::SymlinkOnDisk { .. }), "{err}");

    assert_eq!(snapshot(&victim), before, "the victim directory changed");
    let outer_after: BTreeSet<_> = fs::read_dir(outer.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        outer_after, outer_before,
        "something was written beside the target"
    );
}
