//! NTFS images from `mkntfs -F -Q` filled with `ntfscp` (no mount, no
//! root): files at the root, as ntfscp cannot create directories.

use diskfs::{Error, FileKind, FsType, Scheme};
use rand::{RngCore, SeedableRng};

use crate::common::*;

#[test]
fn ntfs_image_files_match_their_sources() {
    if !have("mkntfs", "ntfs-3g") || !have("ntfscp", "ntfs-3g") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("ntfs.img");
    let img = image.to_str().unwrap();
    run("truncate", &["-s", "24M", img]);
    run("mkntfs", &["-F", "-Q", "-q", img]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut big = vec![0u8; 3 * 1024 * 1024 + 11];
    rng.fill_bytes(&mut big);
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("hello.txt", b"hello ntfs\n".to_vec()),
        ("ünïcødé-日本語.txt", "non-ASCII\n".as_bytes().to_vec()),
        ("empty", Vec::new()),
        ("small.bin", vec![7u8; 600]), // resident $DATA
        ("random.bin", big),
    ];
    for (name, data) in &files {
        let src = dir.path().join("src");
        std::fs::write(&src, data).unwrap();
        run("ntfscp", &["-f", img, src.to_str().unwrap(), name]);
    }

    let disk = source(&image);
    let table = diskfs::read_partitions(&disk).unwrap();
    assert_eq!(table.scheme, Scheme::None);
    assert_eq!(table.partitions[0].fs, FsType::Ntfs);
    let fs = diskfs::open(&disk, &table.partitions[0]).unwrap();
    let listed = fs.list(b"/").unwrap();
    let user: Vec<_> = listed
        .iter()
        .filter(|e| !e.name.starts_with(b"$"))
        .collect();
    assert_eq!(
        user.len(),
        files.len(),
        "{:?}",
        user.iter().map(|e| e.display_name()).collect::<Vec<_>>()
    );
    for (name, data) in &files {
        let e = listed
            .iter()
            .find(|e| e.name == name.as_bytes())
            .unwrap_or_else(|| panic!("{name} not listed"));
        assert_eq!(e.kind, FileKind::File, "{name}");
        assert_eq!(e.size, data.len() as u64, "{name}");
        assert_eq!(e.nlink, Some(1));
        let path = format!("/{name}");
        assert_eq!(fs.stat(path.as_bytes()).unwrap(), *e);
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut fs.open_file(path.as_bytes()).unwrap(), &mut got).unwrap();
        assert!(got == *data, "content of {name}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let mtime = e.mtime.unwrap().seconds;
        assert!(
            (now - 600..=now + 5).contains(&mtime),
            "mtime of {name}: {mtime} vs now {now}"
        );
    }
    let mut buf = [0u8; 4];
    assert_eq!(
        fs.read_at(b"/random.bin", 3 * 1024 * 1024 + 7, &mut buf)
            .unwrap(),
        4
    );
    assert_eq!(&buf[..], &files[4].1[3 * 1024 * 1024 + 7..]);
    // Case-insensitive, as Windows.
    assert_eq!(fs.stat(b"/HELLO.TXT").unwrap().size, 11);
    assert!(matches!(fs.stat(b"/missing"), Err(Error::NotFound { .. })));
    assert!(matches!(
        fs.list(b"/hello.txt"),
        Err(Error::NotADirectory { .. })
    ));
    assert!(matches!(
        fs.open_file(b"/"),
        Err(Error::IsADirectory { .. })
    ));
    assert_eq!(fs.stat(b"/").unwrap().kind, FileKind::Dir);
}
