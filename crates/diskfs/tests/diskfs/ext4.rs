//! ext4 images made by `mkfs.ext4 -d` from a reference tree.

use std::io::{Read, Seek, SeekFrom};

use diskfs::{Error, FileKind, FsType, Scheme};

use crate::common::*;

#[test]
fn ext4_image_matches_its_source_tree() {
    if !have("mkfs.ext4", "e2fsprogs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    build_tree(
        &tree,
        &TreeOptions {
            unix: true,
            random_bytes: 3 * 1024 * 1024 + 5,
        },
    );
    let image = dir.path().join("ext4.img");
    mkfs_ext4(&tree, &image, "64M");
    // mkfs.ext4 -d (e2fsprogs 1.47.0) keeps whole seconds only: give one
    // inode nanoseconds (bits 2..31 of mtime_extra) to check they are read.
    run(
        "debugfs",
        &[
            "-w",
            "-R",
            &format!("sif /docs/readme.txt mtime_extra {}", 123_456_789u32 << 2),
            image.to_str().unwrap(),
        ],
    );
    assert!(std::fs::metadata(&image).unwrap().len() < 100 << 20);

    let disk = source(&image);
    let table = diskfs::read_partitions(&disk).unwrap();
    assert_eq!(table.scheme, Scheme::None);
    let part = table.get(0).unwrap();
    assert_eq!(part.fs, FsType::Ext4);
    assert_eq!(part.size_bytes, 64 << 20);
    let fs = diskfs::open(&disk, part).unwrap();
    assert_eq!(fs.fs_type(), FsType::Ext4);

    let cmp = Compare {
        unix_metadata: true,
        mtime: true,
        mtime_granularity: 1,
    };
    let n = compare_tree(&*fs, b"/", &tree, &cmp);
    assert!(n >= 20, "compared only {n} entries");

    let readme = fs.stat(b"/docs/readme.txt").unwrap().mtime.unwrap();
    assert_eq!((readme.seconds, readme.nanos), (1_500_000_000, 123_456_789));

    // The sparse file: apparent size > 4 GiB, data at both ends, holes read
    // as zeros, streamed with seeks.
    let sparse = fs.stat(b"/sparse").unwrap();
    assert_eq!(sparse.size, SPARSE_LEN);
    let mut buf = [0u8; 10];
    assert_eq!(
        fs.read_at(b"/sparse", SPARSE_TAIL_AT, &mut buf).unwrap(),
        10
    );
    assert_eq!(&buf, b"tail bytes");
    assert_eq!(fs.read_at(b"sparse", 0, &mut buf[..4]).unwrap(), 4);
    assert_eq!(&buf[..4], b"head");
    assert_eq!(fs.read_at(b"/sparse", 3 << 30, &mut buf).unwrap(), 10);
    assert_eq!(buf, [0u8; 10]);
    assert_eq!(fs.read_at(b"/sparse", SPARSE_LEN - 3, &mut buf).unwrap(), 3);
    let mut f = fs.open_file(b"/sparse").unwrap();
    f.seek(SeekFrom::End(-10)).unwrap();
    let mut rest = Vec::new();
    f.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, vec![0u8; 10]);

    // Links are reported, not followed.
    let link = fs.stat(b"/link_rel").unwrap();
    assert_eq!(link.kind, FileKind::Symlink);
    assert_eq!(link.symlink_target.as_deref(), Some(&b"a/b/c"[..]));
    assert!(matches!(
        fs.list(b"/link_rel/d"),
        Err(Error::SymlinkInPath { .. })
    ));
    assert!(matches!(
        fs.list(b"/link_rel"),
        Err(Error::NotADirectory { .. })
    ));
    assert!(matches!(
        fs.open_file(b"/link_abs"),
        Err(Error::NotAFile { .. })
    ));
    assert!(matches!(
        fs.open_file(b"/docs"),
        Err(Error::IsADirectory { .. })
    ));
    assert!(matches!(
        fs.readlink(b"/docs"),
        Err(Error::NotASymlink { .. })
    ));
    assert!(matches!(fs.stat(b"/nope"), Err(Error::NotFound { .. })));
    assert!(matches!(
        fs.stat(b"/docs/../etc"),
        Err(Error::InvalidPath { .. })
    ));
    assert!(matches!(
        fs.list(b"/empty"),
        Err(Error::NotADirectory { .. })
    ));

    // Hard links: the same content under both names.
    let mut a = Vec::new();
    fs.open_file(b"/hard1")
        .unwrap()
        .read_to_end(&mut a)
        .unwrap();
    let mut b = Vec::new();
    fs.open_file(b"/docs/hard2")
        .unwrap()
        .read_to_end(&mut b)
        .unwrap();
    assert_eq!(a, b);
}
