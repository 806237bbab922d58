//! Shared helpers: tool checks, the reference source tree, comparison of a
//! file system against the tree it was made from.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use diskfs::{FileKind, FileSystem, Source};
use rand::{RngCore, SeedableRng};

/// True if `tool` is on PATH. Without it: a failure naming the apt package
/// under CI, a "skipped" note otherwise.
pub fn have(tool: &str, package: &str) -> bool {
    let found = Command::new("sh")
        .args([
            "-c",
            &format!("command -v {tool} || test -x /usr/sbin/{tool} || test -x /sbin/{tool}"),
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is missing: install the apt package '{package}' (crates/diskfs/APT-PACKAGES)"
        );
        eprintln!("skipped: {tool} not found (apt package '{package}')");
    }
    found
}

/// Runs a command (with /usr/sbin on PATH), asserting success.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let path = format!(
        "/usr/sbin:/sbin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(cmd)
        .args(args)
        .env("PATH", path)
        .env("TZ", "UTC")
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn source(path: &Path) -> Source {
    Arc::new(fs::File::open(path).expect("open image"))
}

pub const LONG_NAME_LEN: usize = 255;
pub const SPARSE_LEN: u64 = 5 * 1024 * 1024 * 1024 + 17;
pub const SPARSE_TAIL_AT: u64 = 4 * 1024 * 1024 * 1024 + 1234;

fn set_mtime(path: &Path, secs: u64, nanos: u32) {
    let t = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
    let f = fs::File::open(path).expect("open for set_modified");
    f.set_modified(t).expect("set mtime");
}

pub struct TreeOptions {
    /// Unix extras: symlinks, hard link, sparse > 4 GiB file, modes.
    pub unix: bool,
    pub random_bytes: usize,
}

/// Builds the reference tree under `root`.
pub fn build_tree(root: &Path, opts: &TreeOptions) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut deep = root.to_path_buf();
    for name in ["a", "b", "c", "d", "e", "f", "g", "h", "i"] {
        deep.push(name);
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("deep.txt"), b"nine levels down\n").unwrap();
    fs::write(root.join("x".repeat(LONG_NAME_LEN)), b"long name").unwrap();
    fs::write(root.join("ünïcødé-日本語.txt"), "non-ASCII name\n").unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    let mut random = vec![0u8; opts.random_bytes];
    rng.fill_bytes(&mut random);
    fs::write(root.join("random.bin"), &random).unwrap();
    fs::create_dir(root.join("docs")).unwrap();
    fs::write(root.join("docs/readme.txt"), b"hello\n").unwrap();
    if opts.unix {
        std::os::unix::fs::symlink("a/b/c", root.join("link_rel")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link_abs")).unwrap();
        fs::write(root.join("hard1"), b"same inode\n").unwrap();
        fs::hard_link(root.join("hard1"), root.join("docs/hard2")).unwrap();
        let sparse = fs::File::create(root.join("sparse")).unwrap();
        use std::os::unix::fs::FileExt;
        sparse.write_all_at(b"head", 0).unwrap();
        sparse.write_all_at(b"tail bytes", SPARSE_TAIL_AT).unwrap();
        sparse.set_len(SPARSE_LEN).unwrap();
        fs::set_permissions(
            root.join("docs/readme.txt"),
            fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        fs::set_permissions(root.join("random.bin"), fs::Permissions::from_mode(0o751)).unwrap();
        fs::set_permissions(root.join("docs"), fs::Permissions::from_mode(0o750)).unwrap();
    }
    // mtimes last, deepest first (creating children changes a directory's).
    set_mtime(&root.join("docs/readme.txt"), 1_500_000_000, 123_456_789);
    set_mtime(&root.join("random.bin"), 1_234_567_890, 0);
    set_mtime(&deep.join("deep.txt"), 1_600_000_000, 500_000_000);
    set_mtime(&root.join("docs"), 1_400_000_000, 0);
}

/// Entries of `dir` in the source tree, by name.
fn source_entries(dir: &Path) -> BTreeMap<Vec<u8>, fs::Metadata> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().as_bytes().to_vec(),
                fs::symlink_metadata(e.path()).unwrap(),
            )
        })
        .collect()
}

/// What to compare besides names, kinds, sizes and contents.
pub struct Compare {
    pub unix_metadata: bool,
    /// Mtime resolution in seconds: 1 compares whole seconds (mkfs.ext4 -d
    /// of e2fsprogs 1.47.0 drops nanoseconds), 2 for FAT (the image's time
    /// may be rounded up to the next even second).
    pub mtime_granularity: i64,
    pub mtime: bool,
}

/// Compares the whole image tree under `img_dir` against `src_dir`: every
/// entry's name, kind, size, file content (streamed), link target, and the
/// metadata `cmp` asks for. Returns the number of entries compared.
pub fn compare_tree(fs_: &dyn FileSystem, img_dir: &[u8], src_dir: &Path, cmp: &Compare) -> usize {
    let listed = fs_
        .list(img_dir)
        .unwrap_or_else(|e| panic!("list {:?}: {e}", String::from_utf8_lossy(img_dir)));
    let want = source_entries(src_dir);
    // mkfs.ext4 adds lost+found; NTFS its $-prefixed system files at the root.
    let extra = |name: &[u8]| img_dir == b"/" && (name == b"lost+found" || name.starts_with(b"$"));
    let got: BTreeMap<Vec<u8>, diskfs::DirEntry> = listed
        .into_iter()
        .filter(|e| !extra(&e.name) || want.contains_key(&e.name))
        .map(|e| (e.name.clone(), e))
        .collect();
    let got_names: Vec<String> = got
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    let want_names: Vec<String> = want
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert_eq!(got_names, want_names, "names in {}", src_dir.display());
    let mut count = 0;
    for (name, md) in &want {
        let entry = &got[name];
        let src_path = src_dir.join(std::ffi::OsStr::from_bytes(name));
        let mut img_path = img_dir.to_vec();
        if !img_path.ends_with(b"/") {
            img_path.push(b'/');
        }
        img_path.extend_from_slice(name);
        let what = src_path.display().to_string();
        count += 1;
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            FileKind::Dir
        } else if ft.is_symlink() {
            FileKind::Symlink
        } else {
            FileKind::File
        };
        assert_eq!(entry.kind, kind, "{what}");
        assert_eq!(
            fs_.stat(&img_path).unwrap(),
            *entry,
            "stat vs list of {what}"
        );
        if cmp.unix_metadata {
            assert_eq!(entry.mode, Some(md.mode()), "mode of {what}");
            assert_eq!(entry.uid, Some(md.uid()), "uid of {what}");
            assert_eq!(entry.gid, Some(md.gid()), "gid of {what}");
        }
        if cmp.mtime && kind != FileKind::Symlink {
            let m = entry.mtime.expect("mtime");
            if cmp.mtime_granularity == 1 {
                assert_eq!(m.seconds, md.mtime(), "mtime of {what}");
            } else {
                let d = m.seconds - md.mtime();
                assert!(
                    (-1..=cmp.mtime_granularity).contains(&d),
                    "mtime of {what}: {} vs {}",
                    m.seconds,
                    md.mtime()
                );
            }
        }
        match kind {
            FileKind::Dir => count += compare_tree(fs_, &img_path, &src_path, cmp),
            FileKind::Symlink => {
                let target = fs::read_link(&src_path).unwrap();
                assert_eq!(
                    entry.symlink_target.as_deref(),
                    Some(target.as_os_str().as_bytes()),
                    "{what}"
                );
                assert_eq!(
                    fs_.readlink(&img_path).unwrap(),
                    target.as_os_str().as_bytes()
                );
            }
            _ => {
                assert_eq!(entry.size, md.len(), "size of {what}");
                if md.len() > 64 * 1024 * 1024 {
                    continue; // the sparse file: checked at chosen offsets by its test
                }
                let mut img = fs_.open_file(&img_path).unwrap();
                assert_eq!(img.len(), md.len());
                let mut src = fs::File::open(&src_path).unwrap();
                let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
                loop {
                    let n = read_full(&mut src, &mut a);
                    let m = read_full(&mut *img, &mut b);
                    assert_eq!(n, m, "length of {what}");
                    assert!(a[..n] == b[..m], "content of {what}");
                    if n == 0 {
                        break;
                    }
                }
            }
        }
    }
    count
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]).expect("read") {
            0 => break,
            n => done += n,
        }
    }
    done
}

/// Makes an ext4 image of `tree` (4 KiB blocks).
pub fn mkfs_ext4(tree: &Path, image: &Path, size: &str) {
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-d",
            tree.to_str().unwrap(),
            image.to_str().unwrap(),
            size,
        ],
    );
}
