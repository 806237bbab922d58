//! Encrypted repositories (issue 15, format-spec/09-encryption.md): round
//! trips that leave nothing readable in the repository, wrong and missing
//! passwords (exit 12, nothing written), tampered, swapped and truncated
//! objects found by check and never restored, key management, and copy
//! plain -> encrypted -> plain bit for bit.

use std::ffi::OsStr;
use std::path::Path;

use crate::util::*;

const MARKER: &[u8] = b"CBTVAULT-PLAINTEXT-MARKER-7f3a";

/// A 48-block image: text blocks carrying `MARKER`, random blocks, zeros.
fn marked_image(t: &TestRepo) -> Image {
    let img = Image::create(&t.path("disk.img"), 48 * BS);
    for i in 0..48u64 {
        let block = match i % 4 {
            0 => zero_block(),
            1 | 2 => {
                let mut b = text_block(7, i);
                for at in (0..b.len() - MARKER.len()).step_by(4096) {
                    b[at..at + MARKER.len()].copy_from_slice(MARKER);
                }
                b
            }
            _ => random_block(7, i),
        };
        img.write_block(i, &block);
    }
    img
}

/// Every file under `dir`, recursively.
fn all_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Everything a run leaves in the repository folder, with its bytes.
fn snapshot_of_folder(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = all_files(dir)
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn round_trip_leaves_nothing_readable_and_restores_bit_exact() {
    let t = TestRepo::encrypted(&["--pack-size-mib", "1"]);
    let img = marked_image(&t);
    let first = t.backup(&img.path, &[]);
    let h1 = img.hash();
    for i in (1..48).step_by(5) {
        img.write_block(i, &random_block(8, i));
    }
    let second = t.backup(&img.path, &[]);
    assert_eq!(second["parent_id"], first["snapshot_id"], "{second}");
    let h2 = img.hash();
    t.assert_restores(&TestRepo::id_of(&first), h1, img.size());
    t.assert_restores(&TestRepo::id_of(&second), h2, img.size());

    // Nothing of the content, the plain block ids or the metadata in the
    // repository's files; no catalog there either (it is in the cache).
    let plain_ids: Vec<[u8; 32]> = (0..48)
        .map(|i| *blake3::hash(&img.read_block(i)).as_bytes())
        .collect();
    let files = all_files(&t.repo);
    assert!(files.iter().any(|p| p.starts_with(t.repo.join("keys"))));
    for p in &files {
        let name = p.file_name().unwrap().to_string_lossy();
        assert!(!name.starts_with("catalog"), "{}", p.display());
        let bytes = std::fs::read(p).unwrap();
        assert!(!contains(&bytes, MARKER), "{} holds plaintext", p.display());
        assert!(
            !contains(&bytes, b"disk.img"),
            "{} names the source",
            p.display()
        );
        for id in &plain_ids {
            assert!(
                !contains(&bytes, id),
                "{} holds a plain block id",
                p.display()
            );
        }
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.repo.join("config")).unwrap()).unwrap();
    assert_eq!(config["version"], 2);
    assert!(config.get("block_size").is_none(), "{config}");
    let (run, report) = t.check(true);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
}

#[test]
fn wrong_or_missing_password_exits_12_and_writes_nothing() {
    let t = TestRepo::encrypted(&[]);
    let img = marked_image(&t);
    t.backup(&img.path, &[]);
    let before = snapshot_of_folder(&t.repo);
    std::fs::write(t.path("wrong"), "not the password\n").unwrap();
    let wrong = t.path("wrong").display().to_string();
    for args in [
        vec!["snapshots"],
        vec!["backup", "disk.img"],
        vec!["check", "--read-data"],
        vec!["prune"],
        vec!["key", "list"],
    ] {
        let mut all: Vec<&dyn AsRef<OsStr>> = vec![&"--password-file", &wrong];
        for a in &args {
            all.push(a);
        }
        let r = t.run(&all).expect_code(12);
        r.stderr_mentions(&["wrong password"]);
    }
    // No password at all (stdin is not a terminal): 12, and it says how.
    let r = run_in_env(
        t.root(),
        &[&"-r", &t.repo, &"snapshots"],
        &[("CBTVAULT_CACHE_DIR", &t.path("cache").display().to_string())],
    )
    .expect_code(12);
    r.stderr_mentions(&["CBTVAULT_PASSWORD", "--password-file"]);
    // An empty password file: the same, naming the file.
    std::fs::write(t.path("empty"), "\n").unwrap();
    let empty = t.path("empty").display().to_string();
    t.run(&[&"--password-file", &empty, &"snapshots"])
        .expect_code(12)
        .stderr_mentions(&["is empty", &empty]);
    // CBTVAULT_PASSWORD works, --password-file beats it.
    run_in_env(
        t.root(),
        &[&"-r", &t.repo, &"snapshots"],
        &[
            ("CBTVAULT_PASSWORD", "test password"),
            ("CBTVAULT_CACHE_DIR", &t.path("cache").display().to_string()),
        ],
    )
    .ok();
    assert_eq!(snapshot_of_folder(&t.repo), before, "a refused run wrote");
}

#[test]
fn tampered_swapped_and_truncated_objects_are_found_and_never_restored() {
    let t = TestRepo::encrypted(&["--pack-size-mib", "1"]);
    let img = marked_image(&t);
    let a = TestRepo::id_of(&t.backup(&img.path, &[]));
    for i in (1..48).step_by(3) {
        img.write_block(i, &random_block(9, i));
    }
    let b = TestRepo::id_of(&t.backup(&img.path, &[]));

    // One flipped byte inside a sealed blob: restore refuses (exit 3) and
    // leaves no target; check --read-data names the pack.
    let packs = t.packs();
    let pack = &packs[0];
    flip_byte(pack, 100);
    // Whichever snapshot needs that blob fails, naming it; its target is
    // removed (the restore contract: exit 1, nothing left).
    let mut failed = 0;
    for id in [&a, &b] {
        let target = t.path(&format!("out-{id}.img"));
        let r = t.restore(id, &target, &[]);
        if r.code != 0 {
            assert_eq!(r.code, 1, "{}", r.stderr);
            r.stderr_mentions(&["damaged", "authentication failed"]);
            assert!(!target.exists());
            failed += 1;
        }
    }
    assert!(failed >= 1, "a damaged sealed blob was restored");
    let (run, report) = t.check(true);
    assert_ne!(run.code, 0);
    let name = pack.file_name().unwrap().to_string_lossy().into_owned();
    assert!(report.to_string().contains(&name[..16]), "{report}");
    flip_byte(pack, 100); // undo

    // A snapshot object replaced by another's bytes under its name.
    let snaps: Vec<_> = all_files(&t.repo.join("snapshots"));
    assert_eq!(snaps.len(), 2);
    let saved = std::fs::read(&snaps[0]).unwrap();
    std::fs::copy(&snaps[1], &snaps[0]).unwrap();
    let (run, _) = t.check(false);
    assert_ne!(run.code, 0, "a swapped snapshot object passed check");
    std::fs::write(&snaps[0], &saved).unwrap();

    // A truncated pack: its trailer no longer opens.
    let bytes = std::fs::read(pack).unwrap();
    std::fs::write(pack, &bytes[..bytes.len() - 30]).unwrap();
    let (run, _) = t.check(false);
    assert_ne!(run.code, 0, "a truncated pack passed check");
    std::fs::write(pack, &bytes).unwrap();

    // A key object from another repository (same password) opens nothing.
    let other = TestRepo::encrypted(&[]);
    for k in all_files(&t.repo.join("keys")) {
        std::fs::remove_file(k).unwrap();
    }
    for k in all_files(&other.repo.join("keys")) {
        std::fs::copy(&k, t.repo.join("keys").join(k.file_name().unwrap())).unwrap();
    }
    t.run(&[&"snapshots"]).expect_code(12);
}

#[test]
fn keys_add_remove_and_change_password() {
    let t = TestRepo::encrypted(&[]);
    let img = marked_image(&t);
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    let h = img.hash();
    let file = |name: &str, pw: &str| {
        let p = t.path(name);
        std::fs::write(&p, format!("{pw}\n")).unwrap();
        p.display().to_string()
    };
    let (pw2, pw3) = (file("pw2", "second"), file("pw3", "third"));
    let first_key = t.run(&[&"--json", &"key", &"list"]).ok().json()["keys"][0]["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut kdf: Vec<&dyn AsRef<OsStr>> = vec![&"key", &"add", &"--new-password-file", &pw2];
    for a in FAST_KDF {
        kdf.push(a);
    }
    let added = t.run(&kdf).ok();
    assert!(added.stderr.is_empty() || !added.stderr.contains("error"));
    let list = t.run(&[&"--json", &"key", &"list"]).ok().json();
    assert_eq!(list["keys"].as_array().unwrap().len(), 2, "{list}");
    // Either password opens it.
    t.run(&[&"--password-file", &pw2, &"snapshots"]).ok();
    // The key in use, and (later) the last key, cannot be removed.
    t.run(&[&"key", &"remove", &&first_key[..12]])
        .expect_code(1)
        .stderr_mentions(&["opened the repository with"]);
    t.run(&[
        &"--password-file",
        &pw2,
        &"key",
        &"remove",
        &&first_key[..12],
    ])
    .ok();
    t.run(&[&"snapshots"]).expect_code(12);
    // passwd: the new password works, the old one no longer does.
    let mut passwd: Vec<&dyn AsRef<OsStr>> = vec![
        &"--password-file",
        &pw2,
        &"key",
        &"passwd",
        &"--new-password-file",
        &pw3,
    ];
    for a in FAST_KDF {
        passwd.push(a);
    }
    t.run(&passwd).ok();
    t.run(&[&"--password-file", &pw2, &"snapshots"])
        .expect_code(12);
    let last = t
        .run(&[&"--password-file", &pw3, &"--json", &"key", &"list"])
        .ok()
        .json();
    let keys = last["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{last}");
    assert_eq!(keys[0]["current"], true);
    let only = keys[0]["key_id"].as_str().unwrap().to_string();
    t.run(&[&"--password-file", &pw3, &"key", &"remove", &only])
        .expect_code(1);
    // The data never changed.
    let out = t.path("back.img");
    t.run(&[&"--password-file", &pw3, &"restore", &id, &"--target", &out])
        .ok();
    assert_eq!(hash_file(&out), h);
    // A plain repository has no keys.
    let plain = TestRepo::new();
    plain
        .run(&[&"key", &"list"])
        .expect_code(1)
        .stderr_mentions(&["not encrypted"]);
}

#[test]
fn copy_plain_to_encrypted_to_plain_is_bit_exact_and_deduplicates() {
    let a = TestRepo::init(&["--pack-size-mib", "1"]);
    let img = marked_image(&a);
    let mut snaps = Vec::new();
    for round in 0..3u64 {
        if round > 0 {
            for i in (round..48).step_by(6) {
                img.write_block(i, &random_block(20 + round, i));
            }
        }
        snaps.push((TestRepo::id_of(&a.backup(&img.path, &[])), img.hash()));
    }
    let b = TestRepo::encrypted(&["--pack-size-mib", "1"]);
    let c = TestRepo::init(&["--pack-size-mib", "1"]);
    let copy = |from: &TestRepo, to: &TestRepo| -> serde_json::Value {
        let env: Vec<(&str, &str)> = b
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        run_in_env(
            a.root(),
            &[
                &"--json", &"copy", &"--from", &from.repo, &"--to", &to.repo, &"--all",
            ],
            &env,
        )
        .ok()
        .json()
    };
    let ab = copy(&a, &b);
    assert_eq!(ab["copied_snapshot_ids"].as_array().unwrap().len(), 3);
    let sent = u64_of(&ab, "blocks_sent");
    // Again: nothing to send (ids recomputed, found present).
    let again = copy(&a, &b);
    assert_eq!(u64_of(&again, "blocks_sent"), 0, "{again}");
    let bc = copy(&b, &c);
    assert_eq!(u64_of(&bc, "blocks_sent"), sent, "{bc}");
    for (id, h) in &snaps {
        b.assert_restores(id, *h, img.size());
        c.assert_restores(id, *h, img.size());
    }
    // The plain copy's ids are plain BLAKE3 again: the same manifests as
    // the source's.
    for (id, _) in &snaps {
        assert_eq!(a.cat_snapshot(id)["entries"], c.cat_snapshot(id)["entries"]);
    }
    for t in [&b, &c] {
        let (run, report) = t.check(true);
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    }
}

#[test]
fn prune_and_forget_work_on_encrypted_repositories() {
    let t = TestRepo::encrypted(&["--pack-size-mib", "1"]);
    let img = marked_image(&t);
    let mut ids = Vec::new();
    for round in 0..4u64 {
        for i in (round..48).step_by(4) {
            img.write_block(i, &random_block(30 + round, i));
        }
        ids.push((TestRepo::id_of(&t.backup(&img.path, &[])), img.hash()));
    }
    t.run(&[&"forget", &ids[0].0, &ids[1].0]).ok();
    t.run(&[&"prune", &"--max-unused", &"0"]).ok();
    for (id, h) in &ids[2..] {
        t.assert_restores(id, *h, img.size());
    }
    let (run, report) = t.check(true);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    // The catalog rebuilt from the packs with the key.
    std::fs::remove_dir_all(t.path("cache")).unwrap();
    t.run(&[&"repair", &"index"]).ok();
    for (id, h) in &ids[2..] {
        t.assert_restores(id, *h, img.size());
    }
}

/// `key passwd` killed after the new key object is durable and before the
/// old one is removed: both keys exist, each opens with its own password,
/// and the data is intact (format-spec/09-encryption.md#key-object).
#[test]
#[cfg(debug_assertions)]
fn key_passwd_killed_between_writing_and_removing_leaves_both_keys() {
    let t = TestRepo::encrypted(&[]);
    let img = marked_image(&t);
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    std::fs::write(t.path("new"), "new password\n").unwrap();
    let new = t.path("new").display().to_string();
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"key", &"passwd", &"--new-password-file", &new];
    for a in FAST_KDF {
        args.push(a);
    }
    let r = t.run_env(&args, &[("CBTVAULT_TEST_KILL", "key_passwd_new_written:1")]);
    assert_ne!(r.code, 0, "the kill point was not reached");
    assert_eq!(all_files(&t.repo.join("keys")).len(), 2);
    t.run(&[&"snapshots"]).ok();
    t.run(&[&"--password-file", &new, &"snapshots"]).ok();
    t.run(&[&"unlock"]).ok();
    t.assert_restores(&id, img.hash(), img.size());
}

/// On object storage `init` encrypts unless told `--no-encrypt`.
#[test]
fn s3_repositories_are_encrypted_by_default() {
    let server = crate::s3::S3Server::shared();
    let enc = TestRepo::at(&server.fresh_url("enc"), server.env(), &[]);
    let plain = TestRepo::at(&server.fresh_url("plain"), server.env(), &["--no-encrypt"]);
    for (t, want) in [(&enc, 2), (&plain, 1)] {
        let c = t.run(&[&"cat", &"config"]).ok().item("config");
        assert_eq!(c["config"]["version"], want, "{c}");
    }
    let img = marked_image(&enc);
    let id = TestRepo::id_of(&enc.backup(&img.path, &[]));
    enc.assert_restores(&id, img.hash(), img.size());
    // Without the password: exit 12; a second machine with it restores.
    let mut no_pw = enc.other_machine();
    no_pw.env.retain(|(k, _)| k != "CBTVAULT_PASSWORD_FILE");
    no_pw.run(&[&"snapshots"]).expect_code(12);
    let other = enc.other_machine();
    other.assert_restores(&id, img.hash(), img.size());
}

/// On a terminal the password is asked for (twice for a new one, echo
/// off), never read from argv; a mismatch creates nothing.
#[test]
fn a_terminal_is_asked_for_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let cache = dir.path().join("cache");
    // `script` gives the command a pseudo-terminal fed from our stdin.
    let on_tty = |input: &str, args: &str| -> (i32, String) {
        let mut child = std::process::Command::new("script")
            .args([
                "-qec",
                &format!("{} -r {} {args}", bin(), repo.display()),
                "/dev/null",
            ])
            .env("CBTVAULT_CACHE_DIR", &cache)
            .env_remove("CBTVAULT_PASSWORD")
            .env_remove("CBTVAULT_PASSWORD_FILE")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run script (util-linux)");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = on_tty(
        "one\ntwo\n",
        "init --encrypt --kdf-memory 8 --kdf-iterations 1",
    );
    assert_eq!(code, 12, "{out}");
    assert!(out.contains("differ"), "{out}");
    assert!(
        !repo.exists(),
        "a refused init created the repository folder"
    );
    let (code, out) = on_tty(
        "hunter2\nhunter2\n",
        "init --encrypt --kdf-memory 8 --kdf-iterations 1",
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("new password for repository"), "{out}");
    let (code, out) = on_tty("hunter2\n", "snapshots");
    assert_eq!(code, 0, "{out}");
    let (code, out) = on_tty("hunter3\n", "snapshots");
    assert_eq!(code, 12, "{out}");
}

/// Sealed packs are named by their sealed trailer and footer
/// (09-encryption.md#pack, 02-pack.md#naming): check finds a pack copied
/// under another name from the listing reads alone, for an encrypted
/// repository as for a plain one, and the original stays intact.
#[test]
fn a_pack_under_another_name_is_found_in_plain_and_encrypted_repositories() {
    for t in [TestRepo::encrypted(&[]), TestRepo::new()] {
        let img = marked_image(&t);
        let id = TestRepo::id_of(&t.backup(&img.path, &[]));
        let (check, report) = t.check(false);
        assert_eq!(check.code, 0, "{report}");
        let pack = t.packs().into_iter().next().expect("a pack");
        let other = "ab".repeat(32);
        let dir = t.repo.join("data").join("ab");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&pack, dir.join(&other)).unwrap();
        let (check, report) = t.check(false);
        check.expect_code(3);
        let text = report.to_string();
        assert_eq!(
            text.matches("does not match its name").count(),
            1,
            "{report}"
        );
        assert!(text.contains(&other), "{report}");
        t.assert_restores(&id, img.hash(), img.size());
        std::fs::remove_file(dir.join(&other)).unwrap();
        let (check, report) = t.check(true);
        assert_eq!(check.code, 0, "{report}");
    }
}
