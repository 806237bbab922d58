//! Partitioned images: sfdisk tables (GPT; MBR with a logical partition)
//! with ext4 file systems written into partitions with dd.

use diskfs::{FsType, PartitionType, Scheme};

use crate::common::*;

/// (partition number, start sector, size in sectors) from `sfdisk -d`.
fn sfdisk_dump(image: &str) -> Vec<(u32, u64, u64)> {
    let out = run("sfdisk", &["-d", image]);
    let mut parts = Vec::new();
    for line in out.lines().filter(|l| l.starts_with(image)) {
        let (dev, rest) = line.split_once(':').unwrap();
        let number: u32 = dev.trim().trim_start_matches(image).parse().unwrap();
        let field = |key: &str| -> u64 {
            let at = rest.find(&format!("{key}=")).unwrap() + key.len() + 1;
            rest[at..]
                .split(',')
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        parts.push((number, field("start"), field("size")));
    }
    parts
}

fn partitioned(label_script: &str, fill: &[(u64, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    build_tree(
        &tree,
        &TreeOptions {
            unix: false,
            random_bytes: 200_000,
        },
    );
    let fs_img = dir.path().join("fs.img");
    mkfs_ext4(&tree, &fs_img, "8M");
    let disk = dir.path().join("disk.img");
    let disk_s = disk.to_str().unwrap();
    run("truncate", &["-s", "40M", disk_s]);
    run(
        "sh",
        &[
            "-c",
            &format!("printf '{label_script}' | sfdisk -q {disk_s}"),
        ],
    );
    for (start_sector, _) in fill {
        run(
            "dd",
            &[
                &format!("if={}", fs_img.display()),
                &format!("of={disk_s}"),
                "bs=512",
                &format!("seek={start_sector}"),
                "conv=notrunc",
                "status=none",
            ],
        );
    }
    let expected = sfdisk_dump(disk_s);
    let src = source(&disk);
    let table = diskfs::read_partitions(&src).unwrap();
    let scheme = if label_script.contains("label: gpt") {
        Scheme::Gpt
    } else {
        Scheme::Mbr
    };
    assert_eq!(table.scheme, scheme);
    let got: Vec<(u32, u64, u64)> = table
        .partitions
        .iter()
        .map(|p| (p.number, p.start_bytes / 512, p.size_bytes / 512))
        .collect();
    // sfdisk reports an extended partition's size as in its entry.
    assert_eq!(got, expected);
    for (start_sector, type_name) in fill {
        let p = table
            .partitions
            .iter()
            .find(|p| p.start_bytes == start_sector * 512)
            .unwrap();
        assert_eq!(p.fs, FsType::Ext4, "partition {}", p.number);
        assert_eq!(
            p.partition_type.name(),
            Some(*type_name),
            "{}",
            p.partition_type
        );
        let fs = diskfs::open(&src, p).unwrap();
        let cmp = Compare {
            unix_metadata: false,
            mtime: true,
            mtime_granularity: 1,
        };
        assert!(compare_tree(&*fs, b"/", &tree, &cmp) >= 15);
    }
    for p in &table.partitions {
        if !fill.iter().any(|(s, _)| s * 512 == p.start_bytes) {
            assert!(
                !p.fs.is_supported(),
                "partition {} has no file system: {}",
                p.number,
                p.fs
            );
        }
    }
}

#[test]
fn gpt_partitions_and_ext4_inside() {
    if !have("sfdisk", "fdisk") || !have("mkfs.ext4", "e2fsprogs") {
        return;
    }
    partitioned(
        "label: gpt\\nstart=2048, size=16384, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\\nstart=18432, size=4096, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\\nstart=22528, size=20480, type=E6D6D379-F507-44C2-A23C-238F2A3DF928\\n",
        &[(2048, "Linux filesystem"), (22528, "Linux LVM")],
    );
}

#[test]
fn mbr_with_a_logical_partition_and_ext4_inside() {
    if !have("sfdisk", "fdisk") || !have("mkfs.ext4", "e2fsprogs") {
        return;
    }
    partitioned(
        "label: dos\\nstart=2048, size=18432, type=83\\nstart=20480, size=55296, type=5\\nstart=22528, size=4096, type=82\\nstart=28672, size=20480, type=8e\\n",
        &[(2048, "Linux"), (28672, "Linux LVM")],
    );
}

#[test]
fn gpt_type_names() {
    let g = diskfs::partition::Guid::parse("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7").unwrap();
    assert_eq!(PartitionType::Gpt(g).name(), Some("Microsoft basic data"));
    assert_eq!(PartitionType::Mbr(0x07).name(), Some("NTFS/exFAT"));
    assert_eq!(PartitionType::Mbr(0x0c).name(), Some("FAT32"));
}
