//! Everyday conveniences (issue 21): `-v` detail levels, shell
//! completions and man pages, `tag`, `restore --target -` refusing a
//! terminal, one size format, progress that starts sensibly, and messages
//! with correct plurals said once.

use std::ffi::OsStr;

use serde_json::Value;

use crate::util::*;

/// Lines of `text` that contain `word`.
fn count_lines(text: &str, word: &str) -> usize {
    text.lines().filter(|l| l.contains(word)).count()
}

#[test]
fn verbose_and_quiet_together_is_a_usage_error() {
    let t = TestRepo::new();
    let r = t.run(&[&"-v", &"-q", &"snapshots"]).expect_code(2);
    r.stderr_mentions(&["--verbose", "--quiet"]);
    assert!(r.stdout.is_empty());
}

/// `-v` names the parent chosen and how much is read, restore the
/// snapshot chosen, prune its lock; without `-v` none of it; with
/// `--json` stdout stays the one result and the detail is JSON on stderr.
#[test]
fn verbose_prints_step_detail_on_stderr_only() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("v.img"), &random_bytes(71, 0, 8 * BSU));
    let plain = t.run(&[&"backup", &img.path]).ok();
    assert!(!plain.stderr.contains("parent"), "{}", plain.stderr);

    img.write_block(2, &random_block(72, 2));
    let r = t.run(&[&"-v", &"backup", &img.path]).ok();
    let first_id = str_of(&t.snapshots(&[])[0], "snapshot_id").to_string();
    assert!(
        r.stderr
            .contains(&format!("parent snapshot {}", &first_id[..8])),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("reading 8 of 8 blocks"), "{}", r.stderr);
    assert!(r.stderr.contains("1 block changed"), "{}", r.stderr);
    assert!(
        !r.out().contains("parent snapshot"),
        "detail is not on stdout"
    );

    // --json: stdout is exactly one result object; detail lines are JSON.
    let r = t.run(&[&"-v", &"--json", &"backup", &img.path]).ok();
    let summary = r.json();
    assert!(summary.get("snapshot_id").is_some(), "{summary}");
    let details: Vec<Value> = r
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|d: &Value| d["message_type"] != "warning")
        .collect();
    assert!(details.len() >= 3, "{}", r.stderr);
    for d in &details {
        assert_eq!(d["message_type"], "verbose", "{d}");
        assert_eq!(d["level"], 1, "-v shows level 1 only: {d}");
    }
    let vv = t.run(&[&"-vv", &"backup", &img.path]).ok();
    assert!(vv.stderr.contains("synthetic full"), "{}", vv.stderr);

    let id = TestRepo::id_of(&summary);
    let target = t.path("v.out");
    let r = t
        .run(&[&"-v", &"restore", &id.as_str(), &"--target", &target])
        .ok();
    assert!(
        r.stderr
            .contains(&format!("restoring snapshot {}", &id[..8])),
        "{}",
        r.stderr
    );
    assert_eq!(hash_file(&target), img.hash());

    let r = t.run(&[&"-v", &"prune"]).ok();
    assert!(r.stderr.contains("prune: exclusive lock"), "{}", r.stderr);
    let r = t.run(&[&"prune"]).ok();
    assert!(!r.stderr.contains("prune:"), "{}", r.stderr);
}

/// One snapshot is "1 snapshot", and `check` and `prune` count right.
#[test]
fn counts_have_correct_plurals() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("p.img"), &random_bytes(73, 0, 4 * BSU));
    t.backup(&img.path, &[]);
    let r = t.run(&[&"check"]).ok();
    assert!(
        r.out().contains("checked 1 snapshot, 1 pack"),
        "{}",
        r.out()
    );
    let r = t.run(&[&"snapshots", &"--group-by", &"source"]).ok();
    assert!(r.out().contains("1 snapshot\n"), "{}", r.out());
    assert!(!r.out().contains("1 snapshots"), "{}", r.out());
    let r = t.run(&[&"prune"]).ok();
    assert!(r.out().contains("1 snapshot object marked"), "{}", r.out());
    assert!(
        r.out().contains("delete 0 packs and repack 0 packs"),
        "{}",
        r.out()
    );
    // One block changed and read: "read 1 block".
    let one = Image::from_bytes(&t.path("one.img"), &random_bytes(79, 0, BSU));
    let r = t.run(&[&"backup", &one.path]).ok();
    assert!(r.out().contains("read 1 block ("), "{}", r.out());
    let r = t.run(&[&"repair", &"index"]).ok();
    assert!(
        r.out()
            .contains("catalog rebuilt: 2 packs, 5 blocks, 2 snapshots"),
        "{}",
        r.out()
    );
}

/// `unlock` says what it did, also when there was nothing to do.
#[test]
fn unlock_says_what_it_did() {
    let t = TestRepo::new();
    let r = t.run(&[&"unlock"]).ok();
    assert_eq!(r.out(), "no stale locks\n");
    for seed in [1u8, 2] {
        let name = hex::encode([seed; 32]);
        std::fs::write(t.repo.join("locks").join(name), b"not a lock").unwrap();
    }
    let r = t.run(&[&"unlock"]).ok();
    assert_eq!(
        count_lines(&r.out(), "removed stale lock "),
        2,
        "{}",
        r.out()
    );
    assert!(r.out().ends_with("removed 2 stale locks\n"), "{}", r.out());
    assert!(t.files_under("locks").is_empty());
    let r = t.run(&[&"-q", &"unlock"]).ok();
    assert!(r.stdout.is_empty());
}

/// A backup whose parent's chain is broken says "new backup set" once
/// (a warning), not again in the summary.
#[test]
fn new_backup_set_reason_is_said_once() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("n.img"), &random_bytes(74, 0, 8 * BSU));
    let first = t.backup(&img.path, &[]);
    let bitmap = t.path("bm.b64");
    img.write_block(3, &random_block(75, 3));
    write_bitmap(&bitmap, &bitmap_base64(img.size(), &[3]));
    t.backup(&img.path, &["--changed-blocks", bitmap.to_str().unwrap()]);
    let object = t
        .snapshots(&[])
        .iter()
        .find(|s| s["snapshot_id"] == first["snapshot_id"])
        .map(|s| str_of(s, "object").to_string())
        .expect("first snapshot listed");
    std::fs::remove_file(t.repo.join("snapshots").join(&object)).unwrap();
    img.write_block(5, &random_block(76, 5));
    write_bitmap(&bitmap, &bitmap_base64(img.size(), &[5]));
    let r = t
        .run(&[
            &"backup",
            &img.path,
            &"--changed-blocks",
            &bitmap.to_str().unwrap(),
        ])
        .ok();
    let all = format!("{}{}", r.out(), r.stderr);
    assert_eq!(count_lines(&all, "new backup set"), 1, "{all}");
    assert!(r.stderr.contains("new backup set"), "{all}");
    // A --full backup says it once too.
    let r = t.run(&[&"backup", &img.path, &"--full"]).ok();
    let all = format!("{}{}", r.out(), r.stderr);
    assert_eq!(count_lines(&all, "new backup set"), 1, "{all}");
}

#[allow(dead_code)]
fn args<'a>(a: &'a [&'a str]) -> Vec<&'a dyn AsRef<OsStr>> {
    a.iter().map(|s| s as &dyn AsRef<OsStr>).collect()
}

/// `generate --completions bash` prints a script bash parses; with --json
/// the script stays alone on stdout and the summary goes to stderr. Every
/// shell clap_complete knows gets a script.
#[test]
fn generate_completions_bash_parses() {
    let t = TestRepo::new();
    let r = t.run(&[&"generate", &"--completions", &"bash"]).ok();
    let script = t.path("cbtvault.bash");
    std::fs::write(&script, &r.stdout).unwrap();
    let out = std::process::Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("run bash -n");
    assert!(
        out.status.success(),
        "bash -n refuses the script: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It completes the subcommands and a subcommand's flags.
    let text = r.out();
    for word in [
        "backup",
        "snapshots",
        "restore",
        "--completions",
        "--target",
    ] {
        assert!(text.contains(word), "the script does not know '{word}'");
    }
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let r = t.run(&[&"generate", &"--completions", &shell]).ok();
        assert!(r.out().contains("backup"), "{shell}: {}", r.out());
    }
    let j = t
        .run(&[&"--json", &"generate", &"--completions", &"bash"])
        .ok();
    assert_eq!(
        j.stdout,
        r_stdout_bash(&t),
        "--json leaves the script alone"
    );
    let summary: Value = serde_json::from_str(j.stderr.lines().last().unwrap()).unwrap();
    assert_eq!(summary["message_type"], "summary");
    assert_eq!(summary["shell"], "bash");
    assert_eq!(summary["script_bytes"], j.stdout.len());
    messages_of("generate --completions (stderr)", j.stderr.as_bytes());
    // An unknown shell is a usage error naming the choices.
    t.run(&[&"generate", &"--completions", &"tcsh"])
        .expect_code(2)
        .stderr_mentions(&["tcsh", "bash", "powershell"]);
    t.run(&[&"generate"]).expect_code(2);
}

fn r_stdout_bash(t: &TestRepo) -> Vec<u8> {
    t.run(&[&"generate", &"--completions", &"bash"]).ok().stdout
}

/// `generate --man DIR` writes one page per command and subcommand, each
/// a roff page with a .TH header and a NAME section; groff, where
/// installed, formats each without errors.
#[test]
fn generate_man_writes_a_page_per_subcommand() {
    let t = TestRepo::new();
    let dir = t.path("man");
    let r = t.run(&[&"generate", &"--man", &dir]).ok();
    let mut expected = vec!["cbtvault".to_string()];
    let help = t.run(&[&"--help"]).ok().out();
    let commands: Vec<String> = help
        .split("Commands:")
        .nth(1)
        .expect("--help lists commands")
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    assert!(commands.len() >= 15, "{commands:?}");
    for c in &commands {
        expected.push(format!("cbtvault-{c}"));
    }
    for sub in ["index", "packs", "snapshots", "tmp"] {
        expected.push(format!("cbtvault-repair-{sub}"));
    }
    for sub in ["list", "add", "remove", "passwd"] {
        expected.push(format!("cbtvault-key-{sub}"));
    }
    expected.push("cbtvault-config-check".to_string());
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    let mut want: Vec<String> = expected.iter().map(|e| format!("{e}.1")).collect();
    want.sort();
    assert_eq!(found, want);
    assert!(
        r.out().contains(&format!("wrote {} man pages", want.len())),
        "{}",
        r.out()
    );
    let groff = std::process::Command::new("groff")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    for name in &expected {
        let page = dir.join(format!("{name}.1"));
        let text = std::fs::read_to_string(&page).unwrap();
        assert!(text.contains(&format!(".TH {name} 1")), "{name}: {text}");
        let after_name = text
            .split(".SH NAME\n")
            .nth(1)
            .unwrap_or_else(|| panic!("{name}: no NAME section"));
        let first = after_name.lines().next().unwrap();
        assert!(
            first.starts_with(&name.replace('-', "\\-")) && first.contains(" \\- "),
            "{name}: NAME line '{first}'"
        );
        if groff {
            let out = std::process::Command::new("groff")
                .args(["-man", "-Tutf8", "-ww", "-z"])
                .arg(&page)
                .output()
                .unwrap();
            assert!(out.status.success(), "groff fails on {name}");
            let err = String::from_utf8_lossy(&out.stderr);
            for line in err.lines() {
                // Line-filling notes on long option lists are layout only.
                assert!(
                    line.contains("cannot adjust line") || line.contains("cannot break line"),
                    "groff on {name}: {line}"
                );
            }
        }
    }
}

/// The tags of snapshot `id` as `snapshots --json` lists them.
fn tags_of(t: &TestRepo, id: &str) -> Vec<String> {
    let listed: Vec<Value> = t
        .snapshots(&[])
        .into_iter()
        .filter(|s| s["snapshot_id"] == id)
        .collect();
    assert_eq!(listed.len(), 1, "snapshot {id} listed exactly once");
    listed[0]["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// The names of the objects in `snapshots/`.
fn snapshot_objects(t: &TestRepo) -> Vec<String> {
    let mut v = t.files_under("snapshots");
    v.sort();
    v
}

/// `tag --add/--remove/--set` by id and by filter: `snapshots --tag` and
/// `--json` see the new tags; a snapshot whose tags would not change is
/// not rewritten; the rewritten snapshot (and its child, layered on it)
/// restore bit for bit; check passes.
#[test]
fn tag_adds_removes_and_sets() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("t.img"), &random_bytes(80, 0, 8 * BSU));
    let a = TestRepo::id_of(&t.backup(&img.path, &["--tag", "daily"]));
    let a_hash = img.hash();
    img.write_block(4, &random_block(81, 4));
    let b = TestRepo::id_of(&t.backup(&img.path, &["--tag", "daily"]));
    let b_hash = img.hash();
    let size = img.size();

    let before = snapshot_objects(&t);
    let r = t
        .run(&[
            &"--json",
            &"tag",
            &&a[..8],
            &"--add",
            &"keep",
            &"--remove",
            &"daily",
        ])
        .ok();
    let s = r.json();
    assert_eq!(s["snapshots_changed"], 1);
    assert_eq!(s["snapshot_ids"], serde_json::json!([a]));
    assert_eq!(tags_of(&t, &a), vec!["keep"]);
    assert_eq!(tags_of(&t, &b), vec!["daily"]);
    let after = snapshot_objects(&t);
    assert_eq!(after.len(), before.len(), "the old object is removed");
    assert_ne!(after, before, "a new object is written");
    let keep = t.snapshots(&["--tag", "keep"]);
    assert_eq!(keep.len(), 1);
    assert_eq!(keep[0]["snapshot_id"], a.as_str());

    // Nothing to change: nothing rewritten.
    let before = snapshot_objects(&t);
    let r = t.run(&[&"--json", &"tag", &a, &"--add", &"keep"]).ok();
    assert_eq!(r.json()["snapshots_changed"], 0);
    assert_eq!(r.json()["snapshot_ids"], serde_json::json!([]));
    assert_eq!(
        snapshot_objects(&t),
        before,
        "an unchanged snapshot is not rewritten"
    );
    let r = t.run(&[&"tag", &a, &"--remove", &"nosuch"]).ok();
    assert!(
        r.out()
            .contains("changed the tags of 0 snapshots (1 snapshot already as asked"),
        "{}",
        r.out()
    );
    assert_eq!(snapshot_objects(&t), before);

    // By filter: every snapshot tagged daily gets --set.
    let r = t
        .run(&[
            &"--json", &"tag", &"--tag", &"daily", &"--set", &"weekly", &"--set", &"x",
        ])
        .ok();
    assert_eq!(r.json()["snapshot_ids"], serde_json::json!([b]));
    assert_eq!(tags_of(&t, &b), vec!["weekly", "x"]);
    assert!(t.snapshots(&["--tag", "daily"]).is_empty());
    // --set alone clears.
    t.run(&[&"tag", &b, &"--set"]).ok();
    assert!(tags_of(&t, &b).is_empty());
    let r = t.run(&[&"snapshots"]).ok();
    assert!(r.out().contains("keep"), "{}", r.out());

    t.assert_restores(&a, a_hash, size);
    t.assert_restores(&b, b_hash, size);
    let (_, report) = t.check(true);
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    t.run(&[&"check", &"--read-data"]).ok();

    // Refusals: an unknown id (exit 1, named, nothing changed), no
    // selection, no change, --set with --add.
    let before = snapshot_objects(&t);
    t.run(&[&"tag", &a, &"deadbeef", &"--add", &"q"])
        .expect_code(1)
        .stderr_mentions(&["deadbeef", "no snapshot matches"]);
    assert_eq!(snapshot_objects(&t), before, "nothing changed");
    assert_eq!(tags_of(&t, &a), vec!["keep"]);
    let r = t
        .run(&[&"--json", &"tag", &"ffff", &"--add", &"q"])
        .expect_code(1);
    let e: Value = serde_json::from_str(r.stderr.lines().last().unwrap()).unwrap();
    assert_eq!(e["exit_code"], 1);
    assert!(e["message"].as_str().unwrap().contains("ffff"), "{e}");
    r.messages();
    t.run(&[&"tag", &"--add", &"q"])
        .expect_code(1)
        .stderr_mentions(&["snapshot ids", "--source"]);
    t.run(&[&"tag", &a]).expect_code(2);
    t.run(&[&"tag", &a, &"--set", &"s", &"--add", &"q"])
        .expect_code(2);
}

/// A kill right after the new generation is durable, or right after the
/// old one is removed, leaves the snapshot listed exactly once, with its
/// old tags or its new ones, restoring bit for bit; check passes and a
/// re-run finishes the job.
#[test]
fn a_kill_during_tag_leaves_the_snapshot_listed_once() {
    for point in ["snapshot_durable", "tag_rewrite", "tag_remove"] {
        let t = TestRepo::new();
        let img = Image::from_bytes(&t.path("k.img"), &random_bytes(82, 0, 4 * BSU));
        let a = TestRepo::id_of(&t.backup(&img.path, &["--tag", "old"]));
        let r = t.run_env(
            &[&"tag", &a, &"--set", &"new"],
            &[("CBTVAULT_TEST_KILL", &format!("{point}:1"))],
        );
        assert_ne!(r.code, 0, "{point}: the kill did not happen");
        let tags = tags_of(&t, &a);
        assert!(
            tags == vec!["old"] || tags == vec!["new"],
            "{point}: tags {tags:?}"
        );
        t.assert_restores(&a, img.hash(), img.size());
        let (_, report) = t.check(false);
        assert_eq!(
            report["problems"],
            serde_json::json!([]),
            "{point}: {report}"
        );
        t.run(&[&"tag", &a, &"--set", &"new"]).ok();
        assert_eq!(tags_of(&t, &a), vec!["new"]);
        assert_eq!(snapshot_objects(&t).len(), 1, "{point}: garbage left");
    }
}

/// Runs `cbtvault -r REPO ARGS...` under `script`, which gives it a
/// pseudo-terminal for stdin, stdout and stderr: its exit code and what
/// the terminal showed (both streams, escape sequences and all).
fn on_a_terminal(t: &TestRepo, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut line = format!(
        "{} -r {}",
        quote(bin()),
        quote(&t.repo.display().to_string())
    );
    for a in args {
        line.push(' ');
        line.push_str(&quote(a));
    }
    let out = std::process::Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .envs(env.iter().copied())
        .env_remove("CBTVAULT_REPOSITORY")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run util-linux 'script'");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `restore --target -` refuses a terminal for stdout, saying to pipe it
/// or give a file; through a pipe it writes the disk.
#[test]
fn restore_to_stdout_refuses_a_terminal() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("s.img"), &random_bytes(83, 0, 4 * BSU));
    let id = TestRepo::id_of(&t.backup(&img.path, &[]));
    let (code, shown) = on_a_terminal(&t, &["restore", &id, "--target", "-"], &[]);
    assert_eq!(code, 1, "{shown}");
    assert!(shown.contains("stdout is a terminal"), "{shown}");
    assert!(
        shown.contains("pipe it") && shown.contains("give a file"),
        "{shown}"
    );
    assert!(shown.len() < 1000, "no disk bytes on the terminal: {shown}");
    let r = t.run(&[&"restore", &id.as_str(), &"--target", &"-"]).ok();
    assert_eq!(r.stdout, img.bytes());
}

/// On a terminal a long backup shows a progress bar, which starts without
/// a "0 B/0 B" and shows no estimate in its first seconds; through a pipe
/// there is none.
#[test]
fn a_terminal_shows_progress_and_a_pipe_does_not() {
    let t = TestRepo::new();
    let img = Image::from_bytes(&t.path("big.img"), &random_bytes(84, 0, 128 * BSU));
    // Each batch (1 MiB: a small disk is read in small batches) waits
    // 100 ms: the backup lasts about a second.
    let slow = [("CBTVAULT_TEST_DELAY", "backup_batch:100")];
    let (code, shown) = on_a_terminal(&t, &["backup", &img.path.display().to_string()], &slow);
    assert_eq!(code, 0, "{shown}");
    assert!(
        shown.contains("backup ["),
        "no bar on a terminal: {shown:?}"
    );
    assert!(
        shown.contains("% "),
        "no percentage on a terminal: {shown:?}"
    );
    assert!(
        shown.contains("/8.0 MiB"),
        "the total as sizes are written: {shown:?}"
    );
    assert!(!shown.contains("0 B/0 B"), "{shown:?}");
    assert!(
        !shown.contains("eta"),
        "an estimate in the first second: {shown:?}"
    );
    assert!(shown.contains("saved (full)"), "{shown:?}");

    img.write_block(1, &random_block(85, 1));
    let r = t.run_env(&[&"backup", &img.path, &"--full"], &slow).ok();
    let all = format!("{}{}", r.out(), r.stderr);
    assert!(!all.contains('['), "a bar through a pipe: {all}");
    assert!(!all.contains('%'), "{all}");
    assert!(!all.contains('\r') && !all.contains('\u{1b}'), "{all:?}");
    assert!(r.out().contains("saved (full)"), "{all}");
}
