//! The `--json` contract: `docs/json.md` parsed into field tables, and the
//! check every JSON line a test sees goes through (`Run::json` and
//! friends in util.rs call [`validate_line`]). The tests here check the
//! document itself (its naming scheme, its examples) and that every
//! command's output, produced for real, matches it.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde_json::Value;

use crate::util::{self, random_block, Image, TestRepo};

/// A 4 MiB image, half its blocks random.
fn image(t: &TestRepo, name: &str, seed: u64) -> Image {
    let img = Image::create(&t.path(name), 4 << 20);
    for n in (0..img.blocks()).step_by(2) {
        img.write_block(n, &random_block(seed, n));
    }
    img
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    String,
    Integer,
    Number,
    Boolean,
    Id,
    Time,
    Map,
    Object,
    Array,
    StringArray,
    IntegerArray,
    IdArray,
}

#[derive(Debug, Clone, Copy)]
struct Row {
    base: Base,
    nullable: bool,
    optional: bool,
}

#[derive(Debug)]
struct Section {
    /// The heading, e.g. `summary: backup (XenServer)`.
    title: String,
    message_type: String,
    command: Option<String>,
    /// Field path (`disks[].vdi_uuid`) -> its row.
    rows: BTreeMap<String, Row>,
}

/// The parsed document: message sections and parts.
#[derive(Debug)]
pub struct Contract {
    sections: Vec<Section>,
    /// Every ```json line of the document.
    examples: Vec<String>,
}

fn parse_type(cell: &str) -> Result<Row, String> {
    let mut t = cell.trim();
    let optional = t.ends_with("(optional)");
    if optional {
        t = t.trim_end_matches("(optional)").trim();
    }
    let nullable = t.ends_with(" or null");
    if nullable {
        t = t.trim_end_matches(" or null").trim();
    }
    let base = match t {
        "string" => Base::String,
        "integer" => Base::Integer,
        "number" => Base::Number,
        "boolean" => Base::Boolean,
        "id" => Base::Id,
        "time" => Base::Time,
        "map" => Base::Map,
        "object" => Base::Object,
        "array" => Base::Array,
        "string[]" => Base::StringArray,
        "id[]" => Base::IdArray,
        "integer[]" => Base::IntegerArray,
        other => return Err(format!("unknown type '{other}'")),
    };
    Ok(Row {
        base,
        nullable,
        optional,
    })
}

fn cells(line: &str) -> Vec<String> {
    line.trim()
        .trim_matches('|')
        .split('|')
        .map(|c| c.trim().trim_matches('`').to_string())
        .collect()
}

impl Contract {
    /// Parses `docs/json.md`; panics naming the line on a malformed one.
    fn parse(text: &str) -> Contract {
        let mut sections: Vec<Section> = Vec::new();
        // (section index, prefix, part title) to expand once all are read.
        let mut includes: Vec<(usize, String, String)> = Vec::new();
        let mut examples = Vec::new();
        let mut in_json = false;
        // The section rows belong to (tables outside `###` sections, like
        // the naming table, are prose).
        let mut current: Option<usize> = None;
        for (n, line) in text.lines().enumerate() {
            let at = || format!("docs/json.md line {}", n + 1);
            if line.starts_with("```") {
                in_json = line == "```json";
                continue;
            }
            if in_json {
                if !line.trim().is_empty() {
                    examples.push(line.to_string());
                }
                continue;
            }
            if let Some(title) = line.strip_prefix("### ") {
                let key = title.split(" (").next().unwrap_or(title);
                let (message_type, command) = match key.split_once(": ") {
                    Some((t, c)) => (t.to_string(), Some(c.to_string())),
                    None => (key.to_string(), None),
                };
                sections.push(Section {
                    title: title.to_string(),
                    message_type,
                    command,
                    rows: BTreeMap::new(),
                });
                current = Some(sections.len() - 1);
                continue;
            }
            if line.starts_with("## ") {
                current = None;
                continue;
            }
            if !line.starts_with("| `") && !line.starts_with("| all of") {
                continue;
            }
            let Some(index) = current else {
                continue;
            };
            let c = cells(line);
            if c.len() < 2 {
                panic!("{}: a row needs a name and a type", at());
            }
            if let Some(part) = c[0].strip_prefix("all of ") {
                includes.push((index, String::new(), part.to_string()));
            } else if let Some(part) = c[1].strip_prefix("all of ") {
                includes.push((index, format!("{}.", c[0]), part.to_string()));
            } else {
                let row = parse_type(&c[1]).unwrap_or_else(|e| panic!("{}: {e}", at()));
                sections[index].rows.insert(c[0].clone(), row);
            }
        }
        // Parts include no parts, so one pass suffices; a part including
        // another would be expanded in order of appearance.
        for (index, prefix, part) in includes {
            let rows: Vec<(String, Row)> = sections
                .iter()
                .find(|s| s.title == part)
                .unwrap_or_else(|| panic!("docs/json.md: no section '{part}'"))
                .rows
                .iter()
                .map(|(k, r)| (format!("{prefix}{k}"), *r))
                .collect();
            sections[index].rows.extend(rows);
        }
        Contract { sections, examples }
    }

    fn messages(&self) -> impl Iterator<Item = &Section> {
        self.sections.iter().filter(|s| s.message_type != "part")
    }
}

/// The contract, read once.
pub fn contract() -> &'static Contract {
    static C: OnceLock<Contract> = OnceLock::new();
    C.get_or_init(|| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/json.md");
        Contract::parse(&std::fs::read_to_string(&path).expect("docs/json.md"))
    })
}

fn is_time(s: &str) -> bool {
    s.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(s).is_ok()
}

fn check_value(
    rows: &BTreeMap<String, Row>,
    path: &str,
    row: Row,
    v: &Value,
) -> Result<(), String> {
    let wrong = || Err(format!("'{path}' is not {:?}: {v}", row.base));
    if v.is_null() {
        return if row.nullable { Ok(()) } else { wrong() };
    }
    match row.base {
        Base::String => v.as_str().map(|_| ()).ok_or(()).or_else(|_| wrong()),
        Base::Id => match v.as_str() {
            Some(s) if !s.is_empty() => Ok(()),
            _ => wrong(),
        },
        Base::Time => match v.as_str() {
            Some(s) if is_time(s) => Ok(()),
            _ => wrong(),
        },
        Base::Integer => {
            if v.is_u64() || v.is_i64() {
                Ok(())
            } else {
                wrong()
            }
        }
        Base::Number => {
            if v.is_number() {
                Ok(())
            } else {
                wrong()
            }
        }
        Base::Boolean => v.as_bool().map(|_| ()).ok_or(()).or_else(|_| wrong()),
        Base::Map => v.as_object().map(|_| ()).ok_or(()).or_else(|_| wrong()),
        Base::StringArray | Base::IdArray => match v.as_array() {
            Some(a)
                if a.iter().all(|e| {
                    e.as_str()
                        .is_some_and(|s| row.base == Base::StringArray || !s.is_empty())
                }) =>
            {
                Ok(())
            }
            _ => wrong(),
        },
        Base::IntegerArray => match v.as_array() {
            Some(a) if a.iter().all(|e| e.is_i64() || e.is_u64()) => Ok(()),
            _ => wrong(),
        },
        Base::Object => match v.as_object() {
            Some(o) => check_object(rows, &format!("{path}."), o),
            None => wrong(),
        },
        Base::Array => match v.as_array() {
            Some(a) => {
                for e in a {
                    match e.as_object() {
                        Some(o) => check_object(rows, &format!("{path}[]."), o)?,
                        None => return wrong(),
                    }
                }
                Ok(())
            }
            None => wrong(),
        },
    }
}

fn check_object(
    rows: &BTreeMap<String, Row>,
    prefix: &str,
    o: &serde_json::Map<String, Value>,
) -> Result<(), String> {
    for (k, v) in o {
        if prefix.is_empty() && (k == "message_type" || k == "command") {
            continue;
        }
        let path = format!("{prefix}{k}");
        let row = rows
            .get(&path)
            .ok_or_else(|| format!("'{path}' is not documented"))?;
        check_value(rows, &path, *row, v)?;
    }
    for (path, row) in rows.range(prefix.to_string()..) {
        let Some(rest) = path.strip_prefix(prefix) else {
            break;
        };
        if rest.contains('.') || row.optional {
            continue;
        }
        if !o.contains_key(rest) {
            return Err(format!("'{path}' is missing"));
        }
    }
    Ok(())
}

/// Checks one line against the contract: a JSON object whose
/// `message_type` and `command` name a documented message, matching one
/// of its documented shapes. The error says why not.
pub fn validate_line(line: &str) -> Result<Value, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON ({e}): {line}"))?;
    let o = v
        .as_object()
        .ok_or_else(|| format!("not an object: {line}"))?;
    if line.trim_end().contains('\n') {
        return Err(format!("not one line: {line}"));
    }
    let message_type = o
        .get("message_type")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("no message_type: {line}"))?;
    let command = o.get("command").and_then(Value::as_str);
    let candidates: Vec<&Section> = contract()
        .messages()
        .filter(|s| s.message_type == message_type)
        .filter(|s| match &s.command {
            // Sections keyed by command must match it; the others (status,
            // error, items) say in their text whether a command is there.
            Some(c) => command == Some(c.as_str()),
            None => true,
        })
        .collect();
    if candidates.is_empty() {
        return Err(format!(
            "no section documents message_type '{message_type}'{}: {line}",
            command
                .map(|c| format!(" of command '{c}'"))
                .unwrap_or_default()
        ));
    }
    let mut why = Vec::new();
    for s in &candidates {
        match check_object(&s.rows, "", o) {
            Ok(()) => return Ok(v),
            Err(e) => why.push(format!("as '{}': {e}", s.title)),
        }
    }
    Err(format!("{line}\n  {}", why.join("\n  ")))
}

/// Every line of `text` (a whole stream of `--json` output) validated;
/// the parsed messages. Panics with the reason on the first bad line.
#[track_caller]
pub fn validate_stream(what: &str, text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| validate_line(l).unwrap_or_else(|e| panic!("{what}: breaks docs/json.md: {e}")))
        .collect()
}

#[test]
fn the_document_follows_its_own_naming_scheme() {
    let c = contract();
    let mut bad = Vec::new();
    for s in &c.sections {
        for (path, row) in &s.rows {
            let name = path.rsplit('.').next().unwrap_or(path);
            let name = name.trim_end_matches("[]");
            let ok = match name {
                "id" | "size" | "seconds" => false,
                n if n.ends_with("_ms") || n.starts_with("bytes_") => false,
                n if n.ends_with("_ids") => row.base == Base::IdArray,
                n if n.ends_with("_id") => row.base == Base::Id,
                n if n.ends_with("_bytes") => row.base == Base::Integer,
                n if n.ends_with("_seconds") => row.base == Base::Number,
                n if n == "time" || n.ends_with("_time") => row.base == Base::Time,
                n if n.ends_with("_uuids") => row.base == Base::StringArray,
                n if n.ends_with("_uuid") || n == "uuid" => row.base == Base::String,
                n if n.ends_with("_count") || n.starts_with("blocks_") => row.base == Base::Integer,
                _ => true,
            };
            if !ok {
                bad.push(format!("{}: {path} ({:?})", s.title, row.base));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "names against the scheme:\n{}",
        bad.join("\n")
    );
    assert!(c.messages().count() >= 25, "the document lost its sections");
}

#[test]
fn every_example_in_the_document_matches_it() {
    let c = contract();
    assert!(c.examples.len() >= 20, "examples lost");
    for line in &c.examples {
        validate_line(line).unwrap_or_else(|e| panic!("example breaks the contract: {e}"));
    }
}

#[test]
fn the_validator_refuses_what_the_document_does_not_say() {
    let ok = r#"{"message_type":"summary","command":"unlock","locks_removed":[],"locks_kept":[]}"#;
    validate_line(ok).unwrap();
    for (bad, why) in [
        (
            r#"{"message_type":"summary","command":"unlock","locks_removed":[]}"#,
            "missing",
        ),
        (
            r#"{"message_type":"summary","command":"unlock","locks_removed":[],"locks_kept":[],"extra":1}"#,
            "not documented",
        ),
        (
            r#"{"message_type":"summary","command":"unlock","locks_removed":[1],"locks_kept":[]}"#,
            "is not",
        ),
        (
            r#"{"message_type":"summary","command":"nosuch"}"#,
            "no section",
        ),
        (
            r#"{"message_type":"summary","command":"forget","dry_run":false,"removed":[{"snapshot_id":"ab","source":"s","time":"2026-12-05T12:42:18+00:00","generation":0,"objects_removed":1}],"rewritten":[],"old_generations_removed":0}"#,
            "is not Time",
        ),
    ] {
        let e = validate_line(bad).expect_err(bad);
        assert!(e.contains(why), "{bad}: '{e}' should say '{why}'");
    }
}

/// Runs every command a repository of files can run, with `--json`, and
/// checks each stream line by line (the XenServer, serve and restore
/// failure shapes are checked by the tests of those features, through
/// `Run::json`).
#[test]
fn every_command_prints_documented_json_lines_ending_in_one_summary() {
    let t = TestRepo::new();
    let img = image(&t, "disk.img", 7);
    let a = TestRepo::id_of(&t.backup(&t.path("disk.img"), &[]));
    img.write_block(3, &random_block(8, 3));
    let b = TestRepo::id_of(&t.backup(&t.path("disk.img"), &["--tag", "x"]));
    let restored = t.path("r.img");
    let runs: Vec<(&str, Vec<String>)> = vec![
        ("snapshots", vec!["snapshots".into()]),
        (
            "snapshots",
            vec!["snapshots".into(), "--group-by".into(), "source".into()],
        ),
        (
            "restore",
            vec![
                "restore".into(),
                b.clone(),
                "--target".into(),
                restored.display().to_string(),
            ],
        ),
        ("check", vec!["check".into(), "--read-data".into()]),
        ("cat", vec!["cat".into(), "snapshot".into(), b.clone()]),
        ("cat", vec!["cat".into(), "config".into()]),
        ("diff", vec!["diff".into(), a.clone(), b.clone()]),
        ("stats", vec!["stats".into()]),
        ("unlock", vec!["unlock".into()]),
        (
            "tag",
            vec!["tag".into(), b.clone(), "--add".into(), "y".into()],
        ),
        (
            "forget",
            vec![
                "forget".into(),
                "--keep-last".into(),
                "1".into(),
                "--dry-run".into(),
            ],
        ),
        (
            "forget",
            vec![
                "forget".into(),
                a.clone(),
                "--no-host".into(),
                "--prune".into(),
            ],
        ),
        ("prune", vec!["prune".into()]),
        ("repair index", vec!["repair".into(), "index".into()]),
        ("repair packs", vec!["repair".into(), "packs".into()]),
        (
            "repair packs",
            vec!["repair".into(), "packs".into(), "--unreferenced".into()],
        ),
        (
            "repair snapshots",
            vec!["repair".into(), "snapshots".into()],
        ),
        ("repair tmp", vec!["repair".into(), "tmp".into()]),
        (
            "generate",
            vec![
                "generate".into(),
                "--man".into(),
                t.path("man").display().to_string(),
            ],
        ),
    ];
    for (command, args) in runs {
        let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"--json"];
        for a in &args {
            all.push(a);
        }
        let r = t.run(&all).ok();
        let messages = r.messages();
        let last = messages
            .last()
            .unwrap_or_else(|| panic!("{args:?}: no output"));
        assert_eq!(
            last["message_type"], "summary",
            "{args:?}: the last line is the summary"
        );
        assert_eq!(last["command"], command, "{args:?}");
        let summaries = messages
            .iter()
            .filter(|m| m["message_type"] == "summary")
            .count();
        assert_eq!(summaries, 1, "{args:?}: exactly one summary");
        for m in &messages {
            if m.get("command").is_some() {
                assert_eq!(m["command"], command, "{args:?}: {m}");
            }
        }
    }
    // Long work reports status lines: first when the total is known, last
    // at 100 %.
    let r = t
        .run(&[&"--json", &"restore", &b, &"--target", &t.path("r2.img")])
        .ok();
    let status: Vec<Value> = r
        .messages()
        .into_iter()
        .filter(|m| m["message_type"] == "status")
        .collect();
    assert!(status.len() >= 2, "restore prints status lines: {status:?}");
    assert_eq!(status.last().unwrap()["percent_done"], 1.0);
    assert_eq!(status[0]["total_bytes"], 4 << 20);
    drop(img);
}

#[test]
fn errors_and_warnings_are_json_on_stderr_with_the_exit_code() {
    let t = TestRepo::new();
    // No repository: exit 10, one error line naming it.
    let missing = t.path("nowhere");
    let r = util::run_in_env(t.root(), &[&"--json", &"-r", &missing, &"snapshots"], &[]);
    assert_eq!(r.code, 10, "{}", r.stderr);
    assert!(r.stdout.is_empty(), "nothing on stdout: {}", r.out());
    let lines = validate_stream("stderr", &r.stderr);
    assert_eq!(lines.len(), 1, "{}", r.stderr);
    assert_eq!(lines[0]["message_type"], "error");
    assert_eq!(lines[0]["exit_code"], 10);
    assert_eq!(lines[0]["command"], "snapshots");
    assert!(lines[0]["message"].as_str().unwrap().contains("nowhere"));
    assert!(lines[0]["causes"].as_array().unwrap().len() >= 2);
    // A failing restore of an unknown id: exit 1, JSON.
    let r = t.run(&[
        &"--json",
        &"restore",
        &"0123abcd",
        &"--target",
        &t.path("x"),
    ]);
    assert_eq!(r.code, 1);
    let lines = validate_stream("stderr", &r.stderr);
    assert_eq!(lines.last().unwrap()["exit_code"], 1);
    // A warning: the catalog rebuilt from the packs.
    image(&t, "disk.img", 3);
    t.backup(&t.path("disk.img"), &[]);
    std::fs::remove_file(t.repo.join("catalog.sqlite")).expect("remove the catalog");
    let r = t.run(&[&"--json", &"snapshots"]).ok();
    let lines = validate_stream("stderr", &r.stderr);
    assert!(
        lines.iter().any(|l| l["message_type"] == "warning"
            && l["message"].as_str().unwrap().contains("rebuilt")),
        "{}",
        r.stderr
    );
    r.messages();
}

#[test]
fn restore_to_stdout_puts_its_json_on_stderr() {
    let t = TestRepo::new();
    let img = image(&t, "disk.img", 11);
    let id = TestRepo::id_of(&t.backup(&t.path("disk.img"), &[]));
    let r = t.run(&[&"--json", &"restore", &id, &"--target", &"-"]).ok();
    assert_eq!(r.stdout.len(), 4 << 20, "stdout is the disk");
    assert_eq!(blake3::hash(&r.stdout), img.hash());
    let lines = validate_stream("stderr", &r.stderr);
    let summary = lines.last().expect("a summary on stderr");
    assert_eq!(summary["message_type"], "summary");
    assert_eq!(summary["target"], "stdout");
    assert_eq!(summary["complete"], true);
}
