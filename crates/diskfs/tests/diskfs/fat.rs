//! FAT12/16/32 images from `mkfs.fat -C` filled with `mcopy -s -m`.

use diskfs::{Error, FileKind, FsType, Scheme};

use crate::common::*;

fn fat_image(fat_bits: &str, size_kib: &str, random_bytes: usize, expect: FsType) {
    if !have("mkfs.fat", "dosfstools") || !have("mcopy", "mtools") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    build_tree(
        &tree,
        &TreeOptions {
            unix: false,
            random_bytes,
        },
    );
    let image = dir.path().join("fat.img");
    let img = image.to_str().unwrap();
    run("mkfs.fat", &["-F", fat_bits, "-C", img, size_kib]);
    let mut args = vec!["-s", "-m", "-i", img];
    let entries: Vec<String> = std::fs::read_dir(&tree)
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    args.extend(entries.iter().map(String::as_str));
    args.push("::/");
    run("mcopy", &args);

    let disk = source(&image);
    let table = diskfs::read_partitions(&disk).unwrap();
    assert_eq!(table.scheme, Scheme::None);
    assert_eq!(table.partitions[0].fs, expect);
    let fs = diskfs::open(&disk, &table.partitions[0]).unwrap();
    assert_eq!(fs.fs_type(), expect);
    let cmp = Compare {
        unix_metadata: false,
        mtime: true,
        mtime_granularity: 2,
    };
    assert!(compare_tree(&*fs, b"/", &tree, &cmp) >= 15);
    // FAT is case-insensitive.
    assert_eq!(fs.stat(b"/DOCS/README.TXT").unwrap().kind, FileKind::File);
    assert!(matches!(
        fs.stat(b"/docs/missing"),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        fs.list(b"/empty"),
        Err(Error::NotADirectory { .. })
    ));
    let mut buf = [0u8; 3];
    assert_eq!(fs.read_at(b"/docs/readme.txt", 2, &mut buf).unwrap(), 3);
    assert_eq!(&buf, b"llo");
}

#[test]
fn fat12_image_matches_its_source_tree() {
    fat_image("12", "2048", 300_000, FsType::Fat12);
}

#[test]
fn fat16_image_matches_its_source_tree() {
    fat_image("16", "20480", 3_000_000, FsType::Fat16);
}

#[test]
fn fat32_image_matches_its_source_tree() {
    fat_image("32", "40960", 3_000_017, FsType::Fat32);
}
