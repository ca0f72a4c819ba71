//! Syntax and path checks of the cookbook recipes under `recipes/`: every
//! TOML parses, every path a file names exists in this workspace, and every
//! program a config starts is one a recipe installs.

use std::fs;
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn all() -> Vec<PathBuf> {
    let mut v = Vec::new();
    files(&workspace().join("recipes"), &mut v);
    v.sort();
    v
}

fn toml_of(p: &Path) -> toml::Table {
    let text = fs::read_to_string(p).unwrap();
    text.parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every `${VAR}/path` in a build script, for `VAR`.
fn script_paths(script: &str, var: &str) -> Vec<String> {
    let pat = format!("${{{var}}}/");
    script
        .match_indices(&pat)
        .map(|(i, _)| {
            script[i + pat.len()..]
                .split(['"', ' ', '\n'])
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// All build scripts' text (what gets installed where).
fn scripts() -> String {
    all()
        .iter()
        .filter(|p| p.file_name().unwrap() == "recipe.toml")
        .map(|p| {
            toml_of(p)["build"]["script"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

#[test]
fn there_are_recipes_for_iommud_and_e1000d_and_every_toml_parses() {
    let files = all();
    for want in [
        "iommud/recipe.toml",
        "e1000d/recipe.toml",
        "nvmed/recipe.toml",
        "recipes/README.md",
    ] {
        assert!(files.iter().any(|p| p.ends_with(want)), "missing {want}");
    }
    for p in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
    {
        toml_of(p);
    }
}

#[test]
fn recipe_paths_exist_in_the_workspace() {
    let recipes_dir = workspace().join("recipes");
    for p in all()
        .iter()
        .filter(|p| p.file_name().unwrap() == "recipe.toml")
    {
        let dir = p.parent().unwrap();
        let t = toml_of(p);
        let src = t["source"]["path"].as_str().expect("source.path");
        let root = dir.join(src).canonicalize().unwrap();
        assert_eq!(
            root,
            workspace(),
            "{}: source.path is not the workspace",
            p.display()
        );
        let build = t["build"].as_table().expect("[build]");
        let cargo = build["cargopath"].as_str().expect("build.cargopath");
        assert!(
            root.join(cargo).join("Cargo.toml").is_file(),
            "{}: {cargo}",
            p.display()
        );
        let script = build["script"].as_str().expect("build.script");
        for rel in script_paths(script, "COOKBOOK_SOURCE") {
            assert!(root.join(&rel).exists(), "{}: {rel}", p.display());
        }
        for rel in script_paths(script, "COOKBOOK_RECIPE") {
            assert!(dir.join(&rel).is_file(), "{}: {rel}", p.display());
        }
        if let Some(deps) = t.get("package").and_then(|p| p.get("dependencies")) {
            for d in deps.as_array().unwrap() {
                let d = d.as_str().unwrap();
                assert!(
                    recipes_dir.join(d).join("recipe.toml").is_file(),
                    "dependency {d}"
                );
            }
        }
    }
}

#[test]
fn pcid_config_binds_the_e1000_to_a_driver_a_recipe_installs() {
    let scripts = scripts();
    let mut seen = false;
    for p in all()
        .iter()
        .filter(|p| p.parent().unwrap().ends_with("pcid.d"))
    {
        let t = toml_of(p);
        for d in t["drivers"].as_array().expect("[[drivers]]") {
            let int = |k: &str| d[k].as_integer().unwrap_or_else(|| panic!("{k}"));
            let cmd = d["command"].as_array().unwrap()[0].as_str().unwrap();
            assert!(
                scripts.contains(&format!("/usr/lib/drivers/{cmd}\"")),
                "{cmd} is not installed to /usr/lib/drivers by any recipe"
            );
            if (int("class"), int("vendor"), int("device")) == (0x02, 0x8086, 0x100e) {
                seen = true;
            }
        }
    }
    assert!(
        seen,
        "no pcid config binds class 0x02 vendor 0x8086 device 0x100e"
    );
}

#[test]
fn init_file_starts_a_daemon_a_recipe_installs() {
    let scripts = scripts();
    let init: Vec<_> = all()
        .into_iter()
        .filter(|p| p.parent().unwrap().ends_with("init.d"))
        .collect();
    assert!(!init.is_empty());
    for p in init {
        for line in fs::read_to_string(&p).unwrap().lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let prog = line
                .strip_prefix("notify ")
                .expect("init lines are `notify <daemon>`");
            assert!(
                scripts.contains(&format!("/usr/bin/{prog}\"")),
                "{}: {prog} is not installed to /usr/bin by any recipe",
                p.display()
            );
        }
    }
}
