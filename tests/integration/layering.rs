//! The workspace's layering, checked from the manifests and the sources:
//! `nbd`, `xapi-wire`, `vim-wire` and `diskfs` depend on no crate of the
//! workspace, `xapi-sim` and `vsphere-sim` never on the product, the
//! product's dependency on the simulator is the optional one behind the
//! `sim` feature, and only the `sim` and `demo` commands name the simulator.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// (package, dependency, kind, optional) for every dependency of every
/// workspace member that is itself a workspace member.
fn workspace_edges() -> Vec<(String, String, String, bool)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .arg("--manifest-path")
        .arg(Path::new(ROOT).join("Cargo.toml"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let packages = meta["packages"].as_array().expect("packages");
    let members: BTreeSet<String> = packages
        .iter()
        .map(|p| p["name"].as_str().expect("package name").to_string())
        .collect();
    for expected in [
        "cbtvault",
        "nbd",
        "xapi-wire",
        "xapi-sim",
        "diskfs",
        "vim-wire",
        "vsphere-sim",
    ] {
        assert!(
            members.contains(expected),
            "{expected} is not a workspace member: {members:?}"
        );
    }
    let mut edges = Vec::new();
    for p in packages {
        for d in p["dependencies"].as_array().expect("dependencies") {
            let name = d["name"].as_str().expect("dependency name");
            if members.contains(name) {
                edges.push((
                    p["name"].as_str().unwrap().to_string(),
                    name.to_string(),
                    d["kind"].as_str().unwrap_or("normal").to_string(),
                    d["optional"].as_bool().unwrap_or(false),
                ));
            }
        }
    }
    edges
}

#[test]
fn layering_no_forbidden_edge_between_workspace_crates() {
    let edges = workspace_edges();
    for (from, to, kind, _) in &edges {
        let forbidden = match from.as_str() {
            "nbd" | "xapi-wire" | "diskfs" | "vim-wire" => true,
            "xapi-sim" | "vsphere-sim" => to == "cbtvault",
            _ => false,
        };
        assert!(
            !forbidden,
            "forbidden dependency {from} -> {to} ({kind}): nbd, xapi-wire, vim-wire and diskfs \
             depend on no workspace crate, xapi-sim and vsphere-sim never on the product"
        );
    }
    // The product's normal dependency on the simulator is the optional one
    // behind the `sim` feature (the tests may use it as a peer).
    for (from, to, kind, optional) in &edges {
        if from == "cbtvault" && (to == "xapi-sim" || to == "vsphere-sim") && kind == "normal" {
            assert!(
                optional,
                "cbtvault -> {to} must be optional (feature 'sim')"
            );
        }
    }
    assert!(
        edges
            .iter()
            .any(|(f, t, k, _)| f == "xapi-sim" && t == "nbd" && k == "normal"),
        "the metadata lists no xapi-sim -> nbd edge: the check reads the wrong thing"
    );
    assert!(
        edges
            .iter()
            .any(|(f, t, k, _)| f == "vsphere-sim" && t == "vim-wire" && k == "normal"),
        "the metadata lists no vsphere-sim -> vim-wire edge: the check reads the wrong thing"
    );
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn layering_only_the_sim_and_demo_commands_name_the_simulator() {
    let src = Path::new(ROOT).join("src");
    let allowed = [src.join("commands/sim.rs"), src.join("commands/demo.rs")];
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(
        files.len() > 20,
        "found only {} files under src/",
        files.len()
    );
    let mut offenders = Vec::new();
    for file in files.iter().filter(|f| !allowed.contains(f)) {
        let text = std::fs::read_to_string(file).expect("read a source file");
        for (n, line) in text.lines().enumerate() {
            if line.contains("crate::sim")
                || line.contains("xapi_sim")
                || line.contains("vsphere_sim")
            {
                offenders.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "the product names the simulator outside the sim/demo commands:\n{}",
        offenders.join("\n")
    );
}
