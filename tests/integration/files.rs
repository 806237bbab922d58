//! File-level restore (`ls`, `dump`, `find`, `restore --include`) against
//! real file-system images built without root (mkfs.ext4 -d, mkfs.fat +
//! mcopy, mkntfs + ntfscp, sfdisk), each result compared with the source
//! tree byte for byte and by metadata. A tool that is missing skips its
//! test with a note, except under CI (`CI` set), where it fails.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::util::{random_bytes, Run, TestRepo, BS};

/// True if `tool` is installed; else a skip note, or a failure under CI.
fn have(tool: &str, package: &str) -> bool {
    let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(tool).exists());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is missing: install the apt package '{package}'"
        );
        eprintln!("skipped: {tool} not found (apt package '{package}')");
    }
    found
}

/// Runs a tool (with /usr/sbin on PATH), asserting success; its stdout.
fn tool(cmd: &str, args: &[&dyn AsRef<OsStr>]) -> String {
    let path = format!(
        "/usr/sbin:/sbin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = Command::new(cmd);
    for a in args {
        c.arg(a.as_ref());
    }
    let out = c
        .env("PATH", path)
        .env("TZ", "UTC")
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn set_mtime(path: &Path, secs: u64) {
    let f = fs::File::open(path).unwrap();
    f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap();
}

const SPARSE_LEN: u64 = 5 * 1024 * 1024 * 1024 + 17;
const SPARSE_TAIL_AT: u64 = 4 * 1024 * 1024 * 1024 + 1234;

/// The reference tree: deep directories, long and non-ASCII names,
/// relative and absolute symlinks, a hard link, a sparse file over 4 GiB,
/// modes and mtimes. `version` 2 changes, removes and adds files.
fn build_tree(root: &Path, version: u32) {
    let deep = root.join("a/b/c/d/e/f/g/h/i");
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("deep.txt"), b"nine levels down\n").unwrap();
    fs::write(root.join("x".repeat(255)), b"long name").unwrap();
    fs::write(root.join("ünïcødé-日本語.txt"), "non-ASCII name\n").unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(
        root.join("random.bin"),
        random_bytes(version as u64, 1, 3 * 1024 * 1024 + 5),
    )
    .unwrap();
    fs::create_dir_all(root.join("etc/conf.d")).unwrap();
    fs::write(root.join("etc/hostname"), format!("host-v{version}\n")).unwrap();
    fs::write(root.join("etc/conf.d/net.conf"), b"dhcp\n").unwrap();
    if version == 1 {
        fs::write(root.join("etc/old.conf"), b"only in version 1\n").unwrap();
    } else {
        fs::write(root.join("etc/new.conf"), b"only in version 2\n").unwrap();
    }
    std::os::unix::fs::symlink("a/b/c", root.join("link_rel")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("link_abs")).unwrap();
    fs::write(root.join("hard1"), b"same inode\n").unwrap();
    fs::hard_link(root.join("hard1"), root.join("etc/hard2")).unwrap();
    let sparse = fs::File::create(root.join("sparse")).unwrap();
    sparse.write_all_at(b"head", 0).unwrap();
    sparse.write_all_at(b"tail bytes", SPARSE_TAIL_AT).unwrap();
    sparse.set_len(SPARSE_LEN).unwrap();
    fs::set_permissions(root.join("etc/hostname"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(root.join("random.bin"), fs::Permissions::from_mode(0o751)).unwrap();
    fs::set_permissions(root.join("etc/conf.d"), fs::Permissions::from_mode(0o750)).unwrap();
    set_mtime(&root.join("etc/hostname"), 1_500_000_000 + version as u64);
    set_mtime(&root.join("random.bin"), 1_234_567_890);
    set_mtime(&deep.join("deep.txt"), 1_600_000_000);
    set_mtime(&root.join("etc/conf.d"), 1_400_000_000);
    set_mtime(&root.join("etc"), 1_400_000_100);
}

fn mkfs_ext4(tree: &Path, image: &Path, size: &str, extra: &[&str]) {
    let _ = fs::remove_file(image);
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"-q", &"-F", &"-b", &"4096"];
    for e in extra {
        args.push(e);
    }
    args.extend_from_slice(&[&"-d", &tree, &image, &size]);
    tool("mkfs.ext4", &args);
}

/// What to compare besides names, kinds, sizes, contents and link targets.
#[derive(Clone, Copy)]
struct Compare {
    mode: bool,
    mtime: bool,
}

/// Every entry under `src` and `got` (relative path -> description); the
/// two must be equal. Contents compared by hash (the sparse file by its
/// two data ends, its zeros and its allocation).
fn describe_tree(root: &Path, cmp: Compare) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if rel == "lost+found" {
                continue;
            }
            let md = fs::symlink_metadata(&path).unwrap();
            let ft = md.file_type();
            let mut d = String::new();
            if ft.is_dir() {
                d.push_str("dir");
                stack.push(path.clone());
            } else if ft.is_symlink() {
                d.push_str(&format!(
                    "link -> {}",
                    fs::read_link(&path).unwrap().display()
                ));
            } else if md.len() > 64 << 20 {
                let f = fs::File::open(&path).unwrap();
                let (mut head, mut tail, mut mid) = ([0u8; 4], [0u8; 10], [1u8; 4096]);
                f.read_exact_at(&mut head, 0).unwrap();
                f.read_exact_at(&mut tail, SPARSE_TAIL_AT).unwrap();
                f.read_exact_at(&mut mid, 1 << 30).unwrap();
                assert!(mid.iter().all(|b| *b == 0));
                assert!(
                    md.blocks() * 512 < 8 << 20,
                    "{rel}: {} bytes allocated, not sparse",
                    md.blocks() * 512
                );
                d.push_str(&format!(
                    "sparse {} {:?} {:?}",
                    md.len(),
                    head,
                    String::from_utf8_lossy(&tail)
                ));
            } else {
                d.push_str(&format!(
                    "file {} {}",
                    md.len(),
                    blake3::hash(&fs::read(&path).unwrap())
                ));
            }
            if cmp.mode && !ft.is_symlink() {
                d.push_str(&format!(" mode {:o}", md.mode() & 0o777));
            }
            if cmp.mtime {
                d.push_str(&format!(" mtime {}", md.mtime()));
            }
            out.insert(rel, d);
        }
    }
    out
}

fn assert_same_tree(src: &Path, got: &Path, cmp: Compare) {
    let (a, b) = (describe_tree(src, cmp), describe_tree(got, cmp));
    let diff: Vec<String> = a
        .iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}: source {v}, restored {:?}", b.get(k)))
        .chain(
            b.keys()
                .filter(|k| !a.contains_key(*k))
                .map(|k| format!("{k}: not in the source")),
        )
        .collect();
    assert!(diff.is_empty(), "trees differ:\n{}", diff.join("\n"));
}

/// Names under `dir` (recursively), relative.
fn names_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// `--json restore ID --include PATTERN... --target DIR [EXTRA...]`.
fn restore_include(
    t: &TestRepo,
    id: &str,
    includes: &[&str],
    target: &Path,
    extra: &[&str],
) -> Run {
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"--json", &"restore", &id];
    for inc in includes {
        args.push(&"--include");
        args.push(inc);
    }
    args.push(&"--target");
    args.push(&target);
    for e in extra {
        args.push(e);
    }
    t.run(&args)
}

#[test]
fn files_ext4_two_snapshots_ls_dump_find_restore_match_their_trees() {
    if !have("mkfs.ext4", "e2fsprogs") {
        return;
    }
    let t = TestRepo::new();
    let image = t.path("disk.img");
    let (tree1, tree2) = (t.path("tree1"), t.path("tree2"));
    for (tree, v) in [(&tree1, 1), (&tree2, 2)] {
        fs::create_dir(tree).unwrap();
        build_tree(tree, v);
    }
    mkfs_ext4(&tree1, &image, "64M", &[]);
    let id1 = TestRepo::id_of(&t.backup(&image, &[]));
    mkfs_ext4(&tree2, &image, "64M", &[]);
    let id2 = TestRepo::id_of(&t.backup(&image, &[]));

    // ls without a path: the disk's one pseudo-partition.
    let r = t.run(&[&"--json", &"ls", &id1]).ok();
    let parts = r.items("partition");
    assert_eq!(parts.len(), 1);
    assert_eq!(parts[0]["partition_number"], 0);
    assert_eq!(parts[0]["file_system"], "ext4");
    assert_eq!(r.json()["partition_scheme"], "none");
    let text = t.run(&[&"ls", &id1]).ok().out();
    assert!(text.contains("p0") && text.contains("ext4"), "{text}");

    for (id, tree, v) in [(&id1, &tree1, 1), (&id2, &tree2, 2)] {
        // ls of a directory, bare path and p0: alike.
        let r = t.run(&[&"--json", &"ls", id, &"/etc"]).ok();
        let mut names: Vec<String> = r
            .items("file")
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        let mut want: Vec<String> = fs::read_dir(tree.join("etc"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        want.sort();
        assert_eq!(names, want, "ls /etc of version {v}");
        let host = r
            .items("file")
            .into_iter()
            .find(|f| f["name"] == "hostname")
            .unwrap();
        assert_eq!(host["path"], "p0:/etc/hostname");
        assert_eq!(host["kind"], "file");
        assert_eq!(host["mode"], 0o100640);
        assert_eq!(host["size_bytes"], 8);
        assert_eq!(
            host["modified_time"],
            if v == 1 {
                "2017-07-14T02:40:01Z"
            } else {
                "2017-07-14T02:40:02Z"
            }
        );
        let long = t.run(&[&"ls", &"-l", id, &"p0:/"]).ok().out();
        assert!(long.contains("link_abs -> /etc/passwd"), "{long}");
        assert!(long.contains("-rwxr-x--x"), "{long}");
        let rec = t.run(&[&"ls", &"--recursive", id, &"p0:/a"]).ok().out();
        assert!(rec.contains("p0:/a/b/c/d/e/f/g/h/i/deep.txt"), "{rec}");

        // dump: one file byte for byte; a directory as tar.
        let r = t.run(&[&"dump", id, &"/random.bin"]).ok();
        assert!(r.stdout == fs::read(tree.join("random.bin")).unwrap());
        let r = t.run(&[&"dump", id, &"p0:/ünïcødé-日本語.txt"]).ok();
        assert_eq!(r.stdout, "non-ASCII name\n".as_bytes());
        let r = t.run(&[&"--json", &"dump", id, &"p0:/etc"]).ok();
        let tar_out = t.path(&format!("tar{v}"));
        fs::create_dir(&tar_out).unwrap();
        fs::write(t.path("etc.tar"), &r.stdout).unwrap();
        tool("tar", &[&"-xf", &t.path("etc.tar"), &"-C", &tar_out]);
        let cmp = Compare {
            mode: true,
            mtime: true,
        };
        assert_same_tree(&tree.join("etc"), &tar_out.join("etc"), cmp);
        let summary: serde_json::Value = r
            .stderr
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| crate::json_contract::validate_line(l).unwrap())
            .next_back()
            .unwrap();
        assert_eq!(summary["kind"], "dir");

        // restore --include of everything: the whole tree, metadata too.
        let target = t.path(&format!("restored{v}"));
        let r = restore_include(&t, id, &["p0:/**"], &target, &[]).ok();
        let s = r.json();
        assert_eq!(s["complete"], true, "{s}");
        assert!(s["failed"].as_array().unwrap().is_empty());
        assert_same_tree(
            tree,
            &target.join("p0"),
            Compare {
                mode: true,
                mtime: true,
            },
        );
        // restore --include of a subtree: only it.
        let part = t.path(&format!("part{v}"));
        restore_include(&t, id, &["/etc/conf.d/**", "/etc/hostname"], &part, &[]).ok();
        assert_eq!(
            names_under(&part),
            vec![
                "p0",
                "p0/etc",
                "p0/etc/conf.d",
                "p0/etc/conf.d/net.conf",
                "p0/etc/hostname"
            ]
        );
        // A non-empty target is refused without --overwrite.
        restore_include(&t, id, &["/etc/hostname"], &part, &[])
            .expect_code(1)
            .stderr_mentions(&["not empty", "--overwrite"]);
        restore_include(&t, id, &["/etc/hostname"], &part, &["--overwrite"]).ok();
    }

    // find across both snapshots: which one still has the file?
    let r = t.run(&[&"--json", &"find", &id1, &id2, &"old.conf"]).ok();
    let found = r.items("found");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0]["snapshot_id"], id1.as_str());
    assert_eq!(found[0]["path"], "p0:/etc/old.conf");
    let s = r.json();
    assert_eq!(s["match_count"], 1);
    assert_eq!(s["snapshot_count"], 2);
    let r = t
        .run(&[&"--json", &"find", &id1, &id2, &"/etc/*.conf"])
        .ok();
    let mut paths: Vec<String> = r
        .items("found")
        .iter()
        .map(|f| f["path"].as_str().unwrap().to_string())
        .collect();
    paths.sort();
    assert_eq!(paths, vec!["p0:/etc/new.conf", "p0:/etc/old.conf"]);
    let text = t.run(&[&"find", &id2, &"*.conf"]).ok().out();
    assert!(text.contains("p0:/etc/conf.d/net.conf") && text.contains("new.conf"));
    assert!(!text.contains("old.conf"), "{text}");
}

/// A GPT disk (sfdisk on an image file) with ext4 dd'd into partition 1
/// and LVM- and LUKS-looking partitions 2 and 3.
fn partitioned_disk(t: &TestRepo, tree: &Path) -> PathBuf {
    let fs_img = t.path("p1.img");
    mkfs_ext4(tree, &fs_img, "16M", &[]);
    let disk = t.path("gpt.img");
    let f = fs::File::create(&disk).unwrap();
    f.set_len(40 << 20).unwrap();
    drop(f);
    let layout = "label: gpt\n\
        start=2048, size=32768, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n\
        start=34816, size=8192, type=E6D6D379-F507-44C2-A23C-238F2A3DF928\n\
        start=43008, size=8192, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n";
    let mut child = Command::new("sfdisk")
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .arg("--no-reread")
        .arg("--no-tell-kernel")
        .arg("-q")
        .arg(&disk)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(layout.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    let out = fs::OpenOptions::new().write(true).open(&disk).unwrap();
    out.write_all_at(&fs::read(&fs_img).unwrap(), 2048 * 512)
        .unwrap();
    // An LVM2 physical volume label in sector 1 of partition 2.
    let mut label = vec![0u8; 512];
    label[..8].copy_from_slice(b"LABELONE");
    label[24..32].copy_from_slice(b"LVM2 001");
    out.write_all_at(&label, 34816 * 512 + 512).unwrap();
    // A LUKS header at the start of partition 3.
    out.write_all_at(b"LUKS\xba\xbe\x00\x02", 43008 * 512)
        .unwrap();
    disk
}

#[test]
fn files_partitioned_disk_and_unsupported_partitions_say_what_they_are() {
    if !have("mkfs.ext4", "e2fsprogs") || !have("sfdisk", "fdisk") {
        return;
    }
    let t = TestRepo::new();
    let tree = t.path("tree");
    fs::create_dir(&tree).unwrap();
    fs::create_dir(tree.join("etc")).unwrap();
    fs::write(tree.join("etc/fstab"), b"/dev/sda1 / ext4\n").unwrap();
    fs::write(tree.join("kernel"), random_bytes(3, 3, 300_000)).unwrap();
    let disk = partitioned_disk(&t, &tree);
    let id = TestRepo::id_of(&t.backup(&disk, &[]));

    let r = t.run(&[&"--json", &"ls", &id]).ok();
    let parts = r.items("partition");
    assert_eq!(parts.len(), 3, "{parts:?}");
    assert_eq!(parts[0]["file_system"], "ext4");
    assert_eq!(parts[0]["start_bytes"], 2048 * 512);
    assert_eq!(parts[0]["size_bytes"], 32768 * 512);
    assert_eq!(parts[1]["type_name"], "Linux LVM");
    assert_eq!(parts[1]["supported"], false);
    assert_eq!(parts[2]["file_system"], "luks");
    assert_eq!(r.json()["partition_scheme"], "GPT");
    let text = t.run(&[&"ls", &id]).ok().out();
    assert!(text.contains("not supported"), "{text}");

    // The LVM and LUKS partitions: said so, with their type.
    t.run(&[&"ls", &id, &"p2:/"])
        .expect_code(1)
        .stderr_mentions(&["partition 2", "Linux LVM", "lvm2", "not supported"]);
    t.run(&[&"ls", &id, &"p3:/"])
        .expect_code(1)
        .stderr_mentions(&["partition 3", "luks", "not supported"]);
    // A bare path on a partitioned disk names the problem.
    t.run(&[&"ls", &id, &"/etc"])
        .expect_code(1)
        .stderr_mentions(&["partition table", "p1:/etc"]);
    t.run(&[&"ls", &id, &"p9:/"])
        .expect_code(1)
        .stderr_mentions(&["no partition 9"]);

    let r = t.run(&[&"dump", &id, &"p1:/kernel"]).ok();
    assert!(r.stdout == fs::read(tree.join("kernel")).unwrap());
    let target = t.path("out");
    restore_include(&t, &id, &["p1:/etc/**"], &target, &[]).ok();
    assert_eq!(names_under(&target), vec!["p1", "p1/etc", "p1/etc/fstab"]);
    assert_eq!(
        fs::read(target.join("p1/etc/fstab")).unwrap(),
        b"/dev/sda1 / ext4\n"
    );
}

/// Flips a byte in the stored blob of the disk block `content`.
fn corrupt_block(t: &TestRepo, content: &[u8]) {
    let id = blake3::hash(content);
    for pack in t.packs() {
        let bytes = fs::read(&pack).unwrap();
        let entries = cbtvault::format::pack::decode_pack_index(&bytes, BS as u32).unwrap();
        if let Some(e) = entries.iter().find(|e| e.block_id.0 == *id.as_bytes()) {
            let at = e.offset + e.stored_length as u64 / 2;
            let f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&pack)
                .unwrap();
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
            return;
        }
    }
    panic!("block not found in any pack");
}

#[test]
fn files_damaged_block_fails_its_file_by_name_and_block_and_the_rest_restores() {
    if !have("mkfs.ext4", "e2fsprogs") || !have("debugfs", "e2fsprogs") {
        return;
    }
    let t = TestRepo::new();
    let tree = t.path("tree");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("victim.bin"), random_bytes(5, 1, 512 * 1024)).unwrap();
    fs::write(tree.join("other.bin"), random_bytes(5, 2, 300 * 1024)).unwrap();
    fs::write(tree.join("small.txt"), b"still fine\n").unwrap();
    let image = t.path("disk.img");
    mkfs_ext4(&tree, &image, "32M", &[]);
    let id = TestRepo::id_of(&t.backup(&image, &[]));
    // The disk block holding the victim's second file-system block.
    let blocks = tool(
        "debugfs",
        &[&"-R", &"blocks /victim.bin", &image.as_os_str()],
    );
    let fs_block: u64 = blocks
        .split_whitespace()
        .nth(20)
        .expect("victim has blocks")
        .parse()
        .unwrap();
    let disk_block = fs_block * 4096 / BS;
    let img = fs::read(&image).unwrap();
    let content = &img[(disk_block * BS) as usize..((disk_block + 1) * BS) as usize];
    corrupt_block(&t, content);

    let target = t.path("out");
    let r = restore_include(&t, &id, &["/**"], &target, &[]);
    let r = r.expect_code(3);
    let s = r.json();
    assert_eq!(s["complete"], false);
    let failed = s["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["path"], "p0:/victim.bin");
    let message = failed[0]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("block {disk_block} ")) && message.contains("pack"),
        "{message}"
    );
    assert!(r.stderr.contains("p0:/victim.bin"), "{}", r.stderr);
    // The others are there, byte for byte; the victim is not, not even
    // under a temporary name.
    assert_eq!(
        fs::read(target.join("p0/other.bin")).unwrap(),
        fs::read(tree.join("other.bin")).unwrap()
    );
    assert_eq!(
        fs::read(target.join("p0/small.txt")).unwrap(),
        b"still fine\n"
    );
    let names = names_under(&target.join("p0"));
    assert_eq!(
        names,
        vec!["lost+found", "other.bin", "small.txt"],
        "{names:?}"
    );

    // ls still lists it; dump of it fails naming file and block.
    let r = t.run(&[&"ls", &id, &"p0:/"]).ok();
    assert!(r.out().contains("victim.bin"));
    t.run(&[&"dump", &id, &"/victim.bin"])
        .expect_code(1)
        .stderr_mentions(&["p0:/victim.bin", &format!("block {disk_block}"), "pack"]);
    let r = t.run(&[&"dump", &id, &"/other.bin"]).ok();
    assert!(r.stdout == fs::read(tree.join("other.bin")).unwrap());
}

/// Renames directory entries in an ext4 image by patching their name
/// bytes (no metadata checksums, linear directories). Only a directory
/// entry's name matches: the byte two before it is the name's length
/// (ext4_dir_entry_2: inode, rec_len, name_len, file_type, name) and it
/// starts 4-byte aligned, as entries do, so two bytes of a UUID, hash seed
/// or time that happen to spell the name are not taken for it.
fn patch_name(image: &Path, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let mut bytes = fs::read(image).unwrap();
    let hits: Vec<usize> = bytes
        .windows(from.len())
        .enumerate()
        .filter(|&(i, w)| {
            w == from && i % 4 == 0 && i >= 2 && usize::from(bytes[i - 2]) == from.len()
        })
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "{:?} found {} times", from, hits.len());
    bytes[hits[0]..hits[0] + to.len()].copy_from_slice(to);
    fs::write(image, bytes).unwrap();
}

#[test]
fn files_hostile_names_never_write_outside_the_target() {
    if !have("mkfs.ext4", "e2fsprogs") {
        return;
    }
    let t = TestRepo::new();
    let outside = t.path("outside");
    fs::create_dir(&outside).unwrap();
    let tree = t.path("tree");
    fs::create_dir(&tree).unwrap();
    // A symlink out of the target, then a directory of the same name
    // (patched below) with a file beneath: restoring it must not follow.
    std::os::unix::fs::symlink(&outside, tree.join("evil")).unwrap();
    fs::create_dir(tree.join("evim")).unwrap();
    fs::write(tree.join("evim/passwd"), b"owned\n").unwrap();
    // A file to be renamed '..', and a directory to be renamed '..' too.
    fs::write(tree.join("QQ"), b"dot dot\n").unwrap();
    fs::create_dir(tree.join("WW")).unwrap();
    fs::write(tree.join("WW/escape"), b"escape\n").unwrap();
    fs::write(tree.join("fine.txt"), b"fine\n").unwrap();
    let image = t.path("disk.img");
    mkfs_ext4(&tree, &image, "16M", &["-O", "^metadata_csum,^dir_index"]);
    patch_name(&image, b"evim", b"evil");
    patch_name(&image, b"QQ", b"..");
    patch_name(&image, b"WW", b"..");
    let id = TestRepo::id_of(&t.backup(&image, &[]));

    let parent = t.path("restore-parent");
    let target = parent.join("target");
    let r = restore_include(&t, &id, &["/**"], &target, &[]);
    assert!(r.code == 0 || r.code == 3, "{}", r.stderr);
    assert!(
        fs::read_dir(&outside).unwrap().next().is_none(),
        "something was written outside the target"
    );
    assert_eq!(names_under(&parent)[0], "target");
    assert!(names_under(&parent).iter().all(|n| n.starts_with("target")));
    assert_eq!(
        fs::read(target.join("p0/fine.txt")).unwrap(),
        b"fine\n".to_vec()
    );
    assert!(fs::symlink_metadata(target.join("p0/evil"))
        .unwrap()
        .file_type()
        .is_symlink());
    // Listing works; lookups through the link or '..' are refused.
    t.run(&[&"ls", &id, &"/"]).ok();
    let r = t.run(&[&"dump", &id, &"/evil/passwd"]);
    assert_ne!(r.code, 0);
    assert!(!r.stdout.starts_with(b"owned"));
}

/// A small file system corrupted in its structures: clear errors, no
/// panic, nothing written outside the target.
#[test]
fn files_corrupt_file_system_gives_clear_errors() {
    if !have("mkfs.ext4", "e2fsprogs") {
        return;
    }
    let t = TestRepo::new();
    let tree = t.path("tree");
    fs::create_dir(&tree).unwrap();
    for i in 0..20 {
        fs::create_dir(tree.join(format!("d{i}"))).unwrap();
        fs::write(tree.join(format!("d{i}/f")), format!("{i}\n")).unwrap();
    }
    let image = t.path("disk.img");
    mkfs_ext4(&tree, &image, "16M", &[]);
    // Overwrite the inode tables' first blocks with garbage (the block
    // group descriptor says where; 4 KiB blocks: table at block >= 3).
    let f = fs::OpenOptions::new().write(true).open(&image).unwrap();
    let garbage = random_bytes(9, 9, 64 * 1024);
    for at in [5u64, 40, 70] {
        f.write_all_at(&garbage, at * 4096).unwrap();
    }
    drop(f);
    let id = TestRepo::id_of(&t.backup(&image, &[]));
    let target = t.path("out");
    let r = restore_include(&t, &id, &["/**"], &target, &[]);
    assert!(r.code == 0 || r.code == 1 || r.code == 3, "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    let r = t.run(&[&"ls", &"-R", &id, &"/"]);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn files_fat_image() {
    if !have("mkfs.fat", "dosfstools") || !have("mcopy", "mtools") {
        return;
    }
    let t = TestRepo::new();
    let image = t.path("fat.img");
    tool(
        "mkfs.fat",
        &[&"-C", &"-F", &"16", &image.as_os_str(), &"16384"],
    );
    let src = t.path("src");
    fs::create_dir_all(src.join("DOCS")).unwrap();
    fs::write(src.join("DOCS/Long File Name.txt"), b"vfat long name\n").unwrap();
    fs::write(src.join("DATA.BIN"), random_bytes(4, 4, 200_000)).unwrap();
    tool(
        "mcopy",
        &[
            &"-s",
            &"-i",
            &image.as_os_str(),
            &src.join("DOCS"),
            &src.join("DATA.BIN"),
            &"::/",
        ],
    );
    let id = TestRepo::id_of(&t.backup(&image, &[]));
    let r = t.run(&[&"--json", &"ls", &id]).ok();
    assert_eq!(r.items("partition")[0]["file_system"], "fat16");
    let target = t.path("out");
    t.run(&[&"restore", &id, &"--include", &"/**", &"--target", &target])
        .ok();
    assert_same_tree(
        &src,
        &target.join("p0"),
        Compare {
            mode: false,
            mtime: false,
        },
    );
    let r = t.run(&[&"dump", &id, &"p0:/DOCS/Long File Name.txt"]).ok();
    assert_eq!(r.stdout, b"vfat long name\n");
}

#[test]
fn files_ntfs_image() {
    if !have("mkntfs", "ntfs-3g") || !have("ntfscp", "ntfs-3g") {
        return;
    }
    let t = TestRepo::new();
    let image = t.path("ntfs.img");
    fs::File::create(&image).unwrap().set_len(16 << 20).unwrap();
    tool("mkntfs", &[&"-F", &"-q", &"-Q", &image.as_os_str()]);
    let data = random_bytes(6, 6, 700_000);
    fs::write(t.path("data.bin"), &data).unwrap();
    fs::write(t.path("note.txt"), "ntfs ünïcødé\n").unwrap();
    tool(
        "ntfscp",
        &[&"-q", &image.as_os_str(), &t.path("data.bin"), &"data.bin"],
    );
    tool(
        "ntfscp",
        &[&"-q", &image.as_os_str(), &t.path("note.txt"), &"Nöte.txt"],
    );
    let id = TestRepo::id_of(&t.backup(&image, &[]));
    let r = t.run(&[&"--json", &"ls", &id]).ok();
    assert_eq!(r.items("partition")[0]["file_system"], "ntfs");
    let target = t.path("out");
    t.run(&[
        &"restore",
        &id,
        &"--include",
        &"/data.bin",
        &"--include",
        &"/Nöte.txt",
        &"--target",
        &target,
    ])
    .ok();
    assert!(fs::read(target.join("p0/data.bin")).unwrap() == data);
    assert_eq!(
        fs::read(target.join("p0/Nöte.txt")).unwrap(),
        "ntfs ünïcødé\n".as_bytes()
    );
    let r = t.run(&[&"--json", &"find", &id, &"*.bin"]).ok();
    assert_eq!(r.item("found")["path"], "p0:/data.bin");
}
